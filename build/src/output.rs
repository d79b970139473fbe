//! Outputs: where a build's result goes besides the local store, and the parser of BuildKit's
//! `-o`/`--output` syntax (CSV fields of `key=value`, `type=` first or anywhere).
//!
//! | type | keys kiln implements |
//! | --- | --- |
//! | `image` | `name` (repeatable, or `"name=A,B"`), `push`, `compression`, `oci-mediatypes`, `registry.insecure`, `store` |
//! | `registry` | the same; `push` is always true and the names are not tagged locally |
//! | `docker`, `oci` | `dest` (a file, `-` = stdout), `name`, `compression=uncompressed`, `oci-mediatypes=true` |
//! | `tar` | `dest` |
//! | `local` | `dest` (a directory) |
//!
//! Every other key, and values kiln cannot honour (`compression=gzip` for an archive,
//! `oci-mediatypes=false`, `store=false`), is an error naming it, never ignored.

use std::path::PathBuf;

use kiln_cache::reference::Reference;

use crate::options::{self, parse_bool, Options, OptionsError};
pub use kiln_source::registry::Compression;

/// A parsed output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputSpec {
    /// An image in the local store (always written) that is tagged and/or pushed.
    Image(ImageOutput),
    /// A `docker load`-able archive.
    Docker(ArchiveOutput),
    /// An OCI image layout archive.
    Oci(ArchiveOutput),
    /// The final filesystem as a tar.
    Tar { dest: Destination },
    /// The final filesystem written into a directory.
    Local { dest: PathBuf },
}

/// `type=image` and `type=registry`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageOutput {
    /// `name=`: with none, the request's tags.
    pub names: Vec<Reference>,
    /// Whether the names are tagged in the local store (`type=image`; not `type=registry`).
    pub tag_locally: bool,
    /// `push=true` (`type=registry`, `--push`): every name is pushed.
    pub push: bool,
    /// `compression=`: how the layers kiln made travel to the registry; `None` = gzip.
    pub compression: Option<Compression>,
    /// `registry.insecure=true`: the names' registries are spoken to over plain HTTP.
    pub insecure: bool,
}

impl ImageOutput {
    /// `type=image` with no options.
    pub fn store() -> ImageOutput {
        ImageOutput {
            names: Vec::new(),
            tag_locally: true,
            push: false,
            compression: None,
            insecure: false,
        }
    }
}

/// `type=docker` and `type=oci`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveOutput {
    pub dest: Destination,
    /// `name=`: the names inside the archive; with none, the request's tags.
    pub names: Vec<Reference>,
}

/// Where an archive goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// The process's standard output (`dest=-`, or no `dest`).
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
}

/// An `-o` value kiln cannot use; every variant quotes the whole value.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("invalid output `{spec}`: it is not CSV ({reason})")]
    Csv { spec: String, reason: String },
    #[error("invalid output `{spec}`: `{field}` is not KEY=VALUE")]
    NotKeyValue { spec: String, field: String },
    #[error("invalid output `{spec}`: unknown type `{kind}` (expected image, registry, docker, oci, tar or local)")]
    UnknownType { spec: String, kind: String },
    #[error("invalid output `{spec}`: unknown key `{key}`")]
    UnknownKey { spec: String, key: String },
    #[error("invalid output `{spec}`: `{key}` does not apply to type={kind}")]
    KeyNotForType { spec: String, key: String, kind: String },
    #[error("invalid output `{spec}`: `{key}={value}` is not a boolean")]
    NotBool {
        spec: String,
        key: String,
        value: String,
    },
    #[error("invalid output `{spec}`: invalid name `{name}`")]
    Name {
        spec: String,
        name: String,
        #[source]
        source: kiln_cache::reference::ReferenceError,
    },
    #[error("invalid output `{spec}`: unknown compression `{value}` (expected gzip, zstd or uncompressed)")]
    UnknownCompression { spec: String, value: String },
    #[error("invalid output `{spec}`: `{key}={value}` is not supported: {why}")]
    Unsupported {
        spec: String,
        key: String,
        value: String,
        why: &'static str,
    },
    #[error("invalid output `{spec}`: type=local needs dest=DIR")]
    LocalWithoutDest { spec: String },
    #[error("--push and `-o {spec}` cannot be used together: only image outputs are pushed")]
    PushWithoutImage { spec: String },
}

/// Keys each type takes (besides `type`).
fn keys_of(kind: &str) -> &'static [&'static str] {
    match kind {
        "image" | "registry" => &[
            "name",
            "push",
            "compression",
            "oci-mediatypes",
            "registry.insecure",
            "store",
        ],
        "docker" | "oci" => &["dest", "name", "compression", "oci-mediatypes"],
        "tar" | "local" => &["dest"],
        _ => &[],
    }
}

/// Every key of any type: a key in none of them is unknown, one in another type's list does not
/// apply.
const ALL_KEYS: &[&str] = &[
    "dest",
    "name",
    "push",
    "compression",
    "oci-mediatypes",
    "registry.insecure",
    "store",
];

/// The keys of one output (all but `type`), parsed and checked against its type.
#[derive(Default)]
struct Attrs {
    dest: Option<String>,
    names: Vec<Reference>,
    push: bool,
    compression: Option<Compression>,
    insecure: bool,
}

impl Attrs {
    fn parse(spec: &str, kind: &str, pairs: &[(String, String)]) -> Result<Attrs, OutputError> {
        let allowed = keys_of(kind);
        let mut a = Attrs {
            // type=registry always pushes.
            push: kind == "registry",
            ..Attrs::default()
        };
        for (key, value) in pairs {
            if !allowed.contains(&key.as_str()) {
                return Err(if ALL_KEYS.contains(&key.as_str()) {
                    OutputError::KeyNotForType {
                        spec: spec.to_string(),
                        key: key.clone(),
                        kind: kind.to_string(),
                    }
                } else {
                    OutputError::UnknownKey {
                        spec: spec.to_string(),
                        key: key.clone(),
                    }
                });
            }
            let boolean = || {
                parse_bool(value).ok_or_else(|| OutputError::NotBool {
                    spec: spec.to_string(),
                    key: key.clone(),
                    value: value.clone(),
                })
            };
            // A boolean key kiln honours only when true.
            let only_true = |why: &'static str| match boolean()? {
                true => Ok(()),
                false => Err(unsupported(spec, key, value, why)),
            };
            match key.as_str() {
                "dest" => a.dest = Some(value.clone()),
                "name" => {
                    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                        let r = Reference::parse(name).map_err(|source| OutputError::Name {
                            spec: spec.to_string(),
                            name: name.to_string(),
                            source,
                        })?;
                        if !a.names.contains(&r) {
                            a.names.push(r);
                        }
                    }
                }
                "push" => a.push = a.push || boolean()?,
                "registry.insecure" => a.insecure = boolean()?,
                "store" => only_true("kiln always keeps the image in its store")?,
                "oci-mediatypes" => only_true("kiln writes OCI media types only")?,
                "compression" => a.compression = Some(parse_compression(spec, value)?),
                _ => {}
            }
        }
        Ok(a)
    }

    /// `dest` of an archive: a file, or stdout for none or `-`.
    fn destination(&self) -> Destination {
        match self.dest.as_deref() {
            None | Some("-") => Destination::Stdout,
            Some(d) => Destination::File(PathBuf::from(d)),
        }
    }
}

fn unsupported(spec: &str, key: &str, value: &str, why: &'static str) -> OutputError {
    OutputError::Unsupported {
        spec: spec.to_string(),
        key: key.to_string(),
        value: value.to_string(),
        why,
    }
}

fn parse_compression(spec: &str, value: &str) -> Result<Compression, OutputError> {
    match value {
        "gzip" => Ok(Compression::Gzip),
        "zstd" => Ok(Compression::Zstd),
        "uncompressed" => Ok(Compression::Uncompressed),
        "estargz" => Err(unsupported(
            spec,
            "compression",
            value,
            "kiln does not write eStargz layers",
        )),
        _ => Err(OutputError::UnknownCompression {
            spec: spec.to_string(),
            value: value.to_string(),
        }),
    }
}

/// Parses one `-o` value: `DIR` (`type=local,dest=DIR`), `-` (a tar on stdout), or CSV
/// `key=value` fields.
pub fn parse_output(spec: &str) -> Result<OutputSpec, OutputError> {
    if !spec.contains('=') {
        return Ok(if spec == "-" {
            OutputSpec::Tar {
                dest: Destination::Stdout,
            }
        } else {
            OutputSpec::Local {
                dest: PathBuf::from(spec),
            }
        });
    }
    let Options { kind, pairs } = options::parse(spec).map_err(|e| match e {
        OptionsError::Csv(reason) => OutputError::Csv {
            spec: spec.to_string(),
            reason,
        },
        OptionsError::NotKeyValue(field) => OutputError::NotKeyValue {
            spec: spec.to_string(),
            field,
        },
    })?;
    let kind = kind.unwrap_or_else(|| "image".to_string());
    if keys_of(&kind).is_empty() {
        return Err(OutputError::UnknownType {
            spec: spec.to_string(),
            kind,
        });
    }
    let attrs = Attrs::parse(spec, &kind, &pairs)?;
    match kind.as_str() {
        "image" | "registry" => Ok(OutputSpec::Image(ImageOutput {
            tag_locally: kind == "image",
            push: attrs.push,
            compression: attrs.compression,
            insecure: attrs.insecure,
            names: attrs.names,
        })),
        "docker" | "oci" => {
            if let Some(c) = attrs.compression.filter(|c| *c != Compression::Uncompressed) {
                return Err(unsupported(
                    spec,
                    "compression",
                    c.name(),
                    "kiln writes the layers it made into archives uncompressed (compression=uncompressed)",
                ));
            }
            let out = ArchiveOutput {
                dest: attrs.destination(),
                names: attrs.names,
            };
            Ok(if kind == "docker" {
                OutputSpec::Docker(out)
            } else {
                OutputSpec::Oci(out)
            })
        }
        "tar" => Ok(OutputSpec::Tar {
            dest: attrs.destination(),
        }),
        _ => match attrs.destination() {
            Destination::File(dest) => Ok(OutputSpec::Local { dest }),
            Destination::Stdout => Err(OutputError::LocalWithoutDest {
                spec: spec.to_string(),
            }),
        },
    }
}

/// Parses every `-o` value and applies `--push` as buildx does: image outputs get `push=true`;
/// with no output at all it adds `type=image,push=true`; with only other outputs it is an error.
pub fn parse_outputs(specs: &[String], push: bool) -> Result<Vec<OutputSpec>, OutputError> {
    let mut outputs = specs
        .iter()
        .map(|s| parse_output(s))
        .collect::<Result<Vec<_>, _>>()?;
    if push {
        let mut any_image = false;
        for o in &mut outputs {
            if let OutputSpec::Image(i) = o {
                i.push = true;
                any_image = true;
            }
        }
        if !any_image {
            match specs.first() {
                Some(spec) => {
                    return Err(OutputError::PushWithoutImage { spec: spec.clone() });
                }
                None => outputs.push(OutputSpec::Image(ImageOutput {
                    push: true,
                    ..ImageOutput::store()
                })),
            }
        }
    }
    for (o, spec) in outputs.iter().zip(specs) {
        if let OutputSpec::Image(i) = o {
            if let (Some(c), false) = (i.compression, i.push) {
                return Err(OutputError::Unsupported {
                    spec: spec.clone(),
                    key: "compression".into(),
                    value: c.name().into(),
                    why: "compression applies to what is pushed (kiln keeps layers uncompressed in its store); add push=true",
                });
            }
        }
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[test]
    fn shorthands_and_archives_parse_like_docker() {
        assert_eq!(
            parse_output("type=local,dest=out").unwrap(),
            OutputSpec::Local { dest: "out".into() }
        );
        assert_eq!(
            parse_output("out").unwrap(),
            OutputSpec::Local { dest: "out".into() }
        );
        assert_eq!(
            parse_output("-").unwrap(),
            OutputSpec::Tar {
                dest: Destination::Stdout
            }
        );
        assert_eq!(
            parse_output("type=docker,dest=i.tar").unwrap(),
            OutputSpec::Docker(ArchiveOutput {
                dest: Destination::File("i.tar".into()),
                names: vec![]
            })
        );
        assert_eq!(
            parse_output("type=oci,dest=-,name=a:1").unwrap(),
            OutputSpec::Oci(ArchiveOutput {
                dest: Destination::Stdout,
                names: vec![r("a:1")]
            })
        );
        assert!(matches!(
            parse_output("type=local").unwrap_err(),
            OutputError::LocalWithoutDest { .. }
        ));
    }

    #[test]
    fn image_names_in_every_form_buildx_accepts() {
        let want = vec![r("reg:5000/a:1"), r("reg:5000/b:2")];
        for spec in [
            "type=image,name=reg:5000/a:1,name=reg:5000/b:2,push=true",
            "type=image,\"name=reg:5000/a:1,reg:5000/b:2\",push=true",
            "push=true,type=image,\"name=reg:5000/a:1,reg:5000/b:2\"",
        ] {
            let OutputSpec::Image(i) = parse_output(spec).unwrap() else {
                panic!("{spec}: not an image output")
            };
            assert_eq!(i.names, want, "{spec}");
            assert!(i.push && i.tag_locally, "{spec}");
        }
        let OutputSpec::Image(i) = parse_output("type=registry,name=reg:5000/a:1").unwrap() else {
            panic!("not an image output")
        };
        assert!(i.push && !i.tag_locally);
        let OutputSpec::Image(i) = parse_output("type=registry,name=r/a,compression=zstd").unwrap() else {
            panic!("not an image output")
        };
        assert_eq!(i.compression, Some(Compression::Zstd));
    }

    #[test]
    fn every_unimplemented_key_or_value_is_an_error_naming_it() {
        for (spec, needle) in [
            ("type=image,name=a,push=true,unpack=true", "`unpack`"),
            ("type=image,name=a,push-by-digest=true", "`push-by-digest`"),
            ("type=image,annotation.x=y", "`annotation.x`"),
            ("type=image,name=a,push=maybe", "push=maybe"),
            ("type=registry,name=a,compression=brotli", "brotli"),
            ("type=registry,name=a,compression=estargz", "estargz"),
            (
                "type=registry,name=a,oci-mediatypes=false",
                "oci-mediatypes=false",
            ),
            ("type=image,store=false", "store=false"),
            ("type=oci,dest=x,compression=gzip", "compression=gzip"),
            ("type=tar,dest=x,name=a", "does not apply to type=tar"),
            ("type=local,dest=x,push=true", "does not apply to type=local"),
            ("type=docker,dest=x,push=true", "does not apply to type=docker"),
            ("type=s3,dest=x", "unknown type `s3`"),
            ("type=image,name=UPPER", "invalid name `UPPER`"),
            ("type=image,novalue", "`novalue` is not KEY=VALUE"),
        ] {
            let err = parse_output(spec).unwrap_err().to_string();
            assert!(err.contains(needle), "{spec}: {err}");
            assert!(err.contains(spec), "the error quotes the output: {err}");
        }
        assert!(parse_output("type=oci,dest=x,compression=uncompressed,oci-mediatypes=true").is_ok());
        assert!(parse_output("type=image,registry.insecure=true,store=true").is_ok());
    }

    #[test]
    fn push_flag_follows_buildx() {
        let outs = parse_outputs(&[], true).unwrap();
        assert_eq!(
            outs,
            vec![OutputSpec::Image(ImageOutput {
                push: true,
                ..ImageOutput::store()
            })]
        );
        let outs = parse_outputs(&["type=image,name=a".into(), "type=local,dest=d".into()], true).unwrap();
        assert!(matches!(&outs[0], OutputSpec::Image(i) if i.push));
        let err = parse_outputs(&["type=local,dest=d".into()], true).unwrap_err();
        assert!(err.to_string().contains("--push"), "{err}");
        assert!(parse_outputs(&[], false).unwrap().is_empty());
        // compression is about the push, which --push may turn on.
        let err = parse_outputs(&["type=image,name=a,compression=gzip".into()], false).unwrap_err();
        assert!(err.to_string().contains("add push=true"), "{err}");
        let outs = parse_outputs(&["type=image,name=a,compression=zstd".into()], true).unwrap();
        assert!(
            matches!(&outs[0], OutputSpec::Image(i) if i.push && i.compression == Some(Compression::Zstd))
        );
    }
}
