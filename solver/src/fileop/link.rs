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
//!
//! An edited result may be kept as the copy's upper dir stacked on the donor's bottom tree
//! instead of linking every unchanged file (see `fileop::over`); a stacked donor is then two
//! trees, and a file is in the first that has it.

use super::meta::Meta;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Tells a copy what a source file holds without reading it.
pub trait KnownContent: Send + Sync {
    /// The content hash of the source-root-relative `rel`, when `meta` (its `lstat` now) shows
    /// the file unchanged since it was hashed.
    fn content(&self, rel: &str, meta: &Meta) -> Option<[u8; 32]>;

    /// The `lstat` of the regular file `rel` as the scan that hashed it took it, when that is
    /// enough for a copy: the file is its inode's only name (no hard links to keep). Its
    /// `atime` is not the file's (the scan keeps none; it is the `mtime`): a copy that writes
    /// the file takes it from the file it opens.
    fn scanned(&self, rel: &str) -> Option<Meta>;
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

    fn scanned(&self, rel: &str) -> Option<Meta> {
        let e = self
            .get(rel)
            .filter(|e| e.kind == crate::context::Kind::File && e.single)?;
        let (ino, mtime, ctime) = e.validators;
        let split = kiln_runtime::unixtime::from_nanos;
        Some(Meta {
            mode: rustix::fs::FileType::RegularFile.as_raw_mode() | e.mode,
            uid: e.uid,
            gid: e.gid,
            nlink: 1,
            dev: self.dev,
            ino,
            rdev: 0,
            size: e.size,
            atime: split(mtime),
            mtime: split(mtime),
            ctime: split(ctime),
        })
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
            encode_record(&mut out, path, k);
        }
        out
    }

    /// Reads [`FileIndex::encode`]'s bytes; anything malformed is `None` (the index is only an
    /// optimisation: without it, files are copied).
    pub fn decode(bytes: &[u8]) -> Option<FileIndex> {
        let mut out = Vec::new();
        for_each_record(bytes, |path, key| {
            out.push((path.to_string(), key));
            Some(())
        })?;
        Some(FileIndex(out))
    }
}

/// Appends one record of the index's format.
fn encode_record(out: &mut Vec<u8>, path: &str, k: &FileKey) {
    out.extend_from_slice(&(path.len() as u32).to_le_bytes());
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(&k.content);
    out.extend_from_slice(&k.size.to_le_bytes());
    out.extend_from_slice(&k.mode.to_le_bytes());
    out.extend_from_slice(&k.uid.to_le_bytes());
    out.extend_from_slice(&k.gid.to_le_bytes());
    out.extend_from_slice(&k.mtime_ns.to_le_bytes());
}

/// Calls `each` with every record of an encoded index, in order; `None` when the bytes are
/// malformed, a path is not [`is_relative_normal`], or `each` says `None`.
fn for_each_record(bytes: &[u8], mut each: impl FnMut(&str, FileKey) -> Option<()>) -> Option<()> {
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
        each(path, key)?;
    }
    Some(())
}

/// An encoded index ([`Linking::take_index`]): what a result stores, and how many files it lists.
#[derive(Debug)]
pub struct EncodedIndex {
    bytes: Vec<u8>,
    files: usize,
}

impl EncodedIndex {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// How many files it lists.
    pub fn files(&self) -> usize {
        self.files
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
/// Read straight from the encoded index into flat lists (at 500k files a map from key to path
/// list, or even a map from key to group, cost over 100 MB): donor file `n` is the index's
/// `n`th record, so numbers follow the paths' order.
///
/// A copy asks first for the donor file at the very path it writes (`Donors::take_at`): a
/// copy walks each directory in name order, so the next file is nearly always the donor file
/// after the last one found, and one comparison finds it. Only a file that is not where it was
/// (moved, changed, or a new copy of other content) is looked up by key: the first few by
/// reading the keys in order, later ones in a list of the numbers ordered by key, sorted when
/// first needed. (Binary searches for every file, each probe a cache miss at 500k files, were
/// a third of an edited copy's CPU time.)
#[derive(Debug)]
pub struct Donors {
    /// The donor's trees, top first: its snapshot's, then those it is stacked on (an edited
    /// copy's result: its changed files over the earlier result). A file is in the first that
    /// has it.
    roots: Vec<PathBuf>,
    /// `roots` opened, so links name their source relative to them (shorter path walks).
    root_fds: Vec<Option<OwnedFd>>,
    /// Every path (relative to `root`) one after another; file `n` ends at `ends[n]`.
    names: String,
    ends: Vec<u32>,
    keys: Vec<FileKey>,
    /// File numbers ordered by key, then by number: made when the lookups by key outnumber
    /// [`READS_BEFORE_SORT`].
    by_key: std::sync::OnceLock<ByKey>,
    /// One bit per file: handed out.
    taken: Vec<AtomicU64>,
    /// Lookups by key answered by reading the keys in order (see `Donors::take_number`).
    reads: AtomicUsize,
}

/// Lookups by key read the keys in order this many times before they are sorted.
const READS_BEFORE_SORT: usize = 4;

/// The donor files' numbers ordered by key, with where each key's run may still have files.
#[derive(Debug)]
struct ByKey {
    numbers: Vec<u32>,
    /// At the first position of each key's run in `numbers`: how many of the run are known to
    /// be handed out (a hint; [`Donors::claim`] decides).
    skip: Vec<AtomicU32>,
}

thread_local! {
    /// The donor file after the last one [`Linking::fits_over`]'s walk found on this thread.
    static NEXT_KEPT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// The donor file after the last one [`Donors::take_at`] found on this thread.
    static NEXT_AT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl Donors {
    /// The files the encoded index `bytes` ([`Linking::take_index`]) lists below `roots` (an
    /// immutable snapshot's trees, top first). `None` when there is no root, or the index is
    /// malformed or its paths are not strictly in order (an index never names a path twice;
    /// the copy then writes every file).
    pub fn new(roots: Vec<PathBuf>, bytes: &[u8]) -> Option<Donors> {
        if roots.is_empty() {
            return None;
        }
        let mut names = String::new();
        let mut ends = Vec::new();
        let mut keys = Vec::new();
        let mut last: Option<std::ops::Range<usize>> = None;
        for_each_record(bytes, |path, key| {
            if last.as_ref().is_some_and(|r| names[r.clone()] >= *path) {
                return None;
            }
            let at = names.len();
            names.push_str(path);
            ends.push(u32::try_from(names.len()).ok()?);
            keys.push(key);
            last = Some(at..names.len());
            Some(())
        })?;
        u32::try_from(keys.len()).ok().filter(|c| *c < NO_DONOR)?;
        let taken = (0..keys.len().div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let root_fds = roots.iter().map(|r| open_dir(r)).collect();
        Some(Donors {
            roots,
            root_fds,
            names,
            ends,
            keys,
            by_key: std::sync::OnceLock::new(),
            taken,
            reads: AtomicUsize::new(0),
        })
    }

    /// Hands out donor file `n` unless it already was.
    fn claim(&self, n: u32) -> bool {
        let bit = 1u64 << (n % 64);
        self.taken
            .get(n as usize / 64)
            .is_some_and(|w| w.fetch_or(bit, Ordering::Relaxed) & bit == 0)
    }

    /// The donor file at `rel` itself, when it has `key` and was not handed out: its number.
    fn take_at(&self, rel: &str, key: &FileKey) -> Option<u32> {
        let n = kiln_cache::sorted::find(self.keys.len(), |i| self.path(i as u32), rel, &NEXT_AT)? as u32;
        (self.keys[n as usize] == *key && self.claim(n)).then_some(n)
    }

    fn by_key(&self) -> &ByKey {
        self.by_key.get_or_init(|| {
            let keys = &self.keys;
            let mut numbers: Vec<u32> = (0..keys.len() as u32).collect();
            numbers.sort_unstable_by(|a, b| keys[*a as usize].cmp(&keys[*b as usize]).then(a.cmp(b)));
            let skip = (0..numbers.len()).map(|_| AtomicU32::new(0)).collect();
            ByKey { numbers, skip }
        })
    }

    /// A not yet used donor file with `key`: its number (see [`Donors::path`]). The first few
    /// lookups read the keys in order instead of sorting them all (an edit's changed files are
    /// looked up by key too, and at 500k files the sort costs far more than a few reads).
    fn take_number(&self, key: &FileKey) -> Option<u32> {
        if self.by_key.get().is_none() && self.reads.fetch_add(1, Ordering::Relaxed) < READS_BEFORE_SORT {
            return (0..self.keys.len() as u32).find(|n| self.keys[*n as usize] == *key && self.claim(*n));
        }
        let ByKey { numbers, skip } = self.by_key();
        let first = numbers.partition_point(|n| self.keys[*n as usize] < *key);
        let run = numbers[first..]
            .iter()
            .take_while(|n| self.keys[**n as usize] == *key);
        // The run's counter is this key's own: the run starts at `first`.
        let hint = skip.get(first)?;
        let start = hint.load(Ordering::Relaxed) as usize;
        for (i, n) in run.enumerate().skip(start) {
            if self.claim(*n) {
                hint.fetch_max(i as u32 + 1, Ordering::Relaxed);
                return Some(*n);
            }
        }
        None
    }

    /// The path (relative to the roots) of donor file number `n`.
    pub(super) fn path(&self, n: u32) -> &str {
        let n = n as usize;
        let start = match n.checked_sub(1) {
            Some(p) => self.ends.get(p).map_or(0, |e| *e as usize),
            None => 0,
        };
        self.ends
            .get(n)
            .and_then(|end| self.names.get(start..*end as usize))
            .unwrap_or("")
    }

    /// The key of donor file number `n`.
    fn key(&self, n: u32) -> Option<&FileKey> {
        self.keys.get(n as usize)
    }

    /// The root holding the file at `rel` (the first that has it), as a full path.
    fn holder(&self, rel: &str) -> Option<PathBuf> {
        self.roots
            .iter()
            .map(|r| r.join(rel))
            .find(|p| p.symlink_metadata().is_ok())
    }

    /// The bottom tree (the one the others are stacked on, or the only one).
    pub fn bottom(&self) -> &Path {
        self.roots.last().map_or(Path::new(""), PathBuf::as_path)
    }

    /// How many files it lists.
    pub(super) fn len(&self) -> usize {
        self.keys.len()
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

/// The directory `rel` below `root` (itself when `rel` is empty), opened for `*at` calls without
/// following a symlink anywhere on the way.
fn open_below(root: &OwnedFd, rel: &str) -> Option<OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let rel = if rel.is_empty() { "." } else { rel };
    rustix::fs::openat2(
        root,
        rel,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .ok()
}

/// The names in directory `rel` below `root`, sorted; `None` when it cannot be read.
fn list_dir(root: &OwnedFd, rel: &str) -> Option<Vec<Vec<u8>>> {
    let dir = super::over::open(Some(root), Path::new(if rel.is_empty() { "." } else { rel }))?;
    let mut names: Vec<Vec<u8>> = super::over::entries(&dir)?.into_iter().map(|(n, _)| n).collect();
    names.sort_unstable();
    Some(names)
}

/// A relative path's parent directory (empty at the top) and its last component.
fn split_parent(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
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
    written: Mutex<Written>,
    linked: AtomicUsize,
    /// Put links off until [`Linking::make_pending`] (see [`Linking::deferring`]): every
    /// donor recorded in `written` is then a link still to make.
    defer: bool,
    /// Whether [`Linking::make_pending`] ran.
    made: std::sync::atomic::AtomicBool,
}

/// The keyed files a copy wrote or linked, compactly: at 500k files a path and key per file
/// cost about 130 bytes each, and nearly every file of an edited context is a donor's file at
/// the donor's own path, known by its number alone.
#[derive(Debug, Default)]
struct Written {
    /// Donor files linked at the path they have in the donor (same path, same key).
    same: Vec<u32>,
    /// The others: path, key, and the donor file linked there ([`NO_DONOR`] when written).
    own: Vec<(Box<str>, FileKey, u32)>,
}

/// In [`Written::own`]: the file was written, not linked.
const NO_DONOR: u32 = u32::MAX;

impl std::fmt::Debug for Linking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linking")
            .field("source_input", &self.source_input)
            .field("upper", &self.upper)
            .field("donors", &self.donors.as_ref().map(Donors::len))
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
            written: Mutex::new(Written::default()),
            linked: AtomicUsize::new(0),
            defer: false,
            made: Default::default(),
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
            written: Mutex::new(Written::default()),
            linked: AtomicUsize::new(0),
            defer: false,
            made: Default::default(),
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

    /// The paths (relative to the destination root) where a link to the donor file at the
    /// same path is pending: what [`kiln_cache::layer::same_tree_assuming`] may count as present.
    pub fn pending_in_place(&self) -> InPlace<'_> {
        let donors = self
            .donors
            .as_ref()
            .filter(|_| self.defer && !self.made.load(Ordering::Relaxed));
        let mut numbers = match donors {
            Some(_) => self
                .written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .same
                .clone(),
            None => Vec::new(),
        };
        numbers.sort_unstable();
        InPlace { donors, numbers }
    }

    /// Makes the pending links. A link that fails (an inode linked too often, a donor removed
    /// meanwhile) is written as a copy of the donor's file with the key's owner, mode and
    /// times. The directories linked into keep the times the copy gave them.
    pub fn make_pending(&self) -> Result<(), super::FileOpError> {
        self.make(false)
    }

    /// Whether the upper dir, stacked on the donor's bottom tree ([`Donors::bottom`]), shows
    /// this copy's tree once [`Linking::make_pending_over`] ran (see `fileop::over`). False
    /// without a deferring donor, or once the links were made.
    pub fn fits_over(&self) -> bool {
        let (Some(donors), true) = (&self.donors, self.defer) else {
            return false;
        };
        if self.made.load(Ordering::Relaxed) {
            return false;
        }
        let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let mut same = vec![0u64; donors.len().div_ceil(64)];
        for n in &written.same {
            if let Some(w) = same.get_mut(*n as usize / 64) {
                *w |= 1 << (n % 64);
            }
        }
        let mut moved: Vec<&str> = written
            .own
            .iter()
            .filter(|o| o.2 != NO_DONOR)
            .map(|o| &*o.0)
            .collect();
        moved.sort_unstable();
        let keeps = |path: &str| {
            let same = kiln_cache::sorted::find(donors.len(), |i| donors.path(i as u32), path, &NEXT_KEPT)
                .is_some_and(|n| same.get(n / 64).is_some_and(|w| w & (1 << (n % 64)) != 0));
            same || moved.binary_search(&path).is_ok()
        };
        super::over::fits(&keeps, &self.upper, donors.bottom())
    }

    /// [`Linking::make_pending`] for a result kept as the upper dir over the donor's bottom
    /// tree: a donor file at its own path that the bottom tree holds is not linked (the tree
    /// shows it), the others are.
    pub fn make_pending_over(&self) -> Result<(), super::FileOpError> {
        self.make(true)
    }

    fn make(&self, over: bool) -> Result<(), super::FileOpError> {
        use rayon::prelude::*;
        use rustix::fs::{AtFlags, Timestamps};
        let (Some(donors), true) = (&self.donors, self.defer) else {
            return Ok(());
        };
        if self.made.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let mut guard = self.written.lock().unwrap_or_else(|e| e.into_inner());
        // In path order, so that each directory's files are runs (see `link_run`).
        guard.same.par_sort_unstable();
        let written = &*guard;
        let same = written.same.par_iter().map(|n| (*n, donors.path(*n)));
        let moved = written
            .own
            .par_iter()
            .filter(|o| o.2 != NO_DONOR)
            .map(|o| (o.2, &*o.0));
        let pending = || same.clone().chain(moved.clone());
        let mut dirs: Vec<&Path> = pending()
            .map(|(_, to)| {
                Path::new(to)
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
            })
            .collect();
        if dirs.is_empty() {
            return Ok(());
        }
        dirs.par_sort_unstable();
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
        drop(dirs);
        let runs: Vec<&[u32]> = written
            .same
            .chunk_by(|a, b| split_parent(donors.path(*a)).0 == split_parent(donors.path(*b)).0)
            .collect();
        runs.par_iter()
            .try_for_each(|run| self.link_run(donors, upper, run, over))?;
        moved.try_for_each(|(n, to)| self.link_one(donors, n, to))?;
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

    /// Links donor files `numbers` (one directory's, in order) at their own paths: the
    /// directories are opened once and each file linked by its name, instead of two path walks
    /// per file. With several donor trees, the directory's listing in each upper one tells which
    /// holds a file (a stacked donor's own files are few). `over`: files the bottom tree holds
    /// are left (the result is stacked on it). A directory that cannot be opened, or a link that
    /// fails, falls back to [`Linking::link_one`].
    fn link_run(
        &self,
        donors: &Donors,
        upper: &OwnedFd,
        numbers: &[u32],
        over: bool,
    ) -> Result<(), super::FileOpError> {
        let Some(first) = numbers.first() else {
            return Ok(());
        };
        let (parent, _) = split_parent(donors.path(*first));
        let bottom = donors.roots.len() - 1;
        let listed: Vec<Vec<Vec<u8>>> = donors.root_fds[..bottom]
            .iter()
            .map(|fd| {
                fd.as_ref()
                    .and_then(|fd| list_dir(fd, parent))
                    .unwrap_or_default()
            })
            .collect();
        let to = open_below(upper, parent);
        // Stacked on the bottom tree, nothing is linked from it: it is not opened.
        let froms: Vec<Option<OwnedFd>> = donors
            .root_fds
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                fd.as_ref()
                    .filter(|_| !(over && i == bottom))
                    .and_then(|fd| open_below(fd, parent))
            })
            .collect();
        for n in numbers {
            let path = donors.path(*n);
            let (_, name) = split_parent(path);
            let holder = listed
                .iter()
                .position(|l| l.binary_search_by(|e| e.as_slice().cmp(name.as_bytes())).is_ok())
                .unwrap_or(bottom);
            if over && holder == bottom {
                continue;
            }
            let linked = match (&froms[holder], &to) {
                (Some(from), Some(to)) => {
                    rustix::fs::linkat(from, name, to, name, rustix::fs::AtFlags::empty()).is_ok()
                }
                _ => false,
            };
            if !linked {
                self.link_one(donors, *n, path)?;
            }
        }
        Ok(())
    }

    /// Links donor file `n` at `to` (relative to the destination root), or writes it as a copy
    /// of the donor's file with the key's owner, mode and times when the link fails.
    fn link_one(&self, donors: &Donors, n: u32, to: &str) -> Result<(), super::FileOpError> {
        let from = donors.path(n);
        if self.link_now(donors, from, Path::new(to)).is_ok() {
            return Ok(());
        }
        let missing = || super::FileOpError::Stat {
            path: donors.bottom().join(from),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let key = donors.key(n).ok_or_else(missing)?;
        let held = donors.holder(from).ok_or_else(missing)?;
        copy_donor_file(&held, &self.upper.join(to), key)
    }

    /// Links the donor file `from` (from the first donor tree that has it) at `rel`.
    fn link_now(&self, donors: &Donors, from: &str, rel: &Path) -> std::io::Result<()> {
        let mut last = std::io::Error::from(std::io::ErrorKind::NotFound);
        for (root, fd) in donors.roots.iter().zip(&donors.root_fds) {
            let made = match (fd, &self.upper_fd) {
                (Some(src), Some(dst)) => {
                    rustix::fs::linkat(src, from, dst, rel, rustix::fs::AtFlags::empty())
                        .map_err(std::io::Error::from)
                }
                _ => std::fs::hard_link(root.join(from), self.upper.join(rel)),
            };
            match made {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
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

    /// The scan's `lstat` of the source file `src_rel`, when it stands for one
    /// ([`KnownContent::scanned`]).
    pub(super) fn scanned(&self, src_rel: &str) -> Option<Meta> {
        self.known.as_ref()?.scanned(src_rel)
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
    /// directory this copy created): the donor file's number, to [`Linking::record`]. `None`
    /// when there is none or linking failed (then the caller copies; the failed attempt left
    /// nothing behind).
    pub(super) fn try_link(&self, key: &FileKey, rel: &Path) -> Option<u32> {
        let donors = self.donors.as_ref()?;
        // Only a path the index can record is linked (a deferred link is made from the record).
        let rel_str = rel.to_str().filter(|r| is_relative_normal(r))?;
        let from = donors.take_at(rel_str, key).or_else(|| donors.take_number(key))?;
        if self.defer {
            self.linked.fetch_add(1, Ordering::Relaxed);
            return Some(from);
        }
        self.counted(self.link_now(donors, donors.path(from), rel), donors.path(from))
            .then_some(from)
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

    /// Records that the file `rel` (relative to the destination root) was written with `key`,
    /// or linked from donor file `donor` ([`Linking::try_link`]'s number).
    pub(super) fn record(&self, rel: &Path, key: FileKey, donor: Option<u32>) {
        let Some(rel) = rel.to_str().filter(|r| is_relative_normal(r)) else {
            return;
        };
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        match (donor, &self.donors) {
            (Some(n), Some(d)) if d.path(n) == rel => written.same.push(n),
            (donor, _) => written.own.push((rel.into(), key, donor.unwrap_or(NO_DONOR))),
        }
    }

    /// How many files were linked rather than written.
    pub fn linked(&self) -> usize {
        self.linked.load(Ordering::Relaxed)
    }

    /// How many keyed files were recorded.
    pub fn files(&self) -> usize {
        let w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        w.same.len() + w.own.len()
    }

    /// The encoded index ([`FileIndex`]'s format) of every keyed file written, sorted by path;
    /// the records are handed over (a second call finds none).
    pub fn take_index(&self) -> EncodedIndex {
        let Written { mut same, mut own } =
            std::mem::take(&mut *self.written.lock().unwrap_or_else(|e| e.into_inner()));
        // Donor numbers follow the donor's paths, which are strictly in order.
        same.sort_unstable();
        own.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let files = same.len() + own.len();
        let mut bytes = Vec::with_capacity(MAGIC.len() + files * 96);
        bytes.extend_from_slice(MAGIC);
        let mut own = own.iter().peekable();
        if let Some(donors) = &self.donors {
            for n in same {
                let (path, Some(key)) = (donors.path(n), donors.key(n)) else {
                    continue;
                };
                while let Some(o) = own.next_if(|o| &*o.0 < path) {
                    encode_record(&mut bytes, &o.0, &o.1);
                }
                encode_record(&mut bytes, path, key);
            }
        }
        for o in own {
            encode_record(&mut bytes, &o.0, &o.1);
        }
        EncodedIndex { bytes, files }
    }
}

/// Where links to donor files at their own paths are pending ([`Linking::pending_in_place`]).
#[derive(Debug)]
pub struct InPlace<'a> {
    donors: Option<&'a Donors>,
    /// Donor file numbers, sorted (so in path order).
    numbers: Vec<u32>,
}

impl InPlace<'_> {
    /// Whether a link to the donor's file at `rel` is pending at `rel`.
    pub fn contains(&self, rel: &[u8]) -> bool {
        let Some(d) = self.donors else {
            return false;
        };
        self.numbers
            .binary_search_by(|n| d.path(*n).as_bytes().cmp(rel))
            .is_ok()
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
        let index = FileIndex(vec![
            ("w".into(), key(3)),
            ("x".into(), key(1)),
            ("y".into(), key(1)),
            ("z".into(), key(2)),
        ]);
        let d = Donors::new(vec![PathBuf::from("/d")], &index.encode()).unwrap();
        assert_eq!(d.take(&key(0)), None);
        assert_eq!(d.take(&key(1)), Some("x"));
        assert_eq!(d.take(&key(1)), Some("y"));
        assert_eq!(d.take(&key(1)), None);
        // Asking for a missing key between others takes nothing from the next key's files.
        assert_eq!(d.take(&key(2)), Some("z"));
        assert_eq!(d.take(&key(2)), None);
        assert_eq!(d.take(&key(3)), Some("w"));
        assert_eq!(d.take(&key(4)), None);
        assert_eq!((d.path(0), d.path(3), d.path(9)), ("w", "z", ""));
        assert_eq!(d.key(1), Some(&key(1)));
    }

    #[test]
    fn donors_hand_out_the_file_at_the_same_path_first_and_never_twice() {
        let index = FileIndex(vec![
            ("a".into(), key(1)),
            ("b".into(), key(1)),
            ("c".into(), key(2)),
            ("d/e".into(), key(1)),
        ]);
        let d = Donors::new(vec![PathBuf::from("/d")], &index.encode()).unwrap();
        // In order, each found where it is (the hint), whatever the key order says.
        assert_eq!(d.take_at("b", &key(1)).map(|n| d.path(n)), Some("b"));
        assert_eq!(d.take_at("c", &key(2)).map(|n| d.path(n)), Some("c"));
        // Out of order (a binary search), and not with another key.
        assert_eq!(d.take_at("a", &key(2)), None);
        assert_eq!(d.take_at("zz", &key(1)), None);
        assert_eq!(d.take_at("d/e", &key(1)).map(|n| d.path(n)), Some("d/e"));
        // By key, only what the paths left: "a"; then nothing, by path or by key.
        assert_eq!(d.take(&key(1)), Some("a"));
        assert_eq!(d.take(&key(1)), None);
        assert_eq!(d.take_at("a", &key(1)), None);
        assert_eq!(d.take_at("b", &key(1)), None);
        assert_eq!(d.take(&key(2)), None);
        // Past the first few lookups by key the keys are sorted: still nothing handed out twice.
        for _ in 0..READS_BEFORE_SORT {
            assert_eq!(d.take(&key(1)), None);
        }
        assert!(d.by_key.get().is_some());
    }

    #[test]
    fn donors_refuse_an_index_out_of_order() {
        for paths in [["b", "a"], ["a", "a"]] {
            let index = FileIndex(paths.iter().map(|p| (p.to_string(), key(1))).collect());
            assert!(
                Donors::new(vec![PathBuf::from("/d")], &index.encode()).is_none(),
                "{paths:?}"
            );
        }
        assert!(Donors::new(vec![PathBuf::from("/d")], b"KILNFI01\x01").is_none());
    }
}
