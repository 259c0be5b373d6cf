//! The aggregator stage's loop around [`Aggregator`].
use tokio::sync::mpsc;
use tracing::debug;

use crate::{
    aggregate::Aggregator,
    messages::{Job, Message},
    telemetry::Heartbeat,
};

/// The aggregator stage: runs on a blocking thread (it reads /proc and parses ELF files) until
/// it has flushed the last interval. A full report queue blocks it; the sampler then drops and
/// counts samples instead of growing memory.
pub fn run(
    mut aggregator: Aggregator,
    mut rx: mpsc::Receiver<Message>,
    tx: mpsc::Sender<Job>,
    beat: &Heartbeat,
) {
    while let Some(message) = rx.blocking_recv() {
        // Busy until the message is handled, a wait on the full report queue included: a
        // reporter stalled for long enough shows here too.
        let _busy = beat.busy();
        match message {
            Message::Samples(samples) => samples.iter().for_each(|s| aggregator.add(s)),
            Message::Flush { end, counters, last } => {
                let snapshot = aggregator.flush(end, counters);
                debug!(
                    samples = snapshot.samples(),
                    stacks = snapshot.stacks.len(),
                    "interval closed"
                );
                if tx.blocking_send(Job::Interval(snapshot)).is_err() || last {
                    return;
                }
            }
            Message::OpenTap { id, filter, counters } => aggregator.open_tap(id, filter, counters),
            Message::CloseTap { id, counters, reply } => {
                if let Some(snapshot) = aggregator.close_tap(id, counters) {
                    // The requester may be gone (client disconnected): nothing to do then.
                    let _ = reply.send(snapshot);
                }
            }
        }
    }
}
