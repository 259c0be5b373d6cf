//! Compiles a file's call-frame information (CFI) into the sorted rows the BPF unwinder
//! searches.
//!
//! The DWARF CFA state machine runs here, once per FDE (gimli); BPF only applies the result.
//! A row says, from its address up to the next row's, where the caller's frame (CFA) is and
//! where rbp was saved. Sources, first that exists: `.eh_frame`, `.debug_frame` in the file,
//! `.debug_frame` in its separate debug file. Addresses between FDEs get explicit GAP rows
//! (framehop's rule: a leaf returns through `[rsp]`, anything else follows the frame pointer),
//! and Go code (`.gopclntab`) gets frame-pointer rows, because Go keeps frame pointers and
//! emits no CFI.
use std::collections::HashMap;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, CommonInformationEntry, DebugFrame, EhFrame, Encoding, Format,
    FrameDescriptionEntry, NativeEndian, Operation, Register, RegisterRule, UnwindContext,
    UnwindContextStorage, UnwindSection, UnwindTableRow, X86_64,
};
use object::{Object as _, ObjectSection as _, ReadRef};
use profiler_common::{UnwindRow, cfa, invalid};

type Slice<'a> = gimli::EndianSlice<'a, NativeEndian>;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("not an x86-64 ELF file")]
    Architecture,
    #[error("no call-frame information (.eh_frame or .debug_frame)")]
    NoCfi,
    #[error("malformed {section}: {source}")]
    Malformed {
        section: &'static str,
        source: gimli::Error,
    },
    #[error("{section} is unreadable: {source}")]
    Section {
        section: &'static str,
        source: crate::object::SectionError,
    },
    #[error("code spans {span:#x} bytes, more than a table can address (4 GiB)")]
    TooLarge { span: u64 },
    #[error("more than {max} unwind rows (counted while compiling, before they are stored)")]
    TooManyRows { max: usize },
}

/// Most rows one file's table may have while it is compiled (1,048,576: 8 MiB once stored;
/// the largest table benchmarked has 228k rows). Checked as rows are added, so a hostile file
/// is refused before it costs more than [`MAX_FILE_ROWS`] × [`MAX_ROW_BYTES_WHILE_COMPILING`].
pub const MAX_FILE_ROWS: usize = 1 << 20;

/// Most bytes one row costs while its file compiles: the [`AbsRow`] vector with up to as much
/// again of growth slack (32), one sorted or joined copy (16), and the stored row (8).
pub const MAX_ROW_BYTES_WHILE_COMPILING: usize = 2 * size_of::<AbsRow>() + size_of::<AbsRow>() + 8;

/// A row with its absolute ELF virtual address (before rebasing to the table's base).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbsRow {
    pub vaddr: u64,
    pub rule: UnwindRow,
}

/// One file's compiled table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Virtual address that row `pc` values are relative to.
    pub base: u64,
    /// Sorted by `pc`, no two neighbours with the same rule.
    pub rows: Vec<UnwindRow>,
    /// Rows with a rule BPF cannot follow ([`cfa::INVALID`]), for the statistics.
    pub invalid_rows: u64,
    /// FDEs whose instructions could not be evaluated (skipped, their range becomes a gap).
    pub bad_fdes: u64,
}

impl Table {
    pub fn bytes(&self) -> u64 {
        (self.rows.len() * size_of::<UnwindRow>()) as u64
    }

    /// The row covering `vaddr`, exactly as the BPF program finds it.
    pub fn lookup(&self, vaddr: u64) -> UnwindRow {
        let Some(offset) = vaddr.checked_sub(self.base).filter(|o| *o <= u64::from(u32::MAX)) else {
            return UnwindRow::default();
        };
        let target = offset as u32;
        let index = self.rows.partition_point(|row| row.pc <= target);
        if index == 0 {
            UnwindRow::default()
        } else {
            self.rows[index - 1]
        }
    }
}

/// What [`compile`] found to compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CfiSource {
    EhFrame,
    DebugFrame,
    /// `.debug_frame` of the separate debug file.
    DebugFile,
    /// Go code without CFI: frame-pointer rows, and stops at the functions that start stacks.
    GoFramePointers,
}

/// Compiles the table of `file`; `debug_file` is consulted only when `file` has no CFI.
pub fn compile<'a, 'b, R: ReadRef<'a>, D: ReadRef<'b>>(
    file: &object::File<'a, R>,
    debug_file: Option<&object::File<'b, D>>,
) -> Result<(Table, CfiSource), TableError> {
    if file.architecture() != object::Architecture::X86_64 {
        return Err(TableError::Architecture);
    }
    let go_text = go_text_range(file);
    let mut rows = Vec::new();
    let mut stats = Stats::default();
    let source = if let Some(section) = file.section_by_name(".eh_frame") {
        let data = section_data(&section, ".eh_frame")?;
        let mut bases = BaseAddresses::default().set_eh_frame(section.address());
        if let Some(hdr) = file.section_by_name(".eh_frame_hdr") {
            bases = bases.set_eh_frame_hdr(hdr.address());
        }
        if let Some(text) = file.section_by_name(".text") {
            bases = bases.set_text(text.address());
        }
        if let Some(got) = file.section_by_name(".got") {
            bases = bases.set_got(got.address());
        }
        let mut eh_frame = EhFrame::new(&data, NativeEndian);
        eh_frame.set_address_size(8);
        // Compilers' .eh_frame holds a row per 5 bytes or so (gaps and repeats included, a few
        // more): reserving that up front spares the copies of growing the vector row by row.
        rows.reserve((data.len() / 4).min(MAX_RESERVED_ROWS));
        collect(&eh_frame, &bases, ".eh_frame", &mut rows, &mut stats)?;
        CfiSource::EhFrame
    } else if go_text.is_some() {
        // Go's .debug_frame does not say where rbp is saved, and Go keeps exact frame
        // pointers: those are used instead.
        CfiSource::GoFramePointers
    } else if let Some(section) = file.section_by_name(".debug_frame") {
        collect_debug_frame(&section, &mut rows, &mut stats)?;
        CfiSource::DebugFrame
    } else if let Some(section) = debug_file.and_then(|f| f.section_by_name(".debug_frame")) {
        collect_debug_frame(&section, &mut rows, &mut stats)?;
        CfiSource::DebugFile
    } else {
        return Err(TableError::NoCfi);
    };
    if let Some((start, end)) = go_text {
        add_go_rows(&mut rows, start, end);
        add_go_table_rows(file, &mut rows)?;
    }
    if rows.len() > MAX_FILE_ROWS {
        return Err(TableError::TooManyRows { max: MAX_FILE_ROWS });
    }
    if rows.is_empty() {
        return Err(TableError::NoCfi);
    }
    let table = finish(rows, stats)?;
    Ok((table, source))
}

/// Go functions at the bottom of a stack: the walk stops there instead of following a frame
/// pointer that the runtime never set up (thread entry, goroutine entry, process entry).
/// Both spellings: `.gopclntab` names assembly functions without the `.abi0` suffix that the
/// symbol table has.
const GO_STACK_BOTTOMS: [&str; 6] = [
    "runtime.mstart",
    "runtime.goexit",
    "runtime.rt0_go",
    "runtime.mstart.abi0",
    "runtime.goexit.abi0",
    "runtime.rt0_go.abi0",
];

/// Go's signal return trampoline, the `sa_restorer` its runtime installs (renamed in Go 1.20):
/// like glibc's `__restore_rt` it runs with rsp at the `ucontext` the kernel saved, so the
/// interrupted registers are read from there. A sample in its `rt_sigreturn` (the end of
/// every signal, and Go sends one for each asynchronous preemption) walks on into the
/// interrupted code instead of taking the ucontext for a return address.
const GO_SIGNAL_RETURNS: [&str; 4] = [
    "runtime.sigreturn",
    "runtime.sigreturn__sigaction",
    "runtime.sigreturn.abi0",
    "runtime.sigreturn__sigaction.abi0",
];

/// Rows from `.gopclntab` (so stripped binaries get them too): rsp-based rows where Go code
/// runs without a frame, STOP rows over the Go functions that start stacks, and SIGNAL rows
/// over the signal return trampoline.
fn add_go_table_rows<'a, R: ReadRef<'a>>(
    file: &object::File<'a, R>,
    rows: &mut Vec<AbsRow>,
) -> Result<(), TableError> {
    let Some(table) = crate::symbolize::gopclntab::GoPclntab::from_elf(file, false) else {
        return Ok(());
    };
    // The rule of a function that has one of its own throughout.
    let own_rule = |name: &str| {
        let cfa_rule = if GO_STACK_BOTTOMS.contains(&name) {
            cfa::STOP
        } else if GO_SIGNAL_RETURNS.contains(&name) {
            cfa::SIGNAL
        } else {
            return None;
        };
        Some(UnwindRow {
            cfa_rule,
            ..UnwindRow::default()
        })
    };
    // (entry, end, rule) of those functions.
    let specials: Vec<(u64, u64, UnwindRow)> = table
        .functions()
        .filter_map(|(entry, end, name)| Some((entry, end, own_rule(name)?)))
        .collect();
    let fp = UnwindRow {
        cfa_rule: cfa::FRAME_POINTER,
        ..UnwindRow::default()
    };
    // Their ends first, then the frameless ranges, then their starts: at one address the row
    // pushed later wins when the rows are merged, so a function starting where one of them
    // ends keeps its own row, and their own rules are never overridden.
    for &(_, end, _) in &specials {
        rows.push(AbsRow { vaddr: end, rule: fp });
    }
    // Where Go code runs without a frame (leaf functions, prologues, epilogues), the return
    // address is at rsp and rbp is still the caller's: CFA = rsp + 8, rbp unchanged.
    let frameless = UnwindRow {
        cfa_rule: cfa::SP_OFFSET,
        cfa: 8,
        ..UnwindRow::default()
    };
    // Two rows per range: the ranges may take what room the file has left.
    let room = MAX_FILE_ROWS.saturating_sub(rows.len() + 2 * specials.len()) / 2;
    let ranges = table
        .frameless_ranges(|name| own_rule(name).is_some(), room)
        .ok_or(TableError::TooManyRows { max: MAX_FILE_ROWS })?;
    for (from, to) in ranges {
        rows.push(AbsRow {
            vaddr: from,
            rule: frameless,
        });
        rows.push(AbsRow { vaddr: to, rule: fp });
    }
    for &(entry, _, rule) in &specials {
        rows.push(AbsRow { vaddr: entry, rule });
    }
    Ok(())
}

/// Largest CFI section read (`.eh_frame` of the largest binaries is tens of MiB).
const MAX_CFI_BYTES: u64 = 256 * 1024 * 1024;

fn section_data<'a, R: ReadRef<'a>>(
    section: &object::Section<'a, '_, R>,
    name: &'static str,
) -> Result<std::borrow::Cow<'a, [u8]>, TableError> {
    crate::object::section_bytes(section, MAX_CFI_BYTES).map_err(|source| TableError::Section {
        section: name,
        source,
    })
}

fn collect_debug_frame<'a, R: ReadRef<'a>>(
    section: &object::Section<'a, '_, R>,
    rows: &mut Vec<AbsRow>,
    stats: &mut Stats,
) -> Result<(), TableError> {
    let data = section_data(section, ".debug_frame")?;
    let mut debug_frame = DebugFrame::new(&data, NativeEndian);
    debug_frame.set_address_size(8);
    collect(
        &debug_frame,
        &BaseAddresses::default(),
        ".debug_frame",
        rows,
        stats,
    )
}

/// The code range of Go functions (`runtime.text`..`runtime.etext`, else `.text` of a file
/// with `.gopclntab`).
fn go_text_range<'a, R: ReadRef<'a>>(file: &object::File<'a, R>) -> Option<(u64, u64)> {
    file.section_by_name(".gopclntab")
        .or_else(|| file.section_by_name(".data.rel.ro.gopclntab"))?;
    let text = file.section_by_name(".text")?;
    let (mut start, mut end) = (text.address(), text.address() + text.size());
    for symbol in object::Object::symbols(file) {
        match object::ObjectSymbol::name(&symbol) {
            Ok("runtime.text") => start = object::ObjectSymbol::address(&symbol),
            Ok("runtime.etext") => end = object::ObjectSymbol::address(&symbol),
            _ => {}
        }
    }
    (start < end).then_some((start, end))
}

/// Most rows [`compile`] reserves before it has read any (64 MiB of them).
const MAX_RESERVED_ROWS: usize = 1 << 22;

/// Most CIEs [`collect`] keeps parsed at once (linkers merge identical CIEs: a handful per
/// binary is usual).
const MAX_CACHED_CIES: usize = 4096;

#[derive(Default)]
struct Stats {
    invalid: u64,
    bad_fdes: u64,
}

fn collect<'a, S>(
    section: &S,
    bases: &BaseAddresses,
    name: &'static str,
    rows: &mut Vec<AbsRow>,
    stats: &mut Stats,
) -> Result<(), TableError>
where
    S: UnwindSection<Slice<'a>>,
{
    let malformed = |source| TableError::Malformed {
        section: name,
        source,
    };
    let mut ctx: UnwindContext<usize, FewRules> = UnwindContext::new_in();
    // For the rare FDE with rules for more registers than `FewRules` holds.
    let mut wide: Option<Box<UnwindContext<usize>>> = None;
    // FDEs share a few CIEs: each is parsed once, not once per FDE. Bounded: a section of
    // many CIEs (one per unit in an unmerged .debug_frame, or a hostile file) parses the rest
    // per FDE as before.
    let mut cies: HashMap<usize, CommonInformationEntry<Slice<'a>>> = HashMap::new();
    let mut entries = section.entries(bases);
    let encoding = Encoding {
        address_size: 8,
        format: Format::Dwarf32,
        version: 4,
    };
    loop {
        let entry = match entries.next() {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            // A broken entry ends the walk of the section (the length fields that link
            // entries cannot be trusted after it); what was read so far is kept.
            Err(error) if !rows.is_empty() => {
                stats.bad_fdes += 1;
                tracing::debug!(section = name, %error, "CFI section ends in a malformed entry");
                break;
            }
            Err(error) => return Err(malformed(error)),
        };
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let fde = partial.parse(|section, bases, offset| {
            let key = gimli::UnwindOffset::into(offset);
            if let Some(cie) = cies.get(&key) {
                return Ok(cie.clone());
            }
            let cie = section.cie_from_offset(bases, offset)?;
            if cies.len() < MAX_CACHED_CIES {
                cies.insert(key, cie.clone());
            }
            Ok(cie)
        });
        let Ok(fde) = fde else {
            stats.bad_fdes += 1;
            continue;
        };
        let (start, end) = (fde.initial_address(), fde.end_address());
        // Zero-address FDEs come from discarded sections in .debug_frame.
        if start == 0 || end <= start {
            continue;
        }
        // This FDE's rows go straight into `rows`, and are taken back out if it turns out bad.
        let first = rows.len();
        let mut ok = push_fde_rows(&fde, section, bases, &mut ctx, encoding, rows);
        if let Err(gimli::Error::TooManyRegisterRules) = ok {
            rows.truncate(first);
            let wide = wide.get_or_insert_with(|| Box::new(UnwindContext::new()));
            ok = push_fde_rows(&fde, section, bases, wide, encoding, rows);
        }
        if ok.is_err() {
            rows.truncate(first);
            stats.bad_fdes += 1;
            continue;
        }
        if rows.len() > MAX_FILE_ROWS {
            return Err(TableError::TooManyRows { max: MAX_FILE_ROWS });
        }
        stats.invalid += rows[first..]
            .iter()
            .filter(|r| r.rule.cfa_rule == cfa::INVALID)
            .count() as u64;
        // Where this FDE ends, a gap starts (the next FDE, if adjacent, replaces it).
        rows.push(AbsRow {
            vaddr: end,
            rule: UnwindRow::default(),
        });
    }
    Ok(())
}

/// Row storage for gimli's CFA state machine with room for 32 register rules. gimli's default
/// holds 192 inline (6 KiB a row) and copies a fresh row for every FDE, which was a quarter of
/// the time spent on libc's table. x86-64 code sets rules for at most the 16 general registers
/// and the return address (glibc's signal trampoline); an FDE that sets more is evaluated
/// again with the default.
struct FewRules;

impl UnwindContextStorage<usize> for FewRules {
    type Rules = [(Register, RegisterRule<usize>); 32];
    type Stack = Box<[UnwindTableRow<usize, Self>; 4]>;
}

/// Evaluates one FDE's CFI and appends its rows.
fn push_fde_rows<'a, S, C>(
    fde: &FrameDescriptionEntry<Slice<'a>>,
    section: &S,
    bases: &BaseAddresses,
    ctx: &mut UnwindContext<usize, C>,
    encoding: Encoding,
    rows: &mut Vec<AbsRow>,
) -> gimli::Result<()>
where
    S: UnwindSection<Slice<'a>>,
    C: UnwindContextStorage<usize>,
{
    let signal = fde.is_signal_trampoline();
    let mut table = fde.rows(section, bases, ctx)?;
    while let Some(row) = table.next_row()? {
        let rule = if signal {
            UnwindRow {
                cfa_rule: cfa::SIGNAL,
                ..UnwindRow::default()
            }
        } else {
            convert(row, section, encoding)
        };
        rows.push(AbsRow {
            vaddr: row.start_address(),
            rule,
        });
    }
    Ok(())
}

fn invalid_row(reason: u16) -> UnwindRow {
    UnwindRow {
        pc: 0,
        cfa: reason,
        cfa_rule: cfa::INVALID,
        rbp: 0,
    }
}

/// Converts gimli's row into ours (x86-64 rules that BPF can follow).
fn convert<'a, S: UnwindSection<Slice<'a>>, C: UnwindContextStorage<usize>>(
    row: &UnwindTableRow<usize, C>,
    section: &S,
    encoding: Encoding,
) -> UnwindRow {
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => {
            return UnwindRow {
                cfa_rule: cfa::STOP,
                ..UnwindRow::default()
            };
        }
        Some(RegisterRule::Offset(-8)) | None => {}
        Some(_) => return invalid_row(invalid::RA_RULE),
    }
    let rbp = match row.register(X86_64::RBP) {
        Some(RegisterRule::Offset(offset)) => {
            if offset % 8 != 0 || !(-1024..=1016).contains(&offset) {
                return invalid_row(invalid::RBP_RULE);
            }
            (offset / 8) as i8
        }
        _ => 0,
    };
    let (cfa_rule, operand) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let kind = match *register {
                X86_64::RSP => cfa::SP_OFFSET,
                X86_64::RBP => cfa::BP_OFFSET,
                _ => return invalid_row(invalid::CFA_REGISTER),
            };
            match u16::try_from(*offset) {
                Ok(offset) => (kind, offset),
                Err(_) => return invalid_row(invalid::OFFSET_RANGE),
            }
        }
        CfaRule::Expression(expression) => match expression
            .get(section)
            .ok()
            .and_then(|e| classify_expression(e, encoding))
        {
            Some(rule) => rule,
            None => return invalid_row(invalid::CFA_EXPRESSION),
        },
    };
    UnwindRow {
        pc: 0,
        cfa: operand,
        cfa_rule,
        rbp,
    }
}

/// Recognizes the CFA expressions compilers emit on x86-64: the two PLT forms and
/// `*(reg + a) + b` (functions that realign the stack).
fn classify_expression(expression: gimli::Expression<Slice<'_>>, encoding: Encoding) -> Option<(u8, u16)> {
    let mut ops = Vec::with_capacity(12);
    let mut iter = expression.operations(encoding);
    while let Some(op) = iter.next().ok()? {
        ops.push(op);
        if ops.len() > 11 {
            return None;
        }
    }
    let constant = |op: &Operation<Slice<'_>>| match op {
        Operation::UnsignedConstant { value } => Some(*value),
        _ => None,
    };
    let reg_offset = |op: &Operation<Slice<'_>>| match op {
        Operation::RegisterOffset { register, offset, .. } => Some((*register, *offset)),
        _ => None,
    };
    // rsp + 8 + (((rip & 15) >= N) << 3)
    if ops.len() == 9
        && reg_offset(&ops[0]) == Some((X86_64::RSP, 8))
        && reg_offset(&ops[1]) == Some((Register(16), 0))
        && constant(&ops[2]) == Some(15)
        && matches!(ops[3], Operation::And)
        && matches!(ops[5], Operation::Ge)
        && constant(&ops[6]) == Some(3)
        && matches!(ops[7], Operation::Shl)
        && matches!(ops[8], Operation::Plus)
    {
        return match constant(&ops[4]) {
            Some(11) => Some((cfa::PLT1, 0)),
            Some(10) => Some((cfa::PLT2, 0)),
            _ => None,
        };
    }
    // *(reg + a) [+ b]
    if (ops.len() == 2 || ops.len() == 3) && matches!(ops[1], Operation::Deref { .. }) {
        let (register, a) = reg_offset(&ops[0])?;
        let b = match ops.get(2) {
            None => 0,
            Some(Operation::PlusConstant { value }) => *value,
            Some(_) => return None,
        };
        let kind = match register {
            X86_64::RSP => cfa::DEREF_SP,
            X86_64::RBP => cfa::DEREF_BP,
            _ => return None,
        };
        let a = u8::try_from(a).ok()?;
        let b = u8::try_from(b).ok()?;
        return Some((kind, u16::from(a) << 8 | u16::from(b)));
    }
    None
}

/// Frame-pointer rows over Go code wherever no FDE says otherwise (cgo's C parts have FDEs).
fn add_go_rows(rows: &mut Vec<AbsRow>, start: u64, end: u64) {
    let mut covered: Vec<(u64, u64)> = Vec::new();
    let mut sorted = rows.clone();
    sorted.sort_by_key(|r| r.vaddr);
    let mut open: Option<u64> = None;
    for row in &sorted {
        match (open, row.rule.cfa_rule == cfa::GAP) {
            (None, false) => open = Some(row.vaddr),
            (Some(from), true) => {
                covered.push((from, row.vaddr));
                open = None;
            }
            _ => {}
        }
    }
    let fp = UnwindRow {
        cfa_rule: cfa::FRAME_POINTER,
        ..UnwindRow::default()
    };
    let mut cursor = start;
    for (from, to) in covered.into_iter().filter(|(f, t)| *t > start && *f < end) {
        if from > cursor {
            rows.push(AbsRow {
                vaddr: cursor,
                rule: fp,
            });
        }
        cursor = cursor.max(to);
    }
    if cursor < end {
        rows.push(AbsRow {
            vaddr: cursor,
            rule: fp,
        });
        rows.push(AbsRow {
            vaddr: end,
            rule: UnwindRow::default(),
        });
    }
}

/// The order of rows: by address, and at one address a gap before the rows of an FDE, so that
/// the FDE's row wins.
fn sort_key(row: &AbsRow) -> (u64, bool) {
    (row.vaddr, row.rule.cfa_rule != cfa::GAP)
}

/// Sorts rows stably by [`sort_key`]. Rows arrive in blocks already in order: each FDE's rows
/// and the gap that ends them. Linkers mostly lay FDEs out in address order, but not wholly
/// (libc's 3,700 FDEs form ~200 ascending runs), so the blocks are ordered by their first row
/// and joined, a sort of thousands of blocks instead of a merge of every row. That is the
/// stable sort's result whenever each block ends strictly below the next one's start: equal
/// keys then never span two blocks. Otherwise (overlapping FDEs) the rows get the general
/// stable sort.
fn sort_rows(rows: &mut Vec<AbsRow>) -> SortPath {
    if rows.is_sorted_by_key(sort_key) {
        return SortPath::InOrder;
    }
    // A block ends after a gap row, or where the next row is below it.
    let mut blocks: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    for i in 1..rows.len() {
        if rows[i - 1].rule.cfa_rule == cfa::GAP || sort_key(&rows[i]) < sort_key(&rows[i - 1]) {
            blocks.push((start, i));
            start = i;
        }
    }
    blocks.push((start, rows.len()));
    blocks.sort_by_key(|&(first, _)| sort_key(&rows[first]));
    let joinable = blocks
        .windows(2)
        .all(|pair| sort_key(&rows[pair[0].1 - 1]) < sort_key(&rows[pair[1].0]));
    if !joinable {
        rows.sort_by_key(sort_key);
        return SortPath::Sorted;
    }
    let mut joined = Vec::with_capacity(rows.len());
    for (first, end) in blocks {
        joined.extend_from_slice(&rows[first..end]);
    }
    *rows = joined;
    SortPath::Joined
}

/// How [`sort_rows`] put the rows in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SortPath {
    InOrder,
    Joined,
    Sorted,
}

/// Sorts, resolves overlaps (a rule beats a gap at the same address), removes rows that repeat
/// the previous rule, and rebases to the lowest address.
fn finish(mut rows: Vec<AbsRow>, stats: Stats) -> Result<Table, TableError> {
    sort_rows(&mut rows);
    // Of the rows at one address the last stays; then rows that repeat the rule before them go.
    rows.dedup_by(|row, kept| {
        let same_address = row.vaddr == kept.vaddr;
        if same_address {
            *kept = *row;
        }
        same_address
    });
    rows.dedup_by(|row, kept| row.rule == kept.rule);
    let leading_gaps = rows.iter().take_while(|r| r.rule.cfa_rule == cfa::GAP).count();
    let Some(first) = rows.get(leading_gaps) else {
        return Ok(Table::default());
    };
    let base = first.vaddr;
    let last = rows.last().map_or(base, |r| r.vaddr);
    let span = last - base;
    if span > u64::from(u32::MAX) {
        return Err(TableError::TooLarge { span });
    }
    let rows = rows[leading_gaps..]
        .iter()
        .map(|r| UnwindRow {
            pc: (r.vaddr - base) as u32,
            ..r.rule
        })
        .collect();
    Ok(Table {
        base,
        rows,
        invalid_rows: stats.invalid,
        bad_fdes: stats.bad_fdes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: u8, operand: u16, rbp: i8) -> UnwindRow {
        UnwindRow {
            pc: 0,
            cfa: operand,
            cfa_rule: kind,
            rbp,
        }
    }

    /// Rows as FDEs leave them (a few rows each, then a gap), with FDEs in a scrambled order,
    /// some adjacent, some overlapping, some at the same address.
    fn scrambled_rows(seed: u64, fdes: usize, overlapping: bool) -> Vec<AbsRow> {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        let mut starts: Vec<u64> = (0..fdes as u64).map(|i| 0x1000 + i * 0x100).collect();
        for i in (1..starts.len()).rev() {
            if next() % 16 == 0 {
                let j = (next() as usize) % (i + 1);
                starts.swap(i, j);
            }
        }
        let mut rows = Vec::new();
        for start in starts {
            let start = if overlapping {
                start - (next() % 3) * 0x80
            } else {
                start
            };
            let len = 1 + next() % 4;
            let end = if next() % 2 == 0 {
                start + 0x100
            } else {
                start + 0x40 * len
            };
            for k in 0..len {
                rows.push(AbsRow {
                    vaddr: start + k * 0x10,
                    rule: row(cfa::SP_OFFSET, (8 + next() % 64) as u16, 0),
                });
            }
            rows.push(AbsRow {
                vaddr: end,
                rule: UnwindRow::default(),
            });
        }
        rows
    }

    #[test]
    fn joining_runs_sorts_like_the_stable_sort() {
        let mut paths = std::collections::HashSet::new();
        for seed in 0..200 {
            for (fdes, overlapping) in [(50, false), (50, true), (3, false), (400, false)] {
                let rows = scrambled_rows(seed, fdes, overlapping);
                let mut expected = rows.clone();
                expected.sort_by_key(sort_key);
                let mut sorted = rows;
                paths.insert(sort_rows(&mut sorted));
                assert_eq!(
                    sorted, expected,
                    "seed {seed}, {fdes} FDEs, overlapping {overlapping}"
                );
            }
        }
        assert_eq!(paths.len(), 3, "every path taken: {paths:?}");
        // Two rows at one address in different blocks (an FDE cut short, without its gap): the
        // later one must stay last, as in the stable sort.
        let at = |vaddr, operand| AbsRow {
            vaddr,
            rule: row(cfa::SP_OFFSET, operand, 0),
        };
        let gap = |vaddr| AbsRow {
            vaddr,
            rule: UnwindRow::default(),
        };
        let rows = vec![at(0x2000, 8), gap(0x2100), at(0x1f00, 16), at(0x2000, 24)];
        let mut expected = rows.clone();
        expected.sort_by_key(sort_key);
        let mut sorted = rows;
        assert_eq!(sort_rows(&mut sorted), SortPath::Sorted);
        assert_eq!(sorted, expected);
    }

    #[test]
    fn finish_merges_gaps_and_duplicates() {
        let sp8 = row(cfa::SP_OFFSET, 8, 0);
        let sp16 = row(cfa::SP_OFFSET, 16, 0);
        let rows = vec![
            AbsRow {
                vaddr: 0x1000,
                rule: sp8,
            },
            AbsRow {
                vaddr: 0x1001,
                rule: sp16,
            },
            AbsRow {
                vaddr: 0x1010,
                rule: UnwindRow::default(),
            },
            // The next FDE starts where the previous ends: its rule replaces the gap.
            AbsRow {
                vaddr: 0x1010,
                rule: sp8,
            },
            AbsRow {
                vaddr: 0x1020,
                rule: UnwindRow::default(),
            },
            AbsRow {
                vaddr: 0x1030,
                rule: sp8,
            },
            AbsRow {
                vaddr: 0x1030,
                rule: sp8,
            },
            AbsRow {
                vaddr: 0x1040,
                rule: UnwindRow::default(),
            },
        ];
        let table = finish(rows, Stats::default()).unwrap();
        assert_eq!(table.base, 0x1000);
        let pcs: Vec<(u32, u8)> = table.rows.iter().map(|r| (r.pc, r.cfa_rule)).collect();
        assert_eq!(
            pcs,
            vec![
                (0, cfa::SP_OFFSET),
                (1, cfa::SP_OFFSET),
                (0x10, cfa::SP_OFFSET),
                (0x20, cfa::GAP),
                (0x30, cfa::SP_OFFSET),
                (0x40, cfa::GAP)
            ]
        );
        assert_eq!(table.lookup(0x0fff).cfa_rule, cfa::GAP);
        assert_eq!(table.lookup(0x1005), sp16.with_pc(1));
        assert_eq!(table.lookup(0x1025).cfa_rule, cfa::GAP);
        assert_eq!(table.lookup(0x1000_0000).cfa_rule, cfa::GAP);
    }

    trait WithPc {
        fn with_pc(self, pc: u32) -> Self;
    }
    impl WithPc for UnwindRow {
        fn with_pc(mut self, pc: u32) -> Self {
            self.pc = pc;
            self
        }
    }

    #[test]
    fn go_rows_fill_only_uncovered_code() {
        let c = row(cfa::SP_OFFSET, 8, 0);
        let mut rows = vec![
            AbsRow {
                vaddr: 0x2000,
                rule: c,
            },
            AbsRow {
                vaddr: 0x2100,
                rule: UnwindRow::default(),
            },
        ];
        add_go_rows(&mut rows, 0x1000, 0x3000);
        let table = finish(rows, Stats::default()).unwrap();
        assert_eq!(table.lookup(0x1500).cfa_rule, cfa::FRAME_POINTER);
        assert_eq!(table.lookup(0x2050).cfa_rule, cfa::SP_OFFSET);
        assert_eq!(table.lookup(0x2200).cfa_rule, cfa::FRAME_POINTER);
        assert_eq!(table.lookup(0x3000).cfa_rule, cfa::GAP);
    }

    /// An `.eh_frame` with one CIE (CFA = rsp + 8, return address at CFA - 8) and one FDE over
    /// [0x1000, 0x1100) that grows the frame at 0x1001 and saves `saved` registers from
    /// DWARF register 17 (xmm0) on. Returns the section and the FDE's offset in it.
    fn eh_frame_saving(saved: u8) -> (Vec<u8>, usize) {
        let mut cie = vec![0, 0, 0, 0, 1, 0, 1, 0x78, 16];
        cie.extend([0x0c, 7, 8, 0x80 | 16, 1]);
        let mut fde_body = Vec::new();
        fde_body.extend(0x1000u64.to_le_bytes());
        fde_body.extend(0x100u64.to_le_bytes());
        fde_body.extend([0x41, 0x0e, 16]);
        for register in 17..17 + saved {
            fde_body.extend([0x80 | register, 2]);
        }
        let mut section = Vec::new();
        section.extend((cie.len() as u32).to_le_bytes());
        section.extend(&cie);
        let fde_start = section.len();
        section.extend((fde_body.len() as u32 + 4).to_le_bytes());
        // The CIE pointer: bytes back from this field to the CIE.
        section.extend((fde_start as u32 + 4).to_le_bytes());
        section.extend(&fde_body);
        section.extend(0u32.to_le_bytes());
        (section, fde_start)
    }

    #[test]
    fn fdes_with_more_register_rules_than_the_small_rows_hold_are_evaluated_in_full() {
        for saved in [4, 40] {
            let (data, fde_offset) = eh_frame_saving(saved);
            let mut eh_frame = EhFrame::new(&data, NativeEndian);
            eh_frame.set_address_size(8);
            let bases = BaseAddresses::default();
            // The small storage alone refuses the 40-register FDE: the fallback is what keeps it.
            let fde = eh_frame
                .fde_from_offset(&bases, gimli::EhFrameOffset(fde_offset), EhFrame::cie_from_offset)
                .expect("FDE");
            let mut few: UnwindContext<usize, FewRules> = UnwindContext::new_in();
            let encoding = Encoding {
                address_size: 8,
                format: Format::Dwarf32,
                version: 4,
            };
            let small = push_fde_rows(&fde, &eh_frame, &bases, &mut few, encoding, &mut Vec::new());
            assert_eq!(small.is_err(), saved > 32, "{small:?}");

            let (mut rows, mut stats) = (Vec::new(), Stats::default());
            collect(&eh_frame, &bases, ".eh_frame", &mut rows, &mut stats).expect("collects");
            assert_eq!(stats.bad_fdes, 0, "{saved} saved registers");
            let table = finish(rows, stats).unwrap();
            assert_eq!(table.lookup(0x1000), row(cfa::SP_OFFSET, 8, 0));
            assert_eq!(table.lookup(0x1050), row(cfa::SP_OFFSET, 16, 0).with_pc(1));
            assert_eq!(table.lookup(0x1100).cfa_rule, cfa::GAP);
        }
    }
}

#[cfg(test)]
mod real_files {
    use gimli::{EhFrameHdr, UnwindSection as _};
    use object::{Object as _, ObjectSection as _};

    use super::*;

    /// Compiles `path` and checks, at every FDE's start, middle and last byte and at a spread
    /// of other addresses, that our row (found as BPF finds it) says what gimli's own
    /// evaluation (via the `.eh_frame_hdr` search table) says.
    pub(super) fn check_against_gimli(path: &str) -> usize {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let file = object::File::parse(data.as_slice()).expect("ELF");
        let (table, source) = compile(&file, None::<&object::File<'_, &[u8]>>).expect("table");
        assert_eq!(source, CfiSource::EhFrame);
        let eh = file.section_by_name(".eh_frame").expect(".eh_frame");
        let hdr = file.section_by_name(".eh_frame_hdr").expect(".eh_frame_hdr");
        let text = file.section_by_name(".text").expect(".text");
        let bases = BaseAddresses::default()
            .set_eh_frame(eh.address())
            .set_eh_frame_hdr(hdr.address())
            .set_text(text.address());
        let eh_data = eh.data().expect("data");
        let mut eh_frame = EhFrame::new(eh_data, NativeEndian);
        eh_frame.set_address_size(8);
        let hdr_data = hdr.data().expect("data");
        let parsed = EhFrameHdr::new(hdr_data, NativeEndian)
            .parse(&bases, 8)
            .expect("hdr");
        let search = parsed.table().expect("search table");
        let encoding = Encoding {
            address_size: 8,
            format: Format::Dwarf32,
            version: 4,
        };
        let mut ctx = UnwindContext::new();
        let mut addresses = Vec::new();
        let mut entries = eh_frame.entries(&bases);
        while let Some(entry) = entries.next().expect("entry") {
            if let CieOrFde::Fde(partial) = entry {
                let fde = partial.parse(|s, b, o| s.cie_from_offset(b, o)).expect("fde");
                let (start, end) = (fde.initial_address(), fde.end_address());
                addresses.extend([start, start + (end - start) / 2, end - 1, end]);
            }
        }
        let (lo, hi) = (text.address(), text.address() + text.size());
        addresses.extend((lo..hi).step_by(97));
        let mut checked = 0;
        for addr in addresses {
            let ours = table.lookup(addr);
            let expected =
                match search.unwind_info_for_address(&eh_frame, &bases, &mut ctx, addr, |s, b, o| {
                    s.cie_from_offset(b, o)
                }) {
                    Ok(row) => {
                        let signal = search
                            .fde_for_address(&eh_frame, &bases, addr, |s, b, o| s.cie_from_offset(b, o))
                            .map(|f| f.is_signal_trampoline())
                            .unwrap_or(false);
                        if signal {
                            UnwindRow {
                                cfa_rule: cfa::SIGNAL,
                                ..UnwindRow::default()
                            }
                        } else {
                            convert(row, &eh_frame, encoding)
                        }
                    }
                    Err(gimli::Error::NoUnwindInfoForAddress) => UnwindRow::default(),
                    Err(error) => panic!("gimli at {addr:#x}: {error}"),
                };
            assert_eq!(
                (ours.cfa_rule, ours.cfa, ours.rbp),
                (expected.cfa_rule, expected.cfa, expected.rbp),
                "{path} at {addr:#x}"
            );
            checked += 1;
        }
        checked
    }

    fn first_existing(candidates: &[&str]) -> Option<String> {
        candidates
            .iter()
            .find(|p| std::path::Path::new(p).exists())
            .map(|p| (*p).to_owned())
    }

    #[test]
    fn libc_rows_match_gimli() {
        let path = first_existing(&[
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
        ])
        .expect("libc.so.6 (Debian layout)");
        assert!(check_against_gimli(&path) > 10_000);
    }

    #[test]
    fn libstdcxx_rows_match_gimli() {
        let path = first_existing(&[
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
            "/lib/x86_64-linux-gnu/libstdc++.so.6",
        ])
        .expect("libstdc++.so.6 (Debian layout)");
        assert!(check_against_gimli(&path) > 10_000);
    }

    #[test]
    fn libc_signal_trampoline_and_plt_rows_are_recognized() {
        let path = first_existing(&[
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
        ])
        .expect("libc.so.6");
        let data = std::fs::read(&path).expect("read libc");
        let file = object::File::parse(data.as_slice()).expect("ELF");
        let (table, _) = compile(&file, None::<&object::File<'_, &[u8]>>).expect("table");
        let kinds: std::collections::HashSet<u8> = table.rows.iter().map(|r| r.cfa_rule).collect();
        assert!(kinds.contains(&cfa::SIGNAL), "__restore_rt is a signal frame");
        assert!(
            kinds.contains(&cfa::PLT1) || kinds.contains(&cfa::PLT2),
            "PLT rows"
        );
        assert!(
            kinds.contains(&cfa::STOP),
            "an undefined return address ends the stack"
        );
        // Only a handful of assembly routines keep the return address in a register
        // (__vfork, clone's child path): the walk stops there and says so.
        let invalid: Vec<_> = table.rows.iter().filter(|r| r.cfa_rule == cfa::INVALID).collect();
        assert!(invalid.len() < 16, "{invalid:?}");
        assert!(invalid.iter().all(|r| r.cfa == invalid::RA_RULE), "{invalid:?}");
    }

    #[test]
    fn corrupt_cfi_is_an_error_or_a_partial_table_never_a_panic() {
        let path = first_existing(&[
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
        ])
        .expect("libc.so.6");
        let clean = std::fs::read(&path).expect("read libc");
        let (offset, size) = {
            let file = object::File::parse(clean.as_slice()).expect("ELF");
            let section = file.section_by_name(".eh_frame").expect(".eh_frame");
            section.file_range().expect("range")
        };
        let (offset, size) = (offset as usize, size as usize);
        for (seed, cut) in [(1u8, 0usize), (7, size / 2), (13, size - 64)] {
            let mut data = clean.clone();
            for (i, byte) in data[offset + cut..offset + size].iter_mut().enumerate() {
                *byte = (i as u8).wrapping_mul(seed).wrapping_add(seed) ^ 0x5a;
            }
            let file = object::File::parse(data.as_slice()).expect("ELF headers intact");
            match compile(&file, None::<&object::File<'_, &[u8]>>) {
                Ok((table, _)) => assert!(cut > 0 && !table.rows.is_empty()),
                Err(error) => assert!(
                    matches!(error, TableError::Malformed { .. } | TableError::NoCfi),
                    "{error}"
                ),
            }
        }
    }

    #[test]
    #[ignore = "diagnostic: UNWIND_CHECK=<path> compares any file"]
    fn any_file_matches_gimli() {
        if let Ok(path) = std::env::var("UNWIND_CHECK") {
            check_against_gimli(&path);
        }
    }
}
