//! `kiln debug parse` and `kiln debug graph`: the frontend's output in stable text forms.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use crate::build_cmd::{self, BuildInputs};
use crate::Globals;

#[derive(Subcommand, Debug)]
pub enum DebugCmd {
    /// Print a Dockerfile's syntax tree in BuildKit's dump format
    Parse {
        /// The Dockerfile
        file: PathBuf,
    },
    /// Print the build graph a Dockerfile lowers to, one op per line
    Graph {
        /// Name of the Dockerfile (default: CONTEXT/Dockerfile)
        #[arg(short = 'f', long = "file")]
        file: Option<String>,
        /// Build stage to lower
        #[arg(long)]
        target: Option<String>,
        /// Build-time variable (KEY=VALUE, or KEY to take it from the environment)
        #[arg(long = "build-arg")]
        build_args: Vec<String>,
        /// Context directory
        context: PathBuf,
    },
}

pub fn run(cmd: DebugCmd, g: &Globals) -> anyhow::Result<ExitCode> {
    match cmd {
        DebugCmd::Parse { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("failed to read `{}`", file.display()))?;
            match kiln_frontend::parser::parse(&bytes) {
                Ok(df) => {
                    print!("{}", kiln_frontend::parser::dump(&df));
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprint!("{}", e.render(&file.display().to_string(), &bytes));
                    Ok(ExitCode::from(1))
                }
            }
        }
        DebugCmd::Graph {
            file,
            target,
            build_args,
            context,
        } => {
            let inputs = BuildInputs::read(&context, file.as_deref(), &build_args, target, g)?;
            let lowered = match build_cmd::lower(&inputs, g) {
                Ok(l) => l,
                Err(msg) => {
                    eprint!("{msg}");
                    return Ok(ExitCode::from(1));
                }
            };
            print!("{}", lowered.graph.render(&[lowered.root]));
            Ok(ExitCode::SUCCESS)
        }
    }
}
