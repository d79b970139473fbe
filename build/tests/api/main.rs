//! `kiln_build::build` through its API: real builds (namespaces, overlayfs; needs root) of small
//! contexts, counted progress, outputs, typed errors.
#![allow(clippy::unwrap_used)]
#![allow(clippy::disallowed_methods, reason = "tests write fixtures as they please")]

mod harness;

use std::path::Path;
use std::sync::Arc;

use harness::{request, Env};
use kiln_build::output::{ArchiveOutput, Destination, ImageOutput};
use kiln_build::{BuildError, CancelToken, ContextSource, DockerfileSource, OutputSpec, RequestError};
use kiln_cache::reference::Reference;
use kiln_frontend::lower::{LowerError, ResolverError};

fn main() {
    harness::run(&[
        (
            "a_small_context_builds_with_counted_progress_and_outputs",
            a_small_context_builds_with_counted_progress_and_outputs,
        ),
        (
            "a_streamed_tar_or_dockerfile_is_a_context",
            a_streamed_tar_or_dockerfile_is_a_context,
        ),
        ("resolver_failures_are_typed", resolver_failures_are_typed),
        (
            "request_errors_come_before_anything_is_read",
            request_errors_come_before_anything_is_read,
        ),
        (
            "a_cancelled_build_stops_at_the_solve",
            a_cancelled_build_stops_at_the_solve,
        ),
        (
            "a_builds_mount_points_are_on_a_tmpfs_of_its_own",
            a_builds_mount_points_are_on_a_tmpfs_of_its_own,
        ),
    ]);
}

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

fn a_small_context_builds_with_counted_progress_and_outputs() {
    let env = Env::new();
    let ctx = env.context(
        "ctx",
        &[
            ("a.txt", "hello\n"),
            (
                "Dockerfile",
                "FROM busybox:local\nCOPY a.txt /a.txt\nRUN echo built-by-api && cat /a.txt > /b.txt\n",
            ),
        ],
    );
    let out_dir = env.path("out");
    let oci = env.path("image-oci.tar");
    let request_with_outputs = || {
        let mut req = request(&ctx);
        req.tags = vec![r("t/api:1")];
        req.outputs = vec![
            OutputSpec::Local {
                dest: out_dir.clone(),
            },
            OutputSpec::Oci(ArchiveOutput {
                dest: Destination::File(oci.clone()),
                names: vec![],
            }),
            OutputSpec::Image(ImageOutput {
                names: vec![r("t/api:also")],
                ..ImageOutput::store()
            }),
        ];
        req
    };
    let (built, counts) = env.build(request_with_outputs());
    let built = built.unwrap();
    // The COPY and the RUN ran; the RUN's output came through the sink.
    assert!(counts.get("completed") >= 2, "{counts:?}");
    assert_eq!(counts.get("failed"), 0, "{counts:?}");
    assert_eq!(counts.get("started"), counts.get("completed"), "{counts:?}");
    assert!(counts.logs.contains("built-by-api"), "{counts:?}");
    // The image is in the store under both names, and the result says so.
    assert_eq!(built.names, vec![r("t/api:1"), r("t/api:also")]);
    for name in ["t/api:1", "t/api:also"] {
        let local = env.store.images().resolve(name).unwrap();
        assert_eq!(local.manifest_digest, built.image().manifest_digest, "{name}");
    }
    assert_eq!(built.descriptor().digest, built.image().manifest_digest);
    assert!(built.pushed.is_empty());
    let meta = built.metadata();
    assert_eq!(
        meta["containerimage.digest"],
        built.image().manifest_digest.to_string()
    );
    assert_eq!(meta["image.name"], "docker.io/t/api:1,docker.io/t/api:also");
    // The outputs hold the result.
    assert_eq!(std::fs::read_to_string(out_dir.join("b.txt")).unwrap(), "hello\n");
    assert!(out_dir.join("bin/busybox").exists());
    let mut names = Vec::new();
    let mut archive = tar::Archive::new(std::fs::File::open(&oci).unwrap());
    for entry in archive.entries().unwrap() {
        names.push(entry.unwrap().path().unwrap().to_string_lossy().into_owned());
    }
    assert!(names.iter().any(|n| n == "index.json"), "{names:?}");
    assert!(names.iter().any(|n| n == "oci-layout"), "{names:?}");

    // Again: every step from the cache (only the context is read again), the same image.
    let (again, counts) = env.build(request_with_outputs());
    let again = again.unwrap();
    assert!(
        counts
            .started
            .iter()
            // The context is read again; BuildKit's bookkeeping steps (the Dockerfile, the
            // .dockerignore, the base image's metadata, the export) run on every build.
            .all(|name| name.starts_with("[internal] load") || name == "exporting to image"),
        "{counts:?}"
    );
    assert!(counts.get("cached") >= 3, "{counts:?}");
    assert_eq!(again.image().id(), built.image().id());
    assert_ne!(again.build_ref, built.build_ref, "every build has its own ref");
}

fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, text) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, text.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

fn a_streamed_tar_or_dockerfile_is_a_context() {
    let env = Env::new();
    let bytes = tar_of(&[
        ("Dockerfile.web", "FROM busybox:local\nCOPY msg /msg\n"),
        ("msg", "from the stream\n"),
    ]);
    let mut req = harness::request(&env.path("unused"));
    req.context = ContextSource::Stream(Box::new(std::io::Cursor::new(bytes)));
    req.dockerfile = DockerfileSource::Path("Dockerfile.web".into());
    let out = env.path("out");
    req.outputs = vec![OutputSpec::Local { dest: out.clone() }];
    let (built, _) = env.build(req);
    built.unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("msg")).unwrap(),
        "from the stream\n"
    );

    // A stream that is not an archive is the Dockerfile of an empty context; a `-f` path is
    // then ignored with a warning.
    let mut req = harness::request(&env.path("unused"));
    req.context = ContextSource::Stream(Box::new(std::io::Cursor::new(
        b"FROM busybox:local\nRUN echo plain > /p\n".to_vec(),
    )));
    req.dockerfile = DockerfileSource::Path("ignored.Dockerfile".into());
    let (built, counts) = env.build(req);
    built.unwrap();
    assert!(
        counts
            .warnings
            .iter()
            .any(|w| w.contains("ignored.Dockerfile is ignored")),
        "{counts:?}"
    );
    // The spooled and extracted contexts are gone.
    let tmp = env.path("root/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", tmp.display());
}

fn lower_error(err: BuildError) -> LowerError {
    match err {
        BuildError::Lower { error, .. } => *error.kind,
        other => panic!("expected a lowering error, got {other:?}"),
    }
}

fn resolver_failures_are_typed() {
    let env = Env::new();
    // Nothing listens on port 1: not in the store, and the pull fails.
    let ctx = env.context("ctx", &[("Dockerfile", "FROM 127.0.0.1:1/kiln/missing:1\n")]);
    let (built, _) = env.build(request(&ctx));
    match lower_error(built.unwrap_err()) {
        LowerError::ResolveImage {
            reference,
            source: ResolverError::Pull {
                reference: pulled, ..
            },
        } => {
            assert_eq!(reference, "127.0.0.1:1/kiln/missing:1");
            assert_eq!(pulled, "127.0.0.1:1/kiln/missing:1");
        }
        other => panic!("expected a pull failure, got {other:?}"),
    }
    // Not in the store, and not a name a registry could serve.
    let ctx = env.context("ctx2", &[("Dockerfile", "FROM Not_A_Reference\n")]);
    let (built, _) = env.build(request(&ctx));
    match lower_error(built.unwrap_err()) {
        LowerError::ResolveImage {
            source: ResolverError::NotPullable { reference, .. },
            ..
        } => assert_eq!(reference, "Not_A_Reference"),
        other => panic!("expected a non-pullable name, got {other:?}"),
    }
}

fn request_errors_come_before_anything_is_read() {
    let env = Env::new();
    // Another architecture is built under emulation; another OS is refused up front.
    let mut req = request(&env.path("does-not-exist"));
    req.platforms = vec![kiln_dag::Platform::parse("windows/amd64").unwrap()];
    let (built, _) = env.build(req);
    assert!(
        matches!(built, Err(BuildError::Request(RequestError::Platform { .. }))),
        "{built:?}"
    );
    let mut req = request(&env.path("does-not-exist"));
    req.outputs = vec![OutputSpec::Image(ImageOutput {
        push: true,
        ..ImageOutput::store()
    })];
    let (built, _) = env.build(req);
    assert!(
        matches!(built, Err(BuildError::Request(RequestError::PushWithoutName))),
        "{built:?}"
    );
    // And a missing context is a context error naming it.
    let (built, _) = env.build(request(&env.path("does-not-exist")));
    let err = built.unwrap_err();
    assert!(matches!(err, BuildError::Context(_)), "{err:?}");
    assert!(err.to_string().contains("does-not-exist"), "{err}");
}

fn a_cancelled_build_stops_at_the_solve() {
    let env = Env::new();
    let ctx = env.context("ctx", &[("Dockerfile", "FROM busybox:local\nRUN echo never\n")]);
    let cancel = CancelToken::new();
    cancel.cancel();
    let (built, counts) = env.build_with(request(&ctx), cancel);
    match built {
        Err(BuildError::Solve { error, .. }) => assert!(error.is_cancelled(), "{error}"),
        other => panic!("expected a cancelled solve, got {other:?}"),
    }
    // Only the steps before the solve (reading the Dockerfile, .dockerignore, base image) ran.
    assert!(
        counts.started.iter().all(|n| n.starts_with("[internal] load")),
        "{counts:?}"
    );
    assert!(!counts.logs.contains("never"), "{counts:?}");
}

/// Mount points and file systems from `/proc/self/mountinfo`, for mount points under `under`.
fn mounts_under(under: &Path) -> Vec<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?.to_string();
            let fstype = right.split(' ').next()?.to_string();
            point
                .starts_with(&*under.to_string_lossy())
                .then_some((point, fstype))
        })
        .collect()
}

/// The engine's mount points (here a stage's view bound into a RUN) are on a tmpfs of the
/// build's own, in the store's temp dir, and nothing stays mounted after the build.
fn a_builds_mount_points_are_on_a_tmpfs_of_its_own() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = Env::new();
    let ctx = env.context(
        "ctx",
        &[(
            "Dockerfile",
            "FROM busybox:local AS a\nRUN echo a > /a\n\
             FROM busybox:local\nRUN --mount=type=bind,from=a,target=/m sleep 1 && cat /m/a > /b\n",
        )],
    );
    let tmp = env.path("root/tmp");
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (tmp, done) = (tmp.clone(), done.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let mounts = mounts_under(&tmp);
                let area = mounts.iter().find(|(p, t)| t == "tmpfs" && p.ends_with("/m"));
                if let Some((area, _)) = area {
                    let below = format!("{area}/");
                    if mounts
                        .iter()
                        .any(|(p, t)| t == "overlay" && p.starts_with(&below))
                    {
                        return mounts;
                    }
                    seen = mounts;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            seen
        })
    };
    let (built, counts) = env.build(request(&ctx));
    done.store(true, Ordering::Relaxed);
    built.expect("the build");
    assert_eq!(counts.get("failed"), 0, "{counts:?}");
    let seen = watcher.join().expect("the watcher");
    let area = seen.iter().find(|(p, t)| t == "tmpfs" && p.ends_with("/m"));
    assert!(
        area.is_some(),
        "no tmpfs mount area under {}: {seen:?}",
        tmp.display()
    );
    assert!(
        seen.iter().any(|(_, t)| t == "overlay"),
        "no view mounted in the area: {seen:?}"
    );
    assert_eq!(mounts_under(&tmp), Vec::new(), "left mounted after the build");
}
