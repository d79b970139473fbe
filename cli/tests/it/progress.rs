//! `--progress=plain` and `--progress=rawjson` against BuildKit's: the same build (fresh, then
//! fully cached) through `DOCKER_BUILDKIT=1 docker build --progress=plain` and kiln, each
//! output normalised (times, byte counts, step numbers and the order of concurrent steps) and
//! compared with the golden file `testdata/progress/plain.golden`, recorded from BuildKit
//! (`UPDATE_EXPECT=1` records it again from the Docker on the machine).

use std::collections::BTreeMap;
use std::path::Path;

use crate::harness::*;

const DOCKERFILE: &str =
    "FROM busybox:local AS base\nRUN echo hello TOKEN\nFROM base\nCOPY a.txt /a.txt\nRUN cat /a.txt\n";

/// A context whose first RUN is new to every builder (its cache from earlier runs included).
fn context(dir: &Path, token: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), DOCKERFILE.replace("TOKEN", token)).unwrap();
    std::fs::write(dir.join("a.txt"), "one\ntwo\n").unwrap();
    std::fs::write(dir.join(".dockerignore"), "ignored\n").unwrap();
}

/// The words of a status line without its byte count and time: `transferring context: 35B
/// 0.1s done` is `transferring context: done`.
fn strip_figures(line: &str) -> String {
    let is_figure = |w: &str| {
        let w = w.strip_suffix('s').unwrap_or(w);
        let num = w.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        !num.is_empty()
            && num.chars().all(|c| c.is_ascii_digit() || c == '.')
            && num.chars().next().is_some_and(|c| c.is_ascii_digit())
            && (w.len() == num.len() || w.ends_with('B'))
    };
    line.split(' ')
        .filter(|w| !is_figure(w) && *w != "/")
        .collect::<Vec<_>>()
        .join(" ")
}

/// Plain progress as comparable text: one block per step, sorted by name (concurrent steps
/// print in any order), lines without times and byte counts; `#N sha256:` lines (Docker 20.10's
/// BuildKit prints each vertex's digest, newer ones do not) dropped, a status line printed
/// again with ` done` kept once, a base image's `@sha256:` pin dropped, and its `CACHED` or
/// `DONE` (BuildKit marks an image source either way, by whether this session resolved it
/// before) as `RESOLVED` and its step label (`[base 1/2]`, which BuildKit shares with
/// concurrent builds of the same image) as `[*]`, the image ID as `ID`. `token` becomes `TOKEN`.
fn normalise(out: &str, token: &str) -> String {
    let out = out.replace(token, "TOKEN");
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    let mut lines: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for line in out.lines() {
        let Some(rest) = line.strip_prefix('#') else {
            continue;
        };
        let Some((num, text)) = rest.split_once(' ') else {
            continue;
        };
        let Ok(num) = num.parse::<u32>() else { continue };
        if let std::collections::btree_map::Entry::Vacant(e) = names.entry(num) {
            let mut name = match text.split_once("@sha256:") {
                Some((a, _)) => a.to_string(),
                None => text.to_string(),
            };
            // A base image's vertex is shared with any concurrent build of the same daemon,
            // which may have named it (`[1/3] FROM ...`) first: its step label is not compared.
            if let Some((_, image)) = name.split_once("] FROM ") {
                name = format!("[*] FROM {image}");
            }
            e.insert(name);
            continue;
        }
        if text.starts_with("sha256:") || text == "..." || text == names[&num] {
            continue;
        }
        let text = match text.split_once(' ') {
            // A log line: `0.321 hello`.
            Some((t, l)) if t.parse::<f64>().is_ok() && t.contains('.') => format!("| {l}"),
            _ if text.starts_with("DONE") => "DONE".to_string(),
            _ if text.starts_with("writing image sha256:") => strip_figures(&format!(
                "writing image sha256:ID{}",
                &text["writing image sha256:".len() + 64..]
            )),
            _ => strip_figures(text),
        };
        lines.entry(num).or_default().push(text);
    }
    let mut blocks: Vec<String> = names
        .iter()
        .map(|(num, name)| {
            let mut ls = lines.remove(num).unwrap_or_default();
            // A status printed while running and again when done: the done line only.
            let done: Vec<String> = ls
                .iter()
                .filter_map(|l| l.strip_suffix(" done").map(String::from))
                .collect();
            ls.retain(|l| !done.contains(l));
            if name.contains("] FROM ") {
                for l in &mut ls {
                    if l == "CACHED" || l == "DONE" {
                        *l = "RESOLVED".into();
                    }
                }
            }
            let mut b = name.clone();
            for l in ls {
                b.push_str("\n  ");
                b.push_str(&l);
            }
            b
        })
        .collect();
    blocks.sort();
    blocks.join("\n")
}

/// The step names in the order they first printed.
fn order(out: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for line in out.lines() {
        let Some((num, text)) = line.strip_prefix('#').and_then(|r| r.split_once(' ')) else {
            continue;
        };
        if num.parse::<u32>().is_ok() && !seen.iter().any(|(n, _): &(String, String)| n == num) {
            seen.push((num.to_string(), text.to_string()));
        }
    }
    seen.into_iter().map(|(_, t)| t).collect()
}

fn golden_path() -> std::path::PathBuf {
    workspace().join("testdata/progress/plain.golden")
}

fn section(fresh: &str, cached: &str) -> String {
    format!("=== first build\n{fresh}\n=== cached rebuild\n{cached}\n")
}

#[test]
fn plain_progress_matches_buildkits() {
    let env = busybox_env();
    let token = format!("kiln{}", std::process::id());
    let ctx = env.path("ctx");
    context(&ctx, &token);
    let build = |args: &[&str]| {
        let mut a = vec!["build", "--progress=plain", "-t", "kiln-progress-golden:v1"];
        a.extend_from_slice(args);
        a.push(ctx.to_str().unwrap());
        let out = env.ok(&a);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (k1, k2) = (build(&[]), build(&[]));
    let kiln = section(&normalise(&k1, &token), &normalise(&k2, &token));
    // BuildKit's order: the build definition, .dockerignore and base image metadata first, the
    // export last.
    let o = order(&k1);
    assert_eq!(o[0], "[internal] load build definition from Dockerfile", "{k1}");
    assert_eq!(o[1], "[internal] load .dockerignore", "{k1}");
    assert_eq!(
        o[2], "[internal] load metadata for docker.io/library/busybox:local",
        "{k1}"
    );
    assert_eq!(o.last().map(String::as_str), Some("exporting to image"), "{k1}");
    assert!(k1.contains("#9 writing image sha256:"), "{k1}");

    let docker = docker();
    let run_docker = || {
        let out = std::process::Command::new(&docker)
            .args(["build", "--progress=plain", "-t", "kiln-progress-golden:v1"])
            .arg(&ctx)
            .env("DOCKER_BUILDKIT", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", frame(&out));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (d1, d2) = (run_docker(), run_docker());
    let _ = docker_run(&["rmi", "kiln-progress-golden:v1"]);
    let buildkit = section(&normalise(&d1, &token), &normalise(&d2, &token));
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        std::fs::create_dir_all(golden_path().parent().unwrap()).unwrap();
        std::fs::write(golden_path(), &buildkit).unwrap();
    }
    let golden = std::fs::read_to_string(golden_path()).expect("testdata/progress/plain.golden");
    assert_eq!(
        buildkit, golden,
        "BuildKit's output changed (UPDATE_EXPECT=1 records it):\n{d1}\n{d2}"
    );
    assert_eq!(
        kiln, golden,
        "kiln's plain progress differs from BuildKit's:\n{k1}\n{k2}"
    );
}

#[test]
fn rawjson_is_buildkits_solve_status() {
    let env = busybox_env();
    let ctx = env.path("ctx");
    context(&ctx, "raw");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nRUN echo out; echo err >&2\nRUN echo bad && exit 3\n",
    )
    .unwrap();
    let out = env
        .kiln(&["build", "--progress=rawjson", ctx.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", frame(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let objects: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    // Every object is a SolveStatus with only BuildKit's keys.
    for o in &objects {
        for k in o.as_object().unwrap().keys() {
            assert!(
                ["vertexes", "statuses", "logs", "warnings"].contains(&k.as_str()),
                "{o}"
            );
        }
    }
    let vertexes: Vec<&serde_json::Value> = objects
        .iter()
        .filter_map(|o| o.get("vertexes"))
        .flat_map(|v| v.as_array().unwrap())
        .collect();
    let named = |name: &str| {
        vertexes
            .iter()
            .filter(|v| v["name"] == name)
            .cloned()
            .collect::<Vec<_>>()
    };
    let run = named("[2/3] RUN echo out; echo err >&2");
    let last = run.last().expect("the RUN vertex");
    assert!(last["digest"].as_str().unwrap().starts_with("sha256:"), "{last}");
    assert!(last["started"].as_str().unwrap().ends_with('Z'), "{last}");
    assert!(last["completed"].is_string(), "{last}");
    let failed = named("[3/3] RUN echo bad && exit 3");
    assert!(
        failed.last().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("exit code: 3"),
        "{failed:?}"
    );
    let logs: Vec<&serde_json::Value> = objects
        .iter()
        .filter_map(|o| o.get("logs"))
        .flat_map(|v| v.as_array().unwrap())
        .collect();
    let text = |stream: i64| {
        logs.iter()
            .filter(|l| l["vertex"] == last["digest"] && l["stream"] == stream)
            .map(|l| b64(&l["data"]))
            .collect::<String>()
    };
    assert_eq!(text(1), "out\n");
    assert_eq!(text(2), "err\n");
    let statuses: Vec<&serde_json::Value> = objects
        .iter()
        .filter_map(|o| o.get("statuses"))
        .flat_map(|v| v.as_array().unwrap())
        .collect();
    assert!(
        statuses.iter().any(|s| s["id"] == "transferring dockerfile:"
            && s["current"].as_u64() > Some(0)
            && s["completed"].is_string()),
        "{statuses:?}"
    );
    assert!(named("[internal] load metadata for docker.io/library/busybox:local").len() >= 2);
}
