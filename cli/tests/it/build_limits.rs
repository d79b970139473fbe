//! `kiln build --shm-size`, `--ulimit` and `--annotation` end to end. RUN steps' `/dev/shm` and
//! resource limits are compared with Docker's: its BuildKit (20.10, which takes both flags but
//! applies neither) for the defaults, its classic builder (which applies them to RUN as buildx's
//! BuildKit does) for the flags. Annotations are read back from a real registry, from the OCI
//! archive's `index.json` and blobs, and by Docker's own client. Needs root, dockerd and the
//! registry.

use std::path::Path;
use std::process::Command;

use crate::build_flags::{build, build_fails, run_output, s};
use crate::harness::{busybox_env, docker, frame, require_root, Env};
use crate::registry::{run_ok, Registry};

fn context(env: &Env, dockerfile: &str) -> std::path::PathBuf {
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    std::fs::write(ctx.join("f"), "file\n").unwrap();
    ctx
}

/// The RUN output of Docker's classic builder: the lines between `---> Running in` and the
/// removal of the intermediate container.
fn classic_output(stdout: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for l in stdout.lines() {
        if l.starts_with(" ---> Running in ") {
            inside = true;
        } else if l.starts_with("Removing intermediate container") || l.starts_with(" ---> ") {
            inside = false;
        } else if inside {
            out.push(l.to_string());
        }
    }
    out
}

fn docker_build(buildkit: bool, flags: &[&str], ctx: &Path) -> String {
    let out = Command::new(docker())
        .args(["build", "--no-cache"])
        .args(if buildkit {
            &["--progress=plain"][..]
        } else {
            &[][..]
        })
        .args(flags)
        .arg(ctx)
        .env("DOCKER_BUILDKIT", if buildkit { "1" } else { "0" })
        .output()
        .unwrap();
    assert!(out.status.success(), "docker build {flags:?}\n{}", frame(&out));
    if buildkit {
        String::from_utf8_lossy(&out.stderr).into_owned()
    } else {
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

const LIMITS: &str = "FROM busybox:local\nRUN grep ' /dev/shm ' /proc/mounts; df -k /dev/shm | tail -1; \
for o in n Hn u Hu c Hc s Hs l Hl; do ulimit -$o; done\n";

#[test]
fn shm_size_and_ulimit_match_docker() {
    require_root();
    let env = busybox_env();
    let ctx = context(&env, LIMITS);

    // Defaults: BuildKit's /dev/shm (64 MiB, shm's mount options). Limits are inherited from
    // the builder's process (dockerd there, the test here), so only /dev/shm is compared.
    let kiln = run_output(&build(&env, &ctx, &["--no-cache"]));
    let buildkit = run_output(&docker_build(true, &[], &ctx));
    assert_eq!(kiln[..2], buildkit[..2], "default /dev/shm");
    assert!(kiln[0].contains("size=65536k"), "{kiln:?}");

    // Every limit the Dockerfile prints is set, so nothing depends on the parent's.
    let flags = [
        "--shm-size",
        "128m",
        "--ulimit",
        "nofile=1000:2000",
        "--ulimit",
        "nproc=50:60",
        "--ulimit",
        "core=0:-1",
        "--ulimit",
        "stack=4194304:-1",
        "--ulimit",
        "memlock=65536:131072",
    ];
    let kiln = run_output(&build(&env, &ctx, &[&["--no-cache"][..], &flags].concat()));
    let classic = classic_output(&docker_build(false, &flags, &ctx));
    assert_eq!(kiln, classic, "kiln's RUN saw other limits than Docker's");
    assert_eq!(
        kiln,
        [
            "shm /dev/shm tmpfs rw,nosuid,nodev,noexec,relatime,size=131072k 0 0",
            "shm                     131072         0    131072   0% /dev/shm",
            "1000",
            "2000",
            "50",
            "60",
            "0",
            "unlimited",
            "4096",
            "unlimited",
            "64",
            "128",
        ]
    );

    // In the step's cache key, as in BuildKit's (its exec op carries both): other limits are
    // another step; the same ones hit the cache.
    let cached = |extra: &[&str]| {
        let out = build(&env, &ctx, extra);
        out.lines().any(|l| l.ends_with(" CACHED")) && run_output(&out).is_empty()
    };
    assert!(!cached(&["--shm-size", "32m"]));
    assert!(cached(&["--shm-size", "32m"]));
    assert!(!cached(&["--shm-size", "32m", "--ulimit", "nofile=500"]));
    assert!(cached(&["--shm-size", "32m", "--ulimit", "nofile=500"]));
    assert!(!cached(&["--ulimit", "nofile=500"]));

    for (bad, msg) in [
        (&["--ulimit", "nofile"][..], "invalid ulimit argument: nofile"),
        (&["--ulimit", "files=1"], "invalid ulimit type: files"),
        (
            &["--ulimit", "nofile=2:1"],
            "ulimit soft limit must be less than or equal to hard limit: 2 > 1",
        ),
        (&["--ulimit", "nofile=x"], "invalid ulimit value `x`"),
        (&["--shm-size", "lots"], "invalid --shm-size `lots`"),
    ] {
        let err = build_fails(&env, &ctx, bad);
        assert!(err.contains(msg), "{bad:?}: {err}");
        assert!(err.contains(bad[1]), "the error names the argument: {err}");
    }
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

/// `index.json` and the blobs of an OCI archive.
fn oci_archive(path: &Path) -> (serde_json::Value, impl Fn(&str) -> serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    run_ok(Command::new("tar").arg("-xf").arg(path).arg("-C").arg(dir.path()));
    let index = json(&std::fs::read(dir.path().join("index.json")).unwrap());
    let blob = move |digest: &str| {
        let hex = digest.strip_prefix("sha256:").unwrap();
        json(&std::fs::read(dir.path().join("blobs/sha256").join(hex)).unwrap())
    };
    (index, blob)
}

fn registry_get(addr: &str, repo: &str, reference: &str, accept: &str) -> serde_json::Value {
    let out = run_ok(Command::new("curl").args([
        "-sf",
        "-H",
        &format!("Accept: {accept}"),
        &format!("http://{addr}/v2/{repo}/manifests/{reference}"),
    ]));
    json(out.as_bytes())
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

#[test]
fn annotations_land_in_the_manifest_index_and_descriptors_as_buildx_puts_them() {
    require_root();
    let reg = Registry::start(None);
    let env = busybox_env();
    let ctx = context(&env, "FROM busybox:local\nCOPY f /f\n");
    let name = format!("{}/kiln/annotated:1", reg.addr);
    let tar = env.path("one.tar");
    let docker_tar = env.path("one-docker.tar");
    build(
        &env,
        &ctx,
        &[
            "-t",
            &name,
            "-o",
            &format!("type=image,name={name},push=true"),
            "-o",
            &format!("type=oci,dest={}", s(&tar)),
            "-o",
            &format!("type=docker,dest={}", s(&docker_tar)),
            "--annotation",
            "org.opencontainers.image.title=plain",
            "--annotation",
            "manifest:com.example.level=manifest",
            "--annotation",
            "manifest[linux/amd64]:com.example.amd64=yes",
            "--annotation",
            "manifest[linux/arm64]:com.example.arm64=no",
            "--annotation",
            "manifest-descriptor:com.example.desc=entry",
        ],
    );
    let want = serde_json::json!({
        "org.opencontainers.image.title": "plain",
        "com.example.level": "manifest",
        "com.example.amd64": "yes",
    });
    // Pushed: the registry's manifest, which Docker pulls by that digest.
    let pushed = registry_get(&reg.addr, "kiln/annotated", "1", OCI_MANIFEST);
    assert_eq!(pushed["annotations"], want, "{pushed}");
    let head = run_ok(Command::new("curl").args([
        "-sfI",
        "-H",
        &format!("Accept: {OCI_MANIFEST}"),
        &format!("http://{}/v2/kiln/annotated/manifests/1", reg.addr),
    ]));
    let digest = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("docker-content-digest:")
                .map(|d| d.trim().to_string())
        })
        .unwrap_or_else(|| panic!("{head}"));
    let pulled = Command::new(docker()).args(["pull", &name]).output().unwrap();
    assert!(pulled.status.success(), "{}", frame(&pulled));
    let repo_digests =
        run_ok(Command::new(docker()).args(["image", "inspect", "--format", "{{json .RepoDigests}}", &name]));
    assert!(repo_digests.contains(&digest), "{repo_digests} vs {digest}");
    let _ = Command::new(docker()).args(["rmi", &name]).output();
    // The archives (written from the local store): the manifest, and the descriptor's
    // annotations on the index.json entry beside the name's.
    for t in [&tar, &docker_tar] {
        let (index, blob) = oci_archive(t);
        let entry = &index["manifests"][0];
        assert_eq!(entry["annotations"]["com.example.desc"], "entry", "{index}");
        assert_eq!(
            entry["annotations"]["io.containerd.image.name"],
            name.as_str(),
            "{index}"
        );
        assert_eq!(blob(entry["digest"].as_str().unwrap())["annotations"], want);
    }
    // Docker loads the annotated archive.
    let loaded = Command::new(docker())
        .args(["load", "-i", s(&docker_tar)])
        .output()
        .unwrap();
    assert!(loaded.status.success(), "{}", frame(&loaded));
    let _ = Command::new(docker()).args(["rmi", &name]).output();

    // Several platforms: the index, each manifest (a qualifier picks one), each index entry,
    // and the archive's entry for the index.
    let ctx = context(&env, "FROM scratch\nCOPY f /f\n");
    let name = format!("{}/kiln/annotated:multi", reg.addr);
    let tar = env.path("multi.tar");
    build(
        &env,
        &ctx,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "-t",
            &name,
            "-o",
            &format!("type=image,name={name},push=true"),
            "-o",
            &format!("type=oci,dest={}", s(&tar)),
            "--annotation",
            "index,manifest:com.example.both=1",
            "--annotation",
            "manifest[linux/arm64]:com.example.arch=arm64",
            "--annotation",
            "manifest-descriptor[linux/amd64]:com.example.entry=amd64",
            "--annotation",
            "index-descriptor:com.example.top=index",
        ],
    );
    let index = registry_get(&reg.addr, "kiln/annotated", "multi", OCI_INDEX);
    assert_eq!(
        index["annotations"],
        serde_json::json!({"com.example.both": "1"}),
        "{index}"
    );
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for e in entries {
        let arch = e["platform"]["architecture"].as_str().unwrap();
        let m = registry_get(
            &reg.addr,
            "kiln/annotated",
            e["digest"].as_str().unwrap(),
            OCI_MANIFEST,
        );
        let mut want = serde_json::json!({"com.example.both": "1"});
        if arch == "arm64" {
            want["com.example.arch"] = "arm64".into();
            assert!(e.get("annotations").is_none(), "{e}");
        } else {
            assert_eq!(
                e["annotations"],
                serde_json::json!({"com.example.entry": "amd64"})
            );
        }
        assert_eq!(m["annotations"], want, "{arch}: {m}");
    }
    let (top, blob) = oci_archive(&tar);
    let entry = &top["manifests"][0];
    assert_eq!(entry["annotations"]["com.example.top"], "index", "{top}");
    assert_eq!(
        blob(entry["digest"].as_str().unwrap())["annotations"]["com.example.both"],
        "1"
    );

    // Levels the outputs cannot carry are errors, as buildx's; so is bad syntax.
    for (bad, msg) in [
        (
            &["--annotation", "index:k=v"][..],
            "index annotations not supported for single platform export",
        ),
        (
            &["--annotation", "index-descriptor:k=v"],
            "index annotations not supported for single platform export",
        ),
        (
            &["--annotation", "manifest-descriptor:k=v"],
            "add -o type=oci or -o type=docker",
        ),
        (
            &["--annotation", "bogus:k=v"],
            "unknown annotation type \"bogus\"",
        ),
        (
            &["--annotation", "novalue"],
            "invalid annotation \"novalue\", expected key=value",
        ),
        (
            &["--annotation", "manifest[linux/amd64:k=v"],
            "invalid annotation type",
        ),
    ] {
        let err = build_fails(&env, &ctx, bad);
        assert!(err.contains(msg), "{bad:?}: {err}");
    }
    let err = build_fails(
        &env,
        &ctx,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--annotation",
            "index-descriptor:k=v",
        ],
    );
    assert!(err.contains("add -o type=oci or -o type=docker"), "{err}");
}
