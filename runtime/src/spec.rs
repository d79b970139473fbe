//! The fully-resolved description of one container process.
//!
//! The runtime knows nothing of Dockerfiles or the store: callers turn RUN steps (or `kiln run`)
//! into a [`ContainerSpec`] and hand it to [`crate::start`].

use std::os::fd::OwnedFd;
use std::path::PathBuf;

/// The root filesystem of the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rootfs {
    /// An overlay: `lower` is the parent snapshot chain, top layer first; writes land in `upper`.
    /// `work` is the overlay work dir (same filesystem as `upper`, owned by the caller).
    Overlay {
        /// Lower dirs, top first (at most 499: the runtime may add one of its own at the bottom).
        lower: Vec<PathBuf>,
        /// The upper dir that receives every change.
        upper: PathBuf,
        /// The overlay work dir.
        work: PathBuf,
    },
    /// A plain directory used as the root in place (bind-mounted).
    Dir(PathBuf),
}

/// An extra mount, applied in order after the standard ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSpec {
    /// A recursive bind mount of a host path (file or directory).
    Bind {
        /// Host path.
        source: PathBuf,
        /// Absolute path inside the container.
        target: String,
        /// Remount read-only.
        readonly: bool,
    },
    /// A fresh tmpfs.
    Tmpfs {
        /// Absolute path inside the container.
        target: String,
        /// Size limit in bytes (`None`: the kernel default, half of RAM).
        size: Option<u64>,
        /// Mode of the tmpfs root (`None`: 1777 like Docker).
        mode: Option<u32>,
    },
    /// An overlay of snapshot dirs, e.g. a `RUN --mount=type=bind,from=stage` whose source is a
    /// snapshot chain. Without `upper` it is read-only.
    Overlay {
        /// Lower dirs, top first.
        lower: Vec<PathBuf>,
        /// Upper and work dir for a writable overlay.
        upper: Option<(PathBuf, PathBuf)>,
        /// Absolute path inside the container.
        target: String,
    },
}

impl MountSpec {
    /// The absolute path inside the container.
    pub fn target(&self) -> &str {
        match self {
            MountSpec::Bind { target, .. }
            | MountSpec::Tmpfs { target, .. }
            | MountSpec::Overlay { target, .. } => target,
        }
    }
}

/// The network namespace of the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// Share the host's network namespace (`RUN --network=host`, `run --network host`).
    Host,
    /// A new network namespace with only the loopback interface, brought up.
    None,
    /// Join an existing network namespace (a file such as `/run/netns/x` or `/proc/PID/ns/net`).
    Join(PathBuf),
}

/// The security profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Docker's defaults: its 14 capabilities, its seccomp profile (or the one in
    /// [`RunOptions::seccomp`]), masked and read-only `/proc` paths, read-only `/sys`, only the
    /// standard devices. `no_new_privs` stays off unless [`RunOptions::no_new_privileges`].
    Default,
    /// `--privileged` / `RUN --security=insecure`: every capability, no seccomp filter, nothing
    /// masked, `/sys` writable, the host's devices.
    Insecure,
}

/// Contents of the files bind-mounted over `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname`.
/// `None` leaves the image's file alone. The runtime writes them into its scratch dir; they are
/// never part of the container's layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcFiles {
    /// `/etc/hosts`.
    pub hosts: Option<String>,
    /// `/etc/resolv.conf`.
    pub resolv_conf: Option<String>,
    /// `/etc/hostname`.
    pub hostname: Option<String>,
}

impl EtcFiles {
    /// The files BuildKit gives a RUN step: a hosts file naming `localhost` and `hostname`, the
    /// host's resolv.conf (with loopback nameservers replaced by public ones when the container
    /// has its own network namespace, where the host's loopback resolver is unreachable), and the
    /// hostname.
    pub fn for_build(hostname: &str, host_resolv_conf: &str, network: &Network) -> EtcFiles {
        let hosts = format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        let resolv_conf = match network {
            Network::Host => host_resolv_conf.to_string(),
            Network::None | Network::Join(_) => {
                let mut out = String::new();
                let mut has_server = false;
                for line in host_resolv_conf.lines() {
                    let mut words = line.split_whitespace();
                    if words.next() == Some("nameserver") {
                        let addr = words.next().unwrap_or("");
                        if addr.starts_with("127.") || addr == "::1" {
                            continue;
                        }
                        has_server = true;
                    }
                    out.push_str(line);
                    out.push('\n');
                }
                if !has_server {
                    out.push_str("nameserver 8.8.8.8\nnameserver 8.8.4.4\n");
                }
                out
            }
        };
        EtcFiles {
            hosts: Some(hosts),
            resolv_conf: Some(resolv_conf),
            hostname: Some(format!("{hostname}\n")),
        }
    }
}

/// Everything needed to run one process in a container.
#[derive(Debug)]
pub struct ContainerSpec {
    /// The root filesystem.
    pub rootfs: Rootfs,
    /// Mount the root filesystem read-only.
    pub readonly_rootfs: bool,
    /// argv; `argv[0]` without a `/` is looked up in the container's `PATH` inside the rootfs.
    pub args: Vec<String>,
    /// Environment, `KEY=VALUE`. `HOME` is added from the user's passwd entry when missing.
    pub env: Vec<String>,
    /// Working directory, created (owned by the user) if missing, like Docker and BuildKit.
    pub cwd: String,
    /// `USER` as written: `""`, `name`, `uid`, `name:group`, `uid:gid`; resolved inside the rootfs.
    pub user: String,
    /// The container's hostname.
    pub hostname: String,
    /// Extra mounts, in order.
    pub mounts: Vec<MountSpec>,
    /// The network namespace.
    pub network: Network,
    /// The security profile.
    pub security: Security,
    /// Contents of `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`.
    pub etc_files: EtcFiles,
    /// Standard input (`None`: `/dev/null`).
    pub stdin: Option<OwnedFd>,
    /// Standard output.
    pub stdout: OwnedFd,
    /// Standard error.
    pub stderr: OwnedFd,
    /// Options used by `kiln run` (terminal, init, capabilities, resource limits); the build
    /// engine leaves them at their defaults.
    pub options: RunOptions,
}

/// Container options beyond what a build step needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunOptions {
    /// `stdin` is a pty slave: the process starts a new session and takes it as its controlling
    /// terminal (`docker run -t`).
    pub controlling_tty: bool,
    /// Run a minimal init as pid 1 that forwards signals to the process and reaps zombies
    /// (`docker run --init`).
    pub init: bool,
    /// Capabilities added to the default set, upper case without the `CAP_` prefix, or `ALL`.
    pub cap_add: Vec<String>,
    /// Capabilities removed from the default set, same spelling, or `ALL`.
    pub cap_drop: Vec<String>,
    /// Resource limits applied through a cgroup of the container's own (`None`: no cgroup).
    pub cgroup: Option<CgroupSpec>,
    /// Supplementary groups of a user named without a group: BuildKit's RUN gives the groups
    /// listing the user; `docker run` puts the user's own gid first.
    pub groups: crate::users::Groups,
    /// The root overlay's upper dir is scratch whose durability the caller sees to (a build
    /// step's result, which the build writes out and fsyncs as a layer blob): it is mounted
    /// `volatile` where the kernel allows, so that neither an `fsync` inside the container nor
    /// the unmount at its exit syncs the whole upper filesystem, which with other writers' dirty
    /// data pending can take hundreds of milliseconds. Off for `kiln run`, whose containers
    /// keep their changes across a crash.
    pub volatile_upper: bool,
    /// Set `no_new_privs` (`--security-opt no-new-privileges`): setuid binaries and file
    /// capabilities no longer raise privileges. Off by default, as in Docker and BuildKit.
    pub no_new_privileges: bool,
    /// The seccomp filter (`--security-opt seccomp=...`); ignored with [`Security::Insecure`].
    pub seccomp: crate::seccomp::SeccompPolicy,
    /// Missing targets of [`ContainerSpec::mounts`] are made in the root filesystem itself, so
    /// that the directories stay among its changes, as BuildKit's RUN leaves them; file targets
    /// are still reported by [`crate::Running::created_paths`] for the caller to remove. Off:
    /// they come from a layer of the runtime's own below the image and leave no trace.
    pub mount_points_in_rootfs: bool,
    /// The size of the tmpfs at `/dev/shm` in bytes (`--shm-size`); `None` = Docker's 64 MiB.
    pub shm_size: Option<u64>,
    /// Resource limits set with `setrlimit` before the process runs (`--ulimit`), while the
    /// process still has `CAP_SYS_RESOURCE` (so a hard limit may be raised); the others are
    /// inherited from the runtime's process, as runc leaves them.
    pub rlimits: Vec<Rlimit>,
    /// How the process is set apart from the environment the runtime runs in.
    pub isolation: Isolation,
}

/// How a container is set apart from the environment the runtime itself runs in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Isolation {
    /// Namespaces of its own for mounts, pids, hostname, IPC (and the network the spec asks
    /// for), a fresh `/proc`.
    #[default]
    Default,
    /// For a runtime that itself runs in an unprivileged container (no `CAP_SYS_ADMIN` outside
    /// its user namespace, `/proc` partly masked, so that the kernel refuses a fresh procfs): own
    /// mount, hostname and IPC namespaces and its own root, but the runtime's pid namespace and
    /// its `/proc` and `/sys` bound in (see [`crate::isolation`]).
    Chroot,
}

/// One resource limit: a resource by Docker's `--ulimit` name (`nofile`, `nproc`, `core`,
/// `memlock`, `stack`, ...) and its soft and hard limits (`u64::MAX` = unlimited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rlimit {
    /// The resource's name.
    pub name: String,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

impl Rlimit {
    /// The `RLIMIT_*` number of a resource name, `None` for a name Docker does not take.
    pub fn resource(name: &str) -> Option<i32> {
        Some(match name {
            "core" => libc::RLIMIT_CORE,
            "cpu" => libc::RLIMIT_CPU,
            "data" => libc::RLIMIT_DATA,
            "fsize" => libc::RLIMIT_FSIZE,
            "locks" => libc::RLIMIT_LOCKS,
            "memlock" => libc::RLIMIT_MEMLOCK,
            "msgqueue" => libc::RLIMIT_MSGQUEUE,
            "nice" => libc::RLIMIT_NICE,
            "nofile" => libc::RLIMIT_NOFILE,
            "nproc" => libc::RLIMIT_NPROC,
            "rss" => libc::RLIMIT_RSS,
            "rtprio" => libc::RLIMIT_RTPRIO,
            "rttime" => libc::RLIMIT_RTTIME,
            "sigpending" => libc::RLIMIT_SIGPENDING,
            "stack" => libc::RLIMIT_STACK,
            _ => return None,
        } as i32)
    }
}

/// A cgroup for one container, created before the process runs and removed after it exits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupSpec {
    /// Name of the cgroup under kiln's parent group (e.g. the container ID).
    pub name: String,
    /// `--memory` in bytes.
    pub memory: Option<u64>,
    /// `--cpus`: CPU quota in CPUs (e.g. 0.5).
    pub cpus: Option<f64>,
    /// `--pids-limit`.
    pub pids: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_build_drops_loopback_nameservers_in_own_netns() {
        let host = "search example.com\nnameserver 127.0.0.53\noptions edns0\n";
        let files = EtcFiles::for_build("box", host, &Network::None);
        assert_eq!(
            files.resolv_conf.as_deref(),
            Some("search example.com\noptions edns0\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n")
        );
        let files = EtcFiles::for_build("box", host, &Network::Host);
        assert_eq!(files.resolv_conf.as_deref(), Some(host));
        assert!(files
            .hosts
            .as_deref()
            .is_some_and(|h| h.starts_with("127.0.0.1\tlocalhost box\n")));
        assert_eq!(files.hostname.as_deref(), Some("box\n"));
    }

    #[test]
    fn for_build_keeps_real_nameservers() {
        let host = "nameserver 10.0.0.2\nnameserver ::1\n";
        let files = EtcFiles::for_build("h", host, &Network::None);
        assert_eq!(files.resolv_conf.as_deref(), Some("nameserver 10.0.0.2\n"));
    }
}
