//! Heredoc recognition. BuildKit splits the instruction line into shell words with its shell
//! lexer (quotes and escapes kept, unset variables left as written, blanks after `<<` kept with
//! the following word) and then tests each word against `^(\d*)<<(-?)\s*([^<]*)$`. This module
//! holds the small part of that lexer the parser needs; variable expansion proper belongs to
//! `crate::shell`.

use thiserror::Error;

use super::gotext::is_space;
use super::grammar::heredoc_opener;
use super::Heredoc;

/// Nesting limit for `${...}` inside `${...}`, so that no input can exhaust the stack.
const MAX_NESTING: usize = 200;

/// Why a heredoc terminator word could not be lexed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LexError {
    /// `'` without its closing quote.
    #[error("unexpected end of statement while looking for matching single-quote")]
    UnterminatedSingleQuote,
    /// `"` without its closing quote.
    #[error("unexpected end of statement while looking for matching double-quote")]
    UnterminatedDoubleQuote,
    /// `${` without its `}`.
    #[error("syntax error: missing '}}'")]
    MissingBrace,
    /// `${/` without its second `/`.
    #[error("syntax error: missing '/' in ${{}}")]
    MissingSlash,
    /// `${}`, `${{`, `${:`.
    #[error("syntax error: bad substitution")]
    BadSubstitution,
    /// `${name` followed by an unknown modifier.
    #[error("unsupported modifier ({modifier}) in substitution")]
    UnsupportedModifier {
        /// The modifier text.
        modifier: String,
    },
    /// The text ended while looking for a closing character.
    #[error("unexpected end of statement while looking for matching {wanted}")]
    UnexpectedEnd {
        /// The character looked for.
        wanted: char,
    },
    /// `${` nested more than the lexer allows.
    #[error("substitutions nested deeper than {MAX_NESTING} levels")]
    TooDeep,
    /// The quoted and the unquoted lexing of a terminator disagree.
    #[error("internal lexing of heredoc produced inconsistent results: {word}")]
    Inconsistent {
        /// The terminator text.
        word: String,
    },
}

/// Word accumulation with BuildKit's splitting rules.
#[derive(Default)]
struct Words {
    word: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, c: char) {
        if is_space(c) {
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

/// The lexer, with an empty environment whose unset variables stay as written and with `\` as
/// the escape character.
struct Lexer {
    chars: Vec<char>,
    pos: usize,
    raw_quotes: bool,
    raw_escapes: bool,
    depth: usize,
}

impl Lexer {
    fn new(text: &str, raw_quotes: bool, raw_escapes: bool) -> Self {
        Lexer {
            chars: text.chars().collect(),
            pos: 0,
            raw_quotes,
            raw_escapes,
            depth: 0,
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

    fn words(mut self) -> Result<Vec<String>, LexError> {
        let raw = self.raw_escapes;
        self.process_until(None, raw).map(|(_, words)| words)
    }

    fn process_until(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), LexError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(LexError::TooDeep);
        }
        let saved = std::mem::replace(&mut self.raw_escapes, raw_escapes);
        let out = self.process_inner(stop);
        self.raw_escapes = saved;
        self.depth -= 1;
        out
    }

    fn process_inner(&mut self, stop: Option<char>) -> Result<(String, Vec<String>), LexError> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.pos += 1;
                return Ok((result, words.finish()));
            }
            match c {
                '$' => {
                    let tmp = self.dollar()?;
                    result.push_str(&tmp);
                    words.add_string(&tmp);
                }
                '\'' => {
                    let tmp = self.single_quote()?;
                    result.push_str(&tmp);
                    words.add_raw_string(&tmp);
                }
                '"' => {
                    let tmp = self.double_quote()?;
                    result.push_str(&tmp);
                    words.add_raw_string(&tmp);
                }
                '<' => {
                    let tmp = self.possible_heredoc();
                    result.push_str(&tmp);
                    words.add_raw_string(&tmp);
                }
                '\\' => {
                    self.pos += 1;
                    if self.raw_escapes {
                        words.add_raw_char('\\');
                        result.push('\\');
                    }
                    let Some(n) = self.next() else { break };
                    words.add_raw_char(n);
                    result.push(n);
                }
                _ => {
                    self.pos += 1;
                    words.add_char(c);
                    result.push(c);
                }
            }
        }
        match stop {
            Some(wanted) => Err(LexError::UnexpectedEnd { wanted }),
            None => Ok((result, words.finish())),
        }
    }

    fn possible_heredoc(&mut self) -> String {
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

    fn single_quote(&mut self) -> Result<String, LexError> {
        let mut out = String::new();
        self.pos += 1;
        if self.raw_quotes {
            out.push('\'');
        }
        loop {
            match self.next() {
                None => return Err(LexError::UnterminatedSingleQuote),
                Some('\'') => {
                    if self.raw_quotes {
                        out.push('\'');
                    }
                    return Ok(out);
                }
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quote(&mut self) -> Result<String, LexError> {
        let mut out = String::new();
        self.pos += 1;
        if self.raw_quotes {
            out.push('"');
        }
        loop {
            match self.peek() {
                None => return Err(LexError::UnterminatedDoubleQuote),
                Some('"') => {
                    self.pos += 1;
                    if self.raw_quotes {
                        out.push('"');
                    }
                    return Ok(out);
                }
                Some('$') => {
                    let v = self.dollar()?;
                    out.push_str(&v);
                }
                Some(mut c) => {
                    self.pos += 1;
                    if c == '\\' {
                        if self.raw_escapes {
                            out.push('\\');
                        }
                        match self.peek() {
                            None => continue,
                            Some(n @ ('"' | '$' | '\\')) => {
                                self.pos += 1;
                                c = n;
                            }
                            Some(_) => {}
                        }
                    }
                    out.push(c);
                }
            }
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if name.is_empty() && c.is_numeric() {
                while let Some(d) = self.peek().filter(|d| d.is_numeric()) {
                    name.push(d);
                    self.pos += 1;
                }
                return name;
            }
            if name.is_empty() && matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.pos += 1;
                return c.to_string();
            }
            if !(c.is_alphabetic() || c.is_numeric() || c == '_') {
                break;
            }
            name.push(c);
            self.pos += 1;
        }
        name
    }

    /// `$name`, `${name}` and `${name<modifier>word}`: with no variable set they come back as
    /// written (their inner words processed).
    fn dollar(&mut self) -> Result<String, LexError> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            return Ok(if name.is_empty() {
                "$".to_string()
            } else {
                format!("${name}")
            });
        }
        self.pos += 1;
        match self.peek() {
            None => return Err(LexError::MissingBrace),
            Some('{' | '}' | ':') => return Err(LexError::BadSubstitution),
            Some(_) => {}
        }
        let name = self.name();
        let c = self.next();
        match c {
            Some('}') => Ok(format!("${{{name}}}")),
            Some(':' | '+' | '-' | '?' | '#' | '%') => {
                let mut modifier = String::new();
                let mut m = c;
                if let Some(ch) = c {
                    modifier.push(ch);
                }
                if c == Some(':') {
                    m = self.next();
                    modifier.push(m.unwrap_or('\u{FFFD}'));
                }
                let raw = matches!(m, Some('#' | '%'));
                let (word, _) = self.process_until(Some('}'), raw).map_err(|e| {
                    if self.peek().is_none() && !matches!(e, LexError::TooDeep) {
                        LexError::MissingBrace
                    } else {
                        e
                    }
                })?;
                Ok(format!("${{{name}{modifier}{word}}}"))
            }
            Some('/') => {
                if self.peek() == Some('/') {
                    self.pos += 1;
                }
                let (pattern, _) = self.process_until(Some('/'), true).map_err(|e| {
                    if self.peek().is_none() && !matches!(e, LexError::TooDeep) {
                        LexError::MissingSlash
                    } else {
                        e
                    }
                })?;
                let (replacement, _) = self.process_until(Some('}'), true).map_err(|e| {
                    if self.peek().is_none() && !matches!(e, LexError::TooDeep) {
                        LexError::MissingBrace
                    } else {
                        e
                    }
                })?;
                Ok(format!("${{{name}/{pattern}/{replacement}}}"))
            }
            other => Err(LexError::UnsupportedModifier {
                modifier: other.unwrap_or('\u{FFFD}').to_string(),
            }),
        }
    }
}

/// Is this one word a heredoc opener (`[digits]<<[-][blanks]NAME`)? Returns the heredoc with
/// an empty body, `None` for an ordinary word, or an error when the terminator does not lex
/// (unbalanced quotes).
pub fn parse_heredoc_word(word: &str) -> Result<Option<Heredoc>, LexError> {
    let Some((fd, chomp, rest)) = heredoc_opener(word) else {
        return Ok(None);
    };
    if rest.is_empty() {
        return Ok(None);
    }
    let words = Lexer::new(rest, false, false).words()?;
    let [name] = words.as_slice() else {
        return Ok(None);
    };
    let raw = Lexer::new(rest, true, false).words()?;
    let [raw_name] = raw.as_slice() else {
        return Err(LexError::Inconsistent {
            word: rest.to_string(),
        });
    };
    let quotes = |s: &str| s.chars().filter(|c| *c == '\'' || *c == '"').count();
    Ok(Some(Heredoc {
        name: name.clone(),
        content: String::new(),
        expand: quotes(name) == quotes(raw_name),
        chomp,
        fd: fd.parse().unwrap_or(0),
    }))
}

/// The heredocs an instruction line opens, in order (bodies empty). A line that does not lex
/// as shell words opens none.
pub fn heredocs_in_line(line: &str) -> Result<Vec<Heredoc>, LexError> {
    if !line.contains("<<") {
        return Ok(Vec::new());
    }
    let Ok(words) = Lexer::new(line, true, true).words() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for w in words {
        if let Some(h) = parse_heredoc_word(&w)? {
            out.push(h);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(line: &str) -> Vec<String> {
        heredocs_in_line(line)
            .map(|v| v.into_iter().map(|h| h.name).collect())
            .unwrap_or_default()
    }

    #[test]
    fn words_and_lines() {
        let h = parse_heredoc_word("<<-'EOF'").ok().flatten();
        assert_eq!(
            h.map(|h| (h.name, h.chomp, h.expand)),
            Some(("EOF".to_string(), true, false))
        );
        assert!(parse_heredoc_word("<<\"EOF").is_err());
        assert_eq!(parse_heredoc_word("<<EOF sh"), Ok(None));
        assert_eq!(names("RUN <<- EOF"), Vec::<String>::new());
        assert_eq!(names("RUN << -EOF"), vec!["-EOF"]);
        assert_eq!(names("RUN <<  EOF  > foo"), vec!["EOF"]);
        assert_eq!(names("RUN <<$EOF"), vec!["$EOF"]);
        assert_eq!(names("RUN <<eo\\'f"), vec!["eo'f"]);
        assert_eq!(names("RUN \"<<EOF\""), Vec::<String>::new());
        assert_eq!(
            names(&format!("RUN <<{}", "${a:-".repeat(1000))),
            Vec::<String>::new()
        );
    }
}
