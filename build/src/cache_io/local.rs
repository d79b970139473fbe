//! A cache in a directory (`type=local`), an OCI image layout: `oci-layout`, `index.json`
//! naming one manifest (the same shape as a registry cache's), `blobs/sha256/`.
//!
//! Written so that a crash at any point leaves a readable cache: every blob is written to a
//! temp file, fsynced and renamed into place (blobs already there are kept), then `index.json`
//! is replaced by a rename, the one step that switches readers from the old cache to the new;
//! only after it are the blobs that the new index does not reach removed.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use kiln_cache::images::MAX_JSON_BYTES;
use kiln_cache::paths::{write_atomic, PathError};
use kiln_cache::{temp, Store};
use kiln_dag::Digest;
use kiln_source::registry::meta::{BlobMeta, Compressed};
use kiln_source::registry::{media, Compression, SentBlob};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::format::{blob_path, CacheConfig, Envelope, CONFIG_MEDIA_TYPE};
use super::import::{BlobSource, ImportedCache, Loaded};
use super::{CacheError, ImportError, Planned};

fn read_verified(dir: &Path, digest: &Digest) -> Result<Vec<u8>, ImportError> {
    let path = blob_path(dir, digest);
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|f| f.take(MAX_JSON_BYTES).read_to_end(&mut bytes))
        .map_err(|source| ImportError::Local {
            path: path.clone(),
            source,
        })?;
    if Digest::of(&bytes) != *digest {
        return Err(ImportError::Digest { path });
    }
    Ok(bytes)
}

/// Reads the cache in the layout at `dir`.
pub(crate) fn load(dir: &Path) -> Result<Loaded, ImportError> {
    let index_path = dir.join("index.json");
    let index = std::fs::read(&index_path).map_err(|source| ImportError::Local {
        path: index_path.clone(),
        source,
    })?;
    let index: Value = serde_json::from_slice(&index).map_err(ImportError::Manifest)?;
    let manifest = index
        .get("manifests")
        .and_then(Value::as_array)
        .and_then(|m| m.first())
        .and_then(|m| m.get("digest"))
        .and_then(Value::as_str)
        .and_then(|d| Digest::parse(d).ok())
        .ok_or(ImportError::NoCache)?;
    let manifest: Value =
        serde_json::from_slice(&read_verified(dir, &manifest)?).map_err(ImportError::Manifest)?;
    let config = manifest.get("config").ok_or(ImportError::NoCache)?;
    match config.get("mediaType").and_then(Value::as_str) {
        Some(CONFIG_MEDIA_TYPE) => {}
        Some(super::format::BUILDKIT_CONFIG_MEDIA_TYPE) => {
            return Err(ImportError::Foreign("BuildKit's cache manifest"))
        }
        _ => return Err(ImportError::NoCache),
    }
    let digest = config
        .get("digest")
        .and_then(Value::as_str)
        .and_then(|d| Digest::parse(d).ok())
        .ok_or(ImportError::NoCache)?;
    let config = CacheConfig::parse(&read_verified(dir, &digest)?).map_err(ImportError::Format)?;
    Ok(Loaded::with_blobs(config, BlobSource::Dir(dir.to_path_buf())))
}

fn io_err<'a>(target: &str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    let target = target.to_string();
    move |source| CacheError::Local {
        target,
        path: path.to_path_buf(),
        source,
    }
}

/// Hashes and counts what goes through it.
struct HashWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn path_err(target: &str) -> impl FnOnce(PathError) -> CacheError + '_ {
    move |e| CacheError::Local {
        target: target.to_string(),
        path: e.path,
        source: e.source,
    }
}

fn sent_blob(digest: Digest, size: u64, media_type: &str) -> SentBlob {
    SentBlob {
        digest,
        size,
        media_type: media_type.to_string(),
    }
}

/// A temp file in `dir/blobs/sha256/` renamed to its digest once complete and synced.
fn write_blob(
    dir: &Path,
    target: &str,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(Digest, u64), CacheError> {
    let blobs = dir.join("blobs").join("sha256");
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(&blobs)
        .map_err(io_err(target, &blobs))?;
    let file = tmp.as_file().try_clone().map_err(io_err(target, &blobs))?;
    let mut w = HashWriter {
        inner: std::io::BufWriter::with_capacity(256 * 1024, file),
        hasher: Sha256::new(),
        count: 0,
    };
    fill(&mut w).map_err(io_err(target, tmp.path()))?;
    w.flush().map_err(io_err(target, tmp.path()))?;
    let HashWriter { inner, hasher, count } = w;
    let (digest, size) = (Digest(hasher.finalize().into()), count);
    drop(inner);
    tmp.as_file().sync_all().map_err(io_err(target, tmp.path()))?;
    let dest = blob_path(dir, &digest);
    tmp.persist(&dest).map_err(|e| CacheError::Local {
        target: target.to_string(),
        path: dest.clone(),
        source: e.error,
    })?;
    Ok((digest, size))
}

/// Writes `planned` into the layout at `dir` (see the module doc).
pub(crate) fn export(
    store: &Store,
    dir: &Path,
    planned: &Planned,
    imported: Option<&ImportedCache>,
) -> Result<(), CacheError> {
    let target = format!("type=local,dest={}", dir.display());
    let blobs_dir = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs_dir).map_err(io_err(&target, &blobs_dir))?;
    let meta = BlobMeta::at(store.root());
    let content = store.content();
    let sent = super::parallel(&planned.layers, 2, |l| -> Result<SentBlob, CacheError> {
        let uncompressed = l.media_type == media::OCI_LAYER || l.media_type == media::DOCKER_LAYER;
        let compress = uncompressed && planned.compression != Compression::Uncompressed;
        let (algorithm, media_type) = match planned.compression {
            Compression::Zstd => ("zstd", media::OCI_LAYER_ZSTD),
            _ => ("gzip", media::OCI_LAYER_GZIP),
        };
        if compress {
            if let Some(known) = meta.compressed(&l.diff_id, algorithm) {
                if blob_path(dir, &known.digest).exists() {
                    return Ok(sent_blob(known.digest, known.size, media_type));
                }
            }
        } else if blob_path(dir, &l.blob).exists() {
            return Ok(sent_blob(l.blob, l.size, &l.media_type));
        }
        super::fetch_for_export(store, imported, &l.blob, &target)?;
        // Read where the bytes are (a lazy layer from its recipe, checked), not written out.
        let open = || content.reader(&l.blob).map_err(std::io::Error::other);
        if !compress {
            let (digest, size) = write_blob(dir, &target, |w| {
                std::io::copy(&mut open()?, w)?;
                Ok(())
            })?;
            return Ok(sent_blob(digest, size, &l.media_type));
        }
        let (digest, size) = write_blob(dir, &target, |w| {
            kiln_source::registry::compress::compress_into(open()?, planned.compression, w)?;
            Ok(())
        })?;
        let _ = meta.record_compressed(&l.diff_id, algorithm, &Compressed { digest, size });
        Ok(sent_blob(digest, size, media_type))
    })?;
    let envelope = Envelope::of(&planned.config, &sent, true);
    let (config_digest, _) = write_blob(dir, &target, |w| w.write_all(&envelope.config))?;
    let (manifest_digest, manifest_size) = write_blob(dir, &target, |w| w.write_all(&envelope.manifest))?;
    let layout = dir.join("oci-layout");
    if !layout.exists() {
        write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#, true).map_err(path_err(&target))?;
    }
    // Every blob is durable: make their names durable, then switch index.json.
    File::open(&blobs_dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&target, &blobs_dir))?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [{
            "mediaType": media::OCI_MANIFEST,
            "digest": manifest_digest.to_string(),
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    let index_bytes = serde_json::to_vec(&index).unwrap_or_default();
    write_atomic(&dir.join("index.json"), &index_bytes, true).map_err(path_err(&target))?;
    // Only now: drop what the new index does not reach (and temp files of killed exports).
    let mut keep: HashSet<String> = sent.iter().map(|s| s.digest.hex()).collect();
    keep.insert(config_digest.hex());
    keep.insert(manifest_digest.hex());
    if let Ok(rd) = std::fs::read_dir(&blobs_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // A killed export's temp (`.index-` from kiln before `write_atomic`).
            let stale = name.starts_with(".index-")
                || name.starts_with(".index.json.kiln-") && temp::owner_of(&name).is_some_and(|o| !o.alive());
            if stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}
