//! The report stage: a blocking thread that turns each snapshot into a profile
//! ([`Reporter::build`]: symbolize, encode) and hands it to the exporters, or answers an
//! on-demand request with it. ELF parsing and kallsyms reads stay off the sampling path.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use profiler_common::Counter;
use tokio::sync::mpsc;
use tracing::{error, info};

use super::sampler::PipelineStats;
use crate::{
    encode::gzip,
    export::{EncodedProfile, Exporter},
    messages::Job,
    process::RegistryStats,
    report::{Report, Reporter},
    sample::CounterSnapshot,
    symbolize::{SymbolStats, Unresolved},
    telemetry::{Collect, Exposition, Heartbeat, Kind},
};

/// Capacity of the aggregator → reporter queue. Two snapshots: one being reported, one
/// waiting; a third blocks the aggregator (policy when full: block).
pub const QUEUE_CAPACITY: usize = 2;

/// What the report stage counts, cumulative, for /metrics.
#[derive(Debug, Default)]
pub struct ReportStats {
    /// The symbol cache's figures as of the last interval.
    registry: Mutex<RegistryStats>,
    /// Frames named / not named (by reason), summed over every profile built.
    symbols: Mutex<SymbolStats>,
    profiles: AtomicU64,
    export_failures: AtomicU64,
    /// Samples of processes dropped by relabeling rules.
    dropped_by_relabeling: AtomicU64,
    /// Label values folded by the cardinality guard, per label name.
    folded: Mutex<BTreeMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ReportStats {
    fn add_symbols(&self, stats: &SymbolStats) {
        let mut total = lock(&self.symbols);
        total.named += stats.named;
        total.cache_hits += stats.cache_hits;
        total.cache_misses += stats.cache_misses;
        for (reason, n) in &stats.unresolved {
            *total.unresolved.entry(*reason).or_default() += n;
        }
    }

    fn add_labels(&self, dropped: u64, folded: &BTreeMap<String, u64>) {
        self.dropped_by_relabeling.fetch_add(dropped, Ordering::Relaxed);
        let mut total = lock(&self.folded);
        for (name, n) in folded {
            *total.entry(name.clone()).or_default() += n;
        }
    }
}

impl Collect for ReportStats {
    fn collect(&self, out: &mut Exposition) {
        let symbols = lock(&self.symbols).clone();
        let mut frames = out.family(
            "profiler_symbolized_frames_total",
            Kind::Counter,
            "Distinct frames of built profiles, named or why not.",
        );
        frames.sample(&[("outcome", "named")], symbols.named as f64);
        for reason in [
            Unresolved::NoSymbol,
            Unresolved::ObjectUnreadable,
            Unresolved::NoFile,
            Unresolved::NoMapping,
            Unresolved::KernelSymbolsUnavailable,
        ] {
            let n = symbols.unresolved.get(&reason).copied().unwrap_or(0);
            frames.sample(&[("outcome", reason.name())], n as f64);
        }
        out.family(
            "profiler_symbol_name_cache_lookups_total",
            Kind::Counter,
            "File frames named from the (file, address) name cache (hit) or looked up in the file (miss).",
        )
        .sample(&[("result", "hit")], symbols.cache_hits as f64)
        .sample(&[("result", "miss")], symbols.cache_misses as f64);
        let r = lock(&self.registry).clone();
        out.gauge(
            "profiler_symbol_cache_files",
            "Files in the symbol cache.",
            r.cached_files as f64,
        );
        out.counter(
            "profiler_dwarf_over_budget_total",
            "Files whose DWARF was not loaded because it would take more than an eighth of the symbol cache (named from symbol tables).",
            r.dwarf_over_budget,
        );
        out.gauge(
            "profiler_symbol_cache_bytes",
            "Bytes held by the symbol cache.",
            r.cached_bytes as f64,
        );
        out.counter(
            "profiler_symbol_cache_evictions_total",
            "Files dropped from the symbol cache.",
            r.objects_evicted,
        );
        out.counter(
            "profiler_relabel_dropped_samples_total",
            "Samples of processes a relabeling rule dropped.",
            self.dropped_by_relabeling.load(Ordering::Relaxed),
        );
        let mut folded = out.family(
            "profiler_label_values_folded_total",
            Kind::Counter,
            "Sample groups whose label value was folded into _overflow_ by the cardinality guard.",
        );
        for (name, n) in lock(&self.folded).iter() {
            folded.sample(&[("label", name)], *n as f64);
        }
        out.counter(
            "profiler_profiles_total",
            "Interval profiles built.",
            self.profiles.load(Ordering::Relaxed),
        );
        out.counter(
            "profiler_local_export_failures_total",
            "Failed writes of the file and archive exporters.",
            self.export_failures.load(Ordering::Relaxed),
        );
    }
}

/// Totals of a whole run, returned when the report stage ends.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub profiles: u64,
    pub samples: u64,
    pub written: Vec<PathBuf>,
    pub export_failures: Vec<String>,
    pub counters: CounterSnapshot,
    /// The last profile built (what `record` summarizes).
    pub last: Option<Report>,
}

/// Builds and delivers every job until the aggregator is gone; returns the run's totals.
pub fn run(
    mut reporter: Reporter,
    mut rx: mpsc::Receiver<Job>,
    mut exporters: Vec<Box<dyn Exporter>>,
    pipeline: Arc<PipelineStats>,
    stats: Arc<ReportStats>,
    beat: &Heartbeat,
) -> RunSummary {
    let mut summary = RunSummary::default();
    while let Some(job) = rx.blocking_recv() {
        let _busy = beat.busy();
        let snap = match job {
            Job::Interval(snap) => snap,
            Job::OnDemand { snapshot, reply } => {
                let report = reporter.build(&snapshot, pipeline.load());
                stats.add_symbols(&report.symbols);
                info!(
                    samples = snapshot.samples(),
                    processes = snapshot.processes.len(),
                    "on-demand profile built"
                );
                // The requester may have gone away meanwhile; nothing to do then.
                let _ = reply.send(gzip(&report.profile));
                continue;
            }
        };
        let report = reporter.build(&snap, pipeline.load());
        stats.add_symbols(&report.symbols);
        *lock(&stats.registry) = snap.registry.clone();
        stats.add_labels(snap.dropped_by_relabeling, &report.folded);
        let samples = snap.samples();
        let unresolved: u64 = report.symbols.unresolved.values().sum();
        info!(
            samples,
            processes = snap.processes.len(),
            stacks = snap.stacks.len(),
            named_frames = report.symbols.named,
            unnamed_frames = unresolved,
            lost_ring_full = snap.counters.get(Counter::RingFull),
            "profile built"
        );
        let encoded = EncodedProfile {
            gzip: gzip(&report.profile),
            start: snap.start,
            end: snap.end,
            samples,
        };
        for exporter in &mut exporters {
            match exporter.export(&encoded) {
                Ok(Some(path)) => summary.written.push(path),
                Ok(None) => {}
                Err(e) => {
                    error!(exporter = exporter.name(), error = %e, "export failed");
                    stats.export_failures.fetch_add(1, Ordering::Relaxed);
                    summary.export_failures.push(format!("{}: {e}", exporter.name()));
                }
            }
        }
        stats.profiles.fetch_add(1, Ordering::Relaxed);
        summary.profiles += 1;
        summary.samples += samples;
        for (total, add) in summary.counters.0.iter_mut().zip(snap.counters.0) {
            *total += add;
        }
        summary.last = Some(report);
    }
    summary
}
