//! Snapshots: unpacked layers as directories usable as overlayfs lower dirs.
//!
//! Layout under the snapshots dir `DIR`:
//!
//! | path | what |
//! |---|---|
//! | `DIR/<hex>/fs` | a committed snapshot's tree, in overlay form (whiteouts are 0/0 char devices, opaque dirs carry `trusted.overlay.opaque=y`) |
//! | `DIR/<hex>/meta.json` | `{"parent": key or null, "diff_id": digest, "size": bytes, "unsynced_boot": boot ID}` |
//! | `DIR/<hex>/<name>.att` | an attachment: opaque bytes its producer wrote with the snapshot (the build engine's file index) |
//! | `DIR/tmp/<name>` | work in progress: an unpack, or a mutable snapshot's `upper` and `work` |
//! | `DIR/locks/<hex>.lock` | per-key lock serialising unpacks of the same key |
//! | `DIR/retired/<boot>-<name>` | a stale snapshot replaced in boot `<boot>` |
//! | `DIR/flat/<hex>/` | a flattened view of a stack of snapshots (see `flat`: one lower dir in place of many) |
//!
//! `<hex>` is the key's sha256 hex: a chain ID for image layers, or any key the build engine
//! chooses for its results.
//!
//! A snapshot with a `parent` is its tree over the parent's, as overlayfs stacks them
//! ([`Snapshots::lower_dirs`]: its `fs` first). Image layers are unpacked without one; the
//! build engine stacks an edited copy's result (its changed files) on the earlier result.
//!
//! Architecture invariant: a committed snapshot appears by one `rename(2)` of a complete directory,
//! so `DIR/<hex>` either does not exist or is whole; a committed snapshot is never modified. A
//! committed mutable snapshot (a build step's result, whose overlay was mounted `volatile`) was
//! never synced: it records the boot it was made in, and in any other boot it counts as absent
//! (a crash may have lost its files) and is made again from its layer blob, which is durable.
//! The stale one is moved to `DIR/retired/<boot>-<name>`, not removed, since a container started
//! in this boot may run on it; [`Snapshots::cleanup_stale_tmp`] removes those of earlier boots.
//!
//! Every `DIR/tmp` entry is held by an `flock` of its owner while in use, which is how
//! [`Snapshots::cleanup_stale_tmp`] tells a killed process's leftovers from live work.

use std::fs::{self, File, TryLockError};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_dag::Digest;
use serde::{Deserialize, Serialize};

use crate::layer::{self, ApplyError, ApplyOptions, WhiteoutMode};

mod arriving;
mod flat;
pub use arriving::ArrivingLayer;
pub use flat::{flatten_after_from_env, DEFAULT_FLATTEN_AFTER};

/// Errors of the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A directory could not be created.
    #[error("failed to create directory `{path}`")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A lock could not be taken.
    #[error("failed to lock `{path}`")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A directory could not be listed.
    #[error("failed to list `{path}`")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Applying the layer tar failed.
    #[error("failed to unpack snapshot {key}")]
    Apply {
        key: Digest,
        #[source]
        source: ApplyError,
    },
    /// The layer's sha256 is not the expected diff ID.
    #[error("snapshot {key}: layer diff ID is {actual}, expected {expected}")]
    DiffIdMismatch {
        key: Digest,
        expected: Digest,
        actual: Digest,
    },
    /// `meta.json` could not be written.
    #[error("failed to write `{path}`")]
    WriteMeta {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A rename failed.
    #[error("failed to rename `{from}` to `{to}`")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A directory could not be removed.
    #[error("failed to remove `{path}`")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A snapshot (or a parent in its chain) does not exist.
    #[error("snapshot {key} does not exist")]
    Missing { key: Digest },
    /// Making a flattened view failed.
    #[error("failed to flatten layers at `{path}`")]
    Flatten {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The parent chain is longer than any overlay stack can be (or loops).
    #[error("snapshot {key}: parent chain is longer than {limit}")]
    ChainTooDeep { key: Digest, limit: usize },
}

type Result<T, E = SnapshotError> = std::result::Result<T, E>;

/// Longest parent chain followed (the kernel stacks at most 500 lower dirs).
const MAX_CHAIN: usize = 4096;

/// The snapshot store under one directory.
#[derive(Clone, Debug)]
pub struct Snapshots {
    dir: PathBuf,
}

/// A committed, immutable snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The key it was committed under.
    pub key: Digest,
    /// Its tree (`DIR/<hex>/fs`), an overlayfs lower dir.
    pub path: PathBuf,
    /// The snapshot below it, if any.
    pub parent: Option<Digest>,
    /// Digest of the uncompressed layer tar it holds.
    pub diff_id: Digest,
    /// Size of that layer tar in bytes.
    pub size: u64,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    parent: Option<Digest>,
    diff_id: Digest,
    size: u64,
    /// The boot ID of the boot that made the snapshot without syncing it; it is valid in no
    /// other boot (a crash may have lost its files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unsynced_boot: Option<String>,
}

impl Meta {
    fn valid(&self) -> bool {
        match &self.unsynced_boot {
            None => true,
            Some(made) => boot_id() == Some(made.as_str()),
        }
    }
}

/// This boot's ID (`/proc/sys/kernel/random/boot_id`), if the kernel tells.
fn boot_id() -> Option<&'static str> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

/// A snapshot directory as [`Snapshots::dirs`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotDir {
    /// Its key.
    pub key: Digest,
    /// Its parent, as its `meta.json` says.
    pub parent: Option<Digest>,
    /// Whether it is a usable snapshot in this boot ([`Snapshots::get`] finds it).
    pub valid: bool,
    /// Whether its `meta.json` could be read at all.
    pub readable: bool,
    /// `DIR/<hex>`.
    pub path: PathBuf,
}

/// A writable snapshot: an overlayfs `upper` and `work` dir over a parent's lower dirs. Dropping
/// it uncommitted removes it.
#[derive(Debug)]
pub struct MutableSnapshot {
    root: PathBuf,
    store: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    parent: Option<Digest>,
    lowers: Vec<PathBuf>,
    /// Held while the snapshot lives, marks `root` as in use.
    lock: Option<File>,
}

/// A name for a temp of this process (see [`crate::temp`]).
fn unique_name() -> String {
    crate::temp::name("", "")
}

fn create_dir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(source) => Err(SnapshotError::CreateDir {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn remove(path: &Path) -> Result<()> {
    layer::remove_tree(path).map_err(|source| SnapshotError::Remove {
        path: path.to_path_buf(),
        source,
    })
}

/// Moves the directory `from` whole to `to` (a rename on one file system).
fn move_dir(from: &Path, to: &Path) -> Result<()> {
    #[allow(
        clippy::disallowed_methods,
        reason = "a directory moved whole: write_atomic is for files"
    )]
    fs::rename(from, to).map_err(|source| SnapshotError::Rename {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    })
}

/// A directory [`MutableSnapshot::commit_leaving_work`] moved aside: removed by
/// [`Leftover::remove`], or when dropped (a failure then only logged).
#[derive(Debug)]
pub struct Leftover(PathBuf);

impl Leftover {
    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Removes it now.
    pub fn remove(mut self) -> Result<()> {
        remove(&std::mem::take(&mut self.0))
    }
}

impl Drop for Leftover {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            if let Err(e) = remove(&self.0) {
                tracing::warn!(error = %e, "failed to remove a leftover work dir");
            }
        }
    }
}

/// Whether a rename failed because the target directory already exists (someone else committed).
fn target_taken(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST))
}

#[allow(
    clippy::disallowed_methods,
    reason = "meta.json of a temp dir that is published whole by a directory rename"
)]
fn write_meta(dir: &Path, meta: &Meta) -> Result<()> {
    let path = dir.join("meta.json");
    let bytes = serde_json::to_vec(meta).map_err(|e| SnapshotError::WriteMeta {
        path: path.clone(),
        source: e.into(),
    })?;
    fs::write(&path, bytes).map_err(|source| SnapshotError::WriteMeta { path, source })
}

impl Snapshots {
    /// Opens (creating as needed) the snapshot store in `dir`.
    pub fn open(dir: &Path) -> Result<Snapshots> {
        fs::create_dir_all(dir).map_err(|source| SnapshotError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        create_dir(&dir.join("tmp"))?;
        create_dir(&dir.join("locks"))?;
        // Each mutable snapshot is a tree of its own (a COPY may fill it with thousands of
        // files): let ext4 place it away from its churned parent (see `store::spread_children`).
        crate::store::spread_children(&dir.join("tmp"));
        Ok(Snapshots {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory holding the snapshots.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn tmp(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Creates a locked directory under `DIR/tmp`. It is created under a `.new-` name, locked, then
    /// renamed, so [`Snapshots::cleanup_stale_tmp`] never sees it unlocked.
    pub(crate) fn new_temp(&self) -> Result<(PathBuf, File)> {
        let name = unique_name();
        let staging = self.tmp().join(format!(".new-{name}"));
        create_dir(&staging)?;
        let lock = File::open(&staging).map_err(|source| SnapshotError::Lock {
            path: staging.clone(),
            source,
        })?;
        lock.lock().map_err(|source| SnapshotError::Lock {
            path: staging.clone(),
            source,
        })?;
        let path = self.tmp().join(name);
        move_dir(&staging, &path)?;
        Ok((path, lock))
    }

    fn snapshot_dir(&self, key: &Digest) -> PathBuf {
        self.dir.join(key.hex())
    }

    /// The `meta.json` of snapshot `key`, if it is readable and valid in this boot.
    fn meta(&self, key: &Digest) -> Option<Meta> {
        let bytes = fs::read(self.snapshot_dir(key).join("meta.json")).ok()?;
        let meta: Meta = serde_json::from_slice(&bytes).ok()?;
        meta.valid().then_some(meta)
    }

    /// The committed snapshot `key`, if there is one.
    ///
    /// A snapshot whose parent chain is broken (a parent gone, or not valid in this boot)
    /// counts as absent: its tree is not whole without them, and [`Snapshots::unpack`] makes
    /// it again from its layer.
    pub fn get(&self, key: &Digest) -> Option<Snapshot> {
        let meta = self.meta(key)?;
        if let Some(p) = &meta.parent {
            self.lower_dirs(p).ok()?;
        }
        let dir = self.snapshot_dir(key);
        Some(Snapshot {
            key: *key,
            path: dir.join("fs"),
            parent: meta.parent,
            diff_id: meta.diff_id,
            size: meta.size,
        })
    }

    /// The attachment `name` written with the committed snapshot `key`, if both exist.
    pub fn attachment(&self, key: &Digest, name: &str) -> Option<Vec<u8>> {
        if !valid_attachment_name(name) {
            return None;
        }
        fs::read(self.snapshot_dir(key).join(format!("{name}.att"))).ok()
    }

    /// Where the attachment `name` of the committed snapshot `key` is, if it exists.
    pub fn attachment_path(&self, key: &Digest, name: &str) -> Option<PathBuf> {
        let path = self.snapshot_dir(key).join(format!("{name}.att"));
        (valid_attachment_name(name) && path.is_file()).then_some(path)
    }

    /// The snapshots below `key`, nearest first, as far as their records can be read (a stacked
    /// snapshot's tree is its own over these: whatever keeps or counts it keeps or counts them).
    pub fn parents(&self, key: &Digest) -> Vec<Digest> {
        let mut out: Vec<Digest> = Vec::new();
        let mut next = self.meta(key).and_then(|m| m.parent);
        while let Some(k) = next {
            if out.len() >= MAX_CHAIN || out.contains(&k) {
                break;
            }
            out.push(k);
            next = self.meta(&k).and_then(|m| m.parent);
        }
        out
    }

    /// The fs dirs of `key` and all its ancestors, top first (the order of overlayfs' `lowerdir`).
    pub fn lower_dirs(&self, key: &Digest) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut next = Some(*key);
        while let Some(k) = next {
            if out.len() >= MAX_CHAIN {
                return Err(SnapshotError::ChainTooDeep {
                    key: *key,
                    limit: MAX_CHAIN,
                });
            }
            // Each level's record read once: a present, valid meta at every level is what
            // `get` asks of a chain too.
            let meta = self.meta(&k).ok_or(SnapshotError::Missing { key: k })?;
            out.push(self.snapshot_dir(&k).join("fs"));
            next = meta.parent;
        }
        Ok(out)
    }

    /// Unpacks an uncompressed layer tar as snapshot `key` on top of `parent`, verifying its diff
    /// ID when given. Whiteouts are stored in overlay form. If `key` exists already (or another
    /// process commits it first) that snapshot is returned and the reader is left unread or
    /// its work discarded.
    pub fn unpack<R: io::Read>(
        &self,
        key: &Digest,
        parent: Option<&Digest>,
        layer_reader: R,
        diff_id: Option<&Digest>,
    ) -> Result<Snapshot> {
        let key = *key;
        if let Some(existing) = self.get(&key) {
            return Ok(existing);
        }
        if let Some(p) = parent {
            if self.get(p).is_none() {
                return Err(SnapshotError::Missing { key: *p });
            }
        }
        let lock_path = self.dir.join("locks").join(format!("{}.lock", key.hex()));
        let key_lock = File::create(&lock_path).map_err(|source| SnapshotError::Lock {
            path: lock_path.clone(),
            source,
        })?;
        key_lock.lock().map_err(|source| SnapshotError::Lock {
            path: lock_path.clone(),
            source,
        })?;
        if let Some(existing) = self.get(&key) {
            return Ok(existing);
        }
        let (tmp, tmp_lock) = self.new_temp()?;
        let result = self.unpack_into(&tmp, key, parent, layer_reader, diff_id);
        let result = result.and_then(|meta| self.publish(&tmp, key, meta));
        if tmp.exists() {
            // Failed, or lost the race: our copy goes.
            match (&result, remove(&tmp)) {
                (Ok(_), Err(e)) => return Err(e),
                (Err(_), Err(e)) => tracing::warn!(error = %e, "failed to remove a failed unpack"),
                _ => {}
            }
        }
        drop(tmp_lock);
        drop(key_lock);
        result
    }

    fn unpack_into<R: io::Read>(
        &self,
        tmp: &Path,
        key: Digest,
        parent: Option<&Digest>,
        reader: R,
        diff_id: Option<&Digest>,
    ) -> Result<Meta> {
        let fs_dir = tmp.join("fs");
        create_dir(&fs_dir)?;
        let root_owned = fs::metadata(&fs_dir).map(|m| m.uid() == 0).unwrap_or(false);
        // A bottom layer's whiteouts hide nothing: applied as deletions into the empty dir they
        // vanish, so a one-layer view read without an overlay shows what the merged view shows
        // (no 0:0 devices for a COPY --from to trip over). The bottom layer is the one whose
        // chain ID (the key) is its diff ID; callers do not always name the parent.
        let whiteouts = if parent.is_none() && diff_id == Some(&key) {
            WhiteoutMode::Delete
        } else {
            WhiteoutMode::Overlay
        };
        let opts = ApplyOptions {
            whiteouts,
            archive_name: format!("layer {}", diff_id.unwrap_or(&key)),
            same_owner: root_owned,
            ..ApplyOptions::default()
        };
        let stats =
            layer::apply(reader, &fs_dir, &opts).map_err(|source| SnapshotError::Apply { key, source })?;
        if let Some(expected) = diff_id {
            if stats.diff_id != *expected {
                return Err(SnapshotError::DiffIdMismatch {
                    key,
                    expected: *expected,
                    actual: stats.diff_id,
                });
            }
        }
        let meta = Meta {
            parent: parent.copied(),
            diff_id: stats.diff_id,
            size: stats.size,
            unsynced_boot: None,
        };
        write_meta(tmp, &meta)?;
        Ok(meta)
    }

    /// Renames a complete temp dir to `DIR/<hex>`; when another process won, returns theirs.
    fn publish(&self, tmp: &Path, key: Digest, meta: Meta) -> Result<Snapshot> {
        let target = self.snapshot_dir(&key);
        let mut replaced_stale = false;
        loop {
            #[allow(
                clippy::disallowed_methods,
                reason = "a snapshot directory published whole: write_atomic is for files"
            )]
            match fs::rename(tmp, &target) {
                Ok(()) => {
                    return Ok(Snapshot {
                        key,
                        path: target.join("fs"),
                        parent: meta.parent,
                        diff_id: meta.diff_id,
                        size: meta.size,
                    })
                }
                Err(e) if target_taken(&e) => {
                    if let Some(theirs) = self.get(&key) {
                        return Ok(theirs);
                    }
                    if replaced_stale {
                        return Err(SnapshotError::Missing { key });
                    }
                    // A snapshot of an earlier boot that was never synced: move it aside (a
                    // racing publisher may have done so already) and take its place. A
                    // container of this boot may have it mounted as a lower dir, which a rename
                    // leaves working: it is removed only in a later boot.
                    replaced_stale = true;
                    let retired = self.retired();
                    create_dir(&retired)?;
                    let boot = boot_id().unwrap_or("unknown");
                    #[allow(
                        clippy::disallowed_methods,
                        reason = "an unsynced snapshot directory moved aside whole"
                    )]
                    let _ = fs::rename(&target, retired.join(format!("{boot}-{}", unique_name())));
                }
                Err(source) => {
                    return Err(SnapshotError::Rename {
                        from: tmp.to_path_buf(),
                        to: target,
                        source,
                    })
                }
            }
        }
    }

    /// A new writable snapshot over `parent` (or over nothing), its `upper` and `work` dirs on the
    /// same file system as the committed snapshots.
    pub fn prepare(&self, parent: Option<&Digest>) -> Result<MutableSnapshot> {
        let lowers = match parent {
            Some(p) => self.lower_dirs(p)?,
            None => Vec::new(),
        };
        let (root, lock) = self.new_temp()?;
        let snapshot = MutableSnapshot {
            upper: root.join("upper"),
            work: root.join("work"),
            root,
            store: self.dir.clone(),
            parent: parent.copied(),
            lowers,
            lock: Some(lock),
        };
        create_dir(&snapshot.upper)?;
        create_dir(&snapshot.work)?;
        Ok(snapshot)
    }

    /// Every committed snapshot, sorted by key.
    pub fn list(&self) -> Result<Vec<Snapshot>> {
        let read_dir = fs::read_dir(&self.dir).map_err(|source| SnapshotError::ReadDir {
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in read_dir {
            let entry = entry.map_err(|source| SnapshotError::ReadDir {
                path: self.dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(key) = Digest::parse(&format!("sha256:{name}")) else {
                continue;
            };
            if let Some(snap) = self.get(&key) {
                out.push(snap);
            }
        }
        out.sort_by_key(|s| s.key);
        Ok(out)
    }

    /// Removes a committed snapshot (its children, if any, become unusable: the caller removes
    /// from the top down). `false` when there was none.
    pub fn remove(&self, key: &Digest) -> Result<bool> {
        let dir = self.snapshot_dir(key);
        let lock = match File::open(&dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(SnapshotError::Lock { path: dir, source }),
        };
        lock.lock().map_err(|source| SnapshotError::Lock {
            path: dir.clone(),
            source,
        })?;
        let doomed = self.tmp().join(format!(".rm-{}", unique_name()));
        #[allow(
            clippy::disallowed_methods,
            reason = "a snapshot directory claimed for removal"
        )]
        match fs::rename(&dir, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(SnapshotError::Rename {
                    from: dir,
                    to: doomed,
                    source,
                })
            }
        }
        remove(&doomed)?;
        Ok(true)
    }

    fn retired(&self) -> PathBuf {
        self.dir.join("retired")
    }

    /// Every snapshot directory `DIR/<hex>`, valid in this boot or not (a snapshot of an
    /// earlier boot that was never synced still takes space), sorted by key.
    pub fn dirs(&self) -> Result<Vec<SnapshotDir>> {
        let read_dir = fs::read_dir(&self.dir).map_err(|source| SnapshotError::ReadDir {
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in read_dir.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(key) = Digest::parse(&format!("sha256:{name}")) else {
                continue;
            };
            let path = entry.path();
            let meta: Option<Meta> = fs::read(path.join("meta.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            out.push(SnapshotDir {
                key,
                parent: meta.as_ref().and_then(|m| m.parent),
                valid: meta.as_ref().is_some_and(Meta::valid),
                readable: meta.is_some(),
                path,
            });
        }
        out.sort_by_key(|s| s.key);
        Ok(out)
    }

    /// Bytes the snapshot `key` takes on disk ([`crate::temp::disk_usage`] of its directory).
    /// A committed snapshot never changes, so the figure is computed once and kept in
    /// `DIR/<hex>/du`. 0 when there is no such snapshot.
    pub fn disk_usage(&self, key: &Digest) -> u64 {
        let dir = self.snapshot_dir(key);
        let cached = dir.join("du");
        if let Some(n) = fs::read_to_string(&cached)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return n;
        }
        if !dir.join("meta.json").is_file() {
            return crate::temp::disk_usage(&dir);
        }
        let n = crate::temp::disk_usage(&dir);
        let _ = crate::paths::write_atomic(&cached, n.to_string().as_bytes(), false);
        n
    }

    /// Removes the per-key unpack lock files of keys that have no snapshot (the caller holds the
    /// garbage-collection lock, so no unpack runs). Returns how many.
    pub fn remove_unused_locks(&self) -> usize {
        let Ok(rd) = fs::read_dir(self.dir.join("locks")) else {
            return 0;
        };
        let mut removed = 0;
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".lock")) else {
                continue;
            };
            if self.dir.join(hex).exists() {
                continue;
            }
            let Ok(f) = File::open(entry.path()) else { continue };
            if f.try_lock().is_ok() && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Removes retired snapshots: those of earlier boots, and with `this_boot_too` (no
    /// container exists that could run on one) those of this boot. Returns the bytes freed.
    pub fn remove_retired(&self, this_boot_too: bool) -> Result<u64> {
        let mut bytes = 0;
        let Ok(read_dir) = fs::read_dir(self.retired()) else {
            return Ok(0);
        };
        let this_boot = boot_id().map(|b| format!("{b}-"));
        for entry in read_dir.flatten() {
            let name = entry.file_name();
            let current = this_boot
                .as_deref()
                .is_some_and(|p| name.as_encoded_bytes().starts_with(p.as_bytes()));
            if !current || this_boot_too {
                bytes += crate::temp::disk_usage(&entry.path());
                remove(&entry.path())?;
            }
        }
        Ok(bytes)
    }

    /// Removes temp dirs left behind by killed processes (those whose owner's lock is no longer
    /// held) and the stale snapshots retired in earlier boots. Returns how many were removed.
    pub fn cleanup_stale_tmp(&self) -> Result<usize> {
        let mut removed = 0;
        if let Ok(read_dir) = fs::read_dir(self.retired()) {
            let this_boot = boot_id().map(|b| format!("{b}-"));
            for entry in read_dir.flatten() {
                let name = entry.file_name();
                let current = this_boot
                    .as_deref()
                    .is_some_and(|p| name.as_encoded_bytes().starts_with(p.as_bytes()));
                if !current {
                    remove(&entry.path())?;
                    removed += 1;
                }
            }
        }
        let tmp = self.tmp();
        let read_dir = fs::read_dir(&tmp).map_err(|source| SnapshotError::ReadDir {
            path: tmp.clone(),
            source,
        })?;
        for entry in read_dir {
            let entry = entry.map_err(|source| SnapshotError::ReadDir {
                path: tmp.clone(),
                source,
            })?;
            let path = entry.path();
            let name = entry.file_name();
            // A live entry is locked by its owner, or (between its creation and its lock) named
            // after an owner that still runs.
            if crate::temp::classify(&path, &name.to_string_lossy()) == crate::temp::State::Live {
                continue;
            }
            let Ok(handle) = File::open(&path) else { continue };
            match handle.try_lock() {
                Ok(()) => {
                    remove(&path)?;
                    removed += 1;
                }
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(source)) => return Err(SnapshotError::Lock { path, source }),
            }
        }
        Ok(removed)
    }
}

/// Attachment names are short lowercase words, so they can never name `fs` or `meta.json`.
fn valid_attachment_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 32 && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
}

impl MutableSnapshot {
    /// Stores `bytes` as the attachment `name`, committed (and removed) with the snapshot.
    #[allow(
        clippy::disallowed_methods,
        reason = "an attachment inside a mutable snapshot, committed with it by a directory rename"
    )]
    pub fn attach(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.root.join(format!("{name}.att"));
        if !valid_attachment_name(name) {
            return Err(SnapshotError::WriteMeta {
                path,
                source: io::Error::new(io::ErrorKind::InvalidInput, "invalid attachment name"),
            });
        }
        fs::write(&path, bytes).map_err(|source| SnapshotError::WriteMeta { path, source })
    }

    /// The overlayfs upper dir.
    pub fn upper(&self) -> &Path {
        &self.upper
    }

    /// The overlayfs work dir.
    pub fn work(&self) -> &Path {
        &self.work
    }

    /// The snapshot this one is over.
    pub fn parent(&self) -> Option<&Digest> {
        self.parent.as_ref()
    }

    /// The lower dirs for the overlay mount, top first (empty without a parent).
    pub fn lower_dirs(&self) -> &[PathBuf] {
        &self.lowers
    }

    /// Commits this snapshot over `parent` rather than the parent it was prepared with: its
    /// upper dir then holds what the tree adds to `parent`'s (the build engine's edited copy:
    /// the changed files over the earlier result, see [`Snapshots::lower_dirs`]). Fails when
    /// `parent` (or a snapshot below it) is missing.
    pub fn stack_on(&mut self, parent: &Digest) -> Result<()> {
        let store = Snapshots {
            dir: self.store.clone(),
        };
        self.lowers = store.lower_dirs(parent)?;
        self.parent = Some(*parent);
        Ok(())
    }

    /// Commits the upper dir as the immutable snapshot `key` (`diff_id` and `size` describe the
    /// layer tar the caller wrote from it). The overlay must be unmounted. If `key` was committed
    /// meanwhile by someone else, this one is discarded and theirs returned.
    pub fn commit(self, key: &Digest, diff_id: &Digest, size: u64) -> Result<Snapshot> {
        let (snapshot, work) = self.commit_leaving_work(key, diff_id, size)?;
        work.remove()?;
        Ok(snapshot)
    }

    /// [`MutableSnapshot::commit`], but the overlay's work dir is moved aside instead of
    /// removed, and returned for the caller to remove when it suits (on another thread: its
    /// few directories can take milliseconds each to remove on a filesystem mounted with
    /// `discard`). A process killed before leaves it as a stale temp
    /// of its own, which the next command removes.
    pub fn commit_leaving_work(
        mut self,
        key: &Digest,
        diff_id: &Digest,
        size: u64,
    ) -> Result<(Snapshot, Leftover)> {
        let (key, diff_id) = (*key, *diff_id);
        move_dir(&self.upper, &self.root.join("fs"))?;
        let store = Snapshots {
            dir: self.store.clone(),
        };
        let aside = store.tmp().join(crate::temp::name(".rm-", ""));
        move_dir(&self.work, &aside)?;
        let aside = Leftover(aside);
        let meta = Meta {
            parent: self.parent,
            diff_id,
            size,
            unsynced_boot: boot_id().map(str::to_string),
        };
        let published = write_meta(&self.root, &meta).and_then(|()| store.publish(&self.root, key, meta));
        if published.is_ok() && !self.root.exists() {
            self.lock = None;
        }
        // Drop removes `root` if it is still there (lost the race, or failed).
        // A failure drops (removes) the work dir moved aside.
        published.map(|snapshot| (snapshot, aside))
    }

    /// Removes the mutable snapshot (a failure is logged: what is left is a stale temp dir that
    /// [`Snapshots::cleanup_stale_tmp`] removes later).
    pub fn discard(self) {
        drop(self);
    }
}

impl Drop for MutableSnapshot {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take() {
            if let Err(e) = remove(&self.root) {
                tracing::warn!(path = %self.root.display(), error = %e, "failed to remove a mutable snapshot");
            }
            drop(lock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Barrier};

    fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
        let src = tempfile::tempdir().unwrap();
        for (name, data) in files {
            let path = src.path().join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, data).unwrap();
        }
        let mut tar = Vec::new();
        let opts = layer::DiffOptions {
            source_date_epoch: Some(0),
            ..Default::default()
        };
        layer::write_tree(src.path(), &mut tar, &opts).unwrap();
        tar
    }

    fn tmp_entries(store: &Snapshots) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(store.tmp())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A whiteout in a bottom layer (key = diff ID) hides nothing and leaves no 0:0 device; in
    /// any other layer it stays, for overlayfs.
    #[test]
    fn bottom_layer_whiteouts_vanish() {
        if !fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            eprintln!("bottom_layer_whiteouts_vanish: needs root (whiteout devices); skipped");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let store = Snapshots::open(&t.path().join("snapshots")).unwrap();
        let tar = layer_tar(&[("kept", b"k"), (".wh.hidden", b"")]);
        let id = Digest::of(&tar);
        let bottom = store.unpack(&id, None, &tar[..], Some(&id)).unwrap();
        assert!(bottom.path.join("kept").exists());
        assert!(fs::symlink_metadata(bottom.path.join("hidden")).is_err());
        let chain = Digest::of(format!("{} {id}", Digest::of(b"below")).as_bytes());
        let upper = store.unpack(&chain, None, &tar[..], Some(&id)).unwrap();
        let wh = fs::symlink_metadata(upper.path.join("hidden")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(&wh.file_type()));
    }

    #[test]
    fn unpack_verifies_and_chains() {
        let t = tempfile::tempdir().unwrap();
        let store = Snapshots::open(&t.path().join("snapshots")).unwrap();
        let base = layer_tar(&[("etc/os-release", b"kiln"), ("gone", b"x")]);
        let base_id = Digest::of(&base);
        let s1 = store.unpack(&base_id, None, &base[..], Some(&base_id)).unwrap();
        assert_eq!(fs::read(s1.path.join("etc/os-release")).unwrap(), b"kiln");
        assert_eq!(
            (s1.diff_id, s1.size, s1.parent),
            (base_id, base.len() as u64, None)
        );
        assert_eq!(store.get(&base_id), Some(s1.clone()));

        // A wrong diff ID fails and leaves nothing behind.
        let top = layer_tar(&[("app", b"1")]);
        let chain = Digest::of(format!("{base_id} {}", Digest::of(&top)).as_bytes());
        let err = store
            .unpack(&chain, Some(&base_id), &top[..], Some(&Digest::of(b"other")))
            .unwrap_err();
        assert!(matches!(err, SnapshotError::DiffIdMismatch { .. }), "{err}");
        assert!(store.get(&chain).is_none());
        assert!(tmp_entries(&store).is_empty());
        // A missing parent is refused.
        let err = store
            .unpack(&chain, Some(&Digest::of(b"nope")), &top[..], None)
            .unwrap_err();
        assert!(matches!(err, SnapshotError::Missing { .. }), "{err}");

        let s2 = store.unpack(&chain, Some(&base_id), &top[..], None).unwrap();
        assert_eq!(s2.diff_id, Digest::of(&top));
        assert_eq!(
            store.lower_dirs(&chain).unwrap(),
            vec![s2.path.clone(), s1.path.clone()]
        );
        assert_eq!(store.list().unwrap().len(), 2);
        // Unpacking an existing key reads nothing.
        let again = store
            .unpack(&chain, Some(&base_id), std::io::empty(), None)
            .unwrap();
        assert_eq!(again, s2);

        assert!(store.remove(&chain).unwrap());
        assert!(!store.remove(&chain).unwrap());
        assert!(store.get(&chain).is_none());
        assert!(matches!(
            store.lower_dirs(&chain),
            Err(SnapshotError::Missing { .. })
        ));
        assert!(tmp_entries(&store).is_empty());
    }

    #[test]
    fn prepare_commit_discard_drop() {
        let t = tempfile::tempdir().unwrap();
        let store = Snapshots::open(t.path()).unwrap();
        let base = layer_tar(&[("a", b"a")]);
        let base_id = Digest::of(&base);
        let s1 = store.unpack(&base_id, None, &base[..], None).unwrap();

        let m = store.prepare(Some(&base_id)).unwrap();
        assert_eq!(m.lower_dirs(), &[s1.path.clone()][..]);
        assert!(m.upper().is_dir() && m.work().is_dir());
        assert_eq!(m.upper().parent(), m.work().parent());
        fs::write(m.upper().join("b"), b"b").unwrap();
        m.attach("files", b"index").unwrap();
        assert!(m.attach("fs", b"").is_ok(), "stored as fs.att, never the tree");
        assert!(m.attach("../x", b"").is_err());
        assert!(m.attach("meta.json", b"").is_err());
        // What overlayfs leaves in the work dir: work/work with mode 000.
        fs::create_dir(m.work().join("work")).unwrap();
        fs::set_permissions(m.work().join("work"), fs::Permissions::from_mode(0o000)).unwrap();
        let key = Digest::of(b"step");
        let committed = m.commit(&key, &Digest::of(b"diff"), 42).unwrap();
        assert_eq!(fs::read(committed.path.join("b")).unwrap(), b"b");
        assert_eq!(store.attachment(&key, "files").as_deref(), Some(&b"index"[..]));
        assert_eq!(store.attachment(&key, "absent"), None);
        assert_eq!(store.attachment(&key, "../meta.json"), None);
        assert_eq!(committed.parent, Some(base_id));
        assert_eq!(store.get(&key), Some(committed.clone()));
        assert_eq!(
            store.lower_dirs(&key).unwrap(),
            vec![committed.path.clone(), s1.path.clone()]
        );
        assert!(tmp_entries(&store).is_empty());

        let m = store.prepare(None).unwrap();
        fs::create_dir(m.work().join("work")).unwrap();
        fs::set_permissions(m.work().join("work"), fs::Permissions::from_mode(0o000)).unwrap();
        m.discard();
        assert!(tmp_entries(&store).is_empty());
        {
            let m = store.prepare(None).unwrap();
            fs::write(m.upper().join("x"), b"x").unwrap();
            assert_eq!(tmp_entries(&store).len(), 1);
        }
        assert!(
            tmp_entries(&store).is_empty(),
            "drop removes an uncommitted snapshot"
        );

        // Committing a key someone else committed first gives theirs and cleans up.
        let m = store.prepare(None).unwrap();
        fs::write(m.upper().join("mine"), b"").unwrap();
        let theirs = m.commit(&key, &Digest::of(b"other"), 1).unwrap();
        assert_eq!(theirs, committed);
        assert!(tmp_entries(&store).is_empty());
        assert!(matches!(
            store.prepare(Some(&Digest::of(b"absent"))),
            Err(SnapshotError::Missing { .. })
        ));
    }

    #[test]
    fn a_snapshot_stacked_on_another_needs_it_and_is_unpacked_again_without_it() {
        let t = tempfile::tempdir().unwrap();
        let store = Snapshots::open(t.path()).unwrap();
        let bottom = store.prepare(None).unwrap();
        fs::write(bottom.upper().join("kept"), b"k").unwrap();
        let bottom = bottom
            .commit(&Digest::of(b"bottom"), &Digest::of(b"b"), 1)
            .unwrap();
        let mut edited = store.prepare(None).unwrap();
        assert!(edited.stack_on(&Digest::of(b"absent")).is_err());
        fs::write(edited.upper().join("changed"), b"c").unwrap();
        edited.stack_on(&bottom.key).unwrap();
        assert_eq!(edited.lower_dirs(), &[bottom.path.clone()][..]);
        // Its layer as a tar: what a full write of the union gives.
        let tar = layer_tar(&[("changed", b"c"), ("kept", b"k")]);
        let key = Digest::of(b"edited");
        let top = edited.commit(&key, &Digest::of(&tar), tar.len() as u64).unwrap();
        assert_eq!(top.parent, Some(bottom.key));
        assert_eq!(
            store.lower_dirs(&key).unwrap(),
            vec![top.path.clone(), bottom.path.clone()]
        );

        // Without the tree below, the one above is not whole: absent, and made again whole.
        assert!(store.remove(&bottom.key).unwrap());
        assert!(store.get(&key).is_none());
        let again = store
            .unpack(&key, None, &tar[..], Some(&Digest::of(&tar)))
            .unwrap();
        assert_eq!(again.parent, None);
        assert!(again.path.join("kept").is_file() && again.path.join("changed").is_file());
        assert_eq!(store.lower_dirs(&key).unwrap(), vec![again.path]);
    }

    #[test]
    fn a_build_result_of_another_boot_is_absent_and_replaced() {
        let t = tempfile::tempdir().unwrap();
        let store = Snapshots::open(t.path()).unwrap();
        let tar = layer_tar(&[("a", b"a")]);
        let id = Digest::of(&tar);
        store.unpack(&id, None, &tar[..], None).unwrap();
        let meta_of = |key: &Digest| -> serde_json::Value {
            serde_json::from_slice(&fs::read(t.path().join(key.hex()).join("meta.json")).unwrap()).unwrap()
        };
        assert!(
            meta_of(&id).get("unsynced_boot").is_none(),
            "an unpack is not boot-scoped"
        );

        let m = store.prepare(Some(&id)).unwrap();
        fs::write(m.upper().join("b"), b"b").unwrap();
        let key = Digest::of(b"step");
        let committed = m.commit(&key, &Digest::of(b"diff"), 1).unwrap();
        let mut meta = meta_of(&key);
        assert_eq!(meta["unsynced_boot"].as_str(), boot_id(), "records this boot");
        assert_eq!(store.get(&key), Some(committed.clone()));

        // As after a crash and a reboot: its files may be gone, its record names another boot.
        meta["unsynced_boot"] = "00000000-0000-0000-0000-000000000000".into();
        fs::write(
            t.path().join(key.hex()).join("meta.json"),
            serde_json::to_vec(&meta).unwrap(),
        )
        .unwrap();
        fs::remove_file(committed.path.join("b")).unwrap();
        assert_eq!(store.get(&key), None);
        assert!(matches!(
            store.prepare(Some(&key)),
            Err(SnapshotError::Missing { .. })
        ));

        // Made again, it takes the stale one's place; the stale one is retired, not removed,
        // until a later boot.
        let m = store.prepare(Some(&id)).unwrap();
        fs::write(m.upper().join("b"), b"b").unwrap();
        let again = m.commit(&key, &Digest::of(b"diff"), 1).unwrap();
        assert_eq!(again.path, committed.path);
        assert_eq!(fs::read(again.path.join("b")).unwrap(), b"b");
        assert_eq!(store.get(&key), Some(again));
        assert!(tmp_entries(&store).is_empty());
        let retired: Vec<_> = fs::read_dir(t.path().join("retired"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(retired.len(), 1);
        assert_eq!(
            store.cleanup_stale_tmp().unwrap(),
            0,
            "retired in this boot: kept"
        );
        let from_earlier_boot = t.path().join("retired").join("earlier-boot-x");
        fs::rename(retired[0].path(), &from_earlier_boot).unwrap();
        assert_eq!(store.cleanup_stale_tmp().unwrap(), 1);
        assert!(!from_earlier_boot.exists());
    }

    #[test]
    fn a_commit_can_leave_its_work_dir_aside_for_later() {
        let t = tempfile::tempdir().unwrap();
        let store = Snapshots::open(t.path()).unwrap();
        let m = store.prepare(None).unwrap();
        fs::write(m.upper().join("b"), b"b").unwrap();
        fs::create_dir(m.work().join("work")).unwrap();
        fs::set_permissions(m.work().join("work"), fs::Permissions::from_mode(0o000)).unwrap();
        let key = Digest::of(b"step");
        let (committed, aside) = m.commit_leaving_work(&key, &Digest::of(b"diff"), 1).unwrap();
        assert_eq!(fs::read(committed.path.join("b")).unwrap(), b"b");
        assert_eq!(store.get(&key), Some(committed.clone()));
        assert!(!committed.path.parent().unwrap().join("work").exists());
        assert_eq!(aside.path().parent(), Some(&*store.tmp()));
        assert!(aside.path().join("work").is_dir());
        // This process's own while it lives: not a killed process's leftover.
        assert_eq!(store.cleanup_stale_tmp().unwrap(), 0);
        assert!(aside.path().exists());
        aside.remove().unwrap();
        assert!(tmp_entries(&store).is_empty());
        // One a killed process left aside is removed by the next cleanup.
        let dead = store.tmp().join(".rm-999999999-1-0");
        fs::create_dir_all(dead.join("work")).unwrap();
        fs::set_permissions(dead.join("work"), fs::Permissions::from_mode(0o000)).unwrap();
        assert_eq!(store.cleanup_stale_tmp().unwrap(), 1);
        assert!(tmp_entries(&store).is_empty());
    }

    #[test]
    fn racing_unpacks_end_with_one_snapshot() {
        let t = tempfile::tempdir().unwrap();
        let store = Snapshots::open(t.path()).unwrap();
        let files: Vec<(String, Vec<u8>)> = (0..300).map(|i| (format!("d/f{i}"), vec![b'x'; i])).collect();
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        let tar = Arc::new(layer_tar(&refs));
        let key = Digest::of(&tar);
        let barrier = Arc::new(Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (store, tar, barrier) = (store.clone(), tar.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store.unpack(&key, None, &tar[..], Some(&key)).unwrap()
                })
            })
            .collect();
        let results: Vec<Snapshot> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(results.iter().all(|s| *s == results[0]));
        assert_eq!(fs::read_dir(results[0].path.join("d")).unwrap().count(), 300);
        assert_eq!(store.list().unwrap().len(), 1);
        assert!(tmp_entries(&store).is_empty());

        // Racing commits of the same key.
        let barrier = Arc::new(Barrier::new(3));
        let step = Digest::of(b"racing step");
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let (store, barrier) = (store.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let m = store.prepare(Some(&key)).unwrap();
                    fs::write(m.upper().join("who"), format!("{i}")).unwrap();
                    barrier.wait();
                    m.commit(&step, &Digest::of(b"d"), 1).unwrap()
                })
            })
            .collect();
        let results: Vec<Snapshot> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(results.iter().all(|s| *s == results[0]));
        assert!(fs::read(results[0].path.join("who")).is_ok());
        assert!(tmp_entries(&store).is_empty());
    }

    #[test]
    fn cleanup_removes_only_unlocked_leftovers() {
        let t = tempfile::tempdir().unwrap();
        let store = Snapshots::open(t.path()).unwrap();
        let live = store.prepare(None).unwrap();
        // A killed process's leftovers: a dir nobody holds a lock on, with a mode-000 work dir,
        // and one it was creating when it died.
        let dead = store.tmp().join("999999999-1-0");
        fs::create_dir_all(dead.join("work/work")).unwrap();
        fs::set_permissions(dead.join("work/work"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::create_dir(store.tmp().join(".new-999999999-1-1")).unwrap();
        // One this process is creating right now (not locked yet).
        let creating = format!(".new-{}", crate::temp::name("", ""));
        fs::create_dir(store.tmp().join(&creating)).unwrap();
        assert_eq!(store.cleanup_stale_tmp().unwrap(), 2);
        assert!(!dead.exists());
        assert!(live.upper().is_dir());
        drop(live);
        assert_eq!(tmp_entries(&store), vec![creating]);
    }
}
