//! Views of filesystems mounted in kiln's own (private) mount namespace, unmounted on drop.

use std::path::{Path, PathBuf};

use super::EngineError;

/// A mount made by the engine in its own mount namespace; detached on drop.
#[derive(Debug)]
pub(super) struct HostMount {
    pub path: PathBuf,
}

impl Drop for HostMount {
    fn drop(&mut self) {
        if let Err(e) = kiln_runtime::host::unmount(&self.path) {
            tracing::warn!("failed to unmount {}: {e}", self.path.display());
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Mounts an overlay of `lower` (top first) at a fresh directory under `scratch`, read-only
/// unless `upper_work` is given.
pub(super) fn overlay(
    scratch: &Path,
    lower: &[PathBuf],
    upper_work: Option<(&Path, &Path)>,
) -> Result<HostMount, EngineError> {
    let target = tempfile::Builder::new()
        .prefix("mnt-")
        .tempdir_in(scratch)
        .map_err(|source| EngineError::CreateDir {
            path: scratch.into(),
            source,
        })?
        .keep();
    kiln_runtime::host::mount_overlay(&target, lower, upper_work).map_err(|e| EngineError::Mount {
        path: target.clone(),
        source: Box::new(e),
    })?;
    Ok(HostMount { path: target })
}

/// A read-only view of a stack of lower dirs: the directory itself when there is one (an
/// overlay without an upper dir needs two lower dirs), an overlay otherwise.
pub(super) enum View {
    Dir(PathBuf),
    Mounted(HostMount),
}

impl View {
    pub fn path(&self) -> &Path {
        match self {
            View::Dir(p) => p,
            View::Mounted(m) => &m.path,
        }
    }
}

pub(super) fn read_only_view(scratch: &Path, empty: &Path, lower: &[PathBuf]) -> Result<View, EngineError> {
    match lower {
        [] => Ok(View::Dir(empty.to_path_buf())),
        [one] => Ok(View::Dir(one.clone())),
        many => Ok(View::Mounted(overlay(scratch, many, None)?)),
    }
}
