//! Planning a build: the global ARG scope, the stages and their bases, the target, the stages
//! it needs (through `FROM <stage>`, `--from`, mount `from` and ONBUILD triggers), and the
//! outline of the target.

use std::collections::{BTreeMap, BTreeSet};

use kiln_dag::Platform;

use super::dispatch::Lowerer;
use super::error::{suggest, FrontendError, LowerError};
use super::stages::{self, Base, Stage};
use super::state::{env_get, env_set, Env, FromRef, GlobalArg};
use super::{Lowered, NamedContext, Outline, OutlineArg};
use crate::instructions::{Instruction, Located};
use crate::lint;

const PROXY_ARGS: &[&str] = &["http_proxy", "https_proxy", "ftp_proxy", "no_proxy", "all_proxy"];

impl Lowerer<'_> {
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
    pub(super) fn expand_global(
        &self,
        loc: &Located,
        word: &str,
    ) -> Result<(String, BTreeSet<String>), FrontendError> {
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
    pub(super) fn check_default_base_names(&mut self, globals: &[Located], raw: &[stages::RawStage]) {
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
    pub(super) fn outline(&self, target: usize) -> Outline {
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
    pub(super) fn stage_description(&self, i: usize) -> String {
        let Some(name) = &self.stages[i].name else {
            return String::new();
        };
        let from = &self.stages[i].from;
        let prev_end = self.prev_end_line(from.span.start_line);
        let lines: Vec<&str> = self.source_lines.iter().map(String::as_str).collect();
        lint::description_for(&lint::prev_comments(&lines, from.span.start_line, prev_end), name)
    }

    /// The last line of the instruction before the one starting at `line` (0 if none).
    pub(super) fn prev_end_line(&self, line: u32) -> u32 {
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
    pub(super) fn predefined_args(&self, target_stage: &str) -> Env {
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

    pub(super) fn plan_stages(&mut self, raw: Vec<stages::RawStage>) -> Result<(), FrontendError> {
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
    pub(super) fn report_from_args(
        &mut self,
        from: &Located,
        unmatched: &BTreeSet<String>,
        known: &[String],
    ) {
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
    pub(super) fn check_from_platform(
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

    pub(super) fn find_target(&self) -> Result<usize, FrontendError> {
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

    pub(super) fn lookup_from(&self, from: &str) -> Result<FromRef, LowerError> {
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
    pub(super) fn instruction_deps(&self, loc: &Located) -> Result<Vec<usize>, FrontendError> {
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

    pub(super) fn plan_dependencies(&mut self) -> Result<(), FrontendError> {
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
    pub(super) fn resolve_triggers(&mut self, target: usize) -> Result<BTreeSet<usize>, FrontendError> {
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

    pub(super) fn stage_platform(&self, i: usize) -> Platform {
        self.stages[i]
            .platform
            .clone()
            .unwrap_or_else(|| self.opts.platform.clone())
    }
}
