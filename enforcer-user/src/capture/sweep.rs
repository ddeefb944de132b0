//! Records of connects the agent will never accept, removed.
//!
//! The kernel publishes a captured connect's record under its 4-tuple
//! (`ENF_BY_TUPLE`) once the workload's side is established, and the agent
//! takes it when it accepts the connection. A workload's side can be
//! established while the agent's never is: the handshake's last ACK is lost,
//! or dropped because the agent's accept queue is full; the agent's kernel
//! then forgets the half-open connection and the workload's socket is
//! reset. Nothing would take that record: it stayed until the LRU evicted
//! it, and enough of them evict the records of live connects.
//!
//! A record is removed when its workload socket is closed (its
//! `ENF_BY_COOKIE` record, which the socket's close removes, is gone) and
//! the same record was found so in [`SIGHTINGS`] sweeps in a row,
//! [`INTERVAL`] apart: 15 s in which the agent did not accept the
//! connection. A stopped agent does not sweep; when it runs again, the one
//! sweep it missed comes at once and the next a whole interval later (the
//! ticks missed are not made up), so a record found just before a stop is
//! removed no sooner than 10 s after the agent runs again. A connection the
//! workload closed but the agent has still to accept (data and FIN in the
//! accept queue) is accepted within that time by a running agent, so its
//! data is never lost.
use std::{collections::HashMap as StdMap, path::Path, sync::Arc, time::Duration};

use aya::maps::{HashMap, Map, MapData, MapError};
use enforcer_common::{OrigDst, SockTuple};
use tracing::{debug, info, warn};

use super::{CaptureError, map_err, maps};

/// Between two sweeps.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// Sweeps in a row that must find a record untaken with its workload socket
/// closed before it is removed.
pub const SIGHTINGS: u32 = 4;

/// The agent's own handles on the record maps (opened from their pins, so
/// no lock is shared with the connections' lookups), and what the last
/// sweep found.
pub struct Sweep {
    by_tuple: HashMap<MapData, SockTuple, OrigDst>,
    by_cookie: HashMap<MapData, u64, OrigDst>,
    seen: Sightings,
}

/// Untaken records of closed sockets, by 4-tuple: the socket's cookie (a
/// record that a new connect with the same 4-tuple replaced starts over)
/// and the sweeps in a row that found it. Never larger than the map.
#[derive(Default)]
struct Sightings(StdMap<SockTuple, (u64, u32)>);

impl Sightings {
    /// This sweep's untaken records of closed sockets (4-tuple, socket
    /// cookie): those now found [`SIGHTINGS`] times in a row, to remove.
    /// A record not found this time is forgotten.
    fn next(&mut self, found: impl IntoIterator<Item = (SockTuple, u64)>) -> Vec<(SockTuple, u64)> {
        let mut now = StdMap::new();
        let mut due = Vec::new();
        for (key, cookie) in found {
            let runs = match self.0.get(&key) {
                Some(&(c, runs)) if c == cookie => runs + 1,
                _ => 1,
            };
            if runs >= SIGHTINGS {
                due.push((key, cookie));
            } else {
                now.insert(key, (cookie, runs));
            }
        }
        self.0 = now;
        due
    }
}

/// A handle of its own on the record map `name` pinned under `pin_dir`.
pub(super) fn pinned<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, CaptureError> {
    let data = MapData::from_pin(pin_dir.join("maps").join(name)).map_err(map_err(name))?;
    HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(name))
}

impl Sweep {
    /// Opens the record maps pinned under `pin_dir` (the capture's).
    pub fn open(pin_dir: &Path) -> Result<Self, CaptureError> {
        Ok(Self {
            by_tuple: pinned(pin_dir, maps::BY_TUPLE)?,
            by_cookie: pinned(pin_dir, maps::BY_COOKIE)?,
            seen: Sightings::default(),
        })
    }

    /// One sweep: the records removed.
    pub fn pass(&mut self) -> Result<u64, MapError> {
        let mut found = Vec::new();
        for entry in self.by_tuple.iter() {
            let (key, rec) = match entry {
                Ok(e) => e,
                // Taken (or evicted) while the map was walked.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e),
            };
            match self.by_cookie.get(&rec.socket_cookie, 0) {
                Ok(_) => continue, // the workload's socket is open
                Err(MapError::KeyNotFound) => found.push((key, rec.socket_cookie)),
                Err(e) => return Err(e),
            }
        }
        let mut removed = 0;
        for (key, cookie) in self.seen.next(found) {
            // Still the record found: a new connect may have published
            // one under the same 4-tuple since.
            match self.by_tuple.get(&key, 0) {
                Ok(rec) if rec.socket_cookie == cookie => {}
                _ => continue,
            }
            match self.by_tuple.remove(&key) {
                Ok(()) => {
                    removed += 1;
                    debug!(
                        socket_cookie = cookie,
                        src_port = key.src_port,
                        "removed the capture record of a connect never accepted"
                    );
                }
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }
}

/// Sweeps every [`INTERVAL`] for as long as the agent runs, off the async
/// runtime's threads (a sweep walks the map with one syscall per record).
pub async fn run(mut sweep: Sweep, metrics: Arc<crate::metrics::Metrics>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let done = crate::chores::run(move || {
            let r = sweep.pass();
            (sweep, r)
        })
        .await;
        let Ok((s, result)) = done else {
            warn!("the sweep of capture records stopped: its task failed");
            return;
        };
        sweep = s;
        match result {
            Ok(0) => failing = false,
            Ok(n) => {
                failing = false;
                metrics.capture_records_swept.inc_by(n);
                info!(
                    records = n,
                    "removed the capture records of connects never accepted (the workload's side closed, the agent's never established)"
                );
            }
            // Once per run of failures, not every few seconds.
            Err(e) if !failing => {
                failing = true;
                warn!(error = %e, "sweeping the capture records failed; retrying every {} s", INTERVAL.as_secs());
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(port: u16) -> SockTuple {
        SockTuple {
            family: 2,
            src_port: port,
            dst_port: 15001,
            ..Default::default()
        }
    }

    #[test]
    fn a_record_is_due_only_when_found_in_every_one_of_its_sweeps() {
        let mut s = Sightings::default();
        let (a, b) = (tuple(1), tuple(2));
        for _ in 1..SIGHTINGS {
            assert!(s.next([(a, 7), (b, 8)]).is_empty());
        }
        // b was taken (or its socket reopened) before its last sweep.
        assert_eq!(s.next([(a, 7)]), vec![(a, 7)]);
        assert!(s.0.is_empty(), "a removed record is forgotten");
        // b found again starts over.
        for _ in 1..SIGHTINGS {
            assert!(s.next([(b, 8)]).is_empty());
        }
        assert_eq!(s.next([(b, 8)]), vec![(b, 8)]);
    }

    #[test]
    fn a_new_connect_under_the_same_tuple_starts_over() {
        let mut s = Sightings::default();
        let a = tuple(1);
        for _ in 1..SIGHTINGS {
            assert!(s.next([(a, 7)]).is_empty());
        }
        // The 4-tuple reused by a new socket (another cookie).
        assert!(s.next([(a, 9)]).is_empty());
        for _ in 2..SIGHTINGS {
            assert!(s.next([(a, 9)]).is_empty());
        }
        assert_eq!(s.next([(a, 9)]), vec![(a, 9)]);
    }
}
