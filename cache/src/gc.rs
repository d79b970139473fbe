//! Garbage collection and the build cache's accounting.
//!
//! What keeps data alive (the roots, read by [`Roots::read`]):
//!
//! | root | keeps |
//! |---|---|
//! | an image record (`images.json`) | its manifest, config and layer blobs; the snapshots of its chain IDs |
//! | a container record (`containers/<id>/config.json`) | the snapshots its root filesystem's lower dirs are |
//! | a build cache record (`cache/index/<key>.json`) | the blobs and snapshots of its layers |
//! | a committed snapshot kept for any reason | its parents |
//!
//! Everything else under the store root is garbage once no process holds the store: blobs and
//! snapshots nothing names, temps of dead processes ([`crate::temp`]), unpack locks of removed
//! snapshots, lineage and push hints of removed layers, and retired snapshots.
//!
//! The build cache ([`build_cache`]) is what the cache records hold beyond the images and
//! containers (one entry per distinct layer), the `RUN --mount=type=cache` directories, the
//! stat caches of build contexts, the validators of `ADD` URLs, and the garbage. `kiln builder
//! prune` removes entries with Docker's semantics (without `--all`, entries that share data with
//! an image and internal entries stay), `--filter until=` and `--keep-storage` (least recently
//! used first). Removing a layer entry removes every record that names the layer. A layer
//! entry's size counts what it keeps beyond its snapshot and blob when nothing else lists or
//! owns it (the snapshots below a stacked one, the blobs a lazy blob's recipe reads), and an
//! image's snapshots and blobs are owned with those parts (so shared, not the cache's).
//!
//! Architecture Invariant: GC (every prune, `store verify --repair`, the automatic GC) runs only
//! under the exclusive `ROOT/gc.lock`, so nothing a running build, import, load, pull, save,
//! push, commit or container creation holds (they hold the lock shared) is ever removed; and it
//! never removes what an image, a container or a remaining cache record names.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kiln_dag::Digest;
use oci_spec::image::ImageManifest;

use crate::buildcache::{CacheIndex, Record, Usage};
use crate::content::ContentError;
use crate::images::{kiln_digest, ImageError, MAX_JSON_BYTES};
use crate::reference::Reference;
use crate::snapshot::{SnapshotDir, SnapshotError, Snapshots};
use crate::store::{Store, StoreError};

/// A failure collecting garbage.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The GC lock could not be taken (or builds hold the store and waiting was not allowed).
    #[error("failed to lock the store for garbage collection")]
    Lock(#[source] StoreError),
    /// Reading or updating the image records failed.
    #[error("failed to update image records")]
    Images(#[source] ImageError),
    /// Listing or deleting blobs failed.
    #[error("failed to remove unreferenced blobs")]
    Content(#[source] ContentError),
    /// Listing or deleting snapshots failed.
    #[error("failed to remove unreferenced snapshots")]
    Snapshots(#[source] SnapshotError),
    /// A build cache entry could not be removed.
    #[error("failed to remove `{path}`")]
    Remove {
        /// What could not be removed.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The usage log of the build cache could not be rewritten.
    #[error("failed to rewrite the build cache's usage log")]
    Index(#[source] crate::buildcache::IndexError),
}

/// What image `prune` should remove.
#[derive(Clone, Copy, Debug, Default)]
pub struct PruneOptions {
    /// Remove every image no container uses, not only untagged ones (`-a`).
    pub all: bool,
    /// Wait for running builds instead of failing.
    pub wait: bool,
}

/// What `prune` removed.
#[derive(Clone, Debug, Default)]
pub struct PruneReport {
    /// Tags removed (only with `all`).
    pub untagged: Vec<Reference>,
    /// IDs (config digests) of the image records removed.
    pub deleted_images: Vec<Digest>,
    /// Blobs removed.
    pub deleted_blobs: Vec<Digest>,
    /// Snapshots removed (by key).
    pub deleted_snapshots: Vec<Digest>,
    /// Bytes freed on disk (garbage and stale temps included).
    pub reclaimed: u64,
}

/// What keeps blobs and snapshots alive (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct Roots {
    /// Blobs of recorded images (manifests, configs, layers).
    pub image_blobs: BTreeSet<Digest>,
    /// Chain IDs of recorded images' layers.
    pub image_snapshots: BTreeSet<Digest>,
    /// Snapshots that containers' root filesystems are made of.
    pub container_snapshots: BTreeSet<Digest>,
    /// Diff IDs of recorded images' layers.
    pub image_diff_ids: BTreeSet<Digest>,
    /// Build cache records.
    pub records: Vec<(String, Record)>,
    /// Whether any container record exists.
    pub any_container: bool,
}

impl Roots {
    /// Reads every root. Images whose manifests are missing or damaged still protect whatever
    /// of them can be read. Taken under the metadata lock, so a concurrent tag is not half seen.
    pub fn read(store: &Store) -> Result<Roots, ImageError> {
        let _meta = store.meta_lock().map_err(ImageError::Lock)?;
        let mut roots = Roots::default();
        let images = store.images();
        let index = images.index()?;
        // An index keeps its own blob; its platform images are image records of their own.
        roots.image_blobs.extend(index.indexes.keys().copied());
        for manifest in index.images.keys() {
            roots.image_blobs.insert(*manifest);
            let Ok(bytes) = store.content().read_limited(manifest, MAX_JSON_BYTES) else {
                continue;
            };
            let Ok(m) = serde_json::from_slice::<ImageManifest>(&bytes) else {
                continue;
            };
            roots.image_blobs.extend(kiln_digest(m.config().digest()));
            roots
                .image_blobs
                .extend(m.layers().iter().filter_map(|l| kiln_digest(l.digest())));
            if let Ok(img) = images.get(manifest) {
                roots.image_snapshots.extend(img.chain_ids());
                roots.image_diff_ids.extend(img.layers.iter().map(|l| l.diff_id));
            }
        }
        let (snaps, any) = container_snapshots(store);
        roots.container_snapshots = snaps;
        roots.any_container = any;
        roots.records = cache_index(store).all();
        Ok(roots)
    }

    /// Every blob something needs: the images' and the cache records'.
    pub fn live_blobs(&self) -> BTreeSet<Digest> {
        let mut live = self.image_blobs.clone();
        for (_, r) in &self.records {
            live.extend(r.layers.iter().map(|l| l.blob));
        }
        live
    }

    /// Every snapshot something needs directly (their parents are needed too).
    pub fn live_snapshots(&self) -> BTreeSet<Digest> {
        let mut live = self.image_snapshots.clone();
        live.extend(self.container_snapshots.iter().copied());
        for (_, r) in &self.records {
            live.extend(r.layers.iter().map(|l| l.snapshot));
        }
        live
    }

    /// The snapshots among `dirs` to keep: every live one and the parents below it.
    pub fn kept_snapshots(&self, dirs: &[SnapshotDir]) -> BTreeSet<Digest> {
        with_parents(self.live_snapshots(), &parent_map(dirs))
    }
}

/// Each snapshot's parent, as its record says.
type Parents = BTreeMap<Digest, Option<Digest>>;

fn parent_map(dirs: &[SnapshotDir]) -> Parents {
    dirs.iter().map(|s| (s.key, s.parent)).collect()
}

/// `start` and every snapshot below one of them.
fn with_parents(start: impl IntoIterator<Item = Digest>, parents: &Parents) -> BTreeSet<Digest> {
    let mut out = BTreeSet::new();
    for key in start {
        let mut cur = Some(key);
        while let Some(k) = cur {
            if !out.insert(k) {
                break;
            }
            cur = parents.get(&k).copied().flatten();
        }
    }
    out
}

/// The snapshot keys named by containers' lower dirs (`Rootfs.Lower`: `.../snapshots/<hex>/fs`),
/// and whether any container directory exists.
fn container_snapshots(store: &Store) -> (BTreeSet<Digest>, bool) {
    let mut out = BTreeSet::new();
    let Ok(rd) = fs::read_dir(store.containers_dir()) else {
        return (out, false);
    };
    let mut any = false;
    for entry in rd.flatten() {
        if !entry.path().is_dir() {
            continue;
        }
        any = true;
        let Ok(bytes) = fs::read(entry.path().join("config.json")) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        let lowers = v
            .get("Rootfs")
            .and_then(|r| r.get("Lower"))
            .and_then(|l| l.as_array())
            .cloned()
            .unwrap_or_default();
        for l in lowers {
            let Some(p) = l.as_str() else { continue };
            let key = Path::new(p)
                .parent()
                .and_then(|d| d.file_name())
                .and_then(|n| n.to_str())
                .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok());
            out.extend(key);
        }
    }
    (out, any)
}

fn cache_index(store: &Store) -> CacheIndex {
    CacheIndex::at(&store.cache_dir().join("index"))
}

/// Removes dangling (or unused) image records, then the garbage (see [`sweep`]).
pub fn prune(store: &Store, opts: PruneOptions, on_wait: impl FnOnce()) -> Result<PruneReport, GcError> {
    prune_matching(store, opts, on_wait, |_| true)
}

/// [`prune`], removing only the images `matches` accepts (`image prune --filter`).
pub fn prune_matching(
    store: &Store,
    opts: PruneOptions,
    on_wait: impl FnOnce(),
    matches: impl Fn(&crate::images::Image) -> bool,
) -> Result<PruneReport, GcError> {
    let _gc = store.gc_lock(opts.wait, on_wait).map_err(GcError::Lock)?;
    let images = store.images();
    let mut report = PruneReport::default();
    let list = images.list().map_err(GcError::Images)?;
    let mut remove = Vec::new();
    for (manifest, _, tags) in list {
        if !tags.is_empty() && !opts.all {
            continue;
        }
        let id = match images.get(&manifest) {
            Ok(img) => {
                if !matches(&img) || !images.containers_using(&img).map_err(GcError::Images)?.is_empty() {
                    continue;
                }
                img.config_digest
            }
            Err(_) => manifest,
        };
        remove.push((manifest, id, tags));
    }
    // Indexes go as images do (dangling ones, or all unused ones with `all`), taking their
    // platform images with them.
    for (digest, _, tags) in images.list_indexes().map_err(GcError::Images)? {
        if !tags.is_empty() && !opts.all {
            continue;
        }
        if let Ok(ix) = images.get_index(&digest) {
            let mut used = false;
            for e in ix.entries.iter().filter(|e| e.present) {
                if let Ok(img) = images.get(&e.manifest) {
                    used |= !images.containers_using(&img).map_err(GcError::Images)?.is_empty();
                }
            }
            if used {
                continue;
            }
        }
        images.delete(&digest).map_err(GcError::Images)?;
        report.untagged.extend(tags);
        report.deleted_images.push(digest);
    }
    if !remove.is_empty() {
        images
            .update(|index| {
                for (manifest, _, _) in &remove {
                    index.images.remove(manifest);
                    index.tags.retain(|_, d| d != manifest);
                }
                Ok(())
            })
            .map_err(GcError::Images)?;
    }
    for (_, id, tags) in remove {
        report.untagged.extend(tags);
        if !report.deleted_images.contains(&id) {
            report.deleted_images.push(id);
        }
    }
    let swept = sweep(store)?;
    report.deleted_blobs = swept.blobs;
    report.deleted_snapshots = swept.snapshots;
    report.reclaimed = swept.bytes;
    Ok(report)
}

/// What a sweep removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Blobs removed.
    pub blobs: Vec<Digest>,
    /// Snapshots removed.
    pub snapshots: Vec<Digest>,
    /// Cache records removed because a blob they name is gone.
    pub records: Vec<String>,
    /// Stale temps removed.
    pub temps: Vec<PathBuf>,
    /// Bytes freed on disk.
    pub bytes: u64,
}

/// Removes the garbage when no build holds the store; does nothing (returns `None`) when one
/// does. For commands like `rmi` that must not wait.
pub fn collect_if_idle(store: &Store) -> Result<Option<Swept>, GcError> {
    match store.gc_lock(false, || {}) {
        Ok(_gc) => sweep(store).map(Some),
        Err(StoreError::Busy { .. }) => Ok(None),
        Err(e) => Err(GcError::Lock(e)),
    }
}

/// Bytes a blob takes on disk (0 when it is gone).
fn blob_disk(store: &Store, d: &Digest) -> u64 {
    store.content().disk_usage(d)
}

/// Removes lineage records (`cache/lineage/<vertex>`: the snapshot a copy last produced) whose
/// snapshot is gone. Best effort: a stale record only means no files to link.
fn prune_lineage(store: &Store, snapshots: &Snapshots) {
    let Ok(dir) = fs::read_dir(store.cache_dir().join("lineage")) else {
        return;
    };
    for entry in dir.flatten() {
        let live = fs::read_to_string(entry.path())
            .ok()
            .and_then(|hex| Digest::parse(&format!("sha256:{}", hex.trim())).ok())
            .is_some_and(|key| snapshots.get(&key).is_some());
        if !live {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Removes push hints (`registry/sources/<blob>`, `registry/gzip/<diff ID>`) of layers that are
/// gone. Best effort: a missing hint only costs an upload.
fn prune_registry_hints(store: &Store, live_blobs: &BTreeSet<Digest>, live_diff_ids: &BTreeSet<Digest>) {
    for (sub, live) in [("sources", live_blobs), ("gzip", live_diff_ids)] {
        let Ok(rd) = fs::read_dir(store.root().join("registry").join(sub)) else {
            continue;
        };
        for entry in rd.flatten() {
            let keep = entry
                .file_name()
                .to_str()
                .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok())
                .is_some_and(|d| live.contains(&d));
            if !keep {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Deletes everything no root keeps (see the module docs) and returns what it removed. The
/// caller holds the GC lock.
pub fn sweep(store: &Store) -> Result<Swept, GcError> {
    let mut swept = Swept::default();
    // Temps first: a stale unpack or record write must not be mistaken for anything.
    let cleaned = crate::temp::clean_stale(store, true);
    swept.temps = cleaned.paths;
    swept.bytes += cleaned.bytes;

    let index = cache_index(store);
    let content = store.content();
    // Records naming a blob that is gone can never be used again.
    for (key, record) in index.all() {
        if record.layers.iter().any(|l| !content.contains(&l.blob)) {
            index.remove(&key);
            swept.records.push(key);
        }
    }
    let roots = Roots::read(store).map_err(GcError::Images)?;
    let mut live = roots.live_blobs();
    content.add_recipe_sources(&mut live);
    for d in content.list().map_err(GcError::Content)? {
        if live.contains(&d) {
            continue;
        }
        swept.bytes += blob_disk(store, &d);
        content.delete(&d).map_err(GcError::Content)?;
        swept.blobs.push(d);
    }
    let snapshots = Snapshots::open(&store.snapshots_dir()).map_err(GcError::Snapshots)?;
    let dirs = snapshots.dirs().map_err(GcError::Snapshots)?;
    // Keep live snapshots and everything below them.
    let keep = roots.kept_snapshots(&dirs);
    for snap in dirs.iter().filter(|s| !keep.contains(&s.key)) {
        let bytes = snapshots.disk_usage(&snap.key);
        if snapshots.remove(&snap.key).map_err(GcError::Snapshots)? {
            swept.bytes += bytes;
            swept.snapshots.push(snap.key);
        }
    }
    swept.bytes += snapshots
        .remove_retired(!roots.any_container)
        .map_err(GcError::Snapshots)?;
    // Flattened views of stacks whose snapshots are gone (their files are links: only their
    // directories take space).
    swept.bytes += snapshots.sweep_flats().map_err(GcError::Snapshots)?.1;
    snapshots.remove_unused_locks();
    prune_lineage(store, &snapshots);
    let mut diff_ids = roots.image_diff_ids.clone();
    for (_, r) in &roots.records {
        diff_ids.extend(r.layers.iter().map(|l| l.diff_id));
    }
    prune_registry_hints(store, &live, &diff_ids);
    index.compact_usage().map_err(GcError::Index)?;
    Ok(swept)
}

/// The kind of a build cache entry, with what it is on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A layer named by cache records: its snapshot and blob.
    Layer {
        /// The snapshot key.
        snapshot: Digest,
        /// The blob.
        blob: Digest,
    },
    /// A snapshot nothing names.
    UnreferencedSnapshot(Digest),
    /// A blob nothing names.
    UnreferencedBlob(Digest),
    /// A `RUN --mount=type=cache` directory (`cache/mounts/<name>`).
    CacheMount(PathBuf),
    /// A build context's stat cache (`cache/context/<hex>`).
    ContextCache(PathBuf),
    /// The validators of an `ADD` URL (`cache/http/<hex>.json`).
    HttpValidators(PathBuf),
    /// A step of a running build (`snapshots/tmp/<name>`).
    Running(PathBuf),
}

/// One entry of the build cache, as `kiln builder du` lists it.
#[derive(Clone, Debug)]
pub struct CacheEntry {
    /// Its ID (25 hex digits of its key).
    pub id: String,
    /// What it is.
    pub kind: EntryKind,
    /// BuildKit's record type: `regular`, `exec.cachemount`, `source.local`, `internal`.
    pub record_type: &'static str,
    /// What made it (the step's progress name).
    pub description: String,
    /// Bytes on disk that removing it frees (parts an image or a container keeps are not
    /// counted; see `shared`).
    pub size: u64,
    /// A running build uses it.
    pub in_use: bool,
    /// It is still being written.
    pub mutable: bool,
    /// Part of it is also an image's or a container's.
    pub shared: bool,
    /// When it was made.
    pub created: Option<SystemTime>,
    /// When a build last used it.
    pub last_used: Option<SystemTime>,
    /// How many times builds used it (its creation included).
    pub usage_count: u64,
    /// The entry below it (for layers: the layer under it in the records naming it).
    pub parent: Option<String>,
}

fn entry_id(hex: &str) -> String {
    hex.chars().take(25).collect()
}

fn millis(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(t.max(0) as u64)
}

fn mtime(path: &Path) -> Option<SystemTime> {
    fs::symlink_metadata(path).and_then(|m| m.modified()).ok()
}

/// Lists the build cache (see the module docs). With `sizes` false, sizes are 0 (cheaper).
pub fn build_cache(store: &Store, sizes: bool) -> Result<Vec<CacheEntry>, GcError> {
    let roots = Roots::read(store).map_err(GcError::Images)?;
    let snapshots = Snapshots::open(&store.snapshots_dir()).map_err(GcError::Snapshots)?;
    let dirs = snapshots.dirs().map_err(GcError::Snapshots)?;
    let mut out = layer_entries(store, &roots, &snapshots, &dirs, sizes);
    garbage_entries(store, &roots, &snapshots, &dirs, sizes, &mut out)?;
    mount_entries(store, sizes, &mut out);
    file_cache_entries(store, sizes, &mut out);
    running_entries(&snapshots, sizes, &mut out);
    Ok(out)
}

/// The layers build cache records name, bottom first, so parents come before children.
fn layer_entries(
    store: &Store,
    roots: &Roots,
    snapshots: &Snapshots,
    dirs: &[SnapshotDir],
    sizes: bool,
) -> Vec<CacheEntry> {
    let index = cache_index(store);
    let usage = index.usage();
    let content = store.content();
    let mut out = Vec::new();
    struct LayerInfo {
        blob: Digest,
        description: String,
        parent: Option<Digest>,
        usage: Usage,
        record_time: Option<SystemTime>,
    }
    let mut layers: BTreeMap<Digest, LayerInfo> = BTreeMap::new();
    let mut order = Vec::new();
    for (key, record) in &roots.records {
        let u = usage.get(key).copied().unwrap_or_default();
        let record_time = mtime(&index.dir().join(format!("{key}.json")));
        let n = record.layers.len();
        for (i, l) in record.layers.iter().enumerate() {
            let info = layers.entry(l.snapshot).or_insert_with(|| {
                order.push(l.snapshot);
                LayerInfo {
                    blob: l.blob,
                    description: String::new(),
                    parent: i.checked_sub(1).map(|p| record.layers[p].snapshot),
                    usage: Usage::default(),
                    record_time: None,
                }
            });
            if i + 1 == n && info.description.is_empty() {
                info.description = record.description.clone();
            }
            let mut merged = info.usage;
            if u.count > 0 {
                merged = Usage {
                    first: if merged.count == 0 {
                        u.first
                    } else {
                        merged.first.min(u.first)
                    },
                    last: merged.last.max(u.last),
                    count: merged.count + u.count,
                };
            }
            info.usage = merged;
            info.record_time = info.record_time.max(record_time);
        }
    }
    let blobs = layers.iter().map(|(k, i)| (*k, i.blob)).collect();
    let below = Below::find(&order, &blobs, roots, &parent_map(dirs), content);
    for (n, key) in order.iter().enumerate() {
        let info = &layers[key];
        let snap_shared = below.owned_snaps.contains(key);
        let blob_shared = below.owned_blobs.contains(&info.blob);
        let snap_path = snapshots.dir().join(key.hex());
        let mut size = 0;
        if sizes {
            if !snap_shared {
                size += snapshots.disk_usage(key);
            }
            if !blob_shared {
                size += blob_disk(store, &info.blob);
            }
            size += below.size(n, store, snapshots);
        }
        let created = if info.usage.count > 0 {
            Some(millis(info.usage.first))
        } else {
            mtime(&snap_path.join("meta.json"))
                .or_else(|| content.file_of(&info.blob).and_then(|p| mtime(&p)))
        };
        let last_used = if info.usage.count > 0 {
            Some(millis(info.usage.last))
        } else {
            info.record_time.or(created)
        };
        let description = if info.description.is_empty() {
            format!("layer {}", &info.blob.hex()[..12])
        } else {
            info.description.clone()
        };
        out.push(CacheEntry {
            id: entry_id(&key.hex()),
            kind: EntryKind::Layer {
                snapshot: *key,
                blob: info.blob,
            },
            record_type: "regular",
            description,
            size,
            in_use: false,
            mutable: false,
            shared: snap_shared || blob_shared || below.shares(n),
            created,
            last_used,
            usage_count: info.usage.count.max(1),
            parent: info.parent.map(|p| entry_id(&p.hex())),
        });
    }

    out
}

/// What layer entries keep beyond their own snapshot and blob: the snapshots below a stacked
/// snapshot and the blobs a lazy blob's recipe reads, where no entry lists them and no image or
/// container owns them (an edited copy's result stacked on the earlier one outlives the
/// earlier one's record). Such a part is freed with the entries that keep it, so it is counted
/// in the first of them (in listing order); every entry that keeps one another entry keeps too
/// is marked shared.
struct Below {
    /// The snapshots images and containers own: theirs and every one below them.
    owned_snaps: BTreeSet<Digest>,
    /// The blobs images own: theirs and the ones their lazy blobs' recipes read.
    owned_blobs: BTreeSet<Digest>,
    /// Per entry (by position in the listing): the snapshots and blobs it keeps beyond its own.
    parts: Vec<Vec<Part>>,
    /// Per part, the entries keeping it.
    keepers: BTreeMap<Part, Vec<usize>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Snapshot(Digest),
    Blob(Digest),
}

impl Below {
    fn find(
        order: &[Digest],
        blobs: &BTreeMap<Digest, Digest>,
        roots: &Roots,
        parents: &Parents,
        content: &crate::content::ContentStore,
    ) -> Below {
        // Owned by images and containers: their snapshots with everything below, their blobs
        // with the recipes' sources.
        let owned = roots.image_snapshots.iter().chain(&roots.container_snapshots);
        let owned_snaps = with_parents(owned.copied(), parents);
        let mut owned_blobs = roots.image_blobs.clone();
        content.add_recipe_sources(&mut owned_blobs);
        let listed_blobs: BTreeSet<Digest> = blobs.values().copied().collect();
        let mut below = Below {
            owned_snaps,
            owned_blobs,
            parts: Vec::with_capacity(order.len()),
            keepers: BTreeMap::new(),
        };
        for (n, key) in order.iter().enumerate() {
            let mut parts = Vec::new();
            if !below.owned_snaps.contains(key) {
                let mut next = parents.get(key).copied().flatten();
                while let Some(p) = next {
                    // Counted by its own entry, or an image's (a loop in damaged records ends
                    // at a part already taken).
                    if blobs.contains_key(&p)
                        || below.owned_snaps.contains(&p)
                        || parts.contains(&Part::Snapshot(p))
                    {
                        break;
                    }
                    parts.push(Part::Snapshot(p));
                    next = parents.get(&p).copied().flatten();
                }
            }
            let blob = blobs[key];
            if !below.owned_blobs.contains(&blob) {
                for s in content.recipe_sources(&blob) {
                    if !listed_blobs.contains(&s) && !below.owned_blobs.contains(&s) {
                        parts.push(Part::Blob(s));
                    }
                }
            }
            for p in &parts {
                below.keepers.entry(*p).or_default().push(n);
            }
            below.parts.push(parts);
        }
        below
    }

    /// The disk use of the parts entry `n` is the first to keep.
    fn size(&self, n: usize, store: &Store, snapshots: &Snapshots) -> u64 {
        self.parts[n]
            .iter()
            .filter(|p| self.keepers[*p].first() == Some(&n))
            .map(|p| match p {
                Part::Snapshot(d) => snapshots.disk_usage(d),
                Part::Blob(d) => blob_disk(store, d),
            })
            .sum()
    }

    /// Whether entry `n` keeps a part with another entry.
    fn shares(&self, n: usize) -> bool {
        self.parts[n].iter().any(|p| self.keepers[p].len() > 1)
    }
}

/// Snapshots and blobs nothing keeps.
fn garbage_entries(
    store: &Store,
    roots: &Roots,
    snapshots: &Snapshots,
    dirs: &[SnapshotDir],
    sizes: bool,
    out: &mut Vec<CacheEntry>,
) -> Result<(), GcError> {
    let content = store.content();
    let kept = roots.kept_snapshots(dirs);
    for d in dirs.iter().filter(|d| !kept.contains(&d.key)) {
        out.push(CacheEntry {
            id: entry_id(&d.key.hex()),
            kind: EntryKind::UnreferencedSnapshot(d.key),
            record_type: "regular",
            description: "unreferenced layer".into(),
            size: if sizes { snapshots.disk_usage(&d.key) } else { 0 },
            in_use: false,
            mutable: false,
            shared: false,
            created: mtime(&d.path),
            last_used: mtime(&d.path),
            usage_count: 0,
            parent: d.parent.map(|p| entry_id(&p.hex())),
        });
    }
    let mut live_blobs = roots.live_blobs();
    content.add_recipe_sources(&mut live_blobs);
    for d in content.list().map_err(GcError::Content)? {
        if live_blobs.contains(&d) {
            continue;
        }
        out.push(CacheEntry {
            id: entry_id(&d.hex()),
            kind: EntryKind::UnreferencedBlob(d),
            record_type: "regular",
            description: "unreferenced blob".into(),
            size: if sizes { blob_disk(store, &d) } else { 0 },
            in_use: false,
            mutable: false,
            shared: false,
            created: content.file_of(&d).and_then(|p| mtime(&p)),
            last_used: content.file_of(&d).and_then(|p| mtime(&p)),
            usage_count: 0,
            parent: None,
        });
    }

    Ok(())
}

/// Cache mounts (`RUN --mount=type=cache`).
fn mount_entries(store: &Store, sizes: bool, out: &mut Vec<CacheEntry>) {
    let mounts = store.cache_dir().join("mounts");
    if let Ok(rd) = fs::read_dir(&mounts) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".lock") || name.starts_with('.') || !e.path().is_dir() {
                continue;
            }
            let in_use = crate::temp::locked(&mounts.join(format!("{name}.lock")));
            out.push(CacheEntry {
                id: entry_id(&name),
                kind: EntryKind::CacheMount(e.path()),
                record_type: "exec.cachemount",
                description: "cache mount (RUN --mount=type=cache)".into(),
                size: if sizes {
                    crate::temp::disk_usage(&e.path())
                } else {
                    0
                },
                in_use,
                mutable: true,
                shared: false,
                created: e.metadata().ok().and_then(|m| m.created().ok()),
                last_used: mtime(&e.path()),
                usage_count: 1,
                parent: None,
            });
        }
    }
}

/// Context stat caches and URL validators.
fn file_cache_entries(store: &Store, sizes: bool, out: &mut Vec<CacheEntry>) {
    for (sub, rtype, what) in [
        ("context", "source.local", "local context stat cache"),
        ("http", "internal", "validators of an ADD URL"),
    ] {
        let Ok(rd) = fs::read_dir(store.cache_dir().join(sub)) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // a temp (see crate::temp)
            }
            let path = e.path();
            out.push(CacheEntry {
                id: entry_id(name.trim_end_matches(".json")),
                kind: if sub == "context" {
                    EntryKind::ContextCache(path.clone())
                } else {
                    EntryKind::HttpValidators(path.clone())
                },
                record_type: rtype,
                description: what.into(),
                size: if sizes { crate::temp::disk_usage(&path) } else { 0 },
                in_use: false,
                mutable: false,
                shared: false,
                created: mtime(&path),
                last_used: mtime(&path),
                usage_count: 1,
                parent: None,
            });
        }
    }
}

/// Steps of running builds.
fn running_entries(snapshots: &Snapshots, sizes: bool, out: &mut Vec<CacheEntry>) {
    if let Ok(rd) = fs::read_dir(snapshots.dir().join("tmp")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if crate::temp::classify(&e.path(), &name) != crate::temp::State::Live {
                continue;
            }
            out.push(CacheEntry {
                id: entry_id(&name.replace('-', "")),
                kind: EntryKind::Running(e.path()),
                record_type: "regular",
                description: "a step of a running build".into(),
                size: if sizes {
                    crate::temp::disk_usage(&e.path())
                } else {
                    0
                },
                in_use: true,
                mutable: true,
                shared: false,
                created: mtime(&e.path()),
                last_used: Some(SystemTime::now()),
                usage_count: 1,
                parent: None,
            });
        }
    }
}

/// Which entries a build cache prune (or `du`) considers: Docker's `--filter` keys.
#[derive(Clone, Debug, Default)]
pub struct CacheFilter {
    /// `until=DURATION` (also `unused-for`): only entries not used for this long.
    pub until: Option<Duration>,
    /// `type=TYPE`.
    pub types: Vec<String>,
    /// `id=ID` (a prefix of the ID).
    pub ids: Vec<String>,
    /// `description=TEXT` (a part of the description).
    pub descriptions: Vec<String>,
    /// `inuse` / `inuse=false`.
    pub in_use: Option<bool>,
    /// `shared` / `private`.
    pub shared: Option<bool>,
}

impl CacheFilter {
    /// Parses `--filter` values. Unknown keys are an error naming them.
    pub fn parse(values: &[String]) -> Result<CacheFilter, String> {
        let mut f = CacheFilter::default();
        for v in values {
            let (k, val) = match v.split_once('=') {
                Some((k, val)) => (k.trim(), Some(val.trim())),
                None => (v.trim(), None),
            };
            let flag = |val: Option<&str>| match val {
                None | Some("true" | "1") => Ok(true),
                Some("false" | "0") => Ok(false),
                Some(other) => Err(format!("invalid filter `{v}`: `{other}` is not a boolean")),
            };
            let need = |val: Option<&str>| {
                val.filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| format!("invalid filter `{v}`: `{k}` needs a value"))
            };
            match k {
                "until" | "unused-for" | "unused_for" => {
                    f.until = Some(parse_duration(&need(val)?).map_err(|e| format!("invalid filter `{v}`: {e}"))?)
                }
                "type" => f.types.push(need(val)?),
                "id" => f.ids.push(need(val)?),
                "description" => f.descriptions.push(need(val)?),
                "inuse" => f.in_use = Some(flag(val)?),
                "shared" => f.shared = Some(flag(val)?),
                "private" => f.shared = Some(!flag(val)?),
                other => {
                    return Err(format!(
                        "invalid filter `{v}`: unknown key `{other}` (expected until, unused-for, type, id, description, inuse, shared or private)"
                    ))
                }
            }
        }
        Ok(f)
    }

    /// Whether the entry passes the filter at `now`.
    pub fn matches(&self, e: &CacheEntry, now: SystemTime) -> bool {
        if let Some(until) = self.until {
            let cutoff = now.checked_sub(until).unwrap_or(SystemTime::UNIX_EPOCH);
            if e.last_used.is_some_and(|t| t > cutoff) {
                return false;
            }
        }
        (self.types.is_empty() || self.types.iter().any(|t| t == e.record_type))
            && (self.ids.is_empty() || self.ids.iter().any(|i| e.id.starts_with(i.as_str())))
            && (self.descriptions.is_empty()
                || self
                    .descriptions
                    .iter()
                    .any(|d| e.description.contains(d.as_str())))
            && self.in_use.is_none_or(|u| u == e.in_use)
            && self.shared.is_none_or(|s| s == e.shared)
    }
}

/// Parses a Go duration (`24h`, `2h30m`, `90s`, `1.5h`, `500ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    kiln_dag::units::go_duration(s).map_err(|e| format!("{e} (expected e.g. 24h, 2h30m, 90s)"))
}

/// Parses a size as Docker's `--keep-storage` does (`RAMInBytes`): a number with an optional
/// binary unit `b`, `k`, `m`, `g`, `t`, `p` (also `kb`, `kib`, ...; any case).
pub fn parse_size(s: &str) -> Result<u64, String> {
    kiln_dag::units::ram_in_bytes(s).map_err(|e| format!("{e} (expected e.g. 512mb, 10GB, 1073741824)"))
}

/// What `kiln builder prune` should remove.
#[derive(Clone, Debug, Default)]
pub struct BuilderPruneOptions {
    /// Also entries that share data with images, and internal ones (`-a`).
    pub all: bool,
    /// `--filter` values.
    pub filter: CacheFilter,
    /// `--keep-storage`: stop once the build cache is no larger than this (least recently used
    /// entries go first).
    pub keep_storage: Option<u64>,
    /// Wait for running builds instead of failing.
    pub wait: bool,
}

/// What a build cache prune removed.
#[derive(Clone, Debug, Default)]
pub struct BuilderPruneReport {
    /// IDs of the entries removed.
    pub deleted: Vec<String>,
    /// Bytes freed on disk (garbage and stale temps included).
    pub reclaimed: u64,
}

/// Removes build cache entries (see the module docs), then the garbage.
pub fn builder_prune(
    store: &Store,
    opts: &BuilderPruneOptions,
    on_wait: impl FnOnce(),
) -> Result<BuilderPruneReport, GcError> {
    let _gc = store.gc_lock(opts.wait, on_wait).map_err(GcError::Lock)?;
    prune_cache_locked(store, opts)
}

fn prune_cache_locked(store: &Store, opts: &BuilderPruneOptions) -> Result<BuilderPruneReport, GcError> {
    let now = SystemTime::now();
    let entries = build_cache(store, true)?;
    let mut candidates: Vec<&CacheEntry> = entries
        .iter()
        .filter(|e| !e.in_use)
        .filter(|e| opts.all || !(e.shared || e.record_type == "internal"))
        .filter(|e| opts.filter.matches(e, now))
        .collect();
    let index = cache_index(store);
    let records = index.all();
    // Which records name each layer: removing a layer entry removes every record naming it.
    let mut naming: BTreeMap<Digest, Vec<usize>> = BTreeMap::new();
    for (i, (_, record)) in records.iter().enumerate() {
        for l in &record.layers {
            naming.entry(l.snapshot).or_default().push(i);
        }
    }
    let mut doomed = vec![false; records.len()];
    let mut direct: Vec<&CacheEntry> = Vec::new();
    if let Some(keep) = opts.keep_storage {
        // Least recently used first (a layer below another goes after it: its last use is never
        // older), until what is left fits. Removing a layer frees it and every layer that only
        // the records it takes along named.
        let by_id: BTreeMap<&str, &CacheEntry> = entries.iter().map(|e| (e.id.as_str(), e)).collect();
        let depth = |e: &CacheEntry| {
            let mut d = 0usize;
            let mut cur = e.parent.as_deref();
            while let Some(p) = cur.and_then(|p| by_id.get(p)) {
                d += 1;
                if d > 4096 {
                    break;
                }
                cur = p.parent.as_deref();
            }
            d
        };
        candidates.sort_by_key(|e| (e.last_used, std::cmp::Reverse(depth(e))));
        let size_of_layer: BTreeMap<Digest, u64> = entries
            .iter()
            .filter_map(|e| match e.kind {
                EntryKind::Layer { snapshot, .. } => Some((snapshot, e.size)),
                _ => None,
            })
            .collect();
        let mut freed: BTreeSet<Digest> = BTreeSet::new();
        let mut total: u64 = entries.iter().map(|e| e.size).sum();
        for e in candidates {
            if total <= keep {
                break;
            }
            // An entry that frees nothing itself (its data is an image's) would only take the
            // records above it along.
            if e.size == 0 {
                continue;
            }
            match &e.kind {
                EntryKind::Layer { snapshot, .. } => {
                    if freed.contains(snapshot) {
                        continue;
                    }
                    let mut touched = BTreeSet::new();
                    for &i in naming.get(snapshot).into_iter().flatten() {
                        if !doomed[i] {
                            doomed[i] = true;
                            touched.extend(records[i].1.layers.iter().map(|l| l.snapshot));
                        }
                    }
                    for l in touched {
                        let still_named = naming.get(&l).into_iter().flatten().any(|&i| !doomed[i]);
                        if !still_named && freed.insert(l) {
                            total = total.saturating_sub(size_of_layer.get(&l).copied().unwrap_or(0));
                        }
                    }
                }
                _ => {
                    total = total.saturating_sub(e.size);
                    direct.push(e);
                }
            }
        }
    } else {
        for e in candidates {
            match &e.kind {
                EntryKind::Layer { snapshot, .. } => {
                    for &i in naming.get(snapshot).into_iter().flatten() {
                        doomed[i] = true;
                    }
                }
                _ => direct.push(e),
            }
        }
    }
    let mut report = BuilderPruneReport::default();
    for e in direct {
        match &e.kind {
            EntryKind::CacheMount(dir) => {
                let lock_path = dir.with_extension("lock");
                let lock = fs::File::open(&lock_path).ok();
                if lock.as_ref().is_some_and(|l| l.try_lock().is_err()) {
                    continue; // taken by a build since it was listed
                }
                report.reclaimed += crate::temp::disk_usage(dir);
                crate::temp::remove_any(dir).map_err(|source| GcError::Remove {
                    path: dir.clone(),
                    source,
                })?;
                let _ = fs::remove_file(&lock_path);
            }
            EntryKind::ContextCache(path) | EntryKind::HttpValidators(path) => {
                report.reclaimed += crate::temp::disk_usage(path);
                crate::temp::remove_any(path).map_err(|source| GcError::Remove {
                    path: path.clone(),
                    source,
                })?;
            }
            // Swept below (garbage), or not removable (a running step).
            EntryKind::Layer { .. }
            | EntryKind::UnreferencedSnapshot(_)
            | EntryKind::UnreferencedBlob(_)
            | EntryKind::Running(_) => {}
        }
    }
    for (i, (key, _)) in records.iter().enumerate() {
        if doomed[i] {
            report.reclaimed += fs::symlink_metadata(index.dir().join(format!("{key}.json")))
                .map(|m| m.blocks() * 512)
                .unwrap_or(0);
            index.remove(key);
        }
    }
    let swept = sweep(store)?;
    report.reclaimed += swept.bytes;
    // Every entry that is no longer there was removed, directly or because what kept it went.
    let after: BTreeSet<String> = build_cache(store, false)?.into_iter().map(|e| e.id).collect();
    report.deleted = entries
        .iter()
        .filter(|e| !e.in_use && !after.contains(&e.id))
        .map(|e| e.id.clone())
        .collect();
    Ok(report)
}

/// The build cache budget from `KILN_GC_KEEP_STORAGE` (unset or empty: none).
pub fn budget_from_env() -> Result<Option<u64>, String> {
    match std::env::var("KILN_GC_KEEP_STORAGE") {
        Ok(v) if !v.trim().is_empty() => parse_size(&v)
            .map(Some)
            .map_err(|e| format!("KILN_GC_KEEP_STORAGE: {e}")),
        _ => Ok(None),
    }
}

/// The automatic GC: when the build cache takes more than `budget`, removes the least recently
/// used entries (shared ones too, as `builder prune -a --keep-storage BUDGET` does) until it
/// fits. Runs only when nothing holds the store (returns `None` otherwise): call it after
/// dropping the caller's own hold.
pub fn auto_collect(store: &Store, budget: u64) -> Result<Option<BuilderPruneReport>, GcError> {
    let _gc = match store.gc_lock(false, || {}) {
        Ok(gc) => gc,
        Err(StoreError::Busy { .. }) => return Ok(None),
        Err(e) => return Err(GcError::Lock(e)),
    };
    let total: u64 = build_cache(store, true)?.iter().map(|e| e.size).sum();
    if total <= budget {
        return Ok(None);
    }
    let opts = BuilderPruneOptions {
        all: true,
        keep_storage: Some(budget),
        ..Default::default()
    };
    prune_cache_locked(store, &opts).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buildcache::Layer;
    use crate::images::LayerRef;
    use kiln_dag::image::ImageConfig;
    use oci_spec::image::MediaType;

    fn image(store: &Store, data: &[u8]) -> crate::images::Image {
        let l = store.content().put_bytes(data).unwrap();
        let layer = LayerRef {
            digest: l,
            diff_id: l,
            size: data.len() as u64,
            media_type: MediaType::ImageLayer,
        };
        store.images().create(&ImageConfig::default(), &[layer]).unwrap()
    }

    #[test]
    fn prune_keeps_tagged_and_removes_dangling() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let kept = image(&store, b"kept");
        store
            .images()
            .tag(&Reference::parse("kept").unwrap(), &kept.manifest_digest)
            .unwrap();
        let dangling = image(&store, b"dangling");
        let stray = store.content().put_bytes(b"stray").unwrap();
        let report = prune(&store, PruneOptions::default(), || {}).unwrap();
        assert_eq!(report.deleted_images, vec![dangling.config_digest]);
        for d in dangling.blobs().iter().chain([&stray]) {
            assert!(!store.content().contains(d), "{d}");
        }
        for d in kept.blobs() {
            assert!(store.content().contains(&d));
        }
        let report = prune(
            &store,
            PruneOptions {
                all: true,
                wait: false,
            },
            || {},
        )
        .unwrap();
        assert_eq!(report.deleted_images, vec![kept.config_digest]);
        assert!(store.content().list().unwrap().is_empty());
    }

    #[test]
    fn prune_refuses_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let stray = store.content().put_bytes(b"in progress").unwrap();
        let hold = store.hold().unwrap();
        let err = prune(&store, PruneOptions::default(), || {}).unwrap_err();
        assert!(matches!(err, GcError::Lock(StoreError::Busy { .. })));
        assert_eq!(collect_if_idle(&store).unwrap(), None);
        assert!(store.content().contains(&stray));
        drop(hold);
        assert_eq!(collect_if_idle(&store).unwrap().unwrap().blobs, vec![stray]);
    }

    #[test]
    fn prune_removes_only_unreferenced_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let img = image(&store, b"base layer");
        store
            .images()
            .tag(&Reference::parse("keep").unwrap(), &img.manifest_digest)
            .unwrap();
        let snaps = Snapshots::open(&store.snapshots_dir()).unwrap();
        let chain = img.chain_ids()[0];
        snaps
            .prepare(None)
            .unwrap()
            .commit(&chain, &img.layers[0].diff_id, 10)
            .unwrap();
        let orphan = Digest::of(b"orphan");
        snaps
            .prepare(Some(&chain))
            .unwrap()
            .commit(&orphan, &Digest::of(b"x"), 5)
            .unwrap();
        let lineage = store.cache_dir().join("lineage");
        std::fs::create_dir_all(&lineage).unwrap();
        std::fs::write(lineage.join("a"), chain.hex()).unwrap();
        std::fs::write(lineage.join("b"), orphan.hex()).unwrap();
        std::fs::write(lineage.join("c"), "garbage").unwrap();
        let report = prune(&store, PruneOptions::default(), || {}).unwrap();
        assert_eq!(report.deleted_snapshots, vec![orphan]);
        assert!(report.reclaimed > 0);
        assert!(snaps.get(&chain).is_some());
        assert!(snaps.get(&orphan).is_none());
        let mut left: Vec<_> = std::fs::read_dir(&lineage)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["a"], "lineage records of removed snapshots go with them");
    }

    /// A cache record of one layer (its snapshot committed) on top of `base`.
    fn record(store: &Store, base: &[Layer], name: &str, data: &[u8]) -> (String, Vec<Layer>) {
        let blob = store.content().put_bytes(data).unwrap();
        let snaps = Snapshots::open(&store.snapshots_dir()).unwrap();
        let key = Digest::of(format!("snap {name}").as_bytes());
        let m = snaps.prepare(None).unwrap();
        std::fs::write(m.upper().join("f"), data).unwrap();
        m.commit(&key, &blob, data.len() as u64).unwrap();
        let mut layers = base.to_vec();
        layers.push(Layer {
            snapshot: key,
            blob,
            diff_id: blob,
            size: data.len() as u64,
            media_type: crate::images::LAYER_MEDIA_TYPE.into(),
            created: None,
        });
        let index = CacheIndex::open(&store.cache_dir().join("index")).unwrap();
        let rkey = Digest::of(name.as_bytes()).hex();
        index
            .put(
                &rkey,
                &Record {
                    layers: layers.clone(),
                    description: format!("RUN {name}"),
                },
            )
            .unwrap();
        (rkey, layers)
    }

    fn ids_of(store: &Store) -> BTreeSet<String> {
        build_cache(store, false)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect()
    }

    #[test]
    fn builder_prune_all_empties_the_cache_and_keeps_images() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_, base) = record(&store, &[], "base", &[1u8; 20_000]);
        let (_, top) = record(&store, &base, "top", &[2u8; 30_000]);
        // An image of the top result: its blobs and chain snapshots are the image's.
        let img_layers: Vec<LayerRef> = top
            .iter()
            .map(|l| LayerRef {
                digest: l.blob,
                diff_id: l.diff_id,
                size: l.size,
                media_type: MediaType::ImageLayer,
            })
            .collect();
        let img = store
            .images()
            .create(&ImageConfig::default(), &img_layers)
            .unwrap();
        store
            .images()
            .tag(&Reference::parse("app").unwrap(), &img.manifest_digest)
            .unwrap();
        let mounts = store.cache_dir().join("mounts");
        std::fs::create_dir_all(mounts.join("m1")).unwrap();
        std::fs::write(mounts.join("m1/data"), vec![3u8; 40_000]).unwrap();
        std::fs::write(mounts.join("m1.lock"), b"").unwrap();
        let entries = build_cache(&store, true).unwrap();
        assert_eq!(entries.len(), 3, "{entries:#?}");
        let layer_sizes: Vec<u64> = entries.iter().take(2).map(|e| e.size).collect();
        assert!(
            layer_sizes.iter().all(|s| *s > 0),
            "snapshots are not the image's: {layer_sizes:?}"
        );
        assert!(
            entries.iter().take(2).all(|e| e.shared),
            "their blobs are the image's"
        );
        assert_eq!(entries[1].parent.as_deref(), Some(entries[0].id.as_str()));
        assert_eq!(entries[1].description, "RUN top");

        // Without -a: the layers share blobs with the image and stay; the mount goes.
        let report = builder_prune(&store, &BuilderPruneOptions::default(), || {}).unwrap();
        assert_eq!(report.deleted, vec![entries[2].id.clone()]);
        assert!(report.reclaimed >= 40_000);
        assert!(!mounts.join("m1").exists() && !mounts.join("m1.lock").exists());
        // With -a: everything; the image is whole.
        let report = builder_prune(
            &store,
            &BuilderPruneOptions {
                all: true,
                ..Default::default()
            },
            || {},
        )
        .unwrap();
        assert_eq!(report.deleted.len(), 2, "{report:?}");
        assert!(ids_of(&store).is_empty());
        assert!(crate::verify::verify(&store, false).unwrap().problems.is_empty());
        for d in img.blobs() {
            assert!(store.content().contains(&d));
        }
    }

    #[test]
    fn keep_storage_and_until_remove_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (old_key, _) = record(&store, &[], "old", &[1u8; 50_000]);
        let (new_key, _) = record(&store, &[], "new", &[2u8; 50_000]);
        // "old" was last used two days ago.
        let index = CacheIndex::at(&store.cache_dir().join("index"));
        let log = index.dir().join(".usage");
        let text = std::fs::read_to_string(&log).unwrap();
        let two_days = 2 * 86_400_000;
        let rewritten: String = text
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                if f[3] == old_key {
                    let t: i64 = f[0].parse::<i64>().unwrap() - two_days;
                    format!("{t} {t} 1 {}\n", f[3])
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&log, rewritten).unwrap();
        let entries = build_cache(&store, true).unwrap();
        let old_id = entries
            .iter()
            .find(|e| e.description == "RUN old")
            .unwrap()
            .id
            .clone();
        // until=24h: only the old one.
        let report = builder_prune(
            &store,
            &BuilderPruneOptions {
                filter: CacheFilter::parse(&["until=24h".into()]).unwrap(),
                ..Default::default()
            },
            || {},
        )
        .unwrap();
        assert_eq!(report.deleted, vec![old_id]);
        assert!(index.get(&new_key).is_some() && index.get(&old_key).is_none());
        // keep-storage larger than what is left: nothing; zero: everything.
        let report = builder_prune(
            &store,
            &BuilderPruneOptions {
                keep_storage: Some(10 << 20),
                ..Default::default()
            },
            || {},
        )
        .unwrap();
        assert!(report.deleted.is_empty());
        assert!(auto_collect(&store, 10 << 20).unwrap().is_none(), "under budget");
        let report = auto_collect(&store, 0).unwrap().unwrap();
        assert_eq!(report.deleted.len(), 1);
        assert!(index.all().is_empty());
    }

    #[test]
    fn containers_keep_their_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_, layers) = record(&store, &[], "run", b"x");
        let snap = layers[0].snapshot;
        let cdir = store.containers_dir().join("c1");
        std::fs::create_dir_all(&cdir).unwrap();
        let lower = store.snapshots_dir().join(snap.hex()).join("fs");
        std::fs::write(
            cdir.join("config.json"),
            serde_json::json!({"Image": "sha256:00", "Rootfs": {"Lower": [lower]}}).to_string(),
        )
        .unwrap();
        builder_prune(
            &store,
            &BuilderPruneOptions {
                all: true,
                ..Default::default()
            },
            || {},
        )
        .unwrap();
        let snaps = Snapshots::open(&store.snapshots_dir()).unwrap();
        assert!(snaps.get(&snap).is_some(), "a container's lower dir stays");
        std::fs::remove_dir_all(&cdir).unwrap();
        collect_if_idle(&store).unwrap();
        assert!(snaps.get(&snap).is_none());
    }

    #[test]
    fn filters_and_sizes_parse_like_docker() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("2h30m").unwrap(), Duration::from_secs(9000));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("10 days").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_size("512mb").unwrap(), 512 << 20);
        assert_eq!(parse_size("10GB").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5x").is_err());
        let err = CacheFilter::parse(&["label=x".into()]).unwrap_err();
        assert!(err.contains("unknown key `label`"), "{err}");
        let f = CacheFilter::parse(&["type=exec.cachemount".into(), "private".into()]).unwrap();
        assert_eq!(f.types, ["exec.cachemount"]);
        assert_eq!(f.shared, Some(false));
    }
}
