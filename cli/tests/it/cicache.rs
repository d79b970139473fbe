//! CI caching builds: `--cache-to`/`--cache-from` through the reference registry (also with
//! Basic auth), a directory and an image's inline cache, between two stores and two checkouts;
//! cache mounts that travel; the faults of a registry (through the fault proxy). RUN executions
//! are counted from `--progress=rawjson` (a RUN that starts is a RUN that ran) and from the
//! marker each RUN prints; bytes pulled are counted at the proxy.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::harness::{busybox_env, frame, require_root, Env};
use crate::registry::{fails, kiln, ok, run_ok, Faults, Proxy, Registry};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A project with a dependency stage (`deps`, deterministic), a second one (`tools`, random
/// bytes: only ever reused, never rebuilt equal) and a final stage copying both and the app.
const DOCKERFILE: &str = "FROM busybox:local AS deps\n\
RUN echo RAN-deps && echo deps-v1 > /deps.txt\n\
FROM busybox:local AS tools\n\
RUN echo RAN-tools && head -c 200000 /dev/urandom > /tools.bin\n\
FROM busybox:local\n\
COPY --from=deps /deps.txt /opt/deps.txt\n\
COPY --from=tools /tools.bin /opt/tools.bin\n\
COPY app/ /app/\n\
RUN echo RAN-final && cat /app/* | wc -c > /app.size\n";

/// Writes the project into `dir` (a checkout: fresh files, fresh mtimes).
fn checkout(dir: &Path, app: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::write(dir.join("Dockerfile"), DOCKERFILE).unwrap();
    for i in 0..5 {
        std::fs::write(dir.join(format!("app/m{i}.txt")), format!("module {i} {app}\n")).unwrap();
    }
    dir.to_path_buf()
}

/// A second store whose busybox:local is the very image of `a` (saved and loaded), so the
/// images built on both can be compared by ID.
fn twin(a: &Env) -> Env {
    let b = Env::new();
    let tar = b.path("base.tar");
    a.ok(&["save", "-o", s(&tar), "busybox:local"]);
    b.ok(&["load", "-i", s(&tar)]);
    b
}

/// What one build did: the RUN steps that started, the RUN markers printed, the warnings.
struct Built {
    runs: Vec<String>,
    markers: Vec<String>,
    warnings: Vec<String>,
    stderr: String,
}

fn rawjson(stderr: &str) -> Built {
    let mut b = Built {
        runs: Vec::new(),
        markers: Vec::new(),
        warnings: Vec::new(),
        stderr: stderr.to_string(),
    };
    // BuildKit's SolveStatus objects: a vertex that starts (not cached) is an executed step.
    use base64::Engine as _;
    let decode = |v: &serde_json::Value| {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    for line in stderr.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        for vx in v["vertexes"].as_array().into_iter().flatten() {
            let name = vx["name"].as_str().unwrap_or("");
            let starting = vx.get("started").is_some() && vx.get("completed").is_none();
            if starting && vx["cached"] != true && name.contains(" RUN ") {
                b.runs.push(name.to_string());
            }
        }
        for log in v["logs"].as_array().into_iter().flatten() {
            let data = decode(&log["data"]);
            for m in data.split_whitespace().filter(|w| w.starts_with("RAN-")) {
                b.markers.push(m.to_string());
            }
        }
        for w in v["warnings"].as_array().into_iter().flatten() {
            b.warnings.push(decode(&w["short"]));
        }
    }
    b
}

/// `kiln build --progress=rawjson ARGS`, which must succeed.
fn build(env: &Env, args: &[&str]) -> Built {
    build_as(env, &["build"], args)
}

/// `kiln COMMAND --progress=rawjson ARGS` (`COMMAND` being `build` with any global flags before
/// it), which must succeed.
fn build_as(env: &Env, command: &[&str], args: &[&str]) -> Built {
    let mut all = command.to_vec();
    all.push("--progress=rawjson");
    all.extend_from_slice(args);
    let out = kiln(env, &all);
    assert!(out.status.success(), "kiln {all:?} failed\n{}", frame(&out));
    rawjson(&String::from_utf8_lossy(&out.stderr))
}

fn image_id(env: &Env, name: &str) -> String {
    env.inspect(name)["Id"].as_str().unwrap().to_string()
}

/// The cache config at `repo:tag` (plain HTTP, no auth), and its manifest.
fn cache_config(addr: &str, repo: &str, tag: &str) -> (serde_json::Value, serde_json::Value) {
    let manifest: serde_json::Value = serde_json::from_str(&run_ok(Command::new("curl").args([
        "-sf",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        &format!("http://{addr}/v2/{repo}/manifests/{tag}"),
    ])))
    .unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();
    let config: serde_json::Value = serde_json::from_str(&run_ok(
        Command::new("curl").args(["-sf", &format!("http://{addr}/v2/{repo}/blobs/{config}")]),
    ))
    .unwrap();
    (manifest, config)
}

/// The blob digest (as the cache holds it) of the top layer of the record whose step name
/// contains `step`.
fn top_layer_of(config: &serde_json::Value, step: &str) -> String {
    let r = config["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["description"].as_str().unwrap_or("").contains(step))
        .unwrap_or_else(|| panic!("no record for {step} in {config}"));
    let top = r["layers"].as_array().unwrap().last().unwrap().as_u64().unwrap() as usize;
    config["layers"][top]["digest"].as_str().unwrap().to_string()
}

fn http_status(url: &str) -> String {
    run_ok(Command::new("curl").args(["-s", "-o", "/dev/null", "-I", "-w", "%{http_code}", url]))
}

#[test]
fn registry_cache_rebuilds_on_an_empty_store_in_another_checkout_without_running_or_pulling_more() {
    let reg = Registry::start(None);
    let a = busybox_env();
    let b = twin(&a);
    let proxy = Proxy::start(&reg.addr, Faults::default());
    let cache = format!("{}/ci/app:cache", proxy.addr);
    let ctx_a = checkout(&a.path("src-a"), "v1");
    let first = build(
        &a,
        &[
            "-t",
            "app",
            "--cache-to",
            &format!("type=registry,ref={cache},mode=max"),
            s(&ctx_a),
        ],
    );
    assert_eq!(first.runs.len(), 3, "{}", first.stderr);

    // Store B, another checkout path, files written later (other mtimes).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let ctx_b = checkout(&b.path("elsewhere/checkout"), "v1");
    proxy.blob_gets.lock().unwrap().clear();
    let second = build(
        &b,
        &[
            "-t",
            "app",
            "--cache-from",
            &format!("type=registry,ref={cache}"),
            s(&ctx_b),
        ],
    );
    assert!(
        second.runs.is_empty() && second.markers.is_empty(),
        "RUN steps ran on B:\n{}",
        second.stderr
    );
    assert_eq!(
        image_id(&a, "app"),
        image_id(&b, "app"),
        "the same image on both stores"
    );
    let out = b.ok(&["run", "--rm", "app", "cat", "/app.size", "/opt/deps.txt"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "60\ndeps-v1\n");

    // Lazy: B fetched the final image's layers, never the stages' own layers.
    let (_, config) = cache_config(&reg.addr, "ci/app", "cache");
    let tools = top_layer_of(&config, "RUN echo RAN-tools");
    let deps = top_layer_of(&config, "RUN echo RAN-deps");
    let gets = proxy.blob_gets.lock().unwrap().clone();
    let pulled: u64 = gets.iter().map(|(_, n)| n).sum();
    eprintln!(
        "bytes pulled by the fully cached build into the store: {pulled} in {} blob GETs",
        gets.len()
    );
    for (path, _) in &gets {
        assert!(
            !path.ends_with(&tools) && !path.ends_with(&deps),
            "fetched a stage's layer: {path}"
        );
    }
    assert!(
        pulled > 200_000,
        "the final image's layers were fetched ({pulled} bytes)"
    );

    // Only the last step changed: only what it needs is fetched (the layers below it), and only
    // it runs.
    let c = twin(&a);
    let ctx_c = checkout(&c.path("third"), "v2");
    proxy.blob_gets.lock().unwrap().clear();
    let third = build(
        &c,
        &[
            "-t",
            "app",
            "--cache-from",
            &format!("type=registry,ref={cache}"),
            s(&ctx_c),
        ],
    );
    assert_eq!(third.markers, ["RAN-final"], "{}", third.stderr);
    let gets = proxy.blob_gets.lock().unwrap().clone();
    for (path, _) in &gets {
        assert!(
            !path.ends_with(&tools) && !path.ends_with(&deps),
            "fetched a stage's layer: {path}"
        );
    }
    eprintln!(
        "bytes pulled when the last step changed: {} in {} blob GETs",
        gets.iter().map(|(_, n)| n).sum::<u64>(),
        gets.len()
    );

    // A fully cached build pushing to the registry that holds the cache moves no layer bytes.
    let d = twin(&a);
    let ctx_d = checkout(&d.path("fourth"), "v1");
    proxy.blob_gets.lock().unwrap().clear();
    proxy.log.lock().unwrap().clear();
    let pushed = format!("{}/ci/release:1", proxy.addr);
    let fourth = build(
        &d,
        &[
            "-t",
            &pushed,
            "--push",
            "--cache-from",
            &format!("type=registry,ref={cache}"),
            s(&ctx_d),
        ],
    );
    assert!(fourth.runs.is_empty(), "{}", fourth.stderr);
    // Every layer is HEAD-skipped or mounted from the cache's repository: the one blob
    // uploaded is the image config (the image ID).
    let log = proxy.log.lock().unwrap().clone();
    let uploaded: Vec<String> = log
        .iter()
        .filter(|l| l.starts_with("PUT ") && l.contains("/blobs/uploads/"))
        .map(|l| {
            l.split("digest=")
                .nth(1)
                .unwrap_or("")
                .split('&')
                .next()
                .unwrap()
                .replace("%3A", ":")
        })
        .collect();
    assert_eq!(uploaded, [image_id(&d, &pushed)], "{log:#?}");
    assert_eq!(
        log.iter().filter(|l| l.starts_with("PATCH ")).count(),
        1,
        "{log:#?}"
    );
}

#[test]
fn min_exports_the_result_chain_and_max_every_stage() {
    let reg = Registry::start(None);
    let a = busybox_env();
    let ctx = checkout(&a.path("src"), "v1");
    let min = format!("{}/ci/min:c", reg.addr);
    let max = format!("{}/ci/max:c", reg.addr);
    build(
        &a,
        &[
            "-t",
            "app",
            "--cache-to",
            &format!("type=registry,ref={min}"),
            "--cache-to",
            &format!("type=registry,ref={max},mode=max,image-manifest=false"),
            s(&ctx),
        ],
    );
    // min: the `deps` stage is not in the cache and runs again; it gives the same file, so the
    // copy of it and everything after it are cached. `tools` gives new bytes: with min, its copy
    // and the rest run again.
    let b = twin(&a);
    let with_min = build(
        &b,
        &[
            "-t",
            "app",
            "--cache-from",
            &min,
            s(&checkout(&b.path("src"), "v1")),
        ],
    );
    assert!(
        with_min.markers.contains(&"RAN-deps".to_string()),
        "{}",
        with_min.stderr
    );
    assert!(
        with_min.markers.contains(&"RAN-tools".to_string()),
        "{}",
        with_min.stderr
    );
    let c = twin(&a);
    let with_max = build(
        &c,
        &[
            "-t",
            "app",
            "--cache-from",
            &max,
            s(&checkout(&c.path("src"), "v1")),
        ],
    );
    assert!(with_max.runs.is_empty(), "{}", with_max.stderr);
    assert_eq!(image_id(&a, "app"), image_id(&c, "app"));
    // The min cache holds no record of the stages' RUNs; the max one does.
    let (_, config) = cache_config(&reg.addr, "ci/min", "c");
    let names: Vec<&str> = config["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["description"].as_str().unwrap())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.contains("RAN-deps") || n.contains("RAN-tools")),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n.contains("RAN-final")), "{names:?}");
}

/// A one-stage project: an inline cache (the result's own chain) covers all of it.
fn checkout_single(dir: &Path, app: &str) -> PathBuf {
    checkout(dir, app);
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox:local\nCOPY app/ /app/\nRUN echo RAN-final && cat /app/* | wc -c > /app.size\n",
    )
    .unwrap();
    dir.to_path_buf()
}

#[test]
fn inline_cache_travels_in_the_pushed_image() {
    let reg = Registry::start(None);
    let a = busybox_env();
    let ctx = checkout_single(&a.path("src"), "v1");
    let image = format!("{}/ci/inline:1", reg.addr);
    build(
        &a,
        &["-t", &image, "--push", "--cache-to", "type=inline", s(&ctx)],
    );
    let b = twin(&a);
    let second = build(
        &b,
        &[
            "-t",
            "app",
            "--cache-to",
            "type=inline",
            "--cache-from",
            &image,
            s(&checkout_single(&b.path("co"), "v1")),
        ],
    );
    assert!(second.runs.is_empty(), "{}", second.stderr);
    assert_eq!(
        image_id(&a, &image),
        image_id(&b, "app"),
        "the same image, inline cache included"
    );
    // Inline is min: in the three-stage project the stages' RUNs are not in it, the final
    // stage's deterministic copy is.
    let multi = checkout(&a.path("multi"), "v1");
    let image3 = format!("{}/ci/inline:3", reg.addr);
    build(
        &a,
        &["-t", &image3, "--push", "--cache-to", "type=inline", s(&multi)],
    );
    let e = twin(&a);
    let fifth = build(
        &e,
        &[
            "-t",
            "app",
            "--cache-from",
            &image3,
            s(&checkout(&e.path("co"), "v1")),
        ],
    );
    assert!(
        fifth.markers.contains(&"RAN-deps".to_string()),
        "{}",
        fifth.stderr
    );
    assert!(
        fifth
            .stderr
            .lines()
            .any(|l| l.contains("\"cached\"") && l.contains("COPY --from=deps")),
        "{}",
        fifth.stderr
    );
    // The build argument means the same.
    let image2 = format!("{}/ci/inline:2", reg.addr);
    build(
        &a,
        &[
            "-t",
            &image2,
            "--push",
            "--build-arg",
            "BUILDKIT_INLINE_CACHE=1",
            s(&ctx),
        ],
    );
    let c = twin(&a);
    let third = build(
        &c,
        &[
            "-t",
            "app",
            "--cache-from",
            &image2,
            s(&checkout_single(&c.path("co"), "v1")),
        ],
    );
    assert!(third.runs.is_empty(), "{}", third.stderr);
    // A plain image (no inline cache) is a warning, not a failure.
    let plain = format!("{}/ci/inline:plain", reg.addr);
    build(&a, &["-t", &plain, "--push", s(&ctx)]);
    let d = twin(&a);
    let fourth = build(
        &d,
        &[
            "-t",
            "app",
            "--cache-from",
            &plain,
            s(&checkout_single(&d.path("co"), "v1")),
        ],
    );
    assert!(
        fourth.warnings.iter().any(|w| w.contains("neither a kiln cache")),
        "{}",
        fourth.stderr
    );
    assert_eq!(fourth.runs.len(), 1);
}

/// The blobs of a local cache directory.
fn dir_blobs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn local_cache_dir_survives_a_kill_during_export_and_drops_old_blobs() {
    let a = busybox_env();
    let dir = a.path("cache-dir");
    let ctx = checkout(&a.path("src"), "v1");
    let to = format!("type=local,dest={},mode=max", dir.display());
    build(&a, &["-t", "app", "--cache-to", &to, s(&ctx)]);
    let first_index = std::fs::read(dir.join("index.json")).unwrap();

    let from = format!("type=local,src={}", dir.display());
    let b = twin(&a);
    let second = build(
        &b,
        &[
            "-t",
            "app",
            "--cache-from",
            &from,
            s(&checkout(&b.path("co"), "v1")),
        ],
    );
    assert!(second.runs.is_empty(), "{}", second.stderr);
    assert_eq!(image_id(&a, "app"), image_id(&b, "app"));

    // kill -9 while a big new layer is being written into the directory.
    let big = a.path("big");
    std::fs::create_dir_all(&big).unwrap();
    std::fs::write(
        big.join("Dockerfile"),
        "FROM busybox:local\nRUN head -c 64000000 /dev/urandom > /big.bin\n",
    )
    .unwrap();
    let mut child = a
        .kiln(&["build", "-q", "--cache-to", &to, s(&big)])
        .env("DOCKER_CONFIG", a.path("docker-config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let mut killed = false;
    while start.elapsed() < std::time::Duration::from_secs(120) {
        let writing = std::fs::read_dir(dir.join("blobs/sha256"))
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            })
            .unwrap_or(false);
        if writing {
            child.kill().unwrap();
            killed = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.wait();
    assert!(killed, "never saw the export writing a blob");
    assert_eq!(
        std::fs::read(dir.join("index.json")).unwrap(),
        first_index,
        "the old cache is still the one named"
    );
    let c = twin(&a);
    let third = build(
        &c,
        &[
            "-t",
            "app",
            "--cache-from",
            &from,
            s(&checkout(&c.path("co"), "v1")),
        ],
    );
    assert!(
        third.runs.is_empty(),
        "the previous cache still works after the kill:\n{}",
        third.stderr
    );

    // A later export replaces the cache and drops what nothing names any more (and the killed
    // export's temp file).
    build(
        &a,
        &[
            "-t",
            "app",
            "--cache-to",
            &format!("type=local,dest={}", dir.display()),
            s(&checkout(&a.path("src"), "v2")),
        ],
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let manifest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("blobs/sha256").join(&manifest)).unwrap()).unwrap();
    let mut named: Vec<String> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(std::iter::once(&m["config"]))
        .map(|d| {
            d["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect();
    named.push(manifest);
    named.sort();
    named.dedup();
    assert_eq!(dir_blobs(&dir), named);
}

#[test]
fn cache_mounts_travel_and_seed_a_fresh_store() {
    let reg = Registry::start(None);
    let a = busybox_env();
    let ctx = a.path("src");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nARG STEP=write\n\
         RUN --mount=type=secret,id=tok --mount=type=cache,id=dl,target=/c sh -c \
         'if [ \"$STEP\" = write ]; then echo seeded > /c/marker; cp /run/secrets/tok /c/tok; else cat /c/marker && test ! -e /c/tok; fi'\n",
    )
    .unwrap();
    std::fs::write(a.path("tok"), "s3cr3t-value-123").unwrap();
    let secret = format!("id=tok,src={}", a.path("tok").display());
    let cache = format!("{}/ci/mounts:c", reg.addr);
    let first = build(
        &a,
        &[
            "--secret",
            &secret,
            "--cache-to",
            &format!("type=registry,ref={cache},cache-mounts=true"),
            s(&ctx),
        ],
    );
    assert!(
        first
            .warnings
            .iter()
            .any(|w| w.contains("tok") && w.contains("secret")),
        "the secret's copy is left out with a warning:\n{}",
        first.stderr
    );
    // On a fresh store the RUN (a different STEP: it runs) finds the marker, and no secret.
    let b = twin(&a);
    let read = [
        "--secret",
        secret.as_str(),
        "--build-arg",
        "STEP=read",
        "--cache-from",
        cache.as_str(),
        s(&ctx),
    ];
    let second = build(&b, &read);
    assert_eq!(second.runs.len(), 1, "{}", second.stderr);
    // A fully cached build on a fresh store (the RUN does not run, its mount is never made
    // here) still carries the imported mount into the cache it exports.
    let e = twin(&a);
    let relay = format!("{}/ci/mounts:relay", reg.addr);
    let cached = build(
        &e,
        &[
            "--secret",
            &secret,
            "--cache-from",
            &cache,
            "--cache-to",
            &format!("type=registry,ref={relay},cache-mounts=true"),
            s(&ctx),
        ],
    );
    assert!(cached.runs.is_empty(), "{}", cached.stderr);
    let f = twin(&a);
    let via_relay = [
        "--secret",
        secret.as_str(),
        "--build-arg",
        "STEP=read",
        "--cache-from",
        relay.as_str(),
        s(&ctx),
    ];
    assert_eq!(build(&f, &via_relay).runs.len(), 1);
    // Without the cache the same RUN fails: the marker came from the cache.
    let c = twin(&a);
    let mut args = vec![
        "build",
        "--secret",
        secret.as_str(),
        "--build-arg",
        "STEP=read",
        s(&ctx),
    ];
    fails(&c, &args);
    // Unchanged, a mount is not uploaded again.
    let proxy = Proxy::start(&reg.addr, Faults::default());
    let via = format!("{}/ci/mounts:c", proxy.addr);
    build(
        &a,
        &[
            "--secret",
            &secret,
            "--cache-to",
            &format!("type=registry,ref={via},cache-mounts=true"),
            s(&ctx),
        ],
    );
    let uploads = proxy
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("POST "))
        .count();
    assert_eq!(uploads, 0, "{:?}", proxy.log.lock().unwrap());
    // A mount bigger than cache-mounts-max-size stays home, with a warning.
    let small = format!("{}/ci/mounts:small", reg.addr);
    let capped = build(
        &a,
        &[
            "--secret",
            &secret,
            "--cache-to",
            &format!("type=registry,ref={small},cache-mounts=dl,cache-mounts-max-size=4"),
            s(&ctx),
        ],
    );
    assert!(
        capped
            .warnings
            .iter()
            .any(|w| w.contains("cache-mounts-max-size")),
        "{}",
        capped.stderr
    );
    let d = twin(&a);
    args = vec![
        "build",
        "--secret",
        secret.as_str(),
        "--build-arg",
        "STEP=read",
        "--cache-from",
        small.as_str(),
        s(&ctx),
    ];
    fails(&d, &args);
}

#[test]
fn missing_and_corrupt_caches_never_give_a_wrong_result() {
    let reg = Registry::start(None);
    let a = busybox_env();
    let ctx = checkout(&a.path("src"), "v1");
    let cache = format!("{}/ci/faults:c", reg.addr);
    build(
        &a,
        &[
            "-t",
            "app",
            "--cache-to",
            &format!("type=registry,ref={cache},mode=max"),
            s(&ctx),
        ],
    );

    // A ref that does not exist: a warning, the build goes on uncached.
    let b = twin(&a);
    let missing = build(
        &b,
        &[
            "-t",
            "app",
            "--cache-from",
            &format!("{}/ci/nothing:here", reg.addr),
            s(&ctx),
        ],
    );
    assert!(
        missing.warnings.iter().any(|w| w.contains("nothing:here")),
        "{}",
        missing.stderr
    );
    assert_eq!(missing.runs.len(), 3);

    // A corrupt layer of the final RUN: rejected by its digest, that step runs again.
    let (_, config) = cache_config(&reg.addr, "ci/faults", "c");
    let final_layer = top_layer_of(&config, "RUN echo RAN-final");
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            corrupt: Some(final_layer.clone()),
            ..Faults::default()
        },
    );
    let c = twin(&a);
    let via = format!("{}/ci/faults:c", proxy.addr);
    let corrupt = build(&c, &["-t", "app", "--cache-from", &via, s(&ctx)]);
    assert_eq!(corrupt.markers, ["RAN-final"], "{}", corrupt.stderr);
    assert!(
        corrupt.warnings.iter().any(|w| w.contains("unusable")),
        "{}",
        corrupt.stderr
    );
    let out = c.ok(&["run", "--rm", "app", "cat", "/app.size"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "60\n");

    // Truncated once: the download is retried and verified; nothing runs.
    proxy.faults.lock().unwrap().corrupt = None;
    proxy.faults.lock().unwrap().truncate_once = Some(final_layer);
    let d = twin(&a);
    let truncated = build(&d, &["-t", "app", "--cache-from", &via, s(&ctx)]);
    assert!(truncated.runs.is_empty(), "{}", truncated.stderr);
    assert_eq!(image_id(&a, "app"), image_id(&d, "app"));
}

#[test]
fn export_failures_fail_the_build_unless_ignored() {
    let reg = Registry::start(Some("ci:pw"));
    let a = busybox_env();
    let ctx = checkout(&a.path("src"), "v1");
    // 401: not logged in.
    let cache = format!("{}/ci/auth:c", reg.addr);
    let err = fails(
        &a,
        &[
            "build",
            "-q",
            "--cache-to",
            &format!("type=registry,ref={cache}"),
            s(&ctx),
        ],
    );
    assert!(
        err.contains("401") || err.contains("unauthorized") || err.contains("credentials"),
        "{err}"
    );
    ok(
        &a,
        &[
            "build",
            "-q",
            "--cache-to",
            &format!("type=registry,ref={cache},ignore-error=true"),
            s(&ctx),
        ],
    );
    // Logged in, the export works and a fresh store reads it.
    ok(&a, &["login", "-u", "ci", "-p", "pw", &reg.addr]);
    ok(
        &a,
        &[
            "build",
            "-q",
            "-t",
            "app",
            "--cache-to",
            &format!("type=registry,ref={cache},mode=max"),
            s(&ctx),
        ],
    );
    let b = twin(&a);
    ok(&b, &["login", "-u", "ci", "-p", "pw", &reg.addr]);
    let read = build(
        &b,
        &[
            "-t",
            "app",
            "--cache-from",
            &cache,
            s(&checkout(&b.path("co"), "v1")),
        ],
    );
    assert!(read.runs.is_empty(), "{}", read.stderr);

    // 403, 5xx and 429 (after retries) through the proxy.
    let open = Registry::start(None);
    let proxy = Proxy::start(&open.addr, Faults::default());
    let to = format!("type=registry,ref={}/ci/faults:c", proxy.addr);
    for fault in ["403", "500", "429"] {
        {
            let mut f = proxy.faults.lock().unwrap();
            *f = Faults::default();
            match fault {
                "403" => f.deny_uploads = Some("403 Forbidden"),
                "500" => f.deny_uploads = Some("500 Internal Server Error"),
                _ => f.deny_uploads = Some("429 Too Many Requests"),
            }
        }
        let err = fails(&a, &["build", "-q", "--cache-to", &to, s(&ctx)]);
        assert!(err.contains(fault), "{fault}: {err}");
        let out = kiln(
            &a,
            &[
                "build",
                "--progress=rawjson",
                "--cache-to",
                &format!("{to},ignore-error=true"),
                s(&ctx),
            ],
        );
        assert!(out.status.success(), "{fault}\n{}", frame(&out));
        let built = rawjson(&String::from_utf8_lossy(&out.stderr));
        assert!(
            built.warnings.iter().any(|w| w.contains("ignore-error")),
            "{}",
            frame(&out)
        );
    }
    // The manifest refused after the blobs went up: still a failure.
    {
        let mut f = proxy.faults.lock().unwrap();
        *f = Faults::default();
        f.deny_manifests = Some("403 Forbidden");
    }
    let err = fails(&a, &["build", "-q", "--cache-to", &to, s(&ctx)]);
    assert!(err.contains("403"), "{err}");
}

#[test]
fn two_exports_racing_to_one_ref_leave_one_whole_cache() {
    require_root();
    let reg = Registry::start(None);
    let a = busybox_env();
    let b = twin(&a);
    let cache = format!("{}/ci/race:c", reg.addr);
    let to = format!("type=registry,ref={cache},mode=max");
    let ctx_a = checkout(&a.path("src"), "a");
    let ctx_b = checkout(&b.path("src"), "b");
    let spawn = |env: &Env, ctx: &Path| {
        env.kiln(&["build", "-q", "-t", "app", "--cache-to", &to, s(ctx)])
            .env("DOCKER_CONFIG", env.path("docker-config"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (pa, pb) = (spawn(&a, &ctx_a), spawn(&b, &ctx_b));
    for p in [pa, pb] {
        let out = p.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", frame(&out));
    }
    // Every blob the manifest names is there.
    let (manifest, config) = cache_config(&reg.addr, "ci/race", "c");
    for l in manifest["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        assert_eq!(
            http_status(&format!("http://{}/v2/ci/race/blobs/{d}", reg.addr)),
            "200",
            "{d}"
        );
    }
    // And it is one build's whole cache: a fresh store builds that build's context from it.
    assert!(config["records"].as_array().is_some_and(|r| !r.is_empty()));
    let c = twin(&a);
    let with_a = build(
        &c,
        &[
            "-t",
            "app",
            "--cache-from",
            &cache,
            s(&checkout(&c.path("a"), "a")),
        ],
    );
    let d = twin(&a);
    let with_b = build(
        &d,
        &[
            "-t",
            "app",
            "--cache-from",
            &cache,
            s(&checkout(&d.path("b"), "b")),
        ],
    );
    assert!(
        with_a.runs.is_empty() || with_b.runs.is_empty(),
        "neither build is whole in the cache:\n{}\n{}",
        with_a.stderr,
        with_b.stderr
    );
}

#[test]
fn bad_cache_flags_are_clear_errors() {
    let env = Env::new();
    for (flag, value, want) in [
        ("--cache-to", "type=gha", "not supported"),
        ("--cache-from", "type=s3,bucket=b", "not supported"),
        ("--cache-to", "type=azblob,name=x", "not supported"),
        (
            "--cache-to",
            "type=registry,ref=r.example/a:c,colour=red",
            "unknown key `colour`",
        ),
        ("--cache-to", "type=local", "needs dest="),
        (
            "--cache-to",
            "type=registry,ref=r.example/a:c,mode=all",
            "mode=all",
        ),
    ] {
        let err = env.fails(&["build", flag, value, "."]);
        assert!(err.contains(want), "{flag} {value}: {err}");
    }
}

/// Writes an OCI layout at `dir` whose one manifest has a config of `media_type` holding
/// `config`.
fn layout_with_config(dir: &Path, media_type: &str, config: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let tmp = blobs.join("new");
        std::fs::write(&tmp, bytes).unwrap();
        let sum = run_ok(Command::new("sha256sum").arg(&tmp));
        let hex = sum.split_whitespace().next().unwrap().to_string();
        std::fs::rename(&tmp, blobs.join(&hex)).unwrap();
        format!("sha256:{hex}")
    };
    let config_digest = put(config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": media_type, "digest": config_digest, "size": config.len()},
        "layers": [],
    })
    .to_string();
    let manifest_digest = put(manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest.len()}],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[test]
fn foreign_and_other_version_caches_are_ignored_with_a_warning() {
    let a = busybox_env();
    let ctx = checkout_single(&a.path("src"), "v1");
    let cases = [
        (
            "buildkit",
            "application/vnd.buildkit.cacheconfig.v0",
            r#"{"layers":[],"records":[]}"#.to_string(),
            "BuildKit's cache manifest",
        ),
        (
            "v2",
            "application/vnd.kiln.cache.config.v1+json",
            r#"{"kind":"kiln build cache","version":2,"key_version":2,"layers":[],"records":[]}"#.to_string(),
            "version 2 of kiln's cache format",
        ),
        (
            "keys",
            "application/vnd.kiln.cache.config.v1+json",
            r#"{"kind":"kiln build cache","version":1,"key_version":999,"layers":[],"records":[]}"#
                .to_string(),
            "key version 999",
        ),
        (
            "garbage",
            "application/vnd.kiln.cache.config.v1+json",
            "{not json".to_string(),
            "not JSON",
        ),
    ];
    for (name, media_type, config, want) in cases {
        let dir = a.path(&format!("cache-{name}"));
        layout_with_config(&dir, media_type, config.as_bytes());
        let out = build(
            &a,
            &[
                "--cache-from",
                &format!("type=local,src={}", dir.display()),
                s(&ctx),
            ],
        );
        assert!(
            out.warnings
                .iter()
                .any(|w| w.contains(want) && w.contains("building without it")),
            "{name}: {}",
            out.stderr
        );
    }
}

/// `kiln --debug build --progress=rawjson ARGS` on `env`, which must succeed: the build and its
/// debug log (plain lines among the JSON ones).
fn build_debug(env: &Env, args: &[&str]) -> Built {
    build_as(env, &["--debug", "build"], args)
}

/// A step that reruns on a fresh store needs the cached layers under it. Each is unpacked as it
/// downloads (one GET, the layer's bytes read once) and lands in the content store; a download
/// cut off or corrupted on the way falls back to the checked, retried fetch and never gives a
/// wrong result.
#[test]
fn layers_under_a_rerun_step_unpack_as_they_download_and_survive_faults() {
    let reg = Registry::start(None);
    let a = busybox_env();
    let ctx_a = checkout(&a.path("src"), "v1");
    let cache = format!("type=registry,ref={}/ci/stream:c,mode=max", reg.addr);
    build(&a, &["-t", "app", "--cache-to", &cache, s(&ctx_a)]);
    let (_, config) = cache_config(&reg.addr, "ci/stream", "c");
    let tools = top_layer_of(&config, "COPY --from=tools");
    let tools_hex = tools.trim_start_matches("sha256:").to_string();
    let sums = |env: &Env| {
        let out = env.ok(&["run", "--rm", "app", "md5sum", "/opt/tools.bin", "/opt/deps.txt"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let want = sums(&a);
    let proxy = Proxy::start(&reg.addr, Faults::default());
    let via = format!("type=registry,ref={}/ci/stream:c", proxy.addr);

    // Unfaulted: streamed, one GET, the blob committed by the end of the build.
    let b = twin(&a);
    let ctx_b = checkout(&b.path("src"), "v2");
    let plain = build_debug(&b, &["-t", "app", "--cache-from", &via, s(&ctx_b)]);
    assert_eq!(plain.markers, ["RAN-final"], "{}", plain.stderr);
    assert!(
        plain
            .stderr
            .lines()
            .any(|l| l.contains("layer unpacked as it downloaded") && l.contains(&tools)),
        "{}",
        plain.stderr
    );
    assert_eq!(proxy.blob_gets_of(&tools), 1, "{:#?}", proxy.log.lock().unwrap());
    assert!(b.root().join("blobs/sha256").join(&tools_hex).is_file());
    assert!(std::fs::read_dir(b.root().join("ingest"))
        .unwrap()
        .next()
        .is_none());
    assert_eq!(sums(&b), want);

    // Cut off halfway once: the streamed attempt fails, the ordinary fetch retries; nothing
    // but the final step runs.
    proxy.faults.lock().unwrap().truncate_once = Some(tools.clone());
    proxy.log.lock().unwrap().clear();
    let c = twin(&a);
    let ctx_c = checkout(&c.path("src"), "v2");
    let cut = build_debug(&c, &["-t", "app", "--cache-from", &via, s(&ctx_c)]);
    assert_eq!(cut.markers, ["RAN-final"], "{}", cut.stderr);
    assert!(cut.stderr.contains("the ordinary path follows"), "{}", cut.stderr);
    assert_eq!(proxy.blob_gets_of(&tools), 2, "{:#?}", proxy.log.lock().unwrap());
    assert!(c.root().join("blobs/sha256").join(&tools_hex).is_file());
    assert_eq!(sums(&c), want);

    // Corrupt on every download: the blob is rejected by its digest and the steps whose records
    // name it run again, from the stage's cached layer, to the same files.
    proxy.faults.lock().unwrap().corrupt = Some(tools.clone());
    let d = twin(&a);
    let ctx_d = checkout(&d.path("src"), "v2");
    let bad = build_debug(&d, &["-t", "app", "--cache-from", &via, s(&ctx_d)]);
    assert_eq!(bad.markers, ["RAN-final"], "{}", bad.stderr);
    assert!(
        bad.warnings.iter().any(|w| w.contains("unusable")),
        "{}",
        bad.stderr
    );
    assert!(!d.root().join("blobs/sha256").join(&tools_hex).exists());
    assert_eq!(sums(&d), want);
}

/// The same from a local cache directory: the layers under the rerun step are unpacked as they
/// are read from the directory, and the result is the exporting store's.
#[test]
fn layers_from_a_cache_dir_unpack_as_they_are_read() {
    let a = busybox_env();
    let ctx_a = checkout(&a.path("src"), "v1");
    let dir = a.path("cache-dir");
    let to = format!("type=local,dest={},mode=max", s(&dir));
    build(&a, &["-t", "app", "--cache-to", &to, s(&ctx_a)]);
    let b = twin(&a);
    let ctx_b = checkout(&b.path("src"), "v2");
    let from = format!("type=local,src={}", s(&dir));
    let built = build_debug(&b, &["-t", "app", "--cache-from", &from, s(&ctx_b)]);
    assert_eq!(built.markers, ["RAN-final"], "{}", built.stderr);
    let streamed = built
        .stderr
        .lines()
        .filter(|l| l.contains("layer unpacked as it downloaded"))
        .count();
    // The two copied stages' layers under `COPY app/` (busybox is the store's own).
    assert_eq!(streamed, 2, "{}", built.stderr);
    let sums = |env: &Env| {
        env.ok(&["run", "--rm", "app", "md5sum", "/opt/tools.bin", "/opt/deps.txt"])
            .stdout
    };
    assert_eq!(sums(&b), sums(&a));
}
