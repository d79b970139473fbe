//! `kiln push`: an image from the store to a registry.
//!
//! Layers first (in parallel), then the config, then the manifest. A blob the registry has is
//! skipped after one `HEAD`; one known to be in another repository of the same registry is
//! mounted (`POST .../blobs/uploads/?mount=D&from=R`); anything else is uploaded as one
//! streamed `PATCH` (chunked transfer encoding) and a `PUT ?digest=`. Layers kiln stored
//! uncompressed are gzip-compressed while they are sent, their digest computed on the way; the
//! result is remembered ([`super::meta`]) so the next push finds them with a `HEAD`. The manifest
//! is pushed byte for byte when no layer had to be compressed, else rewritten with the
//! compressed descriptors.

use std::io::Read;

use kiln_cache::content::ContentError;
use kiln_cache::image_index::IndexImage;
use kiln_cache::images::{Image, ImageError};
use kiln_cache::reference::Reference;
use kiln_cache::Store;
use kiln_dag::Digest;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use ureq::http::Method;

use super::client::{push_scope, Client, ClientError, Payload};
use super::meta::{BlobMeta, Compressed};
use super::{media, parallel, TransferEvent, TransferProgress};

pub use super::compress::{Compression, GZIP_LEVEL, ZSTD_LEVEL};

/// A failure of a push; every variant names the reference.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The image is not in the store.
    #[error("failed to find image `{reference}` in the local store")]
    Image {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: Box<ImageError>,
    },
    /// A blob could not be read from the store.
    #[error("failed to read blob {digest} of `{reference}` from the store")]
    Read {
        /// The reference.
        reference: String,
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: Box<ContentError>,
    },
    /// The registry refused or failed a blob request.
    #[error("failed to push blob {digest} to `{reference}`")]
    Blob {
        /// The reference.
        reference: String,
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: Box<ClientError>,
    },
    /// A layer's compressor could not be set up.
    #[error("failed to start {} compression of layer {digest} for `{reference}`", algorithm.name())]
    Compress {
        /// The reference.
        reference: String,
        /// The layer blob.
        digest: Digest,
        /// The compression asked for.
        algorithm: Compression,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The compression asked for does not fit the image's manifest.
    #[error("cannot push `{reference}` with {} layers: its manifest is {media_type}, which has no {} layer type", algorithm.name(), algorithm.name())]
    CompressionMediaType {
        /// The reference.
        reference: String,
        /// The compression asked for.
        algorithm: Compression,
        /// The manifest's media type.
        media_type: String,
    },
    /// The manifest could not be encoded.
    #[error("failed to encode the manifest for `{reference}`")]
    Encode {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The registry refused the manifest.
    #[error("failed to push the manifest to `{reference}`")]
    Manifest {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: Box<ClientError>,
    },
}

/// How to push.
#[derive(Clone, Debug)]
pub struct PushOptions {
    /// Blobs transferred at once.
    pub jobs: usize,
    /// How layers kept uncompressed in the store are sent. Layers stored compressed (pulled
    /// ones) are sent as they are, as BuildKit does without `force-compression`.
    pub compression: Compression,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            jobs: 4,
            compression: Compression::Gzip,
        }
    }
}

/// The result of a push.
#[derive(Clone, Debug)]
pub struct Pushed {
    /// The reference pushed to.
    pub reference: Reference,
    /// The digest of the manifest as pushed.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
}

/// A layer as it ends up in the pushed manifest.
#[derive(Clone, Debug)]
struct Sent {
    digest: Digest,
    size: u64,
    /// Compressed on the way, and how (so the descriptor changes).
    compressed: Option<Compression>,
}

/// Context of one push.
struct Ctx<'a> {
    client: &'a Client,
    store: &'a Store,
    r: &'a Reference,
    meta: BlobMeta,
    progress: &'a dyn TransferProgress,
}

/// Why an upload attempt failed.
enum Attempt {
    Transient(PushError),
    Fatal(PushError),
}

impl Ctx<'_> {
    fn scope(&self) -> Vec<String> {
        push_scope(self.r.path(), None)
    }

    fn blob_err(&self, digest: &Digest, source: ClientError) -> PushError {
        PushError::Blob {
            reference: self.r.to_string(),
            digest: *digest,
            source: Box::new(source),
        }
    }

    /// Whether the registry has the blob.
    fn exists(&self, digest: &Digest) -> Result<bool, PushError> {
        let url = self
            .client
            .url(self.r.domain(), self.r.path(), "blobs", &digest.to_string());
        let resp = self
            .client
            .send(
                self.r.domain(),
                &self.scope(),
                &Method::HEAD,
                &url,
                &[],
                Payload::Empty,
            )
            .map_err(|e| self.blob_err(digest, e))?;
        match resp.status().as_u16() {
            200..=299 => Ok(true),
            404 => Ok(false),
            _ => Err(self.blob_err(digest, ClientError::from_response(&Method::HEAD, &url, resp))),
        }
    }

    /// Tries to mount the blob from a repository of the same registry it is known to be in.
    fn mount(&self, digest: &Digest) -> Result<Option<String>, PushError> {
        let prefix = format!("{}/", self.r.domain());
        for source in self.meta.sources(digest) {
            let Some(from) = source.strip_prefix(&prefix) else {
                continue;
            };
            if from == self.r.path() {
                continue;
            }
            let url = format!(
                "{}/v2/{}/blobs/uploads/?mount={}&from={}",
                self.client.base_url(self.r.domain()),
                self.r.path(),
                digest,
                from
            );
            let resp = self
                .client
                .send(
                    self.r.domain(),
                    &push_scope(self.r.path(), Some(from)),
                    &Method::POST,
                    &url,
                    &[],
                    Payload::Empty,
                )
                .map_err(|e| self.blob_err(digest, e))?;
            if resp.status().as_u16() == 201 {
                return Ok(Some(from.to_string()));
            }
            // 202: the registry opened an upload instead; it expires unused.
        }
        Ok(None)
    }

    /// Uploads a blob: `POST`, one streamed `PATCH`, `PUT ?digest=`. `open` makes a fresh
    /// reader for each attempt. Returns the digest and size of what was sent.
    fn upload(
        &self,
        event_digest: &Digest,
        size: Option<u64>,
        open: &dyn Fn() -> Result<Box<dyn Read + Send>, PushError>,
    ) -> Result<(Digest, u64), PushError> {
        let attempts = self.client.options().attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.progress.event(TransferEvent::Started {
                digest: *event_digest,
                size,
            });
            match self.upload_once(event_digest, open) {
                Ok(v) => return Ok(v),
                Err(Attempt::Transient(e)) if attempt < attempts => {
                    self.progress.event(TransferEvent::Retrying {
                        digest: *event_digest,
                        error: e.to_string(),
                    });
                    std::thread::sleep(self.client.options().backoff * attempt);
                }
                Err(Attempt::Transient(e)) | Err(Attempt::Fatal(e)) => return Err(e),
            }
        }
    }

    fn location(
        &self,
        method: &Method,
        url: &str,
        resp: &ureq::http::Response<ureq::Body>,
    ) -> Result<String, ClientError> {
        resp.headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(|l| self.client.resolve_location(self.r.domain(), l))
            .ok_or_else(|| ClientError::Protocol {
                method: method.clone(),
                url: url.to_string(),
                detail: "the response has no Location header".into(),
            })
    }

    fn upload_once(
        &self,
        event_digest: &Digest,
        open: &dyn Fn() -> Result<Box<dyn Read + Send>, PushError>,
    ) -> Result<(Digest, u64), Attempt> {
        let d = event_digest;
        let classify = |e: ClientError| -> Attempt {
            let transient = match &e {
                ClientError::Transport { .. } | ClientError::Body { .. } => true,
                ClientError::Status { status, .. } => *status >= 500 || *status == 429,
                _ => false,
            };
            let err = self.blob_err(d, e);
            if transient {
                Attempt::Transient(err)
            } else {
                Attempt::Fatal(err)
            }
        };
        let scope = self.scope();
        let domain = self.r.domain();
        // 1. Open an upload session.
        let url = format!(
            "{}/v2/{}/blobs/uploads/",
            self.client.base_url(domain),
            self.r.path()
        );
        let resp = self
            .client
            .send(domain, &scope, &Method::POST, &url, &[], Payload::Empty)
            .map_err(classify)?;
        if resp.status().as_u16() != 202 {
            return Err(classify(ClientError::from_response(&Method::POST, &url, resp)));
        }
        let location = self.location(&Method::POST, &url, &resp).map_err(classify)?;
        drop(resp);
        // 2. Stream the content.
        let reader = open().map_err(Attempt::Fatal)?;
        let mut hashing = HashingReader {
            inner: reader,
            hasher: Sha256::new(),
            count: 0,
            digest: *d,
            progress: self.progress,
        };
        let resp = self
            .client
            .send_stream(
                domain,
                &scope,
                &Method::PATCH,
                &location,
                &[("content-type", "application/octet-stream".to_string())],
                &mut hashing,
            )
            .map_err(classify)?;
        if !resp.status().is_success() {
            return Err(classify(ClientError::from_response(
                &Method::PATCH,
                &location,
                resp,
            )));
        }
        let location = self
            .location(&Method::PATCH, &location, &resp)
            .map_err(classify)?;
        drop(resp);
        let digest = Digest(hashing.hasher.finalize().into());
        let size = hashing.count;
        // 3. Close it with the digest.
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!(
            "{location}{sep}digest={}",
            super::client::encode_query(&digest.to_string())
        );
        let resp = self
            .client
            .send(domain, &scope, &Method::PUT, &put, &[], Payload::Empty)
            .map_err(classify)?;
        if resp.status().as_u16() != 201 {
            return Err(classify(ClientError::from_response(&Method::PUT, &put, resp)));
        }
        Ok((digest, size))
    }

    /// Pushes a blob kept as it is in the store (compressed layer or config).
    fn push_verbatim(&self, digest: &Digest) -> Result<(), PushError> {
        if self.exists(digest)? {
            self.progress.event(TransferEvent::Exists { digest: *digest });
            return Ok(());
        }
        if let Some(from) = self.mount(digest)? {
            self.progress.event(TransferEvent::Mounted {
                digest: *digest,
                from,
            });
            return Ok(());
        }
        let content = self.store.content();
        let read_err = |source| PushError::Read {
            reference: self.r.to_string(),
            digest: *digest,
            source: Box::new(source),
        };
        let size = content.size(digest).map_err(read_err)?;
        let open = || -> Result<Box<dyn Read + Send>, PushError> { content.reader(digest).map_err(read_err) };
        let (sent, _) = self.upload(digest, Some(size), &open)?;
        if sent != *digest {
            return Err(PushError::Read {
                reference: self.r.to_string(),
                digest: *digest,
                source: Box::new(ContentError::Mismatch {
                    expected: *digest,
                    actual: sent,
                    size,
                }),
            });
        }
        self.progress.event(TransferEvent::Done { digest: *digest });
        Ok(())
    }

    /// Pushes a layer stored uncompressed, compressed with `algorithm` (gzip or zstd) on the
    /// way; returns the compressed blob.
    fn push_compressed(
        &self,
        blob: &Digest,
        diff_id: &Digest,
        algorithm: Compression,
    ) -> Result<Compressed, PushError> {
        if let Some(known) = self.meta.compressed(diff_id, algorithm.name()) {
            if self.exists(&known.digest)? {
                self.progress.event(TransferEvent::Exists { digest: *blob });
                return Ok(known);
            }
            if let Some(from) = self.mount(&known.digest)? {
                self.progress
                    .event(TransferEvent::Mounted { digest: *blob, from });
                return Ok(known);
            }
        }
        let content = self.store.content();
        let compress_err = |source: std::io::Error| PushError::Compress {
            reference: self.r.to_string(),
            digest: *blob,
            algorithm,
            source,
        };
        let open = || -> Result<Box<dyn Read + Send>, PushError> {
            let input = content.reader(blob).map_err(|source| PushError::Read {
                reference: self.r.to_string(),
                digest: *blob,
                source: Box::new(source),
            })?;
            super::compress::compressing_reader(input, algorithm).map_err(compress_err)
        };
        let (digest, size) = self.upload(blob, None, &open)?;
        let c = Compressed { digest, size };
        if let Err(e) = self.meta.record_compressed(diff_id, algorithm.name(), &c) {
            tracing::debug!(error = %e, "could not record a compressed layer");
        }
        self.progress.event(TransferEvent::Done { digest: *blob });
        Ok(c)
    }
}

/// A blob as it is in a registry after [`BlobSession::push_layer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentBlob {
    /// Its digest there (the compressed one for a layer compressed on the way).
    pub digest: Digest,
    /// Its size there.
    pub size: u64,
    /// Its media type there.
    pub media_type: String,
}

/// Single blobs and a manifest to one repository, with [`push_image`]'s rules (HEAD-skip,
/// cross-repository mounts from the hints in `ROOT/registry/sources`, compression on the way):
/// what a build cache export is made of. Blobs first, the manifest last, so a reader never sees
/// a manifest naming a blob that is not there yet.
pub struct BlobSession<'a> {
    ctx: Ctx<'a>,
}

impl<'a> BlobSession<'a> {
    /// A session pushing to `r`'s repository.
    pub fn new(
        client: &'a Client,
        store: &'a Store,
        r: &'a Reference,
        progress: &'a dyn TransferProgress,
    ) -> BlobSession<'a> {
        BlobSession {
            ctx: Ctx {
                client,
                store,
                r,
                meta: BlobMeta::at(store.root()),
                progress,
            },
        }
    }

    /// Whether the repository has `digest`.
    pub fn exists(&self, digest: &Digest) -> Result<bool, PushError> {
        self.ctx.exists(digest)
    }

    /// Pushes a layer: one kept uncompressed in the store is compressed with `compression` on
    /// the way (gzip or zstd); any other (a pulled or imported layer, or one not in the store but
    /// known to be in this registry) goes as it is.
    pub fn push_layer(
        &self,
        blob: &Digest,
        diff_id: &Digest,
        media_type: &str,
        size: u64,
        compression: Compression,
    ) -> Result<SentBlob, PushError> {
        let local = self.ctx.store.content().contains(blob);
        if local && is_uncompressed(media_type) && compression != Compression::Uncompressed {
            let c = self.ctx.push_compressed(blob, diff_id, compression)?;
            let media_type = match compression {
                Compression::Zstd => media::OCI_LAYER_ZSTD,
                Compression::Gzip | Compression::Uncompressed => media::OCI_LAYER_GZIP,
            };
            return Ok(SentBlob {
                digest: c.digest,
                size: c.size,
                media_type: media_type.to_string(),
            });
        }
        self.ctx.push_verbatim(blob)?;
        Ok(SentBlob {
            digest: *blob,
            size,
            media_type: media_type.to_string(),
        })
    }

    /// Pushes `bytes` (a config) as a blob, after storing them in the content store.
    pub fn push_bytes(&self, bytes: &[u8]) -> Result<Digest, PushError> {
        let digest = Digest::of(bytes);
        self.ctx
            .store
            .content()
            .put_bytes(bytes)
            .map_err(|source| PushError::Read {
                reference: self.ctx.r.to_string(),
                digest,
                source: Box::new(source),
            })?;
        let quiet = Ctx {
            progress: &super::NoProgress,
            meta: self.ctx.meta.clone(),
            ..self.ctx
        };
        quiet.push_verbatim(&digest)?;
        Ok(digest)
    }

    /// Puts `bytes` as the manifest under the reference's tag (or digest), and remembers that
    /// `blobs` are in this repository (for later mounts). Returns the manifest's digest.
    pub fn put_manifest(
        &self,
        media_type: &str,
        bytes: &[u8],
        blobs: &[Digest],
    ) -> Result<Digest, PushError> {
        let r = self.ctx.r;
        let client = self.ctx.client;
        let tag = match (r.digest(), r.tag()) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => "latest".to_string(),
        };
        let url = client.url(r.domain(), r.path(), "manifests", &tag);
        let manifest_err = |source| PushError::Manifest {
            reference: r.to_string(),
            source: Box::new(source),
        };
        let resp = client
            .send(
                r.domain(),
                &self.ctx.scope(),
                &Method::PUT,
                &url,
                &[("content-type", media_type.to_string())],
                Payload::Bytes(bytes),
            )
            .map_err(manifest_err)?;
        if !resp.status().is_success() {
            return Err(manifest_err(ClientError::from_response(&Method::PUT, &url, resp)));
        }
        let repository = r.repository();
        for d in blobs {
            let _ = self.ctx.meta.record_source(d, &repository);
        }
        Ok(Digest::of(bytes))
    }
}

/// Counts and hashes what is read through it, reporting progress.
struct HashingReader<'a> {
    inner: Box<dyn Read + Send>,
    hasher: Sha256,
    count: u64,
    digest: Digest,
    progress: &'a dyn TransferProgress,
}

impl Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if n > 0 {
            self.progress.event(TransferEvent::Bytes {
                digest: self.digest,
                n: n as u64,
            });
        }
        Ok(n)
    }
}

fn is_uncompressed(media_type: &str) -> bool {
    media_type == media::OCI_LAYER || media_type == media::DOCKER_LAYER
}

/// Pushes the image `r` names in the store to `r`'s registry and repository, under its tag (or
/// by digest for a digest reference).
pub fn push(
    client: &Client,
    store: &Store,
    r: &Reference,
    opts: &PushOptions,
    progress: &dyn TransferProgress,
) -> Result<Pushed, PushError> {
    let reference = r.to_string();
    let target = store
        .images()
        .resolve_target(&reference)
        .map_err(|source| PushError::Image {
            reference: reference.clone(),
            source: Box::new(source),
        })?;
    match target {
        kiln_cache::image_index::Target::Image(image) => push_image(client, store, &image, r, opts, progress),
        kiln_cache::image_index::Target::Index(index) => push_index(client, store, &index, r, opts, progress),
    }
}

/// Pushes `image` (from the store) to `r`'s registry and repository, under `r`'s tag (or by
/// digest for a digest reference), whatever names the image has locally.
pub fn push_image(
    client: &Client,
    store: &Store,
    image: &Image,
    r: &Reference,
    opts: &PushOptions,
    progress: &dyn TransferProgress,
) -> Result<Pushed, PushError> {
    push_image_to(client, store, image, r, opts, progress, false)
}

/// Pushes the image index `index` (from the store) to `r`: every platform image it lists, each
/// under its pushed digest (blobs the images share are sent once: the second finds them with a
/// `HEAD`), then the index itself under `r`'s tag. Layers compressed on the way change the
/// platform manifests' digests, so the pushed index is rewritten with the pushed descriptors
/// (platforms and annotations kept). Every platform image must be in the store.
pub fn push_index(
    client: &Client,
    store: &Store,
    index: &IndexImage,
    r: &Reference,
    opts: &PushOptions,
    progress: &dyn TransferProgress,
) -> Result<Pushed, PushError> {
    let reference = r.to_string();
    let mut v: Value = serde_json::from_slice(&index.bytes).map_err(|source| PushError::Encode {
        reference: reference.clone(),
        source,
    })?;
    let images = store.images();
    let mut changed = false;
    if let Some(manifests) = v.get_mut("manifests").and_then(Value::as_array_mut) {
        for m in manifests.iter_mut() {
            let d = m.get("digest").and_then(Value::as_str).unwrap_or("");
            let Ok(digest) = Digest::parse(d) else { continue };
            let image = images.get(&digest).map_err(|source| PushError::Image {
                reference: format!("{reference} ({digest}, a platform of index {})", index.digest),
                source: Box::new(source),
            })?;
            let pushed = push_image_to(client, store, &image, r, opts, progress, true)?;
            changed |= pushed.digest != digest;
            if let Some(obj) = m.as_object_mut() {
                obj.insert("digest".into(), Value::String(pushed.digest.to_string()));
                obj.insert("size".into(), Value::from(pushed.size));
                obj.insert("mediaType".into(), Value::String(pushed.media_type));
            }
        }
    }
    let bytes = if !changed {
        index.bytes.clone()
    } else {
        serde_json::to_vec(&v).map_err(|source| PushError::Encode {
            reference: reference.clone(),
            source,
        })?
    };
    let media_type = v
        .get("mediaType")
        .and_then(Value::as_str)
        .unwrap_or(media::OCI_INDEX)
        .to_string();
    let tag = match (r.digest(), r.tag()) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.to_string(),
        (None, None) => "latest".to_string(),
    };
    put_manifest(client, r, &tag, &media_type, &bytes)?;
    Ok(Pushed {
        reference: r.clone(),
        digest: Digest::of(&bytes),
        size: bytes.len() as u64,
        media_type,
    })
}

fn put_manifest(
    client: &Client,
    r: &Reference,
    tag: &str,
    media_type: &str,
    bytes: &[u8],
) -> Result<(), PushError> {
    let url = client.url(r.domain(), r.path(), "manifests", tag);
    let manifest_err = |source| PushError::Manifest {
        reference: r.to_string(),
        source: Box::new(source),
    };
    let resp = client
        .send(
            r.domain(),
            &push_scope(r.path(), None),
            &Method::PUT,
            &url,
            &[("content-type", media_type.to_string())],
            Payload::Bytes(bytes),
        )
        .map_err(manifest_err)?;
    if !resp.status().is_success() {
        return Err(manifest_err(ClientError::from_response(&Method::PUT, &url, resp)));
    }
    Ok(())
}

/// [`push_image`], under `r`'s tag or, with `by_digest`, under the pushed manifest's digest.
fn push_image_to(
    client: &Client,
    store: &Store,
    image: &Image,
    r: &Reference,
    opts: &PushOptions,
    progress: &dyn TransferProgress,
    by_digest: bool,
) -> Result<Pushed, PushError> {
    let reference = r.to_string();
    let docker_manifest = serde_json::from_slice::<Value>(&image.manifest_bytes)
        .ok()
        .and_then(|v| v.get("mediaType").and_then(Value::as_str).map(str::to_string))
        .filter(|m| m == media::DOCKER_MANIFEST);
    if let (Compression::Zstd, Some(media_type)) = (opts.compression, &docker_manifest) {
        return Err(PushError::CompressionMediaType {
            reference,
            algorithm: opts.compression,
            media_type: media_type.clone(),
        });
    }
    let ctx = Ctx {
        client,
        store,
        r,
        meta: BlobMeta::at(store.root()),
        progress,
    };
    let sent = parallel(&image.layers, opts.jobs, |l| -> Result<Sent, PushError> {
        let media_type = l.descriptor.media_type().to_string();
        if is_uncompressed(&media_type) && opts.compression != Compression::Uncompressed {
            let c = ctx.push_compressed(&l.digest, &l.diff_id, opts.compression)?;
            Ok(Sent {
                digest: c.digest,
                size: c.size,
                compressed: Some(opts.compression),
            })
        } else {
            ctx.push_verbatim(&l.digest)?;
            Ok(Sent {
                digest: l.digest,
                size: l.descriptor.size(),
                compressed: None,
            })
        }
    })?;
    // The config is not reported as a layer, as Docker does.
    let quiet = Ctx {
        progress: &super::NoProgress,
        meta: ctx.meta.clone(),
        ..ctx
    };
    quiet.push_verbatim(&image.config_digest)?;

    let manifest_bytes = if sent.iter().any(|s| s.compressed.is_some()) {
        rewrite_manifest(&image.manifest_bytes, &sent).map_err(|source| PushError::Encode {
            reference: reference.clone(),
            source,
        })?
    } else {
        image.manifest_bytes.clone()
    };
    let digest = Digest::of(&manifest_bytes);
    let media_type = serde_json::from_slice::<Value>(&manifest_bytes)
        .ok()
        .and_then(|v| v.get("mediaType").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| media::OCI_MANIFEST.to_string());
    let tag = match (by_digest, r.digest(), r.tag()) {
        (true, _, _) => digest.to_string(),
        (false, Some(d), _) => d.to_string(),
        (false, None, Some(t)) => t.to_string(),
        (false, None, None) => "latest".to_string(),
    };
    put_manifest(client, r, &tag, &media_type, &manifest_bytes)?;
    let repository = r.repository();
    for s in &sent {
        let _ = ctx.meta.record_source(&s.digest, &repository);
    }
    let _ = ctx.meta.record_source(&image.config_digest, &repository);
    Ok(Pushed {
        reference: r.clone(),
        digest,
        size: manifest_bytes.len() as u64,
        media_type,
    })
}

/// The manifest with the compressed layers' descriptors, media types made consistent with the
/// manifest's own (OCI or Docker). Unknown fields and annotations are kept.
fn rewrite_manifest(bytes: &[u8], sent: &[Sent]) -> Result<Vec<u8>, serde_json::Error> {
    let mut v: Value = serde_json::from_slice(bytes)?;
    let docker = v.get("mediaType").and_then(Value::as_str) == Some(media::DOCKER_MANIFEST);
    let config_type = if docker {
        media::DOCKER_CONFIG
    } else {
        media::OCI_CONFIG
    };
    if let Some(cfg) = v.get_mut("config").and_then(Value::as_object_mut) {
        let current = cfg.get("mediaType").and_then(Value::as_str).unwrap_or("");
        if current == media::OCI_CONFIG || current == media::DOCKER_CONFIG || current.is_empty() {
            cfg.insert("mediaType".into(), Value::String(config_type.into()));
        }
    }
    if let Some(layers) = v.get_mut("layers").and_then(Value::as_array_mut) {
        for (l, s) in layers.iter_mut().zip(sent) {
            let Some(obj) = l.as_object_mut() else { continue };
            let layer_type = match (s.compressed, docker) {
                (None | Some(Compression::Uncompressed), _) => continue,
                (Some(Compression::Gzip), true) => media::DOCKER_LAYER_GZIP,
                (Some(Compression::Gzip), false) => media::OCI_LAYER_GZIP,
                // `push_image` refuses zstd for Docker manifests.
                (Some(Compression::Zstd), _) => media::OCI_LAYER_ZSTD,
            };
            obj.insert("mediaType".into(), Value::String(layer_type.into()));
            obj.insert("digest".into(), Value::String(s.digest.to_string()));
            obj.insert("size".into(), Value::from(s.size));
        }
    }
    serde_json::to_vec(&v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rewrites_uncompressed_layers_only() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let gz = Digest::of(b"gz");
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{a}","size":1}},"layers":[{{"mediaType":"{}","digest":"{a}","size":10}},{{"mediaType":"{}","digest":"{b}","size":5,"annotations":{{"k":"v"}}}}]}}"#,
            media::OCI_MANIFEST,
            media::OCI_CONFIG,
            media::OCI_LAYER,
            media::OCI_LAYER_GZIP
        );
        let out = rewrite_manifest(
            m.as_bytes(),
            &[
                Sent {
                    digest: gz,
                    size: 3,
                    compressed: Some(Compression::Gzip),
                },
                Sent {
                    digest: b,
                    size: 5,
                    compressed: None,
                },
            ],
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["layers"][0]["mediaType"], media::OCI_LAYER_GZIP);
        assert_eq!(v["layers"][0]["digest"], gz.to_string());
        assert_eq!(v["layers"][0]["size"], 3);
        assert_eq!(v["layers"][1]["digest"], b.to_string());
        assert_eq!(v["layers"][1]["annotations"]["k"], "v");
        assert_eq!(v["config"]["mediaType"], media::OCI_CONFIG);
        // A Docker manifest whose config still has the OCI type: made consistent.
        let docker = m.replace(media::OCI_MANIFEST, media::DOCKER_MANIFEST);
        let out = rewrite_manifest(
            docker.as_bytes(),
            &[Sent {
                digest: gz,
                size: 3,
                compressed: Some(Compression::Gzip),
            }],
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["layers"][0]["mediaType"], media::DOCKER_LAYER_GZIP);
        assert_eq!(v["config"]["mediaType"], media::DOCKER_CONFIG);
        // zstd layers get OCI's zstd type.
        let out = rewrite_manifest(
            m.as_bytes(),
            &[Sent {
                digest: gz,
                size: 3,
                compressed: Some(Compression::Zstd),
            }],
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["layers"][0]["mediaType"], media::OCI_LAYER_ZSTD);
        assert_eq!(v["layers"][1]["mediaType"], media::OCI_LAYER_GZIP, "untouched");
        assert!(is_uncompressed(media::DOCKER_LAYER));
        assert!(!is_uncompressed(media::DOCKER_LAYER_GZIP));
    }
}
