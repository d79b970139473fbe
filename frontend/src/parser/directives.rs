//! Parser directives outside the parser proper: BuildKit's `ParseAll`, `DetectSyntax` and
//! `ParseDirective`, used to pick a frontend before the Dockerfile is parsed.

use super::grammar::directive_line;
use super::{Directive, ParseError, ParseErrorKind};

/// The directives BuildKit knows.
pub(crate) const KNOWN: [&str; 3] = ["syntax", "escape", "check"];

/// A directive found by [`detect_syntax`] or [`parse_directive`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundDirective {
    /// The value up to its first space (`docker/dockerfile:1` of `docker/dockerfile:1 a=b`).
    pub value: String,
    /// The whole value.
    pub cmdline: String,
    /// The 1-based line; for the JSON form, the number of skipped shebang lines (0 or 1).
    pub line: u32,
}

fn strip_bom(data: &[u8]) -> &[u8] {
    data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data)
}

/// Lines as Go's `bufio.ScanLines` yields them: split at `\n`, one trailing `\r` dropped.
fn scan_lines(data: &[u8]) -> impl Iterator<Item = String> + '_ {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let cur = rest?;
        if cur.is_empty() {
            rest = None;
            return None;
        }
        let (line, next) = match cur.iter().position(|b| *b == b'\n') {
            Some(i) => (&cur[..i], Some(&cur[i + 1..])),
            None => (cur, None),
        };
        rest = next;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        Some(String::from_utf8_lossy(line).into_owned())
    })
}

/// Scans the leading directive lines written with `prefix` (`#` or `//`), `first_line` being the
/// number of the first line minus one. Stops at the first line that is not a known directive.
fn scan(data: &[u8], prefix: &'static str, first_line: u32) -> (Vec<Directive>, Option<ParseError>) {
    let mut out: Vec<Directive> = Vec::new();
    for (line_no, text) in (first_line + 1..).zip(scan_lines(data)) {
        let Some((name, value)) = directive_line(&text, prefix) else {
            break;
        };
        if !KNOWN.contains(&name.as_str()) {
            break;
        }
        if out.iter().any(|d| d.name == name) {
            let err = ParseError::new(line_no, 1, ParseErrorKind::RepeatedDirective { name });
            return (out, Some(err));
        }
        out.push(Directive {
            name,
            value,
            line: line_no,
        });
    }
    (out, None)
}

/// All leading `# name=value` directives of a file (BuildKit's `ParseAll`). Repeating one is an
/// error.
pub fn parse_directives(data: &[u8]) -> Result<Vec<Directive>, ParseError> {
    match scan(data, "#", 0) {
        (_, Some(err)) => Err(err),
        (found, None) => Ok(found),
    }
}

fn find(data: &[u8], key: &str, any_format: bool) -> Option<FoundDirective> {
    let data = strip_bom(data);
    let (data, skipped) = match data.iter().position(|b| *b == b'\n') {
        _ if !data.starts_with(b"#!") => (data, 0),
        Some(i) => (&data[i + 1..], 1),
        None => (&data[data.len()..], 1),
    };
    let from = |d: &Directive| {
        let value = d.value.split(' ').next().unwrap_or_default().to_string();
        FoundDirective {
            value,
            cmdline: d.value.clone(),
            line: d.line,
        }
    };
    let prefixes: &[&'static str] = if any_format { &["#", "//"] } else { &["#"] };
    for prefix in prefixes {
        let (found, _) = scan(data, prefix, skipped);
        if let Some(d) = found.iter().find(|d| d.name == key) {
            return Some(from(d));
        }
    }
    if !any_format {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(data).ok()?;
    let v = value.as_object()?.get(key)?.as_str()?.to_string();
    Some(FoundDirective {
        value: v.clone(),
        cmdline: v,
        line: skipped,
    })
}

/// BuildKit's `DetectSyntax`: the `syntax` directive in `#` form, `//` form or as a JSON object
/// member, after an optional BOM and shebang line.
pub fn detect_syntax(data: &[u8]) -> Option<FoundDirective> {
    find(data, "syntax", true)
}

/// BuildKit's `ParseDirective`: like [`detect_syntax`] for any key, `#` form only.
pub fn parse_directive(key: &str, data: &[u8]) -> Option<FoundDirective> {
    find(data, key, false)
}
