//! The userspace port proxy (Docker's docker-proxy pattern), as threads of whoever holds the
//! [`PortProxy`]: for TCP, accept on the host address, connect to the container address and copy
//! both ways; for UDP, one upstream socket per client address, forgotten after an idle minute
//! and a half. Dropping the proxy closes the listeners and every proxied connection.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::ports::{PortSpec, Protocol, PublishedPort};

/// How long a UDP flow lives without traffic (Docker's docker-proxy uses 90 s).
const UDP_IDLE: Duration = Duration::from_secs(90);
/// How long connecting to the container may take before the client is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishing a port failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("failed to publish `{spec}`: cannot listen on {addr}: {source}")]
    Bind {
        spec: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("failed to publish `{spec}`: no free host port in {range}")]
    NoFreePort { spec: String, range: String },
    #[error("failed to publish `{spec}`: cannot read the bound address: {source}")]
    LocalAddr {
        spec: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to create the proxy's stop pipe: {0}")]
    Pipe(#[source] nix::errno::Errno),
    #[error("failed to start a proxy thread for {port}: {source}")]
    Thread {
        port: PublishedPort,
        #[source]
        source: io::Error,
    },
}

/// A bound host socket, before its thread starts.
enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// Running port forwarders. Dropping it stops them.
#[derive(Debug)]
pub struct PortProxy {
    ports: Vec<PublishedPort>,
    /// Closing the write end wakes every thread polling the read end.
    stop_write: Option<OwnedFd>,
    threads: Vec<JoinHandle<()>>,
    conns: Arc<Conns>,
}

/// Live TCP connections (client side and container side), shut down when the proxy stops.
#[derive(Debug, Default)]
struct Conns {
    next: AtomicU64,
    live: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
}

impl PortProxy {
    /// The ports listened on, in the order of the specs.
    pub fn ports(&self) -> &[PublishedPort] {
        &self.ports
    }
}

impl Drop for PortProxy {
    fn drop(&mut self) {
        self.stop_write.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Ok(mut live) = self.conns.live.lock() {
            for (_, (a, b)) in live.drain() {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
        }
    }
}

fn bind(spec: &PortSpec, shown: &str, port: u16) -> Result<(Bound, u16), ProxyError> {
    let addr = SocketAddr::new(spec.bind_ip(), port);
    let bind_err = |source| ProxyError::Bind {
        spec: shown.to_string(),
        addr,
        source,
    };
    let (bound, local) = match spec.protocol {
        Protocol::Tcp => {
            let l = TcpListener::bind(addr).map_err(bind_err)?;
            let local = l.local_addr();
            (Bound::Tcp(l), local)
        }
        Protocol::Udp => {
            let s = UdpSocket::bind(addr).map_err(bind_err)?;
            let local = s.local_addr();
            (Bound::Udp(s), local)
        }
    };
    let local = local.map_err(|source| ProxyError::LocalAddr {
        spec: shown.to_string(),
        source,
    })?;
    Ok((bound, local.port()))
}

/// Listens on the host for every spec and forwards to `container_ip`. Everything is bound before
/// any thread starts: on error nothing stays open. A host range with one container port takes
/// the first free port of the range; no host port means a random free one.
pub fn publish(specs: &[PortSpec], container_ip: Ipv4Addr) -> Result<PortProxy, ProxyError> {
    let mut bound: Vec<(Bound, PublishedPort)> = Vec::new();
    for spec in specs {
        let shown = spec.to_string();
        let container_ports: Vec<u16> = spec.container_ports.ports().collect();
        match spec.host_ports {
            Some(h) if h.len() == container_ports.len() => {
                for (host, ctr) in h.ports().zip(container_ports.iter().copied()) {
                    let (b, port) = bind(spec, &shown, host)?;
                    bound.push((b, published(spec, port, ctr)));
                }
            }
            Some(h) => {
                // A host range for one container port: the first port of the range that binds.
                let ctr = spec.container_ports.start;
                let mut found = None;
                for host in h.ports() {
                    match bind(spec, &shown, host) {
                        Ok(b) => {
                            found = Some(b);
                            break;
                        }
                        Err(ProxyError::Bind { source, .. }) if source.kind() == io::ErrorKind::AddrInUse => {
                        }
                        Err(e) => return Err(e),
                    }
                }
                let (b, port) = found.ok_or_else(|| ProxyError::NoFreePort {
                    spec: shown.clone(),
                    range: h.to_string(),
                })?;
                bound.push((b, published(spec, port, ctr)));
            }
            None => {
                for ctr in container_ports {
                    let (b, port) = bind(spec, &shown, 0)?;
                    bound.push((b, published(spec, port, ctr)));
                }
            }
        }
    }
    let (stop_read, stop_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(ProxyError::Pipe)?;
    let stop_read = Arc::new(stop_read);
    let mut proxy = PortProxy {
        ports: bound.iter().map(|(_, p)| *p).collect(),
        stop_write: Some(stop_write),
        threads: Vec::new(),
        conns: Arc::new(Conns::default()),
    };
    for (b, port) in bound {
        let target = SocketAddr::new(IpAddr::V4(container_ip), port.container_port);
        let stop = Arc::clone(&stop_read);
        let conns = Arc::clone(&proxy.conns);
        let thread = std::thread::Builder::new().name(format!("kiln-proxy-{}", port.host_port));
        let spawned = match b {
            Bound::Tcp(l) => thread.spawn(move || tcp_accept_loop(l, target, stop, conns)),
            Bound::Udp(s) => thread.spawn(move || udp_loop(s, target, stop)),
        };
        // On error the proxy built so far is dropped, which stops the threads already started.
        proxy
            .threads
            .push(spawned.map_err(|source| ProxyError::Thread { port, source })?);
    }
    Ok(proxy)
}

fn published(spec: &PortSpec, host_port: u16, container_port: u16) -> PublishedPort {
    PublishedPort {
        host_ip: spec.bind_ip(),
        host_port,
        container_port,
        protocol: spec.protocol,
    }
}

/// Why [`wait`] returned.
enum Wake {
    /// The socket is readable.
    Ready,
    /// The proxy is stopping.
    Stop,
    /// The timeout passed.
    Timeout,
}

/// Waits until `fd` is readable, the stop pipe closes, or the timeout passes.
fn wait(fd: &impl AsFd, stop: &OwnedFd, timeout: Option<Duration>) -> Wake {
    let timeout = match timeout {
        None => PollTimeout::NONE,
        Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
    };
    loop {
        let mut fds = [
            PollFd::new(fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(0) => return Wake::Timeout,
            Ok(_) => {
                if fds[1].any().unwrap_or(true) {
                    return Wake::Stop;
                }
                return Wake::Ready;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return Wake::Stop,
        }
    }
}

fn tcp_accept_loop(listener: TcpListener, target: SocketAddr, stop: Arc<OwnedFd>, conns: Arc<Conns>) {
    loop {
        match wait(&listener, &stop, None) {
            Wake::Ready => {}
            Wake::Stop | Wake::Timeout => return,
        }
        let Ok((client, _)) = listener.accept() else {
            continue;
        };
        let conns = Arc::clone(&conns);
        let _ = std::thread::Builder::new()
            .name("kiln-proxy-conn".into())
            .spawn(move || tcp_connection(client, target, conns));
    }
}

/// Proxies one TCP connection: this thread copies client → container, a second one the
/// other way; each direction's end of file becomes a half-close of the other side.
fn tcp_connection(client: TcpStream, target: SocketAddr, conns: Arc<Conns>) {
    let Ok(upstream) = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) else {
        // Nothing listens in the container: the client sees its connection closed, as with
        // docker-proxy.
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(c2), Ok(u2), Ok(c3), Ok(u3)) = (
        client.try_clone(),
        upstream.try_clone(),
        client.try_clone(),
        upstream.try_clone(),
    ) else {
        return;
    };
    let key = conns.next.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut live) = conns.live.lock() {
        live.insert(key, (c3, u3));
    }
    let back = std::thread::Builder::new()
        .name("kiln-proxy-conn".into())
        .spawn(move || copy_half(u2, c2));
    copy_half(client, upstream);
    if let Ok(back) = back {
        let _ = back.join();
    }
    if let Ok(mut live) = conns.live.lock() {
        live.remove(&key);
    }
}

fn copy_half(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

fn udp_loop(socket: UdpSocket, target: SocketAddr, stop: Arc<OwnedFd>) {
    let socket = Arc::new(socket);
    let flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65536];
    loop {
        match wait(&*socket, &stop, None) {
            Wake::Ready => {}
            Wake::Stop | Wake::Timeout => return,
        }
        let Ok((n, client)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let existing = flows.lock().ok().and_then(|f| f.get(&client).cloned());
        let upstream = match existing {
            Some(u) => u,
            None => {
                let Some(u) = new_flow(target) else {
                    continue;
                };
                let u = Arc::new(u);
                if let Ok(mut f) = flows.lock() {
                    f.insert(client, Arc::clone(&u));
                }
                let (reply_sock, reply_up, flows2, stop2) = (
                    Arc::clone(&socket),
                    Arc::clone(&u),
                    Arc::clone(&flows),
                    Arc::clone(&stop),
                );
                let spawned = std::thread::Builder::new()
                    .name("kiln-proxy-udp".into())
                    .spawn(move || udp_replies(reply_up, reply_sock, client, flows2, stop2));
                if spawned.is_err() {
                    if let Ok(mut f) = flows.lock() {
                        f.remove(&client);
                    }
                    continue;
                }
                u
            }
        };
        let _ = upstream.send(&buf[..n]);
    }
}

fn new_flow(target: SocketAddr) -> Option<UdpSocket> {
    let u = UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).ok()?;
    u.connect(target).ok()?;
    Some(u)
}

/// Sends the container's answers on one flow back to its client until the flow is idle.
fn udp_replies(
    upstream: Arc<UdpSocket>,
    host: Arc<UdpSocket>,
    client: SocketAddr,
    flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>,
    stop: Arc<OwnedFd>,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        match wait(&*upstream, &stop, Some(UDP_IDLE)) {
            Wake::Ready => {}
            Wake::Stop => return,
            Wake::Timeout => break,
        }
        // An ICMP port unreachable from the container shows up here as ECONNREFUSED: the flow
        // stays, the next datagram tries again.
        if let Ok(n) = upstream.recv(&mut buf) {
            let _ = host.send_to(&buf[..n], client);
        }
    }
    if let Ok(mut f) = flows.lock() {
        f.remove(&client);
    }
}
