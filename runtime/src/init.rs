//! The minimal init of `kiln run --init`: pid 1 of the container forwards signals to the command
//! and reaps every zombie, like Docker's `docker-init` (tini).
//!
//! It is kiln's own code, not a binary from the image: the container's first process, after the
//! whole setup plan, forks ([`spawn`]); the new process goes on to exec the command, and the first
//! process stays pid 1 and reaps. [`spawn`] and the reaper run in the child of a possibly
//! multithreaded process: no allocation, only async-signal-safe calls. The other functions run
//! in the runtime before the clone (the title the init shows in `/proc/1/cmdline`).
//!
//! Exit status: the command's exit code, or `128 + N` when signal `N` killed it (Docker's `--init`
//! reports signal deaths the same way). When pid 1 exits the kernel kills what is left of the pid
//! namespace.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::sys::{self, Cloned, Errno};

/// Signals pid 1 passes on to the command.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// What `/proc/1/comm` shows.
pub const COMM: &std::ffi::CStr = c"kiln-init";

/// What `/proc/1/cmdline` shows for `args`: `kiln-init -- ARGS...`, NUL-separated and
/// NUL-terminated (Docker shows `/sbin/docker-init -- ARGS...`).
pub fn cmdline(args: &[String]) -> Vec<u8> {
    let mut out = b"kiln-init\0--\0".to_vec();
    for a in args {
        out.extend_from_slice(a.as_bytes());
        out.push(0);
    }
    out
}

/// Where the kernel finds a process's arguments and environment (`/proc/PID/stat` fields 48
/// to 51): `/proc/PID/cmdline` reads from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgArea {
    /// First byte of argv's strings.
    pub arg_start: usize,
    /// One past the last byte of argv's strings.
    pub arg_end: usize,
    /// First byte of the environment strings.
    pub env_start: usize,
    /// One past the last byte of the environment strings.
    pub env_end: usize,
}

/// Parses the argument area out of a `/proc/PID/stat` line.
pub fn parse_arg_area(stat: &str) -> Option<ArgArea> {
    // The command name in parentheses may contain spaces: count fields after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is the first after `)`, so field N is at index N - 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<usize>().ok();
    let area = ArgArea {
        arg_start: field(48)?,
        arg_end: field(49)?,
        env_start: field(50)?,
        env_end: field(51)?,
    };
    (area.arg_start < area.arg_end).then_some(area)
}

/// The calling process's argument area.
pub fn own_arg_area() -> Option<ArgArea> {
    parse_arg_area(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// The bytes to write over the argument area so that `/proc/1/cmdline` shows
/// `kiln-init -- ARGS...` without `CAP_SYS_RESOURCE` (which `PR_SET_MM` needs): like
/// `setproctitle`, one string that may run on into the environment area (the kernel reads it up
/// to the first NUL when the last byte of the argument area is not NUL), space-separated and
/// padded with spaces to the end of the argument area.
pub fn proctitle(args: &[String], area: &ArgArea) -> Vec<u8> {
    let arg_len = area.arg_end - area.arg_start;
    let total = if area.env_start == area.arg_end && area.env_end > area.env_start {
        area.env_end - area.arg_start
    } else {
        arg_len
    };
    let mut out = b"kiln-init --".to_vec();
    for a in args {
        out.push(b' ');
        out.extend(a.bytes().map(|b| if b == 0 { b' ' } else { b }));
    }
    out.truncate(total);
    if out.len() < arg_len {
        out.resize(arg_len, b' ');
    }
    if out.len() < total {
        out.push(0);
    }
    out
}

/// The exit code of pid 1 for the command's wait status, or `None` if it has not ended.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Forks. In the new process (which returns `Ok`) signals are unblocked again and, with
/// `foreground_tty`, it leads a process group of its own in the terminal's foreground. The calling
/// process closes every descriptor above stderr and becomes the reaper: it never returns.
pub fn spawn(foreground_tty: bool) -> Result<(), Errno> {
    // Blocked before the fork, so no signal sent to pid 1 between the fork and the wait loop is
    // lost: it stays pending until `reap` waits for it.
    sys::block_all_signals()?;
    match sys::clone_child(0)? {
        Cloned::Child => {
            if foreground_tty {
                // SIGTTOU is blocked: tcsetpgrp from the background group does not stop us.
                sys::foreground_on_stdin()?;
            }
            sys::unblock_all_signals()
        }
        Cloned::Parent(child) => {
            sys::close_from(3);
            reap(Pid::from_raw(child))
        }
    }
}

/// Reaps every child; when `child` ends, exits with its status. Forwards [`FORWARDED`] signals to
/// `child` meanwhile. Expects every signal to be blocked.
fn reap(child: Pid) -> ! {
    let mut wanted = SigSet::empty();
    for sig in FORWARDED {
        wanted.add(sig);
    }
    wanted.add(Signal::SIGCHLD);
    loop {
        // Reap first: the command may have ended before we got here (its SIGCHLD is pending then,
        // and the wait below would return at once anyway).
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(status) => {
                    if status.pid() == Some(child) {
                        if let Some(code) = exit_code(status) {
                            sys::exit_child(code);
                        }
                    }
                }
                Err(Errno::EINTR) => {}
                // ECHILD: nothing left to wait for, so the command is gone too.
                Err(_) => sys::exit_child(1),
            }
        }
        match wanted.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = nix::sys::signal::kill(child, sig);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_docker_init() {
        let pid = Pid::from_raw(2);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGTERM, false)),
            Some(143)
        );
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, true)),
            Some(137)
        );
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }

    #[test]
    fn arg_area_and_proctitle() {
        let stat = "7 (a b) c) S 1 7 7 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 100 1000 10 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 \
                    4000 5000 6000 100 120 120 150 0";
        let area = parse_arg_area(stat).unwrap();
        assert_eq!(
            area,
            ArgArea {
                arg_start: 100,
                arg_end: 120,
                env_start: 120,
                env_end: 150
            }
        );
        let args = vec!["sh".to_string(), "-c".to_string(), "x".to_string()];
        // Fits in the argument area: padded to its end, then NUL-terminated.
        let t = proctitle(&args, &area);
        assert_eq!(t, b"kiln-init -- sh -c x\0");
        let long = vec!["sh".to_string(), "-c".to_string(), "a".repeat(40)];
        let t = proctitle(&long, &area);
        assert_eq!(t.len(), 50);
        assert!(t.starts_with(b"kiln-init -- sh -c aaa"));
        let short_area = ArgArea {
            env_start: 130,
            ..area
        };
        let t = proctitle(&args[..1], &short_area);
        assert_eq!(t, b"kiln-init -- sh     ");
        assert!(parse_arg_area("garbage").is_none());
    }

    #[test]
    fn cmdline_names_init_then_command() {
        let c = cmdline(&["sh".into(), "-c".into(), "sleep 1".into()]);
        assert_eq!(c, b"kiln-init\0--\0sh\0-c\0sleep 1\0");
    }
}
