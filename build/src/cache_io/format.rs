//! kiln's build cache format, version 1: one JSON config blob listing records, plus the layer
//! blobs they name. The same config travels in three envelopes:
//!
//! - a registry or directory cache: an OCI image manifest whose config has the media type
//!   [`CONFIG_MEDIA_TYPE`] and whose layers are the cache's blobs (`image-manifest=false`: an OCI
//!   index listing the layers and then the config); a directory holds it as an OCI image layout;
//! - an inline cache: the config under [`INLINE_KEY`] in the image config of the image it
//!   describes, its layers named by diff ID only (their blobs are the image's own layers).
//!
//! ```json
//! {"kind": "kiln build cache", "version": 1, "key_version": 2,
//!  "layers":  [{"digest": "sha256:..", "size": 123, "media_type": "..tar+gzip", "diff_id": "sha256:.."}],
//!  "records": [{"key": "<64 hex>", "layers": [0, 1], "created": [null, "2026-..Z"], "description": "[2/3] RUN make"}],
//!  "selections": {"<memo hex>": "<64 hex>"},
//!  "mounts": [{"id": "/root/.cache/go-build", "layer": 2}]}
//! ```
//!
//! A record maps a cache key (`solver::cachekey`, portable: see ARCHITECTURE.md) to the layer
//! chain of the step's result, bottom first, with the time each layer was made (so a cached
//! rebuild dates its history, and gets its image ID, as the exporting build did). `selections`
//! carries the content keys of copy sources (`COPY --from`) by memo name: a build that finds the
//! source stage in the cache keys the copy without fetching the stage's layers. `mounts` carries
//! `RUN --mount=type=cache` contents. A config of another `kind`, `version` or `key_version`, and
//! BuildKit's `application/vnd.buildkit.cacheconfig.v0`, are ignored with a warning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_dag::Digest;
use kiln_source::registry::{media, SentBlob};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The media type of the cache config blob.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.kiln.cache.config.v1+json";
/// BuildKit's cache config (a foreign cache: ignored with a warning).
pub const BUILDKIT_CONFIG_MEDIA_TYPE: &str = "application/vnd.buildkit.cacheconfig.v0";
/// The image config key of an inline cache.
pub const INLINE_KEY: &str = "kiln.cache.v1";
/// BuildKit's inline cache key in an image config.
pub const BUILDKIT_INLINE_KEY: &str = "moby.buildkit.cache.v0";
/// The `kind` field.
pub const KIND: &str = "kiln build cache";
/// The format's version.
pub const VERSION: u32 = 1;

/// One layer blob of the cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheLayer {
    /// The blob as stored in the cache (absent in an inline cache: the image's layer with this
    /// diff ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
}

/// One step's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// The cache key, 64 hex digits.
    pub key: String,
    /// Indexes into [`CacheConfig::layers`], bottom first.
    pub layers: Vec<usize>,
    /// When each layer was made (RFC 3339), as the record had it.
    #[serde(default)]
    pub created: Vec<Option<String>>,
    /// The step's progress name.
    #[serde(default)]
    pub description: String,
}

/// A cache mount's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheMount {
    pub id: String,
    /// Index into [`CacheConfig::layers`].
    pub layer: usize,
}

/// The cache config blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    pub kind: String,
    pub version: u32,
    /// `solver::cachekey::KEY_VERSION` of the keys.
    pub key_version: u32,
    pub layers: Vec<CacheLayer>,
    pub records: Vec<CacheRecord>,
    #[serde(default)]
    pub selections: BTreeMap<String, String>,
    #[serde(default)]
    pub mounts: Vec<CacheMount>,
}

/// Why a config is not used.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("it is not JSON of kiln's cache format")]
    Json(#[source] serde_json::Error),
    #[error("it is a `{0}`, not a kiln build cache")]
    Kind(String),
    #[error("it is version {found} of kiln's cache format; this kiln reads version {VERSION}")]
    Version { found: u32 },
    #[error("its keys are of key version {found}; this kiln computes version {expected}")]
    KeyVersion { found: u32, expected: u32 },
    #[error("record {key} names layer {index}, which the cache does not list")]
    LayerIndex { key: String, index: usize },
}

impl CacheConfig {
    /// An empty config of this version.
    pub fn new() -> CacheConfig {
        CacheConfig {
            kind: KIND.into(),
            version: VERSION,
            key_version: kiln_solver::cachekey::KEY_VERSION,
            layers: Vec::new(),
            records: Vec::new(),
            selections: BTreeMap::new(),
            mounts: Vec::new(),
        }
    }

    /// Parses and checks a config (kind, versions, layer indexes).
    pub fn parse(bytes: &[u8]) -> Result<CacheConfig, FormatError> {
        let c: CacheConfig = serde_json::from_slice(bytes).map_err(FormatError::Json)?;
        c.check()?;
        Ok(c)
    }

    /// Checks a config read from JSON.
    pub fn check(&self) -> Result<(), FormatError> {
        if self.kind != KIND {
            return Err(FormatError::Kind(self.kind.clone()));
        }
        if self.version != VERSION {
            return Err(FormatError::Version { found: self.version });
        }
        let expected = kiln_solver::cachekey::KEY_VERSION;
        if self.key_version != expected {
            return Err(FormatError::KeyVersion {
                found: self.key_version,
                expected,
            });
        }
        for r in &self.records {
            if let Some(&index) = r.layers.iter().find(|&&i| i >= self.layers.len()) {
                return Err(FormatError::LayerIndex {
                    key: r.key.clone(),
                    index,
                });
            }
        }
        if let Some(m) = self.mounts.iter().find(|m| m.layer >= self.layers.len()) {
            return Err(FormatError::LayerIndex {
                key: format!("mount {}", m.id),
                index: m.layer,
            });
        }
        Ok(())
    }

    /// The JSON bytes (field order fixed by the struct, maps sorted: the same cache gives the
    /// same bytes, so an unchanged export is the same blob).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig::new()
    }
}

/// The chain IDs of a stack of diff IDs (OCI: the first is its diff ID, each next one
/// `sha256(parent + " " + diff_id)`): the snapshot keys of the layers.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => *d,
            Some(parent) => Digest::of(format!("{parent} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// The path of `digest` in the OCI image layout at `dir` (a `type=local` cache).
pub(crate) fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(digest.hex())
}

/// What a registry or directory cache holds besides its layers, once they are sent.
pub(crate) struct Envelope {
    /// The config, each layer's blob (digest, size, media type) filled in as sent.
    pub config: Vec<u8>,
    /// The manifest's media type: an OCI image manifest, or with `image-manifest=false` an index.
    pub media_type: &'static str,
    /// The manifest naming the layers and the config.
    pub manifest: Vec<u8>,
}

impl Envelope {
    /// The envelope of `planned` whose layers went out as `sent` (in the config's order). The
    /// one manifest writer of both a registry and a directory cache.
    pub(crate) fn of(planned: &CacheConfig, sent: &[SentBlob], image_manifest: bool) -> Envelope {
        let mut config = planned.clone();
        for (cl, s) in config.layers.iter_mut().zip(sent) {
            cl.digest = Some(s.digest);
            cl.size = Some(s.size);
            cl.media_type = Some(s.media_type.clone());
        }
        let config = config.to_bytes();
        let layer_descs: Vec<Value> = sent
            .iter()
            .map(|s| json!({"mediaType": s.media_type, "digest": s.digest.to_string(), "size": s.size}))
            .collect();
        let config_desc = json!({"mediaType": CONFIG_MEDIA_TYPE, "digest": Digest::of(&config).to_string(), "size": config.len()});
        let (media_type, manifest) = if image_manifest {
            (
                media::OCI_MANIFEST,
                json!({"schemaVersion": 2, "mediaType": media::OCI_MANIFEST, "config": config_desc, "layers": layer_descs}),
            )
        } else {
            let mut all = layer_descs;
            all.push(config_desc);
            (
                media::OCI_INDEX,
                json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": all}),
            )
        };
        Envelope {
            config,
            media_type,
            manifest: serde_json::to_vec(&manifest).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let mut c = CacheConfig::new();
        c.layers.push(CacheLayer {
            digest: Some(Digest::of(b"blob")),
            size: Some(4),
            media_type: Some("application/vnd.oci.image.layer.v1.tar+gzip".into()),
            diff_id: Digest::of(b"tar"),
        });
        c.records.push(CacheRecord {
            key: "ab".repeat(32),
            layers: vec![0],
            created: vec![Some("2026-01-01T00:00:00Z".into())],
            description: "RUN x".into(),
        });
        let back = CacheConfig::parse(&c.to_bytes()).unwrap();
        assert_eq!(back, c);
        let mut bad = c.clone();
        bad.version = 2;
        assert!(matches!(
            CacheConfig::parse(&bad.to_bytes()),
            Err(FormatError::Version { .. })
        ));
        let mut bad = c.clone();
        bad.key_version = 0;
        assert!(matches!(
            CacheConfig::parse(&bad.to_bytes()),
            Err(FormatError::KeyVersion { .. })
        ));
        let mut bad = c.clone();
        bad.records[0].layers = vec![3];
        assert!(matches!(
            CacheConfig::parse(&bad.to_bytes()),
            Err(FormatError::LayerIndex { .. })
        ));
        assert!(matches!(
            CacheConfig::parse(br#"{"layers":[],"records":[]}"#),
            Err(FormatError::Json(_))
        ));
        assert!(matches!(
            CacheConfig::parse(br#"{"kind":"other","version":1,"key_version":2,"layers":[],"records":[]}"#),
            Err(FormatError::Kind(_))
        ));
    }

    #[test]
    fn chain_ids_match_the_oci_rule() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let ids = chain_ids(&[a, b]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], Digest::of(format!("{a} {b}").as_bytes()));
    }
}
