//! The two unit syntaxes Docker users type in flags and filters, parsed once for every command:
//! sizes as `docker/go-units` `RAMInBytes` reads them (`--memory`, `--shm-size`, `--keep-storage`,
//! `tmpfs` sizes) and durations as Go's `time.ParseDuration` does (`--health-interval`,
//! `--filter until=`); and `--ulimit` values as `docker/go-units` `ParseUlimit` reads them.

use std::time::Duration;

/// A size or duration that does not parse; the text says what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("invalid size: '{0}'")]
    Size(String),
    #[error("time: invalid duration \"{0}\"")]
    Duration(String),
    #[error("invalid ulimit argument: {0}")]
    UlimitArgument(String),
    #[error("invalid ulimit type: {0}")]
    UlimitType(String),
    #[error("invalid ulimit value `{value}` in `{arg}`: expected an integer or `infinity`")]
    UlimitValue { arg: String, value: String },
    #[error("too many limit value arguments - {0}, can only have up to two, `soft[:hard]`")]
    UlimitTooMany(String),
    #[error("ulimit soft limit must be less than or equal to hard limit: {0}")]
    UlimitOrder(String),
}

/// The resource names `--ulimit` takes (go-units' table; `as` is left out there too).
pub const ULIMIT_NAMES: [&str; 15] = [
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

/// `ParseUlimit`: `NAME=SOFT[:HARD]`, a name of [`ULIMIT_NAMES`], integers or `infinity` (`-1`,
/// unlimited); the hard limit defaults to the soft one and may not be below it.
pub fn parse_ulimit(arg: &str) -> Result<crate::Ulimit, UnitError> {
    let (name, values) = arg
        .split_once('=')
        .ok_or_else(|| UnitError::UlimitArgument(arg.to_string()))?;
    if !ULIMIT_NAMES.contains(&name) {
        return Err(UnitError::UlimitType(name.to_string()));
    }
    let value = |v: &str| -> Result<i64, UnitError> {
        if v == "infinity" {
            return Ok(-1);
        }
        v.parse::<i64>().map_err(|_| UnitError::UlimitValue {
            arg: arg.to_string(),
            value: v.to_string(),
        })
    };
    let parts: Vec<&str> = values.split(':').collect();
    let (soft, hard) = match parts.as_slice() {
        [soft] => (value(soft)?, value(soft)?),
        [soft, hard] => (value(soft)?, value(hard)?),
        _ => return Err(UnitError::UlimitTooMany(values.to_string())),
    };
    if hard != -1 {
        if soft == -1 {
            return Err(UnitError::UlimitOrder(format!(
                "soft: -1 (unlimited), hard: {hard}"
            )));
        }
        if soft > hard {
            return Err(UnitError::UlimitOrder(format!("{soft} > {hard}")));
        }
    }
    Ok(crate::Ulimit {
        name: name.to_string(),
        soft,
        hard,
    })
}

/// `RAMInBytes`: a decimal number, an optional space, an optional binary unit `k m g t p` (any
/// case), then an optional `i` and an optional `b`: `1024`, `64m`, `1.5g`, `64MiB`, `10 GB`.
pub fn ram_in_bytes(s: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::Size(s.to_string());
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, rest) = s.split_at(end);
    // `\d+(\.\d+)*`: digits first, never a bare or trailing dot.
    if num.is_empty() || num.split('.').any(str::is_empty) {
        return Err(bad());
    }
    let mut rest = rest.strip_prefix(' ').unwrap_or(rest).chars().peekable();
    let mult: u64 = match rest.peek().map(char::to_ascii_lowercase) {
        Some('k') => 1 << 10,
        Some('m') => 1 << 20,
        Some('g') => 1 << 30,
        Some('t') => 1 << 40,
        Some('p') => 1 << 50,
        _ => 1,
    };
    if mult > 1 {
        rest.next();
    }
    if rest.peek().is_some_and(|c| c.eq_ignore_ascii_case(&'i')) {
        rest.next();
    }
    if rest.peek().is_some_and(|c| c.eq_ignore_ascii_case(&'b')) {
        rest.next();
    }
    if rest.next().is_some() {
        return Err(bad());
    }
    // Go parses the number as a float (so `1.2.3` is an error there too).
    let n: f64 = num.parse().map_err(|_| bad())?;
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Go's `time.ParseDuration` for the non-negative durations flags take: a sequence of decimal
/// numbers, each with a unit `ns us µs ms s m h` (`300ms`, `1.5h`, `2h45m`), or `0`.
pub fn go_duration(s: &str) -> Result<Duration, UnitError> {
    let bad = || UnitError::Duration(s.to_string());
    let body = s.strip_prefix('+').unwrap_or(s);
    if body == "0" {
        return Ok(Duration::ZERO);
    }
    if body.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    let mut rest = body;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(n);
        if num.is_empty() || num == "." {
            return Err(bad());
        }
        let value: f64 = format!("0{num}").parse().map_err(|_| bad())?;
        let u = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let secs = match &after[..u] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * secs;
        rest = &after[u..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulimits_as_go_units_reads_them() {
        let u = |n: &str, soft, hard| crate::Ulimit {
            name: n.into(),
            soft,
            hard,
        };
        assert_eq!(parse_ulimit("nofile=1024"), Ok(u("nofile", 1024, 1024)));
        assert_eq!(parse_ulimit("nofile=1000:2000"), Ok(u("nofile", 1000, 2000)));
        assert_eq!(parse_ulimit("core=0:-1"), Ok(u("core", 0, -1)));
        assert_eq!(parse_ulimit("stack=infinity"), Ok(u("stack", -1, -1)));
        for (bad, msg) in [
            ("nofile", "invalid ulimit argument: nofile"),
            ("files=1", "invalid ulimit type: files"),
            ("as=1", "invalid ulimit type: as"),
            ("nofile=x", "invalid ulimit value `x` in `nofile=x`"),
            ("nofile=1:2:3", "too many limit value arguments - 1:2:3"),
            (
                "nofile=3:2",
                "ulimit soft limit must be less than or equal to hard limit: 3 > 2",
            ),
            ("nofile=-1:2", "soft: -1 (unlimited), hard: 2"),
        ] {
            let e = parse_ulimit(bad).unwrap_err().to_string();
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_as_ram_in_bytes_reads_them() {
        for (s, want) in [
            ("1024", 1024),
            ("64m", 64 << 20),
            ("64M", 64 << 20),
            ("1.5g", 3 << 29),
            ("64MiB", 64 << 20),
            ("64mb", 64 << 20),
            ("10 GB", 10 << 30),
            ("1.5k", 1536),
            ("2b", 2),
            ("1P", 1 << 50),
        ] {
            assert_eq!(ram_in_bytes(s), Ok(want), "{s}");
        }
        for s in [
            "",
            "lots",
            "-1",
            "1x",
            "1.",
            ".5",
            "1..2",
            "1kk",
            "1  m",
            "1mbb",
            "1e400",
            "99999999999999999999p",
        ] {
            assert!(ram_in_bytes(s).is_err(), "{s}");
        }
    }

    #[test]
    fn durations_as_go_parses_them() {
        for (s, want) in [
            ("0", Duration::ZERO),
            ("24h", Duration::from_secs(86_400)),
            ("2h30m", Duration::from_secs(9_000)),
            ("1.5h", Duration::from_secs(5_400)),
            ("500ms", Duration::from_millis(500)),
            ("1m30s", Duration::from_secs(90)),
            ("10us", Duration::from_micros(10)),
            ("+5s", Duration::from_secs(5)),
            (".5s", Duration::from_millis(500)),
        ] {
            assert_eq!(go_duration(s), Ok(want), "{s}");
        }
        for s in ["", "10", "10 days", "1d", "-5s", "s", ".s", "1e400h", "h1"] {
            assert!(go_duration(s).is_err(), "{s}");
        }
    }
}
