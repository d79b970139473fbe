//! Every kernel call the runtime makes, behind the [`Sys`] trait.
//!
//! [`RealSys`] (`real.rs`) issues the system calls; [`RecordingSys`] (`recording.rs`) records them
//! as text so that the order of mounts, credential changes and the final exec can be unit-tested
//! without root. `process.rs` holds the calls the runtime makes around the child (clone, wait,
//! pipes, signals, terminals) and the few file calls no safe wrapper offers (`FICLONE`) and `reaper.rs` the fork and wait loop of `kiln run --init`'s pid 1.
//!
//! Architecture Invariant: this is the only module of the workspace that contains `unsafe`.
//! Every `unsafe` block carries a `// SAFETY:` comment.
//!
//! Methods of [`Sys`] run in the forked child of a multithreaded process: they must not allocate
//! and may only issue async-signal-safe system calls. Everything they need (paths as `CStr`,
//! argv and envp arrays) is computed before the fork.

use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use libc::c_char;
pub use nix::errno::Errno;
pub use nix::mount::MsFlags;

mod process;
mod real;
pub mod reaper;
mod recording;

pub use process::*;
pub use real::RealSys;
pub use recording::RecordingSys;

/// argv and envp for `execve`, with their NULL-terminated pointer arrays built ahead of the fork.
pub struct ExecArgs {
    argv: Vec<CString>,
    envp: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    envp_ptrs: Vec<*const c_char>,
}

impl std::fmt::Debug for ExecArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecArgs")
            .field("argv", &self.argv)
            .field("envp", &self.envp)
            .finish()
    }
}

// SAFETY: the raw pointers point into the heap buffers of `argv` and `envp`, which this value
// owns and never mutates; moving it to another thread moves those buffers with it.
unsafe impl Send for ExecArgs {}

impl ExecArgs {
    /// Builds the pointer arrays. The pointers point into the `CString` heap buffers, which do not
    /// move when the `ExecArgs` value moves.
    pub fn new(argv: Vec<CString>, envp: Vec<CString>) -> Self {
        let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<*const c_char> = envp.iter().map(|a| a.as_ptr()).collect();
        envp_ptrs.push(std::ptr::null());
        ExecArgs {
            argv,
            envp,
            argv_ptrs,
            envp_ptrs,
        }
    }

    /// The argument vector.
    pub fn argv(&self) -> &[CString] {
        &self.argv
    }

    /// The environment, `KEY=VALUE` strings.
    pub fn envp(&self) -> &[CString] {
        &self.envp
    }
}

/// What `stat` found at a path, as far as the sandbox cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A directory.
    Dir,
    /// Anything else.
    Other,
}

/// The kernel calls made while setting up a container, in the child, before `execve`.
///
/// Implementations used in the child must not allocate.
pub trait Sys {
    /// `mount(2)`.
    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: MsFlags,
        data: Option<&CStr>,
    ) -> Result<(), Errno>;
    /// Mounts an overlay with the new mount API (`fsopen`, `fsconfig` with `lowerdir+`, `fsmount`,
    /// `move_mount`), which has no one-page limit on the lower dirs.
    fn mount_overlay_fsconfig(
        &self,
        target: &CStr,
        lower: &[CString],
        upper_work: Option<(&CStr, &CStr)>,
        flags: &[&CStr],
    ) -> Result<(), Errno>;
    /// `umount2(2)`.
    fn umount2(&self, target: &CStr, flags: i32) -> Result<(), Errno>;
    /// `setns(2)`.
    fn setns(&self, fd: RawFd, nstype: i32) -> Result<(), Errno>;
    /// `sethostname(2)`.
    fn sethostname(&self, name: &CStr) -> Result<(), Errno>;
    /// `unshare(2)` with the given `CLONE_*` flags.
    fn unshare(&self, flags: libc::c_int) -> Result<(), Errno>;
    /// Sets `IFF_UP` on the loopback interface of the current network namespace.
    fn loopback_up(&self) -> Result<(), Errno>;
    /// `mkdir(2)`.
    fn mkdir(&self, path: &CStr, mode: u32) -> Result<(), Errno>;
    /// `mknod(2)`.
    fn mknod(&self, path: &CStr, mode: u32, dev: u64) -> Result<(), Errno>;
    /// `prlimit(0, resource, {soft, hard})`: sets a resource limit of the calling process
    /// (`u64::MAX` = `RLIM_INFINITY`).
    fn setrlimit(&self, resource: i32, soft: u64, hard: u64) -> Result<(), Errno>;
    /// `symlink(2)`.
    fn symlink(&self, target: &CStr, link: &CStr) -> Result<(), Errno>;
    /// Creates an empty regular file, failing with `EEXIST` if anything is there.
    fn create_file(&self, path: &CStr, mode: u32) -> Result<(), Errno>;
    /// Creates (or truncates) a regular file with `data` as its content.
    fn write_file(&self, path: &CStr, data: &[u8], mode: u32) -> Result<(), Errno>;
    /// `lchown(2)`.
    fn lchown(&self, path: &CStr, uid: u32, gid: u32) -> Result<(), Errno>;
    /// `stat(2)`, reduced to directory or not.
    fn stat_kind(&self, path: &CStr) -> Result<FileKind, Errno>;
    /// `chdir(2)`.
    fn chdir(&self, path: &CStr) -> Result<(), Errno>;
    /// `pivot_root(2)`.
    fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> Result<(), Errno>;
    /// `umask(2)`.
    fn umask(&self, mask: u32);
    /// `prctl(PR_CAPBSET_DROP, cap)`.
    fn capbset_drop(&self, cap: u32) -> Result<(), Errno>;
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
    fn set_no_new_privs(&self) -> Result<(), Errno>;
    /// `prctl(PR_SET_KEEPCAPS, 1)`: the permitted set survives the next change of uid away from
    /// 0 (the kernel clears the flag at `execve`).
    fn set_keep_caps(&self) -> Result<(), Errno>;
    /// `prctl(PR_SET_PDEATHSIG, SIGKILL)`, then a check that the process whose pidfd is `parent`
    /// has not already exited (it may have died before the signal was armed): `ESRCH` if it has.
    /// The kernel clears the setting when the effective or filesystem ids change, so call it
    /// after the credentials are final.
    fn die_with_parent(&self, parent: RawFd) -> Result<(), Errno>;
    /// `seccomp(SECCOMP_SET_MODE_FILTER, flags, program)`: installs a classic BPF filter on the
    /// calling thread. Without `no_new_privs` the caller needs `CAP_SYS_ADMIN` in its effective
    /// set.
    fn seccomp_filter(&self, program: &[libc::sock_filter], flags: u32) -> Result<(), Errno>;
    /// `setgroups(2)`.
    fn setgroups(&self, gids: &[u32]) -> Result<(), Errno>;
    /// `setresgid(2)` with all three ids equal.
    fn setresgid(&self, gid: u32) -> Result<(), Errno>;
    /// `setresuid(2)` with all three ids equal.
    fn setresuid(&self, uid: u32) -> Result<(), Errno>;
    /// `capset(2)` of the calling thread, 64-bit masks.
    fn capset(&self, effective: u64, permitted: u64, inheritable: u64) -> Result<(), Errno>;
    /// `dup2(2)`; the new descriptor does not have `FD_CLOEXEC`.
    fn dup2(&self, old: RawFd, new: RawFd) -> Result<(), Errno>;
    /// Resets the dispositions of the standard signals (1 to 31) to `SIG_DFL` and unblocks all
    /// signals. Real-time signals need no reset: `execve` resets caught ones, and none is ignored.
    fn reset_signals(&self) -> Result<(), Errno>;
    /// Marks every descriptor from `first` on close-on-exec (`close_range` with
    /// `CLOSE_RANGE_CLOEXEC`). Kernels without it are tolerated.
    fn cloexec_from(&self, first: u32) -> Result<(), Errno>;
    /// `execve(2)`. Returns only on failure; the recording fake returns `Ok(())` to stand for a
    /// successful exec.
    fn execve(&self, path: &CStr, args: &ExecArgs) -> Result<(), Errno>;
    /// `setsid(2)`: the caller leads a new session and process group.
    fn setsid(&self) -> Result<(), Errno>;
    /// `ioctl(fd, TIOCSCTTY, 0)`: the terminal open at `fd` becomes the controlling terminal of the
    /// caller's session.
    fn set_controlling_tty(&self, fd: RawFd) -> Result<(), Errno>;
    /// Opens `path` read-write with `O_NOCTTY`, makes it each of `targets` (without
    /// `FD_CLOEXEC`) and closes the original descriptor.
    fn open_onto(&self, path: &CStr, targets: &[RawFd]) -> Result<(), Errno>;
    /// Writes `data` to an existing file without creating or truncating it (a cgroup's
    /// `cgroup.procs`).
    fn write_existing(&self, path: &CStr, data: &[u8]) -> Result<(), Errno>;
    /// `fchdir(fd)` then `chroot(".")`: enters the root directory open at `fd`.
    fn chroot_fd(&self, fd: RawFd) -> Result<(), Errno>;
    /// Names the process (`PR_SET_NAME`, `/proc/self/comm`) and points `/proc/self/cmdline` at
    /// `cmdline` (NUL-separated, NUL-terminated; `PR_SET_MM`, which needs `CAP_SYS_RESOURCE`).
    /// `cmdline` must stay alive and unmoved for the life of the process.
    /// Without that capability, `overwrite` (an address and bytes) is copied over the process's
    /// own argument area instead (see [`crate::init::proctitle`]).
    fn set_title(&self, comm: &CStr, cmdline: &[u8], overwrite: Option<(usize, &[u8])>) -> Result<(), Errno>;
    /// Forks; the calling process becomes a minimal init ([`crate::init`]) that forwards signals to
    /// the new process, reaps zombies and exits with the new process's status: it never returns.
    /// Returns in the new process only. With `foreground_tty`, the new process gets a process
    /// group of its own and makes it the foreground group of the terminal on stdin.
    fn spawn_init(&self, foreground_tty: bool) -> Result<(), Errno>;
    /// Forks a sibling (`CLONE_PARENT`: its parent is the caller's parent); the caller writes the
    /// sibling's pid (4 bytes, little endian) to `report_fd` and exits. Returns in the sibling.
    fn fork_sibling(&self, report_fd: RawFd) -> Result<(), Errno>;
}

fn check(ret: libc::c_int) -> Result<(), Errno> {
    if ret == -1 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

fn check_long(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret == -1 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

fn opt_ptr(s: Option<&CStr>) -> *const c_char {
    s.map_or(std::ptr::null(), CStr::as_ptr)
}

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const CAP_V3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn close_quietly(fd: libc::c_int) {
    // SAFETY: `fd` is a descriptor this module opened and owns; closing it twice is avoided by
    // every caller.
    unsafe {
        libc::close(fd);
    }
}
