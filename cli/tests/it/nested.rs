//! kiln inside an unprivileged container: kiln's own image, built by kiln from
//! `deploy/Dockerfile` on a Debian 12 base made here with debootstrap, loaded into dockerd and run
//! as uid 1000 without `--privileged` (seccomp unconfined, capabilities dropped). Inside it builds shared difftest
//! cases with `--isolation=chroot`; their image IDs must equal a rootful build's on the host.
//! Without `--isolation=chroot` the same build must fail naming it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::harness::{busybox_tar, docker, frame, require_root, shared_dir, workspace, Env};

/// A fixed SOURCE_DATE_EPOCH, so that builds at different times give the same image IDs.
const EPOCH: &str = "SOURCE_DATE_EPOCH=1700000000";
/// The docker tag of kiln's image (overwritten by each run).
const IMAGE: &str = "kiln-it-nested:latest";
/// The Debian packages of the base, and the only ones `deploy/Dockerfile` is asked to install
/// (its `PACKAGES`), so that its build needs no network: what the nested builds use. The full
/// list (with git, fuse-overlayfs, slirp4netns) takes debootstrap over 3 minutes instead of
/// under one. The base's cache file is named by nothing but this list.
const PACKAGES: &str = "uidmap,libcap2-bin,libseccomp2";
/// The shared difftest cases built inside the container: COPY, ENV with RUN, several stages.
const CASES: [&str; 3] = ["copy-files", "env-expansion", "multistage"];

fn sh(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?} failed\n{}", frame(&out));
    out
}

/// A Debian 12 minbase root filesystem with [`PACKAGES`], as a tar: made once per machine by
/// debootstrap (about 40 s) and kept in the temp dir under a name made of the package list.
fn bookworm_tar() -> PathBuf {
    // FNV-1a: a name that changes with the list, the same on every machine and toolchain.
    let key = PACKAGES.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let key = format!("{key:016x}");
    let tar = std::env::temp_dir().join(format!("kiln-it-bookworm-{key}.tar"));
    if tar.is_file() {
        return tar;
    }
    let dir = tempfile::Builder::new()
        .prefix("kiln-it-debootstrap-")
        .tempdir()
        .expect("temp dir");
    let root = dir.path().join("root");
    let out = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={PACKAGES}"), "bookworm"])
        .arg(&root)
        .arg("http://deb.debian.org/debian")
        .output()
        .expect("spawn debootstrap (scripts/setup.sh installs it)");
    assert!(out.status.success(), "debootstrap failed\n{}", frame(&out));
    let partial = tar.with_extension(format!("partial-{}", std::process::id()));
    sh(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["--xattrs", "--xattrs-include=*", "-cf"])
        .arg(&partial)
        .arg("."));
    std::fs::rename(&partial, &tar).expect("rename base tar");
    tar
}

/// The shared cases, copied once into `dir` (with their `prepare.sh` run) so that the container
/// and the host build the same files with the same times.
fn cases_dir(dir: &Path) -> PathBuf {
    let cases = dir.join("cases");
    for case in CASES {
        let src = shared_dir().join("difftest/cases").join(case);
        let dst = cases.join(case);
        std::fs::create_dir_all(&cases).expect("mkdir");
        sh(Command::new("cp").arg("-a").arg(&src).arg(&dst));
        if dst.join("prepare.sh").is_file() {
            sh(Command::new("sh").arg("prepare.sh").current_dir(&dst));
        }
    }
    sh(Command::new("chmod").arg("-R").arg("a+rX").arg(&cases));
    cases
}

/// kiln's image built by kiln from `deploy/Dockerfile` and loaded into dockerd (once per run).
fn kiln_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        require_root();
        let docker = docker();
        let env = Env::new();
        let base = bookworm_tar();
        env.ok(&["import", base.to_str().expect("utf-8"), "bookworm-local:it"]);
        let ctx = env.path("image");
        std::fs::create_dir_all(&ctx).expect("mkdir");
        std::fs::copy(env!("CARGO_BIN_EXE_kiln"), ctx.join("kiln")).expect("copy kiln");
        let dockerfile = workspace().join("deploy/Dockerfile");
        env.ok(&[
            "build",
            "-q",
            "-f",
            dockerfile.to_str().expect("utf-8"),
            "--build-arg",
            "BASE=bookworm-local:it",
            "--build-arg",
            &format!("PACKAGES={}", PACKAGES.replace(',', " ")),
            "-t",
            IMAGE,
            ctx.to_str().expect("utf-8"),
        ]);
        let tar = env.path("image.tar");
        env.ok(&["save", "-o", tar.to_str().expect("utf-8"), IMAGE]);
        sh(Command::new(&docker).arg("load").arg("-i").arg(&tar));
    });
    IMAGE
}

/// Runs `script` in kiln's image as uid 1000, unprivileged (seccomp unconfined, every capability
/// but SETUID and SETGID dropped), with the cases and the busybox tar at `/in`; returns the output.
fn in_container(cases: &Path, script: &str) -> std::process::Output {
    in_container_with(cases, &[], script)
}

/// [`in_container`] with extra `docker run` options.
fn in_container_with(cases: &Path, options: &[&str], script: &str) -> std::process::Output {
    let image = kiln_image();
    let bb = busybox_tar();
    Command::new(docker())
        .args([
            "run",
            "--rm",
            "--security-opt",
            "seccomp=unconfined",
            "--user",
            "1000",
        ])
        // The default store on a tmpfs, as on a Kubernetes emptyDir: overlayfs can be mounted.
        .arg("--tmpfs")
        .arg("/home/kiln/.local/share/kiln:rw,exec,uid=1000,gid=1000,mode=0700")
        // The Kubernetes Job's capabilities: only what the file capabilities of
        // newuidmap/newgidmap need in the bounding set.
        .args(["--cap-drop", "ALL", "--cap-add", "SETUID", "--cap-add", "SETGID"])
        .arg("-v")
        .arg(format!("{}:/in/cases:ro", cases.display()))
        .arg("-v")
        .arg(format!("{}:/in/busybox.tar:ro", bb.display()))
        .args(options)
        .args([image, "sh", "-c", script])
        .output()
        .expect("spawn docker run")
}

/// Imports busybox and builds the cases with `kiln GLOBAL build -q FLAGS`.
fn build_script(global: &str, flags: &str) -> String {
    let mut s = format!("set -e; kiln {global} import /in/busybox.tar busybox:local >/dev/null; ");
    for case in CASES {
        s.push_str(&format!(
            "kiln {global} build -q {flags} --build-arg {EPOCH} /in/cases/{case}; "
        ));
    }
    s
}

#[test]
fn nested_unprivileged_container_builds_with_chroot_isolation_and_the_rootful_image_ids() {
    let host = Env::new();
    host.with_busybox();
    let cases = cases_dir(host.dir.path());
    // Twice: with the default store on the tmpfs (the kernel's overlayfs in kiln's user
    // namespace), and with a store on the container's own overlayfs (copying snapshots).
    let script = format!(
        "kiln info; {} kiln --root /tmp/store info | grep Snapshotter; {}",
        build_script("", "--isolation=chroot"),
        build_script("--root /tmp/store", "--isolation=chroot"),
    );
    let out = in_container(&cases, &script);
    assert!(
        out.status.success(),
        "kiln in the container failed\n{}",
        frame(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The loss is stated once per build, plainly, and `kiln info` reports it.
    assert_eq!(
        stderr
            .matches("WARNING: --isolation=chroot: RUN steps lack")
            .count(),
        2 * CASES.len(),
        "{stderr}"
    );
    assert!(
        stdout.contains("Snapshotter: overlayfs (kernel, in a user namespace"),
        "{stdout}"
    );
    assert!(stdout.contains("Snapshotter: native"), "{stdout}");
    assert!(stderr.contains("no pid namespace"), "{stderr}");
    assert!(
        stdout.contains("Chroot Isolation Lacks: no pid namespace"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Rootless: yes (uid 0 is host uid 1000)"),
        "{stdout}"
    );
    let nested: Vec<&str> = stdout.lines().filter(|l| l.starts_with("sha256:")).collect();
    assert_eq!(nested.len(), 2 * CASES.len(), "{stdout}");
    for (case, id) in CASES.iter().cycle().zip(nested) {
        let dir = cases.join(case);
        let rootful = host.ok(&["build", "-q", "--build-arg", EPOCH, dir.to_str().expect("utf-8")]);
        let rootful = String::from_utf8_lossy(&rootful.stdout).trim().to_owned();
        assert_eq!(
            id, rootful,
            "case {case}: the nested chroot build differs from the rootful one"
        );
    }
}

#[test]
fn nested_unprivileged_container_without_chroot_isolation_fails_naming_it() {
    let host = Env::new();
    let cases = cases_dir(host.dir.path());
    // A RUN step with the default network: no slirp4netns in this image (nor /dev/net/tun).
    let out = in_container(&cases, &build_script("", ""));
    assert_failed_naming(&out, &["slirp4netns", "--isolation=chroot"]);
    // Without a network: the step's pid namespace needs a procfs the kernel refuses.
    let out = in_container(
        &cases,
        "kiln import /in/busybox.tar busybox:local >/dev/null && \
         printf 'FROM busybox:local\nRUN --network=none true\n' | kiln build -f - /in/cases/copy-files",
    );
    assert_failed_naming(&out, &["mounting proc", "--isolation=chroot"]);
}

/// The build in the container failed, without a panic, with an error naming each of `names`.
fn assert_failed_naming(out: &std::process::Output, names: &[&str]) {
    assert!(
        !out.status.success(),
        "the build should have failed\n{}",
        frame(out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for name in names {
        assert!(stderr.contains(name), "{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn nested_chroot_isolation_keeps_a_pid_namespace_where_proc_is_unmasked() {
    let host = Env::new();
    host.with_busybox();
    let cases = cases_dir(host.dir.path());
    // A step that records its own pid and how many processes it sees.
    let ps = cases.join("ps");
    std::fs::create_dir_all(&ps).expect("mkdir");
    std::fs::write(
        ps.join("Dockerfile"),
        "FROM busybox:local\nRUN echo $$ > /pid && ls /proc | grep -c '^[0-9]' > /procs\n",
    )
    .expect("write");
    sh(Command::new("chmod").arg("-R").arg("a+rX").arg(&ps));
    // Docker's `systempaths=unconfined` (Kubernetes' `procMount: Unmasked`): a fresh procfs is
    // allowed, so steps keep a pid namespace; the network is still the container's.
    let out = in_container_with(
        &cases,
        &["--security-opt", "systempaths=unconfined"],
        &format!(
            "{} id=$(kiln build -q --isolation=chroot /in/cases/ps); \
             kiln run --rm --network none $id cat /pid /procs",
            build_script("", "--isolation=chroot")
        ),
    );
    assert!(
        out.status.success(),
        "kiln in the container failed\n{}",
        frame(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WARNING: --isolation=chroot"), "{stderr}");
    assert!(!stderr.contains("no pid namespace"), "{stderr}");
    assert!(stderr.contains("no network namespace"), "{stderr}");
    let ids: Vec<&str> = stdout.lines().filter(|l| l.starts_with("sha256:")).collect();
    assert_eq!(ids.len(), CASES.len(), "{stdout}");
    for (case, id) in CASES.iter().zip(&ids) {
        let dir = cases.join(case);
        let rootful = host.ok(&["build", "-q", "--build-arg", EPOCH, dir.to_str().expect("utf-8")]);
        assert_eq!(
            *id,
            String::from_utf8_lossy(&rootful.stdout).trim(),
            "case {case}"
        );
    }
    // The step was pid 1 of a namespace of its own, seeing only its shell, `ls` and `grep`.
    let seen: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("sha256:")).collect();
    assert_eq!(seen.first().copied(), Some("1"), "{stdout}");
    let procs: u32 = seen.get(1).and_then(|n| n.parse().ok()).unwrap_or(u32::MAX);
    assert!(procs <= 3, "the step saw {procs} processes\n{stdout}");
}

#[test]
fn isolation_takes_default_or_chroot_and_refuses_anything_else() {
    let env = Env::new();
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).expect("mkdir");
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\n").expect("write");
    let ctx = ctx.to_str().expect("utf-8");
    let err = env.fails(&["build", "--isolation=vm", ctx]);
    assert!(
        err.contains("invalid --isolation (or KILN_ISOLATION) `vm`: expected default or chroot"),
        "{err}"
    );
    let out = env
        .kiln(&["build", ctx])
        .env("KILN_ISOLATION", "jail")
        .output()
        .expect("spawn");
    assert!(!out.status.success(), "{}", frame(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`jail`"),
        "{}",
        frame(&out)
    );
    let help = env.ok(&["build", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("--isolation"));
}
