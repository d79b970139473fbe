//! Paths inside a root: lexical cleaning of container paths and symlink resolution that never
//! leaves the root (the algorithm of Docker's `FollowSymlinkInScope` / continuity's `RootPath`:
//! an absolute link target restarts at the root, `..` stops at the root).

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::FileOpError;

/// How many symlinks one resolution may follow before giving up (as the Go implementations do).
const MAX_LINKS: usize = 255;

/// The components of `p` taken as an absolute path and cleaned lexically like Go's
/// `filepath.Clean("/" + p)`: empty and `.` components dropped, `..` removes the previous
/// component and stops at the root.
pub(super) fn clean_components(p: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// `p` cleaned into an absolute container path (`/a/b`, `/` for the root).
pub(super) fn clean(p: &str) -> String {
    let comps = clean_components(p);
    if comps.is_empty() {
        "/".to_string()
    } else {
        format!("/{}", comps.join("/"))
    }
}

/// Whether a container path names a directory by its spelling: it ends with `/` or `/.`, or
/// it is empty or `.`.
pub(super) fn names_dir(p: &str) -> bool {
    p.is_empty() || p == "." || p.ends_with('/') || p.ends_with("/.")
}

/// The last component of a cleaned container path (empty for the root).
pub(super) fn base_name(p: &str) -> &str {
    clean_components(p).last().copied().unwrap_or("")
}

/// The parent of a container path, cleaned (`/` for top-level names and for the root).
pub(super) fn parent_of(p: &str) -> String {
    let comps = clean_components(p);
    match comps.split_last() {
        Some((_, rest)) if !rest.is_empty() => format!("/{}", rest.join("/")),
        _ => "/".to_string(),
    }
}

/// A path resolved inside a root.
#[derive(Clone, Debug)]
pub(super) struct Resolved {
    /// The host path: always `root` followed by `rel`.
    pub host: PathBuf,
    /// The resolved path relative to the root, `/`-separated, empty for the root itself.
    pub rel: String,
}

/// Decides whether a path (relative to the root, `/`-separated) is invisible, such as a
/// `.dockerignore`d context entry. Invisible entries are treated as missing.
pub(super) type Hidden<'a> = &'a dyn Fn(&str, bool) -> Result<bool, FileOpError>;

/// Resolves the container path `path` inside `root`. Every symlink met on the way is followed
/// with `root` as its `/`; the last component is followed only when `follow_last`. Components
/// that do not exist are kept as they are, so the result may name a missing path.
pub(super) fn in_root(
    root: &Path,
    path: &str,
    follow_last: bool,
    hidden: Option<Hidden<'_>>,
) -> Result<Resolved, FileOpError> {
    let mut pending: VecDeque<OsString> = clean_components(path).into_iter().map(OsString::from).collect();
    let mut done: Vec<OsString> = Vec::new();
    let mut links = 0usize;
    while let Some(comp) = pending.pop_front() {
        let bytes = comp.as_bytes();
        if bytes.is_empty() || bytes == b"." {
            continue;
        }
        if bytes == b".." {
            done.pop();
            continue;
        }
        if pending.is_empty() && !follow_last {
            done.push(comp);
            break;
        }
        let mut host = join(root, &done);
        host.push(&comp);
        let meta = match std::fs::symlink_metadata(&host) {
            Ok(m) => m,
            Err(e) if is_missing(&e) => {
                done.push(comp);
                continue;
            }
            Err(source) => return Err(FileOpError::Stat { path: host, source }),
        };
        if !meta.file_type().is_symlink() {
            done.push(comp);
            continue;
        }
        if let Some(hidden) = hidden {
            let mut rel = rel_string(&done);
            if !rel.is_empty() {
                rel.push('/');
            }
            rel.push_str(&comp.to_string_lossy());
            if hidden(&rel, false)? {
                // An invisible symlink behaves as if it were not there.
                done.push(comp);
                continue;
            }
        }
        links += 1;
        if links > MAX_LINKS {
            return Err(FileOpError::TooManyLinks {
                path: path.to_string(),
            });
        }
        let target =
            std::fs::read_link(&host).map_err(|source| FileOpError::ReadLink { path: host, source })?;
        let tbytes = target.as_os_str().as_bytes();
        if tbytes.first() == Some(&b'/') {
            done.clear();
        }
        for part in tbytes.split(|b| *b == b'/').rev() {
            if !part.is_empty() {
                pending.push_front(OsString::from_vec(part.to_vec()));
            }
        }
    }
    Ok(Resolved {
        host: join(root, &done),
        rel: rel_string(&done),
    })
}

fn join(root: &Path, comps: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    for c in comps {
        p.push(c);
    }
    p
}

fn rel_string(comps: &[OsString]) -> String {
    let parts: Vec<&OsStr> = comps.iter().map(OsString::as_os_str).collect();
    let mut s = String::new();
    for (i, c) in parts.iter().enumerate() {
        if i > 0 {
            s.push('/');
        }
        s.push_str(&c.to_string_lossy());
    }
    s
}

/// A missing path, or a path one of whose parents is not a directory.
pub(super) fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_like_go() {
        assert_eq!(clean("a/../../b/./c/"), "/b/c");
        assert_eq!(clean(""), "/");
        assert_eq!(clean("/.."), "/");
        assert!(names_dir("/x/"));
        assert!(names_dir("/x/."));
        assert!(!names_dir("/x"));
        assert_eq!(parent_of("/a/b"), "/a");
        assert_eq!(parent_of("/a"), "/");
        assert_eq!(base_name("/a/b/"), "b");
    }

    #[test]
    fn links_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("usr")).unwrap();
        std::os::unix::fs::symlink("/usr", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../..", root.join("up")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        let r = in_root(root, "/abs/bin", true, None).unwrap();
        assert_eq!(r.host, root.join("usr/bin"));
        assert_eq!(r.rel, "usr/bin");
        let r = in_root(root, "/up/etc/passwd", true, None).unwrap();
        assert_eq!(r.host, root.join("etc/passwd"));
        let r = in_root(root, "/abs", false, None).unwrap();
        assert_eq!(r.host, root.join("abs"));
        assert!(matches!(
            in_root(root, "/loop", true, None),
            Err(FileOpError::TooManyLinks { .. })
        ));
    }
}
