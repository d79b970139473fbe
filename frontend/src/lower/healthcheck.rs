//! HEALTHCHECK: the typed instruction into the config's health check, and its history line.

use kiln_dag::image::HealthConfig;

use super::dispatch::Lowerer;
use super::error::{FrontendError, LowerError};
use super::state::{Progress, StageState};
use super::values;
use crate::instructions::{CommandLine, Healthcheck, Located};
use crate::lint;

impl Lowerer<'_> {
    /// HEALTHCHECK.
    pub(super) fn dispatch_healthcheck(
        &mut self,
        st: &mut StageState,
        p: &mut Progress,
        loc: &Located,
        h: &Healthcheck,
    ) -> Result<(), FrontendError> {
        if let Some(prev) = p.healthcheck_at {
            self.warn(
                &lint::MULTIPLE_INSTRUCTIONS_DISALLOWED,
                "Multiple HEALTHCHECK instructions should not be used in the same stage because only the last one will be used".into(),
                prev,
            );
        }
        p.healthcheck_at = Some(loc.span);
        let hc = health_config(h).map_err(|e| match e {
            HealthError::EmptyCommand => self.err(
                loc,
                None,
                LowerError::EmptyCommand {
                    instruction: "HEALTHCHECK".into(),
                },
            ),
            HealthError::Bad { flag, value, reason } => self.err(
                loc,
                Some(&format!("--{flag}")),
                LowerError::BadHealthcheck {
                    flag: flag.into(),
                    value,
                    reason: reason.into(),
                },
            ),
        })?;
        let msg = history_text(&hc);
        st.config.config.healthcheck = Some(hc);
        st.history(msg, false);
        Ok(())
    }
}

/// Why a HEALTHCHECK has no config.
#[derive(Debug, PartialEq, Eq)]
enum HealthError {
    /// `HEALTHCHECK CMD []`.
    EmptyCommand,
    /// A flag's value: the flag (without `--`), the value and the reason.
    Bad {
        flag: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// The config's health check for a HEALTHCHECK: durations in nanoseconds (0 = unset).
fn health_config(h: &Healthcheck) -> Result<HealthConfig, HealthError> {
    let Healthcheck::Cmd {
        cmd,
        interval,
        timeout,
        start_period,
        start_interval,
        retries,
    } = h
    else {
        return Ok(HealthConfig {
            test: vec!["NONE".into()],
            ..HealthConfig::default()
        });
    };
    let test = match cmd {
        CommandLine::Shell(t) => vec!["CMD-SHELL".to_string(), t.clone()],
        CommandLine::Exec(a) if a.is_empty() => return Err(HealthError::EmptyCommand),
        CommandLine::Exec(a) => {
            let mut v = vec!["CMD".to_string()];
            v.extend(a.iter().cloned());
            v
        }
    };
    let retries = match retries {
        Some(r) => {
            let bad = |reason| HealthError::Bad {
                flag: "retries",
                value: r.clone(),
                reason,
            };
            let n: i64 = r.parse().map_err(|_| bad("not an integer"))?;
            if n < 0 {
                return Err(bad("cannot be negative"));
            }
            n
        }
        None => 0,
    };
    Ok(HealthConfig {
        test,
        interval: duration("interval", interval)?,
        timeout: duration("timeout", timeout)?,
        start_period: duration("start-period", start_period)?,
        start_interval: duration("start-interval", start_interval)?,
        retries,
    })
}

/// A duration flag in nanoseconds: a Go duration of at least 1ms, or 0.
fn duration(flag: &'static str, v: &Option<String>) -> Result<i64, HealthError> {
    let Some(v) = v else { return Ok(0) };
    let bad = |reason| HealthError::Bad {
        flag,
        value: v.clone(),
        reason,
    };
    let ns = values::parse_go_duration(v).ok_or_else(|| bad("not a duration (like 30s or 1m30s)"))?;
    if ns != 0 && ns < 1_000_000 {
        return Err(bad("cannot be less than 1ms"));
    }
    Ok(ns)
}

/// The history line of a HEALTHCHECK. BuildKit formats the config pointer with `%q`:
/// `&{[...] "5s" ... '\x02'}`. The reference (Docker 20.10's) has no start interval field; the
/// one newer BuildKit prints after the start period is shown only when `--start-interval` is
/// given.
fn history_text(hc: &HealthConfig) -> String {
    let start_interval = match hc.start_interval {
        0 => String::new(),
        d => format!("{} ", values::go_quote(&values::go_duration(d))),
    };
    format!(
        "HEALTHCHECK &{{{} {} {} {} {}{}}}",
        values::go_quote_list(&hc.test),
        values::go_quote(&values::go_duration(hc.interval)),
        values::go_quote(&values::go_duration(hc.timeout)),
        values::go_quote(&values::go_duration(hc.start_period)),
        start_interval,
        values::go_quote_int(hc.retries)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(flags: [Option<&str>; 5]) -> Healthcheck {
        let [interval, timeout, start_period, start_interval, retries] = flags.map(|f| f.map(str::to_string));
        Healthcheck::Cmd {
            cmd: CommandLine::Shell("curl -f localhost".into()),
            interval,
            timeout,
            start_period,
            start_interval,
            retries,
        }
    }

    #[test]
    fn durations_are_nanoseconds_and_unset_is_zero() {
        let hc = health_config(&cmd([Some("1m30s"), Some("5s"), None, Some("0s"), Some("3")])).unwrap();
        assert_eq!(hc.test, ["CMD-SHELL", "curl -f localhost"]);
        assert_eq!(hc.interval, 90_000_000_000);
        assert_eq!(hc.timeout, 5_000_000_000);
        assert_eq!((hc.start_period, hc.start_interval, hc.retries), (0, 0, 3));
        // Without --start-interval the history has BuildKit 20.10's four durations...
        assert_eq!(
            history_text(&hc),
            r#"HEALTHCHECK &{["CMD-SHELL" "curl -f localhost"] "1m30s" "5s" "0s" '\x03'}"#
        );
        // ...and with one, the fifth after the start period.
        let hc = health_config(&cmd([None, None, None, Some("2s"), None])).unwrap();
        assert_eq!(
            history_text(&hc),
            r#"HEALTHCHECK &{["CMD-SHELL" "curl -f localhost"] "0s" "0s" "0s" "2s" '\x00'}"#
        );
    }

    #[test]
    fn bad_flags_name_the_flag_and_the_reason() {
        let err = |flags| health_config(&cmd(flags)).unwrap_err();
        assert_eq!(
            err([None, Some("500us"), None, None, None]),
            HealthError::Bad {
                flag: "timeout",
                value: "500us".into(),
                reason: "cannot be less than 1ms"
            }
        );
        assert_eq!(
            err([Some("soon"), None, None, None, None]),
            HealthError::Bad {
                flag: "interval",
                value: "soon".into(),
                reason: "not a duration (like 30s or 1m30s)"
            }
        );
        assert_eq!(
            err([None, None, None, None, Some("-1")]),
            HealthError::Bad {
                flag: "retries",
                value: "-1".into(),
                reason: "cannot be negative"
            }
        );
        let empty = Healthcheck::Cmd {
            cmd: CommandLine::Exec(Vec::new()),
            interval: None,
            timeout: None,
            start_period: None,
            start_interval: None,
            retries: None,
        };
        assert_eq!(health_config(&empty), Err(HealthError::EmptyCommand));
        assert_eq!(health_config(&Healthcheck::None).unwrap().test, ["NONE"]);
    }
}
