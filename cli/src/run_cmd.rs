//! `kiln run`: a container from an image, in the foreground, with Docker's CMD/ENTRYPOINT rules.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::Args;
use kiln_cache::layer;
use kiln_cache::snapshot::Snapshots;
use kiln_dag::image::ContainerConfig;

use crate::Globals;

/// Docker's exit codes for failures of the runner itself.
const EXIT_RUNNER: u8 = 125;
const EXIT_CANNOT_EXEC: u8 = 126;
const EXIT_NOT_FOUND: u8 = 127;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct RunArgs {
    /// Print help (`-h` is --hostname, as in Docker)
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
    /// Automatically remove the container when it exits
    #[arg(long)]
    pub rm: bool,
    /// Assign a name to the container
    #[arg(long)]
    pub name: Option<String>,
    /// Set environment variables (KEY=VALUE, or KEY to take it from the environment)
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// Working directory inside the container
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    /// Username or UID (format: <name|uid>[:<group|gid>])
    #[arg(short = 'u', long = "user")]
    pub user: Option<String>,
    /// Overwrite the default ENTRYPOINT of the image
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Container host name
    #[arg(short = 'h', long)]
    pub hostname: Option<String>,
    /// Network: `host` (the default for now: the host's network) or `none` (loopback only)
    #[arg(long, default_value = "host")]
    pub network: String,
    /// Keep STDIN open
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// The image to run
    pub image: String,
    /// Command and arguments
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// The argv Docker runs: ENTRYPOINT + (arguments or CMD), with `--entrypoint` overriding.
pub fn command_line(cfg: &ContainerConfig, entrypoint: Option<&str>, args: &[String]) -> Vec<String> {
    let entry: Vec<String> = match entrypoint {
        Some("") => Vec::new(),
        Some(e) => vec![e.to_string()],
        None => cfg.entrypoint.clone().unwrap_or_default(),
    };
    // An overridden entrypoint drops the image's CMD, as in Docker.
    let cmd: Vec<String> = if !args.is_empty() {
        args.to_vec()
    } else if entrypoint.is_some() {
        Vec::new()
    } else {
        cfg.cmd.clone().unwrap_or_default()
    };
    let mut argv = entry;
    argv.extend(cmd);
    argv
}

fn container_env(cfg: &ContainerConfig, extra: &[String]) -> Vec<String> {
    let mut env: Vec<String> = cfg.env.clone().unwrap_or_default();
    for kv in extra {
        let (k, v) = match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match std::env::var(kv) {
                Ok(v) => (kv.clone(), v),
                Err(_) => continue,
            },
        };
        env.retain(|e| e.split_once('=').map(|(ek, _)| ek).unwrap_or(e) != k);
        env.push(format!("{k}={v}"));
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push("HOME=/root".into());
    }
    env
}

fn new_id() -> String {
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    h.finalize().to_hex().to_string()
}

/// Unpacks (if needed) the image's layers and returns their directories, top first.
fn image_lower_dirs(
    store: &kiln_cache::Store,
    image: &kiln_cache::images::Image,
) -> anyhow::Result<Vec<PathBuf>> {
    let snapshots = Snapshots::open(&store.snapshots_dir())?;
    let mut dirs = Vec::new();
    for (l, chain) in image.layers.iter().zip(image.chain_ids()) {
        let snap = match snapshots.get(&chain) {
            Some(s) => s,
            None => {
                let file = store.content().open(&l.digest)?;
                snapshots
                    .unpack(&chain, None, layer::sniff(file)?, Some(&l.diff_id))
                    .with_context(|| format!("failed to unpack layer {}", l.digest))?
            }
        };
        dirs.push(snap.path);
    }
    dirs.reverse();
    Ok(dirs)
}

/// `kiln run`.
pub fn run(args: RunArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    match run_inner(args, g) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("kiln: {e:#}");
            let text = format!("{e:#}");
            let code = if text.contains("no such file or directory") || text.contains("not found in $PATH") {
                EXIT_NOT_FOUND
            } else if text.contains("permission denied") {
                EXIT_CANNOT_EXEC
            } else {
                EXIT_RUNNER
            };
            Ok(ExitCode::from(code))
        }
    }
}

fn run_inner(args: RunArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    let network = match args.network.as_str() {
        "none" => kiln_runtime::Network::None,
        "host" => kiln_runtime::Network::Host,
        other => bail!("network {other} not found: kiln run supports --network host and --network none"),
    };
    let store = kiln_cache::Store::open(&g.root)?;
    let image = store
        .images()
        .resolve(&args.image)
        .with_context(|| format!("Unable to find image '{}' locally", args.image))?;
    let cfg = image.config.config.clone();
    let argv = command_line(&cfg, args.entrypoint.as_deref(), &args.args);
    if argv.is_empty() {
        bail!("no command specified");
    }
    let mut lower = image_lower_dirs(&store, &image)?;
    let id = new_id();
    let dir = store.containers_dir().join(&id);
    std::fs::create_dir_all(dir.join("upper"))
        .with_context(|| format!("failed to create `{}`", dir.display()))?;
    std::fs::create_dir_all(dir.join("work"))?;
    let empty = dir.join("empty");
    if lower.is_empty() {
        std::fs::create_dir_all(&empty)?;
        lower.push(empty.clone());
    }
    let record = serde_json::json!({
        "Id": id,
        "Name": args.name.clone().unwrap_or_default(),
        "Image": image.manifest_digest.to_string(),
        "ImageID": image.id().to_string(),
        "Path": argv.first(),
        "Args": argv.get(1..).unwrap_or_default(),
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&record)?)?;
    let cleanup = Cleanup {
        dir: dir.clone(),
        remove: args.rm,
    };

    let hostname = args.hostname.clone().unwrap_or_else(|| id[..12].to_string());
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let dup = |fd: std::os::fd::BorrowedFd<'_>| -> anyhow::Result<OwnedFd> {
        fd.try_clone_to_owned()
            .context("failed to duplicate a standard stream")
    };
    use std::os::fd::AsFd;
    let spec = kiln_runtime::ContainerSpec {
        rootfs: kiln_runtime::Rootfs::Overlay {
            lower,
            upper: dir.join("upper"),
            work: dir.join("work"),
        },
        readonly_rootfs: false,
        args: argv,
        env: container_env(&cfg, &args.env),
        cwd: args.workdir.clone().unwrap_or_else(|| {
            if cfg.working_dir.is_empty() {
                "/".into()
            } else {
                cfg.working_dir.clone()
            }
        }),
        user: args.user.clone().unwrap_or_else(|| cfg.user.clone()),
        hostname: hostname.clone(),
        mounts: Vec::new(),
        etc_files: kiln_runtime::EtcFiles::for_build(&hostname, &host_resolv, &network),
        network,
        security: kiln_runtime::Security::Default,
        stdin: if args.interactive {
            Some(dup(std::io::stdin().as_fd())?)
        } else {
            None
        },
        stdout: dup(std::io::stdout().as_fd())?,
        stderr: dup(std::io::stderr().as_fd())?,
        options: Default::default(),
    };
    let scratch = dir.join("runtime");
    std::fs::create_dir_all(&scratch).with_context(|| format!("failed to create `{}`", scratch.display()))?;
    let running = kiln_runtime::start(spec, &scratch)?;
    let status = running.wait()?;
    drop(cleanup);
    Ok(match (status.code, status.signal) {
        (Some(c), _) => ExitCode::from((c & 0xff) as u8),
        (None, Some(s)) => ExitCode::from((128 + s).clamp(0, 255) as u8),
        (None, None) => ExitCode::from(EXIT_RUNNER),
    })
}

/// Removes a `--rm` container's directory however the run ends.
struct Cleanup {
    dir: PathBuf,
    remove: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.remove {
            remove_container_dir(&self.dir);
        }
    }
}

fn remove_container_dir(dir: &Path) {
    // overlay leaves `work/work` with mode 000.
    let ww = dir.join("work/work");
    let _ = std::fs::set_permissions(&ww, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(entry: Option<&[&str]>, cmd: Option<&[&str]>) -> ContainerConfig {
        ContainerConfig {
            entrypoint: entry.map(|e| e.iter().map(|s| s.to_string()).collect()),
            cmd: cmd.map(|e| e.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn docker_command_rules() {
        let c = cfg(Some(&["/bin/echo", "e"]), Some(&["c"]));
        assert_eq!(command_line(&c, None, &[]), ["/bin/echo", "e", "c"]);
        assert_eq!(command_line(&c, None, &["x".into()]), ["/bin/echo", "e", "x"]);
        assert_eq!(command_line(&c, Some("/bin/true"), &[]), ["/bin/true"]);
        assert_eq!(command_line(&c, Some(""), &["ls".into()]), ["ls"]);
        let shell_entry = cfg(Some(&["/bin/sh", "-c", "echo hi"]), None);
        assert_eq!(
            command_line(&shell_entry, None, &["ignored".into()]),
            ["/bin/sh", "-c", "echo hi", "ignored"]
        );
    }

    #[test]
    fn env_defaults_path_and_overrides() {
        let c = ContainerConfig {
            env: Some(vec!["A=1".into(), "PATH=/x".into()]),
            ..Default::default()
        };
        let env = container_env(&c, &["A=2".into()]);
        assert!(env.contains(&"A=2".to_string()) && env.contains(&"PATH=/x".to_string()));
        assert!(!env.contains(&"A=1".to_string()));
    }
}
