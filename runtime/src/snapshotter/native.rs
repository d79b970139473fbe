//! Views as copies: the merged tree of the layers is copied to the view (file data cloned with
//! `FICLONE` where the filesystem shares extents, copied otherwise), and what stood there is
//! remembered (inode and change time of every entry). Releasing a writable view moves what
//! changed into the upper dir as overlayfs would have put it there: a changed or new entry with
//! its parent directories, a 0/0 device for each removed lower entry, a directory made anew
//! (another inode) over a lower entry marked opaque. Change times cannot be set by a process, so
//! every write, chmod, chown, rename or utimes is seen; the view is handed over only once the
//! coarse clock has moved past the copy's last change time.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::os::fd::AsFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{mknodat, Mode, SFlag};

use super::{io_err, SnapshotterError};

/// What an entry of the view was when it was handed over.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    ino: u64,
    /// Birth time where the filesystem keeps one: an inode number can be reused at once.
    born: (i64, u32),
    ctime: (i64, i64),
    /// From a lower layer (removing it needs a whiteout), not one of the caller's stubs.
    lower: bool,
    dir: bool,
}

/// A copied view.
pub(crate) struct NativeView {
    upper: Option<PathBuf>,
    stamps: HashMap<PathBuf, Stamp>,
    /// Each directory's lower children.
    children: HashMap<PathBuf, Vec<OsString>>,
}

/// How file data is copied (for the description): each file is tried with `FICLONE` first.
pub fn reflink_note() -> &'static str {
    "; file data cloned with FICLONE where the filesystem allows, copied otherwise"
}

fn is_whiteout(md: &std::fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| matches!(xattr::get(dir, name), Ok(Some(v)) if v == b"y"))
}

/// The birth time in `md` (from `statx`, which std uses on Linux) as (seconds, nanoseconds);
/// (0, 0) where the filesystem keeps none.
fn born(md: &std::fs::Metadata) -> (i64, u32) {
    md.created().map_or((0, 0), crate::unixtime::split)
}

fn stamp(md: &std::fs::Metadata, lower: bool) -> Stamp {
    Stamp {
        ino: md.ino(),
        born: born(md),
        ctime: (md.ctime(), md.ctime_nsec()),
        lower,
        dir: md.is_dir(),
    }
}

/// Copies the merged tree of `lower` (top first) into the empty dir `target`.
pub(crate) fn mount(
    target: &Path,
    lower: &[PathBuf],
    upper: Option<&Path>,
    stubs: &[(PathBuf, bool)],
) -> Result<NativeView, SnapshotterError> {
    let mut view = NativeView {
        upper: upper.map(Path::to_path_buf),
        stamps: HashMap::new(),
        children: HashMap::new(),
    };
    let top_dirs: Vec<&Path> = lower.iter().map(PathBuf::as_path).collect();
    if let Some(top) = top_dirs.first() {
        copy_meta(top, target, true).map_err(io_err("failed to copy the attributes of", top))?;
    }
    view.merge(&top_dirs, Path::new(""), target)?;
    for (rel, is_dir) in stubs {
        let path = target.join(rel);
        if std::fs::symlink_metadata(&path).is_ok() || !path.parent().is_some_and(Path::is_dir) {
            continue;
        }
        let parent = path.parent().unwrap_or(target).to_path_buf();
        let before = std::fs::symlink_metadata(&parent).map_err(io_err("failed to stat", &parent))?;
        let made = if *is_dir {
            std::fs::create_dir(&path)
        } else {
            std::fs::File::create(&path).map(drop)
        };
        made.map_err(io_err("failed to create", &path))?;
        // The stub is no change of its directory: the directory keeps the layer's times.
        super::set_times(&parent, &before).map_err(io_err("failed to set the times of", &parent))?;
    }
    // Stamps are taken after the stubs so that their parent dirs' new change times count too.
    let mut max_ctime = (0, 0);
    let mut refresh = |rel: &Path, lower: bool, stamps: &mut HashMap<PathBuf, Stamp>| {
        let path = target.join(rel);
        if let Ok(md) = std::fs::symlink_metadata(&path) {
            let s = stamp(&md, lower);
            max_ctime = max_ctime.max(s.ctime);
            stamps.insert(rel.to_path_buf(), s);
        }
    };
    let known: Vec<(PathBuf, bool)> = view.stamps.iter().map(|(p, s)| (p.clone(), s.lower)).collect();
    for (rel, lower) in known {
        refresh(&rel, lower, &mut view.stamps);
    }
    refresh(Path::new(""), false, &mut view.stamps);
    for (rel, _) in stubs {
        if !view.stamps.contains_key(rel) {
            refresh(rel, false, &mut view.stamps);
        }
    }
    // A change in the same tick of the coarse clock would keep the change time: wait it out.
    loop {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME_COARSE)
            .map_err(|e| io_err("failed to read the coarse clock for", target)(e.into()))?;
        let now = (t.tv_sec(), t.tv_nsec());
        if now > max_ctime {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(view)
}

impl NativeView {
    /// Copies the merged directory `rel` of `layers` (those holding it, top first) into `out`.
    fn merge(&mut self, layers: &[&Path], rel: &Path, out: &Path) -> Result<(), SnapshotterError> {
        // name -> index of the top layer holding it (None: whited out).
        let mut seen: HashMap<OsString, Option<usize>> = HashMap::new();
        let mut order: Vec<OsString> = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            let dir = layer.join(rel);
            match std::fs::symlink_metadata(&dir) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => break,
                Err(_) => continue,
            }
            let entries = std::fs::read_dir(&dir).map_err(io_err("failed to read", &dir))?;
            for entry in entries {
                let entry = entry.map_err(io_err("failed to read", &dir))?;
                let name = entry.file_name();
                if seen.contains_key(&name) {
                    continue;
                }
                let md = std::fs::symlink_metadata(entry.path())
                    .map_err(io_err("failed to stat", &entry.path()))?;
                if is_whiteout(&md) {
                    seen.insert(name, None);
                } else {
                    seen.insert(name.clone(), Some(i));
                    order.push(name);
                }
            }
            if is_opaque(&dir) {
                break;
            }
        }
        let mut names = Vec::with_capacity(order.len());
        for name in order {
            let Some(Some(i)) = seen.get(&name).copied() else {
                continue;
            };
            let child_rel = rel.join(&name);
            let src = layers[i].join(&child_rel);
            let dst = out.join(&name);
            let md = std::fs::symlink_metadata(&src).map_err(io_err("failed to stat", &src))?;
            if md.is_dir() {
                std::fs::create_dir(&dst).map_err(io_err("failed to create", &dst))?;
                self.merge(&layers[i..], &child_rel, &dst)?;
                copy_meta(&src, &dst, true).map_err(io_err("failed to copy the attributes of", &src))?;
            } else {
                copy_entry(&src, &dst, &md).map_err(io_err("failed to copy", &src))?;
            }
            self.stamps.insert(
                child_rel,
                Stamp {
                    ino: 0,
                    born: (0, 0),
                    ctime: (0, 0),
                    lower: true,
                    dir: md.is_dir(),
                },
            );
            names.push(name);
        }
        self.children.insert(rel.to_path_buf(), names);
        Ok(())
    }

    /// Moves the view's changes into the upper dir (a writable view) and removes the copy.
    pub(crate) fn release(self, target: &Path) -> Result<(), SnapshotterError> {
        let result = match &self.upper {
            Some(upper) => self.diff(target, upper, Path::new("")).map(drop),
            None => Ok(()),
        };
        let cleared = clear(target).map_err(io_err("failed to remove the copy in", target));
        result.and(cleared)
    }

    /// Moves the changes under `rel` into `upper`; whether anything under it changed.
    fn diff(&self, view: &Path, upper: &Path, rel: &Path) -> Result<bool, SnapshotterError> {
        let dir = view.join(rel);
        let out = upper.join(rel);
        let mut changed = false;
        let mut present: HashSet<OsString> = HashSet::new();
        let entries = std::fs::read_dir(&dir).map_err(io_err("failed to read", &dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("failed to read", &dir))?;
            let name = entry.file_name();
            let child_rel = rel.join(&name);
            let path = entry.path();
            let md = std::fs::symlink_metadata(&path).map_err(io_err("failed to stat", &path))?;
            present.insert(name.clone());
            let was = self.stamps.get(&child_rel);
            let same_inode =
                was.is_some_and(|s| s.ino == md.ino() && s.dir == md.is_dir() && s.born == born(&md));
            if md.is_dir() && same_inode {
                let dst = out.join(&name);
                let made = !dst.exists();
                if made {
                    std::fs::create_dir(&dst).map_err(io_err("failed to create", &dst))?;
                }
                let inner = self.diff(view, upper, &child_rel)?;
                let touched = was.is_some_and(|s| s.ctime != (md.ctime(), md.ctime_nsec()));
                if inner || touched {
                    copy_meta(&path, &dst, true)
                        .map_err(io_err("failed to copy the attributes of", &path))?;
                    // The times the step left, not those of moving its changes out.
                    super::set_times(&dst, &md).map_err(io_err("failed to set the times of", &dst))?;
                    changed = true;
                } else if made {
                    std::fs::remove_dir(&dst).map_err(io_err("failed to remove", &dst))?;
                }
                continue;
            }
            if same_inode && was.is_some_and(|s| s.ctime == (md.ctime(), md.ctime_nsec())) {
                continue;
            }
            // New, replaced or changed: the entry itself goes up (a directory with all it holds).
            let dst = out.join(&name);
            if std::fs::symlink_metadata(&dst).is_ok() {
                remove_any(&dst).map_err(io_err("failed to remove", &dst))?;
            }
            move_entry(&path, &dst).map_err(io_err("failed to move", &path))?;
            if md.is_dir() && was.is_some_and(|s| s.lower) {
                xattr::set(&dst, super::opaque_xattr(), b"y").map_err(|source| SnapshotterError::Io {
                    what: "failed to mark opaque",
                    path: dst.clone(),
                    source,
                })?;
            }
            changed = true;
        }
        for name in self.children.get(rel).into_iter().flatten() {
            if present.contains(name) {
                continue;
            }
            let wh = out.join(name);
            mknodat(AT_FDCWD, &wh, SFlag::S_IFCHR, Mode::empty(), 0).map_err(|e| SnapshotterError::Io {
                what: "failed to make a whiteout",
                path: wh.clone(),
                source: e.into(),
            })?;
            changed = true;
        }
        Ok(changed)
    }
}

/// Removes everything in `dir` (not `dir`).
fn clear(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        remove_any(&entry?.path())?;
    }
    Ok(())
}

fn remove_any(path: &Path) -> io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Renames `src` to `dst`, or copies it where they are on different filesystems.
fn move_entry(src: &Path, dst: &Path) -> io::Result<()> {
    match std::fs::rename(src, dst) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let md = std::fs::symlink_metadata(src)?;
            if md.is_dir() {
                std::fs::create_dir(dst)?;
                for entry in std::fs::read_dir(src)? {
                    let entry = entry?;
                    move_entry(&entry.path(), &dst.join(entry.file_name()))?;
                }
                copy_meta(src, dst, true)
            } else {
                copy_entry(src, dst, &md)
            }
        }
        other => other,
    }
}

/// Copies a non-directory entry with its owner, mode, attributes and times.
fn copy_entry(src: &Path, dst: &Path, md: &std::fs::Metadata) -> io::Result<()> {
    let ft = md.file_type();
    if ft.is_file() {
        let from = std::fs::File::open(src)?;
        let to = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dst)?;
        if md.len() > 0 && crate::sys::ficlone(to.as_fd(), from.as_fd()).is_err() {
            let mut from = from;
            let mut to = &to;
            io::copy(&mut from, &mut to)?;
        }
        drop(to);
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)?;
    } else {
        let kind = if ft.is_char_device() {
            SFlag::S_IFCHR
        } else if ft.is_block_device() {
            SFlag::S_IFBLK
        } else if ft.is_fifo() {
            SFlag::S_IFIFO
        } else {
            SFlag::S_IFSOCK
        };
        mknodat(
            AT_FDCWD,
            dst,
            kind,
            Mode::from_bits_truncate(md.mode() & 0o7777),
            md.rdev(),
        )?;
    }
    copy_meta(src, dst, false)
}

use std::os::unix::fs::OpenOptionsExt as _;

/// Copies owner, mode, extended attributes (not overlayfs' own) and times from `src` to `dst`.
fn copy_meta(src: &Path, dst: &Path, dir: bool) -> io::Result<()> {
    let md = std::fs::symlink_metadata(src)?;
    std::os::unix::fs::lchown(dst, Some(md.uid()), Some(md.gid()))?;
    let symlink = md.file_type().is_symlink();
    for name in super::fuse::list_xattrs(src) {
        let b = name.as_bytes();
        if b.starts_with(b"trusted.overlay.") || b.starts_with(b"user.overlay.") {
            continue;
        }
        let v = super::fuse::get_xattr(src, name.as_os_str())?;
        xattr::set(dst, &name, &v)?;
    }
    if !symlink {
        // After the chown, which clears set-id bits.
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(md.mode() & 0o7777))?;
    }
    let _ = dir;
    super::set_times(dst, &md)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What coreutils' `stat` reads with `statx` as the birth time, as (seconds, nanoseconds).
    fn stat_birth(path: &Path) -> (i64, u32) {
        let out = std::process::Command::new("stat")
            .args(["-c", "%.9W"])
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("stat: {e}"));
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let (secs, nanos) = s.split_once('.').unwrap_or((&s, "0"));
        (
            secs.parse().unwrap_or_else(|e| panic!("{s}: {e}")),
            nanos.parse().unwrap_or_else(|e| panic!("{s}: {e}")),
        )
    }

    /// `FICLONE` either shares the data (XFS, btrfs) or fails with what a filesystem without
    /// reflinks says (ext4, tmpfs), never with ENOTTY (a wrong request number).
    #[test]
    fn ficlone_clones_or_says_the_filesystem_cannot() {
        use std::os::fd::AsFd as _;
        let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let data = "0123456789abcdef".repeat(1024);
        std::fs::write(t.path().join("src"), &data).unwrap_or_else(|e| panic!("{e}"));
        let src = std::fs::File::open(t.path().join("src")).unwrap_or_else(|e| panic!("{e}"));
        let dst = std::fs::File::create(t.path().join("dst")).unwrap_or_else(|e| panic!("{e}"));
        match crate::sys::ficlone(dst.as_fd(), src.as_fd()) {
            Ok(()) => {
                let got = std::fs::read_to_string(t.path().join("dst")).unwrap_or_else(|e| panic!("{e}"));
                assert!(got == data, "the clone has other data");
            }
            Err(e) => {
                eprintln!("no reflinks in {}: {e}", t.path().display());
                assert!(
                    matches!(
                        e,
                        nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EXDEV | nix::errno::Errno::EINVAL
                    ),
                    "{e}"
                )
            }
        }
    }

    #[test]
    fn born_is_the_statx_birth_time_or_zero_without_one() {
        let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = t.path().join("f");
        std::fs::write(&f, "x").unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink("f", t.path().join("l")).unwrap_or_else(|e| panic!("{e}"));
        // procfs keeps no birth time: `stat` shows 0 and so must `born`.
        for p in [f, t.path().join("l"), PathBuf::from("/proc/self")] {
            let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(born(&md), stat_birth(&p), "{}", p.display());
        }
    }
}
