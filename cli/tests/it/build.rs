//! `kiln build` end to end: real namespaces, overlayfs and the store. Needs root.

use std::path::Path;

use crate::harness::{busybox_env, frame, Env};

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn setup() -> (Env, std::path::PathBuf) {
    let env = busybox_env();
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    (env, ctx)
}

fn build(env: &Env, ctx: &Path, tag: &str, extra: &[&str]) -> String {
    let mut args = vec!["build", "--progress=plain", "-t", tag];
    args.extend_from_slice(extra);
    let ctx = ctx.to_str().unwrap();
    args.push(ctx);
    let out = env.ok(&args);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `kiln run --rm IMAGE ARGS...` stdout.
fn run(env: &Env, image: &str, args: &[&str]) -> String {
    let mut a = vec!["run", "--rm", "--network", "none", image];
    a.extend_from_slice(args);
    String::from_utf8(env.ok(&a).stdout).unwrap()
}

/// The image's layer diff IDs.
pub(crate) fn layers(env: &Env, image: &str) -> Vec<String> {
    let out = env.ok(&["inspect", image]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["RootFS"]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn builds_and_runs_a_two_stage_image() {
    let (env, ctx) = setup();
    write(&ctx, "Dockerfile", "FROM busybox:local AS b\nWORKDIR /src\nCOPY hello.txt .\nRUN tr a-z A-Z < hello.txt > up.txt\n\nFROM busybox:local\nCOPY --from=b /src/up.txt /up.txt\nCMD [\"cat\", \"/up.txt\"]\n");
    write(&ctx, "hello.txt", "hello\n");
    build(&env, &ctx, "t/two", &[]);
    assert_eq!(run(&env, "t/two", &[]), "HELLO\n");
}

#[test]
fn unchanged_rebuild_runs_nothing_and_touch_keeps_cache() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nCOPY a.txt /a.txt\nRUN cat /proc/sys/kernel/random/uuid > /stamp\n",
    );
    write(&ctx, "a.txt", "a\n");
    build(&env, &ctx, "t/c", &[]);
    let first = layers(&env, "t/c");
    let stamp = run(&env, "t/c", &["cat", "/stamp"]);
    let log = build(&env, &ctx, "t/c", &[]);
    assert!(log.contains("CACHED"), "second build should be cached:\n{log}");
    assert_eq!(layers(&env, "t/c"), first);
    // A new mtime is not a change.
    let f = std::fs::File::options()
        .write(true)
        .open(ctx.join("a.txt"))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(60))
        .unwrap();
    build(&env, &ctx, "t/c", &[]);
    assert_eq!(layers(&env, "t/c"), first);
    assert_eq!(run(&env, "t/c", &["cat", "/stamp"]), stamp);
    // --no-cache runs the step again.
    build(&env, &ctx, "t/c", &["--no-cache"]);
    assert_ne!(run(&env, "t/c", &["cat", "/stamp"]), stamp);
}

#[test]
fn changing_one_file_reruns_only_steps_after_its_copy() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nCOPY a.txt /a.txt\nRUN cat /proc/sys/kernel/random/uuid > /s1\nCOPY b.txt /b.txt\nRUN cat /proc/sys/kernel/random/uuid > /s2\n",
    );
    write(&ctx, "a.txt", "a\n");
    write(&ctx, "b.txt", "b\n");
    build(&env, &ctx, "t/e", &[]);
    let before = run(&env, "t/e", &["cat", "/s1", "/s2"]);
    write(&ctx, "b.txt", "B\n");
    build(&env, &ctx, "t/e", &[]);
    let after = run(&env, "t/e", &["cat", "/s1", "/s2"]);
    let (b1, b2) = before.split_once('\n').unwrap();
    let (a1, a2) = after.split_once('\n').unwrap();
    assert_eq!(a1, b1, "the step before COPY b.txt must stay cached");
    assert_ne!(a2, b2, "the step after COPY b.txt must run again");
    assert_eq!(run(&env, "t/e", &["cat", "/b.txt"]), "B\n");
}

#[test]
fn build_arg_of_one_stage_leaves_the_other_cached() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local AS a\nRUN cat /proc/sys/kernel/random/uuid > /a\n\
         FROM busybox:local AS b\nARG X\nRUN echo $X > /b && cat /proc/sys/kernel/random/uuid >> /b\n\
         FROM busybox:local\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n",
    );
    build(&env, &ctx, "t/arg", &["--build-arg", "X=1"]);
    let a1 = run(&env, "t/arg", &["cat", "/a"]);
    let b1 = run(&env, "t/arg", &["cat", "/b"]);
    build(&env, &ctx, "t/arg", &["--build-arg", "X=2"]);
    assert_eq!(run(&env, "t/arg", &["cat", "/a"]), a1);
    let b2 = run(&env, "t/arg", &["cat", "/b"]);
    assert_ne!(b2, b1);
    assert!(b2.starts_with("2\n"), "{b2}");
}

#[test]
fn independent_stages_run_at_the_same_time() {
    let (env, ctx) = setup();
    let stage = |n: u32| {
        format!("FROM busybox:local AS s{n}\nRUN cut -d' ' -f1 /proc/uptime > /t{n} && sleep 1 && cut -d' ' -f1 /proc/uptime >> /t{n}\n")
    };
    write(
        &ctx,
        "Dockerfile",
        &format!(
            "{}{}FROM busybox:local\nCOPY --from=s1 /t1 /t1\nCOPY --from=s2 /t2 /t2\n",
            stage(1),
            stage(2)
        ),
    );
    build(&env, &ctx, "t/par", &["--jobs", "2"]);
    // /proc/uptime is not namespaced: both stages read the same clock.
    let parse = |s: String| -> (f64, f64) {
        let mut it = s.lines().map(|l| l.trim().parse::<f64>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    let (s1, e1) = parse(run(&env, "t/par", &["cat", "/t1"]));
    let (s2, e2) = parse(run(&env, "t/par", &["cat", "/t2"]));
    assert!(
        s1 < e2 && s2 < e1,
        "the two sleeps did not overlap: {s1}-{e1} vs {s2}-{e2}"
    );
}

#[test]
fn failing_build_leaves_nothing_behind() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nRUN echo partial > /p && sleep 0.2 && exit 3\n",
    );
    let out = env
        .kiln(&["build", "--progress=plain", "-t", "t/f", ctx.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "build should fail\n{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not complete successfully: exit code: 3"),
        "{err}"
    );
    assert!(err.contains("Dockerfile:2"), "the error names the line:\n{err}");
    let root = env.root();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(root.to_str().unwrap()),
        "mounts left behind:\n{mounts}"
    );
    let tmp = root.join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    let snap_tmp = root.join("snapshots/tmp");
    let left: Vec<_> = std::fs::read_dir(&snap_tmp)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.iter().all(|p| p.extension().is_some_and(|e| e == "lock")),
        "temporary snapshots left: {left:?}"
    );
    // No process of the build survives (they ran `sleep` in the container).
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read_to_string(p.path().join("cmdline")) {
            assert!(
                !cmd.contains("sleep\u{0}0.2"),
                "leftover process {}",
                p.path().display()
            );
        }
    }
}

#[test]
fn copy_outside_context_fails_with_the_line() {
    let (env, ctx) = setup();
    write(&ctx, "Dockerfile", "FROM busybox:local\n\nCOPY ../x /x\n");
    let err = env.fails(&["build", "-t", "t/o", ctx.to_str().unwrap()]);
    assert!(err.contains("Dockerfile:3"), "{err}");
}

#[test]
fn parse_errors_name_file_line_and_column() {
    let (env, ctx) = setup();
    write(&ctx, "Dockerfile", "FROM busybox:local\nCOPY --bogus=1 a /a\n");
    let err = env.fails(&["build", "-t", "t/p", ctx.to_str().unwrap()]);
    assert!(err.contains("Dockerfile:2:"), "{err}");
}

#[test]
fn dockerfile_specific_dockerignore_wins_over_the_contexts() {
    let (env, ctx) = setup();
    write(&ctx, "build/app.Dockerfile", "FROM busybox:local\nCOPY . /c/\n");
    write(&ctx, "build/app.Dockerfile.dockerignore", "secret.txt\n");
    write(&ctx, ".dockerignore", "public.txt\n");
    write(&ctx, "secret.txt", "s\n");
    write(&ctx, "public.txt", "p\n");
    let df = ctx.join("build/app.Dockerfile");
    build(&env, &ctx, "t/ign", &["-f", df.to_str().unwrap()]);
    let listing = run(&env, "t/ign", &["ls", "/c"]);
    assert!(
        listing.contains("public.txt"),
        "the context's .dockerignore must not apply:\n{listing}"
    );
    assert!(
        !listing.contains("secret.txt"),
        "app.Dockerfile.dockerignore must apply:\n{listing}"
    );
    // Without the Dockerfile-specific file, the context's .dockerignore applies.
    write(&ctx, "Dockerfile", "FROM busybox:local\nCOPY . /c/\n");
    build(&env, &ctx, "t/ign2", &[]);
    let listing = run(&env, "t/ign2", &["ls", "/c"]);
    assert!(
        !listing.contains("public.txt") && listing.contains("secret.txt"),
        "{listing}"
    );
}

#[test]
fn bind_mount_of_the_context_hides_dockerignored_paths() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nRUN --mount=type=bind,target=/ctx find /ctx | sort > /seen\n",
    );
    write(&ctx, ".dockerignore", "secret.txt\nlogs\n!logs/keep.txt\n");
    write(&ctx, "secret.txt", "s\n");
    write(&ctx, "app.txt", "a\n");
    write(&ctx, "logs/keep.txt", "k\n");
    write(&ctx, "logs/drop.txt", "d\n");
    build(&env, &ctx, "t/bindign", &[]);
    let seen = run(&env, "t/bindign", &["cat", "/seen"]);
    assert!(
        seen.contains("/ctx/app.txt") && seen.contains("/ctx/logs/keep.txt"),
        "{seen}"
    );
    assert!(
        !seen.contains("secret.txt") && !seen.contains("drop.txt"),
        "{seen}"
    );
    // The context itself is untouched and the view is gone.
    assert!(ctx.join("secret.txt").exists() && ctx.join("logs/drop.txt").exists());
}

/// Committed snapshots that carry a copy's file index, oldest first.
fn indexed_snapshots(env: &Env) -> Vec<std::path::PathBuf> {
    let mut v: Vec<(std::time::SystemTime, std::path::PathBuf)> =
        std::fs::read_dir(env.root().join("snapshots"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("files.att").is_file())
            .map(|p| {
                (
                    std::fs::metadata(p.join("meta.json"))
                        .unwrap()
                        .modified()
                        .unwrap(),
                    p,
                )
            })
            .collect();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

#[test]
fn copy_links_unchanged_files_and_writes_the_layer_a_fresh_store_writes() {
    use std::os::unix::fs::MetadataExt;
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nCOPY . /ctx/\nRUN cat /ctx/src/a /ctx/src/b > /ab\n",
    );
    for i in 0..40 {
        write(&ctx, &format!("src/d{}/f{i}", i % 4), &format!("file {i}"));
    }
    write(&ctx, "src/a", "a");
    write(&ctx, "src/b", "b");
    write(&ctx, "src/dup1", "same");
    write(&ctx, "src/dup2", "same");
    build(&env, &ctx, "t/l", &[]);
    let first = layers(&env, "t/l");
    // An edit and a deleted file: a result that cannot be stacked on the first (see
    // `an_edited_copy_is_kept_as_its_changes_over_the_earlier_result`) links its files.
    write(&ctx, "src/b", "B");
    std::fs::remove_file(ctx.join("src/d3/f3")).unwrap();
    build(&env, &ctx, "t/l", &[]);
    let second = layers(&env, "t/l");
    assert_ne!(first[1], second[1]);
    assert_eq!(run(&env, "t/l", &["cat", "/ab"]), "aB");

    // The second result shares the unchanged files' inodes with the first; the changed file
    // and two identical files are inodes of their own.
    let snaps = indexed_snapshots(&env);
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    let ino = |s: &Path, rel: &str| std::fs::metadata(s.join("fs/ctx").join(rel)).unwrap().ino();
    assert_eq!(ino(&snaps[0], "src/a"), ino(&snaps[1], "src/a"));
    assert_eq!(ino(&snaps[0], "src/d1/f5"), ino(&snaps[1], "src/d1/f5"));
    assert_eq!(ino(&snaps[0], "Dockerfile"), ino(&snaps[1], "Dockerfile"));
    assert_ne!(ino(&snaps[0], "src/b"), ino(&snaps[1], "src/b"));
    assert_ne!(ino(&snaps[1], "src/dup1"), ino(&snaps[1], "src/dup2"));
    // Each records where its files sit in its tar: the second copied the linked files' entries
    // from the first's tar (and still wrote the layer a fresh store writes, below).
    assert!(snaps.iter().all(|s| s.join("tar.att").is_file()), "{snaps:?}");

    // A fresh store (nothing to link from) writes the same COPY layer.
    let fresh = Env::new();
    fresh.with_busybox();
    build(&fresh, &ctx, "t/l", &[]);
    assert_eq!(layers(&fresh, "t/l")[1], second[1]);

    // --no-cache copies again, finds the same tree as the last result and keeps that one:
    // the same layer, no new COPY snapshot, nothing left in the temp dirs.
    let out = build(&env, &ctx, "t/l", &["--no-cache"]);
    assert!(!out.contains("CACHED"), "{out}");
    assert_eq!(layers(&env, "t/l")[1], second[1]);
    assert_eq!(indexed_snapshots(&env), snaps);
    let left: Vec<_> = std::fs::read_dir(env.root().join("snapshots/tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_none_or(|e| e != "lock"))
        .collect();
    assert!(left.is_empty(), "temporary snapshots left: {left:?}");
    assert_eq!(run(&env, "t/l", &["cat", "/ab"]), "aB");

    // Every file links, but a directory's mode changed: a different tree, a new layer, the one
    // a fresh store writes.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(ctx.join("src/d1"), std::fs::Permissions::from_mode(0o700)).unwrap();
    build(&env, &ctx, "t/l", &["--no-cache"]);
    let third = layers(&env, "t/l");
    assert_ne!(third[1], second[1]);
    build(&fresh, &ctx, "t/l", &["--no-cache"]);
    assert_eq!(layers(&fresh, "t/l")[1], third[1]);
    assert_eq!(
        run(&env, "t/l", &["stat", "-c", "%a", "/ctx/src/d1"]).trim(),
        "700"
    );
}

/// An edit that keeps a file's size, inode and modification time (`touch -r` restoring the old
/// time) is still an edit: the stat cache and the linked copy see the changed ctime, hash the
/// file again, and the image holds the new content, in the layer a fresh store writes.
#[test]
fn edit_with_size_and_mtime_kept_reaches_the_image_after_a_linked_copy() {
    use std::os::unix::fs::MetadataExt;
    let (env, ctx) = setup();
    write(&ctx, "Dockerfile", "FROM busybox:local\nCOPY . /ctx/\n");
    for i in 0..30 {
        write(&ctx, &format!("src/d{}/f{i}", i % 3), &format!("file {i}"));
    }
    write(&ctx, "src/b", "old!");
    build(&env, &ctx, "t/touch", &[]);
    assert_eq!(run(&env, "t/touch", &["cat", "/ctx/src/b"]), "old!");
    let first = layers(&env, "t/touch");

    let b = ctx.join("src/b");
    let reference = env.path("times-of-b");
    std::fs::write(&reference, "").unwrap();
    let touch = |args: &[&Path]| {
        let st = std::process::Command::new("touch")
            .arg("-r")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success());
    };
    touch(&[&b, &reference]);
    let before = std::fs::metadata(&b).unwrap();
    // Rewritten in place (same inode), same size, then its times put back.
    std::fs::write(&b, "new!").unwrap();
    touch(&[&reference, &b]);
    let after = std::fs::metadata(&b).unwrap();
    assert_eq!(
        (before.ino(), before.len(), before.mtime(), before.mtime_nsec()),
        (after.ino(), after.len(), after.mtime(), after.mtime_nsec())
    );

    build(&env, &ctx, "t/touch", &[]);
    assert_eq!(run(&env, "t/touch", &["cat", "/ctx/src/b"]), "new!");
    let second = layers(&env, "t/touch");
    assert_ne!(first[1], second[1]);
    let fresh = Env::new();
    fresh.with_busybox();
    build(&fresh, &ctx, "t/touch", &[]);
    assert_eq!(layers(&fresh, "t/touch")[1], second[1]);
}

/// An edited COPY writes only its new bytes: its layer is kept as a recipe (ranges of the last
/// result's blob and a fragment). Verify, inspect, a cache export read it in place; a save
/// writes it out, checked against its diff ID: the tar a fresh store writes.
#[test]
fn an_edited_copys_layer_is_a_recipe_until_its_bytes_are_needed() {
    let (env, ctx) = setup();
    write(&ctx, "Dockerfile", "FROM busybox:local\nCOPY . /ctx/\n");
    for i in 0..200 {
        write(&ctx, &format!("src/d{}/f{i}", i % 7), &"x".repeat(3000 + i));
    }
    let hex = |diff: &str| diff.trim_start_matches("sha256:").to_string();
    let lazy = |diff: &str| env.root().join("recipes/sha256").join(hex(diff)).is_file();
    let plain = |diff: &str| env.root().join("blobs/sha256").join(hex(diff)).is_file();
    build(&env, &ctx, "t/lazy", &[]);
    let first = layers(&env, "t/lazy");
    assert!(
        plain(&first[1]) && !lazy(&first[1]),
        "nothing to reuse: the tar is written"
    );

    write(&ctx, "src/d3/f10", "edited");
    build(&env, &ctx, "t/lazy", &[]);
    let second = layers(&env, "t/lazy");
    assert_ne!(second[1], first[1]);
    assert!(
        lazy(&second[1]) && !plain(&second[1]),
        "an edit reusing entries writes no tar"
    );
    // Docker's sizes (inspect, images, history) read it in place.
    let size = |image: &str| env.inspect(image)["Size"].as_u64().unwrap();
    assert!(size("t/lazy") > 200 * 3000, "{}", size("t/lazy"));
    assert!(lazy(&second[1]));
    env.ok(&["tag", "t/lazy", "t/second"]);
    assert_eq!(run(&env, "t/lazy", &["cat", "/ctx/src/d3/f10"]), "edited");
    // verify hashes the recipe's bytes without writing them.
    let out = env.ok(&["store", "verify"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"), "{out:?}");
    assert!(lazy(&second[1]));

    // Again, from a lazy last result: the recipe reads the plain blobs, never the lazy one.
    write(&ctx, "src/d5/f12", "edited too");
    build(&env, &ctx, "t/lazy", &[]);
    let third = layers(&env, "t/lazy");
    assert!(lazy(&third[1]) && !plain(&third[1]));
    let recipe = std::fs::read(env.root().join("recipes/sha256").join(hex(&third[1]))).unwrap();
    let raw: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex(&second[1])[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert!(
        !recipe.windows(32).any(|w| w == raw),
        "a recipe names a lazy blob"
    );
    let fresh = Env::new();
    fresh.with_busybox();
    build(&fresh, &ctx, "t/lazy", &[]);
    assert_eq!(
        layers(&fresh, "t/lazy")[1],
        third[1],
        "not the layer a fresh store writes"
    );

    // A save needs the bytes: written, checked, and loadable elsewhere.
    let saved = env.path("second.tar");
    env.ok(&["save", "-o", saved.to_str().unwrap(), "t/second"]);
    assert!(plain(&second[1]) && !lazy(&second[1]));
    let other = Env::new();
    other.ok(&["load", "-i", saved.to_str().unwrap()]);
    assert_eq!(layers(&other, "t/second"), second);
    // The second's fragment is now named by the third's recipe only: a prune keeps it.
    env.ok(&["image", "prune", "-f"]);
    // A cache export streams it from its recipe (checked against its digest), uncompressed
    // or compressed, and leaves it lazy.
    for (name, compression) in [("plain", "uncompressed"), ("gz", "gzip"), ("zst", "zstd")] {
        let cache = env.path(&format!("cache-{name}"));
        let dest = format!(
            "type=local,dest={},compression={compression},mode=max",
            cache.display()
        );
        build(&env, &ctx, "t/lazy", &["--cache-to", &dest]);
        assert!(lazy(&third[1]) && !plain(&third[1]));
        // Imported into a fresh store, the cache gives the layer (its diff ID checked there).
        let other = Env::new();
        other.with_busybox();
        let src = format!("type=local,src={}", cache.display());
        let out = build(&other, &ctx, "t/lazy", &["--cache-from", &src]);
        assert!(out.contains("CACHED"), "{out}");
        assert_eq!(layers(&other, "t/lazy")[1], third[1]);
        if compression == "uncompressed" {
            assert!(cache.join("blobs/sha256").join(hex(&third[1])).is_file());
        }
    }
    env.ok(&["store", "verify"]);

    // Nothing kept: nothing left, recipes and fragments included.
    env.ok(&["rmi", "t/lazy", "t/second"]);
    env.ok(&["image", "prune", "-a", "-f"]);
    env.ok(&["builder", "prune", "-a", "-f"]);
    for dir in ["blobs/sha256", "recipes/sha256"] {
        let left: Vec<_> = std::fs::read_dir(env.root().join(dir))
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "{dir}: {left:?}");
    }
}

/// The parent recorded for the build snapshot holding layer `diff` (`None` for one that stands
/// alone); panics when there is no such snapshot.
pub(crate) fn snapshot_parent(env: &Env, diff: &str) -> Option<String> {
    for e in std::fs::read_dir(env.root().join("snapshots")).unwrap().flatten() {
        let Ok(bytes) = std::fs::read(e.path().join("meta.json")) else {
            continue;
        };
        let meta: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        if meta["diff_id"] == diff {
            return meta["parent"].as_str().map(str::to_string);
        }
    }
    panic!("no snapshot holds {diff}");
}

/// The key of the snapshot holding layer `diff`.
pub(crate) fn snapshot_key(env: &Env, diff: &str) -> String {
    for e in std::fs::read_dir(env.root().join("snapshots")).unwrap().flatten() {
        let Ok(bytes) = std::fs::read(e.path().join("meta.json")) else {
            continue;
        };
        let meta: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        if meta["diff_id"] == diff {
            return format!("sha256:{}", e.file_name().to_str().unwrap());
        }
    }
    panic!("no snapshot holds {diff}");
}

#[test]
fn an_edited_copy_is_kept_as_its_changes_over_the_earlier_result() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local AS app
         COPY . /ctx/
         RUN find /ctx | sort > /list && cat /ctx/src/d3/f10 /ctx/src/d5/f12 > /seen
         FROM busybox:local
         COPY --from=app /ctx/src /src
",
    );
    for i in 0..200 {
        write(&ctx, &format!("src/d{}/f{i}", i % 7), &format!("{i}").repeat(50));
    }
    std::fs::create_dir_all(ctx.join("empty")).unwrap();
    std::os::unix::fs::symlink("d1/f1", ctx.join("src/link")).unwrap();
    // The copy's layer, the app stage's result and the final image, against a fresh store's.
    let check = |what: &str| -> Vec<String> {
        build(&env, &ctx, "t/app", &["--target", "app"]);
        build(&env, &ctx, "t/final", &[]);
        let fresh = Env::new();
        fresh.with_busybox();
        build(&fresh, &ctx, "t/app", &["--target", "app"]);
        build(&fresh, &ctx, "t/final", &[]);
        let ours = layers(&env, "t/app");
        assert_eq!(
            ours[1],
            layers(&fresh, "t/app")[1],
            "{what}: not a fresh store's layer"
        );
        assert_eq!(layers(&env, "t/final"), layers(&fresh, "t/final"), "{what}");
        assert_eq!(
            run(&env, "t/app", &["cat", "/list"]),
            run(&fresh, "t/app", &["cat", "/list"]),
            "{what}: a RUN over the copy sees another tree"
        );
        assert_eq!(
            run(&env, "t/app", &["cat", "/seen"]),
            run(&fresh, "t/app", &["cat", "/seen"]),
            "{what}"
        );
        ours
    };
    let first = check("first build");
    assert_eq!(snapshot_parent(&env, &first[1]), None);
    let bottom = snapshot_key(&env, &first[1]);

    write(&ctx, "src/d3/f10", "edited");
    let second = check("an edit");
    assert_eq!(
        snapshot_parent(&env, &second[1]).as_deref(),
        Some(bottom.as_str()),
        "an edit is kept over the earlier result"
    );
    assert_eq!(run(&env, "t/final", &["cat", "/src/d3/f10"]), "edited");

    // A second edit and a new file: still over the first result, not over the second.
    write(&ctx, "src/d5/f12", "edited too");
    write(&ctx, "src/d9/new", "new");
    let third = check("a second edit");
    assert_eq!(snapshot_parent(&env, &third[1]).as_deref(), Some(bottom.as_str()));
    assert_eq!(
        run(
            &env,
            "t/app",
            &["cat", "/ctx/src/d3/f10", "/ctx/src/d5/f12", "/ctx/src/d9/new"]
        ),
        "editededited toonew"
    );

    // Nothing names the first result now but the one kept over it: prunes keep it.
    env.ok(&["image", "prune", "-f"]);
    env.ok(&["builder", "prune", "-a", "-f"]);
    assert!(env.root().join("snapshots").join(&bottom[7..]).is_dir());
    assert_eq!(run(&env, "t/app", &["cat", "/ctx/src/d1/f1"]), "1".repeat(50));
    let out = env.ok(&["store", "verify"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"), "{out:?}");

    // A deleted file cannot be expressed over the earlier tree: the result stands alone.
    std::fs::remove_file(ctx.join("src/d2/f2")).unwrap();
    let fourth = check("a deletion");
    assert_eq!(snapshot_parent(&env, &fourth[1]), None);
    // And the next edit is kept over that one.
    write(&ctx, "src/d4/f4", "again");
    let fifth = check("an edit after a deletion");
    assert_eq!(
        snapshot_parent(&env, &fifth[1]),
        Some(snapshot_key(&env, &fourth[1]))
    );

    // A bottom tree gone (a repair, a crash) leaves the result above it absent: it is unpacked
    // again from its layer, whole.
    let bottom = snapshot_key(&env, &fourth[1]);
    std::fs::remove_dir_all(env.root().join("snapshots").join(&bottom[7..])).unwrap();
    assert_eq!(run(&env, "t/app", &["cat", "/ctx/src/d4/f4"]), "again");
    assert_eq!(snapshot_parent(&env, &fifth[1]), None);
    check("after the bottom tree was lost");
}

#[test]
fn copy_link_from_a_stage_links_its_files_unless_it_changes_them() {
    use std::os::unix::fs::MetadataExt;
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local AS a\n\
         RUN mkdir -p /data/sub && echo one > /data/one && echo two > /data/sub/two \
         && chmod 640 /data/one && chown 12:34 /data/sub/two && ln /data/one /data/hard\n\
         FROM busybox:local\n\
         COPY --link --from=a /data /copy\n\
         COPY --link --from=a --chown=5:6 /data/sub /owned\n\
         COPY --from=a /data/sub /plain\n\
         RUN stat -c '%n %h %a %u:%g' /copy/one /copy/hard /copy/sub/two /owned/two /plain/two > /stat\n",
    );
    build(&env, &ctx, "t/m", &[]);
    assert_eq!(
        run(&env, "t/m", &["cat", "/stat"]),
        "/copy/one 2 640 0:0\n/copy/hard 2 640 0:0\n/copy/sub/two 2 644 12:34\n/owned/two 1 644 5:6\n\
         /plain/two 1 644 12:34\n"
    );
    // /copy/sub/two is the stage's own file (two names: the stage's and the copy's); the
    // hard-linked pair is a pair of the copy's own; the chowned copy is a file of its own.
    let snaps = env.root().join("snapshots");
    let inodes = |rel: &str| -> Vec<u64> {
        std::fs::read_dir(&snaps)
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::symlink_metadata(e.path().join("fs").join(rel)).ok())
            .map(|m| m.ino())
            .collect()
    };
    // (`kiln run` may unpack the image's --link layers again under the image's chain IDs:
    // those copies are inodes of their own, so each check looks for the stage's inode.)
    let stage = inodes("data/sub/two");
    assert_eq!(stage.len(), 1);
    let has_stage = |rel: &str, ino: u64| inodes(rel).contains(&ino);
    assert!(has_stage("copy/sub/two", stage[0]));
    let one = inodes("data/one");
    assert_eq!(one.len(), 1);
    assert!(!has_stage("copy/one", one[0]));
    assert!(!has_stage("owned/two", stage[0]));
    // A plain COPY --from writes its files, as BuildKit does (a RUN sees one link).
    assert!(!has_stage("plain/two", stage[0]));
}

#[test]
fn cached_rebuild_keeps_the_image_id_and_history_times() {
    let (env, ctx) = setup();
    write(&ctx, "f", "1");
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nENV B=0\nRUN echo hi > /x\nENV A=1\nCOPY f /f\nCMD [\"sh\"]\n",
    );
    let id = |env: &Env| env.inspect("t/h")["Id"].as_str().unwrap().to_string();
    let history = |env: &Env| -> Vec<String> {
        let out = env.ok(&["save", "t/h"]);
        let mut archive = tar::Archive::new(&out.stdout[..]);
        let mut files = std::collections::HashMap::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            files.insert(path, data);
        }
        let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        let config = &files[manifest[0]["Config"].as_str().unwrap()];
        let v: serde_json::Value = serde_json::from_slice(config).unwrap();
        let mut times: Vec<String> = v["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["created"].as_str().unwrap().to_string())
            .collect();
        times.push(v["created"].as_str().unwrap().to_string());
        times
    };
    build(&env, &ctx, "t/h", &[]);
    let (id1, h1) = (id(&env), history(&env));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    build(&env, &ctx, "t/h", &[]);
    assert_eq!(id(&env), id1, "a fully cached rebuild is the same image");
    // Dated as BuildKit dates them: ENV B and ENV A by the RUN's layer, CMD by the COPY's, the
    // image by the last entry.
    assert_eq!(h1[1], h1[2]);
    assert_eq!(h1[3], h1[2]);
    assert_eq!(h1[5], h1[4]);
    assert_eq!(h1[6], h1[5]);

    write(&ctx, "f", "2");
    build(&env, &ctx, "t/h", &[]);
    let h2 = history(&env);
    assert_ne!(id(&env), id1);
    assert_eq!(h2[..4], h1[..4], "the cached steps keep their times");
    assert!(h2[4] > h1[4], "the COPY ran again: {h2:?}");
    assert_eq!(h2[6], h2[4]);
}

/// How many times the RUN steps of a build ran: each appends a line to a file in a cache mount,
/// which outlives builds (and `--no-cache`) in the store.
fn runs(env: &Env) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(env.root().join("cache/mounts")).unwrap() {
        let p = e.unwrap().path().join("runs");
        if let Ok(text) = std::fs::read_to_string(p) {
            n += text.lines().count();
        }
    }
    n
}

const COUNTED: &str = "FROM busybox:local AS src\n\
ARG V=1\n\
RUN --mount=type=cache,id=counter,target=/counter echo src >> /counter/runs && echo payload$V > /payload\n\
FROM busybox:local\n\
COPY --from=src /payload /payload\n\
COPY f.txt /f.txt\n\
RUN --mount=type=cache,id=counter,target=/counter echo final >> /counter/runs && cat /payload /f.txt > /out\n";

/// #17.3 (a): a `--no-cache` build records what it made under the keys a plain build looks up,
/// so the next plain build runs nothing (a `COPY --from` used to run again).
#[test]
fn no_cache_build_records_its_results_for_the_next_build() {
    let (env, ctx) = setup();
    write(&ctx, "Dockerfile", COUNTED);
    write(&ctx, "f.txt", "f\n");
    build(&env, &ctx, "t/nc", &[]);
    assert_eq!(runs(&env), 2);
    build(&env, &ctx, "t/nc", &["--no-cache"]);
    assert_eq!(runs(&env), 4);
    let log = build(&env, &ctx, "t/nc", &[]);
    assert_eq!(
        runs(&env),
        4,
        "the build after --no-cache ran steps again:\n{log}"
    );
}

/// #17.3 (b): `COPY --from` is keyed by the content of what it copies: a source stage that runs
/// again and gives the same files leaves the COPY and every step after it cached; different
/// files run them again.
#[test]
fn copy_from_is_keyed_by_the_files_it_copies() {
    let (env, ctx) = setup();
    write(&ctx, "Dockerfile", COUNTED);
    write(&ctx, "f.txt", "f\n");
    build(&env, &ctx, "t/cf", &[]);
    let image = layers(&env, "t/cf");
    assert_eq!(runs(&env), 2);
    // The source stage runs again (new layer: new mtimes), giving the same /payload.
    let log = build(&env, &ctx, "t/cf", &["--no-cache-filter", "src"]);
    assert_eq!(runs(&env), 3, "only the source stage's RUN may run:\n{log}");
    assert_eq!(layers(&env, "t/cf"), image, "the image must be the cached one");
    // The source stage gives another /payload: the COPY and the RUN after it run.
    build(&env, &ctx, "t/cf", &["--build-arg", "V=2"]);
    assert_eq!(runs(&env), 5);
    assert_eq!(run(&env, "t/cf", &["cat", "/out"]), "payload2\nf\n");
    // Back to V=1: everything is in the cache again.
    build(&env, &ctx, "t/cf", &["--build-arg", "V=1"]);
    assert_eq!(runs(&env), 5);
    assert_eq!(layers(&env, "t/cf"), image);
}

/// #17.3 (c): the build context is read on every build, so `[internal] load build context` is
/// never shown as CACHED, least of all when files changed.
#[test]
fn load_build_context_is_never_cached() {
    let (env, ctx) = setup();
    write(&ctx, "Dockerfile", COUNTED);
    write(&ctx, "f.txt", "f\n");
    build(&env, &ctx, "t/lc", &[]);
    for change in ["f\n", "changed\n"] {
        write(&ctx, "f.txt", change);
        let log = build(&env, &ctx, "t/lc", &[]);
        let num = log
            .lines()
            .find_map(|l| l.strip_suffix(" [internal] load build context"))
            .unwrap_or_else(|| panic!("no load build context step:\n{log}"))
            .to_string();
        assert!(!log.lines().any(|l| l == format!("{num} CACHED")), "{log}");
        assert!(
            log.lines().any(|l| l.starts_with(&format!("{num} DONE"))),
            "{log}"
        );
    }
    assert_eq!(run(&env, "t/lc", &["cat", "/out"]), "payload1\nchanged\n");
    assert_eq!(runs(&env), 3, "only the RUN after the changed COPY runs again");
}

/// #16.11: `COPY --parents` keeps the path after the first `/./` (the pivot may hold
/// wildcards) and `**` matches any depth; `--chmod` also gives the directories COPY creates
/// for the destination its mode (as BuildKit does since fsutil's fix), not existing ones.
#[test]
fn copy_parents_pivot_double_star_and_chmod_on_created_dirs() {
    let (env, ctx) = setup();
    write(&ctx, "x/y/a.txt", "a\n");
    write(&ctx, "x/y/sub/b.txt", "b\n");
    write(&ctx, "x/z/c.md", "c\n");
    write(&ctx, "x/w/d.txt", "d\n");
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\n\
         COPY --parents ./x/./y/*.txt /pivot/\n\
         COPY --parents ./x/./*/*.txt /wild/\n\
         COPY --parents x/**/*.txt /deep/\n\
         COPY --chmod=700 x/z/c.md /new/dir/\n\
         RUN mkdir -m 755 /old\n\
         COPY --chmod=700 x/z/c.md /old/\n",
    );
    build(&env, &ctx, "t/parents", &[]);
    let found = run(
        &env,
        "t/parents",
        &["sh", "-c", "find /pivot /wild /deep -type f | sort; stat -c '%a %n' /new /new/dir /new/dir/c.md /old /old/c.md"],
    );
    assert_eq!(
        found,
        "/deep/x/w/d.txt\n/deep/x/y/a.txt\n/deep/x/y/sub/b.txt\n\
         /pivot/y/a.txt\n\
         /wild/w/d.txt\n/wild/y/a.txt\n\
         700 /new\n700 /new/dir\n700 /new/dir/c.md\n755 /old\n700 /old/c.md\n"
    );
}
