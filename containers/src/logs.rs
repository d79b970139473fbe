//! Container logs in Docker's json-file format: one JSON object per line,
//! `{"log":"hello\n","stream":"stdout","time":"2024-01-02T03:04:05.123456789Z"}`, in
//! `ROOT/containers/<id>/<id>-json.log`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead as _, BufReader, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The largest partial line kept before it is written without its end (Docker uses 16 KiB).
const MAX_PARTIAL: usize = 16 * 1024;

/// Which output stream a log entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The text, with its `\n` when the line was complete.
    pub log: String,
    /// The stream.
    pub stream: Stream,
    /// When it was written, RFC 3339 with nanoseconds.
    pub time: String,
}

/// A failure writing or reading a log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Opening the log failed.
    #[error("failed to open the log `{path}`")]
    Open {
        /// The log file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Appending failed.
    #[error("failed to write the log `{path}`")]
    Write {
        /// The log file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading failed.
    #[error("failed to read the log `{path}`")]
    Read {
        /// The log file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The log file of the container in `dir` whose ID is `id`.
pub fn log_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}-json.log"))
}

/// Appends output to a json-file log, line by line, from several threads.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    partial: [Vec<u8>; 2],
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl LogWriter {
    /// Opens (creating or appending to) the log at `path`.
    pub fn open(path: &Path) -> Result<LogWriter, LogError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| LogError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(LogWriter {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                file,
                partial: [Vec::new(), Vec::new()],
            }),
        })
    }

    /// Records `data` written by the container on `stream`: each complete line becomes an entry;
    /// an incomplete one waits for the rest (or [`LogWriter::flush`]).
    pub fn write(&self, stream: Stream, data: &[u8]) -> Result<(), LogError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Inner { file, partial } = &mut *inner;
        let buf = &mut partial[index(stream)];
        buf.extend_from_slice(data);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
            push_entry(&mut out, stream, &buf[start..start + nl + 1]);
            start += nl + 1;
        }
        if buf.len() - start >= MAX_PARTIAL {
            push_entry(&mut out, stream, &buf[start..]);
            start = buf.len();
        }
        buf.drain(..start);
        if out.is_empty() {
            return Ok(());
        }
        file.write_all(&out).map_err(|source| LogError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// Writes incomplete lines as they are (the process ended).
    pub fn flush(&self) -> Result<(), LogError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Inner { file, partial } = &mut *inner;
        let mut out = Vec::new();
        for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            if !partial[i].is_empty() {
                push_entry(&mut out, stream, &partial[i]);
                partial[i].clear();
            }
        }
        file.write_all(&out).map_err(|source| LogError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

fn push_entry(out: &mut Vec<u8>, stream: Stream, line: &[u8]) {
    let entry = Entry {
        log: String::from_utf8_lossy(line).into_owned(),
        stream,
        time: crate::now_rfc3339(),
    };
    if let Ok(json) = serde_json::to_vec(&entry) {
        out.extend_from_slice(&json);
        out.push(b'\n');
    }
}

/// Reads every complete entry of the log at `path` (a missing log is empty).
pub fn read_all(path: &Path) -> Result<Vec<Entry>, LogError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LogError::Open {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    let mut reader = BufReader::new(file);
    read_entries(&mut reader, path, &mut out)?;
    Ok(out)
}

/// Reads complete lines from `reader`; a trailing partial line is left unread (the reader is
/// positioned at its start) so that a follower reads it again once it is complete.
fn read_entries(reader: &mut BufReader<File>, path: &Path, out: &mut Vec<Entry>) -> Result<(), LogError> {
    let err = |source| LogError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(err)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            reader.seek(SeekFrom::Current(-(n as i64))).map_err(err)?;
            return Ok(());
        }
        // A line that is not an entry (a torn write after a crash) is skipped.
        if let Ok(e) = serde_json::from_slice::<Entry>(&line) {
            out.push(e);
        }
    }
}

/// Reads the log at `path` as `kiln logs` does: the last `tail` entries (all when `None`), then,
/// when `follow`, every new entry until `done()` returns true (checked between polls; the log is
/// read once more after it does). Each entry is handed to `emit`.
pub fn stream(
    path: &Path,
    tail: Option<usize>,
    follow: bool,
    mut done: impl FnMut() -> bool,
    mut emit: impl FnMut(&Entry) -> io::Result<()>,
) -> Result<(), LogError> {
    let file = loop {
        match File::open(path) {
            Ok(f) => break f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !follow || done() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(LogError::Open {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    };
    let mut reader = BufReader::new(file);
    let mut batch = Vec::new();
    read_entries(&mut reader, path, &mut batch)?;
    let skip = tail.map_or(0, |t| batch.len().saturating_sub(t));
    let write_err = |source| LogError::Write {
        path: PathBuf::from("-"),
        source,
    };
    for e in &batch[skip..] {
        emit(e).map_err(write_err)?;
    }
    if !follow {
        return Ok(());
    }
    loop {
        let finished = done();
        batch.clear();
        read_entries(&mut reader, path, &mut batch)?;
        for e in &batch {
            emit(e).map_err(write_err)?;
        }
        if finished {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_partial_lines_and_tail() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("c-json.log");
        let w = LogWriter::open(&path).unwrap();
        w.write(Stream::Stdout, b"one\ntw").unwrap();
        w.write(Stream::Stderr, b"err\n").unwrap();
        w.write(Stream::Stdout, b"o\nthree").unwrap();
        w.flush().unwrap();
        let all = read_all(&path).unwrap();
        let logs: Vec<(&str, Stream)> = all.iter().map(|e| (e.log.as_str(), e.stream)).collect();
        assert_eq!(
            logs,
            [
                ("one\n", Stream::Stdout),
                ("err\n", Stream::Stderr),
                ("two\n", Stream::Stdout),
                ("three", Stream::Stdout)
            ]
        );
        let first = std::fs::read_to_string(&path).unwrap();
        assert!(
            first.starts_with("{\"log\":\"one\\n\",\"stream\":\"stdout\",\"time\":\""),
            "{first}"
        );
        let mut got = Vec::new();
        stream(
            &path,
            Some(2),
            false,
            || true,
            |e| {
                got.push(e.log.clone());
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got, ["two\n", "three"]);
    }

    #[test]
    fn follow_reads_until_done() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("c-json.log");
        let w = LogWriter::open(&path).unwrap();
        w.write(Stream::Stdout, b"a\n").unwrap();
        let mut polls = 0;
        let mut got = Vec::new();
        stream(
            &path,
            None,
            true,
            || {
                polls += 1;
                if polls == 1 {
                    w.write(Stream::Stdout, b"b\n").unwrap();
                }
                polls > 1
            },
            |e| {
                got.push(e.log.clone());
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got, ["a\n", "b\n"]);
    }
}
