//! Parser sections of the corpus (README sections 1-7 and 13): every case folder and table row
//! found under `buildkit-parser/` and `real-world/` is run.

use std::fs;
use std::path::{Path, PathBuf};

use kiln_frontend::parser::{
    detect_syntax, dump, heredocs_in_line, parse, parse_directive, parse_directives, parse_heredoc_word,
    parse_json_array, parse_words, Dockerfile, JsonArray,
};
use serde_json::Value;

use crate::Outcome;

/// Sub-folders of `dir`, sorted (none if it does not exist).
fn case_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn read_json(path: &Path) -> Result<Value, String> {
    serde_json::from_slice(&read(path)?).map_err(|e| format!("bad JSON in {}: {e}", path.display()))
}

fn parse_case(dir: &Path) -> Result<Dockerfile, String> {
    let src = read(&dir.join("Dockerfile"))?;
    parse(&src).map_err(|e| format!("{}: parse failed: {e}", dir.display()))
}

fn framed(what: &str, expected: &str, got: &str) -> String {
    format!("{what}\n--- expected\n{expected}--- got\n{got}---")
}

/// Sections 1 and 13: parse and compare the dump with `result`.
fn check_dump(dir: &Path) -> Result<Dockerfile, String> {
    let df = parse_case(dir)?;
    let expected = String::from_utf8_lossy(&read(&dir.join("result"))?).into_owned();
    let got = dump(&df);
    if got != expected {
        return Err(framed(
            &format!("{}: dump differs", dir.display()),
            &expected,
            &got,
        ));
    }
    Ok(df)
}

fn run_dump_cases(root: &Path, out: &mut Outcome) {
    for dir in case_dirs(root) {
        let res = check_dump(&dir);
        out.check(res.is_ok(), || res.err().unwrap_or_default());
    }
}

fn run_negative_cases(root: &Path, out: &mut Outcome) {
    for dir in case_dirs(root) {
        let res = read(&dir.join("Dockerfile")).map(|src| parse(&src));
        out.check(matches!(res, Ok(Err(_))), || match res {
            Ok(Ok(df)) => format!("{}: parsed but must fail:\n{}", dir.display(), dump(&df)),
            Ok(Err(_)) => String::new(),
            Err(e) => e,
        });
    }
}

fn as_u32(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// Section 3.
fn check_lines(dir: &Path) -> Result<(), String> {
    let df = parse_case(dir)?;
    let exp = read_json(&dir.join("expected-lines.json"))?;
    let want_whole = (as_u32(&exp["start_line"]), as_u32(&exp["end_line"]));
    let got_whole = (Some(df.span.start_line), Some(df.span.end_line));
    let want: Vec<(Option<u32>, Option<u32>)> = exp["instructions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| (as_u32(&i["start_line"]), as_u32(&i["end_line"])))
                .collect()
        })
        .unwrap_or_default();
    let got: Vec<(Option<u32>, Option<u32>)> = df
        .nodes
        .iter()
        .map(|n| (Some(n.span.start_line), Some(n.span.end_line)))
        .collect();
    if want_whole != got_whole || want != got {
        return Err(format!(
            "{}: spans differ\nexpected {want_whole:?} {want:?}\ngot      {got_whole:?} {got:?}",
            dir.display()
        ));
    }
    Ok(())
}

/// Section 4.
fn check_warnings(dir: &Path) -> Result<(), String> {
    let df = check_dump(dir)?;
    let exp = read_json(&dir.join("expected.json"))?;
    let want: Vec<(String, Option<u32>)> = exp["warnings"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|w| {
                    (
                        w["message"].as_str().unwrap_or_default().to_string(),
                        as_u32(&w["line"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let got: Vec<(String, Option<u32>)> = df
        .warnings
        .iter()
        .map(|w| (w.message.clone(), Some(w.line)))
        .collect();
    if want != got {
        return Err(format!(
            "{}: warnings differ\nexpected {want:?}\ngot      {got:?}",
            dir.display()
        ));
    }
    Ok(())
}

/// Section 5.1.
fn check_heredoc_case(dir: &Path) -> Result<(), String> {
    let df = check_dump(dir)?;
    let exp = read_json(&dir.join("expected.json"))?;
    let want = exp["instructions"].as_array().cloned().unwrap_or_default();
    let got: Vec<Value> = df
        .nodes
        .iter()
        .map(|n| {
            let docs: Vec<Value> = n
                .heredocs
                .iter()
                .map(|h| {
                    serde_json::json!({"name": h.name, "content": h.content, "expand": h.expand,
                        "chomp": h.chomp, "fd": h.fd})
                })
                .collect();
            serde_json::json!({"keyword": n.keyword, "start_line": n.span.start_line,
                "end_line": n.span.end_line, "heredocs": docs})
        })
        .collect();
    if want != got {
        return Err(format!(
            "{}: instructions differ\nexpected {}\ngot      {}",
            dir.display(),
            Value::Array(want),
            Value::Array(got)
        ));
    }
    Ok(())
}

/// TAB-separated rows after the header line.
fn tsv_rows(path: &Path) -> Result<Vec<Vec<String>>, String> {
    let text = String::from_utf8_lossy(&read(path)?).into_owned();
    Ok(text
        .lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect())
}

/// Section 5.2.
fn run_words_tsv(path: &Path, out: &mut Outcome) {
    let rows = match tsv_rows(path) {
        Ok(r) => r,
        Err(e) => return out.check(false, || e),
    };
    for row in rows {
        let [word, result, name, chomp, expand] = row.as_slice() else {
            out.check(false, || format!("{}: malformed row {row:?}", path.display()));
            continue;
        };
        let got = match parse_heredoc_word(word) {
            Err(_) => vec!["error".to_string(), "-".into(), "-".into(), "-".into()],
            Ok(None) => vec!["none".to_string(), "-".into(), "-".into(), "-".into()],
            Ok(Some(h)) => vec![
                "heredoc".to_string(),
                h.name,
                h.chomp.to_string(),
                h.expand.to_string(),
            ],
        };
        let want = vec![result.clone(), name.clone(), chomp.clone(), expand.clone()];
        out.check(got == want, || {
            format!("words.tsv {word:?}: expected {want:?}, got {got:?}")
        });
    }
}

/// Section 5.3.
fn run_lines_tsv(path: &Path, out: &mut Outcome) {
    let rows = match tsv_rows(path) {
        Ok(r) => r,
        Err(e) => return out.check(false, || e),
    };
    for row in rows {
        let (Some(line), Some(names)) = (row.first(), row.get(1)) else {
            out.check(false, || format!("{}: malformed row {row:?}", path.display()));
            continue;
        };
        let got = match heredocs_in_line(line) {
            Ok(docs) if docs.is_empty() => "(none)".to_string(),
            Ok(docs) => docs.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(","),
            Err(e) => format!("error: {e}"),
        };
        out.check(&got == names, || {
            format!("lines.tsv {line:?}: expected {names}, got {got}")
        });
    }
}

/// Section 6.
fn check_directive_case(dir: &Path) -> Result<(), String> {
    let src = read(&dir.join("Dockerfile"))?;
    let exp = read_json(&dir.join("expected.json"))?;
    let function = exp["function"].as_str().unwrap_or_default();
    if function == "parse_all" {
        let got = parse_directives(&src).map_err(|e| format!("{}: {e}", dir.display()))?;
        let got: Vec<Value> = got
            .iter()
            .map(|d| serde_json::json!({"name": d.name, "value": d.value, "line": d.line}))
            .collect();
        let want = exp["directives"].clone();
        if Value::Array(got.clone()) != want {
            return Err(format!(
                "{}: expected {want}, got {}",
                dir.display(),
                Value::Array(got)
            ));
        }
        return Ok(());
    }
    let key = exp["key"].as_str().unwrap_or_default();
    let found = match function {
        "detect_syntax" => detect_syntax(&src),
        "parse_directive" => parse_directive(key, &src),
        other => return Err(format!("{}: unknown function {other:?}", dir.display())),
    };
    let got = match &found {
        Some(f) => serde_json::json!({"found": true, "value": f.value, "cmdline": f.cmdline, "line": f.line}),
        None => serde_json::json!({"found": false, "value": "", "cmdline": "", "line": null}),
    };
    let want = serde_json::json!({"found": exp["found"], "value": exp["value"],
        "cmdline": exp["cmdline"], "line": exp.get("line").cloned().unwrap_or(Value::Null)});
    if got != want {
        return Err(format!("{}: expected {want}, got {got}", dir.display()));
    }
    Ok(())
}

fn jsonl(path: &Path) -> Result<Vec<Value>, String> {
    let text = String::from_utf8_lossy(&read(path)?).into_owned();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: bad line {l:?}: {e}", path.display())))
        .collect()
}

/// Section 7.
fn run_jsonl(root: &Path, out: &mut Outcome) {
    for (file, words) in [("json-arrays.jsonl", false), ("parse-words.jsonl", true)] {
        let path = root.join(file);
        if !path.exists() {
            continue;
        }
        let cases = match jsonl(&path) {
            Ok(c) => c,
            Err(e) => {
                out.check(false, || e);
                continue;
            }
        };
        for case in cases {
            let input = case["input"].as_str().unwrap_or_default();
            let got = if words {
                serde_json::json!({"output": parse_words(input, '\\')})
            } else {
                match parse_json_array(input) {
                    JsonArray::Strings(v) => serde_json::json!({"output": v}),
                    JsonArray::NotStrings => serde_json::json!({"error": "not-an-array-of-strings"}),
                    JsonArray::NotJson => serde_json::json!({"error": "not-json"}),
                }
            };
            let mut want = case.clone();
            if let Some(obj) = want.as_object_mut() {
                obj.remove("input");
            }
            out.check(got == want, || {
                format!("{file} {input:?}: expected {want}, got {got}")
            });
        }
    }
}

/// Runs every parser case under `dir`.
pub fn run(dir: &Path) -> Outcome {
    let mut out = Outcome::default();
    let bk = dir.join("buildkit-parser");
    run_dump_cases(&bk.join("testfiles"), &mut out);
    run_negative_cases(&bk.join("testfiles-negative"), &mut out);
    if bk.join("testfile-line").is_dir() {
        let res = check_lines(&bk.join("testfile-line"));
        out.check(res.is_ok(), || res.err().unwrap_or_default());
    }
    for case in case_dirs(&bk.join("warnings")) {
        let res = check_warnings(&case);
        out.check(res.is_ok(), || res.err().unwrap_or_default());
    }
    for case in case_dirs(&bk.join("heredoc")) {
        let res = check_heredoc_case(&case);
        out.check(res.is_ok(), || res.err().unwrap_or_default());
    }
    if bk.join("heredoc/words.tsv").exists() {
        run_words_tsv(&bk.join("heredoc/words.tsv"), &mut out);
    }
    if bk.join("heredoc/lines.tsv").exists() {
        run_lines_tsv(&bk.join("heredoc/lines.tsv"), &mut out);
    }
    for case in case_dirs(&bk.join("directives")) {
        let res = check_directive_case(&case);
        out.check(res.is_ok(), || res.err().unwrap_or_default());
    }
    run_jsonl(&bk, &mut out);
    let rw = dir.join("real-world");
    run_dump_cases(&rw.join("testfiles"), &mut out);
    run_negative_cases(&rw.join("testfiles-negative"), &mut out);
    out
}
