//! Parca: `parca.profilestore.v1alpha1.ProfileStoreService/WriteRaw` over gRPC (h2c with
//! `insecure: true`, else TLS), with bearer or basic credentials and extra headers as metadata.
//!
//! Series labels: `__name__=parca_agent` (the name Parca's UI shows as on-CPU), `node`,
//! `service_name` and the configured labels. The profiles carry `duration_nanos`, so Parca
//! stores them as delta profiles (`parca_agent:samples:count:cpu:nanoseconds:delta`); its rule
//! that mapping, function and location ids run 1..N is what the encoder emits.
use tonic::transport::Channel;

use super::{
    Item, SendError,
    grpc::{Grpc, classify},
};
use crate::{
    remote::config::ExporterConfig,
    wire::parca::{self as wire, profile_store_service_client::ProfileStoreServiceClient},
};

pub const PROFILE_NAME: &str = "parca_agent";

pub struct WriteRaw {
    grpc: Grpc,
    client: ProfileStoreServiceClient<Channel>,
    labels: wire::LabelSet,
}

impl WriteRaw {
    pub fn new(config: &ExporterConfig, labels: Vec<(String, String)>) -> Result<Self, String> {
        let grpc = Grpc::new(config)?;
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
            client: ProfileStoreServiceClient::new(grpc.channel.clone()),
            grpc,
            labels: wire::LabelSet { labels: pairs },
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
        let request = self.grpc.request(self.request(item))?;
        // The generated client needs `&mut`; clones share one connection.
        let mut client = self.client.clone();
        match client.write_raw(request).await {
            Ok(_) => Ok(()),
            Err(status) => Err(classify(&status)),
        }
    }
}
