//! `kiln`: build, store and run OCI images without a daemon.
#![forbid(unsafe_code)]
// Flag help comes from doc comments (clap): `NAME[:TAG]` there is help text, not a link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod attach;
mod build_cmd;
mod container_cmds;
mod container_fs_cmds;
mod debug_cmd;
mod filters;
mod format;
mod gotemplate;
mod progress;
mod registry_cmds;
mod run_cmd;
mod setup_cmd;
mod store_cmds;
mod supervise;

/// Options every subcommand sees.
#[derive(Debug, Clone)]
pub struct Globals {
    /// The store root.
    pub root: PathBuf,
    /// `--debug`: show why steps were not cached, and more.
    pub debug: bool,
}

#[derive(Parser, Debug)]
#[command(
    name = "kiln",
    version,
    about = "Daemonless Dockerfile builder and container runner"
)]
struct Cli {
    /// Store root (default: $KILN_ROOT, else /var/lib/kiln as root, else $XDG_DATA_HOME/kiln)
    #[arg(long, global = true, env = "KILN_ROOT")]
    root: Option<PathBuf>,
    /// Log debug information to stderr
    #[arg(long, global = true)]
    debug: bool,
    /// Run in a user namespace of kiln's own, as a non-root user always does: the caller is root
    /// there and its /etc/subuid and /etc/subgid ranges are the other ids
    #[arg(long, global = true, env = "KILN_ROOTLESS", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0, default_missing_value = "true")]
    rootless: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per process; its size does not matter
enum Cmd {
    #[command(flatten)]
    Store(store_cmds::StoreCmd),
    /// Build an image from a Dockerfile
    Build(Box<build_cmd::BuildArgs>),
    /// Run a command in a new container
    Run(Box<run_cmd::RunArgs>),
    /// Inspect what the frontend makes of a Dockerfile
    #[command(subcommand)]
    Debug(debug_cmd::DebugCmd),
    #[command(flatten)]
    Containers(container_cmds::ContainerCmd),
    #[command(flatten)]
    ContainerFs(container_fs_cmds::FsCmd),
    /// Download an image from a registry
    Pull(registry_cmds::PullArgs),
    /// Upload an image to a registry
    Push(registry_cmds::PushArgs),
    /// Log in to a registry
    Login(registry_cmds::LoginArgs),
    /// Log out from a registry
    Logout(registry_cmds::LogoutArgs),
    /// Set up the host (as root): QEMU emulation for other platforms
    #[command(subcommand)]
    Setup(setup_cmd::SetupCmd),
}

fn default_root() -> PathBuf {
    if nix_is_root() {
        return PathBuf::from("/var/lib/kiln");
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("kiln"),
        _ => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".local/share/kiln"))
            .unwrap_or_else(|| PathBuf::from("/var/lib/kiln")),
    }
}

/// The pids of the live supervisors of `root`'s containers (read without opening the store, before
/// rootless mode is entered).
fn live_supervisors(root: &std::path::Path) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(root.join("containers")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let bytes = std::fs::read(e.path().join("state.json")).ok()?;
            let st: kiln_containers::ContainerState = serde_json::from_slice(&bytes).ok()?;
            kiln_containers::state::supervisor_alive(&st).then_some(st.supervisor_pid)
        })
        .collect()
}

fn nix_is_root() -> bool {
    // /proc/self is owned by the process's effective uid.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The store's default place depends on who started kiln, so it is chosen before rootless mode
    // makes this process root in a user namespace.
    let root = cli.root.clone().unwrap_or_else(default_root);
    // Rootless mode: a user namespace of our own, entered while the process has one thread. Root
    // already in one (a supervisor kiln started, or kiln as root of a container with a user
    // namespace) stays where it is.
    let userns =
        kiln_runtime::userns::needed() || (cli.rootless && !kiln_runtime::userns::in_user_namespace());
    if userns {
        // Containers of this store started in rootless mode live in their supervisor's user
        // namespace: join the first live one, so that this command's root owns them.
        let mut joined = false;
        for pid in live_supervisors(&root) {
            match kiln_runtime::userns::join(pid) {
                Ok(true) => {
                    joined = true;
                    break;
                }
                Ok(false) => {}
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        if !joined {
            if let Err(e) = kiln_runtime::userns::enter() {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let filter = if cli.debug { "debug" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    if let Err(e) = kiln_runtime::snapshotter::check_env() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    kiln_runtime::snapshotter::set_scratch(&root.join("tmp"));
    if kiln_runtime::userns::in_user_namespace() {
        tracing::debug!(
            "rootless: in a user namespace (uid 0 is host uid {}); RUN network: {}",
            kiln_runtime::userns::host_uid(),
            match kiln_runtime::net::usermode::find() {
                Ok((tool, _)) => tool.name().to_owned(),
                Err(e) => e.to_string(),
            }
        );
    }
    let globals = Globals {
        root,
        debug: cli.debug,
    };
    // Builds and containers mount overlays from this process: a mount namespace of our own makes
    // every such mount vanish with the process, however it ends. It must be entered while the
    // process still has one thread.
    let private_mounts = match &cli.cmd {
        Cmd::Build(_) | Cmd::Run(_) => true,
        Cmd::Store(store_cmds::StoreCmd::Image(store_cmds::ImageCmd::Build(_))) => true,
        Cmd::Containers(c) => c.needs_private_mounts(),
        Cmd::ContainerFs(c) => c.needs_private_mounts(),
        _ => false,
    };
    if private_mounts {
        if let Err(e) = kiln_runtime::host::enter_private_mount_namespace() {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
        // Only commands that mount choose a snapshotter (in a user namespace, by a test mount in
        // the mount namespace of their own).
        if globals.debug {
            match kiln_runtime::snapshotter::choice() {
                Ok(c) => tracing::debug!("snapshotter: {}", c.reason),
                Err(e) => tracing::debug!("snapshotter: none: {e}"),
            }
        }
    }
    let result = match cli.cmd {
        Cmd::Store(c) => store_cmds::run(c, &globals),
        Cmd::Build(a) => build_cmd::run(*a, &globals),
        Cmd::Run(a) => run_cmd::run(*a, &globals),
        Cmd::Debug(c) => debug_cmd::run(c, &globals),
        Cmd::Containers(c) => container_cmds::run(c, &globals),
        Cmd::ContainerFs(c) => container_fs_cmds::run(c, &globals),
        Cmd::Pull(a) => registry_cmds::pull(a, &globals),
        Cmd::Push(a) => registry_cmds::push(a, &globals),
        Cmd::Login(a) => registry_cmds::login(a),
        Cmd::Logout(a) => registry_cmds::logout(a),
        Cmd::Setup(c) => setup_cmd::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
