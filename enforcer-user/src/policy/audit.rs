//! The audit trail: one JSON line per decision in OPA's decision-log event
//! shape (`decision_id`, `labels`, `timestamp`, `path`, `input`, `result`,
//! `bundles`, `error`, `metrics`), with enforcer's own fields beside it
//! (`conn_id`, `reason`, `enforced`, `cached`, `policy_digest`). Written to a
//! file or standard output, synchronously and flushed per line, and, when
//! configured, handed to the decision-log shipper (`ship`).
use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

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

enum Sink {
    Stdout,
    File(std::fs::File),
}

pub struct AuditLog {
    sink: Mutex<Sink>,
    pub target: String,
    labels: Labels,
    shipper: Option<ship::Handle>,
}

impl AuditLog {
    /// `-` is standard output; anything else a file opened for appending.
    pub fn open(target: &Path) -> std::io::Result<Self> {
        Self::open_for(target, Labels::new(""))
    }

    /// As `open`, with this agent's labels.
    pub fn open_for(target: &Path, labels: Labels) -> std::io::Result<Self> {
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
            labels,
            shipper: None,
        })
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

    pub fn record(&self, line: &Line<'_>) {
        let Some(text) = self.event(line) else {
            return;
        };
        if let Some(s) = &self.shipper {
            s.push(&text);
        }
        self.write(text);
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
        self.write(fields.to_string());
    }

    fn write(&self, text: String) {
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let result = match &mut *sink {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes())
                    .and_then(|_| out.write_all(b"\n"))
                    .and_then(|_| out.flush())
            }
            Sink::File(f) => {
                let mut buf = text.into_bytes();
                buf.push(b'\n');
                f.write_all(&buf)
            }
        };
        if let Err(e) = result {
            tracing::error!(target = %self.target, error = %e, "writing the audit log failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_opas_shape() {
        let log = AuditLog::open_for(Path::new("/dev/null"), Labels::new("node-a")).expect("log");
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
