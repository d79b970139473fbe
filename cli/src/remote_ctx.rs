//! Build contexts that are not a local directory: `kiln build GIT-URL`, `kiln build HTTPS-URL`
//! (a tarball, or a plain Dockerfile with an empty context), and `--build-context name=VALUE`
//! named contexts (a directory, `docker-image://`, a Git URL, an https tarball, `oci-layout://`).
//!
//! Fetched contexts live in a temp directory under the store's `tmp/`, removed when the value
//! holding it is dropped, however the build ends.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use kiln_frontend::lower::NamedContext;
use kiln_source::archive::{self, ContextKind};
use kiln_source::git::{self, Git, GitUrl};
use kiln_source::http::{HttpClient, HttpOptions};

use crate::build_cmd::BuildInputs;

/// Whether a `kiln build` context argument is fetched rather than read from disk (Docker's
/// order: an existing local directory wins, then Git URLs, then http(s) URLs).
pub fn is_remote(arg: &str) -> bool {
    if Path::new(arg).is_dir() {
        return false;
    }
    git::is_git_url(arg) || arg.starts_with("http://") || arg.starts_with("https://")
}

/// Whether `BUILDKIT_CONTEXT_KEEP_GIT_DIR=1` was given as a build arg or in the environment.
pub fn keep_git_dir(build_args: &[String]) -> bool {
    let truthy = |v: &str| matches!(v, "1" | "true" | "True" | "TRUE");
    build_args
        .iter()
        .filter_map(|a| a.strip_prefix("BUILDKIT_CONTEXT_KEEP_GIT_DIR="))
        .any(truthy)
        || std::env::var("BUILDKIT_CONTEXT_KEEP_GIT_DIR").is_ok_and(|v| truthy(&v))
}

/// A context fetched into a temp dir: `DIR/context` is the context.
pub struct Fetched {
    dir: tempfile::TempDir,
    /// The Dockerfile itself when an http(s) URL served a plain file.
    dockerfile: Option<Vec<u8>>,
    /// The argument, for messages.
    source: String,
}

fn temp_dir(store: &kiln_cache::Store, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let parent = store.root().join("tmp");
    std::fs::create_dir_all(&parent).with_context(|| format!("failed to create `{}`", parent.display()))?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&parent)
        .with_context(|| format!("failed to create a directory in `{}`", parent.display()))
}

impl Fetched {
    /// Fetches a Git repository (`remote#ref:subdir`) or downloads an http(s) URL (extracted
    /// when it is an archive, else taken as the Dockerfile) into a temp dir.
    pub fn fetch(arg: &str, store: &kiln_cache::Store, keep_git: bool) -> anyhow::Result<Fetched> {
        let dir = temp_dir(store, "remote-")?;
        let context = dir.path().join("context");
        std::fs::create_dir(&context).with_context(|| format!("failed to create `{}`", context.display()))?;
        let mut dockerfile = None;
        if git::is_git_url(arg) {
            let url = GitUrl::parse(arg);
            let work = dir.path().join("work");
            std::fs::create_dir(&work).with_context(|| format!("failed to create `{}`", work.display()))?;
            Git::new()?
                .fetch(&url, keep_git, &work, &context)
                .with_context(|| {
                    format!(
                        "unable to prepare context: failed to fetch `{}`",
                        git::redact(arg)
                    )
                })?;
            std::fs::remove_dir_all(&work)
                .with_context(|| format!("failed to remove `{}`", work.display()))?;
        } else {
            let client = HttpClient::new(HttpOptions::default());
            let download = client
                .download(arg, dir.path(), None)
                .with_context(|| format!("unable to prepare context: failed to download `{arg}`"))?;
            match archive::classify_file(download.file.path())? {
                ContextKind::Archive(_) => {
                    archive::extract_file(download.file.path(), &context, arg)
                        .with_context(|| format!("unable to prepare context from `{arg}`"))?;
                }
                ContextKind::Plain => {
                    let mut bytes = Vec::new();
                    download
                        .reopen()
                        .and_then(|mut f| f.read_to_end(&mut bytes))
                        .with_context(|| format!("failed to read the download of `{arg}`"))?;
                    dockerfile = Some(bytes);
                }
            }
        }
        Ok(Fetched {
            dir,
            dockerfile,
            source: git::redact(arg),
        })
    }

    /// The context directory.
    pub fn context(&self) -> PathBuf {
        self.dir.path().join("context")
    }

    /// The frontend inputs: the downloaded Dockerfile, the Dockerfile from stdin (`-f -`), or
    /// `file` (default `Dockerfile`) inside the fetched context, which it may not leave.
    pub fn inputs(
        &self,
        file: Option<&str>,
        build_args: &[String],
        target: Option<String>,
    ) -> anyhow::Result<BuildInputs> {
        let context = self.context();
        if file == Some("-") {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("failed to read the Dockerfile from stdin")?;
            return BuildInputs::from_parts(&context, "Dockerfile".into(), buf, None, build_args, target);
        }
        if let Some(df) = &self.dockerfile {
            if let Some(f) = file {
                eprintln!(
                    "WARNING: --file {f} is ignored: `{}` is the Dockerfile itself",
                    self.source
                );
            }
            return BuildInputs::from_parts(
                &context,
                "Dockerfile".into(),
                df.clone(),
                None,
                build_args,
                target,
            );
        }
        let rel = file.unwrap_or("Dockerfile");
        let path = context.join(kiln_solver::context::clean_rel(rel));
        let real_ctx = std::fs::canonicalize(&context)
            .with_context(|| format!("failed to resolve `{}`", context.display()))?;
        let bytes = match std::fs::canonicalize(&path) {
            Ok(real) if real.starts_with(&real_ctx) => std::fs::read(&real)
                .with_context(|| format!("failed to read dockerfile `{rel}` from `{}`", self.source))?,
            Ok(_) => bail!(
                "failed to read dockerfile: `{rel}` points outside the context `{}`",
                self.source
            ),
            Err(_) => bail!(
                "failed to read dockerfile: `{rel}` not found in `{}`",
                self.source
            ),
        };
        let name = Path::new(rel)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| rel.to_string());
        BuildInputs::from_parts(&context, name, bytes, Some(&path), build_args, target)
    }
}

/// The `--build-context` values of one build, resolved.
#[derive(Default)]
pub struct NamedContexts {
    /// What the frontend sees.
    pub lower: BTreeMap<String, NamedContext>,
    /// Local context directories the engine reads, by local source name.
    pub dirs: BTreeMap<String, PathBuf>,
    /// Fetched contexts, kept alive for the build.
    _fetched: Vec<Fetched>,
}

impl NamedContexts {
    /// Parses and prepares every `name=VALUE`: directories are used in place, Git and https
    /// values fetched, `oci-layout://` layouts imported into the store.
    pub fn resolve(
        specs: &[String],
        store: &kiln_cache::Store,
        keep_git: bool,
    ) -> anyhow::Result<NamedContexts> {
        let mut out = NamedContexts::default();
        for spec in specs {
            let (name, value) = spec
                .split_once('=')
                .filter(|(n, v)| !n.is_empty() && !v.is_empty())
                .with_context(|| format!("invalid --build-context `{spec}`: expected name=VALUE"))?;
            let name = name.trim().to_string();
            if out.lower.contains_key(&name) {
                bail!("invalid --build-context `{spec}`: `{name}` is given twice");
            }
            let nc = if let Some(reference) = value.strip_prefix("docker-image://") {
                NamedContext::Image {
                    reference: reference.to_string(),
                }
            } else if let Some(layout) = value.strip_prefix("oci-layout://") {
                let manifest = import_oci_layout(layout, store)
                    .with_context(|| format!("--build-context {name}: failed to import `{value}`"))?;
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
                let fetched = Fetched::fetch(value, store, keep_git)
                    .with_context(|| format!("--build-context {name}"))?;
                if let Some(df) = &fetched.dockerfile {
                    // BuildKit copies a non-archive download into the context as `context`.
                    let file = fetched.context().join("context");
                    std::fs::write(&file, df)
                        .with_context(|| format!("failed to write `{}`", file.display()))?;
                }
                out.dirs.insert(name.clone(), fetched.context());
                out._fetched.push(fetched);
                NamedContext::Local { name: name.clone() }
            } else {
                let path = PathBuf::from(value);
                if !path.is_dir() {
                    bail!("--build-context {name}: `{value}` is not a directory, an image (docker-image://), an OCI layout (oci-layout://), a Git URL or an http(s) URL");
                }
                out.dirs.insert(name.clone(), path);
                NamedContext::Local { name: name.clone() }
            };
            out.lower.insert(name, nc);
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
fn import_oci_layout(spec: &str, store: &kiln_cache::Store) -> anyhow::Result<kiln_dag::Digest> {
    let (path, digest, tag) = split_layout(spec);
    let dir = Path::new(path);
    let read_json = |rel: &str| -> anyhow::Result<serde_json::Value> {
        let p = dir.join(rel);
        let bytes = std::fs::read(&p).with_context(|| format!("failed to read `{}`", p.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("`{}` is not valid JSON", p.display()))
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
        bail!(
            "no image {} in the OCI layout `{}` ({} manifests in index.json)",
            digest
                .or(tag)
                .map(|s| format!("`{s}`"))
                .unwrap_or_else(|| "to pick".into()),
            dir.display(),
            manifests.len()
        );
    };
    // Follow indexes to the host platform's manifest.
    let host = kiln_dag::Platform::host();
    for _ in 0..4 {
        let media = desc["mediaType"].as_str().unwrap_or_default();
        if !media.contains("index") && !media.contains("manifest.list") {
            break;
        }
        let d = desc["digest"].as_str().unwrap_or_default();
        let hex = d.strip_prefix("sha256:").unwrap_or(d);
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
            None => bail!("the index {d} in `{}` lists no manifests", dir.display()),
        }
    }
    let manifest = desc["digest"]
        .as_str()
        .and_then(|d| kiln_dag::Digest::parse(d).ok())
        .with_context(|| format!("invalid descriptor digest in `{}`", dir.display()))?;

    // Stream the layout as a tar into the archive loader, which verifies every blob.
    let (reader, writer) = std::io::pipe().context("failed to create a pipe")?;
    let root = dir.to_path_buf();
    let producer = std::thread::spawn(move || {
        let opts = kiln_cache::layer::DiffOptions::default();
        kiln_cache::layer::write_tree(&root, writer, &opts)
    });
    let loaded = kiln_cache::archive::load::load(store, reader, path);
    let produced = producer
        .join()
        .map_err(|_| anyhow::anyhow!("the OCI layout reader thread panicked"))?;
    loaded.with_context(|| format!("failed to load the OCI layout `{}`", dir.display()))?;
    produced.with_context(|| format!("failed to read the OCI layout `{}`", dir.display()))?;
    store
        .images()
        .get(&manifest)
        .with_context(|| format!("image {manifest} was not loaded from `{}`", dir.display()))?;
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

    #[test]
    fn keep_git_dir_from_build_args() {
        assert!(keep_git_dir(&["BUILDKIT_CONTEXT_KEEP_GIT_DIR=1".into()]));
        assert!(
            !keep_git_dir(&["BUILDKIT_CONTEXT_KEEP_GIT_DIR=0".into()])
                || std::env::var("BUILDKIT_CONTEXT_KEEP_GIT_DIR").is_ok()
        );
    }
}
