//! The token-level grammar pieces of the Dockerfile syntax, written with chumsky: parser
//! directive lines, `--flag` words, JSON string arrays, the quote-aware word splitter used by
//! ARG/ENV/LABEL and heredoc openers. The line-joining logic lives in `mod.rs`.

use chumsky::prelude::*;

use super::gotext::is_space;

type Ex = extra::Default;

/// Go's `\s` class in BuildKit's regular expressions.
fn is_re_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{c}' | '\r')
}

/// Matches `^PREFIX\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$`, returning the lowercased name and
/// the value.
pub(crate) fn directive_line(line: &str, prefix: &'static str) -> Option<(String, String)> {
    let ws = any::<&str, Ex>().filter(|c: &char| is_re_space(*c)).repeated();
    let name = any()
        .filter(|c: &char| c.is_ascii_alphabetic())
        .then(any().filter(|c: &char| c.is_ascii_alphanumeric()).repeated())
        .to_slice();
    let parser = just(prefix)
        .ignore_then(ws)
        .ignore_then(name)
        .then_ignore(ws)
        .then_ignore(just('='))
        .then(any().repeated().to_slice())
        .then_ignore(end());
    let (name, rest) = parser.parse(line).into_result().ok()?;
    // `\s*(.+?)\s*$`: leading blanks go to the first `\s*` unless nothing else is left, in
    // which case the lazy group takes the last character.
    let start = rest.trim_start_matches(is_re_space);
    let value = if start.is_empty() {
        rest.chars().last()?.to_string()
    } else {
        start.trim_end_matches(is_re_space).to_string()
    };
    Some((name.to_ascii_lowercase(), value))
}

/// Whether a byte is whitespace for the flag extractor (which BuildKit runs byte by byte).
fn is_flag_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

/// One `--flag` word: quotes removed, the escape character escaping the next byte. Returns the
/// word's bytes and whether it contained quotes (so an empty quoted word still counts).
fn flag_word<'a>(esc: u8) -> impl Parser<'a, &'a [u8], (Vec<u8>, bool), Ex> {
    let escaped = just(esc).ignore_then(choice((any().map(|b: u8| vec![b]), end().to(Vec::new()))));
    let quoted = |q: u8| {
        just(q)
            .ignore_then(
                choice((
                    escaped.clone(),
                    any()
                        .filter(move |b: &u8| *b != q)
                        .repeated()
                        .at_least(1)
                        .to_slice()
                        .map(|s: &[u8]| s.to_vec()),
                ))
                .repeated()
                .collect::<Vec<Vec<u8>>>(),
            )
            .then_ignore(just(q).or_not())
            .map(|parts| (parts.concat(), true))
    };
    let plain = any()
        .filter(move |b: &u8| !is_flag_space(*b) && *b != b'"' && *b != b'\'' && *b != esc)
        .repeated()
        .at_least(1)
        .to_slice()
        .map(|s: &[u8]| (s.to_vec(), false));
    choice((quoted(b'"'), quoted(b'\''), escaped.map(|v| (v, false)), plain))
        .repeated()
        .at_least(1)
        .collect::<Vec<(Vec<u8>, bool)>>()
        .map(|parts| {
            let blank_ok = parts.iter().any(|(_, q)| *q);
            let bytes = parts.into_iter().flat_map(|(b, _)| b).collect();
            (bytes, blank_ok)
        })
}

/// BuildKit's `extractBuilderFlags`: takes leading `--flag` words off `line`, returning the rest
/// of the line (untrimmed) and the flags. Like BuildKit, flag words are processed byte by byte,
/// each byte becoming one character (so non-ASCII text in a flag comes out as Latin-1).
pub(crate) fn extract_flags(line: &str, esc: char) -> (&str, Vec<String>) {
    let bytes = line.as_bytes();
    let esc = u8::try_from(esc).unwrap_or(b'\\');
    let mut flags = Vec::new();
    let mut pos = 0;
    let word = flag_word(esc)
        .map_with(|out, e| {
            let span: SimpleSpan = e.span();
            (out, span.end)
        })
        .lazy();
    loop {
        while pos < bytes.len() && is_flag_space(bytes[pos]) {
            pos += 1;
        }
        if pos == bytes.len() {
            return ("", flags);
        }
        if !(bytes[pos] == b'-' && bytes.get(pos + 1) == Some(&b'-')) {
            return (line.get(pos..).unwrap_or(""), flags);
        }
        let end = bytes[pos..]
            .iter()
            .position(|b| is_flag_space(*b))
            .map_or(bytes.len(), |i| pos + i);
        let plain = &bytes[pos..end];
        if !plain.iter().any(|b| matches!(*b, b'"' | b'\'') || *b == esc) {
            // Fast path for the common flag word without quotes or escapes.
            pos = end;
            if plain == b"--" {
                return (line.get(pos..).unwrap_or(""), flags);
            }
            flags.push(plain.iter().map(|b| char::from(*b)).collect());
            continue;
        }
        let Ok(((text, blank_ok), used)) = word.parse(&bytes[pos..]).into_result() else {
            // Cannot happen: the word starts with `--`, which always parses.
            return (line.get(pos..).unwrap_or(""), flags);
        };
        pos += used.max(1);
        if text == b"--" {
            return (line.get(pos..).unwrap_or(""), flags);
        }
        if blank_ok || !text.is_empty() {
            flags.push(text.iter().map(|b| char::from(*b)).collect());
        }
    }
}

/// A JSON string's pieces before surrogate pairs are combined.
#[derive(Clone, Copy)]
enum Piece {
    Char(char),
    Unit(u16),
}

/// Decodes `\u` escapes like Go's `encoding/json`: a valid surrogate pair is one character,
/// any other surrogate becomes U+FFFD.
fn decode_pieces(pieces: Vec<Piece>) -> String {
    let mut out = String::with_capacity(pieces.len());
    let mut i = 0;
    while i < pieces.len() {
        match pieces[i] {
            Piece::Char(c) => out.push(c),
            Piece::Unit(u) => {
                if (0xD800..0xDC00).contains(&u) {
                    if let Some(Piece::Unit(lo)) = pieces.get(i + 1) {
                        if (0xDC00..0xE000).contains(lo) {
                            let c = 0x10000 + ((u32::from(u) - 0xD800) << 10) + (u32::from(*lo) - 0xDC00);
                            out.push(char::from_u32(c).unwrap_or('\u{FFFD}'));
                            i += 2;
                            continue;
                        }
                    }
                }
                out.push(char::from_u32(u32::from(u)).unwrap_or('\u{FFFD}'));
            }
        }
        i += 1;
    }
    out
}

/// A JSON array whose elements are all strings, surrounded by optional JSON whitespace.
fn json_string_array<'a>() -> impl Parser<'a, &'a str, Vec<String>, Ex> {
    let ws = one_of(" \t\n\r").repeated();
    let hex = any()
        .filter(|c: &char| c.is_ascii_hexdigit())
        .repeated()
        .exactly(4)
        .to_slice()
        .map(|s: &str| u16::from_str_radix(s, 16).unwrap_or(0xFFFD));
    let escape = just('\\').ignore_then(choice((
        just('"').to(Piece::Char('"')),
        just('\\').to(Piece::Char('\\')),
        just('/').to(Piece::Char('/')),
        just('b').to(Piece::Char('\u{8}')),
        just('f').to(Piece::Char('\u{c}')),
        just('n').to(Piece::Char('\n')),
        just('r').to(Piece::Char('\r')),
        just('t').to(Piece::Char('\t')),
        just('u').ignore_then(hex).map(Piece::Unit),
    )));
    let plain = any()
        .filter(|c: &char| *c != '"' && *c != '\\' && u32::from(*c) >= 0x20)
        .map(Piece::Char);
    let string = just('"')
        .ignore_then(choice((escape, plain)).repeated().collect::<Vec<Piece>>())
        .then_ignore(just('"'))
        .map(decode_pieces);
    ws.ignore_then(just('['))
        .ignore_then(ws)
        .ignore_then(
            string
                .separated_by(just(',').padded_by(ws))
                .collect::<Vec<String>>(),
        )
        .then_ignore(ws)
        .then_ignore(just(']'))
        .then_ignore(ws)
        .then_ignore(end())
}

/// How a text that may be a JSON array parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JsonArray {
    /// A JSON array of strings, decoded.
    Strings(Vec<String>),
    /// Not a JSON array at all (the caller falls back to shell form).
    NotJson,
    /// Valid JSON, but an element is not a string: an error in a Dockerfile.
    NotStrings,
}

/// BuildKit's `parseJSON`: leading whitespace is ignored, the text must start with `[` and be
/// one valid JSON value (nothing after it).
pub fn parse_json_array(text: &str) -> JsonArray {
    let text = super::gotext::trim_left_space(text);
    if !text.starts_with('[') {
        return JsonArray::NotJson;
    }
    match json_string_array().parse(text).into_result() {
        Ok(v) => JsonArray::Strings(v),
        Err(_) if super::json::is_valid_json(text) => JsonArray::NotStrings,
        Err(_) => JsonArray::NotJson,
    }
}

/// The quote-aware word splitter (BuildKit's `parseWords`): words are separated by unquoted
/// whitespace, quotes stay in the words, the escape character keeps itself and the next
/// character, and a lone escape character at the very end is dropped.
pub fn parse_words(text: &str, esc: char) -> Vec<String> {
    if !text.contains(['"', '\'', esc]) {
        // Fast path: without quotes or escapes, words are just the whitespace-separated runs.
        return text
            .split(is_space)
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect();
    }
    // One pass over the characters (the grammar is spelled out as a chumsky parser in
    // `parse_words_reference`, which the tests hold this loop to):
    // * a double-quoted part keeps its quotes and every character up to the closing quote; the
    //   escape character keeps itself and the next character; an unclosed quote runs to the end;
    // * a single-quoted part is kept verbatim, escapes included, up to the closing quote;
    // * outside quotes the escape character keeps itself and the next one;
    // * an escape character at the very end of the text is dropped; empty words are dropped.
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if is_space(c) {
            if in_word {
                words.push(std::mem::take(&mut word));
                in_word = false;
            }
            continue;
        }
        in_word = true;
        if c == '"' {
            word.push('"');
            while let Some(q) = chars.next() {
                if q == esc {
                    if let Some(next) = chars.next() {
                        word.push(q);
                        word.push(next);
                    }
                } else {
                    word.push(q);
                    if q == '"' {
                        break;
                    }
                }
            }
        } else if c == '\'' {
            word.push('\'');
            for q in chars.by_ref() {
                word.push(q);
                if q == '\'' {
                    break;
                }
            }
        } else if c == esc {
            if let Some(next) = chars.next() {
                word.push(c);
                word.push(next);
            }
        } else {
            word.push(c);
        }
    }
    if in_word {
        words.push(word);
    }
    words.retain(|w| !w.is_empty());
    words
}

/// The word splitter's grammar as a chumsky parser: the specification `parse_words` is tested
/// against.
#[cfg(test)]
fn parse_words_reference(text: &str, esc: char) -> Vec<String> {
    let space = any::<&str, Ex>().filter(|c: &char| is_space(*c));
    let esc_pair = just(esc).then(any()).to_slice().map(str::to_string);
    let esc_end = just(esc).then(end()).to(String::new());
    let dq_run = any()
        .filter(move |c: &char| *c != '"' && *c != esc)
        .repeated()
        .at_least(1)
        .to_slice()
        .map(str::to_string);
    let dq = just('"')
        .ignore_then(
            choice((esc_pair, esc_end.clone(), dq_run))
                .repeated()
                .collect::<Vec<String>>(),
        )
        .then(just('"').or_not())
        .map(|(inner, close)| {
            let mut s = String::from("\"");
            s.extend(inner);
            if close.is_some() {
                s.push('"');
            }
            s
        });
    let sq = just('\'')
        .then(none_of('\'').repeated())
        .then(just('\'').or_not())
        .to_slice()
        .map(str::to_string);
    let plain = any()
        .filter(move |c: &char| !is_space(*c) && *c != '"' && *c != '\'' && *c != esc)
        .repeated()
        .at_least(1)
        .to_slice()
        .map(str::to_string);
    let word = choice((dq, sq, esc_pair, esc_end, plain))
        .repeated()
        .at_least(1)
        .collect::<Vec<String>>()
        .map(|parts| parts.concat());
    let words = space
        .repeated()
        .ignore_then(
            word.then_ignore(space.repeated())
                .repeated()
                .collect::<Vec<String>>(),
        )
        .then_ignore(end());
    words
        .parse(text)
        .into_result()
        .unwrap_or_default()
        .into_iter()
        .filter(|w| !w.is_empty())
        .collect()
}

/// Matches `^(\d*)<<(-?)\s*([^<]*)$`: the fd digits, the chomp dash and the terminator text.
pub(crate) fn heredoc_opener(word: &str) -> Option<(&str, bool, &str)> {
    let digits = any::<&str, Ex>()
        .filter(|c: &char| c.is_ascii_digit())
        .repeated()
        .to_slice();
    let parser = digits
        .then_ignore(just("<<"))
        .then(just('-').or_not().map(|d| d.is_some()))
        .then_ignore(any().filter(|c: &char| is_re_space(*c)).repeated())
        .then(none_of('<').repeated().to_slice())
        .then_ignore(end())
        .map(|((fd, chomp), rest)| (fd, chomp, rest));
    parser.parse(word).into_result().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_extracted() {
        assert_eq!(
            extract_flags("--a=1 --b x y", '\\'),
            ("x y", vec!["--a=1".into(), "--b".into()])
        );
        assert_eq!(extract_flags("--a -- --b", '\\'), (" --b", vec!["--a".into()]));
        assert_eq!(
            extract_flags("--chown=\"a b\" x", '\\'),
            ("x", vec!["--chown=a b".into()])
        );
        assert_eq!(extract_flags("--x=\\ y z", '\\'), ("z", vec!["--x= y".into()]));
        assert_eq!(extract_flags("--", '\\'), ("", vec![]));
        assert_eq!(extract_flags("-x", '\\'), ("-x", vec![]));
        assert_eq!(extract_flags("--u=ü x", '\\'), ("x", vec!["--u=Ã¼".into()]));
    }

    #[test]
    fn json_arrays() {
        assert_eq!(
            parse_json_array(" [\"a\", \"b\"] "),
            JsonArray::Strings(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            parse_json_array("[\"\\ud83d\\ude00\\ud800\"]"),
            JsonArray::Strings(vec!["😀\u{FFFD}".into()])
        );
        assert_eq!(parse_json_array("[\"a\", 1]"), JsonArray::NotStrings);
        assert_eq!(parse_json_array("[\"a\", 1"), JsonArray::NotJson);
        assert_eq!(parse_json_array("[\"a\"] x"), JsonArray::NotJson);
        assert_eq!(parse_json_array("['a']"), JsonArray::NotJson);
        assert_eq!(parse_json_array("[\"a\",]"), JsonArray::NotJson);
    }

    #[test]
    fn words() {
        assert_eq!(
            parse_words("a \"b c\" 'd\\' e\\ f", '\\'),
            vec!["a", "\"b c\"", "'d\\'", "e\\ f"]
        );
        assert_eq!(parse_words("x\\", '\\'), vec!["x"]);
        assert_eq!(parse_words("\\", '\\'), Vec::<String>::new());
        assert_eq!(parse_words("\"a\\\" b\" c", '\\'), vec!["\"a\\\" b\"", "c"]);
    }

    #[test]
    fn words_match_the_grammar() {
        // Every combination of the characters that matter, up to length 5, both escapes.
        let alphabet = ['a', ' ', '"', '\'', '\\', '`', '\t', '=', 'é'];
        let mut inputs = vec![String::new()];
        let mut frontier = vec![String::new()];
        for _ in 0..5 {
            let mut next = Vec::new();
            for prefix in &frontier {
                for c in alphabet {
                    let mut s = prefix.clone();
                    s.push(c);
                    next.push(s);
                }
            }
            inputs.extend(next.iter().cloned());
            frontier = next;
        }
        for text in &inputs {
            for esc in ['\\', '`'] {
                assert_eq!(
                    parse_words(text, esc),
                    parse_words_reference(text, esc),
                    "{text:?} with escape {esc:?}"
                );
            }
        }
    }

    #[test]
    fn openers_and_directives() {
        assert_eq!(heredoc_opener("3<<-  EOF"), Some(("3", true, "EOF")));
        assert_eq!(heredoc_opener("<<<EOF"), None);
        assert_eq!(
            directive_line("# Escape = ` ", "#"),
            Some(("escape".into(), "`".into()))
        );
        assert_eq!(directive_line("#x=  ", "#"), Some(("x".into(), " ".into())));
        assert_eq!(directive_line("# key = ", "#"), Some(("key".into(), " ".into())));
        assert_eq!(directive_line("# key =", "#"), None);
        assert_eq!(
            directive_line("//syntax=a b", "//"),
            Some(("syntax".into(), "a b".into()))
        );
    }
}
