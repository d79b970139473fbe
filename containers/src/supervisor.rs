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
//! exit code as i32 big endian, sent once when the container has finally stopped). The client
//! sends frames of the same shape: kind 4 = stdin data (written to the container's stdin when it
//! was created with `-i`), 5 = the client's terminal size (rows and columns as u16 big endian,
//! applied to the container's pty with `-t`), 6 = the end of the client's stdin (closes the
//! container's stdin). A client that goes away without frame 6 (it detached with the detach
//! keys) leaves the stdin open for the next one. Every supervisor listens, a foreground `kiln
//! run` included, so `kiln attach` reaches any running container.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_runtime::net::{self, Endpoint, NetConfig, NetRequest, PortProxy, PortSpec};
use kiln_runtime::{ContainerSpec, RuntimeError};
use nix::sys::signal::{SigSet, Signal};

use crate::logs::{self, LogWriter, Stream};
pub use crate::messages::{docker_exec_message, error_chain};
use crate::mounts::{self, MountError, MountRequest};
use crate::record::{ContainerRecord, Containers, RecordError};
use crate::state::{self, Status};

/// Frame kinds of the attach protocol.
pub const FRAME_STDOUT: u8 = 1;
/// Standard error frame.
pub const FRAME_STDERR: u8 = 2;
/// The final exit code.
pub const FRAME_EXIT: u8 = 3;
/// Client to supervisor: data for the container's stdin.
pub const FRAME_STDIN: u8 = 4;
/// Client to supervisor: the client's terminal size, rows and columns (u16 big endian each).
pub const FRAME_RESIZE: u8 = 5;
/// Client to supervisor: the client's stdin ended.
pub const FRAME_CLOSE_STDIN: u8 = 6;

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
    /// `--network container:<name>`, which kiln does not implement.
    #[error("network mode {0}: joining another container's network is not supported")]
    NetworkContainer(String),
    /// Connecting the container to the bridge failed.
    #[error("failed to connect container {id} to the bridge network")]
    NetSetup {
        /// The container.
        id: String,
        /// The cause.
        #[source]
        source: net::NetError,
    },
    /// A recorded `-p` or an image `EXPOSE` is not a port spec.
    #[error("invalid port specification `{spec}`")]
    PortSpec {
        /// The spec.
        spec: String,
        /// The cause.
        #[source]
        source: net::PortSpecError,
    },
    /// Ports were to be published in rootless mode, which kiln does not implement.
    #[error(
        "publishing ports (-p/-P) of container {id} is not implemented in rootless mode \
         (its network is slirp4netns', reached from the host through no port of its own)"
    )]
    RootlessPorts {
        /// The container.
        id: String,
    },
    /// Publishing the container's ports on the host failed.
    #[error("failed to publish the ports of container {id}")]
    Publish {
        /// The container.
        id: String,
        /// The cause.
        #[source]
        source: net::ProxyError,
    },
    /// A `--link` names a container that is not running on the bridge (Docker's message).
    #[error("Cannot link to a non running container: /{name} AS /{child}/{alias}")]
    LinkNotRunning {
        /// The linked container.
        name: String,
        /// This container's name.
        child: String,
        /// The alias.
        alias: String,
    },
    /// A `--link` names no container.
    #[error("could not get container for {name}")]
    Link {
        /// The link target as written.
        name: String,
        /// The cause.
        #[source]
        source: RecordError,
    },
    /// A recorded mount request is not in the volume code's form.
    #[error("invalid mount request recorded for container {id}")]
    MountRecord {
        /// The container.
        id: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The container's `--security-opt` values do not parse.
    #[error("invalid security options of container {id}")]
    SecurityOpt {
        /// The container.
        id: String,
        /// The cause.
        #[source]
        source: kiln_runtime::seccomp::SeccompError,
    },
    /// Resolving the container's mounts failed.
    #[error("failed to set up the mounts of container {id}")]
    Mounts {
        /// The container.
        id: String,
        /// The cause.
        #[source]
        source: Box<MountError>,
    },
    /// Blocking the signals a foreground run forwards failed.
    #[error("failed to block signals for forwarding them to the container")]
    BlockSignals(#[source] nix::errno::Errno),
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
        /// The signal proxy of the CLI (Docker's `--sig-proxy=true`), if it blocked them.
        signals: Option<SignalProxy>,
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

/// The largest attach frame accepted (the supervisor sends at most 32 KiB at a time).
const MAX_FRAME: usize = 1 << 20;

/// Reads one attach frame; `None` at the end of the stream.
pub fn read_frame(r: &mut impl io::Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("attach frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut data = vec![0u8; len];
    r.read_exact(&mut data)?;
    Ok(Some((head[0], data)))
}

/// Shared between the supervisor's threads.
#[derive(Default)]
struct Hub {
    clients: Mutex<Vec<UnixStream>>,
    stdin: Mutex<Option<File>>,
    /// The pty master of the current run with `-t`, for clients' window sizes.
    pty: Mutex<Option<OwnedFd>>,
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

    fn resize(&self, data: &[u8]) {
        let Ok(b) = <[u8; 4]>::try_from(data) else { return };
        let (rows, cols) = (u16::from_be_bytes([b[0], b[1]]), u16::from_be_bytes([b[2], b[3]]));
        if let Some(master) = self.pty.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = kiln_runtime::tty::set_winsize(master, rows, cols);
        }
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
        let (master, slave) = kiln_runtime::tty::open_pty()
            .map_err(|e| SupervisorError::Pty(Box::new(RuntimeError::Tty(e))))?;
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

/// The network modes `--network` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// A namespace of its own on the bridge (`bridge`, Docker's default).
    Bridge,
    /// The host's network.
    Host,
    /// A namespace with only a loopback interface.
    None,
}

/// The network mode of the recorded `--network` (`default` and empty mean `bridge`).
pub fn net_mode(record: &ContainerRecord) -> Result<NetMode, SupervisorError> {
    match record.host.network_mode.as_str() {
        "" | "default" | "bridge" => Ok(NetMode::Bridge),
        "host" => Ok(NetMode::Host),
        "none" => Ok(NetMode::None),
        other if other.starts_with("container:") => Err(SupervisorError::NetworkContainer(other.to_string())),
        other => Err(SupervisorError::Network(other.to_string())),
    }
}

/// The runtime's network for the recorded `--network` when it needs no endpoint (`host`,
/// `none`); a bridged container joins the namespace of its [`Endpoint`] instead.
pub fn network_for(record: &ContainerRecord) -> Result<kiln_runtime::Network, SupervisorError> {
    match net_mode(record)? {
        NetMode::Host => Ok(kiln_runtime::Network::Host),
        NetMode::None | NetMode::Bridge => Ok(kiln_runtime::Network::None),
    }
}

/// The ports a bridged container publishes: its `-p` specs, plus with `-P` every port the
/// image exposes (on a random host port).
pub fn port_specs(record: &ContainerRecord) -> Result<Vec<PortSpec>, SupervisorError> {
    let mut specs = Vec::new();
    for p in &record.host.port_bindings {
        specs.push(PortSpec::parse(p).map_err(|source| SupervisorError::PortSpec {
            spec: p.clone(),
            source,
        })?);
    }
    if record.host.publish_all_ports {
        for exposed in record.config.exposed_ports.iter().flat_map(|m| m.keys()) {
            specs.push(
                PortSpec::from_exposed(exposed).map_err(|source| SupervisorError::PortSpec {
                    spec: exposed.clone(),
                    source,
                })?,
            );
        }
    }
    Ok(specs)
}

/// The `--link NAME[:ALIAS]` entries of `record` as (name, alias, address): each linked
/// container must run on the bridge.
fn links_for(
    containers: &Containers,
    record: &ContainerRecord,
) -> Result<Vec<(String, String, Ipv4Addr)>, SupervisorError> {
    let mut out = Vec::new();
    for link in &record.host.links {
        let (name, alias) = link.split_once(':').unwrap_or((link, link));
        let name = name.strip_prefix('/').unwrap_or(name);
        let other = containers.lookup(name).map_err(|source| SupervisorError::Link {
            name: name.to_string(),
            source,
        })?;
        let not_running = || SupervisorError::LinkNotRunning {
            name: other.name.clone(),
            child: record.name.clone(),
            alias: alias.to_string(),
        };
        let st = containers.state(&other.id)?;
        if st.status != Status::Running {
            return Err(not_running());
        }
        let ep = st
            .network
            .as_ref()
            .and_then(|v| serde_json::from_value::<Endpoint>(v.clone()).ok())
            .ok_or_else(not_running)?;
        out.push((other.name.clone(), alias.to_string(), ep.ip));
    }
    Ok(out)
}

/// Docker's legacy link variables for `--link NAME:ALIAS` to a container at `ip` with the
/// exposed ports and environment of `other`: `ALIAS_NAME=/CHILD/ALIAS`, `ALIAS_PORT`,
/// `ALIAS_PORT_80_TCP{,_ADDR,_PORT,_PROTO}` and `ALIAS_ENV_K` for its variables but PATH and HOME.
pub fn link_env(child: &str, alias: &str, ip: Ipv4Addr, other: &ContainerRecord) -> Vec<String> {
    let prefix: String = alias
        .chars()
        .map(|c| if c == '-' { '_' } else { c.to_ascii_uppercase() })
        .collect();
    let mut env = vec![format!("{prefix}_NAME=/{child}/{alias}")];
    let mut ports: Vec<(u16, String)> = other
        .config
        .exposed_ports
        .iter()
        .flat_map(|m| m.keys())
        .filter_map(|p| {
            let (port, proto) = p.split_once('/').unwrap_or((p, "tcp"));
            Some((port.parse().ok()?, proto.to_string()))
        })
        .collect();
    ports.sort();
    if let Some((port, proto)) = ports.first() {
        env.push(format!("{prefix}_PORT={proto}://{ip}:{port}"));
    }
    for (port, proto) in &ports {
        let p = format!("{prefix}_PORT_{port}_{}", proto.to_ascii_uppercase());
        env.push(format!("{p}={proto}://{ip}:{port}"));
        env.push(format!("{p}_ADDR={ip}"));
        env.push(format!("{p}_PORT={port}"));
        env.push(format!("{p}_PROTO={proto}"));
    }
    for kv in other.config.env.iter().flatten() {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k != "PATH" && k != "HOME" && !k.is_empty() {
            env.push(format!("{prefix}_ENV_{k}={v}"));
        }
    }
    env
}

/// The network of one run of a container and what to undo when the run ends.
struct RunNet {
    network: kiln_runtime::Network,
    etc_files: kiln_runtime::EtcFiles,
    /// `--link` variables, set before the container's own.
    link_env: Vec<String>,
    endpoint: Option<Endpoint>,
    proxy: Option<PortProxy>,
    /// Rootless mode: the namespace held by this process and its user-mode network helper.
    held: Option<net::HeldEndpoint>,
}

impl RunNet {
    /// The endpoint's serde form and the published ports, for the state.
    fn state(&self) -> (Option<serde_json::Value>, Vec<net::PublishedPort>) {
        (
            self.endpoint.as_ref().and_then(|e| serde_json::to_value(e).ok()),
            self.proxy
                .as_ref()
                .map(|p| p.ports().to_vec())
                .unwrap_or_default(),
        )
    }

    /// Stops publishing and disconnects the endpoint (once the container's processes are gone).
    fn finish(self) {
        drop(self.proxy);
        drop(self.held);
        if let Some(ep) = self.endpoint {
            if let Err(e) = net::teardown(&ep) {
                tracing::warn!("{}", error_chain(&e));
            }
        }
    }
}

/// Sets up the network of one run: for a bridged container a new endpoint (namespace, veth,
/// address), its published ports and its `/etc` files; for `host` and `none` the build
/// sandbox's defaults. The endpoint's namespace file is bind-mounted in this process's mount
/// namespace; other processes reach the namespace as `/proc/<pid>/ns/net` of the container.
fn setup_network(
    containers: &Containers,
    record: &ContainerRecord,
    hostname: &str,
) -> Result<RunNet, SupervisorError> {
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mode = net_mode(record)?;
    if mode != NetMode::Bridge {
        let network = network_for(record)?;
        return Ok(RunNet {
            etc_files: kiln_runtime::EtcFiles::for_build(hostname, &host_resolv, &network),
            link_env: Vec::new(),
            network,
            endpoint: None,
            proxy: None,
            held: None,
        });
    }
    let specs = port_specs(record)?;
    if kiln_runtime::userns::in_user_namespace() {
        // Rootless: no bridge; a namespace held by this supervisor, connected by slirp4netns as
        // a build's RUN steps are.
        if !specs.is_empty() {
            return Err(SupervisorError::RootlessPorts {
                id: record.id.clone(),
            });
        }
        let held = net::setup_held(&record.id, &NetRequest::default()).map_err(|source| {
            SupervisorError::NetSetup {
                id: record.id.clone(),
                source,
            }
        })?;
        return Ok(RunNet {
            network: held.network(),
            etc_files: net::etc_files(hostname, &held.endpoint, &[], &host_resolv),
            link_env: Vec::new(),
            endpoint: None,
            proxy: None,
            held: Some(held),
        });
    }
    let links = links_for(containers, record)?;
    let mut link_vars = Vec::new();
    for (name, alias, ip) in &links {
        if let Ok(other) = containers.lookup(name) {
            link_vars.extend(link_env(&record.name, alias, *ip, &other));
        }
    }
    let request = NetRequest {
        config: NetConfig::default(),
        ip: None,
    };
    // A namespace file of this container left by a supervisor killed before it recorded its
    // endpoint: this supervisor is the container's only one, so the file is stale.
    let stale = request.config.netns_dir.join(&record.id);
    if stale.exists() {
        if let Err(e) = net::netns::remove(&stale) {
            tracing::warn!("{}", error_chain(&e));
        }
    }
    let endpoint = net::setup(&record.id, &request).map_err(|source| SupervisorError::NetSetup {
        id: record.id.clone(),
        source,
    })?;
    let proxy = if specs.is_empty() {
        None
    } else {
        match net::publish(&specs, endpoint.ip) {
            Ok(p) => Some(p),
            Err(source) => {
                let _ = net::teardown(&endpoint);
                return Err(SupervisorError::Publish {
                    id: record.id.clone(),
                    source,
                });
            }
        }
    };
    Ok(RunNet {
        network: endpoint.network(),
        etc_files: net::etc_files(hostname, &endpoint, &links, &host_resolv),
        link_env: link_vars,
        endpoint: Some(endpoint),
        proxy,
        held: None,
    })
}

/// The mount requests recorded for `record` (`HostConfig.Mounts`).
pub fn mount_requests(record: &ContainerRecord) -> Result<Vec<MountRequest>, SupervisorError> {
    record
        .host
        .mounts
        .iter()
        .map(MountRequest::from_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| SupervisorError::MountRecord {
            id: record.id.clone(),
            source,
        })
}

/// The image's `VOLUME` paths of `record`.
pub fn image_volumes(record: &ContainerRecord) -> Vec<String> {
    record
        .config
        .volumes
        .iter()
        .flat_map(|m| m.keys().cloned())
        .collect()
}

/// The runtime mounts for the recorded `-v/--mount/--tmpfs/--volumes-from` requests and the
/// image's `VOLUME`s (anonymous volumes), resolved by the volume code at each start.
fn mounts_for(
    store_root: &Path,
    record: &ContainerRecord,
) -> Result<Vec<kiln_runtime::MountSpec>, SupervisorError> {
    let requests = mount_requests(record)?;
    let image_volumes = image_volumes(record);
    if requests.is_empty() && image_volumes.is_empty() {
        return Ok(Vec::new());
    }
    mounts::resolve(
        store_root,
        &record.id,
        &requests,
        &image_volumes,
        &record.rootfs.lower,
    )
    .map_err(|source| SupervisorError::Mounts {
        id: record.id.clone(),
        source: Box::new(source),
    })
}

/// The container's hostname: `--hostname`, else the short ID.
fn hostname_of(record: &ContainerRecord) -> String {
    if record.host.hostname.is_empty() {
        record.short_id().to_string()
    } else {
        record.host.hostname.clone()
    }
}

/// The container's stdio for one run.
struct Stdio {
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    controlling_tty: bool,
}

/// The full spec the runtime runs for `record` with the given stdio and network.
fn container_spec(
    record: &ContainerRecord,
    mounts: Vec<kiln_runtime::MountSpec>,
    stdio: Stdio,
    net: &RunNet,
) -> Result<ContainerSpec, SupervisorError> {
    let hostname = hostname_of(record);
    let mut env = record.config.env.clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.insert(1.min(env.len()), format!("HOSTNAME={hostname}"));
    }
    // Docker puts the link variables before the container's own (which win).
    for (i, kv) in net.link_env.iter().enumerate() {
        let key = kv.split_once('=').map(|(k, _)| k).unwrap_or(kv);
        if !env.iter().any(|e| e.split_once('=').map(|(k, _)| k) == Some(key)) {
            env.insert(2.min(env.len()) + i, kv.clone());
        }
    }
    let h = &record.host;
    let security = kiln_runtime::seccomp::parse_security_opts(&h.security_opt).map_err(|source| {
        SupervisorError::SecurityOpt {
            id: record.id.clone(),
            source,
        }
    })?;
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
        hostname,
        mounts,
        etc_files: net.etc_files.clone(),
        network: net.network.clone(),
        security: if h.privileged {
            kiln_runtime::Security::Insecure
        } else {
            kiln_runtime::Security::Default
        },
        stdin: stdio.stdin,
        stdout: stdio.stdout,
        stderr: stdio.stderr,
        options: kiln_runtime::RunOptions {
            controlling_tty: stdio.controlling_tty,
            init: h.init,
            cap_add: h.cap_add.clone(),
            cap_drop: h.cap_drop.clone(),
            cgroup,
            // docker run: the user's own gid is also a supplementary group.
            groups: kiln_runtime::Groups::WithPrimary,
            // A container's changes survive a crash, as docker's do.
            volatile_upper: false,
            no_new_privileges: security.no_new_privileges,
            seccomp: security.seccomp,
            mount_points_in_rootfs: false,
            // Docker's 64 MiB /dev/shm and the supervisor's own limits.
            shm_size: None,
            rlimits: Vec::new(),
            // `kiln run` has no chroot isolation (yet): a container gets its own pid namespace.
            isolation: kiln_runtime::Isolation::Default,
        },
    })
}

/// Resizes the pty `master` to the size of this process's terminal on each `SIGWINCH`
/// (`kiln exec -t`). Blocks `SIGWINCH` in the calling thread: call it before the process starts
/// other threads, so that they inherit the mask and the forwarding thread receives the signal.
pub fn forward_winch(master: OwnedFd) -> Result<(), SupervisorError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGWINCH);
    set.thread_block().map_err(SupervisorError::BlockSignals)?;
    std::thread::spawn(move || loop {
        if set.wait().is_ok() {
            if let Ok((rows, cols)) = kiln_runtime::tty::get_winsize(std::io::stdout()) {
                let _ = kiln_runtime::tty::set_winsize(&master, rows, cols);
            }
        }
    });
    Ok(())
}

/// The signals a foreground `kiln run` forwards to its container (Docker's `--sig-proxy`).
pub const PROXIED_SIGNALS: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// What a [`SignalProxy`] does on `SIGWINCH`.
pub type WinchHandler = Box<dyn FnMut() + Send>;

/// Forwards the signals a foreground `kiln run` (or an attach client) receives to its container,
/// and passes `SIGWINCH` to a handler (resizing the container's pty). [`SignalProxy::block`]
/// must run before the process starts any thread, so that every thread inherits the blocked
/// mask and only the proxy's thread (`sigwait`) receives these signals: the CLI is never killed
/// by them, and the container is never left without its supervisor because of them.
pub struct SignalProxy {
    set: SigSet,
    pid: Arc<AtomicI32>,
    started: Arc<AtomicBool>,
    winch: Arc<Mutex<Option<WinchHandler>>>,
}

impl std::fmt::Debug for SignalProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalProxy")
            .field("pid", &self.pid.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl SignalProxy {
    /// Blocks [`PROXIED_SIGNALS`] and `SIGWINCH` in the calling thread and starts the thread
    /// that forwards them. A terminating signal that arrives before the container has started
    /// ends this process with `128 + signal`, as it would have without the proxy.
    pub fn block() -> Result<SignalProxy, SupervisorError> {
        let mut set = SigSet::empty();
        for s in PROXIED_SIGNALS {
            set.add(s);
        }
        set.add(Signal::SIGWINCH);
        set.thread_block().map_err(SupervisorError::BlockSignals)?;
        let proxy = SignalProxy {
            set,
            pid: Arc::new(AtomicI32::new(0)),
            started: Arc::new(AtomicBool::new(false)),
            winch: Arc::new(Mutex::new(None)),
        };
        let (set, pid, started, winch) = (set, proxy.pid.clone(), proxy.started.clone(), proxy.winch.clone());
        std::thread::spawn(move || loop {
            let Ok(sig) = set.wait() else { continue };
            if sig == Signal::SIGWINCH {
                if let Some(h) = winch.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    h();
                }
                continue;
            }
            let target = pid.load(Ordering::SeqCst);
            if target > 0 {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(target), sig);
            } else if !started.load(Ordering::SeqCst) && !matches!(sig, Signal::SIGUSR1 | Signal::SIGUSR2) {
                std::process::exit(128 + sig as i32);
            }
        });
        Ok(proxy)
    }

    /// The signals blocked.
    pub fn signals(&self) -> SigSet {
        self.set
    }

    /// Forwards the signals from now on to `pid` (0: to nobody, without ending this process).
    pub fn forward_to(&self, pid: i32) {
        self.started.store(true, Ordering::SeqCst);
        self.pid.store(pid, Ordering::SeqCst);
    }

    /// Runs `handler` on each `SIGWINCH` (replacing the previous one); `None` ignores them.
    pub fn on_winch(&self, handler: Option<WinchHandler>) {
        *self.winch.lock().unwrap_or_else(|p| p.into_inner()) = handler;
    }

    fn running(&self, pid: i32, pty: Option<OwnedFd>) {
        self.on_winch(pty.map(|master| -> WinchHandler {
            Box::new(move || {
                if let Ok((rows, cols)) = kiln_runtime::tty::get_winsize(std::io::stdout()) {
                    let _ = kiln_runtime::tty::set_winsize(&master, rows, cols);
                }
            })
        }));
        self.forward_to(pid);
    }

    fn stopped(&self) {
        self.pid.store(0, Ordering::SeqCst);
        self.on_winch(None);
    }
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
                let mut conn = io::BufReader::new(conn);
                while let Ok(Some((kind, data))) = read_frame(&mut conn) {
                    match kind {
                        FRAME_STDIN if open_stdin => hub.write_stdin(&data),
                        FRAME_RESIZE => hub.resize(&data),
                        FRAME_CLOSE_STDIN if open_stdin => hub.close_stdin(),
                        _ => {}
                    }
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

    let (mut ready, wait_attach, fg, signals) = match mode {
        Mode::Detached { ready, wait_attach } => (ready, wait_attach, None, None),
        Mode::Foreground {
            stdin,
            stdout,
            stderr,
            signals,
        } => (None, false, Some((stdin, stdout, stderr)), signals),
    };

    // The attach socket: every running container can be attached to, a foreground one too.
    let (_dir_fd, sock_path) = listen(&dir, &hub, &record, wait_attach, ready.as_ref())?;

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
        let _raw = foreground_terminal(pty_master.as_ref(), fg.as_ref());
        connect_stdin(&hub, pty_master.as_ref(), stdin_writer, fg.as_ref())?;
        let stdio = Stdio {
            stdin: child_stdin,
            stdout: child_stdout,
            stderr: child_stderr,
            controlling_tty,
        };
        let started = Instant::now();
        let (running, run_net) = match start_run(containers, &record, stdio, &scratch) {
            Ok(r) => r,
            Err((code, message)) => {
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
                    st.network = None;
                    st.ports.clear();
                })?;
                report(&mut ready, &format!("err {code} {}", message.replace('\n', " ")));
                break Outcome::StartFailed { code, message };
            }
        };
        let pid = running.pid();
        let probe = crate::health::probe_of(record.config.healthcheck.as_ref());
        let (endpoint_state, ports_state) = run_net.state();
        if let Some(p) = signals.as_ref() {
            p.running(pid, pty_master.as_ref().and_then(|m| m.try_clone().ok()));
        }
        containers.update_state(id, |st| {
            st.network = endpoint_state;
            st.ports = ports_state;
            st.status = Status::Running;
            st.running = true;
            st.pid = pid;
            st.pid_start = state::process_start(pid).unwrap_or(0);
            st.health = probe.as_ref().map(|_| state::Health::default());
            st.started_at = crate::now_rfc3339();
            st.finished_at.clear();
            st.error.clear();
            st.exit_code = 0;
            st.oom_killed = false;
            st.supervisor_pid = me;
            st.supervisor_start = me_start;
        })?;
        report(&mut ready, "ok");
        let probing = Arc::new(AtomicBool::new(false));
        if let Some(p) = probe {
            crate::health::spawn(containers.clone(), record.clone(), pid, p, probing.clone());
        }
        let pumps = spawn_pumps(outputs, fg.as_ref(), &log, &hub);
        let status = running.wait().map_err(|source| SupervisorError::Wait {
            id: id.to_string(),
            source: Box::new(source),
        });
        // The prober stops (and records nothing more for this run).
        probing.store(true, Ordering::SeqCst);
        if let Some(p) = signals.as_ref() {
            p.stopped();
        }
        for p in pumps {
            let _ = p.join();
        }
        log.flush()?;
        hub.close_stdin();
        *hub.pty.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let status = status?;
        let oom_killed = status.oom_killed;
        let code = exit_code(status);
        let ran_for = started.elapsed();

        let st = record_exit(containers, id, &record, code, oom_killed)?;
        // Every process of the container has exited (its pid namespace died with pid 1): the
        // endpoint goes; a restart sets up a new one.
        run_net.finish();
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

    finish(containers, id, &record, &hub, &sock_path, &outcome)?;
    Ok(outcome)
}

/// The foreground's stdio as the supervisor's loop holds it: stdin (with `-i`), stdout, stderr.
type Foreground = (Option<OwnedFd>, OwnedFd, OwnedFd);

/// Binds the attach socket of `dir` and starts accepting clients; with `wait_attach`, writes
/// `listening` to `ready` and waits (10 s at most) for the first client. Returns the socket's
/// path and the directory descriptor it goes through, which must stay open.
fn listen(
    dir: &Path,
    hub: &Arc<Hub>,
    record: &ContainerRecord,
    wait_attach: bool,
    ready: Option<&File>,
) -> Result<(File, PathBuf), SupervisorError> {
    let (d, path) = socket_path(dir).map_err(|source| SupervisorError::Listen {
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
        report(&mut ready.and_then(|f| f.try_clone().ok()), "listening");
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            return Err(SupervisorError::AttachTimeout(dir.join("attach.sock")));
        }
    }
    Ok((d, path))
}

/// A foreground terminal gives the container its size and goes raw while it runs (until the
/// returned guard is dropped).
fn foreground_terminal(
    pty_master: Option<&OwnedFd>,
    fg: Option<&Foreground>,
) -> Option<kiln_runtime::tty::RawMode> {
    let (Some(master), Some((stdin, stdout, _))) = (pty_master, fg) else {
        return None;
    };
    if let Ok((rows, cols)) = kiln_runtime::tty::get_winsize(stdout) {
        let _ = kiln_runtime::tty::set_winsize(master, rows, cols);
    }
    let i = stdin.as_ref().filter(|i| kiln_runtime::tty::is_tty(*i))?;
    kiln_runtime::tty::RawMode::enable(i).ok()
}

/// A foreground run forwards its own stdin into the container's, which sees the end of it when
/// ours ends; a detached one takes input from attach clients.
fn connect_stdin(
    hub: &Arc<Hub>,
    pty_master: Option<&OwnedFd>,
    stdin_writer: Option<OwnedFd>,
    fg: Option<&Foreground>,
) -> Result<(), SupervisorError> {
    *hub.pty.lock().unwrap_or_else(|p| p.into_inner()) = pty_master.and_then(|m| m.try_clone().ok());
    match (stdin_writer, fg) {
        (Some(w), Some((Some(src), _, _))) => {
            // Attach clients write into the same stdin.
            *hub.stdin.lock().unwrap_or_else(|p| p.into_inner()) = w.try_clone().ok().map(File::from);
            let mut dst = File::from(w);
            let mut src = File::from(src.try_clone().map_err(SupervisorError::Dup)?);
            let hub = hub.clone();
            std::thread::spawn(move || {
                let _ = io::copy(&mut src, &mut dst);
                drop(dst);
                hub.close_stdin();
            });
        }
        (w, _) => *hub.stdin.lock().unwrap_or_else(|p| p.into_inner()) = w.map(File::from),
    }
    Ok(())
}

/// Resolves the mounts, sets up the network and starts the container's process; on failure,
/// Docker's exit code and the reason.
fn start_run(
    containers: &Containers,
    record: &ContainerRecord,
    stdio: Stdio,
    scratch: &Path,
) -> Result<(kiln_runtime::Running, RunNet), (u8, String)> {
    let prepared = mounts_for(containers.root(), record).and_then(|mounts| {
        let net = setup_network(containers, record, &hostname_of(record))?;
        match container_spec(record, mounts, stdio, &net) {
            Ok(spec) => Ok((spec, net)),
            Err(e) => {
                net.finish();
                Err(e)
            }
        }
    });
    prepared
        .map_err(|e| (start_failure_code_of(&e), error_chain(&e)))
        .and_then(|(spec, net)| match kiln_runtime::start(spec, scratch) {
            Ok(r) => Ok((r, net)),
            Err(e) => {
                net.finish();
                Err((start_failure_code(&e), error_chain(&e)))
            }
        })
}

/// One thread per output stream, copying it to the log, the attach clients and (in the
/// foreground) our own stdout or stderr.
fn spawn_pumps(
    outputs: Vec<(Stream, OwnedFd)>,
    fg: Option<&Foreground>,
    log: &Arc<LogWriter>,
    hub: &Arc<Hub>,
) -> Vec<JoinHandle<()>> {
    outputs
        .into_iter()
        .map(|(stream, fd)| {
            let echo = fg.and_then(|(_, out, err)| {
                let target = match stream {
                    Stream::Stdout => out,
                    Stream::Stderr => err,
                };
                target.as_fd().try_clone_to_owned().ok()
            });
            spawn_pump(stream, fd, log.clone(), hub.clone(), echo)
        })
        .collect()
}

/// Records the exit of the container's process under its lock: exited, or restarting when its
/// restart policy says so.
fn record_exit(
    containers: &Containers,
    id: &str,
    record: &ContainerRecord,
    code: i32,
    oom_killed: bool,
) -> Result<state::ContainerState, SupervisorError> {
    let _lock = containers.lock(id)?;
    let st = containers.update_state_locked(id, |st| {
        let restart = record
            .host
            .restart_policy
            .should_restart(code, st.restart_count, st.stop_requested);
        st.running = false;
        st.pid = 0;
        st.exit_code = code;
        st.oom_killed = oom_killed;
        st.network = None;
        st.ports.clear();
        st.finished_at = crate::now_rfc3339();
        st.status = if restart {
            Status::Restarting
        } else {
            Status::Exited
        };
    })?;
    Ok(st)
}

/// Tells attach clients the exit code, closes the attach socket and, with `--rm`, removes the
/// container and its anonymous volumes.
fn finish(
    containers: &Containers,
    id: &str,
    record: &ContainerRecord,
    hub: &Hub,
    sock_path: &Path,
    outcome: &Outcome,
) -> Result<(), SupervisorError> {
    if let Outcome::Exited(code) = outcome {
        hub.broadcast(FRAME_EXIT, &code.to_be_bytes());
    }
    hub.clients.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let _ = std::fs::remove_file(sock_path);
    if record.host.auto_remove {
        let _lock = containers.lock(id)?;
        release_volumes(containers, id);
        containers.remove_dir(id)?;
    }
    Ok(())
}

/// Drops the anonymous volumes of container `id` that no other container uses (`--rm`,
/// `rm -v`); a failure is logged, as Docker does.
pub fn release_volumes(containers: &Containers, id: &str) {
    match mounts::load(containers.root(), id) {
        Ok(m) if m.is_empty() => {}
        Ok(_) => {
            if let Err(e) = mounts::release(containers.root(), id) {
                tracing::warn!("{}", error_chain(&e));
            }
        }
        Err(e) => tracing::warn!("{}", error_chain(&e)),
    }
}

/// Docker's exit code for a supervisor step that failed before the runtime ran: 125.
fn start_failure_code_of(err: &SupervisorError) -> u8 {
    match err {
        SupervisorError::Wait { source, .. } | SupervisorError::Pty(source) => start_failure_code(source),
        _ => EXIT_RUNNER,
    }
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
