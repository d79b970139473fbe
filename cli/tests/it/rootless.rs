//! Rootless mode: kiln run by an unprivileged user (created here with `useradd` and subordinate
//! id ranges, kiln started through `setpriv`), checked against the same builds as root: the
//! image IDs must be equal.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::harness::{busybox_tar, frame, require_root, shared_dir, workspace, Env};

/// The test user's name.
const USER: &str = "kiln-rootless";
/// A fixed SOURCE_DATE_EPOCH, so that builds at different times give the same image IDs.
const EPOCH: &str = "SOURCE_DATE_EPOCH=1700000000";

#[derive(Clone, Debug)]
struct TestUser {
    uid: u32,
    gid: u32,
    home: PathBuf,
}

/// Held while users and their subordinate ids are changed (shadow's tools fail when another holds
/// the lock of /etc/passwd).
static USERADD: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?} failed\n{}", frame(&out));
    out
}

/// The end of the highest range in a subuid-format file (the next free id), at least 100000.
fn next_free_subid(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(f.get(1)?.parse::<u64>().ok()? + f.get(2)?.parse::<u64>().ok()?)
        })
        .max()
        .unwrap_or(0)
        .max(100_000)
}

/// The unprivileged test user, created once (with 65536 subordinate uids and gids).
fn test_user() -> TestUser {
    static USER_INFO: OnceLock<TestUser> = OnceLock::new();
    USER_INFO
        .get_or_init(|| {
            require_root();
            let _guard = USERADD.lock().unwrap_or_else(|e| e.into_inner());
            let exists = Command::new("id")
                .arg(USER)
                .output()
                .expect("id")
                .status
                .success();
            if !exists {
                run(Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", USER]));
            }
            for (file, flag) in [("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")] {
                let listed = std::fs::read_to_string(file)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.starts_with(&format!("{USER}:")));
                if !listed {
                    let start = next_free_subid(file);
                    run(Command::new("usermod").args([flag, &format!("{start}-{}", start + 65535), USER]));
                }
            }
            let id = |flag: &str| -> u32 {
                let out = run(Command::new("id").args([flag, USER]));
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .expect("numeric id")
            };
            // slirp4netns opens /dev/net/tun, which Debian's udev makes 0666; a machine without
            // udev may leave it 0600.
            // fuse-overlayfs opens /dev/fuse, which Debian's udev makes 0666 as well.
            for dev in ["/dev/fuse"] {
                if let Ok(meta) = std::fs::metadata(dev) {
                    use std::os::unix::fs::PermissionsExt;
                    if meta.permissions().mode() & 0o006 != 0o006 {
                        let _ = std::fs::set_permissions(dev, std::fs::Permissions::from_mode(0o666));
                    }
                }
            }
            let tun = Path::new("/dev/net/tun");
            if let Ok(meta) = std::fs::metadata(tun) {
                use std::os::unix::fs::PermissionsExt;
                if meta.permissions().mode() & 0o006 != 0o006 {
                    let _ = std::fs::set_permissions(tun, std::fs::Permissions::from_mode(0o666));
                }
            }
            TestUser {
                uid: id("-u"),
                gid: id("-g"),
                home: PathBuf::from(format!("/home/{USER}")),
            }
        })
        .clone()
}

/// A temp dir owned by the test user with a store for it (`root`) and, beside it, a store of
/// root's own (`rootful`) for the same builds.
struct RlEnv {
    env: Env,
    user: TestUser,
}

impl RlEnv {
    fn new() -> RlEnv {
        let user = test_user();
        let env = Env::new();
        std::os::unix::fs::chown(env.dir.path(), Some(user.uid), Some(user.gid)).expect("chown temp dir");
        RlEnv { env, user }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.env.path(rel)
    }

    /// `setpriv` as the test user, with a clean environment.
    fn as_user(&self, program: &Path) -> Command {
        let mut c = Command::new("/usr/bin/setpriv");
        c.arg(format!("--reuid={}", self.user.uid))
            .arg(format!("--regid={}", self.user.gid))
            .arg("--init-groups")
            .arg("--")
            .arg(program)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", &self.user.home)
            .env("USER", USER);
        c
    }

    /// `kiln --root DIR/root ARGS` as the test user (rootless).
    fn kiln(&self, args: &[&str]) -> Command {
        let mut c = self.as_user(Path::new(env!("CARGO_BIN_EXE_kiln")));
        c.arg("--root").arg(self.path("root")).args(args);
        c
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.kiln(args).output().expect("spawn kiln");
        assert!(
            out.status.success(),
            "rootless kiln {args:?} failed\n{}",
            frame(&out)
        );
        out
    }

    /// `kiln --root ROOT ARGS` as the test user with the snapshotter `snap` and `env`; must
    /// succeed.
    fn with_snapshotter_ok(&self, snap: &str, root: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
        let mut c = self.as_user(Path::new(env!("CARGO_BIN_EXE_kiln")));
        c.env("KILN_SNAPSHOTTER", snap)
            .envs(env.iter().copied())
            .arg("--root")
            .arg(root)
            .args(args);
        let out = c.output().expect("spawn kiln");
        assert!(
            out.status.success(),
            "{snap}: kiln {args:?} failed\n{}",
            frame(&out)
        );
        out
    }

    /// `kiln --root DIR/rootful ARGS` as root.
    fn rootful(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--root").arg(self.path("rootful")).args(args);
        c
    }

    fn rootful_ok(&self, args: &[&str]) -> Output {
        let out = self.rootful(args).output().expect("spawn kiln");
        assert!(
            out.status.success(),
            "rootful kiln {args:?} failed\n{}",
            frame(&out)
        );
        out
    }

    /// Imports the busybox base into both stores.
    fn with_busybox(&self) {
        let tar = busybox_tar();
        let tar = tar.to_str().expect("utf-8");
        self.ok(&["import", tar, "busybox:local"]);
        self.rootful_ok(&["import", tar, "busybox:local"]);
    }

    /// Writes a context directory (as the test user, so that it can read it).
    fn context(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (rel, data) in files {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, data).expect("write");
        }
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", self.user.uid, self.user.gid))
            .arg(&dir));
        dir
    }

    fn image_id(out: &Output) -> String {
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Builds `ctx` rootless and rootful with `args`; returns both image IDs.
    fn build_both(&self, ctx: &Path, args: &[&str]) -> (String, String) {
        let ctx = ctx.to_str().expect("utf-8");
        let mut full = vec!["build", "-q", "--build-arg", EPOCH];
        full.extend_from_slice(args);
        full.push(ctx);
        let rootless = Self::image_id(&self.ok(&full));
        let rootful = Self::image_id(&self.rootful_ok(&full));
        (rootless, rootful)
    }
}

#[test]
fn rootless_build_has_the_image_id_of_the_rootful_build() {
    let rl = RlEnv::new();
    rl.with_busybox();
    let ctx = rl.context(
        "ctx",
        &[
            (
                "Dockerfile",
                "FROM busybox:local\n\
                 RUN --network=none mkdir -p /a/b /c && echo x > /a/b/f && echo y > /c/g \
                   && chown -R 1000:1000 /a && chown 65534:42 /c/g && chmod 4755 /c/g \
                   && echo bob:x:2000:2000::/home/bob:/bin/sh >> /etc/passwd && echo bob:x:2000: >> /etc/group\n\
                 RUN --network=none rm -rf /a/b && mkdir /a/b && echo z > /a/b/h && rm /c/g && rm -rf /home/app \
                   && ln -s /a /link && mknod /p p\n\
                 COPY --chown=42:43 f.txt /x\n\
                 USER app\n\
                 RUN --network=none id -u > /tmp/me && touch /tmp/u\n\
                 USER bob:bob\n\
                 WORKDIR /home/bob/w\n\
                 RUN --network=none touch f && ls -ln . > /tmp/bob\n",
            ),
            ("f.txt", "file\n"),
        ],
    );
    let (rootless, rootful) = rl.build_both(&ctx, &["-t", "same"]);
    assert!(rootless.starts_with("sha256:"), "{rootless}");
    assert_eq!(rootless, rootful, "rootless and rootful builds differ");
    // What the steps saw: the container's ids, never the mapped host ids.
    let out = rl.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "same",
        "sh",
        "-c",
        "cat /tmp/me /tmp/bob; stat -c '%u:%g %n' /a /a/b /x /tmp/u /home/bob/w/f",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("1000\n"), "{text}");
    assert!(text.contains(" 2000 "), "{text}");
    for want in [
        "1000:1000 /a\n",
        "0:0 /a/b\n",
        "42:43 /x\n",
        "1000:1000 /tmp/u\n",
        "2000:2000 /home/bob/w/f\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

#[test]
fn rootless_cache_mounts_and_secrets() {
    let rl = RlEnv::new();
    rl.with_busybox();
    let secret = rl.path("secret.txt");
    std::fs::write(&secret, "s3cret\n").expect("write");
    std::os::unix::fs::chown(&secret, Some(rl.user.uid), Some(rl.user.gid)).expect("chown");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let ctx = rl.context(
        "ctx",
        &[(
            "Dockerfile",
            "FROM busybox:local\n\
             ARG N\n\
             RUN --network=none --mount=type=cache,target=/cache,uid=1000 \
               echo \"$N\" >> /cache/runs && cp /cache/runs /runs && stat -c %u /cache > /cache-owner\n\
             RUN --network=none --mount=type=secret,id=tok,uid=1000,mode=0400 \
               stat -c '%u %a' /run/secrets/tok > /secret-meta && sha256sum /run/secrets/tok | cut -c1-16 > /secret-sum\n",
        )],
    );
    let secret_arg = format!("id=tok,src={}", secret.display());
    let ctx_s = ctx.to_str().expect("utf-8");
    rl.ok(&[
        "build",
        "-q",
        "--secret",
        &secret_arg,
        "--build-arg",
        "N=1",
        "-t",
        "c1",
        ctx_s,
    ]);
    rl.ok(&[
        "build",
        "-q",
        "--secret",
        &secret_arg,
        "--build-arg",
        "N=2",
        "-t",
        "c2",
        ctx_s,
    ]);
    let out = rl.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "c2",
        "cat",
        "/runs",
        "/cache-owner",
        "/secret-meta",
        "/secret-sum",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    // The cache mount kept the first build's line; it and the secret carry the asked-for owner.
    assert!(text.starts_with("1\n2\n1000\n1000 400\n"), "{text}");
    let sum = std::process::Command::new("sha256sum")
        .arg(&secret)
        .output()
        .expect("sha256sum");
    let sum = String::from_utf8_lossy(&sum.stdout);
    assert!(text.ends_with(&format!("{}\n", &sum[..16])), "{text}");
    // The secret is in no layer.
    let saved = rl.path("c2.tar");
    rl.ok(&["save", "-o", saved.to_str().expect("utf-8"), "c2"]);
    let bytes = std::fs::read(&saved).expect("read");
    assert!(
        !bytes.windows(6).any(|w| w == b"s3cret"),
        "the secret leaked into the image"
    );
}

/// A host address other than loopback, which the user-mode network reaches through its NAT.
fn host_address() -> String {
    let out = run(Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "inet")?;
            Some(f.get(i + 1)?.split('/').next()?.to_owned())
        })
        .expect("a global IPv4 address")
}

#[test]
fn rootless_run_step_network_goes_through_the_usermode_helper() {
    let rl = RlEnv::new();
    rl.with_busybox();
    let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        use std::io::Write;
        // One connection: the step's, through slirp4netns from the host's address.
        let (mut s, _) = listener.accept().expect("accept");
        let _ = s.write_all(b"hello from the host\n");
    });
    let host = host_address();
    let ctx = rl.context(
        "ctx",
        &[(
            "Dockerfile",
            &format!(
                "FROM busybox:local\n\
                 RUN ip -4 -o addr show eth0 | awk '{{print $4}}' > /addr && ip route | grep default > /route \
                   && nc -w 5 {host} {port} > /got \
                   && if nc -w 2 10.0.2.2 {port} </dev/null; then echo reached > /loopback; else echo refused > /loopback; fi\n"
            ),
        )],
    );
    let out = rl.ok(&["build", "-q", "-t", "net", ctx.to_str().expect("utf-8")]);
    assert!(!out.stdout.is_empty());
    server.join().expect("server");
    let out = rl.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "net",
        "cat",
        "/addr",
        "/route",
        "/got",
        "/loopback",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("10.0.2.100/24\ndefault via 10.0.2.2 dev eth0"),
        "{text}"
    );
    // The host's loopback services stay out of reach (--disable-host-loopback).
    assert!(text.ends_with("hello from the host\nrefused\n"), "{text}");
}

#[test]
fn rootless_network_without_slirp4netns_is_a_clear_error() {
    let rl = RlEnv::new();
    rl.with_busybox();
    // A PATH with the id-mapping tools but neither network tool.
    let bin = rl.path("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    for tool in ["newuidmap", "newgidmap"] {
        std::os::unix::fs::symlink(Path::new("/usr/bin").join(tool), bin.join(tool)).expect("symlink");
    }
    let ctx = rl.context(
        "ctx",
        &[(
            "Dockerfile",
            "FROM busybox:local\nRUN true\nRUN --network=none true\n",
        )],
    );
    let out = rl
        .kiln(&["build", "-q", ctx.to_str().expect("utf-8")])
        .env("PATH", &bin)
        .output()
        .expect("spawn");
    assert!(!out.status.success(), "{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rootless mode needs `slirp4netns`") && err.contains("--network none"),
        "{err}"
    );
    // Without a network nothing is needed.
    let ctx = rl.context(
        "ctx2",
        &[("Dockerfile", "FROM busybox:local\nRUN --network=none true\n")],
    );
    let out = rl
        .kiln(&["build", "-q", ctx.to_str().expect("utf-8")])
        .env("PATH", &bin)
        .output()
        .expect("spawn");
    assert!(out.status.success(), "{}", frame(&out));
}

#[test]
fn a_failing_id_map_tool_is_named_with_its_message_and_the_store_kept() {
    let rl = RlEnv::new();
    rl.with_busybox();
    let images = rl.ok(&["images"]).stdout;
    let keeper = keeper_pid(&rl).expect("a keeper");
    // The real newuidmap beside a newgidmap that refuses, as one would for a missing range.
    let bin = rl.path("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    std::os::unix::fs::symlink("/usr/bin/newuidmap", bin.join("newuidmap")).expect("symlink");
    let fake = bin.join("newgidmap");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"newgidmap: gid range [1-65537) -> [165536-231073) not allowed\" >&2\nexit 1\n",
    )
    .expect("write");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let out = rl
        .kiln(&["images"])
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .output()
        .expect("spawn");
    assert!(!out.status.success(), "{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`newgidmap` failed to write the id map")
            && err.contains("not allowed")
            && err.contains(&format!("{} ", fake.display())),
        "{err}"
    );
    // Nothing half-entered: the keeper the fake tools could not map wrote no pid file, and the
    // next command, with the real tools, joins the first keeper and sees the same store.
    assert_eq!(keeper_pid(&rl), Some(keeper));
    let out = rl.ok(&["--debug", "images"]);
    assert_eq!(keeper_in_debug(&out), (keeper, false));
    assert_eq!(out.stdout, images);
}

#[test]
fn rootless_store_files_carry_mapped_ids_on_the_host() {
    let rl = RlEnv::new();
    rl.with_busybox();
    let ctx = rl.context(
        "ctx",
        &[(
            "Dockerfile",
            "FROM busybox:local\nRUN --network=none touch /mine && chown 1000:1000 /mine\n",
        )],
    );
    rl.ok(&["build", "-q", "-t", "m", ctx.to_str().expect("utf-8")]);
    // On the host the store belongs to the user and the container's uid 1000 is a subordinate id.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(rl.path("root")).expect("store");
    assert_eq!(meta.uid(), rl.user.uid);
    let sub = std::fs::read_to_string("/etc/subuid").expect("subuid");
    let start: u32 = sub
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{USER}:")))
        .and_then(|r| r.split(':').next()?.parse().ok())
        .expect("range");
    let found = walkdir(&rl.path("root/snapshots"))
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "mine"))
        .expect("the file in a snapshot");
    assert_eq!(
        std::fs::symlink_metadata(&found).expect("stat").uid(),
        start + 999
    );
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// What a difftest case's `case.json` asks for (difftest.py's fields).
#[derive(Default)]
struct Case {
    build_args: Vec<(String, String)>,
    target: Option<String>,
    dockerfile: Option<String>,
    expect: Option<String>,
    run: Vec<Vec<String>>,
}

impl Case {
    fn read(dir: &Path) -> Case {
        let Ok(bytes) = std::fs::read(dir.join("case.json")) else {
            return Case::default();
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("case.json");
        let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        Case {
            build_args: v
                .get("build_args")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.iter()
                        .map(|(k, x)| (k.clone(), x.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
            target: text("target"),
            dockerfile: text("dockerfile"),
            expect: text("expect"),
            run: v
                .get("run")
                .and_then(|r| r.as_array())
                .map(|runs| {
                    runs.iter()
                        .map(|argv| {
                            argv.as_array()
                                .map(|a| {
                                    a.iter()
                                        .map(|x| x.as_str().unwrap_or_default().to_owned())
                                        .collect()
                                })
                                .unwrap_or_default()
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// Every difftest case (the shared ones and kiln's own), built rootless and rootful: the same
/// image IDs, the same failures, the same output of the cases' `run` commands.
#[test]
fn rootless_difftest_cases_have_the_rootful_image_ids() {
    let rl = RlEnv::new();
    rl.with_busybox();
    let mut dirs = Vec::new();
    for base in [
        shared_dir().join("difftest/cases"),
        workspace().join("testdata/difftest/cases"),
    ] {
        let Ok(rd) = std::fs::read_dir(&base) else {
            continue;
        };
        let mut names: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        names.sort();
        dirs.extend(
            names
                .into_iter()
                .filter(|p| p.join("Dockerfile").is_file() || p.join("case.json").is_file()),
        );
    }
    assert!(
        dirs.len() > 20,
        "difftest cases not found under {}",
        shared_dir().display()
    );
    let mut problems = Vec::new();
    for (i, case_dir) in dirs.iter().enumerate() {
        let name = case_dir.file_name().expect("name").to_string_lossy().into_owned();
        let case = Case::read(case_dir);
        // The context as difftest.py makes it: copied by the test user (so that it can read it),
        // then the case's prepare.sh as root (some make device nodes).
        let ctx = rl.path(&format!("case-{i}"));
        let script = format!(
            "set -e; cp -a '{src}' '{ctx}'; chmod -R u+w '{ctx}'; \
             rm -f '{ctx}/expected.json' '{ctx}/case.json' '{ctx}/prepare.sh'",
            src = case_dir.display(),
            ctx = ctx.display()
        );
        run(rl.as_user(Path::new("/bin/sh")).arg("-c").arg(&script));
        if case_dir.join("prepare.sh").is_file() {
            run(Command::new("sh")
                .arg("-e")
                .arg(case_dir.join("prepare.sh"))
                .current_dir(&ctx));
        }
        let dockerfile = ctx.join(case.dockerfile.as_deref().unwrap_or("Dockerfile"));
        let tag = format!("case-{i}");
        let mut args: Vec<String> = vec![
            "build".into(),
            "-q".into(),
            "--build-arg".into(),
            EPOCH.into(),
            "-t".into(),
            tag.clone(),
        ];
        for (k, v) in &case.build_args {
            args.extend(["--build-arg".into(), format!("{k}={v}")]);
        }
        if let Some(t) = &case.target {
            args.extend(["--target".into(), t.clone()]);
        }
        args.extend([
            "-f".into(),
            dockerfile.display().to_string(),
            ctx.display().to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let rootless = rl.kiln(&args).output().expect("spawn");
        let rootful = rl.rootful(&args).output().expect("spawn");
        if case.expect.as_deref() == Some("fail") {
            if rootless.status.success() || rootful.status.success() {
                problems.push(format!(
                    "{name}: should fail both ways\n{}\n{}",
                    frame(&rootless),
                    frame(&rootful)
                ));
            }
            continue;
        }
        if !rootless.status.success() || !rootful.status.success() {
            problems.push(format!(
                "{name}: build failed\n{}\n{}",
                frame(&rootless),
                frame(&rootful)
            ));
            continue;
        }
        let (a, b) = (RlEnv::image_id(&rootless), RlEnv::image_id(&rootful));
        if a != b {
            problems.push(format!("{name}: rootless {a} != rootful {b}"));
        }
        for argv in &case.run {
            let mut run_args = vec!["run", "--rm", "--network", "none", tag.as_str()];
            run_args.extend(argv.iter().map(String::as_str));
            let x = rl.kiln(&run_args).output().expect("spawn");
            let y = rl.rootful(&run_args).output().expect("spawn");
            if x.status.code() != y.status.code() || x.stdout != y.stdout {
                problems.push(format!(
                    "{name}: run {argv:?} differs\n{}\n{}",
                    frame(&x),
                    frame(&y)
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} cases differ:\n{}",
        problems.len(),
        dirs.len(),
        problems.join("\n")
    );
}

#[test]
fn rootless_without_subordinate_ids_is_a_clear_error() {
    require_root();
    let name = "kiln-rootless-nosub";
    let guard = USERADD.lock().unwrap_or_else(|e| e.into_inner());
    let exists = Command::new("id")
        .arg(name)
        .output()
        .expect("id")
        .status
        .success();
    if !exists {
        run(Command::new("useradd").args(["--no-create-home", "--shell", "/bin/sh", name]));
    }
    // useradd may have given it ranges: take them away.
    for (file, flag) in [("/etc/subuid", "--del-subuids"), ("/etc/subgid", "--del-subgids")] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for l in text.lines().filter(|l| l.starts_with(&format!("{name}:"))) {
            let f: Vec<&str> = l.split(':').collect();
            let start: u64 = f[1].parse().expect("start");
            let count: u64 = f[2].parse().expect("count");
            run(Command::new("usermod").args([flag, &format!("{start}-{}", start + count - 1), name]));
        }
    }
    drop(guard);
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={name}"),
            &format!("--regid={name}"),
            "--init-groups",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(["--root", "/nonexistent/kiln-root", "images"])
        .output()
        .expect("spawn");
    assert!(!out.status.success(), "{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "rootless mode needs subordinate ids: `/etc/subuid` has no range for user `kiln-rootless-nosub`"
        ) && err.contains("usermod --add-subuids"),
        "{err}"
    );
}

#[test]
fn rootless_info_and_run_report_the_usermode_parts() {
    let rl = RlEnv::new();
    rl.with_busybox();
    let info = String::from_utf8_lossy(&rl.ok(&["info"]).stdout).into_owned();
    for want in [
        "Snapshotter: overlayfs (kernel, in a user namespace: userxattr)\n",
        &format!("Rootless: yes (uid 0 is host uid {})\n", rl.user.uid),
        "RUN Network: slirp4netns (",
    ] {
        assert!(info.contains(want), "missing {want:?} in\n{info}");
    }
    let out = rl.rootful_ok(&["info"]);
    let rootful = String::from_utf8_lossy(&out.stdout);
    assert!(
        rootful.contains("Snapshotter: overlayfs (kernel)\nRootless: no\n"),
        "{rootful}"
    );
    // --debug says the same at the start of every command (the snapshotter: of those that mount).
    let out = rl.ok(&["--debug", "images"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RUN network: slirp4netns"), "{err}");
    let out = rl.ok(&[
        "--debug",
        "run",
        "--rm",
        "--network",
        "none",
        "busybox:local",
        "true",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("snapshotter: overlayfs (kernel, in a user namespace: userxattr)\n"),
        "{err}"
    );
    // A container's default network is the user-mode one too; publishing ports is refused.
    let out = rl.ok(&[
        "run",
        "--rm",
        "busybox:local",
        "sh",
        "-c",
        "ip -4 -o addr show eth0 | awk '{print $4}'",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "10.0.2.100/24\n");
    let out = rl
        .kiln(&["run", "--rm", "-p", "8080:80", "busybox:local", "true"])
        .output()
        .expect("spawn");
    assert!(!out.status.success(), "{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("publishing ports (-p/-P)") && err.contains("not implemented in rootless mode"),
        "{err}"
    );
}

#[test]
fn rootless_detached_container_is_managed_by_later_commands() {
    let rl = RlEnv::new();
    rl.with_busybox();
    // Each command joins the user namespace of the store's keeper, where the supervisors live, so
    // the root of `stop`, `exec` and `kill` is the one that owns the container.
    rl.ok(&["run", "-d", "--name", "bg", "busybox:local", "sleep", "300"]);
    rl.ok(&[
        "run",
        "-d",
        "--name",
        "user",
        "--user",
        "1000:1000",
        "--network",
        "none",
        "busybox:local",
        "sleep",
        "300",
    ]);
    // Were the keeper killed, the next one adopts the namespace of the containers' supervisors.
    let keeper = keeper_pid(&rl).expect("a keeper");
    run(Command::new("kill").args(["-KILL", &keeper.to_string()]));
    assert!(eventually(10, || !alive(keeper)));
    let out = rl.ok(&["--debug", "ps"]);
    let (adopting, started) = keeper_in_debug(&out);
    assert!(started && adopting != keeper, "{}", frame(&out));
    let out = rl.ok(&[
        "exec",
        "bg",
        "sh",
        "-c",
        "id -u; ip -4 -o addr show eth0 | awk '{print $4}'",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n10.0.2.100/24\n");
    let out = rl.ok(&["exec", "user", "id", "-u"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1000\n");
    rl.ok(&["kill", "user"]);
    rl.ok(&["stop", "-t", "1", "bg"]);
    let out = rl.ok(&["ps", "-a", "--format", "{{.Names}} {{.Status}}"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().all(|l| l.contains(" Exited (137)")), "{text}");
    rl.ok(&["rm", "bg", "user"]);
}

/// Each snapshotter, forced with `KILN_SNAPSHOTTER` in rootless mode (kernel overlayfs with
/// userxattr, fuse-overlayfs, copies), gives the image ID of the rootful kernel-overlay build:
/// COPY, RUN with owner changes, whiteouts of lower files, a directory removed and made anew
/// (opaque), a RUN bind mount from another stage, a USER step.
#[test]
fn rootless_each_snapshotter_has_the_rootful_image_id() {
    let rl = RlEnv::new();
    rl.with_busybox();
    let ctx = rl.context(
        "ctx",
        &[
            (
                "Dockerfile",
                "FROM busybox:local AS other\n\
                 RUN --network=none mkdir /data && echo data > /data/d\n\
                 FROM busybox:local\n\
                 COPY --chown=42:43 f.txt /x\n\
                 COPY dir/ /copied/\n\
                 RUN --network=none mkdir -p /a/b /c && echo x > /a/b/f && echo y > /c/g \
                   && chown -R 1000:1000 /a && chown 65534:42 /c/g && chmod 4755 /c/g \
                   && echo bob:x:2000:2000::/home/bob:/bin/sh >> /etc/passwd\n\
                 RUN --network=none rm /bin/wget /copied/one && rm -rf /a/b && mkdir /a/b \
                   && echo z > /a/b/h && rm /c/g && ln -s /a /link && mknod /p p && chmod 700 /etc\n\
                 RUN --network=none --mount=type=bind,from=other,source=/data,target=/mnt cp /mnt/d /from-other\n\
                 USER bob\n\
                 RUN --network=none id -u > /tmp/me\n",
            ),
            ("f.txt", "file\n"),
            ("dir/one", "1\n"),
            ("dir/sub/two", "2\n"),
        ],
    );
    let ctx_s = ctx.to_str().expect("utf-8");
    let args = ["build", "-q", "--build-arg", EPOCH, ctx_s];
    let rootful = RlEnv::image_id(&rl.rootful_ok(&args));
    assert!(rootful.starts_with("sha256:"), "{rootful}");
    for snap in ["overlayfs", "fuse-overlayfs", "native"] {
        let root = rl.path(&format!("root-{snap}"));
        let run = |extra: &[&str]| rl.with_snapshotter_ok(snap, &root, &[], extra);
        let tar = busybox_tar();
        run(&["import", tar.to_str().expect("utf-8"), "busybox:local"]);
        let info = String::from_utf8_lossy(&run(&["info"]).stdout).into_owned();
        assert!(
            info.contains(&format!("Snapshotter: {snap}")) && info.contains("forced by KILN_SNAPSHOTTER"),
            "{snap}: {info}"
        );
        let out = run(&["--debug", "build", "-q", "--build-arg", EPOCH, ctx_s]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("snapshotter: {snap}")), "{snap}: {err}");
        let id = RlEnv::image_id(&out);
        assert_eq!(
            id, rootful,
            "{snap}: rootless image differs from the rootful one\n{err}"
        );
        // Nothing of the views is left behind in the store's temp dir.
        let left: Vec<PathBuf> = walkdir(&root.join("tmp"))
            .into_iter()
            .filter(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                name.ends_with(".views") || name.starts_with("mnt-") || name.starts_with("run-")
            })
            .collect();
        assert!(left.is_empty(), "{snap}: left in tmp: {left:?}");
    }
    let out = rl
        .kiln(&["info"])
        .env("KILN_SNAPSHOTTER", "zfs")
        .output()
        .expect("spawn");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "KILN_SNAPSHOTTER=`zfs` is not a snapshotter: expected overlayfs, fuse-overlayfs or native"
        ),
        "{}",
        frame(&out)
    );
}

/// The pid in the store's keeper pid file, if there is one.
fn keeper_pid(rl: &RlEnv) -> Option<i32> {
    std::fs::read_to_string(rl.path("root/cache/run/userns.pid"))
        .ok()?
        .lines()
        .next()?
        .parse()
        .ok()
}

/// The keeper pid a `--debug` command's stderr names, and whether it started that keeper.
fn keeper_in_debug(out: &Output) -> (i32, bool) {
    let err = String::from_utf8_lossy(&out.stderr);
    for (prefix, started) in [
        ("rootless: started keeper ", true),
        ("rootless: joined the user namespace of keeper ", false),
    ] {
        if let Some(rest) = err.split(prefix).nth(1) {
            let pid = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|p| p.parse().ok())
                .expect("a pid after the keeper message");
            return (pid, started);
        }
    }
    panic!("no keeper in the debug output\n{}", frame(out));
}

fn alive(pid: i32) -> bool {
    // A zombie has no exe link; a keeper is nobody's child, so it never lingers as one.
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok()
}

fn user_ns(pid: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/user"))
        .expect("readlink ns/user")
        .display()
        .to_string()
}

/// Waits up to `secs` seconds for `cond`.
fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    cond()
}

/// Rootless commands of one store share the user namespace of its keeper: the first starts it,
/// the next join it (their containers are in it too), racing first commands make one keeper, and
/// the keeper holds nothing of the commands (no pipe, so `output()` returns at once; no mount).
#[test]
fn rootless_commands_share_the_keepers_user_namespace() {
    let rl = RlEnv::new();
    // Four first commands at once: one starts the keeper, the others join it.
    let racing: Vec<_> = (0..4)
        .map(|_| {
            let mut c = rl.kiln(&["--debug", "images"]);
            c.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().expect("spawn kiln")
        })
        .collect();
    let outs: Vec<Output> = racing
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    for out in &outs {
        assert!(out.status.success(), "{}", frame(out));
    }
    let seen: Vec<(i32, bool)> = outs.iter().map(keeper_in_debug).collect();
    let pid = seen[0].0;
    assert!(seen.iter().all(|(p, _)| *p == pid), "{seen:?}");
    assert_eq!(seen.iter().filter(|(_, started)| *started).count(), 1, "{seen:?}");
    assert_eq!(keeper_pid(&rl), Some(pid));
    assert!(alive(pid));
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("comm"),
        "kiln-userns\n"
    );
    // Detached: its descriptors are /dev/null only, its directory is /, its mounts the host's.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
    {
        assert_eq!(
            std::fs::read_link(fd.path()).expect("fd link"),
            Path::new("/dev/null")
        );
    }
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd"),
        Path::new("/")
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("mnt"),
        std::fs::read_link("/proc/self/ns/mnt").expect("mnt")
    );
    // The next commands join it; a container's processes are in its namespace.
    let out = rl.ok(&[
        "--debug",
        "import",
        busybox_tar().to_str().expect("utf-8"),
        "busybox:local",
    ]);
    assert_eq!(keeper_in_debug(&out), (pid, false));
    let out = rl.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "busybox:local",
        "readlink",
        "/proc/self/ns/user",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        user_ns(&pid.to_string())
    );
    assert_ne!(user_ns(&pid.to_string()), user_ns("self"));
}

/// A keeper pid file that names anything but a keeper of this user with the expected maps is not
/// followed: a process of the user's that is no keeper, a dead pid, root's init. The command makes
/// a keeper of its own and works.
#[test]
fn a_forged_keeper_pid_file_is_not_joined() {
    let rl = RlEnv::new();
    rl.ok(&["images"]);
    let first = keeper_pid(&rl).expect("a keeper");
    let mut sleeper = rl
        .as_user(Path::new("/bin/sleep"))
        .arg("300")
        .spawn()
        .expect("spawn sleep");
    let mut dead = rl.as_user(Path::new("/bin/true")).spawn().expect("spawn true");
    let dead_pid = dead.id() as i32;
    dead.wait().expect("wait");
    let sleeper_pid = sleeper.id() as i32;
    // `setpriv` execs its program, so the sleeper's pid is the sleep's.
    assert!(eventually(5, || std::fs::read_to_string(format!(
        "/proc/{sleeper_pid}/comm"
    ))
    .is_ok_and(|c| c == "sleep\n")));
    let mut last = first;
    for forged in [sleeper_pid, dead_pid, 1] {
        let file = rl.path("root/cache/run/userns.pid");
        std::fs::write(
            &file,
            format!("{forged}\n/usr/bin/newuidmap\n/usr/bin/newgidmap\n"),
        )
        .expect("write");
        std::os::unix::fs::chown(&file, Some(rl.user.uid), Some(rl.user.gid)).expect("chown");
        let out = rl.ok(&["--debug", "images"]);
        let (pid, started) = keeper_in_debug(&out);
        assert!(
            started && pid != forged && pid != last,
            "forged {forged}: {}",
            frame(&out)
        );
        assert_eq!(keeper_pid(&rl), Some(pid));
        assert!(user_ns(&pid.to_string()) != user_ns(&sleeper_pid.to_string()));
        last = pid;
    }
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    // The keepers no pid file names end on their next look at it.
    assert!(eventually(30, || !alive(first)), "keeper {first} still alive");
}

/// A keeper with no other process in its namespace for its idle time
/// (`KILN_USERNS_KEEPER_IDLE_SECS`) ends and removes its pid file; a detached container (its
/// supervisor is in the namespace) keeps it; a bad idle value is a clear error.
#[test]
fn an_idle_keeper_ends_and_a_detached_container_keeps_it() {
    let rl = RlEnv::new();
    let out = rl
        .kiln(&["images"])
        .env("KILN_USERNS_KEEPER_IDLE_SECS", "soon")
        .output()
        .expect("spawn");
    assert!(!out.status.success(), "{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`KILN_USERNS_KEEPER_IDLE_SECS` must be a whole number of seconds, not `soon`"),
        "{err}"
    );
    let idle = |args: &[&str]| {
        let out = rl
            .kiln(args)
            .env("KILN_USERNS_KEEPER_IDLE_SECS", "1")
            .output()
            .expect("spawn");
        assert!(out.status.success(), "{}", frame(&out));
    };
    idle(&["import", busybox_tar().to_str().expect("utf-8"), "busybox:local"]);
    let pid = keeper_pid(&rl).expect("a keeper");
    assert!(eventually(20, || !alive(pid)), "keeper {pid} still alive");
    assert_eq!(keeper_pid(&rl), None);
    assert!(!rl.path("root/cache/run/userns.pid").exists());
    // A detached container's supervisor lives in the namespace: the keeper stays while it runs.
    idle(&[
        "run",
        "-d",
        "--name",
        "bg",
        "--network",
        "none",
        "busybox:local",
        "sleep",
        "300",
    ]);
    let pid = keeper_pid(&rl).expect("a keeper");
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert!(alive(pid), "keeper {pid} ended beside a live container");
    idle(&["rm", "-f", "bg"]);
    assert!(eventually(20, || !alive(pid)), "keeper {pid} still alive");
    assert_eq!(keeper_pid(&rl), None);
}

#[test]
fn rootless_flattened_views_give_the_rootful_image_with_each_snapshotter() {
    // Every RUN past the second layer mounts a flattened view (KILN_FLATTEN_AFTER=2) made by
    // the user namespace's root (mapped owners, `user.overlay.opaque`); the image must be the
    // one a rootful build without views makes.
    let rl = RlEnv::new();
    rl.with_busybox();
    let ctx = rl.context(
        "ctx",
        &[(
            "Dockerfile",
            "FROM busybox:local AS other\n\
             RUN --network=none mkdir /data && echo data > /data/d\n\
             RUN --network=none echo more > /data/e\n\
             RUN --network=none rm /data/d\n\
             FROM busybox:local\n\
             RUN --network=none mkdir -p /a/b /c /d/sub && echo x > /a/b/f && echo y > /c/g && echo s > /d/sub/s\n\
             RUN --network=none chown -R 1000:1000 /a && chown 65534:42 /c/g && chmod 4755 /c/g\n\
             RUN --network=none rm -rf /d && mkdir /d && echo new > /d/n\n\
             RUN --network=none rm /bin/wget && rm -rf /a/b && mkdir /a/b && echo z > /a/b/h\n\
             RUN --network=none rm /c/g && ln -s /a /link && mknod /p p && chmod 700 /etc\n\
             RUN --network=none rm -rf /d && echo file > /d && ln /a/b/h /hard\n\
             RUN --network=none --mount=type=bind,from=other,source=/data,target=/mnt cp /mnt/e /from-other\n",
        )],
    );
    let ctx_s = ctx.to_str().expect("utf-8");
    let args = ["build", "-q", "--build-arg", EPOCH, ctx_s];
    let rootful = rl
        .rootful(&args)
        .env("KILN_FLATTEN_AFTER", "1000")
        .output()
        .expect("spawn kiln");
    assert!(rootful.status.success(), "{}", frame(&rootful));
    let rootful = RlEnv::image_id(&rootful);
    for snap in ["overlayfs", "fuse-overlayfs", "native"] {
        let root = rl.path(&format!("root-flat-{snap}"));
        let run = |extra: &[&str]| rl.with_snapshotter_ok(snap, &root, &[("KILN_FLATTEN_AFTER", "2")], extra);
        let tar = busybox_tar();
        run(&["import", tar.to_str().expect("utf-8"), "busybox:local"]);
        let id = RlEnv::image_id(&run(&args));
        let views = std::fs::read_dir(root.join("snapshots/flat"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert!(views > 0, "{snap}: no flattened view was made");
        assert_eq!(id, rootful, "{snap}: the image over flattened views differs");
    }
}
