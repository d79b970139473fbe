//! Progress events: what the scheduler and the ops report while a build runs.
//!
//! The scheduler sends vertex lifecycle events (cached, cache miss, started, completed, failed,
//! cancelled); ops send their process output and warnings through the [`VertexProgress`] in their
//! [`ExecCtx`](crate::scheduler::ExecCtx). Every event is timestamped when it is sent. A
//! [`ProgressSink`] is a cheap, cloneable, never-blocking sender; the renderer (in the `kiln`
//! binary) owns the [`ProgressReceiver`]. Sending after the receiver is gone is not an error:
//! the event is dropped.

use std::fmt;
use std::time::{Duration, SystemTime};

use kiln_dag::Digest;
use tokio::sync::mpsc;

use crate::cachekey::CacheKey;

/// One progress event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// When the event was sent.
    pub time: SystemTime,
    /// What happened.
    pub kind: EventKind,
}

/// Which output stream a log chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The process's standard output.
    Stdout,
    /// The process's standard error.
    Stderr,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The vertex's result was found in the cache; it will not run.
    Cached { vertex: Digest, name: String },
    /// The vertex's result was not found (or not looked for); sent just before it starts.
    CacheMiss {
        vertex: Digest,
        name: String,
        reason: MissReason,
    },
    /// The vertex started executing.
    Started { vertex: Digest, name: String },
    /// The vertex finished executing and its result was recorded.
    Completed { vertex: Digest, duration: Duration },
    /// The vertex failed; `error` is the whole error chain, `: `-separated.
    Failed {
        vertex: Digest,
        duration: Duration,
        error: String,
    },
    /// The vertex was running (or waiting for a job slot) when the build was cancelled.
    Cancelled { vertex: Digest },
    /// A chunk of a process's output (not necessarily whole lines).
    Log {
        vertex: Digest,
        stream: Stream,
        data: Vec<u8>,
    },
    /// A warning, about one vertex or the whole build.
    Warning { vertex: Option<Digest>, message: String },
    /// A sub-step of a vertex (BuildKit's `VertexStatus`): `transferring context:`,
    /// `writing image sha256:…`, with a byte count (`current` of `total`, 0 when unknown).
    /// Sent when it ends (`completed`); `started` is when it began.
    Status {
        vertex: Digest,
        id: String,
        current: u64,
        total: u64,
        started: SystemTime,
        completed: Option<SystemTime>,
    },
}

impl EventKind {
    /// The vertex the event is about, if any.
    pub fn vertex(&self) -> Option<&Digest> {
        match self {
            EventKind::Cached { vertex, .. }
            | EventKind::CacheMiss { vertex, .. }
            | EventKind::Started { vertex, .. }
            | EventKind::Completed { vertex, .. }
            | EventKind::Failed { vertex, .. }
            | EventKind::Cancelled { vertex }
            | EventKind::Log { vertex, .. }
            | EventKind::Status { vertex, .. } => Some(vertex),
            EventKind::Warning { vertex, .. } => vertex.as_ref(),
        }
    }
}

/// Why a vertex was not served from the cache. The renderer shows it at debug level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MissReason {
    /// `--no-cache` or `--no-cache-filter` covers the vertex: the lookup was skipped (the result
    /// is still recorded).
    NoCache,
    /// An input this vertex is keyed on was not in the cache either and had to run, so this
    /// vertex's key is new too.
    InputChanged { input: Digest, name: String },
    /// Every input came from the cache, but the files the op reads (its content key) match no
    /// cached result.
    ContentChanged { content: CacheKey },
    /// Nothing is recorded under this key: the op is new or its result was pruned.
    NotInCache { key: CacheKey },
}

impl fmt::Display for MissReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MissReason::NoCache => {
                f.write_str("cache disabled for this step (--no-cache or --no-cache-filter)")
            }
            MissReason::InputChanged { input, name } => {
                write!(f, "input {} was rebuilt", display_name(input, name))
            }
            MissReason::ContentChanged { content } => {
                write!(
                    f,
                    "no cached result for the files it reads (content key {content})"
                )
            }
            MissReason::NotInCache { key } => write!(f, "no cached result for key {key}"),
        }
    }
}

fn display_name(d: &Digest, name: &str) -> String {
    if name.is_empty() {
        format!("{d:?}")
    } else {
        format!("`{name}`")
    }
}

/// `err` and its causes, `: `-separated (the form [`EventKind::Failed`] carries).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Creates a connected sink and receiver.
pub fn channel() -> (ProgressSink, ProgressReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (ProgressSink { tx: Some(tx) }, ProgressReceiver { rx })
}

/// Where events go. Cloning is cheap; sending never blocks.
#[derive(Clone, Debug)]
pub struct ProgressSink {
    tx: Option<mpsc::UnboundedSender<Event>>,
}

impl ProgressSink {
    /// A sink that drops every event (for callers that show no progress).
    pub fn discard() -> ProgressSink {
        ProgressSink { tx: None }
    }

    /// Timestamps and sends one event.
    pub fn send(&self, kind: EventKind) {
        if let Some(tx) = &self.tx {
            // A closed receiver means nobody is watching any more; that is not the build's problem.
            let _ = tx.send(Event {
                time: SystemTime::now(),
                kind,
            });
        }
    }

    /// Sends a build-wide warning.
    pub fn warn(&self, message: impl Into<String>) {
        self.send(EventKind::Warning {
            vertex: None,
            message: message.into(),
        });
    }

    /// A handle that reports for one vertex.
    pub fn for_vertex(&self, vertex: Digest) -> VertexProgress {
        VertexProgress {
            sink: self.clone(),
            vertex,
        }
    }
}

/// The receiving end, owned by the renderer.
#[derive(Debug)]
pub struct ProgressReceiver {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl ProgressReceiver {
    /// The next event; `None` once every sink is dropped and the queue is empty.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event without waiting; `None` if there is none queued right now.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// The next event, blocking the thread (not for use inside an async task).
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

/// A sink bound to one vertex: what an op uses to report output and warnings.
#[derive(Clone, Debug)]
pub struct VertexProgress {
    sink: ProgressSink,
    vertex: Digest,
}

impl VertexProgress {
    /// The vertex this handle reports for.
    pub fn vertex(&self) -> Digest {
        self.vertex
    }

    /// Sends a chunk of process output.
    pub fn log(&self, stream: Stream, data: impl Into<Vec<u8>>) {
        self.sink.send(EventKind::Log {
            vertex: self.vertex,
            stream,
            data: data.into(),
        });
    }

    /// Sends a warning about this vertex.
    pub fn warn(&self, message: impl Into<String>) {
        self.sink.send(EventKind::Warning {
            vertex: Some(self.vertex),
            message: message.into(),
        });
    }
    /// Sends a finished sub-step `id` that began at `started`, with its byte count (0: none).
    pub fn status_done(&self, id: impl Into<String>, current: u64, started: SystemTime) {
        self.sink.send(EventKind::Status {
            vertex: self.vertex,
            id: id.into(),
            current,
            total: 0,
            started,
            completed: Some(SystemTime::now()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_arrive_in_order_and_discard_drops() {
        let (sink, mut rx) = channel();
        let d = Digest::of(b"v");
        let vp = sink.for_vertex(d);
        vp.log(Stream::Stdout, b"hi\n".to_vec());
        sink.warn("careful");
        drop((sink, vp));
        let a = rx.blocking_recv().expect("first event");
        assert_eq!(
            a.kind,
            EventKind::Log {
                vertex: d,
                stream: Stream::Stdout,
                data: b"hi\n".to_vec()
            }
        );
        let b = rx.blocking_recv().expect("second event");
        assert_eq!(
            b.kind,
            EventKind::Warning {
                vertex: None,
                message: "careful".into()
            }
        );
        assert!(b.time >= a.time);
        assert!(rx.blocking_recv().is_none());
        ProgressSink::discard().warn("nobody listens");
    }
}
