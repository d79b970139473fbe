//! Image commands: import, load, save, images, tag, rmi, history, image prune, and the JSON of
//! `inspect` for an image. Flags and output follow Docker's.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use kiln_cache::archive::import::{import_rootfs, ImportOptions};
use kiln_cache::archive::load::load;
use kiln_cache::archive::save::{save, Format, SaveItem};
use kiln_cache::gc::{self, PruneOptions};
use kiln_cache::image_index::Target;
use kiln_cache::images::{Image, ImageError, ImageStore};
use kiln_cache::reference::Reference;
use kiln_cache::store::Store;
use kiln_cache::Digest;

use crate::format::{ellipsis, human_ago, human_size, human_size4};

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

pub fn cmd_import(store: &Store, a: ImportArgs) -> anyhow::Result<ExitCode> {
    let reference = a.reference.as_deref().map(Reference::parse).transpose()?;
    let mut config = kiln_dag::image::ContainerConfig::default();
    for c in &a.change {
        super::container_fs::apply_change(&mut config, c)?;
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

pub fn cmd_load(store: &Store, a: LoadArgs) -> anyhow::Result<ExitCode> {
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

pub fn cmd_save(store: &Store, a: SaveArgs) -> anyhow::Result<ExitCode> {
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

pub fn cmd_images(store: &Store, a: ImagesArgs) -> anyhow::Result<ExitCode> {
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
                        crate::format::docker_time(img.config.created.as_deref().unwrap_or("")),
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

pub fn cmd_tag(store: &Store, a: TagArgs) -> anyhow::Result<ExitCode> {
    // A prune must not remove the image between its lookup and its new tag.
    let _hold = store.hold()?;
    let images = store.images();
    let m = images.resolve_digest(&a.source)?;
    let target = Reference::parse(&a.target)?;
    images.tag(&target, &m)?;
    Ok(ExitCode::SUCCESS)
}

pub fn cmd_rmi(store: &Store, a: RmiArgs) -> anyhow::Result<ExitCode> {
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

pub fn cmd_history(store: &Store, a: HistoryArgs) -> anyhow::Result<ExitCode> {
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

/// Asks `question` on stderr; true when the answer is yes.
pub(crate) fn confirm(question: &str) -> anyhow::Result<bool> {
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

pub(crate) fn waiting() {
    eprintln!("waiting for running builds to release the store...");
}

/// The "Deleted Images:" block of `image prune` and `system prune`.
pub(crate) fn images_output(report: &gc::PruneReport) -> String {
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

pub fn cmd_prune(store: &Store, a: PruneArgs) -> anyhow::Result<ExitCode> {
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
