//! COPY / ADD / WORKDIR / heredoc files: [`crate::fileop`] run over an overlay of the input.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_cache::buildcache::Layer;
use kiln_cache::layer;
use kiln_cache::snapshot::Snapshot;
use kiln_dag::{CopyAction, Digest, FileAction, FileOp, Vertex};

use super::mounts::{self, View};
use super::{Engine, EngineError, Output};
use crate::fileop::link::{Donors, Linking};
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
        v: &Vertex,
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
                self.mount_area.path(),
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
        // Each filesystem input's layer trees, top first.
        let mut layer_dirs: Vec<Vec<PathBuf>> = vec![Vec::new(); inputs.len()];
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
                    let view = mounts::read_only_view(self.mount_area.path(), &self.empty, &lower)?;
                    let root = SourceRoot::filesystem(view.path().to_path_buf());
                    views.push(view);
                    layer_dirs[i] = lower;
                    root
                }
            };
            roots.push(root);
        }
        let actions = f.actions.clone();
        let digest = v.digest();
        let (linking, donor) = match self.linking(&digest, f, inputs, &layer_dirs, mutable.upper()) {
            Some((l, d)) => (Some(l), d),
            None => (None, None),
        };
        let opts = FileOpOptions {
            timestamp: self
                .opts
                .source_date_epoch
                .map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.max(0) as u64)),
            linking: linking.clone(),
        };
        if ctx.cancel().is_cancelled() {
            return Err(SolveError::Cancelled);
        }
        let started = std::time::Instant::now();
        let applied = tokio::task::block_in_place(|| fileop::apply(&dest, &roots, &actions, &opts));
        drop(views);
        drop(dest_mount);
        tracing::debug!(elapsed = ?started.elapsed(), "file actions applied");
        if let Err(e) = applied {
            mutable.discard();
            return Err(e.into());
        }
        let this: &Engine = self;
        // With SOURCE_DATE_EPOCH the tar clamps times, so a result's diff ID depends on more
        // than its tree: such results neither record an index nor reuse a donor's diff ID.
        let keyed = linking.as_ref().filter(|_| self.opts.source_date_epoch.is_none());
        if let Some(l) = &linking {
            tracing::debug!(linked = l.linked(), "files linked from an earlier result");
        }
        if let (Some(l), Some(donor)) = (keyed, &donor) {
            if self.is_donors_tree(l, donor, &base, mutable.upper()) {
                // The same tree over the same base: the earlier snapshot and layer are this
                // result (what writing the tar would have found, by its diff ID).
                self.drop_beside(mutable);
                let mut layers = base.clone();
                layers.push(Layer {
                    snapshot: donor.key,
                    blob: donor.diff_id,
                    diff_id: donor.diff_id,
                    size: donor.size,
                    media_type: super::LAYER_TAR.into(),
                    // Made now, like any result of a step that ran.
                    created: Some(kiln_cache::images::now_rfc3339()),
                });
                return Ok(Output::Fs(Arc::new(layers)));
            }
        }
        // Not the earlier tree: keep the result stacked on the earlier one, or make the links
        // the copy put off.
        let mut mutable = mutable;
        if let Some(l) = &linking {
            let over = keyed.and(donor.as_ref());
            if let Err(e) = tokio::task::block_in_place(|| self.finish_links(l, over, &base, &mut mutable)) {
                mutable.discard();
                return Err(e);
            }
        }
        if let Some(l) = keyed {
            let index = l.take_index();
            if index.files() > 0 {
                if let Err(e) = mutable.attach(FILE_INDEX, index.bytes()) {
                    tracing::debug!(error = %e, "file index not stored");
                }
            }
        }
        let keyed = keyed.is_some();
        // The donors' lists are done with: free them before the layer write (a 500k-file copy
        // holds tens of MB in them).
        drop(opts);
        drop(linking);
        // A linked copy's tar records where its files' entries sit; the files it linked from
        // the last result are copied from that result's tar rather than read again.
        let indexed = keyed.then(|| donor.as_ref().and_then(|d| self.tar_donor(d)));
        let started = std::time::Instant::now();
        let layers =
            tokio::task::block_in_place(|| this.commit_layer_with(&base, mutable, Vec::new(), indexed))?;
        tracing::debug!(elapsed = ?started.elapsed(), "file op layer committed");
        if let (true, Some(top)) = (keyed, layers.last()) {
            self.set_lineage(&digest, &top.snapshot);
        }
        Ok(Output::Fs(Arc::new(layers)))
    }

    /// Completes a deferring copy's result in `mutable`: stacked on the bottom tree of `donor`
    /// (when keyed, see [`Engine::stack_base`]) if that pair shows it, with only the links the
    /// pair lacks made; otherwise with every link the copy put off made.
    fn finish_links(
        &self,
        l: &Linking,
        donor: Option<&Snapshot>,
        base: &[Layer],
        mutable: &mut kiln_cache::snapshot::MutableSnapshot,
    ) -> Result<(), SolveError> {
        let started = std::time::Instant::now();
        let bottom = donor.and_then(|d| self.stack_base(l, d, base));
        let stacked = bottom.filter(|_| l.fits_over());
        match &stacked {
            Some(bottom) => {
                l.make_pending_over()?;
                mutable.stack_on(bottom).map_err(EngineError::Snapshots)?;
            }
            None => l.make_pending()?,
        }
        tracing::debug!(elapsed = ?started.elapsed(), stacked = stacked.is_some(), "pending links made");
        Ok(())
    }

    /// The snapshot an edited copy's result may be stacked on (see [`Linking::fits_over`]):
    /// the bottom of `donor`'s trees (the donor itself, or the one it is stacked on), when the
    /// donor is this copy's earlier result over the same `base`, the bottom stands alone, and
    /// the copy wrote no more than half its files (a result that rewrote most of them stands
    /// alone, so the earlier tree can go).
    fn stack_base(&self, l: &Linking, donor: &Snapshot, base: &[Layer]) -> Option<Digest> {
        if super::chain_id(base, &donor.diff_id) != donor.key {
            return None;
        }
        let written = l.files().saturating_sub(l.linked());
        if l.files() == 0 || written > l.files() / 2 {
            return None;
        }
        match donor.parent {
            None => Some(donor.key),
            Some(p) => self.snapshots.get(&p)?.parent.is_none().then_some(p),
        }
    }

    /// Whether a linking copy's result (written into `upper` over `base`, its links still
    /// pending) is the tree of `donor`, the earlier result it linked from, over the same base.
    fn is_donors_tree(&self, l: &Linking, donor: &Snapshot, base: &[Layer], upper: &Path) -> bool {
        let started = std::time::Instant::now();
        let (linked, files) = (l.linked(), l.files());
        // A stacked donor's path is its changed files only: such a result is written, and
        // found to be the donor's by its diff ID.
        let same = linked == files
            && files > 0
            && donor.parent.is_none()
            && super::chain_id(base, &donor.diff_id) == donor.key
            && self.store.content().contains(&donor.diff_id)
            && tokio::task::block_in_place(|| {
                let pending = l.pending_in_place();
                layer::same_tree_assuming(upper, &donor.path, &|rel| pending.contains(rel))
            });
        tracing::debug!(same, linked, files, elapsed = ?started.elapsed(), "result compared with the earlier one");
        same
    }

    /// Linking for a file op (vertex digest `vertex`) that is one copy. From a local context,
    /// its files are keyed, and those the last result of this same vertex holds identically are
    /// linked from it. From a filesystem (`layer_dirs`: each input's layer trees) onto scratch
    /// (`COPY --link`), files whose metadata the copy keeps are linked from the layers
    /// themselves.
    fn linking(
        &self,
        vertex: &Digest,
        f: &FileOp,
        inputs: &[Resolved<Output>],
        layer_dirs: &[Vec<PathBuf>],
        upper: &Path,
    ) -> Option<(Arc<Linking>, Option<Snapshot>)> {
        // Linking writes the upper dir beside the mounted view: only the kernel's overlay shows it.
        if !kiln_runtime::snapshotter::current().upper_is_live() {
            return None;
        }
        let [FileAction::Copy(c)] = f.actions.as_slice() else {
            return None;
        };
        let ctx = match &inputs.get(c.source_input)?.output {
            Output::Local(ctx) => ctx,
            // Only a copy onto scratch (`COPY --link`, merged afterwards), where BuildKit's own
            // diffapply hard-links too: after a plain `COPY --from` a RUN sees link counts of 1
            // in BuildKit, and so it does here.
            Output::Fs(_) if f.input.is_none() => {
                let layers = layer_dirs.get(c.source_input).filter(|l| !l.is_empty())?;
                let linking = Linking::from_layers(c.source_input, layers, upper.to_path_buf())?;
                return Some((Arc::new(linking), None));
            }
            Output::Fs(_) => return None,
        };
        let donor = self.lineage(vertex).and_then(|key| {
            let snap = self.snapshots.get(&key)?;
            let trees = self.snapshots.lower_dirs(&key).ok()?;
            let donors = Donors::new(trees, &self.snapshots.attachment(&key, FILE_INDEX)?)?;
            Some((snap, donors))
        });
        let (donors, donor) = match donor {
            Some((snap, donors)) => (Some(donors), Some(snap)),
            None => (None, None),
        };
        let known: Arc<LocalContextContent> = Arc::new(LocalContextContent(ctx.clone()));
        let mut linking = Linking::new(c.source_input, known, upper.to_path_buf(), donors);
        // The result may be the donor's own tree (found by comparing, with SOURCE_DATE_EPOCH
        // unset): links are then made only once that is ruled out.
        if donor.is_some() && self.opts.source_date_epoch.is_none() {
            linking = linking.deferring();
        }
        Some((Arc::new(linking), donor))
    }

    /// The tar of `donor` (an earlier linked copy's snapshot) with its index, when both are
    /// in the store.
    fn tar_donor(&self, donor: &Snapshot) -> Option<Arc<layer::Donor>> {
        let index = layer::TarIndex::decode(&self.snapshots.attachment(&donor.key, super::TAR_INDEX)?)?;
        let blob = self.store.content().source(&donor.diff_id).ok()?;
        Some(Arc::new(layer::Donor::new(blob, index)))
    }

    fn lineage_path(&self, vertex: &Digest) -> PathBuf {
        self.store.cache_dir().join("lineage").join(vertex.hex())
    }

    /// The snapshot the last run of `vertex` produced, if recorded.
    fn lineage(&self, vertex: &Digest) -> Option<Digest> {
        let text = std::fs::read_to_string(self.lineage_path(vertex)).ok()?;
        Digest::parse(&format!("sha256:{}", text.trim())).ok()
    }

    /// Records `snapshot` as the last result of `vertex` when it carries a file index (a result
    /// deduplicated into a snapshot without one keeps the older record). Best effort: the
    /// record only saves work.
    fn set_lineage(&self, vertex: &Digest, snapshot: &Digest) {
        if self.snapshots.attachment_path(snapshot, FILE_INDEX).is_none() {
            return;
        }
        let path = self.lineage_path(vertex);
        let tmp = path.with_file_name(kiln_cache::temp::name(".lineage.kiln-", ".tmp"));
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, snapshot.hex()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(error = %e, "lineage not recorded");
        }
    }
}

/// The attachment name of a copy result's [`FileIndex`](crate::fileop::link::FileIndex).
const FILE_INDEX: &str = "files";

/// A local context's index as the copy's content oracle.
struct LocalContextContent(Arc<super::LocalContext>);

impl fileop::link::KnownContent for LocalContextContent {
    fn content(&self, rel: &str, meta: &fileop::Meta) -> Option<[u8; 32]> {
        self.0.index.content(rel, meta)
    }

    fn scanned(&self, rel: &str) -> Option<fileop::Meta> {
        self.0.index.scanned(rel)
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
