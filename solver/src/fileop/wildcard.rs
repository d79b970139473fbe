//! Wildcards in copy sources: Go's `filepath.Match` on each path component, the split of a
//! source into its literal prefix and its pattern part, and the expansion of a pattern.

use super::resolve::{self, Hidden, Resolved};
use super::FileOpError;

/// Whether a component holds a wildcard (`*`, `?`, `[`), a backslash escaping the next byte.
pub(super) fn has_wildcards(component: &str) -> bool {
    let b = component.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'*' | b'?' | b'[' => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// Splits a container path into its literal prefix (absolute, cleaned) and the components
/// from the first one holding a wildcard on. No wildcard: the pattern part is empty.
pub(super) fn split(path: &str) -> (String, Vec<String>) {
    let comps = resolve::clean_components(path);
    match comps.iter().position(|c| has_wildcards(c)) {
        None => (resolve::clean(path), Vec::new()),
        Some(i) => {
            let prefix = format!("/{}", comps[..i].join("/"));
            (
                resolve::clean(&prefix),
                comps[i..].iter().map(|s| s.to_string()).collect(),
            )
        }
    }
}

/// Go's `filepath.Match` for a single path component; a malformed pattern matches nothing
/// (the Go callers ignore the error the same way).
pub(super) fn matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    match_from(&p, &n).unwrap_or(false)
}

/// `None` for a malformed pattern.
fn match_from(p: &[char], n: &[char]) -> Option<bool> {
    let Some(&first) = p.first() else {
        return Some(n.is_empty());
    };
    match first {
        '*' => {
            let mut rest = p;
            while rest.first() == Some(&'*') {
                rest = &rest[1..];
            }
            for i in 0..=n.len() {
                if i > 0 && n[i - 1] == '/' {
                    break;
                }
                if match_from(rest, &n[i..])? {
                    return Some(true);
                }
            }
            Some(false)
        }
        '?' => match n.first() {
            Some(&c) if c != '/' => match_from(&p[1..], &n[1..]),
            _ => Some(false),
        },
        '[' => {
            let (matched, used) = class(&p[1..], n.first().copied())?;
            if !matched {
                return Some(false);
            }
            match_from(&p[1 + used..], &n[1..])
        }
        '\\' => {
            let &lit = p.get(1)?;
            if n.first() == Some(&lit) {
                match_from(&p[2..], &n[1..])
            } else {
                Some(false)
            }
        }
        c => {
            if n.first() == Some(&c) {
                match_from(&p[1..], &n[1..])
            } else {
                Some(false)
            }
        }
    }
}

/// Parses a character class after its `[`; returns whether `c` is in it and how many pattern
/// characters the class used (through its `]`). A missing character never matches.
fn class(p: &[char], c: Option<char>) -> Option<(bool, usize)> {
    let mut i = 0;
    let negated = p.first() == Some(&'^');
    if negated {
        i += 1;
    }
    let mut matched = false;
    let mut ranges = 0;
    loop {
        if p.get(i) == Some(&']') && ranges > 0 {
            i += 1;
            break;
        }
        let (lo, next) = escaped(p, i)?;
        i = next;
        let mut hi = lo;
        if p.get(i) == Some(&'-') {
            let (h, next) = escaped(p, i + 1)?;
            hi = h;
            i = next;
        }
        if let Some(c) = c {
            if lo <= c && c <= hi {
                matched = true;
            }
        }
        ranges += 1;
    }
    match c {
        Some(ch) if ch != '/' => Some((matched != negated, i)),
        _ => Some((false, i)),
    }
}

fn escaped(p: &[char], i: usize) -> Option<(char, usize)> {
    match p.get(i)? {
        '-' | ']' => None,
        '\\' => p.get(i + 1).map(|&c| (c, i + 2)),
        &c => Some((c, i + 1)),
    }
}

/// Expands `pattern` (components, possibly with wildcards) below the directory `base`, in
/// lexical walk order. Symlinks met below `base` are never followed: a pattern component
/// after a symlink matches nothing. `hidden` makes entries invisible.
pub(super) fn expand(
    base: &Resolved,
    pattern: &[String],
    hidden: Option<Hidden<'_>>,
) -> Result<Vec<Resolved>, FileOpError> {
    let mut out = Vec::new();
    walk(base, pattern, hidden, &mut out)?;
    Ok(out)
}

fn walk(
    dir: &Resolved,
    pattern: &[String],
    hidden: Option<Hidden<'_>>,
    out: &mut Vec<Resolved>,
) -> Result<(), FileOpError> {
    let Some((first, rest)) = pattern.split_first() else {
        return Ok(());
    };
    let rd = std::fs::read_dir(&dir.host).map_err(|source| FileOpError::ReadDir {
        path: dir.host.clone(),
        source,
    })?;
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|source| FileOpError::ReadDir {
            path: dir.host.clone(),
            source,
        })?;
        let ft = entry.file_type().map_err(|source| FileOpError::Stat {
            path: entry.path(),
            source,
        })?;
        names.push((entry.file_name(), ft.is_dir()));
    }
    names.sort();
    for (name, is_dir) in names {
        let name_str = name.to_string_lossy();
        if !matches(first, &name_str) {
            continue;
        }
        let rel = if dir.rel.is_empty() {
            name_str.to_string()
        } else {
            format!("{}/{}", dir.rel, name_str)
        };
        if let Some(hidden) = hidden {
            if hidden(&rel, is_dir)? {
                continue;
            }
        }
        let child = Resolved {
            host: dir.host.join(&name),
            rel,
        };
        if rest.is_empty() {
            out.push(child);
        } else if is_dir {
            walk(&child, rest, hidden, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_match_semantics() {
        assert!(matches("*.txt", "a.txt"));
        assert!(!matches("*.txt", "a.md"));
        assert!(matches("d?r", "dir"));
        assert!(matches("[ab].md", "b.md"));
        assert!(!matches("[ab].md", "c.md"));
        assert!(matches("[^ab].md", "c.md"));
        assert!(matches("[a-c]x", "bx"));
        assert!(matches("a\\*b", "a*b"));
        assert!(!matches("a\\*b", "axb"));
        assert!(!matches("[]a]", "a"));
        assert!(!matches("[", "["));
        assert!(matches("*", ""));
        assert!(matches("also-missing-[0-9]*", "also-missing-3x"));
    }

    #[test]
    fn splits_at_first_wildcard() {
        assert_eq!(
            split("/a/b*/c"),
            ("/a".to_string(), vec!["b*".to_string(), "c".to_string()])
        );
        assert_eq!(split("/a/b"), ("/a/b".to_string(), vec![]));
        assert_eq!(split("*.txt"), ("/".to_string(), vec!["*.txt".to_string()]));
        assert!(!has_wildcards("a\\*"));
    }
}
