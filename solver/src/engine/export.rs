//! The image exporter: a result's layers plus the frontend's config become an image in the store.

use kiln_cache::images::{Image, LayerRef};
use kiln_cache::Store;
use kiln_dag::image::{History, ImageConfig};

use kiln_cache::buildcache::Layer;

/// Exporting failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("layer blob {0} is not in the store")]
    MissingBlob(kiln_dag::Digest),
    #[error("failed to write the image")]
    Store(#[source] kiln_cache::images::ImageError),
}

/// The written image.
#[derive(Debug)]
pub struct Exported {
    pub image: Image,
}

/// Writes config and manifest for `layers` (bottom first) with `config` from the frontend, whose
/// history covers the base image's layers and the build's steps. History and layers are brought
/// into agreement the way BuildKit does: missing history entries for layers are added at the
/// bottom, surplus non-empty entries are marked empty from the bottom.
pub fn export_image(
    store: &Store,
    layers: &[Layer],
    config: &ImageConfig,
    created: &str,
) -> Result<Exported, ExportError> {
    let mut config = config.clone();
    config.rootfs.kind = "layers".into();
    config.rootfs.diff_ids = layers.iter().map(|l| l.diff_id.to_string()).collect();
    config.created = Some(created.to_string());
    for h in &mut config.history {
        if h.created.is_none() {
            h.created = Some(created.to_string());
        }
    }
    let with_layer = config.history.iter().filter(|h| !h.empty_layer).count();
    if with_layer < layers.len() {
        let missing = layers.len() - with_layer;
        let mut extra: Vec<History> = (0..missing)
            .map(|_| History {
                created: Some(created.to_string()),
                created_by: Some("created by kiln".into()),
                comment: Some("kiln.exporter.layer".into()),
                ..History::default()
            })
            .collect();
        extra.append(&mut config.history);
        config.history = extra;
    } else if with_layer > layers.len() {
        let mut surplus = with_layer - layers.len();
        for h in config.history.iter_mut() {
            if surplus == 0 {
                break;
            }
            if !h.empty_layer {
                h.empty_layer = true;
                surplus -= 1;
            }
        }
    }
    let mut refs = Vec::with_capacity(layers.len());
    for l in layers {
        if !store.content().contains(&l.blob) {
            return Err(ExportError::MissingBlob(l.blob));
        }
        let media_type = kiln_cache::oci_spec::image::MediaType::from(l.media_type.as_str());
        refs.push(LayerRef {
            digest: l.blob,
            diff_id: l.diff_id,
            size: l.size,
            media_type,
        });
    }
    let image = store
        .images()
        .create(&config, &refs)
        .map_err(ExportError::Store)?;
    Ok(Exported { image })
}
