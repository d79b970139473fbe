//! COPY/ADD of one action: source selection (wildcards, `--parents`), destination rules, and
//! the tree copy itself (directories first, then files in parallel, then directory metadata).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, FileTimes, Metadata, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kiln_dag::CopyAction;
use kiln_patterns::Matcher;
use kiln_runtime::unixtime;
use rayon::prelude::*;
use rustix::fs::{FileType, Mode, CWD};

use super::chmod::ModeSpec;
use super::fsops::{lchown, mkdir_all, set_mode, set_times};
use super::link::Linking;
use super::meta::Meta;
use super::resolve::{self, Resolved};
use super::{owner, unpack, wildcard, FileOpError, FileOpOptions, SourceRoot};
use crate::context::{special_file, SpecialFile};

/// What one copy action applies to every entry it writes.
struct Config<'a> {
    dest_root: &'a Path,
    src: &'a SourceRoot,
    chown: Option<(u32, u32)>,
    mode: Option<ModeSpec>,
    exclude: Option<Matcher>,
    /// `COPY --parents`: only paths (relative to the copied directory) that match, or lie
    /// below a match, are copied; the directories above them are created like their sources.
    include: Option<Matcher>,
    timestamp: Option<SystemTime>,
    /// Keys (and links from donors) the files this action writes; only for an action that
    /// writes each destination path once (one source, no `--parents`).
    linking: Option<&'a Linking>,
}

impl Config<'_> {
    /// Whether the context filter hides the source-root-relative path `rel` (a directory
    /// below which something may be re-included stays visible).
    fn hidden(&self, rel: &str, is_dir: bool) -> Result<bool, FileOpError> {
        Ok(self.src.hides(rel)? && !(is_dir && self.src.may_show_below(rel)))
    }

    /// `(excluded, descend)` of an `--exclude` check on a path relative to the copied source.
    fn excluded(&self, rel: &str, is_dir: bool) -> Result<(bool, bool), FileOpError> {
        let Some(m) = &self.exclude else {
            return Ok((false, true));
        };
        let hit = m.matches(rel).map_err(|source| FileOpError::Pattern {
            path: rel.to_string(),
            source,
        })?;
        Ok((hit, !hit || (is_dir && m.may_reinclude_below(rel))))
    }

    /// The mode of a directory this copy creates for the destination (not one it copies):
    /// 0755, or `--chmod` applied to it, as BuildKit (fsutil since 2025) creates them.
    fn created_dir_mode(&self) -> u32 {
        match &self.mode {
            Some(spec) => spec.apply(0o040755, true),
            None => 0o755,
        }
    }

    fn owner_of(&self, meta: &Meta) -> (u32, u32) {
        match self.chown {
            Some(o) => o,
            None if self.src.normalize_owner => (0, 0),
            None => (meta.uid, meta.gid),
        }
    }
}

/// Runs one COPY/ADD action.
pub(super) fn copy_action(
    dest_root: &Path,
    src: &SourceRoot,
    action: &CopyAction,
    opts: &FileOpOptions,
) -> Result<(), FileOpError> {
    let chown = action
        .owner
        .as_ref()
        .map(|o| owner::resolve_owner(dest_root, o))
        .transpose()?;
    let mode = action.mode.as_ref().map(ModeSpec::parse).transpose()?;
    let exclude = if action.exclude.is_empty() {
        None
    } else {
        Some(
            Matcher::new(&action.exclude).map_err(|source| FileOpError::ExcludePatterns {
                patterns: action.exclude.clone(),
                source,
            })?,
        )
    };
    let mut cfg = Config {
        dest_root,
        src,
        chown,
        mode,
        exclude,
        include: None,
        timestamp: opts.timestamp,
        linking: None,
    };
    let dest_is_dir = action.dest_is_dir || resolve::names_dir(&action.dest);
    let dest = resolve::clean(&action.dest);

    if !action.create_dest_path {
        let p = resolve::in_root(dest_root, &dest, true, None)?.host;
        let parent = p.parent().unwrap_or(dest_root);
        fs::symlink_metadata(parent).map_err(|source| FileOpError::MissingDestParent {
            path: action.dest.clone(),
            source,
        })?;
    }
    if action.parents {
        return copy_parents(cfg, action, &dest, dest_is_dir);
    }
    let linking = opts
        .linking
        .as_deref()
        .filter(|l| l.source_input == action.source_input);

    let mut sources: Vec<String> = Vec::new();
    let (prefix, pattern) = wildcard::split(&action.src);
    if !action.allow_wildcard || pattern.is_empty() {
        sources.push(resolve::clean(&action.src));
    } else {
        let found = expand(&cfg, &prefix, &pattern, action.follow_symlinks)?;
        if found.is_empty() {
            if action.allow_empty_wildcard {
                return Ok(());
            }
            return Err(FileOpError::NoMatches {
                pattern: resolve::clean(&action.src),
            });
        }
        sources.extend(found);
    }
    if sources.len() == 1 {
        cfg.linking = linking;
    }
    let hidden = |rel: &str, is_dir: bool| cfg.hidden(rel, is_dir);

    for source in sources {
        let resolved = resolve::in_root(&src.path, &source, action.follow_symlinks, Some(&hidden))?;
        let meta = source_meta(&cfg, &resolved, &source)?;
        if action.attempt_unpack && meta.is_file() && unpack::is_archive(&resolved.host)? {
            let target = resolve::in_root(dest_root, &dest, true, None)?.host;
            mkdir_all(dest_root, &target, 0o755, chown, cfg.timestamp)?;
            // `--chown` owns the destination directories it creates, not the archive's members:
            // they keep the owners recorded in the archive, as the reference BuildKit (Docker
            // 20.10's, which recorded the difftests) does. BuildKit v0.23 began chowning members.
            unpack::unpack(&resolved.host, &target, cfg.timestamp)?;
            continue;
        }
        let ensure = if dest_is_dir {
            dest.clone()
        } else {
            resolve::parent_of(&dest)
        };
        let ensure = resolve::in_root(dest_root, &ensure, true, None)?.host;
        let ensured = mkdir_all(dest_root, &ensure, cfg.created_dir_mode(), chown, cfg.timestamp)?;
        let target = resolve::in_root(dest_root, &dest, true, None)?.host;
        let (target, created) = prepare_target(&cfg, &meta, &source, target, action.dir_contents_only)?;
        // Whether the copy's top directory is one this action just made (and so empty).
        let fresh = created || (ensured && target == ensure);
        copy_tree(&cfg, &resolved, &meta, &target, false, fresh)?;
    }
    Ok(())
}

/// The wildcard matches of `pattern` below `prefix`, as container paths, minus those an
/// `--exclude` pattern names (matched relative to the prefix).
fn expand(
    cfg: &Config<'_>,
    prefix: &str,
    pattern: &[String],
    follow: bool,
) -> Result<Vec<String>, FileOpError> {
    let hidden = |rel: &str, is_dir: bool| cfg.hidden(rel, is_dir);
    let base = resolve::in_root(&cfg.src.path, prefix, follow, Some(&hidden))?;
    match fs::symlink_metadata(&base.host) {
        Ok(m) if m.is_dir() && !cfg.hidden(&base.rel, true)? => {}
        Ok(m) if !m.is_dir() => return Ok(Vec::new()),
        Ok(_) => {
            return Err(FileOpError::SourceNotFound {
                path: prefix.to_string(),
            })
        }
        Err(e) if resolve::is_missing(&e) => {
            return Err(FileOpError::SourceNotFound {
                path: prefix.to_string(),
            })
        }
        Err(source) => {
            return Err(FileOpError::Stat {
                path: base.host,
                source,
            })
        }
    }
    let mut out = Vec::new();
    for m in wildcard::expand(&base, pattern, Some(&hidden))? {
        let below = m
            .rel
            .strip_prefix(&base.rel)
            .unwrap_or(&m.rel)
            .trim_start_matches('/');
        let is_dir = m.host.is_dir();
        if cfg.exclude.is_some() && cfg.excluded(below, is_dir)?.0 {
            continue;
        }
        out.push(format!("/{}", m.rel));
    }
    Ok(out)
}

/// `lstat` of a resolved source; a missing or filtered-out source is "not found".
fn source_meta(cfg: &Config<'_>, resolved: &Resolved, named: &str) -> Result<Metadata, FileOpError> {
    let meta = match fs::symlink_metadata(&resolved.host) {
        Ok(m) => m,
        Err(e) if resolve::is_missing(&e) => {
            return Err(FileOpError::SourceNotFound {
                path: resolve::clean(named),
            });
        }
        Err(source) => {
            return Err(FileOpError::Stat {
                path: resolved.host.clone(),
                source,
            })
        }
    };
    if cfg.hidden(&resolved.rel, meta.is_dir())? {
        return Err(FileOpError::SourceNotFound {
            path: resolve::clean(named),
        });
    }
    Ok(meta)
}

/// BuildKit's `prepareTargetDir`: where the source lands, creating the directories above it.
/// True with it when that is a directory this call created (so it is empty).
fn prepare_target(
    cfg: &Config<'_>,
    src_meta: &Metadata,
    src_path: &str,
    dest: PathBuf,
    contents_only: bool,
) -> Result<(PathBuf, bool), FileOpError> {
    let dest_meta = match fs::symlink_metadata(&dest) {
        Ok(m) => Some(m),
        Err(e) if resolve::is_missing(&e) => None,
        Err(source) => return Err(FileOpError::Stat { path: dest, source }),
    };
    let src_dir = src_meta.is_dir();
    let dest_dir = dest_meta.as_ref().is_some_and(Metadata::is_dir);
    let mut dest = dest;
    if (!contents_only && src_dir && dest_meta.is_some()) || (!src_dir && dest_dir) {
        dest.push(resolve::base_name(src_path));
    }
    // The root itself (`COPY . /`) has no parent inside the destination: it is its own.
    let parent = if (contents_only && src_dir && dest_meta.is_none()) || dest == cfg.dest_root {
        dest.clone()
    } else {
        dest.parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| cfg.dest_root.to_path_buf())
    };
    let fresh = mkdir_all(
        cfg.dest_root,
        &parent,
        cfg.created_dir_mode(),
        cfg.chown,
        cfg.timestamp,
    )? && parent == dest;
    Ok((dest, fresh))
}

/// `COPY --parents` as BuildKit runs it: the source is cut at its first `/./` into a pivot
/// directory and a pattern (no pivot: the root and the whole source). The pivot (which may hold
/// wildcards) is copied into the destination keeping only the paths the pattern selects, with
/// `.dockerignore` semantics (`*` within one name, `**` across any number of directories); the
/// directories leading to them are created like their sources. A source without wildcards must
/// exist; a pattern that selects nothing copies nothing.
fn copy_parents(
    mut cfg: Config<'_>,
    action: &CopyAction,
    dest: &str,
    dest_is_dir: bool,
) -> Result<(), FileOpError> {
    let (pivot_raw, pattern_raw) = match action.src.find("/./") {
        Some(i) => (&action.src[..i], &action.src[i + 3..]),
        None => ("/", action.src.as_str()),
    };
    let pivot = resolve::clean(&format!("/{pivot_raw}"));
    let pattern = resolve::clean(&format!("/{pattern_raw}"))
        .trim_start_matches('/')
        .to_string();
    let hidden = |rel: &str, is_dir: bool| cfg.hidden(rel, is_dir);
    if !wildcard::has_wildcards(&pivot) && !wildcard::has_wildcards(&pattern) {
        let required = resolve::clean(&format!("{pivot}/{pattern}"));
        let r = resolve::in_root(&cfg.src.path, &required, action.follow_symlinks, Some(&hidden))?;
        source_meta(&cfg, &r, &required)?;
    }
    let pivots: Vec<String> = {
        let (prefix, comps) = wildcard::split(&pivot);
        if comps.is_empty() || !action.allow_wildcard {
            vec![pivot.clone()]
        } else {
            expand(&cfg, &prefix, &comps, action.follow_symlinks)?
        }
    };
    if pivots.is_empty() && !action.allow_empty_wildcard {
        return Err(FileOpError::NoMatches { pattern: pivot });
    }
    if !pattern.is_empty() {
        cfg.include = Some(Matcher::new(std::slice::from_ref(&pattern)).map_err(|source| {
            FileOpError::ExcludePatterns {
                patterns: vec![pattern.clone()],
                source,
            }
        })?);
    }
    let ensure = if dest_is_dir {
        dest.to_string()
    } else {
        resolve::parent_of(dest)
    };
    let ensure = resolve::in_root(cfg.dest_root, &ensure, true, None)?.host;
    let mut ensured = mkdir_all(
        cfg.dest_root,
        &ensure,
        cfg.created_dir_mode(),
        cfg.chown,
        cfg.timestamp,
    )?;
    let hidden = |rel: &str, is_dir: bool| cfg.hidden(rel, is_dir);
    for p in pivots {
        let resolved = resolve::in_root(&cfg.src.path, &p, action.follow_symlinks, Some(&hidden))?;
        let meta = source_meta(&cfg, &resolved, &p)?;
        let target = resolve::in_root(cfg.dest_root, dest, true, None)?.host;
        let (target, created) = prepare_target(&cfg, &meta, &p, target, true)?;
        // Only the first pivot lands in a directory nothing was written to yet.
        let fresh = created || (ensured && target == ensure);
        ensured = false;
        copy_tree(&cfg, &resolved, &meta, &target, false, fresh)?;
    }
    Ok(())
}

fn join_rel(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}/{b}"),
    }
}

/// One entry of a planned tree copy. Paths are not kept: a node names itself and its parent,
/// and [`Plan::src`]/[`Plan::dst`] rebuild a path when it is written (a context of 500k files
/// is planned whole before the first is written).
struct Node {
    name: Box<OsStr>,
    meta: Meta,
    /// `None` for the copy's top (node 0).
    parent: Option<usize>,
    /// False for a directory excluded by a filter but walked because something below it may
    /// be included; it is created only when something is.
    included: bool,
    /// The earlier node this regular file is a hard link of, within this copy.
    link_to: Option<usize>,
    /// `meta` is the context scan's (see [`super::link::KnownContent::scanned`]): its `atime`
    /// is not the file's.
    scanned: bool,
}

/// A planned tree copy: node 0 is the copied entry itself, at `src` and to be written at `dst`;
/// every other node follows its parent.
struct Plan {
    src: PathBuf,
    dst: PathBuf,
    nodes: Vec<Node>,
}

impl Plan {
    fn path(&self, top: &Path, i: usize) -> PathBuf {
        let mut names = Vec::new();
        let mut at = i;
        while let Some(p) = self.nodes[at].parent {
            names.push(&*self.nodes[at].name);
            at = p;
        }
        let mut path = top.to_path_buf();
        for name in names.iter().rev() {
            path.push(name);
        }
        path
    }

    fn src(&self, i: usize) -> PathBuf {
        self.path(&self.src, i)
    }

    fn dst(&self, i: usize) -> PathBuf {
        self.path(&self.dst, i)
    }

    /// Node `i` with its paths, for writing it.
    fn item(&self, i: usize) -> Item {
        Item {
            src: self.src(i),
            dst: self.dst(i),
            meta: self.nodes[i].meta,
            scanned: self.nodes[i].scanned,
        }
    }
}

/// One entry about to be written: where from, where to, and the source's `lstat`.
struct Item {
    src: PathBuf,
    dst: PathBuf,
    meta: Meta,
    /// See [`Node::scanned`].
    scanned: bool,
}

/// Copies the entry `src` (already resolved, `meta` its `lstat`) to `target` with BuildKit's
/// rules: an existing directory is merged (its metadata replaced only when
/// `overwrite_metadata`), anything else is replaced, a file never replaces a directory.
fn copy_tree(
    cfg: &Config<'_>,
    src: &Resolved,
    meta: &Metadata,
    target: &Path,
    overwrite_metadata: bool,
    target_fresh: bool,
) -> Result<(), FileOpError> {
    // Below a directory this action created everything is new: a linking copy writes that
    // subtree straight into the overlay's upper dir, where it lands anyway, instead of going
    // through the overlay (see `link`: only a single-source action links).
    let target = match (cfg.linking, target_fresh) {
        (Some(l), true) => l.in_upper(target, cfg.dest_root),
        _ => target.to_path_buf(),
    };
    let mut plan = Plan {
        src: src.host.clone(),
        dst: target,
        nodes: vec![Node {
            name: OsStr::new("").into(),
            meta: Meta::from(meta),
            parent: None,
            included: true,
            link_to: None,
            scanned: false,
        }],
    };
    if plan.nodes[0].meta.is_dir() {
        subtree(cfg, &src.rel, &mut plan.nodes, 0, &plan.src, String::new(), 0)?;
        link_names(&mut plan.nodes);
    }
    let keep = prune(&plan.nodes);
    let nodes = &plan.nodes;

    // Directories, parents first. `fresh[i]`: created by this copy, so nothing is inside yet.
    let mut fresh = vec![false; nodes.len()];
    let mut info = vec![false; nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        if !keep[i] || !node.meta.is_dir() {
            continue;
        }
        let dst = plan.dst(i);
        let created = if node.parent.is_some_and(|p| fresh[p]) {
            fs::create_dir(&dst).map_err(|source| FileOpError::CreateDir { path: dst, source })?;
            true
        } else {
            create_dir_like(&dst, &node.meta, i > 0 || overwrite_metadata)?
        };
        fresh[i] = created || (i == 0 && target_fresh);
        info[i] = if i == 0 {
            created || overwrite_metadata
        } else {
            node.included || created
        };
    }

    // Files, symlinks and special files, in parallel; hard links after their first name.
    let parent_fresh = |n: &Node| n.parent.is_some_and(|p| fresh[p]);
    // Files other names in this copy will be hard links of: their inode gets those names'
    // metadata writes, so it is never one shared with a source layer.
    let leaders: std::collections::HashSet<usize> = nodes.iter().filter_map(|n| n.link_to).collect();
    nodes
        .par_iter()
        .enumerate()
        .filter(|(i, n)| keep[*i] && !n.meta.is_dir() && n.link_to.is_none())
        .try_for_each(|(i, n)| copy_entry(cfg, &plan.item(i), parent_fresh(n), leaders.contains(&i)))?;
    for (i, n) in nodes.iter().enumerate() {
        if let (true, Some(leader)) = (keep[i], n.link_to) {
            let dst = plan.dst(i);
            if !parent_fresh(n) {
                ensure_empty_file_target(&dst)?;
            }
            let target = plan.dst(leader);
            fs::hard_link(&target, &dst).map_err(|source| FileOpError::HardLink {
                path: dst.clone(),
                target,
                source,
            })?;
            apply_info(cfg, &n.meta, &dst)?;
        }
    }

    // Directory metadata last, children before parents, so their times stick.
    for (i, n) in nodes.iter().enumerate().rev() {
        if keep[i] && info[i] && n.meta.is_dir() {
            apply_info(cfg, &n.meta, &plan.dst(i))?;
        }
    }
    // An existing top directory keeps its owner and mode but takes the source's times
    // (BuildKit's `restoreFileTimestamp`).
    if nodes[0].meta.is_dir() && !info[0] {
        let (atime, mtime) = times_of(cfg, &nodes[0].meta);
        set_times(&plan.dst, atime, mtime)?;
    }
    Ok(())
}

/// Directory levels below a copied directory whose subdirectories are listed in parallel;
/// deeper ones are walked with an explicit stack, so a deep context never deepens recursion.
const PARALLEL_LEVELS: usize = 4;

/// Points each later name of a hard-linked file (`link_to`) at its first name in the plan.
fn link_names(nodes: &mut [Node]) {
    let mut inodes: HashMap<(u64, u64), usize> = HashMap::new();
    for (i, node) in nodes.iter_mut().enumerate().skip(1) {
        if node.meta.is_file() && node.meta.nlink > 1 {
            match inodes.entry((node.meta.dev, node.meta.ino)) {
                std::collections::hash_map::Entry::Occupied(leader) => node.link_to = Some(*leader.get()),
                std::collections::hash_map::Entry::Vacant(first) => {
                    first.insert(i);
                }
            }
        }
    }
}

/// Appends to `nodes` the nodes below its node `at`, the directory at `dir` (source-relative
/// `rel`), in name order and pre-order (a directory's entries, then each subdirectory's in
/// turn: every node follows its parent, and the first name of a hard-linked file comes first).
///
/// The first subdirectory's nodes go straight into `nodes` while the others are listed into
/// lists of their own at the same time, each appended and freed in turn: the plan is never
/// held twice (a context whose files sit under one directory would otherwise copy them all
/// from that directory's list into its parent's, doubling the plan's memory at 500k files).
fn subtree(
    cfg: &Config<'_>,
    root_rel: &str,
    nodes: &mut Vec<Node>,
    at: usize,
    dir: &Path,
    rel: String,
    depth: usize,
) -> Result<(), FileOpError> {
    if depth >= PARALLEL_LEVELS {
        let mut stack: Vec<(usize, String, PathBuf)> = vec![(at, rel, dir.to_path_buf())];
        while let Some((at, rel, path)) = stack.pop() {
            let subdirs = list_children(cfg, root_rel, nodes, at, &rel, &path)?;
            // Reversed so the stack pops them in name order.
            stack.extend(subdirs.into_iter().rev().map(|(i, rel)| {
                let sub = path.join(&*nodes[i].name);
                (i, rel, sub)
            }));
        }
        return Ok(());
    }
    let subdirs = list_children(cfg, root_rel, nodes, at, &rel, dir)?;
    let paths: Vec<PathBuf> = subdirs.iter().map(|(i, _)| dir.join(&*nodes[*i].name)).collect();
    let Some(((first, first_rel), rest)) = subdirs.split_first() else {
        return Ok(());
    };
    let (done, below) = rayon::join(
        || {
            subtree(
                cfg,
                root_rel,
                nodes,
                *first,
                &paths[0],
                first_rel.clone(),
                depth + 1,
            )
        },
        || {
            rest.par_iter()
                .zip(&paths[1..])
                .map(|((_, rel), path)| {
                    // Node 0 stands for the subdirectory itself (it is already in `nodes`).
                    let mut own = vec![Node {
                        name: OsStr::new("").into(),
                        meta: Meta::default(),
                        parent: None,
                        included: true,
                        link_to: None,
                        scanned: false,
                    }];
                    subtree(cfg, root_rel, &mut own, 0, path, rel.clone(), depth + 1).map(|()| own)
                })
                .collect::<Vec<Result<Vec<Node>, FileOpError>>>()
        },
    );
    done?;
    let mut below = below.into_iter().collect::<Result<Vec<_>, _>>()?;
    nodes.reserve_exact(below.iter().map(|b| b.len() - 1).sum());
    for ((at, _), sub) in rest.iter().zip(below.iter_mut()) {
        let base = nodes.len();
        nodes.extend(std::mem::take(sub).into_iter().skip(1).map(|mut n| {
            n.parent = n.parent.map(|p| if p == 0 { *at } else { p - 1 + base });
            n
        }));
    }
    Ok(())
}

/// Lists the directory `nodes[at]` (at `path`, source-relative `rel`) in name order, appending
/// the entries the copy takes; returns the subdirectories appended, with their relative paths.
fn list_children(
    cfg: &Config<'_>,
    root_rel: &str,
    nodes: &mut Vec<Node>,
    at: usize,
    rel: &str,
    path: &Path,
) -> Result<Vec<(usize, String)>, FileOpError> {
    let rd = fs::read_dir(path).map_err(|source| FileOpError::ReadDir {
        path: path.to_path_buf(),
        source,
    })?;
    let mut entries = Vec::new();
    for e in rd {
        let e = e.map_err(|source| FileOpError::ReadDir {
            path: path.to_path_buf(),
            source,
        })?;
        entries.push(e);
    }
    entries.sort_by_key(|e| e.file_name());
    let mut subdirs = Vec::new();
    for e in entries {
        let name = e.file_name();
        let name_str = name.to_string_lossy();
        let child_rel = if rel.is_empty() {
            name_str.to_string()
        } else {
            format!("{rel}/{name_str}")
        };
        let ctx_rel = join_rel(root_rel, &child_rel);
        // A regular file (by the directory entry's type) the context scan took the `lstat` of
        // a moment ago is not taken again: at 500k files that is a fifth of an edit's CPU.
        let scanned = match cfg.linking {
            Some(l) if e.file_type().is_ok_and(|t| t.is_file()) => l.scanned(&ctx_rel),
            _ => None,
        };
        let (meta, scanned) = match scanned {
            Some(meta) => (meta, true),
            None => {
                let meta = e.metadata().map_err(|source| FileOpError::Stat {
                    path: e.path(),
                    source,
                })?;
                (Meta::from(&meta), false)
            }
        };
        let is_dir = meta.is_dir();
        let mut included = true;
        if cfg.src.filter.is_some() && cfg.src.hides(&ctx_rel)? {
            if !(is_dir && cfg.src.may_show_below(&ctx_rel)) {
                continue;
            }
            included = false;
        }
        let (excluded, descend) = cfg.excluded(&child_rel, is_dir)?;
        if excluded {
            if !(is_dir && descend) {
                continue;
            }
            included = false;
        }
        if let Some(inc) = &cfg.include {
            // Selected: the path or a directory above it matches. A directory that is not is
            // still walked for matches below it, and created only if one is found.
            let selected = inc.matches(&child_rel).map_err(|source| FileOpError::Pattern {
                path: child_rel.clone(),
                source,
            })?;
            if !selected {
                if !is_dir {
                    continue;
                }
                included = false;
            }
        }
        let idx = nodes.len();
        nodes.push(Node {
            name: name.into_boxed_os_str(),
            meta,
            parent: Some(at),
            included,
            link_to: None,
            scanned,
        });
        if is_dir {
            subdirs.push((idx, child_rel));
        }
    }
    Ok(subdirs)
}

/// Which nodes to write: all included entries and every directory above one.
fn prune(nodes: &[Node]) -> Vec<bool> {
    let mut keep: Vec<bool> = nodes.iter().map(|n| n.included).collect();
    keep[0] = true;
    for i in (1..nodes.len()).rev() {
        if keep[i] {
            if let Some(p) = nodes[i].parent {
                keep[p] = true;
            }
        }
    }
    keep
}

/// BuildKit's `copyDirectoryOnly`: creates `dst` if missing (returns true), refuses a
/// non-directory, and on an existing directory copies the source's mode when `overwrite`.
fn create_dir_like(dst: &Path, meta: &Meta, overwrite: bool) -> Result<bool, FileOpError> {
    match fs::symlink_metadata(dst) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir(dst).map_err(|source| FileOpError::CreateDir {
                path: dst.to_path_buf(),
                source,
            })?;
            Ok(true)
        }
        Err(source) => Err(FileOpError::Stat {
            path: dst.to_path_buf(),
            source,
        }),
        Ok(m) if !m.is_dir() => Err(FileOpError::NotADirectory {
            path: dst.to_path_buf(),
        }),
        Ok(_) => {
            if overwrite {
                set_mode(dst, meta.mode & 0o7777)?;
            }
            Ok(false)
        }
    }
}

/// Removes what is at `dst` unless it is a directory (an error) or missing.
fn ensure_empty_file_target(dst: &Path) -> Result<(), FileOpError> {
    match fs::symlink_metadata(dst) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FileOpError::Stat {
            path: dst.to_path_buf(),
            source,
        }),
        Ok(m) if m.is_dir() => Err(FileOpError::ReplaceDirectory {
            path: dst.to_path_buf(),
        }),
        Ok(_) => fs::remove_file(dst).map_err(|source| FileOpError::Remove {
            path: dst.to_path_buf(),
            source,
        }),
    }
}

/// Writes one non-directory entry and its metadata.
fn copy_entry(cfg: &Config<'_>, n: &Item, parent_fresh: bool, leader: bool) -> Result<(), FileOpError> {
    if !parent_fresh {
        ensure_empty_file_target(&n.dst)?;
    }
    let ft = n.meta.file_type();
    if ft == FileType::RegularFile {
        return copy_file(cfg, n, parent_fresh, leader);
    }
    if ft == FileType::Symlink {
        let link = fs::read_link(&n.src).map_err(|source| FileOpError::ReadLink {
            path: n.src.clone(),
            source,
        })?;
        std::os::unix::fs::symlink(&link, &n.dst).map_err(|source| FileOpError::Symlink {
            path: n.dst.clone(),
            source,
        })?;
    } else if let Some(special) = cfg.src.is_build_context().then(|| special_file(ft)).flatten() {
        match special {
            SpecialFile::Skip => return Ok(()),
            SpecialFile::EmptyFile => {
                File::create_new(&n.dst).map_err(|source| FileOpError::Write {
                    path: n.dst.clone(),
                    source,
                })?;
            }
        }
    } else if matches!(
        ft,
        FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice | FileType::Socket
    ) {
        let perm = Mode::from_raw_mode(n.meta.mode & 0o7777);
        rustix::fs::mknodat(CWD, &n.dst, ft, perm, n.meta.rdev).map_err(|e| FileOpError::Mknod {
            path: n.dst.clone(),
            source: e.into(),
        })?;
    }
    apply_info(cfg, &n.meta, &n.dst)
}

/// Writes a regular file: a link to a donor's identical file when there is one (only into a
/// directory this copy created), else a copy. Keyed files are recorded for the result's index.
fn copy_file(cfg: &Config<'_>, n: &Item, parent_fresh: bool, leader: bool) -> Result<(), FileOpError> {
    // From an image's or a stage's layers: the very file, when the copy keeps its metadata.
    if let Some(l) = cfg.linking.filter(|l| l.reads_layers()) {
        let keeps_metadata =
            cfg.chown.is_none() && cfg.mode.is_none() && cfg.timestamp.is_none() && !cfg.src.normalize_owner;
        if parent_fresh && keeps_metadata && !leader {
            let rels = n
                .src
                .strip_prefix(&cfg.src.path)
                .ok()
                .and_then(|r| r.to_str())
                .zip(l.relative(&n.dst, cfg.dest_root));
            if let Some((src_rel, dst_rel)) = rels {
                if l.link_from_layers(src_rel, &n.meta, dst_rel) {
                    return Ok(());
                }
            }
        }
        return write_file(cfg, n).map(drop);
    }
    // A hard-linked source keeps its links within the copy (`link_to`); its first name is
    // written, never shared with a donor, so the later names' metadata writes touch only it.
    let keyed = match cfg.linking {
        Some(l) if parent_fresh && n.meta.nlink == 1 => n
            .src
            .strip_prefix(&cfg.src.path)
            .ok()
            .and_then(|r| r.to_str())
            .zip(l.relative(&n.dst, cfg.dest_root))
            .and_then(|(src_rel, dst_rel)| {
                let mtime = times_of(cfg, &n.meta).1;
                let key = l.key(
                    src_rel,
                    &n.meta,
                    target_mode(cfg, &n.meta),
                    cfg.owner_of(&n.meta),
                    unixtime::nanos(unixtime::split(mtime)),
                )?;
                Some((l, key, dst_rel))
            }),
        _ => None,
    };
    if let Some((l, key, rel)) = keyed {
        let donor = l.try_link(&key, rel);
        // A file written is recorded under its key only if it is still the file the key was
        // made from (a donor's file linked is: the key is the scan's, and so is its content).
        if donor.is_some() || write_file(cfg, n)? {
            l.record(rel, key, donor);
        }
        return Ok(());
    }
    write_file(cfg, n).map(drop)
}

/// Copies a regular file's content (`copy_file_range` where the kernel can) and sets its
/// owner, mode and times through the open descriptor. False when the source's `meta` was the
/// context scan's and the file opened is no longer the one the scan saw (changed since).
fn write_file(cfg: &Config<'_>, n: &Item) -> Result<bool, FileOpError> {
    let err = |source| FileOpError::CopyFile {
        from: n.src.clone(),
        to: n.dst.clone(),
        source,
    };
    let mut from = File::open(&n.src).map_err(err)?;
    // The scan keeps no atime: the file's own, from the descriptor the content comes from,
    // before reading it (as an `lstat` before the copy saw it).
    // A file changed since the scan is written as it is now, with its metadata now.
    let mut own_atime = None;
    let mut as_scanned = true;
    let mut meta = n.meta;
    if n.scanned {
        let now = from.metadata().map_err(|source| FileOpError::Stat {
            path: n.src.clone(),
            source,
        })?;
        let now = Meta::from(&now);
        as_scanned = (now.ino, now.size, now.mtime_ns(), now.ctime_ns())
            == (n.meta.ino, n.meta.size, n.meta.mtime_ns(), n.meta.ctime_ns());
        own_atime = cfg.timestamp.is_none().then(|| now.accessed());
        if !as_scanned {
            meta = now;
        }
    }
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&n.dst)
        .map_err(err)?;
    io::copy(&mut from, &mut to).map_err(err)?;
    let (uid, gid) = cfg.owner_of(&meta);
    std::os::unix::fs::fchown(&to, Some(uid), Some(gid)).map_err(|source| FileOpError::Chown {
        path: n.dst.clone(),
        uid,
        gid,
        source,
    })?;
    let mode = target_mode(cfg, &meta);
    to.set_permissions(Permissions::from_mode(mode))
        .map_err(|source| FileOpError::Chmod {
            path: n.dst.clone(),
            mode,
            source,
        })?;
    let (mut atime, mtime) = times_of(cfg, &meta);
    if let Some(own) = own_atime {
        atime = own;
    }
    to.set_times(FileTimes::new().set_accessed(atime).set_modified(mtime))
        .map_err(|source| FileOpError::Times {
            path: n.dst.clone(),
            source,
        })?;
    Ok(as_scanned)
}

fn target_mode(cfg: &Config<'_>, meta: &Meta) -> u32 {
    match &cfg.mode {
        Some(spec) => spec.apply(meta.mode, meta.is_dir()),
        None => meta.mode & 0o7777,
    }
}

fn times_of(cfg: &Config<'_>, meta: &Meta) -> (SystemTime, SystemTime) {
    match cfg.timestamp {
        Some(t) => (t, t),
        None => (meta.accessed(), meta.modified()),
    }
}

/// BuildKit's `copyFileInfo`: owner, mode (not on symlinks) and times of a written entry.
fn apply_info(cfg: &Config<'_>, meta: &Meta, path: &Path) -> Result<(), FileOpError> {
    let (uid, gid) = cfg.owner_of(meta);
    lchown(path, uid, gid)?;
    if !meta.is_symlink() {
        set_mode(path, target_mode(cfg, meta))?;
    }
    let (atime, mtime) = times_of(cfg, meta);
    set_times(path, atime, mtime)
}
