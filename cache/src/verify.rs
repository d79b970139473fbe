//! `kiln store verify`: re-hashes every blob and checks every reference the image records make.

use std::fmt;
use std::io::Read;

use kiln_dag::Digest;
use rayon::prelude::*;
use sha2::{Digest as _, Sha256};

use crate::content::ContentError;
use crate::images::ImageError;
use crate::store::Store;

/// A failure to run the verification itself (damage is reported as [`Problem`]s).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The blobs could not be listed.
    #[error("failed to list blobs")]
    List(#[source] ContentError),
    /// The image records could not be read.
    #[error("failed to read image records")]
    Images(#[source] ImageError),
}

/// One piece of damage found.
#[derive(Debug)]
pub enum Problem {
    /// A blob's content does not hash to its name.
    Corrupt {
        /// The blob's name.
        digest: Digest,
        /// What it hashes to.
        actual: Digest,
    },
    /// A blob could not be read.
    Unreadable {
        /// The blob's name.
        digest: Digest,
        /// Why.
        error: String,
    },
    /// A file in the blob directory whose name is not a sha256 hex digest.
    StrayFile {
        /// Its name.
        name: String,
    },
    /// An image record whose manifest, config or layers are missing or invalid.
    BrokenImage {
        /// The manifest digest.
        manifest: Digest,
        /// What is wrong.
        error: String,
    },
    /// A blob an image needs is not in the store.
    MissingBlob {
        /// The manifest digest.
        manifest: Digest,
        /// The missing blob.
        digest: Digest,
    },
    /// A tag points at a manifest with no image record.
    DanglingTag {
        /// The tag.
        tag: String,
        /// What it points at.
        manifest: Digest,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Corrupt { digest, actual } => {
                write!(f, "blob {digest} is corrupt: its content hashes to {actual}")
            }
            Problem::Unreadable { digest, error } => write!(f, "blob {digest} cannot be read: {error}"),
            Problem::StrayFile { name } => write!(f, "blobs/sha256/{name} is not named by a sha256 digest"),
            Problem::BrokenImage { manifest, error } => write!(f, "image {manifest} is broken: {error}"),
            Problem::MissingBlob { manifest, digest } => {
                write!(f, "image {manifest} needs blob {digest}, which is missing")
            }
            Problem::DanglingTag { tag, manifest } => write!(
                f,
                "tag {tag} points at {manifest}, which is not an image in the store"
            ),
        }
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Blobs re-hashed.
    pub blobs: usize,
    /// Image records checked.
    pub images: usize,
    /// Tags checked.
    pub tags: usize,
    /// Damage found; empty when the store is sound.
    pub problems: Vec<Problem>,
}

fn hash_file(store: &Store, d: &Digest) -> Result<Digest, String> {
    let mut f = store.content().open(d).map_err(|e| error_chain(&e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest(hasher.finalize().into()))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Re-hashes every blob (in parallel) and checks every image record and tag.
pub fn verify(store: &Store) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport::default();
    let blobs_dir = store.root().join("blobs").join("sha256");
    if let Ok(entries) = std::fs::read_dir(&blobs_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if Digest::parse(&format!("sha256:{name}")).is_err() {
                report.problems.push(Problem::StrayFile { name });
            }
        }
    }
    let blobs = store.content().list().map_err(VerifyError::List)?;
    report.blobs = blobs.len();
    let mut blob_problems: Vec<Problem> = blobs
        .par_iter()
        .filter_map(|d| match hash_file(store, d) {
            Ok(actual) if actual == *d => None,
            Ok(actual) => Some(Problem::Corrupt { digest: *d, actual }),
            Err(error) => Some(Problem::Unreadable { digest: *d, error }),
        })
        .collect();
    report.problems.append(&mut blob_problems);

    let images = store.images();
    let index = images.index().map_err(VerifyError::Images)?;
    report.images = index.images.len();
    report.tags = index.tags.len();
    for manifest in index.images.keys() {
        if !store.content().contains(manifest) {
            report.problems.push(Problem::MissingBlob {
                manifest: *manifest,
                digest: *manifest,
            });
            continue;
        }
        match images.get(manifest) {
            Ok(img) => {
                for d in img.blobs() {
                    if !store.content().contains(&d) {
                        report.problems.push(Problem::MissingBlob {
                            manifest: *manifest,
                            digest: d,
                        });
                    }
                }
            }
            Err(e) => report.problems.push(Problem::BrokenImage {
                manifest: *manifest,
                error: error_chain(&e),
            }),
        }
    }
    for (tag, manifest) in &index.tags {
        if !index.images.contains_key(manifest) {
            report.problems.push(Problem::DanglingTag {
                tag: tag.clone(),
                manifest: *manifest,
            });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::LayerRef;
    use kiln_dag::image::ImageConfig;
    use oci_spec::image::MediaType;

    #[test]
    fn finds_corrupt_and_missing_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let l = store.content().put_bytes(b"layer").unwrap();
        let img = store
            .images()
            .create(
                &ImageConfig::default(),
                &[LayerRef {
                    digest: l,
                    diff_id: l,
                    size: 5,
                    media_type: MediaType::ImageLayer,
                }],
            )
            .unwrap();
        let report = verify(&store).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!((report.blobs, report.images), (3, 1));
        std::fs::write(store.content().path(&l), b"LAYER").unwrap();
        let report = verify(&store).unwrap();
        assert_eq!(report.problems.len(), 1);
        assert!(report.problems[0].to_string().contains("corrupt"));
        std::fs::remove_file(store.content().path(&img.config_digest)).unwrap();
        let report = verify(&store).unwrap();
        assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    }
}
