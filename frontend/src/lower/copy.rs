//! COPY and ADD: sources from the context, a `--from` stage, image or named context, URLs and
//! Git repositories (ADD), and heredocs, into one file op (or a layer merged onto the stage with
//! `--link`), as BuildKit's `dispatchCopy`.

use kiln_dag::{
    Chmod, CopyAction, Digest, FileAction, FileOp, GitSource, HttpSource, MergeOp, MkfileAction, Op, Owner,
    SourceOp,
};

use super::dispatch::Lowerer;
use super::error::{FrontendError, LowerError};
use super::state::{env_get, Env, Progress, StageState};
use super::values;
use crate::instructions::{CopySpec, Located};
use crate::lint;

/// What every copy action of one COPY/ADD shares.
struct CopyTemplate {
    dest: String,
    dest_is_dir: bool,
    owner: Option<Owner>,
    mode: Option<Chmod>,
    exclude: Vec<String>,
    parents: bool,
}

impl CopyTemplate {
    fn action(&self, source_input: usize, src: String, unpack: bool, allow_wildcard: bool) -> CopyAction {
        CopyAction {
            source_input,
            src,
            dest: self.dest.clone(),
            owner: self.owner.clone(),
            mode: self.mode.clone(),
            follow_symlinks: true,
            dir_contents_only: true,
            allow_wildcard,
            allow_empty_wildcard: allow_wildcard,
            create_dest_path: true,
            dest_is_dir: self.dest_is_dir,
            attempt_unpack: unpack,
            exclude: self.exclude.clone(),
            parents: self.parents,
        }
    }
}

/// The file op of one COPY/ADD as it is built.
struct CopyPlan {
    is_add: bool,
    tpl: CopyTemplate,
    checksum: Option<Digest>,
    inputs: Vec<Digest>,
    actions: Vec<FileAction>,
}

impl CopyPlan {
    fn push(&mut self, input: Digest, src: String, unpack: bool) {
        self.inputs.push(input);
        let action = self.tpl.action(self.inputs.len() - 1, src, unpack, false);
        self.actions.push(FileAction::Copy(action));
    }
}

impl Lowerer<'_> {
    /// COPY (`is_add` false) and ADD.
    pub(super) fn dispatch_copy(
        &mut self,
        stage: usize,
        st: &mut StageState,
        p: &mut Progress,
        loc: &Located,
        spec: &CopySpec,
        is_add: bool,
    ) -> Result<(), FrontendError> {
        let keyword = if is_add { "ADD" } else { "COPY" };
        let chown = match &spec.chown {
            Some(c) => Some(self.expand_in(loc, c, st)?),
            None => None,
        };
        let chmod = match &spec.chmod {
            Some(c) => Some(self.expand_in(loc, c, st)?),
            None => None,
        };
        let mut sources = Vec::new();
        for s in &spec.sources {
            sources.push(self.expand_in(loc, s, st)?);
        }
        let dest_raw = self.expand_in(loc, &spec.dest, st)?;
        if sources.len() + spec.heredocs.len() == 0 {
            return Err(self.err(
                loc,
                None,
                LowerError::NoSources {
                    keyword: keyword.into(),
                },
            ));
        }
        let (dest, dest_is_dir) = destination(&st.cwd(), &dest_raw);
        // --chown and --chmod are not in the history: the reference BuildKit (Docker 20.10's)
        // writes `COPY a.txt /o/` for `COPY --chown=1000:1000 a.txt /o/` (newer BuildKit adds
        // the flags).
        let owner = self.copy_owner(loc, chown)?;
        let mode =
            match chmod {
                Some(v) => Some(values::parse_chmod(&v).ok_or_else(|| {
                    self.err(loc, Some("--chmod"), LowerError::BadChmod { value: v.clone() })
                })?),
                None => None,
            };
        let env = &st.run_env;
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
        let mut plan = CopyPlan {
            is_add,
            tpl: CopyTemplate {
                dest,
                dest_is_dir,
                owner,
                mode,
                exclude,
                parents: spec.parents,
            },
            checksum,
            // With --link the op works on scratch, otherwise input 0 is the stage.
            inputs: if link { Vec::new() } else { vec![st.fs] },
            actions: Vec::new(),
        };
        self.copy_sources(stage, p, loc, spec, &sources, &mut plan)?;
        self.copy_heredocs(p, loc, spec, env, &mut plan)?;
        let mut shown = vec![keyword.to_string()];
        if spec.parents {
            shown.push("--parents".to_string());
        }
        shown.extend(sources.iter().cloned());
        shown.extend(spec.heredocs.iter().map(|h| format!("<<{}", h.name)));
        shown.push(dest_raw.clone());
        let meta = self.step_meta(p, loc, &Self::display_text(loc));
        let file = Op::File(FileOp {
            input: if link { None } else { Some(0) },
            actions: plan.actions,
        });
        if link {
            // BuildKit shows the merge as `[stage N/M] LINK COPY ...`, the copy under its name.
            let mut merge_meta = meta.clone();
            merge_meta.name = match meta.name.split_once("] ") {
                Some((prefix, rest)) => format!("{prefix}] LINK {rest}"),
                None => format!("LINK {}", meta.name),
            };
            let layer = self.add(file, plan.inputs, meta);
            st.fs = self.add(Op::Merge(MergeOp {}), vec![st.fs, layer], merge_meta);
        } else {
            st.fs = self.add(file, plan.inputs, meta);
        }
        st.history(format!("{} # buildkit", shown.join(" ")), true);
        Ok(())
    }

    /// `--chown` as expanded (empty = none).
    fn copy_owner(&self, loc: &Located, chown: Option<String>) -> Result<Option<Owner>, FrontendError> {
        let Some(v) = chown.filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        values::parse_owner(&v).map(Some).map_err(|reason| {
            self.err(
                loc,
                Some("--chown"),
                LowerError::BadChown {
                    value: v.clone(),
                    reason,
                },
            )
        })
    }

    /// The copy actions of the sources: URLs and Git repositories (ADD) as sources of their
    /// own, everything else from one local input (the context or `--from`).
    fn copy_sources(
        &mut self,
        stage: usize,
        p: &Progress,
        loc: &Located,
        spec: &CopySpec,
        sources: &[String],
        plan: &mut CopyPlan,
    ) -> Result<(), FrontendError> {
        let local_input = match &spec.from {
            Some(f) => Some(self.source_for_from(stage, loc, f, p)?),
            None => None,
        };
        let mut local_index: Option<usize> = None;
        for src in sources {
            let remote = plan.is_add && (values::is_git(src) || values::is_url(src));
            if plan.checksum.is_some() && (!remote || values::is_git(src)) {
                return Err(self.err(
                    loc,
                    Some("--checksum"),
                    LowerError::ChecksumNotHttp {
                        source_path: src.clone(),
                    },
                ));
            }
            if remote && values::is_git(src) {
                let (remote, reference, subdir) = values::split_git(src);
                let op = Op::Source(SourceOp::Git(GitSource {
                    remote,
                    reference,
                    subdir,
                    keep_git_dir: spec.keep_git_dir.unwrap_or(false),
                }));
                let d = self.internal(op, Vec::new(), &format!("load git source {src}"), p);
                plan.push(d, "/".into(), false);
                continue;
            }
            if remote {
                let filename = values::url_filename(src);
                let op = Op::Source(SourceOp::Http(HttpSource {
                    url: src.clone(),
                    checksum: plan.checksum,
                    filename: filename.clone(),
                    mode: None,
                    uid: 0,
                    gid: 0,
                }));
                let d = self.internal(op, Vec::new(), &format!("load remote file {src}"), p);
                plan.push(d, format!("/{filename}"), spec.unpack.unwrap_or(false));
                continue;
            }
            if spec.from.is_none() {
                self.check_ignored_source(if plan.is_add { "ADD" } else { "COPY" }, src, loc);
            }
            let idx = match local_index {
                Some(i) => i,
                None => {
                    let d = match local_input {
                        Some(d) => d,
                        None => self.context_source(),
                    };
                    plan.inputs.push(d);
                    local_index = Some(plan.inputs.len() - 1);
                    plan.inputs.len() - 1
                }
            };
            let unpack = plan.is_add && spec.unpack.unwrap_or(true);
            let action = plan
                .tpl
                .action(idx, src.clone(), unpack, values::has_wildcard(src));
            plan.actions.push(FileAction::Copy(action));
        }
        Ok(())
    }

    /// The copy actions of the heredocs: each document a file of its own, copied like a source.
    fn copy_heredocs(
        &mut self,
        p: &Progress,
        loc: &Located,
        spec: &CopySpec,
        env: &Env,
        plan: &mut CopyPlan,
    ) -> Result<(), FrontendError> {
        for h in &spec.heredocs {
            let mut data = if h.chomp {
                values::chomp_tabs(&h.content)
            } else {
                h.content.clone()
            };
            if h.expand {
                data = expand_heredoc(&data, env)
                    .map_err(|(word, source)| self.err(loc, None, LowerError::Expand { word, source }))?;
            }
            let file_mode = match &plan.tpl.mode {
                Some(Chmod::Octal(m)) => *m,
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
            plan.push(d, format!("/{}", h.name), false);
        }
        Ok(())
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
}

/// The destination of a COPY in `workdir` written as `raw`, and whether it names a directory
/// (ends with `/`). Several sources and a destination without `/` are not an error for the
/// reference BuildKit: each source is copied to that path in turn (the last file wins; a
/// directory after a file fails with "cannot copy to non-directory"), or into it if it is an
/// existing directory.
fn destination(workdir: &str, raw: &str) -> (String, bool) {
    let full = values::resolve_dest(workdir, raw);
    let is_dir = full.ends_with('/');
    let dest = if full.len() > 1 {
        full.trim_end_matches('/').to_string()
    } else {
        full
    };
    (dest, is_dir)
}

/// Expands `$VAR` / `${VAR}` forms in a heredoc body, leaving quotes alone (BuildKit expands
/// COPY heredocs without quote processing). `Err` names the line that failed.
fn expand_heredoc(data: &str, env: &Env) -> Result<String, (String, crate::shell::ShellError)> {
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
        let expanded = raw
            .process_word(&body, &lookup)
            .map_err(|source| (line.trim_end().to_string(), source))?;
        out.push_str(&expanded);
        out.push_str(nl);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_is_a_directory_only_when_written_as_one() {
        assert_eq!(destination("/app", "."), ("/app".to_string(), true));
        assert_eq!(destination("/app", "out"), ("/app/out".to_string(), false));
        assert_eq!(destination("/app", "out/"), ("/app/out".to_string(), true));
        assert_eq!(destination("/app", "/etc/x/./"), ("/etc/x".to_string(), true));
        assert_eq!(destination("/", "/"), ("/".to_string(), true));
    }

    #[test]
    fn heredoc_expansion_leaves_quotes_alone() {
        let env: Env = vec![("A".into(), "1".into()), ("B".into(), "two words".into())];
        let doc = "echo \"$A\" '${B}'\nliteral \\$A $UNSET.\n";
        assert_eq!(
            expand_heredoc(doc, &env).unwrap(),
            "echo \"1\" 'two words'\nliteral $A .\n"
        );
        let (line, _) = expand_heredoc("ok\n${A:?gone}x ${\n", &env).unwrap_err();
        assert_eq!(line, "${A:?gone}x ${");
    }

    #[test]
    fn every_action_shares_the_template() {
        let tpl = CopyTemplate {
            dest: "/app".into(),
            dest_is_dir: true,
            owner: None,
            mode: Some(Chmod::Octal(0o600)),
            exclude: vec!["*.md".into()],
            parents: true,
        };
        let a = tpl.action(2, "src/*.rs".into(), false, true);
        assert_eq!(
            (a.source_input, a.src.as_str(), a.dest.as_str()),
            (2, "src/*.rs", "/app")
        );
        assert!(a.allow_wildcard && a.allow_empty_wildcard && a.parents && a.dest_is_dir);
        assert_eq!(a.exclude, ["*.md"]);
        assert_eq!(a.mode, Some(Chmod::Octal(0o600)));
    }
}
