//! A base image pulled by a build is unpacked as it downloads: each layer's bytes go to an
//! unpack thread beside the download (`kiln_cache::layer::pipe`), so a fresh runner's first
//! step waits for the longer of the two, not their sum. The unpacked layer is the snapshot the
//! engine mounts (keyed by its chain ID, published once its diff ID checks out), so the engine
//! finds it and reads nothing back from the stored blob. An attempt that fails unpacks nothing;
//! the engine then unpacks the stored blob as it always did.

use std::path::Path;
use std::thread::JoinHandle;

use kiln_cache::layer::pipe::{pipe, PipeWriter};
use kiln_cache::snapshot::Snapshots;
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
        let (writer, reader) = pipe();
        let snapshots = self.snapshots.clone();
        let blob = *blob;
        let unpack = std::thread::Builder::new()
            .name("kiln-unpack".into())
            .spawn(move || {
                let reader = kiln_cache::layer::sniff_downloading(reader, size).map_err(|e| e.to_string())?;
                snapshots
                    .unpack(&key, None, reader, Some(&diff_id))
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| tracing::debug!(error = %e, "no unpack thread"))
            .ok()?;
        Some(Box::new(UnpackSink {
            writer: Some(writer),
            unpack,
            blob,
        }))
    }
}

struct UnpackSink {
    writer: Option<PipeWriter>,
    unpack: JoinHandle<Result<(), String>>,
    blob: Digest,
}

impl LayerSink for UnpackSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &self.writer {
            Some(w) => w.send(bytes),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn finish(mut self: Box<Self>, complete: bool) {
        if let Some(writer) = self.writer.take() {
            if complete {
                writer.end();
            }
            // Otherwise dropped: the unpack reads an error and publishes nothing.
        }
        match self.unpack.join() {
            Ok(Ok(())) => tracing::debug!(blob = %self.blob, "pulled layer unpacked as it downloaded"),
            Ok(Err(e)) => {
                tracing::debug!(blob = %self.blob, error = %e, "pulled layer not unpacked while downloading")
            }
            Err(_) => tracing::debug!(blob = %self.blob, "the unpack of a pulled layer panicked"),
        }
    }
}
