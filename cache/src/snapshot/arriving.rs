//! A layer unpacked from bytes handed over as they arrive: a download on one thread passes each
//! chunk on, the unpack runs on another (through [`crate::layer::pipe`]), so the layer is on disk
//! when its download ends instead of being read back from the stored blob afterwards. Used for
//! a build's imported cache layers and for the base images a build pulls.

use std::io;
use std::thread::JoinHandle;

use kiln_dag::Digest;

use super::{Snapshot, Snapshots};
use crate::layer::pipe::{pipe, PipeWriter};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A layer being unpacked as its bytes arrive: see [`Snapshots::unpack_arriving`].
#[derive(Debug)]
pub struct ArrivingLayer {
    writer: PipeWriter,
    unpack: JoinHandle<Result<Snapshot, BoxError>>,
}

impl Snapshots {
    /// Starts unpacking, on a thread of its own, the layer whose bytes (`compressed_size` of them,
    /// as its descriptor says) will come through [`ArrivingLayer::write`]: the snapshot `key`, no
    /// parent, published once its content's digest is `diff_id`. An error when the thread does
    /// not start.
    pub fn unpack_arriving(
        &self,
        key: Digest,
        diff_id: Digest,
        compressed_size: u64,
    ) -> io::Result<ArrivingLayer> {
        let (writer, reader) = pipe();
        let snapshots = self.clone();
        let unpack = std::thread::Builder::new().name("kiln-unpack".into()).spawn(
            move || -> Result<Snapshot, BoxError> {
                let reader = crate::layer::sniff_downloading(reader, compressed_size)?;
                Ok(snapshots.unpack(&key, None, reader, Some(&diff_id))?)
            },
        )?;
        Ok(ArrivingLayer { writer, unpack })
    }
}

impl ArrivingLayer {
    /// The layer's next bytes. `BrokenPipe` once the unpack stopped reading (it failed, or it has
    /// all it needs).
    pub fn write(&self, bytes: &[u8]) -> io::Result<()> {
        self.writer.send(bytes)
    }

    /// The bytes are over: `complete` when all arrived and the blob matched its digest;
    /// otherwise the unpack reads an error and publishes nothing. Waits for the unpack.
    pub fn finish(self, complete: bool) -> Result<Snapshot, BoxError> {
        if complete {
            self.writer.end();
        } else {
            drop(self.writer);
        }
        self.unpack
            .join()
            .map_err(|_| BoxError::from("the unpack thread panicked"))?
    }
}
