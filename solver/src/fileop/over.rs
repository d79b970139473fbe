//! Whether an edited copy's result can be its upper dir stacked on the donor's bottom tree.
//!
//! A copy that links most of its files from the last result writes only the changed files and
//! the directories into its upper dir; the links it put off (see
//! [`super::link::Linking::deferring`]) are the rest of the tree. Instead of making them (one
//! directory entry per unchanged file: most of an edit's time at 500k files), the result may
//! be kept as the upper dir over the donor's bottom tree, an overlay lower pair, as long as the
//! pair shows exactly the copy's tree. [`fits`] decides that by walking the bottom tree against
//! the upper dir: every entry of the bottom tree must be hidden by an entry of the upper dir or
//! be a donor file the copy keeps at its own path, and where the two merge there must be no
//! whiteout and no opaque directory (either would hide, in the pair, what the copy keeps).

use std::os::fd::OwnedFd;
use std::path::Path;

use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// What the copy keeps of the donor at its own paths, beside what it writes into the upper dir:
/// whether the regular file at a path (relative to the root) is one of them.
pub(super) type Keeps<'a> = &'a (dyn Fn(&str) -> bool + Sync);

/// Whether `upper` over `bottom` shows the copy's tree once the links of the donor files it
/// keeps that are not in `bottom` are made in `upper`.
pub(super) fn fits(kept: Keeps<'_>, upper: &Path, bottom: &Path) -> bool {
    let (Some(upper), Some(bottom)) = (open(None, upper), open(None, bottom)) else {
        return false;
    };
    let opaque = kiln_cache::layer::opaque_xattr();
    !is_opaque(&upper, opaque) && !is_opaque(&bottom, opaque) && dir(kept, &upper, &bottom, "", opaque)
}

/// One directory present in both trees (relative path `rel`, empty at the top).
fn dir(kept: Keeps<'_>, upper: &OwnedFd, bottom: &OwnedFd, rel: &str, opaque: &str) -> bool {
    let (Some(mut ups), Some(downs)) = (entries(upper), entries(bottom)) else {
        return false;
    };
    ups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    // A character device in the upper dir may be a whiteout: it would hide a bottom entry.
    if ups.iter().any(|(_, t)| *t == FileType::CharacterDevice) {
        return false;
    }
    let mut merged: Vec<&[u8]> = Vec::new();
    for (name, kind) in &downs {
        let Some(name_str) = std::str::from_utf8(name).ok() else {
            return false;
        };
        let path = if rel.is_empty() {
            name_str.to_string()
        } else {
            format!("{rel}/{name_str}")
        };
        match ups.binary_search_by(|(n, _)| n.as_slice().cmp(name)) {
            Ok(i) if *kind == FileType::Directory => {
                if ups[i].1 == FileType::Directory {
                    merged.push(name);
                } else if !is_empty_dir(bottom, name_str) {
                    // A non-directory hides the whole directory, which held something.
                    return false;
                }
            }
            // Hidden by the upper entry, which is what the copy made there.
            Ok(_) => {}
            Err(_) => {
                if *kind != FileType::RegularFile || !kept(&path) {
                    return false;
                }
            }
        }
    }
    merged.par_iter().all(|name| {
        let Ok(name) = std::str::from_utf8(name) else {
            return false;
        };
        let (Some(u), Some(d)) = (
            open(Some(upper), Path::new(name)),
            open(Some(bottom), Path::new(name)),
        ) else {
            return false;
        };
        if is_opaque(&u, opaque) || is_opaque(&d, opaque) {
            return false;
        }
        let rel = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        dir(kept, &u, &d, &rel, opaque)
    })
}

/// The directory `path` (below `at` when given), opened for reading, never through a symlink.
pub(super) fn open(at: Option<&OwnedFd>, path: &Path) -> Option<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match at {
        Some(at) => rustix::fs::openat2(
            at,
            path,
            flags,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .ok(),
        None => rustix::fs::open(path, flags, Mode::empty()).ok(),
    }
}

/// The names and types of a directory's entries (`.` and `..` left out); `None` when it cannot
/// be read.
pub(super) fn entries(dir: &OwnedFd) -> Option<Vec<(Vec<u8>, FileType)>> {
    let mut reader = rustix::fs::Dir::read_from(dir).ok()?;
    let mut out = Vec::new();
    while let Some(entry) = reader.read() {
        let entry = entry.ok()?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let kind = match entry.file_type() {
            FileType::Unknown => {
                let st = rustix::fs::statat(dir, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW).ok()?;
                FileType::from_raw_mode(st.st_mode)
            }
            kind => kind,
        };
        out.push((name.to_vec(), kind));
    }
    Some(out)
}

fn is_empty_dir(parent: &OwnedFd, name: &str) -> bool {
    open(Some(parent), Path::new(name))
        .and_then(|d| entries(&d))
        .is_some_and(|e| e.is_empty())
}

fn is_opaque(dir: &OwnedFd, name: &str) -> bool {
    let mut value = [0u8; 4];
    match rustix::fs::fgetxattr(dir, name, &mut value) {
        Ok(_) => true,
        Err(rustix::io::Errno::NODATA) | Err(rustix::io::Errno::NOTSUP) => false,
        // Unreadable: taken as opaque, so the copy makes its links instead.
        Err(_) => true,
    }
}
