//! `--build-context name=VALUE` named contexts: a directory (read in place), `docker-image://REF`,
//! `oci-layout://PATH[@sha256:...|:tag]` (imported into the store), a Git URL (fetched by the
//! solver, keyed by commit) or an http(s) tarball (fetched here).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use kiln_cache::Store;
use kiln_dag::Digest;
use kiln_frontend::lower::NamedContext;
use kiln_source::git::{self, GitUrl};

use crate::context::{ContextError, Fetched};

/// A named context that could not be prepared; every variant names it.
#[derive(Debug, thiserror::Error)]
pub enum NamedContextError {
    #[error("--build-context {name}: failed to import `{value}`")]
    Layout {
        name: String,
        value: String,
        #[source]
        source: Box<LayoutError>,
    },
    #[error("--build-context {name}")]
    Fetch {
        name: String,
        #[source]
        source: Box<ContextError>,
    },
    #[error("failed to write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--build-context {name}: `{value}` is not a directory, an image (docker-image://), an OCI layout (oci-layout://), a Git URL or an http(s) URL")]
    NotAContext { name: String, value: String },
}

/// Importing an OCI image layout failed.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("failed to read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{path}` is not valid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no image {wanted} in the OCI layout `{dir}` ({count} manifests in index.json)")]
    NoImage {
        wanted: String,
        dir: PathBuf,
        count: usize,
    },
    #[error("the index {digest} in `{dir}` lists no manifests")]
    EmptyIndex { digest: String, dir: PathBuf },
    #[error("invalid descriptor digest in `{dir}`")]
    Digest { dir: PathBuf },
    #[error("failed to create a pipe")]
    Pipe(#[source] io::Error),
    #[error("the OCI layout reader thread panicked")]
    ReaderPanicked,
    #[error("failed to load the OCI layout `{dir}`")]
    Load {
        dir: PathBuf,
        #[source]
        source: Box<kiln_cache::archive::load::LoadError>,
    },
    #[error("failed to read the OCI layout `{dir}`")]
    Tar {
        dir: PathBuf,
        #[source]
        source: Box<kiln_cache::layer::WriteError>,
    },
    #[error("image {manifest} was not loaded from `{dir}`")]
    NotLoaded {
        manifest: Digest,
        dir: PathBuf,
        #[source]
        source: Box<kiln_cache::images::ImageError>,
    },
}

/// The named contexts of one build, resolved.
#[derive(Default)]
pub(crate) struct NamedContexts {
    /// What the frontend sees.
    pub lower: BTreeMap<String, NamedContext>,
    /// Local context directories the engine reads, by local source name.
    pub dirs: BTreeMap<String, PathBuf>,
    /// Fetched contexts, kept alive for the build.
    _fetched: Vec<Fetched>,
}

impl NamedContexts {
    /// Prepares every `name → value`: directories are used in place, Git values left to the
    /// solver, https values fetched, `oci-layout://` layouts imported into the store.
    pub fn resolve(
        specs: &BTreeMap<String, String>,
        store: &Store,
        keep_git: bool,
    ) -> Result<NamedContexts, NamedContextError> {
        let mut out = NamedContexts::default();
        for (name, value) in specs {
            let nc = if let Some(reference) = value.strip_prefix("docker-image://") {
                NamedContext::Image {
                    reference: reference.to_string(),
                }
            } else if let Some(layout) = value.strip_prefix("oci-layout://") {
                let manifest =
                    import_oci_layout(layout, store).map_err(|source| NamedContextError::Layout {
                        name: name.clone(),
                        value: value.clone(),
                        source: Box::new(source),
                    })?;
                NamedContext::Image {
                    reference: manifest.to_string(),
                }
            } else if git::is_git_url(value) && !Path::new(value).is_dir() {
                // The solver fetches it (keyed by commit), so FROM, COPY --from and mounts all
                // see a filesystem.
                let url = GitUrl::parse(value);
                NamedContext::Git {
                    remote: url.remote,
                    reference: url.reference,
                    subdir: url.subdir,
                    keep_git_dir: keep_git,
                }
            } else if (value.starts_with("http://") || value.starts_with("https://"))
                && !Path::new(value).is_dir()
            {
                let fetched =
                    Fetched::fetch(value, store, keep_git).map_err(|source| NamedContextError::Fetch {
                        name: name.clone(),
                        source: Box::new(source),
                    })?;
                if let Some(df) = &fetched.dockerfile {
                    // BuildKit copies a non-archive download into the context as `context`.
                    let file = fetched.context().join("context");
                    #[allow(
                        clippy::disallowed_methods,
                        reason = "a file of a fresh scratch context that lives for this build only"
                    )]
                    std::fs::write(&file, df)
                        .map_err(|source| NamedContextError::Write { path: file, source })?;
                }
                out.dirs.insert(name.clone(), fetched.context());
                out._fetched.push(fetched);
                NamedContext::Local { name: name.clone() }
            } else {
                let path = PathBuf::from(value);
                if !path.is_dir() {
                    return Err(NamedContextError::NotAContext {
                        name: name.clone(),
                        value: value.clone(),
                    });
                }
                out.dirs.insert(name.clone(), path);
                NamedContext::Local { name: name.clone() }
            };
            out.lower.insert(name.clone(), nc);
        }
        Ok(out)
    }
}

/// Splits `PATH[@sha256:...|:tag]`.
fn split_layout(spec: &str) -> (&str, Option<&str>, Option<&str>) {
    if let Some((path, digest)) = spec.rsplit_once('@') {
        return (path, Some(digest), None);
    }
    match spec.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') && !path.is_empty() => (path, None, Some(tag)),
        _ => (spec, None, None),
    }
}

/// Loads the OCI layout directory into the store and returns the manifest digest of the image
/// the spec selects (by digest, by `org.opencontainers.image.ref.name` tag, or the only one),
/// following an index to the host platform.
fn import_oci_layout(spec: &str, store: &Store) -> Result<Digest, LayoutError> {
    let (path, digest, tag) = split_layout(spec);
    let dir = Path::new(path);
    let read_json = |rel: &str| -> Result<serde_json::Value, LayoutError> {
        let p = dir.join(rel);
        let bytes = std::fs::read(&p).map_err(|source| LayoutError::Read {
            path: p.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| LayoutError::Json { path: p, source })
    };
    let index = read_json("index.json")?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let pick = match (digest, tag) {
        (Some(d), _) => manifests.iter().find(|m| m["digest"].as_str() == Some(d)),
        (None, Some(t)) => manifests
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(t)),
        (None, None) if manifests.len() == 1 => manifests.first(),
        (None, None) => manifests
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some("latest")),
    };
    let Some(mut desc) = pick.cloned() else {
        return Err(LayoutError::NoImage {
            wanted: digest
                .or(tag)
                .map(|s| format!("`{s}`"))
                .unwrap_or_else(|| "to pick".into()),
            dir: dir.to_path_buf(),
            count: manifests.len(),
        });
    };
    // Follow indexes to the host platform's manifest.
    let host = kiln_dag::Platform::host();
    for _ in 0..4 {
        let media = desc["mediaType"].as_str().unwrap_or_default();
        if !media.contains("index") && !media.contains("manifest.list") {
            break;
        }
        let d = desc["digest"].as_str().unwrap_or_default().to_string();
        let hex = d.strip_prefix("sha256:").unwrap_or(&d);
        let nested = read_json(&format!("blobs/sha256/{hex}"))?;
        let list = nested["manifests"].as_array().cloned().unwrap_or_default();
        let found = list
            .iter()
            .find(|m| {
                m["platform"]["os"].as_str() == Some(host.os.as_str())
                    && m["platform"]["architecture"].as_str() == Some(host.architecture.as_str())
            })
            .or_else(|| list.first())
            .cloned();
        match found {
            Some(f) => desc = f,
            None => {
                return Err(LayoutError::EmptyIndex {
                    digest: d,
                    dir: dir.to_path_buf(),
                })
            }
        }
    }
    let manifest = desc["digest"]
        .as_str()
        .and_then(|d| Digest::parse(d).ok())
        .ok_or_else(|| LayoutError::Digest {
            dir: dir.to_path_buf(),
        })?;

    // Stream the layout as a tar into the archive loader, which verifies every blob.
    let (reader, writer) = io::pipe().map_err(LayoutError::Pipe)?;
    let root = dir.to_path_buf();
    let producer = std::thread::spawn(move || {
        let opts = kiln_cache::layer::DiffOptions::default();
        kiln_cache::layer::write_tree(&root, writer, &opts)
    });
    let loaded = kiln_cache::archive::load::load(store, reader, path);
    let produced = producer.join().map_err(|_| LayoutError::ReaderPanicked)?;
    loaded.map_err(|source| LayoutError::Load {
        dir: dir.to_path_buf(),
        source: Box::new(source),
    })?;
    produced.map_err(|source| LayoutError::Tar {
        dir: dir.to_path_buf(),
        source: Box::new(source),
    })?;
    store
        .images()
        .get(&manifest)
        .map_err(|source| LayoutError::NotLoaded {
            manifest,
            dir: dir.to_path_buf(),
            source: Box::new(source),
        })?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_specs_split() {
        assert_eq!(split_layout("/a/b"), ("/a/b", None, None));
        assert_eq!(split_layout("/a/b:v1"), ("/a/b", None, Some("v1")));
        assert_eq!(split_layout("/a/b@sha256:00"), ("/a/b", Some("sha256:00"), None));
    }
}
