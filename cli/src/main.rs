//! `kiln`: build, store and run OCI images without a daemon.
#![forbid(unsafe_code)]
// Flag help comes from doc comments (clap): `NAME[:TAG]` there is help text, not a link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

mod attach;
mod commands;
mod filters;
mod format;
mod gotemplate;
mod process;
mod progress;
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
    cmd: commands::Cmd,
}

fn main() -> ExitCode {
    kiln_runtime::sys::return_large_blocks_promptly();
    let cli = Cli::parse();
    // The store's default place depends on who started kiln, so it is chosen before rootless mode
    // makes this process root in a user namespace.
    let root = cli.root.clone().unwrap_or_else(process::default_root);
    let mut setup = process::enter(&root, cli.rootless, cli.debug);
    if setup.is_ok() && cli.cmd.needs_private_mounts() {
        setup = process::private_mounts(cli.debug);
    }
    if let Err(e) = setup {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    let globals = Globals {
        root,
        debug: cli.debug,
    };
    match commands::run(cli.cmd, &globals) {
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
