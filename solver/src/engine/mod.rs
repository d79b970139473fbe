//! The build engine: the [`Executor`] that runs kiln's ops against the store and the runtime.
//!
//! A vertex's result ([`Output`]) is either a filesystem, a stack of layers (bottom first), each an
//! unpacked snapshot directory plus its layer blob, or the build context read in place. Exec and
//! file ops stack one new layer on their input: the overlay upper dir of the step becomes the
//! snapshot, and [`kiln_cache::layer::write_diff`] turns it into the layer blob right away, so the
//! exporter only writes a config and a manifest.
//!
//! Mounts made in kiln's own process (overlay views for file ops and sub-path binds) need a
//! private mount namespace: the CLI enters one before starting threads
//! ([`kiln_runtime::host::enter_private_mount_namespace`]), so whatever a killed build leaves mounted
//! disappears with the process.

mod contentkey;
mod exec;
mod export;
mod file;
mod imported;
mod mounts;
mod remote;
mod stream;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_cache::layer;
use kiln_cache::snapshot::Snapshots;
use kiln_cache::Store;
use kiln_dag::{Digest, FileAction, Graph, Op, SourceOp, Vertex};

pub use export::{export_image, ExportError, Exported};
pub use imported::{CacheSource, FetchError, MountContents, SolvedCache};
pub use remote::RemoteError;

use crate::cachekey::CacheKey;
use crate::context::{ContextIndex, StatCache};
use crate::scheduler::{ExecCtx, Executor, Resolved, SolveError};
use kiln_cache::buildcache::{CacheIndex, Layer, Record};

/// Media type of kiln's own (uncompressed) layer blobs.
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// The attachment name of a linked copy's [`layer::TarIndex`]: where each file's entry sits in
/// its layer tar, for the next run of the same step to copy.
const TAR_INDEX: &str = "tar";

/// The build context (or a named local context), read in place.
#[derive(Debug)]
pub struct LocalContext {
    pub name: String,
    pub root: PathBuf,
    pub index: ContextIndex,
    pub ignore: Vec<String>,
}

/// A vertex's result.
#[derive(Clone, Debug)]
pub enum Output {
    /// A filesystem: layers, bottom first (empty = scratch).
    Fs(Arc<Vec<Layer>>),
    /// A local directory read in place.
    Local(Arc<LocalContext>),
}

/// A secret's value, from `--secret id=ID,src=FILE|env=VAR`.
#[derive(Clone, Debug)]
pub struct Secret {
    pub data: Vec<u8>,
}

/// What the engine needs besides the graph.
#[derive(Debug, Default, Clone)]
pub struct EngineOptions {
    /// Local context directories by name (`context` is the build context).
    pub contexts: BTreeMap<String, PathBuf>,
    pub secrets: BTreeMap<String, Secret>,
    /// SSH agent sockets by id (`default` for `--ssh default`).
    pub ssh: BTreeMap<String, PathBuf>,
    /// `--allow network.host`.
    pub allow_network_host: bool,
    /// `--allow security.insecure`.
    pub allow_insecure: bool,
    /// Proxy variables given as build args but not declared: in every RUN's environment, never
    /// in a key.
    pub proxy_env: Vec<String>,
    /// SOURCE_DATE_EPOCH: clamps layer mtimes and the image's created time.
    pub source_date_epoch: Option<i64>,
    /// An imported build cache (`--cache-from`), asked when the local index misses.
    pub cache_source: Option<Arc<dyn CacheSource>>,
    /// How RUN steps are set apart from kiln's own environment (`--isolation`).
    pub isolation: kiln_runtime::Isolation,
}

/// Errors of the concrete ops.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("failed to store the build's results")]
    Durable(#[source] kiln_cache::durable::DurableError),
    #[error("failed to create `{path}`")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to open the snapshot store")]
    Snapshots(#[source] kiln_cache::snapshot::SnapshotError),
    #[error("{0}")]
    FlattenAfter(String),
    #[error("failed to flatten the {count} layers below a step")]
    Flatten {
        count: usize,
        #[source]
        source: Box<kiln_cache::snapshot::SnapshotError>,
    },
    #[error("failed to read the build context `{name}`")]
    Context {
        name: String,
        #[source]
        source: crate::context::ContextError,
    },
    #[error("local context `{0}` was not provided")]
    UnknownContext(String),
    #[error("failed to resolve image `{reference}`")]
    Image {
        reference: String,
        #[source]
        source: Box<kiln_cache::images::ImageError>,
    },
    #[error("failed to unpack layer {blob}")]
    Unpack {
        blob: Digest,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("layer {blob} of the cached result is missing from the store")]
    MissingBlob { blob: Digest },
    #[error("failed to fetch layer {blob} of an imported cache")]
    CacheBlob {
        blob: Digest,
        #[source]
        source: FetchError,
    },
    #[error("input {0} of the op is not a filesystem")]
    NotAFilesystem(usize),
    #[error("input {index} is missing: the vertex has {count} inputs")]
    NoSuchInput { index: usize, count: usize },
    #[error("{0} sources are not supported yet")]
    Unsupported(&'static str),
    #[error("failed to write the layer of this step")]
    WriteLayer(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("failed to commit the snapshot of this step")]
    Commit(#[source] kiln_cache::snapshot::SnapshotError),
    #[error("failed to record the cache entry")]
    Index(#[source] kiln_cache::buildcache::IndexError),
    #[error("failed to mount `{path}`")]
    Mount {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("mount source \"{selector}\" not found")]
    MountSourceMissing { selector: String },
    #[error("failed to resolve mount source \"{selector}\"")]
    MountSource {
        selector: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a blocking task failed: {0}")]
    Join(String),
    /// A RUN step of another platform cannot run on this host.
    #[error(
        "cannot run RUN steps for {platform} on this {host} host: {reason}; install QEMU user emulation \
         (`apt-get install qemu-user-static`) and register it (`kiln setup binfmt`, as root)"
    )]
    Emulation {
        platform: Box<kiln_dag::Platform>,
        host: Box<kiln_dag::Platform>,
        reason: String,
    },
    #[error("failed to resolve `{path}` to compute the content key")]
    Selection {
        path: String,
        #[source]
        source: Box<crate::fileop::FileOpError>,
    },
    #[error("failed to read `{path}` to compute the content key")]
    SelectionIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<EngineError> for SolveError {
    fn from(e: EngineError) -> SolveError {
        SolveError::op(e)
    }
}

/// The executor. One per build.
pub struct Engine {
    store: Arc<Store>,
    opts: EngineOptions,
    snapshots: Snapshots,
    index: CacheIndex,
    /// Mount points, RUN steps' run dirs, secret files and the empty dir, inside `scratch`
    /// (declared first: dropped, so unmounted, before `scratch` is removed).
    mount_area: mounts::MountArea,
    /// Per-build scratch space, removed on drop; named and locked by this process, so a killed
    /// build's is removed by the next command.
    scratch: kiln_cache::temp::ScratchDir,
    /// An empty directory (the lower dir of a scratch-based overlay).
    empty: PathBuf,
    contexts: Mutex<HashMap<String, Arc<LocalContext>>>,
    /// Serialises unpacking per snapshot key within this process (one download and one unpack
    /// of a layer however many steps want it; different layers proceed side by side).
    unpack_locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Git and HTTP sources: resolved commits and downloads made for keys.
    remote: remote::RemoteState,
    /// Removals of duplicate results running beside the build; joined when the engine is
    /// dropped, so they finish before the build command does.
    removals: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Fsyncs layer blobs and writes cache records behind the build (see
    /// [`kiln_cache::durable`]); flushed by [`Executor::finish`], drained on drop.
    durable: kiln_cache::durable::Durable,
    /// Network namespaces on the bridge for RUN steps, reused from step to step.
    networks: exec::BuildNetworks,
    /// What the solve looked up, recorded and keyed: what a cache export writes.
    solved: Mutex<SolvedCache>,
    /// How many layers a RUN's root overlay stacks before the layers below the last multiple
    /// of this number are mounted as one flattened view (`KILN_FLATTEN_AFTER`).
    flatten_after: usize,
    /// Snapshots this build found or made, by key: their paths stay valid for the whole build
    /// (it holds the GC lock, and a snapshot valid in this boot is never replaced), so a step
    /// over `n` layers does not read `n` records again.
    unpacked: Mutex<HashMap<Digest, Vec<PathBuf>>>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        let pending = std::mem::take(self.removals.get_mut().unwrap_or_else(|e| e.into_inner()));
        for h in pending {
            let _ = h.join();
        }
    }
}

fn fresh_dir(parent: &Path, prefix: &str) -> Result<PathBuf, EngineError> {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .map_err(|source| EngineError::CreateDir {
            path: parent.into(),
            source,
        })?;
    Ok(d.keep())
}

/// Fails, before any step runs, when an exec op of `graph` is for a platform this host can run
/// neither natively nor through a binfmt_misc handler fit for containers (one with the `F` flag).
pub fn check_emulation(graph: &Graph) -> Result<(), EngineError> {
    use kiln_runtime::binfmt::{self, Support};
    let mut platforms: Vec<&kiln_dag::Platform> = graph
        .vertices
        .values()
        .filter_map(|v| match &v.op {
            Op::Exec(e) => e.platform.as_ref(),
            _ => None,
        })
        .collect();
    platforms.sort();
    platforms.dedup();
    let host = kiln_dag::Platform::host();
    for p in platforms {
        let fail = |reason: String| EngineError::Emulation {
            platform: Box::new(p.clone()),
            host: Box::new(host.clone()),
            reason,
        };
        if p.os != host.os {
            return Err(fail(format!("{} programs cannot run on {}", p.os, host.os)));
        }
        let support = binfmt::support(&p.architecture).map_err(|e| fail(e.to_string()))?;
        match support {
            Support::Native | Support::Emulated(_) => {}
            Support::NoBinfmt => {
                return Err(fail(format!(
                    "binfmt_misc is not mounted at {}",
                    binfmt::BINFMT_DIR
                )))
            }
            Support::NotFixed(h) => {
                return Err(fail(format!(
                    "the binfmt_misc handler `{}` ({}) lacks the F flag, so containers cannot use it",
                    h.name,
                    h.interpreter.display()
                )))
            }
            Support::Missing => {
                let name = binfmt::machine(&p.architecture)
                    .map(|m| format!(" (qemu-{})", m.qemu))
                    .unwrap_or_default();
                return Err(fail(format!(
                    "no binfmt_misc handler for {}{name} is registered",
                    p.architecture
                )));
            }
        }
    }
    Ok(())
}

/// The chain ID of `diff_id` over the layers `base`: the key of the snapshot holding it.
fn chain_id(base: &[Layer], diff_id: &Digest) -> Digest {
    let mut ids = base.iter().map(|l| l.diff_id).chain(std::iter::once(*diff_id));
    let first = ids.next().unwrap_or(*diff_id);
    ids.fold(first, |id, next| Digest::of(format!("{id} {next}").as_bytes()))
}

impl Engine {
    /// Prepares an engine for one build of `graph` (the ops carry all it needs; the graph
    /// itself is not kept).
    pub fn new(store: Arc<Store>, graph: Arc<Graph>, opts: EngineOptions) -> Result<Engine, EngineError> {
        check_emulation(&graph)?;
        if graph
            .vertices
            .values()
            .any(|v| matches!(v.op, kiln_dag::Op::Exec(_)))
        {
            kiln_runtime::seccomp::prewarm_default();
        }
        drop(graph);
        let flatten_after =
            kiln_cache::snapshot::flatten_after_from_env().map_err(EngineError::FlattenAfter)?;
        let snapshots = Snapshots::open(&store.snapshots_dir()).map_err(EngineError::Snapshots)?;
        let index = CacheIndex::open(&store.cache_dir().join("index")).map_err(EngineError::Index)?;
        let tmp_parent = store.root().join("tmp");
        std::fs::create_dir_all(&tmp_parent).map_err(|source| EngineError::CreateDir {
            path: tmp_parent.clone(),
            source,
        })?;
        let scratch =
            kiln_cache::temp::ScratchDir::new(&store, "build").map_err(|source| EngineError::CreateDir {
                path: tmp_parent.clone(),
                source,
            })?;
        let mount_area = mounts::MountArea::new(scratch.path())?;
        let empty = mount_area.path().join("empty");
        std::fs::create_dir_all(&empty).map_err(|source| EngineError::CreateDir {
            path: empty.clone(),
            source,
        })?;
        Ok(Engine {
            store,
            opts,
            snapshots,
            index,
            mount_area,
            scratch,
            empty,
            contexts: Mutex::new(HashMap::new()),
            unpack_locks: Mutex::default(),
            remote: remote::RemoteState::default(),
            removals: Mutex::new(Vec::new()),
            durable: kiln_cache::durable::Durable::new(),
            networks: exec::BuildNetworks::default(),
            solved: Mutex::new(SolvedCache::default()),
            flatten_after,
            unpacked: Mutex::default(),
        })
    }

    /// Every record, copy-selection key and cache mount of the solve so far (see
    /// [`SolvedCache`]).
    pub fn solved_cache(&self) -> SolvedCache {
        self.solved.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn note_record(&self, key: &CacheKey, record: &Record) {
        self.solved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .records
            .insert(key.hex(), record.clone());
    }

    pub(crate) fn note_selection(&self, memo: &str, key: [u8; 32]) {
        self.solved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .selections
            .insert(memo.to_string(), key);
    }

    pub(crate) fn note_mount(&self, id: &str, dir: &Path) {
        self.solved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mounts
            .insert(id.to_string(), MountContents::Dir(dir.to_path_buf()));
    }

    /// The directory of the cache mount `id` in this store (which may not exist yet).
    pub(crate) fn cache_mount_path(&self, id: &str) -> PathBuf {
        self.store
            .cache_dir()
            .join("mounts")
            .join(blake3::hash(id.as_bytes()).to_hex().as_str())
    }

    /// A cached RUN step's cache mounts: exported as they are here, or as imported.
    fn note_cached_mounts(&self, v: &Vertex) {
        let Op::Exec(e) = &v.op else { return };
        for m in &e.mounts {
            let kiln_dag::MountKind::Cache { id, .. } = &m.kind else {
                continue;
            };
            let dir = self.cache_mount_path(id);
            let contents = if dir.is_dir() {
                MountContents::Dir(dir)
            } else if let Some(l) = self.cache_source().and_then(|s| s.mount_seed(id)) {
                MountContents::Imported(l)
            } else {
                continue;
            };
            self.solved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .mounts
                .entry(id.clone())
                .or_insert(contents);
        }
    }

    pub(crate) fn cache_source(&self) -> Option<&Arc<dyn CacheSource>> {
        self.opts.cache_source.as_ref()
    }

    /// Makes sure `blob` is in the content store, fetching it from the imported cache.
    pub(crate) async fn fetch_blob(&self, blob: &Digest) -> Result<(), EngineError> {
        if self.store.content().contains(blob) {
            return Ok(());
        }
        let Some(src) = self.opts.cache_source.clone() else {
            return Err(EngineError::MissingBlob { blob: *blob });
        };
        let (store, d) = (self.store.clone(), *blob);
        tokio::task::spawn_blocking(move || src.fetch(&store, &d))
            .await
            .map_err(|e| EngineError::Join(e.to_string()))?
            .map_err(|source| EngineError::CacheBlob { blob: *blob, source })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Drops `doomed` (a mutable snapshot whose result turned out to exist already, or a
    /// committed step's work dir moved aside: dropping either removes it) on a thread of its own:
    /// the steps after it need not wait for its unlinks (a large tree takes a while). The
    /// engine's drop waits for it.
    fn drop_beside(&self, doomed: impl Send + 'static) {
        match std::thread::Builder::new()
            .name("kiln-discard".into())
            .spawn(move || drop(doomed))
        {
            Ok(h) => self.removals.lock().unwrap_or_else(|e| e.into_inner()).push(h),
            // No thread: the closure (and what it held) was dropped, which removed it inline.
            Err(e) => tracing::debug!(error = %e, "removal thread not started"),
        }
    }

    /// A fresh directory under the build's scratch space.
    fn scratch_dir(&self, prefix: &str) -> Result<PathBuf, EngineError> {
        fresh_dir(self.scratch.path(), prefix)
    }

    /// A fresh directory in the build's mount area (for mount points and small files).
    fn mount_dir(&self, prefix: &str) -> Result<PathBuf, EngineError> {
        fresh_dir(self.mount_area.path(), prefix)
    }

    /// Scans (once per build) the local context `name`.
    fn local_context(&self, name: &str, ignore: &[String]) -> Result<Arc<LocalContext>, EngineError> {
        let key = format!("{name}\0{}", ignore.join("\0"));
        if let Some(c) = self.contexts.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(c.clone());
        }
        let root = self
            .opts
            .contexts
            .get(name)
            .ok_or_else(|| EngineError::UnknownContext(name.into()))?;
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.clone());
        let cache_file = self.store.cache_dir().join("context").join(
            blake3::hash(root.as_os_str().as_encoded_bytes())
                .to_hex()
                .as_str(),
        );
        let mut stat_cache = StatCache::load(&cache_file);
        let index =
            ContextIndex::scan(&root, ignore, &mut stat_cache).map_err(|source| EngineError::Context {
                name: name.into(),
                source,
            })?;
        stat_cache.save(&cache_file);
        let ctx = Arc::new(LocalContext {
            name: name.into(),
            root,
            index,
            ignore: ignore.to_vec(),
        });
        self.contexts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, ctx.clone());
        Ok(ctx)
    }

    /// Makes sure every layer of `layers` is unpacked and returns their directories, TOP FIRST
    /// (overlay's lowerdir order): one per layer, for reading the layers themselves.
    async fn layer_dirs(&self, layers: &[Layer]) -> Result<Vec<PathBuf>, EngineError> {
        // All layers at once: each is a download and a directory of its own, and the work runs
        // on blocking threads, so a fresh runner's imported cache or a new base image is fetched
        // and unpacked on every core instead of one layer after another.
        let trees =
            futures_util::future::try_join_all(layers.iter().rev().map(|l| self.ensure_unpacked(l))).await?;
        Ok(trees.into_iter().flatten().collect())
    }

    /// The lower dirs to mount `layers` with, TOP FIRST: [`Engine::layer_dirs`] up to
    /// `flatten_after` layers; past that, the layers below the last multiple of `flatten_after`
    /// are one flattened view (`kiln_cache::snapshot::Snapshots::flattened`, kept for the next
    /// steps and builds), so a RUN's root, a RUN mount or a file op's view mounts at most
    /// `flatten_after` lower dirs however long its chain is. The view's files are the layers'
    /// own inodes, so linking from the view's dirs links the layers' files.
    async fn lower_dirs(&self, layers: &[Layer]) -> Result<Vec<PathBuf>, EngineError> {
        let k = self.flatten_after;
        if layers.len() <= k {
            return self.layer_dirs(layers).await;
        }
        let cut = layers.len() / k * k;
        let keys: Vec<Digest> = layers[..cut].iter().map(|l| l.snapshot).collect();
        let flat = match self.snapshots.flat_if_present(&keys) {
            Some(flat) => flat,
            None => {
                // The layers it covers are made (unpacked) first: a view is made from them.
                self.layer_dirs(&layers[..cut]).await?;
                let snapshots = self.snapshots.clone();
                let made = tokio::task::spawn_blocking(move || snapshots.flattened(&keys, k))
                    .await
                    .map_err(|e| EngineError::Join(e.to_string()))?;
                match made {
                    Ok(flat) => flat,
                    // A view only saves time: below the kernel's limit the stack itself works.
                    Err(source) if layers.len() < kiln_runtime::sandbox::MAX_LOWER_DIRS => {
                        tracing::warn!(error = %source, layers = layers.len(), "mounting the layers without a flattened view");
                        return self.layer_dirs(layers).await;
                    }
                    Err(source) => {
                        return Err(EngineError::Flatten {
                            count: cut,
                            source: Box::new(source),
                        })
                    }
                }
            }
        };
        let mut dirs = self.layer_dirs(&layers[cut..]).await?;
        dirs.push(flat);
        Ok(dirs)
    }

    /// The trees of layer `l`, top first (unpacked if needed): its snapshot's, and those of the
    /// snapshots it is stacked on (an edited copy's result: its changed files over the last one).
    async fn ensure_unpacked(&self, l: &Layer) -> Result<Vec<PathBuf>, EngineError> {
        if let Some(path) = self
            .unpacked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&l.snapshot)
        {
            return Ok(path.clone());
        }
        let path = self.ensure_unpacked_uncached(l).await?;
        self.unpacked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(l.snapshot, path.clone());
        Ok(path)
    }

    async fn ensure_unpacked_uncached(&self, l: &Layer) -> Result<Vec<PathBuf>, EngineError> {
        if let Some(trees) = self.present(&l.snapshot) {
            return Ok(trees);
        }
        let lock = self
            .unpack_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(l.snapshot)
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if let Some(trees) = self.present(&l.snapshot) {
            return Ok(trees);
        }
        if !self.store.content().contains(&l.blob) {
            if let Some(path) = self.fetch_unpacking(l).await {
                return Ok(vec![path]);
            }
            if let Some(trees) = self.present(&l.snapshot) {
                return Ok(trees);
            }
        }
        self.fetch_blob(&l.blob).await?;
        let file = self
            .store
            .content()
            .open(&l.blob)
            .map_err(|_| EngineError::MissingBlob { blob: l.blob })?;
        let snapshots = self.snapshots.clone();
        let (key, blob, diff_id) = (l.snapshot, l.blob, l.diff_id);
        tokio::task::spawn_blocking(move || {
            let reader = layer::sniff(file).map_err(|e| EngineError::Unpack {
                blob,
                source: Box::new(e),
            })?;
            snapshots
                .unpack(&key, None, reader, Some(&diff_id))
                .map(|s| vec![s.path])
                .map_err(|e| EngineError::Unpack {
                    blob,
                    source: Box::new(e),
                })
        })
        .await
        .map_err(|e| EngineError::Join(e.to_string()))?
    }

    /// The trees of snapshot `key`, top first, when it and the snapshots below it are present.
    fn present(&self, key: &Digest) -> Option<Vec<PathBuf>> {
        self.snapshots.lower_dirs(key).ok()
    }

    /// The layers of an image in the store, without unpacking anything.
    fn image_layers(&self, reference: &str, digest: Option<&Digest>) -> Result<Vec<Layer>, EngineError> {
        let images = self.store.images();
        let image = match digest {
            Some(d) => images.get(d),
            None => images.resolve(reference),
        }
        .map_err(|source| EngineError::Image {
            reference: reference.into(),
            source: Box::new(source),
        })?;
        let chain = image.chain_ids();
        Ok(image
            .layers
            .iter()
            .zip(chain)
            .map(|(l, chain_id)| Layer {
                snapshot: chain_id,
                blob: l.digest,
                diff_id: l.diff_id,
                size: l.descriptor.size(),
                media_type: l.descriptor.media_type().to_string(),
                created: None,
            })
            .collect())
    }

    fn input(inputs: &[Resolved<Output>], index: usize) -> Result<&Output, EngineError> {
        inputs
            .get(index)
            .map(|r| &r.output)
            .ok_or(EngineError::NoSuchInput {
                index,
                count: inputs.len(),
            })
    }

    fn fs_input(inputs: &[Resolved<Output>], index: usize) -> Result<Vec<Layer>, EngineError> {
        match Self::input(inputs, index)? {
            Output::Fs(l) => Ok(l.as_ref().clone()),
            Output::Local(_) => Err(EngineError::NotAFilesystem(index)),
        }
    }

    /// Writes the upper dir of a finished step as a layer blob, commits it as a snapshot keyed
    /// by its chain ID on top of `base`, and returns the new stack.
    fn commit_layer(
        &self,
        base: &[Layer],
        mutable: kiln_cache::snapshot::MutableSnapshot,
        exclude: Vec<PathBuf>,
    ) -> Result<Vec<Layer>, EngineError> {
        self.commit_layer_with(base, mutable, exclude, None)
    }

    /// [`Engine::commit_layer`] for a linked copy: the tar's file entries are recorded beside
    /// the snapshot (as [`TAR_INDEX`]), and entries of files linked from `donor` (the last
    /// result of the same step) are copied from its tar.
    fn commit_layer_with(
        &self,
        base: &[Layer],
        mutable: kiln_cache::snapshot::MutableSnapshot,
        exclude: Vec<PathBuf>,
        indexed: Option<Option<Arc<layer::Donor>>>,
    ) -> Result<Vec<Layer>, EngineError> {
        let opts = layer::DiffOptions {
            source_date_epoch: self.opts.source_date_epoch,
            exclude,
            donor: indexed.clone().flatten(),
            // A result stacked on an earlier one is the union of both trees.
            below: mutable.lower_dirs().to_vec(),
        };
        // The tar goes straight into the content store (named by the diff ID the writer
        // computed over the bytes it wrote): one pass over the data, no temp copy, one hash. Its
        // fsync and rename into place run behind the build; the next step needs only the
        // snapshot. A linked copy's tar reuses the last result's entries: only its new bytes
        // are written (a fragment blob) and the layer is kept as a recipe over the fragment and
        // the earlier blob, stored once the fragment is durable.
        let mut writer = self
            .store
            .content()
            .prehashed_writer()
            .map_err(|e| EngineError::WriteLayer(Box::new(e)))?;
        let (stats, written, recipe) = match indexed {
            None => layer::write_diff(mutable.upper(), &mut writer, &opts).map(|s| (s, s.diff_id, None)),
            Some(_) => layer::write_diff_indexed(mutable.upper(), &mut writer, &opts).map(|l| {
                if let Err(e) = mutable.attach(TAR_INDEX, &l.index.encode()) {
                    tracing::debug!(error = %e, "tar index not stored");
                }
                (l.stats, l.written, l.recipe)
            }),
        }
        .map_err(|e| EngineError::WriteLayer(Box::new(e)))?;
        if opts.donor.is_some() {
            tracing::debug!(
                reused = stats.reused,
                entries = stats.entries,
                lazy = recipe.is_some(),
                "entries copied from the earlier tar"
            );
        }
        let unsynced = writer
            .finish_unsynced(Some(&written))
            .map_err(|e| EngineError::WriteLayer(Box::new(e)))?;
        self.durable.commit(unsynced);
        let size = stats.size;
        let blob = stats.diff_id;
        if let Some(recipe) = recipe {
            let content = self.store.content().clone();
            self.durable.then(move || {
                content
                    .put_recipe(&blob, &recipe)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            });
        }
        let chain = chain_id(base, &stats.diff_id);
        let snapshot = match self.snapshots.get(&chain) {
            Some(_) => {
                self.drop_beside(mutable);
                chain
            }
            None => {
                let (committed, work) = mutable
                    .commit_leaving_work(&chain, &stats.diff_id, size)
                    .map_err(EngineError::Commit)?;
                self.drop_beside(work);
                committed.key
            }
        };
        let mut out = base.to_vec();
        out.push(Layer {
            snapshot,
            blob,
            diff_id: stats.diff_id,
            size,
            media_type: LAYER_TAR.into(),
            created: Some(kiln_cache::images::now_rfc3339()),
        });
        Ok(out)
    }

    /// The copy actions of a file op keyed by what they read, with the input they read: every
    /// copy. From a local context the key covers the selected files (through the context's
    /// index); from a filesystem (another stage, an image, a heredoc, a Git or HTTP source) it
    /// covers the files the copy can select (see `contentkey`), so a source that is built again
    /// and gives the same files leaves the copy, and everything after it, cached.
    fn content_copies<'a>(&self, v: &'a Vertex) -> Vec<(usize, &'a str)> {
        let Op::File(f) = &v.op else { return Vec::new() };
        f.actions
            .iter()
            .filter_map(|a| match a {
                FileAction::Copy(c) if c.source_input < v.inputs.len() => {
                    Some((c.source_input, c.src.as_str()))
                }
                _ => None,
            })
            .collect()
    }
}

impl Executor for Engine {
    type Output = Output;

    /// An image source is keyed by its platform and its layers' diff IDs, not by its reference
    /// and manifest digest: a RUN over it sees its filesystem only (env, user, workdir and shell
    /// are fields of the steps' ops), so the same base image re-imported or pulled under another
    /// name keeps every key after it, on any machine.
    fn key_identity(&self, v: &Vertex, digest: &Digest) -> Digest {
        let Op::Source(SourceOp::Image(i)) = &v.op else {
            return crate::cachekey::op_identity(v);
        };
        match self.image_layers(&i.reference, i.resolved_digest.as_ref()) {
            Ok(layers) => {
                let mut text = format!("kiln image source v1\0{}", i.platform);
                for l in &layers {
                    text.push('\0');
                    text.push_str(&l.diff_id.to_string());
                }
                Digest::of(text.as_bytes())
            }
            Err(_) => *digest,
        }
    }

    fn content_inputs(&self, v: &Vertex) -> Vec<usize> {
        let mut out: Vec<usize> = self.content_copies(v).into_iter().map(|(i, _)| i).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    async fn content_key(
        &self,
        v: &Vertex,
        inputs: &[Resolved<Output>],
    ) -> Result<Option<CacheKey>, SolveError> {
        match &v.op {
            Op::Source(SourceOp::Local(l)) => {
                let ctx = self.local_context(&l.name, &l.exclude)?;
                Ok(Some(CacheKey(ctx.index.digest())))
            }
            Op::Source(SourceOp::Git(g)) => Ok(Some(self.git_key(g).await?)),
            Op::Source(SourceOp::Http(h)) => Ok(Some(self.http_key(h).await?)),
            Op::File(_) => {
                let copies = self.content_copies(v);
                if copies.is_empty() {
                    return Ok(None);
                }
                let positions = self.content_inputs(v);
                let mut h = blake3::Hasher::new();
                h.update(b"copy-sources\0");
                for (input, src) in copies {
                    let pos = positions.iter().position(|p| *p == input).unwrap_or(0);
                    h.update(&(input as u64).to_le_bytes());
                    h.update(src.as_bytes());
                    match inputs.get(pos).map(|r| &r.output) {
                        Some(Output::Local(ctx)) => {
                            h.update(&ctx.index.select_digest(src));
                        }
                        Some(Output::Fs(layers)) => {
                            h.update(b"\0tree\0");
                            h.update(&self.selection_key(layers, src).await?);
                        }
                        None => return Err(EngineError::NotAFilesystem(input).into()),
                    }
                }
                Ok(Some(CacheKey(*h.finalize().as_bytes())))
            }
            _ => Ok(None),
        }
    }

    async fn lookup(&self, key: &CacheKey, v: &Vertex) -> Result<Option<Output>, SolveError> {
        match &v.op {
            Op::Source(SourceOp::Scratch) => Ok(Some(Output::Fs(Arc::new(Vec::new())))),
            // Never "cached": it is read (and its changes found) on every build, as BuildKit
            // transfers the context on every build.
            Op::Source(SourceOp::Local(_)) => Ok(None),
            Op::Source(SourceOp::Image(i)) => Ok(Some(Output::Fs(Arc::new(
                self.image_layers(&i.reference, i.resolved_digest.as_ref())?,
            )))),
            _ => {
                // A record whose blobs were pruned is a miss; missing snapshots are re-unpacked
                // from the blobs when needed.
                let local = self.index.get(&key.hex()).filter(|record| {
                    record
                        .layers
                        .iter()
                        .all(|l| self.store.content().contains(&l.blob))
                });
                let record = match local {
                    Some(r) => r,
                    // An imported record: its blobs stay remote until a step reads the files.
                    None => match self.cache_source().and_then(|s| s.record(&key.hex())) {
                        Some(r) => r,
                        None => return Ok(None),
                    },
                };
                self.note_record(key, &record);
                self.note_cached_mounts(v);
                Ok(Some(Output::Fs(Arc::new(record.layers))))
            }
        }
    }

    async fn execute(
        &self,
        v: &Vertex,
        inputs: &[Resolved<Output>],
        ctx: &ExecCtx,
    ) -> Result<Output, SolveError> {
        match &v.op {
            Op::Source(SourceOp::Scratch) => Ok(Output::Fs(Arc::new(Vec::new()))),
            Op::Source(SourceOp::Local(l)) => {
                let started = std::time::SystemTime::now();
                let local = self.local_context(&l.name, &l.exclude)?;
                // BuildKit's `transferring context: N done`: here, the bytes of the files the
                // context holds (read in place, not sent).
                let bytes = local
                    .index
                    .entries
                    .iter()
                    .filter(|e| e.kind == crate::context::Kind::File)
                    .map(|e| e.size)
                    .sum();
                ctx.progress()
                    .status_done("transferring context:", bytes, started);
                Ok(Output::Local(local))
            }
            Op::Source(SourceOp::Image(i)) => Ok(Output::Fs(Arc::new(
                self.image_layers(&i.reference, i.resolved_digest.as_ref())?,
            ))),
            Op::Source(SourceOp::Git(g)) => self.git_exec(g, ctx).await,
            Op::Source(SourceOp::Http(h)) => self.http_exec(h, ctx).await,
            Op::Merge(_) => {
                let mut out = Vec::new();
                for i in 0..inputs.len() {
                    out.extend(Self::fs_input(inputs, i)?);
                }
                Ok(Output::Fs(Arc::new(out)))
            }
            Op::Exec(e) => self.exec(v, e, inputs, ctx).await,
            Op::File(f) => self.file(v, f, inputs, ctx).await,
        }
    }

    async fn finish(&self) -> Result<(), SolveError> {
        tokio::task::block_in_place(|| self.durable.flush()).map_err(|e| EngineError::Durable(e).into())
    }

    async fn record(&self, key: &CacheKey, v: &Vertex, out: &Output) -> Result<(), SolveError> {
        match (&v.op, out) {
            (
                Op::Exec(_) | Op::File(_) | Op::Merge(_) | Op::Source(SourceOp::Git(_) | SourceOp::Http(_)),
                Output::Fs(layers),
            ) => {
                let record = Record {
                    layers: layers.as_ref().clone(),
                    description: v.meta.name.clone(),
                };
                self.note_record(key, &record);
                // After the blobs it names are durable (they were queued before it).
                let (index, key) = (self.index.clone(), key.hex());
                self.durable
                    .then(move || index.put(&key, &record).map_err(Into::into));
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// `rel` (a mount's `source` selector) inside `root`, resolved as BuildKit resolves it: `..`
/// stops at `root` and symlinks are followed with `root` as `/`, so a symlink in a context or an
/// image (`out -> /etc`) never leads the mount out of it. A selector that does not exist there
/// is an error naming it. The kernel resolves (`openat2` with `RESOLVE_IN_ROOT`); the path
/// handed to the mount is the one it found.
fn confined(root: &Path, rel: &str) -> Result<PathBuf, EngineError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use std::os::fd::AsRawFd;
    let clean = crate::context::clean_rel(rel);
    if clean.is_empty() {
        return Ok(root.to_path_buf());
    }
    let err = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => EngineError::MountSourceMissing {
            selector: format!("/{clean}"),
        },
        _ => EngineError::MountSource {
            selector: format!("/{clean}"),
            source,
        },
    };
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err(e.into()))?;
    let found = rustix::fs::openat2(
        &dir,
        clean.as_str(),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| err(e.into()))?;
    std::fs::read_link(format!("/proc/self/fd/{}", found.as_raw_fd())).map_err(err)
}
