//! Capability sets.

use std::path::PathBuf;

use crate::spec::Security;
use crate::sys::{self, Errno};

/// Docker's default capabilities, by number: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID,
/// SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP.
pub const DOCKER_DEFAULT_CAPS: [u32; 14] = [0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31];

/// [`DOCKER_DEFAULT_CAPS`] as a mask (`0xa80425fb`).
pub const DOCKER_DEFAULT_MASK: u64 = {
    let mut mask = 0u64;
    let mut i = 0;
    while i < DOCKER_DEFAULT_CAPS.len() {
        mask |= 1 << DOCKER_DEFAULT_CAPS[i];
        i += 1;
    }
    mask
};

/// Capability names by number, without the `CAP_` prefix (`capabilities(7)`, up to Linux 6.x).
pub const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// A `--cap-add`/`--cap-drop` value, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapName {
    /// `ALL`.
    All,
    /// One capability, by number.
    Cap(u32),
}

/// Parses a capability name the way Docker does: any case, with or without the `CAP_` prefix, or
/// `ALL`.
pub fn parse_name(name: &str) -> Result<CapName, CapsError> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    if bare == "ALL" {
        return Ok(CapName::All);
    }
    NAMES
        .iter()
        .position(|n| *n == bare)
        .map(|i| CapName::Cap(i as u32))
        .ok_or_else(|| CapsError::UnknownName {
            name: name.to_string(),
        })
}

/// The `CAP_`-prefixed name of capability `cap` (`CAP_47` for numbers this table does not know).
pub fn name_of(cap: u32) -> String {
    match NAMES.get(cap as usize) {
        Some(n) => format!("CAP_{n}"),
        None => format!("CAP_{cap}"),
    }
}

/// Errors of reading the host's capability state and of parsing capability names.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// A `--cap-add`/`--cap-drop` value names no capability.
    #[error("unknown capability: {name:?}")]
    UnknownName {
        /// The value as given.
        name: String,
    },
    /// Reading `/proc/sys/kernel/cap_last_cap` failed.
    #[error("failed to read `{path}`")]
    LastCap {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file did not hold a number.
    #[error("`{path}` does not hold a capability number: {text:?}")]
    LastCapParse {
        /// The file.
        path: PathBuf,
        /// What it held.
        text: String,
    },
    /// `capget` failed.
    #[error("failed to read the runtime's own capabilities")]
    Capget(#[source] Errno),
}

/// The capability state of the host process the runtime runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCaps {
    /// Highest capability number the kernel knows.
    pub last_cap: u32,
    /// The runtime's permitted set: a container can never get more.
    pub permitted: u64,
}

impl HostCaps {
    /// Reads `/proc/sys/kernel/cap_last_cap` and the calling thread's permitted set.
    pub fn read() -> Result<HostCaps, CapsError> {
        let path = PathBuf::from("/proc/sys/kernel/cap_last_cap");
        let text = std::fs::read_to_string(&path).map_err(|source| CapsError::LastCap {
            path: path.clone(),
            source,
        })?;
        let last_cap = text
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n < 64)
            .ok_or_else(|| CapsError::LastCapParse {
                path,
                text: text.clone(),
            })?;
        let permitted = sys::permitted_caps().map_err(CapsError::Capget)?;
        Ok(HostCaps { last_cap, permitted })
    }

    /// Every capability the kernel knows, as a mask.
    pub fn all(&self) -> u64 {
        if self.last_cap >= 63 {
            u64::MAX
        } else {
            (1u64 << (self.last_cap + 1)) - 1
        }
    }

    /// The set a container with `security` gets: Docker's default or everything, limited to what
    /// the runtime itself holds.
    pub fn for_security(&self, security: Security) -> u64 {
        let wanted = match security {
            Security::Default => return self.default_set(),
            Security::Insecure => self.all(),
        };
        wanted & self.permitted & self.all()
    }

    /// Docker's default set, limited to what the runtime holds: [`HostCaps::for_security`] of
    /// [`Security::Default`].
    pub fn default_set(&self) -> u64 {
        DOCKER_DEFAULT_MASK & self.permitted & self.all()
    }

    /// The set a container gets with `--cap-add`/`--cap-drop`, in Docker's order: with `ALL` in
    /// `add`, everything but `drop`; else with `ALL` in `drop`, only `add`; else the profile's set
    /// minus `drop` plus `add`. `Security::Insecure` (`--privileged`) ignores both lists. Limited
    /// to what the runtime holds, like [`HostCaps::for_security`]. Unknown names are an error.
    pub fn with_changes(
        &self,
        security: Security,
        add: &[String],
        drop: &[String],
    ) -> Result<u64, CapsError> {
        let parse = |names: &[String]| -> Result<(bool, u64), CapsError> {
            let mut all = false;
            let mut mask = 0u64;
            for n in names {
                match parse_name(n)? {
                    CapName::All => all = true,
                    CapName::Cap(c) => mask |= 1u64 << c,
                }
            }
            Ok((all, mask))
        };
        let (add_all, add) = parse(add)?;
        let (drop_all, drop) = parse(drop)?;
        let wanted = match security {
            Security::Insecure => self.all(),
            Security::Default if add_all => self.all() & !drop,
            Security::Default if drop_all => add,
            Security::Default => (DOCKER_DEFAULT_MASK & !drop) | add,
        };
        Ok(wanted & self.permitted & self.all())
    }
}

/// Parses a `/proc/PID/status` capability line value (`CapBnd:\t000001ffffffffff`).
pub fn parse_mask(hex: &str) -> Option<u64> {
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_default_mask_matches_docker() {
        assert_eq!(DOCKER_DEFAULT_MASK, 0xa80425fb);
    }

    #[test]
    fn sets_are_limited_by_the_host() {
        let host = HostCaps {
            last_cap: 40,
            permitted: 0x1fffeffffff,
        };
        assert_eq!(host.all(), 0x1ffffffffff);
        assert_eq!(host.for_security(Security::Default), 0xa80425fb);
        assert_eq!(host.for_security(Security::Insecure), 0x1fffeffffff);
        let weak = HostCaps {
            last_cap: 40,
            permitted: 0x3,
        };
        assert_eq!(weak.for_security(Security::Default), 0x3);
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_parse_like_docker() {
        assert_eq!(parse_name("NET_ADMIN").unwrap(), CapName::Cap(12));
        assert_eq!(parse_name("cap_net_admin").unwrap(), CapName::Cap(12));
        assert_eq!(parse_name("Sys_Admin").unwrap(), CapName::Cap(21));
        assert_eq!(parse_name("all").unwrap(), CapName::All);
        assert_eq!(parse_name("CAP_ALL").unwrap(), CapName::All);
        assert_eq!(parse_name("CHECKPOINT_RESTORE").unwrap(), CapName::Cap(40));
        let err = parse_name("NET_ADMINN").unwrap_err();
        assert_eq!(err.to_string(), "unknown capability: \"NET_ADMINN\"");
        assert_eq!(name_of(0), "CAP_CHOWN");
        assert_eq!(name_of(63), "CAP_63");
    }

    #[test]
    fn add_and_drop_follow_dockers_order() {
        let host = HostCaps {
            last_cap: 40,
            permitted: 0x1ffffffffff,
        };
        let d = Security::Default;
        assert_eq!(host.with_changes(d, &[], &[]).unwrap(), DOCKER_DEFAULT_MASK);
        assert_eq!(host.with_changes(d, &[], &strings(&["ALL"])).unwrap(), 0);
        // drop ALL then add one: only that one.
        assert_eq!(
            host.with_changes(d, &strings(&["net_admin"]), &strings(&["all"]))
                .unwrap(),
            1 << 12
        );
        // add ALL minus a drop.
        assert_eq!(
            host.with_changes(d, &strings(&["ALL"]), &strings(&["CAP_CHOWN"]))
                .unwrap(),
            0x1fffffffffe
        );
        let m = host
            .with_changes(d, &strings(&["SYS_ADMIN"]), &strings(&["KILL", "chown"]))
            .unwrap();
        assert_eq!(m, (DOCKER_DEFAULT_MASK & !(1 << 5) & !1) | (1 << 21));
        assert_eq!(
            host.with_changes(Security::Insecure, &[], &strings(&["ALL"]))
                .unwrap(),
            0x1ffffffffff
        );
        assert!(matches!(
            host.with_changes(d, &strings(&["BOGUS"]), &[]),
            Err(CapsError::UnknownName { .. })
        ));
        assert_eq!(parse_mask("000001ffffffffff"), Some(0x1ffffffffff));
    }
}
