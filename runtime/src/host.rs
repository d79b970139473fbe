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
pub fn mount_overlay(
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

/// How kiln makes snapshots' writable views here, as `kiln info` and `--debug` report it: the
/// kernel's overlayfs (with `userxattr` in a user namespace, where kiln keeps overlayfs' markers in
/// `user.overlay.*` attributes), found by mounting a small overlay under `scratch` (in the
/// caller's private mount namespace). `Err` says why it cannot: kiln has no other snapshotter yet
/// (fuse-overlayfs and copying are not implemented), so builds cannot run there.
pub fn probe_snapshotter(scratch: &Path) -> Result<&'static str, String> {
    let dir = scratch.join(format!("kiln-overlay-probe-{}", std::process::id()));
    let result = (|| -> Result<(), String> {
        for d in ["l1", "l2", "u", "w", "m"] {
            std::fs::create_dir_all(dir.join(d))
                .map_err(|e| format!("failed to create `{}`: {e}", dir.join(d).display()))?;
        }
        let m = dir.join("m");
        mount_overlay(
            &m,
            &[dir.join("l1"), dir.join("l2")],
            Some((&dir.join("u"), &dir.join("w"))),
            true,
        )
        .map_err(|e| e.to_string())?;
        let _ = unmount(&m);
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    Ok(if crate::userns::in_user_namespace() {
        "overlayfs (kernel, in a user namespace: userxattr)"
    } else {
        "overlayfs (kernel)"
    })
}

/// Detaches the mount at `target` (lazily, so open files do not keep it busy).
pub fn unmount(target: &Path) -> Result<(), HostError> {
    let t = cpath(target)?;
    RealSys
        .umount2(&t, libc::MNT_DETACH)
        .map_err(|source| HostError::Unmount {
            path: target.to_path_buf(),
            source,
        })
}
