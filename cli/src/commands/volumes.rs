//! `volume ls|create|rm|prune|inspect`. Flags and output follow Docker's.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};
use kiln_containers::volumes::{VolumeError, Volumes};

use crate::format::human_size;
use crate::gotemplate::Value;
use crate::Globals;

/// `kiln volume ...`.
#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume
    Create(VolumeCreateArgs),
    /// List volumes
    #[command(alias = "list")]
    Ls(VolumeLsArgs),
    /// Remove one or more volumes
    #[command(alias = "remove")]
    Rm(VolumeRmArgs),
    /// Remove unused local volumes
    Prune(VolumePruneArgs),
    /// Display detailed information on one or more volumes
    Inspect(VolumeInspectArgs),
}

/// `volume create`.
#[derive(Args, Debug)]
pub struct VolumeCreateArgs {
    /// Specify volume driver name (only `local`)
    #[arg(short = 'd', long, default_value = "local")]
    pub driver: String,
    /// Set metadata for a volume (KEY=VALUE)
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// The volume's name (random when omitted)
    pub name: Option<String>,
}

/// `volume ls`.
#[derive(Args, Debug)]
pub struct VolumeLsArgs {
    /// Only display volume names
    #[arg(short, long)]
    pub quiet: bool,
    /// Provide filter values (e.g. `dangling=true`)
    #[arg(short = 'f', long)]
    pub filter: Vec<String>,
    /// Format output using a custom template: 'table', 'table TEMPLATE', 'json', or a Go template
    #[arg(long)]
    pub format: Option<String>,
}

/// `volume rm`.
#[derive(Args, Debug)]
pub struct VolumeRmArgs {
    /// Do not fail on volumes that do not exist
    #[arg(short, long)]
    pub force: bool,
    /// Volumes
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `volume prune`.
#[derive(Args, Debug)]
pub struct VolumePruneArgs {
    /// Remove all unused volumes, not just anonymous ones
    #[arg(short, long)]
    pub all: bool,
    /// Do not prompt for confirmation
    #[arg(short, long)]
    pub force: bool,
}

/// `volume inspect`.
#[derive(Args, Debug)]
pub struct VolumeInspectArgs {
    /// Volumes
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `volume ls [-q] [-f dangling=|name=|label=|driver=] [--format]`.
fn volume_ls(vols: &Volumes, a: VolumeLsArgs) -> anyhow::Result<ExitCode> {
    let f = crate::filters::Filters::parse(&a.filter, &["dangling", "name", "label", "label!", "driver"])?;
    let dangling = f.bool("dangling")?;
    let usage = if dangling.is_some() || a.format.is_some() {
        vols.usage()?
    } else {
        BTreeMap::new()
    };
    let want_size = a
        .format
        .as_deref()
        .is_some_and(|f| f.contains("Size") || f.contains("json"));
    let mut rows = Vec::new();
    for v in vols.list()? {
        let used = usage.contains_key(&v.name);
        if dangling.is_some_and(|d| d == used)
            || !f.any("name", |n| v.name.contains(n))
            || !f.any("driver", |d| d == "local")
            || !f.labels_match(&v.meta.labels)
        {
            continue;
        }
        let mut fields = vec![
            ("Name", Value::Str(v.name.clone())),
            ("Driver", Value::Str("local".into())),
            ("Scope", Value::Str("local".into())),
            ("Mountpoint", Value::Str(v.mountpoint.display().to_string())),
            ("Labels", Value::Str(crate::format::labels_text(&v.meta.labels))),
            (
                "Links",
                Value::Str(
                    usage
                        .get(&v.name)
                        .map(|u| u.len().to_string())
                        .unwrap_or_else(|| "N/A".into()),
                ),
            ),
            (
                "Size",
                Value::Str(if want_size {
                    human_size(kiln_containers::volumes::dir_size(&v.mountpoint))
                } else {
                    "N/A".into()
                }),
            ),
        ];
        fields.push(("Label", crate::format::label_method(v.meta.labels.clone())));
        rows.push(Value::context("*formatter.volumeContext", fields));
    }
    let format = if a.quiet {
        "{{.Name}}"
    } else {
        a.format.as_deref().unwrap_or("")
    };
    crate::format::Listing {
        format,
        default_table: "table {{.Driver}}\t{{.Name}}",
        headers: &[
            ("Name", "VOLUME NAME"),
            ("Driver", "DRIVER"),
            ("Scope", "SCOPE"),
            ("Mountpoint", "MOUNTPOINT"),
            ("Labels", "LABELS"),
            ("Links", "LINKS"),
            ("Size", "SIZE"),
        ],
    }
    .print(&rows)
}

pub fn run(cmd: VolumeCmd, g: &Globals) -> anyhow::Result<ExitCode> {
    let vols = Volumes::open(&g.root)?;
    match cmd {
        VolumeCmd::Create(a) => {
            if a.driver != "local" {
                bail!(
                    "create {}: volume driver {:?} is not supported: only \"local\"",
                    a.name.as_deref().unwrap_or(""),
                    a.driver
                );
            }
            let mut labels = BTreeMap::new();
            for l in &a.labels {
                let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
                labels.insert(k.to_string(), v.to_string());
            }
            let (v, _) = vols.create(a.name.as_deref(), labels, false)?;
            println!("{}", v.name);
            Ok(ExitCode::SUCCESS)
        }
        VolumeCmd::Ls(a) => volume_ls(&vols, a),
        VolumeCmd::Rm(a) => {
            let mut failed = false;
            for name in &a.names {
                match vols.remove(name) {
                    Ok(()) => println!("{name}"),
                    Err(VolumeError::NotFound(_)) if a.force => {}
                    Err(e) => {
                        eprintln!("Error response from daemon: {e}");
                        failed = true;
                    }
                }
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        VolumeCmd::Prune(a) => {
            if !a.force {
                let what = if a.all {
                    "all local volumes not used by at least one container"
                } else {
                    "anonymous local volumes not used by at least one container"
                };
                print!("WARNING! This will remove {what}.\nAre you sure you want to continue? [y/N] ");
                io::stdout().flush()?;
                let mut answer = String::new();
                io::stdin().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes" | "Yes") {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            let (removed, bytes) = vols.prune(a.all)?;
            if !removed.is_empty() {
                println!("Deleted Volumes:");
                for n in &removed {
                    println!("{n}");
                }
                println!();
            }
            println!("Total reclaimed space: {}", human_size(bytes));
            Ok(ExitCode::SUCCESS)
        }
        VolumeCmd::Inspect(a) => {
            let mut out = Vec::new();
            let mut errors = Vec::new();
            for name in &a.names {
                match vols.get(name) {
                    Ok(v) => out.push(v.inspect_json()),
                    Err(VolumeError::NotFound(n)) => errors.push(format!("Error: No such volume: {n}")),
                    Err(e) => errors.push(format!("Error: {e}")),
                }
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            for e in &errors {
                eprintln!("{e}");
            }
            Ok(if errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
