//! Git and HTTP sources (`ADD https://…`, `ADD git-url`): each becomes one snapshot layer.
//!
//! Keys (see the table in [`crate::cachekey`]): a Git source is keyed by the commit its ref
//! resolves to (one `git ls-remote`, none for a full SHA), its subdir and keep-git-dir flag; an
//! HTTP source by its pinned checksum when it has one (no request at all), otherwise by the
//! content digest and `Last-Modified` time of what the URL serves now, re-checked with a
//! conditional request when an ETag is remembered. The bytes a key computation downloaded are
//! kept for the execution, so a changed URL is downloaded once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_dag::{Digest, GitSource, HttpSource};
use kiln_source::git::{Git, GitError, Resolved};
use kiln_source::http::{Checked, Download, HttpClient, HttpError, HttpOptions};

use super::{Engine, EngineError, Output};
use crate::cachekey::CacheKey;
use crate::progress::Stream;
use crate::scheduler::{ExecCtx, SolveError};

/// Errors of the remote sources.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Resolving or checking out a Git source failed.
    #[error("failed to load git source `{remote}#{reference}`")]
    Git {
        remote: String,
        reference: String,
        #[source]
        source: GitError,
    },
    /// Downloading a URL failed.
    #[error("failed to load remote file `{url}`")]
    Http {
        url: String,
        #[source]
        source: HttpError,
    },
    /// The file name of an HTTP source is not a plain name.
    #[error("invalid file name `{filename}` for `{url}`")]
    BadFilename { url: String, filename: String },
    /// The URL served other bytes during execution than when the key was computed.
    #[error("`{url}` changed during the build: {expected} when keyed, {actual} when fetched")]
    Changed {
        url: String,
        expected: Digest,
        actual: Digest,
    },
    /// Placing the downloaded file in the layer failed.
    #[error("failed to write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<RemoteError> for SolveError {
    fn from(e: RemoteError) -> SolveError {
        SolveError::op(e)
    }
}

/// Per-build state of the remote sources.
#[derive(Debug, Default)]
pub(super) struct RemoteState {
    git: Mutex<Option<Arc<Git>>>,
    http: Mutex<Option<Arc<HttpClient>>>,
    /// `remote\0ref` → the commit the key was computed from.
    resolved: Mutex<HashMap<String, Resolved>>,
    /// URL → the check made for the key (a download is reused by the execution).
    checked: Mutex<HashMap<String, Arc<Mutex<Option<Checked>>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    fn git(&self) -> Result<Arc<Git>, SolveError> {
        let mut g = lock(&self.remote.git);
        if let Some(git) = g.as_ref() {
            return Ok(git.clone());
        }
        let git = Arc::new(Git::new().map_err(|source| RemoteError::Git {
            remote: String::new(),
            reference: String::new(),
            source,
        })?);
        *g = Some(git.clone());
        Ok(git)
    }

    fn http(&self) -> Arc<HttpClient> {
        let mut h = lock(&self.remote.http);
        if let Some(c) = h.as_ref() {
            return c.clone();
        }
        let c = Arc::new(HttpClient::new(HttpOptions {
            cache_dir: Some(self.store.cache_dir().join("http")),
            ..Default::default()
        }));
        *h = Some(c.clone());
        c
    }

    fn resolve_git(&self, g: &GitSource) -> Result<Resolved, SolveError> {
        let id = format!("{}\0{}", g.remote, g.reference);
        if let Some(r) = lock(&self.remote.resolved).get(&id) {
            return Ok(r.clone());
        }
        let git = self.git()?;
        let r = tokio::task::block_in_place(|| git.resolve(&g.remote, &g.reference)).map_err(|source| {
            RemoteError::Git {
                remote: kiln_source::git::redact(&g.remote),
                reference: g.reference.clone(),
                source,
            }
        })?;
        lock(&self.remote.resolved).insert(id, r.clone());
        Ok(r)
    }

    /// The content key of a Git source: the resolved commit, the subdir, the keep flag.
    pub(super) async fn git_key(&self, g: &GitSource) -> Result<CacheKey, SolveError> {
        let r = self.resolve_git(g)?;
        let mut h = blake3::Hasher::new();
        h.update(b"git\0");
        h.update(r.commit.as_bytes());
        h.update(b"\0");
        h.update(g.subdir.as_bytes());
        h.update(&[u8::from(g.keep_git_dir)]);
        Ok(CacheKey(*h.finalize().as_bytes()))
    }

    /// Checks the Git source out into a new layer.
    pub(super) async fn git_exec(&self, g: &GitSource, ctx: &ExecCtx) -> Result<Output, SolveError> {
        let r = self.resolve_git(g)?;
        if ctx.cancel().is_cancelled() {
            return Err(SolveError::Cancelled);
        }
        ctx.log(
            Stream::Stderr,
            format!(
                "fetching {} at {}\n",
                kiln_source::git::redact(&g.remote),
                r.commit
            ),
        );
        let git = self.git()?;
        let mutable = self.snapshots.prepare(None).map_err(EngineError::Snapshots)?;
        let checked = tokio::task::block_in_place(|| {
            git.checkout(
                &g.remote,
                &r,
                &g.subdir,
                g.keep_git_dir,
                mutable.work(),
                mutable.upper(),
            )
        });
        if let Err(source) = checked {
            mutable.discard();
            return Err(RemoteError::Git {
                remote: kiln_source::git::redact(&g.remote),
                reference: g.reference.clone(),
                source,
            }
            .into());
        }
        let this: &Engine = self;
        let layers = tokio::task::block_in_place(|| this.commit_layer(&[], mutable, Vec::new()))?;
        Ok(Output::Fs(Arc::new(layers)))
    }

    /// The content key of an HTTP source: the pinned checksum, or what the URL serves now.
    pub(super) async fn http_key(&self, h: &HttpSource) -> Result<CacheKey, SolveError> {
        let mut k = blake3::Hasher::new();
        k.update(b"http\0");
        if let Some(sum) = &h.checksum {
            k.update(b"checksum\0");
            k.update(sum.to_string().as_bytes());
            return Ok(CacheKey(*k.finalize().as_bytes()));
        }
        let slot = self.http_slot(&h.url);
        let mut guard = lock(&slot);
        if guard.is_none() {
            let client = self.http();
            let tmp = self.scratch.path().to_path_buf();
            let checked = tokio::task::block_in_place(|| client.check(&h.url, &tmp)).map_err(|source| {
                RemoteError::Http {
                    url: h.url.clone(),
                    source,
                }
            })?;
            *guard = Some(checked);
        }
        let Some(checked) = guard.as_ref() else {
            return Err(EngineError::Join("http check vanished".into()).into());
        };
        k.update(b"content\0");
        k.update(checked.digest().to_string().as_bytes());
        match checked.last_modified() {
            Some(t) => {
                k.update(&[1]);
                k.update(&t.to_le_bytes());
            }
            None => {
                k.update(&[0]);
            }
        }
        Ok(CacheKey(*k.finalize().as_bytes()))
    }

    fn http_slot(&self, url: &str) -> Arc<Mutex<Option<Checked>>> {
        lock(&self.remote.checked)
            .entry(url.to_string())
            .or_default()
            .clone()
    }

    /// Downloads (or reuses the download of the key computation) into a one-file layer.
    pub(super) async fn http_exec(&self, h: &HttpSource, ctx: &ExecCtx) -> Result<Output, SolveError> {
        if h.filename.is_empty() || h.filename.contains('/') || h.filename == "." || h.filename == ".." {
            return Err(RemoteError::BadFilename {
                url: h.url.clone(),
                filename: h.filename.clone(),
            }
            .into());
        }
        if ctx.cancel().is_cancelled() {
            return Err(SolveError::Cancelled);
        }
        let http_err = |source| RemoteError::Http {
            url: h.url.clone(),
            source,
        };
        let keyed = match &h.checksum {
            Some(_) => None,
            None => lock(&self.http_slot(&h.url)).take(),
        };
        let tmp = self.scratch.path().to_path_buf();
        let download: Download = match keyed {
            Some(Checked::Downloaded(d)) => d,
            other => {
                let client = self.http();
                let d = tokio::task::block_in_place(|| client.download(&h.url, &tmp, h.checksum.as_ref()))
                    .map_err(http_err)?;
                if let Some(Checked::NotModified(r)) = other {
                    if r.digest != d.digest {
                        return Err(RemoteError::Changed {
                            url: h.url.clone(),
                            expected: r.digest,
                            actual: d.digest,
                        }
                        .into());
                    }
                }
                d
            }
        };
        ctx.log(
            Stream::Stderr,
            format!(
                "downloaded {} ({} bytes, {})\n",
                h.url, download.size, download.digest
            ),
        );
        let mutable = self.snapshots.prepare(None).map_err(EngineError::Snapshots)?;
        let path = mutable.upper().join(&h.filename);
        if let Err(e) = place(download, &path, h) {
            mutable.discard();
            return Err(e.into());
        }
        let this: &Engine = self;
        let layers = tokio::task::block_in_place(|| this.commit_layer(&[], mutable, Vec::new()))?;
        Ok(Output::Fs(Arc::new(layers)))
    }
}

/// Moves the download to `path` with the source's owner, mode (0600 unless given, as BuildKit)
/// and the `Last-Modified` time.
fn place(d: Download, path: &Path, h: &HttpSource) -> Result<(), RemoteError> {
    let werr = |source| RemoteError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mtime = d.last_modified;
    match d.file.persist(path) {
        Ok(_) => {}
        Err(e) => {
            // A different file system: copy instead.
            std::fs::copy(e.file.path(), path).map_err(werr)?;
        }
    }
    if let Some(t) = mtime {
        let when = kiln_runtime::unixtime::join((t, 0));
        let f = std::fs::OpenOptions::new().write(true).open(path).map_err(werr)?;
        f.set_modified(when).map_err(werr)?;
    }
    std::os::unix::fs::chown(path, Some(h.uid), Some(h.gid)).map_err(werr)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(h.mode.unwrap_or(0o600))).map_err(werr)?;
    Ok(())
}
