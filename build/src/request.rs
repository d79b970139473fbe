//! What a caller asks for: [`BuildRequest`], plain data. Flags, environment variables and files
//! named on a command line are the front end's to read; the request holds their values.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use kiln_cache::reference::Reference;
use kiln_dag::Platform;
use kiln_solver::engine::Secret;
use kiln_source::registry::ClientOptions;

use crate::cache_io::spec::{CacheFrom, CacheTo};
use crate::output::OutputSpec;

/// Where the build context comes from.
pub enum ContextSource {
    /// A local directory, read in place.
    Dir(PathBuf),
    /// A tar archive (plain, gzip, bzip2, xz or zstd) or, when the bytes are not an archive, the
    /// Dockerfile of an empty context (`kiln build -` reads stdin). Spooled under the store's
    /// `tmp/` and extracted there.
    Stream(Box<dyn Read + Send>),
    /// A Git URL (`remote#ref:subdir`) or an http(s) URL (a tarball, or a lone Dockerfile).
    Remote(String),
}

impl ContextSource {
    /// The context a command-line argument names, other than `-`: an existing local directory
    /// wins, then Git URLs, then http(s) URLs (Docker's order); anything else is a directory
    /// (which may then not exist, and the build says so).
    pub fn from_arg(arg: &str) -> ContextSource {
        if is_remote(arg) {
            ContextSource::Remote(arg.to_string())
        } else {
            ContextSource::Dir(PathBuf::from(arg))
        }
    }
}

/// Whether a context argument is fetched rather than read from disk.
pub fn is_remote(arg: &str) -> bool {
    if Path::new(arg).is_dir() {
        return false;
    }
    kiln_source::git::is_git_url(arg) || arg.starts_with("http://") || arg.starts_with("https://")
}

impl fmt::Debug for ContextSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContextSource::Dir(p) => f.debug_tuple("Dir").field(p).finish(),
            ContextSource::Stream(_) => f.write_str("Stream(..)"),
            ContextSource::Remote(u) => f
                .debug_tuple("Remote")
                .field(&kiln_source::git::redact(u))
                .finish(),
        }
    }
}

/// Where the Dockerfile comes from.
#[derive(Default)]
pub enum DockerfileSource {
    /// `Dockerfile` at the top of the context.
    #[default]
    Default,
    /// A path: as given (relative to the working directory) for a local context; relative to
    /// the context, which it may not leave, for a fetched or streamed one.
    Path(String),
    /// These bytes, read when the build needs them (`-f -`).
    Stream(Box<dyn Read + Send>),
}

impl fmt::Debug for DockerfileSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DockerfileSource::Default => f.write_str("Default"),
            DockerfileSource::Path(p) => f.debug_tuple("Path").field(p).finish(),
            DockerfileSource::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}

/// Privileges a build may use (`--allow`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entitlements {
    /// `network.host`: `RUN --network=host`.
    pub network_host: bool,
    /// `security.insecure`: `RUN --security=insecure`.
    pub security_insecure: bool,
}

/// One build: the context, the Dockerfile, the options of lowering and solving, and where the
/// result goes.
///
/// Build one with [`BuildRequest::new`] and set the fields; the struct is `#[non_exhaustive]`,
/// so fields added later (remote cache importers and exporters, say) do not break callers.
#[derive(Debug)]
#[non_exhaustive]
pub struct BuildRequest {
    /// The build context.
    pub context: ContextSource,
    /// The Dockerfile.
    pub dockerfile: DockerfileSource,
    /// `--build-context name=VALUE`: a directory, `docker-image://REF`, `oci-layout://PATH[@D|:T]`,
    /// a Git URL or an https tarball, by name.
    pub named_contexts: BTreeMap<String, String>,
    /// `--build-arg`, values resolved.
    pub build_args: BTreeMap<String, String>,
    /// `--target`; `None` = the last stage.
    pub target: Option<String>,
    /// Target platforms; empty = the host's. One image per platform (an index for several).
    pub platforms: Vec<Platform>,
    /// `--label`, added to the image.
    pub labels: BTreeMap<String, String>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--no-cache-filter`: stage names or indexes.
    pub no_cache_filter: Vec<String>,
    /// `--pull`: re-resolve base image tags against their registries.
    pub pull: bool,
    /// `-t`: names the image gets in the local store (and, with `push`, in registries).
    pub tags: Vec<Reference>,
    /// `-o`, `--push`: where the result goes besides the local store. Empty = the local store
    /// only (what `type=image` alone means).
    pub outputs: Vec<OutputSpec>,
    /// `--secret` values by id.
    pub secrets: BTreeMap<String, Secret>,
    /// `--ssh`: agent sockets by id.
    pub ssh: BTreeMap<String, PathBuf>,
    /// `--allow`.
    pub entitlements: Entitlements,
    /// `SOURCE_DATE_EPOCH`: clamps layer times and dates the image.
    pub source_date_epoch: Option<i64>,
    /// `BUILDKIT_CONTEXT_KEEP_GIT_DIR`: keep `.git` in Git contexts (also honoured as a build
    /// arg).
    pub keep_git_dir: bool,
    /// Steps run at once; `None` = 4 per CPU.
    pub jobs: Option<usize>,
    /// `--network`: RUN steps' network unless they say (`Host` needs `entitlements.network_host`,
    /// which buildx grants with it).
    pub network: kiln_dag::NetworkMode,
    /// `--isolation`: how RUN steps are set apart from kiln's own environment (chroot: inside
    /// an unprivileged container). Never part of a cache key: the result is the same.
    pub isolation: kiln_solver::Isolation,
    /// `--add-host`: (name, address) entries in every RUN step's `/etc/hosts`.
    pub extra_hosts: Vec<(String, String)>,
    /// `--shm-size`: the size of every RUN step's `/dev/shm` in bytes; `None` = 64 MiB.
    pub shm_size: Option<u64>,
    /// `--ulimit`: resource limits of every RUN step; the others are inherited.
    pub ulimits: Vec<kiln_dag::Ulimit>,
    /// `--annotation`: annotations of the manifests, the index and their descriptors (see
    /// [`crate::annotations`]).
    pub annotations: Vec<crate::annotations::Annotation>,
    /// The registry client's options, for base images and pushes (credentials directory,
    /// plain-HTTP registries, retries).
    pub registry: ClientOptions,
    /// `--cache-from`: caches whose records the solve may use, in order (the first naming a key
    /// wins).
    pub cache_from: Vec<CacheFrom>,
    /// `--cache-to`: where the build's cache goes after the image is written.
    pub cache_to: Vec<CacheTo>,
}

impl BuildRequest {
    /// A request for `context` with every option at its default: `Dockerfile` in the context,
    /// the host platform, the local store as the only output, and the registry options of the
    /// environment (`DOCKER_CONFIG`, `KILN_INSECURE_REGISTRIES`), as `kiln push` uses them.
    pub fn new(context: ContextSource) -> BuildRequest {
        BuildRequest {
            context,
            dockerfile: DockerfileSource::Default,
            named_contexts: BTreeMap::new(),
            build_args: BTreeMap::new(),
            target: None,
            platforms: Vec::new(),
            labels: BTreeMap::new(),
            no_cache: false,
            no_cache_filter: Vec::new(),
            pull: false,
            tags: Vec::new(),
            outputs: Vec::new(),
            secrets: BTreeMap::new(),
            ssh: BTreeMap::new(),
            entitlements: Entitlements::default(),
            source_date_epoch: None,
            keep_git_dir: false,
            jobs: None,
            network: kiln_dag::NetworkMode::Default,
            isolation: kiln_solver::Isolation::Default,
            extra_hosts: Vec::new(),
            shm_size: None,
            ulimits: Vec::new(),
            annotations: Vec::new(),
            registry: ClientOptions::from_env(),
            cache_from: Vec::new(),
            cache_to: Vec::new(),
        }
    }

    /// The `--cache-to` list, with `type=inline` added for the `BUILDKIT_INLINE_CACHE` build
    /// argument.
    pub(crate) fn cache_exports(&self) -> Vec<CacheTo> {
        let mut out = self.cache_to.clone();
        let inline_arg = self
            .build_args
            .get("BUILDKIT_INLINE_CACHE")
            .is_some_and(|v| is_truthy(v));
        if inline_arg && !out.contains(&CacheTo::Inline) {
            out.push(CacheTo::Inline);
        }
        out
    }

    /// Whether Git contexts keep their `.git`: the request's flag or the
    /// `BUILDKIT_CONTEXT_KEEP_GIT_DIR` build arg.
    pub(crate) fn keeps_git_dir(&self) -> bool {
        self.keep_git_dir
            || self
                .build_args
                .get("BUILDKIT_CONTEXT_KEEP_GIT_DIR")
                .is_some_and(|v| is_truthy(v))
    }
}

/// BuildKit's truthy spellings of a boolean option.
pub(crate) fn is_truthy(v: &str) -> bool {
    matches!(v, "1" | "true" | "True" | "TRUE")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_git_dir_from_build_args() {
        let mut req = BuildRequest::new(ContextSource::Dir(".".into()));
        assert!(!req.keeps_git_dir());
        req.build_args
            .insert("BUILDKIT_CONTEXT_KEEP_GIT_DIR".into(), "0".into());
        assert!(!req.keeps_git_dir());
        req.build_args
            .insert("BUILDKIT_CONTEXT_KEEP_GIT_DIR".into(), "1".into());
        assert!(req.keeps_git_dir());
    }

    #[test]
    fn context_arguments_classify_like_docker() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let d = dir.path().to_string_lossy().into_owned();
        assert!(matches!(ContextSource::from_arg(&d), ContextSource::Dir(_)));
        assert!(matches!(
            ContextSource::from_arg("https://example.com/ctx.tar"),
            ContextSource::Remote(_)
        ));
        assert!(matches!(
            ContextSource::from_arg("git@github.com:o/r.git"),
            ContextSource::Remote(_)
        ));
        assert!(matches!(ContextSource::from_arg("./nope"), ContextSource::Dir(_)));
    }
}
