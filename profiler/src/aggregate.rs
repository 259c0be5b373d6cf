//! Per-interval aggregation: identical (process, stack) pairs are counted once.
//!
//! Frames are interned (`Frame` → id) and stacks are interned as id sequences, so a snapshot
//! carries every distinct frame and stack once, however many samples hit them. User addresses
//! are resolved to (file, ELF virtual address) here, while the process is most likely still
//! alive; symbolization happens later, on the report stage's thread, in [`crate::report`].
use std::{sync::Arc, time::SystemTime};

use foldhash::HashMap;

use profiler_common::{MAX_USER_DEPTH, UnwindStatus};

use crate::{
    labels::Target,
    process::{ObjectFile, ProcessMeta, ProcessRegistry, RegistryStats, UserFrame},
    procfs::FileKey,
    sample::{CounterSnapshot, Sample},
};

/// One distinct frame of an interval. Non-leaf addresses are return addresses minus one, so
/// they fall inside the call instruction and name the calling line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Frame {
    Kernel(u64),
    /// Index into [`Snapshot::objects`] and the ELF virtual address in that file.
    Object {
        object: u32,
        vaddr: u64,
    },
    /// Non-file executable memory (`[vdso]`, `[anon]`), offset from the mapping start.
    Special {
        name: Arc<str>,
        offset: u64,
    },
    /// JIT code named by the process's perf map (one location per function).
    Jit(Arc<str>),
    /// A user address no mapping explained (the process exited first, or a bad frame pointer).
    Unknown(u64),
    /// Both stack walks failed; the sample still counts as CPU time of its process.
    NoStack,
    /// Why the user walk stopped before the bottom of the stack, e.g.
    /// `[unwind: no table for libfoo.so]` (always the last frame).
    Truncated(Arc<str>),
}

/// Samples of one process with one stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackCount {
    pub pid: u32,
    pub stack: u32,
    pub count: u64,
}

/// Everything one interval produced, ready to be symbolized and encoded.
#[derive(Debug)]
pub struct Snapshot {
    pub start: SystemTime,
    pub end: SystemTime,
    pub frames: Vec<Frame>,
    /// Frame ids, leaf first: kernel frames, then user frames.
    pub stacks: Vec<Box<[u32]>>,
    pub objects: Vec<Arc<ObjectFile>>,
    pub counts: Vec<StackCount>,
    pub processes: HashMap<u32, ProcessMeta>,
    /// Kernel counters over this interval.
    pub counters: CounterSnapshot,
    pub registry: RegistryStats,
    /// Samples of processes a relabeling rule dropped.
    pub dropped_by_relabeling: u64,
}

impl Snapshot {
    pub fn samples(&self) -> u64 {
        self.counts.iter().map(|c| c.count).sum()
    }
}

#[derive(Default)]
struct Interval {
    frames: Vec<Frame>,
    frame_ids: HashMap<Frame, u32>,
    stacks: Vec<Box<[u32]>>,
    stack_ids: HashMap<Box<[u32]>, u32>,
    objects: Vec<Arc<ObjectFile>>,
    object_ids: HashMap<FileKey, u32>,
    counts: HashMap<(u32, u32), u64>,
    processes: HashMap<u32, ProcessMeta>,
    dropped_by_relabeling: u64,
}

impl Interval {
    fn frame(&mut self, frame: Frame) -> u32 {
        if let Some(&id) = self.frame_ids.get(&frame) {
            return id;
        }
        let id = self.frames.len() as u32;
        self.frames.push(frame.clone());
        self.frame_ids.insert(frame, id);
        id
    }

    fn object(&mut self, object: &Arc<ObjectFile>) -> u32 {
        if let Some(&id) = self.object_ids.get(&object.key) {
            return id;
        }
        let id = self.objects.len() as u32;
        self.object_ids.insert(object.key, id);
        self.objects.push(Arc::clone(object));
        id
    }

    fn stack(&mut self, ids: Vec<u32>) -> u32 {
        if let Some(&id) = self.stack_ids.get(ids.as_slice()) {
            return id;
        }
        let id = self.stacks.len() as u32;
        let ids: Box<[u32]> = ids.into();
        self.stacks.push(ids.clone());
        self.stack_ids.insert(ids, id);
        id
    }

    /// Counts one resolved sample.
    fn insert(&mut self, sample: &Resolved, meta: impl FnOnce() -> ProcessMeta) {
        let mut ids = Vec::with_capacity(sample.kernel.len() + sample.user.len() + 1);
        for &ip in &sample.kernel {
            ids.push(self.frame(Frame::Kernel(ip)));
        }
        for (frame, addr) in &sample.user {
            let frame = match frame {
                UserFrame::Object { object, vaddr } => Frame::Object {
                    object: self.object(object),
                    vaddr: *vaddr,
                },
                UserFrame::Special { name, offset } => Frame::Special {
                    name: Arc::clone(name),
                    offset: *offset,
                },
                UserFrame::Jit { name } => Frame::Jit(Arc::clone(name)),
                UserFrame::Unknown => Frame::Unknown(*addr),
            };
            ids.push(self.frame(frame));
        }
        if let Some(reason) = &sample.truncated {
            ids.push(self.frame(Frame::Truncated(Arc::clone(reason))));
        }
        if ids.is_empty() {
            ids.push(self.frame(Frame::NoStack));
        }
        let stack = self.stack(ids);
        *self.counts.entry((sample.tgid, stack)).or_default() += 1;
        self.processes.entry(sample.tgid).or_insert_with(meta);
    }

    fn into_snapshot(
        self,
        start: SystemTime,
        end: SystemTime,
        counters: CounterSnapshot,
        registry: RegistryStats,
    ) -> Snapshot {
        let mut counts: Vec<StackCount> = self
            .counts
            .into_iter()
            .map(|((pid, stack), count)| StackCount { pid, stack, count })
            .collect();
        counts.sort_unstable_by_key(|c| (c.pid, c.stack));
        Snapshot {
            start,
            end,
            frames: self.frames,
            stacks: self.stacks,
            objects: self.objects,
            counts,
            processes: self.processes,
            counters,
            registry,
            dropped_by_relabeling: self.dropped_by_relabeling,
        }
    }
}

/// A sample with its user addresses resolved to files, before interning.
struct Resolved {
    tgid: u32,
    /// Kernel addresses, caller-adjusted.
    kernel: Vec<u64>,
    /// User frames with their caller-adjusted addresses.
    user: Vec<(UserFrame, u64)>,
    truncated: Option<Arc<str>>,
}

/// Which samples an on-demand profile keeps (all given conditions must hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapFilter {
    /// Processes (host pids); empty: any.
    pub pids: Vec<u32>,
    /// Process name (`comm`), exact.
    pub comm: Option<String>,
    /// Target labels that must have these values (`service_name`, `namespace`, `pod`,
    /// `container`). `container` also matches the container id, or its first 12 or more
    /// characters.
    pub labels: Vec<(String, String)>,
}

impl TapFilter {
    fn matches(&self, tgid: u32, comm: &str, target: &Target) -> bool {
        (self.pids.is_empty() || self.pids.contains(&tgid))
            && self.comm.as_deref().is_none_or(|c| c == comm)
            && self.labels.iter().all(|(name, want)| {
                target.get(name) == Some(want.as_str())
                    || (name == "container"
                        && want.len() >= 12
                        && target
                            .get("__meta_container_id")
                            .is_some_and(|id| id.starts_with(want.as_str())))
            })
    }
}

/// An on-demand profile being collected beside the interval (`/debug/pprof/profile`).
struct Tap {
    id: u64,
    filter: TapFilter,
    start: SystemTime,
    counters_at_start: CounterSnapshot,
    interval: Interval,
}

/// Most on-demand profiles collected at once; the endpoint refuses more.
pub const MAX_TAPS: usize = 8;

pub struct Aggregator {
    registry: ProcessRegistry,
    interval: Interval,
    start: SystemTime,
    counters_at_start: CounterSnapshot,
    taps: Vec<Tap>,
}

impl Aggregator {
    pub fn new(registry: ProcessRegistry, start: SystemTime, counters: CounterSnapshot) -> Self {
        Self {
            registry,
            interval: Interval::default(),
            start,
            counters_at_start: counters,
            taps: Vec::new(),
        }
    }

    fn resolve(&mut self, sample: &Sample) -> Resolved {
        let kernel = sample
            .kernel
            .iter()
            .enumerate()
            .map(|(i, &ip)| caller_adjusted(i, ip))
            .collect();
        // The frame-pointer walk can end on a zero return address (Go's runtime frames do);
        // nothing executes in the first page, so such entries mark the end, not a frame.
        let user = sample.user.iter().take_while(|&&ip| ip >= FIRST_CODE_ADDRESS);
        let addrs = user.enumerate().map(|(i, &ip)| caller_adjusted(i, ip));
        let mut frames = Vec::with_capacity(sample.user.len());
        self.registry
            .resolve_user_stack(sample.tgid, addrs.clone(), &mut frames);
        let last_file = match frames.last() {
            Some(UserFrame::Object { object, .. }) => Some(object.base_name().to_owned()),
            Some(UserFrame::Special { name, .. }) => Some(name.to_string()),
            _ => None,
        };
        Resolved {
            tgid: sample.tgid,
            kernel,
            user: frames.into_iter().zip(addrs).collect(),
            truncated: truncation(sample.unwind, last_file.as_deref()).map(Into::into),
        }
    }

    pub fn add(&mut self, sample: &Sample) {
        let target = self.registry.target(sample.tgid, &sample.comm);
        if target.labels.is_none() {
            // A relabeling rule dropped this process.
            self.interval.dropped_by_relabeling += 1;
            return;
        }
        let resolved = self.resolve(sample);
        let registry = &mut self.registry;
        let mut meta = None;
        let mut meta_of = |registry: &mut ProcessRegistry| {
            meta.get_or_insert_with(|| {
                let mut meta = registry.meta(sample.tgid, &sample.comm);
                // A process gone before /proc could be read keeps the name of the sampled thread.
                meta.comm.get_or_insert_with(|| sample.comm.clone());
                meta
            })
            .clone()
        };
        self.interval.insert(&resolved, || meta_of(registry));
        if self.taps.is_empty() {
            return;
        }
        let process = meta_of(registry);
        let comm = process.comm.as_deref().unwrap_or(&sample.comm);
        for tap in &mut self.taps {
            if tap.filter.matches(sample.tgid, comm, &target) {
                tap.interval.insert(&resolved, || process.clone());
            }
        }
    }

    /// Starts an on-demand profile. Ids must be unique among open taps.
    pub fn open_tap(&mut self, id: u64, filter: TapFilter, counters: CounterSnapshot) {
        self.taps.push(Tap {
            id,
            filter,
            start: SystemTime::now(),
            counters_at_start: counters,
            interval: Interval::default(),
        });
    }

    /// Ends an on-demand profile and returns what it collected.
    pub fn close_tap(&mut self, id: u64, counters: CounterSnapshot) -> Option<Snapshot> {
        let at = self.taps.iter().position(|t| t.id == id)?;
        let tap = self.taps.swap_remove(at);
        Some(tap.interval.into_snapshot(
            tap.start,
            SystemTime::now(),
            counters.since(&tap.counters_at_start),
            self.registry.stats.clone(),
        ))
    }

    /// Closes the interval at `end` and starts the next one.
    pub fn flush(&mut self, end: SystemTime, counters: CounterSnapshot) -> Snapshot {
        let interval = std::mem::take(&mut self.interval);
        let snapshot = interval.into_snapshot(
            self.start,
            end,
            counters.since(&self.counters_at_start),
            self.registry.stats.clone(),
        );
        self.registry.end_interval();
        self.start = end;
        self.counters_at_start = counters;
        snapshot
    }
}

/// The synthetic last frame of a walk that ended early, naming why; `None` for a complete one.
fn truncation(status: UnwindStatus, last_file: Option<&str>) -> Option<String> {
    let file = last_file.unwrap_or("?");
    Some(match status {
        UnwindStatus::Complete | UnwindStatus::FramePointerOnly => return None,
        UnwindStatus::NoMapping => "[unwind: address outside known mappings]".to_owned(),
        UnwindStatus::NoTable => format!("[unwind: no table for {file}]"),
        UnwindStatus::UnsupportedRule => format!("[unwind: unsupported CFI rule in {file}]"),
        UnwindStatus::BadFrame => format!("[unwind: bad frame in {file}]"),
        UnwindStatus::ReadError => format!("[unwind: stack read failed in {file}]"),
        UnwindStatus::MaxDepth => format!("[truncated: max depth {MAX_USER_DEPTH}]"),
        UnwindStatus::BadPc => "[unwind: bad instruction pointer]".to_owned(),
    })
}

/// Addresses below this (the zero page) are never code.
const FIRST_CODE_ADDRESS: u64 = 0x1000;

fn caller_adjusted(index: usize, ip: u64) -> u64 {
    if index == 0 { ip } else { ip.saturating_sub(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(tgid: u32, kernel: &[u64], user: &[u64]) -> Sample {
        Sample {
            ktime_ns: 0,
            tgid,
            tid: tgid,
            cpu: 0,
            comm: "t".into(),
            kernel: kernel.to_vec(),
            user: user.to_vec(),
            unwind: UnwindStatus::Complete,
            kernel_err: None,
            user_err: None,
        }
    }

    #[test]
    fn an_early_end_adds_a_frame_naming_why() {
        let mut agg = Aggregator::new(
            ProcessRegistry::default(),
            SystemTime::now(),
            CounterSnapshot::default(),
        );
        let pid = u32::MAX - 9;
        let mut truncated = sample(pid, &[], &[0x1000, 0x2001]);
        truncated.unwind = UnwindStatus::MaxDepth;
        agg.add(&truncated);
        let mut unreadable = sample(pid, &[], &[0x3000]);
        unreadable.unwind = UnwindStatus::NoTable;
        agg.add(&unreadable);
        let snap = agg.flush(SystemTime::now(), CounterSnapshot::default());
        let roots: Vec<&Frame> = snap
            .stacks
            .iter()
            .map(|s| &snap.frames[*s.last().expect("frames") as usize])
            .collect();
        assert!(roots.contains(&&Frame::Truncated("[truncated: max depth 256]".into())));
        // The process does not exist, so the file of the last frame is unknown.
        assert!(roots.contains(&&Frame::Truncated("[unwind: no table for ?]".into())));
        assert_eq!(truncation(UnwindStatus::Complete, Some("x")), None);
        assert_eq!(
            truncation(UnwindStatus::NoTable, Some("libfoo.so")).as_deref(),
            Some("[unwind: no table for libfoo.so]")
        );
    }

    #[test]
    fn identical_stacks_are_counted_once() {
        let mut agg = Aggregator::new(
            ProcessRegistry::default(),
            SystemTime::now(),
            CounterSnapshot::default(),
        );
        // A pid that does not exist: user frames stay unknown, the sample still counts.
        let pid = u32::MAX - 7;
        for _ in 0..3 {
            agg.add(&sample(
                pid,
                &[0xffff_ffff_8100_0010, 0xffff_ffff_8100_0100],
                &[0x1000, 0x2001],
            ));
        }
        agg.add(&sample(pid, &[], &[]));
        let snap = agg.flush(SystemTime::now(), CounterSnapshot::default());
        assert_eq!(snap.samples(), 4);
        assert_eq!(snap.counts.len(), 2);
        assert_eq!(snap.stacks.len(), 2);
        let three = snap.counts.iter().find(|c| c.count == 3).expect("stack with 3");
        let frames: Vec<&Frame> = snap.stacks[three.stack as usize]
            .iter()
            .map(|&f| &snap.frames[f as usize])
            .collect();
        assert_eq!(
            frames,
            [
                &Frame::Kernel(0xffff_ffff_8100_0010),
                &Frame::Kernel(0xffff_ffff_8100_00ff),
                &Frame::Unknown(0x1000),
                &Frame::Unknown(0x2000),
            ]
        );
        assert_eq!(snap.processes[&pid].comm.as_deref(), Some("t"));
        let next = agg.flush(SystemTime::now(), CounterSnapshot::default());
        assert_eq!(next.samples(), 0);
        assert!(next.frames.is_empty());
    }
}
