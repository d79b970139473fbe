//! The busybox fixture the runtime's integration tests share: a rootfs built from the host's
//! static `/bin/busybox` (one lower dir), an empty upper dir and a scratch dir.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use kiln_runtime::{ContainerSpec, EtcFiles, Network, Rootfs, Security};

pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n";
pub const GROUP: &str = "root:x:0:\nwheel:x:10:app\napp:x:1000:\naudio:x:29:app\n";

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the runtime tests need root (namespaces, overlay mounts, pivot_root, cgroups); run them as root"
    );
}

/// A busybox image (one lower dir) with an empty upper dir and a scratch dir.
pub struct Fixture {
    _tmp: tempfile::TempDir,
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub scratch: PathBuf,
}

pub fn busybox_layer(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("copy /bin/busybox (install busybox-static)");
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.contains('/') && !applet.is_empty() {
            symlink("busybox", dir.join("bin").join(applet)).unwrap();
        }
    }
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("etc/passwd"), PASSWD).unwrap();
    fs::write(dir.join("etc/group"), GROUP).unwrap();
    fs::create_dir_all(dir.join("root")).unwrap();
    fs::create_dir_all(dir.join("home/app")).unwrap();
    std::os::unix::fs::chown(dir.join("home/app"), Some(1000), Some(1000)).unwrap();
    fs::create_dir_all(dir.join("tmp")).unwrap();
    fs::set_permissions(
        dir.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    // Deliberately no /proc, /dev, /sys, /etc/hosts, /etc/resolv.conf, /etc/hostname.
}

impl Fixture {
    pub fn new() -> Fixture {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let lower = tmp.path().join("lower");
        busybox_layer(&lower);
        let upper = tmp.path().join("upper");
        let work = tmp.path().join("work");
        let scratch = tmp.path().join("scratch");
        for d in [&upper, &work, &scratch] {
            fs::create_dir_all(d).unwrap();
        }
        Fixture {
            _tmp: tmp,
            lower,
            upper,
            work,
            scratch,
        }
    }

    pub fn spec(&self, args: &[&str], stdout: OwnedFd, stderr: OwnedFd) -> ContainerSpec {
        ContainerSpec {
            rootfs: Rootfs::Overlay {
                lower: vec![self.lower.clone()],
                upper: self.upper.clone(),
                work: self.work.clone(),
            },
            readonly_rootfs: false,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/bin".to_string()],
            cwd: "/".to_string(),
            user: String::new(),
            hostname: "kilnbox".to_string(),
            mounts: vec![],
            network: Network::None,
            security: Security::Default,
            etc_files: EtcFiles::for_build("kilnbox", "nameserver 10.0.0.2\n", &Network::None),
            stdin: None,
            stdout,
            stderr,
            options: Default::default(),
        }
    }

    pub fn scratch_is_empty(&self) -> bool {
        fs::read_dir(&self.scratch).unwrap().next().is_none()
    }
}
