//! The agent's periodic jobs that block — the config file's mtime and its
//! reload, SVID renewal, the policy poll and its bearer token, the token
//! counters' file, the kernel record sweep, the check for gone pods, the
//! drop of the executable's pages after a load — run on one thread of their
//! own (`chores`), one at a time in the order asked.
//!
//! On tokio's blocking pool they kept its idle threads alive for good: the
//! pool hands each job to the thread that has waited longest, so a few jobs
//! a second reach every idle thread within its keep-alive (2 s), and the
//! threads a burst of new connections started (up to 64, each with its
//! stack and its allocation cache) never ended. Measured
//! (`cargo xtask bench --memory`, `thread_names`): a's runtime threads were
//! 5 idle, 65 with 10 000 connections held and still 13 after they closed.
//! The blocking pool now serves the connections' work alone and shrinks to
//! nothing between loads.
//!
//! The price: a chore that hangs (a stat on a file system that stopped
//! answering) holds up the ones after it, SVID renewal included. On the
//! pool, the same hang took a thread each second until all 64 were taken,
//! and with them every new connection's attestation.

use std::sync::{OnceLock, mpsc};

type Job = Box<dyn FnOnce() + Send>;

/// Why a chore gave no result.
#[derive(Debug, thiserror::Error)]
pub enum ChoreError {
    #[error("cannot start the chores thread: {0}")]
    Spawn(String),
    #[error("the chores thread has ended")]
    Ended,
    #[error("the chore panicked")]
    Panicked,
}

/// The thread's queue (started at the first chore).
fn queue() -> Result<&'static mpsc::Sender<Job>, ChoreError> {
    static QUEUE: OnceLock<Result<mpsc::Sender<Job>, String>> = OnceLock::new();
    QUEUE
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("chores".into())
                .spawn(move || {
                    loop {
                        match rx.recv_timeout(crate::memory::IDLE) {
                            // A chore that panics ends itself, not the
                            // thread: its caller sees `Panicked`.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(mpsc::RecvTimeoutError::Timeout) => crate::memory::quiet(),
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                })
                .map(|_| tx)
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| ChoreError::Spawn(e.clone()))
}

/// Runs `f` on the chores thread and waits for its result without blocking
/// the caller's thread.
pub async fn run<T, F>(f: F) -> Result<T, ChoreError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    queue()?.send(job).map_err(|_| ChoreError::Ended)?;
    // A job that panicked dropped its sender unsent.
    rx.await.map_err(|_| ChoreError::Panicked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chores_run_on_one_thread_of_their_own_and_survive_a_panic() {
        let name = || std::thread::current().name().map(str::to_owned);
        let first = run(name).await.expect("a chore");
        assert_eq!(first.as_deref(), Some("chores"));
        let id = run(|| std::thread::current().id()).await.expect("a chore");
        assert_ne!(id, std::thread::current().id());
        // A panicking chore is reported as such; the next one still runs,
        // on the same thread.
        let panicked = run(|| -> u32 { panic!("a chore that fails") }).await;
        assert!(
            matches!(panicked, Err(ChoreError::Panicked)),
            "{panicked:?}"
        );
        let again = run(|| std::thread::current().id()).await.expect("a chore");
        assert_eq!(again, id);
    }
}
