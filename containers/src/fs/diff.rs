//! `kiln diff`: the container's upper dir against its image's layers, with Docker's overlay rules.

use super::*;

/// The kind of a `diff` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// `C`: changed.
    Modified,
    /// `A`: added.
    Added,
    /// `D`: deleted.
    Deleted,
}

/// One line of `kiln diff`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// What happened.
    pub kind: ChangeKind,
    /// Absolute path in the container.
    pub path: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = match self.kind {
            ChangeKind::Modified => 'C',
            ChangeKind::Added => 'A',
            ChangeKind::Deleted => 'D',
        };
        write!(f, "{k} {}", self.path)
    }
}

fn dir_is_empty(path: &Path) -> bool {
    fs::read_dir(path)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

/// The paths (relative to the upper dir) that kiln created as mount points and that must stay
/// out of `diff` and `commit`: each of [`RUNTIME_MOUNT_POINTS`] and `mount_targets` that is an
/// empty file or directory in the upper dir and absent from the image, plus the parents created
/// only to hold them.
pub fn created_mount_points(rootfs: &RootfsPaths, mount_targets: &[String]) -> Vec<PathBuf> {
    let stack = Stack {
        layers: &rootfs.lower,
    };
    let mut excluded: Vec<PathBuf> = Vec::new();
    let targets = RUNTIME_MOUNT_POINTS
        .iter()
        .map(|s| s.to_string())
        .chain(mount_targets.iter().cloned());
    for t in targets {
        let rel = rel_of(&t);
        if rel.as_os_str().is_empty() || excluded.iter().any(|e| rel.starts_with(e)) {
            continue;
        }
        let p = rootfs.upper.join(&rel);
        let Some(m) = lstat(&p) else { continue };
        let empty = (m.is_file() && m.len() == 0) || (m.is_dir() && dir_is_empty(&p));
        if !empty || is_whiteout(&m) || stack.lookup(&rel).is_some() {
            continue;
        }
        let mut top = rel.clone();
        excluded.push(rel);
        // Parents that exist only because of excluded entries go too.
        while let Some(parent) = top.parent().filter(|p| !p.as_os_str().is_empty()) {
            let parent = parent.to_path_buf();
            if stack.lookup(&parent).is_some() {
                break;
            }
            let all_excluded = fs::read_dir(rootfs.upper.join(&parent))
                .map(|entries| {
                    entries
                        .flatten()
                        .all(|e| excluded.iter().any(|x| *x == parent.join(e.file_name())))
                })
                .unwrap_or(false);
            if !all_excluded {
                break;
            }
            excluded.retain(|x| !x.starts_with(&parent));
            excluded.push(parent.clone());
            top = parent;
        }
    }
    excluded.sort();
    excluded
}

/// Docker's `diff` of a container: its upper dir against the image's layers, in walk order
/// (names sorted within each directory, a directory before its contents), with a changed
/// entry's unchanged parent reported `C`. `mount_targets` are the container's mount points (see
/// [`created_mount_points`]).
pub fn diff(rootfs: &RootfsPaths, mount_targets: &[String]) -> Result<Vec<Change>> {
    let excluded = created_mount_points(rootfs, mount_targets);
    let mut d = Differ {
        stack: Stack {
            layers: &rootfs.lower,
        },
        upper: &rootfs.upper,
        excluded: &excluded,
        changed_dirs: HashSet::new(),
        out: Vec::new(),
    };
    d.walk(Path::new(""))?;
    Ok(d.out)
}

struct Differ<'a> {
    stack: Stack<'a>,
    upper: &'a Path,
    excluded: &'a [PathBuf],
    changed_dirs: HashSet<PathBuf>,
    out: Vec<Change>,
}

impl Differ<'_> {
    fn sorted_children(&self, rel: &Path) -> Result<Vec<OsString>> {
        let dir = self.upper.join(rel);
        let entries = fs::read_dir(&dir).map_err(|source| FsError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        let mut names = Vec::new();
        for e in entries {
            let e = e.map_err(|source| FsError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            names.push(e.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(names)
    }

    fn walk(&mut self, rel: &Path) -> Result<()> {
        for name in self.sorted_children(rel)? {
            let path = rel.join(&name);
            if self.excluded.contains(&path) {
                continue;
            }
            let host = self.upper.join(&path);
            let meta = fs::symlink_metadata(&host).map_err(|source| FsError::Stat {
                path: host.clone(),
                source,
            })?;
            let lower = self.stack.lookup(&path);
            // An opaque directory over one of the image's is reported deleted (its old
            // contents are gone), as Docker's overlay diff does.
            let deleted = is_whiteout(&meta) || (meta.is_dir() && lower.is_some() && is_opaque(&host));
            let kind = if deleted {
                Some(ChangeKind::Deleted)
            } else {
                match &lower {
                    None => Some(ChangeKind::Added),
                    Some((_, l)) if l.is_dir() && meta.is_dir() && self.same_dir(&path, &meta, l)? => None,
                    Some(_) => Some(ChangeKind::Modified),
                }
            };
            if let Some(kind) = kind {
                if meta.is_dir() {
                    self.changed_dirs.insert(path.clone());
                }
                if kind != ChangeKind::Modified {
                    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                        if self.changed_dirs.insert(parent.to_path_buf()) {
                            self.out.push(Change {
                                kind: ChangeKind::Modified,
                                path: format!("/{}", parent.display()),
                            });
                        }
                    }
                }
                self.out.push(Change {
                    kind,
                    path: format!("/{}", path.display()),
                });
            }
            if meta.is_dir() {
                self.walk(&path)?;
            }
        }
        Ok(())
    }

    /// Docker's test for a directory that is only in the upper dir because something below it
    /// changed: same size, mode and mtime as the image's. A directory holding nothing but
    /// kiln's mount points, with the image's mode, also counts as unchanged.
    fn same_dir(&self, rel: &Path, upper: &fs::Metadata, lower: &fs::Metadata) -> Result<bool> {
        if upper.mode() != lower.mode() {
            return Ok(false);
        }
        let same_time = upper.mtime() == lower.mtime()
            && (upper.mtime_nsec() == lower.mtime_nsec()
                || upper.mtime_nsec() == 0
                || lower.mtime_nsec() == 0);
        if upper.size() == lower.size() && same_time {
            return Ok(true);
        }
        let children = self.sorted_children(rel)?;
        Ok(!children.is_empty() && children.iter().all(|c| self.excluded.contains(&rel.join(c))))
    }
}
