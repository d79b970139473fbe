//! `kiln load`: docker-archive tars (legacy `<id>/layer.tar` and Docker 25+ OCI-style ones) and
//! OCI image layout tars into the store.
//!
//! The archive is read once, front to back. Every regular file is streamed into a temp file in
//! `ROOT/ingest/` while being hashed (files under `blobs/sha256/` are verified against their
//! names). Only when the whole archive was read and every image in it checked are the blobs the
//! images need renamed into place and the tags written, in one update of `images.json`. On any
//! error the temp files are removed and the store is as it was.
//!
//! Checking an image reads each of its layers from this archive once, decompressed, through
//! [`crate::layer::check`]: its diff ID must be the config's, and it must unpack (no names
//! climbing out with `..`, no writes through symlinks, no hard links to files it does not hold,
//! sound headers), so a layer that would fail at `kiln run` fails here. Metadata files
//! (`manifest.json`, `index.json`, `oci-layout`, `repositories`) may hold up to 20 MiB, the limit
//! of containerd's importer (moby's own loader has none); JSON blobs the store's
//! [`MAX_JSON_BYTES`]. A larger one is refused at its tar header, unread.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path};

use kiln_dag::image::ImageConfig;
use kiln_dag::{Digest, Platform};
use oci_spec::image::{Descriptor, ImageIndex as OciIndex, ImageManifest, MediaType};
use serde::Deserialize;

use crate::archive::{decompress, Compression, Counting};
use crate::content::{ContentError, Staged};
use crate::images::{build_manifest, kiln_digest, oci_digest, ImageError, MAX_JSON_BYTES};
use crate::layer;
use crate::reference::Reference;
use crate::store::{Store, StoreError};

/// Largest extended header (PAX record set or GNU long name) accepted.
const MAX_EXT_HEADER: u64 = 1 << 20;

/// Largest metadata file (`manifest.json`, `index.json`, ...) accepted: containerd's importer
/// reads these through a 20 MiB `jsonLimit`.
const MAX_METADATA_BYTES: u64 = 20 << 20;

/// A failure loading an archive. Every variant names the archive; entry-level ones the entry.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The store could not be held against garbage collection.
    #[error("failed to hold the store")]
    Hold(#[source] StoreError),
    /// The tar stream itself is broken (bad header, checksum, unexpected end).
    #[error("archive `{archive}`: broken tar stream after entry {after:?}")]
    Tar {
        /// The archive.
        archive: String,
        /// The last good entry.
        after: Option<String>,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The archive ends in the middle of an entry or without the end-of-archive marker.
    #[error("archive `{archive}` is truncated: entry `{entry}` {detail}")]
    Truncated {
        /// The archive.
        archive: String,
        /// The entry cut short.
        entry: String,
        /// What is missing.
        detail: String,
    },
    /// The archive contains no entries.
    #[error("archive `{archive}` is empty")]
    Empty {
        /// The archive.
        archive: String,
    },
    /// An entry name is absolute or climbs out with `..`.
    #[error("archive `{archive}`: entry `{entry}` has an unsafe path (absolute or containing `..`)")]
    UnsafePath {
        /// The archive.
        archive: String,
        /// The entry.
        entry: String,
    },
    /// An extended header or metadata file is larger than allowed.
    #[error("archive `{archive}`: entry `{entry}` is {size} bytes, more than the {limit} bytes allowed")]
    TooLarge {
        /// The archive.
        archive: String,
        /// The entry.
        entry: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Storing an entry failed, or its content does not match its digest.
    #[error("archive `{archive}`: entry `{entry}`")]
    Blob {
        /// The archive.
        archive: String,
        /// The entry.
        entry: String,
        /// The cause.
        #[source]
        source: Box<ContentError>,
    },
    /// An entry could not be read back from its temp file.
    #[error("archive `{archive}`: failed to read entry `{entry}`")]
    Read {
        /// The archive.
        archive: String,
        /// The entry.
        entry: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A JSON entry does not parse.
    #[error("archive `{archive}`: entry `{entry}` is not valid {what}")]
    Json {
        /// The archive.
        archive: String,
        /// The entry.
        entry: String,
        /// What it should be.
        what: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A file named by `index.json`, `manifest.json` or a manifest is not in the archive.
    #[error("archive `{archive}`: entry `{entry}` referenced by `{referrer}` is missing")]
    Missing {
        /// The archive.
        archive: String,
        /// The missing entry.
        entry: String,
        /// Who references it.
        referrer: String,
    },
    /// A blob's size differs from its descriptor.
    #[error("archive `{archive}`: entry `{entry}` is {actual} bytes but `{referrer}` says {expected}")]
    Size {
        /// The archive.
        archive: String,
        /// The entry.
        entry: String,
        /// Who says otherwise.
        referrer: String,
        /// The descriptor's size.
        expected: u64,
        /// The entry's size.
        actual: u64,
    },
    /// A digest in a descriptor or config is not sha256.
    #[error("archive `{archive}`: `{entry}` names `{value}`, which is not a sha256 digest")]
    BadDigest {
        /// The archive.
        archive: String,
        /// The entry holding the value.
        entry: String,
        /// The value.
        value: String,
    },
    /// A layer would not unpack: a broken tar, or an entry that would leave the destination.
    #[error("archive `{archive}`: layer `{entry}` cannot be unpacked")]
    Layer {
        /// The archive.
        archive: String,
        /// The layer entry.
        entry: String,
        /// What is wrong with it.
        #[source]
        source: Box<crate::layer::ApplyError>,
    },
    /// A layer's uncompressed digest does not match the config's diff ID.
    #[error(
        "archive `{archive}`: layer `{entry}` has diff ID {actual} but config `{config}` says {expected}"
    )]
    DiffId {
        /// The archive.
        archive: String,
        /// The layer entry.
        entry: String,
        /// The config entry.
        config: String,
        /// The config's diff ID.
        expected: String,
        /// The layer's.
        actual: String,
    },
    /// The config and manifest disagree on the number of layers.
    #[error("archive `{archive}`: `{entry}` lists {layers} layers but its config has {diff_ids} diff IDs")]
    LayerCount {
        /// The archive.
        archive: String,
        /// The manifest entry.
        entry: String,
        /// Layers listed.
        layers: usize,
        /// Diff IDs in the config.
        diff_ids: usize,
    },
    /// The archive holds neither `manifest.json` nor `index.json`.
    #[error("archive `{archive}` is neither a docker archive nor an OCI layout: no `manifest.json` or `index.json`")]
    NoManifest {
        /// The archive.
        archive: String,
    },
    /// A tag in the archive is not a valid reference.
    #[error("archive `{archive}`: `{entry}` has invalid tag `{tag}`")]
    Tag {
        /// The archive.
        archive: String,
        /// The entry.
        entry: String,
        /// The tag.
        tag: String,
        /// The cause.
        #[source]
        source: Box<crate::reference::ReferenceError>,
    },
    /// Publishing blobs failed.
    #[error("archive `{archive}`: failed to store blob {digest}")]
    Commit {
        /// The archive.
        archive: String,
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: Box<ContentError>,
    },
    /// Recording the images failed.
    #[error("archive `{archive}`: failed to record the loaded images")]
    Register {
        /// The archive.
        archive: String,
        /// The cause.
        #[source]
        source: Box<ImageError>,
    },
}

/// One image loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    /// Its manifest digest.
    pub manifest: Digest,
    /// Its ID (config digest).
    pub id: Digest,
    /// The tags it was loaded with.
    pub tags: Vec<Reference>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Where a file of the archive lives while loading.
enum Source {
    /// Read from the archive into a temp file.
    Staged(Staged),
    /// Created while loading (a synthesised manifest), not yet in a temp file.
    Bytes(Vec<u8>, Digest),
}

struct Loader<'a> {
    store: &'a Store,
    archive: String,
    /// Archive entry path -> staged content.
    files: HashMap<String, Staged>,
    /// Symlink entry path -> target entry path.
    links: HashMap<String, String>,
    /// Blobs the loaded images need, by digest.
    needed: BTreeMap<Digest, String>,
    /// Synthesised blobs.
    synthesised: BTreeMap<Digest, Vec<u8>>,
    /// Layers already checked (by temp file): diff ID and compression.
    checked: HashMap<std::path::PathBuf, (Digest, Compression)>,
}

fn normalise(archive: &str, raw: &[u8]) -> Result<String, LoadError> {
    let name = String::from_utf8_lossy(raw).into_owned();
    let unsafe_path = || LoadError::UnsafePath {
        archive: archive.to_string(),
        entry: name.clone(),
    };
    let mut parts = Vec::new();
    for c in Path::new(&name).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => return Err(unsafe_path()),
        }
    }
    Ok(parts.join("/"))
}

fn blob_digest_of_path(path: &str) -> Option<Digest> {
    path.strip_prefix("blobs/sha256/")
        .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok())
}

fn is_metadata(path: &str) -> bool {
    matches!(
        path,
        "manifest.json" | "index.json" | "oci-layout" | "repositories"
    )
}

/// The most bytes a JSON file of the archive may hold (`u64::MAX`: not JSON, any size).
fn json_limit(path: &str) -> u64 {
    if is_metadata(path) {
        MAX_METADATA_BYTES
    } else if path.ends_with(".json") {
        MAX_JSON_BYTES
    } else {
        u64::MAX
    }
}

/// Loads every image in the tar read from `reader` (named `archive` in messages); the tar may
/// be compressed. Returns the images with their tags.
pub fn load(store: &Store, reader: impl Read, archive: &str) -> Result<Vec<LoadedImage>, LoadError> {
    let _hold = store.hold().map_err(LoadError::Hold)?;
    let mut loader = Loader {
        store,
        archive: archive.to_string(),
        files: HashMap::new(),
        links: HashMap::new(),
        needed: BTreeMap::new(),
        synthesised: BTreeMap::new(),
        checked: HashMap::new(),
    };
    let tar_err = |after: Option<String>, source| LoadError::Tar {
        archive: archive.to_string(),
        after,
        source,
    };
    let (_, reader) = decompress(reader).map_err(|e| tar_err(None, e))?;
    loader.read_entries(reader)?;
    let images = loader.collect_images()?;
    loader.commit(&images)?;
    Ok(images)
}

impl Loader<'_> {
    fn read_entries(&mut self, reader: impl Read) -> Result<(), LoadError> {
        let archive = self.archive.clone();
        let mut tar = tar::Archive::new(Counting {
            inner: reader,
            count: 0,
        });
        let mut last: Option<String> = None;
        let mut last_end = 0u64;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax_path: Option<Vec<u8>> = None;
        let mut pax_link: Option<Vec<u8>> = None;
        let mut seen_any = false;
        {
            let tar_err = |after: &Option<String>, source| LoadError::Tar {
                archive: archive.clone(),
                after: after.clone(),
                source,
            };
            let entries = tar.entries().map_err(|e| tar_err(&last, e))?.raw(true);
            for entry in entries {
                let mut entry = entry.map_err(|e| tar_err(&last, e))?;
                seen_any = true;
                let kind = entry.header().entry_type();
                let size = entry.header().entry_size().map_err(|e| tar_err(&last, e))?;
                let header_name = String::from_utf8_lossy(&entry.header().path_bytes()).into_owned();
                last_end = entry.raw_file_position() + size.div_ceil(512) * 512;
                if kind.is_gnu_longname()
                    || kind.is_gnu_longlink()
                    || kind.is_pax_local_extensions()
                    || kind.is_pax_global_extensions()
                {
                    if size > MAX_EXT_HEADER {
                        return Err(LoadError::TooLarge {
                            archive: archive.clone(),
                            entry: format!(
                                "{header_name} (extended header after {})",
                                last.as_deref().unwrap_or("start")
                            ),
                            size,
                            limit: MAX_EXT_HEADER,
                        });
                    }
                    let mut data = Vec::with_capacity(size as usize);
                    entry.read_to_end(&mut data).map_err(|e| tar_err(&last, e))?;
                    if data.len() as u64 != size {
                        return Err(self.truncated(&header_name, size, data.len() as u64));
                    }
                    if kind.is_gnu_longname() {
                        long_name = Some(trim_nul(data));
                    } else if kind.is_gnu_longlink() {
                        long_link = Some(trim_nul(data));
                    } else if kind.is_pax_local_extensions() {
                        for ext in tar::PaxExtensions::new(&data) {
                            let ext = ext.map_err(|e| tar_err(&last, e))?;
                            match ext.key_bytes() {
                                b"path" => pax_path = Some(ext.value_bytes().to_vec()),
                                b"linkpath" => pax_link = Some(ext.value_bytes().to_vec()),
                                _ => {}
                            }
                        }
                    }
                    continue;
                }
                let raw_name = pax_path
                    .take()
                    .or(long_name.take())
                    .unwrap_or_else(|| entry.header().path_bytes().into_owned());
                let raw_link = pax_link
                    .take()
                    .or(long_link.take())
                    .or_else(|| entry.header().link_name_bytes().map(|l| l.into_owned()));
                let path = normalise(&archive, &raw_name)?;
                last = Some(path.clone());
                if kind.is_symlink() || kind.is_hard_link() {
                    if let Some(target) = raw_link {
                        let target_str = String::from_utf8_lossy(&target).into_owned();
                        // Symlinks are relative to their directory; hard links to the archive root.
                        let joined = if kind.is_symlink() {
                            match path.rsplit_once('/') {
                                Some((dir, _)) => format!("{dir}/{target_str}"),
                                None => target_str,
                            }
                        } else {
                            target_str
                        };
                        if let Ok(t) = normalise_lexical(&joined) {
                            self.links.insert(path, t);
                        }
                    }
                    continue;
                }
                if !(kind.is_file() || kind.is_contiguous()) {
                    continue;
                }
                let limit = json_limit(&path);
                if size > limit {
                    return Err(LoadError::TooLarge {
                        archive: archive.clone(),
                        entry: path,
                        size,
                        limit,
                    });
                }
                let expected = blob_digest_of_path(&path);
                let staged = self
                    .store
                    .content()
                    .stage(&mut entry, None)
                    .map_err(|source| match source {
                        ContentError::ReadInput { read, .. } if read < size => {
                            self.truncated(&path, size, read)
                        }
                        source => LoadError::Blob {
                            archive: archive.clone(),
                            entry: path.clone(),
                            source: Box::new(source),
                        },
                    })?;
                // Truncation first: a cut blob also has the wrong digest, but that is not the news.
                if staged.size() != size {
                    return Err(self.truncated(&path, size, staged.size()));
                }
                if let Some(expected) = expected.filter(|e| *e != staged.digest()) {
                    return Err(LoadError::Blob {
                        archive: archive.clone(),
                        entry: path,
                        source: Box::new(ContentError::Mismatch {
                            expected,
                            actual: staged.digest(),
                            size,
                        }),
                    });
                }
                self.files.insert(path, staged);
            }
        }
        if !seen_any {
            return Err(LoadError::Empty { archive });
        }
        let consumed = tar.into_inner().count;
        if consumed < last_end + 512 {
            return Err(LoadError::Truncated {
                archive,
                entry: last.unwrap_or_default(),
                detail: "is followed by no end-of-archive marker".to_string(),
            });
        }
        Ok(())
    }

    fn truncated(&self, entry: &str, size: u64, got: u64) -> LoadError {
        LoadError::Truncated {
            archive: self.archive.clone(),
            entry: entry.to_string(),
            detail: format!("should have {size} bytes but the archive ends after {got}"),
        }
    }

    fn resolve_path(&self, path: &str) -> String {
        let mut p = path.to_string();
        for _ in 0..16 {
            match self.links.get(&p) {
                Some(t) => p = t.clone(),
                None => break,
            }
        }
        p
    }

    fn read_small(&self, path: &str, referrer: &str) -> Result<Vec<u8>, LoadError> {
        let path = self.resolve_path(path);
        let Some(staged) = self.files.get(&path) else {
            return Err(LoadError::Missing {
                archive: self.archive.clone(),
                entry: path,
                referrer: referrer.to_string(),
            });
        };
        let limit = if is_metadata(&path) {
            MAX_METADATA_BYTES
        } else {
            MAX_JSON_BYTES
        };
        if staged.size() > limit {
            return Err(LoadError::TooLarge {
                archive: self.archive.clone(),
                entry: path,
                size: staged.size(),
                limit,
            });
        }
        std::fs::read(staged.temp_path()).map_err(|source| LoadError::Read {
            archive: self.archive.clone(),
            entry: path,
            source,
        })
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        referrer: &str,
        what: &'static str,
    ) -> Result<T, LoadError> {
        let bytes = self.read_small(path, referrer)?;
        serde_json::from_slice(&bytes).map_err(|source| LoadError::Json {
            archive: self.archive.clone(),
            entry: path.to_string(),
            what,
            source,
        })
    }

    /// Checks that the blob `d` is in the archive (or already in the store) with `size` bytes,
    /// and marks it needed.
    fn need_blob(
        &mut self,
        d: &oci_spec::image::Digest,
        size: Option<u64>,
        referrer: &str,
    ) -> Result<Digest, LoadError> {
        let digest = kiln_digest(d).ok_or_else(|| LoadError::BadDigest {
            archive: self.archive.clone(),
            entry: referrer.to_string(),
            value: d.to_string(),
        })?;
        let entry = format!("blobs/sha256/{}", digest.hex());
        let actual = match self.files.get(&self.resolve_path(&entry)) {
            Some(s) => s.size(),
            None => match self.store.content().size(&digest) {
                Ok(s) => s,
                Err(_) => {
                    return Err(LoadError::Missing {
                        archive: self.archive.clone(),
                        entry,
                        referrer: referrer.to_string(),
                    })
                }
            },
        };
        if let Some(expected) = size {
            if expected != actual {
                return Err(LoadError::Size {
                    archive: self.archive.clone(),
                    entry,
                    referrer: referrer.to_string(),
                    expected,
                    actual,
                });
            }
        }
        self.needed.insert(
            digest,
            self.resolve_path(&format!("blobs/sha256/{}", digest.hex())),
        );
        Ok(digest)
    }

    fn blob_bytes(&self, d: &Digest, referrer: &str) -> Result<Vec<u8>, LoadError> {
        let entry = format!("blobs/sha256/{}", d.hex());
        if self.files.contains_key(&self.resolve_path(&entry)) {
            return self.read_small(&entry, referrer);
        }
        self.store
            .content()
            .read_limited(d, MAX_JSON_BYTES)
            .map_err(|source| LoadError::Blob {
                archive: self.archive.clone(),
                entry,
                source: Box::new(source),
            })
    }

    /// Follows an OCI descriptor to an image manifest (through nested indexes, picking the
    /// host platform), checks its blobs, and returns (manifest digest, config digest).
    fn oci_image(
        &mut self,
        desc: &Descriptor,
        referrer: &str,
        depth: u32,
    ) -> Result<Option<(Digest, Digest)>, LoadError> {
        let digest = self.need_blob(desc.digest(), Some(desc.size()), referrer)?;
        let entry = format!("blobs/sha256/{}", digest.hex());
        let is_index = matches!(desc.media_type(), MediaType::ImageIndex)
            || desc.media_type().to_string() == "application/vnd.docker.distribution.manifest.list.v2+json";
        if is_index {
            self.needed.remove(&digest);
            if depth > 4 {
                return Ok(None);
            }
            let bytes = self.blob_bytes(&digest, referrer)?;
            let index: OciIndex = serde_json::from_slice(&bytes).map_err(|source| LoadError::Json {
                archive: self.archive.clone(),
                entry: entry.clone(),
                what: "image index",
                source,
            })?;
            let host = Platform::host();
            let pick = index
                .manifests()
                .iter()
                .find(|m| {
                    m.platform().as_ref().is_some_and(|p| {
                        p.os().to_string() == host.os && p.architecture().to_string() == host.architecture
                    })
                })
                .or_else(|| index.manifests().first())
                .cloned();
            return match pick {
                Some(m) => self.oci_image(&m, &entry, depth + 1),
                None => Ok(None),
            };
        }
        let bytes = self.blob_bytes(&digest, referrer)?;
        let manifest: ImageManifest = serde_json::from_slice(&bytes).map_err(|source| LoadError::Json {
            archive: self.archive.clone(),
            entry: entry.clone(),
            what: "image manifest",
            source,
        })?;
        let config = self.need_blob(manifest.config().digest(), Some(manifest.config().size()), &entry)?;
        let cfg_bytes = self.blob_bytes(&config, &entry)?;
        let cfg_entry = format!("blobs/sha256/{}", config.hex());
        let cfg: ImageConfig = serde_json::from_slice(&cfg_bytes).map_err(|source| LoadError::Json {
            archive: self.archive.clone(),
            entry: cfg_entry.clone(),
            what: "image config",
            source,
        })?;
        if cfg.rootfs.diff_ids.len() != manifest.layers().len() {
            return Err(LoadError::LayerCount {
                archive: self.archive.clone(),
                entry,
                layers: manifest.layers().len(),
                diff_ids: cfg.rootfs.diff_ids.len(),
            });
        }
        for (layer, diff) in manifest.layers().iter().zip(&cfg.rootfs.diff_ids) {
            let d = self.need_blob(layer.digest(), Some(layer.size()), &entry)?;
            let layer_entry = format!("blobs/sha256/{}", d.hex());
            // A layer already in the store was checked when it came in; one from this archive
            // is checked now, which also gives its diff ID whatever its compression.
            let staged = self
                .files
                .get(&self.resolve_path(&layer_entry))
                .map(|s| s.temp_path().to_path_buf());
            let diff_id = match staged {
                Some(temp) => Some(self.check_layer(&layer_entry, &temp)?.0),
                None if matches!(layer.media_type(), MediaType::ImageLayer) => Some(d),
                None => None,
            };
            if let Some(actual) = diff_id.filter(|a| a.to_string() != *diff) {
                return Err(LoadError::DiffId {
                    archive: self.archive.clone(),
                    entry: layer_entry,
                    config: cfg_entry,
                    expected: diff.clone(),
                    actual: actual.to_string(),
                });
            }
        }
        Ok(Some((digest, config)))
    }

    fn parse_tag(&self, tag: &str, entry: &str) -> Result<Reference, LoadError> {
        Reference::parse(tag).map_err(|source| LoadError::Tag {
            archive: self.archive.clone(),
            entry: entry.to_string(),
            tag: tag.to_string(),
            source: Box::new(source),
        })
    }

    fn collect_images(&mut self) -> Result<Vec<LoadedImage>, LoadError> {
        let mut images: Vec<LoadedImage> = Vec::new();
        let has_index = self.files.contains_key("index.json");
        let has_manifest = self.files.contains_key("manifest.json");
        if !has_index && !has_manifest {
            return Err(LoadError::NoManifest {
                archive: self.archive.clone(),
            });
        }
        if has_index {
            let index: OciIndex = self.json("index.json", "the archive", "OCI image index")?;
            for desc in index.manifests() {
                let Some((manifest, id)) = self.oci_image(desc, "index.json", 0)? else {
                    continue;
                };
                let ann = desc.annotations().clone().unwrap_or_default();
                let tag = match (
                    ann.get("io.containerd.image.name"),
                    ann.get("org.opencontainers.image.ref.name"),
                ) {
                    (Some(full), _) => Some(self.parse_tag(full, "index.json")?),
                    // A bare tag (`latest`) names no repository; a full reference does.
                    (None, Some(r)) if r.contains('/') || r.contains(':') => {
                        Some(self.parse_tag(r, "index.json")?)
                    }
                    _ => None,
                };
                merge(&mut images, manifest, id, tag);
            }
        }
        if has_manifest {
            let entries: Vec<DockerManifestEntry> =
                self.json("manifest.json", "the archive", "docker archive manifest")?;
            for e in entries {
                let tags = e
                    .repo_tags
                    .clone()
                    .unwrap_or_default()
                    .iter()
                    .map(|t| self.parse_tag(t, "manifest.json"))
                    .collect::<Result<Vec<_>, _>>()?;
                let config_bytes = self.read_small(&e.config, "manifest.json")?;
                let config_digest = Digest::of(&config_bytes);
                if let Some(existing) = images.iter_mut().find(|i| i.id == config_digest) {
                    for t in tags {
                        if !existing.tags.contains(&t) {
                            existing.tags.push(t);
                        }
                    }
                    continue;
                }
                let manifest = self.synthesise(&e, &config_bytes, config_digest)?;
                let mut img = LoadedImage {
                    manifest,
                    id: config_digest,
                    tags: Vec::new(),
                };
                for t in tags {
                    if !img.tags.contains(&t) {
                        img.tags.push(t);
                    }
                }
                images.push(img);
            }
        }
        Ok(images)
    }

    /// Builds an OCI manifest for a docker-archive entry, checking each layer against the
    /// config's diff IDs.
    fn synthesise(
        &mut self,
        e: &DockerManifestEntry,
        config_bytes: &[u8],
        config_digest: Digest,
    ) -> Result<Digest, LoadError> {
        let cfg: ImageConfig = serde_json::from_slice(config_bytes).map_err(|source| LoadError::Json {
            archive: self.archive.clone(),
            entry: e.config.clone(),
            what: "image config",
            source,
        })?;
        if cfg.rootfs.diff_ids.len() != e.layers.len() {
            return Err(LoadError::LayerCount {
                archive: self.archive.clone(),
                entry: "manifest.json".into(),
                layers: e.layers.len(),
                diff_ids: cfg.rootfs.diff_ids.len(),
            });
        }
        let config_path = self.resolve_path(&e.config);
        self.needed.insert(config_digest, config_path);
        let mut layers = Vec::new();
        for (path, diff) in e.layers.iter().zip(&cfg.rootfs.diff_ids) {
            let resolved = self.resolve_path(path);
            let Some(staged) = self.files.get(&resolved) else {
                return Err(LoadError::Missing {
                    archive: self.archive.clone(),
                    entry: path.clone(),
                    referrer: "manifest.json".into(),
                });
            };
            let (digest, size, temp) = (staged.digest(), staged.size(), staged.temp_path().to_path_buf());
            let (diff_id, compression) = self.check_layer(path, &temp)?;
            if diff_id.to_string() != *diff {
                return Err(LoadError::DiffId {
                    archive: self.archive.clone(),
                    entry: path.clone(),
                    config: e.config.clone(),
                    expected: diff.clone(),
                    actual: diff_id.to_string(),
                });
            }
            let media_type = match compression {
                Compression::Gzip => MediaType::ImageLayerGzip,
                Compression::Zstd => MediaType::ImageLayerZstd,
                Compression::None => MediaType::ImageLayer,
                other => MediaType::Other(format!("application/vnd.oci.image.layer.v1.tar+{}", other.name())),
            };
            self.needed.insert(digest, resolved);
            layers.push(Descriptor::new(media_type, size, oci_digest(&digest)));
        }
        let config_desc = Descriptor::new(
            MediaType::ImageConfig,
            config_bytes.len() as u64,
            oci_digest(&config_digest),
        );
        let manifest = build_manifest(config_desc, layers).map_err(|source| LoadError::Json {
            archive: self.archive.clone(),
            entry: "manifest.json".into(),
            what: "image manifest",
            source: serde_json::Error::io(io::Error::other(source.to_string())),
        })?;
        let bytes = serde_json::to_vec(&manifest).map_err(|source| LoadError::Json {
            archive: self.archive.clone(),
            entry: "manifest.json".into(),
            what: "image manifest",
            source,
        })?;
        let digest = Digest::of(&bytes);
        self.synthesised.insert(digest, bytes);
        Ok(digest)
    }

    /// Reads the layer `entry` (staged at `temp`) decompressed through [`layer::check`]:
    /// returns its diff ID and compression, or why it would not unpack.
    fn check_layer(&mut self, entry: &str, temp: &Path) -> Result<(Digest, Compression), LoadError> {
        if let Some(done) = self.checked.get(temp) {
            return Ok(*done);
        }
        let read_err = |source| LoadError::Read {
            archive: self.archive.clone(),
            entry: entry.to_string(),
            source,
        };
        let file = File::open(temp).map_err(read_err)?;
        let (compression, reader) = decompress(file).map_err(read_err)?;
        let opts = layer::ApplyOptions {
            whiteouts: layer::WhiteoutMode::Overlay,
            archive_name: entry.to_string(),
            ..layer::ApplyOptions::default()
        };
        let stats = layer::check(reader, &opts).map_err(|source| LoadError::Layer {
            archive: self.archive.clone(),
            entry: entry.to_string(),
            source: Box::new(source),
        })?;
        self.checked
            .insert(temp.to_path_buf(), (stats.diff_id, compression));
        Ok((stats.diff_id, compression))
    }

    /// Publishes the needed blobs and records the images and tags.
    fn commit(&mut self, images: &[LoadedImage]) -> Result<(), LoadError> {
        let mut sources: Vec<(Digest, Source)> = Vec::new();
        let needed = std::mem::take(&mut self.needed);
        for (digest, path) in needed {
            match self.files.remove(&path) {
                Some(staged) if staged.digest() == digest => sources.push((digest, Source::Staged(staged))),
                Some(staged) => {
                    // The same entry cannot be two blobs; keep it for another digest.
                    self.files.insert(path, staged);
                }
                None => {} // already in the store, or committed through another path
            }
        }
        for (d, bytes) in std::mem::take(&mut self.synthesised) {
            sources.push((d, Source::Bytes(bytes, d)));
        }
        for (digest, source) in sources {
            let res = match source {
                Source::Staged(s) => s.commit().map(|_| ()),
                Source::Bytes(b, d) => self.store.content().write_blob(&b[..], Some(&d)).map(|_| ()),
            };
            res.map_err(|source| LoadError::Commit {
                archive: self.archive.clone(),
                digest,
                source: Box::new(source),
            })?;
        }
        let manifests: Vec<Digest> = images.iter().map(|i| i.manifest).collect();
        let tags: Vec<(Reference, Digest)> = images
            .iter()
            .flat_map(|i| i.tags.iter().map(|t| (t.clone(), i.manifest)))
            .collect();
        self.store
            .images()
            .register(&manifests, &tags)
            .map_err(|source| LoadError::Register {
                archive: self.archive.clone(),
                source: Box::new(source),
            })
    }
}

fn merge(images: &mut Vec<LoadedImage>, manifest: Digest, id: Digest, tag: Option<Reference>) {
    let idx = match images.iter().position(|i| i.manifest == manifest) {
        Some(i) => i,
        None => {
            images.push(LoadedImage {
                manifest,
                id,
                tags: Vec::new(),
            });
            images.len() - 1
        }
    };
    if let Some(t) = tag {
        if !images[idx].tags.contains(&t) {
            images[idx].tags.push(t);
        }
    }
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// Resolves `.` and `..` lexically; fails when `..` climbs above the root.
fn normalise_lexical(p: &str) -> Result<String, ()> {
    let mut out: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop().ok_or(())?;
            }
            x => out.push(x),
        }
    }
    Ok(out.join("/"))
}
