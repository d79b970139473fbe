//! What kiln remembers about blobs and registries, in `ROOT/registry/`:
//!
//! - `sources/<hex>`: the repositories (`domain/path`, one a line) a blob was pulled from or
//!   pushed to, so a push to another repository of the same registry can mount it instead of
//!   uploading it;
//! - `gzip/<diff-id hex>` (and `zstd/<diff-id hex>`): the compressed blob (`{"digest","size"}`) a
//!   locally stored, uncompressed layer was pushed as, so the next push can find it with one
//!   `HEAD`.
//!
//! Both are hints: a missing or unreadable entry only costs an upload.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_dag::Digest;
use serde::{Deserialize, Serialize};

/// A failure recording a hint.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The file could not be written.
    #[error("failed to write `{path}`")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A compressed form of a layer, as pushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compressed {
    /// Digest of the compressed blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
}

/// The hint files under `ROOT/registry`.
#[derive(Clone, Debug)]
pub struct BlobMeta {
    dir: PathBuf,
}

impl BlobMeta {
    /// The hints of the store rooted at `root`.
    pub fn at(root: &Path) -> BlobMeta {
        BlobMeta {
            dir: root.join("registry"),
        }
    }

    fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> MetaError + '_ {
        move |source| MetaError::Write {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Records that `blob` is in `repository` (`domain/path`).
    pub fn record_source(&self, blob: &Digest, repository: &str) -> Result<(), MetaError> {
        if self.sources(blob).iter().any(|s| s == repository) {
            return Ok(());
        }
        let dir = self.dir.join("sources");
        fs::create_dir_all(&dir).map_err(Self::write_err(&dir))?;
        let path = dir.join(blob.hex());
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(Self::write_err(&path))?;
        // One short append: concurrent writers do not interleave within a line.
        f.write_all(format!("{repository}\n").as_bytes())
            .map_err(Self::write_err(&path))
    }

    /// The repositories `blob` is known to be in, oldest first.
    pub fn sources(&self, blob: &Digest) -> Vec<String> {
        let path = self.dir.join("sources").join(blob.hex());
        let text = fs::read_to_string(path).unwrap_or_default();
        let mut out: Vec<String> = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if !out.iter().any(|o| o == line) {
                out.push(line.to_string());
            }
        }
        out
    }

    /// Records the compressed blob an uncompressed layer was pushed as; `algorithm` is `gzip`
    /// or `zstd`.
    pub fn record_compressed(
        &self,
        diff_id: &Digest,
        algorithm: &str,
        c: &Compressed,
    ) -> Result<(), MetaError> {
        let dir = self.dir.join(algorithm);
        fs::create_dir_all(&dir).map_err(Self::write_err(&dir))?;
        let path = dir.join(diff_id.hex());
        let temp = dir.join(format!("{}.{}.tmp", diff_id.hex(), std::process::id()));
        let bytes = serde_json::to_vec(c).map_err(|e| MetaError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        fs::write(&temp, bytes).map_err(Self::write_err(&temp))?;
        fs::rename(&temp, &path).map_err(Self::write_err(&path))
    }

    /// The blob an uncompressed layer was last pushed as, compressed with `algorithm`.
    pub fn compressed(&self, diff_id: &Digest, algorithm: &str) -> Option<Compressed> {
        let bytes = fs::read(self.dir.join(algorithm).join(diff_id.hex())).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_sources_and_compressed_forms() {
        let dir = tempfile::tempdir().unwrap();
        let m = BlobMeta::at(dir.path());
        let d = Digest::of(b"x");
        assert!(m.sources(&d).is_empty());
        m.record_source(&d, "127.0.0.1:5000/a").unwrap();
        m.record_source(&d, "127.0.0.1:5000/a").unwrap();
        m.record_source(&d, "127.0.0.1:5000/b").unwrap();
        assert_eq!(m.sources(&d), vec!["127.0.0.1:5000/a", "127.0.0.1:5000/b"]);
        assert!(m.compressed(&d, "gzip").is_none());
        let c = Compressed {
            digest: Digest::of(b"gz"),
            size: 2,
        };
        m.record_compressed(&d, "gzip", &c).unwrap();
        assert_eq!(m.compressed(&d, "gzip"), Some(c));
        assert!(
            m.compressed(&d, "zstd").is_none(),
            "each algorithm has its own hints"
        );
    }
}
