//! Naming frames on the node.
//!
//! Every source of names implements [`SymbolSource`]: ELF files ([`elf`]: DWARF lines and
//! inlined calls from [`dwarf`] where the file has debug info, else its symbol tables) and the
//! kernel's kallsyms ([`kernel`]); JIT code is named from the process's perf map
//! ([`perfmap`]); `.gopclntab` plugs in the same way. A frame no source can name keeps
//! its module and offset (`libfoo.so+0x1a2b`) and the reason is counted in [`SymbolStats`].
pub mod dwarf;
pub mod elf;
pub mod gopclntab;
pub mod kernel;
pub mod perfmap;

use std::collections::HashMap;

/// One function at an address. Sources return them innermost first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FunctionName {
    /// Human-readable (demangled) name.
    pub name: String,
    /// Name as stored in the binary (mangled).
    pub system_name: String,
    /// Source file, when the source knows it.
    pub file: Option<String>,
    /// Source line, 0 when unknown.
    pub line: i64,
}

/// Something that names addresses in its own address space (ELF virtual addresses for a file,
/// kernel addresses for the kernel).
pub trait SymbolSource: Send + Sync {
    /// Functions at `addr`, innermost first; `None` when the source does not cover it.
    fn resolve(&self, addr: u64) -> Option<Vec<FunctionName>>;
}

/// Why a frame kept a synthetic `module+0xoffset` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unresolved {
    /// The file was read but no symbol covers the address (stripped binary, gap).
    NoSymbol,
    /// The mapped file could not be opened or parsed.
    ObjectUnreadable,
    /// The address is in no file mapping (anonymous/JIT memory, vdso).
    NoFile,
    /// The process was gone before its mappings could be read, or the address is outside them.
    NoMapping,
    /// kallsyms was unreadable or showed only zero addresses (kptr_restrict).
    KernelSymbolsUnavailable,
}

impl Unresolved {
    pub fn name(self) -> &'static str {
        match self {
            Unresolved::NoSymbol => "no_symbol",
            Unresolved::ObjectUnreadable => "object_unreadable",
            Unresolved::NoFile => "no_file",
            Unresolved::NoMapping => "no_mapping",
            Unresolved::KernelSymbolsUnavailable => "kernel_symbols_unavailable",
        }
    }
}

/// Per-report count of frames by outcome (distinct locations, not samples).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SymbolStats {
    pub named: u64,
    pub unresolved: HashMap<Unresolved, u64>,
}

impl SymbolStats {
    pub fn count(&mut self, outcome: Result<(), Unresolved>) {
        match outcome {
            Ok(()) => self.named += 1,
            Err(reason) => *self.unresolved.entry(reason).or_default() += 1,
        }
    }
}

/// Demangles Rust (legacy and v0) and Itanium C++ names; anything else is returned as is.
pub fn demangle(name: &str) -> String {
    if let Ok(rust) = rustc_demangle::try_demangle(name) {
        // `{:#}` drops the hash suffix of legacy Rust symbols.
        return format!("{rust:#}");
    }
    if name.starts_with("_Z")
        && let Ok(symbol) = cpp_demangle::Symbol::new(name.as_bytes())
        && let Ok(text) = symbol.demangle()
    {
        return text;
    }
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demangles_rust_and_cpp_and_leaves_c_alone() {
        assert_eq!(
            demangle("_ZN4core3fmt5write17h0123456789abcdefE"),
            "core::fmt::write"
        );
        assert_eq!(demangle("_RNvCs1234_7mycrate3foo"), "mycrate::foo");
        assert_eq!(demangle("_ZN3foo3barEv"), "foo::bar()");
        assert_eq!(
            demangle("_ZNSt6vectorIiSaIiEE9push_backERKi"),
            "std::vector<int, std::allocator<int> >::push_back(int const&)"
        );
        assert_eq!(demangle("main"), "main");
        assert_eq!(demangle("_Zgarbage"), "_Zgarbage");
    }
}
