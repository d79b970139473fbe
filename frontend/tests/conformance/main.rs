//! BuildKit conformance corpus: `KILN_CONFORMANCE_DIR=DIR cargo test --test conformance`
//! (default `../shared/conformance` from the workspace root). Every section found is run in full;
//! the test fails if no case at all is found, so a wrong path cannot pass silently.

use std::path::PathBuf;

mod ignore_cases;
mod parser_cases;
mod shell_cases;

/// The corpus root.
pub fn corpus_dir() -> PathBuf {
    match std::env::var_os("KILN_CONFORMANCE_DIR") {
        Some(d) => PathBuf::from(d),
        // Tests run with the package directory as cwd; the workspace root is its parent.
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance"),
    }
}

/// What one section found: cases run and failure descriptions.
#[derive(Default)]
pub struct Outcome {
    pub cases: usize,
    pub failures: Vec<String>,
}

impl Outcome {
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.cases += 1;
        if !ok {
            self.failures.push(what());
        }
    }
}

#[test]
fn conformance() {
    let dir = corpus_dir();
    let sections: Vec<(&str, Outcome)> = vec![
        ("parser", parser_cases::run(&dir)),
        ("shell", shell_cases::run(&dir)),
        ("dockerignore", ignore_cases::run(&dir)),
    ];
    let mut total = 0;
    let mut failed = 0;
    for (name, outcome) in &sections {
        eprintln!(
            "{name}: {} cases, {} failures",
            outcome.cases,
            outcome.failures.len()
        );
        for f in outcome.failures.iter().take(50) {
            eprintln!("---- {name} ----\n{f}");
        }
        total += outcome.cases;
        failed += outcome.failures.len();
    }
    assert!(total > 0, "no conformance cases found under {}", dir.display());
    assert_eq!(failed, 0, "{failed} of {total} conformance cases failed");
}
