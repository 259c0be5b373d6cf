//! Remote exporters: Pyroscope (Push and `/ingest`), Parca (`WriteRaw`) and OTLP, with
//! delivery that loses nothing the spool can hold.
//!
//! Each exporter has a [`Spool`] and a sender task. The report stage calls
//! [`RemoteExporter::export`], which writes the profile to the spool (fsync-free, atomic
//! rename) and wakes the sender; it never waits for the network. The sender sends the oldest
//! spooled profile until it is accepted (then removes it) or rejected for good (a 4xx other
//! than 408/429: logged, counted, removed). Other failures are retried with exponential backoff
//! and jitter, honouring `Retry-After`; profiles behind it wait in order. The spool's byte
//! limit drops the oldest (counted). Delivery is at least once: a crash between the backend's
//! answer and the removal sends that profile again after the restart.
pub mod config;
mod grpc;
pub mod otlp;
pub mod parca;
pub mod pyroscope;
pub mod spool;
mod transport;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use spool::{Item, Spool, SpoolError};

use crate::{
    export::{EncodedProfile, ExportError, Exporter},
    remote::config::{ExporterConfig, ExporterKind},
    telemetry::{Collect, Exposition, Kind},
};

/// Why a send failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// Network trouble, a 5xx, 408 or 429: try again later (`after`: the server's
    /// `Retry-After`).
    Retry { reason: String, after: Option<Duration> },
    /// The backend refused this profile and would refuse it again.
    Reject { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("exporter `{name}`: {reason}")]
    Setup { name: String, reason: String },
    #[error("exporter `{name}`: {source}")]
    Spool { name: String, source: SpoolError },
}

/// Counters of one exporter, cumulative since start.
#[derive(Debug, Default)]
pub struct ExporterStats {
    pub sent: AtomicU64,
    pub sent_bytes: AtomicU64,
    /// Profiles the backend refused for good (dropped).
    pub rejected: AtomicU64,
    /// Failed attempts (each retry counts).
    pub failures: AtomicU64,
    /// Profiles dropped because the spool was over its byte limit.
    pub spool_dropped: AtomicU64,
    /// Spool files that could not be read back (dropped).
    pub spool_unreadable: AtomicU64,
    /// Unix seconds of the last accepted send; 0 before the first.
    pub last_success: AtomicU64,
}

/// One exporter's value of a /metrics family.
type Figure = fn(&RemoteHandle) -> u64;

/// Every remote exporter, for /metrics (one family per figure, a sample per exporter).
pub struct Exporters(pub Vec<RemoteHandle>);

impl Collect for Exporters {
    fn collect(&self, out: &mut Exposition) {
        fn get(a: &AtomicU64) -> u64 {
            a.load(Ordering::Relaxed)
        }
        let families: [(&str, Kind, &str, Figure); 8] = [
            (
                "profiler_export_sent_total",
                Kind::Counter,
                "Profiles the backend accepted.",
                |e| get(&e.stats.sent),
            ),
            (
                "profiler_export_sent_bytes_total",
                Kind::Counter,
                "Bytes of accepted profiles.",
                |e| get(&e.stats.sent_bytes),
            ),
            (
                "profiler_export_failures_total",
                Kind::Counter,
                "Failed send attempts (each is retried).",
                |e| get(&e.stats.failures),
            ),
            (
                "profiler_export_rejected_total",
                Kind::Counter,
                "Profiles the backend refused for good (dropped).",
                |e| get(&e.stats.rejected),
            ),
            (
                "profiler_export_spool_dropped_total",
                Kind::Counter,
                "Unsent profiles dropped because the spool was full or unreadable.",
                |e| get(&e.stats.spool_dropped) + get(&e.stats.spool_unreadable),
            ),
            (
                "profiler_export_spool_profiles",
                Kind::Gauge,
                "Profiles waiting in the spool.",
                |e| e.spool.usage().0,
            ),
            (
                "profiler_export_spool_bytes",
                Kind::Gauge,
                "Bytes waiting in the spool.",
                |e| e.spool.usage().1,
            ),
            (
                "profiler_export_last_success_timestamp_seconds",
                Kind::Gauge,
                "Unix time of the last accepted send.",
                |e| get(&e.stats.last_success),
            ),
        ];
        for (name, kind, help, value) in families {
            let mut family = out.family(name, kind, help);
            for e in &self.0 {
                family.sample(
                    &[("exporter", &e.name), ("type", e.kind.as_str())],
                    value(e) as f64,
                );
            }
        }
    }
}

/// Labels every backend gets besides the configured ones.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The node (Kubernetes `NODE_NAME`, else the host name).
    pub node: String,
    pub frequency: u32,
}

impl Identity {
    pub fn from_environment(frequency: u32) -> Self {
        let node = std::env::var("NODE_NAME")
            .ok()
            .filter(|n| !n.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "unknown".to_owned());
        Self { node, frequency }
    }
}

/// A backend client: turns a spooled profile into a request and classifies the answer.
enum Client {
    Pyroscope(pyroscope::Push),
    PyroscopeIngest(pyroscope::Ingest),
    Parca(parca::WriteRaw),
    Otlp(otlp::Export),
}

impl Client {
    async fn send(&self, item: &Item) -> Result<(), SendError> {
        match self {
            Client::Pyroscope(c) => c.send(item).await,
            Client::PyroscopeIngest(c) => c.send(item).await,
            Client::Parca(c) => c.send(item).await,
            Client::Otlp(c) => c.send(item).await,
        }
    }
}

/// Series labels of one exporter: the configured ones plus `node`, sorted by name. Each
/// process's `service_name` travels as a sample label, which Pyroscope and Parca split into
/// series of their own; `/ingest` and OTLP need one per request, so for them the node name
/// stands in when the file sets none.
fn series_labels(config: &ExporterConfig, identity: &Identity) -> Vec<(String, String)> {
    let mut labels = config.labels.clone();
    if matches!(config.kind, ExporterKind::PyroscopeIngest | ExporterKind::Otlp) {
        labels
            .entry("service_name".to_owned())
            .or_insert_with(|| identity.node.clone());
    }
    labels
        .entry("node".to_owned())
        .or_insert_with(|| identity.node.clone());
    labels.into_iter().collect()
}

/// The report stage's side of one remote exporter.
pub struct RemoteExporter {
    name: String,
    spool: Arc<Spool>,
    wake: Arc<Notify>,
    stats: Arc<ExporterStats>,
}

/// The daemon's side of one exporter: what `/metrics` reads and what shutdown waits for.
#[derive(Clone)]
pub struct RemoteHandle {
    pub name: String,
    pub kind: ExporterKind,
    pub spool: Arc<Spool>,
    pub stats: Arc<ExporterStats>,
}

impl RemoteHandle {
    /// Waits up to `grace` for the sender to empty the spool; a failed send ends the wait
    /// early (the backend is down: no point holding up the exit). The caller then stops the
    /// sender; what is left stays on disk for the next start.
    pub async fn drain(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        let failures = self.stats.failures.load(Ordering::Relaxed);
        while self.spool.usage().0 > 0
            && tokio::time::Instant::now() < deadline
            && self.stats.failures.load(Ordering::Relaxed) == failures
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Logs what the spool still holds (after the sender stopped).
    pub fn report_left(&self) {
        let (waiting, bytes) = self.spool.usage();
        if waiting > 0 {
            info!(
                exporter = %self.name,
                waiting,
                bytes,
                "profiles left in the spool are sent after the next start"
            );
        }
    }
}

fn client(name: &str, config: &ExporterConfig, identity: &Identity) -> Result<Client, RemoteError> {
    let setup = |reason: String| RemoteError::Setup {
        name: name.to_owned(),
        reason,
    };
    let labels = series_labels(config, identity);
    Ok(match config.kind {
        ExporterKind::Pyroscope => Client::Pyroscope(pyroscope::Push::new(config, labels).map_err(setup)?),
        ExporterKind::PyroscopeIngest => {
            Client::PyroscopeIngest(pyroscope::Ingest::new(config, labels).map_err(setup)?)
        }
        ExporterKind::Parca => Client::Parca(parca::WriteRaw::new(config, labels).map_err(setup)?),
        ExporterKind::Otlp => Client::Otlp(otlp::Export::new(config, labels, identity).map_err(setup)?),
    })
}

/// Builds an exporter's client without starting it (`--check-config`): reads its certificates
/// and keys and checks what the backend requires of its labels.
pub fn check(name: &str, config: &ExporterConfig, identity: &Identity) -> Result<(), RemoteError> {
    client(name, config, identity).map(drop)
}

/// Builds an exporter from its checked configuration: the report stage's side, the daemon's
/// side and the sender, whose [`Sender::run`] the wiring spawns. Fails on unreadable
/// certificates or keys, or an unusable spool directory.
pub fn build(
    name: &str,
    config: &ExporterConfig,
    spool_dir: PathBuf,
    identity: &Identity,
) -> Result<(RemoteExporter, RemoteHandle, Sender), RemoteError> {
    let client = client(name, config, identity)?;
    let spool =
        Arc::new(
            Spool::open(&spool_dir, config.spool_max_bytes).map_err(|source| RemoteError::Spool {
                name: name.to_owned(),
                source,
            })?,
        );
    let (waiting, bytes) = spool.usage();
    if waiting > 0 {
        info!(
            exporter = name,
            waiting, bytes, "resuming the spool of a previous run"
        );
    }
    let wake = Arc::new(Notify::new());
    let stats = Arc::new(ExporterStats::default());
    let sender = Sender {
        name: name.to_owned(),
        client,
        spool: Arc::clone(&spool),
        wake: Arc::clone(&wake),
        stats: Arc::clone(&stats),
        min_backoff: config.min_backoff,
        max_backoff: config.max_backoff,
    };
    Ok((
        RemoteExporter {
            name: name.to_owned(),
            spool: Arc::clone(&spool),
            wake,
            stats: Arc::clone(&stats),
        },
        RemoteHandle {
            name: name.to_owned(),
            kind: config.kind,
            spool,
            stats,
        },
        sender,
    ))
}

impl Exporter for RemoteExporter {
    fn name(&self) -> &str {
        &self.name
    }

    fn export(&mut self, profile: &EncodedProfile) -> Result<Option<PathBuf>, ExportError> {
        let outcome = self
            .spool
            .push(profile.start, profile.end, &profile.gzip)
            .map_err(|e| ExportError::Spool(e.to_string()))?;
        if outcome.dropped > 0 {
            self.stats
                .spool_dropped
                .fetch_add(outcome.dropped, Ordering::Relaxed);
            warn!(
                exporter = %self.name,
                dropped = outcome.dropped,
                "spool full: dropped the oldest unsent profiles"
            );
        }
        self.wake.notify_one();
        Ok(None)
    }
}

/// One exporter's sender: a task that empties the spool into the backend.
pub struct Sender {
    name: String,
    client: Client,
    spool: Arc<Spool>,
    wake: Arc<Notify>,
    stats: Arc<ExporterStats>,
    min_backoff: Duration,
    max_backoff: Duration,
}

impl Sender {
    /// Sends the spool's profiles, oldest first, until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = self.min_backoff;
        loop {
            let mut unreadable = 0;
            let item = self.spool.oldest(&mut unreadable);
            self.stats
                .spool_unreadable
                .fetch_add(unreadable, Ordering::Relaxed);
            let Some(item) = item else {
                tokio::select! {
                    () = self.wake.notified() => continue,
                    () = cancel.cancelled() => return,
                }
            };
            let result = tokio::select! {
                result = self.client.send(&item) => result,
                () = cancel.cancelled() => return,
            };
            let wait = match result {
                Ok(()) => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .sent_bytes
                        .fetch_add(item.gzip.len() as u64, Ordering::Relaxed);
                    self.stats.last_success.store(
                        SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs()),
                        Ordering::Relaxed,
                    );
                    debug!(exporter = %self.name, seq = item.seq, bytes = item.gzip.len(), "profile sent");
                    self.spool.remove(item.seq);
                    backoff = self.min_backoff;
                    continue;
                }
                Err(SendError::Reject { reason }) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    warn!(exporter = %self.name, seq = item.seq, %reason, "backend rejected the profile; dropping it");
                    self.spool.remove(item.seq);
                    continue;
                }
                Err(SendError::Retry { reason, after }) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    let wait = after.unwrap_or_else(|| jitter(backoff)).min(self.max_backoff);
                    warn!(exporter = %self.name, seq = item.seq, %reason, retry_in = ?wait, "send failed; will retry");
                    backoff = (backoff * 2).min(self.max_backoff);
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return,
            }
        }
    }
}

/// A wait between half and all of `base`, so a fleet of daemons does not retry in step.
fn jitter(base: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    // splitmix-style scramble of the clock's low bits: cheap, and good enough to spread retries.
    let mut x = u64::from(nanos).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    let fraction = (x % 1000) as u32;
    base / 2 + base / 2 * fraction / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_between_half_and_all_of_the_base() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(2));
            assert!(
                j >= Duration::from_secs(1) && j <= Duration::from_secs(2),
                "{j:?}"
            );
        }
    }

    #[test]
    fn series_labels_default_service_name_and_node() {
        let config: ExporterConfig =
            serde_norway::from_str("{type: otlp, url: 'https://x', labels: {env: prod}}").expect("parse");
        let identity = Identity {
            node: "node-7".into(),
            frequency: 19,
        };
        assert_eq!(
            series_labels(&config, &identity),
            [
                ("env".to_owned(), "prod".to_owned()),
                ("node".to_owned(), "node-7".to_owned()),
                ("service_name".to_owned(), "node-7".to_owned()),
            ]
        );
        let parca: ExporterConfig = serde_norway::from_str("{type: parca, url: 'https://x'}").expect("parse");
        assert_eq!(
            series_labels(&parca, &identity),
            [("node".to_owned(), "node-7".to_owned())],
            "per-process service_name comes with the samples"
        );
    }
}
