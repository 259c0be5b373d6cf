//! OTLP profiles (`opentelemetry.proto.profiles.v1development`, proto v1.10) over HTTP
//! (`POST <url>/v1development/profiles`, `application/x-protobuf`) or gRPC
//! (`ProfilesService/Export`, `protocol: grpc`, as Parca and Pyroscope also accept).
//!
//! The pprof profile is converted to the OTLP shape: one shared dictionary (every table starts
//! with its zero element), stacks deduplicated in `stack_table`, one profile of sample type
//! `samples/count` with period type `cpu/nanoseconds` (what Pyroscope maps to `process_cpu`).
//! Series labels become resource attributes (`service_name` as `service.name`); a sample's
//! `pid` becomes `process.pid`, `comm` `process.executable.name`, and its labels
//! `service_name`, `namespace`, `pod` and `container` become `service.name`,
//! `k8s.namespace.name`, `k8s.pod.name` and `container.name`; a mapping's build id is the
//! attribute `process.executable.build_id.gnu`.
use std::collections::HashMap;

use prost::Message as _;

use super::{
    Identity, Item, SendError,
    grpc::{Grpc, classify},
    transport::{Http, exchange},
};
use crate::{
    encode, pprof,
    remote::config::{ExporterConfig, Protocol},
    wire::otlp::{self as wire, any_value::Value},
};

pub const HTTP_PATH: &str = "v1development/profiles";
pub const SCOPE_NAME: &str = "profiler";

pub const GRPC_PATH: &str = "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export";

enum Transport {
    Http { http: Http, url: reqwest::Url },
    Grpc(Grpc),
}

pub struct Export {
    transport: Transport,
    resource: Vec<(String, String)>,
}

impl Export {
    pub fn new(
        config: &ExporterConfig,
        labels: Vec<(String, String)>,
        identity: &Identity,
    ) -> Result<Self, String> {
        let parsed = reqwest::Url::parse(&config.url).map_err(|e| format!("url `{}`: {e}", config.url))?;
        let bare = parsed.path().is_empty() || parsed.path() == "/";
        let transport = match config.protocol {
            Protocol::Grpc if !bare => {
                return Err(format!(
                    "url `{}`: a gRPC endpoint is host and port only (the service path is fixed)",
                    config.url
                ));
            }
            Protocol::Grpc => Transport::Grpc(Grpc::new(config)?),
            // A URL with a path is the full endpoint (OTLP's per-signal endpoint rule); a bare
            // one is the base the signal's path goes under.
            Protocol::Http => Transport::Http {
                http: Http::new(config)?,
                url: if bare {
                    super::pyroscope::join(&config.url, HTTP_PATH)?
                } else {
                    parsed
                },
            },
        };
        let mut resource: Vec<(String, String)> = labels
            .into_iter()
            .map(|(k, v)| match k.as_str() {
                "service_name" => ("service.name".to_owned(), v),
                "node" => ("host.name".to_owned(), v),
                _ => (k, v),
            })
            .collect();
        if !resource.iter().any(|(k, _)| k == "host.name") {
            resource.push(("host.name".to_owned(), identity.node.clone()));
        }
        Ok(Self { transport, resource })
    }

    pub async fn send(&self, item: &Item) -> Result<(), SendError> {
        let profile = encode::decode(&item.gzip).map_err(|e| SendError::Reject {
            reason: format!("spooled profile does not decode: {e}"),
        })?;
        let request = convert(&profile, &self.resource);
        let answer = match &self.transport {
            Transport::Http { http, url } => {
                let request = http
                    .post(url.clone())?
                    .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(request.encode_to_vec());
                let (_, answer) = exchange(request).await?;
                wire::ExportProfilesServiceResponse::decode(answer.as_slice()).map_err(|e| {
                    SendError::Retry {
                        reason: format!("answer is not an ExportProfilesServiceResponse: {e}"),
                        after: None,
                    }
                })?
            }
            Transport::Grpc(grpc) => {
                let request = grpc.request(request)?;
                let mut client = tonic::client::Grpc::new(grpc.channel.clone());
                client.ready().await.map_err(|e| SendError::Retry {
                    reason: format!("connecting: {e}"),
                    after: None,
                })?;
                let codec = tonic_prost::ProstCodec::<
                    wire::ExportProfilesServiceRequest,
                    wire::ExportProfilesServiceResponse,
                >::default();
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(GRPC_PATH);
                client
                    .unary(request, path, codec)
                    .await
                    .map_err(|status| classify(&status))?
                    .into_inner()
            }
        };
        match answer.partial_success {
            Some(partial) if partial.rejected_profiles > 0 => Err(SendError::Reject {
                reason: format!(
                    "collector rejected {} profile(s): {}",
                    partial.rejected_profiles, partial.error_message
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// Interning tables of the shared dictionary.
#[derive(Default)]
struct Dictionary {
    dict: wire::ProfilesDictionary,
    strings: HashMap<String, i32>,
    stacks: HashMap<Vec<i32>, i32>,
    attributes: HashMap<(i32, AttrValue), i32>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum AttrValue {
    Str(String),
    Int(i64),
}

impl Dictionary {
    fn new() -> Self {
        let mut d = Self::default();
        // Index 0 of every table is its zero value.
        d.dict.string_table.push(String::new());
        d.strings.insert(String::new(), 0);
        d.dict.mapping_table.push(wire::Mapping::default());
        d.dict.location_table.push(wire::Location::default());
        d.dict.function_table.push(wire::Function::default());
        d.dict.link_table.push(wire::Link {
            trace_id: vec![0; 16],
            span_id: vec![0; 8],
        });
        d.dict.attribute_table.push(wire::KeyValueAndUnit::default());
        d.dict.stack_table.push(wire::Stack::default());
        d.stacks.insert(Vec::new(), 0);
        d
    }

    fn string(&mut self, s: &str) -> i32 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.dict.string_table.len() as i32;
        self.dict.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn attribute(&mut self, key: &str, value: AttrValue) -> i32 {
        let key = self.string(key);
        if let Some(&i) = self.attributes.get(&(key, value.clone())) {
            return i;
        }
        let i = self.dict.attribute_table.len() as i32;
        let any = match &value {
            AttrValue::Str(s) => Value::StringValue(s.clone()),
            AttrValue::Int(n) => Value::IntValue(*n),
        };
        self.dict.attribute_table.push(wire::KeyValueAndUnit {
            key_strindex: key,
            value: Some(wire::AnyValue { value: Some(any) }),
            unit_strindex: 0,
        });
        self.attributes.insert((key, value), i);
        i
    }

    fn stack(&mut self, locations: Vec<i32>) -> i32 {
        if let Some(&i) = self.stacks.get(&locations) {
            return i;
        }
        let i = self.dict.stack_table.len() as i32;
        self.dict.stack_table.push(wire::Stack {
            location_indices: locations.clone(),
        });
        self.stacks.insert(locations, i);
        i
    }
}

fn key_value(key: &str, value: &str) -> wire::KeyValue {
    wire::KeyValue {
        key: key.to_owned(),
        value: Some(wire::AnyValue {
            value: Some(Value::StringValue(value.to_owned())),
        }),
        key_strindex: 0,
    }
}

/// Converts one pprof CPU profile into an OTLP export request.
pub fn convert(
    profile: &pprof::Profile,
    resource: &[(String, String)],
) -> wire::ExportProfilesServiceRequest {
    let text = |i: i64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| profile.string_table.get(i))
            .map_or("", String::as_str)
    };
    let mut d = Dictionary::new();

    let mut mapping_index = HashMap::new();
    for m in &profile.mapping {
        let filename = d.string(text(m.filename));
        let mut attribute_indices = Vec::new();
        let build_id = text(m.build_id);
        if !build_id.is_empty() {
            attribute_indices.push(d.attribute(
                "process.executable.build_id.gnu",
                AttrValue::Str(build_id.to_owned()),
            ));
        }
        mapping_index.insert(m.id, d.dict.mapping_table.len() as i32);
        d.dict.mapping_table.push(wire::Mapping {
            memory_start: m.memory_start,
            memory_limit: m.memory_limit,
            file_offset: m.file_offset,
            filename_strindex: filename,
            attribute_indices,
        });
    }
    let mut function_index = HashMap::new();
    for f in &profile.function {
        let function = wire::Function {
            name_strindex: d.string(text(f.name)),
            system_name_strindex: d.string(text(f.system_name)),
            filename_strindex: d.string(text(f.filename)),
            start_line: f.start_line,
        };
        function_index.insert(f.id, d.dict.function_table.len() as i32);
        d.dict.function_table.push(function);
    }
    let kernel_mappings: Vec<u64> = profile
        .mapping
        .iter()
        .filter(|m| text(m.filename) == "[kernel.kallsyms]")
        .map(|m| m.id)
        .collect();
    let mut location_index = HashMap::new();
    for l in &profile.location {
        let frame_type = if kernel_mappings.contains(&l.mapping_id) {
            "kernel"
        } else {
            "native"
        };
        let attribute = d.attribute("profile.frame.type", AttrValue::Str(frame_type.to_owned()));
        let location = wire::Location {
            mapping_index: mapping_index.get(&l.mapping_id).copied().unwrap_or(0),
            address: l.address,
            lines: l
                .line
                .iter()
                .map(|line| wire::Line {
                    function_index: function_index.get(&line.function_id).copied().unwrap_or(0),
                    line: line.line,
                    column: line.column,
                })
                .collect(),
            attribute_indices: vec![attribute],
        };
        location_index.insert(l.id, d.dict.location_table.len() as i32);
        d.dict.location_table.push(location);
    }
    // The `samples/count` value of each pprof sample.
    let count_at = profile
        .sample_type
        .iter()
        .position(|t| text(t.r#type) == "samples")
        .unwrap_or(0);
    let samples = profile
        .sample
        .iter()
        .map(|s| {
            let locations = s
                .location_id
                .iter()
                .map(|id| location_index.get(id).copied().unwrap_or(0))
                .collect();
            let attribute_indices = s
                .label
                .iter()
                .map(|l| {
                    let (key, value) = match (text(l.key), l.str) {
                        ("pid", _) => ("process.pid", AttrValue::Int(l.num)),
                        ("comm", s) => ("process.executable.name", AttrValue::Str(text(s).to_owned())),
                        ("service_name", s) => ("service.name", AttrValue::Str(text(s).to_owned())),
                        ("container", s) => ("container.name", AttrValue::Str(text(s).to_owned())),
                        ("namespace", s) => ("k8s.namespace.name", AttrValue::Str(text(s).to_owned())),
                        ("pod", s) => ("k8s.pod.name", AttrValue::Str(text(s).to_owned())),
                        (key, 0) => (key, AttrValue::Int(l.num)),
                        (key, s) => (key, AttrValue::Str(text(s).to_owned())),
                    };
                    d.attribute(key, value)
                })
                .collect();
            wire::Sample {
                stack_index: d.stack(locations),
                attribute_indices,
                link_index: 0,
                values: vec![s.value.get(count_at).copied().unwrap_or(0)],
                timestamps_unix_nano: vec![],
            }
        })
        .collect();
    let sample_type = wire::ValueType {
        type_strindex: d.string("samples"),
        unit_strindex: d.string("count"),
    };
    let period_type = wire::ValueType {
        type_strindex: d.string("cpu"),
        unit_strindex: d.string("nanoseconds"),
    };
    let otlp_profile = wire::Profile {
        sample_type: Some(sample_type),
        samples,
        time_unix_nano: u64::try_from(profile.time_nanos).unwrap_or(0),
        duration_nano: u64::try_from(profile.duration_nanos).unwrap_or(0),
        period_type: Some(period_type),
        period: profile.period,
        ..Default::default()
    };
    wire::ExportProfilesServiceRequest {
        resource_profiles: vec![wire::ResourceProfiles {
            resource: Some(wire::Resource {
                attributes: resource.iter().map(|(k, v)| key_value(k, v)).collect(),
                dropped_attributes_count: 0,
            }),
            scope_profiles: vec![wire::ScopeProfiles {
                scope: Some(wire::InstrumentationScope {
                    name: SCOPE_NAME.to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                profiles: vec![otlp_profile],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
        dictionary: Some(d.dict),
    }
}
