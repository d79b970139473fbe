//! The lowering driver: the [`Lowerer`], what every instruction's lowering shares (errors with
//! carets, word expansion, graph vertices, step names) and [`Lowerer::dispatch`], which hands
//! each instruction to its own module (`from`, `meta`, `healthcheck`, `run`, `copy`), as
//! BuildKit's `dispatch` hands them to its `dispatch*` functions. Planning (stages, targets,
//! reachability, ONBUILD) is in `plan`; the per-stage state in `state`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use kiln_dag::{
    Digest, Graph, ImageSource, LocalSource, Meta, Op, Platform, SourceLocation, SourceOp, Vertex,
};

use super::error::{FrontendError, LowerError};
use super::stages::Stage;
use super::state::{env_get, Env, GlobalArg, Progress, StageState, NON_ENV_ARGS};
use super::values;
use super::{first_column, ImageResolver, LowerOptions, ResolvedImage};
use crate::instructions::{CommandLine, Instruction, Located, MountSpec};
use crate::lint::{self, Linter, Rule};
use crate::parser::{Heredoc, Span};

/// The fields of a typed RUN instruction.
pub(super) struct RunInstruction<'i> {
    pub(super) cmd: &'i CommandLine,
    pub(super) mounts: &'i [MountSpec],
    pub(super) network: Option<&'i str>,
    pub(super) security: Option<&'i str>,
    pub(super) heredocs: &'i [Heredoc],
}

pub struct Lowerer<'a> {
    pub(super) lines: Vec<&'a str>,
    pub(super) opts: &'a LowerOptions,
    pub(super) resolver: &'a dyn ImageResolver,
    pub(super) parse_trigger: &'a dyn Fn(&str) -> Result<Located, String>,
    pub(super) lexer: crate::shell::Lexer,
    pub(super) graph: Graph,
    pub(super) lint: Linter,
    pub(super) global_args: Env,
    /// Global ARGs as declared (for the outline).
    pub(super) global_decl: Vec<GlobalArg>,
    /// The Dockerfile lines (for description comments).
    pub(super) source_lines: Vec<String>,
    pub(super) stages: Vec<Stage>,
    pub(super) resolved: BTreeMap<String, ResolvedImage>,
    pub(super) context: Option<Digest>,
    pub(super) done: Vec<Option<StageState>>,
    pub(super) single_stage: bool,
    /// Stages whose ONBUILD triggers were resolved.
    pub(super) triggers_done: BTreeSet<usize>,
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

    pub(super) fn err(&self, loc: &Located, needle: Option<&str>, kind: LowerError) -> FrontendError {
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

    pub(super) fn bare_err(&self, kind: LowerError) -> FrontendError {
        FrontendError {
            file: self.opts.dockerfile_name.clone(),
            line: 0,
            column: 0,
            kind: Box::new(kind),
            warnings: self.lint.warnings().to_vec(),
        }
    }

    pub(super) fn expand(&self, loc: &Located, word: &str, env: &Env) -> Result<String, FrontendError> {
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

    pub(super) fn warn(&mut self, rule: &'static Rule, message: String, span: Span) {
        self.lint.run(rule, message, span);
    }

    /// Expands one word of an instruction in a stage, reporting the variables it uses that are
    /// neither set nor declared (UndefinedVar).
    pub(super) fn expand_in(
        &mut self,
        loc: &Located,
        word: &str,
        st: &StageState,
    ) -> Result<String, FrontendError> {
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

    pub(super) fn report_undefined(&mut self, loc: &Located, unmatched: &BTreeSet<String>, st: &StageState) {
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

    pub(super) fn location(&self, loc: &Located) -> Option<SourceLocation> {
        Some(SourceLocation {
            file: self.opts.dockerfile_name.clone(),
            start_line: loc.span.start_line,
            end_line: loc.span.end_line,
        })
    }

    pub(super) fn add(&mut self, op: Op, inputs: Vec<Digest>, meta: Meta) -> Digest {
        let meta = Meta {
            ignore_cache: meta.ignore_cache || self.opts.no_cache,
            ..meta
        };
        self.graph.add(Vertex { op, inputs, meta })
    }

    pub(super) fn internal(&mut self, op: Op, inputs: Vec<Digest>, name: &str, p: &Progress) -> Digest {
        let meta = Meta {
            name: format!("[internal] {name}"),
            stage: Some(p.display.clone()),
            location: None,
            ignore_cache: p.ignore_cache,
        };
        self.add(op, inputs, meta)
    }

    pub(super) fn step_meta(&self, p: &mut Progress, loc: &Located, text: &str) -> Meta {
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

    pub(super) fn context_source(&mut self) -> Digest {
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

    pub(super) fn resolve_image(
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

    pub(super) fn image_vertex(&mut self, r: &ResolvedImage, platform: &Platform, meta: Meta) -> Digest {
        let op = Op::Source(SourceOp::Image(ImageSource {
            reference: r.reference.clone(),
            resolved_digest: r.digest,
            platform: platform.clone(),
        }));
        self.add(op, Vec::new(), meta)
    }

    /// Lowers one instruction of stage `stage` into `st`: one function per instruction, as
    /// BuildKit's dispatchers.
    pub(super) fn dispatch(
        &mut self,
        stage: usize,
        st: &mut StageState,
        p: &mut Progress,
        loc: &Located,
    ) -> Result<(), FrontendError> {
        match &loc.instruction {
            Instruction::From { .. } => Ok(()),
            Instruction::Env(pairs) => self.dispatch_env(st, loc, pairs),
            Instruction::Label(pairs) => self.dispatch_label(st, loc, pairs),
            Instruction::Maintainer(m) => {
                st.config.author = Some(m.clone());
                st.history(format!("MAINTAINER {m}"), false);
                Ok(())
            }
            Instruction::Cmd(cl) => self.dispatch_command(st, p, loc, cl, true),
            Instruction::Entrypoint(cl) => self.dispatch_command(st, p, loc, cl, false),
            Instruction::Expose(ports) => self.dispatch_expose(st, loc, ports),
            Instruction::Volume(vols) => self.dispatch_volume(st, loc, vols),
            Instruction::User(u) => self.dispatch_user(st, loc, u),
            Instruction::Stopsignal(s) => self.dispatch_stopsignal(st, loc, s),
            Instruction::Shell(args) => {
                st.config.config.shell = Some(args.clone());
                st.history(format!("SHELL {}", values::go_list(args)), false);
                Ok(())
            }
            Instruction::Onbuild(trigger) => {
                let triggers = st.config.config.on_build.get_or_insert_with(Vec::new);
                triggers.push(trigger.clone());
                Ok(())
            }
            Instruction::Healthcheck(h) => self.dispatch_healthcheck(st, p, loc, h),
            Instruction::Arg(pairs) => self.dispatch_arg(st, p, loc, pairs),
            Instruction::Workdir(path) => self.dispatch_workdir(st, p, loc, path),
            Instruction::Run {
                cmd,
                mounts,
                network,
                security,
                heredocs,
            } => {
                let run = RunInstruction {
                    cmd,
                    mounts,
                    network: network.as_deref(),
                    security: security.as_deref(),
                    heredocs,
                };
                self.dispatch_run(stage, st, p, loc, &run)
            }
            Instruction::Copy(spec) => self.dispatch_copy(stage, st, p, loc, spec, false),
            Instruction::Add(spec) => self.dispatch_copy(stage, st, p, loc, spec, true),
        }
    }

    pub(super) fn display_text(loc: &Located) -> String {
        let text = loc.original.trim();
        match text.split_once(char::is_whitespace) {
            Some((kw, rest)) => format!("{} {}", kw.to_ascii_uppercase(), rest.trim_start()),
            None => text.to_ascii_uppercase(),
        }
    }
}
