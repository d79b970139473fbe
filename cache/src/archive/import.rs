//! `kiln import`: a rootfs tarball (plain, gzip, zstd, bzip2 or xz) becomes a one-layer image.
//!
//! The layer is stored decompressed, so its digest is its diff ID; kiln compresses only when it
//! pushes.
//!
//! The image depends on nothing but the tarball's content and the options: its created time is
//! the newest modification time among the entries (Docker takes the time of the import), and its
//! history says `Imported from -` as Docker's does (without the file's name), so importing the
//! same tarball again, from wherever it lies, gives the same image ID and keeps what was built
//! on it cached.
//!
//! Before it is stored the layer is read through [`crate::layer::check`], so a tarball that would
//! not unpack (names climbing out with `..`, writes through symlinks, hard links to files it does
//! not hold) is refused here rather than at `kiln run`. Absolute names are fine: they land in the
//! image, as Docker's import puts them.

use std::fs::File;
use std::io::Read;

use kiln_dag::image::{History, ImageConfig};
use kiln_dag::Platform;
use oci_spec::image::MediaType;

use crate::archive::decompress;
use crate::content::ContentError;
use crate::images::{rfc3339, Image, ImageError, LayerRef};
use crate::reference::Reference;
use crate::store::{Store, StoreError};

/// A failure importing a rootfs tarball.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The store could not be held against garbage collection.
    #[error("failed to hold the store")]
    Hold(#[source] StoreError),
    /// The input's first bytes could not be read.
    #[error("failed to read `{source_name}`")]
    Open {
        /// The input file name (`-` for stdin).
        source_name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading, decompressing or storing the layer failed.
    #[error("failed to import `{source_name}` ({compression})")]
    Store {
        /// The input file name.
        source_name: String,
        /// The compression sniffed.
        compression: &'static str,
        /// The cause.
        #[source]
        source: ContentError,
    },
    /// The decompressed input is not a tar archive.
    #[error("`{source_name}` is not a tar archive (after entry {after:?})")]
    NotTar {
        /// The input file name.
        source_name: String,
        /// The last good entry, if any.
        after: Option<String>,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An entry's data runs past the end of the input.
    #[error(
        "`{source_name}` is truncated: entry `{entry}` needs {needed} bytes but the archive ends at {len}"
    )]
    Truncated {
        /// The input file name.
        source_name: String,
        /// The entry cut short.
        entry: String,
        /// Bytes the entry needs.
        needed: u64,
        /// Length of the decompressed input.
        len: u64,
    },
    /// The input has no entries.
    #[error("`{source_name}` is empty: a rootfs tarball needs at least one entry")]
    Empty {
        /// The input file name.
        source_name: String,
    },
    /// The tarball would not unpack as a layer.
    #[error("`{source_name}` cannot be unpacked as a root filesystem")]
    Layer {
        /// The input file name.
        source_name: String,
        /// What is wrong with it.
        #[source]
        source: Box<crate::layer::ApplyError>,
    },
    /// Publishing the verified layer failed.
    #[error("failed to store the layer of `{source_name}`")]
    Commit {
        /// The input file name.
        source_name: String,
        /// The cause.
        #[source]
        source: ContentError,
    },
    /// Writing the image or its tag failed.
    #[error("failed to create the image for `{source_name}`")]
    Image {
        /// The input file name.
        source_name: String,
        /// The cause.
        #[source]
        source: Box<ImageError>,
    },
}

/// Options of `kiln import`.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Commit message, kept as the history comment (`docker import -m`).
    pub message: Option<String>,
    /// Tag for the new image.
    pub reference: Option<Reference>,
    /// The image's run config (`docker import -c` changes applied to an empty one).
    pub config: kiln_dag::image::ContainerConfig,
    /// The image's platform (`docker import --platform`); the host's when unset.
    pub platform: Option<Platform>,
}

/// Reads a rootfs tarball from `reader` (named `source_name` in messages and history) and
/// stores it as a one-layer image for the host platform.
pub fn import_rootfs(
    store: &Store,
    reader: impl Read,
    source_name: &str,
    opts: &ImportOptions,
) -> Result<Image, ImportError> {
    let _hold = store.hold().map_err(ImportError::Hold)?;
    let (compression, reader) = decompress(reader).map_err(|source| ImportError::Open {
        source_name: source_name.to_string(),
        source,
    })?;
    let staged = store
        .content()
        .stage(reader, None)
        .map_err(|source| ImportError::Store {
            source_name: source_name.to_string(),
            compression: compression.name(),
            source,
        })?;
    let newest = check_tar(staged.temp_path(), staged.size(), source_name)?;
    check_layer(staged.temp_path(), source_name)?;
    let size = staged.size();
    let digest = staged.commit().map_err(|source| ImportError::Commit {
        source_name: source_name.to_string(),
        source,
    })?;

    let platform = opts.platform.clone().unwrap_or_else(Platform::host);
    let created = rfc3339(newest);
    let config = ImageConfig {
        created: Some(created.clone()),
        architecture: platform.architecture,
        os: platform.os,
        variant: platform.variant,
        config: opts.config.clone(),
        history: vec![History {
            created: Some(created),
            created_by: None,
            comment: Some(
                opts.message
                    .clone()
                    .unwrap_or_else(|| "Imported from -".to_string()),
            ),
            ..Default::default()
        }],
        ..Default::default()
    };
    let layer = LayerRef {
        digest,
        diff_id: digest,
        size,
        media_type: MediaType::ImageLayer,
    };
    let img_err = |source: ImageError| ImportError::Image {
        source_name: source_name.to_string(),
        source: Box::new(source),
    };
    let images = store.images();
    let image = images.create(&config, &[layer]).map_err(img_err)?;
    if let Some(r) = &opts.reference {
        images.tag(r, &image.manifest_digest).map_err(img_err)?;
    }
    Ok(image)
}

/// Reads the staged layer through [`crate::layer::check`] as a snapshot unpacks it.
fn check_layer(path: &std::path::Path, source_name: &str) -> Result<(), ImportError> {
    let not_tar = |source| ImportError::NotTar {
        source_name: source_name.to_string(),
        after: None,
        source,
    };
    let file = File::open(path).map_err(not_tar)?;
    let opts = crate::layer::ApplyOptions {
        whiteouts: crate::layer::WhiteoutMode::Overlay,
        archive_name: source_name.to_string(),
        ..crate::layer::ApplyOptions::default()
    };
    // The staged digest is the diff ID already: no need to hash again.
    crate::layer::check_unhashed(file, &opts)
        .map(|_| ())
        .map_err(|source| ImportError::Layer {
            source_name: source_name.to_string(),
            source: Box::new(source),
        })
}

/// Walks the tar headers of the staged layer, failing on garbage or truncation; returns the
/// newest modification time of its entries (seconds since the epoch, 0 for none).
fn check_tar(path: &std::path::Path, len: u64, source_name: &str) -> Result<i64, ImportError> {
    let not_tar = |after: Option<String>, source| ImportError::NotTar {
        source_name: source_name.to_string(),
        after,
        source,
    };
    let file = File::open(path).map_err(|e| not_tar(None, e))?;
    let mut archive = tar::Archive::new(file);
    let mut last: Option<String> = None;
    let mut count = 0u64;
    let mut end = 0u64;
    let mut newest = 0i64;
    for entry in archive.entries_with_seek().map_err(|e| not_tar(None, e))? {
        let entry = entry.map_err(|e| not_tar(last.clone(), e))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let size = entry
            .header()
            .entry_size()
            .map_err(|e| not_tar(last.clone(), e))?;
        let needed = entry.raw_file_position() + size.div_ceil(512) * 512;
        if needed > len {
            return Err(ImportError::Truncated {
                source_name: source_name.to_string(),
                entry: name,
                needed,
                len,
            });
        }
        if let Ok(t) = entry.header().mtime() {
            newest = newest.max(i64::try_from(t).unwrap_or(0));
        }
        end = needed;
        last = Some(name);
        count += 1;
    }
    if count == 0 {
        return Err(ImportError::Empty {
            source_name: source_name.to_string(),
        });
    }
    // Every tar writer ends the archive with zero blocks; without them the input was cut at an
    // entry boundary.
    if end + 512 > len {
        return Err(ImportError::Truncated {
            source_name: source_name.to_string(),
            entry: format!("{} (end-of-archive marker)", last.unwrap_or_default()),
            needed: end + 512,
            len,
        });
    }
    Ok(newest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "etc/hello", &b"hello"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn imports_plain_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tar = tarball();
        let opts = ImportOptions {
            reference: Some(Reference::parse("x:1").unwrap()),
            ..Default::default()
        };
        let img = import_rootfs(&store, &tar[..], "t.tar", &opts).unwrap();
        assert_eq!(img.layers[0].diff_id, kiln_dag::Digest::of(&tar));
        assert_eq!(img.config.history[0].comment.as_deref(), Some("Imported from -"));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let img2 = import_rootfs(
            &store,
            &gz.finish().unwrap()[..],
            "t.tgz",
            &ImportOptions::default(),
        )
        .unwrap();
        assert_eq!(img2.layers[0].digest, img.layers[0].digest);
        // Same content, same options: the same image, whatever the file is called or how it is
        // compressed; a message makes another one.
        assert_eq!(img2.manifest_digest, img.manifest_digest);
        assert_eq!(img2.config.created.as_deref(), Some("1970-01-01T00:00:00Z"));
        let msg = ImportOptions {
            message: Some("base".into()),
            ..Default::default()
        };
        let img3 = import_rootfs(&store, &tar[..], "other.tar", &msg).unwrap();
        assert_ne!(img3.manifest_digest, img.manifest_digest);
        assert_eq!(
            import_rootfs(&store, &tar[..], "t.tar", &msg)
                .unwrap()
                .manifest_digest,
            img3.manifest_digest
        );
        assert_eq!(
            store.images().resolve("x:1").unwrap().manifest_digest,
            img.manifest_digest
        );
    }

    #[test]
    fn rejects_truncated_and_garbage_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tar = tarball();
        for cut in [600, 1024, 1200] {
            let err = import_rootfs(&store, &tar[..cut], "cut.tar", &ImportOptions::default()).unwrap_err();
            // A cut inside the end marker is a short header block: not a tar any more.
            assert!(
                matches!(err, ImportError::Truncated { .. } | ImportError::NotTar { .. }),
                "{cut}: {err}"
            );
            assert!(err.to_string().contains("etc/hello"), "{err}");
        }
        let err = import_rootfs(&store, &[0x55u8; 1024][..], "junk", &ImportOptions::default()).unwrap_err();
        assert!(matches!(err, ImportError::NotTar { .. }), "{err}");
        let err = import_rootfs(&store, &[][..], "empty", &ImportOptions::default()).unwrap_err();
        assert!(matches!(err, ImportError::Empty { .. }), "{err}");
        assert!(store.content().list().unwrap().is_empty());
        assert_eq!(
            std::fs::read_dir(store.content().ingest_dir()).unwrap().count(),
            0
        );
        assert!(store.images().list().unwrap().is_empty());
    }
}
