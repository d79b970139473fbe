//! Times writing a directory as a layer tar, three times:
//! `diff_time DIR` (hashing only), `diff_time DIR PATH` (also writing and syncing PATH), or
//! `diff_time DIR PATH --reuse` (writing PATH once with an index, then timing writes that copy
//! every file's entry from it, to a sink).
use std::sync::Arc;
use std::time::Instant;

use kiln_cache::layer::{self, DiffOptions, Donor};
use kiln_cache::recipe::BlobSource;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1).map(std::path::Path::new) else {
        return Err("usage: diff_time DIR [OUT [--reuse]]".into());
    };
    let mut opts = DiffOptions::default();
    if let (Some(out), Some("--reuse")) = (args.get(2), args.get(3).map(String::as_str)) {
        let first = layer::write_diff_indexed(dir, std::fs::File::create(out)?, &opts)?;
        let blob = BlobSource::plain(first.stats.diff_id, std::fs::File::open(out)?, first.stats.size);
        opts.donor = Some(Arc::new(Donor::new(blob, first.index)));
        for _ in 0..3 {
            let t = Instant::now();
            let f = std::fs::File::create(format!("{out}.again"))?;
            let stats = layer::write_diff(dir, &f, &opts)?;
            let written = t.elapsed();
            f.sync_all()?;
            println!(
                "{written:?} written, {:?} synced: {} bytes, {} entries (reusing)",
                t.elapsed(),
                stats.size,
                stats.entries
            );
        }
        return Ok(());
    }
    for _ in 0..3 {
        let t = Instant::now();
        let stats = match args.get(2) {
            Some(out) => {
                let f = std::fs::File::create(out)?;
                let s = layer::write_diff(dir, &f, &opts)?;
                f.sync_all()?;
                s
            }
            None => layer::write_diff(dir, std::io::sink(), &opts)?,
        };
        println!(
            "{:?}: {} bytes, {} entries",
            t.elapsed(),
            stats.size,
            stats.entries
        );
    }
    Ok(())
}
