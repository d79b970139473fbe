//! Property tests for the Dockerfile parser: generated instruction sequences survive rendering
//! and parsing (with random continuations, comments, blank lines and line endings), and
//! arbitrary input never makes the parser or the instruction layer panic.

use kiln_frontend::instructions::parse_all;
use kiln_frontend::parser::{dump, parse};
use proptest::prelude::*;

/// What the parser must give back for one generated instruction.
#[derive(Clone, Debug)]
struct Expected {
    keyword: String,
    flags: Vec<String>,
    args: Vec<String>,
    json: bool,
}

/// One generated instruction: its words as written (joined by single spaces) and the expected
/// node.
#[derive(Clone, Debug)]
struct Generated {
    words: Vec<String>,
    expected: Expected,
}

fn token() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_./:-]{1,12}".prop_filter("not a flag", |s| !s.starts_with("--"))
}

fn keyword_case(kw: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        Just(kw.to_string()),
        Just(kw.to_lowercase()),
        Just(kw[..1].to_string() + &kw[1..].to_lowercase())
    ]
}

fn flag() -> impl Strategy<Value = String> {
    ("[a-z]{1,8}", proptest::option::of("[a-zA-Z0-9=,/]{0,10}")).prop_map(|(n, v)| match v {
        Some(v) => format!("--{n}={v}"),
        None => format!("--{n}"),
    })
}

fn exp(keyword: &str, flags: Vec<String>, args: Vec<String>, json: bool) -> Expected {
    Expected {
        keyword: keyword.to_string(),
        flags,
        args,
        json,
    }
}

fn instruction() -> impl Strategy<Value = Generated> {
    let from =
        (keyword_case("FROM"), token(), proptest::option::of(token())).prop_map(|(kw, image, name)| {
            let mut args = vec![image];
            if let Some(n) = name {
                args.extend(["AS".to_string(), n]);
            }
            let mut words = vec![kw];
            words.extend(args.iter().cloned());
            Generated {
                words,
                expected: exp("from", vec![], args, false),
            }
        });
    let run_shell = (
        keyword_case("RUN"),
        prop::collection::vec(flag(), 0..3),
        prop::collection::vec(token(), 1..6),
    )
        .prop_map(|(kw, flags, toks)| {
            let mut words = vec![kw];
            words.extend(flags.iter().cloned());
            words.extend(toks.iter().cloned());
            Generated {
                words,
                expected: exp("run", flags, vec![toks.join(" ")], false),
            }
        });
    let run_exec = (
        prop_oneof![Just("RUN"), Just("CMD"), Just("ENTRYPOINT"), Just("SHELL")],
        prop::collection::vec(any::<String>(), 0..4),
    )
        .prop_map(|(kw, elems)| {
            let text = serde_json::to_string(&elems).unwrap_or_default();
            Generated {
                words: vec![kw.to_string(), text],
                expected: exp(&kw.to_lowercase(), vec![], elems, true),
            }
        });
    let env = (
        prop_oneof![Just("ENV"), Just("LABEL")],
        prop::collection::vec((token(), "[a-zA-Z0-9_./:-]{0,8}"), 1..4),
    )
        .prop_map(|(kw, pairs)| {
            let mut words = vec![kw.to_string()];
            let mut args = Vec::new();
            for (k, v) in pairs {
                let k = k.replace('=', "_");
                words.push(format!("{k}={v}"));
                args.extend([k, v, "=".to_string()]);
            }
            Generated {
                words,
                expected: exp(&kw.to_lowercase(), vec![], args, false),
            }
        });
    let copy = (
        prop_oneof![Just("COPY"), Just("ADD")],
        prop::collection::vec(flag(), 0..3),
        prop::collection::vec(token(), 2..5),
    )
        .prop_map(|(kw, flags, paths)| {
            let mut words = vec![kw.to_string()];
            words.extend(flags.iter().cloned());
            words.extend(paths.iter().cloned());
            Generated {
                words,
                expected: exp(&kw.to_lowercase(), flags, paths, false),
            }
        });
    let list = (
        prop_oneof![Just("EXPOSE"), Just("ARG")],
        prop::collection::vec(token(), 0..4),
    )
        .prop_map(|(kw, toks)| {
            let mut words = vec![kw.to_string()];
            words.extend(toks.iter().cloned());
            Generated {
                words,
                expected: exp(&kw.to_lowercase(), vec![], toks, false),
            }
        });
    let single = (
        prop_oneof![Just("USER"), Just("WORKDIR"), Just("STOPSIGNAL")],
        prop::collection::vec(token(), 1..3),
    )
        .prop_map(|(kw, toks)| Generated {
            words: std::iter::once(kw.to_string())
                .chain(toks.iter().cloned())
                .collect(),
            expected: exp(&kw.to_lowercase(), vec![], vec![toks.join(" ")], false),
        });
    prop_oneof![from, run_shell, run_exec, env, copy, list, single]
}

/// How one instruction is laid out in the file.
#[derive(Clone, Debug)]
struct Layout {
    indent: bool,
    /// Word indices after which the line is continued.
    breaks: Vec<prop::sample::Index>,
    /// Lines put inside the continuation: true for a comment, false for a blank line.
    inner: Vec<bool>,
    before: Vec<bool>,
}

fn layout() -> impl Strategy<Value = Layout> {
    (
        any::<bool>(),
        prop::collection::vec(any::<prop::sample::Index>(), 0..3),
        prop::collection::vec(any::<bool>(), 0..2),
        prop::collection::vec(any::<bool>(), 0..2),
    )
        .prop_map(|(indent, breaks, inner, before)| Layout {
            indent,
            breaks,
            inner,
            before,
        })
}

/// Renders the instructions; returns the text and the number of empty-continuation warnings.
fn render(items: &[(Generated, Layout)], crlf: bool) -> (String, usize) {
    let nl = if crlf { "\r\n" } else { "\n" };
    let mut out = String::new();
    let mut warnings = 0;
    for (g, l) in items {
        for comment in &l.before {
            out.push_str(if *comment { "# a comment" } else { "" });
            out.push_str(nl);
        }
        if l.indent {
            out.push_str("  ");
        }
        // Exec-form JSON stays on one line: only break between the keyword-level words of other
        // instructions, and never inside the generated JSON text.
        let breakable = !g.expected.json;
        let breaks: Vec<usize> = if breakable && g.words.len() > 1 {
            l.breaks.iter().map(|i| i.index(g.words.len() - 1) + 1).collect()
        } else {
            Vec::new()
        };
        let mut had_blank = false;
        for (i, w) in g.words.iter().enumerate() {
            if i > 0 {
                if breaks.contains(&i) {
                    out.push_str(" \\");
                    out.push_str(nl);
                    for comment in &l.inner {
                        out.push_str(if *comment { "   # inner comment" } else { "  " });
                        out.push_str(nl);
                        had_blank |= !*comment;
                    }
                } else {
                    out.push(' ');
                }
            }
            out.push_str(w);
        }
        warnings += usize::from(had_blank);
        out.push_str(nl);
    }
    (out, warnings)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_instructions_round_trip(
        items in prop::collection::vec((instruction(), layout()), 1..8),
        crlf in any::<bool>(),
    ) {
        let (text, warnings) = render(&items, crlf);
        let df = parse(text.as_bytes()).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(df.nodes.len(), items.len(), "{}", text);
        prop_assert_eq!(df.warnings.len(), warnings);
        for (node, (g, _)) in df.nodes.iter().zip(&items) {
            let e = &g.expected;
            prop_assert_eq!(&node.keyword, &e.keyword, "{}", text);
            prop_assert_eq!(&node.flags, &e.flags, "{}", text);
            prop_assert_eq!(&node.args, &e.args, "{}", text);
            prop_assert_eq!(node.json, e.json);
            prop_assert!(node.span.start_line <= node.span.end_line);
        }
        for pair in df.nodes.windows(2) {
            prop_assert!(pair[0].span.end_line < pair[1].span.start_line);
        }
        // Line endings do not change the tree.
        let other = if crlf { text.replace("\r\n", "\n") } else { text.replace('\n', "\r\n") };
        let df2 = parse(other.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(dump(&df2), dump(&df));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(prop_oneof![any::<u8>(), Just(b'\n'), Just(b'\\'), Just(b'<'), Just(b' '), Just(b'R')], 0..400)) {
        if let Ok(df) = parse(&bytes) {
            let _ = parse_all(&df);
            // The fuzz target's round trip: CRLF line endings give the same tree.
            let crlf: Vec<u8> = bytes
                .iter()
                .flat_map(|b| if *b == b'\n' { vec![b'\r', b'\n'] } else { vec![*b] })
                .collect();
            let again = parse(&crlf).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(dump(&again), dump(&df));
        }
    }

    #[test]
    fn dockerfile_like_text_is_stable(
        lines in prop::collection::vec(
            prop_oneof![
                Just("RUN a \\".to_string()), Just("# c".to_string()), Just(String::new()),
                Just("COPY <<EOF /x".to_string()), Just("EOF".to_string()), Just("\tEOF".to_string()),
                Just("RUN <<-'E' cat".to_string()), Just("E".to_string()), Just("ONBUILD ADD <<A b".to_string()),
                Just("A".to_string()), Just("ENV a=b c=\"d e\"".to_string()), Just("CMD [\"x\", \"y\"]".to_string()),
                Just("# escape=`".to_string()), Just("RUN x `".to_string()), Just("LABEL k v".to_string()),
                "[ -~]{0,20}",
            ],
            0..25,
        )
    ) {
        let text = lines.join("\n");
        if let Ok(df) = parse(text.as_bytes()) {
            // Trailing comments and blank lines do not change the tree (a pending continuation
            // may swallow them, which moves spans but not text).
            let _ = parse_all(&df);
            let more = format!("{text}\n# trailing comment\n\n");
            let again = parse(more.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(dump(&again), dump(&df), "{}", text);
        }
    }
}
