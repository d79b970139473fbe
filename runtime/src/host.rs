//! Mounts in kiln's own process rather than in a container: overlay views the build engine
//! reads and writes through (COPY over an image's layers), and the private mount namespace
//! that makes them disappear with the process however it ends.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::plan::overlay_options;
use crate::sys::{Errno, MsFlags, RealSys, Sys};

/// A host-side mount call failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("failed to enter a private mount namespace: {0}")]
    Unshare(#[source] Errno),
    #[error("failed to make the mount tree private: {0}")]
    MakePrivate(#[source] Errno),
    #[error("path `{0}` contains a NUL byte")]
    Nul(PathBuf),
    #[error("failed to mount an overlay at `{path}`: {source}")]
    Overlay {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("failed to make or release a snapshot view at `{path}`")]
    Snapshotter {
        path: PathBuf,
        #[source]
        source: Box<crate::snapshotter::SnapshotterError>,
    },
    #[error("failed to unmount `{path}`: {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

fn cpath(p: &Path) -> Result<CString, HostError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| HostError::Nul(p.to_path_buf()))
}

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

/// Whether this kernel's overlayfs takes the `volatile` option (Linux 5.10 and later).
pub fn volatile_overlays_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .and_then(|r| {
                let mut parts = r.trim().split(['.', '-']);
                let major: u32 = parts.next()?.parse().ok()?;
                let minor: u32 = parts.next()?.parse().ok()?;
                Some((major, minor) >= (5, 10))
            })
            .unwrap_or(false)
    })
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

/// [`mount_overlay`] with the kernel's overlayfs, whatever the snapshotter.
pub fn mount_kernel_overlay(
    target: &Path,
    lower: &[PathBuf],
    upper_work: Option<(&Path, &Path)>,
    volatile: bool,
) -> Result<(), HostError> {
    let volatile = volatile && upper_work.is_some() && volatile_overlays_supported();
    let sys = RealSys;
    let t = cpath(target)?;
    let err = |source| HostError::Overlay {
        path: target.to_path_buf(),
        source,
    };
    match overlay_options(lower, upper_work, volatile) {
        Some(data) => {
            let data = CString::new(data).map_err(|_| HostError::Nul(target.to_path_buf()))?;
            let flags = if upper_work.is_some() {
                MsFlags::empty()
            } else {
                MsFlags::MS_RDONLY
            };
            let overlay = CString::from(c"overlay");
            sys.mount(Some(&overlay), &t, Some(&overlay), flags, Some(&data))
                .map_err(err)
        }
        None => {
            let lower: Vec<CString> = lower.iter().map(|l| cpath(l)).collect::<Result<_, _>>()?;
            let uw = match upper_work {
                Some((u, w)) => Some((cpath(u)?, cpath(w)?)),
                None => None,
            };
            sys.mount_overlay_fsconfig(
                &t,
                &lower,
                uw.as_ref().map(|(u, w)| (u.as_c_str(), w.as_c_str())),
                &crate::plan::overlay_flags(uw.is_some(), volatile),
            )
            .map_err(err)
        }
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

/// Detaches a kernel mount at `target`.
pub fn unmount_kernel(target: &Path) -> Result<(), HostError> {
    let t = cpath(target)?;
    RealSys
        .umount2(&t, libc::MNT_DETACH)
        .map_err(|source| HostError::Unmount {
            path: target.to_path_buf(),
            source,
        })
}
