//! `kiln build`: the flags become a [`kiln_build::BuildRequest`]; the build itself (contexts,
//! lowering, solve, export, outputs, pushes) is `kiln_build::build`. This file renders its
//! progress and errors and writes `--iidfile` and `--metadata-file`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::Args;
use kiln_build::{BuildError, BuildRequest, BuildResult, ContextSource, Dockerfile, DockerfileSource};

use crate::Globals;

/// `kiln build` flags (Docker's names).
#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Name and optionally a tag (name:tag); repeatable
    #[arg(short = 't', long = "tag")]
    pub tags: Vec<String>,
    /// Name of the Dockerfile (default: PATH/Dockerfile; `-` reads it from stdin)
    #[arg(short = 'f', long = "file")]
    pub file: Option<String>,
    /// Set a build-time variable (KEY=VALUE, or KEY to take it from the environment)
    #[arg(long = "build-arg")]
    pub build_args: Vec<String>,
    /// Set the target build stage to build
    #[arg(long)]
    pub target: Option<String>,
    /// Do not use cache when building the image
    #[arg(long)]
    pub no_cache: bool,
    /// Do not cache the specified stages
    #[arg(long = "no-cache-filter", value_delimiter = ',')]
    pub no_cache_filter: Vec<String>,
    /// Set metadata for an image (KEY=VALUE)
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Set target platforms for build: os/arch[/variant], comma-separated (one image per platform; foreign ones run RUN under QEMU emulation)
    #[arg(long)]
    pub platform: Option<String>,
    /// Set type of progress output (auto, tty, plain, quiet, rawjson)
    #[arg(long, default_value = "auto")]
    pub progress: String,
    /// Suppress the build output and print image ID on success
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Write the image ID to the file
    #[arg(long)]
    pub iidfile: Option<PathBuf>,
    /// Write build result metadata to the file
    #[arg(long = "metadata-file")]
    pub metadata_file: Option<PathBuf>,
    /// Output destination (type=image|registry|docker|oci|tar|local,dest=PATH,name=REF,push=true)
    #[arg(short = 'o', long = "output")]
    pub outputs: Vec<String>,
    /// Push the image to its registries (shorthand for `--output=type=image,push=true`)
    #[arg(long)]
    pub push: bool,
    /// External cache sources (type=registry,ref=REF | type=local,src=DIR | REF); repeatable
    #[arg(long = "cache-from")]
    pub cache_from: Vec<String>,
    /// Cache export destinations (type=registry,ref=REF[,mode=min|max,...] | type=local,dest=DIR | type=inline); repeatable
    #[arg(long = "cache-to")]
    pub cache_to: Vec<String>,
    /// Keep the image in the local store (always done; accepted for Docker's muscle memory)
    #[arg(long)]
    pub load: bool,
    /// Maximum number of steps run at once (default: 4 per CPU)
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Allow extra privileged entitlement (network.host, security.insecure)
    #[arg(long = "allow")]
    pub allow: Vec<String>,
    /// Set the networking mode for the RUN instructions during build (default, none, host)
    #[arg(long, default_value = "default")]
    pub network: String,
    /// How RUN steps are isolated: default, or chroot for kiln inside an unprivileged container (no pid namespace; the container's network where no other can be made)
    #[arg(long, env = "KILN_ISOLATION", default_value = "default")]
    pub isolation: String,
    /// Add a custom host-to-IP mapping (format: "host:ip")
    #[arg(long = "add-host")]
    pub add_hosts: Vec<String>,
    /// Shared memory size for build containers (/dev/shm of RUN steps: 64m, 1g, bytes)
    #[arg(long = "shm-size")]
    pub shm_size: Option<String>,
    /// Ulimit options for RUN steps (TYPE=SOFT[:HARD], e.g. nofile=1024:2048); repeatable
    #[arg(long = "ulimit")]
    pub ulimits: Vec<String>,
    /// Add annotation to the image ([TYPE[,TYPE...]:]KEY=VALUE; TYPE: manifest, index, manifest-descriptor, index-descriptor, with an optional [os/arch] qualifier); repeatable
    #[arg(long = "annotation")]
    pub annotations: Vec<String>,
    /// Secret to expose to the build (id=ID,src=FILE or id=ID,env=VAR)
    #[arg(long = "secret")]
    pub secrets: Vec<String>,
    /// SSH agent socket or keys to expose to the build (default|ID[=SOCKET])
    #[arg(long = "ssh")]
    pub ssh: Vec<String>,
    /// Always attempt to pull a newer version of the base images
    #[arg(long)]
    pub pull: bool,
    /// Additional build context (name=PATH|docker-image://REF|oci-layout://PATH|GIT-URL|URL)
    #[arg(long = "build-context")]
    pub build_contexts: Vec<String>,
    /// Shorthand for "--call=check"
    #[arg(long)]
    pub check: bool,
    /// Set method for evaluating build ("build", "check", "outline", "targets")
    #[arg(long = "call", default_value = "build")]
    pub call: String,
    /// Build context: a directory, `-` (a tar archive or a Dockerfile on stdin), a Git URL or
    /// an http(s) URL (a tarball or a Dockerfile)
    pub context: String,
}

/// Parses `KEY=VALUE` (or `KEY`, taking the value from the environment; absent = not set).
pub fn parse_kv_args(args: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in args {
        match a.split_once('=') {
            Some(("", _)) => bail!("invalid {what} `{a}`: empty name"),
            Some((k, v)) => {
                out.insert(k.to_string(), v.to_string());
            }
            None => {
                if let Ok(v) = std::env::var(a) {
                    out.insert(a.clone(), v);
                }
            }
        }
    }
    Ok(out)
}

/// What `--call` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Build,
    Check,
    Outline,
    Targets,
}

/// Parses `--call` (`NAME[,format=text]`; buildx's `--check` is `--call=check`).
fn parse_call(args: &BuildArgs) -> anyhow::Result<Call> {
    if args.check {
        return Ok(Call::Check);
    }
    let mut parts = args.call.split(',');
    let name = parts.next().unwrap_or_default().trim();
    for opt in parts {
        match opt.trim().split_once('=') {
            Some(("format", "text")) => {}
            Some(("format", f)) => bail!(
                "invalid --call `{}`: format `{f}` is not supported (kiln prints text)",
                args.call
            ),
            _ => bail!("invalid --call `{}`: unknown option `{opt}`", args.call),
        }
    }
    Ok(match name {
        "build" | "" => Call::Build,
        "check" | "lint" => Call::Check,
        "outline" => Call::Outline,
        "targets" => Call::Targets,
        other => bail!("invalid --call `{other}`: expected build, check, outline or targets"),
    })
}

/// The short form of a warning, expanded with its description, URL and the Dockerfile lines
/// when `debug` (buildx's `--debug` output).
fn warning_text(w: &kiln_frontend::lower::Warning, dockerfile: &Dockerfile, debug: bool) -> String {
    if debug && !w.rule.is_empty() {
        kiln_frontend::lint::expanded_text(w, &dockerfile.name, &dockerfile.bytes)
    } else {
        w.to_string()
    }
}

/// `--call=check`: the checks of every stage (or of `--target`'s) as `lowered` found them,
/// printed as buildx prints them; exit 1 when any warning or error is found.
fn report_check(
    lowered: Result<Vec<kiln_frontend::lower::Warning>, Box<kiln_frontend::lower::FrontendError>>,
    dockerfile: &Dockerfile,
) -> std::process::ExitCode {
    let (warnings, error) = match lowered {
        Ok(w) => (w, None),
        Err(e) => (e.warnings.clone(), Some(e)),
    };
    // Notices (an unsupported `# syntax=`) are no check results.
    let (mut checks, notices): (Vec<_>, Vec<_>) = warnings.into_iter().partition(|w| !w.rule.is_empty());
    for n in &notices {
        eprintln!("WARNING: {n}");
    }
    checks.sort_by_key(|w| (w.line == 0, w.line));
    let mut out = String::new();
    match checks.len() {
        0 => {}
        1 => out.push_str("Check complete, 1 warning has been found!\n"),
        n => out.push_str(&format!("Check complete, {n} warnings have been found!\n")),
    }
    for w in &checks {
        out.push_str(&kiln_frontend::lint::check_text(
            w,
            &dockerfile.name,
            &dockerfile.bytes,
        ));
    }
    if checks.is_empty() && error.is_none() {
        out.push_str("Check complete, no warnings found.\n");
    }
    print!("{out}");
    if let Some(e) = error {
        if !checks.is_empty() {
            println!();
        }
        eprintln!("ERROR: {}", render_frontend_error(&e, dockerfile).trim_end());
        return std::process::ExitCode::from(1);
    }
    if checks.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}

/// A frontend error as kiln prints it: lint violations as BuildKit words them, anything else
/// compiler-style with the Dockerfile line.
fn render_frontend_error(e: &kiln_frontend::lower::FrontendError, dockerfile: &Dockerfile) -> String {
    match &*e.kind {
        kiln_frontend::lower::LowerError::LintViolation { .. } => e.kind.to_string(),
        _ => e.render(&dockerfile.bytes),
    }
}

/// A failed lowering of a build: the checks' warnings found before the error first, as buildx
/// shows them, then the error.
fn print_lower_failure(e: &kiln_frontend::lower::FrontendError, dockerfile: &Dockerfile, debug: bool) {
    if !e.warnings.is_empty() {
        let n = e.warnings.len();
        let mut text = format!(
            "\n {n} warning{} found{}:\n",
            if n == 1 { "" } else { "s" },
            if debug { "" } else { " (use --debug to expand)" }
        );
        for w in &e.warnings {
            text.push_str(&format!(" - {}\n", warning_text(w, dockerfile, debug)));
        }
        eprint!("{text}");
    }
    match &*e.kind {
        kiln_frontend::lower::LowerError::LintViolation { .. } => eprintln!("ERROR: {}", e.kind),
        _ => eprintln!("{}", e.render(&dockerfile.bytes).trim_end()),
    }
}

/// `--call=outline`: the target's build arguments, secrets and SSH sockets (buildx's text form).
fn print_outline(o: &kiln_frontend::lower::Outline) {
    let mut out = String::new();
    if !o.name.is_empty() || !o.description.is_empty() {
        let mut rows = vec![vec![
            "TARGET:".to_string(),
            if o.name.is_empty() {
                "(default)".to_string()
            } else {
                o.name.clone()
            },
        ]];
        if !o.description.is_empty() {
            rows.push(vec!["DESCRIPTION:".into(), o.description.clone()]);
        }
        out.push_str(&tabwrite(&rows, 1));
        out.push('\n');
    }
    if !o.args.is_empty() {
        let mut rows = vec![vec!["BUILD ARG".into(), "VALUE".into(), "DESCRIPTION".into()]];
        rows.extend(
            o.args
                .iter()
                .map(|a| vec![a.name.clone(), a.value.clone(), a.description.clone()]),
        );
        out.push_str(&tabwrite(&rows, 3));
        out.push('\n');
    }
    for (title, list) in [("SECRET", &o.secrets), ("SSH", &o.ssh)] {
        if list.is_empty() {
            continue;
        }
        let mut rows = vec![vec![title.to_string(), "REQUIRED".into()]];
        rows.extend(list.iter().map(|m| {
            vec![
                m.name.clone(),
                if m.required { "true".into() } else { String::new() },
            ]
        }));
        out.push_str(&tabwrite(&rows, 3));
        out.push('\n');
    }
    print!("{out}");
}

/// `--call=targets`: the stages with their descriptions, the default one marked.
fn print_targets(targets: &[kiln_frontend::lower::Target]) {
    let mut rows = vec![vec!["TARGET".to_string(), "DESCRIPTION".to_string()]];
    for t in targets {
        let name = match (t.name.is_empty(), t.default) {
            (true, true) => "(default)".to_string(),
            (false, true) => format!("{} (default)", t.name),
            _ => t.name.clone(),
        };
        rows.push(vec![name, t.description.clone()]);
    }
    print!("{}", tabwrite(&rows, 1));
}

/// Go's `text/tabwriter` with minwidth 0, tabwidth 0, pad character ' ' and no flags, for
/// rows of the same number of cells: every cell but the last of a row padded to its column's
/// widest cell plus `padding`.
fn tabwrite(rows: &[Vec<String>], padding: usize) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate().take(r.len().saturating_sub(1)) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            out.push_str(c);
            if i + 1 < r.len() {
                out.push_str(&" ".repeat(widths[i] - c.chars().count() + padding));
            }
        }
        out.push('\n');
    }
    out
}

fn parse_secrets(specs: &[String]) -> anyhow::Result<BTreeMap<String, kiln_solver::engine::Secret>> {
    let mut out = BTreeMap::new();
    for s in specs {
        let mut id = None;
        let mut src = None;
        let mut env = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("src" | "source", v)) => src = Some(v.to_string()),
                Some(("env", v)) => env = Some(v.to_string()),
                Some(("type", "file" | "env")) => {}
                _ => bail!("invalid --secret `{s}`: expected id=ID,src=FILE or id=ID,env=VAR"),
            }
        }
        let id = id
            .or_else(|| env.clone())
            .with_context(|| format!("invalid --secret `{s}`: missing id"))?;
        let data = match (src, env) {
            (Some(path), _) => {
                std::fs::read(&path).with_context(|| format!("failed to read secret file `{path}`"))?
            }
            (None, Some(var)) => std::env::var(&var)
                .with_context(|| format!("secret `{id}`: environment variable `{var}` is not set"))?
                .into_bytes(),
            (None, None) => match std::env::var(&id) {
                Ok(v) => v.into_bytes(),
                Err(_) => bail!("invalid --secret `{s}`: give src=FILE or env=VAR"),
            },
        };
        out.insert(id, kiln_solver::engine::Secret { data });
    }
    Ok(out)
}

fn parse_ssh(specs: &[String]) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for s in specs {
        let (id, path) = match s.split_once('=') {
            Some((id, path)) => (id.to_string(), PathBuf::from(path)),
            None => {
                let sock = std::env::var_os("SSH_AUTH_SOCK")
                    .with_context(|| format!("--ssh {s}: SSH_AUTH_SOCK is not set"))?;
                (s.clone(), PathBuf::from(sock))
            }
        };
        let meta = std::fs::metadata(&path)
            .with_context(|| format!("--ssh {s}: cannot use `{}`", path.display()))?;
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            bail!(
                "--ssh {s}: `{}` is not a Unix socket (only SSH agent sockets are supported, not key files)",
                path.display()
            );
        }
        out.insert(id, path);
    }
    Ok(out)
}

fn source_date_epoch(build_args: &BTreeMap<String, String>) -> anyhow::Result<Option<i64>> {
    let raw = build_args
        .get("SOURCE_DATE_EPOCH")
        .cloned()
        .or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok());
    match raw {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v
            .parse::<i64>()
            .map(Some)
            .with_context(|| format!("invalid SOURCE_DATE_EPOCH `{v}`")),
    }
}

/// Whether an environment variable holds one of BuildKit's truthy spellings.
fn env_truthy(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "True" | "TRUE"))
}

/// The `--build-context name=VALUE` flags as a map; a name may be given once.
fn parse_build_contexts(specs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for spec in specs {
        let (name, value) = spec
            .split_once('=')
            .filter(|(n, v)| !n.is_empty() && !v.is_empty())
            .with_context(|| format!("invalid --build-context `{spec}`: expected name=VALUE"))?;
        let name = name.trim().to_string();
        if out.contains_key(&name) {
            bail!("invalid --build-context `{spec}`: `{name}` is given twice");
        }
        out.insert(name, value.to_string());
    }
    Ok(out)
}

/// An `--add-host` value as buildx reads it: `host=ip`, else `host:ip` (split at the first
/// colon, so that an IPv6 address may follow), the address an IP address.
fn parse_add_host(h: &str) -> anyhow::Result<(String, String)> {
    let (host, ip) = h
        .split_once('=')
        .or_else(|| h.split_once(':'))
        .filter(|(host, ip)| !host.is_empty() && !ip.is_empty())
        .with_context(|| format!("invalid host {h}"))?;
    if ip == "host-gateway" {
        bail!("invalid host {h}: host-gateway is not supported by kiln (RUN steps reach the host at the kiln0 bridge's gateway, 10.88.0.1)");
    }
    let addr: std::net::IpAddr = ip.parse().map_err(|_| anyhow::anyhow!("invalid host {h}"))?;
    Ok((host.to_string(), addr.to_string()))
}

/// The warning a build with chroot isolation starts with: what its RUN steps lack.
fn warn_isolation(isolation: kiln_runtime::Isolation) {
    if isolation == kiln_runtime::Isolation::Chroot {
        let lost = kiln_runtime::isolation::chroot_losses(
            kiln_runtime::isolation::own_network(),
            kiln_runtime::isolation::own_pid_namespace(),
        );
        eprintln!(
            "WARNING: --isolation=chroot: RUN steps lack, compared with the default isolation: {}",
            lost.join("; ")
        );
    }
}

/// The flags as a build request.
fn request(args: &BuildArgs) -> anyhow::Result<BuildRequest> {
    let platforms = match &args.platform {
        Some(p) => kiln_dag::Platform::parse_list(p).context("invalid --platform")?,
        None => Vec::new(),
    };
    let mut entitlements = kiln_build::Entitlements::default();
    for a in args.allow.iter().flat_map(|a| a.split(',')) {
        match a.trim() {
            "network.host" => entitlements.network_host = true,
            "security.insecure" => entitlements.security_insecure = true,
            other => bail!("invalid --allow `{other}`: expected network.host or security.insecure"),
        }
    }
    // buildx: `host` also grants the entitlement (asking for it is the permission); `none`
    // and `default` need none.
    let network = match args.network.as_str() {
        "" | "default" => kiln_dag::NetworkMode::Default,
        "none" => kiln_dag::NetworkMode::None,
        "host" => {
            entitlements.network_host = true;
            kiln_dag::NetworkMode::Host
        }
        other => bail!(
            "network mode {other:?} not supported by buildkit - you can define a custom network for your builder using the network driver-opt in buildx create"
        ),
    };
    let extra_hosts = args
        .add_hosts
        .iter()
        .map(|h| parse_add_host(h))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let outputs = kiln_build::parse_outputs(&args.outputs, args.push)?;
    let tags = args
        .tags
        .iter()
        .map(|t| kiln_cache::reference::Reference::parse(t).with_context(|| format!("invalid tag `{t}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let build_args = parse_kv_args(&args.build_args, "build argument")?;

    let stdin = || -> Box<dyn std::io::Read + Send> { Box::new(std::io::stdin()) };
    let context = if args.context == "-" {
        use std::io::IsTerminal as _;
        if args.file.as_deref() == Some("-") {
            bail!("invalid argument: can't use stdin for both the build context and the Dockerfile (`-f -` with context `-`)");
        }
        if std::io::stdin().is_terminal() {
            bail!("the build context is `-` but stdin is a terminal: pipe a tar archive or a Dockerfile into kiln");
        }
        ContextSource::Stream(stdin())
    } else {
        ContextSource::from_arg(&args.context)
    };
    let mut req = BuildRequest::new(context);
    req.dockerfile = match args.file.as_deref() {
        None => DockerfileSource::Default,
        Some("-") => DockerfileSource::Stream(stdin()),
        Some(f) => DockerfileSource::Path(f.to_string()),
    };
    req.named_contexts = parse_build_contexts(&args.build_contexts)?;
    req.source_date_epoch = source_date_epoch(&build_args)?;
    req.build_args = build_args;
    req.target = args.target.clone();
    req.platforms = platforms;
    req.labels = parse_kv_args(&args.labels, "label")?;
    req.no_cache = args.no_cache;
    req.no_cache_filter = args.no_cache_filter.clone();
    req.pull = args.pull;
    req.tags = tags;
    req.outputs = outputs;
    req.secrets = parse_secrets(&args.secrets)?;
    req.ssh = parse_ssh(&args.ssh)?;
    req.entitlements = entitlements;
    req.keep_git_dir = env_truthy("BUILDKIT_CONTEXT_KEEP_GIT_DIR");
    req.jobs = args.jobs;
    req.network = network;
    req.isolation = args.isolation.parse()?;
    req.extra_hosts = extra_hosts;
    // buildx: `--shm-size` in Docker's size syntax; 0 (or none) keeps the 64 MiB default.
    req.shm_size = match args.shm_size.as_deref() {
        None => None,
        Some(s) => {
            Some(kiln_dag::units::ram_in_bytes(s).with_context(|| format!("invalid --shm-size `{s}`"))?)
                .filter(|n| *n > 0)
        }
    };
    for a in &args.annotations {
        req.annotations.extend(kiln_build::parse_annotation(a)?);
    }
    req.ulimits = args
        .ulimits
        .iter()
        .map(|u| kiln_dag::units::parse_ulimit(u).with_context(|| format!("invalid --ulimit `{u}`")))
        .collect::<anyhow::Result<_>>()?;
    req.registry = kiln_source::registry::ClientOptions::from_env();
    req.cache_from = args
        .cache_from
        .iter()
        .map(|s| kiln_build::parse_cache_from(s))
        .collect::<Result<_, _>>()?;
    req.cache_to = args
        .cache_to
        .iter()
        .map(|s| kiln_build::parse_cache_to(s))
        .collect::<Result<_, _>>()?;
    Ok(req)
}

/// How a `kiln build` ended without an error to print.
enum Outcome {
    Built(Box<BuildResult>),
    /// `--call` printed its result; the exit code.
    Called(std::process::ExitCode),
}

/// Runs a blocking step of the build on tokio's blocking threads.
async fn blocking<T: Send + 'static>(
    step: &'static str,
    f: impl FnOnce() -> Result<T, BuildError> + Send + 'static,
) -> Result<T, BuildError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| BuildError::Panicked { step })?
}

/// The build step by step: contexts, then `--call`'s evaluation or the lowering (its warnings
/// rendered for the progress, expanded with `--debug`), the solve, export, outputs and pushes.
async fn drive(
    store: std::sync::Arc<kiln_cache::Store>,
    req: BuildRequest,
    call: Call,
    debug: bool,
    progress: kiln_build::ProgressSink,
    cancel: kiln_build::CancelToken,
) -> Result<Outcome, BuildError> {
    use std::process::ExitCode;
    let all_stages = call == Call::Check && req.target.is_none();
    let prepared = {
        let (store, progress, cancel) = (store.clone(), progress.clone(), cancel.clone());
        blocking("context", move || {
            kiln_build::prepare(&store, req, &progress, &cancel)
        })
        .await?
    };
    let dockerfile = prepared.inputs().dockerfile.clone();
    if call == Call::Targets {
        return Ok(Outcome::Called(
            match kiln_frontend::lower::targets(&dockerfile.bytes, &dockerfile.name) {
                Ok(t) => {
                    print_targets(&t);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}", e.render(&dockerfile.bytes).trim_end());
                    ExitCode::from(1)
                }
            },
        ));
    }
    let lowered = {
        let (store, progress) = (store.clone(), progress.clone());
        blocking("lowering", move || {
            prepared.lower_with_progress(&store, all_stages, &progress)
        })
        .await
    };
    match call {
        Call::Check => {
            let found = match lowered {
                Ok(p) => Ok(p.lowered().warnings.clone()),
                Err(BuildError::Lower { error, .. }) => Err(error),
                Err(e) => return Err(e),
            };
            return Ok(Outcome::Called(report_check(found, &dockerfile)));
        }
        Call::Outline => {
            return Ok(Outcome::Called(match lowered {
                Ok(p) => {
                    print_outline(&p.lowered().outline);
                    ExitCode::SUCCESS
                }
                Err(BuildError::Lower { error, .. }) => {
                    eprintln!("{}", render_frontend_error(&error, &dockerfile).trim_end());
                    ExitCode::from(1)
                }
                Err(e) => return Err(e),
            }));
        }
        Call::Build | Call::Targets => {}
    }
    let planned = lowered?;
    for w in &planned.lowered().warnings {
        progress.warn(warning_text(w, &dockerfile, debug));
    }
    let built = planned.build(store, progress, cancel).await?;
    Ok(Outcome::Built(Box::new(built)))
}

/// `kiln build`.
pub fn run(args: BuildArgs, g: &Globals) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;

    let req = request(&args)?;
    let call = parse_call(&args)?;
    warn_isolation(req.isolation);
    let progress_mode: crate::progress::ProgressMode = if args.quiet {
        crate::progress::ProgressMode::Quiet
    } else {
        args.progress.parse()?
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start tokio")?;
    // Ctrl-C (or SIGTERM) cancels the build from here on: steps are killed, temporary files
    // and mounts removed, and kiln exits non-zero.
    let cancel = kiln_build::CancelToken::new();
    let signals = watch_signals(&rt, &cancel)?;

    let store = std::sync::Arc::new(kiln_cache::Store::open(&g.root)?);
    let debug = g.debug;
    let gc_store = store.clone();
    let outcome = rt.block_on(async move {
        let display = crate::progress::start(progress_mode, debug);
        let outcome = drive(store, req, call, debug, display.sink(), cancel).await;
        match &outcome {
            Ok(_) => display.finish(None).await,
            Err(e) => display.finish(Some(e)).await,
        }
        outcome
    });
    let built = match outcome {
        Ok(Outcome::Built(b)) => b,
        Ok(Outcome::Called(code)) => return Ok(code),
        Err(BuildError::Lower { dockerfile, error }) => {
            print_lower_failure(&error, &dockerfile, debug);
            return Ok(ExitCode::from(1));
        }
        Err(BuildError::Solve { dockerfile, error }) => {
            eprintln!("{}", describe_failure(&error, &dockerfile));
            return Ok(ExitCode::from(1));
        }
        Err(BuildError::Cancelled) => {
            eprintln!("ERROR: failed to solve: cancelled");
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e.into()),
    };
    // Several platforms: the index's digest is the ID, as buildx writes it.
    let id = match &built.index {
        Some(ix) => ix.digest.to_string(),
        None => built.image().id().to_string(),
    };
    if let Some(p) = &args.iidfile {
        std::fs::write(p, &id).with_context(|| format!("failed to write `{}`", p.display()))?;
    }
    if let Some(p) = &args.metadata_file {
        std::fs::write(p, serde_json::to_vec_pretty(&built.metadata())?)
            .with_context(|| format!("failed to write `{}`", p.display()))?;
    }
    if args.quiet {
        println!("{id}");
    }
    signals.abort();
    // The build's hold on the store ended with it; a prune may take the store now.
    super::system::auto_gc(&gc_store);
    // Everything the build started has finished (the engine joined its threads when it was
    // dropped): the runtime's idle workers need not be woken and joined one by one before the
    // process exits, which took ~1 ms.
    rt.shutdown_background();
    Ok(ExitCode::SUCCESS)
}

/// Cancels `cancel` on SIGINT or SIGTERM. The handlers are installed before this returns, so a
/// signal from then on no longer kills the process outright.
fn watch_signals(
    rt: &tokio::runtime::Runtime,
    cancel: &kiln_solver::scheduler::CancelToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let _enter = rt.enter();
    let mut int = signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let cancel = cancel.clone();
    Ok(rt.spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        cancel.cancel();
    }))
}

/// The failure line BuildKit users know: the step, its Dockerfile location, the cause.
fn describe_failure(e: &kiln_solver::scheduler::SolveError, dockerfile: &kiln_build::Dockerfile) -> String {
    use std::fmt::Write as _;
    // The outermost error only names the vertex; the causes say what went wrong.
    let mut chain = Vec::new();
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        chain.push(err.to_string());
        src = err.source();
    }
    let Some(v) = e.vertex() else {
        return format!("ERROR: failed to solve: {}", chain.join(": "));
    };
    let mut out = format!("ERROR: failed to solve: {}: {}", v.name, chain[1..].join(": "));
    if let Some(loc) = &v.location {
        let lines: Vec<&[u8]> = dockerfile.bytes.split(|b| *b == b'\n').collect();
        out.push('\n');
        for n in loc.start_line..=loc.end_line {
            if let Some(l) = lines.get((n as usize).saturating_sub(1)) {
                let _ = writeln!(out, "{}:{}: {}", dockerfile.name, n, String::from_utf8_lossy(l));
            }
        }
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_needs_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "not a socket").unwrap();
        let err = parse_ssh(&[format!("default={}", file.display())]).unwrap_err();
        assert!(format!("{err:#}").contains("not a Unix socket"), "{err:#}");
        let sock = dir.path().join("agent.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let got = parse_ssh(&[format!("default={}", sock.display())]).unwrap();
        assert_eq!(got.get("default"), Some(&sock));
    }
}
