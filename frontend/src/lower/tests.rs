//! Unit tests over hand-built instructions (independent of the parser).

use std::collections::BTreeMap;

use kiln_dag::image::ImageConfig;
use kiln_dag::{Digest, Op, Platform, SourceOp};

use super::*;
use crate::instructions::{CommandLine, CopySpec, Healthcheck, Instruction, Located};
use crate::parser::Span;

struct FakeResolver;

impl ImageResolver for FakeResolver {
    fn resolve(&self, reference: &str, _platform: &Platform) -> Result<ResolvedImage, ResolverError> {
        let mut config = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            ..ImageConfig::default()
        };
        match reference {
            "busybox:local" => {}
            "withcmd" => config.config.cmd = Some(vec!["base-cmd".into()]),
            "withtriggers" => config.config.on_build = Some(vec!["RUN echo from-image".into()]),
            other => {
                return Err(ResolverError::NotFound {
                    reference: other.into(),
                    place: "the fake resolver".into(),
                })
            }
        }
        Ok(ResolvedImage {
            reference: format!("docker.io/library/{reference}"),
            digest: None,
            config,
        })
    }
}

fn at(line: u32, instruction: Instruction, original: &str) -> Located {
    Located {
        instruction,
        span: Span {
            start_line: line,
            end_line: line,
        },
        original: original.into(),
    }
}

fn from(line: u32, image: &str, name: Option<&str>) -> Located {
    at(
        line,
        Instruction::From {
            image: image.into(),
            name: name.map(Into::into),
            platform: None,
        },
        "FROM x",
    )
}

fn run(line: u32, text: &str) -> Located {
    at(
        line,
        Instruction::Run {
            cmd: CommandLine::Shell(text.into()),
            mounts: vec![],
            network: None,
            security: None,
            heredocs: vec![],
        },
        &format!("RUN {text}"),
    )
}

fn trigger_parser(t: &str) -> Result<Located, String> {
    match t.split_once(' ') {
        Some(("RUN", rest)) => Ok(run(1, rest)),
        _ => Err(format!("unsupported trigger {t}")),
    }
}

fn lower_with(ins: &[Located], source: &str, opts: &LowerOptions) -> Result<Lowered, FrontendError> {
    lower_instructions(ins, '\\', source, opts, &FakeResolver, &trigger_parser)
}

fn lower_ok(ins: &[Located]) -> Lowered {
    match lower_with(ins, "", &LowerOptions::default()) {
        Ok(l) => l,
        Err(e) => panic!("{}", e.render(b"")),
    }
}

fn execs(l: &Lowered) -> Vec<kiln_dag::ExecOp> {
    l.graph
        .topo_order(&[l.root])
        .into_iter()
        .filter_map(|d| match &l.graph.get(&d)?.op {
            Op::Exec(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn created_by(l: &Lowered) -> Vec<String> {
    l.config
        .history
        .iter()
        .filter_map(|h| h.created_by.clone())
        .collect()
}

#[test]
fn env_later_pairs_see_old_values() {
    let l = lower_ok(&[
        from(1, "busybox:local", None),
        at(2, Instruction::Env(vec![("A".into(), "1".into())]), "ENV A=1"),
        at(
            3,
            Instruction::Env(vec![("A".into(), "2".into()), ("B".into(), "$A".into())]),
            "ENV A=2 B=$A",
        ),
    ]);
    assert_eq!(l.config.config.env_get("A"), Some("2"));
    assert_eq!(l.config.config.env_get("B"), Some("1"));
    assert_eq!(l.config.config.env_get("PATH"), Some(values::DEFAULT_PATH));
    assert_eq!(created_by(&l), vec!["ENV A=1", "ENV A=2 B=1"]);
}

#[test]
fn expose_volume_healthcheck_forms() {
    let l = lower_ok(&[
        from(1, "busybox:local", None),
        at(
            2,
            Instruction::Expose(vec!["80".into(), "443/udp".into()]),
            "EXPOSE 80 443/udp",
        ),
        at(
            3,
            Instruction::Volume(vec!["/v1".into(), "/v2".into()]),
            "VOLUME [\"/v1\", \"/v2\"]",
        ),
        at(
            4,
            Instruction::Healthcheck(Healthcheck::Cmd {
                cmd: CommandLine::Shell("true".into()),
                interval: Some("5s".into()),
                timeout: None,
                start_period: None,
                start_interval: None,
                retries: Some("2".into()),
            }),
            "HEALTHCHECK --interval=5s --retries=2 CMD true",
        ),
    ]);
    let ports: Vec<&String> = l.config.config.exposed_ports.as_ref().unwrap().keys().collect();
    assert_eq!(ports, ["443/udp", "80/tcp"]);
    assert_eq!(l.config.config.volumes.as_ref().unwrap().len(), 2);
    let hc = l.config.config.healthcheck.as_ref().unwrap();
    assert_eq!(hc.test, ["CMD-SHELL", "true"]);
    assert_eq!((hc.interval, hc.retries, hc.timeout), (5_000_000_000, 2, 0));
    assert_eq!(
        created_by(&l),
        [
            "EXPOSE map[443/udp:{} 80/tcp:{}]",
            "VOLUME [/v1 /v2]",
            "HEALTHCHECK &{[\"CMD-SHELL\" \"true\"] \"5s\" \"0s\" \"0s\" '\\x02'}",
        ]
    );
    let none = lower_ok(&[
        from(1, "busybox:local", None),
        at(2, Instruction::Healthcheck(Healthcheck::None), "HEALTHCHECK NONE"),
    ]);
    assert_eq!(none.config.config.healthcheck.as_ref().unwrap().test, ["NONE"]);
    // `--start-interval` (newer than the reference BuildKit) adds newer BuildKit's field.
    let newer = lower_ok(&[
        from(1, "busybox:local", None),
        at(
            2,
            Instruction::Healthcheck(Healthcheck::Cmd {
                cmd: CommandLine::Exec(vec!["true".into()]),
                interval: None,
                timeout: None,
                start_period: None,
                start_interval: Some("2s".into()),
                retries: None,
            }),
            "HEALTHCHECK --start-interval=2s CMD [\"true\"]",
        ),
    ]);
    assert_eq!(
        created_by(&newer),
        ["HEALTHCHECK &{[\"CMD\" \"true\"] \"0s\" \"0s\" \"0s\" \"2s\" '\\x00'}"]
    );
}

#[test]
fn bad_healthcheck_and_volume_are_errors() {
    let src = "FROM busybox:local\nHEALTHCHECK --interval=5 CMD true\n";
    let e = lower_with(
        &[
            from(1, "busybox:local", None),
            at(
                2,
                Instruction::Healthcheck(Healthcheck::Cmd {
                    cmd: CommandLine::Shell("true".into()),
                    interval: Some("5".into()),
                    timeout: None,
                    start_period: None,
                    start_interval: None,
                    retries: None,
                }),
                "HEALTHCHECK --interval=5 CMD true",
            ),
        ],
        src,
        &LowerOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.line, 2);
    assert_eq!(e.column, 13);
    let e = lower_with(
        &[
            from(1, "busybox:local", None),
            at(2, Instruction::Volume(vec!["".into()]), "VOLUME \"\""),
        ],
        "",
        &LowerOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(*e.kind, LowerError::EmptyVolume));
}

#[test]
fn entrypoint_resets_inherited_cmd_only() {
    let ep = |line| {
        at(
            line,
            Instruction::Entrypoint(CommandLine::Exec(vec!["echo".into()])),
            "ENTRYPOINT [\"echo\"]",
        )
    };
    let l = lower_ok(&[from(1, "withcmd", None), ep(2)]);
    assert_eq!(l.config.config.cmd, None);
    assert_eq!(l.config.config.entrypoint, Some(vec!["echo".to_string()]));
    let l = lower_ok(&[
        from(1, "withcmd", None),
        at(
            2,
            Instruction::Cmd(CommandLine::Exec(vec!["mine".into()])),
            "CMD [\"mine\"]",
        ),
        ep(3),
    ]);
    assert_eq!(l.config.config.cmd, Some(vec!["mine".to_string()]));
    assert_eq!(created_by(&l), [r#"CMD ["mine"]"#, r#"ENTRYPOINT ["echo"]"#]);
}

#[test]
fn run_created_by_and_exec_shape() {
    let l = lower_ok(&[
        from(1, "busybox:local", None),
        run(2, "echo hi"),
        at(
            3,
            Instruction::Run {
                cmd: CommandLine::Exec(vec!["echo".into(), "hi".into()]),
                mounts: vec![],
                network: None,
                security: None,
                heredocs: vec![],
            },
            "RUN [\"echo\", \"hi\"]",
        ),
        at(
            4,
            Instruction::Arg(vec![("X".into(), Some("1".into())), ("Y".into(), None)]),
            "ARG X=1 Y",
        ),
        run(5, "make"),
    ]);
    assert_eq!(
        created_by(&l),
        [
            "RUN /bin/sh -c echo hi # buildkit",
            "RUN echo hi # buildkit",
            "ARG X=1 Y",
            "RUN |2 X=1 Y= /bin/sh -c make # buildkit"
        ]
    );
    let e = execs(&l);
    assert_eq!(e[0].args, ["/bin/sh", "-c", "echo hi"]);
    assert_eq!(e[0].cwd, "/");
    assert_eq!(e[0].mounts[0].target, "/");
    assert_eq!(e[2].env, [format!("PATH={}", values::DEFAULT_PATH), "X=1".into()]);
    assert!(l.config.config.env_get("X").is_none());
    assert!(l
        .config
        .history
        .iter()
        .all(|h| h.comment.as_deref() == Some("buildkit.dockerfile.v0")));
    assert!(!l.config.history[0].empty_layer);
    assert!(l.config.history[2].empty_layer);
}

#[test]
fn unused_build_arg_and_proxies_leave_digests_alone() {
    let ins = [from(1, "busybox:local", None), run(2, "echo hi")];
    let plain = lower_ok(&ins);
    let mut opts = LowerOptions::default();
    opts.build_args.insert("UNUSED".into(), "x".into());
    opts.build_args
        .insert("HTTP_PROXY".into(), "http://proxy:3128".into());
    let with = lower_with(&ins, "", &opts).unwrap();
    assert_eq!(plain.root, with.root);
    assert_eq!(created_by(&plain), created_by(&with));
    assert_eq!(with.proxy_env, ["HTTP_PROXY=http://proxy:3128"]);
    // Declared, the proxy arg is part of the RUN.
    let declared = [
        from(1, "busybox:local", None),
        at(
            2,
            Instruction::Arg(vec![("HTTP_PROXY".into(), None)]),
            "ARG HTTP_PROXY",
        ),
        run(3, "echo hi"),
    ];
    let d = lower_with(&declared, "", &opts).unwrap();
    assert!(execs(&d)[0]
        .env
        .contains(&"HTTP_PROXY=http://proxy:3128".to_string()));
}

#[test]
fn target_prunes_unreachable_stages() {
    let ins = [
        from(1, "busybox:local", Some("a")),
        run(2, "echo a"),
        from(3, "busybox:local", Some("b")),
        run(4, "echo b"),
    ];
    let opts = LowerOptions {
        target: Some("A".into()),
        ..LowerOptions::default()
    };
    let l = lower_with(&ins, "", &opts).unwrap();
    assert_eq!(l.stage_name.as_deref(), Some("a"));
    assert_eq!(l.graph.vertices.len(), 2);
    let opts = LowerOptions {
        target: Some("bb".into()),
        ..LowerOptions::default()
    };
    let e = lower_with(&ins, "", &opts).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Dockerfile: target stage \"bb\" could not be found (did you mean b?)"
    );
}

#[test]
fn onbuild_triggers_run_once() {
    let ins = [
        from(1, "busybox:local", Some("base")),
        at(
            2,
            Instruction::Onbuild("RUN echo triggered".into()),
            "ONBUILD RUN echo triggered",
        ),
        from(3, "base", Some("child")),
        from(4, "child", None),
    ];
    let l = lower_ok(&ins);
    let runs: Vec<String> = execs(&l).iter().map(|e| e.args.join(" ")).collect();
    assert_eq!(runs, ["/bin/sh -c echo triggered"]);
    assert_eq!(l.config.config.on_build, None);
    let base = lower_with(
        &ins,
        "",
        &LowerOptions {
            target: Some("base".into()),
            ..LowerOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        base.config.config.on_build,
        Some(vec!["RUN echo triggered".to_string()])
    );
    // Triggers carried by a base image run too.
    let l = lower_ok(&[from(1, "withtriggers", None)]);
    assert_eq!(execs(&l)[0].args[2], "echo from-image");
}

#[test]
fn copy_from_later_stage_is_an_error() {
    let src = "FROM busybox:local AS a\nCOPY --from=b /x /y\nFROM busybox:local AS b\n";
    let copy = at(
        2,
        Instruction::Copy(CopySpec {
            sources: vec!["/x".into()],
            dest: "/y".into(),
            from: Some("b".into()),
            ..CopySpec::default()
        }),
        "COPY --from=b /x /y",
    );
    let ins = [
        from(1, "busybox:local", Some("a")),
        copy,
        from(3, "busybox:local", Some("b")),
    ];
    let opts = LowerOptions {
        target: Some("a".into()),
        ..LowerOptions::default()
    };
    let e = lower_with(&ins, src, &opts).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Dockerfile:2:13: cannot copy from stage \"b\", it needs to be defined before current stage \"a\""
    );
    assert!(e
        .render(src.as_bytes())
        .ends_with("\nCOPY --from=b /x /y\n            ^"));
}

#[test]
fn copy_lowering_shape() {
    let copy = |sources: &[&str], dest: &str| {
        at(
            3,
            Instruction::Copy(CopySpec {
                sources: sources.iter().map(|s| s.to_string()).collect(),
                dest: dest.into(),
                chown: Some("app:1".into()),
                ..CopySpec::default()
            }),
            "COPY",
        )
    };
    let wd = at(2, Instruction::Workdir("/w".into()), "WORKDIR /w");
    let l = lower_ok(&[
        from(1, "busybox:local", None),
        wd.clone(),
        copy(&["*.txt", "b"], "sub/"),
    ]);
    let v = l.graph.get(&l.root).unwrap();
    let Op::File(f) = &v.op else {
        panic!("not a file op")
    };
    let kiln_dag::FileAction::Copy(c) = &f.actions[0] else {
        panic!("not a copy")
    };
    assert_eq!(
        (c.dest.as_str(), c.dest_is_dir, c.allow_wildcard),
        ("/w/sub", true, true)
    );
    assert_eq!(c.owner.as_ref().unwrap().to_string(), "app:1");
    assert_eq!(v.inputs.len(), 2);
    assert!(matches!(
        l.graph.get(&v.inputs[1]).unwrap().op,
        Op::Source(SourceOp::Local(_))
    ));
    // Several sources to a path without `/`: each is copied to that path in turn, as the
    // reference BuildKit does (not a directory).
    let l = lower_with(
        &[from(1, "busybox:local", None), copy(&["a", "b"], "/file")],
        "",
        &LowerOptions::default(),
    )
    .unwrap();
    let v = l.graph.get(&l.root).unwrap();
    let Op::File(f) = &v.op else {
        panic!("not a file op: {:?}", v.op)
    };
    let dests: Vec<(&str, bool)> = f
        .actions
        .iter()
        .filter_map(|a| match a {
            kiln_dag::FileAction::Copy(c) => Some((c.dest.as_str(), c.dest_is_dir)),
            _ => None,
        })
        .collect();
    assert_eq!(dests, [("/file", false), ("/file", false)]);
}

#[test]
fn lowering_is_deterministic() {
    let ins = [
        from(1, "busybox:local", None),
        run(2, "a"),
        at(3, Instruction::Workdir("x".into()), "WORKDIR x"),
    ];
    let a = lower_ok(&ins);
    let b = lower_ok(&ins);
    assert_eq!(a.root, b.root);
    let keys = |l: &Lowered| l.graph.vertices.keys().copied().collect::<Vec<Digest>>();
    assert_eq!(keys(&a), keys(&b));
    let _ = BTreeMap::<String, String>::new();
}
