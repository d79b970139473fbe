//! File operations against temp directories (run as root: ownership is checked).
//! The expected outcomes of the difftest cases (`../shared/difftest/cases/*/expected.json`,
//! recorded with BuildKit) are rebuilt here by hand as actions.

// Helpers of this test binary panic on setup failures, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use kiln_dag::{Chmod, CopyAction, FileAction, IdSpec, MkdirAction, MkfileAction, Owner, RmAction};
use kiln_solver::fileop::{apply, FileOpError, FileOpOptions, SourceRoot};

mod common;
use common::cp;

/// Every path below `root` described as the difftest compares it: type, mode, owner, content
/// or link target.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let m = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let ft = m.file_type();
        let desc = if ft.is_dir() {
            format!("dir {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid())
        } else if ft.is_symlink() {
            format!(
                "link -> {} {}:{}",
                fs::read_link(&p).unwrap().display(),
                m.uid(),
                m.gid()
            )
        } else if ft.is_file() {
            format!(
                "file {:o} {}:{} {:?}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                fs::read_to_string(&p).unwrap_or_default()
            )
        } else {
            format!(
                "special {:o} {:o} {}:{}",
                m.mode() & 0o170000,
                m.mode() & 0o7777,
                m.uid(),
                m.gid()
            )
        };
        out.insert(rel, desc);
        if ft.is_dir() {
            walk(root, &p, out);
        }
    }
}

/// The entries of `t` at `prefix` and below it (a prefix ending in `/`: only below it).
fn show(t: &BTreeMap<String, String>, prefix: &str) -> String {
    let below = if prefix.ends_with('/') {
        prefix.to_string()
    } else {
        format!("{prefix}/")
    };
    t.iter()
        .filter(|(k, _)| k.as_str() == prefix || k.starts_with(&below))
        .map(|(k, v)| format!("{k}: {v}\n"))
        .collect()
}

fn write(root: &Path, rel: &str, content: &str, mode: u32) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

fn mkdir(root: &Path, rel: &str, mode: u32) {
    let p = root.join(rel);
    fs::create_dir_all(&p).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

/// A destination like the busybox base: /etc/passwd and /etc/group with app, nobody, daemon.
fn base_root() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for dir in ["bin", "etc", "usr/bin", "tmp"] {
        mkdir(d.path(), dir, 0o755);
    }
    write(
        d.path(),
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\napp:x:1000:1000::/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
        0o644,
    );
    write(
        d.path(),
        "etc/group",
        "root:x:0:\ndaemon:x:1:\napp:x:1000:\nnogroup:x:65534:\n",
        0o644,
    );
    d
}

fn add(src: &str, dest: &str) -> CopyAction {
    CopyAction {
        attempt_unpack: true,
        ..cp(src, dest)
    }
}

fn run(dest: &Path, sources: &[SourceRoot], actions: Vec<CopyAction>) -> Result<(), FileOpError> {
    let actions: Vec<FileAction> = actions.into_iter().map(FileAction::Copy).collect();
    apply(dest, sources, &actions, &FileOpOptions::default())
}

fn ctx(root: &Path) -> Vec<SourceRoot> {
    vec![SourceRoot::context(root, None)]
}

fn owner(user: &str, group: Option<&str>) -> Option<Owner> {
    let spec = |s: &str| {
        s.parse::<u32>()
            .map(IdSpec::Id)
            .unwrap_or_else(|_| IdSpec::Name(s.into()))
    };
    Some(Owner {
        user: spec(user),
        group: group.map(spec),
    })
}

#[test]
fn copy_files_case() {
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "a.txt", "hello\n", 0o644);
    write(c.path(), "b.txt", "world\n", 0o644);
    write(c.path(), "run.sh", "#!/bin/sh\necho run\n", 0o755);
    write(c.path(), "dir/x", "x\n", 0o644);
    write(c.path(), "dir/sub/y", "y\n", 0o644);
    write(c.path(), "dir/sub/deeper/z", "z\n", 0o644);
    mkdir(c.path(), "dir/sub", 0o750);
    let d = base_root();
    run(
        d.path(),
        &ctx(c.path()),
        vec![
            cp("/a.txt", "/dst/"),
            cp("/a.txt", "/renamed.txt"),
            cp("/dir/", "/d2/"),
            cp("/dir", "/d3"),
            cp("/a.txt", "/multi/"),
            cp("/b.txt", "/multi/"),
            cp("/run.sh", "/usr/local/bin/"),
        ],
    )
    .unwrap();
    let t = tree(d.path());
    let got: String = ["dst", "renamed.txt", "d2", "d3", "multi", "usr/local"]
        .iter()
        .map(|p| show(&t, p))
        .collect();
    let want = r##"dst: dir 755 0:0
dst/a.txt: file 644 0:0 "hello\n"
renamed.txt: file 644 0:0 "hello\n"
d2: dir 755 0:0
d2/sub: dir 750 0:0
d2/sub/deeper: dir 755 0:0
d2/sub/deeper/z: file 644 0:0 "z\n"
d2/sub/y: file 644 0:0 "y\n"
d2/x: file 644 0:0 "x\n"
d3: dir 755 0:0
d3/sub: dir 750 0:0
d3/sub/deeper: dir 755 0:0
d3/sub/deeper/z: file 644 0:0 "z\n"
d3/sub/y: file 644 0:0 "y\n"
d3/x: file 644 0:0 "x\n"
multi: dir 755 0:0
multi/a.txt: file 644 0:0 "hello\n"
multi/b.txt: file 644 0:0 "world\n"
usr/local: dir 755 0:0
usr/local/bin: dir 755 0:0
usr/local/bin/run.sh: file 755 0:0 "#!/bin/sh\necho run\n"
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
}

#[test]
fn dir_slash_forms_and_existing_dirs() {
    // copy-dir-slash-forms: the source is another stage (owners kept), /existing is merged.
    let stage = tempfile::tempdir().unwrap();
    write(stage.path(), "srcdir/a", "a\n", 0o644);
    write(stage.path(), "srcdir/sub/b", "b\n", 0o644);
    mkdir(stage.path(), "srcdir", 0o755);
    mkdir(stage.path(), "srcdir/sub", 0o755);
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "dir/x", "x\n", 0o644);
    write(c.path(), "dir/s/y", "y\n", 0o644);
    let d = base_root();
    write(d.path(), "existing/old", "old\n", 0o644);
    fs::set_permissions(d.path().join("existing"), fs::Permissions::from_mode(0o700)).unwrap();
    let sources = vec![
        SourceRoot::filesystem(stage.path()),
        SourceRoot::context(c.path(), None),
    ];
    let from1 = |a: CopyAction| CopyAction { source_input: 1, ..a };
    run(
        d.path(),
        &sources,
        vec![
            cp("/srcdir/", "/g"),
            cp("/srcdir", "/h/"),
            cp("/srcdir", "/existing"),
            from1(cp("/dir/", "/i")),
            from1(cp("/dir/.", "/j/")),
        ],
    )
    .unwrap();
    let t = tree(d.path());
    let got: String = ["existing", "g", "h", "i", "j"]
        .iter()
        .map(|p| show(&t, p))
        .collect();
    let want = r##"existing: dir 700 0:0
existing/a: file 644 0:0 "a\n"
existing/old: file 644 0:0 "old\n"
existing/sub: dir 755 0:0
existing/sub/b: file 644 0:0 "b\n"
g: dir 755 0:0
g/a: file 644 0:0 "a\n"
g/sub: dir 755 0:0
g/sub/b: file 644 0:0 "b\n"
h: dir 755 0:0
h/a: file 644 0:0 "a\n"
h/sub: dir 755 0:0
h/sub/b: file 644 0:0 "b\n"
i: dir 755 0:0
i/s: dir 755 0:0
i/s/y: file 644 0:0 "y\n"
i/x: file 644 0:0 "x\n"
j: dir 755 0:0
j/s: dir 755 0:0
j/s/y: file 644 0:0 "y\n"
j/x: file 644 0:0 "x\n"
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
}

#[test]
fn copy_into_existing_case() {
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "dir/new", "new\n", 0o644);
    write(c.path(), "f", "f\n", 0o644);
    let d = base_root();
    write(d.path(), "existing/old", "old\n", 0o644);
    run(
        d.path(),
        &ctx(c.path()),
        vec![
            cp("/dir", "/existing"),
            cp("/f", "/etc/"),
            cp("/f", "/bin/newname"),
        ],
    )
    .unwrap();
    let t = tree(d.path());
    assert_eq!(t["existing/new"], r##"file 644 0:0 "new\n""##);
    assert_eq!(t["existing/old"], r##"file 644 0:0 "old\n""##);
    assert_eq!(t["etc/f"], r##"file 644 0:0 "f\n""##);
    assert_eq!(t["bin/newname"], r##"file 644 0:0 "f\n""##);
}

#[test]
fn wildcards_case() {
    let c = tempfile::tempdir().unwrap();
    for f in ["a.md", "b.md", "c.md", "one.txt", "two.txt", "dir/f", "dor/g"] {
        write(c.path(), f, "1", 0o644);
    }
    let d = base_root();
    run(
        d.path(),
        &ctx(c.path()),
        vec![cp("/*.txt", "/w/"), cp("/d?r", "/x/"), cp("/[ab].md", "/y/")],
    )
    .unwrap();
    let t = tree(d.path());
    let got: String = ["w", "x", "y"].iter().map(|p| show(&t, p)).collect();
    let want = r##"w: dir 755 0:0
w/one.txt: file 644 0:0 "1"
w/two.txt: file 644 0:0 "1"
x: dir 755 0:0
x/f: file 644 0:0 "1"
x/g: file 644 0:0 "1"
y: dir 755 0:0
y/a.md: file 644 0:0 "1"
y/b.md: file 644 0:0 "1"
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
}

#[test]
fn wildcards_in_several_components_and_last_match_wins_on_a_file_dest() {
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "src/a/x.py", "ax", 0o644);
    write(c.path(), "src/b/y.py", "by", 0o644);
    write(c.path(), "src/b/z.txt", "bz", 0o644);
    write(c.path(), "one.txt", "1", 0o644);
    write(c.path(), "two.txt", "2", 0o644);
    let d = base_root();
    run(
        d.path(),
        &ctx(c.path()),
        vec![cp("/src/*/*.py", "/py/"), cp("/*.txt", "/single")],
    )
    .unwrap();
    let t = tree(d.path());
    assert_eq!(
        show(&t, "py"),
        "py: dir 755 0:0\npy/x.py: file 644 0:0 \"ax\"\npy/y.py: file 644 0:0 \"by\"\n"
    );
    // BuildKit copies each match in turn: the last one is left (moby/buildkit#4550).
    assert_eq!(t["single"], "file 644 0:0 \"2\"");
}

#[test]
fn empty_wildcards_and_missing_sources() {
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "real.txt", "real\n", 0o644);
    write(c.path(), "dir/in", "in\n", 0o644);
    let d = base_root();
    run(
        d.path(),
        &ctx(c.path()),
        vec![
            cp("/nomatch*.cfg", "/dst/"),
            cp("/real.txt", "/dst/"),
            cp("/*.none", "/dst2/"),
            cp("/dir", "/dst2/"),
            cp("/also-missing-[0-9]*", "/dst4/"),
        ],
    )
    .unwrap();
    let t = tree(d.path());
    assert_eq!(t["dst/real.txt"], "file 644 0:0 \"real\\n\"");
    assert_eq!(t["dst2/in"], "file 644 0:0 \"in\\n\"");
    assert!(!t.contains_key("dst4"), "an empty wildcard creates nothing");

    let err = run(d.path(), &ctx(c.path()), vec![cp("/does-not-exist", "/x")]).unwrap_err();
    assert_eq!(err.to_string(), "\"/does-not-exist\": not found");
    let strict = CopyAction {
        allow_empty_wildcard: false,
        ..cp("/*.none", "/x/")
    };
    let err = run(d.path(), &ctx(c.path()), vec![strict]).unwrap_err();
    assert!(matches!(err, FileOpError::NoMatches { .. }), "{err}");
    let err = run(
        d.path(),
        &ctx(c.path()),
        vec![CopyAction {
            source_input: 3,
            ..cp("/real.txt", "/x")
        }],
    );
    assert!(matches!(
        err,
        Err(FileOpError::NoSuchInput { index: 3, count: 1 })
    ));
}

#[test]
fn sources_outside_the_context_are_refused() {
    let outer = tempfile::tempdir().unwrap();
    write(outer.path(), "etc/passwd", "host secret", 0o644);
    write(outer.path(), "secret", "host secret", 0o644);
    let c = outer.path().join("ctx");
    write(&c, "in.txt", "in", 0o644);
    symlink("../secret", c.join("up")).unwrap();
    symlink("/etc/passwd", c.join("abs")).unwrap();
    let d = base_root();
    let err = run(d.path(), &ctx(&c), vec![cp("../../etc/passwd", "/x")]).unwrap_err();
    assert_eq!(err.to_string(), "\"/etc/passwd\": not found");
    // Followed source symlinks resolve inside the context: both targets are missing there.
    let err = run(d.path(), &ctx(&c), vec![cp("/up", "/x")]).unwrap_err();
    assert!(matches!(err, FileOpError::SourceNotFound { .. }), "{err}");
    let err = run(d.path(), &ctx(&c), vec![cp("/abs", "/x")]).unwrap_err();
    assert!(matches!(err, FileOpError::SourceNotFound { .. }), "{err}");
    // Copied as part of a directory they stay symlinks with their target verbatim.
    run(d.path(), &ctx(&c), vec![cp("/", "/ctx/")]).unwrap();
    let t = tree(d.path());
    assert_eq!(t["ctx/up"], "link -> ../secret 0:0");
    assert_eq!(t["ctx/abs"], "link -> /etc/passwd 0:0");
    assert!(!d.path().join("x").exists());
}

#[test]
fn chown_case() {
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "a.txt", "a\n", 0o644);
    write(c.path(), "dir/f", "f\n", 0o644);
    write(c.path(), "dir/s/g", "g\n", 0o644);
    write(c.path(), "f", "f\n", 0o644);
    let d = base_root();
    let with = |a: CopyAction, u: &str, g: Option<&str>| CopyAction {
        owner: owner(u, g),
        ..a
    };
    run(
        d.path(),
        &ctx(c.path()),
        vec![
            with(cp("/a.txt", "/o/"), "1000", Some("1000")),
            with(cp("/a.txt", "/o2/"), "app", None),
            with(cp("/dir", "/o3/"), "app", Some("app")),
            with(cp("/a.txt", "/o4"), "42", None),
            with(cp("/f", "/f1"), "app", Some("daemon")),
            with(add("/f", "/f2"), "app", None),
            with(cp("/f", "/f3"), "77", Some("88")),
            with(cp("/f", "/f4"), "nobody", Some("nogroup")),
            with(cp("/dir", "/deep/er/dir"), "7", Some("8")),
        ],
    )
    .unwrap();
    let t = tree(d.path());
    let got: String = ["deep", "f1", "f2", "f3", "f4", "o", "o2", "o3", "o4"]
        .iter()
        .map(|p| show(&t, p))
        .collect();
    let want = r##"deep: dir 755 7:8
deep/er: dir 755 7:8
deep/er/dir: dir 755 7:8
deep/er/dir/f: file 644 7:8 "f\n"
deep/er/dir/s: dir 755 7:8
deep/er/dir/s/g: file 644 7:8 "g\n"
f1: file 644 1000:1 "f\n"
f2: file 644 1000:1000 "f\n"
f3: file 644 77:88 "f\n"
f4: file 644 65534:65534 "f\n"
o: dir 755 1000:1000
o/a.txt: file 644 1000:1000 "a\n"
o2: dir 755 1000:1000
o2/a.txt: file 644 1000:1000 "a\n"
o3: dir 755 1000:1000
o3/f: file 644 1000:1000 "f\n"
o3/s: dir 755 1000:1000
o3/s/g: file 644 1000:1000 "g\n"
o4: file 644 42:42 "a\n"
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
    // Names the databases do not list are not errors (BuildKit): an unknown user is 0:0, an
    // unknown group keeps the user's primary gid, a known group after an unknown user applies.
    run(
        d.path(),
        &ctx(c.path()),
        vec![
            with(cp("/f", "/x1"), "ghost", None),
            with(cp("/f", "/x2"), "app", Some("ghosts")),
            with(cp("/f", "/x3"), "ghost", Some("daemon")),
            with(cp("/f", "/x4"), "ghost", Some("9")),
        ],
    )
    .unwrap();
    let t = tree(d.path());
    let got: String = ["x1", "x2", "x3", "x4"].iter().map(|p| show(&t, p)).collect();
    assert_eq!(
        got,
        "x1: file 644 0:0 \"f\\n\"\nx2: file 644 1000:1000 \"f\\n\"\nx3: file 644 0:1 \"f\\n\"\nx4: file 644 0:9 \"f\\n\"\n"
    );
}

/// The created destination `oct` takes `--chmod` as in current BuildKit; Docker 20.10's
/// BuildKit, which recorded the difftests, left it 0755 (see
/// `chmod_applies_to_created_destination_directories`).
#[test]
fn chmod_case() {
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "a.txt", "a\n", 0o644);
    write(c.path(), "b.txt", "b\n", 0o644);
    write(c.path(), "run.sh", "echo ran\n", 0o644);
    write(c.path(), "tree/x", "x", 0o664);
    write(c.path(), "tree/sub/y", "y", 0o600);
    let d = base_root();
    mkdir(d.path(), "d", 0o755);
    mkdir(d.path(), "e", 0o755);
    let m = |a: CopyAction, mode: Chmod| CopyAction {
        mode: Some(mode),
        ..a
    };
    run(
        d.path(),
        &ctx(c.path()),
        vec![
            m(cp("/*.txt", "/d/"), Chmod::Octal(0o640)),
            m(cp("/run.sh", "/usr/bin/run-it"), Chmod::Octal(0o755)),
            CopyAction {
                owner: owner("app", Some("app")),
                ..m(cp("/a.txt", "/e/owned"), Chmod::Octal(0o600))
            },
            m(add("/b.txt", "/e/"), Chmod::Octal(0o444)),
            m(cp("/tree", "/sym/"), Chmod::Symbolic("u+x,g-w".into())),
            m(cp("/tree", "/oct"), Chmod::Octal(0o700)),
        ],
    )
    .unwrap();
    let t = tree(d.path());
    let got: String = ["d/", "usr/bin/run-it", "e/", "sym", "oct"]
        .iter()
        .map(|p| show(&t, p))
        .collect();
    let want = r##"d/a.txt: file 640 0:0 "a\n"
d/b.txt: file 640 0:0 "b\n"
usr/bin/run-it: file 755 0:0 "echo ran\n"
e/b.txt: file 444 0:0 "b\n"
e/owned: file 600 1000:1000 "a\n"
sym: dir 755 0:0
sym/sub: dir 755 0:0
sym/sub/y: file 700 0:0 "y"
sym/x: file 744 0:0 "x"
oct: dir 700 0:0
oct/sub: dir 700 0:0
oct/sub/y: file 700 0:0 "y"
oct/x: file 700 0:0 "x"
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
    let err = run(
        d.path(),
        &ctx(c.path()),
        vec![m(cp("/a.txt", "/z"), Chmod::Symbolic("u*x".into()))],
    );
    assert!(matches!(err, Err(FileOpError::InvalidChmod { .. })));
}

#[test]
fn symlinks_case() {
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "tree/f", "f\n", 0o644);
    symlink("f", c.path().join("tree/l")).unwrap();
    symlink("nowhere", c.path().join("tree/dangling")).unwrap();
    symlink("tree/f", c.path().join("link-to-file")).unwrap();
    symlink("tree", c.path().join("link-to-dir")).unwrap();
    let d = base_root();
    run(
        d.path(),
        &ctx(c.path()),
        vec![
            cp("/tree/", "/tree/"),
            cp("/link-to-file", "/lf"),
            cp("/link-to-dir/f", "/via-dir"),
            cp("/link-to-file", "/keep/"),
        ],
    )
    .unwrap();
    let t = tree(d.path());
    let got: String = ["tree", "lf", "via-dir", "keep"]
        .iter()
        .map(|p| show(&t, p))
        .collect();
    let want = r##"tree: dir 755 0:0
tree/dangling: link -> nowhere 0:0
tree/f: file 644 0:0 "f\n"
tree/l: link -> f 0:0
lf: file 644 0:0 "f\n"
via-dir: file 644 0:0 "f\n"
keep: dir 755 0:0
keep/link-to-file: file 644 0:0 "f\n"
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
    // Without follow_symlinks the named link itself is copied.
    run(
        d.path(),
        &ctx(c.path()),
        vec![CopyAction {
            follow_symlinks: false,
            ..cp("/link-to-file", "/nf")
        }],
    )
    .unwrap();
    assert_eq!(tree(d.path())["nf"], "link -> tree/f 0:0");
}

#[test]
fn destination_symlinks_resolve_inside_the_destination() {
    let host = tempfile::tempdir().unwrap();
    let dest = host.path().join("rootfs");
    fs::create_dir(&dest).unwrap();
    mkdir(&dest, "usr", 0o755);
    symlink("/", dest.join("toroot")).unwrap();
    symlink("../../../../..", dest.join("up")).unwrap();
    symlink("/usr", dest.join("link")).unwrap();
    symlink("/etc/shadow-target", dest.join("victim")).unwrap();
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "f", "payload", 0o644);
    run(
        &dest,
        &ctx(c.path()),
        vec![
            cp("/f", "/toroot/escaped"),
            cp("/f", "/up/escaped2"),
            cp("/f", "/link/file"),
            cp("/f", "/victim"),
        ],
    )
    .unwrap();
    assert_eq!(fs::read_to_string(dest.join("escaped")).unwrap(), "payload");
    assert_eq!(fs::read_to_string(dest.join("escaped2")).unwrap(), "payload");
    assert_eq!(fs::read_to_string(dest.join("usr/file")).unwrap(), "payload");
    // A symlink as the destination is written through, inside the root.
    assert_eq!(
        fs::read_to_string(dest.join("etc/shadow-target")).unwrap(),
        "payload"
    );
    assert!(!host.path().join("escaped").exists() && !host.path().join("escaped2").exists());
    let t = tree(host.path());
    assert!(t.keys().all(|k| k.starts_with("rootfs")), "{t:?}");
}

/// Issue 21.8: a build context's devices and sockets arrive as BuildKit's context transfer
/// delivers them (empty files with their permission bits), FIFOs are left out, and nothing of a
/// device is read (a `/dev/zero` node would never end). From a stage they stay what they are.
#[test]
fn special_files_from_the_context_arrive_as_buildkit_sends_them() {
    use rustix::fs::{makedev, mknodat, FileType, Mode, CWD};
    let c = tempfile::tempdir().unwrap();
    fs::create_dir(c.path().join("d")).unwrap();
    let node = |name: &str, kind: FileType, mode: u32, dev: u64| {
        mknodat(CWD, c.path().join(name), kind, Mode::from_raw_mode(mode), dev).unwrap();
    };
    node("d/zero", FileType::CharacterDevice, 0o640, makedev(1, 5));
    node("d/loop", FileType::BlockDevice, 0o600, makedev(7, 200));
    node("d/fifo", FileType::Fifo, 0o644, 0);
    std::os::unix::net::UnixListener::bind(c.path().join("d/sock")).unwrap();
    fs::set_permissions(c.path().join("d/sock"), fs::Permissions::from_mode(0o751)).unwrap();
    let d = base_root();
    run(
        d.path(),
        &ctx(c.path()),
        vec![cp("/d", "/out"), cp("/d/zero", "/one"), cp("/d/fifo", "/none")],
    )
    .unwrap();
    let t = tree(d.path());
    let got = format!("{}{}", show(&t, "out"), show(&t, "one"));
    let want = r##"out: dir 755 0:0
out/loop: file 600 0:0 ""
out/sock: file 751 0:0 ""
out/zero: file 640 0:0 ""
one: file 640 0:0 ""
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
    assert!(!d.path().join("none").exists());
    // A stage's filesystem keeps its nodes.
    let d = base_root();
    run(
        d.path(),
        &[SourceRoot::filesystem(c.path())],
        vec![cp("/d/zero", "/one")],
    )
    .unwrap();
    assert!(show(&tree(d.path()), "one").starts_with("one: special"));
}

#[test]
fn special_files_hardlinks_and_owners_from_a_stage() {
    let stage = tempfile::tempdir().unwrap();
    write(stage.path(), "s/a", "x\n", 0o644);
    fs::hard_link(stage.path().join("s/a"), stage.path().join("s/hard")).unwrap();
    fs::set_permissions(stage.path().join("s/a"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::chown(stage.path().join("s/a"), Some(7), Some(8)).unwrap();
    fs::set_permissions(stage.path().join("s/a"), fs::Permissions::from_mode(0o4755)).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        stage.path().join("s/fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    mkdir(stage.path(), "s/sticky", 0o2750);
    let mtime = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_234_567_890);
    fs::File::options()
        .write(true)
        .open(stage.path().join("s/a"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let d = base_root();
    run(
        d.path(),
        &[SourceRoot::filesystem(stage.path())],
        vec![cp("/s", "/out")],
    )
    .unwrap();
    let t = tree(d.path());
    let got = show(&t, "out");
    let want = r##"out: dir 755 0:0
out/a: file 4755 7:8 "x\n"
out/fifo: special 10000 644 0:0
out/hard: file 4755 7:8 "x\n"
out/sticky: dir 2750 0:0
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
    let a = fs::metadata(d.path().join("out/a")).unwrap();
    let hard = fs::metadata(d.path().join("out/hard")).unwrap();
    assert_eq!(a.ino(), hard.ino(), "hard links stay hard links");
    assert_eq!(a.modified().unwrap(), mtime, "mtimes are kept");
    // From the context the same tree is owned by root.
    run(d.path(), &ctx(stage.path()), vec![cp("/s/a", "/ctx-a")]).unwrap();
    assert_eq!(tree(d.path())["ctx-a"], "file 4755 0:0 \"x\\n\"");
}

#[test]
fn replacing_rules() {
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "src/x", "file", 0o644);
    write(c.path(), "src2/y/z", "z", 0o644);
    write(c.path(), "src3/f", "new", 0o600);
    let d = base_root();
    mkdir(d.path(), "t/x", 0o755);
    write(d.path(), "u/y", "i am a file", 0o644);
    write(d.path(), "v/f", "old", 0o644);
    let err = run(d.path(), &ctx(c.path()), vec![cp("/src", "/t")]).unwrap_err();
    assert!(matches!(err, FileOpError::ReplaceDirectory { .. }), "{err}");
    assert!(err.to_string().starts_with("cannot replace to directory"));
    let err = run(d.path(), &ctx(c.path()), vec![cp("/src2", "/u")]).unwrap_err();
    assert!(matches!(err, FileOpError::NotADirectory { .. }), "{err}");
    run(d.path(), &ctx(c.path()), vec![cp("/src3", "/v")]).unwrap();
    assert_eq!(tree(d.path())["v/f"], "file 600 0:0 \"new\"");
    let no_parent = CopyAction {
        create_dest_path: false,
        ..cp("/src3/f", "/missing/dir/f")
    };
    let err = run(d.path(), &ctx(c.path()), vec![no_parent]).unwrap_err();
    assert!(matches!(err, FileOpError::MissingDestParent { .. }), "{err}");
}

#[test]
fn dockerignore_case() {
    let c = tempfile::tempdir().unwrap();
    let ignore = "# comment\n*.log\n!keep.log\nbuild/\n**/*.tmp\n/secret\ndocs/**/draft*\n";
    write(c.path(), ".dockerignore", ignore, 0o644);
    write(
        c.path(),
        "Dockerfile",
        "FROM busybox:local\nCOPY . /ctx/\n",
        0o644,
    );
    for (f, body) in [
        ("src/x.tmp", "t"),
        ("src/main.c", "int main"),
        ("secret", "s"),
        ("keep.log", "kl"),
        ("a.log", "a"),
        ("sub/secret", "ss"),
        ("build/out", "o"),
        ("deep/er/y.tmp", "y"),
        ("docs/draft0", "d"),
        ("docs/a/final", "fin"),
        ("docs/a/draft1", "d1"),
    ] {
        write(c.path(), f, body, 0o644);
    }
    let patterns = kiln_patterns::read_dockerignore(ignore.as_bytes());
    let filter = kiln_patterns::Matcher::new(&patterns).unwrap();
    let sources = vec![SourceRoot::context(c.path(), Some(filter))];
    let d = base_root();
    run(d.path(), &sources, vec![cp("/", "/ctx/"), cp("/*.log", "/logs/")]).unwrap();
    let t = tree(d.path());
    let got: Vec<&str> = t
        .keys()
        .filter(|k| k.starts_with("ctx") || k.starts_with("logs"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        got,
        [
            "ctx",
            "ctx/.dockerignore",
            "ctx/Dockerfile",
            "ctx/deep",
            "ctx/deep/er",
            "ctx/docs",
            "ctx/docs/a",
            "ctx/docs/a/final",
            "ctx/keep.log",
            "ctx/src",
            "ctx/src/main.c",
            "ctx/sub",
            "ctx/sub/secret",
            "logs",
            "logs/keep.log",
        ]
    );
    let err = run(d.path(), &sources, vec![cp("/build/out", "/x")]).unwrap_err();
    assert_eq!(err.to_string(), "\"/build/out\": not found");
}

#[test]
fn exclude_patterns() {
    let c = tempfile::tempdir().unwrap();
    for f in [
        "app/a.txt",
        "app/b.md",
        "app/node_modules/m/x.js",
        "app/sub/c.txt",
        "app/sub/d.go",
        "home.txt",
        "home.md",
    ] {
        write(c.path(), f, "1", 0o644);
    }
    let d = base_root();
    let ex = |a: CopyAction, p: &[&str]| CopyAction {
        exclude: p.iter().map(|s| s.to_string()).collect(),
        ..a
    };
    run(
        d.path(),
        &ctx(c.path()),
        vec![
            ex(cp("/app", "/out/"), &["*.txt", "node_modules"]),
            ex(cp("/hom*", "/h/"), &["*.txt"]),
        ],
    )
    .unwrap();
    let t = tree(d.path());
    let got: Vec<&str> = t
        .keys()
        .filter(|k| k.starts_with("out") || k.starts_with("h"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        got,
        [
            "h",
            "h/home.md",
            "out",
            "out/b.md",
            "out/sub",
            "out/sub/c.txt",
            "out/sub/d.go"
        ]
    );
}

#[test]
fn parents_keep_the_source_directories() {
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "x/a/one.txt", "1", 0o644);
    write(c.path(), "x/b/two.txt", "2", 0o644);
    write(c.path(), "x/b/skip.md", "s", 0o644);
    mkdir(c.path(), "x/b", 0o750);
    write(c.path(), "y/z/deep.txt", "d", 0o644);
    let d = base_root();
    let par = |a: CopyAction| CopyAction { parents: true, ..a };
    run(
        d.path(),
        &ctx(c.path()),
        vec![
            par(cp("/x/*/*.txt", "/out/")),
            par(cp("/y/./z/deep.txt", "/pivot/")),
        ],
    )
    .unwrap();
    let t = tree(d.path());
    let got: String = ["out", "pivot"].iter().map(|p| show(&t, p)).collect();
    let want = r##"out: dir 755 0:0
out/x: dir 755 0:0
out/x/a: dir 755 0:0
out/x/a/one.txt: file 644 0:0 "1"
out/x/b: dir 750 0:0
out/x/b/two.txt: file 644 0:0 "2"
pivot: dir 755 0:0
pivot/z: dir 755 0:0
pivot/z/deep.txt: file 644 0:0 "d"
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
}

/// BuildKit cuts a `--parents` source at its first `/./` (`./x/./y/*.txt`: pivot `x`, pattern
/// `y/*.txt`; the leading `./` is no pivot), matches the pattern with `.dockerignore` semantics
/// (`**` across any number of directories, including none), lets the pivot itself hold
/// wildcards, and requires a wildcard-free source to exist.
#[test]
fn parents_pivot_double_star_and_wildcard_pivots() {
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "x/y/a.txt", "a", 0o644);
    write(c.path(), "x/y/b.md", "b", 0o644);
    write(c.path(), "x/y/sub/c.txt", "c", 0o644);
    mkdir(c.path(), "x/y", 0o750);
    write(c.path(), "deep/g.txt", "g", 0o644);
    write(c.path(), "deep/h.md", "h", 0o644);
    write(c.path(), "deep/d1/d2/f.txt", "f", 0o600);
    mkdir(c.path(), "deep/d1", 0o711);
    write(c.path(), "t/a/b/c/d/e/bay", "bay", 0o644);
    write(c.path(), "t/a/b/c/d/foo", "foo", 0o644);
    write(c.path(), "t/a/b2/c/d/e/bar", "bar", 0o644);
    write(c.path(), "t/a/other/c/d/e/no", "no", 0o644);
    let d = base_root();
    let par = |a: CopyAction| CopyAction { parents: true, ..a };
    run(
        d.path(),
        &ctx(c.path()),
        vec![
            par(cp("./x/./y/*.txt", "/p1/")),
            par(cp("deep/**/*.txt", "/p2/")),
            par(cp("/t/a/b*/./c/**/e", "/p3/")),
            par(cp("./x/y/sub", "/p4")),
            par(cp("x/y/*.none", "/p5/")),
        ],
    )
    .unwrap();
    let t = tree(d.path());
    let got: String = ["p1", "p2", "p3", "p4", "p5"]
        .iter()
        .map(|p| show(&t, p))
        .collect();
    let want = r##"p1: dir 755 0:0
p1/y: dir 750 0:0
p1/y/a.txt: file 644 0:0 "a"
p2: dir 755 0:0
p2/deep: dir 755 0:0
p2/deep/d1: dir 711 0:0
p2/deep/d1/d2: dir 755 0:0
p2/deep/d1/d2/f.txt: file 600 0:0 "f"
p2/deep/g.txt: file 644 0:0 "g"
p3: dir 755 0:0
p3/c: dir 755 0:0
p3/c/d: dir 755 0:0
p3/c/d/e: dir 755 0:0
p3/c/d/e/bar: file 644 0:0 "bar"
p3/c/d/e/bay: file 644 0:0 "bay"
p4: dir 755 0:0
p4/x: dir 755 0:0
p4/x/y: dir 750 0:0
p4/x/y/sub: dir 755 0:0
p4/x/y/sub/c.txt: file 644 0:0 "c"
p5: dir 755 0:0
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
    let missing = run(d.path(), &ctx(c.path()), vec![par(cp("x/./nope.txt", "/p6/"))]).unwrap_err();
    assert_eq!(missing.to_string(), "\"/x/nope.txt\": not found");
}

/// `--chmod` also applies to the directories a COPY creates for its destination (BuildKit since
/// fsutil's fix for moby/buildkit#4945), verbatim (no umask); existing ones keep their mode.
#[test]
fn chmod_applies_to_created_destination_directories() {
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "f", "f", 0o644);
    write(c.path(), "dir/g", "g", 0o644);
    let d = base_root();
    let with = |a: CopyAction, m: Chmod| CopyAction { mode: Some(m), ..a };
    run(
        d.path(),
        &ctx(c.path()),
        vec![
            with(cp("/f", "/new/deep/f"), Chmod::Octal(0o640)),
            with(cp("/dir", "/made/"), Chmod::Octal(0o777)),
            with(cp("/f", "/tmp/sub/"), Chmod::Symbolic("go-rx".into())),
        ],
    )
    .unwrap();
    let t = tree(d.path());
    let got: String = ["new", "made", "tmp"].iter().map(|p| show(&t, p)).collect();
    let want = r##"new: dir 640 0:0
new/deep: dir 640 0:0
new/deep/f: file 640 0:0 "f"
made: dir 777 0:0
made/g: file 777 0:0 "g"
tmp: dir 755 0:0
tmp/sub: dir 700 0:0
tmp/sub/f: file 600 0:0 "f"
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
}

fn tar_bytes(entries: &[(&str, tar::EntryType, &[u8], u32, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data, mode, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_577_836_800);
        h.set_size(data.len() as u64);
        {
            // Raw names: the builder's path helpers refuse `..` and absolute names.
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn bundle() -> Vec<u8> {
    tar_bytes(&[
        ("pkg/", tar::EntryType::Directory, b"", 0o755, ""),
        ("pkg/a", tar::EntryType::Regular, b"a\n", 0o644, ""),
        ("pkg/bin", tar::EntryType::Regular, b"#!/bin/sh\n", 0o755, ""),
    ])
}

#[test]
fn add_archives_case() {
    let c = tempfile::tempdir().unwrap();
    let tarball = bundle();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tarball).unwrap();
    fs::write(c.path().join("bundle.tar.gz"), gz.finish().unwrap()).unwrap();
    let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    bz.write_all(&tarball).unwrap();
    fs::write(c.path().join("b.tbz"), bz.finish().unwrap()).unwrap();
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(&tarball).unwrap();
    fs::write(c.path().join("x.txz"), xz.finish().unwrap()).unwrap();
    fs::write(
        c.path().join("z.tzst"),
        zstd::encode_all(&tarball[..], 3).unwrap(),
    )
    .unwrap();
    fs::write(c.path().join("plain.tar"), &tarball).unwrap();
    write(c.path(), "plain.txt", "plain\n", 0o644);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"not a tar").unwrap();
    fs::write(c.path().join("notar.gz"), gz.finish().unwrap()).unwrap();
    let d = base_root();
    run(
        d.path(),
        &ctx(c.path()),
        vec![
            add("/bundle.tar.gz", "/x/"),
            add("/plain.txt", "/p/"),
            add("/bundle.tar.gz", "/"),
            add("/b.tbz", "/bz"),
            add("/x.txz", "/xz"),
            add("/z.tzst", "/zst/"),
            add("/plain.tar", "/pt"),
            add("/notar.gz", "/n/"),
            cp("/bundle.tar.gz", "/copied/"),
        ],
    )
    .unwrap();
    let t = tree(d.path());
    let got: String = ["x", "p", "pkg"].iter().map(|p| show(&t, p)).collect();
    let want = r##"x: dir 755 0:0
x/pkg: dir 755 0:0
x/pkg/a: file 644 0:0 "a\n"
x/pkg/bin: file 755 0:0 "#!/bin/sh\n"
p: dir 755 0:0
p/plain.txt: file 644 0:0 "plain\n"
pkg: dir 755 0:0
pkg/a: file 644 0:0 "a\n"
pkg/bin: file 755 0:0 "#!/bin/sh\n"
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
    for dir in ["bz", "xz", "zst", "pt"] {
        assert_eq!(t[&format!("{dir}/pkg/a")], "file 644 0:0 \"a\\n\"", "{dir}");
    }
    assert!(
        t["n/notar.gz"].starts_with("file 644"),
        "a non-tar is copied as it is"
    );
    assert!(
        t["copied/bundle.tar.gz"].starts_with("file"),
        "COPY never extracts"
    );
}

#[test]
fn archive_entries_cannot_escape() {
    let host = tempfile::tempdir().unwrap();
    let dest = host.path().join("rootfs");
    fs::create_dir(&dest).unwrap();
    let c = tempfile::tempdir().unwrap();
    let evil = tar_bytes(&[
        ("../../evil", tar::EntryType::Regular, b"1", 0o644, ""),
        ("/abs/file", tar::EntryType::Regular, b"2", 0o644, ""),
        ("esc", tar::EntryType::Symlink, b"", 0o777, "/"),
        ("esc/through", tar::EntryType::Regular, b"3", 0o644, ""),
        ("up", tar::EntryType::Symlink, b"", 0o777, "../../../.."),
        ("up/through2", tar::EntryType::Regular, b"4", 0o644, ""),
        ("hl", tar::EntryType::Link, b"", 0o644, "../../abs/file"),
    ]);
    fs::write(c.path().join("evil.tar"), evil).unwrap();
    run(
        &dest,
        &ctx(c.path()),
        vec![CopyAction {
            owner: owner("5", Some("6")),
            ..add("/evil.tar", "/out")
        }],
    )
    .unwrap();
    let t = tree(host.path());
    assert!(t.keys().all(|k| k.starts_with("rootfs")), "{t:?}");
    let got = show(&t, "rootfs/out");
    let want = r##"rootfs/out: dir 755 5:6
rootfs/out/abs: dir 755 0:0
rootfs/out/abs/file: file 644 0:0 "2"
rootfs/out/esc: link -> / 0:0
rootfs/out/evil: file 644 0:0 "1"
rootfs/out/hl: file 644 0:0 "2"
rootfs/out/through: file 644 0:0 "3"
rootfs/out/through2: file 644 0:0 "4"
rootfs/out/up: link -> ../../../.. 0:0
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
}

#[test]
fn mkdir_mkfile_rm() {
    // workdir-user-owner: WORKDIR creates missing parents owned by the current USER.
    let d = base_root();
    let mk = |path: &str, o: Option<Owner>| {
        FileAction::Mkdir(MkdirAction {
            path: path.into(),
            mode: 0o755,
            make_parents: true,
            owner: o,
        })
    };
    let actions = vec![
        mk("/srv/app/data", owner("1234", Some("5678"))),
        mk("/srv/app/data/more", owner("app", None)),
        mk("/srv", None),
        mk("/srv/app/data/more/root-owned", None),
        FileAction::Mkfile(MkfileAction {
            path: "/srv/hello".into(),
            mode: 0o4640,
            data: "hi\n".into(),
            owner: owner("app", None),
        }),
        FileAction::Mkdir(MkdirAction {
            path: "/single".into(),
            mode: 0o700,
            make_parents: false,
            owner: owner("9", None),
        }),
    ];
    apply(d.path(), &[], &actions, &FileOpOptions::default()).unwrap();
    let t = tree(d.path());
    let got: String = ["srv", "single"].iter().map(|p| show(&t, p)).collect();
    let want = r##"srv: dir 755 1234:5678
srv/app: dir 755 1234:5678
srv/app/data: dir 755 1234:5678
srv/app/data/more: dir 755 1000:1000
srv/app/data/more/root-owned: dir 755 0:0
srv/hello: file 640 1000:1000 "hi\n"
single: dir 700 9:9
"##;
    assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");

    // mkfile follows a symlink at its path inside the root (as BuildKit's RootPath does) and
    // replaces the file there by a rename: the old inode is never opened.
    symlink("/tmp/../../target", d.path().join("lnk")).unwrap();
    write(d.path(), "target", "old", 0o600);
    let mkf = FileAction::Mkfile(MkfileAction {
        path: "/lnk".into(),
        mode: 0o644,
        data: "new".into(),
        owner: None,
    });
    apply(d.path(), &[], &[mkf], &FileOpOptions::default()).unwrap();
    let t = tree(d.path());
    assert_eq!(t["lnk"], "link -> /tmp/../../target 0:0");
    assert_eq!(t["target"], "file 644 0:0 \"new\"");
    let err = apply(
        d.path(),
        &[],
        &[FileAction::Mkfile(MkfileAction {
            path: "/".into(),
            mode: 0o644,
            data: String::new(),
            owner: None,
        })],
        &FileOpOptions::default(),
    );
    assert!(matches!(err, Err(FileOpError::IsRoot { .. })));

    // rm: wildcards, missing paths, symlinks removed not followed.
    write(d.path(), "tmp/a.log", "", 0o644);
    write(d.path(), "tmp/b.log", "", 0o644);
    write(d.path(), "tmp/keep", "", 0o644);
    symlink("/usr", d.path().join("tmp/usrlink")).unwrap();
    let rm = |p: &str, nf: bool, wc: bool| {
        FileAction::Rm(RmAction {
            path: p.into(),
            allow_not_found: nf,
            allow_wildcard: wc,
        })
    };
    apply(
        d.path(),
        &[],
        &[
            rm("/tmp/*.log", false, true),
            rm("/tmp/usrlink", false, false),
            rm("/nope", true, false),
        ],
        &FileOpOptions::default(),
    )
    .unwrap();
    let t = tree(d.path());
    assert_eq!(show(&t, "tmp"), "tmp: dir 755 0:0\ntmp/keep: file 644 0:0 \"\"\n");
    assert!(d.path().join("usr/bin").is_dir());
    let err = apply(
        d.path(),
        &[],
        &[rm("/nope", false, false)],
        &FileOpOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "\"/nope\": not found");
}

#[test]
fn timestamp_option_sets_times() {
    let c = tempfile::tempdir().unwrap();
    write(c.path(), "dir/f", "f", 0o644);
    let d = base_root();
    let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    let actions = vec![FileAction::Copy(cp("/dir", "/out/"))];
    apply(
        d.path(),
        &ctx(c.path()),
        &actions,
        &FileOpOptions {
            timestamp: Some(t),
            ..FileOpOptions::default()
        },
    )
    .unwrap();
    for p in ["out", "out/f"] {
        assert_eq!(
            fs::symlink_metadata(d.path().join(p))
                .unwrap()
                .modified()
                .unwrap(),
            t,
            "{p}"
        );
    }
}

#[test]
fn copies_a_large_tree_quickly() {
    let c = tempfile::tempdir().unwrap();
    for i in 0..200 {
        let dir = c.path().join(format!("d{i:03}"));
        fs::create_dir(&dir).unwrap();
        for j in 0..100 {
            fs::write(dir.join(format!("f{j:03}")), format!("{i}-{j}")).unwrap();
        }
    }
    let d = base_root();
    let start = std::time::Instant::now();
    run(d.path(), &ctx(c.path()), vec![cp("/", "/big/")]).unwrap();
    let took = start.elapsed();
    eprintln!("copied 20000 files in {took:?}");
    assert_eq!(
        fs::read_to_string(d.path().join("big/d123/f045")).unwrap(),
        "123-45"
    );
    assert_eq!(fs::read_dir(d.path().join("big")).unwrap().count(), 200);
    // Well under a second on an idle machine; the bound leaves room for a loaded one.
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
}

#[test]
fn deep_trees_keep_every_entry_and_every_hard_link_group() {
    // Deeper than the levels listed in parallel, with hard links across sibling subtrees, across
    // the parallel and the sequential levels, and excluded names at every depth.
    let stage = tempfile::tempdir().unwrap();
    let s = stage.path();
    let mut deep = String::from("s");
    for level in 0..9 {
        deep = format!("{deep}/l{level}");
        mkdir(s, &deep, 0o750 + (level % 2) * 5);
        for side in ["a", "b", "c"] {
            write(
                s,
                &format!("{deep}/{side}-{level}.txt"),
                &format!("{side}{level}"),
                0o644,
            );
            write(
                s,
                &format!("{deep}/{side}/f{level}"),
                &format!("{side}/{level}"),
                0o600,
            );
            write(s, &format!("{deep}/{side}/skip.tmp"), "x", 0o600);
        }
    }
    let link = |from: &str, to: &str| fs::hard_link(s.join(from), s.join(to)).unwrap();
    link("s/l0/a/f0", "s/l0/b/linked-a0");
    link("s/l0/a/f0", "s/l0/l1/l2/l3/l4/l5/c/linked-a0");
    link("s/l0/l1/l2/l3/l4/l5/l6/l7/b/f7", "s/l0/c/linked-b7");
    link(
        "s/l0/l1/l2/l3/l4/l5/l6/b/f6",
        "s/l0/l1/l2/l3/l4/l5/l6/l7/l8/a/linked-b6",
    );
    let d = base_root();
    let ex = CopyAction {
        exclude: vec!["**/*.tmp".into()],
        ..cp("/s", "/out")
    };
    run(d.path(), &[SourceRoot::filesystem(s)], vec![ex]).unwrap();

    let want: BTreeMap<String, String> = tree(s)
        .into_iter()
        .filter(|(k, _)| k.starts_with("s/") && !k.ends_with(".tmp"))
        .map(|(k, v)| (format!("out{}", &k[1..]), v))
        .collect();
    let got: BTreeMap<String, String> = tree(d.path())
        .into_iter()
        .filter(|(k, _)| k.starts_with("out/"))
        .collect();
    assert_eq!(got, want);

    // The same names share an inode as in the source, and no others.
    let groups = |root: &Path, prefix: &str| {
        let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for rel in tree(root).keys().filter(|k| k.starts_with(prefix)) {
            let m = fs::symlink_metadata(root.join(rel)).unwrap();
            if m.is_file() {
                by_ino
                    .entry(m.ino())
                    .or_default()
                    .push(rel[prefix.len()..].to_string());
            }
        }
        let mut g: Vec<Vec<String>> = by_ino.into_values().filter(|v| v.len() > 1).collect();
        g.sort();
        g
    };
    let source_groups = groups(s, "s/");
    assert_eq!(source_groups.len(), 3, "{source_groups:?}");
    assert_eq!(groups(d.path(), "out/"), source_groups);

    // Excluded directories are walked for what a later pattern takes back, and only the
    // directories above something taken are created.
    let ex = CopyAction {
        exclude: vec!["**/l1".into(), "!**/l6/a/f6".into()],
        ..cp("/s", "/part")
    };
    run(d.path(), &[SourceRoot::filesystem(s)], vec![ex]).unwrap();
    let got: Vec<String> = tree(d.path())
        .into_keys()
        .filter(|k| k.starts_with("part/") && k.contains("/l1"))
        .collect();
    let chain = "part/l0/l1/l2/l3/l4/l5/l6";
    let mut want: Vec<String> = (1..=6)
        .map(|n| chain.split('/').take(n + 2).collect::<Vec<_>>().join("/"))
        .collect();
    want.extend([format!("{chain}/a"), format!("{chain}/a/f6")]);
    assert_eq!(got, want);
}
