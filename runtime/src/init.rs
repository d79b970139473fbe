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

pub use crate::sys::reaper::{exit_code, spawn, FORWARDED};

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

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::sys::wait::WaitStatus;
    use nix::unistd::Pid;

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
