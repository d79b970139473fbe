//! `kiln`: build, store and run OCI images without a daemon.
#![forbid(unsafe_code)]
// Flag help comes from doc comments (clap): `NAME[:TAG]` there is help text, not a link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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

fn nix_is_root() -> bool {
    // /proc/self is owned by the process's effective uid.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = if cli.debug { "debug" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let globals = Globals {
        root: cli.root.unwrap_or_else(default_root),
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
