//! Go's `.gopclntab`: function names, files and lines of Go binaries, stripped ones included
//! (`-ldflags=-s -w` drops `.symtab` and DWARF but keeps this table, which the Go runtime needs
//! for its own tracebacks).
//!
//! Layouts follow the Go runtime (`runtime/symtab.go`, `runtime/runtime2.go`):
//!
//! | magic | Go | header | functab entry | `_func` |
//! |---|---|---|---|---|
//! | `0xfffffffa` | 1.16–1.17 | no `textStart` | `{uintptr entry, uintptr funcoff}` | starts with `uintptr entry` |
//! | `0xfffffff0` | 1.18–1.19 | `textStart` | `{u32 entryoff, u32 funcoff}` | starts with `u32 entryoff` |
//! | `0xfffffff1` | 1.20+ | `textStart` (0 from 1.26) | as 1.18 | as 1.18, plus `startLine` |
//!
//! Every offset read from the table is bounds-checked: a corrupt or hostile binary yields
//! `None`, never a panic. Inlined calls (the inline tree, reached through `moduledata.gofunc`)
//! are not decoded yet; a frame gets the function that holds the code.
use super::FunctionName;

const MAGIC_116: u32 = 0xffff_fffa;
const MAGIC_118: u32 = 0xffff_fff0;
const MAGIC_120: u32 = 0xffff_fff1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Go116,
    Go118,
    Go120,
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
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
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

impl GoPclntab {
    /// Parses the table. `text_section` is the address of `.text`, used when the header's
    /// `textStart` is 0 (Go 1.26 moved it to `moduledata`; the two are equal for the
    /// binaries Go links itself).
    pub fn parse(data: Vec<u8>, text_section: Option<u64>) -> Option<Self> {
        let version = match u32_at(&data, 0)? {
            MAGIC_116 => Version::Go116,
            MAGIC_118 => Version::Go118,
            MAGIC_120 => Version::Go120,
            _ => return None,
        };
        let (pad1, pad2, quantum, ptr_size) = (*data.get(4)?, *data.get(5)?, *data.get(6)?, *data.get(7)?);
        if pad1 != 0 || pad2 != 0 || !matches!(quantum, 1 | 2 | 4) || ptr_size != 8 {
            return None;
        }
        let word = |i: usize| u64_at(&data, 8 + i * 8).and_then(|v| usize::try_from(v).ok());
        let nfunc = word(0)?;
        let (text_start, first_offset) = match version {
            Version::Go116 => (0, 2),
            Version::Go118 | Version::Go120 => (u64_at(&data, 8 + 2 * 8)?, 3),
        };
        let text_start = if text_start == 0 {
            text_section.unwrap_or(0)
        } else {
            text_start
        };
        let table = Self {
            version,
            quantum: u64::from(quantum),
            ptr_size: usize::from(ptr_size),
            nfunc,
            text_start,
            funcname: word(first_offset)?,
            cu: word(first_offset + 1)?,
            filetab: word(first_offset + 2)?,
            pctab: word(first_offset + 3)?,
            functab: word(first_offset + 4)?,
            data,
        };
        // The functab must hold nfunc + 1 entries.
        let entry_size = table.functab_entry_size();
        let end = nfunc
            .checked_add(1)?
            .checked_mul(entry_size)?
            .checked_add(table.functab)?;
        (end <= table.data.len()).then_some(table)
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

    pub fn len(&self) -> usize {
        self.nfunc
    }

    /// Every function as (entry, end, name), in address order. Unreadable entries are skipped.
    pub fn functions(&self) -> impl Iterator<Item = (u64, u64, &str)> + '_ {
        (0..self.nfunc).filter_map(move |i| {
            let (entry, funcoff) = self.functab_entry(i)?;
            let (end, _) = self.functab_entry(i + 1)?;
            let func = self.functab.checked_add(funcoff)?;
            let fields = match self.version {
                Version::Go116 => func.checked_add(self.ptr_size)?,
                Version::Go118 | Version::Go120 => func.checked_add(4)?,
            };
            let name_off = u32_at(&self.data, fields)? as usize;
            let name = cstr_at(&self.data, self.funcname.checked_add(name_off)?)?;
            Some((entry, end, name))
        })
    }

    /// Bytes held (the table is kept whole).
    pub fn bytes(&self) -> u64 {
        self.data.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.nfunc == 0
    }

    /// Function, file and line at `pc` (a virtual address in the binary).
    pub fn lookup(&self, pc: u64) -> Option<FunctionName> {
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
        let (entry, funcoff) = self.functab_entry(lo)?;
        let func = self.functab.checked_add(funcoff)?;
        // _func: [entry (uintptr for 1.16, u32 for 1.18+)] nameOff args deferreturn pcsp pcfile
        // pcln npcdata cuOffset ...
        let fields = match self.version {
            Version::Go116 => func.checked_add(self.ptr_size)?,
            Version::Go118 | Version::Go120 => func.checked_add(4)?,
        };
        let field = |i: usize| u32_at(&self.data, fields + 4 * i);
        let name_off = field(0)? as usize;
        let (pcfile, pcln, cu_offset) = (field(4)?, field(5)?, field(7)?);
        let name = cstr_at(&self.data, self.funcname.checked_add(name_off)?)?;
        let line = self.pcvalue(pcln, entry, pc).unwrap_or(0);
        let file = self
            .pcvalue(pcfile, entry, pc)
            .and_then(|fileno| u32::try_from(fileno).ok())
            .and_then(|fileno| {
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
            });
        Some(FunctionName {
            name: name.to_owned(),
            system_name: name.to_owned(),
            file: file.map(str::to_owned),
            line: i64::from(line),
        })
    }

    /// Value of the pc-value table at `offset` for `target` in the function starting at
    /// `entry`: pairs of (zig-zag value delta, pc delta × quantum), starting at -1.
    fn pcvalue(&self, offset: u32, entry: u64, target: u64) -> Option<i32> {
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
                return None;
            }
            first = false;
            let vdelta = if uvdelta & 1 != 0 {
                !(uvdelta >> 1) as i32
            } else {
                (uvdelta >> 1) as i32
            };
            value = value.wrapping_add(vdelta);
            let pcdelta = u64::from(uvarint(&self.data, &mut at)?).checked_mul(self.quantum)?;
            pc = pc.checked_add(pcdelta)?;
            if target < pc {
                return Some(value);
            }
        }
        None
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
        let a = table.lookup(0x40_1005).expect("main.a");
        assert_eq!(
            (a.name.as_str(), a.file.as_deref(), a.line),
            ("main.a", Some("/src/main.go"), 10)
        );
        let a2 = table.lookup(0x40_1015).expect("main.a later");
        assert_eq!(a2.line, 11);
        let b = table.lookup(0x40_1020).expect("main.b");
        assert_eq!(b.name, "main.b");
        assert!(table.lookup(0x40_1040).is_none(), "past the last function");
        assert!(table.lookup(0x40_0fff).is_none());
    }
}
