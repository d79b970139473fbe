//! The error of applying or checking a layer tar, shared by `apply`, `check` and `entries`.

use std::io;
use std::path::PathBuf;

/// Errors of `layer::apply` and `layer::check`. Every variant names the archive and the entry
/// involved.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The destination directory could not be opened.
    #[error("failed to open the destination `{path}`")]
    OpenDest {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading the archive failed.
    #[error("{archive}: failed to read entry `{entry}`")]
    Read {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// The archive ended in the middle of an entry.
    #[error("{archive}: unexpected end of archive in entry `{entry}`")]
    UnexpectedEof { archive: String, entry: String },
    /// A header block's checksum is wrong (not a tar, or corrupt).
    #[error("{archive}: bad header checksum at entry `{entry}`")]
    BadChecksum { archive: String, entry: String },
    /// A numeric header field is malformed or out of range.
    #[error("{archive}: entry `{entry}` has an invalid `{field}` field")]
    BadHeaderField {
        archive: String,
        entry: String,
        field: &'static str,
    },
    /// A PAX or GNU long-name header is larger than the cap.
    #[error("{archive}: entry `{entry}` has a {size}-byte extended header (limit {limit})")]
    HeaderTooLarge {
        archive: String,
        entry: String,
        size: u64,
        limit: u64,
    },
    /// A PAX header is malformed.
    #[error("{archive}: entry `{entry}` has a malformed PAX header: {reason}")]
    BadPax {
        archive: String,
        entry: String,
        reason: &'static str,
    },
    /// The entry type is not one a layer may hold (or a sparse file).
    #[error("{archive}: entry `{entry}` has unsupported type `{typeflag}`")]
    UnsupportedType {
        archive: String,
        entry: String,
        typeflag: char,
    },
    /// The entry name climbs out of the destination with `..`.
    #[error("{archive}: entry `{entry}` climbs out of the destination with `..`")]
    DotDot { archive: String, entry: String },
    /// A parent of the entry is a symlink (following it could leave the destination).
    #[error("{archive}: entry `{entry}` crosses the symlink `{component}`")]
    CrossesSymlink {
        archive: String,
        entry: String,
        component: String,
    },
    /// A parent of the entry exists and is not a directory.
    #[error("{archive}: entry `{entry}`: parent `{component}` is not a directory")]
    ParentNotDirectory {
        archive: String,
        entry: String,
        component: String,
    },
    /// A parent directory of the entry could not be opened or created.
    #[error("{archive}: entry `{entry}`: failed to open parent `{component}`")]
    OpenParent {
        archive: String,
        entry: String,
        component: String,
        #[source]
        source: io::Error,
    },
    /// The entry names the destination root itself but is not a directory.
    #[error("{archive}: entry `{entry}` names the root but is not a directory")]
    RootNotDirectory { archive: String, entry: String },
    /// A whiteout entry is malformed (a bare `.wh.`, or `.wh..`).
    #[error("{archive}: entry `{entry}` is an invalid whiteout")]
    InvalidWhiteout { archive: String, entry: String },
    /// A hardlink's target climbs out with `..`, names the root, or passes a symlink.
    #[error("{archive}: hardlink `{entry}` points outside the destination (`{target}`)")]
    LinkEscapes {
        archive: String,
        entry: String,
        target: String,
    },
    /// A hardlink's target does not exist in the destination.
    #[error("{archive}: hardlink `{entry}` points at `{target}`, which does not exist")]
    LinkTargetMissing {
        archive: String,
        entry: String,
        target: String,
    },
    /// A device node cannot be created without privilege.
    #[error("{archive}: entry `{entry}` is a device node and creating one needs root (CAP_MKNOD)")]
    DeviceNotPermitted { archive: String, entry: String },
    /// Creating the entry failed.
    #[error("{archive}: failed to create entry `{entry}`")]
    Create {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// Removing an existing path (replaced or whited out) failed.
    #[error("{archive}: failed to remove the existing path for entry `{entry}`")]
    Remove {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// Writing a file's data failed.
    #[error("{archive}: failed to write the data of entry `{entry}`")]
    WriteData {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// Setting the owner failed.
    #[error("{archive}: failed to set the owner of entry `{entry}`")]
    Chown {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// Setting the mode failed.
    #[error("{archive}: failed to set the mode of entry `{entry}`")]
    Chmod {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// Setting an xattr failed.
    #[error("{archive}: failed to set xattr `{name}` on entry `{entry}`")]
    SetXattr {
        archive: String,
        entry: String,
        name: String,
        #[source]
        source: io::Error,
    },
    /// Setting the modification time failed.
    #[error("{archive}: failed to set the mtime of entry `{entry}`")]
    SetTime {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
}
