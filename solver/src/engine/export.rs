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
    /// More layers than `docker load` takes.
    #[error("max depth exceeded: the image has {0} layers, Docker loads images of at most {MAX_LAYERS}")]
    MaxDepth(usize),
}

/// The most layers an image may have: Docker's layer store refuses a deeper chain ("max depth
/// exceeded" from `docker load`; `docker run` refuses from 128 layers, overlay2's 128 lower dirs
/// with the container's init layer).
pub const MAX_LAYERS: usize = 125;

/// The written image.
#[derive(Debug)]
pub struct Exported {
    pub image: Image,
}

/// Writes config and manifest for `layers` (bottom first) with `config` from the frontend, whose
/// history covers the base image's layers and the build's steps. History and layers are brought
/// into agreement the way BuildKit does: missing history entries for layers are added at the
/// bottom, surplus non-empty entries are marked empty from the bottom.
///
/// Times: with `epoch` (SOURCE_DATE_EPOCH), every undated history entry and the image are dated
/// `epoch`. Without, BuildKit's rule: a step's layer entry gets the time its layer was made
/// ([`Layer::created`], kept by cache hits); the undated entries before the first such layer get
/// that layer's time and later ones the time of the layer before them (with no new layer, the
/// base's last time); the image gets the last entry's time. So a fully cached rebuild gives the
/// same image ID, as BuildKit's does.
///
/// `annotations` go into the manifest (`--annotation manifest:K=V`).
pub fn export_image(
    store: &Store,
    layers: &[Layer],
    config: &ImageConfig,
    epoch: Option<&str>,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result<Exported, ExportError> {
    if layers.len() > MAX_LAYERS {
        return Err(ExportError::MaxDepth(layers.len()));
    }
    let now = kiln_cache::images::now_rfc3339();
    let mut config = config.clone();
    config.rootfs.kind = "layers".into();
    config.rootfs.diff_ids = layers.iter().map(|l| l.diff_id.to_string()).collect();
    let with_layer = config.history.iter().filter(|h| !h.empty_layer).count();
    if with_layer < layers.len() {
        let missing = layers.len() - with_layer;
        let mut extra: Vec<History> = layers[..missing]
            .iter()
            .map(|l| History {
                created: Some(epoch.or(l.created.as_deref()).unwrap_or(&now).to_string()),
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
    match epoch {
        Some(t) => {
            for h in &mut config.history {
                h.created.get_or_insert_with(|| t.to_string());
            }
            config.created = Some(t.to_string());
        }
        None => {
            date_history(&mut config.history, layers, &now);
            config.created = Some(
                config
                    .history
                    .last()
                    .and_then(|h| h.created.clone())
                    .unwrap_or(now),
            );
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
        .create_annotated(&config, &refs, annotations)
        .map_err(ExportError::Store)?;
    Ok(Exported { image })
}

/// Dates undated history entries as BuildKit's exporter does (see [`export_image`]); `now` for
/// a layer that carries no time of its own.
fn date_history(history: &mut [History], layers: &[Layer], now: &str) {
    let mut layer = 0;
    for h in history.iter_mut() {
        if !h.empty_layer {
            if h.created.is_none() {
                let made = layers.get(layer).and_then(|l| l.created.as_deref());
                h.created = Some(made.unwrap_or(now).to_string());
            }
            layer += 1;
        }
    }
    // The first new layer's time (the first dated entry after an undated one), else the last.
    let mut created: Option<String> = None;
    let mut undated = false;
    for h in history.iter() {
        match &h.created {
            Some(c) => {
                created = Some(c.clone());
                if undated {
                    break;
                }
            }
            None => undated = true,
        }
    }
    let mut undated = false;
    for h in history.iter_mut() {
        match &h.created {
            Some(c) if undated => created = Some(c.clone()),
            Some(_) => {}
            None => {
                undated = true;
                h.created = Some(created.clone().unwrap_or_else(|| now.to_string()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(created: Option<&str>, empty: bool) -> History {
        History {
            created: created.map(str::to_string),
            empty_layer: empty,
            ..History::default()
        }
    }

    fn layer(created: Option<&str>) -> Layer {
        Layer {
            snapshot: kiln_dag::Digest::of(b"s"),
            blob: kiln_dag::Digest::of(b"b"),
            diff_id: kiln_dag::Digest::of(b"b"),
            size: 1,
            media_type: crate::engine::LAYER_TAR.into(),
            created: created.map(str::to_string),
        }
    }

    fn dates(history: &[History]) -> Vec<&str> {
        history
            .iter()
            .map(|h| h.created.as_deref().unwrap_or("-"))
            .collect()
    }

    /// The times Docker 20.10's BuildKit gave `FROM base / ENV / RUN / ENV / COPY / CMD` after
    /// the RUN was cached at t1 and the COPY ran at t2 (checked on this machine).
    #[test]
    fn history_is_dated_like_buildkit() {
        let mut h = vec![
            entry(Some("t0"), false),
            entry(None, true),
            entry(None, false),
            entry(None, true),
            entry(None, false),
            entry(None, true),
        ];
        let layers = [layer(None), layer(Some("t1")), layer(Some("t2"))];
        date_history(&mut h, &layers, "now");
        assert_eq!(dates(&h), ["t0", "t1", "t1", "t1", "t2", "t2"]);

        // No new layer: the metadata steps take the base's last time.
        let mut h = vec![
            entry(Some("t0"), false),
            entry(Some("t0b"), true),
            entry(None, true),
        ];
        date_history(&mut h, &[layer(None)], "now");
        assert_eq!(dates(&h), ["t0", "t0b", "t0b"]);

        // A layer without a time of its own (a record from before times were kept): now.
        let mut h = vec![entry(Some("t0"), false), entry(None, false), entry(None, true)];
        date_history(&mut h, &[layer(None), layer(None)], "now");
        assert_eq!(dates(&h), ["t0", "now", "now"]);
    }
}
