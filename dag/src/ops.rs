//! The operations a vertex can hold. Every field here is part of the vertex digest, so a field
//! belongs here only if changing it must change the result.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Digest;

/// What a vertex does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Produces a filesystem from outside the graph.
    Source(SourceOp),
    /// Runs a process over a root filesystem (`RUN`).
    Exec(ExecOp),
    /// Changes files (`COPY`, `ADD`, `WORKDIR`'s mkdir, heredoc files).
    File(FileOp),
    /// Stacks its inputs, later ones on top (`COPY --link`).
    Merge(MergeOp),
}

impl Op {
    /// A one-line human summary for the graph dump (not part of the digest).
    pub fn summary(&self) -> String {
        match self {
            Op::Source(SourceOp::Scratch) => "source scratch".into(),
            Op::Source(SourceOp::Image(i)) => match &i.resolved_digest {
                Some(d) => format!("source image {}@{} {}", i.reference, d, i.platform),
                None => format!("source image {} {}", i.reference, i.platform),
            },
            Op::Source(SourceOp::Local(l)) => {
                let mut s = format!("source local {}", l.name);
                if !l.include.is_empty() {
                    s.push_str(&format!(" include={:?}", l.include));
                }
                if !l.exclude.is_empty() {
                    s.push_str(&format!(" exclude={:?}", l.exclude));
                }
                s
            }
            Op::Source(SourceOp::Git(g)) => format!("source git {}#{}:{}", g.remote, g.reference, g.subdir),
            Op::Source(SourceOp::Http(h)) => format!("source http {}", h.url),
            Op::Exec(e) => {
                let mut s = format!("exec {:?} cwd={} user={:?}", e.args, e.cwd, e.user);
                if e.network != NetworkMode::Default {
                    s.push_str(&format!(" network={:?}", e.network));
                }
                if e.security != SecurityMode::Sandbox {
                    s.push_str(" security=insecure");
                }
                if let Some(h) = &e.hostname {
                    s.push_str(&format!(" hostname={h}"));
                }
                for (host, ip) in &e.extra_hosts {
                    s.push_str(&format!(" add-host={host}:{ip}"));
                }
                if let Some(size) = e.shm_size {
                    s.push_str(&format!(" shm-size={size}"));
                }
                for u in &e.ulimits {
                    s.push_str(&format!(" ulimit={}={}:{}", u.name, u.soft, u.hard));
                }
                for m in &e.mounts {
                    s.push_str(&format!(" mount[{}]", m.summary()));
                }
                s
            }
            Op::File(f) => {
                let parts: Vec<String> = f.actions.iter().map(FileAction::summary).collect();
                format!("file {}", parts.join("; "))
            }
            Op::Merge(_) => "merge".into(),
        }
    }
}

use crate::platform::Platform;

/// Where a source's files come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceOp {
    /// The empty filesystem.
    Scratch,
    Image(ImageSource),
    Local(LocalSource),
    Git(GitSource),
    Http(HttpSource),
}

/// An image from the store or a registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSource {
    /// The normalised reference (`docker.io/library/busybox:latest`).
    pub reference: String,
    /// The manifest digest the frontend resolved the reference to, when it did. With a digest the
    /// vertex is pinned; without one the solver resolves the reference when it runs.
    pub resolved_digest: Option<Digest>,
    pub platform: Platform,
}

/// Files from a local directory: the build context (`name` = `context`) or a named context.
/// The digest covers the name and the filters; the solver keys the result by file contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalSource {
    pub name: String,
    /// Only these paths (and their parents and children) are transferred; empty = everything.
    pub include: Vec<String>,
    /// `.dockerignore` patterns, in file order (`!` re-includes).
    pub exclude: Vec<String>,
}

/// A Git repository at a ref.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitSource {
    pub remote: String,
    /// Branch, tag or commit; empty = the remote's HEAD.
    pub reference: String,
    pub subdir: String,
    pub keep_git_dir: bool,
}

/// One file downloaded over HTTP(S).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpSource {
    pub url: String,
    /// `sha256:...` the content must match.
    pub checksum: Option<Digest>,
    /// Name of the file in the result.
    pub filename: String,
    pub mode: Option<u32>,
    pub uid: u32,
    pub gid: u32,
}

/// Network access of a RUN step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// The host's network (BuildKit without CNI).
    #[default]
    Default,
    /// Loopback only.
    None,
    /// The host's network, explicitly (needs the `network.host` entitlement).
    Host,
}

/// `RUN --security`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityMode {
    #[default]
    Sandbox,
    /// All capabilities, no masked paths (needs the `security.insecure` entitlement).
    Insecure,
}

/// A process run over a root filesystem. The result of the vertex is what the process left in
/// `mounts[0]`, the root mount; every other mount's writes are discarded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOp {
    pub args: Vec<String>,
    /// `KEY=VALUE`, in the order the process sees them.
    pub env: Vec<String>,
    pub cwd: String,
    /// `USER` as written after expansion (`name`, `uid`, `name:group`); empty = root.
    pub user: String,
    pub network: NetworkMode,
    pub security: SecurityMode,
    /// `mounts[0]` is the root filesystem (`target` = `/`).
    pub mounts: Vec<Mount>,
    /// The hostname the process sees (`BUILDKIT_SANDBOX_HOSTNAME`); `None` = BuildKit's
    /// `buildkitsandbox`. Left out of the encoding when unset, so existing digests stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `--add-host`: extra `/etc/hosts` entries, (name, address), after the default ones (in
    /// the op, as BuildKit's `ExecOp.Meta.ExtraHosts`). Left out of the encoding when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<(String, String)>,
    /// `--shm-size`: the size of `/dev/shm` in bytes; `None` = the runtime's 64 MiB. In the op
    /// (as BuildKit puts it, a tmpfs mount of that size, into the `ExecOp`), so it is in the
    /// digest and the cache key. Left out of the encoding when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<u64>,
    /// `--ulimit`: resource limits set before the process runs, in the order given (BuildKit's
    /// `ExecOp.Meta.Ulimit`, in its cache key too). Limits not listed are inherited. Left out of
    /// the encoding when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ulimits: Vec<Ulimit>,
    /// The platform the process is built for when it is not the build platform's (a stage of
    /// another target platform): its programs run under emulation, and its result differs from
    /// the same command's on the build platform. Left out of the encoding when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// One `--ulimit`: a resource by Docker's name (`nofile`, `nproc`, ...) and its limits, `-1`
/// meaning unlimited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ulimit {
    pub name: String,
    pub soft: i64,
    pub hard: i64,
}

/// A filesystem attached to a RUN step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Absolute path inside the container (may be empty for env-only secrets).
    pub target: String,
    /// Index into the vertex's inputs; `None` = an empty directory.
    pub input: Option<usize>,
    /// Path inside the input that is mounted (`/` = all of it).
    pub selector: String,
    pub readonly: bool,
    pub kind: MountKind,
}

impl Mount {
    fn summary(&self) -> String {
        let kind = match &self.kind {
            MountKind::Bind => "bind".to_string(),
            MountKind::Cache { id, sharing, .. } => format!("cache id={id} sharing={sharing:?}"),
            MountKind::Tmpfs { size } => format!("tmpfs size={size:?}"),
            MountKind::Secret { id, env, .. } => format!("secret id={id} env={env:?}"),
            MountKind::Ssh { id, .. } => format!("ssh id={id}"),
        };
        let input = self.input.map(|i| format!(" input={i}")).unwrap_or_default();
        let ro = if self.readonly { " ro" } else { "" };
        format!("{} {}{} src={}{}", kind, self.target, input, self.selector, ro)
    }
}

/// `sharing=` of a cache mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheSharing {
    #[default]
    Shared,
    Private,
    Locked,
}

/// The kind of a [`Mount`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountKind {
    Bind,
    /// Persistent directory kept in the store across builds; `input` seeds it when first created.
    Cache {
        id: String,
        sharing: CacheSharing,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Tmpfs {
        size: Option<u64>,
    },
    /// Never part of a layer or a cache key: only the id is in the digest.
    Secret {
        id: String,
        env: Option<String>,
        required: bool,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Ssh {
        id: String,
        required: bool,
        mode: u32,
        uid: u32,
        gid: u32,
    },
}

/// A sequence of file changes applied to `input` (`None` = scratch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOp {
    pub input: Option<usize>,
    pub actions: Vec<FileAction>,
}

/// One file change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileAction {
    Copy(CopyAction),
    Mkdir(MkdirAction),
    Mkfile(MkfileAction),
    Rm(RmAction),
}

impl FileAction {
    fn summary(&self) -> String {
        match self {
            FileAction::Copy(c) => {
                let mut s = format!("copy input={} {:?} -> {:?}", c.source_input, c.src, c.dest);
                if let Some(o) = &c.owner {
                    s.push_str(&format!(" owner={o}"));
                }
                if let Some(m) = &c.mode {
                    s.push_str(&format!(" mode={m}"));
                }
                if c.attempt_unpack {
                    s.push_str(" unpack");
                }
                if !c.exclude.is_empty() {
                    s.push_str(&format!(" exclude={:?}", c.exclude));
                }
                if c.parents {
                    s.push_str(" parents");
                }
                s
            }
            FileAction::Mkdir(m) => format!("mkdir {:?} {:o}", m.path, m.mode),
            FileAction::Mkfile(m) => format!("mkfile {:?} {:o} {} bytes", m.path, m.mode, m.data.len()),
            FileAction::Rm(r) => format!("rm {:?}", r.path),
        }
    }
}

/// A user or group as written: a numeric id or a name resolved in the destination's
/// `/etc/passwd` / `/etc/group` when the op runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdSpec {
    Id(u32),
    Name(String),
}

impl std::fmt::Display for IdSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdSpec::Id(i) => write!(f, "{i}"),
            IdSpec::Name(n) => f.write_str(n),
        }
    }
}

/// `--chown=user[:group]`. Without a group, the user's primary group (or the same id) is used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub user: IdSpec,
    pub group: Option<IdSpec>,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.user)?;
        if let Some(g) = &self.group {
            write!(f, ":{g}")?;
        }
        Ok(())
    }
}

/// `--chmod`: octal bits, or a symbolic expression (`u+x,g-w`) applied to each file's own mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Chmod {
    Octal(u32),
    Symbolic(String),
}

impl std::fmt::Display for Chmod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chmod::Octal(m) => write!(f, "{m:o}"),
            Chmod::Symbolic(s) => f.write_str(s),
        }
    }
}

/// Copies `src` (a path or wildcard pattern in input `source_input`) to `dest` (absolute).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyAction {
    pub source_input: usize,
    pub src: String,
    pub dest: String,
    pub owner: Option<Owner>,
    pub mode: Option<Chmod>,
    /// Follow a symlink named by `src` itself (children are never followed).
    pub follow_symlinks: bool,
    /// A source directory's contents are copied, not the directory itself.
    pub dir_contents_only: bool,
    pub allow_wildcard: bool,
    /// A wildcard that matches nothing is not an error.
    pub allow_empty_wildcard: bool,
    /// Create missing parents of `dest`.
    pub create_dest_path: bool,
    /// `dest` names a directory (it ended with `/`, or several sources are copied).
    pub dest_is_dir: bool,
    /// ADD: a local tar archive (plain, gzip, bzip2, xz, zstd) is extracted instead of copied.
    pub attempt_unpack: bool,
    /// `--exclude` patterns, matched against paths relative to the source.
    pub exclude: Vec<String>,
    /// `--parents`: keep the source's directory structure below the context root (or below a
    /// `/./` pivot in the pattern).
    pub parents: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkdirAction {
    pub path: String,
    pub mode: u32,
    pub make_parents: bool,
    pub owner: Option<Owner>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkfileAction {
    pub path: String,
    pub mode: u32,
    pub data: String,
    pub owner: Option<Owner>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RmAction {
    pub path: String,
    pub allow_not_found: bool,
    pub allow_wildcard: bool,
}

/// Stacks the inputs in order into one filesystem.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeOp {}

/// Labels on a map, kept ordered for canonical encoding.
pub type StringMap = BTreeMap<String, String>;
