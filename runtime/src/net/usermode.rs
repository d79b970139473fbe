//! User-mode networking for rootless mode: a user namespace cannot make veth pairs on the host
//! or NAT rules, so a network namespace of its own is connected to the outside by a process on
//! the host side that carries its packets through ordinary sockets: `slirp4netns`.
//!
//! `pasta` (package `passt`) is not supported: Debian 12's (2023-03-09) cannot open the
//! namespace of a process in a nested user namespace ("Couldn't open user namespace ...:
//! Permission denied"), so it is named in the error only as the alternative kiln does not use.
//!
//! The namespace gets `eth0` with `10.0.2.100/24`, gateway `10.0.2.2` (slirp4netns' defaults) and
//! no route to the host's loopback services. The helper ends when the [`UserNet`] is dropped, and
//! with kiln, on the close of its exit pipe.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

/// The interface name inside the namespace.
pub const IFNAME: &str = "eth0";

/// Connecting a namespace with a user-mode network helper failed.
#[derive(Debug, thiserror::Error)]
pub enum UserNetError {
    #[error(
        "rootless mode needs `slirp4netns` (Debian package `slirp4netns`) for a RUN step or container \
         with a network, and it is not on PATH (`pasta` is not supported); or use `--network none`, \
         or inside an unprivileged container build with `--isolation=chroot` (RUN steps then use \
         the container's network)"
    )]
    NoTool,
    #[error(
        "a RUN step or container with a network needs `/dev/net/tun` for `slirp4netns` in rootless \
         mode, and it cannot be opened ({0}); inside an unprivileged container build with \
         `--isolation=chroot` (RUN steps then use the container's network), or use `--network none`"
    )]
    NoTun(#[source] std::io::Error),
    #[error("failed to create a pipe for `{tool}`: {source}")]
    Pipe {
        tool: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("failed to start `{tool}`: {source}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{tool}` failed to connect network namespace `{netns}`: {message}")]
    Failed {
        tool: &'static str,
        netns: PathBuf,
        message: String,
    },
}

/// The user-mode network tools kiln knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Slirp4netns,
}

impl Tool {
    /// The command's name.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Slirp4netns => "slirp4netns",
        }
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The tool to use and its path.
pub fn find() -> Result<(Tool, PathBuf), UserNetError> {
    let found = on_path(Tool::Slirp4netns.name())
        .map(|p| (Tool::Slirp4netns, p))
        .ok_or(UserNetError::NoTool)?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(UserNetError::NoTun)?;
    Ok(found)
}

/// A running helper that connects one network namespace; stops it when dropped.
#[derive(Debug)]
pub struct UserNet {
    tool: Tool,
    child: Child,
    /// slirp4netns ends when this, its exit pipe's write end, is closed.
    _exit: Option<OwnedFd>,
}

impl UserNet {
    /// The tool that runs.
    pub fn tool(&self) -> Tool {
        self.tool
    }

    /// Whether the helper still runs (has not exited; its exit is left to be reaped on drop).
    pub fn is_running(&self) -> bool {
        use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        matches!(
            waitid(
                Id::Pid(pid),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT
            ),
            Ok(WaitStatus::StillAlive)
        )
    }
}

impl Drop for UserNet {
    fn drop(&mut self) {
        self._exit.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pipe whose `inherit` end (0: read, 1: write) survives `execve` and whose other end does not.
fn pipe_for_child(tool: Tool, inherit: usize) -> Result<(OwnedFd, OwnedFd), UserNetError> {
    let err = |source| UserNetError::Pipe {
        tool: tool.name(),
        source,
    };
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(err)?;
    let child_end = if inherit == 0 { &r } else { &w };
    fcntl(child_end.as_fd(), FcntlArg::F_SETFD(FdFlag::empty())).map_err(err)?;
    Ok((r, w))
}

/// Connects the network namespace at `netns` (a path this process can open, such as
/// `/proc/PID/fd/N`) to the outside with `tool` and waits until it is configured.
pub fn connect(netns: &Path, tool: Tool, exe: &Path) -> Result<UserNet, UserNetError> {
    let failed = |message: String| UserNetError::Failed {
        tool: tool.name(),
        netns: netns.to_path_buf(),
        message,
    };
    let spawn_err = |source| UserNetError::Spawn {
        tool: tool.name(),
        source,
    };
    match tool {
        Tool::Slirp4netns => {
            let (ready_r, ready_w) = pipe_for_child(tool, 1)?;
            let (exit_r, exit_w) = pipe_for_child(tool, 0)?;
            let mut cmd = Command::new(exe);
            cmd.args([
                "--configure",
                "--mtu=65520",
                "--disable-host-loopback",
                "--enable-sandbox",
                "--enable-seccomp",
                "--netns-type=path",
            ])
            .arg(format!("--ready-fd={}", ready_w.as_raw_fd()))
            .arg(format!("--exit-fd={}", exit_r.as_raw_fd()))
            .arg(netns)
            .arg(IFNAME)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
            let child = cmd.spawn().map_err(spawn_err);
            // The child's ends belong to the child now (and must not leak into later spawns).
            drop(ready_w);
            drop(exit_r);
            let mut child = child?;
            let mut ready = std::fs::File::from(ready_r);
            let mut byte = [0u8; 1];
            // slirp4netns writes "1" once eth0 is up and configured, or exits (closing the pipe).
            match ready.read(&mut byte) {
                Ok(1) => Ok(UserNet {
                    tool,
                    child,
                    _exit: Some(exit_w),
                }),
                _ => {
                    drop(exit_w);
                    let _ = child.kill();
                    let out = child.wait_with_output().map_err(spawn_err)?;
                    Err(failed(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
                }
            }
        }
    }
}
