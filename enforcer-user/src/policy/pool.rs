//! The evaluation pool: policy evaluations run on a few dedicated threads,
//! never on the async runtime's, each thread with its own engine clone. A
//! caller waits at most the evaluation budget (`policy.eval_timeout_ms`) and
//! then denies; a runaway evaluation is stopped by regorus's own timer on
//! the same budget, so a worker is back within about one budget (or one
//! builtin call) and other connections keep being decided meanwhile.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crossbeam_channel::{RecvTimeoutError, Sender};

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
    /// The queue the workers wait on: each job wakes one idle worker. (A
    /// `Mutex` around a std receiver woke two per job: the one waiting on
    /// the channel, and the one waiting for the lock when it was let go.)
    tx: Sender<Slot>,
    /// Evaluations running on threads of their own.
    extra: Arc<AtomicUsize>,
    /// The workers' thread ids, once started (tests read their counters).
    #[cfg(test)]
    pub(super) tids: Arc<Mutex<Vec<i32>>>,
}

impl EvalPool {
    /// `workers` threads (at least 2).
    pub fn new(workers: usize) -> std::io::Result<Self> {
        let workers = workers.max(2);
        let (tx, rx) = crossbeam_channel::bounded::<Slot>(QUEUE);
        #[cfg(test)]
        let tids = Arc::new(Mutex::new(Vec::new()));
        for i in 0..workers {
            let rx = rx.clone();
            #[cfg(test)]
            let tids = tids.clone();
            std::thread::Builder::new()
                .name(format!("policy-eval-{i}"))
                .spawn(move || {
                    #[cfg(test)]
                    tids.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(nix::unistd::gettid().as_raw());
                    loop {
                        let slot = match rx.recv_timeout(crate::memory::IDLE) {
                            Ok(slot) => slot,
                            Err(RecvTimeoutError::Timeout) => {
                                crate::memory::quiet();
                                continue;
                            }
                            Err(RecvTimeoutError::Disconnected) => return,
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
            #[cfg(test)]
            tids,
        })
    }

    /// The threads of a pool sized for this machine: one per core, at
    /// least 2.
    pub fn host_workers() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
    }

    /// A pool sized for this machine.
    pub fn for_host() -> std::io::Result<Self> {
        Self::new(Self::host_workers())
    }

    /// Evaluates `input` on a worker; denies (with an error) when the queue
    /// is full or the answer takes longer than `budget`. An evaluation still
    /// queued at half its budget (the workers are busy, e.g. with runaway
    /// evaluations) is taken back and run on a thread of its own (up to
    /// `EXTRA` at once), so runaways do not stop other decisions.
    pub async fn evaluate(&self, loaded: Arc<Loaded>, input: Value, budget: Duration) -> Decision {
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
            Err(_) => {
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
        }
    }
}
