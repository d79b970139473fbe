//! Registry credentials and auth challenges.
//!
//! Credentials live where Docker keeps them: `$DOCKER_CONFIG/config.json` (default
//! `~/.docker/config.json`), either inline (`auths{host:{auth:base64(user:pass)}}`) or behind a
//! credential helper (`credHelpers{host:NAME}` or `credsStore: NAME`, run as
//! `docker-credential-NAME get|store|erase`). Unknown fields of the file are kept when it is
//! rewritten.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde_json::{Map, Value};

/// The key Docker uses for Docker Hub in `auths`.
pub const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// A failure reading or writing credentials.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The config file could not be read.
    #[error("failed to read `{path}`")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON (or not an object).
    #[error("failed to parse `{path}`: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The `auth` field of an entry is not base64 of `user:password`.
    #[error("invalid `auth` entry for `{host}` in `{path}`")]
    BadAuthEntry {
        /// The file.
        path: PathBuf,
        /// The registry.
        host: String,
    },
    /// The config file could not be written.
    #[error("failed to write `{path}`")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A credential helper could not be started.
    #[error("failed to run credential helper `{program}`")]
    HelperSpawn {
        /// The helper program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A credential helper failed.
    #[error("credential helper `{program} {action}` failed: {message}")]
    HelperFailed {
        /// The helper program.
        program: String,
        /// `get`, `store` or `erase`.
        action: &'static str,
        /// Its output.
        message: String,
    },
    /// A credential helper printed something that is not its JSON answer.
    #[error("credential helper `{program}` printed invalid JSON")]
    HelperOutput {
        /// The helper program.
        program: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// A user name and password (or identity token).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

/// One `WWW-Authenticate` challenge: a scheme and its parameters (names lower-cased).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// `bearer` or `basic` (lower-cased).
    pub scheme: String,
    /// `realm`, `service`, `scope`, ...
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    /// A parameter by (lower-case) name.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Parses a `WWW-Authenticate` header value into its challenges
/// (`Bearer realm="https://auth",service="registry",scope="repository:a:pull,push"`).
/// Quoted values may contain commas and backslash escapes; malformed tails are ignored.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let s = header.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t' || s[*i] == b',') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= s.len() {
            break;
        }
        // A token: either a new scheme or a parameter name.
        let start = i;
        while i < s.len() && !matches!(s[i], b' ' | b'\t' | b'=' | b',') {
            i += 1;
        }
        let token = header[start..i].to_string();
        let mut j = i;
        while j < s.len() && (s[j] == b' ' || s[j] == b'\t') {
            j += 1;
        }
        if j < s.len() && s[j] == b'=' && !out.is_empty() {
            // name=value
            i = j + 1;
            while i < s.len() && (s[i] == b' ' || s[i] == b'\t') {
                i += 1;
            }
            let mut value = String::new();
            if i < s.len() && s[i] == b'"' {
                i += 1;
                let mut chars = header[i..].char_indices();
                let mut end = header.len();
                while let Some((k, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => {
                            end = i + k + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                i = end;
            } else {
                let vs = i;
                while i < s.len() && s[i] != b',' && s[i] != b' ' {
                    i += 1;
                }
                value = header[vs..i].to_string();
            }
            if let Some(last) = out.last_mut() {
                last.params.insert(token.to_ascii_lowercase(), value);
            }
        } else if !token.is_empty() {
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
        } else {
            i += 1;
        }
    }
    out
}

/// The directory of Docker's client config: `$DOCKER_CONFIG`, else `$HOME/.docker`.
pub fn docker_config_dir() -> PathBuf {
    match std::env::var_os("DOCKER_CONFIG") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"))
            .join(".docker"),
    }
}

/// The `auths` key for a registry host: Docker Hub's legacy URL for `docker.io`, else the host.
pub fn auth_key(host: &str) -> String {
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB_KEY.to_string(),
        other => other.to_string(),
    }
}

/// Reduces an `auths` key (`https://host/v1/`, `host`) to a host for comparison.
fn key_host(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

/// Docker's client config file (`config.json`), with its unknown fields kept.
#[derive(Clone, Debug)]
pub struct DockerConfig {
    path: PathBuf,
    value: Map<String, Value>,
}

impl DockerConfig {
    /// Reads `DIR/config.json`; a missing file is an empty config.
    pub fn load(dir: &Path) -> Result<DockerConfig, AuthError> {
        let path = dir.join("config.json");
        let value = match std::fs::read(&path) {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Map::new(),
            Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Object(m)) => m,
                Ok(_) => {
                    return Err(AuthError::Parse {
                        path,
                        detail: "not a JSON object".into(),
                    })
                }
                Err(e) => {
                    return Err(AuthError::Parse {
                        path,
                        detail: e.to_string(),
                    })
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Map::new(),
            Err(source) => return Err(AuthError::Read { path, source }),
        };
        Ok(DockerConfig { path, value })
    }

    /// The file this config was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The credential helper for `host`: `credHelpers[host]`, else `credsStore`.
    pub fn helper_for(&self, host: &str) -> Option<String> {
        let want = key_host(host);
        if let Some(Value::Object(helpers)) = self.value.get("credHelpers") {
            for (k, v) in helpers {
                if key_host(k) == want {
                    if let Some(name) = v.as_str().filter(|s| !s.is_empty()) {
                        return Some(name.to_string());
                    }
                }
            }
        }
        self.value
            .get("credsStore")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }

    /// The inline credentials for `host` in `auths` (`auth` or `username`/`password` fields).
    pub fn inline_credentials(&self, host: &str) -> Result<Option<Credentials>, AuthError> {
        let want = key_host(host);
        let Some(Value::Object(auths)) = self.value.get("auths") else {
            return Ok(None);
        };
        for (k, entry) in auths {
            if key_host(k) != want {
                continue;
            }
            let bad = || AuthError::BadAuthEntry {
                path: self.path.clone(),
                host: host.to_string(),
            };
            if let Some(auth) = entry
                .get("auth")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| bad())?;
                let raw = String::from_utf8(raw).map_err(|_| bad())?;
                let (u, p) = raw.split_once(':').ok_or_else(bad)?;
                return Ok(Some(Credentials {
                    username: u.to_string(),
                    password: p.to_string(),
                }));
            }
            if let (Some(u), Some(p)) = (
                entry.get("username").and_then(Value::as_str),
                entry.get("password").and_then(Value::as_str),
            ) {
                return Ok(Some(Credentials {
                    username: u.to_string(),
                    password: p.to_string(),
                }));
            }
            if let Some(t) = entry.get("identitytoken").and_then(Value::as_str) {
                return Ok(Some(Credentials {
                    username: "<token>".to_string(),
                    password: t.to_string(),
                }));
            }
        }
        Ok(None)
    }

    /// The credentials for `host`: from its helper when one is configured, else inline.
    pub fn credentials(&self, host: &str) -> Result<Option<Credentials>, AuthError> {
        if let Some(helper) = self.helper_for(host) {
            if let Some(c) = helper_get(&helper, &auth_key(host))? {
                return Ok(Some(c));
            }
        }
        self.inline_credentials(host)
    }

    /// Stores credentials for `host` (through its helper when one is configured) and writes the
    /// file.
    pub fn store(&mut self, host: &str, creds: &Credentials) -> Result<(), AuthError> {
        let key = auth_key(host);
        let helper = self.helper_for(host);
        let auths = self
            .value
            .entry("auths")
            .or_insert_with(|| Value::Object(Map::new()));
        if !auths.is_object() {
            *auths = Value::Object(Map::new());
        }
        let Value::Object(auths) = auths else {
            return Ok(());
        };
        let want = key_host(host);
        auths.retain(|k, _| key_host(k) != want);
        if let Some(helper) = helper {
            helper_store(&helper, &key, creds)?;
            auths.insert(key, Value::Object(Map::new()));
        } else {
            let raw = format!("{}:{}", creds.username, creds.password);
            let mut entry = Map::new();
            entry.insert(
                "auth".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(raw)),
            );
            auths.insert(key, Value::Object(entry));
        }
        self.save()
    }

    /// Removes the credentials for `host`; returns whether there were any.
    pub fn erase(&mut self, host: &str) -> Result<bool, AuthError> {
        let want = key_host(host);
        let mut found = false;
        if let Some(Value::Object(auths)) = self.value.get_mut("auths") {
            let before = auths.len();
            auths.retain(|k, _| key_host(k) != want);
            found = auths.len() != before;
        }
        if let Some(helper) = self.helper_for(host) {
            found |= helper_erase(&helper, &auth_key(host))?;
        }
        if found {
            self.save()?;
        }
        Ok(found)
    }

    fn save(&self) -> Result<(), AuthError> {
        let err = |source| AuthError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut bytes = serde_json::to_vec_pretty(&Value::Object(self.value.clone()))
            .map_err(|e| err(std::io::Error::other(e)))?;
        bytes.push(b'\n');
        let temp = self
            .path
            .with_extension(format!("json.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&temp, &self.path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            err(e)
        })
    }
}

fn run_helper(
    helper: &str,
    action: &'static str,
    input: &[u8],
) -> Result<(bool, Vec<u8>, String), AuthError> {
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg(action)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| AuthError::HelperSpawn {
            program: program.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading its input reports the problem itself.
        let _ = stdin.write_all(input);
    }
    let out = child
        .wait_with_output()
        .map_err(|source| AuthError::HelperSpawn {
            program: program.clone(),
            source,
        })?;
    let mut message = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if message.is_empty() {
        message = String::from_utf8_lossy(&out.stderr).trim().to_string();
    }
    Ok((out.status.success(), out.stdout, message))
}

fn helper_get(helper: &str, server: &str) -> Result<Option<Credentials>, AuthError> {
    let (ok, stdout, message) = run_helper(helper, "get", server.as_bytes())?;
    if !ok {
        if message.contains("credentials not found") {
            return Ok(None);
        }
        return Err(AuthError::HelperFailed {
            program: format!("docker-credential-{helper}"),
            action: "get",
            message,
        });
    }
    let v: Value = serde_json::from_slice(&stdout).map_err(|source| AuthError::HelperOutput {
        program: format!("docker-credential-{helper}"),
        source,
    })?;
    let user = v.get("Username").and_then(Value::as_str).unwrap_or("");
    let secret = v.get("Secret").and_then(Value::as_str).unwrap_or("");
    if secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials {
        username: user.to_string(),
        password: secret.to_string(),
    }))
}

fn helper_store(helper: &str, server: &str, creds: &Credentials) -> Result<(), AuthError> {
    let input = serde_json::json!({
        "ServerURL": server,
        "Username": creds.username,
        "Secret": creds.password,
    })
    .to_string();
    let (ok, _, message) = run_helper(helper, "store", input.as_bytes())?;
    if !ok {
        return Err(AuthError::HelperFailed {
            program: format!("docker-credential-{helper}"),
            action: "store",
            message,
        });
    }
    Ok(())
}

fn helper_erase(helper: &str, server: &str) -> Result<bool, AuthError> {
    let (ok, _, message) = run_helper(helper, "erase", server.as_bytes())?;
    if !ok {
        if message.contains("credentials not found") {
            return Ok(false);
        }
        return Err(AuthError::HelperFailed {
            program: format!("docker-credential-{helper}"),
            action: "erase",
            message,
        });
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(c[0].param("scope"), Some("repository:library/busybox:pull,push"));
        let c = parse_challenges(r#"Basic realm="test-realm""#);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("test-realm"));
        let c = parse_challenges(r#"Basic realm="a\"b", Bearer realm=x, error=invalid_token"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].param("realm"), Some("a\"b"));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("x"));
        assert_eq!(c[1].param("error"), Some("invalid_token"));
        assert!(parse_challenges("").is_empty());
        assert_eq!(parse_challenges("Negotiate")[0].scheme, "negotiate");
    }

    #[test]
    fn reads_stores_and_erases_inline_auth() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"127.0.0.1:5000":{"auth":"YWxpY2U6c2VjcmV0OmNvbG9u"}},"psFormat":"x"}"#,
        )
        .unwrap();
        let mut cfg = DockerConfig::load(dir.path()).unwrap();
        let hub = cfg.credentials("docker.io").unwrap().unwrap();
        assert_eq!((hub.username.as_str(), hub.password.as_str()), ("u", "p"));
        let local = cfg.credentials("127.0.0.1:5000").unwrap().unwrap();
        assert_eq!(local.password, "secret:colon");
        assert!(cfg.credentials("other:1").unwrap().is_none());
        cfg.store(
            "other:1",
            &Credentials {
                username: "bob".into(),
                password: "pw".into(),
            },
        )
        .unwrap();
        let again = DockerConfig::load(dir.path()).unwrap();
        assert_eq!(again.credentials("other:1").unwrap().unwrap().username, "bob");
        let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        assert!(text.contains("psFormat"), "{text}");
        let mut again = again;
        assert!(again.erase("other:1").unwrap());
        assert!(!again.erase("other:1").unwrap());
        assert!(DockerConfig::load(dir.path())
            .unwrap()
            .credentials("other:1")
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_entries_and_helpers_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"auths":{"h:1":{"auth":"!!"}},"credHelpers":{"h:2":"kiln-test-missing"}}"#,
        )
        .unwrap();
        let cfg = DockerConfig::load(dir.path()).unwrap();
        assert!(matches!(
            cfg.credentials("h:1"),
            Err(AuthError::BadAuthEntry { .. })
        ));
        assert_eq!(cfg.helper_for("h:2").as_deref(), Some("kiln-test-missing"));
        assert!(matches!(
            cfg.credentials("h:2"),
            Err(AuthError::HelperSpawn { .. })
        ));
        std::fs::write(dir.path().join("config.json"), "[1]").unwrap();
        assert!(matches!(
            DockerConfig::load(dir.path()),
            Err(AuthError::Parse { .. })
        ));
    }

    #[test]
    fn credential_helpers_are_run() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let helper = bin.join("docker-credential-kilntest");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread host\nif [ \"$1\" = get ] && [ \"$host\" = reg:9 ]; then echo '{\"Username\":\"hu\",\"Secret\":\"hs\"}'; exit 0; fi\necho 'credentials not found in native keychain'; exit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"credsStore":"kilntest"}"#).unwrap();
        // PATH is process-wide; no other test here depends on it, and the original stays on it.
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        std::env::set_var("PATH", &path);
        let cfg = DockerConfig::load(dir.path()).unwrap();
        assert_eq!(cfg.helper_for("anything").as_deref(), Some("kilntest"));
        // Another test thread that forks while the script is still open for writing holds that
        // descriptor until its child execs: exec then fails with ETXTBSY for a moment.
        let mut tries = 0;
        let c = loop {
            match cfg.credentials("reg:9") {
                Err(AuthError::HelperSpawn { source, .. })
                    if source.raw_os_error() == Some(26) && tries < 100 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other.unwrap().unwrap(),
            }
        };
        assert_eq!((c.username.as_str(), c.password.as_str()), ("hu", "hs"));
        assert!(cfg.credentials("other:9").unwrap().is_none());
    }
}
