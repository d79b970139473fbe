//! Compression detection by magic bytes.

use std::io::{self, Cursor, Read};

/// The compression of a layer blob, as told by its first bytes.
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
    /// Detects the compression from the first bytes of a blob (six are enough).
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

/// Detects gzip, zstd, bzip2, xz or an uncompressed stream by its magic bytes and returns a reader
/// of the decompressed bytes.
pub fn sniff<R: Read + Send + 'static>(mut reader: R) -> Result<Box<dyn Read + Send>, SniffError> {
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
    let prefix = magic[..have].to_vec();
    let kind = Compression::detect(&prefix);
    let whole = Cursor::new(prefix).chain(reader);
    Ok(match kind {
        Compression::None => Box::new(whole),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(whole).map_err(SniffError::Zstd)?),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(whole)),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(whole)),
    })
}
