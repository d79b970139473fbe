//! Times writing a directory as a layer tar, three times:
//! `diff_time DIR` (hashing only) or `diff_time DIR PATH` (also writing and syncing PATH).
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1).map(std::path::Path::new) else {
        return Err("usage: diff_time DIR [OUT]".into());
    };
    let opts = kiln_cache::layer::DiffOptions::default();
    for _ in 0..3 {
        let t = Instant::now();
        let stats = match args.get(2) {
            Some(out) => {
                let f = std::fs::File::create(out)?;
                let s = kiln_cache::layer::write_diff(dir, &f, &opts)?;
                f.sync_all()?;
                s
            }
            None => kiln_cache::layer::write_diff(dir, std::io::sink(), &opts)?,
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
