//! `kiln run` options seen from inside the container (and, for limits, from the host's cgroup
//! files): resources, capabilities, privileged, init, identity, environment, stop behaviour.

use std::path::PathBuf;

use crate::harness::{busybox_env, eventually, frame, Env};

/// The arguments of `kiln run --rm --network none FLAGS... busybox:local sh -c SCRIPT`.
fn sh_args<'a>(flags: &[&'a str], script: &'a str) -> Vec<&'a str> {
    let mut args = vec!["run", "--rm", "--network", "none"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["busybox:local", "sh", "-c", script]);
    args
}

/// stdout of [`sh_args`] run, which must succeed.
fn sh(env: &Env, flags: &[&str], script: &str) -> String {
    String::from_utf8_lossy(&env.ok(&sh_args(flags, script)).stdout).into_owned()
}

/// [`sh_args`] run, as it ends.
fn sh_output(env: &Env, flags: &[&str], script: &str) -> std::process::Output {
    env.kiln(&sh_args(flags, script)).output().unwrap()
}

/// `CapEff` of the container's shell, as a number.
fn cap_eff(env: &Env, flags: &[&str]) -> u64 {
    let line = sh(env, flags, "grep CapEff /proc/self/status");
    let hex = line.split_whitespace().nth(1).expect("CapEff line");
    u64::from_str_radix(hex, 16).expect("hex caps")
}

/// The host path of `file` in the cgroup of `controller` that process `pid` is in (v1 or v2).
fn cgroup_file(pid: i64, controller: &str, v1_file: &str, v2_file: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let path = path.trim_start_matches('/');
        if ctrls.split(',').any(|c| c == controller) {
            for base in [
                format!("/sys/fs/cgroup/{controller}"),
                format!("/sys/fs/cgroup/{ctrls}"),
            ] {
                let p = PathBuf::from(base).join(path).join(v1_file);
                if p.exists() {
                    return p;
                }
            }
        }
        if ctrls.is_empty() {
            for base in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
                let p = PathBuf::from(base).join(path).join(v2_file);
                if p.exists() {
                    return p;
                }
            }
        }
    }
    panic!("no {controller} cgroup file for pid {pid} in:\n{text}");
}

#[test]
fn memory_cpus_and_pids_limits_land_in_the_containers_cgroup() {
    let env = busybox_env();
    env.ok(&[
        "run",
        "-d",
        "--name",
        "lim",
        "--network",
        "none",
        "--memory",
        "64m",
        "--cpus",
        "0.5",
        "--pids-limit",
        "20",
        "busybox:local",
        "sleep",
        "60",
    ]);
    let pid = env.inspect("lim")["State"]["Pid"].as_i64().unwrap();
    assert!(pid > 0);
    let mem =
        std::fs::read_to_string(cgroup_file(pid, "memory", "memory.limit_in_bytes", "memory.max")).unwrap();
    assert_eq!(mem.trim(), (64 * 1024 * 1024).to_string());
    let pids = std::fs::read_to_string(cgroup_file(pid, "pids", "pids.max", "pids.max")).unwrap();
    assert_eq!(pids.trim(), "20");
    let quota = cgroup_file(pid, "cpu", "cpu.cfs_quota_us", "cpu.max");
    let quota = std::fs::read_to_string(&quota).unwrap();
    assert!(
        quota.trim() == "50000" || quota.trim() == "50000 100000",
        "cpu quota for 0.5 CPUs: {quota}"
    );
    let dir = cgroup_file(pid, "pids", "pids.max", "pids.max");
    env.ok(&["rm", "-f", "lim"]);
    eventually(5, "the cgroup to be removed", || !dir.exists());

    // The pids limit holds inside: 30 background sleeps cannot all start under a limit of 10,
    // and the same script runs clean without the limit.
    let script = "for i in $(seq 1 30); do sleep 5 & done; echo looped";
    let limited = sh_output(&env, &["--pids-limit", "10"], script);
    let err = String::from_utf8_lossy(&limited.stderr);
    assert!(
        err.contains("fork"),
        "the 10th process must fail to fork\n{}",
        frame(&limited)
    );
    let free = sh_output(&env, &[], script);
    assert!(
        free.status.success() && !String::from_utf8_lossy(&free.stderr).contains("fork"),
        "{}",
        frame(&free)
    );
}

#[test]
fn capabilities_privileged_and_init() {
    let env = busybox_env();
    let default = cap_eff(&env, &[]);
    assert_ne!(default, 0);
    assert_eq!(default & (1 << 12), 0, "NET_ADMIN is not a default capability");
    assert_eq!(cap_eff(&env, &["--cap-drop", "ALL"]), 0);
    assert_eq!(
        cap_eff(&env, &["--cap-drop", "ALL", "--cap-add", "NET_ADMIN"]),
        1 << 12
    );
    let added = cap_eff(&env, &["--cap-add", "cap_net_admin"]);
    assert_eq!(added, default | (1 << 12));
    let dropped = cap_eff(&env, &["--cap-drop", "CHOWN"]);
    assert_eq!(dropped, default & !1);
    let privileged = cap_eff(&env, &["--privileged"]);
    assert!(
        privileged > default && privileged & (1 << 21) != 0,
        "{privileged:x}"
    );
    assert!(sh(&env, &["--privileged"], "test -e /dev/loop-control && echo dev").contains("dev"));
    let err = env.fails(&["run", "--rm", "--cap-add", "NOT_A_CAP", "busybox:local", "true"]);
    assert!(err.contains("NOT_A_CAP"), "{err}");

    // --init: pid 1 is kiln's reaper, the command runs as pid 2.
    let out = sh(&env, &["--init"], "echo $$; cat /proc/1/comm");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["2", "kiln-init"], "{out}");
    assert_eq!(sh(&env, &[], "echo $$").trim(), "1");
}

#[test]
fn identity_environment_and_entrypoint() {
    let env = busybox_env();
    assert_eq!(sh(&env, &["-h", "box1"], "hostname").trim(), "box1");
    assert_eq!(
        sh(&env, &["--hostname", "box2"], "cat /etc/hostname").trim(),
        "box2"
    );
    assert_eq!(
        sh(&env, &["-u", "1000:1001"], "id -u; id -g").trim(),
        "1000\n1001"
    );
    assert_eq!(sh(&env, &["-w", "/made/here"], "pwd").trim(), "/made/here");
    let file = env.path("vars.env");
    std::fs::write(&file, "# a comment\nFROM_FILE=one two\n\nPASSED\n").unwrap();
    let out = env
        .kiln(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--env-file",
            file.to_str().unwrap(),
            "-e",
            "X=y",
            "busybox:local",
            "env",
        ])
        .env("PASSED", "from the caller")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["FROM_FILE=one two", "PASSED=from the caller", "X=y"] {
        assert!(text.lines().any(|l| l == want), "missing {want}\n{}", frame(&out));
    }
    let out = env.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "echo",
        "busybox:local",
        "a",
        "b",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a b\n");
    let err = env.fails(&[
        "run",
        "--rm",
        "--env-file",
        "/nonexistent/env",
        "busybox:local",
        "true",
    ]);
    assert!(err.contains("/nonexistent/env"), "{err}");
}

#[test]
fn stop_signal_stop_timeout_restart_and_version() {
    let env = busybox_env();
    env.ok(&[
        "run",
        "-d",
        "--name",
        "sig",
        "--network",
        "none",
        "--stop-signal",
        "USR1",
        "busybox:local",
        "sh",
        "-c",
        "trap 'echo got usr1; exit 3' USR1; while true; do sleep 0.1; done",
    ]);
    env.ok(&["stop", "sig"]);
    assert_eq!(env.inspect("sig")["State"]["ExitCode"], 3);
    let logs = String::from_utf8_lossy(&env.ok(&["logs", "sig"]).stdout).into_owned();
    assert!(logs.contains("got usr1"), "{logs}");

    // A process that ignores the stop signal is killed after --stop-timeout.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "stubborn",
        "--network",
        "none",
        "--stop-timeout",
        "1",
        "busybox:local",
        "sh",
        "-c",
        "trap '' TERM; while true; do sleep 0.1; done",
    ]);
    env.ok(&["stop", "stubborn"]);
    assert_eq!(env.inspect("stubborn")["State"]["ExitCode"], 137);

    // restart: a new process, still running.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "again",
        "--network",
        "none",
        "busybox:local",
        "sleep",
        "60",
    ]);
    let before = env.inspect("again")["State"]["Pid"].as_i64().unwrap();
    env.ok(&["restart", "-t", "1", "again"]);
    let state = env.inspect("again")["State"].clone();
    assert_eq!(state["Running"], true, "{state}");
    assert_ne!(state["Pid"].as_i64().unwrap(), before);
    env.ok(&["rm", "-f", "sig", "stubborn", "again"]);

    let version = String::from_utf8_lossy(&env.ok(&["version"]).stdout).into_owned();
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
}

#[test]
fn the_oom_killer_is_reported_in_state() {
    let env = busybox_env();
    let out = env
        .kiln(&[
            "run",
            "--name",
            "oomer",
            "--network",
            "none",
            "--memory",
            "8m",
            "busybox:local",
            "sh",
            "-c",
            "x=$(head -c 60000000 /dev/zero | tr '\\0' a); echo survived",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(137), "{}", frame(&out));
    let state = env.inspect("oomer")["State"].clone();
    assert_eq!(state["OOMKilled"], true, "{state}");
    assert_eq!(state["ExitCode"], 137, "{state}");
    env.ok(&[
        "run",
        "--name",
        "fine",
        "--network",
        "none",
        "--memory",
        "64m",
        "busybox:local",
        "true",
    ]);
    assert_eq!(env.inspect("fine")["State"]["OOMKilled"], false);
}
