//! The scheduler: runs the part of a [`Graph`] that the roots need, each vertex at most once,
//! as much of it in parallel as `jobs` allows, reusing cached results.
//!
//! It is generic over an [`Executor`], which the concrete ops implement; the scheduler itself
//! knows nothing of containers, snapshots or the store, so it is tested with fake executors.
//!
//! # How a solve proceeds
//!
//! Work is driven by demand, from the roots down, at two levels:
//!
//! * a vertex whose **output** is needed first needs its **key**;
//! * a vertex whose **key** is needed needs the keys of its inputs, and the outputs of the inputs
//!   it reads by content ([`Executor::content_inputs`]) or that ignore the cache.
//!
//! Once a vertex's key is known it is looked up (unless `meta.ignore_cache`). A hit gives its
//! output without running anything below it. Only a vertex whose output is needed and whose
//! lookup missed (or was skipped) demands its inputs' outputs and then executes, followed by
//! [`Executor::record`]. So a fully cached graph computes keys and looks them up, and executes
//! nothing. Vertices whose key is needed but not their output are still looked up, so progress
//! shows them as cached when they are.
//!
//! A vertex with `meta.ignore_cache` (`--no-cache`, `--no-cache-filter`) is never looked up and
//! its key is not trusted by its users until it has run again, like BuildKit, where such a vertex
//! offers its users no cache keys to match until it has executed. So every such vertex the roots
//! reach runs; its users may still be cache hits when its key did not change.
//!
//! Key computations and lookups are not bounded; executions hold one of `jobs` slots.
//!
//! # Failure and cancellation
//!
//! The first failure (or the caller's [`CancelToken`]) cancels the solve: nothing new starts,
//! executing ops see [`ExecCtx::cancel`] fire and are expected to stop, clean up (kill the
//! container, remove temporary snapshots) and return [`SolveError::Cancelled`]. [`solve`]
//! returns only after every task it started has finished. Only the first failure is returned;
//! errors that arrive after cancellation are shown as cancelled, not reported.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_dag::{Digest, Graph, SourceLocation, Vertex};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::cachekey::{self, CacheKey};
use crate::progress::{EventKind, MissReason, ProgressSink, Stream, VertexProgress};

/// What the concrete ops implement. All methods may be called concurrently for different
/// vertices; the scheduler calls each at most once per vertex and solve.
pub trait Executor: Send + Sync + 'static {
    /// A vertex's result, e.g. a snapshot handle. Cloned once per consumer.
    type Output: Clone + Send + Sync + 'static;

    /// The positions of the vertex's inputs whose *files* the op reads to compute its content key
    /// (COPY from the context, a stage's files). Their outputs are resolved before
    /// [`Executor::content_key`] runs and their cache keys are left out of the vertex's key: the
    /// content key replaces them. Default: none.
    fn content_inputs(&self, _v: &Vertex) -> Vec<usize> {
        Vec::new()
    }

    /// The op identity the vertex's cache key starts from: [`cachekey::op_identity`] (the op
    /// without its inputs' digests), unless the executor knows that part of the op cannot change
    /// the result (an image source is its filesystem, whatever name it was resolved from).
    fn key_identity(&self, v: &Vertex, _digest: &Digest) -> Digest {
        cachekey::op_identity(v)
    }

    /// Extra key material computed from the files the op selects; `None` = the op digest and the
    /// input keys are the whole key. `inputs[i]` is the input at position `content_inputs(v)[i]`
    /// (sorted, without duplicates). Never include an mtime, a host path or a secret.
    fn content_key(
        &self,
        v: &Vertex,
        inputs: &[Resolved<Self::Output>],
    ) -> impl Future<Output = Result<Option<CacheKey>, SolveError>> + Send;

    /// The cached result recorded under `key`, if any.
    fn lookup(
        &self,
        key: &CacheKey,
        v: &Vertex,
    ) -> impl Future<Output = Result<Option<Self::Output>, SolveError>> + Send;

    /// Runs the op over its inputs' outputs (one per `v.inputs` entry, in order). Must watch
    /// `ctx.cancel()`: on cancellation, stop, clean up and return [`SolveError::Cancelled`].
    fn execute(
        &self,
        v: &Vertex,
        inputs: &[Resolved<Self::Output>],
        ctx: &ExecCtx,
    ) -> impl Future<Output = Result<Self::Output, SolveError>> + Send;

    /// Records a freshly executed result under `key` (also done when the lookup was skipped).
    fn record(
        &self,
        key: &CacheKey,
        v: &Vertex,
        out: &Self::Output,
    ) -> impl Future<Output = Result<(), SolveError>> + Send;

    /// Called once every vertex has succeeded, before [`solve`] returns: completes whatever
    /// `execute` and `record` left running behind the build (making results durable), so the
    /// caller may refer to them. Default: nothing to complete.
    fn finish(&self) -> impl Future<Output = Result<(), SolveError>> + Send {
        async { Ok(()) }
    }
}

/// A vertex's result together with its cache key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved<O> {
    /// The key the output is (or was just) recorded under.
    pub key: CacheKey,
    /// What the executor produced or the lookup returned.
    pub output: O,
    /// `true` when the output came from the cache, `false` when the op ran in this solve.
    pub cached: bool,
}

/// Options of one solve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SolveOptions {
    /// At most this many ops execute at once (`--jobs`); 0 = the number of CPUs.
    pub jobs: usize,
}

impl Default for SolveOptions {
    fn default() -> SolveOptions {
        SolveOptions { jobs: default_jobs() }
    }
}

fn default_jobs() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

/// A cancellation flag shared by the caller (Ctrl-C), the scheduler and the ops. Cloning shares
/// the flag; once cancelled it stays cancelled.
#[derive(Clone, Debug)]
pub struct CancelToken {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for CancelToken {
    fn default() -> CancelToken {
        CancelToken::new()
    }
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> CancelToken {
        CancelToken {
            tx: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Cancels the token and wakes everyone waiting in [`CancelToken::cancelled`].
    pub fn cancel(&self) {
        self.tx.send_replace(true);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once the token is cancelled (at once if it already is).
    pub async fn cancelled(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// What an executing op gets besides its inputs: the cancel signal and a progress handle.
#[derive(Clone, Debug)]
pub struct ExecCtx {
    cancel: CancelToken,
    progress: VertexProgress,
}

impl ExecCtx {
    /// A context reporting to `progress` and cancelled by `cancel` (the scheduler makes these;
    /// ops' own tests may too).
    pub fn new(progress: VertexProgress, cancel: CancelToken) -> ExecCtx {
        ExecCtx { cancel, progress }
    }

    /// Fires when the op must stop: another vertex failed or the user pressed Ctrl-C.
    pub fn cancel(&self) -> &CancelToken {
        &self.cancel
    }

    /// Where the op reports output and warnings.
    pub fn progress(&self) -> &VertexProgress {
        &self.progress
    }

    /// Reports a chunk of the op's process output.
    pub fn log(&self, stream: Stream, data: impl Into<Vec<u8>>) {
        self.progress.log(stream, data);
    }
}

/// Which vertex an error is about: its digest and the metadata that points the user at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VertexRef {
    /// The vertex's identity.
    pub digest: Digest,
    /// The progress name (`[build 2/3] RUN make`), or the op summary when it has none.
    pub name: String,
    /// Where in the Dockerfile it came from.
    pub location: Option<SourceLocation>,
}

impl VertexRef {
    fn of(digest: Digest, v: &Vertex) -> VertexRef {
        VertexRef {
            digest,
            name: display_name(v),
            location: v.meta.location.clone(),
        }
    }
}

impl std::fmt::Display for VertexRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`", self.name)?;
        if let Some(l) = &self.location {
            if l.end_line > l.start_line {
                write!(f, " ({}:{}-{})", l.file, l.start_line, l.end_line)?;
            } else {
                write!(f, " ({}:{})", l.file, l.start_line)?;
            }
        }
        Ok(())
    }
}

fn display_name(v: &Vertex) -> String {
    if v.meta.name.is_empty() {
        v.op.summary()
    } else {
        v.meta.name.clone()
    }
}

/// The step of a vertex that a task was running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// [`Executor::content_key`].
    ContentKey,
    /// [`Executor::lookup`].
    Lookup,
    /// [`Executor::execute`] and [`Executor::record`].
    Execute,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::ContentKey => "computing the content key",
            Step::Lookup => "the cache lookup",
            Step::Execute => "execution",
        })
    }
}

/// A solve failed. The vertex variants say which vertex and which step; `source` is the cause.
#[derive(Debug, thiserror::Error)]
pub enum SolveError {
    /// The build was cancelled (Ctrl-C), or an op stopped because it was told to.
    #[error("build cancelled")]
    Cancelled,
    /// A root or an input is not in the graph.
    #[error("vertex {digest} is not in the graph{}", referenced_by.as_ref().map(|r| format!(" (input of {r})")).unwrap_or_default())]
    MissingVertex {
        digest: Digest,
        referenced_by: Option<Box<VertexRef>>,
    },
    /// The executor named a content input the vertex does not have.
    #[error("content input {index} of {vertex} is out of range: the vertex has {inputs} inputs")]
    BadContentInput {
        vertex: Box<VertexRef>,
        index: usize,
        inputs: usize,
    },
    /// Computing a vertex's content key failed.
    #[error("failed to compute the content key of {vertex}")]
    ContentKey {
        vertex: Box<VertexRef>,
        #[source]
        source: Box<SolveError>,
    },
    /// Looking a vertex up in the cache failed.
    #[error("failed to look up {vertex} in the cache")]
    Lookup {
        vertex: Box<VertexRef>,
        #[source]
        source: Box<SolveError>,
    },
    /// Running a vertex failed.
    #[error("failed to run {vertex}")]
    Execute {
        vertex: Box<VertexRef>,
        #[source]
        source: Box<SolveError>,
    },
    /// Recording a vertex's result in the cache failed.
    #[error("failed to record the result of {vertex} in the cache")]
    Record {
        vertex: Box<VertexRef>,
        #[source]
        source: Box<SolveError>,
    },
    /// A task panicked (a bug in an executor).
    #[error("{step} of {vertex} panicked")]
    Panicked { vertex: Box<VertexRef>, step: Step },
    /// No task is running yet a root has no result: the graph is inconsistent (a cycle).
    #[error("scheduler stalled before {vertex} could run: the graph has a cycle")]
    Stalled { vertex: Box<VertexRef> },
    /// A concrete op's own error (what executors return).
    #[error(transparent)]
    Op(Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl SolveError {
    /// Wraps a concrete op's error.
    pub fn op(e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> SolveError {
        SolveError::Op(e.into())
    }

    /// Whether this is (or wraps) a cancellation.
    pub fn is_cancelled(&self) -> bool {
        match self {
            SolveError::Cancelled => true,
            SolveError::ContentKey { source, .. }
            | SolveError::Lookup { source, .. }
            | SolveError::Execute { source, .. }
            | SolveError::Record { source, .. } => source.is_cancelled(),
            _ => false,
        }
    }

    /// The vertex the error is about, if it is about one.
    pub fn vertex(&self) -> Option<&VertexRef> {
        match self {
            SolveError::ContentKey { vertex, .. }
            | SolveError::Lookup { vertex, .. }
            | SolveError::Execute { vertex, .. }
            | SolveError::Record { vertex, .. }
            | SolveError::Panicked { vertex, .. }
            | SolveError::Stalled { vertex }
            | SolveError::BadContentInput { vertex, .. } => Some(vertex),
            SolveError::MissingVertex { referenced_by, .. } => referenced_by.as_deref(),
            SolveError::Cancelled | SolveError::Op(_) => None,
        }
    }
}

/// Runs what `roots` need and returns their results, in the order of `roots`.
///
/// Vertices not reachable from `roots` never run; shared vertices run once. Returns the first
/// failure, or [`SolveError::Cancelled`] when `cancel` fires, only after every started task
/// (including ops cleaning up after cancellation) has finished.
pub async fn solve<E: Executor>(
    graph: &Graph,
    roots: &[Digest],
    exec: Arc<E>,
    opts: SolveOptions,
    progress: ProgressSink,
    cancel: CancelToken,
) -> Result<Vec<Resolved<E::Output>>, SolveError> {
    let mut run = Run::new(graph, roots, exec, &opts, progress)?;
    if cancel.is_cancelled() {
        return Err(SolveError::Cancelled);
    }
    run.drive(&cancel).await?;
    run.exec.finish().await?;
    roots
        .iter()
        .map(|r| {
            let i = run.node(r)?;
            match &run.nodes[i].output {
                Some(out) => Ok(out.clone()),
                None => Err(SolveError::Stalled {
                    vertex: Box::new(run.vref(i)),
                }),
            }
        })
        .collect()
}

enum KeyState {
    Waiting,
    Computing,
    Done {
        key: CacheKey,
        content: Option<CacheKey>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LookupState {
    NotStarted,
    Running,
    Hit,
    Miss,
    Skipped,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ExecState {
    Idle,
    /// Inputs' outputs have been demanded.
    Waiting,
    Running,
    Done,
}

struct Node<O> {
    digest: Digest,
    vertex: Arc<Vertex>,
    /// Node indices, one per `vertex.inputs` entry.
    inputs: Vec<usize>,
    /// Per input position: read by content.
    by_content: Vec<bool>,
    /// Per input position: its output is needed before this vertex's key (content inputs and
    /// inputs that ignore the cache).
    key_needs_output: Vec<bool>,
    want_key: bool,
    want_output: bool,
    key: KeyState,
    lookup: LookupState,
    exec: ExecState,
    output: Option<Resolved<O>>,
}

enum Done<O> {
    Key(Result<Option<CacheKey>, SolveError>),
    Lookup(Result<Option<O>, SolveError>),
    Exec {
        started: bool,
        duration: Duration,
        result: Result<O, SolveError>,
    },
}

struct Run<E: Executor> {
    nodes: Vec<Node<E::Output>>,
    index: HashMap<Digest, usize>,
    exec: Arc<E>,
    progress: ProgressSink,
    slots: Arc<Semaphore>,
    /// Cancelled on the first failure or when the caller cancels; what ops see.
    cancel: CancelToken,
    tasks: JoinSet<(usize, Done<E::Output>)>,
    task_info: HashMap<tokio::task::Id, (usize, Step)>,
    failure: Option<SolveError>,
}

impl<E: Executor> Run<E> {
    fn new(
        graph: &Graph,
        roots: &[Digest],
        exec: Arc<E>,
        opts: &SolveOptions,
        progress: ProgressSink,
    ) -> Result<Run<E>, SolveError> {
        let order = graph.topo_order(roots);
        let mut index = HashMap::with_capacity(order.len());
        let mut nodes: Vec<Node<E::Output>> = Vec::with_capacity(order.len());
        for d in order {
            let Some(v) = graph.get(&d) else {
                let referenced_by = graph
                    .vertices
                    .iter()
                    .find(|(_, v)| v.inputs.contains(&d))
                    .map(|(pd, pv)| Box::new(VertexRef::of(*pd, pv)));
                return Err(SolveError::MissingVertex {
                    digest: d,
                    referenced_by,
                });
            };
            let mut inputs = Vec::with_capacity(v.inputs.len());
            for input in &v.inputs {
                // Inputs come before their users in topological order; a missing index means a
                // cycle through this vertex.
                match index.get(input) {
                    Some(&i) => inputs.push(i),
                    None => {
                        return Err(SolveError::Stalled {
                            vertex: Box::new(VertexRef::of(d, v)),
                        })
                    }
                }
            }
            let mut by_content = vec![false; inputs.len()];
            for p in exec.content_inputs(v) {
                match by_content.get_mut(p) {
                    Some(slot) => *slot = true,
                    None => {
                        return Err(SolveError::BadContentInput {
                            vertex: Box::new(VertexRef::of(d, v)),
                            index: p,
                            inputs: inputs.len(),
                        })
                    }
                }
            }
            let key_needs_output = inputs
                .iter()
                .zip(&by_content)
                .map(|(&inp, &c)| {
                    c || nodes
                        .get(inp)
                        .is_some_and(|n: &Node<E::Output>| n.vertex.meta.ignore_cache)
                })
                .collect();
            index.insert(d, nodes.len());
            nodes.push(Node {
                digest: d,
                vertex: Arc::new(v.clone()),
                inputs,
                by_content,
                key_needs_output,
                want_key: false,
                want_output: false,
                key: KeyState::Waiting,
                lookup: LookupState::NotStarted,
                exec: ExecState::Idle,
                output: None,
            });
        }
        let jobs = if opts.jobs == 0 { default_jobs() } else { opts.jobs };
        let mut run = Run {
            nodes,
            index,
            exec,
            progress,
            slots: Arc::new(Semaphore::new(jobs)),
            cancel: CancelToken::new(),
            tasks: JoinSet::new(),
            task_info: HashMap::new(),
            failure: None,
        };
        for r in roots {
            let i = run.node(r)?;
            run.want(i, true);
        }
        Ok(run)
    }

    fn node(&self, d: &Digest) -> Result<usize, SolveError> {
        self.index.get(d).copied().ok_or(SolveError::MissingVertex {
            digest: *d,
            referenced_by: None,
        })
    }

    fn vref(&self, i: usize) -> VertexRef {
        VertexRef::of(self.nodes[i].digest, &self.nodes[i].vertex)
    }

    /// Marks node `start`'s key (and output, if `output`) as needed, and what that needs in turn.
    fn want(&mut self, start: usize, output: bool) {
        let mut stack = vec![(start, output)];
        while let Some((i, output)) = stack.pop() {
            let n = &mut self.nodes[i];
            if output {
                if n.want_output {
                    continue;
                }
                n.want_output = true;
            }
            if n.want_key {
                continue;
            }
            n.want_key = true;
            stack.extend(
                n.inputs
                    .iter()
                    .zip(&n.key_needs_output)
                    .map(|(&inp, &o)| (inp, o)),
            );
        }
    }

    /// Runs tasks until everything needed is resolved, a failure happened or `user` cancelled.
    async fn drive(&mut self, user: &CancelToken) -> Result<(), SolveError> {
        self.advance();
        let mut user_cancelled = false;
        while !self.tasks.is_empty() {
            tokio::select! {
                biased;
                _ = user.cancelled(), if !user_cancelled => {
                    user_cancelled = true;
                    self.cancel.cancel();
                }
                joined = self.tasks.join_next_with_id() => {
                    let Some(joined) = joined else { break };
                    match joined {
                        Ok((id, (i, done))) => {
                            self.task_info.remove(&id);
                            self.finish(i, done);
                        }
                        Err(e) => {
                            if let Some((i, step)) = self.task_info.remove(&e.id()) {
                                let err = SolveError::Panicked { vertex: Box::new(self.vref(i)), step };
                                self.fail(i, err, Duration::ZERO);
                            }
                        }
                    }
                    if !self.cancel.is_cancelled() {
                        self.advance();
                    }
                }
            }
        }
        match self.failure.take() {
            Some(e) => Err(e),
            None if user_cancelled || user.is_cancelled() => Err(SolveError::Cancelled),
            None => Ok(()),
        }
    }

    /// Records a failure: the first real one is kept and cancels the solve.
    fn fail(&mut self, i: usize, err: SolveError, duration: Duration) {
        if self.cancel.is_cancelled() || err.is_cancelled() {
            return;
        }
        let vertex = self.nodes[i].digest;
        // The renderer already names the vertex: the event carries the cause.
        let cause = match std::error::Error::source(&err) {
            Some(source) if err.vertex().is_some() => error_chain(source),
            _ => error_chain(&err),
        };
        self.progress.send(EventKind::Failed {
            vertex,
            duration,
            error: cause,
        });
        self.failure = Some(err);
        self.cancel.cancel();
    }

    fn finish(&mut self, i: usize, done: Done<E::Output>) {
        match done {
            Done::Key(Ok(content)) => {
                let n = &self.nodes[i];
                let keys: Vec<CacheKey> = n
                    .inputs
                    .iter()
                    .zip(&n.by_content)
                    .filter(|(_, &c)| !c)
                    .filter_map(|(&inp, _)| match &self.nodes[inp].key {
                        KeyState::Done { key, .. } => Some(*key),
                        _ => None,
                    })
                    .collect();
                let identity = self.exec.key_identity(&n.vertex, &n.digest);
                let key = cachekey::compute(&identity, &keys, content.as_ref());
                tracing::debug!(vertex = %n.digest, %key, "cache key");
                self.nodes[i].key = KeyState::Done { key, content };
            }
            Done::Key(Err(e)) => {
                let err = SolveError::ContentKey {
                    vertex: Box::new(self.vref(i)),
                    source: Box::new(e),
                };
                self.fail(i, err, Duration::ZERO);
            }
            Done::Lookup(Ok(Some(output))) => {
                let n = &mut self.nodes[i];
                let KeyState::Done { key, .. } = n.key else { return };
                n.lookup = LookupState::Hit;
                n.output = Some(Resolved {
                    key,
                    output,
                    cached: true,
                });
                let name = display_name(&n.vertex);
                self.progress.send(EventKind::Cached {
                    vertex: n.digest,
                    name,
                });
            }
            Done::Lookup(Ok(None)) => self.nodes[i].lookup = LookupState::Miss,
            Done::Lookup(Err(e)) => {
                let err = SolveError::Lookup {
                    vertex: Box::new(self.vref(i)),
                    source: Box::new(e),
                };
                self.fail(i, err, Duration::ZERO);
            }
            Done::Exec {
                started,
                duration,
                result,
            } => {
                let n = &mut self.nodes[i];
                n.exec = ExecState::Done;
                match result {
                    Ok(output) => {
                        let KeyState::Done { key, .. } = n.key else { return };
                        n.output = Some(Resolved {
                            key,
                            output,
                            cached: false,
                        });
                        self.progress.send(EventKind::Completed {
                            vertex: n.digest,
                            duration,
                        });
                    }
                    Err(e) if e.is_cancelled() || self.cancel.is_cancelled() => {
                        if started {
                            self.progress.send(EventKind::Cancelled { vertex: n.digest });
                        }
                    }
                    Err(e) => self.fail(i, e, duration),
                }
            }
        }
    }

    /// Starts every step that has become possible, until nothing changes.
    fn advance(&mut self) {
        loop {
            let mut changed = false;
            for i in 0..self.nodes.len() {
                changed |= self.advance_node(i);
            }
            if !changed {
                break;
            }
        }
    }

    fn advance_node(&mut self, i: usize) -> bool {
        let n = &self.nodes[i];
        if !n.want_key {
            return false;
        }
        match n.key {
            KeyState::Computing => false,
            KeyState::Waiting => {
                let ready = n.inputs.iter().zip(&n.key_needs_output).all(|(&inp, &o)| {
                    let input = &self.nodes[inp];
                    if o {
                        input.output.is_some()
                    } else {
                        matches!(input.key, KeyState::Done { .. })
                    }
                });
                if ready {
                    self.spawn_key(i);
                }
                ready
            }
            KeyState::Done { key, .. } => match n.lookup {
                LookupState::NotStarted if n.vertex.meta.ignore_cache => {
                    self.nodes[i].lookup = LookupState::Skipped;
                    true
                }
                LookupState::NotStarted => {
                    self.spawn_lookup(i, key);
                    true
                }
                LookupState::Miss | LookupState::Skipped if n.want_output => match n.exec {
                    ExecState::Idle => {
                        self.nodes[i].exec = ExecState::Waiting;
                        for inp in self.nodes[i].inputs.clone() {
                            self.want(inp, true);
                        }
                        true
                    }
                    ExecState::Waiting if n.inputs.iter().all(|&inp| self.nodes[inp].output.is_some()) => {
                        self.spawn_exec(i, key);
                        true
                    }
                    _ => false,
                },
                _ => false,
            },
        }
    }

    fn spawn_key(&mut self, i: usize) {
        let n = &self.nodes[i];
        let vertex = n.vertex.clone();
        let inputs: Vec<Resolved<E::Output>> = n
            .inputs
            .iter()
            .zip(&n.by_content)
            .filter(|(_, &c)| c)
            .filter_map(|(&inp, _)| self.nodes[inp].output.clone())
            .collect();
        self.nodes[i].key = KeyState::Computing;
        let exec = self.exec.clone();
        let handle = self.tasks.spawn(async move {
            let result = exec.content_key(&vertex, &inputs).await;
            (i, Done::Key(result))
        });
        self.task_info.insert(handle.id(), (i, Step::ContentKey));
    }

    fn spawn_lookup(&mut self, i: usize, key: CacheKey) {
        let n = &mut self.nodes[i];
        n.lookup = LookupState::Running;
        let vertex = n.vertex.clone();
        let exec = self.exec.clone();
        let handle = self.tasks.spawn(async move {
            let result = exec.lookup(&key, &vertex).await;
            (i, Done::Lookup(result))
        });
        self.task_info.insert(handle.id(), (i, Step::Lookup));
    }

    fn miss_reason(&self, i: usize, key: CacheKey) -> MissReason {
        let n = &self.nodes[i];
        if n.vertex.meta.ignore_cache {
            return MissReason::NoCache;
        }
        let rebuilt = n
            .inputs
            .iter()
            .zip(&n.by_content)
            .find(|(&inp, &c)| !c && self.nodes[inp].output.as_ref().is_some_and(|o| !o.cached));
        if let Some((&inp, _)) = rebuilt {
            let input = &self.nodes[inp];
            return MissReason::InputChanged {
                input: input.digest,
                name: display_name(&input.vertex),
            };
        }
        match &n.key {
            KeyState::Done {
                content: Some(content),
                ..
            } => MissReason::ContentChanged { content: *content },
            _ => MissReason::NotInCache { key },
        }
    }

    fn spawn_exec(&mut self, i: usize, key: CacheKey) {
        let reason = self.miss_reason(i, key);
        let n = &mut self.nodes[i];
        n.exec = ExecState::Running;
        let digest = n.digest;
        let vertex = n.vertex.clone();
        let name = display_name(&vertex);
        tracing::debug!(vertex = %digest, %name, %reason, "cache miss");
        self.progress.send(EventKind::CacheMiss {
            vertex: digest,
            name: name.clone(),
            reason,
        });
        let inputs: Vec<Resolved<E::Output>> = self.nodes[i]
            .inputs
            .iter()
            .filter_map(|&inp| self.nodes[inp].output.clone())
            .collect();
        let exec = self.exec.clone();
        let slots = self.slots.clone();
        let progress = self.progress.clone();
        let cancel = self.cancel.clone();
        let vref = self.vref(i);
        let handle = self.tasks.spawn(async move {
            let permit = tokio::select! {
                biased;
                _ = cancel.cancelled() => None,
                p = slots.acquire_owned() => p.ok(),
            };
            let Some(_permit) = permit.filter(|_| !cancel.is_cancelled()) else {
                let result = Err(SolveError::Cancelled);
                return (
                    i,
                    Done::Exec {
                        started: false,
                        duration: Duration::ZERO,
                        result,
                    },
                );
            };
            progress.send(EventKind::Started { vertex: digest, name });
            let start = Instant::now();
            let ctx = ExecCtx::new(progress.for_vertex(digest), cancel);
            let result = match exec.execute(&vertex, &inputs, &ctx).await {
                Ok(out) => match exec.record(&key, &vertex, &out).await {
                    Ok(()) => Ok(out),
                    Err(e) => Err(SolveError::Record {
                        vertex: Box::new(vref),
                        source: Box::new(e),
                    }),
                },
                Err(e) => Err(SolveError::Execute {
                    vertex: Box::new(vref),
                    source: Box::new(e),
                }),
            };
            (
                i,
                Done::Exec {
                    started: true,
                    duration: start.elapsed(),
                    result,
                },
            )
        });
        self.task_info.insert(handle.id(), (i, Step::Execute));
    }
}

/// The error and its sources, `: `-separated.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
