//! A cache in a registry: read (a kiln cache manifest or index, or an image carrying an inline
//! cache) and written (blobs first, in parallel, then the config, then the manifest, so the ref
//! never names a blob the registry does not have, even with two exports racing).

use kiln_cache::images::MAX_JSON_BYTES;
use kiln_cache::reference::Reference;
use kiln_cache::Store;
use kiln_dag::{Digest, Platform};
use kiln_source::registry::{self, media, BlobSession, Client, PushError, TransferProgress};
use serde_json::Value;

use super::format::{
    CacheConfig, Envelope, BUILDKIT_CONFIG_MEDIA_TYPE, BUILDKIT_INLINE_KEY, CONFIG_MEDIA_TYPE, INLINE_KEY,
};
use super::import::{BlobSource, ImportedCache, Loaded};
use super::{CacheError, ImportError, Planned};

fn descriptor(v: &Value) -> Option<(Digest, u64, String)> {
    let digest = Digest::parse(v.get("digest")?.as_str()?).ok()?;
    let size = v.get("size").and_then(Value::as_u64).unwrap_or(0);
    let media_type = v
        .get("mediaType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Some((digest, size, media_type))
}

fn small_blob(
    client: &Client,
    store: &Store,
    r: &Reference,
    d: &(Digest, u64, String),
) -> Result<Vec<u8>, ImportError> {
    registry::fetch_blob(client, store.content(), r, &d.0, d.1, &registry::NoProgress)
        .map_err(|e| ImportError::Registry(Box::new(e)))?;
    store
        .content()
        .read_limited(&d.0, MAX_JSON_BYTES)
        .map_err(|e| ImportError::Read(Box::new(e)))
}

/// Reads the cache at `r`: a kiln cache manifest or index, or an image (an index resolved to
/// `platform`) whose config holds an inline cache.
pub(crate) fn load(
    client: &Client,
    store: &Store,
    r: &Reference,
    platform: &Platform,
) -> Result<Loaded, ImportError> {
    let tag = match (r.digest(), r.tag()) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.to_string(),
        (None, None) => "latest".to_string(),
    };
    let (bytes, _, media_type) =
        registry::fetch_manifest_bytes(client, r, &tag).map_err(|e| ImportError::Registry(Box::new(e)))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(ImportError::Manifest)?;
    let source = BlobSource::Registry { reference: r.clone() };
    let mut manifest = v;
    if media_type == media::OCI_INDEX || media_type == media::DOCKER_LIST {
        let entries: Vec<Value> = manifest
            .get("manifests")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let kind = |m: &Value| {
            m.get("mediaType")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        if let Some(cfg) = entries.iter().find(|m| kind(m) == CONFIG_MEDIA_TYPE) {
            let cfg = descriptor(cfg).ok_or(ImportError::NoCache)?;
            let config =
                CacheConfig::parse(&small_blob(client, store, r, &cfg)?).map_err(ImportError::Format)?;
            return Ok(Loaded::with_blobs(config, source));
        }
        if entries.iter().any(|m| kind(m) == BUILDKIT_CONFIG_MEDIA_TYPE) {
            return Err(ImportError::Foreign("BuildKit's cache manifest"));
        }
        let chosen = registry::pull::select_platform(&bytes, platform)
            .ok()
            .flatten()
            .ok_or(ImportError::NoCache)?;
        let (child, _, _) = registry::fetch_manifest_bytes(client, r, &chosen)
            .map_err(|e| ImportError::Registry(Box::new(e)))?;
        manifest = serde_json::from_slice(&child).map_err(ImportError::Manifest)?;
    }
    let cfg = manifest
        .get("config")
        .and_then(descriptor)
        .ok_or(ImportError::NoCache)?;
    if cfg.2 == CONFIG_MEDIA_TYPE {
        let config = CacheConfig::parse(&small_blob(client, store, r, &cfg)?).map_err(ImportError::Format)?;
        return Ok(Loaded::with_blobs(config, source));
    }
    if cfg.2 == BUILDKIT_CONFIG_MEDIA_TYPE {
        return Err(ImportError::Foreign("BuildKit's cache manifest"));
    }
    // An image: its inline cache, whose layers are the image's own.
    let image_config: Value =
        serde_json::from_slice(&small_blob(client, store, r, &cfg)?).map_err(ImportError::Manifest)?;
    let layers: Vec<(Digest, u64, String)> = manifest
        .get("layers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(descriptor).collect())
        .unwrap_or_default();
    inline(&image_config, &layers, source)
}

/// The inline cache of an image config whose manifest lists `layers`.
pub(crate) fn inline(
    image_config: &Value,
    layers: &[(Digest, u64, String)],
    source: BlobSource,
) -> Result<Loaded, ImportError> {
    let Some(value) = image_config.get(INLINE_KEY) else {
        if image_config.get(BUILDKIT_INLINE_KEY).is_some() {
            return Err(ImportError::Foreign("BuildKit's inline cache"));
        }
        return Err(ImportError::NoCache);
    };
    let config: CacheConfig = serde_json::from_value(value.clone())
        .map_err(|e| ImportError::Format(super::format::FormatError::Json(e)))?;
    config.check().map_err(ImportError::Format)?;
    let diff_ids: Vec<Digest> = image_config
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().and_then(|s| Digest::parse(s).ok()))
                .collect()
        })
        .unwrap_or_default();
    let mut blobs = Vec::with_capacity(config.layers.len());
    for l in &config.layers {
        let pos = diff_ids
            .iter()
            .position(|d| *d == l.diff_id)
            .ok_or(ImportError::InlineLayer(l.diff_id))?;
        blobs.push(
            layers
                .get(pos)
                .cloned()
                .ok_or(ImportError::InlineLayer(l.diff_id))?,
        );
    }
    Ok(Loaded {
        config,
        blobs,
        source,
    })
}

/// Writes `planned` to `r`: layers (compressed as asked, HEAD-skipped, mounted, fetched from an
/// imported cache only when the registry has no copy to mount), then the config, then the
/// manifest (or index).
pub(crate) fn export(
    client: &Client,
    store: &Store,
    r: &Reference,
    image_manifest: bool,
    planned: &Planned,
    imported: Option<&ImportedCache>,
    progress: &dyn TransferProgress,
) -> Result<(), CacheError> {
    let target = format!("type=registry,ref={r}");
    let session = BlobSession::new(client, store, r, progress);
    let push_err = |source: PushError| CacheError::Registry {
        target: target.clone(),
        source: Box::new(source),
    };
    let sent = super::parallel(&planned.layers, 4, |l| {
        let attempt = session.push_layer(&l.blob, &l.diff_id, &l.media_type, l.size, planned.compression);
        match attempt {
            Err(PushError::Read { .. }) if !store.content().contains(&l.blob) => {
                // Not in the store and not mountable: fetch it from the cache it came from.
                super::fetch_for_export(store, imported, &l.blob, &target)?;
                session
                    .push_layer(&l.blob, &l.diff_id, &l.media_type, l.size, planned.compression)
                    .map_err(push_err)
            }
            other => other.map_err(push_err),
        }
    })?;
    let envelope = Envelope::of(&planned.config, &sent, image_manifest);
    let config_digest = session.push_bytes(&envelope.config).map_err(push_err)?;
    let mut blobs: Vec<Digest> = sent.iter().map(|s| s.digest).collect();
    blobs.push(config_digest);
    session
        .put_manifest(envelope.media_type, &envelope.manifest, &blobs)
        .map_err(push_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn inline_caches_foreign_missing_and_dangling() {
        let src = BlobSource::Dir(std::path::PathBuf::from("/nowhere"));
        let buildkit = json!({"moby.buildkit.cache.v0": "e30=", "rootfs": {"diff_ids": []}});
        assert!(matches!(
            inline(&buildkit, &[], src.clone()),
            Err(ImportError::Foreign(_))
        ));
        assert!(matches!(
            inline(&json!({}), &[], src.clone()),
            Err(ImportError::NoCache)
        ));
        // A record naming a layer the image does not have.
        let mut c = CacheConfig::new();
        c.layers.push(super::super::format::CacheLayer {
            digest: None,
            size: None,
            media_type: None,
            diff_id: Digest::of(b"elsewhere"),
        });
        let image = json!({INLINE_KEY: c, "rootfs": {"diff_ids": [Digest::of(b"mine").to_string()]}});
        let layer = (Digest::of(b"blob"), 4, media::OCI_LAYER_GZIP.to_string());
        assert!(matches!(
            inline(&image, std::slice::from_ref(&layer), src.clone()),
            Err(ImportError::InlineLayer(_))
        ));
        // The image's own layer: found by diff ID, its blob is the image's.
        let mut ok = c.clone();
        ok.layers[0].diff_id = Digest::of(b"mine");
        let image = json!({INLINE_KEY: ok, "rootfs": {"diff_ids": [Digest::of(b"mine").to_string()]}});
        let loaded = inline(&image, std::slice::from_ref(&layer), src).unwrap();
        assert_eq!(loaded.blobs, vec![layer]);
    }
}
