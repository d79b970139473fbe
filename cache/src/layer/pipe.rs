//! A bounded pipe of byte chunks between two threads, for a layer read on one thread and
//! unpacked on another: a download handing an unpack its bytes as they arrive, or a decompressor
//! running ahead of the unpack that hashes and writes what it inflates (on two cores, inflating
//! and writing a compressed layer then take the longer of the two, not their sum).

use std::io::{self, Read};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};

/// Chunks in flight (each at most [`CHUNK`] bytes): enough to ride out the reader's pauses (a
/// file's creation), small enough that a stalled reader holds back the writer rather than
/// piling up memory.
const CHUNKS_IN_FLIGHT: usize = 16;

/// The size of the chunks [`read_ahead`] reads.
const CHUNK: usize = 256 * 1024;

enum Chunk {
    Data(Vec<u8>),
    /// The writer's stream ended where it should.
    End,
    /// The writer's stream failed: the reader gets this error.
    Failed(io::Error),
}

/// The reading end of [`pipe`]. It ends (`Ok(0)`) only after [`PipeWriter::end`]; a writer
/// gone without it is an `UnexpectedEof` error, so a cut-off stream never reads as a short one.
#[derive(Debug)]
pub struct PipeReader {
    rx: Receiver<Chunk>,
    /// Chunks read go back to the writer for reuse: a fresh buffer per chunk is an `mmap` and
    /// `munmap` each (the CLI keeps blocks from 128 KiB out of the heap), its pages faulted in
    /// anew and its unmap a TLB shootdown on every core.
    spent: Sender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    ended: bool,
}

/// The writing end of [`pipe`].
#[derive(Debug)]
pub struct PipeWriter {
    tx: SyncSender<Chunk>,
    spent: Receiver<Vec<u8>>,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chunk::Data(d) => write!(f, "Data({} bytes)", d.len()),
            Chunk::End => f.write_str("End"),
            Chunk::Failed(e) => write!(f, "Failed({e})"),
        }
    }
}

/// A pipe: what the writer sends, the reader reads, in order.
pub fn pipe() -> (PipeWriter, PipeReader) {
    let (tx, rx) = sync_channel(CHUNKS_IN_FLIGHT);
    let (spent_tx, spent_rx) = channel();
    let reader = PipeReader {
        rx,
        spent: spent_tx,
        current: Vec::new(),
        pos: 0,
        ended: false,
    };
    (PipeWriter { tx, spent: spent_rx }, reader)
}

impl PipeWriter {
    /// Sends a copy of `bytes` (in a buffer the reader gave back, when there is one). A
    /// `BrokenPipe` error once the reader is gone.
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let mut buf = self.spent.try_recv().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(bytes);
        self.send_chunk(Chunk::Data(buf))
    }

    /// Ends the stream: the reader reads to here and then sees its end.
    pub fn end(self) {
        let _ = self.send_chunk(Chunk::End);
    }

    /// Ends the stream with `error`, which the reader gets after the bytes sent before it.
    pub fn fail(self, error: io::Error) {
        let _ = self.send_chunk(Chunk::Failed(error));
    }

    fn send_chunk(&self, chunk: Chunk) -> io::Result<()> {
        self.tx
            .send(chunk)
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

impl Read for PipeReader {
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
                Ok(Chunk::Failed(e)) => return Err(e),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the stream stopped before its end",
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

/// Reads `reader` on a thread of its own, ahead of the caller (at most the pipe's chunks in
/// flight): for a decompressor, so that inflating runs beside whatever the caller does with the
/// bytes. The thread stops when `reader` ends or fails (the caller then reads the same end or
/// error) or when the returned reader is dropped. Without a thread, `reader` itself.
pub fn read_ahead<R: Read + Send + 'static>(reader: R) -> Box<dyn Read + Send> {
    let (writer, piped) = pipe();
    // The reader goes to the thread once it runs: should it not start, the caller keeps it.
    let (hand, handed) = channel::<R>();
    let started = std::thread::Builder::new()
        .name("kiln-read-ahead".into())
        .spawn(move || {
            let Ok(mut reader) = handed.recv() else {
                return;
            };
            let mut buf = vec![0u8; CHUNK];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return writer.end(),
                    Ok(n) => {
                        if writer.send(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return writer.fail(e),
                }
            }
        });
    if let Err(e) = started {
        tracing::debug!(error = %e, "no read-ahead thread");
        return Box::new(reader);
    }
    match hand.send(reader) {
        Ok(()) => Box::new(piped),
        // The thread is gone already (it cannot be: it waits for this); the reader came back.
        Err(back) => Box::new(back.0),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_reader_ends_only_after_the_writer_says_so() {
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
    fn a_writer_gone_without_its_end_is_an_error_not_an_eof() {
        let (writer, mut reader) = pipe();
        writer.send(b"half a layer").unwrap();
        drop(writer);
        let mut got = Vec::new();
        let err = reader.read_to_end(&mut got).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(got, b"half a layer");
    }

    #[test]
    fn a_failed_stream_gives_its_error_after_its_bytes() {
        let (writer, mut reader) = pipe();
        writer.send(b"ok so far").unwrap();
        writer.fail(io::Error::new(
            io::ErrorKind::InvalidData,
            "corrupt deflate stream",
        ));
        let mut got = Vec::new();
        let err = reader.read_to_end(&mut got).unwrap_err();
        assert_eq!(got, b"ok so far");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("corrupt deflate"), "{err}");
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
        assert!(writer.send(b"x").is_err(), "a reader gone is a broken pipe");
    }

    /// Fails after `ok` bytes of 7s.
    struct FailsAfter {
        ok: usize,
    }

    impl Read for FailsAfter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.ok == 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "bad block"));
            }
            let n = buf.len().min(self.ok);
            buf[..n].fill(7);
            self.ok -= n;
            Ok(n)
        }
    }

    #[test]
    fn read_ahead_gives_every_byte_then_the_end_or_the_error() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        read_ahead(io::Cursor::new(data.clone()))
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);

        let mut out = Vec::new();
        let err = read_ahead(FailsAfter { ok: 600_000 })
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(out.len(), 600_000);
        assert!(out.iter().all(|b| *b == 7));
        assert_eq!(err.to_string(), "bad block");
    }

    #[test]
    fn read_ahead_stops_when_its_reader_is_dropped() {
        // An endless source: the thread must stop once nobody reads, or this test hangs at the
        // join below.
        let (done_tx, done_rx) = channel();
        struct Endless(Sender<()>);
        impl Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                buf.fill(1);
                Ok(buf.len())
            }
        }
        impl Drop for Endless {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let mut r = read_ahead(Endless(done_tx));
        let mut buf = [0u8; 10];
        r.read_exact(&mut buf).unwrap();
        drop(r);
        done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the read-ahead thread dropped its reader");
    }
}
