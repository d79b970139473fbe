//! `--annotation`: buildx's syntax (`[TYPE[,TYPE...]:]KEY=VALUE`, a type optionally qualified
//! by a platform, `manifest[linux/arm64]:KEY=VALUE`) and where each level lands in what kiln
//! writes, as BuildKit's image and OCI exporters place them:
//!
//! | level | one platform | several platforms (an index) |
//! | --- | --- | --- |
//! | `manifest` (the default) | the manifest | each manifest (of the qualifier's platform only, if given) |
//! | `manifest-descriptor` | the `index.json` entry of a `type=oci`/`type=docker` archive | each entry of the index (qualifier as above) |
//! | `index` | error, as BuildKit's: `index annotations not supported for single platform export` | the index |
//! | `index-descriptor` | the same error | the `index.json` entry of a `type=oci`/`type=docker` archive |
//!
//! A level no chosen output can carry is an error before the build runs: the local store and a
//! registry keep no descriptor of what a name points at, so a top-level descriptor's annotations
//! need an archive output. One deviation: BuildKit drops a platform-qualified `manifest` or
//! `manifest-descriptor` annotation in a single-platform build even when the platform matches;
//! kiln applies it when it matches the image's platform (and, as BuildKit, not when it does not).

use std::collections::BTreeMap;

use kiln_dag::Platform;

/// Where an annotation goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AnnotationLevel {
    Manifest,
    ManifestDescriptor,
    Index,
    IndexDescriptor,
}

impl AnnotationLevel {
    fn name(self) -> &'static str {
        match self {
            AnnotationLevel::Manifest => "manifest",
            AnnotationLevel::ManifestDescriptor => "manifest-descriptor",
            AnnotationLevel::Index => "index",
            AnnotationLevel::IndexDescriptor => "index-descriptor",
        }
    }
}

/// One `--annotation` for one level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Annotation {
    pub level: AnnotationLevel,
    /// `manifest[linux/arm64]:`: only that platform's manifest (or index entry), normalised.
    pub platform: Option<Platform>,
    pub key: String,
    pub value: String,
    /// The `--annotation` value it came from, for errors.
    pub arg: String,
}

/// An `--annotation` kiln cannot use.
#[derive(Debug, thiserror::Error)]
pub enum AnnotationError {
    #[error("invalid annotation \"{0}\", expected key=value")]
    NotKeyValue(String),
    #[error("invalid annotation type \"{kind}\" in `{arg}`, expected type and optional platform in square brackets")]
    BadType { arg: String, kind: String },
    #[error("unknown annotation type \"{kind}\" in `{arg}` (expected manifest, manifest-descriptor, index or index-descriptor)")]
    UnknownType { arg: String, kind: String },
    #[error("invalid platform \"{platform}\" in annotation `{arg}`")]
    Platform {
        arg: String,
        platform: String,
        #[source]
        source: kiln_dag::PlatformError,
    },
    #[error("invalid annotation `{arg}`: a platform qualifier applies to manifest and manifest-descriptor annotations only")]
    IndexPlatform { arg: String },
    #[error("invalid annotation `{arg}`: empty key")]
    EmptyKey { arg: String },
    #[error("index annotations not supported for single platform export (`--annotation {arg}`; build several --platform values to get an index)")]
    SinglePlatformIndex { arg: String },
    #[error("`--annotation {arg}`: {level} annotations land in the index.json of an archive; add -o type=oci or -o type=docker (the local store and registries keep no descriptor of {what})")]
    NoDescriptorOutput {
        arg: String,
        level: &'static str,
        what: &'static str,
    },
}

/// Parses one `--annotation` value into one annotation per type it names.
pub fn parse_annotation(arg: &str) -> Result<Vec<Annotation>, AnnotationError> {
    let (k, value) = arg
        .split_once('=')
        .ok_or_else(|| AnnotationError::NotKeyValue(arg.to_string()))?;
    let (types, key) = match k.split_once(':') {
        Some((types, key)) => (Some(types), key),
        None => (None, k),
    };
    if key.is_empty() {
        return Err(AnnotationError::EmptyKey { arg: arg.to_string() });
    }
    let one = |level, platform| Annotation {
        level,
        platform,
        key: key.to_string(),
        value: value.to_string(),
        arg: arg.to_string(),
    };
    let Some(types) = types else {
        return Ok(vec![one(AnnotationLevel::Manifest, None)]);
    };
    let mut out = Vec::new();
    for t in types.split(',') {
        // `type` or `type[platform]`: a lower-case type, a platform of [A-Za-z0-9_/-].
        let (kind, platform) = match t.split_once('[') {
            Some((kind, rest)) => match rest.strip_suffix(']') {
                Some(p) if !p.is_empty() => (kind, Some(p)),
                _ => (t, Some("")),
            },
            None => (t, None),
        };
        let bad_type = || AnnotationError::BadType {
            arg: arg.to_string(),
            kind: t.to_string(),
        };
        if kind.is_empty()
            || !kind.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            || platform.is_some_and(|p| {
                p.is_empty()
                    || !p
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '/' | '-'))
            })
        {
            return Err(bad_type());
        }
        let level = match kind {
            "manifest" => AnnotationLevel::Manifest,
            "manifest-descriptor" => AnnotationLevel::ManifestDescriptor,
            "index" => AnnotationLevel::Index,
            "index-descriptor" => AnnotationLevel::IndexDescriptor,
            other => {
                return Err(AnnotationError::UnknownType {
                    arg: arg.to_string(),
                    kind: other.to_string(),
                })
            }
        };
        let platform = match platform {
            None => None,
            Some(_) if matches!(level, AnnotationLevel::Index | AnnotationLevel::IndexDescriptor) => {
                return Err(AnnotationError::IndexPlatform { arg: arg.to_string() })
            }
            Some(p) => Some(
                Platform::parse(p)
                    .map_err(|source| AnnotationError::Platform {
                        arg: arg.to_string(),
                        platform: p.to_string(),
                        source,
                    })?
                    .normalized(),
            ),
        };
        out.push(one(level, platform));
    }
    Ok(out)
}

/// The annotations of a build, by where they land.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Placed {
    /// Per target platform (in the build's order): its manifest's annotations.
    pub manifest: Vec<BTreeMap<String, String>>,
    /// Per target platform: the annotations of the descriptor pointing at its manifest (an
    /// index entry, or with one platform the archive's `index.json` entry).
    pub manifest_descriptor: Vec<BTreeMap<String, String>>,
    /// The index's own annotations.
    pub index: BTreeMap<String, String>,
    /// The archive's `index.json` entry of the index.
    pub index_descriptor: BTreeMap<String, String>,
}

impl Placed {
    /// Places `annotations` (later ones win for the same key and level, as buildx's map does)
    /// for a build of `platforms`; `archive` tells whether an output writes an `index.json`.
    pub fn of(
        annotations: &[Annotation],
        platforms: &[Platform],
        archive: bool,
    ) -> Result<Placed, AnnotationError> {
        let several = platforms.len() > 1;
        let mut placed = Placed {
            manifest: vec![BTreeMap::new(); platforms.len()],
            manifest_descriptor: vec![BTreeMap::new(); platforms.len()],
            ..Placed::default()
        };
        for a in annotations {
            let arg = &a.arg;
            let no_archive = |what| AnnotationError::NoDescriptorOutput {
                arg: arg.clone(),
                level: a.level.name(),
                what,
            };
            let per_platform = |maps: &mut Vec<BTreeMap<String, String>>| {
                for (p, m) in platforms.iter().zip(maps.iter_mut()) {
                    if a.platform.as_ref().is_none_or(|want| want == &p.normalized()) {
                        m.insert(a.key.clone(), a.value.clone());
                    }
                }
            };
            match a.level {
                AnnotationLevel::Index | AnnotationLevel::IndexDescriptor if !several => {
                    return Err(AnnotationError::SinglePlatformIndex { arg: arg.clone() })
                }
                AnnotationLevel::Manifest => per_platform(&mut placed.manifest),
                AnnotationLevel::ManifestDescriptor if !several && !archive => {
                    return Err(no_archive("a single-platform image's manifest"))
                }
                AnnotationLevel::ManifestDescriptor => per_platform(&mut placed.manifest_descriptor),
                AnnotationLevel::Index => {
                    placed.index.insert(a.key.clone(), a.value.clone());
                }
                AnnotationLevel::IndexDescriptor if !archive => return Err(no_archive("an index")),
                AnnotationLevel::IndexDescriptor => {
                    placed.index_descriptor.insert(a.key.clone(), a.value.clone());
                }
            }
        }
        Ok(placed)
    }

    /// The annotations of the `index.json` entry of an archive of this build.
    pub fn archive_entry(&self, several: bool) -> BTreeMap<String, String> {
        if several {
            self.index_descriptor.clone()
        } else {
            self.manifest_descriptor.first().cloned().unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Vec<Annotation> {
        parse_annotation(s).unwrap()
    }

    #[test]
    fn buildx_syntax() {
        let a = parse("org.opencontainers.image.title=app");
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].level, AnnotationLevel::Manifest);
        assert_eq!(a[0].key, "org.opencontainers.image.title");
        assert_eq!(a[0].value, "app");
        let a = parse("index,manifest-descriptor:k=v=w");
        assert_eq!(
            a.iter().map(|a| a.level).collect::<Vec<_>>(),
            [AnnotationLevel::Index, AnnotationLevel::ManifestDescriptor]
        );
        assert_eq!(a[0].value, "v=w");
        let a = parse("manifest[linux/arm64]:k=v");
        assert_eq!(
            a[0].platform,
            Some(Platform::parse("linux/arm64").unwrap().normalized())
        );
        for (bad, msg) in [
            ("novalue", "expected key=value"),
            ("bogus:k=v", "unknown annotation type \"bogus\""),
            ("Manifest:k=v", "invalid annotation type \"Manifest\""),
            ("manifest[linux/arm64:k=v", "invalid annotation type"),
            ("manifest[]:k=v", "invalid annotation type"),
            ("manifest[lin ux]:k=v", "invalid annotation type"),
            ("index[linux/amd64]:k=v", "platform qualifier applies to manifest"),
            ("manifest:=v", "empty key"),
        ] {
            let e = parse_annotation(bad).unwrap_err().to_string();
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }

    #[test]
    fn levels_land_where_the_outputs_carry_them() {
        let amd = Platform::parse("linux/amd64").unwrap();
        let arm = Platform::parse("linux/arm64").unwrap();
        let all = |specs: &[&str]| specs.iter().flat_map(|s| parse(s)).collect::<Vec<_>>();
        let one = Placed::of(
            &all(&["a=1", "manifest[linux/arm64]:b=2", "a=3"]),
            std::slice::from_ref(&amd),
            false,
        )
        .unwrap();
        assert_eq!(
            one.manifest[0],
            BTreeMap::from([("a".to_string(), "3".to_string())])
        );
        let e = Placed::of(&all(&["index:a=1"]), std::slice::from_ref(&amd), true).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("index annotations not supported for single platform export"),
            "{e}"
        );
        let e = Placed::of(
            &all(&["manifest-descriptor:a=1"]),
            std::slice::from_ref(&amd),
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("add -o type=oci"), "{e}");
        let one = Placed::of(
            &all(&["manifest-descriptor:a=1"]),
            std::slice::from_ref(&amd),
            true,
        )
        .unwrap();
        assert_eq!(one.archive_entry(false).get("a").map(String::as_str), Some("1"));
        let two = Placed::of(
            &all(&[
                "manifest[linux/arm64]:m=arm",
                "index:i=1",
                "manifest-descriptor:d=x",
            ]),
            &[amd.clone(), arm.clone()],
            false,
        )
        .unwrap();
        assert!(two.manifest[0].is_empty());
        assert_eq!(two.manifest[1].get("m").map(String::as_str), Some("arm"));
        assert_eq!(two.index.get("i").map(String::as_str), Some("1"));
        assert_eq!(two.manifest_descriptor[0].get("d").map(String::as_str), Some("x"));
        assert!(Placed::of(&all(&["index-descriptor:a=1"]), &[amd, arm], false).is_err());
    }
}
