//! Sections 11-12 of the corpus README: `dockerignore/matches.tsv` and `normalize.tsv`,
//! run through `kiln-patterns`.

use std::path::Path;

use kiln_patterns::{read_dockerignore, Matcher};

pub fn run(dir: &Path) -> crate::Outcome {
    let mut outcome = crate::Outcome::default();
    let base = dir.join("dockerignore");
    if let Ok(bytes) = std::fs::read(base.join("matches.tsv")) {
        run_matches(&String::from_utf8_lossy(&bytes), &mut outcome);
    }
    if let Ok(bytes) = std::fs::read(base.join("normalize.tsv")) {
        run_normalize(&String::from_utf8_lossy(&bytes), &mut outcome);
    }
    outcome
}

/// Rows: id, source, function, expected, path, patterns...
fn run_matches(text: &str, outcome: &mut crate::Outcome) {
    for (n, line) in text.split('\n').enumerate().skip(1) {
        if line.is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 5 {
            outcome.check(false, || {
                format!("matches.tsv line {}: malformed row {line:?}", n + 1)
            });
            continue;
        }
        let (id, expected, path, patterns) = (cols[0], cols[3], cols[4], &cols[5..]);
        let got = Matcher::new(patterns).and_then(|m| m.matches(path));
        let ok = match (expected, &got) {
            ("true", Ok(true)) | ("false", Ok(false)) | ("error", Err(_)) => true,
            ("true" | "false" | "error", _) => false,
            _ => {
                outcome.check(false, || {
                    format!("matches.tsv {id}: unknown expected value {expected:?}")
                });
                continue;
            }
        };
        outcome.check(ok, || {
            format!("matches.tsv {id}: path {path:?} patterns {patterns:?}\n  expected: {expected}\n  got:      {got:?}")
        });
    }
}

/// Rows: raw `.dockerignore` line (trailing blanks kept), pattern or `<skip>`.
fn run_normalize(text: &str, outcome: &mut crate::Outcome) {
    for (n, line) in text.split('\n').enumerate().skip(1) {
        if line.is_empty() {
            continue;
        }
        let Some((raw, want)) = line.rsplit_once('\t') else {
            outcome.check(false, || {
                format!("normalize.tsv line {}: malformed row {line:?}", n + 1)
            });
            continue;
        };
        let got = read_dockerignore(raw.as_bytes());
        let expected: Vec<String> = if want == "<skip>" {
            Vec::new()
        } else {
            vec![want.to_string()]
        };
        outcome.check(got == expected, || {
            format!(
                "normalize.tsv line {}: {raw:?}\n  expected: {expected:?}\n  got:      {got:?}",
                n + 1
            )
        });
    }
}
