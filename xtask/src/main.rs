//! `cargo xtask <task>`: the single entry point for setting up, building, running and testing.
//!
//! - `setup`: installs what builds and tests need (idempotent; fast when all is present).
//! - `build`: `cargo build --release -p profiler` (after setup).
//! - `run`:   records 10 s of the whole machine and prints the top functions.
//! - `test`:  every test, the privileged end-to-end ones included (run as root).
//! - `bench`: overhead beside perf and bpftrace, plus hot-path benchmarks (docs/benchmarks.md).
//! - `fuzz`:  the parsers of untrusted bytes under cargo-fuzz, seeded with real files.
//! - `layers`: checks that profiler/src imports only downward (docs/architecture.md's floors).
mod layering;

use std::{
    env,
    ffi::OsStr,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, Subcommand};

/// The bpf-linker release that builds against rustc's LLVM 22 (see DEVELOPERS.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the fixtures and the reference reader need.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("go", "golang-go"),
    ("gcc", "gcc"),
    ("g++", "g++"),
    ("objcopy", "binutils"),
    ("setpriv", "util-linux"),
    ("node", "nodejs"),
];
/// What only the tests use: kubectl renders the deploy/ overlays (its kustomize), pip installs
/// the Kubernetes schema validator.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("kubectl", "kubernetes-client"),
    ("python3", "python3"),
    ("pip3", "python3-pip"),
];
/// kubernetes-validate (PyPI), pinned: the manifests are validated against its schemas.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The peers the benchmark measures beside the daemon.
const BENCH_PACKAGES: &[(&str, &str)] = &[("perf", "linux-perf"), ("bpftrace", "bpftrace")];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (nightly rust-src, bpf-linker) and Debian packages.
    Setup,
    /// Build the release daemon with its embedded eBPF object.
    Build,
    /// Record the whole machine for 10 s and print the top functions.
    Run {
        /// Extra arguments for `profiler record`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure overhead beside perf and bpftrace, and the hot paths (docs/benchmarks.md).
    Bench {
        /// Fail when a result is over the README's budget beyond the noise margin.
        #[arg(long)]
        check: bool,
        /// Seconds per recording.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Skip the criterion hot-path benchmarks.
        #[arg(long)]
        no_hot_paths: bool,
    },
    /// Fuzz the parsers of untrusted bytes (ELF, .gopclntab, perf maps, ring records).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Only this target (default: all).
        target: Option<String>,
    },
    /// Check that profiler/src imports only from lower floors (docs/architecture.md).
    Layers,
    /// Run every test (layering, unit, integration, privileged end-to-end).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let root = workspace_root()?;
    env::set_current_dir(&root)?;
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            build()
        }
        Task::Run { args } => {
            setup()?;
            build()?;
            record(&root, &args)
        }
        Task::Layers => layering::run(&root),
        Task::Test { args } => {
            // First, and cheap: a house with an upward import fails before anything builds.
            layering::run(&root)?;
            setup()?;
            setup_test_tools(&root)?;
            build()?;
            test(&root, &args)
        }
        Task::Fuzz { seconds, target } => {
            setup()?;
            fuzz(&root, seconds, target.as_deref())
        }
        Task::Bench {
            check,
            seconds,
            no_hot_paths,
        } => {
            setup()?;
            install_debian(BENCH_PACKAGES)?;
            build()?;
            bench(&root, check, seconds, !no_hot_paths)
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask has no parent directory")?
        .to_owned())
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed with {status}");
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

fn setup() -> Result<()> {
    install_debian(DEBIAN_PACKAGES)?;
    setup_nightly()?;
    setup_bpf_linker()?;
    Ok(())
}

/// kubectl and, under `target/tools/python`, kubernetes-validate (idempotent).
fn setup_test_tools(root: &Path) -> Result<()> {
    install_debian(TEST_PACKAGES)?;
    let dir = root.join("target/tools/python");
    if dir.join("kubernetes_validate").is_dir() {
        return Ok(());
    }
    run(Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
        // Into a directory of the project's own, never the system's site-packages.
        .args(["--break-system-packages", "--target"])
        .arg(&dir)
        .arg(KUBERNETES_VALIDATE))
}

fn install_debian(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    ensure!(
        on_path("apt-get"),
        "missing packages {missing:?} and no apt-get to install them"
    );
    let root = output(Command::new("id").arg("-u")).is_some_and(|uid| uid == "0");
    ensure!(
        root,
        "missing Debian packages {missing:?}: run `cargo xtask setup` as root or install them"
    );
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .context("the nightly toolchain is not installed (`rustup toolchain install nightly`)")?;
    Ok(PathBuf::from(sysroot))
}

fn setup_nightly() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn setup_bpf_linker() -> Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version"));
    if version.as_deref().is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    // bpf-linker links against an LLVM of the same major version as the nightly rustc; rustup
    // ships that LLVM as a shared library, so point LLVM_PREFIX at a directory exposing it.
    let sysroot = nightly_sysroot()?;
    let libdir = sysroot.join("lib");
    let llvm = fs::read_dir(&libdir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .find(|n| {
            n.to_str()
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", libdir.display()))?;
    let name = llvm.to_string_lossy().into_owned();
    let major = name
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("cannot read the LLVM version from {name}"))?
        .to_owned();
    // The prefix outlives the install: bpf-linker's RUNPATH points into it, so it holds the
    // library under both the link-time name and its soname.
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = cargo_home.join(format!("bpf-linker-llvm-{major}"));
    fs::create_dir_all(prefix.join("lib"))?;
    for name in [OsStr::new("libLLVM.so"), llvm.as_os_str()] {
        let link = prefix.join("lib").join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(&llvm), &link)?;
    }
    run(Command::new("cargo")
        .args([
            "install",
            "--force",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix)
        .env("LD_LIBRARY_PATH", &libdir))?;
    ensure!(
        on_path("bpf-linker"),
        "bpf-linker was installed but is not on PATH (add ~/.cargo/bin)"
    );
    Ok(())
}

fn build() -> Result<()> {
    run(Command::new("cargo").args(["build", "--release", "-p", "profiler"]))
}

fn record(root: &Path, args: &[String]) -> Result<()> {
    let dir = root.join("target/profiles");
    fs::create_dir_all(&dir)?;
    let output_path = dir.join("xtask-run.pb.gz");
    let mut cmd = Command::new(root.join("target/release/profiler"));
    cmd.args(["record", "--duration", "10s", "--top", "15", "--output"])
        .arg(&output_path);
    cmd.args(args);
    run(&mut cmd)?;
    eprintln!(
        "xtask: open it with `go tool pprof -top {}`",
        output_path.display()
    );
    Ok(())
}

fn bench(root: &Path, check: bool, seconds: u32, hot_paths: bool) -> Result<()> {
    run(Command::new("cargo").args(["build", "--release", "-p", "bench"]))?;
    let mut cmd = Command::new(root.join("target/release/bench"));
    cmd.arg("--profiler")
        .arg(root.join("target/release/profiler"))
        .args(["--seconds", &seconds.to_string()]);
    if check {
        cmd.arg("--check");
    }
    run(&mut cmd)?;
    if hot_paths {
        run(Command::new("cargo").args(["bench", "-p", "profiler", "--bench", "hot_paths"]))?;
    }
    Ok(())
}

const FUZZ_TARGETS: &[&str] = &["elf", "gopclntab", "perf_map", "ring_record"];

fn fuzz(root: &Path, seconds: u32, only: Option<&str>) -> Result<()> {
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_none() {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz_dir = root.join("fuzz");
    seed_corpora(&fuzz_dir)?;
    let targets: Vec<&str> = match only {
        Some(t) if FUZZ_TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target `{t}` (targets: {})", FUZZ_TARGETS.join(", ")),
        None => FUZZ_TARGETS.to_vec(),
    };
    for target in targets {
        run(Command::new("cargo")
            .args([
                "+nightly",
                "fuzz",
                "run",
                target,
                "--",
                &format!("-max_total_time={seconds}"),
            ])
            .current_dir(&fuzz_dir))?;
    }
    Ok(())
}

/// Seeds each corpus with real inputs, so fuzzing starts from valid structure.
fn seed_corpora(fuzz_dir: &Path) -> Result<()> {
    let corpus = |target: &str| -> Result<PathBuf> {
        let dir = fuzz_dir.join("corpus").join(target);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    };
    let elf = corpus("elf")?;
    for binary in ["/bin/true", "/usr/bin/env"] {
        if Path::new(binary).is_file() {
            let name = binary.rsplit('/').next().unwrap_or("seed");
            fs::copy(binary, elf.join(name))?;
        }
    }
    fs::write(
        corpus("perf_map")?.join("node"),
        "13cac0caac6 2d JS:~hotLoop /tmp/hot.js:1:17\n7fb4bc006040 2c4 JS:*hotLoop /tmp/hot.js:1:17\n",
    )?;
    // A Go binary's table and its inline trees, laid out as the target reads them: an 8-byte
    // probe address, the table's length (u32), the table, then `.rodata` from `go:func.*` on.
    let go_dir = fuzz_dir.join("target/seed-go");
    fs::create_dir_all(&go_dir)?;
    fs::write(
        go_dir.join("main.go"),
        "package main\n\nfunc add(a, b int) int { return a*b + a }\n\n\
         func main() { println(\"seed\", add(len(\"ab\"), 3)) }\n",
    )?;
    let built = Command::new("go")
        .args(["build", "-o", "seed", "main.go"])
        .current_dir(&go_dir)
        .env("GOCACHE", go_dir.join("cache"))
        .env("GO111MODULE", "off")
        .status()
        .is_ok_and(|s| s.success());
    if built {
        run(Command::new("objcopy")
            .args(["--dump-section", ".gopclntab=gopclntab.bin", "seed"])
            .current_dir(&go_dir))?;
        run(Command::new("objcopy")
            .args(["--dump-section", ".rodata=rodata.bin", "seed"])
            .current_dir(&go_dir))?;
        let table = fs::read(go_dir.join("gopclntab.bin"))?;
        let rodata = fs::read(go_dir.join("rodata.bin"))?;
        let address = |name: &str, listing: &str| {
            listing.lines().find_map(|line| {
                let mut fields = line.split_whitespace();
                let addr = u64::from_str_radix(fields.next()?, 16).ok()?;
                (fields.nth(1)? == name).then_some(addr)
            })
        };
        let nm = output(
            Command::new("go")
                .args(["tool", "nm", "seed"])
                .current_dir(&go_dir),
        )
        .unwrap_or_default();
        let headers =
            output(Command::new("objdump").args(["-h", "seed"]).current_dir(&go_dir)).unwrap_or_default();
        // objdump -h: "  3 .rodata  0001a2b3  00000000004a0000 …": name, size, VMA.
        let rodata_addr = headers.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&".rodata")).then(|| u64::from_str_radix(fields.get(3)?, 16).ok())?
        });
        let gofunc = address("go.func.*", &nm).or_else(|| address("go:func.*", &nm));
        let mut seed = 0x40_1000u64.to_le_bytes().to_vec();
        seed.extend(u32::try_from(table.len())?.to_le_bytes());
        seed.extend(&table);
        if let (Some(gofunc), Some(start)) = (gofunc, rodata_addr) {
            let from = usize::try_from(gofunc.saturating_sub(start))?.min(rodata.len());
            seed.extend(&rodata[from..]);
        }
        fs::write(corpus("gopclntab")?.join("go"), seed)?;
    }
    corpus("ring_record")?;
    Ok(())
}

fn test(root: &Path, args: &[String]) -> Result<()> {
    let profiler = root.join("target/release/profiler");
    if !profiler.is_file() {
        bail!("{} was not built", profiler.display());
    }
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--release", "--workspace", "--exclude", "profiler-ebpf"])
        .args(args.iter().map(OsStr::new))
        .env("PROFILER_BIN", &profiler)
        // Under the project's test command a missing privilege is a failure, not a skip.
        .env("PROFILER_REQUIRE_PRIVILEGED", "1")
        .stdout(Stdio::piped());
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut totals = TestTotals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait()?;
    // One closing line for the whole run: cargo's own last line is a crate's doc-tests.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    ensure!(status.success(), "cargo test failed with {status}");
    ensure!(totals.passed > 0, "no test ran");
    Ok(())
}

/// Sums of cargo's `test result: ok. 5 passed; 0 failed; 1 ignored; …` lines.
#[derive(Debug, Default, PartialEq, Eq)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match kind {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_totals_sum_cargo_result_lines() {
        let mut totals = TestTotals::default();
        totals.add(
            "test result: ok. 22 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        );
        totals.add("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out");
        totals.add("test something ... ok");
        assert_eq!(
            totals,
            TestTotals {
                passed: 25,
                failed: 2,
                ignored: 1
            }
        );
    }
}
