//! Sections 8-10 of the corpus README: `shell-lexer/envVarTest`, `wordsTest` and
//! `process-word.jsonl`, run through `kiln_frontend::shell::Lexer` (escape `\`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use kiln_frontend::shell::Lexer;

pub fn run(dir: &Path) -> crate::Outcome {
    let mut outcome = crate::Outcome::default();
    let base = dir.join("shell-lexer");
    if let Ok(bytes) = std::fs::read(base.join("envVarTest")) {
        env_var_test(&String::from_utf8_lossy(&bytes), &mut outcome);
    }
    if let Ok(bytes) = std::fs::read(base.join("wordsTest")) {
        words_test(&String::from_utf8_lossy(&bytes), &mut outcome);
    }
    if let Ok(bytes) = std::fs::read(base.join("process-word.jsonl")) {
        process_word_jsonl(&String::from_utf8_lossy(&bytes), &mut outcome);
    }
    outcome
}

/// `platform | input | expected`, fixed environment, one word.
fn env_var_test(text: &str, outcome: &mut crate::Outcome) {
    let env: BTreeMap<&str, &str> = [
        ("PWD", "/home"),
        ("SHELL", "bash"),
        ("KOREAN", "한국어"),
        ("NULL", ""),
    ]
    .into();
    let lookup = |name: &str| env.get(name).map(|v| v.to_string());
    let lexer = Lexer::new('\\');
    for (n, line) in text.split('\n').enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.trim().split('|').map(str::trim).collect();
        let [platform, input, expected] = fields[..] else {
            outcome.check(false, || format!("envVarTest line {}: malformed {line:?}", n + 1));
            continue;
        };
        if platform == "W" {
            continue;
        }
        let got = lexer.process_word(input, &lookup);
        let ok = match &got {
            Ok(word) => expected != "error" && word == expected,
            Err(_) => expected == "error",
        };
        outcome.check(ok, || {
            format!(
                "envVarTest line {}: input {input:?}\n  expected: {expected:?}\n  got:      {got:?}",
                n + 1
            )
        });
    }
}

/// `ENV name=value` lines accumulate; `input | w1,w2,...` lines split words.
fn words_test(text: &str, outcome: &mut crate::Outcome) {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let lexer = Lexer::new('\\');
    // A final newline ends the last line; it does not start an (empty, malformed) test line.
    for (n, line) in text.strip_suffix('\n').unwrap_or(text).split('\n').enumerate() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("ENV ") {
            let rest = rest.trim_start_matches(' ');
            match rest.split_once('=') {
                Some((name, value)) => {
                    env.insert(name.to_string(), value.to_string());
                }
                None => outcome.check(false, || {
                    format!("wordsTest line {}: malformed ENV {line:?}", n + 1)
                }),
            }
            continue;
        }
        let parts: Vec<&str> = line.split('|').collect();
        let [input, expected] = parts[..] else {
            outcome.check(false, || format!("wordsTest line {}: malformed {line:?}", n + 1));
            continue;
        };
        let (input, expected) = (input.trim(), expected.trim_start_matches(' '));
        let lookup = |name: &str| env.get(name).cloned();
        let got = lexer.process_words(input, &lookup);
        let ok = match &got {
            Ok(words) => expected != "error" && words.iter().map(String::as_str).eq(expected.split(',')),
            Err(_) => expected == "error",
        };
        outcome.check(ok, || {
            format!(
                "wordsTest line {}: input {input:?}\n  expected: {expected:?}\n  got:      {got:?}",
                n + 1
            )
        });
    }
}

/// One JSON case per line, with its own environment and optional matched/unmatched sets.
fn process_word_jsonl(text: &str, outcome: &mut crate::Outcome) {
    let lexer = Lexer::new('\\');
    for (n, line) in text.split('\n').enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let case: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                outcome.check(false, || {
                    format!("process-word.jsonl line {}: bad JSON: {e}", n + 1)
                });
                continue;
            }
        };
        let id = case["id"].as_str().unwrap_or("?").to_string();
        let Some(input) = case["input"].as_str() else {
            outcome.check(false, || format!("process-word.jsonl {id}: no input"));
            continue;
        };
        let env: BTreeMap<String, String> = case["env"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let lookup = |name: &str| env.get(name).cloned();
        let set = |key: &str| -> Option<BTreeSet<String>> {
            case[key]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        };
        let got = lexer.process_word_with_matches(input, &lookup);
        let want_error = case["error"].as_bool().unwrap_or(false);
        let ok = match &got {
            Err(e) => {
                want_error
                    && case["error_contains"]
                        .as_str()
                        .is_none_or(|s| e.to_string().contains(s))
            }
            Ok(exp) => {
                !want_error
                    && case["expected"].as_str() == Some(exp.result.as_str())
                    && set("matched").is_none_or(|m| m == exp.matched)
                    && set("unmatched").is_none_or(|u| u == exp.unmatched)
            }
        };
        outcome.check(ok, || {
            format!("process-word.jsonl {id}: input {input:?} env {env:?}\n  expected: {line}\n  got:      {got:?}")
        });
    }
}
