//! A connection's life in one value: created when the connection is
//! accepted (the active-connections gauge goes up), filled in as the
//! connection is attested, decided and relayed, and reported when dropped —
//! its "connection closed" line written and the metrics updated — however
//! the handling ends: a return, an early refusal, a panic or the task's
//! cancellation. The gauge cannot drift.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tracing::{info, warn};

use crate::{
    attest::WorkloadFacts,
    drain,
    metrics::{Direction, Metrics},
};

/// How a proxied connection ended (the `outcome` label and log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions finished cleanly.
    Ok,
    /// The kernel had no record for the accepted socket: not a captured
    /// connection (or its record was lost). Refused.
    NoOriginalDestination,
    /// The original destination could not be reached.
    ConnectFailed,
    /// The connection broke while proxying.
    Error,
    /// The workload has no SPIFFE identity (no registration entry matches).
    NoIdentity,
    /// The HBONE tunnel to the peer agent could not be opened.
    TunnelFailed,
    /// The request on the tunnel was malformed or named another destination.
    BadRequest,
    /// Plaintext from outside the mesh to a `strict` port.
    PlaintextRefused,
    /// Policy denied the connection.
    Denied,
    /// Still open when the agent's drain time ran out: reset.
    Drained,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NoOriginalDestination => "no_original_destination",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::Error => "error",
            Outcome::NoIdentity => "no_identity",
            Outcome::TunnelFailed => "tunnel_failed",
            Outcome::BadRequest => "bad_request",
            Outcome::PlaintextRefused => "plaintext_refused",
            Outcome::Denied => "denied",
            Outcome::Drained => "drained",
        }
    }

    /// A relay that failed: `drained` when the drain cut it, else `error`.
    pub fn broken() -> Self {
        if drain::is_forced() {
            Outcome::Drained
        } else {
            Outcome::Error
        }
    }
}

/// How a connection came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A captured connect of a local workload (outbound listener).
    Outbound,
    /// An HBONE stream from a peer agent.
    Inbound,
    /// Plaintext steered from a protected port.
    Plaintext,
}

pub struct ConnRecord {
    metrics: Arc<Metrics>,
    kind: Kind,
    pub id: u64,
    started: Instant,
    /// The process that connected (outbound), as the kernel recorded it.
    pub facts: Option<WorkloadFacts>,
    /// The TCP peer (inbound, plaintext).
    pub src: Option<SocketAddr>,
    /// The destination: the original one of a captured connect, the local
    /// workload of an inbound stream.
    pub dst: Option<SocketAddr>,
    pub src_id: Option<String>,
    pub dst_id: Option<String>,
    /// The SVIDs of this node's workloads in the connection, held while it
    /// is open: an SVID in use is renewed at half its life and listed as
    /// held (`IdentityManager::renew_due`), not dropped as unused. Set
    /// with their ids ([`ConnRecord::set_src_svid`], [`ConnRecord::set_dst_svid`]).
    _src_svid: Option<Arc<crate::identity::IssuedSvid>>,
    _dst_svid: Option<Arc<crate::identity::IssuedSvid>>,
    pub plaintext_mode: Option<&'static str>,
    /// Mutual TLS on the way (an HBONE tunnel).
    pub mtls: bool,
    pub same_node: bool,
    /// The HBONE stream rode on a pooled connection (no new TLS handshake).
    pub hbone_reused: Option<bool>,
    /// Audit-log ids of the policy decisions taken for this connection.
    pub decision_ids: Vec<String>,
    pub policy_reason: Option<std::sync::Arc<str>>,
    /// Bytes sent to and received from the workload this record is about
    /// (the source for outbound, the destination for inbound).
    sent: u64,
    received: u64,
    outcome: Option<Outcome>,
    /// Counted in the open-by-identity view under its direction and
    /// `src_id`/`dst_id` (from [`ConnRecord::relaying`]).
    counted: bool,
    /// The connection's span (`[traces]` on), ended with the record; boxed,
    /// so that a record with traces off stays small.
    trace: Option<Box<crate::otel::Span>>,
}

impl ConnRecord {
    /// The source workload's SVID (`None`: it has none): its SPIFFE ID in
    /// the record, and the SVID held while the connection is open.
    pub fn set_src_svid(&mut self, svid: Option<&Arc<crate::identity::IssuedSvid>>) {
        self.src_id = svid.map(|s| s.svid.spiffe_id.to_string());
        self._src_svid = svid.cloned();
    }

    /// The same for a destination workload of this node.
    pub fn set_dst_svid(&mut self, svid: Option<&Arc<crate::identity::IssuedSvid>>) {
        self.dst_id = svid.map(|s| s.svid.spiffe_id.to_string());
        self._dst_svid = svid.cloned();
    }

    /// A connection accepted now: counted open until the record is dropped.
    pub fn open(metrics: Arc<Metrics>, kind: Kind, id: u64) -> Self {
        metrics.opened(direction(kind));
        // An inbound stream's span waits for the peer's trace context
        // ([`ConnRecord::trace_from`]); the others start a trace.
        let trace = match kind {
            Kind::Inbound => None,
            Kind::Outbound | Kind::Plaintext => start_span(kind, None),
        };
        Self {
            metrics,
            kind,
            id,
            started: Instant::now(),
            facts: None,
            src: None,
            dst: None,
            src_id: None,
            dst_id: None,
            _src_svid: None,
            _dst_svid: None,
            plaintext_mode: None,
            mtls: kind == Kind::Inbound,
            same_node: false,
            hbone_reused: None,
            decision_ids: Vec::new(),
            policy_reason: None,
            sent: 0,
            received: 0,
            outcome: None,
            counted: false,
            trace,
        }
    }

    /// Starts the span of an inbound stream, the child of the trace context
    /// the peer agent sent with its CONNECT (else a new trace's root).
    pub fn trace_from(&mut self, headers: &http::HeaderMap) {
        if crate::otel::enabled() {
            self.trace = start_span(self.kind, crate::otel::extract(headers).as_ref());
        }
    }

    /// The connection span's context, to carry to the peer agent and to
    /// parent request spans (`None` when untraced).
    pub fn trace_context(&self) -> Option<opentelemetry::trace::SpanContext> {
        use opentelemetry::trace::Span as _;
        self.trace.as_ref().map(|s| s.span_context().clone())
    }

    /// Relaying starts, its identities known: counted open by identity
    /// (`/status`) until dropped, under `src_id` and `dst_id` as they are
    /// now (neither changes once relaying starts).
    pub fn relaying(&mut self) {
        if !self.counted {
            self.metrics.open_by_identity.add((
                direction(self.kind),
                self.src_id.clone(),
                self.dst_id.clone(),
            ));
            self.counted = true;
        }
    }

    /// How the connection ended, and the bytes it moved (sent, received).
    pub fn end(&mut self, outcome: Outcome, (sent, received): (u64, u64)) {
        self.outcome = Some(outcome);
        self.sent = sent;
        self.received = received;
    }

    /// Ended before any byte was relayed.
    pub fn refused(&mut self, outcome: Outcome) {
        self.end(outcome, (0, 0));
    }
}

/// A connection's span as of now (`None` when traces are off), the child of
/// `parent` when given.
fn start_span(
    kind: Kind,
    parent: Option<&opentelemetry::trace::SpanContext>,
) -> Option<Box<crate::otel::Span>> {
    use opentelemetry::trace::SpanKind;
    let (name, span_kind) = match kind {
        Kind::Outbound => ("outbound connection", SpanKind::Client),
        Kind::Inbound => ("inbound connection", SpanKind::Server),
        Kind::Plaintext => ("inbound plaintext connection", SpanKind::Server),
    };
    crate::otel::start(name, span_kind, std::time::SystemTime::now(), parent).map(Box::new)
}

impl ConnRecord {
    /// Ends the connection's span with what the "connection closed" line
    /// says.
    fn end_span(&mut self, outcome: Outcome) {
        use opentelemetry::{KeyValue, trace::Span as _};
        let Some(mut span) = self.trace.take() else {
            return;
        };
        let mut a = vec![
            KeyValue::new("enforcer.conn_id", self.id as i64),
            KeyValue::new("enforcer.direction", direction(self.kind).as_str()),
            KeyValue::new("enforcer.outcome", outcome.as_str()),
            KeyValue::new("enforcer.mtls", self.mtls),
            KeyValue::new("enforcer.bytes_sent", self.sent as i64),
            KeyValue::new("enforcer.bytes_received", self.received as i64),
        ];
        if !self.decision_ids.is_empty() {
            let decision = if outcome == Outcome::Denied {
                "deny"
            } else {
                "allow"
            };
            a.push(KeyValue::new("enforcer.decision", decision));
            a.push(KeyValue::new(
                "enforcer.decision_ids",
                self.decision_ids.join(","),
            ));
        }
        if let Some(id) = &self.src_id {
            a.push(KeyValue::new("enforcer.source.spiffe_id", id.clone()));
        }
        if let Some(id) = &self.dst_id {
            a.push(KeyValue::new("enforcer.destination.spiffe_id", id.clone()));
        }
        if let Some(r) = &self.policy_reason {
            a.push(KeyValue::new("enforcer.policy_reason", r.to_string()));
        }
        if let Some(src) = self.src {
            a.push(KeyValue::new(
                "client.address",
                src.ip().to_canonical().to_string(),
            ));
            a.push(KeyValue::new("client.port", i64::from(src.port())));
        }
        if let Some(dst) = self.dst {
            a.push(KeyValue::new(
                "server.address",
                dst.ip().to_canonical().to_string(),
            ));
            a.push(KeyValue::new("server.port", i64::from(dst.port())));
        }
        if let Some(f) = &self.facts {
            a.push(KeyValue::new("process.pid", i64::from(f.pid)));
            a.push(KeyValue::new("process.executable.name", f.comm.clone()));
        }
        if let Some(r) = self.hbone_reused {
            a.push(KeyValue::new("enforcer.hbone_reused", r));
        }
        span.set_attributes(a);
        if !matches!(outcome, Outcome::Ok | Outcome::Denied) {
            span.set_status(opentelemetry::trace::Status::error(outcome.as_str()));
        }
        span.end();
    }
}

fn direction(kind: Kind) -> Direction {
    match kind {
        Kind::Outbound => Direction::outbound,
        Kind::Inbound | Kind::Plaintext => Direction::inbound,
    }
}

impl Drop for ConnRecord {
    fn drop(&mut self) {
        let outcome = match self.outcome {
            Some(o) => o,
            None => {
                let o = if drain::is_forced() {
                    Outcome::Drained
                } else {
                    Outcome::Error
                };
                warn!(
                    conn_id = self.id,
                    outcome = o.as_str(),
                    "the connection's task ended without an outcome (cancelled or panicked)"
                );
                o
            }
        };
        let (sent, received) = (self.sent, self.received);
        self.end_span(outcome);
        self.metrics
            .closed(direction(self.kind), outcome.as_str(), sent, received);
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let decision_ids = self.decision_ids.join(",");
        match self.kind {
            Kind::Outbound => {
                let facts = self.facts.as_ref();
                info!(
                    conn_id = self.id,
                    pid = facts.map(|f| f.pid),
                    uid = facts.map(|f| f.uid),
                    gid = facts.map(|f| f.gid),
                    comm = facts.map(|f| f.comm.as_str()),
                    cgroup = facts.and_then(|f| f.cgroup_path.as_deref()).unwrap_or(""),
                    cgroup_id = facts.map(|f| f.cgroup_id),
                    orig_dst = self.dst.map(tracing::field::display),
                    src_spiffe_id = self.src_id.as_deref(),
                    dst_spiffe_id = self.dst_id.as_deref(),
                    mtls = self.mtls,
                    same_node = self.same_node,
                    hbone_reused = self.hbone_reused,
                    decision_ids = %decision_ids,
                    policy_reason = self.policy_reason.as_deref(),
                    bytes_sent = sent,
                    bytes_received = received,
                    duration_ms,
                    outcome = outcome.as_str(),
                    "connection closed"
                );
            }
            Kind::Inbound | Kind::Plaintext => {
                let plaintext = self.kind == Kind::Plaintext;
                info!(
                    conn_id = self.id,
                    direction = "inbound",
                    src = self.src.map(tracing::field::display),
                    src_spiffe_id = self.src_id.as_deref(),
                    authenticated = !plaintext,
                    plaintext_mode = self.plaintext_mode,
                    dst = self.dst.map(tracing::field::display),
                    dst_spiffe_id = self.dst_id.as_deref(),
                    mtls = self.mtls,
                    bytes_sent = sent,
                    bytes_received = received,
                    duration_ms,
                    outcome = outcome.as_str(),
                    decision_ids = (!decision_ids.is_empty()).then_some(decision_ids.as_str()),
                    policy_reason = self.policy_reason.as_deref(),
                    "connection closed"
                );
            }
        }
        if self.counted {
            // The key it was counted under; the record is done with it.
            let key = (direction(self.kind), self.src_id.take(), self.dst_id.take());
            self.metrics.open_by_identity.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge_and_closed(m: &Metrics) -> String {
        m.encode()
            .lines()
            .filter(|l| {
                l.starts_with("enforcer_active_connections")
                    || l.starts_with("enforcer_connections_closed")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn a_record_dropped_without_an_outcome_still_closes_the_connection() {
        // A task cancelled (or panicking) mid-connection drops its record
        // without an outcome: the gauge comes back down and the connection
        // is counted as an error.
        let m = Arc::new(Metrics::new("t"));
        let rec = ConnRecord::open(m.clone(), Kind::Outbound, 1);
        assert!(
            gauge_and_closed(&m)
                .contains("enforcer_active_connections{node=\"t\",direction=\"outbound\"} 1"),
            "{}",
            gauge_and_closed(&m)
        );
        let panicked = std::thread::spawn(move || {
            let _rec = rec;
            panic!("a relay bug");
        })
        .join();
        assert!(panicked.is_err());
        let text = gauge_and_closed(&m);
        assert!(
            text.contains("enforcer_active_connections{node=\"t\",direction=\"outbound\"} 0"),
            "{text}"
        );
        assert!(text.contains("outcome=\"error\""), "{text}");
    }

    #[test]
    fn a_record_reports_its_outcome_and_bytes() {
        let m = Arc::new(Metrics::new("t"));
        let mut rec = ConnRecord::open(m.clone(), Kind::Inbound, 2);
        rec.end(Outcome::Ok, (10, 20));
        drop(rec);
        let text = gauge_and_closed(&m);
        assert!(text.contains("outcome=\"ok\""), "{text}");
        assert!(
            text.contains("enforcer_active_connections{node=\"t\",direction=\"inbound\"} 0"),
            "{text}"
        );
    }
}
