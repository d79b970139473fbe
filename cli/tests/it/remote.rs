//! Remote inputs end to end against real loopback servers: `git daemon` (git://), `git
//! http-backend` behind a small HTTP server in this file (smart HTTP), `file://` repositories,
//! and an HTTP server serving tarball contexts, Dockerfiles and files (including one that drops
//! the connection, one that always truncates, one with the wrong bytes). Needs root and git.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::{busybox_env, require_root, Env};

// ---------------------------------------------------------------- git repositories

/// Runs git in `dir` with a fixed identity and no host configuration.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=kiln",
            "-c",
            "user.email=kiln@test",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(["-c", "protocol.file.allow=always"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("this test needs the `git` binary");
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// Repositories served by the tests, as bare repos under `srv/`.
struct Repos {
    srv: PathBuf,
    /// Commit of tag `v1` (a.txt = "one").
    v1: String,
    /// Commit of `main` (a.txt = "two").
    main: String,
}

/// `srv/repo.git`: main has a Dockerfile copying everything, `a.txt`, and `sub/` with its own
/// Dockerfile; the annotated tag v1 is the first commit.
fn make_repos(env: &Env) -> Repos {
    let work = env.path("work/repo");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q"]);
    write(&work, "Dockerfile", "FROM scratch\nCOPY . /ctx/\n");
    write(&work, "a.txt", "one");
    write(&work, "sub/Dockerfile", "FROM scratch\nCOPY . /ctx/\n");
    write(&work, "sub/b.txt", "bee");
    git(&work, &["add", "."]);
    git(&work, &["commit", "-qm", "one"]);
    git(&work, &["tag", "-a", "v1", "-m", "version 1"]);
    let v1 = git(&work, &["rev-parse", "HEAD"]);
    write(&work, "a.txt", "two");
    git(&work, &["commit", "-qam", "two"]);
    let main = git(&work, &["rev-parse", "HEAD"]);
    let srv = env.path("srv");
    std::fs::create_dir_all(&srv).unwrap();
    git(
        &srv,
        &["clone", "-q", "--bare", work.to_str().unwrap(), "repo.git"],
    );
    Repos { srv, v1, main }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what} did not start listening on 127.0.0.1:{port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `git daemon` on loopback, killed on drop. Started as `git-daemon` itself from git's exec
/// path: `git daemon` runs it as a child, which killing `git` would leave behind.
struct Daemon {
    child: Child,
    port: u16,
}

impl Daemon {
    fn start(base: &Path) -> Daemon {
        let port = free_port();
        let exec_path = Command::new("git")
            .arg("--exec-path")
            .output()
            .expect("git --exec-path");
        let exec_path = String::from_utf8_lossy(&exec_path.stdout).trim().to_string();
        let child = Command::new(Path::new(&exec_path).join("git-daemon"))
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("this test needs `git daemon` (git-daemon-run or git's libexec)");
        let d = Daemon { child, port };
        wait_for_port(port, "git daemon");
        d
    }

    fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- a small HTTP server

struct Request {
    method: String,
    path: String,
    query: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

type Handler = dyn Fn(&Request) -> Vec<u8> + Send + Sync;

/// Serves every connection on its own thread with `handler`; one request per connection.
fn serve(handler: Arc<Handler>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let handler = handler.clone();
            std::thread::spawn(move || {
                if let Some(req) = read_request(&stream) {
                    let mut stream = stream;
                    let _ = stream.write_all(&handler(&req));
                    let _ = stream.flush();
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                }
            });
        }
    });
    port
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut r = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if let Some(len) = headers
        .get("content-length")
        .and_then(|l| l.parse::<usize>().ok())
    {
        body.resize(len, 0);
        r.read_exact(&mut body).ok()?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Some(Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body,
    })
}

fn response(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Runs `git http-backend` as a CGI program for `req` (smart HTTP, protocol v2 included).
fn git_cgi(root: &Path, req: &Request) -> Vec<u8> {
    let header = |k: &str| req.headers.get(k).cloned().unwrap_or_default();
    let mut child = Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", root)
        .env("REQUEST_METHOD", &req.method)
        .env("PATH_INFO", &req.path)
        .env("QUERY_STRING", &req.query)
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", req.body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("this test needs `git http-backend`");
    let mut stdin = child.stdin.take().unwrap();
    let body = req.body.clone();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output().unwrap();
    let _ = feeder.join();
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)));
    let Some((at, sep)) = split else {
        return response("500 Internal Server Error", &[], b"bad cgi output");
    };
    let head = String::from_utf8_lossy(&raw[..at]).to_string();
    let mut status = "200 OK".to_string();
    let mut headers = Vec::new();
    for l in head.lines() {
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("status") {
                status = v.trim().to_string();
            } else {
                headers.push((k.trim(), v.trim().to_string()));
            }
        }
    }
    response(&status, &headers, &raw[at + sep..])
}

// ---------------------------------------------------------------- helpers

fn build_local(env: &Env, out: &Path, args: &[&str]) -> String {
    let mut a = vec![
        "build".to_string(),
        "--progress=plain".to_string(),
        "-o".to_string(),
        format!("type=local,dest={}", out.display()),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    String::from_utf8_lossy(&env.ok(&refs).stderr).into_owned()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn sha256_of(bytes: &[u8]) -> String {
    // The tests may not depend on a hashing crate: ask coreutils.
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    let hex = String::from_utf8_lossy(&out.stdout);
    format!("sha256:{}", hex.split_whitespace().next().unwrap())
}

// ---------------------------------------------------------------- Git contexts

#[test]
fn git_daemon_contexts_branch_tag_commit_subdir_and_missing_ref() {
    require_root();
    let env = Env::new();
    let repos = make_repos(&env);
    let daemon = Daemon::start(&repos.srv);
    let url = daemon.url("repo.git");

    let out = env.path("out-main");
    build_local(&env, &out, &[&format!("{url}#main")]);
    assert_eq!(read(&out.join("ctx/a.txt")), "two");
    assert!(!out.join("ctx/.git").exists(), ".git must be dropped by default");

    let out = env.path("out-tag");
    build_local(&env, &out, &[&format!("{url}#v1")]);
    assert_eq!(read(&out.join("ctx/a.txt")), "one");

    let out = env.path("out-commit");
    build_local(&env, &out, &[&format!("{url}#{}", repos.v1)]);
    assert_eq!(read(&out.join("ctx/a.txt")), "one");

    let out = env.path("out-sub");
    build_local(&env, &out, &[&format!("{url}#main:sub")]);
    assert_eq!(read(&out.join("ctx/b.txt")), "bee");
    assert!(!out.join("ctx/a.txt").exists(), "only the subdir is the context");

    // `-f` is relative to the repository, not to the current directory.
    let out = env.path("out-file-flag");
    build_local(&env, &out, &["-f", "sub/Dockerfile", &format!("{url}#main")]);
    assert_eq!(read(&out.join("ctx/sub/b.txt")), "bee");
    assert_eq!(read(&out.join("ctx/a.txt")), "two");

    let out = env.path("out-keep");
    build_local(
        &env,
        &out,
        &["--build-arg", "BUILDKIT_CONTEXT_KEEP_GIT_DIR=1", &url],
    );
    assert!(
        out.join("ctx/.git").is_dir(),
        "BUILDKIT_CONTEXT_KEEP_GIT_DIR=1 keeps .git"
    );
    assert_eq!(git(&out.join("ctx"), &["rev-parse", "HEAD"]), repos.main);

    let err = env.fails(&["build", &format!("{url}#nope")]);
    assert!(
        err.contains("`nope`") && err.contains(&url),
        "the error names the ref and the URL:\n{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one error line:\n{err}");
    let leftovers: Vec<_> = std::fs::read_dir(env.root().join("tmp"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "temp dirs left behind: {leftovers:?}");
}

#[test]
fn file_url_context_and_submodules() {
    require_root();
    let env = Env::new();
    let repos = make_repos(&env);
    let daemon = Daemon::start(&repos.srv);

    // file://
    let out = env.path("out-file");
    build_local(
        &env,
        &out,
        &[&format!("file://{}#v1", repos.srv.join("repo.git").display())],
    );
    assert_eq!(read(&out.join("ctx/a.txt")), "one");

    // A repository with a submodule served by the daemon.
    let lib = env.path("work/lib");
    std::fs::create_dir_all(&lib).unwrap();
    git(&lib, &["init", "-q"]);
    write(&lib, "lib.txt", "library");
    git(&lib, &["add", "."]);
    git(&lib, &["commit", "-qm", "lib"]);
    git(
        &repos.srv,
        &["clone", "-q", "--bare", lib.to_str().unwrap(), "lib.git"],
    );
    let app = env.path("work/app");
    std::fs::create_dir_all(&app).unwrap();
    git(&app, &["init", "-q"]);
    write(&app, "Dockerfile", "FROM scratch\nCOPY . /ctx/\n");
    git(&app, &["submodule", "add", "-q", &daemon.url("lib.git"), "lib"]);
    git(&app, &["add", "."]);
    git(&app, &["commit", "-qm", "app"]);
    git(
        &repos.srv,
        &["clone", "-q", "--bare", app.to_str().unwrap(), "app.git"],
    );

    let out = env.path("out-sub");
    build_local(&env, &out, &[&daemon.url("app.git")]);
    assert_eq!(read(&out.join("ctx/lib/lib.txt")), "library");
    assert!(
        !out.join("ctx/lib/.git").exists(),
        "submodule .git files are dropped too"
    );
}

/// Counts `fetch` commands the smart-HTTP server answered.
fn smart_http(root: &Path) -> (u16, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let f = fetches.clone();
    let root = root.to_path_buf();
    let port = serve(Arc::new(move |req: &Request| {
        if req.method == "POST" && req.path.ends_with("git-upload-pack") {
            let text = String::from_utf8_lossy(&req.body);
            if text.contains("command=fetch") || text.contains("want ") {
                f.fetch_add(1, Ordering::SeqCst);
            }
        }
        git_cgi(&root, req)
    }));
    (port, fetches)
}

#[test]
fn add_from_git_over_smart_http_is_cached_and_keeps_git_dir_on_request() {
    require_root();
    let env = Env::new();
    let repos = make_repos(&env);
    let (port, fetches) = smart_http(&repos.srv);
    let url = format!("http://127.0.0.1:{port}/repo.git");
    let ctx = env.path("ctx");
    write(
        &ctx,
        "Dockerfile",
        &format!("FROM scratch\nADD {url}#v1 /src\nADD --keep-git-dir=true {url}#main /kept\n"),
    );
    let out = env.path("out");
    build_local(&env, &out, &[ctx.to_str().unwrap()]);
    assert_eq!(read(&out.join("src/a.txt")), "one");
    assert!(!out.join("src/.git").exists());
    assert_eq!(read(&out.join("kept/a.txt")), "two");
    assert!(out.join("kept/.git").is_dir(), "--keep-git-dir keeps .git");
    let first = fetches.load(Ordering::SeqCst);
    assert!(first >= 2, "both sources were fetched over smart HTTP ({first})");

    let log = build_local(&env, &env.path("out2"), &[ctx.to_str().unwrap()]);
    assert!(log.contains("CACHED"), "the rebuild is cached:\n{log}");
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        first,
        "an unchanged repository is only ls-remote'd, never fetched again:\n{log}"
    );
}

// ---------------------------------------------------------------- HTTP

const LAST_MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";
const LAST_MODIFIED_SECS: i64 = 1_445_412_480;

struct Files {
    port: u16,
    flaky: Arc<AtomicUsize>,
    not_modified: Arc<AtomicUsize>,
}

/// Serves tarball contexts, a Dockerfile and files for ADD.
fn file_server(env: &Env) -> Files {
    let tctx = env.path("tarctx");
    write(&tctx, "Dockerfile", "FROM scratch\nCOPY hello.txt /hello.txt\n");
    write(&tctx, "hello.txt", "hello from a tarball");
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    for (name, flag) in [
        ("ctx.tar.gz", "-czf"),
        ("ctx.tar.bz2", "-cjf"),
        ("ctx.tar.xz", "-cJf"),
        ("ctx.tar", "-cf"),
    ] {
        let dest = env.path(name);
        let st = Command::new("tar")
            .args(["-C", tctx.to_str().unwrap(), flag, dest.to_str().unwrap(), "."])
            .status()
            .expect("this test needs tar");
        assert!(st.success(), "tar {flag}");
        files.insert(format!("/{name}"), std::fs::read(&dest).unwrap());
    }
    let escape = env.path("escape.tar");
    let st = Command::new("python3")
        .arg("-c")
        .arg(
            "import io,sys,tarfile\nt=tarfile.open(sys.argv[1],'w')\nfor n,d in [('Dockerfile',b'FROM scratch\\n'),('../escape',b'x')]:\n i=tarfile.TarInfo(n); i.size=len(d); t.addfile(i, io.BytesIO(d))\nt.close()",
        )
        .arg(&escape)
        .status()
        .expect("this test needs python3");
    assert!(st.success());
    files.insert("/escape.tar".into(), std::fs::read(&escape).unwrap());
    let files = Arc::new(files);
    let flaky = Arc::new(AtomicUsize::new(0));
    let not_modified = Arc::new(AtomicUsize::new(0));
    let (fl, nm) = (flaky.clone(), not_modified.clone());
    let port = serve(Arc::new(move |req: &Request| match req.path.as_str() {
        "/Dockerfile" => response("200 OK", &[], b"FROM busybox:local\nRUN echo plain > /p.txt\n"),
        "/file.txt" => {
            if req.headers.get("if-none-match").map(String::as_str) == Some("\"f1\"") {
                nm.fetch_add(1, Ordering::SeqCst);
                return b"HTTP/1.1 304 Not Modified\r\nETag: \"f1\"\r\nConnection: close\r\n\r\n".to_vec();
            }
            response(
                "200 OK",
                &[("Last-Modified", LAST_MODIFIED.into()), ("ETag", "\"f1\"".into())],
                b"file contents\n",
            )
        }
        "/flaky.txt" => {
            if fl.fetch_add(1, Ordering::SeqCst) == 0 {
                b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\nConnection: close\r\n\r\nflaky-h".to_vec()
            } else {
                response("200 OK", &[], b"flaky-but-whole-body")
            }
        }
        "/truncated.txt" => {
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nshort".to_vec()
        }
        "/wrong.txt" => response("200 OK", &[], b"these are the wrong bytes"),
        p => match files.get(p) {
            Some(b) => response("200 OK", &[], b),
            None => response("404 Not Found", &[], b""),
        },
    }));
    Files {
        port,
        flaky,
        not_modified,
    }
}

#[test]
fn http_tarball_and_dockerfile_contexts() {
    let env = busybox_env();
    let files = file_server(&env);
    for name in ["ctx.tar.gz", "ctx.tar.bz2", "ctx.tar.xz", "ctx.tar"] {
        let out = env.path(&format!("out-{name}"));
        build_local(&env, &out, &[&format!("http://127.0.0.1:{}/{name}", files.port)]);
        assert_eq!(read(&out.join("hello.txt")), "hello from a tarball", "{name}");
    }
    // A plain file is the Dockerfile, with an empty context.
    let out = env.path("out-df");
    build_local(
        &env,
        &out,
        &[&format!("http://127.0.0.1:{}/Dockerfile", files.port)],
    );
    assert_eq!(read(&out.join("p.txt")), "plain\n");

    // Entries escaping the root: one clear error naming the entry, nothing left behind.
    let err = env.fails(&["build", &format!("http://127.0.0.1:{}/escape.tar", files.port)]);
    assert!(err.contains("../escape"), "the error names the entry:\n{err}");
    assert!(!env.root().join("tmp").join("escape").exists());
    let leftovers: Vec<_> = std::fs::read_dir(env.root().join("tmp"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "temp dirs left behind: {leftovers:?}");
}

#[test]
fn add_from_url_mode_mtime_retries_truncation_and_checksum() {
    require_root();
    let env = Env::new();
    let files = file_server(&env);
    let base = format!("http://127.0.0.1:{}", files.port);
    let ctx = env.path("ctx");
    write(
        &ctx,
        "Dockerfile",
        &format!(
            "FROM scratch\nADD {base}/file.txt /f/\nADD --chmod=644 {base}/file.txt /g/file.txt\nADD {base}/flaky.txt /flaky.txt\nADD {base}/ctx.tar.gz /archive/\n"
        ),
    );
    let out = env.path("out");
    build_local(&env, &out, &[ctx.to_str().unwrap()]);
    let f = std::fs::metadata(out.join("f/file.txt")).unwrap();
    assert_eq!(
        f.permissions().mode() & 0o7777,
        0o600,
        "ADD from a URL is 0600 by default"
    );
    assert_eq!(f.mtime(), LAST_MODIFIED_SECS, "mtime from Last-Modified");
    assert_eq!(read(&out.join("f/file.txt")), "file contents\n");
    let g = std::fs::metadata(out.join("g/file.txt")).unwrap();
    assert_eq!(g.permissions().mode() & 0o7777, 0o644, "--chmod overrides");
    assert_eq!(read(&out.join("flaky.txt")), "flaky-but-whole-body");
    assert_eq!(
        files.flaky.load(Ordering::SeqCst),
        2,
        "one dropped attempt, one retry"
    );
    assert!(
        out.join("archive/ctx.tar.gz").is_file(),
        "ADD from a URL does not extract archives"
    );

    // Unchanged URL with an ETag: a conditional request, and the step is cached.
    let log = build_local(&env, &env.path("out2"), &[ctx.to_str().unwrap()]);
    assert!(
        files.not_modified.load(Ordering::SeqCst) >= 1,
        "no conditional request:\n{log}"
    );
    assert!(log.contains("CACHED"), "{log}");

    // Always truncated: a clear error after the retries.
    write(
        &ctx,
        "Dockerfile",
        &format!("FROM scratch\nADD {base}/truncated.txt /t\n"),
    );
    let err = env.fails(&["build", ctx.to_str().unwrap()]);
    assert!(
        err.contains("truncated") && err.contains("truncated.txt"),
        "{err}"
    );

    // Wrong bytes for the checksum: URL, expected and actual digest named, nothing cached.
    let right = sha256_of(b"the right bytes");
    let wrong = sha256_of(b"these are the wrong bytes");
    write(
        &ctx,
        "Dockerfile",
        &format!("FROM scratch\nADD --checksum={right} {base}/wrong.txt /w\n"),
    );
    let err = env.fails(&["build", ctx.to_str().unwrap()]);
    assert!(
        err.contains("wrong.txt") && err.contains(&right) && err.contains(&wrong),
        "{err}"
    );
    // A matching checksum passes.
    write(
        &ctx,
        "Dockerfile",
        &format!("FROM scratch\nADD --checksum={wrong} {base}/wrong.txt /w\n"),
    );
    let out = env.path("out3");
    build_local(&env, &out, &[ctx.to_str().unwrap()]);
    assert_eq!(read(&out.join("w")), "these are the wrong bytes");
}

// ---------------------------------------------------------------- named contexts

#[test]
fn named_contexts_for_from_copy_and_run_mount() {
    let env = busybox_env();
    let repos = make_repos(&env);
    let daemon = Daemon::start(&repos.srv);
    let files = file_server(&env);
    let git_url = daemon.url("repo.git");
    let tarball = format!("http://127.0.0.1:{}/ctx.tar.gz", files.port);
    let ctx = env.path("ctx");
    let localdir = env.path("localdir");
    write(&localdir, "local.txt", "from a directory");

    // FROM name (a Git context).
    write(&ctx, "Dockerfile", "FROM src\n");
    let out = env.path("out-from");
    build_local(
        &env,
        &out,
        &[
            "--build-context",
            &format!("src={git_url}#main"),
            ctx.to_str().unwrap(),
        ],
    );
    assert_eq!(read(&out.join("a.txt")), "two");

    // FROM name (a local directory, an https tarball): the stage's rootfs is the context's files,
    // and RUN works on top of it.
    write(&localdir, "bin/sh-marker", "m");
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local AS tools
FROM dir
COPY --from=tools /bin/busybox /bin/busybox
RUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox cat /local.txt > /ran.txt\"]
",
    );
    let out = env.path("out-from-dir");
    build_local(
        &env,
        &out,
        &[
            "--build-context",
            &format!("dir={}", localdir.display()),
            ctx.to_str().unwrap(),
        ],
    );
    assert_eq!(read(&out.join("ran.txt")), "from a directory");
    assert_eq!(read(&out.join("bin/sh-marker")), "m");
    write(&ctx, "Dockerfile", "FROM web\n");
    let out = env.path("out-from-web");
    build_local(
        &env,
        &out,
        &[
            "--build-context",
            &format!("web={tarball}"),
            ctx.to_str().unwrap(),
        ],
    );
    assert_eq!(read(&out.join("hello.txt")), "hello from a tarball");

    // COPY . / onto scratch copies the context's contents to the root.
    write(&ctx, "Dockerfile", "FROM scratch\nCOPY . /\n");
    write(&ctx, "root.txt", "at the root");
    let out = env.path("out-root");
    build_local(&env, &out, &[ctx.to_str().unwrap()]);
    assert_eq!(read(&out.join("root.txt")), "at the root");
    std::fs::remove_file(ctx.join("root.txt")).unwrap();

    // COPY --from=name (Git at a tag, a directory) and RUN --mount from=name (an https tarball).
    write(
        &ctx,
        "Dockerfile",
        "FROM busybox:local\nCOPY --from=gitctx a.txt /copied.txt\nCOPY --from=dir local.txt /local.txt\nRUN --mount=from=web,target=/w cat /w/hello.txt > /mounted.txt\n",
    );
    let out = env.path("out-copy");
    build_local(
        &env,
        &out,
        &[
            "--build-context",
            &format!("gitctx={git_url}#v1"),
            "--build-context",
            &format!("dir={}", localdir.display()),
            "--build-context",
            &format!("web={tarball}"),
            ctx.to_str().unwrap(),
        ],
    );
    assert_eq!(read(&out.join("copied.txt")), "one");
    assert_eq!(read(&out.join("local.txt")), "from a directory");
    assert_eq!(read(&out.join("mounted.txt")), "hello from a tarball");

    // docker-image:// replaces an image name.
    write(&ctx, "Dockerfile", "FROM base\nRUN echo replaced > /r.txt\n");
    let out = env.path("out-image");
    build_local(
        &env,
        &out,
        &[
            "--build-context",
            "base=docker-image://busybox:local",
            ctx.to_str().unwrap(),
        ],
    );
    assert_eq!(read(&out.join("r.txt")), "replaced\n");

    // oci-layout:// from an OCI export of a small image.
    let small = env.path("small");
    write(&small, "Dockerfile", "FROM scratch\nCOPY s.txt /s.txt\n");
    write(&small, "s.txt", "from an oci layout");
    let oci_tar = env.path("small-oci.tar");
    env.ok(&[
        "build",
        "-q",
        "-o",
        &format!("type=oci,dest={}", oci_tar.display()),
        small.to_str().unwrap(),
    ]);
    let layout = env.path("layout");
    std::fs::create_dir_all(&layout).unwrap();
    let st = Command::new("tar")
        .args(["-C", layout.to_str().unwrap(), "-xf", oci_tar.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    write(&ctx, "Dockerfile", "FROM laid\n");
    let out = env.path("out-oci");
    build_local(
        &env,
        &out,
        &[
            "--build-context",
            &format!("laid=oci-layout://{}", layout.display()),
            ctx.to_str().unwrap(),
        ],
    );
    assert_eq!(read(&out.join("s.txt")), "from an oci layout");
}
