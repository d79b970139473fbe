//! Reusing an earlier layer tar's entries for files a new tree shares with it by inode.
//!
//! A committed snapshot is never modified, and a linked copy hard-links unchanged files from the
//! last result of the same step into the new one. Such a file is the same inode, with the same
//! data and metadata, as when the earlier layer tar was written, and it sits at the same path: its
//! tar entry (PAX header, ustar header, data, padding) is byte for byte the earlier one. The writer
//! copies those bytes from the earlier blob, one sequential read for a run of them, instead of
//! opening, reading and listing the xattrs of every file again.
//!
//! A [`TarIndex`] records where each regular file's entry sits in a written tar and which inode
//! it was written from; a [`Donor`] pairs one with its blob.

use std::fmt;

use crate::recipe::BlobSource;

/// Where one regular file's entry sits in a layer tar, and the inode it was written from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Span {
    pub(super) ino: u64,
    /// Offset of the entry's first header (its PAX header when it has one).
    pub(super) offset: u64,
    /// Headers, data and padding.
    pub(super) len: u64,
}

/// The regular-file entries of a layer tar written by
/// [`write_diff_indexed`](super::write_diff_indexed): tar path → inode, offset and length.
///
/// Kept flat (every path in one buffer, one fixed-size item per entry, sorted by path for
/// binary search) rather than as a map of owned paths: a 500k-file layer's index is then about
/// 70 bytes an entry instead of about 200.
#[derive(Clone, Debug, Default)]
pub struct TarIndex {
    /// Device of the tree the tar was written from (inode numbers are only unique within one).
    pub(super) dev: u64,
    /// Every path, concatenated.
    names: Vec<u8>,
    /// One per entry: where its path sits in `names`, and its span. Sorted by path (and
    /// without duplicates) once [`TarIndex::seal`]ed; a writer appends in tar order.
    items: Vec<Item>,
}

#[derive(Clone, Copy, Debug)]
struct Item {
    at: usize,
    len: u32,
    span: Span,
}

impl PartialEq for TarIndex {
    fn eq(&self, other: &TarIndex) -> bool {
        self.dev == other.dev && self.items.len() == other.items.len() && self.iter().eq(other.iter())
    }
}

impl Eq for TarIndex {}

const MAGIC: &[u8; 8] = b"kilntar1";

impl TarIndex {
    /// An empty index of a tree on device `dev`.
    pub(super) fn on_device(dev: u64) -> TarIndex {
        TarIndex {
            dev,
            ..Default::default()
        }
    }

    /// Number of file entries recorded.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no file entry is recorded.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn name(&self, item: &Item) -> &[u8] {
        &self.names[item.at..item.at + item.len as usize]
    }

    /// Records the entry of `path` (a writer calls this in tar order, then [`TarIndex::seal`]).
    pub(super) fn push(&mut self, path: &[u8], span: Span) {
        let Ok(len) = u32::try_from(path.len()) else {
            return;
        };
        self.items.push(Item {
            at: self.names.len(),
            len,
            span,
        });
        self.names.extend_from_slice(path);
    }

    /// The path of the `k`th entry pushed (before [`TarIndex::seal`] reorders them).
    pub(super) fn pushed_name(&self, k: usize) -> Option<&[u8]> {
        self.items.get(k).map(|i| self.name(i))
    }

    /// Sorts the entries by path for lookups; a path recorded twice keeps its last entry.
    pub(super) fn seal(&mut self) {
        let names = &self.names;
        let name = |i: &Item| &names[i.at..i.at + i.len as usize];
        self.items
            .sort_by(|a, b| name(a).cmp(name(b)).then(a.at.cmp(&b.at)));
        let mut kept: Vec<Item> = Vec::with_capacity(self.items.len());
        for item in self.items.drain(..) {
            match kept.last_mut() {
                Some(last) if name(last) == name(&item) => *last = item,
                _ => kept.push(item),
            }
        }
        self.items = kept;
    }

    /// The entries, by path.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&[u8], Span)> + '_ {
        self.items.iter().map(|i| (self.name(i), i.span))
    }

    /// The entry of `path`, if recorded.
    #[cfg(test)]
    pub(super) fn get(&self, path: &[u8]) -> Option<Span> {
        self.find_from(path, 0).map(|k| self.items[k].span)
    }

    /// The position of `path`'s entry (sealed), looked for at `guess` first.
    fn find_from(&self, path: &[u8], guess: usize) -> Option<usize> {
        crate::sorted::find_from(self.items.len(), |k| self.name(&self.items[k]), path, guess)
    }

    /// Keeps only the entries `keep` accepts.
    pub(super) fn retain(&mut self, keep: impl Fn(&Span) -> bool) {
        self.items.retain(|i| keep(&i.span));
    }

    /// A compact binary form, for storing the index beside its snapshot.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAGIC.len() + 8 + self.names.len() + self.items.len() * 28);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.dev.to_le_bytes());
        for (path, span) in self.iter() {
            out.extend_from_slice(&(path.len() as u32).to_le_bytes());
            out.extend_from_slice(path);
            out.extend_from_slice(&span.ino.to_le_bytes());
            out.extend_from_slice(&span.offset.to_le_bytes());
            out.extend_from_slice(&span.len.to_le_bytes());
        }
        out
    }

    /// Reads [`TarIndex::encode`]'s bytes; anything malformed (a path twice included) is
    /// `None` (the index only saves work: without it, files are read again).
    pub fn decode(bytes: &[u8]) -> Option<TarIndex> {
        let mut rest = crate::bytes::Take(bytes.strip_prefix(MAGIC.as_slice())?);
        let mut index = TarIndex::on_device(rest.u64()?);
        while !rest.is_empty() {
            let len = rest.u32()? as usize;
            let path = rest.bytes(len)?;
            let span = Span {
                ino: rest.u64()?,
                offset: rest.u64()?,
                len: rest.u64()?,
            };
            if path.is_empty()
                || !span.offset.is_multiple_of(512)
                || !span.len.is_multiple_of(512)
                || span.len == 0
            {
                return None;
            }
            index.push(path, span);
        }
        let count = index.items.len();
        index.seal();
        (index.items.len() == count).then_some(index)
    }
}

/// An earlier layer tar (uncompressed, as the store keeps locally built layers; plain or lazy)
/// with its index: the entries a new write copies for files it shares with the earlier tree by
/// inode.
pub struct Donor {
    pub(super) blob: BlobSource,
    pub(super) index: TarIndex,
    /// Where the next lookup looks first: the entry after the last one found (a write walks
    /// each directory in name order, the index is sorted by path).
    next: std::sync::atomic::AtomicUsize,
}

impl Donor {
    /// Pairs `index` with the `blob` it describes. Entries reaching past the blob's end are
    /// dropped (a blob that does not match its index is never read past its end).
    pub fn new(blob: BlobSource, mut index: TarIndex) -> Donor {
        let size = blob.size();
        index.retain(|s| s.offset.checked_add(s.len).is_some_and(|end| end <= size));
        Donor {
            blob,
            index,
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The entry to copy for the regular file at tar path `path` with inode `ino` on device
    /// `dev`, if the earlier tar wrote that very inode there.
    pub(super) fn entry(&self, dev: u64, path: &[u8], ino: u64) -> Option<Span> {
        if dev != self.index.dev {
            return None;
        }
        use std::sync::atomic::Ordering::Relaxed;
        let at = self.index.find_from(path, self.next.load(Relaxed))?;
        self.next.store(at + 1, Relaxed);
        Some(self.index.items[at].span).filter(|s| s.ino == ino)
    }
}

impl fmt::Debug for Donor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Donor")
            .field("entries", &self.index.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trips_and_rejects_damage() {
        let mut index = TarIndex::on_device(7);
        // Pushed out of path order, as a tar walk may ("a.b" sorts before "a/b").
        index.push(
            b"c",
            Span {
                ino: 9,
                offset: 0,
                len: 512,
            },
        );
        index.push(
            b"a/b",
            Span {
                ino: 3,
                offset: 1024,
                len: 1536,
            },
        );
        index.push(
            b"a.b",
            Span {
                ino: 4,
                offset: 512,
                len: 512,
            },
        );
        index.seal();
        assert_eq!(index.get(b"a/b").map(|s| s.ino), Some(3));
        assert_eq!(index.get(b"a.b").map(|s| s.ino), Some(4));
        assert_eq!(index.get(b"a"), None);
        let bytes = index.encode();
        assert_eq!(TarIndex::decode(&bytes), Some(index));
        assert_eq!(TarIndex::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(TarIndex::decode(b"kilntar0"), None);
        let mut odd = bytes.clone();
        // The first entry's offset (after magic, dev, name length and "a/b", ino) off a block.
        odd[8 + 8 + 4 + 3 + 8] = 1;
        assert_eq!(TarIndex::decode(&odd), None);
        // A path recorded twice.
        let mut twice = bytes.clone();
        twice.extend_from_slice(&bytes[16..16 + 4 + 3 + 24]);
        assert_eq!(TarIndex::decode(&twice), None);
    }
}
