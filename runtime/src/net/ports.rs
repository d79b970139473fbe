//! Published port specs: `-p [ip:][hostPort[-end]:]containerPort[-end][/tcp|udp]` and `-P`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

/// A port spec could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortSpecError {
    #[error("invalid port spec `{spec}`: unknown protocol `{proto}` (expected tcp or udp)")]
    Protocol { spec: String, proto: String },
    #[error("invalid port spec `{spec}`: invalid host address `{ip}`")]
    HostIp { spec: String, ip: String },
    #[error("invalid port spec `{spec}`: invalid port `{port}` (expected 1-65535)")]
    Port { spec: String, port: String },
    #[error("invalid port spec `{spec}`: invalid port range `{range}`")]
    Range { spec: String, range: String },
    #[error("invalid port spec `{spec}`: the container port is missing")]
    MissingContainerPort { spec: String },
    #[error("invalid port spec `{spec}`: too many `:`-separated parts")]
    TooManyParts { spec: String },
    #[error("invalid port spec `{spec}`: host range {host} and container range {container} differ in size")]
    RangeMismatch {
        spec: String,
        host: PortRange,
        container: PortRange,
    },
}

/// The transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// An inclusive range of ports; a single port has `start == end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port (inclusive).
    pub end: u16,
}

impl PortRange {
    /// The number of ports in the range.
    pub fn len(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }

    /// Always false: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The ports, in order.
    pub fn ports(&self) -> impl Iterator<Item = u16> {
        self.start..=self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// One `-p` argument (or one exposed port for `-P`), parsed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortSpec {
    /// The host address to listen on (`None`: `0.0.0.0`, like Docker).
    pub host_ip: Option<IpAddr>,
    /// Host ports (`None`: a random free port per container port). A range with a single
    /// container port means "the first free port of the range".
    pub host_ports: Option<PortRange>,
    /// Container ports.
    pub container_ports: PortRange,
    /// The protocol.
    pub protocol: Protocol,
}

fn parse_port(spec: &str, s: &str) -> Result<u16, PortSpecError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 && !s.starts_with('+') => Ok(p),
        _ => Err(PortSpecError::Port {
            spec: spec.to_string(),
            port: s.to_string(),
        }),
    }
}

fn parse_range(spec: &str, s: &str) -> Result<PortRange, PortSpecError> {
    match s.split_once('-') {
        None => {
            let p = parse_port(spec, s)?;
            Ok(PortRange { start: p, end: p })
        }
        Some((a, b)) => {
            let range_err = || PortSpecError::Range {
                spec: spec.to_string(),
                range: s.to_string(),
            };
            let start = parse_port(spec, a).map_err(|_| range_err())?;
            let end = parse_port(spec, b).map_err(|_| range_err())?;
            if end < start {
                return Err(range_err());
            }
            Ok(PortRange { start, end })
        }
    }
}

impl PortSpec {
    /// Parses a `-p` argument: `ctr`, `host:ctr`, `ip:host:ctr`, `ip::ctr`, each port possibly a
    /// range `a-b`, optionally followed by `/tcp` or `/udp`; an IPv6 host address is written in
    /// brackets (`[::1]:8080:80`).
    pub fn parse(spec: &str) -> Result<PortSpec, PortSpecError> {
        let (rest, protocol) = match spec.rsplit_once('/') {
            Some((rest, "tcp")) => (rest, Protocol::Tcp),
            Some((rest, "udp")) => (rest, Protocol::Udp),
            Some((_, proto)) => {
                return Err(PortSpecError::Protocol {
                    spec: spec.to_string(),
                    proto: proto.to_string(),
                })
            }
            None => (spec, Protocol::Tcp),
        };
        let (ip_text, ports) = if let Some(bracketed) = rest.strip_prefix('[') {
            let Some((ip, after)) = bracketed.split_once("]:") else {
                return Err(PortSpecError::HostIp {
                    spec: spec.to_string(),
                    ip: rest.to_string(),
                });
            };
            (Some(ip), after)
        } else {
            let parts: Vec<&str> = rest.split(':').collect();
            match parts.len() {
                1 | 2 => (None, rest),
                3 => (Some(parts[0]), rest.split_once(':').map_or(rest, |(_, p)| p)),
                _ => {
                    return Err(PortSpecError::TooManyParts {
                        spec: spec.to_string(),
                    })
                }
            }
        };
        let host_ip = match ip_text {
            None | Some("") => None,
            Some(ip) => Some(ip.parse::<IpAddr>().map_err(|_| PortSpecError::HostIp {
                spec: spec.to_string(),
                ip: ip.to_string(),
            })?),
        };
        let (host, container) = match ports.split_once(':') {
            Some((h, c)) => (Some(h), c),
            None => (None, ports),
        };
        if container.is_empty() {
            return Err(PortSpecError::MissingContainerPort {
                spec: spec.to_string(),
            });
        }
        if container.contains(':') {
            return Err(PortSpecError::TooManyParts {
                spec: spec.to_string(),
            });
        }
        let container_ports = parse_range(spec, container)?;
        let host_ports = match host {
            None | Some("") => None,
            Some(h) => Some(parse_range(spec, h)?),
        };
        if let Some(h) = host_ports {
            if container_ports.len() > 1 && h.len() != container_ports.len() {
                return Err(PortSpecError::RangeMismatch {
                    spec: spec.to_string(),
                    host: h,
                    container: container_ports,
                });
            }
        }
        Ok(PortSpec {
            host_ip,
            host_ports,
            container_ports,
            protocol,
        })
    }

    /// The spec `-P` makes of one exposed port of the image config (`80/tcp`, `53/udp`, `8000-8002`):
    /// a random host port on every address.
    pub fn from_exposed(exposed: &str) -> Result<PortSpec, PortSpecError> {
        let spec = PortSpec::parse(exposed)?;
        if spec.host_ip.is_some() || spec.host_ports.is_some() {
            return Err(PortSpecError::TooManyParts {
                spec: exposed.to_string(),
            });
        }
        Ok(spec)
    }

    /// The host address to bind: the given one or `0.0.0.0`.
    pub fn bind_ip(&self) -> IpAddr {
        self.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:")?,
            None => {}
        }
        match self.host_ports {
            Some(h) => write!(f, "{h}:")?,
            None if self.host_ip.is_some() => f.write_str(":")?,
            None => {}
        }
        write!(f, "{}/{}", self.container_ports, self.protocol)
    }
}

/// A port actually published: what `kiln port` prints and `kiln ps` shows in PORTS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PublishedPort {
    /// The host address listened on.
    pub host_ip: IpAddr,
    /// The host port listened on.
    pub host_port: u16,
    /// The container port traffic goes to.
    pub container_port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

impl fmt::Display for PublishedPort {
    /// Docker's format: `0.0.0.0:8080->80/tcp` (`[::1]:8080->80/tcp` for IPv6 shows as `::1:8080`
    /// like Docker's `:::8080`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}->{}/{}",
            self.host_ip, self.host_port, self.container_port, self.protocol
        )
    }
}

/// The PORTS column of `kiln ps`: published ports joined by `, ` (Docker's order: as given).
pub fn format_ports(ports: &[PublishedPort]) -> String {
    ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u16, end: u16) -> PortRange {
        PortRange { start, end }
    }

    #[test]
    fn parses_every_form() {
        type Case<'a> = (&'a str, Option<&'a str>, Option<PortRange>, PortRange, Protocol);
        let cases: &[Case] = &[
            ("80", None, None, r(80, 80), Protocol::Tcp),
            ("8080:80", None, Some(r(8080, 8080)), r(80, 80), Protocol::Tcp),
            (
                "127.0.0.1:8080:80/udp",
                Some("127.0.0.1"),
                Some(r(8080, 8080)),
                r(80, 80),
                Protocol::Udp,
            ),
            ("127.0.0.1::80", Some("127.0.0.1"), None, r(80, 80), Protocol::Tcp),
            (
                "8000-8002:80-82/tcp",
                None,
                Some(r(8000, 8002)),
                r(80, 82),
                Protocol::Tcp,
            ),
            (
                "9000-9010:80",
                None,
                Some(r(9000, 9010)),
                r(80, 80),
                Protocol::Tcp,
            ),
            (
                "[::1]:8080:80",
                Some("::1"),
                Some(r(8080, 8080)),
                r(80, 80),
                Protocol::Tcp,
            ),
            ("53/udp", None, None, r(53, 53), Protocol::Udp),
        ];
        for (spec, ip, host, ctr, proto) in cases {
            let p = PortSpec::parse(spec).unwrap();
            assert_eq!(p.host_ip, ip.map(|i| i.parse().unwrap()), "{spec}");
            assert_eq!(p.host_ports, *host, "{spec}");
            assert_eq!(p.container_ports, *ctr, "{spec}");
            assert_eq!(p.protocol, *proto, "{spec}");
            assert_eq!(
                PortSpec::parse(&p.to_string()).unwrap(),
                p,
                "round trip of {spec}"
            );
        }
    }

    #[test]
    fn rejects_bad_specs_naming_them() {
        for bad in [
            "",
            "abc",
            "0",
            "65536",
            "8080:",
            ":80:",
            "80/sctp",
            "1:2:3:4",
            "x.y:80:80",
            "90-80:80",
            "8000-8001:80-82",
            "[::1:80",
            "-80",
            "+80",
        ] {
            let err = PortSpec::parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("`{bad}`")), "{bad}: {err}");
        }
        assert!(matches!(
            PortSpec::parse("8000-8001:80-82"),
            Err(PortSpecError::RangeMismatch { .. })
        ));
        assert!(matches!(
            PortSpec::parse("80/sctp"),
            Err(PortSpecError::Protocol { .. })
        ));
        assert!(PortSpec::from_exposed("8080:80").is_err());
        assert_eq!(
            PortSpec::from_exposed("80/tcp").unwrap().container_ports,
            r(80, 80)
        );
    }

    #[test]
    fn formats_like_docker() {
        let p = PublishedPort {
            host_ip: "0.0.0.0".parse().unwrap(),
            host_port: 8080,
            container_port: 80,
            protocol: Protocol::Tcp,
        };
        let q = PublishedPort {
            host_ip: "127.0.0.1".parse().unwrap(),
            host_port: 5353,
            container_port: 53,
            protocol: Protocol::Udp,
        };
        assert_eq!(
            format_ports(&[p, q]),
            "0.0.0.0:8080->80/tcp, 127.0.0.1:5353->53/udp"
        );
        let json = serde_json::to_string(&PortSpec::parse("8080:80/udp").unwrap()).unwrap();
        assert!(json.contains("\"protocol\":\"udp\""), "{json}");
    }
}
