//! Dockerfile parser: bytes to nodes with spans, with BuildKit's exact semantics (line
//! continuation, comments, parser directives, flags, JSON exec form, heredocs, ENV/LABEL pairs).
//!
//! [`parse`] never panics, whatever the bytes; invalid UTF-8 is replaced by U+FFFD. [`dump`]
//! renders the tree in BuildKit's `Node.Dump` format. The token-level pieces (directive lines,
//! flags, JSON arrays, word splitting, heredoc openers) are in `grammar`; this module joins
//! physical lines into instructions.

mod directives;
mod dump;
pub(crate) mod gotext;
mod grammar;
mod heredoc;
mod json;

use thiserror::Error;

pub use directives::{detect_syntax, parse_directive, parse_directives, FoundDirective};
pub use dump::dump;
pub use grammar::{parse_json_array, parse_words, JsonArray};
pub use heredoc::{heredocs_in_line, parse_heredoc_word, LexError};

use gotext::{is_space, split_sep, split_sep_once, to_lower, trim_left_space, trim_space};
use grammar::{directive_line, extract_flags};

/// BuildKit reads lines with a 64 KiB scanner buffer: a longer physical line is an error.
pub const MAX_LINE_LEN: usize = 65_535;

/// How deeply `ONBUILD ONBUILD ...` may nest before the parser gives up (BuildKit itself
/// rejects any nesting later, when building).
const MAX_ONBUILD_NESTING: usize = 64;

/// Lines of an instruction, 1-based and inclusive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    /// First physical line.
    pub start_line: u32,
    /// Last physical line consumed (continuations and heredoc bodies included).
    pub end_line: u32,
}

/// A heredoc body attached to an instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heredoc {
    /// The terminator word with quoting removed.
    pub name: String,
    /// The body lines verbatim, each with its line ending; leading tabs are kept even with
    /// `chomp` (the build step removes them).
    pub content: String,
    /// False when any part of the terminator word was quoted: no variable expansion then.
    pub expand: bool,
    /// `<<-`: strip leading tabs from the body lines.
    pub chomp: bool,
    /// The file descriptor prefix (`3<<EOF`), 0 if none.
    pub fd: u32,
}

/// A raw parsed instruction.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Node {
    /// The instruction word, lowercased (`run`).
    pub keyword: String,
    /// The `--flag` words in front of the arguments, quotes removed.
    pub flags: Vec<String>,
    /// The arguments, split according to the keyword (see the conformance README, 1.3). An
    /// unknown instruction has one empty argument; ENV and LABEL have key/value/separator
    /// triples.
    pub args: Vec<String>,
    /// The arguments were a JSON array (exec form).
    pub json: bool,
    /// ONBUILD's nested instruction.
    pub next: Option<Box<Node>>,
    /// Heredoc bodies, in the order their openers appear.
    pub heredocs: Vec<Heredoc>,
    /// The joined instruction text, keyword included (BuildKit's `Node.Original`).
    pub original: String,
    /// Where the instruction is.
    pub span: Span,
}

/// A parser directive (`# escape=\``).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Directive {
    /// `syntax`, `escape` or `check` (lowercased).
    pub name: String,
    /// The value, trailing blanks removed.
    pub value: String,
    /// 1-based line.
    pub line: u32,
}

/// A non-fatal problem found while parsing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// What is wrong (`Empty continuation line found in: RUN ...`).
    pub message: String,
    /// The last line of the instruction concerned.
    pub line: u32,
}

/// A parsed Dockerfile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dockerfile {
    /// The instructions, in order.
    pub nodes: Vec<Node>,
    /// The parser directives of the leading comment block.
    pub directives: Vec<Directive>,
    /// Non-fatal findings.
    pub warnings: Vec<Warning>,
    /// The escape character (`\` or a backtick).
    pub escape: char,
    /// From the first instruction's first line to the last instruction's last line.
    pub span: Span,
}

/// What went wrong while parsing.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ParseErrorKind {
    /// A heredoc body without its terminator line.
    #[error("unterminated heredoc {name}")]
    UnterminatedHeredoc {
        /// The terminator that never came.
        name: String,
    },
    /// A JSON array with an element that is not a string.
    #[error("when using JSON array syntax, arrays must be comprised of strings only")]
    NotStringArray,
    /// `ENV key` / `LABEL key` without a value.
    #[error("{instruction} must have two arguments")]
    MissingValue {
        /// `ENV` or `LABEL`.
        instruction: &'static str,
    },
    /// A word without `=` in the `k=v` form of ENV/LABEL.
    #[error("syntax error - can't find = in {word:?}. must be of the form: name=value")]
    MissingEquals {
        /// The offending word.
        word: String,
    },
    /// An `escape` directive other than a backslash or backtick.
    #[error("invalid escape token '{value}' does not match ` or \\")]
    InvalidEscape {
        /// The rejected value.
        value: String,
    },
    /// A parser directive given twice.
    #[error("only one {name} parser directive can be used")]
    RepeatedDirective {
        /// The directive.
        name: String,
    },
    /// A physical line longer than BuildKit's scanner accepts.
    #[error("dockerfile line greater than max allowed size of {MAX_LINE_LEN} ({length} bytes)")]
    LineTooLong {
        /// The line's length in bytes.
        length: usize,
    },
    /// Nothing but comments, directives and blank lines.
    #[error("file with no instructions")]
    NoInstructions,
    /// A heredoc terminator word that does not lex (unbalanced quotes).
    #[error("invalid heredoc terminator")]
    HeredocWord {
        /// Why it does not lex.
        #[source]
        source: LexError,
    },
    /// `ONBUILD ONBUILD ...` nested absurdly deep.
    #[error("ONBUILD nested deeper than {MAX_ONBUILD_NESTING} levels")]
    NestingTooDeep,
}

/// A parse failure with its position (1-based line and column).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{line}:{column}: {message}")]
pub struct ParseError {
    /// 1-based line.
    pub line: u32,
    /// 1-based column (in characters).
    pub column: u32,
    /// The message, as `kind` displays it.
    pub message: String,
    /// What went wrong.
    pub kind: ParseErrorKind,
}

impl ParseError {
    fn new(line: u32, column: u32, kind: ParseErrorKind) -> Self {
        ParseError {
            line,
            column,
            message: kind.to_string(),
            kind,
        }
    }

    /// `FILE:LINE:COL: message`, then the offending source line, then a caret under the column.
    pub fn render(&self, file_name: &str, source: &[u8]) -> String {
        format!(
            "{file_name}:{}:{}: {}\n{}",
            self.line,
            self.column,
            self.message,
            source_excerpt(source, self.line, self.column)
        )
    }
}

/// The 1-based `line` of `source` (BOM dropped, at most 200 characters) and, below it, a caret
/// under the 1-based `column` (tabs kept so it lines up). Shared by every frontend error.
pub fn source_excerpt(source: &[u8], line: u32, column: u32) -> String {
    let text = String::from_utf8_lossy(source);
    let idx = usize::try_from(line.max(1) - 1).unwrap_or(0);
    let line = text.split('\n').nth(idx).unwrap_or("");
    let line = line.trim_end_matches(['\r', '\n']);
    let line = if idx == 0 {
        line.strip_prefix('\u{feff}').unwrap_or(line)
    } else {
        line
    };
    let shown: String = line.chars().take(200).collect();
    let mut caret: String = line
        .chars()
        .take(usize::try_from(column.max(1) - 1).unwrap_or(0).min(200))
        .map(|c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    caret.push('^');
    format!("{shown}\n{caret}")
}

/// The line continuation rule: the line ends with the escape character, optionally followed by
/// blanks, and that character is not itself escaped. Returns the text without it and whether
/// the instruction ends here.
fn trim_continuation(line: &str, esc: char) -> (&str, bool) {
    let t = line.trim_end_matches([' ', '\t']);
    if let Some(before) = t.strip_suffix(esc) {
        if before.is_empty() || !before.ends_with(esc) {
            return (before, false);
        }
    }
    (line, true)
}

fn trim_newline(line: &str) -> &str {
    line.trim_end_matches(['\r', '\n'])
}

/// Parser-directive state while reading the leading comment block.
struct DirectiveState {
    done: bool,
    found: Vec<Directive>,
    escape: char,
}

impl DirectiveState {
    fn see(&mut self, text: &str, line: u32, column: u32) -> Result<(), ParseError> {
        if self.done {
            return Ok(());
        }
        let Some((name, value)) = directive_line(text, "#") else {
            self.done = true;
            return Ok(());
        };
        if !directives::KNOWN.contains(&name.as_str()) {
            self.done = true;
            return Ok(());
        }
        if self.found.iter().any(|d| d.name == name) {
            return Err(ParseError::new(
                line,
                column,
                ParseErrorKind::RepeatedDirective { name },
            ));
        }
        if name == "escape" {
            self.escape = match value.as_str() {
                "`" => '`',
                "\\" => '\\',
                _ => {
                    let col = column + u32::try_from(text.chars().count()).unwrap_or(0)
                        - u32::try_from(value.chars().count()).unwrap_or(0);
                    return Err(ParseError::new(
                        line,
                        col,
                        ParseErrorKind::InvalidEscape { value },
                    ));
                }
            };
        }
        self.found.push(Directive { name, value, line });
        Ok(())
    }
}

fn check_line_lengths(bytes: &[u8]) -> Result<(), ParseError> {
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.len() > MAX_LINE_LEN {
            let line_no = u32::try_from(i + 1).unwrap_or(u32::MAX);
            let kind = ParseErrorKind::LineTooLong { length: line.len() };
            return Err(ParseError::new(line_no, 1, kind));
        }
    }
    Ok(())
}

/// Parses a Dockerfile.
pub fn parse(bytes: &[u8]) -> Result<Dockerfile, ParseError> {
    check_line_lengths(bytes)?;
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.split_inclusive('\n');
    let mut dirs = DirectiveState {
        done: false,
        found: Vec::new(),
        escape: '\\',
    };
    let mut nodes: Vec<Node> = Vec::new();
    let mut warnings = Vec::new();
    let mut line_no: u32 = 0;

    while let Some(mut raw) = lines.next() {
        if line_no == 0 {
            raw = raw.strip_prefix('\u{feff}').unwrap_or(raw);
        }
        line_no = line_no.saturating_add(1);
        let stripped = trim_newline(raw);
        let body = trim_left_space(stripped);
        let indent = stripped[..stripped.len() - body.len()].chars().count();
        let column = u32::try_from(indent + 1).unwrap_or(1);
        dirs.see(body, line_no, column)?;
        let body = if body.starts_with('#') { "" } else { body };
        let start = line_no;
        let (first, mut end_of_instruction) = trim_continuation(body, dirs.escape);
        if end_of_instruction && first.is_empty() {
            continue;
        }
        let mut joined = first.to_string();
        let mut empty_continuation = false;
        while !end_of_instruction {
            let Some(raw) = lines.next() else { break };
            line_no = line_no.saturating_add(1);
            let stripped = trim_newline(raw);
            let trimmed = trim_left_space(stripped);
            if trimmed.starts_with('#') {
                continue;
            }
            if trimmed.is_empty() {
                empty_continuation = true;
                continue;
            }
            let (part, end) = trim_continuation(stripped, dirs.escape);
            joined.push_str(part);
            end_of_instruction = end;
        }
        if empty_continuation {
            warnings.push(Warning {
                message: format!("Empty continuation line found in: {joined}"),
                line: line_no,
            });
        }

        let at = |kind| ParseError::new(start, column, kind);
        let mut node = node_from_line(&joined, dirs.escape, 0).map_err(at)?;
        if can_contain_heredoc(&node) {
            let openers =
                heredocs_in_line(&joined).map_err(|source| at(ParseErrorKind::HeredocWord { source }))?;
            for mut heredoc in openers {
                let mut terminated = false;
                for raw in lines.by_ref() {
                    line_no = line_no.saturating_add(1);
                    let mut candidate = trim_newline(raw);
                    if heredoc.chomp {
                        candidate = candidate.trim_start_matches('\t');
                    }
                    if candidate == heredoc.name {
                        terminated = true;
                        break;
                    }
                    heredoc.content.push_str(raw);
                }
                if !terminated {
                    return Err(at(ParseErrorKind::UnterminatedHeredoc { name: heredoc.name }));
                }
                node.heredocs.push(heredoc);
            }
        }
        let span = Span {
            start_line: start,
            end_line: line_no,
        };
        node.span = span;
        node.original = joined;
        if let Some(child) = node.next.as_deref_mut() {
            child.span = span;
        }
        nodes.push(node);
    }

    let (Some(first), Some(last)) = (nodes.first(), nodes.last()) else {
        return Err(ParseError::new(line_no.max(1), 1, ParseErrorKind::NoInstructions));
    };
    let span = Span {
        start_line: first.span.start_line,
        end_line: last.span.end_line,
    };
    Ok(Dockerfile {
        nodes,
        directives: dirs.found,
        warnings,
        escape: dirs.escape,
        span,
    })
}

/// RUN, COPY and ADD in shell form take heredocs, also as ONBUILD triggers.
fn can_contain_heredoc(node: &Node) -> bool {
    let node = match (&*node.keyword, node.next.as_deref()) {
        ("onbuild", Some(child)) => child,
        _ => node,
    };
    matches!(&*node.keyword, "run" | "copy" | "add") && !node.json
}

/// Splits one joined instruction line into keyword, flags and arguments.
fn node_from_line(line: &str, esc: char, depth: usize) -> Result<Node, ParseErrorKind> {
    let (cmd, rest) = split_sep_once(trim_space(line));
    let (args_text, flags) = match rest {
        Some(rest) => {
            let (args, flags) = extract_flags(rest, esc);
            (trim_space(args), flags)
        }
        None => ("", Vec::new()),
    };
    // `original` is the whole line; the caller moves its own copy in for a top-level node.
    let mut node = Node {
        keyword: to_lower(cmd),
        flags,
        original: if depth == 0 {
            String::new()
        } else {
            line.to_string()
        },
        ..Node::default()
    };
    match node.keyword.as_str() {
        "add" | "copy" | "volume" => match parse_json_array(args_text) {
            JsonArray::Strings(v) => {
                node.args = v;
                node.json = true;
            }
            JsonArray::NotStrings => return Err(ParseErrorKind::NotStringArray),
            JsonArray::NotJson => node.args = whitespace_list(args_text),
        },
        "run" | "cmd" | "entrypoint" | "shell" => {
            (node.args, node.json) = maybe_json(args_text)?;
        }
        "from" | "expose" => node.args = whitespace_list(args_text),
        "arg" => node.args = parse_words(args_text, esc),
        "env" => node.args = key_values(args_text, "ENV", esc)?,
        "label" => node.args = key_values(args_text, "LABEL", esc)?,
        "healthcheck" => {
            let sep = args_text.find(is_space).unwrap_or(args_text.len());
            if sep > 0 {
                let (cmd, json) = maybe_json(trim_left_space(&args_text[sep..]))?;
                node.args = std::iter::once(args_text[..sep].to_string()).chain(cmd).collect();
                node.json = json;
            }
        }
        "maintainer" | "user" | "workdir" | "stopsignal" => {
            if !args_text.is_empty() {
                node.args = vec![args_text.to_string()];
            }
        }
        "onbuild" => {
            if !args_text.is_empty() {
                if depth >= MAX_ONBUILD_NESTING {
                    return Err(ParseErrorKind::NestingTooDeep);
                }
                node.next = Some(Box::new(node_from_line(args_text, esc, depth + 1)?));
            }
        }
        _ => node.args = vec![String::new()],
    }
    Ok(node)
}

fn whitespace_list(text: &str) -> Vec<String> {
    if text.is_empty() {
        Vec::new()
    } else {
        split_sep(text)
    }
}

/// RUN/CMD/ENTRYPOINT/SHELL: a JSON array, or the whole text as one argument.
fn maybe_json(text: &str) -> Result<(Vec<String>, bool), ParseErrorKind> {
    if text.is_empty() {
        return Ok((Vec::new(), false));
    }
    match parse_json_array(text) {
        JsonArray::Strings(v) => Ok((v, true)),
        JsonArray::NotStrings => Err(ParseErrorKind::NotStringArray),
        JsonArray::NotJson => Ok((vec![text.to_string()], false)),
    }
}

/// ENV/LABEL: `key value` (legacy) or `k=v ...`, as key/value/separator triples.
fn key_values(text: &str, instruction: &'static str, esc: char) -> Result<Vec<String>, ParseErrorKind> {
    let words = parse_words(text, esc);
    let Some(first) = words.first() else {
        return Ok(Vec::new());
    };
    if !first.contains('=') {
        let (key, value) = split_sep_once(text);
        let value = value.ok_or(ParseErrorKind::MissingValue { instruction })?;
        return Ok(vec![key.to_string(), value.to_string(), String::new()]);
    }
    let mut out = Vec::with_capacity(words.len() * 3);
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            return Err(ParseErrorKind::MissingEquals { word });
        };
        out.extend([key.to_string(), value.to_string(), "=".to_string()]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(src: &str) -> ParseError {
        match parse(src.as_bytes()) {
            Ok(df) => panic!("expected an error, got {df:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn error_positions() {
        let e = err("FROM a\n\n  ENV PATH\n");
        assert_eq!((e.line, e.column), (3, 3));
        assert_eq!(e.kind, ParseErrorKind::MissingValue { instruction: "ENV" });
        assert_eq!(e.to_string(), "3:3: ENV must have two arguments");

        let e = err("FROM a\nRUN <<EOF\nbody\n");
        assert_eq!((e.line, e.column), (2, 1));
        assert!(matches!(e.kind, ParseErrorKind::UnterminatedHeredoc { .. }));

        let e = err("# escape=x\nFROM a\n");
        assert_eq!((e.line, e.column), (1, 10));
        assert_eq!(
            e.render("Dockerfile", b"# escape=x\nFROM a\n"),
            "Dockerfile:1:10: invalid escape token 'x' does not match ` or \\\n# escape=x\n         ^"
        );

        let e = err("# syntax=a\n# syntax=b\nFROM a\n");
        assert_eq!((e.line, e.column), (2, 1));

        let e = err("FROM a\n\tCMD [\"a\", 1]\n");
        assert_eq!((e.line, e.column), (2, 2));
        assert_eq!(
            e.render("D", b"FROM a\n\tCMD [\"a\", 1]\n").lines().last(),
            Some("\t^")
        );

        let e = err("# only a comment\n\n");
        assert_eq!((e.line, e.kind), (2, ParseErrorKind::NoInstructions));

        let long = format!("FROM a\nRUN {}\n", "x".repeat(MAX_LINE_LEN));
        assert_eq!(err(&long).line, 2);
        assert!(parse(format!("FROM a\nRUN {}\n", "x".repeat(MAX_LINE_LEN - 4)).as_bytes()).is_ok());

        let e = err("FROM a\nLABEL a=b c\n");
        assert_eq!(e.kind, ParseErrorKind::MissingEquals { word: "c".into() });
    }

    #[test]
    fn structure() {
        let src = "\u{feff}# escape=`\r\nFROM a AS b\r\nONBUILD RUN --mount=x <<EOF\r\nhi\r\nEOF\r\nFOO bar\r\nRUN a `\r\n\r\n b";
        let df = parse(src.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(df.escape, '`');
        assert_eq!(
            df.directives,
            vec![Directive {
                name: "escape".into(),
                value: "`".into(),
                line: 1
            }]
        );
        assert_eq!(dump(&df), "(from \"a\" \"AS\" \"b\")\n(onbuild (run [\"--mount=x\"] \"<<EOF\"))\n(foo \"\")\n(run \"a  b\")\n");
        assert_eq!(df.nodes[1].heredocs[0].content, "hi\r\n");
        assert_eq!(
            df.nodes[1].span,
            Span {
                start_line: 3,
                end_line: 5
            }
        );
        assert_eq!(
            df.warnings,
            vec![Warning {
                message: "Empty continuation line found in: RUN a  b".into(),
                line: 9
            }]
        );
        assert_eq!(
            df.span,
            Span {
                start_line: 2,
                end_line: 9
            }
        );
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        for src in [
            &b"\\"[..],
            b"\xff\xfe RUN \x80",
            b"ONBUILD",
            b"HEALTHCHECK",
            b"\n\n\\\n",
            b"RUN [\"\\ud800\"]",
        ] {
            let _ = parse(src).map(|df| dump(&df));
        }
        let deep = "ONBUILD ".repeat(1000) + "RUN x";
        assert_eq!(err(&deep).kind, ParseErrorKind::NestingTooDeep);
    }
}
