//! The stages and the one place that wires them.
//!
//! Only this module creates channels, spawns tasks and threads, and stops them. The engines
//! below it ([`crate::aggregate`], [`crate::report`], [`crate::unwind`], …) take values and
//! return values. [`start`] builds the pipeline from a loaded BPF session:
//!
//! ```text
//! sampler (task) ──Message (QUEUES[0])──▶ aggregator (thread) ──Job (QUEUES[1])──▶ reporter (thread) ─▶ exporters
//!    │  └──load requests (QUEUES[2])──▶ unwind (thread)                         endpoint ─┘ (on-demand)
//!    └ clock: Flush every interval                 targeting (thread), kube watch, senders, listeners (tasks)
//! ```
//!
//! Every task and thread gets a child of one [`CancellationToken`]; [`Running::stop`] cancels
//! them one by one in the order that loses nothing: the sampler drains the ring and hands its
//! backlog on, the aggregator flushes the last interval, the reporter exports it, the senders
//! get [`EXPORT_GRACE`] to empty their spools, and the listeners, targeting and the unwind stage
//! go last.
//!
//! Three spawns live elsewhere, each inside something this module started: a listener task
//! spawns one task per connection ([`crate::server::Listener::serve`]), an on-demand request
//! that goes away sends its tap's close message from a task of its own (a `Drop` cannot wait),
//! and the loader builds the eBPF loader on a short-lived scoped thread ([`crate::bpf`]).
pub mod aggregate;
pub mod budget;
pub mod report;
pub mod sampler;
pub mod targeting;
pub mod unwind;

use std::{
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use tokio::{
    sync::mpsc,
    task::{JoinError, JoinSet},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::{
    report::{ReportStats, RunSummary},
    sampler::PipelineStats,
};
use crate::{
    aggregate::Aggregator,
    bpf::{BpfError, BpfSession, SamplingConfig, Unwinder as UnwinderMode},
    export::Exporter,
    kube::Connection,
    labels::{Labeler, PodIndex},
    messages::{Job, Message},
    process::{CacheLimits, ProcessRegistry},
    remote::{Exporters, RemoteHandle, Sender},
    report::Reporter,
    server::{Endpoint, ServerError, ServerSettings},
    targeting::{TargetError, Targeter},
    telemetry::{Collect, Exposition, Kind, Telemetry},
    unwind::{UnwindError, UnwindStats},
};

/// What a queue between two stages does when its consumer falls behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// The producer waits for room: nothing is lost, the producer slows down.
    Block,
    /// The newest item is dropped and counted (the producer never waits).
    DropNewest,
}

impl WhenFull {
    fn as_str(self) -> &'static str {
        match self {
            WhenFull::Block => "block",
            WhenFull::DropNewest => "drop_newest",
        }
    }
}

/// A queue between two stages: its capacity and its policy when full (both on /metrics as
/// `profiler_queue_capacity`); what a dropping queue drops is counted by its producer.
#[derive(Debug, Clone, Copy)]
pub struct Queue {
    pub name: &'static str,
    pub capacity: usize,
    pub when_full: WhenFull,
}

/// Every queue of the pipeline.
pub const QUEUES: [Queue; 3] = [
    Queue {
        name: "samples",
        capacity: sampler::QUEUE_CAPACITY,
        // The sampler keeps a backlog of `MAX_BACKLOG_BYTES` (8 MiB) while the queue is full; past
        // it the newest samples are dropped, counted as
        // `profiler_samples_lost_total{reason="aggregator_queue_full"}`.
        when_full: WhenFull::DropNewest,
    },
    Queue {
        name: "snapshots",
        capacity: report::QUEUE_CAPACITY,
        // A slow reporter holds the aggregator back; the sampler's backlog then fills.
        when_full: WhenFull::Block,
    },
    Queue {
        name: "unwind_requests",
        capacity: unwind::REQUEST_QUEUE,
        // Counted as `profiler_unwind_requests_dropped_total`; the process's next sample asks
        // again.
        when_full: WhenFull::DropNewest,
    },
];

/// How long a stopping daemon keeps sending spooled profiles before it leaves them for the
/// next start.
pub const EXPORT_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("reading the ring buffer: {0}")]
    Sampler(std::io::Error),
    #[error("a pipeline stage failed: {0}")]
    Join(#[from] JoinError),
    #[error("starting the unwind stage: {0}")]
    Unwind(#[from] UnwindError),
    #[error("starting the {stage} thread: {source}")]
    Thread {
        stage: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Targeting(#[from] TargetError),
}

/// What the pipeline is built from, besides the BPF session and the sampling settings.
pub struct Config {
    pub exporters: Vec<Box<dyn Exporter>>,
    /// The remote exporters among `exporters`: their metrics, senders and drain at stop.
    pub remotes: Vec<(RemoteHandle, Sender)>,
    /// Byte budget of the parsed-file cache.
    pub symbol_cache_bytes: u64,
    pub server: ServerSettings,
    pub tls: Option<TlsAcceptor>,
    pub labeler: Labeler,
    /// The cardinality guard's limit per label per profile.
    pub label_value_limit: usize,
    /// The Kubernetes API and this node's name, to watch its pods for labels.
    pub kube: Option<(Connection, String)>,
}

/// Files a process named that [`rootfs::open`](crate::rootfs::open) refused, by reason.
struct FileRefusals;

impl Collect for FileRefusals {
    fn collect(&self, out: &mut Exposition) {
        let mut family = out.family(
            "profiler_file_refusals_total",
            Kind::Counter,
            "Files a process named (mapped binaries, debug files, perf maps) that were refused: a magic link or link loop, not a regular file, or not the mapped inode.",
        );
        for reason in crate::rootfs::Refusal::ALL {
            family.sample(
                &[("reason", reason.as_str())],
                crate::rootfs::REFUSALS.count(reason) as f64,
            );
        }
    }
}

/// Bounds a file or process ran into ([`crate::limits`]), by name.
struct LimitHits;

impl Collect for LimitHits {
    fn collect(&self, out: &mut Exposition) {
        let mut family = out.family(
            "profiler_limit_hits_total",
            Kind::Counter,
            "Times a file or process reached a bound (docs/reliability.md) and was skipped or cut short there.",
        );
        for limit in crate::limits::Limit::ALL {
            family.sample(
                &[("limit", limit.as_str())],
                crate::limits::HITS.count(limit) as f64,
            );
        }
    }
}

/// The memory budget of these settings on this machine, and the cgroup's limit; a warning
/// when the sum does not fit.
fn memory_budget(sampling: &SamplingConfig, symbol_cache_bytes: u64) -> budget::Budget {
    let sizing = budget::Sizing {
        symbol_cache_bytes,
        unwind_rows: if sampling.unwinder == UnwinderMode::Dwarf {
            sampling.unwind_rows
        } else {
            0
        },
        frequency_hz: sampling.frequency.get(),
        cpus: aya::util::nr_cpus().map_or(1, |n| n as u32),
    };
    let parts = budget::parts(&sizing);
    let total = budget::total(&parts);
    let limit = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| budget::cgroup_limit(&text, std::path::Path::new("/sys/fs/cgroup")));
    match limit {
        Some(limit) if total > limit => warn!(
            budget_mib = total >> 20,
            limit_mib = limit >> 20,
            "the memory budget is larger than the cgroup's limit: lower --symbol-cache-size or --unwind-table-size, or raise the limit (docs/architecture.md, bounds)"
        ),
        _ => tracing::debug!(
            budget_mib = total >> 20,
            limit_mib = limit.map(|l| l >> 20),
            "memory budget"
        ),
    }
    budget::Budget { parts, limit }
}

/// Queue depths for /metrics, read through weak senders (they keep no stage alive).
struct QueueDepths {
    samples: mpsc::WeakSender<Message>,
    snapshots: mpsc::WeakSender<Job>,
}

impl Collect for QueueDepths {
    fn collect(&self, out: &mut Exposition) {
        let depth = |max: usize, free: Option<usize>| free.map_or(0, |free| max.saturating_sub(free));
        let samples = depth(QUEUES[0].capacity, self.samples.upgrade().map(|s| s.capacity()));
        let snapshots = depth(QUEUES[1].capacity, self.snapshots.upgrade().map(|s| s.capacity()));
        let mut capacity = out.family(
            "profiler_queue_capacity",
            Kind::Gauge,
            "Capacity of a queue between two stages, with its policy when full.",
        );
        for q in &QUEUES {
            capacity.sample(
                &[("queue", q.name), ("when_full", q.when_full.as_str())],
                q.capacity as f64,
            );
        }
        out.family(
            "profiler_queue_depth",
            Kind::Gauge,
            "Items waiting in a queue between two stages.",
        )
        .sample(&[("queue", QUEUES[0].name)], samples as f64)
        .sample(&[("queue", QUEUES[1].name)], snapshots as f64);
    }
}

/// A stage on a thread of its own.
struct Thread {
    name: &'static str,
    handle: JoinHandle<()>,
}

impl Thread {
    fn spawn(name: &'static str, f: impl FnOnce() + Send + 'static) -> Result<Self, StageError> {
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|source| StageError::Thread { stage: name, source })?;
        Ok(Self { name, handle })
    }

    /// Wakes the thread from a parked wait (it then sees its token cancelled) and joins it.
    fn join(self) {
        self.handle.thread().unpark();
        if self.handle.join().is_err() {
            warn!(stage = self.name, "a stage panicked");
        }
    }
}

/// The running pipeline.
pub struct Running {
    cancel: CancellationToken,
    /// The pipeline's own sender into the aggregator (the clock's flushes go through it).
    tx: mpsc::Sender<Message>,
    sampler: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    sampler_cancel: CancellationToken,
    aggregator: tokio::task::JoinHandle<()>,
    reporter: tokio::task::JoinHandle<RunSummary>,
    unwind: Option<Thread>,
    targeting: Option<Thread>,
    /// Listeners, exporters' senders and the kube watch: stopped together.
    tasks: JoinSet<()>,
    tasks_cancel: CancellationToken,
    remotes: Vec<RemoteHandle>,
    pub stats: Arc<PipelineStats>,
    pub telemetry: Arc<Telemetry>,
}

/// Builds every stage from a loaded (not yet attached) session and starts them. Processes
/// already running, and the targeting selection, are loaded before this returns, so the first
/// samples after [`BpfSession::attach`] unwind and are filtered.
///
/// `pids` are the processes the unwind stage loads before the first tick (empty: those
/// running).
pub async fn start(
    session: &mut BpfSession,
    sampling: &SamplingConfig,
    pids: &[u32],
    config: Config,
) -> Result<Running, StageError> {
    let cancel = CancellationToken::new();
    let telemetry = Arc::new(Telemetry::new());
    telemetry.register(Arc::new(memory_budget(sampling, config.symbol_cache_bytes)));
    let frequency = sampling.frequency.get();
    let stats = Arc::new(PipelineStats::new(frequency));
    // One reading for /metrics and for the first interval's start, so both count from here.
    let counters = session.counters()?;
    stats.kernel.set(counters);
    telemetry.register(Arc::clone(&stats) as Arc<dyn Collect>);
    let ring = session.take_samples()?;
    let mut tasks = JoinSet::new();
    let tasks_cancel = cancel.child_token();

    let unwind_stats = Arc::new(UnwindStats::default());
    telemetry.register(Arc::clone(&unwind_stats) as Arc<dyn Collect>);
    let (requests, unwind) = if sampling.unwinder == UnwinderMode::Dwarf {
        let maps = session.take_unwind_maps()?;
        let mut unwinder = crate::unwind::Unwinder::new(maps, "/proc".into(), Arc::clone(&unwind_stats))?;
        unwinder.load_initial(pids);
        let (requests, queue) = unwind::request_queue(Arc::clone(&unwind_stats));
        let token = cancel.child_token();
        let beat = telemetry.heartbeat("unwind");
        let thread = Thread::spawn("unwind", move || unwind::run(unwinder, queue, token, &beat))?;
        (Some(requests), Some(thread))
    } else {
        (None, None)
    };

    let mut labeler = config.labeler;
    if let Some((connection, node)) = config.kube {
        let index = Arc::new(PodIndex::default());
        info!(node = %node, server = %connection.server, "watching this node's pods for labels");
        tasks.spawn(crate::kube::watch(
            connection,
            node,
            Arc::clone(&index),
            tasks_cancel.clone(),
        ));
        telemetry.register(Arc::clone(&index) as Arc<dyn Collect>);
        labeler = labeler.with_pods(index);
    }

    let targeting = if sampling.cgroups.is_empty() && sampling.targets.is_empty() {
        None
    } else {
        let (cgroup_map, pid_map) = session.take_target_maps(!sampling.targets.is_empty())?;
        let mut targeter = Targeter::new(
            sampling.cgroups.clone(),
            sampling.targets.clone(),
            labeler.clone(),
            pids.to_vec(),
            cgroup_map,
            pid_map,
        )?;
        targeter.refresh()?;
        let token = cancel.child_token();
        Some(Thread::spawn("targeting", move || {
            targeting::run(targeter, token)
        })?)
    };

    let mut remotes = Vec::with_capacity(config.remotes.len());
    for (handle, sender) in config.remotes {
        tasks.spawn(sender.run(tasks_cancel.clone()));
        remotes.push(handle);
    }
    telemetry.register(Arc::new(Exporters(remotes.clone())));

    let (tx, rx) = mpsc::channel(QUEUES[0].capacity);
    let (snap_tx, snap_rx) = mpsc::channel(QUEUES[1].capacity);
    let registry = ProcessRegistry::new(
        "/proc".into(),
        CacheLimits {
            max_bytes: config.symbol_cache_bytes,
            ..CacheLimits::default()
        },
    )
    .with_labeler(labeler);
    let aggregator = Aggregator::new(registry, SystemTime::now(), counters);
    let drain_every = match sampling.unwinder {
        UnwinderMode::Dwarf => sampler::DRAIN_EVERY,
        UnwinderMode::FramePointer => sampler::DRAIN_EVERY_FRAME_POINTERS,
    };
    let sampler_cancel = cancel.child_token();
    let sampler = tokio::spawn(sampler::run(
        ring,
        drain_every,
        tx.clone(),
        Arc::clone(&stats),
        requests,
        sampler_cancel.clone(),
    ));
    let mut reporter = Reporter::new(frequency, session.event, Arc::clone(&unwind_stats))
        .with_label_value_limit(config.label_value_limit);
    if let Some(names) = session.take_kernel_names() {
        reporter = reporter.with_kernel_names(names);
    }
    let report_stats = Arc::new(ReportStats::default());
    telemetry.register(Arc::clone(&report_stats) as Arc<dyn Collect>);
    telemetry.register(Arc::new(FileRefusals));
    telemetry.register(Arc::new(LimitHits));
    telemetry.register(Arc::new(QueueDepths {
        samples: tx.downgrade(),
        snapshots: snap_tx.downgrade(),
    }));
    // The endpoint holds weak senders: the stages end when the pipeline's own senders go,
    // whatever requests are still open.
    let endpoint = Arc::new(Endpoint::new(
        tx.downgrade(),
        snap_tx.downgrade(),
        Arc::clone(&telemetry),
        Arc::clone(&stats.kernel),
        &config.server,
    ));
    telemetry.register(Arc::clone(&endpoint) as Arc<dyn Collect>);
    let beat = telemetry.heartbeat("aggregator");
    let aggregator = tokio::task::spawn_blocking(move || aggregate::run(aggregator, rx, snap_tx, &beat));
    let exporters = config.exporters;
    let pipeline = Arc::clone(&stats);
    let beat = telemetry.heartbeat("reporter");
    let reporter = tokio::task::spawn_blocking(move || {
        report::run(reporter, snap_rx, exporters, pipeline, report_stats, &beat)
    });
    for listener in crate::server::bind(&config.server, config.tls, endpoint).await? {
        tasks.spawn(listener.serve(tasks_cancel.clone()));
    }
    Ok(Running {
        cancel,
        tx,
        sampler: Some(sampler),
        sampler_cancel,
        aggregator,
        reporter,
        unwind,
        targeting,
        tasks,
        tasks_cancel,
        remotes,
        stats,
        telemetry,
    })
}

impl Running {
    /// Closes the interval at `end` with the kernel's counters as of now; false when the
    /// aggregator is gone.
    pub async fn flush(&self, end: SystemTime, counters: crate::sample::CounterSnapshot) -> bool {
        self.tx
            .send(Message::Flush {
                end,
                counters,
                last: false,
            })
            .await
            .is_ok()
    }

    /// Resolves when the sampler ended on its own, which it only does on an error (the caller
    /// then stops instead of writing empty profiles). Pending while it runs, and once its end
    /// was taken.
    pub async fn sampler_ended(&mut self) -> Result<std::io::Result<()>, JoinError> {
        match self.sampler.as_mut() {
            Some(task) => {
                let result = task.await;
                self.sampler = None;
                self.telemetry.set_failed();
                result
            }
            None => std::future::pending().await,
        }
    }

    /// Stops every stage in order (see the module's doc) and returns the run's totals.
    /// `counters` are the kernel's, read after the programs were detached.
    pub async fn stop(mut self, counters: crate::sample::CounterSnapshot) -> Result<RunSummary, StageError> {
        self.sampler_cancel.cancel();
        let sampled = match self.sampler.take() {
            Some(task) => task.await?,
            None => Ok(()),
        };
        // Whatever the sampler's fate, flush what was aggregated.
        let _ = self
            .tx
            .send(Message::Flush {
                end: SystemTime::now(),
                counters,
                last: true,
            })
            .await;
        drop(self.tx);
        self.aggregator.await?;
        let summary = self.reporter.await?;
        for remote in &self.remotes {
            remote.drain(EXPORT_GRACE).await;
        }
        self.tasks_cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
        for remote in &self.remotes {
            remote.report_left();
        }
        // The unwind stage ends when the sampler's request sender is gone, or here.
        self.cancel.cancel();
        for thread in [self.targeting, self.unwind].into_iter().flatten() {
            thread.join();
        }
        sampled.map_err(StageError::Sampler)?;
        let (received, dropped, malformed) = self.stats.load();
        info!(
            profiles = summary.profiles,
            received,
            dropped_queue_full = dropped,
            malformed,
            "profiler stopped"
        );
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::{Counter, UNWIND_STATUS_SLOTS, UnwindStatus};

    use super::*;
    use crate::sample::CounterSnapshot;

    /// Every source the wiring registers, as /metrics renders them together.
    #[test]
    fn the_registry_renders_every_family_once_with_its_owners_figures() {
        let telemetry = Telemetry::new();
        let stats = Arc::new(PipelineStats::new(19));
        let mut counters = CounterSnapshot::default();
        counters.0[Counter::Submitted as usize] = 42;
        counters.0[Counter::RingFull as usize] = 3;
        counters.0[(UNWIND_STATUS_SLOTS + UnwindStatus::MaxDepth as u32) as usize] = 7;
        stats.kernel.set(counters);
        stats
            .dropped_queue_full
            .store(5, std::sync::atomic::Ordering::Relaxed);
        let (tx, _rx) = mpsc::channel::<Message>(QUEUES[0].capacity);
        let (snap_tx, _snap_rx) = mpsc::channel::<Job>(QUEUES[1].capacity);
        telemetry.register(Arc::clone(&stats) as Arc<dyn Collect>);
        telemetry.register(Arc::new(UnwindStats::default()));
        telemetry.register(Arc::new(ReportStats::default()));
        telemetry.register(Arc::new(Exporters(Vec::new())));
        telemetry.register(Arc::new(PodIndex::default()));
        telemetry.register(Arc::new(FileRefusals));
        telemetry.register(Arc::new(LimitHits));
        telemetry.register(Arc::new(QueueDepths {
            samples: tx.downgrade(),
            snapshots: snap_tx.downgrade(),
        }));
        telemetry.register(Arc::new(budget::Budget {
            parts: budget::parts(&budget::Sizing {
                symbol_cache_bytes: 64 << 20,
                unwind_rows: 1 << 20,
                frequency_hz: 19,
                cpus: 2,
            }),
            limit: Some(384 << 20),
        }));
        let text = telemetry.render();
        for line in [
            "profiler_sampling_frequency_hz 19\n",
            "# TYPE profiler_samples_total counter\nprofiler_samples_total 42\n",
            "profiler_samples_lost_total{reason=\"ring_buffer_full\"} 3\n",
            "profiler_samples_lost_total{reason=\"aggregator_queue_full\"} 5\n",
            "profiler_unwind_walks_total{status=\"frame-pointer-only\"} 0\n",
            "profiler_unwind_walks_total{status=\"max-depth\"} 7\n",
            "profiler_bpf_map_capacity_entries{map=\"MAPPINGS\"} 262144\n",
            "profiler_symbolized_frames_total{outcome=\"named\"} 0\n",
            "# TYPE profiler_file_refusals_total counter\n",
            "profiler_limit_hits_total{limit=\"dwarf_depth\"} ",
            "profiler_limit_hits_total{limit=\"pod_metadata\"} ",
            "profiler_memory_budget_bytes{part=\"symbol_cache\",memory=\"user\"} 67108864\n",
            "profiler_memory_budget_bytes{part=\"unwind_tables\",memory=\"kernel\"} 8388608\n",
            "# TYPE profiler_memory_budget_total_bytes gauge\n",
            "profiler_memory_limit_bytes 402653184\n",
            "profiler_kubernetes_connected 0\n",
            "profiler_queue_capacity{queue=\"samples\",when_full=\"drop_newest\"} 64\n",
            "profiler_queue_capacity{queue=\"snapshots\",when_full=\"block\"} 2\n",
            "profiler_queue_capacity{queue=\"unwind_requests\",when_full=\"drop_newest\"} 1024\n",
            "profiler_queue_depth{queue=\"samples\"} 0\n",
            "process_resident_memory_bytes ",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().expect("name").to_owned();
                assert!(declared.insert(name.clone()), "{name} is written by two sources");
            }
        }
        assert!(declared.len() >= 40, "{} families", declared.len());
    }
}
