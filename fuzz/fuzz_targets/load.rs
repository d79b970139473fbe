//! Feeds arbitrary bytes to `kiln load` (docker-archive and OCI layout tars, possibly
//! compressed) against a fresh store beside a canary directory. It must never panic; a failed
//! load must leave the store as it was (no image, no tag, no blob, no temp file); and nothing
//! outside the store may change.
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_cache::archive::load::load;
use kiln_cache::store::Store;
use libfuzzer_sys::fuzz_target;

fn arena() -> &'static PathBuf {
    static ARENA: OnceLock<PathBuf> = OnceLock::new();
    ARENA.get_or_init(|| {
        let base = std::env::var_os("KILN_FUZZ_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("kiln-fuzz-load-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("outside")).unwrap();
        fs::write(base.join("outside/canary"), b"canary").unwrap();
        base
    })
}

/// Every file under `dir`, relative, with its size.
fn files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for e in entries {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                todo.push(e.path());
            } else {
                out.push((e.path().strip_prefix(dir).unwrap().to_path_buf(), m.len()));
            }
        }
    }
    out.sort();
    out
}

fuzz_target!(|data: &[u8]| {
    let base = arena();
    let root = base.join("root");
    let _ = fs::remove_dir_all(&root);
    let store = Store::open(&root).unwrap();
    let before = files(&root);
    let result = load(&store, data, "fuzz.tar");
    if result.is_err() {
        let after: Vec<_> = files(&root)
            .into_iter()
            .filter(|(p, _)| !p.ends_with("lock") && !p.ends_with("gc.lock"))
            .collect();
        let before: Vec<_> = before
            .into_iter()
            .filter(|(p, _)| !p.ends_with("lock") && !p.ends_with("gc.lock"))
            .collect();
        assert_eq!(after, before, "a failed load changed the store: {result:?}");
    }
    let outside: Vec<_> = fs::read_dir(base.join("outside"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, ["canary"]);
    assert_eq!(fs::read(base.join("outside/canary")).unwrap(), b"canary");
});
