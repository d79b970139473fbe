//! `kiln pull/push/login/logout` and `FROM` a registry, against the reference registry
//! (Debian's docker-registry, via `../shared/peers/start-registry.sh`) on loopback, Docker, and
//! a small proxy written here that adds Bearer-token auth or injects faults (corrupt or
//! truncated blobs, 500s).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::harness::{docker, frame, require_root, shared_dir, Env};

/// A registry process, killed on drop.
pub(crate) struct Registry {
    pid: String,
    pub(crate) addr: String,
}

impl Registry {
    pub(crate) fn start(htpasswd: Option<&str>) -> Registry {
        let port = free_port();
        let script = shared_dir().join("peers/start-registry.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg(port.to_string());
        if let Some(h) = htpasswd {
            cmd.arg("--htpasswd").arg(h);
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "this test needs the reference registry (docker-registry): {} failed\n{}",
            script.display(),
            frame(&out)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or("").to_string();
        let (pid, addr) = last
            .split_once(' ')
            .unwrap_or_else(|| panic!("unexpected start-registry.sh output: {text}"));
        let reg = Registry {
            pid: pid.to_string(),
            addr: addr.to_string(),
        };
        // The script waits for the port; make sure it answers at all.
        let up = (0..40).any(|_| {
            let ok = TcpStream::connect(&reg.addr).is_ok();
            if !ok {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            ok
        });
        assert!(up, "the registry at {} did not start", reg.addr);
        reg
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// kiln with DOCKER_CONFIG inside the test's temp dir.
pub(crate) fn kiln(env: &Env, args: &[&str]) -> Output {
    env.kiln(args)
        .env("DOCKER_CONFIG", env.path("docker-config"))
        .env_remove("KILN_INSECURE_REGISTRIES")
        .output()
        .expect("spawn kiln")
}

pub(crate) fn ok(env: &Env, args: &[&str]) -> String {
    let out = kiln(env, args);
    assert!(out.status.success(), "kiln {args:?} failed\n{}", frame(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn fails(env: &Env, args: &[&str]) -> String {
    let out = kiln(env, args);
    assert!(
        !out.status.success(),
        "kiln {args:?} should have failed\n{}",
        frame(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub(crate) fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed\n{}", frame(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn blob_files(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("blobs/sha256"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn ingest_files(root: &Path) -> usize {
    std::fs::read_dir(root.join("ingest"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// What the proxy does to requests.
#[derive(Default)]
pub(crate) struct Faults {
    /// Require `Bearer` tokens from our own token endpoint, which checks these Basic creds.
    pub(crate) bearer: Option<(String, String)>,
    /// Serve this blob (`sha256:...`) with one byte flipped.
    pub(crate) corrupt: Option<String>,
    /// Cut this blob off halfway, once.
    pub(crate) truncate_once: Option<String>,
    /// Answer this many manifest requests with 500 first.
    pub(crate) fail_manifests: usize,
    /// Answer this many manifest requests with 429 (Retry-After: 0) first.
    pub(crate) throttle_manifests: usize,
    /// Answer every manifest request with this status line (e.g. `403 Forbidden`).
    pub(crate) deny_manifests: Option<&'static str>,
    /// Answer every blob upload request (`POST/PATCH/PUT .../blobs/uploads/`) with this status
    /// line.
    pub(crate) deny_uploads: Option<&'static str>,
}

/// An HTTP/1.1 proxy in front of a registry, one request per connection.
pub(crate) struct Proxy {
    pub(crate) addr: String,
    pub(crate) faults: Arc<Mutex<Faults>>,
    tokens_issued: Arc<AtomicUsize>,
    /// `METHOD PATH` of every request received.
    pub(crate) log: Arc<Mutex<Vec<String>>>,
    /// `PATH` and response bytes (head and body) of every blob `GET` answered from upstream.
    pub(crate) blob_gets: Arc<Mutex<Vec<(String, u64)>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn read_head(r: &mut BufReader<TcpStream>) -> Option<(String, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let request = line.trim_end().to_string();
    if request.is_empty() {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Some((request, headers))
}

impl Proxy {
    /// How many blob GETs of `digest` the proxy answered (from upstream, or faulted).
    pub(crate) fn blob_gets_of(&self, digest: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("GET ") && l.contains("/blobs/") && l.ends_with(digest))
            .count()
    }

    pub(crate) fn start(upstream: &str, faults: Faults) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let faults = Arc::new(Mutex::new(faults));
        let tokens = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let gets = Arc::new(Mutex::new(Vec::new()));
        let (f, t, s, up, me, l, g) = (
            faults.clone(),
            tokens.clone(),
            stop.clone(),
            upstream.to_string(),
            addr.clone(),
            log.clone(),
            gets.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (f, t, up, me, l, g) =
                    (f.clone(), t.clone(), up.clone(), me.clone(), l.clone(), g.clone());
                std::thread::spawn(move || handle(conn, &up, &me, &f, &t, &l, &g));
            }
        });
        Proxy {
            addr,
            faults,
            tokens_issued: tokens,
            log,
            blob_gets: gets,
            stop,
        }
    }
}

fn respond(mut c: &TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = c.write_all(head.as_bytes());
    let _ = c.write_all(body);
    let _ = c.flush();
    let _ = c.shutdown(Shutdown::Both);
}

fn handle(
    conn: TcpStream,
    upstream: &str,
    me: &str,
    faults: &Mutex<Faults>,
    tokens: &AtomicUsize,
    log: &Mutex<Vec<String>>,
    blob_gets: &Mutex<Vec<(String, u64)>>,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let Some((request, headers)) = read_head(&mut reader) else {
        return;
    };
    let mut parts = request.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    log.lock().unwrap().push(format!("{method} {path}"));
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let mut f = faults.lock().unwrap();
    if let Some((user, pass)) = f.bearer.clone() {
        if path.starts_with("/token") {
            use base64_lite::encode;
            let want = format!("Basic {}", encode(format!("{user}:{pass}").as_bytes()));
            drop(f);
            if header("authorization").as_deref() != Some(want.as_str()) {
                respond(
                    &conn,
                    "401 Unauthorized",
                    &[],
                    br#"{"details":"bad credentials"}"#,
                );
                return;
            }
            assert!(
                path.contains("scope=repository%3A"),
                "token request without scope: {path}"
            );
            let n = tokens.fetch_add(1, Ordering::Relaxed);
            // Alternate the two field names the spec allows.
            let body = if n.is_multiple_of(2) {
                r#"{"token":"good-token","expires_in":300}"#
            } else {
                r#"{"access_token":"good-token","expires_in":300}"#
            };
            respond(
                &conn,
                "200 OK",
                &[("Content-Type", "application/json".into())],
                body.as_bytes(),
            );
            return;
        }
        if header("authorization").as_deref() != Some("Bearer good-token") {
            drop(f);
            let challenge =
                format!(r#"Bearer realm="http://{me}/token",service="kiln-test",scope="repository:x:pull""#);
            respond(
                &conn,
                "401 Unauthorized",
                &[
                    ("WWW-Authenticate", challenge),
                    ("Content-Type", "application/json".into()),
                ],
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            );
            return;
        }
    }
    if path.contains("/manifests/") && f.fail_manifests > 0 {
        f.fail_manifests -= 1;
        drop(f);
        respond(&conn, "500 Internal Server Error", &[], b"injected failure");
        return;
    }
    if path.contains("/manifests/") && f.throttle_manifests > 0 {
        f.throttle_manifests -= 1;
        drop(f);
        respond(
            &conn,
            "429 Too Many Requests",
            &[("Retry-After", "0".into())],
            br#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#,
        );
        return;
    }
    if let Some(status) = f.deny_manifests.filter(|_| path.contains("/manifests/")) {
        drop(f);
        respond(
            &conn,
            status,
            &[("Content-Type", "application/json".into())],
            br#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#,
        );
        return;
    }
    if let Some(status) = f.deny_uploads.filter(|_| path.contains("/blobs/uploads/")) {
        drop(f);
        respond(
            &conn,
            status,
            &[
                ("Content-Type", "application/json".into()),
                ("Retry-After", "0".into()),
            ],
            br#"{"errors":[{"code":"DENIED","message":"injected upload failure"}]}"#,
        );
        return;
    }
    let blob_fault = if method == "GET" {
        if f.corrupt.as_ref().is_some_and(|d| path.ends_with(d.as_str())) {
            Some("corrupt")
        } else if f
            .truncate_once
            .as_ref()
            .is_some_and(|d| path.ends_with(d.as_str()))
        {
            f.truncate_once = None;
            Some("truncate")
        } else {
            None
        }
    } else {
        None
    };
    drop(f);
    // Forward, one request per upstream connection.
    let Ok(mut up) = TcpStream::connect(upstream) else {
        return;
    };
    let mut head = format!("{request}\r\n");
    for (k, v) in &headers {
        if k != "connection" {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    if up.write_all(head.as_bytes()).is_err() {
        return;
    }
    let mut up_w = up.try_clone().unwrap();
    let body_thread = std::thread::spawn(move || {
        let _ = std::io::copy(&mut reader, &mut up_w);
    });
    let mut c = conn.try_clone().unwrap();
    match blob_fault {
        None => {
            let n = std::io::copy(&mut up, &mut c).unwrap_or(0);
            if method == "GET" && path.contains("/blobs/") {
                blob_gets.lock().unwrap().push((path.clone(), n));
            }
        }
        Some(kind) => {
            let mut all = Vec::new();
            let _ = up.read_to_end(&mut all);
            let split = all
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|p| p + 4)
                .unwrap_or(all.len());
            let (h, b) = all.split_at(split);
            let mut body = b.to_vec();
            if kind == "corrupt" {
                if let Some(last) = body.last_mut() {
                    *last ^= 0xff;
                }
                let _ = c.write_all(h);
                let _ = c.write_all(&body);
            } else {
                let _ = c.write_all(h);
                let _ = c.write_all(&body[..body.len() / 2]);
            }
        }
    }
    let _ = c.flush();
    let _ = conn.shutdown(Shutdown::Both);
    let _ = up.shutdown(Shutdown::Both);
    let _ = body_thread.join();
}

/// Base64 for the token endpoint's Basic check (the test crate has no base64 dependency).
mod base64_lite {
    pub fn encode(input: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// The manifest's layer digests of a local image.
fn layer_digests(env: &Env, image: &str) -> Vec<String> {
    let out = ok(env, &["image", "inspect", image]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let first = if v.is_array() { v[0].clone() } else { v };
    first["RootFS"]["Layers"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

#[test]
fn push_then_pull_into_a_fresh_store_and_run() {
    require_root();
    let reg = Registry::start(None);
    let a = Env::new();
    a.with_busybox();
    let image = format!("{}/kiln/bb:v1", reg.addr);
    ok(&a, &["tag", "busybox:local", &image]);
    let out = ok(&a, &["push", &image]);
    assert!(
        out.contains(&format!("The push refers to repository [{}/kiln/bb]", reg.addr)),
        "{out}"
    );
    assert!(out.contains(": Pushed"), "{out}");
    let digest_line = out
        .lines()
        .find(|l| l.starts_with("v1: digest: sha256:"))
        .unwrap_or_else(|| panic!("{out}"));
    let pushed_digest = digest_line.split_whitespace().nth(2).unwrap().to_string();
    // Second push: every layer is found with a HEAD.
    let again = ok(&a, &["push", &image]);
    assert!(
        again.contains("Layer already exists") && !again.contains(": Pushed"),
        "{again}"
    );
    assert!(again.contains(&pushed_digest), "{again}");
    // Another repository on the same registry: mounted, not uploaded.
    let other = format!("{}/kiln/other:v1", reg.addr);
    ok(&a, &["tag", "busybox:local", &other]);
    let mounted = ok(&a, &["push", &other]);
    assert!(mounted.contains("Mounted from kiln/bb"), "{mounted}");

    let b = Env::new();
    let pulled = ok(&b, &["pull", &image]);
    assert!(pulled.contains("v1: Pulling from kiln/bb"), "{pulled}");
    assert!(pulled.contains(&format!("Digest: {pushed_digest}")), "{pulled}");
    assert!(pulled.contains("Status: Downloaded newer image for"), "{pulled}");
    assert!(ingest_files(&b.root()) == 0);
    // The local manifest is the registry's: same digest.
    let ids = ok(&b, &["images", "--digests"]);
    assert!(ids.contains(&pushed_digest), "{ids}");
    let up = ok(&b, &["pull", &image]);
    assert!(up.contains("Status: Image is up to date"), "{up}");
    let run = ok(&b, &["run", "--rm", &image, "echo", "ok"]);
    assert_eq!(run.trim(), "ok");
    assert_eq!(layer_digests(&a, "busybox:local"), layer_digests(&b, &image));
}

#[test]
fn docker_pulls_what_kiln_pushed_and_kiln_pulls_what_docker_pushed() {
    require_root();
    let docker = docker();
    let reg = Registry::start(None);
    let a = Env::new();
    a.with_busybox();
    let image = format!("{}/kiln/to-docker:v1", reg.addr);
    ok(&a, &["tag", "busybox:local", &image]);
    ok(&a, &["push", &image]);
    run_ok(Command::new(&docker).args(["pull", &image]));
    let echoed = run_ok(Command::new(&docker).args(["run", "--rm", &image, "echo", "from-docker"]));
    assert_eq!(echoed.trim(), "from-docker");
    let _ = Command::new(&docker).args(["rmi", "-f", &image]).output();

    let from_docker = format!("{}/docker/bb:v2", reg.addr);
    run_ok(Command::new(&docker).args(["tag", "busybox:local", &from_docker]));
    run_ok(Command::new(&docker).args(["push", &from_docker]));
    let _ = Command::new(&docker).args(["rmi", &from_docker]).output();
    let b = Env::new();
    let out = ok(&b, &["pull", &from_docker]);
    assert!(out.contains("Pull complete"), "{out}");
    let run = ok(&b, &["run", "--rm", &from_docker, "echo", "ok"]);
    assert_eq!(run.trim(), "ok");
}

pub(crate) fn write_dockerfile(dir: &Path, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), text).unwrap();
}

#[test]
fn from_a_registry_pulls_on_demand_and_pull_flag_sees_a_new_tag() {
    require_root();
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, Faults::default());
    let a = Env::new();
    a.with_busybox();
    let base = format!("{}/kiln/base", proxy.addr);
    // Version 1 of the base: busybox with /marker = one.
    let ctx1 = a.path("ctx1");
    write_dockerfile(&ctx1, "FROM busybox:local\nRUN echo one > /marker\n");
    ok(&a, &["build", "-q", "-t", &base, ctx1.to_str().unwrap()]);
    ok(&a, &["push", &base]);

    let b = Env::new();
    let ctx = b.path("ctx");
    write_dockerfile(&ctx, &format!("FROM {base}\nRUN cat /marker > /seen\n"));
    ok(&b, &["build", "-q", "-t", "app:1", ctx.to_str().unwrap()]);
    assert_eq!(ok(&b, &["run", "--rm", "app:1", "cat", "/seen"]).trim(), "one");

    // Version 2 replaces the tag in the registry.
    let ctx2 = a.path("ctx2");
    write_dockerfile(&ctx2, "FROM busybox:local\nRUN echo two > /marker\n");
    ok(&a, &["build", "-q", "-t", &base, ctx2.to_str().unwrap()]);
    ok(&a, &["push", &base]);
    // Without --pull the local tag is used: no request at all.
    let seen = proxy.log.lock().unwrap().len();
    ok(&b, &["build", "-q", "-t", "app:2", ctx.to_str().unwrap()]);
    assert_eq!(proxy.log.lock().unwrap().len(), seen);
    assert_eq!(ok(&b, &["run", "--rm", "app:2", "cat", "/seen"]).trim(), "one");
    // --pull re-resolves it.
    ok(
        &b,
        &["build", "-q", "--pull", "-t", "app:3", ctx.to_str().unwrap()],
    );
    assert_eq!(ok(&b, &["run", "--rm", "app:3", "cat", "/seen"]).trim(), "two");
    // Unchanged: --pull again costs one HEAD of the manifest, and no blob moves.
    let seen = proxy.log.lock().unwrap().len();
    ok(
        &b,
        &["build", "-q", "--pull", "-t", "app:4", ctx.to_str().unwrap()],
    );
    let requests = proxy.log.lock().unwrap()[seen..].to_vec();
    assert_eq!(requests, vec!["HEAD /v2/kiln/base/manifests/latest".to_string()]);
}

/// A build's base image pulled into an empty store is unpacked as it downloads: every layer
/// once, its snapshot the one the steps mount. A layer cut off halfway unpacks nothing from the
/// cut attempt; its retry streams again, and the build's result is the same.
#[test]
fn a_pulled_base_is_unpacked_as_it_downloads_even_when_cut_off_once() {
    require_root();
    let reg = Registry::start(None);
    let proxy = Proxy::start(&reg.addr, Faults::default());
    let a = Env::new();
    a.with_busybox();
    let base = format!("{}/kiln/streamed", proxy.addr);
    let ctx1 = a.path("ctx1");
    write_dockerfile(
        &ctx1,
        "FROM busybox:local\nRUN seq 1 300000 > /numbers && echo one > /marker\n",
    );
    ok(&a, &["build", "-q", "-t", &base, ctx1.to_str().unwrap()]);
    ok(&a, &["push", &base]);
    let manifest: serde_json::Value = serde_json::from_str(&run_ok(Command::new("curl").args([
        "-sf",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{}/v2/kiln/streamed/manifests/latest", reg.addr),
    ])))
    .unwrap();
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(layers.len(), 2, "{manifest}");
    let top = layers[1].clone();

    let build = |env: &Env| {
        let ctx = env.path("ctx");
        write_dockerfile(
            &ctx,
            &format!("FROM {base}\nRUN wc -l < /numbers > /count && cat /marker >> /count\n"),
        );
        let out = env
            .kiln(&["--debug", "build", "-q", "-t", "app", ctx.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", frame(&out));
        let count = ok(env, &["run", "--rm", "app", "cat", "/count"]);
        assert_eq!(count.split_whitespace().collect::<Vec<_>>(), ["300000", "one"]);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let streamed = |log: &str, digest: &str| {
        log.lines()
            .filter(|l| l.contains("pulled layer unpacked as it downloaded") && l.contains(digest))
            .count()
    };

    let b = Env::new();
    let log = build(&b);
    for l in &layers {
        assert_eq!(streamed(&log, l), 1, "{l} not streamed once:\n{log}");
    }
    assert_eq!(proxy.blob_gets_of(&top), 1);

    proxy.faults.lock().unwrap().truncate_once = Some(top.clone());
    let c = Env::new();
    let log = build(&c);
    assert!(
        log.lines()
            .any(|l| l.contains("not unpacked while downloading") && l.contains(&top)),
        "{log}"
    );
    assert_eq!(streamed(&log, &top), 1, "the retry streams:\n{log}");
    assert_eq!(proxy.blob_gets_of(&top), 3, "one GET for b, two for c");
}

#[test]
fn basic_auth_login_logout() {
    require_root();
    let reg = Registry::start(Some("alice:s3cret"));
    let env = Env::new();
    env.with_busybox();
    let image = format!("{}/private/bb:v1", reg.addr);
    ok(&env, &["tag", "busybox:local", &image]);
    // Not logged in: one clear error naming the reference.
    let err = fails(&env, &["push", &image]);
    assert!(err.contains(&image) && err.contains("401"), "{err}");
    let err = fails(&env, &["login", "-u", "alice", "-p", "wrong", &reg.addr]);
    assert!(
        err.contains("401") && err.contains(&format!("login to {}", reg.addr)),
        "{err}"
    );
    assert!(
        !env.path("docker-config/config.json").exists()
            || !std::fs::read_to_string(env.path("docker-config/config.json"))
                .unwrap()
                .contains(&reg.addr)
    );
    let mut login = env.kiln(&["login", "-u", "alice", "--password-stdin", &reg.addr]);
    login
        .env("DOCKER_CONFIG", env.path("docker-config"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = login.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", frame(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Login Succeeded"));
    let cfg = std::fs::read_to_string(env.path("docker-config/config.json")).unwrap();
    assert!(
        cfg.contains(&reg.addr) && cfg.contains("YWxpY2U6czNjcmV0"),
        "{cfg}"
    );
    ok(&env, &["push", &image]);
    let b = Env::new();
    // Another store, same credentials file.
    let out = b
        .kiln(&["pull", &image])
        .env("DOCKER_CONFIG", env.path("docker-config"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", frame(&out));
    let out = ok(&env, &["logout", &reg.addr]);
    assert!(out.contains("Removing login credentials"), "{out}");
    let cfg = std::fs::read_to_string(env.path("docker-config/config.json")).unwrap();
    assert!(!cfg.contains(&reg.addr), "{cfg}");
    let err = fails(&env, &["pull", &image]);
    assert!(err.contains(&image) && err.contains("401"), "{err}");
}

#[test]
fn bearer_token_flow() {
    require_root();
    let reg = Registry::start(None);
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            bearer: Some(("tok-user".into(), "tok-pass".into())),
            ..Faults::default()
        },
    );
    let env = Env::new();
    env.with_busybox();
    let image = format!("{}/secure/bb:v1", proxy.addr);
    ok(&env, &["tag", "busybox:local", &image]);
    let err = fails(&env, &["push", &image]);
    assert!(err.contains("token") && err.contains("401"), "{err}");
    ok(&env, &["login", "-u", "tok-user", "-p", "tok-pass", &proxy.addr]);
    let before = proxy.tokens_issued.load(Ordering::Relaxed);
    let out = ok(&env, &["push", &image]);
    assert!(out.contains("Pushed"), "{out}");
    // One token per scope, reused for every following request of the push.
    let issued = proxy.tokens_issued.load(Ordering::Relaxed) - before;
    assert!((1..=2).contains(&issued), "{issued} tokens for one push");
    let b = Env::new();
    let out = b
        .kiln(&["pull", &image])
        .env("DOCKER_CONFIG", env.path("docker-config"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", frame(&out));
    let run = b.kiln(&["run", "--rm", &image, "echo", "ok"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        "ok",
        "{}",
        frame(&run)
    );
}

#[test]
fn corrupt_and_truncated_blobs_and_server_errors() {
    require_root();
    let reg = Registry::start(None);
    let a = Env::new();
    a.with_busybox();
    let image = format!("{}/faults/bb:v1", reg.addr);
    ok(&a, &["tag", "busybox:local", &image]);
    let pushed = ok(&a, &["push", &image]);
    let manifest_digest = pushed
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap()
        .to_string();
    // Find the pushed (compressed) layer digest from the registry's manifest.
    let manifest = run_ok(Command::new("curl").args([
        "-sf",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{}/v2/faults/bb/manifests/{manifest_digest}", reg.addr),
    ]));
    let v: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let layer = v["layers"][0]["digest"].as_str().unwrap().to_string();

    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            corrupt: Some(layer.clone()),
            ..Faults::default()
        },
    );
    let via = format!("{}/faults/bb:v1", proxy.addr);
    let b = Env::new();
    let err = fails(&b, &["pull", &via]);
    assert!(err.contains("digest mismatch") && err.contains(&via), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
    assert!(
        !blob_files(&b.root()).contains(&layer[7..].to_string()),
        "corrupt blob committed"
    );
    assert_eq!(ingest_files(&b.root()), 0, "temp files left behind");
    assert!(!ok(&b, &["images"]).contains("faults/bb"));
    // The fault clears: the same pull succeeds.
    proxy.faults.lock().unwrap().corrupt = None;
    ok(&b, &["pull", &via]);
    assert!(blob_files(&b.root()).contains(&layer[7..].to_string()));

    // A truncated download is retried within the pull.
    let c = Env::new();
    proxy.faults.lock().unwrap().truncate_once = Some(layer.clone());
    let out = ok(&c, &["pull", &via]);
    assert!(out.contains("Retrying"), "{out}");
    assert_eq!(ok(&c, &["run", "--rm", &via, "echo", "ok"]).trim(), "ok");

    // 500s are retried with backoff.
    let d = Env::new();
    proxy.faults.lock().unwrap().fail_manifests = 2;
    ok(&d, &["pull", &via]);
    assert_eq!(proxy.faults.lock().unwrap().fail_manifests, 0);

    // 404: an unknown tag, one clear line naming the reference.
    let missing = format!("{}/faults/bb:nope", reg.addr);
    let err = fails(&d, &["pull", &missing]);
    assert!(
        err.contains(&missing) && err.contains("404") && err.contains("manifest unknown"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn forbidden_throttled_and_unreachable_registries() {
    require_root();
    let reg = Registry::start(None);
    let a = Env::new();
    a.with_busybox();
    let image = format!("{}/faults/deny:v1", reg.addr);
    ok(&a, &["tag", "busybox:local", &image]);
    ok(&a, &["push", &image]);
    let proxy = Proxy::start(&reg.addr, Faults::default());
    let via = format!("{}/faults/deny:v1", proxy.addr);
    let b = Env::new();

    // 403: final, one line naming the reference, nothing stored.
    proxy.faults.lock().unwrap().deny_manifests = Some("403 Forbidden");
    let err = fails(&b, &["pull", &via]);
    assert!(err.contains(&via) && err.contains("403"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
    assert!(
        blob_files(&b.root()).is_empty(),
        "nothing may be stored after a 403"
    );
    proxy.faults.lock().unwrap().deny_manifests = None;

    // 429 is retried (Retry-After honoured); when it persists the pull fails clearly.
    proxy.faults.lock().unwrap().throttle_manifests = 2;
    ok(&b, &["pull", &via]);
    assert_eq!(proxy.faults.lock().unwrap().throttle_manifests, 0);
    let c = Env::new();
    proxy.faults.lock().unwrap().throttle_manifests = 100;
    let err = fails(&c, &["pull", &via]);
    assert!(err.contains(&via) && err.contains("429"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
    proxy.faults.lock().unwrap().throttle_manifests = 0;
    ok(&c, &["pull", &via]);

    // An unreachable host (a closed loopback port): a clear error naming the reference, and the
    // store stays usable.
    let closed = format!("127.0.0.1:{}/faults/deny:v1", free_port());
    let err = fails(&c, &["pull", &closed]);
    assert!(err.contains(&closed), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
    ok(&c, &["store", "verify"]);
}

/// An edited COPY's layer is lazy (a recipe over earlier blobs): a push streams it from the
/// recipe, compressed (gzip, zstd) or as stored, without writing the tar into the store, and a
/// fresh store pulls the very layer a fresh build writes.
#[test]
fn a_lazy_layer_is_pushed_from_its_recipe() {
    require_root();
    let reg = Registry::start(None);
    let a = Env::new();
    a.with_busybox();
    let ctx = a.path("ctx");
    for i in 0..100 {
        let p = ctx.join(format!("d{}/f{i}", i % 5));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("{i}").repeat(2000)).unwrap();
    }
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox:local\nCOPY . /ctx/\n").unwrap();
    let c = ctx.to_str().unwrap();
    ok(&a, &["build", "-q", "-t", "lazy", c]);
    std::fs::write(ctx.join("d2/f7"), "edited").unwrap();
    ok(&a, &["build", "-q", "-t", "lazy", c]);
    let layers = layer_digests(&a, "lazy");
    let hex = layers[1].trim_start_matches("sha256:");
    let recipe = a.root().join("recipes/sha256").join(hex);
    let blob = a.root().join("blobs/sha256").join(hex);
    assert!(recipe.is_file() && !blob.exists(), "the edit's layer is not lazy");
    for (tag, output) in [
        ("gz", "type=image,name={image},push=true"),
        (
            "zst",
            "type=image,name={image},push=true,compression=zstd,oci-mediatypes=true",
        ),
        (
            "raw",
            "type=image,name={image},push=true,compression=uncompressed",
        ),
    ] {
        let image = format!("{}/kiln/lazy:{tag}", reg.addr);
        ok(&a, &["build", "-q", "-o", &output.replace("{image}", &image), c]);
        assert!(
            recipe.is_file() && !blob.exists(),
            "{tag}: the push wrote the tar"
        );
        let b = Env::new();
        ok(&b, &["pull", &image]);
        assert_eq!(layer_digests(&b, &image), layers, "{tag}");
        let run = ok(&b, &["run", "--rm", &image, "cat", "/ctx/d2/f7"]);
        assert_eq!(run, "edited", "{tag}");
    }
}
