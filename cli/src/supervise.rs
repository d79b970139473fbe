//! How this binary starts a detached container supervisor; shared by `run`/`create`
//! (`commands/run.rs`) and the container lifecycle commands (`commands/containers.rs`), so that neither
//! imports the other for it.

use std::process::Command;

use anyhow::Context as _;

use crate::Globals;

/// The command that supervises container `id` detached: this binary's `container-supervise`.
pub fn supervisor_command(g: &Globals, id: &str, wait_attach: bool) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("failed to find the kiln executable")?;
    let mut c = Command::new(exe);
    c.arg("--root").arg(&g.root).arg("container-supervise");
    if g.debug {
        c.arg("--debug");
    }
    if wait_attach {
        c.arg("--wait-attach");
    }
    c.arg(id);
    Ok(c)
}
