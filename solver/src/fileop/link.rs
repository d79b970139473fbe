//! Hard links instead of copies: a COPY from the build context links each unchanged file from
//! an earlier result of the same instruction rather than writing it again.
//!
//! A committed snapshot is never modified (overlayfs copies a lower file up before changing
//! it), so two snapshots may share the inode of a file they hold identically. What makes two
//! written files interchangeable is a [`FileKey`]: the source's content hash and everything the
//! copy sets on the result (size, mode, owner, mtime). A copy records the key of every file it
//! writes into a [`FileIndex`], stored with the result; the next run of the same instruction
//! loads it as [`Donors`] and links a file whose key it finds instead of creating one. Creating
//! a file allocates an inode and writes its data; a link does neither.
//!
//! Invariants:
//! - A link goes only into a directory this copy created (so nothing was there, and on an
//!   overlay the directory is a plain upper directory: writing into the upper dir is what the
//!   overlay would have done).
//! - A donor file is linked at most once per op, and an index never lists two names of one
//!   inode: two linked files never become hard links of each other inside one layer, which
//!   would change the layer's tar.
//! - Only files whose content hash was computed under the stat validators the copy still sees
//!   are keyed (the stat cache's trust model). Anything else is copied as before.
//! - Atime is not part of the key (layer tars carry no atime).

use super::meta::Meta;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Tells a copy what a source file holds without reading it.
pub trait KnownContent: Send + Sync {
    /// The content hash of the source-root-relative `rel`, when `meta` (its `lstat` now) shows
    /// the file unchanged since it was hashed.
    fn content(&self, rel: &str, meta: &Meta) -> Option<[u8; 32]>;
}

impl KnownContent for crate::context::ContextIndex {
    fn content(&self, rel: &str, meta: &Meta) -> Option<[u8; 32]> {
        if !meta.is_file() {
            return None;
        }
        let validators = (meta.ino, meta.mtime_ns(), meta.ctime_ns());
        self.get(rel)
            .filter(|e| e.still_matches(meta.size, validators))
            .map(|e| e.content)
    }
}

/// Everything that makes two regular files written by a copy interchangeable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    /// blake3 of the content.
    pub content: [u8; 32],
    pub size: u64,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
}

/// The regular files a copy wrote, by path relative to the result's root.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileIndex(pub Vec<(String, FileKey)>);

const MAGIC: &[u8; 8] = b"KILNFI01";

impl FileIndex {
    /// The index as bytes ([`FileIndex::decode`] reads them back).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAGIC.len() + self.0.len() * 128);
        out.extend_from_slice(MAGIC);
        for (path, k) in &self.0 {
            out.extend_from_slice(&(path.len() as u32).to_le_bytes());
            out.extend_from_slice(path.as_bytes());
            out.extend_from_slice(&k.content);
            out.extend_from_slice(&k.size.to_le_bytes());
            out.extend_from_slice(&k.mode.to_le_bytes());
            out.extend_from_slice(&k.uid.to_le_bytes());
            out.extend_from_slice(&k.gid.to_le_bytes());
            out.extend_from_slice(&k.mtime_ns.to_le_bytes());
        }
        out
    }

    /// Reads [`FileIndex::encode`]'s bytes; anything malformed is `None` (the index is only an
    /// optimisation: without it, files are copied).
    pub fn decode(bytes: &[u8]) -> Option<FileIndex> {
        fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if rest.len() < n {
                return None;
            }
            let (a, b) = rest.split_at(n);
            *rest = b;
            Some(a)
        }
        fn array<const N: usize>(rest: &mut &[u8]) -> Option<[u8; N]> {
            take(rest, N)?.try_into().ok()
        }
        let mut rest = bytes.strip_prefix(MAGIC.as_slice())?;
        let mut out = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_le_bytes(array(&mut rest)?) as usize;
            let path = std::str::from_utf8(take(&mut rest, len)?).ok()?;
            if !is_relative_normal(path) {
                return None;
            }
            let key = FileKey {
                content: array(&mut rest)?,
                size: u64::from_le_bytes(array(&mut rest)?),
                mode: u32::from_le_bytes(array(&mut rest)?),
                uid: u32::from_le_bytes(array(&mut rest)?),
                gid: u32::from_le_bytes(array(&mut rest)?),
                mtime_ns: i64::from_le_bytes(array(&mut rest)?),
            };
            out.push((path.to_string(), key));
        }
        Some(FileIndex(out))
    }
}

/// A path a donor may name: relative, no `.`/`..` or empty components (a damaged index must
/// not make a link point outside the donor).
fn is_relative_normal(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The files of an earlier result that a copy may link, by key; each is handed out once.
///
/// The paths are one list grouped by key, and the map holds only where each key's group
/// starts (a map of per-key path lists cost about twice the memory at 500k files).
#[derive(Debug)]
pub struct Donors {
    root: PathBuf,
    /// `root` opened, so links name their source relative to it (shorter path walks).
    root_fd: Option<OwnedFd>,
    /// Relative to `root`, grouped by key (in path order within a key).
    paths: Vec<String>,
    /// Key → first path of its group, group size, how many were handed out.
    by_key: HashMap<FileKey, (u32, u32, AtomicU32)>,
}

impl Donors {
    /// The files `index` lists below `root` (an immutable snapshot's tree).
    pub fn new(root: PathBuf, index: FileIndex) -> Donors {
        let mut files = index.0;
        // Stable: within a key, the files stay in path order.
        files.sort_by_key(|a| a.1);
        let mut by_key: HashMap<FileKey, (u32, u32, AtomicU32)> = HashMap::with_capacity(files.len());
        let mut paths = Vec::with_capacity(files.len());
        for (path, key) in files {
            let Ok(at) = u32::try_from(paths.len()) else {
                break;
            };
            paths.push(path);
            by_key
                .entry(key)
                .and_modify(|g| g.1 += 1)
                .or_insert_with(|| (at, 1, AtomicU32::new(0)));
        }
        let root_fd = open_dir(&root);
        Donors {
            root,
            root_fd,
            paths,
            by_key,
        }
    }

    /// A not yet used donor file with `key`: its number (see [`Donors::path`]).
    fn take_number(&self, key: &FileKey) -> Option<u32> {
        let (at, count, next) = self.by_key.get(key)?;
        let i = next.fetch_add(1, Ordering::Relaxed);
        (i < *count).then(|| at + i)
    }

    /// The path (relative to `root`) of donor file number `n`.
    fn path(&self, n: u32) -> &str {
        self.paths.get(n as usize).map_or("", String::as_str)
    }

    /// A not yet used donor file with `key`, relative to `root`.
    #[cfg(test)]
    fn take(&self, key: &FileKey) -> Option<&str> {
        self.take_number(key).map(|n| self.path(n))
    }
}

/// Writes `to` as a copy of the donor file `from`, with `key`'s owner, mode and mtime (the
/// fallback of a link that could not be made).
fn copy_donor_file(from: &Path, to: &Path, key: &FileKey) -> Result<(), super::FileOpError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| super::FileOpError::CopyFile {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    let mut src = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(from)
        .map_err(err)?;
    let mut dst = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(err)?;
    std::io::copy(&mut src, &mut dst).map_err(err)?;
    std::os::unix::fs::fchown(&dst, Some(key.uid), Some(key.gid)).map_err(err)?;
    dst.set_permissions(std::fs::Permissions::from_mode(key.mode))
        .map_err(err)?;
    let mtime = kiln_runtime::unixtime::join(kiln_runtime::unixtime::from_nanos(key.mtime_ns));
    dst.set_times(std::fs::FileTimes::new().set_accessed(mtime).set_modified(mtime))
        .map_err(err)
}

/// `dir` opened as a directory (never through a symlink), for `*at` calls; `None` when it
/// cannot be (callers then use full paths).
fn open_dir(dir: &Path) -> Option<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
}

/// Linking state of one file op: where its writes land, what it may link, what it wrote.
pub struct Linking {
    /// The input position whose copies are keyed (the build context).
    pub source_input: usize,
    /// For a copy from the build context: what its files hold.
    known: Option<Arc<dyn KnownContent>>,
    /// For a copy from an image's or a stage's filesystem: its layers, top first, opened.
    layers: Vec<OwnedFd>,
    /// Where the op's writes land on disk: the overlay's upper dir (or the destination root
    /// itself when nothing is below it).
    upper: PathBuf,
    upper_fd: Option<OwnedFd>,
    donors: Option<Donors>,
    written: Mutex<Vec<(String, FileKey)>>,
    linked: AtomicUsize,
    /// Put links off until [`Linking::make_pending`] (see [`Linking::deferring`]).
    defer: bool,
    /// Links chosen but not made yet: donor file number, destination path, key.
    pending: Mutex<Vec<(u32, PathBuf, FileKey)>>,
}

impl std::fmt::Debug for Linking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linking")
            .field("source_input", &self.source_input)
            .field("upper", &self.upper)
            .field("donors", &self.donors.as_ref().map(|d| d.by_key.len()))
            .field("layers", &self.layers.len())
            .finish()
    }
}

impl Linking {
    /// Keys the copies reading input `source_input` (whose contents `known` vouches for),
    /// writing into `upper`, linking from `donors` when given.
    pub fn new(
        source_input: usize,
        known: Arc<dyn KnownContent>,
        upper: PathBuf,
        donors: Option<Donors>,
    ) -> Linking {
        Linking {
            source_input,
            known: Some(known),
            layers: Vec::new(),
            upper_fd: open_dir(&upper),
            upper,
            donors,
            written: Mutex::new(Vec::new()),
            linked: AtomicUsize::new(0),
            defer: false,
            pending: Mutex::new(Vec::new()),
        }
    }

    /// Links the files a copy reads from the filesystem made of `layers` (immutable snapshot
    /// trees, top first) instead of writing them, when the copy keeps their owner, mode and
    /// times: each file is linked from the layer its merged view shows it from. Nothing is
    /// recorded (an index serves copies from the build context).
    pub fn from_layers(source_input: usize, layers: &[PathBuf], upper: PathBuf) -> Option<Linking> {
        let layers = layers.iter().map(|l| open_dir(l)).collect::<Option<Vec<_>>>()?;
        Some(Linking {
            source_input,
            known: None,
            layers,
            upper_fd: open_dir(&upper),
            upper,
            donors: None,
            written: Mutex::new(Vec::new()),
            linked: AtomicUsize::new(0),
            defer: false,
            pending: Mutex::new(Vec::new()),
        })
    }

    /// Whether this links from source layers (see [`Linking::from_layers`]).
    pub(super) fn reads_layers(&self) -> bool {
        !self.layers.is_empty()
    }

    /// Links the regular file at `src_rel` of the source filesystem (whose merged view showed
    /// it with `src_meta`) at `rel` of the destination. False (nothing done) unless the
    /// topmost layer holding that path holds that very inode, reached without a symlink, with
    /// no extended attributes (a copy does not carry them).
    pub(super) fn link_from_layers(&self, src_rel: &str, src_meta: &Meta, rel: &Path) -> bool {
        use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
        let Some(upper) = &self.upper_fd else {
            return false;
        };
        let resolve = ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV;
        for layer in &self.layers {
            let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let found = match rustix::fs::openat2(layer, src_rel, flags, Mode::empty(), resolve) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(_) => return false,
            };
            let same = rustix::fs::fstat(&found).is_ok_and(|st| {
                FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                    && st.st_ino == src_meta.ino
                    && st.st_size as u64 == src_meta.size
            });
            if !same {
                return false;
            }
            // Its attributes, through the descriptor's /proc link (a path descriptor cannot list
            // them itself; the link names the very file just checked).
            let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&found));
            let no_xattrs = rustix::fs::listxattr_query(proc.as_str()).is_ok_and(|n| n == 0);
            if !no_xattrs {
                return false;
            }
            let made = rustix::fs::linkat(layer, src_rel, upper, rel, AtFlags::empty());
            return self.counted(made.map_err(Into::into), src_rel);
        }
        false
    }

    /// Chooses links during the copy but makes them only in [`Linking::make_pending`]. A copy
    /// whose result may turn out to be the donor's own tree (compared with
    /// [`kiln_cache::layer::same_tree_assuming`]) then never makes links it would remove
    /// again. Until they are made, the directories the links go into lack those files.
    pub fn deferring(mut self) -> Linking {
        self.defer = true;
        self
    }

    /// Whether a link to the donor file at the same path is pending at `rel` (relative to the
    /// destination root): what [`kiln_cache::layer::same_tree_assuming`] may count as present.
    pub fn pending_in_place(&self) -> std::collections::HashSet<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        let Some(donors) = &self.donors else {
            return Default::default();
        };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(from, to, _)| Path::new(donors.path(*from)) == to.as_path())
            .map(|(_, to, _)| to.as_os_str().as_bytes().to_vec())
            .collect()
    }

    /// Makes the pending links. A link that fails (an inode linked too often, a donor removed
    /// meanwhile) is written as a copy of the donor's file with the key's owner, mode and
    /// times. The directories linked into keep the times the copy gave them.
    pub fn make_pending(&self) -> Result<(), super::FileOpError> {
        use rayon::prelude::*;
        use rustix::fs::{AtFlags, Timestamps};
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if pending.is_empty() {
            return Ok(());
        }
        let Some(donors) = &self.donors else {
            return Ok(());
        };
        let mut dirs: Vec<&Path> = pending
            .iter()
            .map(|(_, to, _)| {
                to.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
            })
            .collect();
        dirs.sort_unstable();
        dirs.dedup();
        let opened;
        let upper = match &self.upper_fd {
            Some(fd) => fd,
            None => {
                opened = open_dir(&self.upper).ok_or_else(|| super::FileOpError::ReadDir {
                    path: self.upper.clone(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                })?;
                &opened
            }
        };
        let stat_err = |dir: &Path, source| super::FileOpError::Stat {
            path: self.upper.join(dir),
            source,
        };
        let times: Vec<(&Path, Timestamps)> = dirs
            .iter()
            .map(|d| {
                let st = rustix::fs::statat(upper, *d, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| stat_err(d, e.into()))?;
                let ts = |sec: i64, nsec: u64| rustix::fs::Timespec {
                    tv_sec: sec,
                    tv_nsec: nsec as _,
                };
                Ok((
                    *d,
                    Timestamps {
                        last_access: ts(st.st_atime, st.st_atime_nsec as u64),
                        last_modification: ts(st.st_mtime, st.st_mtime_nsec as u64),
                    },
                ))
            })
            .collect::<Result<_, super::FileOpError>>()?;
        pending.par_iter().try_for_each(|(from, to, key)| {
            let from = donors.path(*from);
            if self.link_now(donors, from, to).is_ok() {
                return Ok(());
            }
            copy_donor_file(&donors.root.join(from), &self.upper.join(to), key)
        })?;
        for (dir, ts) in times {
            rustix::fs::utimensat(upper, dir, &ts, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| {
                super::FileOpError::Times {
                    path: self.upper.join(dir),
                    source: e.into(),
                }
            })?;
        }
        Ok(())
    }

    fn link_now(&self, donors: &Donors, from: &str, rel: &Path) -> std::io::Result<()> {
        match (&donors.root_fd, &self.upper_fd) {
            (Some(src), Some(dst)) => rustix::fs::linkat(src, from, dst, rel, rustix::fs::AtFlags::empty())
                .map_err(std::io::Error::from),
            _ => std::fs::hard_link(donors.root.join(from), self.upper.join(rel)),
        }
    }

    /// Where `path` (below the destination root `dest_root`, as the copy resolved it) is in the
    /// upper dir; `path` itself when it is not below `dest_root`.
    pub(super) fn in_upper(&self, path: &Path, dest_root: &Path) -> PathBuf {
        match path.strip_prefix(dest_root) {
            Ok(rel) => self.upper.join(rel),
            Err(_) => path.to_path_buf(),
        }
    }

    /// `path` relative to the destination's root, whether it is written through the
    /// destination root `dest_root` or straight into the upper dir.
    pub(super) fn relative<'p>(&self, path: &'p Path, dest_root: &Path) -> Option<&'p Path> {
        path.strip_prefix(&self.upper)
            .or_else(|_| path.strip_prefix(dest_root))
            .ok()
    }

    /// The key of a file the copy is about to write, when its content is known.
    pub(super) fn key(
        &self,
        src_rel: &str,
        src_meta: &Meta,
        mode: u32,
        owner: (u32, u32),
        mtime_ns: i64,
    ) -> Option<FileKey> {
        let content = self.known.as_ref()?.content(src_rel, src_meta)?;
        Some(FileKey {
            content,
            size: src_meta.size,
            mode: mode & 0o7777,
            uid: owner.0,
            gid: owner.1,
            mtime_ns,
        })
    }

    /// Links a donor file with `key` at `rel` (relative to the destination root, in a
    /// directory this copy created). False when there is none or linking failed (then the
    /// caller copies; the failed attempt left nothing behind).
    pub(super) fn try_link(&self, key: &FileKey, rel: &Path) -> bool {
        let Some(donors) = &self.donors else {
            return false;
        };
        let Some(from) = donors.take_number(key) else {
            return false;
        };
        if self.defer {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((from, rel.to_path_buf(), *key));
            self.linked.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let from = donors.path(from);
        self.counted(self.link_now(donors, from, rel), from)
    }

    /// Counts a link made from `from`; a failed one is logged and false, and the caller writes
    /// the file instead (EMLINK: an inode shared by too many results; a donor removed
    /// meanwhile).
    fn counted(&self, made: std::io::Result<()>, from: &str) -> bool {
        match made {
            Ok(()) => {
                self.linked.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::debug!(from, error = %e, "link failed; writing the file instead");
                false
            }
        }
    }

    /// Records that the file `rel` (relative to the destination root) was written with `key`.
    pub(super) fn record(&self, rel: &Path, key: FileKey) {
        if let Some(rel) = rel.to_str().filter(|r| is_relative_normal(r)) {
            self.written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((rel.to_string(), key));
        }
    }

    /// How many files were linked rather than written.
    pub fn linked(&self) -> usize {
        self.linked.load(Ordering::Relaxed)
    }

    /// The index of every keyed file written, sorted by path.
    pub fn take_index(&self) -> FileIndex {
        let mut v = std::mem::take(&mut *self.written.lock().unwrap_or_else(|e| e.into_inner()));
        v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        FileIndex(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> FileKey {
        FileKey {
            content: [n; 32],
            size: n as u64,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: -5,
        }
    }

    #[test]
    fn index_round_trips_and_rejects_damage() {
        let idx = FileIndex(vec![("a/b".into(), key(1)), ("c".into(), key(2))]);
        let bytes = idx.encode();
        assert_eq!(FileIndex::decode(&bytes), Some(idx));
        assert_eq!(FileIndex::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(FileIndex::decode(b"KILNFI02"), None);
        assert_eq!(FileIndex::decode(MAGIC), Some(FileIndex::default()));
        for bad in ["../x", "/abs", "a//b", "a/./b", ""] {
            let b = FileIndex(vec![(bad.into(), key(1))]).encode();
            assert_eq!(FileIndex::decode(&b), None, "{bad:?}");
        }
    }

    #[test]
    fn donors_hand_out_each_file_once() {
        let d = Donors::new(
            PathBuf::from("/d"),
            FileIndex(vec![
                ("x".into(), key(1)),
                ("y".into(), key(1)),
                ("z".into(), key(2)),
            ]),
        );
        assert_eq!(d.take(&key(1)), Some("x"));
        assert_eq!(d.take(&key(1)), Some("y"));
        assert_eq!(d.take(&key(1)), None);
        assert_eq!(d.take(&key(2)), Some("z"));
        assert_eq!(d.take(&key(3)), None);
    }
}
