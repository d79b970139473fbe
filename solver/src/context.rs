//! The build context, read in place: a sorted index of every path that `.dockerignore` lets
//! through, each with a content hash, and cache keys for the paths a COPY selects.
//!
//! Hashing goes through a stat cache (inode, size, mtime, ctime → content hash) kept under the
//! store root, so an unchanged context is re-checked with one `lstat` per path and no reads. The
//! mtime is only ever a cache *validator*: it never enters a key, so touching a file or cloning
//! the repository again yields the same keys.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_patterns::Matcher;
use rayon::prelude::*;

/// What kind of filesystem object a context entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Fifos, sockets, devices: hashed by metadata only; a COPY turns them into what
    /// [`special_file`] says.
    Special,
}

/// What a COPY from a build context makes of a path that is neither a file, a directory nor a
/// symlink: what BuildKit's COPY makes of it after its client sent the context through fsutil.
/// Checked against Docker 20.10's BuildKit with a context holding one of each: character and
/// block devices and sockets arrive as empty regular files with the node's permission bits (so
/// no device node of the build host ever reaches an image, and nothing is read from one), and
/// FIFOs arrive but COPY leaves them out without an error (fsutil's copier has no case for
/// them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecialFile {
    /// Written as an empty regular file with the node's mode, owner and times.
    EmptyFile,
    /// Not written at all.
    Skip,
}

/// How a COPY from a build context treats a path of type `ft`; `None` for files, directories
/// and symlinks.
pub fn special_file(ft: rustix::fs::FileType) -> Option<SpecialFile> {
    use rustix::fs::FileType;
    match ft {
        FileType::CharacterDevice | FileType::BlockDevice | FileType::Socket => Some(SpecialFile::EmptyFile),
        FileType::Fifo => Some(SpecialFile::Skip),
        _ => None,
    }
}

/// One path of the context.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Relative to the context root, `/`-separated, no leading `/`.
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Symlink target, verbatim.
    pub link: String,
    /// blake3 of the file's content (files only; zero otherwise).
    pub content: [u8; 32],
    /// The stat validators `content` was computed (or confirmed) under: inode, mtime and ctime
    /// in nanoseconds. A reader that sees the same values (and size) may trust `content`.
    pub validators: (u64, i64, i64),
    /// A file that is its inode's only name, on the context root's device: its `lstat` is
    /// this entry with `nlink` 1 and the root's `dev` (a copy need not take it again).
    pub single: bool,
}

impl Entry {
    /// Whether a regular file's `lstat` now, given as its size and validators (inode, mtime and
    /// ctime in nanoseconds), still shows the file `content` describes.
    pub fn still_matches(&self, size: u64, validators: (u64, i64, i64)) -> bool {
        self.kind == Kind::File && size == self.size && self.validators == validators
    }
}

impl Entry {
    /// What a cache key sees of this entry: path, type, mode, link target and content. Not the
    /// owner: a copy from the context owns its files by root (or `--chown`), as BuildKit resets
    /// the context's owners to 0, so a checkout by another user on another runner keeps the keys.
    fn feed(&self, h: &mut Feed) {
        let b = &mut h.buf;
        b.extend_from_slice(self.path.as_bytes());
        b.extend_from_slice(&[0, self.kind as u8]);
        b.extend_from_slice(&self.mode.to_le_bytes());
        b.extend_from_slice(self.link.as_bytes());
        b.push(0);
        b.extend_from_slice(&self.content);
        h.spill();
    }
}

/// A blake3 hasher fed through a buffer: the key of a context is a stream of ~100-byte records,
/// and many tiny `update` calls cost several times what hashing the same bytes in 64 KiB runs
/// does. The digest is the same either way (it depends only on the bytes).
struct Feed {
    h: blake3::Hasher,
    buf: Vec<u8>,
}

impl Feed {
    const RUN: usize = 64 * 1024;

    fn new(domain: &[u8]) -> Feed {
        let mut buf = Vec::with_capacity(Self::RUN + 4096);
        buf.extend_from_slice(domain);
        Feed {
            h: blake3::Hasher::new(),
            buf,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.spill();
    }

    fn spill(&mut self) {
        if self.buf.len() >= Self::RUN {
            self.h.update(&self.buf);
            self.buf.clear();
        }
    }

    fn finalize(mut self) -> [u8; 32] {
        self.h.update(&self.buf);
        *self.h.finalize().as_bytes()
    }
}

/// Reading the context failed.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("failed to read build context directory `{path}`")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to stat `{path}` in the build context")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read `{path}` in the build context")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid .dockerignore pattern")]
    Pattern(#[source] kiln_patterns::PatternError),
    #[error("build context path `{0}` is not valid UTF-8")]
    NotUtf8(PathBuf),
}

/// The indexed context.
#[derive(Debug)]
pub struct ContextIndex {
    pub root: PathBuf,
    /// Sorted by `path` (byte order), parents before children.
    pub entries: Vec<Entry>,
    /// Paths `.dockerignore` excludes (files, and directories below which nothing is
    /// re-included), sorted; a view of the context hides them.
    pub hidden: Vec<String>,
    /// The device of `root` (the device of every [`Entry::single`] file).
    pub dev: u64,
}

/// A stat-cache record: validators plus the content hash they vouch for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StatRecord {
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    hash: [u8; 32],
}

/// Persistent stat cache for one context directory: records sorted by path, as the index's
/// entries are (a sorted list, not a hash map: at 500k files the map's buckets and its growth by
/// doubling cost twice the memory, and a scan of an unchanged context finds each record at the
/// position of its entry).
#[derive(Debug, Default)]
pub struct StatCache {
    records: Vec<(Box<str>, StatRecord)>,
    dirty: bool,
}

const STAT_MAGIC: &[u8; 8] = b"KILNSC01";
/// The fixed part of a record after its path: four u64 validators and the hash.
const STAT_FIXED: usize = 32 + 32;

impl StatCache {
    /// Loads the cache file; a missing or unreadable file gives an empty cache (it is only a cache).
    pub fn load(path: &Path) -> StatCache {
        let Ok(bytes) = std::fs::read(path) else {
            return StatCache::default();
        };
        Self::decode(&bytes).unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Option<StatCache> {
        fn take<'a>(n: usize, rest: &mut &'a [u8]) -> Option<&'a [u8]> {
            if rest.len() < n {
                return None;
            }
            let (a, b) = rest.split_at(n);
            *rest = b;
            Some(a)
        }
        let body = bytes.strip_prefix(STAT_MAGIC.as_slice())?;
        // Counted first, so the list is allocated once at its size.
        let mut count = 0usize;
        let mut rest = body;
        while !rest.is_empty() {
            let len = u32::from_le_bytes(take(4, &mut rest)?.try_into().ok()?) as usize;
            take(len.checked_add(STAT_FIXED)?, &mut rest)?;
            count += 1;
        }
        let mut records = Vec::with_capacity(count);
        let mut rest = body;
        while !rest.is_empty() {
            let len = u32::from_le_bytes(take(4, &mut rest)?.try_into().ok()?) as usize;
            let path: Box<str> = std::str::from_utf8(take(len, &mut rest)?).ok()?.into();
            let nums = take(32, &mut rest)?;
            let n = |i: usize| u64::from_le_bytes(nums[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            let hash: [u8; 32] = take(32, &mut rest)?.try_into().ok()?;
            records.push((
                path,
                StatRecord {
                    ino: n(0),
                    size: n(1),
                    mtime_ns: n(2) as i64,
                    ctime_ns: n(3) as i64,
                    hash,
                },
            ));
        }
        // Files written before the list was kept sorted are in any order.
        if !records.windows(2).all(|w| w[0].0 < w[1].0) {
            records.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            records.dedup_by(|a, b| a.0 == b.0);
        }
        Some(StatCache {
            records,
            dirty: false,
        })
    }

    /// The record of `path`, looked for first at `hint` (its position when the context is
    /// unchanged).
    fn get(&self, path: &str, hint: usize) -> Option<&StatRecord> {
        let at = kiln_cache::sorted::find_from(self.records.len(), |i| &self.records[i].0, path, hint)?;
        Some(&self.records[at].1)
    }

    /// Makes the records those of `entries`' regular files (sorted by path), in place when the
    /// paths are the same ones.
    fn update(&mut self, entries: &[Entry]) {
        let record = |e: &Entry| {
            let (ino, mtime_ns, ctime_ns) = e.validators;
            StatRecord {
                ino,
                size: e.size,
                mtime_ns,
                ctime_ns,
                hash: e.content,
            }
        };
        let files = || entries.iter().filter(|e| e.kind == Kind::File);
        let count = files().count();
        let same_paths =
            self.records.len() == count && self.records.iter().zip(files()).all(|((p, _), e)| **p == *e.path);
        if same_paths {
            for ((_, r), e) in self.records.iter_mut().zip(files()) {
                let now = record(e);
                if *r != now {
                    *r = now;
                    self.dirty = true;
                }
            }
        } else {
            self.records = Vec::new();
            self.records.reserve_exact(count);
            self.records
                .extend(files().map(|e| (e.path.as_str().into(), record(e))));
            self.dirty = true;
        }
    }

    /// Writes the cache atomically if it changed. Failures are ignored: the cache is an optimisation.
    pub fn save(&self, path: &Path) {
        if !self.dirty {
            return;
        }
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_file_name(kiln_cache::temp::name(".stat.kiln-", ".tmp"));
        let written = std::fs::File::create(&tmp).and_then(|f| {
            // Streamed: a list of 500k records is 50 MB as one buffer.
            let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
            out.write_all(STAT_MAGIC)?;
            for (p, r) in &self.records {
                out.write_all(&(p.len() as u32).to_le_bytes())?;
                out.write_all(p.as_bytes())?;
                for v in [r.ino, r.size, r.mtime_ns as u64, r.ctime_ns as u64] {
                    out.write_all(&v.to_le_bytes())?;
                }
                out.write_all(&r.hash)?;
            }
            out.flush()
        });
        if written.is_ok() {
            let _ = std::fs::rename(&tmp, path);
        } else {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// One path met by the walk: what the index needs of its `lstat`, kept compact (a context of
/// 500k paths holds all of them at once).
struct Walked {
    rel: String,
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    ino: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    /// Excluded by `.dockerignore` (and, for a directory, nothing below can be re-included).
    hidden: bool,
    /// See [`Entry::single`].
    single: bool,
}

impl Walked {
    fn new(rel: String, meta: &std::fs::Metadata, hidden: bool, dev: u64) -> Walked {
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            Kind::File
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            Kind::Special
        };
        Walked {
            rel,
            kind,
            mode: meta.permissions().mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            size: meta.len(),
            ino: meta.ino(),
            mtime_ns: mtime_ns(meta),
            ctime_ns: ctime_ns(meta),
            hidden,
            single: kind == Kind::File && meta.nlink() == 1 && meta.dev() == dev,
        }
    }
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    kiln_runtime::unixtime::nanos((m.mtime(), m.mtime_nsec() as u32))
}

fn ctime_ns(m: &std::fs::Metadata) -> i64 {
    kiln_runtime::unixtime::nanos((m.ctime(), m.ctime_nsec() as u32))
}

/// Lists `dir` (context-relative `rel`) and recurses in parallel, skipping ignored paths.
fn walk(
    dir: &Path,
    rel: &str,
    matcher: &Matcher,
    dev: u64,
    out: &mut Vec<Walked>,
) -> Result<(), ContextError> {
    let rd = std::fs::read_dir(dir).map_err(|source| ContextError::ReadDir {
        path: dir.into(),
        source,
    })?;
    let mut subdirs = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|source| ContextError::ReadDir {
            path: dir.into(),
            source,
        })?;
        let name = ent.file_name();
        let name = name.to_str().ok_or_else(|| ContextError::NotUtf8(ent.path()))?;
        let child_rel = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        // Relative to the open directory (statx on its fd): no walk of the whole path per entry.
        let meta = ent.metadata().map_err(|source| ContextError::Stat {
            path: ent.path(),
            source,
        })?;
        let excluded = !matcher.is_empty() && matcher.matches(&child_rel).map_err(ContextError::Pattern)?;
        if meta.is_dir() {
            if excluded && !matcher.may_reinclude_below(&child_rel) {
                out.push(Walked::new(child_rel, &meta, true, dev));
                continue;
            }
            subdirs.push((ent.path(), child_rel.clone()));
            if !excluded {
                out.push(Walked::new(child_rel, &meta, false, dev));
            }
        } else {
            out.push(Walked::new(child_rel, &meta, excluded, dev));
        }
    }
    let nested: Vec<Result<Vec<Walked>, ContextError>> = subdirs
        .par_iter()
        .map(|(abs, rel)| {
            let mut v = Vec::new();
            walk(abs, rel, matcher, dev, &mut v).map(|_| v)
        })
        .collect();
    for n in nested {
        out.extend(n?);
    }
    Ok(())
}

fn hash_file(path: &Path) -> Result<[u8; 32], ContextError> {
    let mut f = std::fs::File::open(path).map_err(|source| ContextError::Read {
        path: path.into(),
        source,
    })?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(|source| ContextError::Read {
            path: path.into(),
            source,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(*h.finalize().as_bytes())
}

impl ContextIndex {
    /// Walks `root`, leaving out what `ignore` (the `.dockerignore` patterns) excludes, and hashes
    /// every file whose stat validators changed since `cache` saw it.
    pub fn scan(root: &Path, ignore: &[String], cache: &mut StatCache) -> Result<ContextIndex, ContextError> {
        let matcher = Matcher::new(ignore).map_err(ContextError::Pattern)?;
        let dev = std::fs::metadata(root)
            .map_err(|source| ContextError::Stat {
                path: root.into(),
                source,
            })?
            .dev();
        let mut walked = Vec::new();
        walk(root, "", &matcher, dev, &mut walked)?;
        let mut hidden: Vec<String> = Vec::new();
        walked.retain(|w| {
            if w.hidden {
                hidden.push(w.rel.clone());
            }
            !w.hidden
        });
        hidden.sort_unstable();
        walked.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));
        let cached = &*cache;
        // An unchanged context's k-th file has record k: each file's rank among the files is
        // where its record is looked for first (a miss searches).
        let mut files_before = 0usize;
        let ranks: Vec<usize> = walked
            .iter()
            .map(|w| {
                let rank = files_before;
                files_before += usize::from(w.kind == Kind::File);
                rank
            })
            .collect();
        // Collected straight into the entries, in place (`collect_into_vec` on the indexed
        // iterator: collecting a `Result` would gather chunks in a list and copy them, twice
        // the entries for a moment, ~60 MB at 500k files); the first error is kept beside.
        let failed: std::sync::Mutex<Option<ContextError>> = std::sync::Mutex::new(None);
        let mut slots: Vec<Option<Entry>> = Vec::new();
        walked
            .into_par_iter()
            .enumerate()
            .map(|(i, w)| -> Result<Entry, ContextError> {
                let link = if w.kind == Kind::Symlink {
                    let abs = root.join(&w.rel);
                    let t = std::fs::read_link(&abs)
                        .map_err(|source| ContextError::Read { path: abs, source })?;
                    t.to_string_lossy().into_owned()
                } else {
                    String::new()
                };
                let content = if w.kind == Kind::File {
                    match cached.get(&w.rel, ranks[i]) {
                        Some(c)
                            if (c.ino, c.size, c.mtime_ns, c.ctime_ns)
                                == (w.ino, w.size, w.mtime_ns, w.ctime_ns) =>
                        {
                            c.hash
                        }
                        _ => hash_file(&root.join(&w.rel))?,
                    }
                } else {
                    [0; 32]
                };
                Ok(Entry {
                    kind: w.kind,
                    mode: w.mode,
                    uid: w.uid,
                    gid: w.gid,
                    size: if w.kind == Kind::File { w.size } else { 0 },
                    link,
                    content,
                    validators: (w.ino, w.mtime_ns, w.ctime_ns),
                    single: w.single,
                    path: w.rel,
                })
            })
            .map(|r| match r {
                Ok(e) => Some(e),
                Err(e) => {
                    let mut first = failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    first.get_or_insert(e);
                    None
                }
            })
            .collect_into_vec(&mut slots);
        if let Some(e) = failed
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            return Err(e);
        }
        // Every slot is filled (no error); `Option<Entry>` is an `Entry` in size, so this
        // reuses the allocation (`filter_map` is collected in place, `flatten` is not: checked
        // on rustc 1.95).
        #[allow(
            clippy::filter_map_identity,
            reason = "flatten would allocate a second vector of every entry"
        )]
        let entries: Vec<Entry> = slots.into_iter().filter_map(|e| e).collect();
        cache.update(&entries);
        Ok(ContextIndex {
            root: root.to_path_buf(),
            entries,
            hidden,
            dev,
        })
    }

    /// The entry at the context-relative path `rel`, if the index has one.
    pub fn get(&self, rel: &str) -> Option<&Entry> {
        thread_local! {
            static NEXT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        }
        let at = kiln_cache::sorted::find(self.entries.len(), |i| self.entries[i].path.as_str(), rel, &NEXT)?;
        Some(&self.entries[at])
    }

    /// Key material for the whole context.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Feed::new(b"context-all\0");
        for e in &self.entries {
            e.feed(&mut h);
        }
        h.finalize()
    }

    /// The entries at `prefix` and below it (`prefix` empty = everything). Siblings such as
    /// `prefix-x` sort between `prefix` and `prefix/...`, so they are skipped, not a stop.
    fn subtree<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        let start = if prefix.is_empty() {
            0
        } else {
            self.entries.partition_point(|e| e.path.as_str() < prefix)
        };
        self.entries[start..]
            .iter()
            .take_while(move |e| e.path.starts_with(prefix))
            .filter(move |e| {
                prefix.is_empty()
                    || e.path.len() == prefix.len()
                    || e.path.as_bytes().get(prefix.len()) == Some(&b'/')
            })
    }

    /// Key material for what a COPY source `src` (context-relative, possibly a wildcard) can read:
    /// the entries below the longest wildcard-free directory prefix of `src`, plus, for symlinks
    /// among them, the entries their targets lead to inside the context.
    pub fn select_digest(&self, src: &str) -> [u8; 32] {
        let clean = clean_rel(src);
        let prefix = literal_prefix(&clean);
        let mut h = Feed::new(b"context-select\0");
        h.update(prefix.as_bytes());
        h.update(&[0]);
        let mut followed = Vec::new();
        for e in self.subtree(&prefix) {
            e.feed(&mut h);
            if e.kind == Kind::Symlink {
                followed.push(resolve_link(&e.path, &e.link));
            }
        }
        // Links inside the selection may point elsewhere in the context: what they lead to is
        // readable through them, so it is part of the key too (bounded against link cycles).
        let mut rounds = 0;
        while let Some(target) = followed.pop() {
            rounds += 1;
            if rounds > 64 {
                break;
            }
            h.update(b"\0link\0");
            h.update(target.as_bytes());
            for e in self.subtree(&target) {
                e.feed(&mut h);
                if e.kind == Kind::Symlink {
                    followed.push(resolve_link(&e.path, &e.link));
                }
            }
        }
        h.finalize()
    }
}

/// Cleans a context-relative path: no leading `/`, no `.` segments, `..` clamped at the root.
pub fn clean_rel(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    parts.join("/")
}

/// The path segments before the first one containing a wildcard character.
fn literal_prefix(clean: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in clean.split('/').filter(|s| !s.is_empty()) {
        if seg.contains(['*', '?', '[', '\\']) {
            break;
        }
        out.push(seg);
    }
    out.join("/")
}

/// Where a symlink at `path` with target `link` points, as a context-relative path.
fn resolve_link(path: &str, link: &str) -> String {
    if link.starts_with('/') {
        return clean_rel(link);
    }
    let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
    clean_rel(&format!("{parent}/{link}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, data: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    #[test]
    fn keys_follow_content_not_mtime() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a.txt", "a");
        write(d.path(), "src/b.txt", "b");
        write(d.path(), "src-x", "c");
        let mut cache = StatCache::default();
        let i1 = ContextIndex::scan(d.path(), &[], &mut cache).unwrap();
        let (all, a, src) = (i1.digest(), i1.select_digest("a.txt"), i1.select_digest("src"));
        // touch: same keys
        let f = std::fs::File::options()
            .write(true)
            .open(d.path().join("a.txt"))
            .unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        let i2 = ContextIndex::scan(d.path(), &[], &mut cache).unwrap();
        assert_eq!(
            (all, a, src),
            (i2.digest(), i2.select_digest("a.txt"), i2.select_digest("src"))
        );
        // edit src/b.txt: `a.txt` key unchanged, `src` and the whole context changed
        write(d.path(), "src/b.txt", "B");
        let i3 = ContextIndex::scan(d.path(), &[], &mut cache).unwrap();
        assert_eq!(a, i3.select_digest("a.txt"));
        assert_ne!(src, i3.select_digest("src"));
        assert_ne!(all, i3.digest());
        // `src-x` is a sibling, not part of `src`
        write(d.path(), "src-x", "changed");
        let i4 = ContextIndex::scan(d.path(), &[], &mut cache).unwrap();
        assert_eq!(i3.select_digest("src"), i4.select_digest("src"));
    }

    #[test]
    fn same_size_and_mtime_edit_is_seen_through_ctime() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "f", "aaaa");
        let mut cache = StatCache::default();
        let i1 = ContextIndex::scan(d.path(), &[], &mut cache).unwrap();
        let before = std::fs::metadata(d.path().join("f")).unwrap();
        // In place (same inode), same size, the old mtime put back: only the ctime tells.
        std::fs::write(d.path().join("f"), "bbbb").unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(d.path().join("f"))
            .unwrap();
        f.set_modified(before.modified().unwrap()).unwrap();
        let after = std::fs::metadata(d.path().join("f")).unwrap();
        assert_eq!(
            (before.ino(), before.len(), before.mtime_nsec()),
            (after.ino(), after.len(), after.mtime_nsec())
        );
        let i2 = ContextIndex::scan(d.path(), &[], &mut cache).unwrap();
        assert_ne!(i1.get("f").unwrap().content, i2.get("f").unwrap().content);
        assert_eq!(i2.get("f").unwrap().content, *blake3::hash(b"bbbb").as_bytes());
    }

    #[test]
    fn stat_cache_follows_the_context_and_reads_unsorted_files() {
        let d = tempfile::tempdir().unwrap();
        let ctx = d.path().join("ctx");
        write(&ctx, "a", "1");
        write(&ctx, "b/c", "2");
        write(&ctx, "d", "3");
        let paths = |c: &StatCache| c.records.iter().map(|(p, _)| p.to_string()).collect::<Vec<_>>();
        let mut cache = StatCache::default();
        ContextIndex::scan(&ctx, &[], &mut cache).unwrap();
        assert_eq!(paths(&cache), ["a", "b/c", "d"]);
        assert!(cache.dirty);
        let file = d.path().join("cache.bin");
        cache.save(&file);
        let mut loaded = StatCache::load(&file);
        assert_eq!(loaded.records, cache.records);
        // Unchanged: nothing to write.
        ContextIndex::scan(&ctx, &[], &mut loaded).unwrap();
        assert!(!loaded.dirty);
        // An edit updates its record in place.
        write(&ctx, "b/c", "two, longer");
        let i = ContextIndex::scan(&ctx, &[], &mut loaded).unwrap();
        assert!(loaded.dirty);
        let rec = loaded.get("b/c", 0).unwrap();
        assert_eq!(rec.hash, i.get("b/c").unwrap().content);
        assert_eq!(rec.size, 11);
        // A file gone and one new: the records are the context's files again.
        std::fs::remove_file(ctx.join("a")).unwrap();
        write(&ctx, "e", "5");
        let mut c = StatCache::load(&file);
        ContextIndex::scan(&ctx, &[], &mut c).unwrap();
        assert_eq!(paths(&c), ["b/c", "d", "e"]);
        assert!(c.dirty);
        // A file whose records are not in path order (as hash-map order wrote them) reads sorted.
        let mut reversed = StatCache {
            records: c.records.iter().rev().cloned().collect(),
            dirty: true,
        };
        reversed.save(&file);
        reversed = StatCache::load(&file);
        assert_eq!(paths(&reversed), ["b/c", "d", "e"]);
        assert!(reversed.get("d", 0).is_some() && reversed.get("a", 0).is_none());
    }

    #[test]
    fn ignored_paths_are_invisible_and_cache_round_trips() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "keep", "1");
        write(d.path(), "node_modules/x/y", "2");
        let mut cache = StatCache::default();
        let i = ContextIndex::scan(d.path(), &["node_modules".to_string()], &mut cache).unwrap();
        let paths: Vec<_> = i.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["keep"]);
        let file = d.path().join("cache.bin");
        cache.save(&file);
        let loaded = StatCache::load(&file);
        assert_eq!(loaded.records, cache.records);
    }

    #[test]
    fn buffered_feed_is_the_plain_stream_hash() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..2000 {
            write(d.path(), &format!("dir{}/file-with-a-long-name-{i}", i % 7), "x");
        }
        let i = ContextIndex::scan(d.path(), &[], &mut StatCache::default()).unwrap();
        assert_eq!(i.entries.len(), 2007);
        assert!(
            i.entries.windows(2).all(|w| w[0].path < w[1].path),
            "sorted by path"
        );
        let mut plain = blake3::Hasher::new();
        plain.update(b"context-all\0");
        for e in &i.entries {
            plain.update(e.path.as_bytes());
            plain.update(&[0, e.kind as u8]);
            plain.update(&e.mode.to_le_bytes());
            plain.update(e.link.as_bytes());
            plain.update(&[0]);
            plain.update(&e.content);
        }
        assert_eq!(i.digest(), *plain.finalize().as_bytes());
    }

    #[test]
    fn wildcard_selects_prefix_dir() {
        assert_eq!(literal_prefix("src/*.rs"), "src");
        assert_eq!(literal_prefix("*.txt"), "");
        assert_eq!(clean_rel("/./a/../b/"), "b");
        assert_eq!(resolve_link("a/b", "../c"), "c");
        assert_eq!(resolve_link("a/b", "/etc"), "etc");
    }
}
