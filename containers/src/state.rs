//! The mutable state of a container (`ROOT/containers/<id>/state.json`), written atomically,
//! and the checks that tell a live supervisor from a stale record.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Docker's container statuses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Created, never started.
    #[default]
    Created,
    /// The process runs.
    Running,
    /// Waiting to be started again by the restart policy.
    Restarting,
    /// The process ended.
    Exited,
    /// The supervisor vanished while the process was alive: nobody owns it any more.
    Dead,
}

impl Status {
    /// The lower-case word Docker uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Restarting => "restarting",
            Status::Exited => "exited",
            Status::Dead => "dead",
        }
    }
}

/// What changes while a container lives.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ContainerState {
    /// The status.
    pub status: Status,
    /// Whether the process runs (`status == running`).
    pub running: bool,
    /// Host pid of the container's pid 1 (0 when not running).
    pub pid: i32,
    /// Exit code of the last run (128+signal for a signal).
    pub exit_code: i32,
    /// When the last run started (RFC 3339, empty if never).
    pub started_at: String,
    /// When the last run ended (RFC 3339, empty if never).
    pub finished_at: String,
    /// Restarts done by the restart policy since the last `start`.
    pub restart_count: u32,
    /// Pid of the supervisor process (0 when none).
    pub supervisor_pid: i32,
    /// The supervisor's start time in clock ticks after boot (`/proc/PID/stat` field 22), so a
    /// reused pid is not mistaken for it.
    pub supervisor_start: u64,
    /// Why the last start failed, or why the state was settled.
    pub error: String,
    /// The user stopped the container (`stop`, `kill`, `rm -f`): the restart policy does not
    /// apply to the coming exit.
    pub stop_requested: bool,
    /// The process was killed by the OOM killer.
    #[serde(rename = "OOMKilled")]
    pub oom_killed: bool,
    /// The network endpoint the network code set up (its serde form), if any: present while
    /// the container runs on the bridge.
    pub network: Option<serde_json::Value>,
    /// The ports published for the current run (`-p`, `-P`), empty when not running.
    pub ports: Vec<kiln_runtime::net::PublishedPort>,
    /// The health check's state while a container with a `HEALTHCHECK` runs (Docker's
    /// `State.Health`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// The start time of `pid` (clock ticks after boot), so a reused pid is never signalled.
    pub pid_start: u64,
}

/// Docker's health statuses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Within the start period, or no probe has finished yet.
    #[default]
    Starting,
    /// The last probe passed.
    Healthy,
    /// `retries` probes in a row failed.
    Unhealthy,
}

impl HealthStatus {
    /// Docker's word.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Starting => "starting",
            HealthStatus::Healthy => "healthy",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }
}

/// `State.Health` as Docker shapes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Health {
    /// The status.
    pub status: HealthStatus,
    /// Failed probes in a row.
    pub failing_streak: u32,
    /// The last 5 probes, oldest first.
    pub log: Vec<HealthLog>,
}

/// One probe's result.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthLog {
    /// When it started (RFC 3339, nanoseconds).
    pub start: String,
    /// When it ended.
    pub end: String,
    /// Its exit code (-1 when it timed out or could not start).
    pub exit_code: i32,
    /// Its output (stdout and stderr), at most 4 KiB.
    pub output: String,
}

/// A failure reading or writing `state.json`.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading failed.
    #[error("failed to read `{path}`")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a state.
    #[error("failed to parse `{path}`")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Writing failed.
    #[error("failed to write `{path}`")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Reads `dir/state.json` (a missing file is a `created` state).
pub fn read(dir: &Path) -> Result<ContainerState, StateError> {
    let path = dir.join("state.json");
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ContainerState::default()),
        Err(source) => return Err(StateError::Read { path, source }),
    };
    serde_json::from_slice(&bytes).map_err(|source| StateError::Parse { path, source })
}

/// Writes `dir/state.json` atomically (temp file + rename).
pub fn write(dir: &Path, st: &ContainerState) -> Result<(), StateError> {
    let path = dir.join("state.json");
    let bytes = serde_json::to_vec(st).map_err(|source| StateError::Parse {
        path: path.clone(),
        source,
    })?;
    kiln_cache::paths::write_atomic(&path, &bytes, false).map_err(|e| StateError::Write {
        path: e.path,
        source: e.source,
    })
}

/// The start time of `pid` in clock ticks after boot, `None` if no such process (or a zombie).
pub fn process_start(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` may contain spaces and parentheses: fields restart after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // After `)`: state is field 3; starttime is field 22.
    fields.nth(18)?.parse().ok()
}

/// Whether the supervisor recorded in `st` is still the live process it was. One with SIGKILL
/// pending counts as gone: `kill -9` returns before the process has exited (a loaded machine
/// or a thread in the kernel delays it), and what the next command reports must already be true.
pub fn supervisor_alive(st: &ContainerState) -> bool {
    st.supervisor_pid > 0
        && process_start(st.supervisor_pid) == Some(st.supervisor_start)
        && !sigkill_pending(st.supervisor_pid)
}

/// Whether SIGKILL is pending for `pid` (its main thread's or the process's pending set).
fn sigkill_pending(pid: i32) -> bool {
    const SIGKILL_BIT: u64 = 1 << (9 - 1);
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status.lines().any(|l| {
        let Some(mask) = l.strip_prefix("SigPnd:").or_else(|| l.strip_prefix("ShdPnd:")) else {
            return false;
        };
        u64::from_str_radix(mask.trim(), 16).is_ok_and(|m| m & SIGKILL_BIT != 0)
    })
}

/// Whether `st` says running (or restarting) while its supervisor is gone: a supervisor killed
/// with SIGKILL (or a foreground `kiln run` killed so) left its container without an owner.
pub fn orphaned(st: &ContainerState) -> bool {
    matches!(st.status, Status::Running | Status::Restarting) && !supervisor_alive(st)
}

/// Whether the container's pid 1 recorded in `st` is still that process.
fn process_alive(st: &ContainerState) -> bool {
    match process_start(st.pid) {
        None => false,
        Some(start) => st.pid_start == 0 || start == st.pid_start,
    }
}

/// Adopts an orphaned container (see [`orphaned`]) and ends it as its supervisor would have:
/// SIGKILL to its pid 1 (the kernel then kills every process of its pid namespace), a wait until
/// it is gone, its network namespace file removed (the address is reclaimed with it, the veth
/// goes with the namespace), and the state written as exited with 137. The caller holds the
/// container's lock and passes the state read under it.
pub fn reap_orphan(dir: &Path, mut st: ContainerState) -> Result<ContainerState, StateError> {
    if !orphaned(&st) {
        return Ok(st);
    }
    let mut killed = false;
    if st.pid > 0 && process_alive(&st) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(st.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        killed = true;
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while process_alive(&st) && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if process_alive(&st) {
            // Not ours to kill (another user's, or stuck in the kernel): report it as it is.
            return Ok(settle(st));
        }
    }
    if let Some(ep) = st
        .network
        .take()
        .and_then(|v| serde_json::from_value::<kiln_runtime::net::Endpoint>(v).ok())
    {
        if let Err(e) = kiln_runtime::net::netns::remove(&ep.netns) {
            tracing::warn!("failed to remove the network namespace of an orphaned container: {e}");
        }
    }
    st.status = Status::Exited;
    st.running = false;
    st.pid = 0;
    st.pid_start = 0;
    st.supervisor_pid = 0;
    st.supervisor_start = 0;
    st.ports.clear();
    st.health = None;
    if killed || st.exit_code == 0 {
        st.exit_code = 137;
    }
    st.finished_at = crate::now_rfc3339();
    st.error = "the container's supervisor was killed; kiln stopped the container".into();
    write(dir, &st)?;
    Ok(st)
}

/// Reports a state whose supervisor is gone as it really is: `exited` when the process is gone
/// too, `dead` when the process outlived its supervisor. A state that is not running is returned
/// unchanged.
pub fn settle(mut st: ContainerState) -> ContainerState {
    if !matches!(st.status, Status::Running | Status::Restarting) || supervisor_alive(&st) {
        return st;
    }
    let process_alive = st.pid > 0 && process_start(st.pid).is_some();
    st.running = false;
    st.supervisor_pid = 0;
    if process_alive {
        st.status = Status::Dead;
        st.error = "the container's supervisor exited while the container was running".into();
    } else {
        st.status = Status::Exited;
        st.pid = 0;
        if st.error.is_empty() {
            st.error = "the container's supervisor exited unexpectedly".into();
        }
        if st.exit_code == 0 {
            st.exit_code = 255;
        }
        if st.finished_at.is_empty() {
            st.finished_at = crate::now_rfc3339();
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_missing_is_created() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(read(t.path()).unwrap().status, Status::Created);
        let st = ContainerState {
            status: Status::Exited,
            exit_code: 3,
            ..Default::default()
        };
        write(t.path(), &st).unwrap();
        assert_eq!(read(t.path()).unwrap(), st);
        let json = fs::read_to_string(t.path().join("state.json")).unwrap();
        assert!(
            json.contains("\"Status\":\"exited\"") && json.contains("\"OOMKilled\""),
            "{json}"
        );
    }

    #[test]
    fn stale_running_state_settles() {
        let me = std::process::id() as i32;
        let live = ContainerState {
            status: Status::Running,
            running: true,
            pid: me,
            supervisor_pid: me,
            supervisor_start: process_start(me).unwrap(),
            ..Default::default()
        };
        assert_eq!(settle(live.clone()), live);
        // A supervisor pid whose start time does not match is a different process.
        let stale = ContainerState {
            supervisor_start: live.supervisor_start + 1,
            pid: 0,
            ..live.clone()
        };
        let s = settle(stale);
        assert_eq!(s.status, Status::Exited);
        assert!(!s.running && !s.error.is_empty());
        let orphan = ContainerState {
            supervisor_pid: 0,
            ..live
        };
        assert_eq!(settle(orphan).status, Status::Dead);
    }
}
