//! Containers: `run` (foreground and `-d`), the supervisor, and the lifecycle commands, with real
//! processes in real namespaces on the busybox base.

use std::time::Duration;

use crate::harness::{busybox_env, eventually, frame, Env};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ids(env: &Env) -> Vec<String> {
    stdout(&env.ok(&["ps", "-a", "-q"]))
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn detached_run_ps_logs_stop_rm() {
    let env = busybox_env();
    let out = env.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "busybox:local",
        "sh",
        "-c",
        "echo hello; sleep 0.2; echo oops >&2; exec sleep 100",
    ]);
    let id = stdout(&out).trim().to_string();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{}",
        frame(&out)
    );

    let ps = stdout(&env.ok(&["ps"]));
    let mut lines = ps.lines();
    let head = lines.next().unwrap();
    let cols = [
        "CONTAINER ID",
        "IMAGE",
        "COMMAND",
        "CREATED",
        "STATUS",
        "PORTS",
        "NAMES",
    ];
    let mut at = 0;
    for c in cols {
        let i = head[at..]
            .find(c)
            .unwrap_or_else(|| panic!("column {c} missing in {head:?}"))
            + at;
        at = i + c.len();
    }
    let row = lines.next().expect("a row for the running container");
    assert!(row.starts_with(&id[..12]), "{row}");
    assert!(
        row.contains("busybox:local") && row.contains("Up ") && row.ends_with("web"),
        "{row}"
    );
    assert!(row.contains("\"sh -c echo hello; s…\""), "{row}");

    // stdout and stderr are separate pipes: the test writes them 0.2 s apart so that their order
    // in the log is defined.
    eventually(10, "the log", || {
        let logs = env.ok(&["logs", "web"]);
        stdout(&logs) == "hello\n" && String::from_utf8_lossy(&logs.stderr) == "oops\n"
    });
    let stamped = stdout(&env.ok(&["logs", "-t", "web"]));
    assert!(
        stamped.ends_with("Z hello\n") && stamped.starts_with("20"),
        "{stamped}"
    );
    // The last entry is the stderr line.
    let tail = env.ok(&["logs", "--tail", "1", "web"]);
    assert_eq!(
        (
            stdout(&tail).as_str(),
            String::from_utf8_lossy(&tail.stderr).as_ref()
        ),
        ("", "oops\n")
    );
    let raw = std::fs::read_to_string(env.root().join(format!("containers/{id}/{id}-json.log"))).unwrap();
    assert!(
        raw.starts_with("{\"log\":\"hello\\n\",\"stream\":\"stdout\",\"time\":\""),
        "{raw}"
    );

    // sleep as pid 1 ignores SIGTERM: SIGKILL after the timeout.
    let stop = env.ok(&["stop", "-t", "1", "web"]);
    assert_eq!(stdout(&stop), "web\n");
    let state = &env.inspect("web")["State"];
    assert_eq!(state["ExitCode"], 137, "{state}");
    assert_eq!(state["Status"], "exited");
    assert_eq!(state["Running"], false);
    let ps = stdout(&env.ok(&["ps", "-a"]));
    assert!(ps.contains("Exited (137)"), "{ps}");
    assert_eq!(stdout(&env.ok(&["ps"])).lines().count(), 1, "only the header");

    env.ok(&["rm", "web"]);
    assert!(ids(&env).is_empty());
    assert!(!env.root().join("containers").join(&id).exists());
}

#[test]
fn stop_signal_exit_143() {
    let env = busybox_env();
    env.ok(&[
        "run",
        "-d",
        "--name",
        "trapper",
        "busybox:local",
        "sh",
        "-c",
        "trap 'exit 143' TERM; while true; do sleep 0.05; done",
    ]);
    env.ok(&["stop", "-t", "10", "trapper"]);
    assert_eq!(env.inspect("trapper")["State"]["ExitCode"], 143);
}

#[test]
fn name_conflict_leaves_nothing_behind() {
    let env = busybox_env();
    let first = stdout(&env.ok(&["create", "--name", "dup", "busybox:local", "true"]));
    let out = env
        .kiln(&["run", "--name", "dup", "busybox:local", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "Conflict. The container name \"/dup\" is already in use by container \"{}\"",
            first.trim()
        )),
        "{err}"
    );
    assert_eq!(ids(&env).len(), 1);
    assert_eq!(
        std::fs::read_dir(env.root().join("containers")).unwrap().count(),
        1
    );
}

#[test]
fn rm_flag_removes_the_container() {
    let env = busybox_env();
    let out = env.ok(&["run", "--rm", "busybox:local", "sh", "-c", "echo hi"]);
    assert_eq!(stdout(&out), "hi\n");
    assert!(ids(&env).is_empty());
    env.ok(&[
        "run",
        "-d",
        "--rm",
        "--name",
        "brief",
        "busybox:local",
        "sleep",
        "0.2",
    ]);
    eventually(10, "the --rm container to vanish", || ids(&env).is_empty());
    assert!(env.fails(&["inspect", "brief"]).contains("brief"));
}

#[test]
fn restart_on_failure_counts_restarts() {
    let env = busybox_env();
    env.ok(&[
        "run",
        "-d",
        "--name",
        "flaky",
        "--restart",
        "on-failure:2",
        "busybox:local",
        "sh",
        "-c",
        "echo run; exit 3",
    ]);
    eventually(20, "the retries to end", || {
        env.inspect("flaky")["State"]["Status"] == "exited"
    });
    let v = env.inspect("flaky");
    assert_eq!(v["RestartCount"], 2, "{v}");
    assert_eq!(v["State"]["ExitCode"], 3);
    assert_eq!(v["HostConfig"]["RestartPolicy"]["Name"], "on-failure");
    assert_eq!(stdout(&env.ok(&["logs", "flaky"])), "run\nrun\nrun\n");
}

#[test]
fn restart_always_restarts_until_stopped() {
    let env = busybox_env();
    env.ok(&[
        "run",
        "-d",
        "--name",
        "looper",
        "--restart",
        "always",
        "busybox:local",
        "sh",
        "-c",
        "echo x; sleep 0.1",
    ]);
    eventually(20, "two restarts", || {
        env.inspect("looper")["RestartCount"].as_u64().unwrap_or(0) >= 2
    });
    env.ok(&["stop", "-t", "1", "looper"]);
    let after = env.inspect("looper");
    assert_eq!(after["State"]["Status"], "exited", "{after}");
    std::thread::sleep(Duration::from_millis(700));
    let later = env.inspect("looper");
    assert_eq!(
        later["RestartCount"], after["RestartCount"],
        "no restart after stop"
    );
    assert_eq!(later["State"]["Status"], "exited");
}

#[test]
fn wait_prints_the_exit_code() {
    let env = busybox_env();
    env.ok(&[
        "run",
        "-d",
        "--name",
        "waiter",
        "busybox:local",
        "sh",
        "-c",
        "sleep 0.3; exit 7",
    ]);
    assert_eq!(stdout(&env.ok(&["wait", "waiter"])), "7\n");
}

#[test]
fn inspect_state_pid_is_live_and_rm_force_kills() {
    let env = busybox_env();
    env.ok(&["run", "-d", "--name", "sleeper", "busybox:local", "sleep", "100"]);
    let v = env.inspect("sleeper");
    assert_eq!(v["Name"], "/sleeper");
    assert_eq!(v["Path"], "sleep");
    assert_eq!(v["Args"], serde_json::json!(["100"]));
    assert_eq!(v["State"]["Running"], true);
    let pid = v["State"]["Pid"].as_i64().unwrap();
    assert!(pid > 0);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert_eq!(cmdline, b"sleep\x00100\x00");

    let top = stdout(&env.ok(&["top", "sleeper"]));
    assert!(
        top.starts_with("UID") && top.contains("PID") && top.contains("CMD"),
        "{top}"
    );
    assert!(
        top.lines()
            .any(|l| l.contains(&pid.to_string()) && l.ends_with("sleep 100")),
        "{top}"
    );

    let err = env.fails(&["rm", "sleeper"]);
    assert!(err.contains("container is running"), "{err}");
    env.ok(&["rm", "-f", "sleeper"]);
    assert!(ids(&env).is_empty());
    eventually(5, "the process to die", || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
}

#[test]
fn kill_sends_the_signal() {
    let env = busybox_env();
    env.ok(&[
        "run",
        "-d",
        "--name",
        "trapped",
        "busybox:local",
        "sh",
        "-c",
        "trap 'echo got usr1; exit 9' USR1; while true; do sleep 0.05; done",
    ]);
    env.ok(&["kill", "-s", "USR1", "trapped"]);
    assert_eq!(stdout(&env.ok(&["wait", "trapped"])), "9\n");
    assert_eq!(stdout(&env.ok(&["logs", "trapped"])), "got usr1\n");
    assert!(env.fails(&["kill", "trapped"]).contains("is not running"));
}

#[test]
fn start_attach_streams_and_returns_the_code() {
    let env = busybox_env();
    env.ok(&[
        "create",
        "--name",
        "later",
        "busybox:local",
        "sh",
        "-c",
        "echo started; echo e >&2; exit 4",
    ]);
    assert!(stdout(&env.ok(&["ps", "-a"])).contains("Created"));
    let out = env.kiln(&["start", "-a", "later"]).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", frame(&out));
    assert_eq!(stdout(&out), "started\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "e\n");
    // A plain start runs it again in the background.
    assert_eq!(stdout(&env.ok(&["start", "later"])), "later\n");
    assert_eq!(stdout(&env.ok(&["wait", "later"])), "4\n");
    assert_eq!(stdout(&env.ok(&["logs", "later"])), "started\nstarted\n");
}

#[test]
fn interactive_stdin_reaches_the_container() {
    let env = busybox_env();
    use std::io::Write as _;
    let mut child = env
        .kiln(&["run", "-i", "--rm", "busybox:local", "tr", "a-z", "A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"shout\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "SHOUT\n");
}

#[test]
fn exit_codes_follow_docker() {
    let env = busybox_env();
    let code = |args: &[&str]| env.kiln(args).output().unwrap();
    let out = code(&["run", "--rm", "busybox:local", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    let out = code(&["run", "--rm", "busybox:local", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127), "{}", frame(&out));
    let out = code(&["run", "--rm", "busybox:local", "/etc/passwd"]);
    assert_eq!(out.status.code(), Some(126), "{}", frame(&out));
    let out = code(&["run", "--rm", "nosuch:image", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", frame(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unable to find image 'nosuch:image' locally"));
    let out = code(&["run", "--rm", "--restart", "always", "busybox:local", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", frame(&out));
    let out = code(&["run", "-d", "busybox:local", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127), "{}", frame(&out));
    assert!(
        ids(&env).len() == 1,
        "the -d container stays, created, as in Docker"
    );
}

#[test]
fn a_gone_container_is_an_error() {
    let env = busybox_env();
    for cmd in ["stop", "rm", "logs", "start", "kill", "wait", "top", "attach"] {
        let out = env.kiln(&[cmd, "ghost"]).output().unwrap();
        assert!(!out.status.success(), "{cmd}: {}", frame(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Error: No such container: ghost"), "{cmd}: {err}");
    }
    assert!(!env.kiln(&["inspect", "ghost"]).output().unwrap().status.success());
}

#[test]
fn a_dead_supervisor_is_not_reported_running() {
    let env = busybox_env();
    let id = stdout(&env.ok(&["run", "-d", "--name", "orphan", "busybox:local", "sleep", "100"]));
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.root().join(format!("containers/{}/state.json", id.trim()))).unwrap(),
    )
    .unwrap();
    let sup = state["SupervisorPid"].as_i64().unwrap();
    let pid = env.inspect("orphan")["State"]["Pid"].as_i64().unwrap();
    std::process::Command::new("kill")
        .args(["-9", &sup.to_string()])
        .status()
        .unwrap();
    // The container's first process dies with the supervisor that started it
    // (PR_SET_PDEATHSIG); the next command adopts the orphan's record and says so.
    eventually(5, "the container to die with its supervisor", || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    eventually(5, "the state to say exited", || {
        env.inspect("orphan")["State"]["Status"] == "exited"
    });
    assert_eq!(env.inspect("orphan")["State"]["ExitCode"], 137);
    assert!(!stdout(&env.ok(&["ps"])).contains("orphan"));
    env.ok(&["rm", "-f", "orphan"]);
}

#[test]
fn prune_removes_stopped_containers() {
    let env = busybox_env();
    let done = stdout(&env.ok(&["create", "--name", "idle", "busybox:local", "true"]));
    env.ok(&["run", "-d", "--name", "busy", "busybox:local", "sleep", "100"]);
    let out = stdout(&env.ok(&["container", "prune", "-f"]));
    assert!(
        out.contains("Deleted Containers:") && out.contains(done.trim()),
        "{out}"
    );
    assert_eq!(ids(&env).len(), 1, "the running container stays");
    env.ok(&["rm", "-f", "busy"]);
    let info = stdout(&env.ok(&["info"]));
    assert!(
        info.contains("Containers: 0") && info.contains("Images: 1"),
        "{info}"
    );
}

#[test]
fn exec_runs_in_the_container() {
    let env = busybox_env();
    env.ok(&[
        "run",
        "-d",
        "--name",
        "host1",
        "-e",
        "FROM_RUN=1",
        "busybox:local",
        "sleep",
        "100",
    ]);
    let out = env.ok(&[
        "exec",
        "-e",
        "X=y",
        "-w",
        "/tmp",
        "host1",
        "sh",
        "-c",
        "echo $X $FROM_RUN $(pwd); cat /proc/1/cmdline",
    ]);
    assert_eq!(stdout(&out), "y 1 /tmp\nsleep\x00100\x00");
    let out = env
        .kiln(&["exec", "host1", "sh", "-c", "exit 5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let out = env.kiln(&["exec", "host1", "no-such-command"]).output().unwrap();
    assert_eq!(out.status.code(), Some(127), "{}", frame(&out));
    let out = env.ok(&[
        "exec",
        "-t",
        "host1",
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo terminal",
    ]);
    assert_eq!(stdout(&out), "terminal\r\n", "{}", frame(&out));
    env.ok(&["rm", "-f", "host1"]);
}

#[test]
fn tty_gives_the_container_a_terminal() {
    let env = busybox_env();
    let script = "test -t 0 && test -t 1 && test -t 2 && echo terminal; echo err >&2";
    let out = env.ok(&["run", "--rm", "-t", "busybox:local", "sh", "-c", script]);
    // One stream: stderr arrives on stdout, as through a terminal.
    let text = stdout(&out).replace('\r', "");
    assert_eq!(text, "terminal\nerr\n", "{}", frame(&out));
    assert!(out.stderr.is_empty(), "{}", frame(&out));
}
