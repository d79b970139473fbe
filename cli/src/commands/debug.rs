//! `kiln debug parse` and `kiln debug graph`: the frontend's output in stable text forms.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use kiln_build::{BuildError, BuildRequest, CancelToken, ContextSource, DockerfileSource, ProgressSink};

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
            let mut req = BuildRequest::new(ContextSource::Dir(context));
            req.dockerfile = match file.as_deref() {
                None => DockerfileSource::Default,
                Some("-") => DockerfileSource::Stream(Box::new(std::io::stdin())),
                Some(f) => DockerfileSource::Path(f.to_string()),
            };
            req.build_args = super::build::parse_kv_args(&build_args, "build argument")?;
            req.target = target;
            let store = kiln_cache::Store::open(&g.root)?;
            let planned = match kiln_build::plan(&store, req, &ProgressSink::discard(), &CancelToken::new()) {
                Ok(p) => p,
                Err(BuildError::Lower { dockerfile, error }) => {
                    eprint!("{}", error.render(&dockerfile.bytes));
                    return Ok(ExitCode::from(1));
                }
                Err(e) => return Err(e.into()),
            };
            let lowered = planned.lowered();
            print!("{}", lowered.graph.render(&[lowered.root]));
            Ok(ExitCode::SUCCESS)
        }
    }
}
