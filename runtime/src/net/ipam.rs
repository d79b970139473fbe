//! IPv4 address management for one bridge: one small file per allocated address
//! (`<state_dir>/<bridge>.addresses/<ip>`, holding the endpoint id and its namespace file),
//! guarded by an `flock`ed lock file `<state_dir>/<bridge>.lock`.
//!
//! Addresses are handed out lowest first from `.2` of the subnet (`.1` is the gateway), so a
//! released address is the next one given. An entry whose network namespace file no longer
//! exists belongs to a container that went away without teardown: it is reclaimed when the
//! subnet runs out, or when its address is asked for by `--ip`.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::Subnet;

/// Allocating or releasing an address failed.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("failed to create the network state directory `{path}`: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to open lock file `{path}`: {source}")]
    OpenLock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to lock `{path}`: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("failed to read address allocation `{path}`: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to write address allocation `{path}`: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no free address left in {0}")]
    Exhausted(Subnet),
    #[error("address {ip} is not usable in {subnet}")]
    OutOfRange { ip: Ipv4Addr, subnet: Subnet },
    #[error("address {ip} is already in use by `{owner}`")]
    InUse { ip: Ipv4Addr, owner: String },
}

/// The exclusive lock of one bridge's network state, released on drop.
#[derive(Debug)]
pub struct StateLock {
    _lock: Flock<fs::File>,
}

/// Takes the lock file `<state_dir>/<bridge>.lock`, waiting for other holders (processes or
/// threads) to release it.
pub fn lock(state_dir: &Path, bridge: &str) -> Result<StateLock, IpamError> {
    fs::create_dir_all(state_dir).map_err(|source| IpamError::CreateDir {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let path = state_dir.join(format!("{bridge}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| IpamError::OpenLock {
            path: path.clone(),
            source,
        })?;
    let lock =
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| IpamError::Lock { path, source })?;
    Ok(StateLock { _lock: lock })
}

fn allocations_dir(state_dir: &Path, bridge: &str) -> PathBuf {
    state_dir.join(format!("{bridge}.addresses"))
}

/// The owner recorded in an address file: (endpoint id, netns file).
fn read_owner(path: &Path) -> Result<Option<(String, PathBuf)>, IpamError> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let mut lines = text.lines();
            let id = lines.next().unwrap_or("").to_string();
            let netns = PathBuf::from(lines.next().unwrap_or(""));
            Ok(Some((id, netns)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IpamError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The addresses with a file in `dir`.
fn taken(dir: &Path) -> Result<BTreeSet<Ipv4Addr>, IpamError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(source) => {
            return Err(IpamError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut out = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|source| IpamError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        if let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            out.insert(ip);
        }
    }
    Ok(out)
}

/// Removes the address files whose namespace file is gone (containers that went away without
/// teardown); returns how many.
fn reclaim_stale(dir: &Path, taken: &mut BTreeSet<Ipv4Addr>) -> Result<usize, IpamError> {
    let mut freed = 0;
    for ip in taken.clone() {
        let path = dir.join(ip.to_string());
        if let Some((_, netns)) = read_owner(&path)? {
            if !netns.exists() {
                remove(&path)?;
                taken.remove(&ip);
                freed += 1;
            }
        }
    }
    Ok(freed)
}

fn remove(path: &Path) -> Result<(), IpamError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(IpamError::Write {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Records `ip` as `id`'s. The file is new (`O_EXCL`); no rename-over and no fsync, which cost
/// milliseconds on ext4: the state belongs on a tmpfs such as `/run` and is only ever read
/// under the lock.
fn record(dir: &Path, ip: Ipv4Addr, id: &str, netns: &Path) -> Result<(), IpamError> {
    let path = dir.join(ip.to_string());
    let err = |source| IpamError::Write {
        path: path.clone(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(err)?;
    file.write_all(format!("{id}\n{}\n", netns.display()).as_bytes())
        .map_err(err)
}

/// Allocates an address for endpoint `id` (whose namespace file is `netns`): `requested` if
/// given and free, else the lowest free one. Addresses of endpoints whose namespace file is
/// gone are reclaimed when needed. The caller holds the [`lock`].
pub fn allocate(
    _lock: &StateLock,
    state_dir: &Path,
    bridge: &str,
    subnet: Subnet,
    id: &str,
    netns: &Path,
    requested: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, IpamError> {
    let dir = allocations_dir(state_dir, bridge);
    fs::create_dir_all(&dir).map_err(|source| IpamError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    let mut taken = taken(&dir)?;
    let ip = match requested {
        Some(ip) => {
            if !subnet.is_host(ip) || ip == subnet.gateway() {
                return Err(IpamError::OutOfRange { ip, subnet });
            }
            if taken.contains(&ip) {
                let path = dir.join(ip.to_string());
                match read_owner(&path)? {
                    Some((owner, ns)) if ns.exists() || owner == id => {
                        if owner != id {
                            return Err(IpamError::InUse { ip, owner });
                        }
                        remove(&path)?;
                    }
                    _ => remove(&path)?,
                }
            }
            ip
        }
        None => {
            let free = |taken: &BTreeSet<Ipv4Addr>| {
                subnet
                    .hosts()
                    .find(|ip| *ip != subnet.gateway() && !taken.contains(ip))
            };
            match free(&taken) {
                Some(ip) => ip,
                None => {
                    reclaim_stale(&dir, &mut taken)?;
                    free(&taken).ok_or(IpamError::Exhausted(subnet))?
                }
            }
        }
    };
    record(&dir, ip, id, netns)?;
    Ok(ip)
}

/// Releases `ip` if endpoint `id` holds it. Idempotent. The caller holds the [`lock`].
pub fn release(
    _lock: &StateLock,
    state_dir: &Path,
    bridge: &str,
    ip: Ipv4Addr,
    id: &str,
) -> Result<(), IpamError> {
    let path = allocations_dir(state_dir, bridge).join(ip.to_string());
    match read_owner(&path)? {
        Some((owner, _)) if owner == id => remove(&path),
        _ => Ok(()),
    }
}

/// The addresses allocated now, with their endpoint IDs.
pub fn allocated(
    _lock: &StateLock,
    state_dir: &Path,
    bridge: &str,
) -> Result<Vec<(Ipv4Addr, String)>, IpamError> {
    let dir = allocations_dir(state_dir, bridge);
    let mut out = Vec::new();
    for ip in taken(&dir)? {
        if let Some((id, _)) = read_owner(&dir.join(ip.to_string()))? {
            out.push((ip, id));
        }
    }
    Ok(out)
}
