//! Starting a process inside a running container (`kiln exec`).
//!
//! [`exec`] clones an intermediate process that joins the container's cgroups (those that differ
//! from the caller's) and its ipc, uts, net, pid and mount namespaces (`/proc/PID/ns/*`), then
//! forks a sibling with `CLONE_PARENT`: the sibling is inside the container's pid namespace (only
//! children enter a joined pid namespace) and is still the caller's child, so [`Running`] waits
//! for it like for a container. The sibling enters the container's root (`/proc/PID/root`), its
//! working directory, stdio, terminal, capabilities and credentials, and execs.
//!
//! The process gets the container's capabilities (its pid 1's bounding set), `no_new_privs` if
//! pid 1 has it, and the container's seccomp filter if pid 1 runs under one, or every capability
//! and no filter with `privileged`; its user is resolved in the container's `/etc/passwd` and
//! `/etc/group`.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::caps::{self, HostCaps};
use crate::layers::RootView;
use crate::plan::{self, ExecPlanInput};
use crate::sandbox::{report_failure, setup_error, Running, RuntimeError};
use crate::sys::{self, Cloned, Errno, RealSys};
use crate::users;

/// A process to start in a running container.
#[derive(Debug)]
pub struct ExecSpec {
    /// The container's pid 1 as seen on the host.
    pub pid: i32,
    /// argv; `argv[0]` without a `/` is looked up in `PATH` (of `env`) inside the container.
    pub args: Vec<String>,
    /// Environment, `KEY=VALUE`; `HOME` is added from the user's passwd entry when missing.
    pub env: Vec<String>,
    /// Working directory inside the container (must exist; empty: `/`).
    pub cwd: String,
    /// `USER` spec (`""`: root), resolved in the container's `/etc/passwd` and `/etc/group`.
    pub user: String,
    /// Every capability and no `no_new_privs` (`docker exec --privileged`).
    pub privileged: bool,
    /// The container's seccomp policy: the process gets the container's filter (none when
    /// `privileged` or the container runs without one).
    pub seccomp: crate::seccomp::SeccompPolicy,
    /// `stdin` is a pty slave: the process starts a new session with it as controlling terminal.
    pub controlling_tty: bool,
    /// Standard input (`None`: `/dev/null`).
    pub stdin: Option<OwnedFd>,
    /// Standard output.
    pub stdout: OwnedFd,
    /// Standard error.
    pub stderr: OwnedFd,
}

/// Namespaces joined, in order: the mount namespace last, since it changes what paths mean.
const NAMESPACES: [(&str, i32); 5] = [
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("net", libc::CLONE_NEWNET),
    ("pid", libc::CLONE_NEWPID),
    ("mnt", libc::CLONE_NEWNS),
];

/// The values of `CapBnd`, `NoNewPrivs` and whether a seccomp filter is in force (`Seccomp: 2`)
/// in a `/proc/PID/status`.
fn parse_status(text: &str) -> (Option<u64>, bool, bool) {
    let mut bounding = None;
    let mut nnp = false;
    let mut filtered = false;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("CapBnd:") {
            bounding = caps::parse_mask(v);
        } else if let Some(v) = line.strip_prefix("NoNewPrivs:") {
            nnp = v.trim() == "1";
        } else if let Some(v) = line.strip_prefix("Seccomp:") {
            filtered = v.trim() == "2";
        }
    }
    (bounding, nnp, filtered)
}

fn open_at(path: PathBuf) -> Result<OwnedFd, RuntimeError> {
    sys::open_cloexec(&path).map_err(|source| RuntimeError::OpenNs { path, source })
}

/// Starts `spec`'s command in the running container whose pid 1 is `spec.pid`.
pub fn exec(spec: ExecSpec) -> Result<Running, RuntimeError> {
    let host = HostCaps::read().map_err(RuntimeError::HostCaps)?;
    let proc_dir = PathBuf::from(format!("/proc/{}", spec.pid));
    let status_path = proc_dir.join("status");
    let status = std::fs::read_to_string(&status_path).map_err(|source| RuntimeError::ExecTarget {
        path: status_path.clone(),
        source,
    })?;
    let (bounding, target_nnp, target_seccomp) = parse_status(&status);
    let bounding = bounding.ok_or_else(|| RuntimeError::ExecTarget {
        path: status_path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no CapBnd line"),
    })?;
    let caps = if spec.privileged {
        host.all() & host.permitted
    } else {
        bounding & host.permitted & host.all()
    };
    let seccomp = if spec.privileged || !target_seccomp {
        None
    } else {
        crate::seccomp::program(&spec.seccomp, caps).map_err(RuntimeError::Seccomp)?
    };

    let root = proc_dir.join("root");
    let user = users::resolve_user_in(
        &RootView::Dir(root.clone()),
        &spec.user,
        users::Groups::WithPrimary,
    )
    .map_err(|source| RuntimeError::User {
        user: spec.user.clone(),
        source,
    })?;
    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }

    let mut keep = Vec::new();
    let mut namespaces = Vec::new();
    for (name, nstype) in NAMESPACES {
        let fd = open_at(proc_dir.join("ns").join(name))?;
        namespaces.push((sys::raw(&fd), nstype, name));
        keep.push(fd);
    }
    let root_fd = open_at(root)?;
    let cgroup_procs =
        crate::cgroup::join_targets_of(spec.pid).map_err(|source| RuntimeError::ExecCgroups {
            pid: spec.pid,
            source,
        })?;

    let dup = |fd: &OwnedFd, name: &'static str| {
        sys::dup_above_stdio(fd.as_fd()).map_err(|source| RuntimeError::DupStdio { name, source })
    };
    let stdin = match &spec.stdin {
        Some(fd) => dup(fd, "stdin")?,
        None => sys::open_cloexec(Path::new("/dev/null")).map_err(RuntimeError::OpenDevNull)?,
    };
    let stdout = dup(&spec.stdout, "stdout")?;
    let stderr = dup(&spec.stderr, "stderr")?;
    let (report_read, report_write) = sys::pipe_cloexec().map_err(RuntimeError::Pipe)?;

    let input = ExecPlanInput {
        cgroup_procs,
        namespaces,
        root_fd: sys::raw(&root_fd),
        report_fd: sys::raw(&report_write),
        caps,
        last_cap: host.last_cap,
        no_new_privs: target_nnp && !spec.privileged,
        seccomp,
        user,
        cwd: if spec.cwd.is_empty() {
            "/".to_string()
        } else {
            spec.cwd.clone()
        },
        args: spec.args.clone(),
        env,
        stdio: [sys::raw(&stdin), sys::raw(&stdout), sys::raw(&stderr)],
        controlling_tty: spec.controlling_tty,
    };
    let plan = plan::build_exec(&input).map_err(RuntimeError::Plan)?;
    let command = spec.args.first().cloned().unwrap_or_default();

    let (status_read, status_write) = sys::pipe_cloexec().map_err(RuntimeError::Pipe)?;
    match sys::clone_child(0).map_err(RuntimeError::Clone)? {
        Cloned::Child => {
            // No allocation from here on: the caller may be multithreaded.
            if let Err((index, errno)) = plan::run(&RealSys, &plan) {
                report_failure(&status_write, index, errno);
            }
            sys::exit_child(127)
        }
        Cloned::Parent(intermediate) => {
            drop(status_write);
            drop(report_write);
            let mut pid_bytes = [0u8; 4];
            let got = sys::read_full(report_read.as_fd(), &mut pid_bytes);
            let _ = sys::wait_pid(intermediate, true);
            let running = match got {
                Ok(4) => Some(Running::exec_process(i32::from_le_bytes(pid_bytes))),
                Ok(_) => None,
                Err(e) => return Err(RuntimeError::ReadStatus(e)),
            };
            let mut report = [0u8; 8];
            let n = sys::read_full(status_read.as_fd(), &mut report).map_err(RuntimeError::ReadStatus)?;
            drop(keep);
            match (n, running) {
                (0, Some(running)) => Ok(running),
                (0, None) => Err(RuntimeError::ReadStatus(Errno::EIO)),
                // `running` drops: the failed process is reaped.
                (_, _) => Err(setup_error(&plan, &report[..n], command)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_give_bounding_set_and_nnp() {
        let text = "Name:\tsh\nCapEff:\t00000000a80425fb\nCapBnd:\t00000000a80425fb\nNoNewPrivs:\t1\n";
        assert_eq!(parse_status(text), (Some(0xa80425fb), true, false));
        assert_eq!(parse_status("NoNewPrivs:\t0\nSeccomp:\t2\n"), (None, false, true));
    }
}
