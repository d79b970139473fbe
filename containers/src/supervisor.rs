//! The supervisor: the one process that owns a container while it runs (the conmon /
//! containerd-shim pattern). It starts the process through the runtime, records its state,
//! copies its output into the json-file log and to attached clients, waits for it, applies the
//! restart policy, removes an `--rm` container, and exits.
//!
//! A detached container gets a supervisor of its own (`kiln container-supervise ID`, in a new
//! session); a foreground `kiln run` is its own supervisor, so that the run-start path spawns no
//! extra process. Other CLI calls never talk to the supervisor except through `attach.sock`:
//! they read `state.json` and signal the container's pid directly.
//!
//! Attach protocol on `ROOT/containers/<id>/attach.sock`: the supervisor sends frames
//! `[kind: u8][len: u32 big endian][data]` with kind 1 = stdout, 2 = stderr, 3 = exit (data: the
//! exit code as i32 big endian, sent once when the container has finally stopped); bytes the
//! client sends are written to the container's stdin when it was created with `-i`, and the
//! client shutting down its writing side closes that stdin.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_runtime::{ContainerSpec, RuntimeError};

use crate::logs::{self, LogWriter, Stream};
use crate::record::{ContainerRecord, Containers, RecordError};
use crate::state::{self, Status};

/// Frame kinds of the attach protocol.
pub const FRAME_STDOUT: u8 = 1;
/// Standard error frame.
pub const FRAME_STDERR: u8 = 2;
/// The final exit code.
pub const FRAME_EXIT: u8 = 3;

/// Docker's exit code when the runtime itself fails.
pub const EXIT_RUNNER: u8 = 125;
/// The command exists but cannot be executed.
pub const EXIT_CANNOT_EXEC: u8 = 126;
/// The command was not found.
pub const EXIT_NOT_FOUND: u8 = 127;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A supervisor step that failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// Reading the record or writing the state failed.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// Opening or writing the log failed.
    #[error(transparent)]
    Log(#[from] logs::LogError),
    /// Creating a pipe for the container's stdio failed.
    #[error("failed to create a pipe for the container's stdio")]
    Pipe(#[source] nix::errno::Errno),
    /// Opening a pseudo-terminal for `-t` failed.
    #[error("failed to open a pseudo-terminal for the container")]
    Pty(#[source] Box<RuntimeError>),
    /// Duplicating a descriptor failed.
    #[error("failed to duplicate a descriptor for the container's stdio")]
    Dup(#[source] io::Error),
    /// The attach socket could not be created.
    #[error("failed to listen on `{path}`")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The container dir could not be prepared.
    #[error("failed to create `{path}`")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The recorded network mode is not one the runtime can set up.
    #[error("network {0} not found")]
    Network(String),
    /// The record asks for mounts, which are resolved by the volume code.
    #[error("mounts of container {id} cannot be resolved: {reason}")]
    Mounts {
        /// The container.
        id: String,
        /// Why.
        reason: String,
    },
    /// Waiting for the container failed.
    #[error("failed to wait for container {id}")]
    Wait {
        /// The container.
        id: String,
        /// The cause.
        #[source]
        source: Box<RuntimeError>,
    },
    /// The attaching client did not connect in time.
    #[error("no client attached to `{0}` in time")]
    AttachTimeout(PathBuf),
}

/// How the supervisor is connected to its caller.
#[derive(Debug)]
pub enum Mode {
    /// A supervisor process of its own. `ready` receives one line when the container runs (`ok`)
    /// or failed to start (`err CODE MESSAGE`); with `wait_attach` the supervisor first writes
    /// `listening` and waits for one attach client before it starts the process.
    Detached {
        /// The readiness pipe.
        ready: Option<File>,
        /// Wait for an attach client before starting.
        wait_attach: bool,
    },
    /// `kiln run` in the foreground: the CLI is the supervisor and these are its stdio.
    Foreground {
        /// Standard input when `-i`.
        stdin: Option<OwnedFd>,
        /// Standard output.
        stdout: OwnedFd,
        /// Standard error.
        stderr: OwnedFd,
    },
}

/// How supervision ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The process ran and ended with this code (128 + signal for a signal) and will not be
    /// restarted.
    Exited(i32),
    /// The process could not be started: Docker's exit code (125, 126, 127) and the reason.
    StartFailed {
        /// 125, 126 or 127.
        code: u8,
        /// The error chain.
        message: String,
    },
}

/// The exit code Docker gives a start failure: 127 for a command not found, 126 for one that
/// cannot be executed, 125 otherwise.
pub fn start_failure_code(err: &RuntimeError) -> u8 {
    use nix::errno::Errno;
    if let RuntimeError::Exec { source, .. } = err {
        return match *source {
            Errno::ENOENT => EXIT_NOT_FOUND,
            Errno::EACCES | Errno::EPERM | Errno::ENOEXEC | Errno::EISDIR => EXIT_CANNOT_EXEC,
            _ => EXIT_RUNNER,
        };
    }
    let text = error_chain(err);
    if text.contains("not found in $PATH") || text.contains("no such file or directory") {
        EXIT_NOT_FOUND
    } else if text.contains("permission denied") {
        EXIT_CANNOT_EXEC
    } else {
        EXIT_RUNNER
    }
}

/// `err` and its causes joined by `: `.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The path a client connects to for the attach socket of `dir`, short enough for `sun_path`
/// whatever the store root: `/proc/self/fd/N/attach.sock` through an open descriptor of `dir`.
/// The returned file must stay open while the path is used.
pub fn socket_path(dir: &Path) -> io::Result<(File, PathBuf)> {
    let d = File::open(dir)?;
    let p = PathBuf::from(format!("/proc/self/fd/{}/attach.sock", d.as_raw_fd()));
    Ok((d, p))
}

/// Writes one attach frame.
pub fn write_frame(w: &mut impl io::Write, kind: u8, data: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&head)?;
    w.write_all(data)?;
    w.flush()
}

/// Reads one attach frame; `None` at the end of the stream.
pub fn read_frame(r: &mut impl io::Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut data = vec![0u8; len];
    r.read_exact(&mut data)?;
    Ok(Some((head[0], data)))
}

/// Shared between the supervisor's threads.
#[derive(Default)]
struct Hub {
    clients: Mutex<Vec<UnixStream>>,
    stdin: Mutex<Option<File>>,
}

impl Hub {
    fn broadcast(&self, kind: u8, data: &[u8]) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.retain_mut(|c| write_frame(c, kind, data).is_ok());
    }

    fn write_stdin(&self, data: &[u8]) {
        let mut stdin = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = stdin.as_mut() {
            if f.write_all(data).is_err() {
                *stdin = None;
            }
        }
    }

    fn close_stdin(&self) {
        *self.stdin.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The container's end of its stdio plus the supervisor's ends.
struct Io {
    child_stdin: Option<OwnedFd>,
    child_stdout: OwnedFd,
    child_stderr: OwnedFd,
    controlling_tty: bool,
    /// What the supervisor reads, per stream.
    outputs: Vec<(Stream, OwnedFd)>,
    /// What the supervisor writes into the container's stdin.
    stdin_writer: Option<OwnedFd>,
    /// The pty master with `-t` (for the window size).
    pty_master: Option<OwnedFd>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SupervisorError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(SupervisorError::Pipe)
}

/// The one place that decides the container's stdio. With `-t` the process gets a pty slave as
/// stdin/stdout/stderr (and as its controlling terminal); the supervisor reads the master as
/// stdout and writes it for stdin. Without, one pipe per stream.
fn open_stdio(tty: bool, open_stdin: bool) -> Result<Io, SupervisorError> {
    if tty {
        let (master, slave) = kiln_runtime::tty::open_pty().map_err(|e| SupervisorError::Pty(Box::new(e)))?;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(SupervisorError::Dup);
        return Ok(Io {
            child_stdin: Some(dup(&slave)?),
            child_stdout: dup(&slave)?,
            child_stderr: slave,
            controlling_tty: true,
            outputs: vec![(Stream::Stdout, dup(&master)?)],
            stdin_writer: if open_stdin { Some(dup(&master)?) } else { None },
            pty_master: Some(master),
        });
    }
    let (stdin_read, stdin_writer) = if open_stdin {
        let (r, w) = pipe()?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    Ok(Io {
        child_stdin: stdin_read,
        child_stdout: out_w,
        child_stderr: err_w,
        controlling_tty: false,
        outputs: vec![(Stream::Stdout, out_r), (Stream::Stderr, err_r)],
        stdin_writer,
        pty_master: None,
    })
}

/// The runtime's network for the recorded `--network`. `default` and `bridge` share the host's
/// network until the bridge driver is wired in here.
pub fn network_for(record: &ContainerRecord) -> Result<kiln_runtime::Network, SupervisorError> {
    match record.host.network_mode.as_str() {
        "" | "default" | "bridge" | "host" => Ok(kiln_runtime::Network::Host),
        "none" => Ok(kiln_runtime::Network::None),
        other => Err(SupervisorError::Network(other.to_string())),
    }
}

/// The runtime mounts for the recorded `-v/--mount/--tmpfs/--volumes-from` requests (resolved
/// by the volume code once it is wired in here).
fn mounts_for(record: &ContainerRecord) -> Result<Vec<kiln_runtime::MountSpec>, SupervisorError> {
    if record.host.mounts.is_empty() {
        return Ok(Vec::new());
    }
    Err(SupervisorError::Mounts {
        id: record.id.clone(),
        reason: "volume and bind mounts are not supported by this build".into(),
    })
}

/// The full spec the runtime runs for `record` with the given stdio.
fn container_spec(
    record: &ContainerRecord,
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    controlling_tty: bool,
) -> Result<ContainerSpec, SupervisorError> {
    let network = network_for(record)?;
    let hostname = if record.host.hostname.is_empty() {
        record.short_id().to_string()
    } else {
        record.host.hostname.clone()
    };
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut env = record.config.env.clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.insert(1.min(env.len()), format!("HOSTNAME={hostname}"));
    }
    let h = &record.host;
    let cgroup = (h.memory.is_some() || h.cpus.is_some() || h.pids_limit.is_some()).then(|| {
        kiln_runtime::CgroupSpec {
            name: record.id.clone(),
            memory: h.memory,
            cpus: h.cpus,
            pids: h.pids_limit,
        }
    });
    let mut lower = record.rootfs.lower.clone();
    if lower.is_empty() {
        // overlayfs needs a lower dir: an image without layers gets an empty one.
        let empty = record.rootfs.upper.with_file_name("empty");
        std::fs::create_dir_all(&empty).map_err(|source| SupervisorError::CreateDir {
            path: empty.clone(),
            source,
        })?;
        lower.push(empty);
    }
    Ok(ContainerSpec {
        rootfs: kiln_runtime::Rootfs::Overlay {
            lower,
            upper: record.rootfs.upper.clone(),
            work: record.rootfs.work.clone(),
        },
        readonly_rootfs: h.read_only_rootfs,
        args: record.args.clone(),
        env,
        cwd: if record.config.working_dir.is_empty() {
            "/".into()
        } else {
            record.config.working_dir.clone()
        },
        user: record.config.user.clone(),
        hostname: hostname.clone(),
        mounts: mounts_for(record)?,
        etc_files: kiln_runtime::EtcFiles::for_build(&hostname, &host_resolv, &network),
        network,
        security: if h.privileged {
            kiln_runtime::Security::Insecure
        } else {
            kiln_runtime::Security::Default
        },
        stdin,
        stdout,
        stderr,
        options: kiln_runtime::RunOptions {
            controlling_tty,
            init: h.init,
            cap_add: h.cap_add.clone(),
            cap_drop: h.cap_drop.clone(),
            cgroup,
        },
    })
}

/// Docker's restart delay: 100 ms doubling per restart up to a minute, back to 100 ms after a
/// run of at least 10 seconds.
pub fn restart_delay(previous: Option<Duration>, ran_for: Duration) -> Duration {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(60);
    match previous {
        _ if ran_for >= Duration::from_secs(10) => FIRST,
        None => FIRST,
        Some(p) => (p * 2).min(MAX),
    }
}

fn exit_code(status: kiln_runtime::ExitStatus) -> i32 {
    match (status.code, status.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 255,
    }
}

fn spawn_pump(
    stream: Stream,
    fd: OwnedFd,
    log: Arc<LogWriter>,
    hub: Arc<Hub>,
    echo: Option<OwnedFd>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut src = File::from(fd);
        let mut echo = echo.map(File::from);
        let kind = match stream {
            Stream::Stdout => FRAME_STDOUT,
            Stream::Stderr => FRAME_STDERR,
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EIO: the other side of a pty closed.
                Err(_) => break,
            };
            let data = &buf[..n];
            if let Some(e) = echo.as_mut() {
                if e.write_all(data).is_err() {
                    echo = None;
                }
            }
            if let Err(e) = log.write(stream, data) {
                tracing::warn!("{}", error_chain(&e));
            }
            hub.broadcast(kind, data);
        }
    })
}

/// Accepts attach clients until the listener is closed, forwarding their input to the
/// container's stdin. The first client is announced on `first`.
fn spawn_acceptor(listener: UnixListener, hub: Arc<Hub>, open_stdin: bool, first: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
            let Ok(writer) = conn.try_clone() else { continue };
            hub.clients.lock().unwrap_or_else(|p| p.into_inner()).push(writer);
            let _ = first.send(());
            let hub = hub.clone();
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 8192];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if open_stdin {
                                hub.write_stdin(&buf[..n]);
                            }
                        }
                    }
                }
                if open_stdin {
                    hub.close_stdin();
                }
            });
        }
    });
}

fn report(ready: &mut Option<File>, line: &str) {
    if let Some(mut f) = ready.take() {
        let _ = f.write_all(line.as_bytes());
        let _ = f.write_all(b"\n");
    }
}

/// Runs the container `id` to its end as its supervisor (see the module docs).
pub fn supervise(containers: &Containers, id: &str, mode: Mode) -> Result<Outcome, SupervisorError> {
    let record = containers.get(id)?;
    let dir = containers.dir(id);
    let scratch = dir.join("runtime");
    std::fs::create_dir_all(&scratch).map_err(|source| SupervisorError::CreateDir {
        path: scratch.clone(),
        source,
    })?;
    let log = Arc::new(LogWriter::open(&logs::log_path(&dir, id))?);
    let hub = Arc::new(Hub::default());

    let (mut ready, wait_attach, mut fg) = match mode {
        Mode::Detached { ready, wait_attach } => (ready, wait_attach, None),
        Mode::Foreground {
            stdin,
            stdout,
            stderr,
        } => (None, false, Some((stdin, stdout, stderr))),
    };

    // The attach socket (a foreground run is attached already).
    let mut _dir_fd = None;
    let mut sock_path = None;
    if fg.is_none() {
        let (d, path) = socket_path(&dir).map_err(|source| SupervisorError::Listen {
            path: dir.join("attach.sock"),
            source,
        })?;
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| SupervisorError::Listen {
            path: dir.join("attach.sock"),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        spawn_acceptor(listener, hub.clone(), record.host.open_stdin, tx);
        if wait_attach {
            report(&mut ready.as_ref().and_then(|f| f.try_clone().ok()), "listening");
            if rx.recv_timeout(Duration::from_secs(10)).is_err() {
                return Err(SupervisorError::AttachTimeout(dir.join("attach.sock")));
            }
        }
        _dir_fd = Some(d);
        sock_path = Some(path);
    }

    let me = std::process::id() as i32;
    let me_start = state::process_start(me).unwrap_or(0);
    let mut delay = None;
    let outcome = loop {
        let io = open_stdio(record.host.tty, record.host.open_stdin)?;
        let Io {
            child_stdin,
            child_stdout,
            child_stderr,
            controlling_tty,
            outputs,
            stdin_writer,
            pty_master,
        } = io;
        // A foreground terminal gives the container its size and goes raw while it runs.
        let mut _raw = None;
        if let (Some(master), Some((stdin, stdout, _))) = (pty_master.as_ref(), fg.as_ref()) {
            if let Ok((rows, cols)) = kiln_runtime::tty::get_winsize(stdout) {
                let _ = kiln_runtime::tty::set_winsize(master, rows, cols);
            }
            if let Some(i) = stdin.as_ref().filter(|i| kiln_runtime::tty::is_tty(*i)) {
                _raw = kiln_runtime::tty::RawMode::enable(i).ok();
            }
        }
        // A foreground run forwards its own stdin into the container's, which sees the end of
        // it when ours ends; a detached one takes input from attach clients.
        match (stdin_writer, fg.as_mut()) {
            (Some(w), Some((Some(src), _, _))) => {
                let mut dst = File::from(w);
                let mut src = File::from(src.try_clone().map_err(SupervisorError::Dup)?);
                std::thread::spawn(move || {
                    let _ = io::copy(&mut src, &mut dst);
                });
            }
            (w, _) => *hub.stdin.lock().unwrap_or_else(|p| p.into_inner()) = w.map(File::from),
        }
        let spec = container_spec(&record, child_stdin, child_stdout, child_stderr, controlling_tty)?;
        let started = Instant::now();
        let running = match kiln_runtime::start(spec, &scratch) {
            Ok(r) => r,
            Err(e) => {
                let code = start_failure_code(&e);
                let message = error_chain(&e);
                containers.update_state(id, |st| {
                    st.status = if st.started_at.is_empty() {
                        Status::Created
                    } else {
                        Status::Exited
                    };
                    st.running = false;
                    st.pid = 0;
                    st.exit_code = i32::from(code);
                    st.error = message.clone();
                    st.supervisor_pid = me;
                    st.supervisor_start = me_start;
                })?;
                report(&mut ready, &format!("err {code} {}", message.replace('\n', " ")));
                break Outcome::StartFailed { code, message };
            }
        };
        let pid = running.pid();
        containers.update_state(id, |st| {
            st.status = Status::Running;
            st.running = true;
            st.pid = pid;
            st.started_at = crate::now_rfc3339();
            st.finished_at.clear();
            st.error.clear();
            st.exit_code = 0;
            st.supervisor_pid = me;
            st.supervisor_start = me_start;
        })?;
        report(&mut ready, "ok");
        let pumps: Vec<JoinHandle<()>> = outputs
            .into_iter()
            .map(|(stream, fd)| {
                let echo = fg.as_ref().and_then(|(_, out, err)| {
                    let target = match stream {
                        Stream::Stdout => out,
                        Stream::Stderr => err,
                    };
                    target.as_fd().try_clone_to_owned().ok()
                });
                spawn_pump(stream, fd, log.clone(), hub.clone(), echo)
            })
            .collect();
        let status = running.wait().map_err(|source| SupervisorError::Wait {
            id: id.to_string(),
            source: Box::new(source),
        });
        for p in pumps {
            let _ = p.join();
        }
        log.flush()?;
        hub.close_stdin();
        let code = exit_code(status?);
        let ran_for = started.elapsed();

        let _lock = containers.lock(id)?;
        let st = containers.update_state_locked(id, |st| {
            let restart =
                record
                    .host
                    .restart_policy
                    .should_restart(code, st.restart_count, st.stop_requested);
            st.running = false;
            st.pid = 0;
            st.exit_code = code;
            st.finished_at = crate::now_rfc3339();
            st.status = if restart {
                Status::Restarting
            } else {
                Status::Exited
            };
        })?;
        drop(_lock);
        if st.status != Status::Restarting {
            break Outcome::Exited(code);
        }
        let wait = restart_delay(delay, ran_for);
        delay = Some(wait);
        if !sleep_unless_stopped(containers, id, wait)? {
            containers.update_state(id, |st| st.status = Status::Exited)?;
            break Outcome::Exited(code);
        }
        containers.update_state(id, |st| st.restart_count += 1)?;
    };

    if let Outcome::Exited(code) = outcome {
        hub.broadcast(FRAME_EXIT, &code.to_be_bytes());
    }
    hub.clients.lock().unwrap_or_else(|p| p.into_inner()).clear();
    if let Some(p) = sock_path {
        let _ = std::fs::remove_file(p);
    }
    if record.host.auto_remove {
        let _lock = containers.lock(id)?;
        containers.remove_dir(id)?;
    }
    Ok(outcome)
}

/// Sleeps `wait` unless the user stops the container meanwhile; false if stopped.
fn sleep_unless_stopped(containers: &Containers, id: &str, wait: Duration) -> Result<bool, SupervisorError> {
    let end = Instant::now() + wait;
    loop {
        if state::read(&containers.dir(id))
            .map_err(RecordError::from)?
            .stop_requested
        {
            return Ok(false);
        }
        let now = Instant::now();
        if now >= end {
            return Ok(true);
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, FRAME_STDOUT, b"hi").unwrap();
        write_frame(&mut buf, FRAME_EXIT, &7i32.to_be_bytes()).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), Some((FRAME_STDOUT, b"hi".to_vec())));
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((FRAME_EXIT, 7i32.to_be_bytes().to_vec()))
        );
        assert_eq!(read_frame(&mut r).unwrap(), None);
    }

    #[test]
    fn restart_backoff_doubles_and_resets() {
        let short = Duration::from_secs(1);
        let d1 = restart_delay(None, short);
        assert_eq!(d1, Duration::from_millis(100));
        let d2 = restart_delay(Some(d1), short);
        assert_eq!(d2, Duration::from_millis(200));
        assert_eq!(
            restart_delay(Some(Duration::from_secs(50)), short),
            Duration::from_secs(60)
        );
        assert_eq!(restart_delay(Some(d2), Duration::from_secs(11)), d1);
    }
}
