//! Build progress display, like BuildKit's: numbered steps with timings, `CACHED` marks, and
//! RUN output shown live in plain mode and, in tty mode, only for the step that failed.
//!
//! Modes (`--progress`):
//!
//! | mode | output (all on stderr) |
//! | --- | --- |
//! | `plain` | `#N [stage 2/5] RUN …`, `#N 0.123 output line`, `#N transferring context: 42B done`, `#N CACHED`, `#N DONE 0.4s`, `#N ERROR: …`, `#N CANCELED` |
//! | `tty` | a `[+] Building 1.2s (3/7)` header, one spinner line per step (indicatif), a running step's last output lines under it (removed when it ends); the failed step's output after the build |
//! | `quiet` | only the failed step's output (`-q`) |
//! | `rawjson` | one BuildKit `SolveStatus` JSON object per event, as buildx's `--progress=rawjson` |
//! | `auto` | `tty` when stderr is a terminal, else `plain` |
//!
//! With `debug`, plain and tty also say why each step missed the cache.
//!
//! Use: `let display = progress::start(mode, debug);` inside the tokio runtime, pass
//! `display.sink()` to the solver, then `display.finish(error).await` once the solve returned.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{IsTerminal, Write};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_dag::Digest;
use kiln_solver::progress::{self, Event, EventKind, ProgressReceiver, ProgressSink, Stream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How many of a failed step's last output lines are shown after the build.
const ERROR_TAIL_LINES: usize = 20;

/// A `--progress` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    Auto,
    Tty,
    Plain,
    Quiet,
    RawJson,
}

impl ProgressMode {
    /// `Auto` becomes `Tty` when stderr is a terminal, else `Plain`; other modes stay.
    pub fn resolve(self) -> ProgressMode {
        match self {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Tty,
            ProgressMode::Auto => ProgressMode::Plain,
            m => m,
        }
    }
}

/// A `--progress` value that is not one of the known modes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownProgressMode(pub String);

impl fmt::Display for UnknownProgressMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown progress mode `{}`: expected auto, tty, plain, quiet or rawjson",
            self.0
        )
    }
}

impl std::error::Error for UnknownProgressMode {}

impl FromStr for ProgressMode {
    type Err = UnknownProgressMode;

    fn from_str(s: &str) -> Result<ProgressMode, UnknownProgressMode> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(ProgressMode::Auto),
            "tty" => Ok(ProgressMode::Tty),
            "plain" => Ok(ProgressMode::Plain),
            "quiet" => Ok(ProgressMode::Quiet),
            "rawjson" => Ok(ProgressMode::RawJson),
            _ => Err(UnknownProgressMode(s.to_string())),
        }
    }
}

/// A running display: events sent to [`ProgressDisplay::sink`] are rendered on stderr by a task.
pub struct ProgressDisplay {
    sink: ProgressSink,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Renderer>,
}

/// Starts rendering in `mode` on a tokio task (call from inside the runtime).
pub fn start(mode: ProgressMode, debug: bool) -> ProgressDisplay {
    let (sink, rx) = progress::channel();
    let (stop, stopped) = oneshot::channel();
    let renderer = Renderer::new(mode, debug, Box::new(std::io::stderr()));
    let task = tokio::spawn(pump(rx, stopped, renderer));
    ProgressDisplay { sink, stop, task }
}

async fn pump(mut rx: ProgressReceiver, mut stopped: oneshot::Receiver<()>, mut r: Renderer) -> Renderer {
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => r.handle(&ev),
                None => break,
            },
            _ = &mut stopped => {
                while let Some(ev) = rx.try_recv() {
                    r.handle(&ev);
                }
                break;
            }
        }
    }
    r
}

impl ProgressDisplay {
    /// Where the solver sends events.
    pub fn sink(&self) -> ProgressSink {
        self.sink.clone()
    }

    /// Renders every event sent so far, then the summary: the failed step's output (when
    /// `error` is set) and the build's warnings.
    pub async fn finish(self, error: Option<&(dyn std::error::Error + 'static)>) {
        let ProgressDisplay { sink, stop, task } = self;
        drop(sink);
        // The task may already have ended because every sink is gone; that is fine.
        let _ = stop.send(());
        if let Ok(mut r) = task.await {
            r.finish(error);
        }
    }
}

struct Step {
    num: usize,
    name: String,
    started: Option<SystemTime>,
    /// Finished one way or another (DONE, CACHED, ERROR, CANCELED).
    ended: bool,
    failed: Option<String>,
    /// Incomplete last line per stream.
    partial: [Vec<u8>; 2],
    /// Last output lines, with their offset from the start, for the failure summary.
    tail: VecDeque<String>,
    bar: Option<ProgressBar>,
    /// tty mode: the last output lines shown under the running step, and where.
    live: VecDeque<String>,
    live_bar: Option<ProgressBar>,
}

/// Turns events into output. Synchronous: [`start`] drives it from a task, tests drive it
/// directly with any writer.
pub struct Renderer {
    mode: ProgressMode,
    debug: bool,
    out: Box<dyn Write + Send>,
    steps: HashMap<Digest, Step>,
    next_num: usize,
    /// The step whose block plain mode is printing.
    current: Option<Digest>,
    printed_any: bool,
    warnings: Vec<String>,
    /// Step numbers in the order they failed.
    failures: Vec<Digest>,
    bars: Option<MultiProgress>,
    /// tty mode: `[+] Building 1.2s (3/7)`, first of the bars.
    header: Option<ProgressBar>,
    /// rawjson: each vertex's name and start.
    raw: HashMap<Digest, RawVertex>,
}

impl Renderer {
    /// A renderer writing to `out` (`Auto` is resolved against the real stderr). In tty mode the
    /// spinners draw on stderr.
    pub fn new(mode: ProgressMode, debug: bool, out: Box<dyn Write + Send>) -> Renderer {
        let mode = mode.resolve();
        let bars = (mode == ProgressMode::Tty)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let header = bars.as_ref().map(|b| {
            let h = b.add(ProgressBar::new_spinner());
            h.set_style(header_style());
            h.set_message("(0/0)");
            h.enable_steady_tick(Duration::from_millis(100));
            h
        });
        Renderer {
            mode,
            debug,
            out,
            steps: HashMap::new(),
            next_num: 1,
            current: None,
            printed_any: false,
            warnings: Vec::new(),
            failures: Vec::new(),
            bars,
            header,
            raw: HashMap::new(),
        }
    }

    #[cfg(test)]
    fn hide_bars(&mut self) {
        if let Some(b) = &self.bars {
            b.set_draw_target(ProgressDrawTarget::hidden());
        }
    }

    /// tty mode: the header's `(done/total)` count of the steps seen so far.
    fn update_header(&self, finished: Option<&str>) {
        let Some(h) = &self.header else { return };
        let done = self.steps.values().filter(|s| s.ended).count();
        let msg = format!("({done}/{})", self.steps.len());
        match finished {
            Some(word) => h.finish_with_message(format!("{msg}{word}")),
            None => h.set_message(msg),
        }
    }

    fn step(&mut self, d: &Digest, name: Option<&str>) -> &mut Step {
        let next = &mut self.next_num;
        let step = self.steps.entry(*d).or_insert_with(|| {
            let num = *next;
            *next += 1;
            Step {
                num,
                name: String::new(),
                started: None,
                ended: false,
                failed: None,
                partial: [Vec::new(), Vec::new()],
                tail: VecDeque::new(),
                bar: None,
                live: VecDeque::new(),
                live_bar: None,
            }
        });
        if let Some(n) = name {
            if step.name.is_empty() {
                step.name = n.to_string();
            }
        }
        step
    }

    /// Renders one event.
    pub fn handle(&mut self, ev: &Event) {
        if self.mode == ProgressMode::RawJson {
            let line = self.solve_status(ev);
            let _ = writeln!(self.out, "{line}");
            return;
        }
        match &ev.kind {
            EventKind::Status {
                vertex,
                id,
                current,
                total,
                started,
                completed,
            } => {
                self.step(vertex, None);
                let line = status_line(
                    id,
                    *current,
                    *total,
                    *started,
                    completed.unwrap_or(ev.time),
                    completed.is_some(),
                );
                self.plain_line(vertex, &line);
            }
            EventKind::Cached { vertex, name } => {
                self.step(vertex, Some(name)).ended = true;
                self.plain_line(vertex, "CACHED");
                self.bar_done(vertex, "CACHED");
            }
            EventKind::CacheMiss { vertex, name, reason } => {
                self.step(vertex, Some(name));
                if self.debug {
                    self.plain_line(vertex, &format!("cache miss: {reason}"));
                    let num = self.step(vertex, None).num;
                    if let Some(bars) = &self.bars {
                        let _ = bars.println(format!("#{num} {name}: cache miss: {reason}"));
                    }
                }
            }
            EventKind::Started { vertex, name } => {
                let step = self.step(vertex, Some(name));
                step.started = Some(ev.time);
                if self.mode == ProgressMode::Plain {
                    self.switch_to(vertex);
                }
                self.bar_start(vertex);
            }
            EventKind::Log { vertex, stream, data } => self.log(vertex, *stream, data, ev.time),
            EventKind::Completed { vertex, duration } => {
                self.flush_partial(vertex, ev.time);
                self.step(vertex, None).ended = true;
                let text = format!("DONE {}", secs(*duration));
                self.plain_line(vertex, &text);
                self.bar_done(vertex, &text);
            }
            EventKind::Failed { vertex, error, .. } => {
                self.flush_partial(vertex, ev.time);
                let step = self.step(vertex, None);
                step.ended = true;
                step.failed = Some(error.clone());
                self.failures.push(*vertex);
                self.plain_line(vertex, &format!("ERROR: {error}"));
                self.bar_done(vertex, "ERROR");
            }
            EventKind::Cancelled { vertex } => {
                self.flush_partial(vertex, ev.time);
                self.step(vertex, None).ended = true;
                self.plain_line(vertex, "CANCELED");
                self.bar_done(vertex, "CANCELED");
            }
            EventKind::Warning { vertex, message } => match vertex {
                Some(v) => {
                    let num = self.step(v, None).num;
                    self.plain_line(v, &format!("WARN: {message}"));
                    self.warnings.push(format!("#{num}: {message}"));
                }
                None => self.warnings.push(message.clone()),
            },
        }
        self.update_header(None);
    }

    /// Plain mode: makes `d` the step being printed, closing the previous block.
    fn switch_to(&mut self, d: &Digest) {
        if self.current.as_ref() == Some(d) {
            return;
        }
        if let Some(prev) = self.current.and_then(|p| self.steps.get(&p)) {
            if !prev.ended {
                let _ = writeln!(self.out, "#{} ...", prev.num);
            }
        }
        if self.printed_any {
            let _ = writeln!(self.out);
        }
        self.printed_any = true;
        self.current = Some(*d);
        if let Some(step) = self.steps.get(d) {
            let _ = writeln!(self.out, "#{} {}", step.num, step.name);
        }
    }

    /// Plain mode: prints `#N text` in `d`'s block.
    fn plain_line(&mut self, d: &Digest, text: &str) {
        if self.mode != ProgressMode::Plain {
            return;
        }
        self.switch_to(d);
        if let Some(step) = self.steps.get(d) {
            let _ = writeln!(self.out, "#{} {}", step.num, text);
        }
    }

    fn log(&mut self, d: &Digest, stream: Stream, data: &[u8], time: SystemTime) {
        let idx = stream_index(stream);
        let step = self.step(d, None);
        step.partial[idx].extend_from_slice(data);
        let mut lines = Vec::new();
        while let Some(pos) = step.partial[idx].iter().position(|&b| b == b'\n') {
            let rest = step.partial[idx].split_off(pos + 1);
            let mut line = std::mem::replace(&mut step.partial[idx], rest);
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        for line in lines {
            self.output_line(d, &line, time);
        }
    }

    fn flush_partial(&mut self, d: &Digest, time: SystemTime) {
        let Some(step) = self.steps.get_mut(d) else { return };
        let pending: Vec<String> = step
            .partial
            .iter_mut()
            .filter(|p| !p.is_empty())
            .map(|p| String::from_utf8_lossy(&std::mem::take(p)).into_owned())
            .collect();
        for line in pending {
            self.output_line(d, &line, time);
        }
    }

    fn output_line(&mut self, d: &Digest, line: &str, time: SystemTime) {
        let step = self.step(d, None);
        let offset = step
            .started
            .and_then(|s| time.duration_since(s).ok())
            .unwrap_or_default();
        let text = format!("{:.3} {line}", offset.as_secs_f64());
        if step.tail.len() == ERROR_TAIL_LINES {
            step.tail.pop_front();
        }
        step.tail.push_back(text.clone());
        if let Some(live) = &step.live_bar {
            if step.live.len() == LIVE_TAIL_LINES {
                step.live.pop_front();
            }
            step.live.push_back(line.to_string());
            live.set_message(live_tail(&step.live, term_width()));
        }
        self.plain_line(d, &text);
    }

    fn bar_start(&mut self, d: &Digest) {
        let Some(bars) = &self.bars else { return };
        let Some(step) = self.steps.get_mut(d) else { return };
        let bar = bars.add(ProgressBar::new_spinner());
        bar.set_style(running_style());
        bar.set_prefix(format!("#{}", step.num));
        bar.set_message(step.name.clone());
        bar.enable_steady_tick(Duration::from_millis(100));
        // Below it, the step's last output lines while it runs (BuildKit's tty mode).
        let live = bars.insert_after(&bar, ProgressBar::new_spinner());
        live.set_style(
            ProgressStyle::with_template("{msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        step.live_bar = Some(live);
        step.bar = Some(bar);
    }

    fn bar_done(&mut self, d: &Digest, status: &str) {
        let Some(bars) = &self.bars else { return };
        let Some(step) = self.steps.get_mut(d) else { return };
        // The live output collapses when the step ends.
        if let Some(live) = step.live_bar.take() {
            live.finish_and_clear();
            bars.remove(&live);
        }
        step.live.clear();
        let bar = match step.bar.take() {
            Some(b) => b,
            None => {
                let b = bars.add(ProgressBar::new_spinner());
                b.set_prefix(format!("#{}", step.num));
                b
            }
        };
        bar.set_style(done_style());
        bar.finish_with_message(format!("{} {status}", step.name));
    }

    /// Prints the summary: each failed step's last output lines framed like BuildKit, and the
    /// warnings. `error` is the solve's error, if it failed (its text is the caller's to print).
    pub fn finish(&mut self, error: Option<&(dyn std::error::Error + 'static)>) {
        if self.mode == ProgressMode::RawJson {
            let _ = self.out.flush();
            return;
        }
        self.update_header(Some(if error.is_some() { "" } else { " FINISHED" }));
        let failures: Vec<Digest> = self.failures.clone();
        for d in &failures {
            self.flush_partial(d, SystemTime::now());
        }
        let mut text = String::new();
        if error.is_some() {
            for d in &failures {
                let Some(step) = self.steps.get(d) else { continue };
                text.push_str("------\n");
                text.push_str(&format!(" > {}:\n", step.name));
                for line in &step.tail {
                    text.push_str(line);
                    text.push('\n');
                }
                text.push_str("------\n");
            }
        }
        if self.mode == ProgressMode::Plain && self.printed_any && !text.is_empty() {
            text.insert(0, '\n');
        }
        // buildx's summary: a blank line, ` N warnings found (use --debug to expand):`, one
        // ` - ` line each (with --debug, each expanded with its details and a blank line).
        if !self.warnings.is_empty() && self.mode != ProgressMode::Quiet {
            let n = self.warnings.len();
            text.push_str(&format!(
                "\n {n} warning{} found{}:\n",
                if n == 1 { "" } else { "s" },
                if self.debug {
                    ""
                } else {
                    " (use --debug to expand)"
                }
            ));
            for w in &self.warnings {
                text.push_str(&format!(" - {w}\n"));
                if self.debug {
                    text.push('\n');
                }
            }
        }
        if text.is_empty() {
            let _ = self.out.flush();
            return;
        }
        match &self.bars {
            Some(bars) => bars.suspend(|| {
                let _ = self.out.write_all(text.as_bytes());
            }),
            None => {
                let _ = self.out.write_all(text.as_bytes());
            }
        }
        let _ = self.out.flush();
    }
}

fn stream_index(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

/// `0.4s`, BuildKit's one-decimal seconds.
fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// How many of a running step's last output lines tty mode shows under it.
const LIVE_TAIL_LINES: usize = 6;

/// The columns of the terminal on stderr (80 when unknown).
fn term_width() -> usize {
    kiln_runtime::tty::get_winsize(std::io::stderr())
        .map(|(_, cols)| usize::from(cols))
        .ok()
        .filter(|&c| c > 0)
        .unwrap_or(80)
}

/// The live tail under a running step, BuildKit's `=> => # line` lines: control characters
/// dropped and each line cut to the terminal's width, so that redrawing stays in place.
fn live_tail(lines: &VecDeque<String>, width: usize) -> String {
    const PREFIX: &str = " => => # ";
    let room = width.saturating_sub(PREFIX.len() + 1).max(10);
    lines
        .iter()
        .map(|l| {
            let clean: String = l
                .chars()
                .map(|c| if c == '\t' { ' ' } else { c })
                .filter(|c| !c.is_control())
                .take(room)
                .collect();
            format!("{PREFIX}{clean}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `[+] Building 1.2s (3/7)`, BuildKit's tty header.
fn header_style() -> ProgressStyle {
    ProgressStyle::with_template("[+] Building {secs} {msg}")
        .map(|s| {
            s.with_key(
                "secs",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.1}s", state.elapsed().as_secs_f64());
                },
            )
        })
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn running_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix} {wide_msg} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn done_style() -> ProgressStyle {
    ProgressStyle::with_template("  {prefix} {wide_msg}").unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// BuildKit's plain status line: `ID[ CURRENT[ / TOTAL]][ 1.2s][ done]`, byte counts as
/// `tonistiigi/units` prints them with `%.2f` (`42B`, `1.23kB`), the time only above 0.01 s.
fn status_line(
    id: &str,
    current: u64,
    total: u64,
    started: SystemTime,
    end: SystemTime,
    done: bool,
) -> String {
    let mut line = id.to_string();
    if total != 0 {
        line.push_str(&format!(" {} / {}", go_bytes(current), go_bytes(total)));
    } else if current != 0 {
        line.push_str(&format!(" {}", go_bytes(current)));
    }
    let took = end.duration_since(started).unwrap_or_default().as_secs_f64();
    if took > 0.01 {
        line.push_str(&format!(" {took:.1}s"));
    }
    if done {
        line.push_str(" done");
    }
    line
}

/// A byte count in decimal units, two decimals from 1 kB on (`units.Bytes` with `%.2f`).
fn go_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    if n < 1000 {
        return format!("{n}B");
    }
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    format!("{v:.2}{}", UNITS[i])
}

/// Go's `time.Time` in JSON: RFC 3339 with nanoseconds, trailing zeros dropped.
fn go_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    time::OffsetDateTime::from_unix_timestamp_nanos(d.as_nanos() as i128)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// What rawjson remembers of a vertex, to send it whole each time (as BuildKit does).
#[derive(Default)]
struct RawVertex {
    name: String,
    started: Option<SystemTime>,
}

/// The vertex `d` as rawjson remembers it (named `name` if it had no name yet), and its JSON
/// object so far (`digest`, `name`).
fn raw_vertex<'a>(
    raw: &'a mut HashMap<Digest, RawVertex>,
    d: &Digest,
    name: Option<&str>,
) -> (serde_json::Map<String, serde_json::Value>, &'a mut RawVertex) {
    let v = raw.entry(*d).or_default();
    if let Some(n) = name {
        if v.name.is_empty() {
            v.name = n.to_string();
        }
    }
    let mut o = serde_json::Map::new();
    o.insert("digest".into(), d.to_string().into());
    if !v.name.is_empty() {
        o.insert("name".into(), v.name.clone().into());
    }
    (o, v)
}

impl Renderer {
    /// One event as BuildKit's `SolveStatus` JSON (`client.SolveStatus` as buildx's rawjson
    /// writes it): `vertexes` with the vertex's state so far, `statuses`, `logs` (data base64,
    /// stream 1 or 2), `warnings` (level 1, `short` base64).
    fn solve_status(&mut self, ev: &Event) -> serde_json::Value {
        use base64::Engine as _;
        use serde_json::json;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let t = go_time(ev.time);
        let vertex = raw_vertex;
        let raw = &mut self.raw;
        let one = |o: serde_json::Map<String, serde_json::Value>| json!({ "vertexes": [o] });
        match &ev.kind {
            EventKind::CacheMiss { vertex: d, name, .. } => one(vertex(raw, d, Some(name)).0),
            EventKind::Started { vertex: d, name } => {
                let (mut o, v) = vertex(raw, d, Some(name));
                v.started = Some(ev.time);
                o.insert("started".into(), t.into());
                one(o)
            }
            EventKind::Cached { vertex: d, name } => {
                let (mut o, v) = vertex(raw, d, Some(name));
                let started = go_time(*v.started.get_or_insert(ev.time));
                o.insert("started".into(), started.into());
                o.insert("completed".into(), t.into());
                o.insert("cached".into(), true.into());
                one(o)
            }
            EventKind::Completed { vertex: d, .. }
            | EventKind::Failed { vertex: d, .. }
            | EventKind::Cancelled { vertex: d } => {
                let (mut o, v) = vertex(raw, d, None);
                let started = go_time(*v.started.get_or_insert(ev.time));
                o.insert("started".into(), started.into());
                o.insert("completed".into(), t.into());
                match &ev.kind {
                    EventKind::Failed { error, .. } => {
                        o.insert("error".into(), error.clone().into());
                    }
                    EventKind::Cancelled { .. } => {
                        o.insert("error".into(), "context canceled".into());
                    }
                    _ => {}
                }
                one(o)
            }
            EventKind::Log {
                vertex: d,
                stream,
                data,
            } => json!({"logs": [{
                "vertex": d.to_string(),
                "stream": match stream { Stream::Stdout => 1, Stream::Stderr => 2 },
                "data": b64(data),
                "timestamp": t,
            }]}),
            EventKind::Warning { vertex: d, message } => {
                let mut w = serde_json::Map::new();
                if let Some(d) = d {
                    w.insert("vertex".into(), d.to_string().into());
                }
                w.insert("level".into(), 1.into());
                w.insert("short".into(), b64(message.as_bytes()).into());
                json!({ "warnings": [w] })
            }
            EventKind::Status {
                vertex: d,
                id,
                current,
                total,
                started,
                completed,
            } => {
                let mut s = serde_json::Map::new();
                s.insert("id".into(), id.clone().into());
                s.insert("vertex".into(), d.to_string().into());
                if *total != 0 {
                    s.insert("total".into(), (*total).into());
                }
                s.insert("current".into(), (*current).into());
                s.insert("timestamp".into(), t.into());
                s.insert("started".into(), go_time(*started).into());
                if let Some(c) = completed {
                    s.insert("completed".into(), go_time(*c).into());
                }
                json!({ "statuses": [s] })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use kiln_solver::progress::MissReason;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(ms)
    }

    fn ev(ms: u64, kind: EventKind) -> Event {
        Event { time: at(ms), kind }
    }

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    /// A build: FROM cached, RUN with output that succeeds, RUN that fails after output while a
    /// third runs concurrently and gets cancelled.
    fn events() -> Vec<Event> {
        let (from, run1, run2, run3) = (d("from"), d("run1"), d("run2"), d("run3"));
        let log = |ms, v, s: &str| {
            ev(
                ms,
                EventKind::Log {
                    vertex: v,
                    stream: Stream::Stdout,
                    data: s.into(),
                },
            )
        };
        vec![
            ev(
                0,
                EventKind::Cached {
                    vertex: from,
                    name: "[1/3] FROM docker.io/library/busybox".into(),
                },
            ),
            ev(
                1,
                EventKind::CacheMiss {
                    vertex: run1,
                    name: "[2/3] RUN echo hi".into(),
                    reason: MissReason::InputChanged {
                        input: from,
                        name: "x".into(),
                    },
                },
            ),
            ev(
                2,
                EventKind::Started {
                    vertex: run1,
                    name: "[2/3] RUN echo hi".into(),
                },
            ),
            log(125, run1, "h"),
            log(130, run1, "i\nsecond"),
            ev(
                400,
                EventKind::Completed {
                    vertex: run1,
                    duration: Duration::from_millis(398),
                },
            ),
            ev(
                401,
                EventKind::Started {
                    vertex: run2,
                    name: "[3/3] RUN false".into(),
                },
            ),
            ev(
                402,
                EventKind::Started {
                    vertex: run3,
                    name: "[other 2/2] RUN sleep 9".into(),
                },
            ),
            log(600, run2, "oops\n"),
            ev(
                610,
                EventKind::Warning {
                    vertex: None,
                    message: "JSONArgsRecommended".into(),
                },
            ),
            ev(
                700,
                EventKind::Failed {
                    vertex: run2,
                    duration: Duration::from_millis(299),
                    error: "process \"/bin/sh -c false\" did not complete successfully: exit code: 1".into(),
                },
            ),
            ev(800, EventKind::Cancelled { vertex: run3 }),
        ]
    }

    fn render(mode: ProgressMode, debug: bool) -> String {
        let buf = Buf::default();
        let mut r = Renderer::new(mode, debug, Box::new(buf.clone()));
        r.hide_bars();
        for e in events() {
            r.handle(&e);
        }
        let err = std::io::Error::other("failed");
        r.finish(Some(&err));
        buf.text()
    }

    #[test]
    fn plain_is_buildkit_like() {
        let expected = "\
#1 [1/3] FROM docker.io/library/busybox
#1 CACHED

#2 [2/3] RUN echo hi
#2 0.128 hi
#2 0.398 second
#2 DONE 0.4s

#3 [3/3] RUN false
#3 ...

#4 [other 2/2] RUN sleep 9
#4 ...

#3 [3/3] RUN false
#3 0.199 oops
#3 ERROR: process \"/bin/sh -c false\" did not complete successfully: exit code: 1

#4 [other 2/2] RUN sleep 9
#4 CANCELED

------
 > [3/3] RUN false:
0.199 oops
------

 1 warning found (use --debug to expand):
 - JSONArgsRecommended
";
        assert_eq!(render(ProgressMode::Plain, false), expected);
    }

    #[test]
    fn debug_shows_miss_reasons() {
        let out = render(ProgressMode::Plain, true);
        assert!(
            out.contains("#2 [2/3] RUN echo hi\n#2 cache miss: input `x` was rebuilt\n#2 0.128 hi\n"),
            "{out}"
        );
    }

    #[test]
    fn quiet_shows_only_the_failure() {
        let out = render(ProgressMode::Quiet, false);
        assert_eq!(out, "------\n > [3/3] RUN false:\n0.199 oops\n------\n");
    }

    #[test]
    fn tty_shows_output_only_for_the_failed_step() {
        let out = render(ProgressMode::Tty, false);
        assert!(out.contains(" > [3/3] RUN false:\n0.199 oops\n"), "{out}");
        assert!(!out.contains("hi"), "{out}");
    }

    #[test]
    fn rawjson_is_buildkits_solve_status() {
        let out = render(ProgressMode::RawJson, false);
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
            .collect();
        assert_eq!(lines.len(), events().len());
        let cached = &lines[0]["vertexes"][0];
        assert_eq!(cached["cached"], true);
        assert_eq!(cached["name"], "[1/3] FROM docker.io/library/busybox");
        assert_eq!(cached["digest"], d("from").to_string());
        assert_eq!(lines[2]["vertexes"][0]["started"], "2023-11-14T22:13:20.002Z");
        let log = &lines[3]["logs"][0];
        assert_eq!(log["data"], "aA==");
        assert_eq!(log["stream"], 1);
        assert_eq!(log["timestamp"], "2023-11-14T22:13:20.125Z");
        let done = &lines[5]["vertexes"][0];
        assert_eq!(done["started"], "2023-11-14T22:13:20.002Z");
        assert_eq!(done["completed"], "2023-11-14T22:13:20.4Z");
        assert_eq!(done["name"], "[2/3] RUN echo hi");
        assert_eq!(lines[9]["warnings"][0]["short"], "SlNPTkFyZ3NSZWNvbW1lbmRlZA==");
        assert_eq!(
            lines[10]["vertexes"][0]["error"],
            "process \"/bin/sh -c false\" did not complete successfully: exit code: 1"
        );
        assert_eq!(lines[11]["vertexes"][0]["error"], "context canceled");
    }

    #[test]
    fn tty_shows_a_live_tail_that_collapses() {
        let mut r = Renderer::new(ProgressMode::Tty, false, Box::new(Buf::default()));
        r.hide_bars();
        let v = d("run");
        r.handle(&ev(
            0,
            EventKind::Started {
                vertex: v,
                name: "[2/2] RUN make".into(),
            },
        ));
        for i in 1..=8 {
            r.handle(&ev(
                i,
                EventKind::Log {
                    vertex: v,
                    stream: Stream::Stdout,
                    data: format!("line {i}\x1b[0m\n").into_bytes(),
                },
            ));
        }
        let live = r.steps[&v].live_bar.clone().expect("a live tail while running");
        let shown: Vec<String> = (3..=8).map(|i| format!(" => => # line {i}[0m")).collect();
        assert_eq!(live.message(), shown.join("\n"));
        r.handle(&ev(
            20,
            EventKind::Completed {
                vertex: v,
                duration: Duration::from_millis(20),
            },
        ));
        assert!(r.steps[&v].live_bar.is_none() && live.is_finished());
        assert_eq!(r.header.as_ref().unwrap().message(), "(1/1)");
        r.finish(None);
        assert_eq!(r.header.as_ref().unwrap().message(), "(1/1) FINISHED");
    }

    #[test]
    fn live_tail_lines_fit_the_terminal() {
        let lines: VecDeque<String> = ["a\tb", &"x".repeat(200)].iter().map(|s| s.to_string()).collect();
        let t = live_tail(&lines, 40);
        assert_eq!(t.lines().next(), Some(" => => # a b"));
        assert_eq!(t.lines().nth(1).unwrap().len(), 39);
    }

    #[test]
    fn status_lines_are_buildkits() {
        let t = at(0);
        assert_eq!(
            status_line("transferring context:", 42, 0, t, at(5), true),
            "transferring context: 42B done"
        );
        assert_eq!(
            status_line("transferring context:", 1_234_567, 0, t, at(300), true),
            "transferring context: 1.23MB 0.3s done"
        );
        assert_eq!(
            status_line("extracting", 1500, 3000, t, at(0), false),
            "extracting 1.50kB / 3.00kB"
        );
        assert_eq!(
            status_line("naming to x", 0, 0, t, at(0), true),
            "naming to x done"
        );
    }

    #[test]
    fn modes_parse() {
        assert_eq!("plain".parse::<ProgressMode>().unwrap(), ProgressMode::Plain);
        assert_eq!("RAWJSON".parse::<ProgressMode>().unwrap(), ProgressMode::RawJson);
        assert!("fancy".parse::<ProgressMode>().is_err());
        assert_ne!(ProgressMode::Auto.resolve(), ProgressMode::Auto);
    }

    #[tokio::test]
    async fn display_renders_everything_sent_before_finish() {
        let display = start(ProgressMode::Quiet, false);
        let sink = display.sink();
        sink.send(EventKind::Started {
            vertex: d("x"),
            name: "x".into(),
        });
        // A sink still alive does not block finish.
        display.finish(None).await;
        drop(sink);
    }
}
