//! Loading the embedded eBPF object and attaching it to every online CPU.
mod config;
mod maps;

use std::{fs, io};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        PerfEvent, ProgramError, RawTracePoint,
        perf_event::{HardwareEvent, PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};
use profiler_common::{
    GLOBAL_FILTER_CGROUPS, GLOBAL_FILTER_PIDS, GLOBAL_SAMPLES_WAKEUP_BYTES, GLOBAL_UNWIND_MODE, MAP_COUNTERS,
    MAP_KSYM_IO, MAP_MAPPINGS, MAP_PROC_EVENTS, MAP_PROCS, MAP_SAMPLES, MAP_TARGET_CGROUPS, MAP_TARGET_PIDS,
    MAP_UNWIND_FILES, MAP_UNWIND_GENERATION, MAP_UNWIND_ROWS, MAX_TARGET_CGROUPS, MAX_TARGET_PIDS,
    PROGRAM_EXEC, PROGRAM_EXIT, PROGRAM_KSYM, PROGRAM_SAMPLE, UNWIND_MODE_FRAME_POINTERS, UNWIND_MODE_TABLES,
    samples_ring_bytes, samples_wakeup_bytes,
};

pub use self::{
    config::{MAX_UNWIND_TABLE_BYTES, MIN_UNWIND_TABLE_BYTES, SamplingConfig, Unwinder},
    maps::UnwindMaps,
};
use crate::{sample::CounterSnapshot, symbolize::kernel::BpfKernelNames};
use tracing::{debug, info, warn};

/// The eBPF object built by build.rs from the `profiler-ebpf` crate.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler-ebpf"));

/// Lines of the verifier log shown in a load error; the decisive lines are at its end.
const VERIFIER_EXCERPT_LINES: usize = 30;

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYSLOG: u32 = 34;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "missing capability {missing}: loading BPF programs and opening perf events needs CAP_BPF \
         and CAP_PERFMON (or CAP_SYS_ADMIN); run as root, or grant them with \
         `setcap cap_bpf,cap_perfmon,cap_sys_ptrace,cap_syslog+ep <profiler binary>` (the last two \
         let it name frames of every process and of the kernel)"
    )]
    MissingCapability { missing: &'static str },
    #[error("reading capabilities from /proc/self/status: {0}")]
    Capabilities(String),
    #[error("loading the eBPF object on kernel {kernel} failed: {source}")]
    Load {
        kernel: String,
        source: Box<aya::EbpfError>,
    },
    #[error(
        "the kernel ({kernel}) rejected eBPF program `{program}`: {io_error}\n\
         last lines of the verifier log:\n{excerpt}"
    )]
    Verifier {
        program: &'static str,
        kernel: String,
        io_error: io::Error,
        excerpt: String,
    },
    #[error("program `{program}` on kernel {kernel}: {source}")]
    Program {
        program: &'static str,
        kernel: String,
        source: Box<ProgramError>,
    },
    #[error("the eBPF object has no {kind} named `{name}`")]
    Missing { kind: &'static str, name: &'static str },
    #[error("BPF map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: Box<MapError>,
    },
    #[error("listing online CPUs ({path}): {source}")]
    OnlineCpus { path: &'static str, source: io::Error },
    #[error("perf_event_open for the cpu-clock event on cpu {cpu} failed (kernel {kernel}): {source}")]
    Attach {
        cpu: u32,
        kernel: String,
        source: Box<ProgramError>,
    },
}

/// Which perf event drives sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSource {
    /// Hardware CPU cycles (where a PMU exists).
    Cycles,
    /// The software cpu-clock timer (VMs without a virtual PMU).
    CpuClock,
}

impl EventSource {
    pub fn name(self) -> &'static str {
        match self {
            EventSource::Cycles => "cycles",
            EventSource::CpuClock => "cpu-clock",
        }
    }
}

/// A loaded and attached sampler. Dropping it detaches the programs.
pub struct BpfSession {
    ebpf: Ebpf,
    pub event: EventSource,
    kernel: String,
    /// The unwind-table budget in rows (the tables are created as they are loaded).
    unwind_rows: u32,
    /// Online CPUs and frequency at load: the sample ring is sized for them, and [`attach`]
    /// samples them.
    ///
    /// [`attach`]: BpfSession::attach
    cpus: Vec<u32>,
    frequency: u32,
}

pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Checks the effective capabilities before touching BPF, so the error names what is missing
/// instead of a bare EPERM.
pub fn check_capabilities() -> Result<(), BpfError> {
    let status =
        fs::read_to_string("/proc/self/status").map_err(|e| BpfError::Capabilities(e.to_string()))?;
    let caps =
        parse_cap_eff(&status).ok_or_else(|| BpfError::Capabilities("no parsable CapEff line".to_owned()))?;
    missing_capability(caps).map_or(Ok(()), |missing| Err(BpfError::MissingCapability { missing }))
}

/// The process's effective capabilities, when /proc/self/status says.
fn effective_capabilities() -> Option<u64> {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Capabilities that do not stop sampling but cost names: reading other users' processes'
/// files through /proc/<pid>/root needs ptrace access (CAP_SYS_PTRACE). (Kernel names come
/// from the `ksym_names` program; CAP_SYSLOG matters only for its kallsyms fallback, see
/// [`BpfSession::take_kernel_names`].)
pub fn missing_symbolization_capabilities() -> Vec<&'static str> {
    let Some(caps) = effective_capabilities() else {
        return Vec::new();
    };
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    if has(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    [(CAP_SYS_PTRACE, "CAP_SYS_PTRACE")]
        .into_iter()
        .filter(|(bit, _)| !has(*bit))
        .map(|(_, name)| name)
        .collect()
}

/// Whether the process may read kallsyms addresses under `kptr_restrict` = 1.
fn has_syslog_capability() -> bool {
    effective_capabilities().is_none_or(|caps| caps & ((1u64 << CAP_SYSLOG) | (1u64 << CAP_SYS_ADMIN)) != 0)
}

fn missing_capability(caps: u64) -> Option<&'static str> {
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    if has(CAP_SYS_ADMIN) {
        return None;
    }
    if !has(CAP_BPF) {
        return Some("CAP_BPF");
    }
    if !has(CAP_PERFMON) {
        return Some("CAP_PERFMON");
    }
    None
}

fn raise_memlock_rlimit() {
    // Kernels since 5.11 charge BPF memory to the memory cgroup and ignore RLIMIT_MEMLOCK; on
    // older ones the default 64 KiB limit would fail the 8 MiB ring buffer.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialized rlimit struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if rc != 0 {
        debug!(error = %io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

/// Where aya's loader looks for the kernel's BTF.
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// An [`EbpfLoader`] that has not read the kernel's BTF.
///
/// aya 0.14's `EbpfLoader::new` always reads and parses `/sys/kernel/btf/vmlinux` (6 MB on
/// this kernel: ~19 ms of CPU and 10 MB of short-lived heap, a fifth of what a 10 s recording
/// costs), and `.btf(None)` only drops the result afterwards. Kernel BTF serves CO-RE
/// relocations alone, and our object has none (a test checks). So the loader is built on a
/// thread of its own whose root directory, unshared from the rest of the process, is the BTF
/// directory itself: in there the path does not resolve and the parse is skipped. Where that
/// cannot be done (no `CAP_SYS_CHROOT`, a seccomp profile), the loader is built as usual.
fn loader_without_kernel_btf<'a>() -> EbpfLoader<'a> {
    let built = std::thread::scope(|scope| {
        scope
            .spawn(|| match enter_root_without_kernel_btf() {
                Ok(()) => Some(EbpfLoader::new()),
                Err(error) => {
                    debug!(%error, "kernel BTF is parsed: its path could not be hidden from the loader");
                    None
                }
            })
            .join()
            .ok()
            .flatten()
    });
    built.unwrap_or_else(EbpfLoader::new)
}

/// Gives the calling thread a root of its own in which [`KERNEL_BTF`] does not exist. Only
/// for a thread that ends right after: it can no longer see the rest of the filesystem.
fn enter_root_without_kernel_btf() -> io::Result<()> {
    let btf_dir = std::path::Path::new(KERNEL_BTF)
        .parent()
        .ok_or_else(|| io::Error::other("the BTF path has no parent"))?;
    if !btf_dir.is_dir() {
        // No kernel BTF at all: aya's read fails at once.
        return Ok(());
    }
    let dir = std::ffi::CString::new(btf_dir.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: unshare takes flags only; CLONE_FS gives this thread its own root and working
    // directory, leaving every other thread's as they were.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both take a valid NUL-terminated path.
    if unsafe { libc::chroot(dir.as_ptr()) } != 0 || unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if std::path::Path::new(KERNEL_BTF).exists() {
        return Err(io::Error::other(format!(
            "{KERNEL_BTF} exists below {}",
            btf_dir.display()
        )));
    }
    Ok(())
}

fn verifier_excerpt(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(VERIFIER_EXCERPT_LINES);
    lines[start..].join("\n")
}

/// The perf_event program of `ebpf`.
fn sampling_program<'a>(ebpf: &'a mut Ebpf, kernel: &str) -> Result<&'a mut PerfEvent, BpfError> {
    ebpf.program_mut(PROGRAM_SAMPLE)
        .ok_or(BpfError::Missing {
            kind: "program",
            name: PROGRAM_SAMPLE,
        })?
        .try_into()
        .map_err(|e| BpfError::Program {
            program: PROGRAM_SAMPLE,
            kernel: kernel.to_owned(),
            source: Box::new(e),
        })
}

fn load_error(program: &'static str, kernel: &str, error: ProgramError) -> BpfError {
    match error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => BpfError::Verifier {
            program,
            kernel: kernel.to_owned(),
            io_error,
            excerpt: verifier_excerpt(&verifier_log.to_string()),
        },
        other => BpfError::Program {
            program,
            kernel: kernel.to_owned(),
            source: Box::new(other),
        },
    }
}

impl BpfSession {
    /// Loads the programs and restricts them to `pids` (all processes when empty), without
    /// attaching the sampler yet (the unwind stage loads processes in between).
    pub fn load(sampling: &SamplingConfig, pids: &[u32]) -> Result<Self, BpfError> {
        check_capabilities()?;
        let missing = missing_symbolization_capabilities();
        if !missing.is_empty() {
            warn!(
                missing = ?missing,
                "without these capabilities some user frames (other users' processes) or kernel frames stay unnamed"
            );
        }
        raise_memlock_rlimit();
        let kernel = kernel_release();
        // Label selectors resolve to pids (processes in the root cgroup) as well as cgroups.
        let filter: u8 = u8::from(!pids.is_empty() || !sampling.targets.is_empty());
        let filter_cgroups: u8 = u8::from(!sampling.cgroups.is_empty() || !sampling.targets.is_empty());
        let mode = match sampling.unwinder {
            Unwinder::Dwarf => UNWIND_MODE_TABLES,
            Unwinder::FramePointer => UNWIND_MODE_FRAME_POINTERS,
        };
        // Frame-pointer mode loads no tables.
        let rows = match sampling.unwinder {
            Unwinder::Dwarf => sampling.unwind_rows,
            Unwinder::FramePointer => 0,
        };
        let cpus =
            aya::util::online_cpus().map_err(|(path, source)| BpfError::OnlineCpus { path, source })?;
        let frequency = sampling.frequency.get();
        let ring_bytes = samples_ring_bytes(cpus.len() as u32, frequency);
        let wakeup_bytes = samples_wakeup_bytes(ring_bytes);
        let started = std::time::Instant::now();
        let mut ebpf = loader_without_kernel_btf()
            .override_global(GLOBAL_FILTER_PIDS, &filter, true)
            .override_global(GLOBAL_FILTER_CGROUPS, &filter_cgroups, true)
            .override_global(GLOBAL_UNWIND_MODE, &mode, true)
            .override_global(GLOBAL_SAMPLES_WAKEUP_BYTES, &wakeup_bytes, true)
            .map_max_entries(MAP_SAMPLES, ring_bytes)
            // Hash maps are allocated whole when created: a filter that is off gets one entry
            // (its map is never read).
            .map_max_entries(MAP_TARGET_PIDS, if filter == 1 { MAX_TARGET_PIDS } else { 1 })
            .map_max_entries(
                MAP_TARGET_CGROUPS,
                if filter_cgroups == 1 {
                    MAX_TARGET_CGROUPS
                } else {
                    1
                },
            )
            .load(EBPF_OBJECT)
            .map_err(|source| BpfError::Load {
                kernel: kernel.clone(),
                source: Box::new(source),
            })?;

        if !pids.is_empty() {
            let map = ebpf.map_mut(MAP_TARGET_PIDS).ok_or(BpfError::Missing {
                kind: "map",
                name: MAP_TARGET_PIDS,
            })?;
            let mut targets: HashMap<&mut MapData, u32, u8> =
                HashMap::try_from(map).map_err(|e| BpfError::Map {
                    name: MAP_TARGET_PIDS,
                    source: Box::new(e),
                })?;
            for pid in pids {
                targets.insert(pid, 1, 0).map_err(|e| BpfError::Map {
                    name: MAP_TARGET_PIDS,
                    source: Box::new(e),
                })?;
            }
        }

        let maps_created = started.elapsed();
        let sampler = sampling_program(&mut ebpf, &kernel)?;
        sampler
            .load()
            .map_err(|e| load_error(PROGRAM_SAMPLE, &kernel, e))?;
        let verified = started.elapsed() - maps_created;
        // The verifier's work is most of the program's start-up cost; kernels before 5.16 do
        // not report it.
        let verified_insns = sampler
            .info()
            .ok()
            .and_then(|info| info.verified_instruction_count());
        debug!(
            maps_ms = maps_created.as_secs_f64() * 1e3,
            verified_ms = verified.as_secs_f64() * 1e3,
            verified_insns,
            samples_ring_kib = ring_bytes >> 10,
            "BPF object loaded and the sampling program verified"
        );

        if sampling.unwinder == Unwinder::Dwarf {
            for (name, tracepoint) in [
                (PROGRAM_EXEC, "sched_process_exec"),
                (PROGRAM_EXIT, "sched_process_exit"),
            ] {
                let program: &mut RawTracePoint = ebpf
                    .program_mut(name)
                    .ok_or(BpfError::Missing {
                        kind: "program",
                        name,
                    })?
                    .try_into()
                    .map_err(|e| BpfError::Program {
                        program: name,
                        kernel: kernel.clone(),
                        source: Box::new(e),
                    })?;
                program.load().map_err(|e| load_error(name, &kernel, e))?;
                program.attach(tracepoint).map_err(|e| BpfError::Program {
                    program: name,
                    kernel: kernel.clone(),
                    source: Box::new(e),
                })?;
            }
        }
        Ok(Self {
            ebpf,
            event: EventSource::Cycles,
            kernel,
            unwind_rows: rows,
            cpus,
            frequency,
        })
    }

    /// Takes the maps of the unwind stage out of the session (once).
    /// The targeting maps, for [`crate::targeting::Targeter`]: `TARGET_CGROUPS`, and
    /// `TARGET_PIDS` when label selectors may add pids to it.
    #[allow(clippy::type_complexity)]
    pub fn take_target_maps(
        &mut self,
        with_pids: bool,
    ) -> Result<(HashMap<MapData, u64, u8>, Option<HashMap<MapData, u32, u8>>), BpfError> {
        let mut take = |name: &'static str| {
            self.ebpf
                .take_map(name)
                .ok_or(BpfError::Missing { kind: "map", name })
        };
        let cgroups = HashMap::try_from(take(MAP_TARGET_CGROUPS)?).map_err(|e| BpfError::Map {
            name: MAP_TARGET_CGROUPS,
            source: Box::new(e),
        })?;
        let pids = if with_pids {
            Some(
                HashMap::try_from(take(MAP_TARGET_PIDS)?).map_err(|e| BpfError::Map {
                    name: MAP_TARGET_PIDS,
                    source: Box::new(e),
                })?,
            )
        } else {
            None
        };
        Ok((cgroups, pids))
    }

    pub fn take_unwind_maps(&mut self) -> Result<UnwindMaps, BpfError> {
        let mut take = |name: &'static str| {
            self.ebpf
                .take_map(name)
                .ok_or(BpfError::Missing { kind: "map", name })
        };
        let wrap = |name: &'static str| {
            move |e| BpfError::Map {
                name,
                source: Box::new(e),
            }
        };
        let rows = match take(MAP_UNWIND_ROWS)? {
            aya::maps::Map::ArrayOfMaps(data) => data,
            _ => {
                return Err(BpfError::Missing {
                    kind: "array of maps",
                    name: MAP_UNWIND_ROWS,
                });
            }
        };
        let files = HashMap::try_from(take(MAP_UNWIND_FILES)?).map_err(wrap(MAP_UNWIND_FILES))?;
        let mappings = LpmTrie::try_from(take(MAP_MAPPINGS)?).map_err(wrap(MAP_MAPPINGS))?;
        let procs = HashMap::try_from(take(MAP_PROCS)?).map_err(wrap(MAP_PROCS))?;
        let events = RingBuf::try_from(take(MAP_PROC_EVENTS)?).map_err(wrap(MAP_PROC_EVENTS))?;
        let generation =
            Array::try_from(take(MAP_UNWIND_GENERATION)?).map_err(wrap(MAP_UNWIND_GENERATION))?;
        Ok(UnwindMaps {
            rows,
            capacity: self.unwind_rows,
            files,
            mappings,
            procs,
            events,
            generation,
        })
    }

    /// Attaches one perf event per CPU online at load, at the frequency given at load.
    pub fn attach(&mut self) -> Result<(), BpfError> {
        let kernel = self.kernel.clone();
        let (cpus, frequency) = (self.cpus.clone(), self.frequency);
        let program = sampling_program(&mut self.ebpf, &kernel)?;
        let policy = SamplePolicy::Frequency(u64::from(frequency));
        let scope = |cpu| PerfEventScope::AllProcessesOneCpu { cpu };
        // One event for every CPU, so `period` means the same everywhere: cycles only if every
        // CPU has it, else cpu-clock on all (VMs without a virtual PMU).
        let cycles = PerfEventConfig::Hardware(HardwareEvent::CpuCycles);
        let mut links = Vec::with_capacity(cpus.len());
        let mut event = EventSource::Cycles;
        for &cpu in &cpus {
            match program.attach(cycles, scope(cpu), policy, false) {
                Ok(link) => links.push(link),
                Err(error) => {
                    info!(cpu, %error, "no hardware cycles event, sampling with cpu-clock");
                    event = EventSource::CpuClock;
                    break;
                }
            }
        }
        if event == EventSource::CpuClock {
            for link in links.drain(..) {
                if let Err(error) = program.detach(link) {
                    warn!(%error, "detaching a cycles event failed");
                }
            }
            let clock = PerfEventConfig::Software(SoftwareEvent::CpuClock);
            for &cpu in &cpus {
                program
                    .attach(clock, scope(cpu), policy, false)
                    .map_err(|e| BpfError::Attach {
                        cpu,
                        kernel: kernel.clone(),
                        source: Box::new(e),
                    })?;
            }
        }
        info!(
            event = event.name(),
            cpus = cpus.len(),
            frequency,
            "sampling started"
        );
        self.event = event;
        Ok(())
    }

    /// Detaches and unloads the sampling program; maps stay readable.
    pub fn stop(&mut self) {
        let program: Option<&mut PerfEvent> = self
            .ebpf
            .program_mut(PROGRAM_SAMPLE)
            .and_then(|p| p.try_into().ok());
        if let Some(program) = program
            && let Err(error) = program.unload()
        {
            tracing::warn!(%error, "unloading the sampling program failed");
        }
    }

    /// Loads the kernel-symbol program and takes its map (once). `None`, with a warning, when
    /// this kernel refuses it: kernel frames are then named from /proc/kallsyms.
    pub fn take_kernel_names(&mut self) -> Option<BpfKernelNames> {
        match self.kernel_names() {
            Ok(names) => Some(names),
            Err(error) => {
                warn!(%error, "kernel symbol lookup through BPF unavailable: reading /proc/kallsyms instead");
                if !has_syslog_capability() {
                    warn!(
                        "without CAP_SYSLOG, /proc/kallsyms may show no addresses (kernel.kptr_restrict): kernel frames may stay unnamed"
                    );
                }
                None
            }
        }
    }

    fn kernel_names(&mut self) -> Result<BpfKernelNames, BpfError> {
        let kernel = self.kernel.clone();
        let program_error = |source: ProgramError| BpfError::Program {
            program: PROGRAM_KSYM,
            kernel: kernel.clone(),
            source: Box::new(source),
        };
        let program: &mut RawTracePoint = self
            .ebpf
            .program_mut(PROGRAM_KSYM)
            .ok_or(BpfError::Missing {
                kind: "program",
                name: PROGRAM_KSYM,
            })?
            .try_into()
            .map_err(program_error)?;
        program
            .load()
            .map_err(|e| load_error(PROGRAM_KSYM, &self.kernel, e))?;
        let fd = program
            .fd()
            .and_then(|fd| fd.try_clone().map_err(ProgramError::from))
            .map_err(program_error)?;
        let map = self.ebpf.take_map(MAP_KSYM_IO).ok_or(BpfError::Missing {
            kind: "map",
            name: MAP_KSYM_IO,
        })?;
        let io = Array::try_from(map).map_err(|e| BpfError::Map {
            name: MAP_KSYM_IO,
            source: Box::new(e),
        })?;
        Ok(BpfKernelNames::new(fd, io))
    }

    /// Takes the sample ring buffer out of the session (once).
    pub fn take_samples(&mut self) -> Result<RingBuf<MapData>, BpfError> {
        let map = self.ebpf.take_map(MAP_SAMPLES).ok_or(BpfError::Missing {
            kind: "map",
            name: MAP_SAMPLES,
        })?;
        RingBuf::try_from(map).map_err(|e| BpfError::Map {
            name: MAP_SAMPLES,
            source: Box::new(e),
        })
    }

    /// Reads and sums the per-CPU counters.
    pub fn counters(&self) -> Result<CounterSnapshot, BpfError> {
        let map = self.ebpf.map(MAP_COUNTERS).ok_or(BpfError::Missing {
            kind: "map",
            name: MAP_COUNTERS,
        })?;
        let wrap = |e| BpfError::Map {
            name: MAP_COUNTERS,
            source: Box::new(e),
        };
        let array: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(wrap)?;
        let mut out = CounterSnapshot::default();
        for (i, slot) in out.0.iter_mut().enumerate() {
            let values = array.get(&(i as u32), 0).map_err(wrap)?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_check_names_the_missing_one() {
        assert_eq!(missing_capability(0), Some("CAP_BPF"));
        assert_eq!(missing_capability(1 << CAP_BPF), Some("CAP_PERFMON"));
        assert_eq!(missing_capability((1 << CAP_BPF) | (1 << CAP_PERFMON)), None);
        assert_eq!(missing_capability(1 << CAP_SYS_ADMIN), None);
        let status = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn verifier_excerpt_keeps_the_end() {
        let log: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let excerpt = verifier_excerpt(&log);
        assert!(excerpt.starts_with("line 70"));
        assert!(excerpt.ends_with("line 99"));
    }

    /// The loader skips the kernel's BTF, which only CO-RE relocations need: the object must
    /// have none. Its `.BTF.ext` header counts them (`core_relo_len`, at byte 28).
    #[test]
    fn the_bpf_object_has_no_core_relocations() {
        use object::{Object, ObjectSection};
        let file = object::File::parse(EBPF_OBJECT).expect("the embedded object parses");
        let ext = file
            .section_by_name(".BTF.ext")
            .expect("the object carries BTF (build.rs emits it)")
            .data()
            .expect(".BTF.ext is readable");
        let word = |at: usize| u32::from_le_bytes(ext[at..at + 4].try_into().expect("4 bytes"));
        assert_eq!(u16::from_le_bytes([ext[0], ext[1]]), 0xeb9f, "BTF magic");
        let header_len = word(4) as usize;
        assert!(
            header_len >= 32,
            "the header has no CO-RE fields: {header_len} bytes"
        );
        assert_eq!(
            word(28),
            0,
            "CO-RE relocations need the kernel's BTF; see loader_without_kernel_btf"
        );
    }

    /// Hiding the kernel's BTF from the loader's thread leaves the rest of the process alone.
    #[test]
    fn only_the_loader_thread_loses_sight_of_kernel_btf() {
        let btf = std::path::Path::new(KERNEL_BTF);
        // SAFETY: geteuid has no preconditions.
        if !btf.exists() || unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs {KERNEL_BTF} and root (CAP_SYS_CHROOT)");
            return;
        }
        let seen_inside = std::thread::spawn(move || {
            enter_root_without_kernel_btf().expect("root of its own");
            btf.exists()
        })
        .join()
        .expect("thread");
        assert!(!seen_inside, "the loader thread still sees {KERNEL_BTF}");
        assert!(btf.exists(), "another thread lost sight of {KERNEL_BTF}");
        assert!(std::path::Path::new("/proc/self/status").exists());
    }
}
