//! Shell-word expansion (BuildKit lexer semantics).
//!
//! BuildKit expands variables in most Dockerfile instruction arguments with its own small shell
//! lexer, not with a real shell. [`Lexer`] reproduces it: `$NAME`, `${NAME}`, the modifiers
//! `:- - :+ + :? ? # ## % %% / //`, single and double quotes, the escape character (`\`, or the
//! one chosen with `# escape=`), and, for [`Lexer::process_words`], field splitting.
//!
//! Quirks kept on purpose because BuildKit has them: positional and special parameters (`$1`,
//! `$@`, `$$`, ...) always expand to nothing; a `$` before anything else stays literal; `""`
//! produces no word when splitting; patterns in `#`/`%`/`/` modifiers always use `\` as their own
//! escape, whatever the escape character; `*` and `?` in those patterns do not match a newline;
//! and `${N//p/r}` treats `$0`/`${0}` in `r` as the matched text and `$$` as `$` (Go's regexp
//! replacement template), while `${N/p/r}` inserts `r` literally.

use std::collections::BTreeSet;

/// Errors from expanding one word. Every variant names the word being processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    /// A `'` without its closing `'`.
    #[error("unexpected end of statement while looking for matching single-quote in `{word}`")]
    UnterminatedSingleQuote {
        /// The word being processed.
        word: String,
    },
    /// A `"` without its closing `"`.
    #[error("unexpected end of statement while looking for matching double-quote in `{word}`")]
    UnterminatedDoubleQuote {
        /// The word being processed.
        word: String,
    },
    /// A `${` without its closing `}`.
    #[error("syntax error: missing '}}' in `{word}`")]
    MissingBrace {
        /// The word being processed.
        word: String,
    },
    /// `${}`, `${{...}`, `${:...}`.
    #[error("syntax error: bad substitution in `{word}`")]
    BadSubstitution {
        /// The word being processed.
        word: String,
    },
    /// A `${NAME<modifier>...}` whose modifier BuildKit does not support (`:=`, `=`, `:#`, `:x`, ...).
    #[error("unsupported modifier ({modifier}) in substitution in `{word}`")]
    UnsupportedModifier {
        /// The word being processed.
        word: String,
        /// The modifier as written (one or two characters).
        modifier: String,
    },
    /// `${NAME/pattern` without the `/` that ends the pattern.
    #[error("syntax error: missing '/' in ${{}} in `{word}`")]
    MissingSlash {
        /// The word being processed.
        word: String,
    },
    /// `${NAME?message}` with NAME unset, or `${NAME:?message}` with NAME unset or empty.
    #[error("{name}: {message} (in `{word}`)")]
    Required {
        /// The word being processed.
        word: String,
        /// The variable.
        name: String,
        /// The expanded message, or BuildKit's default one.
        message: String,
    },
    /// A `#`, `%` or `/` pattern with a `\` that escapes something other than `*`, `?`, `\`,
    /// `}` or `/` (or nothing).
    #[error("invalid pattern ({pattern}) in substitution in `{word}`: invalid escape '\\{escaped}'")]
    InvalidPatternEscape {
        /// The word being processed.
        word: String,
        /// The pattern after expansion.
        pattern: String,
        /// What followed the `\` (empty at the end of the pattern).
        escaped: String,
    },
    /// `${` nested more than [`MAX_NESTING`] levels deep.
    #[error("substitutions nested deeper than {MAX_NESTING} levels in `{word}`")]
    TooDeep {
        /// The word being processed.
        word: String,
    },
}

/// Nesting limit for `${...}` inside `${...}`, so that no input can exhaust the stack.
pub const MAX_NESTING: usize = 200;

/// The result of [`Lexer::process_word_with_matches`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expanded {
    /// The expanded word.
    pub result: String,
    /// Variables the word referred to that were set (possibly to the empty string).
    pub matched: BTreeSet<String>,
    /// Variables the word referred to that were unset.
    pub unmatched: BTreeSet<String>,
}

/// BuildKit's shell-word lexer, parameterised by the escape character and, as BuildKit's `Lex`,
/// by options that the heredoc scan of the parser uses (`RawQuotes`, `RawEscapes`,
/// `SkipUnsetEnv`): see [`Lexer::raw_quotes`] & co.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lexer {
    escape: char,
    raw_quotes: bool,
    raw_escapes: bool,
    skip_unset_env: bool,
    heredoc_markers: bool,
}

impl Default for Lexer {
    fn default() -> Lexer {
        Lexer::new('\\')
    }
}

impl Lexer {
    /// A lexer whose escape character is `escape` (`\` by default, `` ` `` with `# escape=``).
    pub fn new(escape: char) -> Lexer {
        Lexer {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_unset_env: false,
            heredoc_markers: false,
        }
    }

    /// Quotes stay in the result (`'a b'` gives `'a b'`, still one word).
    pub fn raw_quotes(self, on: bool) -> Lexer {
        Lexer {
            raw_quotes: on,
            ..self
        }
    }

    /// Escape characters stay in the result (`a\ b` gives `a\ b`, still one word).
    pub fn raw_escapes(self, on: bool) -> Lexer {
        Lexer {
            raw_escapes: on,
            ..self
        }
    }

    /// An unset variable stays as written (`$A`, `${A:-x}`) instead of expanding.
    pub fn skip_unset_env(self, on: bool) -> Lexer {
        Lexer {
            skip_unset_env: on,
            ..self
        }
    }

    /// `<<` and the blanks after it stay with the word that follows (`<< EOF` is one word), as
    /// BuildKit's lexer keeps heredoc markers for `heredocsFromLine`.
    pub fn heredoc_markers(self, on: bool) -> Lexer {
        Lexer {
            heredoc_markers: on,
            ..self
        }
    }

    /// The escape character.
    pub fn escape(&self) -> char {
        self.escape
    }

    /// One word: expansion + quote removal + escapes, no splitting (ENV/LABEL values, WORKDIR,
    /// USER, ...).
    pub fn process_word(
        &self,
        word: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<String, ShellError> {
        Ok(self.process_word_with_matches(word, env)?.result)
    }

    /// Same as [`process_word`](Lexer::process_word), also reporting which variable names were
    /// referenced and set / unset.
    pub fn process_word_with_matches(
        &self,
        word: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Expanded, ShellError> {
        let mut sw = ShellWord::new(self, word, env);
        let (result, _) = sw.process_stop_on(None, self.raw_escapes)?;
        Ok(Expanded {
            result,
            matched: sw.matched,
            unmatched: sw.unmatched,
        })
    }

    /// Expansion then field splitting (FROM, COPY/ADD sources, EXPOSE, VOLUME): unquoted
    /// whitespace, including whitespace produced by an unquoted expansion, separates words;
    /// empty words (even `""`) are dropped.
    pub fn process_words(
        &self,
        word: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<String>, ShellError> {
        let mut sw = ShellWord::new(self, word, env);
        let (_, words) = sw.process_stop_on(None, self.raw_escapes)?;
        Ok(words)
    }
}

/// Field-splitting accumulator.
#[derive(Default)]
struct Words {
    word: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    /// A character subject to splitting.
    fn add_char(&mut self, c: char) {
        if c.is_whitespace() {
            if self.in_word && !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(c);
        }
    }

    fn add_raw_char(&mut self, c: char) {
        self.word.push(c);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
    }

    fn add_raw_string(&mut self, s: &str) {
        self.word.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(self.word);
        }
        self.words
    }
}

/// The state of processing one word.
struct ShellWord<'a> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    raw_escapes: bool,
    raw_quotes: bool,
    skip_unset_env: bool,
    heredoc_markers: bool,
    /// How many `process_stop_on` calls are open (bounded by [`MAX_NESTING`]).
    depth: usize,
    env: &'a dyn Fn(&str) -> Option<String>,
    source: &'a str,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

impl<'a> ShellWord<'a> {
    fn new(lexer: &Lexer, source: &'a str, env: &'a dyn Fn(&str) -> Option<String>) -> ShellWord<'a> {
        let mut chars: Vec<char> = source.chars().collect();
        // Go's text/scanner, which BuildKit reads words with, skips a leading byte-order mark.
        if chars.first() == Some(&'\u{feff}') {
            chars.remove(0);
        }
        ShellWord {
            chars,
            pos: 0,
            escape: lexer.escape,
            raw_escapes: false,
            raw_quotes: lexer.raw_quotes,
            skip_unset_env: lexer.skip_unset_env,
            heredoc_markers: lexer.heredoc_markers,
            depth: 0,
            env,
            source,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn word(&self) -> String {
        self.source.to_string()
    }

    fn get_env(&mut self, name: &str) -> Option<String> {
        let value = (self.env)(name);
        if value.is_some() {
            self.matched.insert(name.to_string());
        } else {
            self.unmatched.insert(name.to_string());
        }
        value
    }

    /// Processes up to `stop` (consumed) or the end of the word when `stop` is `None`.
    /// Returns the word and its split fields.
    fn process_stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), ShellError> {
        if self.depth >= MAX_NESTING {
            return Err(ShellError::TooDeep { word: self.word() });
        }
        self.depth += 1;
        let saved = std::mem::replace(&mut self.raw_escapes, raw_escapes);
        let out = self.process_stop_on_inner(stop);
        self.raw_escapes = saved;
        self.depth -= 1;
        out
    }

    fn process_stop_on_inner(&mut self, stop: Option<char>) -> Result<(String, Vec<String>), ShellError> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.pos += 1;
                return Ok((result, words.finish()));
            }
            match c {
                '$' => {
                    let tmp = self.process_dollar()?;
                    result.push_str(&tmp);
                    words.add_string(&tmp);
                }
                '\'' => {
                    let tmp = self.process_single_quote()?;
                    result.push_str(&tmp);
                    words.add_raw_string(&tmp);
                }
                '"' => {
                    let tmp = self.process_double_quote()?;
                    result.push_str(&tmp);
                    words.add_raw_string(&tmp);
                }
                '<' if self.heredoc_markers => {
                    let tmp = self.process_possible_heredoc();
                    result.push_str(&tmp);
                    words.add_raw_string(&tmp);
                }
                _ => {
                    self.pos += 1;
                    if c == self.escape {
                        if self.raw_escapes {
                            words.add_raw_char(c);
                            result.push(c);
                        }
                        // The escape character escapes the next one; a trailing one is dropped.
                        let Some(escaped) = self.next() else { break };
                        words.add_raw_char(escaped);
                        result.push(escaped);
                    } else {
                        words.add_char(c);
                        result.push(c);
                    }
                }
            }
        }
        match stop {
            None => Ok((result, words.finish())),
            Some('/') => Err(ShellError::MissingSlash { word: self.word() }),
            Some(_) => Err(ShellError::MissingBrace { word: self.word() }),
        }
    }

    /// `<` alone, or `<<` with the blanks after it.
    fn process_possible_heredoc(&mut self) -> String {
        self.pos += 1;
        if self.peek() != Some('<') {
            return "<".to_string();
        }
        self.pos += 1;
        let mut out = String::from("<<");
        while let Some(c @ (' ' | '\t')) = self.peek() {
            out.push(c);
            self.pos += 1;
        }
        out
    }

    /// `'...'`: everything literal up to the next `'`.
    fn process_single_quote(&mut self) -> Result<String, ShellError> {
        self.pos += 1;
        let mut result = String::new();
        if self.raw_quotes {
            result.push('\'');
        }
        loop {
            match self.next() {
                None => return Err(ShellError::UnterminatedSingleQuote { word: self.word() }),
                Some('\'') => {
                    if self.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    /// `"..."`: `$` expands; the escape character escapes `"`, `$` and itself, and is kept
    /// before anything else.
    fn process_double_quote(&mut self) -> Result<String, ShellError> {
        self.pos += 1;
        let mut result = String::new();
        if self.raw_quotes {
            result.push('"');
        }
        loop {
            match self.peek() {
                None => return Err(ShellError::UnterminatedDoubleQuote { word: self.word() }),
                Some('"') => {
                    self.pos += 1;
                    if self.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let value = self.process_dollar()?;
                    result.push_str(&value);
                }
                Some(c) => {
                    self.pos += 1;
                    let mut ch = c;
                    if c == self.escape {
                        if self.raw_escapes {
                            result.push(c);
                        }
                        match self.peek() {
                            // Dropped here; the loop then reports the missing quote.
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.escape => {
                                self.pos += 1;
                                ch = n;
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    /// A name after `$` or `${`: a run of digits, one special parameter character, or letters,
    /// digits and `_`. Empty when none of these follows.
    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if name.is_empty() && is_digit(c) {
                while let Some(d) = self.peek().filter(|&d| is_digit(d)) {
                    self.pos += 1;
                    name.push(d);
                }
                return name;
            }
            if name.is_empty() && matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.pos += 1;
                name.push(c);
                return name;
            }
            if !is_letter(c) && !is_digit(c) && c != '_' {
                break;
            }
            self.pos += 1;
            name.push(c);
        }
        name
    }

    fn process_dollar(&mut self) -> Result<String, ShellError> {
        self.pos += 1; // the `$`
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            return Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.skip_unset_env => format!("${name}"),
                None => String::new(),
            });
        }
        self.pos += 1; // the `{`
        match self.peek() {
            None => return Err(ShellError::MissingBrace { word: self.word() }),
            Some('{' | '}' | ':') => return Err(ShellError::BadSubstitution { word: self.word() }),
            Some(_) => {}
        }
        let name = self.process_name();
        let Some(first) = self.next() else {
            return Err(ShellError::MissingBrace { word: self.word() });
        };
        match first {
            '}' => Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.skip_unset_env => format!("${{{name}}}"),
                None => String::new(),
            }),
            '/' => self.process_replace(&name),
            ':' | '+' | '-' | '?' | '#' | '%' => {
                let (null_is_unset, op, modifier) = if first == ':' {
                    let op = self.next();
                    let modifier: String = [Some(':'), op].into_iter().flatten().collect();
                    (true, op, modifier)
                } else {
                    (false, Some(first), first.to_string())
                };
                let raw = matches!(op, Some('#' | '%'));
                let unsupported = null_is_unset && raw;
                // An unset variable kept as written keeps any modifier, even one not supported.
                if unsupported && !self.skip_unset_env {
                    return Err(ShellError::UnsupportedModifier {
                        word: self.word(),
                        modifier,
                    });
                }
                let word = self.process_stop_on_brace(raw)?;
                let value = self.get_env(&name);
                if value.is_none() && self.skip_unset_env {
                    return Ok(format!("${{{name}{modifier}{word}}}"));
                }
                if unsupported {
                    return Err(ShellError::UnsupportedModifier {
                        word: self.word(),
                        modifier,
                    });
                }
                self.apply_modifier(&name, op, &modifier, null_is_unset, word, value)
            }
            other => Err(ShellError::UnsupportedModifier {
                word: self.word(),
                modifier: other.to_string(),
            }),
        }
    }

    /// The text of a modifier up to `}`; an error at the end of the word means a missing `}`.
    fn process_stop_on_brace(&mut self, raw_escapes: bool) -> Result<String, ShellError> {
        match self.process_stop_on(Some('}'), raw_escapes) {
            Ok((word, _)) => Ok(word),
            Err(e) if self.peek().is_none() && !matches!(e, ShellError::TooDeep { .. }) => {
                Err(ShellError::MissingBrace { word: self.word() })
            }
            Err(e) => Err(e),
        }
    }

    fn apply_modifier(
        &self,
        name: &str,
        op: Option<char>,
        modifier: &str,
        null_is_unset: bool,
        word: String,
        value: Option<String>,
    ) -> Result<String, ShellError> {
        let unset_like = match &value {
            None => true,
            Some(v) => null_is_unset && v.is_empty(),
        };
        match op {
            Some('-') => Ok(if unset_like {
                word
            } else {
                value.unwrap_or_default()
            }),
            Some('+') => Ok(if unset_like { String::new() } else { word }),
            Some('?') => {
                let default = match &value {
                    None => "is not allowed to be unset",
                    Some(_) if unset_like => "is not allowed to be empty",
                    Some(v) => return Ok(v.clone()),
                };
                let message = if word.is_empty() {
                    default.to_string()
                } else {
                    word
                };
                Err(ShellError::Required {
                    word: self.word(),
                    name: name.to_string(),
                    message,
                })
            }
            Some(op @ ('#' | '%')) => {
                // `##` / `%%` (checked after expansion, as BuildKit does) remove the longest match.
                let (greedy, pattern) = match word.strip_prefix(op) {
                    Some(rest) => (true, rest.to_string()),
                    None => (false, word),
                };
                let value: Vec<char> = value.unwrap_or_default().chars().collect();
                if op == '#' {
                    let tokens = self.shell_pattern(&pattern, greedy)?;
                    let cut = Matcher::new(&tokens, &value).match_at(0).unwrap_or(0);
                    Ok(value[cut..].iter().collect())
                } else {
                    let tokens = self.shell_pattern(&reverse_pattern(&pattern), greedy)?;
                    let reversed: Vec<char> = value.iter().rev().copied().collect();
                    let cut = Matcher::new(&tokens, &reversed).match_at(0).unwrap_or(0);
                    Ok(reversed[cut..].iter().rev().collect())
                }
            }
            _ => Err(ShellError::UnsupportedModifier {
                word: self.word(),
                modifier: modifier.to_string(),
            }),
        }
    }

    /// `${NAME/pattern/replacement}` and `${NAME//pattern/replacement}`, after the first `/`.
    fn process_replace(&mut self, name: &str) -> Result<String, ShellError> {
        let all = self.peek() == Some('/');
        if all {
            self.pos += 1;
        }
        let pattern = match self.process_stop_on(Some('/'), true) {
            Ok((p, _)) => p,
            Err(e) if self.peek().is_none() && !matches!(e, ShellError::TooDeep { .. }) => {
                return Err(ShellError::MissingSlash { word: self.word() })
            }
            Err(e) => return Err(e),
        };
        let replacement = self.process_stop_on_brace(true)?;
        let value = self.get_env(name);
        if value.is_none() && self.skip_unset_env {
            // As BuildKit writes it back: one `/`, whichever was given.
            return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
        }
        let value: Vec<char> = value.unwrap_or_default().chars().collect();
        let tokens = self.shell_pattern(&pattern, true)?;
        let mut matcher = Matcher::new(&tokens, &value);
        if !all {
            let Some((start, end)) = matcher.find(0) else {
                return Ok(value.iter().collect());
            };
            let mut out: String = value[..start].iter().collect();
            out.push_str(&replacement);
            out.extend(&value[end..]);
            return Ok(out);
        }
        // Go's regexp.ReplaceAllString loop, with its `$` template in the replacement.
        let mut out = String::new();
        let (mut last_end, mut search) = (0usize, 0usize);
        while search <= value.len() {
            let Some((start, end)) = matcher.find(search) else {
                break;
            };
            out.extend(&value[last_end..start]);
            if end > last_end || start == 0 {
                expand_template(&replacement, &value[start..end], &mut out);
            }
            last_end = end;
            search = (search + 1).max(end);
        }
        out.extend(&value[last_end..]);
        Ok(out)
    }

    /// Compiles a `#`/`%`/`/` pattern: `*` (lazy unless `greedy`), `?`, and `\` escaping `*`, `?`
    /// or `\` (a `\` before `}` or `/` is dropped). Everything else is literal.
    fn shell_pattern(&self, pattern: &str, greedy: bool) -> Result<Vec<Pat>, ShellError> {
        let mut chars: Vec<char> = pattern.chars().collect();
        if chars.first() == Some(&'\u{feff}') {
            chars.remove(0);
        }
        let mut out = Vec::with_capacity(chars.len());
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            match c {
                '*' => out.push(Pat::Star { greedy }),
                '?' => out.push(Pat::Any),
                '\\' => match chars.get(i) {
                    Some('}' | '/') => {}
                    Some(&n @ ('*' | '?' | '\\')) => {
                        i += 1;
                        out.push(Pat::Lit(n));
                    }
                    other => {
                        return Err(ShellError::InvalidPatternEscape {
                            word: self.word(),
                            pattern: pattern.to_string(),
                            escaped: other.map(|c| c.to_string()).unwrap_or_default(),
                        })
                    }
                },
                other => out.push(Pat::Lit(other)),
            }
        }
        Ok(out)
    }
}

/// Go's `unicode.IsDigit` for the characters that matter; non-ASCII decimal digits count too.
fn is_digit(c: char) -> bool {
    c.is_ascii_digit() || (!c.is_ascii() && c.is_numeric() && !c.is_alphabetic())
}

/// Go's `unicode.IsLetter`, approximated by the Unicode `Alphabetic` property.
fn is_letter(c: char) -> bool {
    c.is_alphabetic()
}

/// One element of a `#`/`%`/`/` pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pat {
    Lit(char),
    /// `?`: any character but a newline.
    Any,
    /// `*`: any run without a newline; greedy tries the longest first, lazy the shortest.
    Star {
        greedy: bool,
    },
}

/// Leftmost-first (Perl/Go regexp) matching of one pattern against one text. Whether the
/// pattern's tail from token `ti` fails at `pos` does not depend on where the match started, so
/// one memo serves every start of a search and every search of a `//` replacement: at most
/// tokens × text entries computed once, where a memo per start cleared (tokens × text) bytes at
/// each of the text's positions (a 3 KB Dockerfile's `${A//*x*/y}` then took minutes).
struct Matcher<'a> {
    tokens: &'a [Pat],
    text: &'a [char],
    failed: Vec<bool>,
}

impl<'a> Matcher<'a> {
    fn new(tokens: &'a [Pat], text: &'a [char]) -> Matcher<'a> {
        Matcher {
            tokens,
            text,
            failed: vec![false; (tokens.len() + 1) * (text.len() + 1)],
        }
    }

    /// The end of the first match in priority order starting exactly at `start`.
    fn match_at(&mut self, start: usize) -> Option<usize> {
        if start > self.text.len() {
            return None;
        }
        self.go(0, start)
    }

    fn go(&mut self, ti: usize, pos: usize) -> Option<usize> {
        let slot = ti * (self.text.len() + 1) + pos;
        if self.failed[slot] {
            return None;
        }
        let found = match self.tokens.get(ti) {
            None => Some(pos),
            Some(Pat::Lit(l)) => match self.text.get(pos) {
                Some(c) if c == l => self.go(ti + 1, pos + 1),
                _ => None,
            },
            Some(Pat::Any) => match self.text.get(pos) {
                Some(&c) if c != '\n' => self.go(ti + 1, pos + 1),
                _ => None,
            },
            Some(&Pat::Star { greedy }) => {
                let run = self.text[pos..].iter().take_while(|&&c| c != '\n').count();
                if greedy {
                    (0..=run).rev().find_map(|n| self.go(ti + 1, pos + n))
                } else {
                    (0..=run).find_map(|n| self.go(ti + 1, pos + n))
                }
            }
        };
        if found.is_none() {
            self.failed[slot] = true;
        }
        found
    }

    /// The leftmost match starting at or after `from`, as (start, end).
    fn find(&mut self, from: usize) -> Option<(usize, usize)> {
        (from..=self.text.len()).find_map(|s| self.match_at(s).map(|e| (s, e)))
    }
}

/// Reverses a pattern for suffix matching, keeping each `\x` escape pair in order.
fn reverse_pattern(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let Some(last) = chars.len().checked_sub(1) else {
        return String::new();
    };
    let mut out = vec!['\0'; chars.len()];
    let mut i = 0;
    while i <= last {
        let out_idx = last - i;
        if chars[i] == '\\' && i != last {
            out[out_idx - 1] = '\\';
            out[out_idx] = chars[i + 1];
            i += 2;
        } else {
            out[out_idx] = chars[i];
            i += 1;
        }
    }
    out.into_iter().collect()
}

/// Go's `regexp.Expand` for a pattern without groups: `$$` is `$`, `$0` / `${0}` is the match,
/// any other well-formed `$name` / `${name}` is empty, and a malformed `$` stays literal.
fn expand_template(template: &str, whole: &[char], out: &mut String) {
    let mut rest = template;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        let (braced, body) = match rest.strip_prefix('{') {
            Some(b) => (true, b),
            None => (false, rest),
        };
        let len: usize = body
            .chars()
            .take_while(|&c| is_letter(c) || is_digit(c) || c == '_')
            .map(char::len_utf8)
            .sum();
        let name = &body[..len];
        let after = &body[len..];
        let after = match (name.is_empty(), braced) {
            (true, _) => None,
            (false, true) => after.strip_prefix('}'),
            (false, false) => Some(after),
        };
        let Some(after) = after else {
            out.push('$');
            continue;
        };
        if name == "0" {
            out.extend(whole);
        }
        rest = after;
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    fn word(lexer: Lexer, input: &str, vars: &[(&str, &str)]) -> Result<String, ShellError> {
        lexer.process_word(input, &env(vars))
    }

    #[test]
    fn replace_all_over_a_long_value_matches_at_every_position() {
        // One memo for the whole search: each start reuses what earlier starts learnt (a 3 KB
        // fuzz input with such a value took minutes when every start cleared a memo of its own).
        let value = "xa".repeat(2000);
        let vars = [("A", value.as_str())];
        assert_eq!(
            word(Lexer::default(), "${A//a/-}", &vars).unwrap(),
            "x-".repeat(2000)
        );
        assert_eq!(word(Lexer::default(), "${A//x*a/y}", &vars).unwrap(), "y");
        assert_eq!(
            word(Lexer::default(), "${A/a?a/_}", &vars).unwrap(),
            format!("x_{}", "xa".repeat(1998))
        );
        assert_eq!(word(Lexer::default(), "${A//q*/z}", &vars).unwrap(), value);
        assert_eq!(word(Lexer::default(), "${A##*x}", &vars).unwrap(), "a");
        assert_eq!(word(Lexer::default(), "${A%%a*}", &vars).unwrap(), "x");
    }

    #[test]
    fn basic_expansion() {
        let l = Lexer::default();
        let vars = [("A", "x y"), ("E", "")];
        assert_eq!(word(l, "$A-${A}", &vars).unwrap(), "x y-x y");
        assert_eq!(word(l, "${E:-d}${E-d}${U-d}", &vars).unwrap(), "dd");
        assert_eq!(word(l, "${A:+p}${E:+p}${E+p}", &vars).unwrap(), "pp");
        assert_eq!(word(l, "'$A'\"$A\"\\$A", &vars).unwrap(), "$Ax y$A");
        assert_eq!(word(l, "$1$@$$$#${0}z", &vars).unwrap(), "z");
        assert_eq!(word(l, "a$", &vars).unwrap(), "a$");
    }

    #[test]
    fn errors_name_the_word() {
        let l = Lexer::default();
        let err = word(l, "pre${X:?must be set}", &[]).unwrap_err();
        assert_eq!(err.to_string(), "X: must be set (in `pre${X:?must be set}`)");
        assert!(matches!(
            word(l, "${X", &[]),
            Err(ShellError::MissingBrace { .. })
        ));
        assert!(matches!(
            word(l, "${}", &[]),
            Err(ShellError::BadSubstitution { .. })
        ));
        assert!(matches!(
            word(l, "${X:=a}", &[]),
            Err(ShellError::UnsupportedModifier { .. })
        ));
        assert!(matches!(
            word(l, "'a", &[]),
            Err(ShellError::UnterminatedSingleQuote { .. })
        ));
        assert!(matches!(
            word(l, "\"a", &[]),
            Err(ShellError::UnterminatedDoubleQuote { .. })
        ));
        assert!(matches!(
            word(l, "${X/a}", &[]),
            Err(ShellError::MissingSlash { .. })
        ));
        assert!(matches!(
            word(l, "${X#\\a}", &[("X", "a")]),
            Err(ShellError::InvalidPatternEscape { .. })
        ));
    }

    #[test]
    fn pattern_modifiers() {
        let l = Lexer::default();
        let vars = [("P", "/usr/local/bin/tool.tar.gz")];
        assert_eq!(word(l, "${P#*/}", &vars).unwrap(), "usr/local/bin/tool.tar.gz");
        assert_eq!(word(l, "${P##*/}", &vars).unwrap(), "tool.tar.gz");
        assert_eq!(word(l, "${P%.*}", &vars).unwrap(), "/usr/local/bin/tool.tar");
        assert_eq!(word(l, "${P%%.*}", &vars).unwrap(), "/usr/local/bin/tool");
        assert_eq!(
            word(l, "${P/local/opt}", &vars).unwrap(),
            "/usr/opt/bin/tool.tar.gz"
        );
        assert_eq!(
            word(l, "${P//\\//_}", &vars).unwrap(),
            "_usr_local_bin_tool.tar.gz"
        );
        // Go's replacement template: `$0` is the match (only in the replace-all form).
        assert_eq!(
            word(l, "${P//o/<\\$0>}", &vars).unwrap(),
            "/usr/l<\\o>cal/bin/t<\\o><\\o>l.tar.gz"
        );
        assert_eq!(
            word(l, "${P/o/<\\$0>}", &vars).unwrap(),
            "/usr/l<\\$0>cal/bin/tool.tar.gz"
        );
        assert_eq!(word(l, "${P//x*/y}", &[("P", "ab")]).unwrap(), "ab");
        assert_eq!(word(l, "${P//*/y}", &[("P", "ab")]).unwrap(), "y");
        assert_eq!(word(l, "${P//?/-}", &[("P", "한국")]).unwrap(), "--");
    }

    #[test]
    fn splitting() {
        let l = Lexer::default();
        let vars = [("S", " a  b ")];
        let words = |input: &str| l.process_words(input, &env(&vars)).unwrap();
        assert_eq!(words("x${S}y"), ["x", "a", "b", "y"]);
        assert_eq!(words("x\"${S}\"y"), ["x a  b y"]);
        assert_eq!(words("\"\" ''  z"), ["z"]);
        assert_eq!(words("a\\ b c"), ["a b", "c"]);
        assert!(words("   ").is_empty());
    }

    #[test]
    fn backtick_escape() {
        let l = Lexer::new('`');
        let vars = [("A", "v")];
        assert_eq!(word(l, "C:\\path\\$A", &vars).unwrap(), "C:\\path\\v");
        assert_eq!(word(l, "`$A", &vars).unwrap(), "$A");
        assert_eq!(word(l, "\"`\"`$A``x\"", &vars).unwrap(), "\"$A`x");
        assert_eq!(word(l, "\"\\\"", &vars).unwrap(), "\\");
        assert_eq!(word(l, "a``b`", &vars).unwrap(), "a`b");
        assert_eq!(l.process_words("a` b c", &env(&vars)).unwrap(), ["a b", "c"]);
        // The pattern language keeps `\` as its escape; `` ` `` is kept raw before `*`.
        assert_eq!(word(l, "${A#\\*}", &[("A", "*x")]).unwrap(), "x");
        assert_eq!(word(l, "${A#`*}", &[("A", "`yx")]).unwrap(), "yx");
        assert_eq!(word(l, "${A##`*}", &[("A", "`yx")]).unwrap(), "");
    }

    #[test]
    fn matches_are_reported() {
        let l = Lexer::default();
        let got = l
            .process_word_with_matches("$A ${B:-x} ${C#y}", &env(&[("A", "1"), ("C", "")]))
            .unwrap();
        assert_eq!(got.result, "1 x ");
        assert_eq!(got.matched, BTreeSet::from(["A".to_string(), "C".to_string()]));
        assert_eq!(got.unmatched, BTreeSet::from(["B".to_string()]));
    }

    #[test]
    fn never_panics_on_odd_input() {
        let l = Lexer::default();
        let vars = [("K", "한국어"), ("N", "a\nb")];
        let inputs = [
            "",
            "$",
            "${",
            "${K",
            "${K:",
            "${K:-",
            "${K/",
            "${K//",
            "${K/a/",
            "${K#",
            "${K%\\",
            "\\",
            "\"\\",
            "'",
            "${K%%?}",
            "${K#?}",
            "${K/?/}",
            "${N//*/x}",
            "${N%\\}}",
            "${K:?}",
            "\u{feff}$K",
            "${K%%국*}",
            "${K##*국}",
            "$\u{300}",
            "${K/국/\\$$}",
        ];
        for input in inputs {
            let _ = word(l, input, &vars);
            let _ = l.process_words(input, &env(&vars));
        }
        assert_eq!(word(l, "${K%%국*}", &vars).unwrap(), "한");
        assert_eq!(word(l, "${K#?}", &vars).unwrap(), "국어");
        assert_eq!(word(l, "${N//*/x}", &vars).unwrap(), "x\nx");
        assert_eq!(word(l, "\u{feff}$K", &vars).unwrap(), "한국어");
    }

    #[test]
    fn heredoc_options_keep_what_they_name() {
        let vars = [("A", "x y")];
        let words = |l: Lexer, input: &str| l.process_words(input, &env(&vars)).unwrap();
        let plain = Lexer::default();
        assert_eq!(words(plain, "'a b' c\\ d"), ["a b", "c d"]);
        let raw = plain.raw_quotes(true).raw_escapes(true);
        assert_eq!(words(raw, "'a b' \"$A\" c\\ d"), ["'a b'", "\"x y\"", "c\\ d"]);
        // Unset variables stay as written, modifiers and all; set ones still expand.
        let skip = plain.skip_unset_env(true);
        assert_eq!(
            word(skip, "$U ${U} ${U:-'d'} ${U/a/b} ${U:#p} $A", &vars).unwrap(),
            "$U ${U} ${U:-d} ${U/a/b} ${U:#p} x y"
        );
        // A supported modifier is still checked on a set variable.
        assert!(matches!(
            word(skip, "${A:#p}", &vars),
            Err(ShellError::UnsupportedModifier { .. })
        ));
        // `<<` keeps the blanks after it, with the next word.
        assert_eq!(words(plain, "cat << EOF"), ["cat", "<<", "EOF"]);
        assert_eq!(
            words(plain.heredoc_markers(true), "cat << EOF <x"),
            ["cat", "<< EOF", "<x"]
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!(
            "{}x{}",
            "${U:-".repeat(MAX_NESTING + 5),
            "}".repeat(MAX_NESTING + 5)
        );
        assert!(matches!(
            word(Lexer::default(), &deep, &[]),
            Err(ShellError::TooDeep { .. })
        ));
        let ok = format!("{}x{}", "${U:-".repeat(50), "}".repeat(50));
        assert_eq!(word(Lexer::default(), &ok, &[]).unwrap(), "x");
    }
}
