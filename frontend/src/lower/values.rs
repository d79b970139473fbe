//! Parsing and formatting of instruction values: `--chown`, `--chmod`, ports, signals,
//! durations, paths, and the Go-style formatting BuildKit uses in history `created_by` strings.

use std::collections::BTreeMap;

use kiln_dag::{Chmod, IdSpec, Owner};

/// Default `PATH` for Linux containers.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Go's `%q` of a string: double-quoted with Go escapes.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            '\x0b' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `%q` of an integer: the single-quoted character literal of that code point
/// (`'\x02'` for 2, `'A'` for 65), which is what BuildKit's history shows for
/// `HEALTHCHECK --retries`. Code points Go considers unprintable are escaped; the printability
/// test covers ASCII and Latin-1 exactly and treats every other valid code point as printable.
pub fn go_quote_int(n: i64) -> String {
    let c = u32::try_from(n)
        .ok()
        .and_then(char::from_u32)
        .unwrap_or('\u{fffd}');
    let body = match c {
        '\'' => "\\'".to_string(),
        '\\' => "\\\\".to_string(),
        '\x07' => "\\a".to_string(),
        '\x08' => "\\b".to_string(),
        '\x0c' => "\\f".to_string(),
        '\n' => "\\n".to_string(),
        '\r' => "\\r".to_string(),
        '\t' => "\\t".to_string(),
        '\x0b' => "\\v".to_string(),
        c if (c as u32) < 0x20 || c as u32 == 0x7f => format!("\\x{:02x}", c as u32),
        c if (0x80..0xa0).contains(&(c as u32)) || c as u32 == 0xad => {
            format!("\\u{:04x}", c as u32)
        }
        c => c.to_string(),
    };
    format!("'{body}'")
}

/// Go's `%q` of a `[]string`: `["a" "b"]`.
pub fn go_quote_list(items: &[String]) -> String {
    let parts: Vec<String> = items.iter().map(|s| go_quote(s)).collect();
    format!("[{}]", parts.join(" "))
}

/// Go's `%v` of a `[]string`: `[a b]`.
pub fn go_list(items: &[String]) -> String {
    format!("[{}]", items.join(" "))
}

/// Go's `time.Duration.String()` for a nanosecond count.
pub fn go_duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    let neg = ns < 0;
    let u = ns.unsigned_abs();
    let body = if u < 1_000_000_000 {
        let (unit, div) = if u < 1_000 {
            ("ns", 1)
        } else if u < 1_000_000 {
            ("µs", 1_000)
        } else {
            ("ms", 1_000_000)
        };
        format!("{}{}", frac(u, div), unit)
    } else {
        let total_s = u / 1_000_000_000;
        let sub = u % 1_000_000_000;
        let h = total_s / 3600;
        let m = (total_s % 3600) / 60;
        let s = total_s % 60;
        let secs = frac(s * 1_000_000_000 + sub, 1_000_000_000);
        let mut out = String::new();
        if h > 0 {
            out.push_str(&format!("{h}h{m}m"));
        } else if m > 0 {
            out.push_str(&format!("{m}m"));
        }
        out.push_str(&secs);
        out.push('s');
        out
    };
    if neg {
        format!("-{body}")
    } else {
        body
    }
}

fn frac(v: u64, div: u64) -> String {
    let whole = v / div;
    let rest = v % div;
    if rest == 0 {
        return whole.to_string();
    }
    let width = div.to_string().len() - 1;
    let digits = format!("{rest:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// Parses a Go duration (`1h30m`, `5s`, `1.5ms`, `0`) into nanoseconds.
pub fn parse_go_duration(s: &str) -> Option<i64> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * mult;
    }
    if total > i64::MAX as f64 {
        return None;
    }
    let ns = total.round() as i64;
    Some(if neg { -ns } else { ns })
}

fn id_spec(s: &str) -> IdSpec {
    match s.parse::<u32>() {
        Ok(n) => IdSpec::Id(n),
        Err(_) => IdSpec::Name(s.to_string()),
    }
}

/// Parses `user[:group]` (names or numeric ids). `Err` carries the reason.
pub fn parse_owner(s: &str) -> Result<Owner, String> {
    let (user, group) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    if user.is_empty() {
        return Err("the user part is empty".into());
    }
    if group.is_some_and(str::is_empty) {
        return Err("the group part is empty".into());
    }
    if group.is_some_and(|g| g.contains(':')) {
        return Err("expected user[:group]".into());
    }
    Ok(Owner {
        user: id_spec(user),
        group: group.map(id_spec),
    })
}

/// Parses `--chmod`: octal (`755`, `0644`, at most 0o7777) or a symbolic list (`u+x,go-w`).
pub fn parse_chmod(s: &str) -> Option<Chmod> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let m = u32::from_str_radix(s, 8).ok()?;
        return (m <= 0o7777).then_some(Chmod::Octal(m));
    }
    let valid_clause = |c: &str| {
        let who_len = c.find(|ch: char| !"ugoa".contains(ch)).unwrap_or(c.len());
        let mut rest = &c[who_len..];
        if rest.is_empty() {
            return false;
        }
        while !rest.is_empty() {
            let Some(op) = rest.chars().next() else {
                return false;
            };
            if !"+-=".contains(op) {
                return false;
            }
            rest = &rest[1..];
            let perm_len = rest
                .find(|ch: char| !"rwxXstugo".contains(ch))
                .unwrap_or(rest.len());
            rest = &rest[perm_len..];
        }
        true
    };
    (!s.is_empty() && s.split(',').all(valid_clause)).then(|| Chmod::Symbolic(s.to_string()))
}

/// Expands one EXPOSE spec (`80`, `80/udp`, `8000-8002/tcp`, `127.0.0.1:80:80`) into `port/proto` keys.
pub fn parse_ports(spec: &str) -> Result<Vec<String>, String> {
    let (rest, proto) = match spec.rsplit_once('/') {
        Some((r, p)) => (r, p.to_ascii_lowercase()),
        None => (spec, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid protocol `{proto}`"));
    }
    // ip:hostPort:containerPort — only the container port is exposed.
    let container = rest.rsplit(':').next().unwrap_or(rest);
    if container.is_empty() {
        return Err("no port number".into());
    }
    let (lo, hi) = match container.split_once('-') {
        Some((a, b)) => (a, b),
        None => (container, container),
    };
    let lo: u16 = lo.parse().map_err(|_| format!("invalid port number `{lo}`"))?;
    let hi: u16 = hi.parse().map_err(|_| format!("invalid port number `{hi}`"))?;
    if hi < lo {
        return Err(format!("invalid port range `{container}`"));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

/// Go's `%v` of a `map[string]struct{}`: `map[80/tcp:{} 443/udp:{}]`, keys sorted.
pub fn go_set(keys: &BTreeMap<String, ()>) -> String {
    let parts: Vec<String> = keys.keys().map(|k| format!("{k}:{{}}")).collect();
    format!("map[{}]", parts.join(" "))
}

const SIGNALS: &[&str] = &[
    "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL", "PIPE",
    "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP", "TSTP", "TTIN", "TTOU",
    "UNUSED", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ",
];

/// Whether `s` names a signal as Docker accepts it: a number, or a name with or without `SIG`.
pub fn valid_signal(s: &str) -> bool {
    if let Ok(n) = s.parse::<u32>() {
        return n > 0 && n <= 64;
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if SIGNALS.contains(&name) {
        return true;
    }
    for base in ["RTMIN", "RTMAX"] {
        if name == base {
            return true;
        }
        if let Some(off) = name.strip_prefix(base) {
            let n = off.strip_prefix('+').or_else(|| off.strip_prefix('-'));
            if n.is_some_and(|n| n.parse::<u8>().is_ok_and(|v| v <= 15)) {
                return true;
            }
        }
    }
    false
}

/// Lexically cleans an absolute path (Go's `path.Clean`): no `.`/`..`/double slashes.
pub fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for comp in p.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Go's `path.Clean`: the shortest equivalent path, relative paths staying relative (`./a/`
/// is `a`, `a/../..` is `..`, the empty path is `.`).
pub fn go_clean(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for comp in p.split('/') {
        match comp {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            c => parts.push(c),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// Resolves `p` against the working directory `dir`, keeping a trailing `/` (or a trailing
/// `/.`, `.`, empty) as a trailing `/`.
pub fn resolve_dest(dir: &str, p: &str) -> String {
    let keep_slash = p.is_empty() || p == "." || p.ends_with('/') || p.ends_with("/.");
    let joined = if p.starts_with('/') {
        clean_path(p)
    } else {
        clean_path(&format!("{dir}/{p}"))
    };
    if keep_slash && joined != "/" {
        format!("{joined}/")
    } else {
        joined
    }
}

/// Whether a COPY source contains glob metacharacters.
pub fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Whether an ADD source is fetched over HTTP(S).
pub fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// Whether an ADD source is a Git repository (`git@`, `git://`, `ssh://`, or an https URL ending
/// in `.git`, optionally with a `#ref:subdir` fragment).
pub fn is_git(s: &str) -> bool {
    let base = s.split('#').next().unwrap_or(s);
    s.starts_with("git@")
        || s.starts_with("git://")
        || s.starts_with("ssh://")
        || (is_url(s) && (base.ends_with(".git") || base.ends_with(".git/")))
}

/// Splits a Git source into remote, ref and subdir (`remote#ref:subdir`).
pub fn split_git(s: &str) -> (String, String, String) {
    match s.split_once('#') {
        Some((remote, frag)) => {
            let (r, sub) = frag.split_once(':').unwrap_or((frag, ""));
            (remote.to_string(), r.to_string(), sub.to_string())
        }
        None => (s.to_string(), String::new(), String::new()),
    }
}

/// The file name BuildKit gives a downloaded URL: the last path segment, or `index.html`.
pub fn url_filename(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or(url);
    let after_scheme = no_query.split_once("://").map(|(_, r)| r).unwrap_or(no_query);
    let path = after_scheme.split_once('/').map(|(_, p)| p).unwrap_or("");
    match path.rsplit('/').next() {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => "index.html".to_string(),
    }
}

/// Strips leading tabs from every line (`<<-EOF` heredocs).
pub fn chomp_tabs(s: &str) -> String {
    s.split_inclusive('\n')
        .map(|l| l.trim_start_matches('\t'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_clean_is_gos_path_clean() {
        for (p, want) in [
            ("", "."),
            ("./logs/", "logs"),
            ("a/../..", ".."),
            ("../a/./b", "../a/b"),
            ("/../x/", "/x"),
            ("secret.txt", "secret.txt"),
            ("/", "/"),
        ] {
            assert_eq!(go_clean(p), want, "{p}");
        }
    }

    #[test]
    fn durations_round_trip_like_go() {
        assert_eq!(parse_go_duration("5s"), Some(5_000_000_000));
        assert_eq!(parse_go_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_go_duration("1.5ms"), Some(1_500_000));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("x"), None);
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(5_000_000_000), "5s");
        assert_eq!(go_duration(90_000_000_000), "1m30s");
        assert_eq!(go_duration(3_600_000_000_000), "1h0m0s");
        assert_eq!(go_duration(1_500_000), "1.5ms");
        assert_eq!(go_duration(1_500_000_000), "1.5s");
    }

    #[test]
    fn owners_and_modes() {
        assert_eq!(parse_owner("1000:1000").unwrap().to_string(), "1000:1000");
        assert_eq!(
            parse_owner("app").unwrap(),
            Owner {
                user: IdSpec::Name("app".into()),
                group: None
            }
        );
        assert!(parse_owner(":x").is_err());
        assert!(parse_owner("a:").is_err());
        assert_eq!(parse_chmod("0755"), Some(Chmod::Octal(0o755)));
        assert_eq!(parse_chmod("640"), Some(Chmod::Octal(0o640)));
        assert_eq!(parse_chmod("u+x,g-w"), Some(Chmod::Symbolic("u+x,g-w".into())));
        assert_eq!(parse_chmod("999"), None);
        assert_eq!(parse_chmod("u!x"), None);
        assert_eq!(parse_chmod("17777"), None);
    }

    #[test]
    fn ports() {
        assert_eq!(parse_ports("80").unwrap(), vec!["80/tcp"]);
        assert_eq!(parse_ports("443/UDP").unwrap(), vec!["443/udp"]);
        assert_eq!(
            parse_ports("8000-8002").unwrap(),
            vec!["8000/tcp", "8001/tcp", "8002/tcp"]
        );
        assert_eq!(parse_ports("127.0.0.1:80:8080").unwrap(), vec!["8080/tcp"]);
        assert!(parse_ports("http").is_err());
        assert!(parse_ports("80/foo").is_err());
    }

    #[test]
    fn go_formats() {
        assert_eq!(go_quote_int(2), "'\\x02'");
        assert_eq!(go_quote_int(0), "'\\x00'");
        assert_eq!(go_quote_int(10), "'\\n'");
        assert_eq!(go_quote_int(65), "'A'");
        assert_eq!(go_quote_int(39), "'\\''");
        assert_eq!(go_quote_int(0x85), "'\\u0085'");
        assert_eq!(go_quote_int(-1), "'\u{fffd}'");
        assert_eq!(go_quote_list(&["cat".into(), "/a b".into()]), r#"["cat" "/a b"]"#);
        assert_eq!(go_quote("a\"b\\"), r#""a\"b\\""#);
        let mut m = BTreeMap::new();
        m.insert("80/tcp".to_string(), ());
        m.insert("443/udp".to_string(), ());
        assert_eq!(go_set(&m), "map[443/udp:{} 80/tcp:{}]");
    }

    #[test]
    fn paths() {
        assert_eq!(resolve_dest("/a/b", "c"), "/a/b/c");
        assert_eq!(resolve_dest("/a/b", "."), "/a/b/");
        assert_eq!(resolve_dest("/a", "rel/"), "/a/rel/");
        assert_eq!(resolve_dest("/", "/x/../y/"), "/y/");
        assert_eq!(resolve_dest("/", "."), "/");
        assert_eq!(clean_path("/a//b/./c/.."), "/a/b");
    }

    #[test]
    fn signals_and_sources() {
        assert!(valid_signal("SIGTERM"));
        assert!(valid_signal("kill"));
        assert!(valid_signal("9"));
        assert!(valid_signal("SIGRTMIN+3"));
        assert!(!valid_signal("SIGFOO"));
        assert!(is_git("https://github.com/a/b.git#main:dir"));
        assert!(!is_git("https://example.com/x.tar.gz"));
        assert_eq!(url_filename("https://example.com/d/x.tar.gz?y=1"), "x.tar.gz");
        assert_eq!(url_filename("https://example.com"), "index.html");
        assert_eq!(chomp_tabs("\t\ta\n\tb\n"), "a\nb\n");
    }
}
