//! Container lifecycle commands: `start`, `stop`, `kill`, `restart`, `rm`, `ps`, `logs`,
//! `attach`, `wait`, `top`, `inspect` (containers), `container prune`, `version`, `info`, and the
//! hidden `container-supervise` that a detached container runs under.

use std::io::{self, BufRead as _, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use kiln_containers::lifecycle::{self, LifecycleError};
use kiln_containers::logs::{self, Stream};
use kiln_containers::supervisor::{self, Mode, SignalProxy};
use kiln_containers::{ContainerRecord, ContainerState, Containers, RecordError, Status};

use crate::gotemplate::Value;
use crate::store_cmds::human_ago;
use crate::supervise::supervisor_command;
use crate::Globals;

/// Container subcommands (flattened into the top level, as in Docker).
#[derive(Subcommand, Debug)]
pub enum ContainerCmd {
    /// Create a new container
    Create(Box<crate::run_cmd::CreateArgs>),
    /// Start one or more stopped containers
    Start(StartArgs),
    /// Stop one or more running containers
    Stop(StopArgs),
    /// Kill one or more running containers
    Kill(KillArgs),
    /// Restart one or more containers
    Restart(StopArgs),
    /// Remove one or more containers
    Rm(RmArgs),
    /// List containers
    Ps(PsArgs),
    /// Fetch the logs of a container
    Logs(LogsArgs),
    /// Attach local standard input, output, and error streams to a running container
    Attach(AttachArgs),
    /// Block until one or more containers stop, then print their exit codes
    Wait(NamesArgs),
    /// Display the running processes of a container
    Top(TopArgs),
    /// Execute a command in a running container
    Exec(ExecArgs),
    /// List port mappings or a specific mapping for the container
    Port(PortArgs),
    /// Rename a container
    Rename(RenameArgs),
    /// Manage containers
    #[command(subcommand)]
    Container(ContainerGroup),
    /// Show the kiln version information
    Version,
    /// Display system-wide information
    Info,
    /// Run a container under this process as its supervisor (started by `run -d` and `start`)
    #[command(name = "container-supervise", hide = true)]
    Supervise(SuperviseArgs),
}

/// `kiln container ...`: Docker's management group, the same commands as the top level.
#[derive(Subcommand, Debug)]
pub enum ContainerGroup {
    /// Attach local standard input, output, and error streams to a running container
    Attach(AttachArgs),
    /// Create a new image from a container's changes
    Commit(crate::container_fs_cmds::CommitArgs),
    /// Copy files/folders between a container and the local filesystem
    Cp(crate::container_fs_cmds::CpArgs),
    /// Create a new container
    Create(Box<crate::run_cmd::CreateArgs>),
    /// Inspect changes to files or directories on a container's filesystem
    Diff(crate::container_fs_cmds::DiffArgs),
    /// Execute a command in a running container
    Exec(ExecArgs),
    /// Export a container's filesystem as a tar archive
    Export(crate::container_fs_cmds::ExportArgs),
    /// Display detailed information on one or more containers
    Inspect(crate::store_cmds::InspectArgs),
    /// Kill one or more running containers
    Kill(KillArgs),
    /// Fetch the logs of a container
    Logs(LogsArgs),
    /// List containers
    #[command(visible_alias = "ps", alias = "list")]
    Ls(PsArgs),
    /// List port mappings or a specific mapping for the container
    Port(PortArgs),
    /// Remove all stopped containers
    Prune(PruneArgs),
    /// Rename a container
    Rename(RenameArgs),
    /// Restart one or more containers
    Restart(StopArgs),
    /// Remove one or more containers
    #[command(alias = "remove")]
    Rm(RmArgs),
    /// Run a command in a new container
    Run(Box<crate::run_cmd::RunArgs>),
    /// Start one or more stopped containers
    Start(StartArgs),
    /// Stop one or more running containers
    Stop(StopArgs),
    /// Display the running processes of a container
    Top(TopArgs),
    /// Block until one or more containers stop, then print their exit codes
    Wait(NamesArgs),
}

/// `kiln rename`.
#[derive(Args, Debug)]
pub struct RenameArgs {
    /// Container
    pub container: String,
    /// New name
    pub new_name: String,
}

/// Container names or IDs.
#[derive(Args, Debug)]
pub struct NamesArgs {
    /// Containers
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `kiln start`.
#[derive(Args, Debug)]
pub struct StartArgs {
    /// Attach STDOUT/STDERR and forward signals
    #[arg(short = 'a', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub attach: bool,
    /// Attach container's STDIN
    #[arg(short = 'i', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub interactive: bool,
    /// Override the key sequence for detaching a container
    #[arg(long = "detach-keys")]
    pub detach_keys: Option<String>,
    /// Containers
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `kiln stop` / `kiln restart`.
#[derive(Args, Debug)]
pub struct StopArgs {
    /// Seconds to wait before killing the container
    #[arg(short = 't', long = "time")]
    pub time: Option<u64>,
    /// Signal to send to the container
    #[arg(short = 's', long)]
    pub signal: Option<String>,
    /// Containers
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `kiln kill`.
#[derive(Args, Debug)]
pub struct KillArgs {
    /// Signal to send to the container
    #[arg(short = 's', long, default_value = "KILL")]
    pub signal: String,
    /// Containers
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `kiln rm`.
#[derive(Args, Debug)]
pub struct RmArgs {
    /// Force the removal of a running container (uses SIGKILL)
    #[arg(short = 'f', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub force: bool,
    /// Remove anonymous volumes associated with the container
    #[arg(short = 'v', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub volumes: bool,
    /// Containers
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `kiln ps`.
#[derive(Args, Debug)]
pub struct PsArgs {
    /// Show all containers (default shows just running)
    #[arg(short = 'a', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub all: bool,
    /// Only display container IDs
    #[arg(short = 'q', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub quiet: bool,
    /// Show the latest created container (includes all states)
    #[arg(short = 'l', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub latest: bool,
    /// Show n last created containers (includes all states)
    #[arg(short = 'n', long = "last")]
    pub last: Option<usize>,
    /// Don't truncate output
    #[arg(long = "no-trunc", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub no_trunc: bool,
    /// Display total file sizes
    #[arg(short = 's', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub size: bool,
    /// Filter output based on conditions provided (`key=value`)
    #[arg(short = 'f', long)]
    pub filter: Vec<String>,
    /// Format output using a custom template: 'table', 'table TEMPLATE', 'json', or a Go template
    #[arg(long)]
    pub format: Option<String>,
}

/// `kiln logs`.
#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Follow log output
    #[arg(short = 'f', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub follow: bool,
    /// Show timestamps
    #[arg(short = 't', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub timestamps: bool,
    /// Number of lines to show from the end of the logs ("all" for every line)
    #[arg(short = 'n', long, default_value = "all")]
    pub tail: String,
    /// Container
    pub container: String,
}

/// `kiln attach`.
#[derive(Args, Debug)]
pub struct AttachArgs {
    /// Do not attach STDIN
    #[arg(long = "no-stdin", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub no_stdin: bool,
    /// Override the key sequence for detaching a container
    #[arg(long = "detach-keys")]
    pub detach_keys: Option<String>,
    /// Proxy all received signals to the process
    #[arg(long = "sig-proxy", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub sig_proxy: bool,
    /// Container
    pub container: String,
}

/// `kiln top`.
#[derive(Args, Debug)]
pub struct TopArgs {
    /// Container
    pub container: String,
    /// Options for the host's `ps` (e.g. `aux`, `-o pid,comm`); default: kiln's `-ef` columns
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

/// `kiln exec`.
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Detached mode: run command in the background
    #[arg(short = 'd', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub detach: bool,
    /// Keep STDIN open even if not attached
    #[arg(short = 'i', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub interactive: bool,
    /// Allocate a pseudo-TTY
    #[arg(short = 't', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub tty: bool,
    /// Set environment variables
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// Working directory inside the container
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    /// Username or UID (format: "<name|uid>[:<group|gid>]")
    #[arg(short = 'u', long = "user")]
    pub user: Option<String>,
    /// Give extended privileges to the command
    #[arg(long)]
    pub privileged: bool,
    /// Container
    pub container: String,
    /// Command and arguments
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

/// `kiln port`.
#[derive(Args, Debug)]
pub struct PortArgs {
    /// Container
    pub container: String,
    /// A private port, `PORT[/PROTO]`
    pub private_port: Option<String>,
}

/// `kiln container prune`.
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Do not prompt for confirmation
    #[arg(short = 'f', long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub force: bool,
}

/// `kiln container-supervise`.
#[derive(Args, Debug)]
pub struct SuperviseArgs {
    /// Wait for an attach client before starting the process
    #[arg(long = "wait-attach")]
    pub wait_attach: bool,
    /// The container ID
    pub id: String,
}

impl ContainerCmd {
    /// Whether the command mounts filesystems and needs a private mount namespace (entered
    /// while the process is single-threaded).
    pub fn needs_private_mounts(&self) -> bool {
        matches!(
            self,
            ContainerCmd::Supervise(_)
                | ContainerCmd::Info
                | ContainerCmd::Container(
                    ContainerGroup::Run(_) | ContainerGroup::Cp(_) | ContainerGroup::Export(_)
                )
        )
    }
}

/// Runs a container command.
pub fn run(cmd: ContainerCmd, g: &Globals) -> anyhow::Result<ExitCode> {
    use crate::container_fs_cmds::{self as fs_cmds, FsCmd};
    // `container X` is `X`.
    let cmd = match cmd {
        ContainerCmd::Container(group) => match group {
            ContainerGroup::Attach(a) => ContainerCmd::Attach(a),
            ContainerGroup::Commit(a) => return fs_cmds::run(FsCmd::Commit(a), g),
            ContainerGroup::Cp(a) => return fs_cmds::run(FsCmd::Cp(a), g),
            ContainerGroup::Create(a) => ContainerCmd::Create(a),
            ContainerGroup::Diff(a) => return fs_cmds::run(FsCmd::Diff(a), g),
            ContainerGroup::Exec(a) => ContainerCmd::Exec(a),
            ContainerGroup::Export(a) => return fs_cmds::run(FsCmd::Export(a), g),
            ContainerGroup::Inspect(a) => {
                let store = kiln_cache::Store::open(&g.root)?;
                return inspect_objects(a, Some("container"), &store);
            }
            ContainerGroup::Kill(a) => ContainerCmd::Kill(a),
            ContainerGroup::Logs(a) => ContainerCmd::Logs(a),
            ContainerGroup::Ls(a) => ContainerCmd::Ps(a),
            ContainerGroup::Port(a) => ContainerCmd::Port(a),
            ContainerGroup::Prune(a) => ContainerCmd::Container(ContainerGroup::Prune(a)),
            ContainerGroup::Rename(a) => ContainerCmd::Rename(a),
            ContainerGroup::Restart(a) => ContainerCmd::Restart(a),
            ContainerGroup::Rm(a) => ContainerCmd::Rm(a),
            ContainerGroup::Run(a) => return crate::run_cmd::run(*a, g),
            ContainerGroup::Start(a) => ContainerCmd::Start(a),
            ContainerGroup::Stop(a) => ContainerCmd::Stop(a),
            ContainerGroup::Top(a) => ContainerCmd::Top(a),
            ContainerGroup::Wait(a) => ContainerCmd::Wait(a),
        },
        other => other,
    };
    if let ContainerCmd::Create(a) = cmd {
        return crate::run_cmd::create(*a, g);
    }
    let containers = Containers::open(&g.root)?;
    let result = match cmd {
        ContainerCmd::Create(_) => Ok(ExitCode::SUCCESS),
        ContainerCmd::Start(a) => cmd_start(&containers, g, a),
        ContainerCmd::Stop(a) => each(&containers, &a.containers, |rec| {
            lifecycle::stop(&containers, &with_signal(rec, a.signal.as_deref()), a.time)
        }),
        ContainerCmd::Restart(a) => each(&containers, &a.containers, |rec| {
            lifecycle::stop(&containers, &with_signal(rec, a.signal.as_deref()), a.time)?;
            start_one(&containers, g, rec)
        }),
        ContainerCmd::Kill(a) => each(&containers, &a.containers, |rec| {
            lifecycle::kill(&containers, rec, &a.signal)
        }),
        ContainerCmd::Rm(a) => each(&containers, &a.containers, |rec| {
            lifecycle::remove(&containers, rec, a.force, a.volumes)
        }),
        ContainerCmd::Ps(a) => cmd_ps(&containers, a),
        ContainerCmd::Logs(a) => cmd_logs(&containers, a),
        ContainerCmd::Attach(a) => cmd_attach(&containers, a),
        ContainerCmd::Wait(a) => cmd_wait(&containers, a),
        ContainerCmd::Top(a) => cmd_top(&containers, a),
        ContainerCmd::Exec(a) => cmd_exec(&containers, a),
        ContainerCmd::Port(a) => cmd_port(&containers, a),
        ContainerCmd::Container(ContainerGroup::Prune(a)) => cmd_prune(&containers, a),
        ContainerCmd::Container(_) => unreachable_group(),
        ContainerCmd::Rename(a) => {
            let rec = containers.lookup(&a.container)?;
            containers.rename(&rec.id, &a.new_name)?;
            Ok(ExitCode::SUCCESS)
        }
        ContainerCmd::Version => cmd_version(),
        ContainerCmd::Info => cmd_info(&containers, g),
        ContainerCmd::Supervise(a) => cmd_supervise(&containers, a),
    };
    match result {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("Error: {e:#}");
            Ok(ExitCode::from(1))
        }
    }
}

/// The group's other commands were mapped to top-level ones before dispatch.
fn unreachable_group() -> anyhow::Result<ExitCode> {
    anyhow::bail!("internal error: an unmapped `container` subcommand")
}

fn with_signal(rec: &ContainerRecord, signal: Option<&str>) -> ContainerRecord {
    let mut r = rec.clone();
    if let Some(s) = signal {
        r.host.stop_signal = s.to_string();
    }
    r
}

/// Applies `f` to each named container, printing the name as given on success like Docker; the
/// failures are printed and make the exit code 1.
fn each(
    containers: &Containers,
    names: &[String],
    mut f: impl FnMut(&ContainerRecord) -> Result<(), LifecycleError>,
) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for name in names {
        let result = containers
            .lookup(name)
            .map_err(LifecycleError::from)
            .and_then(|rec| f(&rec));
        match result {
            Ok(()) => println!("{name}"),
            Err(e) => {
                eprintln!("Error: {}", supervisor::error_chain(&e));
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn start_one(containers: &Containers, g: &Globals, rec: &ContainerRecord) -> Result<(), LifecycleError> {
    if !lifecycle::prepare_start(containers, &rec.id)? {
        return Ok(());
    }
    let cmd = supervisor_command(g, &rec.id, false).map_err(|e| LifecycleError::Spawn {
        id: rec.id.clone(),
        source: io::Error::other(format!("{e:#}")),
    })?;
    lifecycle::start_detached(&rec.id, cmd)?.wait_running()
}

fn cmd_start(containers: &Containers, g: &Globals, a: StartArgs) -> anyhow::Result<ExitCode> {
    if !a.attach && !a.interactive {
        return each(containers, &a.containers, |rec| start_one(containers, g, rec));
    }
    if a.containers.len() > 1 {
        anyhow::bail!("you cannot start and attach multiple containers at once");
    }
    let keys = crate::attach::parse_detach_keys(
        a.detach_keys
            .as_deref()
            .unwrap_or(crate::attach::DEFAULT_DETACH_KEYS),
    )?;
    // `start -a` proxies signals, as Docker's does; blocked before any thread starts.
    let signals = SignalProxy::block()?;
    let rec = containers.lookup(&a.containers[0])?;
    if !lifecycle::prepare_start(containers, &rec.id)? {
        let end = attach_stream(containers, &rec, a.interactive, keys, Some(signals))?;
        return Ok(end_code(end, false));
    }
    let mut spawned = lifecycle::start_detached(&rec.id, supervisor_command(g, &rec.id, true)?)?;
    spawned.wait_listening()?;
    let (_dir, path) = supervisor::socket_path(&containers.dir(&rec.id))?;
    let conn =
        UnixStream::connect(&path).with_context(|| format!("failed to attach to container {}", rec.id))?;
    if let Err(e) = spawned.wait_running() {
        let code = match &e {
            LifecycleError::StartFailed { code, .. } => *code,
            _ => supervisor::EXIT_RUNNER,
        };
        eprintln!("Error: {e}");
        return Ok(ExitCode::from(code));
    }
    signals.forward_to(containers.state(&rec.id)?.pid);
    let end = crate::attach::attach(
        conn,
        crate::attach::Options {
            stdin: a.interactive && rec.host.open_stdin,
            tty: rec.host.tty,
            detach_keys: keys,
            signals: Some(signals),
        },
    )?;
    Ok(end_code(end, false))
}

/// The exit code of an attached session: the container's, or on detaching 0 (`run`, `start`) or
/// 1 with Docker's message (`attach`).
fn end_code(end: crate::attach::End, attach_cmd: bool) -> ExitCode {
    match end {
        crate::attach::End::Exited(code) => ExitCode::from((code & 0xff) as u8),
        crate::attach::End::Detached if attach_cmd => {
            eprintln!("read escape sequence");
            ExitCode::from(1)
        }
        crate::attach::End::Detached => ExitCode::SUCCESS,
    }
}

/// Attaches to a running container's socket and streams until it stops or the user detaches.
fn attach_stream(
    containers: &Containers,
    rec: &ContainerRecord,
    stdin: bool,
    detach_keys: Vec<u8>,
    signals: Option<SignalProxy>,
) -> anyhow::Result<crate::attach::End> {
    let st = containers.state(&rec.id)?;
    if !matches!(st.status, Status::Running | Status::Restarting) {
        anyhow::bail!("You cannot attach to a stopped container, start it first");
    }
    let (_dir, path) = supervisor::socket_path(&containers.dir(&rec.id))?;
    let conn =
        UnixStream::connect(&path).with_context(|| format!("failed to attach to container {}", rec.id))?;
    if let Some(p) = signals.as_ref() {
        p.forward_to(st.pid);
    }
    crate::attach::attach(
        conn,
        crate::attach::Options {
            stdin: stdin && rec.host.open_stdin,
            tty: rec.host.tty,
            detach_keys,
            signals,
        },
    )
}

fn cmd_attach(containers: &Containers, a: AttachArgs) -> anyhow::Result<ExitCode> {
    let keys = crate::attach::parse_detach_keys(
        a.detach_keys
            .as_deref()
            .unwrap_or(crate::attach::DEFAULT_DETACH_KEYS),
    )?;
    let rec = containers.lookup(&a.container)?;
    // Docker proxies signals to a container without a tty (with one, keys reach it through it).
    let signals = if a.sig_proxy && !rec.host.tty {
        Some(SignalProxy::block()?)
    } else {
        None
    };
    let end = attach_stream(containers, &rec, !a.no_stdin, keys, signals)?;
    Ok(end_code(end, true))
}

fn cmd_wait(containers: &Containers, a: NamesArgs) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for name in &a.containers {
        match containers
            .lookup(name)
            .map_err(LifecycleError::from)
            .and_then(|rec| lifecycle::wait_exit(containers, &rec))
        {
            Ok(code) => println!("{code}"),
            Err(e) => {
                eprintln!("Error: {}", supervisor::error_chain(&e));
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Docker's `HumanDuration` (as in "Up 3 seconds").
fn human_duration(since: &str) -> String {
    let ago = human_ago(Some(since));
    ago.strip_suffix(" ago").unwrap_or(&ago).to_string()
}

/// The STATUS column of `ps`.
pub fn status_text(st: &ContainerState) -> String {
    match st.status {
        Status::Created => "Created".into(),
        Status::Running => {
            let health = match st.health.as_ref().map(|h| h.status) {
                None => String::new(),
                Some(kiln_containers::state::HealthStatus::Starting) => " (health: starting)".into(),
                Some(h) => format!(" ({})", h.as_str()),
            };
            format!("Up {}{health}", human_duration(&st.started_at))
        }
        Status::Restarting => format!(
            "Restarting ({}) {}",
            st.exit_code,
            human_ago(Some(&st.finished_at))
        ),
        Status::Exited => format!("Exited ({}) {}", st.exit_code, human_ago(Some(&st.finished_at))),
        Status::Dead => "Dead".into(),
    }
}

/// The COMMAND column: the argv joined, cut to 20 characters with `…`, quoted.
fn command_text(rec: &ContainerRecord, no_trunc: bool) -> String {
    let cmd = rec.args.join(" ");
    let cmd = if !no_trunc && cmd.chars().count() > 20 {
        let mut s: String = cmd.chars().take(19).collect();
        s.push('…');
        s
    } else {
        cmd
    };
    format!("\"{}\"", cmd.replace('"', "\\\""))
}

/// The PORTS column: the live bindings of a running container.
fn ports_text(st: &ContainerState) -> String {
    if st.status != Status::Running {
        return String::new();
    }
    kiln_runtime::net::format_ports(&st.ports)
}

/// `kiln port CONTAINER [PRIVATE_PORT[/PROTO]]`: Docker's `80/tcp -> 0.0.0.0:8080` lines, or
/// only the host addresses of one private port.
fn cmd_port(containers: &Containers, a: PortArgs) -> anyhow::Result<ExitCode> {
    let rec = containers.lookup(&a.container)?;
    let st = containers.state(&rec.id)?;
    if st.status != Status::Running {
        anyhow::bail!("container {} is not running", rec.id);
    }
    let mut ports = st.ports.clone();
    ports.sort_by_key(|p| (p.container_port, p.protocol, p.host_port));
    match &a.private_port {
        None => {
            for p in &ports {
                println!("{}/{} -> {}", p.container_port, p.protocol, host_addr(p));
            }
        }
        Some(want) => {
            let (port, proto) = want.split_once('/').unwrap_or((want, "tcp"));
            let port: u16 = port
                .parse()
                .with_context(|| format!("Error: invalid port ({want})"))?;
            let found: Vec<_> = ports
                .iter()
                .filter(|p| p.container_port == port && p.protocol.to_string() == proto)
                .collect();
            if found.is_empty() {
                anyhow::bail!("No public port '{port}/{proto}' published for {}", a.container);
            }
            for p in found {
                println!("{}", host_addr(p));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `ip:port` of a published port (`[ip]:port` for IPv6).
fn host_addr(p: &kiln_runtime::net::PublishedPort) -> String {
    std::net::SocketAddr::new(p.host_ip, p.host_port).to_string()
}

/// Docker's `HostConfig.PortBindings` of the recorded `-p` specs: `"80/tcp": [{"HostIp": "",
/// "HostPort": "8080"}]`, one entry per container port of a range.
fn port_bindings_json(rec: &ContainerRecord) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for spec in &rec.host.port_bindings {
        let Ok(p) = kiln_runtime::net::PortSpec::parse(spec) else {
            continue;
        };
        let (cs, ce) = (p.container_ports.start, p.container_ports.end);
        for (i, port) in (cs..=ce).enumerate() {
            let host_port = match p.host_ports {
                None => String::new(),
                Some(h) if cs == ce && h.start != h.end => format!("{}-{}", h.start, h.end),
                Some(h) => (h.start as usize + i).to_string(),
            };
            let entry = serde_json::json!({
                "HostIp": p.host_ip.map(|i| i.to_string()).unwrap_or_default(),
                "HostPort": host_port,
            });
            let key = format!("{port}/{}", p.protocol);
            match map.get_mut(&key).and_then(|v| v.as_array_mut()) {
                Some(list) => list.push(entry),
                None => {
                    map.insert(key, serde_json::Value::Array(vec![entry]));
                }
            }
        }
    }
    serde_json::Value::Object(map)
}

/// Docker's `NetworkSettings.Ports`: `"80/tcp": [{"HostIp": .., "HostPort": ".."}]`, with
/// the exposed but unpublished ports as `null`.
fn ports_json(rec: &ContainerRecord, st: &ContainerState) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for exposed in rec.config.exposed_ports.iter().flat_map(|m| m.keys()) {
        let key = if exposed.contains('/') {
            exposed.clone()
        } else {
            format!("{exposed}/tcp")
        };
        map.insert(key, serde_json::Value::Null);
    }
    for p in &st.ports {
        let key = format!("{}/{}", p.container_port, p.protocol);
        let entry =
            serde_json::json!({ "HostIp": p.host_ip.to_string(), "HostPort": p.host_port.to_string() });
        match map.get_mut(&key).and_then(|v| v.as_array_mut()) {
            Some(list) => list.push(entry),
            None => {
                map.insert(key, serde_json::Value::Array(vec![entry]));
            }
        }
    }
    serde_json::Value::Object(map)
}

/// The keys `ps --filter` takes.
const PS_FILTERS: &[&str] = &[
    "id", "name", "label", "label!", "exited", "status", "ancestor", "before", "since", "health", "volume",
    "network",
];

/// Docker's `ps` column names.
const PS_HEADERS: &[(&str, &str)] = &[
    ("ID", "CONTAINER ID"),
    ("Image", "IMAGE"),
    ("Command", "COMMAND"),
    ("CreatedAt", "CREATED AT"),
    ("RunningFor", "CREATED"),
    ("Ports", "PORTS"),
    ("State", "STATE"),
    ("Status", "STATUS"),
    ("Size", "SIZE"),
    ("Names", "NAMES"),
    ("Labels", "LABELS"),
    ("Label", "LABEL"),
    ("Mounts", "MOUNTS"),
    ("Networks", "NETWORKS"),
    ("LocalVolumes", "LOCAL VOLUMES"),
];

/// Docker's `CreatedAt` form: `2006-01-02 15:04:05 -0700 MST` (UTC here).
pub fn docker_time(rfc3339: &str) -> String {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| {
            t.to_offset(time::UtcOffset::UTC)
                .format(time::macros::format_description!(
                    "[year]-[month]-[day] [hour]:[minute]:[second] +0000 UTC"
                ))
                .ok()
        })
        .unwrap_or_default()
}

/// The name of the network a container is on (`bridge`, `host`, `none`).
fn network_name(rec: &ContainerRecord) -> String {
    match rec.host.network_mode.as_str() {
        "" | "default" => "bridge".into(),
        m => m.to_string(),
    }
}

/// Whether `rec` descends from the image `want` names (a reference or an image ID prefix).
fn ancestor_matches(rec: &ContainerRecord, want: &str) -> bool {
    let norm = |s: &str| {
        kiln_cache::reference::Reference::parse(s)
            .map(|r| r.to_string())
            .unwrap_or_else(|_| s.to_string())
    };
    if norm(&rec.image_name) == norm(want) {
        return true;
    }
    let hex = want.strip_prefix("sha256:").unwrap_or(want);
    hex.len() >= 4
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && (rec.image_id.is_some_and(|d| d.hex().starts_with(hex)) || rec.image.hex().starts_with(hex))
}

/// Whether a container passes `ps`'s filters.
fn ps_filter(
    f: &crate::filters::Filters,
    rec: &ContainerRecord,
    st: &ContainerState,
    before: Option<&str>,
    since: Option<&str>,
    mounts: &[serde_json::Value],
) -> bool {
    let labels = rec.config.labels.clone().unwrap_or_default();
    f.any("id", |v| rec.id.starts_with(v))
        && f.any("name", |v| {
            regex::Regex::new(v).is_ok_and(|r| r.is_match(&rec.name))
        })
        && f.labels_match(&labels)
        && f.any("exited", |v| {
            st.status == Status::Exited && v.parse::<i32>().is_ok_and(|c| c == st.exit_code)
        })
        && f.any("status", |v| v == st.status.as_str())
        && f.any("ancestor", |v| ancestor_matches(rec, v))
        && before.is_none_or(|b| rec.created.as_str() < b)
        && since.is_none_or(|s| rec.created.as_str() > s)
        && f.any("health", |v| v == health_word(st))
        && f.any("network", |v| v == network_name(rec))
        && f.any("volume", |v| {
            mounts.iter().any(|m| {
                m["Name"].as_str() == Some(v)
                    || m["Source"].as_str() == Some(v)
                    || m["Destination"].as_str() == Some(v)
            })
        })
}

/// `health=` filter word of a container: `starting`, `healthy`, `unhealthy` or `none`.
fn health_word(st: &ContainerState) -> &'static str {
    match &st.health {
        Some(h) => h.status.as_str(),
        None => "none",
    }
}

fn cmd_ps(containers: &Containers, a: PsArgs) -> anyhow::Result<ExitCode> {
    let f = crate::filters::Filters::parse(&a.filter, PS_FILTERS)?;
    f.check_values(
        "status",
        &[
            "created",
            "restarting",
            "running",
            "removing",
            "paused",
            "exited",
            "dead",
        ],
    )?;
    f.check_values("health", &["starting", "healthy", "unhealthy", "none"])?;
    for v in f.get("exited") {
        if v.parse::<i32>().is_err() {
            anyhow::bail!("invalid filter 'exited={v}'");
        }
    }
    let created_of = |name: &str| -> anyhow::Result<String> {
        containers
            .lookup(name)
            .map(|r| r.created)
            .map_err(|_| anyhow::anyhow!("No such container: {name}"))
    };
    let before = f.get("before").first().map(|b| created_of(b)).transpose()?;
    let since = f.get("since").first().map(|s| created_of(s)).transpose()?;
    let limit = if a.latest { Some(1) } else { a.last };
    let all = a.all || limit.is_some() || f.has("status");
    let want_size = a.size
        || a.format
            .as_deref()
            .is_some_and(|f| f.contains("Size") || f.contains("json"));
    let mut rows = Vec::new();
    for rec in containers.list()?.into_iter().take(limit.unwrap_or(usize::MAX)) {
        let st = match containers.state(&rec.id) {
            Ok(s) => s,
            Err(RecordError::NoSuchContainer(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        if !all && !matches!(st.status, Status::Running | Status::Restarting) {
            continue;
        }
        let mounts: Vec<serde_json::Value> = kiln_containers::mounts::load(containers.root(), &rec.id)
            .map(|ms| ms.iter().map(|m| m.inspect_json()).collect())
            .unwrap_or_default();
        if !ps_filter(&f, &rec, &st, before.as_deref(), since.as_deref(), &mounts) {
            continue;
        }
        let id = if a.no_trunc {
            rec.id.clone()
        } else {
            rec.short_id().to_string()
        };
        let labels = rec.config.labels.clone().unwrap_or_default();
        let size = if want_size {
            let upper = dir_size(&rec.rootfs.upper);
            let virt: u64 = upper + rec.rootfs.lower.iter().map(|l| dir_size(l)).sum::<u64>();
            format!(
                "{} (virtual {})",
                crate::store_cmds::human_size(upper),
                crate::store_cmds::human_size(virt)
            )
        } else {
            "0B".to_string()
        };
        let mount_names: Vec<String> = mounts
            .iter()
            .filter_map(|m| m["Name"].as_str().or(m["Source"].as_str()).map(str::to_string))
            .collect();
        let local_volumes = mounts.iter().filter(|m| m["Type"] == "volume").count();
        let mut row = vec![
            ("ID", Value::Str(id)),
            ("Image", Value::Str(rec.image_name.clone())),
            ("Command", Value::Str(command_text(&rec, a.no_trunc))),
            ("CreatedAt", Value::Str(docker_time(&rec.created))),
            ("RunningFor", Value::Str(human_ago(Some(&rec.created)))),
            ("Ports", Value::Str(ports_text(&st))),
            ("State", Value::Str(st.status.as_str().to_string())),
            ("Status", Value::Str(status_text(&st))),
            ("Size", Value::Str(size)),
            ("Names", Value::Str(rec.name.clone())),
            ("Labels", Value::Str(crate::format::labels_text(&labels))),
            ("Mounts", Value::Str(mount_names.join(","))),
            ("Networks", Value::Str(network_name(&rec))),
            ("LocalVolumes", Value::Str(local_volumes.to_string())),
        ];
        row.push(("Label", crate::format::label_method(labels)));
        rows.push(Value::context("*formatter.ContainerContext", row));
    }
    let mut default_table =
        "table {{.ID}}\t{{.Image}}\t{{.Command}}\t{{.RunningFor}}\t{{.Status}}\t{{.Ports}}\t{{.Names}}"
            .to_string();
    if a.size {
        default_table.push_str("\t{{.Size}}");
    }
    let format = if a.quiet {
        "{{.ID}}"
    } else {
        a.format.as_deref().unwrap_or("")
    };
    crate::format::Listing {
        format,
        default_table: &default_table,
        headers: PS_HEADERS,
    }
    .print(&rows)
}

fn cmd_logs(containers: &Containers, a: LogsArgs) -> anyhow::Result<ExitCode> {
    let rec = containers.lookup(&a.container)?;
    let tail = match a.tail.as_str() {
        "all" | "-1" => None,
        n => Some(
            n.parse::<usize>()
                .with_context(|| format!("invalid tail value: {n}"))?,
        ),
    };
    let path = logs::log_path(&containers.dir(&rec.id), &rec.id);
    let done = || {
        containers
            .state(&rec.id)
            .map(|s| !matches!(s.status, Status::Running | Status::Restarting))
            .unwrap_or(true)
    };
    logs::stream(&path, tail, a.follow, done, |e| {
        let text = if a.timestamps {
            format!("{} {}", e.time, e.log)
        } else {
            e.log.clone()
        };
        match e.stream {
            Stream::Stdout => {
                let mut o = io::stdout().lock();
                o.write_all(text.as_bytes())?;
                o.flush()
            }
            Stream::Stderr => io::stderr().lock().write_all(text.as_bytes()),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.get(2) == Some(&uid.to_string().as_str())).then(|| f[0].to_string())
        })
        .unwrap_or_else(|| uid.to_string())
}

fn cmd_top(containers: &Containers, a: TopArgs) -> anyhow::Result<ExitCode> {
    let rec = containers.lookup(&a.container)?;
    let procs = lifecycle::top(containers, &rec)?;
    if !a.ps_args.is_empty() {
        return top_with_ps(&a.ps_args, &procs);
    }
    const HZ: u64 = 100;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<i64>().ok())
        })
        .unwrap_or(0);
    let mut rows = vec![["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
        .map(String::from)
        .to_vec()];
    for p in procs {
        let start = boot + (p.start_ticks / HZ) as i64;
        let stime = time::OffsetDateTime::from_unix_timestamp(start)
            .map(|t| format!("{:02}:{:02}", t.hour(), t.minute()))
            .unwrap_or_default();
        let cpu = p.cpu_ticks / HZ;
        let tty = if p.tty == 0 {
            "?".to_string()
        } else {
            let minor = (p.tty & 0xff) | ((p.tty >> 12) & 0xfff00);
            format!("pts/{minor}")
        };
        rows.push(vec![
            user_name(p.uid),
            p.pid.to_string(),
            p.ppid.to_string(),
            "0".into(),
            stime,
            tty,
            format!("{:02}:{:02}:{:02}", cpu / 3600, cpu / 60 % 60, cpu % 60),
            p.cmd,
        ]);
    }
    print_top(&rows);
    Ok(ExitCode::SUCCESS)
}

/// Prints `top`'s rows as Docker's CLI does (tabwriter with minimum width 20).
fn print_top(rows: &[Vec<String>]) {
    let text: String = rows.iter().map(|r| r.join("\t") + "\n").collect();
    print!("{}", crate::format::tabwrite_min(&text, 20));
}

/// `top CONTAINER PS_ARGS...`, as Docker's daemon does it: the host's `ps` with those options,
/// its `PID` column found in the header, only the container's processes kept.
fn top_with_ps(ps_args: &[String], procs: &[lifecycle::ProcessInfo]) -> anyhow::Result<ExitCode> {
    let out = Command::new("ps")
        .args(ps_args)
        .output()
        .context("failed to run `ps` (procps) for `top`")?;
    if !out.status.success() {
        anyhow::bail!(
            "ps: {}",
            String::from_utf8_lossy(&out.stderr).trim().replace('\n', " ")
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let titles: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    let Some(pid_col) = titles.iter().position(|t| *t == "PID") else {
        anyhow::bail!("Couldn't find PID field in ps output");
    };
    let pids: std::collections::BTreeSet<i32> = procs.iter().map(|p| p.pid).collect();
    let mut rows = vec![titles.iter().map(|t| t.to_string()).collect::<Vec<_>>()];
    for l in lines {
        let fields: Vec<&str> = l.split_whitespace().collect();
        if fields.len() < titles.len() {
            continue;
        }
        if !fields[pid_col].parse::<i32>().is_ok_and(|p| pids.contains(&p)) {
            continue;
        }
        let mut row: Vec<String> = fields[..titles.len() - 1].iter().map(|f| f.to_string()).collect();
        row.push(fields[titles.len() - 1..].join(" "));
        rows.push(row);
    }
    print_top(&rows);
    Ok(ExitCode::SUCCESS)
}

fn cmd_exec(containers: &Containers, a: ExecArgs) -> anyhow::Result<ExitCode> {
    use kiln_runtime::tty;
    if let Some(code) = crate::run_cmd::refuse_non_tty_input(a.interactive && a.tty && !a.detach) {
        return Ok(code);
    }
    let rec = containers.lookup(&a.container)?;
    let st = containers.state(&rec.id)?;
    if st.status != Status::Running || st.pid <= 0 {
        anyhow::bail!("container {} is not running", rec.id);
    }
    let dup = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .context("failed to duplicate a standard stream")
    };
    let null = || -> anyhow::Result<std::os::fd::OwnedFd> {
        Ok(std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?
            .into())
    };
    let env = lifecycle::container_env(rec.config.env.as_deref().unwrap_or_default(), &a.env);
    // With -t the process gets a pty slave and this process copies between it and the terminal.
    let mut master = None;
    let (stdin, stdout, stderr) = if a.tty {
        let (m, slave) = tty::open_pty()?;
        if let Ok((rows, cols)) = tty::get_winsize(io::stdout()) {
            let _ = tty::set_winsize(&m, rows, cols);
        }
        if !a.detach {
            supervisor::forward_winch(m.try_clone()?)?;
        }
        master = Some(m);
        (Some(slave.try_clone()?), slave.try_clone()?, slave)
    } else if a.detach {
        (None, null()?, null()?)
    } else {
        let stdin = if a.interactive {
            Some(dup(io::stdin().as_fd())?)
        } else {
            None
        };
        (stdin, dup(io::stdout().as_fd())?, dup(io::stderr().as_fd())?)
    };
    let spec = kiln_runtime::exec::ExecSpec {
        pid: st.pid,
        args: a.command.clone(),
        env,
        cwd: a
            .workdir
            .clone()
            .unwrap_or_else(|| rec.config.working_dir.clone()),
        user: a.user.clone().unwrap_or_else(|| rec.config.user.clone()),
        privileged: a.privileged || rec.host.privileged,
        seccomp: kiln_runtime::seccomp::parse_security_opts(&rec.host.security_opt)?.seccomp,
        controlling_tty: a.tty,
        stdin,
        stdout,
        stderr,
    };
    let running = match kiln_runtime::exec::exec(spec) {
        Ok(r) => r,
        Err(e) => {
            let code = supervisor::start_failure_code(&e);
            match supervisor::docker_exec_message(&e) {
                Some(m) => eprintln!("{m}"),
                None => eprintln!("Error: {}", supervisor::error_chain(&e)),
            }
            return Ok(ExitCode::from(code));
        }
    };
    if a.detach {
        // The process lives on in the container (its pid 1 adopts it when this process exits).
        std::mem::forget(running);
        return Ok(ExitCode::SUCCESS);
    }
    let mut _raw = None;
    let mut copied = None;
    if let Some(m) = master {
        if a.interactive {
            if tty::is_tty(io::stdin()) {
                _raw = tty::RawMode::enable(io::stdin()).ok();
            }
            let mut w = std::fs::File::from(m.try_clone()?);
            std::thread::spawn(move || {
                let _ = io::copy(&mut io::stdin().lock(), &mut w);
            });
        }
        let mut r = std::fs::File::from(m);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        copied = Some(rx);
        std::thread::spawn(move || {
            let _done = tx;
            let mut out = io::stdout();
            let mut buf = [0u8; 8192];
            // EIO once the last slave descriptor closes.
            while let Ok(n) = std::io::Read::read(&mut r, &mut buf) {
                if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        });
    }
    let status = running.wait()?;
    if let Some(rx) = copied {
        // The copy ends when the terminal's last slave descriptor is gone.
        let _ = rx.recv_timeout(std::time::Duration::from_secs(2));
    }
    drop(_raw);
    let code = match (status.code, status.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 255,
    };
    Ok(ExitCode::from((code & 0xff) as u8))
}

fn dir_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|es| es.flatten().map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}

fn cmd_prune(containers: &Containers, a: PruneArgs) -> anyhow::Result<ExitCode> {
    if !a.force {
        eprint!(
            "WARNING! This will remove all stopped containers.\nAre you sure you want to continue? [y/N] "
        );
        let mut answer = String::new();
        io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let sizes: Vec<(String, u64)> = containers
        .list()?
        .iter()
        .map(|r| (r.id.clone(), dir_size(&r.rootfs.upper)))
        .collect();
    let removed = lifecycle::prune(containers)?;
    if !removed.is_empty() {
        println!("Deleted Containers:");
        for id in &removed {
            println!("{id}");
        }
        println!();
    }
    let total: u64 = sizes
        .iter()
        .filter(|(id, _)| removed.contains(id))
        .map(|(_, s)| s)
        .sum();
    println!("Total reclaimed space: {}", crate::store_cmds::human_size(total));
    Ok(ExitCode::SUCCESS)
}

/// Docker-like `inspect` JSON of one container.
pub fn inspect_json(containers: &Containers, rec: &ContainerRecord) -> anyhow::Result<serde_json::Value> {
    let st = containers.state(&rec.id)?;
    let hostname = if rec.host.hostname.is_empty() {
        rec.short_id().to_string()
    } else {
        rec.host.hostname.clone()
    };
    let mut config = serde_json::to_value(&rec.config)?;
    if let Some(obj) = config.as_object_mut() {
        obj.insert("Hostname".into(), hostname.into());
        obj.insert("Image".into(), rec.image_name.clone().into());
        obj.insert("Tty".into(), rec.host.tty.into());
        obj.insert("OpenStdin".into(), rec.host.open_stdin.into());
        obj.insert("AttachStdout".into(), true.into());
        obj.insert("AttachStderr".into(), true.into());
    }
    let dir = containers.dir(&rec.id);
    let mounts: Vec<serde_json::Value> = kiln_containers::mounts::load(containers.root(), &rec.id)?
        .iter()
        .map(|m| m.inspect_json())
        .collect();
    let endpoint = st
        .network
        .clone()
        .and_then(|v| serde_json::from_value::<kiln_runtime::net::Endpoint>(v).ok());
    let (ip, prefix, gateway, mac) = match &endpoint {
        Some(ep) => (
            ep.ip.to_string(),
            ep.prefix_len,
            ep.gateway.to_string(),
            ep.mac.clone(),
        ),
        None => (String::new(), 0, String::new(), String::new()),
    };
    let mut networks = serde_json::Map::new();
    let mode = rec.host.network_mode.as_str();
    let net_name = if matches!(mode, "" | "default") {
        "bridge"
    } else {
        mode
    };
    networks.insert(
        net_name.to_string(),
        serde_json::json!({
            "IPAddress": ip,
            "IPPrefixLen": prefix,
            "Gateway": gateway,
            "MacAddress": mac,
            "Links": if rec.host.links.is_empty() { serde_json::Value::Null } else { serde_json::json!(rec.host.links) },
        }),
    );
    let network_settings = serde_json::json!({
        "Ports": ports_json(rec, &st),
        "IPAddress": ip,
        "IPPrefixLen": prefix,
        "Gateway": gateway,
        "MacAddress": mac,
        "SandboxKey": endpoint.as_ref().map(|e| e.netns.display().to_string()).unwrap_or_default(),
        "Networks": networks,
    });
    let health = st.health.as_ref().map(serde_json::to_value).transpose()?;
    let mut host_config = serde_json::to_value(&rec.host)?;
    if let Some(h) = host_config.as_object_mut() {
        h.insert("PortBindings".into(), port_bindings_json(rec));
    }
    let mut v = serde_json::json!({
        "Id": rec.id,
        "Created": rec.created,
        "Path": rec.path(),
        "Args": rec.args.get(1..).unwrap_or_default(),
        "State": {
            "Status": st.status.as_str(),
            "Running": st.status == Status::Running,
            "Paused": false,
            "Restarting": st.status == Status::Restarting,
            "OOMKilled": st.oom_killed,
            "Dead": st.status == Status::Dead,
            "Pid": st.pid,
            "ExitCode": st.exit_code,
            "Error": st.error,
            "StartedAt": if st.started_at.is_empty() { "0001-01-01T00:00:00Z" } else { &st.started_at },
            "FinishedAt": if st.finished_at.is_empty() { "0001-01-01T00:00:00Z" } else { &st.finished_at },
        },
        "Image": rec.image_id.unwrap_or(rec.image).to_string(),
        "ResolvConfPath": "",
        "HostnamePath": "",
        "HostsPath": "",
        "LogPath": logs::log_path(&dir, &rec.id),
        "Name": format!("/{}", rec.name),
        "RestartCount": st.restart_count,
        "Driver": "overlay",
        "Platform": "linux",
        "HostConfig": host_config,
        "GraphDriver": {
            "Name": "overlay",
            "Data": {
                "LowerDir": rec.rootfs.lower.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":"),
                "UpperDir": rec.rootfs.upper,
                "WorkDir": rec.rootfs.work,
            },
        },
        "Mounts": mounts,
        "Config": config,
        "NetworkSettings": network_settings,
    });
    if let (Some(h), Some(state)) = (health, v.get_mut("State").and_then(|s| s.as_object_mut())) {
        state.insert("Health".into(), h);
    }
    Ok(v)
}

/// The data `inspect -f` templates see for a container: its inspect JSON, with the nil
/// pointers Docker's Go types have where the JSON omits a field (`State.Health`).
fn container_template_data(mut v: serde_json::Value) -> Value {
    if let Some(state) = v.get_mut("State").and_then(|s| s.as_object_mut()) {
        state.entry("Health").or_insert(serde_json::Value::Null);
    }
    Value::from_json(&v, &crate::format::is_go_map)
}

/// `kiln inspect [-f FORMAT] [--type container|image] NAME...` (and `container inspect`, `image
/// inspect` with `kind`): each name as a container, else as an image, in the order given.
pub fn inspect_objects(
    a: crate::store_cmds::InspectArgs,
    kind: Option<&str>,
    store: &kiln_cache::Store,
) -> anyhow::Result<ExitCode> {
    let kind = kind.or(a.kind.as_deref());
    if let Some(k) = kind {
        if !matches!(k, "container" | "image") {
            eprintln!("\"{k}\" is not a valid value for --type");
            return Ok(ExitCode::from(1));
        }
    }
    let containers = Containers::open(store.root())?;
    let images = store.images();
    let mut found: Vec<(serde_json::Value, bool)> = Vec::new();
    let mut errors = Vec::new();
    for n in &a.images {
        if kind != Some("image") {
            match containers.lookup(n) {
                Ok(rec) => {
                    found.push((inspect_json(&containers, &rec)?, true));
                    continue;
                }
                Err(RecordError::NoSuchContainer(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if kind != Some("container") {
            match images
                .resolve(n)
                .and_then(|img| crate::store_cmds::inspect_json(store, &images, &img))
            {
                Ok(v) => {
                    found.push((v, false));
                    continue;
                }
                Err(kiln_cache::images::ImageError::NotFound(_)) => {}
                Err(e) => {
                    errors.push(format!("Error: {e}"));
                    continue;
                }
            }
        }
        errors.push(match kind {
            Some("container") => format!("Error: No such container: {n}"),
            Some(_) => format!("Error: No such image: {n}"),
            None => format!("Error: No such object: {n}"),
        });
    }
    let code = match &a.format {
        None => {
            println!(
                "{}",
                serde_json::to_string_pretty(&found.into_iter().map(|f| f.0).collect::<Vec<_>>())?
            );
            None
        }
        Some(f) => {
            let data: Vec<Value> = found
                .into_iter()
                .map(|(v, is_container)| {
                    if is_container {
                        container_template_data(v)
                    } else {
                        Value::from_json(&v, &crate::format::is_go_map)
                    }
                })
                .collect();
            let (text, err) = crate::format::inspect(f, &data);
            print!("{text}");
            err.map(|e| {
                errors.push(e.to_string());
                e.exit_code()
            })
        }
    };
    for e in &errors {
        eprintln!("{e}");
    }
    Ok(match code {
        Some(c) => c,
        None if errors.is_empty() => ExitCode::SUCCESS,
        None => ExitCode::from(1),
    })
}

fn cmd_version() -> anyhow::Result<ExitCode> {
    println!("Client:");
    println!(" Version:           {}", env!("CARGO_PKG_VERSION"));
    println!(" OS/Arch:           linux/{}", docker_arch());
    println!(" Daemon:            none (kiln is daemonless)");
    Ok(ExitCode::SUCCESS)
}

fn docker_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn cmd_info(containers: &Containers, g: &Globals) -> anyhow::Result<ExitCode> {
    let (mut running, mut stopped, mut total) = (0, 0, 0);
    for rec in containers.list()? {
        total += 1;
        match containers.state(&rec.id).map(|s| s.status) {
            Ok(Status::Running | Status::Restarting) => running += 1,
            _ => stopped += 1,
        }
    }
    let store = kiln_cache::Store::open(&g.root)?;
    let images = store.images().index().map(|i| i.images.len()).unwrap_or(0);
    let overlay = std::fs::read_to_string("/proc/filesystems")
        .map(|f| f.lines().any(|l| l.split_whitespace().last() == Some("overlay")))
        .unwrap_or(false);
    let cgroup = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "2"
    } else if Path::new("/sys/fs/cgroup").exists() {
        "1"
    } else {
        "none"
    };
    let userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("Containers: {total}");
    println!(" Running: {running}");
    println!(" Paused: 0");
    println!(" Stopped: {stopped}");
    println!("Images: {images}");
    println!("Storage Driver: overlay (supported: {})", yes_no(overlay));
    println!("Cgroup Version: {cgroup}");
    println!("User Namespaces: {}", yes_no(userns));
    println!("Kernel Version: {}", kernel.trim());
    println!("Architecture: {}", std::env::consts::ARCH);
    println!("Kiln Root Dir: {}", g.root.display());
    let scratch = g.root.join("tmp");
    let _ = std::fs::create_dir_all(&scratch);
    kiln_runtime::snapshotter::set_scratch(&scratch);
    match kiln_runtime::snapshotter::choice() {
        Ok(c) => println!("Snapshotter: {}", c.reason),
        Err(e) => println!("Snapshotter: none: {e}"),
    }
    if kiln_runtime::userns::in_user_namespace() {
        println!(
            "Rootless: yes (uid 0 is host uid {})",
            kiln_runtime::userns::host_uid()
        );
        match kiln_runtime::net::usermode::find() {
            Ok((tool, path)) => println!("RUN Network: {} ({})", tool.name(), path.display()),
            Err(e) => println!("RUN Network: none: {e}"),
        }
    } else {
        println!("Rootless: no");
        println!("RUN Network: bridge {}", kiln_runtime::net::DEFAULT_BRIDGE);
    }
    Ok(ExitCode::SUCCESS)
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn cmd_supervise(containers: &Containers, a: SuperviseArgs) -> anyhow::Result<ExitCode> {
    // A session of our own: the supervisor survives the CLI and its terminal.
    let _ = nix::unistd::setsid();
    // Standard output is the readiness pipe to the starting CLI: keep it as `ready` only, so the
    // CLI sees its end as soon as the report is written.
    let ready = io::stdout().as_fd().try_clone_to_owned()?;
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdout(&devnull)?;
    let mode = Mode::Detached {
        ready: Some(std::fs::File::from(ready)),
        wait_attach: a.wait_attach,
    };
    match supervisor::supervise(containers, &a.id, mode) {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            let msg = supervisor::error_chain(&e);
            let _ = containers.update_state(&a.id, |st| {
                if st.status == Status::Running || st.status == Status::Restarting {
                    st.status = Status::Exited;
                    st.running = false;
                }
                st.error = msg.clone();
            });
            Err(e.into())
        }
    }
}
