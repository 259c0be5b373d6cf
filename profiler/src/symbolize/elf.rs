//! ELF files: GNU build id, loadable segments and `.symtab`/`.dynsym` function symbols.
use std::{io, path::Path};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, ReadCache, ReadRef, SymbolKind};

use super::{
    FunctionName, SymbolSource, demangle,
    dwarf::{DEFAULT_MAX_COST, Dwarf},
    gopclntab::GoPclntab,
};

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("opening {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("parsing {path} as ELF: {source}")]
    Parse { path: String, source: object::Error },
    #[error("{path} is not a regular file")]
    NotRegular { path: String },
    #[error("{path} is inode {found}, not the mapped inode {expected} (replaced since it was mapped)")]
    Replaced { path: String, expected: u64, found: u64 },
}

/// Why a section's bytes were not returned by [`section_bytes`].
#[derive(Debug, thiserror::Error)]
pub enum SectionError {
    #[error("it would decompress to {size} bytes, more than the {max} allowed")]
    TooLarge { size: u64, max: u64 },
    #[error("its compressed data is corrupt or in an unknown format")]
    Corrupt,
}

/// The bytes of `section`, decompressed when it is `SHF_COMPRESSED` (zlib or zstd), refusing
/// more than `max` bytes. The size the compression header claims is checked before anything
/// is decompressed, and the zstd decoder is stopped past it, so a hostile binary cannot make
/// the daemon expand a small section without bound.
pub fn section_bytes<'data, 'file, R: ReadRef<'data>>(
    section: &object::Section<'data, 'file, R>,
    max: u64,
) -> Result<std::borrow::Cow<'data, [u8]>, SectionError> {
    use std::{borrow::Cow, io::Read as _};
    let compressed = section.compressed_data().map_err(|_| SectionError::Corrupt)?;
    let size = match compressed.format {
        object::CompressionFormat::None => compressed.data.len() as u64,
        _ => compressed.uncompressed_size,
    };
    if size > max {
        return Err(SectionError::TooLarge { size, max });
    }
    match compressed.format {
        object::CompressionFormat::Zstandard => {
            let size = usize::try_from(size).map_err(|_| SectionError::Corrupt)?;
            let mut out = Vec::with_capacity(size);
            let mut input = compressed.data;
            while !input.is_empty() && out.len() < size {
                let decoder =
                    ruzstd::decoding::StreamingDecoder::new(&mut input).map_err(|_| SectionError::Corrupt)?;
                let room = (size - out.len()) as u64;
                decoder
                    .take(room + 1)
                    .read_to_end(&mut out)
                    .map_err(|_| SectionError::Corrupt)?;
            }
            if out.len() != size {
                return Err(SectionError::Corrupt);
            }
            Ok(Cow::Owned(out))
        }
        // Stored bytes, or zlib, whose decoder fills at most the claimed size.
        _ => compressed.decompress().map_err(|_| SectionError::Corrupt),
    }
}

/// Files up to this size are read whole (one read); larger ones are read piecewise on demand
/// through a [`WindowedFile`]: headers, string and symbol tables, `.gopclntab` and DWARF
/// sections, each in one read, and nothing else. Most of an executable is code, which
/// symbolization never reads, and a debug file whose DWARF is over budget is read only for
/// its headers and symbol table, so reading piecewise copies less, faults fewer fresh pages
/// and keeps the daemon's memory bounded.
const READ_WHOLE_MAX: u64 = 256 * 1024;

/// Bytes a [`WindowedFile`] reads at once for small reads.
const READ_WINDOW: usize = 64 * 1024;

/// A file read for `object::ReadCache`: seeks cost nothing, and small reads are served from a
/// 64 KiB window read with one `pread`. `ReadCache` seeks and reads once per symbol name;
/// straight on a `File` that was two syscalls per name (~50,000 to parse the daemon's own
/// 17.6 MiB binary), through the window it is one per 64 KiB of string table. Reads of a
/// window or more go straight to the file.
#[derive(Debug)]
pub struct WindowedFile {
    file: std::fs::File,
    len: u64,
    pos: u64,
    window_start: u64,
    window: Vec<u8>,
}

impl WindowedFile {
    pub fn new(file: std::fs::File, len: u64) -> Self {
        Self {
            file,
            len,
            pos: 0,
            window_start: 0,
            window: Vec::new(),
        }
    }

    /// A `ReadCache` over `file` whose length is `len`.
    pub fn cache(file: std::fs::File, len: u64) -> ReadCache<Self> {
        ReadCache::new(Self::new(file, len))
    }
}

impl std::io::Read for WindowedFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt as _;
        if buf.len() >= READ_WINDOW {
            let n = self.file.read_at(buf, self.pos)?;
            self.pos += n as u64;
            return Ok(n);
        }
        let end = self.window_start + self.window.len() as u64;
        if self.pos < self.window_start || self.pos >= end {
            self.window.resize(READ_WINDOW, 0);
            let n = self.file.read_at(&mut self.window, self.pos)?;
            self.window.truncate(n);
            self.window_start = self.pos;
            if n == 0 {
                return Ok(0);
            }
        }
        let at = (self.pos - self.window_start) as usize;
        let n = buf.len().min(self.window.len() - at);
        buf[..n].copy_from_slice(&self.window[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for WindowedFile {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            std::io::SeekFrom::Start(at) => Some(at),
            std::io::SeekFrom::End(delta) => self.len.checked_add_signed(delta),
            std::io::SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
        };
        let target = target.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        self.pos = target;
        Ok(target)
    }
}

/// Most bytes of one string table [`LargeFile`] reads whole.
const STRING_TABLE_MAX: u64 = 64 * 1024 * 1024;

/// A file too large to read whole, read for `object` through a [`WindowedFile`], except its
/// symbol string tables (`.strtab`, `.dynstr`), which are read whole up front. The symbol
/// pass asks for one name at a time, and `ReadCache` answers each with a hash-map entry and an
/// allocation of its own: for the daemon's own binary that was ~50,000 of them, three
/// quarters of its 20 ms parse.
pub struct LargeFile {
    cache: ReadCache<WindowedFile>,
    /// (file offset, bytes) of each string table read whole.
    strings: Vec<(u64, Vec<u8>)>,
}

impl LargeFile {
    pub fn open(file: std::fs::File, len: u64) -> Self {
        let cache = WindowedFile::cache(file, len);
        let ranges: Vec<(u64, u64)> = match object::File::parse(&cache) {
            Ok(elf) => [".strtab", ".dynstr"]
                .into_iter()
                .filter_map(|name| elf.section_by_name(name)?.file_range())
                .filter(|&(offset, size)| {
                    size <= STRING_TABLE_MAX && offset.checked_add(size).is_some_and(|end| end <= len)
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let windowed = cache.into_inner();
        let strings = ranges
            .into_iter()
            .filter_map(|(offset, size)| {
                use std::os::unix::fs::FileExt as _;
                let mut bytes = vec![0; usize::try_from(size).ok()?];
                windowed.file.read_exact_at(&mut bytes, offset).ok()?;
                Some((offset, bytes))
            })
            .collect();
        Self {
            cache: ReadCache::new(windowed),
            strings,
        }
    }

    /// The string table holding file offset `at`, with its own offset.
    fn strings_at(&self, at: u64) -> Option<(u64, &[u8])> {
        self.strings
            .iter()
            .find(|(offset, bytes)| at >= *offset && at - offset < bytes.len() as u64)
            .map(|(offset, bytes)| (*offset, bytes.as_slice()))
    }
}

impl<'a> ReadRef<'a> for &'a LargeFile {
    fn len(self) -> Result<u64, ()> {
        (&self.cache).len()
    }

    fn read_bytes_at(self, offset: u64, size: u64) -> Result<&'a [u8], ()> {
        if let Some((start, bytes)) = self.strings_at(offset) {
            let from = (offset - start) as usize;
            if let Some(slice) = usize::try_from(size)
                .ok()
                .and_then(|n| bytes.get(from..from.checked_add(n)?))
            {
                return Ok(slice);
            }
        }
        (&self.cache).read_bytes_at(offset, size)
    }

    fn read_bytes_at_until(self, range: std::ops::Range<u64>, delimiter: u8) -> Result<&'a [u8], ()> {
        if let Some((start, bytes)) = self.strings_at(range.start) {
            let from = (range.start - start) as usize;
            let to = range.end.saturating_sub(start).min(bytes.len() as u64) as usize;
            let slice = bytes.get(from..to).ok_or(())?;
            if let Some(end) = slice.iter().position(|&b| b == delimiter) {
                return Ok(&slice[..end]);
            }
            if range.end <= start + bytes.len() as u64 {
                return Err(());
            }
        }
        (&self.cache).read_bytes_at_until(range, delimiter)
    }
}

/// A `PT_LOAD` segment: where file bytes land in the ELF's virtual address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    pub vaddr: u64,
    pub mem_size: u64,
    pub file_offset: u64,
    pub file_size: u64,
}

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

impl SymbolTable {
    /// Builds a table from `(address, size, name)`; for several symbols at one address the
    /// largest (then first) wins.
    pub fn from_symbols<'a>(symbols: impl IntoIterator<Item = (u64, u64, &'a str)>) -> Self {
        let mut table = SymbolTable::default();
        for (addr, size, name) in symbols {
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

/// Opens `path` for reading without blocking (a path swapped for a FIFO would otherwise hang
/// the caller) and checks that it is a regular file and, with `inode`, that inode: a path seen
/// in /proc/<pid>/maps may since have been replaced.
pub fn open_regular(path: &Path, inode: Option<u64>) -> Result<(std::fs::File, std::fs::Metadata), ElfError> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let display = || path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| ElfError::Open {
            path: display(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| ElfError::Open {
        path: display(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ElfError::NotRegular { path: display() });
    }
    if let Some(expected) = inode
        && meta.ino() != expected
    {
        return Err(ElfError::Replaced {
            path: display(),
            expected,
            found: meta.ino(),
        });
    }
    Ok((file, meta))
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
    pub fn open(path: &Path, inode: Option<u64>) -> Result<Self, ElfError> {
        Self::open_with(path, inode, DEFAULT_MAX_COST)
    }

    /// [`ElfImage::open`] with the most memory the file's parsed DWARF may take; a file whose
    /// DWARF would cost more is named from its symbol tables ([`ElfImage::dwarf_over_budget`]).
    pub fn open_with(path: &Path, inode: Option<u64>, max_dwarf_cost: u64) -> Result<Self, ElfError> {
        let display = || path.display().to_string();
        let (file, meta) = open_regular(path, inode)?;
        let parse_error = |source| ElfError::Parse {
            path: display(),
            source,
        };
        if meta.len() <= READ_WHOLE_MAX {
            let mut data = Vec::with_capacity(meta.len() as usize);
            std::io::Read::read_to_end(&mut &file, &mut data).map_err(|source| ElfError::Open {
                path: display(),
                source,
            })?;
            return Self::parse_with(data.as_slice(), max_dwarf_cost).map_err(parse_error);
        }
        let large = LargeFile::open(file, meta.len());
        Self::parse_with(&large, max_dwarf_cost).map_err(parse_error)
    }

    pub fn parse<'data, R: ReadRef<'data>>(data: R) -> Result<Self, object::Error> {
        Self::parse_with(data, DEFAULT_MAX_COST)
    }

    pub fn parse_with<'data, R: ReadRef<'data>>(data: R, max_dwarf_cost: u64) -> Result<Self, object::Error> {
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
        let symbols = SymbolTable::from_symbols(functions);
        let gopclntab = GoPclntab::from_elf(&elf, true);
        // Go code is named from .gopclntab (cheaper, and present in stripped binaries); DWARF
        // is loaded only for the rest: files without the table, and the C code of cgo binaries.
        let (dwarf, dwarf_over_budget) = match &gopclntab {
            Some(go) if go.has_inline_trees() && !has_foreign_code(&elf, go) => (None, false),
            _ => {
                let dwarf = Dwarf::load(&elf, max_dwarf_cost);
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

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn refuses_fifos_and_replaced_files_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().expect("utf8")).expect("cstring");
        // SAFETY: mkfifo reads a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = ElfImage::open(&fifo, None).expect_err("a FIFO is not an ELF file");
        assert!(matches!(err, ElfError::NotRegular { .. }), "{err}");

        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        let err = ElfImage::open(&exe, Some(1)).expect_err("wrong inode");
        assert!(err.to_string().contains("replaced since it was mapped"), "{err}");
    }

    #[test]
    fn windowed_reads_equal_the_file() {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        std::fs::write(&path, &bytes).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let mut w = WindowedFile::new(file, bytes.len() as u64);
        // Small reads inside and across windows, a large read past the window, the end.
        for (at, size) in [
            (0usize, 10usize),
            (5, 300),
            (65_530, 20),
            (70_000, 100_000),
            (299_990, 10),
        ] {
            assert_eq!(w.seek(SeekFrom::Start(at as u64)).expect("seek"), at as u64);
            let mut buf = vec![0u8; size];
            w.read_exact(&mut buf).expect("read");
            assert_eq!(buf, bytes[at..at + size], "{at}+{size}");
        }
        let mut rest = Vec::new();
        w.seek(SeekFrom::End(-5)).expect("seek from end");
        w.read_to_end(&mut rest).expect("read to end");
        assert_eq!(rest, bytes[bytes.len() - 5..]);
        assert!(w.seek(SeekFrom::Current(-1_000_000)).is_err());

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
        assert!(!large.strings.is_empty(), "no string table was read whole");
        let preloaded = ElfImage::parse(&large).expect("parse with string tables read whole");
        assert_eq!(preloaded.build_id, whole.build_id);
        assert_eq!(preloaded.symbols.names, whole.symbols.names);
    }

    /// Reads that start in a string table read whole give what the file holds, also when they
    /// run past its end; a name without its terminator inside the asked range is an error.
    #[test]
    fn large_file_reads_equal_the_file() {
        let mut bytes: Vec<u8> = (0..4000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for at in [150, 250, 1000] {
            bytes[at] = 0;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("strings");
        std::fs::write(&path, &bytes).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let large = LargeFile {
            cache: WindowedFile::cache(file, bytes.len() as u64),
            strings: vec![(100, bytes[100..200].to_vec())],
        };
        let whole = bytes.as_slice();
        for range in [
            100..4000,
            120..4000,
            199..4000,
            160..4000,
            120..130,
            160..200,
            160..260,
        ] {
            assert_eq!(
                (&large).read_bytes_at_until(range.clone(), 0),
                whole.read_bytes_at_until(range.clone(), 0),
                "{range:?}"
            );
        }
        for (offset, size) in [(100, 100), (150, 60), (199, 1), (0, 150), (300, 10), (120, 0)] {
            assert_eq!(
                (&large).read_bytes_at(offset, size),
                whole.read_bytes_at(offset, size),
                "{offset}+{size}"
            );
        }
        assert_eq!((&large).len(), Ok(4000));
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
        let image = ElfImage::open(&exe, None).expect("own ELF");
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
