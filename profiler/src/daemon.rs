//! Lifecycle: resolve the pids → load BPF → start the stages ([`crate::stages`]) → attach →
//! run the interval clock → stop cleanly.
//!
//! Ctrl-C or SIGTERM: detach the programs, let the stages drain and export the open interval
//! ([`crate::stages::Running::stop`]), exit. A second signal exits at once (code 130), and a
//! stop that takes longer than [`STOP_DEADLINE`] (a wedged stage) exits with code 1.
use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use tokio::time::{Instant, MissedTickBehavior};
use tracing::{error, info, warn};

use crate::{
    bpf::{BpfError, BpfSession, SamplingConfig},
    stages::{self, StageError, report::RunSummary},
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no process with pid {0} (pids are those of the host pid namespace)")]
    NoSuchProcess(u32),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Stage(#[from] StageError),
}

/// What to run: the validated configuration and the exporters built from it.
pub struct Plan {
    pub sampling: SamplingConfig,
    /// Length of one profile.
    pub interval: Duration,
    /// Stop after the first interval (`record`).
    pub once: bool,
    /// Everything the stages are built from.
    pub stages: stages::Config,
}

/// Maps each requested pid to its process (a thread id maps to its thread group).
pub fn resolve_pids(pids: &[u32]) -> Result<Vec<u32>, DaemonError> {
    let mut tgids = Vec::with_capacity(pids.len());
    for &pid in pids {
        let tgid =
            crate::procfs::thread_group(Path::new("/proc"), pid).ok_or(DaemonError::NoSuchProcess(pid))?;
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

/// Longest a stop after SIGTERM may take (flushing the open interval, draining spools): the
/// daemon then exits whatever a stage is doing, well inside Kubernetes' 30 s grace period.
pub const STOP_DEADLINE: Duration = Duration::from_secs(9);

/// How long a stage may be on one item before /healthz fails: three intervals, and at least
/// 30 s (a first load of a large binary's tables and names can take seconds).
pub fn stall_after(interval: Duration) -> Duration {
    (interval * 3).max(Duration::from_secs(30))
}

fn pipeline_stall(telemetry: &crate::telemetry::Telemetry) -> String {
    match telemetry.stalled() {
        Some((stage, busy)) => format!("{stage} busy for {}s", busy.as_secs()),
        None => "none past the stall bound".to_owned(),
    }
}

/// What woke the daemon's loop.
enum Event {
    /// Time to refresh the kernel's counters for /metrics and on-demand profiles.
    Counters,
    /// The interval is over.
    Interval,
    Stop,
    /// The sampler ended, which it only does on an error.
    SamplerEnded(Result<std::io::Result<()>, tokio::task::JoinError>),
}

pub async fn run(plan: Plan) -> Result<RunSummary, DaemonError> {
    let pids = resolve_pids(&plan.sampling.pids)?;
    let mut session = BpfSession::load(&plan.sampling, &pids)?;
    let mut pipeline = stages::start(&mut session, &plan.sampling, &pids, plan.stages).await?;
    session.attach()?;
    pipeline.telemetry.set_stall_after(stall_after(plan.interval));
    pipeline.telemetry.set_ready();

    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut clock = tokio::time::interval_at(Instant::now() + plan.interval, plan.interval);
    // A late tick (stalled runtime) starts the next interval late instead of flushing twice.
    clock.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut counters_clock = tokio::time::interval(Duration::from_secs(1));
    counters_clock.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sampler_failed = None;
    let mut signalled = false;
    loop {
        let event = tokio::select! {
            _ = counters_clock.tick() => Event::Counters,
            _ = clock.tick() => Event::Interval,
            () = &mut stop => Event::Stop,
            ended = pipeline.sampler_ended() => Event::SamplerEnded(ended),
        };
        match event {
            Event::Counters => pipeline.stats.kernel.set(session.counters()?),
            Event::Interval => {
                if plan.once {
                    break;
                }
                // The send waits while the aggregator's queue is full: a stop signal still
                // ends the wait (a wedged aggregator must not make SIGTERM go unheard).
                let counters = session.counters()?;
                let flushed = tokio::select! {
                    flushed = pipeline.flush(SystemTime::now(), counters) => Some(flushed),
                    () = &mut stop => None,
                };
                match flushed {
                    Some(true) => {}
                    Some(false) => break,
                    None => {
                        info!("stopping: flushing the current interval (signal again to exit at once)");
                        signalled = true;
                        break;
                    }
                }
            }
            Event::Stop => {
                info!("stopping: flushing the current interval (signal again to exit at once)");
                signalled = true;
                break;
            }
            Event::SamplerEnded(ended) => {
                sampler_failed = Some(ended);
                break;
            }
        }
    }

    session.stop();
    let counters = session.counters()?;
    let telemetry = std::sync::Arc::clone(&pipeline.telemetry);
    let stopping = pipeline.stop(counters);
    let summary = if signalled {
        tokio::select! {
            summary = stopping => summary,
            () = shutdown_signal() => {
                warn!("second stop signal: exiting without flushing");
                std::process::exit(130);
            }
            () = tokio::time::sleep(STOP_DEADLINE) => {
                let stalled = pipeline_stall(&telemetry);
                error!(
                    deadline_s = STOP_DEADLINE.as_secs(),
                    stalled = %stalled,
                    "the stages did not stop in time: exiting without the open interval (spooled profiles stay on disk)"
                );
                std::process::exit(1);
            }
        }
    } else {
        stopping.await
    };
    if let Some(ended) = sampler_failed {
        ended.map_err(StageError::from)?.map_err(StageError::Sampler)?;
    }
    Ok(summary?)
}
