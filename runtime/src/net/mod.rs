//! Bridge networking for containers (`--network bridge`, the default of `kiln run`): a network
//! namespace per container joined to the host by a veth pair on the bridge `kiln0`, an address
//! from the bridge's subnet, outbound traffic NATed, published ports served by a userspace proxy,
//! and the `/etc/hosts` and `/etc/resolv.conf` such a container gets.
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kiln_runtime::net::{self, NetConfig, NetRequest, PortSpec};
//! let request = NetRequest { config: NetConfig::default(), ip: None };
//! let endpoint = net::setup("3f2a…", &request)?;          // netns file, veth, IP, route
//! // run the container with Network::Join(endpoint.netns.clone()) ...
//! let proxy = net::publish(&[PortSpec::parse("8080:80")?], endpoint.ip)?;
//! println!("{}", net::format_ports(proxy.ports()));      // 0.0.0.0:8080->80/tcp
//! drop(proxy);
//! net::teardown(&endpoint)?;
//! # Ok(()) }
//! ```
//!
//! The bridge, forwarding and NAT rules are shared by all containers and stay after teardown.
//! Netlink requests go through `netlink-packet-route` on a blocking socket ([`netlink`]);
//! iptables is run as a command, as Docker does.

pub mod bridge;
pub mod ipam;
pub mod netlink;
pub mod netns;
pub mod ports;
pub mod proxy;
pub mod usermode;

use std::fmt;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use crate::spec::{EtcFiles, Network};

pub use bridge::BridgeError;
pub use ipam::IpamError;
pub use netlink::NetlinkError;
pub use netns::{run_in, NetnsError};
pub use ports::{format_ports, PortRange, PortSpec, PortSpecError, Protocol, PublishedPort};
pub use proxy::{publish, PortProxy, ProxyError};

/// The default bridge name.
pub const DEFAULT_BRIDGE: &str = "kiln0";
/// The default subnet: `10.88.0.0/16`, clear of Docker's `172.17.0.0/16`.
pub const DEFAULT_SUBNET: Subnet = Subnet {
    network: Ipv4Addr::new(10, 88, 0, 0),
    prefix_len: 16,
};
/// The name of the container's end of the veth pair.
pub const CONTAINER_IFNAME: &str = "eth0";

/// Setting up or tearing down a container's network failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid container id `{0}` for a network namespace name")]
    InvalidId(String),
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("failed to open network namespace `{path}`: {source}")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to connect container `{id}` to bridge `{bridge}`: {source}")]
    Veth {
        id: String,
        bridge: String,
        #[source]
        source: NetlinkError,
    },
    #[error("failed to configure `{CONTAINER_IFNAME}` in network namespace `{netns}`: {source}")]
    Configure {
        netns: PathBuf,
        #[source]
        source: NetlinkError,
    },
    #[error(transparent)]
    UserMode(#[from] usermode::UserNetError),
    #[error("failed to delete veth `{name}`: {source}")]
    DeleteVeth {
        name: String,
        #[source]
        source: NetlinkError,
    },
}

/// A subnet could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid IPv4 subnet `{0}` (expected ADDRESS/PREFIX with PREFIX 8-30 and no host bits set)")]
pub struct SubnetError(String);

/// An IPv4 subnet, `network/prefix_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    /// The network address (host bits zero).
    pub network: Ipv4Addr,
    /// The prefix length.
    pub prefix_len: u8,
}

impl Subnet {
    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix_len))
    }

    /// The gateway: the first host address, given to the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Whether `ip` is a host address of the subnet (neither the network nor the broadcast
    /// address).
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        let net = u32::from(self.network);
        ip & self.mask() == net && ip != net && ip != net | !self.mask()
    }

    /// The host addresses, lowest first (the gateway included).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let net = u32::from(self.network);
        let broadcast = net | !self.mask();
        (net + 1..broadcast).map(Ipv4Addr::from)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;
    fn from_str(s: &str) -> Result<Subnet, SubnetError> {
        let err = || SubnetError(s.to_string());
        let (ip, len) = s.split_once('/').ok_or_else(err)?;
        let network: Ipv4Addr = ip.parse().map_err(|_| err())?;
        let prefix_len: u8 = len.parse().map_err(|_| err())?;
        if !(8..=30).contains(&prefix_len) {
            return Err(err());
        }
        let subnet = Subnet { network, prefix_len };
        if u32::from(network) & !subnet.mask() != 0 {
            return Err(err());
        }
        Ok(subnet)
    }
}

impl serde::Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Subnet, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where the bridge network lives. One per host and bridge: every process using the same bridge
/// must use the same directories (they hold the address allocations and the lock).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The bridge interface name (at most 15 bytes).
    pub bridge: String,
    /// The bridge's subnet; the gateway (`.1`) is the bridge's address.
    pub subnet: Subnet,
    /// Lock file, address allocations and bridge marker (e.g. `/run/kiln/net`). A tmpfs such as
    /// `/run` fits: allocations die with the machine, like the namespaces they belong to.
    pub state_dir: PathBuf,
    /// Directory of the network namespace files, `<netns_dir>/<id>` (e.g. `/run/kiln/netns`).
    pub netns_dir: PathBuf,
}

impl Default for NetConfig {
    /// `kiln0`, `10.88.0.0/16`, `/run/kiln/net`, `/run/kiln/netns`.
    fn default() -> NetConfig {
        NetConfig {
            bridge: DEFAULT_BRIDGE.to_string(),
            subnet: DEFAULT_SUBNET,
            state_dir: PathBuf::from("/run/kiln/net"),
            netns_dir: PathBuf::from("/run/kiln/netns"),
        }
    }
}

/// What a container asks of the bridge network.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetRequest {
    /// The network to join.
    pub config: NetConfig,
    /// A fixed address (`--ip`); `None`: the lowest free one.
    pub ip: Option<Ipv4Addr>,
}

/// A container's place on the bridge, recorded by the caller and handed back to [`teardown`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    /// The container ID it was set up for.
    pub id: String,
    /// The network namespace file: run the container with `Network::Join(netns)`.
    pub netns: PathBuf,
    /// The container's address on the bridge.
    pub ip: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
    /// The gateway (the bridge's address).
    pub gateway: Ipv4Addr,
    /// MAC address of the container's `eth0`, `02:42:` followed by the address bytes (Docker's
    /// scheme).
    pub mac: String,
    /// The host end of the veth pair.
    pub host_veth: String,
    /// The network the endpoint belongs to.
    pub config: NetConfig,
}

impl Endpoint {
    /// The `Network` to give [`crate::ContainerSpec`].
    pub fn network(&self) -> Network {
        Network::Join(self.netns.clone())
    }
}

/// The host-side veth name for a container ID: `veth` and 11 hex digits of a stable hash of the
/// ID (interface names are at most 15 bytes).
pub fn host_veth_name(id: &str) -> String {
    // FNV-1a: stable across builds and processes, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("veth{:011x}", h & 0xfff_ffff_ffff)
}

fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Connects a new network namespace for container `id` to the bridge: ensures the bridge,
/// allocates an address, creates `<netns_dir>/<id>`, a veth pair with `eth0` inside carrying the
/// address, and a default route via the gateway. On failure everything made so far is undone.
pub fn setup(id: &str, request: &NetRequest) -> Result<Endpoint, NetError> {
    if !valid_id(id) {
        return Err(NetError::InvalidId(id.to_string()));
    }
    let config = &request.config;
    let netns_path = config.netns_dir.join(id);
    let host_veth = host_veth_name(id);
    let (ip, bridge_index) = {
        let lock = ipam::lock(&config.state_dir, &config.bridge)?;
        // Checked under the lock, before any address is touched: an endpoint that exists
        // belongs to someone else (or to an earlier setup of this id) and must be left alone.
        if netns_path.exists() {
            return Err(NetError::Netns(NetnsError::Exists(netns_path)));
        }
        let index = bridge::ensure_locked(&lock, config)?;
        let ip = ipam::allocate(
            &lock,
            &config.state_dir,
            &config.bridge,
            config.subnet,
            id,
            &netns_path,
            request.ip,
        )?;
        (ip, index)
    };
    let endpoint = Endpoint {
        host_veth,
        ..endpoint_for(id, netns_path.clone(), ip, config)
    };
    let result = connect(&endpoint, bridge_index, None);
    match result {
        Ok(()) => Ok(endpoint),
        Err(e) => {
            // Undo only what this call made. A namespace file that appeared since the check
            // above is a concurrent setup of the same id, which holds the same address.
            if !matches!(e, NetError::Netns(NetnsError::Exists(_))) {
                let _ = teardown(&endpoint);
            }
            Err(e)
        }
    }
}

/// An endpoint whose network namespace is held by a descriptor of this process instead of a
/// file: it vanishes with the process, so a killed build leaves no namespace, veth or mount
/// behind (only its address, reclaimed when the subnet runs out). For a build's RUN steps.
#[derive(Debug)]
pub struct HeldEndpoint {
    /// The endpoint; its `netns` is `/proc/<pid>/fd/<fd>` of this process.
    pub endpoint: Endpoint,
    /// The namespace: this endpoint's own, or in a user namespace the process's shared one.
    ns: HeldNs,
}

#[derive(Debug)]
enum HeldNs {
    /// On the bridge: the namespace's descriptor.
    Own { _ns: std::os::fd::OwnedFd },
    /// In a user namespace (rootless mode): the namespace every RUN step of this process
    /// shares, connected by one user-mode network helper ([`usermode`]).
    Shared(Arc<SharedUserNet>),
}

/// A network namespace connected by a user-mode helper, which stops when this is dropped or the
/// process ends (it watches a pipe of ours).
#[derive(Debug)]
struct SharedUserNet {
    net: usermode::UserNet,
    path: PathBuf,
    _ns: std::os::fd::OwnedFd,
}

impl HeldEndpoint {
    /// The `Network` to give [`crate::ContainerSpec`].
    pub fn network(&self) -> Network {
        self.endpoint.network()
    }

    /// The user-mode network tool connecting it, in rootless mode.
    pub fn usermode_tool(&self) -> Option<usermode::Tool> {
        match &self.ns {
            HeldNs::Shared(s) => Some(s.net.tool()),
            HeldNs::Own { .. } => None,
        }
    }
}

/// [`setup`] with the namespace held by a descriptor ([`HeldEndpoint`]). In a user namespace
/// (rootless mode) the namespace is connected by a user-mode network helper ([`usermode`])
/// instead of the bridge.
pub fn setup_held(id: &str, request: &NetRequest) -> Result<HeldEndpoint, NetError> {
    if !valid_id(id) {
        return Err(NetError::InvalidId(id.to_string()));
    }
    if crate::userns::in_user_namespace() {
        return setup_usermode(id);
    }
    let config = &request.config;
    let (ns, inner) = netns::create_held(netlink::Netlink::open)?;
    let netns_path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        std::os::fd::AsRawFd::as_raw_fd(&ns)
    ));
    let inner = inner.map_err(|source| NetError::Configure {
        netns: netns_path.clone(),
        source,
    })?;
    let (ip, bridge_index) = {
        let lock = ipam::lock(&config.state_dir, &config.bridge)?;
        let index = bridge::ensure_locked(&lock, config)?;
        let ip = ipam::allocate(
            &lock,
            &config.state_dir,
            &config.bridge,
            config.subnet,
            id,
            &netns_path,
            request.ip,
        )?;
        (ip, index)
    };
    let endpoint = endpoint_for(id, netns_path, ip, config);
    match connect(&endpoint, bridge_index, Some(inner)) {
        Ok(()) => Ok(HeldEndpoint {
            endpoint,
            ns: HeldNs::Own { _ns: ns },
        }),
        Err(e) => {
            let _ = teardown_held(HeldEndpoint {
                endpoint,
                ns: HeldNs::Own { _ns: ns },
            });
            Err(e)
        }
    }
}

/// The address slirp4netns gives the namespace, and its gateway.
const USERMODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);
const USERMODE_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// The user-mode network of this process's RUN steps: made by the first step that wants a
/// network and kept until the process ends (the helper then sees its exit pipe close), or made
/// again should the helper have died. All steps of a build share it, as BuildKit's rootless
/// worker runs its steps in the network namespace of rootlesskit: starting slirp4netns (its
/// sandbox, seccomp filter and configuration) for every step cost 16 ms of each networked RUN.
/// The steps get Docker's default capabilities, without `CAP_NET_ADMIN`, so none can change
/// the namespace's addresses, routes or firewall for the next.
fn setup_usermode(id: &str) -> Result<HeldEndpoint, NetError> {
    static SHARED: Mutex<Option<Arc<SharedUserNet>>> = Mutex::new(None);
    let shared = {
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref().filter(|s| s.net.is_running()) {
            Some(s) => s.clone(),
            None => {
                let (tool, exe) = usermode::find()?;
                let (ns, ()) = netns::create_held(|| ())?;
                let path = PathBuf::from(format!(
                    "/proc/{}/fd/{}",
                    std::process::id(),
                    std::os::fd::AsRawFd::as_raw_fd(&ns)
                ));
                let net = usermode::connect(&path, tool, &exe)?;
                let s = Arc::new(SharedUserNet { net, path, _ns: ns });
                *slot = Some(s.clone());
                s
            }
        }
    };
    tracing::debug!("RUN network `{id}`: {}", shared.net.tool().name());
    Ok(HeldEndpoint {
        endpoint: Endpoint {
            id: id.to_string(),
            netns: shared.path.clone(),
            ip: USERMODE_IP,
            prefix_len: 24,
            gateway: USERMODE_GATEWAY,
            mac: String::new(),
            host_veth: String::new(),
            config: NetConfig::default(),
        },
        ns: HeldNs::Shared(shared),
    })
}

/// Releases a [`HeldEndpoint`]'s address and closes its namespace (the kernel removes the veth
/// pair once no process is left in it).
pub fn teardown_held(held: HeldEndpoint) -> Result<(), NetError> {
    if matches!(held.ns, HeldNs::Shared(_)) {
        return Ok(()); // the last holder's drop stops the helper; no address was allocated
    }
    let config = &held.endpoint.config;
    let lock = ipam::lock(&config.state_dir, &config.bridge)?;
    ipam::release(
        &lock,
        &config.state_dir,
        &config.bridge,
        held.endpoint.ip,
        &held.endpoint.id,
    )?;
    Ok(())
}

fn endpoint_for(id: &str, netns: PathBuf, ip: Ipv4Addr, config: &NetConfig) -> Endpoint {
    Endpoint {
        id: id.to_string(),
        netns,
        ip,
        prefix_len: config.subnet.prefix_len,
        gateway: config.subnet.gateway(),
        mac: mac_for(ip)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        host_veth: host_veth_name(id),
        config: config.clone(),
    }
}

/// Connects the endpoint's namespace to the bridge. `inner` is a netlink socket opened inside
/// it; without one the namespace is created at the endpoint's file.
fn connect(ep: &Endpoint, bridge_index: u32, inner: Option<netlink::Netlink>) -> Result<(), NetError> {
    let cfg_err = |source| NetError::Configure {
        netns: ep.netns.clone(),
        source,
    };
    // The socket that configures the inside is opened by the thread that made the namespace.
    let mut inner = match inner {
        Some(nl) => nl,
        None => netns::create_with(&ep.netns, netlink::Netlink::open)?.map_err(cfg_err)?,
    };
    let ns_file = fs::File::open(&ep.netns).map_err(|source| NetError::OpenNetns {
        path: ep.netns.clone(),
        source,
    })?;
    let veth_err = |source| NetError::Veth {
        id: ep.id.clone(),
        bridge: ep.config.bridge.clone(),
        source,
    };
    let mut host = netlink::Netlink::open().map_err(veth_err)?;
    let mac = mac_for(ep.ip);
    let create = |host: &mut netlink::Netlink| {
        host.create_veth(&ep.host_veth, bridge_index, CONTAINER_IFNAME, mac, &ns_file)
    };
    match create(&mut host) {
        Ok(()) => {}
        // The veth of an earlier endpoint of this id whose namespace the kernel has not finished
        // destroying ([`teardown`] leaves that to the kernel): delete it and try again.
        Err(e) if e.errno() == Some(libc::EEXIST) => {
            host.delete_link(&ep.host_veth).map_err(veth_err)?;
            create(&mut host).map_err(veth_err)?;
        }
        Err(e) => return Err(veth_err(e)),
    }
    let index = host.link_index(&ep.host_veth).map_err(veth_err)?.ok_or_else(|| {
        veth_err(NetlinkError::Decode {
            what: format!("look up interface `{}`", ep.host_veth),
            detail: "the new veth is missing".into(),
        })
    })?;
    host.set_up(index, &ep.host_veth).map_err(veth_err)?;
    let eth = inner
        .link_index(CONTAINER_IFNAME)
        .map_err(cfg_err)?
        .ok_or_else(|| {
            cfg_err(NetlinkError::Decode {
                what: format!("look up interface `{CONTAINER_IFNAME}`"),
                detail: "the veth peer did not arrive in the namespace".into(),
            })
        })?;
    inner
        .add_address(eth, CONTAINER_IFNAME, ep.ip, ep.prefix_len)
        .map_err(cfg_err)?;
    inner.set_up(eth, CONTAINER_IFNAME).map_err(cfg_err)?;
    inner
        .add_default_route(eth, CONTAINER_IFNAME, ep.gateway)
        .map_err(cfg_err)?;
    Ok(())
}

/// Disconnects an endpoint: removes the namespace file and releases the address. Call it once
/// every process of the container has exited: the kernel then destroys the namespace, and with
/// it the veth pair, in the background (deleting the veth synchronously costs 15-40 ms of RCU
/// grace periods; [`delete_veth`] does it for callers that cannot wait). Idempotent; the bridge
/// and the NAT rules stay.
pub fn teardown(endpoint: &Endpoint) -> Result<(), NetError> {
    let config = &endpoint.config;
    netns::remove(&endpoint.netns)?;
    let lock = ipam::lock(&config.state_dir, &config.bridge)?;
    ipam::release(
        &lock,
        &config.state_dir,
        &config.bridge,
        endpoint.ip,
        &endpoint.id,
    )?;
    Ok(())
}

/// Deletes the host end of an endpoint's veth pair (and so the pair) now, instead of when the
/// kernel destroys the namespace: for a namespace some process may still hold. Idempotent.
pub fn delete_veth(endpoint: &Endpoint) -> Result<(), NetError> {
    let err = |source| NetError::DeleteVeth {
        name: endpoint.host_veth.clone(),
        source,
    };
    netlink::Netlink::open()
        .map_err(err)?
        .delete_link(&endpoint.host_veth)
        .map_err(err)?;
    Ok(())
}

/// Docker's `/etc/hosts` for a container: localhost and the IPv6 names, one line per `--link`
/// (`links`: container name, alias, address; the alias line also names the container), then the
/// container's own address and hostname (`own_ip` `None`: no network of its own, the hostname
/// goes on the loopback line instead).
pub fn hosts_file(hostname: &str, own_ip: Option<Ipv4Addr>, links: &[(String, String, Ipv4Addr)]) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost");
    if own_ip.is_none() {
        out.push(' ');
        out.push_str(hostname);
    }
    out.push_str(
        "\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\n\
         ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
    for (name, alias, ip) in links {
        if alias.is_empty() || alias == name {
            out.push_str(&format!("{ip}\t{name}\n"));
        } else {
            out.push_str(&format!("{ip}\t{alias} {name}\n"));
        }
    }
    if let Some(ip) = own_ip {
        out.push_str(&format!("{ip}\t{hostname}\n"));
    }
    out
}

/// `/etc/resolv.conf` for a container with its own network namespace: the host's, minus the
/// loopback nameservers it cannot reach (public ones when none is left).
pub fn resolv_conf(host_resolv_conf: &str) -> String {
    EtcFiles::for_build("", host_resolv_conf, &Network::None)
        .resolv_conf
        .unwrap_or_default()
}

/// The `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname` of a bridged container.
pub fn etc_files(
    hostname: &str,
    endpoint: &Endpoint,
    links: &[(String, String, Ipv4Addr)],
    host_resolv_conf: &str,
) -> EtcFiles {
    EtcFiles {
        hosts: Some(hosts_file(hostname, Some(endpoint.ip), links)),
        resolv_conf: Some(resolv_conf(host_resolv_conf)),
        hostname: Some(format!("{hostname}\n")),
    }
}

/// The netns file of container `id` under `config` (whether or not it exists).
pub fn netns_path(config: &NetConfig, id: &str) -> PathBuf {
    config.netns_dir.join(id)
}

/// Whether `path` holds a network namespace (a bind mount made by [`setup`]), rather than the
/// empty file left in a mount namespace that does not see the mount.
pub fn is_netns(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_parse_and_hosts() {
        let s: Subnet = "10.88.0.0/16".parse().unwrap();
        assert_eq!(s, DEFAULT_SUBNET);
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        assert!(s.is_host(Ipv4Addr::new(10, 88, 255, 254)));
        assert!(!s.is_host(Ipv4Addr::new(10, 88, 255, 255)));
        assert!(!s.is_host(Ipv4Addr::new(10, 88, 0, 0)));
        assert!(!s.is_host(Ipv4Addr::new(10, 89, 0, 2)));
        let small: Subnet = "192.168.7.0/30".parse().unwrap();
        assert_eq!(
            small.hosts().collect::<Vec<_>>(),
            vec![Ipv4Addr::new(192, 168, 7, 1), Ipv4Addr::new(192, 168, 7, 2)]
        );
        for bad in ["10.88.0.1/16", "10.88.0.0", "10.88.0.0/33", "x/16", "10.0.0.0/4"] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"10.88.0.0/16\"");
        assert_eq!(serde_json::from_str::<Subnet>(&json).unwrap(), s);
    }

    #[test]
    fn veth_names_fit_and_differ() {
        let a = host_veth_name("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
        let b = host_veth_name("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdee");
        assert_eq!(a.len(), 15);
        assert_ne!(a, b);
        assert_eq!(
            a,
            host_veth_name("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        );
    }

    #[test]
    fn hosts_file_like_docker() {
        let links = vec![
            ("web".to_string(), "db".to_string(), Ipv4Addr::new(10, 88, 0, 3)),
            (
                "cache".to_string(),
                "cache".to_string(),
                Ipv4Addr::new(10, 88, 0, 4),
            ),
        ];
        let h = hosts_file("abc123", Some(Ipv4Addr::new(10, 88, 0, 2)), &links);
        assert!(h.starts_with("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"));
        assert!(h.contains("\n10.88.0.3\tdb web\n10.88.0.4\tcache\n10.88.0.2\tabc123\n"));
        assert!(h.ends_with("10.88.0.2\tabc123\n"));
        let none = hosts_file("box", None, &[]);
        assert!(none.starts_with("127.0.0.1\tlocalhost box\n"));
    }

    #[test]
    fn resolv_conf_drops_loopback() {
        assert_eq!(
            resolv_conf("nameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch x\n"),
            "nameserver 10.0.0.2\nsearch x\n"
        );
    }

    #[test]
    fn mac_from_ip() {
        assert_eq!(mac_for(Ipv4Addr::new(10, 88, 0, 2)), [2, 0x42, 10, 88, 0, 2]);
    }

    #[test]
    fn ids_checked() {
        assert!(valid_id("abc_1-2.x"));
        for bad in ["", ".", "..", "a/b", "a b"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
