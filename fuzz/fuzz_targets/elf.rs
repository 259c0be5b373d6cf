//! ELF files mapped by any process: parsing (symbols, DWARF, .gopclntab, segments), lookups,
//! and compiling the unwind table from their CFI never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use profiler::{
    symbolize::{SymbolSource as _, elf::ElfImage},
    unwind::table,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = ElfImage::parse(data) {
        for addr in [0, 0x40_1000, u64::MAX] {
            let _ = image.resolve(addr);
            let _ = image.vaddr_of_offset(addr);
        }
        let _ = image.debug_file_candidates("/usr/bin/x");
    }
    if let Ok(file) = object::File::parse(data)
        && let Ok((compiled, _)) = table::compile(&file, None::<&object::File<'_, &[u8]>>)
    {
        for addr in [0, 0x40_1000, u64::MAX] {
            let _ = compiled.lookup(addr);
        }
    }
});
