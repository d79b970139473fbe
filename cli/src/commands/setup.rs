//! `kiln setup`: host set-up that builds need, as root.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use kiln_runtime::binfmt::{self, Registered};

/// `kiln setup`.
#[derive(Subcommand, Debug)]
pub enum SetupCmd {
    /// Register QEMU user emulation (qemu-user-static) in binfmt_misc with the F flag, so RUN
    /// steps and containers of other architectures run
    Binfmt {
        /// Architectures (Go names: arm64, arm, riscv64, ppc64le, s390x, ...); every foreign
        /// one kiln knows when none is given
        arches: Vec<String>,
    },
}

pub fn run(cmd: SetupCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SetupCmd::Binfmt { arches } => {
            let names: Vec<&str> = arches.iter().map(String::as_str).collect();
            let done = binfmt::register(&names).context("failed to register binfmt_misc handlers")?;
            let mut missing = Vec::new();
            for (arch, r) in done {
                match r {
                    Registered::Present(h) => {
                        println!(
                            "{arch}: already registered ({}, {})",
                            h.name,
                            h.interpreter.display()
                        )
                    }
                    Registered::Added(p) => println!("{arch}: registered {}", p.display()),
                    Registered::NoQemu => {
                        println!("{arch}: no QEMU installed for it");
                        missing.push(arch);
                    }
                }
            }
            // Asked for by name and not possible: an error; the default set only reports.
            if !arches.is_empty() && !missing.is_empty() {
                anyhow::bail!(
                    "no QEMU user emulator for {}: install it with `apt-get install qemu-user-static`",
                    missing.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
