//! Ring-buffer records: decoding never panics, whatever the lengths claim.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = profiler::sample::decode(data);
});
