//! Linux execution: namespaces, overlay, pivot_root, exec.
//!
//! The runtime takes a fully-resolved [`ContainerSpec`] and runs one process in its own mount,
//! pid, uts and ipc namespaces (and network namespace unless it shares the host's), over an
//! overlay of the given snapshot chain, with Docker's `/proc`, `/dev`, `/sys`, capabilities and
//! masked paths. It knows nothing of Dockerfiles or the store.
//!
//! ```no_run
//! # fn demo(stdout: std::os::fd::OwnedFd, stderr: std::os::fd::OwnedFd) -> Result<(), kiln_runtime::RuntimeError> {
//! use kiln_runtime::*;
//! let spec = ContainerSpec {
//!     rootfs: Rootfs::Overlay { lower: vec!["/snap/1".into()], upper: "/snap/2/fs".into(), work: "/snap/2/work".into() },
//!     readonly_rootfs: false,
//!     args: vec!["sh".into(), "-c".into(), "echo hi".into()],
//!     env: vec!["PATH=/usr/bin:/bin".into()],
//!     cwd: "/".into(),
//!     user: String::new(),
//!     hostname: "buildkitsandbox".into(),
//!     mounts: vec![],
//!     network: Network::Host,
//!     security: Security::Default,
//!     etc_files: EtcFiles::default(),
//!     stdin: None,
//!     stdout,
//!     stderr,
//!     options: RunOptions::default(),
//! };
//! let status = start(spec, std::path::Path::new("/tmp/scratch"))?.wait()?;
//! assert!(status.success());
//! # Ok(()) }
//! ```
//!
//! Architecture Invariant: only [`sys`] contains `unsafe`; everything else is checked by
//! `#![deny(unsafe_code)]`.
#![deny(unsafe_code)]

pub mod binfmt;
pub mod caps;
pub mod cgroup;
pub mod exec;
pub mod host;
pub mod hostmount;
pub mod init;
pub mod isolation;
pub mod layers;
pub mod net;
pub mod plan;
pub mod sandbox;
pub mod seccomp;
pub mod snapshotter;
pub mod spec;
#[allow(unsafe_code)]
pub mod sys;
pub mod tty;
pub mod unixtime;
pub mod userns;
pub mod users;

pub use sandbox::{start, ExitStatus, Running, RuntimeError};
pub use spec::{
    CgroupSpec, ContainerSpec, EtcFiles, Isolation, MountSpec, Network, Rlimit, Rootfs, RunOptions, Security,
};
pub use users::{lookup_group, lookup_user, resolve_user, Groups, ResolvedUser, UserError};
