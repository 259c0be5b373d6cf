//! Hostile inputs for `tests/tests/hostile.rs`, built on first use (nothing binary is
//! committed): the sources are in `tests/fixtures/hostile`, and the deep DWARF is generated
//! here as assembly.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use crate::{build_dir, fixtures_dir, run_ok};

/// Nesting of the deep DWARF fixture: twice what once aborted the daemon (~10,000).
pub const DEEP_INLINE_LEVELS: usize = 20_000;
/// Length of the deep fixture's function name (1 MiB).
pub const LONG_NAME_BYTES: usize = 1 << 20;
/// What the long name starts with.
pub const LONG_NAME_PREFIX: &str = "deep_long_name_";

fn hostile_source(name: &str) -> PathBuf {
    fixtures_dir().join("hostile").join(name)
}

/// `cc FLAGS -o hostile-NAME NAME`, from the hostile fixtures into the build directory.
fn compile(source: &str, flags: &[&str]) -> PathBuf {
    let out = build_dir().join(format!("hostile-{}", source.trim_end_matches(".c")));
    run_ok(
        Command::new("cc")
            .args(flags)
            .arg("-o")
            .arg(&out)
            .arg(hostile_source(source)),
    );
    out
}

/// The static "JIT" of `jit.c` (runs in a bare chroot).
pub fn jit_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| compile("jit.c", &["-O1", "-static"]))
}

/// `mappings.c`: a process with tens of thousands of executable mappings.
pub fn mappings_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| compile("mappings.c", &["-O1", "-fno-omit-frame-pointer"]))
}

/// `deep.c` with the generated `deep.s`: [`DEEP_INLINE_LEVELS`] nested inlined subroutines
/// over a spinning function whose symbol is [`LONG_NAME_BYTES`] long.
pub fn deep_fixture() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let asm = build_dir().join("hostile-deep.s");
        std::fs::write(&asm, deep_assembly(DEEP_INLINE_LEVELS, LONG_NAME_BYTES)).expect("write deep.s");
        let out = build_dir().join("hostile-deep");
        run_ok(
            Command::new("cc")
                .args(["-O0", "-g0", "-no-pie", "-o"])
                .arg(&out)
                .arg(hostile_source("deep.c"))
                .arg(&asm),
        );
        out
    })
}

/// Assembly of `deep_entry` (which jumps to the long-named spin loop) and DWARF 4 for it: a
/// compile unit, a subprogram, and `levels` inlined subroutines each inside the one before,
/// all covering the loop.
pub fn deep_assembly(levels: usize, name_bytes: usize) -> String {
    let mut name = String::from(LONG_NAME_PREFIX);
    while name.len() < name_bytes {
        name.push(char::from(b'a' + (name.len() % 26) as u8));
    }
    let mut s = String::new();
    let _ = write!(
        s,
        r#"    .text
    .globl deep_entry
    .type deep_entry, @function
deep_entry:
    jmp {name}
    .size deep_entry, .-deep_entry
    .globl {name}
    .type {name}, @function
    .p2align 4
{name}:
.Lspin:
    pause
    jmp .Lspin
.Lspin_end:
    .size {name}, .-{name}

    .section .debug_abbrev,"",@progbits
    .byte 1, 0x11, 1, 0x11, 0x01, 0x12, 0x07, 0, 0
    .byte 2, 0x2e, 1, 0x03, 0x08, 0x11, 0x01, 0x12, 0x07, 0, 0
    .byte 3, 0x1d, 1, 0x31, 0x13, 0x11, 0x01, 0x12, 0x07, 0, 0
    .byte 0

    .section .debug_info,"",@progbits
.Linfo_start:
    .long .Linfo_end - .Linfo_body
.Linfo_body:
    .short 4
    .long 0
    .byte 8
    .byte 1
    .quad .Lspin
    .quad .Lspin_end - .Lspin
.Lsubprogram:
    .byte 2
    .asciz "deep"
    .quad .Lspin
    .quad .Lspin_end - .Lspin
    .rept {levels}
    .byte 3
    .long .Lsubprogram - .Linfo_start
    .quad .Lspin
    .quad .Lspin_end - .Lspin
    .endr
    .rept {closing}
    .byte 0
    .endr
.Linfo_end:
    .section .note.GNU-stack,"",@progbits
"#,
        closing = levels + 2,
    );
    s
}
