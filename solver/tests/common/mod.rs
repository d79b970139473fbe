//! Helpers shared by the solver's integration tests.

use kiln_dag::CopyAction;

/// COPY as the Dockerfile frontend lowers it (one action per source).
pub fn cp(src: &str, dest: &str) -> CopyAction {
    CopyAction {
        source_input: 0,
        src: src.into(),
        dest: dest.into(),
        owner: None,
        mode: None,
        follow_symlinks: true,
        dir_contents_only: true,
        allow_wildcard: true,
        allow_empty_wildcard: true,
        create_dest_path: true,
        dest_is_dir: dest.ends_with('/'),
        attempt_unpack: false,
        exclude: Vec::new(),
        parents: false,
    }
}
