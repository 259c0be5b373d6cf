//! The configuration file (`--config`, YAML): where profiles are sent.
//!
//! Flags cover one machine's sampling; the file holds what a deployment shares in a ConfigMap:
//! the backends, each with its labels, credentials (as file paths, so Secrets mount as files),
//! TLS and delivery settings. Everything is checked when the file is loaded, so a typo fails
//! at start with the exporter's index and the field, never at the first send.
use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    labels::{DEFAULT_LABEL_VALUE_LIMIT, Labeler, RuleConfig},
    remote::config::{ExporterConfig, ExporterKind, check_exporter},
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
