//! kiln's integration tests: one binary, a temp store per test, real processes.
//! Tests that need root, dockerd, a registry or skopeo say so when those are missing (and fail).
#![allow(clippy::unwrap_used)]

mod attach;
mod build;
mod build_flags;
mod build_limits;
mod checks;
mod cicache;
mod container_fs;
mod containers;
mod debug;
mod docker_compat;
mod flatten;
mod gc;
mod harness;
mod hostile;
mod multiplatform;
mod nested;
mod orphans;
mod progress;
mod publish;
mod registry;
mod remote;
mod rootless;
mod run_flags;
mod run_options;
mod security;
mod store;
