//! Flattened views (`KILN_FLATTEN_AFTER`): a RUN over more layers than the threshold mounts the
//! layers above the last multiple of it plus one flattened view of the ones below. What the step
//! sees must be exactly what the stack shows, no snapshot's file may change through a view, and
//! the views go with the snapshots they cover.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{busybox_env, frame, Env};

/// A chain whose steps delete files, replace a directory by a file and a file by a directory,
/// remove and recreate a directory (opaque), change modes, owners and times, make hard links
/// and symlinks, then (after `ARG N`, so only that step is rebuilt when N changes) list the
/// whole tree into `/listing.txt`, which the last stage exports.
const CHAIN: &str = r#"FROM busybox:local AS chain
RUN mkdir -p /a/b/c /d/sub /e/x && echo one > /a/b/c/f && echo keep > /a/k && echo x > /d/file && echo y > /d/sub/y && echo h > /h1 && ln /h1 /h2 && ln -s /a/k /sym
RUN rm /a/k && echo 2 > /two && echo e > /e/x/in
RUN rm -rf /d && mkdir /d && echo new > /d/newfile
RUN rm -rf /e && echo now-a-file > /e
RUN rm /two && mkdir /two && echo inner > /two/in
RUN chmod 0750 /a/b && chown 123:456 /a/b/c/f && chmod 4755 /a/b/c/f && touch -d @1000000 /a/b/c
RUN ln -s ../a/b/c/f /a/rel && ln /a/b/c/f /a/hard && rm /bin/vi
RUN echo more >> /h2
RUN mkdir -p /deep/x/y && echo z > /deep/x/y/z && mkfifo /deep/fifo
RUN rm -rf /deep/x && mkdir /deep/x && touch /deep/x/again && chown 7:8 /deep/x
RUN rm /sym && ln -s /d /sym && rm /deep/fifo
RUN echo 12 > /n12 && rm -rf /usr
RUN echo 13 > /n13 && rm /n12 && mkdir -p /usr/lib && echo back > /usr/lib/back
RUN rm -rf /two && echo file-again > /two && chmod 600 /etc/passwd
RUN echo 15 > /n15 && mkdir /d/more && touch -d @2000000 /d
RUN rm /n13 /n15 && ln /a/hard /a/hard2
ARG N
RUN echo $N >/dev/null && find / -xdev -mindepth 1 \( -path /proc -o -path /sys -o -path /dev -o -path /tmp -o -path /etc/hosts -o -path /etc/hostname -o -path /etc/resolv.conf -o -path /listing.txt \) -prune -o -print | sort > /tmp/names && xargs stat -c '%n|%F|%a|%u|%g|%s|%Y|%N' < /tmp/names > /listing.txt && while read -r p; do if [ -f "$p" ] && [ ! -L "$p" ]; then md5sum "$p"; fi; done < /tmp/names >> /listing.txt && xargs stat -c '%i %n' < /tmp/names | sort -n | awk '{ if ($1 == last) line = line " " $2; else { if (line ~ / /) print line; line = $2 } last = $1 } END { if (line ~ / /) print line }' | sort >> /listing.txt
FROM scratch
COPY --from=chain /listing.txt /
"#;

fn context(env: &Env, dockerfile: &str) -> PathBuf {
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    ctx
}

/// Builds `ctx` with `KILN_FLATTEN_AFTER=after` and returns the exported `/listing.txt`.
fn listing(env: &Env, ctx: &Path, after: &str, n: &str, no_cache: bool) -> String {
    let dest = env.path(&format!("out-{after}-{n}"));
    let mut cmd = env.kiln(&["build", "-q"]);
    if no_cache {
        cmd.arg("--no-cache");
    }
    cmd.args(["--build-arg", &format!("N={n}"), "-o"])
        .arg(format!("type=local,dest={}", dest.display()))
        .arg(ctx)
        .env("KILN_FLATTEN_AFTER", after);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "build failed\n{}", frame(&out));
    std::fs::read_to_string(dest.join("listing.txt")).unwrap()
}

fn flat_views(env: &Env) -> Vec<PathBuf> {
    match std::fs::read_dir(env.root().join("snapshots/flat")) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Every line but the times of what the RUN steps made (two builds made them at other times).
fn without_times(listing: &str) -> String {
    listing
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            if f.len() == 8 {
                format!("{}|{}|{}|{}|{}|{}|{}", f[0], f[1], f[2], f[3], f[4], f[5], f[7])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_step_over_a_flattened_view_sees_exactly_what_the_layer_stack_shows() {
    let env = busybox_env();
    let ctx = context(&env, CHAIN);
    // Without flattening: the reference.
    let plain = listing(&env, &ctx, "1000", "a", true);
    assert!(flat_views(&env).is_empty(), "nothing was flattened at 1000");
    assert!(plain.contains("/e|regular file|"), "{plain}");
    assert!(plain.contains("/d/newfile|"), "{plain}");
    assert!(!plain.contains("/d/file|"), "the directory was opaque: {plain}");
    assert!(!plain.contains("/bin/vi|"), "{plain}");
    assert!(plain.contains("/a/b/c/f|regular file|4755|123|456|"), "{plain}");
    assert!(
        plain.contains(" /a/b/c/f ") || plain.contains(" /a/hard"),
        "hard links: {plain}"
    );

    // The same chain (cached), with only the listing step run again over flattened views of
    // every multiple of 3 layers: every name, type, mode, owner, size, time, link target,
    // content and hard-link group is the same.
    let flat = listing(&env, &ctx, "3", "b", false);
    assert!(
        !flat_views(&env).is_empty(),
        "the listing step used flattened views"
    );
    assert_eq!(flat, plain);
    // Another threshold cuts elsewhere (4, 8, 12, 16 layers).
    assert_eq!(listing(&env, &ctx, "4", "c", false), plain);

    // Every step of the chain run over flattened views makes the same tree (its own times).
    let rebuilt = listing(&env, &ctx, "2", "d", true);
    assert_eq!(without_times(&rebuilt), without_times(&plain));

    // No snapshot's or view's file changed through a view: `/h1` and `/h2` were one inode in the
    // first step's snapshot and `echo more >> /h2` ran over views that link that inode.
    let mut seen = 0;
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(env.root().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("fs"))
        .collect();
    dirs.extend(flat_views(&env).into_iter().map(|v| v.join("fs")));
    for d in dirs {
        if let Ok(text) = std::fs::read_to_string(d.join("h1")) {
            assert_eq!(text, "h\n", "{}", d.display());
            seen += 1;
        }
    }
    assert!(
        seen >= 3,
        "h1 found in the first snapshots and the views ({seen})"
    );

    // Pruning removes the views with the snapshots they cover.
    env.ok(&["builder", "prune", "-af"]);
    env.ok(&["system", "prune", "-af"]);
    assert!(flat_views(&env).is_empty(), "{:?}", flat_views(&env));
}

#[test]
fn a_run_over_more_than_500_layers_works() {
    let env = busybox_env();
    let mut df = String::from("FROM busybox:local AS chain\n");
    for i in 0..520 {
        df.push_str(&format!("RUN echo {i} > /f{}\n", i % 7));
    }
    df.push_str("RUN cat /f0 /f6 > /last\nFROM scratch\nCOPY --from=chain /last /\n");
    let ctx = context(&env, &df);
    let dest = env.path("out");
    let out = env
        .kiln(&["build", "-q", "-o"])
        .arg(format!("type=local,dest={}", dest.display()))
        .arg(&ctx)
        .env_remove("KILN_FLATTEN_AFTER")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", frame(&out));
    // Step i writes /f(i % 7): the last writes of /f0 and /f6 were steps 518 and 517.
    assert_eq!(std::fs::read_to_string(dest.join("last")).unwrap(), "518\n517\n");
}

#[test]
fn a_killed_flattening_leaves_no_half_view() {
    let env = busybox_env();
    let mut df = String::from("FROM busybox:local\n");
    for i in 0..40 {
        df.push_str(&format!("RUN echo {i} > /f{i}\n"));
    }
    let ctx = context(&env, &df);
    for delay_ms in [150u64, 300, 600] {
        let mut child = env
            .kiln(&["build", "-q", "--no-cache"])
            .arg(&ctx)
            .env("KILN_FLATTEN_AFTER", "2")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(child.id().to_string())
            .status();
        let _ = child.wait();
        // Every published view is whole: its record is written before the rename.
        for v in flat_views(&env) {
            assert!(v.join("meta.json").is_file(), "{}", v.display());
            assert!(v.join("fs/bin/busybox").exists(), "{}", v.display());
        }
    }
    // The next command removes the killed builds' temps (a half view among them).
    env.ok(&["images"]);
    let tmp: Vec<_> = std::fs::read_dir(env.root().join("snapshots/tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(tmp.is_empty(), "stale temps left: {tmp:?}");
    // And a build over the views left behind works.
    let out = env
        .kiln(&["build", "-q"])
        .arg(&ctx)
        .env("KILN_FLATTEN_AFTER", "2")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", frame(&out));
}

#[test]
fn a_bad_threshold_is_an_error() {
    let env = busybox_env();
    let ctx = context(&env, "FROM busybox:local\nRUN true\n");
    let out = env
        .kiln(&["build", "-q"])
        .arg(&ctx)
        .env("KILN_FLATTEN_AFTER", "one")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("KILN_FLATTEN_AFTER: `one`"), "{err}");
}
