//! Whole-system eBPF CPU profiler.
//!
//! Data flow (see docs/architecture.md): the eBPF program samples every CPU and streams
//! [`profiler_common::RawSample`]s through a ring buffer → [`sampler`] decodes them →
//! [`aggregate`] resolves user addresses through the [`process`] registry and counts identical
//! stacks per interval → [`report`] symbolizes ([`symbolize`]), encodes pprof ([`encode`]) and
//! hands the result to the exporters ([`export`]). [`daemon`] owns the lifecycle.
pub mod aggregate;
pub mod bpf;
pub mod config;
pub mod daemon;
pub mod encode;
pub mod export;
pub mod kube;
pub mod labels;
pub mod metrics;
pub mod process;
pub mod remote;
pub mod report;
pub mod sampler;
pub mod server;
pub mod settings;
pub mod summary;
pub mod symbolize;
pub mod targeting;
pub mod unwind;

/// Types generated from `proto/profile.proto` (package `perftools.profiles`).
pub mod pprof {
    include!(concat!(env!("OUT_DIR"), "/perftools.profiles.rs"));
}

/// Wire types of the backends' ingestion APIs (`proto/`): Pyroscope's Push, Parca's
/// `ProfileStoreService` (client and, for tests standing in for Parca, server) and OTLP profiles.
pub mod wire {
    pub mod pyroscope {
        include!(concat!(env!("OUT_DIR"), "/push.v1.rs"));
    }
    pub mod parca {
        include!(concat!(env!("OUT_DIR"), "/parca.profilestore.v1alpha1.rs"));
    }
    pub mod otlp {
        include!(concat!(
            env!("OUT_DIR"),
            "/opentelemetry.proto.profiles.v1development.rs"
        ));
    }
}
