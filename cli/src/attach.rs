//! The attach client shared by `attach`, `start -a` and `run -it`: streams a container's output
//! from its supervisor's attach socket, sends stdin, the terminal size and the end of stdin as
//! frames (see `kiln_containers::supervisor`), keeps the terminal raw while attached to a
//! container with a tty, and detaches on the detach keys (Docker's `ctrl-p,ctrl-q`), leaving the
//! container running.

use std::io::{self, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kiln_containers::supervisor::{
    self, SignalProxy, FRAME_CLOSE_STDIN, FRAME_EXIT, FRAME_RESIZE, FRAME_STDERR, FRAME_STDIN, FRAME_STDOUT,
};

/// Docker's default detach keys.
pub const DEFAULT_DETACH_KEYS: &str = "ctrl-p,ctrl-q";

/// A `--detach-keys` value that is not a key sequence.
#[derive(Debug, thiserror::Error)]
#[error("invalid detach keys ({keys}) provided: unknown character: '{key}'")]
pub struct DetachKeysError {
    /// The value as given.
    pub keys: String,
    /// The key that is not one.
    pub key: String,
}

/// Parses detach keys as Docker does (`moby/term`'s `ToBytes`): comma-separated keys, each a
/// single character, `ctrl-@`, `ctrl-a` .. `ctrl-z`, `ctrl-[`, `ctrl-\`, `ctrl-]`, `ctrl-^`,
/// `ctrl-_`, or `DEL`.
pub fn parse_detach_keys(keys: &str) -> Result<Vec<u8>, DetachKeysError> {
    const CTRL: &[u8; 32] = b"@abcdefghijklmnopqrstuvwxyz[\\]^_";
    let mut out = Vec::new();
    for key in keys.split(',') {
        let b = key.as_bytes();
        if b.len() == 1 {
            out.push(b[0]);
        } else if key == "DEL" {
            out.push(127);
        } else if let Some(code) = key
            .strip_prefix("ctrl-")
            .filter(|k| k.len() == 1)
            .and_then(|k| CTRL.iter().position(|&c| c == k.as_bytes()[0]))
        {
            out.push(code as u8);
        } else {
            return Err(DetachKeysError {
                keys: keys.to_string(),
                key: key.to_string(),
            });
        }
    }
    Ok(out)
}

/// Docker's escape proxy: holds back input that matches a prefix of the detach keys, lets it
/// through when the sequence breaks, and reports the whole sequence.
#[derive(Debug)]
pub struct EscapeProxy {
    keys: Vec<u8>,
    matched: usize,
}

impl EscapeProxy {
    /// A proxy watching for `keys` (empty: never detaches).
    pub fn new(keys: Vec<u8>) -> EscapeProxy {
        EscapeProxy { keys, matched: 0 }
    }

    /// Feeds `input`; returns the bytes to pass on and whether the keys were typed (bytes after
    /// them are dropped, as Docker drops them).
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        if self.keys.is_empty() {
            out.extend_from_slice(input);
            return (out, false);
        }
        for &b in input {
            if b == self.keys[self.matched] {
                self.matched += 1;
                if self.matched == self.keys.len() {
                    self.matched = 0;
                    return (out, true);
                }
                continue;
            }
            // The sequence broke: what was held back goes through, then this byte (which may
            // start the sequence again).
            out.extend_from_slice(&self.keys[..self.matched]);
            self.matched = 0;
            if b == self.keys[0] {
                self.matched = 1;
                if self.keys.len() == 1 {
                    self.matched = 0;
                    return (out, true);
                }
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// How an attached session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The container stopped with this code.
    Exited(i32),
    /// The user typed the detach keys; the container runs on.
    Detached,
}

/// What to attach.
pub struct Options {
    /// Forward this process's stdin (the container was created with `-i`).
    pub stdin: bool,
    /// The container has a pty (`-t`): raw terminal, window size, detach keys.
    pub tty: bool,
    /// The detach key sequence (used with a tty and stdin).
    pub detach_keys: Vec<u8>,
    /// The signal proxy, already blocking signals, with the container's pid set by the caller;
    /// with a tty it also sends the window size on `SIGWINCH`.
    pub signals: Option<SignalProxy>,
}

fn send(w: &Mutex<UnixStream>, kind: u8, data: &[u8]) -> io::Result<()> {
    let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
    supervisor::write_frame(&mut *w, kind, data)
}

fn send_size(w: &Mutex<UnixStream>) {
    if let Ok((rows, cols)) = kiln_runtime::tty::get_winsize(io::stdout()) {
        let mut data = [0u8; 4];
        data[..2].copy_from_slice(&rows.to_be_bytes());
        data[2..].copy_from_slice(&cols.to_be_bytes());
        let _ = send(w, FRAME_RESIZE, &data);
    }
}

/// Streams the attach session on `conn` until the container stops or the user detaches.
pub fn attach(conn: UnixStream, opts: Options) -> anyhow::Result<End> {
    let writer = Arc::new(Mutex::new(conn.try_clone()?));
    let detached = Arc::new(AtomicBool::new(false));
    let stdin_is_tty = kiln_runtime::tty::is_tty(io::stdin());
    // A terminal attached to a pty goes raw: the container's pty echoes and interprets keys.
    let _raw = if opts.tty && opts.stdin && stdin_is_tty {
        kiln_runtime::tty::RawMode::enable(io::stdin()).ok()
    } else {
        None
    };
    if opts.tty && kiln_runtime::tty::is_tty(io::stdout()) {
        send_size(&writer);
        if let Some(p) = opts.signals.as_ref() {
            let w = writer.clone();
            p.on_winch(Some(Box::new(move || send_size(&w))));
        }
    }
    if opts.stdin {
        let (w, detached, conn) = (writer.clone(), detached.clone(), conn.try_clone()?);
        let mut proxy = EscapeProxy::new(if opts.tty { opts.detach_keys } else { Vec::new() });
        std::thread::spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = [0u8; 8192];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let (pass, detach) = proxy.feed(&buf[..n]);
                if !pass.is_empty() && send(&w, FRAME_STDIN, &pass).is_err() {
                    return;
                }
                if detach {
                    detached.store(true, Ordering::SeqCst);
                    let _ = conn.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
            let _ = send(&w, FRAME_CLOSE_STDIN, &[]);
        });
    }
    let mut r = io::BufReader::new(conn);
    let mut end = None;
    loop {
        let frame = match supervisor::read_frame(&mut r) {
            Ok(f) => f,
            Err(_) if detached.load(Ordering::SeqCst) => None,
            Err(e) => return Err(e.into()),
        };
        let Some((kind, data)) = frame else { break };
        match kind {
            FRAME_STDOUT => {
                let mut o = io::stdout().lock();
                o.write_all(&data)?;
                o.flush()?;
            }
            FRAME_STDERR => io::stderr().lock().write_all(&data)?,
            FRAME_EXIT => {
                if let Ok(b) = <[u8; 4]>::try_from(data.as_slice()) {
                    end = Some(End::Exited(i32::from_be_bytes(b)));
                }
                break;
            }
            _ => {}
        }
    }
    if let Some(p) = opts.signals.as_ref() {
        p.on_winch(None);
        p.forward_to(0);
    }
    Ok(match end {
        Some(e) => e,
        None if detached.load(Ordering::SeqCst) => End::Detached,
        None => End::Exited(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys_parse_as_dockers() {
        assert_eq!(parse_detach_keys(DEFAULT_DETACH_KEYS).unwrap(), vec![16, 17]);
        assert_eq!(parse_detach_keys("ctrl-x,y").unwrap(), vec![24, b'y']);
        assert_eq!(
            parse_detach_keys("ctrl-@,ctrl-_,DEL,a").unwrap(),
            vec![0, 31, 127, b'a']
        );
        let e = parse_detach_keys("ctrl-p,bogus").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid detach keys (ctrl-p,bogus) provided: unknown character: 'bogus'"
        );
        assert!(parse_detach_keys("ctrl-A").is_err());
    }

    #[test]
    fn escape_proxy_holds_back_and_releases_a_broken_sequence() {
        let mut p = EscapeProxy::new(vec![16, 17]);
        assert_eq!(p.feed(b"ab\x10"), (b"ab".to_vec(), false));
        // The held ctrl-p goes through with the byte that broke the sequence.
        assert_eq!(p.feed(b"x"), (b"\x10x".to_vec(), false));
        assert_eq!(p.feed(b"\x10\x10"), (b"\x10".to_vec(), false));
        assert_eq!(p.feed(b"\x11rest"), (Vec::new(), true));
        let mut none = EscapeProxy::new(Vec::new());
        assert_eq!(none.feed(b"\x10\x11"), (b"\x10\x11".to_vec(), false));
    }
}
