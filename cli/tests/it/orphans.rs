//! A container whose supervisor (a detached one, or a foreground `kiln run`) is killed with
//! SIGKILL: the next kiln command adopts and stops it, so what `ps` shows is true and every
//! command works on it, with nothing leaked (processes, network namespace). Needs root.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{busybox_env, eventually, Env};

fn state(env: &Env, id: &str) -> serde_json::Value {
    let path = env.root().join("containers").join(id).join("state.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn alive(pid: i64) -> bool {
    // A zombie has exited: only a live process counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let st = s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next()
                .unwrap_or("");
            st != "Z" && st != "X"
        })
        .unwrap_or(false)
}

/// Host pids of every process in the pid namespace of `pid`.
fn namespace_pids(pid: i64) -> Vec<i64> {
    let target = std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i64>().ok())
        .filter(|p| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok().as_ref() == Some(&target))
        .collect()
}

fn kill9(pid: i64) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn netns_file(id: &str) -> std::path::PathBuf {
    Path::new("/run/kiln/netns").join(id)
}

fn status_of(env: &Env, name: &str) -> String {
    let out = env.ok(&[
        "ps",
        "-a",
        "--filter",
        &format!("name=^{name}$"),
        "--format",
        "{{.State}} {{.Status}}",
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Starts `name` detached with a tree of processes and returns (id, pid 1, all its pids).
fn start_tree(env: &Env, name: &str) -> (String, i64, Vec<i64>) {
    let out = env.ok(&[
        "run",
        "-d",
        "--name",
        name,
        "busybox:local",
        "sh",
        "-c",
        "sleep 1000 & sleep 1000 & wait",
    ]);
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let pid = state(env, &id)["Pid"].as_i64().unwrap();
    eventually(10, "the container's children", || namespace_pids(pid).len() >= 3);
    (id.clone(), pid, namespace_pids(pid))
}

#[test]
fn killed_supervisor_leaves_nothing_running_and_every_command_works() {
    let env = busybox_env();
    let (id, pid, tree) = start_tree(&env, "orphan");
    assert!(netns_file(&id).exists());
    kill9(state(&env, &id)["SupervisorPid"].as_i64().unwrap());
    // The next command adopts it: ps shows it exited, and it is.
    let shown = status_of(&env, "orphan");
    assert!(shown.starts_with("exited Exited (137)"), "{shown}");
    for p in &tree {
        assert!(!alive(*p), "process {p} of the container outlived the reaping");
    }
    assert!(!netns_file(&id).exists(), "the network namespace file leaked");
    let _ = pid;
    // `stop` of the stopped container succeeds; `start` works (no leftover netns).
    env.ok(&["stop", "orphan"]);
    env.ok(&["start", "orphan"]);
    assert!(status_of(&env, "orphan").starts_with("running Up"));
    let pid2 = state(&env, &id)["Pid"].as_i64().unwrap();
    env.ok(&["stop", "-t", "1", "orphan"]);
    assert!(!alive(pid2));
    // Killed again while running: `stop` stops it for real and exits 0.
    env.ok(&["start", "orphan"]);
    let st = state(&env, &id);
    let pid3 = st["Pid"].as_i64().unwrap();
    kill9(st["SupervisorPid"].as_i64().unwrap());
    // The container's first process gets the parent-death signal with its supervisor, so it may
    // be alive or already dying here (asserting either races the kernel); `stop` must leave it
    // gone either way and exit 0.
    env.ok(&["stop", "orphan"]);
    assert!(!alive(pid3), "stop exited 0 without stopping the container");
    // And `rm -f` of an orphan leaks neither its processes nor its namespace.
    env.ok(&["start", "orphan"]);
    let st = state(&env, &id);
    let tree = {
        let p = st["Pid"].as_i64().unwrap();
        eventually(10, "the container's children", || namespace_pids(p).len() >= 3);
        namespace_pids(p)
    };
    kill9(st["SupervisorPid"].as_i64().unwrap());
    env.ok(&["rm", "-f", "orphan"]);
    for p in &tree {
        assert!(!alive(*p), "rm -f leaked process {p}");
    }
    assert!(!netns_file(&id).exists(), "rm -f leaked the network namespace");
    assert!(!env.root().join("containers").join(&id).exists());
}

#[test]
fn killed_foreground_run_is_reaped_by_the_next_command() {
    let env = busybox_env();
    let mut child = env
        .kiln(&[
            "run",
            "--name",
            "fg",
            "busybox:local",
            "sh",
            "-c",
            "sleep 1000 & sleep 1000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let id = {
        let mut id = String::new();
        eventually(20, "the foreground container to run", || {
            let out = env
                .kiln(&["ps", "-q", "--no-trunc", "-f", "name=fg"])
                .output()
                .unwrap();
            id = String::from_utf8_lossy(&out.stdout).trim().to_string();
            !id.is_empty()
        });
        id
    };
    let pid = state(&env, &id)["Pid"].as_i64().unwrap();
    eventually(10, "the container's children", || namespace_pids(pid).len() >= 2);
    let tree = namespace_pids(pid);
    kill9(i64::from(child.id()));
    let _ = child.wait();
    // `kill` of the orphan: Docker's "not running" error, since the reaping stopped it.
    let err = env.fails(&["kill", "fg"]);
    assert!(err.contains("is not running"), "{err}");
    for p in &tree {
        assert!(!alive(*p), "process {p} outlived its killed `kiln run`");
    }
    let shown = status_of(&env, "fg");
    assert!(shown.starts_with("exited Exited (137)"), "{shown}");
    let out = env.ok(&[
        "inspect",
        "-f",
        "{{.State.Status}} {{.State.Running}} {{.State.Pid}} {{.State.ExitCode}}",
        "fg",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exited false 0 137\n");
    env.ok(&["start", "fg"]);
    env.ok(&["rm", "-f", "fg"]);
    assert!(!netns_file(&id).exists());
}

#[test]
fn ps_never_shows_up_after_kill_returned() {
    let env = busybox_env();
    for i in 0..5 {
        let name = format!("k{i}");
        env.ok(&["run", "-d", "--name", &name, "busybox:local", "sleep", "1000"]);
        env.ok(&["kill", &name]);
        let shown = status_of(&env, &name);
        assert!(shown.starts_with("exited Exited (137)"), "after kill: {shown}");
    }
    // A non-fatal signal leaves it running, as in Docker.
    env.ok(&[
        "run",
        "-d",
        "--name",
        "hup",
        "busybox:local",
        "sh",
        "-c",
        "trap '' HUP; sleep 1000",
    ]);
    std::thread::sleep(Duration::from_millis(200));
    env.ok(&["kill", "-s", "HUP", "hup"]);
    assert!(status_of(&env, "hup").starts_with("running"));
    env.ok(&["rm", "-f", "hup"]);
}
