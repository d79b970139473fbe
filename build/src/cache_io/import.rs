//! `--cache-from`: each importer's config read (registry manifest, image with an inline cache,
//! directory), merged into one [`ImportedCache`], the engine's [`CacheSource`]. Blobs stay where
//! they are; [`ImportedCache::fetch`] brings one into the content store when a step needs it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use kiln_cache::buildcache::{Layer, Record};
use kiln_cache::content::Unsynced;
use kiln_cache::reference::Reference;
use kiln_cache::Store;
use kiln_dag::Digest;
use kiln_solver::engine::{CacheSource, FetchError};
use kiln_source::registry::meta::{BlobMeta, Compressed};
use kiln_source::registry::{media, Client};

use super::format::{chain_ids, CacheConfig};

/// Where a blob of an imported cache is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BlobSource {
    /// In this registry repository (`reference` names the repository; its tag is irrelevant).
    Registry { reference: Reference },
    /// In `DIR/blobs/sha256/` of an OCI layout.
    Dir(PathBuf),
}

/// One importer's config with where its blobs are, and each layer's descriptor.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub config: CacheConfig,
    /// For each of `config.layers`: (blob digest, size, media type).
    pub blobs: Vec<(Digest, u64, String)>,
    pub source: BlobSource,
}

impl Loaded {
    /// `config` with its layers' descriptors as the config names them (a layer without a
    /// digest is uncompressed: its diff ID is its blob).
    pub(crate) fn with_blobs(config: CacheConfig, source: BlobSource) -> Loaded {
        let blobs = config
            .layers
            .iter()
            .map(|l| {
                (
                    l.digest.unwrap_or(l.diff_id),
                    l.size.unwrap_or(0),
                    l.media_type
                        .clone()
                        .unwrap_or_else(|| media::OCI_LAYER.to_string()),
                )
            })
            .collect();
        Loaded {
            config,
            blobs,
            source,
        }
    }
}

/// Every importer's records, merged (the first importer naming a key wins).
#[derive(Debug, Default)]
pub struct ImportedCache {
    records: BTreeMap<String, Record>,
    selections: BTreeMap<String, [u8; 32]>,
    mounts: BTreeMap<String, Layer>,
    sources: HashMap<Digest, BlobSource>,
    rejected: Mutex<HashSet<Digest>>,
    client: Option<Client>,
    /// Bytes fetched from the importers (blobs only).
    fetched: AtomicU64,
}

fn parse_key(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl ImportedCache {
    /// An empty cache that fetches registry blobs with `client`.
    pub(crate) fn new(client: Option<Client>) -> ImportedCache {
        ImportedCache {
            client,
            ..ImportedCache::default()
        }
    }

    /// Adds one importer's config. A layer whose diff ID the content store holds as an
    /// uncompressed blob (a layer kiln made or imported here) is used from the store.
    pub(crate) fn add(&mut self, store: &Store, loaded: Loaded) {
        let Loaded {
            config,
            blobs,
            source,
        } = loaded;
        let content = store.content();
        if let BlobSource::Registry { reference } = &source {
            // Hints for pushes: the cache's blobs are in its repository (a push to another
            // repository of the registry mounts them), and a layer held here uncompressed has
            // the cache's compressed blob as its compressed form (found with one HEAD).
            let meta = BlobMeta::at(store.root());
            let repository = reference.repository();
            for (l, (digest, size, media_type)) in config.layers.iter().zip(&blobs) {
                let _ = meta.record_source(digest, &repository);
                let algorithm = match media_type.as_str() {
                    media::OCI_LAYER_GZIP | media::DOCKER_LAYER_GZIP => "gzip",
                    media::OCI_LAYER_ZSTD => "zstd",
                    _ => continue,
                };
                if content.contains(&l.diff_id) && meta.compressed(&l.diff_id, algorithm).is_none() {
                    let _ = meta.record_compressed(
                        &l.diff_id,
                        algorithm,
                        &Compressed {
                            digest: *digest,
                            size: *size,
                        },
                    );
                }
            }
        }
        let layers: Vec<(Digest, u64, String, Digest)> = config
            .layers
            .iter()
            .zip(&blobs)
            .map(|(l, (digest, size, media_type))| {
                if !content.contains(digest) && content.contains(&l.diff_id) {
                    let local_size = content.size(&l.diff_id).unwrap_or(*size);
                    (l.diff_id, local_size, media::OCI_LAYER.to_string(), l.diff_id)
                } else {
                    (*digest, *size, media_type.clone(), l.diff_id)
                }
            })
            .collect();
        for (digest, ..) in &layers {
            if !content.contains(digest) {
                self.sources.entry(*digest).or_insert_with(|| source.clone());
            }
        }
        for r in &config.records {
            if self.records.contains_key(&r.key) {
                continue;
            }
            let chain: Vec<&(Digest, u64, String, Digest)> =
                r.layers.iter().filter_map(|&i| layers.get(i)).collect();
            let diff_ids: Vec<Digest> = chain.iter().map(|l| l.3).collect();
            let snapshots = chain_ids(&diff_ids);
            let record = Record {
                layers: chain
                    .iter()
                    .zip(snapshots)
                    .enumerate()
                    .map(|(i, (l, snapshot))| Layer {
                        snapshot,
                        blob: l.0,
                        diff_id: l.3,
                        size: l.1,
                        media_type: l.2.clone(),
                        created: r.created.get(i).cloned().flatten(),
                    })
                    .collect(),
                description: r.description.clone(),
            };
            self.records.insert(r.key.clone(), record);
        }
        for (memo, key) in &config.selections {
            if let Some(k) = parse_key(key) {
                self.selections.entry(memo.clone()).or_insert(k);
            }
        }
        for m in &config.mounts {
            let Some(l) = layers.get(m.layer) else { continue };
            self.mounts.entry(m.id.clone()).or_insert_with(|| Layer {
                snapshot: l.3,
                blob: l.0,
                diff_id: l.3,
                size: l.1,
                media_type: l.2.clone(),
                created: None,
            });
        }
    }

    /// How many records were imported.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether nothing was imported.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.mounts.is_empty()
    }

    /// Blob bytes fetched so far.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Where `blob` can be fetched from, if it is an imported one.
    pub(crate) fn source_of(&self, blob: &Digest) -> Option<&BlobSource> {
        self.sources.get(blob)
    }

    /// Where `blob` comes from, ready to read: the registry client and repository, or the
    /// cache directory's file.
    fn open_source(&self, blob: &Digest) -> Result<Opened<'_>, FetchError> {
        let source = self
            .sources
            .get(blob)
            .ok_or_else(|| format!("blob {blob} is in none of the imported caches"))?;
        Ok(match source {
            BlobSource::Registry { reference } => Opened::Registry {
                client: self
                    .client
                    .as_ref()
                    .ok_or("no registry client for the imported cache")?,
                reference,
            },
            BlobSource::Dir(dir) => {
                let path = super::format::blob_path(dir, blob);
                Opened::Dir(
                    std::fs::File::open(&path)
                        .map_err(|e| format!("failed to open `{}`: {e}", path.display()))?,
                )
            }
        })
    }

    /// The size the imported records give `blob` (0, unchecked, when none does).
    fn size_of(&self, blob: &Digest) -> u64 {
        self.records
            .values()
            .flat_map(|r| r.layers.iter())
            .chain(self.mounts.values())
            .find(|l| l.blob == *blob)
            .map(|l| l.size)
            .unwrap_or(0)
    }

    fn rejected(&self, blob: &Digest) -> bool {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(blob)
    }
}

/// An imported blob's source, opened: see [`ImportedCache::open_source`].
enum Opened<'a> {
    Registry {
        client: &'a Client,
        reference: &'a Reference,
    },
    Dir(std::fs::File),
}

/// Reads `inner`, handing what it reads to `sink` too (whose errors stop nothing).
struct Tee<'a, R> {
    inner: R,
    sink: &'a mut dyn FnMut(&[u8]) -> std::io::Result<()>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            let _ = (self.sink)(&buf[..n]);
        }
        Ok(n)
    }
}

impl CacheSource for ImportedCache {
    fn record(&self, key: &str) -> Option<Record> {
        let r = self.records.get(key)?;
        if r.layers.iter().any(|l| self.rejected(&l.blob)) {
            return None;
        }
        Some(r.clone())
    }

    fn selection(&self, memo: &str) -> Option<[u8; 32]> {
        self.selections.get(memo).copied()
    }

    fn mount_seed(&self, id: &str) -> Option<Layer> {
        self.mounts.get(id).filter(|l| !self.rejected(&l.blob)).cloned()
    }

    fn fetch(&self, store: &Store, blob: &Digest) -> Result<(), FetchError> {
        let content = store.content();
        if content.contains(blob) {
            return Ok(());
        }
        match self.open_source(blob)? {
            Opened::Registry { client, reference } => {
                let size = self.size_of(blob);
                kiln_source::registry::fetch_blob(
                    client,
                    content,
                    reference,
                    blob,
                    size,
                    &kiln_source::registry::NoProgress,
                )?;
                self.fetched.fetch_add(size, Ordering::Relaxed);
            }
            Opened::Dir(f) => {
                let staged = content.stage(std::io::BufReader::new(f), Some(blob))?;
                let size = staged.size();
                staged.commit()?;
                self.fetched.fetch_add(size, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn streams(&self, blob: &Digest) -> bool {
        match self.sources.get(blob) {
            Some(BlobSource::Registry { .. }) => self.client.is_some(),
            Some(BlobSource::Dir(_)) => true,
            None => false,
        }
    }

    fn fetch_streaming(
        &self,
        store: &Store,
        blob: &Digest,
        sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<Unsynced, FetchError> {
        let content = store.content();
        let unsynced = match self.open_source(blob)? {
            Opened::Registry { client, reference } => kiln_source::registry::fetch_blob_streaming(
                client,
                content,
                reference,
                blob,
                self.size_of(blob),
                sink,
            )?,
            Opened::Dir(file) => content.stage_unsynced(Tee { inner: file, sink }, Some(blob))?,
        };
        self.fetched.fetch_add(unsynced.size(), Ordering::Relaxed);
        Ok(unsynced)
    }

    fn reject(&self, blob: &Digest) {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(*blob);
    }
}
