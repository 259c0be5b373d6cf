//! The unwind engine: keeps the BPF unwinder's view of every sampled process current.
//!
//! For each process it reads its executable mappings ([`crate::procfs`]), compiles the unwind table of every executable
//! file it maps ([`table`], once per file, shared by all processes that map it), loads the
//! table into the BPF row store ([`store`]) and writes the process's address ranges into the
//! `MAPPINGS` LPM trie.
//!
//! Processes are loaded when they are first sampled, not all at start: the sampling program
//! marks a process it has not seen `REQUESTED` in `PROCS` and sends a load request through the
//! `PROC_EVENTS` ring, which wakes this stage at once. Only processes running when the daemon
//! starts are loaded before the first tick. Idle processes thus cost nothing, and start-up does
//! not grow with the number of processes on the node.
//!
//! It follows processes four ways, because each alone misses cases: those load requests, exec
//! and exit tracepoints (the same ring), requests from the sampler when a sample met an unknown
//! process or address (dlopen, JIT; also the fallback when a ring event was lost), and a
//! periodic reconciliation that re-reads every loaded process.
//!
//! It owns no thread and no channel: the unwind stage ([`crate::stages::unwind`]) runs it, feeding
//! it the kernel's events, the sampler's requests and the clock.
pub mod kernel;
pub mod store;
pub mod table;

use std::{
    hash::{Hash as _, Hasher as _},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::lpm_trie::Key;
use foldhash::{HashMap, HashSet};
use object::{Object as _, ObjectSection as _, ObjectSegment as _, ReadCache};

use profiler_common::{
    MAPPING_PID_PREFIX, MAX_MAPPINGS, MAX_PROCS, MAX_UNWIND_FILES, Mapping, MappingKey, ProcEvent, mapping,
    mapping_key, proc_event, proc_state,
};
use tracing::{debug, info, warn};

pub use self::kernel::{BpfMaps, KernelMaps};
use self::{
    store::StoreError,
    table::{Table, TableError},
};
use crate::{
    bpf::UnwindMaps,
    object::{WindowedFile, open_regular},
    procfs::{self, ExecMapping, FileKey, MappingKind, mapped_file_paths},
    rootfs::FilePath,
    telemetry::{Collect, Exposition, Kind},
};

/// After a process is loaded because of its first sample or an exec, its mappings are read
/// again this long after: a program that has just started is still mapping its shared
/// libraries (the dynamic loader runs after exec), and samples in them would otherwise find
/// no mapping until the sampler asks.
const RECHECK_AFTER: [Duration; 2] = [Duration::from_millis(50), Duration::from_millis(300)];
/// Re-checks waiting at most; more are not scheduled (the sampler's requests still apply).
const MAX_RECHECKS: usize = 4096;
/// Files whose identity and kind are remembered (the tables themselves live in BPF).
const MAX_KNOWN_FILES: usize = 8192;

/// Counters of the stage, shared with the reporter.
#[derive(Debug, Default)]
pub struct UnwindStats {
    pub processes: AtomicU64,
    pub tables_built: AtomicU64,
    pub table_errors: AtomicU64,
    pub build_micros: AtomicU64,
    pub files_loaded: AtomicU64,
    pub rows_used: AtomicU64,
    pub rows_capacity: AtomicU64,
    pub evictions: AtomicU64,
    pub requests_dropped: AtomicU64,
    /// Load requests from the sampling program (first samples of processes not loaded).
    pub load_requests: AtomicU64,
    /// Entries this stage keeps in `MAPPINGS`.
    pub mapping_entries: AtomicU64,
}

impl UnwindStats {
    pub fn snapshot(&self) -> UnwindFigures {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        UnwindFigures {
            processes: get(&self.processes),
            tables_built: get(&self.tables_built),
            table_errors: get(&self.table_errors),
            build_micros: get(&self.build_micros),
            files_loaded: get(&self.files_loaded),
            bytes_used: get(&self.rows_used) * 8,
            bytes_capacity: get(&self.rows_capacity) * 8,
            evictions: get(&self.evictions),
            requests_dropped: get(&self.requests_dropped),
            load_requests: get(&self.load_requests),
        }
    }
}

impl Collect for UnwindStats {
    fn collect(&self, out: &mut Exposition) {
        let u = self.snapshot();
        out.gauge(
            "profiler_unwind_processes",
            "Processes with mappings loaded for the unwinder.",
            u.processes as f64,
        );
        out.gauge(
            "profiler_unwind_files",
            "Files with unwind tables loaded.",
            u.files_loaded as f64,
        );
        out.gauge(
            "profiler_unwind_table_bytes",
            "Bytes of the unwind-table BPF map in use.",
            u.bytes_used as f64,
        );
        out.gauge(
            "profiler_unwind_table_capacity_bytes",
            "Size of the unwind-table BPF map.",
            u.bytes_capacity as f64,
        );
        let maps = [
            ("PROCS", u.processes, MAX_PROCS),
            (
                "MAPPINGS",
                self.mapping_entries.load(Ordering::Relaxed),
                MAX_MAPPINGS,
            ),
            ("UNWIND_FILES", u.files_loaded, MAX_UNWIND_FILES),
        ];
        let mut entries = out.family(
            "profiler_bpf_map_entries",
            Kind::Gauge,
            "Entries the daemon keeps in a BPF map.",
        );
        for (map, n, _) in maps {
            entries.sample(&[("map", map)], n as f64);
        }
        let mut capacity = out.family(
            "profiler_bpf_map_capacity_entries",
            Kind::Gauge,
            "Capacity of a BPF map.",
        );
        for (map, _, n) in maps {
            capacity.sample(&[("map", map)], f64::from(n));
        }
        out.counter(
            "profiler_unwind_table_evictions_total",
            "Tables evicted to make room.",
            u.evictions,
        );
        out.counter(
            "profiler_unwind_table_failures_total",
            "Files whose unwind table could not be built.",
            u.table_errors,
        );
        out.counter(
            "profiler_unwind_requests_dropped_total",
            "Load requests dropped because the unwinder's queue was full.",
            u.requests_dropped,
        );
        out.counter(
            "profiler_unwind_load_requests_total",
            "Load requests from the sampling program: first samples of processes not loaded yet.",
            u.load_requests,
        );
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnwindFigures {
    pub processes: u64,
    pub tables_built: u64,
    pub table_errors: u64,
    pub build_micros: u64,
    pub files_loaded: u64,
    pub bytes_used: u64,
    pub bytes_capacity: u64,
    pub evictions: u64,
    pub requests_dropped: u64,
    pub load_requests: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a mapped file is to the unwinder.
#[derive(Debug, Clone)]
enum FileKind {
    /// Its table is (or was) in the store under this id.
    Table,
    /// Frame pointers: files without CFI, and the daemon's own executable.
    FramePointer,
    /// No usable table; samples in it end with `[unwind: no table …]`.
    Failed,
}

#[derive(Debug, Clone)]
struct FileInfo {
    id: u64,
    kind: FileKind,
    /// PT_LOAD segments: (file offset, virtual address).
    segments: Vec<(u64, u64, u64)>,
    used: u64,
}

#[derive(Default)]
struct LoadedProcess {
    keys: Vec<Key<MappingKey>>,
    files: Vec<u64>,
    signature: u64,
}

pub struct Unwinder<M: KernelMaps = BpfMaps> {
    maps: M,
    proc_root: PathBuf,
    processes: HashMap<u32, LoadedProcess>,
    /// Processes whose mappings are read again at the given time (see [`RECHECK_AFTER`]).
    rechecks: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, u32)>>,
    files: HashMap<FileKey, FileInfo>,
    vdso: Option<FileInfo>,
    vdso_table: Option<Table>,
    /// This daemon's own executable, when it was built with frame pointers (see
    /// [`own_frame_pointer_file`]).
    own_file: Option<u64>,
    clock: u64,
    /// Loads so far (see [`proc_state::loaded`]).
    loads: u32,
    stats: Arc<UnwindStats>,
}

impl Unwinder<BpfMaps> {
    /// The engine over the maps of a loaded BPF session.
    pub fn new(maps: UnwindMaps, proc_root: PathBuf, stats: Arc<UnwindStats>) -> Result<Self, UnwindError> {
        stats
            .rows_capacity
            .store(u64::from(maps.capacity), Ordering::Relaxed);
        Ok(Self::with_maps(BpfMaps::new(maps)?, proc_root, stats))
    }
}

impl<M: KernelMaps> Unwinder<M> {
    /// The engine over any [`KernelMaps`] (a fake in tests).
    pub fn with_maps(maps: M, proc_root: PathBuf, stats: Arc<UnwindStats>) -> Self {
        let (vdso, vdso_table) = match own_vdso() {
            Some((info, table)) => (Some(info), Some(table)),
            None => (None, None),
        };
        Unwinder {
            maps,
            proc_root,
            processes: HashMap::default(),
            rechecks: std::collections::BinaryHeap::new(),
            files: HashMap::default(),
            vdso,
            vdso_table,
            own_file: own_frame_pointer_file(),
            clock: 0,
            loads: 0,
            stats,
        }
    }

    /// Loads `pids`, or, when empty, the processes with a running thread (before sampling
    /// starts, so their first samples already unwind). The others are loaded on their first
    /// sample.
    pub fn load_initial(&mut self, pids: &[u32]) {
        let started = Instant::now();
        let running: Vec<u32>;
        let pids = if pids.is_empty() {
            running = procfs::running_processes(&self.proc_root);
            &running
        } else {
            pids
        };
        for &pid in pids {
            self.load(pid);
        }
        let figures = self.stats.snapshot();
        info!(
            processes = pids.len(),
            tables = figures.files_loaded,
            table_bytes = figures.bytes_used,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "unwind tables loaded"
        );
    }

    /// A request from the sampler (a sample outside the loaded mappings, or of a process not
    /// loaded): a loaded process is reloaded only if its executable mappings changed.
    pub fn on_request(&mut self, pid: u32) {
        if self.processes.contains_key(&pid) {
            self.reload_if_changed(pid);
        } else {
            self.load(pid);
        }
    }

    /// Loads a process met for the first time (or after exec), and schedules re-reads.
    fn load_new(&mut self, pid: u32) {
        self.load(pid);
        if self.processes.contains_key(&pid) {
            let now = Instant::now();
            for delay in RECHECK_AFTER {
                if self.rechecks.len() < MAX_RECHECKS {
                    self.rechecks.push(std::cmp::Reverse((now + delay, pid)));
                }
            }
        }
    }

    /// Re-reads the processes whose re-check is due.
    pub fn run_due_rechecks(&mut self) {
        let now = Instant::now();
        while let Some(std::cmp::Reverse((at, pid))) = self.rechecks.peek().copied() {
            if at > now {
                break;
            }
            self.rechecks.pop();
            if self.processes.contains_key(&pid) {
                self.reload_if_changed(pid);
            }
        }
    }

    fn is_gone(&self, pid: u32) -> bool {
        !procfs::exists(&self.proc_root, pid)
    }

    fn reload_if_changed(&mut self, pid: u32) {
        let signature = self.processes.get(&pid).map(|p| p.signature);
        match procfs::read_exec_mappings(&self.proc_root, pid) {
            Ok(maps) if Some(signature_of(&maps)) == signature => {}
            Ok(_) => self.load(pid),
            Err(_) => self.unload(pid),
        }
    }

    /// A descriptor that is readable when exec, exit or load events wait.
    pub fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        self.maps.event_fd()
    }

    /// When the next scheduled re-read of a process is due.
    pub fn next_recheck(&self) -> Option<Instant> {
        self.rechecks.peek().map(|r| r.0.0)
    }

    /// Handles every exec, exit and load event waiting in the ring.
    pub fn drain_events(&mut self) {
        for event in self.maps.read_events() {
            self.on_event(event);
        }
    }

    /// One exec, exit or load event from the kernel.
    pub fn on_event(&mut self, event: ProcEvent) {
        match event.kind {
            proc_event::EXEC if self.processes.contains_key(&event.tgid) => {
                debug!(pid = event.tgid, "exec: reloading mappings");
                self.load_new(event.tgid);
            }
            proc_event::EXIT => self.unload(event.tgid),
            proc_event::LOAD => {
                self.stats.load_requests.fetch_add(1, Ordering::Relaxed);
                if !self.processes.contains_key(&event.tgid) {
                    self.load_new(event.tgid);
                }
            }
            _ => {}
        }
    }

    /// Re-reads every loaded process: gone ones are dropped, changed ones reloaded. Also drops
    /// `PROCS` entries of processes that were requested but never loaded and are gone (their
    /// exit came before their load, or an event was lost), so they cannot fill the map.
    pub fn reconcile(&mut self) {
        let unloaded: Vec<u32> = self
            .maps
            .processes()
            .into_iter()
            .filter(|pid| !self.processes.contains_key(pid))
            .collect();
        for pid in unloaded {
            if self.is_gone(pid) {
                self.unload(pid);
            }
        }
        let pids: Vec<u32> = self.processes.keys().copied().collect();
        for pid in pids {
            self.reload_if_changed(pid);
        }
        self.forget_unused_files();
    }

    fn unload(&mut self, pid: u32) {
        // Also a process that was requested but never loaded: its PROCS entry goes, so a new
        // process under the same pid asks again.
        self.maps.remove_process(pid);
        let Some(process) = self.processes.remove(&pid) else {
            return;
        };
        for key in &process.keys {
            self.maps.remove_mapping(key);
        }
        for id in process.files {
            self.maps.add_table_user(id, -1);
        }
        self.publish();
    }

    /// (Re)loads one process. Failures are logged and leave the process on the kernel's
    /// frame-pointer walk. A process that was never loaded and still exists keeps its
    /// `REQUESTED` entry, so its samples do not ask again (the sampler's requests retry); one
    /// that is gone loses it.
    fn load(&mut self, pid: u32) {
        let maps = match procfs::read_exec_mappings(&self.proc_root, pid) {
            Ok(maps) => maps,
            Err(error) => {
                debug!(pid, %error, "process unreadable (exited?)");
                if self.processes.contains_key(&pid) || self.is_gone(pid) {
                    self.unload(pid);
                }
                return;
            }
        };
        let signature = signature_of(&maps);
        let mut keys: Vec<Key<MappingKey>> = Vec::new();
        let mut files: Vec<u64> = Vec::new();
        let mut entries: Vec<(Key<MappingKey>, Mapping)> = Vec::new();
        let marker = Key::new(MAPPING_PID_PREFIX, mapping_key(pid, 0));
        entries.push((marker, Mapping::default()));
        for m in &maps {
            let value = match &m.kind {
                MappingKind::File { key, path, deleted } => {
                    let info = self.file(pid, m, *key, path, *deleted);
                    files.push(info.id);
                    // An unreadable file has no segments; its frames end the walk as "no
                    // table" whatever the bias.
                    let bias = match bias(&info.segments, m.start, m.offset) {
                        Some(bias) => bias,
                        None if matches!(info.kind, FileKind::Failed) => 0,
                        None => continue,
                    };
                    let kind = match info.kind {
                        FileKind::FramePointer => mapping::FRAME_POINTER,
                        FileKind::Table | FileKind::Failed => mapping::TABLE,
                    };
                    Mapping {
                        file_id: info.id,
                        bias,
                        start: m.start,
                        end: m.end,
                        kind,
                        _pad: 0,
                    }
                }
                MappingKind::Special(name) if &**name == procfs::VSYSCALL => continue,
                MappingKind::Special(name) if &**name == procfs::VDSO => match &self.vdso {
                    Some(vdso) => {
                        if !self.maps.has_table(vdso.id)
                            && let Some(table) = &self.vdso_table
                            && let Err(error) = self.maps.insert_table(vdso.id, table)
                        {
                            debug!(%error, "vdso table not loaded");
                        }
                        Mapping {
                            file_id: vdso.id,
                            bias: m.start - vdso.segments.first().map_or(0, |s| s.1),
                            start: m.start,
                            end: m.end,
                            kind: mapping::TABLE,
                            _pad: 0,
                        }
                    }
                    None => fp_mapping(m),
                },
                // JIT code and other anonymous executable memory.
                MappingKind::Special(_) => fp_mapping(m),
            };
            let prefixes = prefixes(m.start, m.end);
            if entries.len() + prefixes.len() > MAX_PROCESS_ENTRIES {
                // The rest of this process's mappings are not loaded: its walks there end as
                // they do in a process not loaded at all, and no other process loses room.
                crate::limits::hit(crate::limits::Limit::ProcessMappings, &format!("pid {pid}"));
                break;
            }
            for (prefix, start) in prefixes {
                entries.push((
                    Key::new(MAPPING_PID_PREFIX + prefix, mapping_key(pid, start)),
                    value,
                ));
            }
        }
        // The process's new tables first, so no mapping names a file BPF cannot find yet.
        self.maps.commit_tables();
        for (key, value) in &entries {
            match self.maps.insert_mapping(key, value) {
                Ok(()) => keys.push(*key),
                Err(error) => {
                    warn!(pid, %error, "MAPPINGS is full; the process keeps partial unwinding");
                    break;
                }
            }
        }
        let old = self.processes.remove(&pid).unwrap_or_default();
        let new_keys: HashSet<(u32, MappingKey)> = keys.iter().map(|k| (k.prefix_len(), k.data())).collect();
        for key in &old.keys {
            if !new_keys.contains(&(key.prefix_len(), key.data())) {
                self.maps.remove_mapping(key);
            }
        }
        for &id in &files {
            self.maps.add_table_user(id, 1);
        }
        for &id in &old.files {
            self.maps.add_table_user(id, -1);
        }
        // A new value for every load: walks cached this pid's mappings under the old one.
        self.loads = self.loads.wrapping_add(1);
        if let Err(error) = self.maps.set_process(pid, proc_state::loaded(self.loads)) {
            warn!(pid, %error, "PROCS is full; the process stays on frame pointers");
        }
        self.processes.insert(
            pid,
            LoadedProcess {
                keys,
                files,
                signature,
            },
        );
        self.publish();
    }

    /// The file behind a mapping: identified, classified and its table loaded (once).
    fn file(&mut self, pid: u32, m: &ExecMapping, key: FileKey, path: &str, deleted: bool) -> FileInfo {
        self.clock += 1;
        if let Some(info) = self.files.get_mut(&key) {
            info.used = self.clock;
            let info = info.clone();
            if matches!(info.kind, FileKind::Table) && !self.maps.has_table(info.id) {
                // Evicted earlier; build it again now that a process needs it.
                self.files.remove(&key);
            } else {
                return info;
            }
        }
        let proc_dir = self.proc_root.join(pid.to_string());
        let candidates = mapped_file_paths(&proc_dir, path, deleted, (m.start, m.end));
        let mut last_error = String::new();
        for candidate in candidates {
            match self.build(pid, &candidate, key, path) {
                Ok(info) => {
                    self.files.insert(key, info.clone());
                    return info;
                }
                Err(error) => last_error = error,
            }
        }
        // Not remembered: the file may be readable through the next process that maps it (this
        // one may have exited mid-load).
        self.stats.table_errors.fetch_add(1, Ordering::Relaxed);
        debug!(pid, path, error = %last_error, "mapped file unreadable; no unwind table");
        FileInfo {
            id: fallback_id(key),
            kind: FileKind::Failed,
            segments: Vec::new(),
            used: self.clock,
        }
    }

    fn build(
        &mut self,
        pid: u32,
        candidate: &FilePath,
        key: FileKey,
        path: &str,
    ) -> Result<FileInfo, String> {
        let (file, meta) = open_regular(candidate, Some(key.inode)).map_err(|e| e.to_string())?;
        let cache = WindowedFile::cache(file, meta.len());
        let elf = object::File::parse(&cache).map_err(|e| format!("{candidate}: {e}"))?;
        let segments = load_segments(&elf);
        let id = file_id(&elf, &cache, key);
        let mut info = FileInfo {
            id,
            kind: FileKind::Table,
            segments,
            used: self.clock,
        };
        if self.maps.has_table(id) {
            return Ok(info);
        }
        if self.own_file == Some(id) {
            debug!(
                path,
                "the daemon's own executable keeps frame pointers: no unwind table"
            );
            info.kind = FileKind::FramePointer;
            return Ok(info);
        }
        let started = Instant::now();
        let debug_file = self.debug_file(pid, &elf);
        let debug_elf = debug_file.as_ref().and_then(|c| object::File::parse(c).ok());
        let compiled = table::compile(&elf, debug_elf.as_ref());
        self.stats
            .build_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match compiled {
            Ok((table, source)) => {
                self.stats.tables_built.fetch_add(1, Ordering::Relaxed);
                debug!(
                    path,
                    rows = table.rows.len(),
                    invalid = table.invalid_rows,
                    bad_fdes = table.bad_fdes,
                    ?source,
                    "unwind table built"
                );
                if let Err(error) = self.maps.insert_table(id, &table) {
                    warn!(path, %error, "unwind table not loaded");
                    info.kind = FileKind::Failed;
                }
                Ok(info)
            }
            Err(TableError::NoCfi) => {
                // No CFI at all (hand-written or -fno-asynchronous-unwind-tables code): frame
                // pointers are the best there is.
                info.kind = FileKind::FramePointer;
                Ok(info)
            }
            Err(TableError::TooManyRows { .. }) => {
                // Counted and logged once by the limit; frame pointers are what is left.
                crate::limits::hit(crate::limits::Limit::TableRows, path);
                info.kind = FileKind::FramePointer;
                Ok(info)
            }
            Err(error) => {
                self.stats.table_errors.fetch_add(1, Ordering::Relaxed);
                info!(path, %error, "unwind table not built; samples in this file end there");
                info.kind = FileKind::Failed;
                Ok(info)
            }
        }
    }

    /// The separate debug file (by build id) of a file without CFI, read in the process's
    /// mount namespace.
    fn debug_file<'a, R: object::ReadRef<'a>>(
        &self,
        pid: u32,
        elf: &object::File<'a, R>,
    ) -> Option<ReadCache<WindowedFile>> {
        if elf.section_by_name(".eh_frame").is_some() || elf.section_by_name(".debug_frame").is_some() {
            return None;
        }
        let build_id = crate::object::hex(elf.build_id().ok()??);
        if build_id.len() < 3 {
            return None;
        }
        let path = FilePath::in_root(
            procfs::root_of(&self.proc_root, pid),
            format!(
                "/usr/lib/debug/.build-id/{}/{}.debug",
                &build_id[..2],
                &build_id[2..]
            ),
        );
        let (file, meta) = open_regular(&path, None).ok()?;
        Some(WindowedFile::cache(file, meta.len()))
    }

    fn forget_unused_files(&mut self) {
        if self.files.len() <= MAX_KNOWN_FILES {
            return;
        }
        let mut by_age: Vec<(u64, FileKey)> = self.files.iter().map(|(k, f)| (f.used, *k)).collect();
        by_age.sort_unstable_by_key(|(used, _)| *used);
        let excess = self.files.len() - MAX_KNOWN_FILES / 2;
        for (_, key) in by_age.into_iter().take(excess) {
            self.files.remove(&key);
        }
    }

    fn publish(&self) {
        let s = self.maps.table_stats();
        self.stats
            .processes
            .store(self.processes.len() as u64, Ordering::Relaxed);
        let mapping_keys: usize = self.processes.values().map(|p| p.keys.len()).sum();
        self.stats
            .mapping_entries
            .store(mapping_keys as u64, Ordering::Relaxed);
        self.stats.files_loaded.store(s.files, Ordering::Relaxed);
        self.stats.rows_used.store(s.used_rows, Ordering::Relaxed);
        self.stats.evictions.store(s.evictions, Ordering::Relaxed);
    }
}

fn fp_mapping(m: &ExecMapping) -> Mapping {
    Mapping {
        file_id: 0,
        bias: 0,
        start: m.start,
        end: m.end,
        kind: mapping::FRAME_POINTER,
        _pad: 0,
    }
}

fn signature_of(maps: &[ExecMapping]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    maps.hash(&mut hasher);
    hasher.finish()
}

/// (file offset, virtual address, file size) of each executable PT_LOAD segment.
fn load_segments<'a, R: object::ReadRef<'a>>(elf: &object::File<'a, R>) -> Vec<(u64, u64, u64)> {
    const PF_X: u32 = 1;
    elf.segments()
        .filter(|s| matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0))
        .map(|s| {
            let (offset, size) = s.file_range();
            (offset, s.address(), size)
        })
        .collect()
}

/// Load bias of an executable mapping: address − ELF virtual address. The mapping starts at
/// the page holding its segment's first byte, so its offset is the segment's offset rounded
/// down to a page (0x17000 for a segment at 0x17010).
fn bias(segments: &[(u64, u64, u64)], start: u64, offset: u64) -> Option<u64> {
    const PAGE: u64 = 4096;
    let (seg_offset, seg_vaddr, _) = segments
        .iter()
        .find(|(o, _, size)| offset >= o & !(PAGE - 1) && offset < o.saturating_add((*size).max(1)))?;
    // vaddr of the mapping's first byte: the segment's vaddr minus what precedes it in the page.
    let vaddr = seg_vaddr.checked_sub(seg_offset.checked_sub(offset)?)?;
    Some(start.wrapping_sub(vaddr))
}

/// Most `MAPPINGS` entries one process may take: 1/16 of the node-wide map (16,384). A
/// process maps a few hundred executable ranges of ~10 entries each; one that maps tens of
/// thousands would otherwise fill the map for every other process on the node.
pub const MAX_PROCESS_ENTRIES: usize = (profiler_common::MAX_MAPPINGS / 16) as usize;

/// Splits `[start, end)` into aligned power-of-two blocks: (prefix bits of the address, block
/// start), as the LPM trie needs.
fn prefixes(start: u64, end: u64) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let align = if at == 0 { 63 } else { at.trailing_zeros().min(63) };
        let mut bits = align;
        while bits > 0 && (end - at) < (1u64 << bits) {
            bits -= 1;
        }
        out.push((64 - bits, at));
        match at.checked_add(1u64 << bits) {
            Some(next) => at = next,
            None => break,
        }
    }
    out
}

/// A file's id: its build id and a hash of the sections its table is compiled from (so a
/// file that claims another's build id with other CFI gets a table of its own, and cannot
/// replace the rows every process of the genuine file walks with), else a hash of its first
/// and last 4 KiB and its length.
fn file_id<'a, R: object::ReadRef<'a>>(elf: &object::File<'a, R>, data: R, key: FileKey) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    if let Ok(Some(build_id)) = elf.build_id() {
        "build-id".hash(&mut hasher);
        build_id.hash(&mut hasher);
        for name in [
            ".eh_frame",
            ".eh_frame_hdr",
            ".debug_frame",
            ".gopclntab",
            ".text",
        ] {
            let Some(section) = elf.section_by_name(name) else {
                continue;
            };
            (name, section.address(), section.size()).hash(&mut hasher);
            // The bytes that become rows; `.text` only by its place and size.
            if name != ".text"
                && let Ok(bytes) = section.data()
            {
                bytes.hash(&mut hasher);
            }
        }
        return hasher.finish() | 1;
    }
    let len = data.len().unwrap_or(0);
    "content".hash(&mut hasher);
    len.hash(&mut hasher);
    if let Ok(head) = data.read_bytes_at(0, len.min(4096)) {
        head.hash(&mut hasher);
    }
    if let Ok(tail) = data.read_bytes_at(len.saturating_sub(4096), len.min(4096)) {
        tail.hash(&mut hasher);
    }
    if len == 0 {
        key.hash(&mut hasher);
    }
    hasher.finish() | 1
}

/// Id for a file that could not be read: no table is ever stored under it.
fn fallback_id(key: FileKey) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    "unreadable".hash(&mut hasher);
    key.hash(&mut hasher);
    hasher.finish() | 1
}

/// The file id of this daemon's executable when it was built with frame pointers in every
/// function (`-C force-frame-pointers=yes`, set in `.cargo/config.toml`; build.rs sets the
/// `frame_pointers` cfg when it sees the flag). Its frames are then walked by frame pointer,
/// as those of a file without CFI are, instead of through a table compiled at every start: the daemon
/// samples itself on most recordings, and its table is 124,000 rows, ~11 ms of CPU and 1 MiB of
/// kernel memory. Rust's standard library is built with frame pointers too; the rare frame
/// caught in a prologue or epilogue may lose its caller, as frame-pointer walks do.
fn own_frame_pointer_file() -> Option<u64> {
    if !cfg!(frame_pointers) {
        return None;
    }
    let (file, meta) = open_regular(&FilePath::Trusted("/proc/self/exe".into()), None).ok()?;
    // The key only counts for a file whose id cannot come from its contents (an empty one).
    let key = FileKey::of(
        (0, 0),
        std::os::unix::fs::MetadataExt::ino(&meta),
        &(&meta).into(),
    );
    let cache = WindowedFile::cache(file, meta.len());
    let elf = object::File::parse(&cache).ok()?;
    Some(file_id(&elf, &cache, key))
}

/// The vDSO is the same image in every process: compile the daemon's own copy once.
fn own_vdso() -> Option<(FileInfo, Table)> {
    // SAFETY: getauxval has no preconditions.
    let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    if base == 0 {
        return None;
    }
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let line = maps.lines().find(|l| l.ends_with("[vdso]"))?;
    let (range, _) = line.split_once(' ')?;
    let (start, end) = range.split_once('-')?;
    let (start, end) = (
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    );
    if start != base || end <= start {
        return None;
    }
    // SAFETY: [start, end) is the daemon's own vDSO mapping, readable and never unmapped.
    let image = unsafe { std::slice::from_raw_parts(start as *const u8, (end - start) as usize) };
    let elf = object::File::parse(image).ok()?;
    let (table, _) = table::compile(&elf, None::<&object::File<'_, &[u8]>>).ok()?;
    let mut hasher = std::hash::DefaultHasher::new();
    "vdso".hash(&mut hasher);
    image.hash(&mut hasher);
    let info = FileInfo {
        id: hasher.finish() | 1,
        kind: FileKind::Table,
        segments: load_segments(&elf),
        used: 0,
    };
    Some((info, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_id_twin_with_other_cfi_gets_its_own_table_id() {
        let genuine = std::fs::read("/proc/self/exe").expect("own executable");
        let elf = object::File::parse(genuine.as_slice()).expect("ELF");
        assert!(
            elf.build_id().ok().flatten().is_some(),
            "the test binary has a build id"
        );
        let (offset, size) = elf
            .section_by_name(".eh_frame")
            .and_then(|s| s.file_range())
            .expect(".eh_frame");
        let key = FileKey {
            dev: (0, 0),
            inode: 1,
            size: 0,
            mtime_ns: 0,
        };
        let id = file_id(&elf, genuine.as_slice(), key);
        // The same bytes elsewhere: the same table.
        let copy = genuine.clone();
        let copy_elf = object::File::parse(copy.as_slice()).expect("ELF");
        assert_eq!(file_id(&copy_elf, copy.as_slice(), key), id);
        // Same build id, one CFI byte changed: another table.
        let mut twin = genuine.clone();
        twin[(offset + size / 2) as usize] ^= 0x5a;
        let twin_elf = object::File::parse(twin.as_slice()).expect("ELF");
        assert_eq!(twin_elf.build_id().ok().flatten(), elf.build_id().ok().flatten());
        assert_ne!(file_id(&twin_elf, twin.as_slice(), key), id);
    }

    #[test]
    fn prefixes_cover_the_range_exactly() {
        for (start, end) in [
            (0x5555_5555_4000u64, 0x5555_5557_b000u64),
            (0x7f00_0000_0000, 0x7f00_0000_1000),
            (0x1000, 0x1_0000_0000),
            (0x7fff_f7fc_3000, 0x7fff_f7fc_5000),
        ] {
            let blocks = prefixes(start, end);
            let mut at = start;
            for (bits, block) in &blocks {
                assert_eq!(*block, at, "blocks are contiguous");
                let size = 1u64 << (64 - bits);
                assert_eq!(block % size, 0, "block {block:#x} is aligned to its size");
                at += size;
            }
            assert_eq!(at, end);
            assert!(blocks.len() <= 2 * 64);
        }
        assert_eq!(prefixes(0x4000, 0x8000), vec![(50, 0x4000)]);
    }

    #[test]
    fn bias_comes_from_the_segment_of_the_mapping_offset() {
        // A PIE: text segment at file offset 0x1000, vaddr 0x1000; mapped at 0x5555_5555_5000.
        let segments = vec![(0x1000, 0x1000, 0x1b5)];
        assert_eq!(bias(&segments, 0x5555_5555_5000, 0x1000), Some(0x5555_5555_4000));
        // A non-PIE executable: vaddr 0x401000 at offset 0x1000, mapped at its vaddr.
        let segments = vec![(0x1000, 0x40_1000, 0x2000)];
        assert_eq!(bias(&segments, 0x40_1000, 0x1000), Some(0));
        // rustc's layout: the text segment starts mid-page (offset 0x17010, vaddr 0x18010) and
        // is mapped from offset 0x17000.
        let segments = vec![(0x17010, 0x18010, 0x3fea0)];
        assert_eq!(
            bias(&segments, 0x55f5_4109_c000, 0x17000),
            Some(0x55f5_4109_c000 - 0x18000)
        );
        assert_eq!(bias(&segments, 0x1000, 0x5_0000_0000), None);
    }

    /// The kernel maps as plain collections, with an optional capacity for `MAPPINGS`.
    #[derive(Default)]
    struct FakeMaps {
        mappings: std::collections::HashMap<(u32, MappingKey), Mapping>,
        mapping_capacity: Option<usize>,
        procs: std::collections::HashMap<u32, u32>,
        /// file id → processes using its table.
        tables: std::collections::HashMap<u64, i32>,
        staged: Vec<u64>,
        events: Vec<ProcEvent>,
    }

    impl KernelMaps for FakeMaps {
        fn insert_mapping(
            &mut self,
            key: &Key<MappingKey>,
            value: &Mapping,
        ) -> Result<(), aya::maps::MapError> {
            let k = (key.prefix_len(), key.data());
            if !self.mappings.contains_key(&k)
                && self.mapping_capacity.is_some_and(|c| self.mappings.len() >= c)
            {
                return Err(aya::maps::MapError::KeyNotFound);
            }
            self.mappings.insert(k, *value);
            Ok(())
        }
        fn remove_mapping(&mut self, key: &Key<MappingKey>) {
            self.mappings.remove(&(key.prefix_len(), key.data()));
        }
        fn set_process(&mut self, pid: u32, state: u32) -> Result<(), aya::maps::MapError> {
            self.procs.insert(pid, state);
            Ok(())
        }
        fn remove_process(&mut self, pid: u32) {
            self.procs.remove(&pid);
        }
        fn processes(&self) -> Vec<u32> {
            self.procs.keys().copied().collect()
        }
        fn has_table(&self, file_id: u64) -> bool {
            self.tables.contains_key(&file_id)
        }
        fn insert_table(&mut self, file_id: u64, _table: &Table) -> Result<(), StoreError> {
            self.tables.insert(file_id, 0);
            self.staged.push(file_id);
            Ok(())
        }
        fn commit_tables(&mut self) {
            self.staged.clear();
        }
        fn add_table_user(&mut self, file_id: u64, delta: i32) {
            if let Some(users) = self.tables.get_mut(&file_id) {
                *users += delta;
            }
        }
        fn table_stats(&self) -> store::StoreStats {
            store::StoreStats {
                files: self.tables.len() as u64,
                ..store::StoreStats::default()
            }
        }
        fn read_events(&mut self) -> Vec<ProcEvent> {
            std::mem::take(&mut self.events)
        }
        fn event_fd(&self) -> Option<std::os::fd::RawFd> {
            None
        }
    }

    fn engine(maps: FakeMaps) -> Unwinder<FakeMaps> {
        Unwinder::with_maps(maps, PathBuf::from("/proc"), Arc::new(UnwindStats::default()))
    }

    /// The mapping entries of `pid` (its marker included).
    fn entries_of(maps: &FakeMaps, pid: u32) -> Vec<Mapping> {
        let pid = pid.to_be_bytes();
        maps.mappings
            .iter()
            .filter(|((_, key), _)| key[..4] == pid)
            .map(|(_, m)| *m)
            .collect()
    }

    #[test]
    fn a_loaded_process_has_its_ranges_and_tables_and_a_loaded_state() {
        let pid = std::process::id();
        let mut u = engine(FakeMaps::default());
        u.on_request(pid);
        let state = u.maps.procs.get(&pid).copied().expect("in PROCS");
        assert_eq!(proc_state::state(state), proc_state::LOADED);
        let marker = (MAPPING_PID_PREFIX, mapping_key(pid, 0));
        assert!(u.maps.mappings.contains_key(&marker), "the pid's marker entry");
        let entries = entries_of(&u.maps, pid);
        // Every executable mapping of this process is covered by entries naming its range.
        let maps = procfs::read_exec_mappings(std::path::Path::new("/proc"), pid).expect("own maps");
        for m in maps
            .iter()
            .filter(|m| !matches!(&m.kind, MappingKind::Special(n) if &**n == procfs::VSYSCALL))
        {
            assert!(
                entries.iter().any(|e| e.start == m.start && e.end == m.end),
                "no entry for {:x}-{:x} {:?}",
                m.start,
                m.end,
                m.kind
            );
        }
        // libc has CFI: its table was stored and is used by this process. (The vDSO's shared
        // table counts no users.)
        assert!(!u.maps.tables.is_empty(), "no table was stored");
        let vdso = u.vdso.as_ref().map(|v| v.id);
        assert!(
            u.maps
                .tables
                .iter()
                .all(|(id, &users)| users >= 1 || Some(*id) == vdso),
            "{:?}",
            u.maps.tables
        );
        assert!(
            u.maps.staged.is_empty(),
            "tables are committed before the mappings go in"
        );
        assert_eq!(u.stats.snapshot().processes, 1);
    }

    #[test]
    fn an_exit_removes_the_process_and_releases_its_tables() {
        let pid = std::process::id();
        let mut u = engine(FakeMaps::default());
        u.on_request(pid);
        u.maps.events.push(ProcEvent {
            kind: proc_event::EXIT,
            tgid: pid,
        });
        u.drain_events();
        assert!(entries_of(&u.maps, pid).is_empty());
        assert!(!u.maps.procs.contains_key(&pid));
        assert!(
            u.maps.tables.values().all(|&users| users == 0),
            "{:?}",
            u.maps.tables
        );
        assert_eq!(u.stats.snapshot().processes, 0);
    }

    #[test]
    fn an_unchanged_process_is_not_reloaded_but_an_exec_reloads_it() {
        let pid = std::process::id();
        let mut u = engine(FakeMaps::default());
        u.on_request(pid);
        let first = u.maps.procs[&pid];
        u.on_request(pid);
        assert_eq!(u.maps.procs[&pid], first, "same mappings: no new load");
        assert!(u.next_recheck().is_none(), "a request schedules no re-check");
        u.on_event(ProcEvent {
            kind: proc_event::EXEC,
            tgid: pid,
        });
        assert_ne!(u.maps.procs[&pid], first, "an exec loads again under a new value");
        assert!(u.next_recheck().is_some(), "an exec schedules re-reads");
        // An exec of a process never loaded is left to its first sample's request.
        let other = u32::MAX - 11;
        u.on_event(ProcEvent {
            kind: proc_event::EXEC,
            tgid: other,
        });
        assert!(!u.maps.procs.contains_key(&other));
    }

    #[test]
    fn reconciliation_forgets_requested_processes_that_are_gone() {
        let gone = u32::MAX - 13;
        let alive = std::process::id();
        let mut maps = FakeMaps::default();
        maps.procs.insert(gone, proc_state::REQUESTED);
        maps.procs.insert(alive, proc_state::REQUESTED);
        let mut u = engine(maps);
        u.reconcile();
        assert!(
            !u.maps.procs.contains_key(&gone),
            "a gone process cannot fill PROCS"
        );
        assert_eq!(
            u.maps.procs.get(&alive),
            Some(&proc_state::REQUESTED),
            "its load request is on its way"
        );
    }

    #[test]
    fn a_full_mappings_map_leaves_the_process_partly_loaded() {
        let pid = std::process::id();
        let mut u = engine(FakeMaps {
            mapping_capacity: Some(3),
            ..FakeMaps::default()
        });
        u.on_request(pid);
        assert_eq!(u.maps.mappings.len(), 3);
        assert!(
            u.maps.procs.contains_key(&pid),
            "still loaded: its first ranges unwind"
        );
        // What was inserted is what an exit removes.
        u.on_event(ProcEvent {
            kind: proc_event::EXIT,
            tgid: pid,
        });
        assert!(u.maps.mappings.is_empty());
    }
}
