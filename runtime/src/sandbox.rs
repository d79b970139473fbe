//! Starting, waiting for and killing a container process.
//!
//! [`start`] prepares everything in the parent (user, mount targets, the runtime's stub layer,
//! `/etc` files, the setup [`Plan`]), then clones one child into new mount, pid, uts, ipc (and
//! optionally network) namespaces. The child runs the plan and execs the command as pid 1 of its
//! pid namespace; a setup failure comes back through a close-on-exec pipe as (step index, errno).
//!
//! Cleanup: all mounts live in the child's private mount namespace and vanish with it; when pid 1
//! exits the kernel kills the rest of its pid namespace; [`Running::wait`] (or dropping a
//! [`Running`], which kills first) removes the runtime's temporary dir under `scratch`.

use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::caps::{CapsError, HostCaps};
use crate::cgroup::{Cgroup, CgroupError};
use crate::layers::{LayerError, RootView};
use crate::plan::{
    self, Console, Create, Device, MountKind, NetPlan, Plan, PlanError, PlanInput, PlannedMount, RootMount,
    ScratchEntry,
};
use crate::spec::Security;
use crate::spec::{ContainerSpec, MountSpec, Network, Rootfs};
use crate::sys::{self, Cloned, Errno, Exit, RealSys};
use crate::tty::TtyError;
use crate::users::{self, UserError};

/// The kernel's limit on overlay lower dirs.
pub const MAX_LOWER_DIRS: usize = 500;

/// Errors of starting, waiting for and killing containers.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A snapshotter other than the kernel's overlayfs failed to make or release a view.
    #[error("snapshot view")]
    Snapshot(#[source] crate::snapshotter::SnapshotterError),
    /// Reading the runtime's own capabilities failed.
    #[error("failed to read the host's capabilities")]
    HostCaps(#[source] CapsError),
    /// A `--cap-add`/`--cap-drop` value is not a capability.
    #[error("invalid capability option")]
    Caps(#[source] CapsError),
    /// The seccomp profile could not be selected or compiled.
    #[error("failed to prepare the container's seccomp filter")]
    Seccomp(#[source] crate::seccomp::SeccompError),
    /// Creating the container's cgroup or writing its limits failed.
    #[error("failed to set up the container's cgroup")]
    Cgroup(#[source] CgroupError),
    /// Creating the container's cgroup failed in rootless mode.
    #[error(
        "resource limits (--memory, --cpus, --pids-limit) in rootless mode need a cgroup v2 subtree \
         delegated to the user (systemd's Delegate=yes), which kiln does not use yet"
    )]
    RootlessCgroup(#[source] CgroupError),
    /// Listing the host's devices for a privileged container failed.
    #[error("failed to list host devices in `{path}`")]
    HostDevices {
        /// The dir.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A terminal operation failed.
    #[error("terminal operation failed")]
    Tty(#[source] TtyError),
    /// Opening or reading a file of the target of an exec failed.
    #[error("failed to read `{path}`")]
    ExecTarget {
        /// The file under `/proc/PID`.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Opening a namespace of the target of an exec failed.
    #[error("failed to open namespace `{path}`")]
    OpenNs {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Looking up the cgroups of the target of an exec failed.
    #[error("failed to find the cgroups of container process {pid}")]
    ExecCgroups {
        /// The pid.
        pid: i32,
        /// The cause.
        #[source]
        source: CgroupError,
    },
    /// Creating the runtime's temporary dir failed.
    #[error("failed to create `{path}`")]
    CreateScratch {
        /// The dir.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// More lower dirs than the kernel allows.
    #[error("the root filesystem has {count} lower dirs; the kernel allows at most {MAX_LOWER_DIRS}")]
    TooManyLayers {
        /// Lower dirs given (plus the runtime's own).
        count: usize,
    },
    /// Resolving the `USER` spec failed.
    #[error("resolving user `{user}`")]
    User {
        /// The spec.
        user: String,
        /// The cause.
        #[source]
        source: UserError,
    },
    /// Resolving a mount target inside the root failed.
    #[error("resolving mount target `{target}` inside the root")]
    ResolveTarget {
        /// The target.
        target: String,
        /// The cause.
        #[source]
        source: LayerError,
    },
    /// A bind-mount source is missing or unreadable.
    #[error("failed to inspect bind-mount source `{path}`")]
    MountSource {
        /// The source.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Opening the network namespace to join failed.
    #[error("failed to open network namespace `{path}`")]
    OpenNetns {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Opening `/dev/null` for stdin failed.
    #[error("failed to open `/dev/null` for stdin")]
    OpenDevNull(#[source] Errno),
    /// Duplicating a stdio descriptor failed.
    #[error("failed to duplicate the {name} descriptor")]
    DupStdio {
        /// stdin, stdout or stderr.
        name: &'static str,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Building the setup plan failed.
    #[error("invalid container spec")]
    Plan(#[source] PlanError),
    /// Creating the status pipe failed.
    #[error("failed to create the status pipe")]
    Pipe(#[source] Errno),
    /// `clone` failed.
    #[error("failed to create the container process")]
    Clone(#[source] Errno),
    /// Reading the child's status failed.
    #[error("failed to read the container's setup status")]
    ReadStatus(#[source] Errno),
    /// A setup step in the container failed before the command started.
    #[error("container setup failed: {step}")]
    Setup {
        /// The step, naming its path, e.g. "mounting overlay at `/` (3 lower dirs)".
        step: String,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// A setup step the kernel refuses inside an unprivileged container (a fresh procfs where
    /// the runtime's own `/proc` is partly masked).
    #[error(
        "failed to set up the container: {step}, which the kernel refuses inside an unprivileged \
         container whose /proc is masked (a process there cannot have a pid namespace of its own): \
         build with `kiln build --isolation=chroot` (`KILN_ISOLATION=chroot`), whose RUN steps do \
         without one (`kiln run` has no such mode)"
    )]
    NeedsChroot {
        /// The step, naming its path.
        step: String,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// The command could not be executed (not found in `PATH`, not executable, ...).
    #[error("failed to execute `{command}` in the container")]
    Exec {
        /// `argv[0]`.
        command: String,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// `waitpid` failed.
    #[error("failed to wait for container process {pid}")]
    Wait {
        /// The pid.
        pid: i32,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// `kill` failed.
    #[error("failed to send signal {signal} to container process {pid}")]
    Kill {
        /// The pid.
        pid: i32,
        /// The signal.
        signal: i32,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Removing the runtime's temporary files failed.
    #[error("failed to remove `{path}`")]
    Cleanup {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// How a container process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
    /// The kernel's OOM killer killed a process of the container's cgroup (`--memory`).
    pub oom_killed: bool,
}

impl ExitStatus {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code: {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => write!(f, "unknown status"),
        }
    }
}

/// Removes the runtime's files on drop unless disarmed.
#[derive(Debug)]
struct Cleanup {
    run_dir: PathBuf,
    /// Paths created inside a `Rootfs::Dir` root, removed again (deepest first).
    created_in_dir: Vec<PathBuf>,
    /// Views made by a snapshotter other than the kernel's, released after the container.
    views: Option<crate::snapshotter::ContainerViews>,
}

impl Cleanup {
    fn run(&mut self) -> Result<(), RuntimeError> {
        for path in std::mem::take(&mut self.created_in_dir).iter().rev() {
            let result = match std::fs::symlink_metadata(path) {
                Ok(md) if md.is_dir() => std::fs::remove_dir(path),
                Ok(md) if md.len() == 0 => std::fs::remove_file(path),
                _ => Ok(()),
            };
            // A dir the command filled is left alone, like BuildKit's mount stubs.
            if let Err(e) = result {
                if e.raw_os_error() != Some(libc::ENOTEMPTY) {
                    return Err(RuntimeError::Cleanup {
                        path: path.clone(),
                        source: e,
                    });
                }
            }
        }
        if let Some(mut views) = self.views.take() {
            views.release().map_err(RuntimeError::Snapshot)?;
        }
        let dir = std::mem::take(&mut self.run_dir);
        if dir.as_os_str().is_empty() {
            return Ok(());
        }
        // The runtime's files lived in a tmpfs of the container's mount namespace: normally only
        // the empty mount point is left.
        let result = match std::fs::remove_dir(&dir) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => std::fs::remove_dir_all(&dir),
            other => other,
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RuntimeError::Cleanup { path: dir, source }),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.run();
    }
}

/// A started container process.
#[derive(Debug)]
pub struct Running {
    pid: i32,
    created: Vec<PathBuf>,
    cleanup: Cleanup,
    reaped: bool,
    cgroup: Option<Cgroup>,
}

impl Running {
    /// The host pid of the container's pid 1.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Paths (relative to the root) the runtime had to create in the container's root view because
    /// no lower layer could hold them (for `Rootfs::Overlay` these are in the upper dir; the layer
    /// writer should leave them out of the layer). Usually empty.
    pub fn created_paths(&self) -> &[PathBuf] {
        &self.created
    }

    /// Sends a signal to the container's pid 1. Note that pid 1 ignores signals it has no handler
    /// for, except `SIGKILL` (and `SIGSTOP`).
    pub fn kill(&self, signal: i32) -> Result<(), RuntimeError> {
        sys::kill(self.pid, signal).map_err(|source| RuntimeError::Kill {
            pid: self.pid,
            signal,
            source,
        })
    }

    /// A process started by [`crate::exec::exec`]: nothing to clean up but the process.
    pub(crate) fn exec_process(pid: i32) -> Running {
        Running {
            pid,
            created: Vec::new(),
            cleanup: Cleanup {
                run_dir: PathBuf::new(),
                created_in_dir: Vec::new(),
                views: None,
            },
            reaped: false,
            cgroup: None,
        }
    }

    /// The container's cgroup dirs (one per hierarchy; empty without `RunOptions::cgroup`).
    pub fn cgroup_dirs(&self) -> &[PathBuf] {
        self.cgroup.as_ref().map_or(&[], |c| c.dirs())
    }

    fn finish(&mut self, exit: Exit) -> Result<ExitStatus, RuntimeError> {
        self.reaped = true;
        self.cleanup.run()?;
        let oom_killed = self.cgroup.as_ref().is_some_and(|c| c.oom_kills() > 0);
        if let Some(cgroup) = self.cgroup.take() {
            // The exit status matters more than a cgroup dir still draining: report it, and leave
            // the dir to `cgroup::remove` (e.g. by the supervisor) later.
            if let Err(e) = cgroup.remove() {
                let cause = std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default();
                tracing::warn!("container cgroup left behind: {e}: {cause}");
            }
        }
        Ok(match exit {
            Exit::Code(c) => ExitStatus {
                code: Some(c),
                signal: None,
                oom_killed,
            },
            Exit::Signal(s) => ExitStatus {
                code: None,
                signal: Some(s),
                oom_killed,
            },
            Exit::Running => ExitStatus {
                code: None,
                signal: None,
                oom_killed,
            },
        })
    }

    /// Waits for the container to exit (the kernel has then killed the rest of its pid namespace
    /// and dropped its mounts) and removes the runtime's temporary files.
    pub fn wait(mut self) -> Result<ExitStatus, RuntimeError> {
        let exit = sys::wait_pid(self.pid, true).map_err(|source| RuntimeError::Wait {
            pid: self.pid,
            source,
        })?;
        self.finish(exit)
    }

    /// Non-blocking [`Running::wait`]: `None` while the container runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, RuntimeError> {
        if self.reaped {
            return Ok(None);
        }
        match sys::wait_pid(self.pid, false).map_err(|source| RuntimeError::Wait {
            pid: self.pid,
            source,
        })? {
            Exit::Running => Ok(None),
            exit => self.finish(exit).map(Some),
        }
    }
}

impl Drop for Running {
    /// A container dropped without `wait` (a cancelled step) is killed and reaped.
    fn drop(&mut self) {
        if !self.reaped {
            let _ = sys::kill(self.pid, libc::SIGKILL);
            let _ = sys::wait_pid(self.pid, true);
            self.reaped = true;
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn create_run_dir(scratch: &Path) -> Result<PathBuf, RuntimeError> {
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = scratch.join(format!("kiln-run-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(RuntimeError::CreateScratch { path: dir, source }),
        }
    }
}

/// Lexical absolute form of a container path.
fn absolute(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    }
}

/// Where a mount point comes from when the root lacks it.
struct Targets<'a> {
    view: &'a RootView,
    overlay: bool,
    stub: PathBuf,
    /// Entries of the stub layer (host paths under `stub`), parents first.
    stub_entries: Vec<ScratchEntry>,
    /// Targets mounted so far (relative), to detect nesting.
    mounted: Vec<PathBuf>,
    create: Vec<Create>,
    /// Directories in `create` that stay in the root filesystem (not reported as created).
    kept: Vec<PathBuf>,
}

impl Targets<'_> {
    /// Resolves `target`, arranges for it to exist, and returns the resolved relative path and the
    /// components to create inside an enclosing earlier mount.
    fn place(&mut self, target: &str, is_dir: bool) -> Result<(PathBuf, Vec<PathBuf>), RuntimeError> {
        self.place_with(target, is_dir, false)
    }

    /// [`Targets::place`]; with `in_rootfs` missing components are made in the root filesystem
    /// itself and its directories kept there.
    fn place_with(
        &mut self,
        target: &str,
        is_dir: bool,
        in_rootfs: bool,
    ) -> Result<(PathBuf, Vec<PathBuf>), RuntimeError> {
        let target = absolute(target);
        let resolved = self
            .view
            .resolve(&target)
            .map_err(|source| RuntimeError::ResolveTarget {
                target: target.clone(),
                source,
            })?;
        let rel = resolved.rel.clone();
        let enclosing = self
            .mounted
            .iter()
            .filter(|m| rel.starts_with(m) && rel != **m)
            .max_by_key(|m| m.as_os_str().len());
        let mut create_first = Vec::new();
        if let Some(parent) = enclosing {
            let mut cur = parent.clone();
            if let Ok(rest) = rel.strip_prefix(parent) {
                for c in rest.components() {
                    cur.push(c);
                    create_first.push(cur.clone());
                }
            }
        } else if !resolved.exists() {
            let comps: Vec<_> = rel.components().collect();
            if self.overlay && resolved.visible_from_below && !in_rootfs {
                let mut host = self.stub.clone();
                for (i, c) in comps.iter().enumerate() {
                    host.push(c);
                    let entry = if i + 1 == comps.len() && !is_dir {
                        ScratchEntry::File(host.clone(), Vec::new())
                    } else {
                        ScratchEntry::Dir(host.clone())
                    };
                    let known = self.stub_entries.iter().any(|e| match e {
                        ScratchEntry::Dir(p) | ScratchEntry::File(p, _) => *p == host,
                    });
                    if !known {
                        self.stub_entries.push(entry);
                    }
                }
            } else {
                let mut cur = PathBuf::new();
                for (i, c) in comps.iter().enumerate() {
                    cur.push(c);
                    if i >= resolved.existing {
                        let dir = i + 1 < comps.len() || is_dir;
                        if !self.create.iter().any(|x| x.rel == cur) {
                            self.create.push(Create {
                                rel: cur.clone(),
                                dir,
                            });
                        }
                        if in_rootfs && dir && !self.kept.contains(&cur) {
                            self.kept.push(cur.clone());
                        }
                    }
                }
            }
        }
        self.mounted.push(rel.clone());
        Ok((rel, create_first))
    }
}

fn dup_stdio(fd: &OwnedFd, name: &'static str) -> Result<OwnedFd, RuntimeError> {
    sys::dup_above_stdio(fd.as_fd()).map_err(|source| RuntimeError::DupStdio { name, source })
}

/// Everything prepared in the parent, owned until the child has exec'd.
struct Prepared {
    plan: Plan,
    created: Vec<PathBuf>,
    created_in_dir: Vec<PathBuf>,
    namespaces: libc::c_int,
    cgroup: Option<Cgroup>,
    _keep: Vec<OwnedFd>,
}

/// Device dirs of the host not copied into a privileged container, and devices the runtime makes
/// itself (Docker skips the same dirs and `/dev/console`).
const SKIP_DEV_DIRS: [&str; 7] = ["pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"];
const SKIP_DEVICES: [&str; 8] = [
    "null", "zero", "full", "random", "urandom", "tty", "console", "ptmx",
];

/// The character and block devices under the host's `dir` (Docker's `--privileged` copies them).
pub(crate) fn host_devices(dir: &Path) -> Result<Vec<Device>, RuntimeError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = dir.join(&rel);
        let entries = std::fs::read_dir(&path).map_err(|source| RuntimeError::HostDevices {
            path: path.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| RuntimeError::HostDevices {
                path: path.clone(),
                source,
            })?;
            let name = entry.file_name();
            let child = rel.join(&name);
            let Ok(md) = std::fs::symlink_metadata(entry.path()) else {
                continue; // vanished meanwhile
            };
            let ft = md.file_type();
            if ft.is_dir() {
                if !SKIP_DEV_DIRS.iter().any(|d| name == *d) {
                    stack.push(child);
                }
            } else if ft.is_char_device() || ft.is_block_device() {
                if rel.as_os_str().is_empty() && SKIP_DEVICES.iter().any(|d| name == *d) {
                    continue;
                }
                out.push(Device {
                    rel: child,
                    mode: md.mode(),
                    rdev: md.rdev(),
                    uid: md.uid(),
                    gid: md.gid(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// If stdin is a pty slave of the host's devpts, where it lives and which stdio slots share it.
fn console_for(stdio: &[&OwnedFd; 3]) -> Option<Console> {
    let id = |fd: &OwnedFd| {
        nix::sys::stat::fstat(fd.as_fd())
            .ok()
            .map(|st| (st.st_dev, st.st_ino, st.st_rdev))
    };
    let stdin = id(stdio[0])?;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", sys::raw(stdio[0]))).ok()?;
    if !link.starts_with("/dev/pts/") {
        return None;
    }
    let st = nix::sys::stat::stat(&link).ok()?;
    if (st.st_dev, st.st_ino, st.st_rdev) != stdin {
        return None;
    }
    let reopen = (0..3)
        .filter(|&i| id(stdio[i]) == Some(stdin))
        .map(|i| i as i32)
        .collect();
    Some(Console { source: link, reopen })
}

/// Where `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname` come from (written in the run dir)
/// and go to.
fn etc_binds(
    spec: &ContainerSpec,
    etc_dir: &Path,
    targets: &mut Targets<'_>,
    scratch: &mut Vec<ScratchEntry>,
) -> Result<Vec<(PathBuf, PathBuf)>, RuntimeError> {
    let mut etc_binds = Vec::new();
    for (name, content) in [
        ("hosts", &spec.etc_files.hosts),
        ("resolv.conf", &spec.etc_files.resolv_conf),
        ("hostname", &spec.etc_files.hostname),
    ] {
        let Some(content) = content else { continue };
        let host_path = etc_dir.join(name);
        scratch.push(ScratchEntry::File(host_path.clone(), content.as_bytes().to_vec()));
        let (rel, _) = targets.place(&format!("/etc/{name}"), false)?;
        etc_binds.push((host_path, rel));
    }
    Ok(etc_binds)
}

/// The spec's extra mounts, their targets placed in the root.
fn planned_mounts(
    spec: &ContainerSpec,
    targets: &mut Targets<'_>,
) -> Result<Vec<PlannedMount>, RuntimeError> {
    let mut mounts = Vec::new();
    for m in &spec.mounts {
        let (kind, is_dir) = match m {
            MountSpec::Bind { source, readonly, .. } => {
                let md = std::fs::metadata(source).map_err(|e| RuntimeError::MountSource {
                    path: source.clone(),
                    source: e,
                })?;
                (
                    MountKind::Bind {
                        source: source.clone(),
                        readonly: *readonly,
                    },
                    md.is_dir(),
                )
            }
            MountSpec::Tmpfs { size, mode, .. } => (
                MountKind::Tmpfs {
                    size: *size,
                    mode: *mode,
                },
                true,
            ),
            MountSpec::Overlay { lower, upper, .. } => (
                MountKind::Overlay {
                    lower: lower.clone(),
                    upper: upper.clone(),
                },
                true,
            ),
        };
        let (target, create_first) =
            targets.place_with(m.target(), is_dir, spec.options.mount_points_in_rootfs)?;
        mounts.push(PlannedMount {
            target,
            kind,
            target_is_dir: is_dir,
            create_first,
        });
    }
    Ok(mounts)
}

/// The network step and the namespaces to clone; a joined namespace's descriptor goes to `keep`.
fn network_plan(
    network: &Network,
    isolation: crate::spec::Isolation,
    keep: &mut Vec<OwnedFd>,
) -> Result<(NetPlan, i32), RuntimeError> {
    let mut namespaces = libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if isolation == crate::spec::Isolation::Default || crate::isolation::own_pid_namespace() {
        // Chroot isolation stays in the runtime's pid namespace: a new one needs a fresh procfs,
        // which the kernel refuses where the runtime's own /proc is partly masked.
        namespaces |= libc::CLONE_NEWPID;
    }
    let network = match network {
        Network::Host => NetPlan::Host,
        Network::None => {
            namespaces |= libc::CLONE_NEWNET;
            NetPlan::New
        }
        Network::Join(path) => {
            let fd = sys::open_cloexec(path).map_err(|source| RuntimeError::OpenNetns {
                path: path.clone(),
                source,
            })?;
            let raw = sys::raw(&fd);
            keep.push(fd);
            NetPlan::Join(raw)
        }
    };
    Ok((network, namespaces))
}

/// The container's stdin (`/dev/null` if none), stdout and stderr, duplicated into `keep`.
fn stdio_fds(spec: &ContainerSpec, keep: &mut Vec<OwnedFd>) -> Result<[RawFd; 3], RuntimeError> {
    let stdin = match &spec.stdin {
        Some(fd) => dup_stdio(fd, "stdin")?,
        None => sys::open_cloexec(Path::new("/dev/null")).map_err(RuntimeError::OpenDevNull)?,
    };
    let stdout = dup_stdio(&spec.stdout, "stdout")?;
    let stderr = dup_stdio(&spec.stderr, "stderr")?;
    let stdio = [sys::raw(&stdin), sys::raw(&stdout), sys::raw(&stderr)];
    keep.extend([stdin, stdout, stderr]);
    Ok(stdio)
}

/// The root filesystem's mount: the spec's layers (and the run dir's stub layer `with_stub`) or
/// a bind of its directory.
fn root_mount(spec: &ContainerSpec, stub: &Path, with_stub: bool) -> RootMount {
    match &spec.rootfs {
        Rootfs::Overlay { lower, upper, work } => {
            let mut lower = lower.clone();
            if with_stub {
                lower.push(stub.to_path_buf());
            }
            RootMount::Overlay {
                lower,
                upper: upper.clone(),
                work: work.clone(),
                volatile: spec.options.volatile_upper && crate::host::volatile_overlays_supported(),
            }
        }
        Rootfs::Dir(dir) => RootMount::Bind(dir.clone()),
    }
}

/// The container's cgroup, if it asks for one.
fn create_cgroup(spec: Option<&crate::spec::CgroupSpec>) -> Result<Option<Cgroup>, RuntimeError> {
    spec.map(Cgroup::create)
        .transpose()
        .map_err(|e| match crate::userns::in_user_namespace() {
            true => RuntimeError::RootlessCgroup(e),
            false => RuntimeError::Cgroup(e),
        })
}

fn prepare(spec: ContainerSpec, run_dir: &Path) -> Result<Prepared, RuntimeError> {
    let host = HostCaps::read().map_err(RuntimeError::HostCaps)?;
    let root = run_dir.join("root");
    let stub = run_dir.join("lower");
    let etc_dir = run_dir.join("etc");
    let mut scratch = vec![
        ScratchEntry::Dir(root.clone()),
        ScratchEntry::Dir(etc_dir.clone()),
    ];
    let (view, overlay) = match &spec.rootfs {
        Rootfs::Overlay { lower, .. } => {
            if lower.len() + 1 > MAX_LOWER_DIRS {
                return Err(RuntimeError::TooManyLayers {
                    count: lower.len() + 1,
                });
            }
            (RootView::Layers(lower.clone()), true)
        }
        Rootfs::Dir(dir) => (RootView::Dir(dir.clone()), false),
    };
    let user = users::resolve_user_in(&view, &spec.user, spec.options.groups).map_err(|source| {
        RuntimeError::User {
            user: spec.user.clone(),
            source,
        }
    })?;

    let mut targets = Targets {
        view: &view,
        overlay,
        stub: stub.clone(),
        stub_entries: Vec::new(),
        mounted: Vec::new(),
        create: Vec::new(),
        kept: Vec::new(),
    };
    let (proc_dir, _) = targets.place("/proc", true)?;
    let (dev_dir, _) = targets.place("/dev", true)?;
    let (sys_dir, _) = targets.place("/sys", true)?;

    let etc_binds = etc_binds(&spec, &etc_dir, &mut targets, &mut scratch)?;

    let mounts = planned_mounts(&spec, &mut targets)?;
    let stub_used = !targets.stub_entries.is_empty();
    let create = targets.create;
    let targets_kept = targets.kept;
    let lower_empty = matches!(&spec.rootfs, Rootfs::Overlay { lower, .. } if lower.is_empty());
    if stub_used || lower_empty {
        scratch.push(ScratchEntry::Dir(stub.clone()));
        scratch.extend(targets.stub_entries);
    }

    let rootfs = root_mount(&spec, &stub, stub_used || lower_empty);
    let created: Vec<PathBuf> = create
        .iter()
        .filter(|c| !targets_kept.contains(&c.rel))
        .map(|c| c.rel.clone())
        .collect();
    let created_in_dir = match &spec.rootfs {
        Rootfs::Dir(dir) => created.iter().map(|rel| dir.join(rel)).collect(),
        Rootfs::Overlay { .. } => Vec::new(),
    };

    let mut keep = Vec::new();
    let (network, namespaces) = network_plan(&spec.network, spec.options.isolation, &mut keep)?;

    let stdio = stdio_fds(&spec, &mut keep)?;

    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }
    let opts = &spec.options;
    let caps = host
        .with_changes(spec.security, &opts.cap_add, &opts.cap_drop)
        .map_err(RuntimeError::Caps)?;
    let devices = match spec.security {
        Security::Insecure => host_devices(Path::new("/dev"))?,
        Security::Default => Vec::new(),
    };
    // The filter's capability conditions see the container's set, as Docker's do.
    let seccomp = match spec.security {
        Security::Insecure => None,
        Security::Default => crate::seccomp::program(&opts.seccomp, caps).map_err(RuntimeError::Seccomp)?,
    };
    let console = match &spec.stdin {
        Some(stdin) if opts.controlling_tty => console_for(&[stdin, &spec.stdout, &spec.stderr]),
        _ => None,
    };
    let cgroup = create_cgroup(opts.cgroup.as_ref())?;
    let cgroup_procs = cgroup.as_ref().map(Cgroup::procs_files).unwrap_or_default();
    // Kernels before 5.3 have no pidfds: the container then only misses the check for a parent
    // that died before the signal was armed.
    let parent_pidfd = sys::pidfd_self().ok().map(|fd| {
        let raw = sys::raw(&fd);
        keep.push(fd);
        raw
    });
    let input = PlanInput {
        userns: crate::userns::in_user_namespace(),
        bind_proc: spec.options.isolation == crate::spec::Isolation::Chroot
            && !crate::isolation::own_pid_namespace(),
        bind_sys: spec.options.isolation == crate::spec::Isolation::Chroot,
        run_dir: run_dir.to_path_buf(),
        scratch,
        root,
        rootfs,
        readonly_rootfs: spec.readonly_rootfs,
        network,
        hostname: spec.hostname.clone(),
        create,
        proc_dir,
        dev_dir,
        sys_dir,
        etc_binds,
        mounts,
        security: spec.security,
        caps,
        last_cap: host.last_cap,
        no_new_privs: opts.no_new_privileges,
        seccomp,
        parent_pidfd,
        user,
        cwd: absolute(&spec.cwd),
        args: spec.args.clone(),
        env,
        stdio,
        cgroup_procs,
        controlling_tty: opts.controlling_tty,
        console,
        init: opts.init,
        devices,
        arg_area: if opts.init {
            crate::init::own_arg_area()
        } else {
            None
        },
        shm_size: opts.shm_size,
        rlimits: opts.rlimits.clone(),
    };
    let plan = plan::build(&input).map_err(RuntimeError::Plan)?;
    Ok(Prepared {
        plan,
        created,
        created_in_dir,
        namespaces,
        cgroup,
        _keep: keep,
    })
}

/// Starts `spec`'s command in a new container. `scratch` is a directory for the runtime's
/// temporary files: the runtime makes its own subdirectory there and removes it when the container
/// is waited for (or on any error).
pub fn start(mut spec: ContainerSpec, scratch: &Path) -> Result<Running, RuntimeError> {
    let run_dir = create_run_dir(scratch)?;
    let mut cleanup = Cleanup {
        run_dir: run_dir.clone(),
        created_in_dir: Vec::new(),
        views: None,
    };
    cleanup.views =
        crate::snapshotter::ContainerViews::make(&mut spec, &run_dir).map_err(RuntimeError::Snapshot)?;
    let command = spec.args.first().cloned().unwrap_or_default();
    let prepared = prepare(spec, &run_dir)?;
    cleanup.created_in_dir = prepared.created_in_dir.clone();

    let (status_read, status_write) = sys::pipe_cloexec().map_err(RuntimeError::Pipe)?;
    // The clone happens on one of the runtime's own threads, which live as long as the process:
    // the container's first process gets SIGKILL when the thread that cloned it ends (the parent
    // death signal follows the thread), which must mean that kiln died, not that a pool of the
    // caller retired an idle thread.
    let (cloned, mut prepared, status_write) = on_spawner_thread(move || {
        let cloned = clone_and_run(&prepared, &status_write);
        (cloned, prepared, status_write)
    })
    .ok_or(RuntimeError::Clone(Errno::EAGAIN))?;
    let pid = cloned.map_err(RuntimeError::Clone)?;
    drop(status_write);
    let mut running = Running {
        pid,
        created: prepared.created.clone(),
        cleanup,
        reaped: false,
        cgroup: prepared.cgroup.take(),
    };
    let mut report = [0u8; 8];
    let n = match sys::read_full(status_read.as_fd(), &mut report) {
        Ok(n) => n,
        Err(e) => return Err(RuntimeError::ReadStatus(e)), // `running` drops: kill, reap, clean
    };
    if n == 0 {
        return Ok(running);
    }
    let _ = sys::wait_pid(pid, true);
    running.reaped = true;
    let _ = running.cleanup.run();
    Err(setup_error(&prepared.plan, &report[..n], command))
}

/// Clones the container's first process, which runs the plan; returns its pid (in the caller).
fn clone_and_run(prepared: &Prepared, status_write: &OwnedFd) -> Result<i32, Errno> {
    // A plan that goes straight to execve runs in a child sharing this address space
    // (posix_spawn's way): a fork would copy this multithreaded process's page tables only for
    // execve to tear them down, about 0.7 ms of every build step. An init plan forks.
    if prepared.plan.runs_in_shared_memory() {
        let plan = &prepared.plan;
        return sys::spawn_shared(prepared.namespaces, &mut || {
            if let Err((index, errno)) = plan::run(&RealSys, plan) {
                report_failure(status_write, index, errno);
            }
            sys::exit_child(127)
        });
    }
    match sys::clone_child(prepared.namespaces)? {
        Cloned::Child => {
            // In the child of a possibly multithreaded process: no allocation from here on.
            if let Err((index, errno)) = plan::run(&RealSys, &prepared.plan) {
                report_failure(status_write, index, errno);
            }
            sys::exit_child(127)
        }
        Cloned::Parent(pid) => Ok(pid),
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Runs `f` on one of a few threads that never end, and returns its result (`None` if no such
/// thread could be started).
pub(crate) fn on_spawner_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    use std::sync::{mpsc, Mutex, OnceLock};
    static POOL: OnceLock<Option<Mutex<mpsc::Sender<Job>>>> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        let mut started = 0;
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("kiln-spawn-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    job();
                });
            started += usize::from(spawned.is_ok());
        }
        (started > 0).then(|| Mutex::new(tx))
    });
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = reply_tx.send(f());
    });
    pool.as_ref()?
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .ok()?;
    reply_rx.recv().ok()
}

/// Writes a setup failure (step index, errno) to the status pipe. Async-signal-safe.
pub(crate) fn report_failure(status_write: &OwnedFd, index: usize, errno: Errno) {
    let mut report = [0u8; 8];
    report[..4].copy_from_slice(&(index as u32).to_le_bytes());
    report[4..].copy_from_slice(&(errno as i32).to_le_bytes());
    let _ = sys::write_all(status_write.as_fd(), &report);
}

/// The error for a report read from the status pipe.
pub(crate) fn setup_error(plan: &Plan, report: &[u8], command: String) -> RuntimeError {
    let [a, b, c, d, e, f, g, h] = match <[u8; 8]>::try_from(report) {
        Ok(r) => r,
        Err(_) => return RuntimeError::ReadStatus(Errno::EIO),
    };
    let index = u32::from_le_bytes([a, b, c, d]) as usize;
    let errno = Errno::from_raw(i32::from_le_bytes([e, f, g, h]));
    let step = plan
        .steps
        .get(index)
        .map_or_else(|| format!("step {index}"), |s| s.what.clone());
    if index + 1 == plan.steps.len() {
        return RuntimeError::Exec {
            command,
            source: errno,
        };
    }
    if crate::isolation::refused_by_outer_container(&step, errno) {
        return RuntimeError::NeedsChroot { step, source: errno };
    }
    RuntimeError::Setup { step, source: errno }
}
