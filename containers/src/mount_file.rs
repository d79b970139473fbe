//! `ROOT/containers/<id>/mounts.json`: a created container's resolved mounts, written by
//! [`crate::mounts`] and read by it (`--volumes-from`, `inspect`) and by the volume store's
//! in-use check ([`crate::volumes`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kiln_runtime::MountSpec;
use serde::{Deserialize, Serialize};

pub(crate) const MOUNTS_FILE: &str = "mounts.json";

/// Errors of reading and writing `mounts.json`.
#[derive(Debug, thiserror::Error)]
pub enum MountFileError {
    /// `mounts.json` could not be read.
    #[error("failed to read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `mounts.json` is not what this module writes.
    #[error("failed to parse `{path}`")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// `mounts.json` could not be written.
    #[error("failed to write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, MountFileError>;

/// What a resolved mount is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A host path.
    Bind,
    /// A volume's `_data` dir, bind-mounted.
    Volume,
    /// A tmpfs.
    Tmpfs,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Bind => "bind",
            Kind::Volume => "volume",
            Kind::Tmpfs => "tmpfs",
        }
    }
}

/// A mount of a created container, as saved in `mounts.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedMount {
    /// What it is.
    pub kind: Kind,
    /// The volume's name.
    pub name: Option<String>,
    /// Host path mounted (empty for tmpfs).
    pub source: PathBuf,
    /// Absolute path in the container.
    pub target: String,
    /// Read-only.
    pub readonly: bool,
    /// An anonymous volume made for this container (removed with `rm -v` / `--rm`).
    #[serde(default)]
    pub anonymous: bool,
    /// tmpfs size in bytes.
    #[serde(default)]
    pub tmpfs_size: Option<u64>,
    /// tmpfs root mode.
    #[serde(default)]
    pub tmpfs_mode: Option<u32>,
}

impl ResolvedMount {
    /// The runtime's mount.
    pub fn to_spec(&self) -> MountSpec {
        match self.kind {
            Kind::Bind | Kind::Volume => MountSpec::Bind {
                source: self.source.clone(),
                target: self.target.clone(),
                readonly: self.readonly,
            },
            Kind::Tmpfs => MountSpec::Tmpfs {
                target: self.target.clone(),
                size: self.tmpfs_size,
                mode: self.tmpfs_mode,
            },
        }
    }

    /// An entry of Docker's `inspect` `Mounts` array.
    pub fn inspect_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "Type": self.kind.as_str(),
            "Source": self.source,
            "Destination": self.target,
            "Mode": if self.readonly { "ro" } else { "" },
            "RW": !self.readonly,
            "Propagation": if self.kind == Kind::Bind { "rprivate" } else { "" },
        });
        if let (Some(name), Some(obj)) = (&self.name, v.as_object_mut()) {
            obj.insert("Name".into(), serde_json::Value::String(name.clone()));
            obj.insert("Driver".into(), serde_json::Value::String("local".into()));
        }
        v
    }
}

/// Writes `mounts.json` into a container directory (created if missing).
pub fn save_dir(dir: &Path, mounts: &[ResolvedMount]) -> Result<()> {
    let path = dir.join(MOUNTS_FILE);
    fs::create_dir_all(dir).map_err(|source| MountFileError::Write {
        path: path.clone(),
        source,
    })?;
    let bytes = serde_json::to_vec_pretty(mounts).map_err(|source| MountFileError::Parse {
        path: path.clone(),
        source,
    })?;
    kiln_cache::paths::write_atomic(&path, &bytes, false).map_err(|e| MountFileError::Write {
        path: e.path,
        source: e.source,
    })
}

/// Reads a container directory's `mounts.json` (empty when the container has none yet).
pub fn load_dir(dir: &Path) -> Result<Vec<ResolvedMount>> {
    let path = dir.join(MOUNTS_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
            return Ok(Vec::new())
        }
        Err(source) => return Err(MountFileError::Read { path, source }),
    };
    serde_json::from_slice(&bytes).map_err(|source| MountFileError::Parse { path, source })
}

/// The resolved mounts of a container (empty if it has none or was never resolved).
pub fn load(store_root: &Path, container_id: &str) -> Result<Vec<ResolvedMount>> {
    load_dir(&store_root.join("containers").join(container_id))
}
