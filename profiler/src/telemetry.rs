//! Self-telemetry: the registry that `/metrics` renders (Prometheus text format 0.0.4), and
//! the health flags that `/healthz` and `/readyz` decide on.
//!
//! This module knows no stage. Each owner of figures (the sampler's and the report stage's
//! counters, the unwind stage's, the exporters', the pod index) implements [`Collect`] beside
//! its own type and is registered once by the wiring ([`crate::stages`]); a scrape asks each
//! in the order they were registered. A family is written by one source only.
use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Whether a family only grows or may go down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// An exposition being written: families with their `# HELP`, `# TYPE` and samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// The samples of one family, each with its own labels.
pub struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
}

impl Exposition {
    /// Starts the family `name`; its samples follow.
    pub fn family<'a>(&'a mut self, name: &'a str, kind: Kind, help: &str) -> Family<'a> {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {}", kind.as_str());
        Family {
            out: &mut self.out,
            name,
        }
    }

    /// A family of one unlabelled counter.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, Kind::Counter, help).sample(&[], value as f64);
    }

    /// A family of one unlabelled gauge.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, Kind::Gauge, help).sample(&[], value);
    }

    pub fn into_text(self) -> String {
        self.out
    }
}

impl Family<'_> {
    /// One sample with `labels` (name, value); values are escaped as the format requires.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (name, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{name}=\"");
                escape_into(self.out, value);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}

/// A label value as the text format writes it: backslash, double quote and newline escaped.
fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Something that owns figures and writes them into a scrape.
pub trait Collect: Send + Sync {
    fn collect(&self, out: &mut Exposition);
}

/// One stage's progress, as /healthz judges it: when the item it works on was taken (none
/// while it waits for work), and how many items it finished. A stage waiting for input is
/// healthy however long it waits; one busy with one item past the stall bound is wedged.
pub struct Heartbeat {
    pub stage: &'static str,
    started: Instant,
    /// Milliseconds after `started` at which the current item was taken, plus one; 0 idle.
    busy_since: AtomicU64,
    done: AtomicU64,
}

/// Marks a stage busy until dropped.
pub struct Busy<'a>(&'a Heartbeat);

impl Heartbeat {
    pub fn new(stage: &'static str) -> Self {
        Self {
            stage,
            started: Instant::now(),
            busy_since: AtomicU64::new(0),
            done: AtomicU64::new(0),
        }
    }

    /// The stage takes an item; it is done with it when the guard goes.
    pub fn busy(&self) -> Busy<'_> {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        self.busy_since.store(now, Ordering::Relaxed);
        Busy(self)
    }

    /// How long the stage has been on its current item (zero while idle).
    pub fn busy_for(&self) -> Duration {
        match self.busy_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => self
                .started
                .elapsed()
                .saturating_sub(Duration::from_millis(since - 1)),
        }
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy_since.store(0, Ordering::Relaxed);
        self.0.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// The registry and the daemon's health.
pub struct Telemetry {
    started: Instant,
    /// Set once the programs are attached and the first processes loaded.
    ready: AtomicBool,
    /// Set when a stage failed and the daemon is stopping.
    failed: AtomicBool,
    sources: Mutex<Vec<Arc<dyn Collect>>>,
    heartbeats: Mutex<Vec<Arc<Heartbeat>>>,
    /// A stage busy with one item for longer than this is wedged (/healthz fails).
    stall_after_ms: AtomicU64,
}

/// The stall bound before [`Telemetry::set_stall_after`] is called.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            ready: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            sources: Mutex::default(),
            heartbeats: Mutex::default(),
            stall_after_ms: AtomicU64::new(DEFAULT_STALL_AFTER.as_millis() as u64),
        }
    }

    /// A new stage's heartbeat, watched by [`Telemetry::stalled`] and shown in /metrics.
    pub fn heartbeat(&self, stage: &'static str) -> Arc<Heartbeat> {
        let beat = Arc::new(Heartbeat::new(stage));
        self.heartbeats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::clone(&beat));
        beat
    }

    pub fn set_stall_after(&self, after: Duration) {
        self.stall_after_ms
            .store(after.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn stall_after(&self) -> Duration {
        Duration::from_millis(self.stall_after_ms.load(Ordering::Relaxed))
    }

    /// The first stage busy with one item for longer than the stall bound, and for how long.
    pub fn stalled(&self) -> Option<(&'static str, Duration)> {
        let after = self.stall_after();
        self.heartbeats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|beat| (beat.stage, beat.busy_for()))
            .find(|(_, busy)| *busy > after)
    }

    /// Adds a source; scrapes ask it after those registered before it.
    pub fn register(&self, source: Arc<dyn Collect>) {
        self.sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(source);
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn set_failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every registered source, then the daemon's own
    /// process figures.
    pub fn render(&self) -> String {
        let sources: Vec<Arc<dyn Collect>> = self
            .sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut out = Exposition {
            out: String::with_capacity(8 << 10),
        };
        for source in sources {
            source.collect(&mut out);
        }
        let beats: Vec<Arc<Heartbeat>> = self
            .heartbeats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut busy = out.family(
            "profiler_stage_busy_seconds",
            Kind::Gauge,
            "How long each stage has been on its current item (0 while it waits for work); past profiler_stage_stall_seconds /healthz fails.",
        );
        for beat in &beats {
            busy.sample(&[("stage", beat.stage)], beat.busy_for().as_secs_f64());
        }
        let mut done = out.family(
            "profiler_stage_items_total",
            Kind::Counter,
            "Items each stage finished (batches, intervals, profiles, load requests).",
        );
        for beat in &beats {
            done.sample(&[("stage", beat.stage)], beat.done() as f64);
        }
        out.gauge(
            "profiler_stage_stall_seconds",
            "A stage busy with one item for longer than this is wedged: /healthz fails.",
            self.stall_after().as_secs_f64(),
        );
        let (cpu, rss) = own_usage();
        out.family(
            "process_cpu_seconds_total",
            Kind::Counter,
            "CPU time of the daemon (user + system).",
        )
        .sample(&[], cpu);
        out.gauge(
            "process_resident_memory_bytes",
            "Resident memory of the daemon.",
            rss as f64,
        );
        out.gauge(
            "profiler_uptime_seconds",
            "Seconds since start.",
            self.started.elapsed().as_secs_f64(),
        );
        out.into_text()
    }
}

/// (CPU seconds, resident bytes) of this process, from /proc/self.
fn own_usage() -> (f64, u64) {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which may hold spaces) start after the last ')'.
            let rest = stat.get(stat.rfind(')')? + 2..)?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    (cpu, rss)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Two;

    impl Collect for Two {
        fn collect(&self, out: &mut Exposition) {
            out.counter("demo_total", "A counter.", 42);
            out.family("demo_by_name", Kind::Gauge, "By name.")
                .sample(&[("name", "a\"b\\c\nd")], 1.5)
                .sample(&[("name", "plain"), ("kind", "x")], 2.0);
        }
    }

    #[test]
    fn sources_render_in_order_with_escaped_labels() {
        let t = Telemetry::new();
        t.register(Arc::new(Two));
        let text = t.render();
        assert!(text.starts_with("# HELP demo_total A counter.\n# TYPE demo_total counter\ndemo_total 42\n"));
        assert!(text.contains("demo_by_name{name=\"a\\\"b\\\\c\\nd\"} 1.5\n"));
        assert!(text.contains("demo_by_name{name=\"plain\",kind=\"x\"} 2\n"));
        assert!(text.contains("process_resident_memory_bytes "));
        // Every sample line belongs to a family announced before it, and each family once.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().expect("name").to_owned();
                assert!(declared.insert(name.clone()), "{name} declared twice");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().expect("name");
                assert!(declared.contains(name), "undeclared {name}");
            }
        }
    }

    #[test]
    fn a_stage_busy_past_the_bound_is_stalled_and_an_idle_one_never() {
        let t = Telemetry::new();
        t.set_stall_after(Duration::from_millis(50));
        let idle = t.heartbeat("reporter");
        let busy = t.heartbeat("aggregator");
        {
            let _item = idle.busy();
        }
        assert_eq!(idle.done(), 1);
        let item = busy.busy();
        assert_eq!(t.stalled(), None, "busy for less than the bound");
        std::thread::sleep(Duration::from_millis(120));
        let (stage, for_) = t.stalled().expect("stalled");
        assert_eq!(stage, "aggregator");
        assert!(for_ >= Duration::from_millis(100), "{for_:?}");
        assert!(
            t.render()
                .contains("profiler_stage_busy_seconds{stage=\"reporter\"} 0\n")
        );
        drop(item);
        assert_eq!(t.stalled(), None, "done with its item");
        assert_eq!(busy.done(), 1);
    }

    #[test]
    fn health_flags_start_down() {
        let t = Telemetry::new();
        assert!(!t.is_ready() && !t.has_failed());
        t.set_ready();
        t.set_failed();
        assert!(t.is_ready() && t.has_failed());
    }
}
