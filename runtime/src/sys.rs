//! Every kernel call the runtime makes, behind the [`Sys`] trait.
//!
//! [`RealSys`] issues the system calls; [`RecordingSys`] records them as text so that the order of
//! mounts, credential changes and the final exec can be unit-tested without root.
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

/// The real kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealSys;

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

/// `fork(2)` of a process that has exactly one thread (the caller checks it): `Ok(None)` in the
/// child, `Ok(Some(pid))` in the parent. Used only by [`crate::userns::enter`] at start-up, before
/// any thread exists, so the child may allocate and run anything the parent could.
pub fn fork_single_threaded() -> Result<Option<libc::pid_t>, Errno> {
    // SAFETY: the caller has one thread, so no lock can be held by a thread that does not exist
    // in the child; the child continues with a consistent copy of the whole process.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => Ok(None),
        nix::unistd::ForkResult::Parent { child } => Ok(Some(child.as_raw())),
    }
}

/// `_exit(2)`: ends the process at once, without running exit handlers or flushing buffers the
/// parent's copy will flush (a forked helper's way out).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no memory of the process.
    unsafe { libc::_exit(code) }
}

fn close_quietly(fd: libc::c_int) {
    // SAFETY: `fd` is a descriptor this module opened and owns; closing it twice is avoided by
    // every caller.
    unsafe {
        libc::close(fd);
    }
}

impl RealSys {
    fn fsconfig_string(fs: libc::c_int, key: &CStr, value: &CStr) -> Result<(), Errno> {
        // SAFETY: fsconfig with FSCONFIG_SET_STRING reads two NUL-terminated strings that outlive
        // the call; `fs` is an fs context descriptor.
        check_long(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs,
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0 as libc::c_int,
            )
        })
        .map(|_| ())
    }
}

/// The flags of the mount at `target` a bind remount must keep (nosuid, nodev, noexec, atime
/// behaviour), from `statvfs(2)`; none when it fails. Allocates nothing.
fn bind_remount_flags(target: &CStr) -> MsFlags {
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `target` is NUL-terminated; `st` is a valid out pointer.
    if unsafe { libc::statvfs(target.as_ptr(), &mut st) } != 0 {
        return MsFlags::empty();
    }
    let mut out = MsFlags::empty();
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, MsFlags::MS_NOSUID),
        (libc::ST_NODEV, MsFlags::MS_NODEV),
        (libc::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (libc::ST_NOATIME, MsFlags::MS_NOATIME),
        (libc::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (libc::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            out |= ms_flag;
        }
    }
    out
}

/// `PR_SET_NAME`, then `PR_SET_MM` of the argument area.
fn set_mm_args(comm: &CStr, cmdline: &[u8]) -> Result<(), Errno> {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 15 bytes).
    check(unsafe { libc::prctl(libc::PR_SET_NAME, comm.as_ptr() as libc::c_ulong, 0, 0, 0) })?;
    if cmdline.is_empty() {
        return Ok(());
    }
    let start = cmdline.as_ptr() as libc::c_ulong;
    let end = start + cmdline.len() as libc::c_ulong;
    let set = |opt: libc::c_int, addr: libc::c_ulong| {
        // SAFETY: PR_SET_MM only records the address; `cmdline` outlives the process's use of
        // it (the caller guarantees it stays alive and unmoved).
        check(unsafe { libc::prctl(libc::PR_SET_MM, opt as libc::c_ulong, addr, 0, 0) })
    };
    // The kernel keeps arg_start <= arg_end after each call: the order depends on where the
    // new range lies relative to the old one.
    match set(libc::PR_SET_MM_ARG_START, start) {
        Ok(()) => set(libc::PR_SET_MM_ARG_END, end),
        Err(Errno::EINVAL) => {
            set(libc::PR_SET_MM_ARG_END, end)?;
            set(libc::PR_SET_MM_ARG_START, start)
        }
        Err(e) => Err(e),
    }
}

impl Sys for RealSys {
    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: MsFlags,
        data: Option<&CStr>,
    ) -> Result<(), Errno> {
        let mut flags = flags;
        if flags.contains(MsFlags::MS_REMOUNT | MsFlags::MS_BIND) {
            // A bind remount must repeat the flags the mount has: in a user namespace those of a
            // mount inherited from the host are locked, and leaving one out fails with EPERM.
            flags |= bind_remount_flags(target);
        }
        // SAFETY: all pointers are NUL-terminated strings or NULL and outlive the call.
        check(unsafe {
            libc::mount(
                opt_ptr(source),
                target.as_ptr(),
                opt_ptr(fstype),
                flags.bits(),
                opt_ptr(data).cast(),
            )
        })
    }

    fn mount_overlay_fsconfig(
        &self,
        target: &CStr,
        lower: &[CString],
        upper_work: Option<(&CStr, &CStr)>,
        flags: &[&CStr],
    ) -> Result<(), Errno> {
        // SAFETY: fsopen reads a NUL-terminated filesystem name.
        let fs = check_long(unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) })?
            as libc::c_int;
        let configure = || -> Result<libc::c_int, Errno> {
            for dir in lower {
                Self::fsconfig_string(fs, c"lowerdir+", dir)?;
            }
            if let Some((upper, work)) = upper_work {
                Self::fsconfig_string(fs, c"upperdir", upper)?;
                Self::fsconfig_string(fs, c"workdir", work)?;
            }
            for flag in flags {
                // SAFETY: FSCONFIG_SET_FLAG reads one NUL-terminated key; no value.
                check_long(unsafe {
                    libc::syscall(
                        libc::SYS_fsconfig,
                        fs,
                        FSCONFIG_SET_FLAG,
                        flag.as_ptr(),
                        std::ptr::null::<c_char>(),
                        0 as libc::c_int,
                    )
                })?;
            }
            // SAFETY: FSCONFIG_CMD_CREATE takes no key or value pointers.
            check_long(unsafe {
                libc::syscall(
                    libc::SYS_fsconfig,
                    fs,
                    FSCONFIG_CMD_CREATE,
                    std::ptr::null::<c_char>(),
                    std::ptr::null::<c_char>(),
                    0 as libc::c_int,
                )
            })?;
            // SAFETY: fsmount takes the fs context descriptor and plain flags.
            let mnt = check_long(unsafe {
                libc::syscall(libc::SYS_fsmount, fs, FSMOUNT_CLOEXEC, 0 as libc::c_uint)
            })? as libc::c_int;
            Ok(mnt)
        };
        let result = configure();
        close_quietly(fs);
        let mnt = result?;
        // SAFETY: move_mount reads two NUL-terminated paths; `mnt` is the detached mount descriptor.
        let moved = check_long(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                mnt,
                c"".as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        });
        close_quietly(mnt);
        moved.map(|_| ())
    }

    fn umount2(&self, target: &CStr, flags: i32) -> Result<(), Errno> {
        // SAFETY: `target` is NUL-terminated and outlives the call.
        check(unsafe { libc::umount2(target.as_ptr(), flags) })
    }

    fn setns(&self, fd: RawFd, nstype: i32) -> Result<(), Errno> {
        // SAFETY: setns takes a descriptor number and flags; no memory is passed.
        check(unsafe { libc::setns(fd, nstype) })
    }

    fn unshare(&self, flags: libc::c_int) -> Result<(), Errno> {
        // SAFETY: unshare takes only an integer and affects the calling thread's namespaces.
        check(unsafe { libc::unshare(flags) })
    }

    fn sethostname(&self, name: &CStr) -> Result<(), Errno> {
        let bytes = name.to_bytes();
        // SAFETY: the pointer and length describe the bytes of `name`.
        check(unsafe { libc::sethostname(bytes.as_ptr().cast(), bytes.len()) })
    }

    fn loopback_up(&self) -> Result<(), Errno> {
        // SAFETY: socket takes plain integers.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        check(sock)?;
        // SAFETY: ifreq is a plain C struct for which all-zero bytes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        req.ifr_name[0] = b'l' as c_char;
        req.ifr_name[1] = b'o' as c_char;
        // SAFETY: SIOCGIFFLAGS writes the flags into `req`, which is a valid ifreq.
        let got = check(unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req as *mut libc::ifreq) });
        let result = got.and_then(|()| {
            // SAFETY: after SIOCGIFFLAGS the flags member of the union is the initialised one.
            unsafe {
                req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            }
            // SAFETY: SIOCSIFFLAGS reads `req`, a valid ifreq.
            check(unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS, &req as *const libc::ifreq) })
        });
        close_quietly(sock);
        result
    }

    fn mkdir(&self, path: &CStr, mode: u32) -> Result<(), Errno> {
        // SAFETY: `path` is NUL-terminated.
        check(unsafe { libc::mkdir(path.as_ptr(), mode) })
    }

    fn mknod(&self, path: &CStr, mode: u32, dev: u64) -> Result<(), Errno> {
        // SAFETY: `path` is NUL-terminated.
        check(unsafe { libc::mknod(path.as_ptr(), mode, dev) })
    }

    fn symlink(&self, target: &CStr, link: &CStr) -> Result<(), Errno> {
        // SAFETY: both strings are NUL-terminated.
        check(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) })
    }

    fn create_file(&self, path: &CStr, mode: u32) -> Result<(), Errno> {
        // SAFETY: `path` is NUL-terminated; the returned descriptor is closed below.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                mode as libc::c_uint,
            )
        };
        check(fd)?;
        close_quietly(fd);
        Ok(())
    }

    fn write_file(&self, path: &CStr, data: &[u8], mode: u32) -> Result<(), Errno> {
        // SAFETY: `path` is NUL-terminated; the returned descriptor is closed below.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_CREAT | libc::O_TRUNC | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                mode as libc::c_uint,
            )
        };
        check(fd)?;
        let mut done = 0;
        let mut result = Ok(());
        while done < data.len() {
            // SAFETY: the pointer and length describe the unwritten tail of `data`.
            let n = unsafe { libc::write(fd, data[done..].as_ptr().cast(), data.len() - done) };
            if n < 0 {
                let e = Errno::last();
                if e != Errno::EINTR {
                    result = Err(e);
                    break;
                }
            } else if n == 0 {
                result = Err(Errno::EIO);
                break;
            } else {
                done += n as usize;
            }
        }
        close_quietly(fd);
        result
    }

    fn lchown(&self, path: &CStr, uid: u32, gid: u32) -> Result<(), Errno> {
        // SAFETY: `path` is NUL-terminated.
        check(unsafe { libc::lchown(path.as_ptr(), uid, gid) })
    }

    fn stat_kind(&self, path: &CStr) -> Result<FileKind, Errno> {
        // SAFETY: `stat` is a plain C struct; all-zero is valid and the kernel overwrites it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated and `st` is a valid out pointer.
        check(unsafe { libc::stat(path.as_ptr(), &mut st) })?;
        Ok(if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            FileKind::Dir
        } else {
            FileKind::Other
        })
    }

    fn chdir(&self, path: &CStr) -> Result<(), Errno> {
        // SAFETY: `path` is NUL-terminated.
        check(unsafe { libc::chdir(path.as_ptr()) })
    }

    fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> Result<(), Errno> {
        // SAFETY: both strings are NUL-terminated.
        check_long(unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) })
            .map(|_| ())
    }

    fn umask(&self, mask: u32) {
        // SAFETY: umask takes a plain integer and cannot fail.
        unsafe {
            libc::umask(mask);
        }
    }

    fn capbset_drop(&self, cap: u32) -> Result<(), Errno> {
        // SAFETY: prctl with PR_CAPBSET_DROP takes plain integers.
        check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) })
    }

    fn set_no_new_privs(&self) -> Result<(), Errno> {
        // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes plain integers.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) })
    }

    fn set_keep_caps(&self) -> Result<(), Errno> {
        // SAFETY: prctl with PR_SET_KEEPCAPS takes plain integers.
        check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1 as libc::c_ulong, 0, 0, 0) })
    }

    fn die_with_parent(&self, parent: RawFd) -> Result<(), Errno> {
        // SAFETY: prctl with PR_SET_PDEATHSIG takes plain integers.
        check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) })?;
        let mut fd = libc::pollfd {
            fd: parent,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout. A pidfd polls readable once its process exited.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        match n {
            0 => Ok(()),
            n if n > 0 => Err(Errno::ESRCH),
            _ => Err(Errno::last()),
        }
    }

    fn seccomp_filter(&self, program: &[libc::sock_filter], flags: u32) -> Result<(), Errno> {
        const SECCOMP_SET_MODE_FILTER: libc::c_uint = 1;
        let len = u16::try_from(program.len()).map_err(|_| Errno::E2BIG)?;
        let fprog = libc::sock_fprog {
            len,
            filter: program.as_ptr().cast_mut(),
        };
        // SAFETY: `fprog` points at `program`'s instructions, which outlive the call; the kernel
        // copies and verifies them and never writes through the pointer.
        check_long(unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                flags as libc::c_uint,
                &fprog as *const libc::sock_fprog,
            )
        })
        .map(|_| ())
    }

    fn setgroups(&self, gids: &[u32]) -> Result<(), Errno> {
        // SAFETY: the pointer and length describe `gids`. The raw syscall, like `setresgid`:
        // glibc's wrapper broadcasts the change to every thread it knows of and waits for them,
        // and in a child cloned from a multithreaded process those threads do not exist, so it
        // would wait forever.
        check_long(unsafe { libc::syscall(libc::SYS_setgroups, gids.len(), gids.as_ptr()) }).map(|_| ())
    }

    fn setresgid(&self, gid: u32) -> Result<(), Errno> {
        // SAFETY: plain integers. The raw syscall sets only this thread's ids; the child has one
        // thread, and glibc's wrapper would try to signal threads that do not exist here.
        check_long(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }).map(|_| ())
    }

    fn setresuid(&self, uid: u32) -> Result<(), Errno> {
        // SAFETY: plain integers; see `setresgid` for why the raw syscall is used.
        check_long(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }).map(|_| ())
    }

    fn capset(&self, effective: u64, permitted: u64, inheritable: u64) -> Result<(), Errno> {
        let header = CapHeader {
            version: CAP_V3,
            pid: 0,
        };
        let data = [
            CapData {
                effective: effective as u32,
                permitted: permitted as u32,
                inheritable: inheritable as u32,
            },
            CapData {
                effective: (effective >> 32) as u32,
                permitted: (permitted >> 32) as u32,
                inheritable: (inheritable >> 32) as u32,
            },
        ];
        // SAFETY: capset v3 reads one header and two data structs, all valid for the call.
        check_long(unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) })
            .map(|_| ())
    }

    fn dup2(&self, old: RawFd, new: RawFd) -> Result<(), Errno> {
        if old == new {
            // dup2 onto itself keeps FD_CLOEXEC; clear it instead.
            // SAFETY: fcntl with F_SETFD takes plain integers.
            return check(unsafe { libc::fcntl(old, libc::F_SETFD, 0) });
        }
        // SAFETY: dup2 takes plain descriptor numbers.
        check(unsafe { libc::dup2(old, new) })
    }

    fn reset_signals(&self) -> Result<(), Errno> {
        for sig in 1..32 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            // SAFETY: sigaction is a plain C struct; all-zero means SIG_DFL, empty mask, no flags.
            let action: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: `action` is valid for reading; the old action is not requested. Signals the C
            // library reserves fail with EINVAL, which is ignored.
            unsafe {
                libc::sigaction(sig, &action, std::ptr::null_mut());
            }
        }
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t.
        unsafe {
            libc::sigemptyset(&mut set);
        }
        // SAFETY: `set` is initialised; the old mask is not requested.
        check(unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) })
    }

    fn cloexec_from(&self, first: u32) -> Result<(), Errno> {
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        // SAFETY: close_range takes plain integers.
        match check_long(unsafe {
            libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC)
        }) {
            Ok(_) | Err(Errno::ENOSYS) | Err(Errno::EINVAL) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn execve(&self, path: &CStr, args: &ExecArgs) -> Result<(), Errno> {
        // SAFETY: `path` is NUL-terminated; argv and envp are NULL-terminated arrays of pointers
        // into CStrings owned by `args`, which outlives the call.
        unsafe {
            libc::execve(path.as_ptr(), args.argv_ptrs.as_ptr(), args.envp_ptrs.as_ptr());
        }
        Err(Errno::last())
    }

    fn setsid(&self) -> Result<(), Errno> {
        // SAFETY: setsid takes no arguments.
        check(unsafe { libc::setsid() })
    }

    fn set_controlling_tty(&self, fd: RawFd) -> Result<(), Errno> {
        // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal the terminal).
        check(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0 as libc::c_int) })
    }

    fn open_onto(&self, path: &CStr, targets: &[RawFd]) -> Result<(), Errno> {
        // SAFETY: `path` is NUL-terminated; the descriptor is closed below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        check(fd)?;
        let mut result = Ok(());
        for &target in targets {
            // SAFETY: dup2 takes plain descriptor numbers; the copy has no FD_CLOEXEC.
            if let Err(e) = check(unsafe { libc::dup2(fd, target) }) {
                result = Err(e);
                break;
            }
        }
        if !targets.contains(&fd) {
            close_quietly(fd);
        }
        result
    }

    fn write_existing(&self, path: &CStr, data: &[u8]) -> Result<(), Errno> {
        // SAFETY: `path` is NUL-terminated; the descriptor is closed below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        check(fd)?;
        // SAFETY: the pointer and length describe `data`. cgroup files take one write.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        let result = if n < 0 {
            Err(Errno::last())
        } else if n as usize != data.len() {
            Err(Errno::EIO)
        } else {
            Ok(())
        };
        close_quietly(fd);
        result
    }

    fn chroot_fd(&self, fd: RawFd) -> Result<(), Errno> {
        // SAFETY: fchdir takes a descriptor number.
        check(unsafe { libc::fchdir(fd) })?;
        // SAFETY: "." is a NUL-terminated string.
        check(unsafe { libc::chroot(c".".as_ptr()) })
    }

    fn set_title(&self, comm: &CStr, cmdline: &[u8], overwrite: Option<(usize, &[u8])>) -> Result<(), Errno> {
        let result = set_mm_args(comm, cmdline);
        match (result, overwrite) {
            (Err(_), Some((addr, bytes))) => {
                // SAFETY: `addr` and the length of `bytes` lie inside the process's argument and
                // environment area, as the kernel reported it in /proc/self/stat before the clone
                // (`crate::init::proctitle` never produces more bytes than that area holds). The
                // area is part of the writable stack mapping; this process (the container's first,
                // about to become its init) has its own copy and never reads its argv again.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len());
                }
                Ok(())
            }
            (result, _) => result,
        }
    }
    fn spawn_init(&self, foreground_tty: bool) -> Result<(), Errno> {
        crate::init::spawn(foreground_tty)
    }

    fn fork_sibling(&self, report_fd: RawFd) -> Result<(), Errno> {
        let flags = (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_long;
        // SAFETY: clone without CLONE_VM and with a NULL stack behaves like fork; the caller is the
        // single-threaded child of a clone and both sides only make async-signal-safe calls.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone,
                flags,
                0 as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
            )
        };
        if ret < 0 {
            return Err(Errno::last());
        }
        if ret == 0 {
            return Ok(());
        }
        let pid = (ret as i32).to_le_bytes();
        // SAFETY: `report_fd` is a pipe descriptor the plan keeps open for this step.
        let fd = unsafe { BorrowedFd::borrow_raw(report_fd) };
        let code = if write_all(fd, &pid).is_ok() { 0 } else { 1 };
        exit_child(code)
    }
}

/// A fake kernel that records every call as a line of text and fails the calls it is told to.
#[derive(Debug, Default)]
pub struct RecordingSys {
    calls: RefCell<Vec<String>>,
    fail: RefCell<Vec<(String, Errno)>>,
    dirs: RefCell<Vec<String>>,
}

impl RecordingSys {
    /// A fake on which every call succeeds and every path `stat`s as a regular file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the first call whose recorded line starts with `prefix` fail with `errno`.
    pub fn fail_on(&self, prefix: &str, errno: Errno) {
        self.fail.borrow_mut().push((prefix.to_string(), errno));
    }

    /// Makes `stat_kind` report `path` as a directory.
    pub fn add_dir(&self, path: &str) {
        self.dirs.borrow_mut().push(path.to_string());
    }

    /// The calls recorded so far.
    pub fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }

    fn record(&self, line: String) -> Result<(), Errno> {
        let mut fail = self.fail.borrow_mut();
        let hit = fail
            .iter()
            .position(|(prefix, _)| line.starts_with(prefix.as_str()));
        self.calls.borrow_mut().push(line);
        match hit {
            Some(i) => Err(fail.remove(i).1),
            None => Ok(()),
        }
    }
}

fn show(s: &CStr) -> String {
    s.to_string_lossy().into_owned()
}

fn show_flags(flags: MsFlags) -> String {
    if flags.is_empty() {
        return "0".to_string();
    }
    flags
        .iter_names()
        .map(|(name, _)| name)
        .collect::<Vec<_>>()
        .join("|")
}

fn show_opt(s: Option<&CStr>) -> String {
    s.map_or_else(|| "-".to_string(), show)
}

impl Sys for RecordingSys {
    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: MsFlags,
        data: Option<&CStr>,
    ) -> Result<(), Errno> {
        self.record(format!(
            "mount {} {} {} {} {}",
            show_opt(source),
            show(target),
            show_opt(fstype),
            show_flags(flags),
            show_opt(data)
        ))
    }

    fn mount_overlay_fsconfig(
        &self,
        target: &CStr,
        lower: &[CString],
        upper_work: Option<(&CStr, &CStr)>,
        flags: &[&CStr],
    ) -> Result<(), Errno> {
        let (upper, work) =
            upper_work.map_or(("-".to_string(), "-".to_string()), |(u, w)| (show(u), show(w)));
        self.record(format!(
            "fsmount overlay {} lower={} upper={upper} work={work}{}",
            show(target),
            lower.len(),
            flags.iter().map(|f| format!(" {}", show(f))).collect::<String>()
        ))
    }

    fn umount2(&self, target: &CStr, flags: i32) -> Result<(), Errno> {
        self.record(format!("umount2 {} {flags}", show(target)))
    }

    fn setns(&self, fd: RawFd, nstype: i32) -> Result<(), Errno> {
        self.record(format!("setns {fd} {nstype:#x}"))
    }

    fn unshare(&self, flags: libc::c_int) -> Result<(), Errno> {
        self.record(format!("unshare {flags:#x}"))
    }

    fn sethostname(&self, name: &CStr) -> Result<(), Errno> {
        self.record(format!("sethostname {}", show(name)))
    }

    fn loopback_up(&self) -> Result<(), Errno> {
        self.record("loopback_up".to_string())
    }

    fn mkdir(&self, path: &CStr, mode: u32) -> Result<(), Errno> {
        self.record(format!("mkdir {} {mode:o}", show(path)))
    }

    fn mknod(&self, path: &CStr, mode: u32, dev: u64) -> Result<(), Errno> {
        self.record(format!("mknod {} {mode:o} {dev:#x}", show(path)))
    }

    fn symlink(&self, target: &CStr, link: &CStr) -> Result<(), Errno> {
        self.record(format!("symlink {} {}", show(target), show(link)))
    }

    fn create_file(&self, path: &CStr, mode: u32) -> Result<(), Errno> {
        self.record(format!("create {} {mode:o}", show(path)))
    }

    fn write_file(&self, path: &CStr, data: &[u8], mode: u32) -> Result<(), Errno> {
        self.record(format!(
            "write {} {mode:o} {:?}",
            show(path),
            String::from_utf8_lossy(data)
        ))
    }

    fn lchown(&self, path: &CStr, uid: u32, gid: u32) -> Result<(), Errno> {
        self.record(format!("lchown {} {uid}:{gid}", show(path)))
    }

    fn stat_kind(&self, path: &CStr) -> Result<FileKind, Errno> {
        let p = show(path);
        self.record(format!("stat {p}"))?;
        Ok(if self.dirs.borrow().contains(&p) {
            FileKind::Dir
        } else {
            FileKind::Other
        })
    }

    fn chdir(&self, path: &CStr) -> Result<(), Errno> {
        self.record(format!("chdir {}", show(path)))
    }

    fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> Result<(), Errno> {
        self.record(format!("pivot_root {} {}", show(new_root), show(put_old)))
    }

    fn umask(&self, mask: u32) {
        // umask cannot fail; a configured failure is ignored.
        let _ = self.record(format!("umask {mask:o}"));
    }

    fn capbset_drop(&self, cap: u32) -> Result<(), Errno> {
        self.record(format!("capbset_drop {cap}"))
    }

    fn set_no_new_privs(&self) -> Result<(), Errno> {
        self.record("no_new_privs".to_string())
    }

    fn set_keep_caps(&self) -> Result<(), Errno> {
        self.record("keep_caps".to_string())
    }

    fn seccomp_filter(&self, program: &[libc::sock_filter], flags: u32) -> Result<(), Errno> {
        self.record(format!("seccomp {} instructions flags={flags:#x}", program.len()))
    }

    fn die_with_parent(&self, parent: RawFd) -> Result<(), Errno> {
        self.record(format!("die_with_parent {parent}"))
    }

    fn setgroups(&self, gids: &[u32]) -> Result<(), Errno> {
        self.record(format!("setgroups {gids:?}"))
    }

    fn setresgid(&self, gid: u32) -> Result<(), Errno> {
        self.record(format!("setresgid {gid}"))
    }

    fn setresuid(&self, uid: u32) -> Result<(), Errno> {
        self.record(format!("setresuid {uid}"))
    }

    fn capset(&self, effective: u64, permitted: u64, inheritable: u64) -> Result<(), Errno> {
        self.record(format!(
            "capset eff={effective:#x} prm={permitted:#x} inh={inheritable:#x}"
        ))
    }

    fn dup2(&self, old: RawFd, new: RawFd) -> Result<(), Errno> {
        self.record(format!("dup2 {old} {new}"))
    }

    fn reset_signals(&self) -> Result<(), Errno> {
        self.record("reset_signals".to_string())
    }

    fn cloexec_from(&self, first: u32) -> Result<(), Errno> {
        self.record(format!("cloexec_from {first}"))
    }

    fn execve(&self, path: &CStr, args: &ExecArgs) -> Result<(), Errno> {
        let argv: Vec<String> = args.argv().iter().map(|a| show(a)).collect();
        self.record(format!("execve {} {argv:?}", show(path)))
    }

    fn setsid(&self) -> Result<(), Errno> {
        self.record("setsid".to_string())
    }

    fn set_controlling_tty(&self, fd: RawFd) -> Result<(), Errno> {
        self.record(format!("tiocsctty {fd}"))
    }

    fn open_onto(&self, path: &CStr, targets: &[RawFd]) -> Result<(), Errno> {
        self.record(format!("open_onto {} {targets:?}", show(path)))
    }

    fn write_existing(&self, path: &CStr, data: &[u8]) -> Result<(), Errno> {
        self.record(format!(
            "write_existing {} {:?}",
            show(path),
            String::from_utf8_lossy(data)
        ))
    }

    fn chroot_fd(&self, fd: RawFd) -> Result<(), Errno> {
        self.record(format!("chroot_fd {fd}"))
    }

    fn set_title(&self, comm: &CStr, cmdline: &[u8], overwrite: Option<(usize, &[u8])>) -> Result<(), Errno> {
        self.record(format!(
            "set_title {} {:?} overwrite={:?}",
            show(comm),
            String::from_utf8_lossy(cmdline),
            overwrite.map(|(addr, b)| (addr, String::from_utf8_lossy(b).into_owned()))
        ))
    }

    fn spawn_init(&self, foreground_tty: bool) -> Result<(), Errno> {
        self.record(format!("spawn_init tty={foreground_tty}"))
    }

    fn fork_sibling(&self, report_fd: RawFd) -> Result<(), Errno> {
        self.record(format!("fork_sibling {report_fd}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Calls made by the parent process around the child.

/// Result of [`clone_child`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloned {
    /// In the parent: the child's pid.
    Parent(i32),
    /// In the child.
    Child,
}

/// [`block_all_signals`], returning the mask the thread had, for [`restore_signal_mask`].
fn block_all_signals_saving() -> Result<nix::sys::signal::SigSet, Errno> {
    use nix::sys::signal::{SigSet, SigmaskHow};
    SigSet::all().thread_swap_mask(SigmaskHow::SIG_SETMASK)
}

/// Puts back a mask [`block_all_signals_saving`] returned.
fn restore_signal_mask(old: &nix::sys::signal::SigSet) {
    let _ = old.thread_set_mask();
}

/// Creates a child process in new namespaces (`clone(2)` without a new stack, so it behaves like
/// `fork`). All signals are blocked around the call so no handler of the parent runs in the child;
/// the child must reset dispositions and unblock them itself ([`Sys::reset_signals`]).
///
/// In the child only async-signal-safe calls may follow: the parent may be multithreaded.
pub fn clone_child(namespaces: libc::c_int) -> Result<Cloned, Errno> {
    let old = block_all_signals_saving()?;
    let flags = namespaces as libc::c_long | libc::SIGCHLD as libc::c_long;
    // SAFETY: clone without CLONE_VM and with a NULL stack duplicates the address space like fork;
    // the child runs on its own copy of this stack and only makes async-signal-safe calls.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            0 as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if ret == 0 {
        return Ok(Cloned::Child);
    }
    let err = Errno::last();
    restore_signal_mask(&old);
    if ret < 0 {
        Err(err)
    } else {
        Ok(Cloned::Parent(ret as i32))
    }
}

/// Runs `child` in a new process in new namespaces that shares this address space until it
/// executes a program or exits (`clone(2)` with `CLONE_VM | CLONE_VFORK`, as `posix_spawn`
/// does): no page tables are copied and none torn down at `execve`, which `fork` costs a
/// multithreaded process on every container start. The calling thread is suspended until then;
/// the other threads run on. `child` runs on a stack of its own (with a guard page) and must make
/// only async-signal-safe calls, write no memory but its own stack, and end in `execve` or
/// [`exit_child`]: a child that returns or panics exits with 127. All signals are blocked around
/// the call, as for [`clone_child`].
///
/// A child that keeps running this program (an init that forks and waits) must use
/// [`clone_child`]: this one would hold the caller's thread until it ends.
pub fn spawn_shared(namespaces: libc::c_int, child: &mut dyn FnMut()) -> Result<i32, Errno> {
    const STACK: usize = 256 * 1024;
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    };
    // SAFETY: a fresh anonymous private mapping; checked for MAP_FAILED below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK + page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    struct Unmap(*mut libc::c_void, usize);
    impl Drop for Unmap {
        fn drop(&mut self) {
            // SAFETY: the mapping made above, no longer used: the child has exec'd or exited.
            unsafe {
                libc::munmap(self.0, self.1);
            }
        }
    }
    let _unmap = Unmap(base, STACK + page);
    // The lowest page is the guard: an overflow faults instead of writing below the stack.
    // SAFETY: the first page of the mapping made above.
    check(unsafe { libc::mprotect(base, page, libc::PROT_NONE) })?;

    extern "C" fn trampoline(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` points at the `&mut dyn FnMut()` below, alive while the parent is
        // suspended (CLONE_VFORK).
        let child = unsafe { &mut *(arg as *mut &mut dyn FnMut()) };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child));
        exit_child(127)
    }

    let old = block_all_signals_saving()?;
    let mut arg: &mut dyn FnMut() = child;
    // SAFETY: the stack top is the end of a live mapping (16-byte aligned: mmap returns page
    // aligned memory); `trampoline` receives a pointer to `arg`, which outlives the child's use
    // of it since CLONE_VFORK suspends this thread until the child execs or exits.
    let ret = unsafe {
        libc::clone(
            trampoline,
            (base as *mut u8).add(STACK + page) as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | namespaces | libc::SIGCHLD,
            &mut arg as *mut &mut dyn FnMut() as *mut libc::c_void,
        )
    };
    let err = Errno::last();
    restore_signal_mask(&old);
    if ret < 0 {
        Err(err)
    } else {
        Ok(ret)
    }
}

/// Ends the child immediately, without running destructors or `atexit` handlers.
pub fn exit_child(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
}

/// Writes all of `buf` to `fd`, retrying on `EINTR`. Async-signal-safe.
pub fn write_all(fd: BorrowedFd<'_>, buf: &[u8]) -> Result<(), Errno> {
    let mut done = 0;
    while done < buf.len() {
        match nix::unistd::write(fd, &buf[done..]) {
            Ok(0) => return Err(Errno::EPIPE),
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads until `buf` is full or end of file; returns the number of bytes read.
pub fn read_full(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    let mut done = 0;
    while done < buf.len() {
        match nix::unistd::read(fd, &mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A pipe with both ends close-on-exec: (read, write).
pub fn pipe_cloexec() -> Result<(OwnedFd, OwnedFd), Errno> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
}

/// Duplicates `fd` to a close-on-exec descriptor numbered 3 or higher.
pub fn dup_above_stdio(fd: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    let new = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Opens a path read-only with `O_CLOEXEC` (for `/dev/null` and namespace files).
pub fn open_cloexec(path: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
}

/// How a waited-for process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with a status code.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
    /// Still running (only from a non-blocking wait).
    Running,
}

/// `waitpid(2)` for one child, retrying on `EINTR`.
pub fn wait_pid(pid: i32, block: bool) -> Result<Exit, Errno> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let flags = if block { None } else { Some(WaitPidFlag::WNOHANG) };
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), flags) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(Exit::Code(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(Exit::Signal(sig as i32)),
            Ok(WaitStatus::StillAlive) => return Ok(Exit::Running),
            Ok(_) => {
                if !block {
                    return Ok(Exit::Running);
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// `kill(2)` with a raw signal number.
pub fn kill(pid: i32, sig: i32) -> Result<(), Errno> {
    let signal = nix::sys::signal::Signal::try_from(sig)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
}

/// A pidfd of the calling process (`pidfd_open(getpid())`, close-on-exec): it polls readable once
/// the process has exited.
pub fn pidfd_self() -> Result<OwnedFd, Errno> {
    // SAFETY: getpid has no preconditions; pidfd_open takes plain integers and returns a new
    // descriptor, owned below.
    let fd = check_long(unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0 as libc::c_uint) })?;
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The permitted capability set of the calling thread.
pub fn permitted_caps() -> Result<u64, Errno> {
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget v3 writes two data structs into `data` and may update the header.
    check_long(unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, data.as_mut_ptr()) })?;
    Ok(u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32))
}

/// Closes every descriptor from `first` on (`close_range`); kernels without it are tolerated.
/// Async-signal-safe.
pub fn close_from(first: u32) {
    // SAFETY: close_range takes plain integers; the caller owns every descriptor it closes (the
    // init after its fork, which needs none of them).
    unsafe {
        libc::syscall(libc::SYS_close_range, first, u32::MAX, 0 as libc::c_uint);
    }
}

/// Blocks every signal of the calling thread (`pthread_sigmask`). Async-signal-safe.
pub fn block_all_signals() -> Result<(), Errno> {
    nix::sys::signal::SigSet::all().thread_set_mask()
}

/// Unblocks every signal of the calling thread. Async-signal-safe.
pub fn unblock_all_signals() -> Result<(), Errno> {
    nix::sys::signal::SigSet::empty().thread_set_mask()
}

/// Puts the caller in a process group of its own and makes that group the foreground group of the
/// terminal on stdin (`setpgid(0, 0)`, `tcsetpgrp(0, ...)`). Call with `SIGTTOU` blocked.
/// Async-signal-safe.
pub fn foreground_on_stdin() -> Result<(), Errno> {
    // SAFETY: setpgid, getpgrp and tcsetpgrp take plain integers.
    unsafe {
        check(libc::setpgid(0, 0))?;
        check(libc::tcsetpgrp(0, libc::getpgrp()))
    }
}

/// `TIOCGWINSZ`: the window size of the terminal at `fd`, as (rows, columns).
pub fn get_winsize(fd: BorrowedFd<'_>) -> Result<(u16, u16), Errno> {
    // SAFETY: winsize is a plain C struct; all-zero is valid and the kernel overwrites it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws as *mut libc::winsize) })?;
    Ok((ws.ws_row, ws.ws_col))
}

/// `TIOCSWINSZ`: sets the window size of the terminal at `fd` (the kernel sends `SIGWINCH` to
/// its foreground process group).
pub fn set_winsize(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> Result<(), Errno> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from `ws`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws as *const libc::winsize) })
}

/// Whether `path` is a directory marked opaque for overlayfs (`trusted.overlay.opaque=y` or
/// `user.overlay.opaque=y`). Missing attributes and errors count as not opaque.
pub fn is_overlay_opaque(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    [c"trusted.overlay.opaque", c"user.overlay.opaque"]
        .iter()
        .any(|name| {
            let mut value = [0u8; 4];
            // SAFETY: `cpath` and `name` are NUL-terminated; `value` is writable for its length.
            let n = unsafe {
                libc::lgetxattr(
                    cpath.as_ptr(),
                    name.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            n == 1 && value[0] == b'y'
        })
}

/// The raw number of a descriptor, for recording in plans.
/// Makes the process `cmd` spawns get SIGKILL when the thread that spawned it ends (a helper
/// daemon that must not outlive kiln, such as fuse-overlayfs).
pub fn kill_with_spawning_thread(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child before exec and calls only prctl, which is
    // async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_shared_child_runs_before_the_parent_resumes() {
        // The child writes the parent's memory and exits; CLONE_VFORK holds the parent until
        // then, so the write is there to see.
        let mut seen = 0u32;
        let pid = spawn_shared(0, &mut || {
            seen = 42;
            exit_child(7)
        })
        .unwrap();
        assert_eq!(wait_pid(pid, true).unwrap(), Exit::Code(7));
        assert_eq!(seen, 42);
    }

    #[test]
    fn spawn_shared_child_that_execs_reports_the_programs_status() {
        let sh = c"/bin/sh";
        let arg0 = c"sh";
        let dash_c = c"-c";
        let script = c"exit 3";
        let argv = [arg0.as_ptr(), dash_c.as_ptr(), script.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null::<libc::c_char>()];
        let pid = spawn_shared(0, &mut || {
            // SAFETY: NUL-terminated arrays of pointers to live C strings.
            unsafe {
                libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr());
            }
            exit_child(126)
        })
        .unwrap();
        assert_eq!(wait_pid(pid, true).unwrap(), Exit::Code(3));
    }

    #[test]
    fn spawn_shared_child_that_returns_or_panics_exits_127() {
        let pid = spawn_shared(0, &mut || {}).unwrap();
        assert_eq!(wait_pid(pid, true).unwrap(), Exit::Code(127));
        let pid = spawn_shared(0, &mut || panic!("child panics")).unwrap();
        assert_eq!(wait_pid(pid, true).unwrap(), Exit::Code(127));
    }
}
