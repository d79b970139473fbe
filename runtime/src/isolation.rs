//! Chroot isolation: for a runtime that itself runs in an unprivileged container (a CI job or a
//! Kubernetes pod without `CAP_SYS_ADMIN`, seccomp and AppArmor on, Docker's masked `/proc`).
//!
//! There the kernel still lets kiln make a user namespace of its own (mapped by `newuidmap` and
//! `newgidmap` when they carry file capabilities: setuid ones run as uid 0, which does not own the
//! new namespace and lacks `CAP_SYS_ADMIN` over it), mount, UTS and IPC namespaces, tmpfs,
//! devpts, mqueue and bind mounts, `pivot_root`, and overlayfs whose upper dir is not itself on
//! overlayfs. It refuses a fresh procfs (the container's `/proc` has paths masked by mounts, and
//! the kernel only lets a namespace mount a procfs that shows no more than one it already sees
//! whole) and so a pid namespace whose processes see their own pids, a fresh sysfs for the same
//! reason, and usually has no `/dev/net/tun` for a user-mode network. Chroot isolation gives each
//! RUN step what is left: its own mount namespace and root (overlayfs or the copying
//! snapshotter), hostname and IPC namespaces, Docker's capabilities, seccomp filter and masked
//! paths, with the runtime's `/sys` bound in, its `/proc` too and no pid namespace when
//! [`own_pid_namespace`] finds a procfs refused, and the container's network when
//! [`own_network`] says no user-mode network can be made. Buildah calls the same trade
//! `--isolation=chroot`; BuildKit's is `--oci-worker-no-process-sandbox`.

use nix::errno::Errno;

use crate::spec::Isolation;
use crate::sys::Sys as _;

impl Isolation {
    /// The name `--isolation` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isolation::Default => "default",
            Isolation::Chroot => "chroot",
        }
    }

    /// Parses an `--isolation` value (`oci` and `rootless` are Buildah's names of the default).
    pub fn parse(s: &str) -> Option<Isolation> {
        match s {
            "default" | "oci" | "rootless" => Some(Isolation::Default),
            "chroot" => Some(Isolation::Chroot),
            _ => None,
        }
    }
}

/// An `--isolation` (or `KILN_ISOLATION`) value that names no isolation.
#[derive(Debug, thiserror::Error)]
#[error("invalid --isolation (or KILN_ISOLATION) `{0}`: expected default or chroot")]
pub struct BadIsolation(pub String);

impl std::str::FromStr for Isolation {
    type Err = BadIsolation;

    fn from_str(s: &str) -> Result<Isolation, BadIsolation> {
        Isolation::parse(s).ok_or_else(|| BadIsolation(s.to_owned()))
    }
}

/// Whether RUN steps with a network can have a network namespace of their own here: as root, a
/// bridge; in a user namespace, `slirp4netns` with `/dev/net/tun` open to kiln.
pub fn own_network() -> bool {
    !crate::userns::in_user_namespace() || crate::net::usermode::find().is_ok()
}

/// Whether a process here may have a pid namespace and a procfs of its own: a child cloned into
/// new pid and mount namespaces mounts a procfs over `/proc` (in its private mount namespace,
/// so nothing stays). As root, or where the container's `/proc` is unmasked (Kubernetes'
/// `procMount: Unmasked`, Docker's `systempaths=unconfined`), it may; where parts of it are
/// masked the kernel refuses. Asked once per process.
pub fn own_pid_namespace() -> bool {
    static OWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| {
        if !crate::userns::in_user_namespace() {
            return true;
        }
        match crate::sys::clone_child(libc::CLONE_NEWPID | libc::CLONE_NEWNS) {
            Ok(crate::sys::Cloned::Child) => {
                // In the child of a possibly multithreaded process: system calls only.
                let sys = crate::sys::RealSys;
                let private = nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE;
                let fresh = nix::mount::MsFlags::MS_NOSUID
                    | nix::mount::MsFlags::MS_NODEV
                    | nix::mount::MsFlags::MS_NOEXEC;
                let ok = sys.mount(None, c"/", None, private, None).is_ok()
                    && sys
                        .mount(Some(c"proc"), c"/proc", Some(c"proc"), fresh, None)
                        .is_ok();
                crate::sys::exit_child(if ok { 0 } else { 1 })
            }
            Ok(crate::sys::Cloned::Parent(pid)) => {
                matches!(crate::sys::wait_pid(pid, true), Ok(crate::sys::Exit::Code(0)))
            }
            Err(_) => false,
        }
    })
}

/// What a process started with chroot isolation lacks compared with the default isolation, one
/// phrase each; `own_network` and `own_pids` as [`own_network`] and [`own_pid_namespace`] say.
pub fn chroot_losses(own_network: bool, own_pids: bool) -> Vec<&'static str> {
    let mut lost = Vec::new();
    if !own_pids {
        lost.push(
            "no pid namespace: a step sees the build's processes and may signal or trace kiln's \
             own, and what it leaves running in the background is not ended with it",
        );
        lost.push("/proc and /sys are kiln's, bound in (Docker's masked paths masked again)");
    } else {
        lost.push("/sys is kiln's, bound in");
    }
    if !own_network {
        lost.push(
            "no network namespace: steps use the container's network, including services on its \
             loopback (RUN --network=none still gets a namespace of its own)",
        );
    }
    lost
}

/// Whether a setup step failed as it does inside an unprivileged container whose `/proc` (or
/// `/sys`) is masked: the kernel refuses the fresh procfs or sysfs of a namespace of our own.
pub fn refused_by_outer_container(step: &str, errno: Errno) -> bool {
    crate::userns::in_user_namespace()
        && matches!(errno, Errno::EPERM | Errno::EACCES)
        && (step.starts_with("mounting proc at") || step.starts_with("mounting sysfs at"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for i in [Isolation::Default, Isolation::Chroot] {
            assert_eq!(Isolation::parse(i.name()), Some(i));
        }
        assert_eq!(Isolation::parse("rootless"), Some(Isolation::Default));
        assert_eq!(Isolation::parse("vm"), None);
    }

    #[test]
    fn losses_are_stated_only_for_what_is_missing() {
        assert_eq!(chroot_losses(true, false).len(), 2);
        assert!(chroot_losses(false, false)[2].contains("container's network"));
        let with_pids = chroot_losses(true, true).join("; ");
        assert!(!with_pids.contains("pid namespace"), "{with_pids}");
    }
}
