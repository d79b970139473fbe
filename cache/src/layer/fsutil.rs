//! Descriptor-relative file system helpers that never follow symlinks.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};

/// Flags to open a directory for walking: read-only, never through a symlink.
pub(crate) fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Opens the directory `name` inside `parent`; when it is not searchable (e.g. the mode 000
/// `work/work` dir overlayfs leaves behind and we are not root), makes it so first.
fn open_dir_forcibly(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    match rfs::openat(parent, name, dir_flags(), Mode::empty()) {
        Err(rustix::io::Errno::ACCESS) => {
            rfs::chmodat(parent, name, Mode::from_raw_mode(0o700), AtFlags::empty())?;
            Ok(rfs::openat(parent, name, dir_flags(), Mode::empty())?)
        }
        other => Ok(other?),
    }
}

/// Subdirectories of one directory from which its removal goes to the thread pool when not
/// already in it.
const PARALLEL_REMOVE_MIN_DIRS: usize = 8;

/// Removes the directory entries of `dir`, recursively, never following symlinks.
pub(crate) fn remove_contents(dir: BorrowedFd<'_>) -> io::Result<()> {
    let mut children = Vec::new();
    let mut reader = rfs::Dir::read_from(dir)?;
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        children.push((name.to_owned(), entry.file_type()));
    }
    // Subdirectories go in parallel (a large tree's unlinks are most of a removal's time),
    // everything else in order. Not for a few directories from outside the thread pool: handing
    // them to the pool wakes its threads, which then spin a while for more work, on a small
    // machine taking the CPU from the build (a step's overlay work dir is two directories).
    let (dirs, others): (Vec<_>, Vec<_>) = children.into_iter().partition(|(_, t)| *t == FileType::Directory);
    for (name, file_type) in others {
        remove_entry(dir, &name, Some(file_type))?;
    }
    let in_pool = rayon::current_thread_index().is_some();
    if dirs.len() >= PARALLEL_REMOVE_MIN_DIRS || (in_pool && dirs.len() > 1) {
        use rayon::prelude::*;
        dirs.par_iter()
            .try_for_each(|(name, file_type)| remove_entry(dir, name, Some(*file_type)))
    } else {
        dirs.iter()
            .try_for_each(|(name, file_type)| remove_entry(dir, name, Some(*file_type)))
    }
}

/// Removes `name` inside `parent` with everything below it. Missing is not an error.
pub(crate) fn remove_entry(parent: BorrowedFd<'_>, name: &CStr, known: Option<FileType>) -> io::Result<()> {
    let file_type = match known {
        Some(t) if t != FileType::Unknown => t,
        _ => match rfs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => FileType::from_raw_mode(st.st_mode),
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        },
    };
    if file_type == FileType::Directory {
        let fd = open_dir_forcibly(parent, name)?;
        remove_contents(fd.as_fd())?;
        drop(fd);
        match rfs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    } else {
        match rfs::unlinkat(parent, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Removes `path` and everything below it without following symlinks, making unreadable
/// directories readable on the way. A missing path is not an error.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot remove a root or `..` path",
        ));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let parent_fd = match rfs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let name = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(name))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    remove_entry(parent_fd.as_fd(), &name, None)
}
