//! Garbage collection: `kiln image prune` removes dangling (or, with `all`, unused) image
//! records, then every blob no remaining image references, and stale temp files.
//!
//! GC takes `ROOT/gc.lock` exclusively, so it never runs while a build, import or load holds
//! the store (see [`Store::hold`]): what they wrote but have not yet referenced survives.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use kiln_dag::Digest;
use oci_spec::image::ImageManifest;

use crate::content::ContentError;
use crate::images::{kiln_digest, ImageError, MAX_JSON_BYTES};
use crate::reference::Reference;
use crate::snapshot::{SnapshotError, Snapshots};
use crate::store::{Store, StoreError};

/// Temp files younger than this are left alone, in case a writer does not hold the store.
const STALE_INGEST: Duration = Duration::from_secs(600);

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
}

/// What `prune` should remove.
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
    /// Bytes freed.
    pub reclaimed: u64,
}

/// Every blob reachable from a recorded image: manifest, config, layers. Images whose
/// manifests are missing or damaged still protect whatever of them can be read.
pub fn live_blobs(store: &Store) -> Result<BTreeSet<Digest>, ImageError> {
    let index = store.images().index()?;
    let mut live = BTreeSet::new();
    for manifest in index.images.keys() {
        live.insert(*manifest);
        let Ok(bytes) = store.content().read_limited(manifest, MAX_JSON_BYTES) else {
            continue;
        };
        let Ok(m) = serde_json::from_slice::<ImageManifest>(&bytes) else {
            continue;
        };
        live.extend(kiln_digest(m.config().digest()));
        live.extend(m.layers().iter().filter_map(|l| kiln_digest(l.digest())));
    }
    // The build cache keeps what its records name until the cache itself is pruned.
    for (_, record) in build_cache(store).all() {
        live.extend(record.layers.iter().map(|l| l.blob));
    }
    Ok(live)
}

fn build_cache(store: &Store) -> crate::buildcache::CacheIndex {
    crate::buildcache::CacheIndex::at(&store.cache_dir().join("index"))
}

/// Removes dangling (or unused) image records, then unreferenced blobs and stale temp files.
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
    /// Bytes freed (blob sizes plus snapshot layer sizes).
    pub bytes: u64,
}

/// Removes unreferenced blobs and snapshots when no build holds the store; does nothing
/// (returns `None`) when one does. For commands like `rmi` that must not wait.
pub fn collect_if_idle(store: &Store) -> Result<Option<Swept>, GcError> {
    match store.gc_lock(false, || {}) {
        Ok(_gc) => sweep(store).map(Some),
        Err(StoreError::Busy { .. }) => Ok(None),
        Err(e) => Err(GcError::Lock(e)),
    }
}

/// Chain IDs of every recorded image's layers: the snapshots images keep alive.
///
/// Snapshots under other keys (build results) are unreferenced until the build cache index
/// registers them here.
pub fn live_snapshots(store: &Store) -> Result<BTreeSet<Digest>, ImageError> {
    let images = store.images();
    let mut live = BTreeSet::new();
    for manifest in images.index()?.images.keys() {
        if let Ok(img) = images.get(manifest) {
            live.extend(img.chain_ids());
        }
    }
    for (_, record) in build_cache(store).all() {
        live.extend(record.layers.iter().map(|l| l.snapshot));
    }
    Ok(live)
}

/// Removes lineage records (`cache/lineage/<vertex>`: the snapshot a copy last produced) whose
/// snapshot is gone. Best effort: a stale record only means no files to link.
fn prune_lineage(store: &Store, snapshots: &Snapshots) {
    let Ok(dir) = std::fs::read_dir(store.cache_dir().join("lineage")) else {
        return;
    };
    for entry in dir.flatten() {
        let live = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|hex| Digest::parse(&format!("sha256:{}", hex.trim())).ok())
            .is_some_and(|key| snapshots.get(&key).is_some());
        if !live {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Deletes blobs not in [`live_blobs`], snapshots not in [`live_snapshots`] (nor below one),
/// and stale temp files. The caller holds the GC lock.
fn sweep(store: &Store) -> Result<Swept, GcError> {
    let (live, live_snaps) = {
        // Read the records under the metadata lock so a concurrent tag is not half seen.
        let _meta = store.meta_lock().map_err(GcError::Lock)?;
        (
            live_blobs(store).map_err(GcError::Images)?,
            live_snapshots(store).map_err(GcError::Images)?,
        )
    };
    let (blobs, mut bytes) = sweep_blobs(store, &live)?;
    let snapshots = Snapshots::open(&store.snapshots_dir()).map_err(GcError::Snapshots)?;
    let all = snapshots.list().map_err(GcError::Snapshots)?;
    // Keep live snapshots and everything below them.
    let parents: std::collections::BTreeMap<Digest, Option<Digest>> =
        all.iter().map(|s| (s.key, s.parent)).collect();
    let mut keep = BTreeSet::new();
    for key in &live_snaps {
        let mut cur = Some(*key);
        while let Some(k) = cur {
            if !keep.insert(k) {
                break;
            }
            cur = parents.get(&k).copied().flatten();
        }
    }
    let mut removed = Vec::new();
    for snap in all.iter().filter(|s| !keep.contains(&s.key)) {
        if snapshots.remove(&snap.key).map_err(GcError::Snapshots)? {
            bytes += snap.size;
            removed.push(snap.key);
        }
    }
    snapshots.cleanup_stale_tmp().map_err(GcError::Snapshots)?;
    prune_lineage(store, &snapshots);
    Ok(Swept {
        blobs,
        snapshots: removed,
        bytes,
    })
}

fn sweep_blobs(store: &Store, live: &BTreeSet<Digest>) -> Result<(Vec<Digest>, u64), GcError> {
    let content = store.content();
    let mut deleted = Vec::new();
    let mut bytes = 0;
    for d in content.list().map_err(GcError::Content)? {
        if live.contains(&d) {
            continue;
        }
        bytes += content.size(&d).unwrap_or(0);
        content.delete(&d).map_err(GcError::Content)?;
        deleted.push(d);
    }
    if let Ok(entries) = std::fs::read_dir(content.ingest_dir()) {
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() > STALE_INGEST)
                .unwrap_or(false);
            if old {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok((deleted, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert!(snaps.get(&chain).is_some());
        assert!(snaps.get(&orphan).is_none());
        let mut left: Vec<_> = std::fs::read_dir(&lineage)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["a"], "lineage records of removed snapshots go with them");
    }
}
