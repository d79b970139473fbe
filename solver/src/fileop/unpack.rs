//! ADD's extraction of local archives: plain tar, or tar compressed with gzip, bzip2, xz or
//! zstd (recognised by their magic bytes, not by the file name). Extraction behaves like
//! Docker's chrooted untar: the destination directory is the archive's `/`, so `..` and
//! absolute entry names stay inside it and symlinks created by earlier entries resolve inside
//! it too.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{FileType, Mode, CWD};
use tar::EntryType;

use super::fsops::{lchown, mkdir_all, remove_all, set_mode, set_times};
use super::resolve;
use super::FileOpError;

/// Opens `path` and wraps it in the decompressor its first bytes call for (the store's sniffer:
/// gzip, bzip2, xz, zstd or plain).
fn open(path: &Path) -> Result<Box<dyn Read>, FileOpError> {
    let err = |source| FileOpError::Archive {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    let (_, reader) = kiln_cache::layer::decoder(file).map_err(|e| {
        err(match e {
            kiln_cache::layer::SniffError::ReadMagic(e) | kiln_cache::layer::SniffError::Zstd(e) => e,
        })
    })?;
    Ok(Box::new(reader))
}

/// Whether the regular file `path` is a tar archive (possibly compressed): its first header
/// reads as a valid tar header. Anything else ADD copies as a plain file.
pub(super) fn is_archive(path: &Path) -> Result<bool, FileOpError> {
    let reader = open(path)?;
    let mut archive = tar::Archive::new(reader);
    let Ok(mut entries) = archive.entries() else {
        return Ok(false);
    };
    Ok(matches!(entries.next(), Some(Ok(_))))
}

/// Extracts the archive at `path` into the directory `dest`. Entries keep the archive's
/// owners; a timestamp, when given, replaces every entry's times.
pub(super) fn unpack(path: &Path, dest: &Path, timestamp: Option<SystemTime>) -> Result<(), FileOpError> {
    let err = |source| FileOpError::Archive {
        path: path.to_path_buf(),
        source,
    };
    let mut archive = tar::Archive::new(open(path)?);
    let mut dirs: Vec<(PathBuf, SystemTime)> = Vec::new();
    for entry in archive.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let header = entry.header().clone();
        let kind = header.entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink
        ) {
            continue;
        }
        let comps = resolve::clean_components(&name);
        let Some((base, parents)) = comps.split_last() else {
            // The archive's root: the destination exists already and keeps its metadata.
            continue;
        };
        let parent = resolve::in_root(dest, &format!("/{}", parents.join("/")), true, None)?.host;
        if fs::symlink_metadata(&parent).is_err() {
            mkdir_all(dest, &parent, 0o755, None, None)?;
        }
        let target = parent.join(base);
        let existing = fs::symlink_metadata(&target).ok();
        if let Some(m) = &existing {
            if !(m.is_dir() && kind == EntryType::Directory) {
                remove_all(&target)?;
            }
        }
        let mode = header.mode().map_err(err)? & 0o7777;
        let mtime = header
            .mtime()
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mtime = timestamp.unwrap_or(mtime);
        let mut chmod = true;
        match kind {
            EntryType::Directory => {
                if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    fs::create_dir(&target).map_err(|source| FileOpError::CreateDir {
                        path: target.clone(),
                        source,
                    })?;
                }
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let mut out = File::create_new(&target).map_err(|source| FileOpError::Write {
                    path: target.clone(),
                    source,
                })?;
                io::copy(&mut entry, &mut out).map_err(|source| FileOpError::Write {
                    path: target.clone(),
                    source,
                })?;
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .map(|b| b.into_owned())
                    .unwrap_or_default();
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&link), &target).map_err(
                    |source| FileOpError::Symlink {
                        path: target.clone(),
                        source,
                    },
                )?;
                chmod = false;
            }
            EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .map(|b| b.into_owned())
                    .unwrap_or_default();
                let link = String::from_utf8_lossy(&link).into_owned();
                let old = resolve::in_root(dest, &link, false, None)?.host;
                fs::hard_link(&old, &target).map_err(|source| FileOpError::HardLink {
                    path: target.clone(),
                    target: old.clone(),
                    source,
                })?;
                chmod = fs::symlink_metadata(&old).is_ok_and(|m| !m.file_type().is_symlink());
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let file_type = match kind {
                    EntryType::Char => FileType::CharacterDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let dev = rustix::fs::makedev(major, minor);
                rustix::fs::mknodat(CWD, &target, file_type, Mode::from_raw_mode(mode), dev).map_err(
                    |e| FileOpError::Mknod {
                        path: target.clone(),
                        source: e.into(),
                    },
                )?;
            }
            other => {
                return Err(FileOpError::ArchiveEntryType {
                    archive: path.to_path_buf(),
                    entry: name.clone(),
                    kind: other.as_byte(),
                })
            }
        }
        let (uid, gid) = (
            header.uid().map_err(err)? as u32,
            header.gid().map_err(err)? as u32,
        );
        lchown(&target, uid, gid)?;
        if chmod {
            set_mode(&target, mode)?;
        }
        if kind == EntryType::Directory {
            dirs.push((target, mtime));
        } else if kind != EntryType::Link || chmod {
            set_times(&target, mtime, mtime)?;
        }
    }
    // Directory times last: creating their entries changed them.
    for (dir, mtime) in dirs.iter().rev() {
        set_times(dir, *mtime, *mtime)?;
    }
    Ok(())
}
