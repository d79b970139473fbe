//! What a kiln process sets up before its command runs: the store's default place, rootless
//! mode's user namespace (entered while the process has one thread), logging, and the private
//! mount namespace of the commands that mount.

use std::path::{Path, PathBuf};

/// The store root when neither `--root` nor `$KILN_ROOT` names one.
pub fn default_root() -> PathBuf {
    if nix_is_root() {
        return PathBuf::from("/var/lib/kiln");
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("kiln"),
        _ => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".local/share/kiln"))
            .unwrap_or_else(|| PathBuf::from("/var/lib/kiln")),
    }
}

/// The pids of the live supervisors of `root`'s containers (read without opening the store, before
/// rootless mode is entered).
fn live_supervisors(root: &Path) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(root.join("containers")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let bytes = std::fs::read(e.path().join("state.json")).ok()?;
            let st: kiln_containers::ContainerState = serde_json::from_slice(&bytes).ok()?;
            kiln_containers::state::supervisor_alive(&st).then_some(st.supervisor_pid)
        })
        .collect()
}

fn nix_is_root() -> bool {
    // /proc/self is owned by the process's effective uid.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// Enters rootless mode's user namespace when needed or asked (`rootless`), then starts logging
/// (`debug`: at debug level). Errors are printed by the caller.
pub fn enter(root: &Path, rootless: bool, debug: bool) -> Result<(), String> {
    // Rootless mode: a user namespace of our own, entered while the process has one thread. Root
    // already in one (a supervisor kiln started, or kiln as root of a container with a user
    // namespace) stays where it is.
    let userns = kiln_runtime::userns::needed() || (rootless && !kiln_runtime::userns::in_user_namespace());
    // The store's directory for per-boot state: the keeper's files, and the last place for caches.
    let run_dir = root.join("cache").join("run");
    let mut entered = None;
    if userns {
        // Through the store's keeper, which holds a user namespace for its commands (and those of
        // its detached containers, whose supervisors live in it): joining it costs a setns, making
        // a namespace the start of two setuid tools.
        let dir = std::path::absolute(&run_dir).unwrap_or_else(|_| run_dir.clone());
        let how =
            kiln_runtime::userns::enter_kept(&dir, &|| live_supervisors(root)).map_err(|e| e.to_string())?;
        entered = Some(how);
    }
    let filter = if debug { "debug" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    kiln_runtime::snapshotter::check_env().map_err(|e| e.to_string())?;
    kiln_runtime::snapshotter::set_scratch(&root.join("tmp"));
    kiln_runtime::userns::set_fallback_runtime_dir(run_dir);
    if let Some(how) = entered {
        tracing::debug!("rootless: {how}");
    }
    if kiln_runtime::userns::in_user_namespace() {
        tracing::debug!(
            "rootless: in a user namespace (uid 0 is host uid {}); RUN network: {}",
            kiln_runtime::userns::host_uid(),
            match kiln_runtime::net::usermode::find() {
                Ok((tool, _)) => tool.name().to_owned(),
                Err(e) => e.to_string(),
            }
        );
    }
    Ok(())
}

/// Enters a mount namespace of this process's own, so every overlay a build or container mounts
/// vanishes with the process, however it ends. Must be called while single-threaded.
/// Only commands that mount choose a snapshotter (in a user namespace, by a test mount in the
/// mount namespace of their own); `debug` logs the choice.
pub fn private_mounts(debug: bool) -> Result<(), String> {
    kiln_runtime::host::enter_private_mount_namespace().map_err(|e| e.to_string())?;
    if debug {
        match kiln_runtime::snapshotter::choice() {
            Ok(c) => tracing::debug!("snapshotter: {}", c.reason),
            Err(e) => tracing::debug!("snapshotter: none: {e}"),
        }
    }
    Ok(())
}
