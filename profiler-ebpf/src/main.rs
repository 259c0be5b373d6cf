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
    COUNTER_SLOTS, Counter, MAX_STACK_DEPTH, MAX_TARGET_PIDS, RawSample, SAMPLES_RING_BYTES,
    SAMPLES_WAKEUP_BYTES,
};

#[map(name = "SAMPLES")]
static SAMPLES: RingBuf = RingBuf::with_byte_size(SAMPLES_RING_BYTES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

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

    let Some(mut entry) = SAMPLES.reserve::<RawSample>(0) else {
        bump(Counter::RingFull);
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points at a reserved, exclusively owned RawSample-sized slot. Every field
    // is written below before submit; the stack arrays are filled by bpf_get_stack, which zeroes
    // what it does not write.
    unsafe {
        (*record).ktime_ns = bpf_ktime_get_ns();
        (*record).tgid = tgid;
        (*record).tid = tid;
        (*record).cpu = bpf_get_smp_processor_id();
        (*record)._pad = 0;
        (*record).comm = bpf_get_current_comm().unwrap_or([0; 16]);

        let kernel = bpf_get_stack(
            ctx.as_ptr(),
            addr_of_mut!((*record).kernel).cast(),
            STACK_BYTES,
            0,
        );
        if kernel < 0 {
            bump(Counter::KernelStackError);
            (*record).kernel_len = 0;
            (*record).kernel_err = kernel as i16;
        } else {
            (*record).kernel_len = (kernel / 8) as u16;
            (*record).kernel_err = 0;
        }

        let user = bpf_get_stack(
            ctx.as_ptr(),
            addr_of_mut!((*record).user).cast(),
            STACK_BYTES,
            BPF_F_USER_STACK as u64,
        );
        if user < 0 {
            bump(Counter::UserStackError);
            (*record).user_len = 0;
            (*record).user_err = user as i16;
        } else {
            (*record).user_len = (user / 8) as u16;
            (*record).user_err = 0;
        }
    }
    let wakeup = if SAMPLES.query(BPF_RB_AVAIL_DATA as u64) >= SAMPLES_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wakeup as u64);
    bump(Counter::Submitted);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
