//! FROM: a stage's starting state (a base image, scratch, an earlier stage or a named
//! context), and the filesystems `--from` and mount `from` read.

use kiln_dag::image::ImageConfig;
use kiln_dag::{
    CopyAction, Digest, FileAction, FileOp, GitSource, LocalSource, Meta, Op, Platform, SourceOp,
};

use super::dispatch::Lowerer;
use super::error::{FrontendError, LowerError};
use super::stages::Base;
use super::state::{env_from_config, FromRef, Progress, StageOutline, StageState};
use super::values::DEFAULT_PATH;
use super::{NamedContext, ResolvedImage};
use crate::instructions::{Instruction, Located};
use crate::lint;

impl Lowerer<'_> {
    pub(super) fn lower_stage(&mut self, index: usize) -> Result<(), FrontendError> {
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
                    StageState::new(fs, empty_config(&platform))
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
    pub(super) fn check_base_platform(
        &mut self,
        from: &Located,
        name: &str,
        expected: &Platform,
        r: &ResolvedImage,
    ) {
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
    pub(super) fn context_state(
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
                let config = empty_config(platform);
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
                let config = empty_config(platform);
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
    pub(super) fn source_for_from(
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
}

/// The config of a stage that starts from nothing: the platform, `/`, the default PATH.
pub(super) fn empty_config(platform: &Platform) -> ImageConfig {
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
