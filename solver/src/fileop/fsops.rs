//! File-system primitives the file actions share (copy, ADD's unpack, mkdir, rm): each names
//! its path on failure.

use std::fs::{self, Permissions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};

use super::FileOpError;

/// `lchown` naming the path on failure.
pub(super) fn lchown(path: &Path, uid: u32, gid: u32) -> Result<(), FileOpError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|source| FileOpError::Chown {
        path: path.to_path_buf(),
        uid,
        gid,
        source,
    })
}

/// `chmod` (never used on symlinks) naming the path on failure.
pub(super) fn set_mode(path: &Path, mode: u32) -> Result<(), FileOpError> {
    fs::set_permissions(path, Permissions::from_mode(mode)).map_err(|source| FileOpError::Chmod {
        path: path.to_path_buf(),
        mode,
        source,
    })
}

/// Sets access and modification times without following a symlink at `path`.
pub(super) fn set_times(path: &Path, atime: SystemTime, mtime: SystemTime) -> Result<(), FileOpError> {
    let times = Timestamps {
        last_access: timespec(atime),
        last_modification: timespec(mtime),
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| FileOpError::Times {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

fn timespec(t: SystemTime) -> Timespec {
    let (secs, nanos) = kiln_runtime::unixtime::split(t);
    Timespec {
        tv_sec: secs,
        tv_nsec: nanos.into(),
    }
}

/// Creates `path` and its missing parents inside `root` with `mode`, each new directory owned
/// by `owner` (root when none) and given `timestamp`. `path` must already be resolved inside
/// `root`; an existing non-directory on the way is an error. True when `path` itself was
/// created (so it is empty).
pub(super) fn mkdir_all(
    root: &Path,
    path: &Path,
    mode: u32,
    owner: Option<(u32, u32)>,
    timestamp: Option<SystemTime>,
) -> Result<bool, FileOpError> {
    let Ok(rel) = path.strip_prefix(root) else {
        return Err(FileOpError::NotADirectory {
            path: path.to_path_buf(),
        });
    };
    let mut cur = root.to_path_buf();
    let mut made = false;
    for comp in rel.components() {
        cur.push(comp);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {
                made = false;
                continue;
            }
            Ok(_) => return Err(FileOpError::NotADirectory { path: cur }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(FileOpError::Stat { path: cur, source }),
        }
        fs::create_dir(&cur).map_err(|source| FileOpError::CreateDir {
            path: cur.clone(),
            source,
        })?;
        set_mode(&cur, mode)?;
        if let Some((uid, gid)) = owner {
            lchown(&cur, uid, gid)?;
        }
        if let Some(t) = timestamp {
            set_times(&cur, t, t)?;
        }
        made = true;
    }
    Ok(made)
}

/// `rm -rf` of one path (a symlink is removed, not followed); missing is fine.
pub(super) fn remove_all(path: &Path) -> Result<(), FileOpError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(FileOpError::Stat {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let res = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    res.map_err(|source| FileOpError::Remove {
        path: path.to_path_buf(),
        source,
    })
}
