//! The state of lowering one stage: its filesystem, image config and environment as the
//! instructions change them, the outline it contributes, and its progress bookkeeping.

use std::collections::BTreeSet;

use kiln_dag::image::{History, ImageConfig};
use kiln_dag::Digest;

use super::values::{self, DEFAULT_PATH};
use super::{NamedContext, OutlineArg, OutlineMount};
use crate::parser::Span;

const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";
/// Build arguments BuildKit never puts in the environment (and never reports as undefined).
pub(super) const NON_ENV_ARGS: &[&str] = &["BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"];

pub(super) type Env = Vec<(String, String)>;

pub(super) fn env_get<'e>(env: &'e Env, key: &str) -> Option<&'e str> {
    env.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

pub(super) fn env_set(env: &mut Env, key: &str, value: &str) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value.to_string(),
        None => env.push((key.to_string(), value.to_string())),
    }
}

pub(super) fn env_from_config(config: &ImageConfig) -> Env {
    let mut env = Env::new();
    for kv in config.config.env.iter().flatten() {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        env_set(&mut env, k, v);
    }
    env
}

/// A stage's state while (and after) it is lowered; a child stage starts from a copy.
#[derive(Clone, Debug)]
pub(super) struct StageState {
    pub(super) fs: Digest,
    pub(super) config: ImageConfig,
    /// What RUN sees and what expansion uses: the config Env plus ARGs with values.
    pub(super) run_env: Env,
    /// Declared ARGs and their values, for the `|N K=V` history prefix.
    pub(super) args: Vec<(String, Option<String>)>,
    /// Every ARG declared in this stage or the stages it is based on (BuildKit's `buildArgs`):
    /// names that are never reported as undefined.
    pub(super) declared: BTreeSet<String>,
    /// A WORKDIR was set in this stage or a stage it is based on (WorkdirRelativePath).
    pub(super) workdir_set: bool,
    /// What the stage contributes to the outline.
    pub(super) outline: StageOutline,
}

/// What one stage contributes to the outline of a target.
#[derive(Clone, Debug, Default)]
pub(super) struct StageOutline {
    /// ARGs declared in the stage (inherited global ones keep their global definition).
    pub(super) args: Vec<OutlineArg>,
    /// Global ARGs the stage uses (in its FROM line, or redeclared without a default).
    pub(super) globals: BTreeSet<String>,
    pub(super) secrets: Vec<OutlineMount>,
    pub(super) ssh: Vec<OutlineMount>,
}

impl StageState {
    pub(super) fn new(fs: Digest, config: ImageConfig) -> StageState {
        StageState {
            fs,
            config,
            run_env: Env::new(),
            args: Vec::new(),
            declared: BTreeSet::new(),
            workdir_set: false,
            outline: StageOutline::default(),
        }
    }

    /// The directory steps run in and resolve relative paths against: the config's working
    /// directory, lexically cleaned (the config keeps an absolute WORKDIR as written).
    pub(super) fn cwd(&self) -> String {
        match self.config.config.working_dir.as_str() {
            "" => "/".to_string(),
            wd => values::clean_path(wd),
        }
    }

    /// Adds a history entry: `layer` when the step made a filesystem change.
    pub(super) fn history(&mut self, created_by: String, layer: bool) {
        self.config.history.push(History {
            created_by: Some(created_by),
            comment: Some(HISTORY_COMMENT.into()),
            empty_layer: !layer,
            ..History::default()
        });
    }

    /// The environment of an exec: the run environment, with the default PATH when unset.
    pub(super) fn exec_env(&self) -> Vec<String> {
        let mut env: Vec<String> = Vec::with_capacity(self.run_env.len() + 1);
        env.extend(self.run_env.iter().map(|(k, v)| {
            let mut kv = String::with_capacity(k.len() + 1 + v.len());
            kv.push_str(k);
            kv.push('=');
            kv.push_str(v);
            kv
        }));
        if env_get(&self.run_env, "PATH").is_none() {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        env
    }
}

/// A global ARG, for the outline.
#[derive(Clone, Debug)]
pub(super) struct GlobalArg {
    pub(super) name: String,
    pub(super) value: Option<String>,
    pub(super) description: String,
    pub(super) line: u32,
    /// Global ARGs its default refers to.
    pub(super) deps: BTreeSet<String>,
}

/// Per-stage progress bookkeeping (not inherited by child stages).
pub(super) struct Progress {
    pub(super) display: String,
    pub(super) stage_label: String,
    pub(super) total: usize,
    pub(super) step: usize,
    pub(super) ignore_cache: bool,
    /// Where the last CMD / ENTRYPOINT / HEALTHCHECK was (MultipleInstructionsDisallowed points
    /// at the one that gets ignored).
    pub(super) cmd_at: Option<Span>,
    pub(super) entrypoint_at: Option<Span>,
    pub(super) healthcheck_at: Option<Span>,
    pub(super) in_trigger: bool,
}

/// A `--from` / mount `from` source.
pub(super) enum FromRef {
    Stage(usize),
    Context(NamedContext),
    Image(String),
}

/// The shell form of a command: the stage's SHELL (or `/bin/sh -c`) and the text.
pub(super) fn with_shell(config: &ImageConfig, text: &str) -> Vec<String> {
    let mut args = match &config.config.shell {
        Some(s) if !s.is_empty() => s.clone(),
        _ => vec!["/bin/sh".to_string(), "-c".to_string()],
    };
    args.push(text.to_string());
    args
}
