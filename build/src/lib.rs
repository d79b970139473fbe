//! A whole build as one library call: [`build`] takes a [`BuildRequest`] (plain data) and
//! returns a [`BuildResult`]. The `kiln` binary parses flags into a request and renders the
//! progress; any other front end (a daemon API, a test) does the same.
//!
//! The steps, each in its own module with its own error enum, in the order they run:
//!
//! 1. [`request`]: the request is checked (platforms, names, what is pushed) before anything
//!    is read;
//! 2. [`context`], [`named`]: the build context (local directory, stream, Git or http(s) URL) and
//!    the `--build-context` values are resolved, the Dockerfile and `.dockerignore` read;
//! 3. lowering: `kiln_frontend::lower` with an image resolver over the store that pulls missing
//!    base images through `kiln_source::registry` (`resolver`);
//! 4. solving: `kiln_solver::scheduler::solve` with the engine, reporting to the caller's
//!    [`ProgressSink`] and stopping on its [`CancelToken`];
//! 5. [`export`]: the image into the store, its local names, archive and directory outputs;
//! 6. [`push`]: every pushed name to its registry, as `kiln push` does.
//!
//! Blocking work (fetches, pulls, layer writes, pushes) runs on tokio's blocking threads.
//! [`build`] runs every step; a front end that acts between steps (`--call=check|outline|
//! targets`, `kiln debug graph`, its own rendering of the checks' warnings) goes step by step:
//! [`prepare`] (1-2), [`Prepared::lower`] (3), [`Planned::build`] (4-6).
//!
//! What comes next fits between these steps without changing their shape: a remote cache
//! import runs between lowering and solving (seeding the engine's lookups) and its export after
//! step 5, both as new request fields (the request is `#[non_exhaustive]`); several target
//! platforms give one lowering and one solve per platform (the `platforms` field, the per-
//! platform [`BuildResult::images`]) and an image index as the [`BuildResult::descriptor`].
//!
//! The caller must run this in a private mount namespace
//! (`kiln_runtime::host::enter_private_mount_namespace`, entered while single-threaded), as the
//! engine mounts overlays from this process.
#![forbid(unsafe_code)]
#![cfg_attr(
    test,
    allow(clippy::disallowed_methods, reason = "tests write fixtures as they please")
)]

pub mod annotations;
pub mod cache_io;
pub mod context;
pub mod export;
mod metadata;
pub mod named;
mod options;
pub mod output;
pub mod push;
pub mod request;
mod resolver;
mod unpack_tap;

use std::sync::Arc;

use kiln_cache::buildcache::Layer;
use kiln_cache::images::Image;
use kiln_cache::reference::Reference;
use kiln_cache::Store;
use kiln_dag::Platform;
use kiln_frontend::lower::{FrontendError, LowerOptions, Lowered};
use kiln_solver::engine::{Engine, EngineError, EngineOptions};
use kiln_solver::scheduler::{self, SolveError, SolveOptions};
use kiln_source::registry::{Client, Pushed};

pub use annotations::{parse_annotation, Annotation, AnnotationError, AnnotationLevel};
pub use cache_io::spec::{parse_cache_from, parse_cache_to, CacheFrom, CacheSpecError, CacheTo};
pub use cache_io::CacheError;
pub use context::{ContextError, Dockerfile, Inputs};
pub use export::ExportError;
pub use kiln_solver::progress::ProgressSink;
pub use kiln_solver::scheduler::CancelToken;
pub use metadata::Descriptor;
pub use named::NamedContextError;
pub use output::{parse_output, parse_outputs, OutputError, OutputSpec};
pub use push::PushError;
pub use request::{BuildRequest, ContextSource, DockerfileSource, Entitlements};

/// A request that cannot be built as asked; found before anything is read.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("--platform {platform} is not supported: kiln builds {host_os} images only")]
    Platform {
        platform: Box<Platform>,
        host_os: String,
    },
    #[error("an image output has push=true but no name: give -t NAME or name=NAME")]
    PushWithoutName,
    #[error("invalid name `{reference}`: a digest reference cannot name a build's image")]
    DigestName { reference: Box<Reference> },
    #[error(transparent)]
    Annotation(#[from] annotations::AnnotationError),
}

/// A build failed; the variant says at which step.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("failed to hold the store for the build")]
    Store(#[source] kiln_cache::store::StoreError),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    NamedContext(#[from] NamedContextError),
    /// Lowering failed; [`FrontendError::render`] over `dockerfile.bytes` shows where.
    #[error("failed to lower `{}`", dockerfile.name)]
    Lower {
        dockerfile: Dockerfile,
        #[source]
        error: Box<FrontendError>,
    },
    #[error("failed to start the build engine")]
    Engine(#[source] Box<EngineError>),
    /// A step failed; the error's vertex has the Dockerfile location, `dockerfile` the text.
    #[error("failed to solve")]
    Solve {
        dockerfile: Dockerfile,
        #[source]
        error: SolveError,
    },
    /// The cancel token fired after the solve finished.
    #[error("build cancelled")]
    Cancelled,
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Push(#[from] PushError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("the {step} task of the build panicked")]
    Panicked { step: &'static str },
}

/// The image built for one target platform.
#[derive(Clone, Debug)]
pub struct PlatformImage {
    pub platform: Platform,
    /// The image as written to the store.
    pub image: Image,
}

/// What a build produced.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BuildResult {
    /// A unique ref of this build, in buildx's `builder/node/ref` shape.
    pub build_ref: String,
    /// One image per target platform, in the request's order.
    pub images: Vec<PlatformImage>,
    /// The image index naming them, when the build had several target platforms.
    pub index: Option<kiln_cache::image_index::IndexImage>,
    /// Every name the image has now: the local names (tags and `type=image` names), then the
    /// pushed ones, without repeats.
    pub names: Vec<Reference>,
    /// Every push, in order.
    pub pushed: Vec<Pushed>,
}

impl BuildResult {
    /// The image of the first target platform.
    pub fn image(&self) -> &Image {
        // `build` never returns a result without an image.
        &self.images[0].image
    }

    /// The result's top descriptor: the pushed manifest after a push (pushed layers may be
    /// compressed, so its digest differs from the local one), else the local manifest.
    pub fn descriptor(&self) -> Descriptor {
        match self.pushed.first() {
            Some(p) => Descriptor {
                media_type: p.media_type.clone(),
                digest: p.digest,
                size: p.size,
            },
            None => match &self.index {
                Some(i) => Descriptor {
                    media_type: i.media_type.clone(),
                    digest: i.digest,
                    size: i.bytes.len() as u64,
                },
                None => self.image_descriptor(),
            },
        }
    }

    fn image_descriptor(&self) -> Descriptor {
        let image = self.image();
        Descriptor {
            media_type: image
                .manifest
                .media_type()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_else(|| kiln_source::registry::media::OCI_MANIFEST.to_string()),
            digest: image.manifest_digest,
            size: image.manifest_bytes.len() as u64,
        }
    }

    /// BuildKit's exporter response, what `--metadata-file` writes (see the `metadata` module).
    pub fn metadata(&self) -> serde_json::Value {
        metadata::metadata(self)
    }
}

/// The request, checked: who is named and pushed, for which platforms.
struct Plan {
    /// The target platforms, in the request's order (the host's when none was asked for).
    platforms: Vec<Platform>,
    /// Names tagged in the local store.
    local_names: Vec<Reference>,
    push_jobs: Vec<push::PushJob>,
    /// `--annotation`s by where they land.
    annotations: annotations::Placed,
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, item: T) {
    if !v.contains(&item) {
        v.push(item);
    }
}

impl Plan {
    fn of(req: &BuildRequest) -> Result<Plan, RequestError> {
        let host = Platform::host();
        let mut platforms: Vec<Platform> = Vec::new();
        for p in &req.platforms {
            let p = p.normalized();
            if p.os != host.os {
                return Err(RequestError::Platform {
                    platform: Box::new(p),
                    host_os: host.os.clone(),
                });
            }
            push_unique(&mut platforms, p);
        }
        if platforms.is_empty() {
            platforms.push(host);
        }
        let mut local_names = Vec::new();
        let mut push_jobs: Vec<push::PushJob> = Vec::new();
        for t in &req.tags {
            push_unique(&mut local_names, t.clone());
        }
        for o in &req.outputs {
            let OutputSpec::Image(i) = o else { continue };
            let names = if i.names.is_empty() { &req.tags } else { &i.names };
            if i.tag_locally {
                for n in names {
                    push_unique(&mut local_names, n.clone());
                }
            }
            if i.push {
                if names.is_empty() {
                    return Err(RequestError::PushWithoutName);
                }
                for n in names {
                    if !push_jobs.iter().any(|j| &j.reference == n) {
                        push_jobs.push(push::PushJob {
                            reference: n.clone(),
                            compression: i.compression.unwrap_or_default(),
                            insecure: i.insecure,
                        });
                    }
                }
            }
        }
        if let Some(r) = local_names
            .iter()
            .chain(push_jobs.iter().map(|j| &j.reference))
            .find(|r| r.digest().is_some())
        {
            return Err(RequestError::DigestName {
                reference: Box::new(r.clone()),
            });
        }
        let archive = req
            .outputs
            .iter()
            .any(|o| matches!(o, OutputSpec::Docker(_) | OutputSpec::Oci(_)));
        let annotations = annotations::Placed::of(&req.annotations, &platforms, archive)?;
        Ok(Plan {
            platforms,
            local_names,
            push_jobs,
            annotations,
        })
    }
}

/// A build after steps 1 and 2: the request checked, the contexts resolved, the Dockerfile and
/// `.dockerignore` read. Holds the store against garbage collection, and the fetched and
/// extracted contexts' temp directories, until dropped.
pub struct Prepared {
    req: BuildRequest,
    plan: Plan,
    main: context::MainContext,
    named: named::NamedContexts,
    _hold: kiln_cache::store::Hold,
}

/// Steps 1 and 2: checks the request and resolves the contexts. Blocking (fetches, stdin).
/// `--call=targets` needs no more than this.
pub fn prepare(
    store: &Store,
    mut req: BuildRequest,
    progress: &ProgressSink,
    cancel: &CancelToken,
) -> Result<Prepared, BuildError> {
    let plan = Plan::of(&req)?;
    let hold = store.hold().map_err(BuildError::Store)?;
    let keep_git = req.keeps_git_dir();
    let context = std::mem::replace(&mut req.context, ContextSource::Dir(Default::default()));
    let dockerfile = std::mem::take(&mut req.dockerfile);
    let started = std::time::SystemTime::now();
    let main = context::prepare(context, dockerfile, store, keep_git, progress, cancel)?;
    internal_steps(progress, &main.inputs, started);
    let named = named::NamedContexts::resolve(&req.named_contexts, store, keep_git)?;
    Ok(Prepared {
        req,
        plan,
        main,
        named,
        _hold: hold,
    })
}

/// BuildKit's first steps, as its progress shows them: `[internal] load build definition from
/// NAME` and `[internal] load .dockerignore`, each with what was read (`transferring dockerfile:
/// 122B done`). kiln reads both from the context in place, in the time since `started`.
fn internal_steps(progress: &ProgressSink, inputs: &Inputs, started: std::time::SystemTime) {
    use kiln_solver::progress::EventKind;
    let name = std::path::Path::new(&inputs.dockerfile.name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n != "-")
        .unwrap_or_else(|| "Dockerfile".to_string());
    let steps = [
        (
            format!("[internal] load build definition from {name}"),
            "transferring dockerfile:",
            inputs.dockerfile.bytes.len() as u64,
        ),
        (
            "[internal] load .dockerignore".to_string(),
            "transferring context:",
            inputs.dockerignore_size,
        ),
    ];
    for (step, status, size) in steps {
        let vertex =
            kiln_dag::Digest::of(format!("kiln-build {step} {}", inputs.context.display()).as_bytes());
        progress.send(EventKind::Started {
            vertex,
            name: step.clone(),
        });
        progress.for_vertex(vertex).status_done(status, size, started);
        progress.send(EventKind::Completed {
            vertex,
            duration: started.elapsed().unwrap_or_default(),
        });
    }
}

impl Prepared {
    /// The context directory, the Dockerfile and `.dockerignore` patterns as read.
    pub fn inputs(&self) -> &Inputs {
        &self.main.inputs
    }

    /// Step 3: lowers the Dockerfile, pulling the base images that are missing. Blocking.
    /// `all_stages` lowers (and checks) every stage, not only those the target needs, as
    /// `--check` does without `--target`; a build leaves it false.
    /// With several target platforms the Dockerfile is lowered once per platform; vertices
    /// with the same inputs (a `FROM --platform=$BUILDPLATFORM` stage) are the same vertex.
    pub fn lower(self, store: &Store, all_stages: bool) -> Result<Planned, BuildError> {
        self.lower_with_progress(store, all_stages, &ProgressSink::discard())
    }

    /// [`Prepared::lower`], showing each base image's resolution as BuildKit does (`[internal]
    /// load metadata for docker.io/library/alpine:3.19`).
    pub fn lower_with_progress(
        self,
        store: &Store,
        all_stages: bool,
        progress: &ProgressSink,
    ) -> Result<Planned, BuildError> {
        let inputs = &self.main.inputs;
        let req = &self.req;
        let client = Client::new(req.registry.clone());
        let resolver = resolver::StoreResolver {
            store,
            client: &client,
            pull: req.pull,
            progress,
            shown: Default::default(),
        };
        let several = self.plan.platforms.len() > 1;
        let mut lowered = Vec::with_capacity(self.plan.platforms.len());
        for platform in &self.plan.platforms {
            let opts = LowerOptions {
                dockerfile_name: inputs.dockerfile.name.clone(),
                build_args: req.build_args.clone(),
                target: req.target.clone(),
                platform: platform.clone(),
                build_platform: Platform::host(),
                prefix_platform: several,
                labels: req.labels.clone(),
                no_cache: req.no_cache,
                no_cache_filter: req.no_cache_filter.clone(),
                dockerignore: inputs.dockerignore.clone(),
                named_contexts: self.named.lower.clone(),
                all_stages,
                network: req.network,
                extra_hosts: req.extra_hosts.clone(),
                shm_size: req.shm_size,
                ulimits: req.ulimits.clone(),
            };
            let mut l =
                kiln_frontend::lower::lower(&inputs.dockerfile.bytes, &opts, &resolver).map_err(|error| {
                    BuildError::Lower {
                        dockerfile: inputs.dockerfile.clone(),
                        error: Box::new(error),
                    }
                })?;
            if let Some(first) = lowered.first() {
                // A check's warning is reported once, whatever platforms it came up for.
                let first: &Lowered = first;
                l.warnings.retain(|w| !first.warnings.contains(w));
            }
            lowered.push(l);
        }
        Ok(Planned {
            prepared: self,
            lowered,
        })
    }
}

/// A build up to the solve: contexts resolved and the Dockerfile lowered, once per target
/// platform.
pub struct Planned {
    prepared: Prepared,
    /// One lowering per target platform, in the plan's order (never empty).
    lowered: Vec<Lowered>,
}

impl Planned {
    /// The Dockerfile lowered for the first target platform: the graph, its root, the image
    /// config, the outline and the checks' warnings.
    pub fn lowered(&self) -> &Lowered {
        &self.lowered[0]
    }

    /// Every target platform's lowering, in order, with its platform.
    pub fn lowered_all(&self) -> impl Iterator<Item = (&Platform, &Lowered)> {
        self.prepared.plan.platforms.iter().zip(&self.lowered)
    }

    /// Every lowering's warnings, each once.
    pub fn warnings(&self) -> impl Iterator<Item = &kiln_frontend::lint::Warning> {
        self.lowered.iter().flat_map(|l| l.warnings.iter())
    }

    /// The context directory, the Dockerfile and `.dockerignore` patterns as read.
    pub fn inputs(&self) -> &Inputs {
        &self.prepared.main.inputs
    }

    /// Steps 4 to 6: solves with the engine, exports the image into the store, names it, writes
    /// the outputs and pushes. The lowering warnings are the caller's to report (see
    /// [`build`]). `cancel` stops the build at the next step, failing with
    /// [`BuildError::Cancelled`] or the solve's cancellation.
    pub async fn build(
        self,
        store: Arc<Store>,
        progress: ProgressSink,
        cancel: CancelToken,
    ) -> Result<BuildResult, BuildError> {
        let build_ref = metadata::new_build_ref();
        let imported = {
            let (store, from, registry, platform, progress) = (
                store.clone(),
                self.prepared.req.cache_from.clone(),
                self.prepared.req.registry.clone(),
                // An image with an inline cache that is an index: the first target's image.
                self.prepared.plan.platforms[0].clone(),
                progress.clone(),
            );
            tokio::task::spawn_blocking(move || {
                cache_io::import_all(&store, &from, &registry, &platform, &progress).map(Arc::new)
            })
            .await
            .map_err(|_| BuildError::Panicked { step: "cache import" })?
        };
        let mut input = self.solve_input();
        input.engine.cache_source = imported
            .clone()
            .map(|c| c as Arc<dyn kiln_solver::engine::CacheSource>);
        let solved = solve(
            store.clone(),
            input,
            imported.as_deref(),
            progress.clone(),
            cancel.clone(),
        )
        .await?;
        if let Some(c) = &imported {
            tracing::info!(
                records = c.len(),
                fetched_bytes = c.fetched_bytes(),
                "imported build cache used"
            );
        }
        if cancel.is_cancelled() {
            return Err(BuildError::Cancelled);
        }
        tokio::task::spawn_blocking(move || {
            finish(
                &store,
                &self,
                &solved,
                imported.as_deref(),
                build_ref,
                &progress,
                &cancel,
            )
        })
        .await
        .map_err(|_| BuildError::Panicked { step: "export" })?
    }
}

/// Steps 1 to 3 ([`prepare`], then [`Prepared::lower`] for the target). Blocking.
/// `kiln debug graph` stops here.
pub fn plan(
    store: &Store,
    req: BuildRequest,
    progress: &ProgressSink,
    cancel: &CancelToken,
) -> Result<Planned, BuildError> {
    prepare(store, req, progress, cancel)?.lower_with_progress(store, false, progress)
}

/// Builds: [`plan`] on a blocking thread, the lowering warnings to `progress` in their short
/// form (`Rule: message (line N)`), then [`Planned::build`].
pub async fn build(
    store: Arc<Store>,
    req: BuildRequest,
    progress: ProgressSink,
    cancel: CancelToken,
) -> Result<BuildResult, BuildError> {
    let planned = {
        let (store, progress, cancel) = (store.clone(), progress.clone(), cancel.clone());
        tokio::task::spawn_blocking(move || plan(&store, req, &progress, &cancel))
            .await
            .map_err(|_| BuildError::Panicked { step: "planning" })??
    };
    for w in planned.warnings() {
        progress.warn(w.to_string());
    }
    planned.build(store, progress, cancel).await
}

/// What the solve needs, owned, so that the build's future holds no borrow across its awaits
/// (and stays `Send` whatever the request's streams are).
struct SolveInput {
    /// Every platform's graph in one: a vertex they share is run once.
    graph: Arc<kiln_dag::Graph>,
    /// One root per target platform.
    roots: Vec<kiln_dag::Digest>,
    engine: EngineOptions,
    jobs: usize,
    dockerfile: Dockerfile,
}

impl Planned {
    fn solve_input(&self) -> SolveInput {
        let req = &self.prepared.req;
        let mut contexts = self.prepared.named.dirs.clone();
        contexts.insert("context".to_string(), self.prepared.main.inputs.context.clone());
        let mut graph = kiln_dag::Graph::default();
        for l in &self.lowered {
            for (d, v) in &l.graph.vertices {
                match graph.vertices.get_mut(d) {
                    Some(existing) => existing.meta.ignore_cache |= v.meta.ignore_cache,
                    None => {
                        graph.vertices.insert(*d, v.clone());
                    }
                }
            }
        }
        SolveInput {
            graph: Arc::new(graph),
            roots: self.lowered.iter().map(|l| l.root).collect(),
            engine: EngineOptions {
                contexts,
                secrets: req.secrets.clone(),
                ssh: req.ssh.clone(),
                allow_network_host: req.entitlements.network_host,
                allow_insecure: req.entitlements.security_insecure,
                proxy_env: self.lowered[0].proxy_env.clone(),
                source_date_epoch: req.source_date_epoch,
                cache_source: None,
                isolation: req.isolation,
            },
            // Steps mostly wait on processes and disks rather than on CPU (BuildKit sets no
            // limit at all), so by default several steps per CPU may run at once.
            jobs: req
                .jobs
                .unwrap_or_else(|| 4 * std::thread::available_parallelism().map(usize::from).unwrap_or(1)),
            dockerfile: self.prepared.main.inputs.dockerfile.clone(),
        }
    }
}

/// What the solve gave: each root's layers (one root per target platform) and what the cache
/// export needs.
struct Solved {
    layers: Vec<Arc<Vec<Layer>>>,
    cache: kiln_solver::engine::SolvedCache,
}

/// How many times a solve starts again after an imported blob failed its digest check.
const CACHE_RETRIES: usize = 8;

/// The imported blob that made a solve fail its digest check (or its fetch), if that is why.
fn failed_cache_blob(e: &SolveError) -> Option<kiln_dag::Digest> {
    match e {
        SolveError::ContentKey { source, .. }
        | SolveError::Lookup { source, .. }
        | SolveError::Execute { source, .. }
        | SolveError::Record { source, .. } => failed_cache_blob(source),
        SolveError::Op(inner) => {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
            while let Some(err) = cur {
                if let Some(EngineError::CacheBlob { blob, .. }) = err.downcast_ref::<EngineError>() {
                    return Some(*blob);
                }
                if let Some(s) = err.downcast_ref::<SolveError>() {
                    return failed_cache_blob(s);
                }
                cur = err.source();
            }
            None
        }
        _ => None,
    }
}

/// Step 4: runs the graph to every platform's root (independent vertices in parallel, shared
/// ones once); returns each root's layers, in order. An imported blob that fails its digest
/// check is rejected (the records naming it stop matching) and the solve runs again, rerunning
/// those steps: never a wrong result.
async fn solve(
    store: Arc<Store>,
    input: SolveInput,
    imported: Option<&cache_io::ImportedCache>,
    progress: ProgressSink,
    cancel: CancelToken,
) -> Result<Solved, BuildError> {
    let SolveInput {
        graph,
        roots,
        engine,
        jobs,
        dockerfile,
    } = input;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let engine = Arc::new(
            Engine::new(store.clone(), graph.clone(), engine.clone())
                .map_err(|e| BuildError::Engine(Box::new(e)))?,
        );
        let solved = scheduler::solve(
            &graph,
            &roots,
            engine.clone(),
            SolveOptions { jobs },
            progress.clone(),
            cancel.clone(),
        )
        .await;
        let resolved = match solved {
            Ok(r) => r,
            Err(error) => {
                if let (Some(blob), Some(cache)) = (failed_cache_blob(&error), imported) {
                    if attempt < CACHE_RETRIES && !cancel.is_cancelled() {
                        use kiln_solver::engine::CacheSource as _;
                        cache.reject(&blob);
                        progress.warn(format!(
                            "imported cache layer {blob} is unusable ({}); the steps that used it run again",
                            cache_io::chain(&error)
                        ));
                        continue;
                    }
                }
                return Err(BuildError::Solve { dockerfile, error });
            }
        };
        let layers = resolved
            .into_iter()
            .map(|r| match r.output {
                kiln_solver::engine::Output::Fs(layers) => Ok(layers),
                _ => Err(BuildError::from(ExportError::NotAFilesystem)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The image's layers found in an imported cache come into the store now (and only
        // those): one that fails its digest check is rejected like any other, and the steps
        // that made it run again.
        if let Some(cache) = imported {
            let mut missing: Vec<kiln_dag::Digest> = layers
                .iter()
                .flat_map(|ls| ls.iter())
                .map(|l| l.blob)
                .filter(|b| !store.content().contains(b) && cache.source_of(b).is_some())
                .collect();
            missing.sort_unstable();
            missing.dedup();
            let fetched = tokio::task::block_in_place(|| {
                cache_io::parallel(&missing, 4, |b| {
                    use kiln_solver::engine::CacheSource as _;
                    cache.fetch(&store, b).map_err(|e| (*b, e))
                })
            });
            if let Err((blob, source)) = fetched {
                if attempt < CACHE_RETRIES && !cancel.is_cancelled() {
                    use kiln_solver::engine::CacheSource as _;
                    cache.reject(&blob);
                    progress.warn(format!(
                        "imported cache layer {blob} is unusable ({}); the steps that made it run again",
                        cache_io::chain(source.as_ref())
                    ));
                    continue;
                }
                return Err(CacheError::Fetch {
                    target: "the local store".into(),
                    blob,
                    source,
                }
                .into());
            }
        }
        return Ok(Solved {
            layers,
            cache: engine.solved_cache(),
        });
    }
}

/// Steps 5 and 6: the images into the store (with an index over them for several
/// platforms), their names, the outputs, the pushes. Blocking.
fn finish(
    store: &Store,
    planned: &Planned,
    solved: &Solved,
    imported: Option<&cache_io::ImportedCache>,
    build_ref: String,
    progress: &ProgressSink,
    cancel: &CancelToken,
) -> Result<BuildResult, BuildError> {
    use kiln_solver::progress::EventKind;
    let req = &planned.prepared.req;
    let plan = &planned.prepared.plan;
    let layers: &[Arc<Vec<Layer>>] = &solved.layers;
    let cache_to = req.cache_exports();
    // BuildKit's last step: `exporting to image`, with `exporting layers`, `writing image
    // sha256:…` and one `naming to NAME` per name.
    let vertex = kiln_dag::Digest::of(format!("kiln-build exporting to image {build_ref}").as_bytes());
    progress.send(EventKind::Started {
        vertex,
        name: "exporting to image".into(),
    });
    let started = std::time::Instant::now();
    let exported =
        (|| -> Result<(Vec<PlatformImage>, Option<kiln_cache::image_index::IndexImage>), BuildError> {
            let vp = progress.for_vertex(vertex);
            let epoch_time = req.source_date_epoch.map(kiln_cache::images::rfc3339);
            let t = std::time::SystemTime::now();
            let mut images = Vec::with_capacity(layers.len());
            for ((platform, lowered), layers) in planned.lowered_all().zip(layers) {
                let mut config = lowered.config.clone();
                // A base image's inline cache describes the base, not this image.
                config.other.remove(cache_io::format::INLINE_KEY);
                config.other.remove(cache_io::format::BUILDKIT_INLINE_KEY);
                if cache_to.contains(&CacheTo::Inline) {
                    config.other.insert(
                        cache_io::format::INLINE_KEY.to_string(),
                        cache_io::inline_config(&solved.cache, layers),
                    );
                }
                let annotations = &plan.annotations.manifest[images.len()];
                let image = kiln_solver::engine::export_image(
                    store,
                    layers,
                    &config,
                    epoch_time.as_deref(),
                    annotations,
                )
                .map_err(|e| ExportError::Image(Box::new(e)))?
                .image;
                images.push(PlatformImage {
                    platform: platform.clone(),
                    image,
                });
            }
            vp.status_done("exporting layers", 0, t);
            let index = if images.len() > 1 {
                let pairs: Vec<(Platform, &Image)> =
                    images.iter().map(|i| (i.platform.clone(), &i.image)).collect();
                Some(
                    store
                        .images()
                        .create_index_annotated(
                            &pairs,
                            &plan.annotations.index,
                            &plan.annotations.manifest_descriptor,
                        )
                        .map_err(|e| ExportError::Index(Box::new(e)))?,
                )
            } else {
                None
            };
            match &index {
                Some(ix) => vp.status_done(
                    format!("writing image index {}", ix.digest),
                    0,
                    std::time::SystemTime::now(),
                ),
                None => vp.status_done(
                    format!("writing image {}", images[0].image.config_digest),
                    0,
                    std::time::SystemTime::now(),
                ),
            }
            let t = std::time::SystemTime::now();
            match &index {
                Some(ix) => export::tag_digest(store, &ix.digest, &plan.local_names)?,
                None => export::tag_digest(store, &images[0].image.manifest_digest, &plan.local_names)?,
            }
            for name in &plan.local_names {
                vp.status_done(format!("naming to {name}"), 0, t);
            }
            for o in &req.outputs {
                let entry = plan.annotations.archive_entry(index.is_some());
                export::write_output(store, o, &images, index.as_ref(), &req.tags, layers, &entry)?;
            }
            Ok((images, index))
        })();
    let (images, index) = match exported {
        Ok(done) => {
            progress.send(EventKind::Completed {
                vertex,
                duration: started.elapsed(),
            });
            done
        }
        Err(e) => {
            progress.send(EventKind::Failed {
                vertex,
                duration: started.elapsed(),
                error: kiln_solver::progress::error_chain(&e),
            });
            return Err(e);
        }
    };
    if cancel.is_cancelled() {
        return Err(BuildError::Cancelled);
    }
    let what = match &index {
        Some(ix) => push::What::Index(ix),
        None => push::What::Image(&images[0].image),
    };
    let pushed = push::push_all(store, what, &plan.push_jobs, &req.registry, progress, &build_ref)?;
    let secrets: Vec<&[u8]> = req.secrets.values().map(|s| s.data.as_slice()).collect();
    cache_io::export_all(
        &cache_to,
        &cache_io::ExportInput {
            store,
            solved: &solved.cache,
            results: layers.iter().map(|l| l.as_slice()).collect(),
            imported,
            secrets,
            registry: &req.registry,
            progress,
            build_ref: &build_ref,
        },
    )?;
    let mut names = plan.local_names.clone();
    for j in &plan.push_jobs {
        push_unique(&mut names, j.reference.clone());
    }
    Ok(BuildResult {
        build_ref,
        images,
        index,
        names,
        pushed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon runs builds on its runtime's tasks: the future must be `Send`.
    #[allow(dead_code)]
    fn build_futures_are_send(store: Arc<Store>, req: BuildRequest) {
        fn is_send<T: Send>(_: &T) {}
        let f = build(store, req, ProgressSink::discard(), CancelToken::new());
        is_send(&f);
    }
}
