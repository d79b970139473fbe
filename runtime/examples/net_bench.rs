//! Times bridge network setup and teardown of one container endpoint (needs root).
//!
//! `cargo run --release -p kiln-runtime --example net_bench [N]` uses a bridge `kilnbench0` on
//! `10.202.0.0/24` with its state in a temp dir, and removes the bridge and its rules at the end.

use std::time::{Duration, Instant};

use kiln_runtime::net::{self, bridge, NetConfig, NetRequest};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(50);
    let tmp = std::env::temp_dir().join(format!("kiln-net-bench-{}", std::process::id()));
    let config = NetConfig {
        bridge: "kilnbench0".into(),
        subnet: "10.202.0.0/24".parse()?,
        state_dir: tmp.join("state"),
        netns_dir: tmp.join("netns"),
    };
    let request = NetRequest {
        config: config.clone(),
        ip: None,
    };
    let first = Instant::now();
    bridge::ensure(&config)?;
    println!(
        "first bridge setup (bridge, forwarding, iptables): {:?}",
        first.elapsed()
    );
    let (mut setups, mut teardowns) = (Vec::new(), Vec::new());
    for i in 0..n {
        let t = Instant::now();
        let ep = net::setup(&format!("bench{i}"), &request)?;
        setups.push(t.elapsed());
        let t = Instant::now();
        net::teardown(&ep)?;
        teardowns.push(t.elapsed());
    }
    println!(
        "setup median {:?}, teardown median {:?} over {n}",
        median(setups),
        median(teardowns)
    );
    bridge::remove(&config)?;
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}
