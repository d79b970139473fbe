//! Compressing a layer on its way out (a push, a cache export), on every core.
//!
//! Layers are kept uncompressed (see `kiln_cache::content`) and compressed only when something
//! needs the compressed blob; a 1 GB layer at gzip level 2 is ~14 s of one core. zstd compresses
//! on `zstd`'s own worker threads (`zstdmt`: jobs over the input, one frame); gzip goes through
//! `gzp`, which does what pigz does: the input in 128 KiB blocks, each deflated on a thread of a
//! pool with the 32 KiB before it as its dictionary, written in order as one gzip member with
//! the CRC of the whole. Both outputs depend on the input and the level only, not on the number
//! of threads, so a layer compresses to the same digest on any machine with several cores.
//! `gzp` was taken over a pigz-style writer of our own: block splitting, dictionaries, sync
//! flushes and CRC combination are its whole job, and it takes flate2 (zlib-rs here) as is.

use std::io::{self, Read, Write};
use std::thread::JoinHandle;

/// gzip level for layers kiln compresses (push, cache export): 2, the fastest level of zlib-rs
/// that still stores a block it cannot shrink. Level 1 is zlib-rs's "quick" mode, which codes
/// every block with the fixed Huffman table: already-compressed data (archives, images, random
/// bytes) grows by 5.5% and inflates at 160 MB/s instead of being copied at 1.1 GB/s (measured on
/// 16 MiB of random bytes); on `/usr/bin` as a tar level 2 is 17% smaller and half as fast to
/// compress (73 against 134 MB/s), still faster than Go's default level BuildKit uses.
pub const GZIP_LEVEL: u32 = 2;

/// zstd level for layers compressed on push: BuildKit's default.
pub const ZSTD_LEVEL: i32 = 3;

/// The compression of layers kiln stores uncompressed, on their way to a registry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// gzip (level [`GZIP_LEVEL`]), Docker's and BuildKit's default.
    #[default]
    Gzip,
    /// zstd (level 3, BuildKit's default level); OCI manifests only.
    Zstd,
    /// Sent as stored: the pushed manifest is byte for byte the local one.
    Uncompressed,
}

impl Compression {
    /// The name BuildKit's `compression=` uses, which is also the hint directory.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Uncompressed => "uncompressed",
        }
    }
}

/// Threads to compress one layer with: the cores, at most 8 (the blob's upload and the other
/// layers' need some too).
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// `input` compressed with `algorithm` (`Uncompressed`: gzip, as a push of a layer asks for),
/// as a reader. A failure of the compressing threads is the reader's error at its end, never a
/// short stream.
pub fn compressing_reader(
    input: impl Read + Send + 'static,
    algorithm: Compression,
) -> io::Result<Box<dyn Read + Send>> {
    // Threaded even on one core: the output of either depends on the worker count only
    // between none and some, so a layer gets one digest on every machine.
    compressing_reader_on(input, algorithm, threads())
}

/// [`compressing_reader`] on `threads` threads (at least 1).
fn compressing_reader_on(
    input: impl Read + Send + 'static,
    algorithm: Compression,
    threads: usize,
) -> io::Result<Box<dyn Read + Send>> {
    let input = io::BufReader::with_capacity(1 << 20, input);
    match algorithm {
        Compression::Zstd => {
            let mut enc = zstd::stream::read::Encoder::with_buffer(input, ZSTD_LEVEL)?;
            enc.multithread(threads as u32)?;
            Ok(Box::new(enc))
        }
        Compression::Gzip | Compression::Uncompressed => Ok(Box::new(ParallelGzip::start(input, threads)?)),
    }
}

/// gzip on several threads (`gzp`, a writer) read through a pipe.
struct ParallelGzip {
    out: io::PipeReader,
    worker: Option<JoinHandle<io::Result<()>>>,
}

impl ParallelGzip {
    fn start(mut input: impl Read + Send + 'static, threads: usize) -> io::Result<ParallelGzip> {
        let (out, pipe) = io::pipe()?;
        let worker =
            std::thread::Builder::new()
                .name("kiln-gzip".into())
                .spawn(move || -> io::Result<()> {
                    let mut z = gzp::par::compress::ParCompressBuilder::<gzp::deflate::Gzip>::new()
                        .compression_level(flate2::Compression::new(GZIP_LEVEL))
                        .num_threads(threads)
                        .map_err(io::Error::other)?
                        .from_writer(pipe);
                    let copied = io::copy(&mut input, &mut z);
                    // Finished either way, so its threads end; the copy's error comes first.
                    let finished = gzp::ZWriter::finish(&mut z).map(drop).map_err(io::Error::other);
                    copied?;
                    finished
                })?;
        Ok(ParallelGzip {
            out,
            worker: Some(worker),
        })
    }
}

impl Read for ParallelGzip {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.out.read(buf)?;
        if n == 0 && !buf.is_empty() {
            // The end of the pipe: the stream is whole only if the worker says so.
            if let Some(worker) = self.worker.take() {
                worker
                    .join()
                    .map_err(|_| io::Error::other("the gzip thread panicked"))??;
            }
        }
        Ok(n)
    }
}

/// Compresses `input` with `algorithm` into `out` (a cache export's blob file).
pub fn compress_into(
    input: impl Read + Send + 'static,
    algorithm: Compression,
    out: &mut (impl Write + ?Sized),
) -> io::Result<u64> {
    io::copy(&mut compressing_reader(input, algorithm)?, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that compress somewhat, over several gzip blocks and zstd jobs.
    fn sample() -> Vec<u8> {
        let mut v = Vec::with_capacity(3 << 20);
        let mut x = 1u64;
        while v.len() < 3 << 20 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let word = format!("line {} of {}\n", x >> 40, x % 97);
            v.extend_from_slice(word.as_bytes());
        }
        v
    }

    #[test]
    fn both_round_trip_and_the_output_does_not_depend_on_the_threads() {
        let data = sample();
        let run = |algorithm, threads: usize| {
            let mut out = Vec::new();
            compressing_reader_on(io::Cursor::new(data.clone()), algorithm, threads)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            out
        };
        let (g1, g2, g4) = (
            run(Compression::Gzip, 1),
            run(Compression::Gzip, 2),
            run(Compression::Gzip, 4),
        );
        assert_eq!(g1, g4, "gzip bytes depend on the thread count");
        assert_eq!(g2, g4);
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&g2[..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data);
        // One member, as a single-threaded writer's: a plain (not multi-member) reader gets all.
        let mut single = Vec::new();
        flate2::read::GzDecoder::new(&g2[..])
            .read_to_end(&mut single)
            .unwrap();
        assert!(single == data);
        assert!(g2.len() < data.len() / 2, "{}", g2.len());

        let (z1, z2, z4) = (
            run(Compression::Zstd, 1),
            run(Compression::Zstd, 2),
            run(Compression::Zstd, 4),
        );
        assert_eq!(z1, z4, "zstd bytes depend on the worker count");
        assert_eq!(z2, z4);
        assert!(zstd::stream::decode_all(&z2[..]).unwrap() == data);
        // The entry point (this machine's thread count) gives the same bytes.
        let mut via = Vec::new();
        compressing_reader(io::Cursor::new(data.clone()), Compression::Zstd)
            .unwrap()
            .read_to_end(&mut via)
            .unwrap();
        assert_eq!(via, z2);
    }

    #[test]
    fn a_failing_input_is_an_error_at_the_end_not_a_short_stream() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk gone"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let mut out = Vec::new();
        let err = ParallelGzip::start(Failing(1 << 20), 2)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(err.to_string().contains("disk gone"), "{err}");
    }
}
