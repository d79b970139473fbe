//! Remote build cache: `--cache-from` imports (before the solve) and `--cache-to` exports (after
//! the image is written), in kiln's own format (`format`), kept in a registry (`registry`),
//! a directory (`local`) or the image itself (inline).
//!
//! Imports never fail a build: a missing ref, a foreign or other-version cache, an unreadable
//! config are warnings, and the build goes on without that importer. Exports fail the build
//! (401/403/5xx/429 after retries included) unless `ignore-error=true`, which makes them a
//! warning.

pub mod format;
pub(crate) mod import;
pub(crate) mod local;
mod mounts;
pub(crate) mod registry;
pub mod spec;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use kiln_cache::buildcache::{Layer, Record};
use kiln_cache::Store;
use kiln_dag::{Digest, Platform};
use kiln_solver::engine::{CacheSource, SolvedCache};
use kiln_solver::progress::ProgressSink;
use kiln_source::registry::{Client, ClientOptions, Compression};

use format::{CacheConfig, CacheLayer, CacheMount, CacheRecord};
pub use import::ImportedCache;
use spec::{CacheFrom, CacheTo, Mode};

/// Why an importer was skipped (a warning, never a failed build).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Registry(Box<kiln_source::registry::PullError>),
    #[error("failed to read a blob of the cache from the store")]
    Read(#[source] Box<kiln_cache::content::ContentError>),
    #[error("the manifest is not valid JSON")]
    Manifest(#[source] serde_json::Error),
    #[error("the cache config is not usable")]
    Format(#[source] format::FormatError),
    #[error("it holds {0}, which kiln does not read (kiln reads its own format)")]
    Foreign(&'static str),
    #[error("it holds neither a kiln cache nor an image with a kiln inline cache")]
    NoCache,
    #[error("the inline cache names layer {0}, which the image does not have")]
    InlineLayer(Digest),
    #[error("failed to read `{path}`")]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` does not match its digest")]
    Digest { path: PathBuf },
}

/// An export failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("failed to export the build cache to {target}")]
    Registry {
        target: String,
        #[source]
        source: Box<kiln_source::registry::PushError>,
    },
    #[error("failed to export the build cache to {target}: `{path}`")]
    Local {
        target: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to export the build cache to {target}: layer {blob} is neither in the store nor in an imported cache")]
    MissingBlob { target: String, blob: Digest },
    #[error(
        "failed to export the build cache to {target}: fetching layer {blob} from the imported cache failed"
    )]
    Fetch {
        target: String,
        blob: Digest,
        #[source]
        source: kiln_solver::engine::FetchError,
    },
}

/// What one export writes: the config (layers by diff ID, descriptors filled in by the writer)
/// and, for each of its layers, the local (or imported) layer it comes from.
#[derive(Debug)]
pub(crate) struct Planned {
    pub config: CacheConfig,
    pub layers: Vec<Layer>,
    pub compression: Compression,
}

/// Runs `f` over `items` with up to `jobs` threads; the first error wins. Results in order.
pub(crate) fn parallel<T: Sync, R: Send, E: Send>(
    items: &[T],
    jobs: usize,
    f: impl Fn(&T) -> Result<R, E> + Sync,
) -> Result<Vec<R>, E> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let slots: Mutex<Vec<Option<Result<R, E>>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, items.len().max(1)) {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    slots.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                }
            });
        }
    });
    let mut out = Vec::with_capacity(items.len());
    for r in slots
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .flatten()
    {
        out.push(r?);
    }
    Ok(out)
}

/// Makes sure `blob` is in the content store for an export that must read it.
pub(crate) fn fetch_for_export(
    store: &Store,
    imported: Option<&ImportedCache>,
    blob: &Digest,
    target: &str,
) -> Result<(), CacheError> {
    if store.content().contains(blob) {
        return Ok(());
    }
    let Some(cache) = imported.filter(|c| c.source_of(blob).is_some()) else {
        return Err(CacheError::MissingBlob {
            target: target.to_string(),
            blob: *blob,
        });
    };
    cache.fetch(store, blob).map_err(|source| CacheError::Fetch {
        target: target.to_string(),
        blob: *blob,
        source,
    })
}

/// Reads every `--cache-from` into one imported cache; failures are warnings.
pub(crate) fn import_all(
    store: &Store,
    from: &[CacheFrom],
    registry_opts: &ClientOptions,
    platform: &Platform,
    progress: &ProgressSink,
) -> Option<ImportedCache> {
    if from.is_empty() {
        return None;
    }
    let mut opts = registry_opts.clone();
    for f in from {
        if let CacheFrom::Registry {
            reference,
            insecure: true,
        } = f
        {
            opts.insecure_registries.push(reference.domain().to_string());
        }
    }
    let client = Client::new(opts);
    let mut loaded = Vec::new();
    for f in from {
        let r = match f {
            CacheFrom::Registry { reference, .. } => registry::load(&client, store, reference, platform),
            CacheFrom::Local { src } => local::load(src),
        };
        match r {
            Ok(l) => loaded.push(l),
            Err(e) => progress.warn(format!(
                "cache import {} skipped: {}; building without it",
                f.describe(),
                chain(&e)
            )),
        }
    }
    let mut cache = ImportedCache::new(Some(client));
    for l in loaded {
        cache.add(store, l);
    }
    Some(cache)
}

pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    parts.join(": ")
}

/// Whether `record`'s layers are the bottom of `result` (a step of the result's own chain).
fn in_result(record: &Record, result: &[Layer]) -> bool {
    record.layers.len() <= result.len()
        && record
            .layers
            .iter()
            .zip(result)
            .all(|(a, b)| a.diff_id == b.diff_id)
}

/// The records `mode` exports: min, those of the results' own layers (one result per target
/// platform); max, all.
fn chosen<'a>(solved: &'a SolvedCache, results: &[&[Layer]], mode: Mode) -> Vec<(&'a String, &'a Record)> {
    solved
        .records
        .iter()
        .filter(|(_, r)| mode == Mode::Max || results.iter().any(|result| in_result(r, result)))
        .collect()
}

/// The config (layers by diff ID) and unique layers of `records` and `mounts`.
fn plan(
    records: &[(&String, &Record)],
    selections: &BTreeMap<String, [u8; 32]>,
    mounts: &[(String, Layer)],
    compression: Compression,
) -> Planned {
    let mut config = CacheConfig::new();
    let mut layers: Vec<Layer> = Vec::new();
    let mut index_of = |l: &Layer, config: &mut CacheConfig| -> usize {
        if let Some(i) = layers.iter().position(|x| x.blob == l.blob) {
            return i;
        }
        layers.push(l.clone());
        config.layers.push(CacheLayer {
            digest: None,
            size: None,
            media_type: None,
            diff_id: l.diff_id,
        });
        layers.len() - 1
    };
    for (key, r) in records {
        let idx: Vec<usize> = r.layers.iter().map(|l| index_of(l, &mut config)).collect();
        config.records.push(CacheRecord {
            key: (*key).clone(),
            layers: idx,
            created: r.layers.iter().map(|l| l.created.clone()).collect(),
            description: r.description.clone(),
        });
    }
    for (id, l) in mounts {
        let layer = index_of(l, &mut config);
        config.mounts.push(CacheMount {
            id: id.clone(),
            layer,
        });
    }
    config.selections = selections
        .iter()
        .map(|(m, k)| (m.clone(), k.iter().map(|b| format!("{b:02x}")).collect()))
        .collect();
    Planned {
        config,
        layers,
        compression,
    }
}

/// The inline cache of an image whose layers are `result`: the records of its own chain, their
/// layers named by diff ID.
pub(crate) fn inline_config(solved: &SolvedCache, result: &[Layer]) -> serde_json::Value {
    let records = chosen(solved, &[result], Mode::Min);
    let planned = plan(&records, &solved.selections, &[], Compression::Gzip);
    serde_json::to_value(&planned.config).unwrap_or_default()
}

/// What the exports need besides the solved cache.
pub(crate) struct ExportInput<'a> {
    pub store: &'a Store,
    pub solved: &'a SolvedCache,
    /// The layers of each target platform's image.
    pub results: Vec<&'a [Layer]>,
    pub imported: Option<&'a ImportedCache>,
    pub secrets: Vec<&'a [u8]>,
    pub registry: &'a ClientOptions,
    pub progress: &'a ProgressSink,
    pub build_ref: &'a str,
}

/// Writes every registry and directory `--cache-to`, in order. A failed one fails the build
/// unless it has `ignore-error=true` (then a warning).
pub(crate) fn export_all(to: &[CacheTo], input: &ExportInput<'_>) -> Result<(), CacheError> {
    let mut done: HashSet<String> = HashSet::new();
    for t in to {
        if matches!(t, CacheTo::Inline) || !done.insert(t.describe()) {
            continue;
        }
        let opts = t.options();
        let warn = |text: String| input.progress.warn(text);
        let mounts = mounts::layers(input.store, &input.solved.mounts, &opts, &input.secrets, &warn);
        let records = chosen(input.solved, &input.results, opts.mode);
        let planned = plan(&records, &input.solved.selections, &mounts, opts.compression);
        let step = progress::Step::start(
            input.progress,
            input.build_ref,
            &format!("exporting cache to {}", t.describe()),
        );
        let result = match t {
            CacheTo::Registry {
                reference,
                image_manifest,
                insecure,
                ..
            } => {
                let mut ropts = input.registry.clone();
                if *insecure {
                    ropts.insecure_registries.push(reference.domain().to_string());
                }
                let client = Client::new(ropts);
                registry::export(
                    &client,
                    input.store,
                    reference,
                    *image_manifest,
                    &planned,
                    input.imported,
                    &step,
                )
            }
            CacheTo::Local { dest, .. } => local::export(input.store, dest, &planned, input.imported),
            CacheTo::Inline => Ok(()),
        };
        match result {
            Ok(()) => step.done(),
            Err(e) if opts.ignore_error => {
                step.done();
                input
                    .progress
                    .warn(format!("{} (ignored: ignore-error=true)", chain(&e)));
            }
            Err(e) => {
                step.failed(&chain(&e));
                return Err(e);
            }
        }
    }
    Ok(())
}

mod progress {
    //! An export as a step of the build's progress, one line per blob.
    use std::time::Instant;

    use kiln_dag::Digest;
    use kiln_solver::progress::{EventKind, ProgressSink, Stream, VertexProgress};
    use kiln_source::registry::{TransferEvent, TransferProgress};

    pub(crate) struct Step {
        sink: ProgressSink,
        vertex: Digest,
        started: Instant,
        lines: VertexProgress,
    }

    impl Step {
        pub(crate) fn start(sink: &ProgressSink, build_ref: &str, name: &str) -> Step {
            let vertex = Digest::of(format!("kiln-build cache {build_ref} {name}").as_bytes());
            sink.send(EventKind::Started {
                vertex,
                name: name.to_string(),
            });
            Step {
                sink: sink.clone(),
                vertex,
                started: Instant::now(),
                lines: sink.for_vertex(vertex),
            }
        }

        pub(crate) fn done(&self) {
            self.sink.send(EventKind::Completed {
                vertex: self.vertex,
                duration: self.started.elapsed(),
            });
        }

        pub(crate) fn failed(&self, error: &str) {
            self.sink.send(EventKind::Failed {
                vertex: self.vertex,
                duration: self.started.elapsed(),
                error: error.to_string(),
            });
        }
    }

    impl TransferProgress for Step {
        fn event(&self, event: TransferEvent) {
            let short = |d: &Digest| d.hex()[..12].to_string();
            let text = match event {
                TransferEvent::Exists { digest } => format!("{}: already exists", short(&digest)),
                TransferEvent::Mounted { digest, from } => format!("{}: mounted from {from}", short(&digest)),
                TransferEvent::Retrying { digest, error } => {
                    format!("{}: retrying ({error})", short(&digest))
                }
                TransferEvent::Done { digest } => format!("{}: pushed", short(&digest)),
                TransferEvent::Started { .. } | TransferEvent::Bytes { .. } => return,
            };
            self.lines.log(Stream::Stdout, format!("{text}\n"));
        }
    }
}
