//! The store under faults and its garbage collection: temps of killed commands, the build cache
//! (`builder du/prune`, `system df/prune`, the automatic GC), prunes beside saves, pushes, runs
//! and builds, 16 builds at once, a full disk, and the short chaos loop. Real processes, real
//! kills. These tests need root.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{busybox_env, eventually, frame, require_root, workspace, Env};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// xorshift64*, seeded from the clock (the seed is printed so a failure can be replayed).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("KILN_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("random seed {seed} (KILN_TEST_SEED replays it)");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// Bytes on disk under `path` as `du` counts them.
fn du(path: &Path) -> u64 {
    let out = Command::new("du")
        .arg("-s")
        .arg("-B1")
        .arg(path)
        .output()
        .expect("du");
    assert!(out.status.success(), "du {}\n{}", path.display(), frame(&out));
    stdout(&out)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du prints a number")
}

/// Temps in the store and `.NAME.kiln-*` files in `beside` (where saves write), with their sizes.
fn temps(root: &Path, beside: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let dirs = [
        root.join("ingest"),
        root.join("tmp"),
        root.join("tmp/outside"),
        root.join("snapshots/tmp"),
        root.join("cache/index/.tmp"),
    ];
    for d in &dirs {
        for e in fs::read_dir(d).into_iter().flatten().flatten() {
            if e.path() != root.join("tmp/outside") {
                out.push(e.path());
            }
        }
    }
    for d in [
        root.to_path_buf(),
        root.join("cache/mounts"),
        beside.to_path_buf(),
    ] {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if (n.starts_with("images.json.") && n.ends_with(".tmp")) || n.contains(".kiln-") {
                out.push(e.path());
            }
        }
    }
    out.into_iter()
        .map(|p| {
            let n = if p.exists() { du(&p) } else { 0 };
            (p, n)
        })
        .collect()
}

/// Waits until no orphaned step of a killed build holds a store path (without PR_SET_PDEATHSIG
/// a killed build's RUN runs to its end; its locks keep its temps live until then).
fn wait_for_orphans(env: &Env) {
    eventually(20, "orphaned build steps to finish", || {
        let out = env.kiln(&["store", "verify"]).output().unwrap();
        !String::from_utf8_lossy(&out.stderr).contains(" mount ")
    });
}

/// Starts kiln with its output captured.
fn spawn(env: &Env, args: &[&str]) -> Child {
    env.kiln(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln")
}

/// Runs `args` and returns how long it took (it must succeed).
fn timed(env: &Env, args: &[&str]) -> Duration {
    let t = Instant::now();
    env.ok(args);
    t.elapsed()
}

fn write_context(dir: &Path, dockerfile: &str) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
}

/// #21.4: kill -9 of build, load, save and commit at random points leaves temps, and the next
/// command (whatever it is) removes every byte of them.
#[test]
fn killed_commands_leave_no_temp_data_past_the_next_command() {
    let env = busybox_env();
    let mut rng = Rng::new();
    let ctx = env.path("ctx");
    write_context(
        &ctx,
        "FROM busybox:local\nARG N=0\nRUN dd if=/dev/urandom of=/a bs=1M count=24 2>/dev/null && echo $N > /n\nCOPY . /c\n",
    );
    fs::write(ctx.join("f"), vec![7u8; 1 << 20]).unwrap();
    let ctx_s = ctx.to_str().unwrap().to_string();
    env.ok(&["build", "-q", "-t", "big", &ctx_s]);
    let tar = env.path("big.tar");
    let tar_s = tar.to_str().unwrap().to_string();
    let out_s = env.path("out.tar").to_str().unwrap().to_string();
    env.ok(&["save", "-o", &tar_s, "big"]);
    env.ok(&[
        "run",
        "-d",
        "--name",
        "keeper",
        "busybox:local",
        "sh",
        "-c",
        "dd if=/dev/urandom of=/d bs=1M count=16 2>/dev/null; sleep 1000",
    ]);
    eventually(20, "the container to write its data", || {
        env.kiln(&["diff", "keeper"])
            .output()
            .is_ok_and(|o| stdout(&o).contains("/d"))
    });
    // How long each command takes, so that the kills land while it runs.
    let mut took = [Duration::ZERO; 4];
    let mut n = 100;
    let args = |op: usize, n: usize| -> Vec<String> {
        match op {
            0 => vec![
                "build".into(),
                "-q".into(),
                "--build-arg".into(),
                format!("N={n}"),
                "-t".into(),
                format!("b:{n}"),
                ctx_s.clone(),
            ],
            1 => vec!["load".into(), "-q".into(), "-i".into(), tar_s.clone()],
            2 => vec!["save".into(), "-o".into(), out_s.clone(), "big".into()],
            _ => vec!["commit".into(), "keeper".into(), format!("c:{n}")],
        }
    };
    for (op, t) in took.iter_mut().enumerate() {
        n += 1;
        let a = args(op, n);
        *t = timed(&env, &a.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let (mut kills, mut tries, mut left, mut most) = (0, 0, 0u64, 0u64);
    while kills < 20 {
        tries += 1;
        assert!(tries < 200, "the kills do not land");
        let op = (tries % 4) as usize;
        n += 1;
        let a = args(op, n);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut child = spawn(&env, &a);
        let window = took[op].as_millis() as u64;
        std::thread::sleep(Duration::from_millis(window / 20 + rng.below(window * 9 / 10)));
        if child.try_wait().unwrap().is_some() {
            continue;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        let bytes: u64 = temps(&env.root(), env.dir.path()).iter().map(|t| t.1).sum();
        left += bytes;
        most = most.max(bytes);
        wait_for_orphans(&env);
        // The next command.
        env.ok(&["images", "-q"]);
        let after = temps(&env.root(), env.dir.path());
        assert!(
            after.is_empty(),
            "kill {kills} ({a:?}) left temps past the next command: {after:?}"
        );
    }
    eprintln!("figure: {kills} kills left {left} temp bytes in all (at most {most} at once); 0 after the next command");
    assert!(
        left > 0,
        "no kill landed while a temp existed; the test measures nothing"
    );
    let out = env.ok(&["store", "verify"]);
    assert!(stdout(&out).contains(": ok"), "{}", frame(&out));
    env.ok(&["rm", "-f", "keeper"]);
}

/// `builder du`'s entries as (ID, reclaimable, size, last accessed).
fn du_rows(env: &Env) -> (Vec<Vec<String>>, String) {
    let out = stdout(&env.ok(&["builder", "du"]));
    let rows = out
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("Shared:") && !l.starts_with("Reclaimable:"))
        .map(|l| {
            l.split('\t')
                .filter(|c| !c.is_empty())
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    (rows, out)
}

/// The "Total:" of `builder du`, in bytes (from `--verbose` sizes is not needed: the summary).
fn cache_total(env: &Env) -> String {
    let out = stdout(&env.ok(&["builder", "du"]));
    out.lines()
        .find_map(|l| l.strip_prefix("Total:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn parse_human(s: &str) -> f64 {
    let s = s.trim().trim_end_matches('*');
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("not a size: {s}"));
    n * match unit {
        "B" => 1.0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        other => panic!("unit {other}"),
    }
}

/// Whether the `--progress plain` log shows the step whose line contains `step` as CACHED.
fn step_cached(log: &str, step: &str) -> bool {
    log.lines()
        .filter(|l| l.contains(step))
        .filter_map(|l| l.split_whitespace().next())
        .any(|n| log.lines().any(|l| l == format!("{n} CACHED")))
}

fn df_row(env: &Env, kind: &str) -> Vec<String> {
    let out = stdout(&env.ok(&["system", "df"]));
    let line = out
        .lines()
        .find(|l| l.starts_with(kind))
        .unwrap_or_else(|| panic!("no {kind} row:\n{out}"));
    line[kind.len()..].split_whitespace().map(String::from).collect()
}

/// #21.5 + #14.6: the build cache is listed with real figures, pruned with Docker's semantics
/// without touching what a tagged image, a container or a running build uses, kept under a budget
/// automatically, and after every prune the store is back to (near) empty.
#[test]
fn build_cache_is_listed_pruned_and_every_byte_reclaimed() {
    let env = busybox_env();
    let empty_root = du(&env.root());
    // Stage `b` makes 8 MB that only the build cache keeps; the cache mount 3 MB.
    let ctx = env.path("ctx");
    write_context(
        &ctx,
        "FROM busybox:local AS b\nARG N=0\nRUN dd if=/dev/urandom of=/big bs=1M count=8 2>/dev/null && echo $N > /n\n\
         FROM busybox:local\nARG N=0\nCOPY --from=b /n /n\n\
         RUN --mount=type=cache,target=/cache dd if=/dev/zero of=/cache/c$N bs=1M count=3 2>/dev/null && echo $N > /m\n",
    );
    let c = ctx.to_str().unwrap();
    env.ok(&["build", "-q", "-t", "app", c]);
    let (rows, text) = du_rows(&env);
    assert!(rows.len() >= 4, "{text}");
    let verbose = stdout(&env.ok(&["builder", "du", "--verbose"]));
    assert!(verbose.contains("Type:\t\texec.cachemount"), "{verbose}");
    assert!(verbose.contains("RUN dd if=/dev/urandom"), "{verbose}");
    let total = parse_human(&cache_total(&env));
    assert!(total > 10e6, "8 MB of stage b and 3 MB of cache mount: {text}");
    let df = df_row(&env, "Build Cache");
    assert_eq!(df[0], rows.len().to_string(), "TOTAL counts the entries");
    assert!(
        (parse_human(&df[2]) - total).abs() < 1e5,
        "df and du agree: {df:?} {text}"
    );
    let dfv = stdout(&env.ok(&["system", "df", "-v"]));
    assert!(
        dfv.contains("Build cache usage: ") && dfv.contains("exec.cachemount"),
        "{dfv}"
    );

    // Without -a: the stage's layer and the mount go; what the tagged image shares stays.
    let out = stdout(&env.ok(&["builder", "prune", "-f"]));
    assert!(out.contains("Deleted build cache objects:"), "{out}");
    let reclaimed = parse_human(
        out.lines()
            .last()
            .unwrap()
            .trim_start_matches("Total reclaimed space:"),
    );
    assert!(reclaimed > 10e6, "{out}");
    let (rows, text) = du_rows(&env);
    assert!(
        rows.iter().all(|r| r[2].ends_with('*')),
        "only shared entries are left: {text}"
    );
    let ran = env.ok(&["run", "--rm", "app", "cat", "/n", "/m"]);
    assert_eq!(stdout(&ran), "0\n0\n");
    env.ok(&["store", "verify"]);

    // A container keeps its image's layers, even once the image is untagged and everything pruned.
    env.ok(&["run", "-d", "--name", "c1", "app", "sleep", "1000"]);
    env.ok(&["rmi", "-f", "app"]);
    env.ok(&["image", "prune", "-a", "-f"]);
    env.ok(&["builder", "prune", "-a", "-f"]);
    env.ok(&["stop", "-t", "0", "c1"]);
    env.ok(&["start", "c1"]);
    assert_eq!(stdout(&env.ok(&["exec", "c1", "cat", "/n"])), "0\n");
    env.ok(&["rm", "-f", "c1"]);

    // A running build: a prune waits for it, and its result is whole.
    env.with_busybox();
    env.ok(&["build", "-q", "-t", "app", c]);
    let slow = env.path("slow");
    write_context(
        &slow,
        "FROM app\nRUN sleep 2 && dd if=/dev/urandom of=/s bs=1M count=2 2>/dev/null\n",
    );
    let build = spawn(&env, &["build", "-q", "-t", "slow", slow.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(700));
    let prune = env.ok(&["builder", "prune", "-a", "-f"]);
    assert!(
        String::from_utf8_lossy(&prune.stderr).contains("waiting for running builds"),
        "{}",
        frame(&prune)
    );
    let out = build.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", frame(&out));
    env.ok(&["run", "--rm", "slow", "ls", "/s", "/n"]);
    env.ok(&["store", "verify"]);

    // until: nothing is older than an hour.
    let out = stdout(&env.ok(&["builder", "prune", "-a", "-f", "--filter", "until=1h"]));
    assert!(!out.contains("Deleted build cache objects"), "{out}");
    let err = env.fails(&["builder", "prune", "-f", "--filter", "label=x"]);
    assert!(err.contains("unknown key `label`"), "{err}");
    let err = env.fails(&["builder", "prune", "-f", "--keep-storage", "lots"]);
    assert!(err.contains("invalid size: 'lots'"), "{err}");

    // The budget: three builds of 8 MB of cache each (a stage the image does not keep: 4 MiB
    // unpacked and 4 MiB of layer tar), kept under 12 MB by the automatic GC; the last build's
    // cache is kept (least recently used goes first).
    env.ok(&["builder", "prune", "-a", "-f"]);
    let staged = env.path("staged");
    write_context(
        &staged,
        "FROM busybox:local AS b\nARG N=0\nRUN dd if=/dev/urandom of=/big bs=1M count=4 2>/dev/null && echo $N > /n\n\
         FROM busybox:local\nCOPY --from=b /n /n\n",
    );
    let st = staged.to_str().unwrap();
    for n in 1..=3 {
        let out = env
            .kiln(&[
                "build",
                "-q",
                "--build-arg",
                &format!("N={n}"),
                "-t",
                "staged",
                st,
            ])
            .env("KILN_GC_KEEP_STORAGE", "12MB")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", frame(&out));
        let total = parse_human(&cache_total(&env));
        assert!(
            total <= 12.0 * 1024.0 * 1024.0,
            "build {n}: {total} bytes of cache over the budget"
        );
        assert!(total > 8e6, "build {n}: its own cache is kept ({total} bytes)");
    }
    let again = env
        .kiln(&[
            "build",
            "--progress",
            "plain",
            "--build-arg",
            "N=3",
            "-t",
            "staged",
            st,
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(
        step_cached(&log, "RUN dd if=/dev/urandom"),
        "the newest cache survived:\n{log}"
    );
    let again = env
        .kiln(&[
            "build",
            "--progress",
            "plain",
            "--build-arg",
            "N=1",
            "-t",
            "staged",
            st,
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(
        !step_cached(&log, "RUN dd if=/dev/urandom"),
        "the oldest cache went:\n{log}"
    );

    // Every prune: the store is back to (near) empty, as `du` sees it.
    env.ok(&["builder", "prune", "-a", "-f"]);
    env.ok(&["image", "prune", "-a", "-f"]);
    let out = stdout(&env.ok(&["system", "prune", "-a", "--volumes", "-f"]));
    assert!(out.contains("Total reclaimed space:"), "{out}");
    let left = du(&env.root());
    let listing = Command::new("find").arg(env.root()).output().unwrap();
    assert!(
        left <= empty_root.max(64 << 10) + (32 << 10),
        "{left} bytes left in the store (an empty one: {empty_root}):\n{}",
        stdout(&listing)
    );
    let out = stdout(&env.ok(&["store", "verify"]));
    assert!(
        out.contains("checked 0 blobs, 0 images, 0 tags, 0 cache records, 0 snapshots: ok"),
        "{out}"
    );
}

/// #21.7: a prune waits for saves, pushes and container creations beside it: none of them
/// fails with a missing blob, and what they produce is whole.
#[test]
fn prune_waits_for_saves_pushes_and_runs() {
    let env = busybox_env();
    let ctx = env.path("ctx");
    write_context(
        &ctx,
        "FROM busybox:local\nRUN dd if=/dev/urandom of=/a bs=1M count=40 2>/dev/null && echo big > /n\n",
    );
    let c = ctx.to_str().unwrap();
    env.ok(&["build", "-q", "-t", "big", c]);
    let reg = crate::registry::Registry::start(None);
    for round in 0..3 {
        // save beside rmi + image prune -a.
        let tar = env.path(&format!("s{round}.tar"));
        let save = spawn(&env, &["save", "-o", tar.to_str().unwrap(), "big"]);
        std::thread::sleep(Duration::from_millis(30));
        let rmi = env.kiln(&["rmi", "big"]).output().unwrap();
        let prune = env.kiln(&["image", "prune", "-a", "-f"]).output().unwrap();
        let out = save.wait_with_output().unwrap();
        assert!(out.status.success(), "save beside rmi + prune:\n{}", frame(&out));
        assert!(prune.status.success(), "{}", frame(&prune));
        assert!(rmi.status.success(), "{}", frame(&rmi));
        let other = Env::new();
        let loaded = other.ok(&["load", "-i", tar.to_str().unwrap()]);
        assert!(
            stdout(&loaded).contains("Loaded image: big:latest"),
            "{}",
            frame(&loaded)
        );
        other.ok(&["store", "verify"]);
        env.ok(&["load", "-q", "-i", tar.to_str().unwrap()]);

        // push beside rmi + prune.
        let target = format!("{}/gc/big:{round}", reg.addr);
        env.ok(&["tag", "big", &target]);
        let push = spawn(&env, &["push", &target]);
        std::thread::sleep(Duration::from_millis(30));
        let _ = env.kiln(&["rmi", &target]).output().unwrap();
        let _ = env.kiln(&["rmi", "big"]).output().unwrap();
        let prune = env.kiln(&["image", "prune", "-a", "-f"]).output().unwrap();
        let out = push.wait_with_output().unwrap();
        assert!(out.status.success(), "push beside rmi + prune:\n{}", frame(&out));
        assert!(prune.status.success(), "{}", frame(&prune));
        let fresh = Env::new();
        fresh.ok(&["pull", &target]);
        fresh.ok(&["store", "verify"]);
        env.ok(&["load", "-q", "-i", tar.to_str().unwrap()]);

        // run beside rmi + prune: it runs, or the image was gone before it looked.
        let run = spawn(&env, &["run", "--rm", "--pull", "never", "big", "cat", "/n"]);
        std::thread::sleep(Duration::from_millis(10 * round));
        let _ = env.kiln(&["rmi", "big"]).output().unwrap();
        let prune = env.kiln(&["image", "prune", "-a", "-f"]).output().unwrap();
        assert!(prune.status.success(), "{}", frame(&prune));
        let out = run.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            (out.status.success() && stdout(&out) == "big\n")
                || err.contains("No such image")
                || err.contains("Unable to find image"),
            "run beside rmi + prune:\n{}",
            frame(&out)
        );
        env.ok(&["store", "verify"]);
        env.ok(&["load", "-q", "-i", tar.to_str().unwrap()]);
    }
}

/// #17.7: 16 builds at once on one store, four of them the same Dockerfile and tag, with `rmi`
/// and `system prune` beside them: every build succeeds (or fails with a clear error), and every
/// tag names a whole image. Tags start with `t`: `rmi` also takes an image ID prefix (as
/// Docker's does), and a tag such as `b3`, once removed, is a hex prefix that matched another
/// build's image about one run in 20.
#[test]
fn sixteen_builds_at_once_with_rmi_and_prune_beside() {
    let env = busybox_env();
    let mut builds = Vec::new();
    for i in 0..16 {
        // Builds 12..16 share one context and one tag.
        let (dir, tag) = if i >= 12 {
            (env.path("same"), "same:latest".to_string())
        } else {
            (env.path(&format!("c{i}")), format!("t{i}:latest"))
        };
        if !dir.exists() {
            write_context(
                &dir,
                // Staggered, so that tags appear while other builds still run.
                &format!(
                    "FROM busybox:local\nRUN echo {tag} > /id && dd if=/dev/urandom of=/r bs=64k count=8 2>/dev/null\nCOPY f /f\nRUN sleep {} && cat /id /f > /both\n",
                    i % 4
                ),
            );
            fs::write(dir.join("f"), format!("file of {tag}\n")).unwrap();
        }
        builds.push((tag, dir));
    }
    let children: Vec<(String, Child)> = builds
        .iter()
        .map(|(tag, dir)| {
            (
                tag.clone(),
                spawn(&env, &["build", "-q", "-t", tag, dir.to_str().unwrap()]),
            )
        })
        .collect();
    // Beside them, until they are done: removals of their tags, and prunes (which wait for them).
    let done = std::sync::atomic::AtomicBool::new(false);
    let (beside, results) = std::thread::scope(|scope| {
        let side = scope.spawn(|| {
            let mut out = Vec::new();
            let mut prunes = Vec::new();
            let mut round = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                round += 1;
                for args in [
                    vec!["rmi", "same"],
                    vec!["rmi", "-f", "t3"],
                    vec!["image", "prune", "-f", "--no-wait"],
                ] {
                    out.push((round, args.clone(), env.kiln(&args).output().unwrap()));
                }
                if round % 5 == 1 {
                    prunes.push((round, spawn(&env, &["system", "prune", "-f"])));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            for (round, p) in prunes {
                out.push((
                    round,
                    vec!["system", "prune", "-f"],
                    p.wait_with_output().unwrap(),
                ));
            }
            out
        });
        let results: Vec<(String, Output)> = children
            .into_iter()
            .map(|(tag, child)| (tag, child.wait_with_output().unwrap()))
            .collect();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (side.join().unwrap(), results)
    });
    for (tag, out) in results {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{tag}: {}", frame(&out));
        if !out.status.success() {
            assert!(
                err.starts_with("ERROR:") || err.starts_with("error:"),
                "{tag} failed without a clear error:\n{}",
                frame(&out)
            );
            eprintln!("build of {tag} failed (allowed, with a clear error): {err}");
        }
    }
    let mut tally: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (round, args, out) in &beside {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked"),
            "round {round} {args:?}: {}",
            frame(out)
        );
        if args[0] == "system" {
            assert!(out.status.success(), "{args:?}: {}", frame(out));
        } else if !out.status.success() {
            assert!(
                err.contains("no such image") || err.contains("running builds"),
                "{args:?}: {}",
                frame(out)
            );
        }
        let t = tally.entry(args.join(" ")).or_default();
        if out.status.success() {
            t.0 += 1;
        } else {
            t.1 += 1;
        }
    }
    eprintln!("beside the builds (succeeded, refused): {tally:?}");
    // Every tag left names a whole image.
    let tags: Vec<String> = stdout(&env.ok(&["images"]))
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 2 && f[0] != "<none>").then(|| format!("{}:{}", f[0], f[1]))
        })
        .collect();
    assert!(tags.len() >= 12, "{tags:?}");
    for tag in &tags {
        if tag == "busybox:local" {
            continue;
        }
        let out = env.ok(&["run", "--rm", tag, "cat", "/both"]);
        let name = tag.clone();
        assert_eq!(stdout(&out), format!("{name}\nfile of {name}\n"), "{tag}");
    }
    let out = env.ok(&["store", "verify"]);
    assert!(stdout(&out).contains(": ok"), "{}", frame(&out));
}

/// Unmounts a tmpfs when dropped.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// #17.9: on a small tmpfs store a build that writes more than fits fails with "no space left"
/// naming the step, and once space is freed the store verifies and the next build works.
#[test]
fn a_full_disk_fails_the_step_and_the_store_recovers() {
    require_root();
    let env = Env::new();
    let mnt = env.path("small");
    fs::create_dir_all(&mnt).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success(), "mount a tmpfs");
    let _guard = Tmpfs(mnt.clone());
    let root = mnt.join("root");
    let r = root.to_str().unwrap().to_string();
    let kiln = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(&r)
            .args(args)
            .output()
            .unwrap()
    };
    let tar = crate::harness::busybox_tar();
    let out = kiln(&["import", tar.to_str().unwrap(), "busybox:local"]);
    assert!(out.status.success(), "{}", frame(&out));
    // 30 MB fit in the step's layer but its tar does not fit beside it; 100 MB do not fit at all.
    for (name, mb) in [("tar", 30), ("run", 100)] {
        let ctx = env.path(name);
        write_context(
            &ctx,
            &format!("FROM busybox:local\nRUN dd if=/dev/zero of=/fill bs=1M count={mb}\n"),
        );
        let out = kiln(&["build", "--progress", "plain", "-t", name, ctx.to_str().unwrap()]);
        assert!(!out.status.success(), "{}", frame(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("No space left on device"), "{}", frame(&out));
        assert!(
            err.contains(&format!(
                "ERROR: failed to solve: [2/2] RUN dd if=/dev/zero of=/fill bs=1M count={mb}"
            )),
            "the error names the step:\n{err}"
        );
        let out = kiln(&["store", "verify"]);
        assert!(
            out.status.success() && stdout(&out).contains(": ok"),
            "{}",
            frame(&out)
        );
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("leftover"),
            "the failed build cleaned up: {}",
            frame(&out)
        );
    }
    // Space freed (the file system grows), the same builds work.
    let status = Command::new("mount")
        .args(["-o", "remount,size=400m"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success());
    for name in ["tar", "run"] {
        let out = kiln(&["build", "-q", "-t", name, env.path(name).to_str().unwrap()]);
        assert!(out.status.success(), "{}", frame(&out));
        let out = kiln(&["run", "--rm", name, "ls", "-l", "/fill"]);
        assert!(out.status.success(), "{}", frame(&out));
    }
    let out = kiln(&["store", "verify"]);
    assert!(out.status.success(), "{}", frame(&out));
}

/// #17.6: the short chaos loop (scripts/chaos.sh with 20 kills; the full one is 300).
#[test]
fn chaos_loop_short() {
    require_root();
    let out = Command::new("bash")
        .arg(workspace().join("scripts/chaos.sh"))
        .args(["--kills", "20", "--kiln", env!("CARGO_BIN_EXE_kiln")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(out.status.success(), "{}", frame(&out));
    assert!(text.contains("chaos: ok"), "{text}");
}

/// #17.6: `store verify` lists what a killed build left (its temps; the mounts of its steps if
/// they outlived it) without changing anything, and `--repair` removes it and says so.
#[test]
fn verify_lists_and_repair_removes_what_a_killed_build_left() {
    let env = busybox_env();
    let ctx = env.path("ctx");
    write_context(
        &ctx,
        "FROM busybox:local\nRUN dd if=/dev/zero of=/z bs=1M count=4 2>/dev/null && sleep 30\n",
    );
    let mut build = spawn(&env, &["build", ctx.to_str().unwrap()]);
    eventually(20, "the step to run", || {
        fs::read_dir(env.root().join("snapshots/tmp")).is_ok_and(|mut d| d.next().is_some())
            && du(&env.root().join("snapshots/tmp")) > 4 << 20
    });
    build.kill().unwrap();
    build.wait().unwrap();
    let out = env.kiln(&["store", "verify"]).output().unwrap();
    assert!(out.status.success(), "leftovers are not damage: {}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("leftover: temp") || err.contains("leftover: overlay mount"),
        "{}",
        frame(&out)
    );
    assert!(stdout(&out).contains("leftovers"), "{}", frame(&out));
    assert!(
        fs::read_dir(env.root().join("snapshots/tmp"))
            .unwrap()
            .next()
            .is_some(),
        "verify alone removes nothing"
    );
    let out = env.ok(&["store", "verify", "--repair"]);
    let text = stdout(&out);
    assert!(text.contains("repaired: removed stale temp"), "{}", frame(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("leftover"),
        "{}",
        frame(&out)
    );
    assert!(temps(&env.root(), env.dir.path()).is_empty());
    let out = env.ok(&["store", "verify"]);
    assert!(String::from_utf8_lossy(&out.stderr).is_empty(), "{}", frame(&out));
}

/// An edited copy's result is stacked on the earlier one (its tree the changes, its layer blob
/// a recipe over the earlier blob); once the earlier result's record is pruned, what it kept is
/// kept by the result above it, and is counted there: in `system df`'s image size while an image
/// uses it, in `builder du`'s entry once only the build cache does, and freed with that entry.
#[test]
fn a_stacked_result_counts_the_tree_below_it() {
    use crate::build::{layers, snapshot_key, snapshot_parent};
    let env = busybox_env();
    let ctx = env.path("ctx");
    fs::create_dir_all(ctx.join("src")).unwrap();
    fs::write(ctx.join("Dockerfile"), "FROM busybox:local\nCOPY . /ctx/\n").unwrap();
    // 6 MB that does not compress (an xorshift stream), and small files to edit.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let big: Vec<u8> = (0..6 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(ctx.join("big.bin"), &big).unwrap();
    for i in 0..20 {
        fs::write(ctx.join(format!("src/f{i}")), format!("{i}")).unwrap();
    }
    let c = ctx.to_str().unwrap();
    env.ok(&["build", "-q", "-t", "t/app", c]);
    let bottom = snapshot_key(&env, &layers(&env, "t/app")[1]);
    fs::write(ctx.join("src/f3"), "edited").unwrap();
    env.ok(&["build", "-q", "-t", "t/app", c]);
    let top = layers(&env, "t/app")[1].clone();
    assert_eq!(
        snapshot_parent(&env, &top).as_deref(),
        Some(bottom.as_str()),
        "the edit is not stacked: the test measures nothing"
    );
    // The first build's image (untagged by the second) and record go; its tree stays under
    // the second's.
    env.ok(&["image", "prune", "-f"]);
    let bottom_id: String = bottom.trim_start_matches("sha256:").chars().take(25).collect();
    let (rows, text) = du_rows(&env);
    assert!(rows.iter().any(|r| r[0] == bottom_id), "{text}");
    env.ok(&["builder", "prune", "-af", "--filter", &format!("id={bottom_id}")]);
    let (rows, text) = du_rows(&env);
    assert!(!rows.iter().any(|r| r[0] == bottom_id), "not pruned: {text}");
    let bottom_dir = env
        .root()
        .join("snapshots")
        .join(bottom.trim_start_matches("sha256:"));
    assert!(bottom_dir.is_dir(), "the tree below the image's layer is gone");
    // The image counts it (and the blob the second layer's recipe reads): 6 MB twice over.
    let images = parse_human(&df_row(&env, "Images")[2]);
    assert!(
        images > 12e6,
        "system df's images leave out the tree below: {images}"
    );
    // Untagged, only the build cache keeps the pair: its entry counts both, df agrees.
    env.ok(&["rmi", "t/app"]);
    let (_, text) = du_rows(&env);
    let total = parse_human(&cache_total(&env));
    assert!(
        total > 12e6,
        "builder du leaves out what the stacked entry keeps: {text}"
    );
    let df = parse_human(&df_row(&env, "Build Cache")[2]);
    assert!((df - total).abs() < 1e5, "df {df} and du {total} disagree");
    // And it is freed with that entry.
    env.ok(&["builder", "prune", "-af"]);
    assert!(
        !bottom_dir.exists(),
        "the tree below outlived the entry that kept it"
    );
    let total = parse_human(&cache_total(&env));
    assert!(total < 1e6, "left after prune -a: {total}");
    let out = env.ok(&["store", "verify"]);
    assert!(stdout(&out).contains(": ok"), "{}", frame(&out));
}
