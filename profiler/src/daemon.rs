//! Lifecycle: check → load BPF → spawn the stages → run the interval clock → stop cleanly.
//!
//! Stages and queues:
//! sampler (tokio task) → [`crate::unwind::REQUEST_QUEUE`] load requests, full: drop + count →
//! unwind stage (thread; loads tables and mappings into BPF);
//! sampler → [`sampler::QUEUE_CAPACITY`] batches, full: drop newest + count →
//! aggregator (blocking thread) → [`report::QUEUE_CAPACITY`] snapshots, full: block →
//! reporter (blocking thread) → exporters.
//! Ctrl-C or SIGTERM: detach the programs, drain the ring buffer, flush the open interval,
//! export it, exit.
use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{
    sync::mpsc,
    task::JoinError,
    time::{Instant, MissedTickBehavior},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    aggregate::{self, Aggregator},
    bpf::{BpfError, BpfSession},
    config::{SamplingConfig, Unwinder},
    export::Exporter,
    labels::Labeler,
    metrics::{ExporterView, Telemetry},
    process::{CacheLimits, ProcessRegistry},
    remote::RemoteHandle,
    report::{self, Reporter, RunSummary},
    sampler::{self, Message, PipelineStats},
    server::{Endpoint, ServerSettings},
    unwind::UnwindStats,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no process with pid {0} (pids are those of the host pid namespace)")]
    NoSuchProcess(u32),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("reading the ring buffer: {0}")]
    Sampler(std::io::Error),
    #[error("a pipeline stage failed: {0}")]
    Stage(#[from] JoinError),
    #[error("starting the unwind stage: {0}")]
    Unwind(#[from] crate::unwind::UnwindError),
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error(transparent)]
    Targeting(#[from] crate::targeting::TargetError),
}

pub struct Plan {
    pub sampling: SamplingConfig,
    /// Length of one profile.
    pub interval: Duration,
    /// Stop after the first interval (`record`).
    pub once: bool,
    pub exporters: Vec<Box<dyn Exporter>>,
    /// The remote exporters among `exporters`: their metrics and their shutdown.
    pub remotes: Vec<RemoteHandle>,
    /// Byte budget of the parsed-file cache.
    pub symbol_cache_bytes: u64,
    /// The HTTP endpoint (checked: [`ServerSettings::check`] gave `tls`).
    pub server: ServerSettings,
    pub tls: Option<TlsAcceptor>,
    /// Discovery and relabeling of each process's labels.
    pub labeler: Labeler,
    /// The cardinality guard's limit per label per profile.
    pub label_value_limit: usize,
    /// This node's pods, when watched (for /metrics).
    pub pods: Option<Arc<crate::kube::PodIndex>>,
}

/// How long a stopping daemon keeps sending spooled profiles before it leaves them for the
/// next start.
pub const EXPORT_GRACE: Duration = Duration::from_secs(5);

/// Maps each requested pid to its process (a thread id maps to its thread group).
pub fn resolve_pids(pids: &[u32]) -> Result<Vec<u32>, DaemonError> {
    let mut tgids = Vec::with_capacity(pids.len());
    for &pid in pids {
        let tgid =
            crate::process::thread_group(Path::new("/proc"), pid).ok_or(DaemonError::NoSuchProcess(pid))?;
        if tgid != pid {
            info!(pid, tgid, "pid is a thread; profiling its whole process");
        }
        tgids.push(tgid);
    }
    tgids.sort_unstable();
    tgids.dedup();
    Ok(tgids)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(error) => {
            warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the profiler");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub async fn run(mut plan: Plan) -> Result<RunSummary, DaemonError> {
    let pids = resolve_pids(&plan.sampling.pids)?;
    let frequency = plan.sampling.frequency.get();
    let mut session = BpfSession::load(&plan.sampling, &pids)?;
    let ring = session.take_samples()?;
    let stats = Arc::new(PipelineStats::default());
    let cancel = CancellationToken::new();

    // Processes already running are loaded before the first tick, so their first samples
    // unwind; later ones are loaded on request, exec and reconciliation.
    let unwind_stats = Arc::new(UnwindStats::default());
    let (requests, unwinder_thread) = if plan.sampling.unwinder == Unwinder::Dwarf {
        let maps = session.take_unwind_maps()?;
        let mut unwinder = crate::unwind::Unwinder::new(maps, "/proc".into(), Arc::clone(&unwind_stats))?;
        unwinder.load_initial(&pids);
        let (requests, queue) = crate::unwind::request_queue(Arc::clone(&unwind_stats));
        let thread = std::thread::Builder::new()
            .name("unwind".into())
            .spawn(move || unwinder.run(queue))
            .map_err(DaemonError::Thread)?;
        (Some(requests), Some(thread))
    } else {
        (None, None)
    };
    // Cgroups and label selectors are resolved before the first tick and kept current.
    let targeting_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let targeting_thread = if plan.sampling.cgroups.is_empty() && plan.sampling.targets.is_empty() {
        None
    } else {
        let (cgroup_map, pid_map) = session.take_target_maps(!plan.sampling.targets.is_empty())?;
        let mut targeter = crate::targeting::Targeter::new(
            plan.sampling.cgroups.clone(),
            plan.sampling.targets.clone(),
            plan.labeler.clone(),
            pids.clone(),
            cgroup_map,
            pid_map,
        )?;
        targeter.refresh()?;
        let stop = Arc::clone(&targeting_stop);
        Some(
            std::thread::Builder::new()
                .name("targeting".into())
                .spawn(move || crate::targeting::run(targeter, stop))
                .map_err(DaemonError::Thread)?,
        )
    };
    session.attach()?;
    let telemetry = Arc::new(Telemetry::new(
        frequency,
        Arc::clone(&stats),
        Arc::clone(&unwind_stats),
    ));
    for remote in &plan.remotes {
        telemetry.add_exporter(ExporterView {
            name: remote.name.clone(),
            kind: remote.kind.as_str(),
            stats: Arc::clone(&remote.stats),
            spool: Arc::clone(&remote.spool),
        });
    }
    telemetry.set_kernel_counters(session.counters()?);
    if let Some(pods) = &plan.pods {
        let _ = telemetry.pods.set(Arc::clone(pods));
    }

    let (tx, rx) = mpsc::channel(sampler::QUEUE_CAPACITY);
    let (snap_tx, snap_rx) = mpsc::channel(report::QUEUE_CAPACITY);
    let aggregator = Aggregator::new(
        ProcessRegistry::new(
            "/proc".into(),
            CacheLimits {
                max_bytes: plan.symbol_cache_bytes,
                ..CacheLimits::default()
            },
        )
        .with_labeler(plan.labeler.clone()),
        SystemTime::now(),
        session.counters()?,
    );
    let drain_every = match plan.sampling.unwinder {
        Unwinder::Dwarf => sampler::DRAIN_EVERY,
        Unwinder::FramePointer => sampler::DRAIN_EVERY_FRAME_POINTERS,
    };
    let sampler_task = tokio::spawn(sampler::run(
        ring,
        drain_every,
        tx.clone(),
        Arc::clone(&stats),
        requests,
        cancel.clone(),
    ));
    let mut reporter = Reporter::new(frequency, session.event, Arc::clone(&unwind_stats))
        .with_label_value_limit(plan.label_value_limit);
    if let Some(names) = session.take_kernel_names() {
        reporter = reporter.with_kernel_names(names);
    }
    let report_stats = Arc::clone(&stats);
    let exporters = std::mem::take(&mut plan.exporters);
    let report_telemetry = Arc::clone(&telemetry);
    // The endpoint holds weak senders: the stages end when the pipeline's own senders go,
    // whatever requests are still open.
    let endpoint = Arc::new(Endpoint::new(
        tx.downgrade(),
        snap_tx.downgrade(),
        Arc::clone(&telemetry),
        &plan.server,
    ));
    let aggregator_task = tokio::task::spawn_blocking(move || aggregate::run(aggregator, rx, snap_tx));
    let report_task = tokio::task::spawn_blocking(move || {
        report::run(reporter, snap_rx, exporters, report_stats, report_telemetry)
    });
    let server_cancel = CancellationToken::new();
    crate::server::start(&plan.server, plan.tls.take(), endpoint, &server_cancel).await?;
    telemetry.ready.store(true, std::sync::atomic::Ordering::Relaxed);

    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut clock = tokio::time::interval_at(Instant::now() + plan.interval, plan.interval);
    // A late tick (stalled runtime) starts the next interval late instead of flushing twice.
    clock.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sampler_task = Some(sampler_task);
    let mut sampler_result = None;
    let mut telemetry_clock = tokio::time::interval(Duration::from_secs(1));
    telemetry_clock.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = telemetry_clock.tick() => telemetry.set_kernel_counters(session.counters()?),
            _ = clock.tick() => {
                if plan.once {
                    break;
                }
                let counters = session.counters()?;
                if tx.send(Message::Flush { end: SystemTime::now(), counters, last: false }).await.is_err() {
                    break;
                }
            }
            () = &mut stop => {
                info!("stopping: flushing the current interval (signal again to exit at once)");
                tokio::spawn(async {
                    shutdown_signal().await;
                    warn!("second stop signal: exiting without flushing");
                    std::process::exit(130);
                });
                break;
            }
            // The sampler only ends early on an error: stop instead of writing empty profiles.
            result = async { sampler_task.as_mut().expect("present until taken").await }, if sampler_task.is_some() => {
                telemetry.failed.store(true, std::sync::atomic::Ordering::Relaxed);
                sampler_task = None;
                sampler_result = Some(result);
                break;
            }
        }
    }

    session.stop();
    let counters = session.counters()?;
    cancel.cancel();
    let sampled = match (sampler_task, sampler_result) {
        (Some(task), _) => task.await?,
        (None, Some(result)) => result?,
        (None, None) => Ok(()),
    };
    // Whatever the sampler's fate, flush what was aggregated.
    let _ = tx
        .send(Message::Flush {
            end: SystemTime::now(),
            counters,
            last: true,
        })
        .await;
    drop(tx);
    aggregator_task.await?;
    let summary = report_task.await?;
    server_cancel.cancel();
    for remote in &mut plan.remotes {
        remote.shutdown(EXPORT_GRACE).await;
    }
    targeting_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(thread) = targeting_thread
        && thread.join().is_err()
    {
        warn!("the targeting stage panicked");
    }
    // The sampler task owned the request sender; with it gone the unwind stage ends.
    if let Some(thread) = unwinder_thread
        && thread.join().is_err()
    {
        warn!("the unwind stage panicked");
    }
    sampled.map_err(DaemonError::Sampler)?;
    let (received, dropped, malformed) = stats.load();
    info!(
        profiles = summary.profiles,
        received,
        dropped_queue_full = dropped,
        malformed,
        "profiler stopped"
    );
    Ok(summary)
}
