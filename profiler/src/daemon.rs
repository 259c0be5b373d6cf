//! Lifecycle: check → load BPF → spawn the stages → run the interval clock → stop cleanly.
//!
//! Stages and queues:
//! sampler (tokio task) → [`sampler::QUEUE_CAPACITY`] batches, full: drop newest + count →
//! aggregator (blocking thread) → [`report::QUEUE_CAPACITY`] snapshots, full: block →
//! reporter (blocking thread) → exporters.
//! Ctrl-C or SIGTERM: detach the programs, drain the ring buffer, flush the open interval,
//! export it, exit.
use std::{
    fs,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{
    sync::mpsc,
    task::JoinError,
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    aggregate::{self, Aggregator},
    bpf::{BpfError, BpfSession},
    config::SamplingConfig,
    export::Exporter,
    process::{CacheLimits, ProcessRegistry},
    report::{self, Reporter, RunSummary},
    sampler::{self, Message, PipelineStats},
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
}

pub struct Plan {
    pub sampling: SamplingConfig,
    /// Length of one profile.
    pub interval: Duration,
    /// Stop after the first interval (`record`).
    pub once: bool,
    pub exporters: Vec<Box<dyn Exporter>>,
    /// Byte budget of the parsed-file cache.
    pub symbol_cache_bytes: u64,
}

/// Maps each requested pid to its process (a thread id maps to its thread group).
pub fn resolve_pids(pids: &[u32]) -> Result<Vec<u32>, DaemonError> {
    let mut tgids = Vec::with_capacity(pids.len());
    for &pid in pids {
        let status =
            fs::read_to_string(format!("/proc/{pid}/status")).map_err(|_| DaemonError::NoSuchProcess(pid))?;
        let tgid = status
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(pid);
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

pub async fn run(plan: Plan) -> Result<RunSummary, DaemonError> {
    let pids = resolve_pids(&plan.sampling.pids)?;
    let frequency = plan.sampling.frequency.get();
    let mut session = BpfSession::start(frequency, &pids)?;
    let ring = session.take_samples()?;
    let stats = Arc::new(PipelineStats::default());
    let cancel = CancellationToken::new();

    let (tx, rx) = mpsc::channel(sampler::QUEUE_CAPACITY);
    let (snap_tx, snap_rx) = mpsc::channel(report::QUEUE_CAPACITY);
    let aggregator = Aggregator::new(
        ProcessRegistry::new(
            "/proc".into(),
            CacheLimits {
                max_bytes: plan.symbol_cache_bytes,
                ..CacheLimits::default()
            },
        ),
        SystemTime::now(),
        session.counters()?,
    );
    let sampler_task = tokio::spawn(sampler::run(ring, tx.clone(), Arc::clone(&stats), cancel.clone()));
    let aggregator_task = tokio::task::spawn_blocking(move || aggregate::run(aggregator, rx, snap_tx));
    let reporter = Reporter::new(frequency, session.event);
    let report_stats = Arc::clone(&stats);
    let exporters = plan.exporters;
    let report_task =
        tokio::task::spawn_blocking(move || report::run(reporter, snap_rx, exporters, report_stats));

    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut clock = tokio::time::interval_at(Instant::now() + plan.interval, plan.interval);
    // A late tick (stalled runtime) starts the next interval late instead of flushing twice.
    clock.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sampler_task = Some(sampler_task);
    let mut sampler_result = None;
    loop {
        tokio::select! {
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
