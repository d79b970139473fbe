//! Real containers over a busybox rootfs built from the host's static `/bin/busybox`.
//!
//! These tests need root (namespaces, overlay, pivot_root). Run them as root:
//! `CARGO_TARGET_DIR=target-runtime cargo test -p kiln-runtime --test sandbox`.
//! Without root every test fails with a message saying so.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns panic on setup failure by design

use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::os::unix::fs::PermissionsExt;

use kiln_runtime::seccomp::{Profile, SeccompPolicy};
use kiln_runtime::{start, ContainerSpec, ExitStatus, MountSpec, Network, Rootfs, RuntimeError, Security};

mod common;
use common::*;

impl Fixture {
    /// Upper-dir entries, relative, sorted.
    fn upper_entries(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.upper, &self.upper, &mut out);
        out.sort();
        out
    }
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        out.push(p.strip_prefix(base).unwrap().display().to_string());
        if e.file_type().unwrap().is_dir() {
            walk(base, &p, out);
        }
    }
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn pipe() -> (fs::File, OwnedFd) {
    let (r, w) = nix::unistd::pipe().unwrap();
    (fs::File::from(r), w)
}

/// Runs a spec built by `make`, capturing stdout and stderr.
fn run_with(
    fx: &Fixture,
    args: &[&str],
    edit: impl FnOnce(&mut ContainerSpec),
) -> Result<Output, RuntimeError> {
    let (mut out_r, out_w) = pipe();
    let (mut err_r, err_w) = pipe();
    let mut spec = fx.spec(args, out_w, err_w);
    edit(&mut spec);
    let running = start(spec, &fx.scratch)?;
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        err_r.read_to_string(&mut s).unwrap();
        s
    });
    let mut stdout = String::new();
    out_r.read_to_string(&mut stdout).unwrap();
    let status = running.wait()?;
    let stderr = err_thread.join().unwrap();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn run(fx: &Fixture, args: &[&str]) -> Output {
    run_with(fx, args, |_| {}).unwrap()
}

fn sh(fx: &Fixture, script: &str) -> Output {
    run(fx, &["sh", "-c", script])
}

fn check(out: &Output) {
    assert!(
        out.status.success(),
        "\n--- status ---\n{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
}

#[test]
fn echo_hi() {
    let fx = Fixture::new();
    let out = run(&fx, &["echo", "hi"]);
    check(&out);
    assert_eq!(out.stdout, "hi\n");
    assert!(fx.scratch_is_empty(), "runtime temp dir left behind");
}

#[test]
fn exit_codes_and_stderr() {
    let fx = Fixture::new();
    let out = sh(&fx, "echo oops >&2; exit 3");
    assert_eq!(
        out.status,
        ExitStatus {
            code: Some(3),
            signal: None,
            oom_killed: false,
        }
    );
    assert!(!out.status.success());
    assert_eq!(out.stderr, "oops\n");
    assert_eq!(sh(&fx, "false").status.code, Some(1));
}

#[test]
fn killed_by_a_signal() {
    let fx = Fixture::new();
    let (mut out_r, out_w) = pipe();
    let (_err_r, err_w) = pipe();
    let running = start(
        fx.spec(&["sh", "-c", "echo started; exec sleep 1000"], out_w, err_w),
        &fx.scratch,
    )
    .unwrap();
    let mut line = [0u8; 8];
    out_r.read_exact(&mut line).unwrap();
    running.kill(libc::SIGKILL).unwrap();
    let status = running.wait().unwrap();
    assert_eq!(
        status,
        ExitStatus {
            code: None,
            signal: Some(libc::SIGKILL),
            oom_killed: false,
        }
    );
}

#[test]
fn users_and_groups() {
    let fx = Fixture::new();
    let out = run_with(&fx, &["id"], |s| s.user = "app".into()).unwrap();
    check(&out);
    assert!(
        out.stdout.starts_with("uid=1000(app) gid=1000(app) groups="),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("10(wheel)") && out.stdout.contains("29(audio)"),
        "{}",
        out.stdout
    );

    // uid:gid: no supplementary groups (BuildKit's fast path).
    let out = run_with(&fx, &["id"], |s| s.user = "1000:1000".into()).unwrap();
    check(&out);
    assert!(
        out.stdout.starts_with("uid=1000(app) gid=1000(app)"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("wheel"), "{}", out.stdout);

    let out = run_with(&fx, &["sh", "-c", "id -u; id -g; echo $HOME"], |s| {
        s.user = "4242".into()
    })
    .unwrap();
    check(&out);
    assert_eq!(out.stdout, "4242\n0\n/\n");

    let err = run_with(&fx, &["id"], |s| s.user = "nobody".into())
        .err()
        .unwrap();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        chain.contains("unable to find user nobody: no matching entries in passwd file"),
        "{chain}"
    );
    assert!(fx.scratch_is_empty());
}

#[test]
fn cwd_is_created_and_owned_by_the_user() {
    let fx = Fixture::new();
    let out = run_with(&fx, &["sh", "-c", "pwd; touch f"], |s| {
        s.user = "app".into();
        s.cwd = "/work/dir".into();
    })
    .unwrap();
    check(&out);
    assert_eq!(out.stdout, "/work/dir\n");
    let md = fs::metadata(fx.upper.join("work/dir")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 1000));
    assert!(fx.upper.join("work/dir/f").exists());
}

#[test]
fn env_home_and_hostname() {
    let fx = Fixture::new();
    let out = run_with(
        &fx,
        &["sh", "-c", "echo $FOO $HOME; hostname; cat /etc/hostname"],
        |s| {
            s.env.push("FOO=bar baz".into());
        },
    )
    .unwrap();
    check(&out);
    assert_eq!(out.stdout, "bar baz /root\nkilnbox\nkilnbox\n");
    let out = run_with(&fx, &["env"], |s| s.user = "app".into()).unwrap();
    let mut env: Vec<&str> = out.stdout.lines().collect();
    env.sort();
    assert_eq!(env, vec!["HOME=/home/app", "PATH=/bin"]);
}

#[test]
fn stdin_is_passed_through() {
    let fx = Fixture::new();
    let (r, w) = nix::unistd::pipe().unwrap();
    let mut w = fs::File::from(w);
    w.write_all(b"from stdin\n").unwrap();
    drop(w);
    let out = run_with(&fx, &["cat"], |s| s.stdin = Some(r)).unwrap();
    check(&out);
    assert_eq!(out.stdout, "from stdin\n");
    // Without stdin: /dev/null.
    assert_eq!(run(&fx, &["cat"]).stdout, "");
}

#[test]
fn proc_shows_the_process_as_pid_1() {
    let fx = Fixture::new();
    let out = sh(
        &fx,
        "echo $$; ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '",
    );
    check(&out);
    let mut lines = out.stdout.lines();
    assert_eq!(lines.next(), Some("1"));
    // Only the shell, `ls`/`grep`/`sort`/`tr` of the pipeline: no host processes.
    let pids: Vec<u32> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(pids.contains(&1) && pids.len() <= 6, "{pids:?}");
}

fn interfaces(proc_net_dev: &str) -> Vec<String> {
    let mut v: Vec<String> = proc_net_dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|s| s.trim().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn network_none_has_only_loopback_up() {
    let fx = Fixture::new();
    let out = run(&fx, &["cat", "/proc/net/dev"]);
    check(&out);
    assert_eq!(interfaces(&out.stdout), vec!["lo".to_string()]);
    let out = sh(
        &fx,
        "ip link show lo; ping -c 1 -W 1 127.0.0.1 >/dev/null && echo PING-OK",
    );
    assert!(out.stdout.contains("UP"), "{}", out.stdout);
    assert!(out.stdout.contains("PING-OK"), "{}", out.stdout);
}

#[test]
fn network_host_sees_host_interfaces() {
    let fx = Fixture::new();
    let out = run_with(&fx, &["cat", "/proc/net/dev"], |s| s.network = Network::Host).unwrap();
    check(&out);
    let host = interfaces(&fs::read_to_string("/proc/net/dev").unwrap());
    assert_eq!(interfaces(&out.stdout), host);
}

#[test]
fn network_join_uses_the_given_namespace() {
    let fx = Fixture::new();
    // The host's own namespace, joined through its file: same interfaces as the host.
    let out = run_with(&fx, &["cat", "/proc/net/dev"], |s| {
        s.network = Network::Join("/proc/self/ns/net".into())
    })
    .unwrap();
    check(&out);
    assert_eq!(
        interfaces(&out.stdout),
        interfaces(&fs::read_to_string("/proc/net/dev").unwrap())
    );
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

/// What `docker run --rm busybox grep -E 'Cap|NoNewPrivs|Seccomp' /proc/self/status` prints
/// (Docker 20.10, runc 1.1), as root and as a non-root user (`-u 1000`).
const DOCKER_STATUS_ROOT: &str = "CapInh:\t0000000000000000\nCapPrm:\t00000000a80425fb\n\
    CapEff:\t00000000a80425fb\nCapBnd:\t00000000a80425fb\nCapAmb:\t0000000000000000\n\
    NoNewPrivs:\t0\nSeccomp:\t2\nSeccomp_filters:\t1\n";
const DOCKER_STATUS_USER: &str = "CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
    CapEff:\t0000000000000000\nCapBnd:\t00000000a80425fb\nCapAmb:\t0000000000000000\n\
    NoNewPrivs:\t0\nSeccomp:\t2\nSeccomp_filters:\t1\n";

#[test]
fn default_capabilities_seccomp_and_no_new_privs_match_docker() {
    let fx = Fixture::new();
    let grep = ["grep", "-E", "Cap|NoNewPrivs|Seccomp", "/proc/self/status"];
    let out = run(&fx, &grep);
    check(&out);
    assert_eq!(out.stdout, DOCKER_STATUS_ROOT);
    // A non-root user keeps the bounding set but has no effective capabilities, like Docker.
    let out = run_with(&fx, &grep, |s| s.user = "app".into()).unwrap();
    check(&out);
    assert_eq!(out.stdout, DOCKER_STATUS_USER);
    // --security-opt no-new-privileges.
    let out = run_with(&fx, &grep, |s| {
        s.user = "app".into();
        s.options.no_new_privileges = true;
    })
    .unwrap();
    assert_eq!(
        out.stdout,
        DOCKER_STATUS_USER.replace("NoNewPrivs:\t0", "NoNewPrivs:\t1")
    );
    // --security-opt seccomp=unconfined.
    let out = run_with(&fx, &grep, |s| s.options.seccomp = SeccompPolicy::Unconfined).unwrap();
    assert_eq!(
        out.stdout,
        DOCKER_STATUS_ROOT.replace(
            "Seccomp:\t2\nSeccomp_filters:\t1",
            "Seccomp:\t0\nSeccomp_filters:\t0"
        )
    );
}

/// The fixture with a setuid-root copy of busybox whose `su` lets any user become root without a
/// password (root's password field is empty): what `sudo` does in a real image.
fn setuid_fixture() -> Fixture {
    let fx = Fixture::new();
    let bin = fx.lower.join("bin");
    fs::copy(bin.join("busybox"), bin.join("suid-busybox")).unwrap();
    fs::set_permissions(bin.join("suid-busybox"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::remove_file(bin.join("su")).unwrap();
    symlink("suid-busybox", bin.join("su")).unwrap();
    fs::write(fx.lower.join("etc/passwd"), PASSWD.replace("root:x:", "root::")).unwrap();
    fx
}

#[test]
fn setuid_binaries_raise_privileges_unless_no_new_privileges() {
    let fx = setuid_fixture();
    // By path: busybox's shell runs applets named bare in-process, without an exec.
    let script = "id -u; /bin/su -c 'id -u; grep -E \"^(Uid|CapEff)\" /proc/self/status'";
    let out = run_with(&fx, &["sh", "-c", script], |s| s.user = "app".into()).unwrap();
    check(&out);
    assert_eq!(
        out.stdout, "1000\n0\nUid:\t0\t0\t0\t0\nCapEff:\t00000000a80425fb\n",
        "a setuid-root binary run by uid 1000 runs as root with the bounding set"
    );
    let out = run_with(&fx, &["sh", "-c", script], |s| {
        s.user = "app".into();
        s.options.no_new_privileges = true;
    })
    .unwrap();
    assert!(
        !out.status.success(),
        "su worked under no_new_privs: {}",
        out.stdout
    );
    assert_eq!(out.stdout, "1000\n");
}

#[test]
fn seccomp_blocks_unshare_without_sys_admin_as_docker_does() {
    let fx = Fixture::new();
    // A user namespace needs no capability, so only the filter stops it.
    let out = run(&fx, &["unshare", "-U", "true"]);
    assert_eq!(out.status.code, Some(1));
    assert_eq!(
        out.stderr,
        "unshare: unshare(0x10000000): Operation not permitted\n"
    );
    let out = run_with(&fx, &["unshare", "-U", "true"], |s| {
        s.options.cap_add = vec!["SYS_ADMIN".into()]
    })
    .unwrap();
    check(&out);
    let out = run_with(&fx, &["unshare", "-U", "true"], |s| {
        s.options.seccomp = SeccompPolicy::Unconfined
    })
    .unwrap();
    check(&out);
    // clone3 answers ENOSYS, so a C library falls back to clone; the rest of the denied calls
    // answer EPERM. A custom profile's rules apply instead of Docker's.
    let profile = r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#;
    let out = run_with(
        &fx,
        &["sh", "-c", "mkdir /x; unshare -U true && echo unshared"],
        |s| {
            s.options.seccomp =
                SeccompPolicy::Profile(std::sync::Arc::new(Profile::parse(profile, "test").unwrap()))
        },
    )
    .unwrap();
    assert_eq!(
        out.stderr,
        "mkdir: can't create directory '/x': Permission denied\n"
    );
    assert_eq!(out.stdout, "unshared\n");
}

#[test]
fn init_runs_under_the_filter_and_still_reaps() {
    let fx = Fixture::new();
    let out = run_with(
        &fx,
        &[
            "sh",
            "-c",
            "sleep 0.1 & grep -E '^Seccomp:' /proc/1/status /proc/self/status; wait",
        ],
        |s| s.options.init = true,
    )
    .unwrap();
    check(&out);
    assert_eq!(
        out.stdout,
        "/proc/1/status:Seccomp:\t2\n/proc/self/status:Seccomp:\t2\n"
    );
}

#[test]
fn insecure_gets_all_capabilities_and_nothing_masked() {
    let fx = Fixture::new();
    let out = run_with(
        &fx,
        &["sh", "-c", "cat /proc/self/status; grep -c . /proc/timer_list"],
        |s| s.security = Security::Insecure,
    )
    .unwrap();
    check(&out);
    let host = fs::read_to_string("/proc/self/status").unwrap();
    assert_eq!(
        status_field(&out.stdout, "CapEff:"),
        status_field(&host, "CapPrm:")
    );
    assert_eq!(status_field(&out.stdout, "NoNewPrivs:"), "0");
    assert_eq!(status_field(&out.stdout, "Seccomp:"), "0");
    let timer_lines: u32 = out.stdout.lines().last().unwrap().parse().unwrap();
    assert!(timer_lines > 0, "/proc/timer_list should be readable");
}

#[test]
fn masked_and_readonly_paths() {
    let fx = Fixture::new();
    // Only paths this kernel has can be checked.
    let files: Vec<&str> = [
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
    ]
    .into_iter()
    .filter(|p| Path::new(p).exists())
    .collect();
    let dirs: Vec<&str> = ["/proc/acpi", "/proc/scsi", "/sys/firmware"]
        .into_iter()
        .filter(|p| Path::new(p).exists())
        .collect();
    assert!(!files.is_empty() && !dirs.is_empty());
    let mut script = String::new();
    for f in &files {
        script.push_str(&format!("echo {f} $(wc -c < {f}); "));
    }
    for d in &dirs {
        script.push_str(&format!("echo {d} $(ls -A {d} | wc -l); "));
    }
    script.push_str(
        "echo 1 > /proc/sys/vm/drop_caches && echo WROTE; \
         grep -E ' /proc/sys ' /proc/self/mountinfo | grep -q ' ro,' && echo SYS-RO; \
         grep -E ' /sys ' /proc/self/mountinfo | grep -q ' ro,' && echo SYSFS-RO",
    );
    let out = sh(&fx, &script);
    for p in files.iter().chain(&dirs) {
        assert!(
            out.stdout.lines().any(|l| l == format!("{p} 0")),
            "{p} not masked:\n{}\n{}",
            out.stdout,
            out.stderr
        );
    }
    assert!(!out.stdout.contains("WROTE"));
    assert!(
        out.stdout.contains("SYS-RO") && out.stdout.contains("SYSFS-RO"),
        "{}",
        out.stdout
    );
}

#[test]
fn writes_land_in_upper_and_runtime_files_do_not() {
    let fx = Fixture::new();
    let out = sh(
        &fx,
        "echo x > /f; cat /etc/hosts /etc/resolv.conf; ls /dev; echo y >> /etc/hosts; \
         touch /dev/shm/s /tmp/t",
    );
    check(&out);
    assert!(
        out.stdout.contains("127.0.0.1\tlocalhost kilnbox"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("nameserver 10.0.0.2"), "{}", out.stdout);
    for dev in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "mqueue", "fd", "ptmx",
    ] {
        assert!(
            out.stdout.lines().any(|l| l == dev),
            "/dev/{dev} missing: {}",
            out.stdout
        );
    }
    assert_eq!(fs::read_to_string(fx.upper.join("f")).unwrap(), "x\n");
    // /tmp is part of the rootfs, as in BuildKit.
    assert_eq!(fx.upper_entries(), vec!["f", "tmp", "tmp/t"]);
}

#[test]
fn bind_and_tmpfs_mounts_leave_nothing_in_upper() {
    let fx = Fixture::new();
    let data = fx.scratch.parent().unwrap().join("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("in.txt"), "bound\n").unwrap();
    let file = fx.scratch.parent().unwrap().join("single");
    fs::write(&file, "one file\n").unwrap();
    let rw = fx.scratch.parent().unwrap().join("rw");
    fs::create_dir_all(&rw).unwrap();
    let out = run_with(
        &fx,
        &[
            "sh",
            "-c",
            "cat /mnt/data/in.txt /opt/x/single; touch /mnt/data/no 2>/dev/null || echo RO; \
             echo t > /cache/tmp/t && grep ' /cache/tmp ' /proc/mounts; echo w > /rw/out; \
             touch /cache/tmp/nested/inner 2>/dev/null; ls /cache/tmp/nested",
        ],
        |s| {
            s.mounts = vec![
                MountSpec::Bind {
                    source: data.clone(),
                    target: "/mnt/data".into(),
                    readonly: true,
                },
                MountSpec::Bind {
                    source: file.clone(),
                    target: "/opt/x/single".into(),
                    readonly: true,
                },
                MountSpec::Tmpfs {
                    target: "/cache/tmp".into(),
                    size: Some(1 << 20),
                    mode: None,
                },
                MountSpec::Tmpfs {
                    target: "/cache/tmp/nested".into(),
                    size: None,
                    mode: Some(0o700),
                },
                MountSpec::Bind {
                    source: rw.clone(),
                    target: "rw".into(),
                    readonly: false,
                },
            ];
        },
    )
    .unwrap();
    check(&out);
    assert!(
        out.stdout
            .starts_with("bound\none file\nRO\ntmpfs /cache/tmp tmpfs rw,nosuid,nodev"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.ends_with("inner\n"), "{}", out.stdout);
    assert_eq!(fs::read_to_string(rw.join("out")).unwrap(), "w\n");
    assert!(!data.join("no").exists());
    assert_eq!(fx.upper_entries(), Vec::<String>::new());
    assert!(fx.scratch_is_empty());
}

#[test]
fn mount_target_through_an_image_symlink() {
    let fx = Fixture::new();
    fs::create_dir_all(fx.lower.join("run")).unwrap();
    fs::create_dir_all(fx.lower.join("var")).unwrap();
    symlink("../run", fx.lower.join("var/run")).unwrap();
    let out = run_with(
        &fx,
        &[
            "sh",
            "-c",
            "grep ' /run/secrets ' /proc/mounts | cut -d' ' -f3; ls -l /var/run",
        ],
        |s| {
            s.mounts = vec![MountSpec::Tmpfs {
                target: "/var/run/secrets".into(),
                size: None,
                mode: None,
            }];
        },
    )
    .unwrap();
    check(&out);
    assert!(out.stdout.starts_with("tmpfs\n"), "{}", out.stdout);
    assert!(
        out.stdout.contains("-> ../run"),
        "the image's symlink must survive: {}",
        out.stdout
    );
    assert_eq!(fx.upper_entries(), Vec::<String>::new());
}

#[test]
fn readonly_rootfs() {
    let fx = Fixture::new();
    let out = run_with(
        &fx,
        &[
            "sh",
            "-c",
            "touch /x 2>/dev/null || echo RO; touch /dev/shm/ok && echo SHM",
        ],
        |s| s.readonly_rootfs = true,
    )
    .unwrap();
    check(&out);
    assert_eq!(out.stdout, "RO\nSHM\n");
    assert_eq!(fx.upper_entries(), Vec::<String>::new());
}

#[test]
fn dir_rootfs_removes_created_mount_points() {
    let fx = Fixture::new();
    let out = run_with(
        &fx,
        &["sh", "-c", "echo dir > /tmp/o; cat /proc/1/comm; true"],
        |s| {
            s.rootfs = Rootfs::Dir(fx.lower.clone());
        },
    )
    .unwrap();
    check(&out);
    assert_eq!(out.stdout, "sh\n");
    assert_eq!(fs::read_to_string(fx.lower.join("tmp/o")).unwrap(), "dir\n");
    for gone in [
        "proc",
        "dev",
        "sys",
        "etc/hosts",
        "etc/resolv.conf",
        "etc/hostname",
    ] {
        assert!(!fx.lower.join(gone).exists(), "{gone} left in the rootfs dir");
    }
    assert!(fx.scratch_is_empty());
}

#[test]
fn many_lower_dirs_use_the_new_mount_api() {
    let fx = Fixture::new();
    let base = fx
        .scratch
        .parent()
        .unwrap()
        .join("a-rather-long-directory-name-for-snapshots-to-exceed-one-page");
    let mut lower = Vec::new();
    for i in 0..60 {
        let d = base.join(format!("{i:064}"));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("layer{i}")), format!("{i}\n")).unwrap();
        lower.push(d);
    }
    let total: usize = lower.iter().map(|l| l.as_os_str().len() + 1).sum();
    assert!(total > 4096, "test must exceed one page of options");
    lower.push(fx.lower.clone());
    let out = run_with(&fx, &["sh", "-c", "cat /layer0 /layer59"], |s| {
        s.rootfs = Rootfs::Overlay {
            lower: lower.clone(),
            upper: fx.upper.clone(),
            work: fx.work.clone(),
        };
    })
    .unwrap();
    check(&out);
    assert_eq!(out.stdout, "0\n59\n");
}

#[test]
fn setup_failures_name_the_step_and_leave_nothing() {
    let fx = Fixture::new();
    let err = run_with(&fx, &["no-such-command"], |_| {}).err().unwrap();
    assert!(matches!(err, RuntimeError::Exec { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-command"), "{err}");

    let err = run_with(&fx, &["true"], |s| {
        s.mounts = vec![MountSpec::Overlay {
            lower: vec!["/no/such/a".into(), "/no/such/b".into()],
            upper: None,
            target: "/bad".into(),
        }];
    })
    .err()
    .unwrap();
    let RuntimeError::Setup { step, source } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(step, "mounting read-only overlay at `/bad`");
    assert_eq!(*source, nix::errno::Errno::ENOENT);

    let err = run_with(&fx, &["true"], |s| {
        s.mounts = vec![MountSpec::Bind {
            source: "/no/such/source".into(),
            target: "/x".into(),
            readonly: true,
        }];
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("`/no/such/source`"), "{err}");

    assert!(fx.scratch_is_empty(), "temp dirs left after failures");
    assert_eq!(fx.upper_entries(), Vec::<String>::new());
    assert_no_mounts_under(&fx.scratch);
}

fn assert_no_mounts_under(path: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_string_lossy();
    assert!(!info.contains(p.as_ref()), "mounts left under {p}:\n{info}");
}

fn pid_ns(pid: &str) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

#[test]
fn killed_container_leaves_no_processes_mounts_or_dirs() {
    let fx = Fixture::new();
    let (mut out_r, out_w) = pipe();
    let (_err_r, err_w) = pipe();
    let spec = fx.spec(
        &["sh", "-c", "sleep 1000 & sleep 1000 & echo ready; wait"],
        out_w,
        err_w,
    );
    let running = start(spec, &fx.scratch).unwrap();
    let mut ready = [0u8; 6];
    out_r.read_exact(&mut ready).unwrap();
    let ns = pid_ns(&running.pid().to_string()).unwrap();
    let members = || {
        fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| pid_ns(&e.file_name().to_string_lossy()).as_ref() == Some(&ns))
            .count()
    };
    assert_eq!(members(), 3, "sh and two sleeps");
    running.kill(libc::SIGKILL).unwrap();
    let status = running.wait().unwrap();
    assert_eq!(status.signal, Some(libc::SIGKILL));
    assert_eq!(members(), 0, "processes left in the container's pid namespace");
    assert_no_mounts_under(&fx.scratch);
    assert_no_mounts_under(&fx.upper);
    assert!(fx.scratch_is_empty());
}

#[test]
fn dropping_a_running_container_kills_it() {
    let fx = Fixture::new();
    let (_out_r, out_w) = pipe();
    let (_err_r, err_w) = pipe();
    let running = start(fx.spec(&["sleep", "1000"], out_w, err_w), &fx.scratch).unwrap();
    let pid = running.pid();
    drop(running);
    std::thread::sleep(Duration::from_millis(10));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists"
    );
    assert!(fx.scratch_is_empty());
}
