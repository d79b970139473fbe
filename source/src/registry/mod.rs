//! Registry client: pull, push and credentials over the OCI distribution API (and Docker's
//! registry API, which is the same protocol with Docker media types).
//!
//! - [`client::Client`]: HTTP, auth (anonymous, Basic, Bearer tokens from the
//!   `WWW-Authenticate` challenge, credentials from Docker's `config.json` and credential
//!   helpers), plain HTTP for loopback and insecure registries, retries with backoff.
//! - [`pull::pull`]: tag -> manifest (an index resolved to one platform) -> blobs streamed into
//!   the content store, verified while streaming, in parallel; the registry's manifest is kept
//!   byte for byte, so the local manifest digest is the registry's.
//! - [`push::push`]: blobs (skipped when present, mounted across repositories when possible,
//!   uncompressed local layers gzip-compressed on the fly), config, then the manifest.
//!
//! Written on `ureq` (blocking HTTP) rather than `oci-client`: that crate holds a whole blob in
//! memory to push it, has no credential helpers, and needs an async runtime.

pub mod auth;
pub mod client;
pub mod compress;
pub mod meta;
pub mod pull;
pub mod push;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use kiln_dag::Digest;

pub use auth::{Credentials, DockerConfig};
pub use client::{Client, ClientError, ClientOptions};
pub use pull::{
    fetch_blob, fetch_blob_streaming, fetch_manifest_bytes, pull, resolve_remote, LayerSink, LayerTap,
    PullError, PullOptions, Pulled,
};
pub use push::{
    push, push_image, push_index, BlobSession, Compression, PushError, PushOptions, Pushed, SentBlob,
};

/// Media types of the distribution API.
pub mod media {
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// Docker manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// Docker image manifest, schema 2.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// OCI uncompressed layer.
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    /// OCI gzip layer.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// OCI zstd layer.
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// Docker uncompressed layer.
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    /// Docker gzip layer.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
}

/// What a transfer reports about each blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferEvent {
    /// The blob is already where it is going (in the store, or in the registry).
    Exists {
        /// The blob.
        digest: Digest,
    },
    /// A transfer began (`size` when known).
    Started {
        /// The blob.
        digest: Digest,
        /// Its size, when known.
        size: Option<u64>,
    },
    /// `n` more bytes went through.
    Bytes {
        /// The blob.
        digest: Digest,
        /// How many.
        n: u64,
    },
    /// The transfer failed transiently and starts again.
    Retrying {
        /// The blob.
        digest: Digest,
        /// The failure.
        error: String,
    },
    /// The registry mounted the blob from another repository.
    Mounted {
        /// The blob.
        digest: Digest,
        /// The repository path it came from.
        from: String,
    },
    /// The transfer completed.
    Done {
        /// The blob (for a compressed push, the uncompressed layer's digest announced in
        /// `Started`).
        digest: Digest,
    },
}

/// Receives [`TransferEvent`]s, from several threads.
pub trait TransferProgress: Sync {
    /// One event.
    fn event(&self, event: TransferEvent);
}

/// A [`TransferProgress`] that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl TransferProgress for NoProgress {
    fn event(&self, _event: TransferEvent) {}
}

/// Runs `f` on every item with at most `jobs` threads; stops starting new items after the first
/// error, which is returned. Results are in item order.
fn parallel<T: Sync, R: Send, E: Send>(
    items: &[T],
    jobs: usize,
    f: impl Fn(&T) -> Result<R, E> + Sync,
) -> Result<Vec<R>, E> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Result<R, E>>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    let jobs = jobs.clamp(1, items.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                if let Ok(mut res) = results.lock() {
                    res[i] = Some(r);
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::with_capacity(items.len());
    let mut first_err = None;
    for r in results.into_iter().flatten() {
        match r {
            Ok(v) => out.push(v),
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parallel_keeps_order_and_reports_errors() {
        let items: Vec<u32> = (0..20).collect();
        let out: Result<Vec<u32>, String> = parallel(&items, 4, |i| Ok(i * 2));
        assert_eq!(out.unwrap(), (0..20).map(|i| i * 2).collect::<Vec<_>>());
        let out: Result<Vec<u32>, String> =
            parallel(&items, 3, |i| if *i == 7 { Err("seven".into()) } else { Ok(*i) });
        assert_eq!(out.unwrap_err(), "seven");
        let empty: Vec<u32> = Vec::new();
        assert!(parallel(&empty, 4, |i: &u32| Ok::<_, ()>(*i)).unwrap().is_empty());
    }
}
