//! The store: content store, snapshots, image store, archives.
#![forbid(unsafe_code)]
