//! Kernel frame names: by the kernel's own symbol lookup, run through a small BPF program
//! ([`BpfKernelNames`]), or from /proc/kallsyms when that program is unavailable; and the
//! kernel's build id from /sys/kernel/notes.
//!
//! Reading /proc/kallsyms is the most expensive single thing a profiler does at start: the
//! kernel formats every one of its ~120,000–200,000 symbols as text (45 ms of system time on
//! the development VM), and the parsed table takes several MiB. A profile needs the names of a
//! few hundred addresses, so the daemon asks the kernel for exactly those: `bpf_snprintf` with
//! `%pS` does the same lookup as a kernel oops, modules and BPF programs included.
use std::{
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, MapData, MapError},
    programs::ProgramFd,
};
use foldhash::{HashMap, HashSet};
use profiler_common::{KSYM_BATCH, KSYM_NAME_BYTES, KsymBatch};
use tracing::warn;

use crate::object::hex;

use super::{FunctionName, SymbolSource, Unresolved, elf::SymbolTable};

/// kallsyms changes only when modules or BPF programs load. The fallback table is read once,
/// and again only after a kernel address found no symbol, at most this often.
const KALLSYMS_MIN_REREAD: Duration = Duration::from_secs(60);

/// Kernel addresses whose names are kept between reports. Names change only when modules or
/// BPF programs come and go; when full, the map starts over.
const MAX_CACHED_NAMES: usize = 1 << 16;

/// Kernel text symbols (core kernel, modules, BPF programs when listed).
#[derive(Debug)]
pub struct KernelSymbols {
    table: SymbolTable,
}

impl KernelSymbols {
    /// Reads /proc/kallsyms. Addresses are all zero without CAP_SYSLOG (kptr_restrict), in which
    /// case the table is empty and every kernel frame keeps its raw address.
    pub fn load() -> io::Result<Self> {
        let text = fs::read_to_string("/proc/kallsyms")?;
        Ok(Self {
            table: parse_kallsyms(&text),
        })
    }

    pub fn empty() -> Self {
        Self {
            table: SymbolTable::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

impl SymbolSource for KernelSymbols {
    fn resolve(&self, addr: u64) -> Option<Vec<FunctionName>> {
        let name = self.table.lookup(addr)?;
        Some(vec![kernel_function(name)])
    }
}

fn kernel_function(name: &str) -> FunctionName {
    FunctionName {
        name: name.to_owned(),
        system_name: name.to_owned(),
        file: None,
        line: 0,
    }
}

/// The running kernel's GNU build id.
pub fn kernel_build_id() -> Option<String> {
    fs::read("/sys/kernel/notes").ok().and_then(|n| gnu_build_id(&n))
}

#[derive(Debug, thiserror::Error)]
pub enum KsymError {
    #[error("KSYM_IO map: {0}")]
    Map(#[from] MapError),
    #[error("BPF_PROG_TEST_RUN of ksym_names: {0}")]
    Run(io::Error),
}

/// `bpf_attr` for `BPF_PROG_TEST_RUN` (the `test` member, through `batch_size`).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The kernel's symbol lookup, through the `ksym_names` program (profiler-ebpf).
pub struct BpfKernelNames {
    program: ProgramFd,
    io: Array<MapData, KsymBatch>,
}

impl BpfKernelNames {
    pub fn new(program: ProgramFd, io: Array<MapData, KsymBatch>) -> Self {
        Self { program, io }
    }

    /// What the kernel says about each of `addrs`.
    pub fn name(&mut self, addrs: &[u64]) -> Result<Vec<KernelLookup>, KsymError> {
        let mut names = Vec::with_capacity(addrs.len());
        for chunk in addrs.chunks(KSYM_BATCH) {
            let mut batch = KsymBatch {
                addrs: [0; KSYM_BATCH],
                names: [[0; KSYM_NAME_BYTES]; KSYM_BATCH],
            };
            batch.addrs[..chunk.len()].copy_from_slice(chunk);
            self.io.set(0, batch, 0)?;
            self.run(chunk.len() as u64)?;
            let out = self.io.get(&0, 0)?;
            names.extend(out.names[..chunk.len()].iter().map(|raw| parse_symbol(raw)));
        }
        Ok(names)
    }

    fn run(&self, count: u64) -> Result<(), KsymError> {
        let args = [count];
        let mut attr = TestRunAttr {
            prog_fd: self.program.as_fd().as_raw_fd() as u32,
            ctx_in: args.as_ptr() as u64,
            ctx_size_in: size_of_val(&args) as u32,
            ..TestRunAttr::default()
        };
        // SAFETY: `attr` is a valid BPF_PROG_TEST_RUN attribute for its size; `args` outlives the
        // call, and the kernel only reads it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestRunAttr,
                size_of::<TestRunAttr>() as u32,
            )
        };
        if rc < 0 {
            return Err(KsymError::Run(io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// What the kernel's lookup said about one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelLookup {
    Named(String),
    /// No symbol covers the address (`%pS` printed it as `0x…`).
    NoSymbol,
    /// Nothing usable came back (the helper failed, or the name was cut before its offset):
    /// not remembered, asked again in the next report.
    Failed,
}

/// The function of one `%pS` result: `name+0xoff/0xsize`, with ` [module]` after it for
/// module code. An address without a symbol prints as `0x…`.
pub fn parse_symbol(raw: &[u8]) -> KernelLookup {
    let nul = raw.iter().position(|&b| b == 0);
    let Ok(text) = std::str::from_utf8(&raw[..nul.unwrap_or(raw.len())]) else {
        return KernelLookup::Failed;
    };
    if text.is_empty() {
        return KernelLookup::Failed;
    }
    if text.starts_with("0x") {
        return KernelLookup::NoSymbol;
    }
    let text = match text.find(" [") {
        Some(at) => &text[..at],
        None => text,
    };
    match text.rsplit_once('+') {
        // A cut result may end inside the offset (`name+0`).
        Some((name, offset))
            if !name.is_empty()
                && (offset.starts_with("0x") || (nul.is_none() && "0x".starts_with(offset))) =>
        {
            KernelLookup::Named(name.to_owned())
        }
        // Without the offset the name itself may have been cut.
        _ if nul.is_none() => KernelLookup::Failed,
        _ => KernelLookup::Named(text.to_owned()),
    }
}

/// Names of kernel frames for the reporter: the BPF lookup when it loaded, else the kallsyms
/// table.
pub struct KernelNames {
    bpf: Option<BpfKernelNames>,
    /// Names the BPF lookup returned, by address.
    names: HashMap<u64, Option<Arc<str>>>,
    table: KernelSymbols,
    table_read: Option<Instant>,
    /// A kernel address missed the table in the last report.
    table_missed: bool,
    build_id: Option<Option<String>>,
}

impl KernelNames {
    pub fn new(bpf: Option<BpfKernelNames>) -> Self {
        Self {
            bpf,
            names: HashMap::default(),
            table: KernelSymbols::empty(),
            table_read: None,
            table_missed: false,
            build_id: None,
        }
    }

    /// Makes the names of `addrs` ready for [`KernelNames::resolve`]. Without kernel
    /// addresses it does nothing (kallsyms, in the fallback, is read on first need).
    pub fn prepare(&mut self, addrs: impl Iterator<Item = u64>) {
        let mut addrs = addrs.peekable();
        if addrs.peek().is_none() {
            return;
        }
        if self.build_id.is_none() {
            self.build_id = Some(kernel_build_id());
        }
        if let Some(bpf) = &mut self.bpf {
            let wanted: HashSet<u64> = addrs.filter(|a| !self.names.contains_key(a)).collect();
            if wanted.is_empty() {
                return;
            }
            let wanted: Vec<u64> = wanted.into_iter().collect();
            match bpf.name(&wanted) {
                Ok(names) => {
                    if self.names.len() + names.len() > MAX_CACHED_NAMES {
                        self.names.clear();
                    }
                    for (addr, lookup) in wanted.into_iter().zip(names) {
                        match lookup {
                            KernelLookup::Named(name) => {
                                self.names.insert(addr, Some(Arc::from(name)));
                            }
                            KernelLookup::NoSymbol => {
                                self.names.insert(addr, None);
                            }
                            KernelLookup::Failed => {}
                        }
                    }
                    return;
                }
                Err(error) => {
                    warn!(%error, "kernel symbol lookup through BPF failed: reading /proc/kallsyms instead");
                    self.bpf = None;
                    self.names.clear();
                }
            }
        }
        self.refresh_table();
    }

    fn refresh_table(&mut self) {
        let due = match self.table_read {
            None => true,
            Some(read) => self.table_missed && read.elapsed() >= KALLSYMS_MIN_REREAD,
        };
        if !due {
            return;
        }
        self.table_missed = false;
        self.table_read = Some(Instant::now());
        match KernelSymbols::load() {
            Ok(symbols) if symbols.is_empty() => {
                warn!("/proc/kallsyms shows no addresses (kptr_restrict?): kernel frames stay unnamed");
                self.table = symbols;
            }
            Ok(symbols) => self.table = symbols,
            Err(error) => warn!(%error, "reading /proc/kallsyms failed: kernel frames stay unnamed"),
        }
    }

    /// The function at `addr`, after [`KernelNames::prepare`] saw it.
    pub fn resolve(&mut self, addr: u64) -> Result<FunctionName, Unresolved> {
        if self.bpf.is_some() {
            return match self.names.get(&addr) {
                Some(Some(name)) => Ok(kernel_function(name)),
                _ => Err(Unresolved::NoSymbol),
            };
        }
        if self.table.is_empty() {
            return Err(Unresolved::KernelSymbolsUnavailable);
        }
        match self.table.table.lookup(addr) {
            Some(name) => Ok(kernel_function(name)),
            None => {
                self.table_missed = true;
                Err(Unresolved::NoSymbol)
            }
        }
    }

    /// Whether names come from the kernel's lookup (else /proc/kallsyms).
    pub fn uses_bpf(&self) -> bool {
        self.bpf.is_some()
    }

    pub fn build_id(&self) -> Option<&str> {
        self.build_id.as_ref().and_then(|b| b.as_deref())
    }
}

/// Parses `address type name [module]` lines, keeping text symbols (`t`, `T`, `w`, `W`).
pub fn parse_kallsyms(text: &str) -> SymbolTable {
    let symbols = text.lines().filter_map(|line| {
        let mut cols = line.split_ascii_whitespace();
        let addr = u64::from_str_radix(cols.next()?, 16).ok()?;
        let kind = cols.next()?;
        let name = cols.next()?;
        (addr != 0 && matches!(kind, "t" | "T" | "w" | "W")).then_some((addr, 0, name))
    });
    SymbolTable::from_symbols(symbols)
}

/// Finds the GNU build-id note (type 3, owner "GNU") in a raw ELF note section.
pub fn gnu_build_id(notes: &[u8]) -> Option<String> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let word =
        |at: usize| -> Option<u32> { Some(u32::from_ne_bytes(notes.get(at..at + 4)?.try_into().ok()?)) };
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    let mut at = 0;
    while at + 12 <= notes.len() {
        let namesz = word(at)? as usize;
        let descsz = word(at + 4)? as usize;
        let kind = word(at + 8)?;
        let name_at = at + 12;
        let desc_at = name_at.checked_add(align4(namesz)?)?;
        let next = desc_at.checked_add(align4(descsz)?)?;
        let name = notes.get(name_at..name_at + namesz)?;
        if kind == NT_GNU_BUILD_ID && name == b"GNU\0" {
            return Some(hex(notes.get(desc_at..desc_at + descsz)?));
        }
        at = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kallsyms_keeps_text_symbols() {
        let text = "ffffffff81000000 T _stext\n\
                    ffffffff81000100 t do_thing\n\
                    ffffffff81000200 D some_data\n\
                    ffffffff81000300 T other\n\
                    ffffffffc0000000 t mod_fn\t[xfs]\n\
                    0000000000000000 T hidden\n";
        let table = parse_kallsyms(text);
        assert_eq!(table.len(), 4);
        assert_eq!(table.lookup(0xffffffff81000150), Some("do_thing"));
        assert_eq!(
            table.lookup(0xffffffff81000250),
            Some("do_thing"),
            "data is not a boundary"
        );
        assert_eq!(table.lookup(0xffffffffc0000010), Some("mod_fn"));
    }

    #[test]
    fn kernel_lookup_results_give_the_function() {
        use KernelLookup::{Failed, Named, NoSymbol};
        let named = |n: &str| Named(n.to_owned());
        let cases: [(&[u8], KernelLookup); 9] = [
            (b"do_syscall_64+0x5e/0x170\0garbage", named("do_syscall_64")),
            (b"nvme_irq+0x12/0x40 [nvme]\0", named("nvme_irq")),
            (
                b"bpf_prog_6deef7357e7b4530_sample_cpu+0x2c/0x3f0 [bpf]\0",
                named("bpf_prog_6deef7357e7b4530_sample_cpu"),
            ),
            (
                b"_RNvCs1_4core3fmt5write+0x10/0x200\0",
                named("_RNvCs1_4core3fmt5write"),
            ),
            (b"0xffffffffc0123456\0", NoSymbol),
            // The helper failed: the zeroed buffer comes back.
            (b"\0\0\0", Failed),
            // Cut in the offset: the name is whole.
            (b"long_function_name+0", named("long_function_name")),
            // Cut in the name: unusable.
            (b"cut_in_the_middle_of_a_na", Failed),
            (b"\xff\xfe+0x1/0x2\0", Failed),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_symbol(raw), want, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn build_id_note_is_found_after_other_notes() {
        let mut notes = Vec::new();
        for (name, kind, desc) in [
            (&b"Xen\0"[..], 1u32, &[1u8, 2, 3][..]),
            (b"GNU\0", 3, &[0xab, 0xcd, 0xef, 0x01]),
        ] {
            notes.extend((name.len() as u32).to_ne_bytes());
            notes.extend((desc.len() as u32).to_ne_bytes());
            notes.extend(kind.to_ne_bytes());
            notes.extend(name);
            notes.resize(notes.len().next_multiple_of(4), 0);
            notes.extend(desc);
            notes.resize(notes.len().next_multiple_of(4), 0);
        }
        assert_eq!(gnu_build_id(&notes).as_deref(), Some("abcdef01"));
        assert_eq!(gnu_build_id(&notes[..20]), None);
    }
}
