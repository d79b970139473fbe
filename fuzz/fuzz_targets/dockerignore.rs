//! Feeds arbitrary bytes to the `.dockerignore` reader and matcher: the input is a
//! `.dockerignore` file, then a NUL, then NUL-separated context paths. Nothing may panic, and
//! the promise the context walker relies on must hold: when a directory matches and
//! `may_reinclude_below` says nothing below it can be re-included, every path below it matches.
#![no_main]

use kiln_patterns::{read_dockerignore, Matcher};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (ignore, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let patterns = read_dockerignore(ignore);
    let Ok(matcher) = Matcher::new(&patterns) else {
        return;
    };
    // The walker asks about clean context-relative paths only: no empty, `.` or `..` component.
    let paths: Vec<String> = rest
        .split(|&b| b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .filter(|p| p.split('/').all(|c| !matches!(c, "" | "." | "..")))
        .collect();
    for dir in &paths {
        let Ok(true) = matcher.matches(dir) else { continue };
        if matcher.may_reinclude_below(dir) {
            continue;
        }
        for p in &paths {
            if let Some(below) = p.strip_prefix(dir.as_str()) {
                if below.starts_with('/') {
                    assert_eq!(
                        matcher.matches(p).ok(),
                        Some(true),
                        "`{dir}` is excluded with nothing re-includable below, yet `{p}` is not: {patterns:?}"
                    );
                }
            }
        }
    }
});
