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

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};

use kiln_cache::buildcache::Layer;
use kiln_cache::layer;

use super::Engine;

/// Chunks in flight between the download and the unpack (each at most the download's read
/// size, 256 KiB): enough to ride out the unpack's pauses at a file's creation, small enough
/// that a stalled unpack holds back the download rather than piling up memory.
const CHUNKS_IN_FLIGHT: usize = 16;

enum Chunk {
    Data(Vec<u8>),
    /// The download finished and the blob matched its digest.
    End,
}

/// The unpack's side of the channel. Ends (`Ok(0)`) only after [`Chunk::End`]; a download that
/// stopped without it is an error, so a truncated blob is never read as a complete layer.
struct ChunkReader {
    rx: Receiver<Chunk>,
    /// Read chunks go back to the download for reuse: a fresh buffer per chunk is an `mmap`
    /// and `munmap` each (the CLI keeps large blocks out of the heap), its pages faulted in
    /// anew and its unmap a TLB shootdown on every core.
    spent: Sender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Chunk::Data(bytes)) => {
                    let read = std::mem::replace(&mut self.current, bytes);
                    if read.capacity() > 0 {
                        let _ = self.spent.send(read);
                    }
                    self.pos = 0;
                }
                Ok(Chunk::End) => self.ended = true,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the layer's download stopped before its end",
                    ))
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The download's side: sends a copy of each chunk in a buffer the reader gave back.
struct ChunkWriter {
    tx: SyncSender<Chunk>,
    spent: Receiver<Vec<u8>>,
}

impl ChunkWriter {
    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let mut buf = self.spent.try_recv().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(bytes);
        self.tx
            .send(Chunk::Data(buf))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }

    fn end(&self) {
        let _ = self.tx.send(Chunk::End);
    }
}

fn pipe() -> (ChunkWriter, ChunkReader) {
    let (tx, rx) = sync_channel(CHUNKS_IN_FLIGHT);
    let (spent_tx, spent_rx) = channel();
    let reader = ChunkReader {
        rx,
        spent: spent_tx,
        current: Vec::new(),
        pos: 0,
        ended: false,
    };
    (ChunkWriter { tx, spent: spent_rx }, reader)
}

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
        let (key, diff_id) = (l.snapshot, l.diff_id);
        let unpack = tokio::task::spawn_blocking(move || {
            let reader = layer::sniff(reader).map_err(|e| e.to_string())?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_reader_ends_only_after_the_download_says_so() {
        let (writer, mut reader) = pipe();
        let feeder = std::thread::spawn(move || {
            writer.send(b"abc").unwrap();
            writer.send(b"").unwrap();
            writer.send(b"defg").unwrap();
            writer.end();
        });
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        feeder.join().unwrap();
        assert_eq!(got, b"abcdefg");
        assert_eq!(reader.read(&mut [0u8; 4]).unwrap(), 0);
    }

    #[test]
    fn a_download_that_stops_without_its_end_is_an_error_not_an_eof() {
        let (writer, mut reader) = pipe();
        writer.send(b"half a layer").unwrap();
        drop(writer);
        let mut got = Vec::new();
        let err = reader.read_to_end(&mut got).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(got, b"half a layer");
    }

    #[test]
    fn read_buffers_go_back_to_the_writer() {
        let (writer, mut reader) = pipe();
        writer.send(&[1u8; 1000]).unwrap();
        writer.send(&[2u8; 1000]).unwrap();
        let mut buf = [0u8; 1000];
        reader.read_exact(&mut buf).unwrap();
        reader.read_exact(&mut buf).unwrap();
        // The first chunk's buffer was handed back when the second was taken.
        let back = writer.spent.try_recv().unwrap();
        assert!(back.capacity() >= 1000);
        drop(reader);
        assert!(writer.send(b"x").is_err(), "a stopped reader is a broken pipe");
    }
}
