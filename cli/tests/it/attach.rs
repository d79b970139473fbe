//! `run -it`, `attach` and `start -ai` on a real pseudo-terminal (`script`), with the detach
//! keys, next to the same session with Docker's client.

use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;

/// One step of a terminal session: wait until the output so far holds `wait_for` (from the
/// previous step's match on), then type `send`.
struct Step<'a> {
    wait_for: &'a str,
    send: &'a [u8],
}

/// Runs `shell` (`sh -c`) on a new pseudo-terminal of `script`, typing the steps; returns
/// everything the terminal showed. The session ends with `echo END` after `shell`.
fn pty_session(shell: &str, steps: &[Step<'_>]) -> String {
    let cmd = format!("stty rows 30 cols 90; {shell}; echo END");
    let mut child = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run script (util-linux)");
    let out = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let out = out.clone();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let text = |out: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let mut stdin = child.stdin.take().unwrap();
    let mut from = 0;
    let wait = |needle: &str, from: usize| -> usize {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let t = text(&out);
            if let Some(i) = t.get(from..).and_then(|s| s.find(needle)) {
                return from + i + needle.len();
            }
            assert!(
                Instant::now() < end,
                "the terminal never showed {needle:?}; it showed:\n{t}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for step in steps {
        from = wait(step.wait_for, from);
        // A moment for the line discipline to be in the state the output suggests.
        std::thread::sleep(Duration::from_millis(200));
        stdin.write_all(step.send).unwrap();
        stdin.flush().unwrap();
    }
    wait("END", from);
    drop(stdin);
    let _ = child.wait();
    let _ = reader.join();
    text(&out)
}

/// The steps of the session both clients go through: `run -it`, a command, detach; the
/// container still runs; `attach`, a command, detach with other keys (Docker prints "read escape
/// sequence" and exits 1); `attach` again and exit the shell with 5; the terminal's mode after.
fn session(client: &str, name: &str) -> String {
    let shell = format!(
        "{client} run -it --name {name} busybox:local sh; echo rc1=$?; \
         {client} ps --format '{{{{.Names}}}} {{{{.State}}}}' | grep {name}; \
         {client} attach --detach-keys=ctrl-x,y {name}; echo rc2=$?; \
         {client} attach {name}; echo rc3=$?; \
         {client} ps -a --format '{{{{.Names}}}} {{{{.State}}}}' | grep {name}; \
         stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo"
    );
    // Arithmetic, so that the output ("42") is not in the typed text a terminal echoes.
    pty_session(
        &shell,
        &[
            Step {
                wait_for: "/ # ",
                send: b"echo $((6*7))\r",
            },
            Step {
                wait_for: "42",
                send: b"\x10",
            },
            Step {
                wait_for: "",
                send: b"\x11",
            },
            Step {
                wait_for: &format!("{name} running"),
                send: b"echo $((6*8))\r",
            },
            Step {
                wait_for: "48",
                send: b"\x18y",
            },
            Step {
                wait_for: "rc2=",
                send: b"echo $((6*9)); exit 5\r",
            },
        ],
    )
}

/// The lines of `out` that start with one of `prefixes` or equal one of `exact`.
fn lines_of<'a>(out: &'a str, prefixes: &[&str], exact: &[&str]) -> Vec<&'a str> {
    out.split(['\r', '\n'])
        // What follows the shell's cursor query, if it shares the line.
        .map(|l| l.rsplit("\x1b[6n").next().unwrap_or(l).trim())
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)) || exact.contains(l))
        .collect()
}

#[test]
fn run_it_detaches_and_attach_reattaches_as_docker() {
    let env = busybox_env();
    let kiln = format!("{} --root {}", env!("CARGO_BIN_EXE_kiln"), env.root().display());
    let out = session(&kiln, "kattach");
    let summary = |out: &str, name: &str| {
        let mut l = lines_of(
            out,
            &["rc", "read escape", name],
            &["42", "48", "54", "icanon", "-icanon", "echo", "-echo"],
        );
        l.dedup();
        l.join("\n").replace(name, "NAME")
    };
    let got = summary(&out, "kattach");
    let want =
        "42\nrc1=0\nNAME running\n48\nread escape sequence\nrc2=1\n54\nrc3=5\nNAME exited\nicanon\necho";
    assert_eq!(got, want, "kiln's terminal showed:\n{out}");

    let docker = docker();
    let _c = DockerContainer("kiln-it-attach".into());
    let dout = session(&docker, "kiln-it-attach");
    assert_eq!(
        summary(&dout, "kiln-it-attach"),
        want,
        "docker's terminal showed:\n{dout}"
    );
}

#[test]
fn start_ai_detaches_and_attach_reaches_a_foreground_run() {
    let env = busybox_env();
    let kiln = format!("{} --root {}", env!("CARGO_BIN_EXE_kiln"), env.root().display());
    env.ok(&["create", "-it", "--name", "later", "busybox:local", "sh"]);
    let out = pty_session(
        &format!("{kiln} start -ai later; echo rc=$?"),
        &[
            Step {
                wait_for: "/ # ",
                send: b"echo $((6*7))\r",
            },
            Step {
                wait_for: "42",
                send: b"\x10\x11",
            },
        ],
    );
    assert!(out.contains("rc=0"), "{out}");
    assert_eq!(
        stdout_of(&env, &["inspect", "-f", "{{.State.Running}}", "later"]),
        "true\n"
    );
    env.ok(&["kill", "later"]);

    // A container run in the foreground without a terminal can be attached to.
    let mut fg = env
        .kiln(&[
            "run",
            "--name",
            "fg",
            "busybox:local",
            "sh",
            "-c",
            "i=0; while [ $i -lt 100 ]; do echo tick $i; i=$((i+1)); sleep 0.05; done; exit 7",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    eventually(10, "the foreground container to run", || {
        stdout_of(&env, &["ps", "-q", "-f", "name=fg"]).len() > 1
    });
    let att = env.kiln(&["attach", "fg"]).output().unwrap();
    assert_eq!(att.status.code(), Some(7), "{}", frame(&att));
    assert!(
        String::from_utf8_lossy(&att.stdout).contains("tick 99\n"),
        "{}",
        frame(&att)
    );
    assert_eq!(fg.wait().unwrap().code(), Some(7));
}

#[test]
fn bad_detach_keys_are_refused() {
    let env = busybox_env();
    let out = env
        .kiln(&[
            "run",
            "--detach-keys=ctrl-p,bogus",
            "--rm",
            "busybox:local",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", frame(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("invalid detach keys (ctrl-p,bogus) provided: unknown character: 'bogus'"),
        "{}",
        frame(&out)
    );
}

fn stdout_of(env: &Env, args: &[&str]) -> String {
    String::from_utf8_lossy(&env.ok(args).stdout).into_owned()
}
