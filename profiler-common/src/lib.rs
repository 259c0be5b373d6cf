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
/// `.rodata` global: `1` restricts sampling to the tgids in [`MAP_TARGET_PIDS`] (or, with
/// [`GLOBAL_FILTER_CGROUPS`], also the cgroups in [`MAP_TARGET_CGROUPS`]).
pub const GLOBAL_FILTER_PIDS: &str = "FILTER_PIDS";
/// Hash of cgroup v2 ids (`bpf_get_current_cgroup_id`) to sample when
/// [`GLOBAL_FILTER_CGROUPS`] is set.
pub const MAP_TARGET_CGROUPS: &str = "TARGET_CGROUPS";
/// `.rodata` global: `1` samples only tasks whose cgroup is in [`MAP_TARGET_CGROUPS`] (or whose
/// tgid is in [`MAP_TARGET_PIDS`] when [`GLOBAL_FILTER_PIDS`] is set too).
pub const GLOBAL_FILTER_CGROUPS: &str = "FILTER_CGROUPS";
/// Capacity of [`MAP_TARGET_CGROUPS`]: selected cgroups and their descendants.
pub const MAX_TARGET_CGROUPS: u32 = 16384;
/// `.rodata` global: [`UNWIND_MODE_TABLES`] (default) or [`UNWIND_MODE_FRAME_POINTERS`].
pub const GLOBAL_UNWIND_MODE: &str = "UNWIND_MODE";
/// User stacks come from the unwind tables ([`MAP_UNWIND_ROWS`]), with frame pointers where a
/// mapping has no table (Go, JIT code).
pub const UNWIND_MODE_TABLES: u8 = 1;
/// User stacks come from the kernel's frame-pointer walk only (`bpf_get_stack`).
pub const UNWIND_MODE_FRAME_POINTERS: u8 = 0;

/// Raw tracepoint program run when a process execs (its mappings are gone).
pub const PROGRAM_EXEC: &str = "on_exec";
/// Raw tracepoint program run when a task exits.
pub const PROGRAM_EXIT: &str = "on_exit";
/// Array of maps: slot (`u32`, [`FileTable::slot`]) → one file's table, an `ARRAY` of
/// [`UnwindRow`]s sorted by `pc` and exactly as long as the table. The daemon creates a file's
/// array when it loads the table and deletes the slot when it drops it, so kernel memory follows
/// the tables loaded; the unwind-table budget caps their sum.
pub const MAP_UNWIND_ROWS: &str = "UNWIND_ROWS";
/// Flags of every [`MAP_UNWIND_ROWS`] inner array: `BPF_F_MMAPABLE` (the daemon writes the rows
/// through a mapping) and `BPF_F_INNER_MAP` (inner arrays may differ in length). The kernel
/// accepts an inner map only with the same flags as the outer map's template.
pub const UNWIND_ROWS_MAP_FLAGS: u32 = (1 << 10) | (1 << 12);
/// Name of each file's inner array (`bpftool map` shows it).
pub const UNWIND_ROWS_INNER_NAME: &str = "unwind_rows";
/// Capacity of [`MAP_UNWIND_FILES`] and slots of [`MAP_UNWIND_ROWS`]: files with a table loaded
/// at once.
pub const MAX_UNWIND_FILES: u32 = 4096;
/// [`FileTable::slot`] of a table without rows: it has no inner array.
pub const NO_ROWS_SLOT: u32 = u32::MAX;
/// Hash: file id (`u64`) → [`FileTable`], where that file's rows are.
pub const MAP_UNWIND_FILES: &str = "UNWIND_FILES";
/// LPM trie: [`MappingKey`] (tgid, address) → [`Mapping`].
pub const MAP_MAPPINGS: &str = "MAPPINGS";
/// Capacity of [`MAP_MAPPINGS`] (address-range prefixes, of every loaded process together).
/// 262,144 entries: ~20,000 executable mappings at their typical 5–20 entries each; in the
/// kernel at most ~48 MiB (a 96-byte leaf and at most one 96-byte inner node each).
pub const MAX_MAPPINGS: u32 = 1 << 18;
/// Hash: tgid → one of the [`proc_state`] values. A tgid absent here has not been seen yet:
/// its first sample adds it as [`proc_state::REQUESTED`] and asks the daemon to load it.
pub const MAP_PROCS: &str = "PROCS";
/// Capacity of [`MAP_PROCS`]: processes seen (requested or loaded) at once.
pub const MAX_PROCS: u32 = 1 << 16;
/// Ring buffer of [`ProcEvent`]s (load requests, exec, exit) for the daemon's unwind stage.
pub const MAP_PROC_EVENTS: &str = "PROC_EVENTS";
/// Raw tracepoint program never attached: run by `BPF_PROG_TEST_RUN`, it names the kernel
/// addresses in [`MAP_KSYM_IO`] with the kernel's own symbol lookup (`%pS`), so the daemon does
/// not read all of /proc/kallsyms.
pub const PROGRAM_KSYM: &str = "ksym_names";
/// Array with one [`KsymBatch`]: the addresses in, their names out.
pub const MAP_KSYM_IO: &str = "KSYM_IO";
/// Addresses named per run of [`PROGRAM_KSYM`].
pub const KSYM_BATCH: usize = 64;
/// Bytes of one name (`function+0xoff/0xsize [module]`, NUL-terminated, cut if longer).
pub const KSYM_NAME_BYTES: usize = 256;

const _: () = assert!(core::mem::size_of::<KsymBatch>() == KSYM_BATCH * (8 + KSYM_NAME_BYTES));

/// Value of [`MAP_KSYM_IO`]. The daemon fills `addrs` and passes the count as the first
/// argument of the run; the program writes `names[i]` for each `addrs[i]`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KsymBatch {
    pub addrs: [u64; KSYM_BATCH],
    pub names: [[u8; KSYM_NAME_BYTES]; KSYM_BATCH],
}
/// Per-CPU array with one [`UnwindState`], the walk's registers between `bpf_loop` steps and
/// the CPU's caches of mappings and rows found by earlier walks.
pub const MAP_UNWIND_STATE: &str = "UNWIND_STATE";
/// Array with one `u64`: the generation of [`MAP_UNWIND_FILES`] and [`MAP_UNWIND_ROWS`]. The
/// daemon increments it when it removes a file's table (its rows may then be reused); cache
/// entries found under another generation miss. Loading a table needs no
/// increment (nothing cached refers to it); changed mappings are told by the process's
/// [`MAP_PROCS`] value.
pub const MAP_UNWIND_GENERATION: &str = "UNWIND_GENERATION";
/// Mappings each CPU's walk keeps across samples ([`UnwindState::cache`]); a power of two.
pub const MAPPING_CACHE_ENTRIES: usize = 32;
/// Rows each CPU's walk keeps across samples ([`UnwindState::rows`]); a power of two.
pub const ROW_CACHE_ENTRIES: usize = 64;

/// Frames kept per stack. It equals the kernel's default `kernel.perf_event_max_stack` (127),
/// the most `bpf_get_stack` returns without raising that sysctl.
pub const MAX_STACK_DEPTH: usize = 127;
/// User frames the table unwinder walks at most.
pub const MAX_USER_DEPTH: usize = 256;
/// Frame slots of a record: kernel frames, then user frames.
pub const MAX_FRAMES: usize = MAX_STACK_DEPTH + MAX_USER_DEPTH;
/// Length of `task_struct::comm`, NUL included.
pub const COMM_LEN: usize = 16;
/// Capacity of [`MAP_TARGET_PIDS`]: more `--pid` flags than this are rejected by the daemon.
pub const MAX_TARGET_PIDS: u32 = 1024;
/// Smallest and largest [`MAP_SAMPLES`] ring buffer (bytes; the daemon sizes it at load with
/// [`samples_ring_bytes`], and the object's own size is the smallest).
pub const MIN_SAMPLES_RING_BYTES: u32 = 1 << 20;
pub const MAX_SAMPLES_RING_BYTES: u32 = 64 << 20;
/// Ring bytes per sample per second of sampling: the ring holds two thirds of a second of
/// full-depth records (3,112 bytes) and about seven seconds of typical ones (~300 bytes).
pub const SAMPLES_RING_BYTES_PER_SAMPLE_PER_S: u64 = 2048;

/// Size of the [`MAP_SAMPLES`] ring buffer for `cpus` CPUs sampled at `hz` each: room for a
/// second of samples at [`SAMPLES_RING_BYTES_PER_SAMPLE_PER_S`], as a power of two (a multiple
/// of the page size), between [`MIN_SAMPLES_RING_BYTES`] and [`MAX_SAMPLES_RING_BYTES`]. The
/// reader drains it every 250 ms and is woken at a quarter full, so a second is ample slack:
/// 1 MiB for 2 CPUs at 99 Hz, 32 MiB for 128.
pub const fn samples_ring_bytes(cpus: u32, hz: u32) -> u32 {
    let want = (cpus as u64 * hz as u64).saturating_mul(SAMPLES_RING_BYTES_PER_SAMPLE_PER_S);
    if want <= MIN_SAMPLES_RING_BYTES as u64 {
        return MIN_SAMPLES_RING_BYTES;
    }
    if want >= MAX_SAMPLES_RING_BYTES as u64 {
        return MAX_SAMPLES_RING_BYTES;
    }
    want.next_power_of_two() as u32
}

/// `.rodata` global: unread bytes in [`MAP_SAMPLES`] at which the program wakes the reader, a
/// quarter of the ring ([`samples_wakeup_bytes`]). Below it, records are submitted without a
/// wakeup and the reader drains the ring on its own timer (`profiler::sampler::DRAIN_EVERY`):
/// one wakeup per sample would cost the daemon more CPU than everything else it does per
/// sample. The other three quarters are the reader's time to respond before anything is lost.
pub const GLOBAL_SAMPLES_WAKEUP_BYTES: &str = "SAMPLES_WAKEUP_BYTES";

/// The wakeup threshold for a ring of `ring_bytes`.
pub const fn samples_wakeup_bytes(ring_bytes: u32) -> u64 {
    ring_bytes as u64 / 4
}

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
    /// 0, or the negative errno `bpf_get_stack` returned for the user stack (frame-pointer
    /// mode and processes not loaded yet).
    pub user_err: i16,
    /// How the user walk ended: an [`UnwindStatus`] value.
    pub unwind_status: u8,
    pub _pad: [u8; 3],
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
/// return addresses, except the one after a signal frame). A 30-frame sample is 288 bytes
/// instead of the full 3,112. The daemon turns a record into its own `Sample`
/// (`profiler::sampler`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RawSample {
    pub header: RawSampleHeader,
    pub frames: [u64; MAX_FRAMES],
}

const _: () = assert!(core::mem::size_of::<RawSample>() == HEADER_BYTES + 8 * MAX_FRAMES);
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
    /// Exec and exit events lost because [`MAP_PROC_EVENTS`] was full.
    ProcEventsLost = 7,
}

/// Slot of the first per-[`UnwindStatus`] counter in [`MAP_COUNTERS`]: the walk of a sample
/// that ended with status `s` counts in slot `UNWIND_STATUS_SLOTS + s`.
pub const UNWIND_STATUS_SLOTS: u32 = 16;
/// Number of slots in [`MAP_COUNTERS`] (room to grow without resizing the map).
pub const COUNTER_SLOTS: u32 = 32;

/// How a user stack walk ended. Numbers are part of the contract and never reused.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnwindStatus {
    /// The walk reached the bottom of the stack (or the sample has no user part).
    Complete = 0,
    /// The process is not loaded yet (or just exec'd): the kernel's frame-pointer walk was
    /// used, as in frame-pointer mode.
    FramePointerOnly = 1,
    /// An address outside every mapping the daemon loaded for the process.
    NoMapping = 2,
    /// The address is in a file whose table is not loaded (too large, evicted, unreadable).
    NoTable = 3,
    /// The table row says the rule cannot be followed in BPF (an unsupported CFI expression
    /// or register).
    UnsupportedRule = 4,
    /// The computed frame address is not above the stack pointer, or the walk did not advance.
    BadFrame = 5,
    /// Reading the stack failed (`bpf_probe_read_user`).
    ReadError = 6,
    /// [`MAX_USER_DEPTH`] frames were walked before the bottom was reached.
    MaxDepth = 7,
    /// The instruction pointer is not a user address.
    BadPc = 8,
}

/// Number of [`UnwindStatus`] values.
pub const UNWIND_STATUSES: u32 = 9;

impl UnwindStatus {
    pub fn from_u8(value: u8) -> Option<UnwindStatus> {
        Some(match value {
            0 => UnwindStatus::Complete,
            1 => UnwindStatus::FramePointerOnly,
            2 => UnwindStatus::NoMapping,
            3 => UnwindStatus::NoTable,
            4 => UnwindStatus::UnsupportedRule,
            5 => UnwindStatus::BadFrame,
            6 => UnwindStatus::ReadError,
            7 => UnwindStatus::MaxDepth,
            8 => UnwindStatus::BadPc,
            _ => return None,
        })
    }

    /// Short stable name: a metric label value and the word profile comments use.
    pub fn name(self) -> &'static str {
        match self {
            UnwindStatus::Complete => "complete",
            UnwindStatus::FramePointerOnly => "frame-pointer-only",
            UnwindStatus::NoMapping => "no-mapping",
            UnwindStatus::NoTable => "no-table",
            UnwindStatus::UnsupportedRule => "unsupported-rule",
            UnwindStatus::BadFrame => "bad-frame",
            UnwindStatus::ReadError => "read-error",
            UnwindStatus::MaxDepth => "max-depth",
            UnwindStatus::BadPc => "bad-pc",
        }
    }
}

/// How to find the caller's frame (CFA) at an address. Values of [`UnwindRow::cfa_rule`].
pub mod cfa {
    /// No CFI covers the address: a leaf returns through `[rsp]`, any other frame follows
    /// the frame pointer.
    pub const GAP: u8 = 0;
    /// CFA = rsp + `cfa`.
    pub const SP_OFFSET: u8 = 1;
    /// CFA = rbp + `cfa`.
    pub const BP_OFFSET: u8 = 2;
    /// PLT stub, GCC form: CFA = rsp + 8 + (((rip & 15) >= 11) ? 8 : 0).
    pub const PLT1: u8 = 3;
    /// PLT stub, binutils form: the same with 10 as the threshold.
    pub const PLT2: u8 = 4;
    /// CFA = \*(rsp + (`cfa` >> 8)) + (`cfa` & 0xff) (stack realigned by the prologue).
    pub const DEREF_SP: u8 = 5;
    /// CFA = \*(rbp + (`cfa` >> 8)) + (`cfa` & 0xff).
    pub const DEREF_BP: u8 = 6;
    /// Follow the frame pointer: CFA = rbp + 16, rbp = \*rbp.
    pub const FRAME_POINTER: u8 = 7;
    /// The return address is undefined: the bottom of the stack.
    pub const STOP: u8 = 8;
    /// A signal trampoline: registers come from the `ucontext` at rsp.
    pub const SIGNAL: u8 = 9;
    /// A rule BPF cannot follow; `cfa` holds an [`super::invalid`] reason.
    pub const INVALID: u8 = 10;
}

/// Reasons stored in `cfa` of a [`cfa::INVALID`] row (for the table statistics).
pub mod invalid {
    pub const CFA_REGISTER: u16 = 1;
    pub const CFA_EXPRESSION: u16 = 2;
    pub const OFFSET_RANGE: u16 = 3;
    pub const RBP_RULE: u16 = 4;
    pub const RA_RULE: u16 = 5;
}

/// One row of an unwind table: from `pc` up to the next row's `pc`, this rule gives the
/// caller's frame. x86-64 only: the return address is always at CFA − 8.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnwindRow {
    /// Start address, relative to [`FileTable::base`].
    pub pc: u32,
    /// Operand of `cfa_rule` (an offset in bytes, or `a << 8 | b` for the deref rules).
    pub cfa: u16,
    /// One of the [`cfa`] constants.
    pub cfa_rule: u8,
    /// 0: rbp keeps its value; else rbp was saved at CFA + `rbp` × 8.
    pub rbp: i8,
}

const _: () = assert!(core::mem::size_of::<UnwindRow>() == 8);

/// Where a file's rows are in [`MAP_UNWIND_ROWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileTable {
    /// ELF virtual address that row `pc` values are relative to.
    pub base: u64,
    /// Slot of [`MAP_UNWIND_ROWS`] holding the rows ([`NO_ROWS_SLOT`] when there are none).
    pub slot: u32,
    /// Number of rows (sorted by `pc`).
    pub rows: u32,
}

const _: () = assert!(core::mem::size_of::<FileTable>() == 16);

/// Key data of [`MAP_MAPPINGS`]: tgid and address, both big-endian so that a prefix of the key
/// is a pid followed by an aligned address range.
pub type MappingKey = [u8; 12];

/// Prefix length (in bits) that covers a whole process: matches any address of the tgid.
pub const MAPPING_PID_PREFIX: u32 = 32;

pub fn mapping_key(tgid: u32, addr: u64) -> MappingKey {
    let mut key = [0u8; 12];
    let pid = tgid.to_be_bytes();
    let address = addr.to_be_bytes();
    let mut i = 0;
    while i < 4 {
        key[i] = pid[i];
        i += 1;
    }
    while i < 12 {
        key[i] = address[i - 4];
        i += 1;
    }
    key
}

/// Values of [`Mapping::kind`].
pub mod mapping {
    /// The process is loaded but no executable mapping covers the address.
    pub const PROCESS: u32 = 0;
    /// A file with an unwind table under [`super::Mapping::file_id`].
    pub const TABLE: u32 = 1;
    /// Code without CFI (Go, JIT, files without .eh_frame): follow the frame pointer.
    pub const FRAME_POINTER: u32 = 2;
}

/// Value of [`MAP_MAPPINGS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mapping {
    /// Key of [`MAP_UNWIND_FILES`].
    pub file_id: u64,
    /// Load bias: ELF virtual address = address − bias.
    pub bias: u64,
    /// The whole mapping, `[start, end)` (an LPM entry covers an aligned part of it): the
    /// walk reuses this entry while frames stay inside it.
    pub start: u64,
    pub end: u64,
    /// One of the [`mapping`] constants.
    pub kind: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<Mapping>() == 40);

/// Value of [`MAP_PROCS`]: a state in the low 8 bits; a loaded process also carries the number
/// of its load above them ([`loaded`]).
pub mod proc_state {
    /// Mappings are in [`super::MAP_MAPPINGS`].
    pub const LOADED: u32 = 1;
    /// The process exec'd after it was loaded or requested: its mappings are stale until
    /// (re)loaded.
    pub const STALE: u32 = 2;
    /// Sampled before it was loaded; a [`super::proc_event::LOAD`] request is on its way.
    pub const REQUESTED: u32 = 3;

    /// The value of a process loaded by the daemon's `load`-th load (24 bits kept). Every
    /// (re)load writes a new value, so mappings a walk cached under the old value (before a
    /// reload, or for an exited process whose tgid was reused) no longer match. After 2^24
    /// loads a value repeats: a stale entry would need the same tgid and to have survived in
    /// its CPU's 32 slots all that time.
    pub const fn loaded(load: u32) -> u32 {
        LOADED | (load << 8)
    }

    /// The state of a value.
    pub const fn state(value: u32) -> u32 {
        value & 0xff
    }
}

/// Values of [`ProcEvent::kind`].
pub mod proc_event {
    pub const EXEC: u32 = 1;
    pub const EXIT: u32 = 2;
    /// First sample of a process the daemon has not loaded.
    pub const LOAD: u32 = 3;
}

/// A record of [`MAP_PROC_EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcEvent {
    pub kind: u32,
    pub tgid: u32,
}

/// Size of [`MAP_PROC_EVENTS`] (4,096 events: each record is an 8-byte header and an 8-byte
/// event).
pub const PROC_EVENTS_RING_BYTES: u32 = 64 * 1024;

/// Per-CPU walk state: registers of the frame being unwound.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UnwindState {
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
    pub tgid: u32,
    /// Frames written so far (user part).
    pub frames: u32,
    /// Kernel frames before the user part in [`RawSample::frames`].
    pub kernel_len: u32,
    /// 1 when `pc` is a return address (look up `pc - 1`).
    pub is_return: u8,
    /// An [`UnwindStatus`].
    pub status: u8,
    /// 1 when `mapping` and `table` hold the mapping of the previous frame (and its table).
    pub cached: u8,
    /// 1 when `table` is valid for the cached mapping.
    pub has_table: u8,
    pub mapping: Mapping,
    pub table: FileTable,
    /// The [`MAP_UNWIND_GENERATION`] value of this walk.
    pub generation: u64,
    /// The walked process's [`MAP_PROCS`] value.
    pub process: u32,
    pub _pad: u32,
    /// Mappings found in [`MAP_MAPPINGS`] by earlier walks on this CPU, so a process sampled
    /// again does not search the trie and the file hash for every file its stack crosses.
    /// Direct-mapped by tgid and 64 KiB region of the pc.
    pub cache: [CachedMapping; MAPPING_CACHE_ENTRIES],
    /// Rows found by earlier searches on this CPU, by file and exact address (direct-mapped):
    /// return addresses repeat from sample to sample while a program runs the same code.
    pub rows: [CachedRow; ROW_CACHE_ENTRIES],
}

const _: () =
    assert!(core::mem::size_of::<UnwindState>() == 112 + MAPPING_CACHE_ENTRIES * 72 + ROW_CACHE_ENTRIES * 24);

/// One entry of [`UnwindState::rows`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CachedRow {
    /// Low 32 bits of the generation the entry was found under; other generations miss.
    pub generation: u32,
    /// 1 when the entry holds a row.
    pub valid: u32,
    /// [`FileTable::slot`] of the file searched (it identifies the file's rows).
    pub slot: u32,
    /// The address searched, relative to [`FileTable::base`].
    pub target: u32,
    pub row: UnwindRow,
}

const _: () = assert!(core::mem::size_of::<CachedRow>() == 24);

/// One entry of [`UnwindState::cache`]: a process's mapping with its file's table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CachedMapping {
    /// 0 for an empty entry (tgid 0 is never walked).
    pub tgid: u32,
    /// The process's [`MAP_PROCS`] value when the entry was found.
    pub process: u32,
    /// 1 when `table` is valid for the mapping.
    pub has_table: u32,
    /// Low 32 bits of the generation the entry was found under; other generations miss.
    pub generation: u32,
    pub mapping: Mapping,
    pub table: FileTable,
}

const _: () = assert!(core::mem::size_of::<CachedMapping>() == 72);

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, integers and integer arrays with explicit padding: every bit pattern
// is valid.
unsafe impl aya::Pod for RawSampleHeader {}
#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding (size asserted).
unsafe impl aya::Pod for UnwindRow {}
#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding (size asserted).
unsafe impl aya::Pod for FileTable {}
#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, explicit padding field (size asserted).
unsafe impl aya::Pod for Mapping {}
#[cfg(feature = "user")]
// SAFETY: repr(C), two u32.
unsafe impl aya::Pod for ProcEvent {}
#[cfg(feature = "user")]
// SAFETY: repr(C), arrays of u64 and u8 with no padding (size asserted).
unsafe impl aya::Pod for KsymBatch {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_keys_are_big_endian_pid_then_address() {
        let key = mapping_key(0x0102_0304, 0x1122_3344_5566_7788);
        assert_eq!(key, [1, 2, 3, 4, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
    }

    #[test]
    fn statuses_round_trip() {
        for value in 0..UNWIND_STATUSES as u8 {
            assert_eq!(UnwindStatus::from_u8(value).map(|s| s as u8), Some(value));
        }
        assert_eq!(UnwindStatus::from_u8(UNWIND_STATUSES as u8), None);
    }

    #[test]
    fn samples_ring_grows_with_cpus_and_frequency_within_bounds() {
        assert_eq!(samples_ring_bytes(2, 99), 1 << 20);
        assert_eq!(samples_ring_bytes(16, 99), 4 << 20);
        assert_eq!(samples_ring_bytes(128, 99), 32 << 20);
        assert_eq!(samples_ring_bytes(128, 19), 8 << 20);
        assert_eq!(samples_ring_bytes(1024, 1000), MAX_SAMPLES_RING_BYTES);
        assert_eq!(samples_ring_bytes(u32::MAX, u32::MAX), MAX_SAMPLES_RING_BYTES);
        assert_eq!(samples_ring_bytes(0, 99), MIN_SAMPLES_RING_BYTES);
        for cpus in [1, 3, 7, 48, 96, 200] {
            for hz in [1, 19, 99, 250, 1000] {
                let bytes = samples_ring_bytes(cpus, hz);
                assert!(
                    bytes.is_power_of_two() && bytes.is_multiple_of(4096),
                    "{cpus} x {hz}: {bytes}"
                );
                // A second of samples at the sizing rate fits, unless capped.
                let second = u64::from(cpus) * u64::from(hz) * SAMPLES_RING_BYTES_PER_SAMPLE_PER_S;
                assert!(u64::from(bytes) >= second || bytes == MAX_SAMPLES_RING_BYTES);
                assert_eq!(samples_wakeup_bytes(bytes), u64::from(bytes) / 4);
            }
        }
    }
}
