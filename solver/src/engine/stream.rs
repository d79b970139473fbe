//! An imported layer unpacked while it downloads.
//!
//! A fresh runner that starts from a remote cache needs the cached layers under the first step
//! that reruns. Fetching a blob and then unpacking it reads and hashes the layer twice in a row
//! (its digest as it arrives, its diff ID as it is unpacked) and waits for the blob's fsync in
//! between. Here the download thread writes and hashes the blob while it passes each chunk to an
//! unpack thread, so both hashes run side by side, and the blob's fsync goes to the build's
//! durable writer like a step's own layer blob (it is durable before anything names it; the
//! step reads the snapshot, not the blob).
//!
//! The snapshot is published by the unpack when the layer's diff ID checks out, whatever the
//! download's fate: its content is then what the record promised. Any failure falls back to the
//! ordinary fetch-then-unpack path, which retries and reports errors as it always did.

use std::path::PathBuf;

use kiln_cache::buildcache::Layer;
use kiln_cache::layer;
use kiln_cache::layer::pipe::pipe;

use super::Engine;

impl Engine {
    /// Fetches the imported blob of `l` and unpacks it as it arrives (see the module docs).
    /// `None` when the cache cannot stream it or anything failed: the caller then takes the
    /// ordinary path (a snapshot this published is found there).
    pub(super) async fn fetch_unpacking(&self, l: &Layer) -> Option<PathBuf> {
        let src = self.opts.cache_source.clone()?;
        if !src.streams(&l.blob) {
            return None;
        }
        let (writer, reader) = pipe();
        let snapshots = self.snapshots.clone();
        let (key, diff_id, size) = (l.snapshot, l.diff_id, l.size);
        let unpack = tokio::task::spawn_blocking(move || {
            let reader = layer::sniff_downloading(reader, size).map_err(|e| e.to_string())?;
            snapshots
                .unpack(&key, None, reader, Some(&diff_id))
                .map(|s| s.path)
                .map_err(|e| e.to_string())
        });
        let (store, blob) = (self.store.clone(), l.blob);
        let fetch = tokio::task::spawn_blocking(move || {
            let fetched = src.fetch_streaming(&store, &blob, &mut |bytes| writer.send(bytes));
            if fetched.is_ok() {
                writer.end();
            }
            fetched
        });
        let (fetched, unpacked) = tokio::join!(fetch, unpack);
        let fetched = fetched
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let unpacked = unpacked.map_err(|e| e.to_string()).and_then(|r| r);
        match (fetched, unpacked) {
            (Ok(blob), Ok(path)) => {
                tracing::debug!(blob = %l.blob, "layer unpacked as it downloaded");
                self.durable.commit(blob);
                Some(path)
            }
            (fetched, unpacked) => {
                let fetch_error = match fetched {
                    // Verified: stored now, so the ordinary path unpacks it without a download.
                    Ok(blob) => blob
                        .sync()
                        .and_then(|staged| staged.commit())
                        .err()
                        .map(|e| e.to_string()),
                    Err(e) => Some(e),
                };
                tracing::debug!(
                    blob = %l.blob,
                    fetch = ?fetch_error,
                    unpack = ?unpacked.err(),
                    "streamed fetch and unpack failed; the ordinary path follows"
                );
                None
            }
        }
    }
}
