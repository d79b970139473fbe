//! Base images for the frontend: `FROM` and `COPY --from` look in the local image store first
//! and pull what is missing (or everything, with `--pull`) through `kiln_source::registry`.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use kiln_cache::images::{Image, ImageError};
use kiln_cache::reference::Reference;
use kiln_cache::Store;
use kiln_dag::{Digest, Platform};
use kiln_frontend::lower::{ImageResolver, ResolvedImage, ResolverError};
use kiln_solver::progress::{EventKind, ProgressSink};
use kiln_source::registry::{self, Client};

/// The frontend's [`ImageResolver`] over the store and a registry client.
pub(crate) struct StoreResolver<'a> {
    pub store: &'a Store,
    pub client: &'a Client,
    /// `--pull`: re-resolve every tag against its registry.
    pub pull: bool,
    /// Where each resolution shows as `[internal] load metadata for REF`.
    pub progress: &'a ProgressSink,
    /// The references shown already (the frontend may resolve one several times).
    pub shown: Mutex<HashSet<String>>,
}

impl ImageResolver for StoreResolver<'_> {
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage, ResolverError> {
        let reference_norm = Reference::parse(reference)
            .map(|r| r.to_string())
            .unwrap_or_else(|_| reference.to_string());
        let vertex = Digest::of(format!("kiln-build load metadata {reference_norm} {platform:?}").as_bytes());
        let show = self
            .shown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(reference_norm.clone());
        let started = Instant::now();
        if show {
            self.progress.send(EventKind::Started {
                vertex,
                name: format!("[internal] load metadata for {reference_norm}"),
            });
        }
        // An index's image for `platform`; a single-platform image of another platform is the
        // frontend's warning (InvalidBaseImagePlatform), as in BuildKit.
        let image = match self.store.images().resolve_for(reference, platform) {
            Ok(image) if !self.pull => Ok(image),
            // A local index without the platform (one built here has no registry to ask).
            Err(e @ ImageError::NoPlatform { .. }) if !self.pull => Err(ResolverError::Read {
                reference: reference_norm.clone(),
                source: Box::new(e),
            }),
            local => pull_for_build(self.store, self.client, reference, platform, local),
        };
        if show {
            self.progress.send(match &image {
                Ok(_) => EventKind::Completed {
                    vertex,
                    duration: started.elapsed(),
                },
                Err(e) => EventKind::Failed {
                    vertex,
                    duration: started.elapsed(),
                    error: kiln_solver::progress::error_chain(e),
                },
            });
        }
        let image = image?;
        Ok(ResolvedImage {
            reference: reference_norm,
            digest: Some(image.manifest_digest),
            config: image.config,
        })
    }
}

/// Pulls `reference` (missing locally, or `--pull`) and returns the image. `local` is the local
/// lookup's result; a local digest reference is used without asking the registry.
fn pull_for_build(
    store: &Store,
    client: &Client,
    reference: &str,
    platform: &Platform,
    local: Result<Image, ImageError>,
) -> Result<Image, ResolverError> {
    let r = match Reference::parse(reference) {
        Ok(r) => r,
        Err(e) => {
            return local.map_err(|le| ResolverError::NotPullable {
                reference: reference.to_string(),
                local: Box::new(le),
                reason: Box::new(e),
            })
        }
    };
    if r.digest().is_some() {
        if let Ok(image) = local {
            return Ok(image);
        }
    }
    let opts = registry::PullOptions {
        platform: platform.clone(),
        jobs: 4,
        tap: crate::unpack_tap::UnpackTap::at(&store.snapshots_dir())
            .map(|t| std::sync::Arc::new(t) as std::sync::Arc<dyn registry::LayerTap>),
    };
    match registry::pull(client, store, &r, &opts, &registry::NoProgress) {
        Ok(p) => store.images().get(&p.manifest).map_err(|e| ResolverError::Read {
            reference: r.to_string(),
            source: Box::new(e),
        }),
        Err(e) => Err(match local {
            Ok(_) => ResolverError::Repull {
                reference: r.to_string(),
                source: Box::new(e),
            },
            Err(_) => ResolverError::Pull {
                reference: r.to_string(),
                source: Box::new(e),
            },
        }),
    }
}
