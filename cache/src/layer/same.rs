//! Deciding that two trees give the same layer tar without reading file contents.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rayon::prelude::*;

/// Whether the trees `a` and `b` would be written as the same layer tar, decided from metadata
/// alone: the same names, and for each the same type, mode, owner, mtime (to the nanosecond),
/// size, symlink target, device number and extended attributes (those the tar records), with every regular file being
/// the very same inode in both trees (a shared inode has one content). The roots' own
/// attributes are compared, not their times or modes (a tar has no entry for its root).
///
/// Anything else (a regular file that is a different inode, an unreadable entry) is `false`:
/// the caller writes the tar and compares digests instead.
pub fn same_tree(a: &Path, b: &Path) -> bool {
    let same = xattrs(a)
        .and_then(|x| Ok(x == xattrs(b)?))
        .and_then(|same| match same {
            true => same_children(a, b),
            false => {
                tracing::debug!(a = %a.display(), b = %b.display(), "roots' attributes differ");
                Ok(false)
            }
        });
    match same {
        Ok(same) => same,
        Err(e) => {
            tracing::debug!(a = %a.display(), b = %b.display(), error = %e, "trees not compared");
            false
        }
    }
}

fn names(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut v = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()?;
    v.sort_unstable();
    Ok(v)
}

fn same_children(a: &Path, b: &Path) -> io::Result<bool> {
    let names_a = names(a)?;
    if names_a != names(b)? {
        tracing::debug!(a = %a.display(), b = %b.display(), "directories list different names");
        return Ok(false);
    }
    let mut subdirs = Vec::new();
    for name in &names_a {
        let (pa, pb) = (a.join(name), b.join(name));
        let (ma, mb) = (fs::symlink_metadata(&pa)?, fs::symlink_metadata(&pb)?);
        if !same_entry(&pa, &ma, &pb, &mb)? {
            tracing::debug!(a = %pa.display(), b = %pb.display(), "trees differ");
            return Ok(false);
        }
        if ma.is_dir() {
            subdirs.push((pa, pb));
        }
    }
    subdirs
        .par_iter()
        .map(|(pa, pb)| same_children(pa, pb))
        .try_fold(|| true, |acc, r| r.map(|same| acc && same))
        .try_reduce(|| true, |x, y| Ok(x && y))
}

fn same_entry(pa: &Path, a: &Metadata, pb: &Path, b: &Metadata) -> io::Result<bool> {
    let same_meta = a.mode() == b.mode()
        && a.uid() == b.uid()
        && a.gid() == b.gid()
        && a.mtime() == b.mtime()
        && a.mtime_nsec() == b.mtime_nsec();
    if !same_meta {
        return Ok(false);
    }
    let ft = a.file_type();
    if ft.is_file() {
        // One inode: one content and one set of attributes.
        return Ok(a.dev() == b.dev() && a.ino() == b.ino());
    }
    if ft.is_symlink() && fs::read_link(pa)? != fs::read_link(pb)? {
        return Ok(false);
    }
    if !ft.is_dir() && !ft.is_symlink() && a.rdev() != b.rdev() {
        return Ok(false);
    }
    Ok(xattrs(pa)? == xattrs(pb)?)
}

/// Every extended attribute of `path` (not following a symlink), by name.
fn xattrs(path: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let need = match rustix::fs::llistxattr_query(path) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    if need == 0 {
        return Ok(out);
    }
    let mut list = vec![0u8; need];
    let len = rustix::fs::llistxattr(path, &mut list[..])?;
    for name in list[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        // Overlayfs' bookkeeping (`uuid`, `origin`, `impure`...) is not in a layer tar; only
        // `opaque` is (as a marker entry). `metacopy` and `redirect` are kept so that trees
        // the writer refuses are never called the same.
        let overlay = name
            .strip_prefix(b"trusted.overlay.")
            .or_else(|| name.strip_prefix(b"user.overlay."));
        if overlay.is_some_and(|k| !matches!(k, b"opaque" | b"metacopy" | b"redirect")) {
            continue;
        }
        let name_c = std::ffi::CString::new(name).map_err(io::Error::other)?;
        let size = rustix::fs::lgetxattr_query(path, name_c.as_c_str())?;
        let mut value = vec![0u8; size];
        let n = rustix::fs::lgetxattr(path, name_c.as_c_str(), &mut value[..])?;
        value.truncate(n);
        out.insert(name.to_vec(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
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
        }
        (t, a, b)
    }

    #[test]
    fn linked_equal_trees_are_the_same_and_write_the_same_tar() {
        let (_t, a, b) = pair();
        assert!(same_tree(&a, &b));
        assert_eq!(write_diff_id(&a), write_diff_id(&b));
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
