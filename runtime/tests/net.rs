//! Bridge networking with real namespaces, veth pairs, a bridge and iptables rules.
//!
//! These tests need root and `iptables` (and `nsenter` plus busybox for the ping test). Run them
//! as root: `CARGO_TARGET_DIR=target-net cargo test -p kiln-runtime --test net`. Without root
//! every test fails with a message saying so.
//!
//! Each test makes its own bridge (`knt<N>x<PID>`) on its own subnet (`10.201.N.0/24`) with its
//! state and namespace files in a temp dir, and a guard removes every endpoint, the bridge and its
//! iptables rules even when the test fails. Traffic goes only to loopback and to the namespaces
//! the test made.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns panic on setup failure by design

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use kiln_runtime::net::{self, bridge, Endpoint, NetConfig, NetRequest, PortSpec, Protocol, ProxyError};
use kiln_runtime::{start, ContainerSpec, Rootfs, Security};

const TIMEOUT: Duration = Duration::from_secs(5);

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the network tests need root (network namespaces, veth pairs, a bridge, iptables); run them as root"
    );
}

/// A private bridge network for one test, torn down on drop.
struct TestNet {
    config: NetConfig,
    endpoints: Mutex<Vec<Endpoint>>,
    _tmp: tempfile::TempDir,
}

impl TestNet {
    fn new(n: u8) -> TestNet {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let config = NetConfig {
            bridge: format!("knt{n}x{}", std::process::id() % 100_000),
            subnet: format!("10.201.{n}.0/24").parse().unwrap(),
            state_dir: tmp.path().join("state"),
            netns_dir: tmp.path().join("netns"),
        };
        TestNet {
            config,
            endpoints: Mutex::new(Vec::new()),
            _tmp: tmp,
        }
    }

    fn setup(&self, id: &str) -> Endpoint {
        self.try_setup(id, None)
            .unwrap_or_else(|e| panic!("setup of `{id}` failed: {e} ({e:?})"))
    }

    /// Sets up an endpoint; a success is recorded for cleanup before anything is asserted.
    fn try_setup(&self, id: &str, ip: Option<Ipv4Addr>) -> Result<Endpoint, net::NetError> {
        let ep = net::setup(
            id,
            &NetRequest {
                config: self.config.clone(),
                ip,
            },
        )?;
        self.endpoints.lock().unwrap().push(ep.clone());
        Ok(ep)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for ep in self.endpoints.lock().map(|v| v.clone()).unwrap_or_default() {
            if let Err(e) = net::teardown(&ep) {
                eprintln!("cleanup: teardown of {} failed: {e}", ep.id);
            }
        }
        if let Err(e) = bridge::remove(&self.config) {
            eprintln!("cleanup: removing bridge {} failed: {e}", self.config.bridge);
        }
    }
}

/// Polls `cond` for up to five seconds.
fn wait_for(cond: impl Fn() -> bool) -> bool {
    for _ in 0..100 {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// A TCP echo server listening inside `netns` on `port`, serving one connection at a time.
fn tcp_echo_in(netns: &Path, port: u16) {
    let listener = net::run_in(netns, move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
}

/// A UDP echo server inside `netns` on `port`, answering with `reply:` prefixed.
fn udp_echo_in(netns: &Path, port: u16) {
    let sock = net::run_in(netns, move || UdpSocket::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut out = b"reply:".to_vec();
            out.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&out, from);
        }
    });
}

fn tcp_roundtrip(stream: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got).unwrap();
    got
}

fn udp_roundtrip(sock: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Vec<u8> {
    // Answers this socket was already given: a retry below can bring a late second copy of one,
    // which belongs to the earlier exchange, not to this one.
    static ANSWERED: Mutex<Vec<(SocketAddr, Vec<u8>)>> = Mutex::new(Vec::new());
    let local = sock.local_addr().unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 2048];
    // UDP may drop the first datagram while neighbours resolve: retry a few times.
    for _ in 0..10 {
        sock.send_to(msg, to).unwrap();
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            let got = buf[..n].to_vec();
            let mut answered = ANSWERED.lock().unwrap();
            if answered.iter().any(|(s, a)| *s == local && *a == got) {
                continue;
            }
            answered.push((local, got.clone()));
            return got;
        }
    }
    panic!("no UDP answer from {to}");
}

#[test]
fn endpoints_get_addresses_routes_and_reach_each_other() {
    let tn = TestNet::new(1);
    let a = tn.setup("alpha");
    let b = tn.setup("beta");
    assert_eq!(a.ip, Ipv4Addr::new(10, 201, 1, 2));
    assert_eq!(b.ip, Ipv4Addr::new(10, 201, 1, 3));
    assert_eq!(a.gateway, Ipv4Addr::new(10, 201, 1, 1));
    assert_eq!(a.mac, "02:42:0a:c9:01:02");
    assert!(link_exists(&tn.config.bridge), "bridge missing");
    assert!(link_exists(&a.host_veth) && link_exists(&b.host_veth));
    assert!(
        net::is_netns(&a.netns),
        "{} is not a network namespace",
        a.netns.display()
    );
    let master = std::fs::read_link(format!("/sys/class/net/{}/master", a.host_veth)).unwrap();
    assert!(master.ends_with(&tn.config.bridge), "{master:?}");

    // Inside: eth0 with the address, lo up, a default route via the gateway.
    // (/sys shows the namespace of whoever mounted it, so only /proc/thread-self/net is read.)
    let (addr, route, lo) = net::run_in(&a.netns, || {
        let out = std::fs::read_to_string("/proc/thread-self/net/fib_trie").unwrap();
        let route = std::fs::read_to_string("/proc/thread-self/net/route").unwrap();
        // lo answers only if it is up.
        let lo = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| TcpStream::connect(l.local_addr()?))
            .is_ok();
        (out, route, lo)
    })
    .unwrap();
    assert!(addr.contains("10.201.1.2"), "{addr}");
    assert!(lo, "loopback is down in the namespace");
    let default = route
        .lines()
        .find(|l| l.starts_with("eth0\t00000000\t"))
        .unwrap_or_else(|| panic!("no default route on eth0:\n{route}"));
    // The gateway column is little-endian hex: 10.201.1.1 -> 0101C90A.
    assert!(default.contains("\t0101C90A\t"), "{default}");

    // TCP between namespaces, and from the host to a container.
    tcp_echo_in(&b.netns, 7000);
    let bip = b.ip;
    let mut s = net::run_in(&a.netns, move || {
        TcpStream::connect_timeout(&SocketAddr::from((bip, 7000)), TIMEOUT)
    })
    .unwrap()
    .unwrap();
    assert_eq!(tcp_roundtrip(&mut s, b"hello from alpha"), b"hello from alpha");
    let mut from_host = TcpStream::connect_timeout(&SocketAddr::from((bip, 7000)), TIMEOUT).unwrap();
    assert_eq!(
        tcp_roundtrip(&mut from_host, b"hello from host"),
        b"hello from host"
    );

    // UDP between namespaces.
    udp_echo_in(&b.netns, 7001);
    let sock = net::run_in(&a.netns, || UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    assert_eq!(
        udp_roundtrip(&sock, SocketAddr::from((bip, 7001)), b"ping"),
        b"reply:ping"
    );
}

#[test]
fn ping_between_namespaces() {
    let tn = TestNet::new(2);
    let a = tn.setup("pa");
    let b = tn.setup("pb");
    for tool in ["/usr/bin/nsenter", "/bin/busybox"] {
        assert!(
            Path::new(tool).exists(),
            "this test needs {tool} (util-linux, busybox-static)"
        );
    }
    for (from, to) in [(&a, b.ip), (&b, a.ip), (&a, a.gateway)] {
        let out = Command::new("/usr/bin/nsenter")
            .arg(format!("--net={}", from.netns.display()))
            .args(["/bin/busybox", "ping", "-c", "1", "-W", "3"])
            .arg(to.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ping {to} from {} failed:\n{}{}",
            from.id,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn published_tcp_port_reaches_server_in_namespace() {
    let tn = TestNet::new(3);
    let ep = tn.setup("web");
    tcp_echo_in(&ep.netns, 8080);
    let specs = [
        PortSpec::parse("8080").unwrap(),
        PortSpec::parse("127.0.0.1::8080").unwrap(),
    ];
    let proxy = net::publish(&specs, ep.ip).unwrap();
    let ports = proxy.ports().to_vec();
    assert_eq!(ports.len(), 2);
    assert_eq!(ports[0].host_ip.to_string(), "0.0.0.0");
    assert_eq!(ports[1].host_ip.to_string(), "127.0.0.1");
    assert!(ports
        .iter()
        .all(|p| p.container_port == 8080 && p.protocol == Protocol::Tcp && p.host_port != 0));
    assert_eq!(
        net::format_ports(&ports),
        format!(
            "0.0.0.0:{}->8080/tcp, 127.0.0.1:{}->8080/tcp",
            ports[0].host_port, ports[1].host_port
        )
    );
    for p in &ports {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], p.host_port)), TIMEOUT).unwrap();
        assert_eq!(tcp_roundtrip(&mut s, b"through the proxy"), b"through the proxy");
        // Several round trips on one connection, and a large payload.
        let big = vec![b'x'; 300_000];
        let mut writer = s.try_clone().unwrap();
        let data = big.clone();
        let w = std::thread::spawn(move || writer.write_all(&data).unwrap());
        let mut got = vec![0u8; big.len()];
        s.read_exact(&mut got).unwrap();
        w.join().unwrap();
        assert!(got == big);
    }
    // A connection held open while the proxy stops is closed.
    let mut held = TcpStream::connect(("127.0.0.1", ports[1].host_port)).unwrap();
    assert_eq!(tcp_roundtrip(&mut held, b"x"), b"x");
    drop(proxy);
    let mut buf = [0u8; 1];
    held.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert!(
        matches!(held.read(&mut buf), Ok(0) | Err(_)),
        "connection still open after the proxy stopped"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", ports[1].host_port)).is_err(),
        "the port is still listened on after the proxy was dropped"
    );
}

#[test]
fn published_udp_port_reaches_server_in_namespace() {
    let tn = TestNet::new(4);
    let ep = tn.setup("dns");
    udp_echo_in(&ep.netns, 5353);
    let proxy = net::publish(&[PortSpec::parse("127.0.0.1::5353/udp").unwrap()], ep.ip).unwrap();
    let port = proxy.ports()[0];
    assert_eq!(
        port.to_string(),
        format!("127.0.0.1:{}->5353/udp", port.host_port)
    );
    let to = SocketAddr::from(([127, 0, 0, 1], port.host_port));
    // Two clients get their own answers.
    let c1 = UdpSocket::bind("127.0.0.1:0").unwrap();
    let c2 = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(udp_roundtrip(&c1, to, b"one"), b"reply:one");
    assert_eq!(udp_roundtrip(&c2, to, b"two"), b"reply:two");
    assert_eq!(udp_roundtrip(&c1, to, b"three"), b"reply:three");
}

#[test]
fn publish_fails_cleanly_on_a_taken_port() {
    let tn = TestNet::new(5);
    let ep = tn.setup("busy");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let free_port = free.local_addr().unwrap().port();
    drop(free);
    let specs = [
        PortSpec::parse(&format!("127.0.0.1:{free_port}:80")).unwrap(),
        PortSpec::parse(&format!("127.0.0.1:{taken_port}:81")).unwrap(),
    ];
    let err = net::publish(&specs, ep.ip).unwrap_err();
    assert!(matches!(err, ProxyError::Bind { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{taken_port}:81")),
        "{err}"
    );
    // Nothing half-published: the first port was released again.
    TcpListener::bind(("127.0.0.1", free_port)).expect("the first port stayed bound after the failure");
    // A host range takes the first free port of the range.
    let spec = PortSpec::parse(&format!(
        "127.0.0.1:{taken_port}-{}:80",
        taken_port.saturating_add(20)
    ))
    .unwrap();
    let proxy = net::publish(&[spec], ep.ip).unwrap();
    assert!(proxy.ports()[0].host_port > taken_port);
    for bad in ["80:80:80:80", "http", "8080:80/sctp"] {
        let err = PortSpec::parse(bad).unwrap_err();
        assert!(err.to_string().contains(bad), "{err}");
    }
}

#[test]
fn teardown_releases_the_address_for_reuse_and_is_idempotent() {
    let tn = TestNet::new(6);
    let a = tn.setup("one");
    let b = tn.setup("two");
    assert_eq!((a.ip.octets()[3], b.ip.octets()[3]), (2, 3));
    net::teardown(&a).unwrap();
    assert!(!a.netns.exists(), "netns file left behind");
    // The kernel destroys the namespace, and the veth with it, in the background.
    assert!(
        wait_for(|| !link_exists(&a.host_veth)),
        "veth {} left behind",
        a.host_veth
    );
    net::teardown(&a).unwrap();
    let c = tn.setup("three");
    assert_eq!(c.ip, a.ip, "the released address was not reused");
    // An id set up again right after its teardown (its old veth perhaps not yet destroyed).
    net::teardown(&c).unwrap();
    let c = tn.setup("three");
    assert_eq!(c.ip, a.ip);
    net::delete_veth(&c).unwrap();
    assert!(
        !link_exists(&c.host_veth),
        "delete_veth left {} behind",
        c.host_veth
    );
    net::delete_veth(&c).unwrap();
    // Setting up an id whose namespace exists fails and leaves that endpoint intact.
    let err = tn.try_setup("two", None).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert!(net::is_netns(&b.netns) && link_exists(&b.host_veth));
    // A fixed address in use is refused (the failed "two" above did not release it); a free one
    // is granted.
    let err = tn.try_setup("four", Some(b.ip)).unwrap_err();
    assert!(err.to_string().contains("already in use"), "{err}");
    assert!(!net::netns_path(&tn.config, "four").exists());
    let want = Ipv4Addr::new(10, 201, 6, 77);
    let d = tn.try_setup("four", Some(want)).unwrap();
    assert_eq!(d.ip, want);
}

#[test]
fn bridge_setup_is_idempotent_under_concurrent_callers() {
    let tn = TestNet::new(7);
    let config = tn.config.clone();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let c = config.clone();
            std::thread::spawn(move || bridge::ensure(&c))
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    // Once more when everything is in place: nothing is added twice.
    bridge::ensure(&config).unwrap();
    assert!(link_exists(&config.bridge));
    let addrs = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", &config.bridge])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert_eq!(addrs.matches("10.201.7.1/24").count(), 1, "{addrs}");
    let nat = Command::new("iptables")
        .args(["-t", "nat", "-S", "POSTROUTING"])
        .output()
        .unwrap();
    let nat = String::from_utf8_lossy(&nat.stdout);
    assert_eq!(
        nat.lines()
            .filter(|l| l.contains("10.201.7.0/24") && l.contains(&config.bridge) && l.contains("MASQUERADE"))
            .count(),
        1,
        "{nat}"
    );
    let fwd = Command::new("iptables").args(["-S", "FORWARD"]).output().unwrap();
    let fwd = String::from_utf8_lossy(&fwd.stdout);
    assert_eq!(
        fwd.matches(&format!("-i {} -j ACCEPT", config.bridge)).count(),
        1,
        "{fwd}"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim(),
        "1"
    );
    // Removing the bridge removes the rules; ensure brings everything back.
    bridge::remove(&config).unwrap();
    assert!(!link_exists(&config.bridge));
    let nat = Command::new("iptables")
        .args(["-t", "nat", "-S", "POSTROUTING"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&nat.stdout).contains("10.201.7.0/24"));
    bridge::ensure(&config).unwrap();
    assert!(link_exists(&config.bridge));
}

/// A busybox root filesystem (the host's static `/bin/busybox` and its applet links).
fn busybox_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .expect("copy /bin/busybox (install busybox-static)");
    for applet in ["sh", "cat", "nc", "ip", "hostname"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
}

#[test]
fn container_joined_to_the_bridge_serves_a_published_port() {
    let tn = TestNet::new(8);
    let ep = tn.setup("ctr");
    let tmp = tempfile::tempdir().unwrap();
    let (lower, upper, work, scratch) = (
        tmp.path().join("lower"),
        tmp.path().join("upper"),
        tmp.path().join("work"),
        tmp.path().join("scratch"),
    );
    busybox_rootfs(&lower);
    for d in [&upper, &work, &scratch] {
        std::fs::create_dir_all(d).unwrap();
    }
    let out_path = tmp.path().join("stdout");
    let stdout: std::os::fd::OwnedFd = std::fs::File::create(&out_path).unwrap().into();
    let stderr: std::os::fd::OwnedFd = std::fs::File::create(tmp.path().join("stderr")).unwrap().into();
    let links = vec![(
        "dbserver".to_string(),
        "db".to_string(),
        Ipv4Addr::new(10, 201, 8, 99),
    )];
    let spec = ContainerSpec {
        rootfs: Rootfs::Overlay {
            lower: vec![lower],
            upper,
            work,
        },
        readonly_rootfs: false,
        args: [
            "sh",
            "-c",
            "cat /etc/hosts /etc/resolv.conf; ip -4 addr show eth0; nc -l -p 9000 -e /bin/cat",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        env: vec!["PATH=/bin".to_string()],
        cwd: "/".to_string(),
        user: String::new(),
        hostname: "ctrhost".to_string(),
        mounts: vec![],
        network: ep.network(),
        security: Security::Default,
        etc_files: net::etc_files(
            "ctrhost",
            &ep,
            &links,
            "nameserver 127.0.0.53\nnameserver 10.9.9.9\n",
        ),
        stdin: None,
        stdout,
        stderr,
        options: Default::default(),
    };
    let running = start(spec, &scratch).unwrap();
    let proxy = net::publish(&[PortSpec::parse("127.0.0.1::9000").unwrap()], ep.ip).unwrap();
    let port = proxy.ports()[0].host_port;
    // nc needs a moment to listen; the proxy closes connections it cannot forward.
    let mut answer = None;
    for _ in 0..50 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            if s.write_all(b"via the bridge\n").is_ok() {
                let mut got = vec![0u8; 15];
                if s.read_exact(&mut got).is_ok() {
                    answer = Some(got);
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if answer.is_none() {
        let _ = running.kill(9);
    }
    let status = running.wait().unwrap();
    let out = std::fs::read_to_string(&out_path).unwrap();
    assert_eq!(
        answer.as_deref(),
        Some(&b"via the bridge\n"[..]),
        "no echo through the published port:\n{out}"
    );
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("10.201.8.99\tdb dbserver\n"), "{out}");
    assert!(out.contains(&format!("{}\tctrhost\n", ep.ip)), "{out}");
    assert!(
        out.contains("nameserver 10.9.9.9") && !out.contains("127.0.0.53"),
        "{out}"
    );
    assert!(out.contains(&format!("inet {}/24", ep.ip)), "{out}");
}
