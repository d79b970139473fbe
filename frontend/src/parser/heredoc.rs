//! Heredoc recognition. BuildKit splits the instruction line into shell words with its shell
//! lexer (quotes and escapes kept, unset variables left as written, blanks after `<<` kept with
//! the following word) and then tests each word against `^(\d*)<<(-?)\s*([^<]*)$`, as its
//! `heredocsFromLine` does. The lexer is the frontend's one, [`crate::shell::Lexer`], with
//! those options.

use thiserror::Error;

use super::grammar::heredoc_opener;
use super::Heredoc;
use crate::shell::{Lexer, ShellError, MAX_NESTING};

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

/// BuildKit's heredoc lexer: the shell lexer with `\` as the escape character, an empty
/// environment whose variables stay as written, and `<<` kept with the blanks after it.
fn heredoc_lexer(raw_quotes: bool, raw_escapes: bool) -> Lexer {
    Lexer::new('\\')
        .skip_unset_env(true)
        .heredoc_markers(true)
        .raw_quotes(raw_quotes)
        .raw_escapes(raw_escapes)
}

/// The shell words of `text`, unexpanded.
fn shell_words(text: &str, raw_quotes: bool, raw_escapes: bool) -> Result<Vec<String>, LexError> {
    heredoc_lexer(raw_quotes, raw_escapes)
        .process_words(text, &|_| None)
        .map_err(LexError::from)
}

impl From<ShellError> for LexError {
    fn from(e: ShellError) -> LexError {
        match e {
            ShellError::UnterminatedSingleQuote { .. } => LexError::UnterminatedSingleQuote,
            ShellError::UnterminatedDoubleQuote { .. } => LexError::UnterminatedDoubleQuote,
            ShellError::MissingBrace { .. } => LexError::MissingBrace,
            ShellError::MissingSlash { .. } => LexError::MissingSlash,
            ShellError::BadSubstitution { .. } => LexError::BadSubstitution,
            ShellError::UnsupportedModifier { modifier, .. } => LexError::UnsupportedModifier { modifier },
            ShellError::TooDeep { .. } => LexError::TooDeep,
            // Patterns and `?` messages are only looked at when a variable is set, and none is.
            ShellError::Required { word, .. } | ShellError::InvalidPatternEscape { word, .. } => {
                LexError::Inconsistent { word }
            }
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
    let words = shell_words(rest, false, false)?;
    let [name] = words.as_slice() else {
        return Ok(None);
    };
    let raw = shell_words(rest, true, false)?;
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
    let Ok(words) = shell_words(line, true, true) else {
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
