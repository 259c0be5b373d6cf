//! What the unwind engine writes into the kernel, behind one trait ([`KernelMaps`]), so that its
//! process lifecycle (load, reload, exec, exit, reconciliation) runs in unit tests without BPF.
//! [`BpfMaps`] is the real one: the row store and the `MAPPINGS`, `PROCS` and `PROC_EVENTS`
//! maps the loader handed over.
use std::os::fd::{AsRawFd as _, RawFd};

use aya::maps::{HashMap, LpmTrie, MapData, MapError, RingBuf, lpm_trie::Key};
use profiler_common::{Mapping, MappingKey, ProcEvent};

use super::{
    store::{RowStore, StoreError, StoreStats},
    table::Table,
};
use crate::bpf::UnwindMaps;

/// The kernel side of the unwinder, as the engine sees it.
pub trait KernelMaps {
    /// Adds or replaces one address-range prefix of a process in `MAPPINGS`.
    fn insert_mapping(&mut self, key: &Key<MappingKey>, value: &Mapping) -> Result<(), MapError>;
    fn remove_mapping(&mut self, key: &Key<MappingKey>);
    /// Sets a process's `PROCS` state (see `profiler_common::proc_state`).
    fn set_process(&mut self, pid: u32, state: u32) -> Result<(), MapError>;
    fn remove_process(&mut self, pid: u32);
    /// Every pid in `PROCS` (requested or loaded).
    fn processes(&self) -> Vec<u32>;
    /// Whether the table of `file_id` is resident (staged or committed).
    fn has_table(&self, file_id: u64) -> bool;
    /// Stages a file's table; [`Self::commit_tables`] makes the staged ones visible to BPF.
    fn insert_table(&mut self, file_id: u64, table: &Table) -> Result<(), StoreError>;
    fn commit_tables(&mut self);
    /// Counts a process mapping the file (`delta` 1) or no longer mapping it (-1).
    fn add_table_user(&mut self, file_id: u64, delta: i32);
    fn table_stats(&self) -> StoreStats;
    /// The exec, exit and load events waiting in `PROC_EVENTS`.
    fn read_events(&mut self) -> Vec<ProcEvent>;
    /// A descriptor that is readable while events wait (`None`: poll on a timer).
    fn event_fd(&self) -> Option<RawFd>;
}

/// The maps of a loaded BPF session.
pub struct BpfMaps {
    store: RowStore,
    mappings: LpmTrie<MapData, MappingKey, Mapping>,
    procs: HashMap<MapData, u32, u32>,
    events: RingBuf<MapData>,
}

impl BpfMaps {
    pub fn new(maps: UnwindMaps) -> Result<Self, StoreError> {
        Ok(Self {
            store: RowStore::new(maps.rows, maps.capacity, maps.files, maps.generation)?,
            mappings: maps.mappings,
            procs: maps.procs,
            events: maps.events,
        })
    }
}

impl KernelMaps for BpfMaps {
    fn insert_mapping(&mut self, key: &Key<MappingKey>, value: &Mapping) -> Result<(), MapError> {
        self.mappings.insert(key, value, 0)
    }

    fn remove_mapping(&mut self, key: &Key<MappingKey>) {
        let _ = self.mappings.remove(key);
    }

    fn set_process(&mut self, pid: u32, state: u32) -> Result<(), MapError> {
        self.procs.insert(pid, state, 0)
    }

    fn remove_process(&mut self, pid: u32) {
        let _ = self.procs.remove(&pid);
    }

    fn processes(&self) -> Vec<u32> {
        self.procs.keys().filter_map(Result::ok).collect()
    }

    fn has_table(&self, file_id: u64) -> bool {
        self.store.contains(file_id)
    }

    fn insert_table(&mut self, file_id: u64, table: &Table) -> Result<(), StoreError> {
        self.store.insert(file_id, table)
    }

    fn commit_tables(&mut self) {
        self.store.commit();
    }

    fn add_table_user(&mut self, file_id: u64, delta: i32) {
        self.store.add_user(file_id, delta);
    }

    fn table_stats(&self) -> StoreStats {
        self.store.stats()
    }

    fn read_events(&mut self) -> Vec<ProcEvent> {
        let mut events = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() >= size_of::<ProcEvent>() {
                // SAFETY: the record holds a ProcEvent (two u32); read_unaligned copies it.
                events.push(unsafe { item.as_ptr().cast::<ProcEvent>().read_unaligned() });
            }
        }
        events
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.events.as_raw_fd())
    }
}
