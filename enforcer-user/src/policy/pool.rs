//! Where policy evaluations run: never where they could hold up other
//! connections.
//!
//! - **In place**, on a multi-threaded runtime: the connection's own thread
//!   evaluates, after handing its runtime worker (the other tasks) to
//!   another thread (`tokio::task::block_in_place`), so the decision waits
//!   for no thread to wake. At most as many at once as the pool has
//!   threads; the rest, and every evaluation on a current-thread runtime,
//!   go to the pool.
//! - **On the pool**: a few dedicated threads. A caller waits at most the
//!   evaluation budget (`policy.eval_timeout_ms`) and then denies.
//!
//! A runaway evaluation is stopped by regorus's own timer on the same
//! budget, so a thread is back within about one budget (or one builtin
//! call) and other connections keep being decided meanwhile; a decision
//! that took longer than its budget is a denial either way.
//!
//! The worker handed on in place runs on a thread of the runtime's blocking
//! pool. With all of those busy (64, attestation's `/proc` reads and
//! hashing), it waits for one, and the evaluating thread takes it back when
//! its evaluation ends: the runtime's other tasks on that worker then wait
//! for that one evaluation (at most its budget, or one builtin call), as
//! they would for a long poll.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use regorus::Value;

use super::{Decision, Loaded};

/// One evaluation, taken exactly once: by a worker, or by its caller.
type Slot = Arc<Mutex<Option<Work>>>;

struct Work {
    loaded: Arc<Loaded>,
    input: Value,
    done: tokio::sync::oneshot::Sender<Decision>,
}

impl Work {
    fn run(self) {
        // The caller gave up (its budget ran out): nothing to decide.
        if !self.done.is_closed() {
            let _ = self.done.send(self.loaded.evaluate(self.input));
        }
    }
}

fn take(slot: &Slot) -> Option<Work> {
    match slot.lock() {
        Ok(mut w) => w.take(),
        Err(p) => p.into_inner().take(),
    }
}

/// Jobs waiting for a worker before new ones are refused (deny).
const QUEUE: usize = 4096;

/// Evaluations at most on threads of their own, beside the workers.
const EXTRA: usize = 8;

pub struct EvalPool {
    tx: mpsc::SyncSender<Slot>,
    /// Evaluations running on threads of their own.
    extra: Arc<AtomicUsize>,
    /// Evaluations running in place on runtime threads, and how many may.
    pub(super) in_place: AtomicUsize,
    in_place_max: usize,
    /// Evaluations that ran in place (tests check the path is taken).
    #[cfg(test)]
    pub(super) in_place_runs: AtomicUsize,
}

/// One of the in-place evaluations a pool allows; given back on drop (also
/// if the evaluation panics).
struct InPlace<'a>(&'a AtomicUsize);

impl<'a> InPlace<'a> {
    fn take(count: &'a AtomicUsize, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count))
    }
}

impl Drop for InPlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether this thread may evaluate in place: on a multi-threaded runtime
/// (`block_in_place` panics on a current-thread one).
fn may_block_in_place() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// The denial of a decision not made within its budget.
fn past_budget(budget: Duration) -> Decision {
    let mut d = Decision::deny(
        "policy error",
        Some(format!(
            "policy evaluation exceeded its {} ms budget",
            budget.as_millis()
        )),
    );
    d.timed_out = true;
    d
}

impl EvalPool {
    /// `workers` threads (at least 2).
    pub fn new(workers: usize) -> std::io::Result<Self> {
        let workers = workers.max(2);
        let (tx, rx) = mpsc::sync_channel::<Slot>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("policy-eval-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let slot = match rx.lock() {
                            Ok(rx) => rx.recv_timeout(crate::memory::IDLE),
                            Err(p) => p.into_inner().recv_timeout(crate::memory::IDLE),
                        };
                        let slot = match slot {
                            Ok(slot) => slot,
                            Err(mpsc::RecvTimeoutError::Timeout) => {
                                crate::memory::quiet();
                                continue;
                            }
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        };
                        if let Some(work) = take(&slot) {
                            work.run();
                        }
                    }
                })?;
        }
        Ok(Self {
            tx,
            extra: Arc::new(AtomicUsize::new(0)),
            in_place: AtomicUsize::new(0),
            in_place_max: workers,
            #[cfg(test)]
            in_place_runs: AtomicUsize::new(0),
        })
    }

    /// A pool sized for this machine.
    pub fn for_host() -> std::io::Result<Self> {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    /// Evaluates `input` in place or on a worker (module docs); denies
    /// (with an error) when the queue is full or the answer takes longer
    /// than `budget`. An evaluation still queued at half its budget (the
    /// workers are busy, e.g. with runaway evaluations) is taken back and
    /// run on a thread of its own (up to `EXTRA` at once), so runaways do
    /// not stop other decisions.
    pub async fn evaluate(&self, loaded: Arc<Loaded>, input: Value, budget: Duration) -> Decision {
        if may_block_in_place()
            && let Some(_in_place) = InPlace::take(&self.in_place, self.in_place_max)
        {
            let started = Instant::now();
            let d = tokio::task::block_in_place(|| loaded.evaluate(input));
            #[cfg(test)]
            self.in_place_runs.fetch_add(1, Ordering::Relaxed);
            // As a caller of the pool would have stopped waiting.
            return if started.elapsed() > budget {
                past_budget(budget)
            } else {
                d
            };
        }
        let (done, mut answer) = tokio::sync::oneshot::channel();
        let slot: Slot = Arc::new(Mutex::new(Some(Work {
            loaded,
            input,
            done,
        })));
        if self.tx.try_send(slot.clone()).is_err() {
            return Decision::deny(
                "policy error",
                Some("policy evaluation queue is full".to_owned()),
            );
        }
        let half = budget / 2;
        let answered = match tokio::time::timeout(half, &mut answer).await {
            Ok(r) => Ok(r),
            Err(_) => {
                if self.extra.fetch_add(1, Ordering::SeqCst) < EXTRA
                    && let Some(work) = take(&slot)
                {
                    let extra = self.extra.clone();
                    let spawned = std::thread::Builder::new()
                        .name("policy-eval-extra".into())
                        .spawn(move || {
                            work.run();
                            extra.fetch_sub(1, Ordering::SeqCst);
                        });
                    if let Err(e) = spawned {
                        self.extra.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!(error = %e, "cannot start a policy evaluation thread");
                    }
                } else {
                    self.extra.fetch_sub(1, Ordering::SeqCst);
                }
                tokio::time::timeout(budget.saturating_sub(half), &mut answer).await
            }
        };
        match answered {
            Ok(Ok(d)) => d,
            Ok(Err(_)) => Decision::deny(
                "policy error",
                Some("policy evaluation ended without a decision".to_owned()),
            ),
            Err(_) => past_budget(budget),
        }
    }
}
