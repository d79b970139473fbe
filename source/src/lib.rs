//! Build inputs that come from outside the store: registries (pull, push, auth), Git
//! repositories, HTTP downloads and context tarballs.
//!
//! The crate fetches bytes and verifies them; it writes only into the store's content store and
//! into destination directories it is given. It knows nothing of Dockerfiles or the runtime.
#![forbid(unsafe_code)]

pub mod archive;
pub mod git;
pub mod http;

pub mod registry;
