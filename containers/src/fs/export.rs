//! `kiln export`: a read-only overlay of the container's root, written as one tar.

use super::*;

/// A temporary overlay mount of a container's root filesystem, unmounted on drop.
#[derive(Debug)]
pub struct View {
    path: PathBuf,
    extra: Option<PathBuf>,
    mounted: bool,
}

impl View {
    /// Where the container's root is visible.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if self.mounted {
            let _ = kiln_runtime::host::unmount(&self.path);
        }
        let _ = fs::remove_dir(&self.path);
        if let Some(e) = &self.extra {
            let _ = fs::remove_dir(e);
        }
    }
}

/// Mounts the container's root filesystem at a temporary directory beside its upper dir:
/// writable through the upper and work dirs (only while the container is not running), or
/// read-only with the upper dir as the top lower layer (safe while it runs). The caller must be
/// in a private mount namespace.
pub fn mount_view(rootfs: &RootfsPaths, writable: bool) -> Result<View> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let base = rootfs.upper.parent().unwrap_or(Path::new("/tmp"));
    let tag = format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let path = base.join(format!(".view-{tag}"));
    fs::create_dir(&path).map_err(|source| FsError::MountPoint {
        path: path.clone(),
        source,
    })?;
    let mut view = View {
        path,
        extra: None,
        mounted: false,
    };
    let mut lower: Vec<PathBuf> = Vec::new();
    if !writable {
        lower.push(rootfs.upper.clone());
    }
    lower.extend(rootfs.lower.iter().cloned());
    // A read-only overlay needs two lower dirs, a writable one at least one.
    if lower.len() < if writable { 1 } else { 2 } {
        let empty = base.join(format!(".view-{tag}-empty"));
        fs::create_dir(&empty).map_err(|source| FsError::MountPoint {
            path: empty.clone(),
            source,
        })?;
        lower.push(empty.clone());
        view.extra = Some(empty);
    }
    let uw = writable.then_some((rootfs.upper.as_path(), rootfs.work.as_path()));
    kiln_runtime::host::mount_overlay(&view.path, &lower, uw, false).map_err(FsError::Mount)?;
    view.mounted = true;
    Ok(view)
}

/// Writes the container's merged filesystem as a tar (`kiln export`). kiln's mount points are
/// there as the empty files and directories the runtime created; volumes are not included.
/// Needs a private mount namespace (see [`mount_view`]).
pub fn export<W: Write + Send>(rootfs: &RootfsPaths, out: W) -> Result<LayerStats> {
    let view = mount_view(rootfs, false)?;
    layer::write_tree(view.path(), out, &DiffOptions::default()).map_err(FsError::Tar)
}
