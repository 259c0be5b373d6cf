//! End-to-end tests: the real daemon binary, real BPF, real fixture processes.
//!
//! Privileged tests need root (CAP_BPF + CAP_PERFMON). Under `cargo xtask test`
//! (PROFILER_REQUIRE_PRIVILEGED=1) a missing privilege fails the test; under a plain
//! `cargo test` as an ordinary user they are skipped with the reason printed.
use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _, read::File as ElfFile};
use profiler::{encode::decode, pprof::Profile, rootfs::FilePath};
use tests::{
    Fixture, build_dir, c_fixture, compressed_inline_fixture, cpp_fixture, dlopen_fixture, go_fixture,
    go_inline_fixture, inline_fixture, marker_line, nofp_c_fixture, nofp_cpp_fixture, nofp_rust_fixture,
    privileged, profiler_bin, recurse_fixture, serial, signal_fixture, stripped_go_fixture,
    stripped_go_inline_fixture, stripped_inline_fixture,
};

/// Runs the profiler to completion (bounded by `limit`).
fn profiler(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(profiler_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start profiler");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("profiler {args:?} did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("profiler output")
}

fn record(extra: &[&str], seconds: u32, out: &Path) -> Profile {
    let duration = format!("{seconds}s");
    let mut args = vec![
        "record",
        "--duration",
        &duration,
        "--output",
        out.to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    let output = profiler(&args, Duration::from_secs(u64::from(seconds) + 30));
    assert!(
        output.status.success(),
        "profiler record failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    decode(&std::fs::read(out).expect("profile written")).expect("profile decodes")
}

/// A recording of one fixture process at 250 Hz: its profile, pid and file (in `_dir`).
struct Recorded {
    profile: Profile,
    pid: u32,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

/// Records `fixture` alone for `seconds`, then stops it.
fn record_fixture(fixture: Fixture, seconds: u32) -> Recorded {
    record_fixture_with(fixture, seconds, &[])
}

/// Records `fixture` alone at 250 Hz for `seconds` with `extra` flags, then stops it.
fn record_fixture_with(fixture: Fixture, seconds: u32, extra: &[&str]) -> Recorded {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("fixture.pb.gz");
    let pid = fixture.pid();
    let pid_text = pid.to_string();
    let mut args = vec!["--pid", pid_text.as_str(), "--frequency", "250"];
    args.extend_from_slice(extra);
    let profile = record(&args, seconds, &out);
    drop(fixture);
    Recorded {
        profile,
        pid,
        out,
        _dir: dir,
    }
}

/// A decoded profile, indexed for the questions a user asks of it.
struct View<'a> {
    p: &'a Profile,
    locations: HashMap<u64, &'a profiler::pprof::Location>,
    functions: HashMap<u64, &'a str>,
}

impl<'a> View<'a> {
    fn new(p: &'a Profile) -> Self {
        let functions = p
            .function
            .iter()
            .map(|f| (f.id, p.string_table[f.name as usize].as_str()))
            .collect();
        let locations = p.location.iter().map(|l| (l.id, l)).collect();
        Self {
            p,
            locations,
            functions,
        }
    }

    fn s(&self, i: i64) -> &str {
        &self.p.string_table[i as usize]
    }

    /// The profile's comments (the daemon's counters and figures).
    fn comments(&self) -> Vec<&'a str> {
        self.p
            .comment
            .iter()
            .map(|&i| self.p.string_table[i as usize].as_str())
            .collect()
    }

    /// The comment starting with `prefix`.
    fn comment(&self, prefix: &str) -> &'a str {
        let comments = self.comments();
        comments
            .iter()
            .find(|c| c.starts_with(prefix))
            .copied()
            .unwrap_or_else(|| panic!("no comment starting with {prefix:?} in {comments:?}"))
    }

    /// Function names of a sample's stack, leaf first (innermost line first).
    fn stack(&self, sample: &profiler::pprof::Sample) -> Vec<&str> {
        sample
            .location_id
            .iter()
            .flat_map(|id| {
                self.locations[id]
                    .line
                    .iter()
                    .map(|l| self.functions[&l.function_id])
            })
            .collect()
    }

    fn label(&self, sample: &profiler::pprof::Sample, key: &str) -> Option<(i64, String)> {
        sample
            .label
            .iter()
            .find(|l| self.s(l.key) == key)
            .map(|l| (l.num, self.s(l.str).to_owned()))
    }

    fn samples_of(&self, pid: u32) -> Vec<&'a profiler::pprof::Sample> {
        self.p
            .sample
            .iter()
            .filter(|s| self.label(s, "pid").is_some_and(|(n, _)| n == i64::from(pid)))
            .collect()
    }

    fn count(sample: &profiler::pprof::Sample) -> i64 {
        sample.value[0]
    }
}

fn build_id_of(path: &Path) -> String {
    let data = std::fs::read(path).expect("read fixture");
    let elf = ElfFile::parse(data.as_slice()).expect("parse fixture");
    let id = elf.build_id().expect("notes").expect("fixture has a build id");
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// (vaddr start, vaddr end, file offset) of the executable PT_LOAD segment.
fn exec_segment_of(path: &Path) -> (u64, u64, u64) {
    use object::{ObjectSegment as _, SegmentFlags};
    let data = std::fs::read(path).expect("read fixture");
    let elf = ElfFile::parse(data.as_slice()).expect("parse fixture");
    let text = elf
        .segments()
        .find(|s| matches!(s.flags(), SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0))
        .expect("an executable segment");
    (text.address(), text.address() + text.size(), text.file_range().0)
}

fn go_tool_pprof(args: &[&str], profile: &Path) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(profile)
        .env("PPROF_TMPDIR", build_dir())
        .output()
        .expect("go tool pprof runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "go tool pprof {args:?} rejected the profile:\n{stderr}"
    );
    assert!(
        !stderr.contains("error") && !stderr.contains("failed"),
        "go tool pprof complained:\n{stderr}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn c_fixture_profile_has_known_ratio_main_kernel_names_and_reads_in_go_pprof() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let bin = c_fixture();
    let fixture = Fixture::start(bin, 60);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("c.pb.gz");
    let pid = fixture.pid().to_string();
    let profile = record(&["--pid", &pid, "--frequency", "250"], 4, &out);
    drop(fixture);
    let view = View::new(&profile);

    let samples = view.samples_of(fixture_pid(&pid));
    let total: i64 = samples.iter().map(|s| View::count(s)).sum();
    assert!(total > 300, "expected a busy CPU's worth of samples, got {total}");
    assert_eq!(
        total,
        profile.sample.iter().map(View::count).sum::<i64>(),
        "--pid recorded other processes"
    );

    let leaf_count = |name: &str| -> i64 {
        samples
            .iter()
            .filter(|s| view.stack(s).first() == Some(&name))
            .map(|s| View::count(s))
            .sum()
    };
    let (a, b) = (leaf_count("hot_a"), leaf_count("hot_b"));
    let ratio = a as f64 / b.max(1) as f64;
    assert!(
        (2.2..=4.0).contains(&ratio),
        "hot_a:hot_b should be ~3:1, got {a}:{b}"
    );

    let hot: i64 = leaf_count("hot_a") + leaf_count("hot_b");
    let with_main: i64 = samples
        .iter()
        .filter(|s| {
            matches!(view.stack(s).first(), Some(&"hot_a" | &"hot_b")) && view.stack(s).contains(&"main")
        })
        .map(|s| View::count(s))
        .sum();
    assert!(
        with_main * 100 >= hot * 95,
        "main in {with_main} of {hot} hot samples"
    );

    for s in &samples {
        assert_eq!(view.label(s, "comm").map(|(_, c)| c).as_deref(), Some("burn"));
    }
    let thread_label = profile.sample.iter().flat_map(|s| &s.label).any(|l| {
        let key = view.s(l.key);
        key == "tid" || key == "thread_id"
    });
    assert!(!thread_label, "thread ids must not be labels");

    // Kernel time under read(/dev/zero) has named kernel frames.
    let kernel = profile
        .mapping
        .iter()
        .find(|m| view.s(m.filename) == "[kernel.kallsyms]")
        .expect("a kernel mapping");
    assert!(kernel.has_functions);
    let kernel_locations: Vec<_> = profile
        .location
        .iter()
        .filter(|l| l.mapping_id == kernel.id)
        .collect();
    let unnamed = kernel_locations
        .iter()
        .filter(|l| view.functions[&l.line[0].function_id].starts_with("[kernel.kallsyms]+"))
        .count();
    assert!(
        !kernel_locations.is_empty() && unnamed == 0,
        "{unnamed} of {} kernel frames unnamed",
        kernel_locations.len()
    );
    // The names come from the kernel's own lookup (the ksym_names program); each is the
    // /proc/kallsyms symbol whose range holds the address.
    let kallsyms = KallsymsRanges::read();
    for l in &kernel_locations {
        let name = view.functions[&l.line[0].function_id];
        assert!(
            kallsyms.covers(name, l.address),
            "kernel frame 0x{:x} named {name}, which /proc/kallsyms does not place there",
            l.address
        );
    }
    let read_stacks = samples
        .iter()
        .filter(|s| view.stack(s).contains(&"read_zero"))
        .count();
    let kernel_read = samples
        .iter()
        .filter(|s| {
            view.stack(s)
                .iter()
                .any(|f| f.contains("vfs_read") || f.contains("ksys_read"))
        })
        .count();
    assert!(
        read_stacks > 0 && kernel_read > 0,
        "read_zero stacks {read_stacks}, kernel read frames {kernel_read}"
    );

    // The fixture's mapping carries its GNU build id and says it is symbolized.
    let fixture_mapping = profile
        .mapping
        .iter()
        .find(|m| view.s(m.filename) == bin.to_str().expect("utf8"))
        .expect("a mapping for the fixture binary");
    assert_eq!(view.s(fixture_mapping.build_id), build_id_of(bin));
    assert!(fixture_mapping.has_functions);
    // Its range is the fixture's executable PT_LOAD segment, as the ELF file itself says.
    let (seg_start, seg_end, seg_offset) = exec_segment_of(bin);
    assert_eq!(
        (
            fixture_mapping.memory_start,
            fixture_mapping.memory_limit,
            fixture_mapping.file_offset
        ),
        (seg_start, seg_end, seg_offset),
        "fixture mapping is not its text segment"
    );
    for l in profile
        .location
        .iter()
        .filter(|l| l.mapping_id == fixture_mapping.id)
    {
        assert!(
            (seg_start..seg_end).contains(&l.address),
            "location {l:?} outside the text segment"
        );
    }

    // The reference reader accepts it and sees the same hot functions.
    let top = go_tool_pprof(&["-top"], &out);
    assert!(top.contains("hot_a") && top.contains("hot_b"), "{top}");
    let raw = go_tool_pprof(&["-raw"], &out);
    assert!(
        raw.contains("PeriodType: cpu nanoseconds") && raw.contains("comm:[burn]"),
        "{raw}"
    );
}

/// /proc/kallsyms' text symbols, to check kernel frame names against.
struct KallsymsRanges {
    /// Distinct start addresses, sorted.
    starts: Vec<u64>,
    by_name: HashMap<String, Vec<u64>>,
}

impl KallsymsRanges {
    fn read() -> Self {
        let text = std::fs::read_to_string("/proc/kallsyms").expect("/proc/kallsyms");
        let mut starts = Vec::new();
        let mut by_name: HashMap<String, Vec<u64>> = HashMap::new();
        for line in text.lines() {
            let mut cols = line.split_ascii_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (cols.next(), cols.next(), cols.next()) else {
                continue;
            };
            let addr = u64::from_str_radix(addr, 16).expect("kallsyms address");
            if matches!(kind, "t" | "T" | "w" | "W") {
                starts.push(addr);
                by_name.entry(name.to_owned()).or_default().push(addr);
            }
        }
        starts.sort_unstable();
        starts.dedup();
        Self { starts, by_name }
    }

    /// `name` starts at or below `addr`, and no other symbol starts between them.
    fn covers(&self, name: &str, addr: u64) -> bool {
        self.by_name.get(name).is_some_and(|starts| {
            starts.iter().any(|&start| {
                let next = self.starts.partition_point(|&s| s <= start);
                start <= addr && self.starts.get(next).is_none_or(|&n| addr < n)
            })
        })
    }
}

fn fixture_pid(pid: &str) -> u32 {
    pid.parse().expect("pid")
}

#[test]
fn dwarf_gives_files_lines_and_inlined_frames() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    check_inline_frames(inline_fixture(), &C_INLINED);
}

#[test]
fn stripped_binary_is_named_from_its_separate_debug_file() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let bin = stripped_inline_fixture();
    let data = std::fs::read(bin).expect("read stripped fixture");
    let elf = ElfFile::parse(data.as_slice()).expect("parse");
    assert!(elf.symbol_table().is_none(), "fixture is not stripped");
    check_inline_frames(bin, &C_INLINED);
}

/// The inlined call a fixture spends its time in: (function, marker comment of its line) for
/// the inlined callee and for its caller, in `source`.
struct Inlined {
    source: &'static str,
    inner: (&'static str, &'static str),
    outer: (&'static str, &'static str),
}

const C_INLINED: Inlined = Inlined {
    source: "inline.c",
    inner: ("mix", "/* MIX_LINE */"),
    outer: ("hot_inline", "/* CALL_LINE */"),
};

const CPP_INLINED: Inlined = Inlined {
    source: "hot.cpp",
    inner: (
        "shop::Basket<unsigned long>::mix(unsigned long, unsigned long)",
        "// CPP_MIX_LINE",
    ),
    outer: (
        "shop::Basket<unsigned long>::fill(unsigned long)",
        "// CPP_CALL_LINE",
    ),
};

#[test]
fn cpp_frames_are_demangled_with_lines_and_inlined_calls() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    check_inline_frames(cpp_fixture(), &CPP_INLINED);
}

/// Records `bin` and checks names, files, lines and inlined frames in the profile and in
/// `go tool pprof`.
fn check_inline_frames(bin: &Path, expect: &Inlined) {
    let Recorded {
        profile,
        pid,
        out,
        _dir,
    } = record_fixture(Fixture::start(bin, 60), 3);
    let view = View::new(&profile);
    let (mix_line, call_line) = (
        marker_line(expect.source, expect.inner.1),
        marker_line(expect.source, expect.outer.1),
    );

    let mapping = profile
        .mapping
        .iter()
        .find(|m| view.s(m.filename) == bin.to_str().expect("utf8"))
        .expect("fixture mapping");
    assert!(
        mapping.has_functions
            && mapping.has_filenames
            && mapping.has_line_numbers
            && mapping.has_inline_frames
    );

    // Leaf locations in the hot loop: mix (inlined, at its line) then hot_inline (at the call).
    let lines_of = |l: &profiler::pprof::Location| -> Vec<(String, String, i64)> {
        l.line
            .iter()
            .map(|line| {
                let f = profile
                    .function
                    .iter()
                    .find(|f| f.id == line.function_id)
                    .expect("function");
                (
                    view.s(f.name).to_owned(),
                    view.s(f.filename).to_owned(),
                    line.line,
                )
            })
            .collect()
    };
    let (samples, total) = samples_and_total(&view, pid);
    let inlined: i64 = samples
        .iter()
        .filter(|s| {
            let leaf = s
                .location_id
                .first()
                .and_then(|id| profile.location.iter().find(|l| l.id == *id));
            leaf.is_some_and(|l| {
                let lines = lines_of(l);
                lines.len() == 2
                    && lines[0].0 == expect.inner.0
                    && lines[0].1.ends_with(expect.source)
                    && lines[0].2 == mix_line
                    && lines[1].0 == expect.outer.0
                    && lines[1].2 == call_line
            })
        })
        .map(|s| View::count(s))
        .sum();
    assert!(total > 300, "{total} samples");
    assert!(
        inlined * 2 >= total,
        "{}@{mix_line} inlined in {}@{call_line} in {inlined} of {total} samples",
        expect.inner.0,
        expect.outer.0
    );

    let raw = go_tool_pprof(&["-raw"], &out);
    assert!(
        raw.contains("[FN][FL][LN][IN]"),
        "mapping flags not shown:\n{raw}"
    );
    let lines = go_tool_pprof(&["-top", "-lines"], &out);
    assert!(
        lines.contains(&format!("{}:{mix_line}", expect.source)),
        "{lines}"
    );
}

#[test]
fn jit_frames_are_named_from_the_perf_map() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let fixture = Fixture::start_node(60);
    // V8 compiles hotLoop within the first second; record after that.
    std::thread::sleep(Duration::from_secs(1));
    let Recorded {
        profile,
        pid,
        out,
        _dir,
    } = record_fixture(fixture, 3);
    let view = View::new(&profile);
    let (samples, total) = samples_and_total(&view, pid);
    let in_hot_loop: i64 = samples
        .iter()
        .filter(|s| {
            view.stack(s)
                .iter()
                .any(|f| f.contains("hotLoop") && f.contains("hot.js"))
        })
        .map(|s| View::count(s))
        .sum();
    assert!(total > 300, "{total} samples");
    assert!(
        in_hot_loop * 10 >= total * 8,
        "hotLoop named in {in_hot_loop} of {total} samples"
    );
    // The JIT frames sit on native ones: V8's entry and node's own (C++, demangled) frames.
    let native = samples.iter().any(|s| {
        view.stack(s)
            .iter()
            .any(|f| f.starts_with("node::") || f.starts_with("Builtins_JSEntry"))
    });
    assert!(native, "no native frames below the JIT frames");
    go_tool_pprof(&["-top"], &out);
}

/// The `.gopclntab` reader against the Go toolchain on the machine: every function the
/// unstripped binary's symbol table lists resolves, in the stripped binary, to the same name.
#[test]
fn gopclntab_names_every_function_of_a_stripped_go_binary() {
    use object::{ObjectSymbol as _, SymbolKind};
    use profiler::symbolize::{SymbolSource as _, elf::ElfImage};
    let full = std::fs::read(go_fixture()).expect("read Go fixture");
    let full = ElfFile::parse(full.as_slice()).expect("parse");
    let stripped = ElfImage::open(&FilePath::from(stripped_go_fixture()), None).expect("stripped Go fixture");
    assert!(
        stripped.symbols.is_empty() && stripped.dwarf.is_none(),
        "fixture is not stripped"
    );
    assert!(stripped.gopclntab.is_some(), "no .gopclntab found");
    let mut checked = 0;
    for symbol in full
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0)
    {
        let Ok(name) = symbol.name() else { continue };
        if !(name.starts_with("main.") || name.starts_with("runtime.")) || name.contains("..") {
            continue;
        }
        let resolved = stripped
            .resolve(symbol.address())
            .unwrap_or_else(|| panic!("{name} not resolved"));
        // The linker marks assembly functions `.abi0` in .symtab; .gopclntab has the name Go's
        // own tracebacks print. The last frame is the function holding the code (the ones
        // before it are calls inlined into it).
        assert_eq!(
            resolved.last().expect("a frame").name,
            name.trim_end_matches(".abi0"),
            "at {:#x}",
            symbol.address()
        );
        checked += 1;
    }
    assert!(checked > 500, "only {checked} functions checked");
    let hot = full
        .symbols()
        .find(|s| s.name() == Ok("main.hotA"))
        .expect("main.hotA");
    let names = stripped.resolve(hot.address() + 4).expect("main.hotA resolves");
    let file = names[0].file.as_deref().unwrap_or_default();
    assert!(file.ends_with("gohot/main.go"), "{file}");
    let func_line = marker_line("gohot/main.go", "func hotA(");
    assert!(
        (func_line..func_line + 8).contains(&names[0].line),
        "line {} for hotA at {func_line}",
        names[0].line
    );
}

/// Debug sections compressed with zlib or zstd (`SHF_COMPRESSED`, as distributions ship
/// them) name every address of the inline fixture exactly as the uncompressed build does.
#[test]
fn compressed_debug_sections_give_the_same_frames() {
    use profiler::symbolize::{SymbolSource as _, elf::ElfImage};
    let plain = ElfImage::open(&FilePath::from(inline_fixture()), None).expect("inline fixture");
    let data = std::fs::read(inline_fixture()).expect("read");
    let elf = ElfFile::parse(data.as_slice()).expect("parse");
    let text = elf.section_by_name(".text").expect(".text");
    for kind in ["zlib", "zstd"] {
        let path = compressed_inline_fixture(kind);
        let bytes = std::fs::read(&path).expect("read compressed");
        let compressed = ElfFile::parse(bytes.as_slice()).expect("parse");
        let info = compressed.section_by_name(".debug_info").expect(".debug_info");
        assert!(
            info.compressed_file_range().expect("range").format != object::CompressionFormat::None,
            "{kind}: .debug_info is not compressed"
        );
        let image = ElfImage::open(&FilePath::from(&path), None).expect("compressed fixture");
        assert!(image.dwarf.is_some(), "{kind}: DWARF not loaded");
        let (mut named, mut inlined) = (0, 0);
        for addr in (text.address()..text.address() + text.size()).step_by(3) {
            let ours = image.resolve(addr);
            assert_eq!(ours, plain.resolve(addr), "{kind} at {addr:#x}");
            if let Some(frames) = ours {
                named += usize::from(frames.iter().all(|f| f.file.is_some()));
                inlined += usize::from(frames.len() > 1);
            }
        }
        assert!(
            named > 50 && inlined > 5,
            "{kind}: {named} with lines, {inlined} inlined"
        );
    }
    // DWARF that would cost more than allowed is left out, and said so; symbols still name.
    let tight = ElfImage::open_with(&FilePath::from(inline_fixture()), None, 1024).expect("inline fixture");
    assert!(tight.dwarf.is_none() && tight.dwarf_over_budget);
    let symbol = elf
        .symbols()
        .find(|s| s.name() == Ok("main"))
        .expect("main in the symbol table");
    let names = tight
        .resolve(symbol.address())
        .expect("named from the symbol table");
    assert_eq!((names[0].name.as_str(), names[0].file.as_deref()), ("main", None));
}

/// A compression header that understates the size (a decompression bomb's trick) is caught:
/// the zstd decoder stops just past the claimed size, and the section is refused, not grown.
#[test]
fn compressed_sections_cannot_expand_past_their_claimed_size() {
    use profiler::{
        object::{SectionError, section_bytes},
        symbolize::{SymbolSource as _, elf::ElfImage},
    };
    let path = compressed_inline_fixture("zstd");
    let mut bytes = std::fs::read(&path).expect("read");
    let (offset, real_size) = {
        let elf = ElfFile::parse(bytes.as_slice()).expect("parse");
        let info = elf.section_by_name(".debug_info").expect(".debug_info");
        let range = info.compressed_file_range().expect("range");
        assert_eq!(range.format, object::CompressionFormat::Zstandard);
        assert!(matches!(
            section_bytes(&info, 10),
            Err(SectionError::TooLarge { max: 10, .. })
        ));
        (info.file_range().expect("in the file").0, range.uncompressed_size)
    };
    // Elf64_Chdr: ch_type (4), ch_reserved (4), ch_size (8), ch_addralign (8).
    let at = usize::try_from(offset).expect("offset") + 8;
    bytes[at..at + 8].copy_from_slice(&16u64.to_le_bytes());
    let elf = ElfFile::parse(bytes.as_slice()).expect("parse patched");
    let info = elf.section_by_name(".debug_info").expect(".debug_info");
    assert!(real_size > 16);
    assert!(matches!(
        section_bytes(&info, u64::MAX),
        Err(SectionError::Corrupt)
    ));
    // The file still parses and names its functions from the symbol table.
    let image = ElfImage::parse(bytes.as_slice()).expect("patched file parses");
    let main = elf.symbols().find(|s| s.name() == Ok("main")).expect("main");
    assert_eq!(image.resolve(main.address()).expect("named")[0].name, "main");
}

/// Inlined Go calls named from `.gopclntab` alone (a stripped binary) agree with the DWARF of
/// the unstripped build at every byte of `main.outer`, where the compiler inlined `middle` and,
/// inside it, `leaf`; the hot multiply is `leaf → middle → outer` at the marked lines.
#[test]
fn gopclntab_inlined_calls_match_dwarf() {
    use profiler::symbolize::{SymbolSource as _, dwarf::Dwarf, elf::ElfImage};
    let full = std::fs::read(go_inline_fixture()).expect("read Go inline fixture");
    let full = ElfFile::parse(full.as_slice()).expect("parse");
    let dwarf =
        Dwarf::load(&full, u64::MAX, "reference build").expect("uncompressed DWARF in the reference build");
    let stripped =
        ElfImage::open(&FilePath::from(stripped_go_inline_fixture()), None).expect("stripped fixture");
    assert!(stripped.symbols.is_empty(), "fixture is not stripped");
    let table = stripped.gopclntab.as_ref().expect(".gopclntab");
    assert!(
        table.has_inline_trees(),
        "inline trees not found in the stripped binary"
    );
    // A pure Go binary is named from its table alone: its DWARF is not even loaded.
    let unstripped = ElfImage::open(&FilePath::from(go_inline_fixture()), None).expect("Go inline fixture");
    assert!(unstripped.dwarf.is_none(), "DWARF loaded for a pure Go binary");
    let outer = full
        .symbols()
        .find(|s| s.name() == Ok("main.outer"))
        .expect("main.outer");
    let frames = |names: &[profiler::symbolize::FunctionName]| -> Vec<(String, i64)> {
        names.iter().map(|f| (f.name.clone(), f.line)).collect()
    };
    let (mut compared, mut inlined) = (0, 0);
    for addr in outer.address()..outer.address() + outer.size() {
        let reference = dwarf.frames(addr);
        if reference.is_empty() {
            continue;
        }
        let ours = stripped.resolve(addr).expect("resolves");
        assert_eq!(frames(&ours), frames(&reference), "at {addr:#x}");
        assert!(
            ours.iter()
                .all(|f| f.file.as_deref().is_some_and(|f| f.ends_with("goinline/main.go"))),
            "files at {addr:#x}: {ours:?}"
        );
        compared += 1;
        inlined += usize::from(ours.len() > 1);
    }
    assert!(
        compared >= 40 && inlined >= 20,
        "{compared} addresses, {inlined} with inlined calls"
    );
    // The same across the whole binary (the runtime inlines a lot), at every 5th byte.
    let (mut compared, mut inlined, mut differ) = (0, 0, Vec::new());
    for symbol in full.symbols().filter(|s| s.kind() == object::SymbolKind::Text) {
        for addr in (symbol.address()..symbol.address() + symbol.size()).step_by(5) {
            let reference = dwarf.frames(addr);
            if reference.is_empty() {
                continue;
            }
            let ours = stripped.resolve(addr).map(|f| frames(&f)).unwrap_or_default();
            compared += 1;
            inlined += usize::from(ours.len() > 1);
            if ours.len() != reference.len()
                || ours
                    .iter()
                    .zip(frames(&reference))
                    .any(|((a, al), (b, bl))| *al != bl || !same_go_name(a, &b))
            {
                differ.push((addr, ours, frames(&reference)));
            }
        }
    }
    // Go's DWARF and its table disagree in a handful of places (a line in a few runtime
    // functions; an inlined method under its autogenerated pointer wrapper, which DWARF folds
    // into the wrapper): 29 of 103,146 addresses with Go 1.19. The table is what Go's own
    // tracebacks print.
    assert!(
        compared > 50_000 && inlined > 5_000 && differ.len() * 1000 <= compared,
        "{compared} addresses, {inlined} with inlined calls, {} differ: {:?}",
        differ.len(),
        &differ[..differ.len().min(10)]
    );
    let line = |marker| marker_line("goinline/main.go", marker);
    let expected = vec![
        ("main.leaf".to_owned(), line("// LEAF")),
        ("main.middle".to_owned(), line("// MIDDLE")),
        ("main.outer".to_owned(), line("// OUTER")),
    ];
    assert!(
        (outer.address()..outer.address() + outer.size())
            .any(|addr| stripped.resolve(addr).is_some_and(|f| frames(&f) == expected)),
        "no address of main.outer is {expected:?}"
    );
}

/// Go function names as `.gopclntab` and DWARF spell them: the table writes `[...]` where
/// DWARF has the array length or type parameters (`type..eq.[5]main.t`, `f[go.shape.int]`).
fn same_go_name(table: &str, dwarf: &str) -> bool {
    match table.split_once("[...]") {
        None => table == dwarf,
        Some((before, after)) => {
            dwarf.starts_with(before)
                && dwarf.ends_with(after)
                && dwarf.len() >= before.len() + after.len()
                && dwarf[before.len()..dwarf.len() - after.len()].starts_with('[')
        }
    }
}

#[test]
fn stripped_go_binary_is_named_in_profiles() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let bin = stripped_go_fixture();
    let Recorded {
        profile,
        pid,
        out,
        _dir,
    } = record_fixture(Fixture::start(bin, 60), 3);
    let view = View::new(&profile);
    let (samples, total) = samples_and_total(&view, pid);
    let named: i64 = samples
        .iter()
        .filter(|s| {
            view.stack(s)
                .iter()
                .any(|f| *f == "main.hotA" || *f == "main.hotB")
        })
        .map(|s| View::count(s))
        .sum();
    assert!(
        total > 200 && named * 10 >= total * 9,
        "main.hotA/B in {named} of {total} samples"
    );
    let top = go_tool_pprof(&["-top", "-lines"], &out);
    assert!(top.contains("main.go:"), "no Go file:line in\n{top}");
}

/// A profile of the stripped Go inlining fixture: samples in the inlined code carry
/// `leaf → middle → outer → main` as lines of one location each, as Go's own pprof shows them.
#[test]
fn stripped_go_inlined_calls_appear_in_profiles() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let Recorded {
        profile,
        pid,
        out,
        _dir,
    } = record_fixture(Fixture::start(stripped_go_inline_fixture(), 60), 3);
    let view = View::new(&profile);
    let (samples, total) = samples_and_total(&view, pid);
    let count = |pred: &dyn Fn(&[&str]) -> bool| -> i64 {
        samples
            .iter()
            .filter(|s| pred(&view.stack(s)))
            .map(|s| View::count(s))
            .sum()
    };
    let in_outer = count(&|stack| stack.contains(&"main.outer"));
    let through_leaf = count(&|stack| {
        stack
            .windows(4)
            .any(|w| w == ["main.leaf", "main.middle", "main.outer", "main.main"])
    });
    let leaf_anywhere = count(&|stack| stack.contains(&"main.leaf"));
    assert!(
        total > 200 && in_outer * 10 >= total * 9,
        "main.outer in {in_outer} of {total}"
    );
    assert!(
        through_leaf * 5 >= in_outer && through_leaf == leaf_anywhere,
        "leaf → middle → outer → main in {through_leaf} of {in_outer} samples in outer ({leaf_anywhere} with leaf)\n{}",
        stacks_without(&view, &samples, &["main.leaf"])
    );
    // Inlined calls share the location of the code that holds them.
    let leaf_location = profile
        .location
        .iter()
        .find(|l| {
            l.line
                .first()
                .is_some_and(|line| view.functions[&line.function_id] == "main.leaf")
        })
        .expect("a location in main.leaf");
    let names: Vec<&str> = leaf_location
        .line
        .iter()
        .map(|l| view.functions[&l.function_id])
        .collect();
    assert_eq!(names, ["main.leaf", "main.middle", "main.outer"]);
    let lines: Vec<i64> = leaf_location.line.iter().map(|l| l.line).collect();
    assert_eq!(
        lines[1..],
        [
            marker_line("goinline/main.go", "// MIDDLE"),
            marker_line("goinline/main.go", "// OUTER")
        ]
    );
    let top = go_tool_pprof(&["-top", "-lines"], &out);
    assert!(top.contains("main.leaf") && top.contains("main.go:"), "{top}");
}

#[test]
fn go_fixture_frames_are_named() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let bin = go_fixture();
    let Recorded {
        profile,
        pid,
        out,
        _dir,
    } = record_fixture(Fixture::start(bin, 60), 3);
    let view = View::new(&profile);
    let (samples, total) = samples_and_total(&view, pid);
    assert!(total > 200, "got {total} samples");
    let with = |name: &str| -> i64 {
        samples
            .iter()
            .filter(|s| view.stack(s).contains(&name))
            .map(|s| View::count(s))
            .sum()
    };
    let (a, b, main) = (with("main.hotA"), with("main.hotB"), with("main.main"));
    assert!(a > 0 && b > 0, "main.hotA {a}, main.hotB {b}");
    let ratio = a as f64 / b as f64;
    assert!(
        (2.2..=4.0).contains(&ratio),
        "main.hotA:main.hotB should be ~3:1, got {a}:{b}"
    );
    assert!(
        main * 100 >= (a + b) * 99,
        "main.main in {main} of {} hot samples",
        a + b
    );
    // Go has no .eh_frame: the frame-pointer path walks it, and no walk may end early.
    let truncated = truncated_samples(&view, &samples);
    assert_eq!(
        truncated,
        0,
        "Go walks ended early:\n{}",
        stacks_without(&view, &samples, &["main.main"])
    );
    // Frame-pointer walks through Go's runtime (stack switches) can yield a stray return
    // address inside the binary but outside any function; such frames must stay rare.
    let unnamed: i64 = samples
        .iter()
        .filter(|s| view.stack(s).iter().any(|f| f.starts_with("gohot+")))
        .map(|s| View::count(s))
        .sum();
    assert!(
        unnamed * 50 <= total,
        "{unnamed} of {total} samples have unnamed Go frames"
    );
    let top = go_tool_pprof(&["-top"], &out);
    assert!(top.contains("main.hotA"), "{top}");
}

#[test]
fn whole_system_recording_sees_every_busy_process() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let c = Fixture::start(c_fixture(), 60);
    let go = Fixture::start(go_fixture(), 60);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("all.pb.gz");
    let profile = record(&[], 3, &out);
    let view = View::new(&profile);
    let pids: HashSet<i64> = profile
        .sample
        .iter()
        .filter_map(|s| view.label(s, "pid"))
        .map(|(n, _)| n)
        .collect();
    assert!(
        pids.contains(&i64::from(c.pid())),
        "C fixture missing from {pids:?}"
    );
    assert!(
        pids.contains(&i64::from(go.pid())),
        "Go fixture missing from {pids:?}"
    );
    for s in &profile.sample {
        assert!(!s.location_id.is_empty(), "sample without frames");
        assert!(view.label(s, "comm").is_some(), "sample without comm");
    }
    assert!(
        profile.time_nanos > 0 && profile.duration_nanos >= 2_900_000_000,
        "time/duration unset"
    );
    assert_eq!(
        profile.period,
        1_000_000_000 / 99,
        "default record frequency is 99 Hz"
    );
    go_tool_pprof(&["-top"], &out);
}

#[test]
fn run_writes_one_profile_per_interval_keeps_retention_and_flushes_on_sigterm() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let fixture = Fixture::start(c_fixture(), 60);
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("archive");
    let child = Command::new(profiler_bin())
        .args([
            "run",
            "--interval",
            "1s",
            "--retain-count",
            "3",
            "--pid",
            &fixture.pid().to_string(),
        ])
        .arg("--output-dir")
        .arg(&archive)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start profiler run");
    thread::sleep(Duration::from_millis(5500));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().expect("profiler exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "profiler run did not exit cleanly on SIGTERM:\n{stderr}"
    );
    assert!(stderr.contains("stopping"), "{stderr}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&archive)
        .expect("archive dir")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "retention keeps 3 of ~6 profiles: {files:?}");
    for file in &files {
        let name = file.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(name.starts_with("cpu-") && name.ends_with(".pb.gz"), "{name}");
        let p = decode(&std::fs::read(file).expect("read")).expect("decodes");
        assert!(
            p.duration_nanos > 0 && p.duration_nanos < 2_000_000_000,
            "one interval per file"
        );
        assert_eq!(p.period, 1_000_000_000 / 19, "default run frequency is 19 Hz");
    }
    // Full intervals of a busy single-threaded process hold ~19 samples.
    let full = decode(&std::fs::read(&files[0]).expect("read")).expect("decodes");
    let samples: i64 = full.sample.iter().map(View::count).sum();
    assert!(
        (10..=30).contains(&samples),
        "{samples} samples in a 1 s interval at 19 Hz"
    );
}

fn expect_failure(args: &[&str], needle: &str) {
    let out = profiler(args, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        stderr.contains(needle),
        "{args:?}: expected `{needle}` in:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn user_errors_are_named() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    expect_failure(
        &["record", "--pid", "4000000", "-d", "1s"],
        "no process with pid 4000000",
    );
    expect_failure(
        &["record", "--frequency", "0"],
        "--frequency must be between 1 and 1000 Hz, got 0",
    );
    expect_failure(&["record", "--bogus"], "unexpected argument '--bogus'");
    expect_failure(
        &["record", "--duration", "100ms"],
        "--duration must be at least 1s",
    );
    expect_failure(
        &["record", "-o", "/nonexistent-dir/x.pb.gz"],
        "the directory /nonexistent-dir does not exist",
    );
    expect_failure(&["run", "--retain-bytes", "lots"], "is not a size");

    // Without capabilities (root with an empty bounding set), the error names the capability.
    let out = Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all", "--"])
        .arg(profiler_bin())
        .args(["record", "-d", "1s", "-o", "/tmp/never.pb.gz"])
        .output()
        .expect("setpriv runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "recording without capabilities should fail"
    );
    assert!(stderr.contains("missing capability CAP_BPF"), "{stderr}");
}

/// The verifier's work on the sampling program was the largest part of the daemon's start-up
/// CPU. It once checked the whole user walk four times over (18,200 instructions, ~30 ms),
/// because values that differed by path were live across `bpf_loop`, and each of the row
/// search's 24 steps as a state of its own (4,600 once the walk was checked once); then ~2,200,
/// and ~3,600 since each probe looks its file's rows up in `UNWIND_ROWS` (an array of maps).
#[test]
fn sampling_program_is_verified_once_over() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("verify.pb.gz");
    let output = profiler(
        &[
            "record",
            "--duration",
            "1s",
            "--log",
            "profiler::bpf=debug",
            "--output",
            out.to_str().expect("utf8"),
        ],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let insns: u32 = stderr
        .split("verified_insns=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no verified_insns in the debug log:\n{stderr}"));
    assert!(
        (1_000..=4_000).contains(&insns),
        "the verifier processed {insns} instructions of the sampling program (expected ~3,600)"
    );
}

/// Whether `stack` has a frame named `needle` (a trailing `*` matches a prefix).
fn has_frame(stack: &[&str], needle: &str) -> bool {
    match needle.strip_suffix('*') {
        Some(prefix) => stack.iter().any(|f| f.starts_with(prefix)),
        None => stack.contains(&needle),
    }
}

/// Count-weighted share of `samples` whose stack contains every name in `names`.
fn share_with(view: &View, samples: &[&profiler::pprof::Sample], names: &[&str]) -> f64 {
    let total: i64 = samples.iter().map(|s| View::count(s)).sum();
    count_with(view, samples, names) as f64 / total.max(1) as f64
}

/// Samples (count-weighted) of `samples` whose stack contains every name in `names`.
fn count_with(view: &View, samples: &[&profiler::pprof::Sample], names: &[&str]) -> i64 {
    samples
        .iter()
        .filter(|s| {
            let stack = view.stack(s);
            names.iter().all(|n| has_frame(&stack, n))
        })
        .map(|s| View::count(s))
        .sum()
}

/// The function with the most samples on top of the stack (the physical function of the leaf
/// location, not a call inlined into it).
fn top_function<'a>(view: &View<'a>, samples: &[&'a profiler::pprof::Sample]) -> String {
    let mut flat: HashMap<String, i64> = HashMap::new();
    for s in samples {
        let leaf = s
            .location_id
            .first()
            .and_then(|id| view.locations[id].line.last())
            .map(|line| view.functions[&line.function_id]);
        if let Some(leaf) = leaf {
            *flat.entry(leaf.to_owned()).or_default() += View::count(s);
        }
    }
    flat.into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(f, _)| f)
        .unwrap_or_default()
}

/// The stacks of `samples` that lack one of `names`, for failure messages.
fn stacks_without(view: &View, samples: &[&profiler::pprof::Sample], names: &[&str]) -> String {
    let without: Vec<_> = samples
        .iter()
        .copied()
        .filter(|s| {
            let stack = view.stack(s);
            !names.iter().all(|n| has_frame(&stack, n))
        })
        .collect();
    show_stacks(view, &without)
}

/// The first five of `samples` as `  <count> x <leaf> <- … <- <root>` lines, for messages.
fn show_stacks(view: &View, samples: &[&profiler::pprof::Sample]) -> String {
    samples
        .iter()
        .take(5)
        .map(|s| format!("  {} x {}", View::count(s), view.stack(s).join(" <- ")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The samples of `pid` and their total count.
fn samples_and_total<'a>(view: &View<'a>, pid: u32) -> (Vec<&'a profiler::pprof::Sample>, i64) {
    let samples = view.samples_of(pid);
    let total = samples.iter().map(|s| View::count(s)).sum();
    (samples, total)
}

/// Records `fixture` and asserts that >= 99 % of its samples reach every name in `reach`, with
/// `hot` the function most often on top.
fn assert_complete_stacks(fixture: Fixture, reach: &[&str], hot: &str) -> Recorded {
    let recorded = record_fixture(fixture, 3);
    let view = View::new(&recorded.profile);
    let (samples, total) = samples_and_total(&view, recorded.pid);
    assert!(total > 300, "got {total} samples");
    let share = share_with(&view, &samples, reach);
    assert!(
        share >= 0.99,
        "{:.1} % of {total} samples reach {reach:?}; some that do not:\n{}",
        share * 100.0,
        stacks_without(&view, &samples, reach)
    );
    assert_eq!(top_function(&view, &samples), hot);
    recorded
}

#[test]
fn c_without_frame_pointers_unwinds_through_libc_and_a_shared_library() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let bin = nofp_c_fixture();
    let recorded = assert_complete_stacks(Fixture::start(bin, 60), &["main", "__libc_start*"], "deep_leaf");
    let view = View::new(&recorded.profile);
    let samples = view.samples_of(recorded.pid);
    // The whole chain, through qsort in libc and three frames of libdeep.so.
    let chain = [
        "deep_leaf",
        "deep_c",
        "deep_b",
        "deep_a",
        "compare",
        "sort_round",
        "main",
    ];
    let share = share_with(&view, &samples, &chain);
    assert!(
        share >= 0.9,
        "{:.1} % of samples have the whole chain",
        share * 100.0
    );
    let top = go_tool_pprof(&["-top"], &recorded.out);
    assert!(top.contains("deep_leaf"), "{top}");

    // The kernel's frame-pointer walk, for comparison, loses main in most samples.
    let fp = record_fixture_with(Fixture::start(bin, 60), 2, &["--unwinder", "frame-pointer"]);
    let view = View::new(&fp.profile);
    let samples = view.samples_of(fp.pid);
    let share = share_with(&view, &samples, &["main"]);
    assert!(
        share < 0.5,
        "frame pointers reached main in {:.1} %",
        share * 100.0
    );
}

#[test]
fn cpp_without_frame_pointers_unwinds_through_libstdcxx() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let recorded = assert_complete_stacks(
        Fixture::start(nofp_cpp_fixture(), 60),
        &["main", "run_for(double)"],
        "cpp_leaf(unsigned long)",
    );
    let view = View::new(&recorded.profile);
    let samples = view.samples_of(recorded.pid);
    // Exceptions: throwing runs libstdc++ (__cxa_throw) and libgcc_s (_Unwind_RaiseException),
    // both without frame pointers, between the thrower and main.
    let share = share_with(
        &view,
        &samples,
        &["__cxa_throw", "thrower(unsigned long)", "main"],
    );
    assert!(
        share >= 0.05,
        "libstdc++'s throw path in {:.1} % of samples",
        share * 100.0
    );
    let share = share_with(
        &view,
        &samples,
        &["Worker::step(unsigned long)", "cpp_leaf(unsigned long)"],
    );
    assert!(
        share >= 0.5,
        "member function in {:.1} % of samples",
        share * 100.0
    );
}

#[test]
fn rust_release_without_frame_pointers_reaches_main() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    assert_complete_stacks(
        Fixture::start(nofp_rust_fixture(), 60),
        &["nofp_rust::main", "main"],
        "nofp_rust::rust_leaf",
    );
}

#[test]
fn the_daemon_walks_its_own_frames_by_frame_pointer_without_a_table() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    // The daemon is built with frame pointers (.cargo/config.toml): it compiles no table for its
    // own executable, yet its own samples still unwind to their roots. A busy fixture gives it
    // work to sample (tables, names).
    let c = Fixture::start(c_fixture(), 60);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("own.pb.gz");
    let child = Command::new(profiler_bin())
        .args([
            "--log",
            "profiler::unwind=debug",
            "record",
            "--frequency",
            "999",
            "--duration",
            "3s",
        ])
        .arg("--output")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start profiler");
    let own_pid = child.id();
    let output = child.wait_with_output().expect("profiler output");
    drop(c);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    let own_exe = std::fs::canonicalize(profiler_bin()).expect("profiler path");
    let own_name = own_exe.to_str().expect("utf8");
    let own_tables: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("unwind table built") && l.contains(own_name))
        .collect();
    assert!(
        own_tables.is_empty(),
        "the daemon compiled its own table:\n{}",
        own_tables.join("\n")
    );
    assert!(
        log.contains("own executable keeps frame pointers"),
        "the daemon's executable was not recognised as its own:\n{log}"
    );
    let profile = decode(&std::fs::read(&out).expect("profile written")).expect("profile decodes");
    let view = View::new(&profile);
    let (samples, total) = samples_and_total(&view, own_pid);
    assert!(total >= 10, "{total} samples of the daemon itself");
    // Thread roots: the main thread's `main`, the other threads' `start_thread` (glibc).
    let (rooted, unrooted): (Vec<_>, Vec<_>) = samples.iter().copied().partition(|s| {
        let stack = view.stack(s);
        has_frame(&stack, "main") || has_frame(&stack, "start_thread")
    });
    let rooted_count: i64 = rooted.iter().map(|s| View::count(s)).sum();
    assert!(
        rooted_count as f64 >= 0.95 * total as f64,
        "{rooted_count} of {total} of the daemon's own samples reach a thread root; some that do not:\n{}",
        show_stacks(&view, &unrooted)
    );
}

#[test]
fn samples_in_a_signal_handler_unwind_through_the_signal_frame() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let recorded = assert_complete_stacks(Fixture::start(signal_fixture(), 60), &["main"], "spin");
    let view = View::new(&recorded.profile);
    let samples = view.samples_of(recorded.pid);
    let in_handler: Vec<_> = samples
        .iter()
        .copied()
        .filter(|s| view.stack(s).contains(&"handler_work"))
        .collect();
    let total: i64 = samples.iter().map(|s| View::count(s)).sum();
    let handler: i64 = in_handler.iter().map(|s| View::count(s)).sum();
    assert!(
        handler * 5 >= total,
        "only {handler} of {total} samples in the handler"
    );
    // Past the signal frame: the handler's samples reach the interrupted code's main.
    let share = share_with(&view, &in_handler, &["on_prof", "main"]);
    assert!(
        share >= 0.99,
        "{:.1} % of handler samples cross the signal frame:\n{}",
        share * 100.0,
        stacks_without(&view, &in_handler, &["on_prof", "main"])
    );
}

/// Copies the no-frame-pointer C fixture and its library into `dir`.
fn copy_nofp_c(dir: &Path, name: &str) -> PathBuf {
    let bin = nofp_c_fixture();
    let lib = bin.with_file_name("libdeep.so");
    let copy = dir.join(name);
    std::fs::copy(bin, &copy).expect("copy fixture");
    std::fs::copy(&lib, dir.join("libdeep.so")).expect("copy library");
    copy
}

#[test]
fn deleted_binaries_still_unwind_and_corrupt_cfi_never_crashes() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    // Deleted after start: the tables come from /proc/<pid>/map_files.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = copy_nofp_c(dir.path(), "deep-deleted");
    let fixture = Fixture::start(&copy, 60);
    std::fs::remove_file(&copy).expect("delete binary");
    std::fs::remove_file(dir.path().join("libdeep.so")).expect("delete library");
    // Reaching main is the completeness check; samples that landed in qsort or `compare`
    // (about 1 %) have no `deep_leaf` and are complete all the same.
    assert_complete_stacks(fixture, &["main"], "deep_leaf");

    // .eh_frame overwritten with garbage: the program runs (it never throws), the daemon must
    // neither crash nor lose the samples; walks that cannot continue say so.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = copy_nofp_c(dir.path(), "deep-corrupt");
    let mut data = std::fs::read(&copy).expect("read copy");
    let (offset, size) = {
        let elf = ElfFile::parse(data.as_slice()).expect("elf");
        let section = elf.section_by_name(".eh_frame").expect(".eh_frame");
        section.file_range().expect("file range")
    };
    let (start, end) = (offset as usize + size as usize / 3, (offset + size) as usize);
    for (i, byte) in data[start..end].iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(37) ^ 0xa5;
    }
    std::fs::write(&copy, &data).expect("write corrupt copy");
    let recorded = record_fixture(Fixture::start(&copy, 60), 2);
    let view = View::new(&recorded.profile);
    let (samples, total) = samples_and_total(&view, recorded.pid);
    assert!(total > 200, "got {total} samples");
    // libdeep.so is intact: its frames are still walked.
    assert!(share_with(&view, &samples, &["deep_leaf", "deep_a"]) > 0.5);
}

#[test]
fn processes_that_exit_while_loading_do_not_disturb_the_daemon() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let fixture = Fixture::start(nofp_c_fixture(), 60);
    // Hundreds of short-lived processes, each exec'ing and exiting while the unwind stage
    // loads them.
    let mut churn = Command::new("sh")
        .args([
            "-c",
            "end=$(($(date +%s)+4)); while [ $(date +%s) -lt $end ]; do /bin/true; ls / >/dev/null; done",
        ])
        .spawn()
        .expect("churn");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("churn.pb.gz");
    let profile = record(&[], 3, &out);
    let _ = churn.wait();
    let view = View::new(&profile);
    let samples = view.samples_of(fixture.pid());
    let share = share_with(&view, &samples, &["main", "deep_leaf"]);
    assert!(share > 0.9, "fixture reached main in {:.1} %", share * 100.0);
    view.comment("unwind tables");
}

#[test]
fn short_lived_processes_are_named() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    // Twenty-five busy processes of 0.1 s each, one after the other: shorter than the sampler's
    // timed drain (250 ms). The first sample of each wakes the daemon, which reads the
    // process's mappings while it is still there.
    let mut churn = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "sleep 0.5; for i in $(seq 25); do {} 0.1 >/dev/null; done",
            c_fixture().display()
        ))
        .spawn()
        .expect("churn");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("short.pb.gz");
    let profile = record(&[], 5, &out);
    let _ = churn.wait();
    let view = View::new(&profile);
    let samples: Vec<_> = profile
        .sample
        .iter()
        .filter(|s| view.label(s, "comm").is_some_and(|(_, c)| c == "burn"))
        .collect();
    let total: i64 = samples.iter().map(|s| View::count(s)).sum();
    let pids: HashSet<i64> = samples
        .iter()
        .filter_map(|s| view.label(s, "pid"))
        .map(|(n, _)| n)
        .collect();
    assert!(
        total > 100 && pids.len() >= 10,
        "{total} samples from {} processes",
        pids.len()
    );
    let share = share_with(&view, &samples, &["main"]);
    assert!(
        share >= 0.9,
        "{:.1} % of {total} samples of short-lived processes are named down to main:\n{}",
        share * 100.0,
        stacks_without(&view, &samples, &["main"])
    );
}

/// Every signal a Go program handles ends in its runtime's `sigreturn` trampoline, which runs
/// with rsp at the saved `ucontext`, not at a return address. Flooded with SIGURG (what the Go
/// runtime sends itself to preempt goroutines), the fixture is sampled inside `rt_sigreturn`
/// often enough to check that those walks continue into the interrupted code.
#[test]
fn go_signal_returns_unwind_into_the_interrupted_code() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let fixture = Fixture::start(go_fixture(), 60);
    let pid = fixture.pid();
    // Two senders: 1–2% of the samples land in `rt_sigreturn` then (10–20 here).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let floods: Vec<_> = (0..2)
        .map(|_| {
            let done = done.clone();
            thread::spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    // SAFETY: a signal to our own child; the Go runtime handles SIGURG.
                    if unsafe { libc::kill(pid as i32, libc::SIGURG) } != 0 {
                        break;
                    }
                }
            })
        })
        .collect();
    let Recorded {
        profile, pid, _dir, ..
    } = record_fixture(fixture, 4);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for flood in floods {
        flood.join().expect("flood thread");
    }
    let view = View::new(&profile);
    let (samples, total) = samples_and_total(&view, pid);
    assert!(total > 200, "got {total} samples");
    let in_sigreturn: Vec<_> = samples
        .iter()
        .copied()
        .filter(|s| view.stack(s).iter().any(|f| f.starts_with("runtime.sigreturn")))
        .collect();
    assert!(
        !in_sigreturn.is_empty(),
        "no sample of {total} was taken in runtime.sigreturn: the flood did not reach it"
    );
    // Below the trampoline: the interrupted function and its callers (no walk may end early,
    // checked for every sample below). A tick that lands while the kernel rewrites the saved
    // registers (`restore_sigcontext`: rsp is restored before rip, and the FPU state after both)
    // sees user registers that belong to neither frame; those walks may end early (one in 47
    // did in a CI run), so they are left out here, and the rest must all walk on.
    let rewriting = |s: &&profiler::pprof::Sample| view.stack(s).contains(&"restore_sigcontext");
    let settled = in_sigreturn.iter().filter(|s| !rewriting(s)).count();
    assert!(
        settled * 2 >= in_sigreturn.len(),
        "{} of {} samples in runtime.sigreturn hit restore_sigcontext",
        in_sigreturn.len() - settled,
        in_sigreturn.len()
    );
    let stranded: Vec<_> = in_sigreturn
        .iter()
        .copied()
        .filter(|s| !rewriting(s))
        .filter(|s| {
            let stack = view.stack(s);
            let at = stack.iter().position(|f| f.starts_with("runtime.sigreturn"));
            // Nothing but a `[unwind: …]` marker below it, or nothing at all.
            at.is_none_or(|at| stack[at + 1..].iter().all(|f| f.starts_with('[')))
        })
        .collect();
    assert!(
        stranded.is_empty(),
        "{} of {} samples in runtime.sigreturn stop there:\n{}",
        stranded.len(),
        in_sigreturn.len(),
        show_stacks(&view, &stranded)
    );
    let truncated: Vec<_> = samples
        .iter()
        .copied()
        .filter(|s| ended_early(&view, s))
        .collect();
    assert!(
        truncated.is_empty(),
        "walks ended early:\n{}",
        show_stacks(&view, &truncated)
    );
}

#[test]
fn go_tables_follow_frame_pointers_and_stop_at_stack_bottoms() {
    use profiler::unwind::table::{CfiSource, compile};
    use profiler_common::cfa;
    // Addresses from the unstripped build's symbol table; the table of the stripped build
    // (.gopclntab only) must say the same.
    let symbols = std::fs::read(go_fixture()).expect("read go fixture");
    let symbols = ElfFile::parse(symbols.as_slice()).expect("elf");
    let range = |elf: &ElfFile<'_, &[u8]>, name: &str| {
        elf.symbols()
            .find(|s| s.name() == Ok(name))
            .map(|s| s.address()..s.address() + s.size())
            .unwrap_or_else(|| panic!("{name} in the symbol table"))
    };
    let address = |name: &str| range(&symbols, name).start;
    let data = std::fs::read(stripped_go_fixture()).expect("read stripped go fixture");
    let elf = ElfFile::parse(data.as_slice()).expect("elf");
    let (table, source) = compile(&elf, None::<&ElfFile<'_, &[u8]>>).expect("table");
    assert_eq!(source, CfiSource::GoFramePointers);
    let frameless = (cfa::SP_OFFSET, 8);
    let rule = |pc| {
        let row = table.lookup(pc);
        (row.cfa_rule, row.cfa)
    };
    // Functions with a frame: the return address is at rsp on entry (before the prologue), and
    // the body follows the frame pointer.
    for name in ["main.main", "main.hotA", "runtime.main"] {
        let code = range(&symbols, name);
        assert_eq!(rule(code.start), frameless, "{name} at entry");
        assert!(
            code.clone()
                .any(|pc| table.lookup(pc).cfa_rule == cfa::FRAME_POINTER),
            "{name}: no frame-pointer row in its body"
        );
    }
    // Functions that switch stacks keep frame-pointer rows throughout (funcFlag_SPWRITE).
    for name in [
        "runtime.mcall",
        "runtime.systemstack.abi0",
        "runtime.morestack.abi0",
    ] {
        assert!(
            range(&symbols, name).all(|pc| table.lookup(pc).cfa_rule == cfa::FRAME_POINTER),
            "{name}"
        );
    }
    // A frameless leaf (main.outer of the inlining fixture) is rsp-based throughout.
    let inline_symbols = std::fs::read(go_inline_fixture()).expect("read Go inline fixture");
    let inline_symbols = ElfFile::parse(inline_symbols.as_slice()).expect("elf");
    let inline_data = std::fs::read(stripped_go_inline_fixture()).expect("read");
    let inline_elf = ElfFile::parse(inline_data.as_slice()).expect("elf");
    let (inline_table, _) = compile(&inline_elf, None::<&ElfFile<'_, &[u8]>>).expect("table");
    for pc in range(&inline_symbols, "main.outer") {
        let row = inline_table.lookup(pc);
        assert_eq!((row.cfa_rule, row.cfa), frameless, "main.outer at {pc:#x}");
    }
    // About two rows per function and return, a few thousand for a small Go program.
    let functions = symbols
        .symbols()
        .filter(|s| s.kind() == object::SymbolKind::Text)
        .count();
    assert!(
        table.rows.len() < functions * 8,
        "{} rows for {functions} functions",
        table.rows.len()
    );
    for name in [
        "runtime.goexit.abi0",
        "runtime.mstart.abi0",
        "runtime.rt0_go.abi0",
    ] {
        assert_eq!(table.lookup(address(name) + 1).cfa_rule, cfa::STOP, "{name}");
    }
    // The signal return trampoline (renamed in Go 1.20) reads the saved ucontext throughout.
    let sigreturn = ["runtime.sigreturn.abi0", "runtime.sigreturn__sigaction.abi0"]
        .into_iter()
        .find_map(|name| symbols.symbols().find(|s| s.name() == Ok(name)))
        .map(|s| s.address()..s.address() + s.size())
        .expect("the Go runtime's sigreturn in the symbol table");
    assert!(!sigreturn.is_empty());
    for pc in sigreturn {
        assert_eq!(table.lookup(pc).cfa_rule, cfa::SIGNAL, "sigreturn at {pc:#x}");
    }
}

/// Samples of `pid` that ended with `[unwind: …]` or `[truncated: …]`, count-weighted.
fn truncated_samples(view: &View, samples: &[&profiler::pprof::Sample]) -> i64 {
    samples
        .iter()
        .filter(|s| ended_early(view, s))
        .map(|s| View::count(s))
        .sum()
}

/// Whether the walk of `sample` ended with `[unwind: …]` or `[truncated: …]`.
fn ended_early(view: &View, sample: &profiler::pprof::Sample) -> bool {
    view.stack(sample)
        .iter()
        .any(|f| f.starts_with("[unwind") || f.starts_with("[truncated"))
}

#[test]
fn exec_and_dlopen_are_followed() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    // dlopen after the process was loaded: the first samples in the new library miss the
    // mappings, ask for a reload, and the rest unwind.
    let recorded = record_fixture(Fixture::start(dlopen_fixture(), 60), 4);
    let view = View::new(&recorded.profile);
    let (samples, total) = samples_and_total(&view, recorded.pid);
    assert!(total > 200, "got {total} samples");
    let share = share_with(&view, &samples, &["deep_leaf", "call_deep", "main"]);
    assert!(
        share >= 0.95,
        "{:.1} % of {total} samples reach main through the dlopen'd library:\n{}",
        share * 100.0,
        stacks_without(&view, &samples, &["deep_leaf", "call_deep", "main"])
    );

    // exec: the shell is loaded first, then replaced by the fixture under the same pid.
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "echo ready; sleep 1.5; exec {} 60 >/dev/null",
        nofp_c_fixture().display()
    ));
    let recorded = record_fixture(Fixture::start_command(cmd), 4);
    let view = View::new(&recorded.profile);
    let (samples, total) = samples_and_total(&view, recorded.pid);
    assert!(total > 200, "got {total} samples");
    let share = share_with(&view, &samples, &["deep_leaf", "main", "__libc_start*"]);
    assert!(
        share >= 0.95,
        "{:.1} % of {total} samples after exec reach main:\n{}",
        share * 100.0,
        stacks_without(&view, &samples, &["deep_leaf", "main", "__libc_start*"])
    );
    assert!(
        truncated_samples(&view, &samples) * 20 <= total,
        "walks ended early after exec"
    );
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

/// Stops `pid` now and continues it after `delay` (join the handle after the recording): the
/// process is not running while the daemon starts, so it is loaded on its first sample.
fn continue_later(pid: u32, delay: Duration) -> thread::JoinHandle<()> {
    signal(pid, libc::SIGSTOP);
    thread::spawn(move || {
        thread::sleep(delay);
        signal(pid, libc::SIGCONT);
    })
}

#[test]
fn processes_idle_at_start_are_loaded_on_their_first_sample() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    // Stopped while the daemon starts, so not among the running processes loaded before the
    // first tick; continued 1.5 s into a whole-system recording.
    let fixture = Fixture::start(nofp_c_fixture(), 60);
    let pid = fixture.pid();
    let resume = continue_later(pid, Duration::from_millis(1500));
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("all.pb.gz");
    let profile = record(&["--frequency", "250"], 4, &out);
    resume.join().expect("resume thread");
    drop(fixture);
    let view = View::new(&profile);
    let (samples, total) = samples_and_total(&view, pid);
    assert!(total > 200, "got {total} samples");
    let reach = ["deep_leaf", "main", "__libc_start*"];
    let share = share_with(&view, &samples, &reach);
    assert!(
        share >= 0.97,
        "{:.1} % of {total} samples reach main:\n{}",
        share * 100.0,
        stacks_without(&view, &samples, &reach)
    );
    let tables = view.comment("unwind tables");
    let requested = tables
        .split(" requested by their first sample")
        .next()
        .and_then(|before| before.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no load-request count in {tables:?}"));
    assert!(requested >= 1, "{tables:?}");
}

#[test]
fn a_small_table_budget_evicts_and_names_what_it_could_not_walk() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    // 256 KiB = 32,768 rows: not enough for libc (~28,000) and libstdc++ (~30,000) together.
    let c = Fixture::start(nofp_c_fixture(), 60);
    let cpp = Fixture::start(nofp_cpp_fixture(), 60);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("budget.pb.gz");
    let profile = record(
        &[
            "--pid",
            &c.pid().to_string(),
            "--pid",
            &cpp.pid().to_string(),
            "--frequency",
            "250",
            "--unwind-table-size",
            "256K",
        ],
        3,
        &out,
    );
    let view = View::new(&profile);
    let tables = view.comment("unwind tables");
    assert!(tables.contains("of 0.2 MiB"), "{tables}");
    assert!(!tables.contains(" 0 evicted"), "{tables}");
    // Nothing is lost: both processes keep all their samples, and walks that met an evicted
    // table say so.
    for pid in [c.pid(), cpp.pid()] {
        let (_, total) = samples_and_total(&view, pid);
        assert!(total > 300, "pid {pid}: {total} samples");
    }
    let all: Vec<&profiler::pprof::Sample> = profile.sample.iter().collect();
    let named = share_with(&view, &all, &["[unwind: no table for *"]);
    assert!(named > 0.0, "no walk named a missing table; {tables}");
}

#[test]
fn unwind_tables_take_kernel_memory_as_they_load_not_the_budget() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    // Each loaded table is an array map of its own (`unwind_rows`), as long as the table: a
    // 1 GiB budget allocates nothing up front, and the kernel holds what the tables need.
    let c = Fixture::start(nofp_c_fixture(), 60);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("lazy.pb.gz");
    let pid = c.pid().to_string();
    let args = [
        "record",
        "--pid",
        &pid,
        "--frequency",
        "99",
        "--duration",
        "4s",
        "--unwind-table-size",
        "1G",
        "--output",
        out.to_str().expect("utf8"),
    ];
    let child = Command::new(profiler_bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start profiler");
    // The target's tables are loaded before sampling starts; look while it records.
    thread::sleep(Duration::from_secs(2));
    let tables: Vec<(u32, u32)> = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some(profiler_common::UNWIND_ROWS_INNER_NAME))
        .map(|m| (m.max_entries(), m.value_size()))
        .collect();
    let output = child.wait_with_output().expect("profiler output");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The fixture, libdeep.so, libc (~28,000 rows) and ld.so.
    let bytes: u64 = tables
        .iter()
        .map(|&(rows, size)| u64::from(rows) * u64::from(size))
        .sum();
    assert!((3..=6).contains(&tables.len()), "unwind table maps: {tables:?}");
    assert!(tables.iter().all(|&(_, size)| size == 8), "{tables:?}");
    assert!(
        ((100 << 10)..(2 << 20)).contains(&bytes),
        "{bytes} bytes of tables: {tables:?}"
    );
    let profile = decode(&std::fs::read(&out).expect("profile written")).expect("profile decodes");
    let view = View::new(&profile);
    let comment = view.comment("unwind tables");
    assert!(comment.contains("of 1024.0 MiB"), "{comment}");
    let (samples, total) = samples_and_total(&view, c.pid());
    assert!(total > 200, "got {total} samples");
    let complete = count_with(&view, &samples, &["main"]);
    assert!(
        complete * 100 >= total * 99,
        "{complete} of {total} samples reach main"
    );
}

#[test]
fn tables_evicted_while_walks_cache_them_are_never_used_stale() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    // Each CPU's walk caches the file tables and rows it found. 384 KiB = 49,152 rows hold the
    // C fixture's files (libc: ~28,000 rows) but not libstdc++ (~34,000) beside them. The C++
    // fixture is stopped while the daemon starts (so not loaded then) and continued 1.5 s in:
    // loading it on its first sample evicts tables the C fixture's walks have cached and
    // writes other rows where theirs were. Every C sample must still unwind completely or
    // name the table it is missing, never walk the other file's rows.
    let c = Fixture::start(nofp_c_fixture(), 60);
    let c_pid = c.pid();
    let cpp = Fixture::start(nofp_cpp_fixture(), 60);
    let cpp_pid = cpp.pid();
    let resume = continue_later(cpp_pid, Duration::from_millis(1500));
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("evictions.pb.gz");
    let profile = record(&["--frequency", "250", "--unwind-table-size", "384K"], 4, &out);
    resume.join().expect("resume thread");
    drop((c, cpp));
    let view = View::new(&profile);
    let tables = view.comment("unwind tables");
    assert!(!tables.contains(" 0 evicted"), "{tables}");
    let (_, late) = samples_and_total(&view, cpp_pid);
    assert!(
        late > 100,
        "the C++ fixture got {late} samples after it was continued"
    );
    let (samples, total) = samples_and_total(&view, c_pid);
    assert!(total > 500, "got {total} samples");
    // Samples whose walk did not stop at a missing table must be complete.
    let walked: Vec<&profiler::pprof::Sample> = samples
        .iter()
        .copied()
        .filter(|s| !has_frame(&view.stack(s), "[unwind: no table for *"))
        .collect();
    let complete = ["main", "__libc_start*"];
    let walked_total: i64 = walked.iter().map(|s| View::count(s)).sum();
    let n = walked_total - count_with(&view, &walked, &complete);
    assert!(
        n * 100 <= total,
        "{n} of {total} samples neither reach main nor name a missing table ({tables}):\n{}",
        stacks_without(&view, &walked, &complete)
    );
}

#[test]
fn stacks_deeper_than_the_limit_keep_256_user_frames_and_say_so() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let recorded = record_fixture(Fixture::start(recurse_fixture(), 60), 2);
    let profile = &recorded.profile;
    let view = View::new(profile);
    let (samples, total) = samples_and_total(&view, recorded.pid);
    assert!(total > 200, "got {total} samples");
    let truncated: Vec<_> = samples
        .iter()
        .filter(|s| view.stack(s).last() == Some(&"[truncated: max depth 256]"))
        .collect();
    let n: i64 = truncated.iter().map(|s| View::count(s)).sum();
    assert!(
        n * 100 >= total * 99,
        "{n} of {total} samples say they were truncated"
    );
    let kernel_mapping: Vec<u64> = profile
        .mapping
        .iter()
        .filter(|m| view.s(m.filename) == "[kernel.kallsyms]")
        .map(|m| m.id)
        .collect();
    for s in truncated {
        // Locations: kernel frames, 256 user frames, the synthetic truncation frame.
        let user = s
            .location_id
            .iter()
            .filter(|id| !kernel_mapping.contains(&view.locations[*id].mapping_id))
            .count();
        assert_eq!(
            user,
            257,
            "user frames of a truncated walk: {}",
            view.stack(s).join(" <- ")
        );
    }
    let walks = view.comment("user stack walks:");
    assert!(walks.contains("max-depth"), "{walks}");
}
