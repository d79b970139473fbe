//! COPY / ADD / WORKDIR / heredoc files: [`crate::fileop`] run over an overlay of the input.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_dag::{CopyAction, FileAction, FileOp};

use super::mounts::{self, View};
use super::{Engine, EngineError, Output};
use crate::fileop::{self, FileOpOptions, SourceRoot};
use crate::scheduler::{ExecCtx, Resolved, SolveError};

impl From<fileop::FileOpError> for SolveError {
    fn from(e: fileop::FileOpError) -> SolveError {
        SolveError::op(e)
    }
}

impl Engine {
    pub(super) async fn file(
        &self,
        f: &FileOp,
        inputs: &[Resolved<Output>],
        ctx: &ExecCtx,
    ) -> Result<Output, SolveError> {
        let base = match f.input {
            Some(i) => Self::fs_input(inputs, i)?,
            None => Vec::new(),
        };
        let lower = self.lower_dirs(&base).await?;
        let mutable = self.snapshots.prepare(None).map_err(EngineError::Snapshots)?;
        // With nothing below, the upper dir is the whole filesystem: write straight into it.
        let dest_mount = if lower.is_empty() {
            None
        } else {
            Some(mounts::overlay(
                self.scratch.path(),
                &lower,
                Some((mutable.upper(), mutable.work())),
            )?)
        };
        let dest: PathBuf = dest_mount
            .as_ref()
            .map(|m| m.path.clone())
            .unwrap_or_else(|| mutable.upper().into());

        // One source root per input position (only those the actions read are prepared).
        let mut views: Vec<View> = Vec::new();
        let mut roots: Vec<SourceRoot> = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            let used = f
                .actions
                .iter()
                .any(|a| matches!(a, FileAction::Copy(c) if c.source_input == i));
            let root = match (&input.output, used) {
                (_, false) => SourceRoot::filesystem(self.empty.clone()),
                (Output::Local(c), true) => {
                    let filter = kiln_patterns::Matcher::new(&c.ignore)
                        .ok()
                        .filter(|m| !m.is_empty());
                    SourceRoot::context(c.root.clone(), filter)
                }
                (Output::Fs(layers), true) => {
                    let lower = self.lower_dirs(layers).await?;
                    let view = mounts::read_only_view(self.scratch.path(), &self.empty, &lower)?;
                    let root = SourceRoot::filesystem(view.path().to_path_buf());
                    views.push(view);
                    root
                }
            };
            roots.push(root);
        }
        let actions = f.actions.clone();
        let opts = FileOpOptions {
            timestamp: self
                .opts
                .source_date_epoch
                .map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.max(0) as u64)),
        };
        if ctx.cancel().is_cancelled() {
            return Err(SolveError::Cancelled);
        }
        let applied = tokio::task::block_in_place(|| fileop::apply(&dest, &roots, &actions, &opts));
        drop(views);
        drop(dest_mount);
        if let Err(e) = applied {
            mutable.discard();
            return Err(e.into());
        }
        let this: &Engine = self;
        let layers = tokio::task::block_in_place(|| this.commit_layer(&base, mutable, Vec::new()))?;
        Ok(Output::Fs(Arc::new(layers)))
    }
}

/// Copies the contents of `src` into the directory `dest` (seeding a cache mount).
pub(super) fn copy_tree_into(src: &Path, dest: &Path) -> Result<(), SolveError> {
    let action = FileAction::Copy(CopyAction {
        source_input: 0,
        src: "/".into(),
        dest: "/".into(),
        owner: None,
        mode: None,
        follow_symlinks: true,
        dir_contents_only: true,
        allow_wildcard: false,
        allow_empty_wildcard: false,
        create_dest_path: true,
        dest_is_dir: true,
        attempt_unpack: false,
        exclude: Vec::new(),
        parents: false,
    });
    fileop::apply(
        dest,
        &[SourceRoot::filesystem(src)],
        &[action],
        &FileOpOptions::default(),
    )?;
    Ok(())
}
