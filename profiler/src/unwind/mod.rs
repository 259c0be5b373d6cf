//! The unwind stage: keeps the BPF unwinder's view of every sampled process current.
//!
//! For each process it reads /proc/<pid>/maps, compiles the unwind table of every executable
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
//! It runs on its own thread. Requests come over a bounded channel; when it is full the sampler
//! drops the request and counts it (the next sample of that process asks again).
pub mod store;
pub mod table;

use std::{
    hash::{Hash as _, Hasher as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TryRecvError, TrySendError},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, LpmTrie, MapData, RingBuf, lpm_trie::Key};
use foldhash::{HashMap, HashSet};
use object::{Object as _, ObjectSegment as _, ReadCache};

use crate::symbolize::elf::WindowedFile;
use procfs::process::{MMPermissions, MMapPath, Process};
use profiler_common::{
    MAPPING_PID_PREFIX, Mapping, MappingKey, ProcEvent, mapping, mapping_key, proc_event, proc_state,
};
use tracing::{debug, info, warn};

use self::{
    store::{RowStore, StoreError},
    table::{Table, TableError},
};
use crate::{
    process::{FileKey, mapped_file_paths},
    symbolize::elf::open_regular,
};

/// Requests waiting for the stage; more are dropped (and counted) by the sender.
pub const REQUEST_QUEUE: usize = 1024;
/// How often every loaded process is re-read.
const RECONCILE_EVERY: Duration = Duration::from_secs(10);
/// After a process is loaded because of its first sample or an exec, its mappings are read
/// again this long after: a program that has just started is still mapping its shared
/// libraries (the dynamic loader runs after exec), and samples in them would otherwise find
/// no mapping until the sampler asks.
const RECHECK_AFTER: [Duration; 2] = [Duration::from_millis(50), Duration::from_millis(300)];
/// Re-checks waiting at most; more are not scheduled (the sampler's requests still apply).
const MAX_RECHECKS: usize = 4096;
/// Longest sleep of the stage between reconciliation checks: the event ring and the request
/// doorbell wake it earlier.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// The same without a doorbell (no eventfd): requests are then picked up at this pace.
const POLL_EVERY_WITHOUT_DOORBELL: Duration = Duration::from_millis(100);
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

/// An eventfd the sampler rings with each request, so the stage can sleep on it and on the
/// event ring at once instead of waking on a timer.
struct Doorbell(OwnedFd);

impl Doorbell {
    fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd; a full counter (EAGAIN) still
        // leaves it readable, which is all a ring needs.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    fn clear(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN when nothing rang.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut count).cast(), 8) };
    }
}

/// The sampler's side of the request channel.
#[derive(Clone)]
pub struct Requests {
    /// `None` only while being dropped.
    tx: Option<SyncSender<u32>>,
    stats: Arc<UnwindStats>,
    doorbell: Option<Arc<Doorbell>>,
}

/// The stage's side of the request channel.
pub struct RequestQueue {
    rx: Receiver<u32>,
    doorbell: Option<Arc<Doorbell>>,
}

/// A bounded request channel ([`REQUEST_QUEUE`]) whose sends wake the stage.
pub fn request_queue(stats: Arc<UnwindStats>) -> (Requests, RequestQueue) {
    let (tx, rx) = std::sync::mpsc::sync_channel(REQUEST_QUEUE);
    let doorbell = match Doorbell::new() {
        Ok(doorbell) => Some(Arc::new(doorbell)),
        Err(error) => {
            warn!(%error, "no eventfd: the unwind stage polls for requests every 100 ms");
            None
        }
    };
    (
        Requests {
            tx: Some(tx),
            stats,
            doorbell: doorbell.clone(),
        },
        RequestQueue { rx, doorbell },
    )
}

impl Requests {
    /// Asks the stage to (re)load `tgid`; never blocks.
    pub fn load(&self, tgid: u32) {
        let Some(tx) = &self.tx else {
            return;
        };
        match tx.try_send(tgid) {
            Ok(()) => {
                if let Some(doorbell) = &self.doorbell {
                    doorbell.ring();
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.stats.requests_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Requests {
    /// The last sender going away ends the stage; wake it so it notices now (after this
    /// sender is gone, so the stage sees the channel closed).
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(doorbell) = &self.doorbell {
            doorbell.ring();
        }
    }
}

/// The BPF maps the stage owns.
pub struct UnwindMaps {
    /// `UNWIND_ROWS`: slot → a file's rows (an array of maps).
    pub rows: MapData,
    /// The unwind-table budget in rows.
    pub capacity: u32,
    pub files: BpfHashMap<MapData, u64, profiler_common::FileTable>,
    pub mappings: LpmTrie<MapData, MappingKey, Mapping>,
    pub procs: BpfHashMap<MapData, u32, u32>,
    pub events: RingBuf<MapData>,
    pub generation: aya::maps::Array<MapData, u64>,
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

pub struct Unwinder {
    store: RowStore,
    mappings: LpmTrie<MapData, MappingKey, Mapping>,
    procs: BpfHashMap<MapData, u32, u32>,
    events: RingBuf<MapData>,
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

impl Unwinder {
    pub fn new(maps: UnwindMaps, proc_root: PathBuf, stats: Arc<UnwindStats>) -> Result<Self, UnwindError> {
        let store = RowStore::new(maps.rows, maps.capacity, maps.files, maps.generation)?;
        stats
            .rows_capacity
            .store(u64::from(maps.capacity), Ordering::Relaxed);
        let (vdso, vdso_table) = match own_vdso() {
            Some((info, table)) => (Some(info), Some(table)),
            None => (None, None),
        };
        Ok(Unwinder {
            store,
            mappings: maps.mappings,
            procs: maps.procs,
            events: maps.events,
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
        })
    }

    /// Loads `pids`, or, when empty, the processes with a running thread (before sampling
    /// starts, so their first samples already unwind). The others are loaded on their first
    /// sample.
    pub fn load_initial(&mut self, pids: &[u32]) {
        let started = Instant::now();
        let running: Vec<u32>;
        let pids = if pids.is_empty() {
            running = running_processes(&self.proc_root);
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

    /// The stage loop: until the request channel closes. It sleeps on the event ring, which
    /// the sampling program wakes for every load request.
    pub fn run(mut self, requests: RequestQueue) {
        let mut last_reconcile = Instant::now();
        let doorbell = requests.doorbell.as_deref();
        let timeout = match doorbell {
            Some(_) => POLL_EVERY,
            None => POLL_EVERY_WITHOUT_DOORBELL,
        };
        loop {
            let next_recheck = self
                .rechecks
                .peek()
                .map(|r| r.0.0.saturating_duration_since(Instant::now()));
            self.wait_for_events(doorbell, next_recheck.map_or(timeout, |d| d.min(timeout)));
            if let Some(doorbell) = doorbell {
                doorbell.clear();
            }
            self.drain_events();
            self.run_due_rechecks();
            loop {
                match requests.rx.try_recv() {
                    Ok(pid) => self.on_request(pid),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            if last_reconcile.elapsed() >= RECONCILE_EVERY {
                self.reconcile();
                last_reconcile = Instant::now();
            }
        }
    }

    /// A request from the sampler (a sample outside the loaded mappings, or of a process not
    /// loaded): a loaded process is reloaded only if its executable mappings changed.
    fn on_request(&mut self, pid: u32) {
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

    fn run_due_rechecks(&mut self) {
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
        !self.proc_root.join(pid.to_string()).exists()
    }

    fn reload_if_changed(&mut self, pid: u32) {
        let signature = self.processes.get(&pid).map(|p| p.signature);
        match read_exec_mappings(&self.proc_root, pid) {
            Ok(maps) if Some(signature_of(&maps)) == signature => {}
            Ok(_) => self.load(pid),
            Err(_) => self.unload(pid),
        }
    }

    /// Sleeps until the event ring has data, the doorbell rang, or `timeout`.
    fn wait_for_events(&self, doorbell: Option<&Doorbell>, timeout: Duration) {
        let watch = |fd: i32| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [
            watch(self.events.as_raw_fd()),
            // A negative fd is skipped by poll.
            watch(doorbell.map_or(-1, |d| d.0.as_raw_fd())),
        ];
        // SAFETY: valid pollfds for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout.as_millis() as libc::c_int) };
        if ready < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // A broken fd: do not spin.
            std::thread::sleep(timeout);
        }
    }

    fn drain_events(&mut self) {
        let mut events = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() >= size_of::<ProcEvent>() {
                // SAFETY: the record holds a ProcEvent (two u32); read_unaligned copies it.
                events.push(unsafe { item.as_ptr().cast::<ProcEvent>().read_unaligned() });
            }
        }
        for event in events {
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
    }

    /// Re-reads every loaded process: gone ones are dropped, changed ones reloaded. Also drops
    /// `PROCS` entries of processes that were requested but never loaded and are gone (their
    /// exit came before their load, or an event was lost), so they cannot fill the map.
    fn reconcile(&mut self) {
        let unloaded: Vec<u32> = self
            .procs
            .keys()
            .filter_map(Result::ok)
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
        let _ = self.procs.remove(&pid);
        let Some(process) = self.processes.remove(&pid) else {
            return;
        };
        for key in &process.keys {
            let _ = self.mappings.remove(key);
        }
        for id in process.files {
            self.store.add_user(id, -1);
        }
        self.publish();
    }

    /// (Re)loads one process. Failures are logged and leave the process on the kernel's
    /// frame-pointer walk. A process that was never loaded and still exists keeps its
    /// `REQUESTED` entry, so its samples do not ask again (the sampler's requests retry); one
    /// that is gone loses it.
    fn load(&mut self, pid: u32) {
        let maps = match read_exec_mappings(&self.proc_root, pid) {
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
            let value = match &m.target {
                Target::File { key, path, deleted } => {
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
                Target::Vdso => match &self.vdso {
                    Some(vdso) => {
                        if !self.store.contains(vdso.id)
                            && let Some(table) = &self.vdso_table
                            && let Err(error) = self.store.insert(vdso.id, table)
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
                Target::Anonymous => fp_mapping(m),
            };
            for (prefix, start) in prefixes(m.start, m.end) {
                entries.push((
                    Key::new(MAPPING_PID_PREFIX + prefix, mapping_key(pid, start)),
                    value,
                ));
            }
        }
        // The process's new tables first, so no mapping names a file BPF cannot find yet.
        self.store.commit();
        for (key, value) in &entries {
            match self.mappings.insert(key, value, 0) {
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
                let _ = self.mappings.remove(key);
            }
        }
        for &id in &files {
            self.store.add_user(id, 1);
        }
        for &id in &old.files {
            self.store.add_user(id, -1);
        }
        // A new value for every load: walks cached this pid's mappings under the old one.
        self.loads = self.loads.wrapping_add(1);
        if let Err(error) = self.procs.insert(pid, proc_state::loaded(self.loads), 0) {
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
            if matches!(info.kind, FileKind::Table) && !self.store.contains(info.id) {
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

    fn build(&mut self, pid: u32, candidate: &Path, key: FileKey, path: &str) -> Result<FileInfo, String> {
        let (file, meta) = open_regular(candidate, Some(key.inode)).map_err(|e| e.to_string())?;
        let cache = WindowedFile::cache(file, meta.len());
        let elf = object::File::parse(&cache).map_err(|e| format!("{}: {e}", candidate.display()))?;
        let segments = load_segments(&elf);
        let id = file_id(&elf, &cache, key);
        let mut info = FileInfo {
            id,
            kind: FileKind::Table,
            segments,
            used: self.clock,
        };
        if self.store.contains(id) {
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
                if let Err(error) = self.store.insert(id, &table) {
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
        let build_id = crate::symbolize::elf::hex(elf.build_id().ok()??);
        if build_id.len() < 3 {
            return None;
        }
        let path = self
            .proc_root
            .join(pid.to_string())
            .join("root/usr/lib/debug/.build-id")
            .join(&build_id[..2])
            .join(format!("{}.debug", &build_id[2..]));
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
        let s = self.store.stats();
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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    File {
        key: FileKey,
        path: String,
        deleted: bool,
    },
    Vdso,
    Anonymous,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ExecMapping {
    start: u64,
    end: u64,
    offset: u64,
    target: Target,
}

fn read_exec_mappings(proc_root: &Path, pid: u32) -> Result<Vec<ExecMapping>, procfs::ProcError> {
    use std::os::unix::fs::MetadataExt as _;
    let process = Process::new_with_root(proc_root.join(pid.to_string()))?;
    let maps = process.maps()?;
    let mut out = Vec::new();
    for m in maps {
        if !m.perms.contains(MMPermissions::EXECUTE) {
            continue;
        }
        let target = match m.pathname {
            MMapPath::Path(path) => {
                let text = path.display().to_string();
                let (path, deleted) = match text.strip_suffix(" (deleted)") {
                    Some(p) => (p.to_owned(), true),
                    None => (text, false),
                };
                // Size and mtime make the identity robust against inode reuse; a file that is
                // gone keeps zeros (it is then read through map_files).
                let meta = std::fs::metadata(
                    proc_root
                        .join(pid.to_string())
                        .join("root")
                        .join(path.trim_start_matches('/')),
                )
                .ok()
                .filter(|meta| meta.ino() == m.inode);
                let key = match meta {
                    Some(meta) => FileKey::of(m.dev, m.inode, &meta),
                    None => FileKey {
                        dev: m.dev,
                        inode: m.inode,
                        size: 0,
                        mtime_ns: 0,
                    },
                };
                Target::File { key, path, deleted }
            }
            MMapPath::Vdso => Target::Vdso,
            MMapPath::Vsyscall => continue,
            _ => Target::Anonymous,
        };
        out.push(ExecMapping {
            start: m.address.0,
            end: m.address.1,
            offset: m.offset,
            target,
        });
    }
    Ok(out)
}

/// Processes with at least one thread running or runnable (state `R`): the daemon always, as
/// it is running while it looks.
fn running_processes(proc_root: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    // The daemon is kept: built with frame pointers it costs no table of its own (see
    // [`own_frame_pointer_file`]), and its first samples then walk as fully as later ones.
    let pids = dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok());
    pids.filter(|pid| {
        let tasks = proc_root.join(pid.to_string()).join("task");
        let Ok(tasks) = std::fs::read_dir(tasks) else {
            return false;
        };
        tasks.flatten().any(|task| {
            std::fs::read(task.path().join("stat"))
                .ok()
                .and_then(|stat| stat_state(&stat))
                == Some(b'R')
        })
    })
    .collect()
}

/// The state letter of a /proc/<pid>/stat line: the first field after the `)` that ends the
/// command name (which may itself hold spaces and parentheses).
fn stat_state(stat: &[u8]) -> Option<u8> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    stat.get(close + 2).copied()
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

/// A file's id: its build id, else a hash of its first and last 4 KiB and its length.
fn file_id<'a, R: object::ReadRef<'a>>(elf: &object::File<'a, R>, data: R, key: FileKey) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    if let Ok(Some(build_id)) = elf.build_id() {
        "build-id".hash(&mut hasher);
        build_id.hash(&mut hasher);
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
    let (file, meta) = open_regular(Path::new("/proc/self/exe"), None).ok()?;
    // The key only counts for a file whose id cannot come from its contents (an empty one).
    let key = FileKey::of((0, 0), std::os::unix::fs::MetadataExt::ino(&meta), &meta);
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
    fn stat_state_skips_odd_command_names() {
        assert_eq!(stat_state(b"42 (burn) R 1 42 42 0 -1"), Some(b'R'));
        assert_eq!(stat_state(b"7 (a) b (c)) S 1 7 7"), Some(b'S'));
        assert_eq!(stat_state(b"9 (x y) D 1"), Some(b'D'));
        assert_eq!(stat_state(b"9 (truncated"), None);
        assert_eq!(stat_state(b"9 (x)"), None);
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
}
