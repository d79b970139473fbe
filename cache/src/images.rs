//! The image store: image records and tags in `ROOT/images.json`, manifests and configs in the
//! content store.
//!
//! An image is identified by its manifest digest; its ID (what `kiln images` shows, as Docker
//! does) is the config digest. `images.json` holds one record per image and a map from
//! normalised reference to manifest digest. An image without tags is "dangling" until
//! `kiln image prune` or `kiln rmi` removes its record; blobs are removed only by garbage
//! collection. The file is rewritten atomically (temp file, fsync, rename) under the exclusive
//! `ROOT/lock`.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use kiln_dag::image::ImageConfig;
use kiln_dag::Digest;
use oci_spec::image::{Descriptor, ImageManifest, MediaType};
use serde::{Deserialize, Serialize};

use crate::content::ContentError;
use crate::reference::{Reference, ReferenceError};
use crate::store::{Store, StoreError};

/// Largest manifest or config kiln reads into memory.
pub const MAX_JSON_BYTES: u64 = 16 << 20;

/// The OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The media type kiln gives the layers it creates.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// A failure of the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Locking the store failed.
    #[error("failed to lock the image store")]
    Lock(#[source] StoreError),
    /// `images.json` could not be read.
    #[error("failed to read `{path}`")]
    ReadIndex {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `images.json` is not valid.
    #[error("failed to parse `{path}`")]
    ParseIndex {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// `images.json` could not be written.
    #[error("failed to write `{path}`")]
    WriteIndex {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Nothing matches the name or ID.
    #[error("no such image: {0}")]
    NotFound(String),
    /// A short ID matches several images.
    #[error("image ID prefix `{prefix}` is ambiguous: it matches {count} images")]
    Ambiguous {
        /// The prefix.
        prefix: String,
        /// How many images match.
        count: usize,
    },
    /// The reference is not valid.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// A manifest or config blob could not be read.
    #[error("failed to read the {role} of image {manifest}")]
    ReadBlob {
        /// `manifest` or `config`.
        role: &'static str,
        /// The image's manifest digest.
        manifest: Digest,
        /// The cause.
        #[source]
        source: Box<ContentError>,
    },
    /// The manifest blob is not a valid image manifest.
    #[error("manifest {digest} is not a valid image manifest")]
    ParseManifest {
        /// The manifest digest.
        digest: Digest,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The config blob is not a valid image config.
    #[error("config {digest} of image {manifest} is not a valid image config")]
    ParseConfig {
        /// The config digest.
        digest: Digest,
        /// The manifest digest.
        manifest: Digest,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A descriptor or diff ID is not a sha256 digest.
    #[error("image {manifest}: {what} `{value}` is not a sha256 digest")]
    BadDigest {
        /// The manifest digest.
        manifest: Digest,
        /// What held the value.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// The config's diff IDs do not match the manifest's layers.
    #[error("image {manifest}: the manifest has {layers} layers but the config lists {diff_ids} diff IDs")]
    LayerCount {
        /// The manifest digest.
        manifest: Digest,
        /// Layers in the manifest.
        layers: usize,
        /// Diff IDs in the config.
        diff_ids: usize,
    },
    /// A blob named when creating an image is not in the store.
    #[error("layer blob {0} is not in the store")]
    MissingLayer(Digest),
    /// Writing a manifest or config blob failed.
    #[error("failed to store the {role} blob")]
    WriteBlob {
        /// `manifest` or `config`.
        role: &'static str,
        /// The cause.
        #[source]
        source: Box<ContentError>,
    },
    /// Serialising a manifest or config failed.
    #[error("failed to encode the {role}")]
    Encode {
        /// `manifest` or `config`.
        role: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The manifest could not be assembled.
    #[error("failed to build the image manifest")]
    BuildManifest {
        /// The cause.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// A container record could not be read.
    #[error("failed to read container records in `{path}`")]
    Containers {
        /// The directory or file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The manifest digest given to `tag` is not an image in the store.
    #[error("image {0} is not in the store")]
    UnknownImage(Digest),
    /// A tag must be a reference with a tag, not a digest.
    #[error("cannot tag with `{0}`: a digest reference is not a tag")]
    DigestTag(String),
    /// The name is an index without a manifest for the platform.
    #[error("image `{name}` has no manifest for platform {platform} (it has: {available})")]
    NoPlatform {
        /// The name.
        name: String,
        /// The platform asked for.
        platform: String,
        /// The platforms it has.
        available: String,
    },
    /// The index lists the platform, but its manifest was never fetched into this store.
    #[error("image `{name}` lists platform {platform} ({manifest}), which is not in the local store: pull it with `kiln pull --platform {platform} {name}`")]
    PlatformNotLocal {
        /// The name.
        name: String,
        /// The platform asked for.
        platform: String,
        /// Its manifest in the index.
        manifest: Digest,
    },
}

/// One image's record in `images.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// When the image entered this store (RFC 3339).
    pub added: String,
    /// When a tag last pointed at it (RFC 3339), Docker's `Metadata.LastTagTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tag_time: Option<String>,
}

/// One index's record in `images.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRecord {
    /// When the index entered this store (RFC 3339).
    pub added: String,
    /// When a tag last pointed at it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tag_time: Option<String>,
    /// The repository it was pulled from (`docker.io/library/alpine`), where the platforms not
    /// yet in the store are fetched from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
}

/// The contents of `images.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ImageIndex {
    /// Format version (1).
    pub version: u32,
    /// Image records by manifest digest.
    pub images: BTreeMap<Digest, ImageRecord>,
    /// Tags: normalised reference -> manifest or index digest.
    pub tags: BTreeMap<String, Digest>,
    /// Image indexes (one name, one image per platform) by digest; see [`crate::image_index`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub indexes: BTreeMap<Digest, IndexRecord>,
}

impl ImageIndex {
    /// The tags pointing at `manifest`, parsed.
    pub fn tags_of(&self, manifest: &Digest) -> Vec<Reference> {
        self.tags
            .iter()
            .filter(|(_, d)| *d == manifest)
            .filter_map(|(t, _)| Reference::parse(t).ok())
            .collect()
    }
}

/// A layer of an image: the manifest descriptor and the diff ID from the config.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageLayer {
    /// The manifest's descriptor of the blob (digest of the blob as stored).
    pub descriptor: Descriptor,
    /// The blob's digest.
    pub digest: Digest,
    /// The digest of the uncompressed tar.
    pub diff_id: Digest,
}

/// An image read from the store.
#[derive(Clone, Debug)]
pub struct Image {
    /// The manifest digest (what tags point at).
    pub manifest_digest: Digest,
    /// The manifest's exact bytes.
    pub manifest_bytes: Vec<u8>,
    /// The parsed manifest.
    pub manifest: ImageManifest,
    /// The config digest, the image ID.
    pub config_digest: Digest,
    /// The config's exact bytes.
    pub config_bytes: Vec<u8>,
    /// The parsed config (unknown fields kept).
    pub config: ImageConfig,
    /// Layers, base first.
    pub layers: Vec<ImageLayer>,
}

impl Image {
    /// The image ID (config digest), as Docker shows it.
    pub fn id(&self) -> Digest {
        self.config_digest
    }

    /// The 12-hex-digit short ID.
    pub fn short_id(&self) -> String {
        self.config_digest.hex()[..12].to_string()
    }

    /// Sum of the layer blob sizes.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.descriptor.size()).sum()
    }

    /// Every blob the image references: manifest, config, layers.
    pub fn blobs(&self) -> Vec<Digest> {
        let mut out = vec![self.manifest_digest, self.config_digest];
        out.extend(self.layers.iter().map(|l| l.digest));
        out
    }

    /// Chain IDs of the layers, base first (`ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(n))`).
    pub fn chain_ids(&self) -> Vec<Digest> {
        let mut out: Vec<Digest> = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let next = match out.last() {
                None => l.diff_id,
                Some(prev) => Digest::of(format!("{prev} {}", l.diff_id).as_bytes()),
            };
            out.push(next);
        }
        out
    }
}

/// A layer to put in a new image (see [`ImageStore::create`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRef {
    /// The blob's digest (the blob must be in the content store).
    pub digest: Digest,
    /// The digest of the uncompressed tar.
    pub diff_id: Digest,
    /// The blob's size.
    pub size: u64,
    /// The blob's media type, e.g. [`LAYER_MEDIA_TYPE`].
    pub media_type: MediaType,
}

/// Converts a kiln digest to an `oci-spec` digest.
pub fn oci_digest(d: &Digest) -> oci_spec::image::Digest {
    match d.hex().parse::<oci_spec::image::Sha256Digest>() {
        Ok(s) => s.into(),
        // A kiln digest is always 64 lowercase hex digits, which `Sha256Digest` accepts: this
        // branch does not depend on any input.
        Err(e) => unreachable!("sha256 digest {d} rejected by oci-spec: {e}"),
    }
}

/// Converts an `oci-spec` digest to a kiln digest, if it is sha256.
pub fn kiln_digest(d: &oci_spec::image::Digest) -> Option<Digest> {
    Digest::parse(d.as_ref()).ok()
}

/// The current time in RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    format_rfc3339(time::OffsetDateTime::now_utc())
}

/// `secs` since the epoch as RFC 3339 (SOURCE_DATE_EPOCH); out-of-range values clamp to the epoch.
pub fn rfc3339(secs: i64) -> String {
    format_rfc3339(
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    )
}

fn format_rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

/// The image store of one [`Store`].
#[derive(Clone, Debug)]
pub struct ImageStore {
    store: Store,
}

impl Store {
    /// The image store.
    pub fn images(&self) -> ImageStore {
        ImageStore::new(self.clone())
    }
}

impl ImageStore {
    pub(crate) fn new(store: Store) -> ImageStore {
        ImageStore { store }
    }

    pub(crate) fn content(&self) -> &crate::content::ContentStore {
        self.store.content()
    }

    fn index_path(&self) -> PathBuf {
        self.store.root().join("images.json")
    }

    /// Reads `images.json` (an empty index when it does not exist yet).
    pub fn index(&self) -> Result<ImageIndex, ImageError> {
        let path = self.index_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ImageIndex {
                    version: 1,
                    ..Default::default()
                })
            }
            Err(source) => return Err(ImageError::ReadIndex { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|source| ImageError::ParseIndex { path, source })
    }

    /// Runs `f` on the index under the exclusive store lock and writes the result atomically
    /// when `f` succeeds.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut ImageIndex) -> Result<T, ImageError>,
    ) -> Result<T, ImageError> {
        let _lock = self.store.meta_lock().map_err(ImageError::Lock)?;
        let mut index = self.index()?;
        let out = f(&mut index)?;
        index.version = 1;
        self.write_index(&index)?;
        Ok(out)
    }

    fn write_index(&self, index: &ImageIndex) -> Result<(), ImageError> {
        let bytes = serde_json::to_vec_pretty(index).map_err(|source| ImageError::Encode {
            role: "image index",
            source,
        })?;
        crate::paths::write_atomic(&self.index_path(), &bytes, true).map_err(|e| ImageError::WriteIndex {
            path: e.path,
            source: e.source,
        })
    }

    /// Reads the image whose manifest is `manifest` from the content store.
    pub fn get(&self, manifest: &Digest) -> Result<Image, ImageError> {
        let content = self.store.content();
        let manifest_bytes =
            content
                .read_limited(manifest, MAX_JSON_BYTES)
                .map_err(|source| ImageError::ReadBlob {
                    role: "manifest",
                    manifest: *manifest,
                    source: Box::new(source),
                })?;
        let parsed: ImageManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|source| ImageError::ParseManifest {
                digest: *manifest,
                source,
            })?;
        let bad = |what, value: &dyn std::fmt::Display| ImageError::BadDigest {
            manifest: *manifest,
            what,
            value: value.to_string(),
        };
        let config_digest = kiln_digest(parsed.config().digest())
            .ok_or_else(|| bad("config digest", parsed.config().digest()))?;
        let config_bytes = content
            .read_limited(&config_digest, MAX_JSON_BYTES)
            .map_err(|source| ImageError::ReadBlob {
                role: "config",
                manifest: *manifest,
                source: Box::new(source),
            })?;
        let config: ImageConfig =
            serde_json::from_slice(&config_bytes).map_err(|source| ImageError::ParseConfig {
                digest: config_digest,
                manifest: *manifest,
                source,
            })?;
        if parsed.layers().len() != config.rootfs.diff_ids.len() {
            return Err(ImageError::LayerCount {
                manifest: *manifest,
                layers: parsed.layers().len(),
                diff_ids: config.rootfs.diff_ids.len(),
            });
        }
        let mut layers = Vec::with_capacity(parsed.layers().len());
        for (desc, diff) in parsed.layers().iter().zip(&config.rootfs.diff_ids) {
            let digest = kiln_digest(desc.digest()).ok_or_else(|| bad("layer digest", desc.digest()))?;
            let diff_id = Digest::parse(diff).map_err(|_| bad("diff ID", diff))?;
            layers.push(ImageLayer {
                descriptor: desc.clone(),
                digest,
                diff_id,
            });
        }
        Ok(Image {
            manifest_digest: *manifest,
            manifest_bytes,
            manifest: parsed,
            config_digest,
            config_bytes,
            config,
            layers,
        })
    }

    /// Finds the manifest digest of an image by reference (`busybox`, `busybox:local`,
    /// `name@sha256:...`), full ID or manifest digest (`sha256:...`), or unambiguous ID prefix.
    pub fn resolve_digest(&self, name: &str) -> Result<Digest, ImageError> {
        let index = self.index()?;
        // A full digest: image ID (config) or manifest digest.
        if let Ok(d) = Digest::parse(name) {
            if index.images.contains_key(&d) || index.indexes.contains_key(&d) {
                return Ok(d);
            }
            return self.find_by_id(&index, &d.hex(), name);
        }
        if let Ok(r) = Reference::parse(name) {
            if let Some(d) = r.digest() {
                if index.images.contains_key(d) || index.indexes.contains_key(d) {
                    return Ok(*d);
                }
            } else if let Some(d) = index.tags.get(&r.to_string()) {
                return Ok(*d);
            }
        }
        let prefix = name.strip_prefix("sha256:").unwrap_or(name);
        if !prefix.is_empty()
            && prefix.len() <= 64
            && prefix
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return self.find_by_id(&index, prefix, name);
        }
        // Report an invalid reference as such.
        Reference::parse(name)?;
        Err(ImageError::NotFound(name.to_string()))
    }

    fn find_by_id(&self, index: &ImageIndex, prefix: &str, name: &str) -> Result<Digest, ImageError> {
        let mut found = Vec::new();
        for manifest in index.images.keys() {
            let Ok(image) = self.get(manifest) else { continue };
            if image.config_digest.hex().starts_with(prefix) && !found.contains(manifest) {
                found.push(*manifest);
            }
        }
        // Several manifests may share one config (same image ID): that is not ambiguous.
        let ids: std::collections::BTreeSet<Digest> = found
            .iter()
            .filter_map(|m| self.get(m).ok().map(|i| i.config_digest))
            .collect();
        match (found.first(), ids.len()) {
            (None, _) => Err(ImageError::NotFound(name.to_string())),
            (Some(m), 1) => Ok(*m),
            (_, count) => Err(ImageError::Ambiguous {
                prefix: prefix.to_string(),
                count,
            }),
        }
    }

    /// Resolves a name or ID (see [`ImageStore::resolve_digest`]) and reads the image; a name
    /// of an index gives its image for the host's platform (see [`ImageStore::resolve_for`]).
    pub fn resolve(&self, name: &str) -> Result<Image, ImageError> {
        self.resolve_for(name, &kiln_dag::Platform::host())
    }

    /// Writes the config (with `rootfs.diff_ids` set from `layers`) and an OCI manifest, and
    /// records the new image, untagged. Every layer blob must already be in the store.
    pub fn create(&self, config: &ImageConfig, layers: &[LayerRef]) -> Result<Image, ImageError> {
        self.create_annotated(config, layers, &BTreeMap::new())
    }

    /// [`ImageStore::create`] with `annotations` in the manifest (`--annotation manifest:K=V`),
    /// written after its other fields, in key order.
    pub fn create_annotated(
        &self,
        config: &ImageConfig,
        layers: &[LayerRef],
        annotations: &BTreeMap<String, String>,
    ) -> Result<Image, ImageError> {
        let content = self.store.content();
        for l in layers {
            if !content.contains(&l.digest) {
                return Err(ImageError::MissingLayer(l.digest));
            }
        }
        let mut config = config.clone();
        config.rootfs.kind = "layers".to_string();
        config.rootfs.diff_ids = layers.iter().map(|l| l.diff_id.to_string()).collect();
        let config_bytes = serde_json::to_vec(&config).map_err(|source| ImageError::Encode {
            role: "config",
            source,
        })?;
        let config_digest = Digest::of(&config_bytes);
        let manifest = build_manifest(
            Descriptor::new(
                MediaType::ImageConfig,
                config_bytes.len() as u64,
                oci_digest(&config_digest),
            ),
            layers
                .iter()
                .map(|l| Descriptor::new(l.media_type.clone(), l.size, oci_digest(&l.digest)))
                .collect(),
        )
        .map_err(|source| ImageError::BuildManifest { source })?;
        let manifest_bytes = serde_json::to_vec(&Annotated {
            inner: &manifest,
            annotations,
        })
        .map_err(|source| ImageError::Encode {
            role: "manifest",
            source,
        })?;
        // Both at once: the manifest is visible only after the config it names.
        let manifest_digest = Digest::of(&manifest_bytes);
        content
            .put_all(&[&config_bytes, &manifest_bytes])
            .map_err(|source| ImageError::WriteBlob {
                role: "config and manifest",
                source: Box::new(source),
            })?;
        self.register(&[manifest_digest], &[])?;
        self.get(&manifest_digest)
    }

    /// Records images whose manifests (and their blobs) are already in the store and points the
    /// given tags at them, in one atomic update of `images.json`.
    pub fn register(&self, manifests: &[Digest], tags: &[(Reference, Digest)]) -> Result<(), ImageError> {
        let now = now_rfc3339();
        self.update(|index| {
            for m in manifests {
                index.images.entry(*m).or_insert_with(|| ImageRecord {
                    added: now.clone(),
                    last_tag_time: None,
                });
            }
            for (r, d) in tags {
                set_tag(index, r, d, &now)?;
            }
            Ok(())
        })
    }

    /// Points `reference` at the image with manifest `manifest` (which must be recorded, or at
    /// least have its manifest blob in the store).
    pub fn tag(&self, reference: &Reference, manifest: &Digest) -> Result<(), ImageError> {
        if !self.store.content().contains(manifest) {
            return Err(ImageError::UnknownImage(*manifest));
        }
        let now = now_rfc3339();
        let is_index = self.is_index(manifest);
        self.update(|index| {
            if is_index {
                index.indexes.entry(*manifest).or_insert_with(|| IndexRecord {
                    added: now.clone(),
                    last_tag_time: None,
                    repository: None,
                });
            } else {
                index.images.entry(*manifest).or_insert_with(|| ImageRecord {
                    added: now.clone(),
                    last_tag_time: None,
                });
            }
            set_tag(index, reference, manifest, &now)
        })
    }

    /// Removes a tag; returns the manifest it pointed at, if it existed.
    pub fn untag(&self, reference: &Reference) -> Result<Option<Digest>, ImageError> {
        self.update(|index| Ok(index.tags.remove(&reference.to_string())))
    }

    /// Removes an image or index record and every tag pointing at it; for an index, also the
    /// records of its platform images that no other index lists and no tag names. Blobs stay
    /// until garbage collection.
    pub fn delete(&self, manifest: &Digest) -> Result<(), ImageError> {
        let store = self.store.clone();
        self.update(|index| {
            let owned_before = index.index_children(&store);
            index.images.remove(manifest);
            index.tags.retain(|_, d| d != manifest);
            if index.indexes.remove(manifest).is_some() {
                let owned_after = index.index_children(&store);
                for child in owned_before.difference(&owned_after) {
                    if !index.tags.values().any(|d| d == child) {
                        index.images.remove(child);
                    }
                }
            }
            Ok(())
        })
    }

    /// Every recorded image with its tags, sorted by manifest digest, except the platform
    /// images of recorded indexes (see [`ImageStore::list_indexes`]).
    pub fn list(&self) -> Result<Vec<(Digest, ImageRecord, Vec<Reference>)>, ImageError> {
        let index = self.index()?;
        let children = index.index_children(&self.store);
        Ok(index
            .images
            .iter()
            .filter(|(d, _)| !children.contains(d))
            .map(|(d, rec)| (*d, rec.clone(), index.tags_of(d)))
            .collect())
    }

    /// IDs of the containers whose record (`ROOT/containers/<id>/config.json`, field `Image`)
    /// names this image by manifest or config digest.
    pub fn containers_using(&self, image: &Image) -> Result<Vec<String>, ImageError> {
        let dir = self.store.containers_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(ImageError::Containers { path: dir, source }),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| ImageError::Containers {
                path: dir.clone(),
                source,
            })?;
            let cfg = entry.path().join("config.json");
            let bytes = match fs::read(&cfg) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(ImageError::Containers { path: cfg, source }),
            };
            // A half-written record cannot be interpreted; it does not pin anything.
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            let Some(named) = value.get("Image").and_then(|v| v.as_str()) else {
                continue;
            };
            let named = named.strip_prefix("sha256:").unwrap_or(named);
            if named == image.manifest_digest.hex() || named == image.config_digest.hex() {
                out.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        Ok(out)
    }
}

pub(crate) fn set_tag(
    index: &mut ImageIndex,
    reference: &Reference,
    manifest: &Digest,
    now: &str,
) -> Result<(), ImageError> {
    if reference.digest().is_some() || reference.tag().is_none() {
        return Err(ImageError::DigestTag(reference.to_string()));
    }
    index.tags.insert(reference.to_string(), *manifest);
    if let Some(rec) = index.images.get_mut(manifest) {
        rec.last_tag_time = Some(now.to_string());
    }
    if let Some(rec) = index.indexes.get_mut(manifest) {
        rec.last_tag_time = Some(now.to_string());
    }
    Ok(())
}

/// A manifest, index or descriptor (without annotations of its own) followed by `annotations`
/// when there are any: oci-spec keeps annotations in a `HashMap`, whose order would change the
/// digest from one run to the next.
#[derive(Serialize)]
pub(crate) struct Annotated<'a, T: Serialize> {
    #[serde(flatten)]
    pub inner: &'a T,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: &'a BTreeMap<String, String>,
}

/// An OCI image manifest with the given config and layers.
pub fn build_manifest(
    config: Descriptor,
    layers: Vec<Descriptor>,
) -> Result<ImageManifest, oci_spec::OciSpecError> {
    oci_spec::image::ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config)
        .layers(layers)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    fn make_image(store: &Store, content: &[u8]) -> Image {
        let layer = store.content().put_bytes(content).unwrap();
        let config = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            ..Default::default()
        };
        store
            .images()
            .create(
                &config,
                &[LayerRef {
                    digest: layer,
                    diff_id: layer,
                    size: content.len() as u64,
                    media_type: MediaType::ImageLayer,
                }],
            )
            .unwrap()
    }

    #[test]
    fn create_tag_resolve() {
        let (_d, store) = setup();
        let images = store.images();
        let img = make_image(&store, b"layer one");
        assert_eq!(img.layers.len(), 1);
        assert_eq!(
            img.config.rootfs.diff_ids,
            vec![Digest::of(b"layer one").to_string()]
        );
        let r = Reference::parse("busybox:local").unwrap();
        images.tag(&r, &img.manifest_digest).unwrap();
        for name in [
            "busybox:local",
            "docker.io/library/busybox:local",
            &img.config_digest.to_string(),
            &img.manifest_digest.to_string(),
            &img.config_digest.hex()[..5],
            &format!("sha256:{}", &img.config_digest.hex()[..8]),
            &format!("busybox@{}", img.manifest_digest),
        ] {
            assert_eq!(
                images.resolve(name).unwrap().manifest_digest,
                img.manifest_digest,
                "{name}"
            );
        }
        assert!(matches!(images.resolve("busybox"), Err(ImageError::NotFound(_))));
        assert!(matches!(
            images.resolve("Bad Name"),
            Err(ImageError::Reference(_))
        ));
        assert_eq!(images.untag(&r).unwrap(), Some(img.manifest_digest));
        assert!(images.resolve("busybox:local").is_err());
        let listed = images.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].2.is_empty());
    }

    #[test]
    fn create_refuses_missing_layers_and_digest_tags() {
        let (_d, store) = setup();
        let missing = Digest::of(b"nope");
        let err = store
            .images()
            .create(
                &ImageConfig::default(),
                &[LayerRef {
                    digest: missing,
                    diff_id: missing,
                    size: 4,
                    media_type: MediaType::ImageLayer,
                }],
            )
            .unwrap_err();
        assert!(matches!(err, ImageError::MissingLayer(_)));
        let img = make_image(&store, b"x");
        let r = Reference::parse(&format!("a@{}", img.manifest_digest)).unwrap();
        assert!(matches!(
            store.images().tag(&r, &img.manifest_digest),
            Err(ImageError::DigestTag(_))
        ));
    }

    #[test]
    fn chain_ids_follow_the_spec() {
        let (_d, store) = setup();
        let img = make_image(&store, b"base");
        let base = Digest::of(b"base");
        assert_eq!(img.chain_ids(), vec![base]);
        let mut two = img.clone();
        let mut l = two.layers[0].clone();
        l.diff_id = Digest::of(b"top");
        two.layers.push(l);
        let expected = Digest::of(format!("{base} {}", Digest::of(b"top")).as_bytes());
        assert_eq!(two.chain_ids()[1], expected);
    }

    #[test]
    fn containers_pin_images() {
        let (_d, store) = setup();
        let img = make_image(&store, b"y");
        let dir = store.containers_dir().join("c1");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("config.json"),
            format!(r#"{{"Image":"{}"}}"#, img.config_digest),
        )
        .unwrap();
        assert_eq!(
            store.images().containers_using(&img).unwrap(),
            vec!["c1".to_string()]
        );
    }
}
