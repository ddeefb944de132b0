//! MCP over streamable HTTP (DESIGN §1.7): each JSON-RPC message of a POST
//! is read; `tools/call` is decided by tool name and arguments,
//! `resources/read` (and subscribe) by URI, `prompts/get` by name, any other
//! request by its method; `initialize`, `ping`, notifications, responses and
//! the list calls pass. The lists' answers — JSON or server-sent events —
//! keep only the items this caller may use: each item is decided as the
//! call it names would be, with `listing: true` and no arguments.
use std::{collections::HashMap, sync::Arc};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{HeaderMap, Response, StatusCode, header, request::Parts, response};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use serde_json::{Map, Value, json};
use sse_stream::{SseBody, SseStream};
use tracing::{info, warn};

use super::{
    decode::Answer,
    http::{Body, BoxError, Session, full, json_response},
};

/// JSON-RPC: the body is not JSON.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC: not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// The error code of a call the policy denied (JSON-RPC's server range).
pub const DENIED: i64 = -32001;
/// Largest list answer read whole to be filtered.
const MAX_LIST_ANSWER: usize = 16 * 1024 * 1024;
/// The first protocol version without JSON-RPC batches.
const NO_BATCHES_FROM: &str = "2025-06-18";
/// JSON-RPC error of the 2026-07-28 protocol for routing headers that
/// disagree with the body.
pub const HEADER_MISMATCH: i64 = -32020;

/// Which list a call asked for, and so how its items are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Tools,
    Resources,
    Templates,
    Prompts,
}

impl ListKind {
    const ALL: [ListKind; 4] = [Self::Tools, Self::Resources, Self::Templates, Self::Prompts];

    fn of_method(method: &str) -> Option<Self> {
        match method {
            "tools/list" => Some(Self::Tools),
            "resources/list" => Some(Self::Resources),
            "resources/templates/list" => Some(Self::Templates),
            "prompts/list" => Some(Self::Prompts),
            _ => None,
        }
    }

    /// The member of `result` that holds the items.
    fn key(self) -> &'static str {
        match self {
            Self::Tools => "tools",
            Self::Resources => "resources",
            Self::Templates => "resourceTemplates",
            Self::Prompts => "prompts",
        }
    }

    /// The `mcp` input deciding whether an item is shown: the call that
    /// would use it, marked `listing`. An item without its name is dropped.
    fn item_input(self, item: &Value, base: &Map<String, Value>) -> Option<Value> {
        let text = |k: &str| item.get(k).and_then(Value::as_str).map(str::to_owned);
        let mut m = base.clone();
        match self {
            Self::Tools => {
                m.insert("method".into(), "tools/call".into());
                m.insert("tool".into(), text("name")?.into());
            }
            Self::Resources => {
                m.insert("method".into(), "resources/read".into());
                m.insert("resource_uri".into(), text("uri")?.into());
            }
            Self::Templates => {
                m.insert("method".into(), "resources/read".into());
                m.insert("resource_uri".into(), text("uriTemplate")?.into());
            }
            Self::Prompts => {
                m.insert("method".into(), "prompts/get".into());
                m.insert("prompt".into(), text("name")?.into());
            }
        }
        m.insert("listing".into(), true.into());
        Some(Value::Object(m))
    }
}

/// What a POST's list calls were (by JSON-RPC id), and the request fields
/// their items are decided with.
#[derive(Default)]
pub struct Lists {
    ids: HashMap<String, ListKind>,
    fields: Map<String, Value>,
}

impl Lists {
    /// No list calls; answers holding a list are filtered with `fields`.
    pub fn none(fields: Map<String, Value>) -> Self {
        Self {
            ids: HashMap::new(),
            fields,
        }
    }
}

/// What to do with a POST.
pub enum Plan {
    /// Answer now; nothing reaches the server.
    Respond(Response<Body>),
    /// Forward; filter the answers to these list calls.
    Forward(Lists),
}

pub(super) fn rpc_error(id: Value, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut error = json!({"code": code, "message": message});
    if let Some(d) = data {
        error["data"] = d;
    }
    json!({"jsonrpc": "2.0", "id": id, "error": error})
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The calls whose use the policy decides; the rest pass (the handshakes of
/// both protocol eras, pings, notifications, lists — filtered instead).
fn decided(method: &str) -> bool {
    !(method == "initialize"
        || method == "server/discover"
        || method == "ping"
        || method.starts_with("notifications/")
        || ListKind::of_method(method).is_some())
}

/// The `mcp` block of the input for one request or notification.
pub fn mcp_input(msg: &Map<String, Value>, headers: &HeaderMap) -> Map<String, Value> {
    let mut m = Map::new();
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    m.insert("method".into(), method.into());
    if let Some(id) = msg.get("id") {
        m.insert("id".into(), id.clone());
    }
    if let Some(s) = header(headers, "mcp-session-id") {
        m.insert("session".into(), s.into());
    }
    if let Some(v) = header(headers, "mcp-protocol-version") {
        m.insert("protocol_version".into(), v.into());
    }
    let params = msg.get("params");
    let param = |k: &str| params.and_then(|p| p.get(k)).cloned();
    match method {
        "tools/call" => {
            if let Some(t) = param("name") {
                m.insert("tool".into(), t);
            }
            if let Some(a) = param("arguments") {
                m.insert("arguments".into(), a);
            }
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            if let Some(u) = param("uri") {
                m.insert("resource_uri".into(), u);
            }
        }
        "prompts/get" => {
            if let Some(p) = param("name") {
                m.insert("prompt".into(), p);
            }
            if let Some(a) = param("arguments") {
                m.insert("arguments".into(), a);
            }
        }
        _ => {}
    }
    m
}

/// The routing headers of the 2026-07-28 protocol (`Mcp-Method`, and
/// `Mcp-Name` for the name-bearing methods) mirror the body for
/// intermediaries; the policy decides on the body, so a request whose
/// headers say otherwise is refused rather than let anything after this
/// agent act on a name that was not decided. Why, when they disagree.
fn routing_header_mismatch(
    method: &str,
    msg: &Map<String, Value>,
    headers: &HeaderMap,
) -> Option<String> {
    if let Some(h) = headers.get("mcp-method")
        && h.to_str().ok() != Some(method)
    {
        return Some(format!(
            "the Mcp-Method header ({h:?}) does not match the body's method {method:?}"
        ));
    }
    let key = match method {
        "tools/call" | "prompts/get" => "name",
        "resources/read" => "uri",
        _ => return None,
    };
    let h = headers.get("mcp-name")?;
    let body = msg.get("params").and_then(|p| p.get(key))?.as_str();
    let decoded = h.to_str().ok().and_then(|v| {
        match v
            .strip_prefix("=?base64?")
            .and_then(|r| r.strip_suffix("?="))
        {
            Some(b64) => {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
                String::from_utf8(bytes).ok()
            }
            None => Some(v.to_owned()),
        }
    });
    (decoded.as_deref() != body).then(|| {
        format!("the Mcp-Name header ({h:?}) does not match the body's params.{key} {body:?}")
    })
}

enum Kind {
    /// A request (it has an id) or a notification.
    Call {
        method: String,
        id: Option<Value>,
    },
    Response,
}

fn classify(msg: &Value) -> Option<(Kind, &Map<String, Value>)> {
    let obj = msg.as_object()?;
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return None;
    }
    if let Some(method) = obj.get("method") {
        let method = method.as_str()?.to_owned();
        let id = obj.get("id").cloned();
        if id
            .as_ref()
            .is_some_and(|i| !(i.is_string() || i.is_number()))
        {
            return None;
        }
        return Some((Kind::Call { method, id }, obj));
    }
    (obj.contains_key("id") && (obj.contains_key("result") || obj.contains_key("error")))
        .then_some((Kind::Response, obj))
}

/// Decides the JSON-RPC messages of one POST.
pub async fn decide_post(
    session: &Session,
    parts: &Parts,
    body: &[u8],
    truncated: bool,
    fields: Map<String, Value>,
    request_id: &str,
) -> Plan {
    let refuse = |status: StatusCode, err: Value| {
        session.count("bad_request");
        Plan::Respond(json_response(status, &err))
    };
    if truncated {
        warn!(
            request_id,
            "MCP request larger than max_body_bytes; refused without a decision"
        );
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            rpc_error(
                Value::Null,
                INVALID_REQUEST,
                &format!(
                    "request larger than {} bytes: cannot be decided",
                    session.route.max_body_bytes
                ),
                None,
            ),
        );
    }
    // Parsed already when the content type said JSON; the JSON-RPC body is
    // read as JSON whatever it says.
    let json_type = super::http::is_json(&super::http::content_type(&parts.headers));
    let parsed = match fields.get("parsed_body").filter(|_| json_type) {
        Some(v) => Ok(v.clone()),
        None => serde_json::from_slice::<Value>(body),
    };
    let parsed: Value = match parsed {
        Ok(v) => v,
        Err(e) => {
            warn!(request_id, error = %e, "MCP request is not JSON; refused (-32700)");
            return refuse(
                StatusCode::BAD_REQUEST,
                rpc_error(Value::Null, PARSE_ERROR, &format!("Parse error: {e}"), None),
            );
        }
    };
    let (messages, batch) = match parsed {
        Value::Array(a) => (a, true),
        other => (vec![other], false),
    };
    if batch {
        let version = header(&parts.headers, "mcp-protocol-version");
        let why = if messages.is_empty() {
            Some("an empty batch".to_owned())
        } else {
            version
                .filter(|v| *v >= NO_BATCHES_FROM)
                .map(|v| format!("protocol version {v} has no JSON-RPC batches"))
        };
        if let Some(why) = why {
            return refuse(
                StatusCode::BAD_REQUEST,
                rpc_error(Value::Null, INVALID_REQUEST, &why, None),
            );
        }
    }
    let mut lists = Lists::default();
    let mut input = session.input(fields);
    // Per message: (its id if a request, the denial if denied).
    let mut outcomes: Vec<(Option<Value>, Option<crate::policy::Verdict>)> = Vec::new();
    let mut any_decided = false;
    let src = session.conn.source.spiffe_id.as_deref();
    let dst = session.conn.destination.spiffe_id.as_deref();
    for msg in &messages {
        let Some((kind, obj)) = classify(msg) else {
            let id = msg.get("id").cloned().unwrap_or(Value::Null);
            warn!(request_id, "not a JSON-RPC 2.0 message; refused (-32600)");
            return refuse(
                StatusCode::BAD_REQUEST,
                rpc_error(id, INVALID_REQUEST, "not a JSON-RPC 2.0 message", None),
            );
        };
        let Kind::Call { method, id } = kind else {
            session
                .l7
                .metrics
                .mcp_call("response", None, "pass", src, dst);
            continue;
        };
        if let Some(why) = routing_header_mismatch(&method, obj, &parts.headers) {
            warn!(
                request_id,
                why, "MCP routing headers disagree with the body; refused"
            );
            return refuse(
                StatusCode::BAD_REQUEST,
                rpc_error(
                    id.unwrap_or(Value::Null),
                    HEADER_MISMATCH,
                    &format!("Header mismatch: {why}"),
                    None,
                ),
            );
        }
        if let (Some(id), Some(list)) = (&id, ListKind::of_method(&method)) {
            lists.ids.insert(id.to_string(), list);
        }
        let mcp = mcp_input(obj, &parts.headers);
        let tool = mcp.get("tool").and_then(Value::as_str).map(str::to_owned);
        if !decided(&method) {
            session
                .l7
                .metrics
                .mcp_call(&method, tool.as_deref(), "pass", src, dst);
            outcomes.push((id, None));
            continue;
        }
        any_decided = true;
        if let Some(r) = input.request.as_mut() {
            r.insert("mcp".into(), Value::Object(mcp));
        }
        let verdict = session.decide_input(&input, request_id).await;
        let result = verdict.result;
        session
            .l7
            .metrics
            .mcp_call(&method, tool.as_deref(), result, src, dst);
        info!(request_id, method, tool, result, reason = ?verdict.decision.reason,
            decision_id = verdict.decision_id, "MCP call decided");
        outcomes.push((id, (!verdict.allowed).then_some(verdict)));
    }
    if !outcomes.iter().any(|(_, denied)| denied.is_some()) {
        session.count(if any_decided { "allow" } else { "pass" });
        // The request's fields, without the last message's `mcp` block.
        let mut fields = input.request.map(|r| *r).unwrap_or_default();
        fields.remove("mcp");
        lists.fields = fields;
        return Plan::Forward(lists);
    }
    session.count("deny");
    let data = |v: &crate::policy::Verdict| json!({"decision_id": v.decision_id, "request_id": request_id});
    let errors: Vec<Value> = outcomes
        .iter()
        .filter_map(|(id, denied)| {
            let id = id.clone()?;
            Some(match denied {
                Some(v) => {
                    let reason = v.decision.reason.as_deref().unwrap_or("no rule allows it");
                    rpc_error(
                        id,
                        DENIED,
                        &format!("denied by policy: {reason}"),
                        Some(data(v)),
                    )
                }
                None => rpc_error(
                    id,
                    DENIED,
                    "not run: another request in this batch was denied",
                    None,
                ),
            })
        })
        .collect();
    let body = match (batch, errors.len()) {
        // Only notifications, and one was denied.
        (_, 0) => {
            let v = outcomes.iter().find_map(|(_, d)| d.as_ref());
            let reason = v
                .and_then(|v| v.decision.reason.as_deref())
                .unwrap_or("no rule allows it");
            return Plan::Respond(json_response(
                StatusCode::FORBIDDEN,
                &rpc_error(
                    Value::Null,
                    DENIED,
                    &format!("denied by policy: {reason}"),
                    v.map(data),
                ),
            ));
        }
        (false, _) => errors.into_iter().next().unwrap_or(Value::Null),
        (true, _) => Value::Array(errors),
    };
    Plan::Respond(json_response(StatusCode::OK, &body))
}

/// Keeps the items of a list answer the caller may use.
async fn filter_items(
    session: &Session,
    kind: ListKind,
    result: &mut Map<String, Value>,
    fields: &Map<String, Value>,
    request_id: &str,
) {
    let Some(Value::Array(items)) = result.get_mut(kind.key()).map(std::mem::take) else {
        return;
    };
    // What every item's `mcp` block shares: the list request's session and
    // protocol version (from its headers, as `mcp_input` reads them).
    let headers = fields
        .get("attributes")
        .and_then(|a| a.pointer("/request/http/headers"));
    let mut base = Map::new();
    for (key, header) in [
        ("session", "mcp-session-id"),
        ("protocol_version", "mcp-protocol-version"),
    ] {
        if let Some(v) = headers.and_then(|h| h.get(header)) {
            base.insert(key.into(), v.clone());
        }
    }
    // One input for the whole list; only its `mcp` block changes per item.
    let mut input = session.input(fields.clone());
    let mut kept = Vec::with_capacity(items.len());
    let mut hidden = 0usize;
    for item in items {
        let Some(mcp) = kind.item_input(&item, &base) else {
            hidden += 1;
            continue;
        };
        if let Some(r) = input.request.as_mut() {
            r.insert("mcp".into(), mcp);
        }
        if session.decide_input(&input, request_id).await.allowed {
            kept.push(item);
        } else {
            hidden += 1;
        }
    }
    if hidden > 0 {
        info!(
            request_id,
            list = kind.key(),
            kept = kept.len(),
            hidden,
            "MCP list filtered"
        );
    }
    result.insert(kind.key().into(), Value::Array(kept));
}

/// Filters the list answers in one JSON-RPC message (or batch of them):
/// those answering a list call of `lists`, and — `by_shape`: on a stream,
/// where the request is not known, and in the answer to a POST that made a
/// list call, whose id the server may have rewritten — any answer that
/// holds a list.
async fn filter_message(
    session: &Session,
    msg: &mut Value,
    lists: &Lists,
    request_id: &str,
    by_shape: bool,
) -> bool {
    let one = |m: &Value| -> Option<ListKind> {
        let id = m.get("id")?.to_string();
        let result = m.get("result")?.as_object()?;
        lists.ids.get(&id).copied().or_else(|| {
            by_shape
                .then(|| {
                    ListKind::ALL
                        .into_iter()
                        .find(|k| result.get(k.key()).is_some_and(Value::is_array))
                })
                .flatten()
        })
    };
    let mut changed = false;
    let targets: Vec<&mut Value> = match msg {
        Value::Array(a) => a.iter_mut().collect(),
        other => vec![other],
    };
    for m in targets {
        let Some(kind) = one(m) else { continue };
        if let Some(Value::Object(result)) = m.get_mut("result") {
            filter_items(session, kind, result, &lists.fields, request_id).await;
            changed = true;
        }
    }
    changed
}

/// Whether an event's data is meant as JSON (an object or an array).
fn looks_like_json(data: &str) -> bool {
    data.trim_start().starts_with(['{', '['])
}

/// The server's answer, with list answers filtered: a JSON body is read
/// whole (up to 16 MiB; larger, or not JSON, and the answer is refused
/// rather than passed unfiltered); an SSE stream is filtered event by event.
pub async fn filter_response(
    session: Arc<Session>,
    mut parts: response::Parts,
    body: Incoming,
    lists: Lists,
    request_id: &str,
) -> Response<Body> {
    let ct = super::http::content_type(&parts.headers);
    let refuse = |why: String| {
        warn!(
            request_id,
            why, "an MCP list answer could not be filtered; refused"
        );
        session.count("upstream_error");
        json_response(
            StatusCode::BAD_GATEWAY,
            &json!({"error": "bad_gateway", "reason": why, "request_id": request_id}),
        )
    };
    // An answer that is not read here (neither a stream nor a list) passes
    // as it came, compressed or not.
    if ct != "text/event-stream" && lists.ids.is_empty() {
        return Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
    }
    // Asked for plain (`Accept-Encoding: identity`), compressed anyway: read
    // decoded, and passed on so; in a coding not decoded here, refused.
    let body = match Answer::new(&mut parts.headers, body) {
        Ok(b) => b,
        Err(coding) => {
            return refuse(format!(
                "the server answered with content-encoding {coding} although identity was asked for: \
                 enforcer reads MCP answers to filter them and decodes only {}",
                super::decode::DECODED
            ));
        }
    };
    if ct == "text/event-stream" {
        parts.headers.remove(header::CONTENT_LENGTH);
        let lists = Arc::new(lists);
        let rid: Arc<str> = request_id.into();
        let events = SseStream::new(body).then(move |event| {
            let (session, lists, rid) = (session.clone(), lists.clone(), rid.clone());
            async move {
                let mut event = event?;
                let Some(data) = &event.data else {
                    return Ok(event);
                };
                match serde_json::from_str::<Value>(data) {
                    Ok(mut v) => {
                        if filter_message(&session, &mut v, &lists, &rid, true).await {
                            event.data = Some(v.to_string());
                        }
                    }
                    // JSON this parser refuses but a client's may read
                    // (`NaN`, which the SDK's pydantic parser takes): it
                    // could be a list, so it is not passed unfiltered — the
                    // answer is cut, as a JSON answer that cannot be read is
                    // refused. Data that is not JSON at all (the legacy SSE
                    // transport's `endpoint` URL) passes.
                    Err(e) if looks_like_json(data) => {
                        warn!(request_id = %rid, error = %e,
                            "an MCP event could not be read to filter it; the answer is cut");
                        session.count("upstream_error");
                        return Err(sse_stream::Error::Body(
                            format!("MCP event not filterable: {e}").into(),
                        ));
                    }
                    Err(_) => {}
                }
                Ok::<_, sse_stream::Error>(event)
            }
        });
        let body = SseBody::new(Box::pin(events))
            .map_err(BoxError::from)
            .boxed_unsync();
        return Response::from_parts(parts, body);
    }
    let bytes = match Limited::new(body, MAX_LIST_ANSWER).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return refuse(format!("reading the list answer: {e}")),
    };
    let mut v: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return refuse(format!("the list answer is not JSON: {e}")),
    };
    // By shape too: a server may answer with the id as it read it (the
    // TypeScript SDK answers `1.0` with `1`), so an id that matches no list
    // call does not mean the answer holds no list.
    filter_message(&session, &mut v, &lists, request_id, true).await;
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, full(Bytes::from(v.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_headers_must_agree_with_the_body() {
        let msg = |v: Value| v.as_object().cloned().unwrap_or_default();
        let call = msg(json!({"params": {"name": "search_docs"}}));
        let read = msg(json!({"params": {"uri": "file:///a"}}));
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, http::HeaderValue::from_static(v));
            }
            m
        };
        let cases: [(&str, &Map<String, Value>, HeaderMap, bool); 8] = [
            ("tools/call", &call, h(&[]), true),
            (
                "tools/call",
                &call,
                h(&[("mcp-method", "tools/call"), ("mcp-name", "search_docs")]),
                true,
            ),
            // base64 form of "search_docs"
            (
                "tools/call",
                &call,
                h(&[("mcp-name", "=?base64?c2VhcmNoX2RvY3M=?=")]),
                true,
            ),
            (
                "tools/call",
                &call,
                h(&[("mcp-method", "tools/list")]),
                false,
            ),
            ("tools/call", &call, h(&[("mcp-name", "delete_doc")]), false),
            (
                "tools/call",
                &call,
                h(&[("mcp-name", "=?base64?!!?=")]),
                false,
            ),
            (
                "resources/read",
                &read,
                h(&[("mcp-name", "file:///b")]),
                false,
            ),
            ("ping", &call, h(&[("mcp-name", "anything")]), true),
        ];
        for (method, body, headers, agree) in cases {
            assert_eq!(
                routing_header_mismatch(method, body, &headers).is_none(),
                agree,
                "{method} {headers:?}"
            );
        }
    }

    #[test]
    fn the_mcp_block_names_tool_arguments_uri_and_prompt() {
        let mut h = HeaderMap::new();
        h.insert("mcp-session-id", "s1".parse().expect("value"));
        let msg = |v: Value| v.as_object().cloned().expect("object");
        let call = mcp_input(
            &msg(json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                "params": {"name": "search_docs", "arguments": {"query": "q"}}})),
            &h,
        );
        assert_eq!(
            Value::Object(call),
            json!({"method": "tools/call", "id": 7, "session": "s1", "tool": "search_docs",
                "arguments": {"query": "q"}})
        );
        let read = mcp_input(
            &msg(
                json!({"jsonrpc": "2.0", "id": "a", "method": "resources/read",
                "params": {"uri": "file:///x"}}),
            ),
            &HeaderMap::new(),
        );
        assert_eq!(read["resource_uri"], "file:///x");
        let prompt = mcp_input(
            &msg(json!({"jsonrpc": "2.0", "id": 1, "method": "prompts/get",
                "params": {"name": "p", "arguments": {"a": "1"}}})),
            &HeaderMap::new(),
        );
        assert_eq!(prompt["prompt"], "p");
        assert_eq!(prompt["arguments"], json!({"a": "1"}));
    }

    #[test]
    fn what_is_decided_and_what_passes() {
        for m in [
            "tools/call",
            "resources/read",
            "prompts/get",
            "completion/complete",
            "x/y",
        ] {
            assert!(decided(m), "{m}");
        }
        for m in [
            "initialize",
            "server/discover",
            "ping",
            "notifications/initialized",
            "tools/list",
            "resources/templates/list",
        ] {
            assert!(!decided(m), "{m}");
        }
    }

    #[test]
    fn only_json_rpc_2_messages_are_accepted() {
        let ok = |v: Value| classify(&v).is_some();
        assert!(ok(json!({"jsonrpc": "2.0", "id": 1, "method": "ping"})));
        assert!(ok(json!({"jsonrpc": "2.0", "method": "notifications/x"})));
        assert!(ok(json!({"jsonrpc": "2.0", "id": 1, "result": {}})));
        assert!(!ok(json!({"jsonrpc": "1.0", "id": 1, "method": "ping"})));
        assert!(!ok(json!({"id": 1, "method": "ping"})));
        assert!(!ok(
            json!({"jsonrpc": "2.0", "id": {"x": 1}, "method": "ping"})
        ));
        assert!(!ok(json!({"jsonrpc": "2.0", "id": 1, "method": 5})));
        assert!(!ok(json!({"jsonrpc": "2.0", "id": 1})));
        assert!(!ok(json!([1])));
    }

    #[test]
    fn list_items_are_decided_as_the_call_they_name() {
        let base = Map::from_iter([("session".to_owned(), Value::from("s"))]);
        let tool = ListKind::Tools
            .item_input(&json!({"name": "delete_doc", "inputSchema": {}}), &base)
            .expect("named");
        assert_eq!(
            tool,
            json!({"session": "s", "method": "tools/call", "tool": "delete_doc", "listing": true})
        );
        assert!(
            ListKind::Tools
                .item_input(&json!({"title": "x"}), &base)
                .is_none()
        );
        let t = ListKind::Templates
            .item_input(&json!({"uriTemplate": "file:///{p}"}), &base)
            .expect("named");
        assert_eq!(t["resource_uri"], "file:///{p}");
    }
}
