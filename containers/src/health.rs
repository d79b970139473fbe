//! `HEALTHCHECK`: the supervisor probes a running container as Docker's daemon does. Every
//! `interval` the test runs in the container (`CMD` exec form, `CMD-SHELL` through `/bin/sh -c`),
//! killed after `timeout`; exit 0 makes the container healthy and resets the failing streak, a
//! failure outside the start period adds to it and `retries` in a row make it unhealthy. The
//! last 5 results (output cut to 4 KiB) are `State.Health.Log`.

use std::io::Read as _;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_dag::image::HealthConfig;

use crate::record::{ContainerRecord, Containers};
use crate::state::{Health, HealthLog, HealthStatus};

/// Docker's defaults and limits.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_RETRIES: u32 = 3;
const MAX_LOG_ENTRIES: usize = 5;
const MAX_OUTPUT: usize = 4096;

/// A health check to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The argv.
    pub argv: Vec<String>,
    /// Time between probes.
    pub interval: Duration,
    /// Time a probe may take.
    pub timeout: Duration,
    /// Failures within this time after the start do not count.
    pub start_period: Duration,
    /// Failures in a row that make the container unhealthy.
    pub retries: u32,
}

fn dur(nanos: i64, default: Duration) -> Duration {
    if nanos > 0 {
        Duration::from_nanos(nanos as u64)
    } else {
        default
    }
}

/// The probe a container's config asks for; `None` without a test or with `NONE`.
pub fn probe_of(cfg: Option<&HealthConfig>) -> Option<Probe> {
    let cfg = cfg?;
    let argv = match cfg.test.split_first() {
        Some((kind, rest)) if kind == "CMD" && !rest.is_empty() => rest.to_vec(),
        Some((kind, rest)) if kind == "CMD-SHELL" && !rest.is_empty() => {
            vec!["/bin/sh".into(), "-c".into(), rest.join(" ")]
        }
        _ => return None,
    };
    Some(Probe {
        argv,
        interval: dur(cfg.interval, DEFAULT_INTERVAL),
        timeout: dur(cfg.timeout, DEFAULT_TIMEOUT),
        start_period: dur(cfg.start_period, Duration::ZERO),
        retries: if cfg.retries > 0 {
            cfg.retries as u32
        } else {
            DEFAULT_RETRIES
        },
    })
}

/// RFC 3339 with nanoseconds, as Docker writes probe times.
fn now_nanos() -> String {
    let t = time::OffsetDateTime::now_utc();
    let base = t
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default();
    format!("{}.{:09}Z", base.trim_end_matches('Z'), t.nanosecond())
}

/// Runs one probe in the container whose pid 1 is `pid`.
fn run_probe(record: &ContainerRecord, pid: i32, probe: &Probe) -> HealthLog {
    let start = now_nanos();
    let failed = |msg: String| HealthLog {
        start: start.clone(),
        end: now_nanos(),
        exit_code: -1,
        output: msg,
    };
    let (r, w): (OwnedFd, OwnedFd) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return failed(format!("failed to create a pipe for the health check: {e}")),
    };
    let w2 = match w.try_clone() {
        Ok(f) => f,
        Err(e) => return failed(format!("failed to create a pipe for the health check: {e}")),
    };
    // The probe joins the container as `exec` does: under the container's seccomp policy.
    let seccomp = match kiln_runtime::seccomp::parse_security_opts(&record.host.security_opt) {
        Ok(s) => s.seccomp,
        Err(e) => return failed(format!("the container's seccomp options: {e}")),
    };
    let spec = kiln_runtime::exec::ExecSpec {
        pid,
        seccomp,
        args: probe.argv.clone(),
        env: crate::lifecycle::container_env(record.config.env.as_deref().unwrap_or_default(), &[]),
        cwd: record.config.working_dir.clone(),
        user: record.config.user.clone(),
        privileged: record.host.privileged,
        controlling_tty: false,
        stdin: None,
        stdout: w,
        stderr: w2,
    };
    let running = match kiln_runtime::exec::exec(spec) {
        Ok(r) => r,
        Err(e) => {
            let msg =
                crate::messages::docker_exec_message(&e).unwrap_or_else(|| crate::messages::error_chain(&e));
            return failed(msg);
        }
    };
    let probe_pid = running.pid();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(running.wait());
    });
    let (exit_code, timed_out) = match rx.recv_timeout(probe.timeout) {
        Ok(Ok(st)) => (
            match (st.code, st.signal) {
                (Some(c), _) => c,
                (None, Some(s)) => 128 + s,
                (None, None) => -1,
            },
            false,
        ),
        Ok(Err(_)) => (-1, false),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(probe_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = rx.recv_timeout(Duration::from_secs(5));
            (-1, true)
        }
    };
    // What the probe wrote, without waiting for writers it left behind.
    let mut output = Vec::new();
    let _ = nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK));
    let mut f = std::fs::File::from(r);
    let mut buf = [0u8; 4096];
    while let Ok(n) = f.read(&mut buf) {
        if n == 0 || output.len() >= MAX_OUTPUT {
            break;
        }
        output.extend_from_slice(&buf[..n]);
    }
    output.truncate(MAX_OUTPUT);
    let output = if timed_out {
        format!("Health check exceeded timeout ({}s)", probe.timeout.as_secs_f64())
    } else {
        String::from_utf8_lossy(&output).into_owned()
    };
    HealthLog {
        start,
        end: now_nanos(),
        exit_code,
        output,
    }
}

/// Applies one probe result to the health state (moby's `handleProbeResult`).
pub fn record_result(h: &mut Health, result: HealthLog, probe: &Probe, in_start_period: bool) {
    if result.exit_code == 0 {
        h.failing_streak = 0;
        h.status = HealthStatus::Healthy;
    } else if !in_start_period {
        h.failing_streak += 1;
        if h.failing_streak >= probe.retries {
            h.status = HealthStatus::Unhealthy;
        }
    }
    h.log.push(result);
    if h.log.len() > MAX_LOG_ENTRIES {
        let extra = h.log.len() - MAX_LOG_ENTRIES;
        h.log.drain(..extra);
    }
}

/// Probes container `record` (pid 1 `pid`) until `stop` is set, recording results in its
/// state. Runs on a thread of the supervisor.
pub fn spawn(
    containers: Containers,
    record: ContainerRecord,
    pid: i32,
    probe: Probe,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let started = Instant::now();
        loop {
            let next = Instant::now() + probe.interval;
            while Instant::now() < next {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep((next - Instant::now()).min(Duration::from_millis(20)));
            }
            let result = run_probe(&record, pid, &probe);
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let in_start = started.elapsed() < probe.start_period;
            let _ = containers.update_state(&record.id, |st| {
                if st.pid != pid {
                    return;
                }
                let h = st.health.get_or_insert_with(Health::default);
                record_result(h, result, &probe, in_start);
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_from_configs() {
        let cfg = |test: &[&str]| HealthConfig {
            test: test.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(probe_of(Some(&cfg(&["NONE"]))), None);
        assert_eq!(probe_of(None), None);
        let p = probe_of(Some(&cfg(&["CMD-SHELL", "curl -f localhost"]))).unwrap();
        assert_eq!(p.argv, ["/bin/sh", "-c", "curl -f localhost"]);
        assert_eq!(
            (p.interval, p.timeout, p.retries),
            (DEFAULT_INTERVAL, DEFAULT_TIMEOUT, 3)
        );
        assert_eq!(probe_of(Some(&cfg(&["CMD", "true"]))).unwrap().argv, ["true"]);
    }

    #[test]
    fn streaks_and_log_like_docker() {
        let probe = probe_of(Some(&HealthConfig {
            test: vec!["CMD".into(), "true".into()],
            retries: 2,
            ..Default::default()
        }))
        .unwrap();
        let log = |code| HealthLog {
            exit_code: code,
            ..Default::default()
        };
        let mut h = Health::default();
        record_result(&mut h, log(1), &probe, true);
        assert_eq!((h.status, h.failing_streak), (HealthStatus::Starting, 0));
        record_result(&mut h, log(1), &probe, false);
        assert_eq!((h.status, h.failing_streak), (HealthStatus::Starting, 1));
        record_result(&mut h, log(1), &probe, false);
        assert_eq!((h.status, h.failing_streak), (HealthStatus::Unhealthy, 2));
        for _ in 0..4 {
            record_result(&mut h, log(0), &probe, false);
        }
        assert_eq!(
            (h.status, h.failing_streak, h.log.len()),
            (HealthStatus::Healthy, 0, 5)
        );
    }
}
