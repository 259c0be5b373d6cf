//! The cardinality guard: at most a configured number of distinct values per label name in
//! one profile, so one label with an id in it cannot explode the backend's series.
use std::collections::{BTreeMap, HashMap, HashSet};

/// Default of [`Reporter::with_label_value_limit`].
pub const DEFAULT_LABEL_VALUE_LIMIT: usize = 1000;

/// What a label value past the limit becomes.
pub const OVERFLOW_VALUE: &str = "_overflow_";

/// The cardinality guard: at most `limit` distinct values per label name in one profile; the
/// values past it are folded into [`OVERFLOW_VALUE`] and counted, so one label with an id in it
/// cannot explode the backend's series.
#[derive(Debug)]
pub struct LabelGuard {
    limit: usize,
    seen: HashMap<String, HashSet<String>>,
    pub folded: BTreeMap<String, u64>,
}

impl LabelGuard {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            seen: HashMap::new(),
            folded: BTreeMap::new(),
        }
    }

    /// The value to emit for `name=value`.
    pub fn admit<'a>(&mut self, name: &str, value: &'a str) -> &'a str {
        let seen = self.seen.entry(name.to_owned()).or_default();
        if seen.contains(value) {
            return value;
        }
        if seen.len() < self.limit {
            seen.insert(value.to_owned());
            return value;
        }
        *self.folded.entry(name.to_owned()).or_default() += 1;
        OVERFLOW_VALUE
    }
}
