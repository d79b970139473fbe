//! File operations (`COPY`, `ADD`, `WORKDIR`'s mkdir, heredoc files, removals) with
//! BuildKit's semantics, applied to directories the build engine has mounted.
//!
//! Architecture invariant: every path an action names is resolved inside its root by
//! `resolve::in_root`: symlinks are followed with the root as `/` and `..` stops at the root,
//! so no action reads outside its source root or writes outside `dest_root`. Symlinks found
//! while walking a copied directory are recreated with their target verbatim, never followed.
//!
//! Ownership of copied entries: with `--chown` the given owner; otherwise the source's owner,
//! except for a [`SourceRoot`] with `normalize_owner` (the build context), whose entries are
//! owned by `0:0` as BuildKit's client sends them. Modes and modification times come from the
//! source unless `--chmod` / [`FileOpOptions::timestamp`] say otherwise.

mod chmod;
mod copy;
mod fsops;
mod meta;
pub use meta::Meta;
pub mod link;
mod over;
mod owner;
mod resolve;
mod unpack;
mod wildcard;

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kiln_dag::{FileAction, MkdirAction, MkfileAction, RmAction};
use kiln_patterns::{Matcher, PatternError};

/// A read-only tree copy sources are read from.
#[derive(Clone, Debug)]
pub struct SourceRoot {
    /// The directory that is `/` for the action's source paths.
    pub path: PathBuf,
    /// Copied entries get uid/gid `0:0` instead of the owner they have on disk (unless
    /// `--chown` says otherwise). True for the build context, whose files BuildKit's client
    /// sends as root's; false for another stage's or an image's filesystem, whose owners are
    /// kept.
    pub normalize_owner: bool,
    /// `.dockerignore` patterns of a build context: a path they exclude is invisible (not
    /// copied, not matched by a wildcard, "not found" when named).
    pub filter: Option<Matcher>,
}

impl SourceRoot {
    /// The build context at `path`, filtered by `filter`, owners normalised to root.
    pub fn context(path: impl Into<PathBuf>, filter: Option<Matcher>) -> SourceRoot {
        SourceRoot {
            path: path.into(),
            normalize_owner: true,
            filter,
        }
    }

    /// A stage's or an image's filesystem at `path`: nothing hidden, owners kept.
    pub fn filesystem(path: impl Into<PathBuf>) -> SourceRoot {
        SourceRoot {
            path: path.into(),
            normalize_owner: false,
            filter: None,
        }
    }

    /// Whether this is a build context (whose devices, sockets and FIFOs a COPY treats as
    /// BuildKit's context transfer delivers them: [`crate::context::special_file`]).
    fn is_build_context(&self) -> bool {
        self.normalize_owner
    }

    /// Whether the context-relative path `rel` is excluded by the filter.
    fn hides(&self, rel: &str) -> Result<bool, FileOpError> {
        match &self.filter {
            Some(m) if !rel.is_empty() => m.matches(rel).map_err(|source| FileOpError::Pattern {
                path: rel.to_string(),
                source,
            }),
            _ => Ok(false),
        }
    }

    /// For an excluded directory: may something below it still be visible?
    fn may_show_below(&self, rel: &str) -> bool {
        self.filter.as_ref().is_some_and(|m| m.may_reinclude_below(rel))
    }
}

/// Settings that apply to every action of an op.
#[derive(Clone, Debug, Default)]
pub struct FileOpOptions {
    /// When set, everything the op copies or creates gets this access and modification time
    /// (BuildKit's file-op timestamp, used for reproducible builds). When unset, copies keep
    /// their source's times and new entries get the current time.
    pub timestamp: Option<SystemTime>,
    /// Keys the files copied from one input and links unchanged ones from an earlier result
    /// (see [`link`]).
    pub linking: Option<std::sync::Arc<link::Linking>>,
}

/// A file action failed.
#[derive(Debug, thiserror::Error)]
pub enum FileOpError {
    #[error("copy source input {index} does not exist: the op has {count} source roots")]
    NoSuchInput { index: usize, count: usize },
    #[error("\"{path}\": not found")]
    SourceNotFound { path: String },
    #[error("{pattern} not found: no source files were specified")]
    NoMatches { pattern: String },
    #[error("failed to stat `{path}`")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to read directory `{path}`")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to read symlink `{path}`")]
    ReadLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("too many levels of symbolic links resolving `{path}`")]
    TooManyLinks { path: String },
    #[error("destination parent of `{path}` does not exist")]
    MissingDestParent {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to create directory `{path}`")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot copy to non-directory: {path}")]
    NotADirectory { path: PathBuf },
    #[error("cannot replace to directory {path} with file")]
    ReplaceDirectory { path: PathBuf },
    #[error("failed to remove `{path}`")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to copy `{from}` to `{to}`")]
    CopyFile {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to create symlink `{path}`")]
    Symlink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to create hard link `{path}` to `{target}`")]
    HardLink {
        path: PathBuf,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to create special file `{path}`")]
    Mknod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to chown `{path}` to {uid}:{gid}")]
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
        #[source]
        source: io::Error,
    },
    #[error("failed to chmod `{path}` to {mode:o}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        #[source]
        source: io::Error,
    },
    #[error("failed to set the times of `{path}`")]
    Times {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid --chmod value `{value}`: {reason}")]
    InvalidChmod { value: String, reason: String },
    #[error("failed to read {file} of the destination")]
    ReadIdFile {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid --exclude patterns {patterns:?}")]
    ExcludePatterns {
        patterns: Vec<String>,
        #[source]
        source: PatternError,
    },
    #[error("failed to match `{path}` against patterns")]
    Pattern {
        path: String,
        #[source]
        source: PatternError,
    },
    #[error("failed to read archive `{path}`")]
    Archive {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unsupported entry type {kind:?} for `{entry}` in archive `{archive}`")]
    ArchiveEntryType {
        archive: PathBuf,
        entry: String,
        kind: u8,
    },
    #[error("cannot create file `{path}`: it names the root directory")]
    IsRoot { path: String },
    #[error("cannot remove `{path}`: it names the root directory")]
    RemoveRoot { path: String },
}

/// Applies `actions` in order to the filesystem rooted at `dest_root` (a writable merged view of
/// the op's input), reading copy sources from `sources[action.source_input]` (read-only roots:
/// the context directory, another stage's merged view, an image's merged view). Paths in
/// actions are absolute inside their roots.
pub fn apply(
    dest_root: &Path,
    sources: &[SourceRoot],
    actions: &[FileAction],
    opts: &FileOpOptions,
) -> Result<(), FileOpError> {
    for action in actions {
        match action {
            FileAction::Copy(c) => {
                let src = sources.get(c.source_input).ok_or(FileOpError::NoSuchInput {
                    index: c.source_input,
                    count: sources.len(),
                })?;
                copy::copy_action(dest_root, src, c, opts)?;
            }
            FileAction::Mkdir(m) => mkdir(dest_root, m, opts)?,
            FileAction::Mkfile(m) => mkfile(dest_root, m, opts)?,
            FileAction::Rm(r) => rm(dest_root, r)?,
        }
    }
    Ok(())
}

/// Resolves the container path `path` inside `root`, following every symlink with `root` as its
/// `/`: the host path and the path relative to `root`.
pub(crate) fn resolve_in_root(root: &Path, path: &str) -> Result<(PathBuf, String), FileOpError> {
    let r = resolve::in_root(root, path, true, None)?;
    Ok((r.host, r.rel))
}

/// The directory a copy source reads everything from: the source (a `--parents` pivot `/./`
/// is just a `.` component) up to its first component with a wildcard, cleaned, absolute.
pub(crate) fn source_prefix(src: &str) -> String {
    wildcard::split(src).0
}

fn mkdir(root: &Path, action: &MkdirAction, opts: &FileOpOptions) -> Result<(), FileOpError> {
    let owner = action
        .owner
        .as_ref()
        .map(|o| owner::resolve_owner(root, o))
        .transpose()?;
    let path = resolve::in_root(root, &action.path, true, None)?.host;
    let mode = action.mode & 0o777;
    if action.make_parents {
        return fsops::mkdir_all(root, &path, mode, owner, opts.timestamp).map(|_| ());
    }
    match std::fs::create_dir(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(source) => return Err(FileOpError::CreateDir { path, source }),
    }
    fsops::set_mode(&path, mode)?;
    if let Some((uid, gid)) = owner {
        fsops::lchown(&path, uid, gid)?;
    }
    if let Some(t) = opts.timestamp {
        fsops::set_times(&path, t, t)?;
    }
    Ok(())
}

fn mkfile(root: &Path, action: &MkfileAction, opts: &FileOpOptions) -> Result<(), FileOpError> {
    let owner = action
        .owner
        .as_ref()
        .map(|o| owner::resolve_owner(root, o))
        .transpose()?;
    let target = resolve::in_root(root, &action.path, true, None)?;
    if target.rel.is_empty() {
        return Err(FileOpError::IsRoot {
            path: action.path.clone(),
        });
    }
    let path = target.host;
    let Some(dir) = path.parent() else {
        return Err(FileOpError::IsRoot {
            path: action.path.clone(),
        });
    };
    // Written next to the target and renamed over it: whatever was there (a device node, a
    // symlink) is replaced, never opened.
    let tmp = dir.join(format!(".tmp-mkfile-{}", std::process::id()));
    let result = (|| {
        std::fs::write(&tmp, action.data.as_bytes()).map_err(|source| FileOpError::Write {
            path: path.clone(),
            source,
        })?;
        fsops::set_mode(&tmp, action.mode & 0o777)?;
        if let Some((uid, gid)) = owner {
            fsops::lchown(&tmp, uid, gid)?;
        }
        if let Some(t) = opts.timestamp {
            fsops::set_times(&tmp, t, t)?;
        }
        std::fs::rename(&tmp, &path).map_err(|source| FileOpError::Write {
            path: path.clone(),
            source,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn rm(root: &Path, action: &RmAction) -> Result<(), FileOpError> {
    let paths = if action.allow_wildcard {
        let (prefix, pattern) = wildcard::split(&action.path);
        if pattern.is_empty() {
            vec![prefix]
        } else {
            let base = resolve::in_root(root, &prefix, false, None)?;
            match std::fs::symlink_metadata(&base.host) {
                Ok(m) if m.is_dir() => wildcard::expand(&base, &pattern, None)?
                    .into_iter()
                    .map(|r| format!("/{}", r.rel))
                    .collect::<Vec<String>>(),
                Ok(_) => Vec::new(),
                Err(_) => return Err(FileOpError::SourceNotFound { path: prefix }),
            }
        }
    } else {
        vec![action.path.clone()]
    };
    for p in paths {
        let base = resolve::base_name(&p).to_string();
        if base.is_empty() {
            return Err(FileOpError::RemoveRoot { path: p });
        }
        let dir = resolve::in_root(root, &resolve::parent_of(&p), true, None)?.host;
        let target = dir.join(&base);
        if !action.allow_not_found && std::fs::metadata(&target).is_err() {
            return Err(FileOpError::SourceNotFound {
                path: resolve::clean(&p),
            });
        }
        fsops::remove_all(&target)?;
    }
    Ok(())
}
