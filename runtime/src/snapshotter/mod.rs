//! How snapshots' writable and read-only views are made: the kernel's overlayfs (with `userxattr`
//! in a user namespace), else `fuse-overlayfs`, else copies (`native`: reflinks where the
//! filesystem has them). Every view gives the caller the same thing: the merged tree at a path
//! and, for a writable view, an upper dir in overlayfs' format (whiteouts as 0/0 character
//! devices, opaque directories marked by an `overlay.opaque` attribute) once the view is released.
//!
//! The choice is made once per process, lazily (a cached build mounts nothing and probes
//! nothing): `KILN_SNAPSHOTTER=overlayfs|fuse-overlayfs|native` forces one; as root the kernel's
//! overlayfs is used; in a user namespace a small overlay is mounted to see whether the kernel
//! allows it there, then `fuse-overlayfs` is looked for, then copies.

pub mod fuse;
pub mod native;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The environment variable that forces a snapshotter.
pub const ENV: &str = "KILN_SNAPSHOTTER";

/// A way of making snapshot views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshotter {
    /// The kernel's overlayfs.
    Overlay,
    /// `fuse-overlayfs` (a FUSE daemon per view, kiln's child).
    FuseOverlay,
    /// A copy of the merged tree per view (reflinks where the filesystem has them); a writable
    /// view's changes are found by comparing the copy with what was copied when it is released.
    Native,
}

impl Snapshotter {
    /// The name `KILN_SNAPSHOTTER` takes.
    pub fn name(self) -> &'static str {
        match self {
            Snapshotter::Overlay => "overlayfs",
            Snapshotter::FuseOverlay => "fuse-overlayfs",
            Snapshotter::Native => "native",
        }
    }

    /// Parses a `KILN_SNAPSHOTTER` value.
    pub fn parse(s: &str) -> Option<Snapshotter> {
        match s {
            "overlayfs" | "overlay" => Some(Snapshotter::Overlay),
            "fuse-overlayfs" => Some(Snapshotter::FuseOverlay),
            "native" => Some(Snapshotter::Native),
            _ => None,
        }
    }

    /// Whether writes through a view land in the upper dir while it is mounted, so that a caller
    /// may also write the upper dir directly (COPY's linking of unchanged files does).
    pub fn upper_is_live(self) -> bool {
        self == Snapshotter::Overlay
    }
}

/// The snapshotter in use and why it was picked (for `kiln info` and `--debug`).
#[derive(Debug, Clone)]
pub struct Choice {
    /// The snapshotter.
    pub kind: Snapshotter,
    /// A line saying what it is and why it was picked.
    pub reason: String,
}

/// A snapshotter cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotterError {
    #[error("{ENV}=`{0}` is not a snapshotter: expected overlayfs, fuse-overlayfs or native")]
    BadName(String),
    #[error("{ENV}=fuse-overlayfs, but {0}")]
    FuseMissing(String),
    #[error("{what} `{path}`: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("path `{0}` cannot be passed to fuse-overlayfs (it contains `:`, `,` or a NUL byte)")]
    FuseBadPath(PathBuf),
    #[error("fuse-overlayfs failed to mount `{path}`: {message}")]
    FuseMount { path: PathBuf, message: String },
    #[error("failed to unmount `{path}`: {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: crate::sys::Errno,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotterError + 'a {
    move |source| SnapshotterError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
static CHOICE: OnceLock<Result<Choice, String>> = OnceLock::new();

/// Where the probe mounts its test overlay (the store's `tmp/`); call before the first view.
pub fn set_scratch(dir: &Path) {
    let _ = SCRATCH.set(dir.to_path_buf());
}

/// Checks `KILN_SNAPSHOTTER` (without probing anything): a clear error for a bad value.
pub fn check_env() -> Result<(), SnapshotterError> {
    forced().map(|_| ())
}

fn forced() -> Result<Option<Snapshotter>, SnapshotterError> {
    match std::env::var(ENV) {
        Ok(v) if !v.is_empty() => match Snapshotter::parse(&v) {
            Some(Snapshotter::FuseOverlay) => {
                fuse::available().map_err(SnapshotterError::FuseMissing)?;
                Ok(Some(Snapshotter::FuseOverlay))
            }
            Some(s) => Ok(Some(s)),
            None => Err(SnapshotterError::BadName(v)),
        },
        _ => Ok(None),
    }
}

/// The snapshotter this process uses (chosen on first call), or why none can be.
pub fn choice() -> Result<&'static Choice, &'static str> {
    CHOICE.get_or_init(choose).as_ref().map_err(|e| e.as_str())
}

/// The snapshotter in use: [`choice`]'s, the kernel's overlayfs when none could be chosen (its
/// mount then fails with the kernel's error).
pub fn current() -> Snapshotter {
    choice().map_or(Snapshotter::Overlay, |c| c.kind)
}

fn choose() -> Result<Choice, String> {
    let userns = crate::userns::in_user_namespace();
    let kernel = if userns {
        "overlayfs (kernel, in a user namespace: userxattr)"
    } else {
        "overlayfs (kernel)"
    };
    match forced().map_err(|e| e.to_string())? {
        Some(Snapshotter::Overlay) => {
            return Ok(Choice {
                kind: Snapshotter::Overlay,
                reason: format!("{kernel}, forced by {ENV}"),
            })
        }
        Some(Snapshotter::FuseOverlay) => {
            return Ok(Choice {
                kind: Snapshotter::FuseOverlay,
                reason: format!("fuse-overlayfs, forced by {ENV}"),
            })
        }
        Some(Snapshotter::Native) => {
            return Ok(Choice {
                kind: Snapshotter::Native,
                reason: format!("native (copies{}), forced by {ENV}", native::reflink_note()),
            })
        }
        None => {}
    }
    if !userns {
        return Ok(Choice {
            kind: Snapshotter::Overlay,
            reason: kernel.to_string(),
        });
    }
    let scratch = SCRATCH.get().cloned().unwrap_or_else(std::env::temp_dir);
    let refused = match probe_kernel_remembered(&scratch) {
        Ok(()) => {
            return Ok(Choice {
                kind: Snapshotter::Overlay,
                reason: kernel.to_string(),
            })
        }
        Err(e) => e,
    };
    match fuse::available() {
        Ok(path) => Ok(Choice {
            kind: Snapshotter::FuseOverlay,
            reason: format!(
                "fuse-overlayfs ({}): the kernel refused overlayfs here: {refused}",
                path.display()
            ),
        }),
        Err(no_fuse) => Ok(Choice {
            kind: Snapshotter::Native,
            reason: format!(
                "native (copies{}): the kernel refused overlayfs here ({refused}) and {no_fuse}",
                native::reflink_note()
            ),
        }),
    }
}

/// [`probe_kernel`], remembered for the boot when it succeeds: its mount, unmount and the removal
/// of overlay's work directories cost several milliseconds of every rootless command (more than
/// the rest of a cached rebuild). The mark's name holds the boot, the kernel release and the
/// scratch directory's filesystem type, the three things the answer depends on; a refusal is not
/// remembered (the fallbacks are taken, and the next process asks again).
fn probe_kernel_remembered(scratch: &Path) -> Result<(), String> {
    let mark = crate::userns::runtime_dir().and_then(|dir| probe_mark(&dir, scratch));
    if mark.as_ref().is_some_and(|m| m.is_file()) {
        return Ok(());
    }
    probe_kernel(scratch)?;
    if let Some(m) = mark {
        // A mark that cannot be written costs the next process a probe, no more.
        let _ = m.parent().map(std::fs::create_dir_all);
        let _ = std::fs::File::create(&m);
    }
    Ok(())
}

fn probe_mark(dir: &Path, scratch: &Path) -> Option<PathBuf> {
    use sha2::Digest as _;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let fs = nix::sys::statfs::statfs(scratch).ok()?.filesystem_type();
    let key = sha2::Sha256::digest(format!("{}|{}|{:x}", boot.trim(), release.trim(), fs.0));
    Some(dir.join("overlay-probe").join(hex::encode(&key[..16])))
}

/// Mounts a small kernel overlay under `scratch` to see whether the kernel allows it here.
fn probe_kernel(scratch: &Path) -> Result<(), String> {
    let dir = scratch.join(format!("kiln-overlay-probe-{}", std::process::id()));
    let result = (|| -> Result<(), String> {
        for d in ["l1", "l2", "u", "w", "m"] {
            std::fs::create_dir_all(dir.join(d))
                .map_err(|e| format!("failed to create `{}`: {e}", dir.join(d).display()))?;
        }
        let m = dir.join("m");
        crate::hostmount::mount_kernel_overlay(
            &m,
            &[dir.join("l1"), dir.join("l2")],
            Some((&dir.join("u"), &dir.join("w"))),
            true,
        )
        .map_err(|e| e.to_string())?;
        let _ = crate::hostmount::unmount_kernel(&m);
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A view made by a snapshotter other than the kernel's, released by [`release`].
enum View {
    Fuse(fuse::FuseView),
    Native(native::NativeView),
}

fn views() -> &'static Mutex<HashMap<PathBuf, View>> {
    static VIEWS: OnceLock<Mutex<HashMap<PathBuf, View>>> = OnceLock::new();
    VIEWS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Makes a view of `lower` (top first) at the existing empty directory `target` with `snap`
/// (not the kernel's overlay), writable through `upper_work` when given. `stubs` (native only):
/// paths relative to the root made before the changes are counted, so they are not changes
/// (the runtime's mount points: `(path, is_dir)`).
pub(crate) fn mount(
    snap: Snapshotter,
    target: &Path,
    lower: &[PathBuf],
    upper_work: Option<(&Path, &Path)>,
    stubs: &[(PathBuf, bool)],
) -> Result<(), SnapshotterError> {
    let view = match snap {
        Snapshotter::FuseOverlay => View::Fuse(fuse::mount(target, lower, upper_work)?),
        Snapshotter::Native | Snapshotter::Overlay => {
            View::Native(native::mount(target, lower, upper_work.map(|(u, _)| u), stubs)?)
        }
    };
    tracing::debug!(snapshotter = snap.name(), target = %target.display(), layers = lower.len(), "view made");
    views()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(target.to_path_buf(), view);
    Ok(())
}

/// Releases the view at `target` if it is one of [`mount`]'s: `None` if it is not (a kernel
/// mount). A writable view's upper dir then holds its changes in overlayfs' format.
pub(crate) fn release(target: &Path) -> Option<Result<(), SnapshotterError>> {
    let view = views().lock().unwrap_or_else(|e| e.into_inner()).remove(target)?;
    let started = std::time::Instant::now();
    let result = match view {
        View::Fuse(v) => v.release(target),
        View::Native(v) => v.release(target),
    };
    tracing::debug!(target = %target.display(), elapsed = ?started.elapsed(), "view released");
    Some(result)
}

/// The name of the attribute that marks an opaque directory in an upper dir made here (what
/// kiln's layer code reads: `trusted.overlay.opaque`, `user.overlay.opaque` in a user namespace).
pub(crate) fn opaque_xattr() -> &'static str {
    if crate::userns::in_user_namespace() {
        "user.overlay.opaque"
    } else {
        "trusted.overlay.opaque"
    }
}

/// The views a container's root and overlay mounts need when the snapshotter is not the kernel's
/// (which the container's own mount namespace mounts itself): made by kiln beside the runtime's
/// run dir, the container binds them, and they are released when the container has exited.
#[derive(Debug)]
pub(crate) struct ContainerViews {
    dir: PathBuf,
    targets: Vec<PathBuf>,
    /// Trees of kiln's own under `dir` (fuse-overlayfs' stub layer), removed after the views.
    scratch: Vec<PathBuf>,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            View::Fuse(_) => "View::Fuse",
            View::Native(_) => "View::Native",
        })
    }
}

impl ContainerViews {
    /// Makes host-side views for `spec`'s overlays and points `spec` at them: `None` with the
    /// kernel's overlayfs, which needs none.
    pub(crate) fn make(
        spec: &mut crate::ContainerSpec,
        run_dir: &Path,
    ) -> Result<Option<ContainerViews>, SnapshotterError> {
        let snap = current();
        let has_overlay = matches!(spec.rootfs, crate::Rootfs::Overlay { .. })
            || spec
                .mounts
                .iter()
                .any(|m| matches!(m, crate::MountSpec::Overlay { .. }));
        if snap == Snapshotter::Overlay || !has_overlay {
            return Ok(None);
        }
        let dir = PathBuf::from(format!("{}.views", run_dir.display()));
        std::fs::create_dir(&dir).map_err(io_err("failed to create", &dir))?;
        let mut views = ContainerViews {
            dir: dir.clone(),
            targets: Vec::new(),
            scratch: Vec::new(),
        };
        if let crate::Rootfs::Overlay { lower, upper, work } = &spec.rootfs {
            // What the runtime would otherwise make in the root for its mounts: made before the
            // copy's state is taken, so that they are no change of the step.
            let mut stubs: Vec<(PathBuf, bool)> = ["proc", "dev", "sys"]
                .iter()
                .map(|d| (PathBuf::from(d), true))
                .collect();
            for (name, content) in [
                ("etc/hosts", &spec.etc_files.hosts),
                ("etc/resolv.conf", &spec.etc_files.resolv_conf),
                ("etc/hostname", &spec.etc_files.hostname),
            ] {
                if content.is_some() {
                    stubs.push((PathBuf::from(name), false));
                }
            }
            if !spec.options.mount_points_in_rootfs {
                for m in &spec.mounts {
                    let is_dir = match m {
                        crate::MountSpec::Bind { source, .. } => source.is_dir(),
                        _ => true,
                    };
                    stubs.push((PathBuf::from(m.target().trim_start_matches('/')), is_dir));
                }
            }
            let mut lower = lower.clone();
            if snap == Snapshotter::FuseOverlay {
                // As the kernel's overlay gets them from the runtime: mount points missing from
                // the image come from a stub layer at the bottom, never made in the view (which
                // would copy their directories up).
                let stub = views.add("stub")?;
                for (rel, is_dir) in &stubs {
                    if fuse::in_lower(&lower, rel) {
                        continue;
                    }
                    let path = stub.join(rel);
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent).map_err(io_err("failed to create", parent))?;
                    }
                    let made = if *is_dir {
                        std::fs::create_dir_all(&path)
                    } else {
                        std::fs::File::create(&path).map(drop)
                    };
                    made.map_err(io_err("failed to create", &path))?;
                }
                lower.push(stub.clone());
                views.scratch.push(stub);
            }
            let target = views.add("root")?;
            mount(snap, &target, &lower, Some((upper, work)), &stubs)?;
            views.targets.push(target.clone());
            spec.rootfs = crate::Rootfs::Dir(target);
        }
        for (i, m) in spec.mounts.iter_mut().enumerate() {
            if let crate::MountSpec::Overlay { lower, upper, target } = m {
                let view = views.add(&format!("m{i}"))?;
                mount(
                    snap,
                    &view,
                    lower,
                    upper.as_ref().map(|(u, w)| (u.as_path(), w.as_path())),
                    &[],
                )?;
                views.targets.push(view.clone());
                *m = crate::MountSpec::Bind {
                    source: view,
                    target: std::mem::take(target),
                    readonly: upper.is_none(),
                };
            }
        }
        Ok(Some(views))
    }

    fn add(&self, name: &str) -> Result<PathBuf, SnapshotterError> {
        let p = self.dir.join(name);
        std::fs::create_dir(&p).map_err(io_err("failed to create", &p))?;
        Ok(p)
    }

    /// Releases every view (writable ones' changes land in their upper dirs); the first error.
    pub(crate) fn release(&mut self) -> Result<(), SnapshotterError> {
        let mut first = Ok(());
        for t in std::mem::take(&mut self.targets) {
            let r = release(&t).unwrap_or(Ok(()));
            // Never recursive: a view that failed to unmount must not have its layers removed.
            let _ = std::fs::remove_dir(&t);
            if first.is_ok() {
                first = r;
            }
        }
        if first.is_ok() {
            for dir in std::mem::take(&mut self.scratch) {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let _ = std::fs::remove_dir(entry.path());
        }
        let _ = std::fs::remove_dir(&self.dir);
        first
    }
}

impl Drop for ContainerViews {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// Sets `path`'s access and modification times to those of `md`.
pub(crate) fn set_times(path: &Path, md: &std::fs::Metadata) -> std::io::Result<()> {
    use nix::sys::time::TimeSpec;
    use std::os::unix::fs::MetadataExt as _;
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::new(md.atime(), md.atime_nsec()),
        &TimeSpec::new(md.mtime(), md.mtime_nsec()),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(std::io::Error::from)
}
