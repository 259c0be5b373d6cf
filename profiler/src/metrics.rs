//! Self-telemetry: what `/metrics` reports (Prometheus text format 0.0.4) and what
//! `/healthz` and `/readyz` decide on.
//!
//! The stages keep their own counters ([`PipelineStats`], [`UnwindStats`], the exporters'
//! [`ExporterStats`]); the rest is copied here by its owner: the kernel counters by the daemon's
//! clock (every second), the symbol-cache figures by the aggregator and the symbolization
//! outcomes by the report stage (once per profile).
use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use profiler_common::{Counter, UNWIND_STATUS_SLOTS, UNWIND_STATUSES, UnwindStatus};

use crate::{
    bpf::CounterSnapshot,
    process::RegistryStats,
    remote::{ExporterStats, Spool},
    report::unwind_status_name,
    sampler::PipelineStats,
    symbolize::{SymbolStats, Unresolved},
    unwind::UnwindStats,
};

/// One exporter as `/metrics` sees it.
pub struct ExporterView {
    pub name: String,
    pub kind: &'static str,
    pub stats: Arc<ExporterStats>,
    pub spool: Arc<Spool>,
}

pub struct Telemetry {
    started: Instant,
    /// Set once the programs are attached and the first processes loaded.
    pub ready: AtomicBool,
    /// Set when a stage failed and the daemon is stopping.
    pub failed: AtomicBool,
    /// Cumulative kernel counters, refreshed every second.
    pub kernel: Mutex<CounterSnapshot>,
    pub registry: Mutex<RegistryStats>,
    /// Frames named / not named (by reason), summed over every profile built.
    pub symbols: Mutex<SymbolStats>,
    pub profiles: AtomicU64,
    pub export_failures: AtomicU64,
    pub on_demand: AtomicU64,
    pub pipeline: Arc<PipelineStats>,
    pub unwind: Arc<UnwindStats>,
    pub exporters: Mutex<Vec<ExporterView>>,
    pub frequency: u32,
    /// Samples of processes dropped by relabeling rules.
    pub dropped_by_relabeling: AtomicU64,
    /// Label values folded by the cardinality guard, per label name.
    pub folded: Mutex<std::collections::BTreeMap<String, u64>>,
    /// This node's pods, when the Kubernetes API is watched.
    pub pods: std::sync::OnceLock<Arc<crate::kube::PodIndex>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Telemetry {
    pub fn new(frequency: u32, pipeline: Arc<PipelineStats>, unwind: Arc<UnwindStats>) -> Self {
        Self {
            started: Instant::now(),
            ready: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            kernel: Mutex::default(),
            registry: Mutex::default(),
            symbols: Mutex::default(),
            profiles: AtomicU64::new(0),
            export_failures: AtomicU64::new(0),
            on_demand: AtomicU64::new(0),
            pipeline,
            unwind,
            exporters: Mutex::default(),
            frequency,
            dropped_by_relabeling: AtomicU64::new(0),
            folded: Mutex::default(),
            pods: std::sync::OnceLock::new(),
        }
    }

    pub fn kernel_counters(&self) -> CounterSnapshot {
        *lock(&self.kernel)
    }

    pub fn set_kernel_counters(&self, counters: CounterSnapshot) {
        *lock(&self.kernel) = counters;
    }

    pub fn set_registry(&self, stats: &RegistryStats) {
        *lock(&self.registry) = stats.clone();
    }

    pub fn add_symbols(&self, stats: &SymbolStats) {
        let mut total = lock(&self.symbols);
        total.named += stats.named;
        total.cache_hits += stats.cache_hits;
        total.cache_misses += stats.cache_misses;
        for (reason, n) in &stats.unresolved {
            *total.unresolved.entry(*reason).or_default() += n;
        }
    }

    pub fn add_labels(&self, dropped: u64, folded: &std::collections::BTreeMap<String, u64>) {
        self.dropped_by_relabeling.fetch_add(dropped, Ordering::Relaxed);
        let mut total = lock(&self.folded);
        for (name, n) in folded {
            *total.entry(name.clone()).or_default() += n;
        }
    }

    pub fn add_exporter(&self, view: ExporterView) {
        lock(&self.exporters).push(view);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 << 10);
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: u64| vec![(String::new(), v as f64)];
        let k = self.kernel_counters();
        family(
            "profiler_sampling_frequency_hz",
            "gauge",
            "Samples per second per CPU.",
            &one(u64::from(self.frequency)),
        );
        family(
            "profiler_kernel_events_total",
            "counter",
            "perf events the BPF program ran for.",
            &one(k.get(Counter::Events)),
        );
        family(
            "profiler_samples_total",
            "counter",
            "Samples written to the ring buffer.",
            &one(k.get(Counter::Submitted)),
        );
        let lost = [
            ("ring_buffer_full", k.get(Counter::RingFull)),
            (
                "aggregator_queue_full",
                self.pipeline.dropped_queue_full.load(Ordering::Relaxed),
            ),
            ("malformed", self.pipeline.malformed.load(Ordering::Relaxed)),
        ];
        family(
            "profiler_samples_lost_total",
            "counter",
            "Samples lost, by where.",
            &lost
                .iter()
                .map(|(r, v)| (format!("{{reason=\"{r}\"}}"), *v as f64))
                .collect::<Vec<_>>(),
        );
        family(
            "profiler_idle_ticks_total",
            "counter",
            "Ticks in the idle task (not recorded).",
            &one(k.get(Counter::Idle)),
        );
        family(
            "profiler_filtered_ticks_total",
            "counter",
            "Ticks of processes outside the selection.",
            &one(k.get(Counter::FilteredOut)),
        );
        family(
            "profiler_stack_errors_total",
            "counter",
            "Failed kernel stack walks and user frame-pointer walks.",
            &[
                (
                    "{stack=\"kernel\"}".to_owned(),
                    k.get(Counter::KernelStackError) as f64,
                ),
                (
                    "{stack=\"user\"}".to_owned(),
                    k.get(Counter::UserStackError) as f64,
                ),
            ],
        );
        family(
            "profiler_process_events_lost_total",
            "counter",
            "Exec/exit events lost because their ring buffer was full.",
            &one(k.get(Counter::ProcEventsLost)),
        );
        let walks: Vec<(String, f64)> = (0..UNWIND_STATUSES)
            .filter_map(|s| {
                let status = UnwindStatus::from_u8(s as u8)?;
                let name = unwind_status_name(status)
                    .split_whitespace()
                    .next()
                    .unwrap_or("unknown");
                Some((
                    format!("{{status=\"{name}\"}}"),
                    k.0[(UNWIND_STATUS_SLOTS + s) as usize] as f64,
                ))
            })
            .collect();
        family(
            "profiler_unwind_walks_total",
            "counter",
            "User stack walks by how they ended.",
            &walks,
        );
        let u = self.unwind.snapshot();
        family(
            "profiler_unwind_processes",
            "gauge",
            "Processes with mappings loaded for the unwinder.",
            &one(u.processes),
        );
        family(
            "profiler_unwind_files",
            "gauge",
            "Files with unwind tables loaded.",
            &one(u.files_loaded),
        );
        family(
            "profiler_unwind_table_bytes",
            "gauge",
            "Bytes of the unwind-table BPF map in use.",
            &one(u.bytes_used),
        );
        family(
            "profiler_unwind_table_capacity_bytes",
            "gauge",
            "Size of the unwind-table BPF map.",
            &one(u.bytes_capacity),
        );
        // Fill of the fixed-capacity BPF maps (capacities from profiler-ebpf).
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let maps = [
            ("PROCS", u.processes, 1u64 << 16),
            ("MAPPINGS", get(&self.unwind.mapping_entries), 1 << 20),
            ("UNWIND_FILES", u.files_loaded, 4096),
        ];
        family(
            "profiler_bpf_map_entries",
            "gauge",
            "Entries the daemon keeps in a BPF map.",
            &maps
                .iter()
                .map(|(m, n, _)| (format!("{{map=\"{m}\"}}"), *n as f64))
                .collect::<Vec<_>>(),
        );
        family(
            "profiler_bpf_map_capacity_entries",
            "gauge",
            "Capacity of a BPF map.",
            &maps
                .iter()
                .map(|(m, _, c)| (format!("{{map=\"{m}\"}}"), *c as f64))
                .collect::<Vec<_>>(),
        );
        family(
            "profiler_unwind_table_evictions_total",
            "counter",
            "Tables evicted to make room.",
            &one(u.evictions),
        );
        family(
            "profiler_unwind_table_failures_total",
            "counter",
            "Files whose unwind table could not be built.",
            &one(u.table_errors),
        );
        family(
            "profiler_unwind_requests_dropped_total",
            "counter",
            "Load requests dropped because the unwinder's queue was full.",
            &one(u.requests_dropped),
        );
        family(
            "profiler_unwind_load_requests_total",
            "counter",
            "Load requests from the sampling program: first samples of processes not loaded yet.",
            &one(u.load_requests),
        );
        let symbols = lock(&self.symbols).clone();
        let mut frames = vec![("{outcome=\"named\"}".to_owned(), symbols.named as f64)];
        for reason in [
            Unresolved::NoSymbol,
            Unresolved::ObjectUnreadable,
            Unresolved::NoFile,
            Unresolved::NoMapping,
            Unresolved::KernelSymbolsUnavailable,
        ] {
            let n = symbols.unresolved.get(&reason).copied().unwrap_or(0);
            frames.push((format!("{{outcome=\"{}\"}}", reason.name()), n as f64));
        }
        family(
            "profiler_symbolized_frames_total",
            "counter",
            "Distinct frames of built profiles, named or why not.",
            &frames,
        );
        family(
            "profiler_symbol_name_cache_lookups_total",
            "counter",
            "File frames named from the (file, address) name cache (hit) or looked up in the file (miss).",
            &[
                ("{result=\"hit\"}".to_owned(), symbols.cache_hits as f64),
                ("{result=\"miss\"}".to_owned(), symbols.cache_misses as f64),
            ],
        );
        let r = lock(&self.registry).clone();
        family(
            "profiler_symbol_cache_files",
            "gauge",
            "Files in the symbol cache.",
            &one(r.cached_files),
        );
        family(
            "profiler_dwarf_over_budget_total",
            "counter",
            "Files whose DWARF was not loaded because it would take more than an eighth of the symbol cache (named from symbol tables).",
            &one(r.dwarf_over_budget),
        );
        family(
            "profiler_symbol_cache_bytes",
            "gauge",
            "Bytes held by the symbol cache.",
            &one(r.cached_bytes),
        );
        family(
            "profiler_symbol_cache_evictions_total",
            "counter",
            "Files dropped from the symbol cache.",
            &one(r.objects_evicted),
        );
        family(
            "profiler_relabel_dropped_samples_total",
            "counter",
            "Samples of processes a relabeling rule dropped.",
            &one(self.dropped_by_relabeling.load(Ordering::Relaxed)),
        );
        let folded: Vec<(String, f64)> = lock(&self.folded)
            .iter()
            .map(|(name, n)| (format!("{{label=\"{name}\"}}"), *n as f64))
            .collect();
        family(
            "profiler_label_values_folded_total",
            "counter",
            "Sample groups whose label value was folded into _overflow_ by the cardinality guard.",
            &folded,
        );
        if let Some(pods) = self.pods.get() {
            family(
                "profiler_kubernetes_pods",
                "gauge",
                "Pods of this node known from the API server.",
                &one(pods.pods.load(Ordering::Relaxed)),
            );
            family(
                "profiler_kubernetes_connected",
                "gauge",
                "1 when the last list or watch of the API server worked.",
                &one(u64::from(pods.connected.load(Ordering::Relaxed))),
            );
        }
        family(
            "profiler_profiles_total",
            "counter",
            "Interval profiles built.",
            &one(self.profiles.load(Ordering::Relaxed)),
        );
        family(
            "profiler_on_demand_profiles_total",
            "counter",
            "Profiles served by /debug/pprof/profile.",
            &one(self.on_demand.load(Ordering::Relaxed)),
        );
        family(
            "profiler_local_export_failures_total",
            "counter",
            "Failed writes of the file and archive exporters.",
            &one(self.export_failures.load(Ordering::Relaxed)),
        );
        let exporters = lock(&self.exporters);
        let per = |f: &dyn Fn(&ExporterView) -> u64| -> Vec<(String, f64)> {
            exporters
                .iter()
                .map(|e| {
                    (
                        format!("{{exporter=\"{}\",type=\"{}\"}}", e.name, e.kind),
                        f(e) as f64,
                    )
                })
                .collect()
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        family(
            "profiler_export_sent_total",
            "counter",
            "Profiles the backend accepted.",
            &per(&|e| get(&e.stats.sent)),
        );
        family(
            "profiler_export_sent_bytes_total",
            "counter",
            "Bytes of accepted profiles.",
            &per(&|e| get(&e.stats.sent_bytes)),
        );
        family(
            "profiler_export_failures_total",
            "counter",
            "Failed send attempts (each is retried).",
            &per(&|e| get(&e.stats.failures)),
        );
        family(
            "profiler_export_rejected_total",
            "counter",
            "Profiles the backend refused for good (dropped).",
            &per(&|e| get(&e.stats.rejected)),
        );
        family(
            "profiler_export_spool_dropped_total",
            "counter",
            "Unsent profiles dropped because the spool was full or unreadable.",
            &per(&|e| get(&e.stats.spool_dropped) + get(&e.stats.spool_unreadable)),
        );
        family(
            "profiler_export_spool_profiles",
            "gauge",
            "Profiles waiting in the spool.",
            &per(&|e| e.spool.usage().0),
        );
        family(
            "profiler_export_spool_bytes",
            "gauge",
            "Bytes waiting in the spool.",
            &per(&|e| e.spool.usage().1),
        );
        family(
            "profiler_export_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last accepted send.",
            &per(&|e| get(&e.stats.last_success)),
        );
        drop(exporters);
        let (cpu, rss) = own_usage();
        family(
            "process_cpu_seconds_total",
            "counter",
            "CPU time of the daemon (user + system).",
            &[(String::new(), cpu)],
        );
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the daemon.",
            &one(rss),
        );
        family(
            "profiler_uptime_seconds",
            "gauge",
            "Seconds since start.",
            &[(String::new(), self.started.elapsed().as_secs_f64())],
        );
        out
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
            let rest = &stat[stat.rfind(')')? + 2..];
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

    #[test]
    fn exposition_has_help_type_and_values() {
        let t = Telemetry::new(
            19,
            Arc::new(PipelineStats::default()),
            Arc::new(UnwindStats::default()),
        );
        let mut counters = CounterSnapshot::default();
        counters.0[Counter::Submitted as usize] = 42;
        counters.0[Counter::RingFull as usize] = 3;
        t.set_kernel_counters(counters);
        let text = t.render();
        assert!(text.contains("# TYPE profiler_samples_total counter\nprofiler_samples_total 42\n"));
        assert!(text.contains("profiler_samples_lost_total{reason=\"ring_buffer_full\"} 3\n"));
        assert!(text.contains("profiler_unwind_walks_total{status=\"frame-pointer-only\"} 0\n"));
        assert!(text.contains("process_resident_memory_bytes "));
        // Every sample line belongs to a family announced before it.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().expect("name").to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().expect("name");
                assert!(declared.contains(name), "undeclared {name}");
            }
        }
    }
}
