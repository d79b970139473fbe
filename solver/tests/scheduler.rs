//! Scheduler tests with a fake executor that counts calls: dedup, cache hits, laziness,
//! `ignore_cache`, content keys, parallelism, `jobs`, failure and cancellation.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_dag::{Digest, ExecOp, Graph, Meta, NetworkMode, Op, SecurityMode, Vertex};
use kiln_solver::cachekey::CacheKey;
use kiln_solver::progress::{self, Event, EventKind, MissReason, ProgressSink, Stream};
use kiln_solver::scheduler::{solve, CancelToken, ExecCtx, Executor, Resolved, SolveError, SolveOptions};

/// What a fake op does when executed.
#[derive(Clone, Copy, Debug)]
enum Behavior {
    Sleep(Duration),
    /// Fails after the delay.
    Fail(Duration),
    /// Runs until cancelled, then takes `cleanup` to clean up (and records that it did).
    UntilCancelled {
        cleanup: Duration,
    },
}

#[derive(Clone, Debug)]
struct Call {
    kind: &'static str,
    name: String,
    start: Instant,
    end: Instant,
}

#[derive(Default)]
struct Fake {
    /// The cache: key -> output.
    store: Mutex<HashMap<CacheKey, String>>,
    calls: Mutex<Vec<Call>>,
    behavior: HashMap<String, Behavior>,
    /// Content keys by vertex name (what the op would hash from the files it selects).
    content: Mutex<HashMap<String, CacheKey>>,
    content_inputs: HashMap<String, Vec<usize>>,
    /// What `content_key` was given, by vertex name.
    content_seen: Mutex<HashMap<String, Vec<String>>>,
    cleaned_up: Mutex<Vec<String>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
}

impl Fake {
    fn new() -> Fake {
        Fake::default()
    }

    fn with(mut self, name: &str, b: Behavior) -> Fake {
        self.behavior.insert(name.into(), b);
        self
    }

    fn push(&self, kind: &'static str, v: &Vertex, start: Instant) {
        let call = Call {
            kind,
            name: v.meta.name.clone(),
            start,
            end: Instant::now(),
        };
        self.calls.lock().unwrap().push(call);
    }

    fn names(&self, kind: &str) -> Vec<String> {
        let mut n: Vec<String> = self
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| c.name.clone())
            .collect();
        n.sort();
        n
    }

    fn call(&self, kind: &str, name: &str) -> Call {
        let calls = self.calls.lock().unwrap();
        let mut found = calls.iter().filter(|c| c.kind == kind && c.name == name);
        let c = found
            .next()
            .unwrap_or_else(|| panic!("no {kind} call for {name}"));
        assert!(found.next().is_none(), "{kind} called twice for {name}");
        c.clone()
    }

    fn reset_calls(&self) {
        self.calls.lock().unwrap().clear();
    }
}

impl Executor for Fake {
    type Output = String;

    fn content_inputs(&self, v: &Vertex) -> Vec<usize> {
        self.content_inputs.get(&v.meta.name).cloned().unwrap_or_default()
    }

    async fn content_key(
        &self,
        v: &Vertex,
        inputs: &[Resolved<String>],
    ) -> Result<Option<CacheKey>, SolveError> {
        let start = Instant::now();
        let seen = inputs.iter().map(|r| r.output.clone()).collect();
        self.content_seen
            .lock()
            .unwrap()
            .insert(v.meta.name.clone(), seen);
        let key = self.content.lock().unwrap().get(&v.meta.name).copied();
        self.push("content_key", v, start);
        Ok(key)
    }

    async fn lookup(&self, key: &CacheKey, v: &Vertex) -> Result<Option<String>, SolveError> {
        let start = Instant::now();
        let hit = self.store.lock().unwrap().get(key).cloned();
        self.push("lookup", v, start);
        Ok(hit)
    }

    async fn execute(
        &self,
        v: &Vertex,
        inputs: &[Resolved<String>],
        ctx: &ExecCtx,
    ) -> Result<String, SolveError> {
        let start = Instant::now();
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        ctx.log(Stream::Stdout, format!("running {}\n", v.meta.name));
        let result = match self.behavior.get(&v.meta.name).copied() {
            None => Ok(()),
            Some(Behavior::Sleep(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(Behavior::Fail(d)) => {
                tokio::time::sleep(d).await;
                Err(SolveError::op(std::io::Error::other("boom")))
            }
            Some(Behavior::UntilCancelled { cleanup }) => {
                tokio::select! {
                    _ = ctx.cancel().cancelled() => {
                        tokio::time::sleep(cleanup).await;
                        self.cleaned_up.lock().unwrap().push(v.meta.name.clone());
                        Err(SolveError::Cancelled)
                    }
                    _ = tokio::time::sleep(Duration::from_secs(30)) => Ok(()),
                }
            }
        };
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.push("execute", v, start);
        result?;
        let ins: Vec<&str> = inputs.iter().map(|r| r.output.as_str()).collect();
        Ok(format!("{}({})", v.meta.name, ins.join(",")))
    }

    async fn record(&self, key: &CacheKey, v: &Vertex, out: &String) -> Result<(), SolveError> {
        let start = Instant::now();
        self.store.lock().unwrap().insert(*key, out.clone());
        self.push("record", v, start);
        Ok(())
    }
}

fn add(g: &mut Graph, name: &str, inputs: &[Digest]) -> Digest {
    add_meta(g, name, inputs, false)
}

fn add_meta(g: &mut Graph, name: &str, inputs: &[Digest], ignore_cache: bool) -> Digest {
    g.add(Vertex {
        op: Op::Exec(ExecOp {
            args: vec!["/bin/sh".into(), "-c".into(), name.into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
            network: NetworkMode::Default,
            security: SecurityMode::Sandbox,
            mounts: vec![],
            hostname: None,
            extra_hosts: vec![],
            shm_size: None,
            ulimits: vec![],
            platform: None,
        }),
        inputs: inputs.to_vec(),
        meta: Meta {
            name: name.into(),
            ignore_cache,
            ..Meta::default()
        },
    })
}

/// a -> b, a -> c, (b, c) -> d
fn diamond(g: &mut Graph) -> [Digest; 4] {
    let a = add(g, "a", &[]);
    let b = add(g, "b", &[a]);
    let c = add(g, "c", &[a]);
    let d = add(g, "d", &[b, c]);
    [a, b, c, d]
}

async fn run(
    g: &Graph,
    roots: &[Digest],
    fake: &Arc<Fake>,
    jobs: usize,
) -> (Result<Vec<Resolved<String>>, SolveError>, Vec<Event>) {
    run_with(g, roots, fake, jobs, CancelToken::new()).await
}

async fn run_with(
    g: &Graph,
    roots: &[Digest],
    fake: &Arc<Fake>,
    jobs: usize,
    cancel: CancelToken,
) -> (Result<Vec<Resolved<String>>, SolveError>, Vec<Event>) {
    let (sink, mut rx) = progress::channel();
    let result = solve(g, roots, fake.clone(), SolveOptions { jobs }, sink, cancel).await;
    let mut events = Vec::new();
    while let Some(e) = rx.try_recv() {
        events.push(e);
    }
    (result, events)
}

fn cached_names(events: &[Event]) -> Vec<String> {
    let mut n: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Cached { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    n.sort();
    n
}

fn miss_reasons(events: &[Event]) -> HashMap<String, MissReason> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::CacheMiss { name, reason, .. } => Some((name.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_input_runs_once_and_results_follow_roots() {
    let mut g = Graph::default();
    let [a, b, _c, d] = diamond(&mut g);
    let fake = Arc::new(Fake::new());
    let (res, events) = run(&g, &[d, d, b], &fake, 4).await;
    let res = res.unwrap();
    assert_eq!(fake.names("execute"), strs(&["a", "b", "c", "d"]));
    assert_eq!(fake.names("record"), strs(&["a", "b", "c", "d"]));
    assert_eq!(fake.names("lookup"), strs(&["a", "b", "c", "d"]));
    assert_eq!(fake.names("content_key"), strs(&["a", "b", "c", "d"]));
    let outs: Vec<&str> = res.iter().map(|r| r.output.as_str()).collect();
    assert_eq!(outs, ["d(b(a()),c(a()))", "d(b(a()),c(a()))", "b(a())"]);
    assert!(res.iter().all(|r| !r.cached));
    // Every execution started after its inputs finished.
    assert!(fake.call("execute", "a").end <= fake.call("execute", "b").start);
    assert!(fake.call("execute", "c").end <= fake.call("execute", "d").start);
    // Progress: one start and one completion per vertex, and the op's log line.
    let started = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Started { .. }))
        .count();
    let completed = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Completed { .. }))
        .count();
    assert_eq!((started, completed), (4, 4));
    assert!(events.iter().any(|e| e.kind
        == EventKind::Log {
            vertex: a,
            stream: Stream::Stdout,
            data: b"running a\n".to_vec()
        }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_vertices_never_run() {
    let mut g = Graph::default();
    let [a, _b, _c, d] = diamond(&mut g);
    let _x = add(&mut g, "x", &[a]);
    let _y = add(&mut g, "y", &[d]);
    let fake = Arc::new(Fake::new());
    run(&g, &[d], &fake, 4).await.0.unwrap();
    let all = fake.calls.lock().unwrap().clone();
    assert!(all.iter().all(|c| c.name != "x" && c.name != "y"), "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_hit_skips_execute_and_a_cached_graph_executes_nothing() {
    let mut g = Graph::default();
    let [a, b, _c, d] = diamond(&mut g);
    let fake = Arc::new(Fake::new());
    let first = run(&g, &[d], &fake, 4).await.0.unwrap();

    fake.reset_calls();
    let (res, events) = run(&g, &[d], &fake, 4).await;
    let res = res.unwrap();
    assert!(fake.names("execute").is_empty());
    assert!(fake.names("record").is_empty());
    assert_eq!(
        res,
        vec![Resolved {
            cached: true,
            ..first[0].clone()
        }]
    );
    assert_eq!(cached_names(&events), strs(&["a", "b", "c", "d"]));

    // Evict the inputs: their keys are still computable without their outputs, so the root still
    // hits and nothing runs.
    let key_of = |name: &str| {
        let out = match name {
            "a" => "a()",
            _ => "b(a())",
        };
        *fake
            .store
            .lock()
            .unwrap()
            .iter()
            .find(|(_, v)| v.as_str() == out)
            .unwrap()
            .0
    };
    let (ka, kb) = (key_of("a"), key_of("b"));
    fake.store.lock().unwrap().retain(|k, _| *k != ka && *k != kb);
    fake.reset_calls();
    let (res, events) = run(&g, &[d], &fake, 4).await;
    assert!(res.unwrap()[0].cached);
    assert!(fake.names("execute").is_empty());
    assert_eq!(cached_names(&events), strs(&["c", "d"]));

    // But asking for b itself now runs a and b (their results are gone) and nothing else.
    fake.reset_calls();
    let (res, events) = run(&g, &[b, a], &fake, 4).await;
    let res = res.unwrap();
    assert_eq!(fake.names("execute"), strs(&["a", "b"]));
    assert_eq!(res[0].key, kb, "same inputs, same key");
    let reasons = miss_reasons(&events);
    assert_eq!(reasons["a"], MissReason::NotInCache { key: ka });
    assert_eq!(
        reasons["b"],
        MissReason::InputChanged {
            input: a,
            name: "a".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_vertex_reruns_it_and_its_users_with_reasons() {
    let fake = Arc::new(Fake::new());
    let mut g1 = Graph::default();
    let [a, _, _, d1] = diamond(&mut g1);
    run(&g1, &[d1], &fake, 4).await.0.unwrap();

    // Change c: c2 and d run again; a and b come from the cache.
    let mut g2 = Graph::default();
    let a2 = add(&mut g2, "a", &[]);
    assert_eq!(a2, a);
    let b2 = add(&mut g2, "b", &[a2]);
    let c2 = add(&mut g2, "c2", &[a2]);
    let d2 = add(&mut g2, "d", &[b2, c2]);
    fake.reset_calls();
    let (res, events) = run(&g2, &[d2], &fake, 4).await;
    assert_eq!(res.unwrap()[0].output, "d(b(a()),c2(a()))");
    assert_eq!(fake.names("execute"), strs(&["c2", "d"]));
    assert_eq!(cached_names(&events), strs(&["a", "b"]));
    let reasons = miss_reasons(&events);
    assert_eq!(reasons.len(), 2);
    assert!(
        matches!(reasons["c2"], MissReason::NotInCache { .. }),
        "{reasons:?}"
    );
    assert_eq!(
        reasons["d"],
        MissReason::InputChanged {
            input: c2,
            name: "c2".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ignore_cache_skips_the_lookup_but_still_records() {
    let fake = Arc::new(Fake::new());
    let mut g = Graph::default();
    let [_, _, _, d] = diamond(&mut g);
    let first = run(&g, &[d], &fake, 4).await.0.unwrap();

    // --no-cache-filter on b: same digests, b must run again (and be recorded); d keeps its key
    // and is served from the cache once b has run; a is only looked up.
    let mut g2 = Graph::default();
    let a = add(&mut g2, "a", &[]);
    let b = add_meta(&mut g2, "b", &[a], true);
    let c = add(&mut g2, "c", &[a]);
    let d2 = add(&mut g2, "d", &[b, c]);
    assert_eq!(d2, d);
    fake.reset_calls();
    let (res, events) = run(&g2, &[d2], &fake, 4).await;
    let res = res.unwrap();
    assert_eq!(fake.names("execute"), strs(&["b"]));
    assert_eq!(fake.names("record"), strs(&["b"]));
    assert!(!fake.names("lookup").contains(&"b".to_string()));
    assert_eq!(res[0].key, first[0].key);
    assert!(res[0].cached);
    assert_eq!(miss_reasons(&events)["b"], MissReason::NoCache);
    assert!(fake.call("execute", "b").end <= fake.call("lookup", "d").start);

    // --no-cache: everything runs, nothing is looked up, everything is recorded.
    let mut g3 = Graph::default();
    let a = add_meta(&mut g3, "a", &[], true);
    let b = add_meta(&mut g3, "b", &[a], true);
    let c = add_meta(&mut g3, "c", &[a], true);
    let d3 = add_meta(&mut g3, "d", &[b, c], true);
    fake.reset_calls();
    let (res, events) = run(&g3, &[d3], &fake, 4).await;
    assert_eq!(res.unwrap()[0].key, first[0].key);
    assert_eq!(fake.names("execute"), strs(&["a", "b", "c", "d"]));
    assert_eq!(fake.names("record"), strs(&["a", "b", "c", "d"]));
    assert!(fake.names("lookup").is_empty());
    assert!(miss_reasons(&events).values().all(|r| *r == MissReason::NoCache));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn content_keys_change_the_key_and_replace_the_content_input() {
    // base; ctx (a local source keyed by the whole context); copy = COPY from ctx onto base,
    // keyed by the files it selects.
    let mut g = Graph::default();
    let base = add(&mut g, "base", &[]);
    let ctx = add(&mut g, "ctx", &[]);
    let copy = add(&mut g, "copy", &[base, ctx]);
    let mut fake = Fake::new();
    fake.content_inputs.insert("copy".into(), vec![1]);
    let fake = Arc::new(fake);
    let set = |name: &str, k: &[u8]| {
        fake.content.lock().unwrap().insert(name.into(), CacheKey::of(k));
    };
    set("ctx", b"whole context v1");
    set("copy", b"selected files v1");
    let first = run(&g, &[copy], &fake, 4).await.0.unwrap();
    assert_eq!(fake.names("execute"), strs(&["base", "copy", "ctx"]));
    assert_eq!(fake.content_seen.lock().unwrap()["copy"], strs(&["ctx()"]));

    // An unrelated file changed: ctx's key changes (it is re-read), copy's selection did not, so
    // copy is a cache hit with the same key.
    set("ctx", b"whole context v2");
    fake.reset_calls();
    let (res, events) = run(&g, &[copy], &fake, 4).await;
    let res = res.unwrap();
    assert_eq!(fake.names("execute"), strs(&["ctx"]));
    assert!(res[0].cached);
    assert_eq!(res[0].key, first[0].key);
    assert_eq!(miss_reasons(&events).len(), 1);

    // A selected file changed: copy's key changes and it runs again, saying why.
    set("copy", b"selected files v2");
    fake.reset_calls();
    let (res, events) = run(&g, &[copy], &fake, 4).await;
    let res = res.unwrap();
    assert_eq!(fake.names("execute"), strs(&["copy"]));
    assert_ne!(res[0].key, first[0].key);
    assert_eq!(
        miss_reasons(&events)["copy"],
        MissReason::ContentChanged {
            content: CacheKey::of(b"selected files v2")
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_content_input_is_an_error() {
    let mut g = Graph::default();
    let copy = add(&mut g, "copy", &[]);
    let mut fake = Fake::new();
    fake.content_inputs.insert("copy".into(), vec![3]);
    let fake = Arc::new(fake);
    let err = run(&g, &[copy], &fake, 1).await.0.unwrap_err();
    assert!(
        matches!(
            err,
            SolveError::BadContentInput {
                index: 3,
                inputs: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(fake.calls.lock().unwrap().is_empty());
}

fn two_branches(g: &mut Graph, delay: Duration) -> (Digest, Fake) {
    let x = add(g, "x", &[]);
    let y = add(g, "y", &[]);
    let m = add(g, "m", &[x, y]);
    let fake = Fake::new()
        .with("x", Behavior::Sleep(delay))
        .with("y", Behavior::Sleep(delay));
    (m, fake)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn independent_branches_run_concurrently() {
    let mut g = Graph::default();
    let (m, fake) = two_branches(&mut g, Duration::from_millis(300));
    let fake = Arc::new(fake);
    run(&g, &[m], &fake, 2).await.0.unwrap();
    let (x, y) = (fake.call("execute", "x"), fake.call("execute", "y"));
    assert!(x.start < y.end && y.start < x.end, "x and y did not overlap");
    assert_eq!(fake.max_running.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_bound_concurrent_executions() {
    let mut g = Graph::default();
    let (m, fake) = two_branches(&mut g, Duration::from_millis(100));
    let fake = Arc::new(fake);
    run(&g, &[m], &fake, 1).await.0.unwrap();
    let (x, y) = (fake.call("execute", "x"), fake.call("execute", "y"));
    assert!(
        x.end <= y.start || y.end <= x.start,
        "x and y overlapped with jobs=1"
    );
    assert_eq!(fake.max_running.load(Ordering::SeqCst), 1);

    // Eight independent sleepers with jobs=3: never more than three at once, but three at once.
    let mut g = Graph::default();
    let mut fake = Fake::new();
    let leaves: Vec<Digest> = (0..8)
        .map(|i| {
            let name = format!("leaf{i}");
            fake.behavior
                .insert(name.clone(), Behavior::Sleep(Duration::from_millis(80)));
            add(&mut g, &name, &[])
        })
        .collect();
    let top = add(&mut g, "top", &leaves);
    let fake = Arc::new(fake);
    run(&g, &[top], &fake, 3).await.0.unwrap();
    assert_eq!(fake.max_running.load(Ordering::SeqCst), 3);
    assert_eq!(fake.names("execute").len(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_failure_cancels_the_others_and_waits_for_their_cleanup() {
    let mut g = Graph::default();
    let f = add(&mut g, "f", &[]);
    let w = add(&mut g, "w", &[]);
    let w2 = add(&mut g, "w2", &[]);
    let after = add(&mut g, "after", &[w]);
    let m = add(&mut g, "m", &[f, after, w2]);
    let fake = Arc::new(
        Fake::new()
            .with("f", Behavior::Fail(Duration::from_millis(100)))
            .with(
                "w",
                Behavior::UntilCancelled {
                    cleanup: Duration::from_millis(300),
                },
            )
            .with("w2", Behavior::Fail(Duration::from_millis(200))),
    );
    let t = Instant::now();
    let (res, events) = run(&g, &[m], &fake, 4).await;
    let err = res.unwrap_err();
    // Cleanup finished before solve returned.
    assert_eq!(*fake.cleaned_up.lock().unwrap(), strs(&["w"]));
    assert!(t.elapsed() >= Duration::from_millis(400));
    // The first real failure is reported, with the vertex that failed.
    let vertex = err.vertex().expect("error names a vertex");
    assert_eq!((vertex.digest, vertex.name.as_str()), (f, "f"));
    assert!(matches!(err, SolveError::Execute { .. }), "{err:?}");
    let source = std::error::Error::source(&err).expect("cause").to_string();
    assert_eq!(source, "boom");
    assert_eq!(err.to_string(), "failed to run `f`");
    // Nothing downstream ran; w2 was cancelled too (it would have failed later).
    assert!(!fake.names("execute").contains(&"after".to_string()));
    assert!(!fake.names("execute").contains(&"m".to_string()));
    let failed: Vec<Digest> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Failed { vertex, error, .. } => {
                assert_eq!(error, "boom");
                Some(*vertex)
            }
            _ => None,
        })
        .collect();
    assert_eq!(failed, vec![f]);
    assert!(events
        .iter()
        .any(|e| e.kind == EventKind::Cancelled { vertex: w }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_cancel_stops_running_ops_and_waits_for_them() {
    let mut g = Graph::default();
    let w = add(&mut g, "w", &[]);
    let queued = add(&mut g, "queued", &[]);
    let m = add(&mut g, "m", &[w, queued]);
    let fake = Arc::new(
        Fake::new()
            .with(
                "w",
                Behavior::UntilCancelled {
                    cleanup: Duration::from_millis(200),
                },
            )
            .with(
                "queued",
                Behavior::UntilCancelled {
                    cleanup: Duration::from_millis(200),
                },
            ),
    );
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c2.cancel();
    });
    // jobs=1: one of the two waits for a slot and must not start once cancelled.
    let (res, _events) = run_with(&g, &[m], &fake, 1, cancel).await;
    assert!(matches!(res, Err(SolveError::Cancelled)), "{res:?}");
    assert_eq!(fake.cleaned_up.lock().unwrap().len(), 1);
    assert_eq!(fake.names("execute").len(), 1);

    // Already cancelled: nothing runs at all.
    let cancel = CancelToken::new();
    cancel.cancel();
    fake.reset_calls();
    let (res, _) = run_with(&g, &[m], &fake, 1, cancel).await;
    assert!(matches!(res, Err(SolveError::Cancelled)));
    assert!(fake.calls.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_vertex_runs_twice_in_a_wide_shared_graph() {
    // 60 vertices, each reading two earlier ones (many shared inputs), several overlapping roots.
    let mut g = Graph::default();
    let mut all: Vec<Digest> = Vec::new();
    let mut fake = Fake::new();
    for i in 0..60usize {
        let inputs: Vec<Digest> = if i < 3 {
            vec![]
        } else {
            vec![all[(i * 7) % i], all[(i * 13 + 1) % i]]
        };
        let name = format!("v{i:02}");
        fake.behavior.insert(
            name.clone(),
            Behavior::Sleep(Duration::from_millis((i % 4) as u64 * 3)),
        );
        all.push(add(&mut g, &name, &inputs));
    }
    let roots = [all[59], all[40], all[59], all[20]];
    let expected: std::collections::BTreeSet<String> = g
        .topo_order(&roots)
        .iter()
        .map(|d| g.get(d).unwrap().meta.name.clone())
        .collect();
    let fake = Arc::new(fake);
    run(&g, &roots, &fake, 3).await.0.unwrap();
    let executed = fake.names("execute");
    let unique: std::collections::BTreeSet<String> = executed.iter().cloned().collect();
    assert_eq!(executed.len(), unique.len(), "a vertex ran twice");
    assert_eq!(unique, expected);
    // Each ran after all its inputs finished.
    for d in g.topo_order(&roots) {
        let v = g.get(&d).unwrap();
        let me = fake.call("execute", &v.meta.name);
        for input in &v.inputs {
            let dep = fake.call("execute", &g.get(input).unwrap().meta.name);
            assert!(
                dep.end <= me.start,
                "{} started before {} finished",
                v.meta.name,
                dep.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_root_is_an_error() {
    let g = Graph::default();
    let fake = Arc::new(Fake::new());
    let missing = Digest::of(b"nope");
    let err = run(&g, &[missing], &fake, 1).await.0.unwrap_err();
    assert!(matches!(err, SolveError::MissingVertex { digest, .. } if digest == missing));
    let _ = ProgressSink::discard();
}
