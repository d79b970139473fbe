//! The content store: blobs addressed by sha256 under `ROOT/blobs/sha256/<hex>`.
//!
//! Architecture invariant: a blob is visible under its digest only after it was fully written to
//! a temp file in `ROOT/ingest/`, fsynced, verified against the expected digest and renamed into
//! place. A crash leaves at most a temp file in `ingest/`, never a partial blob under a real name.
//!
//! A blob can also be lazy: kept as a [`Recipe`] at `ROOT/recipes/sha256/<hex>` (the byte ranges
//! of other blobs it is made of, see [`crate::recipe`]). It counts as stored ([`ContentStore::contains`],
//! [`ContentStore::size`], [`ContentStore::list`]); [`ContentStore::source`] reads it where its
//! bytes are, and [`ContentStore::open`], for callers that need the file, writes it as a plain
//! blob first (verified against its digest like any other) and drops the recipe.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kiln_dag::Digest;
use sha2::{Digest as _, Sha256};

use crate::recipe::{BlobSource, Recipe};

/// Size of the copy buffer used when streaming blobs.
const BUF_SIZE: usize = 1 << 20;

/// A failure of the content store.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// The store directories could not be created.
    #[error("failed to create directory `{path}`")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A temp file could not be created in `ingest/`.
    #[error("failed to create temp file `{path}`")]
    CreateTemp {
        /// The temp file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The blob's source could not be read.
    #[error("failed to read blob content (after {read} bytes)")]
    ReadInput {
        /// Bytes read before the failure.
        read: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The temp file could not be written or synced.
    #[error("failed to write `{path}`")]
    Write {
        /// The temp file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The content does not hash to the expected digest.
    #[error("digest mismatch: expected {expected}, got {actual} ({size} bytes)")]
    Mismatch {
        /// The digest the caller announced.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
        /// Bytes received.
        size: u64,
    },
    /// The verified temp file could not be renamed into place.
    #[error("failed to rename `{from}` to `{to}`")]
    Rename {
        /// The temp file.
        from: PathBuf,
        /// The blob path.
        to: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A blob could not be opened or examined.
    #[error("failed to open blob {digest} at `{path}`")]
    Open {
        /// The blob's digest.
        digest: Digest,
        /// The blob path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The blob directory could not be listed.
    #[error("failed to list `{path}`")]
    List {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A lazy blob's recipe is malformed or does not match the blobs it names.
    #[error("the recipe of blob {digest} at `{path}` is damaged: {reason}")]
    Recipe {
        /// The lazy blob's digest.
        digest: Digest,
        /// The recipe's path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A recipe could not be stored.
    #[error(transparent)]
    StoreRecipe(#[from] crate::paths::PathError),
    /// A blob could not be removed.
    #[error("failed to delete `{path}`")]
    Delete {
        /// The blob path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A blob was larger than the caller allows to read into memory.
    #[error("blob {digest} is {size} bytes, more than the {limit} bytes allowed here")]
    TooLarge {
        /// The blob's digest.
        digest: Digest,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A blob could not be read back.
    #[error("failed to read blob `{path}`")]
    ReadBlob {
        /// The blob path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The blob store under a store root. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ContentStore {
    blobs: PathBuf,
    recipes: PathBuf,
    ingest: PathBuf,
}

/// A blob written and verified in `ingest/` but not yet visible under its digest.
///
/// [`Staged::commit`] renames it into place; dropping it uncommitted removes the temp file.
#[derive(Debug)]
pub struct Staged {
    temp: PathBuf,
    dest: PathBuf,
    digest: Digest,
    size: u64,
    committed: bool,
    /// The temp file's lock (see [`crate::temp`]), held until it is renamed or removed.
    _lock: File,
}

impl Staged {
    /// The digest of the staged content.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The size of the staged content in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The temp file holding the content, for reading it back before committing.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Where the blob will live once committed.
    pub(crate) fn dest(&self) -> &Path {
        &self.dest
    }

    /// Makes the blob visible under its digest (an existing blob with that digest is kept) and
    /// persists the rename.
    pub fn commit(self) -> Result<Digest, ContentError> {
        let dest = self.dest.clone();
        let (digest, renamed) = self.commit_unsynced_dir()?;
        if renamed {
            crate::paths::sync_dir_of(&dest);
        }
        Ok(digest)
    }

    /// [`Staged::commit`] without persisting the rename; returns whether it renamed (false when
    /// the blob was already there), in which case the caller syncs the blob directory.
    pub(crate) fn commit_unsynced_dir(mut self) -> Result<(Digest, bool), ContentError> {
        let renamed = if self.dest.exists() {
            // Same digest, same content: keep the existing file, drop ours.
            let _ = fs::remove_file(&self.temp);
            false
        } else {
            crate::paths::rename(&self.temp, &self.dest).map_err(|e| ContentError::Rename {
                from: self.temp.clone(),
                to: self.dest.clone(),
                source: e.source,
            })?;
            true
        };
        self.committed = true;
        Ok((self.digest, renamed))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// See [`ContentStore::writer`]. Dropped without `finish`, its temp file is removed.
pub struct BlobWriter {
    staged: Staged,
    file: std::io::BufWriter<File>,
    /// `None` for [`ContentStore::prehashed_writer`]: the producer hashes.
    hasher: Option<Sha256>,
    blobs: PathBuf,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("temp", &self.staged.temp)
            .finish()
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buf[..n]);
        }
        self.staged.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter {
    /// Flushes and fsyncs the blob and checks it against `expected` (when given). A prehashed
    /// writer's blob is named by `expected`, which it requires.
    pub fn finish(self, expected: Option<&Digest>) -> Result<Staged, ContentError> {
        let Unsynced { staged, file } = self.finish_unsynced(expected)?;
        sync(&file, &staged.temp)?;
        Ok(staged)
    }

    /// [`BlobWriter::finish`] without the fsync, which the caller hands to a
    /// [`crate::durable::Durable`] writer to do off its critical path.
    pub fn finish_unsynced(self, expected: Option<&Digest>) -> Result<Unsynced, ContentError> {
        let BlobWriter {
            mut staged,
            file,
            hasher,
            blobs,
        } = self;
        let file = file.into_inner().map_err(|e| ContentError::Write {
            path: staged.temp.clone(),
            source: e.into_error(),
        })?;
        let actual = match (hasher, expected) {
            (Some(hasher), _) => Digest(hasher.finalize().into()),
            // A prehashed writer's producer computed the digest over the bytes it wrote.
            (None, Some(expected)) => *expected,
            (None, None) => {
                return Err(ContentError::Write {
                    path: staged.temp.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "a prehashed blob needs its digest",
                    ),
                })
            }
        };
        if let Some(expected) = expected {
            if *expected != actual {
                return Err(ContentError::Mismatch {
                    expected: *expected,
                    actual,
                    size: staged.size,
                });
            }
        }
        staged.digest = actual;
        staged.dest = blobs.join(actual.hex());
        Ok(Unsynced { staged, file })
    }
}

/// A blob written and verified in `ingest/` whose fsync is still to come: only
/// [`Unsynced::sync`] gives the [`Staged`] blob that can be made visible. Dropped, its temp file
/// is removed.
#[derive(Debug)]
pub struct Unsynced {
    staged: Staged,
    file: File,
}

impl Unsynced {
    /// The digest of the content.
    pub fn digest(&self) -> Digest {
        self.staged.digest
    }

    /// The size of the content in bytes.
    pub fn size(&self) -> u64 {
        self.staged.size
    }

    /// Whether a blob with this digest is already in the store (committing then only drops the
    /// temp file, and syncing it is wasted work).
    pub fn already_stored(&self) -> bool {
        self.staged.dest.is_file()
    }

    /// Fsyncs the temp file.
    pub fn sync(self) -> Result<Staged, ContentError> {
        self.fsync()?;
        Ok(self.staged)
    }

    fn fsync(&self) -> Result<(), ContentError> {
        sync(&self.file, &self.staged.temp)
    }

    /// Where the blob will live once committed.
    pub fn dest(&self) -> &Path {
        &self.staged.dest
    }
}

/// Fsyncs `blobs` each on a thread of its own (the first on the caller's, as is one whose
/// thread did not start), results in order.
pub(crate) fn sync_side_by_side(blobs: Vec<Unsynced>) -> Vec<Result<Staged, ContentError>> {
    let synced: Vec<Result<(), ContentError>> = std::thread::scope(|s| {
        let helpers: Vec<_> = blobs
            .iter()
            .skip(1)
            .map(|b| {
                let thread = std::thread::Builder::new()
                    .name("kiln-fsync".into())
                    .spawn_scoped(s, move || b.fsync());
                (b, thread)
            })
            .collect();
        let first = blobs.first().map(Unsynced::fsync);
        first
            .into_iter()
            .chain(helpers.into_iter().map(|(b, thread)| match thread {
                Ok(h) => h.join().unwrap_or_else(|_| b.fsync()),
                Err(_) => b.fsync(),
            }))
            .collect()
    });
    blobs
        .into_iter()
        .zip(synced)
        .map(|(b, r)| r.map(|()| b.staged))
        .collect()
}

fn sync(file: &File, path: &Path) -> Result<(), ContentError> {
    file.sync_all().map_err(|source| ContentError::Write {
        path: path.to_path_buf(),
        source,
    })
}

impl ContentStore {
    /// The content store of the store rooted at `root`, creating its directories.
    pub fn at(root: &Path) -> Result<ContentStore, ContentError> {
        let blobs = root.join("blobs").join("sha256");
        let recipes = root.join("recipes").join("sha256");
        let ingest = root.join("ingest");
        for dir in [&blobs, &recipes, &ingest] {
            fs::create_dir_all(dir).map_err(|source| ContentError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(ContentStore {
            blobs,
            recipes,
            ingest,
        })
    }

    /// Where the blob `digest` lives (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// The directory temp files are written to.
    pub fn ingest_dir(&self) -> &Path {
        &self.ingest
    }

    /// Where the recipe of the lazy blob `digest` lives (whether or not it exists).
    pub fn recipe_path(&self, digest: &Digest) -> PathBuf {
        self.recipes.join(digest.hex())
    }

    /// Whether the blob exists, plain or lazy.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file() || self.recipe_path(digest).is_file()
    }

    /// Whether the blob is stored as a recipe only (no plain file yet).
    pub fn is_lazy(&self, digest: &Digest) -> bool {
        !self.path(digest).is_file() && self.recipe_path(digest).is_file()
    }

    /// The file that stands for the blob on disk: the blob, or the recipe of a lazy one (for
    /// its times). `None` when neither exists.
    pub fn file_of(&self, digest: &Digest) -> Option<PathBuf> {
        [self.path(digest), self.recipe_path(digest)]
            .into_iter()
            .find(|p| p.is_file())
    }

    /// Bytes the blob takes on disk: the file's blocks, or for a lazy blob its recipe's and
    /// its own fragment's (0 when it is gone).
    pub fn disk_usage(&self, digest: &Digest) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let blocks = |p: &Path| fs::symlink_metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
        let path = self.path(digest);
        if path.is_file() {
            return blocks(&path);
        }
        let recipe_path = self.recipe_path(digest);
        let own = match self.recipe(digest) {
            Ok(Some(r)) if r.own_first => r.sources.first().map_or(0, |f| blocks(&self.path(f))),
            _ => 0,
        };
        blocks(&recipe_path) + own
    }

    /// The recipe of the lazy blob `digest`; `None` when it has none.
    pub fn recipe(&self, digest: &Digest) -> Result<Option<Recipe>, ContentError> {
        let path = self.recipe_path(digest);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ContentError::Open {
                    digest: *digest,
                    path,
                    source,
                })
            }
        };
        match Recipe::decode(&bytes) {
            Some(r) => Ok(Some(r)),
            None => Err(ContentError::Recipe {
                digest: *digest,
                path,
                reason: "not a recipe kiln wrote".into(),
            }),
        }
    }

    /// Stores `recipe` as the lazy blob `digest`, durably; nothing when the blob is already
    /// stored plainly. The caller has made its sources durable first and vouches that their
    /// ranges hash to `digest` (a layer writer hashed them as it streamed them); every reader
    /// that writes the blob out checks it again.
    pub fn put_recipe(&self, digest: &Digest, recipe: &Recipe) -> Result<(), ContentError> {
        if self.path(digest).is_file() {
            return Ok(());
        }
        crate::paths::write_atomic_via(&self.ingest, &self.recipe_path(digest), &recipe.encode(), true)?;
        Ok(())
    }

    /// Adds to `live` the sources of every lazy blob in it: what a kept recipe keeps.
    pub fn add_recipe_sources(&self, live: &mut std::collections::BTreeSet<Digest>) {
        let lazy: Vec<Digest> = live.iter().filter(|d| self.is_lazy(d)).copied().collect();
        for d in lazy {
            if let Ok(Some(r)) = self.recipe(&d) {
                live.extend(r.sources);
            }
        }
    }

    /// The blobs the lazy blob `digest` reads from other than its own fragment: kept for it,
    /// counted elsewhere ([`ContentStore::disk_usage`] counts the fragment). Empty for a plain
    /// or missing blob.
    pub fn recipe_sources(&self, digest: &Digest) -> Vec<Digest> {
        if !self.is_lazy(digest) {
            return Vec::new();
        }
        match self.recipe(digest) {
            Ok(Some(r)) => {
                let skip = usize::from(r.own_first);
                r.sources.into_iter().skip(skip).filter(|s| s != digest).collect()
            }
            _ => Vec::new(),
        }
    }

    /// The plain blob's file, open; `None` when there is none (the blob is lazy or missing).
    fn open_plain(&self, digest: &Digest) -> Result<Option<(File, u64)>, ContentError> {
        let path = self.path(digest);
        let err = |source| ContentError::Open {
            digest: *digest,
            path: path.clone(),
            source,
        };
        match File::open(&path) {
            Ok(f) => {
                let size = f.metadata().map_err(err)?.len();
                Ok(Some((f, size)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(err(source)),
        }
    }

    /// The blob's bytes where they are stored: its file, or a lazy blob's sources (nothing is
    /// written).
    pub fn source(&self, digest: &Digest) -> Result<BlobSource, ContentError> {
        if let Some((f, size)) = self.open_plain(digest)? {
            return Ok(BlobSource::plain(*digest, f, size));
        }
        let Some(recipe) = self.recipe(digest)? else {
            return Err(ContentError::Open {
                digest: *digest,
                path: self.path(digest),
                source: std::io::ErrorKind::NotFound.into(),
            });
        };
        let damaged = |reason: String| ContentError::Recipe {
            digest: *digest,
            path: self.recipe_path(digest),
            reason,
        };
        let mut files = Vec::with_capacity(recipe.sources.len());
        for s in &recipe.sources {
            let f = File::open(self.path(s)).map_err(|e| damaged(format!("its source blob {s}: {e}")))?;
            files.push((*s, f));
        }
        BlobSource::of_recipe(&recipe, files).map_err(|e| damaged(e.to_string()))
    }

    /// A reader of the blob's bytes: its file, or for a lazy blob its recipe's sources, checked
    /// against the digest at the end (nothing is written; a push or a cache export streams a
    /// lazy layer through this).
    pub fn reader(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, ContentError> {
        if let Some((f, _)) = self.open_plain(digest)? {
            return Ok(Box::new(std::io::BufReader::with_capacity(BUF_SIZE, f)));
        }
        Ok(Box::new(self.source(digest)?.into_checked_reader(*digest)))
    }

    /// Writes the lazy blob `digest` out as a plain blob (checked against its digest) and drops
    /// its recipe; nothing for a plain blob. Returns the blob's path.
    pub fn materialize(&self, digest: &Digest) -> Result<PathBuf, ContentError> {
        let path = self.path(digest);
        if path.is_file() {
            return Ok(path);
        }
        let source = self.source(digest)?;
        self.write_blob(source.reader(), Some(digest))?;
        drop(source);
        let recipe = self.recipe_path(digest);
        if let Err(e) = fs::remove_file(&recipe) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::debug!(path = %recipe.display(), error = %e, "recipe of a written blob not removed");
            }
        }
        Ok(path)
    }

    /// The blob's size in bytes.
    pub fn size(&self, digest: &Digest) -> Result<u64, ContentError> {
        let path = self.path(digest);
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(source) => match self.recipe(digest) {
                Ok(Some(r)) => Ok(r.size()),
                _ => Err(ContentError::Open {
                    digest: *digest,
                    path,
                    source,
                }),
            },
        }
    }

    /// Opens the blob for reading; a lazy blob is written out first ([`ContentStore::materialize`]).
    pub fn open(&self, digest: &Digest) -> Result<File, ContentError> {
        let path = self.path(digest);
        match File::open(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.recipe_path(digest).is_file() => {
                let path = self.materialize(digest)?;
                File::open(&path).map_err(|source| ContentError::Open {
                    digest: *digest,
                    path,
                    source,
                })
            }
            r => r.map_err(|source| ContentError::Open {
                digest: *digest,
                path,
                source,
            }),
        }
    }

    /// Reads a whole blob into memory, refusing blobs larger than `limit` bytes.
    pub fn read_limited(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, ContentError> {
        let mut file = self.open(digest)?;
        let size = self.size(digest)?;
        if size > limit {
            return Err(ContentError::TooLarge {
                digest: *digest,
                size,
                limit,
            });
        }
        let mut out = Vec::with_capacity(size as usize);
        file.read_to_end(&mut out)
            .map_err(|source| ContentError::ReadBlob {
                path: self.path(digest),
                source,
            })?;
        Ok(out)
    }

    /// Stores `bytes` and returns their digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, ContentError> {
        let digest = Digest::of(bytes);
        if self.contains(&digest) {
            return Ok(digest);
        }
        self.write_blob(bytes, Some(&digest)).map(|(d, _)| d)
    }

    /// [`ContentStore::put_bytes`] for several blobs (an image's config and manifest): all are
    /// written, fsynced side by side (the file system commits them together rather than one
    /// after the other), renamed into place in the given order and the directory synced once.
    pub fn put_all(&self, blobs: &[&[u8]]) -> Result<Vec<Digest>, ContentError> {
        let mut digests = Vec::with_capacity(blobs.len());
        let mut unsynced = Vec::new();
        for bytes in blobs {
            let digest = Digest::of(bytes);
            digests.push(digest);
            if self.contains(&digest) || unsynced.iter().any(|u: &Unsynced| u.digest() == digest) {
                continue;
            }
            let mut writer = self.writer()?;
            writer.write_all(bytes).map_err(|source| ContentError::Write {
                path: writer.staged.temp.clone(),
                source,
            })?;
            unsynced.push(writer.finish_unsynced(Some(&digest))?);
        }
        let mut renamed = None;
        for staged in sync_side_by_side(unsynced) {
            let staged = staged?;
            let dest = staged.dest.clone();
            if staged.commit_unsynced_dir()?.1 {
                renamed = Some(dest);
            }
        }
        if let Some(dest) = renamed {
            crate::paths::sync_dir_of(&dest);
        }
        Ok(digests)
    }

    /// Streams `reader` into the store: through sha256 into a temp file, fsync, verify against
    /// `expected` (when given), rename into place. Returns the digest and size.
    pub fn write_blob(
        &self,
        reader: impl Read,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), ContentError> {
        let staged = self.stage(reader, expected)?;
        let size = staged.size();
        let digest = staged.commit()?;
        Ok((digest, size))
    }

    /// A writer into a new blob: bytes go through sha256 into a temp file in `ingest/`;
    /// [`BlobWriter::finish`] fsyncs and verifies them and returns the [`Staged`] blob. For
    /// producers that write (a layer tar being generated) rather than hand over a reader.
    pub fn writer(&self) -> Result<BlobWriter, ContentError> {
        self.new_writer(true)
    }

    /// A writer for a producer that computes the sha256 of the very bytes it writes (the layer
    /// writer's diff ID): the bytes are not hashed a second time, and [`BlobWriter::finish`]
    /// takes the producer's digest as the blob's, so it must be given one.
    pub fn prehashed_writer(&self) -> Result<BlobWriter, ContentError> {
        self.new_writer(false)
    }

    fn new_writer(&self, hashing: bool) -> Result<BlobWriter, ContentError> {
        let (temp, file) = self.create_temp()?;
        let lock = file.try_clone().map_err(|source| ContentError::CreateTemp {
            path: temp.clone(),
            source,
        })?;
        Ok(BlobWriter {
            staged: Staged {
                temp,
                dest: PathBuf::new(),
                digest: Digest([0; 32]),
                size: 0,
                committed: false,
                _lock: lock,
            },
            file: std::io::BufWriter::with_capacity(BUF_SIZE, file),
            hasher: hashing.then(Sha256::new),
            blobs: self.blobs.clone(),
        })
    }

    /// Like [`ContentStore::write_blob`] but leaves the verified blob in `ingest/` until
    /// [`Staged::commit`], so a multi-blob operation can verify everything before publishing.
    pub fn stage(&self, reader: impl Read, expected: Option<&Digest>) -> Result<Staged, ContentError> {
        self.stage_unsynced(reader, expected)?.sync()
    }

    /// [`ContentStore::stage`] without the fsync, which the caller does (or hands to a
    /// [`crate::durable::Durable`] writer).
    pub fn stage_unsynced(
        &self,
        mut reader: impl Read,
        expected: Option<&Digest>,
    ) -> Result<Unsynced, ContentError> {
        let mut writer = self.writer()?;
        let mut buf = vec![0u8; BUF_SIZE];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ContentError::ReadInput {
                        read: writer.staged.size,
                        source,
                    })
                }
            };
            writer
                .write_all(&buf[..n])
                .map_err(|source| ContentError::Write {
                    path: writer.staged.temp.clone(),
                    source,
                })?;
        }
        writer.finish_unsynced(expected)
    }

    /// A new temp file in `ingest/`, named and locked by this process (see [`crate::temp`]).
    fn create_temp(&self) -> Result<(PathBuf, File), ContentError> {
        loop {
            let path = self.ingest.join(crate::temp::name("", ".tmp"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => {
                    f.lock().map_err(|source| ContentError::CreateTemp {
                        path: path.clone(),
                        source,
                    })?;
                    return Ok((path, f));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(ContentError::CreateTemp { path, source }),
            }
        }
    }

    /// Every blob in the store, plain or lazy, sorted. Files whose names are not sha256 hex
    /// are skipped (and reported by `verify`).
    pub fn list(&self) -> Result<Vec<Digest>, ContentError> {
        let mut out = Vec::new();
        for dir in [&self.blobs, &self.recipes] {
            let entries = match fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir == &self.recipes => continue,
                Err(source) => {
                    return Err(ContentError::List {
                        path: dir.clone(),
                        source,
                    })
                }
            };
            for entry in entries {
                let entry = entry.map_err(|source| ContentError::List {
                    path: dir.clone(),
                    source,
                })?;
                let name = entry.file_name();
                if let Some(d) = name
                    .to_str()
                    .and_then(|n| Digest::parse(&format!("sha256:{n}")).ok())
                {
                    out.push(d);
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Removes a blob, and its recipe if it has one; removing a missing blob is not an error.
    pub fn delete(&self, digest: &Digest) -> Result<(), ContentError> {
        for path in [self.path(digest), self.recipe_path(digest)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(ContentError::Delete { path, source }),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_writer_verifies_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::at(dir.path()).unwrap();
        let mut w = cs.writer().unwrap();
        w.write_all(b"layer ").unwrap();
        w.write_all(b"bytes").unwrap();
        let staged = w.finish(Some(&Digest::of(b"layer bytes"))).unwrap();
        assert_eq!(staged.size(), 11);
        assert!(!cs.contains(&staged.digest()), "not visible before commit");
        let d = staged.commit().unwrap();
        assert_eq!(cs.read_limited(&d, 100).unwrap(), b"layer bytes");
        // A wrong expected digest fails and leaves no temp file behind.
        let mut w = cs.writer().unwrap();
        w.write_all(b"other").unwrap();
        assert!(matches!(w.finish(Some(&d)), Err(ContentError::Mismatch { .. })));
        assert_eq!(std::fs::read_dir(cs.ingest_dir()).unwrap().count(), 0);
    }

    #[test]
    fn prehashed_writer_is_named_by_the_producers_digest() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::at(dir.path()).unwrap();
        let mut w = cs.prehashed_writer().unwrap();
        w.write_all(b"tar bytes").unwrap();
        let d = w
            .finish(Some(&Digest::of(b"tar bytes")))
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(cs.read_limited(&d, 100).unwrap(), b"tar bytes");
        // Without a digest there is no name: refused, nothing left behind.
        let mut w = cs.prehashed_writer().unwrap();
        w.write_all(b"x").unwrap();
        assert!(matches!(w.finish(None), Err(ContentError::Write { .. })));
        assert_eq!(std::fs::read_dir(cs.ingest_dir()).unwrap().count(), 0);
    }

    #[test]
    fn write_verify_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::at(dir.path()).unwrap();
        let d = cs.put_bytes(b"hello").unwrap();
        assert_eq!(d, Digest::of(b"hello"));
        assert!(cs.contains(&d));
        assert_eq!(cs.size(&d).unwrap(), 5);
        assert_eq!(cs.read_limited(&d, 10).unwrap(), b"hello");
        assert!(matches!(
            cs.read_limited(&d, 2),
            Err(ContentError::TooLarge { .. })
        ));
        assert_eq!(cs.list().unwrap(), vec![d]);
        cs.delete(&d).unwrap();
        assert!(!cs.contains(&d));
        cs.delete(&d).unwrap();
    }

    #[test]
    fn mismatch_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::at(dir.path()).unwrap();
        let wrong = Digest::of(b"other");
        let err = cs.write_blob(&b"hello"[..], Some(&wrong)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&wrong.to_string()) && msg.contains(&Digest::of(b"hello").to_string()),
            "{msg}"
        );
        assert!(cs.list().unwrap().is_empty());
        assert_eq!(fs::read_dir(cs.ingest_dir()).unwrap().count(), 0);
    }

    /// "ab" + base[3..7] + "c": a lazy blob over a fragment and a base blob.
    fn lazy_blob(cs: &ContentStore) -> (Digest, Digest, Digest) {
        let base = cs.put_bytes(b"0123456789").unwrap();
        let fragment = cs.put_bytes(b"abc").unwrap();
        let mut recipe = Recipe {
            sources: vec![fragment],
            own_first: true,
            ..Default::default()
        };
        recipe.push(fragment, 0, 2);
        recipe.push(base, 3, 4);
        recipe.push(fragment, 2, 1);
        let digest = Digest::of(b"ab3456c");
        cs.put_recipe(&digest, &recipe).unwrap();
        (digest, fragment, base)
    }

    #[test]
    fn a_lazy_blob_is_stored_read_in_place_and_written_out_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::at(dir.path()).unwrap();
        let (d, fragment, base) = lazy_blob(&cs);
        assert!(cs.contains(&d) && cs.is_lazy(&d));
        assert_eq!(cs.size(&d).unwrap(), 7);
        assert_eq!(cs.list().unwrap().len(), 3);
        assert_eq!(cs.file_of(&d), Some(cs.recipe_path(&d)));
        let mut bytes = Vec::new();
        cs.source(&d).unwrap().reader().read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes, b"ab3456c");
        assert!(!cs.path(&d).exists(), "reading in place writes nothing");
        // What keeps it keeps its sources.
        let mut live: std::collections::BTreeSet<Digest> = [d].into();
        cs.add_recipe_sources(&mut live);
        assert_eq!(live, [d, fragment, base].into());
        assert!(cs.disk_usage(&d) > 0);
        // Opening it writes it out, checked, and drops the recipe.
        assert_eq!(cs.read_limited(&d, 100).unwrap(), b"ab3456c");
        assert!(cs.path(&d).is_file() && !cs.is_lazy(&d) && !cs.recipe_path(&d).exists());
        assert_eq!(cs.list().unwrap().len(), 3);
        // A recipe for a blob stored plainly is not kept.
        let (again, _, _) = lazy_blob(&cs);
        assert_eq!(again, d);
        assert!(!cs.recipe_path(&d).exists());
    }

    #[test]
    fn a_damaged_recipe_fails_with_its_name_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::at(dir.path()).unwrap();
        // Bytes that do not hash to the name: refused when written out, the store untouched.
        let (d, _, base) = lazy_blob(&cs);
        let wrong = Digest::of(b"not these bytes");
        fs::rename(cs.recipe_path(&d), cs.recipe_path(&wrong)).unwrap();
        let err = cs.open(&wrong).unwrap_err().to_string();
        assert!(err.contains(&wrong.to_string()), "{err}");
        assert!(!cs.path(&wrong).exists() && cs.is_lazy(&wrong));
        assert_eq!(fs::read_dir(cs.ingest_dir()).unwrap().count(), 0);
        // A source gone: the error names the recipe and the source.
        cs.delete(&base).unwrap();
        let err = cs.source(&wrong).unwrap_err().to_string();
        assert!(err.contains("recipe") && err.contains(&base.to_string()), "{err}");
        // Not a recipe at all.
        fs::write(cs.recipe_path(&wrong), b"garbage").unwrap();
        let err = cs.size(&wrong).unwrap_err().to_string();
        assert!(err.contains(&wrong.to_string()), "{err}");
        assert!(cs.recipe(&wrong).unwrap_err().to_string().contains("damaged"));
        // Deleting removes the recipe.
        cs.delete(&wrong).unwrap();
        assert!(!cs.contains(&wrong));
    }

    #[test]
    fn put_all_stores_each_blob_once_and_returns_the_digests_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::at(dir.path()).unwrap();
        let already = store.put_bytes(b"already").unwrap();
        let got = store
            .put_all(&[b"config", b"manifest", b"config", b"already"])
            .unwrap();
        assert_eq!(
            got,
            vec![
                Digest::of(b"config"),
                Digest::of(b"manifest"),
                Digest::of(b"config"),
                already
            ]
        );
        for (d, bytes) in [(got[0], &b"config"[..]), (got[1], &b"manifest"[..])] {
            assert_eq!(fs::read(store.path(&d)).unwrap(), bytes);
        }
        // No temp file is left behind.
        assert_eq!(fs::read_dir(store.ingest_dir()).unwrap().count(), 0);
    }

    #[test]
    fn staged_blob_is_invisible_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::at(dir.path()).unwrap();
        let staged = cs.stage(&b"abc"[..], None).unwrap();
        let d = staged.digest();
        assert!(!cs.contains(&d));
        assert_eq!(fs::read(staged.temp_path()).unwrap(), b"abc");
        drop(staged);
        assert!(!cs.contains(&d));
        assert_eq!(fs::read_dir(cs.ingest_dir()).unwrap().count(), 0);
        let staged = cs.stage(&b"abc"[..], Some(&d)).unwrap();
        staged.commit().unwrap();
        assert!(cs.contains(&d));
    }
}
