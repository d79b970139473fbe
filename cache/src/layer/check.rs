//! Checking a layer tar without applying it: [`check`] reads the whole stream and fails exactly
//! where [`super::apply`] into an empty directory would fail on the archive's own content, so a
//! layer can be refused when it enters the store (`kiln load`, `kiln import`) rather than when a
//! container first unpacks it.
//!
//! It replays the entries against a model of the destination: a map from every path the layer
//! made (directories its entries' parents needed included) to what is there. The model holds
//! names only, so its memory grows with the number of entries, as the applier's own bookkeeping
//! does. What depends on the host and not on the archive is not modelled: privileges (it
//! assumes root, as unpacking does), disk space, and whether the filesystem takes an xattr
//! (names and values no kernel accepts are refused, though).

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read};

use super::entries::{clean_components, fail, join, join_child, lossy, Entries, Entry, Whiteout};
use super::error::ApplyError;
use super::tarfmt::Kind;
use super::{ApplyOptions, ApplyStats, WhiteoutMode};

/// What the model holds at a path. Non-directories carry an inode number so that two names of
/// one hard link are known to be the same file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Dir,
    Symlink(u64),
    Other(u64),
}

/// Why a walk through the model failed, with the component's index.
enum WalkFail {
    Symlink(usize),
    NotDir(usize),
    Missing(usize),
    /// A name no system call takes (a NUL byte in it).
    Invalid(usize),
}

/// Reads the layer tar from `reader` and fails where [`super::apply`] of it into an empty
/// directory, in `opts.whiteouts` mode and as root, would fail because of the archive: broken or
/// oversized headers, names or hard link targets that climb out, entries under a symlink or a
/// non-directory, hard links to files the layer does not hold, invalid whiteouts. Nothing is
/// written. The statistics are those `apply` returns (the diff ID covers the whole stream).
pub fn check<R: Read>(reader: R, opts: &ApplyOptions) -> Result<ApplyStats, ApplyError> {
    let (diff_id, size, entries) = run(reader, opts, true)?;
    Ok(ApplyStats {
        // Always hashed here.
        diff_id: diff_id.unwrap_or(kiln_dag::Digest([0; 32])),
        size,
        entries,
    })
}

/// [`check`] without hashing the stream, for a caller that knows its digest already (an
/// uncompressed layer's blob digest is its diff ID); returns the number of entries.
pub fn check_unhashed<R: Read>(reader: R, opts: &ApplyOptions) -> Result<u64, ApplyError> {
    run(reader, opts, false).map(|(_, _, entries)| entries)
}

fn run<R: Read>(
    reader: R,
    opts: &ApplyOptions,
    hash: bool,
) -> Result<(Option<kiln_dag::Digest>, u64, u64), ApplyError> {
    let mut checker = Checker {
        archive: &opts.archive_name,
        whiteouts: opts.whiteouts,
        input: Entries::new(reader, &opts.archive_name, opts.max_header_size, hash),
        nodes: BTreeMap::new(),
        written: HashSet::new(),
        next_ino: 0,
    };
    while let Some((entry, label)) = checker.input.next_entry()? {
        checker.entry(entry, &label)?;
    }
    let entries = checker.input.count;
    let (diff_id, size) = checker.input.finish()?;
    Ok((diff_id, size, entries))
}

struct Checker<'a, R: Read> {
    archive: &'a str,
    whiteouts: WhiteoutMode,
    input: Entries<'a, R>,
    /// Every path of the destination, relative, `/`-separated (the root is implicit).
    nodes: BTreeMap<Vec<u8>, Node>,
    /// Paths the layer wrote (Delete mode), as the applier records them.
    written: HashSet<Vec<u8>>,
    next_ino: u64,
}

/// Whether `name` can be one component of a path: no NUL (no system call takes it) and at
/// most NAME_MAX (255) bytes.
fn valid_name(name: &[u8]) -> bool {
    name.len() <= 255 && !name.contains(&0)
}

/// Whether symlink(2) takes `target`: not empty (ENOENT), no NUL, shorter than PATH_MAX.
fn valid_link(target: &[u8]) -> bool {
    !target.is_empty() && target.len() < 4096 && !target.contains(&0)
}

impl<R: Read> Checker<'_, R> {
    fn ino(&mut self) -> u64 {
        self.next_ino += 1;
        self.next_ino
    }

    /// Removes `path` and everything below it from the model.
    fn remove_tree(&mut self, path: &[u8]) {
        if self.nodes.remove(path) != Some(Node::Dir) {
            return;
        }
        let mut below = path.to_vec();
        below.push(b'/');
        let doomed: Vec<Vec<u8>> = self
            .nodes
            .range(below.clone()..)
            .take_while(|(k, _)| k.starts_with(&below))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.nodes.remove(&k);
        }
    }

    /// The model's `walk`: the directory `comps` without following symlinks, creating missing
    /// directories when `create`.
    fn walk(&mut self, comps: &[&[u8]], create: bool) -> Result<(), WalkFail> {
        for i in 0..comps.len() {
            if !valid_name(comps[i]) {
                return Err(WalkFail::Invalid(i));
            }
            let path = join(&comps[..=i]);
            match self.nodes.get(&path) {
                Some(Node::Dir) => {}
                Some(Node::Symlink(_)) => return Err(WalkFail::Symlink(i)),
                Some(Node::Other(_)) => return Err(WalkFail::NotDir(i)),
                None if create => {
                    self.nodes.insert(path, Node::Dir);
                }
                None => return Err(WalkFail::Missing(i)),
            }
        }
        Ok(())
    }

    fn walk_error(&self, fail: WalkFail, comps: &[&[u8]], label: &str) -> ApplyError {
        let ctx = (self.archive, label);
        let upto = |i: usize| lossy(&join(&comps[..=i.min(comps.len().saturating_sub(1))]));
        match fail {
            WalkFail::Symlink(i) => fail!(CrossesSymlink, ctx, component: upto(i)),
            WalkFail::NotDir(i) => fail!(ParentNotDirectory, ctx, component: upto(i)),
            WalkFail::Missing(i) => fail!(
                OpenParent,
                ctx,
                component: upto(i),
                source: io::Error::from(io::ErrorKind::NotFound)
            ),
            WalkFail::Invalid(i) => fail!(
                OpenParent,
                ctx,
                component: upto(i),
                source: io::Error::from(io::ErrorKind::InvalidInput)
            ),
        }
    }

    fn parent(&mut self, comps: &[&[u8]], label: &str) -> Result<(), ApplyError> {
        self.walk(comps, true)
            .map_err(|f| self.walk_error(f, comps, label))?;
        if self.whiteouts == WhiteoutMode::Delete {
            for i in 1..=comps.len() {
                self.written.insert(join(&comps[..i]));
            }
        }
        Ok(())
    }

    fn entry(&mut self, e: Entry, label: &str) -> Result<(), ApplyError> {
        let comps = clean_components(&e.path).ok_or_else(|| fail!(DotDot, (self.archive, label)))?;
        let Some((&name, parents)) = comps.split_last() else {
            if e.kind != Kind::Dir {
                return Err(fail!(RootNotDirectory, (self.archive, label)));
            }
            self.xattrs(&e, label)?;
            return self.input.pump(e.all_data(), None, label);
        };
        if let Some(target) = name.strip_prefix(b".wh.") {
            self.whiteout(parents, target, label)?;
            return self.input.pump(e.all_data(), None, label);
        }
        self.parent(parents, label)?;
        self.create(name, &e, label, &comps)?;
        if self.whiteouts == WhiteoutMode::Delete {
            self.written.insert(join(&comps));
        }
        self.input.pump(e.skipped_data(), None, label)
    }

    fn create(&mut self, name: &[u8], e: &Entry, label: &str, comps: &[&[u8]]) -> Result<(), ApplyError> {
        let ctx = (self.archive, label);
        if !valid_name(name) {
            return Err(fail!(Create, ctx, source: io::ErrorKind::InvalidInput.into()));
        }
        let path = join(comps);
        let existing = self.nodes.get(&path).copied();
        match e.kind {
            Kind::Dir => {
                if existing != Some(Node::Dir) {
                    self.remove_tree(&path);
                    self.nodes.insert(path, Node::Dir);
                }
            }
            Kind::Hardlink => return self.hardlink(path, e, label),
            Kind::Symlink => {
                if !valid_link(&e.link) {
                    return Err(fail!(Create, ctx, source: io::ErrorKind::InvalidInput.into()));
                }
                self.remove_tree(&path);
                let ino = self.ino();
                self.nodes.insert(path, Node::Symlink(ino));
            }
            Kind::Regular | Kind::Char | Kind::Block | Kind::Fifo => {
                self.remove_tree(&path);
                if e.kind == Kind::Regular {
                    self.input.pump(e.size, None, label)?;
                }
                let ino = self.ino();
                self.nodes.insert(path, Node::Other(ino));
            }
        }
        self.xattrs(e, label)
    }

    /// Refuses the xattrs no kernel takes: an empty name, a NUL in it, a name over 255 bytes
    /// (ERANGE) or a value over 64 KiB (E2BIG). overlayfs' own are dropped, as the applier drops
    /// them.
    fn xattrs(&self, e: &Entry, label: &str) -> Result<(), ApplyError> {
        let ctx = (self.archive, label);
        for (key, value) in &e.xattrs {
            if super::overlay_xattr_key(key).is_some() {
                continue;
            }
            let errno = if key.is_empty() || !valid_name(key) {
                rustix::io::Errno::INVAL
            } else if key.len() > 255 {
                rustix::io::Errno::RANGE
            } else if value.len() > 65536 {
                rustix::io::Errno::TOOBIG
            } else {
                continue;
            };
            return Err(fail!(SetXattr, ctx, name: lossy(key), source: errno.into()));
        }
        Ok(())
    }

    fn hardlink(&mut self, path: Vec<u8>, e: &Entry, label: &str) -> Result<(), ApplyError> {
        let ctx = (self.archive, label);
        let escapes = || fail!(LinkEscapes, ctx, target: lossy(&e.link));
        let missing = || fail!(LinkTargetMissing, ctx, target: lossy(&e.link));
        let comps = clean_components(&e.link).ok_or_else(escapes)?;
        let Some((&target, target_parents)) = comps.split_last() else {
            return Err(escapes());
        };
        self.walk(target_parents, false).map_err(|f| match f {
            WalkFail::Symlink(_) => escapes(),
            _ => missing(),
        })?;
        if !valid_name(target) {
            return Err(fail!(Create, ctx, source: io::ErrorKind::InvalidInput.into()));
        }
        // link(2): the target is looked up first, then the new name (EEXIST), and a directory
        // target is refused last; the applier takes EEXIST on the very same file as done and
        // otherwise removes the old entry and links once more.
        let target_path = join(&comps);
        let Some(node) = self.nodes.get(&target_path).copied() else {
            return Err(missing());
        };
        if let Some(existing) = self.nodes.get(&path).copied() {
            if path == target_path || (existing == node && node != Node::Dir) {
                return Ok(());
            }
            self.remove_tree(&path);
            // Removing the old entry may have removed the target (it was below it).
            if !self.nodes.contains_key(&target_path) {
                return Err(missing());
            }
        }
        if node == Node::Dir {
            return Err(fail!(Create, ctx, source: io::Error::from(rustix::io::Errno::PERM)));
        }
        self.nodes.insert(path, node);
        Ok(())
    }

    fn whiteout(&mut self, parents: &[&[u8]], target: &[u8], label: &str) -> Result<(), ApplyError> {
        let ctx = (self.archive, label);
        let target = match Whiteout::of(target, ctx)? {
            // Overlay: an xattr on the parent. Delete: the parent's children this layer did not
            // write go, and in an empty destination it wrote all of them.
            Whiteout::Opaque => return self.parent(parents, label),
            Whiteout::Aufs => return Ok(()),
            Whiteout::Remove(target) => target,
        };
        let rel = join_child(parents, target);
        match self.whiteouts {
            WhiteoutMode::Overlay => {
                self.parent(parents, label)?;
                let path = rel;
                if !self.nodes.contains_key(&path) {
                    if !valid_name(target) {
                        return Err(fail!(Create, ctx, source: io::ErrorKind::InvalidInput.into()));
                    }
                    let ino = self.ino();
                    self.nodes.insert(path, Node::Other(ino));
                }
                Ok(())
            }
            WhiteoutMode::Delete => {
                if self.written.contains(&rel) {
                    return Ok(());
                }
                match self.walk(parents, false) {
                    Ok(()) => {}
                    Err(WalkFail::Missing(_)) => return Ok(()),
                    Err(f) => return Err(self.walk_error(f, parents, label)),
                }
                if !valid_name(target) {
                    return Err(fail!(InvalidWhiteout, ctx));
                }
                self.remove_tree(&rel);
                Ok(())
            }
        }
    }
}
