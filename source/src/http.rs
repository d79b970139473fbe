//! One file over HTTP(S), as BuildKit's http source fetches it: streamed to a temp file while
//! hashed (never held in memory), retried with backoff on 5xx, 429 and dropped connections (a
//! body shorter than its `Content-Length` counts as dropped), checked against an expected
//! checksum, with the `Last-Modified` time and the `Content-Disposition` file name reported.
//!
//! Without a checksum BuildKit re-checks the URL on every build: [`HttpClient::check`] sends
//! `If-None-Match` with the ETag remembered from the last download (kept as a small JSON record
//! per URL under the client's cache directory, `ROOT/cache/http/`), so an unchanged URL costs
//! one request that returns `304 Not Modified` and the remembered content digest.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_dag::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Errors of this module. Each names the URL (or the file) involved.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The request could not be sent or the response not received.
    #[error("failed to fetch `{url}`")]
    Request {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// The server answered with an error status.
    #[error("failed to fetch `{url}`: server answered {status}")]
    Status { url: String, status: u16 },
    /// Reading the body failed (the connection dropped).
    #[error("failed to read the body of `{url}`")]
    Body {
        url: String,
        #[source]
        source: io::Error,
    },
    /// The body ended before `Content-Length` bytes.
    #[error("download of `{url}` was truncated: got {got} of {expected} bytes")]
    Truncated { url: String, expected: u64, got: u64 },
    /// Every attempt failed; the last failure is the source.
    #[error("giving up on `{url}` after {attempts} attempts")]
    Exhausted {
        url: String,
        attempts: u32,
        #[source]
        last: Box<HttpError>,
    },
    /// The content does not match the checksum the build asked for.
    #[error("checksum mismatch for `{url}`: expected {expected}, got {actual}")]
    Checksum {
        url: String,
        expected: Digest,
        actual: Digest,
    },
    /// A temp file could not be created.
    #[error("failed to create a temp file in `{dir}`")]
    TempFile {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing the download to its temp file failed.
    #[error("failed to write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The server said `304 Not Modified` to a request kiln did not make conditional.
    #[error("`{url}` answered 304 Not Modified without a matching ETag")]
    UnexpectedNotModified { url: String },
}

impl HttpError {
    /// Whether another attempt may succeed.
    fn retryable(&self) -> bool {
        match self {
            HttpError::Request { source, .. } => !matches!(
                source.as_ref(),
                ureq::Error::BadUri(_) | ureq::Error::RequireHttpsOnly(_) | ureq::Error::TooManyRedirects
            ),
            HttpError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            HttpError::Body { .. } | HttpError::Truncated { .. } => true,
            _ => false,
        }
    }
}

/// How a [`HttpClient`] behaves.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Attempts per download (at least 1).
    pub attempts: u32,
    /// Wait before the second attempt; doubled before each further one.
    pub backoff: Duration,
    /// Connect timeout of one attempt.
    pub connect_timeout: Duration,
    /// Where ETag records are kept (`ROOT/cache/http`); `None` = never conditional.
    pub cache_dir: Option<PathBuf>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            attempts: 4,
            backoff: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(30),
            cache_dir: None,
        }
    }
}

/// A finished download: a temp file (removed on drop unless persisted) and what was learnt.
#[derive(Debug)]
pub struct Download {
    /// The bytes, in a temp file in the directory the caller chose.
    pub file: tempfile::NamedTempFile,
    /// sha256 of the bytes.
    pub digest: Digest,
    pub size: u64,
    /// `Last-Modified`, in seconds since the epoch.
    pub last_modified: Option<i64>,
    /// The file name from `Content-Disposition`, if the server sent a usable one.
    pub disposition_name: Option<String>,
    /// The `ETag` the server sent.
    pub etag: Option<String>,
}

/// What [`HttpClient::check`] found.
#[derive(Debug)]
pub enum Checked {
    /// The server confirmed the remembered content (`304`).
    NotModified(Remembered),
    /// The content was downloaded.
    Downloaded(Download),
}

impl Checked {
    /// The content digest either way.
    pub fn digest(&self) -> Digest {
        match self {
            Checked::NotModified(r) => r.digest,
            Checked::Downloaded(d) => d.digest,
        }
    }

    /// The `Last-Modified` time either way.
    pub fn last_modified(&self) -> Option<i64> {
        match self {
            Checked::NotModified(r) => r.last_modified,
            Checked::Downloaded(d) => d.last_modified,
        }
    }
}

/// What is remembered about a URL between builds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub url: String,
    pub etag: String,
    pub digest: Digest,
    pub last_modified: Option<i64>,
}

/// A blocking HTTP client for downloads.
#[derive(Debug)]
pub struct HttpClient {
    agent: ureq::Agent,
    opts: HttpOptions,
}

impl HttpClient {
    /// A client with `opts`.
    pub fn new(opts: HttpOptions) -> HttpClient {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(opts.connect_timeout))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build();
        HttpClient {
            agent: ureq::Agent::new_with_config(config),
            opts,
        }
    }

    /// Downloads `url` into a temp file in `tmp_dir`, retrying transient failures. With
    /// `expected`, a mismatch is an error and the temp file is removed.
    pub fn download(
        &self,
        url: &str,
        tmp_dir: &Path,
        expected: Option<&Digest>,
    ) -> Result<Download, HttpError> {
        match self.with_retries(url, |c| c.attempt(url, tmp_dir, None))? {
            Attempt::Downloaded(d) => {
                verify(url, &d, expected)?;
                self.remember(url, &d);
                Ok(d)
            }
            Attempt::NotModified(_) => Err(HttpError::UnexpectedNotModified { url: url.into() }),
        }
    }

    /// Re-checks `url`: a conditional request when an ETag is remembered for it, the download
    /// otherwise (or when the content changed).
    pub fn check(&self, url: &str, tmp_dir: &Path) -> Result<Checked, HttpError> {
        let remembered = self.recall(url);
        let etag = remembered.as_ref().map(|r| r.etag.as_str());
        match self.with_retries(url, |c| c.attempt(url, tmp_dir, etag))? {
            Attempt::Downloaded(d) => {
                self.remember(url, &d);
                Ok(Checked::Downloaded(d))
            }
            Attempt::NotModified(response_etag) => match remembered {
                Some(r) if response_etag.as_deref().is_none_or(|e| e == r.etag) => {
                    Ok(Checked::NotModified(r))
                }
                _ => Err(HttpError::UnexpectedNotModified { url: url.into() }),
            },
        }
    }

    fn with_retries(
        &self,
        url: &str,
        mut f: impl FnMut(&HttpClient) -> Result<Attempt, HttpError>,
    ) -> Result<Attempt, HttpError> {
        let attempts = self.opts.attempts.max(1);
        let mut wait = self.opts.backoff;
        let mut n = 0;
        loop {
            n += 1;
            match f(self) {
                Ok(a) => return Ok(a),
                Err(e) if e.retryable() && n < attempts => {
                    tracing::debug!(url, attempt = n, error = %e, "retrying download");
                    std::thread::sleep(wait);
                    wait = wait.saturating_mul(2);
                }
                Err(e) if e.retryable() => {
                    return Err(HttpError::Exhausted {
                        url: url.into(),
                        attempts: n,
                        last: Box::new(e),
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn attempt(&self, url: &str, tmp_dir: &Path, etag: Option<&str>) -> Result<Attempt, HttpError> {
        let mut req = self.agent.get(url);
        if let Some(e) = etag {
            req = req.header("If-None-Match", e);
        }
        let mut resp = req.call().map_err(|source| HttpError::Request {
            url: url.into(),
            source: Box::new(source),
        })?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let response_etag = header("etag");
        if status == 304 && etag.is_some() {
            return Ok(Attempt::NotModified(response_etag));
        }
        if !(200..300).contains(&status) {
            return Err(HttpError::Status {
                url: url.into(),
                status,
            });
        }
        let last_modified = header("last-modified").and_then(|v| parse_http_date(&v));
        let disposition_name = header("content-disposition").and_then(|v| disposition_filename(&v));
        // With a Content-Encoding the length counts encoded bytes; only check plain bodies.
        let expected_len = match header("content-encoding") {
            Some(e) if !e.eq_ignore_ascii_case("identity") => None,
            _ => header("content-length").and_then(|v| v.trim().parse::<u64>().ok()),
        };
        let file = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(tmp_dir)
            .map_err(|source| HttpError::TempFile {
                dir: tmp_dir.into(),
                source,
            })?;
        let path = file.path().to_path_buf();
        let mut writer = BufWriter::with_capacity(1 << 16, file.as_file());
        let mut hasher = Sha256::new();
        let mut reader = resp.body_mut().as_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut size = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(HttpError::Body {
                        url: url.into(),
                        source,
                    })
                }
            };
            hasher.update(&buf[..n]);
            writer.write_all(&buf[..n]).map_err(|source| HttpError::Write {
                path: path.clone(),
                source,
            })?;
            size += n as u64;
        }
        writer.flush().map_err(|source| HttpError::Write {
            path: path.clone(),
            source,
        })?;
        drop(writer);
        if let Some(expected) = expected_len {
            if size != expected {
                return Err(HttpError::Truncated {
                    url: url.into(),
                    expected,
                    got: size,
                });
            }
        }
        Ok(Attempt::Downloaded(Download {
            file,
            digest: Digest(hasher.finalize().into()),
            size,
            last_modified,
            disposition_name,
            etag: response_etag,
        }))
    }

    fn record_path(&self, url: &str) -> Option<PathBuf> {
        let dir = self.opts.cache_dir.as_ref()?;
        Some(dir.join(format!("{}.json", Digest::of(url.as_bytes()).hex())))
    }

    fn recall(&self, url: &str) -> Option<Remembered> {
        let bytes = std::fs::read(self.record_path(url)?).ok()?;
        let r: Remembered = serde_json::from_slice(&bytes).ok()?;
        (r.url == url).then_some(r)
    }

    /// Keeps the ETag of a download for the next [`HttpClient::check`]. Best effort: a record
    /// that cannot be written only costs a full download next time.
    fn remember(&self, url: &str, d: &Download) {
        let Some(path) = self.record_path(url) else { return };
        let Some(etag) = d.etag.clone() else {
            let _ = std::fs::remove_file(&path);
            return;
        };
        let record = Remembered {
            url: url.into(),
            etag,
            digest: d.digest,
            last_modified: d.last_modified,
        };
        let Some(dir) = path.parent() else { return };
        let written = std::fs::create_dir_all(dir).and_then(|_| {
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            tmp.write_all(&serde_json::to_vec(&record).map_err(io::Error::other)?)?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "failed to record the ETag of a download");
        }
    }
}

/// The result of one attempt.
enum Attempt {
    Downloaded(Download),
    /// `304`, with the ETag the server sent (if any).
    NotModified(Option<String>),
}

fn verify(url: &str, d: &Download, expected: Option<&Digest>) -> Result<(), HttpError> {
    match expected {
        Some(e) if *e != d.digest => Err(HttpError::Checksum {
            url: url.into(),
            expected: *e,
            actual: d.digest,
        }),
        _ => Ok(()),
    }
}

/// Verifies a finished download against the checksum the build pinned.
pub fn verify_checksum(url: &str, d: &Download, expected: &Digest) -> Result<(), HttpError> {
    verify(url, d, Some(expected))
}

impl Download {
    /// Opens the downloaded bytes for reading from the start.
    pub fn reopen(&self) -> io::Result<File> {
        self.file.reopen()
    }
}

/// Parses an HTTP date in the IMF-fixdate form every HTTP/1.1 server sends
/// (`Sun, 06 Nov 1994 08:49:37 GMT`) into seconds since the epoch.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let rest = s.trim().split_once(", ")?.1;
    let mut parts = rest.split_ascii_whitespace();
    let day: i64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':');
    let h: i64 = hms.next()?.parse().ok()?;
    let m: i64 = hms.next()?.parse().ok()?;
    let sec: i64 = hms.next()?.parse().ok()?;
    if parts.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// The base name from a `Content-Disposition` header's `filename` parameter, if it is usable.
pub fn disposition_filename(header: &str) -> Option<String> {
    let value = header.split(';').skip(1).find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("filename")
            .then(|| v.trim().trim_matches('"').to_string())
    })?;
    let base = value.rsplit(['/', '\\']).next()?.to_string();
    (!base.is_empty() && base != "." && base != "..").then_some(base)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(1_445_412_480)
        );
        assert_eq!(parse_http_date("yesterday"), None);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 PST"), None);
    }

    #[test]
    fn disposition_names() {
        assert_eq!(
            disposition_filename("attachment; filename=\"a.tar.gz\""),
            Some("a.tar.gz".into())
        );
        assert_eq!(
            disposition_filename("attachment; filename=../../x"),
            Some("x".into())
        );
        assert_eq!(disposition_filename("inline"), None);
        assert_eq!(disposition_filename("attachment; filename=\"..\""), None);
    }

    /// A loopback server answering each connection with `respond(n)` (n = 0, 1, ...).
    fn serve(respond: impl Fn(usize, &str) -> Vec<u8> + Send + Sync + 'static) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let n = c.fetch_add(1, Ordering::SeqCst);
                let _ = stream.write_all(&respond(n, &head));
            }
        });
        (format!("http://{addr}/dir/file.bin"), count)
    }

    fn ok(body: &[u8], extra: &str) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
            body.len()
        )
        .into_bytes();
        r.extend(body);
        r
    }

    fn client(cache: Option<PathBuf>) -> HttpClient {
        HttpClient::new(HttpOptions {
            attempts: 3,
            backoff: Duration::from_millis(10),
            cache_dir: cache,
            ..Default::default()
        })
    }

    #[test]
    fn retries_a_dropped_connection_then_succeeds() {
        let (url, count) = serve(|n, _| {
            if n == 0 {
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhalf".to_vec()
            } else {
                ok(b"0123456789", "Last-Modified: Wed, 21 Oct 2015 07:28:00 GMT\r\n")
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let d = client(None).download(&url, dir.path(), None).unwrap();
        assert_eq!(std::fs::read(d.file.path()).unwrap(), b"0123456789");
        assert_eq!(d.digest, Digest::of(b"0123456789"));
        assert_eq!(d.last_modified, Some(1_445_412_480));
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn always_truncated_fails_clearly() {
        let (url, count) =
            serve(|_, _| b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhalf".to_vec());
        let dir = tempfile::tempdir().unwrap();
        let err = client(None).download(&url, dir.path(), None).unwrap_err();
        assert!(matches!(err, HttpError::Exhausted { attempts: 3, .. }), "{err:?}");
        assert_eq!(count.load(Ordering::SeqCst), 3);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "temp files left behind"
        );
    }

    #[test]
    fn server_errors_are_retried_client_errors_are_not() {
        let (url, count) = serve(|n, _| {
            if n == 0 {
                b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            } else {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let err = client(None).download(&url, dir.path(), None).unwrap_err();
        assert!(matches!(err, HttpError::Status { status: 404, .. }), "{err:?}");
        assert!(err.to_string().contains(&url));
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn checksum_mismatch_names_url_and_digests() {
        let (url, _) = serve(|_, _| ok(b"wrong bytes", ""));
        let dir = tempfile::tempdir().unwrap();
        let expected = Digest::of(b"right bytes");
        let err = client(None)
            .download(&url, dir.path(), Some(&expected))
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&url) && msg.contains(&expected.to_string()), "{msg}");
        assert!(msg.contains(&Digest::of(b"wrong bytes").to_string()), "{msg}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn etag_makes_the_recheck_conditional() {
        let (url, count) = serve(|_, head| {
            if head.to_ascii_lowercase().contains("if-none-match: \"v1\"") {
                b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nConnection: close\r\n\r\n".to_vec()
            } else {
                ok(b"payload", "ETag: \"v1\"\r\n")
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let c = client(Some(dir.path().join("cache")));
        let first = c.check(&url, dir.path()).unwrap();
        assert!(matches!(first, Checked::Downloaded(_)));
        let second = c.check(&url, dir.path()).unwrap();
        match second {
            Checked::NotModified(r) => assert_eq!(r.digest, Digest::of(b"payload")),
            other => panic!("expected 304, got {other:?}"),
        }
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
