//! `kiln build`: Dockerfile → image in the local store (or an archive / directory).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;

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
    /// Set target platform for build (only the host's platform is supported)
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
    /// Output destination (type=image|docker|oci|tar|local,dest=PATH)
    #[arg(short = 'o', long = "output")]
    pub outputs: Vec<String>,
    /// Maximum number of steps run at once (default: 4 per CPU)
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Allow extra privileged entitlement (network.host, security.insecure)
    #[arg(long = "allow")]
    pub allow: Vec<String>,
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

/// What the frontend needs, read from disk and flags.
pub struct BuildInputs {
    pub context: PathBuf,
    pub dockerfile_name: String,
    pub dockerfile: Vec<u8>,
    pub dockerignore: Vec<String>,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
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

impl BuildInputs {
    /// Reads the Dockerfile and the applicable `.dockerignore` for a context directory.
    pub fn read(
        context: &Path,
        file: Option<&str>,
        build_args: &[String],
        target: Option<String>,
        _g: &Globals,
    ) -> anyhow::Result<BuildInputs> {
        let meta = std::fs::metadata(context).with_context(|| {
            format!(
                "unable to prepare context: path `{}` not found",
                context.display()
            )
        })?;
        if !meta.is_dir() {
            bail!(
                "unable to prepare context: `{}` is not a directory",
                context.display()
            );
        }
        let (dockerfile_name, dockerfile, df_path) = match file {
            Some("-") => {
                let mut buf = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut buf)
                    .context("failed to read the Dockerfile from stdin")?;
                ("Dockerfile".to_string(), buf, None)
            }
            Some(f) => {
                let p = PathBuf::from(f);
                let bytes = std::fs::read(&p).with_context(|| {
                    format!(
                        "failed to read dockerfile: open {}: no such file or directory",
                        p.display()
                    )
                })?;
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| f.to_string());
                (name, bytes, Some(p))
            }
            None => {
                let p = context.join("Dockerfile");
                let bytes = std::fs::read(&p).with_context(|| {
                    format!(
                        "failed to read dockerfile: open {}: no such file or directory",
                        p.display()
                    )
                })?;
                ("Dockerfile".to_string(), bytes, Some(p))
            }
        };
        BuildInputs::from_parts(
            context,
            dockerfile_name,
            dockerfile,
            df_path.as_deref(),
            build_args,
            target,
        )
    }

    /// Inputs from an already read Dockerfile: `df_path` (where it was read from, if a file)
    /// locates a `<Dockerfile>.dockerignore`; otherwise the context's `.dockerignore` applies.
    pub fn from_parts(
        context: &Path,
        dockerfile_name: String,
        dockerfile: Vec<u8>,
        df_path: Option<&Path>,
        build_args: &[String],
        target: Option<String>,
    ) -> anyhow::Result<BuildInputs> {
        // `<Dockerfile>.dockerignore` beside the Dockerfile wins over the context's `.dockerignore`.
        let specific = df_path.map(|p| {
            let mut s = p.as_os_str().to_owned();
            s.push(".dockerignore");
            PathBuf::from(s)
        });
        let ignore_file = match specific {
            Some(s) if s.is_file() => s,
            _ => context.join(".dockerignore"),
        };
        let dockerignore = match std::fs::read(&ignore_file) {
            Ok(bytes) => kiln_patterns::read_dockerignore(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("failed to read `{}`", ignore_file.display())),
        };
        kiln_patterns::Matcher::new(&dockerignore)
            .with_context(|| format!("invalid pattern in `{}`", ignore_file.display()))?;
        Ok(BuildInputs {
            context: context.to_path_buf(),
            dockerfile_name,
            dockerfile,
            dockerignore,
            build_args: parse_kv_args(build_args, "build argument")?,
            target,
        })
    }
}

/// Bridges the frontend to the image store.
struct StoreResolver<'a> {
    store: &'a kiln_cache::Store,
    /// `--pull`: re-resolve every tag against its registry.
    pull: bool,
}

impl kiln_frontend::lower::ImageResolver for StoreResolver<'_> {
    fn resolve(
        &self,
        reference: &str,
        platform: &kiln_dag::Platform,
    ) -> Result<kiln_frontend::lower::ResolvedImage, String> {
        let reference_norm = kiln_cache::reference::Reference::parse(reference)
            .map(|r| r.to_string())
            .unwrap_or_else(|_| reference.to_string());
        let image = match self.store.images().resolve(reference) {
            Ok(image) if !self.pull => image,
            local => crate::registry_cmds::pull_for_build(self.store, reference, platform, local)?,
        };
        Ok(kiln_frontend::lower::ResolvedImage {
            reference: reference_norm,
            digest: Some(image.manifest_digest),
            config: image.config,
        })
    }
}

/// Lowers the Dockerfile; the error is the rendered compiler-style message.
pub fn lower(inputs: &BuildInputs, g: &Globals) -> Result<kiln_frontend::lower::Lowered, String> {
    let store = kiln_cache::Store::open(&g.root).map_err(|e| format!("error: {e}\n"))?;
    lower_with(inputs, &store, &LowerExtras::default())
}

/// Lowering options that only `kiln build` sets.
#[derive(Default)]
pub struct LowerExtras {
    pub labels: BTreeMap<String, String>,
    pub no_cache: bool,
    pub no_cache_filter: Vec<String>,
    pub pull: bool,
    /// `--build-context` values.
    pub named_contexts: BTreeMap<String, kiln_frontend::lower::NamedContext>,
}

fn lower_with(
    inputs: &BuildInputs,
    store: &kiln_cache::Store,
    extras: &LowerExtras,
) -> Result<kiln_frontend::lower::Lowered, String> {
    lower_checked(inputs, store, extras, false).map_err(|e| e.render(&inputs.dockerfile))
}

/// Lowers the Dockerfile; `all_stages` lowers (and checks) every stage, as `--check` does
/// without `--target`.
fn lower_checked(
    inputs: &BuildInputs,
    store: &kiln_cache::Store,
    extras: &LowerExtras,
    all_stages: bool,
) -> Result<kiln_frontend::lower::Lowered, kiln_frontend::lower::FrontendError> {
    let opts = kiln_frontend::lower::LowerOptions {
        dockerfile_name: inputs.dockerfile_name.clone(),
        build_args: inputs.build_args.clone(),
        target: inputs.target.clone(),
        labels: extras.labels.clone(),
        no_cache: extras.no_cache,
        no_cache_filter: extras.no_cache_filter.clone(),
        dockerignore: inputs.dockerignore.clone(),
        named_contexts: extras.named_contexts.clone(),
        all_stages,
        ..Default::default()
    };
    kiln_frontend::lower::lower(
        &inputs.dockerfile,
        &opts,
        &StoreResolver {
            store,
            pull: extras.pull,
        },
    )
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
fn warning_text(w: &kiln_frontend::lower::Warning, inputs: &BuildInputs, debug: bool) -> String {
    if debug && !w.rule.is_empty() {
        kiln_frontend::lint::expanded_text(w, &inputs.dockerfile_name, &inputs.dockerfile)
    } else {
        w.to_string()
    }
}

/// `--call=check`: the checks of every stage (or of `--target`'s), printed as buildx prints
/// them; exit 1 when any warning or error is found.
fn run_check(
    inputs: &BuildInputs,
    store: &kiln_cache::Store,
    extras: &LowerExtras,
) -> std::process::ExitCode {
    let (warnings, error) = match lower_checked(inputs, store, extras, inputs.target.is_none()) {
        Ok(l) => (l.warnings, None),
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
            &inputs.dockerfile_name,
            &inputs.dockerfile,
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
        eprintln!("ERROR: {}", render_frontend_error(&e, inputs).trim_end());
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
fn render_frontend_error(e: &kiln_frontend::lower::FrontendError, inputs: &BuildInputs) -> String {
    match &*e.kind {
        kiln_frontend::lower::LowerError::LintViolation { .. } => e.kind.to_string(),
        _ => e.render(&inputs.dockerfile),
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

/// A parsed `-o` value.
#[derive(Debug, PartialEq, Eq)]
enum OutputSpec {
    Image,
    Docker(Option<PathBuf>),
    Oci(Option<PathBuf>),
    Tar(Option<PathBuf>),
    Local(PathBuf),
}

fn parse_output(s: &str) -> anyhow::Result<OutputSpec> {
    // `-o DIR` is `type=local,dest=DIR`; `-o -` is a tar on stdout.
    if !s.contains('=') {
        return Ok(if s == "-" {
            OutputSpec::Tar(None)
        } else {
            OutputSpec::Local(PathBuf::from(s))
        });
    }
    let mut kind = None;
    let mut dest = None;
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("invalid output `{s}`: `{part}` is not KEY=VALUE"))?;
        match k.trim() {
            "type" => kind = Some(v.trim().to_string()),
            "dest" => dest = Some(v.trim().to_string()),
            "name" | "push" | "compression" | "oci-mediatypes" => {}
            other => bail!("invalid output `{s}`: unknown key `{other}`"),
        }
    }
    let dest_path = dest.filter(|d| d != "-").map(PathBuf::from);
    match kind.as_deref() {
        Some("image") | None => Ok(OutputSpec::Image),
        Some("docker") => Ok(OutputSpec::Docker(dest_path)),
        Some("oci") => Ok(OutputSpec::Oci(dest_path)),
        Some("tar") => Ok(OutputSpec::Tar(dest_path)),
        Some("local") => match dest_path {
            Some(d) => Ok(OutputSpec::Local(d)),
            None => bail!("invalid output `{s}`: type=local needs dest=DIR"),
        },
        Some(other) => {
            bail!("invalid output `{s}`: unknown type `{other}` (expected image, docker, oci, tar or local)")
        }
    }
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

/// `kiln build`.
pub fn run(args: BuildArgs, g: &Globals) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;

    let host = kiln_dag::Platform::host();
    if let Some(p) = &args.platform {
        let wanted = kiln_dag::Platform::parse(p)
            .with_context(|| format!("invalid --platform `{p}`: expected os/arch[/variant]"))?;
        if wanted.os != host.os || wanted.architecture != host.architecture {
            bail!("--platform {p} is not supported: kiln builds for the host platform ({host}) only");
        }
    }
    let mut allow_network_host = false;
    let mut allow_insecure = false;
    for a in args.allow.iter().flat_map(|a| a.split(',')) {
        match a.trim() {
            "network.host" => allow_network_host = true,
            "security.insecure" => allow_insecure = true,
            other => bail!("invalid --allow `{other}`: expected network.host or security.insecure"),
        }
    }
    let outputs = args
        .outputs
        .iter()
        .map(|o| parse_output(o))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tags = args
        .tags
        .iter()
        .map(|t| kiln_cache::reference::Reference::parse(t).with_context(|| format!("invalid tag `{t}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let labels = parse_kv_args(&args.labels, "label")?;
    let call = parse_call(&args)?;
    let secrets = parse_secrets(&args.secrets)?;
    let ssh = parse_ssh(&args.ssh)?;
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
    let cancel = kiln_solver::scheduler::CancelToken::new();
    let signals = watch_signals(&rt, &cancel)?;

    let store = std::sync::Arc::new(kiln_cache::Store::open(&g.root)?);
    let hold = store.hold()?;
    let stdin_context = if args.context == "-" {
        Some(StdinContext::read(&rt, &store, &cancel)?)
    } else {
        None
    };
    let keep_git = crate::remote_ctx::keep_git_dir(&args.build_args);
    let remote_context = if stdin_context.is_none() && crate::remote_ctx::is_remote(&args.context) {
        Some(crate::remote_ctx::Fetched::fetch(
            &args.context,
            &store,
            keep_git,
        )?)
    } else {
        None
    };
    let named = crate::remote_ctx::NamedContexts::resolve(&args.build_contexts, &store, keep_git)?;
    let inputs = match (&stdin_context, &remote_context) {
        (Some(s), _) => s.inputs(args.file.as_deref(), &args.build_args, args.target.clone())?,
        (None, Some(r)) => r.inputs(args.file.as_deref(), &args.build_args, args.target.clone())?,
        (None, None) => BuildInputs::read(
            Path::new(&args.context),
            args.file.as_deref(),
            &args.build_args,
            args.target.clone(),
            g,
        )?,
    };
    let epoch = source_date_epoch(&inputs.build_args)?;

    let extras = LowerExtras {
        labels,
        no_cache: args.no_cache,
        no_cache_filter: args.no_cache_filter.clone(),
        pull: args.pull,
        named_contexts: named.lower.clone(),
    };
    match call {
        Call::Build => {}
        Call::Targets => match kiln_frontend::lower::targets(&inputs.dockerfile, &inputs.dockerfile_name) {
            Ok(t) => {
                print_targets(&t);
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => {
                eprintln!("{}", e.render(&inputs.dockerfile).trim_end());
                return Ok(ExitCode::from(1));
            }
        },
        Call::Check => return Ok(run_check(&inputs, &store, &extras)),
        Call::Outline => match lower_checked(&inputs, &store, &extras, false) {
            Ok(l) => {
                print_outline(&l.outline);
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => {
                eprintln!("{}", render_frontend_error(&e, &inputs).trim_end());
                return Ok(ExitCode::from(1));
            }
        },
    }
    let lowered = match lower_checked(&inputs, &store, &extras, false) {
        Ok(l) => l,
        Err(e) => {
            // The checks' warnings found before the error come first, as buildx shows them.
            if !e.warnings.is_empty() {
                let n = e.warnings.len();
                let mut text = format!(
                    "\n {n} warning{} found{}:\n",
                    if n == 1 { "" } else { "s" },
                    if g.debug { "" } else { " (use --debug to expand)" }
                );
                for w in &e.warnings {
                    text.push_str(&format!(" - {}\n", warning_text(w, &inputs, g.debug)));
                }
                eprint!("{text}");
            }
            match &*e.kind {
                kiln_frontend::lower::LowerError::LintViolation { .. } => eprintln!("ERROR: {}", e.kind),
                _ => eprintln!("{}", e.render(&inputs.dockerfile).trim_end()),
            }
            return Ok(ExitCode::from(1));
        }
    };

    let mut contexts = named.dirs.clone();
    contexts.insert("context".to_string(), inputs.context.clone());
    let engine_opts = kiln_solver::engine::EngineOptions {
        contexts,
        secrets,
        ssh,
        allow_network_host,
        allow_insecure,
        proxy_env: lowered.proxy_env.clone(),
        source_date_epoch: epoch,
    };
    let graph = std::sync::Arc::new(lowered.graph.clone());
    let engine = std::sync::Arc::new(kiln_solver::engine::Engine::new(
        store.clone(),
        graph.clone(),
        engine_opts,
    )?);
    // Steps mostly wait on processes and disks rather than on CPU (BuildKit sets no limit at all),
    // so by default several steps per CPU may run at once; file copies share one rayon pool.
    let jobs = args
        .jobs
        .unwrap_or_else(|| 4 * std::thread::available_parallelism().map(usize::from).unwrap_or(1));

    let debug = g.debug;
    let root = lowered.root;
    let solve_cancel = cancel.clone();
    let warning_texts: Vec<String> = lowered
        .warnings
        .iter()
        .map(|w| warning_text(w, &inputs, debug))
        .collect();
    let result = rt.block_on(async move {
        let display = crate::progress::start(progress_mode, debug);
        for w in warning_texts {
            display.sink().warn(w);
        }
        let solved = kiln_solver::scheduler::solve(
            &graph,
            &[root],
            engine.clone(),
            kiln_solver::scheduler::SolveOptions { jobs },
            display.sink(),
            solve_cancel,
        )
        .await;
        match &solved {
            Ok(_) => display.finish(None).await,
            Err(e) => display.finish(Some(e)).await,
        }
        solved.map(|mut r| (r.remove(0), lowered))
    });
    let (resolved, lowered) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}", describe_failure(&e, &inputs));
            return Ok(ExitCode::from(1));
        }
    };
    if cancel.is_cancelled() {
        eprintln!("ERROR: failed to solve: cancelled");
        return Ok(ExitCode::from(1));
    }
    let kiln_solver::engine::Output::Fs(layers) = &resolved.output else {
        bail!("the build result is not a filesystem");
    };
    let epoch_time = epoch.map(kiln_cache::images::rfc3339);
    let exported = kiln_solver::engine::export_image(&store, layers, &lowered.config, epoch_time.as_deref())?;
    let image = exported.image;
    for t in &tags {
        store.images().tag(t, &image.manifest_digest)?;
    }
    for o in &outputs {
        write_output(&store, o, &image, &tags, layers)?;
    }
    let id = image.id().to_string();
    if let Some(p) = &args.iidfile {
        std::fs::write(p, &id).with_context(|| format!("failed to write `{}`", p.display()))?;
    }
    if let Some(p) = &args.metadata_file {
        let meta = serde_json::json!({
            "containerimage.config.digest": image.config_digest.to_string(),
            "containerimage.digest": image.manifest_digest.to_string(),
            "image.name": tags.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","),
        });
        std::fs::write(p, serde_json::to_vec_pretty(&meta)?)
            .with_context(|| format!("failed to write `{}`", p.display()))?;
    }
    if args.quiet {
        println!("{id}");
    }
    signals.abort();
    drop(hold);
    crate::store_cmds::auto_gc(&store);
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
fn describe_failure(e: &kiln_solver::scheduler::SolveError, inputs: &BuildInputs) -> String {
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
        let lines: Vec<&[u8]> = inputs.dockerfile.split(|b| *b == b'\n').collect();
        out.push('\n');
        for n in loc.start_line..=loc.end_line {
            if let Some(l) = lines.get((n as usize).saturating_sub(1)) {
                let _ = writeln!(
                    out,
                    "{}:{}: {}",
                    inputs.dockerfile_name,
                    n,
                    String::from_utf8_lossy(l)
                );
            }
        }
    }
    out.trim_end().to_string()
}

fn write_output(
    store: &kiln_cache::Store,
    o: &OutputSpec,
    image: &kiln_cache::images::Image,
    tags: &[kiln_cache::reference::Reference],
    layers: &[kiln_cache::buildcache::Layer],
) -> anyhow::Result<()> {
    use kiln_cache::archive::save::{save, Format, SaveItem};
    let open = |dest: &Option<PathBuf>| -> anyhow::Result<Box<dyn std::io::Write + Send>> {
        Ok(match dest {
            Some(p) => Box::new(
                std::fs::File::create(p).with_context(|| format!("failed to create `{}`", p.display()))?,
            ),
            None => Box::new(std::io::stdout()),
        })
    };
    match o {
        OutputSpec::Image => Ok(()),
        OutputSpec::Docker(dest) | OutputSpec::Oci(dest) => {
            let format = if matches!(o, OutputSpec::Docker(_)) {
                Format::Docker
            } else {
                Format::Oci
            };
            let item = SaveItem {
                image: image.clone(),
                tags: tags.to_vec(),
            };
            save(store, &[item], format, open(dest)?)?;
            Ok(())
        }
        OutputSpec::Local(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("failed to create `{}`", dir.display()))?;
            flatten_into(store, layers, dir)
        }
        OutputSpec::Tar(dest) => {
            let tmp = tempfile::Builder::new()
                .prefix("export-")
                .tempdir_in(store.root().join("tmp"))?;
            flatten_into(store, layers, tmp.path())?;
            let opts = kiln_cache::layer::DiffOptions::default();
            kiln_cache::layer::write_tree(tmp.path(), open(dest)?, &opts)?;
            Ok(())
        }
    }
}

/// Applies `layers` in order to `dir`, whiteouts deleting what they hide.
fn flatten_into(
    store: &kiln_cache::Store,
    layers: &[kiln_cache::buildcache::Layer],
    dir: &Path,
) -> anyhow::Result<()> {
    for l in layers {
        let file = store.content().open(&l.blob)?;
        let reader = kiln_cache::layer::sniff(file)?;
        let opts = kiln_cache::layer::ApplyOptions {
            whiteouts: kiln_cache::layer::WhiteoutMode::Delete,
            archive_name: l.blob.to_string(),
            ..Default::default()
        };
        kiln_cache::layer::apply(reader, dir, &opts)?;
    }
    Ok(())
}

/// A build context read from stdin (`kiln build -`): a tar archive (plain or compressed)
/// extracted under the store's `tmp/`, or a lone Dockerfile with an empty context. The
/// directory is removed when this is dropped, however the build ends.
struct StdinContext {
    dir: tempfile::TempDir,
    /// The Dockerfile itself when stdin was not an archive.
    dockerfile: Option<Vec<u8>>,
}

/// A reader that fails once `cancel` fires, so a long copy or extraction stops early.
struct CancellableReader<R> {
    inner: R,
    cancel: kiln_solver::scheduler::CancelToken,
}

impl<R: Read> Read for CancellableReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(std::io::Error::other("cancelled"));
        }
        self.inner.read(buf)
    }
}

impl StdinContext {
    /// Spools stdin into a fresh directory under `tmp/` of the store and, when it is an archive,
    /// extracts it as the context. Fails (removing the directory) if `cancel` fires first.
    fn read(
        rt: &tokio::runtime::Runtime,
        store: &kiln_cache::Store,
        cancel: &kiln_solver::scheduler::CancelToken,
    ) -> anyhow::Result<StdinContext> {
        use std::io::IsTerminal as _;
        if std::io::stdin().is_terminal() {
            bail!("the build context is `-` but stdin is a terminal: pipe a tar archive or a Dockerfile into kiln");
        }
        let tmp_parent = store.root().join("tmp");
        std::fs::create_dir_all(&tmp_parent)
            .with_context(|| format!("failed to create `{}`", tmp_parent.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("stdin-")
            .tempdir_in(&tmp_parent)
            .with_context(|| format!("failed to create a directory in `{}`", tmp_parent.display()))?;
        let spool_path = dir.path().join("stdin");
        let spool = std::fs::File::create(&spool_path)
            .with_context(|| format!("failed to create `{}`", spool_path.display()))?;
        // The copy runs on a blocking thread so that a cancel can abandon a stalled stdin.
        let reader_cancel = cancel.clone();
        let copy = rt.spawn_blocking(move || {
            let mut reader = CancellableReader {
                inner: std::io::stdin().lock(),
                cancel: reader_cancel,
            };
            let mut writer = std::io::BufWriter::new(spool);
            std::io::copy(&mut reader, &mut writer)?;
            std::io::Write::flush(&mut writer)
        });
        let copied = rt.block_on(async {
            tokio::select! {
                r = copy => Some(r),
                _ = cancel.cancelled() => None,
            }
        });
        match copied {
            None => bail!("cancelled while reading the build context from stdin"),
            Some(Err(e)) => bail!("failed to read the build context from stdin: {e}"),
            Some(Ok(r)) => r.context("failed to read the build context from stdin")?,
        }

        let kind = kiln_source::archive::classify_file(&spool_path)
            .context("failed to read the build context from stdin")?;
        let context = dir.path().join("context");
        std::fs::create_dir(&context).with_context(|| format!("failed to create `{}`", context.display()))?;
        let dockerfile = match kind {
            kiln_source::archive::ContextKind::Archive(_) => {
                let file = std::fs::File::open(&spool_path)
                    .with_context(|| format!("failed to open `{}`", spool_path.display()))?;
                let reader = CancellableReader {
                    inner: file,
                    cancel: cancel.clone(),
                };
                kiln_source::archive::extract(reader, &context, "build context from stdin")
                    .context("failed to extract the build context from stdin")?;
                None
            }
            kiln_source::archive::ContextKind::Plain => Some(
                std::fs::read(&spool_path)
                    .with_context(|| format!("failed to read `{}`", spool_path.display()))?,
            ),
        };
        std::fs::remove_file(&spool_path)
            .with_context(|| format!("failed to remove `{}`", spool_path.display()))?;
        Ok(StdinContext { dir, dockerfile })
    }

    /// The extracted (or empty) context directory.
    fn context(&self) -> PathBuf {
        self.dir.path().join("context")
    }

    /// The frontend inputs: the Dockerfile from stdin, or `file` (default `Dockerfile`) inside
    /// the extracted archive.
    fn inputs(
        &self,
        file: Option<&str>,
        build_args: &[String],
        target: Option<String>,
    ) -> anyhow::Result<BuildInputs> {
        let context = self.context();
        if file == Some("-") {
            bail!("invalid argument: can't use stdin for both the build context and the Dockerfile (`-f -` with context `-`)");
        }
        if let Some(df) = &self.dockerfile {
            if let Some(f) = file {
                eprintln!("WARNING: --file {f} is ignored: the Dockerfile was read from stdin");
            }
            return BuildInputs::from_parts(
                &context,
                "Dockerfile".to_string(),
                df.clone(),
                None,
                build_args,
                target,
            );
        }
        let rel = file.unwrap_or("Dockerfile");
        let clean = kiln_solver::context::clean_rel(rel);
        let path = context.join(&clean);
        let real_ctx = std::fs::canonicalize(&context)
            .with_context(|| format!("failed to resolve `{}`", context.display()))?;
        let bytes = match std::fs::canonicalize(&path) {
            Ok(real) if real.starts_with(&real_ctx) => std::fs::read(&real)
                .with_context(|| format!("failed to read dockerfile `{rel}` from the context on stdin"))?,
            Ok(_) => bail!("failed to read dockerfile: `{rel}` points outside the build context from stdin"),
            Err(_) => bail!("failed to read dockerfile: `{rel}` not found in the build context from stdin"),
        };
        let name = Path::new(rel)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| rel.to_string());
        BuildInputs::from_parts(&context, name, bytes, Some(&path), build_args, target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_parse_like_docker() {
        assert_eq!(
            parse_output("type=local,dest=out").unwrap(),
            OutputSpec::Local("out".into())
        );
        assert_eq!(parse_output("out").unwrap(), OutputSpec::Local("out".into()));
        assert_eq!(parse_output("-").unwrap(), OutputSpec::Tar(None));
        assert_eq!(
            parse_output("type=docker,dest=i.tar").unwrap(),
            OutputSpec::Docker(Some("i.tar".into()))
        );
        assert!(parse_output("type=local").is_err());
        assert!(parse_output("type=registry").is_err());
    }

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
