//! HTTP transport shared by the HTTP exporters: TLS (custom CA, client certificate),
//! credentials read from files (and re-read when the file changes), extra headers, and the
//! mapping of answers to [`SendError`].
use std::{
    fs,
    path::Path,
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use reqwest::{
    StatusCode,
    header::{HeaderMap, HeaderName, HeaderValue},
};

use super::SendError;
use crate::remote::config::ExporterConfig;
use crate::secret::SecretFile;

pub const USER_AGENT: &str = concat!("profiler/", env!("CARGO_PKG_VERSION"));

#[derive(Debug)]
pub enum Auth {
    None,
    Basic { username: String, password: SecretFile },
    Bearer(SecretFile),
}

impl Auth {
    pub fn from_config(config: &ExporterConfig) -> Self {
        if let Some(basic) = &config.basic_auth {
            Auth::Basic {
                username: basic.username.clone(),
                password: SecretFile::new(&basic.password_file),
            }
        } else if let Some(file) = &config.bearer_token_file {
            Auth::Bearer(SecretFile::new(file))
        } else {
            Auth::None
        }
    }

    /// The `Authorization` header value, if any. A credential file that became unreadable is
    /// a retryable failure: the Secret may be in the middle of being updated.
    pub fn header(&self) -> Result<Option<String>, SendError> {
        let retry = |reason| SendError::Retry { reason, after: None };
        Ok(match self {
            Auth::None => None,
            Auth::Basic { username, password } => {
                let password = password.get().map_err(retry)?;
                let encoded =
                    base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
                Some(format!("Basic {encoded}"))
            }
            Auth::Bearer(token) => Some(format!("Bearer {}", token.get().map_err(retry)?)),
        })
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// A reqwest client with the exporter's TLS, timeout and headers, plus its credentials.
#[derive(Debug)]
pub struct Http {
    pub client: reqwest::Client,
    auth: Auth,
}

impl Http {
    pub fn new(config: &ExporterConfig) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let name =
                HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header `{name}`: {e}"))?;
            let value = HeaderValue::from_str(value).map_err(|e| format!("header `{name}`: {e}"))?;
            headers.insert(name, value);
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .user_agent(USER_AGENT)
            .default_headers(headers)
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)));
        if let Some(ca) = &config.tls.ca_file {
            let pem = read(ca, "tls.ca_file")?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
            if certs.is_empty() {
                return Err(format!("tls.ca_file {}: no certificate in it", ca.display()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
            let mut pem = read(cert, "tls.cert_file")?;
            pem.push(b'\n');
            pem.extend(read(key, "tls.key_file")?);
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|e| format!("tls.cert_file/tls.key_file: not a PEM certificate and key: {e}"))?;
            builder = builder.identity(identity);
        }
        if config.tls.insecure_skip_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let client = builder
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(Self {
            client,
            auth: Auth::from_config(config),
        })
    }

    /// A POST with the credentials applied.
    pub fn post(&self, url: reqwest::Url) -> Result<reqwest::RequestBuilder, SendError> {
        let mut request = self.client.post(url);
        if let Some(value) = self.auth.header()? {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        Ok(request)
    }
}

/// Sends a request and returns the body of a 2xx answer; anything else becomes a
/// [`SendError`] (408, 429 and 5xx retry, with `Retry-After` if the server gave one).
pub async fn exchange(request: reqwest::RequestBuilder) -> Result<(HeaderMap, Vec<u8>), SendError> {
    let response = request.send().await.map_err(|e| SendError::Retry {
        reason: describe(&e),
        after: None,
    })?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.map_err(|e| SendError::Retry {
        reason: format!("reading the answer: {}", describe(&e)),
        after: None,
    })?;
    if status.is_success() {
        return Ok((headers, body.to_vec()));
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(300)])
        .trim()
        .to_owned();
    let reason = format!("HTTP {status}: {text}");
    Err(classify_status(status, retry_after(&headers), reason))
}

pub fn classify_status(status: StatusCode, after: Option<Duration>, reason: String) -> SendError {
    if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        SendError::Retry { reason, after }
    } else {
        SendError::Reject { reason }
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

/// reqwest's error with its causes (its Display alone often says only "error sending request").
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_split_into_retry_and_reject() {
        let retry = |s: u16| {
            matches!(
                classify_status(StatusCode::from_u16(s).expect("status"), None, String::new()),
                SendError::Retry { .. }
            )
        };
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(retry(s), "{s} retries");
        }
        for s in [400, 401, 403, 404, 413, 415, 422] {
            assert!(!retry(s), "{s} is final");
        }
        let mut headers = HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        headers.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_str(&later).expect("value"),
        );
        let parsed = retry_after(&headers).expect("date");
        assert!(
            parsed > Duration::from_secs(100) && parsed <= Duration::from_secs(120),
            "{parsed:?}"
        );
        headers.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn secret_files_are_reread_when_they_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        fs::write(&path, "first\n").expect("write");
        let secret = SecretFile::new(&path);
        assert_eq!(secret.get().as_deref(), Ok("first"));
        fs::write(&path, "second-token\n").expect("write");
        assert_eq!(secret.get().as_deref(), Ok("second-token"));
        let auth = Auth::Basic {
            username: "user".into(),
            password: SecretFile::new(&path),
        };
        // base64("user:second-token")
        assert_eq!(
            auth.header().expect("header").as_deref(),
            Some("Basic dXNlcjpzZWNvbmQtdG9rZW4=")
        );
        fs::remove_file(&path).expect("rm");
        assert!(matches!(secret.get(), Err(e) if e.contains("token")));
    }
}
