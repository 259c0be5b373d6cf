//! `.gopclntab` from a hostile binary: parsing and lookups never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use profiler::symbolize::gopclntab::GoPclntab;

fuzz_target!(|data: &[u8]| {
    let Some((probe, table)) = data.split_first_chunk::<8>() else { return };
    if let Some(table) = GoPclntab::parse(table.to_vec(), Some(0x40_1000)) {
        let pc = u64::from_le_bytes(*probe);
        let _ = table.lookup(pc);
        let _ = table.lookup(0x40_1000 + (pc & 0xffff));
    }
});
