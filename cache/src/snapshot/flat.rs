//! Flattened views: one directory holding what an overlay of a stack of committed snapshots
//! shows, used as a single lower dir in place of the stack.
//!
//! A build step over `n` layers mounts `n` lower dirs: the kernel checks each one when it mounts
//! the overlay and every lookup inside walks them, so a long chain of RUN steps costs more per
//! step the longer it gets (and past 500 lower dirs it cannot be mounted at all). A flattened
//! view of the bottom layers bounds that: the step mounts its top layers and one directory that
//! holds the union of the layers below them.
//!
//! Layout under the snapshots dir `DIR`:
//!
//! | path | what |
//! |---|---|
//! | `DIR/flat/<hex>/fs` | the union of the covered snapshots' trees, in plain form (no whiteouts or opaque markers: nothing lies below it) |
//! | `DIR/flat/<hex>/meta.json` | `{"covers": [snapshot keys, bottom first], "boot": boot ID}` |
//!
//! `<hex>` hashes the covered keys in order. A view is made in a locked `DIR/tmp` entry and
//! published by one `rename(2)`, so a killed maker leaves a temp that the next command removes
//! and two makers racing keep one copy. Regular files, symlinks and devices are hard links of
//! the snapshots' own inodes (a committed snapshot is never written and overlayfs copies a lower
//! file up before changing it, so sharing them is safe); directories are made with the owner,
//! mode, times and extended attributes of the topmost layer's directory, as overlayfs shows a
//! merged directory. A file shown through a view therefore has a link count higher than it would
//! through the stack (and its change time is the time of the link); nothing else differs.
//!
//! A view is never synced: it is valid only in the boot that made it. GC ([`Snapshots::sweep_flats`])
//! removes every view that covers a snapshot that is gone (or that another boot made). A view is
//! never a layer: it is not diffed, tarred or listed as a snapshot, only mounted.

use std::ffi::{CStr, CString};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use kiln_dag::Digest;
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{boot_id, remove, target_taken, unique_name, Result, SnapshotError, Snapshots};
use crate::layer::{self, fsutil};

/// The default number of layers a mount stacks before the ones below are flattened.
pub const DEFAULT_FLATTEN_AFTER: usize = 32;

/// `KILN_FLATTEN_AFTER`: how many layers a build step's overlay may stack before the layers below
/// the last multiple of that number are replaced by one flattened view (unset or empty: the
/// default, [`DEFAULT_FLATTEN_AFTER`]; at least 2).
pub fn flatten_after_from_env() -> std::result::Result<usize, String> {
    match std::env::var("KILN_FLATTEN_AFTER") {
        Err(_) => Ok(DEFAULT_FLATTEN_AFTER),
        Ok(v) if v.trim().is_empty() => Ok(DEFAULT_FLATTEN_AFTER),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 2 => Ok(n),
            _ => Err(format!(
                "KILN_FLATTEN_AFTER: `{v}` is not a number of layers of at least 2"
            )),
        },
    }
}

#[derive(Serialize, Deserialize)]
struct FlatMeta {
    covers: Vec<Digest>,
    boot: Option<String>,
}

/// The key of the view covering `keys` (bottom first).
fn flat_key(keys: &[Digest]) -> String {
    let mut h = Sha256::new();
    h.update(b"kiln flattened view v1\n");
    for k in keys {
        h.update(k.hex().as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(path: &Path, source: io::Error) -> SnapshotError {
    SnapshotError::Flatten {
        path: path.to_path_buf(),
        source,
    }
}

impl Snapshots {
    fn flat_dir(&self) -> PathBuf {
        self.dir.join("flat")
    }

    /// The flattened view of the committed snapshots `keys` (bottom first): a directory whose
    /// tree is what an overlay of them shows. Made (with hard links) if it does not exist yet;
    /// when `keys` is longer than `step`, it is made from the view of all but the top `step`
    /// keys, which is made first the same way, so a chain's views are made once each.
    pub fn flattened(&self, keys: &[Digest], step: usize) -> Result<PathBuf> {
        let hex = flat_key(keys);
        let dir = self.flat_dir().join(&hex);
        if self.flat_valid(&dir) {
            return Ok(dir.join("fs"));
        }
        let step = step.max(1);
        let (base, layers) = if keys.len() > step {
            let cut = keys.len() - step;
            (Some(self.flattened(&keys[..cut], step)?), &keys[cut..])
        } else {
            (None, keys)
        };
        let mut sources = Vec::with_capacity(layers.len() + 1);
        if let Some(b) = base {
            sources.push(b);
        }
        for k in layers {
            // A snapshot stacked on another is its own tree over that one's: bottom first too.
            sources.extend(self.lower_dirs(k)?.into_iter().rev());
        }
        super::create_dir(&self.flat_dir())?;
        let (tmp, lock) = self.new_temp()?;
        let made = self.make_flat(&tmp, &sources, keys);
        let result = made.and_then(|()| {
            #[allow(clippy::disallowed_methods, reason = "a directory published whole")]
            match fs::rename(&tmp, &dir) {
                Ok(()) => Ok(()),
                Err(e) if target_taken(&e) && self.flat_valid(&dir) => Ok(()),
                Err(source) => Err(SnapshotError::Rename {
                    from: tmp.clone(),
                    to: dir.clone(),
                    source,
                }),
            }
        });
        if tmp.exists() {
            if let Err(e) = remove(&tmp) {
                tracing::warn!(error = %e, "failed to remove a flattened view's temp");
            }
        }
        drop(lock);
        result.map(|()| dir.join("fs"))
    }

    /// The flattened view of `keys` if it was made already (and is valid in this boot).
    pub fn flat_if_present(&self, keys: &[Digest]) -> Option<PathBuf> {
        let dir = self.flat_dir().join(flat_key(keys));
        self.flat_valid(&dir).then(|| dir.join("fs"))
    }

    fn flat_valid(&self, dir: &Path) -> bool {
        let Some(meta) = fs::read(dir.join("meta.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<FlatMeta>(&b).ok())
        else {
            return false;
        };
        // Without a boot ID (no procfs) views are valid until GC, as unsynced snapshots are.
        meta.boot.as_deref() == boot_id()
    }

    fn make_flat(&self, tmp: &Path, sources: &[PathBuf], keys: &[Digest]) -> Result<()> {
        let fs_dir = tmp.join("fs");
        fs::create_dir(&fs_dir).map_err(|e| io_err(&fs_dir, e))?;
        let dst = open_dir(&fs_dir)?;
        let private = private_prefix();
        for src in sources {
            let src_fd = open_dir(src)?;
            let mut m = Merger {
                private,
                opaque: layer::opaque_xattr(),
                root: src,
            };
            m.merge(src_fd.as_fd(), dst.as_fd(), Path::new(""))?;
            let st = rfs::fstat(&src_fd).map_err(|e| io_err(src, e.into()))?;
            copy_meta(src_fd.as_fd(), dst.as_fd(), &st, private, false).map_err(|e| io_err(src, e))?;
        }
        let meta = FlatMeta {
            covers: keys.to_vec(),
            boot: boot_id().map(str::to_string),
        };
        let path = tmp.join("meta.json");
        let bytes = serde_json::to_vec(&meta).map_err(|e| io_err(&path, e.into()))?;
        #[allow(
            clippy::disallowed_methods,
            reason = "meta.json of a temp dir that is published whole by a directory rename"
        )]
        fs::write(&path, bytes).map_err(|e| io_err(&path, e))?;
        Ok(())
    }

    /// Removes the flattened views that cover a snapshot that no longer exists (or is not valid
    /// in this boot), that another boot made, or that are unreadable. The caller holds the GC
    /// lock (no build is using one). Returns how many views were removed and their bytes.
    pub fn sweep_flats(&self) -> Result<(usize, u64)> {
        let Ok(read_dir) = fs::read_dir(self.flat_dir()) else {
            return Ok((0, 0));
        };
        let (mut n, mut bytes) = (0, 0);
        for entry in read_dir.flatten() {
            let path = entry.path();
            let meta = fs::read(path.join("meta.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<FlatMeta>(&b).ok());
            let keep = meta.is_some_and(|m| {
                m.boot.as_deref() == boot_id() && m.covers.iter().all(|k| self.get(k).is_some())
            });
            if keep {
                continue;
            }
            let doomed = self.tmp().join(format!(".rm-{}", unique_name()));
            #[allow(clippy::disallowed_methods, reason = "a view claimed for removal")]
            match fs::rename(&path, &doomed) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(SnapshotError::Rename {
                        from: path,
                        to: doomed,
                        source,
                    })
                }
            }
            bytes += crate::temp::disk_usage(&doomed);
            remove(&doomed)?;
            n += 1;
        }
        Ok((n, bytes))
    }

    /// The flattened views present (their `DIR/flat/<hex>` dirs), for tests and accounting.
    pub fn flat_views(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = fs::read_dir(self.flat_dir())
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        out.sort();
        out
    }
}

/// The prefix of overlayfs' own extended attributes as mounts made by this process read them
/// (`trusted.overlay.`, or `user.overlay.` with `userxattr` in a user namespace): they describe
/// a layer to the overlay and are not the directory's attributes.
fn private_prefix() -> &'static str {
    layer::opaque_xattr()
        .strip_suffix("opaque")
        .unwrap_or("trusted.overlay.")
}

fn open_dir(path: &Path) -> Result<OwnedFd> {
    rfs::open(path, fsutil::dir_flags(), Mode::empty()).map_err(|e| io_err(path, e.into()))
}

struct Merger<'a> {
    private: &'static str,
    opaque: &'static str,
    root: &'a Path,
}

impl Merger<'_> {
    fn err(&self, rel: &Path, e: impl Into<io::Error>) -> SnapshotError {
        io_err(&self.root.join(rel), e.into())
    }

    /// Applies the directory `src` (of a layer, or a view below) onto `dst` as overlayfs stacks
    /// it over what `dst` holds: whiteouts remove, an opaque directory hides what was below, a
    /// non-directory replaces, directories merge and take the upper one's attributes.
    fn merge(&mut self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>, rel: &Path) -> Result<()> {
        let mut names: Vec<(CString, FileType)> = Vec::new();
        let mut reader = rfs::Dir::read_from(src).map_err(|e| self.err(rel, e))?;
        while let Some(entry) = reader.read() {
            let entry = entry.map_err(|e| self.err(rel, e))?;
            let name = entry.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            names.push((name.to_owned(), entry.file_type()));
        }
        for (name, _) in names {
            let child = rel.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(
                name.as_bytes(),
            ));
            let st = rfs::statat(src, &name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| self.err(&child, e))?;
            let ft = FileType::from_raw_mode(st.st_mode);
            if ft == FileType::CharacterDevice && st.st_rdev == 0 {
                fsutil::remove_entry(dst, &name, None).map_err(|e| self.err(&child, e))?;
                continue;
            }
            if ft == FileType::Directory {
                let s = rfs::openat(src, &name, fsutil::dir_flags(), Mode::empty())
                    .map_err(|e| self.err(&child, e))?;
                match rfs::statat(dst, &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(d) if FileType::from_raw_mode(d.st_mode) == FileType::Directory => {
                        if is_opaque(s.as_fd(), self.opaque) {
                            let d = rfs::openat(dst, &name, fsutil::dir_flags(), Mode::empty())
                                .map_err(|e| self.err(&child, e))?;
                            fsutil::remove_contents(d.as_fd()).map_err(|e| self.err(&child, e))?;
                        }
                    }
                    Ok(_) => {
                        rfs::unlinkat(dst, &name, AtFlags::empty()).map_err(|e| self.err(&child, e))?;
                        rfs::mkdirat(dst, &name, Mode::from_raw_mode(0o700))
                            .map_err(|e| self.err(&child, e))?;
                    }
                    Err(rustix::io::Errno::NOENT) => {
                        rfs::mkdirat(dst, &name, Mode::from_raw_mode(0o700))
                            .map_err(|e| self.err(&child, e))?;
                    }
                    Err(e) => return Err(self.err(&child, e)),
                }
                let d = rfs::openat(dst, &name, fsutil::dir_flags(), Mode::empty())
                    .map_err(|e| self.err(&child, e))?;
                self.merge(s.as_fd(), d.as_fd(), &child)?;
                copy_meta(s.as_fd(), d.as_fd(), &st, self.private, false).map_err(|e| self.err(&child, e))?;
                continue;
            }
            let mut linked = rfs::linkat(src, &name, dst, &name, AtFlags::empty());
            if linked == Err(rustix::io::Errno::EXIST) {
                // A lower layer's entry: replaced.
                fsutil::remove_entry(dst, &name, None).map_err(|e| self.err(&child, e))?;
                linked = rfs::linkat(src, &name, dst, &name, AtFlags::empty());
            }
            match linked {
                Ok(()) => {}
                Err(rustix::io::Errno::MLINK) if ft == FileType::RegularFile => {
                    // The inode has as many links as the file system allows: the view gets a
                    // copy of its own (same data, owner, mode, times and attributes).
                    copy_file(src, dst, &name, &st).map_err(|e| self.err(&child, e))?;
                }
                Err(e) => return Err(self.err(&child, e)),
            }
        }
        Ok(())
    }
}

fn is_opaque(dir: BorrowedFd<'_>, name: &str) -> bool {
    let mut value = [0u8; 4];
    matches!(rfs::fgetxattr(dir, name, &mut value[..]), Ok(n) if &value[..n] == b"y")
}

fn copy_file(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, name: &CStr, st: &rfs::Stat) -> io::Result<()> {
    let from = rfs::openat(
        src,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let to = rfs::openat(
        dst,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let (mut from, mut to) = (File::from(from), File::from(to));
    io::copy(&mut from, &mut to)?;
    copy_meta(from.as_fd(), to.as_fd(), st, "", true)
}

/// Gives `dst` the owner, mode, extended attributes (all but overlayfs' own, with `private`
/// non-empty; `dst`'s other ones are removed) and times of `src` (whose stat is `st`).
fn copy_meta(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    st: &rfs::Stat,
    private: &str,
    file: bool,
) -> io::Result<()> {
    rfs::fchown(
        dst,
        Some(rfs::Uid::from_raw(st.st_uid)),
        Some(rfs::Gid::from_raw(st.st_gid)),
    )?;
    rfs::fchmod(dst, Mode::from_raw_mode(st.st_mode & 0o7777))?;
    let wanted = xattr_names(src)?;
    let keep = |n: &CString| private.is_empty() || !n.to_bytes().starts_with(private.as_bytes());
    if !file {
        for n in xattr_names(dst)? {
            if !keep(&n) || !wanted.contains(&n) {
                match rfs::fremovexattr(dst, n.as_c_str()) {
                    Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    for n in wanted.iter().filter(|n| keep(n)) {
        let len = rfs::fgetxattr_query(src, n.as_c_str())?;
        let mut value = vec![0u8; len];
        let got = rfs::fgetxattr(src, n.as_c_str(), &mut value[..])?;
        rfs::fsetxattr(dst, n.as_c_str(), &value[..got], rfs::XattrFlags::empty())?;
    }
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    };
    rfs::futimens(dst, &times)?;
    Ok(())
}

fn xattr_names(fd: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let len = match rfs::flistxattr_query(fd) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; len];
    let n = rfs::flistxattr(fd, &mut buf[..])?;
    Ok(buf[..n]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| CString::new(s).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    enum E<'a> {
        Dir(&'a str, u32, u64),
        File(&'a str, &'a str),
        Link(&'a str, &'a str),
        Sym(&'a str, &'a str),
        Chr(&'a str, u32, u32),
        Xattr(&'a str, &'a str, &'a [u8]),
    }

    fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_ustar();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1000);
            match e {
                E::Dir(p, mode, mtime) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_mtime(*mtime);
                    h.set_size(0);
                    b.append_data(&mut h, p, &[][..]).unwrap();
                }
                E::File(p, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, p, data.as_bytes()).unwrap();
                }
                E::Link(p, target) | E::Sym(p, target) => {
                    h.set_entry_type(if matches!(e, E::Link(..)) {
                        tar::EntryType::Link
                    } else {
                        tar::EntryType::Symlink
                    });
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, p, target).unwrap();
                }
                E::Chr(p, major, minor) => {
                    h.set_entry_type(tar::EntryType::Char);
                    h.set_mode(0o600);
                    h.set_size(0);
                    h.set_device_major(*major).unwrap();
                    h.set_device_minor(*minor).unwrap();
                    b.append_data(&mut h, p, &[][..]).unwrap();
                }
                E::Xattr(p, name, value) => {
                    let key = format!("SCHILY.xattr.{name}");
                    b.append_pax_extensions([(key.as_str(), *value)]).unwrap();
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o751);
                    h.set_mtime(4242);
                    h.set_size(0);
                    b.append_data(&mut h, p, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn layers() -> Vec<Vec<E<'static>>> {
        vec![
            vec![
                E::Dir("a", 0o755, 100),
                E::Dir("a/b", 0o755, 100),
                E::File("a/b/f", "one"),
                E::Dir("d", 0o755, 100),
                E::File("d/x", "x"),
                E::Dir("d/sub", 0o755, 100),
                E::File("d/sub/y", "y"),
                E::Dir("e", 0o755, 100),
                E::File("e/in", "in"),
                E::File("h1", "h"),
                E::Link("h2", "h1"),
                E::Sym("sym", "a/b/f"),
                E::Chr("cdev", 1, 3),
                E::File("keep", "k"),
                E::File("two", "2"),
                E::Xattr("xat", "user.test", b"1"),
            ],
            vec![
                E::File(".wh.keep", ""),
                E::Dir("d", 0o700, 200),
                E::File("d/.wh..wh..opq", ""),
                E::File("d/new", "new"),
                E::File("e", "now a file"),
            ],
            vec![
                E::Dir("two", 0o750, 300),
                E::File("two/in", "inner"),
                E::Dir("a", 0o700, 300),
                E::File("a/c", "c"),
                E::Dir("xat", 0o755, 300),
                E::Xattr("kept", "user.k", b"v"),
            ],
            vec![
                E::File(".wh.sym", ""),
                E::Dir("a", 0o711, 400),
                E::Dir("a/b", 0o755, 400),
                E::File("a/b/.wh.f", ""),
                E::Dir("e2", 0o755, 400),
                E::File("e2/z", "z"),
            ],
            vec![
                E::Dir("d", 0o755, 500),
                E::File("d/.wh..wh..opq", ""),
                E::File("d/again", "again"),
                E::File(".wh.cdev", ""),
                E::Sym("sym", "/d"),
                E::File(".wh.e2", ""),
            ],
        ]
    }

    /// Everything a lookup shows of the tree at `root`, but link counts and change times.
    fn describe(root: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                let md = fs::symlink_metadata(&p).unwrap();
                let ft = md.file_type();
                let extra = if ft.is_dir() {
                    stack.push(p.clone());
                    String::new()
                } else if ft.is_symlink() {
                    fs::read_link(&p).unwrap().to_string_lossy().into_owned()
                } else if ft.is_file() {
                    inodes.entry(md.ino()).or_default().push(rel.clone());
                    fs::read_to_string(&p).unwrap()
                } else if ft.is_char_device() {
                    format!("rdev {}", md.rdev())
                } else {
                    String::new()
                };
                let mut xattrs: Vec<String> = Vec::new();
                let mut buf = vec![0u8; 4096];
                if let Ok(n) = rfs::llistxattr(&p, &mut buf[..]) {
                    for name in buf[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
                        let name = String::from_utf8_lossy(name).into_owned();
                        let mut v = vec![0u8; 256];
                        let len = rfs::lgetxattr(&p, name.as_str(), &mut v[..]).unwrap();
                        xattrs.push(format!("{name}={}", String::from_utf8_lossy(&v[..len])));
                    }
                }
                out.insert(
                    rel,
                    format!(
                        "{:o} {}:{} size {} mtime {}.{} {extra} {xattrs:?}",
                        md.mode(),
                        md.uid(),
                        md.gid(),
                        if ft.is_dir() { 0 } else { md.size() },
                        md.mtime(),
                        md.mtime_nsec(),
                    ),
                );
            }
        }
        for (_, mut names) in inodes.into_iter().filter(|(_, n)| n.len() > 1) {
            names.sort();
            out.insert(format!("links {names:?}"), String::new());
        }
        out
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root() && layer::opaque_xattr() == "trusted.overlay.opaque"
    }

    fn store_with_layers() -> (tempfile::TempDir, Snapshots, Vec<Digest>) {
        let t = tempfile::tempdir().unwrap();
        let store = Snapshots::open(&t.path().join("snapshots")).unwrap();
        let mut keys: Vec<Digest> = Vec::new();
        for (i, l) in layers().iter().enumerate() {
            let key = Digest::of(format!("layer {i}").as_bytes());
            store
                .unpack(&key, keys.last(), io::Cursor::new(tar_of(l)), None)
                .unwrap();
            keys.push(key);
        }
        (t, store, keys)
    }

    #[test]
    fn a_view_shows_what_the_kernel_overlay_of_its_layers_shows() {
        if !is_root() {
            eprintln!("skipped: needs root (a kernel overlay mount)");
            return;
        }
        let (t, store, keys) = store_with_layers();
        // Made in steps of 2: the view of 5 layers is made from the view of 3, made from 1.
        let flat = store.flattened(&keys, 2).unwrap();
        assert_eq!(store.flat_views().len(), 3);
        let mut lower: Vec<String> = keys
            .iter()
            .rev()
            .map(|k| store.get(k).unwrap().path.display().to_string())
            .collect();
        let target = t.path().join("mnt");
        fs::create_dir(&target).unwrap();
        let mount = |lower: &str, upper: Option<(&Path, &Path)>| {
            let data = match upper {
                Some((u, w)) => format!(
                    "lowerdir={lower},upperdir={},workdir={}",
                    u.display(),
                    w.display()
                ),
                None => format!("lowerdir={lower}"),
            };
            let data = CString::new(data).unwrap();
            rustix::mount::mount(
                "overlay",
                &target,
                "overlay",
                rustix::mount::MountFlags::empty(),
                Some(data.as_c_str()),
            )
            .unwrap();
        };
        let unmount = || rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH).unwrap();
        mount(&lower.join(":"), None);
        let stacked = describe(&target);
        unmount();
        // The view alone (plus an empty dir: a read-only overlay needs two lower dirs).
        let empty = t.path().join("empty");
        fs::create_dir(&empty).unwrap();
        fs::set_permissions(&empty, fs::Permissions::from_mode(0o755)).unwrap();
        mount(&format!("{}:{}", flat.display(), empty.display()), None);
        let through_view = describe(&target);
        unmount();
        assert_eq!(through_view, stacked);
        assert!(
            stacked.contains_key("d/again") && !stacked.contains_key("d/x"),
            "{stacked:?}"
        );
        assert!(stacked["xat"].contains("mtime 300.0"), "{stacked:?}");
        assert!(stacked.contains_key("links [\"h1\", \"h2\"]"), "{stacked:?}");
        assert!(stacked["kept"].contains("user.k=v"), "{stacked:?}");
        // The view itself is plain: no whiteout, no opaque marker.
        assert_eq!(describe(&flat), stacked);

        // Half the stack as a view under the other half (as a step mounts it).
        let half = store.flattened(&keys[..2], 2).unwrap();
        lower.truncate(3);
        lower.push(half.display().to_string());
        mount(&lower.join(":"), None);
        assert_eq!(describe(&target), stacked);
        unmount();

        // A write through an overlay over the view copies the file up: neither the view's file
        // nor the snapshot's (the same inode) changes.
        let upper = t.path().join("upper");
        let work = t.path().join("work");
        fs::create_dir(&upper).unwrap();
        fs::create_dir(&work).unwrap();
        mount(
            &format!("{}:{}", flat.display(), empty.display()),
            Some((&upper, &work)),
        );
        fs::OpenOptions::new()
            .append(true)
            .open(target.join("h2"))
            .and_then(|mut f| io::Write::write_all(&mut f, b"more"))
            .unwrap();
        assert_eq!(fs::read_to_string(target.join("h2")).unwrap(), "hmore");
        unmount();
        let first = store.get(&keys[0]).unwrap().path;
        assert_eq!(fs::read_to_string(first.join("h1")).unwrap(), "h");
        assert_eq!(fs::read_to_string(first.join("h2")).unwrap(), "h");
        assert_eq!(fs::read_to_string(flat.join("h2")).unwrap(), "h");
    }

    #[test]
    fn views_go_with_the_snapshots_they_cover() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let (_t, store, keys) = store_with_layers();
        store.flattened(&keys[..4], 2).unwrap();
        assert_eq!(store.flat_views().len(), 2);
        assert_eq!(store.sweep_flats().unwrap().0, 0, "every covered snapshot exists");
        assert!(store.flat_if_present(&keys[..4]).is_some());
        // The view of 4 covers layer 3; the view of 2 does not.
        store.remove(&keys[3]).unwrap();
        assert_eq!(store.sweep_flats().unwrap().0, 1);
        assert!(store.flat_if_present(&keys[..4]).is_none());
        assert!(store.flat_if_present(&keys[..2]).is_some());
        // A view another boot made counts as absent and goes.
        let dir = store.flat_views()[0].clone();
        let mut meta: FlatMeta = serde_json::from_slice(&fs::read(dir.join("meta.json")).unwrap()).unwrap();
        meta.boot = Some("another-boot".into());
        fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        assert!(store.flat_if_present(&keys[..2]).is_none());
        assert_eq!(store.sweep_flats().unwrap().0, 1);
        assert!(store.flat_views().is_empty());
        // A killed maker's temp is an ordinary stale temp of `DIR/tmp`; nothing under `flat`.
        let entries: Vec<_> = fs::read_dir(store.tmp()).unwrap().flatten().collect();
        assert!(entries.is_empty(), "{entries:?}");
    }
}
