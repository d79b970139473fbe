//! `--format` of the listing commands (`ps`, `images`, `history`, `volume ls`, `system df`) and
//! `inspect -f`, as Docker's CLI formatter does it: `table [TEMPLATE]` prints a header made with
//! the template from the column names, then one row per item, aligned by Go's tabwriter
//! (minimum width 10, padding 3); `json` is `{{json .}}`; any other text is a template run per
//! item, each followed by a newline. `\t` and `\n` written as two characters become a tab and a
//! newline, as in Docker.

use std::io::{self, Write};
use std::process::ExitCode;

use kiln_containers::{ContainerState, Status};

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

// Sizes, ages and tables as Docker's CLI prints them.

/// Docker's `units.HumanSizeWithPrecision(size, 3)`: decimal units, 3 significant digits.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 9] = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{}", UNITS[i])
}

/// Docker's `units.HumanDuration` + " ago".
pub fn human_ago(created: Option<&str>) -> String {
    let Some(t) = created
        .and_then(|c| time::OffsetDateTime::parse(c, &time::format_description::well_known::Rfc3339).ok())
    else {
        return "N/A".to_string();
    };
    let secs = (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    let (m, h) = (secs / 60, secs / 3600);
    let d = match () {
        _ if secs < 1 => "Less than a second".to_string(),
        _ if secs == 1 => "1 second".to_string(),
        _ if secs < 60 => format!("{secs} seconds"),
        _ if m == 1 => "About a minute".to_string(),
        _ if m < 60 => format!("{m} minutes"),
        _ if h == 1 => "About an hour".to_string(),
        _ if h < 48 => format!("{h} hours"),
        _ if h < 24 * 7 * 2 => format!("{} days", h / 24),
        _ if h < 24 * 30 * 2 => format!("{} weeks", h / 24 / 7),
        _ if h < 24 * 365 * 2 => format!("{} months", h / 24 / 30),
        _ => format!("{} years", h / 24 / 365),
    };
    format!("{d} ago")
}

/// Docker's `units.HumanDuration(time.Since(t))` + " ago", for a system time.
pub fn since(t: Option<std::time::SystemTime>) -> String {
    match t {
        Some(t) => {
            let t: time::OffsetDateTime = t.into();
            let s = t
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            human_ago(Some(&s))
        }
        None => String::new(),
    }
}

/// Writes `lines` (cells separated by `\t`) as Go's `tabwriter.NewWriter(w, 1, 8, 1, '\t', 0)`
/// does: every column padded with tabs to the same multiple of 8. Empty lines end a block of
/// aligned lines.
pub fn write_tabbed(out: &mut impl Write, lines: &[String]) -> io::Result<()> {
    for block in lines
        .split(|l| l.is_empty())
        .collect::<Vec<_>>()
        .iter()
        .enumerate()
    {
        let (i, block) = block;
        if i > 0 {
            writeln!(out)?;
        }
        let rows: Vec<Vec<&str>> = block.iter().map(|l| l.split('\t').collect()).collect();
        let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut widths = vec![0usize; cols];
        for r in &rows {
            // The last cell of a line is not part of a column.
            for (c, cell) in r.iter().enumerate().take(r.len().saturating_sub(1)) {
                widths[c] = widths[c].max(cell.chars().count() + 1);
            }
        }
        for r in &rows {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                line.push_str(cell);
                if c + 1 < r.len() {
                    let cellw = widths[c].div_ceil(8) * 8;
                    let n = cellw - cell.chars().count();
                    line.push_str(&"\t".repeat(n.div_ceil(8)));
                }
            }
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

/// Docker's `units.HumanSize` (4 significant digits): `Total reclaimed space`, `system df`,
/// `builder du`.
pub fn human_size4(bytes: u64) -> String {
    human_size_prec(bytes, 4)
}

/// `units.HumanSizeWithPrecision(size, prec)`: decimal units, `prec` significant digits, as Go's
/// `%.*g` prints them.
pub fn human_size_prec(bytes: u64, prec: usize) -> String {
    const UNITS: [&str; 9] = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    let digits = if v < 1.0 {
        1
    } else {
        v.log10().floor() as usize + 1
    };
    let s = format!("{v:.*}", prec.saturating_sub(digits));
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{}", UNITS[i])
}

/// Prints rows as docker/cli's table formatter does (`tabwriter.NewWriter(w, 10, 1, 3, ' ', 0)`):
/// columns padded to their widest cell plus 3 spaces, and at least 10 wide.
pub fn print_docker_table(out: &mut impl Write, rows: &[Vec<String>]) -> io::Result<()> {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut widths = vec![10; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count() + 3);
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            line.push_str(c);
            if i + 1 < r.len() {
                line.push_str(&" ".repeat(widths[i] - c.chars().count()));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

pub fn ellipsis(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// Docker's `HumanDuration` (as in "Up 3 seconds").
pub fn human_duration(since: &str) -> String {
    let ago = human_ago(Some(since));
    ago.strip_suffix(" ago").unwrap_or(&ago).to_string()
}

/// The STATUS column of `ps`.
pub fn status_text(st: &ContainerState) -> String {
    match st.status {
        Status::Created => "Created".into(),
        Status::Running => {
            let health = match st.health.as_ref().map(|h| h.status) {
                None => String::new(),
                Some(kiln_containers::state::HealthStatus::Starting) => " (health: starting)".into(),
                Some(h) => format!(" ({})", h.as_str()),
            };
            format!("Up {}{health}", human_duration(&st.started_at))
        }
        Status::Restarting => format!(
            "Restarting ({}) {}",
            st.exit_code,
            human_ago(Some(&st.finished_at))
        ),
        Status::Exited => format!("Exited ({}) {}", st.exit_code, human_ago(Some(&st.finished_at))),
        Status::Dead => "Dead".into(),
    }
}

/// Docker's `CreatedAt` form: `2006-01-02 15:04:05 -0700 MST` (UTC here).
pub fn docker_time(rfc3339: &str) -> String {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| {
            t.to_offset(time::UtcOffset::UTC)
                .format(time::macros::format_description!(
                    "[year]-[month]-[day] [hour]:[minute]:[second] +0000 UTC"
                ))
                .ok()
        })
        .unwrap_or_default()
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

    #[test]
    fn sizes_like_docker() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(1234), "1.23kB");
        assert_eq!(human_size(4_870_000), "4.87MB");
        assert_eq!(human_size(12_300_000), "12.3MB");
        assert_eq!(human_size(100_000_000), "100MB");
    }

    #[test]
    fn sizes_like_docker_units_human_size() {
        assert_eq!(human_size4(0), "0B");
        assert_eq!(human_size4(999), "999B");
        assert_eq!(human_size4(1234), "1.234kB");
        assert_eq!(human_size4(1_234_567), "1.235MB");
        assert_eq!(human_size4(12_300_000), "12.3MB");
        assert_eq!(human_size4(100_000_000), "100MB");
        assert_eq!(human_size4(3_400_000_000), "3.4GB");
    }

    #[test]
    fn tabbed_like_go_tabwriter() {
        let mut out = Vec::new();
        let lines = vec![
            "ID	RECLAIMABLE	SIZE	LAST ACCESSED".to_string(),
            format!("{:<40}	{:<5}	{:<10}	{}", "abc", "true", "1.5MB", "2 hours ago"),
        ];
        write_tabbed(&mut out, &lines).unwrap();
        let text = String::from_utf8(out).unwrap();
        let want = format!(
            "ID						RECLAIMABLE	SIZE		LAST ACCESSED
{:<40}	true 		1.5MB     	2 hours ago
",
            "abc"
        );
        assert_eq!(text, want);
        let mut out = Vec::new();
        write_tabbed(&mut out, &["Reclaimable:	1B".into(), "Total:	1B".into()]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Reclaimable:	1B
Total:		1B
"
        );
    }

    #[test]
    fn ellipsis_truncates() {
        assert_eq!(ellipsis("abc", 45), "abc");
        assert_eq!(ellipsis(&"x".repeat(50), 45).chars().count(), 45);
    }
}
