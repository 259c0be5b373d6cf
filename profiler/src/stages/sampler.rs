//! The sampler stage: a tokio task that drains the ring buffer, decodes each record
//! ([`crate::sample::decode`]) and sends the samples to the aggregator in batches.
//!
//! Policy when the aggregator's queue is full: samples wait in a backlog of at most
//! [`MAX_BACKLOG_BYTES`]; past it the newest are dropped and counted (`aggregator_queue_full`).
//! The ring buffer itself never waits for us: when it is full the kernel drops and counts.
//! Queue and backlog together hold at most [`MAX_QUEUED_BYTES`], whatever the stacks' depth.
use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::maps::{MapData, RingBuf};
use foldhash::HashMap;
use profiler_common::{Counter, UNWIND_STATUS_SLOTS, UNWIND_STATUSES, UnwindStatus};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::unwind::Requests;
use crate::{
    messages::Message,
    sample::{KernelCounters, Sample, decode},
    telemetry::{Collect, Exposition, Kind},
};

/// What the kernel and the sampler counted: the kernel's counters as last read (every second,
/// by the daemon's clock) and the userspace pipeline's own.
#[derive(Debug, Default)]
pub struct PipelineStats {
    /// Samples per second per CPU.
    pub frequency: u32,
    /// Shared with the endpoint, whose on-demand profiles report what happened while they ran.
    pub kernel: Arc<KernelCounters>,
    pub received: AtomicU64,
    /// Samples dropped because the aggregator's queue was full (policy: drop newest, count).
    pub dropped_queue_full: AtomicU64,
    pub malformed: AtomicU64,
}

impl PipelineStats {
    pub fn new(frequency: u32) -> Self {
        Self {
            frequency,
            ..Self::default()
        }
    }

    /// (received, dropped because the queue was full, malformed) since start.
    pub fn load(&self) -> (u64, u64, u64) {
        (
            self.received.load(Ordering::Relaxed),
            self.dropped_queue_full.load(Ordering::Relaxed),
            self.malformed.load(Ordering::Relaxed),
        )
    }
}

impl Collect for PipelineStats {
    fn collect(&self, out: &mut Exposition) {
        let k = self.kernel.get();
        out.gauge(
            "profiler_sampling_frequency_hz",
            "Samples per second per CPU.",
            f64::from(self.frequency),
        );
        out.counter(
            "profiler_kernel_events_total",
            "perf events the BPF program ran for.",
            k.get(Counter::Events),
        );
        out.counter(
            "profiler_samples_total",
            "Samples written to the ring buffer.",
            k.get(Counter::Submitted),
        );
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        out.family(
            "profiler_samples_lost_total",
            Kind::Counter,
            "Samples lost, by where.",
        )
        .sample(&[("reason", "ring_buffer_full")], k.get(Counter::RingFull) as f64)
        .sample(
            &[("reason", "aggregator_queue_full")],
            get(&self.dropped_queue_full),
        )
        .sample(&[("reason", "malformed")], get(&self.malformed));
        out.counter(
            "profiler_idle_ticks_total",
            "Ticks in the idle task (not recorded).",
            k.get(Counter::Idle),
        );
        out.counter(
            "profiler_filtered_ticks_total",
            "Ticks of processes outside the selection.",
            k.get(Counter::FilteredOut),
        );
        out.family(
            "profiler_stack_errors_total",
            Kind::Counter,
            "Failed kernel stack walks and user frame-pointer walks.",
        )
        .sample(&[("stack", "kernel")], k.get(Counter::KernelStackError) as f64)
        .sample(&[("stack", "user")], k.get(Counter::UserStackError) as f64);
        out.counter(
            "profiler_process_events_lost_total",
            "Exec/exit events lost because their ring buffer was full.",
            k.get(Counter::ProcEventsLost),
        );
        let mut walks = out.family(
            "profiler_unwind_walks_total",
            Kind::Counter,
            "User stack walks by how they ended.",
        );
        for s in 0..UNWIND_STATUSES {
            if let Some(status) = UnwindStatus::from_u8(s as u8) {
                walks.sample(
                    &[("status", status.name())],
                    k.0[(UNWIND_STATUS_SLOTS + s) as usize] as f64,
                );
            }
        }
    }
}

/// Capacity of the sampler → aggregator queue, in batches of at most [`MAX_BATCH`] samples and
/// [`MAX_BATCH_BYTES`]. Sending batches rather than single samples spares the aggregator thread
/// a wakeup per sample. While the queue is full, drains go into the sampler's backlog (merged
/// into batches, at most [`MAX_BACKLOG_BYTES`]), so many small drains (first-sample wakeups
/// when many processes start) cannot fill the queue with tiny batches and lose samples.
pub const QUEUE_CAPACITY: usize = 64;
/// Most samples in one batch.
pub const MAX_BATCH: usize = 4096;
/// Most bytes of samples (see [`footprint`]) in one batch: ~400 samples of 30 frames, ~40 of
/// the deepest stacks.
pub const MAX_BATCH_BYTES: usize = 128 << 10;
/// Most bytes of samples waiting in the sampler while the queue is full (8 MiB); past it,
/// new samples are dropped and counted as `dropped (queue full)`.
pub const MAX_BACKLOG_BYTES: usize = QUEUE_CAPACITY * MAX_BATCH_BYTES;
/// Most bytes of samples between the ring buffer and the aggregator: the full queue plus the
/// full backlog (16 MiB). Before it was bounded by count, 524,288 samples of the deepest stacks
/// were ~1.6 GB.
pub const MAX_QUEUED_BYTES: usize = QUEUE_CAPACITY * MAX_BATCH_BYTES + MAX_BACKLOG_BYTES;
const _: () = assert!(MAX_QUEUED_BYTES <= 16 << 20);

/// The heap and inline bytes one sample holds while it waits.
pub fn footprint(sample: &Sample) -> usize {
    std::mem::size_of::<Sample>()
        + sample.comm.len()
        + std::mem::size_of::<u64>() * (sample.kernel.len() + sample.user.len())
}

/// How often the ring buffer is drained without a wakeup from the kernel. The program wakes
/// the reader when the ring is a quarter full ([`profiler_common::samples_wakeup_bytes`]) and,
/// with the table unwinder, for the first sample of each process (so a short-lived process's
/// mappings are read while it exists); other samples wait at most this long.
pub const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// The timed drain with the frame-pointer unwinder, which has no first-sample wakeup: the
/// registry must read a process's mappings before it exits.
pub const DRAIN_EVERY_FRAME_POINTERS: std::time::Duration = std::time::Duration::from_millis(100);

/// Drains the ring buffer every `drain_every` and whenever the kernel wakes it, until
/// `cancel`; then drains what is left once more and returns.
pub async fn run(
    ring: RingBuf<MapData>,
    drain_every: std::time::Duration,
    tx: mpsc::Sender<Message>,
    stats: Arc<PipelineStats>,
    requests: Option<Requests>,
    cancel: CancellationToken,
) -> io::Result<()> {
    let mut asker = Asker {
        requests,
        last: HashMap::default(),
    };
    // SAFETY: the ring buffer's fd stays open for as long as the AsyncFd owns the RingBuf, and
    // nothing else registers or closes it.
    let mut fd =
        unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(io::Error::from)?;
    let mut timer = tokio::time::interval(drain_every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backlog = Backlog::default();
    loop {
        tokio::select! {
            () = cancel.cancelled() => {
                drain(fd.get_mut(), &mut backlog, &stats, &mut asker);
                // The aggregator still runs: wait for room rather than drop the last samples.
                for (batch, _) in backlog.batches.drain(..) {
                    if tx.send(Message::Samples(batch)).await.is_err() {
                        break;
                    }
                }
                debug!("sampler stopped");
                return Ok(());
            }
            _ = timer.tick() => drain(fd.get_mut(), &mut backlog, &stats, &mut asker),
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut backlog, &stats, &mut asker);
                guard.clear_ready();
            }
        }
        backlog.flush(&tx);
    }
}

/// Samples drained but not yet queued, in batches of at most [`MAX_BATCH`] samples and
/// [`MAX_BATCH_BYTES`], each with its bytes.
#[derive(Default)]
struct Backlog {
    batches: std::collections::VecDeque<(Vec<Sample>, usize)>,
    bytes: usize,
}

impl Backlog {
    /// Adds a sample, or drops and counts it when the backlog is full.
    fn push(&mut self, sample: Sample, stats: &PipelineStats) {
        let size = footprint(&sample);
        if self.bytes + size > MAX_BACKLOG_BYTES {
            stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.batches.back_mut() {
            Some((last, bytes)) if last.len() < MAX_BATCH && *bytes + size <= MAX_BATCH_BYTES => {
                last.push(sample);
                *bytes += size;
            }
            _ => self.batches.push_back((vec![sample], size)),
        }
        self.bytes += size;
    }

    /// Queues batches in order until the queue is full.
    fn flush(&mut self, tx: &mpsc::Sender<Message>) {
        while let Some((batch, bytes)) = self.batches.pop_front() {
            match tx.try_send(Message::Samples(batch)) {
                Ok(()) => self.bytes -= bytes,
                Err(mpsc::error::TrySendError::Full(Message::Samples(batch))) => {
                    self.batches.push_front((batch, bytes));
                    return;
                }
                // Closed: the aggregator is gone and nothing can be delivered.
                Err(_) => {
                    self.batches.clear();
                    self.bytes = 0;
                    return;
                }
            }
        }
    }
}

/// Asks the unwind stage to load processes whose samples could not be walked with tables (not
/// loaded yet, or an address outside the loaded mappings: dlopen, new JIT code), at most once
/// per [`ASK_AT_MOST_EVERY`] per process.
struct Asker {
    requests: Option<Requests>,
    last: HashMap<u32, std::time::Instant>,
}

const ASK_AT_MOST_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

impl Asker {
    fn saw(&mut self, sample: &Sample) {
        let Some(requests) = &self.requests else {
            return;
        };
        if !matches!(
            sample.unwind,
            UnwindStatus::FramePointerOnly | UnwindStatus::NoMapping
        ) {
            return;
        }
        let now = std::time::Instant::now();
        if self
            .last
            .get(&sample.tgid)
            .is_some_and(|t| now.duration_since(*t) < ASK_AT_MOST_EVERY)
        {
            return;
        }
        if self.last.len() >= 4096 {
            self.last
                .retain(|_, t| now.duration_since(*t) < ASK_AT_MOST_EVERY);
        }
        self.last.insert(sample.tgid, now);
        requests.load(sample.tgid);
    }
}

fn drain(ring: &mut RingBuf<MapData>, backlog: &mut Backlog, stats: &PipelineStats, asker: &mut Asker) {
    while let Some(item) = ring.next() {
        match decode(&item) {
            Ok(sample) => {
                asker.saw(&sample);
                stats.received.fetch_add(1, Ordering::Relaxed);
                backlog.push(sample, stats);
            }
            Err(_) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(tgid: u32) -> Sample {
        Sample {
            ktime_ns: 0,
            tgid,
            tid: tgid,
            cpu: 0,
            comm: String::new(),
            kernel: Vec::new(),
            user: vec![0x40_1000],
            unwind: UnwindStatus::Complete,
            kernel_err: None,
            user_err: None,
        }
    }

    #[tokio::test]
    async fn a_full_queue_keeps_samples_in_the_backlog_in_order() {
        let (tx, mut rx) = mpsc::channel(1);
        let stats = PipelineStats::default();
        let mut backlog = Backlog::default();
        // Three small drains: merged into one batch, not three.
        for tgid in 1..=3 {
            backlog.push(sample(tgid), &stats);
        }
        assert_eq!(backlog.batches.len(), 1);
        backlog.flush(&tx);
        // The queue (capacity 1) is now full: later drains wait instead of being dropped.
        for tgid in 4..=MAX_BATCH as u32 + 5 {
            backlog.push(sample(tgid), &stats);
        }
        backlog.flush(&tx);
        assert_eq!(backlog.bytes, (MAX_BATCH + 2) * footprint(&sample(1)));
        let per_batch = MAX_BATCH.min(MAX_BATCH_BYTES / footprint(&sample(1)));
        assert_eq!(
            backlog.batches.len(),
            (MAX_BATCH + 2).div_ceil(per_batch),
            "merged up to MAX_BATCH samples and MAX_BATCH_BYTES per batch"
        );
        let mut seen = Vec::new();
        while seen.len() < MAX_BATCH + 5 {
            match rx.recv().await {
                Some(Message::Samples(batch)) => seen.extend(batch.iter().map(|s| s.tgid)),
                _ => panic!("expected a batch"),
            }
            backlog.flush(&tx);
        }
        assert_eq!(seen, (1..=MAX_BATCH as u32 + 5).collect::<Vec<_>>());
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 0);
        assert_eq!(backlog.bytes, 0);
    }

    #[test]
    fn deep_stacks_are_bounded_by_bytes_not_count() {
        let stats = PipelineStats::default();
        let mut backlog = Backlog::default();
        let deep = |tgid| Sample {
            user: vec![0x40_1000; profiler_common::MAX_USER_DEPTH],
            kernel: vec![0xffff_ffff_8100_0000; profiler_common::MAX_STACK_DEPTH],
            ..sample(tgid)
        };
        let size = footprint(&deep(0));
        let fit = MAX_BACKLOG_BYTES / size;
        for tgid in 0..fit as u32 + 100 {
            backlog.push(deep(tgid), &stats);
        }
        assert!(backlog.bytes <= MAX_BACKLOG_BYTES);
        assert_eq!(stats.dropped_queue_full.load(Ordering::Relaxed), 100);
        // Every batch respects the byte bound, so the queue's 64 batches do too.
        assert!(
            backlog
                .batches
                .iter()
                .all(|(b, bytes)| *bytes <= MAX_BATCH_BYTES && b.len() * size == *bytes)
        );
    }
}
