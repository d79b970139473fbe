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

/// Errors of reading the host's capability state.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
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
            Security::Default => DOCKER_DEFAULT_MASK,
            Security::Insecure => self.all(),
        };
        wanted & self.permitted & self.all()
    }
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
}
