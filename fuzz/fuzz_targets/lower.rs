//! Feeds arbitrary bytes to the whole frontend: whatever the parser accepts is lowered to a
//! build graph against a resolver that hands every image the same empty config. Lowering may
//! reject its input with an error, but must never panic; a graph it returns must render.
#![no_main]

use kiln_dag::image::ImageConfig;
use kiln_dag::Platform;
use kiln_frontend::lower::{lower, ImageResolver, LowerOptions, ResolvedImage, ResolverError};
use libfuzzer_sys::fuzz_target;

/// Resolves every reference to an empty linux/amd64 config.
struct EmptyResolver;

impl ImageResolver for EmptyResolver {
    fn resolve(&self, reference: &str, _platform: &Platform) -> Result<ResolvedImage, ResolverError> {
        if reference.is_empty() {
            return Err(ResolverError::NotFound {
                reference: String::new(),
                place: "the fuzz resolver".into(),
            });
        }
        Ok(ResolvedImage {
            reference: reference.to_string(),
            digest: None,
            config: ImageConfig {
                architecture: "amd64".into(),
                os: "linux".into(),
                ..ImageConfig::default()
            },
        })
    }
}

fuzz_target!(|data: &[u8]| {
    match lower(data, &LowerOptions::default(), &EmptyResolver) {
        Ok(l) => {
            let _ = l.graph.render(&[l.root]);
        }
        Err(e) => {
            let _ = e.render(data);
        }
    }
});
