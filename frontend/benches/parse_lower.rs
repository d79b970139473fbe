//! Times parsing + lowering of a generated 2,000-line Dockerfile and prints the median.
//!
//! Run with `cargo bench -p kiln-frontend --bench parse_lower` (release profile). The target
//! is a median under 5 ms.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use kiln_dag::image::ImageConfig;
use kiln_dag::Platform;
use kiln_frontend::lower::{lower, ImageResolver, LowerOptions, ResolvedImage, ResolverError};

/// Every image resolves to the same small config.
struct FixedResolver;

impl ImageResolver for FixedResolver {
    fn resolve(&self, reference: &str, _platform: &Platform) -> Result<ResolvedImage, ResolverError> {
        let mut config = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            ..ImageConfig::default()
        };
        config.config.env = Some(vec!["PATH=/usr/bin:/bin".into()]);
        Ok(ResolvedImage {
            reference: format!("docker.io/library/{reference}"),
            digest: None,
            config,
        })
    }
}

/// A Dockerfile of `lines` lines: 20 stages, each mixing the common instructions, the last
/// stage copying from all the others.
fn generate(lines: usize) -> String {
    let stages = 20;
    let per_stage = lines / stages;
    let mut out = String::from("ARG BASE=busybox:local\nARG VERSION=1.0\n");
    let mut written = 2;
    for s in 0..stages {
        let _ = writeln!(out, "FROM ${{BASE}} AS stage{s}");
        let _ = writeln!(out, "ARG VERSION");
        written += 2;
        let mut i = 0;
        while written < (s + 1) * per_stage {
            let line = match i % 10 {
                0 => format!("ENV KEY{i}=value-{s}-{i} OTHER{i}=\"$KEY{i} and more\""),
                1 => format!("RUN echo step {s}.{i} $VERSION > /file{i} && ls -la /"),
                2 => format!("COPY --chown=1000:1000 src/file{i}.txt /app/data/"),
                3 => format!("WORKDIR /work/dir{i}"),
                4 => format!("LABEL com.example.step{i}=\"value {i}\""),
                5 => format!("RUN --mount=type=cache,target=/cache{i} make target{i}"),
                6 => format!("EXPOSE {}", 8000 + i),
                7 => format!("ARG OPT{i}=default{i}"),
                8 => "RUN set -e; \\\n    for x in a b c; do echo $x; done".to_string(),
                _ => format!("USER user{i}"),
            };
            written += line.matches('\n').count() + 1;
            out.push_str(&line);
            out.push('\n');
            i += 1;
        }
    }
    let _ = writeln!(out, "FROM busybox:local");
    for s in 0..stages {
        let _ = writeln!(out, "COPY --from=stage{s} /work /out/{s}");
    }
    out
}

fn main() {
    let text = generate(2_000);
    let lines = text.lines().count();
    let opts = LowerOptions::default();
    let mut times: Vec<Duration> = Vec::new();
    let mut with_walk_times: Vec<Duration> = Vec::new();
    let mut parse_times: Vec<Duration> = Vec::new();
    let mut vertices = 0;
    for _ in 0..50 {
        let start = Instant::now();
        if let Ok(df) = kiln_frontend::parser::parse(text.as_bytes()) {
            let _ = kiln_frontend::instructions::parse_all(&df);
        }
        parse_times.push(start.elapsed());
        let start = Instant::now();
        let lowered = lower(text.as_bytes(), &opts, &FixedResolver);
        // The figure that counts: parse + lower, up to the moment the result is in hand.
        times.push(start.elapsed());
        match lowered {
            Ok(l) => vertices = l.graph.topo_order(&[l.root]).len(),
            Err(e) => {
                eprintln!("{}", e.render(text.as_bytes()));
                std::process::exit(1);
            }
        }
        // Also walking the graph (to count its vertices) and dropping it, for comparison with
        // earlier runs of this bench, which timed those too.
        with_walk_times.push(start.elapsed());
    }
    // The share of the total spent hashing vertices (kiln_dag's canonical encoding + sha256).
    let mut hash_times: Vec<Duration> = Vec::new();
    if let Ok(l) = lower(text.as_bytes(), &opts, &FixedResolver) {
        for _ in 0..50 {
            let start = Instant::now();
            for v in l.graph.vertices.values() {
                std::hint::black_box(v.digest());
            }
            hash_times.push(start.elapsed());
        }
    }
    hash_times.sort();
    if let Some(h) = hash_times.get(hash_times.len() / 2) {
        println!("vertex hashing alone: median {:.3} ms", h.as_secs_f64() * 1e3);
    }
    times.sort();
    with_walk_times.sort();
    parse_times.sort();
    let median = times[times.len() / 2];
    println!(
        "parse alone: median {:.3} ms",
        parse_times[parse_times.len() / 2].as_secs_f64() * 1e3
    );
    println!(
        "parse+lower {lines} lines ({vertices} vertices): median {:.3} ms, min {:.3} ms over {} runs",
        median.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times.len()
    );
    println!(
        "parse+lower+walk+drop: median {:.3} ms",
        with_walk_times[with_walk_times.len() / 2].as_secs_f64() * 1e3
    );
}
