//! The audit trail: one JSON line per decision, in OPA's decision-log shape
//! (`decision_id`, `timestamp`, `path`, `input`, `result`) plus the
//! connection id. Written synchronously and flushed per line.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::Serialize;

use super::{DECISION_PATH, Input};

pub struct Line<'a> {
    pub decision_id: &'a str,
    pub conn_id: u64,
    pub input: &'a Input,
    pub allow: bool,
    pub reason: Option<&'a str>,
    pub error: Option<&'a str>,
    pub enforced: bool,
    pub cached: bool,
    pub revision: Option<&'a str>,
}

#[derive(Serialize)]
struct Record<'a> {
    decision_id: &'a str,
    timestamp: String,
    path: &'static str,
    input: &'a Input,
    result: RecordResult<'a>,
    conn_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    enforced: bool,
    cached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<&'a str>,
}

#[derive(Serialize)]
struct RecordResult<'a> {
    allow: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

enum Sink {
    Stdout,
    File(std::fs::File),
}

pub struct AuditLog {
    sink: Mutex<Sink>,
    pub target: String,
}

impl AuditLog {
    /// `-` is standard output; anything else a file opened for appending.
    pub fn open(target: &Path) -> std::io::Result<Self> {
        let sink = if target == Path::new("-") {
            Sink::Stdout
        } else {
            if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            Sink::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(target)?,
            )
        };
        Ok(Self {
            sink: Mutex::new(sink),
            target: PathBuf::from(target).display().to_string(),
        })
    }

    pub fn record(&self, line: &Line<'_>) {
        let timestamp = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let rec = Record {
            decision_id: line.decision_id,
            timestamp,
            path: DECISION_PATH,
            input: line.input,
            result: RecordResult {
                allow: line.allow,
                reason: line.reason,
            },
            conn_id: line.conn_id,
            error: line.error,
            enforced: line.enforced,
            cached: line.cached,
            revision: line.revision,
        };
        let Ok(mut text) = serde_json::to_string(&rec) else {
            return;
        };
        text.push('\n');
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let result = match &mut *sink {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes()).and_then(|_| out.flush())
            }
            Sink::File(f) => f.write_all(text.as_bytes()),
        };
        if let Err(e) = result {
            tracing::error!(target = %self.target, error = %e, "writing the audit log failed");
        }
    }
}
