//! `kiln run` and `kiln create`: Docker's flags turned into a container record, then (for `run`)
//! the container started, detached under a supervisor of its own (`-d`) or in the foreground
//! with this process as its supervisor.

use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use kiln_containers::lifecycle::{self, CreateRequest, LifecycleError};
use kiln_containers::supervisor::{self, Mode, Outcome, SignalProxy, EXIT_RUNNER};
use kiln_containers::{Containers, HostConfig, RestartPolicy};

use crate::Globals;

/// The flags `kiln create` and `kiln run` share (Docker's spelling).
#[derive(Args, Debug, Clone)]
pub struct CreateFlags {
    /// Set platform if server is multi-platform capable (os/arch[/variant]): the image of a
    /// multi-platform image for it; foreign ones run under QEMU emulation
    #[arg(long)]
    pub platform: Option<String>,
    /// Keep STDIN open even if not attached
    #[arg(short = 'i', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub interactive: bool,
    /// Allocate a pseudo-TTY
    #[arg(short = 't', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub tty: bool,
    /// Automatically remove the container and its associated anonymous volumes when it exits
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub rm: bool,
    /// Assign a name to the container
    #[arg(long)]
    pub name: Option<String>,
    /// Set environment variables (KEY=VALUE, or KEY to take it from the environment)
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// Read in a file of environment variables
    #[arg(long = "env-file")]
    pub env_file: Vec<PathBuf>,
    /// Set meta data on a container
    #[arg(short = 'l', long = "label")]
    pub label: Vec<String>,
    /// Read in a line delimited file of labels
    #[arg(long = "label-file")]
    pub label_file: Vec<PathBuf>,
    /// Working directory inside the container
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    /// Username or UID (format: <name|uid>[:<group|gid>])
    #[arg(short = 'u', long = "user")]
    pub user: Option<String>,
    /// Overwrite the default ENTRYPOINT of the image
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Container host name
    #[arg(short = 'h', long)]
    pub hostname: Option<String>,
    /// Connect a container to a network (bridge, host, none)
    #[arg(long, alias = "net", default_value = "default")]
    pub network: String,
    /// Restart policy to apply when a container exits (no, always, unless-stopped, on-failure[:N])
    #[arg(long, default_value = "no")]
    pub restart: String,
    /// Signal to stop the container
    #[arg(long = "stop-signal")]
    pub stop_signal: Option<String>,
    /// Timeout (in seconds) to stop a container
    #[arg(long = "stop-timeout")]
    pub stop_timeout: Option<u64>,
    /// Add Linux capabilities
    #[arg(long = "cap-add")]
    pub cap_add: Vec<String>,
    /// Drop Linux capabilities
    #[arg(long = "cap-drop")]
    pub cap_drop: Vec<String>,
    /// Give extended privileges to this container
    #[arg(long)]
    pub privileged: bool,
    /// Security options: no-new-privileges[=true|false], seccomp=unconfined|PROFILE.json
    #[arg(long = "security-opt")]
    pub security_opt: Vec<String>,
    /// Run an init inside the container that forwards signals and reaps processes
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub init: bool,
    /// Memory limit (e.g. 512m, 1g)
    #[arg(short = 'm', long)]
    pub memory: Option<String>,
    /// Number of CPUs
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Tune container pids limit (set -1 for unlimited)
    #[arg(long = "pids-limit")]
    pub pids_limit: Option<i64>,
    /// Mount the container's root filesystem as read only
    #[arg(long = "read-only", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub read_only: bool,
    /// Bind mount a volume
    #[arg(short = 'v', long = "volume")]
    pub volume: Vec<String>,
    /// Attach a filesystem mount to the container
    #[arg(long)]
    pub mount: Vec<String>,
    /// Mount a tmpfs directory
    #[arg(long)]
    pub tmpfs: Vec<String>,
    /// Mount volumes from the specified container(s)
    #[arg(long = "volumes-from")]
    pub volumes_from: Vec<String>,
    /// Publish a container's port(s) to the host
    #[arg(short = 'p', long = "publish")]
    pub publish: Vec<String>,
    /// Command to run to check health
    #[arg(long = "health-cmd")]
    pub health_cmd: Option<String>,
    /// Time between running the check (ms|s|m|h)
    #[arg(long = "health-interval")]
    pub health_interval: Option<String>,
    /// Maximum time to allow one check to run (ms|s|m|h)
    #[arg(long = "health-timeout")]
    pub health_timeout: Option<String>,
    /// Start period for the container to initialize before starting health-retries countdown (ms|s|m|h)
    #[arg(long = "health-start-period")]
    pub health_start_period: Option<String>,
    /// Consecutive failures needed to report unhealthy
    #[arg(long = "health-retries")]
    pub health_retries: Option<i64>,
    /// Disable any container-specified HEALTHCHECK
    #[arg(long = "no-healthcheck", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub no_healthcheck: bool,
    /// Expose a port or a range of ports
    #[arg(long)]
    pub expose: Vec<String>,
    /// Publish all exposed ports to random ports
    #[arg(short = 'P', long = "publish-all", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub publish_all: bool,
    /// Add link to another container
    #[arg(long)]
    pub link: Vec<String>,
    /// Add a custom host-to-IP mapping (host:ip)
    #[arg(long = "add-host")]
    pub add_host: Vec<String>,
    /// Pull image before running ("always", "missing", "never")
    #[arg(long, value_enum, default_value_t = PullPolicy::Missing)]
    pub pull: PullPolicy,
    /// The image to run
    pub image: String,
    /// Command and arguments
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// `--pull` of `run` and `create`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Always pull before running.
    Always,
    /// Pull when the image is not in the store.
    Missing,
    /// Never pull.
    Never,
}

/// `kiln run`.
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct RunArgs {
    /// Print help (`-h` is --hostname, as in Docker)
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
    /// Run container in background and print container ID
    #[arg(short = 'd', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub detach: bool,
    /// Override the key sequence for detaching a container
    #[arg(long = "detach-keys")]
    pub detach_keys: Option<String>,
    /// Proxy received signals to the process
    #[arg(long = "sig-proxy", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub sig_proxy: bool,
    #[command(flatten)]
    pub flags: CreateFlags,
}

/// `kiln create`.
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct CreateArgs {
    /// Print help (`-h` is --hostname, as in Docker)
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
    #[command(flatten)]
    pub flags: CreateFlags,
}

/// Docker's `RAMInBytes`: a number with an optional b/k/m/g/t/p suffix (binary units).
pub fn parse_memory(s: &str) -> anyhow::Result<u64> {
    Ok(kiln_dag::units::ram_in_bytes(s)?)
}

/// A Go duration (`1s`, `500ms`, `1m30s`) in nanoseconds, for the `--health-*` flags.
fn go_duration_nanos(flag: &str, s: &str) -> anyhow::Result<i64> {
    let d = kiln_dag::units::go_duration(s)
        .map_err(|e| anyhow::anyhow!("invalid argument {s:?} for \"{flag}\" flag: {e}"))?;
    i64::try_from(d.as_nanos())
        .map_err(|_| anyhow::anyhow!("invalid argument {s:?} for \"{flag}\" flag: duration out of range"))
}

/// `--env-file`: `KEY=VALUE` or `KEY` lines; `#` comments and blank lines are skipped.
fn read_env_file(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("open {}: no such file or directory", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.trim_start())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect())
}

/// The request `kiln create`/`kiln run` make of the flags.
pub fn create_request(f: &CreateFlags) -> anyhow::Result<CreateRequest> {
    let mut env = Vec::new();
    for file in &f.env_file {
        env.extend(read_env_file(file)?);
    }
    env.extend(f.env.iter().cloned());
    let mut labels = Vec::new();
    for file in &f.label_file {
        labels.extend(read_env_file(file)?);
    }
    labels.extend(f.label.iter().cloned());
    let mounts = kiln_containers::mounts::parse_flags(&f.volume, &f.mount, &f.tmpfs, &f.volumes_from)?
        .iter()
        .map(kiln_containers::mounts::MountRequest::to_value)
        .collect();
    let host = HostConfig {
        auto_remove: f.rm,
        restart_policy: RestartPolicy::parse(&f.restart)?,
        network_mode: f.network.clone(),
        port_bindings: f.publish.clone(),
        publish_all_ports: f.publish_all,
        mounts,
        cap_add: f.cap_add.iter().map(|c| cap_name(c)).collect(),
        cap_drop: f.cap_drop.iter().map(|c| cap_name(c)).collect(),
        privileged: f.privileged,
        security_opt: security_opts(&f.security_opt)?,
        init: f.init,
        memory: f.memory.as_deref().map(parse_memory).transpose()?,
        cpus: f.cpus,
        pids_limit: f.pids_limit,
        read_only_rootfs: f.read_only,
        stop_signal: f.stop_signal.clone().unwrap_or_default(),
        stop_timeout: f.stop_timeout,
        tty: f.tty,
        open_stdin: f.interactive,
        links: f.link.clone(),
        hostname: String::new(),
        extra_hosts: f.add_host.clone(),
    };
    if let Some(s) = &f.stop_signal {
        lifecycle::parse_signal(s)?;
    }
    Ok(CreateRequest {
        name: f.name.clone(),
        image: f.image.clone(),
        entrypoint: f.entrypoint.clone(),
        cmd: f.args.clone(),
        env,
        workdir: f.workdir.clone(),
        user: f.user.clone(),
        hostname: f.hostname.clone(),
        labels,
        expose: f.expose.clone(),
        health: lifecycle::HealthOverride {
            cmd: f.health_cmd.clone(),
            interval: f
                .health_interval
                .as_deref()
                .map(|d| go_duration_nanos("--health-interval", d))
                .transpose()?,
            timeout: f
                .health_timeout
                .as_deref()
                .map(|d| go_duration_nanos("--health-timeout", d))
                .transpose()?,
            start_period: f
                .health_start_period
                .as_deref()
                .map(|d| go_duration_nanos("--health-start-period", d))
                .transpose()?,
            retries: f.health_retries,
            disable: f.no_healthcheck,
        },
        platform: f
            .platform
            .as_deref()
            .map(kiln_dag::Platform::parse)
            .transpose()
            .context("invalid --platform")?,
        host,
    })
}

/// `--security-opt` values as the record keeps them: a seccomp profile file is read and kept as
/// its JSON text (the Docker client sends the daemon the same), and every value is checked now,
/// so that a bad one fails `create` and not the start.
fn security_opts(values: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for v in values {
        let file = v
            .strip_prefix("seccomp=")
            .or_else(|| v.strip_prefix("seccomp:"))
            .filter(|f| *f != "unconfined" && !f.trim_start().starts_with('{'));
        match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("opening seccomp profile ({path}) failed"))?;
                kiln_runtime::seccomp::Profile::parse(&text, path)?;
                out.push(format!("seccomp={text}"));
            }
            None => out.push(v.clone()),
        }
    }
    kiln_runtime::seccomp::parse_security_opts(&out)?;
    Ok(out)
}

fn cap_name(c: &str) -> String {
    let up = c.to_ascii_uppercase();
    up.strip_prefix("CAP_").map(str::to_string).unwrap_or(up)
}

/// `-it` with a standard input that is not a terminal: Docker's refusal (exit 1).
pub fn refuse_non_tty_input(interactive_tty: bool) -> Option<ExitCode> {
    use std::io::IsTerminal as _;
    if interactive_tty && !std::io::stdin().is_terminal() {
        eprintln!("the input device is not a TTY");
        return Some(ExitCode::from(1));
    }
    None
}

/// Prints a failure of `run`/`create` as Docker does and returns its exit code.
fn fail(e: &anyhow::Error) -> ExitCode {
    let code = match e.downcast_ref::<LifecycleError>() {
        Some(LifecycleError::StartFailed { code, .. }) => *code,
        _ => EXIT_RUNNER,
    };
    eprintln!("kiln: Error: {e:#}");
    ExitCode::from(code)
}

/// `kiln create`.
pub fn create(args: CreateArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    match create_inner(&args.flags, g) {
        Ok(rec) => {
            println!("{}", rec.id);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(fail(&e)),
    }
}

fn create_inner(f: &CreateFlags, g: &Globals) -> anyhow::Result<kiln_containers::ContainerRecord> {
    let req = create_request(f)?;
    let store = kiln_cache::Store::open(&g.root)?;
    // Garbage collection waits until the container's record names its image; the hold ends
    // before the container starts (its processes must not inherit it).
    let _hold = store.hold()?;
    let containers = Containers::open(&g.root)?;
    if f.pull == PullPolicy::Always {
        pull_image(&store, &f.image, req.platform.as_ref())?;
    }
    match lifecycle::create(&containers, &store, req.clone()) {
        // `--pull missing`: Docker's notice, the pull, then the create again.
        Err(LifecycleError::UnknownImage(..)) if f.pull == PullPolicy::Missing => {
            eprintln!("Unable to find image '{}' locally", f.image);
            pull_image(&store, &f.image, req.platform.as_ref())?;
            Ok(lifecycle::create(&containers, &store, req)?)
        }
        other => Ok(other?),
    }
}

/// Pulls `image` for `run`/`create`, with `kiln pull`'s progress lines on standard error.
fn pull_image(
    store: &kiln_cache::Store,
    image: &str,
    platform: Option<&kiln_dag::Platform>,
) -> anyhow::Result<()> {
    use kiln_source::registry;
    let r = kiln_cache::reference::Reference::parse(image)
        .with_context(|| format!("invalid reference format `{image}`"))?;
    let what = match (r.digest(), r.tag()) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.to_string(),
        (None, None) => "latest".into(),
    };
    eprintln!("{what}: Pulling from {}", r.path());
    let client = super::registry::client(&[]);
    let opts = registry::PullOptions {
        platform: platform.cloned().unwrap_or_else(kiln_dag::Platform::host),
        jobs: 4,
        tap: None,
    };
    let pulled = registry::pull(&client, store, &r, &opts, &StderrProgress)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("failed to pull {}", r.familiar()))?;
    eprintln!("Digest: {}", pulled.digest);
    if pulled.up_to_date {
        eprintln!("Status: Image is up to date for {}", r.familiar());
    } else {
        eprintln!("Status: Downloaded newer image for {}", r.familiar());
    }
    Ok(())
}

/// `kiln pull`'s per-layer lines, on standard error (standard output is the container's).
struct StderrProgress;

impl kiln_source::registry::TransferProgress for StderrProgress {
    fn event(&self, event: kiln_source::registry::TransferEvent) {
        use kiln_source::registry::TransferEvent;
        let (digest, what) = match &event {
            TransferEvent::Exists { digest } => (digest, "Already exists".to_string()),
            TransferEvent::Retrying { digest, error } => (digest, format!("Retrying ({error})")),
            TransferEvent::Done { digest } => (digest, "Pull complete".to_string()),
            _ => return,
        };
        eprintln!("{}: {what}", &digest.hex()[..12]);
    }
}

/// `kiln run`.
pub fn run(args: RunArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    if let Some(code) = refuse_non_tty_input(args.flags.interactive && args.flags.tty && !args.detach) {
        return Ok(code);
    }
    // A foreground run forwards the signals it gets to the container: they are blocked before
    // any thread starts, so that only the proxy's thread receives them.
    let signals = if args.detach {
        None
    } else {
        match SignalProxy::block() {
            Ok(p) => Some(p),
            Err(e) => return Ok(fail(&e.into())),
        }
    };
    match run_inner(args, signals, g) {
        Ok(code) => Ok(code),
        Err(e) => Ok(fail(&e)),
    }
}

/// `run` in the foreground through a detached supervisor (see [`run_inner`]).
fn run_attached(
    containers: &Containers,
    rec: &kiln_containers::ContainerRecord,
    args: &RunArgs,
    signals: Option<SignalProxy>,
    detach_keys: Vec<u8>,
    g: &Globals,
) -> anyhow::Result<ExitCode> {
    let mut spawned =
        lifecycle::start_detached(&rec.id, crate::supervise::supervisor_command(g, &rec.id, true)?)?;
    spawned.wait_listening()?;
    let (_dir, path) = supervisor::socket_path(&containers.dir(&rec.id))?;
    let conn = std::os::unix::net::UnixStream::connect(&path)
        .with_context(|| format!("failed to attach to container {}", rec.id))?;
    spawned.wait_running()?;
    let signals = signals.filter(|_| args.sig_proxy);
    if let Some(p) = signals.as_ref() {
        p.forward_to(containers.state(&rec.id)?.pid);
    }
    let end = crate::attach::attach(
        conn,
        crate::attach::Options {
            stdin: args.flags.interactive,
            tty: args.flags.tty,
            detach_keys,
            signals,
        },
    )?;
    Ok(match end {
        crate::attach::End::Exited(code) => ExitCode::from((code & 0xff) as u8),
        crate::attach::End::Detached => ExitCode::SUCCESS,
    })
}

fn run_inner(args: RunArgs, signals: Option<SignalProxy>, g: &Globals) -> anyhow::Result<ExitCode> {
    let detach_keys = crate::attach::parse_detach_keys(
        args.detach_keys
            .as_deref()
            .unwrap_or(crate::attach::DEFAULT_DETACH_KEYS),
    )?;
    let rec = create_inner(&args.flags, g)?;
    let containers = Containers::open(&g.root)?;
    if args.detach {
        let spawned =
            lifecycle::start_detached(&rec.id, crate::supervise::supervisor_command(g, &rec.id, false)?)?;
        spawned.wait_running()?;
        println!("{}", rec.id);
        return Ok(ExitCode::SUCCESS);
    }
    // `-it` can detach and `--sig-proxy=false` leaves the container running when this process
    // is interrupted: both need a supervisor of its own that outlives this process, which then
    // attaches to it as `kiln attach` does (Docker's client and daemon).
    if (args.flags.interactive && args.flags.tty) || !args.sig_proxy {
        return run_attached(&containers, &rec, &args, signals, detach_keys, g);
    }
    let dup = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .context("failed to duplicate a standard stream")
    };
    let mode = Mode::Foreground {
        stdin: if args.flags.interactive {
            Some(dup(std::io::stdin().as_fd())?)
        } else {
            None
        },
        stdout: dup(std::io::stdout().as_fd())?,
        stderr: dup(std::io::stderr().as_fd())?,
        signals,
    };
    match supervisor::supervise(&containers, &rec.id, mode)? {
        Outcome::Exited(code) => Ok(ExitCode::from((code & 0xff) as u8)),
        Outcome::StartFailed { code, message } => {
            if rec.host.auto_remove {
                supervisor::release_volumes(&containers, &rec.id);
                let _ = containers.remove_dir(&rec.id);
            }
            Err(LifecycleError::StartFailed {
                id: rec.id.clone(),
                code,
                message,
            }
            .into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_like_docker() {
        assert_eq!(parse_memory("512m").unwrap(), 512 << 20);
        assert_eq!(parse_memory("1g").unwrap(), 1 << 30);
        assert_eq!(parse_memory("1GB").unwrap(), 1 << 30);
        assert_eq!(parse_memory("4096").unwrap(), 4096);
        assert_eq!(parse_memory("1.5k").unwrap(), 1536);
        assert!(parse_memory("lots").is_err());
    }
}
