//! Named and anonymous volumes: plain directories under `ROOT/volumes/<name>/_data`, each with a
//! small metadata file `ROOT/volumes/<name>/volume.json` (creation time, labels, anonymous flag),
//! Docker's `local` driver without options.
//!
//! A volume is in use while a container's resolved mounts (`ROOT/containers/<id>/mounts.json`,
//! written by [`crate::mounts::resolve`]) name it; `rm` and `prune` refuse or skip such volumes.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The label Docker 23+ puts on anonymous volumes (what `volume prune` without `-a` removes).
pub const ANONYMOUS_LABEL: &str = "com.docker.volume.anonymous";

const META_FILE: &str = "volume.json";
const DATA_DIR: &str = "_data";

/// Errors of the volume store.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The name is not a valid local volume name.
    #[error(
        "create {0}: \"{0}\" includes invalid characters for a local volume name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed. If you intended to pass a host directory, use absolute path"
    )]
    InvalidName(String),
    /// No volume of that name.
    #[error("get {0}: no such volume")]
    NotFound(String),
    /// Containers use the volume.
    #[error("remove {name}: volume is in use - [{}]", .users.join(", "))]
    InUse { name: String, users: Vec<String> },
    /// The volumes directory could not be created.
    #[error("failed to create the volumes directory `{path}`")]
    CreateRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A volume directory could not be created.
    #[error("failed to create volume directory `{path}`")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The metadata file could not be written.
    #[error("failed to write volume metadata `{path}`")]
    WriteMeta {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The metadata file could not be read.
    #[error("failed to read volume metadata `{path}`")]
    ReadMeta {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The metadata file is not valid JSON of the expected shape.
    #[error("invalid volume metadata `{path}`")]
    ParseMeta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The volumes directory could not be listed.
    #[error("failed to list `{path}`")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A volume could not be removed.
    #[error("failed to remove volume directory `{path}`")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A container's mount list could not be read.
    #[error("failed to read the mounts of container {id}")]
    ContainerMounts {
        id: String,
        #[source]
        source: Box<crate::mount_file::MountFileError>,
    },
}

type Result<T> = std::result::Result<T, VolumeError>;

/// What `volume.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Creation time (RFC 3339).
    pub created: String,
    /// Labels (`--label`), including [`ANONYMOUS_LABEL`] for anonymous volumes.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Created for a container's `-v /path`, image `VOLUME` or `--mount type=volume` without a
    /// source.
    #[serde(default)]
    pub anonymous: bool,
}

/// One volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    /// The name (64 hex digits for anonymous volumes).
    pub name: String,
    /// The directory containers see (`ROOT/volumes/<name>/_data`).
    pub mountpoint: PathBuf,
    /// Its metadata.
    pub meta: VolumeMeta,
}

impl Volume {
    /// Docker's `volume inspect` object.
    pub fn inspect_json(&self) -> serde_json::Value {
        serde_json::json!({
            "CreatedAt": self.meta.created,
            "Driver": "local",
            "Labels": self.meta.labels,
            "Mountpoint": self.mountpoint,
            "Name": self.name,
            "Options": serde_json::Value::Null,
            "Scope": "local",
        })
    }
}

/// Whether `name` is a valid local volume name: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A fresh random 64-hex-digit name, as Docker gives anonymous volumes.
pub fn random_name() -> String {
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    let mut urandom = [0u8; 32];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = io::Read::read_exact(&mut f, &mut urandom);
    }
    h.update(&urandom);
    h.finalize().to_hex().to_string()
}

/// The volumes of one store root.
#[derive(Clone, Debug)]
pub struct Volumes {
    dir: PathBuf,
    containers: PathBuf,
}

impl Volumes {
    /// The volume store of the store root `root` (`ROOT/volumes`, created if missing).
    pub fn open(root: &Path) -> Result<Volumes> {
        let dir = root.join("volumes");
        fs::create_dir_all(&dir).map_err(|source| VolumeError::CreateRoot {
            path: dir.clone(),
            source,
        })?;
        Ok(Volumes {
            dir,
            containers: root.join("containers"),
        })
    }

    /// `ROOT/volumes`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn meta_path(&self, name: &str) -> PathBuf {
        self.dir.join(name).join(META_FILE)
    }

    /// Creates a volume (a random name when `name` is `None`). An existing volume of that name
    /// is returned unchanged, as `docker volume create` does. The second value says whether
    /// this call created it.
    pub fn create(
        &self,
        name: Option<&str>,
        labels: BTreeMap<String, String>,
        anonymous: bool,
    ) -> Result<(Volume, bool)> {
        let name = match name {
            Some(n) => n.to_string(),
            None => random_name(),
        };
        if !valid_name(&name) {
            return Err(VolumeError::InvalidName(name));
        }
        let vdir = self.dir.join(&name);
        match fs::create_dir(&vdir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Another process may still be writing its metadata: a missing file means "being
                // created", which we complete with the same defaults.
                match self.get(&name) {
                    Ok(v) => return Ok((v, false)),
                    Err(VolumeError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(source) => return Err(VolumeError::CreateDir { path: vdir, source }),
        }
        let data = vdir.join(DATA_DIR);
        match fs::create_dir(&data) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(VolumeError::CreateDir { path: data, source }),
        }
        let mut labels = labels;
        if anonymous {
            labels.insert(ANONYMOUS_LABEL.to_string(), String::new());
        }
        let meta = VolumeMeta {
            created: kiln_cache::images::now_rfc3339(),
            labels,
            anonymous,
        };
        let path = self.meta_path(&name);
        let bytes = serde_json::to_vec_pretty(&meta).map_err(|e| VolumeError::WriteMeta {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        kiln_cache::paths::write_atomic(&path, &bytes, false).map_err(|e| VolumeError::WriteMeta {
            path: e.path,
            source: e.source,
        })?;
        Ok((
            Volume {
                mountpoint: data,
                name,
                meta,
            },
            true,
        ))
    }

    /// The volume called `name`.
    pub fn get(&self, name: &str) -> Result<Volume> {
        if !valid_name(name) {
            return Err(VolumeError::NotFound(name.to_string()));
        }
        let path = self.meta_path(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VolumeError::NotFound(name.to_string()))
            }
            Err(source) => return Err(VolumeError::ReadMeta { path, source }),
        };
        let meta: VolumeMeta =
            serde_json::from_slice(&bytes).map_err(|source| VolumeError::ParseMeta { path, source })?;
        Ok(Volume {
            name: name.to_string(),
            mountpoint: self.dir.join(name).join(DATA_DIR),
            meta,
        })
    }

    /// Every volume, sorted by name.
    pub fn list(&self) -> Result<Vec<Volume>> {
        let entries = fs::read_dir(&self.dir).map_err(|source| VolumeError::List {
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| VolumeError::List {
                path: self.dir.clone(),
                source,
            })?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            match self.get(&name) {
                Ok(v) => out.push(v),
                // Half-created (no metadata yet) or not a volume at all.
                Err(VolumeError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Container IDs whose resolved mounts use each volume, by volume name.
    pub fn usage(&self) -> Result<BTreeMap<String, Vec<String>>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let entries = match fs::read_dir(&self.containers) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(source) => {
                return Err(VolumeError::List {
                    path: self.containers.clone(),
                    source,
                })
            }
        };
        for entry in entries {
            let entry = entry.map_err(|source| VolumeError::List {
                path: self.containers.clone(),
                source,
            })?;
            let id = entry.file_name().to_string_lossy().into_owned();
            let mounts = crate::mount_file::load_dir(&entry.path()).map_err(|source| {
                VolumeError::ContainerMounts {
                    id: id.clone(),
                    source: Box::new(source),
                }
            })?;
            for m in mounts {
                if let Some(name) = m.name {
                    let users = out.entry(name).or_default();
                    if !users.contains(&id) {
                        users.push(id.clone());
                    }
                }
            }
        }
        for users in out.values_mut() {
            users.sort();
        }
        Ok(out)
    }

    /// The containers using the volume `name`.
    pub fn users(&self, name: &str) -> Result<Vec<String>> {
        Ok(self.usage()?.remove(name).unwrap_or_default())
    }

    /// Removes a volume unless a container uses it.
    pub fn remove(&self, name: &str) -> Result<()> {
        self.get(name)?;
        let users = self.users(name)?;
        if !users.is_empty() {
            return Err(VolumeError::InUse {
                name: name.to_string(),
                users,
            });
        }
        self.remove_unchecked(name)
    }

    /// Removes a volume's directory without checking its users (a container being removed
    /// drops its own anonymous volumes this way).
    pub fn remove_unchecked(&self, name: &str) -> Result<()> {
        if !valid_name(name) {
            return Err(VolumeError::NotFound(name.to_string()));
        }
        let vdir = self.dir.join(name);
        // The metadata goes first: a half-removed volume is no longer listed.
        match fs::remove_file(vdir.join(META_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VolumeError::NotFound(name.to_string()))
            }
            Err(source) => {
                return Err(VolumeError::Remove { path: vdir, source });
            }
        }
        fs::remove_dir_all(&vdir).map_err(|source| VolumeError::Remove { path: vdir, source })
    }

    /// Removes the volumes no container uses: only anonymous ones unless `all`. Returns the
    /// removed names (sorted) and the bytes they held.
    pub fn prune(&self, all: bool) -> Result<(Vec<String>, u64)> {
        let usage = self.usage()?;
        let mut removed = Vec::new();
        let mut bytes = 0;
        for v in self.list()? {
            if usage.contains_key(&v.name) || !(all || v.meta.anonymous) {
                continue;
            }
            let size = dir_size(&v.mountpoint);
            match self.remove_unchecked(&v.name) {
                Ok(()) => {
                    removed.push(v.name);
                    bytes += size;
                }
                // Removed concurrently.
                Err(VolumeError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((removed, bytes))
    }
}

/// Bytes held by the files under `path` (not following symlinks; unreadable parts count 0).
pub fn dir_size(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.blocks() * 512;
    }
    let mut total = 0;
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            total += dir_size(&e.path());
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_like_docker() {
        assert!(valid_name("data"));
        assert!(valid_name("a1_b.c-d"));
        assert!(!valid_name("a"));
        assert!(!valid_name("_ab"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a:b"));
        assert!(!valid_name(""));
        let r = random_name();
        assert_eq!(r.len(), 64);
        assert!(valid_name(&r));
        assert_ne!(r, random_name());
    }

    #[test]
    fn create_get_list_remove_prune() {
        let t = tempfile::tempdir().unwrap();
        let vols = Volumes::open(t.path()).unwrap();
        let (named, created) = vols.create(Some("named"), BTreeMap::new(), false).unwrap();
        assert!(created);
        assert!(named.mountpoint.is_dir());
        let (again, created) = vols.create(Some("named"), BTreeMap::new(), false).unwrap();
        assert!(!created);
        assert_eq!(again, named);
        let (anon, _) = vols.create(None, BTreeMap::new(), true).unwrap();
        assert_eq!(
            anon.meta.labels.get(ANONYMOUS_LABEL).map(String::as_str),
            Some("")
        );
        let names: Vec<String> = vols.list().unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names.len(), 2);
        assert!(matches!(
            vols.create(Some("bad/name"), BTreeMap::new(), false),
            Err(VolumeError::InvalidName(_))
        ));

        // A container using the anonymous volume keeps it from prune and rm.
        let cdir = t.path().join("containers/c1");
        fs::create_dir_all(&cdir).unwrap();
        crate::mounts::save_dir(
            &cdir,
            &[crate::mounts::ResolvedMount {
                kind: crate::mounts::Kind::Volume,
                name: Some(anon.name.clone()),
                source: anon.mountpoint.clone(),
                target: "/data".into(),
                readonly: false,
                anonymous: true,
                tmpfs_size: None,
                tmpfs_mode: None,
            }],
        )
        .unwrap();
        let err = vols.remove(&anon.name).unwrap_err().to_string();
        assert_eq!(err, format!("remove {}: volume is in use - [c1]", anon.name));
        let (removed, _) = vols.prune(false).unwrap();
        assert!(removed.is_empty(), "{removed:?}");
        fs::remove_dir_all(&cdir).unwrap();

        fs::write(anon.mountpoint.join("f"), vec![0u8; 10000]).unwrap();
        let (removed, bytes) = vols.prune(false).unwrap();
        assert_eq!(removed, vec![anon.name.clone()]);
        assert!(bytes >= 10000);
        assert!(
            vols.get("named").is_ok(),
            "named volumes survive prune without -a"
        );
        let (removed, _) = vols.prune(true).unwrap();
        assert_eq!(removed, vec!["named".to_string()]);
        assert!(matches!(vols.remove("named"), Err(VolumeError::NotFound(_))));
        assert_eq!(
            vols.get("gone").unwrap_err().to_string(),
            "get gone: no such volume"
        );
    }
}
