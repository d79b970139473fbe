//! BuildKit's Dockerfile checks end to end: the build's warning summary, `--check`,
//! `--call=outline|targets`, the `# check=` directive and `BUILDKIT_DOCKERFILE_CHECK`, and the
//! predefined `TARGETSTAGE` and `BUILDKIT_SANDBOX_HOSTNAME`. Needs root (namespaces, overlayfs).

use std::path::{Path, PathBuf};

use crate::harness::{busybox_env, Env};

fn setup(dockerfile: &str) -> (Env, PathBuf) {
    let env = busybox_env();
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    (env, ctx)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `kiln ARGS... CTX`; returns (exit code, stdout, stderr).
fn run(env: &Env, ctx: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = args.to_vec();
    all.push(s(ctx));
    let out = env.kiln(&all).output().expect("spawn kiln");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const TWO_WARNINGS: &str = "FROM busybox:local as base\nCMD echo hi\n";

#[test]
fn build_summarises_the_checks_warnings_as_buildx() {
    let (env, ctx) = setup(TWO_WARNINGS);
    let (code, _, err) = run(&env, &ctx, &["build", "--progress=plain"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.ends_with(
            "\n 2 warnings found (use --debug to expand):\n \
             - FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)\n \
             - JSONArgsRecommended: JSON arguments recommended for CMD to prevent unintended \
             behavior related to OS signals (line 2)\n"
        ),
        "{err}"
    );
    // --debug expands each with its description, URL and the Dockerfile lines.
    let (_, _, err) = run(&env, &ctx, &["--debug", "build", "--progress=plain"]);
    assert!(err.contains(" 2 warnings found:\n"), "{err}");
    assert!(
        err.contains("More info: https://docs.docker.com/go/dockerfile/rule/from-as-casing/\n"),
        "{err}"
    );
    assert!(err.contains("   1 | >>> FROM busybox:local as base\n"), "{err}");
}

#[test]
fn check_prints_the_warnings_and_exits_1() {
    let (env, ctx) = setup(TWO_WARNINGS);
    let (code, out, err) = run(&env, &ctx, &["build", "--check"]);
    assert_eq!(code, 1, "{out}{err}");
    let expected = "\
Check complete, 2 warnings have been found!

WARNING: FromAsCasing - https://docs.docker.com/go/dockerfile/rule/from-as-casing/
'as' and 'FROM' keywords' casing do not match
Dockerfile:1
--------------------
   1 | >>> FROM busybox:local as base
   2 |     CMD echo hi
   3 |     
--------------------

WARNING: JSONArgsRecommended - https://docs.docker.com/go/dockerfile/rule/json-args-recommended/
JSON arguments recommended for CMD to prevent unintended behavior related to OS signals
Dockerfile:2
--------------------
   1 |     FROM busybox:local as base
   2 | >>> CMD echo hi
   3 |     
--------------------
";
    assert_eq!(out, expected);
    // --call=check is the same; nothing was built.
    let (code, out2, _) = run(&env, &ctx, &["build", "--call=check"]);
    assert_eq!((code, out2.as_str()), (1, expected));
    // Only BuildKit's bookkeeping steps (reading the Dockerfile, the base image) show.
    assert!(
        !err.contains("RUN") && !err.contains("exporting to image"),
        "{err}"
    );
}

#[test]
fn check_without_warnings_succeeds() {
    let (env, ctx) = setup("FROM busybox:local AS base\nCMD [\"true\"]\n");
    let (code, out, err) = run(&env, &ctx, &["build", "--check"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "Check complete, no warnings found.\n"),
        "{err}"
    );
}

#[test]
fn check_directive_skips_rules_and_makes_warnings_errors() {
    let (env, ctx) = setup(&format!(
        "# check=skip=JSONArgsRecommended;error=true\n{TWO_WARNINGS}"
    ));
    let (code, _, err) = run(&env, &ctx, &["build", "--progress=plain"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            " 1 warning found (use --debug to expand):\n \
             - FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 2)\n\
             ERROR: lint violation found for rules: FromAsCasing\n"
        ),
        "{err}"
    );
    assert!(!err.contains("JSONArgsRecommended"), "{err}");

    // The build argument overrides the directive.
    let (code, _, err) = run(
        &env,
        &ctx,
        &[
            "build",
            "--progress=plain",
            "--build-arg",
            "BUILDKIT_DOCKERFILE_CHECK=skip=all",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");

    // Under --check the error is printed after the warnings and the exit code is 1.
    let (code, out, err) = run(&env, &ctx, &["build", "--check"]);
    assert_eq!(code, 1);
    assert!(
        out.starts_with("Check complete, 1 warning has been found!\n"),
        "{out}"
    );
    assert!(
        err.contains("ERROR: lint violation found for rules: FromAsCasing"),
        "{err}"
    );
}

#[test]
fn unknown_syntax_frontend_is_a_warning() {
    let (env, ctx) = setup("# syntax=example.com/my/frontend:1\nFROM busybox:local\n");
    let (code, _, err) = run(&env, &ctx, &["build", "--progress=plain"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("the built-in Dockerfile frontend is used"), "{err}");
}

#[test]
fn call_outline_lists_args_secrets_and_ssh() {
    let (env, ctx) = setup(
        "ARG BASE=busybox:local\n\n# build has the tools\nFROM ${BASE} AS build\n\
         # VERSION picks the release\nARG VERSION=1.2\nARG EMPTY\n\
         RUN --mount=type=secret,id=token,required=true --mount=type=ssh true\n\
         FROM build AS release\nRUN --mount=type=secret,id=aws true\n",
    );
    let (code, out, err) = run(&env, &ctx, &["build", "--call=outline", "--target", "build"]);
    assert_eq!(code, 0, "{err}");
    let expected = "\
TARGET:      build
DESCRIPTION: has the tools

BUILD ARG   VALUE           DESCRIPTION
BASE        busybox:local   
VERSION     1.2             picks the release
EMPTY                       

SECRET   REQUIRED
token    true

SSH       REQUIRED
default   

";
    assert_eq!(out, expected, "{}", frame_text(&out, &err));
    // The default target, the last stage, reaches the other secret too.
    let (_, out, _) = run(&env, &ctx, &["build", "--call=outline"]);
    assert!(out.starts_with("TARGET: release\n\nBUILD ARG"), "{out}");
    assert!(out.contains("token    true\naws      \n"), "{out}");
}

#[test]
fn call_targets_lists_stages_with_descriptions() {
    let (env, ctx) = setup(
        "# base is the tools\nFROM busybox:local AS base\n\n# not a description\n\n\
         FROM base AS test\n# release ships\nFROM base AS release\nFROM release\n",
    );
    let (code, out, err) = run(&env, &ctx, &["build", "--call=targets"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "TARGET    DESCRIPTION\nbase      is the tools\ntest      \nrelease   ships\n(default) \n"
    );
    let (code, _, err) = run(&env, &ctx, &["build", "--call=outline,format=json"]);
    assert_eq!(code, 1);
    assert!(err.contains("format `json` is not supported"), "{err}");
}

#[test]
fn targetstage_and_sandbox_hostname_reach_run() {
    let (env, ctx) = setup(
        "FROM busybox:local AS first\nARG TARGETSTAGE\nRUN echo \"$TARGETSTAGE\" > /t && hostname > /h\n\
         FROM first AS second\n",
    );
    let out = env.path("out");
    let dest = format!("type=local,dest={}", s(&out));
    let (code, _, err) = run(
        &env,
        &ctx,
        &[
            "build",
            "--progress=plain",
            "--target",
            "first",
            "-o",
            &dest,
            "--build-arg",
            "BUILDKIT_SANDBOX_HOSTNAME=myhost",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(out.join("t")).unwrap(), "first\n");
    assert_eq!(std::fs::read_to_string(out.join("h")).unwrap(), "myhost\n");
}

#[test]
fn base_image_of_another_platform_warns() {
    // The imported busybox is of the host's platform; ask for the other one.
    let (host, other) = if std::env::consts::ARCH == "aarch64" {
        ("linux/arm64", "linux/amd64")
    } else {
        ("linux/amd64", "linux/arm64")
    };
    let (env, ctx) = setup(&format!("ARG P={other}\nFROM --platform=$P busybox:local\n"));
    let (code, _, err) = run(&env, &ctx, &["build", "--progress=plain"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!(
            " - InvalidBaseImagePlatform: Base image busybox:local was pulled with platform \
             \"{host}\", expected \"{other}\" for current build (line 2)\n"
        )),
        "{err}"
    );
}

fn frame_text(out: &str, err: &str) -> String {
    format!("---- stdout ----\n{out}\n---- stderr ----\n{err}")
}
