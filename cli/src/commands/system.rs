//! Disk usage and clean-up of the whole store, and the store itself: `system df|prune|info`,
//! `version`, `builder prune|du`, `store verify`, the automatic GC after a build. Flags and
//! output follow Docker's.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};
use kiln_cache::gc::{self, PruneOptions};
use kiln_cache::store::Store;
use kiln_cache::Digest;
use kiln_containers::{ContainerRecord, ContainerState, Containers, Status};

use super::images::{confirm, images_output, waiting};
use crate::format::{human_ago, human_size, human_size4, print_docker_table, since, write_tabbed};
use crate::Globals;

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

pub fn cmd_builder_prune(store: &Store, a: BuilderPruneArgs) -> anyhow::Result<ExitCode> {
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

pub fn cmd_builder_du(store: &Store, a: BuilderDuArgs) -> anyhow::Result<ExitCode> {
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

pub fn cmd_system_prune(store: &Store, a: SystemPruneArgs) -> anyhow::Result<ExitCode> {
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
    store.content().disk_usage(d)
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
        // A lazy layer blob keeps the blobs its recipe reads, a stacked layer's snapshot the
        // ones below it: the image's too, shared with any other image that has them.
        let blobs = img.blobs().into_iter().flat_map(|d| {
            let sources = store.content().recipe_sources(&d);
            std::iter::once(d).chain(sources)
        });
        for d in blobs {
            let k = format!("b{}", d.hex());
            part_size
                .entry(k.clone())
                .or_insert_with(|| disk_of_blob(store, &d));
            if !parts.contains(&k) {
                parts.push(k);
            }
        }
        for c in img
            .chain_ids()
            .into_iter()
            .flat_map(|c| std::iter::once(c).chain(snapshots.parents(&c)))
        {
            let k = format!("s{}", c.hex());
            part_size
                .entry(k.clone())
                .or_insert_with(|| snapshots.disk_usage(&c));
            if !parts.contains(&k) {
                parts.push(k);
            }
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

pub fn cmd_df(store: &Store, a: DfArgs) -> anyhow::Result<ExitCode> {
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
    df_verbose(&mut out, store, images, &ctrs, &vols, b_size, cache)
}

/// `system df -v`: a table for each kind of data.
fn df_verbose(
    out: &mut impl Write,
    store: &Store,
    images: ImageUsage,
    ctrs: &[(ContainerRecord, ContainerState, u64)],
    vols: &[(String, usize, u64)],
    b_size: u64,
    cache: Vec<gc::CacheEntry>,
) -> anyhow::Result<ExitCode> {
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
    print_docker_table(out, &table)?;
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
    for (rec, st, size) in ctrs {
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
            crate::format::status_text(st),
            rec.name.clone(),
        ]);
    }
    print_docker_table(out, &table)?;
    writeln!(out, "\nLocal Volumes space usage:\n")?;
    let mut table = vec![["VOLUME NAME", "LINKS", "SIZE"].map(String::from).to_vec()];
    for (name, links, size) in vols {
        table.push(vec![name.clone(), links.to_string(), human_size(*size)]);
    }
    print_docker_table(out, &table)?;
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
    print_docker_table(out, &table)?;
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

pub fn cmd_verify(store: &Store, a: VerifyArgs) -> anyhow::Result<ExitCode> {
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

pub fn cmd_version() -> anyhow::Result<ExitCode> {
    println!("Client:");
    println!(" Version:           {}", env!("CARGO_PKG_VERSION"));
    println!(" OS/Arch:           linux/{}", docker_arch());
    println!(" Daemon:            none (kiln is daemonless)");
    Ok(ExitCode::SUCCESS)
}

fn docker_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub fn cmd_info(containers: &Containers, g: &Globals) -> anyhow::Result<ExitCode> {
    let (mut running, mut stopped, mut total) = (0, 0, 0);
    for rec in containers.list()? {
        total += 1;
        match containers.state(&rec.id).map(|s| s.status) {
            Ok(Status::Running | Status::Restarting) => running += 1,
            _ => stopped += 1,
        }
    }
    let store = kiln_cache::Store::open(&g.root)?;
    let images = store.images().index().map(|i| i.images.len()).unwrap_or(0);
    let overlay = std::fs::read_to_string("/proc/filesystems")
        .map(|f| f.lines().any(|l| l.split_whitespace().last() == Some("overlay")))
        .unwrap_or(false);
    let cgroup = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "2"
    } else if Path::new("/sys/fs/cgroup").exists() {
        "1"
    } else {
        "none"
    };
    let userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("Containers: {total}");
    println!(" Running: {running}");
    println!(" Paused: 0");
    println!(" Stopped: {stopped}");
    println!("Images: {images}");
    println!("Storage Driver: overlay (supported: {})", yes_no(overlay));
    println!("Cgroup Version: {cgroup}");
    println!("User Namespaces: {}", yes_no(userns));
    println!("Kernel Version: {}", kernel.trim());
    println!("Architecture: {}", std::env::consts::ARCH);
    println!("Kiln Root Dir: {}", g.root.display());
    let scratch = g.root.join("tmp");
    let _ = std::fs::create_dir_all(&scratch);
    match kiln_runtime::snapshotter::choice() {
        Ok(c) => println!("Snapshotter: {}", c.reason),
        Err(e) => println!("Snapshotter: none: {e}"),
    }
    if kiln_runtime::userns::in_user_namespace() {
        println!(
            "Rootless: yes (uid 0 is host uid {})",
            kiln_runtime::userns::host_uid()
        );
        match kiln_runtime::net::usermode::find() {
            Ok((tool, path)) => println!("RUN Network: {} ({})", tool.name(), path.display()),
            Err(e) => println!("RUN Network: none: {e}"),
        }
    } else {
        println!("Rootless: no");
        println!("RUN Network: bridge {}", kiln_runtime::net::DEFAULT_BRIDGE);
    }
    let isolation = std::env::var("KILN_ISOLATION").unwrap_or_default();
    let isolation = match isolation.as_str() {
        "" => kiln_runtime::Isolation::Default,
        s => s.parse()?,
    };
    println!("Isolation: {}", isolation.name());
    let lost = kiln_runtime::isolation::chroot_losses(
        kiln_runtime::isolation::own_network(),
        kiln_runtime::isolation::own_pid_namespace(),
    );
    println!("Chroot Isolation Lacks: {}", lost.join("; "));
    Ok(ExitCode::SUCCESS)
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
