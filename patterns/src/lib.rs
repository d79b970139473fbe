//! Path patterns with moby `.dockerignore` semantics.
//!
//! [`read_dockerignore`] turns a `.dockerignore` file into patterns the way moby's `ignorefile`
//! does; [`Matcher`] applies them the way moby's `patternmatcher.MatchesOrParentMatches` does:
//! patterns in order, a leading `!` re-includes, the last matching pattern wins, and a pattern
//! matches a path when it matches the path itself or any leading directory of it.
//!
//! Patterns are compiled once (no regular expressions): plain strings, prefixes (`dir/**`) and
//! suffixes (`**/name`) are compared directly, everything else runs through a small NFA over
//! glob tokens, linear in the path length.
#![forbid(unsafe_code)]

mod clean;
mod glob;

pub use clean::clean;
pub use glob::GlobError;

use glob::Kind;

/// Errors from building or applying a [`Matcher`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// A pattern that is only `!`.
    #[error("illegal exclusion pattern `!` (pattern {index})")]
    BareExclusion {
        /// Position of the pattern in the list, from 0.
        index: usize,
    },
    /// A pattern that fails the glob syntax check.
    #[error("syntax error in pattern `{pattern}`")]
    Syntax {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        #[source]
        source: GlobError,
    },
    /// A pattern that passed the syntax check but cannot be matched (upstream fails at match
    /// time too, e.g. for the reversed range in `[Local-Only]`).
    #[error("pattern `{pattern}` cannot be matched against `{path}`")]
    Unmatchable {
        /// The cleaned pattern.
        pattern: String,
        /// The path being matched.
        path: String,
        /// What is wrong with the pattern.
        #[source]
        source: GlobError,
    },
}

/// One compiled pattern.
#[derive(Debug, Clone)]
struct Pattern {
    /// Cleaned text without the `!`.
    text: String,
    exclusion: bool,
    kind: Kind,
}

impl Pattern {
    fn matches(&self, path: &str) -> Result<bool, GlobError> {
        Ok(match &self.kind {
            Kind::Exact(s) => path == s,
            Kind::Prefix(p) => path.starts_with(p.as_str()),
            Kind::Suffix(s) => {
                path.ends_with(s.as_str()) || s.strip_prefix('/').is_some_and(|rest| path == rest)
            }
            Kind::Glob(tokens) => glob::glob_matches(tokens, path),
            Kind::Broken(e) => return Err(e.clone()),
        })
    }

    /// Could this pattern match some path strictly below `dir_slash` (which ends in `/`)?
    fn may_match_below(&self, dir_slash: &str) -> bool {
        match &self.kind {
            Kind::Exact(s) => s.len() > dir_slash.len() && s.starts_with(dir_slash),
            Kind::Prefix(p) => p.starts_with(dir_slash) || dir_slash.starts_with(p.as_str()),
            Kind::Suffix(_) => true,
            Kind::Glob(tokens) => glob::glob_may_match_below(tokens, dir_slash),
            Kind::Broken(_) => true,
        }
    }
}

/// A compiled `.dockerignore` pattern list, in order; `!` patterns re-include.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    patterns: Vec<Pattern>,
    exclusions: bool,
}

impl Matcher {
    /// Compiles `patterns`: each is trimmed (blank ones are skipped), path-cleaned, split from
    /// its leading `!`, and syntax-checked. Fails on a bare `!` or a malformed glob.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Matcher, PatternError> {
        let mut out = Matcher::default();
        for (index, raw) in patterns.iter().enumerate() {
            let trimmed = raw.as_ref().trim();
            if trimmed.is_empty() {
                continue;
            }
            let cleaned = clean(trimmed);
            let (exclusion, text) = match cleaned.strip_prefix('!') {
                Some("") => return Err(PatternError::BareExclusion { index }),
                Some(rest) => (true, rest.to_string()),
                None => (false, cleaned),
            };
            glob::validate(&text).map_err(|source| PatternError::Syntax {
                pattern: raw.as_ref().to_string(),
                source,
            })?;
            out.exclusions |= exclusion;
            let kind = glob::compile(&text);
            out.patterns.push(Pattern {
                text,
                exclusion,
                kind,
            });
        }
        Ok(out)
    }

    /// "MatchesOrParentMatches": whether `path` (context-relative, `/`-separated, used as given)
    /// is excluded, i.e. the last pattern matching the path or any leading directory of it is
    /// not a `!` pattern.
    pub fn matches(&self, path: &str) -> Result<bool, PatternError> {
        // The parent is Go's `filepath.Dir(path)`; an already clean one is borrowed, not rebuilt.
        let cleaned;
        let parent: &str = match path.rfind('/') {
            None => ".",
            Some(i) if is_clean(&path[..i]) => &path[..i],
            Some(i) => {
                cleaned = clean(&path[..=i]);
                &cleaned
            }
        };
        // Leading directories of the path: the parent cut at each `/`, and the parent whole.
        let has_parent = parent != ".";
        let leading = || {
            parent
                .match_indices('/')
                .map(|(i, _)| &parent[..i])
                .chain(std::iter::once(parent))
                .filter(move |_| has_parent)
        };
        let mut matched = false;
        for pat in &self.patterns {
            // Upstream skips an inclusion once matched and an exclusion until matched.
            if pat.exclusion != matched {
                continue;
            }
            let mut hit = pat.matches(path).map_err(|source| PatternError::Unmatchable {
                pattern: pat.text.clone(),
                path: path.to_string(),
                source,
            })?;
            if !hit {
                hit = leading().any(|d| pat.matches(d).unwrap_or(false));
            }
            if hit {
                matched = !pat.exclusion;
            }
        }
        Ok(matched)
    }

    /// True when some `!` pattern exists (walkers then cannot prune excluded directories blindly).
    pub fn has_exclusions(&self) -> bool {
        self.exclusions
    }

    /// For a directory that [`matches`](Matcher::matches): could any path below it be
    /// re-included by a `!` pattern? When this is false, every path below `dir` is excluded too
    /// and a context walker may skip the whole subtree. Conservative: may say true needlessly,
    /// never false wrongly.
    pub fn may_reinclude_below(&self, dir: &str) -> bool {
        if !self.exclusions {
            return false;
        }
        let mut dir_slash = dir.trim_end_matches('/').to_string();
        dir_slash.push('/');
        self.patterns
            .iter()
            .filter(|p| p.exclusion)
            .any(|p| p.may_match_below(&dir_slash))
    }

    /// True when there are no patterns (nothing is ever excluded).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// Whether `clean` would return `dir` unchanged, for a non-empty relative `dir`.
fn is_clean(dir: &str) -> bool {
    !dir.is_empty() && dir.split('/').all(|seg| !matches!(seg, "" | "." | ".."))
}

/// Reads a `.dockerignore` file's bytes into patterns, like moby's `ignorefile.ReadAll`: a UTF-8
/// BOM on line 1 is dropped, lines whose first character is `#` are comments, lines are trimmed
/// and blank ones skipped, and the rest (after a `!`, itself trimmed) is path-cleaned with one
/// leading `/` removed. A bare `!` stays `!` so that [`Matcher::new`] rejects it.
pub fn read_dockerignore(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF".as_slice()).unwrap_or(bytes);
    let text = String::from_utf8_lossy(bytes);
    let mut out = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = pattern.starts_with('!');
        if invert {
            pattern = pattern[1..].trim();
        }
        let mut body = String::new();
        if !pattern.is_empty() {
            body = clean(pattern);
            if body.len() > 1 && body.starts_with('/') {
                body.remove(0);
            }
        }
        out.push(if invert { format!("!{body}") } else { body });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(patterns: &[&str]) -> Matcher {
        Matcher::new(patterns).expect("patterns compile")
    }

    #[test]
    fn parent_directories_match() {
        let matcher = m(&["docs"]);
        assert!(matcher.matches("docs").unwrap());
        assert!(matcher.matches("docs/README.md").unwrap());
        assert!(matcher.matches("docs/a/b/c").unwrap());
        assert!(!matcher.matches("docsx/a").unwrap());
    }

    #[test]
    fn unclean_paths_use_cleaned_parents() {
        let matcher = m(&["a/b"]);
        assert!(matcher.matches("a//b/c").unwrap());
        assert!(matcher.matches("a/./b/c").unwrap());
        assert!(matcher.matches("a/b/c/").unwrap());
        assert!(matcher.matches("x/../a/b/c").unwrap());
        assert!(!matcher.matches("/a/b/c").unwrap());
        assert!(m(&["**"]).matches("/").unwrap());
        assert!(
            is_clean("a/b") && !is_clean("a//b") && !is_clean("./a") && !is_clean("a/..") && !is_clean("")
        );
    }

    #[test]
    fn last_match_wins() {
        let matcher = m(&["docs", "!docs/README.md"]);
        assert!(!matcher.matches("docs/README.md").unwrap());
        assert!(matcher.matches("docs/other.md").unwrap());
        let matcher = m(&["!fileutils.go", "*.go"]);
        assert!(matcher.matches("fileutils.go").unwrap());
    }

    #[test]
    fn errors() {
        assert_eq!(
            Matcher::new(&["a", "!"]).unwrap_err(),
            PatternError::BareExclusion { index: 1 }
        );
        assert!(matches!(Matcher::new(&["a["]), Err(PatternError::Syntax { .. })));
        let matcher = m(&["[Local-Only]/"]);
        for _ in 0..2 {
            let err = matcher.matches("x").unwrap_err();
            assert!(err.to_string().contains("[Local-Only]"), "{err}");
        }
    }

    #[test]
    fn empty_and_blank() {
        let matcher = m(&["", "   "]);
        assert!(matcher.is_empty());
        assert!(!matcher.matches("anything").unwrap());
        assert!(!matcher.has_exclusions());
    }

    #[test]
    fn reinclusion_below() {
        let matcher = m(&["node_modules", "build", "!build/keep", "!**/*.md"]);
        assert!(matcher.has_exclusions());
        assert!(matcher.may_reinclude_below("build"));
        assert!(
            matcher.may_reinclude_below("node_modules"),
            "`!**/*.md` can match below any dir"
        );
        let matcher = m(&["node_modules", "build", "!build/keep"]);
        assert!(!matcher.may_reinclude_below("node_modules"));
        assert!(matcher.may_reinclude_below("build/"));
        assert!(
            !matcher.may_reinclude_below("build/keep/x"),
            "exact `build/keep` is not below `build/keep/x`"
        );
        let matcher = m(&["*", "!src/*.rs"]);
        assert!(matcher.may_reinclude_below("src"));
        assert!(!matcher.may_reinclude_below("target"));
    }

    #[test]
    fn reinclude_claim_is_sound() {
        // Whenever may_reinclude_below says no for an excluded dir, every child must be excluded.
        let patterns = ["*", "!a/*/keep", "!b/**", "!c", "d/**", "!d/x*"];
        let matcher = m(&patterns);
        let dirs = ["a", "a/q", "b", "c", "d", "d/y", "e", "e/f"];
        let leaves = ["keep", "x1", "q/keep", "z"];
        for dir in dirs {
            if !matcher.matches(dir).unwrap() || matcher.may_reinclude_below(dir) {
                continue;
            }
            for leaf in leaves {
                let child = format!("{dir}/{leaf}");
                assert!(
                    matcher.matches(&child).unwrap(),
                    "{child} re-included below pruned {dir}"
                );
            }
        }
    }

    #[test]
    fn dockerignore_reading() {
        let file =
            b"\xEF\xBB\xBF# comment\r\n/abs/path\n\n  spaced  \n! /inverted/x/../y\n!\n #not-comment\nlast";
        assert_eq!(
            read_dockerignore(file),
            vec!["abs/path", "spaced", "!inverted/y", "!", "#not-comment", "last"]
        );
    }

    #[test]
    fn many_paths_are_fast() {
        let matcher = m(&[
            "**/*.log",
            "target",
            "!target/keep",
            "**/node_modules",
            "docs/**/*.md",
        ]);
        let start = std::time::Instant::now();
        let mut n = 0;
        for i in 0..20_000 {
            let path = format!("src/module{}/sub{}/file{}.rs", i % 50, i % 7, i);
            n += usize::from(matcher.matches(&path).unwrap());
        }
        assert_eq!(n, 0);
        eprintln!("20000 paths: {:?}", start.elapsed());
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
}
