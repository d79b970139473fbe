//! RUN: a process in a container over an overlay of the input's layers.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_dag::{CacheSharing, ExecOp, Mount, MountKind, NetworkMode, SecurityMode, Vertex};
use kiln_runtime::{ContainerSpec, EtcFiles, MountSpec, Network, Rootfs, Security};

use super::mounts::{self, HostMount};
use super::{Engine, EngineError, Output};
use crate::progress::Stream;
use crate::scheduler::{ExecCtx, Resolved, SolveError};

/// BuildKit's hostname for RUN containers.
const HOSTNAME: &str = "buildkitsandbox";

/// A RUN step failed in a way the user caused.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("process \"{command}\" did not complete successfully: exit code: {code}")]
    ExitCode { command: String, code: i32 },
    #[error("process \"{command}\" was killed by signal {signal}")]
    Signal { command: String, signal: i32 },
    #[error("network mode \"host\" requires the `network.host` entitlement: pass --allow network.host")]
    NetworkHostNotAllowed,
    #[error("security mode \"insecure\" requires the `security.insecure` entitlement: pass --allow security.insecure")]
    InsecureNotAllowed,
    #[error("secret {0} not found: pass it with --secret id={0},src=FILE")]
    SecretNotFound(String),
    #[error("no SSH agent socket for id {0}: pass --ssh {0}")]
    SshNotFound(String),
    #[error("failed to start the container")]
    Start(#[source] kiln_runtime::RuntimeError),
    #[error("failed to wait for the container")]
    Wait(#[source] kiln_runtime::RuntimeError),
    #[error("failed to prepare the cache mount `{id}` at `{path}`")]
    CacheMount {
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to prepare the secret `{id}`")]
    SecretFile {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to create output pipes")]
    Pipe(#[source] std::io::Error),
    #[error("failed to set up the network namespace of the RUN step")]
    Network(#[source] kiln_runtime::net::NetError),
}

/// The network namespaces a build's RUN steps run in by default: each on the bridge with
/// outbound NAT (what `docker build` gives), isolated from the host's (its loopback services
/// included). A step takes one for itself, so steps running at once never share one; a namespace
/// whose step has ended (and with it every process in it) goes back to the pool for the next
/// step, so a chain of RUN steps pays for one namespace, not one per step. A step with every
/// capability (`--security=insecure`) could reconfigure its namespace: its namespace is not
/// reused. The namespaces are held by descriptors, so they vanish with the build even when it
/// is killed; the addresses are released when the build ends.
#[derive(Default)]
pub(super) struct BuildNetworks {
    free: std::sync::Mutex<Vec<kiln_runtime::net::HeldEndpoint>>,
    made: std::sync::atomic::AtomicU64,
}

impl BuildNetworks {
    fn take(&self) -> Result<kiln_runtime::net::HeldEndpoint, ExecError> {
        if let Some(ep) = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(ep);
        }
        let n = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("build-{}-{n}", std::process::id());
        kiln_runtime::net::setup_held(&id, &kiln_runtime::net::NetRequest::default())
            .map_err(ExecError::Network)
    }

    fn give_back(&self, ep: kiln_runtime::net::HeldEndpoint, reusable: bool) {
        if reusable {
            self.free.lock().unwrap_or_else(|e| e.into_inner()).push(ep);
        } else if let Err(e) = kiln_runtime::net::teardown_held(ep) {
            tracing::warn!("failed to release a RUN step's network: {e}");
        }
    }
}

/// A namespace taken from [`BuildNetworks`] for one step, given back when dropped.
struct Lease<'a> {
    pool: &'a BuildNetworks,
    endpoint: Option<kiln_runtime::net::HeldEndpoint>,
    reusable: bool,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(ep) = self.endpoint.take() {
            self.pool.give_back(ep, self.reusable);
        }
    }
}

impl Drop for BuildNetworks {
    fn drop(&mut self) {
        for ep in std::mem::take(self.free.get_mut().unwrap_or_else(|e| e.into_inner())) {
            if let Err(e) = kiln_runtime::net::teardown_held(ep) {
                tracing::warn!("failed to release a RUN step's network: {e}");
            }
        }
    }
}

impl From<ExecError> for SolveError {
    fn from(e: ExecError) -> SolveError {
        SolveError::op(e)
    }
}

/// Things that must live until the container has exited.
#[derive(Default)]
struct Held {
    mounts: Vec<HostMount>,
    locks: Vec<std::fs::File>,
    dirs: Vec<tempfile::TempDir>,
}

/// The step's environment: its own, then each proxy variable it does not set itself.
fn with_proxy_env(env: &[String], proxy_env: &[String]) -> Vec<String> {
    let key = |kv: &str| kv.split_once('=').map(|(k, _)| k).unwrap_or(kv).to_owned();
    let mut out = env.to_vec();
    for kv in proxy_env {
        if !out.iter().any(|x| key(x) == key(kv)) {
            out.push(kv.clone());
        }
    }
    out
}

/// `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname` of a RUN step.
fn etc_files(
    hostname: &str,
    host_resolv: &str,
    network: &Network,
    extra_hosts: &[(String, String)],
) -> EtcFiles {
    let mut files = EtcFiles::for_build(hostname, host_resolv, network);
    // `--add-host` entries follow the default ones, as BuildKit writes them.
    if let Some(hosts) = files.hosts.as_mut() {
        for (name, ip) in extra_hosts {
            hosts.push_str(&format!("{ip}\t{name}\n"));
        }
    }
    files
}

/// Copies the container's output from `reader` to the step's progress log.
fn forward(ctx: &ExecCtx, reader: std::io::PipeReader, stream: Stream) -> tokio::task::JoinHandle<()> {
    let progress = ctx.progress().clone();
    tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => progress.log(stream, buf[..n].to_vec()),
            }
        }
    })
}

/// The step's failure if its command did not exit with 0.
fn succeeded(args: &[String], status: &kiln_runtime::ExitStatus) -> Result<(), ExecError> {
    let command = args.join(" ");
    if let Some(signal) = status.signal {
        return Err(ExecError::Signal { command, signal });
    }
    if status.code != Some(0) {
        return Err(ExecError::ExitCode {
            command,
            code: status.code.unwrap_or(-1),
        });
    }
    Ok(())
}

impl Engine {
    pub(super) async fn exec(
        &self,
        _v: &Vertex,
        e: &ExecOp,
        inputs: &[Resolved<Output>],
        ctx: &ExecCtx,
    ) -> Result<Output, SolveError> {
        let security = match e.security {
            SecurityMode::Sandbox => Security::Default,
            SecurityMode::Insecure if self.opts.allow_insecure => Security::Insecure,
            SecurityMode::Insecure => return Err(ExecError::InsecureNotAllowed.into()),
        };
        // Held until the step's processes are gone (it is dropped on every return path).
        let (network, lease) = self.step_network(e.network, security)?;
        let base = match e.mounts.first().and_then(|m| m.input) {
            Some(i) => Self::fs_input(inputs, i)?,
            None => Vec::new(),
        };
        let mut lower = self.lower_dirs(&base).await?;
        if lower.is_empty() {
            lower.push(self.empty.clone());
        }
        let mutable = self.snapshots.prepare(None).map_err(EngineError::Snapshots)?;

        let mut env = with_proxy_env(&e.env, &self.opts.proxy_env);
        let mut held = Held::default();
        let mut specs = Vec::new();
        for m in e.mounts.iter().skip(1) {
            self.mount_spec(m, inputs, &mut env, &mut held, &mut specs)
                .await?;
        }

        let (out_r, out_w) = std::io::pipe().map_err(ExecError::Pipe)?;
        let (err_r, err_w) = std::io::pipe().map_err(ExecError::Pipe)?;
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let hostname = e.hostname.as_deref().unwrap_or(HOSTNAME);
        let spec = ContainerSpec {
            rootfs: Rootfs::Overlay {
                lower,
                upper: mutable.upper().to_path_buf(),
                work: mutable.work().to_path_buf(),
            },
            readonly_rootfs: false,
            args: e.args.clone(),
            env,
            cwd: if e.cwd.is_empty() {
                "/".into()
            } else {
                e.cwd.clone()
            },
            user: e.user.clone(),
            hostname: hostname.to_string(),
            mounts: specs,
            etc_files: etc_files(hostname, &host_resolv, &network, &e.extra_hosts),
            network,
            security,
            stdin: None,
            stdout: OwnedFd::from(out_w),
            stderr: OwnedFd::from(err_w),
            // The upper dir becomes this step's snapshot and layer blob, whose durability the
            // build sees to (the blob is fsynced; the snapshot is trusted only within this boot).
            options: kiln_runtime::RunOptions {
                volatile_upper: true,
                // BuildKit leaves the directories it made for mount targets in the step's layer.
                mount_points_in_rootfs: true,
                shm_size: e.shm_size,
                rlimits: rlimits(&e.ulimits),
                isolation: self.opts.isolation,
                ..Default::default()
            },
        };
        let scratch = self.mount_dir("run-")?;
        let running = tokio::task::spawn_blocking(move || kiln_runtime::start(spec, &scratch))
            .await
            .map_err(|e| EngineError::Join(e.to_string()))?
            .map_err(ExecError::Start)?;

        let out_task = forward(ctx, out_r, Stream::Stdout);
        let err_task = forward(ctx, err_r, Stream::Stderr);

        let pid = running.pid();
        let created = running.created_paths().to_vec();
        let mut wait = tokio::task::spawn_blocking(move || running.wait());
        let status = tokio::select! {
            r = &mut wait => r,
            _ = ctx.cancel().cancelled() => {
                let _ = kiln_runtime::sys::kill(pid, SIGKILL);
                let _ = wait.await;
                let _ = out_task.await;
                let _ = err_task.await;
                drop(held);
                mutable.discard();
                return Err(SolveError::Cancelled);
            }
        };
        let _ = out_task.await;
        let _ = err_task.await;
        drop(held);
        drop(lease);
        let status = match status.map_err(|e| EngineError::Join(e.to_string())) {
            Ok(Ok(s)) => s,
            Ok(Err(err)) => {
                mutable.discard();
                return Err(ExecError::Wait(err).into());
            }
            Err(err) => {
                mutable.discard();
                return Err(err.into());
            }
        };
        if let Err(err) = succeeded(&e.args, &status) {
            mutable.discard();
            return Err(err.into());
        }
        // File targets made to mount on are removed again, as BuildKit removes them (their
        // directories stay); what else the runtime had to make is left out of the layer.
        let upper = mutable.upper().to_path_buf();
        let exclude: Vec<PathBuf> = created
            .into_iter()
            .filter(|rel| {
                let path = upper.join(rel);
                let stub = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() == 0);
                !(stub && std::fs::remove_file(&path).is_ok())
            })
            .collect();
        let this: &Engine = self;
        let layers = tokio::task::block_in_place(|| this.commit_layer(&base, mutable, exclude))?;
        Ok(Output::Fs(Arc::new(layers)))
    }

    /// The step's network: a namespace leased from the build's pool (held until the step's
    /// processes are gone), none, or the host's (with the entitlement).
    fn step_network(
        &self,
        mode: NetworkMode,
        security: Security,
    ) -> Result<(Network, Option<Lease<'_>>), SolveError> {
        match mode {
            // Chroot isolation where no namespace can be connected (an unprivileged container
            // without /dev/net/tun): the container's own network, as the build's start said.
            NetworkMode::Default
                if self.opts.isolation == kiln_runtime::Isolation::Chroot
                    && !kiln_runtime::isolation::own_network() =>
            {
                Ok((Network::Host, None))
            }
            NetworkMode::Default => {
                let ep = tokio::task::block_in_place(|| self.networks.take())?;
                let network = ep.network();
                let lease = Lease {
                    pool: &self.networks,
                    endpoint: Some(ep),
                    reusable: security == Security::Default,
                };
                Ok((network, Some(lease)))
            }
            NetworkMode::None => Ok((Network::None, None)),
            NetworkMode::Host if self.opts.allow_network_host => Ok((Network::Host, None)),
            NetworkMode::Host => Err(ExecError::NetworkHostNotAllowed.into()),
        }
    }

    /// Turns one `RUN --mount` into a runtime mount (and maybe env entries).
    async fn mount_spec(
        &self,
        m: &Mount,
        inputs: &[Resolved<Output>],
        env: &mut Vec<String>,
        held: &mut Held,
        out: &mut Vec<MountSpec>,
    ) -> Result<(), SolveError> {
        let target = m.target.clone();
        match &m.kind {
            MountKind::Bind => out.push(self.bind_mount(m, inputs, held).await?),
            MountKind::Cache {
                id,
                sharing,
                mode,
                uid,
                gid,
            } => {
                let dir = self
                    .cache_mount_dir(id, *sharing, *mode, *uid, *gid, m, inputs, held)
                    .await?;
                out.push(MountSpec::Bind {
                    source: dir,
                    target,
                    readonly: m.readonly,
                });
            }
            MountKind::Tmpfs { size } => out.push(MountSpec::Tmpfs {
                target,
                size: *size,
                mode: None,
            }),
            MountKind::Secret {
                id,
                env: var,
                required,
                mode,
                uid,
                gid,
            } => {
                let Some(secret) = self.opts.secrets.get(id) else {
                    if *required {
                        return Err(ExecError::SecretNotFound(id.clone()).into());
                    }
                    return Ok(());
                };
                if let Some(var) = var {
                    // The secret wins over an ENV of the same name, as in BuildKit.
                    let prefix = format!("{var}=");
                    env.retain(|kv| !kv.starts_with(&prefix) && kv != var);
                    env.push(format!("{var}={}", String::from_utf8_lossy(&secret.data)));
                }
                if !target.is_empty() {
                    let d = tempfile::tempdir_in(self.mount_area.path()).map_err(|source| {
                        ExecError::SecretFile {
                            id: id.clone(),
                            source,
                        }
                    })?;
                    let file = d.path().join("secret");
                    write_private(&file, &secret.data, *mode, *uid, *gid).map_err(|source| {
                        ExecError::SecretFile {
                            id: id.clone(),
                            source,
                        }
                    })?;
                    held.dirs.push(d);
                    out.push(MountSpec::Bind {
                        source: file,
                        target,
                        readonly: true,
                    });
                }
            }
            MountKind::Ssh { id, required, .. } => {
                let Some(sock) = self.opts.ssh.get(id) else {
                    if *required {
                        return Err(ExecError::SshNotFound(id.clone()).into());
                    }
                    return Ok(());
                };
                env.retain(|kv| !kv.starts_with("SSH_AUTH_SOCK="));
                env.push(format!("SSH_AUTH_SOCK={target}"));
                out.push(MountSpec::Bind {
                    source: sock.clone(),
                    target,
                    readonly: false,
                });
            }
        }
        Ok(())
    }

    /// A `RUN --mount=type=bind`: a read-only bind, a writable copy of a file, or an overlay
    /// whose writes are thrown away.
    async fn bind_mount(
        &self,
        m: &Mount,
        inputs: &[Resolved<Output>],
        held: &mut Held,
    ) -> Result<MountSpec, SolveError> {
        let target = m.target.clone();
        let source = match m.input {
            None => {
                let d =
                    tempfile::tempdir_in(self.scratch.path()).map_err(|source| EngineError::CreateDir {
                        path: self.scratch.path().into(),
                        source,
                    })?;
                let p = d.path().to_path_buf();
                held.dirs.push(d);
                p
            }
            Some(i) => match Self::input(inputs, i)? {
                Output::Local(ctx) => {
                    let view = self.context_view(ctx, held)?;
                    super::confined(&view, &m.selector)?
                }
                Output::Fs(layers) => {
                    let lower = self.lower_dirs(layers).await?;
                    let lower = if lower.is_empty() {
                        vec![self.empty.clone()]
                    } else {
                        lower
                    };
                    let view = self.writable_or_ro_view(&lower, m.readonly, held)?;
                    super::confined(&view, &m.selector)?
                }
            },
        };
        if m.readonly {
            Ok(MountSpec::Bind {
                source,
                target,
                readonly: true,
            })
        } else if !source.is_dir() {
            // A file: writes go to a copy of it, dropped after the step (an overlay
            // cannot be mounted on a file).
            let dir = tempfile::tempdir_in(self.scratch.path()).map_err(|source| EngineError::CreateDir {
                path: self.scratch.path().into(),
                source,
            })?;
            let copy = dir.path().join("file");
            held.dirs.push(dir);
            copy_file_with_owner(&source, &copy).map_err(|source| EngineError::CreateDir {
                path: copy.clone(),
                source,
            })?;
            Ok(MountSpec::Bind {
                source: copy,
                target,
                readonly: false,
            })
        } else {
            // Writes to a bind mount are discarded: give it a throw-away upper dir.
            let upper = self.scratch_dir("bind-upper-")?;
            let work = self.scratch_dir("bind-work-")?;
            Ok(MountSpec::Overlay {
                lower: vec![source],
                upper: Some((upper, work)),
                target,
            })
        }
    }

    /// A view of `lower` for a bind mount's selector: the dir itself or an overlay mounted here.
    /// The context as BuildKit would have transferred it: `.dockerignore`d paths hidden.
    fn context_view(&self, ctx: &super::LocalContext, held: &mut Held) -> Result<PathBuf, SolveError> {
        match mounts::context_view(self.mount_area.path(), &ctx.root, &ctx.index.hidden)? {
            mounts::View::Dir(p) => Ok(p),
            mounts::View::Mounted(m) => {
                let p = m.path.clone();
                held.mounts.push(m);
                Ok(p)
            }
        }
    }

    fn writable_or_ro_view(
        &self,
        lower: &[PathBuf],
        _readonly: bool,
        held: &mut Held,
    ) -> Result<PathBuf, SolveError> {
        match mounts::read_only_view(self.mount_area.path(), &self.empty, lower)? {
            mounts::View::Dir(p) => Ok(p),
            mounts::View::Mounted(m) => {
                let p = m.path.clone();
                held.mounts.push(m);
                Ok(p)
            }
        }
    }

    /// The persistent directory of a cache mount, created (and seeded from `from`) on first use.
    #[allow(clippy::too_many_arguments)]
    async fn cache_mount_dir(
        &self,
        id: &str,
        sharing: CacheSharing,
        mode: u32,
        uid: u32,
        gid: u32,
        m: &Mount,
        inputs: &[Resolved<Output>],
        held: &mut Held,
    ) -> Result<PathBuf, SolveError> {
        let dir = self.cache_mount_path(id);
        let base = self.store.cache_dir().join("mounts");
        let name = blake3::hash(id.as_bytes()).to_hex().to_string();
        let err = |source| ExecError::CacheMount {
            id: id.into(),
            path: base.join(&name),
            source,
        };
        std::fs::create_dir_all(&base).map_err(err)?;
        let lock_file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(base.join(format!("{name}.lock")))
            .map_err(err)?;
        let dir = match sharing {
            CacheSharing::Shared => {
                lock_file.lock_shared().map_err(err)?;
                held.locks.push(lock_file);
                dir
            }
            CacheSharing::Locked => {
                let f = lock_file;
                tokio::task::block_in_place(|| f.lock()).map_err(err)?;
                held.locks.push(f);
                dir
            }
            CacheSharing::Private => {
                if lock_file.try_lock().is_ok() {
                    held.locks.push(lock_file);
                    dir
                } else {
                    // In use: this run gets a directory of its own, dropped afterwards.
                    let d = tempfile::tempdir_in(self.scratch.path()).map_err(err)?;
                    let p = d.path().join("cache");
                    held.dirs.push(d);
                    p
                }
            }
        };
        if !dir.exists() {
            // Named after this process: a killed build's is removed by the next command.
            let tmp = base.join(kiln_cache::temp::name(&format!(".{name}.kiln-"), ".new"));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(err)?;
            let imported = self.cache_source().and_then(|s| s.mount_seed(id));
            if let Some(seed) = imported {
                // Exported with an imported cache (`cache-mounts=`): its contents, as they were
                // when that build ended, replace the `from=` seed, as a kept mount would.
                self.fetch_blob(&seed.blob).await?;
                let file = self
                    .store
                    .content()
                    .open(&seed.blob)
                    .map_err(|_| super::EngineError::MissingBlob { blob: seed.blob })?;
                let target = tmp.clone();
                tokio::task::block_in_place(|| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
                    let reader = kiln_cache::layer::sniff(file)?;
                    kiln_cache::layer::apply(reader, &target, &Default::default())?;
                    Ok(())
                })
                .map_err(|source| super::EngineError::Unpack {
                    blob: seed.blob,
                    source,
                })?;
            } else if let Some(i) = m.input {
                let seed = match Self::input(inputs, i)? {
                    Output::Local(ctx) => {
                        let view = self.context_view(ctx, held)?;
                        super::confined(&view, &m.selector)?
                    }
                    Output::Fs(layers) => {
                        let lower = self.lower_dirs(layers).await?;
                        let view = self.writable_or_ro_view(&lower, true, held)?;
                        super::confined(&view, &m.selector)?
                    }
                };
                super::file::copy_tree_into(&seed, &tmp)?;
            }
            std::os::unix::fs::lchown(&tmp, Some(uid), Some(gid)).map_err(err)?;
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .map_err(err)?;
            if let Err(e) = std::fs::rename(&tmp, &dir) {
                let _ = std::fs::remove_dir_all(&tmp);
                if !dir.exists() {
                    return Err(err(e).into());
                }
            }
        }
        self.note_mount(id, &base.join(&name));
        Ok(dir)
    }
}

/// Kills a container's pid 1 (which ignores signals it has no handler for, but not this one).
const SIGKILL: i32 = 9;

/// Copies a regular file (following a symlink, as the mount would) with its mode and owner.
fn copy_file_with_owner(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(from)?;
    std::fs::copy(from, to)?;
    std::os::unix::fs::chown(to, Some(md.uid()), Some(md.gid()))?;
    std::fs::set_permissions(to, md.permissions())
}

/// Writes a secret file readable only by its owner.
fn write_private(path: &std::path::Path, data: &[u8], mode: u32, uid: u32, gid: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    Ok(())
}
/// `--ulimit`s as the runtime sets them (`-1`, unlimited, is `RLIM_INFINITY`).
fn rlimits(ulimits: &[kiln_dag::Ulimit]) -> Vec<kiln_runtime::Rlimit> {
    ulimits
        .iter()
        .map(|u| kiln_runtime::Rlimit {
            name: u.name.clone(),
            soft: u.soft as u64,
            hard: u.hard as u64,
        })
        .collect()
}
