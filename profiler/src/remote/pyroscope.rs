//! Grafana Pyroscope: the Push API (Connect unary, protobuf) and the legacy `/ingest`.
//!
//! Series labels: `__name__=process_cpu` (Pyroscope's name for CPU profiles), `service_name`,
//! `node` and the configured labels. Sample labels of the profile (`comm`) become labels of
//! their own series in Pyroscope; numeric ones (`pid`) stay sample labels.
use std::time::UNIX_EPOCH;

use prost::Message as _;

use super::{
    Item, SendError,
    transport::{Http, exchange},
};
use crate::{remote::config::ExporterConfig, wire::pyroscope as wire};

/// Pyroscope's profile name for CPU profiles.
pub const PROFILE_NAME: &str = "process_cpu";
pub const PUSH_PATH: &str = "push.v1.PusherService/Push";

/// Appends `path` to the base URL, keeping any prefix the base has (a proxy's `/pyroscope`).
pub(super) fn join(base: &str, path: &str) -> Result<reqwest::Url, String> {
    let base = if base.ends_with('/') {
        base.to_owned()
    } else {
        format!("{base}/")
    };
    reqwest::Url::parse(&base)
        .and_then(|b| b.join(path))
        .map_err(|e| format!("url `{base}`: {e}"))
}

pub struct Push {
    http: Http,
    url: reqwest::Url,
    labels: Vec<wire::LabelPair>,
}

impl Push {
    pub fn new(config: &ExporterConfig, labels: Vec<(String, String)>) -> Result<Self, String> {
        let mut pairs = vec![
            wire::LabelPair {
                name: "__name__".into(),
                value: PROFILE_NAME.into(),
            },
            // CPU profiles are already deltas; say so rather than leave it to server defaults.
            wire::LabelPair {
                name: "__delta__".into(),
                value: "false".into(),
            },
        ];
        pairs.extend(
            labels
                .into_iter()
                .map(|(name, value)| wire::LabelPair { name, value }),
        );
        Ok(Self {
            http: Http::new(config)?,
            url: join(&config.url, PUSH_PATH)?,
            labels: pairs,
        })
    }

    pub fn request(&self, item: &Item) -> wire::PushRequest {
        wire::PushRequest {
            series: vec![wire::RawProfileSeries {
                labels: self.labels.clone(),
                samples: vec![wire::RawSample {
                    raw_profile: item.gzip.clone(),
                    id: String::new(),
                }],
                annotations: vec![],
            }],
        }
    }

    pub async fn send(&self, item: &Item) -> Result<(), SendError> {
        let body = self.request(item).encode_to_vec();
        let request = self
            .http
            .post(self.url.clone())?
            .header(reqwest::header::CONTENT_TYPE, "application/proto")
            .header("Connect-Protocol-Version", "1")
            .body(body);
        let (headers, body) = exchange(request).await?;
        // A 200 from something that is not Pyroscope (a proxy's login page) must not count as
        // delivered: the answer has to be a PushResponse.
        let content_type = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with("application/proto") {
            return Err(SendError::Retry {
                reason: format!("answer is not a Connect protobuf response (Content-Type `{content_type}`)"),
                after: None,
            });
        }
        wire::PushResponse::decode(body.as_slice()).map_err(|e| SendError::Retry {
            reason: format!("answer is not a PushResponse: {e}"),
            after: None,
        })?;
        Ok(())
    }
}

pub struct Ingest {
    http: Http,
    url: reqwest::Url,
    /// `app{k=v,...}`
    name: String,
}

impl Ingest {
    pub fn new(config: &ExporterConfig, labels: Vec<(String, String)>) -> Result<Self, String> {
        let service = labels
            .iter()
            .find(|(k, _)| k == "service_name")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        if service.is_empty()
            || !service
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c))
        {
            return Err(format!(
                "service_name `{service}` cannot name an /ingest application (letters, digits, `_`, `.`, `-`, `/`)"
            ));
        }
        let tags: Vec<String> = labels
            .iter()
            .filter(|(k, _)| k != "service_name")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        Ok(Self {
            http: Http::new(config)?,
            url: join(&config.url, "ingest")?,
            name: format!("{service}{{{}}}", tags.join(",")),
        })
    }

    pub async fn send(&self, item: &Item) -> Result<(), SendError> {
        let secs = |t: std::time::SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .to_string()
        };
        let request = self
            .http
            .post(self.url.clone())?
            .query(&[
                ("name", self.name.as_str()),
                ("from", &secs(item.start)),
                ("until", &secs(item.end)),
                ("format", "pprof"),
                ("spyName", "ebpf"),
            ])
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(item.gzip.clone());
        exchange(request).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_keep_the_base_prefix() {
        assert_eq!(
            join("https://p.example:4040", PUSH_PATH).expect("url").as_str(),
            "https://p.example:4040/push.v1.PusherService/Push"
        );
        assert_eq!(
            join("https://gw.example/pyroscope", "ingest")
                .expect("url")
                .as_str(),
            "https://gw.example/pyroscope/ingest"
        );
    }
}
