//! `kiln run` options that reach outside the container's own filesystem: volumes and mounts,
//! bridge networking, published ports, links, pulling an unknown image, and the foreground
//! signal proxy. Root, busybox; traffic only to loopback and to the containers' own addresses.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{busybox_env, frame, require_root, Env};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kiln run ARGS` expected to succeed; its standard output.
fn run(env: &Env, args: &[&str]) -> String {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    stdout(&env.ok(&full))
}

/// `kiln run ARGS` as it ends.
fn run_status(env: &Env, args: &[&str]) -> Output {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    env.kiln(&full).output().expect("spawn kiln")
}

/// A run whose shell printed `printed`, then failed (exit 1) writing to a read-only file system.
fn assert_refused_write(out: &Output, printed: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", frame(out));
    assert_eq!(stdout(out).trim(), printed);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{}",
        frame(out)
    );
}

fn volumes(env: &Env) -> Vec<String> {
    stdout(&env.ok(&["volume", "ls", "-q"]))
        .lines()
        .map(str::to_string)
        .collect()
}

fn containers(env: &Env) -> Vec<String> {
    stdout(&env.ok(&["ps", "-a", "-q"]))
        .lines()
        .map(str::to_string)
        .collect()
}

/// The host address `kiln port NAME PORT` prints.
fn published(env: &Env, name: &str, port: &str) -> String {
    stdout(&env.ok(&["port", name, port])).trim().to_string()
}

/// Sends an HTTP request to `addr` until a server answers (the proxy accepts before the
/// container's server listens) and returns the response.
fn http_get(addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(body) if !body.is_empty() => return body,
            other => {
                assert!(Instant::now() < deadline, "no HTTP answer from {addr}: {other:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

const HTTPD: &str =
    "mkdir -p /srv && echo hello-from-kiln > /srv/index.html && exec httpd -f -p 8080 -h /srv";

#[test]
fn named_volume_persists_across_runs() {
    let env = busybox_env();
    run(
        &env,
        &[
            "--rm",
            "-v",
            "data1:/data",
            "busybox:local",
            "sh",
            "-c",
            "echo kept > /data/f",
        ],
    );
    assert_eq!(volumes(&env), vec!["data1".to_string()]);
    let out = run(
        &env,
        &["--rm", "-v", "data1:/data", "busybox:local", "cat", "/data/f"],
    );
    assert_eq!(out.trim(), "kept");
    // A named volume outlives `--rm`.
    assert_eq!(volumes(&env), vec!["data1".to_string()]);
}

#[test]
fn read_only_bind_refuses_writes_and_rw_bind_writes_through() {
    let env = busybox_env();
    let host = env.path("hostdir");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("in.txt"), "from-host\n").unwrap();
    let ro = format!("{}:/x:ro", host.display());
    let out = run_status(
        &env,
        &[
            "--rm",
            "-v",
            &ro,
            "busybox:local",
            "sh",
            "-c",
            "cat /x/in.txt; echo no > /x/new",
        ],
    );
    assert_refused_write(&out, "from-host");
    assert!(!host.join("new").exists());
    let rw = format!("{}:/x", host.display());
    run(
        &env,
        &[
            "--rm",
            "-v",
            &rw,
            "busybox:local",
            "sh",
            "-c",
            "echo yes > /x/new",
        ],
    );
    assert_eq!(std::fs::read_to_string(host.join("new")).unwrap(), "yes\n");
}

#[test]
fn bad_mount_specs_fail_at_create_and_leave_nothing() {
    let env = busybox_env();
    let missing = env.path("no-such-dir");
    let spec = format!("type=bind,src={},dst=/x", missing.display());
    let out = run_status(
        &env,
        &[
            "--rm",
            "-v",
            "named:/y",
            "--mount",
            &spec,
            "busybox:local",
            "true",
        ],
    );
    assert_eq!(out.status.code(), Some(125), "{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bind source path does not exist") && err.contains("no-such-dir"),
        "{err}"
    );
    assert!(containers(&env).is_empty());
    assert!(volumes(&env).is_empty());

    let out = env
        .kiln(&["create", "-v", "va:/x", "-v", "vb:/x", "busybox:local", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", frame(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Duplicate mount point: /x"),
        "{}",
        frame(&out)
    );
    assert!(containers(&env).is_empty());
    assert!(volumes(&env).is_empty());

    let out = run_status(&env, &["-p", "notaport", "busybox:local", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", frame(&out));
    assert!(containers(&env).is_empty());
}

#[test]
fn tmpfs_and_read_only_rootfs() {
    let env = busybox_env();
    let out = run(
        &env,
        &[
            "--rm",
            "--tmpfs",
            "/t",
            "busybox:local",
            "sh",
            "-c",
            "grep ' /t ' /proc/mounts",
        ],
    );
    assert!(out.starts_with("tmpfs /t tmpfs"), "{out}");
    let out = run_status(
        &env,
        &[
            "--rm",
            "--read-only",
            "--tmpfs",
            "/t",
            "busybox:local",
            "sh",
            "-c",
            "echo ok > /t/f && cat /t/f && touch /rootfile",
        ],
    );
    assert_refused_write(&out, "ok");
}

#[test]
fn volumes_from_shares_another_containers_volumes() {
    let env = busybox_env();
    run(
        &env,
        &[
            "--name",
            "src",
            "-v",
            "/shared",
            "busybox:local",
            "sh",
            "-c",
            "echo shared-data > /shared/f",
        ],
    );
    let out = run(
        &env,
        &[
            "--rm",
            "--volumes-from",
            "src",
            "busybox:local",
            "cat",
            "/shared/f",
        ],
    );
    assert_eq!(out.trim(), "shared-data");
    let mounts = &env.inspect("src")["Mounts"];
    assert_eq!(mounts[0]["Destination"], "/shared", "{mounts}");
    assert_eq!(mounts[0]["Type"], "volume", "{mounts}");
    // `--rm` of the borrower kept the volume; `rm -v` of its owner drops it.
    assert_eq!(volumes(&env).len(), 1);
    env.ok(&["rm", "-v", "src"]);
    assert!(volumes(&env).is_empty());
}

#[test]
fn anonymous_volumes_go_with_rm() {
    let env = busybox_env();
    run(
        &env,
        &[
            "--rm",
            "-v",
            "/anon",
            "busybox:local",
            "sh",
            "-c",
            "echo x > /anon/f",
        ],
    );
    assert!(volumes(&env).is_empty());
    // Without -v, `rm` keeps the anonymous volume, as Docker does.
    run(&env, &["--name", "keep", "-v", "/anon", "busybox:local", "true"]);
    assert_eq!(volumes(&env).len(), 1);
    env.ok(&["rm", "keep"]);
    assert_eq!(volumes(&env).len(), 1);
}

#[test]
fn bridge_gives_an_address_and_reaches_the_gateway() {
    let env = busybox_env();
    let out = run(
        &env,
        &[
            "--rm",
            "busybox:local",
            "sh",
            "-c",
            "ip -4 -o addr show eth0; ip route; cat /etc/hosts",
        ],
    );
    assert!(out.contains("inet 10.88."), "{out}");
    assert!(out.contains("default via 10.88.0.1"), "{out}");
    let out = run_status(
        &env,
        &["--rm", "busybox:local", "ping", "-c1", "-W3", "10.88.0.1"],
    );
    assert!(out.status.success(), "{}", frame(&out));
    // `none` keeps only the loopback.
    let out = run(
        &env,
        &[
            "--rm",
            "--network",
            "none",
            "busybox:local",
            "sh",
            "-c",
            "ls /sys/class/net",
        ],
    );
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), vec!["lo"]);
    let out = run_status(
        &env,
        &["--rm", "--network", "container:x", "busybox:local", "true"],
    );
    assert_eq!(out.status.code(), Some(125), "{}", frame(&out));
}

#[test]
fn published_port_answers_on_loopback_and_shows_in_port_ps_inspect() {
    let env = busybox_env();
    run(
        &env,
        &[
            "-d",
            "--name",
            "web",
            "-p",
            "127.0.0.1::8080",
            "busybox:local",
            "sh",
            "-c",
            HTTPD,
        ],
    );
    let addr = published(&env, "web", "8080");
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let full = stdout(&env.ok(&["port", "web"]));
    assert_eq!(full.trim(), format!("8080/tcp -> {addr}"));
    let body = http_get(&addr);
    assert!(body.contains("hello-from-kiln"), "{body}");
    let ps = stdout(&env.ok(&["ps"]));
    assert!(ps.contains(&format!("{addr}->8080/tcp")), "{ps}");
    let info = env.inspect("web");
    let ip = info["NetworkSettings"]["IPAddress"].as_str().unwrap().to_string();
    assert!(ip.starts_with("10.88."), "{info}");
    let host_port = addr.rsplit(':').next().unwrap();
    assert_eq!(
        info["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostPort"],
        host_port
    );
    // The container's own address answers too, and exec joins its network.
    let direct = http_get(&format!("{ip}:8080"));
    assert!(direct.contains("hello-from-kiln"), "{direct}");
    let seen = stdout(&env.ok(&["exec", "web", "ip", "-4", "-o", "addr", "show", "eth0"]));
    assert!(seen.contains(&format!("inet {ip}/")), "{seen}");
    env.ok(&["rm", "-f", "web"]);
    assert!(
        TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).is_err(),
        "the proxy still listens on {addr}"
    );
}

#[test]
fn publish_all_uses_the_images_exposed_ports() {
    let env = busybox_env();
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox:local\nEXPOSE 8080\n").unwrap();
    env.ok(&[
        "build",
        "--progress=plain",
        "-t",
        "exposed:1",
        ctx.to_str().unwrap(),
    ]);
    run(
        &env,
        &["-d", "--name", "pall", "-P", "exposed:1", "sh", "-c", HTTPD],
    );
    let addr = published(&env, "pall", "8080/tcp");
    assert!(addr.starts_with("0.0.0.0:"), "{addr}");
    let port = addr.rsplit(':').next().unwrap();
    let body = http_get(&format!("127.0.0.1:{port}"));
    assert!(body.contains("hello-from-kiln"), "{body}");
    env.ok(&["rm", "-f", "pall"]);
}

#[test]
fn link_adds_a_hosts_entry_for_a_running_container() {
    let env = busybox_env();
    run(&env, &["-d", "--name", "db", "busybox:local", "sleep", "60"]);
    let ip = env.inspect("db")["NetworkSettings"]["IPAddress"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ip.starts_with("10.88."), "{ip}");
    let hosts = run(
        &env,
        &[
            "--rm",
            "--link",
            "db:dbalias",
            "busybox:local",
            "cat",
            "/etc/hosts",
        ],
    );
    assert!(
        hosts
            .lines()
            .any(|l| l.starts_with(&ip) && l.contains("dbalias") && l.contains("db")),
        "{hosts}"
    );
    let ping = run_status(
        &env,
        &[
            "--rm",
            "--link",
            "db:dbalias",
            "busybox:local",
            "ping",
            "-c1",
            "-W3",
            "dbalias",
        ],
    );
    assert!(ping.status.success(), "{}", frame(&ping));
    env.ok(&["stop", "-t", "0", "db"]);
    let out = run_status(&env, &["--rm", "--link", "db:dbalias", "busybox:local", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", frame(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Cannot link to a non running container"),
        "{}",
        frame(&out)
    );
}

#[test]
fn run_pulls_an_unknown_image() {
    require_root();
    let reg = crate::registry::Registry::start(None);
    let a = Env::new();
    a.with_busybox();
    let image = format!("{}/kiln/runpull:v1", reg.addr);
    a.ok(&["tag", "busybox:local", &image]);
    a.ok(&["push", &image]);

    let b = Env::new();
    let never = b
        .kiln(&["run", "--rm", "--pull", "never", &image, "true"])
        .output()
        .unwrap();
    assert_eq!(never.status.code(), Some(125), "{}", frame(&never));
    let out = b
        .kiln(&["run", "--rm", &image, "echo", "pulled-and-ran"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", frame(&out));
    assert_eq!(stdout(&out).trim(), "pulled-and-ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("Unable to find image '{image}' locally")),
        "{err}"
    );
    assert!(err.contains("v1: Pulling from kiln/runpull"), "{err}");
    assert!(err.contains("Status: Downloaded newer image for"), "{err}");
    // Present now: no pull.
    let again = b.kiln(&["run", "--rm", &image, "true"]).output().unwrap();
    assert!(again.status.success(), "{}", frame(&again));
    assert!(
        !String::from_utf8_lossy(&again.stderr).contains("Unable to find image"),
        "{}",
        frame(&again)
    );

    let missing = format!("{}/kiln/nothere:v1", reg.addr);
    let out = b.kiln(&["run", "--rm", &missing, "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().filter(|l| l.contains("Error")).count(), 1, "{err}");
    assert!(containers(&b).is_empty());
}

#[test]
fn foreground_run_forwards_sigterm_to_the_container() {
    let env = busybox_env();
    let mut child = env
        .kiln(&[
            "run",
            "--name",
            "sig",
            "busybox:local",
            "sh",
            "-c",
            "trap 'exit 7' TERM; echo ready; sleep 30 & wait",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln run");
    // Wait for the trap to be set: the container printed `ready`.
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    out.read_exact(&mut buf).expect("container output");
    assert_eq!(&buf, b"ready\n");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < deadline, "kiln run did not end after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(7));
    let info = env.inspect("sig");
    assert_eq!(info["State"]["Status"], "exited", "{info}");
    assert_eq!(info["State"]["ExitCode"], 7, "{info}");
}
