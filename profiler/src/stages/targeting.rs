//! The targeting stage: a thread that resolves cgroups and label selectors again every
//! [`REFRESH`], so new processes and containers of the selection are profiled.
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::targeting::Targeter;

/// How often cgroups and selectors are resolved again.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Runs [`Targeter::refresh`] every [`REFRESH`] until `cancel` (the stopping side unparks the
/// thread, so it does not sleep out its wait).
pub fn run(mut targeter: Targeter, cancel: CancellationToken) {
    let (cgroups, selectors) = targeter.selection();
    info!(cgroups, selectors, "targeting: filtering in the kernel");
    loop {
        std::thread::park_timeout(REFRESH);
        if cancel.is_cancelled() {
            return;
        }
        if let Err(error) = targeter.refresh() {
            warn!(%error, "targeting refresh failed; keeping the previous selection");
        }
    }
}
