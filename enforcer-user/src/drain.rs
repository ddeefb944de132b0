//! Draining at SIGTERM: the listeners stop accepting, HBONE connections are
//! told to go away (GOAWAY), L7 sessions finish the request in hand, and the
//! connections already open run to their end for up to `runtime.drain_secs`.
//! Past it, what remains is reset (never closed as if complete) and every
//! connection still writes its "connection closed" line, with outcome
//! `drained`.
//!
//! One per process: the listeners, relays and sessions watch it without
//! each being handed a handle.
use std::{
    sync::{
        LazyLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, watch};
use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    Draining,
    /// `drain_secs` passed: relays still open are reset.
    Forced,
}

struct Drain {
    phase: watch::Sender<Phase>,
    /// What the drain waits for: [`CONNECTIONS`] in progress and
    /// [`LOOPS`] still accepting.
    counts: [AtomicUsize; 2],
    idle: Notify,
}

const CONNECTIONS: usize = 0;
const LOOPS: usize = 1;

static DRAIN: LazyLock<Drain> = LazyLock::new(|| Drain {
    phase: watch::Sender::new(Phase::Serving),
    counts: [AtomicUsize::new(0), AtomicUsize::new(0)],
    idle: Notify::new(),
});

/// One thing in progress that the drain waits for, counted in
/// `counts[KIND]` until dropped (no field: a connection's task pays nothing).
pub struct Counted<const KIND: usize>(());

/// A connection (or HBONE connection, or stream) in progress.
pub type Tracked = Counted<CONNECTIONS>;

/// An accept loop in progress: drain waits until every one has stopped,
/// so a connection accepted as the drain begins is counted (its
/// [`Tracked`] taken in the same poll) before the drain can find none open.
pub type Listening = Counted<LOOPS>;

impl<const KIND: usize> Counted<KIND> {
    fn new() -> Self {
        DRAIN.counts[KIND].fetch_add(1, Ordering::AcqRel);
        Self(())
    }
}

impl<const KIND: usize> Drop for Counted<KIND> {
    fn drop(&mut self) {
        if DRAIN.counts[KIND].fetch_sub(1, Ordering::AcqRel) == 1 {
            DRAIN.idle.notify_waiters();
        }
    }
}

/// Counts one connection until the returned guard is dropped.
pub fn track() -> Tracked {
    Counted::new()
}

/// Counts one accept loop until the returned guard is dropped.
pub fn listening() -> Listening {
    Counted::new()
}

async fn reached(phase: Phase) {
    let mut rx = DRAIN.phase.subscribe();
    // The sender lives in a static: the channel never closes.
    let _ = rx.wait_for(|p| *p >= phase).await;
}

/// Resolves when the agent starts draining (stop accepting, GOAWAY).
pub async fn draining() {
    reached(Phase::Draining).await
}

/// Resolves when the drain time is over: what is still open is reset.
pub async fn forced() {
    reached(Phase::Forced).await
}

/// Whether the agent drains (or the drain time is over).
pub fn is_draining() -> bool {
    *DRAIN.phase.borrow() >= Phase::Draining
}

/// Whether the drain time is over (a relay that ends now was cut by it).
pub fn is_forced() -> bool {
    *DRAIN.phase.borrow() == Phase::Forced
}

/// Connections in progress.
pub fn active() -> usize {
    DRAIN.counts[CONNECTIONS].load(Ordering::Acquire)
}

/// Drains: stops accepting, waits up to `within` for the connections in
/// progress to end, then resets what remains and waits (briefly) for those
/// connections to write their lines.
pub async fn run(within: Duration) {
    let open = active();
    info!(
        open,
        drain_secs = within.as_secs(),
        "draining: no new connections; open ones may finish"
    );
    DRAIN.phase.send_replace(Phase::Draining);
    if tokio::time::timeout(within, all_ended()).await.is_ok() {
        info!("drained: every connection ended");
        return;
    }
    let left = active();
    warn!(
        open = left,
        drain_secs = within.as_secs(),
        "drain time over; resetting the connections still open"
    );
    DRAIN.phase.send_replace(Phase::Forced);
    if tokio::time::timeout(Duration::from_secs(3), all_ended())
        .await
        .is_err()
    {
        warn!(open = active(), "connections still open after their reset");
    }
}

async fn all_ended() {
    loop {
        let idle = DRAIN.idle.notified();
        tokio::pin!(idle);
        idle.as_mut().enable();
        // The loops first: a loop's last connection is counted before the
        // loop stops, so once none runs, every connection is in `active`.
        if DRAIN.counts[LOOPS].load(Ordering::Acquire) == 0 && active() == 0 {
            return;
        }
        idle.await;
    }
}
