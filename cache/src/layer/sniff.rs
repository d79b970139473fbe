//! Compression detection by magic bytes, and the matching decoder. The one place kiln reads
//! compressed tars: layer blobs, `import`ed rootfs tarballs, `load`ed archives and contexts.

use std::io::{self, BufRead, BufReader, Chain, Cursor, Read};

/// The compression of a stream, as told by its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Not compressed (a plain tar).
    None,
    /// gzip (`1f 8b`).
    Gzip,
    /// zstd (`28 b5 2f fd`).
    Zstd,
    /// bzip2 (`BZh`).
    Bzip2,
    /// xz (`fd 37 7a 58 5a 00`).
    Xz,
}

impl Compression {
    /// Detects the compression from the first bytes of a stream (six are enough).
    pub fn detect(prefix: &[u8]) -> Compression {
        if prefix.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else if prefix.starts_with(b"BZh") {
            Compression::Bzip2
        } else if prefix.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else {
            Compression::None
        }
    }

    /// The name used in messages and media type suffixes.
    pub fn name(&self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Xz => "xz",
        }
    }
}

/// Errors of [`sniff`].
#[derive(Debug, thiserror::Error)]
pub enum SniffError {
    /// The first bytes could not be read.
    #[error("failed to read the first bytes of the layer blob")]
    ReadMagic(#[source] io::Error),
    /// The zstd decoder could not be set up.
    #[error("failed to start the zstd decoder")]
    Zstd(#[source] io::Error),
}

/// The stream [`decoder`] reads from: the sniffed bytes put back in front of the rest, buffered.
pub type Sniffed<R> = BufReader<Chain<Cursor<Vec<u8>>, R>>;

/// A reader of the decompressed bytes of a stream (`Send` when the stream is).
pub enum Decoder<R: BufRead> {
    Plain(R),
    Gzip(flate2::bufread::MultiGzDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
    Bzip2(bzip2::bufread::MultiBzDecoder<R>),
    Xz(liblzma::bufread::XzDecoder<R>),
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
            Decoder::Bzip2(r) => r.read(buf),
            Decoder::Xz(r) => r.read(buf),
        }
    }
}

/// Reads the first bytes of `reader`, detects its compression and returns it with a reader of
/// the decompressed bytes. Errors: reading the first bytes (`ReadMagic`) or starting zstd.
pub fn decoder<R: Read>(mut reader: R) -> Result<(Compression, Decoder<Sniffed<R>>), SniffError> {
    let mut magic = [0u8; 6];
    let mut have = 0;
    while have < magic.len() {
        match reader.read(&mut magic[have..]) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SniffError::ReadMagic(e)),
        }
    }
    let kind = Compression::detect(&magic[..have]);
    let whole = BufReader::with_capacity(1 << 20, Cursor::new(magic[..have].to_vec()).chain(reader));
    let decoder = match kind {
        Compression::None => Decoder::Plain(whole),
        Compression::Gzip => Decoder::Gzip(flate2::bufread::MultiGzDecoder::new(whole)),
        Compression::Zstd => {
            Decoder::Zstd(zstd::stream::read::Decoder::with_buffer(whole).map_err(SniffError::Zstd)?)
        }
        Compression::Bzip2 => Decoder::Bzip2(bzip2::bufread::MultiBzDecoder::new(whole)),
        Compression::Xz => Decoder::Xz(liblzma::bufread::XzDecoder::new_multi_decoder(whole)),
    };
    Ok((kind, decoder))
}

/// A compressed layer arriving over the network from this many bytes up is inflated ahead (see
/// [`sniff_downloading`]).
pub const READ_AHEAD_DOWNLOADING_MIN: u64 = 32 << 20;

/// [`sniff`] for a layer of `size` compressed bytes read as it downloads, with the download on
/// another thread: it reads ahead only from [`READ_AHEAD_DOWNLOADING_MIN`] bytes. Measured on two
/// cores: for a 65 MB layer the unpack outlasts the download by far, and inflating beside it
/// took a build on a pulled image 0.655 -> 0.59 s; for 5-16 MB layers a third thread gained
/// nothing (compressible layers) or cost ~10 ms (incompressible ones) beside the downloads.
pub fn sniff_downloading<R: Read + Send + 'static>(
    reader: R,
    size: u64,
) -> Result<Box<dyn Read + Send>, SniffError> {
    if size >= READ_AHEAD_DOWNLOADING_MIN {
        return sniff(reader);
    }
    let (_, d) = decoder(reader)?;
    Ok(Box::new(d))
}

/// Detects gzip, zstd, bzip2, xz or an uncompressed stream by its magic bytes and returns a reader
/// of the decompressed bytes.
///
/// A compressed stream is inflated on a thread of its own, ahead of the caller
/// ([`super::pipe::read_ahead`]): unpacking a layer then inflates on one core while it hashes and
/// writes on another.
pub fn sniff<R: Read + Send + 'static>(reader: R) -> Result<Box<dyn Read + Send>, SniffError> {
    let (kind, d) = decoder(reader)?;
    Ok(match kind {
        Compression::None => Box::new(d),
        _ => super::pipe::read_ahead(d),
    })
}
