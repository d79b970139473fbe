//! BuildKit's option lists (`-o`, `--cache-to`, `--cache-from`): one CSV record of `key=value`
//! fields as buildx reads it (Go's encoding/csv), keys trimmed and lowercased, `type=` apart from
//! the rest. Each flag checks the keys of its own types; the splitting is this one.

/// Why a value is not an option list.
#[derive(Debug)]
pub(crate) enum OptionsError {
    /// The value is not one CSV record (the CSV reader's reason).
    Csv(String),
    /// A field has no `=`.
    NotKeyValue(String),
}

/// An option list: its `type=` (if any) and the other pairs in order, keys lowercased, keys and
/// values trimmed.
pub(crate) struct Options {
    pub kind: Option<String>,
    pub pairs: Vec<(String, String)>,
}

/// Splits `spec` into its `type=` and its other `key=value` pairs.
pub(crate) fn parse(spec: &str) -> Result<Options, OptionsError> {
    let mut out = Options {
        kind: None,
        pairs: Vec::new(),
    };
    for field in csv_fields(spec)? {
        let (k, v) = field
            .split_once('=')
            .ok_or_else(|| OptionsError::NotKeyValue(field.clone()))?;
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
        if k == "type" {
            out.kind = Some(v);
        } else {
            out.pairs.push((k, v));
        }
    }
    Ok(out)
}

/// Splits one CSV record as Go's encoding/csv (and buildx) read it: quotes group commas
/// (`"name=a,b"`), `""` inside quotes is a quote.
fn csv_fields(spec: &str) -> Result<Vec<String>, OptionsError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(spec.as_bytes());
    let mut record = csv::StringRecord::new();
    match reader.read_record(&mut record) {
        Ok(true) => Ok(record.iter().map(str::to_string).collect()),
        Ok(false) => Ok(Vec::new()),
        Err(e) => Err(OptionsError::Csv(e.to_string())),
    }
}

/// Go's `strconv.ParseBool`, which BuildKit uses for its boolean options.
pub(crate) fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn quoted_fields_keep_their_commas_and_type_stands_apart() {
        let o = parse(r#" Type = registry ,"name=a,b", push=true"#).unwrap();
        assert_eq!(o.kind.as_deref(), Some("registry"));
        assert_eq!(
            o.pairs,
            [
                ("name".to_string(), "a,b".to_string()),
                ("push".to_string(), "true".to_string())
            ]
        );
        assert!(matches!(parse("type=local,dest"), Err(OptionsError::NotKeyValue(f)) if f == "dest"));
    }
}
