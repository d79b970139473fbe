//! `kiln save`: images to a tar stream, as a docker-archive that is also an OCI image layout
//! (the form Docker Engine 25+ writes, which older engines load through `manifest.json`), or as
//! a plain OCI image layout.
//!
//! Blobs are streamed from the content store straight into the tar (no copies), each blob once
//! however many images share it, and re-hashed on the way so a damaged store never produces an
//! archive that claims a digest its content does not have.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};

use kiln_dag::Digest;
use oci_spec::image::{Descriptor, MediaType};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::content::ContentError;
use crate::image_index::IndexImage;
use crate::images::{oci_digest, Image};
use crate::reference::Reference;
use crate::store::Store;

/// A failure writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// A blob could not be opened.
    #[error("failed to open blob {digest}")]
    Open {
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: ContentError,
    },
    /// Writing an entry to the output failed.
    #[error("failed to write archive entry `{entry}`")]
    Write {
        /// The tar entry.
        entry: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A blob's content does not match its digest.
    #[error(
        "blob {digest} in the store is damaged: its content hashes to {actual}; run `kiln store verify`"
    )]
    Damaged {
        /// The blob's name.
        digest: Digest,
        /// What it hashes to.
        actual: Digest,
    },
    /// A platform image of a saved index is not in the store.
    #[error("platform {platform} of index {index} is not in the local store ({manifest}): pull it, or save one platform with --platform")]
    MissingPlatform {
        /// The index.
        index: Digest,
        /// The platform.
        platform: String,
        /// Its manifest.
        manifest: Digest,
    },
    /// A platform image of a saved index could not be read.
    #[error("failed to read platform image {manifest} of index {index}")]
    PlatformImage {
        /// The index.
        index: Digest,
        /// Its manifest.
        manifest: Digest,
        /// The cause.
        #[source]
        source: Box<crate::images::ImageError>,
    },
    /// Encoding a JSON file failed.
    #[error("failed to encode `{entry}`")]
    Encode {
        /// The tar entry.
        entry: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// The layout of the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OCI layout plus `manifest.json` and `repositories` for `docker load`.
    Docker,
    /// OCI layout only, tags as `org.opencontainers.image.ref.name` annotations.
    Oci,
}

/// One image to save and the tags to save it under (none: saved by ID only).
#[derive(Clone, Debug)]
pub struct SaveItem {
    /// The image; for an index, the platform image `docker load` takes (`manifest.json`).
    pub image: Image,
    /// Its tags in the archive.
    pub tags: Vec<Reference>,
    /// An image index to save whole: every platform image it lists (all must be in the store)
    /// is written, and `index.json` names the index rather than `image`.
    pub index: Option<IndexImage>,
}

impl SaveItem {
    /// One image under `tags`.
    pub fn image(image: Image, tags: Vec<Reference>) -> SaveItem {
        SaveItem {
            image,
            tags,
            index: None,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

fn header(size: u64, kind: tar::EntryType, mode: u32) -> tar::Header {
    // ustar holds sizes below 8 GiB; GNU's binary size field holds the rest.
    let mut h = if size < (1 << 33) {
        tar::Header::new_ustar()
    } else {
        tar::Header::new_gnu()
    };
    h.set_size(size);
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Size of the chunks a blob is read in.
const CHUNK: usize = 1 << 20;

/// A blob read on a thread of its own, which also hashes it, so that hashing one blob (a core's
/// work for a large layer) overlaps writing it into the archive. The chunks come through
/// [`Read`]; [`PipedBlob::finish`] gives the hash of everything read.
struct PipedBlob<'scope> {
    chunks: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    /// Chunks handed back for reuse.
    spent: std::sync::mpsc::Sender<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
    hashing: std::thread::ScopedJoinHandle<'scope, Sha256>,
}

impl<'scope> PipedBlob<'scope> {
    fn start<'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        mut file: std::fs::File,
    ) -> io::Result<Self> {
        let (tx, chunks) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(4);
        let (spent, reuse) = std::sync::mpsc::channel::<Vec<u8>>();
        let hashing = std::thread::Builder::new()
            .name("kiln-save-hash".into())
            .spawn_scoped(scope, move || {
                let mut hasher = Sha256::new();
                loop {
                    let mut buf = reuse.try_recv().unwrap_or_default();
                    buf.resize(CHUNK, 0);
                    match file.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            buf.truncate(n);
                            hasher.update(&buf);
                            if tx.send(Ok(buf)).is_err() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            break;
                        }
                    }
                }
                hasher
            })?;
        Ok(PipedBlob {
            chunks,
            spent,
            current: Vec::new(),
            at: 0,
            hashing,
        })
    }

    /// The sha256 of what the thread read (all of the blob, once `Read` returned 0).
    fn finish(self) -> Digest {
        drop(self.chunks);
        let hasher = self
            .hashing
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        Digest(hasher.finalize().into())
    }
}

impl Read for PipedBlob<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            match self.chunks.recv() {
                Ok(Ok(chunk)) => {
                    let done = std::mem::replace(&mut self.current, chunk);
                    let _ = self.spent.send(done);
                    self.at = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Writes `items` as a tar archive in `format` to `out`, streaming blobs from the store.
pub fn save(store: &Store, items: &[SaveItem], format: Format, out: impl Write) -> Result<(), SaveError> {
    save_annotated(store, items, &[], format, out)
}

/// [`save`] with `descriptor_annotations[i]` on the `index.json` descriptors of `items[i]`
/// (`--annotation manifest-descriptor:` or `index-descriptor:` of a build's archive output),
/// before the name annotations; missing maps are empty.
pub fn save_annotated(
    store: &Store,
    items: &[SaveItem],
    descriptor_annotations: &[BTreeMap<String, String>],
    format: Format,
    out: impl Write,
) -> Result<(), SaveError> {
    let mut tar = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, out));
    let write_err = |entry: &str| {
        let entry = entry.to_string();
        move |source| SaveError::Write { entry, source }
    };
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = header(0, tar::EntryType::Directory, 0o755);
        tar.append_data(&mut h, dir, io::empty())
            .map_err(write_err(dir))?;
    }
    // Every image written: each item's, and every platform image of each index.
    let mut all: Vec<&Image> = Vec::new();
    let mut platform_images: Vec<Image> = Vec::new();
    let mut index_blobs: Vec<Digest> = Vec::new();
    for item in items {
        let Some(index) = &item.index else { continue };
        index_blobs.push(index.digest);
        for e in &index.entries {
            if !e.present {
                return Err(SaveError::MissingPlatform {
                    index: index.digest,
                    platform: e.platform.to_string(),
                    manifest: e.manifest,
                });
            }
            let img = store
                .images()
                .get(&e.manifest)
                .map_err(|source| SaveError::PlatformImage {
                    index: index.digest,
                    manifest: e.manifest,
                    source: Box::new(source),
                })?;
            platform_images.push(img);
        }
    }
    all.extend(items.iter().map(|i| &i.image));
    all.extend(platform_images.iter());
    let mut written = BTreeSet::new();
    let blobs = all
        .iter()
        .flat_map(|img| {
            img.layers
                .iter()
                .map(|l| l.digest)
                .chain([img.config_digest, img.manifest_digest])
        })
        .chain(index_blobs);
    {
        for d in blobs {
            if !written.insert(d) {
                continue;
            }
            let entry = blob_path(&d);
            let file = store
                .content()
                .open(&d)
                .map_err(|source| SaveError::Open { digest: d, source })?;
            let size = file
                .metadata()
                .map_err(|e| SaveError::Open {
                    digest: d,
                    source: ContentError::Open {
                        digest: d,
                        path: store.content().path(&d),
                        source: e,
                    },
                })?
                .len();
            let mut h = header(size, tar::EntryType::Regular, 0o444);
            let actual = std::thread::scope(|scope| {
                let mut reader = PipedBlob::start(scope, file).map_err(write_err(&entry))?;
                tar.append_data(&mut h, &entry, &mut reader)
                    .map_err(write_err(&entry))?;
                Ok::<_, SaveError>(reader.finish())
            })?;
            if actual != d {
                return Err(SaveError::Damaged { digest: d, actual });
            }
        }
    }

    let add_json = |tar: &mut tar::Builder<_>, name: &str, bytes: &[u8]| -> Result<(), SaveError> {
        let mut h = header(bytes.len() as u64, tar::EntryType::Regular, 0o644);
        tar.append_data(&mut h, name, bytes).map_err(write_err(name))
    };
    add_json(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;

    add_json(
        &mut tar,
        "index.json",
        &index_json(items, descriptor_annotations)?,
    )?;

    if format == Format::Docker {
        for (name, bytes) in docker_files(items)? {
            add_json(&mut tar, name, &bytes)?;
        }
    }
    let mut inner = tar.into_inner().map_err(write_err("end of archive"))?;
    inner.flush().map_err(write_err("end of archive"))?;
    Ok(())
}

/// `index.json`: every item's manifest (or index), once per tag.
fn index_json(
    items: &[SaveItem],
    descriptor_annotations: &[BTreeMap<String, String>],
) -> Result<Vec<u8>, SaveError> {
    let mut manifests = Vec::new();
    for (n, item) in items.iter().enumerate() {
        let img = &item.image;
        let extra = descriptor_annotations.get(n).filter(|a| !a.is_empty());
        let mut desc = match &item.index {
            Some(index) => Descriptor::new(
                MediaType::from(index.media_type.as_str()),
                index.bytes.len() as u64,
                oci_digest(&index.digest),
            ),
            None => Descriptor::new(
                MediaType::ImageManifest,
                img.manifest_bytes.len() as u64,
                oci_digest(&img.manifest_digest),
            ),
        };
        if let (Some(mt), None) = (img.manifest.media_type(), &item.index) {
            desc.set_media_type(mt.clone());
        }
        if let Some(extra) = extra {
            desc.set_annotations(Some(extra.clone().into_iter().collect()));
        }
        if item.tags.is_empty() {
            manifests.push(desc);
            continue;
        }
        for t in &item.tags {
            let mut d = desc.clone();
            let mut ann: std::collections::HashMap<String, String> =
                extra.cloned().unwrap_or_default().into_iter().collect();
            ann.insert("io.containerd.image.name".to_string(), t.to_string());
            ann.insert(
                "org.opencontainers.image.ref.name".to_string(),
                t.tag().unwrap_or("latest").to_string(),
            );
            d.set_annotations(Some(ann));
            manifests.push(d);
        }
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    serde_json::to_vec(&index).map_err(|source| SaveError::Encode {
        entry: "index.json".into(),
        source,
    })
}

/// Docker's `manifest.json` and, when any item is tagged, `repositories`.
fn docker_files(items: &[SaveItem]) -> Result<Vec<(&'static str, Vec<u8>)>, SaveError> {
    let mut entries = Vec::new();
    let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for item in items {
        let img = &item.image;
        entries.push(DockerManifestEntry {
            config: blob_path(&img.config_digest),
            repo_tags: item.tags.iter().map(|t| t.familiar()).collect(),
            layers: img.layers.iter().map(|l| blob_path(&l.digest)).collect(),
        });
        for t in &item.tags {
            if let Some(tag) = t.tag() {
                repositories
                    .entry(t.familiar_repository())
                    .or_default()
                    .insert(tag.to_string(), img.config_digest.hex());
            }
        }
    }
    let bytes = serde_json::to_vec(&entries).map_err(|source| SaveError::Encode {
        entry: "manifest.json".into(),
        source,
    })?;
    let mut files = vec![("manifest.json", bytes)];
    if !repositories.is_empty() {
        let bytes = serde_json::to_vec(&repositories).map_err(|source| SaveError::Encode {
            entry: "repositories".into(),
            source,
        })?;
        files.push(("repositories", bytes));
    }
    Ok(files)
}
