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
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

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

fn rio(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(path: &Path) -> bool {
    let mut buf = [0u8; 4];
    OPAQUE_XATTRS
        .iter()
        .any(|name| matches!(rustix::fs::lgetxattr(path, *name, &mut buf[..]), Ok(1) if buf[0] == b'y'))
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
                FileType::CharacterDevice
            } else if ft.is_block_device() {
                FileType::BlockDevice
            } else {
                FileType::Fifo
            };
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &to,
                kind,
                Mode::from_raw_mode(meta.mode() & 0o7777),
                meta.rdev(),
            )
            .map_err(|e| err(rio(e)))?;
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
    let cwd = rustix::fs::CWD;
    rustix::fs::chownat(
        cwd,
        to,
        Some(rustix::fs::Uid::from_raw(meta.uid())),
        Some(rustix::fs::Gid::from_raw(meta.gid())),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| err(rio(e)))?;
    if !meta.file_type().is_symlink() {
        rustix::fs::chmodat(
            cwd,
            to,
            Mode::from_raw_mode(meta.mode() & 0o7777),
            AtFlags::empty(),
        )
        .map_err(|e| err(rio(e)))?;
    }
    let ts = Timestamps {
        last_access: Timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec(),
        },
        last_modification: Timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec(),
        },
    };
    rustix::fs::utimensat(cwd, to, &ts, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| err(rio(e)))
}

/// The kind of a `diff` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// `C`: changed.
    Modified,
    /// `A`: added.
    Added,
    /// `D`: deleted.
    Deleted,
}

/// One line of `kiln diff`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// What happened.
    pub kind: ChangeKind,
    /// Absolute path in the container.
    pub path: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = match self.kind {
            ChangeKind::Modified => 'C',
            ChangeKind::Added => 'A',
            ChangeKind::Deleted => 'D',
        };
        write!(f, "{k} {}", self.path)
    }
}

fn dir_is_empty(path: &Path) -> bool {
    fs::read_dir(path)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

/// The paths (relative to the upper dir) that kiln created as mount points and that must stay
/// out of `diff` and `commit`: each of [`RUNTIME_MOUNT_POINTS`] and `mount_targets` that is an
/// empty file or directory in the upper dir and absent from the image, plus the parents created
/// only to hold them.
pub fn created_mount_points(rootfs: &RootfsPaths, mount_targets: &[String]) -> Vec<PathBuf> {
    let stack = Stack {
        layers: &rootfs.lower,
    };
    let mut excluded: Vec<PathBuf> = Vec::new();
    let targets = RUNTIME_MOUNT_POINTS
        .iter()
        .map(|s| s.to_string())
        .chain(mount_targets.iter().cloned());
    for t in targets {
        let rel = rel_of(&t);
        if rel.as_os_str().is_empty() || excluded.iter().any(|e| rel.starts_with(e)) {
            continue;
        }
        let p = rootfs.upper.join(&rel);
        let Some(m) = lstat(&p) else { continue };
        let empty = (m.is_file() && m.len() == 0) || (m.is_dir() && dir_is_empty(&p));
        if !empty || is_whiteout(&m) || stack.lookup(&rel).is_some() {
            continue;
        }
        let mut top = rel.clone();
        excluded.push(rel);
        // Parents that exist only because of excluded entries go too.
        while let Some(parent) = top.parent().filter(|p| !p.as_os_str().is_empty()) {
            let parent = parent.to_path_buf();
            if stack.lookup(&parent).is_some() {
                break;
            }
            let all_excluded = fs::read_dir(rootfs.upper.join(&parent))
                .map(|entries| {
                    entries
                        .flatten()
                        .all(|e| excluded.iter().any(|x| *x == parent.join(e.file_name())))
                })
                .unwrap_or(false);
            if !all_excluded {
                break;
            }
            excluded.retain(|x| !x.starts_with(&parent));
            excluded.push(parent.clone());
            top = parent;
        }
    }
    excluded.sort();
    excluded
}

/// Docker's `diff` of a container: its upper dir against the image's layers, in walk order
/// (names sorted within each directory, a directory before its contents), with a changed
/// entry's unchanged parent reported `C`. `mount_targets` are the container's mount points (see
/// [`created_mount_points`]).
pub fn diff(rootfs: &RootfsPaths, mount_targets: &[String]) -> Result<Vec<Change>> {
    let excluded = created_mount_points(rootfs, mount_targets);
    let mut d = Differ {
        stack: Stack {
            layers: &rootfs.lower,
        },
        upper: &rootfs.upper,
        excluded: &excluded,
        changed_dirs: HashSet::new(),
        out: Vec::new(),
    };
    d.walk(Path::new(""))?;
    Ok(d.out)
}

struct Differ<'a> {
    stack: Stack<'a>,
    upper: &'a Path,
    excluded: &'a [PathBuf],
    changed_dirs: HashSet<PathBuf>,
    out: Vec<Change>,
}

impl Differ<'_> {
    fn sorted_children(&self, rel: &Path) -> Result<Vec<OsString>> {
        let dir = self.upper.join(rel);
        let entries = fs::read_dir(&dir).map_err(|source| FsError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        let mut names = Vec::new();
        for e in entries {
            let e = e.map_err(|source| FsError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            names.push(e.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(names)
    }

    fn walk(&mut self, rel: &Path) -> Result<()> {
        for name in self.sorted_children(rel)? {
            let path = rel.join(&name);
            if self.excluded.contains(&path) {
                continue;
            }
            let host = self.upper.join(&path);
            let meta = fs::symlink_metadata(&host).map_err(|source| FsError::Stat {
                path: host.clone(),
                source,
            })?;
            let lower = self.stack.lookup(&path);
            // An opaque directory over one of the image's is reported deleted (its old
            // contents are gone), as Docker's overlay diff does.
            let deleted = is_whiteout(&meta) || (meta.is_dir() && lower.is_some() && is_opaque(&host));
            let kind = if deleted {
                Some(ChangeKind::Deleted)
            } else {
                match &lower {
                    None => Some(ChangeKind::Added),
                    Some((_, l)) if l.is_dir() && meta.is_dir() && self.same_dir(&path, &meta, l)? => None,
                    Some(_) => Some(ChangeKind::Modified),
                }
            };
            if let Some(kind) = kind {
                if meta.is_dir() {
                    self.changed_dirs.insert(path.clone());
                }
                if kind != ChangeKind::Modified {
                    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                        if self.changed_dirs.insert(parent.to_path_buf()) {
                            self.out.push(Change {
                                kind: ChangeKind::Modified,
                                path: format!("/{}", parent.display()),
                            });
                        }
                    }
                }
                self.out.push(Change {
                    kind,
                    path: format!("/{}", path.display()),
                });
            }
            if meta.is_dir() {
                self.walk(&path)?;
            }
        }
        Ok(())
    }

    /// Docker's test for a directory that is only in the upper dir because something below it
    /// changed: same size, mode and mtime as the image's. A directory holding nothing but
    /// kiln's mount points, with the image's mode, also counts as unchanged.
    fn same_dir(&self, rel: &Path, upper: &fs::Metadata, lower: &fs::Metadata) -> Result<bool> {
        if upper.mode() != lower.mode() {
            return Ok(false);
        }
        let same_time = upper.mtime() == lower.mtime()
            && (upper.mtime_nsec() == lower.mtime_nsec()
                || upper.mtime_nsec() == 0
                || lower.mtime_nsec() == 0);
        if upper.size() == lower.size() && same_time {
            return Ok(true);
        }
        let children = self.sorted_children(rel)?;
        Ok(!children.is_empty() && children.iter().all(|c| self.excluded.contains(&rel.join(c))))
    }
}

/// A temporary overlay mount of a container's root filesystem, unmounted on drop.
#[derive(Debug)]
pub struct View {
    path: PathBuf,
    extra: Option<PathBuf>,
    mounted: bool,
}

impl View {
    /// Where the container's root is visible.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if self.mounted {
            let _ = kiln_runtime::host::unmount(&self.path);
        }
        let _ = fs::remove_dir(&self.path);
        if let Some(e) = &self.extra {
            let _ = fs::remove_dir(e);
        }
    }
}

/// Mounts the container's root filesystem at a temporary directory beside its upper dir:
/// writable through the upper and work dirs (only while the container is not running), or
/// read-only with the upper dir as the top lower layer (safe while it runs). The caller must be
/// in a private mount namespace.
pub fn mount_view(rootfs: &RootfsPaths, writable: bool) -> Result<View> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let base = rootfs.upper.parent().unwrap_or(Path::new("/tmp"));
    let tag = format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let path = base.join(format!(".view-{tag}"));
    fs::create_dir(&path).map_err(|source| FsError::MountPoint {
        path: path.clone(),
        source,
    })?;
    let mut view = View {
        path,
        extra: None,
        mounted: false,
    };
    let mut lower: Vec<PathBuf> = Vec::new();
    if !writable {
        lower.push(rootfs.upper.clone());
    }
    lower.extend(rootfs.lower.iter().cloned());
    // A read-only overlay needs two lower dirs, a writable one at least one.
    if lower.len() < if writable { 1 } else { 2 } {
        let empty = base.join(format!(".view-{tag}-empty"));
        fs::create_dir(&empty).map_err(|source| FsError::MountPoint {
            path: empty.clone(),
            source,
        })?;
        lower.push(empty.clone());
        view.extra = Some(empty);
    }
    let uw = writable.then_some((rootfs.upper.as_path(), rootfs.work.as_path()));
    kiln_runtime::host::mount_overlay(&view.path, &lower, uw, false).map_err(FsError::Mount)?;
    view.mounted = true;
    Ok(view)
}

/// Writes the container's merged filesystem as a tar (`kiln export`). kiln's mount points are
/// there as the empty files and directories the runtime created; volumes are not included.
/// Needs a private mount namespace (see [`mount_view`]).
pub fn export<W: Write + Send>(rootfs: &RootfsPaths, out: W) -> Result<LayerStats> {
    let view = mount_view(rootfs, false)?;
    layer::write_tree(view.path(), out, &DiffOptions::default()).map_err(FsError::Tar)
}

/// Writes the container's upper dir (without kiln's mount points) as a new layer on top of
/// `base`'s layers and records an image with `config` (whose history the caller has extended).
/// The image is untagged.
pub fn commit(
    store: &kiln_cache::Store,
    base: &Image,
    rootfs: &RootfsPaths,
    mount_targets: &[String],
    config: &ImageConfig,
) -> Result<Image> {
    let opts = DiffOptions {
        source_date_epoch: None,
        exclude: created_mount_points(rootfs, mount_targets),
        donor: None,
    };
    let mut writer = store
        .content()
        .prehashed_writer()
        .map_err(|e| FsError::StoreLayer(Box::new(e)))?;
    let stats = layer::write_diff(&rootfs.upper, &mut writer, &opts).map_err(FsError::Tar)?;
    let staged = writer
        .finish(Some(&stats.diff_id))
        .map_err(|e| FsError::StoreLayer(Box::new(e)))?;
    let size = staged.size();
    let blob = staged.commit().map_err(|e| FsError::StoreLayer(Box::new(e)))?;
    let mut layers: Vec<LayerRef> = base
        .layers
        .iter()
        .map(|l| LayerRef {
            digest: l.digest,
            diff_id: l.diff_id,
            size: l.descriptor.size(),
            media_type: l.descriptor.media_type().clone(),
        })
        .collect();
    layers.push(LayerRef {
        digest: blob,
        diff_id: stats.diff_id,
        size,
        media_type: oci_spec::image::MediaType::ImageLayer,
    });
    store
        .images()
        .create(config, &layers)
        .map_err(|e| FsError::CreateImage(Box::new(e)))
}

/// The processes of a container stopped with `SIGSTOP` (`commit --pause`), continued on drop.
#[derive(Debug)]
pub struct Paused {
    pids: Vec<i32>,
}

impl Drop for Paused {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }
}

/// Stops every process in the pid namespace of `pid` (the container's pid 1 as the host sees
/// it) until the returned guard is dropped.
pub fn pause(pid: i32) -> Result<Paused> {
    let ns = fs::read_link(format!("/proc/{pid}/ns/pid")).map_err(|source| FsError::Signal {
        action: "pause",
        pid,
        source,
    })?;
    let mut paused = Paused { pids: Vec::new() };
    let entries = fs::read_dir("/proc").map_err(|source| FsError::ReadDir {
        path: "/proc".into(),
        source,
    })?;
    for e in entries.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if fs::read_link(format!("/proc/{p}/ns/pid")).ok().as_ref() != Some(&ns) {
            continue;
        }
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGSTOP) {
            Ok(()) => paused.pids.push(p),
            Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                return Err(FsError::Signal {
                    action: "pause",
                    pid: p,
                    source: io::Error::from(e),
                })
            }
        }
    }
    Ok(paused)
}

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

/// A root directory paths of a `cp` are resolved in: `/` for the host, the container's
/// `/proc/PID/root` or a [`View`].
#[derive(Debug)]
pub struct CopyRoot {
    fd: OwnedFd,
    place: Place,
}

impl CopyRoot {
    /// Opens `path` as the root for `place`.
    pub fn open(path: &Path, place: Place) -> Result<CopyRoot> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::OpenRoot {
            path: path.to_path_buf(),
            source: rio(e),
        })?;
        Ok(CopyRoot { fd, place })
    }
}

/// Whose uid/gid files written by `cp` get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// The source's (`cp -a`).
    Keep,
    /// These (root's, for files copied into a container).
    Fixed(u32, u32),
    /// The calling process's (files copied to the host).
    Caller,
}

/// Options of [`copy`].
#[derive(Clone, Copy, Debug)]
pub struct CopyOptions {
    /// `-L`: follow a symlink named as the source.
    pub follow_link: bool,
    /// Ownership of what is written.
    pub owner: Owner,
}

/// A path as given, with Docker's meaning of its ending.
struct PathArg {
    /// Components, `.` dropped (`..` kept: the kernel clamps it at the root).
    parts: Vec<String>,
    /// Ends in `/.`: the directory's contents.
    contents: bool,
    /// Ends in `/`: must be a directory.
    dir: bool,
    shown: String,
}

impl PathArg {
    fn parse(p: &str) -> PathArg {
        let contents = p == "." || p.ends_with("/.");
        let dir = p.ends_with('/') || contents;
        let parts = p
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .map(str::to_string)
            .collect();
        PathArg {
            parts,
            contents,
            dir,
            shown: p.to_string(),
        }
    }
}

/// A resolved node: an entry `name` of the directory `parent` (`.` for a directory node).
struct Node {
    parent: OwnedFd,
    name: CString,
    /// `lstat` of the node, `None` if it does not exist.
    stat: Option<rustix::fs::Stat>,
    /// Its path inside the root (for the basename).
    parts: Vec<String>,
}

fn cstring(s: &[u8], place: &Place, shown: &str) -> Result<CString> {
    CString::new(s).map_err(|_| FsError::Resolve {
        place: place.clone(),
        path: shown.to_string(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

fn ftype(st: &rustix::fs::Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Resolves `parts` in `root`: every component but the last is followed inside the root; the
/// last is followed when `follow`.
fn resolve(root: &CopyRoot, parts: &[String], follow: bool, shown: &str) -> Result<Node> {
    let mut parts = parts.to_vec();
    for _ in 0..40 {
        let rerr = |source: io::Error| FsError::Resolve {
            place: root.place.clone(),
            path: shown.to_string(),
            source,
        };
        let (parent_parts, last) = match parts.split_last() {
            Some((l, rest)) if l != ".." => (rest.to_vec(), l.clone()),
            _ => (parts.clone(), ".".to_string()),
        };
        let parent_path = if parent_parts.is_empty() {
            ".".to_string()
        } else {
            parent_parts.join("/")
        };
        let parent = match rustix::fs::openat2(
            &root.fd,
            parent_path.as_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => {
                return Err(FsError::NotFound {
                    place: root.place.clone(),
                    path: shown.to_string(),
                })
            }
            Err(rustix::io::Errno::NOTDIR) => {
                return Err(FsError::NotADirectory {
                    path: shown.to_string(),
                })
            }
            Err(e) => return Err(rerr(rio(e))),
        };
        let name = cstring(last.as_bytes(), &root.place, shown)?;
        let stat = match rustix::fs::statat(&parent, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Some(st),
            Err(rustix::io::Errno::NOENT) => None,
            Err(e) => return Err(rerr(rio(e))),
        };
        if follow && stat.as_ref().is_some_and(|s| ftype(s) == FileType::Symlink) {
            let target =
                rustix::fs::readlinkat(&parent, name.as_c_str(), Vec::new()).map_err(|e| rerr(rio(e)))?;
            let target = target.to_string_lossy().into_owned();
            let mut next: Vec<String> = if target.starts_with('/') {
                Vec::new()
            } else {
                parent_parts.clone()
            };
            next.extend(
                target
                    .split('/')
                    .filter(|s| !s.is_empty() && *s != ".")
                    .map(str::to_string),
            );
            parts = next;
            continue;
        }
        let mut node_parts = parent_parts;
        if last != "." {
            node_parts.push(last);
        }
        return Ok(Node {
            parent,
            name,
            stat,
            parts: node_parts,
        });
    }
    Err(FsError::SymlinkLoop {
        place: root.place.clone(),
        path: shown.to_string(),
    })
}

/// What an entry is.
enum EntryKind {
    Dir,
    File,
    Symlink(Vec<u8>),
    Hardlink(PathBuf),
    Device(FileType, u64),
}

/// An entry being copied: its metadata (mode is the permission bits).
struct Entry {
    kind: EntryKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
}

trait Sink {
    fn put(&mut self, rel: &Path, e: &Entry, data: &mut dyn Read) -> Result<()>;
    fn finish(&mut self) -> Result<()>;
}

fn entry_of(st: &rustix::fs::Stat, kind: EntryKind) -> Entry {
    Entry {
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: st.st_mtime,
        size: st.st_size.max(0) as u64,
    }
}

/// Emits the node `name` of `parent` (and everything below it) as `out`.
fn walk(
    place: &Place,
    parent: BorrowedFd<'_>,
    name: &CStr,
    out: &Path,
    shown: &Path,
    sink: &mut dyn Sink,
) -> Result<()> {
    let rerr = |source: io::Error| FsError::ReadSource {
        place: place.clone(),
        path: shown.display().to_string(),
        source,
    };
    let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| rerr(rio(e)))?;
    match ftype(&st) {
        FileType::Directory => {
            if !out.as_os_str().is_empty() {
                sink.put(out, &entry_of(&st, EntryKind::Dir), &mut io::empty())?;
            }
            let dfd = rustix::fs::openat(
                parent,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| rerr(rio(e)))?;
            let mut names: Vec<CString> = Vec::new();
            let dir = rustix::fs::Dir::read_from(&dfd).map_err(|e| rerr(rio(e)))?;
            for ent in dir {
                let ent = ent.map_err(|e| rerr(rio(e)))?;
                let n = ent.file_name();
                if n.to_bytes() != b"." && n.to_bytes() != b".." {
                    names.push(n.to_owned());
                }
            }
            names.sort();
            for n in names {
                let os = OsStr::from_bytes(n.to_bytes());
                walk(place, dfd.as_fd(), &n, &out.join(os), &shown.join(os), sink)?;
            }
            Ok(())
        }
        FileType::RegularFile => {
            let fd = rustix::fs::openat(
                parent,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
                Mode::empty(),
            )
            .map_err(|e| rerr(rio(e)))?;
            let mut file = fs::File::from(fd).take(st.st_size.max(0) as u64);
            sink.put(out, &entry_of(&st, EntryKind::File), &mut file)
        }
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(parent, name, Vec::new()).map_err(|e| rerr(rio(e)))?;
            let mut e = entry_of(&st, EntryKind::Symlink(target.into_bytes()));
            e.size = 0;
            sink.put(out, &e, &mut io::empty())
        }
        t @ (FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo) => {
            let mut e = entry_of(&st, EntryKind::Device(t, st.st_rdev));
            e.size = 0;
            sink.put(out, &e, &mut io::empty())
        }
        // Sockets and anything else are skipped, as tar does.
        _ => Ok(()),
    }
}

/// Writes entries below a destination directory, creating each name relative to descriptors
/// without following symlinks.
struct FsSink {
    base: OwnedFd,
    place: Place,
    shown: String,
    owner: Owner,
    dirs: Vec<(PathBuf, Entry)>,
}

impl FsSink {
    fn werr(&self, rel: &Path, source: io::Error) -> FsError {
        FsError::WriteDest {
            place: self.place.clone(),
            path: format!("{}/{}", self.shown.trim_end_matches('/'), rel.display()),
            source,
        }
    }

    /// The descriptor of `rel`'s parent directory and `rel`'s last name.
    fn parent_of(&self, rel: &Path) -> Result<(OwnedFd, CString)> {
        let mut comps: Vec<&OsStr> = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(s) => comps.push(s),
                _ => return Err(FsError::BadEntryName(rel.display().to_string())),
            }
        }
        let Some((last, dirs)) = comps.split_last() else {
            return Err(FsError::BadEntryName(rel.display().to_string()));
        };
        let mut fd = rustix::fs::openat(
            &self.base,
            c".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.werr(rel, rio(e)))?;
        for d in dirs {
            fd = rustix::fs::openat(
                &fd,
                *d,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.werr(rel, rio(e)))?;
        }
        let name =
            CString::new(last.as_bytes()).map_err(|_| FsError::BadEntryName(rel.display().to_string()))?;
        Ok((fd, name))
    }

    fn owner_of(&self, e: &Entry) -> Option<(rustix::fs::Uid, rustix::fs::Gid)> {
        let (u, g) = match self.owner {
            Owner::Keep => (e.uid, e.gid),
            Owner::Fixed(u, g) => (u, g),
            Owner::Caller => return None,
        };
        Some((rustix::fs::Uid::from_raw(u), rustix::fs::Gid::from_raw(g)))
    }

    /// Removes a non-directory at `name`; refuses to replace a directory with a non-directory.
    fn clear(&self, rel: &Path, dir: &OwnedFd, name: &CStr) -> Result<()> {
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if ftype(&st) == FileType::Directory => Err(FsError::FileOntoDir {
                path: rel.display().to_string(),
            }),
            Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(|e| self.werr(rel, rio(e))),
            Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(self.werr(rel, rio(e))),
        }
    }

    fn times(e: &Entry) -> Timestamps {
        let t = Timespec {
            tv_sec: e.mtime,
            tv_nsec: 0,
        };
        Timestamps {
            last_access: t,
            last_modification: t,
        }
    }

    fn finish_at(&self, rel: &Path, dir: &OwnedFd, name: &CStr, e: &Entry, symlink: bool) -> Result<()> {
        if let Some((u, g)) = self.owner_of(e) {
            rustix::fs::chownat(dir, name, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|err| self.werr(rel, rio(err)))?;
        }
        if !symlink {
            rustix::fs::chmodat(dir, name, Mode::from_raw_mode(e.mode), AtFlags::empty())
                .map_err(|err| self.werr(rel, rio(err)))?;
        }
        rustix::fs::utimensat(dir, name, &Self::times(e), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| self.werr(rel, rio(err)))
    }
}

impl Sink for FsSink {
    fn put(&mut self, rel: &Path, e: &Entry, data: &mut dyn Read) -> Result<()> {
        let (dir, name) = self.parent_of(rel)?;
        match &e.kind {
            EntryKind::Dir => {
                match rustix::fs::statat(&dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if ftype(&st) == FileType::Directory => {}
                    Ok(_) => {
                        return Err(FsError::DirOntoFile {
                            path: rel.display().to_string(),
                        })
                    }
                    Err(rustix::io::Errno::NOENT) => {
                        rustix::fs::mkdirat(&dir, name.as_c_str(), Mode::from_raw_mode(0o700))
                            .map_err(|err| self.werr(rel, rio(err)))?;
                    }
                    Err(err) => return Err(self.werr(rel, rio(err))),
                }
                self.dirs.push((
                    rel.to_path_buf(),
                    Entry {
                        kind: EntryKind::Dir,
                        ..*e
                    },
                ));
                Ok(())
            }
            EntryKind::File => {
                self.clear(rel, &dir, &name)?;
                let fd = rustix::fs::openat(
                    &dir,
                    name.as_c_str(),
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|err| self.werr(rel, rio(err)))?;
                let mut f = fs::File::from(fd);
                io::copy(data, &mut f).map_err(|err| self.werr(rel, err))?;
                if let Some((u, g)) = self.owner_of(e) {
                    rustix::fs::fchown(&f, Some(u), Some(g)).map_err(|err| self.werr(rel, rio(err)))?;
                }
                rustix::fs::fchmod(&f, Mode::from_raw_mode(e.mode))
                    .map_err(|err| self.werr(rel, rio(err)))?;
                rustix::fs::futimens(&f, &Self::times(e)).map_err(|err| self.werr(rel, rio(err)))
            }
            EntryKind::Symlink(target) => {
                self.clear(rel, &dir, &name)?;
                let target = CString::new(target.clone())
                    .map_err(|_| FsError::BadEntryName(rel.display().to_string()))?;
                rustix::fs::symlinkat(target.as_c_str(), &dir, name.as_c_str())
                    .map_err(|err| self.werr(rel, rio(err)))?;
                self.finish_at(rel, &dir, &name, e, true)
            }
            EntryKind::Hardlink(to) => {
                self.clear(rel, &dir, &name)?;
                let (tdir, tname) = self.parent_of(to)?;
                rustix::fs::linkat(&tdir, tname.as_c_str(), &dir, name.as_c_str(), AtFlags::empty())
                    .map_err(|err| self.werr(rel, rio(err)))
            }
            EntryKind::Device(t, rdev) => {
                self.clear(rel, &dir, &name)?;
                rustix::fs::mknodat(&dir, name.as_c_str(), *t, Mode::from_raw_mode(0o600), *rdev)
                    .map_err(|err| self.werr(rel, rio(err)))?;
                self.finish_at(rel, &dir, &name, e, false)
            }
        }
    }

    fn finish(&mut self) -> Result<()> {
        let dirs = std::mem::take(&mut self.dirs);
        for (rel, e) in dirs.iter().rev() {
            let (dir, name) = self.parent_of(rel)?;
            self.finish_at(rel, &dir, &name, e, false)?;
        }
        Ok(())
    }
}

/// Writes entries as a tar stream.
struct TarSink<W: Write> {
    b: tar::Builder<W>,
}

impl<W: Write> Sink for TarSink<W> {
    fn put(&mut self, rel: &Path, e: &Entry, data: &mut dyn Read) -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(e.uid.into());
        h.set_gid(e.gid.into());
        h.set_mtime(e.mtime.max(0) as u64);
        h.set_size(0);
        let r = match &e.kind {
            EntryKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                self.b.append_data(&mut h, rel, io::empty())
            }
            EntryKind::File => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(e.size);
                self.b.append_data(&mut h, rel, data)
            }
            EntryKind::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                self.b.append_link(&mut h, rel, OsStr::from_bytes(target))
            }
            EntryKind::Hardlink(to) => {
                h.set_entry_type(tar::EntryType::Link);
                self.b.append_link(&mut h, rel, to)
            }
            EntryKind::Device(t, rdev) => {
                h.set_entry_type(match t {
                    FileType::CharacterDevice => tar::EntryType::Char,
                    FileType::BlockDevice => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                let _ = h.set_device_major(rustix::fs::major(*rdev));
                let _ = h.set_device_minor(rustix::fs::minor(*rdev));
                self.b.append_data(&mut h, rel, io::empty())
            }
        };
        r.map_err(FsError::WriteTar)
    }

    fn finish(&mut self) -> Result<()> {
        self.b.finish().map_err(FsError::WriteTar)
    }
}

/// Feeds a tar stream's entries to a sink.
fn read_tar(input: &mut dyn Read, sink: &mut dyn Sink) -> Result<()> {
    let mut archive = tar::Archive::new(input);
    let entries = archive.entries().map_err(FsError::ReadTar)?;
    for entry in entries {
        let mut entry = entry.map_err(FsError::ReadTar)?;
        let raw = entry.path_bytes().into_owned();
        let rel = clean_entry_name(&raw)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let h = entry.header();
        let mut e = Entry {
            kind: EntryKind::Dir,
            mode: h.mode().map_err(FsError::ReadTar)? & 0o7777,
            uid: h.uid().map_err(FsError::ReadTar)? as u32,
            gid: h.gid().map_err(FsError::ReadTar)? as u32,
            mtime: h.mtime().map_err(FsError::ReadTar)? as i64,
            size: entry.size(),
        };
        let link = || -> Result<Vec<u8>> {
            Ok(entry
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default())
        };
        e.kind = match h.entry_type() {
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Symlink => EntryKind::Symlink(link()?),
            tar::EntryType::Link => EntryKind::Hardlink(clean_entry_name(&link()?)?),
            t @ (tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo) => {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let ft = match t {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                EntryKind::Device(ft, rustix::fs::makedev(major, minor))
            }
            // PAX/GNU headers are consumed by the reader; other kinds are skipped.
            _ => continue,
        };
        sink.put(&rel, &e, &mut entry)?;
    }
    sink.finish()
}

fn clean_entry_name(raw: &[u8]) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir | Component::RootDir => {}
            _ => return Err(FsError::BadEntryName(String::from_utf8_lossy(raw).into_owned())),
        }
    }
    Ok(out)
}

/// Where the copy goes inside the destination directory.
enum Target {
    /// The source itself, under this name.
    Named(CString),
    /// The source directory's entries.
    Contents,
}

/// A resolved source.
struct Source {
    node: Node,
    stat: rustix::fs::Stat,
    contents: bool,
}

fn resolve_source(root: &CopyRoot, src: &str, follow: bool) -> Result<Source> {
    let arg = PathArg::parse(src);
    let node = resolve(root, &arg.parts, follow || arg.dir, &arg.shown)?;
    let Some(stat) = node.stat else {
        return Err(FsError::NotFound {
            place: root.place.clone(),
            path: arg.shown,
        });
    };
    let is_dir = ftype(&stat) == FileType::Directory;
    if arg.dir && !is_dir {
        return Err(FsError::NotADirectory { path: arg.shown });
    }
    // The root itself has no name to copy under: its contents are copied.
    let contents = is_dir && (arg.contents || node.parts.is_empty());
    Ok(Source { node, stat, contents })
}

/// Picks the destination directory and how the source lands in it, by Docker's rules.
fn resolve_dest(
    root: &CopyRoot,
    dst: &str,
    src_is_dir: bool,
    src_contents: bool,
    src_name: &CStr,
) -> Result<(OwnedFd, Target)> {
    let arg = PathArg::parse(dst);
    let node = resolve(root, &arg.parts, true, &arg.shown).map_err(|e| match e {
        FsError::NotFound { .. } => FsError::NoSuchDirectory {
            path: arg.shown.clone(),
        },
        other => other,
    })?;
    let open_dir = |n: &Node| {
        rustix::fs::openat(
            &n.parent,
            n.name.as_c_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::WriteDest {
            place: root.place.clone(),
            path: arg.shown.clone(),
            source: rio(e),
        })
    };
    match node.stat {
        Some(st) if ftype(&st) == FileType::Directory => {
            let dir = open_dir(&node)?;
            if src_contents {
                Ok((dir, Target::Contents))
            } else {
                Ok((dir, Target::Named(src_name.to_owned())))
            }
        }
        Some(_) => {
            if src_is_dir {
                Err(FsError::DirOntoFile { path: arg.shown })
            } else if arg.dir {
                Err(FsError::NotADirectory { path: arg.shown })
            } else {
                Ok((node.parent, Target::Named(node.name)))
            }
        }
        None => {
            if (arg.dir && !src_is_dir) || node.name.as_bytes() == b"." {
                Err(FsError::NoSuchDirectory { path: arg.shown })
            } else {
                Ok((node.parent, Target::Named(node.name)))
            }
        }
    }
}

/// `cp` between two roots (host and container): copies `src` (resolved in `from`) to `dst`
/// (resolved in `to`) with Docker's rules: a file onto a file replaces it, into a directory
/// keeps its name; a directory to a missing path becomes that path; to an existing directory it
/// is copied into it, or only its contents with `SRC/.`.
pub fn copy(from: &CopyRoot, src: &str, to: &CopyRoot, dst: &str, opts: CopyOptions) -> Result<()> {
    let s = resolve_source(from, src, opts.follow_link)?;
    let is_dir = ftype(&s.stat) == FileType::Directory;
    let base = s.node.parts.last().map(String::as_str).unwrap_or(".");
    let base = cstring(base.as_bytes(), &from.place, src)?;
    let (dir, target) = resolve_dest(to, dst, is_dir, s.contents, &base)?;
    let mut sink = FsSink {
        base: dir,
        place: to.place.clone(),
        shown: dst.to_string(),
        owner: opts.owner,
        dirs: Vec::new(),
    };
    emit(from, &s, target, src, &mut sink)?;
    sink.finish()
}

fn emit(from: &CopyRoot, s: &Source, target: Target, src: &str, sink: &mut dyn Sink) -> Result<()> {
    match target {
        Target::Named(name) => {
            let out = PathBuf::from(OsStr::from_bytes(name.to_bytes()));
            walk(
                &from.place,
                s.node.parent.as_fd(),
                &s.node.name,
                &out,
                Path::new(src),
                sink,
            )
        }
        Target::Contents => {
            // The walk of the directory itself with an empty output name emits only its entries.
            walk(
                &from.place,
                s.node.parent.as_fd(),
                &s.node.name,
                Path::new(""),
                Path::new(src),
                sink,
            )
        }
    }
}

/// `cp SRC -`: writes `src` (resolved in `from`) as a tar: entries named after its basename, or
/// its contents for `SRC/.`.
pub fn copy_to_tar<W: Write>(from: &CopyRoot, src: &str, follow_link: bool, out: W) -> Result<()> {
    let s = resolve_source(from, src, follow_link)?;
    let target = if s.contents {
        Target::Contents
    } else {
        let base = s.node.parts.last().map(String::as_str).unwrap_or(".");
        Target::Named(cstring(base.as_bytes(), &from.place, src)?)
    };
    let mut sink = TarSink {
        b: tar::Builder::new(out),
    };
    emit(from, &s, target, src, &mut sink)?;
    sink.finish()
}

/// `cp - DEST`: extracts a tar into the existing directory `dst` (resolved in `to`).
pub fn copy_from_tar<R: Read>(input: R, to: &CopyRoot, dst: &str, owner: Owner) -> Result<()> {
    let arg = PathArg::parse(dst);
    let node = resolve(to, &arg.parts, true, &arg.shown)?;
    match node.stat {
        Some(st) if ftype(&st) == FileType::Directory => {}
        Some(_) => return Err(FsError::NotADirectory { path: arg.shown }),
        None => return Err(FsError::NoSuchDirectory { path: arg.shown }),
    }
    let dir = rustix::fs::openat(
        &node.parent,
        node.name.as_c_str(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| FsError::WriteDest {
        place: to.place.clone(),
        path: arg.shown.clone(),
        source: rio(e),
    })?;
    let mut sink = FsSink {
        base: dir,
        place: to.place.clone(),
        shown: dst.to_string(),
        owner,
        dirs: Vec::new(),
    };
    let mut input = input;
    read_tar(&mut input, &mut sink)
}

/// Turns an `OsString` file name into a `String` for messages.
#[allow(dead_code)]
fn shown_name(n: OsString) -> String {
    String::from_utf8_lossy(&n.into_vec()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn whiteout(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            FileType::CharacterDevice,
            Mode::from_raw_mode(0),
            0,
        )
        .unwrap();
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
        rustix::fs::lsetxattr(
            top.join("o"),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
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
