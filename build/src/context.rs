//! The build context and the Dockerfile: a local directory read in place, a stream (a tar
//! archive, plain or compressed, or a lone Dockerfile) spooled and extracted under the store's
//! `tmp/`, or a Git / http(s) URL fetched there; then the Dockerfile and the `.dockerignore`
//! that applies.
//!
//! Fetched and extracted contexts live in a temp directory removed when the `MainContext`
//! holding it is dropped, however the build ends.

use std::io::{self, Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use kiln_cache::Store;
use kiln_solver::progress::ProgressSink;
use kiln_solver::scheduler::CancelToken;
use kiln_source::archive::{self, ArchiveError, ContextKind};
use kiln_source::git::{self, Git, GitError, GitUrl};
use kiln_source::http::{HttpClient, HttpError, HttpOptions};

use crate::request::{ContextSource, DockerfileSource};

/// The Dockerfile as read: its name (for messages and source locations) and bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dockerfile {
    /// `Dockerfile`, or the file name `-f` gave.
    pub name: String,
    pub bytes: Vec<u8>,
}

/// What the frontend needs from the context.
#[derive(Clone, Debug)]
pub struct Inputs {
    /// The context directory (read in place by the solver).
    pub context: PathBuf,
    pub dockerfile: Dockerfile,
    /// The `.dockerignore` patterns that apply (`<Dockerfile>.dockerignore` beside the
    /// Dockerfile wins over the context's own).
    pub dockerignore: Vec<String>,
    /// The size of the `.dockerignore` file read (0 without one).
    pub dockerignore_size: u64,
}

/// Preparing the context or reading the Dockerfile failed.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("unable to prepare context: path `{path}` not found")]
    NotFound {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unable to prepare context: `{path}` is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("failed to {action} `{path}`")]
    Fs {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to read the Dockerfile from {stream}")]
    DockerfileStream {
        stream: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("failed to read dockerfile: open {path}: no such file or directory")]
    DockerfileFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to read dockerfile `{rel}` from {place}")]
    DockerfileIn {
        rel: String,
        place: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to read dockerfile: `{rel}` points outside {place}")]
    DockerfileOutside { rel: String, place: String },
    #[error("failed to read dockerfile: `{rel}` not found in {place}")]
    DockerfileMissing { rel: String, place: String },
    #[error("invalid pattern in `{path}`")]
    IgnorePattern {
        path: PathBuf,
        #[source]
        source: kiln_patterns::PatternError,
    },
    #[error("cancelled while reading the build context from {stream}")]
    Cancelled { stream: &'static str },
    #[error("failed to read the build context from {stream}")]
    ReadStream {
        stream: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("failed to read the build context from {stream}")]
    ClassifyStream {
        stream: &'static str,
        #[source]
        source: Box<ArchiveError>,
    },
    #[error("failed to extract the build context from {stream}")]
    ExtractStream {
        stream: &'static str,
        #[source]
        source: Box<ArchiveError>,
    },
    #[error("unable to prepare context: failed to fetch `{url}`")]
    Git {
        url: String,
        #[source]
        source: Box<GitError>,
    },
    #[error("unable to prepare context: failed to download `{url}`")]
    Download {
        url: String,
        #[source]
        source: Box<HttpError>,
    },
    #[error("failed to read the download of `{url}`")]
    ClassifyDownload {
        url: String,
        #[source]
        source: Box<ArchiveError>,
    },
    #[error("unable to prepare context from `{url}`")]
    ExtractDownload {
        url: String,
        #[source]
        source: Box<ArchiveError>,
    },
    #[error("failed to read the download of `{url}`")]
    ReadDownload {
        url: String,
        #[source]
        source: io::Error,
    },
}

fn fs_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ContextError + 'a {
    move |source| ContextError::Fs {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What a stream is called in messages: `kiln build -` and `-f -` read stdin, and so do the
/// streams of other front ends as far as their users know.
const STREAM: &str = "stdin";

/// The main context, ready to build: the inputs plus the temp directory holding a fetched or
/// extracted context.
pub(crate) struct MainContext {
    pub inputs: Inputs,
    _temp: Option<tempfile::TempDir>,
}

/// Resolves the context and reads the Dockerfile and `.dockerignore`.
pub(crate) fn prepare(
    context: ContextSource,
    dockerfile: DockerfileSource,
    store: &Store,
    keep_git: bool,
    progress: &ProgressSink,
    cancel: &CancelToken,
) -> Result<MainContext, ContextError> {
    match context {
        ContextSource::Dir(dir) => Ok(MainContext {
            inputs: read_local(&dir, dockerfile)?,
            _temp: None,
        }),
        ContextSource::Stream(reader) => {
            let spooled = Spooled::read(reader, store, cancel)?;
            let inputs = spooled.inputs(dockerfile, progress)?;
            Ok(MainContext {
                inputs,
                _temp: Some(spooled.dir),
            })
        }
        ContextSource::Remote(url) => {
            let fetched = Fetched::fetch(&url, store, keep_git)?;
            let inputs = fetched.inputs(dockerfile, progress)?;
            Ok(MainContext {
                inputs,
                _temp: Some(fetched.dir),
            })
        }
    }
}

/// Reads the Dockerfile and the applicable `.dockerignore` for a local context directory.
pub fn read_local(context: &Path, dockerfile: DockerfileSource) -> Result<Inputs, ContextError> {
    let meta = std::fs::metadata(context).map_err(|source| ContextError::NotFound {
        path: context.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(ContextError::NotADirectory {
            path: context.to_path_buf(),
        });
    }
    let (dockerfile, path) = match dockerfile {
        DockerfileSource::Stream(reader) => (read_stream(reader)?, None),
        DockerfileSource::Path(f) => {
            let p = PathBuf::from(&f);
            let bytes = std::fs::read(&p).map_err(|source| ContextError::DockerfileFile {
                path: p.clone(),
                source,
            })?;
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or(f);
            (Dockerfile { name, bytes }, Some(p))
        }
        DockerfileSource::Default => {
            let p = context.join("Dockerfile");
            let bytes = std::fs::read(&p).map_err(|source| ContextError::DockerfileFile {
                path: p.clone(),
                source,
            })?;
            (
                Dockerfile {
                    name: "Dockerfile".into(),
                    bytes,
                },
                Some(p),
            )
        }
    };
    with_dockerignore(context, dockerfile, path.as_deref())
}

fn read_stream(mut reader: Box<dyn Read + Send>) -> Result<Dockerfile, ContextError> {
    let mut bytes = Vec::new();
    reader
        .read_to_end(&mut bytes)
        .map_err(|source| ContextError::DockerfileStream {
            stream: STREAM,
            source,
        })?;
    Ok(Dockerfile {
        name: "Dockerfile".into(),
        bytes,
    })
}

/// Inputs from an already read Dockerfile: `path` (where it was read from, if a file) locates a
/// `<Dockerfile>.dockerignore`; otherwise the context's `.dockerignore` applies.
fn with_dockerignore(
    context: &Path,
    dockerfile: Dockerfile,
    path: Option<&Path>,
) -> Result<Inputs, ContextError> {
    let specific = path.map(|p| {
        let mut s = p.as_os_str().to_owned();
        s.push(".dockerignore");
        PathBuf::from(s)
    });
    let ignore_file = match specific {
        Some(s) if s.is_file() => s,
        _ => context.join(".dockerignore"),
    };
    let (dockerignore, dockerignore_size) = match std::fs::read(&ignore_file) {
        Ok(bytes) => (kiln_patterns::read_dockerignore(&bytes), bytes.len() as u64),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (Vec::new(), 0),
        Err(e) => return Err(fs_err("read", &ignore_file)(e)),
    };
    kiln_patterns::Matcher::new(&dockerignore).map_err(|source| ContextError::IgnorePattern {
        path: ignore_file.clone(),
        source,
    })?;
    Ok(Inputs {
        context: context.to_path_buf(),
        dockerfile,
        dockerignore,
        dockerignore_size,
    })
}

/// The Dockerfile `rel` inside `context`, which it may not leave (symlinks included).
fn read_inside(context: &Path, rel: &str, place: &str) -> Result<(Dockerfile, PathBuf), ContextError> {
    let path = context.join(kiln_solver::context::clean_rel(rel));
    let real_ctx = std::fs::canonicalize(context).map_err(fs_err("resolve", context))?;
    let bytes = match std::fs::canonicalize(&path) {
        Ok(real) if real.starts_with(&real_ctx) => {
            std::fs::read(&real).map_err(|source| ContextError::DockerfileIn {
                rel: rel.to_string(),
                place: place.to_string(),
                source,
            })?
        }
        Ok(_) => {
            return Err(ContextError::DockerfileOutside {
                rel: rel.to_string(),
                place: place.to_string(),
            })
        }
        Err(_) => {
            return Err(ContextError::DockerfileMissing {
                rel: rel.to_string(),
                place: place.to_string(),
            })
        }
    };
    let name = Path::new(rel)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| rel.to_string());
    Ok((Dockerfile { name, bytes }, path))
}

/// Inputs of a context in a temp dir whose download or stream may itself have been the
/// Dockerfile (`plain`): a Dockerfile stream wins, then `plain` (a `-f` path is then ignored
/// with a warning), then `-f` or `Dockerfile` inside the context.
fn inputs_in(
    context: &Path,
    plain: Option<&[u8]>,
    dockerfile: DockerfileSource,
    place: &str,
    plain_is: &str,
    progress: &ProgressSink,
) -> Result<Inputs, ContextError> {
    let rel = match dockerfile {
        DockerfileSource::Stream(reader) => return with_dockerignore(context, read_stream(reader)?, None),
        DockerfileSource::Path(f) => Some(f),
        DockerfileSource::Default => None,
    };
    if let Some(bytes) = plain {
        if let Some(f) = &rel {
            progress.warn(format!("--file {f} is ignored: {plain_is}"));
        }
        let df = Dockerfile {
            name: "Dockerfile".into(),
            bytes: bytes.to_vec(),
        };
        return with_dockerignore(context, df, None);
    }
    let (df, path) = read_inside(context, rel.as_deref().unwrap_or("Dockerfile"), place)?;
    with_dockerignore(context, df, Some(&path))
}

/// A fresh directory under the store's `tmp/`.
pub(crate) fn temp_dir(store: &Store, prefix: &str) -> Result<tempfile::TempDir, ContextError> {
    let parent = store.root().join("tmp");
    std::fs::create_dir_all(&parent).map_err(fs_err("create", &parent))?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&parent)
        .map_err(fs_err("create a directory in", &parent))
}

/// A reader that fails once `cancel` fires, so a long copy or extraction stops early.
struct CancellableReader<R> {
    inner: R,
    cancel: CancelToken,
}

impl<R: Read> Read for CancellableReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(io::Error::other("cancelled"));
        }
        self.inner.read(buf)
    }
}

/// A streamed context: spooled to `DIR/stdin`, then extracted into `DIR/context` when it is an
/// archive, else kept as the Dockerfile of the empty `DIR/context`.
struct Spooled {
    dir: tempfile::TempDir,
    /// The Dockerfile itself when the stream was not an archive.
    dockerfile: Option<Vec<u8>>,
}

impl Spooled {
    fn read(
        reader: Box<dyn Read + Send>,
        store: &Store,
        cancel: &CancelToken,
    ) -> Result<Spooled, ContextError> {
        let dir = temp_dir(store, "stdin-")?;
        let spool_path = dir.path().join("stdin");
        let spool = std::fs::File::create(&spool_path).map_err(fs_err("create", &spool_path))?;
        copy_cancellable(reader, spool, cancel)?;
        let kind = archive::classify_file(&spool_path).map_err(|source| ContextError::ClassifyStream {
            stream: STREAM,
            source: Box::new(source),
        })?;
        let context = dir.path().join("context");
        std::fs::create_dir(&context).map_err(fs_err("create", &context))?;
        let dockerfile = match kind {
            ContextKind::Archive(_) => {
                let file = std::fs::File::open(&spool_path).map_err(fs_err("open", &spool_path))?;
                let reader = CancellableReader {
                    inner: file,
                    cancel: cancel.clone(),
                };
                archive::extract(reader, &context, &format!("build context from {STREAM}")).map_err(
                    |source| ContextError::ExtractStream {
                        stream: STREAM,
                        source: Box::new(source),
                    },
                )?;
                None
            }
            ContextKind::Plain => Some(std::fs::read(&spool_path).map_err(fs_err("read", &spool_path))?),
        };
        std::fs::remove_file(&spool_path).map_err(fs_err("remove", &spool_path))?;
        Ok(Spooled { dir, dockerfile })
    }

    fn inputs(&self, dockerfile: DockerfileSource, progress: &ProgressSink) -> Result<Inputs, ContextError> {
        inputs_in(
            &self.dir.path().join("context"),
            self.dockerfile.as_deref(),
            dockerfile,
            &format!("the build context from {STREAM}"),
            &format!("the Dockerfile was read from {STREAM}"),
            progress,
        )
    }
}

/// Copies `reader` into `to` on a thread of its own, so that a cancel can abandon a stream
/// that stalls (the thread then ends with the process).
fn copy_cancellable(
    reader: Box<dyn Read + Send>,
    to: std::fs::File,
    cancel: &CancelToken,
) -> Result<(), ContextError> {
    let (tx, rx) = mpsc::channel();
    let reader_cancel = cancel.clone();
    std::thread::Builder::new()
        .name("kiln-spool".into())
        .spawn(move || {
            let mut reader = CancellableReader {
                inner: reader,
                cancel: reader_cancel,
            };
            let mut writer = io::BufWriter::new(to);
            let copied = io::copy(&mut reader, &mut writer).and_then(|_| writer.flush());
            let _ = tx.send(copied);
        })
        .map_err(|source| ContextError::ReadStream {
            stream: STREAM,
            source,
        })?;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(copied) if cancel.is_cancelled() => {
                drop(copied);
                return Err(ContextError::Cancelled { stream: STREAM });
            }
            Ok(copied) => {
                return copied.map_err(|source| ContextError::ReadStream {
                    stream: STREAM,
                    source,
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) if cancel.is_cancelled() => {
                return Err(ContextError::Cancelled { stream: STREAM })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(ContextError::ReadStream {
                    stream: STREAM,
                    source: io::Error::other("the copying thread ended without a result"),
                })
            }
        }
    }
}

/// A context fetched into a temp dir: `DIR/context` is the context.
pub(crate) struct Fetched {
    dir: tempfile::TempDir,
    /// The Dockerfile itself when an http(s) URL served a plain file.
    pub dockerfile: Option<Vec<u8>>,
    /// The URL, credentials redacted, for messages.
    source: String,
}

impl Fetched {
    /// Fetches a Git repository (`remote#ref:subdir`) or downloads an http(s) URL (extracted
    /// when it is an archive, else taken as the Dockerfile) into a temp dir.
    pub fn fetch(arg: &str, store: &Store, keep_git: bool) -> Result<Fetched, ContextError> {
        let dir = temp_dir(store, "remote-")?;
        let context = dir.path().join("context");
        std::fs::create_dir(&context).map_err(fs_err("create", &context))?;
        let mut dockerfile = None;
        if git::is_git_url(arg) {
            let url = GitUrl::parse(arg);
            let work = dir.path().join("work");
            std::fs::create_dir(&work).map_err(fs_err("create", &work))?;
            let git_err = |source| ContextError::Git {
                url: git::redact(arg),
                source: Box::new(source),
            };
            Git::new()
                .map_err(git_err)?
                .fetch(&url, keep_git, &work, &context)
                .map_err(git_err)?;
            std::fs::remove_dir_all(&work).map_err(fs_err("remove", &work))?;
        } else {
            let client = HttpClient::new(HttpOptions::default());
            let download =
                client
                    .download(arg, dir.path(), None)
                    .map_err(|source| ContextError::Download {
                        url: arg.to_string(),
                        source: Box::new(source),
                    })?;
            let kind = archive::classify_file(download.file.path()).map_err(|source| {
                ContextError::ClassifyDownload {
                    url: arg.to_string(),
                    source: Box::new(source),
                }
            })?;
            match kind {
                ContextKind::Archive(_) => {
                    archive::extract_file(download.file.path(), &context, arg).map_err(|source| {
                        ContextError::ExtractDownload {
                            url: arg.to_string(),
                            source: Box::new(source),
                        }
                    })?;
                }
                ContextKind::Plain => {
                    let mut bytes = Vec::new();
                    download
                        .reopen()
                        .and_then(|mut f| f.read_to_end(&mut bytes))
                        .map_err(|source| ContextError::ReadDownload {
                            url: arg.to_string(),
                            source,
                        })?;
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

    fn inputs(&self, dockerfile: DockerfileSource, progress: &ProgressSink) -> Result<Inputs, ContextError> {
        inputs_in(
            &self.context(),
            self.dockerfile.as_deref(),
            dockerfile,
            &format!("`{}`", self.source),
            &format!("`{}` is the Dockerfile itself", self.source),
            progress,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_specific_dockerignore_beats_the_contexts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::write(dir.path().join(".dockerignore"), "general\n").unwrap();
        let inputs = read_local(dir.path(), DockerfileSource::Default).unwrap();
        assert_eq!(inputs.dockerignore, vec!["general".to_string()]);
        std::fs::write(dir.path().join("Dockerfile.dockerignore"), "specific\n").unwrap();
        let inputs = read_local(dir.path(), DockerfileSource::Default).unwrap();
        assert_eq!(inputs.dockerignore, vec!["specific".to_string()]);
        assert_eq!(inputs.dockerfile.name, "Dockerfile");
    }

    #[test]
    fn a_dockerfile_inside_a_context_may_not_leave_it() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        std::fs::create_dir(&ctx).unwrap();
        std::fs::write(dir.path().join("outside"), "FROM scratch\n").unwrap();
        std::os::unix::fs::symlink("../outside", ctx.join("Dockerfile")).unwrap();
        let err = read_inside(&ctx, "Dockerfile", "the test context").unwrap_err();
        assert!(matches!(err, ContextError::DockerfileOutside { .. }), "{err}");
        let err = read_inside(&ctx, "nope", "the test context").unwrap_err();
        assert!(
            err.to_string().contains("`nope` not found in the test context"),
            "{err}"
        );
    }

    #[test]
    fn missing_and_file_contexts_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_local(&dir.path().join("nope"), DockerfileSource::Default).unwrap_err();
        assert!(err.to_string().contains("nope` not found"), "{err}");
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let err = read_local(&file, DockerfileSource::Default).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }
}
