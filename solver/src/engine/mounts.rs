//! Views of filesystems mounted in kiln's own (private) mount namespace, unmounted on drop.

use std::path::{Path, PathBuf};

use super::EngineError;

/// Where a build's mount points and small generated files go: a tmpfs of the build's own over
/// `SCRATCH/m` (in kiln's private mount namespace) when the snapshotter's views are mounts,
/// the plain directory otherwise or when the tmpfs cannot be mounted. Its directories cost no
/// disk writes, and removing them frees no blocks: on a filesystem mounted with `discard`
/// each removed directory costs a discard request, ~0.3-3 ms, several per step.
#[derive(Debug)]
pub(super) struct MountArea {
    path: PathBuf,
    tmpfs: bool,
}

/// The area's tmpfs holds directories and small files only (files a RUN writes are in its
/// snapshot, and a `native` view's copies are not put there).
const MOUNT_AREA_MIB: u32 = 64;

impl MountArea {
    pub fn new(scratch: &Path) -> Result<MountArea, EngineError> {
        let path = scratch.join("m");
        std::fs::create_dir(&path).map_err(|source| EngineError::CreateDir {
            path: path.clone(),
            source,
        })?;
        let tmpfs = kiln_runtime::host::views_are_mounts()
            && match kiln_runtime::host::mount_private_tmpfs(&path, MOUNT_AREA_MIB) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "mount points stay on disk");
                    false
                }
            };
        Ok(MountArea { path, tmpfs })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MountArea {
    fn drop(&mut self) {
        // Whatever is still mounted below goes with it; the directory is then removed with
        // the scratch space.
        if self.tmpfs {
            if let Err(e) = kiln_runtime::host::unmount_kernel(&self.path) {
                tracing::warn!("failed to unmount {}: {e}", self.path.display());
            }
        }
    }
}

/// A mount made by the engine in its own mount namespace; detached on drop.
#[derive(Debug)]
pub(super) struct HostMount {
    pub path: PathBuf,
    /// A scratch tree the mount uses (e.g. a lower dir of its own), removed after the unmount.
    remove_after: Option<PathBuf>,
}

impl Drop for HostMount {
    fn drop(&mut self) {
        if let Err(e) = kiln_runtime::host::unmount(&self.path) {
            tracing::warn!("failed to unmount {}: {e}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir(&self.path);
        if let Some(dir) = &self.remove_after {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Mounts an overlay of `lower` (top first) at a fresh directory under `scratch`, read-only
/// unless `upper_work` is given. A writable one is a file op's result, mounted `volatile` as a
/// RUN step's root is (see `kiln_runtime::RunOptions::volatile_upper`).
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
    kiln_runtime::host::mount_overlay(&target, lower, upper_work, true).map_err(|e| EngineError::Mount {
        path: target.clone(),
        source: Box::new(e),
    })?;
    Ok(HostMount {
        path: target,
        remove_after: None,
    })
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

/// A read-only view of a local context directory without the paths `.dockerignore` hides, as
/// BuildKit's transferred context would be: the directory itself when nothing is hidden, else an
/// overlay whose top layer holds a whiteout for each hidden path.
pub(super) fn context_view(scratch: &Path, root: &Path, hidden: &[String]) -> Result<View, EngineError> {
    if hidden.is_empty() {
        return Ok(View::Dir(root.to_path_buf()));
    }
    let wh = tempfile::Builder::new()
        .prefix("ctx-wh-")
        .tempdir_in(scratch)
        .map_err(|source| EngineError::CreateDir {
            path: scratch.into(),
            source,
        })?
        .keep();
    let made =
        whiteouts(&wh, root, hidden).and_then(|()| overlay(scratch, &[wh.clone(), root.to_path_buf()], None));
    match made {
        Ok(mut m) => {
            m.remove_after = Some(wh);
            Ok(View::Mounted(m))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&wh);
            Err(e)
        }
    }
}

/// Fills `wh` with a whiteout (char device 0:0) for each hidden path, creating the parent
/// directories with the mode and owner they have under `root` (the top layer's directory
/// attributes are what the overlay shows).
fn whiteouts(wh: &Path, root: &Path, hidden: &[String]) -> Result<(), EngineError> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| EngineError::CreateDir { path, source }
    };
    let mut made: Vec<(PathBuf, std::time::SystemTime)> = Vec::new();
    for rel in hidden {
        let mut parent_rel = PathBuf::new();
        let components: Vec<&str> = rel.split('/').collect();
        let Some((name, parents)) = components.split_last() else {
            continue;
        };
        for p in parents {
            parent_rel.push(p);
            let dst = wh.join(&parent_rel);
            if dst.exists() {
                continue;
            }
            let meta = std::fs::symlink_metadata(root.join(&parent_rel)).map_err(err(&dst))?;
            std::fs::create_dir(&dst).map_err(err(&dst))?;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(err(&dst))?;
            std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid())).map_err(err(&dst))?;
            if let Ok(t) = meta.modified() {
                made.push((dst, t));
            }
        }
        let dst = wh.join(&parent_rel).join(name);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &dst,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            0,
        )
        .map_err(|e| EngineError::CreateDir {
            path: dst.clone(),
            source: e.into(),
        })?;
    }
    // Children are in place: now the directories can get their original mtimes.
    for (dir, t) in made {
        std::fs::File::open(&dir)
            .and_then(|f| f.set_modified(t))
            .map_err(err(&dir))?;
    }
    Ok(())
}
