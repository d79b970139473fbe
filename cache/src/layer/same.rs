//! Deciding that two trees give the same layer tar without reading file contents.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use rayon::prelude::*;
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, Stat};

use super::fsutil::dir_flags;

/// Whether the trees `a` and `b` would be written as the same layer tar, decided from metadata
/// alone: the same names, and for each the same type, mode, owner, mtime (to the nanosecond),
/// symlink target, device number and extended attributes (those the tar records), with every
/// regular file being the very same inode in both trees (a shared inode has one content). The
/// roots' own attributes are compared, not their times or modes (a tar has no entry for its
/// root). Everything is read relative to directory descriptors, never through a symlink.
///
/// Anything else (a regular file that is a different inode, an unreadable entry) is `false`:
/// the caller writes the tar and compares digests instead.
pub fn same_tree(a: &Path, b: &Path) -> bool {
    same_tree_assuming(a, b, &|_| false)
}

/// [`same_tree`], counting a regular file of `b` that `a` lacks as present in `a` (the very
/// same inode) when `linked` says so of its path relative to the roots (`dir/name` bytes): for a
/// tree whose links to `b`'s files are not made yet.
pub fn same_tree_assuming(a: &Path, b: &Path, linked: &(dyn Fn(&[u8]) -> bool + Sync)) -> bool {
    let open = |p: &Path| rfs::open(p, dir_flags(), Mode::empty());
    let same = open(a)
        .and_then(|fa| Ok((fa, open(b)?)))
        .map_err(io::Error::from)
        .and_then(|(fa, fb)| {
            if dir_xattrs(fa.as_fd())? != dir_xattrs(fb.as_fd())? {
                tracing::debug!(a = %a.display(), b = %b.display(), "roots' attributes differ");
                return Ok(false);
            }
            same_children(fa, fb, a, Vec::new(), linked)
        });
    match same {
        Ok(same) => same,
        Err(e) => {
            tracing::debug!(a = %a.display(), b = %b.display(), error = %e, "trees not compared");
            false
        }
    }
}

/// The names in `dir`, sorted, with the type the listing reports (`Unknown` where the
/// filesystem does not say).
fn names(dir: BorrowedFd<'_>) -> io::Result<Vec<(CString, FileType)>> {
    let mut out = Vec::new();
    let mut reader = rfs::Dir::read_from(dir)?;
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = entry.file_name().to_owned();
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            out.push((name, entry.file_type()));
        }
    }
    out.sort_unstable_by(|x, y| x.0.cmp(&y.0));
    Ok(out)
}

/// Compares the children of the directories `a` and `b` (`path`: `a`'s path, for the log;
/// `rel`: their path below the roots, empty or ending in `/`).
fn same_children(
    a: OwnedFd,
    b: OwnedFd,
    path: &Path,
    rel: Vec<u8>,
    linked: &(dyn Fn(&[u8]) -> bool + Sync),
) -> io::Result<bool> {
    let names_a = names(a.as_fd())?;
    let names_b = names(b.as_fd())?;
    let mut shared = Vec::with_capacity(names_b.len());
    let mut ia = names_a.iter().map(|(n, _)| n).peekable();
    for (name, kind) in &names_b {
        if ia.next_if(|n| *n < name).is_some() {
            tracing::debug!(dir = %path.display(), "directories list different names");
            return Ok(false);
        }
        if ia.next_if(|n| *n == name).is_some() {
            shared.push(name);
            continue;
        }
        let full = [&rel[..], name.as_bytes()].concat();
        let kind = match kind {
            FileType::Unknown => {
                FileType::from_raw_mode(rfs::statat(&b, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?.st_mode)
            }
            known => *known,
        };
        if !(kind == FileType::RegularFile && linked(&full)) {
            tracing::debug!(dir = %path.display(), name = ?name, "directories list different names");
            return Ok(false);
        }
    }
    if ia.next().is_some() {
        tracing::debug!(dir = %path.display(), "directories list different names");
        return Ok(false);
    }
    let mut subdirs = Vec::new();
    for name in shared {
        let sa = rfs::statat(&a, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        let sb = rfs::statat(&b, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        if !same_entry(a.as_fd(), b.as_fd(), name, &sa, &sb)? {
            tracing::debug!(dir = %path.display(), name = ?name, "trees differ");
            return Ok(false);
        }
        if FileType::from_raw_mode(sa.st_mode) == FileType::Directory {
            let da = rfs::openat(&a, name.as_c_str(), dir_flags(), Mode::empty())?;
            let db = rfs::openat(&b, name.as_c_str(), dir_flags(), Mode::empty())?;
            if dir_xattrs(da.as_fd())? != dir_xattrs(db.as_fd())? {
                tracing::debug!(dir = %path.display(), name = ?name, "directory attributes differ");
                return Ok(false);
            }
            subdirs.push((da, db, name));
        }
    }
    subdirs
        .into_par_iter()
        .map(|(da, db, name)| {
            let sub = [&rel[..], name.as_bytes(), b"/"].concat();
            let at = path.join(std::ffi::OsStr::from_bytes(name.as_bytes()));
            same_children(da, db, &at, sub, linked)
        })
        .try_fold(|| true, |acc, r| r.map(|same| acc && same))
        .try_reduce(|| true, |x, y| Ok(x && y))
}

fn same_entry(a: BorrowedFd<'_>, b: BorrowedFd<'_>, name: &CStr, sa: &Stat, sb: &Stat) -> io::Result<bool> {
    let same_meta = sa.st_mode == sb.st_mode
        && sa.st_uid == sb.st_uid
        && sa.st_gid == sb.st_gid
        && sa.st_mtime == sb.st_mtime
        && sa.st_mtime_nsec == sb.st_mtime_nsec;
    if !same_meta {
        return Ok(false);
    }
    match FileType::from_raw_mode(sa.st_mode) {
        // One inode: one content and one set of attributes.
        FileType::RegularFile => Ok(sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino),
        // Compared (attributes included) when the walk opens it.
        FileType::Directory => Ok(true),
        FileType::Symlink => Ok(rfs::readlinkat(a, name, Vec::new())?
            == rfs::readlinkat(b, name, Vec::new())?
            && entry_xattrs(a, name)? == entry_xattrs(b, name)?),
        _ => Ok(sa.st_rdev == sb.st_rdev && entry_xattrs(a, name)? == entry_xattrs(b, name)?),
    }
}

type Xattrs = BTreeMap<Vec<u8>, Vec<u8>>;

/// Whether a layer tar records the attribute `name`: overlayfs' bookkeeping (`uuid`, `origin`,
/// `impure`...) it does not; `opaque` it does (as a marker entry); `metacopy` and `redirect`
/// are kept so that trees the writer refuses are never called the same.
fn recorded(name: &[u8]) -> bool {
    super::overlay_xattr_key(name).is_none_or(|k| matches!(k, b"opaque" | b"metacopy" | b"redirect"))
}

/// The recorded attributes of an open directory.
fn dir_xattrs(fd: BorrowedFd<'_>) -> io::Result<Xattrs> {
    entry_xattrs(fd, c".")
}

/// The recorded attributes of `name` in the directory `dir` (`.`: the directory itself), read
/// through the descriptor's `/proc` link: the `l*xattr` calls do not follow the last
/// component, and there is no `*xattrat` call for a symlink on every kernel.
fn entry_xattrs(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Xattrs> {
    use std::os::fd::AsRawFd;
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.to_bytes());
    let path = std::path::PathBuf::from(std::ffi::OsString::from_vec(path));
    let mut out = BTreeMap::new();
    let need = match rfs::llistxattr_query(&path) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    if need == 0 {
        return Ok(out);
    }
    let mut list = vec![0u8; need];
    let len = rfs::llistxattr(&path, &mut list[..])?;
    for name in list[..len]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty() && recorded(n))
    {
        let name_c = CString::new(name).map_err(io::Error::other)?;
        let mut value = vec![0u8; rfs::lgetxattr_query(&path, name_c.as_c_str())?];
        let n = rfs::lgetxattr(&path, name_c.as_c_str(), &mut value[..])?;
        value.truncate(n);
        out.insert(name.to_vec(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn write_diff_id(dir: &Path) -> kiln_dag::Digest {
        super::super::write_diff(dir, std::io::sink(), &Default::default())
            .unwrap()
            .diff_id
    }

    /// `b` built as `a` is, its files linked from `a`'s.
    fn pair() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        for root in [&a, &b] {
            fs::create_dir_all(root.join("d/e")).unwrap();
            std::os::unix::fs::symlink("../x", root.join("d/l")).unwrap();
        }
        fs::write(a.join("d/f"), b"data").unwrap();
        fs::write(a.join("d/e/g"), b"more").unwrap();
        fs::hard_link(a.join("d/f"), b.join("d/f")).unwrap();
        fs::hard_link(a.join("d/e/g"), b.join("d/e/g")).unwrap();
        let t0 =
            fs::FileTimes::new().set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000));
        for root in [&a, &b] {
            for d in ["d/e", "d"] {
                fs::File::open(root.join(d)).unwrap().set_times(t0).unwrap();
            }
            // The symlinks' own times too: made a moment apart, they can straddle a tick of the
            // coarse clock file times come from.
            let ts = rustix::fs::Timespec {
                tv_sec: 1000,
                tv_nsec: 0,
            };
            let times = rustix::fs::Timestamps {
                last_access: ts,
                last_modification: ts,
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                root.join("d/l"),
                &times,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .unwrap();
        }
        (t, a, b)
    }

    #[test]
    fn linked_equal_trees_are_the_same_and_write_the_same_tar() {
        let (_t, a, b) = pair();
        assert!(same_tree(&a, &b));
        assert_eq!(write_diff_id(&a), write_diff_id(&b));
        // Overlayfs' own bookkeeping is not in the tar (needs root: trusted.* attributes).
        if rustix::fs::setxattr(&b, "trusted.overlay.uuid", b"x", rustix::fs::XattrFlags::empty()).is_ok() {
            rustix::fs::setxattr(
                b.join("d"),
                "trusted.overlay.impure",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .unwrap();
            assert!(same_tree(&a, &b));
            assert_eq!(write_diff_id(&a), write_diff_id(&b));
            rustix::fs::setxattr(
                b.join("d"),
                "trusted.overlay.opaque",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .unwrap();
            assert!(!same_tree(&a, &b), "an opaque marker is in the tar");
        }
    }

    #[test]
    fn files_to_be_linked_count_as_present() {
        let (_t, a, b) = pair();
        let t0 =
            fs::FileTimes::new().set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000));
        fs::remove_file(a.join("d/f")).unwrap();
        fs::remove_file(a.join("d/e/g")).unwrap();
        for d in ["d/e", "d"] {
            fs::File::open(a.join(d)).unwrap().set_times(t0).unwrap();
        }
        assert!(!same_tree(&a, &b));
        let both = |rel: &[u8]| rel == b"d/f" || rel == b"d/e/g";
        assert!(same_tree_assuming(&a, &b, &both));
        assert!(
            !same_tree_assuming(&a, &b, &|rel| rel == b"d/f"),
            "d/e/g is missing"
        );
        // Only a regular file can be linked: a missing directory or symlink is a difference.
        fs::remove_file(a.join("d/l")).unwrap();
        fs::File::open(a.join("d")).unwrap().set_times(t0).unwrap();
        assert!(!same_tree_assuming(&a, &b, &|rel| both(rel) || rel == b"d/l"));
    }

    #[test]
    fn any_difference_is_seen() {
        type Change = fn(&Path);
        let changes: [(&str, Change); 7] = [
            ("copied, not linked", |b| {
                fs::remove_file(b.join("d/f")).unwrap();
                fs::write(b.join("d/f"), b"data").unwrap();
            }),
            ("extra file", |b| fs::write(b.join("d/new"), b"").unwrap()),
            ("dir mode", |b| {
                fs::set_permissions(b.join("d/e"), fs::Permissions::from_mode(0o700)).unwrap()
            }),
            ("dir mtime", |b| {
                fs::File::open(b.join("d"))
                    .unwrap()
                    .set_times(fs::FileTimes::new().set_modified(std::time::SystemTime::now()))
                    .unwrap()
            }),
            ("symlink target", |b| {
                fs::remove_file(b.join("d/l")).unwrap();
                std::os::unix::fs::symlink("../y", b.join("d/l")).unwrap();
            }),
            ("dir xattr", |b| {
                rustix::fs::setxattr(b.join("d/e"), "user.k", b"v", rustix::fs::XattrFlags::empty()).unwrap()
            }),
            ("missing dir", |b| fs::remove_dir_all(b.join("d/e")).unwrap()),
        ];
        for (what, change) in changes {
            let (_t, a, b) = pair();
            change(&b);
            // Restore the parent times the change moved, so only the change itself differs.
            if what != "dir mtime" {
                let t0 = fs::FileTimes::new()
                    .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000));
                for d in ["d/e", "d"] {
                    if let Ok(f) = fs::File::open(b.join(d)) {
                        f.set_times(t0).unwrap();
                    }
                }
            }
            if what == "copied, not linked" {
                // Same tar, but that cannot be known without reading: not claimed.
                assert_eq!(write_diff_id(&a), write_diff_id(&b));
            } else {
                assert_ne!(write_diff_id(&a), write_diff_id(&b), "{what}");
            }
            assert!(!same_tree(&a, &b), "{what}");
        }
    }
}
