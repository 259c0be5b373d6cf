//! Perf maps written by any process: parsing and lookups never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use profiler::symbolize::perfmap::PerfMap;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (map, _) = PerfMap::parse(&text);
    for addr in [0, 1, 0x1000, u64::MAX, data.len() as u64] {
        let _ = map.lookup(addr);
    }
});
