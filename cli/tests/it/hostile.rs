//! The hostile input corpus (`testdata/hostile/gen.py`) against `kiln load`, `kiln import`,
//! ADD's extraction and `kiln build`: one test per class of attack. Each case says what the
//! command must give, a clear error (with the words it must contain) or an image holding
//! exactly what it should (Docker's behaviour); after every command nothing outside the store
//! and the image changed: a canary directory beside the store keeps its files, modes and link
//! counts, the host's /etc/shadow is untouched, and no file of the store holds the canary's
//! secret (nothing was read from outside either).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::harness::{busybox_env, busybox_tar, frame, workspace, Env};

/// One generated class of the corpus, with the store and canary it is checked against.
struct Corpus {
    env: Env,
    out: PathBuf,
    canary: PathBuf,
    secret: String,
    cases: Vec<Value>,
    shadow: (u64, Vec<u8>),
}

/// What a file of the canary looks like: content, mode, link count.
fn canary_state(dir: &Path) -> BTreeMap<String, (Vec<u8>, u32, u64)> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = fs::symlink_metadata(e.path()).unwrap();
        let content = if m.is_file() {
            fs::read(e.path()).unwrap()
        } else {
            Vec::new()
        };
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            (content, m.mode(), m.nlink()),
        );
    }
    out
}

/// Generates the cases of `class` (and the busybox base they build on) for a fresh store.
fn corpus(class: &str, bomb_mib: u32) -> Corpus {
    let env = busybox_env();
    let canary = env.path("canary");
    fs::create_dir_all(canary.join("sub")).unwrap();
    let secret = format!(
        "kiln-hostile-canary-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    fs::write(canary.join("secret"), &secret).unwrap();
    let out = env.path("corpus");
    let gen = workspace().join("testdata/hostile/gen.py");
    let st = Command::new("python3")
        .arg(&gen)
        .arg(&out)
        .arg("--canary")
        .arg(&canary)
        .arg("--base")
        .arg(busybox_tar())
        .args(["--class", class, "--bomb-mib", &bomb_mib.to_string()])
        .output()
        .expect("run python3 testdata/hostile/gen.py (needs python3)");
    assert!(st.status.success(), "gen.py failed\n{}", frame(&st));
    let cases: Vec<Value> =
        serde_json::from_slice(&fs::read(out.join("cases.json")).unwrap()).expect("cases.json");
    assert!(!cases.is_empty(), "class {class} has no cases");
    let shadow = Path::new("/etc/shadow");
    let shadow = (
        fs::metadata(shadow).map(|m| m.nlink()).unwrap_or(0),
        fs::read(shadow).unwrap_or_default(),
    );
    Corpus {
        env,
        out,
        canary,
        secret,
        cases,
        shadow,
    }
}

/// Every regular file under `dir` (not following symlinks) of at most `max` bytes.
fn small_files(dir: &Path, max: u64, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(m) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        if m.is_dir() {
            small_files(&e.path(), max, out);
        } else if m.is_file() && m.len() <= max {
            out.push(e.path());
        }
    }
}

/// Everything under the store root except lock files, with sizes: what "the store is as it
/// was" means after a failed load or import.
fn store_listing(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    small_files(root, u64::MAX, &mut files);
    let mut out: Vec<String> = files
        .iter()
        .filter(|p| !p.ends_with("lock") && !p.ends_with("gc.lock"))
        .map(|p| {
            let len = fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            format!("{} {len}", p.strip_prefix(root).unwrap().display())
        })
        .collect();
    out.sort();
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Single-quotes `s` for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Corpus {
    /// Nothing outside the store and the images changed, and nothing of the canary got in.
    fn assert_contained(&self, what: &str, before: &BTreeMap<String, (Vec<u8>, u32, u64)>) {
        assert_eq!(
            &canary_state(&self.canary),
            before,
            "{what}: the canary directory changed"
        );
        let shadow = Path::new("/etc/shadow");
        let now = (
            fs::metadata(shadow).map(|m| m.nlink()).unwrap_or(0),
            fs::read(shadow).unwrap_or_default(),
        );
        assert!(now == self.shadow, "{what}: /etc/shadow changed");
        let mut files = Vec::new();
        small_files(&self.env.root(), 16 << 20, &mut files);
        for f in files {
            let data = fs::read(&f).unwrap_or_default();
            assert!(
                !data
                    .windows(self.secret.len())
                    .any(|w| w == self.secret.as_bytes()),
                "{what}: the canary's secret was read into the store: {}",
                f.display()
            );
        }
    }

    /// Runs kiln; with `max_rss_mib`, under GNU time, failing when it used more memory.
    fn kiln(&self, args: &[&str], max_rss_mib: Option<u64>) -> Output {
        let Some(limit) = max_rss_mib else {
            return self.env.kiln(args).output().expect("spawn kiln");
        };
        let report = self.env.path("rss");
        let kiln = self.env.kiln(args);
        let out = Command::new("/usr/bin/time")
            .arg("-f")
            .arg("%M")
            .arg("-o")
            .arg(&report)
            .arg(kiln.get_program())
            .args(kiln.get_args())
            .output()
            .expect("spawn /usr/bin/time (Debian package time)");
        let kib: u64 = fs::read_to_string(&report)
            .unwrap_or_default()
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no RSS from /usr/bin/time\n{}", frame(&out)));
        assert!(
            kib <= limit << 10,
            "kiln {args:?} used {kib} KiB of memory (limit {limit} MiB)\n{}",
            frame(&out)
        );
        out
    }

    /// Checks `out` against `expect`; for a success, checks the files of `image` below
    /// `prefix` in a container. `what` names the case and command in failures.
    fn judge(
        &self,
        what: &str,
        out: &Output,
        expect: &Value,
        image: &str,
        prefix: &str,
        store_before: &[String],
    ) {
        assert!(
            !stderr(out).contains("panicked"),
            "{what}: kiln panicked\n{}",
            frame(out)
        );
        if expect == "clean" {
            assert!(
                out.status.success() || out.status.code() == Some(1),
                "{what}: neither success nor a clean failure\n{}",
                frame(out)
            );
            return;
        }
        if let Some(needles) = expect.get("error").and_then(Value::as_array) {
            assert!(
                !out.status.success(),
                "{what}: should have failed\n{}",
                frame(out)
            );
            assert_eq!(out.status.code(), Some(1), "{what}: exit code\n{}", frame(out));
            let err = stderr(out);
            for n in needles {
                let n = n.as_str().unwrap();
                assert!(err.contains(n), "{what}: error lacks {n:?}\n{}", frame(out));
            }
            if !store_before.is_empty() {
                assert_eq!(
                    store_listing(&self.env.root()),
                    store_before,
                    "{what}: the failed command changed the store\n{}",
                    frame(out)
                );
            }
            return;
        }
        assert!(out.status.success(), "{what}: failed\n{}", frame(out));
        let mut script = String::from("set -e\n");
        for (path, content) in expect["files"].as_object().into_iter().flatten() {
            let p = quote(&format!("{prefix}{path}"));
            match content.as_str() {
                None => script.push_str(&format!(
                    "[ -e {p} ] || [ -L {p} ] || {{ echo missing {p}; exit 1; }}\n"
                )),
                Some(c) => script.push_str(&format!(
                    "[ \"$(cat {p}; echo .)\" = {} ] || {{ echo wrong content in {p}; exit 1; }}\n",
                    quote(&format!("{c}."))
                )),
            }
        }
        for path in expect["absent"].as_array().into_iter().flatten() {
            let p = quote(&format!("{prefix}{}", path.as_str().unwrap()));
            script.push_str(&format!(
                "if [ -e {p} ] || [ -L {p} ]; then echo unexpected {p}; exit 1; fi\n"
            ));
        }
        let run = self
            .env
            .kiln(&["run", "--rm", "--network", "none", image, "sh", "-c", &script])
            .output()
            .expect("spawn kiln run");
        assert!(
            run.status.success(),
            "{what}: the image is not as expected\n{}",
            frame(&run)
        );
    }

    /// Runs every case of the class with every command its expectation names.
    fn run(&self) {
        for case in &self.cases {
            let name = case["name"].as_str().unwrap();
            let path = self.out.join(case["path"].as_str().unwrap());
            let expect = &case["expect"];
            let rss = expect["max_rss_mib"].as_u64();
            let kind = case["kind"].as_str().unwrap();
            for (cmd, want) in expect.as_object().unwrap() {
                let what = format!("{name} ({cmd})");
                let canary = canary_state(&self.canary);
                match cmd.as_str() {
                    "load" => {
                        let archive = if kind == "layer" {
                            self.out.join(format!("load/{name}.tar"))
                        } else {
                            path.clone()
                        };
                        let before = store_listing(&self.env.root());
                        let out = self.kiln(&["load", "-i", archive.to_str().unwrap()], rss);
                        let image = format!("hostile/{name}:latest");
                        self.judge(&what, &out, want, &image, "/", &before);
                        if want == "clean" && out.status.success() {
                            self.use_loaded(&what, &image);
                        }
                        if let Some(paths) = expect["unreadable"].as_array() {
                            self.assert_unreadable(&what, &image, "/", paths);
                        }
                    }
                    "import" => {
                        let before = store_listing(&self.env.root());
                        let tag = format!("hostile-import/{name}:latest");
                        let out = self.kiln(&["import", path.to_str().unwrap(), &tag], rss);
                        if out.status.success() && want.get("ok").is_some() {
                            // Unpack it the way a build or a container does: COPY --from it.
                            let built = self.build_with(
                                &format!("FROM busybox:local\nCOPY --from={tag} / /imported/\n"),
                                None,
                                &format!("hostile-imported/{name}"),
                            );
                            assert!(
                                built.status.success(),
                                "{what}: unpacking failed\n{}",
                                frame(&built)
                            );
                        }
                        let image = format!("hostile-imported/{name}");
                        self.judge(&what, &out, want, &image, "/imported/", &before);
                    }
                    "add" => {
                        let file = path.file_name().unwrap().to_str().unwrap();
                        let image = format!("hostile-add/{name}");
                        let out = self.build_with(
                            &format!("FROM busybox:local\nADD {file} /dst/\n"),
                            Some(&path),
                            &image,
                        );
                        self.judge(&what, &out, want, &image, "/dst/", &[]);
                        if let Some(paths) = expect["unreadable"].as_array() {
                            self.assert_unreadable(&what, &image, "/dst/", paths);
                        }
                    }
                    "build" => {
                        let image = format!("hostile-build/{name}");
                        let ctx = path.parent().unwrap();
                        let out = self.kiln(
                            &[
                                "build",
                                "--progress=plain",
                                "-t",
                                &image,
                                "-f",
                                path.to_str().unwrap(),
                                ctx.to_str().unwrap(),
                            ],
                            rss,
                        );
                        self.judge(&what, &out, want, &image, "/", &[]);
                    }
                    _ => continue,
                }
                self.assert_contained(&what, &canary);
            }
        }
    }

    /// Builds `dockerfile` in a fresh context holding `file` (if any), tagged `tag`.
    fn build_with(&self, dockerfile: &str, file: Option<&Path>, tag: &str) -> Output {
        let ctx = self.env.path("addctx");
        let _ = fs::remove_dir_all(&ctx);
        fs::create_dir_all(&ctx).unwrap();
        if let Some(f) = file {
            fs::copy(f, ctx.join(f.file_name().unwrap())).unwrap();
        }
        fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        self.env
            .kiln(&["build", "--progress=plain", "-t", tag, ctx.to_str().unwrap()])
            .output()
            .expect("spawn kiln build")
    }

    /// The device nodes at `paths` exist in the image, yet a container cannot read them.
    fn assert_unreadable(&self, what: &str, image: &str, prefix: &str, paths: &[Value]) {
        for p in paths {
            let p = format!("{prefix}{}", p.as_str().unwrap());
            let script = format!("test -e {0} && ! head -c 1 {0} >/dev/null 2>&1", quote(&p));
            let run = self
                .env
                .kiln(&["run", "--rm", "--network", "none", image, "sh", "-c", &script])
                .output()
                .expect("spawn kiln run");
            assert!(
                run.status.success(),
                "{what}: {p} is readable in a container\n{}",
                frame(&run)
            );
        }
    }

    /// A loaded image with absurd config fields: every command that reads it works or fails
    /// with a clear error.
    fn use_loaded(&self, what: &str, image: &str) {
        for args in [
            vec!["images"],
            vec!["inspect", image],
            vec!["history", image],
            vec!["run", "--rm", "--network", "none", image, "true"],
        ] {
            let out = self.env.kiln(&args).output().unwrap();
            assert!(
                !stderr(&out).contains("panicked") && matches!(out.status.code(), Some(0 | 1 | 125..=127)),
                "{what}: kiln {args:?}\n{}",
                frame(&out)
            );
        }
    }
}

#[test]
fn hostile_dotdot_names() {
    corpus("dotdot", 0).run();
}

#[test]
fn hostile_absolute_names() {
    corpus("absolute", 0).run();
}

#[test]
fn hostile_symlink_then_write_through_it() {
    corpus("symlink-write", 0).run();
}

#[test]
fn hostile_hardlinks_to_host_files() {
    corpus("hardlink-host", 0).run();
}

#[test]
fn hostile_device_nodes() {
    corpus("devices", 0).run();
}

#[test]
fn hostile_huge_and_overflowing_headers() {
    corpus("headers", 0).run();
}

#[test]
fn hostile_duplicate_entries() {
    corpus("duplicates", 0).run();
}

#[test]
fn hostile_whiteouts_trying_to_escape() {
    corpus("whiteouts", 0).run();
}

/// 128 MiB bombs: decompressed as streams, in bounded memory.
#[test]
fn hostile_compression_bombs() {
    corpus("bombs", 128).run();
}

#[test]
fn hostile_manifests_of_100_mb() {
    corpus("manifests", 0).run();
}

#[test]
fn hostile_image_configs_with_absurd_fields() {
    corpus("configs", 0).run();
}

#[test]
fn hostile_contexts_with_outward_symlinks() {
    corpus("contexts", 0).run();
}

#[test]
fn hostile_dockerfiles_with_10_mb_lines() {
    corpus("dockerfiles", 0).run();
}
