//! The memory budget: every bound on what the daemon holds, added up.
//!
//! Each part is the most one owner can hold, in user memory or in the kernel's BPF maps (both
//! are charged to the daemon's memory cgroup). The parts come from the same constants and
//! settings the owners enforce, so the sum is what a hostile node can make the daemon use, not
//! a typical figure. What grows with the node rather than with any one input (the open
//! interval's distinct stacks, on-demand taps, each sampled process's labels) is not a part:
//! it lives in the headroom between the sum and the memory limit. /metrics shows each part
//! (`profiler_memory_budget_bytes{part,memory}`) beside the cgroup's limit
//! (`profiler_memory_limit_bytes`), and the daemon warns at start when the sum does not fit.
use std::path::Path;

use profiler_common::{
    COUNTER_SLOTS, FileTable, KsymBatch, MAX_MAPPINGS, MAX_PROCS, MAX_TARGET_CGROUPS, MAX_TARGET_PIDS,
    MAX_UNWIND_FILES, PROC_EVENTS_RING_BYTES, RawSample, UnwindState, samples_ring_bytes,
};

use crate::{
    symbolize::{NAME_CACHE_GENERATION_BYTES, perfmap},
    telemetry::{Collect, Exposition, Kind},
    unwind::table::{MAX_FILE_ROWS, MAX_ROW_BYTES_WHILE_COMPILING},
};

/// The daemon's code, runtime, thread stacks and allocator slack: twice the 16.6 MiB resident
/// set of an idle `profiler run` on 2 CPUs (docs/reliability.md).
pub const RUNTIME_BYTES: u64 = 32 << 20;

/// Bytes one `MAPPINGS` entry can cost the kernel: a leaf node (child pointers, prefix length
/// and flags, the 12-byte key and the 40-byte value: 76 bytes, in the 96-byte size class) and
/// at most one intermediate node of the same class.
pub const MAPPING_ENTRY_BYTES: u64 = 2 * 96;

/// What the unwind stage keeps per `MAPPINGS` entry it inserted: the key (prefix length and
/// the 12-byte data), in a vector and, while a process reloads, a set.
const UNWIND_KEY_BYTES: u64 = 16 + 32;

/// Per-element header of a preallocated BPF hash map (`struct htab_elem`), about.
const HASH_ELEMENT_BYTES: u64 = 48;

/// Where a part's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    User,
    /// BPF maps: kernel memory charged to the daemon's cgroup.
    Kernel,
}

impl Memory {
    fn as_str(self) -> &'static str {
        match self {
            Memory::User => "user",
            Memory::Kernel => "kernel",
        }
    }
}

/// One bound of the budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The `part` label in /metrics.
    pub name: &'static str,
    pub memory: Memory,
    pub bytes: u64,
}

/// What the budget is computed from: the settings that size its parts, and the machine.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    /// `--symbol-cache-size`.
    pub symbol_cache_bytes: u64,
    /// `--unwind-table-size` in rows (0 with the frame-pointer unwinder: no tables, no
    /// mappings).
    pub unwind_rows: u32,
    pub frequency_hz: u32,
    /// Possible CPUs (per-CPU maps and the ring buffer are sized by them).
    pub cpus: u32,
}

/// Every part of the budget for `sizing`.
pub fn parts(sizing: &Sizing) -> Vec<Part> {
    let user = |name, bytes: u64| Part {
        name,
        memory: Memory::User,
        bytes,
    };
    let kernel = |name, bytes: u64| Part {
        name,
        memory: Memory::Kernel,
        bytes,
    };
    let tables = sizing.unwind_rows > 0;
    let cpus = u64::from(sizing.cpus.max(1));
    let hash = |entries: u32, key: usize, value: usize| {
        u64::from(entries) * (HASH_ELEMENT_BYTES + round8(key) + round8(value))
    };
    let per_cpu = |value: usize| cpus * round8(value);
    let other_maps = hash(MAX_PROCS, 4, 4)
        + hash(MAX_TARGET_PIDS, 4, 1)
        + hash(MAX_TARGET_CGROUPS, 8, 1)
        + if tables {
            hash(MAX_UNWIND_FILES, 8, size_of::<FileTable>())
        } else {
            0
        }
        + per_cpu(size_of::<RawSample>())
        + per_cpu(size_of::<UnwindState>())
        + per_cpu(8) * u64::from(COUNTER_SLOTS + 1)
        + size_of::<KsymBatch>() as u64
        + u64::from(PROC_EVENTS_RING_BYTES);
    let mut parts = vec![
        user("runtime", RUNTIME_BYTES),
        user("symbol_cache", sizing.symbol_cache_bytes),
        user("name_cache", 2 * NAME_CACHE_GENERATION_BYTES as u64),
        // The parsed maps, and the text of the one being parsed.
        user(
            "perf_maps",
            perfmap::PERF_MAPS_BUDGET + perfmap::MAX_PERF_MAP_BYTES as u64,
        ),
        user("sample_queue", super::sampler::MAX_QUEUED_BYTES as u64),
        kernel(
            "samples_ring",
            u64::from(samples_ring_bytes(sizing.cpus.max(1), sizing.frequency_hz)),
        ),
        kernel("other_maps", other_maps),
    ];
    if tables {
        parts.extend([
            // One file's table while it compiles (rows are compiled one file at a time).
            user(
                "unwind_compile",
                (MAX_FILE_ROWS * MAX_ROW_BYTES_WHILE_COMPILING) as u64,
            ),
            kernel("unwind_tables", u64::from(sizing.unwind_rows) * 8),
            kernel("unwind_mappings", u64::from(MAX_MAPPINGS) * MAPPING_ENTRY_BYTES),
            // The unwind stage's record of which keys each process holds.
            user("unwind_keys", u64::from(MAX_MAPPINGS) * UNWIND_KEY_BYTES),
        ]);
    }
    parts
}

fn round8(n: usize) -> u64 {
    (n as u64).div_ceil(8) * 8
}

/// The sum of `parts`.
pub fn total(parts: &[Part]) -> u64 {
    parts.iter().map(|p| p.bytes).sum()
}

/// The memory limit of the cgroup this process is in: cgroup v2's `memory.max`, else v1's
/// `memory.limit_in_bytes`; `None` when there is none (or it cannot be read).
pub fn cgroup_limit(proc_self_cgroup: &str, cgroup_root: &Path) -> Option<u64> {
    let mut v2 = None;
    let mut v1 = None;
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            v2 = Some(cgroup_root.join(path).join("memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(
                cgroup_root
                    .join("memory")
                    .join(path)
                    .join("memory.limit_in_bytes"),
            );
        }
    }
    let read = |file: Option<std::path::PathBuf>| -> Option<u64> {
        let text = std::fs::read_to_string(file?).ok()?;
        let limit: u64 = text.trim().parse().ok()?;
        // v1 writes "no limit" as a huge page-aligned number.
        (limit < 1 << 60).then_some(limit)
    };
    read(v1).or_else(|| read(v2))
}

/// The budget and the limit, for /metrics.
pub struct Budget {
    pub parts: Vec<Part>,
    pub limit: Option<u64>,
}

impl Collect for Budget {
    fn collect(&self, out: &mut Exposition) {
        {
            let mut family = out.family(
                "profiler_memory_budget_bytes",
                Kind::Gauge,
                "The most each owner can hold (docs/architecture.md, bounds): user memory, or BPF map memory charged to the daemon's cgroup.",
            );
            for part in &self.parts {
                family.sample(
                    &[("part", part.name), ("memory", part.memory.as_str())],
                    part.bytes as f64,
                );
            }
        }
        out.family(
            "profiler_memory_budget_total_bytes",
            Kind::Gauge,
            "The sum of the memory budget's parts.",
        )
        .sample(&[], total(&self.parts) as f64);
        if let Some(limit) = self.limit {
            out.family(
                "profiler_memory_limit_bytes",
                Kind::Gauge,
                "The memory limit of the daemon's cgroup.",
            )
            .sample(&[], limit as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DaemonSet's flags and memory limit, read from the manifest we ship.
    fn daemonset() -> (Sizing, u64) {
        let manifest = include_str!("../../../deploy/base/daemonset.yaml");
        let flag = |name: &str| {
            let value = manifest
                .lines()
                .find_map(|l| l.trim().strip_prefix(&format!("- --{name}=")))
                .unwrap_or_else(|| panic!("--{name} in the DaemonSet"));
            crate::units::parse_bytes(value).expect("a size")
        };
        let limit = manifest
            .split("limits:")
            .nth(1)
            .and_then(|l| l.lines().find_map(|l| l.trim().strip_prefix("memory: ")))
            .and_then(|v| v.strip_suffix("Mi"))
            .and_then(|v| v.parse::<u64>().ok())
            .expect("limits.memory in Mi");
        let frequency = manifest
            .lines()
            .find_map(|l| l.trim().strip_prefix("- --frequency="))
            .and_then(|v| v.parse().ok())
            .expect("--frequency");
        let sizing = Sizing {
            symbol_cache_bytes: flag("symbol-cache-size"),
            unwind_rows: (flag("unwind-table-size") / 8) as u32,
            frequency_hz: frequency,
            // A large node: the ring and per-CPU maps grow with CPUs.
            cpus: 128,
        };
        (sizing, limit << 20)
    }

    /// What grows with the node rather than with one input (the open interval's distinct
    /// stacks, taps, each process's labels) lives in the headroom.
    #[test]
    fn the_daemonsets_budget_fits_its_memory_limit_with_headroom() {
        let (sizing, limit) = daemonset();
        let parts = parts(&sizing);
        let sum = total(&parts);
        let table: Vec<String> = parts
            .iter()
            .map(|p| format!("{} {} MiB", p.name, p.bytes >> 20))
            .collect();
        assert!(
            sum <= limit / 10 * 9 && limit - sum >= 32 << 20,
            "budget {} MiB of a {} MiB limit: {table:?}",
            sum >> 20,
            limit >> 20
        );
        // No single part may take more than a third of the limit.
        assert!(parts.iter().all(|p| p.bytes <= limit / 3), "{table:?}");
    }

    #[test]
    fn the_cgroup_limit_is_read_from_v2_or_v1() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v2 = dir.path().join("kubepods/pod1/c1");
        std::fs::create_dir_all(&v2).expect("dir");
        std::fs::write(v2.join("memory.max"), "402653184\n").expect("write");
        assert_eq!(
            cgroup_limit("0::/kubepods/pod1/c1\n", dir.path()),
            Some(384 << 20)
        );
        std::fs::write(v2.join("memory.max"), "max\n").expect("write");
        assert_eq!(cgroup_limit("0::/kubepods/pod1/c1\n", dir.path()), None);
        let v1 = dir.path().join("memory/docker/abc");
        std::fs::create_dir_all(&v1).expect("dir");
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").expect("write");
        assert_eq!(
            cgroup_limit("4:memory:/docker/abc\n", dir.path()),
            None,
            "v1's no limit"
        );
        std::fs::write(v1.join("memory.limit_in_bytes"), "268435456\n").expect("write");
        assert_eq!(
            cgroup_limit("4:memory:/docker/abc\n0::/\n", dir.path()),
            Some(256 << 20)
        );
        assert_eq!(cgroup_limit("garbage", dir.path()), None);
    }
}
