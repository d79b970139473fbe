//! Tests of layer tars: round trips, overlay diffs on a real mount, determinism, hardlinks,
//! special files, hostile archives, and timings. Tests that mount need root and say so.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kiln_dag::Digest;
use rustix::fs::{self as rfs, AtFlags, FileType, Gid, Mode, Timespec, Timestamps, Uid, XattrFlags, CWD};

use super::tarfmt::{self, Kind, Spec};
use super::*;
use crate::recipe::{BlobSource, Recipe};

fn is_root() -> bool {
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    content: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    rdev: u64,
    mtime: Option<i64>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn xattrs_of(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    let n = rfs::llistxattr(path, &mut names[..]).unwrap();
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 4096];
        let len = rfs::lgetxattr(path, name, &mut value[..]).unwrap();
        value.truncate(len);
        out.push((name.to_vec(), value));
    }
    out.sort();
    out
}

/// Every path below `root` (not `root` itself) with its type, metadata, content and xattrs.
fn dump(root: &Path, mtimes: bool) -> BTreeMap<Vec<u8>, Node> {
    fn walk(root: &Path, dir: &Path, mtimes: bool, out: &mut BTreeMap<Vec<u8>, Node>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let ft = FileType::from_raw_mode(meta.mode());
            let kind = match ft {
                FileType::RegularFile => 'f',
                FileType::Directory => 'd',
                FileType::Symlink => 'l',
                FileType::CharacterDevice => 'c',
                FileType::BlockDevice => 'b',
                FileType::Fifo => 'p',
                _ => '?',
            };
            let rel = path.strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec();
            out.insert(
                rel,
                Node {
                    kind,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    size: if kind == 'f' { meta.len() } else { 0 },
                    content: (kind == 'f').then(|| fs::read(&path).unwrap()),
                    link: (kind == 'l')
                        .then(|| fs::read_link(&path).unwrap().as_os_str().as_bytes().to_vec()),
                    rdev: meta.rdev(),
                    mtime: (mtimes && kind != 'l').then(|| meta.mtime()),
                    xattrs: xattrs_of(&path),
                },
            );
            if kind == 'd' {
                walk(root, &path, mtimes, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, mtimes, &mut out);
    out
}

fn set_mtime(path: &Path, secs: i64) {
    let t = Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    rfs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn chown(path: &Path, uid: u32, gid: u32) {
    rfs::chownat(
        CWD,
        path,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn file(path: &Path, content: &[u8], mode: u32) {
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mkdir(path: &Path, mode: u32) {
    fs::create_dir_all(path).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with every kind of entry and attribute a layer carries.
fn sample_tree(dir: &Path) {
    mkdir(&dir.join("bin"), 0o755);
    file(&dir.join("bin/sh"), b"#!/bin/busybox\n", 0o4755);
    mkdir(&dir.join("etc"), 0o755);
    file(&dir.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n", 0o644);
    mkdir(&dir.join("home/user"), 0o700);
    chown(&dir.join("home/user"), 1000, 1000);
    file(&dir.join("home/user/.profile"), b"export A=1\n", 0o600);
    chown(&dir.join("home/user/.profile"), 1000, 1000);
    mkdir(&dir.join("tmp"), 0o1777);
    mkdir(&dir.join("srv/setgid"), 0o2775);
    chown(&dir.join("srv/setgid"), 0, 50);
    let long_dir = dir.join("usr/lib").join("d".repeat(60)).join("e".repeat(60));
    mkdir(&long_dir, 0o755);
    file(&long_dir.join("f".repeat(80)), b"long path", 0o644);
    std::os::unix::fs::symlink("/bin/busybox", dir.join("bin/ls")).unwrap();
    std::os::unix::fs::symlink("../etc/passwd", dir.join("bin/passwd-link")).unwrap();
    std::os::unix::fs::symlink("t".repeat(200), dir.join("long-target")).unwrap();
    file(&dir.join("hard1"), b"shared inode", 0o640);
    fs::hard_link(dir.join("hard1"), dir.join("etc/hard2")).unwrap();
    mkdir(&dir.join("dev"), 0o755);
    rfs::mknodat(
        CWD,
        dir.join("dev/null"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o666),
        rfs::makedev(1, 3),
    )
    .unwrap();
    rfs::mknodat(
        CWD,
        dir.join("dev/loop0"),
        FileType::BlockDevice,
        Mode::from_raw_mode(0o660),
        rfs::makedev(7, 0),
    )
    .unwrap();
    chown(&dir.join("dev/loop0"), 0, 6);
    rfs::mknodat(
        CWD,
        dir.join("fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    fs::set_permissions(dir.join("fifo"), fs::Permissions::from_mode(0o620)).unwrap();
    file(&dir.join("ping"), b"\x7fELF", 0o755);
    // cap_net_raw (bit 13), VFS_CAP_REVISION_2 with the effective flag.
    let cap = [1u8, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    rfs::lsetxattr(dir.join("ping"), "security.capability", &cap, XattrFlags::empty()).unwrap();
    file(&dir.join("attrs"), b"x", 0o644);
    rfs::lsetxattr(
        dir.join("attrs"),
        "user.kiln",
        b"v\x00\xffbinary",
        XattrFlags::empty(),
    )
    .unwrap();
    rfs::lsetxattr(dir.join("attrs"), "user.empty", b"", XattrFlags::empty()).unwrap();
    rfs::lsetxattr(dir.join("etc"), "user.dir", b"yes", XattrFlags::empty()).unwrap();
    file(
        &dir.join("big"),
        &(0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
        0o644,
    );
    file(&dir.join("empty"), b"", 0o444);
    file(&dir.join(OsStr::from_bytes(b"caf\xe9")), b"latin-1 name", 0o644);
    set_all_mtimes(dir, 1_600_000_000);
}

/// Gives every path below `dir` a distinct fixed mtime, children before their dirs.
fn set_all_mtimes(dir: &Path, base: i64) {
    let paths: Vec<Vec<u8>> = dump(dir, false).into_keys().collect();
    for (i, rel) in paths.iter().enumerate().rev() {
        set_mtime(&dir.join(OsStr::from_bytes(rel)), base + i as i64 * 7);
    }
}

fn tar_of(dir: &Path, opts: &DiffOptions) -> (Vec<u8>, LayerStats) {
    let mut out = Vec::new();
    let stats = write_tree(dir, &mut out, opts).unwrap();
    (out, stats)
}

fn delete_opts(name: &str) -> ApplyOptions {
    ApplyOptions {
        whiteouts: WhiteoutMode::Delete,
        archive_name: name.into(),
        ..ApplyOptions::default()
    }
}

/// (name, typeflag, link) of every entry, as the `tar` crate reads them.
fn listing(tar: &[u8]) -> Vec<(String, char, String)> {
    let mut archive = tar::Archive::new(tar);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let link = e
                .link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned())
                .unwrap_or_default();
            (
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                char::from(e.header().entry_type().as_byte()),
                link,
            )
        })
        .collect()
}

#[test]
fn round_trip_keeps_everything_and_is_reproducible() {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path());
    let (tar1, stats) = tar_of(src.path(), &DiffOptions::default());
    assert_eq!(stats.diff_id, Digest::of(&tar1));
    assert_eq!(stats.size, tar1.len() as u64);

    let dst = tempfile::tempdir().unwrap();
    let applied = apply(&tar1[..], dst.path(), &delete_opts("round-trip.tar")).unwrap();
    assert_eq!(applied.diff_id, stats.diff_id);
    assert_eq!(applied.entries, stats.entries);
    let (want, got) = (dump(src.path(), true), dump(dst.path(), true));
    for (path, node) in &want {
        assert_eq!(got.get(path), Some(node), "{}", String::from_utf8_lossy(path));
    }
    assert_eq!(want.len(), got.len());
    let (h1, h2) = (
        fs::metadata(dst.path().join("hard1")).unwrap(),
        fs::metadata(dst.path().join("etc/hard2")).unwrap(),
    );
    assert_eq!((h1.ino(), h1.nlink()), (h2.ino(), 2));

    // Writing the copy gives the same bytes: the format depends on nothing but the tree.
    let (tar2, stats2) = tar_of(dst.path(), &DiffOptions::default());
    assert!(tar1 == tar2, "re-archived tree differs");
    assert_eq!(stats.diff_id, stats2.diff_id);

    // Another tar reader agrees on names, types and links.
    let entries = listing(&tar1);
    let find = |name: &str| {
        entries
            .iter()
            .find(|e| e.0 == name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .clone()
    };
    assert_eq!(find("bin/").1, '5');
    assert_eq!(find("bin/ls"), ("bin/ls".into(), '2', "/bin/busybox".into()));
    // Walk order puts etc/hard2 first: it carries the data, hard1 links to it.
    assert_eq!(find("etc/hard2").1, '0');
    assert_eq!(find("hard1"), ("hard1".into(), '1', "etc/hard2".into()));
    assert_eq!(find("long-target").2, "t".repeat(200));
    assert_eq!(find("dev/null").1, '3');
    assert_eq!(find("dev/loop0").1, '4');
    assert_eq!(find("fifo").1, '6');
    let long = format!("usr/lib/{}/{}/{}", "d".repeat(60), "e".repeat(60), "f".repeat(80));
    assert_eq!(find(&long).1, '0');
    // Depth first, children sorted by name, each dir before its contents.
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(
        pos("big") < pos("bin/") && pos("bin/") < pos("bin/ls") && pos("bin/ls") < pos("bin/passwd-link")
    );
    assert!(names[0] == "attrs" && pos("etc/") < pos("etc/hard2") && pos("etc/passwd") < pos("fifo"));
}

#[test]
fn equal_trees_give_identical_tars_and_epoch_clamps() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [a.path(), b.path()] {
        mkdir(&d.join("x/y"), 0o755);
        file(&d.join("x/y/z"), b"z", 0o644);
        file(&d.join("x/old"), b"o", 0o644);
    }
    set_all_mtimes(a.path(), 2_000_000_000);
    set_all_mtimes(b.path(), 2_000_000_000);
    set_mtime(&a.path().join("x/old"), 1000);
    set_mtime(&b.path().join("x/old"), 1000);
    assert_eq!(
        tar_of(a.path(), &DiffOptions::default()).0,
        tar_of(b.path(), &DiffOptions::default()).0
    );

    // Different mtimes differ, until SOURCE_DATE_EPOCH clamps them.
    set_all_mtimes(b.path(), 2_100_000_000);
    set_mtime(&b.path().join("x/old"), 1000);
    assert_ne!(
        tar_of(a.path(), &DiffOptions::default()).0,
        tar_of(b.path(), &DiffOptions::default()).0
    );
    let opts = DiffOptions {
        source_date_epoch: Some(1_700_000_000),
        ..Default::default()
    };
    let (ta, tb) = (tar_of(a.path(), &opts).0, tar_of(b.path(), &opts).0);
    assert_eq!(ta, tb);
    let mut archive = tar::Archive::new(&ta[..]);
    let mtimes: Vec<(String, u64)> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                e.header().mtime().unwrap(),
            )
        })
        .collect();
    for (name, mtime) in mtimes {
        assert_eq!(
            mtime,
            if name == "x/old" { 1000 } else { 1_700_000_000 },
            "{name}"
        );
    }
}

#[test]
fn exclude_leaves_out_subtrees() {
    let d = tempfile::tempdir().unwrap();
    mkdir(&d.path().join("proc/1"), 0o755);
    mkdir(&d.path().join("etc"), 0o755);
    file(&d.path().join("etc/hosts"), b"h", 0o644);
    file(&d.path().join("etc/resolv.conf"), b"r", 0o644);
    let opts = DiffOptions {
        source_date_epoch: None,
        exclude: vec!["/proc".into(), "./etc/resolv.conf".into()],
        ..Default::default()
    };
    let names: Vec<String> = listing(&tar_of(d.path(), &opts).0)
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(names, vec!["etc/", "etc/hosts"]);
}

#[test]
fn synthetic_upper_dir_whiteouts() {
    let upper = tempfile::tempdir().unwrap();
    let u = upper.path();
    mkdir(&u.join("opaque"), 0o755);
    rfs::lsetxattr(
        u.join("opaque"),
        "trusted.overlay.opaque",
        b"y",
        XattrFlags::empty(),
    )
    .unwrap();
    rfs::lsetxattr(u.join("opaque"), "user.keep", b"1", XattrFlags::empty()).unwrap();
    file(&u.join("opaque/-first"), b"a", 0o644);
    mkdir(&u.join("rootless"), 0o755);
    rfs::lsetxattr(
        u.join("rootless"),
        "user.overlay.opaque",
        b"y",
        XattrFlags::empty(),
    )
    .unwrap();
    mkdir(&u.join("notopaque"), 0o755);
    rfs::lsetxattr(
        u.join("notopaque"),
        "trusted.overlay.opaque",
        b"x",
        XattrFlags::empty(),
    )
    .unwrap();
    // The kernel hard-links whiteouts: a link count of 2 must not make a tar hardlink.
    rfs::mknodat(
        CWD,
        u.join("gone"),
        FileType::CharacterDevice,
        Mode::empty(),
        rfs::makedev(0, 0),
    )
    .unwrap();
    fs::hard_link(u.join("gone"), u.join("opaque/gone-too")).unwrap();
    let mut tar = Vec::new();
    let stats = write_diff(u, &mut tar, &DiffOptions::default()).unwrap();
    let entries = listing(&tar);
    let got: Vec<(&str, char)> = entries.iter().map(|e| (e.0.as_str(), e.1)).collect();
    assert_eq!(
        got,
        vec![
            (".wh.gone", '0'),
            ("notopaque/", '5'),
            ("opaque/", '5'),
            ("opaque/.wh..wh..opq", '0'),
            ("opaque/-first", '0'),
            ("opaque/.wh.gone-too", '0'),
            ("rootless/", '5'),
            ("rootless/.wh..wh..opq", '0'),
        ]
    );
    assert_eq!(stats.entries, 8);
    // No overlay xattr travels; others do.
    let mut archive = tar::Archive::new(&tar[..]);
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let keys: Vec<String> = match e.pax_extensions().unwrap() {
            Some(exts) => exts.map(|x| x.unwrap().key().unwrap().to_string()).collect(),
            None => vec![],
        };
        assert!(keys.iter().all(|k| !k.contains("overlay")), "{name}: {keys:?}");
        if name == "opaque/" {
            assert_eq!(keys, vec!["SCHILY.xattr.user.keep"]);
        }
    }
    // write_tree does not interpret: the device stays a device.
    let plain = listing(&tar_of(u, &DiffOptions::default()).0);
    assert!(plain.contains(&("gone".into(), '3', String::new())));
    // Overlay features whose data is elsewhere are refused.
    rfs::lsetxattr(
        u.join("opaque/-first"),
        "trusted.overlay.metacopy",
        b"",
        XattrFlags::empty(),
    )
    .unwrap();
    let err = write_diff(u, Vec::new(), &DiffOptions::default()).unwrap_err();
    assert!(matches!(err, WriteError::UnsupportedOverlay { .. }), "{err}");
    assert!(err.to_string().contains("opaque/-first"), "{err}");
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_overlay(lowers: &[&Path], upper: &Path, work: &Path, merged: &Path) -> Mount {
    let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(merged)
        .status()
        .unwrap();
    assert!(status.success(), "mount -t overlay failed");
    Mount(merged.to_path_buf())
}

fn mount_overlay_ro(lowers: &[&Path], merged: &Path) -> Mount {
    let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let opts = format!("lowerdir={}", lower.join(":"));
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(merged)
        .status()
        .unwrap();
    assert!(status.success(), "mount -t overlay (read-only) failed");
    Mount(merged.to_path_buf())
}

/// Needs root: mounts a real overlay, changes files in it, diffs the upper dir, and checks that
/// lower + diff gives the merged view, in both whiteout modes.
#[test]
fn real_overlay_diff_matches_merged_view() {
    if !is_root() {
        eprintln!("skipped: needs root to mount overlayfs");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| {
        let path = t.path().join(n);
        fs::create_dir_all(&path).unwrap();
        path
    };
    let (lower, upper, work, merged) = (p("lower"), p("upper"), p("work"), p("merged"));
    let base = p("base-src");
    sample_tree(&base);
    mkdir(&base.join("var/cache/apt"), 0o755);
    file(&base.join("var/cache/apt/pkgcache.bin"), b"cache", 0o644);
    file(&base.join("var/cache/apt/srcpkgcache.bin"), b"cache", 0o644);
    mkdir(&base.join("opt/app/sub"), 0o755);
    file(&base.join("opt/app/sub/old"), b"old", 0o644);
    let (base_tar, _) = tar_of(&base, &DiffOptions::default());
    apply(&base_tar[..], &lower, &delete_opts("base.tar")).unwrap();

    let view = {
        let _m = mount_overlay(&[&lower], &upper, &work, &merged);
        let m = &merged;
        file(&m.join("new-file"), b"new", 0o600);
        fs::write(m.join("etc/passwd"), b"root:x:0:0::/root:/bin/ash\n").unwrap();
        fs::remove_file(m.join("big")).unwrap();
        fs::remove_file(m.join("bin/ls")).unwrap();
        fs::remove_dir_all(m.join("var/cache/apt")).unwrap();
        fs::remove_dir_all(m.join("opt/app")).unwrap();
        mkdir(&m.join("opt/app"), 0o750);
        file(&m.join("opt/app/fresh"), b"fresh", 0o644);
        fs::set_permissions(m.join("bin/sh"), fs::Permissions::from_mode(0o755)).unwrap();
        chown(&m.join("empty"), 5, 5);
        std::os::unix::fs::symlink("new-file", m.join("to-new")).unwrap();
        fs::rename(m.join("attrs"), m.join("attrs-renamed")).unwrap();
        dump(m, true)
    };

    let mut diff = Vec::new();
    let stats = write_diff(&upper, &mut diff, &DiffOptions::default()).unwrap();
    let entries = listing(&diff);
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    for want in [
        ".wh.attrs",
        ".wh.big",
        "bin/.wh.ls",
        "var/cache/.wh.apt",
        "opt/app/",
        "opt/app/.wh..wh..opq",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert_eq!(pos("opt/app/.wh..wh..opq"), pos("opt/app/") + 1);
    assert!(
        !names.iter().any(|n| n.starts_with("home")),
        "untouched dirs must not be in the diff"
    );

    // Delete mode: a full copy of the lower tree plus the diff is the merged view.
    let full = p("full");
    apply(&base_tar[..], &full, &delete_opts("base.tar")).unwrap();
    let applied = apply(&diff[..], &full, &delete_opts("diff.tar")).unwrap();
    assert_eq!(applied.diff_id, stats.diff_id);
    assert_eq!(dump(&full, true), view);

    // Overlay mode: the diff as a new lower dir over the old one, mounted, is the merged view.
    let snap = p("snap");
    let overlay_opts = ApplyOptions {
        whiteouts: WhiteoutMode::Overlay,
        ..delete_opts("diff.tar")
    };
    apply(&diff[..], &snap, &overlay_opts).unwrap();
    let ro = p("ro");
    let _m = mount_overlay_ro(&[&snap, &lower], &ro);
    assert_eq!(dump(&ro, true), view);
}

/// Builds a tar from specs (PAX headers included as kiln writes them) plus regular-file data.
fn craft(entries: &[(Spec<'_>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (spec, data) in entries {
        tarfmt::encode(spec, &mut out);
        out.extend_from_slice(data);
        out.resize(out.len() + tarfmt::padding(data.len() as u64), 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn spec<'a>(path: &'a str, kind: Kind, link: &'a str, size: u64) -> Spec<'a> {
    Spec {
        path: path.as_bytes(),
        link: link.as_bytes(),
        kind,
        mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        size,
        mtime: 1_600_000_000,
        dev_major: 0,
        dev_minor: 0,
        xattrs: &[],
    }
}

/// A dest dir next to an `outside` dir holding a sentinel file.
struct Arena {
    _t: tempfile::TempDir,
    dest: PathBuf,
    outside: PathBuf,
}

impl Arena {
    fn new() -> Arena {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("dest");
        let outside = t.path().join("outside");
        fs::create_dir(&dest).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("sentinel"), b"untouched").unwrap();
        Arena { _t: t, dest, outside }
    }

    fn assert_outside_untouched(&self) {
        let names: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("sentinel")]);
        assert_eq!(fs::read(self.outside.join("sentinel")).unwrap(), b"untouched");
        let meta = fs::metadata(self.outside.join("sentinel")).unwrap();
        assert_eq!((meta.nlink(), meta.mode() & 0o7777), (1, 0o644));
    }

    /// Applies `tar` to `dest`; when `dest` was empty, also asserts that `check` agrees.
    fn apply(&self, tar: &[u8], mode: WhiteoutMode) -> Result<ApplyStats, ApplyError> {
        let opts = ApplyOptions {
            whiteouts: mode,
            ..delete_opts("hostile.tar")
        };
        let empty = fs::read_dir(&self.dest).unwrap().next().is_none();
        let result = apply(tar, &self.dest, &opts);
        self.assert_outside_untouched();
        if empty && is_root() {
            assert_same_verdict(&result, &check(tar, &opts));
        }
        result
    }
}

/// Whether `check` said what `apply` (into an empty dir, as root) did: both succeeded with the
/// same statistics, or both failed with the same message.
fn assert_same_verdict(applied: &Result<ApplyStats, ApplyError>, checked: &Result<ApplyStats, ApplyError>) {
    match (applied, checked) {
        (Ok(a), Ok(c)) => assert_eq!(a, c),
        (Err(a), Err(c)) => assert_eq!(a.to_string(), c.to_string()),
        (a, c) => panic!("apply gave {a:?} but check gave {c:?}"),
    }
}

fn expect_err(result: Result<ApplyStats, ApplyError>, entry: &str) -> ApplyError {
    let err = result.expect_err("hostile archive was accepted");
    let msg = err.to_string();
    assert!(
        msg.contains("hostile.tar") && msg.contains(entry),
        "message lacks archive or `{entry}`: {msg}"
    );
    err
}

#[test]
fn hostile_dot_dot_and_absolute_names() {
    let a = Arena::new();
    let tar = craft(&[(spec("../outside/sentinel", Kind::Regular, "", 3), b"bad")]);
    assert!(matches!(
        expect_err(a.apply(&tar, WhiteoutMode::Delete), "../outside/sentinel"),
        ApplyError::DotDot { .. }
    ));
    let tar = craft(&[(spec("ok/../../outside/x", Kind::Regular, "", 0), b"")]);
    assert!(matches!(
        expect_err(a.apply(&tar, WhiteoutMode::Delete), "ok/../../outside/x"),
        ApplyError::DotDot { .. }
    ));
    // An absolute name lands inside, its leading `/` dropped as Docker drops it; `..` at the
    // root of an absolute name stays at the root.
    let abs = format!("{}/sentinel", a.outside.display());
    let up = format!("/../..{}/up", a.outside.display());
    let tar = craft(&[
        (spec(&abs, Kind::Regular, "", 3), b"abs"),
        (spec(&up, Kind::Regular, "", 2), b"up"),
        (spec("in/../side", Kind::Regular, "", 4), b"side"),
    ]);
    a.apply(&tar, WhiteoutMode::Delete).unwrap();
    let inside = a.dest.join(a.outside.strip_prefix("/").unwrap());
    assert_eq!(fs::read(inside.join("sentinel")).unwrap(), b"abs");
    assert_eq!(fs::read(inside.join("up")).unwrap(), b"up");
    assert_eq!(fs::read(a.dest.join("side")).unwrap(), b"side");
    // Long (PAX) names are checked the same way.
    let long = format!("{}/../../outside/y", "a".repeat(120));
    let tar = craft(&[(spec(&long, Kind::Dir, "", 0), b"")]);
    assert!(matches!(
        expect_err(a.apply(&tar, WhiteoutMode::Delete), "../outside/y"),
        ApplyError::DotDot { .. }
    ));
}

#[test]
fn hostile_symlink_parents_are_never_followed() {
    let outside = |a: &Arena| a.outside.display().to_string();
    for (target, mode) in [
        ("ABS", WhiteoutMode::Delete),
        ("../outside", WhiteoutMode::Overlay),
        ("..", WhiteoutMode::Delete),
    ] {
        let a = Arena::new();
        let target = if target == "ABS" {
            outside(&a)
        } else {
            target.to_string()
        };
        // Symlink, then a file, a dir, a whiteout and an opaque marker through it.
        let cases: [(Spec<'_>, &[u8]); 4] = [
            (spec("evil/sentinel", Kind::Regular, "", 3), b"bad"),
            (spec("evil/newdir", Kind::Dir, "", 0), b""),
            (spec("evil/.wh.sentinel", Kind::Regular, "", 0), b""),
            (spec("evil/.wh..wh..opq", Kind::Regular, "", 0), b""),
        ];
        for case in cases {
            let name = String::from_utf8_lossy(case.0.path).into_owned();
            let tar = craft(&[(spec("evil", Kind::Symlink, &target, 0), b""), case]);
            let err = expect_err(a.apply(&tar, mode), &name);
            assert!(matches!(err, ApplyError::CrossesSymlink { .. }), "{err}");
        }
        // A symlink is created verbatim, and a later entry replaces it instead of writing through it.
        let tar = craft(&[
            (spec("evil", Kind::Symlink, &target, 0), b""),
            (spec("evil", Kind::Regular, "", 4), b"safe"),
        ]);
        a.apply(&tar, mode).unwrap();
        assert_eq!(fs::read(a.dest.join("evil")).unwrap(), b"safe");
    }
    // An absolute target pointing into the image is fine as a symlink.
    let a = Arena::new();
    let tar = craft(&[(spec("bin/ls", Kind::Symlink, "/bin/busybox", 0), b"")]);
    a.apply(&tar, WhiteoutMode::Delete).unwrap();
    assert_eq!(
        fs::read_link(a.dest.join("bin/ls")).unwrap(),
        Path::new("/bin/busybox")
    );
}

#[test]
fn hostile_hardlinks() {
    let a = Arena::new();
    let outside_abs = format!("{}/sentinel", a.outside.display());
    for (target, escapes) in [
        ("../outside/sentinel", true),
        // Absolute: a path of the image, where there is no such file.
        (outside_abs.as_str(), false),
        ("missing", false),
        ("lnk/sentinel", true),
    ] {
        let tar = craft(&[
            (
                spec("lnk", Kind::Symlink, &a.outside.display().to_string(), 0),
                b"",
            ),
            (spec("h", Kind::Hardlink, target, 0), b""),
        ]);
        let err = expect_err(a.apply(&tar, WhiteoutMode::Delete), "h");
        match err {
            ApplyError::LinkEscapes { .. } if escapes => {}
            ApplyError::LinkTargetMissing { .. } if !escapes => {}
            other => panic!("{target}: unexpected {other}"),
        }
    }
    // Hardlinks inside the archive work, with `./` prefixes too.
    let tar = craft(&[
        (spec("./d/f", Kind::Regular, "", 2), b"hi"),
        (spec("./g", Kind::Hardlink, "./d/f", 0), b""),
    ]);
    a.apply(&tar, WhiteoutMode::Delete).unwrap();
    let (f, g) = (
        fs::metadata(a.dest.join("d/f")).unwrap(),
        fs::metadata(a.dest.join("g")).unwrap(),
    );
    assert_eq!((f.ino(), f.nlink()), (g.ino(), 2));
}

#[test]
fn hostile_headers() {
    let a = Arena::new();
    // A PAX header claiming 2 MiB.
    let mut tar = Vec::new();
    let mut pax = spec("././@PaxHeader", Kind::Regular, "", 2 << 20);
    pax.mode = 0o644;
    tarfmt::encode(&pax, &mut tar);
    tar[156] = b'x';
    fix_checksum(&mut tar[..512]);
    tar.extend_from_slice(&[b'9'; 4096]);
    let err = expect_err(a.apply(&tar, WhiteoutMode::Delete), "@PaxHeader");
    assert!(matches!(err, ApplyError::HeaderTooLarge { .. }), "{err}");
    // The same as a GNU long name.
    tar[156] = b'L';
    fix_checksum(&mut tar[..512]);
    assert!(matches!(
        a.apply(&tar, WhiteoutMode::Delete),
        Err(ApplyError::HeaderTooLarge { .. })
    ));
    // A corrupt checksum.
    let mut tar = craft(&[(spec("file", Kind::Regular, "", 1), b"x")]);
    tar[0] = b'g';
    assert!(matches!(
        expect_err(a.apply(&tar, WhiteoutMode::Delete), "gile"),
        ApplyError::BadChecksum { .. }
    ));
    // Truncated data.
    let tar = craft(&[(spec("file", Kind::Regular, "", 100_000), b"x")]);
    let tar = &tar[..1024];
    assert!(matches!(
        expect_err(a.apply(tar, WhiteoutMode::Delete), "file"),
        ApplyError::UnexpectedEof { .. }
    ));
    // A bare `.wh.`.
    let tar = craft(&[(spec("d/.wh.", Kind::Regular, "", 0), b"")]);
    assert!(matches!(
        expect_err(a.apply(&tar, WhiteoutMode::Delete), "d/.wh."),
        ApplyError::InvalidWhiteout { .. }
    ));
    // Sparse files and unknown types.
    let mut tar = craft(&[(spec("sparse", Kind::Regular, "", 0), b"")]);
    tar[156] = b'S';
    fix_checksum(&mut tar[..512]);
    assert!(matches!(
        expect_err(a.apply(&tar, WhiteoutMode::Delete), "sparse"),
        ApplyError::UnsupportedType { .. }
    ));
    // An archive cannot set overlay xattrs.
    let xattrs = vec![(b"trusted.overlay.redirect".to_vec(), b"/etc".to_vec())];
    let mut d = spec("dir", Kind::Dir, "", 0);
    d.xattrs = &xattrs;
    a.apply(&craft(&[(d, b"")]), WhiteoutMode::Overlay).unwrap();
    assert!(xattrs_of(&a.dest.join("dir")).is_empty());
}

fn fix_checksum(block: &mut [u8]) {
    block[148..156].copy_from_slice(b"        ");
    let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
    block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

#[test]
fn whiteouts_in_both_modes() {
    let a = Arena::new();
    let d = &a.dest;
    mkdir(&d.join("keep"), 0o755);
    file(&d.join("keep/a"), b"a", 0o644);
    mkdir(&d.join("op/old/deep"), 0o755);
    file(&d.join("op/old-file"), b"o", 0o644);
    file(&d.join("gone"), b"g", 0o644);
    mkdir(&d.join("gone-dir/x"), 0o755);
    let tar = craft(&[
        (spec(".wh.gone", Kind::Regular, "", 0), b""),
        (spec(".wh.gone-dir", Kind::Regular, "", 0), b""),
        (spec(".wh.never-existed", Kind::Regular, "", 0), b""),
        (spec("nope/.wh.x", Kind::Regular, "", 0), b""),
        (spec("op/", Kind::Dir, "", 0), b""),
        (spec("op/new", Kind::Regular, "", 1), b"n"),
        (spec("op/.wh..wh..opq", Kind::Regular, "", 0), b""),
        (spec("same/", Kind::Dir, "", 0), b""),
        (spec("same/f", Kind::Regular, "", 1), b"f"),
        (spec("same/.wh.f", Kind::Regular, "", 0), b""),
    ]);
    let stats = a.apply(&tar, WhiteoutMode::Delete).unwrap();
    assert_eq!(stats.entries, 10);
    let names: Vec<Vec<u8>> = dump(d, false).into_keys().collect();
    let names: Vec<&str> = names.iter().map(|n| std::str::from_utf8(n).unwrap()).collect();
    assert_eq!(names, vec!["keep", "keep/a", "op", "op/new", "same", "same/f"]);

    let b = Arena::new();
    b.apply(&tar, WhiteoutMode::Overlay).unwrap();
    let nodes = dump(&b.dest, false);
    for wh in ["gone", "gone-dir", "never-existed", "nope/x"] {
        let n = &nodes[wh.as_bytes()];
        assert_eq!((n.kind, n.rdev), ('c', 0), "{wh}");
    }
    assert_eq!(
        nodes[&b"same/f"[..]].kind,
        'f',
        "a whiteout does not hide its own layer"
    );
    assert_eq!(
        nodes[&b"op"[..]].xattrs,
        vec![(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())]
    );
    assert_eq!(nodes[&b"op/new"[..]].content.as_deref(), Some(&b"n"[..]));
}

#[test]
fn dir_over_dir_keeps_contents_other_types_replace() {
    let a = Arena::new();
    let d = &a.dest;
    mkdir(&d.join("dir"), 0o700);
    file(&d.join("dir/child"), b"c", 0o644);
    mkdir(&d.join("was-dir/sub"), 0o755);
    file(&d.join("was-file"), b"f", 0o644);
    std::os::unix::fs::symlink("dir", d.join("was-link")).unwrap();
    let mut dir = spec("dir", Kind::Dir, "", 0);
    dir.mode = 0o1777;
    dir.uid = 7;
    let tar = craft(&[
        (dir, b""),
        (spec("was-dir", Kind::Regular, "", 1), b"1"),
        (spec("was-file", Kind::Dir, "", 0), b""),
        (spec("was-link", Kind::Dir, "", 0), b""),
    ]);
    a.apply(&tar, WhiteoutMode::Delete).unwrap();
    let nodes = dump(d, true);
    let n = &nodes[&b"dir"[..]];
    assert_eq!(
        (n.kind, n.mode, n.uid, n.mtime),
        ('d', 0o1777, 7, Some(1_600_000_000))
    );
    assert!(nodes.contains_key(&b"dir/child"[..]));
    assert_eq!(nodes[&b"was-dir"[..]].kind, 'f');
    assert_eq!(nodes[&b"was-file"[..]].kind, 'd');
    assert_eq!(nodes[&b"was-link"[..]].kind, 'd');
    assert!(!nodes.contains_key(&b"was-dir/sub"[..]));
}

/// Re-runs this test binary as `nobody` to apply a device node without privilege.
#[test]
fn device_nodes_need_privilege() {
    if let Ok(dest) = std::env::var("KILN_LAYER_TEST_UNPRIVILEGED_DEST") {
        // The child: running as nobody.
        let mut dev = spec("dev/null", Kind::Char, "", 0);
        dev.dev_major = 1;
        dev.dev_minor = 3;
        let tar = craft(&[(spec("dev", Kind::Dir, "", 0), b""), (dev, b"")]);
        let opts = ApplyOptions {
            same_owner: false,
            ..delete_opts("hostile.tar")
        };
        let err = apply(&tar[..], Path::new(&dest), &opts).unwrap_err();
        assert!(matches!(err, ApplyError::DeviceNotPermitted { .. }), "{err}");
        assert!(err.to_string().contains("hostile.tar") && err.to_string().contains("dev/null"));
        // Fifos and whiteouts need no privilege.
        let tar = craft(&[
            (spec("fifo", Kind::Fifo, "", 0), b""),
            (spec(".wh.x", Kind::Regular, "", 0), b""),
        ]);
        let opts = ApplyOptions {
            whiteouts: WhiteoutMode::Overlay,
            ..opts
        };
        apply(&tar[..], Path::new(&dest), &opts).unwrap();
        return;
    }
    if !is_root() {
        eprintln!("skipped: needs root to switch to an unprivileged user");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([
            "--exact",
            "layer::tests::device_nodes_need_privilege",
            "--test-threads=1",
        ])
        .uid(65534)
        .gid(65534)
        .env("KILN_LAYER_TEST_UNPRIVILEGED_DEST", t.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!t.path().join("dev/null").exists());
    assert_eq!(fs::symlink_metadata(t.path().join("x")).unwrap().rdev(), 0);
}

#[test]
fn sniff_detects_every_compression() {
    let data: Vec<u8> = (0..50_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::encode_all(&data[..], 3).unwrap();
    let bz = {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        e.write_all(&data).unwrap();
        e.finish().unwrap()
    };
    let xz = {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(&data).unwrap();
        e.finish().unwrap()
    };
    for (blob, kind) in [
        (gz, Compression::Gzip),
        (zst, Compression::Zstd),
        (bz, Compression::Bzip2),
        (xz, Compression::Xz),
        (data.clone(), Compression::None),
    ] {
        assert_eq!(Compression::detect(&blob[..6]), kind);
        let mut out = Vec::new();
        sniff(std::io::Cursor::new(blob))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == data, "{kind:?} round trip");
    }
    let mut out = Vec::new();
    sniff(&b"ab"[..]).unwrap().read_to_end(&mut out).unwrap();
    assert_eq!(out, b"ab");
}

fn gzipped(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Records the thread of each read of the stream it wraps.
struct WhoReads<R> {
    inner: R,
    readers: std::sync::Arc<std::sync::Mutex<Vec<std::thread::ThreadId>>>,
}

impl<R: Read> Read for WhoReads<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.readers.lock().unwrap().push(std::thread::current().id());
        self.inner.read(buf)
    }
}

#[test]
fn sniff_inflates_a_compressed_stream_on_a_thread_of_its_own() {
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 97) as u8).collect();
    let gz = gzipped(&data);
    let me = std::thread::current().id();
    for (blob, inflated_here) in [(gz, false), (data.clone(), true)] {
        let readers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stream = WhoReads {
            inner: std::io::Cursor::new(blob),
            readers: readers.clone(),
        };
        let mut out = Vec::new();
        sniff(stream).unwrap().read_to_end(&mut out).unwrap();
        assert!(out == data);
        let readers = readers.lock().unwrap();
        // The magic bytes are read here; the rest of a compressed stream on the read-ahead thread.
        assert_eq!(readers[0], me);
        assert_eq!(
            readers[1..].iter().all(|t| *t == me),
            inflated_here,
            "{} reads, inflated here: {inflated_here}",
            readers.len()
        );
    }
}

#[test]
fn a_downloading_layer_is_read_ahead_only_when_large() {
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 89) as u8).collect();
    let gz = gzipped(&data);
    let me = std::thread::current().id();
    for (size, ahead) in [(gz.len() as u64, false), (READ_AHEAD_DOWNLOADING_MIN, true)] {
        let readers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stream = WhoReads {
            inner: std::io::Cursor::new(gz.clone()),
            readers: readers.clone(),
        };
        let mut out = Vec::new();
        sniff_downloading(stream, size)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == data);
        let elsewhere = readers.lock().unwrap().iter().any(|t| *t != me);
        assert_eq!(elsewhere, ahead, "size {size}");
    }
}

/// Timings (printed; run with `--nocapture`): the diff of a small upper dir, and applying a
/// 20k-file layer.
#[test]
fn timings() {
    let upper = tempfile::tempdir().unwrap();
    mkdir(&upper.path().join("etc"), 0o755);
    for i in 0..8 {
        file(&upper.path().join(format!("etc/f{i}")), b"small file\n", 0o644);
    }
    let mut buf = Vec::with_capacity(64 * 1024);
    let runs = 200;
    let start = Instant::now();
    for _ in 0..runs {
        buf.clear();
        write_diff(upper.path(), &mut buf, &DiffOptions::default()).unwrap();
    }
    let per = start.elapsed() / runs;
    println!("write_diff of a 9-entry upper dir: {per:?} per run");

    let src = tempfile::tempdir().unwrap();
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    for d in 0..200 {
        for f in 0..100 {
            entries.push((
                format!("d{d:03}/f{f:03}"),
                format!("content {d} {f}\n").into_bytes(),
            ));
        }
    }
    let mut tar = Vec::new();
    for d in 0..200 {
        let name = format!("d{d:03}/");
        tarfmt::encode(&spec(&name, Kind::Dir, "", 0), &mut tar);
        for (path, data) in entries.iter().skip(d * 100).take(100) {
            tarfmt::encode(&spec(path, Kind::Regular, "", data.len() as u64), &mut tar);
            tar.extend_from_slice(data);
            tar.resize(tar.len() + tarfmt::padding(data.len() as u64), 0);
        }
    }
    tar.extend_from_slice(&[0u8; 1024]);
    // GNU tar on the same archive, as a baseline for this machine and file system.
    let gnu = tempfile::tempdir().unwrap();
    let tar_file = gnu.path().join("layer.tar");
    fs::write(&tar_file, &tar).unwrap();
    fs::create_dir(gnu.path().join("x")).unwrap();
    let start = Instant::now();
    let status = Command::new("tar")
        .arg("-C")
        .arg(gnu.path().join("x"))
        .arg("-xf")
        .arg(&tar_file)
        .status();
    if status.is_ok_and(|s| s.success()) {
        println!("GNU tar -x of the same layer: {:?}", start.elapsed());
    }
    let start = Instant::now();
    let stats = apply(&tar[..], src.path(), &delete_opts("20k.tar")).unwrap();
    println!(
        "apply of a {}-entry layer ({} bytes): {:?}",
        stats.entries,
        tar.len(),
        start.elapsed()
    );
    assert_eq!(stats.entries, 20_200);
    assert_eq!(
        fs::read(src.path().join("d199/f099")).unwrap(),
        b"content 199 99\n"
    );
    let start = Instant::now();
    let (_, wstats) = tar_of(src.path(), &DiffOptions::default());
    println!("write_tree of the same 20k files: {:?}", start.elapsed());
    assert_eq!(wstats.entries, 20_200);
}

#[test]
fn large_files_cross_chunks_and_write_failures_surface() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("tree");
    fs::create_dir(&dir).unwrap();
    // Sizes around the 1 MiB hand-off to the hashing thread, one odd-sized, one past the
    // 8 MiB after which writes move to a thread of their own.
    let big: Vec<u8> = (0..(9 << 20) + 777).map(|i: u32| (i % 251) as u8).collect();
    file(&dir.join("a"), &big[..(1 << 20) - 100], 0o644);
    file(&dir.join("b"), &big, 0o644);
    file(&dir.join("c"), b"small", 0o600);
    set_all_mtimes(&dir, 1_000_000);
    let (tar, stats) = tar_of(&dir, &DiffOptions::default());
    assert_eq!(stats.size, tar.len() as u64);
    assert_eq!(stats.diff_id, Digest::of(&tar));
    let mut archive = tar::Archive::new(&tar[..]);
    let mut seen = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        seen.push((name, data.len()));
        match seen.last().map(|(n, _)| n.as_str()) {
            Some("a") => assert_eq!(data, &big[..(1 << 20) - 100]),
            Some("b") => assert_eq!(data, big),
            _ => {}
        }
    }
    assert_eq!(
        seen,
        [
            ("a".to_string(), (1 << 20) - 100),
            ("b".into(), big.len()),
            ("c".into(), 5)
        ]
    );

    /// Accepts `left` bytes, then fails.
    struct Failing {
        left: usize,
    }
    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                return Err(std::io::Error::other("disk full"));
            }
            let n = buf.len().min(self.left);
            self.left -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // The first 8 MiB are written by the hashing thread, the rest beside it.
    struct Threads(Vec<(usize, String)>);
    impl Write for Threads {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let name = std::thread::current().name().unwrap_or("").to_string();
            self.0.push((buf.len(), name));
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut threads = Threads(Vec::new());
    let same = write_tree(&dir, &mut threads, &DiffOptions::default()).unwrap();
    assert_eq!(same.diff_id, stats.diff_id);
    let mut at = 0;
    for (len, name) in &threads.0 {
        let expected = if at < 8 << 20 {
            "kiln-layer-hash"
        } else {
            "kiln-layer-write"
        };
        assert_eq!(name, expected, "the write at {at}");
        at += len;
    }
    assert_eq!(at as u64, stats.size);
    for left in [0, 100, 2 << 20, 9 << 20] {
        let err = write_tree(&dir, Failing { left }, &DiffOptions::default()).unwrap_err();
        assert!(
            matches!(&err, WriteError::Write { source, .. } if source.to_string() == "disk full"),
            "{left}: {err:?}"
        );
    }
}

#[test]
fn entries_of_shared_inodes_are_copied_from_the_donor_tar() {
    if !is_root() {
        eprintln!("skipping: sample_tree sets owners and needs root");
        return;
    }
    let top = tempfile::tempdir().unwrap();
    let (a, b) = (top.path().join("a"), top.path().join("b"));
    fs::create_dir(&a).unwrap();
    sample_tree(&a);
    let blob_path = top.path().join("a.tar");
    let a_written =
        write_diff_indexed(&a, fs::File::create(&blob_path).unwrap(), &DiffOptions::default()).unwrap();
    let (a_stats, a_index) = (a_written.stats, a_written.index);
    assert_eq!(a_stats.reused, 0);
    assert!(
        a_written.recipe.is_none(),
        "without a donor the whole tar is written"
    );
    assert_eq!(a_written.written, a_stats.diff_id);
    assert!(
        a_index.get(b"etc/hard2").is_some(),
        "the first name of a link pair"
    );
    assert!(a_index.get(b"hard1").is_none(), "a hardlink entry is not indexed");

    // The next tree links A's files (as a linked copy does), with changes: a file rewritten (a
    // new inode, same path), a file moved (same inode, new path), a file added, and both names of
    // A's link pair.
    let status = Command::new("cp").arg("-al").arg(&a).arg(&b).status().unwrap();
    assert!(status.success());
    fs::remove_file(b.join("etc/passwd")).unwrap();
    file(&b.join("etc/passwd"), b"root:x:0:0::/root:/bin/ash\n", 0o644);
    fs::rename(b.join("big"), b.join("big2")).unwrap();
    file(&b.join("added"), b"new", 0o600);

    let size = fs::metadata(&blob_path).unwrap().len();
    let plain = BlobSource::plain(a_stats.diff_id, fs::File::open(&blob_path).unwrap(), size);
    let donor = Donor::new(plain, a_index.clone());
    let with_donor = DiffOptions {
        donor: Some(std::sync::Arc::new(donor)),
        ..Default::default()
    };
    let mut fragment = Vec::new();
    let lazy = write_diff_indexed(&b, &mut fragment, &with_donor).unwrap();
    let (stats, index) = (lazy.stats, lazy.index.clone());
    let mut fresh_tar = Vec::new();
    let fresh = write_diff_indexed(&b, &mut fresh_tar, &DiffOptions::default()).unwrap();
    let (fresh_stats, fresh_index) = (fresh.stats, fresh.index);
    // Only the new bytes were written; the recipe gives the very tar a full write gives.
    let recipe = lazy.recipe.expect("a write reusing entries is lazy");
    assert_eq!(lazy.written, Digest::of(&fragment));
    assert_eq!(recipe.sources, vec![lazy.written, a_stats.diff_id]);
    let donor_bytes: u64 = recipe
        .pieces
        .iter()
        .filter(|p| p.source != 0)
        .map(|p| p.len)
        .sum();
    assert!(donor_bytes > 0);
    assert_eq!(
        fragment.len() as u64 + donor_bytes,
        fresh_tar.len() as u64,
        "a byte written twice"
    );
    let mut blobs = HashMap::new();
    blobs.insert(lazy.written, fragment.clone());
    blobs.insert(a_stats.diff_id, fs::read(&blob_path).unwrap());
    assert!(
        assemble(&recipe, &blobs) == fresh_tar,
        "copying entries changed the tar"
    );
    assert_eq!(stats.size, fresh_tar.len() as u64);
    assert_eq!(stats.diff_id, fresh_stats.diff_id);
    assert_eq!(index, fresh_index, "the index of a tar written with reuse");

    // A third tree linked from B (a lazy blob) with one more change: its recipe reads only plain
    // blobs (B's fragment and A's blob, never B itself) and gives C's full tar.
    let c = top.path().join("c");
    let status = Command::new("cp").arg("-al").arg(&b).arg(&c).status().unwrap();
    assert!(status.success());
    fs::remove_file(c.join("added")).unwrap();
    file(&c.join("added"), b"newer", 0o600);
    let b_source = BlobSource::of_recipe(
        &recipe,
        vec![
            (lazy.written, tempfile_with(&fragment)),
            (a_stats.diff_id, fs::File::open(&blob_path).unwrap()),
        ],
    )
    .unwrap();
    let c_donor = DiffOptions {
        donor: Some(std::sync::Arc::new(Donor::new(b_source, lazy.index))),
        ..Default::default()
    };
    let mut c_fragment = Vec::new();
    let c_lazy = write_diff_indexed(&c, &mut c_fragment, &c_donor).unwrap();
    let c_recipe = c_lazy.recipe.expect("lazy again");
    assert!(
        !c_recipe.sources.contains(&stats.diff_id),
        "{:?}",
        c_recipe.sources
    );
    blobs.insert(c_lazy.written, c_fragment);
    let c_fresh = tar_of(&c, &DiffOptions::default()).0;
    assert!(
        assemble(&c_recipe, &blobs) == c_fresh,
        "a recipe over a lazy donor"
    );
    assert_eq!(c_lazy.stats.diff_id, Digest::of(&c_fresh));
    assert!(c_lazy.stats.reused > 0);

    // Reused: every indexed file of A still at its path with its inode.
    let same = a_index
        .iter()
        .filter(|(path, span)| {
            fs::symlink_metadata(b.join(OsStr::from_bytes(path)))
                .is_ok_and(|m| m.is_file() && m.ino() == span.ino)
        })
        .count() as u64;
    assert_eq!(stats.reused, same);
    assert_eq!(
        stats.reused + 3,
        a_index.len() as u64 + 1,
        "all but passwd, big; not added"
    );
    assert_eq!(fresh_stats.reused, 0);

    // A clamped write never reuses (the donor's times are the files' own).
    let clamped = DiffOptions {
        source_date_epoch: Some(1_000_000_000),
        ..with_donor
    };
    assert_eq!(write_diff(&b, std::io::sink(), &clamped).unwrap().reused, 0);
}

/// A donor whose bytes are spread over 8 blobs (a chain of lazy edits) gives a plain write: the
/// chain is cut, so old fragments stop being kept; below 8 the write stays lazy.
#[test]
fn a_donor_over_eight_blobs_ends_the_chain_with_a_plain_write() {
    let top = tempfile::tempdir().unwrap();
    let (a, b) = (top.path().join("a"), top.path().join("b"));
    for i in 0..40 {
        fs::create_dir_all(a.join(format!("d{}", i % 4))).unwrap();
        file(
            &a.join(format!("d{}/f{i}", i % 4)),
            &vec![i as u8; 700 + i],
            0o644,
        );
    }
    let mut a_tar = Vec::new();
    let written = write_diff_indexed(&a, &mut a_tar, &DiffOptions::default()).unwrap();
    let status = Command::new("cp").arg("-al").arg(&a).arg(&b).status().unwrap();
    assert!(status.success());
    fs::remove_file(b.join("d1/f5")).unwrap();
    file(&b.join("d1/f5"), b"edited", 0o644);
    let fresh = tar_of(&b, &DiffOptions::default()).0;
    for (sources, lazy) in [(7, true), (8, false)] {
        // A's tar cut into `sources` blobs, as a recipe.
        let mut recipe = Recipe::default();
        let mut files = Vec::new();
        let step = a_tar.len().div_ceil(sources);
        for (k, part) in a_tar.chunks(step).enumerate() {
            let d = Digest::of(format!("part {k}").as_bytes());
            recipe.push(d, 0, part.len() as u64);
            files.push((d, tempfile_with(part)));
        }
        assert_eq!(files.len(), sources);
        let source = BlobSource::of_recipe(&recipe, files).unwrap();
        assert_eq!(source.source_count(), sources);
        let opts = DiffOptions {
            donor: Some(std::sync::Arc::new(Donor::new(source, written.index.clone()))),
            ..Default::default()
        };
        let mut out = Vec::new();
        let w = write_diff_indexed(&b, &mut out, &opts).unwrap();
        assert!(w.stats.reused > 30, "{sources}: {}", w.stats.reused);
        assert_eq!(w.stats.diff_id, Digest::of(&fresh));
        assert_eq!(w.recipe.is_some(), lazy, "{sources} sources");
        if !lazy {
            assert!(out == fresh, "a plain write is the whole tar");
            assert_eq!(w.written, w.stats.diff_id);
        }
    }
}

#[test]
fn a_donor_blob_shorter_than_its_index_is_never_read_past_its_end() {
    let top = tempfile::tempdir().unwrap();
    let a = top.path().join("a");
    fs::create_dir(&a).unwrap();
    file(&a.join("one"), &[1u8; 3000], 0o644);
    file(&a.join("two"), &[2u8; 10], 0o644);
    let blob_path = top.path().join("a.tar");
    let written =
        write_diff_indexed(&a, fs::File::create(&blob_path).unwrap(), &DiffOptions::default()).unwrap();
    let index = written.index;
    // Cut the blob inside `two`'s entry: only `one` stays reusable.
    let blob = fs::OpenOptions::new().write(true).open(&blob_path).unwrap();
    blob.set_len(index.get(b"two").unwrap().offset + 512).unwrap();
    let size = fs::metadata(&blob_path).unwrap().len();
    let plain = BlobSource::plain(written.stats.diff_id, fs::File::open(&blob_path).unwrap(), size);
    let donor = Donor::new(plain, index);
    let opts = DiffOptions {
        donor: Some(std::sync::Arc::new(donor)),
        ..Default::default()
    };
    let mut out = Vec::new();
    let stats = write_diff(&a, &mut out, &opts).unwrap();
    assert_eq!(stats.reused, 1);
    assert_eq!(out, tar_of(&a, &DiffOptions::default()).0);
}

/// The bytes `recipe` stands for, from `blobs`.
fn assemble(recipe: &Recipe, blobs: &HashMap<Digest, Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    for p in &recipe.pieces {
        let src = &blobs[&recipe.sources[p.source as usize]];
        out.extend_from_slice(&src[p.offset as usize..(p.offset + p.len) as usize]);
    }
    out
}

fn tempfile_with(bytes: &[u8]) -> fs::File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    f
}

/// `check` fails exactly where `apply` into an empty directory fails, in both whiteout modes,
/// on the corner cases of replacing, linking and naming (the fuzz target `apply` checks the
/// same on random archives).
#[test]
fn check_agrees_with_apply() {
    if !is_root() {
        eprintln!("check_agrees_with_apply: needs root (device nodes, whiteouts); skipped");
        return;
    }
    let long = "n".repeat(256);
    let long_link = "t".repeat(5000);
    let bad_xattr = vec![(b"user.".repeat(60), b"v".to_vec())];
    let mut with_xattr = spec("x", Kind::Regular, "", 0);
    with_xattr.xattrs = &bad_xattr;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "link to self",
            craft(&[
                (spec("f", Kind::Regular, "", 1), b"1"),
                (spec("f", Kind::Hardlink, "f", 0), b""),
            ]),
        ),
        (
            "dir linked to itself",
            craft(&[
                (spec("d", Kind::Dir, "", 0), b""),
                (spec("d", Kind::Hardlink, "d", 0), b""),
            ]),
        ),
        (
            "link to a dir",
            craft(&[
                (spec("d", Kind::Dir, "", 0), b""),
                (spec("l", Kind::Hardlink, "d", 0), b""),
            ]),
        ),
        (
            "link over its own target's dir",
            craft(&[
                (spec("d/f", Kind::Regular, "", 1), b"1"),
                (spec("d", Kind::Hardlink, "d/f", 0), b""),
            ]),
        ),
        (
            "link to a symlink",
            craft(&[
                (spec("s", Kind::Symlink, "/nowhere", 0), b""),
                (spec("l", Kind::Hardlink, "s", 0), b""),
                (spec("l/x", Kind::Regular, "", 0), b""),
            ]),
        ),
        (
            "names of one link",
            craft(&[
                (spec("a", Kind::Regular, "", 1), b"1"),
                (spec("b", Kind::Hardlink, "a", 0), b""),
                (spec("b", Kind::Hardlink, "a", 0), b""),
                (spec("a", Kind::Hardlink, "b", 0), b""),
            ]),
        ),
        (
            "file then under it",
            craft(&[
                (spec("f", Kind::Regular, "", 0), b""),
                (spec("f/x", Kind::Regular, "", 0), b""),
            ]),
        ),
        (
            "dir replaced by a file",
            craft(&[
                (spec("d/x", Kind::Regular, "", 0), b""),
                (spec("d", Kind::Regular, "", 0), b""),
                (spec("d/y", Kind::Regular, "", 0), b""),
            ]),
        ),
        (
            "symlink replaced by a dir",
            craft(&[
                (spec("s", Kind::Symlink, "/etc", 0), b""),
                (spec("s", Kind::Dir, "", 0), b""),
                (spec("s/ok", Kind::Regular, "", 0), b""),
            ]),
        ),
        (
            "name too long",
            craft(&[(spec(&long, Kind::Regular, "", 0), b"")]),
        ),
        (
            "parent too long",
            craft(&[(spec(&format!("{long}/x"), Kind::Regular, "", 0), b"")]),
        ),
        (
            "symlink target too long",
            craft(&[(spec("s", Kind::Symlink, &long_link, 0), b"")]),
        ),
        (
            "empty symlink target",
            craft(&[(spec("s", Kind::Symlink, "", 0), b"")]),
        ),
        ("xattr name too long", craft(&[(with_xattr, b"")])),
        (
            "whiteouts of written paths",
            craft(&[
                (spec("w", Kind::Regular, "", 0), b""),
                (spec(".wh.w", Kind::Regular, "", 0), b""),
                (spec("f", Kind::Regular, "", 0), b""),
                (spec("f/.wh.x", Kind::Regular, "", 0), b""),
            ]),
        ),
        (
            "whiteout under a missing dir",
            craft(&[(spec("no/such/.wh.x", Kind::Regular, "", 0), b"")]),
        ),
        (
            "opaque under a file",
            craft(&[
                (spec("f", Kind::Regular, "", 0), b""),
                (spec("f/.wh..wh..opq", Kind::Regular, "", 0), b""),
            ]),
        ),
        (
            "whiteout with data",
            craft(&[
                (spec(".wh.data", Kind::Regular, "", 3), b"abc"),
                (spec("after", Kind::Regular, "", 0), b""),
            ]),
        ),
        (
            "root as a file",
            craft(&[(spec("./", Kind::Regular, "", 0), b"")]),
        ),
        ("root as a dir", craft(&[(spec("/", Kind::Dir, "", 0), b"")])),
    ];
    for (what, tar) in cases {
        for mode in [WhiteoutMode::Delete, WhiteoutMode::Overlay] {
            let a = Arena::new();
            let opts = ApplyOptions {
                whiteouts: mode,
                ..delete_opts("case.tar")
            };
            let applied = apply(&tar[..], &a.dest, &opts);
            let checked = check(&tar[..], &opts);
            match (&applied, &checked) {
                (Ok(x), Ok(y)) => assert_eq!(x, y, "{what} ({mode:?})"),
                (Err(_), Err(_)) => {}
                (x, y) => panic!("{what} ({mode:?}): apply gave {x:?} but check gave {y:?}"),
            }
            a.assert_outside_untouched();
        }
    }
}

/// A walk over trees below (a snapshot stacked on another) writes the tar of the union the
/// kernel's overlay shows, with or without the lower tree's tar as a donor, and refuses what the
/// union cannot express. Needs root (mounts the overlay the result is compared with).
#[test]
fn a_tree_over_trees_below_is_written_as_their_union() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let top = tempfile::tempdir().unwrap();
    let (lower, upper, merged) = (top.path().join("d"), top.path().join("u"), top.path().join("m"));
    for d in [&lower, &upper, &merged] {
        fs::create_dir(d).unwrap();
    }
    sample_tree(&lower);
    mkdir(&lower.join("emptied"), 0o755);
    set_mtime(&lower.join("emptied"), 1_600_000_000);
    // The upper: one of the lower's directories with other attributes, a changed file, a new
    // one, a file where the lower has an empty directory, a subtree of its own.
    mkdir(&upper.join("etc"), 0o750);
    file(&upper.join("etc/passwd"), b"root:x:0:0::/root:/bin/ash\n", 0o600);
    file(&upper.join("etc/new"), b"new", 0o644);
    file(&upper.join("emptied"), b"a file now", 0o644);
    mkdir(&upper.join("own/sub"), 0o700);
    file(&upper.join("own/sub/f"), b"own", 0o644);
    set_all_mtimes(&upper, 1_700_000_000);

    let (want, want_stats) = {
        let _m = mount_overlay_ro(&[&upper, &lower], &merged);
        tar_of(&merged, &DiffOptions::default())
    };
    let layered = DiffOptions {
        below: vec![lower.clone()],
        ..Default::default()
    };
    let mut got = Vec::new();
    let got_stats = write_diff(&upper, &mut got, &layered).unwrap();
    assert_eq!(listing(&got), listing(&want));
    assert!(got == want, "the union's tar differs");
    assert_eq!(got_stats.diff_id, want_stats.diff_id);

    // With the lower tree's tar as the donor, its files' entries are copied: the same tar.
    let mut lower_tar = Vec::new();
    let lower_written = write_diff_indexed(&lower, &mut lower_tar, &DiffOptions::default()).unwrap();
    let source = BlobSource::plain(
        lower_written.stats.diff_id,
        tempfile_with(&lower_tar),
        lower_tar.len() as u64,
    );
    let with_donor = DiffOptions {
        donor: Some(std::sync::Arc::new(Donor::new(source, lower_written.index))),
        below: vec![lower.clone()],
        ..Default::default()
    };
    let mut fragment = Vec::new();
    let lazy = write_diff_indexed(&upper, &mut fragment, &with_donor).unwrap();
    assert_eq!(lazy.stats.diff_id, want_stats.diff_id);
    assert!(lazy.stats.reused >= 5, "{:?}", lazy.stats);
    let recipe = lazy.recipe.expect("lazy");
    let mut blobs = HashMap::new();
    blobs.insert(lazy.written, fragment);
    blobs.insert(lower_written.stats.diff_id, lower_tar);
    assert!(assemble(&recipe, &blobs) == want);

    // A whiteout where the trees merge would hide the lower entry: refused, as is an opaque
    // directory over a lower one. Inside the upper's own subtree both mean what they say.
    rfs::mknodat(
        CWD,
        upper.join("bin"),
        FileType::CharacterDevice,
        Mode::empty(),
        0,
    )
    .unwrap();
    let refused = write_diff(&upper, Vec::new(), &layered).unwrap_err();
    assert!(matches!(refused, WriteError::LayeredWhiteout { .. }), "{refused}");
    fs::remove_file(upper.join("bin")).unwrap();
    rfs::lsetxattr(upper.join("etc"), opaque_xattr(), b"y", XattrFlags::empty()).unwrap();
    let refused = write_diff(&upper, Vec::new(), &layered).unwrap_err();
    assert!(matches!(refused, WriteError::LayeredWhiteout { .. }), "{refused}");
    rfs::lremovexattr(upper.join("etc"), opaque_xattr()).unwrap();
    rfs::lsetxattr(upper.join("own"), opaque_xattr(), b"y", XattrFlags::empty()).unwrap();
    rfs::mknodat(
        CWD,
        upper.join("own/gone"),
        FileType::CharacterDevice,
        Mode::empty(),
        0,
    )
    .unwrap();
    let mut out = Vec::new();
    write_diff(&upper, &mut out, &layered).unwrap();
    let names: Vec<String> = listing(&out).into_iter().map(|e| e.0).collect();
    assert!(names.iter().any(|n| n == "own/.wh..wh..opq"), "{names:?}");
    assert!(names.iter().any(|n| n == "own/.wh.gone"), "{names:?}");
}
