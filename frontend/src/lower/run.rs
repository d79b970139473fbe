//! RUN: the command (shell or exec form, heredocs), its `--mount`s, `--network` and
//! `--security`, and its history line, as BuildKit's `dispatchRun` and `dispatchRunMounts`.

use std::fmt::Write as _;

use kiln_dag::{
    Digest, ExecOp, FileAction, FileOp, MkfileAction, Mount, MountKind, NetworkMode, Op, Platform,
    SecurityMode,
};

use super::dispatch::{Lowerer, RunInstruction};
use super::error::{FrontendError, LowerError};
use super::mounts::{parse_mount, MountType, RunMount};
use super::state::{env_get, with_shell, Env, Progress, StageState};
use super::values;
use super::OutlineMount;
use crate::instructions::{CommandLine, Located, MountSpec};

/// `--build-arg BUILDKIT_SANDBOX_HOSTNAME=name`: the hostname RUN steps see.
const HOSTNAME_ARG: &str = "BUILDKIT_SANDBOX_HOSTNAME";

/// The inputs of a RUN's exec and its mounts (which refer to the inputs by index).
struct ExecInputs {
    inputs: Vec<Digest>,
    mounts: Vec<Mount>,
}

impl Lowerer<'_> {
    /// RUN: an exec over the stage's filesystem, with its mounts.
    pub(super) fn dispatch_run(
        &mut self,
        stage: usize,
        st: &mut StageState,
        p: &mut Progress,
        loc: &Located,
        run: &RunInstruction,
    ) -> Result<(), FrontendError> {
        let mut exec = ExecInputs {
            inputs: vec![st.fs],
            mounts: vec![Mount {
                target: "/".into(),
                input: Some(0),
                selector: "/".into(),
                readonly: false,
                kind: MountKind::Bind,
            }],
        };
        let (args, name_suffix) = self.run_command(st, p, loc, run, &mut exec)?;
        let workdir = st.cwd();
        self.run_mounts(stage, st, p, loc, run.mounts, &mut exec)?;
        let ExecInputs { inputs, mounts } = exec;
        let network = match run_network(run.network) {
            Some(n) => n.unwrap_or(self.opts.network),
            None => {
                let v = run.network.unwrap_or_default().to_string();
                return Err(self.err(loc, Some("--network"), LowerError::BadNetwork { value: v }));
            }
        };
        let Some(security) = run_security(run.security) else {
            let v = run.security.unwrap_or_default().to_string();
            return Err(self.err(loc, Some("--security"), LowerError::BadSecurity { value: v }));
        };
        let created_by = run_history(&st.args, &st.run_env, &args);
        let op = Op::Exec(ExecOp {
            args,
            env: st.exec_env(),
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
        st.history(created_by, true);
        Ok(())
    }

    /// The exec's arguments and the suffix of the step name. A RUN that is one heredoc starting
    /// with `#!` runs the document as a file mounted at `/dev/pipes/`; any other heredocs are
    /// appended to the shell script.
    fn run_command(
        &mut self,
        st: &StageState,
        p: &Progress,
        loc: &Located,
        run: &RunInstruction,
        exec: &mut ExecInputs,
    ) -> Result<(Vec<String>, String), FrontendError> {
        let heredocs = run.heredocs;
        let (mut args, shell_form) = match run.cmd {
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
                    exec.inputs.push(d);
                    exec.mounts.push(Mount {
                        target: "/dev/pipes/".into(),
                        input: Some(exec.inputs.len() - 1),
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
            args = with_shell(&st.config, &args[0]);
        }
        Ok((args, name_suffix))
    }

    /// The `--mount`s of a RUN: options expanded (all but `from`), parsed, their sources added
    /// to `inputs`, their secrets and SSH sockets added to the stage's outline.
    fn run_mounts(
        &mut self,
        stage: usize,
        st: &mut StageState,
        p: &Progress,
        loc: &Located,
        specs: &[MountSpec],
        exec: &mut ExecInputs,
    ) -> Result<(), FrontendError> {
        let ExecInputs { inputs, mounts } = exec;
        let workdir = st.cwd();
        for (i, spec) in specs.iter().enumerate() {
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
            let mut source_input = match &m.from {
                Some(f) => {
                    let d = self.source_for_from(stage, loc, f, p)?;
                    inputs.push(d);
                    Some(inputs.len() - 1)
                }
                None => None,
            };
            if m.kind == MountType::Bind && source_input.is_none() {
                // A bind mount without `from` reads the build context.
                let c = self.context_source();
                inputs.push(c);
                source_input = Some(inputs.len() - 1);
            }
            let mount = lower_mount(&m, i, &workdir, source_input);
            let outline = match &mount.kind {
                MountKind::Secret { id, required, .. } => Some((&mut st.outline.secrets, id, required)),
                MountKind::Ssh { id, required, .. } => Some((&mut st.outline.ssh, id, required)),
                _ => None,
            };
            if let Some((list, id, required)) = outline {
                list.push(OutlineMount {
                    name: id.clone(),
                    required: *required,
                    line: loc.span.start_line,
                });
            }
            mounts.push(mount);
        }
        Ok(())
    }
}

/// The exec mount of the `index`th `--mount` `m`, for a RUN in `workdir`; `source_input` is
/// the input of its `from` (or, for a bind mount, of the context).
fn lower_mount(m: &RunMount, index: usize, workdir: &str, source_input: Option<usize>) -> Mount {
    let abs = |t: &str| {
        values::clean_path(&if t.starts_with('/') {
            t.to_string()
        } else {
            format!("{workdir}/{t}")
        })
    };
    let selector = values::clean_path(m.source.as_deref().unwrap_or("/"));
    let (target, input, selector, kind) = match &m.kind {
        MountType::Bind => (
            abs(m.target.as_deref().unwrap_or("")),
            source_input,
            selector,
            MountKind::Bind,
        ),
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
            let selector = if source_input.is_some() {
                selector
            } else {
                "/".into()
            };
            (target, source_input, selector, kind)
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
                .unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{index}"));
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
    Mount {
        target,
        input,
        selector,
        readonly,
        kind,
    }
}

/// `RUN --network`: `Some(None)` = the build's `--network` (none given, or `default`), `None` =
/// not a mode.
fn run_network(value: Option<&str>) -> Option<Option<NetworkMode>> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("default") => Some(None),
        Some("none") => Some(Some(NetworkMode::None)),
        Some("host") => Some(Some(NetworkMode::Host)),
        Some(_) => None,
    }
}

/// `RUN --security`; `None` = not a mode.
fn run_security(value: Option<&str>) -> Option<SecurityMode> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("sandbox") => Some(SecurityMode::Sandbox),
        Some("insecure") => Some(SecurityMode::Insecure),
        Some(_) => None,
    }
}

/// The history line of a RUN: `RUN |N K=V ... args # buildkit`: every ARG declared so far
/// (`declared`), in order, a name declared twice listed twice, each with the name's value now
/// in `env` (the reference BuildKit's `RUN |4 TAG=local A=second B=given A=second`).
fn run_history(declared: &[(String, Option<String>)], env: &Env, args: &[String]) -> String {
    let build_env: Vec<(&str, &str)> = declared
        .iter()
        .map(|(k, v)| {
            let value = env_get(env, k).or(v.as_deref()).unwrap_or_default();
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
    for a in args {
        created_by.push_str(sep);
        created_by.push_str(a);
        sep = " ";
    }
    created_by.push_str(" # buildkit");
    created_by
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A `--mount` as written (`type=secret,env=TOKEN`), parsed.
    fn mount(spec: &str) -> RunMount {
        let options: Vec<(String, Option<String>)> = spec
            .split(',')
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (kv.to_string(), None),
            })
            .collect();
        parse_mount(&options).unwrap()
    }

    #[test]
    fn secret_mounts_take_their_id_from_the_target_or_env_and_are_readonly() {
        let m = lower_mount(&mount("type=secret,target=conf/token,rw"), 0, "/app", None);
        assert_eq!(m.target, "/app/conf/token");
        assert!(m.readonly, "a secret is read-only even with rw");
        assert!(matches!(&m.kind, MountKind::Secret { id, mode: 0o400, .. } if id == "token"));
        // An env-only secret has no file at all.
        let m = lower_mount(&mount("type=secret,env=TOKEN"), 0, "/", None);
        assert_eq!(m.target, "");
        assert!(
            matches!(&m.kind, MountKind::Secret { id, env: Some(e), .. } if id == "TOKEN" && e == "TOKEN")
        );
        // Neither: /run/secrets/<id>.
        let m = lower_mount(&mount("type=secret,id=npm"), 0, "/", None);
        assert_eq!(m.target, "/run/secrets/npm");
    }

    #[test]
    fn ssh_and_cache_defaults() {
        // The socket path counts the mount's position among the RUN's mounts, as BuildKit's.
        let m = lower_mount(&mount("type=ssh"), 2, "/", None);
        assert_eq!(m.target, "/run/buildkit/ssh_agent.2");
        assert!(matches!(&m.kind, MountKind::Ssh { id, mode: 0o600, .. } if id == "default"));
        // A cache without an id is keyed by its (cleaned, absolute) target.
        let m = lower_mount(&mount("type=cache,target=./go/../cache/"), 0, "/src", None);
        assert_eq!(m.target, "/src/cache");
        assert!(matches!(&m.kind, MountKind::Cache { id, mode: 0o755, .. } if id == "/src/cache"));
        assert_eq!((m.input, m.selector.as_str(), m.readonly), (None, "/", false));
        // Seeded from another stage, the source is the selector.
        let m = lower_mount(
            &mount("type=cache,target=/c,from=deps,source=a/../b"),
            0,
            "/",
            Some(1),
        );
        assert_eq!((m.input, m.selector.as_str()), (Some(1), "/b"));
        // A bind mount is read-only unless rw is given.
        let m = lower_mount(&mount("type=bind,target=/w,source=sub,rw"), 0, "/", Some(3));
        assert_eq!(
            (m.input, m.selector.as_str(), m.readonly),
            (Some(3), "/sub", false)
        );
    }

    #[test]
    fn network_and_security_modes_are_case_insensitive_and_checked() {
        assert_eq!(run_network(None), Some(None));
        assert_eq!(run_network(Some("Default")), Some(None));
        assert_eq!(run_network(Some("HOST")), Some(Some(NetworkMode::Host)));
        assert_eq!(run_network(Some("none")), Some(Some(NetworkMode::None)));
        assert_eq!(run_network(Some("bridge")), None);
        assert_eq!(run_security(Some("Insecure")), Some(SecurityMode::Insecure));
        assert_eq!(run_security(Some("privileged")), None);
    }

    #[test]
    fn history_lists_every_declared_arg_with_its_current_value() {
        let declared = vec![
            ("A".to_string(), Some("first".to_string())),
            ("B".to_string(), None),
            ("A".to_string(), Some("second".to_string())),
        ];
        let env: Env = vec![("A".into(), "now".into())];
        let args = ["/bin/sh".to_string(), "-c".into(), "make".into()];
        assert_eq!(
            run_history(&declared, &env, &args),
            "RUN |3 A=now B= A=now /bin/sh -c make # buildkit"
        );
        assert_eq!(run_history(&[], &env, &args), "RUN /bin/sh -c make # buildkit");
    }

    #[test]
    fn single_heredoc_scripts_are_recognised_and_summarised() {
        assert!(is_single_heredoc("<<EOF", "EOF"));
        assert!(is_single_heredoc("<<-\"EOF\"", "EOF"));
        assert!(!is_single_heredoc("<<EOF bash", "EOF"));
        assert!(!is_single_heredoc("cat <<EOF", "EOF"));
        assert_eq!(summarize_heredoc("\n  echo a\r\necho b\n"), "echo a...");
        assert_eq!(summarize_heredoc("echo a\n"), "echo a");
    }
}
