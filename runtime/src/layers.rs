//! Path resolution inside a root that may not be mounted yet: a plain directory, or a stack of
//! overlay lower dirs read with overlayfs semantics (whiteouts, opaque dirs, upper entries hiding
//! lower ones).
//!
//! Symlinks are followed inside the root: absolute links restart at the root and `..` never climbs
//! above it, so a resolved path never escapes the root.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::sys;

/// Symlinks followed before giving up, like the kernel's limit.
const MAX_SYMLINKS: usize = 40;

/// Errors of [`RootView`] resolution.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A symlink loop.
    #[error("too many levels of symbolic links resolving `{path}` in `{root}`")]
    SymlinkLoop {
        /// The path being resolved.
        path: String,
        /// The root (top layer).
        root: PathBuf,
    },
    /// A component that must be a directory is a file.
    #[error("resolving `{path}` in `{root}`: `{component}` is not a directory")]
    NotADirectory {
        /// The path being resolved.
        path: String,
        /// The root (top layer).
        root: PathBuf,
        /// The offending component, relative to the root.
        component: PathBuf,
    },
    /// `lstat` failed for a reason other than absence.
    #[error("failed to inspect `{path}`")]
    Stat {
        /// The host path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `readlink` failed.
    #[error("failed to read symlink `{path}`")]
    ReadLink {
        /// The host path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading a file failed.
    #[error("failed to read `{path}`")]
    Read {
        /// The host path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What the final component of a resolved path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory (or the root).
    Dir,
    /// Anything but a directory or symlink (symlinks are followed).
    Other,
}

/// A path resolved inside a [`RootView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The symlink-free path, relative to the root (empty for the root itself).
    pub rel: PathBuf,
    /// How many leading components of `rel` exist.
    pub existing: usize,
    /// The kind of the final entry, if it exists.
    pub kind: Option<EntryKind>,
    /// The layer (index into the view's dirs) holding the final entry, if it exists.
    pub layer: Option<usize>,
    /// Whether an entry created at `rel` in a layer below the whole stack would show through: no
    /// whiteout, opaque dir or non-directory above hides it.
    pub visible_from_below: bool,
}

impl Resolved {
    /// Whether the whole path exists.
    pub fn exists(&self) -> bool {
        self.kind.is_some()
    }
}

/// A root directory tree to resolve paths in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootView {
    /// A plain directory.
    Dir(PathBuf),
    /// Overlay lower dirs, top first.
    Layers(Vec<PathBuf>),
}

enum Lookup {
    Dir { layers: Vec<usize>, cut: bool },
    Symlink(usize),
    Other(usize),
    Missing { hidden: bool },
}

impl RootView {
    fn dirs(&self) -> &[PathBuf] {
        match self {
            RootView::Dir(d) => std::slice::from_ref(d),
            RootView::Layers(l) => l,
        }
    }

    fn overlay(&self) -> bool {
        matches!(self, RootView::Layers(_))
    }

    fn root_name(&self) -> PathBuf {
        self.dirs().first().cloned().unwrap_or_default()
    }

    fn lookup(&self, active: &[usize], rel: &Path) -> Result<Lookup, LayerError> {
        let dirs = self.dirs();
        let mut found: Vec<usize> = Vec::new();
        for &l in active {
            let host = dirs[l].join(rel);
            let md = match std::fs::symlink_metadata(&host) {
                Ok(md) => md,
                Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
                    continue
                }
                Err(source) => return Err(LayerError::Stat { path: host, source }),
            };
            let ft = md.file_type();
            if self.overlay() && ft.is_char_device() && md.rdev() == 0 {
                if found.is_empty() {
                    return Ok(Lookup::Missing { hidden: true });
                }
                return Ok(Lookup::Dir {
                    layers: found,
                    cut: true,
                });
            }
            if ft.is_dir() {
                found.push(l);
                if self.overlay() && sys::is_overlay_opaque(&host) {
                    return Ok(Lookup::Dir {
                        layers: found,
                        cut: true,
                    });
                }
                continue;
            }
            if !found.is_empty() {
                return Ok(Lookup::Dir {
                    layers: found,
                    cut: true,
                });
            }
            return Ok(if ft.is_symlink() {
                Lookup::Symlink(l)
            } else {
                Lookup::Other(l)
            });
        }
        Ok(if found.is_empty() {
            Lookup::Missing { hidden: false }
        } else {
            Lookup::Dir {
                layers: found,
                cut: false,
            }
        })
    }

    /// Resolves `path` (absolute or relative to the root), following symlinks inside the root.
    pub fn resolve(&self, path: &str) -> Result<Resolved, LayerError> {
        let dirs = self.dirs();
        let all: Vec<usize> = (0..dirs.len()).collect();
        let mut pending: VecDeque<OsString> = components(Path::new(path));
        let mut done: Vec<OsString> = Vec::new();
        // Per resolved level: the layers contributing to that directory and whether the chain was
        // cut before the bottom of the stack. Index 0 is the root.
        let mut levels: Vec<(Vec<usize>, bool)> = vec![(all.clone(), false)];
        let mut hops = 0;
        while let Some(c) = pending.pop_front() {
            if c == ".." {
                if done.pop().is_some() {
                    levels.pop();
                }
                continue;
            }
            let (active, parent_cut) = match levels.last() {
                Some((a, cut)) => (a.clone(), *cut),
                None => (all.clone(), false),
            };
            let mut rel: PathBuf = done.iter().collect();
            rel.push(&c);
            match self.lookup(&active, &rel)? {
                Lookup::Dir { layers, cut } => {
                    done.push(c);
                    levels.push((layers, parent_cut || cut));
                }
                Lookup::Symlink(l) => {
                    hops += 1;
                    if hops > MAX_SYMLINKS {
                        return Err(LayerError::SymlinkLoop {
                            path: path.to_string(),
                            root: self.root_name(),
                        });
                    }
                    let host = dirs[l].join(&rel);
                    let target = std::fs::read_link(&host)
                        .map_err(|source| LayerError::ReadLink { path: host, source })?;
                    if target.is_absolute() {
                        done.clear();
                        levels.truncate(1);
                    }
                    let mut new = components(&target);
                    new.extend(pending);
                    pending = new;
                }
                Lookup::Other(l) => {
                    if pending.iter().any(|p| p != "..") {
                        return Err(LayerError::NotADirectory {
                            path: path.to_string(),
                            root: self.root_name(),
                            component: rel,
                        });
                    }
                    if pending.is_empty() {
                        done.push(c);
                        return Ok(Resolved {
                            existing: done.len(),
                            rel: done.iter().collect(),
                            kind: Some(EntryKind::Other),
                            layer: Some(l),
                            visible_from_below: false,
                        });
                    }
                    // `file/..`: the kernel refuses this too.
                    return Err(LayerError::NotADirectory {
                        path: path.to_string(),
                        root: self.root_name(),
                        component: rel,
                    });
                }
                Lookup::Missing { hidden } => {
                    let existing = done.len();
                    done.push(c);
                    for rest in pending {
                        if rest == ".." {
                            if done.len() > existing {
                                done.pop();
                            }
                        } else {
                            done.push(rest);
                        }
                    }
                    return Ok(Resolved {
                        rel: done.iter().collect(),
                        existing,
                        kind: None,
                        layer: None,
                        visible_from_below: !hidden && !parent_cut,
                    });
                }
            }
        }
        let layer = levels.last().and_then(|(l, _)| l.first().copied());
        Ok(Resolved {
            existing: done.len(),
            rel: done.iter().collect(),
            kind: Some(EntryKind::Dir),
            layer,
            visible_from_below: false,
        })
    }

    /// Reads a file inside the root; `Ok(None)` if it does not exist.
    pub fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, LayerError> {
        let resolved = match self.resolve(path) {
            Ok(r) => r,
            Err(LayerError::NotADirectory { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let (Some(_), Some(layer)) = (resolved.kind, resolved.layer) else {
            return Ok(None);
        };
        let host = self.dirs()[layer].join(&resolved.rel);
        std::fs::read(&host)
            .map(Some)
            .map_err(|source| LayerError::Read { path: host, source })
    }
}

fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn follows_symlinks_inside_root() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("run/lock")).unwrap();
        fs::create_dir_all(r.join("var")).unwrap();
        symlink("/run", r.join("var/run")).unwrap();
        symlink("../../../../etc", r.join("up")).unwrap();
        let view = RootView::Dir(r.to_path_buf());
        let res = view.resolve("/var/run/lock/x").unwrap();
        assert_eq!(res.rel, PathBuf::from("run/lock/x"));
        assert_eq!(res.existing, 2);
        assert!(!res.exists());
        assert!(res.visible_from_below);
        // `..` never climbs above the root.
        let res = view.resolve("/up/passwd").unwrap();
        assert_eq!(res.rel, PathBuf::from("etc/passwd"));
        assert_eq!(res.existing, 0);
    }

    #[test]
    fn symlink_loop_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        symlink("b", t.path().join("a")).unwrap();
        symlink("a", t.path().join("b")).unwrap();
        let err = RootView::Dir(t.path().to_path_buf()).resolve("/a/x").unwrap_err();
        assert!(
            err.to_string()
                .contains("too many levels of symbolic links resolving `/a/x`"),
            "{err}"
        );
    }

    #[test]
    fn file_in_the_middle_is_not_a_directory() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("f"), "").unwrap();
        let err = RootView::Dir(t.path().to_path_buf()).resolve("/f/x").unwrap_err();
        assert!(matches!(err, LayerError::NotADirectory { .. }), "{err}");
    }

    #[test]
    fn upper_layer_wins_and_whiteout_hides() {
        let t = tempfile::tempdir().unwrap();
        let top = t.path().join("top");
        let bottom = t.path().join("bottom");
        fs::create_dir_all(top.join("etc")).unwrap();
        fs::create_dir_all(bottom.join("etc")).unwrap();
        fs::create_dir_all(bottom.join("proc")).unwrap();
        fs::write(top.join("etc/passwd"), "top").unwrap();
        fs::write(bottom.join("etc/passwd"), "bottom").unwrap();
        fs::write(bottom.join("etc/group"), "g").unwrap();
        let view = RootView::Layers(vec![top.clone(), bottom.clone()]);
        assert_eq!(view.read_file("/etc/passwd").unwrap().unwrap(), b"top");
        assert_eq!(view.read_file("/etc/group").unwrap().unwrap(), b"g");
        assert_eq!(view.read_file("/etc/shadow").unwrap(), None);
        let hosts = view.resolve("/etc/hosts").unwrap();
        assert!(!hosts.exists() && hosts.visible_from_below);
        // A whiteout (char device 0/0) in the top layer hides the bottom's entry.
        let made = nix::sys::stat::mknod(
            &top.join("proc"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        );
        if made.is_ok() {
            let proc_ = view.resolve("/proc").unwrap();
            assert!(!proc_.exists());
            assert!(!proc_.visible_from_below);
        }
    }

    #[test]
    fn file_over_dir_cuts_the_chain() {
        let t = tempfile::tempdir().unwrap();
        let top = t.path().join("top");
        let mid = t.path().join("mid");
        fs::create_dir_all(top.join("d")).unwrap();
        fs::create_dir_all(&mid).unwrap();
        fs::write(mid.join("d"), "file").unwrap();
        let view = RootView::Layers(vec![top, mid]);
        let res = view.resolve("/d/x").unwrap();
        assert!(!res.exists());
        assert!(
            !res.visible_from_below,
            "a layer below `mid` would be hidden by the file `d`"
        );
    }
}
