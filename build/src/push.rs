//! Publishing from the build: every name of a `push=true` image output goes to its registry
//! through `kiln_source::registry::push_image`, the code and credentials of `kiln push`. Each
//! push shows as a step of its own in the build's progress (`pushing REF`, one line per blob).

use std::time::Instant;

use kiln_cache::images::Image;
use kiln_cache::reference::Reference;
use kiln_cache::Store;
use kiln_dag::Digest;
use kiln_solver::progress::{EventKind, ProgressSink, Stream, VertexProgress};
use kiln_source::registry::{
    self, Client, ClientOptions, Compression, Pushed, TransferEvent, TransferProgress,
};

/// One name to push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PushJob {
    pub reference: Reference,
    pub compression: Compression,
    /// Speak plain HTTP to this name's registry (`registry.insecure=true`).
    pub insecure: bool,
}

/// Pushing failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Registry(#[from] registry::PushError),
}

/// Pushes `what` (an image, or an index: every platform image, then the index) under every
/// job's name, in order. `build_ref` makes the progress steps' identities unique to this build.
pub(crate) fn push_all(
    store: &Store,
    what: What<'_>,
    jobs: &[PushJob],
    registry_opts: &ClientOptions,
    progress: &ProgressSink,
    build_ref: &str,
) -> Result<Vec<Pushed>, PushError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut opts = registry_opts.clone();
    for j in jobs.iter().filter(|j| j.insecure) {
        opts.insecure_registries.push(j.reference.domain().to_string());
    }
    let client = Client::new(opts);
    let mut pushed = Vec::with_capacity(jobs.len());
    for job in jobs {
        pushed.push(push_one(store, &client, what, job, progress, build_ref)?);
    }
    Ok(pushed)
}

/// What a push sends.
#[derive(Clone, Copy)]
pub(crate) enum What<'a> {
    Image(&'a Image),
    Index(&'a kiln_cache::image_index::IndexImage),
}

fn push_one(
    store: &Store,
    client: &Client,
    what: What<'_>,
    job: &PushJob,
    progress: &ProgressSink,
    build_ref: &str,
) -> Result<Pushed, PushError> {
    let vertex = Digest::of(format!("kiln-build push {build_ref} {}", job.reference).as_bytes());
    let name = format!("pushing {}", job.reference);
    progress.send(EventKind::Started {
        vertex,
        name: name.clone(),
    });
    let started = Instant::now();
    let lines = Lines(progress.for_vertex(vertex));
    let opts = registry::PushOptions {
        compression: job.compression,
        ..registry::PushOptions::default()
    };
    let result = match what {
        What::Image(image) => registry::push_image(client, store, image, &job.reference, &opts, &lines),
        What::Index(index) => registry::push_index(client, store, index, &job.reference, &opts, &lines),
    };
    match result {
        Ok(p) => {
            lines.line(format!(
                "{}: digest: {} size: {}",
                job.reference.tag().unwrap_or("latest"),
                p.digest,
                p.size
            ));
            progress.send(EventKind::Completed {
                vertex,
                duration: started.elapsed(),
            });
            Ok(p)
        }
        Err(e) => {
            progress.send(EventKind::Failed {
                vertex,
                duration: started.elapsed(),
                error: chain(&e),
            });
            Err(e.into())
        }
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    parts.join(": ")
}

/// Docker's per-blob push lines, as the push step's output.
struct Lines(VertexProgress);

impl Lines {
    fn line(&self, text: String) {
        self.0.log(Stream::Stdout, format!("{text}\n"));
    }
}

fn short(d: &Digest) -> String {
    d.hex()[..12].to_string()
}

impl TransferProgress for Lines {
    fn event(&self, event: TransferEvent) {
        match event {
            TransferEvent::Exists { digest } => {
                self.line(format!("{}: Layer already exists", short(&digest)))
            }
            TransferEvent::Mounted { digest, from } => {
                self.line(format!("{}: Mounted from {from}", short(&digest)))
            }
            TransferEvent::Retrying { digest, error } => {
                self.line(format!("{}: Retrying ({error})", short(&digest)))
            }
            TransferEvent::Done { digest } => self.line(format!("{}: Pushed", short(&digest))),
            TransferEvent::Started { .. } | TransferEvent::Bytes { .. } => {}
        }
    }
}
