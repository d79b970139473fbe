//! A base image pulled by a build is unpacked as it downloads: each layer's bytes go to an
//! unpack thread beside the download (`Snapshots::unpack_arriving`), so a fresh runner's first
//! step waits for the longer of the two, not their sum. The unpacked layer is the snapshot the
//! engine mounts (keyed by its chain ID, published once its diff ID checks out), so the engine
//! finds it and reads nothing back from the stored blob. An attempt that fails unpacks nothing;
//! the engine then unpacks the stored blob as it always did.

use std::path::Path;

use kiln_cache::snapshot::{ArrivingLayer, Snapshots};
use kiln_dag::Digest;
use kiln_source::registry::{LayerSink, LayerTap};

use crate::cache_io::format::chain_ids;

/// The [`LayerTap`] of a build's pulls: unpacks into the store's snapshots.
#[derive(Debug)]
pub(crate) struct UnpackTap {
    snapshots: Snapshots,
}

impl UnpackTap {
    /// A tap unpacking into the snapshots of the store at `snapshots_dir`; `None` if they cannot
    /// be opened (the pull then only stores the blobs).
    pub(crate) fn at(snapshots_dir: &Path) -> Option<UnpackTap> {
        Snapshots::open(snapshots_dir)
            .map(|snapshots| UnpackTap { snapshots })
            .map_err(|e| tracing::debug!(error = %e, "pulled layers unpacked later"))
            .ok()
    }
}

impl LayerTap for UnpackTap {
    fn open(
        &self,
        index: usize,
        blob: &Digest,
        size: u64,
        diff_ids: &[Digest],
    ) -> Option<Box<dyn LayerSink>> {
        let key = *chain_ids(diff_ids).get(index)?;
        let diff_id = *diff_ids.get(index)?;
        if self.snapshots.get(&key).is_some() {
            return None;
        }
        let layer = self
            .snapshots
            .unpack_arriving(key, diff_id, size)
            .map_err(|e| tracing::debug!(error = %e, "no unpack thread"))
            .ok()?;
        Some(Box::new(UnpackSink { layer, blob: *blob }))
    }
}

struct UnpackSink {
    layer: ArrivingLayer,
    blob: Digest,
}

impl LayerSink for UnpackSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.layer.write(bytes)
    }

    fn finish(self: Box<Self>, complete: bool) {
        match self.layer.finish(complete) {
            Ok(_) => tracing::debug!(blob = %self.blob, "pulled layer unpacked as it downloaded"),
            Err(e) => {
                tracing::debug!(blob = %self.blob, error = %e, "pulled layer not unpacked while downloading")
            }
        }
    }
}
