//! The unwind stage: a thread that keeps the BPF unwinder's view of every sampled process
//! current ([`crate::unwind::Unwinder`]), woken by the kernel's exec/exit/load events and by
//! the sampler's load requests.
//!
//! Requests come over a bounded channel ([`REQUEST_QUEUE`]); when it is full the sampler drops
//! the request and counts it (the next sample of that process asks again). The stage ends when
//! the last [`Requests`] sender is gone (the sampler has stopped) or when it is cancelled.
use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::Ordering,
        mpsc::{Receiver, SyncSender, TryRecvError, TrySendError},
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    telemetry::Heartbeat,
    unwind::{UnwindStats, Unwinder},
};

/// How often every loaded process is re-read.
const RECONCILE_EVERY: Duration = Duration::from_secs(10);
/// Longest sleep of the stage between reconciliation checks: the event ring and the request
/// doorbell wake it earlier.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// The same without a doorbell (no eventfd): requests are then picked up at this pace.
const POLL_EVERY_WITHOUT_DOORBELL: Duration = Duration::from_millis(100);

/// Requests waiting for the stage; more are dropped (and counted) by the sender.
pub const REQUEST_QUEUE: usize = 1024;

/// An eventfd the sampler rings with each request, so the stage can sleep on it and on the
/// event ring at once instead of waking on a timer.
struct Doorbell(OwnedFd);

impl Doorbell {
    fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd; a full counter (EAGAIN) still
        // leaves it readable, which is all a ring needs.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    fn clear(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN when nothing rang.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut count).cast(), 8) };
    }
}

/// The sampler's side of the request channel.
#[derive(Clone)]
pub struct Requests {
    /// `None` only while being dropped.
    tx: Option<SyncSender<u32>>,
    stats: Arc<UnwindStats>,
    doorbell: Option<Arc<Doorbell>>,
}

/// The stage's side of the request channel.
pub struct RequestQueue {
    rx: Receiver<u32>,
    doorbell: Option<Arc<Doorbell>>,
}

/// A bounded request channel ([`REQUEST_QUEUE`]) whose sends wake the stage.
pub fn request_queue(stats: Arc<UnwindStats>) -> (Requests, RequestQueue) {
    let (tx, rx) = std::sync::mpsc::sync_channel(REQUEST_QUEUE);
    let doorbell = match Doorbell::new() {
        Ok(doorbell) => Some(Arc::new(doorbell)),
        Err(error) => {
            warn!(%error, "no eventfd: the unwind stage polls for requests every 100 ms");
            None
        }
    };
    (
        Requests {
            tx: Some(tx),
            stats,
            doorbell: doorbell.clone(),
        },
        RequestQueue { rx, doorbell },
    )
}

impl Requests {
    /// Asks the stage to (re)load `tgid`; never blocks.
    pub fn load(&self, tgid: u32) {
        let Some(tx) = &self.tx else {
            return;
        };
        match tx.try_send(tgid) {
            Ok(()) => {
                if let Some(doorbell) = &self.doorbell {
                    doorbell.ring();
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.stats.requests_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Requests {
    /// The last sender going away ends the stage; wake it so it notices now (after this
    /// sender is gone, so the stage sees the channel closed).
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(doorbell) = &self.doorbell {
            doorbell.ring();
        }
    }
}

/// The stage loop, until the request channel closes or `cancel`. It sleeps on the event ring,
/// which the sampling program wakes for every load request, and on the request doorbell.
pub fn run(mut unwinder: Unwinder, requests: RequestQueue, cancel: CancellationToken, beat: &Heartbeat) {
    let mut last_reconcile = Instant::now();
    let doorbell = requests.doorbell.as_deref();
    let timeout = match doorbell {
        Some(_) => POLL_EVERY,
        None => POLL_EVERY_WITHOUT_DOORBELL,
    };
    while !cancel.is_cancelled() {
        let next_recheck = unwinder
            .next_recheck()
            .map(|at| at.saturating_duration_since(Instant::now()));
        wait_for_events(
            unwinder.event_fd().unwrap_or(-1),
            doorbell,
            next_recheck.map_or(timeout, |d| d.min(timeout)),
        );
        if let Some(doorbell) = doorbell {
            doorbell.clear();
        }
        let _busy = beat.busy();
        unwinder.drain_events();
        unwinder.run_due_rechecks();
        loop {
            match requests.rx.try_recv() {
                Ok(pid) => unwinder.on_request(pid),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        if last_reconcile.elapsed() >= RECONCILE_EVERY {
            unwinder.reconcile();
            last_reconcile = Instant::now();
        }
    }
}

/// Sleeps until the event ring has data, the doorbell rang, or `timeout`.
fn wait_for_events(events: RawFd, doorbell: Option<&Doorbell>, timeout: Duration) {
    let watch = |fd: i32| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [
        watch(events),
        // A negative fd is skipped by poll.
        watch(doorbell.map_or(-1, |d| d.0.as_raw_fd())),
    ];
    // SAFETY: valid pollfds for the duration of the call.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout.as_millis() as libc::c_int) };
    if ready < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
        // A broken fd: do not spin.
        std::thread::sleep(timeout);
    }
}
