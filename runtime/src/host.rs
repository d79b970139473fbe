//! Mounts in kiln's own process rather than in a container: overlay views the build engine
//! reads and writes through (COPY over an image's layers), and the private mount namespace
//! that makes them disappear with the process however it ends.

use std::ffi::CString;
use std::path::{Path, PathBuf};

pub use crate::hostmount::{
    mount_kernel_overlay, mount_private_tmpfs, unmount_kernel, volatile_overlays_supported, HostError,
};
use crate::sys::{MsFlags, RealSys, Sys};

/// Moves the calling process into a new mount namespace whose mounts do not propagate back to
/// the host. Must be called while the process has a single thread (before any runtime or
/// thread pool starts): the kernel refuses `unshare(CLONE_NEWNS)` otherwise.
pub fn enter_private_mount_namespace() -> Result<(), HostError> {
    let sys = RealSys;
    sys.unshare(libc::CLONE_NEWNS).map_err(HostError::Unshare)?;
    let root = CString::from(c"/");
    sys.mount(None, &root, None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)
        .map_err(HostError::MakePrivate)
}

/// Mounts an overlay of `lower` (top first) at `target`: writable through `upper_work`
/// (upper dir, work dir), read-only without it (then at least two lower dirs are needed).
/// `volatile` mounts a writable overlay with overlayfs' `volatile` option where the kernel has
/// it: no sync reaches the upper filesystem, not even the one the unmount would make of that
/// whole filesystem. Only for an upper dir whose durability the caller handles itself.
/// Made by the process's snapshotter ([`crate::snapshotter::current`]): with fuse-overlayfs or
/// copies, the upper dir holds the changes only once [`unmount`] released the view.
pub fn mount_overlay(
    target: &Path,
    lower: &[PathBuf],
    upper_work: Option<(&Path, &Path)>,
    volatile: bool,
) -> Result<(), HostError> {
    match crate::snapshotter::current() {
        crate::snapshotter::Snapshotter::Overlay => mount_kernel_overlay(target, lower, upper_work, volatile),
        other => crate::snapshotter::mount(other, target, lower, upper_work, &[]).map_err(|source| {
            HostError::Snapshotter {
                path: target.to_path_buf(),
                source: Box::new(source),
            }
        }),
    }
}

/// Detaches the mount at `target` (lazily, so open files do not keep it busy), or releases the
/// snapshotter's view there (a writable one's changes then are in its upper dir).
pub fn unmount(target: &Path) -> Result<(), HostError> {
    if let Some(released) = crate::snapshotter::release(target) {
        return released.map_err(|source| HostError::Snapshotter {
            path: target.to_path_buf(),
            source: Box::new(source),
        });
    }
    unmount_kernel(target)
}

/// Whether a view of the current snapshotter is kept in memory-light form at its mount point
/// (a kernel or FUSE mount): not so for `native`, whose views are copies written into it.
pub fn views_are_mounts() -> bool {
    !matches!(
        crate::snapshotter::current(),
        crate::snapshotter::Snapshotter::Native
    )
}
