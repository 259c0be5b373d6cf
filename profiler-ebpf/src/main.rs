//! The sampling program: one run per cpu-clock (or cycles) tick on every CPU.
//!
//! It records who was on the CPU (tgid, tid, comm) with the kernel stack and the user stack
//! (frame-pointer walk by the kernel) and streams the record through the `SAMPLES` ring buffer.
//! Every outcome is counted in `COUNTERS`, so nothing is lost silently.
#![no_std]
#![no_main]

use core::ptr::{addr_of_mut, read_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_get_stack,
        bpf_ktime_get_ns,
    },
    macros::{map, perf_event},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::PerfEventContext,
};
use profiler_common::{
    COUNTER_SLOTS, Counter, HEADER_BYTES, MAX_STACK_DEPTH, MAX_TARGET_PIDS, RawSample, SAMPLES_RING_BYTES,
    SAMPLES_WAKEUP_BYTES,
};

#[map(name = "SAMPLES")]
static SAMPLES: RingBuf = RingBuf::with_byte_size(SAMPLES_RING_BYTES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<RawSample> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "TARGET_PIDS")]
static TARGET_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_TARGET_PIDS, 0);

/// Set to 1 by the loader when `--pid` was given. Read volatile so the compiler keeps the load
/// (the loader rewrites `.rodata` before the program is verified).
#[unsafe(no_mangle)]
static FILTER_PIDS: u8 = 0;

const STACK_BYTES: u32 = (MAX_STACK_DEPTH * 8) as u32;

#[perf_event]
pub fn sample_cpu(ctx: PerfEventContext) -> u32 {
    try_sample(&ctx);
    0
}

#[inline(always)]
fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and perf_event programs do not nest on one CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn try_sample(ctx: &PerfEventContext) {
    bump(Counter::Events);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if tgid == 0 {
        bump(Counter::Idle);
        return;
    }
    // SAFETY: FILTER_PIDS is a plain u8 in .rodata.
    if unsafe { read_volatile(&FILTER_PIDS) } != 0 {
        // SAFETY: the value is only tested for presence.
        if unsafe { TARGET_PIDS.get(&tgid) }.is_none() {
            bump(Counter::FilteredOut);
            return;
        }
    }

    let Some(record) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: `record` points at this CPU's scratch slot, which nothing else uses while this
    // program runs (perf_event programs do not nest on a CPU). Stack writes stay in bounds:
    // kernel frames fill frames[0..127]; user frames start at frames[kernel_len], kernel_len is
    // clamped to 127, and 127 + 127 slots fit the 254 of `frames`.
    unsafe {
        let header = &mut (*record).header;
        header.ktime_ns = bpf_ktime_get_ns();
        header.tgid = tgid;
        header.tid = tid;
        header.cpu = bpf_get_smp_processor_id();
        header._pad = 0;
        header.comm = bpf_get_current_comm().unwrap_or([0; 16]);

        let frames = addr_of_mut!((*record).frames).cast::<u64>();
        let kernel = bpf_get_stack(ctx.as_ptr(), frames.cast(), STACK_BYTES, 0);
        let mut kernel_len = 0usize;
        if kernel < 0 {
            bump(Counter::KernelStackError);
            header.kernel_err = kernel as i16;
        } else {
            kernel_len = (kernel as usize / 8).min(MAX_STACK_DEPTH);
            header.kernel_err = 0;
        }
        header.kernel_len = kernel_len as u16;

        let user = bpf_get_stack(
            ctx.as_ptr(),
            frames.add(kernel_len).cast(),
            STACK_BYTES,
            BPF_F_USER_STACK as u64,
        );
        let mut user_len = 0usize;
        if user < 0 {
            bump(Counter::UserStackError);
            header.user_err = user as i16;
        } else {
            user_len = (user as usize / 8).min(MAX_STACK_DEPTH);
            header.user_err = 0;
        }
        header.user_len = user_len as u16;

        let len = HEADER_BYTES + (kernel_len + user_len) * 8;
        if len > size_of::<RawSample>() {
            return;
        }
        let wakeup = if SAMPLES.query(BPF_RB_AVAIL_DATA as u64) >= SAMPLES_WAKEUP_BYTES {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
        let bytes = core::slice::from_raw_parts(record.cast::<u8>(), len);
        match SAMPLES.output::<[u8]>(bytes, wakeup as u64) {
            Ok(()) => bump(Counter::Submitted),
            Err(_) => bump(Counter::RingFull),
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
