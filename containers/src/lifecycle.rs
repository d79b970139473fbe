//! Lifecycle operations the CLI runs on containers: create, start (spawning a supervisor),
//! stop, kill, remove, wait, top, prune. Each takes the container's directory lock for the
//! read-modify-write of its state and never for a wait, so a supervisor can always record an
//! exit.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_cache::snapshot::Snapshots;
use kiln_cache::Store;
use kiln_dag::image::ContainerConfig;

use crate::record::{self, ContainerRecord, Containers, HostConfig, RecordError, RootfsPaths};
use crate::state::{self, ContainerState, Status};
use crate::supervisor::{self, Outcome};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A lifecycle step that failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// A record or state operation failed.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The image is not in the store (Docker's message).
    #[error("Unable to find image '{0}' locally")]
    UnknownImage(String, #[source] Box<kiln_cache::images::ImageError>),
    /// The image is of another platform than `--platform` asked for (Docker's message).
    #[error("image with reference {image} was found but its platform ({got}) does not match the specified platform ({platform})")]
    PlatformMismatch {
        image: String,
        platform: String,
        got: String,
    },
    /// A foreign image and no emulation for it.
    #[error("cannot run a {platform} image on this host: no binfmt_misc handler with the F flag emulates it; install QEMU user emulation (`apt-get install qemu-user-static`) and register it (`kiln setup binfmt`, as root)")]
    NoEmulation { platform: String },
    /// Neither the image nor the command line gives a command.
    #[error("no command specified")]
    NoCommand,
    /// `--no-healthcheck` with `--health-*` flags (Docker's message).
    #[error("--no-healthcheck conflicts with --health-* options")]
    HealthConflict,
    /// An `--expose` value that is not a port, a range or a protocol Docker knows.
    #[error("invalid range format for --expose: {0}")]
    InvalidExpose(String),
    /// `--rm` together with a restart policy.
    #[error("Conflicting options: --restart and --rm")]
    RestartWithRm,
    /// Unpacking the image's layers failed.
    #[error("failed to unpack the layers of image `{image}`")]
    Unpack {
        /// The image.
        image: String,
        /// The cause.
        #[source]
        source: Box<UnpackError>,
    },
    /// Spawning the supervisor process failed.
    #[error("failed to start the supervisor of container {id}")]
    Spawn {
        /// The container.
        id: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The supervisor ended without saying whether the container started.
    #[error("the supervisor of container {id} exited before starting it; see its state for details")]
    SupervisorGone {
        /// The container.
        id: String,
    },
    /// The container could not start (Docker's exit code, the runtime's reason).
    #[error("failed to start container {id}: {message}")]
    StartFailed {
        /// The container.
        id: String,
        /// 125, 126 or 127.
        code: u8,
        /// The reason.
        message: String,
    },
    /// `rm` of a running container without `-f` (Docker's message).
    #[error("cannot remove container \"/{name}\": container is running: stop the container before removing or force remove")]
    RemoveRunning {
        /// The container's name.
        name: String,
    },
    /// A signal name or number that is not a signal.
    #[error("invalid signal: {0}")]
    InvalidSignal(String),
    /// Sending a signal failed.
    #[error("failed to send signal {signal} to the process {pid} of container {id}")]
    Kill {
        /// The container.
        id: String,
        /// The host pid.
        pid: i32,
        /// The signal.
        signal: String,
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
    /// `kill`/`top`/`exec` on a container that does not run (Docker's message).
    #[error("container {0} is not running")]
    NotRunning(String),
    /// A mount request that cannot be satisfied (Docker's message, e.g. a missing bind source
    /// or a duplicate mount point).
    #[error(transparent)]
    Mounts(#[from] crate::mounts::MountError),
    /// A recorded mount request or a network setting is not valid.
    #[error(transparent)]
    Supervisor(#[from] Box<supervisor::SupervisorError>),
    /// Reading `/proc` for `top` failed.
    #[error("failed to read `{path}`")]
    Proc {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// `--health-*` and `--no-healthcheck`, applied over the image's `HEALTHCHECK`. Durations in
/// nanoseconds.
#[derive(Clone, Debug, Default)]
pub struct HealthOverride {
    /// `--health-cmd` (run with `/bin/sh -c`).
    pub cmd: Option<String>,
    /// `--health-interval`.
    pub interval: Option<i64>,
    /// `--health-timeout`.
    pub timeout: Option<i64>,
    /// `--health-start-period`.
    pub start_period: Option<i64>,
    /// `--health-retries`.
    pub retries: Option<i64>,
    /// `--no-healthcheck`.
    pub disable: bool,
}

impl HealthOverride {
    fn any(&self) -> bool {
        self.cmd.is_some()
            || self.interval.is_some()
            || self.timeout.is_some()
            || self.start_period.is_some()
            || self.retries.is_some()
    }
}

/// What `kiln create` / `kiln run` asked for, before the image is applied.
#[derive(Clone, Debug, Default)]
pub struct CreateRequest {
    /// `--name` (a generated name when `None`).
    pub name: Option<String>,
    /// The image as named on the command line.
    pub image: String,
    /// `--entrypoint` (`Some("")` clears the image's).
    pub entrypoint: Option<String>,
    /// The command and its arguments after the image.
    pub cmd: Vec<String>,
    /// `-e` and `--env-file` entries, in order: `KEY=VALUE`, or `KEY` to copy it from the
    /// caller's environment (dropped when unset there).
    pub env: Vec<String>,
    /// `-w`.
    pub workdir: Option<String>,
    /// `-u`.
    pub user: Option<String>,
    /// `-h`.
    pub hostname: Option<String>,
    /// `-l/--label` and `--label-file` entries, `KEY=VALUE` or `KEY` (empty value), added to the
    /// image's labels.
    pub labels: Vec<String>,
    /// `--expose PORT[/PROTO]` (or a range), added to the image's exposed ports.
    pub expose: Vec<String>,
    /// The health check flags.
    pub health: HealthOverride,
    /// `--platform`: the image of a multi-platform image for this platform (else the host's),
    /// which a single-platform image must match.
    pub platform: Option<kiln_dag::Platform>,
    /// Everything else.
    pub host: HostConfig,
}

/// The argv Docker runs: ENTRYPOINT + (arguments or CMD), with `--entrypoint` overriding and
/// dropping the image's CMD.
pub fn command_line(cfg: &ContainerConfig, entrypoint: Option<&str>, args: &[String]) -> Vec<String> {
    let entry: Vec<String> = match entrypoint {
        Some("") => Vec::new(),
        Some(e) => vec![e.to_string()],
        None => cfg.entrypoint.clone().unwrap_or_default(),
    };
    let cmd: Vec<String> = if !args.is_empty() {
        args.to_vec()
    } else if entrypoint.is_some() {
        Vec::new()
    } else {
        cfg.cmd.clone().unwrap_or_default()
    };
    let mut argv = entry;
    argv.extend(cmd);
    argv
}

/// The image's `Env` with `extra` applied (later wins), plus Docker's default `PATH`.
pub fn container_env(image_env: &[String], extra: &[String]) -> Vec<String> {
    let mut env: Vec<String> = image_env.to_vec();
    for kv in extra {
        let (k, v) = match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match std::env::var(kv) {
                Ok(v) => (kv.clone(), v),
                Err(_) => continue,
            },
        };
        env.retain(|e| e.split_once('=').map(|(ek, _)| ek).unwrap_or(e) != k);
        env.push(format!("{k}={v}"));
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    env
}

/// Why an image's layers could not be made into snapshots.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The snapshot directory could not be opened, or a layer not unpacked.
    #[error(transparent)]
    Snapshot(#[from] kiln_cache::snapshot::SnapshotError),
    /// A layer blob could not be opened.
    #[error(transparent)]
    Content(#[from] kiln_cache::content::ContentError),
    /// A layer blob's compression could not be read.
    #[error("layer {layer}")]
    Sniff {
        /// The layer blob.
        layer: kiln_dag::Digest,
        /// The cause.
        #[source]
        source: kiln_cache::layer::SniffError,
    },
}

/// Unpacks (if needed) the image's layers and returns their snapshot directories, top first.
pub fn image_lower_dirs(
    store: &Store,
    image: &kiln_cache::images::Image,
) -> Result<Vec<PathBuf>, UnpackError> {
    let snapshots = Snapshots::open(&store.snapshots_dir())?;
    let mut dirs = Vec::new();
    for (l, chain) in image.layers.iter().zip(image.chain_ids()) {
        // A layer's tree: its snapshot's, over the snapshots it is stacked on (top first).
        let trees = match snapshots.lower_dirs(&chain) {
            Ok(trees) => trees,
            // Absent, or not whole (what `get` calls absent too): unpacked from the layer.
            Err(_) => {
                let file = store.content().open(&l.digest)?;
                let reader = kiln_cache::layer::sniff(file).map_err(|source| UnpackError::Sniff {
                    layer: l.digest,
                    source,
                })?;
                vec![snapshots.unpack(&chain, None, reader, Some(&l.diff_id))?.path]
            }
        };
        dirs.extend(trees.into_iter().rev());
    }
    dirs.reverse();
    Ok(dirs)
}

/// Creates a container from `req`: resolves the image, applies Docker's CMD/ENTRYPOINT, Env,
/// WorkingDir and User rules, and stores the record (`created`). Nothing is left behind on
/// failure.
pub fn create(
    containers: &Containers,
    store: &Store,
    req: CreateRequest,
) -> Result<ContainerRecord, LifecycleError> {
    if req.host.auto_remove && !req.host.restart_policy.is_none() {
        return Err(LifecycleError::RestartWithRm);
    }
    let platform = req.platform.clone().unwrap_or_else(kiln_dag::Platform::host);
    let image = store
        .images()
        .resolve_for(&req.image, &platform)
        .map_err(|e| LifecycleError::UnknownImage(req.image.clone(), Box::new(e)))?;
    let c = &image.config;
    let got = kiln_dag::Platform::new(&c.os, &c.architecture, c.variant.as_deref());
    if req.platform.is_some() && platform.match_rank(&got).is_none() {
        return Err(LifecycleError::PlatformMismatch {
            image: req.image.clone(),
            platform: platform.to_string(),
            got: got.to_string(),
        });
    }
    // A foreign image runs under QEMU through binfmt_misc: fail now, with the fix, when the
    // host has no handler fit for containers.
    if !c.architecture.is_empty() && !kiln_runtime::binfmt::is_native(&got.architecture) {
        use kiln_runtime::binfmt::Support;
        match kiln_runtime::binfmt::support(&got.architecture) {
            Ok(Support::Native | Support::Emulated(_)) => {}
            _ => {
                return Err(LifecycleError::NoEmulation {
                    platform: got.to_string(),
                })
            }
        }
    }
    let mut config = image.config.config.clone();
    let args = command_line(&config, req.entrypoint.as_deref(), &req.cmd);
    if args.is_empty() {
        return Err(LifecycleError::NoCommand);
    }
    if let Some(e) = &req.entrypoint {
        config.entrypoint = (!e.is_empty()).then(|| vec![e.clone()]);
        config.cmd = Some(req.cmd.clone()).filter(|c| !c.is_empty());
    } else if !req.cmd.is_empty() {
        config.cmd = Some(req.cmd.clone());
    }
    config.env = Some(container_env(config.env.as_deref().unwrap_or_default(), &req.env));
    if let Some(w) = &req.workdir {
        config.working_dir = w.clone();
    }
    if let Some(u) = &req.user {
        config.user = u.clone();
    }
    let h = &req.health;
    if h.disable && h.any() {
        return Err(LifecycleError::HealthConflict);
    }
    if h.disable {
        config.healthcheck = Some(kiln_dag::image::HealthConfig {
            test: vec!["NONE".into()],
            ..Default::default()
        });
    } else if h.any() {
        let hc = config.healthcheck.get_or_insert_with(Default::default);
        if let Some(c) = &h.cmd {
            hc.test = vec!["CMD-SHELL".into(), c.clone()];
        }
        hc.interval = h.interval.unwrap_or(hc.interval);
        hc.timeout = h.timeout.unwrap_or(hc.timeout);
        hc.start_period = h.start_period.unwrap_or(hc.start_period);
        hc.retries = h.retries.unwrap_or(hc.retries);
    }
    for e in &req.expose {
        let (ports, proto) = e.split_once('/').unwrap_or((e.as_str(), "tcp"));
        let (start, end) = ports.split_once('-').unwrap_or((ports, ports));
        let (Ok(start), Ok(end)) = (start.parse::<u16>(), end.parse::<u16>()) else {
            return Err(LifecycleError::InvalidExpose(e.clone()));
        };
        if start == 0 || end < start || !matches!(proto, "tcp" | "udp" | "sctp") {
            return Err(LifecycleError::InvalidExpose(e.clone()));
        }
        let exposed = config.exposed_ports.get_or_insert_with(Default::default);
        for p in start..=end {
            exposed.insert(format!("{p}/{proto}"), Default::default());
        }
    }
    if !req.labels.is_empty() {
        let labels = config.labels.get_or_insert_with(Default::default);
        for l in &req.labels {
            let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
            labels.insert(k.to_string(), v.to_string());
        }
    }
    let lower = image_lower_dirs(store, &image).map_err(|source| LifecycleError::Unpack {
        image: req.image.clone(),
        source: Box::new(source),
    })?;
    let id = record::new_id();
    let dir = containers.dir(&id);
    let mut host = req.host;
    if let Some(h) = req.hostname {
        host.hostname = h;
    }
    if host.stop_signal.is_empty() {
        host.stop_signal = config.stop_signal.clone();
    }
    let name = match req.name {
        Some(n) => n.strip_prefix('/').unwrap_or(&n).to_string(),
        None => record::generate_name(&id, &containers.list()?),
    };
    let rec = ContainerRecord {
        name,
        created: crate::now_rfc3339(),
        image: image.manifest_digest,
        image_id: Some(image.id()),
        image_name: req.image,
        config,
        args,
        host,
        rootfs: RootfsPaths {
            lower,
            upper: dir.join("upper"),
            work: dir.join("work"),
        },
        id,
    };
    supervisor::net_mode(&rec).map_err(Box::new)?;
    supervisor::port_specs(&rec).map_err(Box::new)?;
    let requests = supervisor::mount_requests(&rec).map_err(Box::new)?;
    let image_volumes = supervisor::image_volumes(&rec);
    containers.create(&rec)?;
    // Volumes are made and bind sources checked now, as Docker does at create; the mounts are
    // resolved again (to the same volumes) at each start.
    if !requests.is_empty() || !image_volumes.is_empty() {
        if let Err(e) = crate::mounts::resolve_mounts(
            containers.root(),
            &rec.id,
            &requests,
            &image_volumes,
            &rec.rootfs.lower,
        ) {
            let _ = containers.remove_dir(&rec.id);
            return Err(e.into());
        }
    }
    Ok(rec)
}

/// Resets the restart bookkeeping before a user `start`. Returns false if the container runs
/// already.
pub fn prepare_start(containers: &Containers, id: &str) -> Result<bool, LifecycleError> {
    let _lock = containers.lock(id)?;
    let st = containers.state_locked(id)?;
    if matches!(st.status, Status::Running | Status::Restarting) {
        return Ok(false);
    }
    containers.update_state_locked(id, |s| {
        *s = ContainerState {
            started_at: s.started_at.clone(),
            finished_at: s.finished_at.clone(),
            exit_code: s.exit_code,
            status: s.status,
            ..ContainerState::default()
        };
        if s.status == Status::Dead {
            s.status = Status::Exited;
        }
    })?;
    Ok(true)
}

/// A supervisor process spawned by [`start_detached`].
#[derive(Debug)]
pub struct Spawned {
    reader: BufReader<std::process::ChildStdout>,
    id: String,
}

impl Spawned {
    /// With `wait_attach`: waits until the supervisor listens on its attach socket.
    pub fn wait_listening(&mut self) -> Result<(), LifecycleError> {
        match self.read_line()? {
            Some(l) if l == "listening" => Ok(()),
            Some(l) => Self::to_result(&self.id, &l),
            None => Err(LifecycleError::SupervisorGone { id: self.id.clone() }),
        }
    }

    /// Waits until the container runs (or failed to start).
    pub fn wait_running(mut self) -> Result<(), LifecycleError> {
        match self.read_line()? {
            Some(l) => Self::to_result(&self.id, &l),
            None => Err(LifecycleError::SupervisorGone { id: self.id.clone() }),
        }
    }

    fn read_line(&mut self) -> Result<Option<String>, LifecycleError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => Ok(None),
            Ok(_) => Ok(Some(line.trim_end().to_string())),
        }
    }

    fn to_result(id: &str, line: &str) -> Result<(), LifecycleError> {
        if line == "ok" {
            return Ok(());
        }
        let rest = line.strip_prefix("err ").unwrap_or(line);
        let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
        Err(LifecycleError::StartFailed {
            id: id.to_string(),
            code: code.parse().unwrap_or(supervisor::EXIT_RUNNER),
            message: message.to_string(),
        })
    }
}

/// Starts the container's supervisor with `supervisor` (the command running
/// [`supervisor::supervise`] for this container in [`supervisor::Mode::Detached`], with its
/// standard output as the readiness pipe). The caller waits on the result.
pub fn start_detached(id: &str, mut supervisor: Command) -> Result<Spawned, LifecycleError> {
    let mut child = supervisor
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| LifecycleError::Spawn {
            id: id.to_string(),
            source,
        })?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| LifecycleError::SupervisorGone { id: id.to_string() })?;
    // The supervisor outlives this process (it starts a session of its own); it is reaped by
    // whoever inherits it.
    drop(child);
    Ok(Spawned {
        reader: BufReader::new(stdout),
        id: id.to_string(),
    })
}

/// Parses a signal as Docker accepts it: `SIGTERM`, `TERM`, `term`, `15`.
pub fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, LifecycleError> {
    use std::str::FromStr as _;
    let bad = || LifecycleError::InvalidSignal(s.to_string());
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n).map_err(|_| bad());
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    nix::sys::signal::Signal::from_str(&name).map_err(|_| bad())
}

fn signal(id: &str, pid: i32, sig: nix::sys::signal::Signal) -> Result<(), LifecycleError> {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(source) => Err(LifecycleError::Kill {
            id: id.to_string(),
            pid,
            signal: sig.as_str().to_string(),
            source,
        }),
    }
}

/// Marks the container as stopped by the user and returns its pid if it runs.
fn request_stop(containers: &Containers, id: &str) -> Result<Option<i32>, LifecycleError> {
    let _lock = containers.lock(id)?;
    let st = containers.state_locked(id)?;
    if !matches!(st.status, Status::Running | Status::Restarting) {
        return Ok(None);
    }
    containers.update_state_locked(id, |s| s.stop_requested = true)?;
    Ok((st.pid > 0 && st.status == Status::Running).then_some(st.pid))
}

/// Waits until the container is no longer running or restarting; false on timeout.
pub fn wait_stopped(
    containers: &Containers,
    id: &str,
    timeout: Option<Duration>,
) -> Result<bool, LifecycleError> {
    let start = Instant::now();
    loop {
        let st = match containers.state(id) {
            Ok(s) => s,
            Err(RecordError::NoSuchContainer(_)) => return Ok(true),
            Err(e) => return Err(e.into()),
        };
        if !matches!(st.status, Status::Running | Status::Restarting) {
            return Ok(true);
        }
        if timeout.is_some_and(|t| start.elapsed() >= t) {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `kiln stop`: the stop signal, then SIGKILL after `timeout` seconds (the container's
/// `--stop-timeout`, else 10, when `None`). The restart policy does not restart it.
pub fn stop(
    containers: &Containers,
    rec: &ContainerRecord,
    timeout: Option<u64>,
) -> Result<(), LifecycleError> {
    let Some(pid) = request_stop(containers, &rec.id)? else {
        // Stopped during a restart delay: the supervisor notices the request.
        return wait_stopped(containers, &rec.id, Some(Duration::from_secs(5))).map(|_| ());
    };
    let sig = parse_signal(rec.stop_signal())?;
    signal(&rec.id, pid, sig)?;
    let timeout = Duration::from_secs(timeout.unwrap_or_else(|| rec.stop_timeout()));
    if !wait_stopped(containers, &rec.id, Some(timeout))? {
        signal(&rec.id, pid, nix::sys::signal::Signal::SIGKILL)?;
        wait_stopped(containers, &rec.id, None)?;
    }
    Ok(())
}

/// `kiln kill -s SIG`.
pub fn kill(containers: &Containers, rec: &ContainerRecord, sig: &str) -> Result<(), LifecycleError> {
    let sig = parse_signal(sig)?;
    let Some(pid) = request_stop(containers, &rec.id)? else {
        return Err(LifecycleError::NotRunning(rec.id.clone()));
    };
    signal(&rec.id, pid, sig)?;
    // As Docker's: after SIGKILL returns the container is no longer running (`ps` never shows
    // it `Up`).
    if sig == nix::sys::signal::Signal::SIGKILL {
        wait_stopped(containers, &rec.id, Some(Duration::from_secs(10)))?;
    }
    Ok(())
}

/// `kiln rm [-f] [-v]`: a running container needs `force` (then it is killed first); `volumes`
/// also drops its anonymous volumes no other container uses.
pub fn remove(
    containers: &Containers,
    rec: &ContainerRecord,
    force: bool,
    volumes: bool,
) -> Result<(), LifecycleError> {
    let st = containers.state(&rec.id)?;
    match st.status {
        Status::Running | Status::Restarting if !force => {
            return Err(LifecycleError::RemoveRunning {
                name: rec.name.clone(),
            })
        }
        Status::Running | Status::Restarting => {
            if let Some(pid) = request_stop(containers, &rec.id)? {
                signal(&rec.id, pid, nix::sys::signal::Signal::SIGKILL)?;
            }
            wait_stopped(containers, &rec.id, None)?;
        }
        Status::Dead if st.pid > 0 => {
            signal(&rec.id, st.pid, nix::sys::signal::Signal::SIGKILL)?;
        }
        _ => {}
    }
    // Let the supervisor finish (remove its socket, maybe the container itself for `--rm`).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match containers.state(&rec.id) {
            Err(RecordError::NoSuchContainer(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(s) if state::supervisor_alive(&s) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(_) => break,
        }
    }
    let _lock = match containers.lock(&rec.id) {
        Ok(l) => l,
        Err(RecordError::NoSuchContainer(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    // An endpoint left by a supervisor that died without tearing it down.
    if let Some(ep) = state::read(&containers.dir(&rec.id))
        .ok()
        .and_then(|s| s.network)
        .and_then(|v| serde_json::from_value::<kiln_runtime::net::Endpoint>(v).ok())
    {
        if let Err(e) = kiln_runtime::net::teardown(&ep) {
            tracing::warn!("{}", supervisor::error_chain(&e));
        }
    }
    if volumes {
        supervisor::release_volumes(containers, &rec.id);
    }
    containers.remove_dir(&rec.id)?;
    Ok(())
}

/// `kiln wait`: blocks until the container stops and returns its exit code.
pub fn wait_exit(containers: &Containers, rec: &ContainerRecord) -> Result<i32, LifecycleError> {
    let mut last = 0;
    loop {
        let st = match containers.state(&rec.id) {
            Ok(s) => s,
            // Removed (`--rm`) after it exited.
            Err(RecordError::NoSuchContainer(_)) => return Ok(last),
            Err(e) => return Err(e.into()),
        };
        last = st.exit_code;
        if matches!(st.status, Status::Exited | Status::Dead) {
            return Ok(st.exit_code);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a container to its end in this process (a foreground `kiln run`).
pub fn run_foreground(
    containers: &Containers,
    id: &str,
    mode: supervisor::Mode,
) -> Result<Outcome, supervisor::SupervisorError> {
    supervisor::supervise(containers, id, mode)
}

/// One process of a container, for `kiln top`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Effective uid.
    pub uid: u32,
    /// Host pid.
    pub pid: i32,
    /// Parent's host pid.
    pub ppid: i32,
    /// Start time in clock ticks after boot.
    pub start_ticks: u64,
    /// user + system time in clock ticks.
    pub cpu_ticks: u64,
    /// Controlling terminal device number (0: none).
    pub tty: u64,
    /// The command line (`[comm]` when empty).
    pub cmd: String,
}

/// The processes in the container's pid namespace, by pid.
pub fn top(containers: &Containers, rec: &ContainerRecord) -> Result<Vec<ProcessInfo>, LifecycleError> {
    let st = containers.state(&rec.id)?;
    if st.status != Status::Running || st.pid <= 0 {
        return Err(LifecycleError::NotRunning(rec.id.clone()));
    }
    let ns_of = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let target = ns_of(&st.pid.to_string()).ok_or_else(|| LifecycleError::NotRunning(rec.id.clone()))?;
    let entries = std::fs::read_dir("/proc").map_err(|source| LifecycleError::Proc {
        path: "/proc".into(),
        source,
    })?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        if ns_of(pid).as_ref() != Some(&target) {
            continue;
        }
        if let Some(p) = process_info(pid) {
            out.push(p);
        }
    }
    out.sort_by_key(|p| p.pid);
    Ok(out)
}

fn process_info(pid: &str) -> Option<ProcessInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let f: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // f[0] is field 3 (state).
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or(0);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmd = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    Some(ProcessInfo {
        uid,
        pid: pid.parse().ok()?,
        ppid: field(4)? as i32,
        start_ticks: field(22)?,
        cpu_ticks: field(14)? + field(15)?,
        tty: field(7)?,
        cmd: if cmd.is_empty() { format!("[{comm}]") } else { cmd },
    })
}

/// `kiln container prune`: removes every stopped container, returning their IDs.
pub fn prune(containers: &Containers) -> Result<Vec<String>, LifecycleError> {
    let mut removed = Vec::new();
    for rec in containers.list()? {
        let st = containers.state(&rec.id)?;
        if matches!(st.status, Status::Running | Status::Restarting) || state::supervisor_alive(&st) {
            continue;
        }
        let _lock = containers.lock(&rec.id)?;
        containers.remove_dir(&rec.id)?;
        removed.push(rec.id);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(entry: Option<&[&str]>, cmd: Option<&[&str]>) -> ContainerConfig {
        ContainerConfig {
            entrypoint: entry.map(|e| e.iter().map(|s| s.to_string()).collect()),
            cmd: cmd.map(|e| e.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn docker_command_rules() {
        let c = cfg(Some(&["/bin/echo", "e"]), Some(&["c"]));
        assert_eq!(command_line(&c, None, &[]), ["/bin/echo", "e", "c"]);
        assert_eq!(command_line(&c, None, &["x".into()]), ["/bin/echo", "e", "x"]);
        assert_eq!(command_line(&c, Some("/bin/true"), &[]), ["/bin/true"]);
        assert_eq!(command_line(&c, Some(""), &["ls".into()]), ["ls"]);
        let shell_entry = cfg(Some(&["/bin/sh", "-c", "echo hi"]), None);
        assert_eq!(
            command_line(&shell_entry, None, &["ignored".into()]),
            ["/bin/sh", "-c", "echo hi", "ignored"]
        );
    }

    #[test]
    fn env_defaults_path_and_overrides() {
        let env = container_env(&["A=1".into(), "PATH=/x".into()], &["A=2".into()]);
        assert_eq!(env, ["PATH=/x", "A=2"]);
        let env = container_env(&[], &["B=1".into()]);
        assert_eq!(env, [format!("PATH={DEFAULT_PATH}"), "B=1".into()]);
    }

    #[test]
    fn signals_parse_like_docker() {
        use nix::sys::signal::Signal;
        assert_eq!(parse_signal("SIGTERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("kill").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("10").unwrap(), Signal::SIGUSR1);
        assert!(parse_signal("SIGNOPE").is_err());
    }
}
