//! Moving images in and out of the store as files: rootfs tarballs (`import`), docker-archive
//! and OCI image layout tars (`load`, `save`).
//!
//! Architecture invariant: nothing read from an archive becomes visible in the store before the
//! whole archive was read and every blob verified; a failed load or import leaves no tag, no
//! image record and no temp file behind.

pub mod import;
pub mod load;
pub mod save;

use std::io::{self, Read};

pub use crate::layer::Compression;

/// Sniffs the compression of `reader` and returns it with a reader of the decompressed bytes
/// (see [`crate::layer::decoder`]).
pub fn decompress<'a>(reader: impl Read + 'a) -> io::Result<(Compression, Box<dyn Read + 'a>)> {
    let (kind, decoder) = crate::layer::decoder(reader).map_err(|e| match e {
        crate::layer::SniffError::ReadMagic(e) | crate::layer::SniffError::Zstd(e) => e,
    })?;
    Ok((kind, Box::new(decoder)))
}

/// A reader that counts the bytes it passes on.
pub(crate) struct Counting<R> {
    pub(crate) inner: R,
    pub(crate) count: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sniffs_and_decompresses_every_format() {
        let data = b"some tar bytes, or not".repeat(100);
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&data).unwrap();
            e.finish().unwrap()
        };
        let zst = zstd::encode_all(&data[..], 3).unwrap();
        let bz = {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
            e.write_all(&data).unwrap();
            e.finish().unwrap()
        };
        let xz = {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(&data).unwrap();
            e.finish().unwrap()
        };
        for (bytes, kind) in [
            (data.clone(), Compression::None),
            (gz, Compression::Gzip),
            (zst, Compression::Zstd),
            (bz, Compression::Bzip2),
            (xz, Compression::Xz),
        ] {
            let (k, mut r) = decompress(&bytes[..]).unwrap();
            assert_eq!(k, kind);
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            assert_eq!(out, data, "{kind:?}");
        }
        let (k, mut r) = decompress(&b"ab"[..]).unwrap();
        assert_eq!(k, Compression::None);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ab");
    }
}
