//! Process registry: what each sampled process has mapped, read from /proc.
//!
//! The aggregator owns it. A process is read on its first sample in an interval (mappings
//! change with dlopen, and pids get reused), and again when an address falls outside the known
//! mappings. A process that exited before it could be read is remembered as gone, so its
//! frames become `[unknown]` instead of costing a /proc read per sample.
//!
//! Mapped files are [`ObjectFile`]s, shared by every process that maps the same (device,
//! inode) and parsed once. They are opened through `/proc/<pid>/root` (the process's own mount
//! namespace, so container binaries work) or `/proc/<pid>/map_files` (also for deleted files).
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use foldhash::HashMap;
use tracing::debug;

use crate::{
    labels::{Labeler, Labels, Target},
    limits::{self, Limit},
    procfs::{self, ExecMapping, FileKey, MappingKind, mapped_file_paths},
    rootfs::{self, FilePath},
    symbolize::{
        elf::ElfImage,
        perfmap::{MAX_PERF_MAP_BYTES, PERF_MAPS_BUDGET, PerfMap},
    },
};

/// A file mapped executable by at least one process.
#[derive(Debug)]
pub struct ObjectFile {
    /// Path as the process sees it (without a ` (deleted)` suffix).
    pub path: String,
    pub key: FileKey,
    /// Memory held by the parsed tables (counted against the cache's byte budget).
    pub bytes: u64,
    /// The parsed file, or why it could not be read.
    pub image: Result<ElfImage, String>,
}

impl ObjectFile {
    pub fn build_id(&self) -> Option<&str> {
        self.image.as_ref().ok()?.build_id.as_deref()
    }

    /// ELF virtual address of a file offset (the offset itself when the file is unreadable).
    pub fn vaddr_of_offset(&self, offset: u64) -> u64 {
        self.image
            .as_ref()
            .ok()
            .and_then(|image| image.vaddr_of_offset(offset))
            .unwrap_or(offset)
    }

    /// File name without directories, for synthetic `name+0xoffset` frames.
    pub fn base_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

/// An executable mapping and, once resolved for this read of the process, its parsed file.
#[derive(Debug, Clone)]
struct Mapped {
    mapping: ExecMapping,
    object: Option<Arc<ObjectFile>>,
}

#[derive(Debug)]
struct ProcessEntry {
    comm: Option<String>,
    exe: Option<String>,
    /// Discovered and relabeled labels (`None` until the first read of a live process).
    target: Option<Arc<Target>>,
    /// Executable mappings sorted by start.
    mappings: Vec<Mapped>,
    read_at: Option<Instant>,
    /// Re-reads caused by address misses so far (see [`REREAD_FIRST_AFTER_MISS`]).
    miss_rereads: u32,
    /// Interval generation of the last read.
    read_generation: u64,
    used_generation: u64,
    gone: bool,
}

/// Where a user address landed.
#[derive(Debug, Clone)]
pub enum UserFrame {
    Object {
        object: Arc<ObjectFile>,
        vaddr: u64,
    },
    Special {
        name: Arc<str>,
        offset: u64,
    },
    /// JIT code named by the process's perf map.
    Jit {
        name: Arc<str>,
    },
    /// No mapping holds the address, or the process was gone.
    Unknown,
}

/// Process facts that end up as labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessMeta {
    pub comm: Option<String>,
    pub exe: Option<String>,
    /// Its labels; a process that exited before it was read has only its pid and comm.
    pub target: Arc<Target>,
}

/// Counters of the registry, cumulative.
#[derive(Debug, Clone, Default)]
pub struct RegistryStats {
    pub maps_reads: u64,
    pub maps_read_failures: u64,
    pub objects_loaded: u64,
    pub objects_unreadable: u64,
    pub objects_evicted: u64,
    /// Separate debug files found (.gnu_debuglink or /usr/lib/debug/.build-id).
    pub debug_files: u64,
    /// Files whose DWARF was left unloaded because its parsed size would exceed an eighth of
    /// the byte budget (their frames are named from symbol tables).
    pub dwarf_over_budget: u64,
    /// Files in the symbol cache and the bytes they hold (gauges).
    pub cached_files: u64,
    pub cached_bytes: u64,
    pub perf_map_reads: u64,
    pub perf_map_malformed_lines: u64,
}

/// A process's perf map as last read.
#[derive(Debug, Default)]
struct JitMap {
    map: PerfMap,
    /// File size at the last read; a larger file is read again.
    size: u64,
    checked_at: Option<Instant>,
    /// The pid inside the process's own pid namespace (names its perf map file).
    ns_pid: Option<u32>,
}

/// Minimum time between two re-reads of one process's maps on an address miss, once the
/// process has settled.
const REREAD_AFTER_MISS: Duration = Duration::from_secs(1);
/// The first re-read on a miss may come this soon after the previous read; the wait doubles
/// with each miss re-read up to [`REREAD_AFTER_MISS`]. A process read right after exec (its
/// first sample wakes the daemon) has not mapped its shared libraries yet; a full second
/// would leave a short-lived process's library frames unnamed.
const REREAD_FIRST_AFTER_MISS: Duration = Duration::from_millis(50);
/// Intervals an idle process or file stays cached before eviction.
const IDLE_GENERATIONS: u64 = 2;

pub struct ProcessRegistry {
    procfs_root: PathBuf,
    processes: HashMap<u32, ProcessEntry>,
    objects: HashMap<FileKey, (Arc<ObjectFile>, u64)>,
    /// Perf maps of processes with JIT code, dropped with their process.
    jit: HashMap<u32, JitMap>,
    limits: CacheLimits,
    /// Bytes held by the cached files ([`ElfImage::bytes`]).
    object_bytes: u64,
    generation: u64,
    pub stats: RegistryStats,
    labeler: Labeler,
}

/// Bounds of the parsed-file (symbol) cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Most files kept parsed. 1,024 covers the distinct executables and libraries of a busy
    /// node (typically 200–600).
    pub max_files: usize,
    /// Most bytes of symbols, DWARF and Go tables kept (`--symbol-cache-size`).
    pub max_bytes: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_files: 1024,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

impl Default for ProcessRegistry {
    fn default() -> Self {
        Self::new(PathBuf::from("/proc"), CacheLimits::default())
    }
}

impl ProcessRegistry {
    pub fn new(procfs_root: PathBuf, limits: CacheLimits) -> Self {
        Self {
            procfs_root,
            processes: HashMap::default(),
            objects: HashMap::default(),
            jit: HashMap::default(),
            limits,
            object_bytes: 0,
            generation: 0,
            stats: RegistryStats::default(),
            labeler: Labeler::default(),
        }
    }

    /// Relabels every process with `labeler` from its next read on.
    pub fn with_labeler(mut self, labeler: Labeler) -> Self {
        self.labeler = labeler;
        self
    }

    /// Labels of a process (reading it if it is new). `comm` names a process that exited
    /// before it could be read (the sampled thread's name).
    pub fn meta(&mut self, pid: u32, comm: &str) -> ProcessMeta {
        let target = self.target(pid, comm);
        let entry = self.entry(pid);
        ProcessMeta {
            comm: entry.comm.clone(),
            exe: entry.exe.clone(),
            target,
        }
    }

    /// The labels of a process: read with it, or, for one gone before it could be read,
    /// relabeled from its pid and `comm`.
    pub fn target(&mut self, pid: u32, comm: &str) -> Arc<Target> {
        if let Some(target) = &self.entry(pid).target {
            return Arc::clone(target);
        }
        let mut meta = Labels::new();
        meta.insert("__meta_process_pid".into(), pid.to_string());
        meta.insert("__meta_process_comm".into(), comm.to_owned());
        let target = Arc::new(self.labeler.target(meta));
        self.entry(pid).target = Some(Arc::clone(&target));
        target
    }

    /// Resolves a user-space address of `pid` to a file and ELF virtual address.
    pub fn resolve_user(&mut self, pid: u32, addr: u64) -> UserFrame {
        let mut out = Vec::with_capacity(1);
        self.resolve_user_stack(pid, [addr], &mut out);
        out.pop().unwrap_or(UserFrame::Unknown)
    }

    /// Resolves the user addresses of one sample, appending one frame per address to `out`.
    /// The process is looked up once per sample, not once per frame.
    pub fn resolve_user_stack(
        &mut self,
        pid: u32,
        addrs: impl IntoIterator<Item = u64>,
        out: &mut Vec<UserFrame>,
    ) {
        self.entry(pid);
        let Some(mut entry) = self.processes.remove(&pid) else {
            return;
        };
        for addr in addrs {
            out.push(self.resolve_in(&mut entry, pid, addr));
        }
        self.processes.insert(pid, entry);
    }

    fn resolve_in(&mut self, entry: &mut ProcessEntry, pid: u32, addr: u64) -> UserFrame {
        let mut index = entry.find(addr);
        // A miss may be a new mapping (dlopen, the libraries of a process just exec'd) or a
        // reused pid: re-read, 50 ms after the previous read at first, backing off to once a
        // second per process.
        let wait = REREAD_FIRST_AFTER_MISS
            .saturating_mul(1 << entry.miss_rereads.min(8))
            .min(REREAD_AFTER_MISS);
        if index.is_none() && entry.read_at.is_none_or(|t| t.elapsed() >= wait) {
            let rereads = entry.miss_rereads.saturating_add(1);
            let previous = std::mem::replace(entry, ProcessEntry::gone(self.generation));
            *entry = self.read_entry(pid, Some(previous));
            entry.miss_rereads = rereads;
            entry.used_generation = self.generation;
            index = entry.find(addr);
        }
        let Some(mapping) = index.and_then(|i| entry.mappings.get_mut(i)) else {
            return UserFrame::Unknown;
        };
        let offset_in_mapping = addr.saturating_sub(mapping.mapping.start);
        let file_offset = offset_in_mapping.saturating_add(mapping.mapping.offset);
        let object = match (&mapping.mapping.kind, &mapping.object) {
            (MappingKind::Special(name), _) => {
                if let Some(jit) = self.jit_symbol(pid, addr) {
                    return UserFrame::Jit { name: jit };
                }
                return UserFrame::Special {
                    name: Arc::clone(name),
                    offset: offset_in_mapping,
                };
            }
            (MappingKind::File { .. }, Some(object)) => Arc::clone(object),
            (MappingKind::File { key, path, deleted }, None) => {
                let range = (mapping.mapping.start, mapping.mapping.end);
                let object = self.object(pid, range, *key, path, *deleted);
                mapping.object = Some(Arc::clone(&object));
                object
            }
        };
        let vaddr = object.vaddr_of_offset(file_offset);
        UserFrame::Object { object, vaddr }
    }

    /// Closes an interval: forgets processes and files unused for a while.
    pub fn end_interval(&mut self) {
        self.generation += 1;
        let keep_after = self.generation.saturating_sub(IDLE_GENERATIONS);
        self.processes.retain(|_, p| p.used_generation >= keep_after);
        let processes = &self.processes;
        self.jit.retain(|pid, _| processes.contains_key(pid));
        let idle: Vec<FileKey> = self
            .objects
            .iter()
            .filter(|(_, (object, used))| *used < keep_after && Arc::strong_count(object) == 1)
            .map(|(key, _)| *key)
            .collect();
        self.evict(&idle);
        self.enforce_limits(None);
    }

    /// Evicts least recently used files until the cache is within its limits; `keep` is
    /// spared (the file just loaded).
    fn enforce_limits(&mut self, keep: Option<FileKey>) {
        let limits = self.limits;
        if self.objects.len() <= limits.max_files && self.object_bytes <= limits.max_bytes {
            return;
        }
        let mut by_age: Vec<(u64, FileKey, u64)> = self
            .objects
            .iter()
            .filter(|(key, _)| Some(**key) != keep)
            .map(|(key, (object, used))| (*used, *key, object.bytes))
            .collect();
        by_age.sort_unstable_by_key(|(used, ..)| *used);
        let (mut files, mut bytes) = (self.objects.len(), self.object_bytes);
        let mut victims = Vec::new();
        for (_, key, size) in by_age {
            if files <= limits.max_files && bytes <= limits.max_bytes {
                break;
            }
            victims.push(key);
            files -= 1;
            bytes = bytes.saturating_sub(size);
        }
        self.evict(&victims);
    }

    /// Drops files from the cache and from the processes that remembered them, so their memory
    /// goes as soon as no pending profile needs it.
    fn evict(&mut self, keys: &[FileKey]) {
        if keys.is_empty() {
            return;
        }
        for key in keys {
            if let Some((object, _)) = self.objects.remove(key) {
                self.object_bytes = self.object_bytes.saturating_sub(object.bytes);
                self.stats.objects_evicted += 1;
            }
        }
        for process in self.processes.values_mut() {
            for mapping in &mut process.mappings {
                if mapping.object.as_ref().is_some_and(|o| keys.contains(&o.key)) {
                    mapping.object = None;
                }
            }
        }
        self.stats.cached_files = self.objects.len() as u64;
        self.stats.cached_bytes = self.object_bytes;
    }

    pub fn cached_objects(&self) -> usize {
        self.objects.len()
    }

    fn entry(&mut self, pid: u32) -> &mut ProcessEntry {
        let generation = self.generation;
        let needs_read = self
            .processes
            .get(&pid)
            .is_none_or(|p| p.read_generation < generation);
        if needs_read {
            self.read(pid);
        }
        let entry = self
            .processes
            .entry(pid)
            .or_insert_with(|| ProcessEntry::gone(generation));
        entry.used_generation = generation;
        entry
    }

    fn read(&mut self, pid: u32) {
        let previous = self.processes.remove(&pid);
        let entry = self.read_entry(pid, previous);
        self.processes.insert(pid, entry);
    }

    /// Reads a process from /proc; `previous` is what an earlier read learned.
    fn read_entry(&mut self, pid: u32, previous: Option<ProcessEntry>) -> ProcessEntry {
        self.stats.maps_reads += 1;
        let generation = self.generation;
        match procfs::read_process(&self.procfs_root, pid) {
            Ok(procfs::ProcessView {
                mappings: maps,
                comm,
                exe,
            }) => {
                let meta = self
                    .labeler
                    .discover(&self.procfs_root, pid, comm.as_deref(), exe.as_deref());
                let target = Some(Arc::new(self.labeler.target(meta)));
                // Files already parsed for other processes are attached now, under the identity
                // the read gave them while this process was alive to be stat'ed: a short-lived
                // process is often gone by the time its later samples are resolved.
                let mappings = maps
                    .into_iter()
                    .map(|mapping| {
                        let object = match &mapping.kind {
                            MappingKind::File { key, .. } => self.cached_object(*key),
                            MappingKind::Special(_) => None,
                        };
                        Mapped { mapping, object }
                    })
                    .collect();
                ProcessEntry {
                    comm,
                    exe,
                    target,
                    mappings,
                    read_at: Some(Instant::now()),
                    miss_rereads: 0,
                    read_generation: generation,
                    used_generation: generation,
                    gone: false,
                }
            }
            Err(error) => {
                self.stats.maps_read_failures += 1;
                debug!(pid, %error, "process maps unreadable (exited?)");
                // Keep what an earlier read learned: a process that just exited still has
                // samples in flight whose addresses the old mappings explain.
                match previous {
                    Some(mut old) => {
                        old.gone = true;
                        old.read_at = Some(Instant::now());
                        old.read_generation = generation;
                        old
                    }
                    None => ProcessEntry::gone(generation),
                }
            }
        }
    }

    /// The parsed file behind a mapping if it is already in the cache (never opened).
    fn cached_object(&mut self, key: FileKey) -> Option<Arc<ObjectFile>> {
        let (object, used) = self.objects.get_mut(&key)?;
        *used = self.generation;
        Some(Arc::clone(object))
    }

    /// The parsed file behind a mapping, under the identity [`procfs::read_exec_mappings`]
    /// gave it. The candidate paths are opened as regular files with the mapped inode (a path
    /// that now names another file is skipped); an unreadable file is cached as such.
    fn object(
        &mut self,
        pid: u32,
        range: (u64, u64),
        key: FileKey,
        path: &str,
        deleted: bool,
    ) -> Arc<ObjectFile> {
        if let Some(object) = self.cached_object(key) {
            return object;
        }
        let proc_dir = self.procfs_root.join(pid.to_string());
        let mut last_error = String::from("no path to open");
        for candidate in mapped_file_paths(&proc_dir, path, deleted, range) {
            match ElfImage::open_with(&candidate, Some(key.inode), self.max_dwarf_cost()) {
                Ok(mut image) => {
                    if image.wants_debug_file() {
                        self.attach_debug_file(pid, path, &mut image);
                    }
                    if image.dwarf_over_budget {
                        self.stats.dwarf_over_budget += 1;
                        debug!(
                            pid,
                            path, "DWARF larger than an eighth of the symbol cache: symbol names only"
                        );
                    }
                    return self.insert_object(key, path, Ok(image));
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        self.stats.objects_unreadable += 1;
        debug!(pid, path, error = %last_error, "mapped file unreadable");
        self.insert_object(key, path, Err(last_error))
    }

    /// The perf-map name of a JIT address of `pid`. The map is read through the process's root
    /// (its /tmp) under the pid the process knows itself by, and read again, at most once a
    /// second, when it has grown.
    fn jit_symbol(&mut self, pid: u32, addr: u64) -> Option<Arc<str>> {
        use std::os::unix::fs::MetadataExt as _;
        let proc_dir = self.procfs_root.join(pid.to_string());
        let jit = self.jit.entry(pid).or_default();
        if let Some(name) = jit.map.lookup(addr) {
            return Some(Arc::clone(name));
        }
        if jit.checked_at.is_some_and(|t| t.elapsed() < REREAD_AFTER_MISS) {
            return None;
        }
        jit.checked_at = Some(Instant::now());
        let ns_pid = *jit
            .ns_pid
            .get_or_insert_with(|| procfs::namespace_pid(&proc_dir).unwrap_or(pid));
        let path = FilePath::in_root(
            procfs::root_of(&self.procfs_root, pid),
            format!("/tmp/perf-{ns_pid}.map"),
        );
        let (file, meta) = rootfs::open(&path, None).ok()?;
        if meta.size() != jit.size {
            let path = path.to_string();
            if meta.size() > MAX_PERF_MAP_BYTES as u64 {
                limits::hit(Limit::PerfMapBytes, &path);
            }
            let want = meta.size().min(MAX_PERF_MAP_BYTES as u64);
            // What the other processes' parsed maps hold; this one gets what is left.
            let held: u64 = self
                .jit
                .iter()
                .filter(|(other, _)| **other != pid)
                .map(|(_, j)| j.map.bytes() as u64)
                .sum();
            let jit = self.jit.entry(pid).or_default();
            let Some(room) = PERF_MAPS_BUDGET.checked_sub(held).filter(|room| *room > 0) else {
                limits::hit(Limit::PerfMapBudget, &path);
                return jit.map.lookup(addr).map(Arc::clone);
            };
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(file, want), &mut bytes).ok()?;
            let (map, malformed, cut) =
                PerfMap::parse_bounded(&String::from_utf8_lossy(&bytes), room as usize);
            if cut {
                limits::hit(Limit::PerfMapBudget, &path);
            }
            self.stats.perf_map_reads += 1;
            self.stats.perf_map_malformed_lines += malformed as u64;
            jit.map = map;
            jit.size = meta.size();
        }
        let jit = self.jit.get(&pid)?;
        jit.map.lookup(addr).map(Arc::clone)
    }

    /// Most memory one file's parsed DWARF may take: an eighth of the byte budget, so a few
    /// large files cannot crowd out every other file's names.
    fn max_dwarf_cost(&self) -> u64 {
        self.limits.max_bytes / 8
    }

    /// Looks for the separate debug file of `image` inside the process's mount namespace.
    fn attach_debug_file(&mut self, pid: u32, path: &str, image: &mut ElfImage) {
        let root = procfs::root_of(&self.procfs_root, pid);
        for candidate in image.debug_file_candidates(path) {
            let file = FilePath::in_root(&root, candidate);
            if let Ok(debug) = ElfImage::open_with(&file, None, self.max_dwarf_cost())
                && image.attach_debug_file(debug)
            {
                self.stats.debug_files += 1;
                debug!(pid, path, debug_file = %file, "separate debug file attached");
                return;
            }
        }
    }

    fn insert_object(
        &mut self,
        key: FileKey,
        path: &str,
        image: Result<ElfImage, String>,
    ) -> Arc<ObjectFile> {
        self.stats.objects_loaded += 1;
        let bytes = image.as_ref().map_or(0, ElfImage::bytes);
        let object = Arc::new(ObjectFile {
            path: path.to_owned(),
            key,
            bytes,
            image,
        });
        self.objects.insert(key, (Arc::clone(&object), self.generation));
        self.object_bytes += bytes;
        self.stats.cached_files = self.objects.len() as u64;
        self.stats.cached_bytes = self.object_bytes;
        self.enforce_limits(Some(key));
        object
    }
}

impl ProcessEntry {
    fn gone(generation: u64) -> Self {
        ProcessEntry {
            comm: None,
            exe: None,
            target: None,
            mappings: Vec::new(),
            read_at: Some(Instant::now()),
            miss_rereads: 0,
            read_generation: generation,
            used_generation: generation,
            gone: true,
        }
    }

    fn find(&self, addr: u64) -> Option<usize> {
        let idx = self
            .mappings
            .partition_point(|m| m.mapping.start <= addr)
            .checked_sub(1)?;
        (addr < self.mappings[idx].mapping.end).then_some(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn marker_function() -> u32 {
        std::hint::black_box(11)
    }

    #[test]
    fn resolves_addresses_of_this_process() {
        let mut registry = ProcessRegistry::default();
        let pid = std::process::id();
        let addr = marker_function as *const () as u64;
        assert_eq!(marker_function(), 11);
        let UserFrame::Object { object, vaddr } = registry.resolve_user(pid, addr) else {
            panic!("own code not in a file mapping");
        };
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        assert_eq!(object.path, exe.display().to_string());
        let image = object.image.as_ref().expect("own ELF readable");
        let symbol = image.symbols.lookup(vaddr).expect("symbol");
        assert!(
            crate::symbolize::demangle(symbol).ends_with("marker_function"),
            "{symbol}"
        );
        let meta = registry.meta(pid, "t");
        let labels = meta.target.labels.as_ref().expect("kept");
        assert!(labels.contains_key("service_name"), "{labels:?}");
        assert!(
            meta.exe
                .is_some_and(|e| e.ends_with(exe.file_name().and_then(|n| n.to_str()).expect("name")))
        );
        // Same file again: one parse, shared.
        let again = registry.resolve_user(pid, addr);
        assert!(matches!(again, UserFrame::Object { object: o, .. } if Arc::ptr_eq(&o, &object)));
        assert_eq!(registry.stats.objects_loaded, 1);
    }

    #[test]
    fn exited_process_gives_unknown_frames_without_rereads() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        let mut registry = ProcessRegistry::default();
        assert!(matches!(
            registry.resolve_user(pid, 0x40_1000),
            UserFrame::Unknown
        ));
        assert!(matches!(
            registry.resolve_user(pid, 0x40_2000),
            UserFrame::Unknown
        ));
        assert_eq!(registry.stats.maps_reads, 1, "a gone process is read once");
        let meta = registry.meta(pid, "true");
        assert_eq!((meta.comm, meta.exe), (None, None));
        // Labels from what the sample knew: its pid and thread name.
        assert_eq!(meta.target.get("service_name"), Some("true"));
        assert_eq!(
            meta.target.get("__meta_process_pid"),
            Some(pid.to_string().as_str())
        );
    }

    /// (start, path) of the first executable file mapping of `pid` whose path ends in `suffix`.
    fn exec_mapping(pid: u32, suffix: &str) -> u64 {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
        maps.lines()
            .find(|l| l.split_whitespace().nth(1).is_some_and(|p| p.contains('x')) && l.ends_with(suffix))
            .and_then(|l| l.split('-').next())
            .and_then(|a| u64::from_str_radix(a, 16).ok())
            .expect("exec mapping")
    }

    /// A file rewritten in place keeps its inode; the registry must not reuse what it parsed
    /// from the old contents.
    #[test]
    fn file_rewritten_in_place_is_parsed_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = dir.path().join("app");
        let run = |source: &str| {
            std::fs::write(&app, std::fs::read(source).expect("read binary")).expect("write app");
            let mut perms = std::fs::metadata(&app).expect("meta").permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
            std::fs::set_permissions(&app, perms).expect("chmod");
            // `sleep 30` sleeps; `cat 30` would exit at once, so both also get a blocking stdin
            // and `cat` reads it.
            let arg = if source.ends_with("sleep") { "30" } else { "-" };
            std::process::Command::new(&app)
                .arg(arg)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("spawn app")
        };
        let mut registry = ProcessRegistry::default();
        let mut first = run("/bin/sleep");
        std::thread::sleep(Duration::from_millis(100));
        let addr = exec_mapping(first.id(), "/app");
        let UserFrame::Object { object: a, .. } = registry.resolve_user(first.id(), addr) else {
            panic!("first app not resolved");
        };
        first.kill().expect("kill");
        first.wait().expect("wait");

        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&app).expect("meta"));
        let mut second = run("/bin/cat");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&app).expect("meta")),
            inode
        );
        let addr = exec_mapping(second.id(), "/app");
        let resolved = registry.resolve_user(second.id(), addr);
        second.kill().expect("kill");
        second.wait().expect("wait");
        let UserFrame::Object { object: b, .. } = resolved else {
            panic!("second app not resolved");
        };
        assert!(!Arc::ptr_eq(&a, &b), "same inode, new contents: parsed again");
        assert_ne!(a.build_id(), b.build_id());
    }

    #[test]
    fn byte_budget_evicts_least_recently_used_files() {
        let mut children: Vec<std::process::Child> = ["/bin/sleep", "/bin/cat"]
            .iter()
            .map(|bin| {
                std::process::Command::new(bin)
                    .arg(if bin.ends_with("sleep") { "30" } else { "-" })
                    .stdin(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn")
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        // Room for about one of the two binaries' tables.
        let limits = CacheLimits {
            max_files: 1024,
            max_bytes: 1,
        };
        let mut registry = ProcessRegistry::new(PathBuf::from("/proc"), limits);
        for (child, name) in children.iter().zip(["/sleep", "/cat"]) {
            let addr = exec_mapping(child.id(), name);
            let _ = registry.resolve_user(child.id(), addr);
        }
        for child in &mut children {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert_eq!(
            registry.cached_objects(),
            1,
            "over budget, only the newest file stays"
        );
        assert_eq!(registry.stats.objects_evicted, 1);
        assert_eq!(registry.stats.cached_files, 1);
        assert!(registry.stats.cached_bytes > 0);
    }

    #[test]
    fn idle_entries_are_evicted() {
        let mut registry = ProcessRegistry::new(PathBuf::from("/proc"), CacheLimits::default());
        let pid = std::process::id();
        let _ = registry.resolve_user(pid, marker_function as *const () as u64);
        assert_eq!(registry.cached_objects(), 1);
        for _ in 0..=IDLE_GENERATIONS + 1 {
            registry.end_interval();
        }
        assert_eq!(registry.cached_objects(), 0);
        assert_eq!(registry.stats.objects_evicted, 1);
    }
}
