//! Lowering: typed Dockerfile instructions → build [`Graph`] + image config + warnings.
//!
//! The steps follow BuildKit's dockerfile2llb:
//! 1. split the instructions into the global ARG scope and stages; expand every `FROM` with the
//!    global args (predefined platform args plus declared meta args);
//! 2. find the target stage (`--target`, or the last one) and the stages reachable from it
//!    through `FROM <stage>`, `COPY --from`, `RUN --mount from=` and ONBUILD triggers;
//! 3. lower the reachable stages in file order; every other stage produces no vertex.
//!
//! What goes into digests: only op fields (see `kiln_dag`). Progress names, stage names and
//! source lines are [`kiln_dag::Meta`]. Proxy build args that a stage does not declare are kept
//! out of the ops altogether and returned in [`Lowered::proxy_env`] for the solver to add at run
//! time, so they never change a digest or the history.

mod copy;
mod dispatch;
pub mod error;
mod from;
mod healthcheck;
mod meta;
mod mounts;
mod plan;
mod run;
mod stages;
mod state;
pub mod values;

use std::collections::BTreeMap;

use kiln_dag::image::ImageConfig;
use kiln_dag::{Digest, Graph, Platform};

pub use error::{BoxError, FrontendError, LowerError, ResolverError};

use crate::instructions::Located;

/// Everything the caller decides about a build.
#[derive(Clone, Debug)]
pub struct LowerOptions {
    /// The Dockerfile's name, for error messages and source locations (`Dockerfile`).
    pub dockerfile_name: String,
    /// `--build-arg NAME=value`.
    pub build_args: BTreeMap<String, String>,
    /// `--target`; `None` = the last stage.
    pub target: Option<String>,
    /// The target platform: `TARGETPLATFORM` and friends, and the platform of every stage
    /// without `FROM --platform`.
    pub platform: Platform,
    /// The platform the build runs on: `BUILDPLATFORM` and friends.
    pub build_platform: Platform,
    /// Several target platforms are built together: step names start with the stage's platform
    /// (`[linux/arm64 build 2/3] RUN ...`), as BuildKit names them, so a step shared by every
    /// platform (a `FROM --platform=$BUILDPLATFORM` stage) has one name in all of them.
    pub prefix_platform: bool,
    /// `--label`, added to the final image.
    pub labels: BTreeMap<String, String>,
    /// `--no-cache`: every vertex ignores cached results.
    pub no_cache: bool,
    /// `--no-cache-filter`: stages (by name or index) whose vertices ignore cached results.
    pub no_cache_filter: Vec<String>,
    /// `.dockerignore` patterns, put on the context source's `exclude`.
    pub dockerignore: Vec<String>,
    /// `--build-context name=...`: replaces stages and images of that name.
    pub named_contexts: BTreeMap<String, NamedContext>,
    /// Lower every stage, not only those the target needs (`--check`: BuildKit lints all
    /// stages when no target is given).
    pub all_stages: bool,
    /// `--network`: the network of RUN steps without `--network` of their own (BuildKit's
    /// `force-network-mode`).
    pub network: kiln_dag::NetworkMode,
    /// `--add-host`: (name, address) entries every RUN step's `/etc/hosts` gets.
    pub extra_hosts: Vec<(String, String)>,
    /// `--shm-size`: the size of every RUN step's `/dev/shm` in bytes (BuildKit's `shm-size`).
    pub shm_size: Option<u64>,
    /// `--ulimit`: resource limits of every RUN step (BuildKit's `ulimit`).
    pub ulimits: Vec<kiln_dag::Ulimit>,
}

impl Default for LowerOptions {
    fn default() -> Self {
        LowerOptions {
            dockerfile_name: "Dockerfile".into(),
            build_args: BTreeMap::new(),
            target: None,
            platform: Platform::host(),
            build_platform: Platform::host(),
            prefix_platform: false,
            labels: BTreeMap::new(),
            no_cache: false,
            no_cache_filter: Vec::new(),
            dockerignore: Vec::new(),
            named_contexts: BTreeMap::new(),
            all_stages: false,
            network: kiln_dag::NetworkMode::Default,
            extra_hosts: Vec::new(),
            shm_size: None,
            ulimits: Vec::new(),
        }
    }
}

/// A `--build-context` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamedContext {
    /// A local directory, transferred as the local source `name`.
    Local { name: String },
    /// An image reference (`docker-image://...`).
    Image { reference: String },
    /// A Git repository (`https://host/repo.git#ref:subdir`, `git@…`, `git://…`), fetched by the
    /// solver as a Git source and keyed by the commit the ref resolves to.
    Git {
        remote: String,
        /// Branch, tag or commit; empty = the remote's HEAD.
        reference: String,
        subdir: String,
        keep_git_dir: bool,
    },
}

/// Looks up base images: the caller's bridge to the image store or a registry.
pub trait ImageResolver {
    /// Resolves `reference` for `platform`.
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage, ResolverError>;
}

/// What an [`ImageResolver`] found.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// The normalised reference (`docker.io/library/busybox:latest`).
    pub reference: String,
    /// The manifest digest, when known.
    pub digest: Option<Digest>,
    pub config: ImageConfig,
}

pub use crate::lint::Warning;

/// The result of lowering.
#[derive(Clone, Debug)]
pub struct Lowered {
    pub graph: Graph,
    /// The target stage's filesystem.
    pub root: Digest,
    /// The image config of the target stage, base image fields and history included; the
    /// rootfs `diff_ids` are the base image's, left for the exporter to extend.
    pub config: ImageConfig,
    pub warnings: Vec<Warning>,
    /// The target stage's name, if it has one.
    pub stage_name: Option<String>,
    /// `KEY=VALUE` proxy build args (HTTP_PROXY & co.) given on the command line. The solver
    /// adds each to every exec whose env does not already set that key; they are in no digest.
    pub proxy_env: Vec<String>,
    /// The shared build context source vertex, if any step reads the context.
    pub context: Option<Digest>,
    /// What the target takes: its build arguments, secrets and SSH sockets (`--call=outline`).
    pub outline: Outline,
}

/// BuildKit's outline of a target (`--call=outline`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outline {
    /// The target stage's name (empty for an unnamed one).
    pub name: String,
    /// Its description (the `# name description` comment above its FROM).
    pub description: String,
    /// The build arguments the target uses, in Dockerfile order.
    pub args: Vec<OutlineArg>,
    /// The secrets its RUN steps mount, in Dockerfile order.
    pub secrets: Vec<OutlineMount>,
    /// The SSH sockets its RUN steps mount, in Dockerfile order.
    pub ssh: Vec<OutlineMount>,
}

/// A build argument of an [`Outline`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutlineArg {
    pub name: String,
    /// Its value for this build (a `--build-arg` or the default); empty when unset.
    pub value: String,
    /// The `# NAME description` comment above its ARG.
    pub description: String,
    /// 1-based line of its ARG.
    pub line: u32,
}

/// A secret or SSH mount of an [`Outline`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutlineMount {
    pub name: String,
    pub required: bool,
    pub line: u32,
}

/// A stage as `--call=targets` lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// The stage name, as written lowercased (empty for an unnamed stage).
    pub name: String,
    /// Its `# name description` comment.
    pub description: String,
    /// The last stage: what a build without `--target` builds.
    pub default: bool,
    /// The base, as written.
    pub base: String,
    /// `FROM --platform`, as written.
    pub platform: String,
    /// 1-based line of its FROM.
    pub line: u32,
}

/// Parses and lowers a Dockerfile, running BuildKit's checks on the way.
///
/// The checks follow the `# check=` directive, or the `BUILDKIT_DOCKERFILE_CHECK` build
/// argument when given (which replaces the directive, as in BuildKit). With `error=true`, any
/// check that fires makes lowering fail with BuildKit's `lint violation found for rules: ...`;
/// every error carries the warnings found before it.
pub fn lower(
    dockerfile: &[u8],
    opts: &LowerOptions,
    resolver: &dyn ImageResolver,
) -> Result<Lowered, FrontendError> {
    let text = String::from_utf8_lossy(dockerfile);
    if text.trim().is_empty() {
        return Err(FrontendError::new(&opts.dockerfile_name, 0, 0, LowerError::Empty));
    }
    let mut lint = crate::lint::Linter::new(check_config(dockerfile, opts)?);
    let (df, located) = parse_source(dockerfile).map_err(|e| {
        FrontendError::new(
            &opts.dockerfile_name,
            e.line,
            if e.line == 0 { 0 } else { e.column },
            LowerError::Parse { message: e.message },
        )
    })?;
    if let Some(syntax) = crate::parser::detect_syntax(dockerfile) {
        if !crate::lint::is_dockerfile_frontend(&syntax.value) {
            lint.notice(Warning::notice(
                format!(
                    "syntax directive names the frontend {}, which kiln cannot run: the built-in Dockerfile frontend is used",
                    crate::parser::gotext::quote(&syntax.value)
                ),
                syntax.line,
            ));
        }
    }
    crate::lint::check_parsed(&df, &text, &mut lint);
    let trigger_parser = |trigger: &str| -> Result<Located, String> {
        let (_, mut located) = parse_source(trigger.as_bytes()).map_err(|e| e.message)?;
        if located.len() != 1 {
            return Err("onbuild trigger should be a single expression".into());
        }
        Ok(located.remove(0))
    };
    let mut cx = dispatch::Lowerer::new(df.escape, &text, opts, resolver, &trigger_parser, lint);
    cx.run(located)
}

/// The check configuration of a build: `BUILDKIT_DOCKERFILE_CHECK` when given, else the
/// `# check=` directive.
fn check_config(dockerfile: &[u8], opts: &LowerOptions) -> Result<crate::lint::CheckConfig, FrontendError> {
    if let Some(v) = opts.build_args.get("BUILDKIT_DOCKERFILE_CHECK") {
        return crate::lint::CheckConfig::parse(v).map_err(|source| {
            FrontendError::new(
                &opts.dockerfile_name,
                0,
                0,
                LowerError::CheckOptions {
                    origin: "BUILDKIT_DOCKERFILE_CHECK".into(),
                    source,
                },
            )
        });
    }
    match crate::parser::parse_directive("check", dockerfile) {
        None => Ok(crate::lint::CheckConfig::default()),
        Some(d) => crate::lint::CheckConfig::parse(&d.cmdline).map_err(|source| {
            FrontendError::new(
                &opts.dockerfile_name,
                d.line,
                1,
                LowerError::CheckOptions {
                    origin: "check options".into(),
                    source,
                },
            )
        }),
    }
}

/// The stages of a Dockerfile with their descriptions (`--call=targets`, BuildKit's
/// `ListTargets`): parsing only, nothing resolved.
pub fn targets(dockerfile: &[u8], file: &str) -> Result<Vec<Target>, FrontendError> {
    let (df, located) = parse_source(dockerfile).map_err(|e| {
        FrontendError::new(
            file,
            e.line,
            if e.line == 0 { 0 } else { e.column },
            LowerError::Parse { message: e.message },
        )
    })?;
    let text = String::from_utf8_lossy(dockerfile);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut prev_end = 0;
    for (node, loc) in df.nodes.iter().zip(&located) {
        let comments = crate::lint::prev_comments(&lines, node.span.start_line, prev_end);
        prev_end = node.span.end_line;
        if let crate::instructions::Instruction::From {
            image,
            name,
            platform,
        } = &loc.instruction
        {
            let name = name.clone().unwrap_or_default();
            out.push(Target {
                description: crate::lint::description_for(&comments, &name),
                name,
                default: false,
                base: image.clone(),
                platform: platform.clone().unwrap_or_default(),
                line: node.span.start_line,
            });
        }
    }
    if out.is_empty() {
        return Err(FrontendError::new(file, 0, 0, LowerError::NoStages));
    }
    if let Some(last) = out.last_mut() {
        last.default = true;
    }
    Ok(out)
}

/// A parser or instruction-typer failure, positioned.
struct SourceError {
    line: u32,
    column: u32,
    message: String,
}

/// Runs the parser and the instruction typer.
fn parse_source(bytes: &[u8]) -> Result<(crate::parser::Dockerfile, Vec<Located>), SourceError> {
    let df = crate::parser::parse(bytes).map_err(|e| SourceError {
        line: e.line,
        column: e.column,
        message: e.message,
    })?;
    let located = crate::instructions::parse_all(&df).map_err(|e| {
        let line = e.line();
        let text = String::from_utf8_lossy(bytes);
        let line_text = text.lines().nth(line.saturating_sub(1) as usize).unwrap_or("");
        let mut column = first_column(line_text);
        if let Some(needle) = instruction_error_needle(&e) {
            if let Some(pos) = line_text.find(&needle) {
                column = line_text[..pos].chars().count() as u32 + 1;
            }
        }
        // The typer's messages start with `line N: `; the position is rendered separately.
        let full = e.to_string();
        let prefix = format!("line {line}: ");
        let message = full.strip_prefix(&prefix).unwrap_or(&full).to_string();
        SourceError {
            line,
            column,
            message,
        }
    })?;
    Ok((df, located))
}

/// The text the caret of an instruction error should point at, when narrower than the line.
fn instruction_error_needle(e: &crate::instructions::InstructionError) -> Option<String> {
    use crate::instructions::InstructionError as E;
    match e {
        E::UnknownFlag { flag, .. }
        | E::DuplicateFlag { flag, .. }
        | E::MissingFlagValue { flag, .. }
        | E::InvalidBool { flag, .. } => Some(format!("--{flag}")),
        E::InvalidDuration { flag, .. } | E::DurationTooShort { flag, .. } => Some(format!("--{flag}")),
        E::InvalidRetries { .. } => Some("--retries".into()),
        E::InvalidMount { .. } => Some("--mount".into()),
        E::InvalidStageName { name, .. } => Some(name.clone()),
        _ => None,
    }
}

/// 1-based column of the first non-blank character of `line`.
pub(crate) fn first_column(line: &str) -> u32 {
    line.chars().take_while(|c| c.is_whitespace()).count() as u32 + 1
}

/// Lowers already typed instructions. `source` is the Dockerfile text (for error carets),
/// `escape` its escape character, `parse_trigger` parses one ONBUILD trigger.
pub fn lower_instructions(
    instructions: &[Located],
    escape: char,
    source: &str,
    opts: &LowerOptions,
    resolver: &dyn ImageResolver,
    parse_trigger: &dyn Fn(&str) -> Result<Located, String>,
) -> Result<Lowered, FrontendError> {
    let lint = crate::lint::Linter::default();
    let mut cx = dispatch::Lowerer::new(escape, source, opts, resolver, parse_trigger, lint);
    cx.run(instructions.to_vec())
}

#[cfg(test)]
mod tests;
