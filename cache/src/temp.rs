//! Temporary files and directories with an owner that can be checked, and their removal once
//! the owner is gone.
//!
//! Every temp kiln creates in the store (`ingest/*.tmp`, `snapshots/tmp/*`, `tmp/*`, the
//! temps of `images.json` and of build cache records) and the temp file beside a `save -o`
//! destination is named after its owner: `PID-START-N`, the process ID, the process's start time
//! (clock ticks since boot, field 22 of `/proc/PID/stat`, so a reused PID does not pass for the
//! owner) and a per-process counter. While it lives, the owner also holds an `flock` on it (on
//! the file, or on the directory), which works across PID namespaces too.
//!
//! A temp is stale when its owner process is gone **and** nobody holds its lock. The first
//! command that opens a store ([`crate::Store::open`]) removes the stale temps it finds with a
//! few directory reads ([`clean_stale`]): a killed build, load, pull, commit or save leaves
//! nothing behind past the next command. Temps of other code that carry no owner (plain
//! `tempfile` names under `ROOT/tmp/`, made by builds that hold the store) are removed only when
//! nothing holds the store.
//!
//! A stale entry is first claimed by renaming it to `.trash-OWNER-N` of the remover, so two
//! cleaners never remove the same tree and a cleaner killed halfway leaves a temp of its own.
//!
//! Architecture Invariant: a temp is removed only when its owner (pid + start time) is gone and
//! its lock is free, or, for a temp without an owner, when no process holds the store.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::store::{Store, StoreError};

/// The process that owns a temp: its PID and its start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The process ID.
    pub pid: u32,
    /// The start time, in clock ticks after boot (`/proc/PID/stat` field 22).
    pub start: u64,
}

/// The start time of process `pid`, if it exists.
fn start_time(pid: &str) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Owner {
    /// This process.
    pub fn current() -> Owner {
        static ME: OnceLock<Owner> = OnceLock::new();
        *ME.get_or_init(|| Owner {
            pid: std::process::id(),
            start: start_time("self").unwrap_or(0),
        })
    }

    /// `PID-START`, the start of every name this process gives a temp.
    pub fn token(&self) -> String {
        format!("{}-{}", self.pid, self.start)
    }

    /// Whether the process still runs (the same process, not another with its PID).
    pub fn alive(&self) -> bool {
        start_time(&self.pid.to_string()) == Some(self.start)
    }

    /// The owner named at the start of `name` (`PID-START-...`).
    pub fn parse(name: &str) -> Option<Owner> {
        let mut parts = name.splitn(3, '-');
        let pid = parts.next()?;
        let start = parts.next()?;
        parts.next()?;
        if pid.is_empty() || start.is_empty() {
            return None;
        }
        Some(Owner {
            pid: pid.parse().ok()?,
            start: start.parse().ok()?,
        })
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new name for a temp of this process: `{prefix}PID-START-N{suffix}`.
pub fn name(prefix: &str, suffix: &str) -> String {
    format!(
        "{prefix}{}-{}{suffix}",
        Owner::current().token(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The prefix for a temp made by code that picks its own random name (`tempfile::Builder`):
/// `PID-START-N-{what}` makes it a temp of this process.
pub fn prefix(what: &str) -> String {
    name("", &format!("-{what}"))
}

/// Prefixes of names that a temp's name may carry before its owner.
const PREFIXES: [&str; 4] = [".trash-", ".new-", ".rm-", "."];

/// The owner of a temp named `name` (`[.trash-|.new-|.rm-|.]PID-START-...`, also
/// `images.json.PID-START-N.tmp` and `.NAME.kiln-PID-START-N.tmp`).
pub fn owner_of(name: &str) -> Option<Owner> {
    if let Some(o) = Owner::parse(name) {
        return Some(o);
    }
    for p in PREFIXES {
        if let Some(o) = name.strip_prefix(p).and_then(Owner::parse) {
            return Some(o);
        }
    }
    if let Some(rest) = name.strip_prefix("images.json.") {
        return Owner::parse(rest);
    }
    // A `save -o` temp: `.NAME.kiln-PID-START-N.tmp`.
    let (_, rest) = name.rsplit_once(".kiln-")?;
    Owner::parse(rest)
}

/// Whether somebody holds an `flock` on `path` (a file or a directory). A path that cannot be
/// opened is not held.
pub fn locked(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    matches!(f.try_lock(), Err(TryLockError::WouldBlock))
}

/// What [`classify`] makes of a temp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Its owner runs, or somebody holds its lock.
    Live,
    /// Its owner is gone and nobody holds it.
    Stale,
    /// It names no owner: stale only if no process holds the store.
    Unowned,
}

/// Classifies the temp at `path` (whose file name is `name`).
pub fn classify(path: &Path, name: &str) -> State {
    match owner_of(name) {
        Some(o) if o.alive() => State::Live,
        Some(_) if locked(path) => State::Live,
        Some(_) => State::Stale,
        None if locked(path) => State::Live,
        None => State::Unowned,
    }
}

/// Bytes a tree takes on disk: every inode's allocated blocks, a file with several links counted
/// in equal shares per link (so the shares of a file linked into several snapshots add up to
/// its size once).
pub fn disk_usage(path: &Path) -> u64 {
    fn walk(path: &Path, meta: &fs::Metadata) -> u64 {
        let own = meta.blocks() * 512;
        if meta.is_dir() {
            let children: u64 = fs::read_dir(path)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| match e.metadata() {
                            Ok(m) => walk(&e.path(), &m),
                            Err(_) => 0,
                        })
                        .sum()
                })
                .unwrap_or(0);
            own + children
        } else {
            own / meta.nlink().max(1)
        }
    }
    match fs::symlink_metadata(path) {
        Ok(m) => walk(path, &m),
        Err(_) => 0,
    }
}

/// Removes a file or a whole tree (read-only directories included).
pub fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => crate::layer::remove_tree(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// What [`clean_stale`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// The temps removed (their paths before they were claimed).
    pub paths: Vec<PathBuf>,
    /// Bytes they took on disk.
    pub bytes: u64,
}

impl Cleaned {
    fn add(&mut self, other: Cleaned) {
        self.paths.extend(other.paths);
        self.bytes += other.bytes;
    }
}

/// A stale temp found by [`find_stale`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleTemp {
    /// Where it is.
    pub path: PathBuf,
    /// Bytes it takes on disk.
    pub bytes: u64,
    /// Whether it is stale only because nothing holds the store (it names no owner).
    pub unowned: bool,
}

/// When a temp that names no owner (and is not locked) counts as stale, per directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unowned {
    /// Only when nothing holds the store (other code's `tempfile` names).
    WhenIdle,
    /// Always: every live temp there is locked by its owner.
    Always,
    /// Never: only the patterns of [`never_dir_temp`] are temps there.
    Never,
}

/// The directories temps live in, and whether each is looked at by the cheap scan every
/// command makes (the others hold many records and only small temps: GC and verify scan them).
fn temp_dirs(root: &Path) -> [(PathBuf, Unowned, bool); 8] {
    let cache = root.join("cache");
    [
        (root.join("ingest"), Unowned::WhenIdle, true),
        (root.join("tmp"), Unowned::WhenIdle, true),
        (root.join("snapshots").join("tmp"), Unowned::Always, true),
        (cache.join("index").join(".tmp"), Unowned::WhenIdle, true),
        // Beside what they replace: only names with an owner are temps there.
        (cache.join("mounts"), Unowned::Never, true),
        (cache.join("context"), Unowned::Never, false),
        (cache.join("lineage"), Unowned::Never, false),
        (root.to_path_buf(), Unowned::Never, true),
    ]
}

/// Whether an entry of a directory with [`Unowned::Never`] is a temp (the rest is the store's
/// layout, or records).
fn never_dir_temp(name: &str) -> bool {
    name.starts_with("images.json.") && name.ends_with(".tmp")
        || name.starts_with(".trash-")
        || name.contains(".kiln-")
}

/// Lists the stale temps of the store. Temps without an owner are listed only when
/// `store_idle` (the caller holds the garbage-collection lock, or knows nothing holds the store).
/// `thorough` also looks in the directories of many small records (context stat caches,
/// lineage), where temps are small.
pub fn find_stale(root: &Path, store_idle: bool, thorough: bool) -> Vec<StaleTemp> {
    scan(root, store_idle, thorough).0
}

/// [`find_stale`], and whether it saw a temp without an owner that it did not list because the
/// store was not known to be idle.
fn scan(root: &Path, store_idle: bool, thorough: bool) -> (Vec<StaleTemp>, bool) {
    let mut out = Vec::new();
    let mut unowned_seen = false;
    for (dir, policy, cheap) in temp_dirs(root) {
        if !cheap && !thorough {
            continue;
        }
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if policy == Unowned::Never && !never_dir_temp(name) {
                continue;
            }
            if name == "outside" && dir == root.join("tmp") {
                continue;
            }
            let path = entry.path();
            let state = classify(&path, name);
            let unowned = match (state, policy) {
                (State::Live, _) => continue,
                (State::Stale, _) | (State::Unowned, Unowned::Always) => false,
                (State::Unowned, Unowned::WhenIdle) if store_idle => true,
                (State::Unowned, Unowned::WhenIdle) => {
                    unowned_seen = true;
                    continue;
                }
                (State::Unowned, _) => continue,
            };
            out.push(StaleTemp {
                bytes: disk_usage(&path),
                path,
                unowned,
            });
        }
    }
    (out, unowned_seen)
}

/// Removes the stale temps of the store at `root` (see the module docs), and the files beside
/// `save -o` destinations that killed saves left. When `store_idle` is false, temps without an
/// owner are removed only if the garbage-collection lock can be taken right now; and only the
/// cheap scan runs (see [`find_stale`]).
pub fn clean_stale(store: &Store, store_idle: bool) -> Cleaned {
    let root = store.root();
    let mut cleaned = Cleaned::default();
    let (mut stale, unowned_seen) = scan(root, store_idle, store_idle);
    if unowned_seen {
        if let Ok(_gc) = store.gc_lock(false, || {}) {
            // Nothing holds the store: every unowned temp is a leftover. The list is taken under
            // the lock; the removal may follow it.
            stale = find_stale(root, true, false);
        }
    }
    for t in stale {
        if remove_claimed(&t.path) {
            cleaned.paths.push(t.path);
            cleaned.bytes += t.bytes;
        }
    }
    cleaned.add(clean_outside(store));
    cleaned
}

/// Claims `path` by renaming it to a `.trash-` name of this process, then removes it. Returns
/// whether this call removed it.
fn remove_claimed(path: &Path) -> bool {
    let Some(dir) = path.parent() else { return false };
    let claimed = dir.join(name(".trash-", ""));
    #[allow(
        clippy::disallowed_methods,
        reason = "claiming a stale temp: the rename is the claim, failing it means someone else won"
    )]
    if fs::rename(path, &claimed).is_err() {
        // Somebody else claimed it (or it went away).
        return false;
    }
    match remove_any(&claimed) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(path = %claimed.display(), error = %e, "failed to remove a stale temp");
            false
        }
    }
}

impl Store {
    /// Opens the store at `root`, creating its layout when missing, and removes the temps that
    /// killed kiln processes left (once per process; see the module docs).
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let store = Store::open_as_is(root)?;
        // What killed kiln processes left behind goes at the next command.
        clean_stale_once(&store);
        Ok(store)
    }
}

/// Runs [`clean_stale`] once per process and store root; failures only log.
fn clean_stale_once(store: &Store) {
    static DONE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    {
        let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
        if done.iter().any(|p| p == store.root()) {
            return;
        }
        done.push(store.root().to_path_buf());
    }
    let cleaned = clean_stale(store, false);
    if !cleaned.paths.is_empty() {
        tracing::debug!(
            count = cleaned.paths.len(),
            bytes = cleaned.bytes,
            "removed temps of killed kiln processes"
        );
    }
}

/// A temp file outside the store (beside a `save -o` destination), registered in
/// `ROOT/tmp/outside/PID-START-N` so that the next command removes it should this process die.
/// The file is created (exclusively, and locked), written by the caller, then
/// [`OutsideTemp::persist`] renames it into place; dropped without that, it is removed.
#[derive(Debug)]
pub struct OutsideTemp {
    path: PathBuf,
    file: File,
    record: PathBuf,
    persisted: bool,
}

/// The directory registering temps outside the store.
fn outside_dir(root: &Path) -> PathBuf {
    root.join("tmp").join("outside")
}

impl OutsideTemp {
    /// Creates `DIR/.NAME.kiln-PID-START-N.tmp` beside `dest` (which names `DIR/NAME`).
    pub fn create(store: &Store, dest: &Path) -> Result<OutsideTemp, StoreError> {
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = dir.join(name(&format!(".{base}.kiln-"), ".tmp"));
        let path = std::path::absolute(&path).unwrap_or(path);
        let reg = outside_dir(store.root());
        fs::create_dir_all(&reg).map_err(|source| StoreError::CreateDir {
            path: reg.clone(),
            source,
        })?;
        let record = reg.join(name("", ""));
        #[allow(
            clippy::disallowed_methods,
            reason = "a registration named after its owner; a torn one names no file of that owner"
        )]
        fs::write(&record, path.as_os_str().as_encoded_bytes()).map_err(|source| StoreError::Temp {
            path: record.clone(),
            source,
        })?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|f| f.try_lock().map(|()| f).map_err(io::Error::from));
        match file {
            Ok(file) => Ok(OutsideTemp {
                path,
                file,
                record,
                persisted: false,
            }),
            Err(source) => {
                let _ = fs::remove_file(&record);
                Err(StoreError::Temp { path, source })
            }
        }
    }

    /// The temp file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open temp file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Syncs the file and renames it to `dest`.
    pub fn persist(mut self, dest: &Path) -> io::Result<()> {
        self.file.sync_all()?;
        #[allow(
            clippy::disallowed_methods,
            reason = "the caller's own temp, synced above, renamed over the destination it was made beside"
        )]
        fs::rename(&self.path, dest)?;
        self.persisted = true;
        let _ = fs::remove_file(&self.record);
        Ok(())
    }
}

impl Drop for OutsideTemp {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
            let _ = fs::remove_file(&self.record);
        }
    }
}

/// Removes the temps outside the store that dead processes registered (see [`OutsideTemp`]).
/// A registered path is removed only if its file name is a temp of that very owner.
fn clean_outside(store: &Store) -> Cleaned {
    let mut cleaned = Cleaned::default();
    let Ok(rd) = fs::read_dir(outside_dir(store.root())) else {
        return cleaned;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(Owner::parse) else {
            continue;
        };
        if owner.alive() {
            continue;
        }
        let Ok(bytes) = fs::read(entry.path()) else {
            continue;
        };
        let target = PathBuf::from(String::from_utf8_lossy(&bytes).into_owned());
        let ours = target
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(owner_of)
            .is_some_and(|o| o == owner);
        if ours && !locked(&target) {
            if let Ok(m) = fs::symlink_metadata(&target) {
                if m.is_file() && fs::remove_file(&target).is_ok() {
                    cleaned.bytes += m.blocks() * 512;
                    cleaned.paths.push(target);
                }
            }
        }
        let _ = fs::remove_file(entry.path());
    }
    cleaned
}

/// A scratch directory `ROOT/tmp/PID-START-N-{what}` of this process, locked while it lives and
/// removed on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    _lock: File,
}

impl ScratchDir {
    /// Creates a scratch directory under `ROOT/tmp`.
    pub fn new(store: &Store, what: &str) -> io::Result<ScratchDir> {
        let parent = store.root().join("tmp");
        fs::create_dir_all(&parent)?;
        let path = parent.join(prefix(what));
        fs::create_dir(&path)?;
        let lock = File::open(&path)?;
        lock.lock()?;
        Ok(ScratchDir { path, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = remove_any(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "failed to remove a scratch directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PID that is not running: a child that has exited and was reaped.
    fn dead_owner() -> Owner {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = start_time(&pid.to_string()).unwrap_or(1);
        child.wait().unwrap();
        Owner { pid, start }
    }

    #[test]
    fn owner_names_round_trip() {
        let me = Owner::current();
        assert!(me.alive());
        assert!(me.start > 0);
        let n = name(".new-", ".tmp");
        assert_eq!(owner_of(&n), Some(me));
        assert_eq!(owner_of(&name("", "")), Some(me));
        assert_eq!(owner_of(&format!("images.json.{}", name("", ".tmp"))), Some(me));
        assert_eq!(owner_of(&name(".app.tar.kiln-", ".tmp")), Some(me));
        assert_eq!(owner_of(&prefix("build")), Some(me));
        assert_eq!(owner_of("build-AbC123"), None);
        assert_eq!(owner_of("sha256"), None);
        let other = Owner {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!other.alive(), "same PID, other start time: another process");
        assert!(!dead_owner().alive());
    }

    #[test]
    fn stale_temps_go_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let root = dir.path();
        let dead = dead_owner().token();
        // Leftovers of a killed process in every temp directory.
        let leftovers = [
            root.join("ingest").join(format!("{dead}-0.tmp")),
            root.join("tmp").join(format!("{dead}-1-build")),
            root.join("snapshots/tmp").join(format!("{dead}-2")),
            root.join(format!("images.json.{dead}-3.tmp")),
            root.join("cache/mounts").join(format!(".abc.kiln-{dead}-5.new")),
        ];
        fs::write(&leftovers[0], vec![7u8; 100_000]).unwrap();
        fs::create_dir_all(leftovers[1].join("sub")).unwrap();
        fs::write(leftovers[1].join("sub/f"), b"x").unwrap();
        fs::create_dir_all(leftovers[2].join("work/work")).unwrap();
        fs::write(&leftovers[3], b"{}").unwrap();
        fs::create_dir_all(leftovers[4].join("seed")).unwrap();
        // Not temps: a cache mount and its lock.
        fs::create_dir_all(root.join("cache/mounts/abc")).unwrap();
        fs::write(root.join("cache/mounts/abc.lock"), b"").unwrap();
        // A dead owner's temp whose lock is held (a process of another PID namespace).
        let held = root.join("ingest").join(format!("{dead}-4.tmp"));
        fs::write(&held, b"held").unwrap();
        let holder = File::open(&held).unwrap();
        holder.lock().unwrap();
        // Live temps: ours, and an unowned one while the store is held.
        let mine = root.join("ingest").join(name("", ".tmp"));
        fs::write(&mine, b"mine").unwrap();
        let scratch = ScratchDir::new(&store, "build").unwrap();
        let unowned = root.join("tmp").join("build-XyZ");
        fs::create_dir(&unowned).unwrap();
        let hold = store.hold().unwrap();

        let cleaned = clean_stale(&store, false);
        let mut got = cleaned.paths.clone();
        got.sort();
        let mut want = leftovers.to_vec();
        want.sort();
        assert_eq!(got, want);
        assert!(cleaned.bytes >= 100_000, "{}", cleaned.bytes);
        for p in &leftovers {
            assert!(!p.exists(), "{}", p.display());
        }
        assert!(held.exists() && mine.exists() && scratch.path().is_dir() && unowned.is_dir());
        assert!(root.join("cache/mounts/abc").is_dir() && root.join("cache/mounts/abc.lock").is_file());
        // Nothing holds the store: the unowned temp goes too.
        drop(hold);
        let cleaned = clean_stale(&store, false);
        assert_eq!(cleaned.paths, vec![unowned.clone()]);
        assert!(held.exists() && mine.exists() && scratch.path().is_dir());
        let path = scratch.path().to_path_buf();
        drop(scratch);
        assert!(!path.exists());
        drop(holder);
        assert_eq!(clean_stale(&store, true).paths, vec![held]);
        // No claimed (`.trash-`) entries are left anywhere.
        for (d, _, _) in temp_dirs(root) {
            for e in fs::read_dir(d).into_iter().flatten().flatten() {
                assert!(!e.file_name().to_string_lossy().starts_with(".trash-"));
            }
        }
    }

    #[test]
    fn outside_temps_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("root")).unwrap();
        let dest = dir.path().join("app.tar");
        // Ours: written and persisted, or dropped: nothing left either way.
        let t = OutsideTemp::create(&store, &dest).unwrap();
        std::io::Write::write_all(&mut t.file(), b"archive").unwrap();
        assert!(t.path().is_file());
        t.persist(&dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"archive");
        let t = OutsideTemp::create(&store, &dest).unwrap();
        let p = t.path().to_path_buf();
        drop(t);
        assert!(!p.exists());
        assert_eq!(fs::read_dir(outside_dir(store.root())).unwrap().count(), 0);

        // A killed save's: its registration names it.
        let dead = dead_owner().token();
        let left = dir.path().join(format!(".app.tar.kiln-{dead}-0.tmp"));
        fs::write(&left, vec![1u8; 5000]).unwrap();
        let reg = outside_dir(store.root());
        fs::write(reg.join(format!("{dead}-1")), left.as_os_str().as_encoded_bytes()).unwrap();
        // A registration naming a file that is not that owner's temp removes nothing.
        let innocent = dir.path().join("innocent");
        fs::write(&innocent, b"keep").unwrap();
        fs::write(
            reg.join(format!("{dead}-2")),
            innocent.as_os_str().as_encoded_bytes(),
        )
        .unwrap();
        let cleaned = clean_stale(&store, false);
        assert_eq!(cleaned.paths, vec![left.clone()]);
        assert!(!left.exists() && innocent.exists() && dest.exists());
        assert_eq!(fs::read_dir(&reg).unwrap().count(), 0);
    }

    #[test]
    fn disk_usage_counts_shared_inodes_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        fs::write(a.join("f"), vec![1u8; 64 * 1024]).unwrap();
        fs::hard_link(a.join("f"), b.join("f")).unwrap();
        let file = fs::metadata(a.join("f")).unwrap().blocks() * 512;
        let dirs = fs::metadata(&a).unwrap().blocks() * 512 + fs::metadata(&b).unwrap().blocks() * 512;
        assert_eq!(disk_usage(&a) + disk_usage(&b), file + dirs);
    }
}
