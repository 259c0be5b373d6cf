//! Go's `.gopclntab`: function names, files, lines and inlined calls of Go binaries, stripped
//! ones included (`-ldflags=-s -w` drops `.symtab` and DWARF but keeps this table, which the Go
//! runtime needs for its own tracebacks).
//!
//! Layouts follow the Go runtime (`runtime/symtab.go`, `runtime/runtime2.go`):
//!
//! | magic | Go | header | functab entry | `_func` | funcdata | `inlinedCall` |
//! |---|---|---|---|---|---|---|
//! | `0xfffffffa` | 1.16–1.17 | no `textStart` | `{uintptr entry, uintptr funcoff}` | `uintptr entry`, 44 bytes | pointers | 20 bytes, with `parent` |
//! | `0xfffffff0` | 1.18–1.19 | `textStart` | `{u32 entryoff, u32 funcoff}` | `u32 entryoff`, 40 bytes | `u32` from `moduledata.gofunc` | 20 bytes |
//! | `0xfffffff1` | 1.20+ | `textStart` (0 from 1.26) | as 1.18 | as 1.18 plus `startLine`, 44 bytes | as 1.18 | 16 bytes |
//!
//! Inlined calls: `PCDATA_InlTreeIndex` (2) maps a pc to an entry of the function's inline
//! tree (`FUNCDATA_InlTree`, 3), which names the inlined function and the pc of its call site
//! in the caller; the walk repeats from that pc until the index is -1. From Go 1.18 funcdata
//! are offsets from `moduledata.gofunc` (`go:func.*`), so the table alone is not enough: the
//! moduledata is found through `.go.module` (Go 1.26), the `runtime.firstmoduledata` symbol,
//! or, in stripped binaries, by its first fields (pointers into the table) in `.noptrdata`.
//! Go 1.26 also stopped filling the header's `textStart`; `moduledata.text` has it.
//!
//! Every offset read from the table is bounds-checked: a corrupt or hostile binary yields
//! fewer frames or `None`, never a panic.
use std::borrow::Cow;

use super::FunctionName;

const MAGIC_116: u32 = 0xffff_fffa;
const MAGIC_118: u32 = 0xffff_fff0;
const MAGIC_120: u32 = 0xffff_fff1;

const PCDATA_INL_TREE_INDEX: usize = 2;
const FUNCDATA_INL_TREE: usize = 3;
/// Offset of `moduledata.text` (22 words in: pcHeader, six slices, findfunctab, minpc, maxpc).
const MODULEDATA_TEXT: usize = 22 * 8;
/// Offset of `moduledata.gofunc`: Go 1.20 added `covctrs, ecovctrs` before it.
const MODULEDATA_GOFUNC_118: usize = 38 * 8;
const MODULEDATA_GOFUNC_120: usize = 40 * 8;
/// Go 1.16's functions that move the stack pointer where `pcsp` cannot follow (later versions
/// flag them `SPWRITE`).
const GO116_SWITCHES_STACKS: [&str; 10] = [
    "runtime.systemstack",
    "runtime.systemstack_switch",
    "runtime.mcall",
    "runtime.morestack",
    "runtime.morestack_noctxt",
    "runtime.gogo",
    "runtime.asmcgocall",
    "runtime.cgocallback",
    "runtime.rt0_go",
    "runtime.mstart",
];

/// Largest `.gopclntab` read (the tables of the largest Go binaries are a few hundred MiB
/// less than this).
const MAX_TABLE_BYTES: u64 = 512 * 1024 * 1024;
/// Inline trees kept per binary at most (they are a small part of `go:func.*`).
const MAX_INLINE_BYTES: u64 = 64 * 1024 * 1024;
/// Inlined frames followed at one pc at most (Go's own limit on inlining depth is far lower).
const MAX_INLINE_DEPTH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Go116,
    Go118,
    Go120,
}

impl Version {
    /// Size of `_func` up to and including `nfuncdata` (where `pcdata[]` starts).
    fn func_size(self) -> usize {
        match self {
            Version::Go116 => 44,
            Version::Go118 => 40,
            Version::Go120 => 44,
        }
    }

    /// Where the u32 fields (`nameOff` …) start in `_func`, after the entry.
    fn fields_at(self) -> usize {
        match self {
            Version::Go116 => 8,
            Version::Go118 | Version::Go120 => 4,
        }
    }

    fn inlined_call_size(self) -> usize {
        match self {
            Version::Go116 | Version::Go118 => 20,
            Version::Go120 => 16,
        }
    }
}

/// What the binary holds besides the table, found by address: the sections the table's
/// pointers lead to, and a few symbols when the binary still has them.
pub trait GoImage {
    /// Bytes and address of the allocated section `name`.
    fn section(&self, name: &str) -> Option<(u64, &[u8])>;
    /// `len` bytes at virtual address `addr`, from the allocated section that holds them.
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]>;
    /// Address of the symbol `name`, if the binary has a symbol table.
    fn symbol(&self, name: &str) -> Option<u64>;
}

/// A binary's allocated sections and the few symbols the reader uses: the [`GoImage`] of an
/// ELF file ([`GoSections::from_elf`]), or of bytes put together by hand.
pub struct GoSections<'data> {
    sections: Vec<(String, u64, Cow<'data, [u8]>)>,
    symbols: Vec<(String, u64)>,
}

/// Sections the reader reads by address.
const GO_SECTIONS: [&str; 4] = [".rodata", ".noptrdata", ".data.rel.ro", ".go.module"];

/// Symbols the reader uses when present.
const GO_SYMBOLS: [&str; 3] = ["runtime.firstmoduledata", "go:func.*", "go.func.*"];

impl<'data> GoSections<'data> {
    /// Sections as (name, address, bytes) and symbols as (name, address).
    pub fn new(sections: Vec<(String, u64, Cow<'data, [u8]>)>, symbols: Vec<(String, u64)>) -> Self {
        Self { sections, symbols }
    }

    pub fn from_elf<R: object::ReadRef<'data>>(elf: &object::File<'data, R>) -> Self {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
        // Only where moduledata (`.noptrdata`, `.data.rel.ro` in PIE, `.go.module` from Go 1.26)
        // and the inline trees (`go:func.*` in `.rodata`) are: a large binary read piecewise
        // then reads only these.
        let sections = elf
            .sections()
            .filter(|s| s.name().is_ok_and(|name| GO_SECTIONS.contains(&name)))
            .filter_map(|s| {
                Some((
                    s.name().ok()?.to_owned(),
                    s.address(),
                    Cow::Borrowed(s.data().ok()?),
                ))
            })
            .collect();
        let symbols = elf
            .symbols()
            .filter_map(|s| {
                let name = s.name().ok()?;
                GO_SYMBOLS.contains(&name).then(|| (name.to_owned(), s.address()))
            })
            .collect();
        Self { sections, symbols }
    }
}

impl GoImage for GoSections<'_> {
    fn section(&self, name: &str) -> Option<(u64, &[u8])> {
        self.sections
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, addr, data)| (*addr, &**data))
    }

    fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        self.sections.iter().find_map(|(_, start, data)| {
            let at = usize::try_from(addr.checked_sub(*start)?).ok()?;
            data.get(at..at.checked_add(len)?)
        })
    }

    fn symbol(&self, name: &str) -> Option<u64> {
        self.symbols.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    }
}

/// Inline trees copied out of the binary: the bytes of `range` (virtual addresses).
#[derive(Debug, Default)]
struct InlineTrees {
    base: u64,
    data: Vec<u8>,
    /// Where funcdata offsets count from (Go 1.18+); 0 for 1.16, whose funcdata are addresses.
    gofunc: u64,
}

/// A parsed `.gopclntab` (the section bytes are kept: lookups decode on demand).
#[derive(Debug)]
pub struct GoPclntab {
    data: Vec<u8>,
    version: Version,
    quantum: u64,
    ptr_size: usize,
    nfunc: usize,
    text_start: u64,
    funcname: usize,
    cu: usize,
    filetab: usize,
    pctab: usize,
    functab: usize,
    /// Virtual address of the table, for Go 1.16's address-aligned funcdata.
    address: u64,
    inline: InlineTrees,
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn i32_at(data: &[u8], at: usize) -> Option<i32> {
    u32_at(data, at).map(|v| v as i32)
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        data.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn cstr_at(data: &[u8], at: usize) -> Option<&str> {
    let rest = data.get(at..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&rest[..end]).ok()
}

fn uvarint(data: &[u8], at: &mut usize) -> Option<u32> {
    let mut value: u32 = 0;
    let mut shift = 0;
    loop {
        let byte = *data.get(*at)?;
        *at += 1;
        value |= u32::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// One function of the table: where its `_func` is and what it starts with.
#[derive(Debug, Clone, Copy)]
struct Func {
    entry: u64,
    /// Offset of `_func` in the table.
    at: usize,
}

/// The header fields every layout shares.
struct Header {
    version: Version,
    quantum: u64,
    nfunc: usize,
    text_start: u64,
    offsets: [usize; 5],
}

fn header(data: &[u8]) -> Option<Header> {
    let version = match u32_at(data, 0)? {
        MAGIC_116 => Version::Go116,
        MAGIC_118 => Version::Go118,
        MAGIC_120 => Version::Go120,
        _ => return None,
    };
    let (pad1, pad2, quantum, ptr_size) = (*data.get(4)?, *data.get(5)?, *data.get(6)?, *data.get(7)?);
    if pad1 != 0 || pad2 != 0 || !matches!(quantum, 1 | 2 | 4) || ptr_size != 8 {
        return None;
    }
    let word = |i: usize| u64_at(data, 8 + i * 8).and_then(|v| usize::try_from(v).ok());
    let (text_start, first) = match version {
        Version::Go116 => (0, 2),
        Version::Go118 | Version::Go120 => (u64_at(data, 8 + 2 * 8)?, 3),
    };
    let mut offsets = [0; 5];
    for (i, slot) in offsets.iter_mut().enumerate() {
        *slot = word(first + i)?;
    }
    Some(Header {
        version,
        quantum: u64::from(quantum),
        nfunc: word(0)?,
        text_start,
        offsets,
    })
}

/// Finds `runtime.firstmoduledata`: the `.go.module` section (Go 1.26), the symbol, or a
/// match of its first fields (the table's address, then `funcnametab`, `cutab`, `filetab`,
/// `pctab` and `ftab` pointing into the table) in `.noptrdata`. Returns its bytes.
fn moduledata<'a>(image: &'a dyn GoImage, address: u64, offsets: &[usize; 5]) -> Option<&'a [u8]> {
    const SIZE: usize = 48 * 8;
    if let Some((_, data)) = image.section(".go.module") {
        return Some(data);
    }
    if let Some(addr) = image.symbol("runtime.firstmoduledata") {
        return image.read(addr, SIZE);
    }
    let (_, data) = image.section(".noptrdata")?;
    let at = |i: usize| address.checked_add(offsets[i] as u64);
    // pcHeader, funcnametab{ptr,len,cap}, cutab{…}, filetab{…}, pctab{…}, pclntable{…}, ftab{…}
    let expect = [
        (0, Some(address)),
        (1, at(0)),
        (4, at(1)),
        (7, at(2)),
        (10, at(3)),
        (16, at(4)),
    ];
    let mut start = 0;
    while start + SIZE <= data.len() {
        if expect
            .iter()
            .all(|&(word, value)| value.is_some() && u64_at(data, start + word * 8) == value)
        {
            return data.get(start..start + SIZE);
        }
        start += 8;
    }
    None
}

impl GoPclntab {
    /// Parses the table alone. `text_section` is the address of `.text`, used when the
    /// header's `textStart` is 0 (Go 1.26). Without the rest of the binary, no inlined calls.
    pub fn parse(data: Vec<u8>, text_section: Option<u64>) -> Option<Self> {
        let text = text_section.unwrap_or(0);
        Self::parse_in(data, 0, text, None, false)
    }

    /// Finds and parses the table of an ELF file; with `inline`, also copies its inline trees.
    pub fn from_elf<'data, R: object::ReadRef<'data>>(
        elf: &object::File<'data, R>,
        inline: bool,
    ) -> Option<Self> {
        use object::{Object as _, ObjectSection as _};
        let section = elf
            .section_by_name(".gopclntab")
            .or_else(|| elf.section_by_name(".data.rel.ro.gopclntab"))?;
        let data = crate::object::section_bytes(&section, MAX_TABLE_BYTES)
            .ok()?
            .into_owned();
        let text = elf.section_by_name(".text").map_or(0, |s| s.address());
        let image = GoSections::from_elf(elf);
        Self::parse_in(data, section.address(), text, Some(&image), inline)
    }

    /// Parses `data`, the table at virtual address `address` of a binary whose `.text` starts at
    /// `text_section`; `image` gives the rest of the binary (for Go 1.26's text start and,
    /// with `inline`, the inline trees).
    pub fn parse_in(
        data: Vec<u8>,
        address: u64,
        text_section: u64,
        image: Option<&dyn GoImage>,
        inline: bool,
    ) -> Option<Self> {
        let header = header(&data)?;
        let module = image.and_then(|image| moduledata(image, address, &header.offsets));
        let text_start = match header.text_start {
            0 if header.version != Version::Go116 => module
                .and_then(|m| u64_at(m, MODULEDATA_TEXT))
                .filter(|&t| t != 0)
                .unwrap_or(text_section),
            t => t,
        };
        let [funcname, cu, filetab, pctab, functab] = header.offsets;
        let mut table = Self {
            version: header.version,
            quantum: header.quantum,
            ptr_size: 8,
            nfunc: header.nfunc,
            text_start,
            funcname,
            cu,
            filetab,
            pctab,
            functab,
            address,
            data,
            inline: InlineTrees::default(),
        };
        // The functab must hold nfunc + 1 entries.
        let end = table
            .nfunc
            .checked_add(1)?
            .checked_mul(table.functab_entry_size())?
            .checked_add(table.functab)?;
        if end > table.data.len() {
            return None;
        }
        if let Some(image) = image.filter(|_| inline) {
            let gofunc = match table.version {
                Version::Go116 => Some(0),
                Version::Go118 => image
                    .symbol("go.func.*")
                    .or_else(|| module.and_then(|m| u64_at(m, MODULEDATA_GOFUNC_118))),
                Version::Go120 => image
                    .symbol("go:func.*")
                    .or_else(|| module.and_then(|m| u64_at(m, MODULEDATA_GOFUNC_120))),
            };
            if let Some(gofunc) = gofunc {
                table.inline = table.copy_inline_trees(image, gofunc).unwrap_or_default();
            }
        }
        Some(table)
    }

    fn functab_entry_size(&self) -> usize {
        match self.version {
            Version::Go116 => 2 * self.ptr_size,
            Version::Go118 | Version::Go120 => 8,
        }
    }

    /// (entry pc, offset of `_func` from the functab) of functab entry `i`.
    fn functab_entry(&self, i: usize) -> Option<(u64, usize)> {
        let at = self
            .functab
            .checked_add(i.checked_mul(self.functab_entry_size())?)?;
        match self.version {
            Version::Go116 => {
                let entry = u64_at(&self.data, at)?;
                let funcoff = usize::try_from(u64_at(&self.data, at + 8)?).ok()?;
                Some((entry, funcoff))
            }
            Version::Go118 | Version::Go120 => {
                let entry = self.text_start.checked_add(u64::from(u32_at(&self.data, at)?))?;
                Some((entry, u32_at(&self.data, at + 4)? as usize))
            }
        }
    }

    fn func(&self, i: usize) -> Option<Func> {
        let (entry, funcoff) = self.functab_entry(i)?;
        Some(Func {
            entry,
            at: self.functab.checked_add(funcoff)?,
        })
    }

    /// The u32 field `i` of `_func` after its entry: 0 nameOff, 1 args, 2 deferreturn,
    /// 3 pcsp, 4 pcfile, 5 pcln, 6 npcdata, 7 cuOffset.
    fn field(&self, func: Func, i: usize) -> Option<u32> {
        u32_at(&self.data, func.at.checked_add(self.version.fields_at() + 4 * i)?)
    }

    fn name_at(&self, name_off: u32) -> Option<&str> {
        cstr_at(&self.data, self.funcname.checked_add(name_off as usize)?)
    }

    /// Offset of pc-value table `pcdata[index]` of `func`, if it has one.
    fn pcdata(&self, func: Func, index: usize) -> Option<u32> {
        let npcdata = self.field(func, 6)? as usize;
        if index >= npcdata {
            return None;
        }
        let at = func
            .at
            .checked_add(self.version.func_size())?
            .checked_add(index * 4)?;
        u32_at(&self.data, at).filter(|&off| off != 0)
    }

    /// Virtual address of `funcdata[index]` of `func`, if it has one; `gofunc` is where Go
    /// 1.18+ offsets count from.
    fn funcdata(&self, func: Func, index: usize, gofunc: u64) -> Option<u64> {
        let size = self.version.func_size();
        let nfuncdata = usize::from(*self.data.get(func.at.checked_add(size - 1)?)?);
        if index >= nfuncdata {
            return None;
        }
        let npcdata = self.field(func, 6)? as usize;
        let after_pcdata = func.at.checked_add(size)?.checked_add(npcdata.checked_mul(4)?)?;
        match self.version {
            Version::Go116 => {
                // Pointers, 8-aligned in memory: the runtime skips 4 bytes when the address
                // after pcdata is not.
                let mut at = after_pcdata;
                if self.address.wrapping_add(at as u64) & 4 != 0 {
                    at = at.checked_add(4)?;
                }
                u64_at(&self.data, at.checked_add(index * 8)?).filter(|&p| p != 0)
            }
            Version::Go118 | Version::Go120 => {
                let off = u32_at(&self.data, after_pcdata.checked_add(index * 4)?)?;
                if off == u32::MAX {
                    return None;
                }
                gofunc.checked_add(u64::from(off))
            }
        }
    }

    /// Copies the inline trees of all functions out of the binary: from the lowest tree to the
    /// end of the highest (as many entries as its index table reaches). Trees are a small part
    /// of `go:func.*`, which also holds stack maps.
    fn copy_inline_trees(&self, image: &dyn GoImage, gofunc: u64) -> Option<InlineTrees> {
        let mut lowest = u64::MAX;
        let mut highest: Option<(u64, Func)> = None;
        for i in 0..self.nfunc {
            let Some(func) = self.func(i) else { continue };
            let Some(tree) = self.funcdata(func, FUNCDATA_INL_TREE, gofunc) else {
                continue;
            };
            lowest = lowest.min(tree);
            if highest.is_none_or(|(h, _)| tree > h) {
                highest = Some((tree, func));
            }
        }
        let (high, func) = highest?;
        let index = self.pcdata(func, PCDATA_INL_TREE_INDEX)?;
        let entries = u64::from(self.pcvalue_max(index, func.entry)?.checked_add(1)?);
        let end = high.checked_add(entries.checked_mul(self.version.inlined_call_size() as u64)?)?;
        let len = end.checked_sub(lowest)?;
        if len > MAX_INLINE_BYTES {
            return None;
        }
        let data = image.read(lowest, usize::try_from(len).ok()?)?.to_vec();
        Some(InlineTrees {
            base: lowest,
            data,
            gofunc,
        })
    }

    /// Whether inlined calls can be named (the inline trees were found).
    pub fn has_inline_trees(&self) -> bool {
        !self.inline.data.is_empty()
    }

    pub fn len(&self) -> usize {
        self.nfunc
    }

    /// Start of the first function and end of the last.
    pub fn code_range(&self) -> Option<(u64, u64)> {
        Some((self.functab_entry(0)?.0, self.functab_entry(self.nfunc)?.0))
    }

    pub fn is_empty(&self) -> bool {
        self.nfunc == 0
    }

    /// Every function as (entry, end, name), in address order. Unreadable entries are skipped.
    pub fn functions(&self) -> impl Iterator<Item = (u64, u64, &str)> + '_ {
        (0..self.nfunc).filter_map(move |i| {
            let func = self.func(i)?;
            let (end, _) = self.functab_entry(i + 1)?;
            let name = self.name_at(self.field(func, 0)?)?;
            Some((func.entry, end, name))
        })
    }

    /// Code ranges where the stack pointer is where it was at entry (`pcsp` is 0): the whole of
    /// a frameless leaf function, and the prologue and epilogue of others. The return address
    /// is at the stack pointer there, and rbp still holds the caller's frame pointer, so a
    /// frame-pointer walk would skip the caller. Functions that move the stack pointer in ways
    /// `pcsp` does not follow (`funcFlag_SPWRITE`: systemstack, mcall, morestack, gogo …) and
    /// stack tops (`funcFlag_TOPFRAME`) are left out, as are those `skip` names.
    ///
    /// Ranges are non-empty and inside their function (`entry..next entry`), so there are at
    /// most as many as the code has bytes; past `max` of them the table is refused (`None`).
    pub fn frameless_ranges(&self, skip: impl Fn(&str) -> bool, max: usize) -> Option<Vec<(u64, u64)>> {
        const TOPFRAME_OR_SPWRITE: u8 = 1 | 2;
        let mut out = Vec::new();
        let mut over = false;
        for i in 0..self.nfunc {
            let Some(func) = self.func(i) else { continue };
            let Some((end, _)) = self.functab_entry(i + 1) else {
                continue;
            };
            // Entries out of order (a hostile table) give no code to this function.
            if end <= func.entry {
                continue;
            }
            if self
                .field(func, 0)
                .and_then(|off| self.name_at(off))
                .is_none_or(&skip)
            {
                continue;
            }
            // _func ends with funcID, flag, a pad byte and nfuncdata. Go 1.16 has no flag (its
            // pad byte reads as 0): its stack-switching functions are known by name instead.
            let flag_at = func.at.checked_add(self.version.func_size() - 3);
            if flag_at
                .and_then(|at| self.data.get(at))
                .is_none_or(|f| f & TOPFRAME_OR_SPWRITE != 0)
            {
                continue;
            }
            if self.version == Version::Go116
                && self
                    .field(func, 0)
                    .and_then(|off| self.name_at(off))
                    .is_none_or(|name| GO116_SWITCHES_STACKS.contains(&name))
            {
                continue;
            }
            let Some(pcsp) = self.field(func, 3) else { continue };
            let mut from = func.entry;
            let mut open: Option<u64> = None;
            let mut push = |start: u64, to: u64, out: &mut Vec<(u64, u64)>| {
                if to > start {
                    if out.len() >= max {
                        over = true;
                    } else {
                        out.push((start, to));
                    }
                }
            };
            self.walk_pcvalue(pcsp, func.entry, |value, to| {
                let to = to.min(end);
                match (value == 0, open) {
                    (true, None) => open = Some(from),
                    (false, Some(start)) => {
                        push(start, from, &mut out);
                        open = None;
                    }
                    _ => {}
                }
                from = to;
                to < end
            });
            if let Some(start) = open {
                push(start, from, &mut out);
            }
            if over {
                return None;
            }
        }
        Some(out)
    }

    /// Bytes held (the table and the inline trees are kept whole).
    pub fn bytes(&self) -> u64 {
        (self.data.len() + self.inline.data.len()) as u64
    }

    /// The function whose code holds `pc`.
    fn find(&self, pc: u64) -> Option<Func> {
        // Binary search over entries 0..nfunc; entry nfunc is the end of the last function.
        let (mut lo, mut hi) = (0usize, self.nfunc);
        let (last_entry, _) = self.functab_entry(self.nfunc)?;
        if pc < self.functab_entry(0)?.0 || pc >= last_entry {
            return None;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.functab_entry(mid)?.0 <= pc {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        self.func(lo)
    }

    /// Source file and line of `pc` in `func` (for inlined code: the inlined function's).
    fn position(&self, func: Func, pc: u64) -> (Option<&str>, i64) {
        let line = self
            .field(func, 5)
            .and_then(|pcln| self.pcvalue(pcln, func.entry, pc))
            .unwrap_or(0);
        let file = (|| {
            let fileno = u32::try_from(self.pcvalue(self.field(func, 4)?, func.entry, pc)?).ok()?;
            let cu_offset = self.field(func, 7)?;
            let slot = self.cu.checked_add(
                (cu_offset as usize)
                    .checked_add(fileno as usize)?
                    .checked_mul(4)?,
            )?;
            let file_off = u32_at(&self.data, slot)?;
            if file_off == u32::MAX {
                return None;
            }
            cstr_at(&self.data, self.filetab.checked_add(file_off as usize)?)
        })();
        (file, i64::from(line))
    }

    /// Frames at `pc`, innermost first: the inlined calls (when the inline trees were found),
    /// then the function that holds the code.
    pub fn frames(&self, pc: u64) -> Option<Vec<FunctionName>> {
        let func = self.find(pc)?;
        let name = self.name_at(self.field(func, 0)?)?;
        let mut out = Vec::new();
        let mut at = pc;
        if let Some(index) = self
            .pcdata(func, PCDATA_INL_TREE_INDEX)
            .filter(|_| self.has_inline_trees())
            && let Some(tree) = self.funcdata(func, FUNCDATA_INL_TREE, self.inline.gofunc)
        {
            while out.len() < MAX_INLINE_DEPTH {
                let Some(ix) = self.pcvalue(index, func.entry, at) else {
                    break;
                };
                let Ok(ix) = u64::try_from(ix) else { break };
                let Some((name_off, parent_pc)) = self.inlined_call(tree, ix) else {
                    break;
                };
                let Some(inlined) = self.name_at(name_off) else {
                    break;
                };
                let (file, line) = self.position(func, at);
                out.push(frame(inlined, file, line));
                let Some(parent) = func.entry.checked_add(u64::from(parent_pc)) else {
                    break;
                };
                at = parent;
            }
        }
        let (file, line) = self.position(func, at);
        out.push(frame(name, file, line));
        Some(out)
    }

    /// (name offset, parent pc offset) of entry `ix` of the inline tree at address `tree`.
    fn inlined_call(&self, tree: u64, ix: u64) -> Option<(u32, u32)> {
        let size = self.version.inlined_call_size() as u64;
        let at = tree
            .checked_add(ix.checked_mul(size)?)?
            .checked_sub(self.inline.base)?;
        let at = usize::try_from(at).ok()?;
        let data = &self.inline.data;
        let (name_off, parent_pc) = match self.version {
            // {i16 parent, u8 funcID, pad, i32 file, i32 line, i32 nameOff, i32 parentPc}
            Version::Go116 | Version::Go118 => (i32_at(data, at + 12)?, i32_at(data, at + 16)?),
            // {u8 funcID, [3]pad, i32 nameOff, i32 parentPc, i32 startLine}
            Version::Go120 => (i32_at(data, at + 4)?, i32_at(data, at + 8)?),
        };
        Some((u32::try_from(name_off).ok()?, u32::try_from(parent_pc).ok()?))
    }

    /// Steps through the pc-value table at `offset` of the function starting at `entry`:
    /// pairs of (zig-zag value delta, pc delta × quantum), starting at -1. `visit` gets each
    /// (value, end pc) and returns false to stop.
    fn walk_pcvalue(&self, offset: u32, entry: u64, mut visit: impl FnMut(i32, u64) -> bool) -> Option<()> {
        if offset == 0 {
            return None;
        }
        let mut at = self.pctab.checked_add(offset as usize)?;
        let (mut value, mut pc, mut first) = (-1i32, entry, true);
        // A function's table has one pair per change of value; 1<<16 pairs is far beyond any
        // real function and bounds the loop on corrupt data.
        for _ in 0..(1 << 16) {
            let uvdelta = uvarint(&self.data, &mut at)?;
            if uvdelta == 0 && !first {
                return Some(());
            }
            first = false;
            let vdelta = if uvdelta & 1 != 0 {
                !(uvdelta >> 1) as i32
            } else {
                (uvdelta >> 1) as i32
            };
            value = value.wrapping_add(vdelta);
            let pcdelta = u64::from(uvarint(&self.data, &mut at)?).checked_mul(self.quantum)?;
            // Go's linker writes a pair per change of value, each over at least one
            // instruction: a zero pc step is corrupt, and would let one table spin through
            // 1<<16 steps on no code at all (per function, and every function may share it).
            if pcdelta == 0 {
                return None;
            }
            pc = pc.checked_add(pcdelta)?;
            if !visit(value, pc) {
                return Some(());
            }
        }
        None
    }

    /// Value of the pc-value table at `offset` for `target`.
    fn pcvalue(&self, offset: u32, entry: u64, target: u64) -> Option<i32> {
        let mut found = None;
        self.walk_pcvalue(offset, entry, |value, end| {
            if target < end {
                found = Some(value);
                return false;
            }
            true
        })?;
        found
    }

    /// Largest value of the pc-value table at `offset` (the size of an inline tree - 1).
    fn pcvalue_max(&self, offset: u32, entry: u64) -> Option<u32> {
        let mut max = -1i32;
        self.walk_pcvalue(offset, entry, |value, _| {
            max = max.max(value);
            true
        })?;
        u32::try_from(max).ok()
    }
}

fn frame(name: &str, file: Option<&str>, line: i64) -> FunctionName {
    FunctionName {
        name: name.to_owned(),
        system_name: name.to_owned(),
        file: file.map(str::to_owned),
        line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_magic_and_truncated_tables() {
        assert!(GoPclntab::parse(vec![0; 64], None).is_none());
        let mut header = vec![0xf1, 0xff, 0xff, 0xff, 0, 0, 1, 8];
        header.extend(1_000_000u64.to_le_bytes()); // nfunc far beyond the data
        header.extend([0u8; 8 * 7]);
        assert!(GoPclntab::parse(header, None).is_none());
    }

    fn uvarint_into(out: &mut Vec<u8>, mut v: u32) {
        while v >= 0x80 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// A pc-value table from (value, end pc offset) runs, quantum 1.
    fn pcvalue_table(runs: &[(i32, u32)]) -> Vec<u8> {
        let (mut out, mut value, mut pc) = (Vec::new(), -1i32, 0u32);
        for &(v, end) in runs {
            let delta = v - value;
            uvarint_into(&mut out, ((delta << 1) ^ (delta >> 31)) as u32);
            uvarint_into(&mut out, end - pc);
            (value, pc) = (v, end);
        }
        out.push(0);
        out
    }

    type TestImage = GoSections<'static>;

    const PCLNTAB: u64 = 0x50_0000;
    const TEXT: u64 = 0x40_1000;
    const RODATA: u64 = 0x48_0000;
    const GOFUNC: u64 = RODATA + 0x100;
    const NOPTRDATA: u64 = 0x60_0000;
    /// main.outer's lines: 33 (its own body), 26 (middle's body, where it calls leaf), 20
    /// (leaf's body), 34.
    const OUTER_LINES: [(i32, u32); 4] = [(33, 0x08), (26, 0x10), (20, 0x20), (34, 0x40)];

    #[derive(Clone, Copy, PartialEq)]
    enum Layout {
        Go116,
        Go118,
        Go120,
        /// Go 1.26: the 1.20 table with `textStart` 0; `moduledata` in `.go.module`.
        Go126,
    }

    /// A table with main.outer (0x40 bytes, into which main.middle is inlined at 0x08 and,
    /// inside it, main.leaf at 0x10) and main.b (0x20 bytes, nothing inlined), plus the
    /// sections its pointers lead to. `go:func.*` is not in the symbols: moduledata is found
    /// in `.noptrdata` (1.18, 1.20) or `.go.module` (1.26).
    fn synthetic(layout: Layout) -> (Vec<u8>, TestImage) {
        let version = match layout {
            Layout::Go116 => Version::Go116,
            Layout::Go118 => Version::Go118,
            Layout::Go120 | Layout::Go126 => Version::Go120,
        };
        let mut t = Vec::new();
        t.extend(
            match version {
                Version::Go116 => MAGIC_116,
                Version::Go118 => MAGIC_118,
                Version::Go120 => MAGIC_120,
            }
            .to_le_bytes(),
        );
        t.extend([0, 0, 1, 8]);
        t.extend(2u64.to_le_bytes()); // nfunc
        t.extend(1u64.to_le_bytes()); // nfiles
        if version != Version::Go116 {
            let text_start = if layout == Layout::Go126 { 0 } else { TEXT };
            t.extend(text_start.to_le_bytes());
        }
        let offsets_at = t.len();
        t.extend([0u8; 5 * 8]);
        let funcname = t.len();
        t.extend(b"main.outer\0main.b\0main.middle\0main.leaf\0");
        let (outer_name, b_name, middle_name, leaf_name) = (0u32, 11u32, 18u32, 30u32);
        let cu = t.len();
        t.extend(0u32.to_le_bytes());
        let filetab = t.len();
        t.extend(b"/src/main.go\0");
        let pctab = t.len();
        t.push(0);
        let add = |t: &mut Vec<u8>, table: Vec<u8>| {
            let at = (t.len() - pctab) as u32;
            t.extend(table);
            at
        };
        let pcln = add(&mut t, pcvalue_table(&OUTER_LINES));
        let pcln_b = add(&mut t, pcvalue_table(&[(40, 0x20)]));
        let pcfile = add(&mut t, pcvalue_table(&[(0, 0x40)]));
        let inl_index = add(
            &mut t,
            pcvalue_table(&[(-1, 0x08), (0, 0x10), (1, 0x20), (-1, 0x40)]),
        );
        while !t.len().is_multiple_of(8) {
            t.push(0);
        }
        let functab = t.len();
        let entry_size = if version == Version::Go116 { 16 } else { 8 };
        let funcs_at = 3 * entry_size;
        // _func of outer: npcdata 4 (the 4th empty, so Go 1.16 pads its pointers), nfuncdata 4.
        let inline_tree = GOFUNC + 0x10;
        let mut funcs = Vec::new();
        let func =
            |funcs: &mut Vec<u8>, entry_off: u32, name: u32, pcln: u32, pcdata: &[u32], funcdata: &[u64]| {
                let start = funcs.len();
                if version == Version::Go116 {
                    funcs.extend((TEXT + u64::from(entry_off)).to_le_bytes());
                } else {
                    funcs.extend(entry_off.to_le_bytes());
                }
                let mut fields = vec![name, 0, 0, 0, pcfile, pcln, pcdata.len() as u32, 0];
                if version == Version::Go120 {
                    fields.push(30); // startLine
                }
                for v in fields {
                    funcs.extend(v.to_le_bytes());
                }
                funcs.extend([0, 0, 0, funcdata.len() as u8]);
                for v in pcdata {
                    funcs.extend(v.to_le_bytes());
                }
                if version == Version::Go116 {
                    if !(PCLNTAB as usize + functab + funcs_at + funcs.len()).is_multiple_of(8) {
                        funcs.extend([0u8; 4]);
                    }
                    for v in funcdata {
                        funcs.extend(v.to_le_bytes());
                    }
                } else {
                    for &v in funcdata {
                        let off = if v == 0 { u32::MAX } else { (v - GOFUNC) as u32 };
                        funcs.extend(off.to_le_bytes());
                    }
                }
                while !funcs.len().is_multiple_of(8) {
                    funcs.push(0);
                }
                start
            };
        let outer = func(
            &mut funcs,
            0,
            outer_name,
            pcln,
            &[0, 0, inl_index, 0],
            &[0, 0, 0, inline_tree],
        );
        let b = func(&mut funcs, 0x40, b_name, pcln_b, &[], &[]);
        for (entry_off, func_off) in [(0u32, funcs_at + outer), (0x40, funcs_at + b), (0x60, 0)] {
            if version == Version::Go116 {
                t.extend((TEXT + u64::from(entry_off)).to_le_bytes());
                t.extend((func_off as u64).to_le_bytes());
            } else {
                t.extend(entry_off.to_le_bytes());
                t.extend((func_off as u32).to_le_bytes());
            }
        }
        t.extend(funcs);
        for (i, v) in [funcname, cu, filetab, pctab, functab].into_iter().enumerate() {
            t[offsets_at + i * 8..offsets_at + i * 8 + 8].copy_from_slice(&(v as u64).to_le_bytes());
        }
        // The inline tree: [0] middle, called from outer at +0x04 (line 33); [1] leaf, called
        // from middle at +0x0c (line 26). Garbage before it, as go:func.* has stack maps there.
        let mut rodata = vec![0xaa; 0x110];
        for (parent, name, parent_pc) in [(-1i16, middle_name, 0x04u32), (0, leaf_name, 0x0c)] {
            if version == Version::Go120 {
                rodata.extend([0, 0, 0, 0]);
                rodata.extend(name.to_le_bytes());
                rodata.extend(parent_pc.to_le_bytes());
                rodata.extend(25u32.to_le_bytes());
            } else {
                rodata.extend(parent.to_le_bytes());
                rodata.extend([0, 0]);
                rodata.extend(0u32.to_le_bytes());
                rodata.extend(0u32.to_le_bytes());
                rodata.extend(name.to_le_bytes());
                rodata.extend(parent_pc.to_le_bytes());
            }
        }
        rodata.extend([0xbb; 64]);
        // moduledata: pcHeader, six slices {ptr, len, cap}, findfunctab, minpc, maxpc, text…
        let mut module = vec![0u64; 48];
        module[0] = PCLNTAB;
        for (word, offset) in [
            (1, funcname),
            (4, cu),
            (7, filetab),
            (10, pctab),
            (13, functab),
            (16, functab),
        ] {
            module[word] = PCLNTAB + offset as u64;
        }
        module[22] = TEXT;
        module[23] = TEXT + 0x60;
        let gofunc_word = if version == Version::Go118 { 38 } else { 40 };
        module[gofunc_word] = GOFUNC;
        let module: Vec<u8> = module.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut sections = vec![(".rodata".to_owned(), RODATA, Cow::Owned(rodata))];
        match layout {
            Layout::Go116 => {}
            Layout::Go126 => sections.push((".go.module".to_owned(), 0x70_0000, Cow::Owned(module))),
            Layout::Go118 | Layout::Go120 => {
                let mut noptrdata = vec![0u8; 0x48];
                noptrdata.extend(module);
                noptrdata.extend([0u8; 16]);
                sections.push((".noptrdata".to_owned(), NOPTRDATA, Cow::Owned(noptrdata)));
            }
        }
        let image = TestImage::new(sections, Vec::new());
        (t, image)
    }

    fn names(frames: &[FunctionName]) -> Vec<(String, i64)> {
        frames.iter().map(|f| (f.name.clone(), f.line)).collect()
    }

    fn expect(frames: &[(&str, i64)]) -> Vec<(String, i64)> {
        frames.iter().map(|(n, l)| ((*n).to_owned(), *l)).collect()
    }

    /// The synthetic Go 1.20 table with main.outer's `pcsp` pointing at `pcsp`, appended.
    fn with_pcsp(pcsp: &[u8]) -> GoPclntab {
        let (mut data, image) = synthetic(Layout::Go120);
        let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes")) as usize;
        // Header: magic, 4 bytes, nfunc, nfiles, textStart, then funcname, cu, filetab,
        // pctab, functab offsets; outer's _func follows the 3 functab entries.
        let (pctab, functab) = (word(56), word(64));
        let pcsp_field = functab + 3 * 8 + 4 + 3 * 4;
        let at = (data.len() - pctab) as u32;
        data.extend_from_slice(pcsp);
        data[pcsp_field..pcsp_field + 4].copy_from_slice(&at.to_le_bytes());
        GoPclntab::parse_in(data, PCLNTAB, TEXT, Some(&image), true).expect("parses")
    }

    #[test]
    fn frameless_ranges_are_bounded_by_the_code_they_cover() {
        // The bomb: values 0, 1, 0, 1 … each over no code (pc step 0), 1<<15 times over. It
        // once gave 32,768 ranges per function, and every function may share the table.
        let mut bomb = Vec::new();
        uvarint_into(&mut bomb, 2); // -1 → +1: value 0
        uvarint_into(&mut bomb, 1);
        for i in 0..(1 << 15) {
            uvarint_into(&mut bomb, if i % 2 == 0 { 2 } else { 1 }); // +1, -1
            uvarint_into(&mut bomb, 0);
        }
        bomb.push(0);
        let table = with_pcsp(&bomb);
        let ranges = table
            .frameless_ranges(|_| false, 1 << 20)
            .expect("within the bound");
        assert!(ranges.len() <= 1, "a zero pc step ends the table: {ranges:?}");
        // Alternating over one byte each: one range per two bytes of main.outer at most, and
        // past the caller's bound the table is refused.
        let mut runs = Vec::new();
        for pc in 1..=0x40u32 {
            runs.push((if pc % 2 == 0 { 8 } else { 0 }, pc));
        }
        let table = with_pcsp(&pcvalue_table(&runs));
        let ranges = table
            .frameless_ranges(|_| false, 1 << 20)
            .expect("within the bound");
        assert_eq!(ranges.len(), 0x20);
        assert!(
            ranges
                .iter()
                .all(|&(from, to)| TEXT <= from && from < to && to <= TEXT + 0x40)
        );
        assert!(table.frameless_ranges(|_| false, 0x1f).is_none());
    }

    #[test]
    fn synthetic_tables_of_every_layout_name_inlined_calls() {
        for layout in [Layout::Go116, Layout::Go118, Layout::Go120, Layout::Go126] {
            let (data, image) = synthetic(layout);
            // For Go 1.26 `.text` starts before Go's code (a cgo binary's C code comes first):
            // the text start must come from moduledata.
            let text_section = if layout == Layout::Go126 {
                TEXT - 0x100
            } else {
                TEXT
            };
            let table = GoPclntab::parse_in(data.clone(), PCLNTAB, text_section, Some(&image), true)
                .unwrap_or_else(|| panic!("layout {} parses", layout as u8));
            assert!(table.has_inline_trees(), "layout {}", layout as u8);
            let frames = |pc| names(&table.frames(TEXT + pc).expect("frames"));
            assert_eq!(
                frames(0x14),
                expect(&[("main.leaf", 20), ("main.middle", 26), ("main.outer", 33)]),
                "layout {}",
                layout as u8
            );
            assert_eq!(frames(0x0a), expect(&[("main.middle", 26), ("main.outer", 33)]));
            assert_eq!(frames(0x00), expect(&[("main.outer", 33)]));
            assert_eq!(frames(0x30), expect(&[("main.outer", 34)]));
            assert_eq!(frames(0x45), expect(&[("main.b", 40)]));
            assert!(table.frames(TEXT + 0x60).is_none(), "past the last function");
            assert!(table.frames(TEXT - 1).is_none());
            let file = table.frames(TEXT + 0x14).expect("frames")[0].file.clone();
            assert_eq!(file.as_deref(), Some("/src/main.go"));
            assert_eq!(
                table
                    .functions()
                    .map(|(s, e, n)| (s - TEXT, e - TEXT, n.to_owned()))
                    .collect::<Vec<_>>(),
                [
                    (0, 0x40, "main.outer".to_owned()),
                    (0x40, 0x60, "main.b".to_owned())
                ]
            );

            // Without the rest of the binary: no inlined calls, the code's function and line.
            let alone = GoPclntab::parse_in(data, PCLNTAB, TEXT, None, false).expect("parses alone");
            assert!(!alone.has_inline_trees());
            assert_eq!(
                names(&alone.frames(TEXT + 0x14).expect("frames")),
                expect(&[("main.outer", 20)])
            );
        }
    }

    #[test]
    fn inline_trees_are_found_through_symbols_and_survive_damage() {
        // Go 1.20 with `go:func.*` in the symbol table and no moduledata anywhere.
        let (data, mut image) = synthetic(Layout::Go120);
        image.sections.retain(|(n, _, _)| n == ".rodata");
        image.symbols.push(("go:func.*".to_owned(), GOFUNC));
        let table = GoPclntab::parse_in(data.clone(), PCLNTAB, TEXT, Some(&image), true).expect("parses");
        assert_eq!(names(&table.frames(TEXT + 0x14).expect("frames")).len(), 3);
        // moduledata through runtime.firstmoduledata (Go 1.18).
        let (data118, mut image118) = synthetic(Layout::Go118);
        image118
            .symbols
            .push(("runtime.firstmoduledata".to_owned(), NOPTRDATA + 0x48));
        if let Some(section) = image118.sections.iter_mut().find(|(n, _, _)| n == ".noptrdata") {
            section.0 = ".data".to_owned();
        }
        let table = GoPclntab::parse_in(data118, PCLNTAB, TEXT, Some(&image118), true).expect("parses");
        assert_eq!(names(&table.frames(TEXT + 0x14).expect("frames")).len(), 3);
        // A tree that points at garbage (a name offset past the table, a parent pc far away)
        // gives fewer frames, never a panic or a loop.
        let (data, mut image) = synthetic(Layout::Go120);
        if let Some(rodata) = image.sections.iter_mut().find(|(n, _, _)| n == ".rodata") {
            let bytes = rodata.2.to_mut();
            bytes[0x110 + 4..0x110 + 8].copy_from_slice(&u32::MAX.to_le_bytes());
            bytes[0x120 + 8..0x120 + 12].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
        }
        let table = GoPclntab::parse_in(data, PCLNTAB, TEXT, Some(&image), true).expect("parses");
        let frames = table
            .frames(TEXT + 0x14)
            .expect("the code's function is still named");
        assert_eq!(frames.last().map(|f| f.name.as_str()), Some("main.outer"));
        for pc in 0..0x60 {
            let _ = table.frames(TEXT + pc);
        }
    }

    /// A synthetic Go 1.20 table with two functions, to pin the layout independent of the
    /// toolchain on the machine.
    #[test]
    fn synthetic_go120_table_resolves_names_files_and_lines() {
        let mut t = Vec::new();
        // header: magic, pads, quantum 1, ptr 8, nfunc 2, nfiles 1, textStart 0x401000, then
        // offsets filled below.
        t.extend(MAGIC_120.to_le_bytes());
        t.extend([0, 0, 1, 8]);
        t.extend(2u64.to_le_bytes());
        t.extend(1u64.to_le_bytes());
        t.extend(0x40_1000u64.to_le_bytes());
        let offsets_at = t.len();
        t.extend([0u8; 5 * 8]);
        let funcname = t.len();
        t.extend(b"main.a\0main.b\0");
        let cu = t.len();
        t.extend(0u32.to_le_bytes()); // cutab[0] -> filetab offset 0
        let filetab = t.len();
        t.extend(b"/src/main.go\0");
        let pctab = t.len();
        t.push(0); // offset 0 means "no table"
        // pcln: value -1 + 11 = 10 for 0x10 bytes, then +1 = 11 for 0x10 bytes.
        let pcln = (t.len() - pctab) as u32;
        t.extend([22, 0x10, 2, 0x10, 0]);
        // pcfile: value 0 for 0x40 bytes.
        let pcfile = (t.len() - pctab) as u32;
        t.extend([2, 0x40, 0]);
        let functab = t.len();
        let func_a = 3 * 8;
        let func_b = func_a + 48;
        for (entryoff, funcoff) in [(0u32, func_a as u32), (0x20, func_b as u32), (0x40, 0)] {
            t.extend(entryoff.to_le_bytes());
            t.extend(funcoff.to_le_bytes());
        }
        for (entryoff, name_off) in [(0u32, 0u32), (0x20, 7)] {
            let start = t.len();
            t.extend(entryoff.to_le_bytes());
            // nameOff args deferreturn pcsp pcfile pcln npcdata cuOffset startLine
            for v in [name_off, 0, 0, 0, pcfile, pcln, 0, 0, 0] {
                t.extend(v.to_le_bytes());
            }
            t.resize(start + 48, 0);
        }
        for (i, v) in [funcname, cu, filetab, pctab, functab].into_iter().enumerate() {
            t[offsets_at + i * 8..offsets_at + i * 8 + 8].copy_from_slice(&(v as u64).to_le_bytes());
        }
        let table = GoPclntab::parse(t, None).expect("parses");
        assert_eq!(table.len(), 2);
        // Without inline trees, one frame: the function that holds the code.
        let lookup = |pc| {
            table
                .frames(pc)
                .and_then(|mut f| (f.len() == 1).then(|| f.remove(0)))
        };
        let a = lookup(0x40_1005).expect("main.a");
        assert_eq!(
            (a.name.as_str(), a.file.as_deref(), a.line),
            ("main.a", Some("/src/main.go"), 10)
        );
        let a2 = lookup(0x40_1015).expect("main.a later");
        assert_eq!(a2.line, 11);
        let b = lookup(0x40_1020).expect("main.b");
        assert_eq!(b.name, "main.b");
        assert!(table.frames(0x40_1040).is_none(), "past the last function");
        assert!(table.frames(0x40_0fff).is_none());
    }
}
