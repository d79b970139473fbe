//! `kiln store verify [--repair]`: checks the whole store.
//!
//! | check | finding | `--repair` |
//! |---|---|---|
//! | every blob re-hashed (a lazy one from its recipe's sources) | corrupt or unreadable blob (damage) | removes it (an image needing it stays damaged: pull or build it again) |
//! | names in `blobs/sha256` | a file not named by a digest (damage) | removes it |
//! | every image record: manifest, config, layers | broken image, missing blob (damage) | reported only: the image must be pulled or built again |
//! | every tag | a tag naming no image (damage) | removes the tag |
//! | every build cache record | unreadable, or naming a missing blob (leftover) | removes the record |
//! | every snapshot | unreadable metadata, missing tree or parent (leftover) | removes it |
//! | what the images, containers and cache records name | unreferenced blobs and snapshots (leftover) | removes them |
//! | temps ([`crate::temp`]) | temps of dead processes (leftover) | removes them |
//! | mounts of store paths | in this mount namespace, or held only by processes no kiln process is an ancestor of (leftover) | unmounts them here; kills such orphaned build steps |
//!
//! Damage makes the command fail; leftovers are what a killed command may leave, and the next
//! command (or a prune, or `--repair`) removes. Blobs are hashed while the store is held
//! shared (no GC removes them meanwhile); the other checks run under the exclusive GC lock when
//! nothing else holds the store (with `--repair`, after waiting for it), else the checks that
//! depend on what running builds have not referenced yet are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use kiln_dag::Digest;
use rayon::prelude::*;
use sha2::{Digest as _, Sha256};

use crate::buildcache::CacheIndex;
use crate::content::ContentError;
use crate::gc::Roots;
use crate::images::ImageError;
use crate::snapshot::Snapshots;
use crate::store::{Store, StoreError};

/// A failure to run the verification itself (damage is reported as [`Problem`]s).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The blobs could not be listed.
    #[error("failed to list blobs")]
    List(#[source] ContentError),
    /// The image records could not be read.
    #[error("failed to read image records")]
    Images(#[source] ImageError),
    /// The store could not be locked.
    #[error("failed to lock the store")]
    Lock(#[source] StoreError),
    /// The snapshots could not be listed.
    #[error("failed to list snapshots")]
    Snapshots(#[source] crate::snapshot::SnapshotError),
}

/// One finding.
#[derive(Debug)]
pub enum Problem {
    /// A blob's content does not hash to its name.
    Corrupt {
        /// The blob's name.
        digest: Digest,
        /// What it hashes to.
        actual: Digest,
    },
    /// A blob could not be read.
    Unreadable {
        /// The blob's name.
        digest: Digest,
        /// Why.
        error: String,
    },
    /// A file in the blob directory whose name is not a sha256 hex digest.
    StrayFile {
        /// Its name.
        name: String,
    },
    /// An image record whose manifest, config or layers are missing or invalid.
    BrokenImage {
        /// The manifest digest.
        manifest: Digest,
        /// What is wrong.
        error: String,
    },
    /// A blob an image needs is not in the store.
    MissingBlob {
        /// The manifest digest.
        manifest: Digest,
        /// The missing blob.
        digest: Digest,
    },
    /// A tag points at a manifest with no image record.
    DanglingTag {
        /// The tag.
        tag: String,
        /// What it points at.
        manifest: Digest,
    },
    /// A build cache record that cannot be read.
    BrokenRecord {
        /// Its file.
        path: PathBuf,
    },
    /// A build cache record naming a blob that is gone.
    StaleRecord {
        /// Its key.
        key: String,
        /// The missing blob.
        blob: Digest,
    },
    /// A snapshot directory that cannot be used.
    BrokenSnapshot {
        /// Its key.
        key: Digest,
        /// What is wrong.
        error: String,
    },
    /// A snapshot nothing needs.
    UnreferencedSnapshot {
        /// Its key.
        key: Digest,
        /// Bytes on disk.
        bytes: u64,
    },
    /// A blob nothing needs.
    UnreferencedBlob {
        /// Its digest.
        digest: Digest,
        /// Bytes on disk.
        bytes: u64,
    },
    /// A temp of a process that is gone.
    StaleTemp {
        /// Where.
        path: PathBuf,
        /// Bytes on disk.
        bytes: u64,
    },
    /// A mount of a store path that nothing running in kiln holds.
    LeftoverMount {
        /// The mount point (as seen in its namespace).
        mount_point: PathBuf,
        /// What is mounted (`overlay`, ...).
        fstype: String,
        /// The processes of its mount namespace (empty: this process's namespace).
        pids: Vec<i32>,
    },
}

impl Problem {
    /// Whether this is damage (the store cannot give back what it recorded) rather than a
    /// leftover of a killed command.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            Problem::Corrupt { .. }
                | Problem::Unreadable { .. }
                | Problem::StrayFile { .. }
                | Problem::BrokenImage { .. }
                | Problem::MissingBlob { .. }
                | Problem::DanglingTag { .. }
        )
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Corrupt { digest, actual } => {
                write!(f, "blob {digest} is corrupt: its content hashes to {actual}")
            }
            Problem::Unreadable { digest, error } => write!(f, "blob {digest} cannot be read: {error}"),
            Problem::StrayFile { name } => write!(f, "blobs/sha256/{name} is not named by a sha256 digest"),
            Problem::BrokenImage { manifest, error } => write!(f, "image {manifest} is broken: {error}"),
            Problem::MissingBlob { manifest, digest } => {
                write!(f, "image {manifest} needs blob {digest}, which is missing")
            }
            Problem::DanglingTag { tag, manifest } => write!(
                f,
                "tag {tag} points at {manifest}, which is not an image in the store"
            ),
            Problem::BrokenRecord { path } => {
                write!(f, "build cache record `{}` cannot be read", path.display())
            }
            Problem::StaleRecord { key, blob } => {
                write!(f, "build cache record {key} names blob {blob}, which is gone")
            }
            Problem::BrokenSnapshot { key, error } => write!(f, "snapshot {key} is unusable: {error}"),
            Problem::UnreferencedSnapshot { key, bytes } => {
                write!(
                    f,
                    "snapshot {key} ({bytes} bytes) is named by no image, container or cache record"
                )
            }
            Problem::UnreferencedBlob { digest, bytes } => {
                write!(
                    f,
                    "blob {digest} ({bytes} bytes) is named by no image or cache record"
                )
            }
            Problem::StaleTemp { path, bytes } => write!(
                f,
                "temp `{}` ({bytes} bytes) belongs to a process that is gone",
                path.display()
            ),
            Problem::LeftoverMount {
                mount_point,
                fstype,
                pids,
            } => {
                if pids.is_empty() {
                    write!(f, "{fstype} mount at `{}` of a store path", mount_point.display())
                } else {
                    write!(
                        f,
                        "{fstype} mount at `{}` of a store path is held by processes {pids:?}, which no kiln process runs",
                        mount_point.display()
                    )
                }
            }
        }
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Blobs re-hashed.
    pub blobs: usize,
    /// Image records checked.
    pub images: usize,
    /// Tags checked.
    pub tags: usize,
    /// Build cache records checked.
    pub records: usize,
    /// Snapshots checked.
    pub snapshots: usize,
    /// Whether the checks for unreferenced data ran (nothing else held the store).
    pub checked_references: bool,
    /// Findings still there (after repair).
    pub problems: Vec<Problem>,
    /// What `--repair` removed or fixed, one line each.
    pub repaired: Vec<String>,
    /// Bytes `--repair` freed.
    pub freed: u64,
}

impl VerifyReport {
    /// Whether some finding is damage.
    pub fn damaged(&self) -> bool {
        self.problems.iter().any(Problem::is_damage)
    }
}

fn hash_file(store: &Store, d: &Digest) -> Result<Digest, String> {
    // A lazy blob is hashed from its recipe's sources: checking it writes nothing.
    let source = store.content().source(d).map_err(|e| error_chain(&e))?;
    let mut f = source.reader();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest(hasher.finalize().into()))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Checks the store without changing it (see the module docs).
pub fn verify(store: &Store, repair: bool) -> Result<VerifyReport, VerifyError> {
    verify_waiting(store, repair, || {})
}

/// [`verify`]; with `repair`, calls `on_wait` when builds hold the store and waits for them.
pub fn verify_waiting(
    store: &Store,
    repair: bool,
    on_wait: impl FnOnce(),
) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport::default();
    let mut found = Vec::new();
    {
        let _hold = store.hold().map_err(VerifyError::Lock)?;
        check_blobs(store, &mut report, &mut found)?;
    }
    if repair {
        // Orphaned steps of killed builds go first: they may hold the store (a lock they
        // inherited) and the temps they run on.
        for p in leftover_mounts(store.root()) {
            if let Problem::LeftoverMount {
                mount_point, pids, ..
            } = &p
            {
                if !pids.is_empty() {
                    report
                        .repaired
                        .extend(release_mount(store.root(), mount_point, pids));
                }
            }
        }
    }
    // The structural checks under the exclusive lock when it can be had.
    let gc = match store.gc_lock(repair, on_wait) {
        Ok(gc) => Some(gc),
        Err(StoreError::Busy { .. }) => None,
        Err(e) => return Err(VerifyError::Lock(e)),
    };
    let _hold = match gc {
        Some(_) => None,
        None => Some(store.hold().map_err(VerifyError::Lock)?),
    };
    report.checked_references = gc.is_some();
    check_images(store, &mut report, &mut found)?;
    check_cache(store, &mut report, &mut found, gc.is_some())?;
    found.extend(leftover_mounts(store.root()));
    if repair {
        found = self::repair(store, found, &mut report);
        if gc.is_some() {
            // What the removals left unreferenced, and every other kind of garbage.
            if let Ok(swept) = crate::gc::sweep(store) {
                for b in &swept.blobs {
                    report.repaired.push(format!("removed unreferenced blob {b}"));
                }
                for s in &swept.snapshots {
                    report.repaired.push(format!("removed unreferenced snapshot {s}"));
                }
                for t in &swept.temps {
                    report
                        .repaired
                        .push(format!("removed stale temp `{}`", t.display()));
                }
                report.freed += swept.bytes;
            }
        }
    }
    report.problems = found;
    Ok(report)
}

fn check_blobs(
    store: &Store,
    report: &mut VerifyReport,
    found: &mut Vec<Problem>,
) -> Result<(), VerifyError> {
    let blobs_dir = store.root().join("blobs").join("sha256");
    if let Ok(entries) = fs::read_dir(&blobs_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if Digest::parse(&format!("sha256:{name}")).is_err() {
                found.push(Problem::StrayFile { name });
            }
        }
    }
    let blobs = store.content().list().map_err(VerifyError::List)?;
    report.blobs = blobs.len();
    let mut blob_problems: Vec<Problem> = blobs
        .par_iter()
        .filter_map(|d| match hash_file(store, d) {
            Ok(actual) if actual == *d => None,
            Ok(actual) => Some(Problem::Corrupt { digest: *d, actual }),
            Err(error) => Some(Problem::Unreadable { digest: *d, error }),
        })
        .collect();
    found.append(&mut blob_problems);
    Ok(())
}

fn check_images(
    store: &Store,
    report: &mut VerifyReport,
    found: &mut Vec<Problem>,
) -> Result<(), VerifyError> {
    let images = store.images();
    let index = images.index().map_err(VerifyError::Images)?;
    report.images = index.images.len();
    report.tags = index.tags.len();
    for manifest in index.images.keys() {
        if !store.content().contains(manifest) {
            found.push(Problem::MissingBlob {
                manifest: *manifest,
                digest: *manifest,
            });
            continue;
        }
        match images.get(manifest) {
            Ok(img) => {
                for d in img.blobs() {
                    if !store.content().contains(&d) {
                        found.push(Problem::MissingBlob {
                            manifest: *manifest,
                            digest: d,
                        });
                    }
                }
            }
            Err(e) => found.push(Problem::BrokenImage {
                manifest: *manifest,
                error: error_chain(&e),
            }),
        }
    }
    for (tag, manifest) in &index.tags {
        if !index.images.contains_key(manifest) && !index.indexes.contains_key(manifest) {
            found.push(Problem::DanglingTag {
                tag: tag.clone(),
                manifest: *manifest,
            });
        }
    }
    Ok(())
}

fn check_cache(
    store: &Store,
    report: &mut VerifyReport,
    found: &mut Vec<Problem>,
    idle: bool,
) -> Result<(), VerifyError> {
    let index = CacheIndex::at(&store.cache_dir().join("index"));
    for path in index.unreadable() {
        found.push(Problem::BrokenRecord { path });
    }
    let records = index.all();
    report.records = records.len();
    for (key, record) in &records {
        if let Some(l) = record.layers.iter().find(|l| !store.content().contains(&l.blob)) {
            found.push(Problem::StaleRecord {
                key: key.clone(),
                blob: l.blob,
            });
        }
    }
    let snapshots = Snapshots::open(&store.snapshots_dir()).map_err(VerifyError::Snapshots)?;
    let dirs = snapshots.dirs().map_err(VerifyError::Snapshots)?;
    report.snapshots = dirs.len();
    let keys: BTreeSet<Digest> = dirs.iter().map(|d| d.key).collect();
    for d in &dirs {
        let error = if !d.readable {
            Some("its meta.json is missing or unreadable".to_string())
        } else if !d.path.join("fs").is_dir() {
            Some("its tree (fs) is missing".to_string())
        } else {
            d.parent
                .filter(|p| !keys.contains(p))
                .map(|p| format!("its parent {p} is missing"))
        };
        if let Some(error) = error {
            found.push(Problem::BrokenSnapshot { key: d.key, error });
        }
    }
    for t in crate::temp::find_stale(store.root(), idle, true) {
        found.push(Problem::StaleTemp {
            path: t.path,
            bytes: t.bytes,
        });
    }
    if !idle {
        return Ok(());
    }
    let roots = Roots::read(store).map_err(VerifyError::Images)?;
    let mut live = roots.live_blobs();
    store.content().add_recipe_sources(&mut live);
    for d in store.content().list().map_err(VerifyError::List)? {
        if !live.contains(&d) {
            let bytes = store.content().disk_usage(&d);
            found.push(Problem::UnreferencedBlob { digest: d, bytes });
        }
    }
    let keep = roots.kept_snapshots(&dirs);
    let broken: BTreeSet<Digest> = found
        .iter()
        .filter_map(|p| match p {
            Problem::BrokenSnapshot { key, .. } => Some(*key),
            _ => None,
        })
        .collect();
    for d in dirs
        .iter()
        .filter(|d| !keep.contains(&d.key) && !broken.contains(&d.key))
    {
        found.push(Problem::UnreferencedSnapshot {
            key: d.key,
            bytes: snapshots.disk_usage(&d.key),
        });
    }
    Ok(())
}

/// Fixes what can be fixed; returns the findings that remain.
fn repair(store: &Store, found: Vec<Problem>, report: &mut VerifyReport) -> Vec<Problem> {
    let mut left = Vec::new();
    let content = store.content();
    let index = CacheIndex::at(&store.cache_dir().join("index"));
    let snapshots = Snapshots::open(&store.snapshots_dir()).ok();
    for p in found {
        let fixed: Option<String> = match &p {
            Problem::Corrupt { digest, .. } | Problem::Unreadable { digest, .. } => {
                let bytes = content.disk_usage(digest);
                content.delete(digest).ok().map(|()| {
                    report.freed += bytes;
                    format!("removed damaged blob {digest}")
                })
            }
            Problem::StrayFile { name } => {
                let path = store.root().join("blobs/sha256").join(name);
                crate::temp::remove_any(&path)
                    .ok()
                    .map(|()| format!("removed `{}`", path.display()))
            }
            Problem::DanglingTag { tag, .. } => store
                .images()
                .update(|index| Ok(index.tags.remove(tag)))
                .ok()
                .map(|_| format!("removed tag {tag}, which named no image")),
            Problem::BrokenRecord { path } => fs::remove_file(path)
                .ok()
                .map(|()| format!("removed unreadable build cache record `{}`", path.display())),
            Problem::StaleRecord { key, .. } => {
                index.remove(key);
                Some(format!("removed build cache record {key}, whose blob is gone"))
            }
            Problem::BrokenSnapshot { key, .. } | Problem::UnreferencedSnapshot { key, .. } => {
                let bytes = snapshots.as_ref().map_or(0, |s| s.disk_usage(key));
                snapshots
                    .as_ref()
                    .and_then(|s| s.remove(key).ok())
                    .filter(|removed| *removed)
                    .map(|_| {
                        report.freed += bytes;
                        format!("removed snapshot {key}")
                    })
            }
            Problem::UnreferencedBlob { digest, bytes } => content.delete(digest).ok().map(|()| {
                report.freed += bytes;
                format!("removed unreferenced blob {digest}")
            }),
            Problem::StaleTemp { path, bytes } => crate::temp::remove_any(path).ok().map(|()| {
                report.freed += bytes;
                format!("removed stale temp `{}`", path.display())
            }),
            Problem::LeftoverMount {
                mount_point, pids, ..
            } => release_mount(store.root(), mount_point, pids),
            // Only a pull or a build brings these back.
            Problem::BrokenImage { .. } | Problem::MissingBlob { .. } => None,
        };
        match fixed {
            Some(line) => report.repaired.push(line),
            None => left.push(p),
        }
    }
    left
}

/// Unmounts a leftover mount in this namespace, or kills the orphaned build steps holding one
/// in theirs (only steps of builds: their mounts are mutable snapshots in `snapshots/tmp`;
/// a container's processes are left to the container commands).
fn release_mount(root: &Path, mount_point: &Path, pids: &[i32]) -> Option<String> {
    if pids.is_empty() {
        return rustix::mount::unmount(mount_point, rustix::mount::UnmountFlags::DETACH)
            .ok()
            .map(|()| format!("unmounted `{}`", mount_point.display()));
    }
    let steps = root.join("snapshots").join("tmp");
    let build_step = pids
        .first()
        .and_then(|p| fs::read_to_string(format!("/proc/{p}/mountinfo")).ok())
        .is_some_and(|info| info.lines().any(|l| l.contains(&*steps.to_string_lossy())));
    if !build_step {
        return None;
    }
    for p in pids {
        if let Some(pid) = rustix::process::Pid::from_raw(*p) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    // Their locks (on the temps they used) go when they are gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while pids.iter().any(|p| Path::new(&format!("/proc/{p}")).exists())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Some(format!(
        "killed orphaned build step processes {pids:?} holding `{}`",
        mount_point.display()
    ))
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts in one mountinfo text that involve paths under `root` (not `root` itself): the
/// mount point, the mounted directory, or an overlay's layers. Returns (mount point, fstype).
fn store_mounts_in(info: &str, root: &Path) -> Vec<(PathBuf, String)> {
    let prefix = format!("{}/", root.display());
    let under = |p: &str| p.starts_with(&prefix);
    let mut out = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        let (Some(fsroot), Some(point), Some(fstype)) = (f.get(3), f.get(4), r.first()) else {
            continue;
        };
        let (fsroot, point) = (unescape(fsroot), unescape(point));
        let options = r.get(2).map(|o| unescape(o)).unwrap_or_default();
        let layers = options.split(',').any(|o| {
            o.split_once('=').is_some_and(|(k, v)| {
                matches!(k, "lowerdir" | "upperdir" | "workdir") && v.split(':').any(under)
            })
        });
        if under(&point) || under(&fsroot) || layers {
            out.push((PathBuf::from(point), fstype.to_string()));
        }
    }
    out
}

fn ns_of(pid: &str) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Whether `pid` or one of its ancestors is a kiln process (the same executable as this one,
/// or a process named `kiln`).
fn under_kiln(pid: i32, kiln_exe: &Option<String>) -> bool {
    let mut cur = pid;
    for _ in 0..64 {
        if cur <= 1 {
            return false;
        }
        let exe = fs::read_link(format!("/proc/{cur}/exe"))
            .ok()
            .map(|p| p.to_string_lossy().trim_end_matches(" (deleted)").to_string());
        if exe.is_some() && exe == *kiln_exe {
            return true;
        }
        let Ok(stat) = fs::read_to_string(format!("/proc/{cur}/stat")) else {
            return false;
        };
        let comm = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map(|(c, _)| c);
        if comm == Some("kiln") {
            return true;
        }
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        else {
            return false;
        };
        cur = ppid;
    }
    false
}

/// Mounts of store paths that nothing running in kiln holds: in this process's mount
/// namespace (kiln mounts only in private namespaces of its own), or in a namespace none of
/// whose processes descends from a kiln process.
pub fn leftover_mounts(root: &Path) -> Vec<Problem> {
    let root = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let mut out = Vec::new();
    let ours = ns_of("self");
    if let Ok(info) = fs::read_to_string("/proc/self/mountinfo") {
        for (mount_point, fstype) in store_mounts_in(&info, &root) {
            out.push(Problem::LeftoverMount {
                mount_point,
                fstype,
                pids: Vec::new(),
            });
        }
    }
    let kiln_exe = fs::read_link("/proc/self/exe")
        .ok()
        .map(|p| p.to_string_lossy().trim_end_matches(" (deleted)").to_string());
    let mut namespaces: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(ns) = ns_of(&pid.to_string()) {
                if Some(&ns) != ours.as_ref() {
                    namespaces.entry(ns).or_default().push(pid);
                }
            }
        }
    }
    for pids in namespaces.into_values() {
        let Some(info) = pids
            .iter()
            .find_map(|p| fs::read_to_string(format!("/proc/{p}/mountinfo")).ok())
        else {
            continue;
        };
        let mounts = store_mounts_in(&info, &root);
        if mounts.is_empty() || pids.iter().any(|p| under_kiln(*p, &kiln_exe)) {
            continue;
        }
        for (mount_point, fstype) in mounts {
            out.push(Problem::LeftoverMount {
                mount_point,
                fstype,
                pids: pids.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::LayerRef;
    use kiln_dag::image::ImageConfig;
    use oci_spec::image::MediaType;

    #[test]
    fn finds_corrupt_and_missing_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let l = store.content().put_bytes(b"layer").unwrap();
        let img = store
            .images()
            .create(
                &ImageConfig::default(),
                &[LayerRef {
                    digest: l,
                    diff_id: l,
                    size: 5,
                    media_type: MediaType::ImageLayer,
                }],
            )
            .unwrap();
        let report = verify(&store, false).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!((report.blobs, report.images), (3, 1));
        assert!(report.checked_references);
        std::fs::write(store.content().path(&l), b"LAYER").unwrap();
        let report = verify(&store, false).unwrap();
        assert_eq!(report.problems.len(), 1);
        assert!(report.problems[0].to_string().contains("corrupt"));
        assert!(report.damaged());
        std::fs::remove_file(store.content().path(&img.config_digest)).unwrap();
        let report = verify(&store, false).unwrap();
        assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    }

    #[test]
    fn repair_removes_leftovers_and_reports_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let stray = store.content().put_bytes(b"nobody's").unwrap();
        let index = CacheIndex::open(&store.cache_dir().join("index")).unwrap();
        let gone = Digest::of(b"gone");
        index
            .put(
                "k1",
                &crate::buildcache::Record {
                    layers: vec![crate::buildcache::Layer {
                        snapshot: gone,
                        blob: gone,
                        diff_id: gone,
                        size: 1,
                        media_type: String::new(),
                        created: None,
                    }],
                    description: String::new(),
                },
            )
            .unwrap();
        fs::write(index.dir().join("broken.json"), b"{").unwrap();
        let snaps = Snapshots::open(&store.snapshots_dir()).unwrap();
        let orphan = Digest::of(b"orphan");
        snaps.prepare(None).unwrap().commit(&orphan, &orphan, 1).unwrap();
        let half = store.snapshots_dir().join(Digest::of(b"half").hex());
        fs::create_dir_all(&half).unwrap();
        let dead_temp = store.root().join("ingest").join("999999999-1-0.tmp");
        fs::write(&dead_temp, b"partial").unwrap();
        store
            .images()
            .update(|i| {
                i.tags
                    .insert("docker.io/library/ghost:latest".into(), Digest::of(b"none"));
                Ok(())
            })
            .unwrap();

        let report = verify(&store, false).unwrap();
        let text: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(report.problems.len(), 7, "{text:#?}");
        assert!(report.damaged(), "the dangling tag is damage");
        assert!(dead_temp.exists(), "verify alone changes nothing");

        let report = verify(&store, true).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(report.repaired.len() >= 7, "{:#?}", report.repaired);
        assert!(!store.content().contains(&stray));
        assert!(index.all().is_empty() && index.unreadable().is_empty());
        assert!(!half.exists() && !dead_temp.exists());
        assert!(snaps.get(&orphan).is_none());
        assert!(store.images().index().unwrap().tags.is_empty());
        let again = verify(&store, false).unwrap();
        assert!(again.problems.is_empty(), "{:?}", again.problems);
    }

    #[test]
    fn mountinfo_lines_of_the_store() {
        let root = Path::new("/var/lib/kiln");
        let info = "\
36 35 98:0 / /mnt rw - ext4 /dev/root rw
37 35 0:50 / /var/lib/kiln rw - tmpfs tmpfs rw
38 35 0:51 / /tmp/x rw - overlay overlay rw,lowerdir=/var/lib/kiln/snapshots/a/fs:/var/lib/kiln/snapshots/b/fs,upperdir=/var/lib/kiln/snapshots/tmp/1/upper,workdir=/var/lib/kiln/snapshots/tmp/1/work
39 35 98:0 /var/lib/kiln/volumes/v/_data /data rw - ext4 /dev/root rw
40 35 0:52 / /var/lib/kiln/containers/c/with\\040space rw - proc proc rw
41 35 0:53 / /var/lib/kilnother rw - tmpfs tmpfs rw
";
        let got = store_mounts_in(info, root);
        assert_eq!(
            got,
            vec![
                (PathBuf::from("/tmp/x"), "overlay".to_string()),
                (PathBuf::from("/data"), "ext4".to_string()),
                (
                    PathBuf::from("/var/lib/kiln/containers/c/with space"),
                    "proc".to_string()
                ),
            ]
        );
    }
}
