//! ELF files: GNU build id, loadable segments and `.symtab`/`.dynsym` function symbols.

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, ReadRef, SymbolKind};

use super::{
    FunctionName, SymbolSource, demangle,
    dwarf::{DEFAULT_MAX_COST, Dwarf},
    gopclntab::GoPclntab,
};
use crate::{
    object::{ElfError, LargeFile, LoadSegment, READ_WHOLE_MAX, hex, open_regular},
    rootfs::FilePath,
};

#[derive(Debug, Clone, Copy)]
struct SymbolEntry {
    addr: u64,
    size: u64,
    name_start: u32,
    name_len: u32,
}

/// Function symbols sorted by address, names in one arena to keep many small strings cheap.
#[derive(Debug, Default)]
pub struct SymbolTable {
    entries: Vec<SymbolEntry>,
    names: String,
}

/// Most bytes one file's symbol table may hold (entries and names): more than the largest
/// binaries need (a browser's ~1.5M symbols take ~60 MiB), less than the DaemonSet's symbol
/// cache. Past it the rest of the file's symbols are not kept ([`Limit::SymbolCount`]), so a
/// symbol table cannot be made to cost more than this whatever the file claims.
///
/// [`Limit::SymbolCount`]: crate::limits::Limit::SymbolCount
pub const MAX_SYMBOL_TABLE_BYTES: usize = 64 << 20;

impl SymbolTable {
    /// Builds a table from `(address, size, name)`; for several symbols at one address the
    /// largest (then first) wins. Names are cut at [`crate::limits::MAX_NAME_BYTES`], and the
    /// table stops at [`MAX_SYMBOL_TABLE_BYTES`].
    pub fn from_symbols<'a>(symbols: impl IntoIterator<Item = (u64, u64, &'a str)>) -> Self {
        Self::bounded(symbols, MAX_SYMBOL_TABLE_BYTES, "a symbol table")
    }

    /// [`Self::from_symbols`] with a byte bound; a hit is counted for `subject`.
    pub fn bounded<'a>(
        symbols: impl IntoIterator<Item = (u64, u64, &'a str)>,
        max_bytes: usize,
        subject: &str,
    ) -> Self {
        let mut table = SymbolTable::default();
        for (addr, size, name) in symbols {
            let name = crate::limits::cap_name(name, subject);
            if (table.entries.len() + 1) * size_of::<SymbolEntry>() + table.names.len() + name.len()
                > max_bytes
            {
                crate::limits::hit(crate::limits::Limit::SymbolCount, subject);
                break;
            }
            let (Ok(name_start), Ok(name_len)) =
                (u32::try_from(table.names.len()), u32::try_from(name.len()))
            else {
                break;
            };
            table.names.push_str(name);
            table.entries.push(SymbolEntry {
                addr,
                size,
                name_start,
                name_len,
            });
        }
        table
            .entries
            .sort_by(|a, b| a.addr.cmp(&b.addr).then(b.size.cmp(&a.size)));
        table.entries.dedup_by_key(|e| e.addr);
        table
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes held by the table.
    pub fn bytes(&self) -> u64 {
        (self.entries.len() * size_of::<SymbolEntry>() + self.names.len()) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The symbol containing `addr`: the last one starting at or before it, if its size (when
    /// known) reaches `addr`.
    pub fn lookup(&self, addr: u64) -> Option<&str> {
        let idx = self.entries.partition_point(|e| e.addr <= addr).checked_sub(1)?;
        let entry = self.entries[idx];
        if entry.size != 0 && addr - entry.addr >= entry.size {
            return None;
        }
        let start = entry.name_start as usize;
        self.names.get(start..start + entry.name_len as usize)
    }
}

/// What the daemon keeps of one ELF file.
#[derive(Debug)]
pub struct ElfImage {
    /// Lower-case hex of `.note.gnu.build-id`.
    pub build_id: Option<String>,
    pub segments: Vec<LoadSegment>,
    pub symbols: SymbolTable,
    /// DWARF, when the file carries it (file:line and inlined calls).
    pub dwarf: Option<Dwarf>,
    /// File name from `.gnu_debuglink`: where the separate debug file is, when there is one.
    pub debuglink: Option<String>,
    /// Go's function table, for Go binaries (also stripped ones).
    pub gopclntab: Option<GoPclntab>,
    /// The file has DWARF, left unloaded because it would cost more memory than allowed.
    pub dwarf_over_budget: bool,
}

impl ElfImage {
    /// Opens and parses the file at `path`. With `inode`, the file must be that inode: a path
    /// seen in /proc/<pid>/maps may since have been replaced. Opening never blocks (a path
    /// swapped for a FIFO would otherwise hang the caller), only regular files are read, and
    /// reads go through `read(2)` rather than mmap, so a file truncated underneath cannot
    /// raise SIGBUS in the daemon. The file's data is dropped once the tables are built.
    pub fn open(path: &FilePath, inode: Option<u64>) -> Result<Self, ElfError> {
        Self::open_with(path, inode, DEFAULT_MAX_COST)
    }

    /// [`ElfImage::open`] with the most memory the file's parsed DWARF may take; a file whose
    /// DWARF would cost more is named from its symbol tables ([`ElfImage::dwarf_over_budget`]).
    pub fn open_with(path: &FilePath, inode: Option<u64>, max_dwarf_cost: u64) -> Result<Self, ElfError> {
        let display = || path.to_string();
        let (file, meta) = open_regular(path, inode)?;
        let parse_error = |source| ElfError::Parse {
            path: display(),
            source,
        };
        if meta.len() <= READ_WHOLE_MAX {
            let mut data = Vec::with_capacity(meta.len() as usize);
            std::io::Read::read_to_end(&mut &file, &mut data).map_err(|source| ElfError::Read {
                path: display(),
                source,
            })?;
            return Self::parse_named(data.as_slice(), max_dwarf_cost, &display()).map_err(parse_error);
        }
        let large = LargeFile::open(file, meta.len());
        Self::parse_named(&large, max_dwarf_cost, &display()).map_err(parse_error)
    }

    pub fn parse<'data, R: ReadRef<'data>>(data: R) -> Result<Self, object::Error> {
        Self::parse_with(data, DEFAULT_MAX_COST)
    }

    pub fn parse_with<'data, R: ReadRef<'data>>(data: R, max_dwarf_cost: u64) -> Result<Self, object::Error> {
        Self::parse_named(data, max_dwarf_cost, "an ELF image in memory")
    }

    /// [`ElfImage::parse_with`], with the file's path for counted limits and logs.
    fn parse_named<'data, R: ReadRef<'data>>(
        data: R,
        max_dwarf_cost: u64,
        subject: &str,
    ) -> Result<Self, object::Error> {
        let elf = object::File::parse(data)?;
        let build_id = elf.build_id()?.map(hex);
        let debuglink = elf
            .gnu_debuglink()
            .ok()
            .flatten()
            .and_then(|(name, _crc)| std::str::from_utf8(name).ok())
            .filter(|name| !name.is_empty() && !name.contains('/'))
            .map(str::to_owned);
        let segments = elf
            .segments()
            .map(|s| {
                let (file_offset, file_size) = s.file_range();
                LoadSegment {
                    vaddr: s.address(),
                    mem_size: s.size(),
                    file_offset,
                    file_size,
                }
            })
            // Header values are untrusted: a segment whose end overflows is dropped, so all
            // later arithmetic on the kept ones is in range.
            .filter(|s| {
                s.vaddr.checked_add(s.mem_size.max(s.file_size)).is_some()
                    && s.file_offset.checked_add(s.file_size).is_some()
            })
            .collect();
        let functions = elf
            .symbols()
            .chain(elf.dynamic_symbols())
            .filter(|s| s.kind() == SymbolKind::Text && s.is_definition() && s.address() != 0)
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?)))
            .filter(|(_, _, name)| !name.is_empty());
        let symbols = SymbolTable::bounded(functions, MAX_SYMBOL_TABLE_BYTES, subject);
        let gopclntab = GoPclntab::from_elf(&elf, true);
        // Go code is named from .gopclntab (cheaper, and present in stripped binaries); DWARF
        // is loaded only for the rest: files without the table, and the C code of cgo binaries.
        let (dwarf, dwarf_over_budget) = match &gopclntab {
            Some(go) if go.has_inline_trees() && !has_foreign_code(&elf, go) => (None, false),
            _ => {
                let dwarf = Dwarf::load(&elf, max_dwarf_cost, subject);
                let over = dwarf.is_none() && Dwarf::cost(&elf) > max_dwarf_cost;
                (dwarf, over)
            }
        };
        Ok(ElfImage {
            build_id,
            segments,
            symbols,
            dwarf,
            dwarf_over_budget,
            debuglink,
            gopclntab,
        })
    }

    /// What the parsed file costs in memory (symbols, DWARF sections, Go table), for the
    /// symbol cache's byte budget.
    pub fn bytes(&self) -> u64 {
        self.symbols.bytes()
            + self.dwarf.as_ref().map_or(0, |d| d.bytes)
            + self.gopclntab.as_ref().map_or(0, GoPclntab::bytes)
            + (self.segments.len() * size_of::<LoadSegment>()) as u64
    }

    /// Whether a separate debug file would add anything (no DWARF, or no symbols).
    pub fn wants_debug_file(&self) -> bool {
        (self.dwarf.is_none() || self.symbols.is_empty()) && self.gopclntab.is_none()
    }

    /// Takes DWARF and symbols this file lacks from its separate debug file. A debug file with
    /// a different build id belongs to another build and is refused.
    pub fn attach_debug_file(&mut self, debug: ElfImage) -> bool {
        if self.build_id.is_some() && debug.build_id != self.build_id {
            return false;
        }
        if self.dwarf.is_none() {
            self.dwarf = debug.dwarf;
            self.dwarf_over_budget |= debug.dwarf_over_budget;
        }
        // A stripped binary keeps only its dynamic symbols; the debug file's full symbol table
        // also names the local functions (e.g. libc's `__libc_start_call_main`). A non-empty
        // table is replaced only by a file with the same build id (a debuglink match alone
        // does not prove the same build).
        let same_build = self.build_id.is_some() && debug.build_id == self.build_id;
        if self.symbols.is_empty() || (same_build && debug.symbols.len() > self.symbols.len()) {
            self.symbols = debug.symbols;
        }
        true
    }

    /// Where the separate debug file may be, relative to the root of the process's mount
    /// namespace, in the order gdb and the peers look: by build id, then by debuglink next to
    /// the binary, in its `.debug/` and under /usr/lib/debug.
    pub fn debug_file_candidates(&self, binary_path: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(id) = self.build_id.as_deref().filter(|id| id.len() > 2) {
            out.push(format!(
                "/usr/lib/debug/.build-id/{}/{}.debug",
                &id[..2],
                &id[2..]
            ));
        }
        if let Some(link) = &self.debuglink {
            let dir = binary_path.rsplit_once('/').map_or("", |(dir, _)| dir);
            out.push(format!("{dir}/{link}"));
            out.push(format!("{dir}/.debug/{link}"));
            out.push(format!("/usr/lib/debug{dir}/{link}"));
        }
        out
    }

    /// ELF virtual address of a file offset, through the segment that holds the offset.
    pub fn vaddr_of_offset(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| offset >= s.file_offset && offset - s.file_offset < s.file_size.max(s.mem_size))
            .and_then(|s| s.vaddr.checked_add(offset - s.file_offset))
    }

    /// The first segment holding code at `vaddr`, for the pprof mapping range.
    pub fn segment_of_vaddr(&self, vaddr: u64) -> Option<&LoadSegment> {
        self.segments
            .iter()
            .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.mem_size)
    }
}

impl SymbolSource for ElfImage {
    /// Go's `.gopclntab` (function, file, line, inlined calls) for Go code, then DWARF frames
    /// (innermost first, with file and line) where debug info covers `addr`, then the symbol
    /// table. A DWARF frame without a name (the outermost one can lack it in stripped-down
    /// debug info) takes the symbol table's.
    fn resolve(&self, addr: u64) -> Option<Vec<FunctionName>> {
        // The Go table goes first when it can name inlined calls (or there is no DWARF);
        // without its inline trees, DWARF's inlined frames are better, and the table only
        // fills in where DWARF has nothing.
        let go_first = self
            .gopclntab
            .as_ref()
            .filter(|table| table.has_inline_trees() || self.dwarf.is_none());
        if let Some(go) = go_first.and_then(|table| table.frames(addr)) {
            return Some(go);
        }
        let symbol = self.symbols.lookup(addr);
        if let Some(dwarf) = &self.dwarf {
            let mut frames = dwarf.frames(addr);
            if !frames.is_empty() {
                if let (Some(outer), Some(raw)) = (frames.last_mut(), symbol)
                    && outer.system_name.is_empty()
                {
                    outer.system_name = raw.to_owned();
                    outer.name = demangle(raw);
                }
                if frames.iter().all(|f| !f.name.is_empty()) {
                    return Some(frames);
                }
            }
        }
        if go_first.is_none()
            && let Some(go) = self.gopclntab.as_ref().and_then(|table| table.frames(addr))
        {
            return Some(go);
        }
        let raw = symbol?;
        Some(vec![FunctionName {
            name: demangle(raw),
            system_name: raw.to_owned(),
            file: None,
            line: 0,
        }])
    }
}

/// Whether `.text` holds code that `.gopclntab` does not describe (the C code of a cgo binary,
/// linked externally): more than a page of it before the first or after the last Go function.
fn has_foreign_code<'data, R: ReadRef<'data>>(elf: &object::File<'data, R>, go: &GoPclntab) -> bool {
    const SLACK: u64 = 4096;
    let Some(text) = elf.section_by_name(".text") else {
        return true;
    };
    let (start, end) = (text.address(), text.address().saturating_add(text.size()));
    match go.code_range() {
        Some((first, last)) => first.saturating_sub(start) > SLACK || end.saturating_sub(last) > SLACK,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symbol_table_stops_at_its_byte_bound_and_counts_the_hit() {
        use crate::limits::{HITS, Limit, MAX_NAME_BYTES};
        let before = HITS.count(Limit::SymbolCount);
        let names: Vec<String> = (0..1000).map(|i| format!("function_{i:04}")).collect();
        let table = SymbolTable::bounded(
            names
                .iter()
                .enumerate()
                .map(|(i, n)| (0x1000 + 16 * i as u64, 16, n.as_str())),
            100 * (size_of::<SymbolEntry>() + 13),
            "/bin/many",
        );
        assert_eq!(table.len(), 100);
        assert!(table.bytes() <= (100 * (size_of::<SymbolEntry>() + 13)) as u64);
        assert_eq!(table.lookup(0x1000 + 16 * 99), Some("function_0099"));
        assert_eq!(table.lookup(0x1000 + 16 * 100), None);
        assert!(HITS.count(Limit::SymbolCount) > before);
        let long = "x".repeat(1 << 20);
        let table = SymbolTable::from_symbols([(0x1000, 16, long.as_str())]);
        assert_eq!(table.lookup(0x1000).map(str::len), Some(MAX_NAME_BYTES));
    }

    #[test]
    fn debug_sections_with_absurd_sizes_do_not_overflow() {
        // Found by `cargo xtask fuzz` (elf target): debug section sizes that add up past
        // u64::MAX (a panic with overflow checks, a wrapped and accepted total without).
        // A small program built with -g gets two huge debug section sizes.
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("tiny.c");
        let binary = dir.path().join("tiny");
        std::fs::write(&source, "int main(void) { return 0; }\n").expect("write source");
        let status = std::process::Command::new("gcc")
            .arg("-g")
            .arg("-o")
            .arg(&binary)
            .arg(&source)
            .status()
            .expect("gcc (installed by cargo xtask setup)");
        assert!(status.success(), "gcc failed");
        let mut data = std::fs::read(&binary).expect("read");
        let debug: Vec<usize> = {
            let file = object::File::parse(data.as_slice()).expect("ELF");
            file.sections()
                .filter(|s| s.name().is_ok_and(|n| n.starts_with(".debug_")))
                .map(|s| s.index().0)
                .take(2)
                .collect()
        };
        assert_eq!(debug.len(), 2, "a -g build has debug sections");
        let shoff = u64::from_le_bytes(data[0x28..0x30].try_into().expect("8 bytes")) as usize;
        let shentsize = u16::from_le_bytes(data[0x3a..0x3c].try_into().expect("2 bytes")) as usize;
        for index in debug {
            let size_at = shoff + index * shentsize + 0x20;
            data[size_at..size_at + 8].copy_from_slice(&(u64::MAX / 2 + 1).to_le_bytes());
        }
        let image = ElfImage::parse(data.as_slice()).expect("headers still parse");
        assert!(image.dwarf.is_none(), "oversized DWARF is refused");
    }

    /// Reads that start in a string table read whole give what the file holds, also when they
    /// run past its end; a name without its terminator inside the asked range is an error.
    #[test]
    fn parses_the_same_piecewise_as_whole() {
        use crate::object::WindowedFile;
        // A real ELF file parses the same piecewise as whole.
        let exe = std::env::current_exe().expect("test binary");
        let whole = std::fs::read(&exe).expect("read test binary");
        let whole = ElfImage::parse(whole.as_slice()).expect("parse whole");
        let file = std::fs::File::open(&exe).expect("open test binary");
        let len = file.metadata().expect("metadata").len();
        let cache = WindowedFile::cache(file, len);
        let piecewise = ElfImage::parse(&cache).expect("parse piecewise");
        assert_eq!(piecewise.build_id, whole.build_id);
        assert_eq!(piecewise.symbols.len(), whole.symbols.len());
        assert!(whole.symbols.len() > 1000);

        // And with its string tables read whole up front: the same names in the same order.
        let file = std::fs::File::open(&exe).expect("open test binary");
        let large = LargeFile::open(file, len);
        let preloaded = ElfImage::parse(&large).expect("parse with string tables read whole");
        assert_eq!(preloaded.build_id, whole.build_id);
        assert_eq!(preloaded.symbols.names, whole.symbols.names);
    }

    #[test]
    fn debug_file_candidates_follow_build_id_then_debuglink() {
        let image = ElfImage {
            build_id: Some("abcdef0123".into()),
            segments: Vec::new(),
            symbols: SymbolTable::default(),
            dwarf: None,
            debuglink: Some("app.debug".into()),
            gopclntab: None,
            dwarf_over_budget: false,
        };
        assert_eq!(
            image.debug_file_candidates("/opt/app/bin/app"),
            [
                "/usr/lib/debug/.build-id/ab/cdef0123.debug",
                "/opt/app/bin/app.debug",
                "/opt/app/bin/.debug/app.debug",
                "/usr/lib/debug/opt/app/bin/app.debug",
            ]
        );
        let mut stripped = ElfImage {
            debuglink: None,
            ..image
        };
        let other = ElfImage {
            build_id: Some("ffff".into()),
            segments: Vec::new(),
            symbols: SymbolTable::from_symbols([(0x1000, 0x10, "f")]),
            dwarf: None,
            debuglink: None,
            gopclntab: None,
            dwarf_over_budget: false,
        };
        assert!(!stripped.attach_debug_file(other), "another build's debug file");
        assert!(stripped.symbols.is_empty());

        // A binary with only its dynamic symbols takes the debug file's fuller table.
        stripped.symbols = SymbolTable::from_symbols([(0x1000, 0x10, "exported")]);
        let debug = ElfImage {
            build_id: Some("abcdef0123".into()),
            symbols: SymbolTable::from_symbols([(0x1000, 0x10, "exported"), (0x2000, 0x20, "local_helper")]),
            segments: Vec::new(),
            dwarf: None,
            debuglink: None,
            gopclntab: None,
            dwarf_over_budget: false,
        };
        assert!(stripped.attach_debug_file(debug));
        assert_eq!(stripped.symbols.lookup(0x2010), Some("local_helper"));
        assert_eq!(stripped.symbols.lookup(0x1004), Some("exported"));
    }

    #[test]
    fn lookup_respects_sizes_and_gaps() {
        let table = SymbolTable::from_symbols([
            (0x2000, 0x100, "second"),
            (0x1000, 0x10, "first"),
            (0x1000, 0x0, "alias"),
            (0x3000, 0, "sizeless"),
        ]);
        assert_eq!(table.len(), 3);
        assert_eq!(table.lookup(0x1000), Some("first"));
        assert_eq!(table.lookup(0x100f), Some("first"));
        assert_eq!(table.lookup(0x1010), None, "gap after a sized symbol");
        assert_eq!(table.lookup(0x20ff), Some("second"));
        assert_eq!(table.lookup(0x0fff), None);
        assert_eq!(table.lookup(0x9000), Some("sizeless"));
    }

    #[inline(never)]
    fn a_function_to_find() -> u64 {
        std::hint::black_box(7)
    }

    /// The symbolizer resolves a function of this very test binary, from its runtime address,
    /// through /proc/self/maps and the ELF segments, like the daemon does for other processes.
    #[test]
    fn resolves_own_function() {
        assert_eq!(a_function_to_find(), 7);
        let runtime = a_function_to_find as *const () as u64;
        let exe = std::fs::read_link("/proc/self/exe").expect("exe link");
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        let (start, offset) = maps
            .lines()
            .find_map(|line| {
                let mut cols = line.split_whitespace();
                let range = cols.next()?;
                let _perms = cols.next()?;
                let offset = u64::from_str_radix(cols.next()?, 16).ok()?;
                let path = cols.nth(2)?;
                let (lo, hi) = range.split_once('-')?;
                let (lo, hi) = (
                    u64::from_str_radix(lo, 16).ok()?,
                    u64::from_str_radix(hi, 16).ok()?,
                );
                (path == exe.to_str()? && (lo..hi).contains(&runtime)).then_some((lo, offset))
            })
            .expect("own mapping");
        let image = ElfImage::open(&FilePath::Trusted(exe.clone()), None).expect("own ELF");
        assert!(
            image.build_id.as_deref().is_some_and(|b| b.len() >= 16),
            "{:?}",
            image.build_id
        );
        let vaddr = image.vaddr_of_offset(runtime - start + offset).expect("segment");
        let names = image.resolve(vaddr).expect("symbol");
        assert!(names[0].name.ends_with("a_function_to_find"), "{names:?}");
    }
}
