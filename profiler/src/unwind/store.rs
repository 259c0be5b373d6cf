//! The unwind rows in BPF: one array (`UNWIND_ROWS`) shared by all files, sized by the
//! unwind-table budget, written through a shared mmap; `UNWIND_FILES` says where each file's
//! rows are.
//!
//! Space is handed out first-fit from a free list that merges neighbours. When a table does
//! not fit, least-recently-used files are evicted: files no live process maps first, then
//! files in use (their samples then end in `[unwind: no table for …]`). Order of updates, so
//! BPF never follows a file entry into rows that are not there: rows are written before the
//! file entry is inserted, and the file entry is deleted before its rows are freed.
use std::{collections::BTreeMap, io, os::fd::AsFd as _, ptr::NonNull};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use foldhash::HashMap;
use profiler_common::{FileTable, UnwindRow};

use super::table::Table;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("mapping UNWIND_ROWS into memory: {0}")]
    Mmap(io::Error),
    #[error("UNWIND_FILES: {0}")]
    Files(#[from] Box<MapError>),
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

/// The writable view of `UNWIND_ROWS`.
struct RowsMmap {
    ptr: NonNull<UnwindRow>,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is owned by this struct and only written through `&mut self`.
unsafe impl Send for RowsMmap {}

impl Drop for RowsMmap {
    fn drop(&mut self) {
        // SAFETY: ptr/bytes are exactly what mmap returned.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

pub struct RowStore {
    rows: RowsMmap,
    files: BpfHashMap<MapData, u64, FileTable>,
    free: FreeList,
    resident: HashMap<u64, Resident>,
    clock: u64,
    stats: StoreStats,
}

impl RowStore {
    /// Maps `rows_map` (an mmapable array of `capacity` rows) and takes over `files`.
    pub fn new(
        rows_map: &MapData,
        capacity: u32,
        files: BpfHashMap<MapData, u64, FileTable>,
    ) -> Result<Self, StoreError> {
        let page = 4096usize;
        let bytes = (capacity as usize * size_of::<UnwindRow>()).div_ceil(page) * page;
        let fd = rows_map.fd().as_fd();
        // SAFETY: a shared read-write mapping of the array's fd, of the array's size rounded
        // to whole pages (what the kernel allows for BPF_F_MMAPABLE arrays).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(StoreError::Mmap(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<UnwindRow>()).ok_or(StoreError::Mmap(io::Error::other("null")))?;
        let free = FreeList::new(capacity);
        Ok(RowStore {
            rows: RowsMmap {
                ptr,
                len: capacity as usize,
                bytes,
            },
            files,
            free,
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
        if n > self.rows.len {
            return Err(StoreError::TooLarge {
                rows: n,
                capacity: self.rows.len as u32,
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
                    capacity: self.rows.len as u32,
                });
            }
        };
        // SAFETY: [first, first + n) was just allocated inside the mapping's `len` rows, and
        // nothing else writes this memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                table.rows.as_ptr(),
                self.rows.ptr.as_ptr().add(first as usize),
                n as usize,
            );
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
        self.free.release(file.first, file.rows);
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
