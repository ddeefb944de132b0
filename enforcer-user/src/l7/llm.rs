//! `llm` destinations (DESIGN §1.7): OpenAI-compatible APIs. Each request's
//! endpoint, model, `stream` and `max_tokens`, with the caller's usage in
//! its current window, go to policy as the `llm` block; a denial is OpenAI's
//! error shape with 403. A caller whose token budget
//! (`data.enforcer.llm.budgets`) is spent gets 429 with `Retry-After`.
//! Answers are metered: `usage` of a JSON answer; of a streamed one, the
//! completion tokens as they arrive (o200k_base), reconciled with the
//! `usage` the stream ends with — asked for on the client's behalf when it
//! did not ask (`stream_options.include_usage`), and then taken out of what
//! the client receives. A stream that passes the caller's budget is ended
//! with an SSE error event, and the connection to the model closed.
use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderValue, Method, Response, StatusCode, header, request::Parts, response};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use serde_json::{Map, Value, json};
use sse_stream::{Sse, SseBody, SseStream};
use tracing::{debug, info, warn};

use super::{
    decode::{Answer, AnswerError, DECODED},
    http::{Body, BoxError, ReadBody, Session, body_json, json_response},
    tokens,
};
use crate::policy::budgets::{Budget, DEFAULT_WINDOW_SECS, Used};

/// Largest JSON answer read whole to be metered; a larger one streams on,
/// metered by the `usage` at its end.
const MAX_METERED_ANSWER: usize = 16 * 1024 * 1024;
/// How much of an oversized answer's end is kept to find its `usage` (the
/// last member of OpenAI's answers, or nearly).
const ANSWER_TAIL: usize = 64 * 1024;
/// The counters' key of a caller without a verified identity.
const UNAUTHENTICATED: &str = "unauthenticated";

/// What a request to an OpenAI-compatible API asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmRequest {
    /// `chat.completions`, `completions`, `responses`, `embeddings`,
    /// `models`, `fine_tuning`, `files`, `batches`…: the resource after
    /// `/v1/`; `unknown` for a path without `/v1/`.
    pub endpoint: String,
    pub model: Option<String>,
    pub stream: bool,
    /// `max_tokens`, `max_completion_tokens` or `max_output_tokens`.
    pub max_tokens: Option<u64>,
    /// The client asked for the usage chunk of a chat or completions stream.
    pub include_usage: bool,
}

impl LlmRequest {
    /// Reads a request from its path and JSON body. `Err` (why) when a
    /// field policy decides on is there but not of its type: OpenAI-
    /// compatible servers built on pydantic read `"max_tokens": "4096"` or
    /// `"stream": "true"` leniently, so a field this reading skipped would
    /// reach the server unseen by policy (a `max_tokens` cap passed with a
    /// string). A whole number written as a float (`4096.0`) is read as
    /// the number; `null` is absent, as in OpenAI's API.
    pub fn read(path: &str, body: Option<&Value>) -> Result<Self, String> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let after = segs.iter().position(|s| *s == "v1").map(|i| &segs[i + 1..]);
        let (endpoint, path_model) = match after {
            None | Some([]) => ("unknown".to_owned(), None),
            Some(["chat", "completions", ..]) => ("chat.completions".to_owned(), None),
            Some(["models", model, ..]) => (
                "models".to_owned(),
                Some(
                    percent_encoding::percent_decode_str(model)
                        .decode_utf8_lossy()
                        .into_owned(),
                ),
            ),
            Some([first, ..]) => ((*first).to_owned(), None),
        };
        let field = |k: &str| body.and_then(|b| b.get(k)).filter(|v| !v.is_null());
        let model = match field("model") {
            None => path_model,
            Some(Value::String(m)) => Some(m.clone()),
            Some(other) => return Err(format!("model is not a string: {other}")),
        };
        let flag = |v: Option<&Value>, name: &str| match v.filter(|v| !v.is_null()) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(format!("{name} is not a boolean: {other}")),
        };
        let mut max_tokens = None;
        for k in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
            let Some(v) = field(k) else { continue };
            let n = v
                .as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
                        .map(|f| f as u64)
                })
                .ok_or_else(|| format!("{k} is not a whole number of tokens: {v}"))?;
            // The largest of the ones given (a server may read any).
            max_tokens = Some(max_tokens.map_or(n, |m: u64| m.max(n)));
        }
        Ok(Self {
            model,
            stream: flag(field("stream"), "stream")?,
            max_tokens,
            include_usage: flag(
                field("stream_options").and_then(|o| o.get("include_usage")),
                "stream_options.include_usage",
            )?,
            endpoint,
        })
    }

    /// Whether answers carry token usage (and the request must be read
    /// whole to be decided).
    fn metered(&self) -> bool {
        matches!(
            self.endpoint.as_str(),
            "chat.completions" | "completions" | "responses" | "embeddings"
        )
    }

    /// A stream whose usage arrives only when asked for.
    fn usage_on_request(&self) -> bool {
        matches!(self.endpoint.as_str(), "chat.completions" | "completions")
    }
}

/// OpenAI's error object.
pub(super) fn openai_error(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: &str,
    extra: &[(&str, &str)],
) -> Response<Body> {
    let mut error = json!({"message": message, "type": kind, "param": null, "code": code});
    for (k, v) in extra {
        error[*k] = (*v).into();
    }
    json_response(status, &json!({ "error": error }))
}

/// A forwarded request whose answer is metered.
pub struct Call {
    req: LlmRequest,
    /// The caller's SPIFFE ID, or `unauthenticated`.
    source: String,
    window_secs: u64,
    budget: Option<Budget>,
    decision_id: String,
    request_id: String,
    /// The request body (for a prompt estimate when no usage arrives).
    body: Bytes,
    /// `include_usage` was added on the client's behalf.
    added_usage: bool,
    /// The request's span (traced): gets the tokens, ends after them.
    span: Option<crate::otel::RequestSpan>,
}

/// What to do with a request.
pub enum Plan {
    Respond(Response<Body>),
    /// Forward (with this body instead of the client's, when rewritten);
    /// meter the answer when there is a call.
    Forward {
        call: Option<Box<Call>>,
        body: Option<Bytes>,
    },
}

/// Decides one request to an `llm` destination.
pub(super) async fn decide(
    session: &Session,
    parts: &Parts,
    body: &ReadBody,
    mut fields: Map<String, Value>,
    request_id: &str,
) -> Plan {
    // OpenAI's bodies are JSON whatever their header says.
    let mut parsed = None;
    let json = body_json(&fields, &parts.headers, body, &mut parsed);
    let bad = |why: String| {
        warn!(
            request_id,
            why, "LLM request refused without a decision: its fields cannot be read"
        );
        session.count("bad_request");
        Plan::Respond(openai_error(
            StatusCode::BAD_REQUEST,
            &format!("{why}: the request cannot be decided"),
            "invalid_request_error",
            "unreadable_request",
            &[("request_id", request_id)],
        ))
    };
    let req = match LlmRequest::read(parts.uri.path(), json) {
        Ok(r) => r,
        Err(why) => return bad(why),
    };
    // A body policy cannot read (`NaN`, which Python's parsers take) would
    // reach the server with a model and max_tokens policy never saw; one
    // that is JSON but not an object names neither.
    if req.metered()
        && parts.method == Method::POST
        && !json.is_some_and(Value::is_object)
        && !body.truncated()
        && !body.seen.is_empty()
    {
        return bad(
            match serde_json::from_slice::<serde::de::IgnoredAny>(&body.seen) {
                Err(e) => format!("request body is not JSON ({e})"),
                Ok(_) => "request body is not a JSON object".to_owned(),
            },
        );
    }
    if body.truncated() && req.metered() && parts.method == Method::POST {
        warn!(
            request_id,
            endpoint = req.endpoint,
            "LLM request larger than max_body_bytes; refused without a decision"
        );
        session.count("bad_request");
        return Plan::Respond(openai_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "request larger than {} bytes (l7 max_body_bytes): its model cannot be decided",
                session.route.max_body_bytes
            ),
            "invalid_request_error",
            "request_too_large",
            &[("request_id", request_id)],
        ));
    }
    let source = session
        .conn
        .source
        .spiffe_id
        .clone()
        .unwrap_or_else(|| UNAUTHENTICATED.to_owned());
    let budget = session.l7.policy.llm_budgets().of(&source).cloned();
    let window_secs = budget
        .as_ref()
        .map_or(DEFAULT_WINDOW_SECS, |b| b.window_secs);
    let now = tokens::now();
    let used = session
        .l7
        .tokens
        .used(&source, req.model.as_deref(), window_secs, now);
    let mut llm = json!({
        "endpoint": req.endpoint,
        "stream": req.stream,
        "tokens_used_window": used.total,
        "model_tokens_used_window": used.model,
        "window_secs": window_secs,
    });
    if let Some(m) = &req.model {
        llm["model"] = m.as_str().into();
    }
    if let Some(n) = req.max_tokens {
        llm["max_tokens"] = n.into();
    }
    fields.insert("llm".into(), llm);
    let input = session.input(fields);
    let verdict = session.decide_input(&input, request_id).await;
    if !verdict.allowed {
        session.count(verdict.result);
        let reason = verdict
            .decision
            .reason
            .as_deref()
            .unwrap_or("no rule allows it");
        info!(
            request_id,
            endpoint = req.endpoint,
            model = req.model,
            reason,
            decision_id = verdict.decision_id,
            "LLM request denied"
        );
        return Plan::Respond(openai_error(
            StatusCode::FORBIDDEN,
            &format!("denied by policy: {reason}"),
            "permission_denied",
            "policy_denied",
            &[
                ("decision_id", &verdict.decision_id),
                ("request_id", request_id),
            ],
        ));
    }
    if let Some(why) = budget
        .as_ref()
        .and_then(|b| b.spent(used, req.model.as_deref()))
    {
        session.count("over_budget");
        let retry = (tokens::start_of(window_secs, now) + window_secs)
            .saturating_sub(now)
            .max(1);
        info!(
            request_id,
            source,
            model = req.model,
            why,
            retry_after = retry,
            "LLM request refused: token budget spent"
        );
        record(
            session,
            &Usage {
                req: &req,
                source: &source,
                decision_id: &verdict.decision_id,
                request_id,
                tokens: (0, 0),
                counted_by: "none",
                outcome: "refused_over_budget",
                used,
                window_secs,
            },
        );
        let mut resp = openai_error(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("{why}; the window resets in {retry} s"),
            "tokens",
            "rate_limit_exceeded",
            &[
                ("decision_id", &verdict.decision_id),
                ("request_id", request_id),
            ],
        );
        let h = resp.headers_mut();
        h.insert(header::RETRY_AFTER, HeaderValue::from(retry));
        // OpenAI's clients would otherwise retry, in vain, until the window ends.
        h.insert("x-should-retry", HeaderValue::from_static("false"));
        return Plan::Respond(resp);
    }
    session.count(verdict.result);
    if !(req.metered() && parts.method == Method::POST) {
        return Plan::Forward {
            call: None,
            body: None,
        };
    }
    // A stream's usage is asked for on the client's behalf.
    let mut rewritten = None;
    let added_usage = req.stream && req.usage_on_request() && !req.include_usage;
    if added_usage {
        parsed = parsed.or_else(|| input.request.and_then(|mut r| r.remove("parsed_body")));
    }
    if added_usage && let Some(Value::Object(mut o)) = parsed {
        let opts = o
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(opts) = opts {
            opts.insert("include_usage".into(), true.into());
        }
        rewritten = serde_json::to_vec(&o).ok().map(Bytes::from);
    }
    Plan::Forward {
        call: Some(Box::new(Call {
            added_usage: added_usage && rewritten.is_some(),
            req,
            source,
            window_secs,
            budget,
            decision_id: verdict.decision_id,
            request_id: request_id.to_owned(),
            body: body.seen.clone(),
            span: crate::otel::current(),
        })),
        body: rewritten,
    }
}

/// One answer's usage, for its audit line and metrics.
struct Usage<'a> {
    req: &'a LlmRequest,
    source: &'a str,
    decision_id: &'a str,
    request_id: &'a str,
    /// Prompt and completion tokens.
    tokens: (u64, u64),
    /// `usage` (the server's figures), `tokenizer` (counted here), `none`.
    counted_by: &'static str,
    /// `answered`, `cut_over_budget`, `refused_over_budget`, `broken`,
    /// `error_status`, `unmetered`.
    outcome: &'static str,
    /// The caller's window after this answer.
    used: Used,
    window_secs: u64,
}

/// Writes the usage line after the request's decision line, and counts the
/// tokens.
fn record(session: &Session, u: &Usage<'_>) {
    let (prompt, completion) = u.tokens;
    let model = u.req.model.as_deref().unwrap_or("");
    session.l7.metrics.llm_tokens(
        session.conn.source.spiffe_id.as_deref(),
        session.conn.destination.spiffe_id.as_deref(),
        model,
        prompt,
        completion,
    );
    let line = json!({
        "type": "llm_usage",
        "decision_id": u.decision_id,
        "conn_id": session.conn.id,
        "request_id": u.request_id,
        "source": u.source,
        "destination": session.conn.destination.spiffe_id,
        "endpoint": u.req.endpoint,
        "model": model,
        "stream": u.req.stream,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "counted_by": u.counted_by,
        "outcome": u.outcome,
        "window_secs": u.window_secs,
        "tokens_used_window": u.used.total,
    });
    session.l7.policy.audit.note(line);
}

impl Call {
    fn model(&self) -> &str {
        self.req.model.as_deref().unwrap_or("")
    }

    fn adder(&self, store: &Arc<tokens::Tokens>) -> Adder {
        Adder {
            store: store.clone(),
            source: self.source.clone(),
            model: self.model().to_owned(),
            window_secs: self.window_secs,
        }
    }

    /// Records a finished answer: `usage` when the server gave it; else the
    /// tokens counted here — `counted` completion tokens of a stream
    /// (already added), or those of a JSON `answer` — with the prompt, both
    /// counted with the tokenizer on the blocking pool.
    fn finish(
        self: Box<Self>,
        session: Arc<Session>,
        usage: Option<(u64, u64)>,
        counted: u64,
        answer: Option<Bytes>,
        outcome: &'static str,
    ) {
        let adder = self.adder(&session.l7.tokens);
        let done = move |call: Box<Call>, session: Arc<Session>, tokens: (u64, u64), by| {
            if let Some(span) = &call.span {
                span.tokens(tokens.0, tokens.1, by);
            }
            let used = session.l7.tokens.used(
                &call.source,
                Some(call.model()),
                call.window_secs,
                tokens::now(),
            );
            record(
                &session,
                &Usage {
                    req: &call.req,
                    source: &call.source,
                    decision_id: &call.decision_id,
                    request_id: &call.request_id,
                    tokens,
                    counted_by: by,
                    outcome,
                    used,
                    window_secs: call.window_secs,
                },
            );
        };
        match usage {
            Some((p, c)) => {
                // The server's figures replace what was counted on the way.
                adder.add(p as i64, c as i64 - counted as i64);
                done(self, session, (p, c), "usage");
            }
            None if outcome == "error_status" => done(self, session, (0, 0), "none"),
            None => {
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    done(self, session, (0, counted), "tokenizer");
                    return;
                };
                rt.spawn(async move {
                    let body = self.body.clone();
                    let (prompt, completion) = tokio::task::spawn_blocking(move || {
                        (
                            prompt_tokens(&body),
                            answer.map_or(0, |a| answer_tokens(&a)),
                        )
                    })
                    .await
                    .unwrap_or((0, 0));
                    adder.add(prompt as i64, completion as i64);
                    done(self, session, (prompt, counted + completion), "tokenizer");
                });
            }
        }
    }
}

/// Adds to one caller's and model's counters.
struct Adder {
    store: Arc<tokens::Tokens>,
    source: String,
    model: String,
    window_secs: u64,
}

impl Adder {
    fn add(&self, prompt: i64, completion: i64) {
        self.store.add(
            &self.source,
            &self.model,
            self.window_secs,
            tokens::now(),
            prompt,
            completion,
        );
    }
}

/// Counts the strings under the keys that hold text.
fn count_texts(v: &Value, keys: &[&str], out: &mut u64) {
    match v {
        Value::String(s) => *out += tokens::count(s),
        Value::Array(a) => a.iter().for_each(|x| count_texts(x, keys, out)),
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| keys.contains(&k.as_str()))
            .for_each(|(_, x)| count_texts(x, keys, out)),
        _ => {}
    }
}

/// A JSON answer's text (choices, output) counted with the tokenizer.
fn answer_tokens(body: &[u8]) -> u64 {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return 0;
    };
    let mut n = 0;
    count_texts(
        &v,
        &["choices", "message", "content", "text", "output", "refusal"],
        &mut n,
    );
    n
}

/// The prompt's text (messages, prompt, input) counted with the tokenizer.
fn prompt_tokens(body: &[u8]) -> u64 {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return 0;
    };
    let mut n = 0;
    count_texts(
        &v,
        &[
            "messages",
            "content",
            "text",
            "input",
            "prompt",
            "instructions",
        ],
        &mut n,
    );
    n
}

/// Prompt and completion tokens of an answer's `usage`.
fn usage_of(v: &Value) -> Option<(u64, u64)> {
    v.get("usage").and_then(usage_counts)
}

/// Prompt and completion tokens of a `usage` object.
pub(crate) fn usage_counts(u: &Value) -> Option<(u64, u64)> {
    u.as_object()?;
    let n = |k: &str| u.get(k).and_then(Value::as_u64);
    let prompt = n("prompt_tokens").or_else(|| n("input_tokens"))?;
    let completion = n("completion_tokens")
        .or_else(|| n("output_tokens"))
        .unwrap_or(0);
    Some((prompt, completion))
}

/// The server's answer to a metered call, metered.
pub async fn account(
    session: Arc<Session>,
    mut parts: response::Parts,
    body: Incoming,
    call: Box<Call>,
) -> Response<Body> {
    if !parts.status.is_success() {
        call.finish(session, None, 0, None, "error_status");
        return Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
    }
    // Asked for plain (`Accept-Encoding: identity`), compressed anyway: read
    // decoded, and passed on so. A coding not decoded here cannot be read,
    // so it is not passed on unmetered.
    let body = match Answer::new(&mut parts.headers, body) {
        Ok(b) => b,
        Err(coding) => {
            warn!(
                request_id = call.request_id,
                coding,
                "a metered LLM answer came in a content coding enforcer does not decode; refused"
            );
            let request_id = call.request_id.clone();
            session.count("upstream_error");
            call.finish(session, None, 0, None, "refused_encoded");
            return openai_error(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "the model's answer came with content-encoding {coding} although identity was \
                     asked for: enforcer meters answers and decodes only {DECODED}"
                ),
                "server_error",
                "answer_not_meterable",
                &[("request_id", &request_id)],
            );
        }
    };
    if super::http::content_type(&parts.headers) == "text/event-stream" {
        parts.headers.remove(header::CONTENT_LENGTH);
        let metered = Metered {
            inner: SseStream::new(body),
            adder: call.adder(&session.l7.tokens),
            responses: call.req.endpoint == "responses",
            added_usage: call.added_usage,
            session,
            call: Some(call),
            usage: None,
            counted: 0,
            ended: false,
            complete: false,
        };
        let body = SseBody::new(metered).map_err(BoxError::from).boxed_unsync();
        return Response::from_parts(parts, body);
    }
    // A JSON answer: read (up to the bound), metered, passed on unchanged.
    let read = match super::http::read_bounded(body, MAX_METERED_ANSWER).await {
        Ok(r) => r,
        Err(e) => {
            warn!(request_id = call.request_id, error = %e, "the model's answer broke off");
            call.finish(session, None, 0, None, "broken");
            return broken_answer(parts, e);
        }
    };
    if read.truncated() {
        // Too large to read whole: streamed on, its end kept for `usage`.
        debug!(
            request_id = call.request_id,
            "LLM answer larger than 16 MiB; metered by the usage at its end"
        );
        parts.headers.remove(header::CONTENT_LENGTH);
        let tail = Oversized {
            inner: http_body_util::BodyStream::new(read.into_body()),
            tail: Vec::with_capacity(2 * ANSWER_TAIL),
            bytes: 0,
            session,
            call: Some(call),
        };
        let body = http_body_util::StreamBody::new(tail).boxed_unsync();
        return Response::from_parts(parts, body);
    }
    let usage = serde_json::from_slice::<Value>(&read.seen)
        .ok()
        .and_then(|v| usage_of(&v));
    if usage.is_none() {
        debug!(request_id = call.request_id, "LLM answer without usage");
    }
    let answer = usage.is_none().then(|| read.seen.clone());
    call.finish(session, usage, 0, answer, "answered");
    Response::from_parts(parts, read.into_body())
}

/// An LLM JSON answer over [`MAX_METERED_ANSWER`], passed on as it arrives
/// and metered when it ends: by the `usage` found in its last
/// [`ANSWER_TAIL`] bytes, else (a server that reports none) by its size —
/// 4 bytes a token, its JSON included — so a large answer is never counted
/// as nothing.
struct Oversized {
    inner: http_body_util::BodyStream<Body>,
    /// The answer's end: at most 2 × ANSWER_TAIL, cut to ANSWER_TAIL.
    tail: Vec<u8>,
    /// Bytes passed on in all.
    bytes: u64,
    session: Arc<Session>,
    call: Option<Box<Call>>,
}

impl Oversized {
    fn end(&mut self, outcome: &'static str) {
        let Some(call) = self.call.take() else {
            return;
        };
        match usage_in_tail(&self.tail) {
            Some(u) => call.finish(self.session.clone(), Some(u), 0, None, outcome),
            None => {
                let estimate = self.bytes / 4;
                call.adder(&self.session.l7.tokens).add(0, estimate as i64);
                call.finish(self.session.clone(), None, estimate, None, outcome);
            }
        }
    }
}

impl Stream for Oversized {
    type Item = Result<hyper::body::Frame<Bytes>, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = ready!(Pin::new(&mut self.inner).poll_next(cx));
        match &next {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                    self.tail.extend_from_slice(data);
                    if self.tail.len() > 2 * ANSWER_TAIL {
                        let cut = self.tail.len() - ANSWER_TAIL;
                        self.tail.drain(..cut);
                    }
                }
            }
            Some(Err(e)) => {
                if let Some(c) = &self.call {
                    warn!(request_id = c.request_id, error = %e, "the model's answer broke off");
                }
                self.end("broken");
            }
            None => self.end("answered"),
        }
        Poll::Ready(next)
    }
}

impl Drop for Oversized {
    fn drop(&mut self) {
        // The client went away before the answer's end.
        self.end("broken");
    }
}

/// The `usage` of a JSON answer, from its end only: the last `"usage"`
/// member there whose value reads as usage. A `"usage"` that follows `{`
/// or `,` and precedes `:` is a member name, never text inside a string
/// (a quote in a string is escaped), so what a model writes cannot pose
/// as it.
fn usage_in_tail(tail: &[u8]) -> Option<(u64, u64)> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    while let Some(at) = tail[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        end = at;
        let before = tail[..at].iter().rev().find(|b| !b.is_ascii_whitespace());
        let after = &tail[at + KEY.len()..];
        let Some(colon) = after.iter().position(|b| !b.is_ascii_whitespace()) else {
            continue;
        };
        if !matches!(before, Some(b'{' | b',')) || after[colon] != b':' {
            continue;
        }
        let value = serde_json::Deserializer::from_slice(&after[colon + 1..])
            .into_iter::<Value>()
            .next();
        if let Some(Ok(v)) = value
            && let Some(u) = usage_counts(&v)
        {
            return Some(u);
        }
    }
    None
}

/// An answer that broke off while it was read: its head, then a body that
/// fails, so the client's connection is reset rather than ended as if the
/// answer were complete.
fn broken_answer(mut parts: response::Parts, e: AnswerError) -> Response<Body> {
    parts.headers.remove(header::CONTENT_LENGTH);
    let failing = futures_util::stream::once(async move {
        Err::<hyper::body::Frame<Bytes>, BoxError>(BoxError::from(e))
    });
    Response::from_parts(
        parts,
        http_body_util::StreamBody::new(failing).boxed_unsync(),
    )
}

/// A streamed answer, metered event by event.
struct Metered {
    inner: SseStream<Answer>,
    session: Arc<Session>,
    adder: Adder,
    /// A Responses API stream (else chat or completions chunks).
    responses: bool,
    /// `include_usage` was added on the client's behalf.
    added_usage: bool,
    call: Option<Box<Call>>,
    /// The `usage` the stream reported.
    usage: Option<(u64, u64)>,
    /// Completion tokens counted (and added to the counters) so far.
    counted: u64,
    ended: bool,
    /// The answer's last event was passed on (`[DONE]`, or the Responses
    /// API's `response.completed`): a client that goes away after it has
    /// the whole answer.
    complete: bool,
}

impl Metered {
    fn end(&mut self, outcome: &'static str) {
        self.ended = true;
        if let Some(call) = self.call.take() {
            call.finish(
                self.session.clone(),
                self.usage,
                self.counted,
                None,
                outcome,
            );
        }
    }

    /// Reads one event: counts its text, keeps its usage; `None` drops it
    /// (the usage chunk the client did not ask for).
    fn meter(&mut self, mut event: Sse) -> Option<Sse> {
        if self.call.is_none() {
            return Some(event);
        }
        let Some(data) = event.data.as_deref() else {
            return Some(event);
        };
        if data.trim() == "[DONE]" {
            self.complete = true;
            return Some(event);
        }
        // Completion tokens in this event, each text counted on its own
        // (the choices of one chunk are separate texts).
        let mut n = 0u64;
        let usage;
        if self.responses {
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                return Some(event);
            };
            usage = match v.get("type").and_then(Value::as_str) {
                Some(
                    "response.output_text.delta"
                    | "response.refusal.delta"
                    | "response.function_call_arguments.delta"
                    | "response.reasoning_text.delta",
                ) => {
                    if let Some(d) = v.get("delta").and_then(Value::as_str) {
                        n += tokens::count_delta(d);
                    }
                    None
                }
                Some("response.completed" | "response.incomplete" | "response.failed") => {
                    self.complete = true;
                    v.get("response").and_then(usage_of)
                }
                _ => None,
            };
        } else {
            // A chat or completions chunk: read without building its tree
            // (every chunk of every metered stream passes here).
            let Some(chunk) = super::chunk::Chunk::parse(data) else {
                return Some(event);
            };
            chunk.texts(|s| n += tokens::count_delta(s));
            usage = chunk.usage();
            if self.added_usage {
                // What the client did not ask for: the usage chunk, and the
                // `usage: null` of every other chunk.
                if usage.is_some() && chunk.no_choices() {
                    self.usage = usage;
                    return None;
                }
                if chunk.has("usage")
                    && let Some(without) = chunk.without("usage")
                {
                    // The other members as the server sent them.
                    event.data = Some(without);
                }
            }
        }
        if usage.is_some() {
            self.usage = usage;
        }
        if n > 0 {
            self.counted += n;
            self.adder.add(0, n as i64);
            if let Some(call) = &self.call
                && let Some(budget) = &call.budget
            {
                let used = self.session.l7.tokens.used(
                    &call.source,
                    Some(call.model()),
                    call.window_secs,
                    tokens::now(),
                );
                if budget.passed(used, Some(call.model())) {
                    let window = budget.window_secs;
                    return Some(self.cut_event(used, window));
                }
            }
        }
        Some(event)
    }

    /// Ends the stream over budget: an error event goes in place of the
    /// event that passed the budget, and the model's connection is closed.
    fn cut_event(&mut self, used: Used, window_secs: u64) -> Sse {
        let message = format!(
            "token budget exhausted during the answer: {} tokens used in this {window_secs} s window; the answer was cut",
            used.total
        );
        let request_id = self
            .call
            .as_ref()
            .map(|c| c.request_id.clone())
            .unwrap_or_default();
        if let Some(call) = &self.call {
            warn!(
                request_id,
                source = call.source,
                model = call.model(),
                counted = self.counted,
                "LLM stream cut: token budget exhausted"
            );
            let conn = &self.session.conn;
            self.session.l7.metrics.llm_stream_cut(
                conn.source.spiffe_id.as_deref(),
                conn.destination.spiffe_id.as_deref(),
                call.model(),
            );
        }
        self.session.abort_server();
        self.end("cut_over_budget");
        let error = json!({"message": message, "type": "tokens", "param": null,
            "code": "budget_exhausted", "request_id": request_id});
        let data = if self.responses {
            json!({"type": "error", "code": "budget_exhausted", "message": message, "param": null, "error": error})
        } else {
            json!({ "error": error })
        };
        Sse {
            event: self.responses.then(|| "error".to_owned()),
            data: Some(data.to_string()),
            id: None,
            retry: None,
        }
    }
}

impl Stream for Metered {
    type Item = Result<Sse, sse_stream::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.ended {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                None => {
                    self.end("answered");
                    return Poll::Ready(None);
                }
                Some(Err(e)) => {
                    if let Some(c) = &self.call {
                        warn!(request_id = c.request_id, error = %e, "the model's stream broke off");
                    }
                    self.end("broken");
                    return Poll::Ready(Some(Err(e)));
                }
                Some(Ok(event)) => {
                    if let Some(event) = self.meter(event) {
                        return Poll::Ready(Some(Ok(event)));
                    }
                }
            }
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // The client went away before the stream ended: after the answer's
        // last event (it has the whole answer, and only the server's end of
        // the stream was not read yet), or in the middle of it.
        if self.call.is_some() {
            self.end(if self.complete { "answered" } else { "broken" });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usage_at_an_answers_end_is_found_and_text_cannot_pose_as_it() {
        let answer = |content: &str, usage: &str| {
            format!(
                r#"{{"id":"x","choices":[{{"index":0,"message":{{"role":"assistant","content":{}}}}}]{usage},"system_fingerprint":"fp"}}"#,
                serde_json::to_string(content).expect("string")
            )
        };
        let real = r#","usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}"#;
        let fake = r#"{"usage": {"prompt_tokens": 0, "completion_tokens": 1}}"#;
        // OpenAI's shape: usage after the choices.
        assert_eq!(usage_in_tail(answer("hi", real).as_bytes()), Some((5, 7)));
        // A model that writes a usage object: it is text, escaped; the real
        // usage before or after it is found, and none when there is none.
        assert_eq!(usage_in_tail(answer(fake, real).as_bytes()), Some((5, 7)));
        assert_eq!(usage_in_tail(answer(fake, "").as_bytes()), None);
        let fake_after = format!(
            r#"{{"usage":{{"prompt_tokens":5,"completion_tokens":7}},"output":[{{"text":{}}}]}}"#,
            serde_json::to_string(fake).expect("string")
        );
        assert_eq!(usage_in_tail(fake_after.as_bytes()), Some((5, 7)));
        // The Responses API's names; whitespace around the colon.
        assert_eq!(
            usage_in_tail(br#"{"output":[], "usage" :  {"input_tokens": 3, "output_tokens": 4}}"#),
            Some((3, 4))
        );
        // Only the end of the answer kept: a tail that starts mid-answer.
        let whole = answer(&"word ".repeat(50_000), real);
        let tail = &whole.as_bytes()[whole.len() - 300..];
        assert_eq!(usage_in_tail(tail), Some((5, 7)));
        // A usage that is not one (no prompt count), or cut off: not found.
        assert_eq!(usage_in_tail(br#"{"usage":{"completion_tokens":7}}"#), None);
        assert_eq!(
            usage_in_tail(br#"{"usage":{"prompt_tokens":5,"compl"#),
            None
        );
    }

    #[test]
    fn requests_are_read_as_openai_defines_them() {
        let read = |path: &str, body: Option<&Value>| {
            LlmRequest::read(path, body).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let r = read(
            "/v1/chat/completions",
            Some(
                &json!({"model": "gpt-4o-mini", "stream": true, "max_completion_tokens": 64,
                "stream_options": {"include_usage": true}}),
            ),
        );
        assert_eq!(
            r,
            LlmRequest {
                endpoint: "chat.completions".into(),
                model: Some("gpt-4o-mini".into()),
                stream: true,
                max_tokens: Some(64),
                include_usage: true,
            }
        );
        let resp = read(
            "/openai/v1/responses",
            Some(&json!({"model": "m", "max_output_tokens": 9})),
        );
        assert_eq!(
            (resp.endpoint.as_str(), resp.max_tokens),
            ("responses", Some(9))
        );
        let get = read("/v1/models/ft%3Agpt-4o", None);
        assert_eq!(
            (get.endpoint.as_str(), get.model.as_deref()),
            ("models", Some("ft:gpt-4o"))
        );
        assert_eq!(read("/v1/fine_tuning/jobs", None).endpoint, "fine_tuning");
        assert_eq!(read("/v1/files", None).endpoint, "files");
        assert_eq!(read("/v1/batches", None).endpoint, "batches");
        assert_eq!(read("/healthz", None).endpoint, "unknown");
        assert!(read("/v1/embeddings", None).metered());
        assert!(!read("/v1/models", None).metered());
    }

    #[test]
    fn fields_policy_decides_on_are_read_as_their_type_or_refused() {
        // pydantic-based servers read these leniently; policy must see
        // what they will use, or refuse.
        let chat = |body: Value| LlmRequest::read("/v1/chat/completions", Some(&body));
        assert_eq!(
            chat(json!({"model": "m", "max_tokens": 4096.0})).map(|r| r.max_tokens),
            Ok(Some(4096))
        );
        assert_eq!(
            chat(json!({"model": "m", "max_tokens": 8, "max_completion_tokens": 900}))
                .map(|r| r.max_tokens),
            Ok(Some(900)),
            "the largest of those given"
        );
        assert_eq!(
            chat(json!({"model": "m", "max_tokens": null, "stream": null}))
                .map(|r| (r.max_tokens, r.stream)),
            Ok((None, false))
        );
        for bad in [
            json!({"model": "m", "max_tokens": "4096"}),
            json!({"model": "m", "max_tokens": 40.5}),
            json!({"model": "m", "max_tokens": -1}),
            json!({"model": "m", "max_output_tokens": [1]}),
            json!({"model": 7}),
            json!({"model": "m", "stream": "true"}),
            json!({"model": "m", "stream_options": {"include_usage": 1}}),
        ] {
            assert!(chat(bad.clone()).is_err(), "{bad} was read");
        }
    }

    #[test]
    fn usage_is_read_from_every_answer_shape() {
        assert_eq!(
            usage_of(
                &json!({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
            ),
            Some((3, 4))
        );
        assert_eq!(
            usage_of(&json!({"usage": {"input_tokens": 5, "output_tokens": 6}})),
            Some((5, 6))
        );
        assert_eq!(
            usage_of(&json!({"usage": {"prompt_tokens": 8, "total_tokens": 8}})),
            Some((8, 0))
        );
        assert_eq!(usage_of(&json!({"usage": null})), None);
        assert_eq!(usage_of(&json!({})), None);
    }

    #[test]
    fn the_prompt_is_estimated_from_its_texts() {
        tokens::load_tokenizer();
        let body = json!({"model": "m", "messages": [
            {"role": "system", "content": "hello world"},
            {"role": "user", "content": [{"type": "text", "text": "hello world"}]}]});
        assert_eq!(prompt_tokens(body.to_string().as_bytes()), 4);
        assert_eq!(prompt_tokens(b"not json"), 0);
    }
}
