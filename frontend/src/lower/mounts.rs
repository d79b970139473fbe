//! `RUN --mount=...` options: parsed (after variable expansion) into a typed spec, before the
//! `from` source is resolved to a graph input.

use kiln_dag::CacheSharing;

/// The kind of a `--mount`, with its kind-specific options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountType {
    Bind,
    Cache {
        id: Option<String>,
        sharing: CacheSharing,
    },
    Tmpfs {
        size: Option<u64>,
    },
    Secret {
        id: Option<String>,
        env: Option<String>,
        required: bool,
    },
    Ssh {
        id: Option<String>,
        required: bool,
    },
}

/// One parsed `--mount`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunMount {
    pub kind: MountType,
    /// Where it appears in the container, as written (may be relative or empty).
    pub target: Option<String>,
    pub source: Option<String>,
    pub from: Option<String>,
    pub readonly: bool,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

fn parse_bool(key: &str, v: Option<&str>) -> Result<bool, String> {
    match v.map(str::to_ascii_lowercase).as_deref() {
        None | Some("true") | Some("1") | Some("t") => Ok(true),
        Some("false") | Some("0") | Some("f") => Ok(false),
        Some(other) => Err(format!(
            "invalid value `{other}` for `{key}`: expected true or false"
        )),
    }
}

fn parse_size(v: &str) -> Result<u64, String> {
    let lower = v.trim().to_ascii_lowercase();
    let split = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (num, unit) = lower.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid size `{v}`"))?;
    let mult: f64 = match unit.trim() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0_f64.powi(4),
        _ => return Err(format!("invalid size `{v}`")),
    };
    Ok((n * mult) as u64)
}

fn parse_u32(key: &str, v: &str, radix: u32) -> Result<u32, String> {
    u32::from_str_radix(v, radix).map_err(|_| format!("invalid value `{v}` for `{key}`"))
}

/// Parses expanded `key=value` options. `Err` carries the reason.
pub fn parse_mount(options: &[(String, Option<String>)]) -> Result<RunMount, String> {
    let mut kind_name = "bind".to_string();
    for (k, v) in options {
        if k.eq_ignore_ascii_case("type") {
            kind_name = v.clone().unwrap_or_default().to_ascii_lowercase();
        }
    }
    let mut m = RunMount {
        kind: match kind_name.as_str() {
            "bind" => MountType::Bind,
            "cache" => MountType::Cache {
                id: None,
                sharing: CacheSharing::Shared,
            },
            "tmpfs" => MountType::Tmpfs { size: None },
            "secret" => MountType::Secret {
                id: None,
                env: None,
                required: false,
            },
            "ssh" => MountType::Ssh {
                id: None,
                required: false,
            },
            other => return Err(format!("unsupported mount type `{other}`")),
        },
        target: None,
        source: None,
        from: None,
        readonly: matches!(kind_name.as_str(), "bind" | "secret" | "ssh"),
        mode: None,
        uid: None,
        gid: None,
    };
    for (key, value) in options {
        let k = key.to_ascii_lowercase();
        let v = value.as_deref();
        let need = || v.ok_or_else(|| format!("`{key}` needs a value"));
        match k.as_str() {
            "type" => {}
            "target" | "dst" | "destination" => m.target = Some(need()?.to_string()),
            "source" | "src" => m.source = Some(need()?.to_string()),
            "from" => m.from = Some(need()?.to_string()),
            "readonly" | "ro" => m.readonly = parse_bool(&k, v)?,
            "readwrite" | "rw" => m.readonly = !parse_bool(&k, v)?,
            "mode" => m.mode = Some(parse_u32(&k, need()?, 8)?),
            "uid" => m.uid = Some(parse_u32(&k, need()?, 10)?),
            "gid" => m.gid = Some(parse_u32(&k, need()?, 10)?),
            "id" => match &mut m.kind {
                MountType::Cache { id, .. } | MountType::Secret { id, .. } | MountType::Ssh { id, .. } => {
                    *id = Some(need()?.to_string())
                }
                _ => return Err(format!("`id` is not supported for {kind_name} mounts")),
            },
            "sharing" => match &mut m.kind {
                MountType::Cache { sharing, .. } => {
                    *sharing = match need()?.to_ascii_lowercase().as_str() {
                        "shared" => CacheSharing::Shared,
                        "private" => CacheSharing::Private,
                        "locked" => CacheSharing::Locked,
                        other => return Err(format!("unsupported sharing value `{other}`")),
                    }
                }
                _ => return Err(format!("`sharing` is not supported for {kind_name} mounts")),
            },
            "size" => match &mut m.kind {
                MountType::Tmpfs { size } => *size = Some(parse_size(need()?)?),
                _ => return Err(format!("`size` is not supported for {kind_name} mounts")),
            },
            "env" => match &mut m.kind {
                MountType::Secret { env, .. } => *env = Some(need()?.to_string()),
                _ => return Err(format!("`env` is not supported for {kind_name} mounts")),
            },
            "required" => match &mut m.kind {
                MountType::Secret { required, .. } | MountType::Ssh { required, .. } => {
                    *required = parse_bool(&k, v)?
                }
                _ => return Err(format!("`required` is not supported for {kind_name} mounts")),
            },
            _ => return Err(format!("unexpected key `{key}`")),
        }
    }
    match &m.kind {
        MountType::Secret { id, env, .. } => {
            if m.target.is_none() && id.is_none() && env.is_none() {
                return Err("secret mount needs an id, a target or an env".into());
            }
        }
        MountType::Ssh { .. } => {}
        _ => {
            if m.target.as_deref().is_none_or(str::is_empty) {
                return Err("mount target is required".into());
            }
        }
    }
    if m.from.is_some()
        && matches!(
            m.kind,
            MountType::Tmpfs { .. } | MountType::Secret { .. } | MountType::Ssh { .. }
        )
    {
        return Err(format!("`from` is not supported for {kind_name} mounts"));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Vec<(String, Option<String>)> {
        s.split(',')
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (kv.to_string(), None),
            })
            .collect()
    }

    #[test]
    fn bind_defaults_readonly() {
        let m = parse_mount(&opts("type=bind,source=src,target=/mnt")).unwrap();
        assert!(m.readonly);
        assert_eq!(m.source.as_deref(), Some("src"));
        let m = parse_mount(&opts("target=/mnt,rw")).unwrap();
        assert!(!m.readonly);
    }

    #[test]
    fn cache_and_tmpfs_options() {
        let m = parse_mount(&opts("type=cache,id=x,target=/c,sharing=locked,mode=0700,uid=5")).unwrap();
        assert_eq!(
            m.kind,
            MountType::Cache {
                id: Some("x".into()),
                sharing: CacheSharing::Locked
            }
        );
        assert_eq!((m.mode, m.uid, m.readonly), (Some(0o700), Some(5), false));
        let m = parse_mount(&opts("type=tmpfs,target=/t,size=1m")).unwrap();
        assert_eq!(m.kind, MountType::Tmpfs { size: Some(1 << 20) });
    }

    #[test]
    fn errors() {
        assert!(parse_mount(&opts("type=nope,target=/x")).is_err());
        assert!(parse_mount(&opts("type=bind")).is_err());
        assert!(parse_mount(&opts("type=tmpfs,target=/x,from=a")).is_err());
        assert!(parse_mount(&opts("type=cache,target=/x,sharing=weird")).is_err());
        assert!(parse_mount(&opts("target=/x,bogus=1")).is_err());
        assert!(parse_mount(&opts("type=secret,id=s,required=maybe")).is_err());
    }
}
