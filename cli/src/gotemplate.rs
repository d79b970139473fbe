//! Go's `text/template`, the subset Docker users write in `--format`: text and actions with
//! `{{-`/`-}}` trimming and comments; pipelines; fields (`.A.B`), variables (`$x := ..`,
//! `$x.A`, `$`), literals and parenthesized pipelines; `if`/`else if`/`else`, `range` (with
//! `$i, $v :=`, `else`, `break`, `continue`) and `with`; Go's functions (`and or not len index
//! slice eq ne lt le gt ge print printf println html js urlquery`) and Docker's (`json split
//! join title lower upper pad truncate`). `define`/`template`/`block` are refused with an error.
//!
//! Values come from JSON (the same objects `inspect` prints), with two kinds of object as in
//! Docker's Go types: a struct, where an unknown field is an error ("map has no entry for key"),
//! and a map (labels, ports...), where a missing key prints `<no value>`. Maps print as Go prints
//! them (`map[k:v]`), lists as `[a b]`, null as `<nil>`.
//!
//! `gtmpl` was not taken: it iterates maps in hash order where Go sorts their keys, prints values
//! in its own forms, and has no notion of Go's struct/map difference that Docker's errors show.

use std::fmt::Write as _;
use std::rc::Rc;

/// A method of a row context: its arguments to its value, or Go's error text.
pub type MethodFn = Rc<dyn Fn(&[Value]) -> Result<Value, String>>;

/// A template value.
#[derive(Clone)]
pub enum Value {
    /// `nil` (JSON null).
    Nil,
    /// A missing map key (prints `<no value>`).
    Missing,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// A slice.
    List(Vec<Value>),
    /// A struct or a map; entries in order.
    Object(Vec<(String, Value)>, Kind),
    /// A method taking arguments (`.Label "key"` of `ps --format`).
    Method(MethodFn),
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// What an object stands for in Docker's Go types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A struct: unknown fields are errors.
    Struct,
    /// A map: missing keys are `<no value>`.
    Map,
    /// A formatter's row context (`ps`, `images`...) of this Go type: a struct whose `json`
    /// escapes HTML as Go's `json.Marshal` does.
    Context(&'static str),
}

impl Value {
    /// Converts JSON; objects under a key for which `is_map` holds are maps, others structs.
    pub fn from_json(v: &serde_json::Value, is_map: &dyn Fn(&str) -> bool) -> Value {
        Self::from_json_kind(v, Kind::Struct, is_map)
    }

    fn from_json_kind(v: &serde_json::Value, kind: Kind, is_map: &dyn Fn(&str) -> bool) -> Value {
        match v {
            serde_json::Value::Null => Value::Nil,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(0.0)),
            },
            serde_json::Value::String(s) => Value::Str(s.clone()),
            serde_json::Value::Array(a) => Value::List(
                a.iter()
                    .map(|x| Self::from_json_kind(x, Kind::Struct, is_map))
                    .collect(),
            ),
            serde_json::Value::Object(o) => {
                let entries = o
                    .iter()
                    .map(|(k, x)| {
                        let child = if kind == Kind::Map {
                            Kind::Struct
                        } else if is_map(k) {
                            Kind::Map
                        } else {
                            Kind::Struct
                        };
                        (k.clone(), Self::from_json_kind(x, child, is_map))
                    })
                    .collect();
                Value::Object(entries, kind)
            }
        }
    }

    /// A row context of Go type `type_name`.
    pub fn context(type_name: &'static str, fields: Vec<(&str, Value)>) -> Value {
        Value::Object(
            fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            Kind::Context(type_name),
        )
    }

    /// The value as JSON (for `json`).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Nil | Value::Missing | Value::Method(_) => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Str(s) => s.clone().into(),
            Value::List(l) => l.iter().map(Value::to_json).collect(),
            Value::Object(o, _) => {
                let mut m = serde_json::Map::new();
                for (k, v) in o {
                    if !matches!(v, Value::Method(_)) {
                        m.insert(k.clone(), v.to_json());
                    }
                }
                serde_json::Value::Object(m)
            }
        }
    }

    /// Go's `%v` of the value.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        self.write_text(&mut s);
        s
    }

    fn write_text(&self, out: &mut String) {
        match self {
            Value::Nil => out.push_str("<nil>"),
            Value::Missing => out.push_str("<no value>"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::Float(f) => out.push_str(&go_float(*f)),
            Value::Str(s) => out.push_str(s),
            Value::List(l) => {
                out.push('[');
                for (i, v) in l.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    v.write_text(out);
                }
                out.push(']');
            }
            Value::Object(o, Kind::Map) => {
                out.push_str("map[");
                let mut sorted: Vec<&(String, Value)> = o.iter().collect();
                sorted.sort_by(|a, b| a.0.cmp(&b.0));
                for (i, (k, v)) in sorted.into_iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    out.push_str(k);
                    out.push(':');
                    v.write_text(out);
                }
                out.push(']');
            }
            Value::Object(o, _) => {
                out.push('{');
                for (i, (_, v)) in o
                    .iter()
                    .filter(|(_, v)| !matches!(v, Value::Method(_)))
                    .enumerate()
                {
                    if i > 0 {
                        out.push(' ');
                    }
                    v.write_text(out);
                }
                out.push('}');
            }
            Value::Method(_) => out.push_str("<method>"),
        }
    }

    /// Go's truth: false, 0, nil, empty string, slice or map are false.
    pub fn truthy(&self) -> bool {
        match self {
            Value::Nil | Value::Missing => false,
            Value::Bool(b) => *b,
            Value::Int(i) => *i != 0,
            Value::Float(f) => *f != 0.0,
            Value::Str(s) => !s.is_empty(),
            Value::List(l) => !l.is_empty(),
            Value::Object(o, Kind::Map) => !o.is_empty(),
            Value::Object(..) | Value::Method(_) => true,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Value::Nil | Value::Missing => "nil",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float64",
            Value::Str(_) => "string",
            Value::List(_) => "[]interface {}",
            Value::Object(_, Kind::Map) => "map[string]interface {}",
            Value::Object(..) => "struct",
            Value::Method(_) => "func",
        }
    }
}

fn go_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e21 {
        if f.abs() >= 1e21 {
            return format!("{f:e}");
        }
        return format!("{}", f as i64);
    }
    format!("{f}")
}

/// A template that failed to parse or to execute, in Go's words.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The text is not a template.
    #[error("template: :{line}: {msg}")]
    Parse {
        /// The line of the error.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// Executing failed at a node.
    #[error("template: :{line}:{col}: executing \"\" at <{node}>: {msg}")]
    Exec {
        /// The line.
        line: usize,
        /// The byte column (Go's).
        col: usize,
        /// The node's text.
        node: String,
        /// What went wrong.
        msg: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Lexing and parsing

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Dot,
    Field(String),
    Var(String),
    Ident(String),
    Str(String),
    Num(String),
    Bool(bool),
    Nil,
    Pipe,
    LParen,
    RParen,
    Declare,
    Assign,
    Comma,
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    pos: usize,
}

#[derive(Clone, Debug)]
enum Operand {
    Dot,
    /// `.A.B`
    Field(Vec<String>),
    /// `$x.A.B` (`$` alone for the root)
    Var(String, Vec<String>),
    Func(String),
    Lit(Value),
    /// `(pipeline).A.B`
    Sub(Box<Pipe>, Vec<String>),
}

#[derive(Clone, Debug)]
struct Cmd {
    args: Vec<(Operand, usize, String)>,
}

#[derive(Clone, Debug)]
struct Pipe {
    decl: Vec<String>,
    assign: bool,
    cmds: Vec<Cmd>,
    pos: usize,
    text: String,
}

#[derive(Clone, Debug)]
enum Node {
    Text(String),
    Action(Pipe),
    If(Pipe, Vec<Node>, Vec<Node>),
    Range(Pipe, Vec<Node>, Vec<Node>),
    With(Pipe, Vec<Node>, Vec<Node>),
    Break,
    Continue,
}

/// A parsed template.
#[derive(Clone, Debug)]
pub struct Template {
    nodes: Vec<Node>,
    src: String,
}

/// One `{{ ... }}` or text piece before parsing into a tree.
enum Piece {
    Text(String),
    Action(Vec<Token>, usize),
}

fn line_of(src: &str, pos: usize) -> usize {
    1 + src[..pos.min(src.len())].matches('\n').count()
}

fn perr(src: &str, pos: usize, msg: impl Into<String>) -> TemplateError {
    TemplateError::Parse {
        line: line_of(src, pos),
        msg: msg.into(),
    }
}

fn split_pieces(src: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut pieces = Vec::new();
    let mut rest = 0;
    let mut text = String::new();
    while let Some(off) = src[rest..].find("{{") {
        let open = rest + off;
        text.push_str(&src[rest..open]);
        let mut start = open + 2;
        let trim_left = src[start..].starts_with("- ")
            || src[start..].starts_with("-\t")
            || src[start..].starts_with("-\n");
        if trim_left {
            start += 1;
            let t = text.trim_end_matches([' ', '\t', '\r', '\n']).len();
            text.truncate(t);
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        // Comments.
        let inner_start = start + (src[start..].len() - src[start..].trim_start().len());
        if src[inner_start..].starts_with("/*") {
            let Some(end) = src[inner_start..].find("*/") else {
                return Err(perr(src, open, "unclosed comment"));
            };
            let after = inner_start + end + 2;
            let after_ws = after + (src[after..].len() - src[after..].trim_start().len());
            let (close, trim_right) = if src[after_ws..].starts_with("-}}") {
                (after_ws + 3, true)
            } else if src[after..].starts_with("}}") {
                (after + 2, false)
            } else {
                return Err(perr(src, open, "comment ends before closing delimiter"));
            };
            rest = close;
            if trim_right {
                rest += src[rest..].len() - src[rest..].trim_start_matches([' ', '\t', '\r', '\n']).len();
            }
            continue;
        }
        let (tokens, end, trim_right) = lex_action(src, start)?;
        pieces.push(Piece::Action(tokens, open));
        rest = end;
        if trim_right {
            rest += src[rest..].len() - src[rest..].trim_start_matches([' ', '\t', '\r', '\n']).len();
        }
    }
    text.push_str(&src[rest..]);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Lexes an action from `start` (after `{{`); returns its tokens, the offset after `}}`, and
/// whether it ended with `-}}`.
fn lex_action(src: &str, start: usize) -> Result<(Vec<Token>, usize, bool), TemplateError> {
    let b = src.as_bytes();
    let mut i = start;
    let mut toks = Vec::new();
    let mut depth = 0usize;
    loop {
        let Some(&c) = b.get(i) else {
            return Err(perr(src, start, "unclosed action"));
        };
        let c = c as char;
        if c == ' ' || c == '\t' || c == '\r' || c == '\n' {
            if src[i..].trim_start().starts_with("-}}") {
                let ws = src[i..].len() - src[i..].trim_start().len();
                if depth > 0 {
                    return Err(perr(src, i, "unclosed left paren"));
                }
                return Ok((toks, i + ws + 3, true));
            }
            i += 1;
            continue;
        }
        if src[i..].starts_with("}}") {
            if depth > 0 {
                return Err(perr(src, i, "unclosed left paren"));
            }
            return Ok((toks, i + 2, false));
        }
        let pos = i;
        let push = |toks: &mut Vec<Token>, tok: Tok| toks.push(Token { tok, pos });
        match c {
            '|' => {
                push(&mut toks, Tok::Pipe);
                i += 1;
            }
            '(' => {
                depth += 1;
                push(&mut toks, Tok::LParen);
                i += 1;
            }
            ')' => {
                if depth == 0 {
                    return Err(perr(src, i, "unexpected right paren U+0029 ')'"));
                }
                depth -= 1;
                push(&mut toks, Tok::RParen);
                i += 1;
            }
            ',' => {
                push(&mut toks, Tok::Comma);
                i += 1;
            }
            ':' if b.get(i + 1) == Some(&b'=') => {
                push(&mut toks, Tok::Declare);
                i += 2;
            }
            '=' => {
                push(&mut toks, Tok::Assign);
                i += 1;
            }
            '"' => {
                let (s, end) = lex_quoted(src, i)?;
                push(&mut toks, Tok::Str(s));
                i = end;
            }
            '`' => {
                let Some(end) = src[i + 1..].find('`') else {
                    return Err(perr(src, i, "unterminated raw quoted string"));
                };
                push(&mut toks, Tok::Str(src[i + 1..i + 1 + end].to_string()));
                i = i + 2 + end;
            }
            '.' if !b.get(i + 1).is_some_and(|d| d.is_ascii_digit()) => {
                let mut j = i + 1;
                while let Some(ch) = src[j..].chars().next().filter(|c| is_ident_char(*c)) {
                    j += ch.len_utf8();
                }
                if j == i + 1 {
                    push(&mut toks, Tok::Dot);
                } else {
                    push(&mut toks, Tok::Field(src[i + 1..j].to_string()));
                }
                i = j;
            }
            '$' => {
                let mut j = i + 1;
                while let Some(ch) = src[j..].chars().next().filter(|c| is_ident_char(*c)) {
                    j += ch.len_utf8();
                }
                push(&mut toks, Tok::Var(src[i..j].to_string()));
                i = j;
            }
            c if c.is_ascii_digit() || c == '-' || c == '+' || c == '.' => {
                let mut j = i + 1;
                while b.get(j).is_some_and(|d| {
                    d.is_ascii_alphanumeric()
                        || *d == b'.'
                        || *d == b'_'
                        || ((*d == b'-' || *d == b'+') && matches!(b[j - 1], b'e' | b'E'))
                }) {
                    j += 1;
                }
                push(&mut toks, Tok::Num(src[i..j].to_string()));
                i = j;
            }
            c if is_ident_char(c) => {
                let mut j = i;
                while let Some(ch) = src[j..].chars().next().filter(|c| is_ident_char(*c)) {
                    j += ch.len_utf8();
                }
                let word = &src[i..j];
                push(
                    &mut toks,
                    match word {
                        "true" => Tok::Bool(true),
                        "false" => Tok::Bool(false),
                        "nil" => Tok::Nil,
                        w => Tok::Ident(w.to_string()),
                    },
                );
                i = j;
            }
            other => return Err(perr(src, i, format!("unexpected {other:?} in command"))),
        }
    }
}

/// Lexes the interpreted string literal starting at the `"` at `start`; returns its value and
/// the offset after the closing `"`.
fn lex_quoted(src: &str, start: usize) -> Result<(String, usize), TemplateError> {
    let mut s = String::new();
    let mut j = start + 1;
    loop {
        let Some(ch) = src[j..].chars().next() else {
            return Err(perr(src, start, "unterminated quoted string"));
        };
        match ch {
            '"' => break,
            '\n' => return Err(perr(src, start, "unterminated quoted string")),
            '\\' => {
                let Some(e) = src[j + 1..].chars().next() else {
                    return Err(perr(src, start, "unterminated quoted string"));
                };
                s.push(match e {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    '\\' => '\\',
                    '"' => '"',
                    '\'' => '\'',
                    '0' => '\0',
                    other => return Err(perr(src, j, format!("invalid syntax: unknown escape \\{other}"))),
                });
                j += 1 + e.len_utf8();
                continue;
            }
            ch => s.push(ch),
        }
        j += ch.len_utf8();
    }
    Ok((s, j + 1))
}

const FUNCS: &[&str] = &[
    "and", "or", "not", "len", "index", "slice", "eq", "ne", "lt", "le", "gt", "ge", "print", "printf",
    "println", "html", "js", "urlquery", "json", "split", "join", "title", "lower", "upper", "pad",
    "truncate",
];

struct Parser<'a> {
    src: &'a str,
    pieces: std::vec::IntoIter<Piece>,
}

enum Stop {
    Eof,
    End,
    Else(Vec<Token>, usize),
}

impl Parser<'_> {
    /// Parses nodes until `{{end}}`, `{{else ...}}` or the end of input.
    fn list(&mut self) -> Result<(Vec<Node>, Stop), TemplateError> {
        let mut nodes = Vec::new();
        while let Some(p) = self.pieces.next() {
            let (toks, pos) = match p {
                Piece::Text(t) => {
                    nodes.push(Node::Text(t));
                    continue;
                }
                Piece::Action(t, pos) => (t, pos),
            };
            let kw = match toks.first().map(|t| &t.tok) {
                Some(Tok::Ident(w)) => w.as_str(),
                None => return Err(perr(self.src, pos, "missing value for command")),
                _ => "",
            };
            match kw {
                "end" => return Ok((nodes, Stop::End)),
                "else" => return Ok((nodes, Stop::Else(toks[1..].to_vec(), pos))),
                "if" | "range" | "with" => nodes.push(self.control(kw, &toks[1..], pos)?),
                "break" => nodes.push(Node::Break),
                "continue" => nodes.push(Node::Continue),
                "define" | "template" | "block" => {
                    return Err(perr(
                        self.src,
                        pos,
                        format!("{kw} is not supported by kiln's --format"),
                    ))
                }
                _ => nodes.push(Node::Action(self.pipeline(&toks, pos, false)?)),
            }
        }
        Ok((nodes, Stop::Eof))
    }

    fn control(&mut self, kw: &str, toks: &[Token], pos: usize) -> Result<Node, TemplateError> {
        let pipe = self.pipeline(toks, pos, true)?;
        if pipe.cmds.is_empty() {
            return Err(perr(self.src, pos, format!("missing value for {kw}")));
        }
        let (body, end) = self.list()?;
        let else_list = match end {
            Stop::Eof => return Err(perr(self.src, pos, "unexpected EOF".to_string())),
            Stop::End => Vec::new(),
            Stop::Else(rest, epos) if rest.is_empty() => {
                let (e, end2) = self.list()?;
                match end2 {
                    Stop::End => e,
                    Stop::Eof => return Err(perr(self.src, epos, "unexpected EOF")),
                    Stop::Else(..) => return Err(perr(self.src, epos, "expected end; found {{else}}")),
                }
            }
            Stop::Else(rest, epos) => {
                // `else if ...` / `else with ...`: a nested control that shares our `end`.
                let nested_kw = match rest.first().map(|t| &t.tok) {
                    Some(Tok::Ident(w)) if w == "if" || w == "with" => w.clone(),
                    _ => return Err(perr(self.src, epos, "unexpected tokens after else")),
                };
                vec![self.control(&nested_kw, &rest[1..], epos)?]
            }
        };
        Ok(match kw {
            "if" => Node::If(pipe, body, else_list),
            "range" => Node::Range(pipe, body, else_list),
            _ => Node::With(pipe, body, else_list),
        })
    }

    fn pipeline(&self, toks: &[Token], pos: usize, control: bool) -> Result<Pipe, TemplateError> {
        let mut i = 0;
        let mut decl = Vec::new();
        let mut assign = false;
        // `$x :=`, `$x =`, `$i, $v :=`
        let mut j = 0;
        let mut vars = Vec::new();
        while let Some(Token { tok: Tok::Var(v), .. }) = toks.get(j) {
            vars.push(v.clone());
            match toks.get(j + 1).map(|t| &t.tok) {
                Some(Tok::Comma) if control => j += 2,
                Some(Tok::Declare) | Some(Tok::Assign) => {
                    assign = matches!(toks[j + 1].tok, Tok::Assign);
                    decl = std::mem::take(&mut vars);
                    i = j + 2;
                    break;
                }
                _ => break,
            }
        }
        let start = toks.get(i).map(|t| t.pos).unwrap_or(pos);
        let end = toks.last().map(|t| t.pos).unwrap_or(pos);
        let _ = end;
        let cmds = self.commands(&toks[i..])?;
        Ok(Pipe {
            decl,
            assign,
            cmds,
            pos: start,
            text: String::new(),
        })
    }

    fn commands(&self, toks: &[Token]) -> Result<Vec<Cmd>, TemplateError> {
        let mut cmds = Vec::new();
        let mut cur = Vec::new();
        let mut i = 0;
        while i < toks.len() {
            match &toks[i].tok {
                Tok::Pipe => {
                    if cur.is_empty() {
                        return Err(perr(self.src, toks[i].pos, "missing command"));
                    }
                    cmds.push(Cmd {
                        args: std::mem::take(&mut cur),
                    });
                    i += 1;
                }
                _ => {
                    let (op, next) = self.operand(toks, i)?;
                    let text = self.node_text(toks, i, next);
                    cur.push((op, toks[i].pos, text));
                    i = next;
                }
            }
        }
        if !cur.is_empty() {
            cmds.push(Cmd { args: cur });
        } else if !cmds.is_empty() {
            return Err(perr(
                self.src,
                toks.last().map(|t| t.pos).unwrap_or(0),
                "missing command",
            ));
        }
        Ok(cmds)
    }

    fn node_text(&self, toks: &[Token], from: usize, to: usize) -> String {
        let start = toks[from].pos;
        let end = toks.get(to).map(|t| t.pos).unwrap_or_else(|| {
            let last = &toks[to - 1];
            last.pos + tok_len(&self.src[last.pos..], &last.tok)
        });
        self.src[start..end].trim_end().to_string()
    }

    /// One operand starting at `toks[i]`, with any field chain after it.
    fn operand(&self, toks: &[Token], i: usize) -> Result<(Operand, usize), TemplateError> {
        let t = &toks[i];
        let (base, mut next) = match &t.tok {
            Tok::Dot => (Operand::Dot, i + 1),
            Tok::Field(f) => (Operand::Field(vec![f.clone()]), i + 1),
            Tok::Var(v) => (Operand::Var(v.clone(), Vec::new()), i + 1),
            Tok::Str(s) => (Operand::Lit(Value::Str(s.clone())), i + 1),
            Tok::Bool(b) => (Operand::Lit(Value::Bool(*b)), i + 1),
            Tok::Nil => (Operand::Lit(Value::Nil), i + 1),
            Tok::Num(n) => (
                Operand::Lit(
                    parse_number(n)
                        .ok_or_else(|| perr(self.src, t.pos, format!("bad number syntax: {n:?}")))?,
                ),
                i + 1,
            ),
            Tok::Ident(name) => {
                if !FUNCS.contains(&name.as_str()) {
                    return Err(perr(self.src, t.pos, format!("function {name:?} not defined")));
                }
                (Operand::Func(name.clone()), i + 1)
            }
            Tok::LParen => {
                let mut depth = 0;
                let mut j = i;
                loop {
                    match toks.get(j).map(|t| &t.tok) {
                        Some(Tok::LParen) => depth += 1,
                        Some(Tok::RParen) => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        None => return Err(perr(self.src, t.pos, "unclosed left paren")),
                        _ => {}
                    }
                    j += 1;
                }
                let inner = self.pipeline(&toks[i + 1..j], t.pos, false)?;
                (Operand::Sub(Box::new(inner), Vec::new()), j + 1)
            }
            other => {
                return Err(perr(
                    self.src,
                    t.pos,
                    format!("unexpected {} in operand", tok_name(other)),
                ))
            }
        };
        let mut base = base;
        // A chain: fields immediately following (no space) the operand.
        while let Some(Token {
            tok: Tok::Field(f),
            pos,
        }) = toks.get(next)
        {
            let prev_end = {
                let p = &toks[next - 1];
                p.pos + tok_len(&self.src[p.pos..], &p.tok)
            };
            if *pos != prev_end {
                break;
            }
            match &mut base {
                Operand::Field(v) | Operand::Var(_, v) | Operand::Sub(_, v) => v.push(f.clone()),
                _ => {
                    return Err(perr(
                        self.src,
                        *pos,
                        format!(
                            "unexpected . after term {:?}",
                            self.src[t.pos..prev_end].to_string()
                        ),
                    ))
                }
            }
            next += 1;
        }
        Ok((base, next))
    }
}

fn tok_len(rest: &str, tok: &Tok) -> usize {
    match tok {
        Tok::Dot | Tok::Pipe | Tok::LParen | Tok::RParen | Tok::Comma | Tok::Assign => 1,
        Tok::Declare => 2,
        Tok::Field(f) => 1 + f.len(),
        Tok::Var(v) | Tok::Ident(v) | Tok::Num(v) => v.len(),
        Tok::Bool(b) => {
            if *b {
                4
            } else {
                5
            }
        }
        Tok::Nil => 3,
        Tok::Str(_) => {
            // Re-scan the literal's extent.
            let q = rest.chars().next().unwrap_or('"');
            let mut esc = false;
            for (i, c) in rest.char_indices().skip(1) {
                if q == '"' && esc {
                    esc = false;
                    continue;
                }
                if q == '"' && c == '\\' {
                    esc = true;
                    continue;
                }
                if c == q {
                    return i + 1;
                }
            }
            rest.len()
        }
    }
}

fn tok_name(t: &Tok) -> &'static str {
    match t {
        Tok::Pipe => "<|>",
        Tok::RParen => "<)>",
        Tok::Declare => "<:=>",
        Tok::Assign => "<=>",
        Tok::Comma => "<,>",
        _ => "token",
    }
}

fn parse_number(n: &str) -> Option<Value> {
    let clean = n.replace('_', "");
    if let Ok(i) = clean.parse::<i64>() {
        return Some(Value::Int(i));
    }
    if let Some(h) = clean.strip_prefix("0x").or_else(|| clean.strip_prefix("0X")) {
        return i64::from_str_radix(h, 16).ok().map(Value::Int);
    }
    clean.parse::<f64>().ok().map(Value::Float)
}

impl Template {
    /// Parses `src`.
    pub fn parse(src: &str) -> Result<Template, TemplateError> {
        let pieces = split_pieces(src)?;
        let mut p = Parser {
            src,
            pieces: pieces.into_iter(),
        };
        let (nodes, end) = p.list()?;
        match end {
            Stop::Eof => {}
            Stop::End => return Err(perr(src, src.len(), "unexpected {{end}}")),
            Stop::Else(_, pos) => return Err(perr(src, pos, "unexpected {{else}}")),
        }
        let mut t = Template {
            nodes,
            src: src.to_string(),
        };
        fill_texts(&mut t.nodes, src);
        Ok(t)
    }

    /// Executes the template on `data`.
    pub fn execute(&self, data: &Value) -> Result<String, TemplateError> {
        self.execute_with(data, false)
    }

    /// Executes the template for a table header: Docker's header functions return their first
    /// argument unchanged.
    pub fn execute_header(&self, data: &Value) -> Result<String, TemplateError> {
        self.execute_with(data, true)
    }

    fn execute_with(&self, data: &Value, header: bool) -> Result<String, TemplateError> {
        let mut st = State {
            src: &self.src,
            vars: vec![("$".to_string(), data.clone())],
            out: String::new(),
            header,
        };
        match st.walk(&self.nodes, data) {
            Ok(()) | Err(Flow::Break) | Err(Flow::Continue) => Ok(st.out),
            Err(Flow::Err(e)) => Err(e),
        }
    }
}

fn fill_texts(nodes: &mut [Node], src: &str) {
    for n in nodes {
        match n {
            Node::Action(p) => p.text = pipe_text(p, src),
            Node::If(p, a, b) | Node::Range(p, a, b) | Node::With(p, a, b) => {
                p.text = pipe_text(p, src);
                fill_texts(a, src);
                fill_texts(b, src);
            }
            _ => {}
        }
    }
}

fn pipe_text(p: &Pipe, _src: &str) -> String {
    p.cmds
        .iter()
        .map(|c| c.args.iter().map(|a| a.2.clone()).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(" | ")
}

// ---------------------------------------------------------------------------------------------
// Execution

enum Flow {
    Break,
    Continue,
    Err(TemplateError),
}

impl From<TemplateError> for Flow {
    fn from(e: TemplateError) -> Flow {
        Flow::Err(e)
    }
}

struct State<'a> {
    src: &'a str,
    vars: Vec<(String, Value)>,
    out: String,
    header: bool,
}

impl State<'_> {
    fn err(&self, pos: usize, node: &str, msg: impl Into<String>) -> TemplateError {
        let line = line_of(self.src, pos);
        let line_start = self.src[..pos.min(self.src.len())]
            .rfind('\n')
            .map(|p| p + 1)
            .unwrap_or(0);
        let col = if line == 1 { pos } else { pos - line_start };
        TemplateError::Exec {
            line,
            col,
            node: node.to_string(),
            msg: msg.into(),
        }
    }

    fn walk(&mut self, nodes: &[Node], dot: &Value) -> Result<(), Flow> {
        for n in nodes {
            match n {
                Node::Text(t) => self.out.push_str(t),
                Node::Action(p) => {
                    let v = self.pipe(p, dot)?;
                    if p.decl.is_empty() {
                        self.print(&v, p)?;
                    }
                }
                Node::If(p, a, b) => {
                    let mark = self.vars.len();
                    let v = self.pipe(p, dot)?;
                    let r = if v.truthy() {
                        self.walk(a, dot)
                    } else {
                        self.walk(b, dot)
                    };
                    self.vars.truncate(mark);
                    r?;
                }
                Node::With(p, a, b) => {
                    let mark = self.vars.len();
                    let v = self.pipe(p, dot)?;
                    let r = if v.truthy() {
                        self.walk(a, &v)
                    } else {
                        self.walk(b, dot)
                    };
                    self.vars.truncate(mark);
                    r?;
                }
                Node::Range(p, a, b) => {
                    let mark = self.vars.len();
                    let mut decl = p.clone();
                    let names = std::mem::take(&mut decl.decl);
                    let v = self.pipe(&decl, dot)?;
                    let items: Vec<(Value, Value)> = match &v {
                        Value::List(l) => l
                            .iter()
                            .enumerate()
                            .map(|(i, x)| (Value::Int(i as i64), x.clone()))
                            .collect(),
                        Value::Object(o, _) => {
                            let mut s: Vec<(Value, Value)> = o
                                .iter()
                                .map(|(k, x)| (Value::Str(k.clone()), x.clone()))
                                .collect();
                            s.sort_by_key(|x| x.0.to_text());
                            s
                        }
                        Value::Int(n) => (0..*n).map(|i| (Value::Int(i), Value::Int(i))).collect(),
                        Value::Nil | Value::Missing => Vec::new(),
                        other => {
                            return Err(self
                                .err(
                                    p.pos,
                                    &p.text,
                                    format!("range can't iterate over {}", other.to_text()),
                                )
                                .into())
                        }
                    };
                    if items.is_empty() {
                        let r = self.walk(b, dot);
                        self.vars.truncate(mark);
                        r?;
                        continue;
                    }
                    for (k, x) in items {
                        let inner = self.vars.len();
                        match names.len() {
                            0 => {}
                            1 => self.vars.push((names[0].clone(), x.clone())),
                            _ => {
                                self.vars.push((names[0].clone(), k));
                                self.vars.push((names[1].clone(), x.clone()));
                            }
                        }
                        let r = self.walk(a, &x);
                        self.vars.truncate(inner);
                        match r {
                            Ok(()) | Err(Flow::Continue) => {}
                            Err(Flow::Break) => break,
                            Err(e) => {
                                self.vars.truncate(mark);
                                return Err(e);
                            }
                        }
                    }
                    self.vars.truncate(mark);
                }
                Node::Break => return Err(Flow::Break),
                Node::Continue => return Err(Flow::Continue),
            }
        }
        Ok(())
    }

    fn print(&mut self, v: &Value, p: &Pipe) -> Result<(), TemplateError> {
        if let Value::Method(_) = v {
            return Err(self.err(p.pos, &p.text, "can't print method"));
        }
        v.write_text(&mut self.out);
        Ok(())
    }

    fn pipe(&mut self, p: &Pipe, dot: &Value) -> Result<Value, TemplateError> {
        let mut val: Option<Value> = None;
        for c in &p.cmds {
            val = Some(self.command(c, dot, val)?);
        }
        let v = val.unwrap_or(Value::Missing);
        for name in &p.decl {
            if p.assign {
                match self.vars.iter_mut().rev().find(|(n, _)| n == name) {
                    Some(slot) => slot.1 = v.clone(),
                    None => return Err(self.err(p.pos, &p.text, format!("undefined variable: {name}"))),
                }
            } else {
                self.vars.push((name.clone(), v.clone()));
            }
        }
        Ok(v)
    }

    fn command(&mut self, c: &Cmd, dot: &Value, piped: Option<Value>) -> Result<Value, TemplateError> {
        let (first, pos, text) = &c.args[0];
        if let Operand::Func(name) = first {
            let mut args = Vec::new();
            for (a, apos, atext) in &c.args[1..] {
                args.push(self.operand(a, *apos, atext, dot, &[])?);
            }
            if let Some(p) = piped {
                args.push(p);
            }
            return self
                .call(name, &args)
                .map_err(|m| self.err(*pos, text, format!("error calling {name}: {m}")));
        }
        // A method with arguments (`.Label "x"`), or a plain operand.
        let mut extra = Vec::new();
        for (a, apos, atext) in &c.args[1..] {
            extra.push(self.operand(a, *apos, atext, dot, &[])?);
        }
        if let Some(p) = piped {
            extra.push(p);
        }
        let is_field = matches!(first, Operand::Field(_) | Operand::Var(_, _) | Operand::Sub(_, _));
        if !extra.is_empty() && !is_field {
            return Err(self.err(*pos, text, format!("can't give argument to non-function {text}")));
        }
        self.operand(first, *pos, text, dot, &extra)
    }

    fn operand(
        &mut self,
        op: &Operand,
        pos: usize,
        text: &str,
        dot: &Value,
        args: &[Value],
    ) -> Result<Value, TemplateError> {
        let (base, chain) = match op {
            Operand::Dot => (dot.clone(), &[][..]),
            Operand::Field(f) => (dot.clone(), &f[..]),
            Operand::Var(name, f) => {
                let v = self
                    .vars
                    .iter()
                    .rev()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| self.err(pos, text, format!("undefined variable: {name}")))?;
                (v, &f[..])
            }
            Operand::Lit(v) => (v.clone(), &[][..]),
            Operand::Func(name) => {
                return self
                    .call(name, args)
                    .map_err(|m| self.err(pos, text, format!("error calling {name}: {m}")));
            }
            Operand::Sub(p, f) => (self.pipe(p, dot)?, &f[..]),
        };
        // Go reports a chain's error at its second element.
        let err_pos =
            if chain.len() > 1 || matches!(op, Operand::Var(..) | Operand::Sub(..)) && !chain.is_empty() {
                pos + text
                    .find(&format!(
                        ".{}",
                        chain.get(1).or(chain.first()).map(String::as_str).unwrap_or("")
                    ))
                    .unwrap_or(0)
            } else {
                pos
            };
        let mut cur = base;
        for (i, name) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            cur = match &cur {
                Value::Object(o, kind) => match o.iter().find(|(k, _)| k == name) {
                    Some((_, Value::Method(m))) => {
                        let a: &[Value] = if last { args } else { &[] };
                        m(a).map_err(|e| self.err(err_pos, text, format!("error calling {name}: {e}")))?
                    }
                    Some((_, v)) => v.clone(),
                    None if *kind == Kind::Map => Value::Missing,
                    None => {
                        let msg = match kind {
                            Kind::Context(t) => format!("can't evaluate field {name} in type {t}"),
                            _ => format!("map has no entry for key {name:?}"),
                        };
                        return Err(self.err(err_pos, text, msg));
                    }
                },
                Value::Nil | Value::Missing => {
                    return Err(self.err(
                        err_pos,
                        text,
                        format!("nil pointer evaluating interface {{}}.{name}"),
                    ))
                }
                other => {
                    return Err(self.err(
                        err_pos,
                        text,
                        format!("can't evaluate field {name} in type {}", other.type_name()),
                    ))
                }
            };
            if last && !args.is_empty() && !matches!(op, Operand::Func(_)) {
                let was_method = matches!(&cur, Value::Method(_));
                if was_method {
                    return Err(self.err(err_pos, text, "method needs arguments"));
                }
            }
        }
        if !args.is_empty() && (chain.is_empty() || !self.last_was_method(op, dot)) {
            return Err(self.err(pos, text, format!("can't give argument to non-function {text}")));
        }
        if let Value::Method(m) = &cur {
            return m(&[]).map_err(|e| self.err(err_pos, text, e));
        }
        Ok(cur)
    }

    /// Whether the last element of `op`'s chain is a method (which takes the arguments).
    fn last_was_method(&self, op: &Operand, dot: &Value) -> bool {
        let (base, chain) = match op {
            Operand::Field(f) => (Some(dot.clone()), f),
            Operand::Var(name, f) => (
                self.vars
                    .iter()
                    .rev()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone()),
                f,
            ),
            _ => return false,
        };
        let mut cur = base;
        for name in chain {
            cur = match cur {
                Some(Value::Object(o, _)) => o.into_iter().find(|(k, _)| k == name).map(|(_, v)| v),
                _ => None,
            };
        }
        matches!(cur, Some(Value::Method(_)))
    }

    fn call(&self, name: &str, args: &[Value]) -> Result<Value, String> {
        let a = Args { name, args };
        if self.header {
            // Docker's header functions: the header text passes through.
            let arity = match name {
                "json" | "title" | "lower" | "upper" => Some(1),
                "split" | "join" | "truncate" => Some(2),
                "pad" => Some(3),
                _ => None,
            };
            if let Some(n) = arity {
                a.want(n)?;
                return Ok(args[0].clone());
            }
        }
        match name {
            "and" | "or" | "not" => call_logic(&a),
            "len" => call_len(&a),
            "index" => call_index(&a),
            "slice" => call_slice(&a),
            "eq" | "ne" | "lt" | "le" | "gt" | "ge" => call_compare(&a),
            "print" | "println" | "printf" => call_print(&a),
            "html" | "js" | "urlquery" => Ok(Value::Str(call_escape(name, &go_sprint(args)))),
            "json" => call_json(&a),
            "split" | "join" => call_split_join(&a),
            "title" | "lower" | "upper" | "pad" | "truncate" => call_text(&a),
            other => Err(format!("function {other:?} not defined")),
        }
    }
}

/// The arguments of one builtin call, with Go's checks of their number and types.
struct Args<'a> {
    name: &'a str,
    args: &'a [Value],
}

impl Args<'_> {
    fn want(&self, n: usize) -> Result<(), String> {
        if self.args.len() != n {
            Err(format!(
                "wrong number of args for {}: want {n} got {}",
                self.name,
                self.args.len()
            ))
        } else {
            Ok(())
        }
    }

    /// At least one argument (the variadic builtins).
    fn want_some(&self) -> Result<(), String> {
        if self.args.is_empty() {
            Err(format!(
                "wrong number of args for {}: want at least 1 got 0",
                self.name
            ))
        } else {
            Ok(())
        }
    }

    fn s(&self, i: usize) -> Result<String, String> {
        match &self.args[i] {
            Value::Str(s) => Ok(s.clone()),
            other => Err(format!(
                "wrong type for value; expected string; got {}",
                other.type_name()
            )),
        }
    }

    fn int(&self, i: usize) -> Result<i64, String> {
        match &self.args[i] {
            Value::Int(n) => Ok(*n),
            Value::Float(f) if f.fract() == 0.0 => Ok(*f as i64),
            other => Err(format!(
                "wrong type for value; expected int; got {}",
                other.type_name()
            )),
        }
    }
}

/// `and`, `or`, `not`.
fn call_logic(a: &Args) -> Result<Value, String> {
    let args = a.args;
    if a.name == "not" {
        a.want(1)?;
        return Ok(Value::Bool(!args[0].truthy()));
    }
    a.want_some()?;
    let stop = a.name == "or";
    Ok(args
        .iter()
        .find(|v| v.truthy() == stop)
        .unwrap_or(&args[args.len() - 1])
        .clone())
}

fn call_len(a: &Args) -> Result<Value, String> {
    a.want(1)?;
    Ok(Value::Int(match &a.args[0] {
        Value::Str(s) => s.len() as i64,
        Value::List(l) => l.len() as i64,
        Value::Object(o, _) => o.len() as i64,
        other => return Err(format!("len of type {}", other.type_name())),
    }))
}

fn call_index(a: &Args) -> Result<Value, String> {
    a.want_some()?;
    let mut cur = a.args[0].clone();
    for k in &a.args[1..] {
        cur = match (&cur, k) {
            (Value::List(l), Value::Int(i)) => l
                .get(usize::try_from(*i).map_err(|_| format!("index out of range: {i}"))?)
                .cloned()
                .ok_or_else(|| format!("index out of range: {i}"))?,
            (Value::Str(s), Value::Int(i)) => Value::Int(
                *s.as_bytes()
                    .get(usize::try_from(*i).map_err(|_| format!("index out of range: {i}"))?)
                    .ok_or_else(|| format!("index out of range: {i}"))? as i64,
            ),
            (Value::Object(o, _), Value::Str(key)) => o
                .iter()
                .find(|(n, _)| n == key)
                .map(|(_, v)| v.clone())
                .unwrap_or(Value::Str(String::new())),
            (Value::Nil | Value::Missing, _) => return Err("index of untyped nil".into()),
            (c, k) => {
                return Err(format!(
                    "can't index item of type {} with {}",
                    c.type_name(),
                    k.type_name()
                ))
            }
        };
    }
    Ok(cur)
}

fn call_slice(a: &Args) -> Result<Value, String> {
    a.want_some()?;
    let idx: Vec<i64> = (1..a.args.len()).map(|i| a.int(i)).collect::<Result<_, _>>()?;
    let from = *idx.first().unwrap_or(&0) as usize;
    Ok(match &a.args[0] {
        Value::Str(x) => {
            let to = idx.get(1).map(|t| *t as usize).unwrap_or(x.len());
            Value::Str(
                x.get(from..to)
                    .ok_or_else(|| format!("index out of range: {to}"))?
                    .to_string(),
            )
        }
        Value::List(l) => {
            let to = idx.get(1).map(|t| *t as usize).unwrap_or(l.len());
            Value::List(
                l.get(from..to)
                    .ok_or_else(|| format!("index out of range: {to}"))?
                    .to_vec(),
            )
        }
        other => return Err(format!("can't slice item of type {}", other.type_name())),
    })
}

/// `eq` (any of the others equals the first), `ne`, `lt`, `le`, `gt`, `ge`.
fn call_compare(a: &Args) -> Result<Value, String> {
    let args = a.args;
    if a.name == "eq" {
        if args.len() < 2 {
            return Err("missing argument for comparison".into());
        }
        let mut any = false;
        for b in &args[1..] {
            any |= compare(&args[0], b)? == std::cmp::Ordering::Equal;
        }
        return Ok(Value::Bool(any));
    }
    a.want(2)?;
    let o = compare(&args[0], &args[1])?;
    if a.name != "ne" && !matches!(args[0], Value::Int(_) | Value::Float(_) | Value::Str(_)) {
        return Err("invalid type for comparison".into());
    }
    use std::cmp::Ordering::*;
    Ok(Value::Bool(match a.name {
        "ne" => o != Equal,
        "lt" => o == Less,
        "le" => o != Greater,
        "gt" => o == Greater,
        _ => o != Less,
    }))
}

/// `print`, `println`, `printf`.
fn call_print(a: &Args) -> Result<Value, String> {
    Ok(Value::Str(match a.name {
        "print" => go_sprint(a.args),
        "println" => {
            let mut s = a.args.iter().map(Value::to_text).collect::<Vec<_>>().join(" ");
            s.push('\n');
            s
        }
        _ => {
            a.want_some()?;
            sprintf(&a.s(0)?, &a.args[1..])
        }
    }))
}

/// `html`, `js`, `urlquery` of the already printed arguments.
fn call_escape(name: &str, text: &str) -> String {
    match name {
        "html" => text
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&#34;")
            .replace('\'', "&#39;"),
        "js" => {
            let mut out = String::new();
            for c in text.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\'' => out.push_str("\\'"),
                    '"' => out.push_str("\\\""),
                    '<' => out.push_str("\\u003C"),
                    '>' => out.push_str("\\u003E"),
                    '&' => out.push_str("\\u0026"),
                    '=' => out.push_str("\\u003D"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c => out.push(c),
                }
            }
            out
        }
        _ => {
            let mut out = String::new();
            for b in text.bytes() {
                match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        out.push(b as char)
                    }
                    b' ' => out.push('+'),
                    b => {
                        let _ = write!(out, "%{b:02X}");
                    }
                }
            }
            out
        }
    }
}

fn call_json(a: &Args) -> Result<Value, String> {
    a.want(1)?;
    let j = a.args[0].to_json();
    let mut text = serde_json::to_string(&j).map_err(|e| e.to_string())?;
    if matches!(a.args[0], Value::Object(_, Kind::Context(_))) {
        // Go's json.Marshal of a formatter context escapes HTML characters.
        text = text
            .replace('<', "\\u003c")
            .replace('>', "\\u003e")
            .replace('&', "\\u0026");
    }
    Ok(Value::Str(text))
}

/// Docker's `split` and `join`.
fn call_split_join(a: &Args) -> Result<Value, String> {
    a.want(2)?;
    if a.name == "split" {
        let (x, sep) = (a.s(0)?, a.s(1)?);
        return Ok(if sep.is_empty() {
            Value::List(x.chars().map(|c| Value::Str(c.to_string())).collect())
        } else {
            Value::List(x.split(sep.as_str()).map(|p| Value::Str(p.to_string())).collect())
        });
    }
    let list = match &a.args[0] {
        Value::List(l) => l,
        other => {
            return Err(format!(
                "wrong type for value; expected []string; got {}",
                other.type_name()
            ))
        }
    };
    let mut parts = Vec::new();
    for v in list {
        match v {
            Value::Str(x) => parts.push(x.clone()),
            other => {
                return Err(format!(
                    "wrong type for value; expected []string; got []{}",
                    other.type_name()
                ))
            }
        }
    }
    Ok(Value::Str(parts.join(&a.s(1)?)))
}

/// Docker's `title`, `lower`, `upper`, `pad` and `truncate`.
fn call_text(a: &Args) -> Result<Value, String> {
    Ok(Value::Str(match a.name {
        "title" => {
            a.want(1)?;
            let mut out = String::new();
            let mut prev_letter = false;
            for c in a.s(0)?.chars() {
                if !prev_letter && c.is_alphabetic() {
                    out.extend(c.to_uppercase());
                } else {
                    out.push(c);
                }
                prev_letter = c.is_alphanumeric() || c == '_' || c == '\'';
            }
            out
        }
        "lower" => {
            a.want(1)?;
            a.s(0)?.to_lowercase()
        }
        "upper" => {
            a.want(1)?;
            a.s(0)?.to_uppercase()
        }
        "pad" => {
            a.want(3)?;
            let x = a.s(0)?;
            if x.is_empty() {
                x
            } else {
                let (p, q) = (a.int(1)?.max(0) as usize, a.int(2)?.max(0) as usize);
                format!("{}{x}{}", " ".repeat(p), " ".repeat(q))
            }
        }
        _ => {
            a.want(2)?;
            let x = a.s(0)?;
            let n = a.int(1)?.max(0) as usize;
            if x.len() < n {
                x
            } else {
                String::from_utf8_lossy(&x.as_bytes()[..n]).into_owned()
            }
        }
    }))
}

fn compare(a: &Value, b: &Value) -> Result<std::cmp::Ordering, String> {
    use std::cmp::Ordering;
    Ok(match (a, b) {
        (Value::Int(x), Value::Int(y)) => x.cmp(y),
        (Value::Int(x), Value::Float(y)) => (*x as f64).partial_cmp(y).unwrap_or(Ordering::Equal),
        (Value::Float(x), Value::Int(y)) => x.partial_cmp(&(*y as f64)).unwrap_or(Ordering::Equal),
        (Value::Float(x), Value::Float(y)) => x.partial_cmp(y).unwrap_or(Ordering::Equal),
        (Value::Str(x), Value::Str(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Nil | Value::Missing, Value::Nil | Value::Missing) => Ordering::Equal,
        _ => return Err("incompatible types for comparison".into()),
    })
}

/// Go's `fmt.Sprint`: spaces only between operands when neither is a string.
fn go_sprint(args: &[Value]) -> String {
    let mut out = String::new();
    for (i, a) in args.iter().enumerate() {
        if i > 0 && !matches!(a, Value::Str(_)) && !matches!(args[i - 1], Value::Str(_)) {
            out.push(' ');
        }
        a.write_text(&mut out);
    }
    out
}

/// Go's `fmt.Sprintf` for the verbs templates use: `%v %s %d %q %t %f %x %X %%` with flags
/// `-`, `0`, `+`, width and precision.
fn sprintf(fmt: &str, args: &[Value]) -> String {
    let mut out = String::new();
    let mut it = fmt.chars().peekable();
    let mut n = 0;
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let (mut left, mut zero, mut plus) = (false, false, false);
        while let Some(&f) = it.peek() {
            match f {
                '-' => left = true,
                '0' => zero = true,
                '+' => plus = true,
                ' ' | '#' => {}
                _ => break,
            }
            it.next();
        }
        let mut width = String::new();
        while let Some(&d) = it.peek().filter(|d| d.is_ascii_digit()) {
            width.push(d);
            it.next();
        }
        let mut prec: Option<usize> = None;
        if it.peek() == Some(&'.') {
            it.next();
            let mut p = String::new();
            while let Some(&d) = it.peek().filter(|d| d.is_ascii_digit()) {
                p.push(d);
                it.next();
            }
            prec = Some(p.parse().unwrap_or(0));
        }
        let Some(verb) = it.next() else {
            out.push_str("%!(NOVERB)");
            break;
        };
        if verb == '%' {
            out.push('%');
            continue;
        }
        let Some(arg) = args.get(n) else {
            let _ = write!(out, "%!{verb}(MISSING)");
            continue;
        };
        n += 1;
        let body = match (verb, arg) {
            ('d', Value::Int(i)) => {
                if plus && *i >= 0 {
                    format!("+{i}")
                } else {
                    i.to_string()
                }
            }
            ('x', Value::Int(i)) => format!("{i:x}"),
            ('X', Value::Int(i)) => format!("{i:X}"),
            ('x', Value::Str(s)) => s.bytes().map(|b| format!("{b:02x}")).collect(),
            ('f' | 'F', Value::Float(f)) => format!("{f:.*}", prec.unwrap_or(6)),
            ('f' | 'F', Value::Int(i)) => format!("%!f(int={i})"),
            ('q', Value::Str(s)) => serde_json::to_string(s).unwrap_or_default(),
            ('t', Value::Bool(b)) => b.to_string(),
            ('s' | 'v', v) => {
                let t = v.to_text();
                match prec {
                    Some(p) if verb == 's' => t.chars().take(p).collect(),
                    _ => t,
                }
            }
            (v, a) => format!("%!{v}({}={})", a.type_name(), a.to_text()),
        };
        let w: usize = width.parse().unwrap_or(0);
        let len = body.chars().count();
        if len >= w {
            out.push_str(&body);
        } else if left {
            out.push_str(&body);
            out.push_str(&" ".repeat(w - len));
        } else if zero && matches!(arg, Value::Int(_) | Value::Float(_)) {
            let (sign, digits) = match body.strip_prefix('-') {
                Some(d) => ("-", d.to_string()),
                None => ("", body.clone()),
            };
            out.push_str(sign);
            out.push_str(&"0".repeat(w - len));
            out.push_str(&digits);
        } else {
            out.push_str(&" ".repeat(w - len));
            out.push_str(&body);
        }
    }
    if n < args.len() {
        out.push_str("%!(EXTRA ");
        out.push_str(
            &args[n..]
                .iter()
                .map(|a| format!("{}={}", a.type_name(), a.to_text()))
                .collect::<Vec<_>>()
                .join(", "),
        );
        out.push(')');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Value {
        let j = serde_json::json!({
            "Id": "7b670eb0b282382153036538869979b54935b4b6640179e8e45d6dad2aad217f",
            "Name": "/ctr-ref1",
            "State": {"Status": "running", "Running": true, "Pid": 27869, "ExitCode": 0, "Health": null},
            "Config": {"Env": ["FOO=bar"], "Cmd": ["sleep", "300"], "Labels": {"a": "b"}},
            "HostConfig": {"PortBindings": {}, "Memory": 0},
            "Mounts": [],
        });
        Value::from_json(&j, &|k| matches!(k, "Labels" | "PortBindings"))
    }

    fn run(t: &str) -> Result<String, TemplateError> {
        Template::parse(t)?.execute(&data())
    }

    /// Outputs recorded from `docker inspect -f` (Docker 20.10) on a container made with
    /// `docker run -d --name ctr-ref1 --label a=b -e FOO=bar busybox:local sleep 300`.
    #[test]
    fn matches_docker_outputs() {
        let cases = [
            ("{{.Config.Labels}}", "map[a:b]"),
            ("{{.Config.Env}}", "[FOO=bar]"),
            ("{{.Config.Cmd}}", "[sleep 300]"),
            ("{{join .Config.Cmd \",\"}}", "sleep,300"),
            ("{{.State.Pid}}", "27869"),
            ("{{.HostConfig.Memory}}", "0"),
            ("{{.State.Health}}", "<nil>"),
            ("{{range $k, $v := .Config.Labels}}{{$k}}={{$v}};{{end}}", "a=b;"),
            ("{{len .Config.Env}}", "1"),
            ("{{index .Config.Env 0}}", "FOO=bar"),
            (
                "{{printf \"%s|%5d|%-6s|%q\" .Name .State.ExitCode \"ab\" .Name}}",
                "/ctr-ref1|    0|ab    |\"/ctr-ref1\"",
            ),
            (
                "{{title \"hello world\"}} {{lower \"ABC\"}} {{pad \"x\" 2 3}}| {{truncate \"abcdef\" 3}} {{split \"a,b\" \",\"}}",
                "Hello World abc   x   | abc [a b]",
            ),
            (
                "{{json .State.Running}} {{json .Config.Labels}} {{json .Config.Cmd}}",
                "true {\"a\":\"b\"} [\"sleep\",\"300\"]",
            ),
            ("{{with .Config.Labels}}{{.a}}{{end}}", "b"),
            ("{{if eq .State.Status \"running\"}}R{{end}}", "R"),
            ("{{.HostConfig.PortBindings}}", "map[]"),
            ("{{.Mounts}}", "[]"),
            ("{{json .Mounts}}", "[]"),
            ("{{index .Config.Labels \"zz\"}}", ""),
            ("{{.Config.Labels.zz}}", "<no value>"),
            ("{{println \"a\" \"b\"}}", "a b\n"),
            ("{{print \"a\" \"b\" 1 2}}", "ab1 2"),
            ("{{\"<&>\" | json}}", "\"<&>\""),
            ("{{.State.Running | not}}", "false"),
            ("{{and .State.Running \"x\"}} {{or \"\" \"y\"}}", "x y"),
            ("{{- \" a \" -}}", " a "),
            ("{{.Config.Labels.a | upper}}", "B"),
            ("{{range .Config.Cmd}}{{.}} {{else}}none{{end}}", "sleep 300 "),
            ("{{slice .Id 0 5}}", "7b670"),
            ("{{html \"<a>\"}} {{js \"a'b\"}} {{urlquery \"a b\"}}", "&lt;a&gt; a\\'b a+b"),
        ];
        for (t, want) in cases {
            assert_eq!(run(t).unwrap_or_else(|e| panic!("{t}: {e}")), want, "{t}");
        }
    }

    #[test]
    fn errors_match_docker() {
        assert_eq!(
            run("{{.Nope}}").unwrap_err().to_string(),
            "template: :1:2: executing \"\" at <.Nope>: map has no entry for key \"Nope\""
        );
        assert_eq!(
            run("{{.Config.Labels}} {{.Config.Nope}}")
                .unwrap_err()
                .to_string(),
            "template: :1:28: executing \"\" at <.Config.Nope>: map has no entry for key \"Nope\""
        );
        assert_eq!(
            Template::parse("{{foo}}").unwrap_err().to_string(),
            "template: :1: function \"foo\" not defined"
        );
        assert_eq!(
            Template::parse("{{.Id").unwrap_err().to_string(),
            "template: :1: unclosed action"
        );
    }

    #[test]
    fn control_flow() {
        assert_eq!(
            run("{{if .State.Health}}h{{else if .State.Running}}r{{else}}n{{end}}").unwrap(),
            "r"
        );
        assert_eq!(
            run("{{range $i, $c := .Config.Cmd}}{{if $i}},{{end}}{{$c}}{{end}}").unwrap(),
            "sleep,300"
        );
        assert_eq!(
            run("{{range .Config.Cmd}}{{if eq . \"300\"}}{{break}}{{end}}{{.}}{{end}}").unwrap(),
            "sleep"
        );
        assert_eq!(run("{{$x := .Name}}{{$x = \"y\"}}{{$x}}").unwrap(), "y");
        assert_eq!(run("{{(index .Config.Cmd 1) | printf \"%s!\"}}").unwrap(), "300!");
        assert_eq!(run("a {{/* comment */}} b\n  {{- \"c\"}}").unwrap(), "a  bc");
        assert_eq!(run("{{with $.State}}{{.Status}}{{end}}").unwrap(), "running");
        assert_eq!(
            run("{{printf \"%05d|%.2f|%v|%t\" 42 1.5 .Config.Cmd true}}").unwrap(),
            "00042|1.50|[sleep 300]|true"
        );
        assert_eq!(
            run("{{eq .State.Pid 27869}} {{lt 1 2}} {{ne \"a\" \"b\"}}").unwrap(),
            "true true true"
        );
    }

    #[test]
    fn header_mode_passes_names_through() {
        let t = Template::parse("{{upper .Name}}\t{{json .Labels}}").unwrap();
        let head = Value::context(
            "*formatter.T",
            vec![
                ("Name", Value::Str("NAMES".into())),
                ("Labels", Value::Str("LABELS".into())),
            ],
        );
        assert_eq!(t.execute_header(&head).unwrap(), "NAMES\tLABELS");
    }
}
