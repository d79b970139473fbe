//! A small synchronous rtnetlink client: the handful of link, address and route requests the
//! bridge network needs, built with `netlink-packet-route` and sent over a blocking
//! `netlink-sys` socket (no async runtime: the runtime crate is synchronous).
//!
//! A netlink socket talks to the network namespace it was created in, so [`Netlink::open_in`]
//! creates its socket on a short-lived thread that first joins the target namespace.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use netlink_packet_core::{
    NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::netns;

/// A netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("failed to open a netlink route socket: {0}")]
    Socket(#[source] io::Error),
    #[error("failed to open a netlink socket in network namespace `{path}`: {source}")]
    InNetns {
        path: PathBuf,
        #[source]
        source: Box<netns::NetnsError>,
    },
    #[error("failed to send the netlink request to {what}: {source}")]
    Send {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to receive the netlink answer to {what}: {source}")]
    Receive {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to decode the netlink answer to {what}: {detail}")]
    Decode { what: String, detail: String },
    #[error("failed to {what}: {source}")]
    Kernel {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl NetlinkError {
    /// The errno the kernel answered with, if the request reached it and was refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A route netlink socket bound to one network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink")
            .field("fd", &self.socket.as_raw_fd())
            .finish()
    }
}

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<Netlink, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// A socket in the network namespace of the file `netns`.
    pub fn open_in(netns_path: &Path) -> Result<Netlink, NetlinkError> {
        netns::run_in(netns_path, Netlink::open).map_err(|e| NetlinkError::InNetns {
            path: netns_path.to_path_buf(),
            source: Box::new(e),
        })?
    }

    /// Sends one request with `NLM_F_ACK` and collects the messages answered before the ack.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
        what: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut msg = NetlinkMessage::from(message);
        msg.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        msg.header.sequence_number = seq;
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket
            .send(&buf, 0)
            .map_err(|source| NetlinkError::Send { what: what(), source })?;
        let mut answers = Vec::new();
        loop {
            let (data, _) = self
                .socket
                .recv_from_full()
                .map_err(|source| NetlinkError::Receive { what: what(), source })?;
            let mut offset = 0;
            while offset < data.len() {
                let len = NetlinkBuffer::new_checked(&data[offset..])
                    .map_err(|e| NetlinkError::Decode {
                        what: what(),
                        detail: e.to_string(),
                    })?
                    .length() as usize;
                if len == 0 || offset + len > data.len() {
                    return Err(NetlinkError::Decode {
                        what: what(),
                        detail: format!("message length {len} at offset {offset} of {}", data.len()),
                    });
                }
                let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..offset + len])
                    .map_err(|e| NetlinkError::Decode {
                        what: what(),
                        detail: e.to_string(),
                    })?;
                offset += (len + 3) & !3;
                if parsed.header.sequence_number != seq {
                    continue;
                }
                match parsed.payload {
                    NetlinkPayload::Error(err) => {
                        return match err.code {
                            None => Ok(answers),
                            Some(_) => Err(NetlinkError::Kernel {
                                what: what(),
                                source: err.to_io(),
                            }),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    _ => {}
                }
            }
        }
    }

    /// The index of the interface `name`, `None` if there is none.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(msg), 0, &|| {
            format!("look up interface `{name}`")
        }) {
            Ok(answers) => Ok(answers.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a bridge named `name`. Fails with `EEXIST` if the name is taken.
    pub fn create_bridge(&mut self, name: &str) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]));
        self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("create bridge `{name}`"),
        )
        .map(|_| ())
    }

    /// Creates a veth pair: `host_name` here, attached to the bridge `master` (an interface
    /// index), and its peer `peer_name` with MAC address `peer_mac` directly inside the network
    /// namespace whose file is open as `peer_netns`.
    pub fn create_veth(
        &mut self,
        host_name: &str,
        master: u32,
        peer_name: &str,
        peer_mac: [u8; 6],
        peer_netns: &impl AsRawFd,
    ) -> Result<(), NetlinkError> {
        let mut peer = LinkMessage::default();
        peer.attributes.push(LinkAttribute::IfName(peer_name.to_string()));
        peer.attributes.push(LinkAttribute::Address(peer_mac.to_vec()));
        peer.attributes
            .push(LinkAttribute::NetNsFd(peer_netns.as_raw_fd()));
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(host_name.to_string()));
        msg.attributes.push(LinkAttribute::Controller(master));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("create veth pair `{host_name}`/`{peer_name}`"),
        )
        .map(|_| ())
    }

    /// Sets `IFF_UP` on the interface with index `index` (`name` is for messages).
    pub fn set_up(&mut self, index: u32, name: &str) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(msg), 0, &|| {
            format!("bring interface `{name}` up")
        })
        .map(|_| ())
    }

    /// Deletes the interface `name`; `Ok(false)` if there was none.
    pub fn delete_link(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let Some(index) = self.link_index(name)? else {
            return Ok(false);
        };
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        match self.request(RouteNetlinkMessage::DelLink(msg), 0, &|| {
            format!("delete interface `{name}`")
        }) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The IPv4 addresses of interface `index`, with their prefix lengths.
    pub fn addresses(&mut self, index: u32, name: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        let answers = self.request(
            RouteNetlinkMessage::GetAddress(msg),
            netlink_packet_core::NLM_F_DUMP,
            &|| format!("list the addresses of `{name}`"),
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Local(std::net::IpAddr::V4(ip)) => Some((*ip, a.header.prefix_len)),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Adds `ip/prefix_len` to interface `index`. Fails with `EEXIST` if it is already there.
    pub fn add_address(
        &mut self,
        index: u32,
        name: &str,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(ip.into()));
        msg.attributes.push(AddressAttribute::Address(ip.into()));
        let host_bits = 32u32.saturating_sub(u32::from(prefix_len));
        let mask = if host_bits >= 32 {
            u32::MAX
        } else {
            (1u32 << host_bits) - 1
        };
        msg.attributes
            .push(AddressAttribute::Broadcast(Ipv4Addr::from(u32::from(ip) | mask)));
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("add address {ip}/{prefix_len} to `{name}`"),
        )
        .map(|_| ())
    }

    /// Adds a default route via `gateway` out of interface `index`.
    pub fn add_default_route(
        &mut self,
        index: u32,
        name: &str,
        gateway: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = 0;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        msg.attributes.push(RouteAttribute::Oif(index));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("add a default route via {gateway} on `{name}`"),
        )
        .map(|_| ())
    }
}
