//! Snapshot → pprof profile: names every frame (kernel symbols, ELF/DWARF/Go tables, perf
//! maps), adds one mapping per file, the samples with their labels (through the cardinality
//! guard) and comments with the interval's counters. No channel, no thread: the report stage
//! ([`crate::stages::report`]) runs it.
use std::{collections::HashMap, sync::Arc};

use profiler_common::{Counter, UNWIND_STATUS_SLOTS, UNWIND_STATUSES, UnwindStatus};

use crate::{
    aggregate::{Frame, Snapshot},
    bpf::EventSource,
    encode::{LineSpec, MappingSpec, ProfileBuilder},
    labels::{DEFAULT_LABEL_VALUE_LIMIT, LabelGuard, OVERFLOW_VALUE},
    pprof,
    process::ObjectFile,
    procfs::FileKey,
    symbolize::{
        FunctionName, NameCache, SymbolSource, SymbolStats, Unresolved,
        kernel::{BpfKernelNames, KernelNames},
    },
    unwind::UnwindStats,
};

pub struct Reporter {
    kernel: KernelNames,
    period_ns: i64,
    frequency: u32,
    event: EventSource,
    unwind: Arc<UnwindStats>,
    /// Most distinct values of one label key in one profile (see [`LabelGuard`]).
    label_value_limit: usize,
    /// Names of file frames by (file identity, ELF address), kept across intervals.
    names: NameCache<(FileKey, u64)>,
}

/// Entries per generation of the reporter's [`NameCache`] (two generations: at most 2 × this
/// many distinct file frames are remembered; with their names, typically a few MiB, tens of
/// MiB with long C++ names and deep inline chains).
pub const NAME_CACHE_ENTRIES: usize = 32 * 1024;

/// One interval, encoded.
#[derive(Debug)]
pub struct Report {
    pub profile: pprof::Profile,
    pub symbols: SymbolStats,
    /// Label values folded by the cardinality guard, per label name (sample groups).
    pub folded: std::collections::BTreeMap<String, u64>,
}

/// The functions at a frame, or why there are none and the synthetic name that stands in.
type Naming = Result<Arc<[FunctionName]>, (Unresolved, String)>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum MappingKey {
    Kernel,
    Object(u32),
    Special(Arc<str>),
}

impl Reporter {
    pub fn new(frequency: u32, event: EventSource, unwind: Arc<UnwindStats>) -> Self {
        Self {
            label_value_limit: DEFAULT_LABEL_VALUE_LIMIT,
            names: NameCache::new(NAME_CACHE_ENTRIES),
            unwind,
            kernel: KernelNames::new(None),
            period_ns: 1_000_000_000 / i64::from(frequency.max(1)),
            frequency,
            event,
        }
    }

    /// Sets the cardinality guard's limit (distinct values per label key per profile).
    pub fn with_label_value_limit(mut self, limit: usize) -> Self {
        self.label_value_limit = limit.max(1);
        self
    }

    /// Names kernel frames with the kernel's own lookup (the `ksym_names` program) instead of
    /// reading /proc/kallsyms.
    pub fn with_kernel_names(mut self, bpf: BpfKernelNames) -> Self {
        self.kernel = KernelNames::new(Some(bpf));
        self
    }

    pub fn build(&mut self, snap: &Snapshot, pipeline: (u64, u64, u64)) -> Report {
        self.kernel.prepare(snap.frames.iter().filter_map(|f| match f {
            Frame::Kernel(addr) => Some(*addr),
            _ => None,
        }));
        let duration = snap.end.duration_since(snap.start).unwrap_or_default();
        let mut b = ProfileBuilder::cpu(self.period_ns, snap.start, duration);
        b.comment(&format!(
            "event: {} at {} Hz per CPU",
            self.event.name(),
            self.frequency
        ));
        let c = &snap.counters;
        b.comment(&format!(
            "kernel: {} events, {} sampled, {} idle, {} lost (ring buffer full), stack errors kernel {} user {}",
            c.get(Counter::Events),
            c.get(Counter::Submitted),
            c.get(Counter::Idle),
            c.get(Counter::RingFull),
            c.get(Counter::KernelStackError),
            c.get(Counter::UserStackError),
        ));
        let statuses: Vec<String> = (0..UNWIND_STATUSES)
            .filter_map(|s| {
                let n = c.0[(UNWIND_STATUS_SLOTS + s) as usize];
                let status = UnwindStatus::from_u8(s as u8)?;
                // The one status a reader would not guess from its name.
                let note = match status {
                    UnwindStatus::FramePointerOnly => " (process not loaded yet)",
                    _ => "",
                };
                (n > 0).then(|| format!("{}{note} {n}", status.name()))
            })
            .collect();
        b.comment(&format!("user stack walks: {}", statuses.join(", ")));
        let u = self.unwind.snapshot();
        b.comment(&format!(
            "unwind tables (since start): {} processes, {} files loaded, {:.1} of {:.1} MiB, {} evicted, {} built in {} ms, {} failed, {} requested by their first sample, {} requests dropped",
            u.processes,
            u.files_loaded,
            u.bytes_used as f64 / (1024.0 * 1024.0),
            u.bytes_capacity as f64 / (1024.0 * 1024.0),
            u.evictions,
            u.tables_built,
            u.build_micros / 1000,
            u.table_errors,
            u.load_requests,
            u.requests_dropped,
        ));
        b.comment(&format!(
            "daemon (since start): {} received, {} dropped (queue full), {} malformed",
            pipeline.0, pipeline.1, pipeline.2
        ));
        let r = &snap.registry;
        b.comment(&format!(
            "symbol cache: {} files, {:.1} MiB, {} evicted; {} separate debug files, {} with DWARF over an eighth of the budget (symbols only), {} perf map reads",
            r.cached_files,
            r.cached_bytes as f64 / (1024.0 * 1024.0),
            r.objects_evicted,
            r.debug_files,
            r.dwarf_over_budget,
            r.perf_map_reads
        ));

        let mapping_ids = self.add_mappings(&mut b, snap);
        let mut symbols = SymbolStats::default();
        let locations: Vec<u64> = snap
            .frames
            .iter()
            .map(|frame| {
                let (key, address, outcome) = self.name_frame(frame, &snap.objects, &mut symbols);
                let mapping_id = key.and_then(|k| mapping_ids.get(&k).copied()).unwrap_or(0);
                let names = match outcome {
                    Ok(names) => {
                        symbols.count(Ok(()));
                        names
                    }
                    Err((reason, synthetic)) => {
                        symbols.count(Err(reason));
                        Arc::from([FunctionName {
                            system_name: String::new(),
                            name: synthetic,
                            file: None,
                            line: 0,
                        }])
                    }
                };
                let lines: Vec<LineSpec<'_>> = names
                    .iter()
                    .map(|n| LineSpec {
                        name: &n.name,
                        system_name: &n.system_name,
                        filename: n.file.as_deref().unwrap_or(""),
                        line: n.line,
                    })
                    .collect();
                b.add_location(mapping_id, address, &lines)
            })
            .collect();

        let mut guard = LabelGuard::new(self.label_value_limit);
        for count in &snap.counts {
            let Some(stack) = snap.stacks.get(count.stack as usize) else {
                continue;
            };
            let ids = stack
                .iter()
                .filter_map(|&f| locations.get(f as usize).copied())
                .collect();
            let mut labels = vec![b.num_label("pid", i64::from(count.pid))];
            let process = snap.processes.get(&count.pid);
            if let Some(comm) = process.and_then(|p| p.comm.as_deref()) {
                labels.push(b.str_label("comm", comm));
            }
            if let Some(target) = process.and_then(|p| p.target.labels.as_ref()) {
                for (name, value) in target {
                    if name == "comm" || name == "pid" {
                        continue;
                    }
                    let value = guard.admit(name, value);
                    labels.push(b.str_label(name, value));
                }
            }
            b.add_sample(ids, i64::try_from(count.count).unwrap_or(i64::MAX), labels);
        }
        if snap.dropped_by_relabeling > 0 || !guard.folded.is_empty() {
            let folded: Vec<String> = guard.folded.iter().map(|(k, n)| format!("{k} {n}")).collect();
            b.comment(&format!(
                "labels: {} samples dropped by relabeling; values folded into `{OVERFLOW_VALUE}` past {} per label: {}",
                snap.dropped_by_relabeling,
                self.label_value_limit,
                if folded.is_empty() { "none".to_owned() } else { folded.join(", ") }
            ));
        }
        Report {
            profile: b.finish(),
            symbols,
            folded: guard.folded,
        }
    }

    /// Adds one mapping per kernel / file / special region the frames use. File mappings cover
    /// the ELF segment holding the code, in ELF virtual addresses (what locations carry), so
    /// `memory_start - file_offset` is the file's own layout: Pyroscope and Parca can symbolize
    /// any address again from the build id, and `go tool pprof` finds the same bytes.
    fn add_mappings(&self, b: &mut ProfileBuilder, snap: &Snapshot) -> HashMap<MappingKey, u64> {
        let mut ranges: HashMap<MappingKey, (u64, u64)> = HashMap::new();
        let mut order = Vec::new();
        for frame in &snap.frames {
            let (key, addr) = match frame {
                Frame::Kernel(a) => (MappingKey::Kernel, *a),
                Frame::Object { object, vaddr } => (MappingKey::Object(*object), *vaddr),
                Frame::Special { name, offset } => (MappingKey::Special(Arc::clone(name)), *offset),
                Frame::Unknown(_) | Frame::NoStack | Frame::Jit(_) | Frame::Truncated(_) => continue,
            };
            let range = ranges.entry(key.clone()).or_insert_with(|| {
                order.push(key);
                (addr, addr)
            });
            range.0 = range.0.min(addr);
            range.1 = range.1.max(addr);
        }
        let mut ids = HashMap::new();
        for key in order {
            let (lo, hi) = ranges[&key];
            let id = match &key {
                MappingKey::Kernel => b.add_mapping(&MappingSpec {
                    start: lo,
                    limit: hi.saturating_add(1),
                    file_offset: 0,
                    filename: "[kernel.kallsyms]",
                    build_id: self.kernel.build_id(),
                    has_functions: true,
                    has_lines: false,
                    has_inline: false,
                }),
                MappingKey::Object(index) => {
                    let Some(object) = snap.objects.get(*index as usize) else {
                        continue;
                    };
                    b.add_mapping(&object_mapping(object, lo, hi))
                }
                MappingKey::Special(name) => b.add_mapping(&MappingSpec {
                    start: lo,
                    limit: hi.saturating_add(1),
                    file_offset: 0,
                    filename: name,
                    build_id: None,
                    has_functions: true,
                    has_lines: false,
                    has_inline: false,
                }),
            };
            ids.insert(key, id);
        }
        ids
    }

    /// The mapping key, the location address and the names of one frame (or why there are
    /// none, with the synthetic `module+0xoffset` name that stands in).
    fn name_frame(
        &mut self,
        frame: &Frame,
        objects: &[Arc<ObjectFile>],
        stats: &mut SymbolStats,
    ) -> (Option<MappingKey>, u64, Naming) {
        match frame {
            Frame::Kernel(addr) => {
                let names = match self.kernel.resolve(*addr) {
                    Ok(name) => Ok(Arc::from([name])),
                    Err(reason) => Err((reason, format!("[kernel.kallsyms]+0x{addr:x}"))),
                };
                (Some(MappingKey::Kernel), *addr, names)
            }
            Frame::Object { object, vaddr } => {
                let key = Some(MappingKey::Object(*object));
                let Some(file) = objects.get(*object as usize) else {
                    return (
                        None,
                        *vaddr,
                        Err((Unresolved::NoMapping, format!("[unknown]+0x{vaddr:x}"))),
                    );
                };
                let synthetic = || format!("{}+0x{vaddr:x}", file.base_name());
                let names = match &file.image {
                    Ok(image) => {
                        let (names, hit) = self
                            .names
                            .get_or_resolve((file.key, *vaddr), || image.resolve(*vaddr));
                        if hit {
                            stats.cache_hits += 1;
                        } else {
                            stats.cache_misses += 1;
                        }
                        names.ok_or_else(|| (Unresolved::NoSymbol, synthetic()))
                    }
                    Err(_) => Err((Unresolved::ObjectUnreadable, synthetic())),
                };
                (key, *vaddr, names)
            }
            Frame::Special { name, offset } => (
                Some(MappingKey::Special(Arc::clone(name))),
                *offset,
                Err((Unresolved::NoFile, format!("{name}+0x{offset:x}"))),
            ),
            Frame::Unknown(addr) => (
                None,
                *addr,
                Err((Unresolved::NoMapping, format!("[unknown]+0x{addr:x}"))),
            ),
            Frame::NoStack => (None, 0, Err((Unresolved::NoMapping, "[no stack]".to_owned()))),
            // Why a user walk ended early: a function of its own at the root of the stack.
            Frame::Truncated(reason) => (
                None,
                0,
                Ok(Arc::from([FunctionName {
                    name: reason.to_string(),
                    system_name: reason.to_string(),
                    file: None,
                    line: 0,
                }])),
            ),
            // JIT code has no file to map; its location is its name.
            Frame::Jit(name) => (
                None,
                0,
                Ok(Arc::from([FunctionName {
                    name: name.to_string(),
                    system_name: name.to_string(),
                    file: None,
                    line: 0,
                }])),
            ),
        }
    }
}

fn object_mapping(object: &ObjectFile, lo: u64, hi: u64) -> MappingSpec<'_> {
    let segment = object
        .image
        .as_ref()
        .ok()
        .and_then(|image| image.segment_of_vaddr(lo));
    let (mut start, mut limit, mut file_offset) = match segment {
        Some(s) => (s.vaddr, s.vaddr.saturating_add(s.mem_size), s.file_offset),
        // Unreadable file: locations carry file offsets, so the mapping is the identity.
        None => (lo, hi.saturating_add(1), lo),
    };
    if lo < start {
        file_offset = file_offset.saturating_sub(start - lo);
        start = lo;
    }
    limit = limit.max(hi.saturating_add(1));
    MappingSpec {
        start,
        limit,
        file_offset,
        filename: &object.path,
        build_id: object.build_id(),
        has_functions: true,
        has_lines: object
            .image
            .as_ref()
            .is_ok_and(|image| image.dwarf.is_some() || image.gopclntab.is_some()),
        has_inline: object.image.as_ref().is_ok_and(|image| {
            image.dwarf.is_some() || image.gopclntab.as_ref().is_some_and(|go| go.has_inline_trees())
        }),
    }
}
