//! Containers of `kiln run`: their records and state under the store root, the per-container
//! supervisor process, and the lifecycle operations (create, start, stop, kill, rm, logs...).
//!
//! Depends on the store (images, snapshots) and the runtime (namespaces, overlay); knows nothing
//! of Dockerfiles.
#![forbid(unsafe_code)]

pub mod fs;
pub mod health;
pub mod lifecycle;
pub mod logs;
pub mod messages;
pub mod mount_file;
pub mod mounts;
pub mod record;
pub mod state;
pub mod supervisor;
pub mod volumes;

pub use record::{
    ContainerRecord, Containers, HostConfig, RecordError, RestartName, RestartPolicy, RootfsPaths,
};
pub use state::{ContainerState, Status};

/// The current time in RFC 3339 with nanoseconds, as Docker writes `StartedAt`/`FinishedAt`.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
