//! Feeds arbitrary bytes to the layer applier as a tar, into an empty directory beside an
//! `outside` directory holding a canary file. Whatever the archive says, nothing outside the
//! destination may change (the canary keeps its content, mode and link count, `outside` gains
//! nothing), and `layer::check` must agree with `apply`: the layer `kiln load` accepts is one
//! that unpacks, and the one it refuses is one that would not. The first byte picks the
//! whiteout mode; the rest is the tar. Run as root, as unpacking is (device nodes, whiteouts).
#![no_main]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_cache::layer::{apply, check, ApplyError, ApplyOptions, WhiteoutMode};
use libfuzzer_sys::fuzz_target;

const CANARY: &[u8] = b"canary: never written, never linked";

/// This process's arena: `dest` is made afresh for every input, `outside` once.
fn arena() -> &'static PathBuf {
    static ARENA: OnceLock<PathBuf> = OnceLock::new();
    ARENA.get_or_init(|| {
        let base = std::env::var_os("KILN_FUZZ_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("kiln-fuzz-apply-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("outside")).unwrap();
        fs::write(base.join("outside/canary"), CANARY).unwrap();
        base
    })
}

fn assert_outside_untouched(base: &Path) {
    let names: Vec<_> = fs::read_dir(base.join("outside"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["canary"], "something was written outside the destination");
    let meta = fs::symlink_metadata(base.join("outside/canary")).unwrap();
    assert!(meta.is_file() && meta.nlink() == 1 && meta.mode() & 0o7777 == 0o644);
    assert_eq!(fs::read(base.join("outside/canary")).unwrap(), CANARY);
    let top: Vec<_> = fs::read_dir(base)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(top.len() <= 2, "new entries beside the destination: {top:?}");
}

/// Failures that come from the host rather than from the archive: `check` does not model them.
fn environmental(e: &ApplyError) -> bool {
    matches!(
        e,
        ApplyError::SetXattr { .. }
            | ApplyError::Chown { .. }
            | ApplyError::Chmod { .. }
            | ApplyError::SetTime { .. }
            | ApplyError::DeviceNotPermitted { .. }
            | ApplyError::WriteData { .. }
    )
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, tar)) = data.split_first() else {
        return;
    };
    let whiteouts = if mode & 1 == 0 {
        WhiteoutMode::Overlay
    } else {
        WhiteoutMode::Delete
    };
    let opts = ApplyOptions {
        whiteouts,
        archive_name: "fuzz.tar".into(),
        ..ApplyOptions::default()
    };
    let base = arena();
    let dest = base.join("dest");
    // What the last input applied goes first: removing it must not follow anything out either
    // (the canary is checked after this input's apply).
    let _ = fs::remove_dir_all(&dest);
    fs::create_dir(&dest).unwrap();
    let applied = apply(tar, &dest, &opts);
    assert_outside_untouched(base);
    let checked = check(tar, &opts);
    match (&applied, &checked) {
        (Ok(a), Ok(c)) => assert_eq!(a, c, "apply and check disagree on the statistics"),
        (Err(_), Err(_)) => {}
        (Err(e), Ok(_)) if environmental(e) => {}
        (a, c) => panic!("apply gave {a:?} but check gave {c:?}"),
    }
});
