//! Parca: `parca.profilestore.v1alpha1.ProfileStoreService/WriteRaw` over gRPC (h2c with
//! `insecure: true`, else TLS), with bearer or basic credentials and extra headers as metadata.
//!
//! Series labels: `__name__=parca_agent` (the name Parca's UI shows as on-CPU), `node`,
//! `service_name` and the configured labels. The profiles carry `duration_nanos`, so Parca
//! stores them as delta profiles (`parca_agent:samples:count:cpu:nanoseconds:delta`); its rule
//! that mapping, function and location ids run 1..N is what the encoder emits.
use tonic::{
    Code,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::{Item, SendError, transport::Auth};
use crate::{
    settings::ExporterConfig,
    wire::parca::{self as wire, profile_store_service_client::ProfileStoreServiceClient},
};

pub const PROFILE_NAME: &str = "parca_agent";

pub struct WriteRaw {
    client: ProfileStoreServiceClient<Channel>,
    labels: wire::LabelSet,
    auth: Auth,
    headers: Vec<(
        MetadataKey<tonic::metadata::Ascii>,
        MetadataValue<tonic::metadata::Ascii>,
    )>,
}

impl WriteRaw {
    pub fn new(config: &ExporterConfig, labels: Vec<(String, String)>) -> Result<Self, String> {
        let mut endpoint = Endpoint::from_shared(config.url.clone())
            .map_err(|e| format!("url `{}`: {e}", config.url))?
            .user_agent(super::transport::USER_AGENT)
            .map_err(|e| e.to_string())?
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(std::time::Duration::from_secs(5)));
        if config.url.starts_with("https://") {
            if config.tls.insecure_skip_verify {
                return Err(
                    "tls.insecure_skip_verify is not supported for parca; give the server's CA in tls.ca_file"
                        .to_owned(),
                );
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
        let mut pairs = vec![wire::Label {
            name: "__name__".into(),
            value: PROFILE_NAME.into(),
        }];
        pairs.extend(
            labels
                .into_iter()
                .map(|(name, value)| wire::Label { name, value }),
        );
        Ok(Self {
            // Connects on first use and reconnects after failures; never blocks start-up.
            client: ProfileStoreServiceClient::new(endpoint.connect_lazy()),
            labels: wire::LabelSet { labels: pairs },
            auth: Auth::from_config(config),
            headers,
        })
    }

    pub fn request(&self, item: &Item) -> wire::WriteRawRequest {
        wire::WriteRawRequest {
            series: vec![wire::RawProfileSeries {
                labels: Some(self.labels.clone()),
                samples: vec![wire::RawSample {
                    raw_profile: item.gzip.clone(),
                    executable_info: vec![],
                }],
            }],
            ..Default::default()
        }
    }

    pub async fn send(&self, item: &Item) -> Result<(), SendError> {
        let mut request = tonic::Request::new(self.request(item));
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
        // The generated client needs `&mut`; clones share one connection.
        let mut client = self.client.clone();
        match client.write_raw(request).await {
            Ok(_) => Ok(()),
            Err(status) => Err(classify(&status)),
        }
    }
}

/// gRPC codes that may succeed later retry; the rest (invalid argument, unauthenticated, …)
/// would fail the same way again.
fn classify(status: &tonic::Status) -> SendError {
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
