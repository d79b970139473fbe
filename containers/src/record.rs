//! The container record (`ROOT/containers/<id>/config.json`) and the container directory store.
//!
//! A record is written when the container is created and rewritten (atomically) only by
//! `rename`; what changes while the container lives is its [`ContainerState`] in `state.json`
//! next to it.
//!
//! Architecture Invariant: a container directory holds `config.json` only once the record is
//! complete (it is written to a temp file and renamed), so a reader never sees half a record; a
//! directory without one is a creation in progress or its leftover.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use kiln_cache::paths::write_atomic;
use kiln_dag::image::ContainerConfig;
use kiln_dag::Digest;
use serde::{Deserialize, Serialize};

use crate::state::{self, ContainerState, StateError};

/// Everything fixed about a container when it is created.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerRecord {
    /// 64 lowercase hex digits.
    pub id: String,
    /// The name, without Docker's leading `/`.
    pub name: String,
    /// Creation time, RFC 3339.
    pub created: String,
    /// The image's manifest digest (`"Image": "sha256:.."`, which the image store reads to find
    /// the images containers use).
    pub image: Digest,
    /// The image's ID (config digest).
    #[serde(default)]
    pub image_id: Option<Digest>,
    /// The image as the user named it (`busybox:local`).
    pub image_name: String,
    /// The effective config: the image's, with the command line's overrides applied.
    pub config: ContainerConfig,
    /// The argv to run (ENTRYPOINT + CMD after Docker's rules).
    pub args: Vec<String>,
    /// Options about the container's host side.
    pub host: HostConfig,
    /// The overlay making up the container's root filesystem.
    pub rootfs: RootfsPaths,
}

impl ContainerRecord {
    /// The first 12 hex digits of the ID.
    pub fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }

    /// `Path` in Docker's inspect: `argv[0]`.
    pub fn path(&self) -> &str {
        self.args.first().map(String::as_str).unwrap_or("")
    }

    /// The signal `kiln stop` sends: `--stop-signal`, else the image's `STOPSIGNAL`, else SIGTERM.
    pub fn stop_signal(&self) -> &str {
        if !self.host.stop_signal.is_empty() {
            &self.host.stop_signal
        } else if !self.config.stop_signal.is_empty() {
            &self.config.stop_signal
        } else {
            "SIGTERM"
        }
    }

    /// Seconds `kiln stop` waits before SIGKILL: `--stop-timeout`, else 10 like Docker.
    pub fn stop_timeout(&self) -> u64 {
        self.host.stop_timeout.unwrap_or(10)
    }
}

/// The restart policy names of `--restart`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartName {
    /// Never restart (`no`, Docker's default; serialized as `"no"`).
    #[default]
    #[serde(rename = "no")]
    No,
    /// Restart whenever the process exits, unless stopped by the user.
    Always,
    /// Like `always`, but not after a user stop even across restarts of the supervisor.
    UnlessStopped,
    /// Restart when the process exits with a non-zero code, at most `maximum_retry_count` times
    /// (0: without limit).
    OnFailure,
}

/// `--restart`, as Docker records it in `HostConfig.RestartPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RestartPolicy {
    /// The policy.
    pub name: RestartName,
    /// `on-failure:N`'s N (0: no limit).
    pub maximum_retry_count: u32,
}

/// A `--restart` value that is not one of Docker's policies.
#[derive(Debug, thiserror::Error)]
pub enum RestartPolicyError {
    /// An unknown policy name.
    #[error("invalid restart policy '{0}'")]
    Unknown(String),
    /// `on-failure:N` with a bad N, or a count on a policy that takes none.
    #[error("invalid restart policy '{0}': maximum retry count must be a non-negative integer and only applies to on-failure")]
    Count(String),
}

impl RestartPolicy {
    /// Parses `no`, `always`, `unless-stopped`, `on-failure[:N]`.
    pub fn parse(s: &str) -> Result<RestartPolicy, RestartPolicyError> {
        let (name, count) = match s.split_once(':') {
            Some((n, c)) => (n, Some(c)),
            None => (s, None),
        };
        let name = match name {
            "" | "no" => RestartName::No,
            "always" => RestartName::Always,
            "unless-stopped" => RestartName::UnlessStopped,
            "on-failure" => RestartName::OnFailure,
            _ => return Err(RestartPolicyError::Unknown(s.to_string())),
        };
        let maximum_retry_count = match count {
            None => 0,
            Some(c) if name == RestartName::OnFailure => c
                .parse::<u32>()
                .map_err(|_| RestartPolicyError::Count(s.to_string()))?,
            Some(_) => return Err(RestartPolicyError::Count(s.to_string())),
        };
        Ok(RestartPolicy {
            name,
            maximum_retry_count,
        })
    }

    /// Whether a process that ended with `exit_code`, after `restart_count` restarts so far,
    /// is started again. `manually_stopped`: the user ran `kiln stop` (or `kill`, `rm -f`).
    pub fn should_restart(&self, exit_code: i32, restart_count: u32, manually_stopped: bool) -> bool {
        if manually_stopped {
            return false;
        }
        match self.name {
            RestartName::No => false,
            RestartName::Always | RestartName::UnlessStopped => true,
            RestartName::OnFailure => {
                exit_code != 0 && (self.maximum_retry_count == 0 || restart_count < self.maximum_retry_count)
            }
        }
    }

    /// Whether any restart can happen.
    pub fn is_none(&self) -> bool {
        self.name == RestartName::No
    }
}

/// The host side of a container, Docker's `HostConfig` (with kiln's spelling of the fields).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HostConfig {
    /// `--rm`.
    pub auto_remove: bool,
    /// `--restart`.
    pub restart_policy: RestartPolicy,
    /// `--network`: `default`, `bridge`, `host`, `none`, `container:<id>`.
    pub network_mode: String,
    /// `-p` as written (`[ip:]host[-range]:ctr[/proto]`), parsed by the network code.
    pub port_bindings: Vec<String>,
    /// `-P`.
    pub publish_all_ports: bool,
    /// `-v`, `--mount`, `--tmpfs`, `--volumes-from` requests, in the volume code's serde form.
    pub mounts: Vec<serde_json::Value>,
    /// `--cap-add`, upper case without `CAP_`.
    pub cap_add: Vec<String>,
    /// `--cap-drop`.
    pub cap_drop: Vec<String>,
    /// `--privileged`.
    pub privileged: bool,
    /// `--security-opt` values, a seccomp profile file given as its JSON text (as the Docker
    /// client sends it); parsed by `kiln_runtime::seccomp::parse_security_opts`.
    pub security_opt: Vec<String>,
    /// `--init`.
    pub init: bool,
    /// `--memory` in bytes.
    pub memory: Option<u64>,
    /// `--cpus`.
    pub cpus: Option<f64>,
    /// `--pids-limit`.
    pub pids_limit: Option<i64>,
    /// `--read-only`.
    pub read_only_rootfs: bool,
    /// `--stop-signal` (empty: the image's, else SIGTERM).
    pub stop_signal: String,
    /// `--stop-timeout` in seconds.
    pub stop_timeout: Option<u64>,
    /// `-t`.
    pub tty: bool,
    /// `-i`.
    pub open_stdin: bool,
    /// `--link NAME[:ALIAS]` as written.
    pub links: Vec<String>,
    /// `-h/--hostname` (empty: the short ID).
    pub hostname: String,
    /// `--add-host` entries `name:ip`.
    pub extra_hosts: Vec<String>,
}

/// The container's overlay: the image's snapshot dirs plus a writable upper dir of its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RootfsPaths {
    /// Snapshot dirs of the image, top layer first (empty for an image without layers).
    pub lower: Vec<PathBuf>,
    /// `ROOT/containers/<id>/upper`.
    pub upper: PathBuf,
    /// `ROOT/containers/<id>/work`.
    pub work: PathBuf,
}

/// A failure reading or writing container records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// No container has that name, ID or ID prefix (Docker's message).
    #[error("No such container: {0}")]
    NoSuchContainer(String),
    /// An ID prefix matching more than one container.
    #[error("multiple containers match the prefix `{0}`")]
    Ambiguous(String),
    /// The name is taken (Docker's message).
    #[error("Conflict. The container name \"/{name}\" is already in use by container \"{id}\". You have to remove (or rename) that container to be able to reuse that name.")]
    NameConflict {
        /// The name.
        name: String,
        /// The container holding it.
        id: String,
    },
    /// A name Docker would refuse.
    #[error("Invalid container name ({0}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")]
    InvalidName(String),
    /// Creating a directory failed.
    #[error("failed to create `{path}`")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Listing the containers directory failed.
    #[error("failed to list `{path}`")]
    List {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading a record failed.
    #[error("failed to read `{path}`")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A record is not valid JSON of the expected shape.
    #[error("failed to parse `{path}`")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Writing a record failed.
    #[error("failed to write `{path}`")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Taking a lock failed.
    #[error("failed to lock `{path}`")]
    Lock {
        /// The locked file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Removing a container's directory failed.
    #[error("failed to remove `{path}`")]
    Remove {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The state file could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
}

/// An exclusive `flock` on a container directory (or the names lock), released on drop.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// The containers under one store root.
#[derive(Clone, Debug)]
pub struct Containers {
    root: PathBuf,
    dir: PathBuf,
}

/// Whether `name` is a name Docker accepts: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn is_full_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Containers {
    /// The containers of the store at `store_root` (`store_root/containers`, created if missing).
    pub fn open(store_root: &Path) -> Result<Containers, RecordError> {
        let dir = store_root.join("containers");
        fs::create_dir_all(&dir).map_err(|source| RecordError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        Ok(Containers {
            root: store_root.to_path_buf(),
            dir,
        })
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `ROOT/containers/<id>`.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Reads the record of the container with exactly this ID.
    pub fn get(&self, id: &str) -> Result<ContainerRecord, RecordError> {
        let path = self.dir(id).join("config.json");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
                return Err(RecordError::NoSuchContainer(id.to_string()))
            }
            Err(source) => return Err(RecordError::Read { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|source| RecordError::Parse { path, source })
    }

    /// Every container with a complete record, newest first.
    pub fn list(&self) -> Result<Vec<ContainerRecord>, RecordError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| RecordError::List {
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| RecordError::List {
                path: self.dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            let Some(id) = name.to_str().filter(|n| is_full_id(n)) else {
                continue;
            };
            match self.get(id) {
                Ok(r) => out.push(r),
                // Removed meanwhile, or still being created.
                Err(RecordError::NoSuchContainer(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Finds a container as Docker does: full ID, then exact name (with or without `/`), then a
    /// unique ID prefix.
    pub fn lookup(&self, key: &str) -> Result<ContainerRecord, RecordError> {
        if is_full_id(key) {
            match self.get(key) {
                Err(RecordError::NoSuchContainer(_)) => {}
                other => return other,
            }
        }
        let all = self.list()?;
        let name = key.strip_prefix('/').unwrap_or(key);
        if let Some(r) = all.iter().find(|r| r.name == name) {
            return Ok(r.clone());
        }
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RecordError::NoSuchContainer(key.to_string()));
        }
        let mut matches = all.into_iter().filter(|r| r.id.starts_with(key));
        match (matches.next(), matches.next()) {
            (Some(r), None) => Ok(r),
            (Some(_), Some(_)) => Err(RecordError::Ambiguous(key.to_string())),
            (None, _) => Err(RecordError::NoSuchContainer(key.to_string())),
        }
    }

    /// The container's current state. A container whose supervisor is gone while it runs is
    /// adopted and stopped here ([`state::reap_orphan`]), so every command sees, and acts on, a
    /// state that is true.
    pub fn state(&self, id: &str) -> Result<ContainerState, RecordError> {
        let dir = self.dir(id);
        let st = state::read(&dir)?;
        if !state::orphaned(&st) {
            return Ok(st);
        }
        let _lock = self.lock(id)?;
        self.state_locked(id)
    }

    /// [`Containers::state`] for a caller already holding [`Containers::lock`].
    pub fn state_locked(&self, id: &str) -> Result<ContainerState, RecordError> {
        let dir = self.dir(id);
        let st = state::read(&dir)?;
        Ok(state::reap_orphan(&dir, st)?)
    }

    /// Applies `f` to the stored state under the container's lock and writes it back.
    pub fn update_state(
        &self,
        id: &str,
        f: impl FnOnce(&mut ContainerState),
    ) -> Result<ContainerState, RecordError> {
        let _lock = self.lock(id)?;
        self.update_state_locked(id, f)
    }

    /// [`Containers::update_state`] for a caller already holding [`Containers::lock`].
    pub fn update_state_locked(
        &self,
        id: &str,
        f: impl FnOnce(&mut ContainerState),
    ) -> Result<ContainerState, RecordError> {
        let dir = self.dir(id);
        let mut st = state::read(&dir)?;
        f(&mut st);
        state::write(&dir, &st)?;
        Ok(st)
    }

    /// Takes the exclusive lock on the container's directory that serialises lifecycle
    /// operations on it.
    pub fn lock(&self, id: &str) -> Result<DirLock, RecordError> {
        let path = self.dir(id);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RecordError::NoSuchContainer(id.to_string()))
            }
            Err(source) => return Err(RecordError::Lock { path, source }),
        };
        file.lock().map_err(|source| RecordError::Lock { path, source })?;
        Ok(DirLock { _file: file })
    }

    /// Takes the lock serialising name assignment (`ROOT/containers.lock`).
    pub fn names_lock(&self) -> Result<DirLock, RecordError> {
        let path = self.root.join("containers.lock");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| RecordError::Lock {
                path: path.clone(),
                source,
            })?;
        file.lock().map_err(|source| RecordError::Lock { path, source })?;
        Ok(DirLock { _file: file })
    }

    /// Stores a new container: checks its name is free, creates its directory with `upper` and
    /// `work`, writes `config.json` and a `created` state. On failure nothing is left behind.
    pub fn create(&self, record: &ContainerRecord) -> Result<(), RecordError> {
        if !valid_name(&record.name) {
            return Err(RecordError::InvalidName(record.name.clone()));
        }
        let _names = self.names_lock()?;
        if let Some(other) = self.list()?.into_iter().find(|r| r.name == record.name) {
            return Err(RecordError::NameConflict {
                name: record.name.clone(),
                id: other.id,
            });
        }
        let dir = self.dir(&record.id);
        let result = (|| {
            for sub in [&record.rootfs.upper, &record.rootfs.work] {
                fs::create_dir_all(sub).map_err(|source| RecordError::CreateDir {
                    path: sub.clone(),
                    source,
                })?;
            }
            state::write(&dir, &ContainerState::default())?;
            let bytes = serde_json::to_vec_pretty(record).map_err(|source| RecordError::Parse {
                path: dir.join("config.json"),
                source,
            })?;
            write_atomic(&dir.join("config.json"), &bytes, false).map_err(|e| RecordError::Write {
                path: e.path,
                source: e.source,
            })
        })();
        if result.is_err() {
            let _ = remove_tree(&dir);
        }
        result
    }

    /// Renames container `id` to `new_name` (`kiln rename`): the only rewrite of a record, done
    /// atomically under the names lock like a create.
    pub fn rename(&self, id: &str, new_name: &str) -> Result<(), RecordError> {
        let new_name = new_name.strip_prefix('/').unwrap_or(new_name);
        if !valid_name(new_name) {
            return Err(RecordError::InvalidName(new_name.to_string()));
        }
        let _names = self.names_lock()?;
        if let Some(other) = self.list()?.into_iter().find(|r| r.name == new_name) {
            return Err(RecordError::NameConflict {
                name: new_name.to_string(),
                id: other.id,
            });
        }
        let mut record = self.get(id)?;
        record.name = new_name.to_string();
        let path = self.dir(id).join("config.json");
        let bytes = serde_json::to_vec_pretty(&record).map_err(|source| RecordError::Parse {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &bytes, false).map_err(|e| RecordError::Write {
            path: e.path,
            source: e.source,
        })
    }

    /// Removes a container's directory (record, state, logs, upper dir).
    pub fn remove_dir(&self, id: &str) -> Result<(), RecordError> {
        let dir = self.dir(id);
        // The record goes first so that the container vanishes from listings at once.
        match fs::remove_file(dir.join("config.json")) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RecordError::Remove {
                    path: dir.join("config.json"),
                    source,
                })
            }
        }
        remove_tree(&dir).map_err(|source| RecordError::Remove { path: dir, source })
    }
}

/// Removes `dir` recursively; overlay leaves `work/work` with mode 000, which is opened first.
fn remove_tree(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let ww = dir.join("work/work");
    if ww.exists() {
        let _ = fs::set_permissions(&ww, fs::Permissions::from_mode(0o700));
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A fresh container ID: 64 hex digits from the pid, the time and a counter.
pub fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.finalize().to_hex().to_string()
}

const ADJECTIVES: &[&str] = &[
    "amber", "brave", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly", "keen", "lucid",
    "mellow", "nimble", "odd", "proud", "quiet", "rapid", "sunny", "tidy", "upbeat", "vivid", "witty",
    "young", "zesty",
];
const NOUNS: &[&str] = &[
    "anvil", "bellows", "crucible", "ember", "flux", "forge", "glaze", "hearth", "ingot", "kettle", "lathe",
    "mold", "oven", "pottery", "quench", "rivet", "slag", "tongs", "vessel", "wick",
];

/// A random `adjective_noun` name not used by any container in `taken`.
pub fn generate_name(id: &str, taken: &[ContainerRecord]) -> String {
    let seed = u64::from_str_radix(id.get(..16).unwrap_or("0"), 16).unwrap_or(0);
    for attempt in 0u64.. {
        let n = seed.wrapping_add(attempt.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let adj = ADJECTIVES[(n % ADJECTIVES.len() as u64) as usize];
        let noun = NOUNS[((n / ADJECTIVES.len() as u64) % NOUNS.len() as u64) as usize];
        let name = if attempt < 50 {
            format!("{adj}_{noun}")
        } else {
            format!("{adj}_{noun}{}", attempt % 1000)
        };
        if !taken.iter().any(|r| r.name == name) {
            return name;
        }
    }
    format!("kiln_{}", id.get(..12).unwrap_or(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policies_parse_and_decide() {
        let p = RestartPolicy::parse("on-failure:2").unwrap();
        assert_eq!(p.name, RestartName::OnFailure);
        assert!(p.should_restart(1, 0, false));
        assert!(p.should_restart(1, 1, false));
        assert!(!p.should_restart(1, 2, false));
        assert!(!p.should_restart(0, 0, false));
        assert!(RestartPolicy::parse("always")
            .unwrap()
            .should_restart(0, 9, false));
        assert!(!RestartPolicy::parse("always").unwrap().should_restart(0, 9, true));
        assert!(RestartPolicy::parse("no").unwrap().is_none());
        assert!(RestartPolicy::parse("sometimes").is_err());
        assert!(RestartPolicy::parse("always:3").is_err());
        assert!(RestartPolicy::parse("on-failure:x").is_err());
    }

    #[test]
    fn names_follow_docker_rules() {
        assert!(valid_name("web-1.a_b"));
        assert!(!valid_name("-x"));
        assert!(!valid_name("a"));
        assert!(!valid_name("a/b"));
    }

    fn record(c: &Containers, name: &str) -> ContainerRecord {
        let id = new_id();
        ContainerRecord {
            name: name.into(),
            created: "2024-01-01T00:00:00Z".into(),
            image: Digest::of(b"m"),
            image_id: None,
            image_name: "img".into(),
            config: ContainerConfig::default(),
            args: vec!["true".into()],
            host: HostConfig::default(),
            rootfs: RootfsPaths {
                lower: vec![],
                upper: c.dir(&id).join("upper"),
                work: c.dir(&id).join("work"),
            },
            id,
        }
    }

    #[test]
    fn create_lookup_conflict_remove() {
        let t = tempfile::tempdir().unwrap();
        let c = Containers::open(t.path()).unwrap();
        let r = record(&c, "web");
        c.create(&r).unwrap();
        assert_eq!(c.lookup("web").unwrap().id, r.id);
        assert_eq!(c.lookup("/web").unwrap().id, r.id);
        assert_eq!(c.lookup(&r.id[..5]).unwrap().id, r.id);
        assert_eq!(c.lookup(&r.id).unwrap().name, "web");
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(c.dir(&r.id).join("config.json")).unwrap()).unwrap();
        assert_eq!(json["Image"], Digest::of(b"m").to_string());
        let err = c.create(&record(&c, "web")).unwrap_err();
        assert!(err.to_string().contains("\"/web\" is already in use"), "{err}");
        assert_eq!(c.list().unwrap().len(), 1);
        c.remove_dir(&r.id).unwrap();
        assert!(matches!(c.lookup("web"), Err(RecordError::NoSuchContainer(_))));
        assert_eq!(
            c.lookup("nope").unwrap_err().to_string(),
            "No such container: nope"
        );
    }
}
