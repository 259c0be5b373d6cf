//! The typed map handles the loader hands to the stages that own them.
use aya::maps::{Array, HashMap, LpmTrie, MapData, RingBuf};
use profiler_common::{FileTable, Mapping, MappingKey};

/// The BPF maps the unwind stage owns: it keeps each sampled process's view current.
pub struct UnwindMaps {
    /// `UNWIND_ROWS`: slot → a file's rows (an array of maps).
    pub rows: MapData,
    /// The unwind-table budget in rows.
    pub capacity: u32,
    pub files: HashMap<MapData, u64, FileTable>,
    pub mappings: LpmTrie<MapData, MappingKey, Mapping>,
    pub procs: HashMap<MapData, u32, u32>,
    pub events: RingBuf<MapData>,
    pub generation: Array<MapData, u64>,
}
