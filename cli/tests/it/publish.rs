//! Publishing from `kiln build` (`--push`, `-o type=image,name=...,push=true`,
//! `-o type=registry`) against the reference registry, with and without Basic auth, then pulled
//! by kiln into a fresh store and by Docker, and run. Needs root and the registry; the Docker
//! test needs dockerd.

use std::process::Command;

use crate::harness::docker;
use crate::harness::{busybox_env, require_root, Env};
use crate::registry::{fails, ok, run_ok, write_dockerfile, Registry};

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// A context whose image holds `/p` = `text`.
fn context(env: &Env, text: &str) -> std::path::PathBuf {
    let ctx = env.path("ctx");
    write_dockerfile(&ctx, &format!("FROM busybox:local\nRUN echo {text} > /p\n"));
    ctx
}

/// The `Digest:` line of `kiln pull`.
fn pulled_digest(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("Digest: "))
        .unwrap_or_else(|| panic!("no digest in\n{out}"))
        .trim()
        .to_string()
}

/// Pulls `image` into a fresh store (logged in with `login` first), runs `cat /p` in it;
/// returns what it printed and the pulled digest.
fn pull_and_cat(image: &str, login: Option<(&str, &str, &str)>) -> (String, String) {
    let b = Env::new();
    if let Some((user, pass, host)) = login {
        ok(&b, &["login", "-u", user, "-p", pass, host]);
    }
    let pulled = ok(&b, &["pull", image]);
    let cat = ok(&b, &["run", "--rm", image, "cat", "/p"]);
    (cat, pulled_digest(&pulled))
}

fn metadata(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The manifest the registry serves for `repo:tag` (plain HTTP, no auth): its bytes, parsed.
fn registry_manifest(addr: &str, repo: &str, tag: &str) -> (String, serde_json::Value) {
    let out = run_ok(Command::new("curl").args([
        "-sf",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{addr}/v2/{repo}/manifests/{tag}"),
    ]));
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    (out, v)
}

#[test]
fn every_name_of_every_push_form_is_published_and_pullable() {
    require_root();
    let reg = Registry::start(None);
    let env = busybox_env();
    let ctx = context(&env, "published");
    let at = |rest: &str| format!("{}/kiln/{rest}", reg.addr);
    let meta = env.path("meta.json");

    // --push with -t: tagged locally and pushed.
    ok(
        &env,
        &[
            "build",
            "--progress=plain",
            "--push",
            "--load",
            "-t",
            &at("tagged:v1"),
            "--metadata-file",
            s(&meta),
            s(&ctx),
        ],
    );
    let m = metadata(&meta);
    let (cat, digest) = pull_and_cat(&at("tagged:v1"), None);
    assert_eq!(cat, "published\n");
    assert_eq!(
        m["containerimage.digest"],
        digest.as_str(),
        "the metadata names what was pushed"
    );
    assert_eq!(m["containerimage.descriptor"]["digest"], digest.as_str());
    assert_eq!(m["image.name"], at("tagged:v1").as_str());
    let (raw, manifest) = registry_manifest(&reg.addr, "kiln/tagged", "v1");
    assert_eq!(
        m["containerimage.descriptor"]["size"].as_u64().unwrap(),
        raw.len() as u64,
        "the descriptor's size is the pushed manifest's"
    );
    assert_eq!(m["containerimage.descriptor"]["mediaType"], manifest["mediaType"]);
    env.inspect(&at("tagged:v1"));

    // Repeated name= keys, and buildx's quoted "name=A,B" form.
    ok(
        &env,
        &[
            "build",
            "-q",
            "-o",
            &format!("type=image,name={},name={},push=true", at("a:1"), at("b:2")),
            s(&ctx),
        ],
    );
    ok(
        &env,
        &[
            "build",
            "-q",
            "-o",
            &format!("type=image,\"name={},{}\",push=true", at("c:3"), at("d:4")),
            s(&ctx),
        ],
    );
    // type=registry pushes without naming the image locally.
    let err_meta = env.path("meta-registry.json");
    ok(
        &env,
        &[
            "build",
            "-q",
            "--metadata-file",
            s(&err_meta),
            "-o",
            &format!("type=registry,name={}", at("e:5")),
            s(&ctx),
        ],
    );
    for name in ["a:1", "b:2", "c:3", "d:4", "e:5"] {
        let (cat, _) = pull_and_cat(&at(name), None);
        assert_eq!(cat, "published\n", "{name}");
    }
    for name in ["a:1", "b:2", "c:3", "d:4"] {
        env.inspect(&at(name));
    }
    let out = env.kiln(&["inspect", &at("e:5")]).output().unwrap();
    assert!(!out.status.success(), "type=registry does not tag locally");
    assert_eq!(metadata(&err_meta)["image.name"], at("e:5").as_str());
}

#[test]
fn docker_pulls_and_runs_a_pushed_build() {
    require_root();
    let docker = docker();
    let reg = Registry::start(None);
    let env = busybox_env();
    let ctx = context(&env, "seen-by-docker");
    let image = format!("{}/kiln/built-for-docker:v1", reg.addr);
    ok(&env, &["build", "-q", "--push", "-t", &image, s(&ctx)]);
    run_ok(Command::new(&docker).args(["pull", &image]));
    let out = run_ok(Command::new(&docker).args(["run", "--rm", &image, "cat", "/p"]));
    let _ = Command::new(&docker).args(["rmi", "-f", &image]).output();
    assert_eq!(out, "seen-by-docker\n");
}

#[test]
fn pushing_from_a_build_uses_the_login_of_kiln_login() {
    require_root();
    let reg = Registry::start(Some("builder:b-secret"));
    let env = busybox_env();
    let ctx = context(&env, "behind-auth");
    let image = format!("{}/kiln/private:v1", reg.addr);
    let err = fails(&env, &["build", "-q", "--push", "-t", &image, s(&ctx)]);
    assert!(err.contains("401"), "an anonymous push is refused:\n{err}");
    assert!(err.contains(&image), "the error names the image:\n{err}");
    ok(&env, &["login", "-u", "builder", "-p", "b-secret", &reg.addr]);
    ok(&env, &["build", "-q", "--push", "-t", &image, s(&ctx)]);
    let (cat, _) = pull_and_cat(&image, Some(("builder", "b-secret", &reg.addr)));
    assert_eq!(cat, "behind-auth\n");
}

#[test]
fn compression_choices_reach_the_registry() {
    require_root();
    let reg = Registry::start(None);
    let env = busybox_env();
    let ctx = context(&env, "compressed");
    let local_meta = env.path("local.json");
    ok(&env, &["build", "-q", "--metadata-file", s(&local_meta), s(&ctx)]);
    let local_digest = metadata(&local_meta)["containerimage.digest"].clone();

    let layer_types = |repo: &str| -> Vec<String> {
        registry_manifest(&reg.addr, repo, "v1").1["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["mediaType"].as_str().unwrap().to_string())
            .collect()
    };
    for (compression, repo, suffix) in [
        ("gzip", "kiln/gz", "tar+gzip"),
        ("zstd", "kiln/zst", "tar+zstd"),
        ("uncompressed", "kiln/raw", "tar"),
    ] {
        let image = format!("{}/{repo}:v1", reg.addr);
        let meta = env.path(&format!("{compression}.json"));
        ok(
            &env,
            &[
                "build",
                "-q",
                "--metadata-file",
                s(&meta),
                "-o",
                &format!("type=registry,name={image},compression={compression}"),
                s(&ctx),
            ],
        );
        let types = layer_types(repo);
        assert!(
            types.iter().all(|t| t.ends_with(suffix)),
            "{compression}: {types:?}"
        );
        let (cat, digest) = pull_and_cat(&image, None);
        assert_eq!(cat, "compressed\n", "{compression}");
        let pushed = metadata(&meta)["containerimage.digest"].clone();
        assert_eq!(pushed, digest.as_str(), "{compression}");
        // Sent as stored, the manifest is the local one byte for byte.
        assert_eq!(
            pushed == local_digest,
            compression == "uncompressed",
            "{compression}"
        );
    }
}

#[test]
fn output_options_kiln_does_not_implement_fail_and_push_nothing() {
    require_root();
    let reg = Registry::start(None);
    let env = busybox_env();
    let ctx = context(&env, "never");
    let image = format!("{}/kiln/refused:v1", reg.addr);
    for (output, needle) in [
        (
            format!("type=image,name={image},push=true,unpack=true"),
            "`unpack`",
        ),
        (
            format!("type=image,name={image},push=true,push-by-digest=true"),
            "`push-by-digest`",
        ),
        (format!("type=image,name={image},compression=zstd"), "push=true"),
        (
            format!("type=registry,name={image},oci-mediatypes=false"),
            "oci-mediatypes=false",
        ),
        (
            format!("type=image,name={image},push=yes-please"),
            "push=yes-please",
        ),
    ] {
        let err = fails(&env, &["build", "-q", "-o", &output, s(&ctx)]);
        assert!(err.contains(needle), "{output}: {err}");
    }
    let err = fails(
        &env,
        &[
            "build",
            "-q",
            "--push",
            "-o",
            &format!("type=local,dest={}", s(&env.path("d"))),
            s(&ctx),
        ],
    );
    assert!(err.contains("--push"), "{err}");
    let err = fails(&env, &["build", "-q", "--push", s(&ctx)]);
    assert!(err.contains("no name"), "{err}");
    // Nothing reached the registry.
    let b = Env::new();
    let err = fails(&b, &["pull", &image]);
    assert!(err.contains("refused"), "{err}");
}
