//! `kiln pull`: a reference's manifest and blobs from a registry into the store.

use std::io::{Read, Write};

use kiln_cache::content::{ContentError, ContentStore, Unsynced};
use kiln_cache::image_index::Target;
use kiln_cache::images::{ImageError, MAX_JSON_BYTES};
use kiln_cache::reference::Reference;
use kiln_cache::store::StoreError;
use kiln_cache::Store;
use kiln_dag::{Digest, Platform};
use serde_json::Value;
use ureq::http::Method;

use super::client::{pull_scope, Client, ClientError, Payload, MANIFEST_ACCEPT};
use super::meta::BlobMeta;
use super::{media, parallel, TransferEvent, TransferProgress};

/// Read size when streaming a blob.
const CHUNK: usize = 256 * 1024;

/// A failure of a pull; every variant names the reference.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The store could not be held against garbage collection.
    #[error("failed to hold the store while pulling `{reference}`")]
    Hold {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: Box<StoreError>,
    },
    /// The manifest could not be fetched.
    #[error("failed to fetch the manifest of `{reference}`")]
    Manifest {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: Box<ClientError>,
    },
    /// The manifest's bytes do not hash to the digest asked for.
    #[error("manifest of `{reference}` does not match its digest: expected {expected}, got {actual}")]
    ManifestDigest {
        /// The reference.
        reference: String,
        /// The digest asked for.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// The manifest has a media type kiln does not pull.
    #[error("manifest of `{reference}` has unsupported media type `{media_type}`")]
    MediaType {
        /// The reference.
        reference: String,
        /// Its media type.
        media_type: String,
    },
    /// The manifest is not valid JSON of its type.
    #[error("manifest {digest} of `{reference}` is invalid")]
    ParseManifest {
        /// The reference.
        reference: String,
        /// The manifest's digest.
        digest: Digest,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A descriptor's digest is not a sha256 digest.
    #[error("manifest of `{reference}` has an unsupported digest `{value}`")]
    BadDigest {
        /// The reference.
        reference: String,
        /// The digest string.
        value: String,
    },
    /// No index entry matches the platform.
    #[error("no manifest for platform {platform} in `{reference}` (available: {available})")]
    NoPlatform {
        /// The reference.
        reference: String,
        /// The platform asked for.
        platform: String,
        /// The platforms the index lists.
        available: String,
    },
    /// A blob could not be fetched.
    #[error("failed to fetch blob {digest} of `{reference}`")]
    Blob {
        /// The reference.
        reference: String,
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: Box<ClientError>,
    },
    /// The download ended early (after every retry).
    #[error("blob {digest} of `{reference}` was truncated: {got} of {expected} bytes received")]
    Truncated {
        /// The reference.
        reference: String,
        /// The blob.
        digest: Digest,
        /// Its size per the manifest.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// The blob's bytes do not match its digest, or it could not be stored; nothing was
    /// committed.
    #[error("failed to store blob {digest} of `{reference}`")]
    Store {
        /// The reference.
        reference: String,
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: Box<ContentError>,
    },
    /// The pulled image is not usable (config or layer count wrong).
    #[error("pulled image `{reference}` is invalid")]
    Image {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: Box<ImageError>,
    },
}

/// How to pull.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// The platform an index is resolved to.
    pub platform: Platform,
    /// Blobs transferred at once.
    pub jobs: usize,
    /// What else to do with each layer as it downloads (a build unpacks it).
    pub tap: Option<std::sync::Arc<dyn LayerTap>>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: Platform::host(),
            jobs: 4,
            tap: None,
        }
    }
}

/// Something done with a pulled image's layers while they download, beside storing them: a
/// builder unpacks each as its bytes arrive instead of reading the stored blob back afterwards.
pub trait LayerTap: Send + Sync + std::fmt::Debug {
    /// A sink for one download attempt of layer `index` (blob `blob` of `size` bytes, as the
    /// manifest says) of an image whose config lists `diff_ids`; `None` to only store it.
    fn open(&self, index: usize, blob: &Digest, size: u64, diff_ids: &[Digest])
        -> Option<Box<dyn LayerSink>>;
}

/// The bytes of one download attempt of a layer, as they arrive.
pub trait LayerSink: Send {
    /// The next chunk. An error stops the sink, not the download.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// The attempt is over: `complete` when the blob arrived whole, matched its digest and was
    /// stored. Returns once the sink is done with it.
    fn finish(self: Box<Self>, complete: bool);
}

/// The result of a pull.
#[derive(Clone, Debug)]
pub struct Pulled {
    /// The reference pulled (normalised).
    pub reference: Reference,
    /// The digest the registry resolved the reference to (the index's, for a multi-platform
    /// image): Docker's `RepoDigest`.
    pub digest: Digest,
    /// The platform manifest's digest: the image in the local store.
    pub manifest: Digest,
    /// The image ID (config digest).
    pub image_id: Digest,
    /// Whether anything new was stored (blobs or the manifest).
    pub downloaded: bool,
    /// Whether the local tag already pointed at this image (`Image is up to date`).
    pub up_to_date: bool,
}

/// A manifest or index as fetched.
#[derive(Clone, Debug)]
struct Fetched {
    bytes: Vec<u8>,
    digest: Digest,
    media_type: String,
}

fn is_index(media_type: &str) -> bool {
    media_type == media::OCI_INDEX || media_type == media::DOCKER_LIST
}

fn manifest_media_type(content_type: Option<&str>, bytes: &[u8]) -> String {
    let ct = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim().to_string())
        .filter(|c| !c.is_empty() && c != "application/json" && c != "text/plain");
    if let Some(c) = ct {
        return c;
    }
    let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    if let Some(m) = v.get("mediaType").and_then(Value::as_str) {
        return m.to_string();
    }
    if v.get("manifests").is_some() {
        media::OCI_INDEX.to_string()
    } else if v.get("schemaVersion").and_then(Value::as_u64) == Some(1) {
        "application/vnd.docker.distribution.manifest.v1+json".to_string()
    } else {
        media::OCI_MANIFEST.to_string()
    }
}

/// The reference part of a manifest URL: the digest if pinned, else the tag.
fn manifest_ref(r: &Reference) -> String {
    match (r.digest(), r.tag()) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.to_string(),
        (None, None) => "latest".to_string(),
    }
}

fn fetch_manifest(
    client: &Client,
    r: &Reference,
    reference: &str,
    expected: Option<&Digest>,
) -> Result<Fetched, PullError> {
    let url = client.url(r.domain(), r.path(), "manifests", reference);
    let wrap = |source| PullError::Manifest {
        reference: r.to_string(),
        source: Box::new(source),
    };
    let resp = client
        .send(
            r.domain(),
            &pull_scope(r.path()),
            &Method::GET,
            &url,
            &[("accept", MANIFEST_ACCEPT.to_string())],
            Payload::Empty,
        )
        .map_err(wrap)?;
    if !resp.status().is_success() {
        return Err(wrap(ClientError::from_response(&Method::GET, &url, resp)));
    }
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = resp
        .into_body()
        .with_config()
        .limit(MAX_JSON_BYTES)
        .read_to_vec()
        .map_err(|source| {
            wrap(ClientError::Body {
                method: Method::GET,
                url: url.clone(),
                source,
            })
        })?;
    let digest = Digest::of(&bytes);
    if let Some(e) = expected {
        if *e != digest {
            return Err(PullError::ManifestDigest {
                reference: r.to_string(),
                expected: *e,
                actual: digest,
            });
        }
    }
    let media_type = manifest_media_type(content_type.as_deref(), &bytes);
    Ok(Fetched {
        bytes,
        digest,
        media_type,
    })
}

/// Whether an index entry's platform fits `want` (variant: equal, or either side unset, or the
/// arm64 default `v8` against none).
fn platform_matches(p: &Value, want: &Platform) -> bool {
    let os = p.get("os").and_then(Value::as_str).unwrap_or("");
    let arch = p.get("architecture").and_then(Value::as_str).unwrap_or("");
    if os != want.os || arch != want.architecture {
        return false;
    }
    let variant = p.get("variant").and_then(Value::as_str);
    match (variant, want.variant.as_deref()) {
        (Some(a), Some(b)) => a == b,
        (None, Some(b)) => arch == "arm64" && b == "v8",
        (_, None) => true,
    }
}

/// Picks the manifest for `want` from an index or manifest list: the first matching entry (an
/// entry with an exact variant is preferred over one without). Returns its digest, or the
/// platforms listed.
pub fn select_platform(index: &[u8], want: &Platform) -> Result<Option<String>, String> {
    let v: Value = serde_json::from_slice(index).map_err(|e| e.to_string())?;
    let manifests = v
        .get("manifests")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut best: Option<(u8, String)> = None;
    let mut available = Vec::new();
    for m in &manifests {
        let Some(p) = m.get("platform") else { continue };
        let digest = m.get("digest").and_then(Value::as_str).unwrap_or("").to_string();
        let os = p.get("os").and_then(Value::as_str).unwrap_or("");
        let arch = p.get("architecture").and_then(Value::as_str).unwrap_or("");
        let variant = p.get("variant").and_then(Value::as_str);
        available.push(match variant {
            Some(var) => format!("{os}/{arch}/{var}"),
            None => format!("{os}/{arch}"),
        });
        if !platform_matches(p, want) {
            continue;
        }
        let rank = if variant.is_some() == want.variant.is_some() {
            0
        } else {
            1
        };
        if best.as_ref().is_none_or(|(r, _)| rank < *r) {
            best = Some((rank, digest));
        }
    }
    match best {
        Some((_, d)) => Ok(Some(d)),
        None => Err(available.join(", ")),
    }
}

/// The manifest chosen for a reference: the index (if any) and the platform manifest.
#[derive(Clone, Debug)]
pub struct Remote {
    /// The digest the reference resolves to in the registry.
    pub digest: Digest,
    /// The platform manifest's digest.
    pub manifest: Digest,
}

fn resolve_fetched(
    client: &Client,
    r: &Reference,
    platform: &Platform,
) -> Result<(Fetched, Option<Fetched>), PullError> {
    let top = fetch_manifest(client, r, &manifest_ref(r), r.digest())?;
    if !is_index(&top.media_type) {
        return Ok((top, None));
    }
    let chosen = select_platform(&top.bytes, platform)
        .map_err(|available| PullError::NoPlatform {
            reference: r.to_string(),
            platform: platform.to_string(),
            available: if available.is_empty() {
                "none".into()
            } else {
                available
            },
        })?
        .unwrap_or_default();
    let digest = Digest::parse(&chosen).map_err(|_| PullError::BadDigest {
        reference: r.to_string(),
        value: chosen.clone(),
    })?;
    let child = fetch_manifest(client, r, &chosen, Some(&digest))?;
    if is_index(&child.media_type) {
        return Err(PullError::MediaType {
            reference: r.to_string(),
            media_type: format!("{} (nested index)", child.media_type),
        });
    }
    Ok((child, Some(top)))
}

/// Resolves a reference in its registry without downloading blobs: the top-level digest and
/// the platform manifest's digest.
pub fn resolve_remote(client: &Client, r: &Reference, platform: &Platform) -> Result<Remote, PullError> {
    let (manifest, index) = resolve_fetched(client, r, platform)?;
    Ok(Remote {
        digest: index.as_ref().map(|i| i.digest).unwrap_or(manifest.digest),
        manifest: manifest.digest,
    })
}

/// `HEAD` of the manifest: the digest the registry resolves a tag to, when it says.
fn head_digest(client: &Client, r: &Reference) -> Option<Digest> {
    let url = client.url(r.domain(), r.path(), "manifests", &manifest_ref(r));
    let resp = client
        .send(
            r.domain(),
            &pull_scope(r.path()),
            &Method::HEAD,
            &url,
            &[("accept", MANIFEST_ACCEPT.to_string())],
            Payload::Empty,
        )
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let d = resp.headers().get("docker-content-digest")?.to_str().ok()?;
    Digest::parse(d.trim()).ok()
}

/// Whether the store already has `digest` as the image for `platform`: the manifest itself, or
/// an index in the content store whose choice is `local`.
fn local_matches(store: &Store, digest: &Digest, local: &Digest, platform: &Platform) -> bool {
    if digest == local {
        return true;
    }
    let Ok(bytes) = store.content().read_limited(digest, MAX_JSON_BYTES) else {
        return false;
    };
    matches!(select_platform(&bytes, platform), Ok(Some(d)) if Digest::parse(&d).ok() == Some(*local))
}

/// Pulls `r` into `store`: manifest (index resolved to `opts.platform`), config and layers
/// (skipped when present; verified while streaming; in parallel), then records the image and,
/// for a tag reference, points the tag at it. With a local tag already there, a `HEAD` that
/// confirms it is the only request.
pub fn pull(
    client: &Client,
    store: &Store,
    r: &Reference,
    opts: &PullOptions,
    progress: &dyn TransferProgress,
) -> Result<Pulled, PullError> {
    let reference = r.to_string();
    let _hold = store.hold().map_err(|source| PullError::Hold {
        reference: reference.clone(),
        source: Box::new(source),
    })?;
    let images = store.images();
    let index = images.index().map_err(|source| PullError::Image {
        reference: reference.clone(),
        source: Box::new(source),
    })?;
    let local = match r.digest() {
        Some(d) => index
            .images
            .keys()
            .find(|m| local_matches(store, d, m, &opts.platform))
            .copied(),
        None => index.tags.get(&reference).copied(),
    };
    if let Some(local) = local {
        let remote = match r.digest() {
            Some(d) => Some(*d),
            None => head_digest(client, r),
        };
        if let Some(remote) = remote {
            // A local tag names the image, or an index whose image for the platform is here.
            let here = match images.get_target(&local) {
                Ok(Target::Index(ix)) if remote == local => ix
                    .select(&opts.platform)
                    .filter(|e| e.present)
                    .and_then(|e| images.get(&e.manifest).ok()),
                Ok(Target::Image(image)) if local_matches(store, &remote, &local, &opts.platform) => {
                    Some(*image)
                }
                _ => None,
            };
            if let Some(image) = here {
                return Ok(Pulled {
                    reference: r.clone(),
                    digest: remote,
                    manifest: image.manifest_digest,
                    image_id: image.config_digest,
                    downloaded: false,
                    up_to_date: true,
                });
            }
        }
    }

    let (manifest, top) = resolve_fetched(client, r, &opts.platform)?;
    let repo_digest = top.as_ref().map(|t| t.digest).unwrap_or(manifest.digest);
    if manifest.media_type != media::OCI_MANIFEST && manifest.media_type != media::DOCKER_MANIFEST {
        return Err(PullError::MediaType {
            reference,
            media_type: manifest.media_type,
        });
    }
    let parsed: Value =
        serde_json::from_slice(&manifest.bytes).map_err(|source| PullError::ParseManifest {
            reference: reference.clone(),
            digest: manifest.digest,
            source,
        })?;
    let descriptor = |v: &Value| -> Result<(Digest, u64), PullError> {
        let d = v.get("digest").and_then(Value::as_str).unwrap_or("");
        let digest = Digest::parse(d).map_err(|_| PullError::BadDigest {
            reference: reference.clone(),
            value: d.to_string(),
        })?;
        Ok((digest, v.get("size").and_then(Value::as_u64).unwrap_or(0)))
    };
    let config = descriptor(parsed.get("config").unwrap_or(&Value::Null))?;
    let content = store.content();
    // The config is small and, as Docker does, not reported as a layer.
    let config_new = fetch_blob(client, content, r, &config.0, config.1, &super::NoProgress)?;
    let mut blobs = vec![config];
    for l in parsed
        .get("layers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        blobs.push(descriptor(l)?);
    }
    let fetched = fetch_layers(client, content, r, opts, &config.0, &blobs[1..], progress)?;
    let new_manifest = !content.contains(&manifest.digest);
    let store_err = |digest, source| PullError::Store {
        reference: reference.clone(),
        digest,
        source: Box::new(source),
    };
    content
        .put_bytes(&manifest.bytes)
        .map_err(|e| store_err(manifest.digest, e))?;
    if let Some(t) = &top {
        content.put_bytes(&t.bytes).map_err(|e| store_err(t.digest, e))?;
    }
    let image = images.get(&manifest.digest).map_err(|source| PullError::Image {
        reference: reference.clone(),
        source: Box::new(source),
    })?;
    let tags = if r.digest().is_none() {
        vec![(r.clone(), manifest.digest)]
    } else {
        Vec::new()
    };
    // From an index: the index is kept (tagged, with the repository its other platforms come
    // from), so a later build or pull for another platform finds it.
    let image_err = |source| PullError::Image {
        reference: reference.clone(),
        source: Box::new(source),
    };
    match &top {
        Some(t) => {
            images.register(&[manifest.digest], &[]).map_err(image_err)?;
            let names: Vec<Reference> = tags.iter().map(|(r, _)| r.clone()).collect();
            images
                .register_index(&t.digest, Some(r.repository()), &names)
                .map_err(image_err)?;
        }
        None => images.register(&[manifest.digest], &tags).map_err(image_err)?,
    }
    let meta = BlobMeta::at(store.root());
    let repository = r.repository();
    for (d, _) in &blobs {
        if let Err(e) = meta.record_source(d, &repository) {
            tracing::debug!(error = %e, "could not record a blob source");
        }
    }
    let downloaded = new_manifest || config_new || fetched.iter().any(|f| *f);
    Ok(Pulled {
        reference: r.clone(),
        digest: repo_digest,
        manifest: manifest.digest,
        image_id: image.config_digest,
        downloaded,
        up_to_date: (local == Some(manifest.digest) || local == Some(repo_digest)) && !downloaded,
    })
}

/// Why one download attempt failed.
enum Attempt {
    /// Worth another try (connection dropped, truncated).
    Transient(PullError),
    /// Final.
    Fatal(PullError),
}

/// A manifest or index as the registry serves it at `reference` (a tag or a digest) of `r`'s
/// repository: its bytes (verified when `reference` is a digest), digest and media type.
pub fn fetch_manifest_bytes(
    client: &Client,
    r: &Reference,
    reference: &str,
) -> Result<(Vec<u8>, Digest, String), PullError> {
    let expected = Digest::parse(reference).ok();
    let f = fetch_manifest(client, r, reference, expected.as_ref())?;
    Ok((f.bytes, f.digest, f.media_type))
}

/// Streams one blob of `r`'s repository into the content store unless present, verified against
/// `digest` while it is written (a corrupt or truncated blob is never committed). Returns whether
/// it was downloaded.
pub fn fetch_blob(
    client: &Client,
    content: &ContentStore,
    r: &Reference,
    digest: &Digest,
    size: u64,
    progress: &dyn TransferProgress,
) -> Result<bool, PullError> {
    fetch_blob_tapped(client, content, r, digest, size, progress, &|| None)
}

/// [`fetch_blob`], each attempt's bytes also going to a sink from `open_sink` (when it gives
/// one), which is finished after the attempt.
fn fetch_blob_tapped(
    client: &Client,
    content: &ContentStore,
    r: &Reference,
    digest: &Digest,
    size: u64,
    progress: &dyn TransferProgress,
    open_sink: &dyn Fn() -> Option<Box<dyn LayerSink>>,
) -> Result<bool, PullError> {
    if content.contains(digest) {
        progress.event(TransferEvent::Exists { digest: *digest });
        return Ok(false);
    }
    let attempts = client.options().attempts.max(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        progress.event(TransferEvent::Started {
            digest: *digest,
            size: Some(size),
        });
        let mut sink = open_sink();
        let fetched = fetch_once(client, content, r, digest, size, progress, &mut |bytes| {
            sink.as_mut().map_or(Ok(()), |s| s.write(bytes))
        })
        .and_then(|unsynced| commit(unsynced, r, digest).map_err(Attempt::Fatal));
        if let Some(sink) = sink {
            sink.finish(fetched.is_ok());
        }
        match fetched {
            Ok(()) => {
                progress.event(TransferEvent::Done { digest: *digest });
                return Ok(true);
            }
            Err(Attempt::Transient(e)) if attempt < attempts => {
                progress.event(TransferEvent::Retrying {
                    digest: *digest,
                    error: e.to_string(),
                });
                std::thread::sleep(client.options().backoff * attempt);
            }
            Err(Attempt::Transient(e)) | Err(Attempt::Fatal(e)) => return Err(e),
        }
    }
}

/// Fetches an image's `layers` (`opts.jobs` at once), each also to `opts.tap` when the image's
/// config (in the store) names a diff ID for each. Whether each was downloaded.
fn fetch_layers(
    client: &Client,
    content: &ContentStore,
    r: &Reference,
    opts: &PullOptions,
    config: &Digest,
    layers: &[(Digest, u64)],
    progress: &dyn TransferProgress,
) -> Result<Vec<bool>, PullError> {
    let diff_ids = match &opts.tap {
        Some(_) => config_diff_ids(content, config),
        None => Vec::new(),
    };
    let numbered: Vec<(usize, &(Digest, u64))> = layers.iter().enumerate().collect();
    parallel(&numbered, opts.jobs, |(index, (digest, size))| {
        let open_sink = || match &opts.tap {
            Some(tap) if diff_ids.len() == layers.len() => tap.open(*index, digest, *size, &diff_ids),
            _ => None,
        };
        fetch_blob_tapped(client, content, r, digest, *size, progress, &open_sink)
    })
}

/// The diff IDs an image config in the store lists (none when it cannot be read).
fn config_diff_ids(content: &ContentStore, config: &Digest) -> Vec<Digest> {
    let Ok(bytes) = content.read_limited(config, MAX_JSON_BYTES) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return Vec::new();
    };
    v.pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .map(|ids| {
            ids.iter()
                .map(|d| d.as_str().and_then(|d| Digest::parse(d).ok()))
                .collect::<Option<Vec<Digest>>>()
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

/// [`fetch_blob`]'s download in one attempt, without its retries, its fsync and its commit:
/// each chunk of the blob goes to `sink` as it arrives (to unpack a layer while it downloads;
/// an error of `sink` stops nothing), and the blob is returned written to the content store's
/// ingest dir and verified against `digest`, for the caller to fsync and commit (or hand to a
/// [`kiln_cache::durable::Durable`] writer). Downloads even when the store holds the blob.
pub fn fetch_blob_streaming(
    client: &Client,
    content: &ContentStore,
    r: &Reference,
    digest: &Digest,
    size: u64,
    sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<Unsynced, PullError> {
    fetch_once(client, content, r, digest, size, &super::NoProgress, sink)
        .map_err(|(Attempt::Transient(e) | Attempt::Fatal(e))| e)
}

fn commit(unsynced: Unsynced, r: &Reference, digest: &Digest) -> Result<(), PullError> {
    let store_err = |source| PullError::Store {
        reference: r.to_string(),
        digest: *digest,
        source: Box::new(source),
    };
    unsynced
        .sync()
        .and_then(|staged| staged.commit())
        .map(drop)
        .map_err(store_err)
}

fn fetch_once(
    client: &Client,
    content: &ContentStore,
    r: &Reference,
    digest: &Digest,
    size: u64,
    progress: &dyn TransferProgress,
    sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<Unsynced, Attempt> {
    let url = client.url(r.domain(), r.path(), "blobs", &digest.to_string());
    let blob_err = |source| PullError::Blob {
        reference: r.to_string(),
        digest: *digest,
        source: Box::new(source),
    };
    let store_err = |source| PullError::Store {
        reference: r.to_string(),
        digest: *digest,
        source: Box::new(source),
    };
    let resp = client
        .send(
            r.domain(),
            &pull_scope(r.path()),
            &Method::GET,
            &url,
            &[],
            Payload::Empty,
        )
        .map_err(|e| Attempt::Fatal(blob_err(e)))?;
    if !resp.status().is_success() {
        return Err(Attempt::Fatal(blob_err(ClientError::from_response(
            &Method::GET,
            &url,
            resp,
        ))));
    }
    let mut reader = resp.into_body().into_reader();
    let mut writer = content.writer().map_err(|e| Attempt::Fatal(store_err(e)))?;
    let mut buf = vec![0u8; CHUNK];
    let mut got: u64 = 0;
    let mut sinking = true;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(%url, error = %e, got, "blob download interrupted");
                return Err(Attempt::Transient(PullError::Truncated {
                    reference: r.to_string(),
                    digest: *digest,
                    expected: size,
                    got,
                }));
            }
        };
        got += n as u64;
        if got > size && size > 0 {
            // More than announced: the digest check would fail; stop reading now.
            break;
        }
        writer.write_all(&buf[..n]).map_err(|source| {
            Attempt::Fatal(store_err(ContentError::Write {
                path: content.ingest_dir().to_path_buf(),
                source,
            }))
        })?;
        progress.event(TransferEvent::Bytes {
            digest: *digest,
            n: n as u64,
        });
        if sinking && sink(&buf[..n]).is_err() {
            sinking = false;
        }
    }
    if got < size {
        return Err(Attempt::Transient(PullError::Truncated {
            reference: r.to_string(),
            digest: *digest,
            expected: size,
            got,
        }));
    }
    writer
        .finish_unsynced(Some(digest))
        .map_err(|e| Attempt::Fatal(store_err(e)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    const INDEX: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aa","size":1,"platform":{"os":"linux","architecture":"arm","variant":"v6"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:bb","size":1,"platform":{"os":"linux","architecture":"arm","variant":"v7"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:cc","size":1,"platform":{"os":"linux","architecture":"amd64"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:dd","size":1,"platform":{"os":"linux","architecture":"arm64"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:ee","size":1,"platform":{"os":"unknown","architecture":"unknown"}}]}"#;

    #[test]
    fn selects_the_platform() {
        let sel = |s| select_platform(INDEX.as_bytes(), &p(s));
        assert_eq!(sel("linux/amd64").unwrap().unwrap(), "sha256:cc");
        assert_eq!(sel("linux/arm/v7").unwrap().unwrap(), "sha256:bb");
        assert_eq!(sel("linux/arm/v6").unwrap().unwrap(), "sha256:aa");
        // `linux/arm` is arm/v7, as containerd normalises it.
        assert_eq!(sel("linux/arm").unwrap().unwrap(), "sha256:bb");
        assert_eq!(sel("linux/arm64/v8").unwrap().unwrap(), "sha256:dd");
        let err = sel("linux/s390x").unwrap_err();
        assert!(
            err.contains("linux/arm/v7") && err.contains("linux/amd64"),
            "{err}"
        );
        assert!(sel("linux/arm/v5").is_err());
    }

    #[test]
    fn media_types_come_from_header_or_body() {
        assert_eq!(
            manifest_media_type(Some("application/vnd.oci.image.index.v1+json; charset=x"), b"{}"),
            media::OCI_INDEX
        );
        assert_eq!(
            manifest_media_type(
                Some("application/json"),
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            ),
            media::DOCKER_MANIFEST
        );
        assert_eq!(
            manifest_media_type(None, br#"{"manifests":[]}"#),
            media::OCI_INDEX
        );
        assert_eq!(
            manifest_media_type(None, br#"{"layers":[]}"#),
            media::OCI_MANIFEST
        );
        let r = Reference::parse("127.0.0.1:5000/a/b").unwrap();
        assert_eq!(manifest_ref(&r), "latest");
        let d = Digest::of(b"m");
        assert_eq!(manifest_ref(&r.with_digest(d)), d.to_string());
    }
}
