//! The unwind rows in BPF: one array (`UNWIND_ROWS`) shared by all files, sized by the
//! unwind-table budget, written through a shared mmap; `UNWIND_FILES` says where each file's
//! rows are.
//!
//! Space is handed out first-fit from a free list that merges neighbours. When a table does
//! not fit, least-recently-used files are evicted: files no live process maps first, then
//! files in use (their samples then end in `[unwind: no table for …]`). Order of updates, so
//! BPF never follows a file entry into rows that are not there: rows are written before the
//! file entry is inserted, and the file entry is deleted before its rows are freed.
//!
//! Each CPU's walk also caches file entries and rows it found (`UnwindState::cache`, `rows`).
//! Entries count only under the `UNWIND_GENERATION` they were found with; the store owns that
//! map and increments it when a file entry is deleted, before its rows can be reused.
use std::{collections::BTreeMap, io, os::fd::AsFd as _};

use aya::maps::{Array as BpfArray, HashMap as BpfHashMap, MapData, MapError};
use foldhash::HashMap;
use profiler_common::{FileTable, UnwindRow};

use super::table::Table;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("writing UNWIND_ROWS through mmap: {0}")]
    Mmap(io::Error),
    #[error("UNWIND_FILES: {0}")]
    Files(#[from] Box<MapError>),
    #[error("UNWIND_GENERATION: {0}")]
    Generation(Box<MapError>),
    #[error("table of {rows} rows is larger than the whole unwind-table budget ({capacity} rows)")]
    TooLarge { rows: usize, capacity: u32 },
}

/// Figures for logs and profile comments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub capacity_rows: u64,
    pub used_rows: u64,
    pub files: u64,
    pub evictions: u64,
}

#[derive(Debug)]
struct Resident {
    first: u32,
    rows: u32,
    /// Processes mapping the file now.
    users: u32,
    last_used: u64,
}

const PAGE: usize = 4096;

/// Writes `rows` at row index `first` of the mmapable `UNWIND_ROWS` array: maps just the pages
/// they cover, copies, unmaps. Keeping the whole array mapped would add it (64 MiB by
/// default) to the daemon's resident set for no benefit.
fn write_rows(map: &MapData, first: u32, rows: &[UnwindRow]) -> io::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let start = first as usize * size_of::<UnwindRow>();
    let end = start + std::mem::size_of_val(rows);
    let map_start = start / PAGE * PAGE;
    let map_len = end.div_ceil(PAGE) * PAGE - map_start;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&map.fd().as_fd());
    // SAFETY: a shared read-write mapping of whole pages inside the array's data (the caller
    // allocated [first, first + rows.len()) within capacity), released below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            map_start as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the destination lies inside the fresh mapping (start - map_start + bytes <=
    // map_len); source and destination do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            rows.as_ptr().cast::<u8>(),
            ptr.cast::<u8>().add(start - map_start),
            std::mem::size_of_val(rows),
        );
        libc::munmap(ptr, map_len);
    }
    Ok(())
}

pub struct RowStore {
    rows_map: MapData,
    capacity: u32,
    files: BpfHashMap<MapData, u64, FileTable>,
    generation: BpfArray<MapData, u64>,
    generation_value: u64,
    /// Rows of removed files whose generation increment failed: walk caches may still point
    /// into them, so they are freed only after an increment succeeds.
    held: Vec<(u32, u32)>,
    free: FreeList,
    resident: HashMap<u64, Resident>,
    clock: u64,
    stats: StoreStats,
}

impl RowStore {
    /// Takes over `rows_map` (an mmapable array of `capacity` rows), `files` and `generation`;
    /// checks that the array and the generation can be written.
    pub fn new(
        rows_map: MapData,
        capacity: u32,
        files: BpfHashMap<MapData, u64, FileTable>,
        mut generation: BpfArray<MapData, u64>,
    ) -> Result<Self, StoreError> {
        write_rows(&rows_map, 0, &[UnwindRow::default()]).map_err(StoreError::Mmap)?;
        generation
            .set(0, 0, 0)
            .map_err(|error| StoreError::Generation(Box::new(error)))?;
        Ok(RowStore {
            rows_map,
            capacity,
            files,
            generation,
            generation_value: 0,
            held: Vec::new(),
            free: FreeList::new(capacity),
            resident: HashMap::default(),
            clock: 0,
            stats: StoreStats {
                capacity_rows: u64::from(capacity),
                ..StoreStats::default()
            },
        })
    }

    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    pub fn contains(&self, file_id: u64) -> bool {
        self.resident.contains_key(&file_id)
    }

    /// Marks `file_id` as mapped by one more (`delta` = 1) or one fewer (-1) process.
    pub fn add_user(&mut self, file_id: u64, delta: i32) {
        self.clock += 1;
        if let Some(file) = self.resident.get_mut(&file_id) {
            file.users = file.users.saturating_add_signed(delta);
            file.last_used = self.clock;
        }
    }

    /// Loads `table` under `file_id` (replacing an older copy), evicting as needed.
    pub fn insert(&mut self, file_id: u64, table: &Table) -> Result<(), StoreError> {
        let n = table.rows.len();
        if n > self.capacity as usize {
            return Err(StoreError::TooLarge {
                rows: n,
                capacity: self.capacity,
            });
        }
        let users = self.resident.get(&file_id).map_or(0, |f| f.users);
        self.remove(file_id)?;
        let n = n as u32;
        let first = loop {
            if let Some(first) = self.free.allocate(n) {
                break first;
            }
            if !self.evict_one(file_id)? {
                return Err(StoreError::TooLarge {
                    rows: n as usize,
                    capacity: self.capacity,
                });
            }
        };
        if let Err(error) = write_rows(&self.rows_map, first, &table.rows) {
            self.free.release(first, n);
            return Err(StoreError::Mmap(error));
        }
        let entry = FileTable {
            base: table.base,
            first_row: first,
            rows: n,
        };
        if let Err(error) = self.files.insert(file_id, entry, 0) {
            self.free.release(first, n);
            return Err(StoreError::Files(Box::new(error)));
        }
        self.clock += 1;
        self.resident.insert(
            file_id,
            Resident {
                first,
                rows: n,
                users,
                last_used: self.clock,
            },
        );
        self.stats.used_rows += u64::from(n);
        self.stats.files = self.resident.len() as u64;
        Ok(())
    }

    /// Invalidates every CPU's walk caches (from its next walk on), then frees rows held back
    /// by earlier failures. False (logged) when the map could not be written.
    fn bump_generation(&mut self) -> bool {
        self.generation_value += 1;
        if let Err(error) = self.generation.set(0, self.generation_value, 0) {
            tracing::warn!(%error, "UNWIND_GENERATION not updated; the removed table's rows stay reserved");
            return false;
        }
        for (first, rows) in std::mem::take(&mut self.held) {
            self.free.release(first, rows);
        }
        true
    }

    /// Drops the table of `file_id`, if loaded.
    pub fn remove(&mut self, file_id: u64) -> Result<(), StoreError> {
        let Some(file) = self.resident.remove(&file_id) else {
            return Ok(());
        };
        match self.files.remove(&file_id) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(error) => {
                // Keep the rows reserved: BPF may still follow the entry into them.
                self.resident.insert(file_id, file);
                return Err(StoreError::Files(Box::new(error)));
            }
        }
        // Walk caches may hold the entry: invalidate them before the rows can be reused.
        if self.bump_generation() {
            self.free.release(file.first, file.rows);
        } else if file.rows > 0 {
            self.held.push((file.first, file.rows));
        }
        self.stats.used_rows -= u64::from(file.rows);
        self.stats.files = self.resident.len() as u64;
        Ok(())
    }

    /// Evicts the least recently used file other than `keep`, unused ones first.
    fn evict_one(&mut self, keep: u64) -> Result<bool, StoreError> {
        let victim = self
            .resident
            .iter()
            .filter(|(id, _)| **id != keep)
            .min_by_key(|(_, f)| (f.users > 0, f.last_used))
            .map(|(id, f)| (*id, f.users));
        let Some((victim, users)) = victim else {
            return Ok(false);
        };
        tracing::debug!(file_id = victim, users, "unwind table evicted (budget)");
        self.remove(victim)?;
        self.stats.evictions += 1;
        Ok(true)
    }
}

/// Free row ranges, first fit, neighbours merged on release.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FreeList {
    /// start → length.
    ranges: BTreeMap<u32, u32>,
}

impl FreeList {
    fn new(capacity: u32) -> Self {
        let mut ranges = BTreeMap::new();
        if capacity > 0 {
            ranges.insert(0, capacity);
        }
        FreeList { ranges }
    }

    fn allocate(&mut self, n: u32) -> Option<u32> {
        if n == 0 {
            return Some(0);
        }
        let (&start, &len) = self.ranges.iter().find(|(_, len)| **len >= n)?;
        self.ranges.remove(&start);
        if len > n {
            self.ranges.insert(start + n, len - n);
        }
        Some(start)
    }

    fn release(&mut self, start: u32, n: u32) {
        if n == 0 {
            return;
        }
        let (mut start, mut n) = (start, n);
        if let Some((&prev, &prev_len)) = self.ranges.range(..start).next_back()
            && prev + prev_len == start
        {
            self.ranges.remove(&prev);
            start = prev;
            n += prev_len;
        }
        if let Some(next_len) = self.ranges.remove(&(start + n)) {
            n += next_len;
        }
        self.ranges.insert(start, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_list_is_first_fit_and_merges_neighbours() {
        let mut free = FreeList::new(100);
        let (x, y, z) = (free.allocate(10), free.allocate(20), free.allocate(30));
        assert_eq!((x, y, z), (Some(0), Some(10), Some(30)));
        assert_eq!(free.allocate(41), None);
        free.release(10, 20);
        assert_eq!(free.ranges, BTreeMap::from([(10, 20), (60, 40)]));
        // First fit: the hole at 10 takes a 15-row table.
        assert_eq!(free.allocate(15), Some(10));
        free.release(10, 15);
        free.release(30, 30);
        assert_eq!(free.ranges, BTreeMap::from([(10, 90)]));
        free.release(0, 10);
        assert_eq!(free, FreeList::new(100));
        assert_eq!(free.allocate(100), Some(0));
    }
}
