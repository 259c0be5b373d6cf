//! The daemon's HTTP endpoint: `go tool pprof`-compatible on-demand profiles of the whole node
//! (or some processes), an index of what can be profiled, and self-telemetry.
//!
//! - `GET /debug/pprof/profile?seconds=N[&pid=P…][&comm=C][&service_name=S][&namespace=NS]
//!   [&pod=P][&container=C]`: N seconds (missing, invalid or
//!   ≤ 0 means 30, as in Go's handler; above [`MAX_SECONDS`] is a 400) of CPU samples from the
//!   running sampler, filtered in the aggregator, symbolized and returned as a gzip'd pprof
//!   exactly as Go's `net/http/pprof` does. Concurrent requests share the one sampler (at most
//!   [`MAX_TAPS`] at once; more get 429).
//! - `GET|POST /debug/pprof/symbol`: profiles are symbolized already; answers the
//!   `num_symbols` header so clients that ask never fail.
//! - `GET /debug/pprof/`: HTML index of the processes that can be profiled.
//! - `GET /metrics`, `/healthz`, `/readyz` (also on the separate, unauthenticated health
//!   listener, which serves nothing else).
//!
//! Access: the main listener binds 127.0.0.1 by default. Any other address needs a bearer token
//! (`Authorization: Bearer`) or mutual TLS (client certificates signed by `--http-client-ca`);
//! the daemon refuses to start otherwise.
use std::{
    collections::HashMap,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc, oneshot},
};
use tokio_rustls::{TlsAcceptor, rustls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    aggregate::{MAX_TAPS, TapFilter},
    messages::{Job, Message},
    sample::KernelCounters,
    secret::SecretFile,
    telemetry::{Collect, Exposition, Telemetry},
};

/// Longest on-demand profile.
pub const MAX_SECONDS: u64 = 600;
/// Go's default when `seconds` is missing or invalid.
const DEFAULT_SECONDS: u64 = 30;

#[derive(Debug, Clone, Default)]
pub struct ServerSettings {
    /// Main listener (profiles, index, metrics, health); `None` disables it.
    pub listen: Option<SocketAddr>,
    /// Health and metrics only, no authentication (for kubelet probes and Prometheus).
    pub health_listen: Option<SocketAddr>,
    pub bearer_token_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA of accepted client certificates: turns on mutual TLS.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "refusing to serve profiles on {0} without authentication: bind a loopback address, or give --http-bearer-token-file or --http-client-ca (mutual TLS)"
    )]
    Unauthenticated(SocketAddr),
    #[error(
        "refusing to take a bearer token in plaintext on {0}: anyone on the network path could read it; give --http-tls-cert and --http-tls-key, or bind a loopback address"
    )]
    PlaintextToken(SocketAddr),
    #[error("{flag} {path}: {reason}")]
    File {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("--http-tls-cert and --http-tls-key go together")]
    HalfTls,
    #[error("--http-client-ca needs TLS: give --http-tls-cert and --http-tls-key")]
    MtlsWithoutTls,
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn file_error(flag: &'static str, path: &Path, reason: impl ToString) -> ServerError {
    ServerError::File {
        flag,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

impl ServerSettings {
    /// Checks the access policy and that every file can be read; builds the TLS acceptor.
    pub fn check(&self) -> Result<Option<TlsAcceptor>, ServerError> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(self.tls_acceptor(cert, key)?),
            (None, None) if self.client_ca.is_some() => return Err(ServerError::MtlsWithoutTls),
            (None, None) => None,
            _ => return Err(ServerError::HalfTls),
        };
        if let Some(file) = &self.bearer_token_file {
            let token = SecretFile::new(file)
                .get()
                .map_err(|e| file_error("--http-bearer-token-file", file, e))?;
            if token.is_empty() {
                return Err(file_error("--http-bearer-token-file", file, "the file is empty"));
            }
        }
        if let Some(addr) = self.listen
            && !addr.ip().is_loopback()
        {
            if self.bearer_token_file.is_none() && self.client_ca.is_none() {
                return Err(ServerError::Unauthenticated(addr));
            }
            if self.bearer_token_file.is_some() && tls.is_none() {
                return Err(ServerError::PlaintextToken(addr));
            }
        }
        Ok(tls)
    }

    fn tls_acceptor(&self, cert: &Path, key: &Path) -> Result<TlsAcceptor, ServerError> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(Iterator::collect)
            .map_err(|e| file_error("--http-tls-cert", cert, e))?;
        if certs.is_empty() {
            return Err(file_error("--http-tls-cert", cert, "no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error("--http-tls-key", key, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| ServerError::Tls(e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in
                    CertificateDer::pem_file_iter(ca).map_err(|e| file_error("--http-client-ca", ca, e))?
                {
                    let c = c.map_err(|e| file_error("--http-client-ca", ca, e))?;
                    roots.add(c).map_err(|e| file_error("--http-client-ca", ca, e))?;
                }
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| file_error("--http-client-ca", ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| ServerError::Tls(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// What the handlers share.
pub struct Endpoint {
    /// Into the aggregator (taps ride the sample queue, so they see samples in order).
    samples: mpsc::WeakSender<Message>,
    /// Into the report stage (symbolize + encode).
    jobs: mpsc::WeakSender<Job>,
    pub telemetry: Arc<Telemetry>,
    /// The kernel's counters as last read: each on-demand profile reports what happened while
    /// it ran.
    kernel: Arc<KernelCounters>,
    /// Profiles served by /debug/pprof/profile.
    on_demand: AtomicU64,
    pub proc_root: PathBuf,
    token: Option<SecretFile>,
    taps: Semaphore,
    next_tap: AtomicU64,
}

impl Endpoint {
    pub fn new(
        samples: mpsc::WeakSender<Message>,
        jobs: mpsc::WeakSender<Job>,
        telemetry: Arc<Telemetry>,
        kernel: Arc<KernelCounters>,
        settings: &ServerSettings,
    ) -> Self {
        Self {
            samples,
            jobs,
            telemetry,
            kernel,
            on_demand: AtomicU64::new(0),
            proc_root: PathBuf::from("/proc"),
            token: settings.bearer_token_file.as_deref().map(SecretFile::new),
            taps: Semaphore::new(MAX_TAPS),
            next_tap: AtomicU64::new(1),
        }
    }
}

impl Collect for Endpoint {
    fn collect(&self, out: &mut Exposition) {
        out.counter(
            "profiler_on_demand_profiles_total",
            "Profiles served by /debug/pprof/profile.",
            self.on_demand.load(Ordering::Relaxed),
        );
        out.counter(
            "profiler_http_connections_refused_total",
            "Connections closed on arrival because a listener had its maximum open.",
            CONNECTIONS_REFUSED.load(Ordering::Relaxed),
        );
    }
}

type Shared = Arc<Endpoint>;

fn health_routes() -> Router<Shared> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The main listener's routes: profiles behind the access check, probes open.
pub fn router(endpoint: Shared) -> Router {
    let protected = Router::new()
        .route("/debug/pprof/profile", get(profile))
        .route("/debug/pprof/symbol", get(symbol).post(symbol))
        .route("/debug/pprof/cmdline", get(cmdline))
        .route("/debug/pprof/", get(index))
        .route("/debug/pprof", get(index))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&endpoint), authorize));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(protected)
        .with_state(endpoint)
}

pub fn health_router(endpoint: Shared) -> Router {
    health_routes().with_state(endpoint)
}

/// Compares without an early exit, so the time taken does not reveal the matching prefix.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(State(endpoint): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(token) = &endpoint.token {
        let expected = match token.get() {
            Ok(t) => t,
            Err(error) => {
                warn!(%error, "bearer token file unreadable; refusing requests");
                return text_error(StatusCode::SERVICE_UNAVAILABLE, "server credentials unavailable");
            }
        };
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if expected.is_empty() || !same(given.as_bytes(), expected.as_bytes()) {
            let mut response = text_error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

/// An error the way Go's pprof handlers send it (`go tool pprof` prints the body when it sees
/// `X-Go-Pprof`).
fn text_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::HeaderName::from_static("x-go-pprof"), "1"),
        ],
        format!("{message}\n"),
    )
        .into_response()
}

async fn healthz(State(endpoint): State<Shared>) -> Response {
    if endpoint.telemetry.has_failed() {
        (StatusCode::SERVICE_UNAVAILABLE, "a pipeline stage failed\n").into_response()
    } else if let Some((stage, busy)) = endpoint.telemetry.stalled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the {stage} stage has been on one item for {}s (more than {}s): wedged\n",
                busy.as_secs(),
                endpoint.telemetry.stall_after().as_secs()
            ),
        )
            .into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn readyz(State(endpoint): State<Shared>) -> Response {
    if endpoint.telemetry.is_ready() && !endpoint.telemetry.has_failed() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(endpoint): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        endpoint.telemetry.render(),
    )
        .into_response()
}

async fn symbol() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "num_symbols: 1\n",
    )
        .into_response()
}

async fn cmdline() -> Response {
    let args: Vec<String> = std::env::args().collect();
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        args.join("\0"),
    )
        .into_response()
}

/// Parses the query of `/debug/pprof/profile`.
pub fn parse_profile_query(query: &str, proc_root: &Path) -> Result<(u64, TapFilter), (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let mut seconds = DEFAULT_SECONDS;
    let mut filter = TapFilter::default();
    for (key, value) in url_pairs(query) {
        match key.as_str() {
            "seconds" => {
                // Go's handler: anything but a positive integer means the default.
                seconds = value
                    .parse::<i64>()
                    .ok()
                    .filter(|s| *s > 0)
                    .map_or(DEFAULT_SECONDS, |s| s as u64);
                if seconds > MAX_SECONDS {
                    return Err(bad(format!(
                        "profile duration {seconds}s exceeds this server's limit of {MAX_SECONDS}s"
                    )));
                }
            }
            "pid" => {
                for part in value.split(',').filter(|p| !p.is_empty()) {
                    let pid: u32 = part
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("pid `{part}` is not a process id")))?;
                    let tgid = crate::procfs::thread_group(proc_root, pid)
                        .ok_or_else(|| (StatusCode::NOT_FOUND, format!("no process with pid {pid}")))?;
                    if !filter.pids.contains(&tgid) {
                        filter.pids.push(tgid);
                    }
                }
            }
            "comm" if !value.is_empty() => filter.comm = Some(value),
            "container" | "pod" | "namespace" | "service_name" if !value.is_empty() => {
                filter.labels.push((key, value));
            }
            "debug" | "gc" => {}
            other => {
                return Err(bad(format!(
                    "unknown parameter `{other}`; this endpoint takes seconds, pid, comm, container, pod, namespace and service_name"
                )));
            }
        }
    }
    Ok((seconds, filter))
}

/// `application/x-www-form-urlencoded` pairs of a query string (`+` is a space, `%xx` a byte,
/// anything malformed kept as written), through the URL parser reqwest already carries.
fn url_pairs(query: &str) -> Vec<(String, String)> {
    let mut url = match reqwest::Url::parse("http://localhost/") {
        Ok(url) => url,
        Err(_) => return Vec::new(),
    };
    url.set_query(Some(query));
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Closes a tap if its request goes away before the profile is done (client disconnected).
struct TapGuard {
    id: u64,
    endpoint: Shared,
    armed: bool,
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Some(samples) = self.endpoint.samples.upgrade() else {
            return;
        };
        let (reply, _) = oneshot::channel();
        let message = Message::CloseTap {
            id: self.id,
            counters: self.endpoint.kernel.get(),
            reply,
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = samples.send(message).await;
            });
        }
    }
}

async fn profile(State(endpoint): State<Shared>, request: Request) -> Response {
    let query = request.uri().query().unwrap_or("");
    let (seconds, filter) = match parse_profile_query(query, &endpoint.proc_root) {
        Ok(parsed) => parsed,
        Err((status, message)) => return text_error(status, &message),
    };
    let Ok(_permit) = endpoint.taps.try_acquire() else {
        return text_error(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("{MAX_TAPS} profiles are being recorded already; try again when one is done"),
        );
    };
    let id = endpoint.next_tap.fetch_add(1, Ordering::Relaxed);
    info!(id, seconds, pids = ?filter.pids, comm = ?filter.comm, labels = ?filter.labels, "on-demand profile started");
    let open = Message::OpenTap {
        id,
        filter,
        counters: endpoint.kernel.get(),
    };
    let stopping = || text_error(StatusCode::SERVICE_UNAVAILABLE, "the profiler is stopping");
    let Some(samples) = endpoint.samples.upgrade() else {
        return stopping();
    };
    if samples.send(open).await.is_err() {
        return stopping();
    }
    drop(samples);
    let mut guard = TapGuard {
        id,
        endpoint: Arc::clone(&endpoint),
        armed: true,
    };
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (reply, snapshot) = oneshot::channel();
    guard.armed = false;
    let close = Message::CloseTap {
        id,
        counters: endpoint.kernel.get(),
        reply,
    };
    let Some(samples) = endpoint.samples.upgrade() else {
        return stopping();
    };
    if samples.send(close).await.is_err() {
        return stopping();
    }
    drop(samples);
    let Ok(snapshot) = snapshot.await else {
        return stopping();
    };
    let (reply, encoded) = oneshot::channel();
    let Some(jobs) = endpoint.jobs.upgrade() else {
        return stopping();
    };
    if jobs.send(Job::OnDemand { snapshot, reply }).await.is_err() {
        return stopping();
    }
    drop(jobs);
    let Ok(gzip) = encoded.await else {
        return stopping();
    };
    endpoint.on_demand.fetch_add(1, Ordering::Relaxed);
    debug!(id, bytes = gzip.len(), "on-demand profile sent");
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"profile\""),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Body::from(gzip),
    )
        .into_response()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn index(State(endpoint): State<Shared>) -> Html<String> {
    let mut processes: Vec<(u32, String)> = std::fs::read_dir(&endpoint.proc_root)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| {
                    let comm = std::fs::read_to_string(endpoint.proc_root.join(pid.to_string()).join("comm"))
                        .ok()?;
                    Some((pid, comm.trim().to_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    processes.sort();
    let mut by_comm: HashMap<&str, usize> = HashMap::new();
    for (_, comm) in &processes {
        *by_comm.entry(comm).or_default() += 1;
    }
    let mut page = String::from(
        "<html><head><title>/debug/pprof/</title></head><body>\n<h1>/debug/pprof/</h1>\n\
         <p>CPU profiles of every process on this node, sampled by the kernel.</p>\n<ul>\n\
         <li><a href=\"profile?seconds=30\">profile</a>: 30 s of the whole node \
         (<code>go tool pprof http://HOST:PORT/debug/pprof/profile?seconds=30</code>); \
         add <code>&amp;pid=P</code>, <code>&amp;comm=NAME</code>, <code>&amp;service_name=S</code>, \
         <code>&amp;namespace=NS</code>, <code>&amp;pod=P</code> or <code>&amp;container=C</code> to keep some processes</li>\n\
         <li><a href=\"symbol\">symbol</a>, <a href=\"cmdline\">cmdline</a>, \
         <a href=\"/metrics\">/metrics</a></li>\n</ul>\n",
    );
    let _ = writeln!(page, "<h2>{} processes</h2>\n<table>", processes.len());
    page.push_str("<tr><th>pid</th><th>comm</th><th></th></tr>\n");
    for (pid, comm) in &processes {
        let comm = escape(comm);
        let _ = writeln!(
            page,
            "<tr><td>{pid}</td><td>{comm}</td><td><a href=\"profile?seconds=30&amp;pid={pid}\">30 s profile</a></td></tr>"
        );
    }
    page.push_str("</table>\n</body></html>\n");
    Html(page)
}

/// Most connections one listener keeps open at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest a client may take to finish its TLS handshake, and to send a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections closed because [`MAX_CONNECTIONS`] were open.
pub static CONNECTIONS_REFUSED: AtomicU64 = AtomicU64::new(0);

/// Serves `router` on `listener` (over TLS when `tls` is set) until `cancel`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    cancel: CancellationToken,
) {
    let service = TowerToHyperService::new(router);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = cancel.cancelled() => return,
        };
        // Past the cap a connection is closed at once: a flood of idle connections cannot take
        // the daemon's descriptors, which its /proc and ELF reads need.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            CONNECTIONS_REFUSED.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "connection refused: {MAX_CONNECTIONS} already open");
            drop(stream);
            continue;
        };
        let service = service.clone();
        let tls = tls.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // A client must send its request head in time (slow-loris connections end).
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let result = match tls {
                Some(acceptor) => match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream))
                    .await
                    .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut)))
                {
                    Ok(stream) => {
                        tokio::select! {
                            r = builder.serve_connection(TokioIo::new(stream), service) => r,
                            () = cancel.cancelled() => Ok(()),
                        }
                    }
                    Err(error) => {
                        debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                },
                None => {
                    tokio::select! {
                        r = builder.serve_connection(TokioIo::new(stream), service) => r,
                        () = cancel.cancelled() => Ok(()),
                    }
                }
            };
            if let Err(error) = result {
                debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

/// A bound listener and the routes it serves; the wiring spawns [`Listener::serve`].
pub struct Listener {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
}

impl Listener {
    /// Serves connections until `cancel`.
    pub async fn serve(self, cancel: CancellationToken) {
        serve(self.listener, self.tls, self.router, cancel).await;
    }
}

/// Binds the listeners, so a busy port fails at start.
pub async fn bind(
    settings: &ServerSettings,
    tls: Option<TlsAcceptor>,
    endpoint: Shared,
) -> Result<Vec<Listener>, ServerError> {
    let mut bound = Vec::new();
    if let Some(addr) = settings.listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local = listener.local_addr().unwrap_or(addr);
        info!(address = %local, tls = tls.is_some(), "serving /debug/pprof/profile and /metrics");
        bound.push(Listener {
            listener,
            tls,
            router: router(Arc::clone(&endpoint)),
        });
    }
    if let Some(addr) = settings.health_listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local = listener.local_addr().unwrap_or(addr);
        info!(address = %local, "serving /healthz, /readyz and /metrics");
        bound.push(Listener {
            listener,
            tls: None,
            router: health_router(endpoint),
        });
    }
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_queries_follow_go_and_name_bad_filters() {
        let proc = Path::new("/proc");
        assert_eq!(parse_profile_query("", proc).expect("ok").0, 30);
        assert_eq!(parse_profile_query("seconds=5", proc).expect("ok").0, 5);
        // Go's handler: invalid or non-positive means the default, not an error.
        assert_eq!(parse_profile_query("seconds=-3", proc).expect("ok").0, 30);
        assert_eq!(parse_profile_query("seconds=abc", proc).expect("ok").0, 30);
        let (status, message) = parse_profile_query("seconds=601", proc).expect_err("too long");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(message.contains("limit of 600s"), "{message}");
        let me = std::process::id();
        let (_, filter) =
            parse_profile_query(&format!("seconds=1&pid={me},{me}&comm=my%20app"), proc).expect("ok");
        assert_eq!(filter.pids, vec![me]);
        assert_eq!(filter.comm.as_deref(), Some("my app"));
        assert_eq!(
            url_pairs("comm=%E2%82%AC%zz%4"),
            [("comm".to_owned(), "€%zz%4".to_owned())]
        );
        let (status, _) = parse_profile_query("pid=5000000000", proc).expect_err("no such pid");
        assert_eq!(status, StatusCode::BAD_REQUEST, "not a u32 pid");
        let (status, message) = parse_profile_query("pid=4194303", proc).expect_err("no such pid");
        assert_eq!(status, StatusCode::NOT_FOUND, "{message}");
        let (_, message) = parse_profile_query("sconds=5", proc).expect_err("typo");
        assert!(message.contains("unknown parameter `sconds`"), "{message}");
        let (_, filter) =
            parse_profile_query("pod=web-1&namespace=shop&container=4e5d2a0c0f6f", proc).expect("ok");
        assert_eq!(
            filter.labels,
            [
                ("pod".to_owned(), "web-1".to_owned()),
                ("namespace".to_owned(), "shop".to_owned()),
                ("container".to_owned(), "4e5d2a0c0f6f".to_owned())
            ]
        );
    }

    #[test]
    fn a_non_loopback_bind_needs_credentials() {
        let open = ServerSettings {
            listen: Some("0.0.0.0:7073".parse().expect("addr")),
            ..Default::default()
        };
        let Err(err) = open.check() else { panic!("refused") };
        assert!(
            err.to_string()
                .contains("refusing to serve profiles on 0.0.0.0:7073"),
            "{err}"
        );
        let loopback = ServerSettings {
            listen: Some("127.0.0.1:7073".parse().expect("addr")),
            ..Default::default()
        };
        assert!(loopback.check().is_ok());
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").expect("write");
        // A token off loopback needs TLS: without it anyone on the path reads the token.
        let plaintext_token = ServerSettings {
            bearer_token_file: Some(token.clone()),
            ..open.clone()
        };
        let Err(err) = plaintext_token.check() else {
            panic!("plaintext token")
        };
        assert!(
            err.to_string()
                .contains("bearer token in plaintext on 0.0.0.0:7073"),
            "{err}"
        );
        let loopback_token = ServerSettings {
            bearer_token_file: Some(token),
            ..loopback
        };
        assert!(loopback_token.check().is_ok());
        let missing = ServerSettings {
            bearer_token_file: Some(dir.path().join("absent")),
            ..open
        };
        let Err(err) = missing.check() else {
            panic!("missing token")
        };
        assert!(err.to_string().contains("--http-bearer-token-file"), "{err}");
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"abc", b"ab"));
    }
}
