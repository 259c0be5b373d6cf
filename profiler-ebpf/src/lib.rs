//! Empty library target: `profiler` build-depends on it so cargo rebuilds the eBPF object when
//! this crate changes. The programs live in the `profiler-ebpf` binary (src/main.rs).
#![no_std]
