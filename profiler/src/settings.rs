//! The configuration file (`--config`, YAML): where profiles are sent.
//!
//! Flags cover one machine's sampling; the file holds what a deployment shares in a ConfigMap:
//! the backends, each with its labels, credentials (as file paths, so Secrets mount as files),
//! TLS and delivery settings. Everything is checked when the file is loaded, so a typo fails
//! at start with the exporter's index and the field, never at the first send.
use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    config::parse_bytes,
    labels::{Labeler, RuleConfig, relabel::valid_label_name},
    report::DEFAULT_LABEL_VALUE_LIMIT,
};

/// Where spools live when the file does not say.
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/profiler/spool";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Parent directory of each exporter's spool (`<spool_dir>/<exporter name>`).
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    #[serde(default)]
    pub exporters: Vec<ExporterConfig>,
    /// Prometheus-style rules over each process's discovered labels, after the built-in ones
    /// (see `crate::labels`).
    #[serde(default)]
    pub relabel_configs: Vec<RuleConfig>,
    /// Most distinct values of one label in one profile; the rest become `_overflow_`.
    #[serde(default)]
    pub label_value_limit: Option<usize>,
}

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
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// First wait after a failed send; doubles (with jitter) up to `max_backoff`.
    #[serde(default = "default_min_backoff", deserialize_with = "duration")]
    pub min_backoff: Duration,
    #[serde(default = "default_max_backoff", deserialize_with = "duration")]
    pub max_backoff: Duration,
    /// Bytes of unsent profiles kept on disk; past it the oldest are dropped (and counted).
    #[serde(default = "default_spool_bytes", deserialize_with = "bytes")]
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

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!("`{text}` is not a duration ({e}; examples: 10s, 500ms)"))
    })
}

fn bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Number(n) => Ok(n),
        Size::Text(text) => parse_bytes(&text).map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("reading the config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_norway::Error,
    },
    #[error("config file {path}: relabel_configs[{index}]: {reason}")]
    Relabel {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("config file {path}: label_value_limit must be at least 1")]
    LabelValueLimit { path: PathBuf },
    #[error("config file {path}: exporters[{index}] ({kind}): {reason}")]
    Exporter {
        path: PathBuf,
        index: usize,
        kind: ExporterKind,
        reason: String,
    },
}

/// A loaded and checked configuration file.
#[derive(Debug, Default)]
pub struct Settings {
    pub spool_dir: PathBuf,
    /// Exporters with their final (unique) names.
    pub exporters: Vec<(String, ExporterConfig)>,
    /// The built-in relabeling rules followed by the file's.
    pub labeler: Labeler,
    pub label_value_limit: usize,
}

impl Settings {
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let text = fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, SettingsError> {
        // An empty file is an empty configuration, not an error.
        let file: ConfigFile = if text.trim().is_empty() {
            ConfigFile::default()
        } else {
            serde_norway::from_str(text).map_err(|source| SettingsError::Parse {
                path: path.to_owned(),
                source,
            })?
        };
        let mut exporters = Vec::with_capacity(file.exporters.len());
        for (index, exporter) in file.exporters.into_iter().enumerate() {
            let fail = |reason: String| SettingsError::Exporter {
                path: path.to_owned(),
                index,
                kind: exporter.kind,
                reason,
            };
            check_exporter(&exporter).map_err(fail)?;
            let name = match &exporter.name {
                Some(name) => name.clone(),
                None => exporter.kind.as_str().to_owned(),
            };
            if exporters.iter().any(|(n, _): &(String, _)| *n == name) {
                return Err(fail(format!(
                    "the name `{name}` is already used by another exporter; give each a distinct `name`"
                )));
            }
            exporters.push((name, exporter));
        }
        let labeler =
            Labeler::new(&file.relabel_configs).map_err(|(index, reason)| SettingsError::Relabel {
                path: path.to_owned(),
                index,
                reason,
            })?;
        let label_value_limit = file.label_value_limit.unwrap_or(DEFAULT_LABEL_VALUE_LIMIT);
        if label_value_limit == 0 {
            return Err(SettingsError::LabelValueLimit {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            spool_dir: file.spool_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_DIR)),
            exporters,
            labeler,
            label_value_limit,
        })
    }
}

fn check_exporter(e: &ExporterConfig) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, String> {
        Settings::parse(Path::new("test.yaml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_file_parses_with_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        fs::write(&token, "secret\n").expect("write");
        let text = format!(
            r#"
spool_dir: /tmp/spool
exporters:
  - type: pyroscope
    url: https://profiles.example.net
    labels: {{service_name: checkout, env: prod}}
    basic_auth: {{username: "123456", password_file: {token}}}
    headers: {{X-Scope-OrgID: team-a}}
    spool_max_bytes: 64M
  - type: parca
    url: http://parca.monitoring:7070
    insecure: true
    timeout: 30s
  - type: parca
    name: parca-b
    url: https://parca.example.net
    bearer_token_file: {token}
"#,
            token = token.display()
        );
        let s = parse(&text).expect("valid");
        assert_eq!(s.spool_dir, PathBuf::from("/tmp/spool"));
        let names: Vec<&str> = s.exporters.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["pyroscope", "parca", "parca-b"]);
        let (_, p) = &s.exporters[0];
        assert_eq!(p.spool_max_bytes, 64 << 20);
        assert_eq!(p.timeout, Duration::from_secs(10));
        assert_eq!(p.min_backoff, Duration::from_millis(500));
        assert_eq!(p.labels["service_name"], "checkout");
        assert_eq!(s.exporters[1].1.timeout, Duration::from_secs(30));
        assert_eq!(parse("").expect("empty").exporters.len(), 0);
        assert_eq!(parse("").expect("empty").label_value_limit, 1000);
    }

    #[test]
    fn mistakes_name_the_exporter_and_the_field() {
        let cases = [
            (
                "exporters: [{type: parca, url: 'http://parca:7070'}]",
                "exporters[0] (parca): url `http://parca:7070` is plaintext http; use https, or set `insecure: true`",
            ),
            (
                "exporters: [{type: pyroscope, url: 'not a url'}]",
                "exporters[0] (pyroscope): url `not a url` is not a URL",
            ),
            (
                "exporters: [{type: otlp, url: 'https://x', bearer_token_file: /nonexistent/token}]",
                "exporters[0] (otlp): bearer_token_file /nonexistent/token: No such file",
            ),
            (
                "exporters: [{type: pyroscope, url: 'https://x', labels: {'1abc': v}}]",
                "label name `1abc` is invalid",
            ),
            (
                "exporters: [{type: pyroscope, url: 'https://x', labels: {__name__: v}}]",
                "label name `__name__` is reserved",
            ),
            (
                "exporters: [{type: pyroscope_ingest, url: 'https://x', labels: {env: 'a,b'}}]",
                "/ingest cannot carry",
            ),
            (
                "exporters: [{type: pyroscope, url: 'https://x'}, {type: pyroscope, url: 'https://y'}]",
                "exporters[1] (pyroscope): the name `pyroscope` is already used",
            ),
            (
                "exporters: [{type: zipkin, url: 'https://x'}]",
                "unknown variant `zipkin`",
            ),
            (
                "exporters: [{type: parca, url: 'https://x', colour: red}]",
                "unknown field `colour`",
            ),
            (
                "exporters: [{type: parca, url: 'https://x', timeout: soon}]",
                "`soon` is not a duration",
            ),
            (
                "exporters: [{type: parca, url: 'https://x', tls: {cert_file: /a}}]",
                "tls.cert_file and tls.key_file go together",
            ),
            (
                "exporters: [{type: parca, url: 'https://x', headers: {'bad header': v}}]",
                "header name `bad header` is not a valid",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text).expect_err(text);
            assert!(
                err.contains(expected),
                "{text}\n  gave: {err}\n  want: {expected}"
            );
            assert!(err.starts_with("config file test.yaml"), "{err}");
        }
    }
}
