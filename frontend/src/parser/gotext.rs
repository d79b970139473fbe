//! Small re-implementations of the Go standard-library text behaviours BuildKit's parser relies
//! on: `unicode.IsSpace`, `strings.TrimSpace`, `strings.ToLower`, the `[\t\v\f\r ]+` separator
//! and `strconv.Quote`.

use std::fmt::Write as _;

/// Go's `unicode.IsSpace` (the Unicode `White_Space` property, which is what Rust uses too).
pub(crate) fn is_space(c: char) -> bool {
    c.is_whitespace()
}

/// Go's `strings.TrimSpace`.
pub(crate) fn trim_space(s: &str) -> &str {
    s.trim_matches(is_space)
}

/// Go's `bytes.TrimLeftFunc(s, unicode.IsSpace)`.
pub(crate) fn trim_left_space(s: &str) -> &str {
    s.trim_start_matches(is_space)
}

/// The characters of BuildKit's `[\t\v\f\r ]+` separator.
pub(crate) fn is_sep(c: char) -> bool {
    matches!(c, '\t' | '\u{b}' | '\u{c}' | '\r' | ' ')
}

/// `regexp.MustCompile("[\t\v\f\r ]+").Split(s, -1)`: pieces between runs of separators.
pub(crate) fn split_sep(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        match rest.find(is_sep) {
            None => {
                out.push(rest.to_string());
                return out;
            }
            Some(i) => {
                out.push(rest[..i].to_string());
                rest = rest[i..].trim_start_matches(is_sep);
            }
        }
    }
}

/// `regexp.MustCompile("[\t\v\f\r ]+").Split(s, 2)`: the text before the first separator run and
/// the text after it, if there is one.
pub(crate) fn split_sep_once(s: &str) -> (&str, Option<&str>) {
    match s.find(is_sep) {
        None => (s, None),
        Some(i) => (&s[..i], Some(s[i..].trim_start_matches(is_sep))),
    }
}

/// Go's `strings.ToLower`: a per-character mapping (no context-dependent rules).
pub(crate) fn to_lower(s: &str) -> String {
    if s.is_ascii() {
        return s.to_ascii_lowercase();
    }
    s.chars().map(|c| c.to_lowercase().next().unwrap_or(c)).collect()
}

/// Go's `strings.ToUpper`: a per-character mapping.
pub(crate) fn to_upper(s: &str) -> String {
    if s.is_ascii() {
        return s.to_ascii_uppercase();
    }
    s.chars()
        .map(|c| {
            let mut up = c.to_uppercase();
            match (up.next(), up.next()) {
                (Some(u), None) => u,
                _ => c,
            }
        })
        .collect()
}

/// Approximates Go's `unicode.IsPrint`: letters, marks, numbers, punctuation, symbols and the
/// ASCII space. Without the general-category tables this treats every assigned-looking
/// character as printable except controls, separators, format characters, private-use
/// characters and non-characters.
pub(crate) fn is_print(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    let u = c as u32;
    let format = matches!(u,
        0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x890..=0x891 | 0x8E2 | 0x180E
        | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF
        | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F | 0x1BCA0..=0x1BCA3
        | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F);
    let private = matches!(u, 0xE000..=0xF8FF | 0xF0000..=0xFFFFD | 0x100000..=0x10FFFD);
    let nonchar = matches!(u, 0xFDD0..=0xFDEF) || (u & 0xFFFE) == 0xFFFE;
    let separator = matches!(u, 0x2028 | 0x2029);
    !(format || private || nonchar || separator)
}

/// Go's `strconv.Quote`.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if is_print(c) => out.push(c),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_matches_go() {
        assert_eq!(quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(quote("\t\u{0}\u{7f}"), r#""\t\x00\x7f""#);
        assert_eq!(quote("\u{a0}\u{200b}\u{85}"), r#""\u00a0\u200b\u0085""#);
        assert_eq!(quote("♥ é 😀"), "\"♥ é 😀\"");
        assert_eq!(quote("\u{F0000}"), r#""\U000f0000""#);
    }

    #[test]
    fn separators() {
        assert_eq!(split_sep("a  b\tc"), vec!["a", "b", "c"]);
        assert_eq!(split_sep_once("a \t b c"), ("a", Some("b c")));
        assert_eq!(split_sep_once("abc"), ("abc", None));
    }
}
