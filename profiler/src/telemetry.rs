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
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
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

/// The registry and the daemon's health.
pub struct Telemetry {
    started: Instant,
    /// Set once the programs are attached and the first processes loaded.
    ready: AtomicBool,
    /// Set when a stage failed and the daemon is stopping.
    failed: AtomicBool,
    sources: Mutex<Vec<Arc<dyn Collect>>>,
}

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
        }
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
    fn health_flags_start_down() {
        let t = Telemetry::new();
        assert!(!t.is_ready() && !t.has_failed());
        t.set_ready();
        t.set_failed();
        assert!(t.is_ready() && t.has_failed());
    }
}
