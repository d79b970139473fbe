//! `kiln build` flags and inputs end to end: stdin contexts, secrets, SSH, entitlements, outputs,
//! metadata files, cache mounts, Ctrl-C. Needs root (namespaces, overlayfs).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{busybox_env, frame, Env};

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn setup() -> (Env, PathBuf) {
    let env = busybox_env();
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    (env, ctx)
}

pub(crate) fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `kiln build --progress=plain EXTRA... CTX`; returns stderr (the progress log).
pub(crate) fn build(env: &Env, ctx: &Path, extra: &[&str]) -> String {
    let mut args = vec!["build", "--progress=plain"];
    args.extend_from_slice(extra);
    args.push(s(ctx));
    String::from_utf8_lossy(&env.ok(&args).stderr).into_owned()
}

/// `kiln build ...` expected to fail; returns stderr.
pub(crate) fn build_fails(env: &Env, ctx: &Path, extra: &[&str]) -> String {
    let mut args = vec!["build", "--progress=plain"];
    args.extend_from_slice(extra);
    args.push(s(ctx));
    env.fails(&args)
}

/// Runs `kiln ARGS` with `input` on stdin.
fn with_stdin(env: &Env, args: &[&str], input: &[u8]) -> Output {
    let mut child = env
        .kiln(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || {
        // kiln may fail before reading everything: a broken pipe is fine.
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

/// `kiln run --rm IMAGE ARGS...` stdout.
fn run(env: &Env, image: &str, args: &[&str]) -> String {
    let mut a = vec!["run", "--rm", "--network", "none", image];
    a.extend_from_slice(args);
    String::from_utf8(env.ok(&a).stdout).unwrap()
}

/// Entries left in the store's `tmp/` (none after any build, however it ended).
fn tmp_leftovers(env: &Env) -> Vec<PathBuf> {
    std::fs::read_dir(env.root().join("tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// A tar of `dir`'s contents made by GNU tar, compressed with `compress` (a tar flag) if given.
fn tar_of(dir: &Path, compress: Option<&str>) -> Vec<u8> {
    let mut c = Command::new("tar");
    c.arg("-C").arg(dir).arg("-c");
    if let Some(flag) = compress {
        c.arg(flag);
    }
    let out = c.args(["-f", "-", "."]).output().unwrap();
    assert!(out.status.success(), "tar failed\n{}", frame(&out));
    out.stdout
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Host pids whose command line is exactly `argv`.
fn pids_running(argv: &[&str]) -> Vec<String> {
    let want: Vec<u8> = argv.iter().flat_map(|a| format!("{a}\0").into_bytes()).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|p| {
            p.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|p| std::fs::read(p.path().join("cmdline")).is_ok_and(|c| c == want))
        .map(|p| p.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn context_tar_from_stdin_plain_and_compressed() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nCOPY a.txt /a.txt\nCOPY sub/ /sub/\n",
    );
    write(&ctx, "a.txt", "from the tar\n");
    write(&ctx, "sub/b.txt", "b\n");
    write(
        &ctx,
        "sub/alt.Dockerfile",
        "FROM busybox:local\nCOPY sub/b.txt /alt.txt\nCOPY . /all/\n",
    );
    write(&ctx, "ignored.txt", "left out\n");
    write(&ctx, ".dockerignore", "ignored.txt\n");
    for (i, flag) in [None, Some("-z"), Some("-j"), Some("-J"), Some("--zstd")]
        .into_iter()
        .enumerate()
    {
        let tag = format!("t/stdin{i}");
        let out = with_stdin(
            &env,
            &["build", "--progress=plain", "-t", &tag, "-"],
            &tar_of(&ctx, flag),
        );
        assert!(out.status.success(), "{flag:?}\n{}", frame(&out));
        assert_eq!(
            run(&env, &tag, &["cat", "/a.txt", "/sub/b.txt"]),
            "from the tar\nb\n"
        );
    }
    // `-f` names a file inside the archive.
    let out = with_stdin(
        &env,
        &["build", "-q", "-t", "t/alt", "-f", "sub/alt.Dockerfile", "-"],
        &tar_of(&ctx, Some("-z")),
    );
    assert!(out.status.success(), "{}", frame(&out));
    assert_eq!(run(&env, "t/alt", &["cat", "/alt.txt"]), "b\n");
    // The archive's .dockerignore applies.
    assert_eq!(
        run(&env, "t/alt", &["ls", "-A", "/all"]),
        ".dockerignore\nDockerfile\na.txt\nsub\n"
    );
    // A missing -f file is named.
    let out = with_stdin(
        &env,
        &["build", "-f", "nope.Dockerfile", "-"],
        &tar_of(&ctx, None),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nope.Dockerfile") && err.contains("not found"),
        "{err}"
    );
    assert!(tmp_leftovers(&env).is_empty(), "{:?}", tmp_leftovers(&env));
}

/// One ustar header block (plus data blocks) for a regular file named `name`.
fn ustar_file(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

#[test]
fn context_tar_from_stdin_refuses_escaping_entries() {
    let (env, _ctx) = setup();
    let mut tar = ustar_file("Dockerfile", b"FROM busybox:local\n");
    tar.extend(ustar_file("../escaped.txt", b"x\n"));
    tar.extend([0u8; 1024]);
    let out = with_stdin(&env, &["build", "-"], &tar);
    assert!(!out.status.success(), "{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stdin"), "the error names the stdin context: {err}");
    assert!(!env.root().join("tmp/escaped.txt").exists());
    assert!(!env.path("escaped.txt").exists());
    assert!(tmp_leftovers(&env).is_empty(), "{:?}", tmp_leftovers(&env));
}

#[test]
fn dockerfile_on_stdin_builds_with_an_empty_context() {
    let (env, _ctx) = setup();
    let out = with_stdin(
        &env,
        &["build", "-q", "-t", "t/df", "-"],
        b"FROM busybox:local\nRUN echo built > /x\n",
    );
    assert!(out.status.success(), "{}", frame(&out));
    assert_eq!(run(&env, "t/df", &["cat", "/x"]), "built\n");
    // Nothing of the caller's directory is in the context.
    let out = with_stdin(
        &env,
        &["build", "--progress=plain", "-"],
        b"FROM busybox:local\nCOPY x /x\n",
    );
    assert!(!out.status.success(), "{}", frame(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not found"), "{err}");
    assert!(tmp_leftovers(&env).is_empty(), "{:?}", tmp_leftovers(&env));
    // stdin cannot be both.
    let out = with_stdin(&env, &["build", "-f", "-", "-"], b"FROM busybox:local\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stdin"));
}

#[test]
fn dockerfile_from_stdin_with_a_directory_context() {
    let (env, ctx) = setup();
    write(&ctx, "a.txt", "ctx file\n");
    let out = with_stdin(
        &env,
        &["build", "-q", "-t", "t/fdash", "-f", "-", s(&ctx)],
        b"FROM busybox:local\nCOPY a.txt /a.txt\n",
    );
    assert!(out.status.success(), "{}", frame(&out));
    assert_eq!(run(&env, "t/fdash", &["cat", "/a.txt"]), "ctx file\n");
}

#[test]
fn secrets_reach_the_step_but_no_layer() {
    let (env, ctx) = setup();
    let file_secret = "s3cr3t-from-file-7d1c";
    let env_secret = "s3cr3t-from-env-91ab";
    std::fs::write(env.path("secret.txt"), file_secret).unwrap();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\n\
         ENV X=not-the-secret\n\
         RUN --mount=type=secret,id=s cat /run/secrets/s && echo\n\
         RUN --mount=type=secret,id=e,env=X sh -c 'echo \"env-upper=$(echo \"$X\" | tr a-z A-Z)\"' && echo env-ok > /ok\n",
    );
    let out = env
        .kiln(&[
            "build",
            "--progress=plain",
            "--no-cache",
            "-t",
            "t/sec",
            "--secret",
            &format!("id=s,src={}", s(&env.path("secret.txt"))),
            "--secret",
            "id=e,env=KILN_TEST_SECRET",
            s(&ctx),
        ])
        .env("KILN_TEST_SECRET", env_secret)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", frame(&out));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(file_secret),
        "the step printed the file secret:\n{log}"
    );
    assert!(
        log.contains(&format!("env-upper={}", env_secret.to_uppercase())),
        "the env secret was set:\n{log}"
    );
    assert_eq!(run(&env, "t/sec", &["cat", "/ok"]), "env-ok\n");
    // No mount stub or secret file stays in the image.
    assert_eq!(
        run(
            &env,
            "t/sec",
            &["sh", "-c", "ls /run/secrets 2>/dev/null | wc -l"]
        )
        .trim(),
        "0"
    );
    // Neither value is in any layer blob.
    let archive = env.path("sec.tar");
    env.ok(&["save", "-o", s(&archive), "t/sec"]);
    let unpacked = env.path("sec-unpacked");
    std::fs::create_dir_all(&unpacked).unwrap();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(st.success());
    let blobs = files_under(&unpacked);
    assert!(blobs.len() > 2, "the archive holds layers: {blobs:?}");
    for f in blobs {
        let mut bytes = std::fs::read(&f).unwrap();
        if bytes.starts_with(&[0x1f, 0x8b]) {
            bytes = Command::new("gzip")
                .args(["-dc"])
                .arg(&f)
                .output()
                .unwrap()
                .stdout;
        }
        assert!(
            !contains(&bytes, file_secret.as_bytes()),
            "{} holds the file secret",
            f.display()
        );
        assert!(
            !contains(&bytes, env_secret.as_bytes()),
            "{} holds the env secret",
            f.display()
        );
    }
}

#[test]
fn missing_required_secret_fails_naming_it() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nRUN --mount=type=secret,id=mytoken,required=true cat /run/secrets/mytoken\n",
    );
    let err = build_fails(&env, &ctx, &[]);
    assert!(err.contains("secret mytoken not found"), "{err}");
    assert!(err.contains("Dockerfile:2"), "{err}");
    // A secret file that cannot be read names the flag's file.
    let err = build_fails(&env, &ctx, &["--secret", "id=mytoken,src=/nonexistent/tok"]);
    assert!(err.contains("/nonexistent/tok"), "{err}");
}

#[test]
fn ssh_agent_socket_is_mounted() {
    let (env, ctx) = setup();
    let sock = env.path("agent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nRUN --mount=type=ssh sh -c 'test -S \"$SSH_AUTH_SOCK\" && echo \"agent-at=$SSH_AUTH_SOCK\"'\n",
    );
    let out = env
        .kiln(&["build", "--progress=plain", "--ssh", "default", s(&ctx)])
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", frame(&out));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("agent-at=/run/buildkit/ssh_agent.0"), "{log}");
    // Without --ssh the required default fails clearly.
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nRUN --mount=type=ssh,required=true true\n",
    );
    let err = build_fails(&env, &ctx, &[]);
    assert!(err.contains("--ssh default"), "{err}");
}

#[test]
fn network_host_and_insecure_need_entitlements() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nRUN --network=host echo host-net-ran\n",
    );
    let err = build_fails(&env, &ctx, &[]);
    assert!(err.contains("network.host"), "{err}");
    let log = build(&env, &ctx, &["--allow", "network.host"]);
    assert!(log.contains("host-net-ran"), "{log}");

    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nRUN --security=insecure echo insecure-ran\n",
    );
    let err = build_fails(&env, &ctx, &[]);
    assert!(err.contains("security.insecure"), "{err}");
    let log = build(&env, &ctx, &["--allow", "security.insecure"]);
    assert!(log.contains("insecure-ran"), "{log}");

    let err = build_fails(&env, &ctx, &["--allow", "network.hots"]);
    assert!(err.contains("--allow") && err.contains("network.hots"), "{err}");
}

#[test]
fn network_none_sees_only_loopback() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nRUN --network=none cat /proc/net/dev > /dev.txt\n",
    );
    build(&env, &ctx, &["-t", "t/netnone"]);
    let dev = run(&env, "t/netnone", &["cat", "/dev.txt"]);
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim()))
        .collect();
    assert_eq!(ifaces, ["lo"], "{dev}");
}

#[test]
fn iidfile_and_metadata_file_match_the_image() {
    let (env, ctx) = setup();
    write(&ctx, "Dockerfile", "FROM busybox:local\nRUN echo x > /x\n");
    let iid = env.path("iid");
    let meta = env.path("meta.json");
    let out = env.ok(&[
        "build",
        "-q",
        "-t",
        "t/iid",
        "--iidfile",
        s(&iid),
        "--metadata-file",
        s(&meta),
        s(&ctx),
    ]);
    let printed = String::from_utf8(out.stdout).unwrap();
    let from_file = std::fs::read_to_string(&iid).unwrap();
    assert!(from_file.starts_with("sha256:"), "{from_file}");
    assert_eq!(printed.trim(), from_file);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let digest = v["containerimage.digest"].as_str().unwrap();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{v}");
    let info = env.inspect("t/iid");
    assert_eq!(info["Id"].as_str().unwrap(), from_file);
    let repo_digests = info["RepoDigests"].to_string();
    assert!(repo_digests.contains(digest), "{repo_digests} vs {digest}");
}

/// JSON's type of a value, for shape comparisons.
fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "bool",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

fn is_digest(v: &serde_json::Value) -> bool {
    v.as_str().is_some_and(|d| {
        d.len() == 71
            && d.starts_with("sha256:")
            && d[7..]
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    })
}

#[test]
fn metadata_file_has_the_keys_and_shapes_buildkit_writes() {
    let (env, ctx) = setup();
    write(&ctx, "Dockerfile", "FROM busybox:local\nRUN echo m > /m\n");
    let meta = env.path("meta.json");
    build(
        &env,
        &ctx,
        &["-t", "t/meta:1", "-t", "t/meta:2", "--metadata-file", s(&meta)],
    );
    let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let reference_path = crate::harness::workspace().join("testdata/buildkit/metadata-file.json");
    let buildkit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference_path).unwrap()).unwrap();
    // Every key BuildKit writes but provenance (kiln makes no attestations), no other, each of
    // the same JSON type, nested objects too.
    let keys = |v: &serde_json::Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    let mut want = keys(&buildkit);
    want.retain(|k| k != "buildx.build.provenance");
    assert_eq!(keys(&got), want, "{got:#}");
    for k in &want {
        assert_eq!(json_type(&got[k]), json_type(&buildkit[k]), "{k}: {got:#}");
    }
    let (desc, bk_desc) = (
        &got["containerimage.descriptor"],
        &buildkit["containerimage.descriptor"],
    );
    assert_eq!(keys(desc), keys(bk_desc), "{desc:#}");
    assert_eq!(
        keys(&desc["annotations"]),
        keys(&bk_desc["annotations"]),
        "{desc:#}"
    );
    for k in keys(bk_desc) {
        assert_eq!(json_type(&desc[&k]), json_type(&bk_desc[&k]), "descriptor {k}");
    }
    assert_eq!(desc["mediaType"], bk_desc["mediaType"]);
    for d in [
        &got["containerimage.digest"],
        &got["containerimage.config.digest"],
        &desc["digest"],
        &desc["annotations"]["config.digest"],
    ] {
        assert!(is_digest(d), "{d} in {got:#}");
    }
    assert_eq!(got["containerimage.digest"], desc["digest"]);
    assert_eq!(
        got["containerimage.config.digest"],
        desc["annotations"]["config.digest"]
    );
    // The values are the image's: its manifest (size included), its config, its creation time.
    let info = env.inspect("t/meta:1");
    assert_eq!(info["Id"], got["containerimage.config.digest"]);
    assert_eq!(
        info["Created"],
        desc["annotations"]["org.opencontainers.image.created"]
    );
    let manifest_hex = &desc["digest"].as_str().unwrap()[7..];
    let manifest_size = std::fs::metadata(env.root().join("blobs/sha256").join(manifest_hex))
        .unwrap()
        .len();
    assert_eq!(desc["size"].as_u64(), Some(manifest_size));
    assert_eq!(got["image.name"], "docker.io/t/meta:1,docker.io/t/meta:2");
    // buildx's builder/node/ref, the ref 25 base-36 digits.
    let build_ref = got["buildx.build.ref"].as_str().unwrap();
    let parts: Vec<&str> = build_ref.split('/').collect();
    assert_eq!(parts.len(), 3, "{build_ref}");
    assert!(
        parts[2].len() == 25
            && parts[2]
                .bytes()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()),
        "{build_ref}"
    );

    // Without a name BuildKit writes no image.name; a second build has another ref.
    build(&env, &ctx, &["--metadata-file", s(&meta)]);
    let unnamed: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert!(unnamed.get("image.name").is_none(), "{unnamed:#}");
    assert_ne!(unnamed["buildx.build.ref"], got["buildx.build.ref"]);
    assert_eq!(unnamed["containerimage.digest"], got["containerimage.digest"]);
}

#[test]
fn docker_and_oci_outputs_load_elsewhere() {
    let (env, ctx) = setup();
    write(&ctx, "Dockerfile", "FROM busybox:local\nRUN echo exported > /e\n");
    let docker = env.path("img-docker.tar");
    let oci = env.path("img-oci.tar");
    build(
        &env,
        &ctx,
        &[
            "-t",
            "t/exp:1",
            "-o",
            &format!("type=docker,dest={}", s(&docker)),
            "-o",
            &format!("type=oci,dest={}", s(&oci)),
        ],
    );
    for archive in [&docker, &oci] {
        let other = Env::new();
        let out = other.ok(&["load", "-i", s(archive)]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("Loaded image"), "{said}");
        assert_eq!(run(&other, "t/exp:1", &["cat", "/e"]), "exported\n");
    }
}

#[test]
fn local_and_tar_outputs_hold_the_final_filesystem() {
    let (env, ctx) = setup();
    write(&ctx, "a.txt", "copied\n");
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nCOPY a.txt /a.txt\nRUN mkdir /d && echo gone > /d/gone && echo kept > /d/kept\nRUN rm /d/gone\n",
    );
    let dir = env.path("out-dir");
    let tar = env.path("out.tar");
    build(
        &env,
        &ctx,
        &[
            "-o",
            &format!("type=local,dest={}", s(&dir)),
            "-o",
            &format!("type=tar,dest={}", s(&tar)),
        ],
    );
    assert_eq!(std::fs::read_to_string(dir.join("a.txt")).unwrap(), "copied\n");
    assert_eq!(std::fs::read_to_string(dir.join("d/kept")).unwrap(), "kept\n");
    assert!(!dir.join("d/gone").exists(), "the whiteout was applied");
    assert!(dir.join("bin/busybox").exists(), "the base image is included");
    let listing = Command::new("tar").arg("-tf").arg(&tar).output().unwrap();
    assert!(listing.status.success());
    let names = String::from_utf8(listing.stdout).unwrap();
    let names: Vec<&str> = names.lines().map(|n| n.trim_start_matches("./")).collect();
    assert!(names.contains(&"a.txt"), "{names:?}");
    assert!(names.contains(&"d/kept"), "{names:?}");
    assert!(!names.contains(&"d/gone"), "{names:?}");
    assert!(!names.iter().any(|n| n.contains(".wh.")), "{names:?}");
}

#[test]
fn labels_platform_and_target_flags() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local AS builder\nRUN echo b > /b\nFROM busybox:local\nCOPY --from=builder /b /b\n",
    );
    build(
        &env,
        &ctx,
        &[
            "-t",
            "t/lbl",
            "--label",
            "org.example.k=v 1",
            "--label",
            "other=2",
        ],
    );
    let info = env.inspect("t/lbl");
    assert_eq!(info["Config"]["Labels"]["org.example.k"], "v 1", "{info}");
    assert_eq!(info["Config"]["Labels"]["other"], "2", "{info}");

    // Other architectures are built (under emulation: tests/it/multiplatform.rs); other
    // operating systems are not.
    let err = build_fails(&env, &ctx, &["--platform", "windows/amd64"]);
    assert!(
        err.contains("windows/amd64") && err.contains("not supported"),
        "{err}"
    );

    let err = build_fails(&env, &ctx, &["--target", "biulder"]);
    assert!(err.contains("did you mean builder"), "{err}");
    // A good --target builds only up to that stage.
    build(&env, &ctx, &["-t", "t/tgt", "--target", "builder"]);
    assert_eq!(run(&env, "t/tgt", &["cat", "/b"]), "b\n");
}

#[test]
fn no_cache_filter_reruns_only_that_stage() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local AS a\nRUN cat /proc/sys/kernel/random/uuid > /a\n\
         FROM busybox:local AS b\nRUN cat /proc/sys/kernel/random/uuid > /b\n\
         FROM busybox:local\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n",
    );
    build(&env, &ctx, &["-t", "t/ncf"]);
    let a1 = run(&env, "t/ncf", &["cat", "/a"]);
    let b1 = run(&env, "t/ncf", &["cat", "/b"]);
    build(&env, &ctx, &["-t", "t/ncf", "--no-cache-filter", "b"]);
    assert_eq!(run(&env, "t/ncf", &["cat", "/a"]), a1, "stage a stays cached");
    assert_ne!(run(&env, "t/ncf", &["cat", "/b"]), b1, "stage b runs again");
}

#[test]
fn cache_mount_persists_across_no_cache_builds_and_stays_out_of_the_image() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nRUN --mount=type=cache,target=/c sh -c 'echo run >> /c/count; wc -l < /c/count > /seen'\n",
    );
    build(&env, &ctx, &["-t", "t/cm", "--no-cache"]);
    assert_eq!(run(&env, "t/cm", &["cat", "/seen"]).trim(), "1");
    build(&env, &ctx, &["-t", "t/cm", "--no-cache"]);
    assert_eq!(run(&env, "t/cm", &["cat", "/seen"]).trim(), "2");
    assert_eq!(
        run(&env, "t/cm", &["sh", "-c", "ls -A /c 2>/dev/null | wc -l"]).trim(),
        "0",
        "nothing of the cache mount is in the image"
    );
}

#[test]
fn build_arg_without_value_comes_from_the_environment() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nARG FOO\nARG BAR=dflt\nRUN echo \"$FOO $BAR\" > /v\n",
    );
    let out = env
        .kiln(&[
            "build",
            "-q",
            "-t",
            "t/env",
            "--build-arg",
            "FOO",
            "--build-arg",
            "BAR",
            s(&ctx),
        ])
        .env("FOO", "from-env")
        .env_remove("BAR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", frame(&out));
    // An unset variable leaves the ARG's default alone.
    assert_eq!(run(&env, "t/env", &["cat", "/v"]), "from-env dflt\n");
}

#[test]
fn ctrl_c_stops_the_build_and_cleans_up() {
    let (env, ctx) = setup();
    write(&ctx, "Dockerfile", "FROM busybox:local\nRUN sleep 37\n");
    let mut child = env
        .kiln(&["build", "--progress=plain", s(&ctx)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    // Wait until the step's process runs.
    let start = Instant::now();
    while pids_running(&["sleep", "37"]).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the RUN step never started"
        );
        if let Some(st) = child.try_wait().unwrap() {
            panic!("kiln exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(st.success());
    let interrupted = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if interrupted.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("kiln did not stop within 10 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "kiln should fail when interrupted:\n{stderr}");
    assert!(
        interrupted.elapsed() < Duration::from_secs(5),
        "took {:?}",
        interrupted.elapsed()
    );
    assert!(
        pids_running(&["sleep", "37"]).is_empty(),
        "the step's process survived"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(s(&env.root())), "mounts left behind:\n{mounts}");
    assert!(tmp_leftovers(&env).is_empty(), "{:?}", tmp_leftovers(&env));
    let snap_tmp: Vec<_> = std::fs::read_dir(env.root().join("snapshots/tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        snap_tmp
            .iter()
            .all(|p| p.extension().is_some_and(|e| e == "lock")),
        "temporary snapshots left: {snap_tmp:?}"
    );
}

/// The output lines of the build's RUN steps (`#N 0.123 line` without the prefix), in order.
pub(crate) fn run_output(plain: &str) -> Vec<String> {
    plain
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('#')?;
            let (_, rest) = rest.split_once(' ')?;
            let (t, line) = rest.split_once(' ')?;
            (t.contains('.') && t.parse::<f64>().is_ok()).then(|| line.to_string())
        })
        .collect()
}

#[test]
fn network_and_add_host_flags_match_buildkit() {
    let (env, ctx) = setup();
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nRUN cat /etc/hosts && ls /sys/class/net\n",
    );
    let flags = ["--no-cache", "--add-host", "foo:1.2.3.4", "--add-host", "six:::1"];
    let kiln = |net: &str| {
        let mut a = flags.to_vec();
        a.push(net);
        run_output(&build(&env, &ctx, &a))
    };
    let docker = crate::harness::docker();
    let reference = |net: &str| {
        let out = Command::new(&docker)
            .args(["build", "--progress=plain"])
            .args(flags)
            .arg(net)
            .arg(&ctx)
            .env("DOCKER_BUILDKIT", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", frame(&out));
        run_output(&String::from_utf8_lossy(&out.stderr))
    };
    for net in ["--network=none", "--network=default"] {
        let (k, d) = (kiln(net), reference(net));
        assert_eq!(
            k, d,
            "{net}: kiln's RUN saw other hosts or interfaces than BuildKit's"
        );
    }
    assert!(kiln("--network=none").contains(&"1.2.3.4\tfoo".to_string()));
    // host: the host's interfaces, without --allow (buildx grants network.host with it).
    let mut host_ifaces: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        // Other tests' containers come and go on the bridge meanwhile: their veths are not stable.
        .filter(|i| !i.starts_with("veth"))
        .collect();
    host_ifaces.sort();
    let seen = kiln("--network=host");
    assert!(
        host_ifaces.iter().all(|i| seen.contains(i)),
        "{seen:?} vs the host's {host_ifaces:?}"
    );
    // A RUN's own --network wins over the build's.
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nRUN --network=none ls /sys/class/net\n",
    );
    assert_eq!(kiln("--network=host"), vec!["lo".to_string()]);

    let err = build_fails(&env, &ctx, &["--network=bridge"]);
    assert!(
        err.contains("network mode \"bridge\" not supported by buildkit"),
        "{err}"
    );
    for bad in ["nohost", "foo:notanip", ":1.2.3.4"] {
        let err = build_fails(&env, &ctx, &["--add-host", bad]);
        assert!(err.contains(&format!("invalid host {bad}")), "{err}");
    }
}
