//! Applying a layer tar to a directory, whiteouts honoured, nothing ever written outside it.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_dag::Digest;
use rustix::fs::{self as rfs, AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use super::fsutil::{dir_flags, remove_entry};
use super::tarfmt::{self, Kind, BLOCK};
use super::{ApplyOptions, ApplyStats, WhiteoutMode};

/// Errors of [`apply`]. Every variant names the archive and the entry involved.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The destination directory could not be opened.
    #[error("failed to open the destination `{path}`")]
    OpenDest {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading the archive failed.
    #[error("{archive}: failed to read entry `{entry}`")]
    Read {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// The archive ended in the middle of an entry.
    #[error("{archive}: unexpected end of archive in entry `{entry}`")]
    UnexpectedEof { archive: String, entry: String },
    /// A header block's checksum is wrong (not a tar, or corrupt).
    #[error("{archive}: bad header checksum at entry `{entry}`")]
    BadChecksum { archive: String, entry: String },
    /// A numeric header field is malformed or out of range.
    #[error("{archive}: entry `{entry}` has an invalid `{field}` field")]
    BadHeaderField {
        archive: String,
        entry: String,
        field: &'static str,
    },
    /// A PAX or GNU long-name header is larger than the cap.
    #[error("{archive}: entry `{entry}` has a {size}-byte extended header (limit {limit})")]
    HeaderTooLarge {
        archive: String,
        entry: String,
        size: u64,
        limit: u64,
    },
    /// A PAX header is malformed.
    #[error("{archive}: entry `{entry}` has a malformed PAX header: {reason}")]
    BadPax {
        archive: String,
        entry: String,
        reason: &'static str,
    },
    /// The entry type is not one a layer may hold (or a sparse file).
    #[error("{archive}: entry `{entry}` has unsupported type `{typeflag}`")]
    UnsupportedType {
        archive: String,
        entry: String,
        typeflag: char,
    },
    /// The entry name is absolute.
    #[error("{archive}: entry `{entry}` has an absolute path")]
    AbsolutePath { archive: String, entry: String },
    /// The entry name has a `..` component.
    #[error("{archive}: entry `{entry}` has a `..` component")]
    DotDot { archive: String, entry: String },
    /// A parent of the entry is a symlink (following it could leave the destination).
    #[error("{archive}: entry `{entry}` crosses the symlink `{component}`")]
    CrossesSymlink {
        archive: String,
        entry: String,
        component: String,
    },
    /// A parent of the entry exists and is not a directory.
    #[error("{archive}: entry `{entry}`: parent `{component}` is not a directory")]
    ParentNotDirectory {
        archive: String,
        entry: String,
        component: String,
    },
    /// A parent directory of the entry could not be opened or created.
    #[error("{archive}: entry `{entry}`: failed to open parent `{component}`")]
    OpenParent {
        archive: String,
        entry: String,
        component: String,
        #[source]
        source: io::Error,
    },
    /// The entry names the destination root itself but is not a directory.
    #[error("{archive}: entry `{entry}` names the root but is not a directory")]
    RootNotDirectory { archive: String, entry: String },
    /// A whiteout entry is malformed (a bare `.wh.`, or `.wh..`).
    #[error("{archive}: entry `{entry}` is an invalid whiteout")]
    InvalidWhiteout { archive: String, entry: String },
    /// A hardlink's target is absolute, has `..`, or passes a symlink.
    #[error("{archive}: hardlink `{entry}` points outside the destination (`{target}`)")]
    LinkEscapes {
        archive: String,
        entry: String,
        target: String,
    },
    /// A hardlink's target does not exist in the destination.
    #[error("{archive}: hardlink `{entry}` points at `{target}`, which does not exist")]
    LinkTargetMissing {
        archive: String,
        entry: String,
        target: String,
    },
    /// A device node cannot be created without privilege.
    #[error("{archive}: entry `{entry}` is a device node and creating one needs root (CAP_MKNOD)")]
    DeviceNotPermitted { archive: String, entry: String },
    /// Creating the entry failed.
    #[error("{archive}: failed to create entry `{entry}`")]
    Create {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// Removing an existing path (replaced or whited out) failed.
    #[error("{archive}: failed to remove the existing path for entry `{entry}`")]
    Remove {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// Writing a file's data failed.
    #[error("{archive}: failed to write the data of entry `{entry}`")]
    WriteData {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// Setting the owner failed.
    #[error("{archive}: failed to set the owner of entry `{entry}`")]
    Chown {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// Setting the mode failed.
    #[error("{archive}: failed to set the mode of entry `{entry}`")]
    Chmod {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// Setting an xattr failed.
    #[error("{archive}: failed to set xattr `{name}` on entry `{entry}`")]
    SetXattr {
        archive: String,
        entry: String,
        name: String,
        #[source]
        source: io::Error,
    },
    /// Setting the modification time failed.
    #[error("{archive}: failed to set the mtime of entry `{entry}`")]
    SetTime {
        archive: String,
        entry: String,
        #[source]
        source: io::Error,
    },
}

/// Builds an [`ApplyError`] variant from an `(archive, entry)` context.
macro_rules! fail {
    ($variant:ident, $ctx:expr $(, $field:ident : $value:expr)* $(,)?) => {
        ApplyError::$variant { archive: $ctx.0.to_string(), entry: $ctx.1.to_string() $(, $field: $value)* }
    };
}

/// A reader that hashes and counts what goes through it.
struct HashReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// One entry, its headers merged.
struct Entry {
    path: Vec<u8>,
    link: Vec<u8>,
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, u32),
    dev: (u32, u32),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Values from PAX and GNU headers waiting for the entry they describe.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<(i64, u32)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Why walking to a directory inside the destination failed, with the component's index.
enum WalkFail {
    Symlink(usize),
    NotDir(usize),
    Missing(usize),
    Io(usize, io::Error),
}

/// Applies an uncompressed layer tar to `dest`.
///
/// OCI rules: a directory over an existing directory only replaces its attributes; any other entry
/// unlinks what is there and recreates it. Owner (when `same_owner`), mode (setuid/setgid/sticky
/// included, set after the owner), xattrs (overlayfs' own excepted) and mtimes are applied without
/// following symlinks; directories get their mode and mtime after all their children are written.
/// Whiteouts follow `opts.whiteouts`. Entries with `..`, absolute names, parents that are symlinks,
/// or hardlinks leaving the destination are errors, and so are device nodes without privilege.
/// The returned digest covers every byte of the stream, so it is the layer's diff ID.
pub fn apply<R: Read>(reader: R, dest: &Path, opts: &ApplyOptions) -> Result<ApplyStats, ApplyError> {
    let root = rfs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ApplyError::OpenDest {
        path: dest.to_path_buf(),
        source: e.into(),
    })?;
    let mut applier = Applier {
        archive: &opts.archive_name,
        opts,
        input: BufReader::with_capacity(
            256 * 1024,
            HashReader {
                inner: reader,
                hasher: Sha256::new(),
                count: 0,
            },
        ),
        root,
        cached: None,
        written: HashSet::new(),
        dirs: HashMap::new(),
        entries: 0,
    };
    applier.run()?;
    applier.finish_dirs()?;
    let entries = applier.entries;
    let mut drain = applier.input;
    io::copy(&mut drain, &mut io::sink())
        .map_err(|source| fail!(Read, (&opts.archive_name, "end of archive"), source: source))?;
    let hashed = drain.into_inner();
    Ok(ApplyStats {
        diff_id: Digest(hashed.hasher.finalize().into()),
        size: hashed.count,
        entries,
    })
}

struct Applier<'a, R: Read> {
    archive: &'a str,
    opts: &'a ApplyOptions,
    input: BufReader<HashReader<R>>,
    root: OwnedFd,
    /// The parent directory of the last entry, by its relative path.
    cached: Option<(Vec<u8>, OwnedFd)>,
    /// Paths this layer wrote (Delete mode only): whiteouts and opaque markers spare them.
    written: HashSet<Vec<u8>>,
    /// Directory mode and mtime to set once everything is written, by relative path.
    dirs: HashMap<Vec<u8>, (u32, (i64, u32))>,
    entries: u64,
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&b'/')
}

fn timestamps(mtime: (i64, u32)) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime.0,
        tv_nsec: mtime.1.into(),
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

impl<R: Read> Applier<'_, R> {
    /// Reads one header block; `false` at a clean end of stream.
    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool, ApplyError> {
        let mut have = 0;
        while have < BLOCK {
            match self.input.read(&mut block[have..]) {
                Ok(0) if have == 0 => return Ok(false),
                Ok(0) => return Err(fail!(UnexpectedEof, (self.archive, "header"))),
                Ok(n) => have += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(fail!(Read, (self.archive, "header"), source: source)),
            }
        }
        Ok(true)
    }

    /// Moves `n` bytes of entry data to `sink` (or drops them).
    fn pump(&mut self, mut n: u64, mut sink: Option<&mut File>, entry: &str) -> Result<(), ApplyError> {
        while n > 0 {
            let buf = match self.input.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(fail!(Read, (self.archive, entry), source: source)),
            };
            if buf.is_empty() {
                return Err(fail!(UnexpectedEof, (self.archive, entry)));
            }
            let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            if let Some(file) = sink.as_mut() {
                file.write_all(&buf[..take])
                    .map_err(|source| fail!(WriteData, (self.archive, entry), source: source))?;
            }
            self.input.consume(take);
            n -= take as u64;
        }
        Ok(())
    }

    fn read_vec(&mut self, size: u64, entry: &str) -> Result<Vec<u8>, ApplyError> {
        let mut data = Vec::with_capacity(size as usize);
        (&mut self.input)
            .take(size)
            .read_to_end(&mut data)
            .map_err(|source| fail!(Read, (self.archive, entry), source: source))?;
        if (data.len() as u64) < size {
            return Err(fail!(UnexpectedEof, (self.archive, entry)));
        }
        self.pump(tarfmt::padding(size) as u64, None, entry)?;
        Ok(data)
    }

    fn run(&mut self) -> Result<(), ApplyError> {
        let mut pending = Pending::default();
        let mut block = [0u8; BLOCK];
        loop {
            let offset = self.input.get_ref().count - self.input.buffer().len() as u64;
            if !self.read_block(&mut block)? || block.iter().all(|&b| b == 0) {
                return Ok(());
            }
            let header_name = tarfmt::header_name(&block);
            let label = match &pending.path {
                Some(p) => lossy(p),
                None if header_name.is_empty() => format!("header at byte {offset}"),
                None => lossy(&header_name),
            };
            let ctx = (self.archive, label.as_str());
            if !tarfmt::checksum_ok(&block) {
                return Err(fail!(BadChecksum, ctx));
            }
            let number = |range: std::ops::Range<usize>, field: &'static str| {
                tarfmt::parse_number(&block[range])
                    .filter(|v| *v >= 0)
                    .map(|v| v as u64)
                    .ok_or_else(|| fail!(BadHeaderField, ctx, field: field))
            };
            let header_size = number(124..136, "size")?;
            let flag = block[156];
            if matches!(flag, b'x' | b'g' | b'L' | b'K') {
                if header_size > self.opts.max_header_size {
                    return Err(
                        fail!(HeaderTooLarge, ctx, size: header_size, limit: self.opts.max_header_size),
                    );
                }
                let data = self.read_vec(header_size, &label)?;
                match flag {
                    b'x' => self.pax(&data, &mut pending, &label)?,
                    b'g' => {
                        tarfmt::pax_records(&data).map_err(
                            |reason| fail!(BadPax, (self.archive, label.as_str()), reason: reason),
                        )?;
                    }
                    b'L' => pending.path = Some(tarfmt::cstr(&data).to_vec()),
                    _ => pending.link = Some(tarfmt::cstr(&data).to_vec()),
                }
                continue;
            }
            let Some(kind) = Kind::from_flag(flag) else {
                return Err(fail!(UnsupportedType, ctx, typeflag: char::from(flag)));
            };
            let id = |value: u64, field| u32::try_from(value).ok().filter(|v| *v != u32::MAX).ok_or(field);
            let uid = pending.uid.map_or_else(|| number(108..116, "uid"), Ok)?;
            let gid = pending.gid.map_or_else(|| number(116..124, "gid"), Ok)?;
            let (uid, gid) = match (id(uid, "uid"), id(gid, "gid")) {
                (Ok(u), Ok(g)) => (u, g),
                (Err(field), _) | (_, Err(field)) => return Err(fail!(BadHeaderField, ctx, field: field)),
            };
            let mtime = match pending.mtime {
                Some(t) => t,
                None => {
                    let secs = tarfmt::parse_number(&block[136..148])
                        .ok_or_else(|| fail!(BadHeaderField, ctx, field: "mtime"))?;
                    (secs, 0)
                }
            };
            let dev = if matches!(kind, Kind::Char | Kind::Block) {
                let major = number(329..337, "devmajor")?;
                let minor = number(337..345, "devminor")?;
                match (u32::try_from(major), u32::try_from(minor)) {
                    (Ok(a), Ok(b)) => (a, b),
                    _ => return Err(fail!(BadHeaderField, ctx, field: "devmajor")),
                }
            } else {
                (0, 0)
            };
            let entry = Entry {
                path: pending.path.take().unwrap_or(header_name),
                link: pending
                    .link
                    .take()
                    .unwrap_or_else(|| tarfmt::cstr(&block[157..257]).to_vec()),
                kind,
                mode: number(100..108, "mode")? as u32,
                uid,
                gid,
                size: pending.size.unwrap_or(header_size),
                mtime,
                dev,
                xattrs: std::mem::take(&mut pending.xattrs),
            };
            pending = Pending::default();
            self.entries += 1;
            self.entry(entry, &label)?;
        }
    }

    fn pax(&mut self, data: &[u8], pending: &mut Pending, label: &str) -> Result<(), ApplyError> {
        let ctx = (self.archive, label);
        let records = tarfmt::pax_records(data).map_err(|reason| fail!(BadPax, ctx, reason: reason))?;
        let int = |value: &[u8], reason| {
            std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(reason)
        };
        for r in records {
            let res = match r.key {
                b"path" => {
                    pending.path = Some(r.value.to_vec());
                    Ok(())
                }
                b"linkpath" => {
                    pending.link = Some(r.value.to_vec());
                    Ok(())
                }
                b"size" => int(r.value, "bad size").map(|v| pending.size = Some(v)),
                b"uid" => int(r.value, "bad uid").map(|v| pending.uid = Some(v)),
                b"gid" => int(r.value, "bad gid").map(|v| pending.gid = Some(v)),
                b"mtime" => tarfmt::parse_pax_time(r.value)
                    .map(|t| pending.mtime = Some(t))
                    .ok_or("bad mtime"),
                key if key.starts_with(b"GNU.sparse.") => {
                    return Err(fail!(UnsupportedType, ctx, typeflag: 'S'));
                }
                key => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        pending.xattrs.push((name.to_vec(), r.value.to_vec()));
                    }
                    Ok(())
                }
            };
            res.map_err(|reason| fail!(BadPax, ctx, reason: reason))?;
        }
        Ok(())
    }

    /// Splits an entry name into components: `.` and empty ones dropped, `..` and absolute names
    /// refused.
    fn components<'p>(&self, path: &'p [u8], label: &str) -> Result<Vec<&'p [u8]>, ApplyError> {
        if path.first() == Some(&b'/') {
            return Err(fail!(AbsolutePath, (self.archive, label)));
        }
        let mut out = Vec::new();
        for c in path.split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => return Err(fail!(DotDot, (self.archive, label))),
                c => out.push(c),
            }
        }
        Ok(out)
    }

    /// Opens the directory `comps` inside the destination without following any symlink,
    /// creating missing directories when `create`.
    fn walk(&self, comps: &[&[u8]], create: bool) -> Result<OwnedFd, WalkFail> {
        let mut cur: Option<OwnedFd> = None;
        for (i, comp) in comps.iter().enumerate() {
            let base = cur.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let opened = match rfs::openat(base, *comp, dir_flags(), Mode::empty()) {
                Err(Errno::NOENT) if create => match rfs::mkdirat(base, *comp, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => rfs::openat(base, *comp, dir_flags(), Mode::empty()),
                    Err(e) => Err(e),
                },
                other => other,
            };
            match opened {
                Ok(fd) => cur = Some(fd),
                Err(Errno::NOENT) => return Err(WalkFail::Missing(i)),
                Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                    return Err(match rfs::statat(base, *comp, AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                            WalkFail::Symlink(i)
                        }
                        _ => WalkFail::NotDir(i),
                    })
                }
                Err(e) => return Err(WalkFail::Io(i, e.into())),
            }
        }
        match cur {
            Some(fd) => Ok(fd),
            None => rfs::openat(&self.root, c".", dir_flags(), Mode::empty())
                .map_err(|e| WalkFail::Io(0, e.into())),
        }
    }

    /// The parent directory of an entry (created as needed), from the one-entry cache when it
    /// is the previous entry's parent too.
    fn parent(&mut self, comps: &[&[u8]], label: &str) -> Result<(Vec<u8>, OwnedFd), ApplyError> {
        let key = join(comps);
        if let Some((cached_key, fd)) = self.cached.take() {
            if cached_key == key {
                return Ok((key, fd));
            }
        }
        let fd = self
            .walk(comps, true)
            .map_err(|f| self.walk_error(f, comps, label))?;
        if self.opts.whiteouts == WhiteoutMode::Delete {
            for i in 1..=comps.len() {
                self.written.insert(join(&comps[..i]));
            }
        }
        Ok((key, fd))
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
            WalkFail::Io(i, source) => fail!(OpenParent, ctx, component: upto(i), source: source),
        }
    }

    fn entry(&mut self, e: Entry, label: &str) -> Result<(), ApplyError> {
        let comps = self.components(&e.path, label)?;
        let data = if e.kind == Kind::Regular { 0 } else { e.size };
        let Some((&name, parents)) = comps.split_last() else {
            if e.kind != Kind::Dir {
                return Err(fail!(RootNotDirectory, (self.archive, label)));
            }
            let root = rfs::openat(&self.root, c".", dir_flags(), Mode::empty())
                .map_err(|err| fail!(Create, (self.archive, label), source: err.into()))?;
            self.owner_and_xattrs(root.as_fd(), None, &e, label)?;
            self.dirs.insert(Vec::new(), (e.mode, e.mtime));
            return self.pump(data + tarfmt::padding(e.size) as u64, None, label);
        };
        if let Some(target) = name.strip_prefix(b".wh.") {
            self.whiteout(parents, target, label)?;
            return self.pump(e.size + tarfmt::padding(e.size) as u64, None, label);
        }
        let (key, parent) = self.parent(parents, label)?;
        let result = self.create(parent.as_fd(), name, &e, label, &comps);
        self.cached = Some((key, parent));
        result?;
        if self.opts.whiteouts == WhiteoutMode::Delete {
            self.written.insert(join(&comps));
        }
        self.pump(data + tarfmt::padding(e.size) as u64, None, label)
    }

    /// Removes whatever is at `name` inside `parent` (a whole tree for a directory).
    fn remove_existing(&self, parent: BorrowedFd<'_>, name: &[u8], label: &str) -> Result<(), ApplyError> {
        let ctx = (self.archive, label);
        let cname = std::ffi::CString::new(name)
            .map_err(|_| fail!(Create, ctx, source: io::ErrorKind::InvalidInput.into()))?;
        remove_entry(parent, &cname, None).map_err(|source| fail!(Remove, ctx, source: source))
    }

    /// Runs `make`; when the name is taken, removes what is there and runs it once more. The
    /// outer error is a failed removal, the inner one `make`'s own.
    fn replace<T>(
        &self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        label: &str,
        mut make: impl FnMut() -> rustix::io::Result<T>,
    ) -> Result<rustix::io::Result<T>, ApplyError> {
        match make() {
            Err(Errno::EXIST) => {
                self.remove_existing(parent, name, label)?;
                Ok(make())
            }
            other => Ok(other),
        }
    }

    fn create(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        e: &Entry,
        label: &str,
        comps: &[&[u8]],
    ) -> Result<(), ApplyError> {
        let ctx = (self.archive, label);
        let create_err = |err: Errno| fail!(Create, ctx, source: err.into());
        match e.kind {
            Kind::Regular => {
                let flags =
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let fd = self
                    .replace(parent, name, label, || {
                        rfs::openat(parent, name, flags, Mode::from_raw_mode(0o600))
                    })?
                    .map_err(create_err)?;
                let mut file = File::from(fd);
                self.pump(e.size, Some(&mut file), label)?;
                let fd = OwnedFd::from(file);
                self.owner_and_xattrs(fd.as_fd(), None, e, label)?;
                rfs::futimens(&fd, &timestamps(e.mtime))
                    .map_err(|err| fail!(SetTime, ctx, source: err.into()))
            }
            Kind::Dir => {
                match rfs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) => {}
                    Err(Errno::EXIST) => {
                        let is_dir = rfs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
                            .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
                            .map_err(create_err)?;
                        if !is_dir {
                            self.remove_existing(parent, name, label)?;
                            rfs::mkdirat(parent, name, Mode::from_raw_mode(0o700)).map_err(create_err)?;
                        }
                    }
                    Err(err) => return Err(create_err(err)),
                }
                let fd = rfs::openat(parent, name, dir_flags(), Mode::empty()).map_err(create_err)?;
                self.owner_and_xattrs(fd.as_fd(), None, e, label)?;
                self.dirs.insert(join(comps), (e.mode, e.mtime));
                Ok(())
            }
            Kind::Symlink => {
                self.replace(parent, name, label, || {
                    rfs::symlinkat(e.link.as_slice(), parent, name)
                })?
                .map_err(create_err)?;
                self.owner_and_xattrs(parent, Some(name), e, label)?;
                rfs::utimensat(parent, name, &timestamps(e.mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|err| fail!(SetTime, ctx, source: err.into()))
            }
            Kind::Hardlink => self.hardlink(parent, name, e, label),
            Kind::Char | Kind::Block | Kind::Fifo => {
                let file_type = match e.kind {
                    Kind::Char => FileType::CharacterDevice,
                    Kind::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let dev = rfs::makedev(e.dev.0, e.dev.1);
                let perm = Mode::from_raw_mode(e.mode & 0o777);
                self.replace(parent, name, label, || {
                    rfs::mknodat(parent, name, file_type, perm, dev)
                })?
                .map_err(|err| match err {
                    Errno::PERM if e.kind != Kind::Fifo => fail!(DeviceNotPermitted, ctx),
                    err => create_err(err),
                })?;
                self.owner_and_xattrs(parent, Some(name), e, label)?;
                rfs::utimensat(parent, name, &timestamps(e.mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|err| fail!(SetTime, ctx, source: err.into()))
            }
        }
    }

    fn hardlink(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        e: &Entry,
        label: &str,
    ) -> Result<(), ApplyError> {
        let ctx = (self.archive, label);
        let escapes = || fail!(LinkEscapes, ctx, target: lossy(&e.link));
        let missing = || fail!(LinkTargetMissing, ctx, target: lossy(&e.link));
        if e.link.first() == Some(&b'/') {
            return Err(escapes());
        }
        let mut comps = Vec::new();
        for c in e.link.split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => return Err(escapes()),
                c => comps.push(c),
            }
        }
        let Some((&target, target_parents)) = comps.split_last() else {
            return Err(escapes());
        };
        let target_dir = self.walk(target_parents, false).map_err(|f| match f {
            WalkFail::Symlink(_) => escapes(),
            _ => missing(),
        })?;
        let link = || rfs::linkat(&target_dir, target, parent, name, AtFlags::empty());
        match link() {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) => Err(missing()),
            Err(Errno::EXIST) => {
                let same = match (
                    rfs::statat(&target_dir, target, AtFlags::SYMLINK_NOFOLLOW),
                    rfs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW),
                ) {
                    (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
                    _ => false,
                };
                if same {
                    return Ok(());
                }
                self.remove_existing(parent, name, label)?;
                link().map_err(|err| match err {
                    Errno::NOENT => missing(),
                    err => fail!(Create, ctx, source: err.into()),
                })
            }
            Err(err) => Err(fail!(Create, ctx, source: err.into())),
        }
    }

    /// Applies owner, mode (not for directories: deferred) and xattrs, in that order (chown clears
    /// setuid bits and file capabilities). `name` is `None` when `fd` is the entry itself, or the
    /// entry's name inside the directory `fd` for entries that cannot be opened (symlinks,
    /// devices, fifos).
    fn owner_and_xattrs(
        &self,
        fd: BorrowedFd<'_>,
        name: Option<&[u8]>,
        e: &Entry,
        label: &str,
    ) -> Result<(), ApplyError> {
        let ctx = (self.archive, label);
        if self.opts.same_owner {
            let (uid, gid) = (
                Some(Uid::from_raw_unchecked(e.uid)),
                Some(Gid::from_raw_unchecked(e.gid)),
            );
            match name {
                None => rfs::fchown(fd, uid, gid),
                Some(n) => rfs::chownat(fd, n, uid, gid, AtFlags::SYMLINK_NOFOLLOW),
            }
            .map_err(|err| fail!(Chown, ctx, source: err.into()))?;
        }
        let mode = Mode::from_raw_mode(e.mode & 0o7777);
        match (name, e.kind) {
            (_, Kind::Dir) | (_, Kind::Symlink) => {}
            (None, _) => rfs::fchmod(fd, mode).map_err(|err| fail!(Chmod, ctx, source: err.into()))?,
            (Some(n), _) => rfs::chmodat(fd, n, mode, AtFlags::empty())
                .map_err(|err| fail!(Chmod, ctx, source: err.into()))?,
        }
        for (key, value) in &e.xattrs {
            if super::overlay_xattr_key(key).is_some() {
                continue;
            }
            let set = match name {
                None => rfs::fsetxattr(fd, key.as_slice(), value, XattrFlags::empty()),
                Some(n) => {
                    // No fd can be opened on a symlink or device to set xattrs through, so go via
                    // the parent's fd in /proc: the kernel resolves it without any lookup by name
                    // above `n`, and lsetxattr does not follow `n`.
                    let mut path = format!("/proc/self/fd/{}/", fd.as_raw_fd()).into_bytes();
                    path.extend_from_slice(n);
                    rfs::lsetxattr(
                        Path::new(OsStr::from_bytes(&path)),
                        key.as_slice(),
                        value,
                        XattrFlags::empty(),
                    )
                }
            };
            set.map_err(|err| fail!(SetXattr, ctx, name: lossy(key), source: err.into()))?;
        }
        Ok(())
    }

    fn whiteout(&mut self, parents: &[&[u8]], target: &[u8], label: &str) -> Result<(), ApplyError> {
        let ctx = (self.archive, label);
        if target == b".wh..opq" {
            return self.opaque(parents, label);
        }
        if target.starts_with(b".wh.") {
            // AUFS metadata (`.wh..wh.plnk`, `.wh..wh.aufs`): nothing to apply.
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(fail!(InvalidWhiteout, ctx));
        }
        match self.opts.whiteouts {
            WhiteoutMode::Overlay => {
                let (key, parent) = self.parent(parents, label)?;
                let result = match rfs::statat(&parent, target, AtFlags::SYMLINK_NOFOLLOW) {
                    // Written by this same layer: a whiteout only hides lower layers.
                    Ok(_) => Ok(()),
                    Err(Errno::NOENT) => rfs::mknodat(
                        &parent,
                        target,
                        FileType::CharacterDevice,
                        Mode::empty(),
                        rfs::makedev(0, 0),
                    )
                    .map_err(|err| match err {
                        Errno::PERM => fail!(DeviceNotPermitted, ctx),
                        err => fail!(Create, ctx, source: err.into()),
                    }),
                    Err(err) => Err(fail!(Create, ctx, source: err.into())),
                };
                self.cached = Some((key, parent));
                result
            }
            WhiteoutMode::Delete => {
                let mut rel = join(parents);
                if !rel.is_empty() {
                    rel.push(b'/');
                }
                rel.extend_from_slice(target);
                if self.written.contains(&rel) {
                    return Ok(());
                }
                let parent = match self.walk(parents, false) {
                    Ok(fd) => fd,
                    Err(WalkFail::Missing(_)) => return Ok(()),
                    Err(f) => return Err(self.walk_error(f, parents, label)),
                };
                let cname = std::ffi::CString::new(target).map_err(|_| fail!(InvalidWhiteout, ctx))?;
                remove_entry(parent.as_fd(), &cname, None)
                    .map_err(|source| fail!(Remove, ctx, source: source))
            }
        }
    }

    fn opaque(&mut self, parents: &[&[u8]], label: &str) -> Result<(), ApplyError> {
        let ctx = (self.archive, label);
        let (key, parent) = self.parent(parents, label)?;
        let result = match self.opts.whiteouts {
            WhiteoutMode::Overlay => {
                rfs::fsetxattr(&parent, "trusted.overlay.opaque", b"y", XattrFlags::empty()).map_err(
                    |err| fail!(SetXattr, ctx, name: "trusted.overlay.opaque".into(), source: err.into()),
                )
            }
            WhiteoutMode::Delete => self.clear_unwritten(parent.as_fd(), &key, label),
        };
        self.cached = Some((key, parent));
        result
    }

    /// Removes the children of `dir` (relative path `rel`) that this layer did not write.
    fn clear_unwritten(&self, dir: BorrowedFd<'_>, rel: &[u8], label: &str) -> Result<(), ApplyError> {
        let ctx = (self.archive, label);
        let remove_err = |source: io::Error| fail!(Remove, ctx, source: source);
        let mut reader = rfs::Dir::read_from(dir).map_err(|err| remove_err(err.into()))?;
        let mut doomed = Vec::new();
        while let Some(entry) = reader.read() {
            let entry = entry.map_err(|err| remove_err(err.into()))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let mut child = rel.to_vec();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(name);
            if !self.written.contains(&child) {
                doomed.push((entry.file_name().to_owned(), entry.file_type()));
            }
        }
        for (name, file_type) in doomed {
            remove_entry(dir, &name, Some(file_type)).map_err(remove_err)?;
        }
        Ok(())
    }

    /// Sets the deferred mode and mtime of every directory the archive named.
    fn finish_dirs(&mut self) -> Result<(), ApplyError> {
        self.cached = None;
        let dirs = std::mem::take(&mut self.dirs);
        for (rel, (mode, mtime)) in dirs {
            let comps: Vec<&[u8]> = rel.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect();
            // A directory replaced or removed by a later entry is skipped.
            let Ok(fd) = self.walk(&comps, false) else {
                continue;
            };
            let label = lossy(&rel);
            let ctx = (self.archive, if rel.is_empty() { "." } else { label.as_str() });
            rfs::fchmod(&fd, Mode::from_raw_mode(mode & 0o7777))
                .map_err(|err| fail!(Chmod, ctx, source: err.into()))?;
            rfs::futimens(&fd, &timestamps(mtime)).map_err(|err| fail!(SetTime, ctx, source: err.into()))?;
        }
        Ok(())
    }
}
