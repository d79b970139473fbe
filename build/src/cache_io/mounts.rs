//! Cache mounts that travel (`cache-mounts=true|ID,ID`): the contents of `RUN
//! --mount=type=cache` directories the build used, each as one content-addressed layer of the
//! cache; `--cache-from` seeds them on a runner that does not have them yet (see the engine).
//!
//! An unchanged mount is not written again: `ROOT/cache/mounts/<name>.export` remembers the
//! fingerprint of the tree (every path's type, size, mode, owner, inode and mtime) the last layer
//! was written from, with that layer's diff ID; the same fingerprint and the blob still in the
//! store reuse it, and the push then finds the compressed blob with one `HEAD`.
//!
//! Secrets never enter an export: a secret is mounted from the build's scratch space, never
//! written into a cache directory by kiln, and a file a step wrote there that holds the value of
//! one of the build's secrets (six bytes or longer) is left out, with a warning naming the path.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_cache::buildcache::Layer;
use kiln_cache::layer::{self, DiffOptions};
use kiln_cache::Store;
use kiln_dag::Digest;
use kiln_solver::engine::MountContents;
use kiln_source::registry::media;
use serde::{Deserialize, Serialize};

use super::spec::ExportOptions;

/// The export state of one mount.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct State {
    fingerprint: String,
    diff_id: Digest,
    size: u64,
}

/// A mount's tree: its fingerprint, total file bytes, and its regular files.
struct Scan {
    fingerprint: String,
    bytes: u64,
    files: Vec<(String, PathBuf)>,
}

fn scan(dir: &Path) -> std::io::Result<Scan> {
    let mut h = blake3::Hasher::new();
    let mut bytes = 0;
    let mut files = Vec::new();
    let mut todo = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = todo.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&d)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names {
            let path = d.join(&name);
            let m = std::fs::symlink_metadata(&path)?;
            let child = if rel.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", name.to_string_lossy())
            };
            h.update(child.as_bytes());
            for v in [
                m.mode() as u64,
                m.uid() as u64,
                m.gid() as u64,
                m.len(),
                m.ino(),
                m.mtime() as u64,
                m.mtime_nsec() as u64,
            ] {
                h.update(&v.to_le_bytes());
            }
            if m.is_dir() {
                todo.push((path, child));
            } else if m.is_file() {
                bytes += m.len();
                files.push((child, path));
            }
        }
    }
    Ok(Scan {
        fingerprint: h.finalize().to_hex().to_string(),
        bytes,
        files,
    })
}

/// Whether the file at `path` contains any of `secrets`.
fn holds_secret(path: &Path, secrets: &[&[u8]]) -> bool {
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let longest = secrets.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut buf = vec![0u8; 1 << 20];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        carry.extend_from_slice(&buf[..n]);
        if secrets.iter().any(|s| memchr::memmem::find(&carry, s).is_some()) {
            return true;
        }
        let keep = longest.saturating_sub(1).min(carry.len());
        carry.drain(..carry.len() - keep);
    }
}

/// The layers of the mounts `opts` asks for, written (or reused) from their directories.
/// Problems with one mount are warnings: the cache goes without it.
pub(crate) fn layers(
    store: &Store,
    mounts: &std::collections::BTreeMap<String, MountContents>,
    opts: &ExportOptions,
    secrets: &[&[u8]],
    warn: &dyn Fn(String),
) -> Vec<(String, Layer)> {
    let mut out = Vec::new();
    for (id, contents) in mounts {
        if !opts.mounts.wants(id) {
            continue;
        }
        let dir = match contents {
            MountContents::Dir(d) => d,
            // Not used here, only carried over from the imported cache.
            MountContents::Imported(l) => {
                out.push((id.clone(), l.clone()));
                continue;
            }
        };
        match one(store, id, dir, opts, secrets, warn) {
            Ok(Some(l)) => out.push((id.clone(), l)),
            Ok(None) => {}
            Err(e) => warn(format!("cache mount `{id}` is not exported: {e}")),
        }
    }
    out
}

fn one(
    store: &Store,
    id: &str,
    dir: &Path,
    opts: &ExportOptions,
    secrets: &[&[u8]],
    warn: &dyn Fn(String),
) -> Result<Option<Layer>, Box<dyn std::error::Error + Send + Sync>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    // Held shared: a `sharing=locked` user holds it exclusively while it writes.
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.with_extension("lock"))?;
    lock.lock_shared()?;
    let scanned = scan(dir)?;
    if let Some(max) = opts.mounts_max_size {
        if scanned.bytes > max {
            warn(format!(
                "cache mount `{id}` is not exported: it holds {} bytes, more than cache-mounts-max-size ({max})",
                scanned.bytes
            ));
            return Ok(None);
        }
    }
    let state_path = dir.with_extension("export");
    let content = store.content();
    let layer = |diff_id: Digest, size: u64| Layer {
        snapshot: diff_id,
        blob: diff_id,
        diff_id,
        size,
        media_type: media::OCI_LAYER.to_string(),
        created: None,
    };
    if let Some(s) = std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<State>(&b).ok())
    {
        if s.fingerprint == scanned.fingerprint && content.contains(&s.diff_id) {
            return Ok(Some(layer(s.diff_id, s.size)));
        }
    }
    let mut exclude = Vec::new();
    let secrets: Vec<&[u8]> = secrets.iter().copied().filter(|s| s.len() >= 6).collect();
    if !secrets.is_empty() {
        for (rel, path) in &scanned.files {
            if holds_secret(path, &secrets) {
                warn(format!(
                    "cache mount `{id}`: `{rel}` holds the value of a build secret and is left out of the export"
                ));
                exclude.push(PathBuf::from(rel));
            }
        }
    }
    let mut writer = content.prehashed_writer()?;
    let stats = layer::write_tree(
        dir,
        &mut writer,
        &DiffOptions {
            exclude,
            ..DiffOptions::default()
        },
    )?;
    let staged = writer.finish_unsynced(Some(&stats.diff_id))?.sync()?;
    let size = staged.size();
    staged.commit()?;
    let state = State {
        fingerprint: scanned.fingerprint,
        diff_id: stats.diff_id,
        size,
    };
    // Best effort: the state only saves the next export a pass over the mount.
    let _ = kiln_cache::paths::write_atomic(
        &state_path,
        &serde_json::to_vec(&state).unwrap_or_default(),
        false,
    );
    Ok(Some(layer(stats.diff_id, size)))
}
