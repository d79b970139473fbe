//! Typed instructions: what each Dockerfile instruction means, with its flags parsed and
//! checked, before any variable is expanded. Built from the parser's [`crate::parser::Node`]s by
//! [`parse_instruction`]. Words that undergo expansion stay as written here; lowering expands
//! them in the right environment.

use std::borrow::Cow;

use thiserror::Error;

use crate::parser::gotext::{is_sep, to_lower, to_upper, trim_space};
use crate::parser::{parse_heredoc_word, Dockerfile, Heredoc, LexError, Node, Span};

/// An argument list in shell form (`RUN make all`) or exec form (`RUN ["make", "all"]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandLine {
    Shell(String),
    Exec(Vec<String>),
}

/// A `--mount` value, split into its `key=value` options (values unexpanded, in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub options: Vec<(String, Option<String>)>,
}

/// `HEALTHCHECK`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Healthcheck {
    None,
    Cmd {
        cmd: CommandLine,
        interval: Option<String>,
        timeout: Option<String>,
        start_period: Option<String>,
        start_interval: Option<String>,
        retries: Option<String>,
    },
}

/// `KEY=VALUE` (or legacy `KEY VALUE`) pairs of ENV and LABEL, unexpanded.
pub type Pairs = Vec<(String, String)>;

/// `COPY`/`ADD` sources and destination plus flags. Sources and destination unexpanded.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CopySpec {
    pub sources: Vec<String>,
    pub dest: String,
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    pub parents: bool,
    pub exclude: Vec<String>,
    /// ADD only.
    pub checksum: Option<String>,
    /// ADD only.
    pub keep_git_dir: Option<bool>,
    /// ADD only: `--unpack` (explicit archive extraction choice).
    pub unpack: Option<bool>,
    /// Heredoc sources (`COPY <<EOF /dst`), in order.
    pub heredocs: Vec<Heredoc>,
}

/// One instruction, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Instruction {
    From {
        image: String,
        name: Option<String>,
        platform: Option<String>,
    },
    Run {
        cmd: CommandLine,
        mounts: Vec<MountSpec>,
        network: Option<String>,
        security: Option<String>,
        heredocs: Vec<Heredoc>,
    },
    Cmd(CommandLine),
    Entrypoint(CommandLine),
    Label(Pairs),
    Maintainer(String),
    Expose(Vec<String>),
    Env(Pairs),
    Add(CopySpec),
    Copy(CopySpec),
    Volume(Vec<String>),
    User(String),
    Workdir(String),
    /// `ARG name[=default]`, several per instruction allowed.
    Arg(Vec<(String, Option<String>)>),
    /// The trigger instruction's original text (`RUN echo hi`), as stored in the image config.
    Onbuild(String),
    Stopsignal(String),
    Healthcheck(Healthcheck),
    Shell(Vec<String>),
}

/// An instruction and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    pub instruction: Instruction,
    pub span: Span,
    /// The instruction as written, continuation lines joined (for history `created_by`).
    pub original: String,
}

/// The instruction names BuildKit knows, for "did you mean" suggestions.
const INSTRUCTIONS: [&str; 18] = [
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// Why a node is not a valid instruction. Every variant carries the instruction's first line.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum InstructionError {
    /// The keyword is not an instruction.
    #[error("line {line}: unknown instruction: {keyword}{}", suggestion.as_ref().map(|s| format!(" (did you mean {s}?)")).unwrap_or_default())]
    UnknownInstruction {
        /// Line of the instruction.
        line: u32,
        /// The keyword as written.
        keyword: String,
        /// A known instruction at edit distance 1 or 2.
        suggestion: Option<String>,
    },
    /// A flag the instruction does not accept.
    #[error("line {line}: unknown flag: --{flag}")]
    UnknownFlag {
        /// Line of the instruction.
        line: u32,
        /// The flag name.
        flag: String,
    },
    /// A non-repeatable flag given twice.
    #[error("line {line}: duplicate flag specified: --{flag}")]
    DuplicateFlag {
        /// Line of the instruction.
        line: u32,
        /// The flag name.
        flag: String,
    },
    /// `--flag` without `=value` where a value is needed, or `--bool=`.
    #[error("line {line}: missing a value on flag: --{flag}")]
    MissingFlagValue {
        /// Line of the instruction.
        line: u32,
        /// The flag name.
        flag: String,
    },
    /// A boolean flag with a value other than true/false.
    #[error("line {line}: expecting boolean value for flag --{flag}, not: {value}")]
    InvalidBool {
        /// Line of the instruction.
        line: u32,
        /// The flag name.
        flag: String,
        /// The rejected value.
        value: String,
    },
    /// A flag word not starting with `--` (only possible in hand-built nodes).
    #[error("line {line}: arg should start with -- : {flag}")]
    NotAFlag {
        /// Line of the instruction.
        line: u32,
        /// The word.
        flag: String,
    },
    /// Wrong number of arguments.
    #[error("line {line}: {instruction} requires {expected}")]
    ArgumentCount {
        /// Line of the instruction.
        line: u32,
        /// The instruction.
        instruction: &'static str,
        /// What it requires (`exactly one argument`).
        expected: &'static str,
    },
    /// `FROM image AS name` with an invalid name.
    #[error("line {line}: invalid name for build stage: {name:?}, name can't start with a number or contain symbols")]
    InvalidStageName {
        /// Line of the instruction.
        line: u32,
        /// The name as written.
        name: String,
    },
    /// `ONBUILD ONBUILD ...`.
    #[error("line {line}: chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")]
    OnbuildChain {
        /// Line of the instruction.
        line: u32,
    },
    /// `ONBUILD FROM` / `ONBUILD MAINTAINER`.
    #[error("line {line}: {trigger} isn't allowed as an ONBUILD trigger")]
    OnbuildTrigger {
        /// Line of the instruction.
        line: u32,
        /// The trigger keyword, uppercased.
        trigger: String,
    },
    /// `HEALTHCHECK NONE something`.
    #[error("line {line}: HEALTHCHECK NONE takes no arguments")]
    HealthcheckNoneArguments {
        /// Line of the instruction.
        line: u32,
    },
    /// `HEALTHCHECK CMD` with nothing after it.
    #[error("line {line}: missing command after HEALTHCHECK CMD")]
    HealthcheckNoCommand {
        /// Line of the instruction.
        line: u32,
    },
    /// `HEALTHCHECK FOO ...`.
    #[error("line {line}: unknown type {kind:?} in HEALTHCHECK (try CMD)")]
    HealthcheckType {
        /// Line of the instruction.
        line: u32,
        /// The type word, uppercased.
        kind: String,
    },
    /// A HEALTHCHECK duration flag that is not a Go duration.
    #[error("line {line}: invalid duration {value:?} for --{flag}")]
    InvalidDuration {
        /// Line of the instruction.
        line: u32,
        /// The flag name.
        flag: &'static str,
        /// The rejected value.
        value: String,
    },
    /// A HEALTHCHECK duration below BuildKit's 1ms minimum (other than 0).
    #[error("line {line}: interval {flag:?} cannot be less than 1ms")]
    DurationTooShort {
        /// Line of the instruction.
        line: u32,
        /// The flag name.
        flag: &'static str,
    },
    /// `--retries` that is not a non-negative 32-bit integer.
    #[error("line {line}: invalid --retries value {value:?}")]
    InvalidRetries {
        /// Line of the instruction.
        line: u32,
        /// The rejected value.
        value: String,
    },
    /// `COPY src <<EOF`.
    #[error("line {line}: {instruction} cannot accept a heredoc as a destination")]
    HeredocDestination {
        /// Line of the instruction.
        line: u32,
        /// COPY or ADD.
        instruction: &'static str,
    },
    /// A heredoc source word that does not lex.
    #[error("line {line}: invalid heredoc source {word:?}")]
    HeredocWord {
        /// Line of the instruction.
        line: u32,
        /// The word.
        word: String,
        /// Why it does not lex.
        #[source]
        source: LexError,
    },
    /// `ENV =x`, `ARG =x`.
    #[error("line {line}: {instruction} names can not be blank")]
    BlankName {
        /// Line of the instruction.
        line: u32,
        /// The instruction.
        instruction: &'static str,
    },
    /// ENV/LABEL arguments that are not key/value/separator triples (hand-built nodes).
    #[error("line {line}: bad input to {instruction}, too many arguments")]
    TooManyArguments {
        /// Line of the instruction.
        line: u32,
        /// The instruction.
        instruction: &'static str,
    },
    /// `VOLUME ["", "/a"]`.
    #[error("line {line}: VOLUME specified can not be an empty string")]
    EmptyVolume {
        /// Line of the instruction.
        line: u32,
    },
    /// `SHELL sh -c` (SHELL needs exec form).
    #[error("line {line}: SHELL requires the arguments to be in JSON form")]
    ShellNotJson {
        /// Line of the instruction.
        line: u32,
    },
    /// A `--mount` value that is not valid CSV.
    #[error("line {line}: invalid --mount value {value:?}: {reason}")]
    InvalidMount {
        /// Line of the instruction.
        line: u32,
        /// The value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    Bool,
    Str,
    Strs,
}

/// The flags given to one instruction, checked against what it accepts.
struct Flags {
    values: Vec<(&'static str, Vec<String>)>,
}

impl Flags {
    fn parse(node: &Node, accepted: &[(&'static str, FlagKind)]) -> Result<Flags, InstructionError> {
        let line = node.span.start_line;
        let mut values: Vec<(&'static str, Vec<String>)> = Vec::new();
        for raw in &node.flags {
            let Some(body) = raw.strip_prefix("--") else {
                return Err(InstructionError::NotAFlag {
                    line,
                    flag: raw.clone(),
                });
            };
            if body.is_empty() {
                break;
            }
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let flag = || name.to_string();
            let Some(&(key, kind)) = accepted.iter().find(|(n, _)| *n == name) else {
                return Err(InstructionError::UnknownFlag { line, flag: flag() });
            };
            let seen = values.iter().position(|(n, _)| *n == key);
            if seen.is_some() && kind != FlagKind::Strs {
                return Err(InstructionError::DuplicateFlag { line, flag: flag() });
            }
            let value = match (kind, value) {
                (FlagKind::Bool, None) => "true".to_string(),
                (FlagKind::Bool, Some("")) | (_, None) => {
                    return Err(InstructionError::MissingFlagValue { line, flag: flag() })
                }
                (FlagKind::Bool, Some(v)) => match v.to_ascii_lowercase().as_str() {
                    b @ ("true" | "false") => b.to_string(),
                    _ => {
                        let value = v.to_string();
                        return Err(InstructionError::InvalidBool {
                            line,
                            flag: flag(),
                            value,
                        });
                    }
                },
                (_, Some(v)) => v.to_string(),
            };
            match seen {
                Some(i) => values[i].1.push(value),
                None => values.push((key, vec![value])),
            }
        }
        Ok(Flags { values })
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    fn string(&self, name: &str) -> Option<String> {
        self.all(name).pop()
    }

    fn boolean(&self, name: &str) -> Option<bool> {
        self.string(name).map(|v| v == "true")
    }
}

/// BuildKit's `nodeArgs`: the arguments, or for ONBUILD the trigger's keyword and arguments
/// (borrowed from the node except in that case).
fn node_args(node: &Node) -> Cow<'_, [String]> {
    match &node.next {
        Some(child) => Cow::Owned(
            std::iter::once(child.keyword.clone())
                .chain(node_args(child).iter().cloned())
                .collect(),
        ),
        None => Cow::Borrowed(&node.args),
    }
}

fn command_line(args: &[String], json: bool) -> CommandLine {
    if json {
        CommandLine::Exec(args.to_vec())
    } else {
        CommandLine::Shell(args.join(" "))
    }
}

fn count_error(line: u32, instruction: &'static str, expected: &'static str) -> InstructionError {
    InstructionError::ArgumentCount {
        line,
        instruction,
        expected,
    }
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// BuildKit's suggestion rule: the closest instruction at distance below 3, in the case the
/// user wrote (all lower, all upper, or upper).
fn suggest(keyword: &str) -> Option<String> {
    let lower = to_lower(keyword);
    if lower.is_empty() || lower.chars().count() > 64 {
        return None;
    }
    let mut best: Option<(&str, usize)> = None;
    for name in INSTRUCTIONS {
        let d = edit_distance(&lower, &to_lower(name));
        if d < best.map_or(3, |(_, b)| b) {
            best = Some((name, d));
        }
    }
    let (name, _) = best?;
    Some(if keyword == lower {
        to_lower(name)
    } else {
        name.to_string()
    })
}

/// Splits a `--mount` value into `key[=value]` options: CSV fields (double quotes allowed, `""`
/// for a quote), each cut at its first `=`, keys lowercased.
fn parse_mount(value: &str, line: u32) -> Result<MountSpec, InstructionError> {
    let err = |reason| InstructionError::InvalidMount {
        line,
        value: value.to_string(),
        reason,
    };
    if value.is_empty() {
        return Err(err("empty value"));
    }
    let mut fields = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(err("extraneous or missing \" in quoted-field")),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    break;
                }
                Some(',') => fields.push(field),
                Some(_) => return Err(err("extraneous or missing \" in quoted-field")),
            }
        } else {
            let mut ended = true;
            for c in chars.by_ref() {
                match c {
                    ',' => {
                        ended = false;
                        break;
                    }
                    '"' => return Err(err("bare \" in non-quoted-field")),
                    c => field.push(c),
                }
            }
            fields.push(field);
            if ended {
                break;
            }
        }
    }
    let options = fields
        .into_iter()
        .map(|f| match f.split_once('=') {
            Some((k, v)) => (to_lower(k), Some(v.to_string())),
            None => (to_lower(&f), None),
        })
        .collect();
    Ok(MountSpec { options })
}

/// Go's `time.ParseDuration`, in nanoseconds.
fn go_duration(text: &str) -> Option<i128> {
    let (neg, mut s) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if s == "0" {
        return Some(0);
    }
    if s.is_empty() {
        return None;
    }
    let mut total: i128 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let int_part = &s[..int_len];
        s = &s[int_len..];
        let mut frac = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac = &rest[..frac_len];
            s = &rest[frac_len..];
        }
        if int_part.is_empty() && frac.is_empty() {
            return None;
        }
        let unit_len = s
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        let unit: i128 = match &s[..unit_len] {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        s = &s[unit_len..];
        // Go rejects anything above 2^63 ns anyway; this keeps the arithmetic far from overflow.
        if int_part.len() > 20 {
            return None;
        }
        let whole: i128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().ok()?
        };
        let mut value = whole.checked_mul(unit)?;
        if !frac.is_empty() {
            let digits = &frac[..frac.len().min(20)];
            let scale = 10_i128.pow(u32::try_from(digits.len()).ok()?);
            value = value.checked_add(digits.parse::<i128>().ok()? * unit / scale)?;
        }
        total = total.checked_add(value)?;
        if total > i128::from(i64::MAX) {
            return None;
        }
    }
    Some(if neg { -total } else { total })
}

fn check_interval(value: Option<&String>, flag: &'static str, line: u32) -> Result<(), InstructionError> {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return Ok(());
    };
    match go_duration(v) {
        None => Err(InstructionError::InvalidDuration {
            line,
            flag,
            value: v.clone(),
        }),
        Some(0) => Ok(()),
        Some(d) if d < 1_000_000 => Err(InstructionError::DurationTooShort { line, flag }),
        Some(_) => Ok(()),
    }
}

fn key_value_pairs(node: &Node, instruction: &'static str) -> Result<Pairs, InstructionError> {
    let line = node.span.start_line;
    if node.args.is_empty() {
        return Err(count_error(line, instruction, "at least one argument"));
    }
    if !node.args.len().is_multiple_of(3) {
        return Err(InstructionError::TooManyArguments { line, instruction });
    }
    node.args
        .chunks(3)
        .map(|kv| {
            if kv[0].is_empty() {
                Err(InstructionError::BlankName { line, instruction })
            } else {
                Ok((kv[0].clone(), kv[1].clone()))
            }
        })
        .collect()
}

fn copy_spec(node: &Node, instruction: &'static str, flags: &Flags) -> Result<CopySpec, InstructionError> {
    let line = node.span.start_line;
    let heredoc_word = |word: &str| {
        parse_heredoc_word(word).map_err(|source| InstructionError::HeredocWord {
            line,
            word: word.to_string(),
            source,
        })
    };
    let Some((dest, sources)) = node.args.split_last() else {
        return Err(count_error(line, instruction, "at least two arguments"));
    };
    if heredoc_word(dest)?.is_some() {
        return Err(InstructionError::HeredocDestination { line, instruction });
    }
    let mut spec = CopySpec {
        dest: dest.clone(),
        ..CopySpec::default()
    };
    for src in sources {
        match heredoc_word(src)? {
            Some(mut doc) => {
                if let Some(body) = node.heredocs.iter().find(|h| h.name == doc.name) {
                    doc.content = body.content.clone();
                }
                spec.heredocs.push(doc);
            }
            None => spec.sources.push(src.clone()),
        }
    }
    spec.chown = flags.string("chown");
    spec.chmod = flags.string("chmod");
    spec.link = flags.boolean("link").unwrap_or(false);
    spec.exclude = flags.all("exclude");
    Ok(spec)
}

/// One instruction's node and arguments while it is typed.
struct Input<'n> {
    node: &'n Node,
    args: &'n [String],
    line: u32,
}

impl Input<'_> {
    /// The instruction takes no flags.
    fn no_flags(&self) -> Result<(), InstructionError> {
        Flags::parse(self.node, &[]).map(drop)
    }

    fn exactly_one(&self, instruction: &'static str) -> Result<String, InstructionError> {
        match self.args {
            [one] => Ok(one.clone()),
            _ => Err(count_error(self.line, instruction, "exactly one argument")),
        }
    }

    fn at_least_one(&self, instruction: &'static str) -> Result<(), InstructionError> {
        if self.args.is_empty() {
            Err(count_error(self.line, instruction, "at least one argument"))
        } else {
            Ok(())
        }
    }
}

type Typer = fn(&Input) -> Result<Instruction, InstructionError>;

/// The typer of each instruction keyword (lowercase), as BuildKit's `instructions.Parse`
/// dispatches on the node's value.
const TYPERS: &[(&str, Typer)] = &[
    ("from", parse_from),
    ("run", parse_run),
    ("cmd", |i| parse_command(i, Instruction::Cmd)),
    ("entrypoint", |i| parse_command(i, Instruction::Entrypoint)),
    ("shell", parse_shell),
    ("label", |i| parse_pairs(i, "LABEL", Instruction::Label)),
    ("env", |i| parse_pairs(i, "ENV", Instruction::Env)),
    ("maintainer", |i| {
        parse_single(i, "MAINTAINER", Instruction::Maintainer)
    }),
    ("user", |i| parse_single(i, "USER", Instruction::User)),
    ("workdir", |i| parse_single(i, "WORKDIR", Instruction::Workdir)),
    ("stopsignal", |i| {
        parse_single(i, "STOPSIGNAL", Instruction::Stopsignal)
    }),
    ("expose", parse_expose),
    ("volume", parse_volume),
    ("arg", parse_arg),
    ("onbuild", parse_onbuild),
    ("healthcheck", parse_healthcheck),
    ("copy", parse_copy),
    ("add", parse_add),
];

/// Turns one parsed node into a typed instruction, checking its flags and arguments the way
/// BuildKit does. Words stay unexpanded.
pub fn parse_instruction(node: &Node) -> Result<Located, InstructionError> {
    let args_cow = node_args(node);
    let input = Input {
        node,
        args: &args_cow,
        line: node.span.start_line,
    };
    let Some((_, typer)) = TYPERS.iter().find(|(k, _)| *k == node.keyword) else {
        let written = trim_space(&node.original)
            .split(is_sep)
            .next()
            .unwrap_or_default()
            .to_string();
        let suggestion = suggest(&written);
        return Err(InstructionError::UnknownInstruction {
            line: input.line,
            keyword: written,
            suggestion,
        });
    };
    Ok(Located {
        instruction: typer(&input)?,
        span: node.span,
        original: node.original.clone(),
    })
}

fn parse_from(i: &Input) -> Result<Instruction, InstructionError> {
    let name = match i.args {
        [_, as_word, name] if as_word.eq_ignore_ascii_case("as") => {
            let lower = to_lower(name);
            let mut chars = lower.chars();
            let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
            if !valid {
                return Err(InstructionError::InvalidStageName {
                    line: i.line,
                    name: name.clone(),
                });
            }
            Some(lower)
        }
        [_] => None,
        _ => return Err(count_error(i.line, "FROM", "either one or three arguments")),
    };
    let flags = Flags::parse(i.node, &[("platform", FlagKind::Str)])?;
    Ok(Instruction::From {
        image: i.args[0].clone(),
        name,
        platform: flags.string("platform"),
    })
}

fn parse_run(i: &Input) -> Result<Instruction, InstructionError> {
    use FlagKind::{Str, Strs};
    let flags = Flags::parse(i.node, &[("mount", Strs), ("network", Str), ("security", Str)])?;
    let mounts = flags
        .all("mount")
        .iter()
        .map(|m| parse_mount(m, i.line))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Instruction::Run {
        cmd: command_line(i.args, i.node.json),
        mounts,
        network: flags.string("network"),
        security: flags.string("security"),
        heredocs: i.node.heredocs.clone(),
    })
}

/// CMD and ENTRYPOINT.
fn parse_command(i: &Input, make: fn(CommandLine) -> Instruction) -> Result<Instruction, InstructionError> {
    i.no_flags()?;
    Ok(make(command_line(i.args, i.node.json)))
}

fn parse_shell(i: &Input) -> Result<Instruction, InstructionError> {
    i.no_flags()?;
    if i.args.is_empty() {
        return Err(count_error(i.line, "SHELL", "at least one argument"));
    }
    if !i.node.json {
        return Err(InstructionError::ShellNotJson { line: i.line });
    }
    Ok(Instruction::Shell(i.args.to_vec()))
}

/// LABEL and ENV.
fn parse_pairs(
    i: &Input,
    instruction: &'static str,
    make: fn(Pairs) -> Instruction,
) -> Result<Instruction, InstructionError> {
    i.no_flags()?;
    Ok(make(key_value_pairs(i.node, instruction)?))
}

/// MAINTAINER, USER, WORKDIR and STOPSIGNAL: one argument, no flags.
fn parse_single(
    i: &Input,
    instruction: &'static str,
    make: fn(String) -> Instruction,
) -> Result<Instruction, InstructionError> {
    let value = i.exactly_one(instruction)?;
    i.no_flags()?;
    Ok(make(value))
}

fn parse_expose(i: &Input) -> Result<Instruction, InstructionError> {
    i.at_least_one("EXPOSE")?;
    i.no_flags()?;
    let mut ports = i.args.to_vec();
    ports.sort();
    Ok(Instruction::Expose(ports))
}

fn parse_volume(i: &Input) -> Result<Instruction, InstructionError> {
    i.at_least_one("VOLUME")?;
    i.no_flags()?;
    let mut volumes = Vec::with_capacity(i.args.len());
    for v in i.args {
        let v = trim_space(v);
        if v.is_empty() {
            return Err(InstructionError::EmptyVolume { line: i.line });
        }
        volumes.push(v.to_string());
    }
    Ok(Instruction::Volume(volumes))
}

fn parse_arg(i: &Input) -> Result<Instruction, InstructionError> {
    i.at_least_one("ARG")?;
    i.no_flags()?;
    let mut pairs = Vec::with_capacity(i.args.len());
    for a in i.args {
        match a.split_once('=') {
            Some(("", _)) => {
                return Err(InstructionError::BlankName {
                    line: i.line,
                    instruction: "ARG",
                })
            }
            Some((k, v)) => pairs.push((k.to_string(), Some(v.to_string()))),
            None => pairs.push((a.clone(), None)),
        }
    }
    Ok(Instruction::Arg(pairs))
}

fn parse_onbuild(i: &Input) -> Result<Instruction, InstructionError> {
    i.at_least_one("ONBUILD")?;
    i.no_flags()?;
    let line = i.line;
    let trigger = to_upper(trim_space(&i.args[0]));
    match trigger.as_str() {
        "ONBUILD" => return Err(InstructionError::OnbuildChain { line }),
        "MAINTAINER" | "FROM" => return Err(InstructionError::OnbuildTrigger { line, trigger }),
        _ => {}
    }
    let node = i.node;
    let is_re_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\u{c}' | '\r');
    let trimmed = node.original.trim_start_matches(is_re_space);
    let mut expression = match trimmed.get(..7) {
        Some(word) if word.eq_ignore_ascii_case("onbuild") => {
            trimmed[7..].trim_start_matches(is_re_space).to_string()
        }
        _ => node.original.clone(),
    };
    for h in &node.heredocs {
        expression.push('\n');
        expression.push_str(&h.content);
        expression.push_str(&h.name);
    }
    Ok(Instruction::Onbuild(expression))
}

fn parse_healthcheck(i: &Input) -> Result<Instruction, InstructionError> {
    use FlagKind::Str;
    i.at_least_one("HEALTHCHECK")?;
    let line = i.line;
    let kind = to_upper(&i.args[0]);
    if kind == "NONE" {
        // Like BuildKit, flags are not looked at for NONE.
        if i.args.len() != 1 {
            return Err(InstructionError::HealthcheckNoneArguments { line });
        }
        return Ok(Instruction::Healthcheck(Healthcheck::None));
    }
    let flags = Flags::parse(
        i.node,
        &[
            ("interval", Str),
            ("timeout", Str),
            ("start-period", Str),
            ("start-interval", Str),
            ("retries", Str),
        ],
    )?;
    if kind != "CMD" {
        return Err(InstructionError::HealthcheckType { line, kind });
    }
    if i.args.len() < 2 {
        return Err(InstructionError::HealthcheckNoCommand { line });
    }
    let cmd = command_line(&i.args[1..], i.node.json);
    let interval = flags.string("interval");
    let timeout = flags.string("timeout");
    let start_period = flags.string("start-period");
    let start_interval = flags.string("start-interval");
    check_interval(interval.as_ref(), "interval", line)?;
    check_interval(timeout.as_ref(), "timeout", line)?;
    check_interval(start_period.as_ref(), "start-period", line)?;
    check_interval(start_interval.as_ref(), "start-interval", line)?;
    let retries = flags.string("retries");
    if let Some(r) = retries.as_ref().filter(|r| !r.is_empty()) {
        if !r.parse::<i32>().is_ok_and(|n| n >= 0) {
            return Err(InstructionError::InvalidRetries {
                line,
                value: r.clone(),
            });
        }
    }
    Ok(Instruction::Healthcheck(Healthcheck::Cmd {
        cmd,
        interval,
        timeout,
        start_period,
        start_interval,
        retries,
    }))
}

/// The flags and arguments COPY and ADD share; returns the flags for the caller's own.
fn parse_copy_common(
    i: &Input,
    name: &'static str,
    accepted: &[(&'static str, FlagKind)],
) -> Result<(CopySpec, Flags), InstructionError> {
    if i.args.len() < 2 {
        return Err(count_error(
            i.line,
            name,
            "at least two arguments, but only one was provided. destination could not be determined",
        ));
    }
    let flags = Flags::parse(i.node, accepted)?;
    let spec = copy_spec(i.node, name, &flags)?;
    Ok((spec, flags))
}

fn parse_copy(i: &Input) -> Result<Instruction, InstructionError> {
    use FlagKind::{Bool, Str, Strs};
    let accepted = [
        ("from", Str),
        ("chown", Str),
        ("chmod", Str),
        ("link", Bool),
        ("parents", Bool),
        ("exclude", Strs),
    ];
    let (mut spec, flags) = parse_copy_common(i, "COPY", &accepted)?;
    spec.from = flags.string("from");
    spec.parents = flags.boolean("parents").unwrap_or(false);
    Ok(Instruction::Copy(spec))
}

fn parse_add(i: &Input) -> Result<Instruction, InstructionError> {
    use FlagKind::{Bool, Str, Strs};
    let accepted = [
        ("chown", Str),
        ("chmod", Str),
        ("link", Bool),
        ("checksum", Str),
        ("keep-git-dir", Bool),
        ("exclude", Strs),
        ("unpack", Bool),
    ];
    let (mut spec, flags) = parse_copy_common(i, "ADD", &accepted)?;
    spec.checksum = flags.string("checksum");
    spec.keep_git_dir = flags.boolean("keep-git-dir");
    spec.unpack = flags.boolean("unpack");
    Ok(Instruction::Add(spec))
}

/// [`parse_instruction`] for every node, in order; stops at the first error.
pub fn parse_all(df: &Dockerfile) -> Result<Vec<Located>, InstructionError> {
    // Sized up front: `collect` over a fallible iterator cannot know the length and would grow
    // (and move) the vector of large `Located` values repeatedly.
    let mut out = Vec::with_capacity(df.nodes.len());
    for node in &df.nodes {
        out.push(parse_instruction(node)?);
    }
    Ok(out)
}

impl InstructionError {
    /// The line of the instruction the error is about.
    pub fn line(&self) -> u32 {
        use InstructionError as E;
        match self {
            E::UnknownInstruction { line, .. }
            | E::UnknownFlag { line, .. }
            | E::DuplicateFlag { line, .. }
            | E::MissingFlagValue { line, .. }
            | E::InvalidBool { line, .. }
            | E::NotAFlag { line, .. }
            | E::ArgumentCount { line, .. }
            | E::InvalidStageName { line, .. }
            | E::OnbuildChain { line }
            | E::OnbuildTrigger { line, .. }
            | E::HealthcheckNoneArguments { line }
            | E::HealthcheckNoCommand { line }
            | E::HealthcheckType { line, .. }
            | E::InvalidDuration { line, .. }
            | E::DurationTooShort { line, .. }
            | E::InvalidRetries { line, .. }
            | E::HeredocDestination { line, .. }
            | E::HeredocWord { line, .. }
            | E::BlankName { line, .. }
            | E::TooManyArguments { line, .. }
            | E::EmptyVolume { line }
            | E::ShellNotJson { line }
            | E::InvalidMount { line, .. } => *line,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::parse;

    fn one(src: &str) -> Result<Instruction, InstructionError> {
        let df = parse(src.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        parse_instruction(&df.nodes[0]).map(|l| l.instruction)
    }

    fn msg(src: &str) -> String {
        match one(src) {
            Ok(i) => panic!("expected an error, got {i:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn flags_are_checked() {
        assert_eq!(msg("\n\nCOPY --x=1 a b"), "line 3: unknown flag: --x");
        assert_eq!(msg("ENV --x a=b"), "line 1: unknown flag: --x");
        assert_eq!(
            msg("COPY --link=maybe a b"),
            "line 1: expecting boolean value for flag --link, not: maybe"
        );
        assert_eq!(msg("COPY --link= a b"), "line 1: missing a value on flag: --link");
        assert_eq!(msg("COPY --from a b"), "line 1: missing a value on flag: --from");
        assert_eq!(
            msg("COPY --from=a --from=b a b"),
            "line 1: duplicate flag specified: --from"
        );
        let Ok(Instruction::Copy(spec)) =
            one("COPY --link=FALSE --parents --exclude=*.md --exclude=x --from=s a b /d")
        else {
            panic!("not a copy")
        };
        assert!(!spec.link && spec.parents);
        assert_eq!(spec.exclude, vec!["*.md", "x"]);
        assert_eq!(
            (spec.sources, spec.dest, spec.from),
            (vec!["a".into(), "b".into()], "/d".into(), Some("s".into()))
        );
        let Ok(Instruction::Add(spec)) = one("ADD --keep-git-dir --unpack=false --checksum=sha256:x a b")
        else {
            panic!("not an add")
        };
        assert_eq!(
            (spec.keep_git_dir, spec.unpack, spec.checksum),
            (Some(true), Some(false), Some("sha256:x".into()))
        );
    }

    #[test]
    fn run_mounts() {
        let Ok(Instruction::Run {
            cmd, mounts, network, ..
        }) = one("RUN --mount=Type=cache,target=/x,'\"source=a,b\"',ro --network=none [\"a\", \"b\"]")
        else {
            panic!("not a run")
        };
        assert_eq!(cmd, CommandLine::Exec(vec!["a".into(), "b".into()]));
        assert_eq!(network.as_deref(), Some("none"));
        assert_eq!(
            mounts[0].options,
            vec![
                ("type".to_string(), Some("cache".to_string())),
                ("target".to_string(), Some("/x".to_string())),
                ("source".to_string(), Some("a,b".to_string())),
                ("ro".to_string(), None),
            ]
        );
        assert!(msg("RUN --mount=type='\"a\"' x").contains("bare \" in non-quoted-field"));
        assert!(msg("RUN --mount='\"a' x").contains("invalid --mount value"));
    }

    #[test]
    fn from_and_onbuild() {
        assert_eq!(
            one("FROM --platform=linux/arm64 img aS Build"),
            Ok(Instruction::From {
                image: "img".into(),
                name: Some("build".into()),
                platform: Some("linux/arm64".into())
            })
        );
        assert_eq!(
            msg("FROM a b"),
            "line 1: FROM requires either one or three arguments"
        );
        assert!(msg("FROM a AS 1x").contains("invalid name for build stage"));
        assert_eq!(
            msg("ONBUILD ONBUILD RUN x"),
            "line 1: chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"
        );
        assert_eq!(
            msg("ONBUILD from x"),
            "line 1: FROM isn't allowed as an ONBUILD trigger"
        );
        assert_eq!(msg("ONBUILD"), "line 1: ONBUILD requires at least one argument");
        assert_eq!(
            one("onbuild  RUN <<EOF\nhi\nEOF\n"),
            Ok(Instruction::Onbuild("RUN <<EOF\nhi\nEOF".into()))
        );
    }

    #[test]
    fn healthcheck() {
        assert_eq!(
            one("HEALTHCHECK none"),
            Ok(Instruction::Healthcheck(Healthcheck::None))
        );
        assert_eq!(
            msg("HEALTHCHECK NONE x"),
            "line 1: HEALTHCHECK NONE takes no arguments"
        );
        assert_eq!(
            msg("HEALTHCHECK CMD"),
            "line 1: missing command after HEALTHCHECK CMD"
        );
        assert!(msg("HEALTHCHECK CONNECT x").contains("unknown type \"CONNECT\""));
        assert_eq!(
            msg("HEALTHCHECK --interval=1us CMD x"),
            "line 1: interval \"interval\" cannot be less than 1ms"
        );
        assert!(msg("HEALTHCHECK --interval=5 CMD x").contains("invalid duration"));
        assert!(msg("HEALTHCHECK --retries=-1 CMD x").contains("invalid --retries"));
        let Ok(Instruction::Healthcheck(Healthcheck::Cmd {
            cmd,
            interval,
            retries,
            ..
        })) = one("HEALTHCHECK --interval=1m30.5s --retries=3 CMD curl -f x")
        else {
            panic!("not a healthcheck")
        };
        assert_eq!(cmd, CommandLine::Shell("curl -f x".into()));
        assert_eq!(
            (interval.as_deref(), retries.as_deref()),
            (Some("1m30.5s"), Some("3"))
        );
        assert_eq!(go_duration("1h2m3.5s"), Some(3_723_500_000_000));
        assert_eq!(go_duration("-1.5ms"), Some(-1_500_000));
        assert_eq!(go_duration(".s"), None);
        assert_eq!(go_duration("47000000000000000000.9h"), None);
        assert_eq!(go_duration("99999999999999999999999999h"), None);
        assert_eq!(go_duration("1"), None);
    }

    #[test]
    fn lists_and_pairs() {
        assert_eq!(
            one("EXPOSE 8080 443/tcp 80"),
            Ok(Instruction::Expose(vec![
                "443/tcp".into(),
                "80".into(),
                "8080".into()
            ]))
        );
        assert_eq!(
            one("VOLUME [\"/a\", \"/b\"]"),
            Ok(Instruction::Volume(vec!["/a".into(), "/b".into()]))
        );
        assert_eq!(
            msg("VOLUME [\" \"]"),
            "line 1: VOLUME specified can not be an empty string"
        );
        assert_eq!(
            one("ARG a b=1 c="),
            Ok(Instruction::Arg(vec![
                ("a".into(), None),
                ("b".into(), Some("1".into())),
                ("c".into(), Some(String::new()))
            ]))
        );
        assert_eq!(msg("ARG =x"), "line 1: ARG names can not be blank");
        assert_eq!(
            one("ENV a=\"x y\" b=2"),
            Ok(Instruction::Env(vec![
                ("a".into(), "\"x y\"".into()),
                ("b".into(), "2".into())
            ]))
        );
        assert_eq!(
            one("LABEL a  b c"),
            Ok(Instruction::Label(vec![("a".into(), "b c".into())]))
        );
        assert_eq!(
            msg("SHELL sh -c"),
            "line 1: SHELL requires the arguments to be in JSON form"
        );
        assert_eq!(
            one("CMD echo hi"),
            Ok(Instruction::Cmd(CommandLine::Shell("echo hi".into())))
        );
        assert_eq!(msg("USER"), "line 1: USER requires exactly one argument");
    }

    #[test]
    fn unknown_instructions() {
        assert_eq!(
            msg("FORM x"),
            "line 1: unknown instruction: FORM (did you mean FROM?)"
        );
        assert_eq!(
            msg("copyy x y"),
            "line 1: unknown instruction: copyy (did you mean copy?)"
        );
        assert_eq!(msg("Bogus x"), "line 1: unknown instruction: Bogus");
    }

    #[test]
    fn copy_sources_and_heredocs() {
        assert!(msg("COPY a").contains("COPY requires at least two arguments"));
        assert_eq!(
            msg("COPY a <<EOF\nx\nEOF\n"),
            "line 1: COPY cannot accept a heredoc as a destination"
        );
        let Ok(Instruction::Copy(spec)) = one("COPY <<-A b <<B /d\n\tone\nA\ntwo\nB\n") else {
            panic!("not a copy")
        };
        assert_eq!(spec.sources, vec!["b"]);
        let docs: Vec<(String, String, bool)> = spec
            .heredocs
            .into_iter()
            .map(|h| (h.name, h.content, h.chomp))
            .collect();
        assert_eq!(
            docs,
            vec![
                ("A".into(), "\tone\n".into(), true),
                ("B".into(), "two\n".into(), false)
            ]
        );
        let df = parse(b"FROM a\nRUN <<EOF\nx\nEOF\nFOO\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parse_all(&df).map_err(|e| e.line()), Err(5));
    }
}
