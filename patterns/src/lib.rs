//! Path patterns with moby `.dockerignore` semantics.
#![forbid(unsafe_code)]
