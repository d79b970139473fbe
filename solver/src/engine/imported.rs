//! A build cache imported from elsewhere (`--cache-from`: a registry, a directory, an image's
//! inline cache), as the engine sees it: records and copy-selection keys by name, and the blobs
//! they name, which stay where they are until something needs their files.
//!
//! A lookup that misses the local index asks the [`CacheSource`]; a hit returns the record's
//! layers as they are, remote blobs included, so a fully cached step costs no transfer. A blob is
//! fetched (and verified against its digest) only when a step reads files: unpacking a layer
//! under a RUN or a file op, hashing a copy source, seeding a cache mount. Exporting the image
//! into the store fetches the final image's layers; pushing it mounts them across repositories.
//!
//! A blob that fails its digest check is reported as [`EngineError::CacheBlob`]; the build then
//! marks it bad ([`CacheSource::reject`]), the records naming it stop matching, and the solve
//! runs again, rerunning those steps. A cache is trusted input: whoever can write it decides what
//! a cached step's result is (as with BuildKit's remote cache).

use std::fmt;

use kiln_cache::buildcache::{Layer, Record};
use kiln_cache::content::Unsynced;
use kiln_cache::Store;
use kiln_dag::Digest;

/// Why an imported blob could not be had.
pub type FetchError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An imported cache, read-only during a build.
pub trait CacheSource: Send + Sync + fmt::Debug {
    /// The record of `key` (64 hex digits), whose blobs may be absent from the content store.
    /// Records naming a rejected blob are not returned.
    fn record(&self, key: &str) -> Option<Record>;

    /// The content key of a copy source, by its memo name (see `contentkey`): what the exporting
    /// build computed from the same layers, so nothing is fetched to compute it again.
    fn selection(&self, memo: &str) -> Option<[u8; 32]>;

    /// The exported contents of the cache mount `id`, as one layer.
    fn mount_seed(&self, id: &str) -> Option<Layer>;

    /// Fetches `blob` into `store`'s content store, verified against its digest.
    fn fetch(&self, store: &Store, blob: &Digest) -> Result<(), FetchError>;

    /// Whether [`CacheSource::fetch_streaming`] can fetch `blob`.
    fn streams(&self, _blob: &Digest) -> bool {
        false
    }

    /// Fetches `blob` in one attempt, handing each chunk to `sink` as it arrives (an error of
    /// `sink` stops nothing), into `store`'s ingest dir: verified against its digest, not yet
    /// fsynced nor visible (the caller commits it). For sources that [`CacheSource::streams`];
    /// [`CacheSource::fetch`] (with its retries) is the way for everything else.
    fn fetch_streaming(
        &self,
        _store: &Store,
        blob: &Digest,
        _sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<Unsynced, FetchError> {
        Err(format!("blob {blob} cannot be streamed from this cache").into())
    }

    /// Marks `blob` bad (it failed its digest check): records naming it stop matching.
    fn reject(&self, blob: &Digest);
}

/// Every imported record, selection and mount seed the solve used or produced: what an export
/// writes. Collected by the engine as it looks up and records results.
#[derive(Clone, Debug, Default)]
pub struct SolvedCache {
    /// Cache key (hex) → the result, for every step that has one (executed or cached),
    /// intermediate stages included.
    pub records: std::collections::BTreeMap<String, Record>,
    /// Memo name → content key of every copy source from a filesystem the solve keyed.
    pub selections: std::collections::BTreeMap<String, [u8; 32]>,
    /// Cache mounts of the solve's RUN steps, by id: those a step mounted (or a cached step
    /// would have) and their contents, so a fully cached build still exports them.
    pub mounts: std::collections::BTreeMap<String, MountContents>,
}

/// Where a cache mount's contents are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountContents {
    /// The mount's directory in this store.
    Dir(std::path::PathBuf),
    /// Not here: the layer an imported cache holds for it.
    Imported(Layer),
}
