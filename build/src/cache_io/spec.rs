//! `--cache-to` and `--cache-from`: BuildKit's syntax (CSV `key=value` fields, `type=` anywhere;
//! a value without `=` is a registry reference, Docker's short form).
//!
//! | type | `--cache-to` keys | `--cache-from` keys |
//! | --- | --- | --- |
//! | `registry` | `ref`, `mode`, `compression`, `image-manifest`, `oci-mediatypes=true`, `ignore-error`, `registry.insecure`, `cache-mounts`, `cache-mounts-max-size` | `ref`, `registry.insecure` |
//! | `local` | `dest`, `mode`, `compression`, `oci-mediatypes=true`, `ignore-error`, `cache-mounts`, `cache-mounts-max-size` | `src` |
//! | `inline` | none (the result's own layers, as `mode=min`) | (a registry ref holding the image) |
//!
//! `gha`, `s3`, `azblob` and every key not in the table are errors naming them.

use std::path::PathBuf;

use kiln_cache::reference::Reference;
use kiln_source::registry::Compression;

use crate::options::{self, parse_bool, Options, OptionsError};

/// `mode=`: which steps' results are exported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// The records of the result's own layers (BuildKit's default).
    #[default]
    Min,
    /// Every step's result, intermediate stages included.
    Max,
}

/// `cache-mounts=`: which `RUN --mount=type=cache` contents travel with the cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum MountFilter {
    /// None (the default).
    #[default]
    None,
    /// `cache-mounts=true`: every cache mount the build used.
    All,
    /// `cache-mounts=ID,ID`: these ids.
    Ids(Vec<String>),
}

impl MountFilter {
    /// Whether the mount `id` is exported.
    pub fn wants(&self, id: &str) -> bool {
        match self {
            MountFilter::None => false,
            MountFilter::All => true,
            MountFilter::Ids(ids) => ids.iter().any(|i| i == id),
        }
    }
}

/// How an export writes, for every type that writes blobs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportOptions {
    pub mode: Mode,
    /// How layers kept uncompressed travel (gzip by default).
    pub compression: Compression,
    /// `ignore-error=true`: a failed export is a warning, not a failed build.
    pub ignore_error: bool,
    pub mounts: MountFilter,
    /// `cache-mounts-max-size=`: mounts whose contents are larger are not exported (bytes).
    pub mounts_max_size: Option<u64>,
}

/// One `--cache-to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheTo {
    /// A cache manifest at `reference`.
    Registry {
        reference: Reference,
        /// `image-manifest=true` (kiln's default): an OCI image manifest whose config is the
        /// cache config; `false`: an OCI index listing the config and the layers.
        image_manifest: bool,
        insecure: bool,
        opts: ExportOptions,
    },
    /// An OCI image layout in a directory.
    Local { dest: PathBuf, opts: ExportOptions },
    /// The cache config in the image config of the pushed or exported image.
    Inline,
}

impl CacheTo {
    /// The export options (inline: mode=min, nothing else).
    pub fn options(&self) -> ExportOptions {
        match self {
            CacheTo::Registry { opts, .. } | CacheTo::Local { opts, .. } => opts.clone(),
            CacheTo::Inline => ExportOptions::default(),
        }
    }

    /// What the progress and warnings call it.
    pub fn describe(&self) -> String {
        match self {
            CacheTo::Registry { reference, .. } => format!("type=registry,ref={reference}"),
            CacheTo::Local { dest, .. } => format!("type=local,dest={}", dest.display()),
            CacheTo::Inline => "type=inline".to_string(),
        }
    }
}

/// One `--cache-from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheFrom {
    /// A cache manifest, or an image with an inline cache, at `reference`.
    Registry { reference: Reference, insecure: bool },
    /// An OCI image layout written by `--cache-to type=local`.
    Local { src: PathBuf },
}

impl CacheFrom {
    /// What the progress and warnings call it.
    pub fn describe(&self) -> String {
        match self {
            CacheFrom::Registry { reference, .. } => format!("type=registry,ref={reference}"),
            CacheFrom::Local { src } => format!("type=local,src={}", src.display()),
        }
    }
}

/// A `--cache-to`/`--cache-from` value kiln cannot use; every variant quotes the flag and value.
#[derive(Debug, thiserror::Error)]
pub enum CacheSpecError {
    #[error("invalid {flag} `{spec}`: it is not CSV ({reason})")]
    Csv {
        flag: &'static str,
        spec: String,
        reason: String,
    },
    #[error("invalid {flag} `{spec}`: `{field}` is not KEY=VALUE")]
    NotKeyValue {
        flag: &'static str,
        spec: String,
        field: String,
    },
    #[error("invalid {flag} `{spec}`: cache type `{kind}` is not supported by kiln (expected registry, local or inline); a cache is kept in an OCI registry or a directory")]
    UnsupportedType {
        flag: &'static str,
        spec: String,
        kind: String,
    },
    #[error("invalid {flag} `{spec}`: unknown cache type `{kind}` (expected registry, local or inline)")]
    UnknownType {
        flag: &'static str,
        spec: String,
        kind: String,
    },
    #[error("invalid {flag} `{spec}`: unknown key `{key}` for type={kind}")]
    UnknownKey {
        flag: &'static str,
        spec: String,
        key: String,
        kind: String,
    },
    #[error("invalid {flag} `{spec}`: type={kind} needs {key}=")]
    Missing {
        flag: &'static str,
        spec: String,
        kind: String,
        key: &'static str,
    },
    #[error("invalid {flag} `{spec}`: `{key}={value}` {why}")]
    BadValue {
        flag: &'static str,
        spec: String,
        key: String,
        value: String,
        why: &'static str,
    },
    #[error("invalid {flag} `{spec}`: invalid reference `{value}`")]
    Reference {
        flag: &'static str,
        spec: String,
        value: String,
        #[source]
        source: kiln_cache::reference::ReferenceError,
    },
}

const TO: &str = "--cache-to";
const FROM: &str = "--cache-from";

/// The fields of one value: the type (`registry` for Docker's short form) and the other pairs.
fn fields(flag: &'static str, spec: &str) -> Result<(String, Vec<(String, String)>), CacheSpecError> {
    if !spec.contains('=') {
        return Ok(("registry".into(), vec![("ref".into(), spec.trim().to_string())]));
    }
    let Options { kind, pairs } = options::parse(spec).map_err(|e| match e {
        OptionsError::Csv(reason) => CacheSpecError::Csv {
            flag,
            spec: spec.to_string(),
            reason,
        },
        OptionsError::NotKeyValue(field) => CacheSpecError::NotKeyValue {
            flag,
            spec: spec.to_string(),
            field,
        },
    })?;
    // buildx: a value with a ref= but no type= is a registry cache.
    let kind = kind.unwrap_or_else(|| "registry".to_string());
    match kind.as_str() {
        "registry" | "local" | "inline" => Ok((kind, pairs)),
        "gha" | "s3" | "azblob" => Err(CacheSpecError::UnsupportedType {
            flag,
            spec: spec.to_string(),
            kind,
        }),
        _ => Err(CacheSpecError::UnknownType {
            flag,
            spec: spec.to_string(),
            kind,
        }),
    }
}

struct Ctx<'a> {
    flag: &'static str,
    spec: &'a str,
    kind: &'a str,
}

impl Ctx<'_> {
    fn unknown(&self, key: &str) -> CacheSpecError {
        CacheSpecError::UnknownKey {
            flag: self.flag,
            spec: self.spec.to_string(),
            key: key.to_string(),
            kind: self.kind.to_string(),
        }
    }

    fn bad(&self, key: &str, value: &str, why: &'static str) -> CacheSpecError {
        CacheSpecError::BadValue {
            flag: self.flag,
            spec: self.spec.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            why,
        }
    }

    fn boolean(&self, key: &str, value: &str) -> Result<bool, CacheSpecError> {
        parse_bool(value).ok_or_else(|| self.bad(key, value, "is not a boolean"))
    }

    fn missing(&self, key: &'static str) -> CacheSpecError {
        CacheSpecError::Missing {
            flag: self.flag,
            spec: self.spec.to_string(),
            kind: self.kind.to_string(),
            key,
        }
    }

    fn reference(&self, value: &str) -> Result<Reference, CacheSpecError> {
        Reference::parse(value).map_err(|source| CacheSpecError::Reference {
            flag: self.flag,
            spec: self.spec.to_string(),
            value: value.to_string(),
            source,
        })
    }
}

/// Parses one `--cache-to` value.
pub fn parse_cache_to(spec: &str) -> Result<CacheTo, CacheSpecError> {
    let (kind, pairs) = fields(TO, spec)?;
    let c = Ctx {
        flag: TO,
        spec,
        kind: &kind,
    };
    if kind == "inline" {
        if let Some((k, _)) = pairs.first() {
            return Err(c.unknown(k));
        }
        return Ok(CacheTo::Inline);
    }
    let mut opts = ExportOptions::default();
    let (mut reference, mut dest, mut image_manifest, mut insecure) = (None, None, true, false);
    for (key, value) in &pairs {
        match (kind.as_str(), key.as_str()) {
            ("registry", "ref") => reference = Some(c.reference(value)?),
            ("registry", "image-manifest") => image_manifest = c.boolean(key, value)?,
            ("registry", "registry.insecure") => insecure = c.boolean(key, value)?,
            ("local", "dest") => dest = Some(PathBuf::from(value)),
            (_, "mode") => {
                opts.mode = match value.as_str() {
                    "min" => Mode::Min,
                    "max" => Mode::Max,
                    _ => return Err(c.bad(key, value, "is not a mode (expected min or max)")),
                }
            }
            (_, "compression") => {
                opts.compression = match value.as_str() {
                    "gzip" => Compression::Gzip,
                    "zstd" => Compression::Zstd,
                    "uncompressed" => Compression::Uncompressed,
                    "estargz" => {
                        return Err(c.bad(key, value, "is not supported: kiln does not write eStargz layers"))
                    }
                    _ => {
                        return Err(c.bad(
                            key,
                            value,
                            "is not a compression (expected gzip, zstd or uncompressed)",
                        ))
                    }
                }
            }
            (_, "oci-mediatypes") => {
                if !c.boolean(key, value)? {
                    return Err(c.bad(key, value, "is not supported: kiln writes OCI media types only"));
                }
            }
            (_, "ignore-error") => opts.ignore_error = c.boolean(key, value)?,
            (_, "cache-mounts") => {
                opts.mounts = match parse_bool(value) {
                    Some(true) => MountFilter::All,
                    Some(false) => MountFilter::None,
                    None => MountFilter::Ids(
                        value
                            .split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect(),
                    ),
                }
            }
            (_, "cache-mounts-max-size") => {
                // Docker's sizes, as `--keep-storage` and KILN_GC_KEEP_STORAGE: binary units.
                opts.mounts_max_size = Some(
                    kiln_dag::units::ram_in_bytes(value)
                        .map_err(|_| c.bad(key, value, "is not a size (e.g. 512mb, 2GiB)"))?,
                )
            }
            _ => return Err(c.unknown(key)),
        }
    }
    match kind.as_str() {
        "registry" => Ok(CacheTo::Registry {
            reference: reference.ok_or_else(|| c.missing("ref"))?,
            image_manifest,
            insecure,
            opts,
        }),
        _ => Ok(CacheTo::Local {
            dest: dest.ok_or_else(|| c.missing("dest"))?,
            opts,
        }),
    }
}

/// Parses one `--cache-from` value.
pub fn parse_cache_from(spec: &str) -> Result<CacheFrom, CacheSpecError> {
    let (kind, pairs) = fields(FROM, spec)?;
    let c = Ctx {
        flag: FROM,
        spec,
        kind: &kind,
    };
    let (mut reference, mut src, mut insecure) = (None, None, false);
    for (key, value) in &pairs {
        match (kind.as_str(), key.as_str()) {
            ("registry", "ref") => reference = Some(c.reference(value)?),
            ("registry", "registry.insecure") => insecure = c.boolean(key, value)?,
            ("local", "src") => src = Some(PathBuf::from(value)),
            _ => return Err(c.unknown(key)),
        }
    }
    match kind.as_str() {
        "registry" => Ok(CacheFrom::Registry {
            reference: reference.ok_or_else(|| c.missing("ref"))?,
            insecure,
        }),
        "local" => Ok(CacheFrom::Local {
            src: src.ok_or_else(|| c.missing("src"))?,
        }),
        _ => Err(CacheSpecError::UnknownType {
            flag: FROM,
            spec: spec.to_string(),
            kind: format!("{kind} (an inline cache is read with --cache-from REF)"),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn registry_cache_to_with_every_key() {
        let c = parse_cache_to(
            "type=registry,ref=localhost:5000/app:cache,mode=max,compression=zstd,image-manifest=false,oci-mediatypes=true,ignore-error=true,cache-mounts=go,npm,cache-mounts-max-size=1GiB",
        );
        // `cache-mounts=go,npm` outside quotes is two fields: `npm` is not KEY=VALUE.
        assert!(matches!(c, Err(CacheSpecError::NotKeyValue { .. })), "{c:?}");
        let c = parse_cache_to(
            r#"type=registry,ref=localhost:5000/app:cache,mode=max,compression=zstd,image-manifest=false,oci-mediatypes=true,ignore-error=true,"cache-mounts=go,npm",cache-mounts-max-size=1GiB"#,
        )
        .unwrap();
        let CacheTo::Registry {
            reference,
            image_manifest,
            opts,
            ..
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!(reference.to_string(), "localhost:5000/app:cache");
        assert!(!image_manifest);
        assert_eq!(opts.mode, Mode::Max);
        assert_eq!(opts.compression, Compression::Zstd);
        assert!(opts.ignore_error);
        assert_eq!(opts.mounts, MountFilter::Ids(vec!["go".into(), "npm".into()]));
        assert_eq!(opts.mounts_max_size, Some(1 << 30));
    }

    #[test]
    fn short_forms_local_and_inline() {
        assert_eq!(
            parse_cache_from("localhost:5000/app:cache").unwrap(),
            CacheFrom::Registry {
                reference: Reference::parse("localhost:5000/app:cache").unwrap(),
                insecure: false
            }
        );
        assert_eq!(
            parse_cache_from("type=local,src=/tmp/c").unwrap(),
            CacheFrom::Local { src: "/tmp/c".into() }
        );
        assert!(matches!(
            parse_cache_to("type=local,dest=/tmp/c,mode=max").unwrap(),
            CacheTo::Local {
                opts: ExportOptions { mode: Mode::Max, .. },
                ..
            }
        ));
        assert_eq!(parse_cache_to("type=inline").unwrap(), CacheTo::Inline);
        let c = parse_cache_to("ref=localhost:5000/x:c").unwrap();
        assert!(matches!(
            c,
            CacheTo::Registry {
                image_manifest: true,
                ..
            }
        ));
    }

    #[test]
    fn clear_errors() {
        let e = |s: &str| parse_cache_to(s).unwrap_err().to_string();
        assert!(
            e("type=gha").contains("`gha` is not supported"),
            "{}",
            e("type=gha")
        );
        assert!(e("type=s3,bucket=x").contains("not supported"));
        assert!(e("type=azblob").contains("not supported"));
        assert!(e("type=nope").contains("unknown cache type `nope`"));
        assert!(e("type=registry,ref=a/b,colour=red").contains("unknown key `colour`"));
        assert!(e("type=registry,mode=max").contains("needs ref="));
        assert!(e("type=local").contains("needs dest="));
        assert!(e("type=registry,ref=a/b,mode=all").contains("mode=all"));
        assert!(e("type=registry,ref=a/b,oci-mediatypes=false").contains("OCI media types only"));
        assert!(e("type=inline,mode=max").contains("unknown key `mode`"));
        assert!(e("type=local,dest=d,ref=x/y").contains("unknown key `ref`"));
        let f = |s: &str| parse_cache_from(s).unwrap_err().to_string();
        assert!(f("type=local,dest=/x").contains("unknown key `dest`"));
        assert!(f("type=gha,scope=x").contains("not supported"));
        assert!(f("type=registry,ref=a/b,mode=max").contains("unknown key `mode`"));
        assert!(e("type=local,dest=d,cache-mounts-max-size=lots").contains("is not a size"));
    }
}
