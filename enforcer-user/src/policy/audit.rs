//! The audit trail: one JSON line per decision in OPA's decision-log event
//! shape (`decision_id`, `labels`, `timestamp`, `path`, `input`, `result`,
//! `bundles`, `error`, `metrics`), with enforcer's own fields beside it
//! (`conn_id`, `reason`, `enforced`, `cached`, `policy_digest`). Written to a
//! file or standard output by a thread of its own (never on the async
//! runtime's threads), and, when configured, handed to the decision-log
//! shipper (`ship`).
//!
//! A line is written whole or not at all: a write that fails half-way (a
//! full disk) is cut back off the file. Failures are counted
//! (`enforcer_audit_write_failures_total`) and logged once per burst; with
//! `policy.audit_on_failure = "deny"` a decision whose line could not be
//! written is a denial. The file is reopened when it was renamed or
//! deleted (logrotate) and on SIGHUP.
use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use super::{DECISION_PATH, Input, load::BundleRevision, ship};

/// What one decision was, for its log line.
pub struct Line<'a> {
    pub decision_id: &'a str,
    pub conn_id: u64,
    /// The request's id, for a decision on one L7 request.
    pub request_id: Option<&'a str>,
    pub input: &'a Input,
    /// The value of `allow`; `None` when undefined or on error.
    pub result: Option<bool>,
    pub reason: Option<&'a str>,
    pub error: Option<ErrorObject>,
    pub enforced: bool,
    pub cached: bool,
    /// The policy in force (none loaded: `None`).
    pub policy_digest: Option<&'a str>,
    pub bundle: Option<&'a BundleRevision>,
    /// Time spent evaluating (a cache hit: `None`).
    pub eval_ns: Option<u64>,
}

/// OPA's decision-log `error`: a code and a message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ErrorObject {
    pub code: &'static str,
    pub message: String,
}

impl ErrorObject {
    /// The code OPA gives the same failure: the evaluation stopped at its
    /// budget is `eval_cancel_error`, a rule with two values
    /// `eval_conflict_error`, a builtin's error `eval_builtin_error`, an
    /// `allow` that is not a boolean enforcer's own
    /// `enforcer_contract_error`; anything else `eval_error`.
    pub fn classify(message: &str, timed_out: bool) -> Self {
        let m = message.to_ascii_lowercase();
        let code = if timed_out || m.contains("time limit") || m.contains("budget") {
            "eval_cancel_error"
        } else if m.contains("conflict") || m.contains("multiple outputs") {
            "eval_conflict_error"
        } else if m.contains("is not a boolean") {
            "enforcer_contract_error"
        } else if m.contains("builtin") {
            "eval_builtin_error"
        } else {
            "eval_error"
        };
        Self {
            code,
            message: message.to_owned(),
        }
    }
}

/// Who wrote the line: OPA's `labels` (`id` of this agent process,
/// `version`) and the node.
#[derive(Debug, Clone, Serialize)]
pub struct Labels {
    pub id: String,
    pub version: &'static str,
    pub node: String,
}

impl Labels {
    pub fn new(node: &str) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            version: env!("CARGO_PKG_VERSION"),
            node: node.to_owned(),
        }
    }
}

#[derive(Serialize)]
struct Revision<'a> {
    revision: &'a str,
}

#[derive(Serialize)]
struct Metrics {
    timer_rego_query_eval_ns: u64,
}

#[derive(Serialize)]
struct Record<'a> {
    decision_id: &'a str,
    labels: &'a Labels,
    timestamp: String,
    path: &'static str,
    input: &'a Input,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bundles: Option<BTreeMap<&'a str, Revision<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a ErrorObject>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<Metrics>,
    // enforcer's own, beside OPA's
    conn_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    enforced: bool,
    cached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy_digest: Option<&'a str>,
}

pub use crate::config::OnFailure;

/// Lines waiting for the writer thread; past it a line is lost (counted).
const QUEUE: usize = 65_536;

/// A queue of at most `cap` jobs whose memory grows with what is queued:
/// std's `sync_channel(QUEUE)` allocated all 65 536 slots (3 MiB) at start,
/// in every agent's idle RSS. The unbounded channel allocates blocks as
/// lines arrive and frees them as they are written; the count bounds it.
struct Bounded {
    tx: std::sync::mpsc::Sender<Job>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    cap: usize,
}

/// The writer's end of a [`Bounded`] queue.
struct Taken {
    rx: std::sync::mpsc::Receiver<Job>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

fn bounded(cap: usize) -> (Bounded, Taken) {
    let (tx, rx) = std::sync::mpsc::channel();
    let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    (
        Bounded {
            tx,
            queued: queued.clone(),
            cap,
        },
        Taken { rx, queued },
    )
}

impl Bounded {
    /// Queues `job` unless `cap` jobs wait already or the writer is gone.
    fn try_send(&self, job: Job) -> Result<(), ()> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.cap {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(());
        }
        self.tx.send(job).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        })
    }
}

impl Taken {
    fn took(&self, job: Job) -> Job {
        self.queued.fetch_sub(1, Ordering::AcqRel);
        job
    }

    fn recv_timeout(
        &self,
        t: std::time::Duration,
    ) -> Result<Job, std::sync::mpsc::RecvTimeoutError> {
        self.rx.recv_timeout(t).map(|j| self.took(j))
    }

    /// Jobs waiting.
    fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    fn try_recv(&self) -> Result<Job, std::sync::mpsc::TryRecvError> {
        self.rx.try_recv().map(|j| self.took(j))
    }
}

/// Lines written together at most (see `Writer::run`).
const BATCH_LINES: usize = 256;
/// How long the writer lets lines gather after one nobody waits for
/// (`audit_on_failure = "allow"`), as the log writer does: a line reaches
/// the file at most this much later.
const GATHER: std::time::Duration = crate::logsink::GATHER;

struct Job {
    /// The line; `None`: the barrier of [`AuditLog::flush`].
    text: Option<String>,
    /// Told whether the line was written (fail-closed mode, the barrier).
    done: Option<tokio::sync::oneshot::Sender<bool>>,
}

/// Whether a recorded line reached the log.
pub enum Receipt {
    /// Not waited for (`audit_on_failure = "allow"`).
    Unchecked,
    Pending(tokio::sync::oneshot::Receiver<bool>),
    Lost,
}

impl Receipt {
    /// Waits for the writer's answer (never on a runtime thread's time:
    /// the write happens on the audit thread).
    pub async fn written(self) -> bool {
        match self {
            Receipt::Unchecked => true,
            Receipt::Pending(rx) => rx.await.unwrap_or(false),
            Receipt::Lost => false,
        }
    }
}

pub struct AuditLog {
    queue: Bounded,
    pub target: String,
    labels: Labels,
    shipper: Option<ship::Handle>,
    pub on_failure: OnFailure,
    /// Set on SIGHUP: the writer reopens the file before its next line.
    reopen: Arc<AtomicBool>,
    failures: Counter,
    /// The queue was full and that was logged (once per burst).
    overflowing: AtomicBool,
}

impl AuditLog {
    /// `-` is standard output; anything else a file opened for appending.
    pub fn open(target: &Path) -> std::io::Result<Self> {
        Self::open_for(
            target,
            Labels::new(""),
            OnFailure::Allow,
            Counter::default(),
        )
    }

    /// As `open`, with this agent's labels, what a failed write does to the
    /// decision, and the counter of failed writes.
    pub fn open_for(
        target: &Path,
        labels: Labels,
        on_failure: OnFailure,
        failures: Counter,
    ) -> std::io::Result<Self> {
        let path = (target != Path::new("-")).then(|| target.to_path_buf());
        let display = PathBuf::from(target).display().to_string();
        let reopen = Arc::new(AtomicBool::new(false));
        let mut writer = Writer {
            path,
            file: None,
            id: None,
            reopen: reopen.clone(),
            lost: 0,
            failures: failures.clone(),
            target: display.clone(),
        };
        if let Some(p) = &writer.path {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            // At start the file must open: a wrong path is a config error.
            writer.open()?;
        }
        let (queue, rx) = bounded(QUEUE);
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            queue,
            target: display,
            labels,
            shipper: None,
            on_failure,
            reopen,
            failures,
            overflowing: AtomicBool::new(false),
        })
    }

    /// Reopens the file before the next line (SIGHUP, after a rotation).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
    }

    /// Waits until every line recorded so far is written (or its write
    /// failed): at shutdown, so that nothing queued is lost.
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            text: None,
            done: Some(tx),
        };
        if self.queue.try_send(job).is_ok() {
            let _ = rx.await;
        }
    }

    /// Also hands every line to the decision-log shipper.
    pub fn ship_to(mut self, shipper: ship::Handle) -> Self {
        self.shipper = Some(shipper);
        self
    }

    /// The event for one decision, as JSON.
    pub fn event(&self, line: &Line<'_>) -> Option<String> {
        let timestamp = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let rec = Record {
            decision_id: line.decision_id,
            labels: &self.labels,
            timestamp,
            path: DECISION_PATH,
            input: line.input,
            // OPA logs no result with an error.
            result: if line.error.is_some() {
                None
            } else {
                line.result
            },
            bundles: line.bundle.map(|b| {
                BTreeMap::from([(
                    b.name.as_str(),
                    Revision {
                        revision: &b.revision,
                    },
                )])
            }),
            error: line.error.as_ref(),
            metrics: line.eval_ns.map(|ns| Metrics {
                timer_rego_query_eval_ns: ns,
            }),
            conn_id: line.conn_id,
            request_id: line.request_id,
            reason: line.reason,
            enforced: line.enforced,
            cached: line.cached,
            policy_digest: line.policy_digest,
        };
        serde_json::to_string(&rec).ok()
    }

    /// Queues one decision's line for the writer; with `audit_on_failure =
    /// "deny"`, the receipt says whether it was written.
    pub fn record(&self, line: &Line<'_>) -> Receipt {
        let Some(text) = self.event(line) else {
            return Receipt::Lost;
        };
        if let Some(s) = &self.shipper {
            s.push(&text);
        }
        self.write(text, self.on_failure == OnFailure::Deny)
    }

    /// Writes a line that follows a decision's (an LLM answer's usage):
    /// `fields` with this agent's `labels` and a `timestamp`. Not shipped
    /// to the decision-log service, whose events are decisions only.
    pub fn note(&self, mut fields: serde_json::Value) {
        let timestamp = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        if let Some(o) = fields.as_object_mut() {
            o.insert("timestamp".into(), timestamp.into());
            if let Ok(l) = serde_json::to_value(&self.labels) {
                o.insert("labels".into(), l);
            }
        }
        self.write(fields.to_string(), false);
    }

    fn write(&self, text: String, wait: bool) -> Receipt {
        let (done, receipt) = if wait {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Receipt::Pending(rx))
        } else {
            (None, Receipt::Unchecked)
        };
        match self.queue.try_send(Job {
            text: Some(text),
            done,
        }) {
            Ok(()) => {
                self.overflowing.store(false, Ordering::Relaxed);
                receipt
            }
            Err(_) => {
                self.failures.inc();
                if !self.overflowing.swap(true, Ordering::Relaxed) {
                    tracing::error!(target = %self.target, queued = QUEUE,
                        "the audit log writer is behind (a stalled disk?); lines are lost until it catches up (enforcer_audit_write_failures_total)");
                }
                Receipt::Lost
            }
        }
    }
}

/// The writer thread's side: the open file, and the state of a failure
/// burst.
struct Writer {
    /// `None`: standard output.
    path: Option<PathBuf>,
    file: Option<std::fs::File>,
    /// Device and inode of the open file, to notice a rename or deletion.
    id: Option<(u64, u64)>,
    reopen: Arc<AtomicBool>,
    /// Lines lost in the current failure burst.
    lost: u64,
    failures: Counter,
    target: String,
}

impl Writer {
    /// Writes what is queued: the lines waiting when the thread wakes (or
    /// [`GATHER`] later), up to [`BATCH_LINES`], go out in one write (one
    /// `stat`, one `fstat`, one `write` for all of them, instead of per
    /// line); each is whole in the
    /// file or, when the write fails, none of the batch is. Whoever waits
    /// for a line or a barrier is answered after its batch.
    fn run(mut self, rx: Taken) {
        let mut batch: Vec<Job> = Vec::with_capacity(BATCH_LINES);
        let mut text = String::new();
        loop {
            let first = match rx.recv_timeout(crate::memory::IDLE) {
                Ok(job) => job,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    // Quiet: a burst's batch text goes (it grows again with
                    // the next one), then this thread's allocator cache.
                    if text.capacity() > crate::memory::IDLE_BUFFER {
                        text = String::new();
                    }
                    crate::memory::quiet();
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            };
            // Nobody waits for this line: let more gather before writing,
            // so that under load the writer wakes and writes a few times a
            // second, not once per decision (each wake-up was a futex call
            // on the deciding runtime thread). A full batch waiting already
            // goes at once.
            if first.done.is_none() && rx.queued() < BATCH_LINES {
                std::thread::sleep(GATHER);
            }
            batch.push(first);
            while batch.len() < BATCH_LINES {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            text.clear();
            let mut lines = 0u64;
            for job in &batch {
                if let Some(t) = &job.text {
                    text.push_str(t);
                    text.push('\n');
                    lines += 1;
                }
            }
            let ok = lines == 0 || self.write(&text, lines);
            for job in batch.drain(..) {
                if let Some(done) = job.done {
                    let _ = done.send(ok);
                }
            }
        }
    }

    /// Writes `lines` whole lines (`text`, each ending in a newline).
    fn write(&mut self, text: &str, lines: u64) -> bool {
        let result = if self.path.is_some() {
            self.append(text.as_bytes())
        } else {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes()).and_then(|()| out.flush())
        };
        match result {
            Ok(()) => {
                if self.lost > 0 {
                    tracing::warn!(target = %self.target, lost = self.lost,
                        "the audit log is written again; lines were lost meanwhile");
                    self.lost = 0;
                }
                true
            }
            Err(e) => {
                self.failures.inc_by(lines);
                if self.lost == 0 {
                    tracing::error!(target = %self.target, error = %e,
                        "writing the audit log failed; lines are lost until it recovers (enforcer_audit_write_failures_total)");
                }
                self.lost += lines;
                false
            }
        }
    }

    /// Appends whole lines, or leaves the file as it was.
    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.recheck();
        if self.file.is_none() {
            self.open()?;
        }
        let Some(f) = self.file.as_mut() else {
            return Err(std::io::Error::other("the audit log is not open"));
        };
        let before = f.metadata()?.len();
        if let Err(e) = f.write_all(line) {
            // Part of the line may be in: cut it, so the next line starts
            // on a line of its own.
            if let Err(t) = f.set_len(before) {
                tracing::error!(target = %self.target, error = %t,
                    "cutting a partly written audit line failed; the log may hold a broken line");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Before each line (one `stat` on this thread): when the path no
    /// longer names the open file (renamed or deleted by log rotation), or
    /// on SIGHUP, close it so that the line opens (creates) the path again.
    fn recheck(&mut self) {
        let hup = self.reopen.swap(false, Ordering::AcqRel);
        let Some(path) = &self.path else {
            return;
        };
        let now = std::fs::metadata(path).ok().map(|m| file_id(&m));
        if hup || now != self.id {
            tracing::info!(target = %self.target,
                why = if hup { "SIGHUP" } else { "the file was renamed or deleted" },
                "reopening the audit log");
            self.file = None;
        }
    }

    fn open(&mut self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        self.id = f.metadata().ok().map(|m| file_id(&m));
        self.file = Some(f);
        Ok(())
    }
}

/// Which file this is (device, inode), whatever its name now.
fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    (m.dev(), m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_holds_at_most_its_bound_and_frees_a_slot_per_line_taken() {
        let line = || Job {
            text: Some("x".into()),
            done: None,
        };
        let (q, taken) = bounded(2);
        assert!(q.try_send(line()).is_ok());
        assert!(q.try_send(line()).is_ok());
        assert!(
            q.try_send(line()).is_err(),
            "a third line past a bound of 2"
        );
        assert!(taken.try_recv().is_ok());
        assert!(q.try_send(line()).is_ok(), "a slot freed by the writer");
        assert!(q.try_send(line()).is_err());
        drop(taken);
        let (q, taken) = bounded(2);
        drop(taken);
        assert!(q.try_send(line()).is_err(), "no writer");
        assert!(q.try_send(line()).is_err());
        assert_eq!(
            q.queued.load(Ordering::Relaxed),
            0,
            "refused lines hold no slot"
        );
    }

    #[test]
    fn events_have_opas_shape() {
        let log = AuditLog::open_for(
            Path::new("/dev/null"),
            Labels::new("node-a"),
            OnFailure::Allow,
            Counter::default(),
        )
        .expect("log");
        let input = Input {
            direction: "outbound",
            protocol: "tcp",
            request: None,
            ..Default::default()
        };
        let bundle = BundleRevision {
            name: "authz".into(),
            revision: "v3".into(),
        };
        let ok = log
            .event(&Line {
                decision_id: "d1",
                conn_id: 7,
                request_id: None,
                input: &input,
                result: Some(true),
                reason: Some("ok"),
                error: None,
                enforced: true,
                cached: false,
                policy_digest: Some("abc"),
                bundle: Some(&bundle),
                eval_ns: Some(1234),
            })
            .expect("event");
        let v: serde_json::Value = serde_json::from_str(&ok).expect("json");
        assert_eq!(v["decision_id"], "d1");
        assert_eq!(v["path"], "enforcer/authz/allow");
        assert_eq!(v["result"], true);
        assert_eq!(
            v["bundles"],
            serde_json::json!({"authz": {"revision": "v3"}})
        );
        assert_eq!(v["metrics"]["timer_rego_query_eval_ns"], 1234);
        assert_eq!(v["labels"]["node"], "node-a");
        assert_eq!(v["labels"]["version"], env!("CARGO_PKG_VERSION"));
        assert!(v["labels"]["id"].as_str().is_some_and(|s| s.len() == 36));
        assert!(
            time::OffsetDateTime::parse(
                v["timestamp"].as_str().unwrap_or_default(),
                &time::format_description::well_known::Rfc3339
            )
            .is_ok()
        );
        assert_eq!(v["conn_id"], 7);
        let failed = log
            .event(&Line {
                decision_id: "d2",
                conn_id: 8,
                request_id: Some("8.1"),
                input: &input,
                result: Some(false),
                reason: Some("policy error"),
                error: Some(ErrorObject::classify("x", true)),
                enforced: true,
                cached: true,
                policy_digest: None,
                bundle: None,
                eval_ns: None,
            })
            .expect("event");
        let v: serde_json::Value = serde_json::from_str(&failed).expect("json");
        assert!(v.get("result").is_none(), "an error has no result: {v}");
        assert_eq!(v["error"]["code"], "eval_cancel_error");
        assert_eq!(v["error"]["message"], "x");
        assert!(v.get("bundles").is_none() && v.get("metrics").is_none());
    }
}
