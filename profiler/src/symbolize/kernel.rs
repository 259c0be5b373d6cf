//! Kernel symbols from /proc/kallsyms and the kernel's build id from /sys/kernel/notes.
use std::{fs, io};

use super::{
    FunctionName, SymbolSource,
    elf::{SymbolTable, hex},
};

/// Kernel text symbols (core kernel, modules, BPF programs when listed).
#[derive(Debug)]
pub struct KernelSymbols {
    table: SymbolTable,
    /// Build id of the running kernel, when /sys/kernel/notes has one.
    pub build_id: Option<String>,
}

impl KernelSymbols {
    /// Reads /proc/kallsyms. Addresses are all zero without CAP_SYSLOG (kptr_restrict), in which
    /// case the table is empty and every kernel frame keeps its raw address.
    pub fn load() -> io::Result<Self> {
        let text = fs::read_to_string("/proc/kallsyms")?;
        let build_id = fs::read("/sys/kernel/notes").ok().and_then(|n| gnu_build_id(&n));
        Ok(Self {
            table: parse_kallsyms(&text),
            build_id,
        })
    }

    pub fn empty() -> Self {
        Self {
            table: SymbolTable::default(),
            build_id: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

impl SymbolSource for KernelSymbols {
    fn resolve(&self, addr: u64) -> Option<Vec<FunctionName>> {
        let name = self.table.lookup(addr)?;
        Some(vec![FunctionName {
            name: name.to_owned(),
            system_name: name.to_owned(),
            file: None,
            line: 0,
        }])
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
