//! `kiln pull`, `kiln push`, `kiln login`, `kiln logout`: Docker's output, kiln's registry
//! client (`kiln_source::registry`).

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Read};
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::{bail, Context as _};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_cache::reference::Reference;
use kiln_dag::{Digest, Platform};
use kiln_source::registry::{self, Client, ClientOptions, Credentials, DockerConfig, TransferEvent};

use crate::Globals;

/// `kiln pull` flags.
#[derive(Args, Debug)]
pub struct PullArgs {
    /// Platform to pull from a multi-platform image (os/arch[/variant]; default: the host's)
    #[arg(long)]
    pub platform: Option<String>,
    /// Suppress verbose output
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Registry to use over plain HTTP (host[:port]); repeatable (also KILN_INSECURE_REGISTRIES)
    #[arg(long = "insecure-registry")]
    pub insecure: Vec<String>,
    /// Image reference (NAME[:TAG|@DIGEST])
    pub reference: String,
}

/// `kiln push` flags.
#[derive(Args, Debug)]
pub struct PushArgs {
    /// Suppress verbose output
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Registry to use over plain HTTP (host[:port]); repeatable (also KILN_INSECURE_REGISTRIES)
    #[arg(long = "insecure-registry")]
    pub insecure: Vec<String>,
    /// Image reference (NAME[:TAG])
    pub reference: String,
}

/// `kiln login` flags.
#[derive(Args, Debug)]
pub struct LoginArgs {
    /// Username
    #[arg(short = 'u', long)]
    pub username: Option<String>,
    /// Password
    #[arg(short = 'p', long)]
    pub password: Option<String>,
    /// Take the password from stdin
    #[arg(long = "password-stdin")]
    pub password_stdin: bool,
    /// Registry to use over plain HTTP (host[:port]); repeatable (also KILN_INSECURE_REGISTRIES)
    #[arg(long = "insecure-registry")]
    pub insecure: Vec<String>,
    /// Registry host (default: docker.io)
    pub server: Option<String>,
}

/// `kiln logout` flags.
#[derive(Args, Debug)]
pub struct LogoutArgs {
    /// Registry host (default: docker.io)
    pub server: Option<String>,
}

/// A registry client honouring `--insecure-registry`, `KILN_INSECURE_REGISTRIES` and
/// `DOCKER_CONFIG`.
pub fn client(insecure: &[String]) -> Client {
    let mut opts = ClientOptions::from_env();
    opts.insecure_registries.extend(insecure.iter().cloned());
    Client::new(opts)
}

/// The registry host named on the command line: `docker.io` for none or Docker Hub's URLs.
fn server_host(server: Option<&str>) -> String {
    let s = server.unwrap_or("docker.io").trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or(s);
    match host {
        "" | "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        h => h.to_string(),
    }
}

fn short(d: &Digest) -> String {
    d.hex()[..12].to_string()
}

/// Docker-style per-layer lines on stdout, and progress bars on stderr when it is a terminal.
struct Display {
    quiet: bool,
    pulling: bool,
    multi: Option<MultiProgress>,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
}

impl Display {
    fn new(quiet: bool, pulling: bool) -> Display {
        let multi = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Display {
            quiet,
            pulling,
            multi,
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn line(&self, text: String) {
        if self.quiet {
            return;
        }
        match &self.multi {
            Some(m) => {
                let _ = m.println(&text);
            }
            None => println!("{text}"),
        }
    }

    fn finish_bar(&self, digest: &Digest) {
        if let Ok(mut bars) = self.bars.lock() {
            if let Some(b) = bars.remove(digest) {
                b.finish_and_clear();
            }
        }
    }
}

impl registry::TransferProgress for Display {
    fn event(&self, event: TransferEvent) {
        match event {
            TransferEvent::Exists { digest } => self.line(format!(
                "{}: {}",
                short(&digest),
                if self.pulling {
                    "Already exists"
                } else {
                    "Layer already exists"
                }
            )),
            TransferEvent::Started { digest, size } => {
                if let Some(m) = &self.multi {
                    let bar = m.add(match size {
                        Some(n) => ProgressBar::new(n),
                        None => ProgressBar::no_length(),
                    });
                    let template = match size {
                        Some(_) => "{prefix}: {msg} [{bar:30}] {bytes}/{total_bytes}",
                        None => "{prefix}: {msg} {bytes}",
                    };
                    if let Ok(style) = ProgressStyle::with_template(template) {
                        bar.set_style(style.progress_chars("=> "));
                    }
                    bar.set_prefix(short(&digest));
                    bar.set_message(if self.pulling { "Downloading" } else { "Pushing" });
                    if let Ok(mut bars) = self.bars.lock() {
                        if let Some(old) = bars.insert(digest, bar) {
                            old.finish_and_clear();
                        }
                    }
                }
            }
            TransferEvent::Bytes { digest, n } => {
                if let Ok(bars) = self.bars.lock() {
                    if let Some(b) = bars.get(&digest) {
                        b.inc(n);
                    }
                }
            }
            TransferEvent::Retrying { digest, error } => {
                self.finish_bar(&digest);
                self.line(format!("{}: Retrying ({error})", short(&digest)));
            }
            TransferEvent::Mounted { digest, from } => {
                self.line(format!("{}: Mounted from {from}", short(&digest)))
            }
            TransferEvent::Done { digest } => {
                self.finish_bar(&digest);
                self.line(format!(
                    "{}: {}",
                    short(&digest),
                    if self.pulling { "Pull complete" } else { "Pushed" }
                ));
            }
        }
    }
}

/// `kiln pull`.
pub fn pull(args: PullArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    let r = Reference::parse(&args.reference)
        .with_context(|| format!("invalid reference format `{}`", args.reference))?;
    let platform = match &args.platform {
        Some(p) => Platform::parse(p).context("invalid --platform")?,
        None => Platform::host(),
    };
    let store = kiln_cache::Store::open(&g.root)?;
    let client = client(&args.insecure);
    let display = Display::new(args.quiet, true);
    if !args.quiet {
        let what = match (r.digest(), r.tag()) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => "latest".into(),
        };
        display.line(format!("{what}: Pulling from {}", r.path()));
    }
    let opts = registry::PullOptions {
        platform,
        jobs: 4,
        tap: None,
    };
    let pulled = registry::pull(&client, &store, &r, &opts, &display)?;
    if let Some(m) = &display.multi {
        let _ = m.clear();
    }
    if !args.quiet {
        println!("Digest: {}", pulled.digest);
        if pulled.up_to_date {
            println!("Status: Image is up to date for {}", r.familiar());
        } else {
            println!("Status: Downloaded newer image for {}", r.familiar());
        }
    }
    println!("{r}");
    Ok(ExitCode::SUCCESS)
}

/// `kiln push`.
pub fn push(args: PushArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    let r = Reference::parse(&args.reference)
        .with_context(|| format!("invalid reference format `{}`", args.reference))?;
    let store = kiln_cache::Store::open(&g.root)?;
    // Garbage collection waits until every blob is uploaded.
    let _hold = store.hold()?;
    let client = client(&args.insecure);
    let display = Display::new(args.quiet, false);
    display.line(format!("The push refers to repository [{}]", r.repository()));
    let pushed = registry::push(&client, &store, &r, &registry::PushOptions::default(), &display)?;
    if let Some(m) = &display.multi {
        let _ = m.clear();
    }
    if args.quiet {
        println!("{r}");
    } else {
        println!(
            "{}: digest: {} size: {}",
            r.tag().unwrap_or("latest"),
            pushed.digest,
            pushed.size
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn read_line(prompt: &str) -> anyhow::Result<String> {
    eprint!("{prompt}");
    let mut s = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut s)
        .context("failed to read from stdin")?;
    Ok(s.trim_end_matches(['\r', '\n']).to_string())
}

/// `kiln login`.
pub fn login(args: LoginArgs) -> anyhow::Result<ExitCode> {
    let host = server_host(args.server.as_deref());
    if args.password.is_some() && args.password_stdin {
        bail!("--password and --password-stdin are mutually exclusive");
    }
    let username = match args.username {
        Some(u) => u,
        None if args.password_stdin => bail!("--password-stdin needs --username"),
        None => read_line("Username: ")?,
    };
    if username.is_empty() {
        bail!("a username is required");
    }
    let password = if args.password_stdin {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("failed to read the password from stdin")?;
        s.trim_end_matches(['\r', '\n']).to_string()
    } else if let Some(p) = args.password {
        eprintln!("WARNING! Using --password via the CLI is insecure. Use --password-stdin.");
        p
    } else {
        read_line("Password: ")?
    };
    if password.is_empty() {
        bail!("a password is required");
    }
    let creds = Credentials { username, password };
    let client = client(&args.insecure);
    client
        .login(&host, creds.clone())
        .with_context(|| format!("login to {host} failed"))?;
    let dir = kiln_source::registry::auth::docker_config_dir();
    let mut cfg = DockerConfig::load(&dir)?;
    cfg.store(&host, &creds)
        .with_context(|| format!("failed to store the credentials for {host}"))?;
    println!("Login Succeeded");
    Ok(ExitCode::SUCCESS)
}

/// `kiln logout`.
pub fn logout(args: LogoutArgs) -> anyhow::Result<ExitCode> {
    let host = server_host(args.server.as_deref());
    let dir = kiln_source::registry::auth::docker_config_dir();
    let mut cfg = DockerConfig::load(&dir)?;
    if cfg.erase(&host)? {
        println!("Removing login credentials for {host}");
    } else {
        println!("Not logged in to {host}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_names_normalise() {
        assert_eq!(super::server_host(None), "docker.io");
        assert_eq!(
            super::server_host(Some("https://index.docker.io/v1/")),
            "docker.io"
        );
        assert_eq!(super::server_host(Some("127.0.0.1:5000")), "127.0.0.1:5000");
        assert_eq!(super::server_host(Some("http://reg:1/x")), "reg:1");
    }
}
