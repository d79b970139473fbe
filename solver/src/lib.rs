//! The solver: runs a build graph with caching and parallelism.
//!
//! [`scheduler`] is generic over an [`scheduler::Executor`] and knows nothing of containers;
//! [`engine`] is the executor that runs kiln's ops against the store ([`kiln_cache`]) and the
//! runtime ([`kiln_runtime`]); [`fileop`] holds COPY/ADD semantics; [`context`] reads the build
//! context in place; [`cachekey`] documents what goes into a cache key.
#![forbid(unsafe_code)]

pub mod cachekey;
pub mod context;
pub mod engine;
/// How RUN steps are set apart from kiln's own environment ([`engine::EngineOptions::isolation`]).
pub use kiln_runtime::Isolation;
pub mod fileop;
pub mod progress;
pub mod scheduler;
