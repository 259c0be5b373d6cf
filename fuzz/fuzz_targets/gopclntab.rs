//! `.gopclntab` from a hostile binary: parsing, lookups and the inline-tree walk never panic
//! or loop. The input is split into the table and bytes that stand in for the sections its
//! pointers lead to (`.rodata` with the inline trees, `.noptrdata` with moduledata).
#![no_main]
use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use profiler::symbolize::gopclntab::{GoPclntab, GoSections};

const TEXT: u64 = 0x40_1000;
const RODATA: u64 = 0x48_0000;
const NOPTRDATA: u64 = 0x60_0000;

fuzz_target!(|data: &[u8]| {
    let Some((probe, data)) = data.split_first_chunk::<8>() else { return };
    let Some((split, data)) = data.split_first_chunk::<4>() else { return };
    let split = usize::try_from(u32::from_le_bytes(*split)).map_or(data.len(), |s| s.min(data.len()));
    let (table, rest) = data.split_at(split);
    let pc = u64::from_le_bytes(*probe);
    if let Some(table) = GoPclntab::parse(table.to_vec(), Some(TEXT)) {
        let _ = table.frames(pc);
        let _ = table.frames(TEXT + (pc & 0xffff));
    }
    let image = GoSections::new(
        vec![
            (".rodata".to_owned(), RODATA, Cow::Borrowed(rest)),
            (".noptrdata".to_owned(), NOPTRDATA, Cow::Borrowed(rest)),
        ],
        vec![("go:func.*".to_owned(), RODATA)],
    );
    if let Some(table) = GoPclntab::parse_in(table.to_vec(), 0x50_0000, TEXT, Some(&image), true) {
        let _ = table.frames(pc);
        let _ = table.frames(TEXT + (pc & 0xffff));
        let _ = table.frameless_ranges(|_| false, 1 << 16);
    }
});
