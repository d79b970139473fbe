//! Typed instructions: what each Dockerfile instruction means, with its flags parsed and
//! checked, before any variable is expanded. Built from the parser's [`crate::parser::Node`]s by
//! [`parse_instruction`]. Words that undergo expansion stay as written here; lowering expands
//! them in the right environment.

use crate::parser::{Heredoc, Node, Span};

/// An argument list in shell form (`RUN make all`) or exec form (`RUN ["make", "all"]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandLine {
    Shell(String),
    Exec(Vec<String>),
}

/// A `--mount` value, split into its `key=value` options (values unexpanded, in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub options: Vec<(String, Option<String>)>,
}

/// `HEALTHCHECK`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Healthcheck {
    None,
    Cmd {
        cmd: CommandLine,
        interval: Option<String>,
        timeout: Option<String>,
        start_period: Option<String>,
        start_interval: Option<String>,
        retries: Option<String>,
    },
}

/// `KEY=VALUE` (or legacy `KEY VALUE`) pairs of ENV and LABEL, unexpanded.
pub type Pairs = Vec<(String, String)>;

/// `COPY`/`ADD` sources and destination plus flags. Sources and destination unexpanded.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CopySpec {
    pub sources: Vec<String>,
    pub dest: String,
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    pub parents: bool,
    pub exclude: Vec<String>,
    /// ADD only.
    pub checksum: Option<String>,
    /// ADD only.
    pub keep_git_dir: Option<bool>,
    /// ADD only: `--unpack` (explicit archive extraction choice).
    pub unpack: Option<bool>,
    /// Heredoc sources (`COPY <<EOF /dst`), in order.
    pub heredocs: Vec<Heredoc>,
}

/// One instruction, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Instruction {
    From { image: String, name: Option<String>, platform: Option<String> },
    Run {
        cmd: CommandLine,
        mounts: Vec<MountSpec>,
        network: Option<String>,
        security: Option<String>,
        heredocs: Vec<Heredoc>,
    },
    Cmd(CommandLine),
    Entrypoint(CommandLine),
    Label(Pairs),
    Maintainer(String),
    Expose(Vec<String>),
    Env(Pairs),
    Add(CopySpec),
    Copy(CopySpec),
    Volume(Vec<String>),
    User(String),
    Workdir(String),
    /// `ARG name[=default]`, several per instruction allowed.
    Arg(Vec<(String, Option<String>)>),
    /// The trigger instruction's original text (`RUN echo hi`), as stored in the image config.
    Onbuild(String),
    Stopsignal(String),
    Healthcheck(Healthcheck),
    Shell(Vec<String>),
}

/// An instruction and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    pub instruction: Instruction,
    pub span: Span,
    /// The instruction as written, continuation lines joined (for history `created_by`).
    pub original: String,
}
