//! pprof encoding with Go's CPU profile conventions.
//!
//! Ids of mappings, functions and locations are 1..N in table order (Parca requires exactly
//! that; `go tool pprof` requires unique non-zero ids), and `string_table[0]` is `""`.
use std::{
    collections::HashMap,
    io::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use flate2::{Compression, write::GzEncoder};
use prost::Message as _;

use crate::pprof;

/// A mapping to add to a profile.
#[derive(Debug, Clone, Default)]
pub struct MappingSpec<'a> {
    pub start: u64,
    pub limit: u64,
    pub file_offset: u64,
    pub filename: &'a str,
    pub build_id: Option<&'a str>,
    pub has_functions: bool,
    /// Locations carry source files and lines (DWARF, `.gopclntab`).
    pub has_lines: bool,
    /// Inlined calls are separate lines of a location (DWARF).
    pub has_inline: bool,
}

/// One line of a location: a function and its source line (0 when unknown).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LineSpec<'a> {
    pub name: &'a str,
    pub system_name: &'a str,
    pub filename: &'a str,
    pub line: i64,
}

/// Builds one profile; see the module docs for the invariants it keeps.
pub struct ProfileBuilder {
    profile: pprof::Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(i64, i64, i64), u64>,
}

impl ProfileBuilder {
    /// A CPU profile: sample types `samples/count` and `cpu/nanoseconds`, period type
    /// `cpu/nanoseconds`, `period` nanoseconds of CPU per sample.
    pub fn cpu(period_ns: i64, start: SystemTime, duration: Duration) -> Self {
        let mut b = Self {
            profile: pprof::Profile::default(),
            strings: HashMap::new(),
            functions: HashMap::new(),
        };
        b.profile.string_table.push(String::new());
        b.strings.insert(String::new(), 0);
        let samples = b.value_type("samples", "count");
        let cpu = b.value_type("cpu", "nanoseconds");
        b.profile.sample_type = vec![samples, cpu];
        b.profile.period_type = Some(cpu);
        b.profile.period = period_ns;
        b.profile.time_nanos = start
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        b.profile.duration_nanos = i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX);
        b
    }

    fn value_type(&mut self, kind: &str, unit: &str) -> pprof::ValueType {
        pprof::ValueType {
            r#type: self.string(kind),
            unit: self.string(unit),
        }
    }

    pub fn string(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.strings.get(s) {
            return id;
        }
        let id = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), id);
        id
    }

    pub fn comment(&mut self, text: &str) {
        let id = self.string(text);
        self.profile.comment.push(id);
    }

    pub fn add_mapping(&mut self, spec: &MappingSpec<'_>) -> u64 {
        let id = self.profile.mapping.len() as u64 + 1;
        let filename = self.string(spec.filename);
        let build_id = spec.build_id.map_or(0, |b| self.string(b));
        self.profile.mapping.push(pprof::Mapping {
            id,
            memory_start: spec.start,
            memory_limit: spec.limit,
            file_offset: spec.file_offset,
            filename,
            build_id,
            has_functions: spec.has_functions,
            has_filenames: spec.has_lines,
            has_line_numbers: spec.has_lines,
            has_inline_frames: spec.has_inline,
        });
        id
    }

    fn function(&mut self, line: &LineSpec<'_>) -> u64 {
        let key = (
            self.string(line.name),
            self.string(line.system_name),
            self.string(line.filename),
        );
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        self.profile.function.push(pprof::Function {
            id,
            name: key.0,
            system_name: key.1,
            filename: key.2,
            start_line: 0,
        });
        self.functions.insert(key, id);
        id
    }

    /// Adds a location (callers dedupe by their own frame identity). `lines` are innermost
    /// first; `mapping_id` 0 means no mapping.
    pub fn add_location(&mut self, mapping_id: u64, address: u64, lines: &[LineSpec<'_>]) -> u64 {
        let id = self.profile.location.len() as u64 + 1;
        let line = lines
            .iter()
            .map(|l| pprof::Line {
                function_id: self.function(l),
                line: l.line,
                column: 0,
            })
            .collect();
        self.profile.location.push(pprof::Location {
            id,
            mapping_id,
            address,
            line,
            is_folded: false,
        });
        id
    }

    pub fn str_label(&mut self, key: &str, value: &str) -> pprof::Label {
        pprof::Label {
            key: self.string(key),
            str: self.string(value),
            num: 0,
            num_unit: 0,
        }
    }

    pub fn num_label(&mut self, key: &str, value: i64) -> pprof::Label {
        pprof::Label {
            key: self.string(key),
            str: 0,
            num: value,
            num_unit: 0,
        }
    }

    /// Adds `count` samples with this stack (location ids, leaf first).
    pub fn add_sample(&mut self, location_id: Vec<u64>, count: i64, label: Vec<pprof::Label>) {
        let value = vec![count, count.saturating_mul(self.profile.period)];
        self.profile.sample.push(pprof::Sample {
            location_id,
            value,
            label,
        });
    }

    pub fn finish(self) -> pprof::Profile {
        self.profile
    }
}

/// Serializes and gzips a profile (pprof files and HTTP bodies are gzip'd).
pub fn gzip(profile: &pprof::Profile) -> Vec<u8> {
    let raw = profile.encode_to_vec();
    let mut encoder = GzEncoder::new(Vec::with_capacity(raw.len() / 4), Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(&raw);
    encoder.finish().unwrap_or_default()
}

/// Gunzips (when gzip'd) and decodes a profile.
pub fn decode(bytes: &[u8]) -> Result<pprof::Profile, DecodeError> {
    use std::io::Read as _;
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes).read_to_end(&mut out)?;
        out
    } else {
        bytes.to_vec()
    };
    Ok(pprof::Profile::decode(raw.as_slice())?)
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("gunzip: {0}")]
    Gzip(#[from] std::io::Error),
    #[error("protobuf: {0}")]
    Proto(#[from] prost::DecodeError),
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn example() -> pprof::Profile {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut b = ProfileBuilder::cpu(10_101_010, start, Duration::from_secs(10));
        let m = b.add_mapping(&MappingSpec {
            start: 0x1000,
            limit: 0x5000,
            file_offset: 0x1000,
            filename: "/usr/bin/app",
            build_id: Some("abcd"),
            has_functions: true,
            has_lines: false,
            has_inline: false,
        });
        let main = LineSpec {
            name: "main",
            system_name: "main",
            filename: "",
            line: 0,
        };
        let hot = LineSpec {
            name: "app::hot",
            system_name: "_ZN3app3hotE",
            filename: "",
            line: 0,
        };
        let l1 = b.add_location(m, 0x1100, std::slice::from_ref(&hot));
        let l2 = b.add_location(m, 0x1200, std::slice::from_ref(&main));
        let l3 = b.add_location(
            0,
            0xdead,
            &[LineSpec {
                name: "[unknown]+0xdead",
                system_name: "",
                filename: "",
                line: 0,
            }],
        );
        let labels = vec![b.num_label("pid", 42), b.str_label("comm", "app")];
        b.add_sample(vec![l1, l2], 3, labels.clone());
        b.add_sample(vec![l3, l2], 1, labels);
        b.finish()
    }

    #[test]
    fn round_trips_with_go_conventions() {
        let p = example();
        let back = decode(&gzip(&p)).expect("decodes");
        assert_eq!(back, p);
        let s = |i: i64| back.string_table[i as usize].as_str();
        assert_eq!(s(0), "");
        let types: Vec<(&str, &str)> = back
            .sample_type
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
        let period = back.period_type.expect("period type");
        assert_eq!((s(period.r#type), s(period.unit)), ("cpu", "nanoseconds"));
        assert_eq!(back.sample[0].value, vec![3, 3 * 10_101_010]);
        assert_eq!(back.time_nanos, 1_700_000_000_000_000_000);
        assert_eq!(back.duration_nanos, 10_000_000_000);
    }

    #[test]
    fn ids_are_sequential_and_strings_unique() {
        let p = example();
        for (i, m) in p.mapping.iter().enumerate() {
            assert_eq!(m.id, i as u64 + 1);
        }
        for (i, f) in p.function.iter().enumerate() {
            assert_eq!(f.id, i as u64 + 1);
        }
        for (i, l) in p.location.iter().enumerate() {
            assert_eq!(l.id, i as u64 + 1);
            for line in &l.line {
                assert!(line.function_id >= 1 && line.function_id as usize <= p.function.len());
            }
        }
        let unique: HashSet<&String> = p.string_table.iter().collect();
        assert_eq!(unique.len(), p.string_table.len(), "strings are deduplicated");
        let max = p.string_table.len() as i64;
        for sample in &p.sample {
            for label in &sample.label {
                assert!(label.key > 0 && label.key < max && label.str < max);
            }
        }
        assert_eq!(p.function.len(), 3, "functions are shared between locations");
    }

    #[test]
    fn decode_reports_garbage() {
        assert!(decode(&[0x1f, 0x8b, 0, 1, 2]).is_err());
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
    }
}
