//! The harness: a private mount namespace for the whole binary, a temp store per test with the
//! busybox base, a counting progress receiver, and a tiny runner (`cargo test -p kiln-build
//! --test api [FILTER...]`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use kiln_build::{BuildError, BuildRequest, BuildResult, CancelToken, ContextSource};
use kiln_cache::Store;
use kiln_solver::progress::{self, EventKind};

/// A temp directory with a store root (busybox imported as `busybox:local`) and scratch space.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: Arc<Store>,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("kiln-build-api-")
            .tempdir()
            .expect("temp dir");
        let store = Arc::new(Store::open(&dir.path().join("root")).expect("open the store"));
        let tar = std::fs::File::open(busybox_tar()).expect("open the busybox tar");
        let opts = kiln_cache::archive::import::ImportOptions {
            message: None,
            reference: Some(kiln_cache::reference::Reference::parse("busybox:local").expect("reference")),
            config: Default::default(),
            platform: None,
        };
        kiln_cache::archive::import::import_rootfs(&store, tar, "busybox", &opts).expect("import busybox");
        Env { dir, store }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A context directory `rel` with these files.
    pub fn context(&self, rel: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.path(rel);
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, text).expect("write");
        }
        dir
    }

    /// Builds `req`, counting the progress events by kind.
    pub fn build(&self, req: BuildRequest) -> (Result<BuildResult, BuildError>, Counts) {
        self.build_with(req, CancelToken::new())
    }

    pub fn build_with(
        &self,
        req: BuildRequest,
        cancel: CancelToken,
    ) -> (Result<BuildResult, BuildError>, Counts) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio");
        let (sink, mut rx) = progress::channel();
        let store = self.store.clone();
        rt.block_on(async move {
            let counter = tokio::spawn(async move {
                let mut c = Counts::default();
                while let Some(ev) = rx.recv().await {
                    c.add(&ev.kind);
                }
                c
            });
            let result = kiln_build::build(store, req, sink, cancel).await;
            // Every sink is gone once the build returned, so the counter ends.
            let counts = counter.await.expect("the counting task");
            (result, counts)
        })
    }
}

/// A request for a local context directory, registry lookups failing fast.
pub fn request(ctx: &Path) -> BuildRequest {
    let mut req = BuildRequest::new(ContextSource::Dir(ctx.to_path_buf()));
    req.registry.attempts = 1;
    req
}

/// Progress events of one build, by kind; log bytes and warnings kept.
#[derive(Debug, Default)]
pub struct Counts {
    pub by_kind: BTreeMap<&'static str, usize>,
    pub logs: String,
    pub warnings: Vec<String>,
    /// Names of the vertices that started executing.
    pub started: Vec<String>,
}

impl Counts {
    fn add(&mut self, kind: &EventKind) {
        let name = match kind {
            EventKind::Cached { .. } => "cached",
            EventKind::CacheMiss { .. } => "miss",
            EventKind::Started { name, .. } => {
                self.started.push(name.clone());
                "started"
            }
            EventKind::Completed { .. } => "completed",
            EventKind::Failed { .. } => "failed",
            EventKind::Cancelled { .. } => "cancelled",
            EventKind::Status { .. } => "status",
            EventKind::Log { data, .. } => {
                self.logs.push_str(&String::from_utf8_lossy(data));
                "log"
            }
            EventKind::Warning { message, .. } => {
                self.warnings.push(message.clone());
                "warning"
            }
        };
        *self.by_kind.entry(name).or_default() += 1;
    }

    pub fn get(&self, kind: &str) -> usize {
        self.by_kind.get(kind).copied().unwrap_or(0)
    }
}

/// A busybox rootfs tarball made once per run by testdata/make-busybox-rootfs.sh.
fn busybox_tar() -> PathBuf {
    TAR.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("kiln-build-busybox-{}.tar", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/make-busybox-rootfs.sh");
        let status = Command::new("bash")
            .arg(&script)
            .arg(&out)
            .status()
            .expect("run make-busybox-rootfs.sh");
        assert!(
            status.success(),
            "{} failed (needs busybox-static)",
            script.display()
        );
        out
    })
    .clone()
}

/// A test: its name and body.
pub type Test = (&'static str, fn());

/// Runs the tests whose names contain one of the non-flag arguments (all without any), each
/// catching its panic; exits non-zero if one failed.
pub fn run(tests: &[Test]) {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(u32::MAX);
    assert_eq!(
        uid, 0,
        "these tests need root (namespaces, overlayfs); run them as root as CI does"
    );
    // Before any thread exists: the kernel refuses unshare(CLONE_NEWNS) in a threaded process.
    kiln_runtime::host::enter_private_mount_namespace().expect("enter a private mount namespace");
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let chosen: Vec<&Test> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", chosen.len());
    let mut failed = Vec::new();
    for (name, f) in chosen {
        let outcome = std::panic::catch_unwind(f);
        println!(
            "test {name} ... {}",
            if outcome.is_ok() { "ok" } else { "FAILED" }
        );
        if outcome.is_err() {
            failed.push(*name);
        }
    }
    if let Some(tar) = TAR.get() {
        let _ = std::fs::remove_file(tar);
    }
    if !failed.is_empty() {
        println!("\nfailures: {failed:?}");
        std::process::exit(101);
    }
    println!("\ntest result: ok");
}

static TAR: OnceLock<PathBuf> = OnceLock::new();
