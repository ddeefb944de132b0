//! Traces over OTLP (docs/config.md `[traces]`): a span per
//! relayed connection and, at L7 destinations, per request, exported in
//! batches to an OTLP/HTTP receiver. Off unless `traces.endpoint` is set.
//!
//! - A captured outbound connection starts a trace (its span is a root) and
//!   carries the span's context to the peer agent as a W3C `traceparent`
//!   header on the HBONE CONNECT request, so the inbound agent's span is its
//!   child: both nodes' spans are one trace.
//! - A request's span is the child of the workload's own `traceparent` when
//!   the request has one (the workload's trace is continued, and the span
//!   links to the connection's span), else of the connection's span. The
//!   request is forwarded unchanged: enforcer adds no header to it.
//! - Spans end when the connection closes and when the answer has been
//!   sent (a streamed LLM answer: with its token counts).
//!
//! Export runs on the SDK's own thread; the HTTP requests go out from a
//! runtime of their own (thread `otel-export`, apart from the data plane),
//! from marked sockets, like every connection of the agent.
//! The queue is bounded (`traces.max_queue`): spans that do not fit are
//! dropped, never waited for — see `enforcer_trace_spans_total`.
use std::{
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use opentelemetry::{
    Context, KeyValue,
    propagation::TextMapPropagator as _,
    trace::{
        Span as _, SpanContext, SpanKind, Status, TraceContextExt as _, Tracer as _,
        TracerProvider as _,
    },
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{
        BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData,
        SpanExporter,
    },
};

use crate::{config::TracesConfig, metrics::Metrics};

/// An ended span of the SDK (ends itself when dropped).
pub type Span = opentelemetry_sdk::trace::Span;

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Whether spans are made at all (`traces.endpoint` set).
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// The exporter in force; [`Exporting::shutdown`] sends what is queued.
pub struct Exporting {
    provider: SdkTracerProvider,
}

impl Exporting {
    /// Exports the spans still queued (at most `timeout`), off the runtime.
    pub async fn shutdown(self, timeout: Duration) {
        let provider = self.provider;
        let done =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout)).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "traces: the last spans were not all exported")
            }
            Err(e) => tracing::warn!(error = %e, "traces: the exporter's shutdown failed"),
        }
    }
}

/// Starts exporting (once per process; `None` when `traces.endpoint` is
/// empty).
pub fn init(
    config: &TracesConfig,
    node: &str,
    metrics: Arc<Metrics>,
) -> Result<Option<Exporting>, String> {
    if config.endpoint.is_empty() {
        return Ok(None);
    }
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
    let timeout = Duration::from_secs(config.timeout_secs);
    let client = AgentHttp {
        client: crate::policy::source::https_client(None)?,
        runtime: export_runtime()?,
        timeout,
        endpoint: config.endpoint.clone(),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(config.endpoint.clone())
        .with_timeout(timeout)
        .with_http_client(client)
        .build()
        .map_err(|e| format!("traces.endpoint {:?}: {e}", config.endpoint))?;
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(config.max_queue)
        .with_max_export_batch_size(config.max_batch.min(config.max_queue))
        .with_scheduled_delay(Duration::from_millis(config.batch_delay_ms))
        .build();
    let processor = BatchSpanProcessor::builder(Counted {
        inner: exporter,
        metrics: metrics.clone(),
    })
    .with_batch_config(batch)
    .build();
    let resource = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", config.service_name.clone()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", node.to_owned()),
            KeyValue::new("host.name", node.to_owned()),
        ])
        .build();
    use opentelemetry_sdk::trace::Sampler;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(EndCounter {
            inner: processor,
            metrics,
        })
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("enforcer");
    TRACER
        .set(tracer)
        .map_err(|_| "traces were already set up in this process".to_owned())?;
    Ok(Some(Exporting { provider }))
}

/// A runtime of its own for the export requests, on one thread
/// (`otel-export`), apart from the data plane: a batch's request body is
/// written there, not on a thread that relays connections.
fn export_runtime() -> Result<tokio::runtime::Handle, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("the export runtime: {e}"))?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("otel-export".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(|e| format!("the export thread: {e}"))?;
    Ok(handle)
}

/// Starts a span (`None` when traces are off), as of `start`, the child of
/// `parent` when given and valid, else a new trace's root.
pub fn start(
    name: &'static str,
    kind: SpanKind,
    start: SystemTime,
    parent: Option<&SpanContext>,
) -> Option<Span> {
    let tracer = TRACER.get()?;
    let cx = match parent {
        Some(p) if p.is_valid() => Context::new().with_remote_span_context(p.clone()),
        _ => Context::new(),
    };
    Some(
        tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(start)
            .start_with_context(tracer, &cx),
    )
}

/// The W3C trace context (`traceparent`, `tracestate`) of `headers`, when
/// valid.
pub fn extract(headers: &http::HeaderMap) -> Option<SpanContext> {
    if !headers.contains_key("traceparent") {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Puts `sc` into `headers` as W3C `traceparent` (and `tracestate`).
pub fn inject(sc: &SpanContext, headers: &mut http::HeaderMap) {
    if sc.is_valid() {
        let cx = Context::new().with_remote_span_context(sc.clone());
        TraceContextPropagator::new()
            .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
    }
}

/// A request's span, shared by the code that decides the request and the
/// body that streams its answer; it ends when the last holder drops it.
#[derive(Clone)]
pub struct RequestSpan(Arc<Mutex<Request>>);

struct Request {
    span: Span,
    /// A decision on this request (an MCP batch has several) denied.
    denied: bool,
}

tokio::task_local! {
    static REQUEST: RequestSpan;
}

impl RequestSpan {
    /// A request's span: the child of the workload's `traceparent` if the
    /// request carries one (linked to the connection's span), else of the
    /// connection's span.
    pub fn start(headers: &http::HeaderMap, conn: Option<&SpanContext>) -> Option<Self> {
        if !enabled() {
            return None;
        }
        let workload = extract(headers);
        let mut span = start(
            "request",
            SpanKind::Server,
            SystemTime::now(),
            workload.as_ref().or(conn),
        )?;
        if let (Some(_), Some(conn)) = (&workload, conn) {
            span.add_link(
                conn.clone(),
                vec![KeyValue::new("enforcer.link", "connection")],
            );
        }
        Some(Self(Arc::new(Mutex::new(Request {
            span,
            denied: false,
        }))))
    }

    fn with(&self, f: impl FnOnce(&mut Span)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()).span);
    }

    /// A policy decision on this request: its result and what it was about
    /// (the MCP method and tool, the LLM endpoint and model, the vector-DB
    /// operation and collection). The span is named after the latter.
    pub fn decided(&self, input: &crate::policy::Input, verdict: &crate::policy::Verdict) {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        r.denied |= !verdict.allowed;
        let mut a = vec![
            KeyValue::new("enforcer.decision", if r.denied { "deny" } else { "allow" }),
            KeyValue::new("enforcer.decision_result", verdict.result),
            KeyValue::new("enforcer.decision_id", verdict.decision_id.clone()),
        ];
        if let Some(reason) = &verdict.decision.reason {
            a.push(KeyValue::new("enforcer.policy_reason", reason.clone()));
        }
        let field = |block: &str, key: &str| {
            input
                .request
                .as_ref()
                .and_then(|m| m.get(block))
                .and_then(|b| b.get(key))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let mut name = None;
        if let Some(method) = field("mcp", "method") {
            let target = field("mcp", "tool")
                .map(|t| ("gen_ai.tool.name", t))
                .or_else(|| field("mcp", "prompt").map(|p| ("gen_ai.prompt.name", p)))
                .or_else(|| field("mcp", "resource_uri").map(|u| ("mcp.resource.uri", u)));
            name = Some(match &target {
                Some((_, t)) => format!("{method} {t}"),
                None => method.clone(),
            });
            a.push(KeyValue::new("mcp.method.name", method));
            if let Some((key, t)) = target {
                a.push(KeyValue::new(key, t));
            }
        }
        if let Some(endpoint) = field("llm", "endpoint") {
            let model = field("llm", "model");
            name = Some(match &model {
                Some(m) => format!("{endpoint} {m}"),
                None => endpoint.clone(),
            });
            a.push(KeyValue::new("gen_ai.operation.name", endpoint));
            if let Some(m) = model {
                a.push(KeyValue::new("gen_ai.request.model", m));
            }
        }
        if let Some(op) = field("vectordb", "operation") {
            let collection = field("vectordb", "collection");
            name = Some(match &collection {
                Some(c) => format!("{op} {c}"),
                None => op.clone(),
            });
            a.push(KeyValue::new("db.operation.name", op));
            if let Some(c) = collection {
                a.push(KeyValue::new("db.collection.name", c));
            }
        }
        r.span.set_attributes(a);
        if let Some(name) = name {
            r.span.update_name(name);
        }
    }

    /// An LLM answer's tokens, as counted for the caller.
    pub fn tokens(&self, prompt: u64, completion: u64, counted_by: &'static str) {
        self.set([
            KeyValue::new("gen_ai.usage.input_tokens", prompt as i64),
            KeyValue::new("gen_ai.usage.output_tokens", completion as i64),
            KeyValue::new("enforcer.tokens_counted_by", counted_by),
        ]);
    }

    pub fn set(&self, attributes: impl IntoIterator<Item = KeyValue>) {
        self.with(|s| s.set_attributes(attributes));
    }

    pub fn rename(&self, name: String) {
        self.with(|s| s.update_name(name));
    }

    pub fn error(&self, message: String) {
        self.with(|s| s.set_status(Status::error(message)));
    }

    /// Runs `fut` with this span as the current request's (see [`current`]).
    pub async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        REQUEST.scope(self, fut).await
    }
}

/// The span of the request being handled on this task, if traced.
pub fn current() -> Option<RequestSpan> {
    REQUEST.try_with(Clone::clone).ok()
}

/// Records on the current request's span (nothing when untraced).
pub fn on_request(f: impl FnOnce(&RequestSpan)) {
    let _ = REQUEST.try_with(f);
}

/// The exporter's HTTP client: the agent's own (marked sockets, rustls for
/// https://), its requests run on the export runtime. The SDK's export
/// thread only waits for them.
struct AgentHttp {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<crate::mark::MarkedConnector>,
        Full<Bytes>,
    >,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    endpoint: String,
}

impl std::fmt::Debug for AgentHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHttp")
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The most of a receiver's answer read (it says only what it accepted).
const MAX_ANSWER: usize = 64 * 1024;

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for AgentHttp {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let task = self.runtime.spawn(async move {
            let exchange = async move {
                let (parts, body) = request.into_parts();
                let resp = client
                    .request(http::Request::from_parts(parts, Full::new(body)))
                    .await
                    .map_err(|e| crate::policy::source::chain(&e))?;
                let (parts, body) = resp.into_parts();
                let body = http_body_util::Limited::new(body, MAX_ANSWER)
                    .collect()
                    .await
                    .map_err(|e| format!("reading the answer: {e}"))?
                    .to_bytes();
                Ok::<_, String>(http::Response::from_parts(parts, body))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            }
        });
        let failed = match task.await {
            Ok(Ok(resp)) => return Ok(resp),
            Ok(Err(e)) => e,
            Err(e) => format!("the export task: {e}"),
        };
        // The exporter reports this as a bare "network error": the cause
        // is said here.
        tracing::warn!(endpoint = %self.endpoint, error = %failed, "traces: the export request failed");
        Err(failed.into())
    }
}

/// Counts the spans exported and those whose export failed.
struct Counted<E> {
    inner: E,
    metrics: Arc<Metrics>,
}

impl<E> std::fmt::Debug for Counted<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counted")
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let r = self.inner.export(batch).await;
        match &r {
            Ok(()) => self.metrics.trace_spans("exported", n),
            Err(e) => {
                self.metrics.trace_spans("failed", n);
                tracing::warn!(spans = n, error = %e, "traces: exporting a batch failed; its spans are lost");
            }
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts the spans ended (handed to the batch queue): `ended` minus
/// `exported` and `failed` is what the queue holds or dropped.
struct EndCounter<P> {
    inner: P,
    metrics: Arc<Metrics>,
}

impl<P> std::fmt::Debug for EndCounter<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndCounter")
    }
}

impl<P: opentelemetry_sdk::trace::SpanProcessor> opentelemetry_sdk::trace::SpanProcessor
    for EndCounter<P>
{
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        self.metrics.trace_spans("ended", 1);
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
