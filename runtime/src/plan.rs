//! The ordered list of setup steps a container's first process runs between `clone` and `execve`.
//!
//! [`build`] is pure: it turns prepared inputs (paths already resolved inside the root, user
//! already resolved, descriptors already open) into [`Step`]s whose strings are all allocated up
//! front. [`run`] executes them against a [`Sys`] without allocating, so it is safe in the child of
//! a multithreaded process, and it reports the index of the failing step and its errno so the
//! parent can name the step.

use std::ffi::{CStr, CString};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::seccomp::Program;
use crate::spec::Security;
use crate::sys::{Errno, ExecArgs, FileKind, MsFlags, Sys};
use crate::users::ResolvedUser;

/// Longest option string `mount(2)` accepts: one page including the NUL.
pub const MAX_MOUNT_DATA: usize = 4095;

/// `/proc` and `/sys` paths hidden from a default container (containerd's and Docker's list).
pub const MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// `/proc` paths made read-only in a default container.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Default search path when the environment has no `PATH`.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Character devices created in the container's `/dev`: name, major, minor (Docker's set).
const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Symlinks created in the container's `/dev`: link name, target.
const DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// Errors of plan building.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A string for the kernel contains a NUL byte.
    #[error("{what} contains a NUL byte: {value:?}")]
    Nul {
        /// Which value.
        what: String,
        /// The value.
        value: String,
    },
    /// No command was given.
    #[error("the container has no command to run")]
    NoArgs,
    /// A resource limit names no resource Docker knows.
    #[error("invalid ulimit type: {0}")]
    UlimitType(String),
}

/// How the root filesystem is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootMount {
    /// overlayfs: lower dirs top first (the runtime's stub layer last, if any).
    Overlay {
        /// Lower dirs, top first.
        lower: Vec<PathBuf>,
        /// Upper dir.
        upper: PathBuf,
        /// Work dir.
        work: PathBuf,
        /// Mount with `volatile` (see [`crate::spec::RunOptions::volatile_upper`]).
        volatile: bool,
    },
    /// A recursive bind mount of a directory.
    Bind(PathBuf),
}

/// The network namespace step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetPlan {
    /// Stay in the host's namespace.
    Host,
    /// A new namespace (created by `clone`); bring `lo` up.
    New,
    /// `setns` into the namespace open at this descriptor.
    Join(RawFd),
}

/// What an extra mount mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountKind {
    /// Recursive bind mount of a host path.
    Bind {
        /// Host path.
        source: PathBuf,
        /// Remount read-only.
        readonly: bool,
    },
    /// tmpfs.
    Tmpfs {
        /// Size in bytes.
        size: Option<u64>,
        /// Root mode.
        mode: Option<u32>,
    },
    /// overlayfs; read-only without `upper`.
    Overlay {
        /// Lower dirs, top first.
        lower: Vec<PathBuf>,
        /// Upper and work dirs.
        upper: Option<(PathBuf, PathBuf)>,
    },
}

/// An extra mount with its target resolved inside the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMount {
    /// Symlink-free target relative to the root.
    pub target: PathBuf,
    /// What to mount.
    pub kind: MountKind,
    /// The target is a directory (else a file, for binds of files).
    pub target_is_dir: bool,
    /// Components (relative to the root) that must be created in the child because they lie
    /// inside an earlier mount, parents first.
    pub create_first: Vec<PathBuf>,
}

/// A path the child creates in the merged root view before mounting over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Create {
    /// Relative to the root.
    pub rel: PathBuf,
    /// A directory (else an empty file).
    pub dir: bool,
}

/// A file or directory of the runtime's own, created in a tmpfs over the run dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScratchEntry {
    /// A directory (mode 755).
    Dir(PathBuf),
    /// A file (mode 644) and its content.
    File(PathBuf, Vec<u8>),
}

/// Everything [`build`] needs, already resolved.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// kiln runs in a user namespace (rootless mode): device nodes are bind-mounted from the
    /// host's `/dev` (mknod is refused) and `/sys` of the host's network namespace is a bind.
    pub userns: bool,
    /// `/proc` is the runtime's own, bound recursively (chroot isolation: no pid namespace of
    /// its own, so no procfs of its own) instead of a fresh procfs.
    pub bind_proc: bool,
    /// `/sys` is the runtime's own, bound recursively and read-only (chroot isolation: where the
    /// runtime's `/sys` is partly masked the kernel refuses a fresh sysfs).
    pub bind_sys: bool,
    /// Host path of the runtime's run dir: the child mounts a tmpfs over it (in its private mount
    /// namespace, so nothing is written to the host's disk) and creates `scratch` in it.
    pub run_dir: PathBuf,
    /// The runtime's files and dirs in the run dir: the root mount point, the stub lower layer,
    /// the `/etc` files. Absolute host paths under `run_dir`, parents first.
    pub scratch: Vec<ScratchEntry>,
    /// Host path of the mount point of the container's root.
    pub root: PathBuf,
    /// The root filesystem.
    pub rootfs: RootMount,
    /// Remount the root read-only.
    pub readonly_rootfs: bool,
    /// Network namespace handling.
    pub network: NetPlan,
    /// Hostname.
    pub hostname: String,
    /// Mount points missing from the root view, created in the merged view (parents first).
    pub create: Vec<Create>,
    /// Resolved targets of `/proc`, `/dev`, `/sys`, relative to the root.
    pub proc_dir: PathBuf,
    /// See `proc_dir`.
    pub dev_dir: PathBuf,
    /// See `proc_dir`.
    pub sys_dir: PathBuf,
    /// Bind mounts of the runtime's `/etc` files: host source, target relative to the root.
    pub etc_binds: Vec<(PathBuf, PathBuf)>,
    /// Extra mounts, in order.
    pub mounts: Vec<PlannedMount>,
    /// Security profile.
    pub security: Security,
    /// Capabilities the container keeps.
    pub caps: u64,
    /// Highest capability number of the kernel.
    pub last_cap: u32,
    /// Set `no_new_privs` (`--security-opt no-new-privileges`; off by default, as in Docker).
    pub no_new_privs: bool,
    /// The seccomp filter installed last before the command runs (`None`: unconfined).
    pub seccomp: Option<Arc<Program>>,
    /// A pidfd of the runtime's process: the container's first process is killed when the thread
    /// that started it dies, and exits at once if the process is already gone.
    pub parent_pidfd: Option<RawFd>,
    /// Credentials.
    pub user: ResolvedUser,
    /// Working directory (absolute, inside the container).
    pub cwd: String,
    /// argv.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<String>,
    /// Descriptors to become stdin, stdout, stderr.
    pub stdio: [RawFd; 3],
    /// `cgroup.procs` files the process writes itself to first (the container's cgroup).
    pub cgroup_procs: Vec<PathBuf>,
    /// The process starts a new session with stdin as its controlling terminal.
    pub controlling_tty: bool,
    /// The terminal bound at `/dev/console` and reopened from there, if stdin is a pty.
    pub console: Option<Console>,
    /// Run [`crate::init`] as pid 1 and the command as its child.
    pub init: bool,
    /// Device nodes copied from the host's `/dev` (`--privileged`).
    pub devices: Vec<Device>,
    /// The runtime's own argument area, overwritten to name the init when `PR_SET_MM` is not
    /// permitted.
    pub arg_area: Option<crate::init::ArgArea>,
    /// The size of `/dev/shm` in bytes; `None` = 64 MiB.
    pub shm_size: Option<u64>,
    /// Resource limits to set (`--ulimit`).
    pub rlimits: Vec<crate::spec::Rlimit>,
}

/// The terminal of a container with a controlling tty, as Docker shows it: bind-mounted at
/// `/dev/console` and reopened from there, so that `ttyname` inside finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Console {
    /// Host path of the pty slave (e.g. `/dev/pts/3`).
    pub source: PathBuf,
    /// The stdio descriptors (0, 1, 2) that are this terminal.
    pub reopen: Vec<RawFd>,
}

/// A device node of the host, recreated in the container's `/dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Path relative to `/dev` (e.g. `loop0`, `net/tun`).
    pub rel: PathBuf,
    /// File type (`S_IFCHR` or `S_IFBLK`) and permission bits.
    pub mode: u32,
    /// Device number.
    pub rdev: u64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// Everything [`build_exec`] needs to start a process in a running container.
#[derive(Debug, Clone)]
pub struct ExecPlanInput {
    /// `cgroup.procs` files to join (host paths).
    pub cgroup_procs: Vec<PathBuf>,
    /// Namespace descriptors to join, with their `CLONE_NEW*` type and a name for messages, in
    /// order (the mount namespace last).
    pub namespaces: Vec<(RawFd, i32, &'static str)>,
    /// The container's root directory (`/proc/PID/root`), open.
    pub root_fd: RawFd,
    /// Pipe to which the intermediate process reports the pid of the process that execs.
    pub report_fd: RawFd,
    /// Capabilities the process keeps.
    pub caps: u64,
    /// Highest capability number of the kernel.
    pub last_cap: u32,
    /// Set `no_new_privs`.
    pub no_new_privs: bool,
    /// The container's seccomp filter (`None`: unconfined).
    pub seccomp: Option<Arc<Program>>,
    /// Credentials.
    pub user: ResolvedUser,
    /// Working directory (absolute, inside the container; must exist).
    pub cwd: String,
    /// argv.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<String>,
    /// Descriptors to become stdin, stdout, stderr.
    pub stdio: [RawFd; 3],
    /// New session with stdin as the controlling terminal.
    pub controlling_tty: bool,
}

/// One kernel operation of the child.
#[derive(Debug)]
pub enum Op {
    /// Set the umask.
    Umask(u32),
    /// Default signal dispositions, nothing blocked.
    ResetSignals,
    /// Join a namespace.
    SetNs {
        /// Namespace descriptor.
        fd: RawFd,
        /// `CLONE_NEW*` type.
        nstype: i32,
    },
    /// `mount(2)`.
    Mount {
        /// Source.
        source: Option<CString>,
        /// Target.
        target: CString,
        /// Filesystem type.
        fstype: Option<CString>,
        /// Flags.
        flags: MsFlags,
        /// Options.
        data: Option<CString>,
    },
    /// An overlay mount with the new mount API.
    OverlayFsconfig {
        /// Target.
        target: CString,
        /// Lower dirs, top first.
        lower: Vec<CString>,
        /// Upper and work dir; none for a read-only overlay.
        upper_work: Option<(CString, CString)>,
        /// Overlayfs flags to set (`volatile`, `userxattr`).
        flags: Vec<&'static CStr>,
    },
    /// Bring up `lo`.
    LoopbackUp,
    /// Set the hostname.
    SetHostname(CString),
    /// Create a directory; an existing one is fine when `allow_exists`.
    Mkdir {
        /// Path.
        path: CString,
        /// Mode.
        mode: u32,
        /// Tolerate `EEXIST`.
        allow_exists: bool,
    },
    /// Create a directory owned by `uid:gid` unless it exists.
    MkdirOwned {
        /// Path.
        path: CString,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// Create an empty file unless something exists there.
    CreateFile(CString),
    /// Create or truncate a file with this content.
    WriteFile {
        /// Path.
        path: CString,
        /// Content.
        data: Vec<u8>,
    },
    /// `setrlimit(2)`.
    SetRlimit {
        /// `RLIMIT_*`.
        resource: i32,
        /// Soft limit.
        soft: u64,
        /// Hard limit.
        hard: u64,
    },
    /// Create a character device.
    Mknod {
        /// Path.
        path: CString,
        /// `S_IFCHR | perm`.
        mode: u32,
        /// Device number.
        dev: u64,
    },
    /// Create a symlink.
    Symlink {
        /// Link target.
        target: CString,
        /// Link path.
        link: CString,
    },
    /// Hide a path: `/dev/null` over files, a read-only tmpfs over directories; absent is fine.
    Mask {
        /// Path.
        path: CString,
        /// The `/dev/null` to bind.
        devnull: CString,
    },
    /// Bind a path onto itself read-only; absent is fine.
    Readonly(CString),
    /// `chdir(2)`.
    Chdir(CString),
    /// `pivot_root(".", ".")` and a lazy unmount of the old root.
    PivotRoot,
    /// Drop every capability above from the bounding set except `keep`.
    DropBounding {
        /// Kept capabilities.
        keep: u64,
        /// Highest capability number.
        last_cap: u32,
    },
    /// `PR_SET_NO_NEW_PRIVS`.
    NoNewPrivs,
    /// `PR_SET_KEEPCAPS`.
    KeepCaps,
    /// `PR_SET_PDEATHSIG` with `SIGKILL`, then exit if the process at this pidfd is gone.
    DieWithParent(RawFd),
    /// Install a seccomp filter.
    Seccomp(Arc<Program>),
    /// Supplementary groups.
    SetGroups(Vec<u32>),
    /// Group id.
    SetGid(u32),
    /// User id.
    SetUid(u32),
    /// Effective and permitted capabilities; inheritable empty.
    Capset {
        /// Effective set.
        effective: u64,
        /// Permitted set.
        permitted: u64,
    },
    /// Make `from` the descriptor `to`.
    Dup2 {
        /// Source descriptor.
        from: RawFd,
        /// Target number.
        to: RawFd,
    },
    /// Everything from 3 up close-on-exec.
    CloexecFrom(u32),
    /// Write `0` to a cgroup's `cgroup.procs`, moving the caller into it.
    JoinCgroup(CString),
    /// Name the process and point its `/proc/self/cmdline` elsewhere (best effort).
    SetTitle {
        /// `/proc/self/comm`.
        comm: CString,
        /// NUL-separated arguments.
        cmdline: Vec<u8>,
        /// Without `CAP_SYS_RESOURCE`: bytes to copy over the argument area at this address.
        overwrite: Option<(usize, Vec<u8>)>,
    },
    /// Change owner without following symlinks.
    Lchown {
        /// Path.
        path: CString,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// Open a path onto several stdio descriptors.
    OpenOnto {
        /// Path.
        path: CString,
        /// Descriptor numbers.
        targets: Vec<RawFd>,
    },
    /// `setsid(2)`.
    SetSid,
    /// `TIOCSCTTY` on a descriptor.
    ControllingTty(RawFd),
    /// `fchdir` to a descriptor and `chroot(".")`.
    ChrootFd(RawFd),
    /// Fork; the caller stays behind as the container's init.
    SpawnInit {
        /// The command's process group takes the terminal's foreground.
        foreground_tty: bool,
    },
    /// Fork a sibling that goes on; the caller reports its pid and exits.
    ForkSibling {
        /// Where to report the pid.
        report_fd: RawFd,
    },
    /// Try each candidate path with `execve` in order, like `execvp`.
    Exec {
        /// Candidate paths.
        candidates: Vec<CString>,
        /// argv and envp.
        args: ExecArgs,
    },
}

/// A step: the operation and what it is, for error messages.
#[derive(Debug)]
pub struct Step {
    /// The operation.
    pub op: Op,
    /// Human description naming the path involved, e.g. "mounting proc at `/proc`".
    pub what: String,
}

/// The whole setup sequence.
#[derive(Debug, Default)]
pub struct Plan {
    /// Steps in order; the last is the exec.
    pub steps: Vec<Step>,
}

fn cstr(what: &str, bytes: &[u8]) -> Result<CString, PlanError> {
    CString::new(bytes).map_err(|_| PlanError::Nul {
        what: what.to_string(),
        value: String::from_utf8_lossy(bytes).into_owned(),
    })
}

fn cpath(path: &Path) -> Result<CString, PlanError> {
    cstr("path", path.as_os_str().as_bytes())
}

/// Shows a root-relative path as the container sees it.
fn shown(rel: &Path) -> String {
    format!("/{}", rel.display())
}

/// Escapes a path for overlay's `lowerdir=`/`upperdir=` option syntax.
fn escape_overlay(path: &Path, out: &mut Vec<u8>) {
    for &b in path.as_os_str().as_bytes() {
        if matches!(b, b'\\' | b':' | b',') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// The overlay option string for `mount(2)`, or `None` if it exceeds one page. `volatile` (with
/// an upper dir) adds overlayfs' option of that name: no sync reaches the upper filesystem, not
/// even at unmount.
/// In a user namespace ([`crate::userns::in_user_namespace`]) `userxattr` is added: overlayfs
/// then keeps its markers (opaque directories) in `user.overlay.*` attributes, as snapshots made
/// there carry them, since `trusted.*` ones need the initial namespace's CAP_SYS_ADMIN.
pub fn overlay_options(lower: &[PathBuf], upper: Option<(&Path, &Path)>, volatile: bool) -> Option<Vec<u8>> {
    overlay_options_for(lower, upper, volatile, crate::userns::in_user_namespace())
}

/// The flags [`overlay_options`] would set, for the new mount API.
pub fn overlay_flags(upper: bool, volatile: bool) -> Vec<&'static CStr> {
    let mut flags = Vec::new();
    if upper && volatile {
        flags.push(c"volatile");
    }
    if crate::userns::in_user_namespace() {
        flags.push(c"userxattr");
    }
    flags
}

/// [`overlay_options`] with the choice of `userxattr` made by the caller.
pub fn overlay_options_for(
    lower: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    volatile: bool,
    userxattr: bool,
) -> Option<Vec<u8>> {
    let mut out = b"lowerdir=".to_vec();
    for (i, l) in lower.iter().enumerate() {
        if i > 0 {
            out.push(b':');
        }
        escape_overlay(l, &mut out);
    }
    if let Some((upper, work)) = upper {
        out.extend_from_slice(b",upperdir=");
        escape_overlay(upper, &mut out);
        out.extend_from_slice(b",workdir=");
        escape_overlay(work, &mut out);
        if volatile {
            out.extend_from_slice(b",volatile");
        }
    }
    if userxattr {
        out.extend_from_slice(b",userxattr");
    }
    (out.len() <= MAX_MOUNT_DATA).then_some(out)
}

struct Builder {
    steps: Vec<Step>,
}

impl Builder {
    fn push(&mut self, op: Op, what: impl Into<String>) {
        self.steps.push(Step {
            op,
            what: what.into(),
        });
    }

    fn mount(
        &mut self,
        source: Option<&[u8]>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&[u8]>,
        what: String,
    ) -> Result<(), PlanError> {
        let op = Op::Mount {
            source: source.map(|s| cstr("mount source", s)).transpose()?,
            target: cpath(target)?,
            fstype: fstype
                .map(|s| cstr("filesystem type", s.as_bytes()))
                .transpose()?,
            flags,
            data: data.map(|s| cstr("mount options", s)).transpose()?,
        };
        self.push(op, what);
        Ok(())
    }

    /// A recursive bind of `source` at `target` (`shown`: the target as the step names it), made
    /// read-only by a remount when asked.
    fn bind(&mut self, source: &Path, target: &Path, shown: &str, readonly: bool) -> Result<(), PlanError> {
        self.mount(
            Some(source.as_os_str().as_bytes()),
            target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
            format!("bind-mounting `{}` at `{shown}`", source.display()),
        )?;
        if readonly {
            self.mount(
                None,
                target,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None,
                format!("making `{shown}` read-only"),
            )?;
        }
        Ok(())
    }

    fn overlay(
        &mut self,
        target: &Path,
        lower: &[PathBuf],
        upper: Option<(&Path, &Path)>,
        volatile: bool,
        what: String,
    ) -> Result<(), PlanError> {
        match overlay_options(lower, upper, volatile) {
            Some(data) => {
                let flags = if upper.is_some() {
                    MsFlags::empty()
                } else {
                    MsFlags::MS_RDONLY
                };
                self.mount(
                    Some(b"overlay"),
                    target,
                    Some("overlay"),
                    flags,
                    Some(&data),
                    what,
                )
            }
            None => {
                let op = Op::OverlayFsconfig {
                    target: cpath(target)?,
                    lower: lower.iter().map(|l| cpath(l)).collect::<Result<_, _>>()?,
                    upper_work: match upper {
                        Some((u, w)) => Some((cpath(u)?, cpath(w)?)),
                        None => None,
                    },
                    flags: overlay_flags(upper.is_some(), volatile),
                };
                self.push(op, what);
                Ok(())
            }
        }
    }
}

/// The candidate paths for `argv[0]`: itself if it contains a `/`, else each `PATH` entry.
pub fn exec_candidates(argv0: &str, env: &[String]) -> Vec<String> {
    if argv0.contains('/') {
        return vec![argv0.to_string()];
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            format!("{}/{argv0}", dir.trim_end_matches('/'))
        })
        .collect()
}

/// Absolute prefixes of a cleaned container path: `/a/b` gives `/a`, `/a/b`.
fn prefixes(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => {
                cur.push('/');
                cur.push_str(&n.to_string_lossy());
                out.push(cur.clone());
            }
            Component::ParentDir => {
                if let Some(i) = cur.rfind('/') {
                    cur.truncate(i);
                }
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// Builds the setup sequence: one step function per stage, in the order the child runs them.
pub fn build(input: &PlanInput) -> Result<Plan, PlanError> {
    if input.args.is_empty() {
        return Err(PlanError::NoArgs);
    }
    let mut b = Builder { steps: Vec::new() };
    process_head(&mut b, input)?;
    scratch(&mut b, input)?;
    rootfs(&mut b, input)?;
    proc(&mut b, input)?;
    dev(&mut b, input)?;
    extra_devices(&mut b, input)?;
    sys(&mut b, input)?;
    etc_binds(&mut b, input)?;
    for m in &input.mounts {
        extra_mount(&mut b, &input.root, m)?;
    }
    masks(&mut b, input)?;
    // While the process still has CAP_SYS_RESOURCE, so that a hard limit may be raised.
    set_rlimits(&mut b, &input.rlimits)?;
    pivot(&mut b, &input.root)?;
    process_tail(
        &mut b,
        &Process {
            user: &input.user,
            cwd: &input.cwd,
            create_cwd: true,
            stdio: input.stdio,
            console_reopen: input.console.as_ref().map(|c| c.reopen.as_slice()),
            controlling_tty: input.controlling_tty,
            caps: input.caps,
            last_cap: input.last_cap,
            no_new_privs: input.no_new_privs,
            seccomp: input.seccomp.clone(),
            parent_pidfd: input.parent_pidfd,
            init: input.init,
            args: &input.args,
            env: &input.env,
        },
    )?;
    Ok(Plan { steps: b.steps })
}

fn nosuid_noexec_nodev() -> MsFlags {
    MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV
}

/// Signals, cgroups, the init's title, umask, network namespace, private mounts, hostname.
fn process_head(b: &mut Builder, input: &PlanInput) -> Result<(), PlanError> {
    b.push(Op::ResetSignals, "resetting signal handlers");
    join_cgroups(b, &input.cgroup_procs)?;
    if input.init {
        b.push(
            Op::SetTitle {
                comm: crate::init::COMM.to_owned(),
                cmdline: crate::init::cmdline(&input.args),
                overwrite: input
                    .arg_area
                    .map(|area| (area.arg_start, crate::init::proctitle(&input.args, &area))),
            },
            "naming the init process",
        );
    }
    b.push(Op::Umask(0), "setting the umask");
    if let NetPlan::Join(fd) = input.network {
        b.push(
            Op::SetNs {
                fd,
                nstype: libc::CLONE_NEWNET,
            },
            "joining the network namespace",
        );
    }
    b.mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
        "making mounts private".to_string(),
    )?;
    if input.network == NetPlan::New {
        b.push(Op::LoopbackUp, "bringing up the loopback interface");
    }
    b.push(
        Op::SetHostname(cstr("hostname", input.hostname.as_bytes())?),
        format!("setting hostname {:?}", input.hostname),
    );
    b.mount(
        Some(b"tmpfs"),
        &input.run_dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(b"mode=700,size=1m"),
        format!("mounting tmpfs at `{}`", input.run_dir.display()),
    )?;
    Ok(())
}

/// The run dir's scratch files and directories.
fn scratch(b: &mut Builder, input: &PlanInput) -> Result<(), PlanError> {
    for entry in &input.scratch {
        match entry {
            ScratchEntry::Dir(path) => b.push(
                Op::Mkdir {
                    path: cpath(path)?,
                    mode: 0o755,
                    allow_exists: false,
                },
                format!("creating `{}`", path.display()),
            ),
            ScratchEntry::File(path, data) => b.push(
                Op::WriteFile {
                    path: cpath(path)?,
                    data: data.clone(),
                },
                format!("writing `{}`", path.display()),
            ),
        }
    }
    Ok(())
}

/// The root filesystem (overlay or bind) and the mount points to create in it.
fn rootfs(b: &mut Builder, input: &PlanInput) -> Result<(), PlanError> {
    let at = |rel: &Path| input.root.join(rel);
    let root = &input.root;
    match &input.rootfs {
        RootMount::Overlay {
            lower,
            upper,
            work,
            volatile,
        } => b.overlay(
            root,
            lower,
            Some((upper, work)),
            *volatile,
            format!("mounting overlay at `/` ({} lower dirs)", lower.len()),
        )?,
        RootMount::Bind(dir) => b.mount(
            Some(dir.as_os_str().as_bytes()),
            root,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
            format!("bind-mounting `{}` at `/`", dir.display()),
        )?,
    }
    for c in &input.create {
        let path = cpath(&at(&c.rel))?;
        if c.dir {
            b.push(
                Op::Mkdir {
                    path,
                    mode: 0o755,
                    allow_exists: true,
                },
                format!("creating mount point `{}`", shown(&c.rel)),
            );
        } else {
            b.push(
                Op::CreateFile(path),
                format!("creating mount point `{}`", shown(&c.rel)),
            );
        }
    }
    Ok(())
}

/// `/proc`.
fn proc(b: &mut Builder, input: &PlanInput) -> Result<(), PlanError> {
    let at = |rel: &Path| input.root.join(rel);
    if input.bind_proc {
        return b.mount(
            Some(b"/proc"),
            &at(&input.proc_dir),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
            format!("bind-mounting `/proc` at `{}`", shown(&input.proc_dir)),
        );
    }
    b.mount(
        Some(b"proc"),
        &at(&input.proc_dir),
        Some("proc"),
        nosuid_noexec_nodev(),
        None,
        format!("mounting proc at `{}`", shown(&input.proc_dir)),
    )?;
    Ok(())
}

/// `/dev`: its tmpfs, Docker's devices and links, devpts, shm and mqueue.
fn dev(b: &mut Builder, input: &PlanInput) -> Result<(), PlanError> {
    let at = |rel: &Path| input.root.join(rel);
    let dev = at(&input.dev_dir);
    b.mount(
        Some(b"tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some(b"mode=755,size=65536k"),
        format!("mounting tmpfs at `{}`", shown(&input.dev_dir)),
    )?;
    for (name, major, minor) in DEVICES {
        if input.userns {
            let target = dev.join(name);
            b.push(Op::CreateFile(cpath(&target)?), format!("creating `/dev/{name}`"));
            let host = Path::new("/dev").join(name);
            b.mount(
                Some(host.as_os_str().as_bytes()),
                &target,
                None,
                MsFlags::MS_BIND,
                None,
                format!("bind-mounting `{}` at `/dev/{name}`", host.display()),
            )?;
            continue;
        }
        b.push(
            Op::Mknod {
                path: cpath(&dev.join(name))?,
                mode: libc::S_IFCHR | 0o666,
                dev: libc::makedev(major, minor),
            },
            format!("creating device `/dev/{name}`"),
        );
    }
    for (name, target) in DEV_LINKS {
        b.push(
            Op::Symlink {
                target: cstr("link", target.as_bytes())?,
                link: cpath(&dev.join(name))?,
            },
            format!("creating symlink `/dev/{name}`"),
        );
    }
    for (name, mode) in [("pts", 0o755), ("shm", 0o1777), ("mqueue", 0o755)] {
        b.push(
            Op::Mkdir {
                path: cpath(&dev.join(name))?,
                mode,
                allow_exists: false,
            },
            format!("creating directory `/dev/{name}`"),
        );
    }
    b.mount(
        Some(b"devpts"),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(b"newinstance,ptmxmode=0666,mode=0620,gid=5"),
        "mounting devpts at `/dev/pts`".to_string(),
    )?;
    // Docker's 64 MiB, or `--shm-size` (in bytes; the kernel rounds it up to pages).
    let shm_data = match input.shm_size {
        None => "mode=1777,size=65536k".to_string(),
        Some(size) => format!("mode=1777,size={size}"),
    };
    b.mount(
        Some(b"shm"),
        &dev.join("shm"),
        Some("tmpfs"),
        nosuid_noexec_nodev(),
        Some(shm_data.as_bytes()),
        "mounting tmpfs at `/dev/shm`".to_string(),
    )?;
    b.mount(
        Some(b"mqueue"),
        &dev.join("mqueue"),
        Some("mqueue"),
        nosuid_noexec_nodev(),
        None,
        "mounting mqueue at `/dev/mqueue`".to_string(),
    )?;
    Ok(())
}

/// `--device`s (or the host's under `--privileged`) and the console.
fn extra_devices(b: &mut Builder, input: &PlanInput) -> Result<(), PlanError> {
    let dev = input.root.join(&input.dev_dir);
    for d in &input.devices {
        let mut parent = PathBuf::new();
        let comps: Vec<_> = d.rel.components().collect();
        for c in comps.iter().take(comps.len().saturating_sub(1)) {
            parent.push(c);
            b.push(
                Op::Mkdir {
                    path: cpath(&dev.join(&parent))?,
                    mode: 0o755,
                    allow_exists: true,
                },
                format!("creating directory `/dev/{}`", parent.display()),
            );
        }
        let path = cpath(&dev.join(&d.rel))?;
        b.push(
            Op::Mknod {
                path: path.clone(),
                mode: d.mode,
                dev: d.rdev,
            },
            format!("creating device `/dev/{}`", d.rel.display()),
        );
        if d.uid != 0 || d.gid != 0 {
            b.push(
                Op::Lchown {
                    path,
                    uid: d.uid,
                    gid: d.gid,
                },
                format!("changing the owner of `/dev/{}`", d.rel.display()),
            );
        }
    }
    if let Some(console) = &input.console {
        let target = dev.join("console");
        b.push(
            Op::CreateFile(cpath(&target)?),
            "creating `/dev/console`".to_string(),
        );
        b.mount(
            Some(console.source.as_os_str().as_bytes()),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
            format!("bind-mounting `{}` at `/dev/console`", console.source.display()),
        )?;
    }
    Ok(())
}

/// `/sys`: sysfs, or the host's bound read-only when sysfs cannot be mounted.
fn sys(b: &mut Builder, input: &PlanInput) -> Result<(), PlanError> {
    let at = |rel: &Path| input.root.join(rel);
    let insecure = input.security == Security::Insecure;
    let sys_flags = if insecure {
        nosuid_noexec_nodev()
    } else {
        nosuid_noexec_nodev() | MsFlags::MS_RDONLY
    };
    if input.bind_sys || (input.userns && input.network == NetPlan::Host) {
        // sysfs may only be mounted by the owner of the network namespace, which the host's is
        // not, and (chroot isolation) not where the runtime's own /sys is partly masked: the
        // host's /sys, bound read-only.
        b.mount(
            Some(b"/sys"),
            &at(&input.sys_dir),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
            format!("bind-mounting `/sys` at `{}`", shown(&input.sys_dir)),
        )?;
        if !insecure {
            b.mount(
                None,
                &at(&input.sys_dir),
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | sys_flags,
                None,
                format!("making `{}` read-only", shown(&input.sys_dir)),
            )?;
        }
    } else {
        b.mount(
            Some(b"sysfs"),
            &at(&input.sys_dir),
            Some("sysfs"),
            sys_flags,
            None,
            format!("mounting sysfs at `{}`", shown(&input.sys_dir)),
        )?;
    }
    Ok(())
}

/// `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname`.
fn etc_binds(b: &mut Builder, input: &PlanInput) -> Result<(), PlanError> {
    let at = |rel: &Path| input.root.join(rel);
    for (source, target) in &input.etc_binds {
        b.mount(
            Some(source.as_os_str().as_bytes()),
            &at(target),
            None,
            MsFlags::MS_BIND,
            None,
            format!("bind-mounting `{}` at `{}`", source.display(), shown(target)),
        )?;
    }
    Ok(())
}

/// One extra mount: its missing mount points, then the mount.
fn extra_mount(b: &mut Builder, root: &Path, m: &PlannedMount) -> Result<(), PlanError> {
    let at = |rel: &Path| root.join(rel);
    for (i, rel) in m.create_first.iter().enumerate() {
        let path = cpath(&at(rel))?;
        let last = i + 1 == m.create_first.len();
        if last && !m.target_is_dir {
            b.push(
                Op::CreateFile(path),
                format!("creating mount point `{}`", shown(rel)),
            );
        } else {
            b.push(
                Op::Mkdir {
                    path,
                    mode: 0o755,
                    allow_exists: true,
                },
                format!("creating mount point `{}`", shown(rel)),
            );
        }
    }
    let target = at(&m.target);
    let t = shown(&m.target);
    match &m.kind {
        MountKind::Bind { source, readonly } => b.bind(source, &target, &t, *readonly)?,
        MountKind::Tmpfs { size, mode } => {
            let mut data = format!("mode={:o}", mode.unwrap_or(0o1777));
            if let Some(size) = size {
                data.push_str(&format!(",size={size}"));
            }
            b.mount(
                Some(b"tmpfs"),
                &target,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_STRICTATIME,
                Some(data.as_bytes()),
                format!("mounting tmpfs at `{t}`"),
            )?;
        }
        MountKind::Overlay { lower, upper } => match (lower.as_slice(), upper) {
            ([only], None) => b.bind(only, &target, &t, true)?,
            (_, upper) => {
                let pair = upper.as_ref().map(|(u, w)| (u.as_path(), w.as_path()));
                let what = match pair {
                    Some(_) => format!("mounting overlay at `{t}`"),
                    None => format!("mounting read-only overlay at `{t}`"),
                };
                b.overlay(&target, lower, pair, false, what)?;
            }
        },
    }
    Ok(())
}

/// Docker's masked and read-only paths, and a read-only root.
fn masks(b: &mut Builder, input: &PlanInput) -> Result<(), PlanError> {
    let root = &input.root;
    let at = |rel: &Path| root.join(rel);
    if input.security != Security::Insecure {
        let devnull = cpath(&at(&input.dev_dir).join("null"))?;
        for p in MASKED_PATHS {
            let rel = Path::new(p.trim_start_matches('/'));
            b.push(
                Op::Mask {
                    path: cpath(&at(rel))?,
                    devnull: devnull.clone(),
                },
                format!("masking `{p}`"),
            );
        }
        for p in READONLY_PATHS {
            let rel = Path::new(p.trim_start_matches('/'));
            b.push(Op::Readonly(cpath(&at(rel))?), format!("making `{p}` read-only"));
        }
    }
    if input.readonly_rootfs {
        b.mount(
            None,
            root,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
            "making `/` read-only".to_string(),
        )?;
    }
    Ok(())
}

/// `pivot_root` into the new root.
fn pivot(b: &mut Builder, root: &Path) -> Result<(), PlanError> {
    b.push(Op::Chdir(cpath(root)?), format!("entering `{}`", root.display()));
    b.push(Op::PivotRoot, "pivoting to the new root");
    b.push(Op::Chdir(c"/".to_owned()), "entering `/`");
    Ok(())
}

fn set_rlimits(b: &mut Builder, rlimits: &[crate::spec::Rlimit]) -> Result<(), PlanError> {
    for r in rlimits {
        let resource =
            crate::spec::Rlimit::resource(&r.name).ok_or_else(|| PlanError::UlimitType(r.name.clone()))?;
        b.push(
            Op::SetRlimit {
                resource,
                soft: r.soft,
                hard: r.hard,
            },
            format!("setting ulimit {}", r.name),
        );
    }
    Ok(())
}

fn join_cgroups(b: &mut Builder, procs: &[PathBuf]) -> Result<(), PlanError> {
    for p in procs {
        b.push(
            Op::JoinCgroup(cpath(p)?),
            format!("joining cgroup `{}`", p.parent().unwrap_or(p).display()),
        );
    }
    Ok(())
}

/// The part of a process's setup after its root is in place, shared by containers and exec.
struct Process<'a> {
    user: &'a ResolvedUser,
    cwd: &'a str,
    create_cwd: bool,
    stdio: [RawFd; 3],
    console_reopen: Option<&'a [RawFd]>,
    controlling_tty: bool,
    caps: u64,
    last_cap: u32,
    no_new_privs: bool,
    seccomp: Option<Arc<Program>>,
    parent_pidfd: Option<RawFd>,
    init: bool,
    args: &'a [String],
    env: &'a [String],
}

fn process_tail(b: &mut Builder, p: &Process<'_>) -> Result<(), PlanError> {
    // Working directory, created and owned by the user like BuildKit does (for containers).
    // Lexically cleaned, as Docker cleans a container's working directory: `/a/../b/` is `/b`
    // whether or not `/a` exists.
    let dirs = prefixes(p.cwd);
    let cwd = dirs.last().cloned().unwrap_or_else(|| "/".to_string());
    if p.create_cwd {
        for dir in dirs {
            b.push(
                Op::MkdirOwned {
                    path: cstr("working directory", dir.as_bytes())?,
                    uid: p.user.uid,
                    gid: p.user.gid,
                },
                format!("creating working directory `{dir}`"),
            );
        }
    }
    b.push(
        Op::Chdir(cstr("working directory", cwd.as_bytes())?),
        format!("changing to working directory `{cwd}`"),
    );

    for (to, from) in p.stdio.iter().enumerate() {
        let name = ["stdin", "stdout", "stderr"][to];
        b.push(
            Op::Dup2 {
                from: *from,
                to: to as RawFd,
            },
            format!("setting up {name}"),
        );
    }
    if let Some(targets) = p.console_reopen {
        b.push(
            Op::OpenOnto {
                path: c"/dev/console".to_owned(),
                targets: targets.to_vec(),
            },
            "opening the terminal at `/dev/console`",
        );
    }
    if p.controlling_tty {
        b.push(Op::SetSid, "starting a new session");
        b.push(Op::ControllingTty(0), "making stdin the controlling terminal");
    }

    b.push(
        Op::DropBounding {
            keep: p.caps,
            last_cap: p.last_cap,
        },
        "dropping capabilities from the bounding set",
    );
    if p.no_new_privs {
        b.push(Op::NoNewPrivs, "setting no_new_privs");
    }
    b.push(
        Op::SetGroups(p.user.additional_gids.clone()),
        format!("setting supplementary groups {:?}", p.user.additional_gids),
    );
    b.push(Op::SetGid(p.user.gid), format!("switching to gid {}", p.user.gid));
    // The seccomp filter goes in after the credentials and capabilities are set, as the last
    // privileged step. Without no_new_privs installing it needs CAP_SYS_ADMIN, which a container
    // rarely keeps: the process holds it (kept across the change of uid) until the filter is
    // in, then sets its final sets, as runc's order does. Root keeps `caps`; another user
    // none (the kernel would clear them at the change of uid; here they are cleared by hand).
    let root = p.user.uid == 0;
    let final_caps = if root { p.caps } else { 0 };
    let privileged_filter = p.seccomp.as_ref().filter(|_| !p.no_new_privs);
    if privileged_filter.is_some() && !root {
        b.push(Op::KeepCaps, "keeping capabilities across the change of uid");
    }
    b.push(Op::SetUid(p.user.uid), format!("switching to uid {}", p.user.uid));
    if let Some(program) = privileged_filter {
        let admin = 1u64 << crate::seccomp::CAP_SYS_ADMIN;
        if !root {
            b.push(
                Op::Capset {
                    effective: admin,
                    permitted: p.caps | admin,
                },
                "raising CAP_SYS_ADMIN to install the seccomp filter",
            );
        }
        b.push(Op::Seccomp(program.clone()), "installing the seccomp filter");
        b.push(
            Op::Capset {
                effective: final_caps,
                permitted: final_caps,
            },
            "setting capabilities",
        );
    } else {
        if root {
            b.push(
                Op::Capset {
                    effective: final_caps,
                    permitted: final_caps,
                },
                "setting capabilities",
            );
        }
        if let Some(program) = &p.seccomp {
            b.push(Op::Seccomp(program.clone()), "installing the seccomp filter");
        }
    }
    // After the credentials: changing them clears the setting.
    if let Some(fd) = p.parent_pidfd {
        b.push(Op::DieWithParent(fd), "arming the parent-death signal");
    }
    b.push(Op::Umask(0o022), "setting the umask");
    if p.init {
        b.push(
            Op::SpawnInit {
                foreground_tty: p.controlling_tty,
            },
            "starting the init process",
        );
    }
    b.push(Op::CloexecFrom(3), "closing inherited descriptors");

    let argv = p
        .args
        .iter()
        .map(|a| cstr("argument", a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = p
        .env
        .iter()
        .map(|e| cstr("environment variable", e.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let candidates = exec_candidates(&p.args[0], p.env)
        .iter()
        .map(|c| cstr("executable path", c.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    b.push(
        Op::Exec {
            candidates,
            args: ExecArgs::new(argv, envp),
        },
        format!("executing `{}`", p.args[0]),
    );
    Ok(())
}

/// Builds the sequence that starts a process in a running container (`kiln exec`): the first
/// process joins the container's cgroups and namespaces and forks a sibling (so that the new
/// process is inside the pid namespace and still the caller's child), which enters the container's
/// root and runs the usual tail: working directory, stdio, terminal, capabilities, credentials,
/// exec.
pub fn build_exec(input: &ExecPlanInput) -> Result<Plan, PlanError> {
    if input.args.is_empty() {
        return Err(PlanError::NoArgs);
    }
    let mut b = Builder { steps: Vec::new() };
    b.push(Op::ResetSignals, "resetting signal handlers");
    join_cgroups(&mut b, &input.cgroup_procs)?;
    for (fd, nstype, name) in &input.namespaces {
        b.push(
            Op::SetNs {
                fd: *fd,
                nstype: *nstype,
            },
            format!("joining the container's {name} namespace"),
        );
    }
    b.push(
        Op::ForkSibling {
            report_fd: input.report_fd,
        },
        "forking into the container's pid namespace",
    );
    b.push(Op::ChrootFd(input.root_fd), "entering the container's root");
    process_tail(
        &mut b,
        &Process {
            user: &input.user,
            cwd: &input.cwd,
            create_cwd: false,
            stdio: input.stdio,
            console_reopen: None,
            controlling_tty: input.controlling_tty,
            caps: input.caps,
            last_cap: input.last_cap,
            no_new_privs: input.no_new_privs,
            seccomp: input.seccomp.clone(),
            parent_pidfd: None,
            init: false,
            args: &input.args,
            env: &input.env,
        },
    )?;
    Ok(Plan { steps: b.steps })
}

fn tolerate(result: Result<(), Errno>, ok: Errno) -> Result<(), Errno> {
    match result {
        Err(e) if e == ok => Ok(()),
        other => other,
    }
}

fn run_op<S: Sys>(sys: &S, op: &Op) -> Result<(), Errno> {
    match op {
        Op::Umask(m) => {
            sys.umask(*m);
            Ok(())
        }
        Op::ResetSignals => sys.reset_signals(),
        Op::SetNs { fd, nstype } => sys.setns(*fd, *nstype),
        Op::Mount {
            source,
            target,
            fstype,
            flags,
            data,
        } => sys.mount(
            source.as_deref(),
            target,
            fstype.as_deref(),
            *flags,
            data.as_deref(),
        ),
        Op::OverlayFsconfig {
            target,
            lower,
            upper_work,
            flags,
        } => sys.mount_overlay_fsconfig(
            target,
            lower,
            upper_work.as_ref().map(|(u, w)| (u.as_c_str(), w.as_c_str())),
            flags,
        ),
        Op::LoopbackUp => sys.loopback_up(),
        Op::SetHostname(name) => sys.sethostname(name),
        Op::Mkdir {
            path,
            mode,
            allow_exists,
        } => {
            let r = sys.mkdir(path, *mode);
            if *allow_exists {
                tolerate(r, Errno::EEXIST)
            } else {
                r
            }
        }
        Op::MkdirOwned { path, uid, gid } => match sys.mkdir(path, 0o755) {
            Ok(()) => sys.lchown(path, *uid, *gid),
            Err(Errno::EEXIST) => Ok(()),
            Err(e) => Err(e),
        },
        Op::CreateFile(path) => tolerate(sys.create_file(path, 0o644), Errno::EEXIST),
        Op::WriteFile { path, data } => sys.write_file(path, data, 0o644),
        Op::Mknod { path, mode, dev } => sys.mknod(path, *mode, *dev),
        Op::SetRlimit { resource, soft, hard } => sys.setrlimit(*resource, *soft, *hard),
        Op::Symlink { target, link } => sys.symlink(target, link),
        Op::Mask { path, devnull } => match sys.stat_kind(path) {
            Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e),
            Ok(FileKind::Dir) => sys.mount(Some(c"tmpfs"), path, Some(c"tmpfs"), MsFlags::MS_RDONLY, None),
            Ok(FileKind::Other) => sys.mount(Some(devnull), path, None, MsFlags::MS_BIND, None),
        },
        Op::Readonly(path) => {
            match sys.mount(Some(path), path, None, MsFlags::MS_BIND | MsFlags::MS_REC, None) {
                Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(e),
                Ok(()) => sys.mount(
                    None,
                    path,
                    None,
                    MsFlags::MS_BIND
                        | MsFlags::MS_REMOUNT
                        | MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NODEV
                        | MsFlags::MS_NOEXEC,
                    None,
                ),
            }
        }
        Op::Chdir(path) => sys.chdir(path),
        Op::PivotRoot => {
            sys.pivot_root(c".", c".")?;
            sys.umount2(c".", libc::MNT_DETACH)
        }
        Op::DropBounding { keep, last_cap } => {
            for cap in 0..=*last_cap {
                if keep & (1u64 << cap) == 0 {
                    tolerate(sys.capbset_drop(cap), Errno::EINVAL)?;
                }
            }
            Ok(())
        }
        Op::NoNewPrivs => sys.set_no_new_privs(),
        Op::KeepCaps => sys.set_keep_caps(),
        Op::DieWithParent(fd) => sys.die_with_parent(*fd),
        Op::Seccomp(program) => sys.seccomp_filter(&program.instructions, program.flags),
        Op::SetGroups(gids) => sys.setgroups(gids),
        Op::SetGid(gid) => sys.setresgid(*gid),
        Op::SetUid(uid) => sys.setresuid(*uid),
        Op::Capset { effective, permitted } => sys.capset(*effective, *permitted, 0),
        Op::Dup2 { from, to } => sys.dup2(*from, *to),
        Op::CloexecFrom(first) => sys.cloexec_from(*first),
        Op::JoinCgroup(path) => sys.write_existing(path, b"0"),
        // Cosmetic: without CAP_SYS_RESOURCE only the name changes.
        Op::SetTitle {
            comm,
            cmdline,
            overwrite,
        } => {
            let overwrite = overwrite.as_ref().map(|(addr, bytes)| (*addr, bytes.as_slice()));
            let _ = sys.set_title(comm, cmdline, overwrite);
            Ok(())
        }
        Op::Lchown { path, uid, gid } => sys.lchown(path, *uid, *gid),
        Op::OpenOnto { path, targets } => sys.open_onto(path, targets),
        Op::SetSid => sys.setsid(),
        Op::ControllingTty(fd) => sys.set_controlling_tty(*fd),
        Op::ChrootFd(fd) => sys.chroot_fd(*fd),
        Op::SpawnInit { foreground_tty } => sys.spawn_init(*foreground_tty),
        Op::ForkSibling { report_fd } => sys.fork_sibling(*report_fd),
        Op::Exec { candidates, args } => {
            let mut saved = Errno::ENOENT;
            for path in candidates {
                match sys.execve(path, args) {
                    Ok(()) => return Ok(()),
                    Err(e @ Errno::EACCES) => saved = e,
                    Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(saved)
        }
    }
}

impl Plan {
    /// Whether the plan can run in a child that shares the caller's memory until it execs
    /// ([`crate::sys::spawn_shared`]): it ends in `execve`, never forks to keep running this
    /// program, and writes no memory of its own process (the title's argv overwrite does).
    pub fn runs_in_shared_memory(&self) -> bool {
        matches!(self.steps.last().map(|s| &s.op), Some(Op::Exec { .. }))
            && self.steps.iter().all(|s| {
                !matches!(
                    s.op,
                    Op::SpawnInit { .. } | Op::ForkSibling { .. } | Op::SetTitle { .. }
                )
            })
    }
}

/// Runs the plan. Does not allocate (with [`crate::sys::RealSys`]). On failure returns the index of
/// the failing step and the errno. With the real kernel it only returns on failure: the last step
/// replaces the process.
pub fn run<S: Sys>(sys: &S, plan: &Plan) -> Result<(), (usize, Errno)> {
    for (i, step) in plan.steps.iter().enumerate() {
        run_op(sys, &step.op).map_err(|e| (i, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::RecordingSys;

    fn input() -> PlanInput {
        PlanInput {
            userns: false,
            bind_proc: false,
            bind_sys: false,
            run_dir: PathBuf::from("/s"),
            scratch: vec![
                ScratchEntry::Dir("/s/root".into()),
                ScratchEntry::Dir("/s/etc".into()),
                ScratchEntry::File("/s/etc/hosts".into(), b"127.0.0.1 localhost\n".to_vec()),
            ],
            root: PathBuf::from("/s/root"),
            rootfs: RootMount::Overlay {
                lower: vec![
                    PathBuf::from("/l/2"),
                    PathBuf::from("/l/1"),
                    PathBuf::from("/s/stub"),
                ],
                upper: PathBuf::from("/u"),
                work: PathBuf::from("/w"),
                volatile: false,
            },
            readonly_rootfs: false,
            network: NetPlan::New,
            hostname: "box".to_string(),
            create: vec![],
            proc_dir: PathBuf::from("proc"),
            dev_dir: PathBuf::from("dev"),
            sys_dir: PathBuf::from("sys"),
            etc_binds: vec![(PathBuf::from("/s/etc/hosts"), PathBuf::from("etc/hosts"))],
            mounts: vec![],
            security: Security::Default,
            caps: crate::caps::DOCKER_DEFAULT_MASK,
            last_cap: 40,
            no_new_privs: false,
            seccomp: Some(test_program()),
            parent_pidfd: Some(9),
            user: ResolvedUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![10],
                home: "/home/app".into(),
            },
            cwd: "/app/src".to_string(),
            args: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec!["PATH=/usr/bin:/bin".into()],
            stdio: [10, 11, 12],
            cgroup_procs: vec![],
            controlling_tty: false,
            console: None,
            init: false,
            devices: vec![],
            arg_area: None,
            shm_size: None,
            rlimits: Vec::new(),
        }
    }

    fn test_program() -> Arc<Program> {
        let ret_allow = libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x7fff_0000,
        };
        Arc::new(Program {
            instructions: vec![ret_allow; 3],
            flags: 0,
        })
    }

    fn calls(input: &PlanInput) -> Vec<String> {
        let plan = build(input).unwrap();
        let fake = RecordingSys::new();
        run(&fake, &plan).unwrap();
        fake.calls()
    }

    fn index_from(calls: &[String], prefix: &str, from: usize) -> usize {
        calls
            .iter()
            .skip(from)
            .position(|c| c.starts_with(prefix))
            .map(|i| i + from)
            .unwrap_or_else(|| panic!("no call `{prefix}` after {from} in {calls:#?}"))
    }

    #[test]
    fn shm_size_and_rlimits_are_set_before_the_credentials_change() {
        let mut i = input();
        i.shm_size = Some(128 << 20);
        i.rlimits = vec![
            crate::spec::Rlimit {
                name: "nofile".into(),
                soft: 1000,
                hard: 2000,
            },
            crate::spec::Rlimit {
                name: "core".into(),
                soft: 0,
                hard: u64::MAX,
            },
        ];
        let c = calls(&i);
        assert!(
            c.contains(
                &"mount shm /s/root/dev/shm tmpfs MS_NOSUID|MS_NODEV|MS_NOEXEC mode=1777,size=134217728"
                    .to_string()
            ),
            "{c:#?}"
        );
        let nofile = index_from(&c, &format!("setrlimit {} 1000 2000", libc::RLIMIT_NOFILE), 0);
        let core = index_from(&c, &format!("setrlimit {} 0 {}", libc::RLIMIT_CORE, u64::MAX), 0);
        let uid = index_from(&c, "setresuid", 0);
        assert!(nofile < core && core < uid, "{c:#?}");
        i.rlimits[0].name = "as".into();
        assert!(matches!(build(&i), Err(PlanError::UlimitType(n)) if n == "as"));
    }

    #[test]
    fn default_sequence_is_ordered() {
        let c = calls(&input());
        assert_eq!(c[0], "reset_signals");
        assert_eq!(c[1], "umask 0");
        assert!(c[2].starts_with("mount - / - MS_REC|MS_PRIVATE"), "{}", c[2]);
        assert_eq!(c[3], "loopback_up");
        assert_eq!(c[4], "sethostname box");
        assert_eq!(c[5], "mount tmpfs /s tmpfs MS_NOSUID|MS_NODEV mode=700,size=1m");
        assert_eq!(
            &c[6..9],
            [
                "mkdir /s/root 755",
                "mkdir /s/etc 755",
                "write /s/etc/hosts 644 \"127.0.0.1 localhost\\n\""
            ]
        );
        assert_eq!(
            c[9],
            "mount overlay /s/root overlay 0 lowerdir=/l/2:/l/1:/s/stub,upperdir=/u,workdir=/w"
        );
        let order = [
            "mount proc /s/root/proc proc",
            "mount tmpfs /s/root/dev tmpfs",
            "mknod /s/root/dev/null 20666 0x103",
            "symlink /proc/self/fd /s/root/dev/fd",
            "mount devpts /s/root/dev/pts devpts",
            "mount shm /s/root/dev/shm tmpfs",
            "mount sysfs /s/root/sys sysfs MS_RDONLY|MS_NOSUID|MS_NODEV|MS_NOEXEC",
            "mount /s/etc/hosts /s/root/etc/hosts - MS_BIND",
            "stat /s/root/proc/kcore",
            "mount /s/root/dev/null /s/root/proc/kcore - MS_BIND",
            "mount /s/root/proc/sys /s/root/proc/sys - MS_BIND|MS_REC",
            "chdir /s/root",
            "pivot_root . .",
            "umount2 . 2",
            "chdir /",
            "mkdir /app 755",
            "lchown /app 1000:1000",
            "mkdir /app/src 755",
            "chdir /app/src",
            "dup2 10 0",
            "dup2 12 2",
            "capbset_drop 2",
            "setgroups [10]",
            "setresgid 1000",
            "keep_caps",
            "setresuid 1000",
            "capset eff=0x200000 prm=0xa82425fb inh=0x0",
            "seccomp 3 instructions flags=0x0",
            "capset eff=0x0 prm=0x0 inh=0x0",
            "die_with_parent 9",
            "umask 22",
            "cloexec_from 3",
            "execve /usr/bin/sh [\"sh\", \"-c\", \"true\"]",
        ];
        let mut last = 0;
        for want in order {
            last = index_from(&c, want, last);
        }
        // Docker leaves no_new_privs off: a setuid binary still raises privileges.
        assert!(!c.iter().any(|l| l == "no_new_privs"));
        // Docker's caps stay in the bounding set.
        for kept in crate::caps::DOCKER_DEFAULT_CAPS {
            assert!(!c.contains(&format!("capbset_drop {kept}")), "dropped {kept}");
        }
        assert!(c.contains(&"capbset_drop 21".to_string()));
        // Every masked path is looked at.
        for p in MASKED_PATHS {
            assert!(c.contains(&format!("stat /s/root{p}")), "{p} not masked");
        }
    }

    #[test]
    fn insecure_root_keeps_everything() {
        let mut i = input();
        i.security = Security::Insecure;
        i.caps = 0x1ffffffffff;
        i.user = ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            home: "/root".into(),
        };
        i.network = NetPlan::Host;
        i.seccomp = None;
        let c = calls(&i);
        assert!(!c
            .iter()
            .any(|l| l.starts_with("stat ") || l == "no_new_privs" || l == "loopback_up"));
        assert!(!c.iter().any(|l| l.starts_with("capbset_drop")));
        assert!(c.contains(&"capset eff=0x1ffffffffff prm=0x1ffffffffff inh=0x0".to_string()));
        assert!(c
            .iter()
            .any(|l| l.starts_with("mount sysfs /s/root/sys sysfs MS_NOSUID|MS_NODEV|MS_NOEXEC")));
    }

    #[test]
    fn masks_pick_tmpfs_for_dirs_and_skip_missing() {
        let plan = build(&input()).unwrap();
        let fake = RecordingSys::new();
        fake.add_dir("/s/root/proc/acpi");
        fake.fail_on("stat /s/root/proc/scsi", Errno::ENOENT);
        fake.fail_on("mount /s/root/proc/irq", Errno::ENOENT);
        run(&fake, &plan).unwrap();
        let c = fake.calls();
        assert!(c.contains(&"mount tmpfs /s/root/proc/acpi tmpfs MS_RDONLY -".to_string()));
        assert!(!c.iter().any(|l| l.contains("/proc/scsi - MS_BIND")));
        assert!(!c.iter().any(|l| l.starts_with("mount - /s/root/proc/irq")));
    }

    #[test]
    fn failure_reports_the_step() {
        let plan = build(&input()).unwrap();
        let fake = RecordingSys::new();
        fake.fail_on("mount overlay", Errno::EINVAL);
        let (i, e) = run(&fake, &plan).unwrap_err();
        assert_eq!(e, Errno::EINVAL);
        assert_eq!(plan.steps[i].what, "mounting overlay at `/` (3 lower dirs)");
        // Nothing after the failing step ran.
        assert_eq!(
            fake.calls().last().map(String::as_str),
            Some("mount overlay /s/root overlay 0 lowerdir=/l/2:/l/1:/s/stub,upperdir=/u,workdir=/w")
        );
    }

    #[test]
    fn exec_walks_path_like_execvp() {
        let plan = build(&input()).unwrap();
        let fake = RecordingSys::new();
        fake.fail_on("execve /usr/bin/sh", Errno::ENOENT);
        run(&fake, &plan).unwrap();
        assert!(fake
            .calls()
            .last()
            .is_some_and(|l| l.starts_with("execve /bin/sh")));

        let fake = RecordingSys::new();
        fake.fail_on("execve /usr/bin/sh", Errno::EACCES);
        fake.fail_on("execve /bin/sh", Errno::ENOENT);
        let (i, e) = run(&fake, &plan).unwrap_err();
        assert_eq!(
            (plan.steps[i].what.as_str(), e),
            ("executing `sh`", Errno::EACCES)
        );
        assert_eq!(exec_candidates("/x/y", &[]), vec!["/x/y"]);
        assert_eq!(exec_candidates("ls", &[]).len(), DEFAULT_PATH.split(':').count());
    }

    #[test]
    fn many_lower_dirs_use_the_new_mount_api() {
        let mut i = input();
        let lower: Vec<PathBuf> = (0..200)
            .map(|n| PathBuf::from(format!("/var/lib/kiln/snapshots/{n:064}/fs")))
            .collect();
        i.rootfs = RootMount::Overlay {
            lower,
            upper: "/u".into(),
            work: "/w".into(),
            volatile: true,
        };
        let c = calls(&i);
        assert!(
            c.contains(&"fsmount overlay /s/root lower=200 upper=/u work=/w volatile".to_string()),
            "{c:#?}"
        );
    }

    #[test]
    fn overlay_options_escape_and_limit() {
        let o = overlay_options(&[PathBuf::from("/a:b"), PathBuf::from("/c,d")], None, true).unwrap();
        assert_eq!(o, b"lowerdir=/a\\:b:/c\\,d");
        let long: Vec<PathBuf> = (0..100).map(|n| PathBuf::from(format!("/{n:060}"))).collect();
        assert!(overlay_options(&long, None, false).is_none());
        let o = overlay_options(
            &[PathBuf::from("/l")],
            Some((Path::new("/u"), Path::new("/w"))),
            true,
        )
        .unwrap();
        assert_eq!(o, b"lowerdir=/l,upperdir=/u,workdir=/w,volatile");
        let o = overlay_options_for(&[PathBuf::from("/l")], None, false, true).unwrap();
        assert_eq!(o, b"lowerdir=/l,userxattr");
    }

    #[test]
    fn extra_mounts_and_created_points() {
        let mut i = input();
        i.rootfs = RootMount::Bind(PathBuf::from("/rootdir"));
        i.readonly_rootfs = true;
        i.create = vec![
            Create {
                rel: "cache".into(),
                dir: true,
            },
            Create {
                rel: "cache/x".into(),
                dir: true,
            },
        ];
        i.mounts = vec![
            PlannedMount {
                target: "cache/x".into(),
                kind: MountKind::Tmpfs {
                    size: Some(1 << 20),
                    mode: None,
                },
                target_is_dir: true,
                create_first: vec![],
            },
            PlannedMount {
                target: "cache/x/f".into(),
                kind: MountKind::Bind {
                    source: "/host/f".into(),
                    readonly: true,
                },
                target_is_dir: false,
                create_first: vec!["cache/x/f".into()],
            },
        ];
        let c = calls(&i);
        let order = [
            "mount /rootdir /s/root - MS_BIND|MS_REC",
            "mkdir /s/root/cache 755",
            "mkdir /s/root/cache/x 755",
            "mount proc",
            "mount tmpfs /s/root/cache/x tmpfs MS_NOSUID|MS_NODEV|MS_STRICTATIME mode=1777,size=1048576",
            "create /s/root/cache/x/f 644",
            "mount /host/f /s/root/cache/x/f - MS_BIND|MS_REC",
            "mount - /s/root/cache/x/f - MS_RDONLY|MS_REMOUNT|MS_BIND",
            "mount - /s/root - MS_RDONLY|MS_REMOUNT|MS_BIND",
            "pivot_root",
        ];
        let mut last = 0;
        for want in order {
            last = index_from(&c, want, last);
        }
    }

    #[test]
    fn join_network_and_nul_bytes() {
        let mut i = input();
        i.network = NetPlan::Join(7);
        let c = calls(&i);
        assert_eq!(c[2], "setns 7 0x40000000");
        i.env.push("BAD=\0".into());
        assert!(matches!(build(&i), Err(PlanError::Nul { .. })));
        i.args.clear();
        assert!(matches!(build(&i), Err(PlanError::NoArgs)));
    }

    #[test]
    fn tty_init_cgroup_and_devices() {
        let mut i = input();
        i.user = ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            home: "/root".into(),
        };
        i.cgroup_procs = vec![PathBuf::from("/cg/memory/kiln/x/cgroup.procs")];
        i.controlling_tty = true;
        i.console = Some(Console {
            source: "/dev/pts/7".into(),
            reopen: vec![0, 1, 2],
        });
        i.init = true;
        i.arg_area = Some(crate::init::ArgArea {
            arg_start: 1000,
            arg_end: 1010,
            env_start: 1010,
            env_end: 1100,
        });
        i.devices = vec![Device {
            rel: "net/tun".into(),
            mode: libc::S_IFCHR | 0o666,
            rdev: libc::makedev(10, 200),
            uid: 0,
            gid: 5,
        }];
        let c = calls(&i);
        assert_eq!(c[0], "reset_signals");
        assert_eq!(c[1], "write_existing /cg/memory/kiln/x/cgroup.procs \"0\"");
        assert_eq!(
            c[2],
            "set_title kiln-init \"kiln-init\\0--\\0sh\\0-c\\0true\\0\" \
             overwrite=Some((1000, \"kiln-init -- sh -c true\\0\"))"
        );
        let order = [
            "mount mqueue",
            "mkdir /s/root/dev/net 755",
            "mknod /s/root/dev/net/tun 20666 0xac8",
            "lchown /s/root/dev/net/tun 0:5",
            "create /s/root/dev/console 644",
            "mount /dev/pts/7 /s/root/dev/console - MS_BIND",
            "pivot_root",
            "dup2 12 2",
            "open_onto /dev/console [0, 1, 2]",
            "setsid",
            "tiocsctty 0",
            "capbset_drop",
            "setresuid 0",
            "capset",
            "umask 22",
            "spawn_init tty=true",
            "cloexec_from 3",
            "execve /usr/bin/sh",
        ];
        let mut last = 0;
        for want in order {
            last = index_from(&c, want, last);
        }
    }

    #[test]
    fn exec_plan_joins_then_forks_then_enters_the_root() {
        let input = ExecPlanInput {
            cgroup_procs: vec![PathBuf::from("/cg/pids/kiln/x/cgroup.procs")],
            namespaces: vec![
                (20, libc::CLONE_NEWIPC, "ipc"),
                (21, libc::CLONE_NEWPID, "pid"),
                (22, libc::CLONE_NEWNS, "mnt"),
            ],
            root_fd: 23,
            report_fd: 24,
            caps: crate::caps::DOCKER_DEFAULT_MASK,
            last_cap: 40,
            no_new_privs: true,
            seccomp: None,
            user: ResolvedUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![],
                home: "/home/app".into(),
            },
            cwd: "/work".into(),
            args: vec!["ls".into()],
            env: vec!["PATH=/bin".into()],
            stdio: [30, 31, 32],
            controlling_tty: true,
        };
        let plan = build_exec(&input).unwrap();
        let fake = RecordingSys::new();
        run(&fake, &plan).unwrap();
        let c = fake.calls();
        let want = [
            "reset_signals",
            "write_existing /cg/pids/kiln/x/cgroup.procs \"0\"",
            "setns 20 0x8000000",
            "setns 21 0x20000000",
            "setns 22 0x20000",
            "fork_sibling 24",
            "chroot_fd 23",
            "chdir /work",
            "dup2 30 0",
            "dup2 31 1",
            "dup2 32 2",
            "setsid",
            "tiocsctty 0",
        ];
        assert_eq!(c[..want.len()], want);
        // The working directory of an exec is not created.
        assert!(!c.iter().any(|l| l.starts_with("mkdir")));
        assert!(c.contains(&"no_new_privs".to_string()));
        assert_eq!(c.last().map(String::as_str), Some("execve /bin/ls [\"ls\"]"));
        let (i, e) = {
            let fake = RecordingSys::new();
            fake.fail_on("setns 21", Errno::EPERM);
            run(&fake, &plan).unwrap_err()
        };
        assert_eq!(
            (plan.steps[i].what.as_str(), e),
            ("joining the container's pid namespace", Errno::EPERM)
        );
    }

    #[test]
    fn seccomp_goes_in_last_with_or_without_no_new_privs() {
        // no_new_privs: no privilege is needed, the filter follows the credentials directly.
        let mut i = input();
        i.no_new_privs = true;
        let c = calls(&i);
        let tail: Vec<&str> = c
            .iter()
            .skip_while(|l| !l.starts_with("capbset_drop"))
            .filter(|l| !l.starts_with("capbset_drop"))
            .map(String::as_str)
            .collect();
        assert_eq!(
            tail[..6],
            [
                "no_new_privs",
                "setgroups [10]",
                "setresgid 1000",
                "setresuid 1000",
                "seccomp 3 instructions flags=0x0",
                "die_with_parent 9"
            ]
        );
        // Root keeps its set: the filter goes in with every capability still held.
        let mut i = input();
        i.user.uid = 0;
        let c = calls(&i);
        let at = |p: &str| index_from(&c, p, 0);
        assert!(at("setresuid 0") < at("seccomp"));
        assert!(at("seccomp") < at("capset eff=0xa80425fb prm=0xa80425fb"));
        assert!(!c.iter().any(|l| l == "keep_caps"));
        // Unconfined: no filter at all.
        let mut i = input();
        i.seccomp = None;
        let c = calls(&i);
        assert!(!c
            .iter()
            .any(|l| l.starts_with("seccomp") || l == "keep_caps" || l.starts_with("capset")));
    }

    #[test]
    fn working_directory_is_cleaned_lexically() {
        let mut i = input();
        i.cwd = "/gone/../app/./src/".into();
        let c = calls(&i);
        assert!(c.iter().any(|l| l == "chdir /app/src"), "{c:?}");
        assert!(!c.iter().any(|l| l.contains("gone")), "{c:?}");
    }

    #[test]
    fn volatile_root_overlay_mounts_with_the_option() {
        let mut i = input();
        if let RootMount::Overlay { volatile, .. } = &mut i.rootfs {
            *volatile = true;
        }
        let c = calls(&i);
        let want =
            "mount overlay /s/root overlay 0 lowerdir=/l/2:/l/1:/s/stub,upperdir=/u,workdir=/w,volatile";
        assert!(c.iter().any(|c| c == want), "{c:#?}");
    }

    #[test]
    fn shared_memory_only_for_plans_that_end_in_exec_without_forking() {
        // A build step's container: straight to execve, fit for a CLONE_VM child.
        assert!(build(&input()).unwrap().runs_in_shared_memory());
        // An init keeps running this program (it forks and waits) and overwrites its argv.
        let mut i = input();
        i.init = true;
        let plan = build(&i).unwrap();
        assert!(plan.steps.iter().any(|s| matches!(s.op, Op::SpawnInit { .. })));
        assert!(!plan.runs_in_shared_memory());
        // A plan that stops short of execve never returns control to a suspended parent.
        let mut plan = build(&input()).unwrap();
        plan.steps.pop();
        assert!(!plan.runs_in_shared_memory());
    }

    #[test]
    fn prefixes_of_cwd() {
        assert_eq!(prefixes("/a/b/../c"), vec!["/a", "/a/c"]);
        assert_eq!(prefixes("/"), Vec::<String>::new());
    }
}
