//! `kiln run`'s runtime options on real containers over a busybox rootfs built from the host's
//! static `/bin/busybox`: terminal, `--init`, capabilities, `--privileged`, cgroup limits and
//! exec into a running container.
//!
//! These tests need root (namespaces, overlay, cgroups). Run them as root:
//! `CARGO_TARGET_DIR=target-rt cargo test -p kiln-runtime --test features`.
//! Without root every test fails with a message saying so.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns panic on setup failure by design

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_runtime::caps::{HostCaps, DOCKER_DEFAULT_MASK};
use kiln_runtime::exec::{exec, ExecSpec};
use kiln_runtime::{start, tty, CgroupSpec, ContainerSpec, ExitStatus, Running, RuntimeError, Security};

mod common;
use common::*;

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn pipe() -> (fs::File, OwnedFd) {
    let (r, w) = nix::unistd::pipe().unwrap();
    (fs::File::from(r), w)
}

fn collect(running: Running, mut out_r: fs::File, mut err_r: fs::File) -> Result<Output, RuntimeError> {
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

fn run_with(
    fx: &Fixture,
    args: &[&str],
    edit: impl FnOnce(&mut ContainerSpec),
) -> Result<Output, RuntimeError> {
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let mut spec = fx.spec(args, out_w, err_w);
    edit(&mut spec);
    let running = start(spec, &fx.scratch)?;
    collect(running, out_r, err_r)
}

fn sh_with(fx: &Fixture, script: &str, edit: impl FnOnce(&mut ContainerSpec)) -> Output {
    run_with(fx, &["sh", "-c", script], edit).unwrap()
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

fn code(c: i32) -> ExitStatus {
    ExitStatus {
        code: Some(c),
        signal: None,
        oom_killed: false,
    }
}

/// A container started in the background with its stdout as lines.
struct Background {
    running: Running,
    lines: BufReader<fs::File>,
    err_r: fs::File,
}

fn background(fx: &Fixture, script: &str, edit: impl FnOnce(&mut ContainerSpec)) -> Background {
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let mut spec = fx.spec(&["sh", "-c", script], out_w, err_w);
    edit(&mut spec);
    let running = start(spec, &fx.scratch).unwrap();
    Background {
        running,
        lines: BufReader::new(out_r),
        err_r,
    }
}

impl Background {
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.lines.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    }

    fn finish(self) -> Output {
        collect(self.running, self.lines.into_inner(), self.err_r).unwrap()
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    )
}

/// `CapEff` of the process's own status, as printed by the container.
fn cap_eff(out: &Output) -> String {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap_or_else(|| panic!("no CapEff in {:?}", out.stdout))
        .trim()
        .to_string()
}

/// Reads a pty master until the slave side is gone (EIO).
fn read_master(master: OwnedFd) -> String {
    let mut f = fs::File::from(master);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => panic!("reading the pty master: {e}"),
        }
    }
    String::from_utf8_lossy(&out).replace("\r\n", "\n")
}

fn with_pty(
    fx: &Fixture,
    args: &[&str],
    rows: u16,
    cols: u16,
    edit: impl FnOnce(&mut ContainerSpec),
) -> (ExitStatus, String) {
    let (master, slave) = tty::open_pty().unwrap();
    tty::set_winsize(&master, rows, cols).unwrap();
    let mut spec = fx.spec(args, slave.try_clone().unwrap(), slave.try_clone().unwrap());
    spec.stdin = Some(slave);
    spec.options.controlling_tty = true;
    edit(&mut spec);
    let running = start(spec, &fx.scratch).unwrap();
    let reader = std::thread::spawn(move || read_master(master));
    let status = running.wait().unwrap();
    (status, reader.join().unwrap())
}

#[test]
fn tty_is_the_controlling_terminal_with_the_window_size() {
    let fx = Fixture::new();
    let script = "test -t 0 && echo stdin-is-tty; tty; stty size; \
                  awk '{print \"session\", $6, \"tty\", ($7 != 0)}' /proc/self/stat";
    let (status, out) = with_pty(&fx, &["sh", "-c", script], 33, 101, |_| {});
    assert_eq!(status, code(0), "{out}");
    assert!(out.contains("stdin-is-tty\n"), "{out}");
    assert!(out.contains("/dev/console\n"), "{out}");
    assert!(out.contains("33 101\n"), "{out}");
    // The shell (pid 1) leads the session; awk (its child) is in it, with a controlling tty.
    assert!(out.contains("session 1 tty 1\n"), "{out}");
    assert!(fx.scratch_is_empty());
}

#[test]
fn without_tty_stdin_is_not_a_terminal() {
    let fx = Fixture::new();
    let out = sh_with(&fx, "test -t 0 && echo tty || echo notty", |_| {});
    check(&out);
    assert_eq!(out.stdout, "notty\n");
}

#[test]
fn init_is_pid_1_and_the_command_is_its_child() {
    let fx = Fixture::new();
    let script = "echo pid $$; tr '\\0' ' ' < /proc/1/cmdline; echo; cat /proc/1/comm";
    let out = sh_with(&fx, script, |s| s.options.init = true);
    check(&out);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert_eq!(lines[0], "pid 2");
    // NUL-separated with PR_SET_MM (CAP_SYS_RESOURCE), else one space-separated string.
    assert_eq!(lines[1].trim_end(), format!("kiln-init -- sh -c {script}"));
    assert_eq!(lines[2], "kiln-init");
    // Without --init the command is pid 1.
    let out = sh_with(&fx, "echo pid $$", |_| {});
    assert_eq!(out.stdout, "pid 1\n");
}

#[test]
fn init_reaps_orphaned_zombies() {
    let fx = Fixture::new();
    // The subshell exits at once; its `sleep` is reparented to pid 1 and exits later.
    let script = "(sleep 0.2 &); sleep 1; \
                  for f in /proc/[0-9]*/stat; do read -r l < $f; set -- $l; \
                  [ \"$3\" = Z ] && echo zombie $1 $2; done; echo checked";
    let out = sh_with(&fx, script, |s| s.options.init = true);
    check(&out);
    assert_eq!(out.stdout, "checked\n", "{}", out.stderr);
}

#[test]
fn init_forwards_sigterm_and_reports_the_status() {
    let fx = Fixture::new();
    let mut bg = background(
        &fx,
        "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.05; done",
        |s| s.options.init = true,
    );
    assert_eq!(bg.line(), "ready");
    bg.running.kill(libc::SIGTERM).unwrap();
    let out = bg.finish();
    assert_eq!(out.status, code(7));
    assert_eq!(out.stdout, "got TERM\n");

    // A command killed by a signal: the init exits with 128 + N, like docker-init.
    let mut bg = background(&fx, "echo ready; exec sleep 100", |s| s.options.init = true);
    assert_eq!(bg.line(), "ready");
    bg.running.kill(libc::SIGTERM).unwrap();
    assert_eq!(bg.finish().status, code(143));
}

#[test]
fn tty_and_init_together() {
    let fx = Fixture::new();
    let (status, out) = with_pty(
        &fx,
        &["sh", "-c", "test -t 0 && echo tty; stty size; echo pid $$"],
        10,
        20,
        |s| s.options.init = true,
    );
    assert_eq!(status, code(0), "{out}");
    assert!(out.contains("tty\n10 20\npid 2\n"), "{out}");
}

#[test]
fn cap_drop_all_and_cap_add() {
    let fx = Fixture::new();
    let out = sh_with(&fx, "grep CapEff /proc/self/status", |s| {
        s.options.cap_drop = vec!["ALL".into()];
    });
    check(&out);
    assert_eq!(cap_eff(&out), "0000000000000000");

    let out = sh_with(&fx, "grep CapEff /proc/self/status", |s| {
        s.options.cap_add = vec!["net_admin".into()];
    });
    check(&out);
    assert_eq!(cap_eff(&out), format!("{:016x}", DOCKER_DEFAULT_MASK | 1 << 12));

    // Docker's order: drop ALL, then add one.
    let out = sh_with(&fx, "grep CapEff /proc/self/status", |s| {
        s.options.cap_drop = vec!["all".into()];
        s.options.cap_add = vec!["CAP_NET_ADMIN".into()];
    });
    assert_eq!(cap_eff(&out), format!("{:016x}", 1u64 << 12));

    // With NET_ADMIN the container can change its own network namespace.
    let out = sh_with(&fx, "ip link set lo down && echo changed", |s| {
        s.options.cap_add = vec!["NET_ADMIN".into()];
    });
    assert_eq!(out.stdout, "changed\n", "{}", out.stderr);
    let out = sh_with(&fx, "ip link set lo down && echo changed", |_| {});
    assert_ne!(out.stdout, "changed\n", "default caps must not include NET_ADMIN");
}

#[test]
fn unknown_capability_fails_before_anything_starts() {
    let fx = Fixture::new();
    let err = run_with(&fx, &["true"], |s| s.options.cap_add = vec!["NET_ADMINS".into()])
        .err()
        .unwrap();
    assert!(matches!(err, RuntimeError::Caps(_)), "{err:?}");
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert_eq!(
        chain,
        "invalid capability option: unknown capability: \"NET_ADMINS\""
    );
    assert!(fx.scratch_is_empty());
}

#[test]
fn privileged_gets_every_capability_and_the_host_devices() {
    let fx = Fixture::new();
    let host = HostCaps::read().unwrap();
    let script = "grep CapEff /proc/self/status; \
                  for d in /dev/loop0 /dev/net/tun; do [ -e $d ] && echo has $d; done; \
                  touch /sys/kernel/kiln-probe 2>&1 | grep -q 'Read-only' && echo sys-ro; \
                  [ -e /proc/kcore ] && echo kcore; true";
    let out = sh_with(&fx, script, |s| s.security = Security::Insecure);
    check(&out);
    assert_eq!(cap_eff(&out), format!("{:016x}", host.all() & host.permitted));
    for dev in ["/dev/loop0", "/dev/net/tun"] {
        if Path::new(dev).exists() {
            assert!(out.stdout.contains(&format!("has {dev}\n")), "{}", out.stdout);
        }
    }
    assert!(!out.stdout.contains("sys-ro"), "{}", out.stdout);

    let out = sh_with(&fx, script, |_| {});
    assert_eq!(cap_eff(&out), format!("{DOCKER_DEFAULT_MASK:016x}"));
    assert!(!out.stdout.contains("has /dev/loop0"), "{}", out.stdout);
    assert!(out.stdout.contains("sys-ro"), "{}", out.stdout);
}

fn read_trim(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .trim()
        .to_string()
}

/// The first file of `names` that exists in one of `dirs`.
fn cgroup_file(dirs: &[PathBuf], names: &[&str]) -> PathBuf {
    for d in dirs {
        for n in names {
            let p = d.join(n);
            if p.exists() {
                return p;
            }
        }
    }
    panic!("none of {names:?} in {dirs:?}");
}

#[test]
fn cgroup_limits_are_written_visible_and_removed() {
    let fx = Fixture::new();
    let name = unique("limits");
    let spec = CgroupSpec {
        name: name.clone(),
        memory: Some(64 << 20),
        cpus: Some(0.5),
        pids: Some(50),
    };
    let mut bg = background(&fx, "cat /proc/self/cgroup; echo ready; sleep 5", |s| {
        s.options.cgroup = Some(spec);
    });
    let mut inside = Vec::new();
    loop {
        let l = bg.line();
        if l == "ready" || l.is_empty() {
            break;
        }
        inside.push(l);
    }
    let dirs = bg.running.cgroup_dirs().to_vec();
    assert!(!dirs.is_empty());
    let mem = cgroup_file(&dirs, &["memory.max", "memory.limit_in_bytes"]);
    assert_eq!(read_trim(&mem), "67108864");
    let cpu = cgroup_file(&dirs, &["cpu.max", "cpu.cfs_quota_us"]);
    let cpu_value = read_trim(&cpu);
    assert!(cpu_value == "50000" || cpu_value == "50000 100000", "{cpu_value}");
    assert_eq!(read_trim(&cgroup_file(&dirs, &["pids.max"])), "50");
    // The container's processes are in the cgroup, and see it in /proc/self/cgroup.
    let procs = read_trim(&cgroup_file(&dirs, &["cgroup.procs"]));
    assert!(
        procs.lines().any(|p| p == bg.running.pid().to_string()),
        "{procs}"
    );
    let wanted = format!("/kiln/{name}");
    assert!(
        inside
            .iter()
            .any(|l| l.contains("memory") && l.ends_with(&wanted))
            || inside
                .iter()
                .any(|l| l.starts_with("0::") && l.ends_with(&wanted)),
        "{inside:?}"
    );
    bg.running.kill(libc::SIGKILL).unwrap();
    let out = bg.finish();
    assert_eq!(out.status.signal, Some(libc::SIGKILL));
    for d in &dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    // Removing again by name is fine.
    kiln_runtime::cgroup::remove(&name).unwrap();
}

#[test]
fn pids_limit_is_enforced() {
    let fx = Fixture::new();
    let name = unique("pids");
    // ash gives up on a failed fork: start the sleeps from a subshell.
    let script = "(i=0; while [ $i -lt 30 ]; do sleep 3 & i=$((i+1)); done); \
                  n=0; for f in /proc/[0-9]*; do n=$((n+1)); done; echo procs $n";
    let out = sh_with(&fx, script, |s| {
        s.options.cgroup = Some(CgroupSpec {
            name: name.clone(),
            pids: Some(10),
            ..Default::default()
        });
    });
    let count = |out: &Output| -> usize {
        out.stdout
            .trim()
            .strip_prefix("procs ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("stdout {:?} stderr {:?}", out.stdout, out.stderr))
    };
    let n = count(&out);
    assert!(n <= 10, "{n} processes despite pids.max=10");
    assert!(
        out.stderr.contains("fork"),
        "no fork failure reported: {:?}",
        out.stderr
    );

    // Without the limit all 30 start.
    let out = sh_with(&fx, script, |_| {});
    check(&out);
    assert!(count(&out) >= 31, "{}", out.stdout);
}

#[test]
fn bad_cgroup_spec_is_refused() {
    let fx = Fixture::new();
    let err = run_with(&fx, &["true"], |s| {
        s.options.cgroup = Some(CgroupSpec {
            name: "x".into(),
            memory: Some(1024),
            ..Default::default()
        })
    })
    .err()
    .unwrap();
    assert!(matches!(err, RuntimeError::Cgroup(_)), "{err:?}");
    assert!(fx.scratch_is_empty());
}

fn exec_spec(pid: i32, script: &str, stdout: OwnedFd, stderr: OwnedFd) -> ExecSpec {
    ExecSpec {
        pid,
        args: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into()],
        cwd: "/tmp".into(),
        user: String::new(),
        privileged: false,
        seccomp: Default::default(),
        controlling_tty: false,
        stdin: None,
        stdout,
        stderr,
    }
}

fn exec_output(spec: ExecSpec, out_r: fs::File, err_r: fs::File) -> Output {
    let running = exec(spec).unwrap();
    collect(running, out_r, err_r).unwrap()
}

#[test]
fn exec_joins_the_running_container() {
    let fx = Fixture::new();
    let name = unique("exec");
    let mut bg = background(
        &fx,
        "echo hello > /tmp/from-container; echo ready; sleep 30",
        |s| {
            s.options.cap_drop = vec!["CHOWN".into()];
            s.options.cgroup = Some(CgroupSpec {
                name: name.clone(),
                pids: Some(100),
                ..Default::default()
            });
        },
    );
    assert_eq!(bg.line(), "ready");
    let pid = bg.running.pid();
    // "ready" is printed before busybox sh execs its last command; wait for
    // the exec so the container's pid 1 has a settled command line.
    let cmdline = format!("/proc/{pid}/cmdline");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read(&cmdline).unwrap_or_default() != b"sleep\x0030\x00" {
        assert!(Instant::now() < deadline, "pid 1 never became `sleep 30`");
        std::thread::sleep(Duration::from_millis(5));
    }

    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let script = "hostname; cat /tmp/from-container; pwd; echo pid $$; \
                  tr '\\0' ' ' < /proc/1/cmdline; echo; grep -E 'CapEff|NoNewPrivs|Seccomp:' /proc/self/status; \
                  ps -o pid,comm | grep -E '^ *1 '; cat /proc/self/cgroup";
    let out = exec_output(exec_spec(pid, script, out_w, err_w), out_r, err_r);
    check(&out);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[..3], ["kilnbox", "hello", "/tmp"], "{}", out.stdout);
    let own: i32 = lines[3].strip_prefix("pid ").unwrap().parse().unwrap();
    assert!(
        own > 1 && own < 100,
        "pid {own} is not in the container's namespace"
    );
    assert_eq!(lines[4].trim_end(), "sleep 30");
    assert_eq!(
        cap_eff(&out),
        format!("{:016x}", DOCKER_DEFAULT_MASK & !1),
        "the exec'd process has the container's capabilities"
    );
    assert!(out.stdout.contains("NoNewPrivs:\t0"), "{}", out.stdout);
    assert!(out.stdout.contains("Seccomp:\t2"), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("/kiln/{name}")), "{}", out.stdout);

    // A user from the container's /etc/passwd, and a terminal.
    let (master, slave) = tty::open_pty().unwrap();
    let mut spec = exec_spec(
        pid,
        "id -u; id -g; echo $HOME; test -t 0 && echo tty",
        slave.try_clone().unwrap(),
        slave.try_clone().unwrap(),
    );
    spec.user = "app".into();
    spec.stdin = Some(slave);
    spec.controlling_tty = true;
    let running = exec(spec).unwrap();
    let reader = std::thread::spawn(move || read_master(master));
    assert_eq!(running.wait().unwrap(), code(0));
    assert_eq!(reader.join().unwrap(), "1000\n1000\n/home/app\ntty\n");

    // Privileged exec gets every capability.
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let mut spec = exec_spec(pid, "grep CapEff /proc/self/status", out_w, err_w);
    spec.privileged = true;
    let out = exec_output(spec, out_r, err_r);
    let host = HostCaps::read().unwrap();
    assert_eq!(cap_eff(&out), format!("{:016x}", host.all() & host.permitted));

    // Exit codes come back; a missing command is an exec error.
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let out = exec_output(exec_spec(pid, "exit 5", out_w, err_w), out_r, err_r);
    assert_eq!(out.status, code(5));
    let (_out_r, out_w) = pipe();
    let (_err_r, err_w) = pipe();
    let mut spec = exec_spec(pid, "", out_w, err_w);
    spec.args = vec!["no-such-command".into()];
    let err = exec(spec).err().unwrap();
    assert!(matches!(err, RuntimeError::Exec { .. }), "{err:?}");
    let (_out_r, out_w) = pipe();
    let (_err_r, err_w) = pipe();
    let mut spec = exec_spec(pid, "true", out_w, err_w);
    spec.cwd = "/no/such/dir".into();
    let err = exec(spec).err().unwrap();
    assert!(err.to_string().contains("/no/such/dir"), "{err}");

    bg.running.kill(libc::SIGKILL).unwrap();
    bg.finish();

    // A container that is gone.
    let (_out_r, out_w) = pipe();
    let (_err_r, err_w) = pipe();
    let err = exec(exec_spec(pid, "true", out_w, err_w)).err().unwrap();
    assert!(matches!(err, RuntimeError::ExecTarget { .. }), "{err:?}");
}

#[test]
fn startup_stays_fast_with_default_options() {
    let fx = Fixture::new();
    // Warm up, then time a few plain runs: the new options must cost nothing when unused.
    let _ = run_with(&fx, &["true"], |_| {}).unwrap();
    let t = Instant::now();
    for _ in 0..10 {
        let out = run_with(&fx, &["true"], |_| {}).unwrap();
        assert!(out.status.success());
    }
    let per_run = t.elapsed() / 10;
    assert!(per_run < Duration::from_millis(200), "{per_run:?} per run");
}
