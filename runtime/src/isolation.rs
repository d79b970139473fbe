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
//! paths, with the runtime's `/proc` and `/sys` bound in and the container's network when
//! [`own_network`] says no user-mode network can be made. Buildah calls the same trade
//! `--isolation=chroot`; BuildKit's is `--oci-worker-no-process-sandbox`.

use nix::errno::Errno;

use crate::spec::Isolation;

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

/// Whether RUN steps with a network can have a network namespace of their own here: as root, a
/// bridge; in a user namespace, `slirp4netns` with `/dev/net/tun` open to kiln.
pub fn own_network() -> bool {
    !crate::userns::in_user_namespace() || crate::net::usermode::find().is_ok()
}

/// What a process started with chroot isolation lacks compared with the default isolation, one
/// phrase each; `own_network` as [`own_network`] says.
pub fn chroot_losses(own_network: bool) -> Vec<&'static str> {
    let mut lost = vec![
        "no pid namespace: a step sees the build's processes and may signal or trace kiln's own, \
         and what it leaves running in the background is not ended with it",
        "/proc and /sys are kiln's, bound in (Docker's masked paths masked again)",
    ];
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
    fn the_network_loss_is_stated_only_without_a_network_of_its_own() {
        assert_eq!(chroot_losses(true).len(), 2);
        assert!(chroot_losses(false)[2].contains("container's network"));
    }
}
