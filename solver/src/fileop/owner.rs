//! `--chown` and the owners of mkdir/mkfile: names are looked up in the destination root's
//! `/etc/passwd` and `/etc/group` (resolved inside that root). A user alone means the user's
//! primary group when given by name, the same number when given by id.
//!
//! The lookups are a private reader for now; `kiln_runtime::users` is meant to replace
//! [`lookup_user`] and [`lookup_group`].

use std::path::Path;

use kiln_dag::{IdSpec, Owner};

use super::resolve;
use super::FileOpError;

/// The numeric `(uid, gid)` an [`Owner`] names in the filesystem at `root`.
///
/// As BuildKit's file ops do, a name that the database does not list is not an error: an unknown
/// user is uid 0 (with gid 0), an unknown group leaves the user's primary gid. A database file
/// that is missing altogether is an error.
pub(super) fn resolve_owner(root: &Path, owner: &Owner) -> Result<(u32, u32), FileOpError> {
    let (uid, primary_gid) = match &owner.user {
        IdSpec::Id(id) => (*id, *id),
        IdSpec::Name(name) => match name.parse::<u32>() {
            Ok(id) => (id, id),
            Err(_) => lookup_user(root, name)?.unwrap_or((0, 0)),
        },
    };
    let gid = match &owner.group {
        None => primary_gid,
        Some(IdSpec::Id(id)) => *id,
        Some(IdSpec::Name(name)) => match name.parse::<u32>() {
            Ok(id) => id,
            Err(_) => lookup_group(root, name)?.unwrap_or(primary_gid),
        },
    };
    Ok((uid, gid))
}

/// The uid and primary gid of user `name` in `root`'s `/etc/passwd`.
fn lookup_user(root: &Path, name: &str) -> Result<Option<(u32, u32)>, FileOpError> {
    let text = read_db(root, "/etc/passwd")?;
    Ok(text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some((f[2].trim().parse().ok()?, f[3].trim().parse().ok()?))
        } else {
            None
        }
    }))
}

/// The gid of group `name` in `root`'s `/etc/group`.
fn lookup_group(root: &Path, name: &str) -> Result<Option<u32>, FileOpError> {
    let text = read_db(root, "/etc/group")?;
    Ok(text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 3 && f[0] == name {
            f[2].trim().parse().ok()
        } else {
            None
        }
    }))
}

fn read_db(root: &Path, file: &str) -> Result<String, FileOpError> {
    let path = resolve::in_root(root, file, true, None)?.host;
    let bytes = std::fs::read(&path).map_err(|source| FileOpError::ReadIdFile {
        file: file.to_string(),
        source,
    })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
