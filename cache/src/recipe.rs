//! Lazy blobs: a blob kept as the byte ranges of other blobs it is made of.
//!
//! An edited COPY of a large context writes a layer tar that is, but for a few entries, the tar
//! of the same step's last result (see [`crate::layer::Donor`]). Writing those bytes again costs
//! more than everything else the edit does (a 1 GB tar for 500k files), and nothing reads them
//! until a save, a push or a cache export. So such a layer is kept as a [`Recipe`]: the byte
//! ranges of the earlier blob it shares, and a small blob (its fragment) holding the bytes that
//! are new, in order. The layer's digest is computed over the whole tar as it streams; the tar
//! itself is written only when something asks for the blob's file
//! ([`ContentStore::open`](crate::content::ContentStore::open)), and checked against that digest
//! then.
//!
//! Invariants:
//! - a recipe's sources are plain blobs, never other recipes: a recipe made from a lazy blob
//!   names that blob's own sources (so reading one is never more than one step deep);
//! - a recipe is stored only after its sources are durable, and a kept recipe keeps its sources
//!   (GC marks them through [`ContentStore::add_recipe_sources`](crate::content::ContentStore::add_recipe_sources)).

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use kiln_dag::Digest;

const MAGIC: &[u8; 8] = b"kilnrcp1";

/// One range of a recipe's blob: `len` bytes of `sources[source]` from `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Index into [`Recipe::sources`].
    pub source: u32,
    /// Offset in the source blob.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub len: u64,
}

/// A blob as the concatenation of ranges of other blobs. See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recipe {
    /// The blobs the pieces read from.
    pub sources: Vec<Digest>,
    /// The blob's bytes, in order.
    pub pieces: Vec<Piece>,
    /// Whether `sources[0]` is the fragment written for this recipe (its disk use is the
    /// recipe's; the other sources belong to the blobs they were written for).
    pub own_first: bool,
}

impl Recipe {
    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.pieces.iter().map(|p| p.len).sum()
    }

    /// Appends `len` bytes of `source` from `offset`, merged into the last piece when they
    /// follow it in the same source.
    pub fn push(&mut self, source: Digest, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let index = match self.sources.iter().position(|s| *s == source) {
            Some(i) => i,
            None => {
                self.sources.push(source);
                self.sources.len() - 1
            }
        };
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        if let Some(last) = self.pieces.last_mut() {
            if last.source == index && last.offset + last.len == offset {
                last.len += len;
                return;
            }
        }
        self.pieces.push(Piece {
            source: index,
            offset,
            len,
        });
    }

    /// A compact binary form (what the store keeps).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 9 + self.sources.len() * 32 + 4 + self.pieces.len() * 20);
        out.extend_from_slice(MAGIC);
        out.push(u8::from(self.own_first));
        out.extend_from_slice(&(self.sources.len() as u32).to_le_bytes());
        for s in &self.sources {
            out.extend_from_slice(&s.0);
        }
        out.extend_from_slice(&(self.pieces.len() as u32).to_le_bytes());
        for p in &self.pieces {
            out.extend_from_slice(&p.source.to_le_bytes());
            out.extend_from_slice(&p.offset.to_le_bytes());
            out.extend_from_slice(&p.len.to_le_bytes());
        }
        out
    }

    /// Reads [`Recipe::encode`]'s bytes; anything malformed (a piece naming no source, an empty
    /// piece, no piece at all, trailing bytes) is `None`.
    pub fn decode(bytes: &[u8]) -> Option<Recipe> {
        let mut rest = crate::bytes::Take(bytes.strip_prefix(MAGIC.as_slice())?);
        let own_first = match rest.bytes(1)? {
            [0] => false,
            [1] => true,
            _ => return None,
        };
        let n = rest.u32()? as usize;
        let mut sources = Vec::with_capacity(n.min(rest.0.len() / 32));
        for _ in 0..n {
            sources.push(Digest(rest.bytes(32)?.try_into().ok()?));
        }
        let n = rest.u32()? as usize;
        let mut pieces = Vec::with_capacity(n.min(rest.0.len() / 20));
        let mut size = 0u64;
        for _ in 0..n {
            let p = Piece {
                source: rest.u32()?,
                offset: rest.u64()?,
                len: rest.u64()?,
            };
            if p.source as usize >= sources.len() || p.len == 0 || p.offset.checked_add(p.len).is_none() {
                return None;
            }
            size = size.checked_add(p.len)?;
            pieces.push(p);
        }
        (rest.is_empty() && !pieces.is_empty()).then_some(Recipe {
            sources,
            pieces,
            own_first,
        })
    }
}

/// A stored blob's bytes, read where they are: one file for a plain blob, the recipe's sources
/// for a lazy one.
#[derive(Debug)]
pub struct BlobSource {
    size: u64,
    /// Sorted by `start`, contiguous from 0.
    pieces: Vec<Located>,
    files: Vec<(Digest, File)>,
}

#[derive(Clone, Copy, Debug)]
struct Located {
    /// Offset of the piece in this blob.
    start: u64,
    file: usize,
    offset: u64,
    len: u64,
}

impl BlobSource {
    /// The plain blob `digest` of `size` bytes, open as `file`.
    pub fn plain(digest: Digest, file: File, size: u64) -> BlobSource {
        BlobSource {
            size,
            pieces: vec![Located {
                start: 0,
                file: 0,
                offset: 0,
                len: size,
            }],
            files: vec![(digest, file)],
        }
    }

    /// `recipe` over its sources, open as `files` (in the order of `recipe.sources`). A piece
    /// reaching past the end of its source is an error: the recipe does not match the blobs.
    pub fn of_recipe(recipe: &Recipe, files: Vec<(Digest, File)>) -> io::Result<BlobSource> {
        let mut sizes = Vec::with_capacity(files.len());
        for (_, f) in &files {
            sizes.push(f.metadata()?.len());
        }
        let mut pieces = Vec::with_capacity(recipe.pieces.len());
        let mut start = 0u64;
        for p in &recipe.pieces {
            let file = p.source as usize;
            let fits = sizes
                .get(file)
                .is_some_and(|&size| p.offset.checked_add(p.len).is_some_and(|end| end <= size));
            if !fits {
                let name = files
                    .get(file)
                    .map_or_else(|| "?".to_string(), |(d, _)| d.to_string());
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the recipe reads past the end of blob {name}"),
                ));
            }
            pieces.push(Located {
                start,
                file,
                offset: p.offset,
                len: p.len,
            });
            start += p.len;
        }
        Ok(BlobSource {
            size: start,
            pieces,
            files,
        })
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many plain blobs its bytes are in (1 for a plain blob).
    pub fn source_count(&self) -> usize {
        self.files.len()
    }

    fn piece_at(&self, offset: u64) -> Option<&Located> {
        let k = self.pieces.partition_point(|p| p.start + p.len <= offset);
        self.pieces
            .get(k)
            .filter(|p| p.start <= offset && offset < p.start + p.len)
    }

    /// Reads from `offset` into `buf`, at most to the end of the piece holding `offset`;
    /// 0 at the end of the blob.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Some(p) = self.piece_at(offset) else {
            return Ok(0);
        };
        let within = offset - p.start;
        let want = usize::try_from(p.len - within)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.files[p.file]
            .1
            .read_at(&mut buf[..want], p.offset + within)?;
        if n == 0 && want > 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(n)
    }

    /// Calls `each(source, offset, len)` for the plain-blob ranges holding this blob's bytes
    /// `offset..offset + len` (clipped to its end), in order.
    pub fn resolve(&self, mut offset: u64, len: u64, mut each: impl FnMut(Digest, u64, u64)) {
        let end = offset.saturating_add(len).min(self.size);
        while offset < end {
            let Some(p) = self.piece_at(offset) else {
                return;
            };
            let within = offset - p.start;
            let n = (p.len - within).min(end - offset);
            each(self.files[p.file].0, p.offset + within, n);
            offset += n;
        }
    }

    /// A reader of the whole blob from its start.
    pub fn reader(&self) -> SourceReader<'_> {
        SourceReader { source: self, at: 0 }
    }
}

/// [`BlobSource::into_checked_reader`].
pub struct CheckedReader {
    source: BlobSource,
    at: u64,
    hasher: sha2::Sha256,
    expected: Digest,
}

impl BlobSource {
    /// A reader of the whole blob that owns the source and, at the end, fails unless the bytes
    /// hash to `expected`: what a push or an export streams a lazy blob through, so a recipe
    /// that does not give its blob never leaves the store as that blob.
    pub fn into_checked_reader(self, expected: Digest) -> CheckedReader {
        use sha2::Digest as _;
        CheckedReader {
            source: self,
            at: 0,
            hasher: sha2::Sha256::new(),
            expected,
        }
    }
}

impl Read for CheckedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use sha2::Digest as _;
        let n = self.source.read_at(buf, self.at)?;
        self.at += n as u64;
        self.hasher.update(&buf[..n]);
        if n == 0 && !buf.is_empty() {
            let actual = Digest(self.hasher.clone().finalize().into());
            if actual != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("blob {} read from its recipe has digest {actual}", self.expected),
                ));
            }
        }
        Ok(n)
    }
}

impl fmt::Debug for CheckedReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckedReader")
            .field("expected", &self.expected)
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

/// [`BlobSource::reader`].
#[derive(Debug)]
pub struct SourceReader<'a> {
    source: &'a BlobSource,
    at: u64,
}

impl Read for SourceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.source.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn pieces_merge_encode_round_trips_and_damage_is_rejected() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let mut r = Recipe {
            own_first: true,
            ..Default::default()
        };
        r.push(a, 0, 10);
        r.push(a, 10, 5); // follows: merged
        r.push(b, 3, 4);
        r.push(a, 20, 1); // a gap: a new piece
        r.push(b, 0, 0); // empty: nothing
        assert_eq!(r.sources, vec![a, b]);
        assert_eq!(r.pieces.len(), 3);
        assert_eq!(r.pieces[0].len, 15);
        assert_eq!(r.size(), 20);
        let bytes = r.encode();
        assert_eq!(Recipe::decode(&bytes), Some(r.clone()));
        assert_eq!(Recipe::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(Recipe::decode(&[bytes.clone(), vec![0]].concat()), None);
        assert_eq!(Recipe::decode(b"kilnrcp0"), None);
        // A piece naming a third source.
        let mut bad = bytes.clone();
        let first_piece = 8 + 1 + 4 + 2 * 32 + 4;
        bad[first_piece] = 2;
        assert_eq!(Recipe::decode(&bad), None);
        // No piece at all.
        let empty = Recipe::default().encode();
        assert_eq!(Recipe::decode(&empty), None);
    }

    #[test]
    fn a_source_reads_and_resolves_across_pieces() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let mut r = Recipe::default();
        r.push(b, 2, 3); // "CDE"
        r.push(a, 0, 4); // "0123"
        r.push(b, 0, 1); // "A"
        assert_eq!(r.sources, vec![b, a]);
        let src =
            BlobSource::of_recipe(&r, vec![(b, file_with(b"ABCDEFG")), (a, file_with(b"0123"))]).unwrap();
        let mut all = Vec::new();
        src.reader().read_to_end(&mut all).unwrap();
        assert_eq!(all, b"CDE0123A");
        assert_eq!(src.size(), 8);
        let mut got = Vec::new();
        src.resolve(1, 5, |d, off, len| got.push((d, off, len)));
        assert_eq!(got, vec![(b, 3, 2), (a, 0, 3)]);
        let mut buf = [0u8; 8];
        assert_eq!(src.read_at(&mut buf, 8).unwrap(), 0);
        // Read whole and checked: the right digest passes, another fails at the end.
        let mut out = Vec::new();
        src.into_checked_reader(Digest::of(b"CDE0123A"))
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"CDE0123A");
        let src =
            BlobSource::of_recipe(&r, vec![(b, file_with(b"ABCDEFG")), (a, file_with(b"0123"))]).unwrap();
        let err = src
            .into_checked_reader(Digest::of(b"other"))
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("read from its recipe"), "{err}");
        // A piece past its source's end is refused when the source is opened.
        let short = BlobSource::of_recipe(&r, vec![(b, file_with(b"ABC")), (a, file_with(b"0123"))]);
        assert!(short.unwrap_err().to_string().contains("past the end"));
    }
}
