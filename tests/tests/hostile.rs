//! Every container is hostile: the daemon runs whole-system, as in a DaemonSet, inside a
//! memory cgroup with the DaemonSet's limit, beside processes that each hand it one hostile
//! input, and beside a benign workload. For each input the daemon must survive, keep writing a
//! profile every interval, stay under the limit, count what it refused or cut, never put a host
//! file's contents into a profile, answer /healthz, and stop promptly on SIGTERM; the benign
//! workload must still be profiled correctly.
//!
//! The inputs are built here (see `tests::hostile`): a binary with 20,000 nested inlined
//! subroutines and a 1 MiB symbol name; a process with 30,000 executable mappings; "JIT"
//! processes in chroots whose perf map is a symlink to a host file, a link through
//! `/proc/self/root` (a magic link: the reader's own root, the host's), a path swapped between a FIFO and a file by rename-exchange
//! while the daemon reads it, a character device, and three 64 MiB files.
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    os::unix::{ffi::OsStrExt as _, fs::symlink},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use profiler::{encode::decode, pprof::Profile};
use tests::{
    Fixture, c_fixture,
    daemon::{free_addr, http_get, wait_for, wait_ready},
    hostile::{LONG_NAME_PREFIX, deep_fixture, jit_fixture, mappings_fixture},
    privileged, profiler_bin, serial,
};

/// The DaemonSet's memory limit (deploy/base/daemonset.yaml).
const MEMORY_LIMIT: u64 = 384 * 1024 * 1024;
const INTERVAL_SECONDS: u64 = 2;
const RUN_SECONDS: u64 = 24;
/// A name only the host file holds: it must never reach a profile.
const HOST_SECRET: &str = "HOST_SECRET_never_in_a_profile";

/// A child process killed on drop, with the first line it printed.
struct Proc {
    child: Child,
    ready: String,
}

impl Proc {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let mut ready = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut ready)
            .expect("fixture output");
        assert!(ready.starts_with("ready"), "{cmd:?} printed {ready:?}");
        Self { child, ready }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address a JIT fixture printed.
    fn address(&self) -> u64 {
        let hex = self.ready.split_whitespace().nth(1).expect("address");
        u64::from_str_radix(hex, 16).expect("hex address")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare root for one JIT process: the static binary at /jit and an empty /tmp.
fn container_root(base: &Path, name: &str) -> PathBuf {
    let root = base.join(name);
    std::fs::create_dir_all(root.join("tmp")).expect("tmp");
    std::fs::copy(jit_fixture(), root.join("jit")).expect("copy jit");
    root
}

fn start_in(root: &Path) -> Proc {
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "10", "chroot"]).arg(root).arg("/jit");
    Proc::start(cmd)
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("cstring");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mknod(c.as_ptr(), mode, dev) },
        0,
        "mknod {}",
        path.display()
    );
}

fn perf_map_line(address: u64, name: &str) -> String {
    format!("{address:x} 1000 {name}\n")
}

/// The daemon's memory cgroup (v1 or v2, whichever this machine has).
struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    fn new(name: &str, limit: u64) -> Self {
        let (parent, v2) = if Path::new("/sys/fs/cgroup/memory").is_dir() {
            (PathBuf::from("/sys/fs/cgroup/memory"), false)
        } else {
            (PathBuf::from("/sys/fs/cgroup"), true)
        };
        let dir = parent.join(name);
        if dir.exists() {
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir(&dir).expect("memory cgroup");
        let file = if v2 { "memory.max" } else { "memory.limit_in_bytes" };
        std::fs::write(dir.join(file), limit.to_string()).expect("memory limit");
        Self { dir, v2 }
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("join the cgroup");
    }

    /// Peak memory charged to the cgroup (user memory and BPF maps alike).
    fn peak(&self) -> u64 {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(file))
            .expect("peak")
            .trim()
            .parse()
            .expect("number")
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A mount undone on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_prefix} in /metrics"))
}

struct View<'a> {
    p: &'a Profile,
}

impl View<'_> {
    fn s(&self, i: i64) -> &str {
        &self.p.string_table[i as usize]
    }

    fn pid(&self, sample: &profiler::pprof::Sample) -> Option<i64> {
        sample
            .label
            .iter()
            .find(|l| self.s(l.key) == "pid")
            .map(|l| l.num)
    }

    /// Function names of a sample's stack, leaf first.
    fn stack(&self, sample: &profiler::pprof::Sample) -> Vec<String> {
        let functions: HashMap<u64, &str> = self.p.function.iter().map(|f| (f.id, self.s(f.name))).collect();
        let locations: HashMap<u64, &profiler::pprof::Location> =
            self.p.location.iter().map(|l| (l.id, l)).collect();
        sample
            .location_id
            .iter()
            .flat_map(|id| {
                locations[id]
                    .line
                    .iter()
                    .map(|l| functions[&l.function_id].to_owned())
            })
            .collect()
    }
}

#[test]
fn hostile_inputs_do_not_crash_wedge_exhaust_or_redirect_the_daemon() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let work = tempfile::tempdir().expect("tempdir");
    let archive = work.path().join("archive");

    // The host file whose lines must never become function names, in perf-map format.
    let host_dir = work.path().join("host");
    std::fs::create_dir_all(&host_dir).expect("host dir");
    let host_secret = host_dir.join("secret.map");

    // The JIT processes and what each finds at /tmp/perf-<pid>.map.
    let jit_link = start_in(&container_root(work.path(), "jit-link"));
    let jit_magic = start_in(&container_root(work.path(), "jit-magic"));
    let jit_fifo = start_in(&container_root(work.path(), "jit-fifo"));
    let jit_device = start_in(&container_root(work.path(), "jit-device"));
    let jit_big: Vec<Proc> = (0..3)
        .map(|i| start_in(&container_root(work.path(), &format!("jit-big-{i}"))))
        .collect();
    let map_of = |name: &str, pid: u32| work.path().join(name).join(format!("tmp/perf-{pid}.map"));
    let mut secret = String::new();
    for p in [&jit_link, &jit_magic, &jit_fifo, &jit_device] {
        secret.push_str(&perf_map_line(p.address(), HOST_SECRET));
    }
    std::fs::write(&host_secret, &secret).expect("host secret");
    // A symlink to the host file by its host path: inside the container's root it names
    // nothing.
    symlink(&host_secret, map_of("jit-link", jit_link.pid())).expect("link");
    // Through the container's own /proc to the root of whoever reads it (the daemon: the
    // host's): a magic link. (/proc/1/root would do as well where PID 1 may be read.)
    let magic_proc = work.path().join("jit-magic/proc");
    std::fs::create_dir_all(&magic_proc).expect("proc dir");
    tests::run_ok(
        Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(&magic_proc),
    );
    let _proc_mount = Mount(magic_proc);
    symlink(
        Path::new("/proc/self/root").join(host_secret.strip_prefix("/").expect("absolute")),
        map_of("jit-magic", jit_magic.pid()),
    )
    .expect("magic link");
    // A character device (/dev/null's numbers) where the perf map should be.
    mknod(
        &map_of("jit-device", jit_device.pid()),
        libc::S_IFCHR | 0o600,
        libc::makedev(1, 3),
    );
    // A FIFO and a real map swapped by rename-exchange, over and over, while the daemon runs.
    let fifo_map = map_of("jit-fifo", jit_fifo.pid());
    let fifo_other = work.path().join("jit-fifo/tmp/other");
    std::fs::write(&fifo_map, perf_map_line(jit_fifo.address(), "jit_fifo_swapped")).expect("map");
    mknod(&fifo_other, libc::S_IFIFO | 0o600, 0);
    let swapping = Arc::new(AtomicBool::new(true));
    let swapper = {
        let swapping = Arc::clone(&swapping);
        let (a, b) = (
            std::ffi::CString::new(fifo_map.as_os_str().as_bytes()).expect("cstring"),
            std::ffi::CString::new(fifo_other.as_os_str().as_bytes()).expect("cstring"),
        );
        thread::spawn(move || {
            let mut swaps = 0u64;
            while swapping.load(Ordering::Relaxed) {
                // SAFETY: valid NUL-terminated paths.
                let done = unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        a.as_ptr(),
                        libc::AT_FDCWD,
                        b.as_ptr(),
                        libc::RENAME_EXCHANGE,
                    )
                };
                assert_eq!(done, 0, "rename-exchange");
                swaps += 1;
                thread::sleep(Duration::from_micros(200));
            }
            swaps
        })
    };
    // Three 64 MiB perf maps: each read only up to its bound, together past the shared budget.
    for (i, p) in jit_big.iter().enumerate() {
        let mut text = perf_map_line(p.address(), &format!("big_map_function_{i}"));
        let filler = "7f0000000000 10 filler_function_name_that_is_padding_only\n";
        while text.len() < 64 << 20 {
            text.push_str(filler);
        }
        std::fs::write(map_of(&format!("jit-big-{i}"), p.pid()), text).expect("big map");
    }

    let deep = Proc::start({
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "10"]).arg(deep_fixture());
        cmd
    });
    let mappings = Proc::start({
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "10"]).arg(mappings_fixture()).arg("30000");
        cmd
    });
    let benign = Fixture::start(c_fixture(), (RUN_SECONDS + 30) as u32);

    let cgroup = MemoryCgroup::new("profiler-hostile-test", MEMORY_LIMIT);
    let addr = free_addr();
    let addr_text = addr.to_string();
    let interval = format!("{INTERVAL_SECONDS}s");
    let mut daemon = Command::new(profiler_bin())
        .args(["run", "--interval", &interval, "--output-dir"])
        .arg(&archive)
        .args(["--http-listen", &addr_text])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start profiler run");
    cgroup.add(daemon.id());
    let stderr = daemon.stderr.take().expect("stderr");
    let log = thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            // Keep the log readable: lines are cut (the long name would be 1 MiB).
            text.push_str(&line.chars().take(400).collect::<String>());
            text.push('\n');
        }
        text
    });
    wait_ready(addr);

    // Alive and healthy through the whole run.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(RUN_SECONDS) {
        assert!(daemon.try_wait().expect("wait").is_none(), "the daemon exited");
        let (status, _, body) = http_get(addr, "/healthz", &[]);
        assert_eq!(status, 200, "/healthz: {}", String::from_utf8_lossy(&body));
        thread::sleep(Duration::from_secs(1));
    }
    let (_, _, metrics) = http_get(addr, "/metrics", &[]);
    let metrics = String::from_utf8_lossy(&metrics).into_owned();

    // SIGTERM is honoured promptly.
    let stopping = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) }, 0);
    wait_for(
        "the daemon to stop after SIGTERM",
        Duration::from_secs(10),
        || daemon.try_wait().expect("wait").is_some(),
    );
    let stop_took = stopping.elapsed();
    let status = daemon.wait().expect("exit status");
    let log = log.join().expect("log");
    swapping.store(false, Ordering::Relaxed);
    let swaps = swapper.join().expect("swapper");
    let peak = cgroup.peak();
    eprintln!(
        "hostile: peak memory {:.1} MiB of {} MiB, stopped in {stop_took:?}, {swaps} FIFO swaps",
        peak as f64 / (1 << 20) as f64,
        MEMORY_LIMIT >> 20
    );
    assert!(status.success(), "the daemon failed ({status}):\n{log}");
    assert!(
        !log.contains("panicked") && !log.contains("stack overflow"),
        "{log}"
    );
    assert!(peak < MEMORY_LIMIT, "peak {peak} bytes, over the limit");
    assert!(
        !log.contains("MAPPINGS is full"),
        "one process filled the node-wide map:\n{log}"
    );

    // A profile every interval.
    let mut profiles: Vec<PathBuf> = std::fs::read_dir(&archive)
        .expect("archive")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".pb.gz"))
        .collect();
    profiles.sort();
    let expected = RUN_SECONDS / INTERVAL_SECONDS;
    assert!(
        profiles.len() as u64 >= expected - 2,
        "{} profiles in {RUN_SECONDS} s at {INTERVAL_SECONDS} s intervals",
        profiles.len()
    );
    let decoded: Vec<Profile> = profiles
        .iter()
        .map(|p| decode(&std::fs::read(p).expect("read profile")).expect("profile decodes"))
        .collect();

    // No host file's line is a name anywhere; the contained inputs still show up as theirs.
    let mut benign_total = 0i64;
    let mut benign_complete = 0i64;
    let (mut hot_a, mut hot_b) = (0i64, 0i64);
    let mut long_names = Vec::new();
    let mut sampled: HashMap<i64, i64> = HashMap::new();
    for p in &decoded {
        assert!(
            p.string_table.iter().all(|s| !s.contains(HOST_SECRET)),
            "a host file's line became a name in a profile"
        );
        let view = View { p };
        for sample in &p.sample {
            let Some(pid) = view.pid(sample) else { continue };
            *sampled.entry(pid).or_default() += sample.value[0];
            if pid == i64::from(benign.pid()) {
                let stack = view.stack(sample);
                benign_total += sample.value[0];
                if stack.iter().any(|f| f == "main") && !stack.iter().any(|f| f.contains("+0x")) {
                    benign_complete += sample.value[0];
                }
                match stack.first().map(String::as_str) {
                    Some("hot_a") => hot_a += sample.value[0],
                    Some("hot_b") => hot_b += sample.value[0],
                    _ => {}
                }
            }
            if pid == i64::from(deep.pid()) {
                long_names.extend(
                    view.stack(sample)
                        .into_iter()
                        .filter(|f| f.starts_with(LONG_NAME_PREFIX)),
                );
            }
        }
    }
    for (what, pid) in [
        ("deep DWARF", deep.pid()),
        ("30,000 mappings", mappings.pid()),
        ("FIFO perf map", jit_fifo.pid()),
        ("host-linked perf map", jit_link.pid()),
    ] {
        assert!(
            sampled.get(&i64::from(pid)).is_some_and(|n| *n > 0),
            "no samples of the {what} process"
        );
    }
    assert!(
        benign_total >= 100,
        "only {benign_total} samples of the benign workload"
    );
    assert!(
        benign_complete * 100 >= benign_total * 95,
        "benign workload: {benign_complete} of {benign_total} samples complete and named"
    );
    assert!(
        hot_a > hot_b && hot_a < hot_b * 6,
        "benign workload's hot_a:hot_b should be ~3:1, got {hot_a}:{hot_b}"
    );
    assert!(
        !long_names.is_empty()
            && long_names
                .iter()
                .all(|n| n.len() <= profiler::limits::MAX_NAME_BYTES),
        "the 1 MiB name is named, cut to the bound: {:?}",
        long_names.iter().map(String::len).collect::<Vec<_>>()
    );

    // Each refusal and each bound hit is counted.
    for (line, what) in [
        (
            "profiler_limit_hits_total{limit=\"dwarf_depth\"}",
            "deep DWARF refused",
        ),
        (
            "profiler_limit_hits_total{limit=\"name_length\"}",
            "the long name cut",
        ),
        (
            "profiler_limit_hits_total{limit=\"process_mappings\"}",
            "the mappings quota",
        ),
        (
            "profiler_limit_hits_total{limit=\"perf_map_bytes\"}",
            "64 MiB perf maps read up to the bound",
        ),
        (
            "profiler_limit_hits_total{limit=\"perf_map_budget\"}",
            "perf maps past the shared budget",
        ),
        ("profiler_file_refusals_total{reason=\"link\"}", "the magic link"),
        (
            "profiler_file_refusals_total{reason=\"not_regular\"}",
            "the device and the FIFO",
        ),
    ] {
        assert!(metric(&metrics, line) >= 1.0, "{what}: {line} is 0\n{metrics}");
    }
    assert!(stop_took < Duration::from_secs(10), "stop took {stop_took:?}");
    drop((
        jit_link, jit_magic, jit_fifo, jit_device, jit_big, deep, mappings, benign,
    ));
}
