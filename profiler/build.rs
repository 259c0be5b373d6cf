//! Builds the eBPF object (embedded by `bpf::EBPF_OBJECT`) and the protobuf types (pprof and
//! the backends' ingestion APIs).
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

const SETUP_HINT: &str = "run `cargo xtask setup` to install the eBPF toolchain";

fn main() -> anyhow::Result<()> {
    const PROTOS: [&str; 4] = [
        "proto/profile.proto",
        "proto/pyroscope_push.proto",
        "proto/parca_profilestore.proto",
        "proto/otlp_profiles.proto",
    ];
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"]).context("compiling the .proto files")?;
    // Parca's gRPC service gets a client (the exporter) and a server (tests stand in for Parca).
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
        .context("generating protobuf types")?;

    frame_pointers_cfg();
    check_ebpf_toolchain()?;
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .context("profiler crate has no parent directory")?
        .join("profiler-ebpf");
    let root_dir = ebpf_dir.to_str().context("profiler-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "profiler-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .with_context(|| format!("building the eBPF object failed ({SETUP_HINT} if it is missing)"))
}

/// Sets the `frame_pointers` cfg when this build keeps frame pointers in every function
/// (`-C force-frame-pointers=yes`, from `.cargo/config.toml`): the unwinder then walks the
/// daemon's own frames by frame pointer instead of compiling its table.
fn frame_pointers_cfg() {
    println!("cargo::rustc-check-cfg=cfg(frame_pointers)");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let flags: Vec<&str> = flags.split('\x1f').collect();
    let on = |value: &str| matches!(value, "yes" | "y" | "on" | "true");
    let forced = flags.iter().enumerate().any(|(i, flag)| {
        let setting = match flag.strip_prefix("-C") {
            Some("") => flags.get(i + 1).copied().unwrap_or(""),
            Some(rest) => rest,
            None => flag.strip_prefix("--codegen=").unwrap_or(""),
        };
        setting.strip_prefix("force-frame-pointers=").is_some_and(on)
    });
    if forced {
        println!("cargo::rustc-cfg=frame_pointers");
    }
}

/// Fails early, with the fix, when the pieces `aya_build` needs are not installed.
fn check_ebpf_toolchain() -> anyhow::Result<()> {
    if std::env::var_os("AYA_BUILD_SKIP").is_some() {
        return Ok(());
    }
    if which::which("bpf-linker").is_err() {
        bail!("bpf-linker is not on PATH: {SETUP_HINT}");
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output();
    let sysroot = match sysroot {
        Ok(out) if out.status.success() => {
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        _ => bail!("the nightly Rust toolchain is not installed: {SETUP_HINT}"),
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        bail!("the nightly toolchain lacks the rust-src component: {SETUP_HINT}");
    }
    Ok(())
}
