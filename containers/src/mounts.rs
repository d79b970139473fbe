//! `-v`, `--mount`, `--tmpfs` and `--volumes-from`: parsing the flags into [`MountRequest`]s
//! (recorded with the container) and resolving them, with the image's `VOLUME`s, into the
//! runtime's [`MountSpec`]s.
//!
//! Resolution follows Docker's order: image volumes get anonymous volumes, `--volumes-from`
//! mounts replace them, and the command line's mounts replace both; two command-line mounts on
//! one path are an error. Named and anonymous volumes are created on first use and, when empty,
//! receive the image's content at their mount point (not with `volume-nocopy`, never for binds).
//! The result is saved in `ROOT/containers/<id>/mounts.json`, which `--volumes-from`, the
//! volume store's in-use check and `inspect` read.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use kiln_runtime::MountSpec;
use serde::{Deserialize, Serialize};

use crate::volumes::{VolumeError, Volumes};

const MOUNTS_FILE: &str = "mounts.json";

/// Errors of parsing and resolving mounts.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A `-v` value of the wrong shape.
    #[error("invalid volume specification: '{0}'")]
    InvalidSpec(String),
    /// An unknown `-v` or `--volumes-from` mode.
    #[error("invalid mode: {0}")]
    InvalidMode(String),
    /// A target that is not absolute.
    #[error("invalid mount config for type \"{kind}\": invalid mount path: '{target}' mount path must be absolute")]
    RelativeTarget { kind: &'static str, target: String },
    /// A mount on `/`.
    #[error("invalid mount config for type \"{kind}\": invalid specification: destination can't be '/'")]
    RootTarget { kind: &'static str },
    /// A bind whose source does not exist.
    #[error("invalid mount config for type \"bind\": bind source path does not exist: {}", .0.display())]
    BindSourceMissing(PathBuf),
    /// A bind without a source.
    #[error("invalid mount config for type \"bind\": field Source must not be empty")]
    BindSourceEmpty,
    /// A bind source that is not absolute.
    #[error("invalid mount config for type \"bind\": invalid mount path: '{0}' mount path must be absolute")]
    BindSourceRelative(String),
    /// A tmpfs with a source.
    #[error("invalid mount config for type \"tmpfs\": field Source must be empty")]
    TmpfsSource,
    /// An option that only applies to another mount type.
    #[error("invalid mount config for type \"{kind}\": option '{option}' is not allowed")]
    OptionNotAllowed { kind: &'static str, option: String },
    /// A `--mount` field without `=` (other than the boolean ones).
    #[error("invalid field '{0}' must be a key=value pair")]
    NotKeyValue(String),
    /// An unknown `--mount` key.
    #[error("unexpected key '{key}' in '{field}'")]
    UnknownKey { key: String, field: String },
    /// An unknown `--mount` type.
    #[error("invalid mount type: '{0}'")]
    UnknownType(String),
    /// A value that does not parse.
    #[error("invalid value for {key}: {value}")]
    BadValue { key: &'static str, value: String },
    /// `--mount` without a target.
    #[error("target is required in --mount '{0}'")]
    TargetRequired(String),
    /// A size such as `64m` that does not parse.
    #[error("invalid size: '{0}'")]
    Size(String),
    /// An unknown `--tmpfs` option.
    #[error("invalid tmpfs option {0:?}")]
    TmpfsOption(String),
    /// A flag name [`parse_flag`] does not know.
    #[error("unknown mount flag --{0}")]
    UnknownFlag(String),
    /// Two mounts on one path.
    #[error("Duplicate mount point: {0}")]
    Duplicate(String),
    /// The `--volumes-from` container could not be found.
    #[error("--volumes-from {container}")]
    VolumesFrom {
        container: String,
        #[source]
        source: Box<crate::record::RecordError>,
    },
    /// A volume could not be created or read.
    #[error("failed to set up volume {name}")]
    Volume {
        name: String,
        #[source]
        source: VolumeError,
    },
    /// A volume name that is not valid.
    #[error(transparent)]
    VolumeName(VolumeError),
    /// The image's content could not be copied into a new volume.
    #[error("failed to copy the image's `{target}` into volume {name}")]
    CopyUp {
        target: String,
        name: String,
        #[source]
        source: crate::fs::FsError,
    },
    /// `mounts.json` could not be read.
    #[error("failed to read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `mounts.json` is not what this module writes.
    #[error("failed to parse `{path}`")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// `mounts.json` could not be written.
    #[error("failed to write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, MountError>;

/// One mount flag of `kiln run`/`create`, as recorded in the container's `HostConfig.Mounts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "Type", rename_all = "lowercase")]
pub enum MountRequest {
    /// A host path.
    Bind {
        /// Absolute host path.
        source: PathBuf,
        /// Absolute, cleaned path in the container.
        target: String,
        /// Read-only.
        readonly: bool,
        /// A missing source is created as a directory (`-v`, as Docker does; `--mount` fails).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        create: bool,
    },
    /// A named (`name: Some`) or anonymous volume.
    Volume {
        /// The volume's name; `None` for a new anonymous volume.
        name: Option<String>,
        /// Absolute, cleaned path in the container.
        target: String,
        /// Read-only.
        readonly: bool,
        /// `volume-nocopy` / `:nocopy`: do not copy the image's content into a new volume.
        nocopy: bool,
    },
    /// A tmpfs.
    Tmpfs {
        /// Absolute, cleaned path in the container.
        target: String,
        /// Size in bytes.
        size: Option<u64>,
        /// Mode of its root.
        mode: Option<u32>,
    },
    /// `--volumes-from CONTAINER[:ro|rw]`.
    VolumesFrom {
        /// Name or ID as given.
        container: String,
        /// `Some(true)` for `:ro`, `Some(false)` for `:rw`, `None` to keep each mount's mode.
        readonly: Option<bool>,
    },
}

impl MountRequest {
    /// The request's target (`None` for `--volumes-from`).
    pub fn target(&self) -> Option<&str> {
        match self {
            MountRequest::Bind { target, .. }
            | MountRequest::Volume { target, .. }
            | MountRequest::Tmpfs { target, .. } => Some(target),
            MountRequest::VolumesFrom { .. } => None,
        }
    }

    /// The JSON form stored in the container record.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Reads back [`MountRequest::to_value`]'s form.
    pub fn from_value(v: &serde_json::Value) -> std::result::Result<MountRequest, serde_json::Error> {
        MountRequest::deserialize(v)
    }
}

/// What a resolved mount is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A host path.
    Bind,
    /// A volume's `_data` dir, bind-mounted.
    Volume,
    /// A tmpfs.
    Tmpfs,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Bind => "bind",
            Kind::Volume => "volume",
            Kind::Tmpfs => "tmpfs",
        }
    }
}

/// A mount of a created container, as saved in `mounts.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedMount {
    /// What it is.
    pub kind: Kind,
    /// The volume's name.
    pub name: Option<String>,
    /// Host path mounted (empty for tmpfs).
    pub source: PathBuf,
    /// Absolute path in the container.
    pub target: String,
    /// Read-only.
    pub readonly: bool,
    /// An anonymous volume made for this container (removed with `rm -v` / `--rm`).
    #[serde(default)]
    pub anonymous: bool,
    /// tmpfs size in bytes.
    #[serde(default)]
    pub tmpfs_size: Option<u64>,
    /// tmpfs root mode.
    #[serde(default)]
    pub tmpfs_mode: Option<u32>,
}

impl ResolvedMount {
    /// The runtime's mount.
    pub fn to_spec(&self) -> MountSpec {
        match self.kind {
            Kind::Bind | Kind::Volume => MountSpec::Bind {
                source: self.source.clone(),
                target: self.target.clone(),
                readonly: self.readonly,
            },
            Kind::Tmpfs => MountSpec::Tmpfs {
                target: self.target.clone(),
                size: self.tmpfs_size,
                mode: self.tmpfs_mode,
            },
        }
    }

    /// An entry of Docker's `inspect` `Mounts` array.
    pub fn inspect_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "Type": self.kind.as_str(),
            "Source": self.source,
            "Destination": self.target,
            "Mode": if self.readonly { "ro" } else { "" },
            "RW": !self.readonly,
            "Propagation": if self.kind == Kind::Bind { "rprivate" } else { "" },
        });
        if let (Some(name), Some(obj)) = (&self.name, v.as_object_mut()) {
            obj.insert("Name".into(), serde_json::Value::String(name.clone()));
            obj.insert("Driver".into(), serde_json::Value::String("local".into()));
        }
        v
    }
}

/// Cleans an absolute container path (`//a/./b/../c/` -> `/a/c`); `kind` names the mount type
/// in errors.
fn clean_target(kind: &'static str, target: &str) -> Result<String> {
    if !target.starts_with('/') {
        return Err(MountError::RelativeTarget {
            kind,
            target: target.to_string(),
        });
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(target).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str().unwrap_or_default()),
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    if parts.is_empty() {
        return Err(MountError::RootTarget { kind });
    }
    Ok(format!("/{}", parts.join("/")))
}

const PROPAGATION: &[&str] = &["private", "rprivate", "shared", "rshared", "slave", "rslave"];

/// Parses `-v SRC:DST[:OPTS]`, `-v NAME:DST[:OPTS]` or `-v DST`. OPTS is a comma list of `ro`,
/// `rw`, `z`, `Z`, `nocopy`, a propagation mode or a consistency mode (`z`/`Z`, propagation and
/// consistency are accepted and have no effect).
pub fn parse_volume_arg(spec: &str) -> Result<MountRequest> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (source, target, mode) = match parts.as_slice() {
        [t] => (None, *t, ""),
        [_, m] if valid_mode(m) && !m.is_empty() => return Err(MountError::InvalidSpec(spec.to_string())),
        [s, t] => (Some(*s), *t, ""),
        [s, t, m] => (Some(*s), *t, *m),
        _ => return Err(MountError::InvalidSpec(spec.to_string())),
    };
    if target.is_empty() || source == Some("") {
        return Err(MountError::InvalidSpec(spec.to_string()));
    }
    if !valid_mode(mode) {
        return Err(MountError::InvalidMode(mode.to_string()));
    }
    let opts: Vec<&str> = mode.split(',').filter(|o| !o.is_empty()).collect();
    let readonly = opts.contains(&"ro");
    let nocopy = opts.contains(&"nocopy");
    match source {
        Some(s) if s.starts_with('/') => {
            if nocopy {
                return Err(MountError::OptionNotAllowed {
                    kind: "bind",
                    option: "nocopy".into(),
                });
            }
            Ok(MountRequest::Bind {
                source: PathBuf::from(s),
                target: clean_target("bind", target)?,
                readonly,
                create: true,
            })
        }
        Some(name) => {
            if !crate::volumes::valid_name(name) {
                return Err(MountError::VolumeName(VolumeError::InvalidName(name.to_string())));
            }
            Ok(MountRequest::Volume {
                name: Some(name.to_string()),
                target: clean_target("volume", target)?,
                readonly,
                nocopy,
            })
        }
        None => Ok(MountRequest::Volume {
            name: None,
            target: clean_target("volume", target)?,
            readonly,
            nocopy,
        }),
    }
}

fn valid_mode(mode: &str) -> bool {
    let mut rw = 0;
    let mut label = 0;
    let mut prop = 0;
    let mut copy = 0;
    let mut consistency = 0;
    for o in mode.split(',').filter(|o| !o.is_empty()) {
        match o {
            "ro" | "rw" => rw += 1,
            "z" | "Z" => label += 1,
            "nocopy" => copy += 1,
            "consistent" | "cached" | "delegated" => consistency += 1,
            p if PROPAGATION.contains(&p) => prop += 1,
            _ => return false,
        }
    }
    rw <= 1 && label <= 1 && prop <= 1 && copy <= 1 && consistency <= 1
}

fn parse_bool(key: &'static str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "" | "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(MountError::BadValue {
            key,
            value: value.to_string(),
        }),
    }
}

/// Parses a size with an optional binary unit suffix: `1024`, `64k`, `64m`, `1.5g`, `64MiB`.
pub fn parse_size(s: &str) -> Result<u64> {
    kiln_dag::units::ram_in_bytes(s).map_err(|_| MountError::Size(s.to_string()))
}

fn parse_mode(key: &'static str, s: &str) -> Result<u32> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| MountError::BadValue {
            key,
            value: s.to_string(),
        })
}

/// Parses `--mount type=bind|volume|tmpfs,source=..,target=..,readonly,...`.
pub fn parse_mount_arg(arg: &str) -> Result<MountRequest> {
    let mut kind = "volume";
    let mut source: Option<String> = None;
    let mut target: Option<String> = None;
    let mut readonly = false;
    let mut nocopy = false;
    let mut size = None;
    let mut mode = None;
    let mut only: Vec<(&'static str, String)> = Vec::new();
    for field in arg.split(',').filter(|f| !f.is_empty()) {
        let (key, value) = match field.split_once('=') {
            Some((k, v)) => (k.to_ascii_lowercase(), Some(v)),
            None => (field.to_ascii_lowercase(), None),
        };
        let need = |v: Option<&str>| {
            v.map(str::to_string)
                .ok_or_else(|| MountError::NotKeyValue(field.to_string()))
        };
        match key.as_str() {
            "type" => {
                kind = match need(value)?.as_str() {
                    "bind" => "bind",
                    "volume" => "volume",
                    "tmpfs" => "tmpfs",
                    other => return Err(MountError::UnknownType(other.to_string())),
                }
            }
            "source" | "src" => source = Some(need(value)?),
            "target" | "dst" | "destination" => target = Some(need(value)?),
            "readonly" | "ro" => readonly = parse_bool("readonly", value.unwrap_or(""))?,
            "volume-nocopy" => {
                nocopy = parse_bool("volume-nocopy", value.unwrap_or(""))?;
                only.push(("volume", key.clone()));
            }
            "tmpfs-size" => {
                size = Some(parse_size(&need(value)?)?);
                only.push(("tmpfs", key.clone()));
            }
            "tmpfs-mode" => {
                mode = Some(parse_mode("tmpfs-mode", &need(value)?)?);
                only.push(("tmpfs", key.clone()));
            }
            "bind-propagation" => {
                let v = need(value)?;
                if !PROPAGATION.contains(&v.as_str()) {
                    return Err(MountError::BadValue {
                        key: "bind-propagation",
                        value: v,
                    });
                }
                only.push(("bind", key.clone()));
            }
            "bind-nonrecursive" | "bind-recursive" | "bind-create-src" => {
                need(value).or_else(|_| Ok::<_, MountError>(String::new()))?;
                only.push(("bind", key.clone()));
            }
            "volume-label" | "volume-driver" | "volume-opt" | "volume-subpath" => {
                need(value)?;
                only.push(("volume", key.clone()));
            }
            "consistency" => {
                need(value)?;
            }
            _ => {
                return Err(MountError::UnknownKey {
                    key,
                    field: field.to_string(),
                })
            }
        }
    }
    for (k, option) in only {
        if k != kind {
            return Err(MountError::OptionNotAllowed {
                kind: kind_static(kind),
                option,
            });
        }
    }
    let kind = kind_static(kind);
    let target = match target {
        Some(t) if !t.is_empty() => clean_target(kind, &t)?,
        _ => return Err(MountError::TargetRequired(arg.to_string())),
    };
    match kind {
        "bind" => {
            let src = source
                .filter(|s| !s.is_empty())
                .ok_or(MountError::BindSourceEmpty)?;
            if !src.starts_with('/') {
                return Err(MountError::BindSourceRelative(src));
            }
            Ok(MountRequest::Bind {
                source: PathBuf::from(src),
                target,
                readonly,
                create: false,
            })
        }
        "tmpfs" => {
            if source.is_some_and(|s| !s.is_empty()) {
                return Err(MountError::TmpfsSource);
            }
            Ok(MountRequest::Tmpfs { target, size, mode })
        }
        _ => {
            let name = source.filter(|s| !s.is_empty());
            if let Some(n) = &name {
                if !crate::volumes::valid_name(n) {
                    return Err(MountError::VolumeName(VolumeError::InvalidName(n.clone())));
                }
            }
            Ok(MountRequest::Volume {
                name,
                target,
                readonly,
                nocopy,
            })
        }
    }
}

fn kind_static(kind: &str) -> &'static str {
    match kind {
        "bind" => "bind",
        "tmpfs" => "tmpfs",
        _ => "volume",
    }
}

/// Parses `--tmpfs /path[:size=64m,mode=1777,...]` (the flags `rw`, `ro`, `exec`, `noexec`,
/// `suid`, `nosuid`, `dev`, `nodev` are accepted; the tmpfs is always `nosuid,nodev`).
pub fn parse_tmpfs_arg(arg: &str) -> Result<MountRequest> {
    let (path, opts) = arg.split_once(':').unwrap_or((arg, ""));
    let target = clean_target("tmpfs", path)?;
    let mut size = None;
    let mut mode = None;
    for o in opts.split(',').filter(|o| !o.is_empty()) {
        match o.split_once('=') {
            Some(("size", v)) => size = Some(parse_size(v)?),
            Some(("mode", v)) => mode = Some(parse_mode("mode", v)?),
            None if matches!(
                o,
                "rw" | "ro" | "exec" | "noexec" | "suid" | "nosuid" | "dev" | "nodev"
            ) => {}
            _ => return Err(MountError::TmpfsOption(o.to_string())),
        }
    }
    Ok(MountRequest::Tmpfs { target, size, mode })
}

/// Parses `--volumes-from CONTAINER[:ro|rw]`.
pub fn parse_volumes_from_arg(arg: &str) -> Result<MountRequest> {
    let (container, readonly) = match arg.split_once(':') {
        None => (arg, None),
        Some((c, "ro")) => (c, Some(true)),
        Some((c, "rw")) => (c, Some(false)),
        Some((_, m)) => return Err(MountError::InvalidMode(m.to_string())),
    };
    if container.is_empty() {
        return Err(MountError::InvalidSpec(arg.to_string()));
    }
    Ok(MountRequest::VolumesFrom {
        container: container.to_string(),
        readonly,
    })
}

/// Parses one mount flag by its long name (`volume` for `-v`, `mount`, `tmpfs`,
/// `volumes-from`).
pub fn parse_flag(flag: &str, value: &str) -> Result<MountRequest> {
    match flag {
        "volume" | "v" => parse_volume_arg(value),
        "mount" => parse_mount_arg(value),
        "tmpfs" => parse_tmpfs_arg(value),
        "volumes-from" => parse_volumes_from_arg(value),
        _ => Err(MountError::UnknownFlag(flag.to_string())),
    }
}

/// Parses the mount flags of `kiln run`/`create` into requests, `--volumes-from` first (their
/// order only matters for the duplicate check, which ignores `--volumes-from`).
pub fn parse_flags(
    volumes: &[String],
    mounts: &[String],
    tmpfs: &[String],
    volumes_from: &[String],
) -> Result<Vec<MountRequest>> {
    let mut out = Vec::new();
    for v in volumes_from {
        out.push(parse_volumes_from_arg(v)?);
    }
    for v in volumes {
        out.push(parse_volume_arg(v)?);
    }
    for m in mounts {
        out.push(parse_mount_arg(m)?);
    }
    for t in tmpfs {
        out.push(parse_tmpfs_arg(t)?);
    }
    Ok(out)
}

/// The name of the anonymous volume a container gets at `target`: 64 hex digits derived from
/// the container ID and the path, so resolving the same container again finds the same volume.
pub fn anonymous_name(container_id: &str, target: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"kiln anonymous volume\0");
    h.update(container_id.as_bytes());
    h.update(b"\0");
    h.update(target.as_bytes());
    h.finalize().to_hex().to_string()
}

/// A mount decided on but not yet materialised.
#[derive(Clone, Debug)]
enum Planned {
    Bind {
        source: PathBuf,
        readonly: bool,
        create: bool,
    },
    Volume {
        name: Option<String>,
        readonly: bool,
        copy: bool,
    },
    Existing(ResolvedMount),
    Tmpfs {
        size: Option<u64>,
        mode: Option<u32>,
    },
}

/// Resolves a container's mount requests into runtime mounts, creating the volumes they need
/// and copying the image's content into new, empty ones. `lower` is the image's snapshot dirs
/// (top first) the content is read from; `image_volumes` the image config's `Volumes` keys.
/// Saves the result as `ROOT/containers/<container_id>/mounts.json` (creating that directory)
/// and returns it ordered parents first. Resolving the same container again gives the same
/// mounts. On failure the volumes this call created are removed again.
pub fn resolve(
    store_root: &Path,
    container_id: &str,
    requests: &[MountRequest],
    image_volumes: &[String],
    lower: &[PathBuf],
) -> Result<Vec<MountSpec>> {
    let resolved = resolve_mounts(store_root, container_id, requests, image_volumes, lower)?;
    Ok(resolved.iter().map(ResolvedMount::to_spec).collect())
}

/// [`resolve`], returning the saved [`ResolvedMount`]s.
pub fn resolve_mounts(
    store_root: &Path,
    container_id: &str,
    requests: &[MountRequest],
    image_volumes: &[String],
    lower: &[PathBuf],
) -> Result<Vec<ResolvedMount>> {
    let mut plan: BTreeMap<String, Planned> = BTreeMap::new();
    for v in image_volumes {
        // An image VOLUME that is not a clean absolute path is ignored, as Docker does for
        // paths it cannot mount.
        if let Ok(t) = clean_target("volume", v) {
            plan.insert(
                t,
                Planned::Volume {
                    name: None,
                    readonly: false,
                    copy: true,
                },
            );
        }
    }
    for r in requests {
        if let MountRequest::VolumesFrom { container, readonly } = r {
            let containers =
                crate::record::Containers::open(store_root).map_err(|e| MountError::VolumesFrom {
                    container: container.clone(),
                    source: Box::new(e),
                })?;
            let rec = containers
                .lookup(container)
                .map_err(|e| MountError::VolumesFrom {
                    container: container.clone(),
                    source: Box::new(e),
                })?;
            for m in load(store_root, &rec.id)? {
                if m.kind == Kind::Tmpfs {
                    continue;
                }
                let mut m = m;
                if let Some(ro) = readonly {
                    m.readonly = *ro;
                }
                // The volume stays the other container's: removing this one keeps it.
                m.anonymous = false;
                plan.insert(m.target.clone(), Planned::Existing(m));
            }
        }
    }
    let mut seen: Vec<&str> = Vec::new();
    for r in requests {
        let Some(target) = r.target() else { continue };
        if seen.contains(&target) {
            return Err(MountError::Duplicate(target.to_string()));
        }
        seen.push(target);
        let p = match r {
            MountRequest::Bind {
                source,
                readonly,
                create,
                ..
            } => Planned::Bind {
                source: source.clone(),
                readonly: *readonly,
                create: *create,
            },
            MountRequest::Volume {
                name,
                readonly,
                nocopy,
                ..
            } => Planned::Volume {
                name: name.clone(),
                readonly: *readonly,
                copy: !nocopy,
            },
            MountRequest::Tmpfs { size, mode, .. } => Planned::Tmpfs {
                size: *size,
                mode: *mode,
            },
            MountRequest::VolumesFrom { .. } => continue,
        };
        plan.insert(target.to_string(), p);
    }

    // Binds are checked before anything is created.
    for p in plan.values() {
        let (source, create) = match p {
            Planned::Bind { source, create, .. } => (source, *create),
            Planned::Existing(m) if m.kind == Kind::Bind => (&m.source, false),
            _ => continue,
        };
        if fs::symlink_metadata(source).is_err() {
            // `-v /missing:/x` makes the host directory, as Docker does.
            if !create || fs::create_dir_all(source).is_err() {
                return Err(MountError::BindSourceMissing(source.clone()));
            }
        }
    }

    let volumes = Volumes::open(store_root).map_err(|source| MountError::Volume {
        name: String::new(),
        source,
    })?;
    let mut created: Vec<String> = Vec::new();
    let result = materialise(&volumes, container_id, plan, lower, &mut created).and_then(|mounts| {
        save_dir(&store_root.join("containers").join(container_id), &mounts)?;
        Ok(mounts)
    });
    if result.is_err() {
        for name in created {
            let _ = volumes.remove_unchecked(&name);
        }
    }
    result
}

fn materialise(
    volumes: &Volumes,
    container_id: &str,
    plan: BTreeMap<String, Planned>,
    lower: &[PathBuf],
    created: &mut Vec<String>,
) -> Result<Vec<ResolvedMount>> {
    let mut out = Vec::new();
    for (target, p) in plan {
        let m = match p {
            Planned::Existing(m) => ResolvedMount { target, ..m },
            Planned::Bind { source, readonly, .. } => ResolvedMount {
                kind: Kind::Bind,
                name: None,
                source,
                target,
                readonly,
                anonymous: false,
                tmpfs_size: None,
                tmpfs_mode: None,
            },
            Planned::Tmpfs { size, mode } => ResolvedMount {
                kind: Kind::Tmpfs,
                name: None,
                source: PathBuf::new(),
                target,
                readonly: false,
                anonymous: false,
                tmpfs_size: size,
                tmpfs_mode: mode,
            },
            Planned::Volume { name, readonly, copy } => {
                let anonymous = name.is_none();
                let name = name.unwrap_or_else(|| anonymous_name(container_id, &target));
                let (vol, new) =
                    volumes
                        .create(Some(&name), BTreeMap::new(), anonymous)
                        .map_err(|source| MountError::Volume {
                            name: name.clone(),
                            source,
                        })?;
                if new {
                    created.push(name.clone());
                }
                if copy {
                    crate::fs::copy_image_content(lower, &target, &vol.mountpoint).map_err(|source| {
                        MountError::CopyUp {
                            target: target.clone(),
                            name: name.clone(),
                            source,
                        }
                    })?;
                }
                ResolvedMount {
                    kind: Kind::Volume,
                    name: Some(name),
                    source: vol.mountpoint,
                    target,
                    readonly,
                    anonymous,
                    tmpfs_size: None,
                    tmpfs_mode: None,
                }
            }
        };
        out.push(m);
    }
    // Parents before children, as Docker mounts them.
    out.sort_by(|a, b| {
        let depth = |t: &str| t.split('/').filter(|s| !s.is_empty()).count();
        depth(&a.target)
            .cmp(&depth(&b.target))
            .then_with(|| a.target.cmp(&b.target))
    });
    Ok(out)
}

/// Writes `mounts.json` into a container directory (created if missing).
pub fn save_dir(dir: &Path, mounts: &[ResolvedMount]) -> Result<()> {
    let path = dir.join(MOUNTS_FILE);
    fs::create_dir_all(dir).map_err(|source| MountError::Write {
        path: path.clone(),
        source,
    })?;
    let bytes = serde_json::to_vec_pretty(mounts).map_err(|source| MountError::Parse {
        path: path.clone(),
        source,
    })?;
    kiln_cache::paths::write_atomic(&path, &bytes, false).map_err(|e| MountError::Write {
        path: e.path,
        source: e.source,
    })
}

/// Reads a container directory's `mounts.json` (empty when the container has none yet).
pub fn load_dir(dir: &Path) -> Result<Vec<ResolvedMount>> {
    let path = dir.join(MOUNTS_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
            return Ok(Vec::new())
        }
        Err(source) => return Err(MountError::Read { path, source }),
    };
    serde_json::from_slice(&bytes).map_err(|source| MountError::Parse { path, source })
}

/// The resolved mounts of a container (empty if it has none or was never resolved).
pub fn load(store_root: &Path, container_id: &str) -> Result<Vec<ResolvedMount>> {
    load_dir(&store_root.join("containers").join(container_id))
}

/// Drops a container's anonymous volumes (`rm -v`, `--rm`) that no other container uses, and
/// forgets its mounts. Returns the removed volume names. Call before removing the container's
/// directory.
pub fn release(store_root: &Path, container_id: &str) -> Result<Vec<String>> {
    let mounts = load(store_root, container_id)?;
    let dir = store_root.join("containers").join(container_id);
    let path = dir.join(MOUNTS_FILE);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(MountError::Write { path, source }),
    }
    let volumes = Volumes::open(store_root).map_err(|source| MountError::Volume {
        name: String::new(),
        source,
    })?;
    let usage = volumes.usage().map_err(|source| MountError::Volume {
        name: String::new(),
        source,
    })?;
    let mut removed = Vec::new();
    for m in mounts {
        let (Some(name), true) = (m.name, m.anonymous) else {
            continue;
        };
        if usage.contains_key(&name) {
            continue;
        }
        match volumes.remove_unchecked(&name) {
            Ok(()) => removed.push(name),
            Err(VolumeError::NotFound(_)) => {}
            Err(source) => return Err(MountError::Volume { name, source }),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_args() {
        assert_eq!(
            parse_volume_arg("/host:/ctr:ro").unwrap(),
            MountRequest::Bind {
                source: "/host".into(),
                target: "/ctr".into(),
                readonly: true,
                create: true,
            }
        );
        assert_eq!(
            parse_volume_arg("data:/var/lib//x/").unwrap(),
            MountRequest::Volume {
                name: Some("data".into()),
                target: "/var/lib/x".into(),
                readonly: false,
                nocopy: false
            }
        );
        assert_eq!(
            parse_volume_arg("/anon").unwrap(),
            MountRequest::Volume {
                name: None,
                target: "/anon".into(),
                readonly: false,
                nocopy: false
            }
        );
        assert!(matches!(
            parse_volume_arg("data:/x:rw,nocopy,Z").unwrap(),
            MountRequest::Volume {
                nocopy: true,
                readonly: false,
                ..
            }
        ));
        assert_eq!(
            parse_volume_arg("/x:ro").unwrap_err().to_string(),
            "invalid volume specification: '/x:ro'"
        );
        assert_eq!(
            parse_volume_arg("/a:/b:bogus").unwrap_err().to_string(),
            "invalid mode: bogus"
        );
        assert_eq!(
            parse_volume_arg("/a:/b:ro,rw").unwrap_err().to_string(),
            "invalid mode: ro,rw"
        );
        assert_eq!(
            parse_volume_arg("data:rel").unwrap_err().to_string(),
            "invalid mount config for type \"volume\": invalid mount path: 'rel' mount path must be absolute"
        );
        assert!(parse_volume_arg("/a:/").is_err());
        assert!(parse_volume_arg("a:b:c:d").is_err());
        assert!(parse_volume_arg("b@d:/x")
            .unwrap_err()
            .to_string()
            .contains("invalid characters"));
    }

    #[test]
    fn mount_args() {
        assert_eq!(
            parse_mount_arg("type=bind,src=/h,dst=/c,readonly").unwrap(),
            MountRequest::Bind {
                source: "/h".into(),
                target: "/c".into(),
                readonly: true,
                create: false,
            }
        );
        assert_eq!(
            parse_mount_arg("source=v1,target=/d,volume-nocopy,ro=false").unwrap(),
            MountRequest::Volume {
                name: Some("v1".into()),
                target: "/d".into(),
                readonly: false,
                nocopy: true
            }
        );
        assert_eq!(
            parse_mount_arg("type=tmpfs,destination=/t,tmpfs-size=64m,tmpfs-mode=1770").unwrap(),
            MountRequest::Tmpfs {
                target: "/t".into(),
                size: Some(64 << 20),
                mode: Some(0o1770)
            }
        );
        assert_eq!(
            parse_mount_arg("type=volume,target=/d").unwrap(),
            MountRequest::Volume {
                name: None,
                target: "/d".into(),
                readonly: false,
                nocopy: false
            }
        );
        assert!(parse_mount_arg("type=bind,target=/c")
            .unwrap_err()
            .to_string()
            .contains("field Source must not be empty"));
        assert!(parse_mount_arg("type=bind,src=/a")
            .unwrap_err()
            .to_string()
            .contains("target is required"));
        assert_eq!(
            parse_mount_arg("type=bind,src=/a,dst=/b,foo=1")
                .unwrap_err()
                .to_string(),
            "unexpected key 'foo' in 'foo=1'"
        );
        assert!(parse_mount_arg("type=nfs,dst=/b").is_err());
        assert!(parse_mount_arg("type=bind,src=/a,dst=/b,tmpfs-size=1").is_err());
        assert!(parse_mount_arg("type=tmpfs,src=x,dst=/b").is_err());
        assert!(parse_mount_arg("type=bind,src=/a,dst=/b,readonly=maybe").is_err());
    }

    #[test]
    fn tmpfs_and_volumes_from_args() {
        assert_eq!(
            parse_tmpfs_arg("/run:size=1g,mode=755,noexec").unwrap(),
            MountRequest::Tmpfs {
                target: "/run".into(),
                size: Some(1 << 30),
                mode: Some(0o755)
            }
        );
        assert!(parse_tmpfs_arg("/run:size=lots").is_err());
        assert!(parse_tmpfs_arg("/run:weird").is_err());
        assert!(parse_tmpfs_arg("run").is_err());
        assert_eq!(
            parse_volumes_from_arg("web:ro").unwrap(),
            MountRequest::VolumesFrom {
                container: "web".into(),
                readonly: Some(true)
            }
        );
        assert!(parse_volumes_from_arg("web:xx").is_err());
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("12q").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn requests_round_trip_through_json() {
        let reqs = [
            parse_volume_arg("/h:/c:ro").unwrap(),
            parse_volume_arg("/anon").unwrap(),
            parse_tmpfs_arg("/t:size=1m").unwrap(),
            parse_volumes_from_arg("other").unwrap(),
        ];
        for r in reqs {
            assert_eq!(MountRequest::from_value(&r.to_value()).unwrap(), r);
        }
    }

    #[test]
    fn resolve_orders_copies_and_rolls_back() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let layer = t.path().join("layer");
        fs::create_dir_all(layer.join("data/sub")).unwrap();
        fs::write(layer.join("data/sub/file"), "from image").unwrap();
        let host = t.path().join("host");
        fs::create_dir_all(&host).unwrap();
        let reqs = vec![
            parse_volume_arg(&format!("{}:/data/sub/bind:ro", host.display())).unwrap(),
            parse_volume_arg("named:/data").unwrap(),
            parse_tmpfs_arg("/tmp").unwrap(),
        ];
        let id = "c".repeat(64);
        let mounts = resolve_mounts(
            &root,
            &id,
            &reqs,
            &["/data".into(), "/cache".into()],
            std::slice::from_ref(&layer),
        )
        .unwrap();
        let targets: Vec<&str> = mounts.iter().map(|m| m.target.as_str()).collect();
        assert_eq!(targets, ["/cache", "/data", "/tmp", "/data/sub/bind"]);
        assert!(
            mounts[0].anonymous && mounts[0].name.as_deref() == Some(anonymous_name(&id, "/cache").as_str())
        );
        assert_eq!(mounts[1].name.as_deref(), Some("named"));
        assert_eq!(
            fs::read_to_string(mounts[1].source.join("sub/file")).unwrap(),
            "from image"
        );
        assert_eq!(load(&root, &id).unwrap(), mounts);
        // Resolving again reuses the same volumes.
        let again = resolve_mounts(
            &root,
            &id,
            &reqs,
            &["/data".into(), "/cache".into()],
            std::slice::from_ref(&layer),
        )
        .unwrap();
        assert_eq!(again, mounts);

        // volumes-from copies the mounts, with the mode override.
        let vols = Volumes::open(&root).unwrap();
        let other = "d".repeat(64);
        let containers = crate::record::Containers::open(&root).unwrap();
        let rec = crate::record::ContainerRecord {
            id: id.clone(),
            name: "src".into(),
            created: "2024-01-01T00:00:00Z".into(),
            image: kiln_dag::Digest::of(b"m"),
            image_id: None,
            image_name: "img".into(),
            config: Default::default(),
            args: vec!["true".into()],
            host: Default::default(),
            rootfs: crate::record::RootfsPaths {
                lower: vec![],
                upper: containers.dir(&id).join("upper"),
                work: containers.dir(&id).join("work"),
            },
        };
        containers.create(&rec).unwrap();
        let from = resolve_mounts(
            &root,
            &other,
            &[parse_volumes_from_arg("src:ro").unwrap()],
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(from.len(), 3, "{from:?}");
        assert!(from.iter().all(|m| m.readonly && !m.anonymous));
        assert_eq!(vols.users("named").unwrap(), vec![id.clone(), other.clone()]);

        // Duplicates and a missing bind source fail, leaving no new volume behind.
        let before = vols.list().unwrap().len();
        let dup = [parse_volume_arg("/x").unwrap(), parse_tmpfs_arg("/x").unwrap()];
        assert_eq!(
            resolve(&root, "e", &dup, &[], &[]).unwrap_err().to_string(),
            "Duplicate mount point: /x"
        );
        let missing = [
            parse_volume_arg("fresh:/f").unwrap(),
            parse_mount_arg("type=bind,src=/does/not/exist,dst=/x").unwrap(),
        ];
        assert_eq!(
            resolve(&root, "e", &missing, &[], &[]).unwrap_err().to_string(),
            "invalid mount config for type \"bind\": bind source path does not exist: /does/not/exist"
        );
        assert_eq!(vols.list().unwrap().len(), before);

        // release drops only the container's own anonymous volumes.
        let removed = release(&root, &other).unwrap();
        assert!(removed.is_empty());
        let removed = release(&root, &id).unwrap();
        assert_eq!(removed, vec![anonymous_name(&id, "/cache")]);
        assert!(vols.get("named").is_ok());
    }
}
