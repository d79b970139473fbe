//! The HTTP side of the distribution API: endpoints, auth (anonymous, Basic, Bearer tokens),
//! retries.
//!
//! Every request goes through [`Client::send`], which attaches the credentials or token known for
//! the host and scope, answers a `401` challenge once (fetching a Bearer token from the challenge's
//! realm, or switching to Basic), and retries with exponential backoff on connection errors,
//! `5xx` and `429` (honouring `Retry-After`). `401`, `403` and `404` are returned to the caller,
//! which turns them into one error naming the reference ([`ClientError::from_response`]).

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ureq::http::{Method, Response};

use super::auth::{self, AuthError, Challenge, Credentials, DockerConfig};

/// Largest error body or token response read into memory.
const MAX_SMALL_BODY: u64 = 1 << 20;

/// The manifest media types a pull accepts, in `Accept` form.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// A failure talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request could not be sent or its answer not received, after every retry.
    #[error("{method} {url}: request failed after {attempts} attempt(s)")]
    Transport {
        /// The method.
        method: Method,
        /// The URL.
        url: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last cause.
        #[source]
        source: ureq::Error,
    },
    /// The registry answered with an error status.
    #[error("{method} {url}: {status}{}", message_suffix(.message, .hint))]
    Status {
        /// The method.
        method: Method,
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The registry's error message (from its JSON `errors`), if any.
        message: String,
        /// Advice for the user, if any.
        hint: &'static str,
    },
    /// A response body could not be read.
    #[error("{method} {url}: failed to read the response body")]
    Body {
        /// The method.
        method: Method,
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: ureq::Error,
    },
    /// The registry's answer lacks something it must carry.
    #[error("{method} {url}: {detail}")]
    Protocol {
        /// The method.
        method: Method,
        /// The URL.
        url: String,
        /// What is wrong.
        detail: String,
    },
    /// The token server refused or failed.
    #[error("fetching a token from {realm} failed: {detail}")]
    Token {
        /// The token endpoint.
        realm: String,
        /// What went wrong.
        detail: String,
    },
    /// Credentials could not be loaded.
    #[error("failed to load credentials for {host}")]
    Credentials {
        /// The registry.
        host: String,
        /// The cause.
        #[source]
        source: AuthError,
    },
    /// A request could not be built (bad URL or header value).
    #[error("invalid request {method} {url}: {detail}")]
    BadRequest {
        /// The method.
        method: Method,
        /// The URL.
        url: String,
        /// What is wrong.
        detail: String,
    },
}

fn message_suffix(message: &str, hint: &str) -> String {
    let mut s = String::new();
    if !message.is_empty() {
        s.push_str(": ");
        s.push_str(message);
    }
    if !hint.is_empty() {
        s.push_str(" (");
        s.push_str(hint);
        s.push(')');
    }
    s
}

impl ClientError {
    /// The HTTP status of a [`ClientError::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Turns an error response into [`ClientError::Status`], with the registry's message.
    pub fn from_response(method: &Method, url: &str, resp: Response<ureq::Body>) -> ClientError {
        let status = resp.status().as_u16();
        let reason = resp.status().canonical_reason().unwrap_or("").to_string();
        let mut body = resp.into_body();
        let text = body
            .with_config()
            .limit(MAX_SMALL_BODY)
            .read_to_string()
            .unwrap_or_default();
        let mut message = registry_message(&text);
        if message.is_empty() {
            message = reason;
        }
        let hint = match status {
            401 => "run `kiln login` with valid credentials",
            403 => "access denied for these credentials",
            _ => "",
        };
        ClientError::Status {
            method: method.clone(),
            url: url.to_string(),
            status,
            message,
            hint,
        }
    }
}

/// The messages of a registry's `{"errors":[{"code":..,"message":..}]}` body (or its first line).
fn registry_message(text: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        if let Some(errors) = v.get("errors").and_then(|e| e.as_array()) {
            let parts: Vec<String> = errors
                .iter()
                .map(|e| {
                    let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
                    let msg = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
                    match (code.is_empty(), msg.is_empty()) {
                        (false, false) => format!("{}: {msg}", code.to_ascii_lowercase()),
                        (false, true) => code.to_ascii_lowercase(),
                        _ => msg.to_string(),
                    }
                })
                .filter(|s| !s.is_empty())
                .collect();
            return parts.join("; ");
        }
    }
    text.lines()
        .next()
        .unwrap_or("")
        .trim()
        .chars()
        .take(200)
        .collect()
}

/// How a [`Client`] behaves.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Registries spoken to over plain HTTP (`host` or `host:port`); loopback always is.
    pub insecure_registries: Vec<String>,
    /// Docker's config directory (credentials).
    pub docker_config_dir: PathBuf,
    /// Attempts per request on connection errors, `5xx` and `429` (at least 1).
    pub attempts: u32,
    /// The first retry delay; each later one doubles.
    pub backoff: Duration,
}

impl ClientOptions {
    /// Defaults plus `KILN_INSECURE_REGISTRIES` (comma-separated hosts) and `DOCKER_CONFIG`.
    pub fn from_env() -> ClientOptions {
        let insecure = std::env::var("KILN_INSECURE_REGISTRIES")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        ClientOptions {
            insecure_registries: insecure,
            docker_config_dir: auth::docker_config_dir(),
            attempts: 4,
            backoff: Duration::from_millis(250),
        }
    }
}

/// The API host of a reference domain: Docker Hub's `docker.io` is served by
/// `registry-1.docker.io`.
pub fn api_host(domain: &str) -> &str {
    match domain {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    }
}

/// Whether `domain` (`host[:port]`) is a loopback address or `localhost`.
pub fn is_loopback(domain: &str) -> bool {
    let host = if let Some(rest) = domain.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        domain.rsplit_once(':').map(|(h, _)| h).unwrap_or(domain)
    };
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    host.parse::<IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

/// A bearer token and when it stops being usable.
#[derive(Clone, Debug)]
struct Token {
    value: String,
    expires: Instant,
}

/// A request body that can be sent again on retry.
#[derive(Clone, Copy, Debug)]
pub enum Payload<'a> {
    /// No body (`Content-Length: 0` on POST, PUT and PATCH).
    Empty,
    /// These bytes.
    Bytes(&'a [u8]),
}

/// A registry client: one connection pool, credentials and a token cache. `Sync`: share it
/// between transfer threads.
#[derive(Debug)]
pub struct Client {
    agent: ureq::Agent,
    opts: ClientOptions,
    /// Credentials by registry host; `None` = looked up, none found.
    creds: Mutex<HashMap<String, Option<Credentials>>>,
    /// Bearer tokens by (host, scope).
    tokens: Mutex<HashMap<(String, String), Token>>,
    /// Hosts that asked for Basic auth.
    basic: Mutex<HashSet<String>>,
}

impl Client {
    /// A client with these options.
    pub fn new(opts: ClientOptions) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(10)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_per_read(Some(Duration::from_secs(120)))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .max_idle_connections_per_host(8)
            .build();
        Client {
            agent: ureq::Agent::new_with_config(config),
            opts,
            creds: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            basic: Mutex::new(HashSet::new()),
        }
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// Uses `creds` for `domain` instead of the stored ones (`kiln login` checks them this way).
    pub fn set_credentials(&self, domain: &str, creds: Credentials) {
        if let Ok(mut m) = self.creds.lock() {
            m.insert(api_host(domain).to_string(), Some(creds));
        }
    }

    /// Whether `domain` is spoken to over plain HTTP.
    pub fn is_insecure(&self, domain: &str) -> bool {
        if is_loopback(domain) {
            return true;
        }
        let host_only = domain.rsplit_once(':').map(|(h, _)| h).unwrap_or(domain);
        self.opts
            .insecure_registries
            .iter()
            .any(|i| i == domain || i == host_only)
    }

    /// `scheme://host` of the registry serving `domain`.
    pub fn base_url(&self, domain: &str) -> String {
        let scheme = if self.is_insecure(domain) { "http" } else { "https" };
        format!("{scheme}://{}", api_host(domain))
    }

    /// `BASE/v2/PATH/KIND/REF`, e.g. `kind` = `manifests` or `blobs`.
    pub fn url(&self, domain: &str, path: &str, kind: &str, reference: &str) -> String {
        format!("{}/v2/{path}/{kind}/{reference}", self.base_url(domain))
    }

    /// Resolves a `Location` header against the registry's base URL.
    pub fn resolve_location(&self, domain: &str, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else if location.starts_with('/') {
            format!("{}{location}", self.base_url(domain))
        } else {
            format!("{}/{location}", self.base_url(domain))
        }
    }

    fn credentials(&self, host: &str) -> Result<Option<Credentials>, ClientError> {
        if let Ok(m) = self.creds.lock() {
            if let Some(c) = m.get(host) {
                return Ok(c.clone());
            }
        }
        let domain = if host == "registry-1.docker.io" {
            "docker.io"
        } else {
            host
        };
        let found = DockerConfig::load(&self.opts.docker_config_dir)
            .and_then(|cfg| cfg.credentials(domain))
            .map_err(|source| ClientError::Credentials {
                host: domain.to_string(),
                source,
            })?;
        if let Ok(mut m) = self.creds.lock() {
            m.insert(host.to_string(), found.clone());
        }
        Ok(found)
    }

    fn auth_header(&self, host: &str, scope: &[String]) -> Result<Option<String>, ClientError> {
        let key = (host.to_string(), scope.join(" "));
        if let Ok(tokens) = self.tokens.lock() {
            if let Some(t) = tokens.get(&key) {
                if t.expires > Instant::now() {
                    return Ok(Some(format!("Bearer {}", t.value)));
                }
            }
        }
        let basic = self.basic.lock().map(|b| b.contains(host)).unwrap_or(false);
        if basic {
            return Ok(self.credentials(host)?.map(|c| c.basic_header()));
        }
        Ok(None)
    }

    /// Answers a `401` challenge: fetches a token, or switches the host to Basic. Returns whether
    /// a retry can succeed: for Basic, when the refused request did not carry Basic credentials
    /// (`sent_basic`) and there are some. Several requests in flight may be refused before the
    /// first answer switches the host to Basic; each of them retries with the credentials.
    fn authenticate(
        &self,
        host: &str,
        scope: &[String],
        challenges: &[Challenge],
        sent_basic: bool,
    ) -> Result<bool, ClientError> {
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = c.param("realm").unwrap_or_default().to_string();
            if realm.is_empty() {
                return Ok(false);
            }
            let mut scopes: Vec<String> = scope.to_vec();
            if scopes.is_empty() {
                if let Some(s) = c.param("scope") {
                    scopes.extend(s.split(' ').map(str::to_string));
                }
            }
            let token = self.fetch_token(host, &realm, c.param("service"), &scopes)?;
            if let Ok(mut tokens) = self.tokens.lock() {
                tokens.insert((host.to_string(), scope.join(" ")), token);
            }
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            if let Ok(mut b) = self.basic.lock() {
                b.insert(host.to_string());
            }
            return Ok(!sent_basic && self.credentials(host)?.is_some());
        }
        Ok(false)
    }

    fn fetch_token(
        &self,
        host: &str,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<Token, ClientError> {
        let mut url = realm.to_string();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        if let Some(s) = service {
            url.push(sep);
            url.push_str("service=");
            url.push_str(&encode_query(s));
            sep = '&';
        }
        for s in scopes {
            url.push(sep);
            url.push_str("scope=");
            url.push_str(&encode_query(s));
            sep = '&';
        }
        let creds = self.credentials(host)?;
        let mut headers = Vec::new();
        if let Some(c) = &creds {
            headers.push(("authorization", c.basic_header()));
            url.push(sep);
            url.push_str("account=");
            url.push_str(&encode_query(&c.username));
        }
        let resp = self.send_retrying(&Method::GET, &url, &headers, Payload::Empty)?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let err = ClientError::from_response(&Method::GET, &url, resp);
            let detail = match &err {
                ClientError::Status { status, message, .. } => format!("{status}: {message}"),
                other => other.to_string(),
            };
            return Err(ClientError::Token {
                realm: realm.to_string(),
                detail: if status == 401 {
                    format!("{detail} (wrong user name or password?)")
                } else {
                    detail
                },
            });
        }
        let v: serde_json::Value = resp
            .into_body()
            .with_config()
            .limit(MAX_SMALL_BODY)
            .read_json()
            .map_err(|e| ClientError::Token {
                realm: realm.to_string(),
                detail: format!("invalid token response: {e}"),
            })?;
        let value = v
            .get("token")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .or_else(|| v.get("access_token").and_then(|t| t.as_str()))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ClientError::Token {
                realm: realm.to_string(),
                detail: "the response has neither `token` nor `access_token`".into(),
            })?;
        let expires_in = v.get("expires_in").and_then(|e| e.as_u64()).unwrap_or(60).max(60);
        // Renew a little early so a token does not expire in flight.
        let life = Duration::from_secs(expires_in.saturating_sub(10));
        Ok(Token {
            value: value.to_string(),
            expires: Instant::now() + life,
        })
    }

    fn build(
        &self,
        method: &Method,
        url: &str,
        headers: &[(&str, String)],
        auth: Option<&str>,
        has_body: bool,
    ) -> Result<ureq::http::request::Builder, ClientError> {
        let mut b = ureq::http::Request::builder()
            .method(method.clone())
            .uri(url)
            .header("accept-encoding", "identity");
        for (k, v) in headers {
            b = b.header(*k, v.as_str());
        }
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        if !has_body && matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            b = b.header("content-length", "0");
        }
        Ok(b)
    }

    /// One attempt, no auth handling.
    fn send_once(
        &self,
        method: &Method,
        url: &str,
        headers: &[(&str, String)],
        auth: Option<&str>,
        payload: Payload<'_>,
    ) -> Result<Result<Response<ureq::Body>, ureq::Error>, ClientError> {
        let bad = |detail: String| ClientError::BadRequest {
            method: method.clone(),
            url: url.to_string(),
            detail,
        };
        let b = self.build(method, url, headers, auth, matches!(payload, Payload::Bytes(_)))?;
        Ok(match payload {
            Payload::Empty => {
                let req = b.body(ureq::SendBody::none()).map_err(|e| bad(e.to_string()))?;
                self.agent.run(req)
            }
            Payload::Bytes(bytes) => {
                let req = b.body(bytes).map_err(|e| bad(e.to_string()))?;
                self.agent.run(req)
            }
        })
    }

    fn backoff(&self, attempt: u32, resp: Option<&Response<ureq::Body>>) -> Duration {
        let retry_after = resp
            .and_then(|r| r.headers().get("retry-after"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(10)));
        retry_after.unwrap_or_else(|| self.opts.backoff * 2u32.saturating_pow(attempt))
    }

    /// Sends with retries on connection errors, `5xx` and `429`; no auth handling.
    fn send_retrying(
        &self,
        method: &Method,
        url: &str,
        headers: &[(&str, String)],
        payload: Payload<'_>,
    ) -> Result<Response<ureq::Body>, ClientError> {
        let attempts = self.opts.attempts.max(1);
        let mut attempt = 0;
        loop {
            let auth = headers
                .iter()
                .find(|(k, _)| *k == "authorization")
                .map(|(_, v)| v.clone());
            let rest: Vec<(&str, String)> = headers
                .iter()
                .filter(|(k, _)| *k != "authorization")
                .cloned()
                .collect();
            match self.send_once(method, url, &rest, auth.as_deref(), payload)? {
                Err(source) => {
                    attempt += 1;
                    if attempt >= attempts {
                        return Err(ClientError::Transport {
                            method: method.clone(),
                            url: url.to_string(),
                            attempts,
                            source,
                        });
                    }
                    tracing::debug!(%url, error = %source, "retrying");
                    std::thread::sleep(self.backoff(attempt - 1, None));
                }
                Ok(resp) => {
                    let s = resp.status().as_u16();
                    if (s >= 500 || s == 429) && attempt + 1 < attempts {
                        attempt += 1;
                        tracing::debug!(%url, status = s, "retrying");
                        let wait = self.backoff(attempt - 1, Some(&resp));
                        drop(resp);
                        std::thread::sleep(wait);
                        continue;
                    }
                    return Ok(resp);
                }
            }
        }
    }

    /// Sends a request to registry `domain` with the auth needed for `scope`
    /// (e.g. `["repository:library/busybox:pull"]`), answering one `401` challenge and retrying
    /// transient failures. Returns the response whatever its status.
    pub fn send(
        &self,
        domain: &str,
        scope: &[String],
        method: &Method,
        url: &str,
        headers: &[(&str, String)],
        payload: Payload<'_>,
    ) -> Result<Response<ureq::Body>, ClientError> {
        let host = api_host(domain).to_string();
        let mut challenged = false;
        loop {
            let mut all: Vec<(&str, String)> = headers.to_vec();
            let auth = self.auth_header(&host, scope)?;
            let sent_basic = auth.as_deref().is_some_and(|a| a.starts_with("Basic "));
            if let Some(a) = auth {
                all.push(("authorization", a));
            }
            let resp = self.send_retrying(method, url, &all, payload)?;
            if resp.status().as_u16() == 401 && !challenged {
                challenged = true;
                let challenges: Vec<Challenge> = resp
                    .headers()
                    .get_all("www-authenticate")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(auth::parse_challenges)
                    .collect();
                if self.authenticate(&host, scope, &challenges, sent_basic)? {
                    continue;
                }
            }
            return Ok(resp);
        }
    }

    /// Sends a streamed body once (no retry: the stream cannot be replayed) with the auth already
    /// established for `scope` by an earlier request, with `Transfer-Encoding: chunked` unless
    /// `headers` carry a `content-length`.
    pub fn send_stream(
        &self,
        domain: &str,
        scope: &[String],
        method: &Method,
        url: &str,
        headers: &[(&str, String)],
        body: &mut dyn Read,
    ) -> Result<Response<ureq::Body>, ClientError> {
        let host = api_host(domain).to_string();
        let auth = self.auth_header(&host, scope)?;
        let b = self.build(method, url, headers, auth.as_deref(), true)?;
        let req = b
            .body(ureq::SendBody::from_reader(body))
            .map_err(|e| ClientError::BadRequest {
                method: method.clone(),
                url: url.to_string(),
                detail: e.to_string(),
            })?;
        self.agent.run(req).map_err(|source| ClientError::Transport {
            method: method.clone(),
            url: url.to_string(),
            attempts: 1,
            source,
        })
    }

    /// Checks that the registry answers `GET /v2/` with the credentials it would use (after
    /// [`Client::set_credentials`], those): `Ok` on 200, the error otherwise.
    pub fn ping(&self, domain: &str) -> Result<(), ClientError> {
        let url = format!("{}/v2/", self.base_url(domain));
        let resp = self.send(domain, &[], &Method::GET, &url, &[], Payload::Empty)?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(ClientError::from_response(&Method::GET, &url, resp))
    }

    /// Checks credentials against the registry (`kiln login`): a `/v2/` ping that must be
    /// answered with success after authenticating with them.
    pub fn login(&self, domain: &str, creds: Credentials) -> Result<(), ClientError> {
        let host = api_host(domain).to_string();
        self.set_credentials(domain, creds);
        let url = format!("{}/v2/", self.base_url(domain));
        let resp = self.send(domain, &[], &Method::GET, &url, &[], Payload::Empty)?;
        if resp.status().is_success() {
            let authenticated = self.basic.lock().map(|b| b.contains(&host)).unwrap_or(false)
                || self
                    .tokens
                    .lock()
                    .map(|t| t.keys().any(|(h, _)| *h == host))
                    .unwrap_or(false);
            if !authenticated {
                tracing::debug!(%domain, "registry does not require authentication");
            }
            return Ok(());
        }
        Err(ClientError::from_response(&Method::GET, &url, resp))
    }
}

/// Percent-encodes a query value.
pub fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The token scope to pull from a repository path.
pub fn pull_scope(path: &str) -> Vec<String> {
    vec![format!("repository:{path}:pull")]
}

/// The token scope to push to a repository path (and pull from `mount_from`, if any).
pub fn push_scope(path: &str, mount_from: Option<&str>) -> Vec<String> {
    let mut v = vec![format!("repository:{path}:pull,push")];
    if let Some(m) = mount_from {
        if m != path {
            v.push(format!("repository:{m}:pull"));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn client(insecure: &[&str]) -> Client {
        Client::new(ClientOptions {
            insecure_registries: insecure.iter().map(|s| s.to_string()).collect(),
            docker_config_dir: PathBuf::from("/nonexistent"),
            attempts: 2,
            backoff: Duration::from_millis(1),
        })
    }

    #[test]
    fn every_request_refused_before_the_switch_to_basic_retries_with_credentials() {
        let c = client(&[]);
        c.set_credentials(
            "reg:5000",
            Credentials {
                username: "u".into(),
                password: "p".into(),
            },
        );
        let basic = auth::parse_challenges("Basic realm=\"r\"");
        // Two requests sent anonymously, both refused: both retry, with Basic credentials.
        assert!(c.authenticate("reg:5000", &[], &basic, false).unwrap());
        assert!(c.authenticate("reg:5000", &[], &basic, false).unwrap());
        assert!(c
            .auth_header("reg:5000", &[])
            .unwrap()
            .unwrap()
            .starts_with("Basic "));
        // Refused with the credentials: no retry.
        assert!(!c.authenticate("reg:5000", &[], &basic, true).unwrap());
        // Without credentials there is nothing to retry with.
        assert!(!client(&[])
            .authenticate("other:5000", &[], &basic, false)
            .unwrap());
    }

    #[test]
    fn maps_references_to_urls() {
        let c = client(&["reg.internal", "other:8443"]);
        assert_eq!(c.base_url("docker.io"), "https://registry-1.docker.io");
        assert_eq!(c.base_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(c.base_url("127.3.4.5"), "http://127.3.4.5");
        assert_eq!(c.base_url("localhost:5000"), "http://localhost:5000");
        assert_eq!(c.base_url("[::1]:5000"), "http://[::1]:5000");
        assert_eq!(c.base_url("ghcr.io"), "https://ghcr.io");
        assert_eq!(c.base_url("reg.internal:5000"), "http://reg.internal:5000");
        assert_eq!(c.base_url("other:8443"), "http://other:8443");
        assert_eq!(c.base_url("other:9443"), "https://other:9443");
        assert_eq!(
            c.url("docker.io", "library/busybox", "manifests", "latest"),
            "https://registry-1.docker.io/v2/library/busybox/manifests/latest"
        );
        assert_eq!(
            c.resolve_location("127.0.0.1:5000", "/v2/a/blobs/uploads/x?_state=1"),
            "http://127.0.0.1:5000/v2/a/blobs/uploads/x?_state=1"
        );
        assert_eq!(
            c.resolve_location("127.0.0.1:5000", "https://s3/x"),
            "https://s3/x"
        );
        assert!(!is_loopback("10.0.0.1:5000"));
        assert!(!is_loopback("example.com"));
    }

    #[test]
    fn registry_messages_are_extracted() {
        assert_eq!(
            registry_message(
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#
            ),
            "manifest_unknown: manifest unknown"
        );
        assert_eq!(registry_message("plain text\nmore"), "plain text");
        assert_eq!(
            encode_query("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
        assert_eq!(push_scope("a", Some("b")).len(), 2);
        assert_eq!(push_scope("a", Some("a")).len(), 1);
    }
}
