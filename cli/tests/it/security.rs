//! Docker's default isolation for RUN steps and `kiln run`: capabilities, seccomp,
//! `no_new_privs`, masked paths, and the options that change them. Compared with what Docker on
//! this machine prints for the same image (needs root and dockerd).

use std::path::Path;
use std::process::Command;

use crate::harness::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `docker run --rm ARGS...`'s stdout.
fn docker_run(args: &[&str]) -> String {
    let out = Command::new(docker())
        .arg("run")
        .arg("--rm")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "docker run {args:?}\n{}", frame(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kiln_run(env: &Env, args: &[&str]) -> String {
    let mut all = vec!["run", "--rm", "--network", "none"];
    all.extend_from_slice(args);
    String::from_utf8_lossy(&env.ok(&all).stdout).into_owned()
}

/// Builds `dockerfile` as `tag` in a fresh context.
fn build(env: &Env, tag: &str, dockerfile: &str, extra: &[&str]) {
    let ctx = env.path(&format!("ctx-{tag}"));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    let mut args = vec!["build", "--progress=plain", "-t", tag];
    args.extend_from_slice(extra);
    args.push(s(&ctx));
    env.ok(&args);
}

const STATUS: &str = "grep -E 'NoNewPrivs|Seccomp|CapEff|CapBnd|CapPrm' /proc/self/status";

#[test]
fn run_and_build_steps_show_what_docker_shows() {
    let env = busybox_env();
    for user in ["0", "1000"] {
        let want = docker_run(&["-u", user, "busybox:local", "sh", "-c", STATUS]);
        assert!(
            want.contains("Seccomp:\t2\n") && want.contains("NoNewPrivs:\t0\n"),
            "{want}"
        );
        assert_eq!(
            kiln_run(&env, &["-u", user, "busybox:local", "sh", "-c", STATUS]),
            want,
            "kiln run -u {user}"
        );
        // A RUN step as that user: BuildKit's RUN prints the same as docker run.
        let tag = format!("status-{user}");
        build(
            &env,
            &tag,
            &format!("FROM busybox:local\nUSER {user}\nRUN {STATUS} > /tmp/status\n"),
            &[],
        );
        assert_eq!(
            kiln_run(&env, &[&tag, "cat", "/tmp/status"]),
            want,
            "RUN as {user}"
        );
    }
    let want = docker_run(&[
        "--security-opt",
        "no-new-privileges",
        "busybox:local",
        "sh",
        "-c",
        STATUS,
    ]);
    assert!(want.contains("NoNewPrivs:\t1\n"), "{want}");
    assert_eq!(
        kiln_run(
            &env,
            &[
                "--security-opt",
                "no-new-privileges=true",
                "busybox:local",
                "sh",
                "-c",
                STATUS
            ]
        ),
        want
    );
    let want = docker_run(&[
        "--security-opt",
        "seccomp=unconfined",
        "busybox:local",
        "sh",
        "-c",
        STATUS,
    ]);
    assert!(want.contains("Seccomp:\t0\n"), "{want}");
    assert_eq!(
        kiln_run(
            &env,
            &[
                "--security-opt",
                "seccomp=unconfined",
                "busybox:local",
                "sh",
                "-c",
                STATUS
            ]
        ),
        want
    );
}

/// An image whose `/bin/su` is a setuid-root busybox and whose root needs no password: `su -c`
/// from any user runs as root, which is what `sudo` does for a user allowed to use it.
const SUID_IMAGE: &str = "FROM busybox:local\n\
    RUN cp /bin/busybox /bin/suid-busybox && chmod 4755 /bin/suid-busybox \\\n\
    && ln -sf suid-busybox /bin/su && sed -i 's/^root:x:/root::/' /etc/passwd\n";

#[test]
fn setuid_binaries_work_in_run_steps_and_containers_unless_no_new_privileges() {
    let env = busybox_env();
    // By path: busybox's shell runs applets named bare in-process, without an exec.
    build(
        &env,
        "suid",
        &format!("{SUID_IMAGE}USER 1000\nRUN id -u > /tmp/uid && /bin/su -c 'id -u' > /tmp/euid\n"),
        &[],
    );
    assert_eq!(
        kiln_run(&env, &["suid", "cat", "/tmp/uid", "/tmp/euid"]),
        "1000\n0\n"
    );
    assert_eq!(
        kiln_run(&env, &["-u", "1000", "suid", "/bin/su", "-c", "id -u"]),
        "0\n"
    );
    let out = env
        .kiln(&[
            "run",
            "--rm",
            "--network",
            "none",
            "-u",
            "1000",
            "--security-opt",
            "no-new-privileges",
            "suid",
            "/bin/su",
            "-c",
            "id -u",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", frame(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("su: must be suid to work properly"),
        "{}",
        frame(&out)
    );
}

#[test]
fn seccomp_blocks_unshare_without_sys_admin_as_docker_does() {
    let env = busybox_env();
    let unshare = |extra: &[&str]| {
        let mut args = vec!["run", "--rm", "--network", "none"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["busybox:local", "unshare", "-U", "true"]);
        env.kiln(&args).output().unwrap()
    };
    let docker_out = Command::new(docker())
        .args(["run", "--rm", "busybox:local", "unshare", "-U", "true"])
        .output()
        .unwrap();
    let out = unshare(&[]);
    assert_eq!(out.status.code(), docker_out.status.code(), "{}", frame(&out));
    assert_eq!(out.stderr, docker_out.stderr, "{}", frame(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "unshare: unshare(0x10000000): Operation not permitted\n"
    );
    assert!(unshare(&["--cap-add", "SYS_ADMIN"]).status.success());
    assert!(unshare(&["--security-opt", "seccomp=unconfined"])
        .status
        .success());
    assert!(unshare(&["--privileged"]).status.success());
    // The same in a RUN step, and with the entitlement for --security=insecure.
    let ctx = env.path("ctx-unshare");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nRUN unshare -U true\n",
    )
    .unwrap();
    let err = env.fails(&["build", "--progress=plain", s(&ctx)]);
    assert!(
        err.contains("unshare(0x10000000): Operation not permitted"),
        "{err}"
    );
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\nRUN --security=insecure unshare -U true && grep -E '^(Seccomp|CapEff):' /proc/self/status > /st\n",
    )
    .unwrap();
    let err = env.fails(&["build", "--progress=plain", s(&ctx)]);
    assert!(err.contains("security.insecure"), "{err}");
    env.ok(&[
        "build",
        "--progress=plain",
        "--allow",
        "security.insecure",
        "-t",
        "insecure",
        s(&ctx),
    ]);
    let host = std::fs::read_to_string("/proc/self/status").unwrap();
    let host_caps = host
        .lines()
        .find(|l| l.starts_with("CapPrm:"))
        .unwrap()
        .replace("CapPrm", "CapEff");
    assert_eq!(
        kiln_run(&env, &["insecure", "cat", "/st"]),
        format!("{host_caps}\nSeccomp:\t0\n")
    );
}

#[test]
fn custom_seccomp_profiles_and_bad_security_options() {
    let env = busybox_env();
    let profile = env.path("no-mkdir.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
    )
    .unwrap();
    let opt = format!("seccomp={}", s(&profile));
    let out = env
        .kiln(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--security-opt",
            &opt,
            "busybox:local",
            "mkdir",
            "/x",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "mkdir: can't create directory '/x': Permission denied\n",
        "{}",
        frame(&out)
    );
    // The profile was read at create: the container keeps it when the file goes away.
    let id = String::from_utf8_lossy(
        &env.ok(&["create", "--security-opt", &opt, "busybox:local", "mkdir", "/y"])
            .stdout,
    )
    .trim()
    .to_string();
    std::fs::remove_file(&profile).unwrap();
    let out = env.kiln(&["start", "-a", &id]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        frame(&out)
    );

    let err = env.fails(&["run", "--rm", "--security-opt", &opt, "busybox:local", "true"]);
    assert!(err.contains("no-mkdir.json"), "{err}");
    std::fs::write(&profile, "{\"defaultAction\": \"SCMP_ACT_BOGUS\"}").unwrap();
    let err = env.fails(&["run", "--rm", "--security-opt", &opt, "busybox:local", "true"]);
    assert!(
        err.contains("unknown action \"SCMP_ACT_BOGUS\"") && err.contains("no-mkdir.json"),
        "{err}"
    );
    let err = env.fails(&[
        "run",
        "--rm",
        "--security-opt",
        "apparmor=unconfined",
        "busybox:local",
        "true",
    ]);
    assert!(
        err.contains("invalid --security-opt \"apparmor=unconfined\""),
        "{err}"
    );
}

#[test]
fn masked_and_read_only_paths_in_run_steps_and_containers() {
    let env = busybox_env();
    // /proc/keys and /proc/timer_list read as /dev/null, /sys/firmware is an empty read-only
    // tmpfs, /proc/sys is read-only; the same in a RUN step.
    let script = "cat /proc/keys /proc/timer_list | wc -c; ls /sys/firmware | wc -l; \
                  (echo x > /proc/sys/kernel/domainname) 2>&1 | grep -c 'Read-only file system'";
    let want = docker_run(&["busybox:local", "sh", "-c", script]);
    assert_eq!(want, "0\n0\n1\n");
    assert_eq!(kiln_run(&env, &["busybox:local", "sh", "-c", script]), want);
    build(
        &env,
        "masked",
        &format!("FROM busybox:local\nRUN ({script}) > /masked\n"),
        &[],
    );
    assert_eq!(kiln_run(&env, &["masked", "cat", "/masked"]), want);
}

/// Pids of processes whose command line is exactly `words`.
fn pids_running(words: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = words.iter().flat_map(|w| w.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

#[test]
fn killing_kiln_build_kills_the_run_steps_processes() {
    let env = busybox_env();
    let ctx = env.path("ctx-orphan");
    std::fs::create_dir_all(&ctx).unwrap();
    // Durations unique to this test process name its sleeps among everything on the machine.
    let bg = format!("{}", 100_000 + std::process::id());
    let fg = format!("{}", 200_000 + std::process::id());
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM busybox:local\nRUN sleep {bg} & sleep {fg}\n"),
    )
    .unwrap();
    let mut child = env
        .kiln(&["build", "--progress=plain", s(&ctx)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(30, "the RUN step's two sleeps", || {
        !pids_running(&["sleep", &bg]).is_empty() && !pids_running(&["sleep", &fg]).is_empty()
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    eventually(10, "the RUN step's processes to die with kiln", || {
        pids_running(&["sleep", &bg]).is_empty() && pids_running(&["sleep", &fg]).is_empty()
    });
}

/// Answers `body` to every connection on `listener`, on a thread.
fn serve(listener: std::net::TcpListener, body: &'static str) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            use std::io::Write;
            let _ = stream.write_all(body.as_bytes());
        }
    });
}

#[test]
fn run_steps_get_their_own_network_not_the_hosts() {
    let env = busybox_env();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    serve(listener, "host-loopback");
    let ctx = env.path("ctx-net");
    std::fs::create_dir_all(&ctx).unwrap();
    let fetch = format!(
        "(echo | nc -w 5 127.0.0.1 {port} || echo unreachable) > /loopback; \
         ip -o -4 addr show eth0 | awk '{{print $4}}' > /addr; ip route | grep default > /route"
    );
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM busybox:local\nRUN {fetch}\n"),
    )
    .unwrap();
    env.ok(&["build", "--progress=plain", "-t", "netdefault", s(&ctx)]);
    assert_eq!(
        kiln_run(&env, &["netdefault", "cat", "/loopback"]),
        "unreachable\n"
    );
    let addr = kiln_run(&env, &["netdefault", "cat", "/addr"]);
    assert!(addr.starts_with("10.88.") && addr.ends_with("/16\n"), "{addr}");
    assert_eq!(
        kiln_run(&env, &["netdefault", "cat", "/route"]),
        "default via 10.88.0.1 dev eth0 \n"
    );
    // --network=host needs the entitlement, and then sees the host's loopback.
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM busybox:local\nRUN --network=host echo | nc -w 5 127.0.0.1 {port} > /loopback\n"),
    )
    .unwrap();
    let err = env.fails(&["build", "--progress=plain", s(&ctx)]);
    assert!(err.contains("network.host"), "{err}");
    env.ok(&[
        "build",
        "--progress=plain",
        "--allow",
        "network.host",
        "-t",
        "nethost",
        s(&ctx),
    ]);
    assert_eq!(kiln_run(&env, &["nethost", "cat", "/loopback"]), "host-loopback");
}

/// A test host in a network namespace of its own behind a veth pair (`/30`), with nothing but a
/// route to its own link: it can answer a RUN step only if the step's traffic was forwarded and
/// NATed to the host's address on that link. Removed on drop.
struct TestHost {
    ns: String,
    host_ip: String,
    ip: String,
}

impl TestHost {
    fn new() -> TestHost {
        let id = std::process::id();
        let ns = format!("kiln-it-{id}");
        let (a, b) = (format!("kt{}a", id % 100_000), format!("kt{}b", id % 100_000));
        let net = format!("10.204.{}", (id % 64) * 4);
        let host_ip = format!("{net}.1");
        let ip = format!("{net}.2");
        let sh = |cmd: &str| {
            let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
            assert!(out.status.success(), "{cmd}\n{}", frame(&out));
        };
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&format!(
            "ip netns add {ns} && ip link add {a} type veth peer name {b} && ip link set {b} netns {ns} \
             && ip addr add {host_ip}/30 dev {a} && ip link set {a} up \
             && ip -n {ns} addr add {ip}/30 dev {b} && ip -n {ns} link set {b} up && ip -n {ns} link set lo up"
        ));
        TestHost { ns, host_ip, ip }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // The veth pair goes with the namespace.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[test]
fn run_steps_reach_outside_through_nat() {
    let env = busybox_env();
    let host = TestHost::new();
    // A server in the test host's namespace, answering with the client's address as the test
    // host saw it: the host's address on the link, since the step's traffic is NATed.
    let script = format!(
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{}', 8080))\ns.listen()\nwhile True:\n    c, a = s.accept()\n    c.sendall((a[0] + '\\n').encode())\n    c.close()\n",
        host.ip
    );
    let mut server = Command::new("ip")
        .args(["netns", "exec", &host.ns, "python3", "-c", &script])
        .spawn()
        .unwrap();
    // Python starts slowly on a loaded machine: the build begins once the server listens.
    eventually(30, "the test host's server to listen", || {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::new(host.ip.parse().unwrap(), 8080),
            std::time::Duration::from_millis(500),
        )
        .is_ok()
    });
    let ctx = env.path("ctx-nat");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM busybox:local\nRUN for i in 1 2 3 4 5 6 7 8 9 10; do \
             echo | nc -w 2 {} 8080 > /peer && test -s /peer && break; sleep 0.3; done\n",
            host.ip
        ),
    )
    .unwrap();
    let built = env
        .kiln(&["build", "--progress=plain", "-t", "nat", s(&ctx)])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(built.status.success(), "{}", frame(&built));
    assert_eq!(
        kiln_run(&env, &["nat", "cat", "/peer"]),
        format!("{}\n", host.host_ip)
    );
}

#[test]
fn secret_targets_leave_the_layer_as_buildkit_leaves_it() {
    let env = busybox_env();
    let ctx = env.path("ctx-secret");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local\n\
         RUN --mount=type=secret,id=s,target=/run/custom/secret cat /run/custom/secret > /s.out\n\
         RUN --mount=type=secret,id=s cat /run/secrets/s > /s2.out\n\
         RUN ls -1a /run /run/custom /run/secrets > /listing 2>&1 || true\n",
    )
    .unwrap();
    let secret = env.path("secret");
    std::fs::write(&secret, "topsecret\n").unwrap();
    let src = format!("id=s,src={}", s(&secret));
    let out = env.path("docker-out");
    let built = Command::new(docker())
        .args(["build", "-q", "--secret", &src, "-o"])
        .arg(format!("type=local,dest={}", s(&out)))
        .arg(&ctx)
        .env("DOCKER_BUILDKIT", "1")
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", frame(&built));
    env.ok(&[
        "build",
        "--progress=plain",
        "--secret",
        &src,
        "-t",
        "secrets",
        s(&ctx),
    ]);
    for file in ["listing", "s.out", "s2.out"] {
        assert_eq!(
            kiln_run(&env, &["secrets", "cat", &format!("/{file}")]),
            std::fs::read_to_string(out.join(file)).unwrap(),
            "/{file}"
        );
    }
}

#[test]
fn rw_binds_of_one_file_write_to_a_copy_and_run_binds_a_file() {
    let env = busybox_env();
    let ctx = env.path("ctx-bindfile");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("in.txt"), "in\n").unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:local AS src\nRUN echo fromstage > /s.txt\nFROM busybox:local\n\
         RUN --mount=type=bind,source=in.txt,target=/x,rw echo changed >> /x && cat /x > /ctx.out\n\
         RUN --mount=type=bind,from=src,source=/s.txt,target=/y,rw echo changed >> /y && cat /y > /stage.out\n",
    )
    .unwrap();
    env.ok(&["build", "--progress=plain", "-t", "bindfile", s(&ctx)]);
    assert_eq!(
        kiln_run(&env, &["bindfile", "cat", "/ctx.out", "/stage.out"]),
        "in\nchanged\nfromstage\nchanged\n"
    );
    // The writes reached neither the context nor the layer.
    assert_eq!(std::fs::read_to_string(ctx.join("in.txt")).unwrap(), "in\n");
    let out = env
        .kiln(&["run", "--rm", "--network", "none", "bindfile", "ls", "/x", "/y"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", frame(&out));
    // kiln run -v FILE:/target binds one file, writes going through as in Docker.
    let host_file = env.path("host.txt");
    std::fs::write(&host_file, "host\n").unwrap();
    let vol = format!("{}:/etc/host.txt", s(&host_file));
    assert_eq!(
        kiln_run(
            &env,
            &[
                "-v",
                &vol,
                "busybox:local",
                "sh",
                "-c",
                "cat /etc/host.txt; echo more >> /etc/host.txt"
            ]
        ),
        "host\n"
    );
    assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "host\nmore\n");
}

#[test]
fn sudo_in_a_run_step_as_a_user_with_passwordless_sudo() {
    let env = busybox_env();
    let tar = env.path("sudo.tar");
    let made = Command::new("bash")
        .arg(workspace().join("testdata/make-sudo-rootfs.sh"))
        .arg(&tar)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "testdata/make-sudo-rootfs.sh (needs the sudo package)\n{}",
        frame(&made)
    );
    env.ok(&["import", s(&tar), "sudo:local"]);
    build(
        &env,
        "withsudo",
        "FROM sudo:local\nUSER app\nRUN id -u > /tmp/uid && sudo -n id -u > /tmp/euid && sudo -n touch /root-owned\n",
        &[],
    );
    assert_eq!(
        kiln_run(&env, &["withsudo", "cat", "/tmp/uid", "/tmp/euid"]),
        "1000\n0\n"
    );
    assert_eq!(
        kiln_run(&env, &["withsudo", "stat", "-c", "%u", "/root-owned"]),
        "0\n"
    );
    // As under Docker: sudo works in a container too, and not under no-new-privileges.
    let d = docker();
    let tag = format!("kiln-it-sudo-{}", std::process::id());
    let imported = Command::new(&d).args(["import", s(&tar), &tag]).output().unwrap();
    assert!(imported.status.success(), "{}", frame(&imported));
    let want = Command::new(&d)
        .args(["run", "--rm", "-u", "app", &tag, "sudo", "-n", "id", "-u"])
        .output()
        .unwrap();
    let _ = Command::new(&d).args(["rmi", &tag]).output();
    assert_eq!(String::from_utf8_lossy(&want.stdout), "0\n", "{}", frame(&want));
    assert_eq!(
        kiln_run(&env, &["-u", "app", "sudo:local", "sudo", "-n", "id", "-u"]),
        "0\n"
    );
    let out = env
        .kiln(&[
            "run",
            "--rm",
            "--network",
            "none",
            "-u",
            "app",
            "--security-opt",
            "no-new-privileges",
            "sudo:local",
            "sudo",
            "-n",
            "id",
            "-u",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", frame(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no new privileges"),
        "{}",
        frame(&out)
    );
}
