//! A `go tool pprof -top`-like table, for `profiler record` and `cargo xtask run`.
use std::{collections::HashMap, fmt::Write as _};

use crate::pprof;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopEntry {
    pub name: String,
    /// Samples with this function as the leaf.
    pub flat: i64,
    /// Samples with this function anywhere on the stack.
    pub cum: i64,
}

/// Top `n` functions by flat samples (the `samples/count` value), and the total.
pub fn top_functions(profile: &pprof::Profile, n: usize) -> (i64, Vec<TopEntry>) {
    let string = |i: i64| profile.string_table.get(i as usize).map_or("", String::as_str);
    let functions: HashMap<u64, &str> = profile.function.iter().map(|f| (f.id, string(f.name))).collect();
    let locations: HashMap<u64, &pprof::Location> = profile.location.iter().map(|l| (l.id, l)).collect();
    let mut flat: HashMap<&str, i64> = HashMap::new();
    let mut cum: HashMap<&str, i64> = HashMap::new();
    let mut total = 0;
    for sample in &profile.sample {
        let value = sample.value.first().copied().unwrap_or(0);
        total += value;
        let mut seen = Vec::new();
        for (depth, id) in sample.location_id.iter().enumerate() {
            let Some(location) = locations.get(id) else {
                continue;
            };
            for (i, line) in location.line.iter().enumerate() {
                let name = functions.get(&line.function_id).copied().unwrap_or("");
                if depth == 0 && i == 0 {
                    *flat.entry(name).or_default() += value;
                }
                if !seen.contains(&name) {
                    seen.push(name);
                    *cum.entry(name).or_default() += value;
                }
            }
        }
    }
    let mut entries: Vec<TopEntry> = cum
        .into_iter()
        .map(|(name, cum)| TopEntry {
            name: name.to_owned(),
            flat: flat.get(name).copied().unwrap_or(0),
            cum,
        })
        .collect();
    entries.sort_by(|a, b| {
        b.flat
            .cmp(&a.flat)
            .then(b.cum.cmp(&a.cum))
            .then(a.name.cmp(&b.name))
    });
    entries.truncate(n);
    (total, entries)
}

pub fn render(total: i64, entries: &[TopEntry]) -> String {
    let pct = |v: i64| {
        if total == 0 {
            0.0
        } else {
            100.0 * v as f64 / total as f64
        }
    };
    let mut out = format!(
        "{:>8} {:>6} {:>8} {:>6}  function\n",
        "flat", "flat%", "cum", "cum%"
    );
    for e in entries {
        let _ = writeln!(
            out,
            "{:>8} {:>5.1}% {:>8} {:>5.1}%  {}",
            e.flat,
            pct(e.flat),
            e.cum,
            pct(e.cum),
            e.name
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::encode::{LineSpec, ProfileBuilder};

    #[test]
    fn flat_and_cumulative_counts() {
        let mut b = ProfileBuilder::cpu(1, SystemTime::now(), Duration::from_secs(1));
        let line = |name| LineSpec {
            name,
            system_name: name,
            filename: "",
            line: 0,
        };
        let hot = b.add_location(0, 1, &[line("hot")]);
        let cold = b.add_location(0, 2, &[line("cold")]);
        let main = b.add_location(0, 3, &[line("main")]);
        b.add_sample(vec![hot, main], 3, vec![]);
        b.add_sample(vec![cold, main], 1, vec![]);
        b.add_sample(vec![hot, hot, main], 1, vec![]);
        let (total, top) = top_functions(&b.finish(), 2);
        assert_eq!(total, 5);
        assert_eq!(
            top[0],
            TopEntry {
                name: "hot".into(),
                flat: 4,
                cum: 4
            }
        );
        assert_eq!(
            top[1],
            TopEntry {
                name: "cold".into(),
                flat: 1,
                cum: 1
            }
        );
        let text = render(total, &top);
        assert!(text.contains(" 80.0%  hot"), "{text}");
    }
}
