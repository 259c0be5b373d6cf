//! Test support shared by the end-to-end tests and the overhead benchmark: the workspace
//! paths, the fixture programs (built from `tests/fixtures` on first use) and a handle that
//! kills a running fixture when dropped.
//!
//! Panics are the failure mode here: this code runs only inside tests and benchmarks.

pub mod backends;
pub mod daemon;
pub mod hostile;
pub mod kubeapi;

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock},
};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

pub fn profiler_bin() -> PathBuf {
    std::env::var_os("PROFILER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/release/profiler"))
}

pub fn fixtures_dir() -> PathBuf {
    workspace().join("tests/fixtures")
}

pub fn build_dir() -> PathBuf {
    let dir = workspace().join("target/fixtures");
    std::fs::create_dir_all(&dir).expect("fixture build dir");
    dir
}

/// One privileged test at a time: they share two CPUs and would skew each other's samples.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this test may use BPF. Under `cargo xtask test` (PROFILER_REQUIRE_PRIVILEGED=1) a
/// missing privilege fails the test; under a plain `cargo test` as an ordinary user the test
/// is skipped with the reason printed.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        assert!(
            profiler_bin().is_file(),
            "{} is missing: run `cargo xtask build`",
            profiler_bin().display()
        );
        return true;
    }
    if std::env::var_os("PROFILER_REQUIRE_PRIVILEGED").is_some() {
        panic!("privileged test run without root: run `cargo xtask test` as root");
    }
    eprintln!("skipped: needs root for BPF and perf events");
    false
}

pub fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The C fixture, with frame pointers. -O0 because GCC 12 shrink-wraps the frame setup out of
/// leaf functions at -O1 and above even with -mno-omit-leaf-frame-pointer, and a leaf without a
/// frame hides its caller from a frame-pointer walk (frame-pointer-less code is issue 3's).
pub fn c_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| cc_build("gcc", "-O0", "burn", "burn.c"))
}

/// The C fixture with an always-inlined helper, built -O2 -g (DWARF with inline records).
pub fn inline_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| cc_build("gcc", "-O2", "inline", "inline.c"))
}

/// The inline fixture stripped of everything (`strip --strip-all`), with its symbols and DWARF
/// in a separate `inline-stripped.debug` beside it (debug sections zlib-compressed), named by
/// `.gnu_debuglink`.
pub fn stripped_inline_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let full = inline_fixture();
        let out = build_dir().join("inline-stripped");
        let debug = build_dir().join("inline-stripped.debug");
        // Compressed, as distributions ship their -dbg/-debuginfo files.
        run_ok(
            Command::new("objcopy")
                .arg("--only-keep-debug")
                .arg("--compress-debug-sections=zlib")
                .arg(full)
                .arg(&debug),
        );
        run_ok(
            Command::new("strip")
                .arg("--strip-all")
                .arg("-o")
                .arg(&out)
                .arg(full),
        );
        // objcopy records the debug file's name and CRC; run it where the name resolves.
        run_ok(
            Command::new("objcopy")
                .arg("--add-gnu-debuglink=inline-stripped.debug")
                .arg("inline-stripped")
                .current_dir(build_dir()),
        );
        out
    })
}

/// The inline fixture with its debug sections compressed by `objcopy
/// --compress-debug-sections=<kind>` (`zlib` or `zstd`), built once per kind: tests running
/// side by side must not read a copy while another rewrites it.
pub fn compressed_inline_fixture(kind: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    built
        .entry(kind.to_owned())
        .or_insert_with(|| {
            let out = build_dir().join(format!("inline-{kind}"));
            run_ok(
                Command::new("objcopy")
                    .arg(format!("--compress-debug-sections={kind}"))
                    .arg(inline_fixture())
                    .arg(&out),
            );
            out
        })
        .clone()
}

/// The C++ fixture, -O2 -g: a member function template with an inlined helper.
pub fn cpp_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| cc_build("g++", "-O2", "hotcpp", "hot.cpp"))
}

/// Line of `marker` (a comment) in a fixture source file.
pub fn marker_line(source: &str, marker: &str) -> i64 {
    let text = std::fs::read_to_string(fixtures_dir().join(source)).expect("fixture source");
    let index = text
        .lines()
        .position(|l| l.contains(marker))
        .expect("marker in source");
    index as i64 + 1
}

pub fn go_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| go_build("gohot", "gohot", &[]))
}

/// The Go fixture linked with `-s -w`: no `.symtab`, no DWARF, only `.gopclntab`.
pub fn stripped_go_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| go_build("gohot", "gohot-stripped", &["-ldflags=-s -w"]))
}

/// The Go inlining fixture (leaf and middle inlined into outer) with its symbol table and
/// uncompressed DWARF, the reference for what `.gopclntab` should say.
pub fn go_inline_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| go_build("goinline", "goinline", &["-ldflags=-compressdwarf=false"]))
}

/// The Go inlining fixture linked with `-s -w`.
pub fn stripped_go_inline_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| go_build("goinline", "goinline-stripped", &["-ldflags=-s -w"]))
}

/// Flags of the no-frame-pointer fixtures: optimized the way distributions build, without
/// frame pointers, with CFI (.eh_frame) as GCC emits it by default on x86-64.
const NOFP_FLAGS: [&str; 4] = ["-O2", "-fomit-frame-pointer", "-g", "-Wl,--build-id"];

/// The no-frame-pointer C fixture and its shared library `libdeep.so` (found via RUNPATH
/// `$ORIGIN`): main → qsort (libc) → compare → deep_a/b/c → deep_leaf (libdeep.so).
pub fn nofp_c_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = build_dir();
        let src = fixtures_dir().join("nofp");
        run_ok(
            Command::new("gcc")
                .args(NOFP_FLAGS)
                .args(["-shared", "-fPIC", "-o"])
                .arg(dir.join("libdeep.so"))
                .arg(src.join("libdeep.c")),
        );
        let out = dir.join("deep-nofp");
        run_ok(
            Command::new("gcc")
                .args(NOFP_FLAGS)
                .arg("-o")
                .arg(&out)
                .arg(src.join("deep.c"))
                .arg("-L")
                .arg(&dir)
                .args(["-ldeep", "-Wl,-rpath,$ORIGIN"]),
        );
        out
    })
}

/// The dlopen fixture: loads `libdeep.so` 1.5 s after `ready` and burns CPU in it.
pub fn dlopen_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // libdeep.so is built beside it by the no-frame-pointer C fixture.
        let dir = nofp_c_fixture().parent().expect("build dir").to_owned();
        let out = dir.join("dlopen-late");
        run_ok(
            Command::new("gcc")
                .args(NOFP_FLAGS)
                .arg("-o")
                .arg(&out)
                .arg(fixtures_dir().join("nofp/dlopen.c"))
                .args(["-ldl", "-Wl,-rpath,$ORIGIN"]),
        );
        out
    })
}

/// The deep-recursion fixture: 400 frames of `descend` under the hot leaf.
pub fn recurse_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = build_dir().join("recurse-nofp");
        run_ok(
            Command::new("gcc")
                .args(NOFP_FLAGS)
                .arg("-o")
                .arg(&out)
                .arg(fixtures_dir().join("nofp/recurse.c")),
        );
        out
    })
}

/// The no-frame-pointer C++ fixture: its work runs inside `std::call_once` (libc's
/// pthread_once and libstdc++'s __once_proxy) and a `std::function`.
pub fn nofp_cpp_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = build_dir().join("once-nofp");
        run_ok(
            Command::new("g++")
                .args(NOFP_FLAGS)
                .arg("-o")
                .arg(&out)
                .arg(fixtures_dir().join("nofp/once.cpp")),
        );
        out
    })
}

/// The signal-handler fixture: half its CPU is spent in a SIGPROF handler.
pub fn signal_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = build_dir().join("signal-nofp");
        run_ok(
            Command::new("gcc")
                .args(NOFP_FLAGS)
                .arg("-o")
                .arg(&out)
                .arg(fixtures_dir().join("nofp/signal.c")),
        );
        out
    })
}

/// The Rust fixture, release-optimized without frame pointers (crate name `nofp_rust`).
pub fn nofp_rust_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = build_dir().join("nofp_rust");
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        run_ok(
            Command::new(rustc)
                .args([
                    "--edition=2021",
                    "--crate-name=nofp_rust",
                    "-Copt-level=3",
                    "-Cdebuginfo=1",
                    "-Cforce-frame-pointers=no",
                    "-o",
                ])
                .arg(&out)
                .arg(fixtures_dir().join("nofp/deep.rs")),
        );
        out
    })
}

/// Compiles a C or C++ fixture with debug info, frame pointers and a GNU build id.
fn cc_build(compiler: &str, optimization: &str, name: &str, source: &str) -> PathBuf {
    let out = build_dir().join(name);
    run_ok(
        Command::new(compiler)
            .args([
                optimization,
                "-g",
                "-fno-omit-frame-pointer",
                "-Wl,--build-id",
                "-o",
            ])
            .arg(&out)
            .arg(fixtures_dir().join(source)),
    );
    out
}

/// Builds `tests/fixtures/<dir>/main.go` into `<name>`.
fn go_build(dir: &str, name: &str, flags: &[&str]) -> PathBuf {
    let out = build_dir().join(name);
    run_ok(
        Command::new("go")
            .arg("build")
            .args(flags)
            .arg("-o")
            .arg(&out)
            .arg("main.go")
            .current_dir(fixtures_dir().join(dir))
            .env("GOCACHE", build_dir().join("gocache"))
            .env("GOPATH", build_dir().join("gopath"))
            .env("GO111MODULE", "off")
            .env("CGO_ENABLED", "0"),
    );
    out
}

/// A running fixture, killed on drop.
pub struct Fixture(Child);

impl Fixture {
    pub fn start(bin: &Path, seconds: u32) -> Self {
        let mut cmd = Command::new(bin);
        cmd.arg(seconds.to_string());
        Self::start_command(cmd)
    }

    /// The Node fixture, JIT-compiled, with its perf map enabled.
    pub fn start_node(seconds: u32) -> Self {
        let mut cmd = Command::new("node");
        // V8 writes log files into its working directory: keep them out of the source tree.
        cmd.arg("--perf-basic-prof")
            .arg(fixtures_dir().join("hot.js"))
            .arg(seconds.to_string())
            .current_dir(build_dir());
        Self::start_command(cmd)
    }

    /// Starts a fixture command and waits for its `ready` line.
    pub fn start_command(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("fixture output");
        assert_eq!(line.trim(), "ready", "fixture did not start");
        Fixture(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
