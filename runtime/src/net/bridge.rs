//! The host side shared by every bridged container: the bridge with the gateway address, IPv4
//! forwarding, and the iptables rules for NAT and forwarding (shelling out to `iptables`, as
//! Docker does).
//!
//! [`ensure`] is idempotent and safe against concurrent callers: it runs under the state lock and
//! skips all work when the marker file says the bridge it configured is still the one present.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::process::Command;

use super::ipam::{self, IpamError, StateLock};
use super::netlink::{Netlink, NetlinkError};
use super::NetConfig;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Setting up or removing the bridge failed.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Lock(#[from] IpamError),
    #[error("failed to set up bridge `{bridge}`")]
    Netlink {
        bridge: String,
        #[source]
        source: NetlinkError,
    },
    #[error("bridge `{bridge}` vanished while it was being set up")]
    Vanished { bridge: String },
    #[error("failed to enable IPv4 forwarding in `{IP_FORWARD}`")]
    Forwarding(#[source] io::Error),
    #[error(
        "the bridge network's NAT needs the program `iptables` (Debian package `iptables`), which is \
         not installed: install it, or use --network none"
    )]
    IptablesMissing,
    #[error("failed to run `iptables {args}`")]
    IptablesSpawn {
        args: String,
        #[source]
        source: io::Error,
    },
    #[error("`iptables {args}` failed: {stderr}")]
    Iptables { args: String, stderr: String },
    #[error("failed to write marker `{path}`")]
    Marker {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The iptables rules of one bridge: (table, chain, rule). Inserted at the top of their chain so
/// that a DROP policy or Docker's isolation chains later in FORWARD do not reach our traffic.
fn rules(config: &NetConfig) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let br = config.bridge.clone();
    let subnet = config.subnet.to_string();
    let args = |s: &[&str]| s.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    vec![
        (
            "nat",
            "POSTROUTING",
            args(&["-s", &subnet, "!", "-o", &br, "-j", "MASQUERADE"]),
        ),
        ("filter", "FORWARD", args(&["-i", &br, "-j", "ACCEPT"])),
        (
            "filter",
            "FORWARD",
            args(&[
                "-o",
                &br,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ]),
        ),
    ]
}

fn iptables(args: &[String]) -> Result<bool, BridgeError> {
    run_iptables("iptables", args)
}

/// Runs `program -w ARGS` (an iptables); `Ok(false)` when a `-C` check finds no rule.
fn run_iptables(program: &str, args: &[String]) -> Result<bool, BridgeError> {
    let shown = args.join(" ");
    let out = Command::new(program)
        .arg("-w")
        .args(args)
        .output()
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                BridgeError::IptablesMissing
            } else {
                BridgeError::IptablesSpawn {
                    args: shown.clone(),
                    source,
                }
            }
        })?;
    if out.status.success() {
        return Ok(true);
    }
    // `-C` answers 1 when the rule is missing; anything else is a real failure.
    if args.iter().any(|a| a == "-C") && out.status.code() == Some(1) {
        return Ok(false);
    }
    Err(BridgeError::Iptables {
        args: shown,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

fn rule_args(op: &str, table: &str, chain: &str, rule: &[String]) -> Vec<String> {
    let mut v = vec![
        "-t".to_string(),
        table.to_string(),
        op.to_string(),
        chain.to_string(),
    ];
    if op == "-I" {
        v.push("1".to_string());
    }
    v.extend(rule.iter().cloned());
    v
}

fn marker_path(config: &NetConfig) -> PathBuf {
    config.state_dir.join(format!("{}.bridge", config.bridge))
}

/// Makes sure the bridge exists, is up with the gateway address, forwarding is on and the NAT
/// and FORWARD rules are in place. Takes the state lock itself.
pub fn ensure(config: &NetConfig) -> Result<(), BridgeError> {
    let lock = ipam::lock(&config.state_dir, &config.bridge)?;
    ensure_locked(&lock, config).map(|_| ())
}

/// [`ensure`] for a caller that already holds the state lock; returns the bridge's index.
pub(crate) fn ensure_locked(_lock: &StateLock, config: &NetConfig) -> Result<u32, BridgeError> {
    let br = &config.bridge;
    let nl_err = |source| BridgeError::Netlink {
        bridge: br.clone(),
        source,
    };
    let mut nl = Netlink::open().map_err(nl_err)?;
    let marker = marker_path(config);
    let existing = nl.link_index(br).map_err(nl_err)?;
    if let Some(index) = existing {
        let recorded = fs::read_to_string(&marker).ok();
        if recorded.as_deref().map(str::trim) == Some(&index.to_string()) {
            return Ok(index);
        }
    }
    let index = match existing {
        Some(index) => index,
        None => {
            match nl.create_bridge(br) {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::EEXIST) => {}
                Err(e) => return Err(nl_err(e)),
            }
            nl.link_index(br)
                .map_err(nl_err)?
                .ok_or_else(|| BridgeError::Vanished { bridge: br.clone() })?
        }
    };
    let gateway = config.subnet.gateway();
    let has = nl
        .addresses(index, br)
        .map_err(nl_err)?
        .contains(&(gateway, config.subnet.prefix_len));
    if !has {
        match nl.add_address(index, br, gateway, config.subnet.prefix_len) {
            Ok(()) => {}
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            Err(e) => return Err(nl_err(e)),
        }
    }
    nl.set_up(index, br).map_err(nl_err)?;
    if fs::read_to_string(IP_FORWARD)
        .map(|s| s.trim() != "1")
        .unwrap_or(true)
    {
        fs::write(IP_FORWARD, "1\n").map_err(BridgeError::Forwarding)?;
    }
    for (table, chain, rule) in rules(config) {
        if !iptables(&rule_args("-C", table, chain, &rule))? {
            iptables(&rule_args("-I", table, chain, &rule))?;
        }
    }
    fs::write(&marker, format!("{index}\n")).map_err(|source| BridgeError::Marker {
        path: marker.clone(),
        source,
    })?;
    Ok(index)
}

/// Deletes the bridge and its iptables rules (for tests and `kiln system reset`-like cleanup;
/// containers never call it). Idempotent.
pub fn remove(config: &NetConfig) -> Result<(), BridgeError> {
    let _lock = ipam::lock(&config.state_dir, &config.bridge)?;
    // The link goes even when the rules cannot be removed (iptables missing or failing): a
    // bridge left holding the gateway address would capture the subnet's routes from the next
    // bridge made on it. The first error is still reported.
    let rules_removed = (|| {
        for (table, chain, rule) in rules(config) {
            while iptables(&rule_args("-C", table, chain, &rule))? {
                iptables(&rule_args("-D", table, chain, &rule))?;
            }
        }
        Ok(())
    })();
    let link_removed = Netlink::open()
        .and_then(|mut nl| nl.delete_link(&config.bridge).map(|_| ()))
        .map_err(|source| BridgeError::Netlink {
            bridge: config.bridge.clone(),
            source,
        });
    let _ = fs::remove_file(marker_path(config));
    rules_removed.and(link_removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_iptables_is_named_with_its_package_once() {
        let err = run_iptables("kiln-no-such-iptables", &["-L".to_string()]).unwrap_err();
        assert!(matches!(err, BridgeError::IptablesMissing), "{err:?}");
        assert!(std::error::Error::source(&err).is_none());
        let shown = err.to_string();
        assert!(
            shown.contains("`iptables` (Debian package `iptables`)") && shown.contains("--network none"),
            "{shown}"
        );
    }
}
