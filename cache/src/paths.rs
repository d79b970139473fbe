//! Files and paths, in the style of cargo-util's `paths.rs`: every operation names the path it
//! failed on, and a file that must never be seen half-written is written through
//! [`write_atomic`] (a temp file in the same directory, renamed over the file).
//!
//! The temp is named `.NAME.kiln-PID-START-N.tmp` after its owner (see [`crate::temp`]), so a
//! write killed halfway leaves a temp that the next command removes: in the store's directories
//! by [`crate::temp::clean_stale`], anywhere else it is a dot-file beside the target.
//!
//! `kiln-cache` and `kiln-build` deny `std::fs::rename` and `std::fs::write` (their
//! `clippy.toml`): a raw call there is either a scratch file or says why with an `#[allow]`.
//!
//! Durability: with `durable`, the temp is fsynced before the rename and the directory after it,
//! so after a crash the path holds the old or the new content, whole. Without it the rename is
//! still atomic for other processes, which is what records that can be rebuilt need.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A file operation that failed, the path it failed on, and the cause.
#[derive(Debug, thiserror::Error)]
#[error("failed to {op} `{path}`")]
pub struct PathError {
    /// What was done (`write`, `create`, `rename ... to`, `sync`).
    pub op: &'static str,
    /// The path it was done to: for a rename, the destination.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

impl PathError {
    fn new(op: &'static str, path: &Path, source: io::Error) -> PathError {
        PathError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Writes `bytes` to `path` atomically: other readers see the old content or the new one, never
/// a part. With `durable`, the new content also survives a crash once this returns.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> Result<(), PathError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    write_atomic_via(dir, path, bytes, durable)
}

/// [`write_atomic`] with the temp file in `tmp_dir`, which must be on `path`'s filesystem (a
/// directory of temps beside a directory of records, so listing the records never sees one).
pub fn write_atomic_via(tmp_dir: &Path, path: &Path, bytes: &[u8], durable: bool) -> Result<(), PathError> {
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tmp_dir.join(crate::temp::name(&format!(".{base}.kiln-"), ".tmp"));
    let result = write_then_rename(&tmp, path, bytes, durable);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_then_rename(tmp: &Path, path: &Path, bytes: &[u8], durable: bool) -> Result<(), PathError> {
    let mut file = File::create(tmp).map_err(|e| PathError::new("create", tmp, e))?;
    file.write_all(bytes)
        .map_err(|e| PathError::new("write", tmp, e))?;
    if durable {
        file.sync_all().map_err(|e| PathError::new("sync", tmp, e))?;
    }
    drop(file);
    rename(tmp, path)?;
    if durable {
        sync_dir_of(path);
    }
    Ok(())
}

/// Renames `from` to `to`; the error names the destination (and the operation, the source).
pub fn rename(from: &Path, to: &Path) -> Result<(), PathError> {
    #[allow(
        clippy::disallowed_methods,
        reason = "the one checked rename every other goes through"
    )]
    fs::rename(from, to).map_err(|source| PathError {
        op: "rename a temp file to",
        path: to.to_path_buf(),
        source,
    })
}

/// Persists renames into `path`'s directory (an fsync of the directory); a failure only weakens
/// crash safety, not correctness.
pub fn sync_dir_of(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn write_atomic_replaces_whole_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        for (content, durable) in [(&b"first"[..], false), (&b"second, longer"[..], true)] {
            write_atomic(&path, content, durable).unwrap();
            assert_eq!(fs::read(&path).unwrap(), content);
        }
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn errors_name_the_operation_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/f");
        let e = write_atomic(&missing, b"x", true).unwrap_err();
        assert_eq!(e.op, "create");
        assert!(
            e.path.starts_with(dir.path().join("no/such/dir")),
            "{}",
            e.path.display()
        );
        assert!(e.to_string().starts_with("failed to create `"), "{e}");
        // A directory in the way of the rename: the error names the destination.
        let target = dir.path().join("d");
        fs::create_dir_all(target.join("child")).unwrap();
        let e = write_atomic(&target, b"x", false).unwrap_err();
        assert_eq!(e.path, target);
        assert_eq!(
            e.to_string(),
            format!("failed to rename a temp file to `{}`", target.display())
        );
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["d"], "the temp is removed after a failure");
    }

    #[test]
    fn a_killed_writers_temp_is_a_temp_of_its_owner() {
        let name = crate::temp::name(".images.json.kiln-", ".tmp");
        assert_eq!(crate::temp::owner_of(&name), Some(crate::temp::Owner::current()));
    }
}
