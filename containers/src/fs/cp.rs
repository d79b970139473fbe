//! `kiln cp`: copies between the host (or a tar stream) and a container's root, resolved inside
//! the root with `openat2(RESOLVE_IN_ROOT)` and walked relative to descriptors.

use super::*;

/// A root directory paths of a `cp` are resolved in: `/` for the host, the container's
/// `/proc/PID/root` or a [`View`].
#[derive(Debug)]
pub struct CopyRoot {
    fd: OwnedFd,
    place: Place,
}

impl CopyRoot {
    /// Opens `path` as the root for `place`.
    pub fn open(path: &Path, place: Place) -> Result<CopyRoot> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::OpenRoot {
            path: path.to_path_buf(),
            source: rio(e),
        })?;
        Ok(CopyRoot { fd, place })
    }
}

/// Whose uid/gid files written by `cp` get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// The source's (`cp -a`).
    Keep,
    /// These (root's, for files copied into a container).
    Fixed(u32, u32),
    /// The calling process's (files copied to the host).
    Caller,
}

/// Options of [`copy`].
#[derive(Clone, Copy, Debug)]
pub struct CopyOptions {
    /// `-L`: follow a symlink named as the source.
    pub follow_link: bool,
    /// Ownership of what is written.
    pub owner: Owner,
}

/// A path as given, with Docker's meaning of its ending.
struct PathArg {
    /// Components, `.` dropped (`..` kept: the kernel clamps it at the root).
    parts: Vec<String>,
    /// Ends in `/.`: the directory's contents.
    contents: bool,
    /// Ends in `/`: must be a directory.
    dir: bool,
    shown: String,
}

impl PathArg {
    fn parse(p: &str) -> PathArg {
        let contents = p == "." || p.ends_with("/.");
        let dir = p.ends_with('/') || contents;
        let parts = p
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .map(str::to_string)
            .collect();
        PathArg {
            parts,
            contents,
            dir,
            shown: p.to_string(),
        }
    }
}

/// A resolved node: an entry `name` of the directory `parent` (`.` for a directory node).
struct Node {
    parent: OwnedFd,
    name: CString,
    /// `lstat` of the node, `None` if it does not exist.
    stat: Option<FileStat>,
    /// Its path inside the root (for the basename).
    parts: Vec<String>,
}

fn cstring(s: &[u8], place: &Place, shown: &str) -> Result<CString> {
    CString::new(s).map_err(|_| FsError::Resolve {
        place: place.clone(),
        path: shown.to_string(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

/// The type bits of a node's mode (`S_IFDIR`, `S_IFREG`, ...).
fn ftype(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Resolves `parts` in `root`: every component but the last is followed inside the root; the
/// last is followed when `follow`.
fn resolve(root: &CopyRoot, parts: &[String], follow: bool, shown: &str) -> Result<Node> {
    let mut parts = parts.to_vec();
    for _ in 0..40 {
        let rerr = |source: io::Error| FsError::Resolve {
            place: root.place.clone(),
            path: shown.to_string(),
            source,
        };
        let (parent_parts, last) = match parts.split_last() {
            Some((l, rest)) if l != ".." => (rest.to_vec(), l.clone()),
            _ => (parts.clone(), ".".to_string()),
        };
        let parent_path = if parent_parts.is_empty() {
            ".".to_string()
        } else {
            parent_parts.join("/")
        };
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let parent = match nix::fcntl::openat2(&root.fd, parent_path.as_str(), how) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                return Err(FsError::NotFound {
                    place: root.place.clone(),
                    path: shown.to_string(),
                })
            }
            Err(Errno::ENOTDIR) => {
                return Err(FsError::NotADirectory {
                    path: shown.to_string(),
                })
            }
            Err(e) => return Err(rerr(rio(e))),
        };
        let name = cstring(last.as_bytes(), &root.place, shown)?;
        let stat = match fstatat(&parent, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Some(st),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(rerr(rio(e))),
        };
        if follow && stat.as_ref().is_some_and(|s| ftype(s) == SFlag::S_IFLNK) {
            let target = nix::fcntl::readlinkat(&parent, name.as_c_str()).map_err(|e| rerr(rio(e)))?;
            let target = target.to_string_lossy().into_owned();
            let mut next: Vec<String> = if target.starts_with('/') {
                Vec::new()
            } else {
                parent_parts.clone()
            };
            next.extend(
                target
                    .split('/')
                    .filter(|s| !s.is_empty() && *s != ".")
                    .map(str::to_string),
            );
            parts = next;
            continue;
        }
        let mut node_parts = parent_parts;
        if last != "." {
            node_parts.push(last);
        }
        return Ok(Node {
            parent,
            name,
            stat,
            parts: node_parts,
        });
    }
    Err(FsError::SymlinkLoop {
        place: root.place.clone(),
        path: shown.to_string(),
    })
}

/// What an entry is.
enum EntryKind {
    Dir,
    File,
    Symlink(Vec<u8>),
    Hardlink(PathBuf),
    /// A character or block device or a FIFO (its type bits) and its device number.
    Device(SFlag, u64),
}

/// An entry being copied: its metadata (mode is the permission bits).
struct Entry {
    kind: EntryKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
}

trait Sink {
    fn put(&mut self, rel: &Path, e: &Entry, data: &mut dyn Read) -> Result<()>;
    fn finish(&mut self) -> Result<()>;
}

fn entry_of(st: &FileStat, kind: EntryKind) -> Entry {
    Entry {
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: st.st_mtime,
        size: st.st_size.max(0) as u64,
    }
}

/// Emits the node `name` of `parent` (and everything below it) as `out`.
fn walk(
    place: &Place,
    parent: BorrowedFd<'_>,
    name: &CStr,
    out: &Path,
    shown: &Path,
    sink: &mut dyn Sink,
) -> Result<()> {
    let rerr = |source: io::Error| FsError::ReadSource {
        place: place.clone(),
        path: shown.display().to_string(),
        source,
    };
    let st = fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| rerr(rio(e)))?;
    match ftype(&st) {
        SFlag::S_IFDIR => {
            if !out.as_os_str().is_empty() {
                sink.put(out, &entry_of(&st, EntryKind::Dir), &mut io::empty())?;
            }
            let mut dir = nix::dir::Dir::openat(
                parent,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| rerr(rio(e)))?;
            let mut names: Vec<CString> = Vec::new();
            for ent in dir.iter() {
                let ent = ent.map_err(|e| rerr(rio(e)))?;
                let n = ent.file_name();
                if n.to_bytes() != b"." && n.to_bytes() != b".." {
                    names.push(n.to_owned());
                }
            }
            names.sort();
            for n in names {
                let os = OsStr::from_bytes(n.to_bytes());
                walk(place, dir.as_fd(), &n, &out.join(os), &shown.join(os), sink)?;
            }
            Ok(())
        }
        SFlag::S_IFREG => {
            let fd = nix::fcntl::openat(
                parent,
                name,
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
                Mode::empty(),
            )
            .map_err(|e| rerr(rio(e)))?;
            let mut file = fs::File::from(fd).take(st.st_size.max(0) as u64);
            sink.put(out, &entry_of(&st, EntryKind::File), &mut file)
        }
        SFlag::S_IFLNK => {
            let target = nix::fcntl::readlinkat(parent, name).map_err(|e| rerr(rio(e)))?;
            let mut e = entry_of(&st, EntryKind::Symlink(target.into_vec()));
            e.size = 0;
            sink.put(out, &e, &mut io::empty())
        }
        t @ (SFlag::S_IFCHR | SFlag::S_IFBLK | SFlag::S_IFIFO) => {
            let mut e = entry_of(&st, EntryKind::Device(t, st.st_rdev));
            e.size = 0;
            sink.put(out, &e, &mut io::empty())
        }
        // Sockets and anything else are skipped, as tar does.
        _ => Ok(()),
    }
}

/// Writes entries below a destination directory, creating each name relative to descriptors
/// without following symlinks.
struct FsSink {
    base: OwnedFd,
    place: Place,
    shown: String,
    owner: Owner,
    dirs: Vec<(PathBuf, Entry)>,
}

impl FsSink {
    fn werr(&self, rel: &Path, source: io::Error) -> FsError {
        FsError::WriteDest {
            place: self.place.clone(),
            path: format!("{}/{}", self.shown.trim_end_matches('/'), rel.display()),
            source,
        }
    }

    /// The descriptor of `rel`'s parent directory and `rel`'s last name.
    fn parent_of(&self, rel: &Path) -> Result<(OwnedFd, CString)> {
        let mut comps: Vec<&OsStr> = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(s) => comps.push(s),
                _ => return Err(FsError::BadEntryName(rel.display().to_string())),
            }
        }
        let Some((last, dirs)) = comps.split_last() else {
            return Err(FsError::BadEntryName(rel.display().to_string()));
        };
        let mut fd = nix::fcntl::openat(
            &self.base,
            c".",
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.werr(rel, rio(e)))?;
        for d in dirs {
            fd = nix::fcntl::openat(
                &fd,
                *d,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.werr(rel, rio(e)))?;
        }
        let name =
            CString::new(last.as_bytes()).map_err(|_| FsError::BadEntryName(rel.display().to_string()))?;
        Ok((fd, name))
    }

    fn owner_of(&self, e: &Entry) -> Option<(Uid, Gid)> {
        let (u, g) = match self.owner {
            Owner::Keep => (e.uid, e.gid),
            Owner::Fixed(u, g) => (u, g),
            Owner::Caller => return None,
        };
        Some((Uid::from_raw(u), Gid::from_raw(g)))
    }

    /// Removes a non-directory at `name`; refuses to replace a directory with a non-directory.
    fn clear(&self, rel: &Path, dir: &OwnedFd, name: &CStr) -> Result<()> {
        match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if ftype(&st) == SFlag::S_IFDIR => Err(FsError::FileOntoDir {
                path: rel.display().to_string(),
            }),
            Ok(_) => nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
                .map_err(|e| self.werr(rel, rio(e))),
            Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(self.werr(rel, rio(e))),
        }
    }

    /// The access and modification time an entry gets: its mtime.
    fn time(e: &Entry) -> TimeSpec {
        TimeSpec::new(e.mtime, 0)
    }

    fn finish_at(&self, rel: &Path, dir: &OwnedFd, name: &CStr, e: &Entry, symlink: bool) -> Result<()> {
        if let Some((u, g)) = self.owner_of(e) {
            nix::unistd::fchownat(dir, name, Some(u), Some(g), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|err| self.werr(rel, rio(err)))?;
        }
        if !symlink {
            nix::sys::stat::fchmodat(dir, name, mode(e.mode), FchmodatFlags::FollowSymlink)
                .map_err(|err| self.werr(rel, rio(err)))?;
        }
        let t = Self::time(e);
        utimensat(dir, name, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(|err| self.werr(rel, rio(err)))
    }
}

impl Sink for FsSink {
    fn put(&mut self, rel: &Path, e: &Entry, data: &mut dyn Read) -> Result<()> {
        let (dir, name) = self.parent_of(rel)?;
        match &e.kind {
            EntryKind::Dir => {
                match fstatat(&dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) if ftype(&st) == SFlag::S_IFDIR => {}
                    Ok(_) => {
                        return Err(FsError::DirOntoFile {
                            path: rel.display().to_string(),
                        })
                    }
                    Err(Errno::ENOENT) => {
                        nix::sys::stat::mkdirat(&dir, name.as_c_str(), mode(0o700))
                            .map_err(|err| self.werr(rel, rio(err)))?;
                    }
                    Err(err) => return Err(self.werr(rel, rio(err))),
                }
                self.dirs.push((
                    rel.to_path_buf(),
                    Entry {
                        kind: EntryKind::Dir,
                        ..*e
                    },
                ));
                Ok(())
            }
            EntryKind::File => {
                self.clear(rel, &dir, &name)?;
                let fd = nix::fcntl::openat(
                    &dir,
                    name.as_c_str(),
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    mode(0o600),
                )
                .map_err(|err| self.werr(rel, rio(err)))?;
                let mut f = fs::File::from(fd);
                io::copy(data, &mut f).map_err(|err| self.werr(rel, err))?;
                if let Some((u, g)) = self.owner_of(e) {
                    nix::unistd::fchown(&f, Some(u), Some(g)).map_err(|err| self.werr(rel, rio(err)))?;
                }
                nix::sys::stat::fchmod(&f, mode(e.mode)).map_err(|err| self.werr(rel, rio(err)))?;
                let t = Self::time(e);
                nix::sys::stat::futimens(&f, &t, &t).map_err(|err| self.werr(rel, rio(err)))
            }
            EntryKind::Symlink(target) => {
                self.clear(rel, &dir, &name)?;
                let target = CString::new(target.clone())
                    .map_err(|_| FsError::BadEntryName(rel.display().to_string()))?;
                nix::unistd::symlinkat(target.as_c_str(), &dir, name.as_c_str())
                    .map_err(|err| self.werr(rel, rio(err)))?;
                self.finish_at(rel, &dir, &name, e, true)
            }
            EntryKind::Hardlink(to) => {
                self.clear(rel, &dir, &name)?;
                let (tdir, tname) = self.parent_of(to)?;
                nix::unistd::linkat(&tdir, tname.as_c_str(), &dir, name.as_c_str(), AtFlags::empty())
                    .map_err(|err| self.werr(rel, rio(err)))
            }
            EntryKind::Device(t, rdev) => {
                self.clear(rel, &dir, &name)?;
                mknodat(&dir, name.as_c_str(), *t, mode(0o600), *rdev)
                    .map_err(|err| self.werr(rel, rio(err)))?;
                self.finish_at(rel, &dir, &name, e, false)
            }
        }
    }

    fn finish(&mut self) -> Result<()> {
        let dirs = std::mem::take(&mut self.dirs);
        for (rel, e) in dirs.iter().rev() {
            let (dir, name) = self.parent_of(rel)?;
            self.finish_at(rel, &dir, &name, e, false)?;
        }
        Ok(())
    }
}

/// Writes entries as a tar stream.
struct TarSink<W: Write> {
    b: tar::Builder<W>,
}

impl<W: Write> Sink for TarSink<W> {
    fn put(&mut self, rel: &Path, e: &Entry, data: &mut dyn Read) -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(e.uid.into());
        h.set_gid(e.gid.into());
        h.set_mtime(e.mtime.max(0) as u64);
        h.set_size(0);
        let r = match &e.kind {
            EntryKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                self.b.append_data(&mut h, rel, io::empty())
            }
            EntryKind::File => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(e.size);
                self.b.append_data(&mut h, rel, data)
            }
            EntryKind::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                self.b.append_link(&mut h, rel, OsStr::from_bytes(target))
            }
            EntryKind::Hardlink(to) => {
                h.set_entry_type(tar::EntryType::Link);
                self.b.append_link(&mut h, rel, to)
            }
            EntryKind::Device(t, rdev) => {
                h.set_entry_type(match *t {
                    SFlag::S_IFCHR => tar::EntryType::Char,
                    SFlag::S_IFBLK => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                // Both fit in 32 bits (Linux's `dev_t` layout).
                let _ = h.set_device_major(nix::sys::stat::major(*rdev) as u32);
                let _ = h.set_device_minor(nix::sys::stat::minor(*rdev) as u32);
                self.b.append_data(&mut h, rel, io::empty())
            }
        };
        r.map_err(FsError::WriteTar)
    }

    fn finish(&mut self) -> Result<()> {
        self.b.finish().map_err(FsError::WriteTar)
    }
}

/// Feeds a tar stream's entries to a sink.
fn read_tar(input: &mut dyn Read, sink: &mut dyn Sink) -> Result<()> {
    let mut archive = tar::Archive::new(input);
    let entries = archive.entries().map_err(FsError::ReadTar)?;
    for entry in entries {
        let mut entry = entry.map_err(FsError::ReadTar)?;
        let raw = entry.path_bytes().into_owned();
        let rel = clean_entry_name(&raw)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let h = entry.header();
        let mut e = Entry {
            kind: EntryKind::Dir,
            mode: h.mode().map_err(FsError::ReadTar)? & 0o7777,
            uid: h.uid().map_err(FsError::ReadTar)? as u32,
            gid: h.gid().map_err(FsError::ReadTar)? as u32,
            mtime: h.mtime().map_err(FsError::ReadTar)? as i64,
            size: entry.size(),
        };
        let link = || -> Result<Vec<u8>> {
            Ok(entry
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default())
        };
        e.kind = match h.entry_type() {
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Symlink => EntryKind::Symlink(link()?),
            tar::EntryType::Link => EntryKind::Hardlink(clean_entry_name(&link()?)?),
            t @ (tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo) => {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let ft = match t {
                    tar::EntryType::Char => SFlag::S_IFCHR,
                    tar::EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                EntryKind::Device(ft, nix::sys::stat::makedev(major.into(), minor.into()))
            }
            // PAX/GNU headers are consumed by the reader; other kinds are skipped.
            _ => continue,
        };
        sink.put(&rel, &e, &mut entry)?;
    }
    sink.finish()
}

fn clean_entry_name(raw: &[u8]) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir | Component::RootDir => {}
            _ => return Err(FsError::BadEntryName(String::from_utf8_lossy(raw).into_owned())),
        }
    }
    Ok(out)
}

/// Where the copy goes inside the destination directory.
enum Target {
    /// The source itself, under this name.
    Named(CString),
    /// The source directory's entries.
    Contents,
}

/// A resolved source.
struct Source {
    node: Node,
    stat: FileStat,
    contents: bool,
}

fn resolve_source(root: &CopyRoot, src: &str, follow: bool) -> Result<Source> {
    let arg = PathArg::parse(src);
    let node = resolve(root, &arg.parts, follow || arg.dir, &arg.shown)?;
    let Some(stat) = node.stat else {
        return Err(FsError::NotFound {
            place: root.place.clone(),
            path: arg.shown,
        });
    };
    let is_dir = ftype(&stat) == SFlag::S_IFDIR;
    if arg.dir && !is_dir {
        return Err(FsError::NotADirectory { path: arg.shown });
    }
    // The root itself has no name to copy under: its contents are copied.
    let contents = is_dir && (arg.contents || node.parts.is_empty());
    Ok(Source { node, stat, contents })
}

/// Picks the destination directory and how the source lands in it, by Docker's rules.
fn resolve_dest(
    root: &CopyRoot,
    dst: &str,
    src_is_dir: bool,
    src_contents: bool,
    src_name: &CStr,
) -> Result<(OwnedFd, Target)> {
    let arg = PathArg::parse(dst);
    let node = resolve(root, &arg.parts, true, &arg.shown).map_err(|e| match e {
        FsError::NotFound { .. } => FsError::NoSuchDirectory {
            path: arg.shown.clone(),
        },
        other => other,
    })?;
    let open_dir = |n: &Node| {
        nix::fcntl::openat(
            &n.parent,
            n.name.as_c_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::WriteDest {
            place: root.place.clone(),
            path: arg.shown.clone(),
            source: rio(e),
        })
    };
    match node.stat {
        Some(st) if ftype(&st) == SFlag::S_IFDIR => {
            let dir = open_dir(&node)?;
            if src_contents {
                Ok((dir, Target::Contents))
            } else {
                Ok((dir, Target::Named(src_name.to_owned())))
            }
        }
        Some(_) => {
            if src_is_dir {
                Err(FsError::DirOntoFile { path: arg.shown })
            } else if arg.dir {
                Err(FsError::NotADirectory { path: arg.shown })
            } else {
                Ok((node.parent, Target::Named(node.name)))
            }
        }
        None => {
            if (arg.dir && !src_is_dir) || node.name.as_bytes() == b"." {
                Err(FsError::NoSuchDirectory { path: arg.shown })
            } else {
                Ok((node.parent, Target::Named(node.name)))
            }
        }
    }
}

/// `cp` between two roots (host and container): copies `src` (resolved in `from`) to `dst`
/// (resolved in `to`) with Docker's rules: a file onto a file replaces it, into a directory
/// keeps its name; a directory to a missing path becomes that path; to an existing directory it
/// is copied into it, or only its contents with `SRC/.`.
pub fn copy(from: &CopyRoot, src: &str, to: &CopyRoot, dst: &str, opts: CopyOptions) -> Result<()> {
    let s = resolve_source(from, src, opts.follow_link)?;
    let is_dir = ftype(&s.stat) == SFlag::S_IFDIR;
    let base = s.node.parts.last().map(String::as_str).unwrap_or(".");
    let base = cstring(base.as_bytes(), &from.place, src)?;
    let (dir, target) = resolve_dest(to, dst, is_dir, s.contents, &base)?;
    let mut sink = FsSink {
        base: dir,
        place: to.place.clone(),
        shown: dst.to_string(),
        owner: opts.owner,
        dirs: Vec::new(),
    };
    emit(from, &s, target, src, &mut sink)?;
    sink.finish()
}

fn emit(from: &CopyRoot, s: &Source, target: Target, src: &str, sink: &mut dyn Sink) -> Result<()> {
    match target {
        Target::Named(name) => {
            let out = PathBuf::from(OsStr::from_bytes(name.to_bytes()));
            walk(
                &from.place,
                s.node.parent.as_fd(),
                &s.node.name,
                &out,
                Path::new(src),
                sink,
            )
        }
        Target::Contents => {
            // The walk of the directory itself with an empty output name emits only its entries.
            walk(
                &from.place,
                s.node.parent.as_fd(),
                &s.node.name,
                Path::new(""),
                Path::new(src),
                sink,
            )
        }
    }
}

/// `cp SRC -`: writes `src` (resolved in `from`) as a tar: entries named after its basename, or
/// its contents for `SRC/.`.
pub fn copy_to_tar<W: Write>(from: &CopyRoot, src: &str, follow_link: bool, out: W) -> Result<()> {
    let s = resolve_source(from, src, follow_link)?;
    let target = if s.contents {
        Target::Contents
    } else {
        let base = s.node.parts.last().map(String::as_str).unwrap_or(".");
        Target::Named(cstring(base.as_bytes(), &from.place, src)?)
    };
    let mut sink = TarSink {
        b: tar::Builder::new(out),
    };
    emit(from, &s, target, src, &mut sink)?;
    sink.finish()
}

/// `cp - DEST`: extracts a tar into the existing directory `dst` (resolved in `to`).
pub fn copy_from_tar<R: Read>(input: R, to: &CopyRoot, dst: &str, owner: Owner) -> Result<()> {
    let arg = PathArg::parse(dst);
    let node = resolve(to, &arg.parts, true, &arg.shown)?;
    match node.stat {
        Some(st) if ftype(&st) == SFlag::S_IFDIR => {}
        Some(_) => return Err(FsError::NotADirectory { path: arg.shown }),
        None => return Err(FsError::NoSuchDirectory { path: arg.shown }),
    }
    let dir = nix::fcntl::openat(
        &node.parent,
        node.name.as_c_str(),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| FsError::WriteDest {
        place: to.place.clone(),
        path: arg.shown.clone(),
        source: rio(e),
    })?;
    let mut sink = FsSink {
        base: dir,
        place: to.place.clone(),
        shown: dst.to_string(),
        owner,
        dirs: Vec::new(),
    };
    let mut input = input;
    read_tar(&mut input, &mut sink)
}

/// Turns an `OsString` file name into a `String` for messages.
#[allow(dead_code)]
fn shown_name(n: OsString) -> String {
    String::from_utf8_lossy(&n.into_vec()).into_owned()
}
