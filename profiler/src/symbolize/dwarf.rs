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
use crate::limits::{self, Limit, MAX_DIE_DEPTH};

/// Whether any unit of `dwarf` nests DIEs deeper than `max` (or cannot be read to its end).
/// A walk of the raw entries, skipping attributes: no allocation per entry, no recursion.
pub fn die_depth_exceeds<R: gimli::Reader>(dwarf: &gimli::Dwarf<R>, max: usize) -> bool {
    let mut units = dwarf.units();
    loop {
        let header = match units.next() {
            Ok(Some(header)) => header,
            Ok(None) => return false,
            // addr2line stops at the same unreadable header; what is before it was scanned.
            Err(_) => return false,
        };
        let Ok(abbreviations) = dwarf.abbreviations(&header) else {
            continue;
        };
        let Ok(mut entries) = header.entries_raw(&abbreviations, None) else {
            continue;
        };
        while !entries.is_empty() {
            if usize::try_from(entries.next_depth()).is_ok_and(|depth| depth > max) {
                return true;
            }
            match entries.read_abbreviation() {
                Ok(Some(abbrev)) => {
                    if entries.skip_attributes(abbrev.attributes()).is_err() {
                        break;
                    }
                }
                Ok(None) => {}
                Err(_) => break,
            }
        }
    }
}

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
    /// Files whose DIEs nest deeper than [`MAX_DIE_DEPTH`] are refused, counted under
    /// `subject` (the file's path).
    pub fn load<'data, R: ReadRef<'data>>(
        elf: &object::File<'data, R>,
        max_cost: u64,
        subject: &str,
    ) -> Option<Self> {
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
        // addr2line recurses once per nesting level of DIEs: refuse deep trees before it sees
        // them (a stack overflow aborts the daemon; catch_unwind cannot stop it).
        if die_depth_exceeds(&dwarf, MAX_DIE_DEPTH) {
            limits::hit(Limit::DwarfDepth, subject);
            return None;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `.debug_abbrev` and `.debug_info` of one DWARF 4 unit: a compile unit holding a
    /// subprogram with `depth` inlined subroutines nested one in the other, all over
    /// `0x1000..0x1010`.
    fn nested_inlines(depth: usize) -> (Vec<u8>, Vec<u8>) {
        const ADDR: u8 = 0x01;
        const DATA8: u8 = 0x07;
        const STRING: u8 = 0x08;
        const REF4: u8 = 0x13;
        let abbrev = [
            &[1, 0x11, 1, 0x11, ADDR, 0x12, DATA8, 0, 0][..],
            &[2, 0x2e, 1, 0x03, STRING, 0x11, ADDR, 0x12, DATA8, 0, 0],
            &[3, 0x1d, 1, 0x31, REF4, 0x11, ADDR, 0x12, DATA8, 0, 0],
            &[0],
        ]
        .concat();
        let range = |out: &mut Vec<u8>| {
            out.extend_from_slice(&0x1000u64.to_le_bytes());
            out.extend_from_slice(&0x10u64.to_le_bytes());
        };
        let mut dies = vec![1];
        range(&mut dies);
        // Unit-relative offset of the subprogram: the 11-byte header, then the unit's DIE.
        let subprogram = (11 + dies.len()) as u32;
        dies.push(2);
        dies.extend_from_slice(b"deep\0");
        range(&mut dies);
        for _ in 0..depth {
            dies.push(3);
            dies.extend_from_slice(&subprogram.to_le_bytes());
            range(&mut dies);
        }
        dies.extend(std::iter::repeat_n(0, depth + 2));
        let mut info = Vec::new();
        info.extend_from_slice(&((7 + dies.len()) as u32).to_le_bytes());
        info.extend_from_slice(&4u16.to_le_bytes());
        info.extend_from_slice(&0u32.to_le_bytes());
        info.push(8);
        info.extend_from_slice(&dies);
        (abbrev, info)
    }

    fn load(abbrev: &[u8], info: &[u8]) -> gimli::Dwarf<gimli::EndianSlice<'static, gimli::LittleEndian>> {
        let abbrev: &'static [u8] = Box::leak(abbrev.to_vec().into_boxed_slice());
        let info: &'static [u8] = Box::leak(info.to_vec().into_boxed_slice());
        gimli::Dwarf::load(|id| -> Result<_, gimli::Error> {
            Ok(gimli::EndianSlice::new(
                match id {
                    SectionId::DebugAbbrev => abbrev,
                    SectionId::DebugInfo => info,
                    _ => &[],
                },
                gimli::LittleEndian,
            ))
        })
        .expect("sections")
    }

    #[test]
    fn deep_inline_trees_are_found_before_addr2line_reads_them() {
        // Depth counts the unit and the subprogram too.
        let (abbrev, info) = nested_inlines(MAX_DIE_DEPTH - 2);
        assert!(!die_depth_exceeds(&load(&abbrev, &info), MAX_DIE_DEPTH));
        // The shallow tree is one addr2line reads: the scan must not have misread it.
        let context = Context::from_dwarf(load(&abbrev, &info)).expect("context");
        let frames = context.find_frames(0x1004).skip_all_loads().expect("frames");
        let mut count = 0;
        let mut frames = frames;
        while let Ok(Some(_)) = frames.next() {
            count += 1;
        }
        assert_eq!(count, MAX_DIE_DEPTH - 1, "every inlined level and the subprogram");
        for depth in [MAX_DIE_DEPTH, 20_000] {
            let (abbrev, info) = nested_inlines(depth);
            assert!(die_depth_exceeds(&load(&abbrev, &info), MAX_DIE_DEPTH), "{depth}");
        }
    }
}
