//! Kernel mounts made in kiln's own process: overlayfs and unmounts, used by `host` and by the
//! snapshotter's probe (kept apart from `host` so that neither imports the other).

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
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("failed to mount a tmpfs at `{path}`: {source}")]
    Tmpfs {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("failed to unmount `{path}`: {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

pub(crate) fn cpath(p: &Path) -> Result<CString, HostError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| HostError::Nul(p.to_path_buf()))
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

/// `host::mount_overlay` with the kernel's overlayfs, whatever the snapshotter.
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

/// Mounts a tmpfs (mode 0700, at most `size_mib` MiB) at `target`: a place for mount points
/// and small files that costs no disk writes. Mounted in kiln's private mount namespace, it
/// goes away with the process however it ends.
pub fn mount_private_tmpfs(target: &Path, size_mib: u32) -> Result<(), HostError> {
    let t = cpath(target)?;
    let tmpfs = CString::from(c"tmpfs");
    let data = CString::new(format!("mode=0700,size={size_mib}m"))
        .map_err(|_| HostError::Nul(target.to_path_buf()))?;
    RealSys
        .mount(
            Some(&tmpfs),
            &t,
            Some(&tmpfs),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(&data),
        )
        .map_err(|source| HostError::Tmpfs {
            path: target.to_path_buf(),
            source,
        })
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
