//! Whole-system eBPF CPU profiler.
//!
//! The path of one sample (see docs/architecture.md): the eBPF program writes a record into a
//! ring buffer → [`stages::sampler`] drains it and [`sample`] decodes it → [`aggregate`]
//! resolves user addresses through the [`process`] registry and counts identical stacks per
//! interval → [`report`] names the frames ([`symbolize`]) and builds the pprof profile
//! ([`encode`]) → [`export`] and [`remote`] deliver it. [`stages`] wires the stages together;
//! [`daemon`] owns the lifecycle.
//!
//! Modules are layered: each imports only from the floors below its own (the list is in
//! docs/architecture.md, and `cargo xtask layers` checks it).

// Floor 0: no imports of the crate.
pub mod limits;
// Floor 1.
pub mod rootfs;
// Floor 2: leaves.
pub mod encode;
pub mod export;
pub mod object;
pub mod procfs;
pub mod sample;
pub mod secret;
pub mod summary;
pub mod telemetry;
pub mod units;
// Floor 3.
pub mod labels;
pub mod symbolize;
// Floor 4.
pub mod bpf;
pub mod kube;
pub mod remote;
pub mod targeting;
// Floor 5.
pub mod process;
pub mod unwind;
// Floors 6 and 7: the engines of the data path, and what the channels between stages carry.
pub mod aggregate;
pub mod messages;
pub mod report;
// Floor 8.
pub mod server;
// Floor 9: the only code that owns channels, tasks and threads.
pub mod stages;
// Floor 10.
pub mod config;
pub mod daemon;

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
