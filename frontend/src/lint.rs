//! BuildKit's Dockerfile checks (`docker build --check`, the build's lint warnings): the rule set
//! with BuildKit's names, descriptions, messages and URLs, the `# check=` directive /
//! `BUILDKIT_DOCKERFILE_CHECK` configuration, and the checks that need only the parsed file.
//!
//! The checks that need a stage's state (undefined variables, JSON arguments, ...) run while
//! lowering (`lower::dispatch`), through the same [`Linter`], so skip / experimental / error
//! settings apply to all of them alike. Everything here is pure: no I/O.
//!
//! The rule table follows BuildKit's `frontend/dockerfile/linter/ruleset.go` (Dockerfile frontend
//! 1.18+). Where the checks run, and in which order their warnings come, follows
//! `dockerfile2llb`: the checks of the parsed file first (empty continuation lines, then each
//! instruction in order, then stage names and instruction casing), then the `FROM` lines, then
//! the instructions of the stages that are built.

use std::collections::BTreeSet;
use std::fmt;

use crate::parser::gotext::{is_sep, quote, trim_space};
use crate::parser::{Dockerfile, Node, Span};

/// One check.
#[derive(Debug, PartialEq, Eq)]
pub struct Rule {
    /// The name users skip it by (`JSONArgsRecommended`).
    pub name: &'static str,
    pub description: &'static str,
    /// Its documentation; empty when BuildKit gives none.
    pub url: &'static str,
    /// Off unless `experimental=` enables it.
    pub experimental: bool,
}

macro_rules! rule {
    ($id:ident, $name:literal, $desc:literal, $url:literal) => {
        rule!($id, $name, $desc, $url, false);
    };
    ($id:ident, $name:literal, $desc:literal, $url:literal, $exp:literal) => {
        #[doc = $desc]
        pub const $id: Rule = Rule {
            name: $name,
            description: $desc,
            url: $url,
            experimental: $exp,
        };
    };
}

rule!(
    STAGE_NAME_CASING,
    "StageNameCasing",
    "Stage names should be lowercase",
    "https://docs.docker.com/go/dockerfile/rule/stage-name-casing/"
);
rule!(
    FROM_AS_CASING,
    "FromAsCasing",
    "The 'as' keyword should match the case of the 'from' keyword",
    "https://docs.docker.com/go/dockerfile/rule/from-as-casing/"
);
rule!(
    NO_EMPTY_CONTINUATION,
    "NoEmptyContinuation",
    "Empty continuation lines will become errors in a future release",
    "https://docs.docker.com/go/dockerfile/rule/no-empty-continuation/"
);
rule!(
    CONSISTENT_INSTRUCTION_CASING,
    "ConsistentInstructionCasing",
    "All commands within the Dockerfile should use the same casing (either upper or lower)",
    "https://docs.docker.com/go/dockerfile/rule/consistent-instruction-casing/"
);
rule!(
    DUPLICATE_STAGE_NAME,
    "DuplicateStageName",
    "Stage names should be unique",
    "https://docs.docker.com/go/dockerfile/rule/duplicate-stage-name/"
);
rule!(
    RESERVED_STAGE_NAME,
    "ReservedStageName",
    "Reserved words should not be used as stage names",
    "https://docs.docker.com/go/dockerfile/rule/reserved-stage-name/"
);
rule!(
    JSON_ARGS_RECOMMENDED,
    "JSONArgsRecommended",
    "JSON arguments recommended for ENTRYPOINT/CMD to prevent unintended behavior related to OS signals",
    "https://docs.docker.com/go/dockerfile/rule/json-args-recommended/"
);
rule!(
    MAINTAINER_DEPRECATED,
    "MaintainerDeprecated",
    "The MAINTAINER instruction is deprecated, use a label instead to define an image author",
    "https://docs.docker.com/go/dockerfile/rule/maintainer-deprecated/"
);
rule!(
    UNDEFINED_ARG_IN_FROM,
    "UndefinedArgInFrom",
    "FROM command must use declared ARGs",
    "https://docs.docker.com/go/dockerfile/rule/undefined-arg-in-from/"
);
rule!(WORKDIR_RELATIVE_PATH, "WorkdirRelativePath", "Relative workdir without an absolute workdir declared within the build can have unexpected results if the base image changes", "https://docs.docker.com/go/dockerfile/rule/workdir-relative-path/");
rule!(
    UNDEFINED_VAR,
    "UndefinedVar",
    "Variables should be defined before their use",
    "https://docs.docker.com/go/dockerfile/rule/undefined-var/"
);
rule!(
    MULTIPLE_INSTRUCTIONS_DISALLOWED,
    "MultipleInstructionsDisallowed",
    "Multiple instructions of the same type should not be used in the same stage",
    "https://docs.docker.com/go/dockerfile/rule/multiple-instructions-disallowed/"
);
rule!(
    LEGACY_KEY_VALUE_FORMAT,
    "LegacyKeyValueFormat",
    "Legacy key/value format with whitespace separator should not be used",
    "https://docs.docker.com/go/dockerfile/rule/legacy-key-value-format/"
);
rule!(
    INVALID_BASE_IMAGE_PLATFORM,
    "InvalidBaseImagePlatform",
    "Base image platform does not match expected target platform",
    "https://docs.docker.com/go/dockerfile/rule/invalid-base-image-platform/"
);
rule!(
    REDUNDANT_TARGET_PLATFORM,
    "RedundantTargetPlatform",
    "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior",
    "https://docs.docker.com/go/dockerfile/rule/redundant-target-platform/"
);
rule!(
    SECRETS_USED_IN_ARG_OR_ENV,
    "SecretsUsedInArgOrEnv",
    "Sensitive data should not be used in the ARG or ENV commands",
    "https://docs.docker.com/go/dockerfile/rule/secrets-used-in-arg-or-env/"
);
rule!(
    INVALID_DEFAULT_ARG_IN_FROM,
    "InvalidDefaultArgInFrom",
    "Default value for global ARG results in an empty or invalid base image name",
    "https://docs.docker.com/go/dockerfile/rule/invalid-default-arg-in-from/"
);
rule!(
    FROM_PLATFORM_FLAG_CONST_DISALLOWED,
    "FromPlatformFlagConstDisallowed",
    "FROM --platform flag should not use a constant value",
    "https://docs.docker.com/go/dockerfile/rule/from-platform-flag-const-disallowed/"
);
rule!(
    COPY_IGNORED_FILE,
    "CopyIgnoredFile",
    "Attempting to Copy file that is excluded by .dockerignore",
    "https://docs.docker.com/go/dockerfile/rule/copy-ignored-file/",
    true
);
rule!(INVALID_DEFINITION_DESCRIPTION, "InvalidDefinitionDescription", "Comment for build stage or argument should follow the format: `# <arg/stage name> <description>`. If this is not intended to be a description comment, add an empty line or comment between the instruction and the comment.", "https://docs.docker.com/go/dockerfile/rule/invalid-definition-description/", true);
rule!(
    EXPOSE_PROTO_CASING,
    "ExposeProtoCasing",
    "Protocol in EXPOSE instruction should be lowercase",
    "https://docs.docker.com/go/dockerfile/rule/expose-proto-casing/"
);
rule!(EXPOSE_INVALID_FORMAT, "ExposeInvalidFormat", "IP address and host-port mapping should not be used in EXPOSE instruction. This will become an error in a future release", "https://docs.docker.com/go/dockerfile/rule/expose-invalid-format/");

/// Every rule, in BuildKit's order.
pub const RULES: [&Rule; 22] = [
    &STAGE_NAME_CASING,
    &FROM_AS_CASING,
    &NO_EMPTY_CONTINUATION,
    &CONSISTENT_INSTRUCTION_CASING,
    &DUPLICATE_STAGE_NAME,
    &RESERVED_STAGE_NAME,
    &JSON_ARGS_RECOMMENDED,
    &MAINTAINER_DEPRECATED,
    &UNDEFINED_ARG_IN_FROM,
    &WORKDIR_RELATIVE_PATH,
    &UNDEFINED_VAR,
    &MULTIPLE_INSTRUCTIONS_DISALLOWED,
    &LEGACY_KEY_VALUE_FORMAT,
    &INVALID_BASE_IMAGE_PLATFORM,
    &REDUNDANT_TARGET_PLATFORM,
    &SECRETS_USED_IN_ARG_OR_ENV,
    &INVALID_DEFAULT_ARG_IN_FROM,
    &FROM_PLATFORM_FLAG_CONST_DISALLOWED,
    &COPY_IGNORED_FILE,
    &INVALID_DEFINITION_DESCRIPTION,
    &EXPOSE_PROTO_CASING,
    &EXPOSE_INVALID_FORMAT,
];

/// A finding: a check that fired, or (with an empty `rule`) a notice about the build that no
/// check configuration turns off, such as an unsupported `# syntax=` frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// BuildKit's rule name (`JSONArgsRecommended`); empty for a notice.
    pub rule: String,
    /// The rule's description (BuildKit's `Detail` line under the message).
    pub description: String,
    /// The rule's documentation URL; may be empty.
    pub url: String,
    /// What was found, formatted as BuildKit formats it.
    pub message: String,
    /// 1-based first line of the instruction concerned; 0 when not tied to a line.
    pub line: u32,
    /// 1-based last line (equal to `line` for one-line instructions).
    pub end_line: u32,
}

impl Warning {
    /// A notice: not a check, always shown.
    pub fn notice(message: String, line: u32) -> Warning {
        Warning {
            rule: String::new(),
            description: String::new(),
            url: String::new(),
            message,
            line,
            end_line: line,
        }
    }
}

/// BuildKit's short form, `RuleName: message (line N)`.
impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.rule.is_empty() {
            write!(f, "{}: ", self.rule)?;
        }
        f.write_str(&self.message)?;
        if self.line > 0 {
            write!(f, " (line {})", self.line)?;
        }
        Ok(())
    }
}

/// A `# check=` directive or `BUILDKIT_DOCKERFILE_CHECK` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckConfigError {
    #[error("invalid check option \"{0}\"")]
    Option(String),
    #[error("failed to parse check option \"{option}\": strconv.ParseBool: parsing {value}: invalid syntax")]
    Bool { option: String, value: String },
}

/// What the checks do: BuildKit's `linter.Config`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckConfig {
    pub skip_all: bool,
    pub skip: Vec<String>,
    pub experimental_all: bool,
    pub experimental: Vec<String>,
    /// `error=true`: any warning fails the build.
    pub error: bool,
}

impl CheckConfig {
    /// Parses `skip=A,B|all;experimental=C|all;error=true` (BuildKit's `ParseLintOptions`): at
    /// most three `;`-separated options, each `key=value`.
    pub fn parse(s: &str) -> Result<CheckConfig, CheckConfigError> {
        let s = s.trim();
        let mut out = CheckConfig::default();
        if s.is_empty() {
            return Ok(out);
        }
        let list = |v: &str| v.split(',').map(|r| r.trim().to_string()).collect::<Vec<_>>();
        for part in s.splitn(3, ';') {
            let Some((k, v)) = part.split_once('=') else {
                return Err(CheckConfigError::Option(part.to_string()));
            };
            match k.trim() {
                "skip" => match v.trim() {
                    "all" => out.skip_all = true,
                    v => out.skip = list(v),
                },
                "experimental" => match v.trim() {
                    "all" => out.experimental_all = true,
                    v => out.experimental = list(v),
                },
                "error" => {
                    out.error = parse_go_bool(v.trim()).ok_or_else(|| CheckConfigError::Bool {
                        option: part.to_string(),
                        value: go_quote_plain(v.trim()),
                    })?;
                }
                other => return Err(CheckConfigError::Option(other.to_string())),
            }
        }
        Ok(out)
    }

    /// Whether `rule` runs: an experimental rule only when enabled (whatever `skip` says), any
    /// other rule unless skipped.
    pub fn enabled(&self, rule: &Rule) -> bool {
        if rule.experimental {
            self.experimental_all || self.experimental.iter().any(|r| r == rule.name)
        } else {
            !(self.skip_all || self.skip.iter().any(|r| r == rule.name))
        }
    }
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `%q` as strconv errors show the input.
fn go_quote_plain(v: &str) -> String {
    quote(v)
}

/// Collects warnings under a [`CheckConfig`].
#[derive(Debug, Default)]
pub struct Linter {
    config: CheckConfig,
    warnings: Vec<Warning>,
    /// Rules that fired, in first-seen order (for `error=true`).
    called: Vec<&'static str>,
}

impl Linter {
    pub fn new(config: CheckConfig) -> Linter {
        Linter {
            config,
            warnings: Vec::new(),
            called: Vec::new(),
        }
    }

    /// Records a finding of `rule` at `span` unless the configuration turns the rule off.
    pub fn run(&mut self, rule: &'static Rule, message: String, span: Span) {
        if !self.config.enabled(rule) {
            return;
        }
        if !self.called.contains(&rule.name) {
            self.called.push(rule.name);
        }
        self.warnings.push(Warning {
            rule: rule.name.to_string(),
            description: rule.description.to_string(),
            url: rule.url.to_string(),
            message,
            line: span.start_line,
            end_line: span.end_line.max(span.start_line),
        });
    }

    /// Records a notice (always shown, never an error).
    pub fn notice(&mut self, warning: Warning) {
        self.warnings.push(warning);
    }

    /// The warnings so far.
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    pub fn take_warnings(&mut self) -> Vec<Warning> {
        std::mem::take(&mut self.warnings)
    }

    /// With `error=true` and some rule fired: the rules, sorted (BuildKit lists them in map
    /// order, which is random; sorted is one of those orders and stable).
    pub fn violations(&self) -> Option<Vec<String>> {
        if !self.config.error || self.called.is_empty() {
            return None;
        }
        let mut rules: Vec<String> = self.called.iter().map(|r| r.to_string()).collect();
        rules.sort();
        Some(rules)
    }
}

/// The keyword of an instruction as written (`Run`), from its joined text.
pub fn keyword_as_written(original: &str) -> &str {
    trim_space(original).split(is_sep).next().unwrap_or_default()
}

/// Whether `s` is all lower case or all upper case.
fn self_consistent(s: &str) -> bool {
    s == s.to_lowercase() || s == s.to_uppercase()
}

/// The description comments of an instruction: the block of comment lines directly above its
/// first line (no blank line between), each without its `#` and surrounding blanks. An empty
/// `#` line ends the block, as does a line of the previous instruction (`after` is its last
/// line).
pub fn prev_comments(lines: &[&str], start_line: u32, after: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut n = start_line.saturating_sub(1);
    while n > after {
        let Some(line) = lines.get(n as usize - 1) else {
            break;
        };
        let t = line.trim_start_matches(|c: char| c.is_whitespace());
        let Some(body) = t.strip_prefix('#') else { break };
        let body = body.trim();
        if body.is_empty() {
            break;
        }
        out.push(body.to_string());
        n -= 1;
    }
    out.reverse();
    out
}

/// BuildKit's `getComment`: the text after `name ` in the first description line that starts
/// with it.
pub fn description_for(comments: &[String], name: &str) -> String {
    if name.is_empty() {
        return String::new();
    }
    let prefix = format!("{name} ");
    comments
        .iter()
        .find_map(|c| c.strip_prefix(&prefix).map(str::to_string))
        .unwrap_or_default()
}

/// The checks on the parsed file that BuildKit runs before any stage is planned.
pub fn check_parsed(df: &Dockerfile, source: &str, lint: &mut Linter) {
    let lines: Vec<&str> = source.lines().collect();
    for w in &df.warnings {
        let span = Span {
            start_line: w.line,
            end_line: w.line,
        };
        lint.run(&NO_EMPTY_CONTINUATION, "Empty continuation line".into(), span);
    }
    let mut prev_end = 0;
    let mut stage_names: Vec<(String, Span)> = Vec::new();
    // (keyword as written, span) of FROM lines and of the instructions inside stages.
    let mut commands: Vec<(String, Span)> = Vec::new();
    let mut in_stage = false;
    for node in &df.nodes {
        let written = keyword_as_written(&node.original).to_string();
        let comments = prev_comments(&lines, node.span.start_line, prev_end);
        prev_end = node.span.end_line;
        match node.keyword.as_str() {
            "maintainer" => lint.run(
                &MAINTAINER_DEPRECATED,
                "Maintainer instruction is deprecated in favor of using label".into(),
                node.span,
            ),
            "from" => {
                in_stage = true;
                from_checks(node, &written, &comments, lint);
                if let [_, as_word, name] = node.args.as_slice() {
                    if as_word.eq_ignore_ascii_case("as") {
                        stage_names.push((name.to_lowercase(), node.span));
                    }
                }
            }
            "arg" => {
                let keys: Vec<String> = node
                    .args
                    .iter()
                    .map(|a| a.split_once('=').map_or(a.as_str(), |(k, _)| k).to_string())
                    .collect();
                definition_description("ARG", &keys, &comments, node.span, lint);
            }
            _ => {}
        }
        if in_stage {
            commands.push((written, node.span));
        }
    }
    let mut seen = BTreeSet::new();
    for (name, span) in &stage_names {
        if name == "context" || name == "scratch" {
            lint.run(
                &RESERVED_STAGE_NAME,
                format!(
                    "Stage name should not use the same name as reserved stage {}",
                    quote(name)
                ),
                *span,
            );
        }
        if !seen.insert(name.clone()) {
            lint.run(
                &DUPLICATE_STAGE_NAME,
                format!(
                    "Duplicate stage name {}, stage names should be unique",
                    quote(name)
                ),
                *span,
            );
        }
    }
    let (mut lower, mut upper) = (0usize, 0usize);
    for (kw, _) in &commands {
        if self_consistent(kw) {
            if *kw == kw.to_lowercase() {
                lower += 1;
            } else {
                upper += 1;
            }
        }
    }
    let majority_lower = lower > upper;
    for (kw, span) in &commands {
        let casing = if majority_lower && *kw != kw.to_lowercase() {
            "lowercase"
        } else if !majority_lower && *kw != kw.to_uppercase() {
            "uppercase"
        } else {
            continue;
        };
        lint.run(
            &CONSISTENT_INSTRUCTION_CASING,
            format!("Command '{kw}' should match the case of the command majority ({casing})"),
            *span,
        );
    }
}

fn from_checks(node: &Node, written: &str, comments: &[String], lint: &mut Linter) {
    let [_, as_word, name] = node.args.as_slice() else {
        return;
    };
    if *name != name.to_lowercase() {
        lint.run(
            &STAGE_NAME_CASING,
            format!("Stage name '{name}' should be lowercase"),
            node.span,
        );
    }
    // Mixed-case FROM is ConsistentInstructionCasing's business, not this rule's.
    let from_lower = written == written.to_lowercase();
    let from_upper = written == written.to_uppercase();
    let mismatch = (from_lower && *as_word != as_word.to_lowercase())
        || (!from_lower && from_upper && *as_word != as_word.to_uppercase());
    if mismatch {
        lint.run(
            &FROM_AS_CASING,
            format!("'{as_word}' and '{written}' keywords' casing do not match"),
            node.span,
        );
    }
    if as_word.eq_ignore_ascii_case("as") {
        definition_description("FROM", &[name.to_lowercase()], comments, node.span, lint);
    }
}

/// InvalidDefinitionDescription: the last comment line above a FROM / ARG must start with the
/// stage or argument name.
fn definition_description(
    instruction: &str,
    keys: &[String],
    comments: &[String],
    span: Span,
    lint: &mut Linter,
) {
    let (Some(last), Some(first_key)) = (comments.last(), keys.first()) else {
        return;
    };
    let word = last.split(' ').next().unwrap_or_default();
    if keys.iter().any(|k| k == word) {
        return;
    }
    let example = if keys.len() > 1 {
        "<arg_key>"
    } else {
        first_key.as_str()
    };
    lint.run(
        &INVALID_DEFINITION_DESCRIPTION,
        format!("Comment for {instruction} should follow the format: `# {example} <description>`"),
        span,
    );
}

/// SecretsUsedInArgOrEnv: a key with a secret-looking word (`key`, `token`, `password`, ... as
/// a whole `_`-separated part at either end) and none of the allowed ones (`public`, `file`,
/// `version`).
pub fn looks_secret(key: &str) -> bool {
    const DENY: [&str; 10] = [
        "apikey",
        "auth",
        "credential",
        "credentials",
        "key",
        "password",
        "pword",
        "passwd",
        "secret",
        "token",
    ];
    const ALLOW: [&str; 3] = ["public", "file", "version"];
    let parts: Vec<String> = key.split('_').map(str::to_lowercase).collect();
    // BuildKit's `(?:_|^)(?:word)(?:_|$)`: the word is a whole `_`-separated part anywhere.
    let has = |words: &[&str]| parts.iter().any(|p| words.contains(&p.as_str()));
    has(&DENY) && !has(&ALLOW)
}

/// BuildKit's `suggest.Search`: the closest option within edit distance 2 (none when one
/// matches exactly).
pub fn suggest(word: &str, options: &[String]) -> Option<String> {
    let mut best: Option<(usize, &String)> = None;
    for o in options {
        if o == word {
            return None;
        }
        let d = levenshtein(word, o);
        if d < best.map_or(3, |(bd, _)| bd) {
            best = Some((d, o));
        }
    }
    best.map(|(_, o)| o.clone())
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Whether `ENV`/`LABEL` text (after the keyword) is in the legacy `key value` form: its first
/// word has no `=`.
pub fn is_legacy_key_value(original: &str, escape: char) -> bool {
    let t = trim_space(original);
    let rest = t.split_once(is_sep).map_or("", |(_, r)| r);
    crate::parser::parse_words(trim_space(rest), escape)
        .first()
        .is_some_and(|w| !w.contains('='))
}

/// Whether `s` is a valid image reference for `FROM` (Docker's normalized named reference
/// grammar: lowercase path components, optional domain, tag and digest).
pub fn valid_reference(s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    if let Some(d) = digest {
        let Some((alg, hex)) = d.split_once(':') else {
            return false;
        };
        let alg_ok = !alg.is_empty()
            && alg
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c));
        if !alg_ok || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return false;
        }
    }
    // A tag is after the last `:` that follows the last `/`.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        let mut cs = t.chars();
        let first_ok = cs.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !first_ok || t.len() > 128 || !cs.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
            return false;
        }
    }
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    let comps: Vec<&str> = name.split('/').collect();
    let (domain, path) = if comps.len() > 1
        && (comps[0].contains(['.', ':']) || comps[0] == "localhost" || comps[0] != comps[0].to_lowercase())
    {
        (Some(comps[0]), &comps[1..])
    } else {
        (None, &comps[..])
    };
    if let Some(d) = domain {
        let host = d.rsplit_once(':').map_or(d, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty() {
                h
            } else {
                d
            }
        });
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-[]:".contains(c))
        {
            return false;
        }
    }
    path.iter().all(|c| path_component(c))
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`
fn path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__` or any number of `-`.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// containerd's platform normalisation for the formats warnings show (`linux/arm64`,
/// `linux/arm/v7`).
pub fn normalize_platform(os: &str, arch: &str, variant: Option<&str>) -> String {
    let os = os.to_lowercase();
    let arch = arch.to_lowercase();
    let variant = variant.unwrap_or("").to_lowercase();
    let (arch, variant) = match arch.as_str() {
        "i386" => ("386".to_string(), String::new()),
        "x86_64" | "x86-64" | "amd64" => (
            "amd64".to_string(),
            if variant == "v1" { String::new() } else { variant },
        ),
        "aarch64" | "arm64" => (
            "arm64".to_string(),
            match variant.as_str() {
                "8" | "v8" | "v8.0" => String::new(),
                "9" | "9.0" | "v9.0" => "v9".to_string(),
                _ => variant,
            },
        ),
        "armhf" => ("arm".to_string(), "v7".to_string()),
        "armel" => ("arm".to_string(), "v6".to_string()),
        "arm" => (
            "arm".to_string(),
            match variant.as_str() {
                "" | "7" => "v7".to_string(),
                "5" | "6" | "8" => format!("v{variant}"),
                _ => variant,
            },
        ),
        _ => (arch, variant),
    };
    if variant.is_empty() {
        format!("{os}/{arch}")
    } else {
        format!("{os}/{arch}/{variant}")
    }
}

/// Whether `syntax` (a `# syntax=` value) names BuildKit's Dockerfile frontend, which kiln
/// implements itself: `docker/dockerfile` or `docker/dockerfile-upstream`, any tag or digest,
/// optionally with the `docker.io/` domain.
pub fn is_dockerfile_frontend(syntax: &str) -> bool {
    let name = syntax.split('@').next().unwrap_or_default();
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let repo = match name[last_slash..].find(':') {
        Some(i) => &name[..last_slash + i],
        None => name,
    };
    let repo = repo.strip_prefix("docker.io/").unwrap_or(repo);
    matches!(repo, "docker/dockerfile" | "docker/dockerfile-upstream")
}

/// BuildKit's source excerpt (`errdefs.Source.Print`): `FILE:LINE`, a rule of dashes, the lines
/// `start..=end` marked `>>>` with context around them (four lines for one line, two for more),
/// and the rule again.
pub fn source_excerpt(file: &str, source: &[u8], start: u32, end: u32) -> String {
    let text = String::from_utf8_lossy(source);
    let lines: Vec<&str> = text.split('\n').collect();
    let (start, mut end) = (start as usize, end.max(start) as usize);
    if start < 1 || start > lines.len() {
        return String::new();
    }
    end = end.min(lines.len());
    let pad = if end == start { 4 } else { 2 };
    let (mut first, mut last, mut p) = (start, end, 0);
    while p < pad {
        if first > 1 {
            first -= 1;
            p += 1;
        }
        if last != lines.len() {
            last += 1;
            p += 1;
        }
        p += 1;
    }
    let mut out = format!("{file}:{start}\n--------------------\n");
    for (i, line) in lines.iter().enumerate().take(last).skip(first - 1) {
        let n = i + 1;
        let mark = if (start..=end).contains(&n) { ">>>" } else { "   " };
        out.push_str(&format!(" {n:>3} | {mark} {line}\n"));
    }
    out.push_str("--------------------\n");
    out
}

/// A warning as `--check` prints it (BuildKit's `lint.Warning.PrintTo`): a blank line,
/// `WARNING: Rule - URL`, the message, and the source excerpt.
pub fn check_text(w: &Warning, file: &str, source: &[u8]) -> String {
    let mut out = format!("\nWARNING: {}", w.rule);
    if !w.url.is_empty() {
        out.push_str(&format!(" - {}", w.url));
    }
    out.push_str(&format!("\n{}\n", w.message));
    if w.line > 0 {
        out.push_str(&source_excerpt(file, source, w.line, w.end_line));
    }
    out
}

/// A warning as a build with `--debug` prints it under the summary (buildx's expanded form):
/// the short form, the rule's description, `More info: URL`, the source excerpt.
pub fn expanded_text(w: &Warning, file: &str, source: &[u8]) -> String {
    let mut out = w.to_string();
    if !w.description.is_empty() {
        out.push_str(&format!("\n{}", w.description));
    }
    if !w.url.is_empty() {
        out.push_str(&format!("\nMore info: {}", w.url));
    }
    if w.line > 0 {
        out.push('\n');
        out.push_str(source_excerpt(file, source, w.line, w.end_line).trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_config() {
        assert_eq!(CheckConfig::parse(""), Ok(CheckConfig::default()));
        let c = CheckConfig::parse("skip=JSONArgsRecommended, StageNameCasing;error=true").unwrap();
        assert_eq!(c.skip, vec!["JSONArgsRecommended", "StageNameCasing"]);
        assert!(c.error && !c.enabled(&JSON_ARGS_RECOMMENDED) && c.enabled(&UNDEFINED_VAR));
        let c = CheckConfig::parse("skip=all;experimental=CopyIgnoredFile").unwrap();
        assert!(!c.enabled(&UNDEFINED_VAR) && c.enabled(&COPY_IGNORED_FILE));
        assert!(!c.enabled(&INVALID_DEFINITION_DESCRIPTION));
        assert!(CheckConfig::parse("experimental=all")
            .unwrap()
            .enabled(&INVALID_DEFINITION_DESCRIPTION));
        assert_eq!(
            CheckConfig::parse("skip").unwrap_err().to_string(),
            "invalid check option \"skip\""
        );
        assert_eq!(
            CheckConfig::parse("foo=bar").unwrap_err().to_string(),
            "invalid check option \"foo\""
        );
        assert_eq!(
            CheckConfig::parse("error=yes").unwrap_err().to_string(),
            "failed to parse check option \"error=yes\": strconv.ParseBool: parsing \"yes\": invalid syntax"
        );
    }

    #[test]
    fn secrets_and_suggestions() {
        for k in [
            "API_KEY",
            "password",
            "GITHUB_TOKEN",
            "secret_MESSAGE",
            "AUTH",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(looks_secret(k), "{k}");
        }
        for k in [
            "MONKEY",
            "KEYBOARD",
            "PUBLIC_KEY",
            "KEY_FILE",
            "TOKEN_VERSION",
            "tokens",
        ] {
            assert!(!looks_secret(k), "{k}");
        }
        let opts = vec!["PATH".to_string(), "HOME".to_string()];
        assert_eq!(suggest("PAHT", &opts), Some("PATH".into()));
        assert_eq!(suggest("PATH", &opts), None);
        assert_eq!(suggest("XYZZY", &opts), None);
    }

    #[test]
    fn references() {
        for r in [
            "alpine",
            "alpine:3.19",
            "docker.io/library/busybox:local",
            "localhost:5000/a/b",
            "scratch",
            "a@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(valid_reference(r), "{r}");
        }
        for r in ["", "Alpine", "alpine:", ":tag", "a//b", "a-", "a:b:c"] {
            assert!(!valid_reference(r), "{r}");
        }
    }

    #[test]
    fn platforms_and_frontends() {
        assert_eq!(normalize_platform("linux", "arm64", Some("v8")), "linux/arm64");
        assert_eq!(normalize_platform("linux", "arm", None), "linux/arm/v7");
        assert_eq!(normalize_platform("linux", "x86_64", None), "linux/amd64");
        assert!(is_dockerfile_frontend("docker/dockerfile:1"));
        assert!(is_dockerfile_frontend(
            "docker.io/docker/dockerfile-upstream:master@sha256:abc"
        ));
        assert!(is_dockerfile_frontend("docker/dockerfile"));
        assert!(!is_dockerfile_frontend("example.com/my/frontend:1"));
        assert!(!is_dockerfile_frontend("tonistiigi/dockerfile:runmount"));
    }

    #[test]
    fn excerpts_like_buildkit() {
        let src = b"# syntax=x\n\nFROM alpine\nCMD echo hi\n";
        assert_eq!(
            source_excerpt("Dockerfile", src, 4, 4),
            "Dockerfile:4\n--------------------\n   2 |     \n   3 |     FROM alpine\n   4 | >>> CMD echo hi\n   5 |     \n--------------------\n"
        );
        assert_eq!(
            source_excerpt("D", b"A\nB\nC\nD\nE\nF\nG", 3, 4),
            "D:3\n--------------------\n   2 |     B\n   3 | >>> C\n   4 | >>> D\n   5 |     E\n--------------------\n"
        );
        let w = Warning {
            rule: "JSONArgsRecommended".into(),
            description: JSON_ARGS_RECOMMENDED.description.into(),
            url: JSON_ARGS_RECOMMENDED.url.into(),
            message:
                "JSON arguments recommended for CMD to prevent unintended behavior related to OS signals"
                    .into(),
            line: 4,
            end_line: 4,
        };
        assert!(check_text(&w, "Dockerfile", src).starts_with(
            "\nWARNING: JSONArgsRecommended - https://docs.docker.com/go/dockerfile/rule/json-args-recommended/\nJSON arguments recommended for CMD"
        ));
        assert_eq!(
            w.to_string(),
            "JSONArgsRecommended: JSON arguments recommended for CMD to prevent unintended behavior related to OS signals (line 4)"
        );
    }

    #[test]
    fn comments_above() {
        let lines = ["RUN a", "# x", "#", "# base the base", "# more", "FROM a AS base"];
        assert_eq!(prev_comments(&lines, 6, 1), vec!["base the base", "more"]);
        assert_eq!(
            prev_comments(&["FROM a", "", "# c", "", "ARG B"], 5, 1),
            Vec::<String>::new()
        );
        assert_eq!(description_for(&["base the base".into()], "base"), "the base");
    }
}
