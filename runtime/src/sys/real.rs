//! [`RealSys`]: the kernel calls of a container's setup, issued.

use super::*;

/// The real kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealSys;

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

    fn setrlimit(&self, resource: i32, soft: u64, hard: u64) -> Result<(), Errno> {
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: `limit` lives across the call and the old-limit pointer is null (not
        // wanted). The raw syscall touches only this process's limits.
        check_long(unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                0,
                resource,
                &limit as *const libc::rlimit,
                std::ptr::null_mut::<libc::rlimit>(),
            )
        })
        .map(|_| ())
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
        super::reaper::spawn(foreground_tty)
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
