//! Naming frames on the node.
//!
//! Every source of names implements [`SymbolSource`]: ELF files ([`elf`]: DWARF lines and
//! inlined calls from [`dwarf`] where the file has debug info, else its symbol tables) and the
//! kernel's own symbol lookup, or kallsyms as a fallback ([`kernel`]); JIT code is named from the process's perf map
//! ([`perfmap`]); `.gopclntab` plugs in the same way. A frame no source can name keeps
//! its module and offset (`libfoo.so+0x1a2b`) and the reason is counted in [`SymbolStats`].
pub mod dwarf;
pub mod elf;
pub mod gopclntab;
pub mod kernel;
pub mod perfmap;

use std::{collections::HashMap, sync::Arc};

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
    /// File frames named from the [`NameCache`], and those that had to be looked up.
    pub cache_hits: u64,
    pub cache_misses: u64,
}

/// Names already found, by (file identity, address), so a frame seen in earlier intervals is
/// named without touching its file's tables (DWARF in particular) again. `None` records that
/// the file has no symbol there. Bounded by two generations of at most `capacity` entries:
/// a hit in the older one moves the entry to the current one, and when the current one is
/// full the older is dropped, an approximation of least-recently-used at two hash maps' cost.
#[derive(Debug)]
pub struct NameCache<K> {
    capacity: usize,
    current: HashMap<K, Option<Arc<[FunctionName]>>>,
    previous: HashMap<K, Option<Arc<[FunctionName]>>>,
    /// Bytes of the names in `current` (strings and entries).
    bytes: usize,
}

/// Most bytes of names one generation of a [`NameCache`] holds; with names capped at
/// [`MAX_NAME_BYTES`](crate::limits::MAX_NAME_BYTES), two generations stay under 32 MiB.
pub const NAME_CACHE_GENERATION_BYTES: usize = 8 * 1024 * 1024;

impl FunctionName {
    /// Bytes this name holds.
    pub fn bytes(&self) -> usize {
        size_of::<Self>()
            + self.name.len()
            + self.system_name.len()
            + self.file.as_ref().map_or(0, String::len)
    }

    /// This name with each string cut to [`MAX_NAME_BYTES`](crate::limits::MAX_NAME_BYTES)
    /// (counted as a limit hit under `subject`).
    fn capped(mut self, subject: &str) -> Self {
        use crate::limits::{MAX_NAME_BYTES, cap_name};
        for text in [&mut self.name, &mut self.system_name] {
            if text.len() > MAX_NAME_BYTES {
                *text = cap_name(text, subject).to_owned();
            }
        }
        if let Some(file) = self.file.as_mut().filter(|f| f.len() > MAX_NAME_BYTES) {
            *file = cap_name(file, subject).to_owned();
        }
        self
    }
}

impl<K: std::hash::Hash + Eq> NameCache<K> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            current: HashMap::new(),
            previous: HashMap::new(),
            bytes: 0,
        }
    }

    /// The cached names of `key`, or `resolve`'s answer, which is then cached. The flag says
    /// whether it was a hit.
    pub fn get_or_resolve(
        &mut self,
        key: K,
        resolve: impl FnOnce() -> Option<Vec<FunctionName>>,
    ) -> (Option<Arc<[FunctionName]>>, bool) {
        if let Some(names) = self.current.get(&key) {
            return (names.clone(), true);
        }
        if let Some(names) = self.previous.remove(&key) {
            self.insert(key, names.clone());
            return (names, true);
        }
        // Every file's names pass here: each is cut to the length bound before it is kept.
        let names: Option<Arc<[FunctionName]>> =
            resolve().map(|names| names.into_iter().map(|n| n.capped("a symbol name")).collect());
        self.insert(key, names.clone());
        (names, false)
    }

    fn insert(&mut self, key: K, names: Option<Arc<[FunctionName]>>) {
        let bytes = size_of::<(K, Option<Arc<[FunctionName]>>)>()
            + names
                .as_ref()
                .map_or(0, |n| n.iter().map(FunctionName::bytes).sum());
        if self.current.len() >= self.capacity || self.bytes + bytes > NAME_CACHE_GENERATION_BYTES {
            self.previous = std::mem::take(&mut self.current);
            self.bytes = 0;
        }
        self.bytes += bytes;
        self.current.insert(key, names);
    }

    /// Entries held (both generations).
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
    // A name past the bound is not demangled (the demanglers' cost grows with it).
    if name.len() > crate::limits::MAX_NAME_BYTES {
        return name.to_owned();
    }
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
    fn name_cache_answers_repeats_and_stays_bounded() {
        let name = |n: &str| FunctionName {
            name: n.to_owned(),
            system_name: n.to_owned(),
            file: None,
            line: 0,
        };
        let mut cache = NameCache::new(2);
        let mut lookups = 0;
        let mut get = |cache: &mut NameCache<u64>, addr: u64| {
            cache.get_or_resolve(addr, || {
                lookups += 1;
                (addr != 99).then(|| vec![name(&format!("f{addr}"))])
            })
        };
        assert!(!get(&mut cache, 1).1);
        let (names, hit) = get(&mut cache, 1);
        assert!(hit);
        assert_eq!(names.expect("named")[0].name, "f1");
        // "No symbol here" is remembered too.
        assert_eq!(get(&mut cache, 99), (None, false));
        assert_eq!(get(&mut cache, 99), (None, true));
        // 1 and 99 fill the current generation; 3 starts a new one, 1 moves up on its hit.
        get(&mut cache, 3);
        assert!(get(&mut cache, 1).1);
        get(&mut cache, 4);
        get(&mut cache, 5);
        assert!(cache.len() <= 4, "{} entries", cache.len());
        assert!(!get(&mut cache, 99).1, "the oldest entry was not dropped");
        assert_eq!(lookups, 6);
    }

    #[test]
    fn name_cache_cuts_long_names_and_holds_a_byte_bound() {
        let mut cache: NameCache<u64> = NameCache::new(1 << 20);
        let huge = "x".repeat(1 << 20);
        for key in 0..200u64 {
            let (names, _) = cache.get_or_resolve(key, || {
                Some(vec![FunctionName {
                    name: huge.clone(),
                    system_name: huge.clone(),
                    file: Some(huge.clone()),
                    line: 1,
                }])
            });
            let names = names.expect("named");
            assert!(names[0].name.len() <= crate::limits::MAX_NAME_BYTES);
            assert!(
                names[0]
                    .file
                    .as_ref()
                    .is_some_and(|f| f.len() <= crate::limits::MAX_NAME_BYTES)
            );
        }
        assert!(cache.bytes <= NAME_CACHE_GENERATION_BYTES);
        let per_entry = 3 * crate::limits::MAX_NAME_BYTES;
        assert!(
            cache.len() * per_entry <= 2 * NAME_CACHE_GENERATION_BYTES + 2 * per_entry,
            "{} entries",
            cache.len()
        );
    }

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
