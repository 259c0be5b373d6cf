//! JIT perf maps: `/tmp/perf-<pid>.map`, written by Node (`--perf-basic-prof`), the JVM
//! (with an agent), .NET (`DOTNET_PerfMapEnabled=1`) and Python 3.12+ (`-X perf`).
//!
//! One line per function: `<start hex> <size hex> <name>`. JITs append as they compile and may
//! reuse an address range for new code; the last line for an address wins, as in perf.
use std::sync::Arc;

/// Perf maps larger than this are read only up to it (a runaway JIT should not cost the
/// daemon its memory budget).
pub const MAX_PERF_MAP_BYTES: usize = 16 * 1024 * 1024;

/// Most bytes all processes' parsed perf maps hold together ([`PerfMap::bytes`]); a map is
/// parsed only up to what is left of it. Parsed, a line costs more than its text (a 6-byte
/// line `1 1 a` is ~60 bytes of entry and name), so the budget is on the parsed form.
pub const PERF_MAPS_BUDGET: u64 = 16 * 1024 * 1024;

/// What one parsed line holds besides its name's bytes: the entry, and the name's
/// reference-counted allocation header.
const ENTRY_BYTES: usize = size_of::<(u64, u64, Arc<str>)>() + 2 * size_of::<usize>();

#[derive(Debug, Default)]
pub struct PerfMap {
    /// (start, end, name), sorted by start; for equal starts the latest line is kept.
    symbols: Vec<(u64, u64, Arc<str>)>,
}

impl PerfMap {
    /// Parses a perf map; malformed lines are skipped and counted.
    pub fn parse(text: &str) -> (Self, usize) {
        let (map, malformed, _) = Self::parse_bounded(text, usize::MAX);
        (map, malformed)
    }

    /// [`Self::parse`] that stops before the map would hold more than `max_bytes`
    /// ([`Self::bytes`]); the third value says whether it stopped early.
    pub fn parse_bounded(text: &str, max_bytes: usize) -> (Self, usize, bool) {
        let mut malformed = 0;
        let mut symbols: Vec<(u64, u64, Arc<str>)> = Vec::new();
        let mut bytes = 0usize;
        let mut cut = false;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut parts = line.splitn(3, ' ');
            let parsed = (|| {
                let start = u64::from_str_radix(parts.next()?.trim_start_matches("0x"), 16).ok()?;
                let size = u64::from_str_radix(parts.next()?.trim_start_matches("0x"), 16).ok()?;
                let name = crate::limits::cap_name(parts.next()?.trim(), "a perf map");
                let end = start.checked_add(size)?;
                (!name.is_empty() && size > 0).then(|| (start, end, Arc::<str>::from(name)))
            })();
            match parsed {
                Some(symbol) => {
                    let size = ENTRY_BYTES + symbol.2.len();
                    if bytes.saturating_add(size) > max_bytes {
                        cut = true;
                        break;
                    }
                    bytes += size;
                    symbols.push(symbol);
                }
                None => malformed += 1,
            }
        }
        // Stable sort keeps file order among equal starts; keep the last of each, in place
        // (no second vector at the peak).
        symbols.sort_by_key(|s| s.0);
        symbols.reverse();
        // Reversed, the latest line of each start comes first, and `dedup_by_key` keeps the
        // first of each run.
        symbols.dedup_by_key(|s| s.0);
        symbols.reverse();
        symbols.shrink_to_fit();
        (Self { symbols }, malformed, cut)
    }

    /// Bytes the parsed map holds (entries and names), what [`PERF_MAPS_BUDGET`] counts.
    pub fn bytes(&self) -> usize {
        self.symbols.iter().map(|s| ENTRY_BYTES + s.2.len()).sum()
    }

    pub fn lookup(&self, addr: u64) -> Option<&Arc<str>> {
        let idx = self.symbols.partition_point(|s| s.0 <= addr).checked_sub(1)?;
        let (_, end, name) = &self.symbols[idx];
        (addr < *end).then_some(name)
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as each runtime writes them: the JVM (perf-map-agent, and the JDK's own
    /// `jcmd <pid> Compiler.perfmap`: 0x-prefixed, zero-padded, names with spaces), .NET
    /// (`DOTNET_PerfMapEnabled=1`: upper-case hex, bracketed tiers), and CPython 3.12+
    /// (`-X perf`: `py::function:file` trampolines).
    #[test]
    fn parses_the_lines_of_every_runtime_that_writes_perf_maps() {
        let text = "0x00007f6a1d0a6c20 0x0000000000000180 Ljava/lang/String;::hashCode\n\
                    0x00007f6a1d0a7000 0x00000000000002a0 void java.util.HashMap.resize() [c2]\n\
                    7F2C5C0A0D40 1B [PreJIT] instance void [System.Private.CoreLib] System.Object::.ctor()[OptimizedTier1]\r\n\
                    7f3a2c0b1000 b py::fib:/srv/app/fib.py\n\
                    7f3a2c0b100b b py::<module>:/srv/app/fib.py\n";
        let (map, malformed) = PerfMap::parse(text);
        assert_eq!((map.len(), malformed), (5, 0));
        let name = |addr: u64| map.lookup(addr).map(|n| n.to_string());
        assert_eq!(
            name(0x7f6a_1d0a_6c20).as_deref(),
            Some("Ljava/lang/String;::hashCode")
        );
        assert_eq!(
            name(0x7f6a_1d0a_7000 + 0x29f).as_deref(),
            Some("void java.util.HashMap.resize() [c2]")
        );
        assert_eq!(
            name(0x7f2c_5c0a_0d40 + 0x1a).as_deref(),
            Some("[PreJIT] instance void [System.Private.CoreLib] System.Object::.ctor()[OptimizedTier1]"),
            "a CRLF line end is not part of the name"
        );
        assert_eq!(name(0x7f3a_2c0b_1005).as_deref(), Some("py::fib:/srv/app/fib.py"));
        assert_eq!(
            name(0x7f3a_2c0b_100b).as_deref(),
            Some("py::<module>:/srv/app/fib.py")
        );
        assert_eq!(name(0x7f3a_2c0b_1016), None);
    }

    #[test]
    fn parses_node_lines_and_lets_the_last_definition_win() {
        let text = "13cac0caac6 2d JS:~hotLoop /tmp/hot.js:1:17\n\
                    7fb4bc005b80 130 JS:^hotLoop /tmp/hot.js:1:17\n\
                    garbage line\n\
                    0x7fb4bc006040 0x2c4 JS:*hotLoop /tmp/hot.js:1:17\n\
                    7fb4bc005b80 10 Builtin:Replaced\n\
                    1000 0 Empty\n";
        let (map, malformed) = PerfMap::parse(text);
        assert_eq!(malformed, 2);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map.lookup(0x7fb4_bc00_6050).map(|n| &**n),
            Some("JS:*hotLoop /tmp/hot.js:1:17")
        );
        assert_eq!(
            map.lookup(0x7fb4_bc00_5b85).map(|n| &**n),
            Some("Builtin:Replaced")
        );
        assert_eq!(
            map.lookup(0x7fb4_bc00_5b95),
            None,
            "past the replaced, shorter range"
        );
        assert_eq!(map.lookup(0x013c_ac0c_aac6 + 0x2d), None);
        assert_eq!(map.lookup(0x10), None);
    }

    #[test]
    fn the_tiniest_lines_cannot_make_a_map_outgrow_its_bound() {
        // 6 bytes of text per line, ~60 parsed: the bound is on the parsed form.
        let text: String = (0..100_000u64)
            .map(|i| format!("{:x} 1 a\n", 0x1000 + 2 * i))
            .collect();
        let (whole, _, cut) = PerfMap::parse_bounded(&text, usize::MAX);
        assert!(!cut);
        assert_eq!(whole.len(), 100_000);
        assert!(
            whole.bytes() > 5 * text.len(),
            "{} parsed from {}",
            whole.bytes(),
            text.len()
        );
        let (bounded, malformed, cut) = PerfMap::parse_bounded(&text, 1 << 20);
        assert!(cut && malformed == 0);
        assert!(bounded.bytes() <= 1 << 20);
        assert!(bounded.len() > 10_000);
        assert_eq!(bounded.lookup(0x1000).map(|n| &**n), Some("a"));
    }
}
