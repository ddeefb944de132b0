//! Memory given back once a load has passed.
//!
//! jemalloc keeps the objects a thread frees in that thread's cache, for the
//! thread's next allocations; a thread that goes idle after a load keeps
//! them, and the pages they pin, for as long as it stays idle. The audit
//! writer and the policy workers free what the runtime's workers allocated,
//! so their caches fill with the load's objects too.
//!
//! [`upkeep`] watches the open connections. Once they have fallen by a
//! quarter of their peak (and by [`MIN_DROP`] at least) and have not risen
//! for [`CALM_TICKS`] seconds, it asks every thread to flush its cache at
//! its next quiet moment ([`quiet`]: a runtime worker about to park, a
//! policy worker or the audit writer idle for a second), wakes the
//! runtime's workers so they have one, and a second later hands the freed
//! pages back to the OS. bench/README.md "Memory after load" has what it
//! gives.

use std::cell::Cell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Releases asked so far; a thread flushes its cache once per release.
static RELEASES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The release this thread last flushed its cache for.
    static FLUSHED: Cell<u64> = const { Cell::new(0) };
}

/// Called by a thread at a quiet moment: flushes its allocation cache if a
/// release was asked since it last did. One atomic load otherwise.
pub fn quiet() {
    let asked = RELEASES.load(Ordering::Relaxed);
    FLUSHED.with(|flushed| {
        if flushed.get() != asked {
            flushed.set(asked);
            ctl(c"thread.tcache.flush");
        }
    });
}

/// How long a thread waits for work before it counts as quiet.
pub const IDLE: Duration = Duration::from_secs(1);

/// A jemalloc control that takes and gives no value; false when jemalloc
/// refused it.
fn ctl(name: &CStr) -> bool {
    // SAFETY: `name` is NUL-terminated, and the controls called here
    // (`thread.tcache.flush`, `arena.<i>.purge`) read and write nothing, so
    // every pointer is null and the length 0, as jemalloc requires of them.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        ) == 0
    }
}

/// Fewer connections than this closing is not a load passing.
pub const MIN_DROP: u64 = 16;
/// Seconds (ticks) with no rise in open connections before a release.
pub const CALM_TICKS: u32 = 2;

/// Decides, fed the open connections once a second, when a load has passed.
#[derive(Debug, Default)]
pub struct Watch {
    /// The most connections open since the last release.
    peak: u64,
    /// The count at the last tick.
    last: u64,
    /// Ticks since the count last rose.
    calm: u32,
}

impl Watch {
    /// True when memory should be released now.
    pub fn tick(&mut self, open: u64) -> bool {
        if open > self.last {
            self.calm = 0;
        } else {
            self.calm = self.calm.saturating_add(1);
        }
        self.last = open;
        self.peak = self.peak.max(open);
        let drop = self.peak - open;
        if self.calm >= CALM_TICKS && drop >= MIN_DROP && drop >= self.peak / 4 {
            self.peak = open;
            return true;
        }
        false
    }
}

/// Watches the open connections once a second, for good; when a
/// load has passed, has every thread flush its cache — waking the data
/// plane's workers with a few empty tasks so each parks again — then hands
/// the free pages of every arena back to the OS.
pub async fn upkeep(
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    data_plane: tokio::runtime::Handle,
    workers: usize,
) {
    let mut watch = Watch::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !watch.tick(metrics.open_connections()) {
            continue;
        }
        let release = RELEASES.fetch_add(1, Ordering::Relaxed) + 1;
        for _ in 0..workers.saturating_mul(2) {
            drop(data_plane.spawn(async {}));
        }
        quiet();
        tokio::time::sleep(IDLE).await;
        // 4096 = MALLCTL_ARENAS_ALL.
        let purged = ctl(c"arena.4096.purge");
        metrics.memory_releases.inc();
        tracing::debug!(release, purged, "memory released after a load");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_comes_once_a_load_has_passed_and_stayed_down() {
        let mut w = Watch::default();
        // A load builds up: no release while it rises.
        for open in [0, 100, 1_000, 10_000] {
            assert!(!w.tick(open), "rising at {open}");
        }
        // It falls by more than a quarter; the release waits for calm.
        assert!(!w.tick(5_000));
        assert!(w.tick(4_000), "two ticks without a rise, down by 6 000");
        // Steady afterwards: nothing more to release.
        for _ in 0..5 {
            assert!(!w.tick(4_000));
        }
        // A rise resets the calm.
        assert!(!w.tick(4_100));
        assert!(!w.tick(100));
        assert!(w.tick(100));
    }

    #[test]
    fn small_or_partial_drops_release_nothing() {
        let mut w = Watch::default();
        // Under MIN_DROP connections closing is not a load passing.
        assert!(!w.tick(10));
        for _ in 0..5 {
            assert!(!w.tick(0));
        }
        // Less than a quarter of the peak closing is not either.
        let mut w = Watch::default();
        assert!(!w.tick(1_000));
        for _ in 0..5 {
            assert!(!w.tick(800));
        }
        // The drop counts from the peak: 1 000 → 800 → 700 is past a
        // quarter, after calm ticks: released at once.
        assert!(w.tick(700));
    }
}
