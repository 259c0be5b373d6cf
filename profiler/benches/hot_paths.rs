//! Hot paths of the daemon, on this process's own code and the running kernel's symbols:
//! - decode + aggregate: ring-buffer records → interned, counted stacks (per sample);
//! - report: symbolize and pprof-encode an aggregated interval (per profile);
//! - symbolize: ELF symbol lookups in a parsed file and parsing a file (cold);
//! - unwind tables: compiling libc's and this binary's CFI into unwind rows;
//! - names: the reporter's (file, address) name cache (cached lookups) and the first DWARF
//!   lookups, inlined frames included, in a freshly parsed file (this bench binary, built with
//!   full debug info by `[profile.bench]`).
use std::{hint::black_box, time::SystemTime};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use profiler::{
    aggregate::Aggregator,
    bpf::EventSource,
    encode::gzip,
    object::WindowedFile,
    process::ProcessRegistry,
    report::Reporter,
    rootfs::FilePath,
    sample::{CounterSnapshot, decode},
    symbolize::{NameCache, SymbolSource as _, elf::ElfImage},
    unwind::table,
};
use profiler_common::{HEADER_BYTES, RawSampleHeader};

/// Executable mappings of this process: (start, end).
fn own_text() -> Vec<(u64, u64)> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    maps.lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|p| p.contains('x')))
        .filter(|l| l.split_whitespace().nth(5).is_some_and(|p| p.starts_with('/')))
        .filter_map(|l| {
            let (lo, hi) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            ))
        })
        .collect()
}

/// 1,000 records of 8 kernel and 24 user frames spread over this process's code: about 50
/// distinct stacks, as a busy service shows in one interval.
fn records() -> Vec<Vec<u8>> {
    let text = own_text();
    let user_span: Vec<u64> = text
        .iter()
        .flat_map(|&(lo, hi)| (lo..hi).step_by(4099).take(200))
        .collect();
    (0..1000u64)
        .map(|i| {
            let header = RawSampleHeader {
                ktime_ns: i,
                tgid: std::process::id(),
                tid: std::process::id(),
                cpu: 0,
                kernel_len: 8,
                user_len: 24,
                comm: *b"bench\0\0\0\0\0\0\0\0\0\0\0",
                ..Default::default()
            };
            // SAFETY: the header is repr(C) plain data.
            let mut bytes =
                unsafe { std::slice::from_raw_parts((&raw const header).cast::<u8>(), HEADER_BYTES) }
                    .to_vec();
            for k in 0..8u64 {
                bytes.extend((0xffff_ffff_8100_0000u64 + (i % 50) * 0x1000 + k * 0x40).to_ne_bytes());
            }
            for u in 0..24u64 {
                let idx = ((i % 50) * 3 + u) as usize % user_span.len();
                bytes.extend(user_span[idx].to_ne_bytes());
            }
            bytes
        })
        .collect()
}

fn decode_and_aggregate(c: &mut Criterion) {
    let records = records();
    let mut agg = Aggregator::new(
        ProcessRegistry::default(),
        SystemTime::now(),
        CounterSnapshot::default(),
    );
    c.bench_function("decode+aggregate 1000 samples", |b| {
        b.iter(|| {
            for r in &records {
                if let Ok(sample) = decode(r) {
                    agg.add(&sample);
                }
            }
        })
    });
}

fn report(c: &mut Criterion) {
    let records = records();
    let mut agg = Aggregator::new(
        ProcessRegistry::default(),
        SystemTime::now(),
        CounterSnapshot::default(),
    );
    for r in &records {
        agg.add(&decode(r).expect("decodes"));
    }
    let snapshot = agg.flush(SystemTime::now(), CounterSnapshot::default());
    let mut reporter = Reporter::new(99, EventSource::CpuClock, Default::default());
    // First build reads kallsyms; measure the steady state after it.
    let _ = reporter.build(&snapshot, (0, 0, 0));
    c.bench_function("symbolize+encode+gzip one interval", |b| {
        b.iter(|| gzip(&reporter.build(black_box(&snapshot), (0, 0, 0)).profile))
    });
}

fn symbolize(c: &mut Criterion) {
    let exe = std::fs::read_link("/proc/self/exe").expect("exe");
    let image = ElfImage::open(&FilePath::from(&exe), None).expect("own ELF");
    let addrs: Vec<u64> = image
        .segments
        .iter()
        .flat_map(|s| (s.vaddr..s.vaddr + s.mem_size.min(1 << 20)).step_by(97))
        .take(10_000)
        .collect();
    c.bench_function("symbolize 10000 addresses (cached file)", |b| {
        b.iter(|| addrs.iter().filter_map(|&a| image.resolve(a)).count())
    });
    c.bench_function("parse own executable (cold)", |b| {
        b.iter(|| ElfImage::open(&FilePath::from(&exe), None).expect("parse"))
    });
    let libc = own_libc();
    c.bench_function("parse libc.so.6 (cold)", |b| {
        b.iter(|| ElfImage::open(&FilePath::from(&libc), None).expect("parse"))
    });
}

/// Compiling a file's unwind table, as the unwind stage does for each new executable file:
/// read and parse the file, evaluate every FDE's CFI, sort and merge the rows.
fn unwind_tables(c: &mut Criterion) {
    let own = std::fs::read_link("/proc/self/exe").expect("exe");
    let libc = own_libc();
    for (label, path) in [("libc.so.6", libc), ("own executable", own)] {
        let compile = || {
            let file = std::fs::File::open(&path).expect("open");
            let len = file.metadata().expect("metadata").len();
            let cache = WindowedFile::cache(file, len);
            let elf = object::File::parse(&cache).expect("parse");
            let (table, _) = table::compile(&elf, None::<&object::File<'_, &[u8]>>).expect("compile");
            table.rows.len()
        };
        let rows = compile();
        c.bench_function(&format!("unwind table: compile {label} ({rows} rows)"), |b| {
            b.iter(compile)
        });
    }
}

/// The C library this process maps.
fn own_libc() -> std::path::PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so"))
        .map(std::path::PathBuf::from)
        .expect("libc mapped")
}

fn names(c: &mut Criterion) {
    let exe = std::fs::read_link("/proc/self/exe").expect("exe");
    // The whole binary's DWARF, however large (the daemon would cap it by its budget).
    let image = ElfImage::open_with(&FilePath::from(&exe), None, u64::MAX).expect("own ELF");
    assert!(
        image.dwarf.is_some(),
        "the bench binary has no DWARF (profile.bench debug)"
    );
    // Addresses with DWARF lines, spread over the code.
    let addrs: Vec<u64> = image
        .segments
        .iter()
        .flat_map(|s| (s.vaddr..s.vaddr + s.mem_size).step_by(61))
        .filter(|&a| image.resolve(a).is_some_and(|f| f[0].file.is_some()))
        .take(10_000)
        .collect();
    let inlined = addrs
        .iter()
        .filter(|&&a| image.resolve(a).is_some_and(|f| f.len() > 1))
        .count();
    assert!(inlined > 100, "only {inlined} addresses with inlined frames");
    let mut cache = NameCache::new(32 * 1024);
    for &a in &addrs {
        cache.get_or_resolve((7u64, a), || image.resolve(a));
    }
    c.bench_function("name cache: 10000 cached lookups", |b| {
        b.iter(|| {
            addrs
                .iter()
                .filter(|&&a| cache.get_or_resolve((7u64, a), || None).0.is_some())
                .count()
        })
    });
    c.bench_function(
        "DWARF cold: first lookups of 10000 addresses (inline frames)",
        |b| {
            b.iter_batched(
                || ElfImage::open_with(&FilePath::from(&exe), None, u64::MAX).expect("parse"),
                |fresh| addrs.iter().filter_map(|&a| fresh.resolve(a)).count(),
                BatchSize::PerIteration,
            )
        },
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = decode_and_aggregate, report, symbolize, unwind_tables, names
}
criterion_main!(benches);
