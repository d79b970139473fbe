//! A container's filesystem from the outside: `diff`, `export`, `commit` and `cp`.
//!
//! The container's root is an overlay of the image's snapshot dirs (`lower`, top first) and its
//! own `upper` dir. `diff` and `commit` read `upper` directly; `export` and `cp` of a stopped
//! container read (or write) a private overlay mount of it, which needs the calling process to be
//! in a mount namespace of its own (`kiln_runtime::host::enter_private_mount_namespace`); `cp`
//! with a running container goes through `/proc/PID/root`.
//!
//! kiln's own mount points (`/proc`, `/sys`, `/dev`, the `/etc` files the runtime bind-mounts,
//! volume and bind targets) that the runtime had to create in the upper dir are left out of
//! `diff` and `commit`, as Docker's init layer keeps them out of the container's layer.
//!
//! Architecture Invariant: `cp` never reads or writes outside the container's root. Paths are
//! resolved with `openat2(RESOLVE_IN_ROOT)` from a descriptor of the root (symlinks, `..` and
//! absolute link targets stay inside), and everything below the resolved node is walked or
//! written with `O_NOFOLLOW` relative to descriptors.

mod commit;
mod cp;
mod diff;
mod export;

pub use commit::*;
pub use cp::*;
pub use diff::*;
pub use export::*;

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use kiln_cache::images::{Image, LayerRef};
use kiln_cache::layer::{self, DiffOptions, LayerStats};
use kiln_cache::oci_spec;
use kiln_dag::image::ImageConfig;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::sys::stat::{fstatat, mknodat, utimensat, FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};

use crate::record::RootfsPaths;

/// The paths kiln's runtime mounts over in every container.
pub const RUNTIME_MOUNT_POINTS: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
];

const OPAQUE_XATTRS: &[&str] = &["trusted.overlay.opaque", "user.overlay.opaque"];

/// Which side of a `cp` a path is on, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// The host.
    Host,
    /// A container, by the name the user gave.
    Container(String),
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Host => f.write_str("the host"),
            Place::Container(c) => write!(f, "container {c}"),
        }
    }
}

/// Errors of the filesystem operations.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A file's metadata could not be read.
    #[error("failed to stat `{path}`")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A directory could not be listed.
    #[error("failed to list `{path}`")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Copying a file or directory failed.
    #[error("failed to copy `{from}` to `{to}`")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The temporary mount point could not be made.
    #[error("failed to create mount point `{path}`")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The overlay view could not be mounted.
    #[error("failed to mount the container's filesystem")]
    Mount(#[source] kiln_runtime::host::HostError),
    /// Writing the tar failed.
    #[error("failed to write the container's filesystem as a tar")]
    Tar(#[source] layer::WriteError),
    /// Writing the layer blob failed.
    #[error("failed to store the new layer")]
    StoreLayer(#[source] Box<kiln_cache::content::ContentError>),
    /// Recording the image failed.
    #[error("failed to create the image")]
    CreateImage(#[source] Box<kiln_cache::images::ImageError>),
    /// Stopping or continuing the container's processes failed.
    #[error("failed to {action} process {pid}")]
    Signal {
        action: &'static str,
        pid: i32,
        #[source]
        source: io::Error,
    },
    /// The copy root could not be opened.
    #[error("failed to open `{path}`")]
    OpenRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A `cp` source does not exist.
    #[error("{}", not_found_message(.place, .path))]
    NotFound { place: Place, path: String },
    /// A path could not be resolved inside the root.
    #[error("failed to resolve `{path}` in {place}")]
    Resolve {
        place: Place,
        path: String,
        #[source]
        source: io::Error,
    },
    /// More than 40 symlinks on a path.
    #[error("too many levels of symbolic links resolving `{path}` in {place}")]
    SymlinkLoop { place: Place, path: String },
    /// `SRC/` or `DEST/` names something that is not a directory.
    #[error("not a directory: `{path}`")]
    NotADirectory { path: String },
    /// A destination directory that must exist does not.
    #[error("no such directory: `{path}`")]
    NoSuchDirectory { path: String },
    /// A directory copied onto a file.
    #[error("cannot copy a directory to a file: `{path}`")]
    DirOntoFile { path: String },
    /// A file written where a directory is.
    #[error("cannot overwrite directory `{path}` with non-directory")]
    FileOntoDir { path: String },
    /// A tar entry with `..` or another name that would leave the destination.
    #[error("invalid tar entry name `{0}`")]
    BadEntryName(String),
    /// Reading the input tar failed.
    #[error("failed to read the input tar")]
    ReadTar(#[source] io::Error),
    /// Writing the output tar failed.
    #[error("failed to write the output tar")]
    WriteTar(#[source] io::Error),
    /// Reading a file or directory of the source failed.
    #[error("failed to read `{path}` in {place}")]
    ReadSource {
        place: Place,
        path: String,
        #[source]
        source: io::Error,
    },
    /// Writing a file or directory of the destination failed.
    #[error("failed to write `{path}` in {place}")]
    WriteDest {
        place: Place,
        path: String,
        #[source]
        source: io::Error,
    },
}

fn not_found_message(place: &Place, path: &str) -> String {
    match place {
        Place::Host => format!("lstat {path}: no such file or directory"),
        Place::Container(name) => format!("Could not find the file {path} in container {name}"),
    }
}

type Result<T> = std::result::Result<T, FsError>;

fn rio(e: Errno) -> io::Error {
    io::Error::from(e)
}

/// Permission bits as a [`Mode`].
fn mode(bits: u32) -> Mode {
    Mode::from_bits_truncate(bits)
}

fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(path: &Path) -> bool {
    OPAQUE_XATTRS
        .iter()
        .any(|name| matches!(xattr::get(path, name), Ok(Some(v)) if v == b"y"))
}

fn lstat(path: &Path) -> Option<fs::Metadata> {
    fs::symlink_metadata(path).ok()
}

/// Normal components of a relative or absolute path (`.` dropped, `..` popped).
fn rel_of(path: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// A stack of overlay layer dirs (top first) read without mounting it.
struct Stack<'a> {
    layers: &'a [PathBuf],
}

impl Stack<'_> {
    /// The layer dirs that contribute entries to directory `rel`, top first: down to the first
    /// one where it is opaque, stopping where a whiteout or a non-directory hides it.
    fn dir_layers(&self, rel: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for layer in self.layers {
            let mut p = layer.clone();
            let mut present = true;
            let mut opaque = false;
            for c in rel.components() {
                p.push(c);
                match lstat(&p) {
                    None => {
                        present = false;
                        break;
                    }
                    Some(m) if is_whiteout(&m) || !m.is_dir() => return out,
                    Some(_) => opaque |= is_opaque(&p),
                }
            }
            if present {
                out.push(p);
            }
            if opaque {
                return out;
            }
        }
        out
    }

    /// The topmost entry at `rel` (`None` if absent or deleted).
    fn lookup(&self, rel: &Path) -> Option<(PathBuf, fs::Metadata)> {
        let name = rel.file_name()?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        for dir in self.dir_layers(parent) {
            let p = dir.join(name);
            if let Some(m) = lstat(&p) {
                return if is_whiteout(&m) { None } else { Some((p, m)) };
            }
        }
        None
    }

    /// The merged entries of directory `rel`: name -> host path of the topmost entry.
    fn children(&self, rel: &Path) -> Result<BTreeMap<OsString, PathBuf>> {
        let mut out = BTreeMap::new();
        let mut deleted = HashSet::new();
        for dir in self.dir_layers(rel) {
            let entries = fs::read_dir(&dir).map_err(|source| FsError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            for e in entries {
                let e = e.map_err(|source| FsError::ReadDir {
                    path: dir.clone(),
                    source,
                })?;
                let name = e.file_name();
                if out.contains_key(&name) || deleted.contains(&name) {
                    continue;
                }
                let p = e.path();
                match lstat(&p) {
                    Some(m) if is_whiteout(&m) => {
                        deleted.insert(name);
                    }
                    Some(_) => {
                        out.insert(name, p);
                    }
                    None => {}
                }
            }
        }
        Ok(out)
    }
}

/// Copies the image's content at `target` (read from the layer dirs `lower`, top first) into
/// `dest`, a new volume's directory, as Docker does on a volume's first use: only when `dest`
/// is empty and the image has a directory there; `dest` takes the directory's owner and mode.
pub fn copy_image_content(lower: &[PathBuf], target: &str, dest: &Path) -> Result<()> {
    let mut entries = fs::read_dir(dest).map_err(|source| FsError::ReadDir {
        path: dest.to_path_buf(),
        source,
    })?;
    if entries.next().is_some() {
        return Ok(());
    }
    let stack = Stack { layers: lower };
    let rel = rel_of(target);
    let Some((src, meta)) = stack.lookup(&rel) else {
        return Ok(());
    };
    if !meta.is_dir() {
        return Ok(());
    }
    copy_merged(&stack, &rel, dest)?;
    apply_meta(&src, dest, &meta)
}

fn copy_merged(stack: &Stack<'_>, rel: &Path, dest: &Path) -> Result<()> {
    for (name, src) in stack.children(rel)? {
        let to = dest.join(&name);
        let meta = fs::symlink_metadata(&src).map_err(|source| FsError::Stat {
            path: src.clone(),
            source,
        })?;
        let err = |source| FsError::Copy {
            from: src.clone(),
            to: to.clone(),
            source,
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir(&to).map_err(err)?;
            copy_merged(stack, &rel.join(&name), &to)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&src).map_err(err)?;
            std::os::unix::fs::symlink(&target, &to).map_err(err)?;
        } else if ft.is_file() {
            fs::copy(&src, &to).map_err(err)?;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            let kind = if ft.is_char_device() {
                SFlag::S_IFCHR
            } else if ft.is_block_device() {
                SFlag::S_IFBLK
            } else {
                SFlag::S_IFIFO
            };
            mknodat(AT_FDCWD, &to, kind, mode(meta.mode() & 0o7777), meta.rdev()).map_err(|e| err(rio(e)))?;
        } else {
            // Sockets are not copied.
            continue;
        }
        apply_meta(&src, &to, &meta)?;
    }
    Ok(())
}

/// Owner, mode and times of `meta` onto `to` (not following a symlink at `to`).
fn apply_meta(from: &Path, to: &Path, meta: &fs::Metadata) -> Result<()> {
    let err = |source| FsError::Copy {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    nix::unistd::fchownat(
        AT_FDCWD,
        to,
        Some(Uid::from_raw(meta.uid())),
        Some(Gid::from_raw(meta.gid())),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| err(rio(e)))?;
    if !meta.file_type().is_symlink() {
        nix::sys::stat::fchmodat(
            AT_FDCWD,
            to,
            mode(meta.mode() & 0o7777),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| err(rio(e)))?;
    }
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    utimensat(AT_FDCWD, to, &atime, &mtime, UtimensatFlags::NoFollowSymlink).map_err(|e| err(rio(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn whiteout(path: &Path) {
        mknodat(AT_FDCWD, path, SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn stack_merges_whiteouts_and_opaque_dirs() {
        if !is_root() {
            eprintln!("skipped: whiteouts need root (mknod)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (top, bottom) = (t.path().join("top"), t.path().join("bottom"));
        fs::create_dir_all(bottom.join("d/sub")).unwrap();
        fs::write(bottom.join("d/a"), "a").unwrap();
        fs::write(bottom.join("d/b"), "b").unwrap();
        fs::create_dir_all(bottom.join("o")).unwrap();
        fs::write(bottom.join("o/hidden"), "x").unwrap();
        fs::create_dir_all(top.join("d")).unwrap();
        fs::create_dir_all(top.join("o")).unwrap();
        whiteout(&top.join("d/a"));
        fs::write(top.join("d/c"), "c").unwrap();
        xattr::set(top.join("o"), "trusted.overlay.opaque", b"y").unwrap();
        fs::write(top.join("o/new"), "n").unwrap();
        let layers = [top.clone(), bottom.clone()];
        let s = Stack { layers: &layers };
        let names: Vec<String> = s
            .children(Path::new("d"))
            .unwrap()
            .keys()
            .map(|k| k.to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["b", "c", "sub"]);
        assert!(s.lookup(Path::new("d/a")).is_none());
        assert_eq!(s.lookup(Path::new("d/b")).unwrap().0, bottom.join("d/b"));
        assert!(s.lookup(Path::new("o/hidden")).is_none());
        assert!(s.lookup(Path::new("o/new")).is_some());

        let dest = t.path().join("vol");
        fs::create_dir(&dest).unwrap();
        copy_image_content(&layers, "/d", &dest).unwrap();
        let mut got: Vec<String> = fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        got.sort();
        assert_eq!(got, ["b", "c", "sub"]);
        // Not again into a non-empty volume.
        fs::remove_file(dest.join("b")).unwrap();
        copy_image_content(&layers, "/d", &dest).unwrap();
        assert!(!dest.join("b").exists());
    }

    #[test]
    fn diff_reports_like_docker_and_skips_kiln_mount_points() {
        if !is_root() {
            eprintln!("skipped: whiteouts need root (mknod)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let lower = t.path().join("lower");
        let upper = t.path().join("upper");
        for d in ["bin", "etc", "proc", "tmp"] {
            fs::create_dir_all(lower.join(d)).unwrap();
        }
        fs::write(lower.join("bin/ls"), "ls").unwrap();
        fs::write(lower.join("etc/passwd"), "root").unwrap();
        fs::create_dir_all(upper.join("bin")).unwrap();
        whiteout(&upper.join("bin/ls"));
        fs::write(upper.join("a"), "").unwrap();
        fs::create_dir_all(upper.join("etc")).unwrap();
        fs::write(upper.join("etc/hosts"), "").unwrap();
        fs::write(upper.join("etc/hostname"), "").unwrap();
        fs::create_dir_all(upper.join("sys")).unwrap();
        fs::create_dir_all(upper.join("data/x")).unwrap();
        fs::create_dir_all(upper.join("newdir")).unwrap();
        fs::write(upper.join("newdir/f"), "f").unwrap();
        let rootfs = RootfsPaths {
            lower: vec![lower.clone()],
            upper: upper.clone(),
            work: t.path().join("work"),
        };
        let excluded = created_mount_points(&rootfs, &["/data/x".into()]);
        let ex: Vec<String> = excluded.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(ex, ["data", "etc/hostname", "etc/hosts", "sys"]);
        let lines: Vec<String> = diff(&rootfs, &["/data/x".into()])
            .unwrap()
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(lines, ["A /a", "C /bin", "D /bin/ls", "A /newdir", "A /newdir/f"]);
    }

    #[test]
    fn copy_resolves_inside_the_root_and_follows_docker_rules() {
        let t = tempfile::tempdir().unwrap();
        let ctr = t.path().join("ctr");
        let host = t.path().join("host");
        fs::create_dir_all(ctr.join("etc")).unwrap();
        fs::create_dir_all(ctr.join("data/sub")).unwrap();
        fs::write(ctr.join("etc/passwd"), "inside").unwrap();
        fs::write(ctr.join("data/sub/f"), "f").unwrap();
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("passwd"), "host secret").unwrap();
        // A symlink pointing "outside": resolved in the container root it is /etc/passwd there.
        symlink(host.join("passwd"), ctr.join("escape")).unwrap();
        symlink("../../../../../../etc", ctr.join("up")).unwrap();
        let croot = CopyRoot::open(&ctr, Place::Container("c".into())).unwrap();
        let hroot = CopyRoot::open(Path::new("/"), Place::Host).unwrap();
        let opts = CopyOptions {
            follow_link: true,
            owner: Owner::Caller,
        };
        let out = host.join("out");
        copy(&croot, "/escape", &hroot, out.to_str().unwrap(), opts).unwrap_err();
        fs::create_dir_all(ctr.join(host.strip_prefix("/").unwrap())).unwrap();
        fs::write(
            ctr.join(host.strip_prefix("/").unwrap()).join("passwd"),
            "decoy inside",
        )
        .unwrap();
        copy(&croot, "/escape", &hroot, out.to_str().unwrap(), opts).unwrap();
        assert_eq!(fs::read_to_string(&out).unwrap(), "decoy inside");
        copy(&croot, "up/passwd", &hroot, out.to_str().unwrap(), opts).unwrap();
        assert_eq!(fs::read_to_string(&out).unwrap(), "inside");
        // Without -L the link itself is copied.
        let link_out = host.join("link");
        copy(
            &croot,
            "/escape",
            &hroot,
            link_out.to_str().unwrap(),
            CopyOptions {
                follow_link: false,
                ..opts
            },
        )
        .unwrap();
        assert!(fs::symlink_metadata(&link_out).unwrap().file_type().is_symlink());

        // Directory rules.
        let d1 = host.join("d1");
        copy(&croot, "/data", &hroot, d1.to_str().unwrap(), opts).unwrap();
        assert_eq!(fs::read_to_string(d1.join("sub/f")).unwrap(), "f");
        copy(&croot, "/data", &hroot, d1.to_str().unwrap(), opts).unwrap();
        assert_eq!(fs::read_to_string(d1.join("data/sub/f")).unwrap(), "f");
        let d2 = host.join("d2");
        fs::create_dir(&d2).unwrap();
        copy(&croot, "/data/.", &hroot, d2.to_str().unwrap(), opts).unwrap();
        assert!(d2.join("sub/f").exists());
        let err = copy(&croot, "/data", &hroot, out.to_str().unwrap(), opts).unwrap_err();
        assert!(matches!(err, FsError::DirOntoFile { .. }), "{err}");
        let err = copy(
            &croot,
            "/etc/passwd",
            &hroot,
            host.join("nodir/").to_str().unwrap(),
            opts,
        )
        .unwrap_err();
        assert!(matches!(err, FsError::NoSuchDirectory { .. }), "{err}");
        let err = copy(&croot, "/etc/passwd/", &hroot, d2.to_str().unwrap(), opts).unwrap_err();
        assert!(matches!(err, FsError::NotADirectory { .. }), "{err}");
        let err = copy(&croot, "/nope", &hroot, d2.to_str().unwrap(), opts).unwrap_err();
        assert_eq!(err.to_string(), "Could not find the file /nope in container c");

        // Into the container: a destination symlink pointing outside stays inside.
        let into = host.join("in.txt");
        fs::write(&into, "payload").unwrap();
        symlink("/tmp-outside-target", ctr.join("dlink")).unwrap();
        copy(&hroot, into.to_str().unwrap(), &croot, "/dlink", opts).unwrap();
        assert_eq!(
            fs::read_to_string(ctr.join("tmp-outside-target")).unwrap(),
            "payload"
        );
        assert!(!Path::new("/tmp-outside-target").exists());

        // Tar both ways.
        let mut tar_bytes = Vec::new();
        copy_to_tar(&croot, "/data", false, &mut tar_bytes).unwrap();
        let d3 = host.join("d3");
        fs::create_dir(&d3).unwrap();
        copy_from_tar(&tar_bytes[..], &hroot, d3.to_str().unwrap(), Owner::Caller).unwrap();
        assert_eq!(fs::read_to_string(d3.join("data/sub/f")).unwrap(), "f");
        let mut evil = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // `append_data` refuses `..`: write the name into the header directly.
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        evil.append(&h, &b"x"[..]).unwrap();
        let evil = evil.into_inner().unwrap();
        let err = copy_from_tar(&evil[..], &croot, "/data", Owner::Fixed(0, 0)).unwrap_err();
        assert!(matches!(err, FsError::BadEntryName(_)), "{err}");
    }
}
