//! Reads the ring buffer and turns kernel records into [`Sample`]s for the aggregator.
//!
//! Two types on purpose: [`profiler_common::RawSample`] is the fixed-size record the kernel
//! writes (stack arrays padded to 127 frames, lengths beside them); [`Sample`] is the
//! normalized sample the daemon works with (only the valid frames, comm as text, stack errors
//! as values).
use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use aya::maps::{MapData, RingBuf};
use foldhash::HashMap;
use profiler_common::{HEADER_BYTES, MAX_STACK_DEPTH, MAX_USER_DEPTH, RawSampleHeader, UnwindStatus};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{bpf::CounterSnapshot, unwind::Requests};

/// One on-CPU sample, normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub ktime_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub cpu: u32,
    /// Thread name.
    pub comm: String,
    /// Kernel instruction pointers, leaf first.
    pub kernel: Vec<u64>,
    /// User instruction pointers, leaf first.
    pub user: Vec<u64>,
    /// How the user walk ended.
    pub unwind: UnwindStatus,
    /// Negative errno of a failed kernel stack walk.
    pub kernel_err: Option<i16>,
    /// Negative errno of a failed user stack walk.
    pub user_err: Option<i16>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring buffer record of {got} bytes is shorter than a sample header ({HEADER_BYTES} bytes)")]
    Short { got: usize },
    #[error("record claims {kernel} kernel and {user} user frames but holds {room}")]
    Frames { kernel: usize, user: usize, room: usize },
    #[error("record has unwind status {0}, which this daemon does not know")]
    Status(u8),
}

/// Decodes one ring-buffer record: a [`RawSampleHeader`], then `kernel_len` kernel and
/// `user_len` user frames.
pub fn decode(bytes: &[u8]) -> Result<Sample, DecodeError> {
    let header_bytes = bytes
        .get(..HEADER_BYTES)
        .ok_or(DecodeError::Short { got: bytes.len() })?;
    // SAFETY: the slice holds HEADER_BYTES = size_of::<RawSampleHeader>() bytes, the header is
    // plain integers (any bit pattern is valid) and read_unaligned has no alignment requirement.
    let raw: RawSampleHeader = unsafe { header_bytes.as_ptr().cast::<RawSampleHeader>().read_unaligned() };
    let (kernel, user) = (usize::from(raw.kernel_len), usize::from(raw.user_len));
    let room = (bytes.len() - HEADER_BYTES) / 8;
    if kernel > MAX_STACK_DEPTH || user > MAX_USER_DEPTH || kernel + user > room {
        return Err(DecodeError::Frames { kernel, user, room });
    }
    let unwind = UnwindStatus::from_u8(raw.unwind_status).ok_or(DecodeError::Status(raw.unwind_status))?;
    let mut frames = bytes[HEADER_BYTES..]
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
    let comm_end = raw.comm.iter().position(|&b| b == 0).unwrap_or(raw.comm.len());
    Ok(Sample {
        ktime_ns: raw.ktime_ns,
        tgid: raw.tgid,
        tid: raw.tid,
        cpu: raw.cpu,
        comm: String::from_utf8_lossy(&raw.comm[..comm_end]).into_owned(),
        kernel: frames.by_ref().take(kernel).collect(),
        user: frames.take(user).collect(),
        unwind,
        kernel_err: (raw.kernel_err != 0).then_some(raw.kernel_err),
        user_err: (raw.user_err != 0).then_some(raw.user_err),
    })
}

/// What flows from the sampler (and the interval clock) to the aggregator.
#[derive(Debug)]
pub enum Message {
    /// The samples of one drain of the ring buffer (at most [`MAX_BATCH`]).
    Samples(Vec<Sample>),
    /// Close the current interval at `end` and report it; `last` ends the aggregator.
    Flush {
        end: SystemTime,
        counters: CounterSnapshot,
        last: bool,
    },
    /// Start collecting an on-demand profile beside the interval.
    OpenTap {
        id: u64,
        filter: crate::aggregate::TapFilter,
        counters: CounterSnapshot,
    },
    /// Finish an on-demand profile and send its snapshot to `reply`.
    CloseTap {
        id: u64,
        counters: CounterSnapshot,
        reply: tokio::sync::oneshot::Sender<crate::aggregate::Snapshot>,
    },
}

/// Counters of the userspace pipeline (the kernel's are in [`CounterSnapshot`]).
#[derive(Debug, Default)]
pub struct PipelineStats {
    pub received: AtomicU64,
    /// Samples dropped because the aggregator's queue was full (policy: drop newest, count).
    pub dropped_queue_full: AtomicU64,
    pub malformed: AtomicU64,
}

impl PipelineStats {
    pub fn load(&self) -> (u64, u64, u64) {
        (
            self.received.load(Ordering::Relaxed),
            self.dropped_queue_full.load(Ordering::Relaxed),
            self.malformed.load(Ordering::Relaxed),
        )
    }
}

/// Capacity of the sampler → aggregator queue, in batches of at most [`MAX_BATCH`] samples.
/// Sending batches rather than single samples spares the aggregator thread a wakeup per
/// sample. While the queue is full, drains go into the sampler's backlog (merged into batches,
/// at most [`MAX_BACKLOG`] samples), so many small drains (first-sample wakeups when many
/// processes start) cannot fill the queue with tiny batches and lose samples.
pub const QUEUE_CAPACITY: usize = 64;
/// Most samples in one batch.
pub const MAX_BATCH: usize = 4096;
/// Most samples waiting in the sampler while the queue is full; past it, new samples are
/// dropped and counted as `dropped (queue full)`.
pub const MAX_BACKLOG: usize = QUEUE_CAPACITY * MAX_BATCH;

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
                for batch in backlog.batches.drain(..) {
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

/// Samples drained but not yet queued, in batches of at most [`MAX_BATCH`].
#[derive(Default)]
struct Backlog {
    batches: std::collections::VecDeque<Vec<Sample>>,
    samples: usize,
}

impl Backlog {
    /// Adds a sample, or drops and counts it when the backlog is full.
    fn push(&mut self, sample: Sample, stats: &PipelineStats) {
        if self.samples >= MAX_BACKLOG {
            stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.batches.back_mut() {
            Some(last) if last.len() < MAX_BATCH => last.push(sample),
            _ => self.batches.push_back(vec![sample]),
        }
        self.samples += 1;
    }

    /// Queues batches in order until the queue is full.
    fn flush(&mut self, tx: &mpsc::Sender<Message>) {
        while let Some(batch) = self.batches.pop_front() {
            let n = batch.len();
            match tx.try_send(Message::Samples(batch)) {
                Ok(()) => self.samples -= n,
                Err(mpsc::error::TrySendError::Full(Message::Samples(batch))) => {
                    self.batches.push_front(batch);
                    return;
                }
                // Closed: the aggregator is gone and nothing can be delivered.
                Err(_) => {
                    self.batches.clear();
                    self.samples = 0;
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

    fn record(kernel: &[u64], user: &[u64], kernel_len: u16, user_len: u16) -> Vec<u8> {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"burn");
        let header = RawSampleHeader {
            ktime_ns: 5,
            tgid: 42,
            tid: 43,
            cpu: 1,
            kernel_len,
            user_len,
            kernel_err: 0,
            user_err: -14,
            unwind_status: 3,
            _pad: [0; 3],
            comm,
        };
        // SAFETY: the header is repr(C) plain data; viewing it as bytes is sound.
        let mut bytes =
            unsafe { std::slice::from_raw_parts((&raw const header).cast::<u8>(), HEADER_BYTES) }.to_vec();
        for frame in kernel.iter().chain(user) {
            bytes.extend(frame.to_ne_bytes());
        }
        bytes
    }

    #[test]
    fn decodes_kernel_then_user_frames() {
        let bytes = record(
            &[0xffff_ffff_8100_0000, 0xffff_ffff_8100_0100],
            &[0x40_1000, 0x40_2000, 0x40_3000],
            2,
            3,
        );
        assert_eq!(bytes.len(), HEADER_BYTES + 5 * 8);
        let sample = decode(&bytes).expect("decodes");
        assert_eq!((sample.tgid, sample.tid, sample.cpu), (42, 43, 1));
        assert_eq!(sample.comm, "burn");
        assert_eq!(sample.kernel, [0xffff_ffff_8100_0000, 0xffff_ffff_8100_0100]);
        assert_eq!(sample.user, [0x40_1000, 0x40_2000, 0x40_3000]);
        assert_eq!(sample.kernel_err, None);
        assert_eq!(sample.user_err, Some(-14));
        assert_eq!(sample.unwind, UnwindStatus::NoTable);
    }

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
        assert_eq!(backlog.samples, MAX_BATCH + 2);
        assert_eq!(backlog.batches.len(), 2, "merged up to MAX_BATCH per batch");
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
        assert_eq!(backlog.samples, 0);
    }

    #[test]
    fn rejects_records_that_lie_about_their_frames() {
        let bytes = record(&[1, 2], &[3], 2, 5);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::Frames {
                kernel: 2,
                user: 5,
                room: 3
            })
        );
        let bytes = record(&[], &[], 200, 0);
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::Frames { kernel: 200, .. })
        ));
        assert_eq!(decode(&bytes[..20]), Err(DecodeError::Short { got: 20 }));
        let mut bytes = record(&[1], &[2], 1, 1);
        bytes[28] = 200;
        assert_eq!(decode(&bytes), Err(DecodeError::Status(200)));
    }
}
