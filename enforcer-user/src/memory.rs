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
//! policy worker, the chores thread or the audit writer idle for a second),
//! wakes the runtime's workers so they have one, and a second later hands
//! the freed pages back to the OS. bench/README.md "Memory after load" has
//! what it gives.
//!
//! The agent's own executable counts in its RSS too: every page of code and
//! read-only data it touched, at start above all (config, policy compiler,
//! kernel programs' loading), stays mapped. [`release_code_pages`] drops
//! them from the page tables a few seconds after the agent is ready and
//! after each load: they stay in the page cache, and code that runs again
//! faults its page back in (a minor fault, once).

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

/// The capacity a writer thread's buffer keeps once it is quiet: a burst's
/// larger buffer is freed there (it grows again with the next burst).
pub const IDLE_BUFFER: usize = 64 << 10;

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

/// Seconds after the agent is ready before its start-up code pages are
/// dropped from its RSS.
pub const STARTUP_SETTLE_TICKS: u32 = 3;

/// Watches the open connections once a second, for good; when a
/// load has passed, has every thread flush its cache — waking the data
/// plane's workers with a few empty tasks so each parks again — then hands
/// the free pages of every arena back to the OS. Once the agent has been
/// ready a few seconds, and after each load, drops its executable's pages
/// from its RSS ([`release_code_pages`]).
pub async fn upkeep(
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    data_plane: tokio::runtime::Handle,
    workers: usize,
    ready: impl Fn() -> bool,
) {
    let mut watch = Watch::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ready_ticks = 0u32;
    loop {
        tick.tick().await;
        if ready_ticks < STARTUP_SETTLE_TICKS && ready() {
            ready_ticks += 1;
            if ready_ticks == STARTUP_SETTLE_TICKS {
                code_pages_released("start").await;
            }
        }
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
        code_pages_released("after a load").await;
    }
}

/// [`release_code_pages`] on the chores thread (it reads /proc), logged.
async fn code_pages_released(when: &'static str) {
    let released = crate::chores::run(release_code_pages)
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
    match released {
        Ok(bytes) => tracing::debug!(when, bytes, "executable pages dropped from RSS"),
        Err(e) => tracing::debug!(when, error = %e, "executable pages not dropped"),
    }
}

/// A read-only private mapping of the executable with no page of its own:
/// (start, length, resident bytes).
type Releasable = (usize, usize, u64);

/// The mappings of `smaps` (the text of /proc/self/smaps) that are of the
/// file with inode `exe_inode`, readable, not writable, private, and hold
/// no anonymous page. Only such pages can be dropped and read back from the
/// file unchanged: a mapping with anonymous pages (RELRO data, written
/// before it was made read-only) would lose what was written.
fn releasable(smaps: &str, exe_inode: u64) -> Vec<Releasable> {
    let mut out = Vec::new();
    // The current mapping, if it is of the executable and read-only private.
    let mut current: Option<(usize, usize)> = None;
    let mut rss = 0u64;
    let mut anonymous = None::<u64>;
    let mut flush = |current: &mut Option<(usize, usize)>, rss: u64, anonymous: Option<u64>| {
        if let Some((start, len)) = current.take()
            && anonymous == Some(0)
            && rss > 0
        {
            out.push((start, len, rss));
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            // A mapping's header: range perms offset dev inode [path].
            flush(&mut current, rss, anonymous);
            rss = 0;
            anonymous = None;
            let perms = fields.next().unwrap_or("");
            let inode = fields.nth(2).and_then(|i| i.parse::<u64>().ok());
            let p = perms.as_bytes();
            if inode == Some(exe_inode)
                && p.len() == 4
                && p[0] == b'r'
                && p[1] == b'-'
                && p[3] == b'p'
                && end > start
            {
                current = Some((start, end - start));
            }
            continue;
        }
        let kb = || fields.clone().next().and_then(|v| v.parse::<u64>().ok());
        match first {
            "Rss:" => rss = kb().unwrap_or(0) * 1024,
            "Anonymous:" => anonymous = kb(),
            _ => {}
        }
    }
    flush(&mut current, rss, anonymous);
    out
}

/// Drops the executable's read-only pages from this process's page tables
/// (`MADV_DONTNEED` on its read-only private file mappings with no
/// anonymous page); the resident bytes they held.
pub fn release_code_pages() -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let exe_inode = std::fs::metadata("/proc/self/exe")?.ino();
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut bytes = 0;
    for (start, len, rss) in releasable(&smaps, exe_inode) {
        // SAFETY: [start, start + len) is a whole mapping of this process's
        // executable, private, read-only and without anonymous pages (no
        // byte of it was ever written): dropping its pages changes no
        // content, a later access reads the same bytes from the file, which
        // cannot change while it is mapped executable (ETXTBSY) and whose
        // inode lives on if the file is replaced.
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if rc == 0 {
            bytes += rss;
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r--p 00000000 08:01 4242 /usr/local/bin/enforcer
Size:               1024 kB
Rss:                 800 kB
Anonymous:             0 kB
55d0c0100000-55d0c1000000 r-xp 00100000 08:01 4242 /usr/local/bin/enforcer
Size:              15360 kB
Rss:               12000 kB
Anonymous:             0 kB
55d0c1000000-55d0c1100000 r--p 01000000 08:01 4242 /usr/local/bin/enforcer
Size:               1024 kB
Rss:                1024 kB
Anonymous:          1000 kB
55d0c1100000-55d0c1110000 rw-p 01100000 08:01 4242 /usr/local/bin/enforcer
Size:                 64 kB
Rss:                  64 kB
Anonymous:            64 kB
7f0000000000-7f0000100000 r-xp 00000000 08:01 777 /usr/lib/x86_64-linux-gnu/libc.so.6
Size:               1024 kB
Rss:                 900 kB
Anonymous:             0 kB
7f0000200000-7f0000300000 r--p 00000000 00:00 0
Size:               1024 kB
Rss:                   0 kB
Anonymous:             0 kB
";

    #[test]
    fn only_the_executables_unwritten_read_only_mappings_are_released() {
        let r = releasable(SMAPS, 4242);
        assert_eq!(
            r,
            [
                (0x55d0c0000000, 0x100000, 800 * 1024),
                (0x55d0c0100000, 0xf00000, 12000 * 1024),
            ],
            "not the RELRO mapping (anonymous pages), not .data, not libc"
        );
        assert!(releasable(SMAPS, 1).is_empty());
    }

    #[test]
    fn released_code_pages_leave_the_rss_and_the_code_runs_on() {
        use std::os::unix::fs::MetadataExt as _;
        let exe = std::fs::metadata("/proc/self/exe").expect("exe").ino();
        let resident = || -> u64 {
            let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
            releasable(&smaps, exe).iter().map(|r| r.2).sum()
        };
        let before = resident();
        assert!(before > 0, "this test's executable has resident pages");
        let released = release_code_pages().expect("released");
        assert!(released > 0);
        let after = resident();
        assert!(after < before, "resident {before} -> {after}");
        // The code still runs: the pages come back from the file.
        assert_eq!(releasable(SMAPS, 4242).len(), 2);
        assert!(format!("{:?}", std::hint::black_box(vec![1, 2, 3])).contains('2'));
    }

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
