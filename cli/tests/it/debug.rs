//! `kiln debug parse` and `kiln debug graph`: output formats, exit codes and stability.

use std::path::{Path, PathBuf};

use crate::harness::{busybox_env, frame, Env};

/// The BuildKit conformance corpus: `KILN_CONFORMANCE_DIR`, else `../shared/conformance` from
/// the workspace root (as the frontend's conformance test finds it).
fn corpus_dir() -> PathBuf {
    match std::env::var_os("KILN_CONFORMANCE_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance"),
    }
}

/// The `buildkit-parser/testfiles/<case>` folders that hold both a `Dockerfile` and a `result`.
fn parser_cases() -> Vec<PathBuf> {
    let dir = corpus_dir().join("buildkit-parser/testfiles");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.join("Dockerfile").is_file() && p.join("result").is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn parse_prints_the_corpus_result() {
    let env = Env::new();
    let cases = parser_cases();
    assert!(
        !cases.is_empty(),
        "no parser cases under {} (set KILN_CONFORMANCE_DIR)",
        corpus_dir().display()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let file = case.join("Dockerfile");
        let expected = std::fs::read(case.join("result")).unwrap();
        let out = env
            .kiln(&["debug", "parse", file.to_str().unwrap()])
            .output()
            .unwrap();
        if !out.status.success() || out.stdout != expected {
            failures.push(format!(
                "{}: expected exit 0 and\n{}\n{}",
                case.display(),
                String::from_utf8_lossy(&expected),
                frame(&out)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} corpus cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn parse_error_names_file_line_column_with_caret() {
    let env = Env::new();
    let file = env.path("Dockerfile.bad");
    // `ENV` without a value is a parse error (BuildKit's `env_no_value` negative case). The
    // blank line and the comment before it check that lines are counted in the source, the
    // indent that the column is the instruction's.
    std::fs::write(&file, "FROM busybox\n\nRUN echo ok\n  # comment\n  ENV PATH\n").unwrap();
    let out = env
        .kiln(&["debug", "parse", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", frame(&out));
    assert!(out.stdout.is_empty(), "{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(format!("{}:5:3: ENV must have two arguments", file.display()).as_str()),
        "{err}"
    );
    assert_eq!(lines.get(1).copied(), Some("  ENV PATH"), "{err}");
    assert_eq!(lines.get(2).copied(), Some("  ^"), "{err}");
}

#[test]
fn parse_of_a_missing_file_fails() {
    let env = Env::new();
    let missing = env.path("nope/Dockerfile");
    let err = env.fails(&["debug", "parse", missing.to_str().unwrap()]);
    assert!(err.contains("nope/Dockerfile"), "{err}");
}

/// A context with two stages: the final one uses `$USED`; `UNUSED` is declared nowhere.
fn graph_context(env: &Env) -> PathBuf {
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("hello.txt"), "hello\n").unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local AS base\n\
         RUN echo base > /base\n\
         \n\
         FROM base\n\
         ARG USED=default\n\
         COPY hello.txt /hello.txt\n\
         RUN echo $USED > /used\n\
         WORKDIR /app\n",
    )
    .unwrap();
    ctx
}

fn graph(env: &Env, ctx: &Path, args: &[&str]) -> String {
    let mut all = vec!["debug", "graph"];
    all.extend_from_slice(args);
    all.push(ctx.to_str().unwrap());
    stdout(&env.ok(&all))
}

#[test]
fn graph_is_one_line_per_vertex_and_stable() {
    let env = busybox_env();
    let ctx = graph_context(&env);
    let first = graph(&env, &ctx, &[]);
    let second = graph(&env, &ctx, &[]);
    assert_eq!(first, second, "two runs differ");
    let lines: Vec<&str> = first.lines().collect();
    // image, RUN base, context, COPY, RUN used, WORKDIR.
    assert_eq!(lines.len(), 6, "{first}");
    let mut seen = std::collections::BTreeSet::new();
    for line in &lines {
        let digest = line.split(' ').next().unwrap();
        assert_eq!(digest.len(), 12, "{line}");
        assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()), "{line}");
        assert!(seen.insert(digest.to_string()), "vertex printed twice: {line}");
        // Every input was printed on an earlier line (topological order).
        if let Some((_, inputs)) = line.split_once(" <- ") {
            for input in inputs.split(' ') {
                assert!(
                    seen.contains(input) && input != digest,
                    "input {input} not printed before {line}\n{first}"
                );
            }
        }
    }
    assert!(lines.iter().any(|l| l.contains("echo base")), "{first}");
}

#[test]
fn graph_changes_only_with_used_build_args() {
    let env = busybox_env();
    let ctx = graph_context(&env);
    let plain = graph(&env, &ctx, &[]);
    let explicit_default = graph(&env, &ctx, &["--build-arg", "USED=default"]);
    assert_eq!(plain, explicit_default, "the default value changed the graph");
    let unused = graph(&env, &ctx, &["--build-arg", "UNUSED=1"]);
    assert_eq!(plain, unused, "an unused build arg changed the graph");
    let changed = graph(&env, &ctx, &["--build-arg", "USED=other"]);
    assert_ne!(plain, changed, "a used build arg did not change the graph");
    // The args are in the exec's env, which the summary does not show: the vertices before
    // `RUN echo $USED` print identically, that one and everything built on it get new digests.
    let before: Vec<&str> = plain.lines().collect();
    let after: Vec<&str> = changed.lines().collect();
    assert_eq!(before.len(), after.len(), "{plain}\n{changed}");
    let used_at = before
        .iter()
        .position(|l| l.contains("echo $USED"))
        .unwrap_or_else(|| panic!("no RUN echo $USED vertex\n{plain}"));
    assert_eq!(before[..used_at], after[..used_at], "{plain}\n{changed}");
    for (b, a) in before[used_at..].iter().zip(&after[used_at..]) {
        assert_ne!(b, a, "{plain}\n{changed}");
    }
}

#[test]
fn graph_target_selects_a_stage() {
    let env = busybox_env();
    let ctx = graph_context(&env);
    let base = graph(&env, &ctx, &["--target", "base"]);
    assert_eq!(base.lines().count(), 2, "{base}");
    assert!(base.contains("echo base"), "{base}");
    let err = env.fails(&["debug", "graph", "--target", "missing", ctx.to_str().unwrap()]);
    assert!(err.contains("missing"), "{err}");
}
