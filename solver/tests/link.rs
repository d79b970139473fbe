//! COPY from the build context linking unchanged files from an earlier result
//! (`kiln_solver::fileop::link`). Run as root: owners are set.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_dag::{CopyAction, FileAction, IdSpec, Owner};

mod common;
use common::cp as copy;
use kiln_solver::context::{ContextIndex, StatCache};
use kiln_solver::fileop::link::{Donors, FileIndex, Linking};
use kiln_solver::fileop::{apply, FileOpOptions, SourceRoot};

fn write(root: &Path, rel: &str, data: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

/// One COPY of the context `ctx` into a fresh `dest`, linking from `donor` (a previous
/// result's tree and index). Returns the index of what it wrote and how many files it linked.
fn copy_with(
    ctx: &Path,
    dest: &Path,
    action: CopyAction,
    donor: Option<(&Path, &FileIndex)>,
) -> (FileIndex, usize) {
    let index = ContextIndex::scan(ctx, &[], &mut StatCache::default()).unwrap();
    copy_indexed(index, ctx, dest, action, donor)
}

/// [`copy_with`] trusting `index`, made earlier, for what the context holds.
fn copy_indexed(
    index: ContextIndex,
    ctx: &Path,
    dest: &Path,
    action: CopyAction,
    donor: Option<(&Path, &FileIndex)>,
) -> (FileIndex, usize) {
    let donors = donor.map(|(root, idx)| Donors::new(vec![root.to_path_buf()], &idx.encode()).unwrap());
    let linking = run_copy(
        Linking::new(0, Arc::new(index), dest.to_path_buf(), donors),
        ctx,
        dest,
        action,
    );
    (
        FileIndex::decode(linking.take_index().bytes()).unwrap(),
        linking.linked(),
    )
}

/// A context of three files below `dir`, copied once (`COPY . /x/`, nothing to link from):
/// the context, the result's tree and its index.
fn copied_once(dir: &Path) -> (PathBuf, PathBuf, FileIndex) {
    let ctx = dir.join("ctx");
    write(&ctx, "d/one", "1");
    write(&ctx, "d/e/two", "2");
    write(&ctx, "top", "t");
    let first = dir.join("first");
    let (index, _) = copy_with(&ctx, &first, copy(".", "/x/"), None);
    (ctx, first, index)
}

/// `COPY . /x/` of `ctx` into a fresh `dest`, linking from the earlier result `donor` (tree and
/// index) with its links put off until `make_pending`.
fn deferred_copy(ctx: &Path, dest: &Path, donor: &Path, index: &FileIndex) -> Arc<Linking> {
    let known = ContextIndex::scan(ctx, &[], &mut StatCache::default()).unwrap();
    let donors = Donors::new(vec![donor.to_path_buf()], &index.encode()).unwrap();
    let linking = Linking::new(0, Arc::new(known), dest.to_path_buf(), Some(donors)).deferring();
    run_copy(linking, ctx, dest, copy(".", "/x/"))
}

/// Applies `action` (a copy from the context `ctx`) onto a fresh `dest` with `linking`.
fn run_copy(linking: Linking, ctx: &Path, dest: &Path, action: CopyAction) -> Arc<Linking> {
    fs::create_dir_all(dest).unwrap();
    let linking = Arc::new(linking);
    let opts = FileOpOptions {
        linking: Some(linking.clone()),
        ..FileOpOptions::default()
    };
    apply(
        dest,
        &[SourceRoot::context(ctx, None)],
        &[FileAction::Copy(action)],
        &opts,
    )
    .unwrap();
    linking
}

fn ino(p: PathBuf) -> u64 {
    fs::symlink_metadata(p).unwrap().ino()
}

/// Type, mode, owner, mtime and content of every entry: what a layer would record.
fn describe(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let data = if m.is_file() {
                fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            out.push(format!(
                "{} {:o} {}:{} {} {:?}",
                p.strip_prefix(root).unwrap().display(),
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime(),
                data
            ));
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn unchanged_files_are_linked_changed_ones_written() {
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("ctx");
    write(&ctx, "a/one", "1");
    write(&ctx, "a/two", "2");
    write(&ctx, "b/three", "3");
    write(&ctx, "top", "t");

    let first = t.path().join("first");
    let (idx1, linked) = copy_with(&ctx, &first, copy(".", "/app/"), None);
    assert_eq!(linked, 0);
    let paths: Vec<&str> = idx1.0.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["app/a/one", "app/a/two", "app/b/three", "app/top"]);

    write(&ctx, "a/two", "changed");
    let second = t.path().join("second");
    let (idx2, linked) = copy_with(&ctx, &second, copy(".", "/app/"), Some((&first, &idx1)));
    assert_eq!(linked, 3);
    assert_eq!(idx2.0.len(), 4);
    for unchanged in ["app/a/one", "app/b/three", "app/top"] {
        assert_eq!(
            ino(first.join(unchanged)),
            ino(second.join(unchanged)),
            "{unchanged}"
        );
    }
    assert_ne!(ino(first.join("app/a/two")), ino(second.join("app/a/two")));
    assert_eq!(fs::read_to_string(second.join("app/a/two")).unwrap(), "changed");
    assert_eq!(
        fs::read_to_string(first.join("app/a/two")).unwrap(),
        "2",
        "the donor is untouched"
    );

    // The linked result is what a plain copy gives.
    let plain = t.path().join("plain");
    fs::create_dir_all(&plain).unwrap();
    apply(
        &plain,
        &[SourceRoot::context(&ctx, None)],
        &[FileAction::Copy(copy(".", "/app/"))],
        &FileOpOptions::default(),
    )
    .unwrap();
    assert_eq!(describe(&second), describe(&plain));
}

#[test]
fn metadata_changes_and_identical_files_are_not_shared() {
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("ctx");
    write(&ctx, "d/same1", "same");
    write(&ctx, "d/same2", "same");
    write(&ctx, "d/mode", "m");
    let t0 = fs::FileTimes::new().set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(7));
    for f in ["d/same1", "d/same2"] {
        fs::File::options()
            .write(true)
            .open(ctx.join(f))
            .unwrap()
            .set_times(t0)
            .unwrap();
    }
    let first = t.path().join("first");
    let (idx1, _) = copy_with(&ctx, &first, copy(".", "/x/"), None);

    fs::set_permissions(ctx.join("d/mode"), fs::Permissions::from_mode(0o600)).unwrap();
    let second = t.path().join("second");
    let (_, linked) = copy_with(&ctx, &second, copy(".", "/x/"), Some((&first, &idx1)));
    // same1 and same2 have one key; each donor file is handed out once, so the two names do
    // not become hard links of each other.
    assert_eq!(linked, 2);
    assert_ne!(ino(second.join("x/d/same1")), ino(second.join("x/d/same2")));
    assert_ne!(ino(first.join("x/d/mode")), ino(second.join("x/d/mode")));
    assert_eq!(
        fs::metadata(second.join("x/d/mode")).unwrap().mode() & 0o777,
        0o600
    );

    // --chown changes every key: nothing is linked.
    let chowned = t.path().join("chowned");
    let owner = Owner {
        user: IdSpec::Id(1234),
        group: Some(IdSpec::Id(1234)),
    };
    let action = CopyAction {
        owner: Some(owner),
        ..copy(".", "/x/")
    };
    let (_, linked) = copy_with(&ctx, &chowned, action, Some((&first, &idx1)));
    assert_eq!(linked, 0);
    assert_eq!(fs::metadata(chowned.join("x/d/same1")).unwrap().uid(), 1234);
}

#[test]
fn only_fresh_directories_and_validated_sources_are_linked() {
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("ctx");
    write(&ctx, "f", "f");
    write(&ctx, "sub/g", "g");
    let first = t.path().join("first");
    let (idx1, _) = copy_with(&ctx, &first, copy(".", "/x/"), None);
    assert_eq!(idx1.0.len(), 2);

    // The destination directory exists already: files directly in it are written (and not
    // recorded); files in directories the copy creates are linked.
    let second = t.path().join("second");
    fs::create_dir_all(second.join("x")).unwrap();
    let (idx2, linked) = copy_with(&ctx, &second, copy(".", "/x/"), Some((&first, &idx1)));
    assert_eq!(linked, 1);
    assert_eq!(
        idx2.0.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        ["x/sub/g"]
    );
    assert_eq!(ino(first.join("x/sub/g")), ino(second.join("x/sub/g")));

    // Sources that change after the context was indexed (the copy takes the scan's `lstat` of
    // a file, as BuildKit keys and copies the context it was sent): one the donor holds as the
    // scan saw it is kept from the donor, keyed; one written is copied as it is now, with its
    // metadata now, unkeyed (its key is the scan's content, which it no longer holds).
    write(&ctx, "sub/h", "h");
    let index = ContextIndex::scan(&ctx, &[], &mut StatCache::default()).unwrap();
    write(&ctx, "sub/g", "G");
    write(&ctx, "sub/h", "HH");
    fs::set_permissions(ctx.join("sub/h"), fs::Permissions::from_mode(0o640)).unwrap();
    let third = t.path().join("third");
    let (idx3, _) = copy_indexed(index, &ctx, &third, copy(".", "/x/"), Some((&first, &idx1)));
    assert_eq!(fs::read_to_string(third.join("x/sub/g")).unwrap(), "g");
    assert_eq!(ino(first.join("x/sub/g")), ino(third.join("x/sub/g")));
    assert_eq!(fs::read_to_string(third.join("x/sub/h")).unwrap(), "HH");
    assert_eq!(fs::metadata(third.join("x/sub/h")).unwrap().mode() & 0o777, 0o640);
    assert_eq!(
        idx3.0.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        ["x/f", "x/sub/g"]
    );
    assert_eq!(ino(first.join("x/f")), ino(third.join("x/f")));
}

#[test]
fn several_sources_are_copied_not_linked() {
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("ctx");
    write(&ctx, "a/x", "1");
    write(&ctx, "b/x", "2");
    let first = t.path().join("first");
    let (idx1, _) = copy_with(&ctx, &first, copy("a", "/d/"), None);
    assert_eq!(idx1.0.len(), 1);
    // `COPY a b /d/`-like wildcard: both write d/x, the last one wins; nothing is keyed.
    let second = t.path().join("second");
    let (idx2, linked) = copy_with(&ctx, &second, copy("[ab]", "/d/"), Some((&first, &idx1)));
    assert_eq!((idx2.0.len(), linked), (0, 0));
    assert_eq!(fs::read_to_string(second.join("d/x")).unwrap(), "2");
}

#[test]
fn deferred_links_wait_for_make_pending_and_keep_directory_times() {
    use kiln_cache::layer::{same_tree, same_tree_assuming};
    let t = tempfile::tempdir().unwrap();
    let (ctx, first, idx1) = copied_once(t.path());

    let deferred = |dest: &Path| deferred_copy(&ctx, dest, &first, &idx1);

    // Unchanged: nothing is linked yet, and the tree is the donor's once the links count.
    let second = t.path().join("second");
    let linking = deferred(&second);
    assert_eq!(linking.linked(), 3);
    assert!(!second.join("x/d/one").exists());
    let pending = linking.pending_in_place();
    assert!(pending.contains(b"x/d/e/two".as_slice()), "{pending:?}");
    assert!(!same_tree(&second, &first));
    assert!(same_tree_assuming(&second, &first, &|rel| pending.contains(rel)));
    // Made: the donor's inodes, and the directories' times as the copy set them.
    linking.make_pending().unwrap();
    assert!(same_tree(&second, &first));
    assert_eq!(ino(first.join("x/d/e/two")), ino(second.join("x/d/e/two")));
    assert_eq!(describe(&second), describe(&first));

    // A changed file: the rest is pending, the comparison fails, and the made result is what a
    // plain copy writes.
    write(&ctx, "d/one", "changed");
    let third = t.path().join("third");
    let linking = deferred(&third);
    assert_eq!(linking.linked(), 2);
    let pending = linking.pending_in_place();
    assert!(!same_tree_assuming(&third, &first, &|rel| pending.contains(rel)));
    linking.make_pending().unwrap();
    let plain = t.path().join("plain");
    copy_with(&ctx, &plain, copy(".", "/x/"), None);
    assert_eq!(describe(&third), describe(&plain));
    assert_eq!(ino(first.join("x/top")), ino(third.join("x/top")));

    // A donor file gone by the time the links are made (a store damaged under a build: GC
    // waits for builds): neither a link nor a copy of it can be made, and the error names it.
    let fourth = t.path().join("fourth");
    let linking = deferred(&fourth);
    fs::remove_file(first.join("x/top")).unwrap();
    let err = linking.make_pending().unwrap_err().to_string();
    assert!(err.contains("top"), "{err}");
}

#[test]
fn a_moved_file_is_linked_from_its_old_path_and_indexed_in_path_order() {
    let t = tempfile::tempdir().unwrap();
    let (ctx, first, idx1) = copied_once(t.path());
    // Renamed: same content and mtime, so the same key at another path.
    fs::rename(ctx.join("top"), ctx.join("d/f")).unwrap();

    let second = t.path().join("second");
    let linking = deferred_copy(&ctx, &second, &first, &idx1);
    assert_eq!((linking.linked(), linking.files()), (3, 3));
    let pending = linking.pending_in_place();
    assert!(pending.contains(b"x/d/one"));
    assert!(!pending.contains(b"x/d/f"), "moved, so not in place");
    linking.make_pending().unwrap();
    drop(pending);
    assert_eq!(ino(first.join("x/top")), ino(second.join("x/d/f")));
    assert_eq!(ino(first.join("x/d/one")), ino(second.join("x/d/one")));
    // The index merges files linked in place and elsewhere in one path order.
    let idx2 = FileIndex::decode(linking.take_index().bytes()).unwrap();
    let paths: Vec<&str> = idx2.0.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["x/d/e/two", "x/d/f", "x/d/one"]);
    let keys = |i: &FileIndex, p: &str| i.0.iter().find(|e| e.0 == p).unwrap().1;
    assert_eq!(keys(&idx2, "x/d/f"), keys(&idx1, "x/top"));
    // A second call finds the records handed over.
    assert_eq!(linking.take_index().files(), 0);
}

#[test]
fn copies_from_layers_link_files_whose_metadata_they_keep() {
    use std::os::unix::fs::MetadataExt;
    let t = tempfile::tempdir().unwrap();
    // One layer tree as the source filesystem (its own merged view).
    let layer = t.path().join("layer");
    write(&layer, "data/plain", "p");
    write(&layer, "data/sub/deep", "d");
    write(&layer, "data/pair1", "h");
    fs::hard_link(layer.join("data/pair1"), layer.join("data/pair2")).unwrap();
    write(&layer, "data/attr", "x");
    rustix::fs::setxattr(
        layer.join("data/attr"),
        "user.k",
        b"v",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    std::os::unix::fs::symlink("plain", layer.join("data/link")).unwrap();

    let run = |dest: &Path, action: CopyAction| {
        fs::create_dir_all(dest).unwrap();
        let linking =
            Arc::new(Linking::from_layers(0, std::slice::from_ref(&layer), dest.to_path_buf()).unwrap());
        let opts = FileOpOptions {
            linking: Some(linking.clone()),
            ..FileOpOptions::default()
        };
        apply(
            dest,
            &[SourceRoot::filesystem(&layer)],
            &[FileAction::Copy(action)],
            &opts,
        )
        .unwrap();
        linking.linked()
    };
    let dest = t.path().join("dest");
    assert_eq!(run(&dest, copy("/data", "/copy")), 2);
    for f in ["plain", "sub/deep"] {
        assert_eq!(
            ino(layer.join("data").join(f)),
            ino(dest.join("copy").join(f)),
            "{f}"
        );
    }
    // Written, not linked: a hard-link pair (kept a pair of its own), a file with attributes.
    let pair1 = fs::metadata(dest.join("copy/pair1")).unwrap();
    assert_ne!(pair1.ino(), ino(layer.join("data/pair1")));
    assert_eq!(pair1.ino(), ino(dest.join("copy/pair2")));
    assert_ne!(ino(dest.join("copy/attr")), ino(layer.join("data/attr")));
    assert_eq!(fs::read_link(dest.join("copy/link")).unwrap(), Path::new("plain"));

    // The linked result is what a plain copy writes (attributes aside: a copy drops them).
    let plain = t.path().join("plain");
    fs::create_dir_all(&plain).unwrap();
    apply(
        &plain,
        &[SourceRoot::filesystem(&layer)],
        &[FileAction::Copy(copy("/data", "/copy"))],
        &FileOpOptions::default(),
    )
    .unwrap();
    assert_eq!(describe(&dest), describe(&plain));

    // --chown changes the owner: nothing is linked.
    let owned = t.path().join("owned");
    let action = CopyAction {
        owner: Some(Owner {
            user: IdSpec::Id(7),
            group: Some(IdSpec::Id(7)),
        }),
        ..copy("/data", "/copy")
    };
    assert_eq!(run(&owned, action), 0);
    assert_eq!(fs::metadata(owned.join("copy/plain")).unwrap().uid(), 7);
}

#[test]
fn copies_from_stacked_layers_link_what_the_merged_view_shows() {
    use std::process::Command;
    let t = tempfile::tempdir().unwrap();
    let (top, low, merged) = (
        t.path().join("top"),
        t.path().join("low"),
        t.path().join("merged"),
    );
    write(&low, "data/f", "old");
    write(&low, "data/g", "only below");
    write(&low, "data/w", "deleted above");
    write(&top, "data/f", "new");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        top.join("data/w"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        0,
    )
    .unwrap();
    fs::create_dir_all(&merged).unwrap();
    let opts = format!("lowerdir={}:{}", top.display(), low.display());
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged)
        .status()
        .unwrap();
    assert!(st.success(), "mounting the overlay needs root");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _m = Unmount(merged.clone());

    let dest = t.path().join("dest");
    fs::create_dir_all(&dest).unwrap();
    let linking = Arc::new(Linking::from_layers(0, &[top.clone(), low.clone()], dest.clone()).unwrap());
    let opts = FileOpOptions {
        linking: Some(linking.clone()),
        ..FileOpOptions::default()
    };
    apply(
        &dest,
        &[SourceRoot::filesystem(&merged)],
        &[FileAction::Copy(copy("/data", "/copy"))],
        &opts,
    )
    .unwrap();
    assert_eq!(linking.linked(), 2);
    assert_eq!(fs::read_to_string(dest.join("copy/f")).unwrap(), "new");
    assert_eq!(ino(top.join("data/f")), ino(dest.join("copy/f")));
    assert_eq!(ino(low.join("data/g")), ino(dest.join("copy/g")));
    assert!(!dest.join("copy/w").exists(), "a whited-out file is not copied");
}
