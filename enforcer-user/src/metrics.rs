//! Prometheus metrics. Every metric is listed in `docs/metrics.md`.
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// At most this many distinct SPIFFE IDs become label values of the decision
/// metric; later ones are counted under `other`, so a flood of identities
/// cannot blow up the metric's cardinality.
pub const MAX_ID_LABELS: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub direction: &'static str,
    pub result: &'static str,
    pub source: String,
    pub destination: String,
}

/// An L7 session's dealing with its server connection: the destination,
/// and why (a request sent again: `unwritten`, `unprocessed`, `closed`; a
/// kept connection replaced: `retired`, `closed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub destination: String,
    pub why: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// The policy in force: its bundle and manifest revision (empty for a
/// directory), the digest of its files, and the evaluator.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyInfoLabels {
    pub bundle: String,
    pub revision: String,
    pub digest: String,
    pub engine: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    outbound,
    inbound,
}

impl Direction {
    pub fn as_str(&self) -> &'static str {
        match self {
            Direction::outbound => "outbound",
            Direction::inbound => "inbound",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    pub direction: Direction,
    pub outcome: &'static str,
}

/// `flow`: `sent` = from the workload to its peer, `received` = back.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: Direction,
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

/// The SVID of one SPIFFE ID held on this node.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SvidLabels {
    pub spiffe_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AllocatorLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub reason: &'static str,
}

/// One request at an L7 destination (`result`: allow, deny, error,
/// would_deny, pass — no decision needed —, bad_request, upstream_error).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRequestLabels {
    pub source: String,
    pub destination: String,
    pub protocol: &'static str,
    pub result: &'static str,
}

/// One MCP JSON-RPC message at an `mcp` destination.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct McpCallLabels {
    pub source: String,
    pub destination: String,
    pub method: String,
    pub tool: String,
    pub result: &'static str,
}

/// Tokens at an `llm` destination (`kind`: prompt or completion).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LlmTokenLabels {
    pub source: String,
    pub destination: String,
    pub model: String,
    pub kind: &'static str,
}

/// A streamed LLM answer cut when the caller's budget ran out.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LlmCutLabels {
    pub source: String,
    pub destination: String,
    pub model: String,
}

/// A connection relaying now: its direction and the verified SPIFFE IDs
/// of its source and destination (`None`: none).
pub type OpenKey = (Direction, Option<String>, Option<String>);

/// Connections relaying now, by direction and verified identities: the
/// `/status` view. Not a Prometheus family: its keys are as many as the
/// identity pairs talking, which traffic decides.
#[derive(Default)]
pub struct OpenByIdentity(std::sync::Mutex<std::collections::HashMap<OpenKey, u64>>);

impl OpenByIdentity {
    pub fn add(&self, key: OpenKey) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(key).or_default() += 1;
    }

    pub fn remove(&self, key: &OpenKey) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(key);
            }
        }
    }

    /// Every pair with connections open, sorted.
    pub fn snapshot(&self) -> Vec<(OpenKey, u64)> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(OpenKey, u64)> = m.iter().map(|(k, n)| (k.clone(), *n)).collect();
        drop(m);
        v.sort_by(|a, b| {
            let key = |k: &OpenKey| (k.0 == Direction::inbound, k.1.clone(), k.2.clone());
            key(&a.0).cmp(&key(&b.0))
        });
        v
    }
}

pub struct Metrics {
    pub registry: Registry,
    /// Connections relaying now by identity (`/status`).
    pub open_by_identity: OpenByIdentity,
    pub connections_opened: Family<DirectionLabels, Counter>,
    pub connections_closed: Family<ClosedLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub active: Family<DirectionLabels, Gauge>,
    pub capture_map_entries: Family<MapLabels, Gauge>,
    pub capture_map_capacity: Family<MapLabels, Gauge>,
    pub ready: Gauge,
    pub svid_expiry: Family<SvidLabels, Gauge>,
    pub svid_renew: Family<SvidLabels, Gauge>,
    pub allocator_bytes: Family<AllocatorLabels, Gauge>,
    pub memory_releases: Counter,
    pub log_lines_dropped: Counter,
    pub executable_hashes: Counter,
    pub execs_after_connect: Counter,
    pub udp_refused: Counter,
    pub capture_records_swept: Counter,
    pub hbone_rejected: Family<RejectLabels, Counter>,
    pub hbone_streams_refused: Family<RejectLabels, Counter>,
    pub policy_decisions: Family<DecisionLabels, Counter>,
    pub policy_eval_seconds: Histogram,
    pub policy_reloads: Family<ResultLabels, Counter>,
    policy_info: Family<PolicyInfoLabels, Gauge>,
    decision_logs: Family<ResultLabels, Counter>,
    l7_upstream_retries: Family<RetryLabels, Counter>,
    l7_server_connections_replaced: Family<RetryLabels, Counter>,
    decision_log_uploads: Family<ResultLabels, Counter>,
    pub audit_write_failures: Counter,
    trace_spans: Family<ResultLabels, Counter>,
    http_requests: Family<HttpRequestLabels, Counter>,
    mcp_calls: Family<McpCallLabels, Counter>,
    llm_tokens: Family<LlmTokenLabels, Counter>,
    llm_streams_cut: Family<LlmCutLabels, Counter>,
    id_labels: std::sync::Mutex<std::collections::HashSet<String>>,
    name_labels: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Metrics {
    pub fn new(node: &str) -> Self {
        let mut root = Registry::with_prefix("enforcer");
        let registry = root.sub_registry_with_label(("node".into(), node.to_owned().into()));
        let connections_opened = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "connections_opened",
            "Connections accepted by the agent",
            connections_opened.clone(),
        );
        let connections_closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "connections_closed",
            "Connections finished, by outcome",
            connections_closed.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "bytes",
            "Payload bytes proxied (sent = workload to peer, received = peer to workload)",
            bytes.clone(),
        );
        let active = Family::<DirectionLabels, Gauge>::default();
        registry.register("active_connections", "Connections open now", active.clone());
        let capture_map_entries = Family::<MapLabels, Gauge>::default();
        registry.register(
            "capture_map_entries",
            "Entries in the kernel capture maps (sampled at scrape)",
            capture_map_entries.clone(),
        );
        let capture_map_capacity = Family::<MapLabels, Gauge>::default();
        registry.register(
            "capture_map_capacity",
            "Entries the kernel capture maps hold at most (LRU beyond)",
            capture_map_capacity.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when the agent is ready (/readyz answers 200): programs attached, listeners bound",
            ready.clone(),
        );
        let svid_expiry = Family::<SvidLabels, Gauge>::default();
        registry.register(
            "svid_expiry_timestamp_seconds",
            "When the SVID held for each SPIFFE ID expires (Unix time; sampled at scrape)",
            svid_expiry.clone(),
        );
        let svid_renew = Family::<SvidLabels, Gauge>::default();
        registry.register(
            "svid_renew_timestamp_seconds",
            "When the SVID held for each SPIFFE ID is due for renewal (Unix time; sampled at scrape)",
            svid_renew.clone(),
        );
        let allocator_bytes = Family::<AllocatorLabels, Gauge>::default();
        registry.register(
            "allocator_bytes",
            "The allocator's (jemalloc) view of the agent's memory, by kind: allocated (live objects), active (pages holding them), resident, retained (mapped, returned to the OS) (sampled at scrape); tcache = bytes held in the threads' caches (part of allocated)",
            allocator_bytes.clone(),
        );
        let memory_releases = Counter::default();
        registry.register(
            "memory_releases",
            "Times the agent gave memory back after a load passed: threads' allocation caches flushed, free pages returned to the OS",
            memory_releases.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines (standard error) dropped whole because the log writer was 16 MiB behind: standard error did not take them (sampled at scrape)",
            log_lines_dropped.clone(),
        );
        let executable_hashes = Counter::default();
        registry.register(
            "executable_hashes",
            "Executables hashed for a workload's unix:sha256 selector (its digest not cached); concurrent attestations of one executable share one hash (sampled at scrape)",
            executable_hashes.clone(),
        );
        let execs_after_connect = Counter::default();
        registry.register(
            "execs_after_connect",
            "Connections whose process exec'd (or whose pid was reused) between its connect and the agent's reading of its executable: attested without unix:path and unix:sha256 (sampled at scrape)",
            execs_after_connect.clone(),
        );
        let udp_refused = Counter::default();
        registry.register(
            "udp_refused",
            "UDP connects and sends of captured workloads to captured destinations that the kernel refused (capture.udp; sampled at scrape)",
            udp_refused.clone(),
        );
        let capture_records_swept = Counter::default();
        registry.register(
            "capture_records_swept",
            "Kernel records of connects the agent never accepted (the workload's socket closed, the record found untaken by four sweeps 5 s apart), removed by the agent",
            capture_records_swept.clone(),
        );
        let hbone_rejected = Family::<RejectLabels, Counter>::default();
        registry.register(
            "hbone_rejected",
            "Inbound HBONE connections refused before any stream, by reason",
            hbone_rejected.clone(),
        );
        let hbone_streams_refused = Family::<RejectLabels, Counter>::default();
        registry.register(
            "hbone_streams_refused",
            "CONNECT streams refused on an authenticated HBONE connection, by reason",
            hbone_streams_refused.clone(),
        );
        let policy_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "policy_decisions",
            "Policy decisions by direction, result and SPIFFE IDs (bounded)",
            policy_decisions.clone(),
        );
        let policy_eval_seconds = Histogram::new(exponential_buckets(1e-6, 2.0, 20));
        registry.register(
            "policy_evaluation_seconds",
            "Time to evaluate the policy (cache misses only)",
            policy_eval_seconds.clone(),
        );
        let policy_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads: ok, or rejected (did not compile; the previous stays)",
            policy_reloads.clone(),
        );
        let policy_info = Family::<PolicyInfoLabels, Gauge>::default();
        registry.register(
            "policy_info",
            "The policy in force (1): bundle name, manifest revision, digest of its files, evaluator",
            policy_info.clone(),
        );
        let decision_logs = Family::<ResultLabels, Counter>::default();
        registry.register(
            "decision_logs",
            "Decision-log events for the decision-log service: shipped, or dropped (buffer full)",
            decision_logs.clone(),
        );
        let l7_upstream_retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "l7_upstream_retries",
            "Requests at L7 destinations sent again on a new connection to the server, after the last one failed them unanswered: unwritten (never sent), unprocessed (HTTP/2: refused, or above the server's GOAWAY), closed (idempotent; the kept connection closed or reset under it)",
            l7_upstream_retries.clone(),
        );
        let l7_server_connections_replaced = Family::<RetryLabels, Counter>::default();
        registry.register(
            "l7_server_connections_replaced",
            "Kept HTTP/1.1 connections to the server of an L7 destination replaced by a new one for the next request: retired (idle past l7.server_idle_ms or the server's Keep-Alive hint, or its answer said Connection: close), closed (the server closed it, unannounced, while it waited: its idle timeout is below l7.server_idle_ms, and a request can cross that close)",
            l7_server_connections_replaced.clone(),
        );
        let decision_log_uploads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "decision_log_uploads",
            "Uploads of decision-log batches to the decision-log service: ok or failed (retried)",
            decision_log_uploads.clone(),
        );
        let audit_write_failures = Counter::default();
        registry.register(
            "audit_write_failures",
            "Audit log lines not written (write failed, e.g. disk full, or the writer's queue was full)",
            audit_write_failures.clone(),
        );
        let trace_spans = Family::<ResultLabels, Counter>::default();
        registry.register(
            "trace_spans",
            "Spans of [traces]: ended (queued for export), exported, failed (the receiver refused or did not answer); ended - exported - failed were dropped (queue full) or are waiting",
            trace_spans.clone(),
        );
        let http_requests = Family::<HttpRequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Requests at L7 destinations by SPIFFE IDs (bounded), protocol and result",
            http_requests.clone(),
        );
        let mcp_calls = Family::<McpCallLabels, Counter>::default();
        registry.register(
            "mcp_calls",
            "MCP JSON-RPC messages by SPIFFE IDs, method and tool (bounded) and result",
            mcp_calls.clone(),
        );
        let llm_tokens = Family::<LlmTokenLabels, Counter>::default();
        registry.register(
            "llm_tokens",
            "Tokens at LLM destinations by SPIFFE IDs and model (bounded) and kind (prompt, completion)",
            llm_tokens.clone(),
        );
        let llm_streams_cut = Family::<LlmCutLabels, Counter>::default();
        registry.register(
            "llm_streams_cut",
            "Streamed LLM answers ended because the caller's token budget ran out",
            llm_streams_cut.clone(),
        );
        Self {
            http_requests,
            mcp_calls,
            llm_tokens,
            llm_streams_cut,
            name_labels: Default::default(),
            policy_decisions,
            policy_eval_seconds,
            policy_reloads,
            policy_info,
            decision_logs,
            l7_upstream_retries,
            l7_server_connections_replaced,
            decision_log_uploads,
            audit_write_failures,
            trace_spans,
            id_labels: Default::default(),
            hbone_rejected,
            hbone_streams_refused,
            registry: root,
            connections_opened,
            connections_closed,
            bytes,
            active,
            capture_map_entries,
            capture_map_capacity,
            open_by_identity: OpenByIdentity::default(),
            ready,
            svid_expiry,
            svid_renew,
            allocator_bytes,
            memory_releases,
            log_lines_dropped,
            executable_hashes,
            execs_after_connect,
            udp_refused,
            capture_records_swept,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Metrics {
    /// Connections open now, both directions.
    pub fn open_connections(&self) -> u64 {
        [Direction::outbound, Direction::inbound]
            .into_iter()
            .map(|direction| {
                let n = self
                    .active
                    .get_or_create(&DirectionLabels { direction })
                    .get();
                u64::try_from(n).unwrap_or(0)
            })
            .sum()
    }

    /// A connection was accepted.
    pub fn opened(&self, direction: Direction) {
        let d = DirectionLabels { direction };
        self.connections_opened.get_or_create(&d).inc();
        self.active.get_or_create(&d).inc();
    }

    /// A connection ended: its outcome and payload bytes (sent = towards the
    /// peer, received = from it, from the local workload's point of view).
    pub fn closed(&self, direction: Direction, outcome: &'static str, sent: u64, received: u64) {
        self.active
            .get_or_create(&DirectionLabels {
                direction: direction.clone(),
            })
            .dec();
        self.connections_closed
            .get_or_create(&ClosedLabels {
                direction: direction.clone(),
                outcome,
            })
            .inc();
        for (flow, n) in [("sent", sent), ("received", received)] {
            self.bytes
                .get_or_create(&BytesLabels {
                    direction: direction.clone(),
                    flow,
                })
                .inc_by(n);
        }
    }
}

/// `value` itself for the first [`MAX_ID_LABELS`] distinct values (of at
/// most 2048 bytes, the longest SPIFFE ID) seen in `seen`, `other` after that.
fn capped(seen: &std::sync::Mutex<std::collections::HashSet<String>>, value: &str) -> String {
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    if seen.contains(value) {
        return value.to_owned();
    }
    if seen.len() < MAX_ID_LABELS && value.len() <= 2048 {
        seen.insert(value.to_owned());
        return value.to_owned();
    }
    "other".into()
}

impl Metrics {
    /// A label value for a SPIFFE ID: the ID itself for the first
    /// [`MAX_ID_LABELS`] distinct IDs, `other` after that, `none` when absent.
    fn id_label(&self, id: Option<&str>) -> String {
        match id {
            Some(id) => capped(&self.id_labels, id),
            None => "none".into(),
        }
    }

    /// A label value for a name a client chose (an MCP method or tool),
    /// capped as SPIFFE IDs are; `""` when absent.
    fn name_label(&self, name: Option<&str>) -> String {
        name.map(|n| capped(&self.name_labels, n))
            .unwrap_or_default()
    }

    pub fn http_request(
        &self,
        protocol: &'static str,
        result: &'static str,
        src: Option<&str>,
        dst: Option<&str>,
    ) {
        let labels = HttpRequestLabels {
            source: self.id_label(src),
            destination: self.id_label(dst),
            protocol,
            result,
        };
        self.http_requests.get_or_create(&labels).inc();
    }

    pub fn mcp_call(
        &self,
        method: &str,
        tool: Option<&str>,
        result: &'static str,
        src: Option<&str>,
        dst: Option<&str>,
    ) {
        let labels = McpCallLabels {
            source: self.id_label(src),
            destination: self.id_label(dst),
            method: self.name_label(Some(method)),
            tool: self.name_label(tool),
            result,
        };
        self.mcp_calls.get_or_create(&labels).inc();
    }

    /// Counts one answer's tokens.
    pub fn llm_tokens(
        &self,
        src: Option<&str>,
        dst: Option<&str>,
        model: &str,
        prompt: u64,
        completion: u64,
    ) {
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            let labels = LlmTokenLabels {
                source: self.id_label(src),
                destination: self.id_label(dst),
                model: self.name_label(Some(model)),
                kind,
            };
            // Both kinds are shown once a model answered, zero or not.
            self.llm_tokens.get_or_create(&labels).inc_by(n);
        }
    }

    pub fn llm_stream_cut(&self, src: Option<&str>, dst: Option<&str>, model: &str) {
        let labels = LlmCutLabels {
            source: self.id_label(src),
            destination: self.id_label(dst),
            model: self.name_label(Some(model)),
        };
        self.llm_streams_cut.get_or_create(&labels).inc();
    }

    pub fn policy_decision(
        &self,
        direction: &'static str,
        result: &'static str,
        src: Option<&str>,
        dst: Option<&str>,
    ) {
        let labels = DecisionLabels {
            direction,
            result,
            source: self.id_label(src),
            destination: self.id_label(dst),
        };
        self.policy_decisions.get_or_create(&labels).inc();
    }

    /// Shows `labels` as the one policy in force.
    pub fn policy_in_force(&self, labels: PolicyInfoLabels) {
        self.policy_info.clear();
        self.policy_info.get_or_create(&labels).set(1);
    }

    /// A request an L7 session sent again to the server at `dst`.
    pub fn l7_upstream_retry(&self, dst: Option<&str>, why: &'static str) {
        self.by_destination(&self.l7_upstream_retries, dst, why);
    }

    /// A kept server connection an L7 session replaced, at `dst`.
    pub fn l7_server_connection_replaced(&self, dst: Option<&str>, why: &'static str) {
        self.by_destination(&self.l7_server_connections_replaced, dst, why);
    }

    fn by_destination(
        &self,
        family: &Family<RetryLabels, Counter>,
        dst: Option<&str>,
        why: &'static str,
    ) {
        let labels = RetryLabels {
            destination: self.id_label(dst),
            why,
        };
        family.get_or_create(&labels).inc();
    }

    pub fn decision_logs(&self, result: &'static str, n: u64) {
        self.decision_logs
            .get_or_create(&ResultLabels { result })
            .inc_by(n);
    }

    pub fn decision_log_upload(&self, result: &'static str) {
        self.decision_log_uploads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn trace_spans(&self, result: &'static str, n: u64) {
        self.trace_spans
            .get_or_create(&ResultLabels { result })
            .inc_by(n);
    }

    pub fn policy_reload(&self, result: &'static str) {
        self.policy_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}
