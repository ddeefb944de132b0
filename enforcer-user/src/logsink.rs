//! The agent's log lines (standard error), written by a thread of their own.
//!
//! A runtime thread that writes its log line itself stalls every connection
//! it serves while the write blocks — standard error piped to a journald
//! that is slow or stopped blocks as soon as the pipe is full. Here a line
//! is appended whole to a buffer in memory (one lock, one copy) and the
//! `log-writer` thread writes what has gathered, [`GATHER`] after the first
//! line it finds, in one `write`: under load a few writes and wake-ups a
//! second instead of one per line.
//!
//! Nothing is lost while the sink keeps up with at most [`CAP`] bytes
//! queued; past that, lines are dropped whole, counted
//! (`enforcer_log_lines_dropped_total`) and their number logged once the
//! writer is through. [`flush`] writes what is queued (at exit, before an
//! abort).
use std::{
    io::Write,
    sync::{
        Arc, Condvar, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// How long the writer lets lines gather after the first.
pub const GATHER: Duration = Duration::from_millis(5);
/// Bytes queued at most (about 40 000 lines).
pub const CAP: usize = 16 << 20;

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// The writer waits for a line (and must be woken).
    waiting: bool,
    /// A flush asked: the writer writes at once, then counts it done.
    flushes_asked: u64,
    flushes_done: u64,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    flushed: Condvar,
    dropped_total: AtomicU64,
}

static SINK: OnceLock<Arc<Shared>> = OnceLock::new();

/// The writer for `tracing_subscriber::fmt().with_writer(..)`: each line
/// goes to the sink whole (fmt writes an event in one `write_all`).
#[derive(Clone)]
pub struct Sink(Arc<Shared>);

/// Starts the `log-writer` thread (once) and returns the writer. Should
/// the thread not start, lines are written by whoever logs them, as
/// before.
pub fn start() -> std::io::Result<Sink> {
    if let Some(s) = SINK.get() {
        return Ok(Sink(s.clone()));
    }
    let shared = Arc::new(Shared::new());
    let w = shared.clone();
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || run(&w, &mut std::io::stderr()))?;
    let shared = SINK.get_or_init(|| shared).clone();
    Ok(Sink(shared))
}

/// Lines dropped because the sink was [`CAP`] behind, since start.
pub fn dropped_total() -> u64 {
    SINK.get()
        .map_or(0, |s| s.dropped_total.load(Ordering::Relaxed))
}

/// Writes what is queued and returns once it is written (or after 2 s,
/// when standard error does not take it).
pub fn flush() {
    let Some(s) = SINK.get() else { return };
    let mut st = s.state.lock().unwrap_or_else(|p| p.into_inner());
    st.flushes_asked += 1;
    let want = st.flushes_asked;
    s.wake.notify_one();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while st.flushes_done < want {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        st = s
            .flushed
            .wait_timeout(st, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

impl Shared {
    fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            flushed: Condvar::new(),
            dropped_total: AtomicU64::new(0),
        }
    }

    /// Appends one whole line, or drops it when [`CAP`] bytes wait.
    fn push(&self, line: &[u8]) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.buf.len() + line.len() > CAP {
            self.dropped_total.fetch_add(1, Ordering::Relaxed);
            return;
        }
        st.buf.extend_from_slice(line);
        if st.waiting {
            st.waiting = false;
            self.wake.notify_one();
        }
    }
}

/// The writer thread: waits for a line, lets more gather, writes them all.
fn run(s: &Shared, out: &mut dyn Write) {
    let mut spare = Vec::new();
    // Dropped lines already said in the log.
    let mut said = 0;
    loop {
        let mut st = s.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.buf.is_empty() && st.flushes_done == st.flushes_asked {
            st.waiting = true;
            let (guard, timeout) = s
                .wake
                .wait_timeout(st, crate::memory::IDLE)
                .unwrap_or_else(|p| p.into_inner());
            st = guard;
            if timeout.timed_out() && st.buf.is_empty() {
                // Quiet: a burst's buffers go (they grow again with the
                // next one), then this thread's allocator cache.
                if st.buf.capacity() > crate::memory::IDLE_BUFFER {
                    st.buf = Vec::new();
                }
                if spare.capacity() > crate::memory::IDLE_BUFFER {
                    spare = Vec::new();
                }
                crate::memory::quiet();
            }
        }
        st.waiting = false;
        if st.flushes_done == st.flushes_asked {
            drop(st);
            std::thread::sleep(GATHER);
            st = s.state.lock().unwrap_or_else(|p| p.into_inner());
        }
        std::mem::swap(&mut st.buf, &mut spare);
        let flushes = st.flushes_asked;
        drop(st);
        // A failed write loses its lines: there is nowhere else to say so.
        let _ = out.write_all(&spare);
        let _ = out.flush();
        let dropped = s.dropped_total.load(Ordering::Relaxed) - said;
        said += dropped;
        if dropped > 0 {
            // Queued like any line, in the log's format.
            tracing::warn!(
                dropped,
                "log lines were dropped: standard error did not take them fast enough (enforcer_log_lines_dropped_total)"
            );
        }
        spare.clear();
        // A burst's buffer is not kept for good.
        if spare.capacity() > 1 << 20 {
            spare = Vec::new();
        }
        let mut st = s.state.lock().unwrap_or_else(|p| p.into_inner());
        st.flushes_done = st.flushes_done.max(flushes);
        s.flushed.notify_all();
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
    type Writer = Sink;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the gate is open, and what went through it.
    type Gated = Arc<(Mutex<(bool, Vec<u8>)>, Condvar)>;

    /// An output that takes nothing until it is opened, then keeps all.
    struct Gate(Gated);

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (m, cv) = &*self.0;
            let mut g = m.lock().expect("gate");
            while !g.0 {
                g = cv.wait(g).expect("gate");
            }
            g.1.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer thread whose output is the gate, open or not.
    fn writer(open: bool) -> (Arc<Shared>, Gated) {
        let s = Arc::new(Shared::new());
        let gate = Arc::new((Mutex::new((open, Vec::new())), Condvar::new()));
        let (w, g) = (s.clone(), gate.clone());
        std::thread::spawn(move || run(&w, &mut Gate(g)));
        (s, gate)
    }

    /// Both line buffers grow with a burst and are freed once the log has
    /// been quiet (up to 1 MiB each was kept for good).
    #[test]
    fn a_bursts_buffers_are_freed_once_the_log_is_quiet() {
        let (s, gate) = writer(true);
        let line = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(1000));
        let written = || gate.0.lock().expect("gate").1.len();
        // Two bursts, each written before the next: the writer swaps the
        // two buffers, so both have held one.
        for burst in 1..=2 {
            for _ in 0..400 {
                s.push(line.as_bytes());
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while written() < burst * 400 * line.len() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "burst {burst} not written"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let grown = s.state.lock().expect("state").buf.capacity();
        assert!(
            grown > crate::memory::IDLE_BUFFER,
            "the burst grew the buffer: {grown}"
        );
        // Quiet for longer than IDLE.
        let deadline = std::time::Instant::now() + crate::memory::IDLE * 10;
        loop {
            let cap = s.state.lock().expect("state").buf.capacity();
            if cap <= crate::memory::IDLE_BUFFER {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the burst's buffer is still held after the log was quiet: {cap} bytes"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// While the output takes nothing, lines are taken without blocking,
    /// whole ones are dropped past the cap and counted, and once the output
    /// takes again every kept line is written whole, in order.
    #[test]
    fn a_stalled_output_blocks_no_caller_and_loses_only_what_is_counted() {
        let (s, gate) = writer(false);
        let line = |i: usize| format!("{{\"n\":{i},\"pad\":\"{}\"}}\n", "x".repeat(400));
        let per = line(0).len();
        // The writer holds at most CAP in its blocked write and CAP wait:
        // the rest is dropped.
        let n = 2 * CAP / per + 100;
        let started = std::time::Instant::now();
        for i in 0..n {
            s.push(line(i).as_bytes());
        }
        // Every push returned although nothing could be written.
        assert!(started.elapsed() < Duration::from_secs(30));
        let dropped = s.dropped_total.load(Ordering::Relaxed);
        assert!(dropped >= 100, "dropped {dropped}");
        {
            let (m, cv) = &*gate;
            m.lock().expect("gate").0 = true;
            cv.notify_all();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let text = String::from_utf8(gate.0.lock().expect("gate").1.clone()).expect("utf8");
            let lines: Vec<&str> = text.lines().collect();
            let kept = n - usize::try_from(dropped).expect("count");
            if lines.len() >= kept {
                assert_eq!(lines.len(), kept, "no line but the kept ones");
                for (i, l) in lines.iter().enumerate() {
                    assert_eq!(*l, line(i).trim_end(), "line {i}");
                }
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the writer did not catch up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
