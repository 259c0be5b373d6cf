//! One exporter's configuration, as the config file's `exporters:` list gives it, and its
//! checks (run when the file is loaded, so a mistake fails at start, not at the first send).
use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::labels::relabel::valid_label_name;

/// The backends a profile can go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExporterKind {
    /// Pyroscope's Push API (`/push.v1.PusherService/Push`, Connect, protobuf).
    Pyroscope,
    /// Pyroscope's legacy `/ingest` (older servers and proxies that only forward it).
    PyroscopeIngest,
    /// Parca's `ProfileStoreService/WriteRaw` over gRPC.
    Parca,
    /// OTLP profiles (v1development, proto v1.10) over HTTP.
    Otlp,
}

impl ExporterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExporterKind::Pyroscope => "pyroscope",
            ExporterKind::PyroscopeIngest => "pyroscope_ingest",
            ExporterKind::Parca => "parca",
            ExporterKind::Otlp => "otlp",
        }
    }
}

impl fmt::Display for ExporterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the OTLP exporter talks to its collector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// OTLP/HTTP with protobuf bodies (port 4318 by convention).
    #[default]
    Http,
    /// OTLP/gRPC (port 4317; also Parca's and Pyroscope's own ports).
    Grpc,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExporterConfig {
    #[serde(rename = "type")]
    pub kind: ExporterKind,
    /// Names the spool directory and the exporter's metrics; default: the type (with its index
    /// when a type appears twice).
    #[serde(default)]
    pub name: Option<String>,
    /// Base URL (`https://pyroscope.example:4040`, `http://parca:7070`). OTLP: the full
    /// endpoint when the URL has a path, else `/v1development/profiles` is appended.
    pub url: String,
    /// `otlp` only: `http` (default) or `grpc`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Allows a plaintext `http://` URL. Off by default so credentials never travel in clear
    /// by accident.
    #[serde(default)]
    pub insecure: bool,
    /// Series labels sent with every profile (e.g. `service_name`, `env`, `region`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub basic_auth: Option<BasicAuth>,
    /// File holding a bearer token (`Authorization: Bearer …`); re-read when it changes.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// Extra request headers (gRPC metadata for Parca), e.g. `X-Scope-OrgID`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub tls: TlsClient,
    /// Time limit of one send attempt.
    #[serde(
        default = "default_timeout",
        deserialize_with = "crate::units::deserialize_duration"
    )]
    pub timeout: Duration,
    /// First wait after a failed send; doubles (with jitter) up to `max_backoff`.
    #[serde(
        default = "default_min_backoff",
        deserialize_with = "crate::units::deserialize_duration"
    )]
    pub min_backoff: Duration,
    #[serde(
        default = "default_max_backoff",
        deserialize_with = "crate::units::deserialize_duration"
    )]
    pub max_backoff: Duration,
    /// Bytes of unsent profiles kept on disk; past it the oldest are dropped (and counted).
    #[serde(
        default = "default_spool_bytes",
        deserialize_with = "crate::units::deserialize_bytes"
    )]
    pub spool_max_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    /// File holding the password (for Grafana Cloud: the access token); re-read when it
    /// changes.
    pub password_file: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsClient {
    /// PEM file of CA certificates trusted in addition to the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Accepts any server certificate. For tests only.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_min_backoff() -> Duration {
    Duration::from_millis(500)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(300)
}

fn default_spool_bytes() -> u64 {
    256 << 20
}

pub fn check_exporter(e: &ExporterConfig) -> Result<(), String> {
    if let Some(name) = &e.name
        && (name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    {
        return Err(format!(
            "name `{name}` must be non-empty letters, digits, `-`, `_` or `.` (it names a directory)"
        ));
    }
    if e.protocol == Protocol::Grpc && e.kind != ExporterKind::Otlp {
        return Err("`protocol: grpc` is for the otlp type (parca always uses gRPC)".to_owned());
    }
    let url = reqwest::Url::parse(&e.url).map_err(|err| format!("url `{}` is not a URL: {err}", e.url))?;
    match url.scheme() {
        "https" => {}
        "http" if e.insecure => {}
        "http" => {
            return Err(format!(
                "url `{}` is plaintext http; use https, or set `insecure: true` to send in clear",
                e.url
            ));
        }
        other => return Err(format!("url `{}` has scheme `{other}`; use http or https", e.url)),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("url `{}` has no host", e.url));
    }
    for name in e.labels.keys() {
        if !valid_label_name(name) {
            return Err(format!(
                "label name `{name}` is invalid: use letters, digits and `_`, not starting with a digit"
            ));
        }
        if name.starts_with("__") {
            return Err(format!(
                "label name `{name}` is reserved (names starting with `__` belong to the backend)"
            ));
        }
    }
    if e.kind == ExporterKind::PyroscopeIngest {
        for (name, value) in &e.labels {
            if value.contains([',', '}', '{', '=']) {
                return Err(format!(
                    "label {name}=`{value}`: /ingest cannot carry `,`, `=`, `{{` or `}}` in values"
                ));
            }
        }
    }
    for (name, value) in &e.headers {
        reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header name `{name}` is not a valid HTTP header name"))?;
        reqwest::header::HeaderValue::from_str(value)
            .map_err(|_| format!("header `{name}` has a value that is not valid in HTTP"))?;
    }
    if e.basic_auth.is_some() && e.bearer_token_file.is_some() {
        return Err("set either basic_auth or bearer_token_file, not both".to_owned());
    }
    if let Some(auth) = &e.basic_auth {
        check_readable(&auth.password_file, "basic_auth.password_file")?;
    }
    if let Some(file) = &e.bearer_token_file {
        check_readable(file, "bearer_token_file")?;
    }
    if let Some(ca) = &e.tls.ca_file {
        check_readable(ca, "tls.ca_file")?;
    }
    match (&e.tls.cert_file, &e.tls.key_file) {
        (Some(cert), Some(key)) => {
            check_readable(cert, "tls.cert_file")?;
            check_readable(key, "tls.key_file")?;
        }
        (None, None) => {}
        _ => return Err("tls.cert_file and tls.key_file go together (mutual TLS)".to_owned()),
    }
    if url.scheme() == "http"
        && (e.tls.ca_file.is_some() || e.tls.cert_file.is_some() || e.tls.insecure_skip_verify)
    {
        return Err(format!(
            "tls settings are given but url `{}` is plaintext http",
            e.url
        ));
    }
    if e.timeout < Duration::from_millis(100) {
        return Err(format!("timeout {:?} is too short (at least 100ms)", e.timeout));
    }
    if e.min_backoff.is_zero() || e.min_backoff > e.max_backoff {
        return Err(format!(
            "min_backoff {:?} must be above zero and at most max_backoff {:?}",
            e.min_backoff, e.max_backoff
        ));
    }
    if e.spool_max_bytes < 1 << 20 {
        return Err(format!(
            "spool_max_bytes {} is below 1M: one profile would not fit",
            e.spool_max_bytes
        ));
    }
    Ok(())
}

fn check_readable(path: &Path, field: &str) -> Result<(), String> {
    fs::read(path)
        .map(drop)
        .map_err(|err| format!("{field} {}: {err}", path.display()))
}
