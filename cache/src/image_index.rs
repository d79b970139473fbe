//! Image indexes in the image store: one name for one image per platform.
//!
//! An index (an OCI image index or a Docker manifest list) is a blob in the content store, like a
//! manifest. `images.json` records it under `indexes` (by its digest, with the repository it came
//! from, if pulled); a tag may point at an index or at a manifest. The platform images an index
//! lists that are in the store are ordinary image records as well (so GC, verify and containers
//! treat them as images), but `kiln images` shows them once, as the index. A pulled index may
//! list platforms whose manifests were never fetched: [`IndexEntry::present`] says which are here.

use std::collections::BTreeMap;

use kiln_dag::{Digest, Platform};
use oci_spec::image::{Descriptor, ImageIndexBuilder, MediaType, PlatformBuilder};
use serde_json::Value;

use crate::images::{
    now_rfc3339, oci_digest, Annotated, Image, ImageError, ImageIndex, ImageStore, MAX_JSON_BYTES,
};
use crate::reference::Reference;
use crate::store::Store;
use serde::Serialize;

/// An OCI index's fields before its annotations, as oci-spec writes them.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexFields<'a> {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<Annotated<'a, Descriptor>>,
}

/// The OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker's manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

pub use crate::images::IndexRecord;

/// One platform's manifest in an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// The platform, normalised.
    pub platform: Platform,
    /// The manifest's digest.
    pub manifest: Digest,
    /// The manifest's size.
    pub size: u64,
    /// The manifest's media type.
    pub media_type: String,
    /// Whether the manifest is in the content store.
    pub present: bool,
}

/// An index read from the store.
#[derive(Clone, Debug)]
pub struct IndexImage {
    /// The index's digest (what tags point at).
    pub digest: Digest,
    /// Its exact bytes.
    pub bytes: Vec<u8>,
    /// Its media type (OCI index or Docker manifest list).
    pub media_type: String,
    /// Its platform manifests, in its order. Entries without a platform, or with
    /// `unknown/unknown` (BuildKit's attestation manifests), are left out.
    pub entries: Vec<IndexEntry>,
    /// Its record, when it is recorded as an index.
    pub record: Option<IndexRecord>,
}

/// What a name points at.
#[derive(Clone, Debug)]
pub enum Target {
    Image(Box<Image>),
    Index(IndexImage),
}

/// Whether a manifest blob's bytes are an index (by `mediaType`, or by a `manifests` array).
pub fn is_index_bytes(bytes: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return false;
    };
    match v.get("mediaType").and_then(Value::as_str) {
        Some(m) => m == OCI_INDEX || m == DOCKER_LIST,
        None => v.get("manifests").is_some_and(Value::is_array) && v.get("config").is_none(),
    }
}

impl IndexImage {
    /// Parses an index's bytes; `present` tells which manifests are in the store.
    pub fn parse(
        digest: Digest,
        bytes: Vec<u8>,
        present: impl Fn(&Digest) -> bool,
    ) -> Result<IndexImage, ImageError> {
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|source| ImageError::ParseManifest { digest, source })?;
        let media_type = v
            .get("mediaType")
            .and_then(Value::as_str)
            .unwrap_or(OCI_INDEX)
            .to_string();
        let mut entries = Vec::new();
        for m in v.get("manifests").and_then(Value::as_array).into_iter().flatten() {
            let Some(p) = m.get("platform") else { continue };
            let field = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("");
            if field("os").is_empty() || field("os") == "unknown" || field("architecture").is_empty() {
                continue;
            }
            let d = m.get("digest").and_then(Value::as_str).unwrap_or("");
            let manifest = Digest::parse(d).map_err(|_| ImageError::BadDigest {
                manifest: digest,
                what: "index entry digest",
                value: d.to_string(),
            })?;
            let variant = Some(field("variant")).filter(|v| !v.is_empty());
            entries.push(IndexEntry {
                platform: Platform::new(field("os"), field("architecture"), variant),
                manifest,
                size: m.get("size").and_then(Value::as_u64).unwrap_or(0),
                media_type: m
                    .get("mediaType")
                    .and_then(Value::as_str)
                    .unwrap_or(crate::images::OCI_MANIFEST)
                    .to_string(),
                present: present(&manifest),
            });
        }
        Ok(IndexImage {
            digest,
            bytes,
            media_type,
            entries,
            record: None,
        })
    }

    /// The entry that best serves `want` (containerd's matching: the same platform, else an
    /// older variant this one runs), or `None`.
    pub fn select(&self, want: &Platform) -> Option<&IndexEntry> {
        self.entries
            .iter()
            .filter_map(|e| want.match_rank(&e.platform).map(|r| (r, e)))
            .min_by_key(|(r, _)| *r)
            .map(|(_, e)| e)
    }

    /// The platforms listed, as `linux/amd64, linux/arm64`.
    pub fn platform_list(&self) -> String {
        let v: Vec<String> = self.entries.iter().map(|e| e.platform.to_string()).collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }

    /// The short ID Docker's containerd store shows for an index: its digest.
    pub fn short_id(&self) -> String {
        self.digest.hex()[..12].to_string()
    }
}

impl ImageStore {
    /// Whether `digest` is an index: recorded as one, or its blob is one.
    pub fn is_index(&self, digest: &Digest) -> bool {
        if self.index().is_ok_and(|i| i.indexes.contains_key(digest)) {
            return true;
        }
        self.content()
            .read_limited(digest, MAX_JSON_BYTES)
            .is_ok_and(|b| is_index_bytes(&b))
    }

    /// Reads the index `digest` from the content store.
    pub fn get_index(&self, digest: &Digest) -> Result<IndexImage, ImageError> {
        let content = self.content();
        let bytes = content
            .read_limited(digest, MAX_JSON_BYTES)
            .map_err(|source| ImageError::ReadBlob {
                role: "index",
                manifest: *digest,
                source: Box::new(source),
            })?;
        let mut index = IndexImage::parse(*digest, bytes, |d| content.contains(d))?;
        index.record = self.index()?.indexes.get(digest).cloned();
        Ok(index)
    }

    /// The image or index `digest`.
    pub fn get_target(&self, digest: &Digest) -> Result<Target, ImageError> {
        if self.is_index(digest) {
            Ok(Target::Index(self.get_index(digest)?))
        } else {
            Ok(Target::Image(Box::new(self.get(digest)?)))
        }
    }

    /// What a name or ID points at (see [`ImageStore::resolve_digest`]).
    pub fn resolve_target(&self, name: &str) -> Result<Target, ImageError> {
        let d = self.resolve_digest(name)?;
        self.get_target(&d)
    }

    /// The image a name gives for `platform`: an index's manifest for that platform (which must
    /// be in the store), or the image itself (of whatever platform: the caller checks its config
    /// if it cares).
    pub fn resolve_for(&self, name: &str, platform: &Platform) -> Result<Image, ImageError> {
        match self.resolve_target(name)? {
            Target::Image(i) => Ok(*i),
            Target::Index(index) => self.image_of(name, &index, platform),
        }
    }

    /// `index`'s image for `platform`, which must be in the store.
    pub fn image_of(&self, name: &str, index: &IndexImage, platform: &Platform) -> Result<Image, ImageError> {
        match index.select(platform) {
            Some(e) if e.present => self.get(&e.manifest),
            Some(e) => Err(ImageError::PlatformNotLocal {
                name: name.to_string(),
                platform: platform.to_string(),
                manifest: e.manifest,
            }),
            None => Err(ImageError::NoPlatform {
                name: name.to_string(),
                platform: platform.to_string(),
                available: index.platform_list(),
            }),
        }
    }

    /// Writes an OCI image index of `images` (one per platform, in order) and records it,
    /// untagged. Every image must be in the store.
    pub fn create_index(&self, images: &[(Platform, &Image)]) -> Result<IndexImage, ImageError> {
        self.create_index_annotated(images, &BTreeMap::new(), &vec![BTreeMap::new(); images.len()])
    }

    /// [`ImageStore::create_index`] with `annotations` on the index and `entry_annotations[i]`
    /// on the descriptor of `images[i]` (`--annotation index:` and `manifest-descriptor:`),
    /// each written after the other fields, in key order.
    pub fn create_index_annotated(
        &self,
        images: &[(Platform, &Image)],
        annotations: &BTreeMap<String, String>,
        entry_annotations: &[BTreeMap<String, String>],
    ) -> Result<IndexImage, ImageError> {
        let mut manifests = Vec::with_capacity(images.len());
        for (p, image) in images {
            let mut platform = PlatformBuilder::default();
            platform = platform.os(p.os.as_str()).architecture(p.architecture.as_str());
            if let Some(v) = &p.variant {
                platform = platform.variant(v.clone());
            }
            let platform = platform
                .build()
                .map_err(|source| ImageError::BuildManifest { source })?;
            let media_type = image
                .manifest
                .media_type()
                .clone()
                .unwrap_or(MediaType::ImageManifest);
            let mut d = Descriptor::new(
                media_type,
                image.manifest_bytes.len() as u64,
                oci_digest(&image.manifest_digest),
            );
            d.set_platform(Some(platform));
            manifests.push(d);
        }
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(manifests)
            .build()
            .map_err(|source| ImageError::BuildManifest { source })?;
        let plain = annotations.is_empty() && entry_annotations.iter().all(BTreeMap::is_empty);
        let bytes = if plain {
            serde_json::to_vec(&index)
        } else {
            // The same fields in the same order, each entry's annotations and the index's last.
            let entries: Vec<Annotated<'_, Descriptor>> = index
                .manifests()
                .iter()
                .zip(entry_annotations)
                .map(|(d, a)| Annotated {
                    inner: d,
                    annotations: a,
                })
                .collect();
            serde_json::to_vec(&Annotated {
                inner: &IndexFields {
                    schema_version: 2,
                    media_type: OCI_INDEX,
                    manifests: entries,
                },
                annotations,
            })
        }
        .map_err(|source| ImageError::Encode {
            role: "index",
            source,
        })?;
        let digest = self
            .content()
            .put_bytes(&bytes)
            .map_err(|source| ImageError::WriteBlob {
                role: "index",
                source: Box::new(source),
            })?;
        self.register_index(&digest, None, &[])?;
        self.get_index(&digest)
    }

    /// Records the index `digest` (its blob already in the store), pulled from `repository`
    /// if given, and points `tags` at it, in one update of `images.json`.
    pub fn register_index(
        &self,
        digest: &Digest,
        repository: Option<String>,
        tags: &[Reference],
    ) -> Result<(), ImageError> {
        let now = now_rfc3339();
        self.update(|index| {
            let rec = index.indexes.entry(*digest).or_insert_with(|| IndexRecord {
                added: now.clone(),
                last_tag_time: None,
                repository: None,
            });
            if repository.is_some() {
                rec.repository = repository.clone();
            }
            for t in tags {
                crate::images::set_tag(index, t, digest, &now)?;
            }
            Ok(())
        })
    }
}

impl ImageIndex {
    /// The manifests the recorded indexes list that are recorded images: shown and pruned as
    /// part of their index, not alone.
    pub fn index_children(&self, store: &Store) -> std::collections::BTreeSet<Digest> {
        let content = store.content();
        let mut out = std::collections::BTreeSet::new();
        for d in self.indexes.keys() {
            let Ok(bytes) = content.read_limited(d, MAX_JSON_BYTES) else {
                continue;
            };
            let Ok(index) = IndexImage::parse(*d, bytes, |_| true) else {
                continue;
            };
            out.extend(
                index
                    .entries
                    .iter()
                    .map(|e| e.manifest)
                    .filter(|m| self.images.contains_key(m)),
            );
        }
        out
    }
}

impl ImageStore {
    /// Every recorded index with its tags, sorted by digest.
    pub fn list_indexes(&self) -> Result<Vec<(Digest, IndexRecord, Vec<Reference>)>, ImageError> {
        let index = self.index()?;
        Ok(index
            .indexes
            .iter()
            .map(|(d, rec)| (*d, rec.clone(), index.tags_of(d)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::images::LayerRef;
    use crate::reference::Reference;
    use crate::Store;
    use kiln_dag::image::ImageConfig;

    fn image(store: &Store, arch: &str) -> Image {
        let layer = store.content().put_bytes(arch.as_bytes()).unwrap();
        let config = ImageConfig {
            architecture: arch.into(),
            os: "linux".into(),
            ..ImageConfig::default()
        };
        store
            .images()
            .create(
                &config,
                &[LayerRef {
                    digest: layer,
                    diff_id: layer,
                    size: arch.len() as u64,
                    media_type: MediaType::ImageLayer,
                }],
            )
            .unwrap()
    }

    #[test]
    fn an_index_names_one_image_per_platform() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let amd = image(&store, "amd64");
        let arm = image(&store, "arm64");
        let (pa, pr) = (
            Platform::parse("linux/amd64").unwrap(),
            Platform::parse("linux/arm64").unwrap(),
        );
        let index = store
            .images()
            .create_index(&[(pa.clone(), &amd), (pr.clone(), &arm)])
            .unwrap();
        let v: Value = serde_json::from_slice(&index.bytes).unwrap();
        assert_eq!(v["mediaType"], OCI_INDEX);
        assert_eq!(v["manifests"][1]["platform"]["architecture"], "arm64");
        assert_eq!(v["manifests"][0]["digest"], amd.manifest_digest.to_string());
        let tag = Reference::parse("multi:1").unwrap();
        store.images().tag(&tag, &index.digest).unwrap();
        let images = store.images();
        assert_eq!(
            images.resolve_for("multi:1", &pr).unwrap().manifest_digest,
            arm.manifest_digest
        );
        assert_eq!(
            images
                .resolve_for("multi:1", &Platform::parse("aarch64").unwrap())
                .unwrap()
                .manifest_digest,
            arm.manifest_digest
        );
        let err = images
            .resolve_for("multi:1", &Platform::parse("linux/s390x").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("linux/s390x") && err.contains("linux/amd64, linux/arm64"),
            "{err}"
        );
        let listed = images.list().unwrap();
        assert!(
            listed.is_empty(),
            "platform images of an index are not listed alone: {listed:?}"
        );
        assert!(matches!(
            images.resolve_target("multi:1").unwrap(),
            Target::Index(_)
        ));
        // The index and its images survive GC; deleting the index lets them go.
        let live = crate::gc::Roots::read(&store).unwrap().live_blobs();
        assert!(live.contains(&index.digest) && live.contains(&arm.manifest_digest));
        images.delete(&index.digest).unwrap();
        assert!(images.resolve_digest("multi:1").is_err());
    }
}
