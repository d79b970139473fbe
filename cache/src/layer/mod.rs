//! Layer tars: writing an overlayfs upper dir (or any tree) as an OCI layer tar, applying a layer tar
//! to a directory, and sniffing the compression of a layer blob.
//!
//! The tar format kiln writes is fixed so that equal trees give byte-identical tars (and so equal
//! diff IDs):
//!
//! | field | value |
//! |---|---|
//! | order | depth first; each directory's children sorted by the bytes of their entry names; a directory before its contents; an opaque marker `DIR/.wh..wh..opq` right after `DIR/` |
//! | names | relative, no leading `./` or `/`, directories end in `/` |
//! | header | ustar (`ustar\0`, version `00`); a PAX `x` header named `././@PaxHeader` only when needed: names or link targets over 100 bytes, numbers that do not fit, xattrs |
//! | PAX records | sorted by key; xattrs as `SCHILY.xattr.NAME` |
//! | ids | numeric uid/gid, empty uname/gname |
//! | mode | permission bits including setuid, setgid and sticky |
//! | mtime | whole seconds from the file, clamped to `SOURCE_DATE_EPOCH` when that is earlier |
//! | hardlinks | the first path in walk order carries the data, later ones are type `1` links to it |
//! | end | two zero blocks, no record padding |
//!
//! Architecture invariant: applying an archive never writes outside its destination. Every entry is
//! resolved component by component from a descriptor of the destination with `O_NOFOLLOW`, so a
//! symlink in the tree (even one the same archive created) is never followed.

mod apply;
mod check;
mod entries;
mod error;
pub(crate) mod fsutil;
pub mod pipe;
mod same;
mod size;
mod sniff;
mod splice;
mod tarfmt;
#[cfg(test)]
mod tests;
mod write;

use std::path::PathBuf;

use kiln_dag::Digest;

pub use apply::apply;
pub use check::{check, check_unhashed};
pub use error::ApplyError;
pub use same::{same_tree, same_tree_assuming};
pub use size::{layer_size, unpacked_size};
pub use sniff::{
    decoder, sniff, sniff_downloading, Compression, Decoder, SniffError, Sniffed, READ_AHEAD_DOWNLOADING_MIN,
};
pub use splice::{Donor, TarIndex};
pub use write::{write_diff, write_diff_indexed, write_tree, IndexedLayer, WriteError};

pub(crate) use fsutil::remove_tree;

/// The key of one of overlayfs' own extended attributes (`trusted.overlay.KEY`, or
/// `user.overlay.KEY` for a userxattr mount); `None` for any other name.
fn overlay_xattr_key(name: &[u8]) -> Option<&[u8]> {
    name.strip_prefix(b"trusted.overlay.")
        .or_else(|| name.strip_prefix(b"user.overlay."))
}

/// The attribute that marks an opaque directory in a snapshot: `trusted.overlay.opaque`, or in a
/// user namespace (rootless mode, where `trusted.*` attributes need the initial namespace's
/// CAP_SYS_ADMIN and the runtime mounts overlays with `userxattr`) `user.overlay.opaque`.
pub fn opaque_xattr() -> &'static str {
    static NAME: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let initial = std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| {
            let lines: Vec<Vec<&str>> = m.lines().map(|l| l.split_whitespace().collect()).collect();
            lines.len() == 1 && lines[0] == ["0", "0", "4294967295"]
        });
        if initial {
            "trusted.overlay.opaque"
        } else {
            "user.overlay.opaque"
        }
    })
}

/// How whiteouts in a layer tar are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhiteoutMode {
    /// The destination is a fresh snapshot that will be an overlayfs lower dir: `.wh.NAME` becomes a
    /// 0/0 character device `NAME` and `.wh..wh..opq` sets [`opaque_xattr`]`=y` on its dir.
    Overlay,
    /// The destination is a full tree holding the layers below: `.wh.NAME` removes `NAME` and
    /// `.wh..wh..opq` removes the directory's children that this layer did not write.
    Delete,
}

/// Options for [`write_diff`] and [`write_tree`].
#[derive(Clone, Debug, Default)]
pub struct DiffOptions {
    /// When set, every mtime later than this (seconds since the epoch) is written as this value.
    pub source_date_epoch: Option<i64>,
    /// Paths relative to the walked dir to leave out with everything below them (e.g. mount
    /// points the sandbox created).
    pub exclude: Vec<PathBuf>,
    /// An earlier layer tar whose entries [`write_diff`] copies for the files the tree shares
    /// with it by inode (ignored by [`write_tree`] and with `source_date_epoch`).
    pub donor: Option<std::sync::Arc<Donor>>,
    /// Trees the walked dir lies over as one layer (a snapshot's parents, top first): the
    /// layer is their union as overlayfs shows it, an entry of an upper tree hiding a
    /// lower tree's entry of that name, directories merged. [`write_diff`] and
    /// [`write_diff_indexed`] refuse a whiteout or an opaque directory in such a walk.
    pub below: Vec<PathBuf>,
}

/// What [`write_diff`] and [`write_tree`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerStats {
    /// sha256 of the tar bytes written.
    pub diff_id: Digest,
    /// Number of tar bytes written.
    pub size: u64,
    /// Number of entries (files, dirs, links, devices, whiteouts), not counting PAX headers.
    pub entries: u64,
    /// Of those, the entries copied from [`DiffOptions::donor`].
    pub reused: u64,
}

/// Options for [`apply`].
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// How whiteout entries are applied.
    pub whiteouts: WhiteoutMode,
    /// A name for the archive used in error messages (a digest or a file name).
    pub archive_name: String,
    /// Apply the uid/gid recorded in the archive (needs root or `CAP_CHOWN`).
    pub same_owner: bool,
    /// Largest PAX or GNU long-name header accepted, in bytes.
    pub max_header_size: u64,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            whiteouts: WhiteoutMode::Delete,
            archive_name: String::from("layer"),
            same_owner: true,
            max_header_size: 1 << 20,
        }
    }
}

/// What [`apply`] read and wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyStats {
    /// sha256 of the whole (uncompressed) stream read, trailing padding included: the diff ID.
    pub diff_id: Digest,
    /// Number of bytes read from the stream.
    pub size: u64,
    /// Number of entries applied (whiteouts included, PAX headers not).
    pub entries: u64,
}
