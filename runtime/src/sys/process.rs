//! Calls made by the runtime's own process around the child: fork and clone, wait, pipes,
//! signals, terminals, descriptors.

use super::*;

/// `fork(2)` of a process that has exactly one thread (the caller checks it): `Ok(None)` in the
/// child, `Ok(Some(pid))` in the parent. Used only by [`crate::userns`] at start-up, before
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
    pidfd_open(nix::unistd::getpid().as_raw())
}

/// A pidfd of process `pid` (`pidfd_open(pid)`, close-on-exec): it polls readable once that
/// process has exited, so a pid checked while the pidfd is open and still unreadable afterwards
/// named the same process all along (no reuse in between).
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes plain integers and returns a new descriptor, owned below.
    let fd = check_long(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) })?;
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Cuts a freshly forked process loose from what it inherited, keeping only `keep`: the working
/// directory becomes `/`, stdin, stdout and stderr `/dev/null`, `keep` moves to descriptor 3
/// (close-on-exec) and every other descriptor is closed. A process that outlives its parent (the
/// rootless user-namespace keeper) must hold no pipe of the parent's caller, which would otherwise
/// wait for their end. Call in a single-threaded child that owns all its descriptors.
pub fn detach_keeping(keep: OwnedFd) -> Result<OwnedFd, Errno> {
    use std::os::fd::IntoRawFd;
    nix::unistd::chdir("/")?;
    let kept = nix::fcntl::fcntl(&keep, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    let null = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR,
        nix::sys::stat::Mode::empty(),
    )?;
    // From here on descriptors are closed by number; the owned ones must not be closed again.
    let (_, null) = (keep.into_raw_fd(), null.into_raw_fd());
    for fd in 0..3 {
        if fd != null {
            // SAFETY: dup2 takes plain descriptor numbers; it replaces whatever was at `fd`.
            check(unsafe { libc::dup2(null, fd) })?;
        }
    }
    if kept != 3 {
        // SAFETY: as above; `kept` is open, 3 is replaced.
        check(unsafe { libc::dup2(kept, 3) })?;
    }
    close_from(4);
    nix::fcntl::fcntl(
        // SAFETY: descriptor 3 is open (made above) for the duration of this call.
        unsafe { BorrowedFd::borrow_raw(3) },
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    // SAFETY: descriptor 3 is open and, every other copy being closed, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(3) })
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

/// `FICLONE`: makes `dst` share `src`'s data extents (a reflink), where the filesystem can.
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: FICLONE takes the source descriptor as a plain integer argument; both descriptors
    // are borrowed and stay open for the call.
    check(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) })
}

/// The raw number of a descriptor, for recording in plans.
pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

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

/// Has the C allocator give large blocks back to the kernel as soon as they are freed: blocks
/// of 128 KiB and more get mappings of their own, however large the blocks freed before them.
/// glibc otherwise raises that threshold to the size of each mapped block freed (up to 32 MiB),
/// so the large lists a build makes and frees one after another (a 500k-file copy's plan, its
/// donors, a layer's index) come from heaps that keep their pages, and the process holds
/// 100 MB more than it uses. Call once, early, before threads start. No effect on other C
/// libraries.
pub fn return_large_blocks_promptly() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable of the allocator; called before other threads run.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
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
