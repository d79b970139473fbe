//! What a build reports about its result in BuildKit's terms: the exporter response keys that
//! `docker buildx build --metadata-file` writes, and a unique build ref.

use kiln_dag::Digest;
use serde_json::{json, Map, Value};

use crate::BuildResult;

/// A content descriptor (OCI's `mediaType`, `digest`, `size`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// A new build ref in buildx's `builder/node/ref` shape: `kiln/kiln0/` and 25 base-36 digits of
/// a 128-bit random number (BuildKit's `identity.NewID`).
pub(crate) fn new_build_ref() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source: the time and the process still make the ref unique on this host.
        let seed = format!("{:?} {}", std::time::SystemTime::now(), std::process::id());
        bytes.copy_from_slice(&Digest::of(seed.as_bytes()).0[..16]);
    }
    format!("kiln/kiln0/{}", base36(u128::from_be_bytes(bytes)))
}

/// `n` in base 36 (`0-9a-z`), zero-padded to 25 digits (36^25 > 2^128).
fn base36(mut n: u128) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = [b'0'; 25];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `--metadata-file` object of a result: `buildx.build.ref`, `containerimage.config.digest`,
/// `containerimage.descriptor` (with BuildKit's `config.digest` and
/// `org.opencontainers.image.created` annotations), `containerimage.digest` and, when the image
/// has names, `image.name` (comma-joined, normalised). After a push the descriptor and digest
/// are the pushed manifest's, which is what `NAME@DIGEST` pulls.
pub(crate) fn metadata(result: &BuildResult) -> Value {
    let image = result.image();
    let desc = result.descriptor();
    let mut annotations = Map::new();
    annotations.insert("config.digest".into(), json!(image.config_digest.to_string()));
    if let Some(created) = &image.config.created {
        annotations.insert("org.opencontainers.image.created".into(), json!(created));
    }
    let mut out = Map::new();
    out.insert("buildx.build.ref".into(), json!(result.build_ref));
    out.insert(
        "containerimage.config.digest".into(),
        json!(image.config_digest.to_string()),
    );
    out.insert(
        "containerimage.descriptor".into(),
        json!({
            "mediaType": desc.media_type,
            "digest": desc.digest.to_string(),
            "size": desc.size,
            "annotations": annotations,
        }),
    );
    out.insert("containerimage.digest".into(), json!(desc.digest.to_string()));
    if !result.names.is_empty() {
        let names: Vec<String> = result.names.iter().map(|n| n.to_string()).collect();
        out.insert("image.name".into(), json!(names.join(",")));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_refs_have_buildx_shape_and_differ() {
        let a = new_build_ref();
        let b = new_build_ref();
        assert_ne!(a, b);
        let parts: Vec<&str> = a.split('/').collect();
        assert_eq!(parts.len(), 3, "{a}");
        assert_eq!(parts[2].len(), 25, "{a}");
        assert!(
            parts[2]
                .bytes()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()),
            "{a}"
        );
        assert_eq!(base36(0), "0".repeat(25));
        assert_eq!(base36(u128::MAX).len(), 25);
        assert_eq!(&base36(35)[24..], "z");
    }
}
