//! [`RecordingSys`]: the kernel calls of a container's setup, recorded as text for unit tests.

use super::*;

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

    fn setrlimit(&self, resource: i32, soft: u64, hard: u64) -> Result<(), Errno> {
        self.record(format!("setrlimit {resource} {soft} {hard}"))
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
