//! The solver: runs a build graph with caching and parallelism.
#![forbid(unsafe_code)]
