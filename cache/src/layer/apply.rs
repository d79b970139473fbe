//! Applying a layer tar to a directory, whiteouts honoured, nothing ever written outside it.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags};
use rustix::io::Errno;

use super::entries::{clean_components, fail, join, join_child, lossy, Entries, Entry, Whiteout};
use super::error::ApplyError;
use super::fsutil::{dir_flags, remove_entry};
use super::tarfmt::Kind;
use super::{ApplyOptions, ApplyStats, WhiteoutMode};

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
/// Whiteouts follow `opts.whiteouts`. Names are cleaned as Docker cleans them (a leading `/` is
/// dropped, `..` removes the component before it); names or hardlink targets that climb out with
/// `..`, entries whose parent is a symlink, and hardlinks through a symlink are errors, and so are
/// device nodes without privilege. An xattr the filesystem does not support or refuses (ENOTSUP,
/// EPERM) is skipped, as Docker skips it. The returned digest covers every byte of the stream, so
/// it is the layer's diff ID. [`super::check`] tells, without writing, whether this succeeds.
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
        input: Entries::new(reader, &opts.archive_name, opts.max_header_size, true),
        root,
        cached: None,
        written: HashSet::new(),
        dirs: HashMap::new(),
    };
    while let Some((entry, label)) = applier.input.next_entry()? {
        applier.entry(entry, &label)?;
    }
    applier.finish_dirs()?;
    let entries = applier.input.count;
    let (diff_id, size) = applier.input.finish()?;
    Ok(ApplyStats {
        // Always hashed here.
        diff_id: diff_id.unwrap_or(kiln_dag::Digest([0; 32])),
        size,
        entries,
    })
}

struct Applier<'a, R: Read> {
    archive: &'a str,
    opts: &'a ApplyOptions,
    input: Entries<'a, R>,
    root: OwnedFd,
    /// The parent directory of the last entry, by its relative path.
    cached: Option<(Vec<u8>, OwnedFd)>,
    /// Paths this layer wrote (Delete mode only): whiteouts and opaque markers spare them.
    written: HashSet<Vec<u8>>,
    /// Directory mode and mtime to set once everything is written, by relative path.
    dirs: HashMap<Vec<u8>, (u32, (i64, u32))>,
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

/// Whether a failed xattr write is one Docker's applier skips: the filesystem does not support
/// the attribute, or refuses it (a `user.` attribute on a symlink, a `trusted.` one unprivileged).
fn xattr_skippable(err: Errno) -> bool {
    err == Errno::NOTSUP || err == Errno::PERM
}

impl<R: Read> Applier<'_, R> {
    /// Splits an entry name into components, cleaned as Docker does; `..` climbing out refused.
    fn components<'p>(&self, path: &'p [u8], label: &str) -> Result<Vec<&'p [u8]>, ApplyError> {
        clean_components(path).ok_or_else(|| fail!(DotDot, (self.archive, label)))
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

    fn pump(&mut self, n: u64, sink: Option<&mut File>, label: &str) -> Result<(), ApplyError> {
        self.input.pump(n, sink, label)
    }

    fn entry(&mut self, e: Entry, label: &str) -> Result<(), ApplyError> {
        let comps = self.components(&e.path, label)?;
        let Some((&name, parents)) = comps.split_last() else {
            if e.kind != Kind::Dir {
                return Err(fail!(RootNotDirectory, (self.archive, label)));
            }
            let root = rfs::openat(&self.root, c".", dir_flags(), Mode::empty())
                .map_err(|err| fail!(Create, (self.archive, label), source: err.into()))?;
            self.owner_and_xattrs(root.as_fd(), None, &e, label)?;
            self.dirs.insert(Vec::new(), (e.mode, e.mtime));
            return self.pump(e.all_data(), None, label);
        };
        if let Some(target) = name.strip_prefix(b".wh.") {
            self.whiteout(parents, target, label)?;
            return self.pump(e.all_data(), None, label);
        }
        let (key, parent) = self.parent(parents, label)?;
        let result = self.create(parent.as_fd(), name, &e, label, &comps);
        self.cached = Some((key, parent));
        result?;
        if self.opts.whiteouts == WhiteoutMode::Delete {
            self.written.insert(join(&comps));
        }
        self.pump(e.skipped_data(), None, label)
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
        // An absolute target names a path of the image, as an absolute entry name does.
        let comps = clean_components(&e.link).ok_or_else(escapes)?;
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
            match set {
                Ok(()) => {}
                Err(err) if xattr_skippable(err) => {
                    tracing::debug!(archive = self.archive, entry = label, xattr = %lossy(key), %err, "xattr skipped");
                }
                Err(err) => return Err(fail!(SetXattr, ctx, name: lossy(key), source: err.into())),
            }
        }
        Ok(())
    }

    fn whiteout(&mut self, parents: &[&[u8]], target: &[u8], label: &str) -> Result<(), ApplyError> {
        let ctx = (self.archive, label);
        let target = match Whiteout::of(target, ctx)? {
            Whiteout::Opaque => return self.opaque(parents, label),
            Whiteout::Aufs => return Ok(()),
            Whiteout::Remove(target) => target,
        };
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
                if self.written.contains(&join_child(parents, target)) {
                    return Ok(());
                }
                let parent = match self.walk(parents, false) {
                    Ok(fd) => fd,
                    Err(WalkFail::Missing(_)) => return Ok(()),
                    Err(f) => return Err(self.walk_error(f, parents, label)),
                };
                let cname = std::ffi::CString::new(target).map_err(|_| fail!(InvalidWhiteout, ctx))?;
                // The removed tree may hold the cached parent directory.
                self.cached = None;
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
                let name = super::opaque_xattr();
                rfs::fsetxattr(&parent, name, b"y", XattrFlags::empty())
                    .map_err(|err| fail!(SetXattr, ctx, name: name.into(), source: err.into()))
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
