//! Build contexts that arrive as tarballs (`kiln build -`, `kiln build https://…/ctx.tar.gz`,
//! `--build-context name=https://…`): telling an archive from a lone Dockerfile, and extracting
//! tar / gzip / bzip2 / xz / zstd archives into a directory.
//!
//! Extraction goes through the store's layer applier ([`kiln_cache::layer::apply`]), which
//! resolves every entry component by component from a descriptor of the destination with
//! `O_NOFOLLOW`: names are cleaned as Docker cleans them (an absolute name lands inside, its
//! leading `/` dropped), entries whose `..` climbs out or whose parent is a symlink (even one the
//! same archive created) are errors naming the entry, and nothing is written outside the
//! destination.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use kiln_cache::layer::{self, ApplyOptions, ApplyStats, Compression, WhiteoutMode};

/// Errors of this module. Each names the file or archive involved.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The file could not be opened.
    #[error("failed to open `{path}`")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The first bytes of the file could not be read.
    #[error("failed to read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The decompressor could not be started.
    #[error("{archive}: failed to start decompressing")]
    Decompress {
        archive: String,
        #[source]
        source: layer::SniffError,
    },
    /// An entry could not be extracted (or would have escaped the destination).
    #[error("failed to extract {archive}")]
    Extract {
        archive: String,
        #[source]
        source: layer::ApplyError,
    },
}

/// What a downloaded or piped context turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextKind {
    /// A tar archive, compressed as given.
    Archive(Compression),
    /// Anything else: Docker's rule makes it the Dockerfile of an empty context.
    Plain,
}

/// Whether a 512-byte block is a tar header (its checksum matches, counted unsigned or signed
/// as old tars did) or the zero block of an empty archive.
pub fn is_tar_header(block: &[u8]) -> bool {
    if block.len() != 512 {
        return false;
    }
    if block.iter().all(|b| *b == 0) {
        return true;
    }
    let digits: Vec<u8> = block[148..156]
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b))
        .collect();
    let Some(recorded) = std::str::from_utf8(&digits)
        .ok()
        .filter(|d| !d.is_empty())
        .and_then(|d| u64::from_str_radix(d, 8).ok())
    else {
        return false;
    };
    let field = 148..156;
    let unsigned: u64 = block
        .iter()
        .enumerate()
        .map(|(i, b)| if field.contains(&i) { 32 } else { u64::from(*b) })
        .sum();
    let signed: i64 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if field.contains(&i) {
                32
            } else {
                i64::from(*b as i8)
            }
        })
        .sum();
    recorded == unsigned || i64::try_from(recorded).is_ok_and(|r| r == signed)
}

/// Classifies the bytes at the start of a context: compressed data is taken to be a compressed
/// tar (as Docker does), uncompressed data is a tar only if its first block is a tar header.
pub fn classify(prefix: &[u8]) -> ContextKind {
    match Compression::detect(prefix) {
        Compression::None => {
            let block = prefix.get(..512).unwrap_or(prefix);
            if is_tar_header(block) {
                ContextKind::Archive(Compression::None)
            } else {
                ContextKind::Plain
            }
        }
        c => ContextKind::Archive(c),
    }
}

/// Classifies the file at `path` (see [`classify`]); only its first 512 bytes are read.
pub fn classify_file(path: &Path) -> Result<ContextKind, ArchiveError> {
    let file = File::open(path).map_err(|source| ArchiveError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut prefix = Vec::with_capacity(512);
    file.take(512)
        .read_to_end(&mut prefix)
        .map_err(|source| ArchiveError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(classify(&prefix))
}

/// Extracts the (possibly compressed) tar read from `reader` into the existing directory `dest`.
/// `archive` names it in errors. Owners are kept when running as root.
pub fn extract<R: Read>(reader: R, dest: &Path, archive: &str) -> Result<ApplyStats, ArchiveError> {
    let (_, decoded) = layer::decoder(reader).map_err(|source| ArchiveError::Decompress {
        archive: archive.to_string(),
        source,
    })?;
    let opts = ApplyOptions {
        whiteouts: WhiteoutMode::Delete,
        archive_name: archive.to_string(),
        same_owner: is_root(),
        ..Default::default()
    };
    layer::apply(decoded, dest, &opts).map_err(|source| ArchiveError::Extract {
        archive: archive.to_string(),
        source,
    })
}

/// Extracts the archive file at `path` into `dest` (see [`extract`]).
pub fn extract_file(path: &Path, dest: &Path, archive: &str) -> Result<ApplyStats, ArchiveError> {
    let file = File::open(path).map_err(|source| ArchiveError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    extract(file, dest, archive)
}

fn is_root() -> bool {
    // /proc/self is owned by the effective uid of the process.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    /// A ustar header for `name` (regular file of `size` bytes, or `kind`), checksum filled in.
    fn header(name: &str, kind: u8, size: usize, link: &str) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn tar(entries: &[(&str, u8, &[u8], &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, data, link) in entries {
            out.extend(header(name, *kind, data.len(), link));
            out.extend(*data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend([0u8; 1024]);
        out
    }

    #[test]
    fn tar_headers_are_told_from_dockerfiles() {
        assert!(is_tar_header(&header("Dockerfile", b'0', 0, "")));
        assert!(is_tar_header(&[0u8; 512]), "an empty archive");
        let mut bad = header("Dockerfile", b'0', 0, "");
        bad[0] = b'X';
        assert!(!is_tar_header(&bad), "checksum mismatch");
        let mut df = b"FROM busybox\nRUN echo hi\n".to_vec();
        df.resize(512, b' ');
        assert!(!is_tar_header(&df));
        assert!(!is_tar_header(b"FROM busybox\n"), "short input");
        assert_eq!(classify(b"FROM busybox\n"), ContextKind::Plain);
        assert_eq!(
            classify(&[0x1f, 0x8b, 8, 0]),
            ContextKind::Archive(Compression::Gzip)
        );
        assert_eq!(
            classify(&tar(&[("a", b'0', b"x", "")])),
            ContextKind::Archive(Compression::None)
        );
    }

    #[test]
    fn extracts_every_compression() {
        let plain = tar(&[("dir/", b'5', b"", ""), ("dir/f.txt", b'0', b"hello", "")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        bz.write_all(&plain).unwrap();
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&plain).unwrap();
        let zst = zstd::encode_all(&plain[..], 1).unwrap();
        for (name, bytes) in [
            ("tar", plain.clone()),
            ("gz", gz.finish().unwrap()),
            ("bz2", bz.finish().unwrap()),
            ("xz", xz.finish().unwrap()),
            ("zst", zst),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join(format!("ctx.{name}"));
            std::fs::write(&file, &bytes).unwrap();
            assert!(
                matches!(classify_file(&file).unwrap(), ContextKind::Archive(_)),
                "{name}"
            );
            let dest = dir.path().join("out");
            std::fs::create_dir(&dest).unwrap();
            extract_file(&file, &dest, name).unwrap();
            assert_eq!(std::fs::read(dest.join("dir/f.txt")).unwrap(), b"hello", "{name}");
        }
    }

    #[test]
    fn entries_cannot_escape() {
        // An absolute name lands inside, as in Docker.
        let outer = tempfile::tempdir().unwrap();
        let dest = outer.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        extract(&tar(&[("/tmp/escape", b'0', b"x", "")])[..], &dest, "ctx.tar").unwrap();
        assert_eq!(std::fs::read(dest.join("tmp/escape")).unwrap(), b"x");
        assert!(!Path::new("/tmp/escape").exists(), "absolute: wrote outside");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("dotdot", tar(&[("../escape", b'0', b"x", "")])),
            (
                "through a symlink",
                tar(&[("link", b'2', b"", ".."), ("link/escape", b'0', b"x", "")]),
            ),
        ];
        for (what, bytes) in cases {
            let outer = tempfile::tempdir().unwrap();
            let dest = outer.path().join("dest");
            std::fs::create_dir(&dest).unwrap();
            let err = extract(&bytes[..], &dest, "ctx.tar").unwrap_err();
            let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
            assert!(msg.contains("escape") || msg.contains("link"), "{what}: {msg}");
            assert!(!outer.path().join("escape").exists(), "{what}: wrote outside");
            assert!(!Path::new("/tmp/escape").exists(), "{what}: wrote outside");
        }
    }
}
