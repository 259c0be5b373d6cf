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

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        time::{Duration, SystemTime},
    };

    use super::*;
    use crate::{
        aggregate::StackCount,
        labels::Target,
        object::LoadSegment,
        process::{ProcessMeta, RegistryStats},
        sample::CounterSnapshot,
        symbolize::elf::{ElfImage, SymbolTable},
    };

    const START: Duration = Duration::from_secs(1_700_000_000);

    /// A file whose text segment is at 0x1000 and holds `hot_loop` and `main`.
    fn app(build_id: &str) -> Arc<ObjectFile> {
        let image = ElfImage {
            build_id: Some(build_id.into()),
            segments: vec![LoadSegment {
                vaddr: 0x1000,
                mem_size: 0x1000,
                file_offset: 0x1000,
                file_size: 0x1000,
            }],
            symbols: SymbolTable::from_symbols([(0x1100, 0x100, "hot_loop"), (0x1200, 0x80, "main")]),
            dwarf: None,
            debuglink: None,
            gopclntab: None,
            dwarf_over_budget: false,
        };
        Arc::new(ObjectFile {
            path: "/usr/bin/app".into(),
            key: FileKey {
                dev: (8, 1),
                inode: 42,
                size: 8192,
                mtime_ns: 1,
            },
            bytes: 0,
            image: Ok(image),
        })
    }

    fn process(comm: &str, labels: &[(&str, &str)]) -> ProcessMeta {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ProcessMeta {
            comm: Some(comm.into()),
            exe: None,
            target: Arc::new(Target {
                meta: BTreeMap::new(),
                labels: Some(labels),
            }),
        }
    }

    /// One stack per process: `frames` (leaf first), counted `count` times.
    fn snapshot(
        frames: Vec<Frame>,
        objects: Vec<Arc<ObjectFile>>,
        processes: &[(u32, ProcessMeta, u64)],
    ) -> Snapshot {
        let stack: Box<[u32]> = (0..frames.len() as u32).collect();
        Snapshot {
            start: SystemTime::UNIX_EPOCH + START,
            end: SystemTime::UNIX_EPOCH + START + Duration::from_secs(10),
            frames,
            stacks: vec![stack],
            objects,
            counts: processes
                .iter()
                .map(|(pid, _, count)| StackCount {
                    pid: *pid,
                    stack: 0,
                    count: *count,
                })
                .collect(),
            processes: processes
                .iter()
                .map(|(pid, meta, _)| (*pid, meta.clone()))
                .collect(),
            counters: CounterSnapshot::default(),
            registry: RegistryStats::default(),
            dropped_by_relabeling: 0,
        }
    }

    fn reporter() -> Reporter {
        Reporter::new(99, EventSource::CpuClock, Arc::new(UnwindStats::default()))
    }

    fn text(p: &pprof::Profile, index: i64) -> &str {
        p.string_table.get(index as usize).map_or("?", String::as_str)
    }

    /// The function names of a sample's locations, leaf first (one per line, innermost first).
    fn names(p: &pprof::Profile, sample: &pprof::Sample) -> Vec<String> {
        sample
            .location_id
            .iter()
            .flat_map(|id| {
                let location = p.location.iter().find(|l| l.id == *id).expect("location");
                location.line.iter().map(|line| {
                    let function = p
                        .function
                        .iter()
                        .find(|f| f.id == line.function_id)
                        .expect("function");
                    text(p, function.name).to_owned()
                })
            })
            .collect()
    }

    fn labels(p: &pprof::Profile, sample: &pprof::Sample) -> Vec<(String, String)> {
        sample
            .label
            .iter()
            .map(|l| {
                let value = if l.str == 0 {
                    l.num.to_string()
                } else {
                    text(p, l.str).to_owned()
                };
                (text(p, l.key).to_owned(), value)
            })
            .collect()
    }

    fn comments(p: &pprof::Profile) -> Vec<String> {
        p.comment.iter().map(|&i| text(p, i).to_owned()).collect()
    }

    #[test]
    fn every_frame_gets_a_name_real_or_synthetic() {
        let frames = vec![
            Frame::Object {
                object: 0,
                vaddr: 0x1110,
            },
            Frame::Special {
                name: "[vdso]".into(),
                offset: 0x9a0,
            },
            Frame::Jit("JS:*hotLoop /tmp/hot.js:1".into()),
            Frame::Unknown(0x7f00_dead_beef),
            Frame::Object {
                object: 0,
                vaddr: 0x1210,
            },
            Frame::Object {
                object: 0,
                vaddr: 0x1f00,
            },
            Frame::Truncated("[truncated: max depth 256]".into()),
        ];
        let snap = snapshot(frames, vec![app("ab12")], &[(7, process("app", &[]), 3)]);
        let report = reporter().build(&snap, (0, 0, 0));
        let p = &report.profile;
        assert_eq!(p.sample.len(), 1);
        assert_eq!(p.sample[0].value, [3, 3 * (1_000_000_000 / 99)]);
        assert_eq!(
            names(p, &p.sample[0]),
            [
                "hot_loop",
                "[vdso]+0x9a0",
                "JS:*hotLoop /tmp/hot.js:1",
                "[unknown]+0x7f00deadbeef",
                "main",
                "app+0x1f00",
                "[truncated: max depth 256]",
            ]
        );
        // Named from the file: hot_loop and main; the address past main's symbol is not.
        assert_eq!(report.symbols.named, 4, "{:?}", report.symbols);
        assert_eq!(report.symbols.unresolved.get(&Unresolved::NoSymbol), Some(&1));
        assert_eq!(report.symbols.unresolved.get(&Unresolved::NoMapping), Some(&1));
        assert_eq!(report.symbols.unresolved.get(&Unresolved::NoFile), Some(&1));
        assert_eq!(p.duration_nanos, 10_000_000_000);
        assert_eq!(p.period, 1_000_000_000 / 99);
    }

    #[test]
    fn file_frames_point_at_their_segment_in_elf_addresses() {
        let unreadable = Arc::new(ObjectFile {
            path: "/gone/lib.so".into(),
            key: FileKey {
                dev: (8, 1),
                inode: 43,
                size: 0,
                mtime_ns: 0,
            },
            bytes: 0,
            image: Err("unreadable".into()),
        });
        let frames = vec![
            Frame::Object {
                object: 0,
                vaddr: 0x1110,
            },
            Frame::Object {
                object: 1,
                vaddr: 0x5000,
            },
            Frame::Kernel(0xffff_ffff_8100_0010),
        ];
        let snap = snapshot(
            frames,
            vec![app("ab12"), unreadable],
            &[(7, process("app", &[]), 1)],
        );
        let p = reporter().build(&snap, (0, 0, 0)).profile;
        let mapping = |name: &str| {
            p.mapping
                .iter()
                .find(|m| text(&p, m.filename) == name)
                .unwrap_or_else(|| panic!("no mapping {name}"))
        };
        let app = mapping("/usr/bin/app");
        assert_eq!(
            (app.memory_start, app.memory_limit, app.file_offset),
            (0x1000, 0x2000, 0x1000)
        );
        assert_eq!(text(&p, app.build_id), "ab12");
        // An unreadable file: locations carry file offsets, so its mapping is the identity.
        let gone = mapping("/gone/lib.so");
        assert_eq!((gone.memory_start, gone.file_offset), (0x5000, 0x5000));
        let kernel = mapping("[kernel.kallsyms]");
        assert!(kernel.memory_start <= 0xffff_ffff_8100_0010 && 0xffff_ffff_8100_0010 < kernel.memory_limit);
        let location = p
            .location
            .iter()
            .find(|l| l.address == 0x1110)
            .expect("app location");
        assert_eq!(location.mapping_id, app.id);
    }

    #[test]
    fn samples_carry_pid_comm_and_target_labels() {
        let frames = vec![Frame::Object {
            object: 0,
            vaddr: 0x1110,
        }];
        let web = process(
            "web",
            &[("service_name", "shop"), ("namespace", "prod"), ("comm", "dup")],
        );
        let snap = snapshot(
            frames,
            vec![app("ab12")],
            &[(7, web, 2), (8, process("cron", &[]), 1)],
        );
        let p = reporter().build(&snap, (0, 0, 0)).profile;
        let of = |pid: &str| {
            p.sample
                .iter()
                .map(|s| labels(&p, s))
                .find(|l| l.contains(&("pid".into(), pid.into())))
                .unwrap_or_else(|| panic!("no sample of {pid}"))
        };
        let web = of("7");
        assert!(web.contains(&("comm".into(), "web".into())), "{web:?}");
        assert!(web.contains(&("service_name".into(), "shop".into())), "{web:?}");
        assert!(web.contains(&("namespace".into(), "prod".into())), "{web:?}");
        assert_eq!(
            web.iter().filter(|(k, _)| k == "comm").count(),
            1,
            "comm once: {web:?}"
        );
        assert_eq!(
            of("8"),
            [("pid".into(), "8".into()), ("comm".into(), "cron".into())]
        );
    }

    #[test]
    fn label_values_past_the_limit_fold_into_overflow() {
        let frames = vec![Frame::Object {
            object: 0,
            vaddr: 0x1110,
        }];
        let pods: Vec<(u32, ProcessMeta, u64)> = (0..5)
            .map(|i| (100 + i, process("w", &[("pod", &format!("pod-{i}"))]), 1))
            .collect();
        let mut snap = snapshot(frames, vec![app("ab12")], &pods);
        snap.dropped_by_relabeling = 9;
        let report = reporter().with_label_value_limit(2).build(&snap, (0, 0, 0));
        let p = &report.profile;
        let values: std::collections::BTreeSet<String> = p
            .sample
            .iter()
            .flat_map(|s| labels(p, s))
            .filter(|(k, _)| k == "pod")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(values.len(), 3, "two values and the overflow: {values:?}");
        assert!(values.contains(OVERFLOW_VALUE));
        assert_eq!(report.folded.get("pod"), Some(&3));
        let labels = comments(p)
            .into_iter()
            .find(|c| c.starts_with("labels:"))
            .expect("labels comment");
        assert!(labels.contains("9 samples dropped by relabeling"), "{labels}");
        assert!(labels.contains("past 2 per label: pod 3"), "{labels}");
    }

    #[test]
    fn comments_give_the_event_and_the_interval_counters() {
        let frames = vec![Frame::NoStack];
        let mut snap = snapshot(frames, Vec::new(), &[(7, process("app", &[]), 1)]);
        snap.counters.0[Counter::Submitted as usize] = 120;
        snap.counters.0[Counter::RingFull as usize] = 4;
        snap.counters.0[(UNWIND_STATUS_SLOTS + UnwindStatus::MaxDepth as u32) as usize] = 5;
        snap.counters.0[(UNWIND_STATUS_SLOTS + UnwindStatus::FramePointerOnly as u32) as usize] = 2;
        let p = reporter().build(&snap, (120, 1, 0)).profile;
        let comments = comments(&p);
        assert!(
            comments.contains(&"event: cpu-clock at 99 Hz per CPU".to_owned()),
            "{comments:?}"
        );
        let kernel = comments
            .iter()
            .find(|c| c.starts_with("kernel:"))
            .expect("kernel comment");
        assert!(
            kernel.contains("120 sampled") && kernel.contains("4 lost (ring buffer full)"),
            "{kernel}"
        );
        let walks = comments
            .iter()
            .find(|c| c.starts_with("user stack walks:"))
            .expect("walks");
        assert!(walks.contains("max-depth 5"), "{walks}");
        assert!(
            walks.contains("frame-pointer-only (process not loaded yet) 2"),
            "{walks}"
        );
        assert!(
            !walks.contains("complete"),
            "statuses that did not occur are left out: {walks}"
        );
        let daemon = comments
            .iter()
            .find(|c| c.starts_with("daemon"))
            .expect("daemon comment");
        assert!(
            daemon.contains("120 received, 1 dropped (queue full)"),
            "{daemon}"
        );
        assert_eq!(names(&p, &p.sample[0]), ["[no stack]"]);
    }
}
