//! Reading a layer tar entry by entry (ustar, PAX and GNU headers merged) and the path rules every
//! entry obeys; shared by [`super::apply`] and [`super::check`], so both see the same entries.
//!
//! Path rules, Docker's (`filepath.Clean` of the name, then joined under the destination): a
//! leading `/` is dropped, `.` and empty components vanish, `..` removes the component before
//! it. A `..` with nothing before it is an error in a relative name (it would climb out) and is
//! dropped in an absolute one (`/..` is `/`). Hard link targets follow the same rules.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};

use kiln_dag::Digest;
use sha2::{Digest as _, Sha256};

use super::error::ApplyError;
use super::tarfmt::{self, Kind, BLOCK};

/// A reader that counts what goes through it and, unless told not to, hashes it.
struct HashReader<R> {
    inner: R,
    hasher: Option<Sha256>,
    count: u64,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }
}

/// One entry, its headers merged.
pub(super) struct Entry {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, u32),
    pub dev: (u32, u32),
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    /// Bytes of data and padding that follow this entry's header.
    pub fn all_data(&self) -> u64 {
        self.size + tarfmt::padding(self.size) as u64
    }

    /// Bytes of data (and padding) that follow this entry's header that are not file content:
    /// everything for non-regular entries (their `size` is ignored, as tar readers do).
    pub fn skipped_data(&self) -> u64 {
        let padding = tarfmt::padding(self.size) as u64;
        if self.kind == Kind::Regular {
            padding
        } else {
            self.size + padding
        }
    }
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

/// Largest entry size accepted: Go's archive/tar (and so Docker) reads sizes as int64; larger
/// ones could only overflow the arithmetic on them.
const MAX_SIZE: u64 = i64::MAX as u64;

/// Builds an [`ApplyError`] variant from an `(archive, entry)` context.
macro_rules! fail {
    ($variant:ident, $ctx:expr $(, $field:ident : $value:expr)* $(,)?) => {
        ApplyError::$variant { archive: $ctx.0.to_string(), entry: $ctx.1.to_string() $(, $field: $value)* }
    };
}
pub(super) use fail;

pub(super) fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What a whiteout entry `.wh.TARGET` asks for, by Docker's rules; shared by [`super::apply`]
/// and [`super::check`], so both accept and refuse the same whiteouts.
pub(super) enum Whiteout<'a> {
    /// `.wh..wh..opq`: the parent directory is opaque.
    Opaque,
    /// Other AUFS metadata (`.wh..wh.plnk`, `.wh..wh.aufs`): nothing to apply.
    Aufs,
    /// `.wh.NAME`: NAME is removed (hidden from lower layers).
    Remove(&'a [u8]),
}

impl Whiteout<'_> {
    /// Classifies `target` (the entry name after `.wh.`); a bare `.wh.`, `.wh..` or `.wh...` is
    /// an invalid whiteout of the entry `ctx` names (archive, entry).
    pub(super) fn of<'a>(target: &'a [u8], ctx: (&str, &str)) -> Result<Whiteout<'a>, ApplyError> {
        if target == b".wh..opq" {
            Ok(Whiteout::Opaque)
        } else if target.starts_with(b".wh.") {
            Ok(Whiteout::Aufs)
        } else if target.is_empty() || target == b"." || target == b".." {
            Err(fail!(InvalidWhiteout, ctx))
        } else {
            Ok(Whiteout::Remove(target))
        }
    }
}

/// The relative path of `name` inside the directory `parents`.
pub(super) fn join_child(parents: &[&[u8]], name: &[u8]) -> Vec<u8> {
    let mut rel = join(parents);
    if !rel.is_empty() {
        rel.push(b'/');
    }
    rel.extend_from_slice(name);
    rel
}

pub(super) fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&b'/')
}

/// The entries of a tar stream, read once, front to back; every byte is hashed.
pub(super) struct Entries<'a, R: Read> {
    pub archive: &'a str,
    max_header_size: u64,
    input: BufReader<HashReader<R>>,
    /// Entries returned so far (PAX and GNU headers not counted).
    pub count: u64,
}

impl<'a, R: Read> Entries<'a, R> {
    /// Entries of `reader`; with `hash`, [`Entries::finish`] gives the stream's sha256.
    pub fn new(reader: R, archive: &'a str, max_header_size: u64, hash: bool) -> Self {
        Entries {
            archive,
            max_header_size,
            input: BufReader::with_capacity(
                256 * 1024,
                HashReader {
                    inner: reader,
                    hasher: hash.then(Sha256::new),
                    count: 0,
                },
            ),
            count: 0,
        }
    }

    /// Reads the rest of the stream (what follows the end-of-archive blocks counts too) and
    /// returns the sha256 (when hashing) and size of everything read.
    pub fn finish(mut self) -> Result<(Option<Digest>, u64), ApplyError> {
        io::copy(&mut self.input, &mut io::sink())
            .map_err(|source| fail!(Read, (self.archive, "end of archive"), source: source))?;
        let hashed = self.input.into_inner();
        Ok((hashed.hasher.map(|h| Digest(h.finalize().into())), hashed.count))
    }

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
    pub fn pump(&mut self, mut n: u64, mut sink: Option<&mut File>, entry: &str) -> Result<(), ApplyError> {
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

    /// Reads the data of an extended header (`size` was checked against the cap).
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

    /// The next entry and its label (its name, for messages), or `None` at the end of the
    /// archive (a zero block, or the end of the stream). The caller consumes the entry's data
    /// with [`Entries::pump`] before asking for the next one.
    pub fn next_entry(&mut self) -> Result<Option<(Entry, String)>, ApplyError> {
        let mut pending = Pending::default();
        let mut block = [0u8; BLOCK];
        loop {
            let offset = self.input.get_ref().count - self.input.buffer().len() as u64;
            if !self.read_block(&mut block)? || block.iter().all(|&b| b == 0) {
                return Ok(None);
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
                if header_size > self.max_header_size {
                    return Err(fail!(HeaderTooLarge, ctx, size: header_size, limit: self.max_header_size));
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
            let size = pending.size.unwrap_or(header_size);
            if size > MAX_SIZE {
                return Err(fail!(BadHeaderField, ctx, field: "size"));
            }
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
                size,
                mtime,
                dev,
                xattrs: std::mem::take(&mut pending.xattrs),
            };
            self.count += 1;
            return Ok(Some((entry, label)));
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
}

/// The components of an entry name or hard link target under the destination (see the module
/// docs), or `None` when a relative name climbs out with `..`.
pub(super) fn clean_components(path: &[u8]) -> Option<Vec<&[u8]>> {
    let absolute = path.first() == Some(&b'/');
    let mut out: Vec<&[u8]> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() && !absolute {
                    return None;
                }
            }
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::clean_components;

    fn clean(p: &str) -> Option<String> {
        clean_components(p.as_bytes()).map(|c| String::from_utf8(c.join(&b'/')).unwrap())
    }

    #[test]
    fn names_are_cleaned_as_docker_does() {
        assert_eq!(clean("a/b"), Some("a/b".into()));
        assert_eq!(clean("./a//b/."), Some("a/b".into()));
        assert_eq!(clean("/etc/passwd"), Some("etc/passwd".into()));
        assert_eq!(clean("///x"), Some("x".into()));
        assert_eq!(clean("a/../b"), Some("b".into()));
        assert_eq!(clean("/../../etc/x"), Some("etc/x".into()));
        assert_eq!(clean("/"), Some("".into()));
        assert_eq!(clean("../x"), None);
        assert_eq!(clean("a/../../x"), None);
        assert_eq!(clean(".."), None);
    }
}
