//! The build cache index: cache key (64 hex digits, computed by the solver) → the layers that
//! make up the vertex's result.
//!
//! One small JSON file per key under `ROOT/cache/index/`, written atomically. A record names
//! layers by snapshot key, blob digest and diff ID, so a record can later be exported (local
//! directory, registry, inline) and imported on another machine by shipping the blobs it names:
//! nothing in it is specific to this host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

impl From<crate::paths::PathError> for IndexError {
    fn from(e: crate::paths::PathError) -> IndexError {
        IndexError::Write {
            path: e.path,
            source: e.source,
        }
    }
}

/// When a cache record was made and used, from the index's usage log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// First use (its creation), milliseconds since the epoch.
    pub first: i64,
    /// Last use (a lookup that found it, or its creation), milliseconds since the epoch.
    pub last: i64,
    /// Lookups that found it, its creation included.
    pub count: u64,
}

impl Usage {
    fn merge(&mut self, other: Usage) {
        if self.count == 0 {
            *self = other;
            return;
        }
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
        self.count += other.count;
    }
}

/// The on-disk index.
///
/// Next to the records, `.usage` logs every record's creation and every lookup that found it,
/// one line each (`FIRST LAST COUNT KEY`, times in milliseconds since the epoch, appended with `O_APPEND`, so concurrent builds never
/// interleave a line): `kiln builder du` reads last-used times and usage counts from it, and
/// pruning by age or by size removes the least recently used records first. Garbage collection
/// rewrites it with one line per remaining record. `.tmp/` holds records being written.
#[derive(Debug, Clone)]
pub struct CacheIndex {
    dir: PathBuf,
    log: Arc<Mutex<Option<std::fs::File>>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl CacheIndex {
    /// The index in `dir`, which may not exist yet (reads then find nothing).
    pub fn at(dir: &Path) -> CacheIndex {
        CacheIndex {
            dir: dir.to_path_buf(),
            log: Arc::new(Mutex::new(None)),
        }
    }

    /// Opens (creating) the index in `dir`.
    pub fn open(dir: &Path) -> Result<CacheIndex, IndexError> {
        std::fs::create_dir_all(dir).map_err(|source| IndexError::CreateDir {
            path: dir.into(),
            source,
        })?;
        Ok(CacheIndex::at(dir))
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    fn usage_path(&self) -> PathBuf {
        self.dir.join(".usage")
    }

    /// Logs a use of `key` (best effort: a lost line only makes the record look older).
    fn note_use(&self, key: &str) {
        use std::io::Write as _;
        let mut guard = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(self.usage_path())
                .ok();
        }
        if let Some(f) = guard.as_mut() {
            let now = now_ms();
            let _ = f.write_all(format!("{now} {now} 1 {key}\n").as_bytes());
        }
    }

    /// The record for `key`; an unreadable or corrupt entry counts as a miss. A hit is logged
    /// as a use of the record.
    pub fn get(&self, key: &str) -> Option<Record> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        let record = serde_json::from_slice(&bytes).ok()?;
        self.note_use(key);
        Some(record)
    }

    /// Stores `record` under `key` (atomically: a temp file in `.tmp/`, then a rename).
    pub fn put(&self, key: &str, record: &Record) -> Result<(), IndexError> {
        let path = self.path(key);
        let tmp_dir = self.dir.join(".tmp");
        std::fs::create_dir_all(&tmp_dir).map_err(|source| IndexError::CreateDir {
            path: tmp_dir.clone(),
            source,
        })?;
        let bytes = serde_json::to_vec(record).unwrap_or_default();
        crate::paths::write_atomic_via(&tmp_dir, &path, &bytes, false).map_err(IndexError::from)?;
        self.note_use(key);
        Ok(())
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

    /// Names of the entries of the index directory that are not readable records (damaged or
    /// foreign files), for `kiln store verify`.
    pub fn unreadable(&self) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name == ".usage" || name == ".tmp" {
                    return false;
                }
                !name.ends_with(".json")
                    || std::fs::read(e.path())
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
                        .is_none()
            })
            .map(|e| e.path())
            .collect()
    }

    /// When each record was made and used (records never looked up since the log began count
    /// from their file's modification time).
    pub fn usage(&self) -> BTreeMap<String, Usage> {
        let mut out: BTreeMap<String, Usage> = BTreeMap::new();
        if let Ok(text) = std::fs::read_to_string(self.usage_path()) {
            for line in text.lines() {
                let mut f = line.split(' ');
                let (Some(first), Some(last), Some(count), Some(key), None) =
                    (f.next(), f.next(), f.next(), f.next(), f.next())
                else {
                    continue;
                };
                let (Ok(first), Ok(last), Ok(count)) = (first.parse(), last.parse(), count.parse()) else {
                    continue;
                };
                out.entry(key.to_string())
                    .or_default()
                    .merge(Usage { first, last, count });
            }
        }
        out
    }

    /// Rewrites the usage log with one line per record that still exists. The caller holds the
    /// garbage-collection lock (no build appends meanwhile).
    pub fn compact_usage(&self) -> Result<(), IndexError> {
        let usage = self.usage();
        let mut text = String::new();
        for (key, u) in usage {
            if self.path(&key).is_file() {
                text.push_str(&format!("{} {} {} {key}\n", u.first, u.last, u.count));
            }
        }
        let path = self.usage_path();
        if text.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(IndexError::Write { path, source: e })
                }
                _ => Ok(()),
            };
        }
        let tmp_dir = self.dir.join(".tmp");
        std::fs::create_dir_all(&tmp_dir).map_err(|source| IndexError::CreateDir {
            path: tmp_dir.clone(),
            source,
        })?;
        crate::paths::write_atomic_via(&tmp_dir, &path, text.as_bytes(), false).map_err(IndexError::from)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u8) -> Record {
        let d = Digest::of(&[n]);
        Record {
            layers: vec![Layer {
                snapshot: d,
                blob: d,
                diff_id: d,
                size: 1,
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                created: None,
            }],
            description: format!("step {n}"),
        }
    }

    #[test]
    fn records_round_trip_and_uses_are_logged() {
        let dir = tempfile::tempdir().unwrap();
        let index = CacheIndex::open(&dir.path().join("index")).unwrap();
        index.put("a", &record(1)).unwrap();
        index.put("b", &record(2)).unwrap();
        assert_eq!(index.get("a"), Some(record(1)));
        assert_eq!(index.get("a"), Some(record(1)));
        assert_eq!(index.get("zz"), None, "a miss logs nothing");
        let mut all: Vec<String> = index.all().into_iter().map(|(k, _)| k).collect();
        all.sort();
        assert_eq!(all, ["a", "b"]);
        let usage = index.usage();
        assert_eq!(usage["a"].count, 3, "made once, found twice");
        assert_eq!(usage["b"].count, 1);
        assert!(usage["a"].first <= usage["a"].last);
        assert!(!usage.contains_key("zz"));
        assert!(index.unreadable().is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("index/.tmp")).unwrap().count(),
            0,
            "no temp left"
        );

        // Compaction keeps the sums of records that still exist.
        index.remove("b");
        index.compact_usage().unwrap();
        let text = std::fs::read_to_string(dir.path().join("index/.usage")).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert_eq!(index.usage()["a"].count, 3);
        std::fs::write(dir.path().join("index/c.json"), b"{broken").unwrap();
        assert_eq!(index.unreadable(), vec![dir.path().join("index/c.json")]);
    }
}
