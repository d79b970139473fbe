//! The instructions that change the image config (ENV, LABEL, CMD, ENTRYPOINT, EXPOSE,
//! VOLUME, USER, STOPSIGNAL, ARG, WORKDIR), as BuildKit's `dispatchEnv` & co.; MAINTAINER,
//! SHELL and ONBUILD are one line each in [`Lowerer::dispatch`].

use std::collections::BTreeMap;

use kiln_dag::{FileAction, FileOp, MkdirAction, Op};

use super::dispatch::Lowerer;
use super::error::{FrontendError, LowerError};
use super::state::{env_get, env_set, with_shell, Progress, StageState, NON_ENV_ARGS};
use super::values;
use super::OutlineArg;
use crate::instructions::{CommandLine, Located};
use crate::lint;

impl Lowerer<'_> {
    /// ENV: every pair is expanded with the environment from before the instruction.
    pub(super) fn dispatch_env(
        &mut self,
        st: &mut StageState,
        loc: &Located,
        pairs: &[(String, String)],
    ) -> Result<(), FrontendError> {
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
        st.history(msg, false);
        Ok(())
    }

    /// LABEL.
    pub(super) fn dispatch_label(
        &mut self,
        st: &mut StageState,
        loc: &Located,
        pairs: &[(String, String)],
    ) -> Result<(), FrontendError> {
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
        st.history(msg, false);
        Ok(())
    }

    /// CMD (`is_cmd`) and ENTRYPOINT.
    pub(super) fn dispatch_command(
        &mut self,
        st: &mut StageState,
        p: &mut Progress,
        loc: &Located,
        cl: &CommandLine,
        is_cmd: bool,
    ) -> Result<(), FrontendError> {
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
                with_shell(&st.config, t)
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
        st.history(msg, false);
        Ok(())
    }

    /// EXPOSE.
    pub(super) fn dispatch_expose(
        &mut self,
        st: &mut StageState,
        loc: &Located,
        ports: &[String],
    ) -> Result<(), FrontendError> {
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
        st.history(format!("EXPOSE {}", values::go_set(&set)), false);
        Ok(())
    }

    /// VOLUME.
    pub(super) fn dispatch_volume(
        &mut self,
        st: &mut StageState,
        loc: &Located,
        vols: &[String],
    ) -> Result<(), FrontendError> {
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
        st.history(format!("VOLUME {}", values::go_list(&list)), false);
        Ok(())
    }

    /// USER.
    pub(super) fn dispatch_user(
        &mut self,
        st: &mut StageState,
        loc: &Located,
        u: &str,
    ) -> Result<(), FrontendError> {
        let u = self.expand_in(loc, u, st)?;
        st.config.config.user = u.clone();
        st.history(format!("USER {u}"), false);
        Ok(())
    }

    /// STOPSIGNAL.
    pub(super) fn dispatch_stopsignal(
        &mut self,
        st: &mut StageState,
        loc: &Located,
        s: &str,
    ) -> Result<(), FrontendError> {
        let s = self.expand_in(loc, s, st)?;
        if !values::valid_signal(&s) {
            return Err(self.err(loc, None, LowerError::BadSignal { signal: s }));
        }
        st.config.config.stop_signal = s.clone();
        st.history(format!("STOPSIGNAL {s}"), false);
        Ok(())
    }

    /// ARG: declares build arguments in the stage, with a `--build-arg`, their default or the global value.
    pub(super) fn dispatch_arg(
        &mut self,
        st: &mut StageState,
        p: &Progress,
        loc: &Located,
        pairs: &[(String, Option<String>)],
    ) -> Result<(), FrontendError> {
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
        st.history(format!("ARG {}", parts.join(" ")), false);
        Ok(())
    }

    /// WORKDIR: sets the working directory and makes it (a layer unless it is `/`).
    pub(super) fn dispatch_workdir(
        &mut self,
        st: &mut StageState,
        p: &mut Progress,
        loc: &Located,
        path: &str,
    ) -> Result<(), FrontendError> {
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
        // The directory made, and every use of it, is the cleaned path.
        let written = workdir_path(&st.cwd(), &path);
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
        st.history(format!("WORKDIR {written}"), layer);
        Ok(())
    }

    /// SecretsUsedInArgOrEnv on one ARG / ENV key.
    pub(super) fn check_secret_key(&mut self, instruction: &str, key: &str, loc: &Located) {
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
    pub(super) fn check_expose(&mut self, raw: &str, loc: &Located) {
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
}

/// LegacyKeyValueFormat's message for `ENV` / `LABEL`.
fn legacy_message(keyword: &str) -> String {
    format!("\"{keyword} key=value\" should be used instead of legacy \"{keyword} key value\" format")
}

/// The working directory a WORKDIR sets, as the config and history show it: BuildKit keeps an
/// absolute path as written (`/app/` stays `/app/`) and joins a relative one onto the current
/// directory `cwd`, cleaned.
fn workdir_path(cwd: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        values::clean_path(&format!("{cwd}/{path}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workdir_keeps_an_absolute_path_as_written_and_joins_a_relative_one() {
        assert_eq!(workdir_path("/", "/app/"), "/app/");
        assert_eq!(workdir_path("/srv", "/a/../b"), "/a/../b");
        assert_eq!(workdir_path("/srv", "web/../api/"), "/srv/api");
        assert_eq!(workdir_path("/", "."), "/");
    }

    #[test]
    fn legacy_format_message_names_the_instruction() {
        assert_eq!(
            legacy_message("ENV"),
            "\"ENV key=value\" should be used instead of legacy \"ENV key value\" format"
        );
    }
}
