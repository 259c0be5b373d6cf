//! What the channels between the stages carry (the stages themselves are in
//! [`crate::stages`]; the endpoint sends on two of them).
use std::time::SystemTime;

use tokio::sync::oneshot;

use crate::{
    aggregate::{Snapshot, TapFilter},
    sample::{CounterSnapshot, Sample},
};

/// What flows from the sampler (and the interval clock) to the aggregator.
#[derive(Debug)]
pub enum Message {
    /// The samples of one drain of the ring buffer (at most `MAX_BATCH` samples and
    /// `MAX_BATCH_BYTES`, see `crate::stages::sampler`).
    Samples(Vec<Sample>),
    /// Close the current interval at `end` and report it; `last` ends the aggregator.
    Flush {
        end: SystemTime,
        counters: CounterSnapshot,
        last: bool,
    },
    /// Start collecting an on-demand profile beside the interval.
    OpenTap {
        id: u64,
        filter: TapFilter,
        counters: CounterSnapshot,
    },
    /// Finish an on-demand profile and send its snapshot to `reply`.
    CloseTap {
        id: u64,
        counters: CounterSnapshot,
        reply: oneshot::Sender<Snapshot>,
    },
}

/// Work for the report stage.
#[derive(Debug)]
pub enum Job {
    /// A closed interval: encode and export.
    Interval(Snapshot),
    /// An on-demand profile: encode and answer.
    OnDemand {
        snapshot: Snapshot,
        reply: oneshot::Sender<Vec<u8>>,
    },
}
