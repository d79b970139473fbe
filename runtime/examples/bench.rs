//! Times N sequential `true` runs in full sandboxes (overlay with one lower dir, new mount, pid,
//! uts, ipc and network namespaces, Docker's default /proc, /dev, /sys, masks and capabilities).
//!
//! As root: `cargo run --release -p kiln-runtime --example bench -- [N] [none|host]`
//! (`BENCH_SECCOMP=unconfined`: without the seccomp filter; `=compare`: every other run without
//! it, reported apart; `BENCH_INSECURE=1`: privileged).

use std::error::Error;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Instant;

use kiln_runtime::{start, ContainerSpec, EtcFiles, Network, Rootfs, Security};

fn busybox_layer(dir: &Path) -> Result<(), Box<dyn Error>> {
    fs::create_dir_all(dir.join("bin"))?;
    fs::copy("/bin/busybox", dir.join("bin/busybox"))?;
    for applet in ["sh", "true"] {
        symlink("busybox", dir.join("bin").join(applet))?;
    }
    fs::create_dir_all(dir.join("etc"))?;
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(dir.join("etc/group"), "root:x:0:\n")?;
    Ok(())
}

fn devnull() -> Result<OwnedFd, Box<dyn Error>> {
    Ok(OwnedFd::from(
        fs::OpenOptions::new().write(true).open("/dev/null")?,
    ))
}

fn main() -> Result<(), Box<dyn Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    // `host` shares the host's network namespace (`RUN --network=host`); `none` creates one.
    let network = match std::env::args().nth(2).as_deref() {
        Some("host") => Network::Host,
        _ => Network::None,
    };
    let tmp = tempfile::tempdir()?;
    let lower = tmp.path().join("lower");
    busybox_layer(&lower)?;
    let scratch = tmp.path().join("scratch");
    fs::create_dir_all(&scratch)?;
    let mut times = Vec::with_capacity(n);
    let mut starts = Vec::with_capacity(n);
    // BENCH_SECCOMP=compare: every other run unconfined, timed apart, so both see the same load.
    let compare = std::env::var("BENCH_SECCOMP").as_deref() == Ok("compare");
    let mut unconfined_times = Vec::new();
    for i in 0..n {
        let unconfined =
            std::env::var("BENCH_SECCOMP").as_deref() == Ok("unconfined") || (compare && i % 2 == 1);
        let upper = tmp.path().join(format!("upper{i}"));
        let work = tmp.path().join(format!("work{i}"));
        fs::create_dir_all(&upper)?;
        fs::create_dir_all(&work)?;
        let spec = ContainerSpec {
            rootfs: Rootfs::Overlay {
                lower: vec![lower.clone()],
                upper,
                work,
            },
            readonly_rootfs: false,
            args: vec!["true".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: String::new(),
            hostname: "bench".into(),
            mounts: vec![],
            network: network.clone(),
            security: if std::env::var_os("BENCH_INSECURE").is_some() {
                Security::Insecure
            } else {
                Security::Default
            },
            etc_files: EtcFiles::for_build("bench", "nameserver 10.0.0.2\n", &Network::None),
            stdin: None,
            stdout: devnull()?,
            stderr: devnull()?,
            // BENCH_SECCOMP=unconfined: without Docker's filter, to see what it costs a step.
            options: kiln_runtime::RunOptions {
                seccomp: if unconfined {
                    kiln_runtime::seccomp::SeccompPolicy::Unconfined
                } else {
                    kiln_runtime::seccomp::SeccompPolicy::Default
                },
                ..Default::default()
            },
        };
        let t = Instant::now();
        let running = start(spec, &scratch)?;
        starts.push(t.elapsed().as_secs_f64() * 1000.0);
        let status = running.wait()?;
        if compare && unconfined {
            starts.pop();
            unconfined_times.push(t.elapsed().as_secs_f64() * 1000.0);
        } else {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        if !status.success() {
            return Err(format!("run {i} failed: {status}").into());
        }
    }
    if compare {
        unconfined_times.sort_by(f64::total_cmp);
        let u = |p: f64| unconfined_times[((unconfined_times.len() - 1) as f64 * p) as usize];
        println!(
            "unconfined runs interleaved: median {:.2} ms, p10 {:.2} ms, p90 {:.2} ms",
            u(0.5),
            u(0.1),
            u(0.9)
        );
    }
    times.sort_by(f64::total_cmp);
    starts.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    println!(
        "{n} sequential `true` runs (overlay, 1 lower dir, network {network:?}): median {:.2} ms, p10 {:.2} ms, p90 {:.2} ms",
        pct(0.5),
        pct(0.1),
        pct(0.9)
    );
    println!(
        "of which setup until exec (start): median {:.2} ms",
        starts[starts.len() / 2]
    );
    Ok(())
}
