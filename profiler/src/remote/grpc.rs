//! gRPC transport shared by the Parca and OTLP/gRPC exporters: a lazily connected tonic channel
//! (h2c with `insecure: true`, else TLS with the system roots, `tls.ca_file` and an optional
//! client certificate), the exporter's headers and credentials as metadata, and the mapping of
//! status codes to [`SendError`].
use tonic::{
    Code,
    metadata::{Ascii, MetadataKey, MetadataMap, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::{SendError, transport::Auth};
use crate::remote::config::ExporterConfig;

pub struct Grpc {
    pub channel: Channel,
    auth: Auth,
    headers: Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>,
}

impl Grpc {
    pub fn new(config: &ExporterConfig) -> Result<Self, String> {
        let mut endpoint = Endpoint::from_shared(config.url.clone())
            .map_err(|e| format!("url `{}`: {e}", config.url))?
            .user_agent(super::transport::USER_AGENT)
            .map_err(|e| e.to_string())?
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(std::time::Duration::from_secs(5)));
        if config.url.starts_with("https://") {
            if config.tls.insecure_skip_verify {
                return Err(format!(
                    "tls.insecure_skip_verify is not supported for gRPC ({}); give the server's CA in tls.ca_file",
                    config.kind
                ));
            }
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &config.tls.ca_file {
                let pem = std::fs::read(ca).map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
                let cert =
                    std::fs::read(cert).map_err(|e| format!("tls.cert_file {}: {e}", cert.display()))?;
                let key = std::fs::read(key).map_err(|e| format!("tls.key_file {}: {e}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("TLS settings: {e}"))?;
        }
        let mut headers = Vec::new();
        for (name, value) in &config.headers {
            let key = MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_err(|e| format!("header `{name}` as gRPC metadata: {e}"))?;
            let value =
                MetadataValue::try_from(value.as_str()).map_err(|e| format!("header `{name}`: {e}"))?;
            headers.push((key, value));
        }
        Ok(Self {
            // Connects on first use and reconnects after failures; never blocks start-up.
            channel: endpoint.connect_lazy(),
            auth: Auth::from_config(config),
            headers,
        })
    }

    /// Wraps a message with the exporter's headers and credentials.
    pub fn request<T>(&self, message: T) -> Result<tonic::Request<T>, SendError> {
        let mut request = tonic::Request::new(message);
        let metadata: &mut MetadataMap = request.metadata_mut();
        for (key, value) in &self.headers {
            metadata.insert(key.clone(), value.clone());
        }
        if let Some(auth) = self.auth.header()? {
            let value = MetadataValue::try_from(auth).map_err(|e| SendError::Reject {
                reason: format!("credential is not valid gRPC metadata: {e}"),
            })?;
            metadata.insert("authorization", value);
        }
        Ok(request)
    }
}

/// gRPC codes that may succeed later retry; the rest (invalid argument, unauthenticated, …)
/// would fail the same way again.
pub fn classify(status: &tonic::Status) -> SendError {
    let reason = format!("gRPC {:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::Cancelled
        | Code::DataLoss => SendError::Retry { reason, after: None },
        _ => SendError::Reject { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_split_into_retry_and_reject() {
        let retry = |code| matches!(classify(&tonic::Status::new(code, "x")), SendError::Retry { .. });
        assert!(retry(Code::Unavailable));
        assert!(retry(Code::ResourceExhausted));
        assert!(retry(Code::Internal));
        assert!(!retry(Code::InvalidArgument));
        assert!(!retry(Code::Unauthenticated));
        assert!(!retry(Code::PermissionDenied));
    }
}
