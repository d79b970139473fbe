//! A JSON syntax checker (RFC 8259, with Go's nesting limit). It only answers "is this one valid
//! JSON value?"; it is iterative, so no input can exhaust the stack.

/// Go's `encoding/json` refuses documents nested deeper than this.
const MAX_DEPTH: usize = 10_000;

#[derive(Clone, Copy)]
enum Frame {
    Array,
    Object,
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while matches!(b.get(*i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        *i += 1;
    }
}

fn scan_string(b: &[u8], i: &mut usize) -> bool {
    if b.get(*i) != Some(&b'"') {
        return false;
    }
    *i += 1;
    loop {
        match b.get(*i) {
            None => return false,
            Some(b'"') => {
                *i += 1;
                return true;
            }
            Some(b'\\') => match b.get(*i + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => *i += 2,
                Some(b'u') => {
                    let hex = b.get(*i + 2..*i + 6);
                    if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                        return false;
                    }
                    *i += 6;
                }
                _ => return false,
            },
            Some(c) if *c < 0x20 => return false,
            Some(_) => *i += 1,
        }
    }
}

fn scan_digits(b: &[u8], i: &mut usize) -> usize {
    let start = *i;
    while b.get(*i).is_some_and(u8::is_ascii_digit) {
        *i += 1;
    }
    *i - start
}

fn scan_number(b: &[u8], i: &mut usize) -> bool {
    if b.get(*i) == Some(&b'-') {
        *i += 1;
    }
    match b.get(*i) {
        Some(b'0') => *i += 1,
        Some(b'1'..=b'9') => {
            scan_digits(b, i);
        }
        _ => return false,
    }
    if b.get(*i) == Some(&b'.') {
        *i += 1;
        if scan_digits(b, i) == 0 {
            return false;
        }
    }
    if matches!(b.get(*i), Some(b'e' | b'E')) {
        *i += 1;
        if matches!(b.get(*i), Some(b'+' | b'-')) {
            *i += 1;
        }
        if scan_digits(b, i) == 0 {
            return false;
        }
    }
    true
}

fn scan_literal(b: &[u8], i: &mut usize, lit: &[u8]) -> bool {
    if b.get(*i..*i + lit.len()) == Some(lit) {
        *i += lit.len();
        true
    } else {
        false
    }
}

/// After an object key: `\s* : `.
fn scan_colon(b: &[u8], i: &mut usize) -> bool {
    skip_ws(b, i);
    if b.get(*i) == Some(&b':') {
        *i += 1;
        true
    } else {
        false
    }
}

/// Whether `text` is exactly one JSON value, optionally surrounded by JSON whitespace.
pub(crate) fn is_valid_json(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    let mut stack: Vec<Frame> = Vec::new();
    loop {
        // Expecting a value.
        skip_ws(b, &mut i);
        let ok = match b.get(i) {
            Some(b'[') => {
                i += 1;
                skip_ws(b, &mut i);
                if b.get(i) == Some(&b']') {
                    i += 1;
                    true
                } else {
                    if stack.len() >= MAX_DEPTH {
                        return false;
                    }
                    stack.push(Frame::Array);
                    continue;
                }
            }
            Some(b'{') => {
                i += 1;
                skip_ws(b, &mut i);
                if b.get(i) == Some(&b'}') {
                    i += 1;
                    true
                } else {
                    if stack.len() >= MAX_DEPTH {
                        return false;
                    }
                    if !scan_string(b, &mut i) || !scan_colon(b, &mut i) {
                        return false;
                    }
                    stack.push(Frame::Object);
                    continue;
                }
            }
            Some(b'"') => scan_string(b, &mut i),
            Some(b't') => scan_literal(b, &mut i, b"true"),
            Some(b'f') => scan_literal(b, &mut i, b"false"),
            Some(b'n') => scan_literal(b, &mut i, b"null"),
            Some(b'-' | b'0'..=b'9') => scan_number(b, &mut i),
            _ => false,
        };
        if !ok {
            return false;
        }
        // A value ended: close containers until one wants another element.
        loop {
            skip_ws(b, &mut i);
            match stack.last() {
                None => return i == b.len(),
                Some(Frame::Array) => match b.get(i) {
                    Some(b',') => {
                        i += 1;
                        break;
                    }
                    Some(b']') => {
                        i += 1;
                        stack.pop();
                    }
                    _ => return false,
                },
                Some(Frame::Object) => match b.get(i) {
                    Some(b',') => {
                        i += 1;
                        skip_ws(b, &mut i);
                        if !scan_string(b, &mut i) || !scan_colon(b, &mut i) {
                            return false;
                        }
                        break;
                    }
                    Some(b'}') => {
                        i += 1;
                        stack.pop();
                    }
                    _ => return false,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_valid_json;

    #[test]
    fn validates() {
        for ok in [
            "[]",
            " [1, -2.5e3, true, null, {\"a\": [\"b\"]}] ",
            "\"x\"",
            "{}",
            "[[[]]]",
        ] {
            assert!(is_valid_json(ok), "{ok}");
        }
        for bad in [
            "[",
            "[1,]",
            "[01]",
            "{\"a\"}",
            "[\"\t\"]",
            "[] x",
            "",
            "[1.]",
            "{,}",
            "[\"\\x\"]",
        ] {
            assert!(!is_valid_json(bad), "{bad}");
        }
        assert!(!is_valid_json(&"[".repeat(20_000)));
    }
}
