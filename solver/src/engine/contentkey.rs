//! Content keys of copies from a filesystem (`COPY --from=stage`, `COPY --from=image`): what
//! the copied selection holds, not which vertex produced it, as BuildKit's content-based cache
//! keys are. A source stage that runs again and gives the same files leaves the copy's key, and
//! so every key after it, unchanged.
//!
//! The key of one selection covers, for every entry at and below the source's literal prefix
//! (the path up to its first wildcard; a `--parents` pivot `/./` is no boundary) and below the
//! targets of the symlinks met there: the path relative to the prefix, the type, mode, owner,
//! size, symlink target and (for files) the blake3 of the content. Never a modification time:
//! BuildKit's content hash leaves it out too, so a copy found in the cache keeps the times it
//! was made with.
//!
//! Hashing reads the files. Layers are immutable per diff ID, so the hash of a selection of a
//! layer stack is remembered in `ROOT/cache/selection/<hex>` under the stack's diff IDs and the
//! selection: a build whose source stage comes from the cache computes the copy's key from that
//! record without unpacking or reading anything.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_cache::buildcache::Layer;
use rayon::prelude::*;

use super::mounts;
use super::{Engine, EngineError};

/// How many symlink hops away from the selection the key follows.
const MAX_LINK_ROUNDS: usize = 64;

impl Engine {
    /// The content key material of the selection `src` (a copy source, wildcards allowed) of the
    /// filesystem `layers`.
    pub(super) async fn selection_key(&self, layers: &[Layer], src: &str) -> Result<[u8; 32], EngineError> {
        let prefix = crate::fileop::source_prefix(src);
        let mut memo = blake3::Hasher::new();
        memo.update(b"kiln selection memo v1\0");
        memo.update(prefix.as_bytes());
        memo.update(&[0]);
        for l in layers {
            memo.update(l.diff_id.to_string().as_bytes());
            memo.update(&[0]);
        }
        let memo_name = memo.finalize().to_hex().to_string();
        let memo_path = self.store.cache_dir().join("selection").join(&memo_name);
        if let Some(k) = read_memo(&memo_path) {
            self.note_selection(&memo_name, k);
            return Ok(k);
        }
        // An imported cache names the key the exporting build computed from the same layers:
        // the layers stay where they are.
        if let Some(k) = self.cache_source().and_then(|s| s.selection(&memo_name)) {
            self.note_selection(&memo_name, k);
            return Ok(k);
        }
        let lower = self.lower_dirs(layers).await?;
        let view = mounts::read_only_view(self.mount_area.path(), &self.empty, &lower)?;
        let root = view.path().to_path_buf();
        let key = tokio::task::block_in_place(|| tree_key(&root, &prefix))?;
        drop(view);
        write_memo(&memo_path, &key);
        self.note_selection(&memo_name, key);
        Ok(key)
    }
}

fn read_memo(path: &Path) -> Option<[u8; 32]> {
    let bytes = std::fs::read(path).ok()?;
    bytes.try_into().ok()
}

/// Best effort: the memo only saves work.
fn write_memo(path: &Path, key: &[u8; 32]) {
    let Some(dir) = path.parent() else { return };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let ok = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, key))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = ok {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(error = %e, "selection key not remembered");
    }
}

/// One entry of a selection.
struct Entry {
    rel: String,
    host: PathBuf,
    meta: std::fs::Metadata,
}

/// The key of what `root` holds at and below `prefix` (and below the symlinks met there).
pub(crate) fn tree_key(root: &Path, prefix: &str) -> Result<[u8; 32], EngineError> {
    let mut h = blake3::Hasher::new();
    h.update(b"kiln selection v1\0");
    let mut todo = vec![prefix.to_string()];
    let mut seen = std::collections::BTreeSet::new();
    let mut rounds = 0;
    while let Some(start) = todo.pop() {
        rounds += 1;
        if rounds > MAX_LINK_ROUNDS || !seen.insert(start.clone()) {
            continue;
        }
        let (host, rel) =
            crate::fileop::resolve_in_root(root, &start).map_err(|e| EngineError::Selection {
                path: start.clone(),
                source: Box::new(e),
            })?;
        h.update(b"\0root\0");
        h.update(rel.as_bytes());
        let mut entries = Vec::new();
        match std::fs::symlink_metadata(&host) {
            Ok(meta) => {
                let is_dir = meta.is_dir();
                entries.push(Entry {
                    rel: String::new(),
                    host: host.clone(),
                    meta,
                });
                if is_dir {
                    walk(&host, "", &mut entries)?;
                }
            }
            // A missing source: the copy fails, or (with a wildcard) finds nothing; the key
            // says "nothing here", which changes once something is.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
                h.update(b"\0missing\0");
                continue;
            }
            Err(source) => return Err(EngineError::SelectionIo { path: host, source }),
        }
        let contents: Vec<Result<[u8; 32], EngineError>> = entries
            .par_iter()
            .map(|e| {
                if e.meta.is_file() {
                    hash_file(&e.host)
                } else {
                    Ok([0; 32])
                }
            })
            .collect();
        for (e, content) in entries.iter().zip(contents) {
            let ft = e.meta.file_type();
            let kind: u8 = if ft.is_file() {
                1
            } else if ft.is_dir() {
                2
            } else if ft.is_symlink() {
                3
            } else {
                4
            };
            h.update(e.rel.as_bytes());
            h.update(&[0, kind]);
            h.update(&(e.meta.permissions().mode() & 0o7777).to_le_bytes());
            h.update(&e.meta.uid().to_le_bytes());
            h.update(&e.meta.gid().to_le_bytes());
            h.update(&e.meta.rdev().to_le_bytes());
            h.update(&(if ft.is_file() { e.meta.len() } else { 0 }).to_le_bytes());
            if ft.is_symlink() {
                let target = std::fs::read_link(&e.host).map_err(|source| EngineError::SelectionIo {
                    path: e.host.clone(),
                    source,
                })?;
                let target = target.to_string_lossy().into_owned();
                h.update(target.as_bytes());
                // What the link leads to is readable through it (a followed source, a wildcard
                // match), so it is part of the key too.
                let base = if e.rel.is_empty() {
                    start.clone()
                } else {
                    format!("{}/{}", rel_to_abs(&rel), e.rel)
                };
                let parent = base
                    .rsplit_once('/')
                    .map_or("/", |(p, _)| if p.is_empty() { "/" } else { p });
                todo.push(if target.starts_with('/') {
                    target.clone()
                } else {
                    format!("{parent}/{target}")
                });
            }
            h.update(&[0]);
            h.update(&content?);
        }
    }
    Ok(*h.finalize().as_bytes())
}

fn rel_to_abs(rel: &str) -> String {
    format!("/{rel}")
}

/// Appends the entries below `dir` (relative paths below the selection root), sorted.
fn walk(dir: &Path, rel: &str, out: &mut Vec<Entry>) -> Result<(), EngineError> {
    let rd = std::fs::read_dir(dir).map_err(|source| EngineError::SelectionIo {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|source| EngineError::SelectionIo {
            path: dir.to_path_buf(),
            source,
        })?;
        names.push(e.file_name());
    }
    names.sort();
    for name in names {
        let host = dir.join(&name);
        let meta = std::fs::symlink_metadata(&host).map_err(|source| EngineError::SelectionIo {
            path: host.clone(),
            source,
        })?;
        let child = if rel.is_empty() {
            name.to_string_lossy().into_owned()
        } else {
            format!("{rel}/{}", name.to_string_lossy())
        };
        let is_dir = meta.is_dir();
        out.push(Entry {
            rel: child.clone(),
            host: host.clone(),
            meta,
        });
        if is_dir {
            walk(&host, &child, out)?;
        }
    }
    Ok(())
}

fn hash_file(path: &Path) -> Result<[u8; 32], EngineError> {
    let io = |source| EngineError::SelectionIo {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, data: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap_or(root)).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(p, data).unwrap_or_else(|e| panic!("{e}"));
    }

    fn key(root: &Path, prefix: &str) -> [u8; 32] {
        tree_key(root, prefix).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn keys_follow_content_not_times() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        write(d.path(), "app/a", "a");
        write(d.path(), "app/sub/b", "b");
        write(d.path(), "other/c", "c");
        let (app, all) = (key(d.path(), "/app"), key(d.path(), "/"));
        // Touched: same keys.
        let f = std::fs::File::options()
            .write(true)
            .open(d.path().join("app/a"))
            .unwrap_or_else(|e| panic!("{e}"));
        f.set_modified(std::time::SystemTime::UNIX_EPOCH)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((app, all), (key(d.path(), "/app"), key(d.path(), "/")));
        // Something else changed: the app key stays.
        write(d.path(), "other/c", "C");
        assert_eq!(app, key(d.path(), "/app"));
        assert_ne!(all, key(d.path(), "/"));
        // The selection changed.
        write(d.path(), "app/sub/b", "B");
        assert_ne!(app, key(d.path(), "/app"));
        // A mode change counts.
        let before = key(d.path(), "/app");
        std::fs::set_permissions(d.path().join("app/a"), std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(before, key(d.path(), "/app"));
    }

    #[test]
    fn symlink_targets_count_and_missing_is_a_key() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        write(d.path(), "lib/real/x.so", "1");
        std::fs::create_dir_all(d.path().join("usr")).unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink("../lib/real", d.path().join("usr/lib")).unwrap_or_else(|e| panic!("{e}"));
        let k = key(d.path(), "/usr");
        write(d.path(), "lib/real/x.so", "2");
        assert_ne!(
            k,
            key(d.path(), "/usr"),
            "a file reached through a symlink changed"
        );
        let missing = key(d.path(), "/nope");
        write(d.path(), "nope", "now");
        assert_ne!(missing, key(d.path(), "/nope"));
    }
}
