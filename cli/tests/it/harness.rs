//! Test harness: a temp store root per test, a `kiln` command builder, the busybox base image.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// A temp directory holding a store root and scratch space, removed on drop.
pub struct Env {
    pub dir: tempfile::TempDir,
}

#[allow(dead_code)]
impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::Builder::new()
                .prefix("kiln-it-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `kiln --root ROOT ARGS...`, not yet run.
    pub fn kiln(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--root").arg(self.root()).args(args);
        c
    }

    /// Runs kiln and returns its output, panicking with both streams framed if it fails.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.kiln(args).output().expect("spawn kiln");
        if !out.status.success() {
            panic!("kiln {args:?} failed ({})\n{}", out.status, frame(&out));
        }
        out
    }

    /// Runs kiln expecting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.kiln(args).output().expect("spawn kiln");
        if out.status.success() {
            panic!("kiln {args:?} should have failed\n{}", frame(&out));
        }
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The first object `kiln inspect NAME` prints (a container or an image).
    pub fn inspect(&self, name: &str) -> serde_json::Value {
        let out = self.ok(&["inspect", name]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect prints JSON");
        if v.is_array() {
            v[0].clone()
        } else {
            v
        }
    }

    /// Imports the busybox base as `busybox:local`.
    pub fn with_busybox(&self) {
        let tar = busybox_tar();
        self.ok(&["import", tar.to_str().expect("utf-8 path"), "busybox:local"]);
    }
}

/// A fresh store with the busybox base imported; the caller's test needs root (it says so).
pub fn busybox_env() -> Env {
    require_root();
    let env = Env::new();
    env.with_busybox();
    env
}

/// Both output streams in framed blocks, for failure messages.
pub fn frame(out: &Output) -> String {
    format!(
        "---- stdout ----\n{}\n---- stderr ----\n{}\n----------------",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// The shared folder beside the checkout (`../shared`), or `$KILN_SHARED_DIR`: peers' start
/// scripts, the base image, the conformance corpus.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("KILN_SHARED_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace()
            .parent()
            .expect("the checkout's parent")
            .join("shared"),
    }
}

/// A busybox rootfs tarball made once per test run by testdata/make-busybox-rootfs.sh.
pub fn busybox_tar() -> PathBuf {
    static TAR: OnceLock<PathBuf> = OnceLock::new();
    TAR.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("kiln-it-busybox-{}.tar", std::process::id()));
        let status = Command::new("bash")
            .arg(workspace().join("testdata/make-busybox-rootfs.sh"))
            .arg(&out)
            .status()
            .expect("run make-busybox-rootfs.sh");
        assert!(
            status.success(),
            "testdata/make-busybox-rootfs.sh failed (needs busybox-static)"
        );
        out
    })
    .clone()
}

/// An arm64 busybox rootfs tarball, made once per test run by
/// testdata/make-arm64-busybox-rootfs.sh from Debian's busybox-static:arm64 (the .deb is kept in
/// the temp dir, so only the first run on a machine downloads it). Registers QEMU's arm64
/// binfmt_misc handler (`kiln setup binfmt arm64`) too, as the tests that use it run arm64 code.
pub fn arm64_busybox_tar() -> PathBuf {
    static TAR: OnceLock<PathBuf> = OnceLock::new();
    TAR.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("kiln-it-busybox-arm64-{}.tar", std::process::id()));
        let status = Command::new("bash")
            .arg(workspace().join("testdata/make-arm64-busybox-rootfs.sh"))
            .arg(&out)
            .env("KILN_ARM64_DEB_CACHE", std::env::temp_dir().join("kiln-it-arm64-deb"))
            .status()
            .expect("run make-arm64-busybox-rootfs.sh");
        assert!(
            status.success(),
            "testdata/make-arm64-busybox-rootfs.sh failed (needs dpkg's arm64 architecture and qemu-user-static: scripts/setup.sh)"
        );
        let setup = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["setup", "binfmt", "arm64"])
            .output()
            .expect("spawn kiln setup");
        assert!(setup.status.success(), "kiln setup binfmt arm64 failed\n{}", frame(&setup));
        out
    })
    .clone()
}

/// Panics unless running as root (namespaces, overlayfs, chown need it).
pub fn require_root() {
    assert!(
        nix_uid() == 0,
        "this test needs root (namespaces, overlayfs); run the suite as root as CI does"
    );
}

fn nix_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(u32::MAX)
}

/// Polls `f` every 20 ms until it holds, panicking with `what` after `secs` seconds.
pub fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(std::time::Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Starts dockerd (with `busybox:local` imported) through `shared/peers/start-docker.sh` once
/// per test run and returns the docker client's path.
pub fn docker() -> String {
    static DOCKER: OnceLock<String> = OnceLock::new();
    DOCKER
        .get_or_init(|| {
            let script = shared_dir().join("peers/start-docker.sh");
            let out = Command::new("bash")
                .arg(&script)
                .output()
                .expect("run start-docker.sh");
            assert!(
                out.status.success(),
                "this test needs dockerd: {} failed\n{}",
                script.display(),
                frame(&out)
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or("/usr/bin/docker")
                .trim()
                .to_string()
        })
        .clone()
}

/// A docker container removed on drop.
pub struct DockerContainer(pub String);

impl Drop for DockerContainer {
    fn drop(&mut self) {
        let _ = Command::new(docker()).args(["rm", "-f", "-v", &self.0]).output();
    }
}

/// Runs the docker client; (status code, stdout, stderr).
pub fn docker_run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(docker()).args(args).output().expect("spawn docker");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Env {
    /// Runs kiln; (status code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.kiln(args).output().expect("spawn kiln");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}
