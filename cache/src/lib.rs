//! The store: content store, snapshots, build cache index, image store, archives, GC.
#![forbid(unsafe_code)]
#![cfg_attr(
    test,
    allow(clippy::disallowed_methods, reason = "tests write fixtures as they please")
)]

pub mod archive;
pub mod buildcache;
mod bytes;
pub mod content;
pub mod durable;
pub mod gc;
pub mod image_index;
pub mod images;
pub mod layer;
pub mod paths;
pub mod recipe;
pub mod reference;
pub mod snapshot;
pub mod sorted;
pub mod store;
pub mod temp;
pub mod verify;

pub use kiln_dag::Digest;
pub use oci_spec;
pub use store::Store;
