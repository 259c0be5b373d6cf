//! Command line and its validation into a typed configuration.
use std::{num::NonZeroU32, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    bpf::{MAX_UNWIND_TABLE_BYTES, MIN_UNWIND_TABLE_BYTES, SamplingConfig, Unwinder},
    labels::Selector,
    units::{parse_bytes, parse_duration},
};

/// Highest sampling frequency accepted. The kernel's own default cap
/// (`kernel.perf_event_max_sample_rate`) is 100 kHz across all events; a CPU profiler gains
/// nothing above 1 kHz and would pay for it in overhead.
pub const MAX_FREQUENCY_HZ: u32 = 1000;

#[derive(Debug, Parser)]
#[command(
    name = "profiler",
    version,
    about = "Whole-system eBPF CPU profiler writing pprof profiles"
)]
pub struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `profiler=debug`.
    #[arg(long, env = "PROFILER_LOG", default_value = "info", global = true)]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Record the whole machine (or some processes) once and write one profile.
    Record(RecordArgs),
    /// Run continuously, writing one profile per interval into an archive directory.
    Run(Box<RunArgs>),
}

#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Samples per second per CPU [default: 99 for `record`, 19 for `run`].
    #[arg(long, short = 'F', env = "PROFILER_FREQUENCY", value_name = "HZ")]
    pub frequency: Option<u32>,
    /// Only sample this process (host pid); repeat for more. Default: every process.
    #[arg(long = "pid", short = 'p', value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only sample the processes in this cgroup (v2) and its descendants: a directory under the
    /// cgroup2 mount, or a path relative to it (`/kubepods.slice`). Filtered in the kernel.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<PathBuf>,
    /// Only sample processes whose labels match all of `name=value[,name=value…]` (e.g.
    /// `namespace=payments`, `service_name=nginx`); repeat for more selectors. Resolved every
    /// few seconds into cgroups and pids that the kernel filters on.
    #[arg(long = "target", value_name = "SELECTOR", value_parser = parse_selector)]
    pub targets: Vec<Selector>,
    /// How user stacks are walked: `dwarf` (unwind tables from .eh_frame, frame pointers
    /// where a file has none) or `frame-pointer` (the kernel's frame-pointer walk only).
    #[arg(long, env = "PROFILER_UNWINDER", value_enum, default_value = "dwarf")]
    pub unwinder: Unwinder,
    /// Most kernel memory the unwind tables may take (K, M, G suffixes); each table is allocated
    /// when it is loaded, and least recently used tables are evicted past it. 8 bytes per row:
    /// libc needs ~0.2M.
    #[arg(long, env = "PROFILER_UNWIND_TABLE_SIZE", default_value = "64M", value_parser = parse_bytes)]
    pub unwind_table_size: u64,
}

#[derive(Debug, Args)]
pub struct SymbolArgs {
    /// Memory for parsed symbol tables, DWARF and Go tables (K, M, G suffixes); least recently
    /// used files are dropped past it.
    #[arg(long, env = "PROFILER_SYMBOL_CACHE_SIZE", default_value = "256M", value_parser = parse_bytes)]
    pub symbol_cache_size: u64,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub symbols: SymbolArgs,
    /// How long to record, e.g. `10s`, `1m30s`.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Where to write the gzip'd pprof profile.
    #[arg(long, short = 'o', default_value = "profile.pb.gz")]
    pub output: PathBuf,
    /// Print this many top functions (by own samples) when done; 0 prints none.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub symbols: SymbolArgs,
    /// Length of one profile, e.g. `15s`.
    #[arg(long, env = "PROFILER_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Directory of the local profile archive (the default exporter).
    #[arg(
        long,
        env = "PROFILER_OUTPUT_DIR",
        default_value = "/var/lib/profiler/profiles"
    )]
    pub output_dir: PathBuf,
    /// Keep at most this many profiles in the archive; older ones are deleted.
    #[arg(long, env = "PROFILER_RETAIN_COUNT", default_value_t = 240)]
    pub retain_count: usize,
    /// Keep at most this many bytes of profiles (suffixes K, M, G are binary units).
    #[arg(long, env = "PROFILER_RETAIN_BYTES", default_value = "1G", value_parser = parse_bytes)]
    pub retain_bytes: u64,
    /// Do not write the local archive (profiles go only to the config file's exporters).
    #[arg(long, env = "PROFILER_NO_ARCHIVE")]
    pub no_archive: bool,
    /// Configuration file (YAML) with the exporters: Pyroscope, Parca, OTLP
    /// (docs/configuration.md).
    #[arg(long, short = 'c', env = "PROFILER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Check the flags, the configuration file, credentials and certificates, then exit
    /// without sampling.
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub http: HttpArgs,
    /// This node's name (the downward API's `spec.nodeName`): turns on pod labels from the
    /// Kubernetes API for the pods on this node.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubeconfig for the Kubernetes API when not running in a pod (in a pod, the service
    /// account is used).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Address of the endpoint for `go tool pprof` (/debug/pprof/profile), /metrics, /healthz
    /// and /readyz; `off` disables it. A non-loopback address needs --http-bearer-token-file or
    /// --http-client-ca.
    #[arg(long, env = "PROFILER_HTTP_LISTEN", default_value = DEFAULT_HTTP_LISTEN, value_parser = parse_listen)]
    pub http_listen: Listen,
    /// Address serving only /healthz, /readyz and /metrics, without authentication (for probes
    /// and Prometheus); off by default.
    #[arg(long, env = "PROFILER_HEALTH_LISTEN", default_value = "off", value_parser = parse_listen)]
    pub health_listen: Listen,
    /// File holding the bearer token requests to the endpoint must carry (re-read on change).
    #[arg(long, env = "PROFILER_HTTP_BEARER_TOKEN_FILE")]
    pub http_bearer_token_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM).
    #[arg(long, env = "PROFILER_HTTP_TLS_CERT", requires = "http_tls_key")]
    pub http_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --http-tls-cert.
    #[arg(long, env = "PROFILER_HTTP_TLS_KEY", requires = "http_tls_cert")]
    pub http_tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "PROFILER_HTTP_CLIENT_CA")]
    pub http_client_ca: Option<PathBuf>,
}

pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:7073";

/// A listen address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<std::net::SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" || s.is_empty() {
        return Ok(Listen(None));
    }
    s.parse().map(|a| Listen(Some(a))).map_err(|_| {
        format!("`{s}` is not an address (examples: 127.0.0.1:7073, [::1]:7073, 0.0.0.0:7073, off)")
    })
}

impl HttpArgs {
    pub fn settings(&self) -> crate::server::ServerSettings {
        crate::server::ServerSettings {
            listen: self.http_listen.0,
            health_listen: self.health_listen.0,
            bearer_token_file: self.http_bearer_token_file.clone(),
            tls_cert: self.http_tls_cert.clone(),
            tls_key: self.http_tls_key.clone(),
            client_ca: self.http_client_ca.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--frequency must be between 1 and {MAX_FREQUENCY_HZ} Hz, got {0}")]
    Frequency(u32),
    #[error("at most {max} --pid flags are supported, got {got}")]
    TooManyPids { max: u32, got: usize },
    #[error("--pid 0 is not a process (pid 0 is the idle task)")]
    PidZero,
    #[error("--{flag} must be at least 1s, got {value:?}")]
    DurationTooShort { flag: &'static str, value: Duration },
    #[error("--retain-count must be at least 1")]
    RetainCount,
    #[error("--unwind-table-size must be between 64K and 4G, got {0} bytes")]
    UnwindTableSize(u64),
}

impl SamplingArgs {
    pub fn validate(&self, default_hz: u32) -> Result<SamplingConfig, ConfigError> {
        let hz = self.frequency.unwrap_or(default_hz);
        let frequency = NonZeroU32::new(hz)
            .filter(|f| f.get() <= MAX_FREQUENCY_HZ)
            .ok_or(ConfigError::Frequency(hz))?;
        let max = profiler_common::MAX_TARGET_PIDS;
        if self.pids.len() > max as usize {
            return Err(ConfigError::TooManyPids {
                max,
                got: self.pids.len(),
            });
        }
        if self.pids.contains(&0) {
            return Err(ConfigError::PidZero);
        }
        let mut pids = self.pids.clone();
        pids.sort_unstable();
        pids.dedup();
        if !(MIN_UNWIND_TABLE_BYTES..=MAX_UNWIND_TABLE_BYTES).contains(&self.unwind_table_size) {
            return Err(ConfigError::UnwindTableSize(self.unwind_table_size));
        }
        let unwind_rows = (self.unwind_table_size / size_of::<profiler_common::UnwindRow>() as u64)
            .min(u64::from(u32::MAX)) as u32;
        Ok(SamplingConfig {
            frequency,
            pids,
            cgroups: self.cgroups.clone(),
            targets: self.targets.clone(),
            unwinder: self.unwinder,
            unwind_rows,
        })
    }
}

pub fn check_duration(flag: &'static str, value: Duration) -> Result<Duration, ConfigError> {
    if value < Duration::from_secs(1) {
        return Err(ConfigError::DurationTooShort { flag, value });
    }
    Ok(value)
}

fn parse_selector(s: &str) -> Result<Selector, String> {
    let mut pairs = Vec::new();
    for part in s.split(',') {
        let (name, value) = part.split_once('=').ok_or_else(|| {
            format!("`{part}` is not name=value (example: namespace=payments,container=api)")
        })?;
        let name = name.trim();
        if !crate::labels::relabel::valid_label_name(name) {
            return Err(format!("`{name}` is not a label name"));
        }
        pairs.push((name.to_owned(), value.trim().to_owned()));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("2K"), Ok(2048));
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert!(parse_bytes("ten").unwrap_err().contains("not a size"));
        assert!(parse_bytes("99999999999G").unwrap_err().contains("too large"));
    }

    #[test]
    fn sampling_validation_names_the_bad_value() {
        let args = SamplingArgs {
            frequency: Some(0),
            pids: vec![],
            cgroups: vec![],
            targets: vec![],
            unwinder: Unwinder::Dwarf,
            unwind_table_size: 64 << 20,
        };
        assert_eq!(
            args.validate(19).unwrap_err().to_string(),
            "--frequency must be between 1 and 1000 Hz, got 0"
        );
        let args = SamplingArgs {
            frequency: None,
            pids: vec![7, 3, 7],
            cgroups: vec![],
            targets: vec![],
            unwinder: Unwinder::Dwarf,
            unwind_table_size: 64 << 20,
        };
        let cfg = args.validate(19).expect("valid");
        assert_eq!(cfg.frequency.get(), 19);
        assert_eq!(cfg.pids, vec![3, 7]);
        assert_eq!(cfg.unwind_rows, 8 << 20);
        let args = SamplingArgs {
            frequency: Some(99),
            pids: vec![0],
            cgroups: vec![],
            targets: vec![],
            unwinder: Unwinder::Dwarf,
            unwind_table_size: 64 << 20,
        };
        assert!(matches!(args.validate(19), Err(ConfigError::PidZero)));
        let args = SamplingArgs {
            frequency: None,
            pids: vec![],
            cgroups: vec![],
            targets: vec![],
            unwinder: Unwinder::FramePointer,
            unwind_table_size: 1000,
        };
        assert_eq!(
            args.validate(19).unwrap_err().to_string(),
            "--unwind-table-size must be between 64K and 4G, got 1000 bytes"
        );
    }

    #[test]
    fn selectors_parse_and_name_mistakes() {
        assert_eq!(
            parse_selector("namespace=payments, container=api"),
            Ok(vec![
                ("namespace".to_owned(), "payments".to_owned()),
                ("container".to_owned(), "api".to_owned())
            ])
        );
        assert!(parse_selector("payments").unwrap_err().contains("not name=value"));
        assert!(parse_selector("1x=a").unwrap_err().contains("not a label name"));
    }

    #[test]
    fn cli_rejects_bad_durations() {
        let err = Cli::try_parse_from(["profiler", "record", "--duration", "soon"]).unwrap_err();
        assert!(err.to_string().contains("examples"), "{err}");
        let cli =
            Cli::try_parse_from(["profiler", "record", "-d", "3s", "-p", "1", "-p", "2"]).expect("parses");
        match cli.command {
            Command::Record(r) => {
                assert_eq!(r.duration, Duration::from_secs(3));
                assert_eq!(r.sampling.pids, vec![1, 2]);
            }
            Command::Run(_) => panic!("parsed as run"),
        }
    }
}
