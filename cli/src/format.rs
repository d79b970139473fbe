//! `--format` of the listing commands (`ps`, `images`, `history`, `volume ls`, `system df`) and
//! `inspect -f`, as Docker's CLI formatter does it: `table [TEMPLATE]` prints a header made with
//! the template from the column names, then one row per item, aligned by Go's tabwriter
//! (minimum width 10, padding 3); `json` is `{{json .}}`; any other text is a template run per
//! item, each followed by a newline. `\t` and `\n` written as two characters become a tab and a
//! newline, as in Docker.

use std::io::Write as _;
use std::process::ExitCode;

use crate::gotemplate::{Kind, Template, TemplateError, Value};

/// Docker's exit code for a template that does not parse.
pub const EXIT_BAD_TEMPLATE: u8 = 64;

/// A `--format` that failed.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The template does not parse.
    #[error("failed to parse template: {0}")]
    Parse(#[source] TemplateError),
    /// Executing it failed.
    #[error("failed to execute template: {0}")]
    Exec(#[source] TemplateError),
    /// `inspect -f`'s template does not parse (exit 64).
    #[error("template parsing error: {0}")]
    InspectParse(#[source] TemplateError),
    /// `inspect -f`'s template failed.
    #[error("template parsing error: {0}")]
    InspectExec(#[source] TemplateError),
    /// Writing the output failed.
    #[error("failed to write the output")]
    Write(#[source] std::io::Error),
}

impl FormatError {
    /// Docker's exit code for the failure.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            FormatError::InspectParse(_) => ExitCode::from(EXIT_BAD_TEMPLATE),
            _ => ExitCode::from(1),
        }
    }
}

/// A listing: its default table and the header name of every field.
pub struct Listing<'a> {
    /// `--format` as given (empty: the default table).
    pub format: &'a str,
    /// The default, `table ...` template.
    pub default_table: &'a str,
    /// Field name -> header text (`ID` -> `CONTAINER ID`).
    pub headers: &'a [(&'a str, &'a str)],
}

impl Listing<'_> {
    /// Formats `rows`; the text to print.
    pub fn render(&self, rows: &[Value]) -> Result<String, FormatError> {
        let format = match self.format.trim() {
            "" | "table" => self.default_table,
            "json" => "{{json .}}",
            f => f,
        };
        let (table, body) = match format.strip_prefix("table") {
            Some(rest) => (true, rest.trim_matches(' ')),
            None => (false, format),
        };
        let body = body.replace("\\t", "\t").replace("\\n", "\n");
        let tmpl = Template::parse(&body).map_err(FormatError::Parse)?;
        let mut out = String::new();
        for r in rows {
            out.push_str(&tmpl.execute(r).map_err(FormatError::Exec)?);
            out.push('\n');
        }
        if !table {
            return Ok(out);
        }
        let head = Value::Object(
            self.headers
                .iter()
                .map(|(k, v)| (k.to_string(), Value::Str(v.to_string())))
                .collect(),
            Kind::Map,
        );
        // Docker ignores errors of the header (a method given arguments, say): what was made
        // before the error is the header.
        let header = tmpl.execute_header(&head).unwrap_or_default();
        Ok(tabwrite(&format!("{header}\n{out}")))
    }

    /// Renders `rows` to standard output; a failure is printed as Docker prints it.
    pub fn print(&self, rows: &[Value]) -> anyhow::Result<ExitCode> {
        match self.render(rows) {
            Ok(text) => {
                std::io::stdout()
                    .lock()
                    .write_all(text.as_bytes())
                    .map_err(FormatError::Write)?;
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(e.exit_code())
            }
        }
    }
}

/// `inspect -f`: the template run on each object, each followed by a newline. Stops at the
/// first object the template fails on: the text made until then, and the error.
pub fn inspect(format: &str, objects: &[Value]) -> (String, Option<FormatError>) {
    let tmpl = match Template::parse(format) {
        Ok(t) => t,
        Err(e) => return (String::new(), Some(FormatError::InspectParse(e))),
    };
    let mut out = String::new();
    for o in objects {
        match tmpl.execute(o) {
            Ok(text) => {
                out.push_str(&text);
                out.push('\n');
            }
            Err(e) => return (out, Some(FormatError::InspectExec(e))),
        }
    }
    (out, None)
}

/// The keys of Docker's inspect objects whose values are Go maps (a missing key is
/// `<no value>`, not an error; printed as `map[..]`).
pub fn is_go_map(key: &str) -> bool {
    matches!(
        key,
        "Labels"
            | "Ports"
            | "PortBindings"
            | "Networks"
            | "ExposedPorts"
            | "Volumes"
            | "Options"
            | "Data"
            | "Sysctls"
            | "StorageOpt"
            | "DriverOpts"
            | "Annotations"
            | "Status"
    )
}

/// Go's `text/tabwriter` as Docker's formatter sets it up (`minwidth 10, tabwidth 1, padding 3,
/// padchar ' '`): tab-terminated cells are padded to their column's width within each block of
/// consecutive lines that have that column; text after the last tab is not padded.
pub fn tabwrite(text: &str) -> String {
    tabwrite_min(text, 10)
}

/// [`tabwrite`] with another minimum cell width (`top` uses 20).
pub fn tabwrite_min(text: &str, min_width: usize) -> String {
    const PADDING: usize = 3;
    let lines: Vec<Vec<&str>> = text.split('\n').map(|l| l.split('\t').collect()).collect();
    // widths[line][col] for every terminated cell.
    let mut widths: Vec<Vec<usize>> = lines.iter().map(|l| vec![0; l.len().saturating_sub(1)]).collect();
    let max_cols = widths.iter().map(Vec::len).max().unwrap_or(0);
    for col in 0..max_cols {
        let mut i = 0;
        while i < lines.len() {
            if widths[i].len() <= col {
                i += 1;
                continue;
            }
            let start = i;
            let mut w = 0;
            while i < lines.len() && widths[i].len() > col {
                w = w.max(lines[i][col].chars().count() + PADDING);
                i += 1;
            }
            let w = w.max(min_width);
            for row in widths.iter_mut().take(i).skip(start) {
                row[col] = w;
            }
        }
    }
    let mut out = String::new();
    for (n, (cells, ws)) in lines.iter().zip(&widths).enumerate() {
        if n > 0 {
            out.push('\n');
        }
        for (j, c) in cells.iter().enumerate() {
            out.push_str(c);
            if let Some(w) = ws.get(j) {
                out.push_str(&" ".repeat(w.saturating_sub(c.chars().count())));
            }
        }
    }
    out
}

/// A row context of Go type `type_name` with string fields (Docker's formatter contexts give
/// every field as a string).
pub fn row(type_name: &'static str, fields: Vec<(&str, String)>) -> Value {
    Value::context(
        type_name,
        fields.into_iter().map(|(k, v)| (k, Value::Str(v))).collect(),
    )
}

/// Docker's `Labels` column: `k=v` joined with commas, sorted by key.
pub fn labels_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A `Label` method of a row context: the value of one label (empty if unset).
pub fn label_method(labels: std::collections::BTreeMap<String, String>) -> Value {
    Value::Method(std::rc::Rc::new(move |args: &[Value]| match args {
        [Value::Str(k)] => Ok(Value::Str(labels.get(k).cloned().unwrap_or_default())),
        _ => Err("wrong number of args for Label: want 1".to_string()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tabwriter_like_go() {
        // Docker's `docker ps --format 'table {{.Names}}\t{{.Status}}'` layout.
        assert_eq!(
            tabwrite("NAMES\tSTATUS\nctr-ref1\tUp About a minute\n"),
            "NAMES      STATUS\nctr-ref1   Up About a minute\n"
        );
        assert_eq!(
            tabwrite("REPOSITORY:TAG\tSIZE\nbusybox:local\t1.98MB\n"),
            "REPOSITORY:TAG   SIZE\nbusybox:local    1.98MB\n"
        );
    }

    #[test]
    fn listing_forms() {
        let rows = vec![row(
            "*formatter.T",
            vec![("Name", "a<b".into()), ("Size", "1B".into())],
        )];
        let l = |f| Listing {
            format: f,
            default_table: "table {{.Name}}\t{{.Size}}",
            headers: &[("Name", "NAME"), ("Size", "SIZE")],
        };
        assert_eq!(l("").render(&rows).unwrap(), "NAME      SIZE\na<b       1B\n");
        assert_eq!(l("{{.Name}}:{{.Size}}").render(&rows).unwrap(), "a<b:1B\n");
        assert_eq!(
            l("table {{.Size}}\\t{{.Name}}").render(&rows).unwrap(),
            "SIZE      NAME\n1B        a<b\n"
        );
        assert_eq!(
            l("json").render(&rows).unwrap(),
            "{\"Name\":\"a\\u003cb\",\"Size\":\"1B\"}\n"
        );
        assert!(matches!(l("{{nope}}").render(&rows), Err(FormatError::Parse(_))));
    }
}
