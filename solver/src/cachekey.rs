//! Cache keys: what a vertex's result is looked up and recorded under.
//!
//! A vertex's [`Digest`] says *what the op is*; its [`CacheKey`] says *what
//! result it produces*, so it also covers what the op read. Keys are blake3 hashes (internal
//! only, never shown to a registry) of the material below, fed in this order with fixed-width
//! lengths and a tag byte before every optional part, so no two different inputs can encode the
//! same byte stream.
//!
//! | part | what goes in | why |
//! | --- | --- | --- |
//! | domain | the bytes `kiln cache key` and [`KEY_VERSION`] | a change in this layout invalidates every old key instead of silently matching it |
//! | op | [`op_identity`]: sha256 of the op's canonical encoding without its inputs' digests; for an image source, its platform and its layers' diff IDs (`Executor::key_identity`) | the command, env, mounts, copy flags, platform…: anything that changes the result is an op field; inputs count through their keys, so a base image re-imported, pulled under another tag or digest, or mirrored keeps every key after it |
//! | inputs | the number of key inputs, then each input's cache key, in input order | an input rebuilt to a different result changes every key downstream; order matters (mount 0 vs 1) |
//! | content | `0`, or `1` and the content key the op computed from the files it reads | every COPY/ADD is keyed by the bytes, modes and owners of the files it can select, never by the vertex that made them: touching a file or changing an unrelated one keeps the key, and so does a source stage that runs again and gives the same files |
//!
//! The content key of a file op (`engine::content_key`): for each copy action, in order, its
//! source input position and source path, then
//!
//! | source | content key material | why |
//! | --- | --- | --- |
//! | a local context | the index entries (path, type, mode, owner, link target, blake3 of the content) at and below the source's literal prefix, and below the symlinks met there | the context is read in place; its stat cache makes an unchanged context cost one `lstat` per path |
//! | a filesystem: another stage, an image, a heredoc, a Git or HTTP source (`engine/contentkey.rs`) | the same, read from the layers' merged view: path below the prefix, type, mode, owner, device, size, symlink target, blake3 of the content; no mtime, like BuildKit's content hash | `COPY --from=stage` after the stage ran again (`--no-cache`, `--no-cache-filter`, a RUN edited to give the same files) keeps its key and everything after it stays cached; a `--no-cache` build's results are found by the next plain build |
//!
//! Layers are immutable per diff ID, so the filesystem case is remembered under
//! `ROOT/cache/selection/<hash of prefix + diff IDs>`: a copy from a cached stage gets its key
//! without unpacking or reading anything.
//!
//! The content key of a remote source (see `engine/remote.rs`):
//!
//! | source | content key material | why |
//! | --- | --- | --- |
//! | Git (`ADD git-url`, a Git named context) | `git`, the commit SHA the ref resolves to (`git ls-remote`; a full SHA is used as is, no network), the subdir, the keep-git-dir flag | a moved branch or tag changes the key; an unchanged repository costs one `ls-remote` and no fetch; cloning again (new mtimes) never does |
//! | HTTP with `--checksum` | `http`, `checksum`, the pinned digest | no request at all, as BuildKit; the download is verified against it when it runs |
//! | HTTP without a checksum | `http`, `content`, the sha256 of the bytes the URL serves now, `Last-Modified` (seconds) when sent | BuildKit re-checks the URL every build: with an ETag remembered under `ROOT/cache/http/` the check is a conditional request (`304` = same digest, no download); the mtime is in the layer, so it is in the key too |
//!
//! The URL, remote, ref, file name, mode and owner are op fields, so they are in the op part.
//!
//! Inputs the op reads by content (see [`crate::scheduler::Executor::content_inputs`]) are left
//! out of the `inputs` part: the content key replaces them, which is the point of it.
//!
//! A local source (the build context, a local named context) is never looked up: it is read
//! on every build (BuildKit transfers it on every build), so `[internal] load build context` is
//! never shown as cached; its content key is what its users see of it.
//!
//! Never in a key: an mtime, an absolute host path (the context directory, the store root), an
//! image tag (only a resolved digest, inside the op), a secret's or SSH agent's value (only the
//! mount id is in the op), the vertex's progress name, stage name or source location (metadata),
//! or `ignore_cache` (which changes whether we look, not what we would find).

use std::fmt;

use kiln_dag::Digest;

/// Bumped whenever the layout in the module table changes.
pub const KEY_VERSION: u32 = 2;

/// A 32-byte blake3 cache key, displayed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// Hashes arbitrary key material (for content keys computed by ops) with blake3.
    pub fn of(bytes: &[u8]) -> CacheKey {
        CacheKey(*blake3::hash(bytes).as_bytes())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl From<blake3::Hash> for CacheKey {
    fn from(h: blake3::Hash) -> CacheKey {
        CacheKey(*h.as_bytes())
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", &self.hex()[..12])
    }
}

/// The op part of a vertex's key: sha256 of the canonical encoding of its op alone, without the
/// digests of its inputs (which enter the key through their own keys: an input made by other
/// means, a base image pulled under another name, gives the same key when it gives the same
/// result).
pub fn op_identity(v: &kiln_dag::Vertex) -> Digest {
    kiln_dag::Vertex {
        op: v.op.clone(),
        inputs: Vec::new(),
        meta: kiln_dag::Meta::default(),
    }
    .digest()
}

/// The cache key of a vertex: its op digest, the keys of the inputs it does not read by content,
/// and the content key if it has one (see the module table).
pub fn compute(op_digest: &Digest, input_keys: &[CacheKey], content: Option<&CacheKey>) -> CacheKey {
    let mut h = blake3::Hasher::new();
    h.update(b"kiln cache key\0");
    h.update(&KEY_VERSION.to_le_bytes());
    h.update(&op_digest.0);
    h.update(&(input_keys.len() as u64).to_le_bytes());
    for k in input_keys {
        h.update(&k.0);
    }
    match content {
        None => {
            h.update(&[0]);
        }
        Some(c) => {
            h.update(&[1]);
            h.update(&c.0);
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> CacheKey {
        CacheKey([b; 32])
    }

    #[test]
    fn every_part_changes_the_key() {
        let d = Digest::of(b"op");
        let base = compute(&d, &[k(1), k(2)], None);
        assert_eq!(base, compute(&d, &[k(1), k(2)], None));
        assert_ne!(base, compute(&Digest::of(b"other"), &[k(1), k(2)], None));
        assert_ne!(base, compute(&d, &[k(2), k(1)], None), "input order matters");
        assert_ne!(base, compute(&d, &[k(1)], None));
        assert_ne!(base, compute(&d, &[k(1), k(2)], Some(&k(3))));
        assert_ne!(
            compute(&d, &[k(1), k(2)], Some(&k(3))),
            compute(&d, &[k(1), k(2)], Some(&k(4)))
        );
    }

    #[test]
    fn content_is_not_confused_with_an_input() {
        let d = Digest::of(b"op");
        assert_ne!(
            compute(&d, &[k(1), k(3)], None),
            compute(&d, &[k(1)], Some(&k(3)))
        );
    }

    #[test]
    fn hex_display() {
        let key = CacheKey::of(b"abc");
        assert_eq!(key.to_string(), blake3::hash(b"abc").to_hex().to_string());
        assert_eq!(key.to_string().len(), 64);
    }
}
