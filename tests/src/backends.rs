//! In-test stand-ins for the backends, built from their protocols (not from the exporter's
//! code) and as strict as the real servers: Pyroscope's Push and `/ingest`, Parca's
//! `WriteRaw` (a tonic server from the same .proto), and an OTLP HTTP receiver that decodes
//! with the crates.io `opentelemetry-proto` types, an implementation independent of ours.
//!
//! Each server keeps what it accepted and can be told to fail (a status code, `Retry-After`,
//! or a garbage answer) to test delivery.
use std::{
    collections::HashSet,
    io::Read as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use opentelemetry_proto::tonic::collector::profiles::v1development as otlp;
use profiler::{
    pprof,
    wire::{parca, pyroscope},
};
use prost::Message as _;

/// How a server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    Accept,
    /// Answer with this status (and `Retry-After` seconds, if given).
    Fail {
        status: u16,
        retry_after: Option<u64>,
    },
    /// 200 with an HTML page: not an answer of the protocol.
    Garbage,
}

/// One accepted profile.
#[derive(Debug, Clone)]
pub struct Received {
    /// Series labels (Pyroscope, Parca) or resource attributes (OTLP), sorted.
    pub labels: Vec<(String, String)>,
    pub profile: Option<pprof::Profile>,
    pub otlp: Option<otlp::ExportProfilesServiceRequest>,
    /// Request headers (lower-case names).
    pub headers: Vec<(String, String)>,
}

#[derive(Debug)]
struct Shared {
    behaviour: Mutex<Behaviour>,
    received: Mutex<Vec<Received>>,
    /// Requests answered with a failure (including garbage).
    failed: Mutex<u64>,
}

/// A running stand-in server; stops when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Stops the server when the handle is dropped.
    _server: Serving,
}

impl Backend {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.shared.behaviour.lock().expect("lock") = behaviour;
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().expect("lock").clone()
    }

    pub fn failed(&self) -> u64 {
        *self.shared.failed.lock().expect("lock")
    }

    fn start(addr: SocketAddr, router: impl FnOnce(Arc<Shared>) -> Router + Send + 'static) -> Self {
        let shared = Shared::new();
        let (runtime, listener, addr) = serving_runtime(addr);
        let app = router(Arc::clone(&shared));
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            shared,
            _server: runtime,
        }
    }

    /// Pyroscope on `addr` (port 0: any): Push and `/ingest`.
    pub fn pyroscope(addr: SocketAddr) -> Self {
        Self::start(addr, |shared| {
            Router::new()
                .route("/push.v1.PusherService/Push", post(pyroscope_push))
                .route("/ingest", post(pyroscope_ingest))
                .with_state(shared)
        })
    }

    /// An OTLP/HTTP receiver on `addr`.
    pub fn otlp(addr: SocketAddr) -> Self {
        Self::start(addr, |shared| {
            Router::new()
                .route("/v1development/profiles", post(otlp_export))
                .with_state(shared)
        })
    }

    /// Parca's gRPC `ProfileStoreService` on `addr` (h2c, as Parca serves it).
    pub fn parca(addr: SocketAddr) -> Self {
        Self::grpc(addr, |shared| {
            tonic::service::Routes::new(
                parca::profile_store_service_server::ProfileStoreServiceServer::new(ParcaStore(shared)),
            )
        })
    }

    /// An OTLP/gRPC collector on `addr` (h2c).
    pub fn otlp_grpc(addr: SocketAddr) -> Self {
        Self::grpc(addr, |shared| {
            tonic::service::Routes::new(otlp::profiles_service_server::ProfilesServiceServer::new(
                OtlpGrpc(shared),
            ))
        })
    }

    fn grpc(addr: SocketAddr, routes: impl FnOnce(Arc<Shared>) -> tonic::service::Routes) -> Self {
        let shared = Shared::new();
        let (runtime, listener, addr) = serving_runtime(addr);
        let routes = routes(Arc::clone(&shared));
        runtime.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming(incoming)
                .await;
        });
        Self {
            addr,
            shared,
            _server: runtime,
        }
    }
}

impl Shared {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            behaviour: Mutex::new(Behaviour::Accept),
            received: Mutex::new(Vec::new()),
            failed: Mutex::new(0),
        })
    }
}

/// The one-thread runtime of a stand-in server; dropping it stops the server and frees its
/// port.
pub(crate) struct Serving(Option<tokio::runtime::Runtime>);

impl Serving {
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Some(rt) = &self.0 {
            rt.spawn(task);
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// A runtime with a listener bound on `addr` (port 0: any free port).
pub(crate) fn serving_runtime(addr: SocketAddr) -> (Serving, tokio::net::TcpListener, SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
    let addr = listener.local_addr().expect("addr");
    (Serving(Some(runtime)), listener, addr)
}

fn headers_of(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect()
}

/// The configured failure, if any, as an HTTP answer.
fn failure(shared: &Shared) -> Option<Response> {
    let behaviour = shared.behaviour.lock().expect("lock").clone();
    let response = match behaviour {
        Behaviour::Accept => return None,
        Behaviour::Fail { status, retry_after } => {
            let mut r = (
                StatusCode::from_u16(status).expect("status"),
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"code":"unavailable","message":"test failure"}"#,
            )
                .into_response();
            if let Some(s) = retry_after {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, s.to_string().parse().expect("value"));
            }
            r
        }
        Behaviour::Garbage => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body>Please log in</body></html>",
        )
            .into_response(),
    };
    *shared.failed.lock().expect("lock") += 1;
    Some(response)
}

fn reject(status: StatusCode, message: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"code":"invalid_argument","message":{message:?}}}"#),
    )
        .into_response()
}

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| format!("gunzip: {e}"))?;
    Ok(out)
}

/// The union of the checks `go tool pprof`, Pyroscope and Parca apply to a pprof profile.
pub fn validate_pprof(raw: &[u8]) -> Result<pprof::Profile, String> {
    let p = pprof::Profile::decode(gunzip(raw)?.as_slice()).map_err(|e| format!("pprof: {e}"))?;
    let strings = p.string_table.len() as i64;
    if p.string_table.first().map(String::as_str) != Some("") {
        return Err("string_table[0] must be empty".into());
    }
    let text = |i: i64| -> Result<&str, String> {
        if (0..strings).contains(&i) {
            Ok(&p.string_table[i as usize])
        } else {
            Err(format!("string index {i} out of range"))
        }
    };
    if p.sample_type.is_empty() {
        return Err("no sample_type".into());
    }
    for t in &p.sample_type {
        if text(t.r#type)?.contains('-') {
            return Err("sample type names may not contain '-'".into());
        }
        text(t.unit)?;
    }
    // Parca: ids are exactly index + 1.
    for (i, m) in p.mapping.iter().enumerate() {
        if m.id != i as u64 + 1 {
            return Err(format!("mapping {i} has id {}, want {}", m.id, i + 1));
        }
        text(m.filename)?;
        text(m.build_id)?;
    }
    for (i, f) in p.function.iter().enumerate() {
        if f.id != i as u64 + 1 {
            return Err(format!("function {i} has id {}, want {}", f.id, i + 1));
        }
        text(f.name)?;
        text(f.system_name)?;
        text(f.filename)?;
    }
    for (i, l) in p.location.iter().enumerate() {
        if l.id != i as u64 + 1 {
            return Err(format!("location {i} has id {}, want {}", l.id, i + 1));
        }
        if l.mapping_id > p.mapping.len() as u64 {
            return Err(format!("location {} names mapping {}", l.id, l.mapping_id));
        }
        for line in &l.line {
            if line.function_id == 0 || line.function_id > p.function.len() as u64 {
                return Err(format!("location {} names function {}", l.id, line.function_id));
            }
        }
    }
    if p.sample.len() > 16_000 {
        return Err("more than 16000 samples".into());
    }
    for s in &p.sample {
        if s.value.len() != p.sample_type.len() {
            return Err("sample value count differs from sample_type".into());
        }
        for &id in &s.location_id {
            if id == 0 || id > p.location.len() as u64 {
                return Err(format!("sample names location {id}"));
            }
        }
        for l in &s.label {
            if l.key == 0 {
                return Err("label key 0".into());
            }
            text(l.key)?;
            text(l.str)?;
        }
    }
    // Pyroscope: time within [now - 1h, now + 10m].
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    if p.time_nanos != 0 && (p.time_nanos < now - 3_600_000_000_000 || p.time_nanos > now + 600_000_000_000) {
        return Err("time_nanos outside [now-1h, now+10m]".into());
    }
    // Parca: a delta profile needs its duration.
    if p.duration_nanos <= 0 {
        return Err("duration_nanos must be set".into());
    }
    Ok(p)
}

/// Pyroscope's series-label rules (Push).
fn validate_series(labels: &[(String, String)]) -> Result<(), String> {
    if labels.is_empty() || labels.len() > 30 {
        return Err(format!("{} series labels (1..=30 allowed)", labels.len()));
    }
    let mut names = HashSet::new();
    for (name, value) in labels {
        if !names.insert(name) {
            return Err(format!("duplicate label {name}"));
        }
        if name.is_empty() || name.len() > 1024 || value.len() > 2048 {
            return Err(format!("label {name} too long or empty"));
        }
    }
    match labels.iter().find(|(n, _)| n == "__name__") {
        Some((_, v))
            if !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') =>
        {
            Ok(())
        }
        _ => Err("__name__ is missing or not a metric name".into()),
    }
}

async fn pyroscope_push(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(failed) = failure(&shared) {
        return failed;
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type != "application/proto" {
        return reject(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {content_type}"),
        );
    }
    let request = match pyroscope::PushRequest::decode(body.as_ref()) {
        Ok(r) => r,
        Err(e) => return reject(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let mut accepted = Vec::new();
    for series in request.series {
        let mut labels: Vec<(String, String)> =
            series.labels.into_iter().map(|l| (l.name, l.value)).collect();
        labels.sort();
        if let Err(e) = validate_series(&labels) {
            return reject(StatusCode::BAD_REQUEST, e);
        }
        for sample in series.samples {
            match validate_pprof(&sample.raw_profile) {
                Ok(profile) => accepted.push(Received {
                    labels: labels.clone(),
                    profile: Some(profile),
                    otlp: None,
                    headers: headers_of(&headers),
                }),
                Err(e) => return reject(StatusCode::BAD_REQUEST, e),
            }
        }
    }
    shared.received.lock().expect("lock").extend(accepted);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/proto")],
        pyroscope::PushResponse {}.encode_to_vec(),
    )
        .into_response()
}

async fn pyroscope_ingest(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(failed) = failure(&shared) {
        return failed;
    }
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if get("format") != Some("pprof") {
        return reject(StatusCode::BAD_REQUEST, "format must be pprof here".into());
    }
    for t in ["from", "until"] {
        if !get(t).is_some_and(|v| v.len() == 10 && v.bytes().all(|b| b.is_ascii_digit())) {
            return reject(StatusCode::BAD_REQUEST, format!("{t} is not unix seconds"));
        }
    }
    // name = app{k=v,...}
    let Some(name) = get("name") else {
        return reject(StatusCode::BAD_REQUEST, "service name is required".into());
    };
    let (app, tags) = name.split_once('{').unwrap_or((name, "}"));
    if app.is_empty()
        || !app
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c))
    {
        return reject(StatusCode::BAD_REQUEST, format!("app name `{app}`"));
    }
    let mut labels = vec![("service_name".to_owned(), app.to_owned())];
    for pair in tags.trim_end_matches('}').split(',').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return reject(StatusCode::BAD_REQUEST, format!("tag `{pair}`"));
        };
        labels.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    labels.sort();
    match validate_pprof(&body) {
        Ok(profile) => shared.received.lock().expect("lock").push(Received {
            labels,
            profile: Some(profile),
            otlp: None,
            headers: headers_of(&headers),
        }),
        Err(e) => return reject(StatusCode::UNPROCESSABLE_ENTITY, e),
    }
    StatusCode::OK.into_response()
}

async fn otlp_export(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(failed) = failure(&shared) {
        return failed;
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !["application/x-protobuf", "application/protobuf"].contains(&content_type) {
        return StatusCode::UNSUPPORTED_MEDIA_TYPE.into_response();
    }
    let request = match otlp::ExportProfilesServiceRequest::decode(body.as_ref()) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    if request.dictionary.is_none() {
        return (StatusCode::BAD_REQUEST, "dictionary is required").into_response();
    }
    let labels = resource_labels(&request);
    shared.received.lock().expect("lock").push(Received {
        labels,
        profile: None,
        otlp: Some(request),
        headers: headers_of(&headers),
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        otlp::ExportProfilesServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

/// Request headers of a gRPC call (ASCII metadata).
fn metadata_of(metadata: &tonic::metadata::MetadataMap) -> Vec<(String, String)> {
    metadata
        .iter()
        .filter_map(|kv| match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                Some((k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            }
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect()
}

/// The OTLP/gRPC profiles service, from the opentelemetry-proto crate's generated server.
struct OtlpGrpc(Arc<Shared>);

#[tonic::async_trait]
impl otlp::profiles_service_server::ProfilesService for OtlpGrpc {
    async fn export(
        &self,
        request: tonic::Request<otlp::ExportProfilesServiceRequest>,
    ) -> Result<tonic::Response<otlp::ExportProfilesServiceResponse>, tonic::Status> {
        let headers = metadata_of(request.metadata());
        let request = request.into_inner();
        if request.dictionary.is_none() {
            return Err(tonic::Status::invalid_argument("dictionary is required"));
        }
        let labels = resource_labels(&request);
        self.0.received.lock().expect("lock").push(Received {
            labels,
            profile: None,
            otlp: Some(request),
            headers,
        });
        Ok(tonic::Response::new(
            otlp::ExportProfilesServiceResponse::default(),
        ))
    }
}

/// String resource attributes, sorted.
fn resource_labels(request: &otlp::ExportProfilesServiceRequest) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = request
        .resource_profiles
        .iter()
        .filter_map(|r| r.resource.as_ref())
        .flat_map(|r| &r.attributes)
        .filter_map(|kv| {
            use opentelemetry_proto::tonic::common::v1::any_value::Value;
            match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
                _ => None,
            }
        })
        .collect();
    labels.sort();
    labels
}

struct ParcaStore(Arc<Shared>);

#[tonic::async_trait]
impl parca::profile_store_service_server::ProfileStoreService for ParcaStore {
    async fn write_raw(
        &self,
        request: tonic::Request<parca::WriteRawRequest>,
    ) -> Result<tonic::Response<parca::WriteRawResponse>, tonic::Status> {
        let behaviour = self.0.behaviour.lock().expect("lock").clone();
        if let Behaviour::Fail { status, .. } = behaviour {
            *self.0.failed.lock().expect("lock") += 1;
            let code = if status == 503 {
                tonic::Code::Unavailable
            } else {
                tonic::Code::InvalidArgument
            };
            return Err(tonic::Status::new(code, "test failure"));
        }
        let headers = metadata_of(request.metadata());
        let request = request.into_inner();
        let mut accepted = Vec::new();
        for series in request.series {
            let mut labels: Vec<(String, String)> = series
                .labels
                .map(|set| set.labels.into_iter().map(|l| (l.name, l.value)).collect())
                .unwrap_or_default();
            labels.sort();
            if !labels.iter().any(|(n, _)| n == "__name__") {
                return Err(tonic::Status::invalid_argument("missing __name__ label"));
            }
            let mut names = HashSet::new();
            for (name, _) in &labels {
                let mut chars = name.chars();
                let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                    && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid || !names.insert(name.clone()) {
                    return Err(tonic::Status::invalid_argument(format!(
                        "invalid label name {name}"
                    )));
                }
            }
            for sample in series.samples {
                let profile = validate_pprof(&sample.raw_profile).map_err(tonic::Status::invalid_argument)?;
                if !sample.executable_info.is_empty() && sample.executable_info.len() != profile.mapping.len()
                {
                    return Err(tonic::Status::invalid_argument("executable_info count"));
                }
                accepted.push(Received {
                    labels: labels.clone(),
                    profile: Some(profile),
                    otlp: None,
                    headers: headers.clone(),
                });
            }
        }
        self.0.received.lock().expect("lock").extend(accepted);
        Ok(tonic::Response::new(parca::WriteRawResponse {}))
    }
}

/// A CA with a server certificate (for `localhost` and 127.0.0.1) and a client certificate,
/// written as PEM files into a directory.
pub struct Pki {
    pub ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
}

impl Pki {
    pub fn create(dir: &std::path::Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "profiler test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, client: bool| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params.extended_key_usages = vec![if client {
                rcgen::ExtendedKeyUsagePurpose::ClientAuth
            } else {
                rcgen::ExtendedKeyUsagePurpose::ServerAuth
            }];
            let cert = params.signed_by(&key, &issuer).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], false);
        let (client_cert, client_key) = leaf(vec!["profiler-client".into()], true);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write pem");
            path
        };
        Self {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
        }
    }

    /// A TLS acceptor that requires client certificates signed by the CA.
    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.server_cert)
            .expect("certs")
            .map(|c| c.expect("cert"))
            .collect();
        let key = PrivateKeyDer::from_pem_file(&self.server_key).expect("key");
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca).expect("ca") {
            roots.add(c.expect("ca cert")).expect("add");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .build()
        .expect("verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .expect("server config");
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

impl Backend {
    /// Pyroscope over HTTPS that accepts only clients with a certificate from `pki`'s CA.
    pub fn pyroscope_mtls(pki: &Pki) -> Self {
        let acceptor = pki.acceptor();
        let shared = Shared::new();
        let (runtime, listener, addr) = serving_runtime("127.0.0.1:0".parse().expect("addr"));
        let app = Router::new()
            .route("/push.v1.PusherService/Push", post(pyroscope_push))
            .with_state(Arc::clone(&shared));
        runtime.spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(app);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let service = service.clone();
                tokio::spawn(async move {
                    // A client without an accepted certificate fails here.
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let _ =
                        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                });
            }
        });
        Self {
            addr,
            shared,
            _server: runtime,
        }
    }
}
