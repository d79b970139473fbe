//! Store subcommands: import, load, save, images, tag, rmi, inspect, history, image prune,
//! builder prune/du, system df/prune, store verify. Flags and output follow Docker's.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use kiln_cache::archive::import::{import_rootfs, ImportOptions};
use kiln_cache::archive::load::load;
use kiln_cache::archive::save::{save, Format, SaveItem};
use kiln_cache::gc::{self, PruneOptions};
use kiln_cache::image_index::Target;
use kiln_cache::images::{Image, ImageError, ImageStore};
use kiln_cache::reference::Reference;
use kiln_cache::store::Store;
use kiln_cache::Digest;

use crate::Globals;

/// The store commands, flattened into kiln's top level.
#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Import the contents from a tarball to create a filesystem image
    Import(ImportArgs),
    /// Load an image from a tar archive or STDIN
    Load(LoadArgs),
    /// Save one or more images to a tar archive (streamed to STDOUT by default)
    Save(SaveArgs),
    /// List images
    Images(ImagesArgs),
    /// Create a tag TARGET_IMAGE that refers to SOURCE_IMAGE
    Tag(TagArgs),
    /// Remove one or more images
    Rmi(RmiArgs),
    /// Return low-level information on images
    Inspect(InspectArgs),
    /// Show the history of an image
    History(HistoryArgs),
    /// Manage images
    #[command(subcommand)]
    Image(ImageCmd),
    /// Manage kiln
    #[command(subcommand)]
    System(SystemCmd),
    /// Check the store
    #[command(subcommand, name = "store")]
    StoreGroup(StoreGroupCmd),
    /// Manage builds (the build cache)
    #[command(subcommand)]
    Builder(BuilderCmd),
}

/// `kiln builder ...`.
#[derive(Subcommand, Debug)]
pub enum BuilderCmd {
    /// Remove build cache
    Prune(BuilderPruneArgs),
    /// Show build cache disk usage
    Du(BuilderDuArgs),
}

/// `kiln builder prune`.
#[derive(Args, Debug)]
pub struct BuilderPruneArgs {
    /// Remove all unused build cache, not just dangling ones
    #[arg(short, long)]
    all: bool,
    /// Provide filter values (e.g. `until=24h`; also type=, id=, description=, inuse, shared, private)
    #[arg(long)]
    filter: Vec<String>,
    /// Amount of disk space to keep for cache (e.g. 10GB)
    #[arg(long = "keep-storage", value_parser = parse_size_arg)]
    keep_storage: Option<u64>,
    /// Do not prompt for confirmation
    #[arg(short, long)]
    force: bool,
}

/// `kiln builder du`.
#[derive(Args, Debug)]
pub struct BuilderDuArgs {
    /// Provide filter values (as for `builder prune`)
    #[arg(long)]
    filter: Vec<String>,
    /// Provide a more verbose output
    #[arg(long)]
    verbose: bool,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    gc::parse_size(s)
}

/// `kiln image ...`.
#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// List images
    #[command(alias = "list")]
    Ls(ImagesArgs),
    /// Remove one or more images
    #[command(alias = "remove")]
    Rm(RmiArgs),
    /// Remove unused images
    Prune(PruneArgs),
    /// Display detailed information on one or more images
    Inspect(InspectArgs),
    /// Show the history of an image
    History(HistoryArgs),
    /// Create a tag TARGET_IMAGE that refers to SOURCE_IMAGE
    Tag(TagArgs),
    /// Import the contents from a tarball to create a filesystem image
    Import(ImportArgs),
    /// Load an image from a tar archive or STDIN
    Load(LoadArgs),
    /// Save one or more images to a tar archive
    Save(SaveArgs),
    /// Build an image from a Dockerfile
    Build(Box<crate::build_cmd::BuildArgs>),
    /// Download an image from a registry
    Pull(crate::registry_cmds::PullArgs),
    /// Upload an image to a registry
    Push(crate::registry_cmds::PushArgs),
}

/// `kiln system ...`.
#[derive(Subcommand, Debug)]
pub enum SystemCmd {
    /// Show kiln disk usage
    Df(DfArgs),
    /// Remove unused data
    Prune(SystemPruneArgs),
}

/// `kiln system df`.
#[derive(Args, Debug)]
pub struct DfArgs {
    /// Show detailed information on space usage
    #[arg(short, long)]
    verbose: bool,
    /// Format output using a custom template: 'table', 'table TEMPLATE', 'json', or a Go template
    #[arg(long)]
    format: Option<String>,
}

/// `kiln system prune`.
#[derive(Args, Debug)]
pub struct SystemPruneArgs {
    /// Remove all unused images not just dangling ones (and all build cache)
    #[arg(short, long)]
    all: bool,
    /// Do not prompt for confirmation
    #[arg(short, long)]
    force: bool,
    /// Prune anonymous volumes
    #[arg(long)]
    volumes: bool,
    /// Provide filter values (`until=DURATION`, applied to the build cache)
    #[arg(long)]
    filter: Vec<String>,
}

/// `kiln store ...`.
#[derive(Subcommand, Debug)]
pub enum StoreGroupCmd {
    /// Re-hash every blob and check every image, tag, cache record, snapshot, temp and mount;
    /// exits 1 on damage
    Verify(VerifyArgs),
}

/// `kiln store verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Remove what nothing references (and damaged blobs, dangling tags, stale temps, leftover
    /// mounts) and report what was removed
    #[arg(long)]
    repair: bool,
}

/// `kiln import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Rootfs tarball (plain, gzip, zstd, bzip2 or xz), an http(s) URL, or `-` for STDIN
    file: String,
    /// Apply Dockerfile instruction to the created image
    #[arg(short = 'c', long = "change")]
    change: Vec<String>,
    /// Repository and tag for the image
    reference: Option<String>,
    /// Set commit message for imported image
    #[arg(short, long)]
    message: Option<String>,
    /// Set platform of the imported image (os/arch[/variant]); the host's by default
    #[arg(long)]
    platform: Option<String>,
}

/// `kiln load`.
#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Read from tar archive file, instead of STDIN
    #[arg(short, long)]
    input: Option<PathBuf>,
    /// Suppress the load output
    #[arg(short, long)]
    quiet: bool,
}

/// Archive format of `kiln save`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SaveFormat {
    /// docker-archive that is also an OCI layout (loads into any Docker)
    Docker,
    /// OCI image layout
    Oci,
}

/// `kiln save`.
#[derive(Args, Debug)]
pub struct SaveArgs {
    /// Write to a file, instead of STDOUT
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Archive format
    #[arg(long, value_enum, default_value = "docker")]
    format: SaveFormat,
    /// Save only this platform's image of a multi-platform image (os/arch[/variant]); without
    /// it, an image index is saved whole
    #[arg(long)]
    platform: Option<String>,
    /// Images to save
    #[arg(required = true)]
    images: Vec<String>,
}

/// `kiln images`.
#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// Show all images (kiln keeps no intermediate images, so this changes nothing)
    #[arg(short, long)]
    all: bool,
    /// Only show image IDs
    #[arg(short, long)]
    quiet: bool,
    /// Show digests
    #[arg(long)]
    digests: bool,
    /// Don't truncate output
    #[arg(long)]
    no_trunc: bool,
    /// Filter output based on conditions provided (`key=value`)
    #[arg(short = 'f', long)]
    filter: Vec<String>,
    /// Format output using a custom template: 'table', 'table TEMPLATE', 'json', or a Go template
    #[arg(long)]
    format: Option<String>,
    /// Only images of this repository (and tag)
    repository: Option<String>,
}

/// `kiln tag`.
#[derive(Args, Debug)]
pub struct TagArgs {
    /// SOURCE_IMAGE[:TAG]
    source: String,
    /// TARGET_IMAGE[:TAG]
    target: String,
}

/// `kiln rmi`.
#[derive(Args, Debug)]
pub struct RmiArgs {
    /// Force removal of the image
    #[arg(short, long)]
    force: bool,
    /// Images to remove
    #[arg(required = true)]
    images: Vec<String>,
}

/// `kiln inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Format output using a Go template
    #[arg(short = 'f', long)]
    pub format: Option<String>,
    /// Return JSON for the specified type (container, image)
    #[arg(long = "type")]
    pub kind: Option<String>,
    /// Containers or images to inspect
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// `kiln history`.
#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// Image
    image: String,
    /// Don't truncate output
    #[arg(long)]
    no_trunc: bool,
    /// Only show image IDs
    #[arg(short, long)]
    quiet: bool,
    /// Print sizes and dates in human readable format
    #[arg(short = 'H', long, default_value_t = true, action = clap::ArgAction::Set)]
    human: bool,
    /// Format output using a custom template: 'table', 'table TEMPLATE', 'json', or a Go template
    #[arg(long)]
    format: Option<String>,
}

/// `kiln image prune`.
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Remove all unused images, not just dangling ones
    #[arg(short, long)]
    all: bool,
    /// Do not prompt for confirmation
    #[arg(short, long)]
    force: bool,
    /// Fail instead of waiting when builds hold the store
    #[arg(long)]
    no_wait: bool,
    /// Provide filter values (`until=TIME|DURATION`, `label=K[=V]`, `label!=K[=V]`)
    #[arg(long)]
    filter: Vec<String>,
}

/// Runs one store command.
pub fn run(cmd: StoreCmd, g: &Globals) -> anyhow::Result<ExitCode> {
    // `store verify` reports the temps of killed processes instead of removing them on open.
    let open = match cmd {
        StoreCmd::StoreGroup(_) => Store::open_as_is,
        _ => Store::open,
    };
    let store =
        open(&g.root).with_context(|| format!("failed to open the store at `{}`", g.root.display()))?;
    match cmd {
        StoreCmd::Import(a) | StoreCmd::Image(ImageCmd::Import(a)) => cmd_import(&store, a),
        StoreCmd::Load(a) | StoreCmd::Image(ImageCmd::Load(a)) => cmd_load(&store, a),
        StoreCmd::Save(a) | StoreCmd::Image(ImageCmd::Save(a)) => cmd_save(&store, a),
        StoreCmd::Images(a) | StoreCmd::Image(ImageCmd::Ls(a)) => cmd_images(&store, a),
        StoreCmd::Tag(a) | StoreCmd::Image(ImageCmd::Tag(a)) => cmd_tag(&store, a),
        StoreCmd::Rmi(a) | StoreCmd::Image(ImageCmd::Rm(a)) => cmd_rmi(&store, a),
        StoreCmd::Inspect(a) => crate::container_cmds::inspect_objects(a, None, &store),
        StoreCmd::Image(ImageCmd::Inspect(a)) => {
            crate::container_cmds::inspect_objects(a, Some("image"), &store)
        }
        StoreCmd::History(a) | StoreCmd::Image(ImageCmd::History(a)) => cmd_history(&store, a),
        StoreCmd::Image(ImageCmd::Prune(a)) => cmd_prune(&store, a),
        StoreCmd::System(SystemCmd::Df(a)) => cmd_df(&store, a),
        StoreCmd::System(SystemCmd::Prune(a)) => cmd_system_prune(&store, a),
        StoreCmd::StoreGroup(StoreGroupCmd::Verify(a)) => cmd_verify(&store, a),
        StoreCmd::Builder(BuilderCmd::Prune(a)) => cmd_builder_prune(&store, a),
        StoreCmd::Builder(BuilderCmd::Du(a)) => cmd_builder_du(&store, a),
        StoreCmd::Image(ImageCmd::Build(a)) => crate::build_cmd::run(*a, g),
        StoreCmd::Image(ImageCmd::Pull(a)) => crate::registry_cmds::pull(a, g),
        StoreCmd::Image(ImageCmd::Push(a)) => crate::registry_cmds::push(a, g),
    }
}

fn cmd_import(store: &Store, a: ImportArgs) -> anyhow::Result<ExitCode> {
    let reference = a.reference.as_deref().map(Reference::parse).transpose()?;
    let mut config = kiln_dag::image::ContainerConfig::default();
    for c in &a.change {
        crate::container_fs_cmds::apply_change(&mut config, c)?;
    }
    let platform = match &a.platform {
        Some(p) => Some(kiln_dag::Platform::parse(p).context("invalid --platform")?),
        None => None,
    };
    let opts = ImportOptions {
        message: a.message,
        reference,
        config,
        platform,
    };
    let image = if a.file.starts_with("http://") || a.file.starts_with("https://") {
        // A URL: downloaded (with retries) to a temp file in the store, then imported.
        let client = kiln_source::http::HttpClient::new(kiln_source::http::HttpOptions::default());
        let tmp = store.root().join("tmp");
        std::fs::create_dir_all(&tmp).with_context(|| format!("failed to create `{}`", tmp.display()))?;
        let d = client
            .download(&a.file, &tmp, None)
            .with_context(|| format!("failed to download `{}`", a.file))?;
        let f = d
            .file
            .reopen()
            .with_context(|| format!("failed to read the download of `{}`", a.file))?;
        import_rootfs(store, f, &a.file, &opts)?
    } else if a.file == "-" {
        import_rootfs(store, io::stdin().lock(), "-", &opts)?
    } else {
        let f = File::open(&a.file).with_context(|| format!("failed to open `{}`", a.file))?;
        import_rootfs(store, f, &a.file, &opts)?
    };
    println!("{}", image.id());
    Ok(ExitCode::SUCCESS)
}

fn cmd_load(store: &Store, a: LoadArgs) -> anyhow::Result<ExitCode> {
    let loaded = match &a.input {
        Some(path) => {
            let f = File::open(path).with_context(|| format!("failed to open `{}`", path.display()))?;
            load(store, f, &path.display().to_string())?
        }
        None => {
            if io::stdin().is_terminal() {
                bail!("requested load from stdin, but stdin is a terminal; use -i FILE or redirect");
            }
            load(store, io::stdin().lock(), "-")?
        }
    };
    let mut out = io::stdout().lock();
    for img in loaded {
        if img.tags.is_empty() {
            writeln!(out, "Loaded image ID: {}", img.id)?;
        }
        for t in img.tags {
            writeln!(out, "Loaded image: {}", t.familiar())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether the user wrote a tag or digest (Reference::parse adds `latest` when they did not).
fn names_tag(input: &str) -> bool {
    let last = input.rsplit('/').next().unwrap_or(input);
    last.contains(':') || input.contains('@')
}

fn cmd_save(store: &Store, a: SaveArgs) -> anyhow::Result<ExitCode> {
    // Garbage collection waits until the images are written out.
    let _hold = store.hold()?;
    let images = store.images();
    let index = images.index()?;
    // Manifest digest -> tags, in argument order.
    let mut order: Vec<Digest> = Vec::new();
    let mut tags: BTreeMap<Digest, Vec<Reference>> = BTreeMap::new();
    for name in &a.images {
        let mut add = |m: Digest, t: Option<Reference>| {
            if !order.contains(&m) {
                order.push(m);
            }
            let list = tags.entry(m).or_default();
            if let Some(t) = t {
                if !list.contains(&t) {
                    list.push(t);
                }
            }
        };
        // `repo` without a tag saves every tag of the repository, as `docker save` does.
        if let Ok(r) = Reference::parse(name) {
            if !names_tag(name) {
                let repo = r.repository();
                let matching: Vec<(String, Digest)> = index
                    .tags
                    .iter()
                    .filter(|(t, _)| {
                        Reference::parse(t)
                            .map(|t| t.repository() == repo)
                            .unwrap_or(false)
                    })
                    .map(|(t, d)| (t.clone(), *d))
                    .collect();
                if !matching.is_empty() {
                    for (t, d) in matching {
                        add(d, Reference::parse(&t).ok());
                    }
                    continue;
                }
            }
        }
        let m = images.resolve_digest(name)?;
        let tag = Reference::parse(name)
            .ok()
            .filter(|r| r.tag().is_some() && r.digest().is_none() && index.tags.contains_key(&r.to_string()));
        add(m, tag);
    }
    let platform = match &a.platform {
        Some(p) => Some(kiln_dag::Platform::parse(p).context("invalid --platform")?),
        None => None,
    };
    let mut items = Vec::new();
    for m in order {
        let tags = tags.remove(&m).unwrap_or_default();
        let item = match (images.get_target(&m)?, &platform) {
            (Target::Image(image), None) => SaveItem::image(*image, tags),
            (Target::Image(image), Some(p)) => {
                let c = &image.config;
                let got = kiln_dag::Platform::new(&c.os, &c.architecture, c.variant.as_deref());
                if p.match_rank(&got).is_none() {
                    bail!("image {} is {got}, not {p}", m);
                }
                SaveItem::image(*image, tags)
            }
            (Target::Index(index), Some(p)) => {
                SaveItem::image(images.image_of(&m.to_string(), &index, p)?, tags)
            }
            (Target::Index(index), None) => {
                // `docker load` takes one image per tag: the host's, else the first here.
                let host = kiln_dag::Platform::host();
                let image = match images.image_of(&m.to_string(), &index, &host) {
                    Ok(i) => i,
                    Err(_) => match index.entries.iter().find(|e| e.present) {
                        Some(e) => images.get(&e.manifest)?,
                        None => bail!("no platform of image index {m} is in the local store"),
                    },
                };
                SaveItem {
                    image,
                    tags,
                    index: Some(index),
                }
            }
        };
        items.push(item);
    }
    let format = match a.format {
        SaveFormat::Docker => Format::Docker,
        SaveFormat::Oci => Format::Oci,
    };
    match &a.output {
        Some(path) => {
            // Write next to the destination and rename, so a failed save leaves no partial file;
            // the temp is registered in the store, so a killed save's is removed by the next
            // command.
            let temp = kiln_cache::temp::OutsideTemp::create(store, path)
                .with_context(|| format!("failed to save to `{}`", path.display()))?;
            let result = save(store, &items, format, temp.file())
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    let from = temp.path().to_path_buf();
                    temp.persist(path).with_context(|| {
                        format!("failed to rename `{}` to `{}`", from.display(), path.display())
                    })
                });
            result.with_context(|| format!("failed to save to `{}`", path.display()))?;
        }
        None => {
            let stdout = io::stdout();
            if stdout.is_terminal() {
                bail!("cowardly refusing to save to a terminal. Use the -o flag or redirect");
            }
            save(store, &items, format, stdout.lock())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Docker's `units.HumanSizeWithPrecision(size, 3)`: decimal units, 3 significant digits.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 9] = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{}", UNITS[i])
}

/// Docker's `units.HumanDuration` + " ago".
pub fn human_ago(created: Option<&str>) -> String {
    let Some(t) = created
        .and_then(|c| time::OffsetDateTime::parse(c, &time::format_description::well_known::Rfc3339).ok())
    else {
        return "N/A".to_string();
    };
    let secs = (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    let (m, h) = (secs / 60, secs / 3600);
    let d = match () {
        _ if secs < 1 => "Less than a second".to_string(),
        _ if secs == 1 => "1 second".to_string(),
        _ if secs < 60 => format!("{secs} seconds"),
        _ if m == 1 => "About a minute".to_string(),
        _ if m < 60 => format!("{m} minutes"),
        _ if h == 1 => "About an hour".to_string(),
        _ if h < 48 => format!("{h} hours"),
        _ if h < 24 * 7 * 2 => format!("{} days", h / 24),
        _ if h < 24 * 30 * 2 => format!("{} weeks", h / 24 / 7),
        _ if h < 24 * 365 * 2 => format!("{} months", h / 24 / 30),
        _ => format!("{} years", h / 24 / 365),
    };
    format!("{d} ago")
}

fn short(d: &Digest, no_trunc: bool) -> String {
    if no_trunc {
        d.to_string()
    } else {
        d.hex()[..12].to_string()
    }
}

/// Docker's `images` column names.
const IMAGE_HEADERS: &[(&str, &str)] = &[
    ("Repository", "REPOSITORY"),
    ("Tag", "TAG"),
    ("Digest", "DIGEST"),
    ("ID", "IMAGE ID"),
    ("CreatedSince", "CREATED"),
    ("CreatedAt", "CREATED AT"),
    ("Size", "SIZE"),
    ("Containers", "CONTAINERS"),
    ("VirtualSize", "VIRTUAL SIZE"),
    ("SharedSize", "SHARED SIZE"),
    ("UniqueSize", "UNIQUE SIZE"),
];

/// Whether a `reference=` pattern matches a tag, as Docker's `FamiliarMatch` does (the familiar
/// `name:tag`, then the familiar name alone).
fn reference_matches(pattern: &str, tag: &Reference) -> bool {
    let full = tag.familiar();
    crate::filters::glob_match(pattern, &full)
        || crate::filters::glob_match(pattern, &tag.familiar_repository())
}

fn cmd_images(store: &Store, a: ImagesArgs) -> anyhow::Result<ExitCode> {
    let _ = a.all;
    let f = crate::filters::Filters::parse(
        &a.filter,
        &[
            "dangling",
            "label",
            "label!",
            "before",
            "since",
            "reference",
            "until",
        ],
    )?;
    let dangling = f.bool("dangling")?;
    let images = store.images();
    let created_of = |name: &str| -> anyhow::Result<i64> {
        let img = images.resolve(name).map_err(|_| {
            anyhow::anyhow!(
                "No such image: {}",
                Reference::parse(name)
                    .map(|r| r.to_string())
                    .unwrap_or_else(|_| name.to_string())
            )
        })?;
        Ok(crate::filters::unix_time(img.config.created.as_deref()))
    };
    let before = f.get("before").first().map(|b| created_of(b)).transpose()?;
    let since = f.get("since").first().map(|b| created_of(b)).transpose()?;
    let until = f
        .get("until")
        .first()
        .map(|u| crate::filters::until_cutoff(u))
        .transpose()?;
    let repo_filter = match &a.repository {
        Some(r) => Some((Reference::parse(r)?, names_tag(r))),
        None => None,
    };
    let mut rows: Vec<(Option<String>, crate::gotemplate::Value, Digest)> = Vec::new();
    // Images, then indexes, each shown once: an index by its digest (as Docker's containerd
    // store shows it), with the date and size of its image for this host (else its first).
    let mut listed: Vec<(Digest, Vec<Reference>, Image, Digest)> = Vec::new();
    for (manifest, _, tags) in images.list()? {
        match images.get(&manifest) {
            Ok(img) => {
                let id = img.id();
                listed.push((manifest, tags, img, id));
            }
            Err(e) => eprintln!("warning: skipping image {manifest}: {e}"),
        }
    }
    for (digest, _, tags) in images.list_indexes()? {
        let shown = images.get_index(&digest).and_then(|index| {
            let e = index
                .select(&kiln_dag::Platform::host())
                .filter(|e| e.present)
                .or_else(|| index.entries.iter().find(|e| e.present))
                .ok_or_else(|| ImageError::NotFound(format!("any platform of index {digest}")))?;
            images.get(&e.manifest)
        });
        match shown {
            Ok(img) => listed.push((digest, tags, img, digest)),
            Err(e) => eprintln!("warning: skipping image index {digest}: {e}"),
        }
    }
    for (manifest, tags, img, id) in listed {
        let created = crate::filters::unix_time(img.config.created.as_deref());
        let labels = img.config.config.labels.clone().unwrap_or_default();
        if dangling.is_some_and(|d| d != tags.is_empty())
            || !f.labels_match(&labels)
            || before.is_some_and(|b| created >= b)
            || since.is_some_and(|s| created <= s)
            || until.is_some_and(|u| created >= u)
        {
            continue;
        }
        let entries: Vec<Option<&Reference>> = if tags.is_empty() {
            vec![None]
        } else {
            tags.iter().map(Some).collect()
        };
        for t in entries {
            if let Some((r, with_tag)) = &repo_filter {
                let Some(t) = t else { continue };
                if t.repository() != r.repository() || (*with_tag && t.tag() != r.tag()) {
                    continue;
                }
            }
            if f.has("reference") {
                let Some(t) = t else { continue };
                if !f.get("reference").iter().any(|p| reference_matches(p, t)) {
                    continue;
                }
            }
            let (repo, tag) = match t {
                Some(t) => (t.familiar_repository(), t.tag().unwrap_or("<none>").to_string()),
                None => ("<none>".to_string(), "<none>".to_string()),
            };
            let row = crate::format::row(
                "*formatter.imageContext",
                vec![
                    ("Repository", repo),
                    ("Tag", tag),
                    ("Digest", manifest.to_string()),
                    ("ID", short(&id, a.no_trunc)),
                    ("CreatedSince", human_ago(img.config.created.as_deref())),
                    (
                        "CreatedAt",
                        crate::container_cmds::docker_time(img.config.created.as_deref().unwrap_or("")),
                    ),
                    ("Size", human_size(docker_image_size(store, &img))),
                    ("Containers", "N/A".into()),
                    ("VirtualSize", human_size4(docker_image_size(store, &img))),
                    ("SharedSize", "N/A".into()),
                    ("UniqueSize", "N/A".into()),
                ],
            );
            rows.push((img.config.created.clone(), row, id));
        }
    }
    // Newest first, as Docker lists them.
    rows.sort_by(|x, y| y.0.cmp(&x.0).then_with(|| x.1.to_text().cmp(&y.1.to_text())));
    if a.quiet {
        let mut seen = BTreeSet::new();
        for (_, _, id) in rows {
            if seen.insert(id) {
                println!("{}", short(&id, a.no_trunc));
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let default_table = if a.digests {
        "table {{.Repository}}\t{{.Tag}}\t{{.Digest}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}"
    } else {
        "table {{.Repository}}\t{{.Tag}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}"
    };
    let rows: Vec<_> = rows.into_iter().map(|r| r.1).collect();
    crate::format::Listing {
        format: a.format.as_deref().unwrap_or(""),
        default_table,
        headers: IMAGE_HEADERS,
    }
    .print(&rows)
}

fn cmd_tag(store: &Store, a: TagArgs) -> anyhow::Result<ExitCode> {
    // A prune must not remove the image between its lookup and its new tag.
    let _hold = store.hold()?;
    let images = store.images();
    let m = images.resolve_digest(&a.source)?;
    let target = Reference::parse(&a.target)?;
    images.tag(&target, &m)?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_rmi(store: &Store, a: RmiArgs) -> anyhow::Result<ExitCode> {
    let images = store.images();
    let mut failed = false;
    let mut out = io::stdout().lock();
    for name in &a.images {
        match rmi_one(&images, name, a.force, &mut out) {
            Ok(()) => {}
            Err(e) => {
                eprintln!("Error: {e:#}");
                failed = true;
            }
        }
    }
    if let Err(e) = gc::collect_if_idle(store) {
        eprintln!("warning: unreferenced blobs were not removed: {e:#}");
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `rmi` of an image index: untag, and delete it (with its platform images) at its last tag,
/// unless a container uses one of them.
fn rmi_index(
    images: &ImageStore,
    name: &str,
    index: &kiln_cache::image_index::IndexImage,
    force: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let tags = images.index()?.tags_of(&index.digest);
    let by_tag = Reference::parse(name)
        .ok()
        .filter(|r| r.digest().is_none() && tags.contains(r));
    if let Some(r) = &by_tag {
        if tags.len() > 1 {
            images.untag(r)?;
            writeln!(out, "Untagged: {}", r.familiar())?;
            return Ok(());
        }
    } else if tags.len() > 1 && !force {
        bail!(
            "conflict: unable to delete {} (must be forced) - image is referenced in multiple repositories",
            index.short_id()
        );
    }
    for e in index.entries.iter().filter(|e| e.present) {
        let img = images.get(&e.manifest)?;
        if let Some(c) = images.containers_using(&img)?.first() {
            bail!(
                "conflict: unable to delete {} - its {} image is being used by container {}",
                index.short_id(),
                e.platform,
                &c[..c.len().min(12)]
            );
        }
    }
    images.delete(&index.digest)?;
    for t in &tags {
        writeln!(out, "Untagged: {}", t.familiar())?;
    }
    writeln!(out, "Deleted: {}", index.digest)?;
    Ok(())
}

fn rmi_one(images: &ImageStore, name: &str, force: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let manifest = images.resolve_digest(name)?;
    if let Target::Index(index) = images.get_target(&manifest)? {
        return rmi_index(images, name, &index, force, out);
    }
    let image = images.get(&manifest)?;
    let index = images.index()?;
    let tags = index.tags_of(&manifest);
    let containers = images.containers_using(&image)?;
    // By tag: untag; delete only when it was the last tag.
    let by_tag = Reference::parse(name)
        .ok()
        .filter(|r| r.digest().is_none() && index.tags.get(&r.to_string()) == Some(&manifest));
    if let Some(r) = by_tag {
        if tags.len() > 1 {
            images.untag(&r)?;
            writeln!(out, "Untagged: {}", r.familiar())?;
            return Ok(());
        }
        if let Some(c) = containers.first() {
            if !force {
                bail!(
                    "conflict: unable to remove repository reference \"{name}\" (must force) - container {} is using its referenced image {}",
                    &c[..c.len().min(12)],
                    image.short_id()
                );
            }
            images.untag(&r)?;
            writeln!(out, "Untagged: {}", r.familiar())?;
            return Ok(());
        }
        images.delete(&manifest)?;
        writeln!(out, "Untagged: {}", r.familiar())?;
        writeln!(out, "Deleted: {}", image.id())?;
        return Ok(());
    }
    // By ID or digest: refuse when it would drop several tags, unless forced.
    if tags.len() > 1 && !force {
        bail!(
            "conflict: unable to delete {} (must be forced) - image is referenced in multiple repositories",
            image.short_id()
        );
    }
    if let Some(c) = containers.first() {
        bail!(
            "conflict: unable to delete {} (cannot be forced) - image is being used by container {}",
            image.short_id(),
            &c[..c.len().min(12)]
        );
    }
    images.delete(&manifest)?;
    for t in tags {
        writeln!(out, "Untagged: {}", t.familiar())?;
    }
    writeln!(out, "Deleted: {}", image.id())?;
    Ok(())
}

/// An image's size as Docker shows it (`docker images`, `docker inspect`): the unpacked size
/// of its layers as Docker's overlay2 counts them (see `kiln_cache::layer::layer_size`), not
/// the size of their blobs.
fn docker_image_size(store: &Store, image: &Image) -> u64 {
    image.layers.iter().map(|l| docker_layer_size(store, l)).sum()
}

fn docker_layer_size(store: &Store, l: &kiln_cache::images::ImageLayer) -> u64 {
    kiln_cache::layer::layer_size(store, &l.digest, &l.diff_id).unwrap_or_else(|e| {
        tracing::debug!(error = %e, layer = %l.digest, "layer size unknown, showing the blob's");
        l.descriptor.size()
    })
}

/// Docker-like `inspect` JSON of one image.
pub(crate) fn inspect_json(
    store: &Store,
    images: &ImageStore,
    image: &Image,
) -> Result<serde_json::Value, ImageError> {
    let index = images.index()?;
    let record = index.images.get(&image.manifest_digest).cloned();
    let tags: Vec<String> = index
        .tags_of(&image.manifest_digest)
        .iter()
        .map(|t| t.familiar())
        .collect();
    let mut repos: Vec<String> = index
        .tags_of(&image.manifest_digest)
        .iter()
        .map(|t| format!("{}@{}", t.familiar_repository(), image.manifest_digest))
        .collect();
    repos.dedup();
    let c = &image.config;
    let comment = c
        .history
        .last()
        .and_then(|h| h.comment.clone())
        .unwrap_or_default();
    let mut v = serde_json::json!({
        "Id": image.id().to_string(),
        "RepoTags": tags,
        "RepoDigests": repos,
        "Parent": "",
        "Comment": comment,
        "Created": c.created.clone().unwrap_or_default(),
        "DockerVersion": "",
        "Author": c.author.clone().unwrap_or_default(),
        "Config": c.config,
        "Architecture": c.architecture,
        "Os": c.os,
        "Size": docker_image_size(store, image),
        "VirtualSize": docker_image_size(store, image),
        "RootFS": {
            "Type": c.rootfs.kind,
            "Layers": c.rootfs.diff_ids,
        },
        "Metadata": {
            "LastTagTime": record.and_then(|r| r.last_tag_time).unwrap_or_else(|| "0001-01-01T00:00:00Z".to_string()),
        },
        "Descriptor": {
            "mediaType": image.manifest.media_type().as_ref().map(|m| m.to_string()).unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_string()),
            "digest": image.manifest_digest.to_string(),
            "size": image.manifest_bytes.len(),
        },
    });
    if let (Some(variant), Some(obj)) = (&c.variant, v.as_object_mut()) {
        obj.insert("Variant".to_string(), serde_json::Value::String(variant.clone()));
    }
    Ok(v)
}

fn ellipsis(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

fn cmd_history(store: &Store, a: HistoryArgs) -> anyhow::Result<ExitCode> {
    let image = store.images().resolve(&a.image)?;
    let mut layers = image.layers.iter();
    // (created, created_by, size, comment), oldest first.
    let mut entries: Vec<(Option<String>, String, u64, String)> = Vec::new();
    for h in &image.config.history {
        let size = if h.empty_layer {
            0
        } else {
            layers.next().map(|l| docker_layer_size(store, l)).unwrap_or(0)
        };
        entries.push((
            h.created.clone(),
            h.created_by.clone().unwrap_or_default(),
            size,
            h.comment.clone().unwrap_or_default(),
        ));
    }
    for l in layers {
        entries.push((
            image.config.created.clone(),
            String::new(),
            docker_layer_size(store, l),
            String::new(),
        ));
    }
    entries.reverse();
    let id = short(&image.id(), a.no_trunc);
    if a.quiet {
        for (i, _) in entries.iter().enumerate() {
            println!("{}", if i == 0 { id.as_str() } else { "<missing>" });
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = Vec::new();
    for (i, (created, by, size, comment)) in entries.into_iter().enumerate() {
        let by = by.replace(['\n', '\t'], " ");
        // Docker prints RFC 3339 to the second.
        let created_at = created
            .as_deref()
            .and_then(|c| time::OffsetDateTime::parse(c, &time::format_description::well_known::Rfc3339).ok())
            .and_then(|t| {
                t.to_offset(time::UtcOffset::UTC)
                    .replace_nanosecond(0)
                    .ok()?
                    .format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        rows.push(crate::format::row(
            "*formatter.historyContext",
            vec![
                (
                    "ID",
                    if i == 0 {
                        id.clone()
                    } else {
                        "<missing>".to_string()
                    },
                ),
                (
                    "CreatedSince",
                    if a.human {
                        human_ago(created.as_deref())
                    } else {
                        created_at.clone()
                    },
                ),
                ("CreatedAt", created_at),
                ("CreatedBy", if a.no_trunc { by } else { ellipsis(&by, 45) }),
                (
                    "Size",
                    if a.human {
                        human_size(size)
                    } else {
                        size.to_string()
                    },
                ),
                ("Comment", comment),
            ],
        ));
    }
    crate::format::Listing {
        format: a.format.as_deref().unwrap_or(""),
        default_table: "table {{.ID}}\t{{.CreatedSince}}\t{{.CreatedBy}}\t{{.Size}}\t{{.Comment}}",
        headers: &[
            ("ID", "IMAGE"),
            ("CreatedSince", "CREATED"),
            ("CreatedAt", "CREATED AT"),
            ("CreatedBy", "CREATED BY"),
            ("Size", "SIZE"),
            ("Comment", "COMMENT"),
        ],
    }
    .print(&rows)
}

/// The automatic GC after a build (`KILN_GC_KEEP_STORAGE`, see `kiln_cache::gc::auto_collect`).
/// The caller no longer holds the store. Failures are warnings: the build itself succeeded.
pub fn auto_gc(store: &Store) {
    let budget = match gc::budget_from_env() {
        Ok(Some(b)) => b,
        Ok(None) => return,
        Err(e) => {
            eprintln!("warning: {e}; no automatic garbage collection");
            return;
        }
    };
    match gc::auto_collect(store, budget) {
        Ok(Some(r)) => tracing::debug!(
            entries = r.deleted.len(),
            bytes = r.reclaimed,
            "automatic GC: the build cache exceeded KILN_GC_KEEP_STORAGE"
        ),
        Ok(None) => {}
        Err(e) => eprintln!("warning: automatic garbage collection failed: {e:#}"),
    }
}

/// Asks `question` on stderr; true when the answer is yes.
fn confirm(question: &str) -> anyhow::Result<bool> {
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn waiting() {
    eprintln!("waiting for running builds to release the store...");
}

/// The "Deleted Images:" block of `image prune` and `system prune`.
fn images_output(report: &gc::PruneReport) -> String {
    let mut out = String::new();
    if !report.deleted_images.is_empty() || !report.untagged.is_empty() {
        out.push_str("Deleted Images:\n");
        for t in &report.untagged {
            out.push_str(&format!("untagged: {}\n", t.familiar()));
        }
        for d in &report.deleted_images {
            out.push_str(&format!("deleted: {d}\n"));
        }
    }
    out
}

fn cmd_prune(store: &Store, a: PruneArgs) -> anyhow::Result<ExitCode> {
    let f = crate::filters::Filters::parse(&a.filter, &["until", "label", "label!"])?;
    let until = f
        .get("until")
        .first()
        .map(|u| crate::filters::until_cutoff(u))
        .transpose()?;
    if !a.force {
        let what = if a.all {
            "all images without at least one container associated to them"
        } else {
            "all dangling images"
        };
        if !confirm(&format!(
            "WARNING! This will remove {what}.\nAre you sure you want to continue?"
        ))? {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let report = gc::prune_matching(
        store,
        PruneOptions {
            all: a.all,
            wait: !a.no_wait,
        },
        waiting,
        |img| {
            let created = crate::filters::unix_time(img.config.created.as_deref());
            until.is_none_or(|u| created < u)
                && f.labels_match(&img.config.config.labels.clone().unwrap_or_default())
        },
    )?;
    let mut out = io::stdout().lock();
    let text = images_output(&report);
    if !text.is_empty() {
        writeln!(out, "{text}")?;
    }
    writeln!(out, "Total reclaimed space: {}", human_size4(report.reclaimed))?;
    Ok(ExitCode::SUCCESS)
}

/// The "Deleted build cache objects:" block.
fn cache_output(report: &gc::BuilderPruneReport) -> String {
    let mut out = String::new();
    if !report.deleted.is_empty() {
        out.push_str("Deleted build cache objects:\n");
        for id in &report.deleted {
            out.push_str(id);
            out.push('\n');
        }
    }
    out
}

fn cmd_builder_prune(store: &Store, a: BuilderPruneArgs) -> anyhow::Result<ExitCode> {
    let filter = gc::CacheFilter::parse(&a.filter).map_err(anyhow::Error::msg)?;
    if !a.force {
        let warning = if a.all {
            "WARNING! This will remove all build cache. Are you sure you want to continue?"
        } else {
            "WARNING! This will remove all dangling build cache. Are you sure you want to continue?"
        };
        if !confirm(warning)? {
            bail!("builder prune has been cancelled");
        }
    }
    let opts = gc::BuilderPruneOptions {
        all: a.all,
        filter,
        keep_storage: a.keep_storage,
        wait: true,
    };
    let report = gc::builder_prune(store, &opts, waiting)?;
    let mut out = io::stdout().lock();
    let text = cache_output(&report);
    if !text.is_empty() {
        writeln!(out, "{text}")?;
    }
    writeln!(out, "Total reclaimed space: {}", human_size4(report.reclaimed))?;
    Ok(ExitCode::SUCCESS)
}

/// Docker's `units.HumanDuration(time.Since(t))` + " ago", for a system time.
fn since(t: Option<std::time::SystemTime>) -> String {
    match t {
        Some(t) => {
            let t: time::OffsetDateTime = t.into();
            let s = t
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            human_ago(Some(&s))
        }
        None => String::new(),
    }
}

/// Writes `lines` (cells separated by `\t`) as Go's `tabwriter.NewWriter(w, 1, 8, 1, '\t', 0)`
/// does: every column padded with tabs to the same multiple of 8. Empty lines end a block of
/// aligned lines.
fn write_tabbed(out: &mut impl Write, lines: &[String]) -> io::Result<()> {
    for block in lines
        .split(|l| l.is_empty())
        .collect::<Vec<_>>()
        .iter()
        .enumerate()
    {
        let (i, block) = block;
        if i > 0 {
            writeln!(out)?;
        }
        let rows: Vec<Vec<&str>> = block.iter().map(|l| l.split('\t').collect()).collect();
        let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut widths = vec![0usize; cols];
        for r in &rows {
            // The last cell of a line is not part of a column.
            for (c, cell) in r.iter().enumerate().take(r.len().saturating_sub(1)) {
                widths[c] = widths[c].max(cell.chars().count() + 1);
            }
        }
        for r in &rows {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                line.push_str(cell);
                if c + 1 < r.len() {
                    let cellw = widths[c].div_ceil(8) * 8;
                    let n = cellw - cell.chars().count();
                    line.push_str(&"\t".repeat(n.div_ceil(8)));
                }
            }
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

fn cmd_builder_du(store: &Store, a: BuilderDuArgs) -> anyhow::Result<ExitCode> {
    let filter = gc::CacheFilter::parse(&a.filter).map_err(anyhow::Error::msg)?;
    let now = std::time::SystemTime::now();
    let mut entries: Vec<gc::CacheEntry> = gc::build_cache(store, true)?
        .into_iter()
        .filter(|e| filter.matches(e, now))
        .collect();
    // Largest first, as BuildKit lists them.
    entries.sort_by(|x, y| y.size.cmp(&x.size).then_with(|| x.id.cmp(&y.id)));
    let mut lines = Vec::new();
    if a.verbose {
        for e in &entries {
            lines.push(format!("ID:\t{}", e.id));
            if let Some(p) = &e.parent {
                lines.push(format!("Parent:\t{p}"));
            }
            let created = e.created.map(|t| {
                let t: time::OffsetDateTime = t.into();
                t.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            });
            lines.push(format!("Created at:\t{}", created.unwrap_or_default()));
            lines.push(format!("Mutable:\t{}", e.mutable));
            lines.push(format!("Reclaimable:\t{}", !e.in_use));
            lines.push(format!("Shared:\t{}", e.shared));
            lines.push(format!("Size:\t{}", human_size4(e.size)));
            if !e.description.is_empty() {
                lines.push(format!("Description:\t{}", e.description));
            }
            lines.push(format!("Usage count:\t{}", e.usage_count));
            if e.last_used.is_some() {
                lines.push(format!("Last used:\t{}", since(e.last_used)));
            }
            lines.push(format!("Type:\t{}", e.record_type));
            lines.push(String::new());
        }
    } else {
        lines.push("ID\tRECLAIMABLE\tSIZE\tLAST ACCESSED".to_string());
        for e in &entries {
            let id = if e.mutable {
                format!("{}*", e.id)
            } else {
                e.id.clone()
            };
            let size = if e.shared {
                format!("{}*", human_size4(e.size))
            } else {
                human_size4(e.size)
            };
            lines.push(format!(
                "{id:<40}\t{:<5}\t{size:<10}\t{}",
                (!e.in_use).to_string(),
                since(e.last_used)
            ));
        }
    }
    let mut out = io::stdout().lock();
    write_tabbed(&mut out, &lines)?;
    if a.filter.is_empty() {
        let total: u64 = entries.iter().map(|e| e.size).sum();
        let reclaimable: u64 = entries.iter().filter(|e| !e.in_use).map(|e| e.size).sum();
        let shared: u64 = entries.iter().filter(|e| e.shared).map(|e| e.size).sum();
        let mut summary = Vec::new();
        if shared > 0 {
            summary.push(format!("Shared:\t{}", human_size4(shared)));
            summary.push(format!("Private:\t{}", human_size4(total - shared)));
        }
        summary.push(format!("Reclaimable:\t{}", human_size4(reclaimable)));
        summary.push(format!("Total:\t{}", human_size4(total)));
        write_tabbed(&mut out, &summary)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_system_prune(store: &Store, a: SystemPruneArgs) -> anyhow::Result<ExitCode> {
    let filter = gc::CacheFilter::parse(&a.filter).map_err(anyhow::Error::msg)?;
    if a.volumes && filter.until.is_some() {
        bail!("The \"until\" filter is not supported with \"--volumes\"");
    }
    if !a.force {
        let mut warnings = vec!["all stopped containers"];
        if a.volumes {
            warnings.push("all anonymous volumes not used by at least one container");
        }
        warnings.push(if a.all {
            "all images without at least one container associated to them"
        } else {
            "all dangling images"
        });
        warnings.push(if a.all {
            "all build cache"
        } else {
            "unused build cache"
        });
        let mut q = "WARNING! This will remove:".to_string();
        for w in warnings {
            q.push_str(&format!("\n  - {w}"));
        }
        if !a.filter.is_empty() {
            q.push_str("\n\n  Items to be pruned will be filtered with:");
            for f in &a.filter {
                q.push_str(&format!("\n  - {f}"));
            }
        }
        q.push_str("\n\nAre you sure you want to continue?");
        if !confirm(&q)? {
            bail!("system prune has been cancelled");
        }
    }
    let mut out = io::stdout().lock();
    let mut reclaimed = 0u64;
    // Containers first: the images and volumes they held become unused.
    let containers = kiln_containers::record::Containers::open(store.root())?;
    let sizes: BTreeMap<String, u64> = containers
        .list()?
        .iter()
        .map(|r| (r.id.clone(), kiln_cache::temp::disk_usage(&containers.dir(&r.id))))
        .collect();
    let removed = kiln_containers::lifecycle::prune(&containers)?;
    if !removed.is_empty() {
        writeln!(out, "Deleted Containers:")?;
        for id in &removed {
            writeln!(out, "{id}")?;
            reclaimed += sizes.get(id).copied().unwrap_or(0);
        }
        writeln!(out)?;
    }
    if a.volumes {
        let volumes = kiln_containers::volumes::Volumes::open(store.root())?;
        let (names, bytes) = volumes.prune(false)?;
        if !names.is_empty() {
            writeln!(out, "Deleted Volumes:")?;
            for n in &names {
                writeln!(out, "{n}")?;
            }
            writeln!(out)?;
        }
        reclaimed += bytes;
    }
    let images = gc::prune(
        store,
        PruneOptions {
            all: a.all,
            wait: true,
        },
        waiting,
    )?;
    let text = images_output(&images);
    if !text.is_empty() {
        writeln!(out, "{text}")?;
    }
    reclaimed += images.reclaimed;
    let opts = gc::BuilderPruneOptions {
        all: a.all,
        filter,
        keep_storage: None,
        wait: true,
    };
    let cache = gc::builder_prune(store, &opts, waiting)?;
    let text = cache_output(&cache);
    if !text.is_empty() {
        writeln!(out, "{text}")?;
    }
    reclaimed += cache.reclaimed;
    writeln!(out, "Total reclaimed space: {}", human_size4(reclaimed))?;
    Ok(ExitCode::SUCCESS)
}

/// Docker's `units.HumanSize` (4 significant digits): `Total reclaimed space`, `system df`,
/// `builder du`.
pub fn human_size4(bytes: u64) -> String {
    human_size_prec(bytes, 4)
}

/// `units.HumanSizeWithPrecision(size, prec)`: decimal units, `prec` significant digits, as Go's
/// `%.*g` prints them.
fn human_size_prec(bytes: u64, prec: usize) -> String {
    const UNITS: [&str; 9] = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    let digits = if v < 1.0 {
        1
    } else {
        v.log10().floor() as usize + 1
    };
    let s = format!("{v:.*}", prec.saturating_sub(digits));
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{}", UNITS[i])
}

/// Prints rows as docker/cli's table formatter does (`tabwriter.NewWriter(w, 10, 1, 3, ' ', 0)`):
/// columns padded to their widest cell plus 3 spaces, and at least 10 wide.
fn print_docker_table(out: &mut impl Write, rows: &[Vec<String>]) -> io::Result<()> {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut widths = vec![10; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count() + 3);
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            line.push_str(c);
            if i + 1 < r.len() {
                line.push_str(&" ".repeat(widths[i] - c.chars().count()));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// One image's row of `system df -v`.
struct ImageRow {
    repo: String,
    tag: String,
    id: String,
    created: String,
    size: u64,
    shared: u64,
    containers: usize,
}

/// What `system df` reports about images.
struct ImageUsage {
    rows: Vec<ImageRow>,
    total: usize,
    active: usize,
    size: u64,
    reclaimable: u64,
}

fn disk_of_blob(store: &Store, d: &Digest) -> u64 {
    std::fs::symlink_metadata(store.content().path(d))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0)
}

fn image_usage(store: &Store) -> anyhow::Result<ImageUsage> {
    let images = store.images();
    let snapshots = kiln_cache::snapshot::Snapshots::open(&store.snapshots_dir())?;
    // Disk bytes of an image's part: its blobs, and its unpacked layers (snapshots).
    let mut part_size: BTreeMap<String, u64> = BTreeMap::new();
    let mut users: BTreeMap<String, BTreeSet<Digest>> = BTreeMap::new();
    let mut list = Vec::new();
    for (manifest, _, tags) in images.list()? {
        let Ok(img) = images.get(&manifest) else { continue };
        let containers = images.containers_using(&img)?.len();
        let mut parts = Vec::new();
        for d in img.blobs() {
            let k = format!("b{}", d.hex());
            part_size
                .entry(k.clone())
                .or_insert_with(|| disk_of_blob(store, &d));
            parts.push(k);
        }
        for c in img.chain_ids() {
            let k = format!("s{}", c.hex());
            part_size
                .entry(k.clone())
                .or_insert_with(|| snapshots.disk_usage(&c));
            parts.push(k);
        }
        for p in &parts {
            users.entry(p.clone()).or_default().insert(manifest);
        }
        list.push((img, tags, containers, parts));
    }
    let mut u = ImageUsage {
        rows: Vec::new(),
        total: list.len(),
        active: list.iter().filter(|l| l.2 > 0).count(),
        size: part_size.values().sum(),
        reclaimable: 0,
    };
    let mut active_parts = BTreeSet::new();
    for (img, tags, containers, parts) in &list {
        let size: u64 = parts.iter().map(|p| part_size[p]).sum();
        let shared: u64 = parts
            .iter()
            .filter(|p| users[*p].len() > 1)
            .map(|p| part_size[p])
            .sum();
        if *containers > 0 {
            active_parts.extend(parts.iter().cloned());
        }
        let (repo, tag) = match tags.first() {
            Some(t) => (t.familiar_repository(), t.tag().unwrap_or("<none>").to_string()),
            None => ("<none>".to_string(), "<none>".to_string()),
        };
        u.rows.push(ImageRow {
            repo,
            tag,
            id: img.id().hex()[..12].to_string(),
            created: human_ago(img.config.created.as_deref()),
            size,
            shared,
            containers: *containers,
        });
    }
    u.reclaimable = part_size
        .iter()
        .filter(|(k, _)| !active_parts.contains(*k))
        .map(|(_, s)| s)
        .sum();
    Ok(u)
}

fn percent(part: u64, whole: u64) -> String {
    (part * 100)
        .checked_div(whole)
        .map(|p| format!(" ({p}%)"))
        .unwrap_or_default()
}

fn cmd_df(store: &Store, a: DfArgs) -> anyhow::Result<ExitCode> {
    use kiln_containers::state::Status;
    let images = image_usage(store)?;
    let containers = kiln_containers::record::Containers::open(store.root())?;
    let volumes = kiln_containers::volumes::Volumes::open(store.root())?;
    let volume_users = volumes.usage()?;
    // (record, state, bytes of its writable layer and records)
    let mut ctrs = Vec::new();
    for rec in containers.list()? {
        let st = containers.state(&rec.id)?;
        let size = kiln_cache::temp::disk_usage(&containers.dir(&rec.id));
        ctrs.push((rec, st, size));
    }
    let running = |st: &kiln_containers::state::ContainerState| {
        matches!(st.status, Status::Running | Status::Restarting)
    };
    let c_size: u64 = ctrs.iter().map(|c| c.2).sum();
    let c_active = ctrs.iter().filter(|c| running(&c.1)).count();
    let c_reclaimable: u64 = ctrs.iter().filter(|c| !running(&c.1)).map(|c| c.2).sum();
    let vols: Vec<(String, usize, u64)> = volumes
        .list()?
        .into_iter()
        .map(|v| {
            let links = volume_users.get(&v.name).map_or(0, Vec::len);
            (v.name.clone(), links, kiln_cache::temp::disk_usage(&v.mountpoint))
        })
        .collect();
    let v_size: u64 = vols.iter().map(|v| v.2).sum();
    let v_active = vols.iter().filter(|v| v.1 > 0).count();
    let v_reclaimable: u64 = vols.iter().filter(|v| v.1 == 0).map(|v| v.2).sum();
    let cache = gc::build_cache(store, true)?;
    let b_size: u64 = cache.iter().map(|e| e.size).sum();
    let b_active = cache.iter().filter(|e| e.in_use).count();
    let b_reclaimable: u64 = cache.iter().filter(|e| !e.in_use).map(|e| e.size).sum();
    let mut out = io::stdout().lock();
    if !a.verbose {
        let table = vec![
            vec![
                "Images".into(),
                images.total.to_string(),
                images.active.to_string(),
                human_size4(images.size),
                format!(
                    "{}{}",
                    human_size4(images.reclaimable),
                    percent(images.reclaimable, images.size)
                ),
            ],
            vec![
                "Containers".into(),
                ctrs.len().to_string(),
                c_active.to_string(),
                human_size4(c_size),
                format!("{}{}", human_size4(c_reclaimable), percent(c_reclaimable, c_size)),
            ],
            vec![
                "Local Volumes".into(),
                vols.len().to_string(),
                v_active.to_string(),
                human_size4(v_size),
                format!("{}{}", human_size4(v_reclaimable), percent(v_reclaimable, v_size)),
            ],
            vec![
                "Build Cache".into(),
                cache.len().to_string(),
                b_active.to_string(),
                human_size4(b_size),
                human_size4(b_reclaimable),
            ],
        ];
        drop(out);
        return df_summary(table, a.format.as_deref());
    }
    if a.format.is_some() {
        anyhow::bail!("`system df --format` is not supported with --verbose");
    }
    writeln!(out, "Images space usage:\n")?;
    let mut table = vec![[
        "REPOSITORY",
        "TAG",
        "IMAGE ID",
        "CREATED",
        "SIZE",
        "SHARED SIZE",
        "UNIQUE SIZE",
        "CONTAINERS",
    ]
    .map(String::from)
    .to_vec()];
    for r in images.rows {
        table.push(vec![
            r.repo,
            r.tag,
            r.id,
            r.created,
            human_size(r.size),
            human_size(r.shared),
            human_size(r.size - r.shared),
            r.containers.to_string(),
        ]);
    }
    print_docker_table(&mut out, &table)?;
    writeln!(out, "\nContainers space usage:\n")?;
    let mut table = vec![[
        "CONTAINER ID",
        "IMAGE",
        "COMMAND",
        "LOCAL VOLUMES",
        "SIZE",
        "CREATED",
        "STATUS",
        "NAMES",
    ]
    .map(String::from)
    .to_vec()];
    for (rec, st, size) in &ctrs {
        let cmd = rec.args.join(" ");
        let cmd = if cmd.chars().count() > 20 {
            format!("{}…", cmd.chars().take(19).collect::<String>())
        } else {
            cmd
        };
        let local = kiln_containers::mounts::load(store.root(), &rec.id)
            .map(|m| m.iter().filter(|m| m.name.is_some()).count())
            .unwrap_or(0);
        table.push(vec![
            rec.short_id().to_string(),
            rec.image_name.clone(),
            format!("\"{cmd}\""),
            local.to_string(),
            human_size(*size),
            human_ago(Some(&rec.created)),
            crate::container_cmds::status_text(st),
            rec.name.clone(),
        ]);
    }
    print_docker_table(&mut out, &table)?;
    writeln!(out, "\nLocal Volumes space usage:\n")?;
    let mut table = vec![["VOLUME NAME", "LINKS", "SIZE"].map(String::from).to_vec()];
    for (name, links, size) in &vols {
        table.push(vec![name.clone(), links.to_string(), human_size(*size)]);
    }
    print_docker_table(&mut out, &table)?;
    writeln!(out, "\nBuild cache usage: {}\n", human_size4(b_size))?;
    let mut table = vec![[
        "CACHE ID",
        "CACHE TYPE",
        "SIZE",
        "CREATED",
        "LAST USED",
        "USAGE",
        "SHARED",
    ]
    .map(String::from)
    .to_vec()];
    let mut sorted = cache;
    // Docker sorts the build cache by last use, then creation, newest first.
    sorted.sort_by(|x, y| y.last_used.cmp(&x.last_used).then(y.created.cmp(&x.created)));
    for e in &sorted {
        table.push(vec![
            e.id.chars().take(12).collect(),
            e.record_type.to_string(),
            human_size(e.size),
            since(e.created),
            since(e.last_used),
            e.usage_count.to_string(),
            e.shared.to_string(),
        ]);
    }
    print_docker_table(&mut out, &table)?;
    Ok(ExitCode::SUCCESS)
}

/// The summary table of `system df`, through `--format` when one is given.
fn df_summary(table: Vec<Vec<String>>, format: Option<&str>) -> anyhow::Result<ExitCode> {
    let rows: Vec<_> = table
        .into_iter()
        .map(|r| {
            let mut r = r.into_iter();
            let mut next = || r.next().unwrap_or_default();
            crate::format::row(
                "*formatter.diskUsageImagesContext",
                vec![
                    ("Type", next()),
                    ("TotalCount", next()),
                    ("Active", next()),
                    ("Size", next()),
                    ("Reclaimable", next()),
                ],
            )
        })
        .collect();
    crate::format::Listing {
        format: format.unwrap_or(""),
        default_table: "table {{.Type}}\t{{.TotalCount}}\t{{.Active}}\t{{.Size}}\t{{.Reclaimable}}",
        headers: &[
            ("Type", "TYPE"),
            ("TotalCount", "TOTAL"),
            ("Active", "ACTIVE"),
            ("Size", "SIZE"),
            ("Reclaimable", "RECLAIMABLE"),
        ],
    }
    .print(&rows)
}

fn cmd_verify(store: &Store, a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let report = kiln_cache::verify::verify_waiting(store, a.repair, waiting)?;
    for line in &report.repaired {
        println!("repaired: {line}");
    }
    let (damage, leftovers): (Vec<_>, Vec<_>) = report.problems.iter().partition(|p| p.is_damage());
    for p in &damage {
        eprintln!("damaged: {p}");
    }
    for p in &leftovers {
        eprintln!("leftover: {p}");
    }
    if !report.checked_references {
        eprintln!("note: builds hold the store; unreferenced data was not looked for (use --repair to wait for them)");
    }
    let mut verdict = if damage.is_empty() {
        "ok".to_string()
    } else {
        format!("{} problems", damage.len())
    };
    if !leftovers.is_empty() {
        verdict.push_str(&format!(
            ", {} leftovers (removed by the next prune or `kiln store verify --repair`)",
            leftovers.len()
        ));
    }
    if a.repair {
        verdict.push_str(&format!(
            ", {} repairs freeing {}",
            report.repaired.len(),
            human_size4(report.freed)
        ));
    }
    println!(
        "checked {} blobs, {} images, {} tags, {} cache records, {} snapshots: {verdict}",
        report.blobs, report.images, report.tags, report.records, report.snapshots,
    );
    Ok(if damage.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_docker() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(1234), "1.23kB");
        assert_eq!(human_size(4_870_000), "4.87MB");
        assert_eq!(human_size(12_300_000), "12.3MB");
        assert_eq!(human_size(100_000_000), "100MB");
    }

    #[test]
    fn sizes_like_docker_units_human_size() {
        assert_eq!(human_size4(0), "0B");
        assert_eq!(human_size4(999), "999B");
        assert_eq!(human_size4(1234), "1.234kB");
        assert_eq!(human_size4(1_234_567), "1.235MB");
        assert_eq!(human_size4(12_300_000), "12.3MB");
        assert_eq!(human_size4(100_000_000), "100MB");
        assert_eq!(human_size4(3_400_000_000), "3.4GB");
    }

    #[test]
    fn tabbed_like_go_tabwriter() {
        let mut out = Vec::new();
        let lines = vec![
            "ID	RECLAIMABLE	SIZE	LAST ACCESSED".to_string(),
            format!("{:<40}	{:<5}	{:<10}	{}", "abc", "true", "1.5MB", "2 hours ago"),
        ];
        write_tabbed(&mut out, &lines).unwrap();
        let text = String::from_utf8(out).unwrap();
        let want = format!(
            "ID						RECLAIMABLE	SIZE		LAST ACCESSED
{:<40}	true 		1.5MB     	2 hours ago
",
            "abc"
        );
        assert_eq!(text, want);
        let mut out = Vec::new();
        write_tabbed(&mut out, &["Reclaimable:	1B".into(), "Total:	1B".into()]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Reclaimable:	1B
Total:		1B
"
        );
    }

    #[test]
    fn ellipsis_truncates() {
        assert_eq!(ellipsis("abc", 45), "abc");
        assert_eq!(ellipsis(&"x".repeat(50), 45).chars().count(), 45);
    }
}
