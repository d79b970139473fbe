//! Golden tests for Dockerfile lowering, plus a check of the lowered image configs against the
//! configs BuildKit recorded for the differential test cases.
//!
//! Each folder under `tests/lowering/` holds a `Dockerfile`, an optional `build.json`
//! (`build_args`, `target`, `labels`, `no_cache`, `no_cache_filter`, `dockerignore`) and
//! `expected`: the rendered graph, the exec environments and progress names, the final config
//! as pretty JSON and the warnings, or the rendered error when lowering fails. `UPDATE_EXPECT=1`
//! rewrites `expected` instead of comparing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kiln_dag::image::ImageConfig;
use kiln_dag::{Digest, FileAction, Op, Platform};
use kiln_frontend::lower::{lower, ImageResolver, LowerOptions, Lowered, ResolvedImage, ResolverError};
use serde_json::Value;

/// Fixed base images, so the golden output does not depend on any store.
struct TestResolver;

fn base_config() -> ImageConfig {
    ImageConfig {
        architecture: "amd64".into(),
        os: "linux".into(),
        ..ImageConfig::default()
    }
}

impl ImageResolver for TestResolver {
    fn resolve(&self, reference: &str, _platform: &Platform) -> Result<ResolvedImage, ResolverError> {
        let mut config = base_config();
        let normalised = match reference {
            // Like the difftest base: a `docker import` of a rootfs, no config at all.
            "busybox:local" => "docker.io/library/busybox:local",
            // A typical distribution image.
            "alpine:env" => {
                let c = &mut config.config;
                c.env = Some(vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                    "LANG=C.UTF-8".into(),
                ]);
                c.cmd = Some(vec!["/bin/sh".into()]);
                c.working_dir = "/home".into();
                "docker.io/library/alpine:env"
            }
            // An image built with ONBUILD triggers.
            "triggers:local" => {
                config.config.on_build = Some(vec![
                    "RUN echo from-image-trigger > /trig".into(),
                    "ENV TRIGGERED=yes".into(),
                ]);
                "docker.io/library/triggers:local"
            }
            "example.com/tools:1" => "example.com/tools:1",
            other => {
                return Err(ResolverError::NotFound {
                    reference: other.into(),
                    place: "the test resolver".into(),
                })
            }
        };
        let digest = (reference == "example.com/tools:1").then(|| Digest::of(b"tools manifest"));
        Ok(ResolvedImage {
            reference: normalised.into(),
            digest,
            config,
        })
    }
}

fn platform() -> Platform {
    Platform {
        os: "linux".into(),
        architecture: "amd64".into(),
        variant: None,
    }
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Options from a `build.json` / `case.json` object.
fn options(json: &Value) -> LowerOptions {
    LowerOptions {
        build_args: string_map(json.get("build_args")),
        target: json.get("target").and_then(Value::as_str).map(str::to_string),
        platform: platform(),
        labels: string_map(json.get("labels")),
        no_cache: json.get("no_cache").and_then(Value::as_bool).unwrap_or(false),
        no_cache_filter: string_list(json.get("no_cache_filter")),
        dockerignore: string_list(json.get("dockerignore")),
        ..LowerOptions::default()
    }
}

fn read_json(path: &Path) -> Value {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", path.display()))
        }
        Err(_) => Value::Object(serde_json::Map::new()),
    }
}

fn short(d: &Digest) -> String {
    d.hex()[..12].to_string()
}

/// The golden text of a successful lowering.
fn render_lowered(l: &Lowered) -> String {
    let mut out = String::from("# graph\n");
    out.push_str(&l.graph.render(&[l.root]));
    out.push_str("# vertices\n");
    for d in l.graph.topo_order(&[l.root]) {
        let Some(v) = l.graph.get(&d) else { continue };
        let _ = write!(out, "{} {:?}", short(&d), v.meta.name);
        if let Some(stage) = &v.meta.stage {
            let _ = write!(out, " stage={stage}");
        }
        if let Some(loc) = &v.meta.location {
            let _ = write!(out, " at={}:{}-{}", loc.file, loc.start_line, loc.end_line);
        }
        if v.meta.ignore_cache {
            out.push_str(" ignore_cache");
        }
        out.push('\n');
        match &v.op {
            Op::Exec(e) => {
                let _ = writeln!(out, "    env {:?}", e.env);
            }
            Op::File(f) => {
                for a in &f.actions {
                    match a {
                        FileAction::Copy(c) => {
                            let _ = writeln!(
                                out,
                                "    copy {:?} dest_is_dir={} wildcard={} contents_only={} follow={} create={}",
                                c.src,
                                c.dest_is_dir,
                                c.allow_wildcard,
                                c.dir_contents_only,
                                c.follow_symlinks,
                                c.create_dest_path
                            );
                        }
                        FileAction::Mkdir(m) => {
                            let _ = writeln!(
                                out,
                                "    mkdir {:?} parents={} owner={:?}",
                                m.path, m.make_parents, m.owner
                            );
                        }
                        FileAction::Mkfile(m) => {
                            let _ = writeln!(out, "    mkfile {:?} data={:?}", m.path, m.data);
                        }
                        FileAction::Rm(_) => {}
                    }
                }
            }
            _ => {}
        }
    }
    let _ = writeln!(out, "# stage {:?}", l.stage_name);
    if !l.proxy_env.is_empty() {
        let _ = writeln!(out, "# proxy env {:?}", l.proxy_env);
    }
    out.push_str("# config\n");
    let config = serde_json::to_string_pretty(&l.config).unwrap_or_else(|e| panic!("{e}"));
    out.push_str(&config);
    out.push('\n');
    out.push_str("# warnings\n");
    for w in &l.warnings {
        let _ = writeln!(out, "{w}");
    }
    out
}

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lowering")
}

fn run_case(dir: &Path) -> String {
    let dockerfile =
        std::fs::read(dir.join("Dockerfile")).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let opts = options(&read_json(&dir.join("build.json")));
    match lower(&dockerfile, &opts, &TestResolver) {
        Ok(l) => {
            // Determinism: a second lowering gives the same graph and config.
            let again = lower(&dockerfile, &opts, &TestResolver)
                .unwrap_or_else(|e| panic!("{}: second lowering failed: {e}", dir.display()));
            assert_eq!(l.root, again.root, "{}: root digest differs", dir.display());
            assert_eq!(l.config, again.config, "{}: config differs", dir.display());
            render_lowered(&l)
        }
        Err(e) => format!("# error\n{}\n", e.render(&dockerfile)),
    }
}

#[test]
fn golden_cases() {
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(cases_dir())
        .unwrap_or_else(|e| panic!("{}: {e}", cases_dir().display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Dockerfile").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 20, "expected golden cases, found {}", dirs.len());
    let mut failures = Vec::new();
    for dir in &dirs {
        let got = run_case(dir);
        let expected_path = dir.join("expected");
        if update {
            std::fs::write(&expected_path, &got)
                .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
            continue;
        }
        let want = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if want != got {
            failures.push(format!(
                "=== {} differs (UPDATE_EXPECT=1 to accept)\n--- got\n{got}",
                dir.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Golden error cases must really be errors, and successful cases must not be.
#[test]
fn error_cases_are_named_error() {
    for entry in std::fs::read_dir(cases_dir()).unwrap_or_else(|e| panic!("{e}")) {
        let dir = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if !dir.join("Dockerfile").is_file() {
            continue;
        }
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let is_error = run_case(&dir).starts_with("# error\n");
        assert_eq!(
            is_error,
            name.starts_with("error-"),
            "{name}: error-ness does not match the folder name"
        );
    }
}

// ----- BuildKit differential cases ------------------------------------------------------------

const DIFFTEST: &str = "/work/shared/difftest/cases";

/// The config keys the differential harness compares.
const CONFIG_KEYS: [&str; 12] = [
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Volumes",
    "Labels",
    "StopSignal",
    "Healthcheck",
    "Shell",
    "OnBuild",
];

/// The compared part of a config, normalised like the harness: empty values dropped, Env sorted.
fn compared_config(config: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for key in CONFIG_KEYS {
        let Some(v) = config.get(key) else { continue };
        let empty = match v {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        if empty {
            continue;
        }
        let mut v = v.clone();
        if key == "Env" {
            if let Value::Array(a) = &mut v {
                a.sort_by(|x, y| x.as_str().cmp(&y.as_str()));
            }
        }
        out.insert(key.to_string(), v);
    }
    out
}

#[test]
fn difftest_cases_lower_like_buildkit() {
    let Ok(entries) = std::fs::read_dir(DIFFTEST) else {
        eprintln!("{DIFFTEST} not present; skipping");
        return;
    };
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    dirs.sort();
    let mut problems = Vec::new();
    let mut checked = 0;
    let mut compared_fields = 0;
    for dir in dirs {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let case = read_json(&dir.join("case.json"));
        let file = case
            .get("dockerfile")
            .and_then(Value::as_str)
            .unwrap_or("Dockerfile");
        let Ok(dockerfile) = std::fs::read(dir.join(file)) else {
            continue;
        };
        let mut opts = options(&case);
        opts.dockerignore = std::fs::read_to_string(dir.join(".dockerignore"))
            .map(|t| {
                t.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let expected = read_json(&dir.join("expected.json"));
        let must_fail = case.get("expect").and_then(Value::as_str) == Some("fail");
        let result = lower(&dockerfile, &opts, &TestResolver);
        checked += 1;
        match (result, must_fail) {
            (Ok(l), false) => {
                let got = serde_json::to_value(&l.config.config).unwrap_or_else(|e| panic!("{e}"));
                let want = compared_config(expected.get("config").unwrap_or(&Value::Null));
                let got = compared_config(&got);
                compared_fields += want.len();
                if got != want {
                    problems.push(format!(
                        "{name}: config differs\n  want {}\n  got  {}",
                        serde_json::to_string(&want).unwrap_or_default(),
                        serde_json::to_string(&got).unwrap_or_default()
                    ));
                }
            }
            (Err(e), false) => problems.push(format!("{name}: failed to lower: {}", e.render(&dockerfile))),
            // Some failures only happen when building (missing files, failing commands).
            (Ok(_), true) | (Err(_), true) => {}
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {checked} cases differ:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(
        checked >= 30 && compared_fields >= 40,
        "only {checked} cases / {compared_fields} fields compared"
    );
    eprintln!("{checked} cases, {compared_fields} config fields equal to BuildKit's");
}

/// Cases that BuildKit rejects before building anything must be rejected by lowering too.
#[test]
fn difftest_lowering_failures() {
    let dir = Path::new(DIFFTEST).join("fail-unknown-instruction");
    let Ok(dockerfile) = std::fs::read(dir.join("Dockerfile")) else {
        eprintln!("{} not present; skipping", dir.display());
        return;
    };
    let err = lower(&dockerfile, &options(&Value::Null), &TestResolver)
        .err()
        .map(|e| e.render(&dockerfile));
    assert_eq!(
        err.as_deref(),
        Some("Dockerfile:2:1: unknown instruction: FROBNICATE\nFROBNICATE now\n^")
    );
}

// ----- checks, outline and targets --------------------------------------------------------

fn rules(warnings: &[kiln_frontend::lower::Warning]) -> Vec<String> {
    warnings
        .iter()
        .map(|w| format!("{}@{}", w.rule, w.line))
        .collect()
}

/// `--check` lowers every stage: the checks of a stage the target does not reach are found too;
/// a build of the target alone does not report them.
#[test]
fn checks_cover_every_stage_only_when_asked() {
    let df = b"FROM busybox:local AS unused\nCMD echo unused\n\nFROM busybox:local AS used\nCMD [\"ok\"]\n";
    let mut opts = options(&Value::Null);
    let built = lower(df, &opts, &TestResolver).unwrap_or_else(|e| panic!("{}", e.render(df)));
    assert!(built.warnings.is_empty(), "{:?}", built.warnings);
    opts.all_stages = true;
    let checked = lower(df, &opts, &TestResolver).unwrap_or_else(|e| panic!("{}", e.render(df)));
    assert_eq!(rules(&checked.warnings), ["JSONArgsRecommended@2"]);
    let w = &checked.warnings[0];
    assert_eq!(
        w.url,
        "https://docs.docker.com/go/dockerfile/rule/json-args-recommended/"
    );
    assert_eq!(
        w.description,
        "JSON arguments recommended for ENTRYPOINT/CMD to prevent unintended behavior related to OS signals"
    );
}

/// `error=true` fails with the rules found (each once, sorted) and keeps the warnings; a bad
/// check option is an error of its own.
#[test]
fn check_errors_carry_their_warnings() {
    let df = b"# check=error=true\nFROM busybox:local as a\nFROM busybox:local as b\n";
    let e = lower(df, &options(&Value::Null), &TestResolver)
        .err()
        .unwrap_or_else(|| panic!("error=true must fail"));
    assert_eq!(e.kind.to_string(), "lint violation found for rules: FromAsCasing");
    assert_eq!(rules(&e.warnings), ["FromAsCasing@2", "FromAsCasing@3"]);

    let df = b"# check=skip=all;error=maybe\nFROM busybox:local\n";
    let e = lower(df, &options(&Value::Null), &TestResolver)
        .err()
        .unwrap_or_else(|| panic!("a bad check option must fail"));
    assert!(
        e.render(df).starts_with(
            "Dockerfile:1:1: failed to parse check options: failed to parse check option \"error=maybe\""
        ),
        "{}",
        e.render(df)
    );
}

/// `--call=outline`: the target's build arguments with their values and descriptions, the
/// secrets and SSH sockets its RUN steps mount.
#[test]
fn outline_of_a_target() {
    let df = b"ARG BASE=busybox:local\n# build has the tools\nFROM ${BASE} AS build\n\
# VERSION picks the release\nARG VERSION=1.2\nARG UNSET\n\
RUN --mount=type=secret,id=token,required=true --mount=type=ssh,id=git true\n\
FROM build AS release\nRUN --mount=type=secret,id=aws true\n";
    let mut opts = options(&serde_json::json!({"target": "build", "build_args": {"VERSION": "2"}}));
    let l = lower(df, &opts, &TestResolver).unwrap_or_else(|e| panic!("{}", e.render(df)));
    let o = &l.outline;
    assert_eq!(
        (o.name.as_str(), o.description.as_str()),
        ("build", "has the tools")
    );
    let args: Vec<_> = o
        .args
        .iter()
        .map(|a| (a.name.as_str(), a.value.as_str(), a.description.as_str()))
        .collect();
    assert_eq!(
        args,
        [
            ("BASE", "busybox:local", ""),
            ("VERSION", "2", "picks the release"),
            ("UNSET", "", "")
        ]
    );
    let secrets: Vec<_> = o.secrets.iter().map(|s| (s.name.as_str(), s.required)).collect();
    assert_eq!(secrets, [("token", true)]);
    let ssh: Vec<_> = o.ssh.iter().map(|s| (s.name.as_str(), s.required)).collect();
    assert_eq!(ssh, [("git", false)]);

    opts.target = None;
    let l = lower(df, &opts, &TestResolver).unwrap_or_else(|e| panic!("{}", e.render(df)));
    let secrets: Vec<_> = l.outline.secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(secrets, ["token", "aws"]);
    assert_eq!(l.outline.name, "release");
}

/// `--call=targets`: every stage with the description from the comments right above its FROM
/// (the first line starting with the stage name, as BuildKit's `getComment`),
/// the last one the default.
#[test]
fn targets_with_descriptions() {
    let df = b"# syntax=docker/dockerfile:1\n# base is the tools\nFROM busybox:local AS Base\n\n\
# a loose comment\n\nFROM base AS test\n# release ships\n# it all\nFROM base AS release\nFROM release\n";
    let t = kiln_frontend::lower::targets(df, "Dockerfile").unwrap_or_else(|e| panic!("{}", e.render(df)));
    let got: Vec<_> = t
        .iter()
        .map(|t| (t.name.as_str(), t.description.as_str(), t.default, t.line))
        .collect();
    assert_eq!(
        got,
        [
            ("base", "is the tools", false, 3),
            ("test", "", false, 7),
            ("release", "ships", false, 10),
            ("", "", true, 11),
        ]
    );
}
