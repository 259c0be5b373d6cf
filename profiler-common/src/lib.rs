//! The contract between the eBPF programs (`profiler-ebpf`) and the daemon (`profiler`).
//!
//! Everything here crosses a map or the ring buffer, so every type is `#[repr(C)]`, `Copy`,
//! has explicit padding and a compile-time size assertion. Counter numbers are never reused:
//! a retired counter keeps its slot.
#![no_std]

/// Name of the perf_event program that takes one sample per cpu-clock tick.
pub const PROGRAM_SAMPLE: &str = "sample_cpu";
/// Ring buffer carrying one variable-length [`RawSample`] record per sample.
pub const MAP_SAMPLES: &str = "SAMPLES";
/// Per-CPU array of `u64` counters indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Per-CPU array with one [`RawSample`] slot where the program assembles a record.
pub const MAP_SCRATCH: &str = "SCRATCH";
/// Hash of tgids to sample when [`GLOBAL_FILTER_PIDS`] is set.
pub const MAP_TARGET_PIDS: &str = "TARGET_PIDS";
/// `.rodata` global: `1` restricts sampling to the tgids in [`MAP_TARGET_PIDS`].
pub const GLOBAL_FILTER_PIDS: &str = "FILTER_PIDS";

/// Frames kept per stack. It equals the kernel's default `kernel.perf_event_max_stack` (127),
/// the most `bpf_get_stack` returns without raising that sysctl.
pub const MAX_STACK_DEPTH: usize = 127;
/// Length of `task_struct::comm`, NUL included.
pub const COMM_LEN: usize = 16;
/// Capacity of [`MAP_TARGET_PIDS`]: more `--pid` flags than this are rejected by the daemon.
pub const MAX_TARGET_PIDS: u32 = 1024;
/// Size of the [`MAP_SAMPLES`] ring buffer in bytes (a power of two, a multiple of the page
/// size). 8 MiB holds ~4,000 full-depth records (2,080 bytes) or ~28,000 typical ones
/// (~300 bytes): at 99 Hz on 16 CPUs, seconds of slack for a reader that drains every 100 ms.
pub const SAMPLES_RING_BYTES: u32 = 8 * 1024 * 1024;

/// Unread bytes in [`MAP_SAMPLES`] at which the program wakes the reader. Below it, records are
/// submitted without a wakeup and the reader drains the ring on its own timer
/// (`profiler::sampler::DRAIN_EVERY`): one wakeup per sample would cost the daemon more CPU than
/// everything else it does per sample. A quarter of the ring leaves 6 MiB of room for the reader
/// to respond before anything is lost.
pub const SAMPLES_WAKEUP_BYTES: u64 = SAMPLES_RING_BYTES as u64 / 4;

/// Fixed part of a sample record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RawSampleHeader {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the sample.
    pub ktime_ns: u64,
    /// Process id as the root pid namespace sees it.
    pub tgid: u32,
    /// Thread id as the root pid namespace sees it.
    pub tid: u32,
    pub cpu: u32,
    /// Kernel frames at the start of `frames`.
    pub kernel_len: u16,
    /// User frames right after the kernel frames.
    pub user_len: u16,
    /// 0, or the negative errno `bpf_get_stack` returned for the kernel stack.
    pub kernel_err: i16,
    /// 0, or the negative errno `bpf_get_stack` returned for the user stack.
    pub user_err: i16,
    pub _pad: u32,
    /// Thread name, NUL-padded.
    pub comm: [u8; COMM_LEN],
}

/// Bytes of [`RawSampleHeader`] at the start of every ring-buffer record.
pub const HEADER_BYTES: usize = 48;
const _: () = assert!(core::mem::size_of::<RawSampleHeader>() == HEADER_BYTES);

/// One sample as the eBPF program assembles it (in a per-CPU scratch slot).
///
/// Only the used part goes into the ring buffer: the header, then `kernel_len` kernel
/// instruction pointers, then `user_len` user ones, each leaf first (entries after the leaf are
/// return addresses). A 30-frame sample is 288 bytes instead of the full 2,080. The daemon
/// turns a record into its own `Sample` (`profiler::sampler`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RawSample {
    pub header: RawSampleHeader,
    pub frames: [u64; 2 * MAX_STACK_DEPTH],
}

const _: () = assert!(core::mem::size_of::<RawSample>() == HEADER_BYTES + 2 * 8 * MAX_STACK_DEPTH);
const _: () = assert!(core::mem::align_of::<RawSample>() == 8);

/// Slots of [`MAP_COUNTERS`]. Numbers are part of the contract and never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// perf events the program ran for (every tick, before any filtering).
    Events = 0,
    /// Samples written to the ring buffer.
    Submitted = 1,
    /// Ticks that landed in the idle task (pid 0); not CPU use, not recorded.
    Idle = 2,
    /// Ticks of processes outside the `--pid` selection.
    FilteredOut = 3,
    /// Samples lost because the ring buffer was full.
    RingFull = 4,
    /// `bpf_get_stack` failed for the kernel stack (the sample is still sent).
    KernelStackError = 5,
    /// `bpf_get_stack` failed for the user stack (the sample is still sent).
    UserStackError = 6,
}

/// Number of slots in [`MAP_COUNTERS`] (room to grow without resizing the map).
pub const COUNTER_SLOTS: u32 = 16;

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, integers and integer arrays with explicit padding: every bit pattern
// is valid.
unsafe impl aya::Pod for RawSampleHeader {}
