//! Writing a directory (an overlayfs upper dir, or any tree) as a reproducible layer tar.
//!
//! The calling thread walks the tree and reads files into 1 MiB chunks; a second thread hashes
//! (sha256: the diff ID) and writes them in order. Reading 20k small files is mostly syscalls and
//! hashing 100 MB is a core's worth of work, so on two cores the two overlap (a 120 MB, 21k-entry
//! layer went from 400 to 270 ms, written and fsynced).
//!
//! With a [`Donor`](super::Donor) (the earlier result of the same step), a regular file that is
//! the very inode the donor's tar wrote at the same path is not opened, read or even stat'ed: its
//! entry is copied from the donor's blob (see [`super::splice`]). [`write_diff_indexed`] then
//! writes only the bytes that are new (the fragment) and returns a [`Recipe`] for the whole tar:
//! the donor's bytes are hashed into the diff ID but not written again.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;

use kiln_dag::Digest;
use sha2::{Digest as _, Sha256};

use super::splice::{Donor, Span, TarIndex};
use super::tarfmt::{self, Kind, Spec};
use super::{DiffOptions, LayerStats};
use crate::recipe::{BlobSource, Recipe};

/// Errors of [`write_diff`] and [`write_tree`].
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The dir to write is not a directory.
    #[error("`{path}` is not a directory")]
    NotADirectory { path: PathBuf },
    /// A directory could not be listed.
    #[error("failed to list `{path}`")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file's metadata could not be read.
    #[error("failed to stat `{path}`")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file's xattr names could not be listed.
    #[error("failed to list the xattrs of `{path}`")]
    ListXattrs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An xattr value could not be read.
    #[error("failed to read xattr `{name}` of `{path}`")]
    GetXattr {
        path: PathBuf,
        name: String,
        #[source]
        source: io::Error,
    },
    /// The upper dir uses an overlayfs feature whose result cannot be turned into a layer (metacopy
    /// or redirect_dir: the data lives in a lower dir).
    #[error("`{path}` carries overlayfs xattr `{xattr}` (metacopy/redirect_dir are not supported)")]
    UnsupportedOverlay { path: PathBuf, xattr: String },
    /// A symlink's target could not be read.
    #[error("failed to read the symlink `{path}`")]
    ReadLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A regular file could not be opened.
    #[error("failed to open `{path}`")]
    OpenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A regular file could not be read.
    #[error("failed to read `{path}`")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A regular file shrank between its stat and its read.
    #[error("`{path}` changed while being archived: expected {expected} bytes, read {actual}")]
    FileChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// A walk over trees below ([`DiffOptions::below`]) met a whiteout or an opaque directory,
    /// which the union of the trees cannot express.
    #[error("`{path}` is a whiteout or an opaque directory in a layered tree")]
    LayeredWhiteout { path: PathBuf },
    /// The earlier layer tar whose entries are reused could not be read.
    #[error("failed to read the earlier layer tar reused for `{path}`")]
    ReadDonor {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The output could not be written.
    #[error("failed to write the layer tar of `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Size of the chunks the walker hands to the hashing thread.
const CHUNK: usize = 1 << 20;

/// The walker's output: bytes gathered into chunks that a second thread hashes and writes, so
/// reading the tree (syscalls) and hashing it (sha256) overlap.
///
/// A chunk is always `CHUNK` bytes long and `fill` says how much of it holds output: reads go
/// straight into it, and a chunk coming back for reuse is not zeroed again (a 120 MB layer
/// would otherwise cost as many bytes of memset).
///
/// Lazy (a write with a donor, see [`write_diff_indexed`]), a chunk holds either new bytes or
/// the donor's, never both: the hashing thread hashes every chunk and writes only the new ones,
/// and the pipe records the tar as its recipe (new bytes as ranges of the fragment, named
/// [`FRAGMENT`] until its digest is known; the donor's as ranges of the blobs they are in).
struct Pipe {
    buf: Vec<u8>,
    fill: usize,
    /// Bytes handed to the hashing thread so far.
    sent: u64,
    full: mpsc::SyncSender<Chunk>,
    /// Chunks the hashing thread is done with, for reuse.
    empty: mpsc::Receiver<Vec<u8>>,
    /// The tar so far, when lazy.
    recipe: Option<Recipe>,
    /// New bytes so far (the fragment's length).
    new_at: u64,
    /// Whether the bytes in `buf` are the donor's (lazy only).
    donor_bytes: bool,
}

/// The fragment in a recipe being recorded, until the hashing thread gives its digest.
const FRAGMENT: Digest = Digest([0; 32]);

/// A chunk for the hashing thread: its buffer, how much of it is output, and whether to write
/// it (lazy writes skip the donor's bytes).
type Chunk = (Vec<u8>, usize, bool);

impl Pipe {
    fn new(full: mpsc::SyncSender<Chunk>, empty: mpsc::Receiver<Vec<u8>>, lazy: bool) -> Pipe {
        Pipe {
            buf: vec![0; CHUNK],
            fill: 0,
            sent: 0,
            full,
            empty,
            recipe: lazy.then(|| Recipe {
                sources: vec![FRAGMENT],
                own_first: true,
                ..Default::default()
            }),
            new_at: 0,
            donor_bytes: false,
        }
    }

    /// Makes room for new bytes: a chunk of the donor's bytes is sent first (lazy only).
    fn new_bytes(&mut self) -> io::Result<()> {
        if self.donor_bytes {
            self.send()?;
            self.donor_bytes = false;
        }
        Ok(())
    }

    /// Records `n` new bytes just put into the chunk (lazy only).
    fn count_new(&mut self, n: usize) {
        if let Some(recipe) = &mut self.recipe {
            recipe.push(FRAGMENT, self.new_at, n as u64);
            self.new_at += n as u64;
        }
    }

    /// Hands the gathered bytes to the hashing thread.
    fn send(&mut self) -> io::Result<()> {
        if self.fill == 0 {
            return Ok(());
        }
        let next = self
            .empty
            .try_recv()
            .ok()
            .filter(|c| c.len() == CHUNK)
            .unwrap_or_else(|| vec![0; CHUNK]);
        let chunk = std::mem::replace(&mut self.buf, next);
        let fill = std::mem::take(&mut self.fill);
        self.sent += fill as u64;
        self.full
            .send((chunk, fill, !self.donor_bytes))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the layer hashing thread stopped"))
    }

    /// Offset in the tar of the next byte written.
    fn position(&self) -> u64 {
        self.sent + self.fill as u64
    }

    /// Copies `len` bytes of the donor's blob from `offset` straight into the chunks; a blob
    /// ending early is an error. Lazy, they are recorded as the plain-blob ranges they come from
    /// and kept out of the chunks of new bytes.
    fn copy_range(&mut self, blob: &BlobSource, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        if let Some(recipe) = &mut self.recipe {
            let mut resolved = 0;
            blob.resolve(offset, len, |d, off, n| {
                resolved += n;
                recipe.push(d, off, n);
            });
            if resolved != len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if !self.donor_bytes {
                self.send()?;
                self.donor_bytes = true;
            }
        }
        while offset < end {
            if self.fill >= CHUNK {
                self.send()?;
            }
            let start = self.fill;
            let want = usize::try_from(end - offset)
                .unwrap_or(usize::MAX)
                .min(CHUNK - start);
            match blob.read_at(&mut self.buf[start..start + want], offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.fill += n;
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads up to `limit` bytes of `r` straight into the chunks; returns how many it got
    /// (fewer only at end of file).
    fn read_from(&mut self, r: &mut impl Read, limit: u64) -> io::Result<u64> {
        let mut total = 0u64;
        self.new_bytes()?;
        while total < limit {
            if self.fill >= CHUNK {
                self.send()?;
            }
            let start = self.fill;
            let want = usize::try_from(limit - total)
                .unwrap_or(usize::MAX)
                .min(CHUNK - start);
            match r.read(&mut self.buf[start..start + want]) {
                Ok(0) => break,
                Ok(n) => {
                    self.fill += n;
                    total += n as u64;
                    self.count_new(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }
}

impl Write for Pipe {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.new_bytes()?;
        if self.fill >= CHUNK {
            self.send()?;
        }
        let n = data.len().min(CHUNK - self.fill);
        self.buf[self.fill..self.fill + n].copy_from_slice(&data[..n]);
        self.fill += n;
        self.count_new(n);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A lazy write over a donor that reads this many blobs or more writes its whole tar instead.
///
/// Each lazy edit adds its fragment to the blobs the next one reads, and a fragment stays alive
/// while any of its entries is still reused, though most of it (the directory entries, written
/// anew by each edit) is not: a chain of edits each changing another file would keep every
/// fragment. Cutting the chain at 8 bounds that to 7 fragments, for one full write in 8 edits.
pub(super) const LAZY_MAX_SOURCES: usize = 8;

/// Bytes of a layer after which its writes move to a thread of their own (see
/// [`hash_and_write`]).
const WRITE_BESIDE_FROM: u64 = 8 << 20;

/// What the hashing thread computed: the hash of every byte (the diff ID), their count, and,
/// once a chunk was not written, the hash of the bytes that were (the fragment's digest; until
/// then the two are the same bytes).
struct Hashed {
    all: Sha256,
    size: u64,
    written: Option<Sha256>,
}

/// The hashing thread: hashes and counts every chunk, in order, and writes those marked so.
///
/// Writing into the page cache costs more than hashing (a 1 GB layer of an edited 500k-file
/// copy: ~2.2 s of `write` against ~0.5 s of SHA-256 here), so once a layer has written
/// [`WRITE_BESIDE_FROM`] bytes the writes go to a third thread and the two overlap; a small
/// layer never pays for the thread.
fn hash_and_write<W: Write + Send>(
    mut out: W,
    full: mpsc::Receiver<Chunk>,
    empty: mpsc::Sender<Vec<u8>>,
) -> io::Result<Hashed> {
    let mut h = Hashed {
        all: Sha256::new(),
        size: 0,
        written: None,
    };
    let mut written = 0u64;
    // Hashes one chunk; whether to write it.
    let absorb = |h: &mut Hashed, data: &[u8], write: bool| {
        if !write && h.written.is_none() {
            h.written = Some(h.all.clone());
        }
        h.all.update(data);
        h.size += data.len() as u64;
        if write {
            if let Some(w) = &mut h.written {
                w.update(data);
            }
        }
    };
    while written < WRITE_BESIDE_FROM {
        let Ok((chunk, fill, write)) = full.recv() else {
            out.flush()?;
            return Ok(h);
        };
        let data = &chunk[..fill];
        absorb(&mut h, data, write);
        if write {
            out.write_all(data)?;
            written += fill as u64;
        }
        let _ = empty.send(chunk);
    }
    std::thread::scope(|scope| {
        let (to_write, to_writer) = mpsc::sync_channel::<(Vec<u8>, usize)>(4);
        let recycle = empty.clone();
        let writer = std::thread::Builder::new()
            .name("kiln-layer-write".into())
            .spawn_scoped(scope, move || -> io::Result<()> {
                for (chunk, fill) in to_writer {
                    out.write_all(&chunk[..fill])?;
                    let _ = recycle.send(chunk);
                }
                out.flush()
            })?;
        for (chunk, fill, write) in full {
            absorb(&mut h, &chunk[..fill], write);
            if !write {
                let _ = empty.send(chunk);
                continue;
            }
            // A failed write ends the writer: stop, and report its error below.
            if to_write.send((chunk, fill)).is_err() {
                break;
            }
        }
        drop(to_write);
        writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the layer writing thread panicked")))?;
        Ok(h)
    })
}

/// Writes an overlayfs upper dir as an OCI layer tar: 0/0 character devices become `.wh.NAME`,
/// directories marked opaque (`trusted.overlay.opaque=y` or `user.overlay.opaque=y`) get a
/// `DIR/.wh..wh..opq` right after them, overlayfs' own xattrs are dropped. Reads only `upper`.
pub fn write_diff<W: Write + Send>(
    upper: &Path,
    out: W,
    opts: &DiffOptions,
) -> Result<LayerStats, WriteError> {
    run(upper, out, opts, true, false).map(|w| w.stats)
}

/// What [`write_diff_indexed`] wrote.
#[derive(Debug)]
pub struct IndexedLayer {
    /// The whole tar's diff ID, size and entries.
    pub stats: LayerStats,
    /// Where each regular file's entry sits in the tar.
    pub index: TarIndex,
    /// sha256 of the bytes written to the output: the diff ID, or with a [`recipe`](Self::recipe),
    /// the fragment's digest.
    pub written: Digest,
    /// When entries were reused from a donor: the tar as the ranges of the fragment (the bytes
    /// written, `sources[0]`) and of the plain blobs the donor's bytes are in. The donor's
    /// bytes were hashed into the diff ID but not written.
    pub recipe: Option<Recipe>,
}

/// [`write_diff`], also returning where each regular file's entry sits in the tar: the index a
/// later write of a tree sharing these files (as a [`Donor`]) copies entries by.
///
/// With a donor, the entries it holds are not written to `out` again: `out` gets the new bytes
/// only (the fragment) and the result a [`Recipe`] for the whole tar; unless the donor's bytes
/// are already in 8 blobs or more, which gives a plain write (no recipe): see `LAZY_MAX_SOURCES`.
///
/// `upper` (and the trees of [`DiffOptions::below`]) must be plain directories on one
/// filesystem (overlayfs upper dirs or snapshots, not a merged view), because reused entries
/// are matched by the inode numbers their listings report.
pub fn write_diff_indexed<W: Write + Send>(
    upper: &Path,
    out: W,
    opts: &DiffOptions,
) -> Result<IndexedLayer, WriteError> {
    let written = run(upper, out, opts, true, true)?;
    Ok(IndexedLayer {
        stats: written.stats,
        index: written.index.unwrap_or_default(),
        written: written.fragment.unwrap_or(written.stats.diff_id),
        recipe: written.recipe,
    })
}

/// Writes a plain directory as a layer tar in the same format as [`write_diff`], without
/// interpreting whiteouts (a 0/0 character device is written as a device).
pub fn write_tree<W: Write + Send>(dir: &Path, out: W, opts: &DiffOptions) -> Result<LayerStats, WriteError> {
    run(dir, out, opts, false, false).map(|w| w.stats)
}

/// What [`run`] produced.
struct Written {
    stats: LayerStats,
    index: Option<TarIndex>,
    /// The tar's recipe, when donor bytes were kept out of the output.
    recipe: Option<Recipe>,
    /// The digest of the bytes written, when some were not.
    fragment: Option<Digest>,
}

fn run<W: Write + Send>(
    root: &Path,
    out: W,
    opts: &DiffOptions,
    overlay: bool,
    index: bool,
) -> Result<Written, WriteError> {
    let meta = fs::metadata(root).map_err(|source| WriteError::Stat {
        path: root.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(WriteError::NotADirectory {
            path: root.to_path_buf(),
        });
    }
    let exclude = opts.exclude.iter().filter_map(|p| normalize(p)).collect();
    let write_err = |source| WriteError::Write {
        path: root.to_path_buf(),
        source,
    };
    let (full_tx, full_rx) = mpsc::sync_channel::<Chunk>(4);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let hashing = std::thread::Builder::new()
            .name("kiln-layer-hash".into())
            .spawn_scoped(scope, move || hash_and_write(out, full_rx, empty_tx))
            .map_err(write_err)?;
        // A donor is only trusted for a listing whose inode numbers are the files' own, and for
        // a tar whose times are the files' own (the donor was written without a clamp).
        let donor = opts
            .donor
            .as_deref()
            .filter(|_| overlay && opts.source_date_epoch.is_none());
        let mut walker = Walker {
            root,
            dev: meta.dev(),
            overlay,
            donor,
            pending: None,
            reused: 0,
            index: index.then(|| TarIndex::on_device(meta.dev())),
            source_date_epoch: opts.source_date_epoch,
            exclude,
            links: HashMap::new(),
            link_names: Vec::new(),
            out: Pipe::new(
                full_tx,
                empty_rx,
                index && donor.is_some_and(|d| d.blob.source_count() < LAZY_MAX_SOURCES),
            ),
            entries: 0,
            header: Vec::with_capacity(2048),
            list: vec![0u8; 1024],
        };
        let below = if overlay { opts.below.clone() } else { Vec::new() };
        let walked = walker.walk_dir(root, Vec::new(), below).and_then(|()| {
            walker.flush_donor()?;
            walker
                .out
                .write_all(&[0u8; 2 * tarfmt::BLOCK])
                .and_then(|()| walker.out.send())
                .map_err(write_err)
        });
        let entries = walker.entries;
        let index = walker.index.take().map(|mut i| {
            i.seal();
            i
        });
        let reused = walker.reused;
        let recipe = walker.out.recipe.take();
        // Closes the channel: the hashing thread finishes what it has and returns.
        drop(walker);
        let hashed = hashing
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the layer hashing thread panicked")));
        match (walked, hashed) {
            // A failed write stops the hashing thread, which the walker then sees as a broken
            // pipe: the write error is the cause.
            (_, Err(e)) => Err(write_err(e)),
            (Err(e), Ok(_)) => Err(e),
            (Ok(()), Ok(hashed)) => {
                let fragment = hashed.written.map(|w| Digest(w.finalize().into()));
                Ok(Written {
                    stats: LayerStats {
                        diff_id: Digest(hashed.all.finalize().into()),
                        size: hashed.size,
                        entries,
                        reused,
                    },
                    index,
                    recipe: recipe.zip(fragment).map(|(mut recipe, fragment)| {
                        recipe.sources[0] = fragment;
                        recipe
                    }),
                    fragment,
                })
            }
        }
    })
}

/// An exclude path as relative bytes without `./`, leading or trailing slashes.
fn normalize(path: &Path) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(n.as_bytes());
            }
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!out.is_empty()).then_some(out)
}

struct Child {
    name: Vec<u8>,
    /// The name the entry gets in the tar (`.wh.NAME` for whiteouts): the sort key.
    tar_name: Vec<u8>,
    /// `None` for a file whose entry the donor holds (not stat'ed unless needed).
    meta: Option<Metadata>,
    /// The donor's entry for this very inode at this path.
    reuse: Option<(u64, Span)>,
    whiteout: bool,
    /// Which of the walked directories it is in: 0 for the top one, `i` for the `i`th below.
    layer: usize,
    /// For a directory: the same directory in the trees below the one it is in, top first (a
    /// lower entry that is not a directory ends the list, as in overlayfs).
    below: Vec<PathBuf>,
    /// Whether `below` may still grow.
    merging: bool,
}

struct Xattrs {
    list: Vec<(Vec<u8>, Vec<u8>)>,
    opaque: bool,
}

struct Walker<'a> {
    root: &'a Path,
    /// Device of `root`.
    dev: u64,
    overlay: bool,
    donor: Option<&'a Donor>,
    /// A run of donor bytes (offset, length) still to be copied to the output.
    pending: Option<(u64, u64)>,
    /// The index being recorded, when asked for.
    index: Option<TarIndex>,
    /// Entries copied from the donor.
    reused: u64,
    source_date_epoch: Option<i64>,
    exclude: HashSet<Vec<u8>>,
    /// (dev, inode) of every multiply-linked non-directory already written, to its tar name.
    /// Values: the entry's position in `index` (as pushed), or with [`OWN_NAME`] set, in
    /// `link_names`.
    links: HashMap<(u64, u64), u32>,
    link_names: Vec<Vec<u8>>,
    out: Pipe,
    entries: u64,
    header: Vec<u8>,
    list: Vec<u8>,
}

/// Marks a [`Walker::links`] value as an index into `link_names` rather than into the index.
const OWN_NAME: u32 = 1 << 31;

impl Walker<'_> {
    /// The tar name a [`Walker::links`] value stands for.
    fn link_name(&self, value: u32) -> &[u8] {
        if value & OWN_NAME != 0 {
            return self
                .link_names
                .get((value & !OWN_NAME) as usize)
                .map_or(&[][..], Vec::as_slice);
        }
        self.index
            .as_ref()
            .and_then(|i| i.pushed_name(value as usize))
            .unwrap_or(&[])
    }

    fn mtime(&self, meta: &Metadata) -> i64 {
        match self.source_date_epoch {
            Some(epoch) => meta.mtime().min(epoch),
            None => meta.mtime(),
        }
    }

    fn emit(&mut self, spec: &Spec<'_>) -> Result<(), WriteError> {
        self.flush_donor()?;
        self.header.clear();
        tarfmt::encode(spec, &mut self.header);
        self.entries += 1;
        let root = self.root;
        self.out
            .write_all(&self.header)
            .map_err(|source| WriteError::Write {
                path: root.to_path_buf(),
                source,
            })
    }

    /// Writes an empty regular file with fixed metadata: whiteouts and opaque markers.
    fn emit_marker(&mut self, path: &[u8], mtime: i64) -> Result<(), WriteError> {
        self.emit(&Spec {
            path,
            link: b"",
            kind: Kind::Regular,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime,
            dev_major: 0,
            dev_minor: 0,
            xattrs: &[],
        })
    }

    /// Writes the entries of directory `abs` (at tar path `prefix`), merged with the same
    /// directory in the trees `below` it (top first).
    fn walk_dir(&mut self, abs: &Path, prefix: Vec<u8>, below: Vec<PathBuf>) -> Result<(), WriteError> {
        let mut children: Vec<Child> = Vec::new();
        // In a layered walk, the names of the trees above the one being read, to their child.
        let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
        let layers = std::iter::once(abs).chain(below.iter().map(PathBuf::as_path));
        let count = below.len() + 1;
        for (layer, dir) in layers.enumerate() {
            let read_dir = fs::read_dir(dir).map_err(|source| WriteError::ReadDir {
                path: dir.to_path_buf(),
                source,
            })?;
            for entry in read_dir {
                let entry = entry.map_err(|source| WriteError::ReadDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
                let name = entry.file_name().as_bytes().to_vec();
                if !self.exclude.is_empty() {
                    let mut rel = prefix.clone();
                    rel.extend_from_slice(&name);
                    if self.exclude.contains(&rel) {
                        continue;
                    }
                }
                let file_type = entry.file_type().map_err(|source| WriteError::Stat {
                    path: entry.path(),
                    source,
                })?;
                if let Some(&above) = seen.get(&name) {
                    // Hidden by the entry of an upper tree; a directory under a directory merges.
                    let child = &mut children[above];
                    if child.merging && file_type.is_dir() {
                        child.below.push(entry.path());
                    } else {
                        child.merging = false;
                    }
                    continue;
                }
                let reuse = match self.donor {
                    Some(donor) if file_type.is_file() => {
                        let mut rel = prefix.clone();
                        rel.extend_from_slice(&name);
                        donor
                            .entry(self.dev, &rel, entry.ino())
                            .map(|span| (entry.ino(), span))
                    }
                    _ => None,
                };
                let meta = match reuse {
                    Some(_) => None,
                    None => Some(entry.metadata().map_err(|source| WriteError::Stat {
                        path: entry.path(),
                        source,
                    })?),
                };
                let whiteout = meta
                    .as_ref()
                    .is_some_and(|m| self.overlay && m.file_type().is_char_device() && m.rdev() == 0);
                if whiteout && count > 1 {
                    return Err(WriteError::LayeredWhiteout { path: entry.path() });
                }
                let tar_name = if whiteout {
                    [&b".wh."[..], &name].concat()
                } else {
                    name.clone()
                };
                if layer + 1 < count {
                    seen.insert(name.clone(), children.len());
                }
                children.push(Child {
                    name,
                    tar_name,
                    meta,
                    reuse,
                    whiteout,
                    layer,
                    below: Vec::new(),
                    merging: file_type.is_dir(),
                });
            }
        }
        drop(seen);
        children.sort_by(|a, b| a.tar_name.cmp(&b.tar_name));
        for child in children {
            let dir = match child.layer {
                0 => abs,
                i => below[i - 1].as_path(),
            };
            self.entry(dir, &prefix, child)?;
        }
        Ok(())
    }

    /// Writes `child` of `dir` (at tar path `prefix`).
    fn entry(&mut self, dir: &Path, prefix: &[u8], child: Child) -> Result<(), WriteError> {
        let abs = dir.join(std::ffi::OsStr::from_bytes(&child.name));
        let mut rel = prefix.to_vec();
        rel.extend_from_slice(&child.tar_name);
        if let Some((ino, span)) = child.reuse {
            // Linked from the donor, so multiply linked: a later name of it is a hardlink entry.
            // A second name seen first was written in full; this one then links to it.
            if let std::collections::hash_map::Entry::Vacant(first) = self.links.entry((self.dev, ino)) {
                // The name is the one `reuse` records in the index next (no copy of it here:
                // at 500k reused files that is ~30 MB).
                first.insert(match &self.index {
                    Some(index) if index.len() < OWN_NAME as usize => index.len() as u32,
                    _ => {
                        self.link_names.push(rel.clone());
                        OWN_NAME | (self.link_names.len() - 1) as u32
                    }
                });
                return self.reuse(rel, ino, span);
            }
        }
        let meta = match child.meta {
            Some(meta) => meta,
            None => fs::symlink_metadata(&abs).map_err(|source| WriteError::Stat {
                path: abs.clone(),
                source,
            })?,
        };
        let meta = &meta;
        let mtime = self.mtime(meta);
        if child.whiteout {
            return self.emit_marker(&rel, mtime);
        }
        let file_type = meta.file_type();
        if file_type.is_socket() {
            tracing::debug!(path = %abs.display(), "skipping a socket: tar cannot hold it");
            return Ok(());
        }
        let xattrs = self.xattrs(&abs)?;
        let mut spec = Spec {
            path: &rel,
            link: b"",
            kind: Kind::Regular,
            mode: meta.mode(),
            uid: u64::from(meta.uid()),
            gid: u64::from(meta.gid()),
            size: 0,
            mtime,
            dev_major: 0,
            dev_minor: 0,
            xattrs: &xattrs.list,
        };
        if file_type.is_dir() {
            let mut path = rel.clone();
            path.push(b'/');
            spec.path = &path;
            spec.kind = Kind::Dir;
            self.emit(&spec)?;
            // Opaque over trees below, it would hide what they hold for this layer too.
            if xattrs.opaque && !child.below.is_empty() {
                return Err(WriteError::LayeredWhiteout { path: abs });
            }
            if xattrs.opaque {
                let mut marker = path.clone();
                marker.extend_from_slice(b".wh..wh..opq");
                self.emit_marker(&marker, mtime)?;
            }
            return self.walk_dir(&abs, path, child.below);
        }
        let is_whiteout_device = file_type.is_char_device() && meta.rdev() == 0;
        if meta.nlink() > 1 && !is_whiteout_device {
            let key = (meta.dev(), meta.ino());
            if let Some(&first) = self.links.get(&key) {
                let first = self.link_name(first).to_vec();
                spec.kind = Kind::Hardlink;
                spec.link = &first;
                spec.xattrs = &[];
                return self.emit(&spec);
            }
            self.link_names.push(rel.clone());
            self.links
                .insert(key, OWN_NAME | (self.link_names.len() - 1) as u32);
        }
        if file_type.is_file() {
            spec.size = meta.len();
            // Queued donor bytes go before this entry.
            self.flush_donor()?;
            let offset = self.out.position();
            self.emit(&spec)?;
            self.copy_file(&abs, meta.len())?;
            if let Some(index) = &mut self.index {
                let len = self.out.position() - offset;
                index.push(
                    &rel,
                    Span {
                        ino: meta.ino(),
                        offset,
                        len,
                    },
                );
            }
            return Ok(());
        }
        if file_type.is_symlink() {
            let target = fs::read_link(&abs).map_err(|source| WriteError::ReadLink {
                path: abs.clone(),
                source,
            })?;
            let target = target.as_os_str().as_bytes().to_vec();
            spec.kind = Kind::Symlink;
            spec.link = &target;
            return self.emit(&spec);
        }
        if file_type.is_char_device() || file_type.is_block_device() {
            spec.kind = if file_type.is_char_device() {
                Kind::Char
            } else {
                Kind::Block
            };
            spec.dev_major = rustix::fs::major(meta.rdev());
            spec.dev_minor = rustix::fs::minor(meta.rdev());
            return self.emit(&spec);
        }
        spec.kind = Kind::Fifo;
        self.emit(&spec)
    }

    /// Writes the donor's entry for `rel` (inode `ino`), queued so that a run of entries
    /// contiguous in the donor's blob is one read.
    fn reuse(&mut self, rel: Vec<u8>, ino: u64, span: Span) -> Result<(), WriteError> {
        if !matches!(self.pending, Some((start, len)) if start + len == span.offset) {
            self.flush_donor()?;
        }
        let (start, queued) = self.pending.unwrap_or((span.offset, 0));
        let at = self.out.position() + queued;
        self.pending = Some((start, queued + span.len));
        self.entries += 1;
        self.reused += 1;
        if let Some(index) = &mut self.index {
            index.push(
                &rel,
                Span {
                    ino,
                    offset: at,
                    len: span.len,
                },
            );
        }
        Ok(())
    }

    /// Copies the queued run of donor bytes to the output.
    fn flush_donor(&mut self) -> Result<(), WriteError> {
        let (Some((offset, len)), Some(donor)) = (self.pending.take(), self.donor) else {
            return Ok(());
        };
        let root = self.root;
        self.out
            .copy_range(&donor.blob, offset, len)
            .map_err(|source| WriteError::ReadDonor {
                path: root.to_path_buf(),
                source,
            })
    }

    fn copy_file(&mut self, path: &Path, size: u64) -> Result<(), WriteError> {
        if size > 0 {
            let file = File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|source| WriteError::OpenFile {
                    path: path.to_path_buf(),
                    source,
                })?;
            let copied = self
                .out
                .read_from(&mut &file, size)
                .map_err(|source| WriteError::ReadFile {
                    path: path.to_path_buf(),
                    source,
                })?;
            if copied != size {
                return Err(WriteError::FileChanged {
                    path: path.to_path_buf(),
                    expected: size,
                    actual: copied,
                });
            }
        }
        let pad = tarfmt::padding(size);
        let root = self.root;
        self.out
            .write_all(&[0u8; tarfmt::BLOCK][..pad])
            .map_err(|source| WriteError::Write {
                path: root.to_path_buf(),
                source,
            })
    }

    /// Lists the xattrs to record (overlayfs' own left out, sorted by name) and whether the
    /// entry is an opaque overlayfs directory.
    fn xattrs(&mut self, path: &Path) -> Result<Xattrs, WriteError> {
        let mut out = Xattrs {
            list: Vec::new(),
            opaque: false,
        };
        let len = loop {
            match rustix::fs::llistxattr(path, &mut self.list[..]) {
                Ok(n) => break n,
                Err(rustix::io::Errno::RANGE) => {
                    let need = rustix::fs::llistxattr_query(path).map_err(|e| WriteError::ListXattrs {
                        path: path.to_path_buf(),
                        source: e.into(),
                    })?;
                    self.list.resize(need.max(self.list.len() * 2), 0);
                }
                Err(rustix::io::Errno::NOTSUP) => return Ok(out),
                Err(e) => {
                    return Err(WriteError::ListXattrs {
                        path: path.to_path_buf(),
                        source: e.into(),
                    })
                }
            }
        };
        if len == 0 {
            return Ok(out);
        }
        let names: Vec<Vec<u8>> = self.list[..len]
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        for name in names {
            if let Some(key) = super::overlay_xattr_key(&name) {
                if self.overlay {
                    match key {
                        b"opaque" => out.opaque = get_xattr(path, &name)? == b"y",
                        b"metacopy" | b"redirect" => {
                            return Err(WriteError::UnsupportedOverlay {
                                path: path.to_path_buf(),
                                xattr: String::from_utf8_lossy(&name).into_owned(),
                            })
                        }
                        _ => {}
                    }
                }
                continue;
            }
            let value = get_xattr(path, &name)?;
            out.list.push((name, value));
        }
        out.list.sort();
        Ok(out)
    }
}

fn get_xattr(path: &Path, name: &[u8]) -> Result<Vec<u8>, WriteError> {
    let err = |e: rustix::io::Errno| WriteError::GetXattr {
        path: path.to_path_buf(),
        name: String::from_utf8_lossy(name).into_owned(),
        source: e.into(),
    };
    let mut buf = vec![0u8; 256];
    loop {
        match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => {
                let need = rustix::fs::lgetxattr_query(path, name).map_err(err)?;
                buf.resize(need.max(buf.len() * 2), 0);
            }
            Err(e) => return Err(err(e)),
        }
    }
}
