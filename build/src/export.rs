//! The result into the store and the outputs: the image (config + manifest over the solved
//! layers), its local names, and `docker`/`oci` archives, a `tar` of the final filesystem or a
//! `local` directory.

use std::io;
use std::path::{Path, PathBuf};

use kiln_cache::buildcache::Layer;
use kiln_cache::reference::Reference;
use kiln_cache::Store;

use crate::output::{ArchiveOutput, Destination, OutputSpec};

/// Exporting the image or writing an output failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the build result is not a filesystem")]
    NotAFilesystem,
    #[error(transparent)]
    Image(Box<kiln_solver::engine::ExportError>),
    #[error("failed to write the image index of the build's platforms")]
    Index(#[source] Box<kiln_cache::images::ImageError>),
    #[error("failed to name the image `{reference}`")]
    Tag {
        reference: Box<Reference>,
        #[source]
        source: Box<kiln_cache::images::ImageError>,
    },
    #[error("failed to create `{path}`")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to write the {format} archive")]
    Save {
        format: &'static str,
        #[source]
        source: Box<kiln_cache::archive::save::SaveError>,
    },
    #[error("failed to open layer {blob}")]
    OpenLayer {
        blob: kiln_dag::Digest,
        #[source]
        source: Box<kiln_cache::content::ContentError>,
    },
    #[error("failed to read layer {blob}")]
    ReadLayer {
        blob: kiln_dag::Digest,
        #[source]
        source: Box<kiln_cache::layer::SniffError>,
    },
    #[error("failed to apply layer {blob} to `{dir}`")]
    ApplyLayer {
        blob: kiln_dag::Digest,
        dir: PathBuf,
        #[source]
        source: Box<kiln_cache::layer::ApplyError>,
    },
    #[error("failed to write the tar of the final filesystem")]
    Tar(#[source] Box<kiln_cache::layer::WriteError>),
}

/// Points `names` at the image or index `digest`, in order, skipping repeats.
pub(crate) fn tag_digest(
    store: &Store,
    digest: &kiln_dag::Digest,
    names: &[Reference],
) -> Result<(), ExportError> {
    for r in names {
        store.images().tag(r, digest).map_err(|source| ExportError::Tag {
            reference: Box::new(r.clone()),
            source: Box::new(source),
        })?;
    }
    Ok(())
}

/// Writes one non-image output. `tags` name the image in archives whose output has no `name=`;
/// `entry_annotations` go on the archive's `index.json` entry (`--annotation *-descriptor:`).
/// With several platforms (`index` set) an archive holds the index and every platform's image,
/// and `local` and `tar` hold one directory per platform, named as BuildKit names them
/// (`linux_amd64`, `linux_arm_v7`).
pub(crate) fn write_output(
    store: &Store,
    o: &OutputSpec,
    images: &[crate::PlatformImage],
    index: Option<&kiln_cache::image_index::IndexImage>,
    tags: &[Reference],
    layers: &[std::sync::Arc<Vec<Layer>>],
    entry_annotations: &std::collections::BTreeMap<String, String>,
) -> Result<(), ExportError> {
    use kiln_cache::archive::save::{save_annotated, Format, SaveItem};
    match o {
        OutputSpec::Image(_) => Ok(()),
        OutputSpec::Docker(a) | OutputSpec::Oci(a) => {
            let (format, name) = match o {
                OutputSpec::Docker(_) => (Format::Docker, "docker"),
                _ => (Format::Oci, "oci"),
            };
            let ArchiveOutput { dest, names } = a;
            // `docker load` takes one image per name: the host's platform, else the first.
            let host = kiln_dag::Platform::host();
            let shown = images
                .iter()
                .find(|i| host.match_rank(&i.platform).is_some())
                .unwrap_or(&images[0]);
            let item = SaveItem {
                index: index.cloned(),
                image: shown.image.clone(),
                tags: if names.is_empty() {
                    tags.to_vec()
                } else {
                    names.clone()
                },
            };
            let entry = [entry_annotations.clone()];
            save_annotated(store, &[item], &entry, format, open(dest)?).map_err(|source| ExportError::Save {
                format: name,
                source: Box::new(source),
            })
        }
        OutputSpec::Local { dest } => {
            std::fs::create_dir_all(dest).map_err(|source| ExportError::Create {
                path: dest.clone(),
                source,
            })?;
            for (i, layers) in images.iter().zip(layers) {
                let dir = if index.is_some() {
                    dest.join(i.platform.dir_name())
                } else {
                    dest.clone()
                };
                std::fs::create_dir_all(&dir).map_err(|source| ExportError::Create {
                    path: dir.clone(),
                    source,
                })?;
                flatten_into(store, layers, &dir)?;
            }
            Ok(())
        }
        OutputSpec::Tar { dest } => {
            let parent = store.root().join("tmp");
            let tmp = tempfile::Builder::new()
                .prefix("export-")
                .tempdir_in(&parent)
                .map_err(|source| ExportError::Create { path: parent, source })?;
            for (i, layers) in images.iter().zip(layers) {
                let dir = if index.is_some() {
                    tmp.path().join(i.platform.dir_name())
                } else {
                    tmp.path().to_path_buf()
                };
                std::fs::create_dir_all(&dir).map_err(|source| ExportError::Create {
                    path: dir.clone(),
                    source,
                })?;
                flatten_into(store, layers, &dir)?;
            }
            let opts = kiln_cache::layer::DiffOptions::default();
            kiln_cache::layer::write_tree(tmp.path(), open(dest)?, &opts)
                .map_err(|e| ExportError::Tar(Box::new(e)))?;
            Ok(())
        }
    }
}

fn open(dest: &Destination) -> Result<Box<dyn io::Write + Send>, ExportError> {
    Ok(match dest {
        Destination::File(p) => Box::new(std::fs::File::create(p).map_err(|source| ExportError::Create {
            path: p.clone(),
            source,
        })?),
        Destination::Stdout => Box::new(io::stdout()),
    })
}

/// Applies `layers` in order to `dir`, whiteouts deleting what they hide.
fn flatten_into(store: &Store, layers: &[Layer], dir: &Path) -> Result<(), ExportError> {
    for l in layers {
        let file = store
            .content()
            .open(&l.blob)
            .map_err(|source| ExportError::OpenLayer {
                blob: l.blob,
                source: Box::new(source),
            })?;
        let reader = kiln_cache::layer::sniff(file).map_err(|source| ExportError::ReadLayer {
            blob: l.blob,
            source: Box::new(source),
        })?;
        let opts = kiln_cache::layer::ApplyOptions {
            whiteouts: kiln_cache::layer::WhiteoutMode::Delete,
            archive_name: l.blob.to_string(),
            ..Default::default()
        };
        kiln_cache::layer::apply(reader, dir, &opts).map_err(|source| ExportError::ApplyLayer {
            blob: l.blob,
            dir: dir.to_path_buf(),
            source: Box::new(source),
        })?;
    }
    Ok(())
}
