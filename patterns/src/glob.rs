//! One `.dockerignore` pattern: syntax check, compilation and matching.
//!
//! moby's patternmatcher checks a pattern with Go's `filepath.Match` grammar, then classifies it
//! as an exact string, a prefix (`dir/**`), a suffix (`**/name`) or a regular expression built
//! from the glob. This module mirrors that classification, but instead of a regular expression
//! it compiles the glob into a token list matched by a small NFA simulation: linear in the path
//! length, no backtracking, no allocation beyond two state vectors.

/// Why a pattern was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    /// A `\` with nothing after it.
    #[error("trailing `\\` escapes nothing")]
    TrailingEscape,
    /// A `[` class that never closes.
    #[error("unterminated character class")]
    UnterminatedClass,
    /// A class item that starts with `-` or `]`, or an empty class.
    #[error("bad character class: item starts with `{0}`")]
    BadClassItem(char),
    /// A range whose low end is above its high end (`[l-O]`); upstream reports it when matching.
    #[error("invalid character class range `{lo}-{hi}`")]
    ReversedRange {
        /// Low end as written.
        lo: char,
        /// High end as written.
        hi: char,
    },
}

/// A bracket expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Class {
    negated: bool,
    ranges: Vec<(char, char)>,
}

impl Class {
    fn contains(&self, c: char) -> bool {
        self.ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != self.negated
    }
}

/// One element of a compiled glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Token {
    /// This exact character.
    Lit(char),
    /// `?`: one character other than `/`.
    AnyNoSlash,
    /// `*`: any run of characters other than `/`.
    StarNoSlash,
    /// `**` followed by more pattern: optionally any run (no newline) ending in `/`.
    OptDirs,
    /// `**` at the end of a pattern that is not a plain prefix: any run without a newline.
    AnyStar,
    /// `[...]`.
    Class(Class),
    /// An unescaped `^` outside a class, which upstream's regular expression reads as "start of
    /// text": it only matches at position 0.
    Anchor,
}

/// How a pattern is matched, after upstream's classification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The path equals the pattern.
    Exact(String),
    /// The path starts with this (pattern minus its trailing `**`).
    Prefix(String),
    /// The path ends with this (pattern minus its leading `**`), or equals it minus a leading `/`.
    Suffix(String),
    /// A general glob.
    Glob(Vec<Token>),
    /// Accepted by the syntax check, but the regular expression upstream builds is invalid:
    /// every match attempt fails with this error.
    Broken(GlobError),
}

/// Checks `pattern` against Go's `filepath.Match` grammar (Unix flavour: `\` escapes).
pub(crate) fn validate(pattern: &str) -> Result<(), GlobError> {
    let mut it = pattern.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\\' => {
                it.next().ok_or(GlobError::TrailingEscape)?;
            }
            '[' => {
                if it.peek() == Some(&'^') {
                    it.next();
                }
                let mut nrange = 0usize;
                loop {
                    if nrange > 0 && it.peek() == Some(&']') {
                        it.next();
                        break;
                    }
                    class_item(&mut it)?;
                    if it.peek() == Some(&'-') {
                        it.next();
                        class_item(&mut it)?;
                    }
                    nrange += 1;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Go's `getEsc`: one class item, which must be followed by more pattern.
fn class_item(it: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<char, GlobError> {
    let c = match it.next() {
        None => return Err(GlobError::UnterminatedClass),
        Some(c @ ('-' | ']')) => return Err(GlobError::BadClassItem(c)),
        Some('\\') => it.next().ok_or(GlobError::UnterminatedClass)?,
        Some(c) => c,
    };
    if it.peek().is_none() {
        return Err(GlobError::UnterminatedClass);
    }
    Ok(c)
}

/// Classifies and compiles a cleaned, validated pattern (without its `!`).
pub(crate) fn compile(pattern: &str) -> Kind {
    #[derive(PartialEq)]
    enum Detected {
        Exact,
        Prefix,
        Suffix,
        Regex,
    }
    let mut detected = Detected::Exact;
    let mut tokens = Vec::new();
    let mut broken = None;
    let mut it = pattern.chars().peekable();
    let mut first = true;
    while let Some(c) = it.next() {
        let at_start = std::mem::replace(&mut first, false);
        match c {
            '*' if it.peek() == Some(&'*') => {
                it.next();
                if it.peek() == Some(&'/') {
                    it.next();
                }
                if it.peek().is_none() {
                    if detected == Detected::Exact {
                        detected = Detected::Prefix;
                    } else {
                        tokens.push(Token::AnyStar);
                        detected = Detected::Regex;
                    }
                } else {
                    tokens.push(Token::OptDirs);
                    detected = Detected::Regex;
                }
                if at_start {
                    detected = Detected::Suffix;
                }
            }
            '*' => {
                tokens.push(Token::StarNoSlash);
                detected = Detected::Regex;
            }
            '?' => {
                tokens.push(Token::AnyNoSlash);
                detected = Detected::Regex;
            }
            '\\' => match it.next() {
                Some(n) => {
                    tokens.push(Token::Lit(n));
                    detected = Detected::Regex;
                }
                None => tokens.push(Token::Lit('\\')),
            },
            '[' => {
                detected = Detected::Regex;
                let (class, err) = compile_class(&mut it);
                if broken.is_none() {
                    broken = err;
                }
                tokens.push(Token::Class(class));
            }
            ']' => {
                tokens.push(Token::Lit(']'));
                detected = Detected::Regex;
            }
            '^' => tokens.push(Token::Anchor),
            other => tokens.push(Token::Lit(other)),
        }
    }
    match detected {
        Detected::Exact => Kind::Exact(pattern.to_string()),
        Detected::Prefix => Kind::Prefix(pattern[..pattern.len() - 2].to_string()),
        Detected::Suffix => Kind::Suffix(pattern[2..].to_string()),
        Detected::Regex => match broken {
            Some(e) => Kind::Broken(e),
            None => Kind::Glob(tokens),
        },
    }
}

/// Compiles a class body (after `[`) of a validated pattern; also reports a reversed range.
fn compile_class(it: &mut std::iter::Peekable<std::str::Chars<'_>>) -> (Class, Option<GlobError>) {
    let mut class = Class {
        negated: false,
        ranges: Vec::new(),
    };
    let mut err = None;
    if it.peek() == Some(&'^') {
        it.next();
        class.negated = true;
    }
    let item = |it: &mut std::iter::Peekable<std::str::Chars<'_>>| match it.next() {
        Some('\\') => it.next(),
        other => other,
    };
    loop {
        match it.peek() {
            None => break,
            Some(']') if !class.ranges.is_empty() => {
                it.next();
                break;
            }
            Some(_) => {}
        }
        let Some(lo) = item(it) else { break };
        let mut hi = lo;
        if it.peek() == Some(&'-') {
            it.next();
            match item(it) {
                Some(h) => hi = h,
                None => break,
            }
        }
        if lo > hi && err.is_none() {
            err = Some(GlobError::ReversedRange { lo, hi });
        }
        class.ranges.push((lo, hi));
    }
    (class, err)
}

/// A set of NFA positions `0..=n`.
trait Bits: Sized {
    fn empty(n: usize) -> Self;
    fn get(&self, i: usize) -> bool;
    fn set(&mut self, i: usize);
    fn any(&self) -> bool;
}

/// Patterns of fewer than 128 tokens (all real ones): no allocation at all.
impl Bits for u128 {
    fn empty(_: usize) -> u128 {
        0
    }
    fn get(&self, i: usize) -> bool {
        self >> i & 1 == 1
    }
    fn set(&mut self, i: usize) {
        *self |= 1 << i;
    }
    fn any(&self) -> bool {
        *self != 0
    }
}

impl Bits for Vec<bool> {
    fn empty(n: usize) -> Vec<bool> {
        vec![false; n + 1]
    }
    fn get(&self, i: usize) -> bool {
        self[i]
    }
    fn set(&mut self, i: usize) {
        self[i] = true;
    }
    fn any(&self) -> bool {
        self.iter().any(|&b| b)
    }
}

/// NFA state sets over a token list: `on` = about to match token `i` (`i == len` accepts);
/// `inside` = within the `.*` of an `OptDirs` token `i`, waiting for its closing `/`.
struct States<B> {
    on: B,
    inside: B,
}

impl<B: Bits> States<B> {
    fn new(n: usize) -> States<B> {
        States {
            on: B::empty(n),
            inside: B::empty(n),
        }
    }

    /// Follows the transitions that consume nothing, at text position `pos`.
    fn close(&mut self, tokens: &[Token], pos: usize) {
        for (i, tok) in tokens.iter().enumerate() {
            if !self.on.get(i) {
                continue;
            }
            match tok {
                Token::StarNoSlash | Token::OptDirs | Token::AnyStar => self.on.set(i + 1),
                Token::Anchor if pos == 0 => self.on.set(i + 1),
                _ => {}
            }
        }
    }

    fn alive(&self) -> bool {
        self.on.any() || self.inside.any()
    }
}

/// Runs the NFA over `text`; returns the final (closed) state set.
fn run<B: Bits>(tokens: &[Token], text: &str) -> States<B> {
    let n = tokens.len();
    let mut cur = States::<B>::new(n);
    cur.on.set(0);
    cur.close(tokens, 0);
    for (pos, c) in text.chars().enumerate() {
        let mut next = States::<B>::new(n);
        for (i, tok) in tokens.iter().enumerate() {
            if cur.inside.get(i) {
                if c != '\n' {
                    next.inside.set(i);
                }
                if c == '/' {
                    next.on.set(i + 1);
                }
            }
            if !cur.on.get(i) {
                continue;
            }
            match tok {
                Token::Lit(l) if *l == c => next.on.set(i + 1),
                Token::AnyNoSlash if c != '/' => next.on.set(i + 1),
                Token::Class(cl) if cl.contains(c) => next.on.set(i + 1),
                Token::StarNoSlash if c != '/' => next.on.set(i),
                Token::AnyStar if c != '\n' => next.on.set(i),
                Token::OptDirs => {
                    if c != '\n' {
                        next.inside.set(i);
                    }
                    if c == '/' {
                        next.on.set(i + 1);
                    }
                }
                _ => {}
            }
        }
        cur = next;
        if !cur.alive() {
            return cur;
        }
        cur.close(tokens, pos + 1);
    }
    cur
}

/// Whole-string match of a compiled glob.
pub(crate) fn glob_matches(tokens: &[Token], text: &str) -> bool {
    // Cheap necessary conditions first: the literal tokens at either end must be there.
    if !literal_ends_fit(tokens.iter(), text.chars())
        || !literal_ends_fit(tokens.iter().rev(), text.chars().rev())
    {
        return false;
    }
    if tokens.len() < 128 {
        run::<u128>(tokens, text).on.get(tokens.len())
    } else {
        run::<Vec<bool>>(tokens, text).on.get(tokens.len())
    }
}

/// Whether the run of `Lit` tokens at the start of `tokens` matches the start of `text`.
fn literal_ends_fit<'t>(
    tokens: impl Iterator<Item = &'t Token>,
    mut text: impl Iterator<Item = char>,
) -> bool {
    for tok in tokens {
        let Token::Lit(l) = tok else { return true };
        if text.next() != Some(*l) {
            return false;
        }
    }
    true
}

/// Whether some string starting with `prefix` (and longer than it) could match the glob.
/// Conservative: a live state means yes, except states that still need a start-of-text anchor.
pub(crate) fn glob_may_match_below(tokens: &[Token], prefix: &str) -> bool {
    fn check<B: Bits>(tokens: &[Token], prefix: &str) -> bool {
        let states = run::<B>(tokens, prefix);
        (0..=tokens.len()).any(|i| {
            states.inside.get(i)
                || (states.on.get(i) && !tokens[i..].iter().any(|t| matches!(t, Token::Anchor)))
        })
    }
    if tokens.len() < 128 {
        check::<u128>(tokens, prefix)
    } else {
        check::<Vec<bool>>(tokens, prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(p: &str) -> Vec<Token> {
        match compile(p) {
            Kind::Glob(t) => t,
            other => panic!("{p} compiled to {other:?}"),
        }
    }

    #[test]
    fn classification() {
        assert_eq!(compile("abc"), Kind::Exact("abc".into()));
        assert_eq!(compile("a.|)$(}+{bc"), Kind::Exact("a.|)$(}+{bc".into()));
        assert_eq!(compile("dir/**"), Kind::Prefix("dir/".into()));
        assert_eq!(compile("**"), Kind::Suffix(String::new()));
        assert_eq!(compile("**/foo/bar"), Kind::Suffix("/foo/bar".into()));
        assert!(matches!(compile("**/*.txt"), Kind::Glob(_)));
        assert!(matches!(compile("a\\*b"), Kind::Glob(_)));
        assert!(matches!(
            compile("[Local-Only]"),
            Kind::Broken(GlobError::ReversedRange { .. })
        ));
    }

    #[test]
    fn validation() {
        for bad in [
            "\\", "[", "[^", "a[", "[]a]", "[-]", "[x-]", "[-x]", "[a-b-c]", "[^bc", "[\\",
        ] {
            assert!(validate(bad).is_err(), "{bad} should be rejected");
        }
        for good in [
            "[\\]a]",
            "[x\\-]",
            "[\\-x]",
            "a\\*b",
            "]",
            "[a-ζ]*",
            "[Local-Only]",
            "a^b",
        ] {
            assert_eq!(validate(good), Ok(()), "{good} should be accepted");
        }
    }

    #[test]
    fn nfa_matching() {
        let t = glob("a**/*.txt");
        assert!(glob_matches(&t, "a/file.txt"));
        assert!(glob_matches(&t, "a/dir/dir/file.txt"));
        assert!(glob_matches(&t, "abc/file.txt"));
        assert!(!glob_matches(&t, "b/file.txt"));
        let t = glob("a*/b");
        assert!(glob_matches(&t, "abc/b"));
        assert!(!glob_matches(&t, "a/c/b"));
        let t = glob("a[^b-d]e");
        assert!(glob_matches(&t, "aze"));
        assert!(
            glob_matches(&t, "a/e"),
            "negated classes match `/` like upstream's regexp"
        );
        assert!(!glob_matches(&t, "ace"));
        let t = glob("a^*");
        assert!(
            !glob_matches(&t, "a^"),
            "`^` is a start anchor in upstream's regexp"
        );
        let t = glob("x/**/y*");
        assert!(glob_matches(&t, "x/y1"));
        assert!(!glob_matches(&t, "x/a\nb/y"), "`.*` does not cross a newline");
    }

    #[test]
    fn long_patterns_use_the_heap_states() {
        let pattern = format!("{}*/x", "ab".repeat(100));
        let t = glob(&pattern);
        assert!(t.len() >= 128);
        assert!(glob_matches(&t, &format!("{}zz/x", "ab".repeat(100))));
        assert!(!glob_matches(&t, &format!("{}zz/y", "ab".repeat(100))));
        assert!(glob_may_match_below(&t, &format!("{}/", "ab".repeat(100))));
    }

    #[test]
    fn below() {
        let t = glob("dir/*/keep");
        assert!(glob_may_match_below(&t, "dir/"));
        assert!(glob_may_match_below(&t, "dir/sub/"));
        assert!(!glob_may_match_below(&t, "other/"));
        assert!(!glob_may_match_below(&t, "dir/sub/deeper/"));
    }
}
