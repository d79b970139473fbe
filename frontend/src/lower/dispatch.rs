//! The lowering driver: stage planning, reachability, and one function per instruction.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use kiln_dag::image::{HealthConfig, History, ImageConfig};
use kiln_dag::{
    CopyAction, Digest, ExecOp, FileAction, FileOp, GitSource, Graph, HttpSource, ImageSource, LocalSource,
    MergeOp, Meta, MkdirAction, MkfileAction, Mount, MountKind, NetworkMode, Op, Platform, SecurityMode,
    SourceLocation, SourceOp, Vertex,
};

use super::error::{suggest, FrontendError, LowerError};
use super::mounts::{parse_mount, MountType};
use super::stages::{self, Base, Stage};
use super::values::{self, DEFAULT_PATH};
use super::{
    first_column, ImageResolver, LowerOptions, Lowered, NamedContext, Outline, OutlineArg, OutlineMount,
    ResolvedImage,
};
use crate::instructions::{CommandLine, CopySpec, Healthcheck, Instruction, Located};
use crate::lint::{self, Linter, Rule};
use crate::parser::Heredoc;
use crate::parser::Span;

const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";
const PROXY_ARGS: &[&str] = &["http_proxy", "https_proxy", "ftp_proxy", "no_proxy", "all_proxy"];
/// Build arguments BuildKit never puts in the environment (and never reports as undefined).
const NON_ENV_ARGS: &[&str] = &["BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"];
/// `--build-arg BUILDKIT_SANDBOX_HOSTNAME=name`: the hostname RUN steps see.
const HOSTNAME_ARG: &str = "BUILDKIT_SANDBOX_HOSTNAME";

type Env = Vec<(String, String)>;

fn env_get<'e>(env: &'e Env, key: &str) -> Option<&'e str> {
    env.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn env_set(env: &mut Env, key: &str, value: &str) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value.to_string(),
        None => env.push((key.to_string(), value.to_string())),
    }
}

fn env_from_config(config: &ImageConfig) -> Env {
    let mut env = Env::new();
    for kv in config.config.env.iter().flatten() {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        env_set(&mut env, k, v);
    }
    env
}

/// A stage's state while (and after) it is lowered; a child stage starts from a copy.
#[derive(Clone, Debug)]
struct StageState {
    fs: Digest,
    config: ImageConfig,
    /// What RUN sees and what expansion uses: the config Env plus ARGs with values.
    run_env: Env,
    /// Declared ARGs and their values, for the `|N K=V` history prefix.
    args: Vec<(String, Option<String>)>,
    /// Every ARG declared in this stage or the stages it is based on (BuildKit's `buildArgs`):
    /// names that are never reported as undefined.
    declared: BTreeSet<String>,
    /// A WORKDIR was set in this stage or a stage it is based on (WorkdirRelativePath).
    workdir_set: bool,
    /// What the stage contributes to the outline.
    outline: StageOutline,
}

/// What one stage contributes to the outline of a target.
#[derive(Clone, Debug, Default)]
struct StageOutline {
    /// ARGs declared in the stage (inherited global ones keep their global definition).
    args: Vec<OutlineArg>,
    /// Global ARGs the stage uses (in its FROM line, or redeclared without a default).
    globals: BTreeSet<String>,
    secrets: Vec<OutlineMount>,
    ssh: Vec<OutlineMount>,
}

impl StageState {
    fn new(fs: Digest, config: ImageConfig) -> StageState {
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
}

/// A global ARG, for the outline.
#[derive(Clone, Debug)]
struct GlobalArg {
    name: String,
    value: Option<String>,
    description: String,
    line: u32,
    /// Global ARGs its default refers to.
    deps: BTreeSet<String>,
}

impl StageState {
    /// The directory steps run in and resolve relative paths against: the config's working
    /// directory, lexically cleaned (the config keeps an absolute WORKDIR as written).
    fn cwd(&self) -> String {
        match self.config.config.working_dir.as_str() {
            "" => "/".to_string(),
            wd => values::clean_path(wd),
        }
    }
}

/// Per-stage progress bookkeeping (not inherited by child stages).
struct Progress {
    display: String,
    stage_label: String,
    total: usize,
    step: usize,
    ignore_cache: bool,
    /// Where the last CMD / ENTRYPOINT / HEALTHCHECK was (MultipleInstructionsDisallowed points
    /// at the one that gets ignored).
    cmd_at: Option<Span>,
    entrypoint_at: Option<Span>,
    healthcheck_at: Option<Span>,
    in_trigger: bool,
}

/// A `--from` / mount `from` source.
enum FromRef {
    Stage(usize),
    Context(NamedContext),
    Image(String),
}

pub struct Lowerer<'a> {
    lines: Vec<&'a str>,
    opts: &'a LowerOptions,
    resolver: &'a dyn ImageResolver,
    parse_trigger: &'a dyn Fn(&str) -> Result<Located, String>,
    lexer: crate::shell::Lexer,
    graph: Graph,
    lint: Linter,
    global_args: Env,
    /// Global ARGs as declared (for the outline).
    global_decl: Vec<GlobalArg>,
    /// The Dockerfile lines (for description comments).
    source_lines: Vec<String>,
    stages: Vec<Stage>,
    resolved: BTreeMap<String, ResolvedImage>,
    context: Option<Digest>,
    done: Vec<Option<StageState>>,
    single_stage: bool,
    /// Stages whose ONBUILD triggers were resolved.
    triggers_done: BTreeSet<usize>,
}

impl<'a> Lowerer<'a> {
    pub fn new(
        escape: char,
        source: &'a str,
        opts: &'a LowerOptions,
        resolver: &'a dyn ImageResolver,
        parse_trigger: &'a dyn Fn(&str) -> Result<Located, String>,
        lint: Linter,
    ) -> Self {
        Lowerer {
            lines: source.lines().collect(),
            opts,
            resolver,
            parse_trigger,
            lexer: crate::shell::Lexer::new(escape),
            graph: Graph::default(),
            lint,
            global_args: Env::new(),
            global_decl: Vec::new(),
            source_lines: source.lines().map(str::to_string).collect(),
            stages: Vec::new(),
            resolved: BTreeMap::new(),
            context: None,
            done: Vec::new(),
            single_stage: false,
            triggers_done: BTreeSet::new(),
        }
    }

    // ----- errors, expansion, graph helpers -------------------------------------------------

    fn err(&self, loc: &Located, needle: Option<&str>, kind: LowerError) -> FrontendError {
        let line = loc.span.start_line;
        let text = self
            .lines
            .get(line.saturating_sub(1) as usize)
            .copied()
            .unwrap_or("");
        let mut column = first_column(text);
        if let Some(n) = needle.filter(|n| !n.is_empty()) {
            if let Some(pos) = text.find(n) {
                column = text[..pos].chars().count() as u32 + 1;
            }
        }
        FrontendError {
            file: self.opts.dockerfile_name.clone(),
            line,
            column: if line == 0 { 0 } else { column },
            kind: Box::new(kind),
            warnings: self.lint.warnings().to_vec(),
        }
    }

    fn bare_err(&self, kind: LowerError) -> FrontendError {
        FrontendError {
            file: self.opts.dockerfile_name.clone(),
            line: 0,
            column: 0,
            kind: Box::new(kind),
            warnings: self.lint.warnings().to_vec(),
        }
    }

    fn expand(&self, loc: &Located, word: &str, env: &Env) -> Result<String, FrontendError> {
        // Without `$`, quotes or the escape character the lexer would return the word as is.
        let escape = self.lexer.escape();
        if !word.contains(['$', '\'', '"', escape]) {
            return Ok(word.to_string());
        }
        let lookup = |k: &str| env_get(env, k).map(str::to_string);
        self.lexer.process_word(word, &lookup).map_err(|source| {
            self.err(
                loc,
                Some(word),
                LowerError::Expand {
                    word: word.to_string(),
                    source,
                },
            )
        })
    }

    fn warn(&mut self, rule: &'static Rule, message: String, span: Span) {
        self.lint.run(rule, message, span);
    }

    /// Expands one word of an instruction in a stage, reporting the variables it uses that are
    /// neither set nor declared (UndefinedVar).
    fn expand_in(&mut self, loc: &Located, word: &str, st: &StageState) -> Result<String, FrontendError> {
        let escape = self.lexer.escape();
        if !word.contains(['$', '\'', '"', escape]) {
            return Ok(word.to_string());
        }
        let env = &st.run_env;
        let lookup = |k: &str| env_get(env, k).map(str::to_string);
        let expanded = self
            .lexer
            .process_word_with_matches(word, &lookup)
            .map_err(|source| {
                self.err(
                    loc,
                    Some(word),
                    LowerError::Expand {
                        word: word.to_string(),
                        source,
                    },
                )
            })?;
        self.report_undefined(loc, &expanded.unmatched, st);
        Ok(expanded.result)
    }

    fn report_undefined(&mut self, loc: &Located, unmatched: &BTreeSet<String>, st: &StageState) {
        for name in unmatched {
            if st.declared.contains(name) || NON_ENV_ARGS.contains(&name.as_str()) {
                continue;
            }
            let keys: Vec<String> = st.run_env.iter().map(|(k, _)| k.clone()).collect();
            let message = match lint::suggest(name, &keys) {
                Some(s) => format!("Usage of undefined variable '${name}' (did you mean ${s}?)"),
                None => format!("Usage of undefined variable '${name}'"),
            };
            self.warn(&lint::UNDEFINED_VAR, message, loc.span);
        }
    }

    fn location(&self, loc: &Located) -> Option<SourceLocation> {
        Some(SourceLocation {
            file: self.opts.dockerfile_name.clone(),
            start_line: loc.span.start_line,
            end_line: loc.span.end_line,
        })
    }

    fn add(&mut self, op: Op, inputs: Vec<Digest>, meta: Meta) -> Digest {
        let meta = Meta {
            ignore_cache: meta.ignore_cache || self.opts.no_cache,
            ..meta
        };
        self.graph.add(Vertex { op, inputs, meta })
    }

    fn internal(&mut self, op: Op, inputs: Vec<Digest>, name: &str, p: &Progress) -> Digest {
        let meta = Meta {
            name: format!("[internal] {name}"),
            stage: Some(p.display.clone()),
            location: None,
            ignore_cache: p.ignore_cache,
        };
        self.add(op, inputs, meta)
    }

    fn step_meta(&self, p: &mut Progress, loc: &Located, text: &str) -> Meta {
        let mut name = String::with_capacity(p.stage_label.len() + text.len() + 24);
        if p.total > 0 {
            p.step += 1;
            let width = p.total.ilog10() as usize + 1;
            name.push('[');
            if !p.stage_label.is_empty() {
                name.push_str(&p.stage_label);
                name.push(' ');
            }
            let _ = write!(name, "{:>width$}/{}] ", p.step, p.total);
            if p.in_trigger {
                name.push_str("ONBUILD ");
            }
        }
        name.push_str(text);
        Meta {
            name,
            stage: Some(p.display.clone()),
            location: self.location(loc),
            ignore_cache: p.ignore_cache,
        }
    }

    fn context_source(&mut self) -> Digest {
        if let Some(d) = self.context {
            return d;
        }
        let op = Op::Source(SourceOp::Local(LocalSource {
            name: "context".into(),
            include: Vec::new(),
            exclude: self.opts.dockerignore.clone(),
        }));
        let meta = Meta {
            name: "[internal] load build context".into(),
            ..Meta::default()
        };
        let d = self.add(op, Vec::new(), meta);
        self.context = Some(d);
        d
    }

    fn resolve_image(
        &mut self,
        loc: &Located,
        reference: &str,
        platform: &Platform,
    ) -> Result<ResolvedImage, FrontendError> {
        let key = format!("{reference} {platform}");
        if let Some(r) = self.resolved.get(&key) {
            return Ok(r.clone());
        }
        let r = self.resolver.resolve(reference, platform).map_err(|source| {
            self.err(
                loc,
                Some(reference),
                LowerError::ResolveImage {
                    reference: reference.to_string(),
                    source,
                },
            )
        })?;
        self.resolved.insert(key, r.clone());
        Ok(r)
    }

    fn image_vertex(&mut self, r: &ResolvedImage, platform: &Platform, meta: Meta) -> Digest {
        let op = Op::Source(SourceOp::Image(ImageSource {
            reference: r.reference.clone(),
            resolved_digest: r.digest,
            platform: platform.clone(),
        }));
        self.add(op, Vec::new(), meta)
    }

    // ----- planning -----------------------------------------------------------------------

    pub fn run(&mut self, instructions: Vec<Located>) -> Result<Lowered, FrontendError> {
        let (globals, raw_stages) = stages::split(instructions).map_err(|ins| {
            let keyword = ins
                .original
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            self.err(&ins, None, LowerError::InstructionBeforeFrom { keyword })
        })?;
        if raw_stages.is_empty() {
            return Err(self.bare_err(LowerError::NoStages));
        }
        // TARGETSTAGE: the stage being built, `default` when it has no name.
        let target_name = match &self.opts.target {
            Some(t) => t.clone(),
            None => match raw_stages.last().map(|(from, _)| &from.instruction) {
                Some(Instruction::From { name: Some(n), .. }) => n.clone(),
                _ => "default".to_string(),
            },
        };
        self.global_args = self.predefined_args(&target_name);
        self.check_default_base_names(&globals, &raw_stages);
        let mut prev_end = 0;
        for g in &globals {
            let comments = lint::prev_comments(
                &self.source_lines.iter().map(String::as_str).collect::<Vec<_>>(),
                g.span.start_line,
                prev_end,
            );
            prev_end = g.span.end_line;
            let Instruction::Arg(pairs) = &g.instruction else {
                continue;
            };
            for (key, default) in pairs {
                let mut deps = BTreeSet::new();
                let value = match self.opts.build_args.get(key) {
                    Some(v) => Some(v.clone()),
                    None => match default {
                        Some(d) => {
                            let (v, matched) = self.expand_global(g, d)?;
                            deps = matched;
                            Some(v)
                        }
                        None => None,
                    },
                };
                if let Some(v) = &value {
                    env_set(&mut self.global_args, key, v);
                }
                self.global_decl.retain(|a| &a.name != key);
                self.global_decl.push(GlobalArg {
                    name: key.clone(),
                    value,
                    description: lint::description_for(&comments, key),
                    line: g.span.start_line,
                    deps,
                });
            }
        }
        self.plan_stages(raw_stages)?;
        self.single_stage = self.stages.len() == 1;
        let target = self.find_target()?;
        self.plan_dependencies()?;
        let mut reachable = self.resolve_triggers(target)?;
        if self.opts.all_stages {
            for i in 0..self.stages.len() {
                reachable.extend(self.resolve_triggers(i)?);
            }
        }
        self.done = vec![None; self.stages.len()];
        for index in reachable.iter().copied() {
            self.lower_stage(index)?;
        }
        if let Some(rules) = self.lint.violations() {
            return Err(self.bare_err(LowerError::LintViolation { rules }));
        }
        let outline = self.outline(target);
        let Some(mut state) = self.done[target].take() else {
            return Err(self.bare_err(LowerError::NoStages));
        };
        if !self.opts.labels.is_empty() {
            let labels = state.config.config.labels.get_or_insert_with(BTreeMap::new);
            labels.extend(self.opts.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let mut proxy_env: Vec<String> = self
            .opts
            .build_args
            .iter()
            .filter(|(k, _)| PROXY_ARGS.contains(&k.to_ascii_lowercase().as_str()))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        proxy_env.sort();
        Ok(Lowered {
            graph: std::mem::take(&mut self.graph),
            root: state.fs,
            config: state.config,
            warnings: self.lint.take_warnings(),
            stage_name: self.stages[target].name.clone(),
            proxy_env,
            context: self.context,
            outline,
        })
    }

    /// Expands a global ARG's default in the global scope; also returns the global ARGs it used.
    fn expand_global(&self, loc: &Located, word: &str) -> Result<(String, BTreeSet<String>), FrontendError> {
        let env = &self.global_args;
        let lookup = |k: &str| env_get(env, k).map(str::to_string);
        let ex = self
            .lexer
            .process_word_with_matches(word, &lookup)
            .map_err(|source| {
                self.err(
                    loc,
                    Some(word),
                    LowerError::Expand {
                        word: word.to_string(),
                        source,
                    },
                )
            })?;
        Ok((ex.result, ex.matched))
    }

    /// InvalidDefaultArgInFrom: each FROM, expanded with the global ARGs' defaults alone (no
    /// `--build-arg`), must name a valid image.
    fn check_default_base_names(&mut self, globals: &[Located], raw: &[stages::RawStage]) {
        let mut env = self.global_args.clone();
        for g in globals {
            let Instruction::Arg(pairs) = &g.instruction else {
                continue;
            };
            for (key, default) in pairs {
                if let Some(d) = default {
                    let lookup = |k: &str| env_get(&env, k).map(str::to_string);
                    let Ok(v) = self.lexer.process_word(d, &lookup) else {
                        return;
                    };
                    env_set(&mut env, key, &v);
                }
            }
        }
        for (from, _) in raw {
            let Instruction::From { image, .. } = &from.instruction else {
                continue;
            };
            let lookup = |k: &str| env_get(&env, k).map(str::to_string);
            let Ok(name) = self.lexer.process_word(image, &lookup) else {
                return;
            };
            if !lint::valid_reference(&name) {
                self.warn(
                    &lint::INVALID_DEFAULT_ARG_IN_FROM,
                    format!("Default value for ARG {image} results in empty or invalid base image name"),
                    from.span,
                );
            }
        }
    }

    /// The outline of `target`: the ARGs, secrets and SSH sockets of the stages it needs,
    /// each name once (the target's own first), in Dockerfile order.
    fn outline(&self, target: usize) -> Outline {
        // The target, then its base chain, then the other stages it needs.
        let mut order = vec![target];
        let mut cur = target;
        while let Base::Stage(b) = self.stages[cur].base {
            order.push(b);
            cur = b;
        }
        for i in stages::reachable(&self.stages, target) {
            if !order.contains(&i) {
                order.push(i);
            }
        }
        let mut out = Outline {
            name: self.stages[target].name.clone().unwrap_or_default(),
            description: self.stage_description(target),
            ..Outline::default()
        };
        let mut seen_args = BTreeSet::new();
        let (mut seen_secrets, mut seen_ssh) = (BTreeSet::new(), BTreeSet::new());
        let mut globals_used = BTreeSet::new();
        for i in &order {
            let Some(st) = self.done.get(*i).and_then(Option::as_ref) else {
                continue;
            };
            for a in &st.outline.args {
                if seen_args.insert(a.name.clone()) {
                    out.args.push(a.clone());
                }
            }
            globals_used.extend(st.outline.globals.iter().cloned());
            for m in &st.outline.secrets {
                if seen_secrets.insert(m.name.clone()) {
                    out.secrets.push(m.clone());
                }
            }
            for m in &st.outline.ssh {
                if seen_ssh.insert(m.name.clone()) {
                    out.ssh.push(m.clone());
                }
            }
        }
        // Global ARGs used, and the global ARGs their defaults use.
        let mut todo: Vec<String> = globals_used.into_iter().collect();
        let mut used = BTreeSet::new();
        while let Some(name) = todo.pop() {
            if !used.insert(name.clone()) {
                continue;
            }
            if let Some(g) = self.global_decl.iter().find(|g| g.name == name) {
                todo.extend(g.deps.iter().cloned());
            }
        }
        for g in &self.global_decl {
            if used.contains(&g.name) && seen_args.insert(g.name.clone()) {
                out.args.push(OutlineArg {
                    name: g.name.clone(),
                    value: g.value.clone().unwrap_or_default(),
                    description: g.description.clone(),
                    line: g.line,
                });
            }
        }
        out.args.sort_by_key(|a| a.line);
        out.secrets.sort_by_key(|m| m.line);
        out.ssh.sort_by_key(|m| m.line);
        out
    }

    /// The `# name description` comment above a stage's FROM.
    fn stage_description(&self, i: usize) -> String {
        let Some(name) = &self.stages[i].name else {
            return String::new();
        };
        let from = &self.stages[i].from;
        let prev_end = self.prev_end_line(from.span.start_line);
        let lines: Vec<&str> = self.source_lines.iter().map(String::as_str).collect();
        lint::description_for(&lint::prev_comments(&lines, from.span.start_line, prev_end), name)
    }

    /// The last line of the instruction before the one starting at `line` (0 if none).
    fn prev_end_line(&self, line: u32) -> u32 {
        let mut end = 0;
        for st in &self.stages {
            for l in std::iter::once(&st.from).chain(st.body.iter()) {
                if l.span.end_line < line {
                    end = end.max(l.span.end_line);
                }
            }
        }
        end
    }

    /// The automatic global ARGs: the target and build platforms, and TARGETSTAGE.
    fn predefined_args(&self, target_stage: &str) -> Env {
        let mut env = Env::new();
        for (prefix, p) in [
            ("TARGET", &self.opts.platform),
            ("BUILD", &self.opts.build_platform),
        ] {
            let variant = p.variant.clone().unwrap_or_default();
            env.push((format!("{prefix}PLATFORM"), p.to_string()));
            env.push((format!("{prefix}OS"), p.os.clone()));
            env.push((format!("{prefix}ARCH"), p.architecture.clone()));
            env.push((format!("{prefix}VARIANT"), variant.clone()));
        }
        env.push(("TARGETSTAGE".into(), target_stage.to_string()));
        env
    }

    fn plan_stages(&mut self, raw: Vec<stages::RawStage>) -> Result<(), FrontendError> {
        let globals = self.global_args.clone();
        for (index, (from, body)) in raw.into_iter().enumerate() {
            let Instruction::From {
                image,
                name,
                platform,
            } = &from.instruction
            else {
                continue;
            };
            // Names a FROM may use: the automatic ARGs and every global ARG, with a value or not.
            let mut known: Vec<String> = globals.iter().map(|(k, _)| k.clone()).collect();
            known.extend(self.global_decl.iter().map(|g| g.name.clone()));
            let lookup = |k: &str| env_get(&globals, k).map(str::to_string);
            let name_match = self.lexer.process_word_with_matches(image, &lookup);
            if let Ok(m) = &name_match {
                self.report_from_args(&from, &m.unmatched, &known);
            }
            let name_match = name_match.map_err(|source| {
                self.err(
                    &from,
                    Some(image),
                    LowerError::Expand {
                        word: image.clone(),
                        source,
                    },
                )
            })?;
            let mut from_args = name_match.matched.clone();
            let base_name = name_match.result;
            if base_name.is_empty() {
                return Err(self.err(
                    &from,
                    Some(image),
                    LowerError::BlankBaseName { image: image.clone() },
                ));
            }
            let platform = match platform {
                Some(p) => {
                    let m = self.lexer.process_word_with_matches(p, &lookup);
                    if let Ok(m) = &m {
                        self.report_from_args(&from, &m.unmatched, &known);
                        self.check_from_platform(&from, p, m, name.as_deref().unwrap_or(""), &globals);
                    }
                    let m = m.map_err(|source| {
                        self.err(
                            &from,
                            Some(p),
                            LowerError::Expand {
                                word: p.clone(),
                                source,
                            },
                        )
                    })?;
                    from_args.extend(m.matched.iter().cloned());
                    let v = m.result;
                    Some(Platform::parse(&v).map_err(|reason| {
                        self.err(
                            &from,
                            Some(p),
                            LowerError::BadPlatform {
                                value: v.clone(),
                                reason,
                            },
                        )
                    })?)
                }
                None => None,
            };
            let lower = base_name.to_ascii_lowercase();
            let base = if let Some(i) = self
                .stages
                .iter()
                .position(|s| s.name.as_deref().map(str::to_ascii_lowercase) == Some(lower.clone()))
            {
                Base::Stage(i)
            } else if self.opts.named_contexts.contains_key(&base_name) {
                Base::Context(base_name.clone())
            } else if lower == "scratch" {
                Base::Scratch
            } else {
                Base::Image(base_name.clone())
            };
            let replaced = name
                .as_ref()
                .is_some_and(|n| self.opts.named_contexts.contains_key(n));
            let mut deps = BTreeSet::new();
            if let Base::Stage(i) = base {
                deps.insert(i);
            }
            self.stages.push(Stage {
                index,
                name: name.clone(),
                from: from.clone(),
                body,
                triggers: 0,
                base,
                platform,
                deps,
                replaced,
                from_args,
            });
        }
        Ok(())
    }

    /// UndefinedArgInFrom: a FROM line's variables must be global ARGs (or automatic ones).
    fn report_from_args(&mut self, from: &Located, unmatched: &BTreeSet<String>, known: &[String]) {
        for arg in unmatched {
            if known.contains(arg) {
                continue;
            }
            let message = match lint::suggest(arg, known) {
                Some(s) => format!("FROM argument '{arg}' is not declared (did you mean {s}?)"),
                None => format!("FROM argument '{arg}' is not declared"),
            };
            self.warn(&lint::UNDEFINED_ARG_IN_FROM, message, from.span);
        }
    }

    /// RedundantTargetPlatform and FromPlatformFlagConstDisallowed on `FROM --platform=`.
    fn check_from_platform(
        &mut self,
        from: &Located,
        written: &str,
        m: &crate::shell::Expanded,
        stage_name: &str,
        globals: &Env,
    ) {
        if m.matched.len() == 1
            && m.unmatched.is_empty()
            && m.matched.contains("TARGETPLATFORM")
            && env_get(globals, "TARGETPLATFORM") == Some(m.result.as_str())
        {
            self.warn(
                &lint::REDUNDANT_TARGET_PLATFORM,
                format!("Setting platform to predefined {written} in FROM is redundant as this is the default behavior"),
                from.span,
            );
        }
        if !m.matched.is_empty() || !m.unmatched.is_empty() {
            return;
        }
        let Ok(p) = Platform::parse(&m.result) else {
            return;
        };
        if stage_name.contains(&p.os) || stage_name.contains(&p.architecture) {
            return;
        }
        self.warn(
            &lint::FROM_PLATFORM_FLAG_CONST_DISALLOWED,
            format!(
                "FROM --platform flag should not use constant value {}",
                crate::parser::gotext::quote(&m.result)
            ),
            from.span,
        );
    }

    fn find_target(&self) -> Result<usize, FrontendError> {
        let Some(t) = &self.opts.target else {
            return Ok(self.stages.len() - 1);
        };
        let lower = t.to_ascii_lowercase();
        if let Some(i) = self
            .stages
            .iter()
            .position(|s| s.name.as_deref().map(str::to_ascii_lowercase) == Some(lower.clone()))
        {
            return Ok(i);
        }
        let names: Vec<&str> = self.stages.iter().filter_map(|s| s.name.as_deref()).collect();
        Err(self.bare_err(LowerError::UnknownTarget {
            target: t.clone(),
            suggestion: suggest(t, names),
        }))
    }

    fn lookup_from(&self, from: &str) -> Result<FromRef, LowerError> {
        if let Ok(i) = from.parse::<usize>() {
            return if i < self.stages.len() {
                Ok(FromRef::Stage(i))
            } else {
                Err(LowerError::BadStageIndex {
                    index: from.to_string(),
                })
            };
        }
        if from.starts_with('-') && from[1..].parse::<usize>().is_ok() {
            return Err(LowerError::BadStageIndex {
                index: from.to_string(),
            });
        }
        let lower = from.to_ascii_lowercase();
        if let Some(i) = self
            .stages
            .iter()
            .position(|s| s.name.as_deref().map(str::to_ascii_lowercase) == Some(lower.clone()))
        {
            return Ok(FromRef::Stage(i));
        }
        if let Some(nc) = self.opts.named_contexts.get(from) {
            return Ok(FromRef::Context(nc.clone()));
        }
        Ok(FromRef::Image(from.to_string()))
    }

    /// The stages an instruction reads through `--from` / mount `from`.
    fn instruction_deps(&self, loc: &Located) -> Result<Vec<usize>, FrontendError> {
        let mut out = Vec::new();
        let mut check = |from: &str| -> Result<(), FrontendError> {
            if from.contains('$') {
                let plain = self.lexer.process_word(from, &|_: &str| None).unwrap_or_default();
                if plain != from {
                    return Err(self.err(
                        loc,
                        Some(from),
                        LowerError::FromVariable {
                            from: from.to_string(),
                        },
                    ));
                }
            }
            match self.lookup_from(from).map_err(|k| self.err(loc, Some(from), k))? {
                FromRef::Stage(i) => out.push(i),
                FromRef::Context(_) | FromRef::Image(_) => {}
            }
            Ok(())
        };
        match &loc.instruction {
            Instruction::Copy(spec) => {
                if let Some(f) = &spec.from {
                    check(f)?;
                }
            }
            Instruction::Run { mounts, .. } => {
                for m in mounts {
                    for (k, v) in &m.options {
                        if k.eq_ignore_ascii_case("from") {
                            if let Some(v) = v {
                                check(v)?;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(out)
    }

    fn plan_dependencies(&mut self) -> Result<(), FrontendError> {
        for i in 0..self.stages.len() {
            let mut deps = Vec::new();
            for loc in &self.stages[i].body {
                deps.extend(self.instruction_deps(loc)?);
            }
            self.stages[i].deps.extend(deps);
        }
        if let Some(s) = stages::find_cycle(&self.stages) {
            let stage = self.stages[s].display_name();
            return Err(self.err(&self.stages[s].from.clone(), None, LowerError::Circular { stage }));
        }
        Ok(())
    }

    /// Reachability, with ONBUILD triggers of reachable stages added (they may add deps).
    fn resolve_triggers(&mut self, target: usize) -> Result<BTreeSet<usize>, FrontendError> {
        loop {
            let reachable = stages::reachable(&self.stages, target);
            let mut new_deps = false;
            for &i in &reachable {
                if !self.triggers_done.insert(i) || self.stages[i].replaced {
                    continue;
                }
                let triggers: Vec<String> = match self.stages[i].base.clone() {
                    Base::Stage(b) => self.stages[b]
                        .body
                        .iter()
                        .skip(self.stages[b].triggers)
                        .filter_map(|l| match &l.instruction {
                            Instruction::Onbuild(t) => Some(t.clone()),
                            _ => None,
                        })
                        .collect(),
                    Base::Image(reference) => {
                        let platform = self.stage_platform(i);
                        let from = self.stages[i].from.clone();
                        let r = self.resolve_image(&from, &reference, &platform)?;
                        r.config.config.on_build.clone().unwrap_or_default()
                    }
                    Base::Context(name) => match self.opts.named_contexts.get(&name).cloned() {
                        Some(NamedContext::Image { reference }) => {
                            let platform = self.stage_platform(i);
                            let from = self.stages[i].from.clone();
                            let r = self.resolve_image(&from, &reference, &platform)?;
                            r.config.config.on_build.clone().unwrap_or_default()
                        }
                        _ => Vec::new(),
                    },
                    Base::Scratch => Vec::new(),
                };
                if triggers.is_empty() {
                    continue;
                }
                let from = self.stages[i].from.clone();
                let mut parsed = Vec::new();
                for t in &triggers {
                    let mut loc = (self.parse_trigger)(t).map_err(|message| {
                        self.err(
                            &from,
                            None,
                            LowerError::TriggerParse {
                                trigger: t.clone(),
                                message,
                            },
                        )
                    })?;
                    let keyword = match &loc.instruction {
                        Instruction::Onbuild(_) => Some("ONBUILD"),
                        Instruction::From { .. } => Some("FROM"),
                        Instruction::Maintainer(_) => Some("MAINTAINER"),
                        _ => None,
                    };
                    if let Some(keyword) = keyword {
                        return Err(self.err(
                            &from,
                            None,
                            LowerError::BadOnbuild {
                                keyword: keyword.into(),
                            },
                        ));
                    }
                    loc.span = from.span;
                    let deps = self.instruction_deps(&loc)?;
                    if !deps.is_empty() {
                        new_deps = true;
                    }
                    self.stages[i].deps.extend(deps);
                    parsed.push(loc);
                }
                let stage = &mut self.stages[i];
                stage.triggers = parsed.len();
                parsed.append(&mut stage.body);
                stage.body = parsed;
            }
            if !new_deps {
                if let Some(s) = stages::find_cycle(&self.stages) {
                    let stage = self.stages[s].display_name();
                    return Err(self.err(&self.stages[s].from.clone(), None, LowerError::Circular { stage }));
                }
                return Ok(reachable);
            }
        }
    }

    fn stage_platform(&self, i: usize) -> Platform {
        self.stages[i]
            .platform
            .clone()
            .unwrap_or_else(|| self.opts.platform.clone())
    }

    // ----- stage lowering -------------------------------------------------------------------

    fn empty_config(platform: &Platform) -> ImageConfig {
        let mut c = ImageConfig {
            architecture: platform.architecture.clone(),
            os: platform.os.clone(),
            variant: platform.variant.clone(),
            ..ImageConfig::default()
        };
        c.config.working_dir = "/".into();
        c.config.env = Some(vec![format!("PATH={DEFAULT_PATH}")]);
        c
    }

    fn lower_stage(&mut self, index: usize) -> Result<(), FrontendError> {
        // The body is moved out while it is dispatched (and put back after), not copied.
        let mut stage = self.stages[index].clone_without_body();
        stage.body = std::mem::take(&mut self.stages[index].body);
        let display = stage.display_name();
        let ignore_cache = self.opts.no_cache_filter.iter().any(|f| {
            f.eq_ignore_ascii_case(&display)
                || stage.name.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(f))
                || f == &index.to_string()
        });
        let image_step = matches!(stage.base, Base::Image(_));
        let counted = stage
            .body
            .iter()
            .enumerate()
            .filter(|(i, l)| {
                *i < stage.triggers
                    || matches!(
                        l.instruction,
                        Instruction::Run { .. }
                            | Instruction::Copy(_)
                            | Instruction::Add(_)
                            | Instruction::Workdir(_)
                    )
            })
            .count();
        let mut p = Progress {
            display: display.clone(),
            stage_label: match (self.opts.prefix_platform, self.single_stage) {
                (true, true) => self.stage_platform(index).to_string(),
                (true, false) => format!("{} {display}", self.stage_platform(index)),
                (false, true) => String::new(),
                (false, false) => display.clone(),
            },
            total: counted + usize::from(image_step),
            step: 0,
            ignore_cache,
            cmd_at: None,
            entrypoint_at: None,
            healthcheck_at: None,
            in_trigger: false,
        };
        let platform = self.stage_platform(index);
        let mut st = if stage.replaced {
            let Some(nc) = stage
                .name
                .as_ref()
                .and_then(|n| self.opts.named_contexts.get(n))
                .cloned()
            else {
                return Err(self.bare_err(LowerError::NoStages));
            };
            let st = self.context_state(&stage.from, &nc, &platform, &p, true)?;
            self.stages[index].body = stage.body;
            self.done[index] = Some(st);
            return Ok(());
        } else {
            match &stage.base {
                Base::Stage(b) => match self.done.get(*b).cloned().flatten() {
                    Some(mut s) => {
                        s.config.config.on_build = None;
                        // The parent's ARG values stay in the environment, but its declarations
                        // are its own: the child's RUN history lists only the child's ARGs.
                        s.args.clear();
                        // What the stage adds to the outline is its own; the base's is counted
                        // with the base.
                        s.outline = StageOutline::default();
                        s
                    }
                    None => {
                        let from = self.stages[*b].display_name();
                        return Err(self.err(
                            &stage.from,
                            None,
                            LowerError::LaterStage { from, stage: display },
                        ));
                    }
                },
                Base::Scratch => {
                    let fs = self.add(Op::Source(SourceOp::Scratch), Vec::new(), Meta::default());
                    StageState::new(fs, Self::empty_config(&platform))
                }
                Base::Context(name) => {
                    let Some(nc) = self.opts.named_contexts.get(name).cloned() else {
                        return Err(self.bare_err(LowerError::NoStages));
                    };
                    self.context_state(&stage.from, &nc, &platform, &p, true)?
                }
                Base::Image(reference) => {
                    let r = self.resolve_image(&stage.from, reference, &platform)?;
                    self.check_base_platform(&stage.from, reference, &platform, &r);
                    let shown = match &r.digest {
                        Some(d) => format!("FROM {}@{}", r.reference, d),
                        None => format!("FROM {}", r.reference),
                    };
                    let meta = self.step_meta(&mut p, &stage.from, &shown);
                    let fs = self.image_vertex(&r, &platform, meta);
                    let mut config = r.config.clone();
                    config.created = None;
                    config.config.on_build = None;
                    StageState::new(fs, config)
                }
            }
        };
        st.outline.globals.extend(stage.from_args.iter().cloned());
        if !matches!(stage.base, Base::Stage(_)) {
            if st.config.config.env_get("PATH").is_none() {
                st.config.config.env_set("PATH", DEFAULT_PATH);
            }
            st.run_env = env_from_config(&st.config);
        }
        for (i, loc) in stage.body.iter().enumerate() {
            p.in_trigger = i < stage.triggers;
            self.dispatch(index, &mut st, &mut p, loc)?;
        }
        self.stages[index].body = stage.body;
        self.done[index] = Some(st);
        Ok(())
    }

    /// InvalidBaseImagePlatform: the image found for a FROM is of another OS or architecture
    /// than the stage is built for.
    fn check_base_platform(&mut self, from: &Located, name: &str, expected: &Platform, r: &ResolvedImage) {
        let c = &r.config;
        if c.os.is_empty() || c.architecture.is_empty() {
            return;
        }
        let want =
            lint::normalize_platform(&expected.os, &expected.architecture, expected.variant.as_deref());
        let got = lint::normalize_platform(&c.os, &c.architecture, c.variant.as_deref());
        let os_arch = |p: &str| p.split('/').take(2).collect::<Vec<_>>().join("/");
        if os_arch(&want) == os_arch(&got) {
            return;
        }
        self.warn(
            &lint::INVALID_BASE_IMAGE_PLATFORM,
            format!(
                "Base image {name} was pulled with platform {}, expected {} for current build",
                crate::parser::gotext::quote(&got),
                crate::parser::gotext::quote(&want)
            ),
            from.span,
        );
    }

    /// The state a named context gives. `as_rootfs`: the context is a stage's base (`FROM
    /// name`), so a local directory is copied into a filesystem of its own; as a `--from`
    /// source it is read in place.
    fn context_state(
        &mut self,
        loc: &Located,
        nc: &NamedContext,
        platform: &Platform,
        p: &Progress,
        as_rootfs: bool,
    ) -> Result<StageState, FrontendError> {
        match nc {
            NamedContext::Local { name } => {
                let op = Op::Source(SourceOp::Local(LocalSource {
                    name: name.clone(),
                    include: Vec::new(),
                    exclude: Vec::new(),
                }));
                let mut fs = self.internal(op, Vec::new(), &format!("load build context {name}"), p);
                if as_rootfs {
                    let copy = Op::File(FileOp {
                        input: None,
                        actions: vec![FileAction::Copy(CopyAction {
                            source_input: 0,
                            src: "/".into(),
                            dest: "/".into(),
                            owner: None,
                            mode: None,
                            follow_symlinks: false,
                            dir_contents_only: true,
                            allow_wildcard: false,
                            allow_empty_wildcard: false,
                            create_dest_path: true,
                            dest_is_dir: true,
                            attempt_unpack: false,
                            exclude: Vec::new(),
                            parents: false,
                        })],
                    });
                    fs = self.internal(copy, vec![fs], &format!("copy build context {name}"), p);
                }
                let config = Self::empty_config(platform);
                let run_env = env_from_config(&config);
                let mut st = StageState::new(fs, config);
                st.run_env = run_env;
                Ok(st)
            }
            NamedContext::Git {
                remote,
                reference,
                subdir,
                keep_git_dir,
            } => {
                let op = Op::Source(SourceOp::Git(GitSource {
                    remote: remote.clone(),
                    reference: reference.clone(),
                    subdir: subdir.clone(),
                    keep_git_dir: *keep_git_dir,
                }));
                let fs = self.internal(
                    op,
                    Vec::new(),
                    &format!("load git source {remote}#{reference}"),
                    p,
                );
                let config = Self::empty_config(platform);
                let run_env = env_from_config(&config);
                let mut st = StageState::new(fs, config);
                st.run_env = run_env;
                Ok(st)
            }
            NamedContext::Image { reference } => {
                let r = self.resolve_image(loc, reference, platform)?;
                let meta = Meta {
                    name: format!("[internal] load {}", r.reference),
                    stage: Some(p.display.clone()),
                    ..Meta::default()
                };
                let fs = self.image_vertex(&r, platform, meta);
                let mut config = r.config.clone();
                config.created = None;
                let run_env = env_from_config(&config);
                let mut st = StageState::new(fs, config);
                st.run_env = run_env;
                Ok(st)
            }
        }
    }

    /// The filesystem a `--from` names, for the stage `current` being lowered.
    fn source_for_from(
        &mut self,
        current: usize,
        loc: &Located,
        from: &str,
        p: &Progress,
    ) -> Result<Digest, FrontendError> {
        match self.lookup_from(from).map_err(|k| self.err(loc, Some(from), k))? {
            FromRef::Stage(i) => match self.done.get(i).and_then(Option::as_ref).map(|s| s.fs) {
                Some(fs) if i != current => Ok(fs),
                _ => Err(self.err(
                    loc,
                    Some(from),
                    LowerError::LaterStage {
                        from: from.to_string(),
                        stage: self.stages[current].display_name(),
                    },
                )),
            },
            FromRef::Context(nc) => {
                let platform = self.stage_platform(current);
                Ok(self.context_state(loc, &nc, &platform, p, false)?.fs)
            }
            FromRef::Image(reference) => {
                let platform = self.stage_platform(current);
                let r = self.resolve_image(loc, &reference, &platform)?;
                let meta = Meta {
                    name: format!("[internal] load {}", r.reference),
                    stage: Some(p.display.clone()),
                    ..Meta::default()
                };
                Ok(self.image_vertex(&r, &platform, meta))
            }
        }
    }

    fn history(st: &mut StageState, created_by: String, layer: bool) {
        st.config.history.push(History {
            created_by: Some(created_by),
            comment: Some(HISTORY_COMMENT.into()),
            empty_layer: !layer,
            ..History::default()
        });
    }

    fn display_text(loc: &Located) -> String {
        let text = loc.original.trim();
        match text.split_once(char::is_whitespace) {
            Some((kw, rest)) => format!("{} {}", kw.to_ascii_uppercase(), rest.trim_start()),
            None => text.to_ascii_uppercase(),
        }
    }

    fn with_shell(config: &ImageConfig, text: &str) -> Vec<String> {
        let mut args = match &config.config.shell {
            Some(s) if !s.is_empty() => s.clone(),
            _ => vec!["/bin/sh".to_string(), "-c".to_string()],
        };
        args.push(text.to_string());
        args
    }

    // ----- instructions ---------------------------------------------------------------------

    fn dispatch(
        &mut self,
        stage: usize,
        st: &mut StageState,
        p: &mut Progress,
        loc: &Located,
    ) -> Result<(), FrontendError> {
        match &loc.instruction {
            Instruction::From { .. } => Ok(()),
            Instruction::Env(pairs) => {
                // Every pair sees the environment from before the instruction.
                // Every pair is expanded before any is set.
                let mut expanded = Vec::with_capacity(pairs.len());
                for (k, v) in pairs {
                    expanded.push((self.expand_in(loc, k, st)?, self.expand_in(loc, v, st)?));
                }
                let legacy = lint::is_legacy_key_value(&loc.original, self.lexer.escape());
                for (k, _) in &expanded {
                    if legacy {
                        self.warn(&lint::LEGACY_KEY_VALUE_FORMAT, legacy_message("ENV"), loc.span);
                    }
                    self.check_secret_key("ENV", k, loc);
                }
                let mut msg = String::from("ENV");
                for (k, v) in expanded {
                    msg.push(' ');
                    msg.push_str(&k);
                    msg.push('=');
                    msg.push_str(&v);
                    env_set(&mut st.run_env, &k, &v);
                    st.config.config.env_set(&k, &v);
                }
                Self::history(st, msg, false);
                Ok(())
            }
            Instruction::Label(pairs) => {
                let mut msg = String::from("LABEL");
                let mut expanded = Vec::new();
                for (k, v) in pairs {
                    expanded.push((self.expand_in(loc, k, st)?, self.expand_in(loc, v, st)?));
                }
                if lint::is_legacy_key_value(&loc.original, self.lexer.escape()) {
                    for _ in &expanded {
                        self.warn(&lint::LEGACY_KEY_VALUE_FORMAT, legacy_message("LABEL"), loc.span);
                    }
                }
                let labels = st.config.config.labels.get_or_insert_with(BTreeMap::new);
                for (k, v) in expanded {
                    msg.push_str(&format!(" {k}={v}"));
                    labels.insert(k, v);
                }
                Self::history(st, msg, false);
                Ok(())
            }
            Instruction::Maintainer(m) => {
                st.config.author = Some(m.clone());
                Self::history(st, format!("MAINTAINER {m}"), false);
                Ok(())
            }
            Instruction::Cmd(cl) | Instruction::Entrypoint(cl) => {
                let is_cmd = matches!(loc.instruction, Instruction::Cmd(_));
                let kw = if is_cmd { "CMD" } else { "ENTRYPOINT" };
                let previous = if is_cmd { p.cmd_at } else { p.entrypoint_at };
                if let Some(prev) = previous {
                    // At the instruction that gets ignored: the earlier one.
                    self.warn(
                        &lint::MULTIPLE_INSTRUCTIONS_DISALLOWED,
                        format!("Multiple {kw} instructions should not be used in the same stage because only the last one will be used"),
                        prev,
                    );
                }
                let args = match cl {
                    CommandLine::Exec(a) => a.clone(),
                    CommandLine::Shell(t) => {
                        if st.config.config.shell.as_ref().is_none_or(Vec::is_empty) {
                            self.warn(
                                &lint::JSON_ARGS_RECOMMENDED,
                                format!("JSON arguments recommended for {kw} to prevent unintended behavior related to OS signals"),
                                loc.span,
                            );
                        }
                        Self::with_shell(&st.config, t)
                    }
                };
                let msg = format!("{kw} {}", values::go_quote_list(&args));
                // An empty list is no command at all: BuildKit's config has `null`, not `[]`.
                let args = Some(args).filter(|a| !a.is_empty());
                if is_cmd {
                    p.cmd_at = Some(loc.span);
                    st.config.config.cmd = args;
                    st.config.config.args_escaped = true;
                } else {
                    p.entrypoint_at = Some(loc.span);
                    st.config.config.entrypoint = args;
                    if p.cmd_at.is_none() {
                        st.config.config.cmd = None;
                    }
                }
                Self::history(st, msg, false);
                Ok(())
            }
            Instruction::Expose(ports) => {
                let mut set = BTreeMap::new();
                // EXPOSE alone splits a value that expands to several words into several
                // ports (BuildKit's ProcessWords), so `EXPOSE $PORTS` with `80 443/udp` exposes two.
                let mut words = Vec::new();
                for port in ports {
                    let env = &st.run_env;
                    let lookup = |k: &str| env_get(env, k).map(str::to_string);
                    let split = self.lexer.process_words(port, &lookup).map_err(|source| {
                        self.err(
                            loc,
                            Some(port),
                            LowerError::Expand {
                                word: port.clone(),
                                source,
                            },
                        )
                    })?;
                    words.extend(split);
                }
                for v in &words {
                    let keys = values::parse_ports(v).map_err(|reason| {
                        self.err(
                            loc,
                            Some(v),
                            LowerError::BadPort {
                                port: v.clone(),
                                reason,
                            },
                        )
                    })?;
                    self.check_expose(v, loc);
                    for k in keys {
                        set.insert(k, ());
                    }
                }
                let exposed = st.config.config.exposed_ports.get_or_insert_with(BTreeMap::new);
                for k in set.keys() {
                    exposed.insert(k.clone(), kiln_dag::image::Empty {});
                }
                Self::history(st, format!("EXPOSE {}", values::go_set(&set)), false);
                Ok(())
            }
            Instruction::Volume(vols) => {
                let mut list = Vec::new();
                for v in vols {
                    let e = self.expand_in(loc, v, st)?;
                    if e.is_empty() {
                        return Err(self.err(loc, None, LowerError::EmptyVolume));
                    }
                    list.push(e);
                }
                let volumes = st.config.config.volumes.get_or_insert_with(BTreeMap::new);
                for v in &list {
                    volumes.insert(v.clone(), kiln_dag::image::Empty {});
                }
                Self::history(st, format!("VOLUME {}", values::go_list(&list)), false);
                Ok(())
            }
            Instruction::User(u) => {
                let u = self.expand_in(loc, u, st)?;
                st.config.config.user = u.clone();
                Self::history(st, format!("USER {u}"), false);
                Ok(())
            }
            Instruction::Stopsignal(s) => {
                let s = self.expand_in(loc, s, st)?;
                if !values::valid_signal(&s) {
                    return Err(self.err(loc, None, LowerError::BadSignal { signal: s }));
                }
                st.config.config.stop_signal = s.clone();
                Self::history(st, format!("STOPSIGNAL {s}"), false);
                Ok(())
            }
            Instruction::Shell(args) => {
                st.config.config.shell = Some(args.clone());
                Self::history(st, format!("SHELL {}", values::go_list(args)), false);
                Ok(())
            }
            Instruction::Onbuild(trigger) => {
                st.config
                    .config
                    .on_build
                    .get_or_insert_with(Vec::new)
                    .push(trigger.clone());
                Ok(())
            }
            Instruction::Healthcheck(h) => {
                if let Some(prev) = p.healthcheck_at {
                    self.warn(
                        &lint::MULTIPLE_INSTRUCTIONS_DISALLOWED,
                        "Multiple HEALTHCHECK instructions should not be used in the same stage because only the last one will be used".into(),
                        prev,
                    );
                }
                p.healthcheck_at = Some(loc.span);
                let hc = self.healthcheck(loc, h)?;
                // BuildKit formats the config pointer with `%q`: `&{[...] "5s" ... '\x02'}`. The
                // reference (Docker 20.10's) has no start interval field; the one newer BuildKit
                // prints after the start period is shown only when `--start-interval` is given.
                let start_interval = match hc.start_interval {
                    0 => String::new(),
                    d => format!("{} ", values::go_quote(&values::go_duration(d))),
                };
                let msg = format!(
                    "HEALTHCHECK &{{{} {} {} {} {}{}}}",
                    values::go_quote_list(&hc.test),
                    values::go_quote(&values::go_duration(hc.interval)),
                    values::go_quote(&values::go_duration(hc.timeout)),
                    values::go_quote(&values::go_duration(hc.start_period)),
                    start_interval,
                    values::go_quote_int(hc.retries)
                );
                st.config.config.healthcheck = Some(hc);
                Self::history(st, msg, false);
                Ok(())
            }
            Instruction::Arg(pairs) => {
                let mut parts = Vec::new();
                let description = if p.in_trigger {
                    Vec::new()
                } else {
                    let lines: Vec<&str> = self.source_lines.iter().map(String::as_str).collect();
                    lint::prev_comments(&lines, loc.span.start_line, 0)
                };
                for (key, default) in pairs {
                    self.check_secret_key("ARG", key, loc);
                    let from_build_arg = self.opts.build_args.contains_key(key);
                    // Expanded whether or not a --build-arg overrides it, as BuildKit expands
                    // the instruction before dispatching it.
                    let default = match default {
                        Some(d) => {
                            let env = &st.run_env;
                            let lookup = |k: &str| env_get(env, k).map(str::to_string);
                            let ex = self
                                .lexer
                                .process_word_with_matches(d, &lookup)
                                .map_err(|source| {
                                    self.err(
                                        loc,
                                        Some(d),
                                        LowerError::Expand {
                                            word: d.clone(),
                                            source,
                                        },
                                    )
                                })?;
                            if !from_build_arg {
                                self.report_undefined(loc, &ex.unmatched, st);
                            }
                            Some(ex.result)
                        }
                        None => None,
                    };
                    let mut value = None;
                    let mut inherited_global = false;
                    if let Some(v) = self.opts.build_args.get(key) {
                        value = Some(v.clone());
                    } else if let Some(d) = &default {
                        value = Some(d.clone());
                    } else if let Some(v) = env_get(&self.global_args, key) {
                        value = Some(v.to_string());
                        inherited_global = true;
                    }
                    if let Some(v) = &value {
                        if !NON_ENV_ARGS.contains(&key.as_str()) {
                            env_set(&mut st.run_env, key, v);
                        }
                    }
                    st.declared.insert(key.clone());
                    if inherited_global {
                        st.outline.globals.insert(key.clone());
                    } else {
                        st.outline.args.retain(|a| &a.name != key);
                        st.outline.args.push(OutlineArg {
                            name: key.clone(),
                            value: value.clone().unwrap_or_default(),
                            description: lint::description_for(&description, key),
                            line: loc.span.start_line,
                        });
                    }
                    // The history shows the instruction's own default (expanded), not the value
                    // a --build-arg gave: `ARG B` stays `ARG B`, as in BuildKit.
                    parts.push(match &default {
                        Some(d) => format!("{key}={d}"),
                        None => key.clone(),
                    });
                    st.args.push((key.clone(), value));
                }
                Self::history(st, format!("ARG {}", parts.join(" ")), false);
                Ok(())
            }
            Instruction::Workdir(path) => {
                let path = self.expand_in(loc, path, st)?;
                if !st.workdir_set && !path.starts_with('/') {
                    self.warn(
                        &lint::WORKDIR_RELATIVE_PATH,
                        format!(
                            "Relative workdir {} can have unexpected results if the base image changes",
                            values::go_quote(&path)
                        ),
                        loc.span,
                    );
                }
                st.workdir_set = true;
                // BuildKit keeps an absolute path as written (`/app/` stays `/app/` in the
                // config and the history) and joins a relative one onto the current directory,
                // cleaned. The directory made, and every use of it, is the cleaned path.
                let written = if path.starts_with('/') {
                    path.clone()
                } else {
                    values::clean_path(&format!("{}/{path}", st.cwd()))
                };
                let wd = values::clean_path(&written);
                st.config.config.working_dir = written.clone();
                let layer = written != "/";
                if layer {
                    let owner = if st.config.config.user.is_empty() {
                        None
                    } else {
                        values::parse_owner(&st.config.config.user).ok()
                    };
                    let op = Op::File(FileOp {
                        input: Some(0),
                        actions: vec![FileAction::Mkdir(MkdirAction {
                            path: wd.clone(),
                            mode: 0o755,
                            make_parents: true,
                            owner,
                        })],
                    });
                    let meta = self.step_meta(p, loc, &format!("WORKDIR {written}"));
                    st.fs = self.add(op, vec![st.fs], meta);
                } else if p.total > 0 {
                    p.step += 1;
                }
                Self::history(st, format!("WORKDIR {written}"), layer);
                Ok(())
            }
            Instruction::Run {
                cmd,
                mounts,
                network,
                security,
                heredocs,
            } => self.dispatch_run(
                stage,
                st,
                p,
                loc,
                cmd,
                mounts,
                network.as_deref(),
                security.as_deref(),
                heredocs,
            ),
            Instruction::Copy(spec) => self.dispatch_copy(stage, st, p, loc, spec, false),
            Instruction::Add(spec) => self.dispatch_copy(stage, st, p, loc, spec, true),
        }
    }

    /// SecretsUsedInArgOrEnv on one ARG / ENV key.
    fn check_secret_key(&mut self, instruction: &str, key: &str, loc: &Located) {
        if lint::looks_secret(key) {
            self.warn(
                &lint::SECRETS_USED_IN_ARG_OR_ENV,
                format!(
                    "Do not use ARG or ENV instructions for sensitive data ({instruction} {})",
                    crate::parser::gotext::quote(key)
                ),
                loc.span,
            );
        }
    }

    /// ExposeProtoCasing and ExposeInvalidFormat on one EXPOSE port as expanded.
    fn check_expose(&mut self, raw: &str, loc: &Located) {
        let parts: Vec<&str> = raw.split(':').collect();
        let container = parts.last().copied().unwrap_or_default();
        let proto = container.split_once('/').map_or("", |(_, p)| p);
        if proto != proto.to_lowercase() {
            self.warn(
                &lint::EXPOSE_PROTO_CASING,
                format!("Defined protocol '{raw}' in EXPOSE instruction should be lowercase"),
                loc.span,
            );
        }
        if parts.len() > 1 {
            self.warn(
                &lint::EXPOSE_INVALID_FORMAT,
                format!(
                    "EXPOSE instruction should not define an IP address or host-port mapping, found '{raw}'"
                ),
                loc.span,
            );
        }
    }

    /// CopyIgnoredFile (experimental): a COPY/ADD source from the build context that
    /// `.dockerignore` excludes. Like BuildKit, not checked when `.dockerignore` re-includes
    /// anything (`!` patterns).
    fn check_ignored_source(&mut self, keyword: &str, src: &str, loc: &Located) {
        if self.opts.dockerignore.is_empty() {
            return;
        }
        let Ok(m) = kiln_patterns::Matcher::new(&self.opts.dockerignore) else {
            return;
        };
        if m.has_exclusions() {
            return;
        }
        // BuildKit matches, and names, the source as `filepath.Clean` leaves it (so `/a` is
        // never matched: the patterns have no leading `/`).
        let clean = values::go_clean(src);
        if m.matches(&clean).unwrap_or(false) {
            let cmd = if keyword == "ADD" { "Add" } else { "Copy" };
            self.warn(
                &lint::COPY_IGNORED_FILE,
                format!(
                    "Attempting to {cmd} file {} that is excluded by .dockerignore",
                    crate::parser::gotext::quote(&clean)
                ),
                loc.span,
            );
        }
    }

    fn healthcheck(&self, loc: &Located, h: &Healthcheck) -> Result<HealthConfig, FrontendError> {
        match h {
            Healthcheck::None => Ok(HealthConfig {
                test: vec!["NONE".into()],
                ..HealthConfig::default()
            }),
            Healthcheck::Cmd {
                cmd,
                interval,
                timeout,
                start_period,
                start_interval,
                retries,
            } => {
                let test = match cmd {
                    CommandLine::Shell(t) => vec!["CMD-SHELL".to_string(), t.clone()],
                    CommandLine::Exec(a) => {
                        if a.is_empty() {
                            return Err(self.err(
                                loc,
                                None,
                                LowerError::EmptyCommand {
                                    instruction: "HEALTHCHECK".into(),
                                },
                            ));
                        }
                        let mut v = vec!["CMD".to_string()];
                        v.extend(a.iter().cloned());
                        v
                    }
                };
                let dur = |flag: &str, v: &Option<String>| -> Result<i64, FrontendError> {
                    let Some(v) = v else { return Ok(0) };
                    let bad = |reason: &str| {
                        self.err(
                            loc,
                            Some(&format!("--{flag}")),
                            LowerError::BadHealthcheck {
                                flag: flag.into(),
                                value: v.clone(),
                                reason: reason.into(),
                            },
                        )
                    };
                    let ns = values::parse_go_duration(v)
                        .ok_or_else(|| bad("not a duration (like 30s or 1m30s)"))?;
                    if ns != 0 && ns < 1_000_000 {
                        return Err(bad("cannot be less than 1ms"));
                    }
                    Ok(ns)
                };
                let retries = match retries {
                    Some(r) => {
                        let n: i64 = r.parse().map_err(|_| {
                            self.err(
                                loc,
                                Some("--retries"),
                                LowerError::BadHealthcheck {
                                    flag: "retries".into(),
                                    value: r.clone(),
                                    reason: "not an integer".into(),
                                },
                            )
                        })?;
                        if n < 0 {
                            return Err(self.err(
                                loc,
                                Some("--retries"),
                                LowerError::BadHealthcheck {
                                    flag: "retries".into(),
                                    value: r.clone(),
                                    reason: "cannot be negative".into(),
                                },
                            ));
                        }
                        n
                    }
                    None => 0,
                };
                Ok(HealthConfig {
                    test,
                    interval: dur("interval", interval)?,
                    timeout: dur("timeout", timeout)?,
                    start_period: dur("start-period", start_period)?,
                    start_interval: dur("start-interval", start_interval)?,
                    retries,
                })
            }
        }
    }

    fn exec_env(st: &StageState) -> Vec<String> {
        let mut env: Vec<String> = Vec::with_capacity(st.run_env.len() + 1);
        env.extend(st.run_env.iter().map(|(k, v)| {
            let mut kv = String::with_capacity(k.len() + 1 + v.len());
            kv.push_str(k);
            kv.push('=');
            kv.push_str(v);
            kv
        }));
        if env_get(&st.run_env, "PATH").is_none() {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        env
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch_run(
        &mut self,
        stage: usize,
        st: &mut StageState,
        p: &mut Progress,
        loc: &Located,
        cmd: &CommandLine,
        mount_specs: &[crate::instructions::MountSpec],
        network: Option<&str>,
        security: Option<&str>,
        heredocs: &[Heredoc],
    ) -> Result<(), FrontendError> {
        let mut inputs = vec![st.fs];
        let mut mounts = vec![Mount {
            target: "/".into(),
            input: Some(0),
            selector: "/".into(),
            readonly: false,
            kind: MountKind::Bind,
        }];
        let (mut args, shell_form) = match cmd {
            CommandLine::Exec(a) => (a.clone(), false),
            CommandLine::Shell(t) => (vec![t.clone()], true),
        };
        if args.is_empty() || (shell_form && args[0].trim().is_empty() && heredocs.is_empty()) {
            return Err(self.err(
                loc,
                None,
                LowerError::EmptyCommand {
                    instruction: "RUN".into(),
                },
            ));
        }
        // BuildKit names a single-heredoc RUN after the script: `RUN <<EOF (first line...)`.
        let mut name_suffix = String::new();
        if shell_form && !heredocs.is_empty() {
            let script = args[0].trim();
            let single = heredocs.len() == 1 && is_single_heredoc(script, &heredocs[0].name);
            if single {
                let h = &heredocs[0];
                name_suffix = format!(" ({})", summarize_heredoc(&h.content));
                let data = if h.chomp {
                    values::chomp_tabs(&h.content)
                } else {
                    h.content.clone()
                };
                if data.starts_with("#!") {
                    let file = Op::File(FileOp {
                        input: None,
                        actions: vec![FileAction::Mkfile(MkfileAction {
                            path: format!("/{}", h.name),
                            mode: 0o755,
                            data,
                            owner: None,
                        })],
                    });
                    let d = self.internal(file, Vec::new(), "preparing inline document", p);
                    inputs.push(d);
                    mounts.push(Mount {
                        target: "/dev/pipes/".into(),
                        input: Some(inputs.len() - 1),
                        selector: "/".into(),
                        readonly: true,
                        kind: MountKind::Bind,
                    });
                    args = vec![format!("/dev/pipes/{}", h.name)];
                } else {
                    args = vec![data];
                }
            } else {
                let mut b = args[0].clone();
                for h in heredocs {
                    b.push('\n');
                    b.push_str(&h.content);
                    b.push_str(&h.name);
                }
                args = vec![b];
            }
        }
        if shell_form {
            args = Self::with_shell(&st.config, &args[0]);
        }
        let workdir = st.cwd();
        for (i, spec) in mount_specs.iter().enumerate() {
            let raw = spec
                .options
                .iter()
                .map(|(k, v)| match v {
                    Some(v) => format!("{k}={v}"),
                    None => k.clone(),
                })
                .collect::<Vec<_>>()
                .join(",");
            let mut expanded = Vec::new();
            for (k, v) in &spec.options {
                let v = match v {
                    Some(v) if !k.eq_ignore_ascii_case("from") => Some(self.expand(loc, v, &st.run_env)?),
                    other => other.clone(),
                };
                expanded.push((k.clone(), v));
            }
            let m = parse_mount(&expanded).map_err(|reason| {
                self.err(
                    loc,
                    Some("--mount"),
                    LowerError::BadMount {
                        spec: raw.clone(),
                        reason,
                    },
                )
            })?;
            let abs = |t: &str| {
                values::clean_path(&if t.starts_with('/') {
                    t.to_string()
                } else {
                    format!("{workdir}/{t}")
                })
            };
            let source_input = match &m.from {
                Some(f) => {
                    let d = self.source_for_from(stage, loc, f, p)?;
                    inputs.push(d);
                    Some(inputs.len() - 1)
                }
                None => None,
            };
            let selector = values::clean_path(m.source.as_deref().unwrap_or("/"));
            let (target, input, selector, kind) = match &m.kind {
                MountType::Bind => {
                    let input = match source_input {
                        Some(i) => i,
                        None => {
                            let c = self.context_source();
                            inputs.push(c);
                            inputs.len() - 1
                        }
                    };
                    (
                        abs(m.target.as_deref().unwrap_or("")),
                        Some(input),
                        selector,
                        MountKind::Bind,
                    )
                }
                MountType::Cache { id, sharing } => {
                    let target = abs(m.target.as_deref().unwrap_or(""));
                    let id = id.clone().unwrap_or_else(|| target.clone());
                    let kind = MountKind::Cache {
                        id,
                        sharing: *sharing,
                        mode: m.mode.unwrap_or(0o755),
                        uid: m.uid.unwrap_or(0),
                        gid: m.gid.unwrap_or(0),
                    };
                    (
                        target,
                        source_input,
                        if source_input.is_some() {
                            selector
                        } else {
                            "/".into()
                        },
                        kind,
                    )
                }
                MountType::Tmpfs { size } => (
                    abs(m.target.as_deref().unwrap_or("")),
                    None,
                    "/".into(),
                    MountKind::Tmpfs { size: *size },
                ),
                MountType::Secret { id, env, required } => {
                    let target = m.target.clone().map(|t| abs(&t));
                    let id = match (id, &target) {
                        (Some(id), _) => id.clone(),
                        (None, Some(t)) => t.rsplit('/').next().unwrap_or("").to_string(),
                        (None, None) => env.clone().unwrap_or_default(),
                    };
                    let target = match (target, env) {
                        (Some(t), _) => t,
                        (None, Some(_)) => String::new(),
                        (None, None) => format!("/run/secrets/{id}"),
                    };
                    let kind = MountKind::Secret {
                        id,
                        env: env.clone(),
                        required: *required,
                        mode: m.mode.unwrap_or(0o400),
                        uid: m.uid.unwrap_or(0),
                        gid: m.gid.unwrap_or(0),
                    };
                    (target, None, "/".into(), kind)
                }
                MountType::Ssh { id, required } => {
                    let target = m
                        .target
                        .clone()
                        .map(|t| abs(&t))
                        .unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{i}"));
                    let kind = MountKind::Ssh {
                        id: id.clone().unwrap_or_else(|| "default".into()),
                        required: *required,
                        mode: m.mode.unwrap_or(0o600),
                        uid: m.uid.unwrap_or(0),
                        gid: m.gid.unwrap_or(0),
                    };
                    (target, None, "/".into(), kind)
                }
            };
            let readonly = match kind {
                MountKind::Secret { .. } | MountKind::Ssh { .. } => true,
                _ => m.readonly,
            };
            match &kind {
                MountKind::Secret { id, required, .. } => st.outline.secrets.push(OutlineMount {
                    name: id.clone(),
                    required: *required,
                    line: loc.span.start_line,
                }),
                MountKind::Ssh { id, required, .. } => st.outline.ssh.push(OutlineMount {
                    name: id.clone(),
                    required: *required,
                    line: loc.span.start_line,
                }),
                _ => {}
            }
            mounts.push(Mount {
                target,
                input,
                selector,
                readonly,
                kind,
            });
        }
        let network = match network.map(str::to_ascii_lowercase).as_deref() {
            // `--network` of the build, which a RUN's own `--network` overrides.
            None | Some("default") => self.opts.network,
            Some("none") => NetworkMode::None,
            Some("host") => NetworkMode::Host,
            Some(_) => {
                let v = network.unwrap_or_default().to_string();
                return Err(self.err(loc, Some("--network"), LowerError::BadNetwork { value: v }));
            }
        };
        let security = match security.map(str::to_ascii_lowercase).as_deref() {
            None | Some("sandbox") => SecurityMode::Sandbox,
            Some("insecure") => SecurityMode::Insecure,
            Some(_) => {
                let v = security.unwrap_or_default().to_string();
                return Err(self.err(loc, Some("--security"), LowerError::BadSecurity { value: v }));
            }
        };
        // History: `RUN |N K=V ... args # buildkit`: every ARG declared so far, in order, a name
        // declared twice listed twice, each with the name's value now (the reference BuildKit's
        // `RUN |4 TAG=local A=second B=given A=second`).
        let build_env: Vec<(&str, &str)> = st
            .args
            .iter()
            .map(|(k, v)| {
                let value = env_get(&st.run_env, k).or(v.as_deref()).unwrap_or_default();
                (k.as_str(), value)
            })
            .collect();
        // `RUN ` + the parts joined with spaces + ` # buildkit`, written in place.
        let mut created_by = String::from("RUN ");
        let mut sep = "";
        if !build_env.is_empty() {
            let _ = write!(created_by, "|{}", build_env.len());
            sep = " ";
            for (k, v) in &build_env {
                created_by.push(' ');
                created_by.push_str(k);
                created_by.push('=');
                created_by.push_str(v);
            }
        }
        for a in &args {
            created_by.push_str(sep);
            created_by.push_str(a);
            sep = " ";
        }
        created_by.push_str(" # buildkit");
        let op = Op::Exec(ExecOp {
            args,
            env: Self::exec_env(st),
            cwd: workdir,
            user: st.config.config.user.clone(),
            network,
            security,
            mounts,
            hostname: self
                .opts
                .build_args
                .get(HOSTNAME_ARG)
                .filter(|h| !h.is_empty())
                .cloned(),
            extra_hosts: self.opts.extra_hosts.clone(),
            shm_size: self.opts.shm_size,
            ulimits: self.opts.ulimits.clone(),
            platform: {
                let c = &st.config;
                let p = Platform::new(&c.os, &c.architecture, c.variant.as_deref());
                (!c.architecture.is_empty() && p != self.opts.build_platform).then_some(p)
            },
        });
        let mut name = Self::display_text(loc);
        name.push_str(&name_suffix);
        let meta = self.step_meta(p, loc, &name);
        st.fs = self.add(op, inputs, meta);
        Self::history(st, created_by, true);
        Ok(())
    }

    fn dispatch_copy(
        &mut self,
        stage: usize,
        st: &mut StageState,
        p: &mut Progress,
        loc: &Located,
        spec: &CopySpec,
        is_add: bool,
    ) -> Result<(), FrontendError> {
        let keyword = if is_add { "ADD" } else { "COPY" };
        let chown_expanded = match &spec.chown {
            Some(c) => Some(self.expand_in(loc, c, st)?),
            None => None,
        };
        let chmod_expanded = match &spec.chmod {
            Some(c) => Some(self.expand_in(loc, c, st)?),
            None => None,
        };
        let mut sources = Vec::new();
        for s in &spec.sources {
            sources.push(self.expand_in(loc, s, st)?);
        }
        let dest_raw = self.expand_in(loc, &spec.dest, st)?;
        let env = &st.run_env;
        let total_sources = sources.len() + spec.heredocs.len();
        if total_sources == 0 {
            return Err(self.err(
                loc,
                None,
                LowerError::NoSources {
                    keyword: keyword.into(),
                },
            ));
        }
        let workdir = st.cwd();
        let dest_full = values::resolve_dest(&workdir, &dest_raw);
        // Several sources and a destination without `/` are not an error for the reference
        // BuildKit: each source is copied to that path in turn (the last file wins; a directory
        // after a file fails with "cannot copy to non-directory"), or into it if it is an
        // existing directory.
        let dest_is_dir = dest_full.ends_with('/');
        let dest = if dest_full.len() > 1 {
            dest_full.trim_end_matches('/').to_string()
        } else {
            dest_full.clone()
        };
        let mut history_flags = Vec::new();
        if spec.parents {
            history_flags.push("--parents".to_string());
        }
        let owner = match chown_expanded {
            Some(v) => {
                // Not in the history: the reference BuildKit (Docker 20.10's) writes
                // `COPY a.txt /o/` for `COPY --chown=1000:1000 a.txt /o/` (newer BuildKit adds
                // the flag).
                if v.is_empty() {
                    None
                } else {
                    Some(values::parse_owner(&v).map_err(|reason| {
                        self.err(
                            loc,
                            Some("--chown"),
                            LowerError::BadChown {
                                value: v.clone(),
                                reason,
                            },
                        )
                    })?)
                }
            }
            None => None,
        };
        let mode = match chmod_expanded {
            Some(v) => {
                // Not in the history either, as for --chown.
                Some(values::parse_chmod(&v).ok_or_else(|| {
                    self.err(loc, Some("--chmod"), LowerError::BadChmod { value: v.clone() })
                })?)
            }
            None => None,
        };
        let checksum = match &spec.checksum {
            Some(c) => {
                let v = self.expand(loc, c, env)?;
                Some(Digest::parse(&v).map_err(|source| {
                    self.err(
                        loc,
                        Some("--checksum"),
                        LowerError::BadChecksum {
                            value: v.clone(),
                            source,
                        },
                    )
                })?)
            }
            None => None,
        };
        let mut exclude = Vec::new();
        for e in &spec.exclude {
            exclude.push(self.expand(loc, e, env)?);
        }
        // BuildKit only links (copy on scratch + merge) when no --chmod is given.
        let link = spec.link && spec.chmod.is_none();
        // Inputs of the file op: with --link it works on scratch, otherwise input 0 is the stage.
        let mut inputs: Vec<Digest> = if link { Vec::new() } else { vec![st.fs] };
        let mut actions = Vec::new();
        let base_copy = |source_input: usize, src: String, unpack: bool, allow_wildcard: bool| CopyAction {
            source_input,
            src,
            dest: dest.clone(),
            owner: owner.clone(),
            mode: mode.clone(),
            follow_symlinks: true,
            dir_contents_only: true,
            allow_wildcard,
            allow_empty_wildcard: allow_wildcard,
            create_dest_path: true,
            dest_is_dir,
            attempt_unpack: unpack,
            exclude: exclude.clone(),
            parents: spec.parents,
        };
        let local_input = match &spec.from {
            Some(f) => Some(self.source_for_from(stage, loc, f, p)?),
            None => None,
        };
        let mut local_index: Option<usize> = None;
        for src in &sources {
            if is_add && (values::is_git(src) || values::is_url(src)) {
                if values::is_git(src) {
                    if checksum.is_some() {
                        return Err(self.err(
                            loc,
                            Some("--checksum"),
                            LowerError::ChecksumNotHttp {
                                source_path: src.clone(),
                            },
                        ));
                    }
                    let (remote, reference, subdir) = values::split_git(src);
                    let op = Op::Source(SourceOp::Git(GitSource {
                        remote,
                        reference,
                        subdir,
                        keep_git_dir: spec.keep_git_dir.unwrap_or(false),
                    }));
                    let d = self.internal(op, Vec::new(), &format!("load git source {src}"), p);
                    inputs.push(d);
                    actions.push(FileAction::Copy(base_copy(
                        inputs.len() - 1,
                        "/".into(),
                        false,
                        false,
                    )));
                } else {
                    let filename = values::url_filename(src);
                    let op = Op::Source(SourceOp::Http(HttpSource {
                        url: src.clone(),
                        checksum,
                        filename: filename.clone(),
                        mode: None,
                        uid: 0,
                        gid: 0,
                    }));
                    let d = self.internal(op, Vec::new(), &format!("load remote file {src}"), p);
                    inputs.push(d);
                    let unpack = spec.unpack.unwrap_or(false);
                    actions.push(FileAction::Copy(base_copy(
                        inputs.len() - 1,
                        format!("/{filename}"),
                        unpack,
                        false,
                    )));
                }
                continue;
            }
            if checksum.is_some() {
                return Err(self.err(
                    loc,
                    Some("--checksum"),
                    LowerError::ChecksumNotHttp {
                        source_path: src.clone(),
                    },
                ));
            }
            if spec.from.is_none() {
                self.check_ignored_source(keyword, src, loc);
            }
            let idx = match local_index {
                Some(i) => i,
                None => {
                    let d = match local_input {
                        Some(d) => d,
                        None => self.context_source(),
                    };
                    inputs.push(d);
                    local_index = Some(inputs.len() - 1);
                    inputs.len() - 1
                }
            };
            let unpack = is_add && spec.unpack.unwrap_or(true);
            actions.push(FileAction::Copy(base_copy(
                idx,
                src.clone(),
                unpack,
                values::has_wildcard(src),
            )));
        }
        for h in &spec.heredocs {
            let mut data = if h.chomp {
                values::chomp_tabs(&h.content)
            } else {
                h.content.clone()
            };
            if h.expand {
                data = self.expand_heredoc(loc, &data, env)?;
            }
            let file_mode = match &mode {
                Some(kiln_dag::Chmod::Octal(m)) => *m,
                _ => 0o644,
            };
            let op = Op::File(FileOp {
                input: None,
                actions: vec![FileAction::Mkfile(MkfileAction {
                    path: format!("/{}", h.name),
                    mode: file_mode,
                    data,
                    owner: None,
                })],
            });
            let d = self.internal(op, Vec::new(), "preparing inline document", p);
            inputs.push(d);
            actions.push(FileAction::Copy(base_copy(
                inputs.len() - 1,
                format!("/{}", h.name),
                false,
                false,
            )));
        }
        let mut shown = vec![keyword.to_string()];
        shown.extend(history_flags);
        shown.extend(sources.iter().cloned());
        shown.extend(spec.heredocs.iter().map(|h| format!("<<{}", h.name)));
        shown.push(dest_raw.clone());
        let meta = self.step_meta(p, loc, &Self::display_text(loc));
        let file = Op::File(FileOp {
            input: if link { None } else { Some(0) },
            actions,
        });
        if link {
            // BuildKit shows the merge as `[stage N/M] LINK COPY ...`, the copy under its name.
            let mut merge_meta = meta.clone();
            merge_meta.name = match meta.name.split_once("] ") {
                Some((prefix, rest)) => format!("{prefix}] LINK {rest}"),
                None => format!("LINK {}", meta.name),
            };
            let layer = self.add(file, inputs, meta);
            st.fs = self.add(Op::Merge(MergeOp {}), vec![st.fs, layer], merge_meta);
        } else {
            st.fs = self.add(file, inputs, meta);
        }
        Self::history(st, format!("{} # buildkit", shown.join(" ")), true);
        Ok(())
    }

    /// Expands `$VAR` / `${VAR}` forms in a heredoc body, leaving quotes alone (BuildKit
    /// expands COPY heredocs without quote processing).
    fn expand_heredoc(&self, loc: &Located, data: &str, env: &Env) -> Result<String, FrontendError> {
        let raw = crate::shell::Lexer::new('\\');
        let lookup = |k: &str| env_get(env, k).map(str::to_string);
        let mut out = String::with_capacity(data.len());
        for line in data.split_inclusive('\n') {
            // Quote characters are escaped so the word lexer keeps them literally.
            let escaped: String = line
                .chars()
                .flat_map(|c| match c {
                    '"' | '\'' => vec!['\\', c],
                    c => vec![c],
                })
                .collect();
            let (body, nl) = match escaped.strip_suffix('\n') {
                Some(b) => (b.to_string(), "\n"),
                None => (escaped.clone(), ""),
            };
            let expanded = raw.process_word(&body, &lookup).map_err(|source| {
                self.err(
                    loc,
                    None,
                    LowerError::Expand {
                        word: line.trim_end().to_string(),
                        source,
                    },
                )
            })?;
            out.push_str(&expanded);
            out.push_str(nl);
        }
        Ok(out)
    }
}

/// LegacyKeyValueFormat's message for `ENV` / `LABEL`.
fn legacy_message(keyword: &str) -> String {
    format!("\"{keyword} key=value\" should be used instead of legacy \"{keyword} key value\" format")
}

/// The first line of a heredoc body (trimmed), with `...` when more lines follow.
fn summarize_heredoc(doc: &str) -> String {
    let doc = doc.trim();
    let mut lines = doc.split('\n');
    let first = lines.next().unwrap_or("").trim_end_matches('\r');
    if lines.next().is_some() {
        format!("{first}...")
    } else {
        first.to_string()
    }
}

/// Whether a RUN script is nothing but one heredoc marker (`<<EOF`, `<<-EOF`, `<<"EOF"`).
fn is_single_heredoc(script: &str, name: &str) -> bool {
    let Some(rest) = script.strip_prefix("<<") else {
        return false;
    };
    let rest = rest.strip_prefix('-').unwrap_or(rest);
    let unquoted = rest.trim_matches(|c| c == '"' || c == '\'');
    unquoted == name
}
