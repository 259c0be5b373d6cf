//! The unwind rows in BPF: each loaded file's table is an `ARRAY` map of its own, exactly as
//! long as the table, created when the table is loaded and put in a slot of the `UNWIND_ROWS`
//! array of maps; `UNWIND_FILES` says which slot holds a file's rows. Kernel memory therefore
//! follows the tables loaded, and nothing is allocated (or zeroed) at start: the unwind-table
//! budget caps the sum of the tables, counted in whole pages as the kernel allocates them.
//!
//! When a table does not fit the budget, or every slot is taken, least-recently-used files are
//! evicted: files no live process maps first, then files in use (their samples then end in
//! `[unwind: no table for …]`). Order of updates, so BPF never follows a file entry into a slot
//! that does not hold its rows: the rows are written and the slot set before the file entry is
//! inserted, and the file entry is deleted before the slot is emptied.
//!
//! Putting a map in a slot makes the kernel wait for every running BPF program to finish (an
//! RCU grace period, ~10 ms here), so tables are staged and put in their slots together, one
//! batch per process load ([`RowStore::commit`]); kernels before 6.3, which cannot batch an
//! array of maps, get one update per table.
//!
//! Each CPU's walk also caches file entries and rows it found (`UnwindState::cache`, `rows`).
//! Entries count only under the `UNWIND_GENERATION` they were found with; the store owns that
//! map and increments it when a file entry is deleted, before its slot can be reused.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
};

use aya::maps::{Array as BpfArray, HashMap as BpfHashMap, MapData, MapError};
use aya_obj::generated::bpf_cmd;
use foldhash::HashMap;
use profiler_common::{
    FileTable, MAX_UNWIND_FILES, NO_ROWS_SLOT, UNWIND_ROWS_INNER_NAME, UNWIND_ROWS_MAP_FLAGS, UnwindRow,
};

use super::table::Table;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("creating the {rows}-row unwind table map: {source}")]
    Create { rows: u32, source: Box<MapError> },
    #[error("writing an unwind table through mmap: {0}")]
    Mmap(io::Error),
    #[error("setting UNWIND_ROWS slot {slot}: {source}")]
    Slot { slot: u32, source: io::Error },
    #[error("UNWIND_FILES: {0}")]
    Files(#[from] Box<MapError>),
    #[error("UNWIND_GENERATION: {0}")]
    Generation(Box<MapError>),
    #[error("table of {rows} rows is larger than the whole unwind-table budget ({capacity} rows)")]
    TooLarge { rows: usize, capacity: u64 },
    #[error("all {MAX_UNWIND_FILES} unwind table slots are taken")]
    NoSlot,
}

/// Figures for logs and profile comments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub capacity_rows: u64,
    /// Rows the loaded tables take, in whole pages.
    pub used_rows: u64,
    /// Files with a table loaded (staged ones included).
    pub files: u64,
    pub evictions: u64,
}

#[derive(Debug)]
struct Resident {
    /// `UNWIND_ROWS` slot, or [`NO_ROWS_SLOT`] for an empty table.
    slot: u32,
    /// Rows charged to the budget ([`charged_rows`]).
    charged: u64,
    /// Processes mapping the file now.
    users: u32,
    last_used: u64,
}

const PAGE: usize = 4096;
const ROWS_PER_PAGE: u64 = (PAGE / size_of::<UnwindRow>()) as u64;

/// What a table of `rows` rows costs the budget: the kernel allocates an array map's values in
/// whole pages.
fn charged_rows(rows: usize) -> u64 {
    (rows as u64).div_ceil(ROWS_PER_PAGE) * ROWS_PER_PAGE
}

/// The file to evict to make room: the least recently used one other than `keep`, files no
/// process maps before files in use.
fn victim(resident: &HashMap<u64, Resident>, keep: u64) -> Option<(u64, u32)> {
    resident
        .iter()
        .filter(|(id, _)| **id != keep)
        .min_by_key(|(_, f)| (f.users > 0, f.last_used))
        .map(|(id, f)| (*id, f.users))
}

/// Creates the array for one table and writes its rows through a shared mapping of it (a
/// mapping of just this table, released at once).
fn create_rows(rows: &[UnwindRow]) -> Result<MapData, StoreError> {
    let n = rows.len() as u32;
    let def = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        size_of::<u32>() as u32,
        size_of::<UnwindRow>() as u32,
        n,
        UNWIND_ROWS_MAP_FLAGS,
    );
    let map = MapData::create(def, UNWIND_ROWS_INNER_NAME, None).map_err(|source| StoreError::Create {
        rows: n,
        source: Box::new(source),
    })?;
    let len = std::mem::size_of_val(rows).div_ceil(PAGE) * PAGE;
    let fd = map.fd().as_fd().as_raw_fd();
    // SAFETY: a shared read-write mapping of the whole array (its values start at offset 0 and
    // take `len` bytes, whole pages), released below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(StoreError::Mmap(io::Error::last_os_error()));
    }
    // SAFETY: the rows fit in the fresh mapping (`len` >= their size); no overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            rows.as_ptr().cast::<u8>(),
            ptr.cast::<u8>(),
            std::mem::size_of_val(rows),
        );
        libc::munmap(ptr, len);
    }
    Ok(map)
}

/// `bpf(cmd, attr)`: the element and batch commands aya 0.14 has no call for.
fn sys_bpf<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is the `union bpf_attr` part `cmd` reads (and may write back), valid for
    // `size_of::<T>()` bytes; the pointers in it are the caller's and outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<T>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `bpf(BPF_MAP_UPDATE_ELEM)` (with `inner`) or `bpf(BPF_MAP_DELETE_ELEM)` (without) on slot
/// `index` of an array of maps; aya 0.14 cannot empty a slot.
fn set_slot(outer: RawFd, index: u32, inner: Option<RawFd>) -> io::Result<()> {
    /// The element-command part of `union bpf_attr`.
    #[repr(C, align(8))]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let value = inner.map(|fd| fd as u32);
    let mut attr = ElemAttr {
        map_fd: outer as u32,
        _pad: 0,
        key: std::ptr::from_ref(&index) as u64,
        value: value.as_ref().map_or(0, |v| std::ptr::from_ref(v) as u64),
        flags: 0,
    };
    let cmd = if inner.is_some() {
        bpf_cmd::BPF_MAP_UPDATE_ELEM
    } else {
        bpf_cmd::BPF_MAP_DELETE_ELEM
    };
    sys_bpf(cmd, &mut attr)
}

/// `bpf(BPF_MAP_UPDATE_BATCH)`: puts `inner[i]` in slot `slots[i]` of an array of maps, all in
/// one call (one wait for running programs instead of one per slot).
fn set_slots(outer: RawFd, slots: &[u32], inner: &[u32]) -> io::Result<()> {
    /// The batch-command part of `union bpf_attr`.
    #[repr(C, align(8))]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: slots.as_ptr() as u64,
        values: inner.as_ptr() as u64,
        count: slots.len().min(inner.len()) as u32,
        map_fd: outer as u32,
        elem_flags: 0,
        flags: 0,
    };
    sys_bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr)
}

/// A table whose rows are written but not yet in their slot, nor its file entry in
/// `UNWIND_FILES` ([`RowStore::commit`] does both).
#[derive(Debug)]
struct Staged {
    file_id: u64,
    entry: FileTable,
    /// The table's array (none for an empty table); our descriptor closes once it is in its slot.
    rows: Option<MapData>,
}

pub struct RowStore {
    /// `UNWIND_ROWS`, the array of maps.
    slots_map: MapData,
    capacity: u64,
    files: BpfHashMap<MapData, u64, FileTable>,
    generation: BpfArray<MapData, u64>,
    generation_value: u64,
    /// Slots of removed files whose generation increment failed: walk caches may still name
    /// them, so they are reused only after an increment succeeds.
    held: Vec<u32>,
    /// Slots to hand out, the lowest last.
    free_slots: Vec<u32>,
    /// Tables loaded since the last [`RowStore::commit`].
    staged: Vec<Staged>,
    /// False once the kernel refused a batch update of the array of maps (before 6.3).
    batch: bool,
    resident: HashMap<u64, Resident>,
    clock: u64,
    stats: StoreStats,
}

impl RowStore {
    /// Takes over `slots_map` (`UNWIND_ROWS`, [`MAX_UNWIND_FILES`] slots), `files` and
    /// `generation`, with a budget of `capacity` rows; checks that the generation can be written.
    pub fn new(
        slots_map: MapData,
        capacity: u32,
        files: BpfHashMap<MapData, u64, FileTable>,
        mut generation: BpfArray<MapData, u64>,
    ) -> Result<Self, StoreError> {
        generation
            .set(0, 0, 0)
            .map_err(|error| StoreError::Generation(Box::new(error)))?;
        Ok(RowStore {
            slots_map,
            capacity: u64::from(capacity),
            files,
            generation,
            generation_value: 0,
            held: Vec::new(),
            free_slots: (0..MAX_UNWIND_FILES).rev().collect(),
            staged: Vec::new(),
            batch: true,
            resident: HashMap::default(),
            clock: 0,
            stats: StoreStats {
                capacity_rows: u64::from(capacity),
                ..StoreStats::default()
            },
        })
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            files: self.resident.len() as u64,
            ..self.stats
        }
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

    /// Loads `table` under `file_id` (replacing an older copy), evicting as needed. BPF sees it
    /// from the next [`RowStore::commit`] on.
    pub fn insert(&mut self, file_id: u64, table: &Table) -> Result<(), StoreError> {
        let n = table.rows.len();
        let charged = charged_rows(n);
        if charged > self.capacity {
            return Err(StoreError::TooLarge {
                rows: n,
                capacity: self.capacity,
            });
        }
        let users = self.resident.get(&file_id).map_or(0, |f| f.users);
        self.remove(file_id)?;
        // Room in the budget, an `UNWIND_FILES` entry, and a slot unless the table is empty.
        loop {
            let over_budget = self.stats.used_rows + charged > self.capacity;
            let no_slot =
                self.resident.len() >= MAX_UNWIND_FILES as usize || (n > 0 && self.free_slots.is_empty());
            if !over_budget && !no_slot {
                break;
            }
            if !self.evict_one(file_id)? {
                return Err(if over_budget {
                    StoreError::TooLarge {
                        rows: n,
                        capacity: self.capacity,
                    }
                } else {
                    StoreError::NoSlot
                });
            }
        }
        let (slot, rows) = if n == 0 {
            (NO_ROWS_SLOT, None)
        } else {
            let slot = self.free_slots.pop().ok_or(StoreError::NoSlot)?;
            match create_rows(&table.rows) {
                Ok(map) => (slot, Some(map)),
                Err(error) => {
                    self.free_slots.push(slot);
                    return Err(error);
                }
            }
        };
        self.staged.push(Staged {
            file_id,
            entry: FileTable {
                base: table.base,
                slot,
                rows: n as u32,
            },
            rows,
        });
        self.clock += 1;
        self.resident.insert(
            file_id,
            Resident {
                slot,
                charged,
                users,
                last_used: self.clock,
            },
        );
        self.stats.used_rows += charged;
        Ok(())
    }

    /// Makes the tables loaded since the last call visible to BPF: each array in its slot (one
    /// batch), then each file entry. A table that cannot be placed is dropped (logged); its file
    /// is built again when a process next needs it.
    pub fn commit(&mut self) {
        let staged = std::mem::take(&mut self.staged);
        if staged.is_empty() {
            return;
        }
        let outer = self.slots_map.fd().as_fd().as_raw_fd();
        let (slots, fds): (Vec<u32>, Vec<u32>) = staged
            .iter()
            .filter_map(|s| Some((s.entry.slot, s.rows.as_ref()?.fd().as_fd().as_raw_fd() as u32)))
            .unzip();
        let mut batched = false;
        if self.batch && slots.len() > 1 {
            match set_slots(outer, &slots, &fds) {
                Ok(()) => batched = true,
                Err(error) => {
                    // EINVAL before 6.3 (no batch operations on arrays of maps); one at a time then.
                    tracing::debug!(%error, "batch update of UNWIND_ROWS refused; slots are set one by one");
                    self.batch = false;
                }
            }
        }
        for Staged { file_id, entry, rows } in staged {
            let placed = match &rows {
                Some(_) if batched => Ok(()),
                Some(map) => {
                    set_slot(outer, entry.slot, Some(map.fd().as_fd().as_raw_fd())).map_err(|source| {
                        StoreError::Slot {
                            slot: entry.slot,
                            source,
                        }
                    })
                }
                None => Ok(()),
            };
            let visible = placed.and_then(|()| {
                self.files
                    .insert(file_id, entry, 0)
                    .map_err(|error| StoreError::Files(Box::new(error)))
            });
            if let Err(error) = visible {
                tracing::warn!(file_id, %error, "unwind table not loaded");
                if let Some(file) = self.resident.remove(&file_id) {
                    self.stats.used_rows -= file.charged;
                }
                // No file entry names the slot, so no walk has cached it.
                self.release_slot(entry.slot);
            }
        }
    }

    /// Empties `slot` (the kernel frees its array once no walk uses it) and hands it out again.
    /// Only for slots no cached walk state can name: never inserted, or after a generation bump.
    fn release_slot(&mut self, slot: u32) {
        if slot == NO_ROWS_SLOT {
            return;
        }
        match set_slot(self.slots_map.fd().as_fd().as_raw_fd(), slot, None) {
            // ENOENT: the slot was never set (a table whose update failed).
            Ok(()) => self.free_slots.push(slot),
            Err(error) if error.kind() == io::ErrorKind::NotFound => self.free_slots.push(slot),
            // Not reused while it may still hold the old rows: a slot fewer until exit.
            Err(error) => tracing::warn!(slot, %error, "UNWIND_ROWS slot not emptied; left unused"),
        }
    }

    /// Invalidates every CPU's walk caches (from its next walk on), then releases slots held
    /// back by earlier failures. False (logged) when the map could not be written.
    fn bump_generation(&mut self) -> bool {
        self.generation_value += 1;
        if let Err(error) = self.generation.set(0, self.generation_value, 0) {
            tracing::warn!(%error, "UNWIND_GENERATION not updated; the removed table's slot stays reserved");
            return false;
        }
        for slot in std::mem::take(&mut self.held) {
            self.release_slot(slot);
        }
        true
    }

    /// Drops the table of `file_id`, if loaded.
    pub fn remove(&mut self, file_id: u64) -> Result<(), StoreError> {
        let Some(file) = self.resident.remove(&file_id) else {
            return Ok(());
        };
        if let Some(at) = self.staged.iter().position(|s| s.file_id == file_id) {
            // Never visible to BPF: its slot is still empty and nothing cached it.
            self.staged.swap_remove(at);
            if file.slot != NO_ROWS_SLOT {
                self.free_slots.push(file.slot);
            }
            self.stats.used_rows -= file.charged;
            return Ok(());
        }
        match self.files.remove(&file_id) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(error) => {
                // Keep the slot as it is: BPF may still follow the entry into it.
                self.resident.insert(file_id, file);
                return Err(StoreError::Files(Box::new(error)));
            }
        }
        // Walk caches may hold the entry: invalidate them before the slot can be reused.
        if self.bump_generation() {
            self.release_slot(file.slot);
        } else if file.slot != NO_ROWS_SLOT {
            self.held.push(file.slot);
        }
        self.stats.used_rows -= file.charged;
        Ok(())
    }

    /// Evicts the least recently used file other than `keep`, unused ones first.
    fn evict_one(&mut self, keep: u64) -> Result<bool, StoreError> {
        let Some((victim, users)) = victim(&self.resident, keep) else {
            return Ok(false);
        };
        tracing::debug!(file_id = victim, users, "unwind table evicted (budget)");
        self.remove(victim)?;
        self.stats.evictions += 1;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_charged_in_whole_pages() {
        assert_eq!(charged_rows(0), 0);
        assert_eq!(charged_rows(1), 512);
        assert_eq!(charged_rows(512), 512);
        assert_eq!(charged_rows(513), 1024);
        // libc's table: 28,274 rows take 56 pages.
        assert_eq!(charged_rows(28_274), 56 * 512);
    }

    #[test]
    fn unmapped_files_are_evicted_before_files_in_use_oldest_first() {
        let file = |users, last_used| Resident {
            slot: 0,
            charged: 512,
            users,
            last_used,
        };
        let mut resident: HashMap<u64, Resident> = HashMap::default();
        resident.insert(1, file(2, 1));
        resident.insert(2, file(0, 9));
        resident.insert(3, file(0, 5));
        resident.insert(4, file(1, 0));
        assert_eq!(victim(&resident, 0), Some((3, 0)));
        // The file being loaded is never its own victim.
        assert_eq!(victim(&resident, 3), Some((2, 0)));
        resident.remove(&2);
        resident.remove(&3);
        assert_eq!(victim(&resident, 0), Some((4, 1)));
        assert_eq!(victim(&resident, 4), Some((1, 2)));
        resident.remove(&1);
        assert_eq!(victim(&resident, 4), None);
    }
}
