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
        let arriving = match self.snapshots.unpack_arriving(l.snapshot, l.diff_id, l.size) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "no unpack thread; the ordinary path follows");
                return None;
            }
        };
        let (store, blob) = (self.store.clone(), l.blob);
        let joined = tokio::task::spawn_blocking(move || {
            let fetched = src.fetch_streaming(&store, &blob, &mut |bytes| arriving.write(bytes));
            let unpacked = arriving.finish(fetched.is_ok());
            (fetched, unpacked)
        })
        .await;
        let (fetched, unpacked) = match joined {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "streamed fetch stopped; the ordinary path follows");
                return None;
            }
        };
        match (fetched, unpacked) {
            (Ok(blob), Ok(snapshot)) => {
                tracing::debug!(blob = %l.blob, "layer unpacked as it downloaded");
                self.durable.commit(blob);
                Some(snapshot.path)
            }
            (fetched, unpacked) => {
                let fetch_error = match fetched {
                    // Verified: stored now, so the ordinary path unpacks it without a download.
                    Ok(blob) => blob
                        .sync()
                        .and_then(|staged| staged.commit())
                        .err()
                        .map(|e| e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                tracing::debug!(
                    blob = %l.blob,
                    fetch = ?fetch_error,
                    unpack = ?unpacked.err().map(|e| e.to_string()),
                    "streamed fetch and unpack failed; the ordinary path follows"
                );
                None
            }
        }
    }
}
