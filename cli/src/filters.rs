//! `-f/--filter key=value` of `ps`, `images`, `volume ls` and `image prune`, with Docker's
//! rules: values of one key are alternatives (any may match), different keys must all match; a
//! key the command does not know, or a value it cannot take, is Docker's `Invalid filter` error.

use std::collections::BTreeMap;

/// A filter the command refuses (Docker's messages).
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// Not `name=value`.
    #[error("bad format of filter (expected name=value)")]
    Format(String),
    /// A key the command does not know, or a value it cannot take.
    #[error("Invalid filter '{0}'")]
    Invalid(String),
    /// `until=` that is neither a time nor a duration.
    #[error("failed to parse value as time or duration: {0:?}")]
    Until(String),
}

/// Parsed `--filter` arguments.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    map: BTreeMap<String, Vec<String>>,
}

impl Filters {
    /// Parses `key=value` arguments, refusing keys not in `allowed`.
    pub fn parse(args: &[String], allowed: &[&str]) -> Result<Filters, FilterError> {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for a in args {
            let Some((k, v)) = a.split_once('=') else {
                return Err(FilterError::Format(a.clone()));
            };
            let k = k.trim().to_ascii_lowercase();
            if !allowed.contains(&k.as_str()) {
                return Err(FilterError::Invalid(k));
            }
            map.entry(k).or_default().push(v.trim().to_string());
        }
        Ok(Filters { map })
    }

    /// The values given for `key`.
    pub fn get(&self, key: &str) -> &[String] {
        self.map.get(key).map(Vec::as_slice).unwrap_or_default()
    }

    /// Whether `key` was given.
    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// True when `key` was not given, or `f` holds for one of its values.
    pub fn any(&self, key: &str, mut f: impl FnMut(&str) -> bool) -> bool {
        match self.map.get(key) {
            None => true,
            Some(vs) => vs.iter().any(|v| f(v)),
        }
    }

    /// Checks that every value of `key` is one of `values` (Docker's `Invalid filter 'k=v'`).
    pub fn check_values(&self, key: &str, values: &[&str]) -> Result<(), FilterError> {
        for v in self.get(key) {
            if !values.contains(&v.as_str()) {
                return Err(FilterError::Invalid(format!("{key}={v}")));
            }
        }
        Ok(())
    }

    /// A boolean filter (`dangling=true|false|1|0`): `None` when not given.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, FilterError> {
        let mut out = None;
        for v in self.get(key) {
            let b = match v.to_ascii_lowercase().as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(FilterError::Invalid(format!("{key}=[{v}]"))),
            };
            out = Some(b);
        }
        Ok(out)
    }

    /// Every `label=` (and `label!=`-style negated under `neg_key`) filter holds for `labels`.
    pub fn labels_match(&self, labels: &BTreeMap<String, String>) -> bool {
        self.get("label").iter().all(|l| label_matches(labels, l))
            && self.get("label!").iter().all(|l| !label_matches(labels, l))
    }
}

/// `key` or `key=value` against a label set.
pub fn label_matches(labels: &BTreeMap<String, String>, filter: &str) -> bool {
    match filter.split_once('=') {
        Some((k, v)) => labels.get(k).is_some_and(|x| x == v),
        None => labels.contains_key(filter),
    }
}

/// Go's `path.Match` of the patterns `*`, `?` and `[...]` (`*` does not cross `/`).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => {
                let rest = &p[1..];
                for i in 0..=n.len() {
                    if go(rest, &n[i..]) {
                        return true;
                    }
                    if i < n.len() && n[i] == '/' {
                        break;
                    }
                }
                false
            }
            Some('?') => !n.is_empty() && n[0] != '/' && go(&p[1..], &n[1..]),
            Some('[') => {
                let Some(end) = p.iter().position(|c| *c == ']') else {
                    return false;
                };
                let Some(&c) = n.first() else { return false };
                let class = &p[1..end];
                let (neg, class) = match class.first() {
                    Some('^') | Some('!') => (true, &class[1..]),
                    _ => (false, class),
                };
                let mut hit = false;
                let mut i = 0;
                while i < class.len() {
                    if i + 2 < class.len() && class[i + 1] == '-' {
                        hit |= class[i] <= c && c <= class[i + 2];
                        i += 3;
                    } else {
                        hit |= class[i] == c;
                        i += 1;
                    }
                }
                hit != neg && go(&p[end + 1..], &n[1..])
            }
            Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && go(&p[2..], &n[1..]),
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// `until=`: an RFC 3339 time, a Unix timestamp, or a Go duration before now (`10m`, `1h30m`);
/// the cut-off in seconds since the epoch.
pub fn until_cutoff(value: &str) -> Result<i64, FilterError> {
    let bad = || FilterError::Until(value.to_string());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Some(d) = go_duration(value) {
        return Ok(now - d);
    }
    if let Ok(t) = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339) {
        return Ok(t.unix_timestamp());
    }
    if let Ok(secs) = value.split('.').next().unwrap_or("").parse::<i64>() {
        return Ok(secs);
    }
    // `2006-01-02` and `2006-01-02T15:04:05` in UTC.
    let fmt_day = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(d) = time::Date::parse(value, fmt_day) {
        return Ok(d.midnight().assume_utc().unix_timestamp());
    }
    let fmt_dt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    if let Ok(d) = time::PrimitiveDateTime::parse(value, fmt_dt) {
        return Ok(d.assume_utc().unix_timestamp());
    }
    Err(bad())
}

/// A Go duration (`1h30m`, `90s`, `10m`) in whole seconds.
pub fn go_duration(s: &str) -> Option<i64> {
    kiln_dag::units::go_duration(s).ok().map(|d| d.as_secs() as i64)
}

/// Seconds since the epoch of an RFC 3339 time (0 when it does not parse).
pub fn unix_time(rfc3339: Option<&str>) -> i64 {
    rfc3339
        .and_then(|c| time::OffsetDateTime::parse(c, &time::format_description::well_known::Rfc3339).ok())
        .map(|t| t.unix_timestamp())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_like_docker() {
        let f = Filters::parse(
            &["name=a".into(), "name=b".into(), "label=x=1".into()],
            &["name", "label"],
        )
        .unwrap();
        assert_eq!(f.get("name"), ["a", "b"]);
        assert_eq!(f.get("label"), ["x=1"]);
        assert_eq!(
            Filters::parse(&["foo=bar".into()], &["name"])
                .unwrap_err()
                .to_string(),
            "Invalid filter 'foo'"
        );
        let f = Filters::parse(&["dangling=maybe".into()], &["dangling"]).unwrap();
        assert_eq!(
            f.bool("dangling").unwrap_err().to_string(),
            "Invalid filter 'dangling=[maybe]'"
        );
        assert!(Filters::parse(&["nokey".into()], &["name"]).is_err());
    }

    #[test]
    fn globs_like_go_path_match() {
        assert!(glob_match("busybox*", "busybox"));
        assert!(glob_match("busy*:loc?l", "busybox:local"));
        assert!(!glob_match("*", "a/b"));
        assert!(glob_match("*/b", "a/b"));
        assert!(glob_match("[a-c]x", "bx"));
    }

    #[test]
    fn durations() {
        assert_eq!(go_duration("1h30m"), Some(5400));
        assert_eq!(go_duration("10s"), Some(10));
        assert_eq!(go_duration("xyz"), None);
        assert!(until_cutoff("xyz").is_err());
        assert_eq!(until_cutoff("2020-01-01T00:00:00Z").unwrap(), 1_577_836_800);
    }
}
