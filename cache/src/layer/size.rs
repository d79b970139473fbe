//! The size of a layer as Docker shows it (`docker images` SIZE, `docker history` SIZE): what
//! the layer takes unpacked, counted as Docker's overlay2 driver counts its diff directory
//! (`pkg/directory.Size`): the `st_size` of every entry that is not a directory, each inode once.
//! So regular files count their length once per inode (a hard link adds nothing), symlinks the
//! length of their target, whiteouts, devices and fifos nothing. The tar's headers and padding,
//! which the blob size includes, count nothing: kiln's earlier SIZE (the sum of the blobs) was
//! 2-6% above Docker's for the same image.
//!
//! Computing it reads the layer's tar headers (and, for a compressed blob, decompresses it), so
//! the result is remembered per diff ID under `ROOT/cache/layer-size/`.

use std::io::{self, Read};

use kiln_dag::Digest;

use crate::store::Store;

/// Docker's size of the layer tar read from `reader` (uncompressed).
pub fn unpacked_size(reader: impl Read) -> io::Result<u64> {
    let mut archive = tar::Archive::new(reader);
    let mut total: u64 = 0;
    for entry in archive.entries()? {
        let entry = entry?;
        let header = entry.header();
        let kind = header.entry_type();
        let name = entry.path_bytes();
        let base = name
            .rsplit(|b| *b == b'/')
            .find(|c| !c.is_empty())
            .unwrap_or(&name);
        if base.starts_with(b".wh.") {
            continue;
        }
        if kind.is_file() || kind == tar::EntryType::Continuous {
            total = total.saturating_add(entry.size());
        } else if kind.is_symlink() {
            total = total.saturating_add(entry.link_name_bytes().map_or(0, |l| l.len() as u64));
        }
    }
    Ok(total)
}

/// Docker's size of the layer with blob `blob` and diff ID `diff_id` in `store`, remembered per
/// diff ID.
pub fn layer_size(store: &Store, blob: &Digest, diff_id: &Digest) -> io::Result<u64> {
    let memo = store.cache_dir().join("layer-size").join(diff_id.hex());
    if let Some(n) = std::fs::read_to_string(&memo)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return Ok(n);
    }
    let content = store.content();
    let not_found = |e| io::Error::new(io::ErrorKind::NotFound, e);
    // A lazy blob (always an uncompressed tar kiln wrote) is read where its bytes are, not
    // written out for this.
    let size = if content.is_lazy(blob) {
        let source = content.source(blob).map_err(not_found)?;
        unpacked_size(io::BufReader::with_capacity(1 << 20, source.reader()))?
    } else {
        let file = content.open(blob).map_err(not_found)?;
        unpacked_size(super::sniff(file).map_err(io::Error::other)?)?
    };
    // Best effort: the record only saves the next reader a pass over the blob.
    if let Some(dir) = memo.parent() {
        if std::fs::create_dir_all(dir).is_ok() {
            let _ = crate::paths::write_atomic(&memo, size.to_string().as_bytes(), false);
        }
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    #[test]
    fn counts_like_docker_overlay2() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut header(tar::EntryType::Directory, 0), "d/", io::empty())
            .unwrap_or_else(|e| panic!("{e}"));
        b.append_data(&mut header(tar::EntryType::Regular, 5), "d/a", &b"hello"[..])
            .unwrap_or_else(|e| panic!("{e}"));
        // A hard link adds nothing; a symlink its target's length; a whiteout nothing.
        let mut link = header(tar::EntryType::Link, 0);
        b.append_link(&mut link, "d/b", "d/a")
            .unwrap_or_else(|e| panic!("{e}"));
        let mut sym = header(tar::EntryType::Symlink, 0);
        b.append_link(&mut sym, "d/s", "target/path")
            .unwrap_or_else(|e| panic!("{e}"));
        b.append_data(&mut header(tar::EntryType::Regular, 0), "d/.wh.gone", io::empty())
            .unwrap_or_else(|e| panic!("{e}"));
        b.append_data(
            &mut header(tar::EntryType::Regular, 0),
            "d/.wh..wh..opq",
            io::empty(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let long = "x".repeat(200);
        b.append_data(
            &mut header(tar::EntryType::Regular, 3),
            format!("d/{long}"),
            &b"abc"[..],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let bytes = b.into_inner().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            unpacked_size(&bytes[..]).unwrap_or_else(|e| panic!("{e}")),
            5 + 11 + 3
        );
        assert!(bytes.len() > 5 + 11 + 3);
    }
}
