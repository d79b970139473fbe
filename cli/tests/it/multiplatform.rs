//! Multi-platform builds with real arm64 content: Debian's arm64 busybox-static as the arm64
//! base (testdata/make-arm64-busybox-rootfs.sh), RUN steps under QEMU user emulation, image
//! indexes in the store, in archives, in the reference registry and in Docker. Needs root,
//! qemu-user-static and dpkg's arm64 architecture (scripts/setup.sh); the registry and Docker
//! tests need those peers.

use std::process::Command;

use crate::harness::{arm64_busybox_tar, busybox_tar, docker_run, frame, require_root, Env};
use crate::registry::{ok, run_ok, Registry};

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// A store with `bb:amd64` (the host's busybox) and `bb:arm64` (Debian's arm64 busybox).
fn env() -> Env {
    require_root();
    let arm = arm64_busybox_tar();
    let env = Env::new();
    env.ok(&["import", s(&busybox_tar()), "bb:amd64"]);
    env.ok(&["import", "--platform", "linux/arm64", s(&arm), "bb:arm64"]);
    env
}

/// A context with `text` as its Dockerfile.
fn context(env: &Env, name: &str, text: &str) -> std::path::PathBuf {
    let dir = env.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), text).unwrap();
    dir
}

/// A stage on the build platform that every target shares (it uses no TARGET* argument and
/// leaves a nanosecond stamp), a stage per target that uses TARGETARCH, and the final stage on
/// each target's busybox, whose RUN prints `uname -m` under emulation for arm64.
const DOCKERFILE: &str = "\
FROM --platform=$BUILDPLATFORM bb:amd64 AS shared
RUN date +%s%N > /stamp && echo shared-step-ran

FROM --platform=$BUILDPLATFORM bb:amd64 AS cross
ARG TARGETARCH
RUN echo \"compiled on $(uname -m) for $TARGETARCH\" > /tool

ARG TARGETARCH
FROM bb:$TARGETARCH
ARG TARGETARCH
ARG TARGETPLATFORM
ARG BUILDPLATFORM
COPY --from=shared /stamp /stamp
COPY --from=cross /tool /tool
RUN uname -m > /arch && echo \"$TARGETARCH $TARGETPLATFORM $BUILDPLATFORM\" > /args
";

/// `cat FILES` in the image's `platform` image.
fn cat(env: &Env, platform: &str, image: &str, files: &str) -> String {
    let out = env.ok(&[
        "run",
        "--rm",
        "--platform",
        platform,
        image,
        "sh",
        "-c",
        &format!("cat {files}"),
    ]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_two_platform_build_emulates_arm64_and_shares_build_platform_stages() {
    let env = env();
    let ctx = context(&env, "ctx", DOCKERFILE);
    let out = env.ok(&[
        "build",
        "--progress",
        "plain",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        "multi:1",
        s(&ctx),
    ]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        log.lines()
            .filter(|l| l.ends_with(" shared-step-ran") && !l.contains("RUN "))
            .count(),
        1,
        "the $BUILDPLATFORM stage runs once for both targets\n{log}"
    );
    assert!(
        log.contains("[linux/amd64 shared 2/2] RUN") && !log.contains("[linux/arm64 shared"),
        "the shared stage is shown once, with the build platform\n{log}"
    );
    assert!(log.contains("[linux/arm64 stage-2 4/4] RUN"), "{log}");

    let amd = cat(&env, "linux/amd64", "multi:1", "/arch /args /tool /stamp");
    let arm = cat(&env, "linux/arm64", "multi:1", "/arch /args /tool /stamp");
    let lines = |t: &str| t.lines().map(str::to_string).collect::<Vec<_>>();
    let (amd, arm) = (lines(&amd), lines(&arm));
    assert_eq!(amd[0], "x86_64");
    assert_eq!(arm[0], "aarch64", "the arm64 RUN ran under QEMU");
    assert_eq!(amd[1], "amd64 linux/amd64 linux/amd64");
    assert_eq!(arm[1], "arm64 linux/arm64 linux/amd64");
    assert_eq!(amd[2], "compiled on x86_64 for amd64");
    assert_eq!(
        arm[2], "compiled on x86_64 for arm64",
        "a TARGETARCH stage runs per target"
    );
    assert_eq!(amd[3], arm[3], "both images hold the one run of the shared stage");

    // One name, one row; an index of two platform images.
    let images = String::from_utf8_lossy(&env.ok(&["images", "multi"]).stdout).into_owned();
    assert_eq!(images.lines().count(), 2, "{images}");
    let arm_cfg = env.inspect("multi:1");
    assert_eq!(arm_cfg["Architecture"], "amd64", "the host's platform by default");
    // `kiln run` of the host's platform needs no --platform.
    let host = env.ok(&["run", "--rm", "multi:1", "cat", "/arch"]);
    assert_eq!(String::from_utf8_lossy(&host.stdout).trim(), "x86_64");

    // -o local and tar: one directory per platform, as BuildKit names them.
    let local = env.path("local");
    let tar = env.path("out.tar");
    env.ok(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-o",
        &format!("type=local,dest={}", s(&local)),
        "-o",
        &format!("type=tar,dest={}", s(&tar)),
        s(&ctx),
    ]);
    assert_eq!(
        std::fs::read_to_string(local.join("linux_amd64/arch")).unwrap(),
        "x86_64\n"
    );
    assert_eq!(
        std::fs::read_to_string(local.join("linux_arm64/arch")).unwrap(),
        "aarch64\n"
    );
    let listing = run_ok(Command::new("tar").arg("tf").arg(&tar));
    assert!(
        listing
            .lines()
            .any(|l| l.trim_start_matches("./") == "linux_arm64/arch")
            && listing
                .lines()
                .any(|l| l.trim_start_matches("./") == "linux_amd64/arch"),
        "{listing}"
    );
}

#[test]
fn from_platform_resolves_in_an_index_and_a_missing_platform_fails() {
    let env = env();
    let ctx = context(
        &env,
        "ctx",
        "ARG TARGETARCH\nFROM bb:$TARGETARCH\nRUN uname -m > /arch\n",
    );
    env.ok(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        "base:multi",
        s(&ctx),
    ]);
    // FROM --platform picks that platform's image of the index (no emulation needed to read it).
    let pick = context(
        &env,
        "pick",
        "FROM --platform=linux/arm64 base:multi AS a\nFROM bb:amd64\nCOPY --from=a /arch /arch\n",
    );
    env.ok(&["build", "-t", "picked", s(&pick)]);
    let out = env.ok(&["run", "--rm", "picked", "cat", "/arch"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "aarch64");
    // A platform the index does not have: an error naming it and what there is.
    let missing = context(
        &env,
        "missing",
        "FROM --platform=linux/s390x base:multi\nRUN true\n",
    );
    let err = env.fails(&["build", s(&missing)]);
    assert!(
        err.contains("linux/s390x") && err.contains("linux/amd64, linux/arm64"),
        "{err}"
    );
    // A single-platform image of another platform: BuildKit's warning, not silence.
    let wrong = context(
        &env,
        "wrong",
        "FROM --platform=linux/arm64 bb:amd64\nCOPY Dockerfile /\n",
    );
    let out = env.ok(&["build", "--progress", "plain", s(&wrong)]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("InvalidBaseImagePlatform"), "{log}");
}

#[test]
fn without_emulation_the_build_fails_before_any_step_runs() {
    let env = env();
    // sparc64 has no QEMU handler kiln knows of on any host.
    env.ok(&[
        "import",
        "--platform",
        "linux/sparc64",
        s(&busybox_tar()),
        "bb:sparc64",
    ]);
    let ctx = context(
        &env,
        "ctx",
        "FROM --platform=$BUILDPLATFORM bb:amd64 AS host\nRUN echo host-step-ran > /x\n\
         FROM bb:sparc64\nCOPY --from=host /x /x\nRUN true\n",
    );
    let out = env
        .kiln(&[
            "build",
            "--progress",
            "plain",
            "--platform",
            "linux/sparc64",
            s(&ctx),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("linux/sparc64")
            && err.contains("apt-get install qemu-user-static")
            && err.contains("kiln setup binfmt"),
        "{err}"
    );
    assert!(
        !err.contains("host-step-ran") && !err.lines().any(|l| l.starts_with('#') && l.contains("] RUN ")),
        "no step ran\n{err}"
    );
    // `kiln run` of such an image: the same clear error.
    let err = env.fails(&["run", "--rm", "bb:sparc64", "true"]);
    assert!(
        err.contains("linux/sparc64") && err.contains("kiln setup binfmt"),
        "{err}"
    );
    // --platform that the image is not: Docker's error.
    let err = env.fails(&["run", "--rm", "--platform", "linux/arm64", "bb:amd64", "true"]);
    assert!(err.contains("does not match the specified platform"), "{err}");
}

/// The registry's answer for `repo` `reference` with `accept`, parsed.
fn fetch(addr: &str, repo: &str, reference: &str, accept: &str) -> (Vec<u8>, serde_json::Value) {
    let out = Command::new("curl")
        .args(["-sf", "-H", &format!("Accept: {accept}")])
        .arg(format!("http://{addr}/v2/{repo}/manifests/{reference}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", frame(&out));
    let v = serde_json::from_slice(&out.stdout).unwrap();
    (out.stdout, v)
}

/// Checks an OCI image index against the image-spec: its schema (oci-spec's types, which
/// reject missing required fields), every manifest a platform manifest with `os` and
/// `architecture`, and the platforms given. Returns the manifests' digests by platform.
fn validate_index(bytes: &[u8], platforms: &[&str]) -> Vec<(String, String)> {
    use oci_spec::image::{ImageIndex, MediaType};
    let index: ImageIndex = serde_json::from_slice(bytes).expect("an OCI image index");
    assert_eq!(index.schema_version(), 2);
    assert_eq!(index.media_type(), &Some(MediaType::ImageIndex));
    let mut out = Vec::new();
    for m in index.manifests() {
        assert_eq!(m.media_type(), &MediaType::ImageManifest);
        let p = m
            .platform()
            .as_ref()
            .expect("every manifest has a platform object");
        let name = format!("{}/{}", p.os(), p.architecture());
        out.push((name, m.digest().to_string()));
    }
    let names: Vec<&str> = out.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(names, platforms);
    out
}

#[test]
fn the_pushed_index_validates_and_kiln_and_docker_pull_each_platform() {
    let env = env();
    let reg = Registry::start(None);
    let image = format!("{}/multi/app:1", reg.addr);
    let ctx = context(
        &env,
        "ctx",
        "ARG TARGETARCH\nFROM bb:$TARGETARCH\nRUN uname -m > /arch\n",
    );
    env.ok(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "--push",
        "-t",
        &image,
        s(&ctx),
    ]);

    // The registry serves an OCI index whose manifests (and their blobs) are all there.
    let (bytes, _) = fetch(
        &reg.addr,
        "multi/app",
        "1",
        "application/vnd.oci.image.index.v1+json",
    );
    let entries = validate_index(&bytes, &["linux/amd64", "linux/arm64"]);
    for (platform, digest) in &entries {
        let (mbytes, _) = fetch(
            &reg.addr,
            "multi/app",
            digest,
            "application/vnd.oci.image.manifest.v1+json",
        );
        let m: oci_spec::image::ImageManifest = serde_json::from_slice(&mbytes).expect("an OCI manifest");
        for d in std::iter::once(m.config()).chain(m.layers()) {
            let st = Command::new("curl")
                .args(["-sfI"])
                .arg(format!("http://{}/v2/multi/app/blobs/{}", reg.addr, d.digest()))
                .output()
                .unwrap();
            assert!(st.status.success(), "{platform}: blob {} missing", d.digest());
        }
    }

    // kiln pull --platform keeps the index; a later pull of the host's platform fills it in.
    let b = Env::new();
    ok(&b, &["pull", "--platform", "linux/arm64", &image]);
    let run = ok(
        &b,
        &["run", "--rm", "--platform", "linux/arm64", &image, "cat", "/arch"],
    );
    assert_eq!(run.trim(), "aarch64");
    let err = crate::registry::fails(&b, &["run", "--rm", "--pull", "never", &image, "true"]);
    assert!(err.contains("Unable to find image"), "only arm64 is here\n{err}");
    ok(&b, &["pull", &image]);
    assert_eq!(ok(&b, &["run", "--rm", &image, "cat", "/arch"]).trim(), "x86_64");
    let listed = ok(&b, &["images", "-q"]);
    assert_eq!(listed.lines().count(), 1, "the index is one image\n{listed}");
    // `kiln push` of the index from that store, under another name: the same index.
    let again = format!("{}/multi/copy:2", reg.addr);
    ok(&b, &["tag", &image, &again]);
    ok(&b, &["push", &again]);
    let (copied, _) = fetch(
        &reg.addr,
        "multi/copy",
        "2",
        "application/vnd.oci.image.index.v1+json",
    );
    assert_eq!(copied, bytes, "kiln push sends the index byte for byte");

    // Docker pulls each platform of the index.
    let (code, _, err) = docker_run(&["pull", "--platform", "linux/arm64", &image]);
    assert_eq!(code, 0, "{err}");
    let (_, arch, _) = docker_run(&["image", "inspect", "-f", "{{.Architecture}}", &image]);
    assert_eq!(arch.trim(), "arm64");
    let (code, _, err) = docker_run(&["pull", "--platform", "linux/amd64", &image]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = docker_run(&["run", "--rm", &image, "cat", "/arch"]);
    assert_eq!((code, out.trim()), (0, "x86_64"), "{err}");
    let _ = docker_run(&["rmi", "-f", &image]);
}

#[test]
fn save_writes_one_platform_for_docker_load_or_the_whole_index() {
    let env = env();
    let ctx = context(
        &env,
        "ctx",
        "ARG TARGETARCH\nFROM bb:$TARGETARCH\nRUN uname -m > /arch\n",
    );
    env.ok(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        "kiln-multi-save:1",
        s(&ctx),
    ]);

    // The whole index: an OCI layout whose index.json names the image index.
    let all = env.path("all.tar");
    env.ok(&["save", "-o", s(&all), "kiln-multi-save:1"]);
    let dir = env.path("all");
    std::fs::create_dir_all(&dir).unwrap();
    run_ok(Command::new("tar").arg("xf").arg(&all).arg("-C").arg(&dir));
    let top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let desc = &top["manifests"][0];
    assert_eq!(desc["mediaType"], "application/vnd.oci.image.index.v1+json");
    let blob =
        |d: &str| std::fs::read(dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap();
    let entries = validate_index(
        &blob(desc["digest"].as_str().unwrap()),
        &["linux/amd64", "linux/arm64"],
    );
    for (_, d) in &entries {
        let m: oci_spec::image::ImageManifest = serde_json::from_slice(&blob(d)).unwrap();
        for l in m.layers() {
            assert!(!blob(l.digest().as_ref()).is_empty());
        }
    }

    // One platform: `docker load` takes it.
    let amd = env.path("amd.tar");
    env.ok(&[
        "save",
        "--platform",
        "linux/amd64",
        "-o",
        s(&amd),
        "kiln-multi-save:1",
    ]);
    let (code, _, err) = docker_run(&["load", "-i", s(&amd)]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = docker_run(&["run", "--rm", "kiln-multi-save:1", "cat", "/arch"]);
    assert_eq!((code, out.trim()), (0, "x86_64"), "{err}");
    let _ = docker_run(&["rmi", "-f", "kiln-multi-save:1"]);
    let arm = env.path("arm.tar");
    env.ok(&[
        "save",
        "--platform",
        "linux/arm64",
        "-o",
        s(&arm),
        "kiln-multi-save:1",
    ]);
    let (code, _, err) = docker_run(&["load", "-i", s(&arm)]);
    assert_eq!(code, 0, "{err}");
    let (_, arch, _) = docker_run(&["image", "inspect", "-f", "{{.Architecture}}", "kiln-multi-save:1"]);
    assert_eq!(arch.trim(), "arm64");
    let _ = docker_run(&["rmi", "-f", "kiln-multi-save:1"]);
    let err = env.fails(&[
        "save",
        "--platform",
        "linux/s390x",
        "-o",
        s(&arm),
        "kiln-multi-save:1",
    ]);
    assert!(err.contains("linux/s390x"), "{err}");
}

/// A tar's entries by cleaned name: type, mode, owner, link target and content (mtimes left
/// out, as the difftest leaves them out).
type TarEntry = (u8, u32, u64, u64, String, Vec<u8>);

fn tar_entries(path: &std::path::Path) -> std::collections::BTreeMap<String, TarEntry> {
    use std::io::Read;
    let mut out = std::collections::BTreeMap::new();
    let mut ar = tar::Archive::new(std::fs::File::open(path).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        if name.is_empty() {
            continue;
        }
        let h = e.header();
        let entry = (
            h.entry_type().as_byte(),
            h.mode().unwrap() & 0o7777,
            h.uid().unwrap(),
            h.gid().unwrap(),
            e.link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default(),
            {
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                data
            },
        );
        out.insert(name, entry);
    }
    out
}

#[test]
fn the_arm64_rootfs_is_buildkits() {
    let env = env();
    // The same arm64 base in Docker, under the same name.
    let base = "kiln-multi-bb:arm64";
    env.ok(&["tag", "bb:arm64", base]);
    let saved = env.path("base.tar");
    env.ok(&["save", "--platform", "linux/arm64", "-o", s(&saved), base]);
    let (code, _, err) = docker_run(&["load", "-i", s(&saved)]);
    assert_eq!(code, 0, "{err}");
    let ctx = context(
        &env,
        "ctx",
        &format!(
            "FROM {base}\nARG TARGETARCH\n\
             RUN mkdir /out && uname -m > /out/arch && echo \"$TARGETARCH\" > /out/targetarch && ls /bin | wc -l > /out/n\n\
             COPY Dockerfile /out/\n"
        ),
    );
    let theirs = env.path("buildkit.tar");
    let out = Command::new(crate::harness::docker())
        .env("DOCKER_BUILDKIT", "1")
        .args(["build", "--platform", "linux/arm64", "-o"])
        .arg(format!("type=tar,dest={}", s(&theirs)))
        .arg(&ctx)
        .output()
        .unwrap();
    assert!(out.status.success(), "BuildKit's build failed\n{}", frame(&out));
    let ours = env.path("kiln.tar");
    env.ok(&[
        "build",
        "--platform",
        "linux/arm64",
        "-o",
        &format!("type=tar,dest={}", s(&ours)),
        s(&ctx),
    ]);
    let (a, b) = (tar_entries(&theirs), tar_entries(&ours));
    assert_eq!(
        b.get("out/arch").map(|e| e.5.clone()),
        Some(b"aarch64\n".to_vec())
    );
    let differ: Vec<&String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .collect();
    assert!(differ.is_empty(), "rootfs differs from BuildKit's at {differ:?}");
    let _ = docker_run(&["rmi", "-f", base]);
}

#[test]
fn one_cache_serves_every_target_platform_on_a_fresh_store() {
    let a = env();
    let ctx = context(&a, "ctx", DOCKERFILE);
    let cache = a.path("cache");
    a.ok(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "--cache-to",
        &format!("type=local,dest={},mode=max", s(&cache)),
        "-t",
        "multi:1",
        s(&ctx),
    ]);
    // Another store, another checkout: every step of both targets comes from the one cache.
    let b = env();
    let ctx_b = context(&b, "elsewhere", DOCKERFILE);
    let out = b.ok(&[
        "build",
        "--progress",
        "plain",
        "--platform",
        "linux/amd64,linux/arm64",
        "--cache-from",
        &format!("type=local,src={}", s(&cache)),
        "-t",
        "multi:1",
        s(&ctx_b),
    ]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !log.lines()
            .any(|l| l.ends_with(" shared-step-ran") && !l.contains("RUN ")),
        "no RUN step ran again\n{log}"
    );
    let runs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("] RUN "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(runs.len(), 5, "{log}");
    for n in runs {
        assert!(log.lines().any(|l| l == format!("{n} CACHED")), "{n} ran\n{log}");
    }
    for platform in ["linux/amd64", "linux/arm64"] {
        assert_eq!(
            cat(&a, platform, "multi:1", "/arch /stamp /tool"),
            cat(&b, platform, "multi:1", "/arch /stamp /tool"),
            "{platform}: the cached results, not new runs"
        );
    }
    assert_eq!(a.inspect("multi:1")["Id"], b.inspect("multi:1")["Id"]);
}
