//! Running a tool to completion while watching its CPU, memory and BPF programs.
use std::{
    collections::HashMap,
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// How often a running tool's RSS and BPF program stats are read.
const POLL: Duration = Duration::from_millis(200);

/// Totals of the BPF programs a process holds (from /proc/<pid>/fdinfo of its program fds),
/// over the window in which they ran.
#[derive(Debug, Clone, Copy, Default)]
pub struct BpfTime {
    pub run_ns: u64,
    pub runs: u64,
    pub window: Duration,
}

impl BpfTime {
    pub fn ns_per_run(&self) -> f64 {
        self.run_ns as f64 / self.runs.max(1) as f64
    }

    /// Fraction of one CPU spent in the programs.
    pub fn cpu_share(&self) -> f64 {
        self.run_ns as f64 / self.window.as_nanos().max(1) as f64
    }
}

#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// User + system CPU of the process (and children it waited for), from wait4.
    pub cpu: Duration,
    pub peak_rss_kib: u64,
    /// Median RSS over the second half of the run.
    pub steady_rss_kib: u64,
    pub bpf: BpfTime,
    /// CPU per second of wall time between start-up and shutdown (1 s in to 1 s before the
    /// end), from the threads' schedstat.
    pub steady_cpu_per_second: f64,
    pub stdout: String,
    pub stderr: String,
}

/// Nanoseconds on CPU of all threads of `pid` (/proc/<pid>/task/*/schedstat, first field).
fn cpu_ns(pid: i32) -> Option<u64> {
    let mut total = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let text = fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// Readings per one-second window of the steady-state rate (readings are `POLL` apart).
const READINGS_PER_SECOND: usize = 5;

/// Median CPU per second of wall time over consecutive one-second windows of `readings`:
/// steady state, so a one-off piece of work (loading a large binary's table the first time
/// the process is sampled) does not count as a rate. Falls back to the whole span when it is
/// shorter than two windows.
fn median_rate(readings: &[(Instant, u64)]) -> f64 {
    let rate = |(t0, ns0): (Instant, u64), (t1, ns1): (Instant, u64)| {
        ns1.saturating_sub(ns0) as f64 / (t1 - t0).as_nanos().max(1) as f64
    };
    let rates: Vec<f64> = readings
        .iter()
        .step_by(READINGS_PER_SECOND)
        .zip(
            readings
                .iter()
                .skip(READINGS_PER_SECOND)
                .step_by(READINGS_PER_SECOND),
        )
        .map(|(a, b)| rate(*a, *b))
        .collect();
    if rates.len() < 2 {
        return match (readings.first(), readings.last()) {
            (Some(a), Some(b)) if b.0 > a.0 => rate(*a, *b),
            _ => 0.0,
        };
    }
    median(rates)
}

/// The middle value (the mean of the two middle ones for an even count); NaN when empty.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Time after start from which CPU use counts as steady state.
const STEADY_AFTER: Duration = Duration::from_secs(1);

fn rss_kib(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// When a program's stats were read: (time, run_time_ns, run_cnt).
type Reading = (Instant, u64, u64);

/// (run_time_ns, run_cnt) per perf_event BPF program id held open by `pid`.
fn bpf_programs(pid: i32) -> HashMap<u64, (u64, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        // Sampling programs only (BPF_PROG_TYPE_PERF_EVENT = 7), not the profiler's exec and
        // exit tracepoints: the figure is the cost per sample.
        if field("prog_type:") != Some(7) {
            continue;
        }
        if let (Some(id), Some(ns), Some(cnt)) = (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        {
            out.insert(id, (ns, cnt));
        }
    }
    out
}

/// Runs `cmd` to completion, polling it, and returns what it cost. CPU between 1 s after the
/// start and `steady_until` (before the tool's own shutdown work) is the steady-state rate.
pub fn run(cmd: &mut Command, scratch: &Path, steady_until: Duration) -> Result<Measured> {
    let out_path = scratch.join("stdout");
    let err_path = scratch.join("stderr");
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?);
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id() as i32;
    let mut rss = Vec::new();
    let mut programs: HashMap<u64, (Reading, Reading)> = HashMap::new();
    let mut steady: Vec<(Instant, u64)> = Vec::new();
    let (status, usage) = loop {
        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waiting for our own child with valid pointers.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if rc == pid {
            break (status, usage);
        }
        if rc < 0 {
            bail!("wait4 on {cmd:?}: {}", std::io::Error::last_os_error());
        }
        if let Some(kib) = rss_kib(pid) {
            rss.push(kib);
        }
        if (STEADY_AFTER..=steady_until).contains(&start.elapsed())
            && let Some(ns) = cpu_ns(pid)
        {
            steady.push((Instant::now(), ns));
        }
        // Per program: its first and last reading (a program unloaded before the others
        // keeps its last one).
        for (id, (ns, cnt)) in bpf_programs(pid) {
            let now = Instant::now();
            let entry = programs.entry(id).or_insert(((now, ns, cnt), (now, ns, cnt)));
            entry.1 = (now, ns, cnt);
        }
        thread::sleep(POLL);
    };
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed (status {status}):\n{stderr}");
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let second_half = &rss[rss.len() / 2..];
    let mut sorted = second_half.to_vec();
    sorted.sort_unstable();
    let mut bpf = BpfTime::default();
    for ((t0, ns0, cnt0), (t1, ns1, cnt1)) in programs.values() {
        bpf.run_ns += ns1.saturating_sub(*ns0);
        bpf.runs += cnt1.saturating_sub(*cnt0);
        bpf.window = bpf.window.max(*t1 - *t0);
    }
    let steady_cpu_per_second = median_rate(&steady);
    Ok(Measured {
        steady_cpu_per_second,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        peak_rss_kib: usage.ru_maxrss as u64,
        steady_rss_kib: sorted.get(sorted.len() / 2).copied().unwrap_or(0),
        bpf,
        stdout,
        stderr,
    })
}
