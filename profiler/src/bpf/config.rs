//! What the loader needs to know: the validated sampling settings.
use std::{num::NonZeroU32, path::PathBuf};

use crate::labels::Selector;

/// User stack walker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Unwinder {
    /// Unwind tables compiled from each file's CFI, walked in BPF.
    Dwarf,
    /// The kernel's frame-pointer walk (`bpf_get_stack`).
    FramePointer,
}

/// Validated sampling settings shared by both commands.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    pub frequency: NonZeroU32,
    /// Empty (with `cgroups` and `targets`) means every process.
    pub pids: Vec<u32>,
    pub cgroups: Vec<PathBuf>,
    pub targets: Vec<Selector>,
    pub unwinder: Unwinder,
    /// Rows of the unwind-table array (8 bytes each).
    pub unwind_rows: u32,
}

/// Smallest accepted unwind-table budget (8,192 rows: a small program; libc alone needs
/// ~28,000).
pub const MIN_UNWIND_TABLE_BYTES: u64 = 64 << 10;

/// Largest: the row index is 32 bits, and a bigger preallocated array helps nobody.
pub const MAX_UNWIND_TABLE_BYTES: u64 = 4 << 30;
