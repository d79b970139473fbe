//! The build graph IR shared by the frontend (which produces it) and the solver (which runs it).
//!
//! A [`Graph`] is a set of [`Vertex`]es, each an [`Op`] plus the digests of its inputs. A vertex's
//! [`Digest`] is the sha256 of its canonical encoding ([`Vertex::encode`]): the op's fields and its
//! inputs' digests, in a fixed order, and nothing else. Descriptions, progress names and source
//! lines live in [`Meta`], outside the digest, so rewording a step never invalidates it.
//!
//! Architecture invariant: this crate does no I/O and knows nothing of Dockerfiles, the store or
//! the kernel. It is plain data plus hashing.
#![forbid(unsafe_code)]

pub mod image;
mod ops;
pub mod platform;
pub mod units;
pub use platform::{Platform, PlatformError};

pub use ops::*;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A sha256 digest, displayed as `sha256:<64 hex>`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Hashes `bytes` with sha256.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// The 64 lowercase hex characters, without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let hex_part = s
            .strip_prefix("sha256:")
            .ok_or_else(|| DigestError(s.to_string()))?;
        if hex_part.len() != 64
            || !hex_part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError(s.to_string()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| DigestError(s.to_string()))?;
        Ok(Digest(out))
    }
}

/// A string that is not a valid `sha256:` digest.
#[derive(Debug, thiserror::Error)]
#[error("invalid digest `{0}`: expected sha256:<64 lowercase hex digits>")]
pub struct DigestError(pub String);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 71];
        f.write_str(self.write_prefixed(&mut buf))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", &self.hex()[..12])
    }
}

impl Digest {
    /// `sha256:<hex>` written into a stack buffer (no allocation: vertex encoding hashes one per
    /// input, thousands per graph).
    fn write_prefixed<'a>(&self, buf: &'a mut [u8; 71]) -> &'a str {
        buf[..7].copy_from_slice(b"sha256:");
        // Cannot fail: the output slice is exactly twice the input's length.
        let _ = hex::encode_to_slice(self.0, &mut buf[7..]);
        std::str::from_utf8(&buf[..]).unwrap_or("")
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 71];
        s.serialize_str(self.write_prefixed(&mut buf))
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Where in the Dockerfile a vertex came from. Metadata: never part of a digest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceLocation {
    pub file: String,
    pub start_line: u32,
    pub end_line: u32,
}

/// Everything about a vertex that is not its identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Progress name, e.g. `[build 3/5] RUN make`.
    pub name: String,
    /// The stage this vertex belongs to (for `--no-cache-filter`), if any.
    pub stage: Option<String>,
    pub location: Option<SourceLocation>,
    /// Ignore any cached result for this vertex (`--no-cache`, `--no-cache-filter`).
    pub ignore_cache: bool,
}

/// One node of the graph: an op and the vertices whose results it reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vertex {
    pub op: Op,
    /// Input vertices, referred to by position from inside the op (e.g. [`Mount::input`]).
    pub inputs: Vec<Digest>,
    pub meta: Meta,
}

/// What a digest covers: the op and the inputs, never the metadata.
#[derive(Serialize)]
struct Canonical<'a> {
    v: u32,
    op: &'a Op,
    inputs: &'a [Digest],
}

impl Vertex {
    /// The canonical encoding: compact JSON of `{v, op, inputs}` with fields in declaration order
    /// and maps ordered by key (all maps in ops are `BTreeMap`s), so equal ops encode equally.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(&Canonical {
            v: ENCODING_VERSION,
            op: &self.op,
            inputs: &self.inputs,
        })
        .unwrap_or_default()
    }

    /// sha256 of [`Vertex::encode`].
    pub fn digest(&self) -> Digest {
        Digest::of(&self.encode())
    }
}

/// Bumped whenever the meaning of an encoded op changes, so old cache entries stop matching.
pub const ENCODING_VERSION: u32 = 1;

/// A DAG of vertices keyed by digest. Identical vertices are stored once.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Graph {
    pub vertices: BTreeMap<Digest, Vertex>,
}

impl Graph {
    /// Adds a vertex (all its inputs must already be in the graph) and returns its digest. Adding
    /// an identical op twice returns the same digest; the first metadata wins, except that
    /// `ignore_cache` is sticky.
    pub fn add(&mut self, vertex: Vertex) -> Digest {
        debug_assert!(vertex.inputs.iter().all(|d| self.vertices.contains_key(d)));
        let digest = vertex.digest();
        match self.vertices.get_mut(&digest) {
            Some(existing) => existing.meta.ignore_cache |= vertex.meta.ignore_cache,
            None => {
                self.vertices.insert(digest, vertex);
            }
        }
        digest
    }

    pub fn get(&self, digest: &Digest) -> Option<&Vertex> {
        self.vertices.get(digest)
    }

    /// The vertices reachable from `roots`, inputs before the vertices that use them.
    pub fn topo_order(&self, roots: &[Digest]) -> Vec<Digest> {
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        // Iterative post-order DFS (graphs from 2,000-line Dockerfiles must not overflow the stack).
        for root in roots {
            let mut stack = vec![(*root, false)];
            while let Some((d, expanded)) = stack.pop() {
                if expanded {
                    out.push(d);
                    continue;
                }
                if !seen.insert(d) {
                    continue;
                }
                stack.push((d, true));
                if let Some(v) = self.vertices.get(&d) {
                    for input in v.inputs.iter().rev() {
                        if !seen.contains(input) {
                            stack.push((*input, false));
                        }
                    }
                }
            }
        }
        out
    }

    /// The stable text form used by `kiln debug graph` and golden tests: one vertex per line in
    /// topological order, `<short digest> <op summary> <- <input short digests>`.
    pub fn render(&self, roots: &[Digest]) -> String {
        let mut out = String::new();
        for d in self.topo_order(roots) {
            let Some(v) = self.vertices.get(&d) else { continue };
            let short = |d: &Digest| d.hex()[..12].to_string();
            out.push_str(&short(&d));
            out.push(' ');
            out.push_str(&v.op.summary());
            if !v.inputs.is_empty() {
                out.push_str(" <- ");
                out.push_str(&v.inputs.iter().map(short).collect::<Vec<_>>().join(" "));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> Vertex {
        Vertex {
            op: Op::Source(SourceOp::Scratch),
            inputs: vec![],
            meta: Meta::default(),
        }
    }

    #[test]
    fn metadata_is_not_identity() {
        let a = scratch();
        let mut b = scratch();
        b.meta.name = "something else".into();
        b.meta.location = Some(SourceLocation {
            file: "Dockerfile".into(),
            start_line: 3,
            end_line: 4,
        });
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn inputs_are_identity() {
        let mut g = Graph::default();
        let s = g.add(scratch());
        let img = g.add(Vertex {
            op: Op::Source(SourceOp::Image(ImageSource {
                reference: "busybox:local".into(),
                resolved_digest: None,
                platform: Platform::host(),
            })),
            inputs: vec![],
            meta: Meta::default(),
        });
        let mk = |input| Vertex {
            op: Op::File(FileOp {
                actions: vec![FileAction::Mkdir(MkdirAction {
                    path: "/x".into(),
                    mode: 0o755,
                    make_parents: true,
                    owner: None,
                })],
                input: Some(0),
            }),
            inputs: vec![input],
            meta: Meta::default(),
        };
        assert_ne!(g.add(mk(s)), g.add(mk(img)));
        assert_eq!(g.vertices.len(), 4);
    }

    #[test]
    fn digest_round_trip() {
        let d = Digest::of(b"hello");
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        assert!(Digest::parse("sha256:ABC").is_err());
        assert!(Digest::parse("md5:00").is_err());
    }

    #[test]
    fn topo_order_puts_inputs_first() {
        let mut g = Graph::default();
        let s = g.add(scratch());
        let m = g.add(Vertex {
            op: Op::Merge(MergeOp {}),
            inputs: vec![s, s],
            meta: Meta::default(),
        });
        assert_eq!(g.topo_order(&[m]), vec![s, m]);
    }
}
