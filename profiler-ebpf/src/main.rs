//! The sampling program: one run per cpu-clock (or cycles) tick on every CPU.
//!
//! It records who was on the CPU (tgid, tid, comm) with the kernel stack (the kernel's own
//! unwinder) and the user stack, and streams the record through the `SAMPLES` ring buffer.
//! User stacks are walked here from the unwind tables the daemon compiled from each file's
//! CFI (`UNWIND_ROWS`), one frame per `bpf_loop` step, with frame pointers for code that has
//! no CFI (Go, JIT). Processes the daemon has not loaded yet get the kernel's frame-pointer
//! walk; their first sample asks the daemon to load them (`PROC_EVENTS`). Every outcome is
//! counted in `COUNTERS`, so nothing is lost silently.
//!
//! A second, never attached program (`ksym_names`) names kernel addresses for the daemon.
#![no_std]
#![no_main]

use core::{
    ffi::c_void,
    mem::{MaybeUninit, offset_of},
    ptr::{addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    btf_maps::{self, ArrayOfMaps},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_get_stack, bpf_ktime_get_ns,
        bpf_probe_read_user,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_task_btf, bpf_loop,
            bpf_probe_read_kernel, bpf_snprintf, bpf_task_pt_regs,
        },
    },
    macros::{btf_map, map, perf_event, raw_tracepoint},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{PerfEventContext, RawTracePointContext},
};
use profiler_common::{
    COUNTER_SLOTS, CachedMapping, CachedRow, Counter, FileTable, HEADER_BYTES, KSYM_BATCH, KSYM_NAME_BYTES,
    KsymBatch, MAPPING_CACHE_ENTRIES, MAPPING_PID_PREFIX, MAX_FRAMES, MAX_MAPPINGS, MAX_PROCS,
    MAX_STACK_DEPTH, MAX_TARGET_CGROUPS, MAX_TARGET_PIDS, MAX_UNWIND_FILES, MAX_USER_DEPTH,
    MIN_SAMPLES_RING_BYTES, Mapping, MappingKey, PROC_EVENTS_RING_BYTES, ProcEvent, ROW_CACHE_ENTRIES,
    RawSample, UNWIND_MODE_TABLES, UNWIND_ROWS_MAP_FLAGS, UNWIND_STATUS_SLOTS, UnwindRow, UnwindState,
    UnwindStatus, cfa, mapping, mapping_key, proc_event, proc_state, samples_wakeup_bytes,
};

/// The daemon sets the real size before loading (`samples_ring_bytes`).
#[map(name = "SAMPLES")]
static SAMPLES: RingBuf = RingBuf::with_byte_size(MIN_SAMPLES_RING_BYTES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<RawSample> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "UNWIND_STATE")]
static UNWIND_STATE: PerCpuArray<UnwindState> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "TARGET_PIDS")]
static TARGET_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_TARGET_PIDS, 0);

#[map(name = "TARGET_CGROUPS")]
static TARGET_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_TARGET_CGROUPS, 0);

/// One file's rows. The length here is only the template's: with `BPF_F_INNER_MAP` each file's
/// array is as long as its table.
type FileRows = btf_maps::Array<UnwindRow, 1, { UNWIND_ROWS_MAP_FLAGS as usize }>;

/// Slot → a file's rows, created by the daemon as it loads tables (nothing is allocated up front).
#[btf_map(name = "UNWIND_ROWS")]
static UNWIND_ROWS: ArrayOfMaps<FileRows, { MAX_UNWIND_FILES as usize }> = ArrayOfMaps::new();

#[map(name = "UNWIND_FILES")]
static UNWIND_FILES: HashMap<u64, FileTable> = HashMap::with_max_entries(MAX_UNWIND_FILES, 0);

#[map(name = "MAPPINGS")]
static MAPPINGS: LpmTrie<MappingKey, Mapping> = LpmTrie::with_max_entries(MAX_MAPPINGS, 0);

#[map(name = "UNWIND_GENERATION")]
static UNWIND_GENERATION: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "PROCS")]
static PROCS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PROCS, 0);

#[map(name = "PROC_EVENTS")]
static PROC_EVENTS: RingBuf = RingBuf::with_byte_size(PROC_EVENTS_RING_BYTES, 0);

/// Per CPU: when this CPU last forced a wakeup for a process's first sample.
#[map(name = "WAKEUP_AT")]
static WAKEUP_AT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "KSYM_IO")]
static KSYM_IO: Array<KsymBatch> = Array::with_max_entries(1, 0);

/// `bpf_snprintf` wants its format in read-only map memory: `.rodata`, frozen by the loader.
#[unsafe(no_mangle)]
static KSYM_FORMAT: [u8; 4] = *b"%pS\0";

/// Set to 1 by the loader when `--pid` was given. Read volatile so the compiler keeps the load
/// (the loader rewrites `.rodata` before the program is verified).
#[unsafe(no_mangle)]
static FILTER_PIDS: u8 = 0;

/// Set to 1 by the loader when cgroups are targeted (`--cgroup`, `--target`).
#[unsafe(no_mangle)]
static FILTER_CGROUPS: u8 = 0;

/// Unread `SAMPLES` bytes at which a sample wakes the reader: a quarter of the ring, set by the
/// loader with the ring's size.
#[unsafe(no_mangle)]
static SAMPLES_WAKEUP_BYTES: u64 = samples_wakeup_bytes(MIN_SAMPLES_RING_BYTES);

/// `UNWIND_MODE_TABLES` or `UNWIND_MODE_FRAME_POINTERS`, set by the loader.
#[unsafe(no_mangle)]
static UNWIND_MODE: u8 = UNWIND_MODE_TABLES;

const STACK_BYTES: u32 = (MAX_STACK_DEPTH * 8) as u32;
/// Forced wakeups for first samples are at least this far apart on one CPU (2 ms), so a storm
/// of process starts cannot make the daemon wake for every sample.
const FIRST_SAMPLE_WAKEUP_GAP_NS: u64 = 2_000_000;
/// Highest user-space address on x86-64 (47-bit address space).
const USER_MAX: u64 = 0x0000_7fff_ffff_ffff;
/// A frame larger than this is taken as a broken walk.
const MAX_FRAME_BYTES: u64 = 16 << 20;
/// Steps of the row search: enough for 2^24 rows per file.
const SEARCH_STEPS: u32 = 24;
/// Offset of `uc_mcontext` in the `ucontext` a signal frame starts with (rsp after the
/// handler returned into `__restore_rt`).
const UCONTEXT_MCONTEXT: u64 = 40;
/// Offsets of rbp, rsp and rip in `struct sigcontext` (x86-64).
const MCONTEXT_RBP: u64 = 80;
const MCONTEXT_RSP: u64 = 120;
const MCONTEXT_RIP: u64 = 128;

/// `struct pt_regs` (x86-64) as the perf context and `bpf_task_pt_regs` hold it.
#[repr(C)]
struct PtRegs {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    bp: u64,
    bx: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    ax: u64,
    cx: u64,
    dx: u64,
    si: u64,
    di: u64,
    orig_ax: u64,
    ip: u64,
    cs: u64,
    flags: u64,
    sp: u64,
    ss: u64,
}

#[perf_event]
pub fn sample_cpu(ctx: PerfEventContext) -> u32 {
    try_sample(&ctx);
    0
}

#[inline(always)]
fn bump_slot(slot: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, and perf_event programs do not nest on one CPU.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn bump(counter: Counter) {
    bump_slot(counter as u32);
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
    // SAFETY: both are plain u8s in .rodata.
    let (by_pid, by_cgroup) = unsafe {
        (
            read_volatile(&FILTER_PIDS) != 0,
            read_volatile(&FILTER_CGROUPS) != 0,
        )
    };
    if by_pid || by_cgroup {
        // A selected process or cgroup: one lookup each, values only tested for presence.
        // SAFETY: map lookups; the references are not kept.
        let selected = (by_pid && unsafe { TARGET_PIDS.get(&tgid) }.is_some())
            || (by_cgroup && unsafe { TARGET_CGROUPS.get(&bpf_get_current_cgroup_id()) }.is_some());
        if !selected {
            bump(Counter::FilteredOut);
            return;
        }
    }

    let Some(record) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: `record` points at this CPU's scratch slot, which nothing else uses while this
    // program runs (perf_event programs do not nest on a CPU). Kernel frames fill
    // frames[0..127]; user frames start at frames[kernel_len] with kernel_len <= 127, and every
    // user write is bounds-checked against MAX_FRAMES.
    unsafe {
        let header = &mut (*record).header;
        header.ktime_ns = bpf_ktime_get_ns();
        header.tgid = tgid;
        header.tid = tid;
        header.cpu = bpf_get_smp_processor_id();
        // Byte by byte and volatile: the compiler would make a `memset` call of it, a byte loop
        // that costs every sample and that the verifier walks through byte by byte.
        for byte in &mut header._pad {
            write_volatile(byte, 0);
        }
        // Straight into the record (the helper zeroes the buffer when it fails); aya's wrapper
        // zeroes an array on the stack first and copies it.
        bpf_get_current_comm(header.comm.as_mut_ptr().cast(), header.comm.len() as u32);

        let frames = addr_of_mut!((*record).frames).cast::<u64>();
        // A tick that hit user mode has no kernel stack (the kernel would return 0 frames
        // after setting up its callchain buffer): skip the helper.
        let kernel = if tick_in_user(ctx) {
            0
        } else {
            bpf_get_stack(ctx.as_ptr(), frames.cast(), STACK_BYTES, 0)
        };
        let mut kernel_len = 0usize;
        if kernel < 0 {
            bump(Counter::KernelStackError);
            header.kernel_err = kernel as i16;
        } else {
            kernel_len = (kernel as usize / 8).min(MAX_STACK_DEPTH);
            header.kernel_err = 0;
        }
        header.kernel_len = kernel_len as u16;
        header.user_err = 0;

        let tables = read_volatile(&UNWIND_MODE) == UNWIND_MODE_TABLES;
        let process = if tables { PROCS.get(&tgid).copied() } else { None };
        let state = process.map(proc_state::state);
        let loaded = state == Some(proc_state::LOADED);
        // The first sample of a process wakes the daemon at once, so it reads the process's
        // mappings while the process still exists (short-lived processes), instead of at the
        // next timed drain.
        // After an exec (`stale` until the daemon reloads the process) the sample is the first
        // of a new program: the same hurry.
        let first_sample =
            tables && ((state.is_none() && request_load(tgid)) || state == Some(proc_state::STALE));
        let (user_len, status) = if loaded {
            walk_user(ctx, tgid, process.unwrap_or(0), kernel_len)
        } else {
            let user = bpf_get_stack(
                ctx.as_ptr(),
                frames.add(kernel_len).cast(),
                STACK_BYTES,
                BPF_F_USER_STACK as u64,
            );
            let status = if tables {
                UnwindStatus::FramePointerOnly
            } else {
                UnwindStatus::Complete
            };
            if user < 0 {
                bump(Counter::UserStackError);
                header.user_err = user as i16;
                (0, status)
            } else {
                ((user as usize / 8).min(MAX_STACK_DEPTH), status)
            }
        };
        header.user_len = user_len as u16;
        header.unwind_status = status as u8;
        bump_slot(UNWIND_STATUS_SLOTS + status as u32);

        // Read back, not kept in a register across the walk: the verifier would check the whole
        // walk once for every kind of value the register can hold (none, some, all 127 kernel
        // frames), as different states.
        let kernel_len = (read_volatile(&header.kernel_len) as usize).min(MAX_STACK_DEPTH);
        let len = HEADER_BYTES + (kernel_len + user_len) * 8;
        if len > size_of::<RawSample>() {
            return;
        }
        let wakeup = if (first_sample && first_sample_wakeup(header.ktime_ns))
            || SAMPLES.query(BPF_RB_AVAIL_DATA as u64) >= read_volatile(&SAMPLES_WAKEUP_BYTES)
        {
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

/// Whether the tick interrupted user mode (the privilege level of the saved code segment).
#[inline(always)]
fn tick_in_user(ctx: &PerfEventContext) -> bool {
    // SAFETY: the perf_event context starts with the interrupted pt_regs.
    unsafe { (*ctx.as_ptr().cast::<PtRegs>()).cs & 3 == 3 }
}

/// Sets the walk's first pc, sp, bp and `is_return` from the user registers at the sample: the
/// interrupted ones when the tick hit user mode, else the ones saved at kernel entry. Nothing
/// is copied through the stack, so both ways reach the walk in the same verifier state.
#[inline(always)]
unsafe fn user_regs(ctx: &PerfEventContext, s: &mut UnwindState) -> bool {
    let regs = ctx.as_ptr().cast::<PtRegs>();
    if tick_in_user(ctx) {
        // SAFETY: as above; the verifier allows reads of the whole context struct.
        unsafe {
            s.pc = (*regs).ip;
            s.sp = (*regs).sp;
            s.bp = (*regs).bp;
        }
        s.is_return = 0;
        return true;
    }
    // The saved registers from orig_ax to sp (orig_ax, ip, cs, flags, sp), and bp.
    const FROM: usize = offset_of!(PtRegs, orig_ax);
    const WORDS: usize = (offset_of!(PtRegs, sp) - FROM) / 8 + 1;
    let mut words = MaybeUninit::<[u64; WORDS]>::uninit();
    // SAFETY: helpers with a BTF task pointer; the copies go through probe_read_kernel into
    // `words` (initialised when it returns 0) and the map value.
    unsafe {
        let task = bpf_get_current_task_btf();
        let saved = bpf_task_pt_regs(task) as *const u8;
        if bpf_probe_read_kernel(
            words.as_mut_ptr().cast(),
            (WORDS * 8) as u32,
            saved.add(FROM).cast(),
        ) != 0
            || bpf_probe_read_kernel(
                (&mut s.bp as *mut u64).cast(),
                8,
                saved.add(offset_of!(PtRegs, bp)).cast(),
            ) != 0
        {
            return false;
        }
        let words = words.assume_init();
        let word = |field: usize| words[(field - FROM) / 8];
        s.pc = word(offset_of!(PtRegs, ip));
        s.sp = word(offset_of!(PtRegs, sp));
        // Interrupted inside a syscall: the user pc is the return point after `syscall`.
        s.is_return = u8::from(word(offset_of!(PtRegs, orig_ax)) != u64::MAX);
    }
    true
}

/// Walks the user stack into `SCRATCH.frames[kernel_len..]` with the unwind tables.
#[inline(always)]
unsafe fn walk_user(
    ctx: &PerfEventContext,
    tgid: u32,
    process: u32,
    kernel_len: usize,
) -> (usize, UnwindStatus) {
    let Some(state) = UNWIND_STATE.get_ptr_mut(0) else {
        return (0, UnwindStatus::ReadError);
    };
    // SAFETY: `state` is this CPU's slot; see try_sample for the nesting argument.
    unsafe {
        let s = &mut *state;
        if !user_regs(ctx, s) {
            return (0, UnwindStatus::ReadError);
        }
        // A kernel thread has no user registers.
        if s.pc == 0 {
            return (0, UnwindStatus::Complete);
        }
        s.tgid = tgid;
        s.process = process;
        s.frames = 0;
        s.kernel_len = kernel_len as u32;
        s.status = UnwindStatus::MaxDepth as u8;
        s.cached = 0;
        // Entries cached by earlier walks count only under the same generation (no table
        // removed since) and, for mappings, the same PROCS value (not reloaded since).
        s.generation = UNWIND_GENERATION.get(0).copied().unwrap_or(0);
        bpf_loop(
            MAX_USER_DEPTH as u32,
            step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
        let status = UnwindStatus::from_u8(s.status).unwrap_or(UnwindStatus::MaxDepth);
        ((s.frames as usize).min(MAX_USER_DEPTH), status)
    }
}

#[inline(always)]
fn read_user_u64(addr: u64) -> Option<u64> {
    // SAFETY: the helper copies 8 bytes of user memory, failing cleanly on a bad address.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// Two consecutive words of user memory at `addr`.
#[inline(always)]
fn read_user_pair(addr: u64) -> Option<[u64; 2]> {
    // SAFETY: as read_user_u64, for 16 bytes.
    unsafe { bpf_probe_read_user(addr as *const [u64; 2]) }.ok()
}

/// Ends the walk with `status`.
#[inline(always)]
fn stop(state: &mut UnwindState, status: UnwindStatus) -> i64 {
    state.status = status as u8;
    1
}

/// One frame of the walk (a `bpf_loop` callback): record the pc, find its rule, compute the
/// caller's registers. Returns 1 to stop.
#[inline(never)]
extern "C" fn step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(state) = UNWIND_STATE.get_ptr_mut(0) else {
        return 1;
    };
    let Some(record) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU slots owned by this program run.
    let state = unsafe { &mut *state };
    let pc = state.pc;
    if pc < 0x1000 || pc > USER_MAX {
        // A zero return address is how many runtimes end the chain.
        let status = if pc == 0 && state.frames > 0 {
            UnwindStatus::Complete
        } else {
            UnwindStatus::BadPc
        };
        return stop(state, status);
    }
    let slot = state.kernel_len as usize + state.frames as usize;
    if slot >= MAX_FRAMES || state.frames as usize >= MAX_USER_DEPTH {
        return stop(state, UnwindStatus::MaxDepth);
    }
    // SAFETY: slot < MAX_FRAMES, checked above.
    unsafe { (*record).frames[slot] = pc };
    state.frames += 1;

    // Frames of one file usually follow each other: reuse the previous frame's mapping and
    // table when the pc is still inside it.
    if (state.cached == 0 || pc < state.mapping.start || pc >= state.mapping.end) && !find_mapping(state, pc)
    {
        return stop(state, UnwindStatus::NoMapping);
    }
    let lookup = pc - u64::from(state.is_return);
    let row = match state.mapping.kind {
        mapping::TABLE => {
            if state.has_table == 0 {
                return stop(state, UnwindStatus::NoTable);
            }
            let vaddr = lookup.wrapping_sub(state.mapping.bias);
            cached_row(state, vaddr)
        }
        mapping::FRAME_POINTER => UnwindRow {
            pc: 0,
            cfa: 0,
            cfa_rule: cfa::FRAME_POINTER,
            rbp: 0,
        },
        _ => return stop(state, UnwindStatus::NoMapping),
    };
    apply(state, row)
}

/// Makes the mapping holding `pc` the walk's current one, with its file's table: from this
/// CPU's cache, else from `MAPPINGS` (a microsecond and more) and `UNWIND_FILES`, then cached.
/// False when no mapping holds `pc`. Not inlined, so the verifier checks the rest of the step
/// once whichever way the mapping was found, not once per way.
#[inline(never)]
fn find_mapping(state: &mut UnwindState, pc: u64) -> bool {
    let found = from_cache(state, pc) || from_maps(state, pc);
    if found {
        state.cached = 1;
    }
    found
}

/// Takes the mapping holding `pc` from `MAPPINGS` and its table from `UNWIND_FILES`, and caches
/// them.
#[inline(always)]
fn from_maps(state: &mut UnwindState, pc: u64) -> bool {
    let key = Key::new(96, mapping_key(state.tgid, pc));
    let Some(found) = MAPPINGS.get(&key) else {
        return false;
    };
    state.mapping = *found;
    state.has_table = 0;
    if found.kind == mapping::TABLE {
        // SAFETY: the value is copied out at once.
        if let Some(table) = unsafe { UNWIND_FILES.get(&found.file_id) } {
            state.table = *table;
            state.has_table = 1;
        }
    }
    // A table mapping without its table is not cached (the table may arrive without a new
    // generation), nor the whole-process entry, which holds no address.
    if found.kind == mapping::FRAME_POINTER || state.has_table == 1 {
        to_cache(state, pc);
    }
    true
}

/// The slot of a direct-mapped cache of `entries` (a power of two) for `key` of `owner` (a
/// process, or a file's first row): the top bits of a multiplicative hash.
#[inline(always)]
fn cache_slot(key: u32, owner: u32, entries: usize) -> usize {
    let hash = (key ^ owner.rotate_left(16)).wrapping_mul(0x9e37_79b1);
    (hash >> (32 - entries.trailing_zeros())) as usize & (entries - 1)
}

/// The slot of this CPU's mapping cache for `pc` of `tgid` (one per 64 KiB region).
#[inline(always)]
fn mapping_slot(tgid: u32, pc: u64) -> usize {
    cache_slot((pc >> 16) as u32, tgid, MAPPING_CACHE_ENTRIES)
}

/// Takes the mapping holding `pc` from this CPU's cache, if there. One slot is looked at: a
/// scan of several would multiply the paths the verifier checks.
#[inline(always)]
fn from_cache(state: &mut UnwindState, pc: u64) -> bool {
    let entry = &state.cache[mapping_slot(state.tgid, pc)];
    if entry.generation != state.generation as u32
        || entry.tgid != state.tgid
        || entry.process != state.process
        || pc < entry.mapping.start
        || pc >= entry.mapping.end
    {
        return false;
    }
    state.mapping = entry.mapping;
    state.table = entry.table;
    state.has_table = entry.has_table as u8;
    true
}

/// Keeps the walk's current mapping in this CPU's cache, in `pc`'s slot.
#[inline(always)]
fn to_cache(state: &mut UnwindState, pc: u64) {
    state.cache[mapping_slot(state.tgid, pc)] = CachedMapping {
        tgid: state.tgid,
        process: state.process,
        has_table: u32::from(state.has_table),
        generation: state.generation as u32,
        mapping: state.mapping,
        table: state.table,
    };
}

/// The row covering `vaddr` in the current table, from this CPU's row cache when the same
/// address of the same file was searched before under the current generation.
#[inline(always)]
fn cached_row(state: &mut UnwindState, vaddr: u64) -> UnwindRow {
    let table = state.table;
    // An empty table has no slot of its own: never cached.
    if table.rows == 0 || vaddr < table.base || vaddr - table.base > u64::from(u32::MAX) {
        return UnwindRow::default();
    }
    let target = (vaddr - table.base) as u32;
    let index = cache_slot(target, table.slot, ROW_CACHE_ENTRIES);
    let generation = state.generation as u32;
    let entry = &state.rows[index];
    if entry.valid == 1
        && entry.generation == generation
        && entry.slot == table.slot
        && entry.target == target
    {
        return entry.row;
    }
    let row = find_row(&table, vaddr);
    state.rows[index] = CachedRow {
        generation,
        valid: 1,
        slot: table.slot,
        target,
        row,
    };
    row
}

/// A binary search over one file's rows (`UNWIND_ROWS` slot `slot`) in progress: rows before
/// `lo` start at or before `target`, rows from `hi` on after it.
#[repr(C)]
struct Search {
    slot: u32,
    lo: u32,
    hi: u32,
    target: u32,
    /// 1 when a row inside the range could not be read.
    failed: u32,
    /// The row before `lo` (the last one seen to start at or before `target`), else a gap.
    row: UnwindRow,
}

/// The row covering `vaddr`: the last one whose start is <= vaddr, or a GAP row.
///
/// The search runs as a `bpf_loop` of [`search_step`], not as a loop in place: the verifier
/// checks a bounded loop once per step, each step a state of its own, where it checks a
/// callback until its states repeat (a few times).
#[inline(always)]
fn find_row(table: &FileTable, vaddr: u64) -> UnwindRow {
    let gap = UnwindRow::default();
    if vaddr < table.base || vaddr - table.base > u64::from(u32::MAX) {
        return gap;
    }
    let mut search = Search {
        slot: table.slot,
        lo: 0,
        hi: table.rows,
        target: (vaddr - table.base) as u32,
        failed: 0,
        row: gap,
    };
    // SAFETY: the callback only touches `search`, which outlives the call.
    unsafe {
        bpf_loop(
            SEARCH_STEPS,
            search_step as *mut c_void,
            (&mut search as *mut Search).cast(),
            0,
        )
    };
    if search.failed != 0 { gap } else { search.row }
}

/// One step of [`find_row`]'s binary search (a `bpf_loop` callback). Returns 1 when done.
#[inline(never)]
extern "C" fn search_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is find_row's `Search`, on its caller's stack for the whole loop.
    let search = unsafe { &mut *ctx.cast::<Search>() };
    if search.lo >= search.hi {
        return 1;
    }
    let mid = search.lo + (search.hi - search.lo) / 2;
    // The slot is looked up at each probe: a map pointer kept in `search` across the loop made
    // the verifier process a third more instructions.
    match UNWIND_ROWS.get_value(search.slot, &mid) {
        Some(row) if row.pc <= search.target => {
            search.row = *row;
            search.lo = mid + 1;
        }
        Some(_) => search.hi = mid,
        None => {
            search.failed = 1;
            return 1;
        }
    }
    0
}

/// Applies `row` to the state: the caller's pc, sp and bp.
#[inline(always)]
fn apply(state: &mut UnwindState, row: UnwindRow) -> i64 {
    let sp = state.sp;
    let bp = state.bp;
    let operand = u64::from(row.cfa);
    let mut via_fp = false;
    let cfa = match row.cfa_rule {
        cfa::SP_OFFSET => sp.wrapping_add(operand),
        cfa::BP_OFFSET => bp.wrapping_add(operand),
        cfa::PLT1 | cfa::PLT2 => {
            let threshold = if row.cfa_rule == cfa::PLT1 { 11 } else { 10 };
            sp + 8 + if state.pc & 15 >= threshold { 8 } else { 0 }
        }
        cfa::DEREF_SP | cfa::DEREF_BP => {
            let base = if row.cfa_rule == cfa::DEREF_SP { sp } else { bp };
            match read_user_u64(base.wrapping_add(operand >> 8)) {
                Some(value) => value.wrapping_add(operand & 0xff),
                None => return stop(state, UnwindStatus::ReadError),
            }
        }
        // No CFI for the interrupted instruction: assume a leaf that has not pushed anything.
        cfa::GAP if state.frames == 1 && state.is_return == 0 => sp + 8,
        cfa::GAP | cfa::FRAME_POINTER => {
            if bp == 0 {
                return stop(state, UnwindStatus::Complete);
            }
            via_fp = true;
            bp.wrapping_add(16)
        }
        cfa::STOP => return stop(state, UnwindStatus::Complete),
        cfa::SIGNAL => return signal_frame(state),
        _ => return stop(state, UnwindStatus::UnsupportedRule),
    };
    // Table rules must move up the stack. Frame-pointer chains may jump to another stack (Go's
    // mcall and systemstack switch between a goroutine's stack and g0's), so they only need
    // an aligned frame pointer; a cycle ends at the depth limit.
    let bad = if via_fp {
        bp & 7 != 0
    } else {
        cfa <= sp || cfa - sp > MAX_FRAME_BYTES
    };
    if bad {
        return stop(state, UnwindStatus::BadFrame);
    }
    // The caller's rbp is usually saved right below the return address (pushed first thing
    // after the call, and always so in a frame-pointer frame, where cfa = rbp + 16): one read
    // of user memory for both.
    let (ra, new_bp) = if via_fp || row.rbp == -2 {
        match read_user_pair(cfa - 16) {
            Some([saved_bp, ra]) => (ra, saved_bp),
            None => return stop(state, UnwindStatus::ReadError),
        }
    } else {
        let Some(ra) = read_user_u64(cfa - 8) else {
            return stop(state, UnwindStatus::ReadError);
        };
        let new_bp = if row.rbp != 0 {
            match read_user_u64(cfa.wrapping_add((i64::from(row.rbp) * 8) as u64)) {
                Some(value) => value,
                None => return stop(state, UnwindStatus::ReadError),
            }
        } else {
            bp
        };
        (ra, new_bp)
    };
    if ra == 0 {
        return stop(state, UnwindStatus::Complete);
    }
    state.pc = ra;
    state.sp = cfa;
    state.bp = new_bp;
    state.is_return = 1;
    0
}

/// `__restore_rt`: the interrupted registers are in the `ucontext` at rsp.
#[inline(always)]
fn signal_frame(state: &mut UnwindState) -> i64 {
    let mcontext = state.sp + UCONTEXT_MCONTEXT;
    let (Some(bp), Some(sp), Some(pc)) = (
        read_user_u64(mcontext + MCONTEXT_RBP),
        read_user_u64(mcontext + MCONTEXT_RSP),
        read_user_u64(mcontext + MCONTEXT_RIP),
    ) else {
        return stop(state, UnwindStatus::ReadError);
    };
    state.pc = pc;
    state.sp = sp;
    state.bp = bp;
    // The interrupted instruction itself, not a return address.
    state.is_return = 0;
    0
}

/// `sched_process_exec`: the process's mappings are gone; mark it stale until the daemon
/// reloads it, and tell the daemon.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn on_exec(_ctx: RawTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: presence test only.
    if unsafe { PROCS.get(&tgid) }.is_some() {
        let _ = PROCS.insert(&tgid, &proc_state::STALE, 0);
    }
    send_event(proc_event::EXEC, tgid);
    0
}

/// `sched_process_exit`: reported when the thread-group leader exits.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn on_exit(_ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == pid_tgid as u32 {
        // SAFETY: presence test only.
        if unsafe { PROCS.get(&tgid) }.is_some() {
            send_event(proc_event::EXIT, tgid);
        }
    }
    0
}

/// Whether this CPU may force a wakeup for a first sample at `now` (and notes it if so).
#[inline(always)]
fn first_sample_wakeup(now: u64) -> bool {
    let Some(last) = WAKEUP_AT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; perf_event programs do not nest on a CPU.
    unsafe {
        if now.wrapping_sub(*last) < FIRST_SAMPLE_WAKEUP_GAP_NS {
            return false;
        }
        *last = now;
    }
    true
}

/// Marks `tgid` as requested and asks the daemon to load it, once: the insert fails when another
/// CPU got there first (or PROCS is full; the daemon's sampler asks again then). Returns
/// whether this call made the request.
#[inline(always)]
fn request_load(tgid: u32) -> bool {
    if PROCS
        .insert(&tgid, &proc_state::REQUESTED, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        send_event(proc_event::LOAD, tgid);
        return true;
    }
    false
}

/// Names `ctx.arg(0)` addresses of `KSYM_IO` (at most `KSYM_BATCH`). Run by the daemon with
/// `BPF_PROG_TEST_RUN`; never attached to the tracepoint its section names.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn ksym_names(ctx: RawTracePointContext) -> i32 {
    let count: u64 = ctx.arg(0);
    let count = count.min(KSYM_BATCH as u64) as u32;
    // SAFETY: the callback only touches KSYM_IO's single value.
    unsafe { bpf_loop(count, ksym_one as *mut c_void, core::ptr::null_mut(), 0) };
    0
}

#[inline(never)]
extern "C" fn ksym_one(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(batch) = KSYM_IO.get_ptr_mut(0) else {
        return 1;
    };
    let i = index as usize;
    if i >= KSYM_BATCH {
        return 1;
    }
    // SAFETY: i < KSYM_BATCH; the array value is this map's only entry, and the daemon does not
    // touch it during the run.
    unsafe {
        let args = [(*batch).addrs[i]];
        let out = (*batch).names[i].as_mut_ptr();
        bpf_snprintf(
            out.cast(),
            KSYM_NAME_BYTES as u32,
            KSYM_FORMAT.as_ptr().cast(),
            args.as_ptr().cast_mut(),
            8,
        );
    }
    0
}

#[inline(always)]
fn send_event(kind: u32, tgid: u32) {
    let event = ProcEvent { kind, tgid };
    if PROC_EVENTS.output::<ProcEvent>(&event, 0).is_err() {
        bump(Counter::ProcEventsLost);
    }
}

// Keeps the pid-prefix constant referenced from the BPF side of the contract.
const _: u32 = MAPPING_PID_PREFIX;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
