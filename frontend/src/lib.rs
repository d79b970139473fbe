//! Dockerfile frontend: bytes → AST with spans → typed instructions → build graph + image config.
//!
//! Architecture invariant: the frontend does no I/O. Everything it needs from outside (base image
//! configs, the context's `.dockerignore`) is handed in by the caller.
#![forbid(unsafe_code)]

pub mod instructions;
pub mod lint;
pub mod lower;
pub mod parser;
pub mod shell;
