//! The build cache index: cache key (64 hex digits, computed by the solver) → the layers that
//! make up the vertex's result.
//!
//! One small JSON file per key under `ROOT/cache/index/`, written atomically. A record names
//! layers by snapshot key, blob digest and diff ID, so a record can later be exported (local
//! directory, registry, inline) and imported on another machine by shipping the blobs it names:
//! nothing in it is specific to this host.

use std::path::{Path, PathBuf};

use kiln_dag::Digest;
use serde::{Deserialize, Serialize};

/// One layer of a result, bottom of the stack first in a [`Record`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Where the unpacked layer lives in the snapshot store (its chain ID when created).
    pub snapshot: Digest,
    /// The layer tar in the content store (uncompressed).
    pub blob: Digest,
    /// sha256 of the uncompressed tar (equal to `blob` for kiln's own layers).
    pub diff_id: Digest,
    pub size: u64,
    pub media_type: String,
    /// When the build made this result (RFC 3339), which a cache hit keeps: the image history
    /// dates each layer by it, as BuildKit dates a layer by its cache record. None for an
    /// image's own layers (their history says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

/// The stored result of one cache key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub layers: Vec<Layer>,
    /// Progress name of the vertex that produced it (for `kiln system df` and debugging).
    #[serde(default)]
    pub description: String,
}

/// Failures reading or writing the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("failed to create cache index directory `{path}`")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write cache index entry `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The on-disk index.
#[derive(Debug, Clone)]
pub struct CacheIndex {
    dir: PathBuf,
}

impl CacheIndex {
    /// The index in `dir`, which may not exist yet (reads then find nothing).
    pub fn at(dir: &Path) -> CacheIndex {
        CacheIndex {
            dir: dir.to_path_buf(),
        }
    }

    /// Opens (creating) the index in `dir`.
    pub fn open(dir: &Path) -> Result<CacheIndex, IndexError> {
        std::fs::create_dir_all(dir).map_err(|source| IndexError::CreateDir {
            path: dir.into(),
            source,
        })?;
        Ok(CacheIndex {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// The record for `key`; an unreadable or corrupt entry counts as a miss.
    pub fn get(&self, key: &str) -> Option<Record> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Stores `record` under `key` (atomically: temp file + rename).
    pub fn put(&self, key: &str, record: &Record) -> Result<(), IndexError> {
        let path = self.path(key);
        let tmp = self.dir.join(format!(".{key}.{}.tmp", std::process::id()));
        let bytes = serde_json::to_vec(record).unwrap_or_default();
        std::fs::write(&tmp, bytes).map_err(|source| IndexError::Write {
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            IndexError::Write {
                path: path.clone(),
                source,
            }
        })
    }

    /// Removes the record of `key` (a missing record is not an error).
    pub fn remove(&self, key: &str) {
        let _ = std::fs::remove_file(self.path(key));
    }

    /// Every record (for garbage collection: the snapshots and blobs they hold stay).
    pub fn all(&self) -> Vec<(String, Record)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".json")?.to_string();
                let rec = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                Some((name, rec))
            })
            .collect()
    }
}
