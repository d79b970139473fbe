//! User-mode networking for rootless mode: a user namespace cannot make veth pairs on the host
//! or NAT rules, so a network namespace of its own is connected to the outside by a process on
//! the host side that carries its packets through ordinary sockets: `slirp4netns`, or `pasta`
//! (package `passt`), whichever is installed (`KILN_USERMODE_NET=slirp4netns|pasta` picks one).
//!
//! The namespace gets `eth0` with `10.0.2.100/24`, gateway `10.0.2.2` (slirp4netns' defaults;
//! pasta copies the host's addresses), and no route to the host's loopback services. The helper
//! ends when the [`UserNet`] is dropped, and with kiln: slirp4netns on the close of its exit
//! pipe, pasta when the namespace it watches is gone and on its parent-death signal.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

/// The interface name inside the namespace.
pub const IFNAME: &str = "eth0";
/// How long a helper may take to configure the namespace.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Connecting a namespace with a user-mode network helper failed.
#[derive(Debug, thiserror::Error)]
pub enum UserNetError {
    #[error(
        "rootless mode needs `slirp4netns` or `pasta` (Debian packages `slirp4netns`, `passt`) for a \
         RUN step or container with a network; neither is on PATH (or use `--network none`)"
    )]
    NoTool,
    #[error("`KILN_USERMODE_NET={0}` names no supported tool (slirp4netns, pasta)")]
    UnknownTool(String),
    #[error("`{0}` was asked for by KILN_USERMODE_NET but is not on PATH")]
    Missing(&'static str),
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
    Pasta,
}

impl Tool {
    /// The command's name.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Slirp4netns => "slirp4netns",
            Tool::Pasta => "pasta",
        }
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The tool to use: `KILN_USERMODE_NET` if set, else slirp4netns, else pasta.
pub fn find() -> Result<(Tool, PathBuf), UserNetError> {
    if let Ok(choice) = std::env::var("KILN_USERMODE_NET") {
        let tool = match choice.as_str() {
            "slirp4netns" => Tool::Slirp4netns,
            "pasta" => Tool::Pasta,
            _ => return Err(UserNetError::UnknownTool(choice)),
        };
        return on_path(tool.name())
            .map(|p| (tool, p))
            .ok_or(UserNetError::Missing(tool.name()));
    }
    [Tool::Slirp4netns, Tool::Pasta]
        .into_iter()
        .find_map(|t| on_path(t.name()).map(|p| (t, p)))
        .ok_or(UserNetError::NoTool)
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
        Tool::Pasta => {
            let mut child = Command::new(exe)
                .args([
                    "--foreground",
                    "--quiet",
                    "--config-net",
                    "--ns-ifname",
                    IFNAME,
                    "--netns",
                ])
                .arg(netns)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(spawn_err)?;
            // pasta in the foreground says nothing when it is ready: wait until eth0 has an
            // address and a default route in the namespace.
            let start = Instant::now();
            loop {
                if let Some(status) = child.try_wait().map_err(spawn_err)? {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    return Err(failed(format!("exited ({status}): {}", err.trim())));
                }
                if configured(netns) {
                    return Ok(UserNet {
                        tool,
                        child,
                        _exit: None,
                    });
                }
                if start.elapsed() > READY_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(failed(format!("not configured after {READY_TIMEOUT:?}")));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Whether the namespace at `netns` has a default route (pasta sets it last).
fn configured(netns: &Path) -> bool {
    let path = netns.to_path_buf();
    super::netns::run_in(&path, || {
        std::fs::read_to_string("/proc/thread-self/net/route")
            .map(|r| {
                r.lines()
                    .skip(1)
                    .any(|l| l.split_whitespace().nth(1) == Some("00000000"))
            })
            .unwrap_or(false)
    })
    .unwrap_or(false)
}
