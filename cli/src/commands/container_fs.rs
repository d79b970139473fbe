//! Container filesystems: `cp`, `diff`, `export`, `commit` (and the `--change` instructions
//! `commit` and `import` apply). Flags and output follow Docker's.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use kiln_cache::reference::Reference;
use kiln_cache::Store;
use kiln_containers::fs::{self as cfs, CopyOptions, CopyRoot, Owner, Place};
use kiln_containers::mounts;
use kiln_containers::{ContainerRecord, Containers};
use kiln_dag::image::{ContainerConfig, Empty, History, ImageConfig};

use crate::Globals;

/// `cp`.
#[derive(Args, Debug)]
pub struct CpArgs {
    /// Archive mode (copy all uid/gid information)
    #[arg(short, long)]
    pub archive: bool,
    /// Always follow symbol link in SRC_PATH
    #[arg(short = 'L', long)]
    pub follow_link: bool,
    /// Suppress progress output during copy
    #[arg(short, long)]
    pub quiet: bool,
    /// CONTAINER:SRC_PATH, a local path, or - (a tar on stdin)
    pub src: String,
    /// CONTAINER:DEST_PATH, a local path, or - (a tar on stdout)
    pub dest: String,
}

/// `diff`.
#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The container
    pub container: String,
}

/// `export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Write to a file, instead of STDOUT
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// The container
    pub container: String,
}

/// `commit`.
#[derive(Args, Debug)]
pub struct CommitArgs {
    /// Author (e.g., "John Hannibal Smith <hannibal@a-team.com>")
    #[arg(short, long)]
    pub author: Option<String>,
    /// Apply Dockerfile instruction to the created image
    #[arg(short, long = "change")]
    pub change: Vec<String>,
    /// Commit message
    #[arg(short, long)]
    pub message: Option<String>,
    /// Pause container during commit
    #[arg(short, long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub pause: bool,
    /// The container
    pub container: String,
    /// REPOSITORY[:TAG]
    pub reference: Option<String>,
}

/// The container's mount points, to keep kiln's mount points out of diff and commit.
fn mount_targets(g: &Globals, rec: &ContainerRecord) -> anyhow::Result<Vec<String>> {
    let mut targets: Vec<String> = mounts::load(&g.root, &rec.id)?
        .into_iter()
        .map(|m| m.target)
        .collect();
    // Image volumes are mount points even before the container's mounts were resolved.
    if let Some(v) = &rec.config.volumes {
        targets.extend(v.keys().cloned());
    }
    Ok(targets)
}

fn lookup(g: &Globals, name: &str) -> anyhow::Result<(Containers, ContainerRecord)> {
    let containers = Containers::open(&g.root)?;
    let rec = containers.lookup(name)?;
    Ok((containers, rec))
}

pub fn diff(a: DiffArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    let (_, rec) = lookup(g, &a.container)?;
    let changes = cfs::diff(&rec.rootfs, &mount_targets(g, &rec)?)?;
    let mut out = io::stdout().lock();
    for c in changes {
        writeln!(out, "{c}")?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn export(a: ExportArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    let (_, rec) = lookup(g, &a.container)?;
    match &a.output {
        Some(path) => {
            let tmp = path.with_extension("kiln-part");
            let file = File::create(&tmp).with_context(|| format!("failed to create `{}`", tmp.display()))?;
            let mut w = io::BufWriter::new(file);
            let result = cfs::export(&rec.rootfs, &mut w)
                .map_err(anyhow::Error::from)
                .and_then(|_| w.flush().context("failed to write the tar"));
            match result {
                Ok(()) => std::fs::rename(&tmp, path)
                    .with_context(|| format!("failed to write `{}`", path.display()))?,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            }
        }
        None => {
            if io::stdout().is_terminal() {
                bail!("cowardly refusing to save to a terminal. Use the -o flag or redirect");
            }
            let mut w = io::BufWriter::new(io::stdout());
            cfs::export(&rec.rootfs, &mut w)?;
            w.flush().context("failed to write the tar")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One side of `cp`.
enum CpSide {
    Local(String),
    Stream,
    Container(String, String),
}

/// Docker's rule: an absolute or `.`-relative path is local; `NAME:PATH` names a container.
fn split_cp_arg(arg: &str) -> CpSide {
    if arg == "-" {
        return CpSide::Stream;
    }
    if arg.starts_with('/') || arg.starts_with('.') {
        return CpSide::Local(arg.to_string());
    }
    match arg.split_once(':') {
        Some((c, p)) if !c.is_empty() => CpSide::Container(c.to_string(), p.to_string()),
        _ => CpSide::Local(arg.to_string()),
    }
}

/// A container's root for `cp`: `/proc/PID/root` while it runs, else a private overlay mount
/// (writable for copies into it, under the container's lock so it cannot start meanwhile).
struct CtrRoot {
    root: CopyRoot,
    _view: Option<cfs::View>,
    _lock: Option<kiln_containers::record::DirLock>,
}

fn container_root(g: &Globals, name: &str, write: bool) -> anyhow::Result<CtrRoot> {
    let (containers, rec) = lookup(g, name)?;
    let place = Place::Container(name.to_string());
    let lock = if write {
        Some(containers.lock(&rec.id)?)
    } else {
        None
    };
    let st = if lock.is_some() {
        containers.state_locked(&rec.id)?
    } else {
        containers.state(&rec.id)?
    };
    if st.running && st.pid > 0 {
        let path = PathBuf::from(format!("/proc/{}/root", st.pid));
        return Ok(CtrRoot {
            root: CopyRoot::open(&path, place)?,
            _view: None,
            _lock: None,
        });
    }
    let view = cfs::mount_view(&rec.rootfs, write)?;
    Ok(CtrRoot {
        root: CopyRoot::open(view.path(), place)?,
        _view: Some(view),
        _lock: lock,
    })
}

/// A host path made absolute against the working directory, keeping its ending (`/`, `/.`).
fn host_path(p: &str) -> anyhow::Result<String> {
    if p.starts_with('/') {
        return Ok(p.to_string());
    }
    let cwd = std::env::current_dir().context("failed to read the working directory")?;
    Ok(format!("{}/{p}", cwd.display()))
}

pub fn cp(a: CpArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    let host = || CopyRoot::open(Path::new("/"), Place::Host);
    match (split_cp_arg(&a.src), split_cp_arg(&a.dest)) {
        (CpSide::Container(..), CpSide::Container(..)) => {
            bail!("copying between containers is not supported")
        }
        (CpSide::Container(c, src), CpSide::Local(dst)) => {
            let from = container_root(g, &c, false)?;
            let opts = CopyOptions {
                follow_link: a.follow_link,
                owner: if a.archive { Owner::Keep } else { Owner::Caller },
            };
            cfs::copy(&from.root, &src, &host()?, &host_path(&dst)?, opts)?;
        }
        (CpSide::Container(c, src), CpSide::Stream) => {
            let from = container_root(g, &c, false)?;
            let mut w = io::BufWriter::new(io::stdout().lock());
            cfs::copy_to_tar(&from.root, &src, a.follow_link, &mut w)?;
            w.flush().context("failed to write the tar")?;
        }
        (CpSide::Local(src), CpSide::Container(c, dst)) => {
            let to = container_root(g, &c, true)?;
            let opts = CopyOptions {
                follow_link: a.follow_link,
                owner: if a.archive {
                    Owner::Keep
                } else {
                    Owner::Fixed(0, 0)
                },
            };
            cfs::copy(&host()?, &host_path(&src)?, &to.root, &dst, opts)?;
        }
        (CpSide::Stream, CpSide::Container(c, dst)) => {
            let to = container_root(g, &c, true)?;
            let owner = if a.archive {
                Owner::Keep
            } else {
                Owner::Fixed(0, 0)
            };
            let stdin = io::stdin().lock();
            cfs::copy_from_tar(io::BufReader::new(stdin), &to.root, &dst, owner)?;
        }
        _ => bail!("must specify at least one container source"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn commit(a: CommitArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    let store = Store::open(&g.root)
        .with_context(|| format!("failed to open the store at `{}`", g.root.display()))?;
    // Garbage collection waits until the new image is recorded (and tagged).
    let _hold = store.hold()?;
    let (containers, rec) = lookup(g, &a.container)?;
    let reference = match &a.reference {
        None => None,
        Some(r) => {
            let r = Reference::parse(r)?;
            Some(if r.tag().is_none() && r.digest().is_none() {
                r.with_tag("latest")
            } else {
                r
            })
        }
    };
    let base = store
        .images()
        .get(&rec.image)
        .with_context(|| format!("the image of container {} is gone", rec.name))?;
    let mut config: ImageConfig = base.config.clone();
    config.config = rec.config.clone();
    for c in &a.change {
        apply_change(&mut config.config, c)?;
    }
    let now = kiln_cache::images::now_rfc3339();
    config.created = Some(now.clone());
    config.author = a.author.clone();
    config.history.push(History {
        created: Some(now),
        created_by: Some(rec.args.join(" ")),
        author: a.author.clone(),
        comment: a.message.clone(),
        empty_layer: false,
    });
    let st = containers.state(&rec.id)?;
    let _paused = if a.pause && st.running && st.pid > 0 {
        Some(cfs::pause(st.pid)?)
    } else {
        None
    };
    let image = cfs::commit(&store, &base, &rec.rootfs, &mount_targets(g, &rec)?, &config)?;
    drop(_paused);
    if let Some(r) = reference {
        store.images().tag(&r, &image.manifest_digest)?;
    }
    println!("{}", image.id());
    Ok(ExitCode::SUCCESS)
}

/// Splits shell-like words: whitespace separates, quotes group, a backslash escapes.
fn words(s: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        bail!("unterminated quote in {s:?}");
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// A JSON array of strings, or `None` when `rest` is not one (shell form).
fn json_form(rest: &str) -> Option<Vec<String>> {
    if rest.starts_with('[') {
        serde_json::from_str::<Vec<String>>(rest).ok()
    } else {
        None
    }
}

/// `KEY=VALUE ...` pairs, or the legacy `KEY VALUE` form.
fn pairs(instr: &str, rest: &str) -> anyhow::Result<Vec<(String, String)>> {
    let w = words(rest)?;
    if w.is_empty() {
        bail!("{instr} requires at least one argument");
    }
    if !w[0].contains('=') {
        let (k, v) = rest
            .trim()
            .split_once(char::is_whitespace)
            .unwrap_or((rest.trim(), ""));
        return Ok(vec![(k.to_string(), words(v)?.join(" "))]);
    }
    w.into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("{instr} names must not be empty: {kv:?}"),
        })
        .collect()
}

/// Applies one `commit -c` Dockerfile instruction to the config.
/// Applies one `-c/--change` Dockerfile instruction (`commit -c`, `import -c`).
pub(crate) fn apply_change(cfg: &mut ContainerConfig, change: &str) -> anyhow::Result<()> {
    let change = change.trim();
    let (instr, rest) = change.split_once(char::is_whitespace).unwrap_or((change, ""));
    let rest = rest.trim();
    let upper = instr.to_ascii_uppercase();
    if rest.is_empty() && !matches!(upper.as_str(), "CMD" | "ENTRYPOINT") {
        bail!("{instr} requires an argument");
    }
    let shell_or_json = |rest: &str| -> Vec<String> {
        json_form(rest).unwrap_or_else(|| {
            let mut sh = cfg
                .shell
                .clone()
                .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()]);
            sh.push(rest.to_string());
            sh
        })
    };
    match upper.as_str() {
        "CMD" => cfg.cmd = Some(shell_or_json(rest)),
        "ENTRYPOINT" => cfg.entrypoint = Some(shell_or_json(rest)),
        "ENV" => {
            for (k, v) in pairs("ENV", rest)? {
                cfg.env_set(&k, &v);
            }
        }
        "LABEL" => {
            let labels = cfg.labels.get_or_insert_with(BTreeMap::new);
            for (k, v) in pairs("LABEL", rest)? {
                labels.insert(k, v);
            }
        }
        "EXPOSE" => {
            let ports = cfg.exposed_ports.get_or_insert_with(BTreeMap::new);
            for p in words(rest)? {
                let p = if p.contains('/') { p } else { format!("{p}/tcp") };
                ports.insert(p, Empty {});
            }
        }
        "VOLUME" => {
            let list = match json_form(rest) {
                Some(l) => l,
                None => words(rest)?,
            };
            let vols = cfg.volumes.get_or_insert_with(BTreeMap::new);
            for v in list {
                vols.insert(v, Empty {});
            }
        }
        "USER" => cfg.user = rest.to_string(),
        "WORKDIR" => {
            cfg.working_dir = if rest.starts_with('/') || cfg.working_dir.is_empty() {
                rest.to_string()
            } else {
                format!("{}/{rest}", cfg.working_dir.trim_end_matches('/'))
            }
        }
        "STOPSIGNAL" => cfg.stop_signal = rest.to_string(),
        "ONBUILD" => cfg.on_build.get_or_insert_with(Vec::new).push(rest.to_string()),
        _ => bail!("{instr} is not a valid change command"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_commands() {
        let mut c = ContainerConfig::default();
        apply_change(&mut c, r#"CMD ["echo", "hi"]"#).unwrap();
        assert_eq!(c.cmd, Some(vec!["echo".to_string(), "hi".to_string()]));
        apply_change(&mut c, "ENTRYPOINT exec top -b").unwrap();
        assert_eq!(
            c.entrypoint,
            Some(vec!["/bin/sh".into(), "-c".into(), "exec top -b".into()])
        );
        apply_change(&mut c, r#"ENV A=1 B="two words""#).unwrap();
        apply_change(&mut c, "ENV C three words").unwrap();
        assert_eq!(c.env_get("B"), Some("two words"));
        assert_eq!(c.env_get("C"), Some("three words"));
        apply_change(&mut c, "EXPOSE 80 53/udp").unwrap();
        assert!(c.exposed_ports.as_ref().unwrap().contains_key("80/tcp"));
        assert!(c.exposed_ports.as_ref().unwrap().contains_key("53/udp"));
        apply_change(&mut c, r#"LABEL a=b "c d"=e"#).unwrap();
        assert_eq!(
            c.labels.as_ref().unwrap().get("c d").map(String::as_str),
            Some("e")
        );
        apply_change(&mut c, r#"VOLUME ["/data", "/logs"]"#).unwrap();
        apply_change(&mut c, "VOLUME /more").unwrap();
        assert_eq!(c.volumes.as_ref().unwrap().len(), 3);
        apply_change(&mut c, "WORKDIR /app").unwrap();
        apply_change(&mut c, "WORKDIR sub").unwrap();
        assert_eq!(c.working_dir, "/app/sub");
        apply_change(&mut c, "USER 1000:1000").unwrap();
        apply_change(&mut c, "STOPSIGNAL SIGINT").unwrap();
        apply_change(&mut c, "ONBUILD RUN true").unwrap();
        assert_eq!(c.on_build, Some(vec!["RUN true".to_string()]));
        assert!(apply_change(&mut c, "RUN true")
            .unwrap_err()
            .to_string()
            .contains("not a valid change command"));
        assert!(apply_change(&mut c, "ENV").is_err());
    }

    #[test]
    fn cp_arguments() {
        assert!(matches!(split_cp_arg("c1:/etc"), CpSide::Container(c, p) if c == "c1" && p == "/etc"));
        assert!(matches!(split_cp_arg("/abs:x"), CpSide::Local(_)));
        assert!(matches!(split_cp_arg("./a:b"), CpSide::Local(_)));
        assert!(matches!(split_cp_arg("plain"), CpSide::Local(_)));
        assert!(matches!(split_cp_arg("-"), CpSide::Stream));
    }
}
