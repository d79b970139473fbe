//! Views through `fuse-overlayfs`: one daemon per view, a child of kiln that dies with it
//! (`PR_SET_PDEATHSIG` from a thread that lives as long as the process). On release the upper
//! dir is put in the kernel's format: fuse-overlayfs marks an opaque directory with a
//! `.wh..wh..opq` file (and a `.wh..opq` whiteout) or a `user.fuseoverlayfs.opaque` attribute, and
//! where it cannot make a 0/0 device it whites out `NAME` with a `.wh.NAME` file.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{mknodat, Mode, SFlag};

use super::{io_err, SnapshotterError};

/// A mounted fuse-overlayfs view.
pub(crate) struct FuseView {
    child: Child,
    upper: Option<PathBuf>,
    lower: Vec<PathBuf>,
    /// An empty lower dir made for a view of no layers, removed on release.
    empty: Option<PathBuf>,
    log: PathBuf,
}

/// The fuse-overlayfs program, if it is installed and `/dev/fuse` can be opened; else why not.
pub fn available() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let program = std::env::split_paths(&path)
        .map(|d| d.join("fuse-overlayfs"))
        .find(|p| p.is_file())
        .ok_or_else(|| "fuse-overlayfs is not installed (Debian package fuse-overlayfs)".to_string())?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("/dev/fuse cannot be opened: {e}"))?;
    Ok(program)
}

fn option_path(p: &Path) -> Result<&str, SnapshotterError> {
    p.to_str()
        .filter(|s| !s.contains([':', ',', '\0']))
        .ok_or_else(|| SnapshotterError::FuseBadPath(p.to_path_buf()))
}

/// Mounts `lower` (top first) at `target`, writable through `upper_work` when given.
pub(crate) fn mount(
    target: &Path,
    lower: &[PathBuf],
    upper_work: Option<(&Path, &Path)>,
) -> Result<FuseView, SnapshotterError> {
    let program = available().map_err(SnapshotterError::FuseMissing)?;
    let mut empty = None;
    let mut lowers = Vec::new();
    if lower.is_empty() {
        let dir = PathBuf::from(format!("{}.empty", target.display()));
        std::fs::create_dir_all(&dir).map_err(io_err("failed to create", &dir))?;
        lowers.push(option_path(&dir)?.to_string());
        empty = Some(dir);
    }
    for l in lower {
        lowers.push(option_path(l)?.to_string());
    }
    let mut opts = format!("lowerdir={}", lowers.join(":"));
    if let Some((u, w)) = upper_work {
        opts.push_str(&format!(
            ",upperdir={},workdir={}",
            option_path(u)?,
            option_path(w)?
        ));
    }
    // Every user of the container, not only its root, reads through the view.
    opts.push_str(",allow_other");
    let log = PathBuf::from(format!("{}.log", target.display()));
    let log_file = std::fs::File::create(&log).map_err(io_err("failed to create", &log))?;
    let mut cmd = Command::new(&program);
    cmd.arg("-f")
        .arg("-o")
        .arg(&opts)
        .arg(target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    crate::sys::kill_with_spawning_thread(&mut cmd);
    let spawned = crate::sandbox::on_spawner_thread(move || cmd.spawn())
        .unwrap_or_else(|| Err(std::io::Error::other("no thread to spawn it from")));
    let child = spawned.map_err(io_err("failed to start", &program))?;
    let mut view = FuseView {
        child,
        upper: upper_work.map(|(u, _)| u.to_path_buf()),
        lower: lower.to_vec(),
        empty,
        log,
    };
    let parent_dev = target
        .parent()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.dev());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(m) = std::fs::metadata(target) {
            if Some(m.dev()) != parent_dev {
                return Ok(view);
            }
        }
        let failed = match view.child.try_wait() {
            Ok(Some(status)) => Some(format!("it exited ({status})")),
            Ok(None) if Instant::now() > deadline => Some("no mount after 20 s".to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = failed {
            let said = std::fs::read_to_string(&view.log).unwrap_or_default();
            let _ = view.child.kill();
            let _ = view.child.wait();
            view.remove_scratch();
            return Err(SnapshotterError::FuseMount {
                path: target.to_path_buf(),
                message: format!("{why}: {}", said.trim()),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl FuseView {
    fn remove_scratch(&self) {
        let _ = std::fs::remove_file(&self.log);
        if let Some(e) = &self.empty {
            let _ = std::fs::remove_dir(e);
        }
    }

    /// Unmounts, waits for the daemon to end (every write has then reached the upper dir) and
    /// puts the upper dir in the kernel's format.
    pub(crate) fn release(mut self, target: &Path) -> Result<(), SnapshotterError> {
        let unmounted = crate::hostmount::unmount_kernel(target);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        self.remove_scratch();
        if let Err(crate::hostmount::HostError::Unmount { path, source }) = unmounted {
            return Err(SnapshotterError::Unmount { path, source });
        }
        match &self.upper {
            Some(upper) => normalize(upper, Path::new(""), &self.lower),
            None => Ok(()),
        }
    }
}

const OPAQUE_FILE: &[u8] = b".wh..wh..opq";
const OPAQUE_WHITEOUT: &[u8] = b".wh..opq";
const FUSE_XATTR_PREFIX: &[u8] = b"user.fuseoverlayfs.";

/// Whether a lower layer (top first) shows an entry at `rel`.
pub(crate) fn in_lower(lower: &[PathBuf], rel: &Path) -> bool {
    for l in lower {
        if let Ok(md) = std::fs::symlink_metadata(l.join(rel)) {
            return !(md.file_type().is_char_device() && md.rdev() == 0);
        }
    }
    false
}

/// Rewrites fuse-overlayfs' markers in `upper`/`rel` (recursively) as the kernel's overlayfs
/// writes them. fuse-overlayfs marks every directory it makes opaque; the kernel only one made
/// where a lower entry was removed.
pub(crate) fn normalize(upper: &Path, rel: &Path, lower: &[PathBuf]) -> Result<(), SnapshotterError> {
    let dir = &upper.join(rel);
    let before = std::fs::symlink_metadata(dir).map_err(io_err("failed to stat", dir))?;
    let mut opaque = false;
    for x in list_xattrs(dir) {
        let b = x.as_bytes();
        if b.starts_with(FUSE_XATTR_PREFIX) || b == b"trusted.overlay.opaque" || b == b"user.overlay.opaque" {
            opaque |= b.ends_with(b".opaque");
            let _ = xattr::remove(dir, &x);
        }
    }
    // Whether the step changed which entries the directory holds (a whiteout, an entry no lower
    // layer has): else it is in the upper dir for copy-ups only, which the kernel's overlayfs
    // makes without changing the directory's times and fuse-overlayfs does not.
    let mut entries_changed = false;
    let entries = std::fs::read_dir(dir).map_err(io_err("failed to read", dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err("failed to read", dir))?;
        let name = entry.file_name();
        let path = entry.path();
        let md = std::fs::symlink_metadata(&path).map_err(io_err("failed to stat", &path))?;
        let bytes = name.as_bytes();
        if bytes == OPAQUE_FILE || (bytes == OPAQUE_WHITEOUT && md.file_type().is_char_device()) {
            opaque = true;
            std::fs::remove_file(&path).map_err(io_err("failed to remove", &path))?;
        } else if let Some(hidden) = bytes.strip_prefix(b".wh.").filter(|_| md.is_file()) {
            entries_changed = true;
            std::fs::remove_file(&path).map_err(io_err("failed to remove", &path))?;
            let wh = dir.join(OsStr::from_bytes(hidden));
            mknodat(AT_FDCWD, &wh, SFlag::S_IFCHR, Mode::empty(), 0).map_err(|e| SnapshotterError::Io {
                what: "failed to make a whiteout",
                path: wh.clone(),
                source: e.into(),
            })?;
        } else if md.file_type().is_char_device() && md.rdev() == 0 {
            entries_changed = true;
        } else if md.is_dir() {
            entries_changed |= !in_lower(lower, &rel.join(&name));
            normalize(upper, &rel.join(&name), lower)?;
        } else if !in_lower(lower, &rel.join(&name)) {
            entries_changed = true;
        }
        if !md.is_dir() && !md.file_type().is_symlink() {
            for x in list_xattrs(&path) {
                if x.as_bytes().starts_with(FUSE_XATTR_PREFIX) {
                    let _ = xattr::remove(&path, &x);
                }
            }
        }
    }
    // Removing markers changed the directory's times: they are the ones the step left, or the
    // lower directory's where only copy-ups put it here.
    let lower_dir = lower
        .iter()
        .find_map(|l| std::fs::symlink_metadata(l.join(rel)).ok())
        .filter(|m| m.is_dir());
    let before = match lower_dir {
        Some(m) if !entries_changed && !opaque && !rel.as_os_str().is_empty() => m,
        _ => before,
    };
    super::set_times(dir, &before).map_err(|source| SnapshotterError::Io {
        what: "failed to set the times of",
        path: dir.clone(),
        source,
    })?;
    if opaque && !rel.as_os_str().is_empty() && in_lower(lower, rel) {
        xattr::set(dir, super::opaque_xattr(), b"y").map_err(|source| SnapshotterError::Io {
            what: "failed to mark opaque",
            path: dir.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// The names of `path`'s extended attributes (none where they cannot be listed).
pub(crate) fn list_xattrs(path: &Path) -> Vec<std::ffi::OsString> {
    let Ok(names) = xattr::list(path) else {
        return Vec::new();
    };
    names.filter(|s| !s.is_empty()).collect()
}

/// The value of `path`'s attribute `name`.
pub(crate) fn get_xattr(path: &Path, name: &OsStr) -> std::io::Result<Vec<u8>> {
    // A missing attribute is an error here, as `lgetxattr`'s ENODATA.
    xattr::get(path, name)?.ok_or_else(|| nix::errno::Errno::ENODATA.into())
}
