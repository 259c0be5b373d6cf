//! DWARF: function names, source file and line, and inlined calls (addr2line over gimli).
use std::{
    borrow::Cow,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
};

use addr2line::Context;
use gimli::{EndianArcSlice, RunTimeEndian, SectionId};
use object::{Object, ObjectSection, ReadRef};

use super::{FunctionName, demangle};

type Reader = EndianArcSlice<RunTimeEndian>;

/// What parsed DWARF costs in memory per byte of its (decompressed) sections: the sections
/// themselves plus what addr2line builds from them up front (every unit's header,
/// abbreviations and line-program header). Measured on Debian's libc debug file: 8.6 MB of
/// sections, 33 MB more resident.
pub const PARSED_FACTOR: u64 = 4;

/// Default most memory one file's parsed DWARF may take (an eighth of the default symbol
/// cache); past it the file's frames keep their symbol-table names.
pub const DEFAULT_MAX_COST: u64 = 32 * 1024 * 1024;

/// The sections addr2line reads for function names, inlined calls, files and lines.
const NEEDED: [SectionId; 10] = [
    SectionId::DebugAbbrev,
    SectionId::DebugAddr,
    SectionId::DebugAranges,
    SectionId::DebugInfo,
    SectionId::DebugLine,
    SectionId::DebugLineStr,
    SectionId::DebugRanges,
    SectionId::DebugRngLists,
    SectionId::DebugStr,
    SectionId::DebugStrOffsets,
];

/// Parsed DWARF of one file. addr2line parses compilation units lazily and caches them in
/// cells that are not `Sync`, hence the mutex (the reporter is its only user).
pub struct Dwarf {
    context: Mutex<Context<Reader>>,
    /// Estimated memory held: the debug sections × [`PARSED_FACTOR`] (what the file costs the
    /// symbol cache).
    pub bytes: u64,
}

impl std::fmt::Debug for Dwarf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dwarf { .. }")
    }
}

impl Dwarf {
    /// Loads the DWARF sections of `elf` that naming needs (decompressing `SHF_COMPRESSED`
    /// ones, zlib or zstd); `None` when it has no `.debug_info`, DWARF that does not parse, or
    /// would cost more than `max_cost` bytes parsed (see [`Dwarf::cost`]). Location lists,
    /// macros and name indexes are never loaded: they are often the largest sections and say
    /// nothing about function names or lines.
    pub fn load<'data, R: ReadRef<'data>>(elf: &object::File<'data, R>, max_cost: u64) -> Option<Self> {
        let info = elf.section_by_name(".debug_info")?;
        // Sizes come from section and compression headers: checked before anything is
        // decompressed.
        if Self::cost(elf) > max_cost || info.size() == 0 {
            return None;
        }
        let endian = if elf.is_little_endian() {
            RunTimeEndian::Little
        } else {
            RunTimeEndian::Big
        };
        let mut loaded = 0u64;
        let mut load = |id: SectionId| -> Result<Reader, gimli::Error> {
            let data = if NEEDED.contains(&id) {
                elf.section_by_name(id.name())
                    .and_then(|s| crate::object::section_bytes(&s, max_cost / PARSED_FACTOR).ok())
                    .unwrap_or(Cow::Borrowed(&[]))
            } else {
                Cow::Borrowed(&[][..])
            };
            loaded = loaded.saturating_add(data.len() as u64);
            Ok(EndianArcSlice::new(Arc::from(&*data), endian))
        };
        let dwarf = gimli::Dwarf::load(&mut load).ok()?;
        // Third-party parsing of untrusted bytes: a panic in it costs this file its DWARF, not
        // the daemon its reporter.
        let context = std::panic::catch_unwind(AssertUnwindSafe(|| Context::from_dwarf(dwarf)))
            .ok()?
            .ok()?;
        Some(Self {
            context: Mutex::new(context),
            bytes: loaded.saturating_mul(PARSED_FACTOR),
        })
    }

    /// Estimated memory the DWARF of `elf` would take parsed (0 without `.debug_info`), from
    /// section and compression headers (untrusted: summed saturating), before anything is read
    /// or decompressed.
    pub fn cost<'data, R: ReadRef<'data>>(elf: &object::File<'data, R>) -> u64 {
        if elf.section_by_name(".debug_info").is_none() {
            return 0;
        }
        NEEDED
            .iter()
            .filter_map(|id| elf.section_by_name(id.name()))
            .map(|s| {
                s.compressed_file_range()
                    .map_or(s.size(), |r| r.uncompressed_size)
            })
            .fold(0u64, u64::saturating_add)
            .saturating_mul(PARSED_FACTOR)
    }

    /// Frames at `addr` (an ELF virtual address), innermost (inlined) first; empty when no
    /// compilation unit covers it.
    pub fn frames(&self, addr: u64) -> Vec<FunctionName> {
        // addr2line computes `addr + 1`; no code lives at the last address anyway.
        if addr == u64::MAX {
            return Vec::new();
        }
        let context = self
            .context
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::panic::catch_unwind(AssertUnwindSafe(|| Self::collect(&context, addr))).unwrap_or_default()
    }

    fn collect(context: &Context<Reader>, addr: u64) -> Vec<FunctionName> {
        let mut out = Vec::new();
        let Ok(mut frames) = context.find_frames(addr).skip_all_loads() else {
            return out;
        };
        while let Ok(Some(frame)) = frames.next() {
            let raw = frame
                .function
                .as_ref()
                .and_then(|f| f.raw_name().ok())
                .map(Cow::into_owned)
                .unwrap_or_default();
            let (file, line) = frame
                .location
                .map(|l| (l.file.map(str::to_owned), i64::from(l.line.unwrap_or(0))))
                .unwrap_or((None, 0));
            out.push(FunctionName {
                name: demangle(&raw),
                system_name: raw,
                file,
                line,
            });
        }
        out
    }
}
