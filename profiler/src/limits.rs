//! The bounds a hostile file or process can run into, counted by name.
//!
//! Every parser of what a process hands the daemon (ELF, DWARF, `.gopclntab`, CFI, perf maps,
//! mappings) stops at a fixed bound instead of growing with its input. When one is hit, the
//! input is skipped or cut short (its frames stay visible as `module+0xoffset`), the hit is
//! counted here under the bound's name (`profiler_limit_hits_total{limit}` in /metrics) and
//! logged once per file. docs/reliability.md lists each bound with its number.
use std::{
    collections::HashSet,
    hash::{Hash, Hasher as _},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// A bound on what one input may make the daemon do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// DIEs nested deeper than [`MAX_DIE_DEPTH`] in `.debug_info`: the file's DWARF is not used.
    DwarfDepth,
    /// Unwind rows of one file (CFI rows and `.gopclntab` frame ranges) past the per-file
    /// bound, counted while compiling, before anything is stored: no table from it.
    TableRows,
    /// A perf map larger than the per-file bound: read up to it.
    PerfMapBytes,
    /// Perf maps of all processes together past their shared byte budget (parsed form): the
    /// map is parsed only up to what is left, or not at all.
    PerfMapBudget,
    /// Symbols of one file past the per-file count: the rest are not named from the table.
    SymbolCount,
    /// A function name longer than [`MAX_NAME_BYTES`]: cut there.
    NameLength,
    /// Executable mappings of one process past the per-process quota in the node-wide map.
    ProcessMappings,
    /// A pod's label or annotation value past [`MAX_META_VALUE_BYTES`], or its labels and
    /// annotations together past [`MAX_POD_META_BYTES`]: the rest are not discovered.
    PodMetadata,
}

impl Limit {
    pub const ALL: [Limit; 8] = [
        Limit::DwarfDepth,
        Limit::TableRows,
        Limit::PerfMapBytes,
        Limit::PerfMapBudget,
        Limit::SymbolCount,
        Limit::NameLength,
        Limit::ProcessMappings,
        Limit::PodMetadata,
    ];

    /// The `limit` label in /metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::DwarfDepth => "dwarf_depth",
            Limit::TableRows => "table_rows",
            Limit::PerfMapBytes => "perf_map_bytes",
            Limit::PerfMapBudget => "perf_map_budget",
            Limit::SymbolCount => "symbol_count",
            Limit::NameLength => "name_length",
            Limit::ProcessMappings => "process_mappings",
            Limit::PodMetadata => "pod_metadata",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Limit::DwarfDepth => "DWARF nested too deep: its DWARF is not used",
            Limit::TableRows => "unwind rows past the per-file bound: no unwind table from it",
            Limit::PerfMapBytes => "perf map larger than the per-file bound: read up to it",
            Limit::PerfMapBudget => "perf maps over their shared budget: read only up to it",
            Limit::SymbolCount => "more symbols than the per-file bound: the rest are unnamed",
            Limit::NameLength => "a function name past the length bound: cut",
            Limit::ProcessMappings => {
                "more executable mappings than one process may load: the rest unwind with frame pointers"
            }
            Limit::PodMetadata => {
                "pod labels or annotations past their bound: those are not discovered (the *present label stays)"
            }
        }
    }
}

/// Deepest DIE nesting read in `.debug_info`. Compilers stay far below it (a deep C++
/// template inline chain is ~100); addr2line recurses once per level, so without it ~10,000
/// levels overflow the reporter's stack.
pub const MAX_DIE_DEPTH: usize = 256;

/// Longest function name kept, in bytes; longer ones are cut (at a character boundary).
pub const MAX_NAME_BYTES: usize = 4096;

/// Longest pod label or annotation value discovered (`__meta_kubernetes_pod_annotation_*`);
/// a longer one (`kubectl.kubernetes.io/last-applied-configuration`, say) is left out, its
/// `*present_*` label kept. Every process of the pod carries its discovered labels.
pub const MAX_META_VALUE_BYTES: usize = 4096;

/// Most bytes (names and values) of one pod's labels and annotations discovered, in name
/// order; Kubernetes allows 256 KiB of annotations, which a node's thousand processes would
/// otherwise each copy.
pub const MAX_POD_META_BYTES: usize = 16 << 10;

/// Hits per limit since start, and which (limit, file) pairs were logged.
pub struct Hits {
    counts: [AtomicU64; Limit::ALL.len()],
    logged: LogOnce,
}

impl Hits {
    const fn new() -> Self {
        Self {
            counts: [const { AtomicU64::new(0) }; Limit::ALL.len()],
            logged: LogOnce::new(),
        }
    }

    pub fn count(&self, limit: Limit) -> u64 {
        self.counts[limit as usize].load(Ordering::Relaxed)
    }
}

/// Every limit hit in this process.
pub static HITS: Hits = Hits::new();

/// Counts a hit of `limit` by `subject` (a file's path, a process) and logs it once for each.
pub fn hit(limit: Limit, subject: &str) {
    HITS.counts[limit as usize].fetch_add(1, Ordering::Relaxed);
    if HITS.logged.first(&(limit, subject)) {
        tracing::warn!(subject, limit = limit.as_str(), "{}", limit.what());
    }
}

/// Remembers what was logged, so each file is logged once and not once per sample; bounded
/// (past [`LogOnce::MAX`] keys it starts again).
pub struct LogOnce {
    seen: Mutex<Option<HashSet<u64>>>,
}

impl LogOnce {
    const MAX: usize = 4096;

    pub const fn new() -> Self {
        Self {
            seen: Mutex::new(None),
        }
    }

    /// Whether `key` is new (then it is remembered).
    pub fn first(&self, key: &impl Hash) -> bool {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let set = seen.get_or_insert_with(HashSet::new);
        if set.len() >= Self::MAX {
            set.clear();
        }
        set.insert(hasher.finish())
    }
}

impl Default for LogOnce {
    fn default() -> Self {
        Self::new()
    }
}

/// `name` cut to at most [`MAX_NAME_BYTES`] at a character boundary, counting the cut.
pub fn cap_name<'a>(name: &'a str, subject: &str) -> &'a str {
    if name.len() <= MAX_NAME_BYTES {
        return name;
    }
    hit(Limit::NameLength, subject);
    let mut end = MAX_NAME_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_are_counted_and_logged_once_per_subject() {
        let before = HITS.count(Limit::DwarfDepth);
        hit(Limit::DwarfDepth, "/a");
        hit(Limit::DwarfDepth, "/a");
        assert_eq!(HITS.count(Limit::DwarfDepth), before + 2);
        let once = LogOnce::new();
        assert!(once.first(&"x"));
        assert!(!once.first(&"x"));
        assert!(once.first(&"y"));
    }

    #[test]
    fn long_names_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_NAME_BYTES);
        let cut = cap_name(&long, "/bin/x");
        assert!(cut.len() <= MAX_NAME_BYTES && cut.len() >= MAX_NAME_BYTES - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(cap_name("main", "/bin/x"), "main");
    }
}
