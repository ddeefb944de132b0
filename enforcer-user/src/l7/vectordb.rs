//! `vectordb` destinations (DESIGN §1.7): Chroma's HTTP API (`/api/v2`).
//! Each request is classified — `read` (query, get, search, count, a
//! collection's or the server's metadata), `write` (add, upsert, update),
//! `delete` (records), `admin` (collections, databases, tenants, reset,
//! functions; and anything not recognised) — with its tenant, database and
//! collection **name**, and goes to policy as the `vectordb` block. A
//! denial is Chroma's error shape (`AuthorizationError`, 403), which its
//! client raises with the policy's reason.
//!
//! Data operations name their collection by id. The id is resolved by
//! asking the server (`collections/by-id/{id}` in the request's own tenant
//! and database, on the session's connection, with the request's headers),
//! so the name decided on is the one the server acts on, whatever spelling
//! of the id it accepts; an id the server does not know in that database is
//! answered with the server's own answer and never forwarded. Resolutions
//! are kept for [`FRESH_FOR`], and forgotten as soon as a request through
//! this agent renames or deletes a collection, a database or everything.
use std::{
    net::SocketAddr,
    num::NonZeroUsize,
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header, request::Parts};
use lru::LruCache;
use percent_encoding::percent_decode_str;
use serde_json::{Map, Value, json};
use tracing::{info, warn};

use super::http::{Body, ReadBody, Session, body_json, full, json_response, read_bounded};

/// How long a resolved collection id is used without asking again.
pub const FRESH_FOR: Duration = Duration::from_secs(10);
/// Resolved ids kept (all servers together).
const MAX_RESOLVED: usize = 4096;
/// Largest answer to a resolution read.
const MAX_LOOKUP_ANSWER: usize = 1024 * 1024;

/// The operation class policy decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Read,
    Write,
    Delete,
    Admin,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Write => "write",
            Class::Delete => "delete",
            Class::Admin => "admin",
        }
    }
}

/// Where a request names its collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    None,
    /// By name: in the path, a CRN or the body.
    Name(String),
    /// By id (the path segment as sent): resolved by asking the server.
    Id(String),
}

/// One request, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub operation: Class,
    /// The API operation: `query`, `add`, `create_collection`,
    /// `get_collection`…; `unknown` for a path not recognised.
    pub action: &'static str,
    pub tenant: Option<String>,
    pub database: Option<String>,
    pub target: Target,
    /// The tenant and database segments as sent (for the resolution).
    raw: Option<(String, String)>,
}

impl Op {
    fn of(operation: Class, action: &'static str) -> Self {
        Self {
            operation,
            action,
            tenant: None,
            database: None,
            target: Target::None,
            raw: None,
        }
    }

    fn unknown() -> Self {
        Self::of(Class::Admin, "unknown")
    }

    /// Whether a successful answer changes what ids resolve to.
    fn renames(&self) -> bool {
        matches!(
            self.action,
            "update_collection" | "delete_collection" | "delete_database" | "reset"
        )
    }

    /// Classifies a request of Chroma's v2 API by method and path (the
    /// body, when JSON, for the names a create carries). Route literals are
    /// matched as sent, as the server's router matches them; names in the
    /// path are percent-decoded for policy.
    pub fn read(method: &Method, path: &str, body: Option<&Value>) -> Self {
        let Some(rest) = path.strip_prefix("/api/v2/") else {
            return Self::unknown();
        };
        let s: Vec<&str> = rest.split('/').collect();
        let body_name = || {
            body.and_then(|b| b.get("name"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        match (method, s.as_slice()) {
            (&Method::GET, ["heartbeat"]) => Self::of(Class::Read, "heartbeat"),
            (&Method::GET, ["healthcheck"]) => Self::of(Class::Read, "healthcheck"),
            (&Method::GET, ["version"]) => Self::of(Class::Read, "version"),
            (&Method::GET, ["pre-flight-checks"]) => Self::of(Class::Read, "pre_flight_checks"),
            (&Method::GET, ["auth", "identity"]) => Self::of(Class::Read, "get_user_identity"),
            (&Method::POST, ["reset"]) => Self::of(Class::Admin, "reset"),
            (&Method::POST, ["tenants"]) => Self {
                tenant: body_name(),
                ..Self::of(Class::Admin, "create_tenant")
            },
            (&Method::GET, ["collections", crn]) => {
                // tenant:database:collection
                let crn = decoded(crn);
                let mut parts = crn.as_deref().unwrap_or("").splitn(3, ':');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(t), Some(d), Some(c)) if ![t, d, c].contains(&"") => Self {
                        tenant: Some(t.to_owned()),
                        database: Some(d.to_owned()),
                        target: Target::Name(c.to_owned()),
                        ..Self::of(Class::Read, "get_collection")
                    },
                    _ => Self::unknown(),
                }
            }
            (m, ["tenants", tenant, tail @ ..]) => match decoded(tenant) {
                Some(t) => {
                    let mut op = Self::tenant_op(m, tail, body_name());
                    if op.action != "unknown" {
                        op.tenant = Some(t);
                    }
                    if op.database.is_some()
                        && op.action != "create_database"
                        && let [_, db, ..] = tail
                    {
                        op.raw = Some(((*tenant).to_owned(), (*db).to_owned()));
                    }
                    op
                }
                None => Self::unknown(),
            },
            _ => Self::unknown(),
        }
    }

    /// `/tenants/{tenant}/…`, after the tenant.
    fn tenant_op(m: &Method, tail: &[&str], body_name: Option<String>) -> Self {
        use Class::*;
        let named = |class, action, c: &str| match decoded(c) {
            Some(c) => Self {
                target: Target::Name(c),
                ..Self::of(class, action)
            },
            None => Self::unknown(),
        };
        let by_id = |class, action, id: &str| match decoded(id) {
            Some(_) => Self {
                target: Target::Id(id.to_owned()),
                ..Self::of(class, action)
            },
            None => Self::unknown(),
        };
        let (db, tail) = match (m, tail) {
            (&Method::GET, []) => return Self::of(Read, "get_tenant"),
            (&Method::PATCH, []) => return Self::of(Admin, "update_tenant"),
            (&Method::GET, ["databases"]) => return Self::of(Admin, "list_databases"),
            (&Method::POST, ["databases"]) => {
                return Self {
                    database: body_name,
                    ..Self::of(Admin, "create_database")
                };
            }
            (_, ["databases", db, tail @ ..]) => match decoded(db) {
                Some(db) => (db, tail),
                None => return Self::unknown(),
            },
            _ => return Self::unknown(),
        };
        let mut op = match (m, tail) {
            (&Method::GET, []) => Self::of(Read, "get_database"),
            (&Method::DELETE, []) => Self::of(Admin, "delete_database"),
            (&Method::GET, ["collections"]) => Self::of(Admin, "list_collections"),
            (&Method::GET, ["collections_count"]) => Self::of(Admin, "count_collections"),
            (&Method::POST, ["collections"]) => Self {
                target: body_name.map_or(Target::None, Target::Name),
                ..Self::of(Admin, "create_collection")
            },
            (&Method::GET, ["collections", "by-id", id]) => by_id(Read, "get_collection", id),
            // By name, as Chroma's routes read these two.
            (&Method::GET, ["collections", name]) => named(Read, "get_collection", name),
            (&Method::DELETE, ["collections", name]) => named(Admin, "delete_collection", name),
            (&Method::PUT, ["collections", id]) => by_id(Admin, "update_collection", id),
            (&Method::POST, ["collections", id, verb]) => match *verb {
                "add" => by_id(Write, "add", id),
                "upsert" => by_id(Write, "upsert", id),
                "update" => by_id(Write, "update", id),
                "delete" => by_id(Delete, "delete", id),
                "get" => by_id(Read, "get", id),
                "query" => by_id(Read, "query", id),
                "search" => by_id(Read, "search", id),
                "fork" => by_id(Admin, "fork_collection", id),
                _ => Self::unknown(),
            },
            (&Method::GET, ["collections", id, verb]) => match *verb {
                "count" => by_id(Read, "count", id),
                "indexing_status" => by_id(Read, "indexing_status", id),
                "fork_count" => by_id(Read, "fork_count", id),
                _ => Self::unknown(),
            },
            (&Method::POST, ["collections", id, "functions", "attach"]) => {
                by_id(Admin, "attach_function", id)
            }
            (&Method::GET, ["collections", id, "functions", _]) => {
                by_id(Read, "get_attached_function", id)
            }
            (&Method::POST, ["collections", id, "attached_functions", _, "detach"]) => {
                by_id(Admin, "detach_function", id)
            }
            _ => Self::unknown(),
        };
        if op.action != "unknown" {
            op.database = Some(db);
        }
        op
    }
}

/// A name in the path, percent-decoded; `None` for one the server would
/// not route as read here (empty, a dot segment, not UTF-8, a slash).
fn decoded(raw: &str) -> Option<String> {
    match percent_decode_str(raw).decode_utf8() {
        Ok(s) if !s.is_empty() && s != "." && s != ".." && !s.contains('/') => Some(s.into_owned()),
        _ => None,
    }
}

/// A collection as the server named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub id: String,
    pub name: String,
    pub tenant: Option<String>,
    pub database: Option<String>,
}

type Key = (SocketAddr, String, String, uuid::Uuid);

/// Collection ids resolved, per server, tenant and database.
pub struct Collections {
    cache: Mutex<LruCache<Key, (Resolved, Instant)>>,
}

impl Default for Collections {
    fn default() -> Self {
        Self {
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(MAX_RESOLVED).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }
}

impl Collections {
    fn get(&self, key: &Key) -> Option<Resolved> {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match c.get(key) {
            Some((r, at)) if at.elapsed() < FRESH_FOR => Some(r.clone()),
            Some(_) => {
                c.pop(key);
                None
            }
            None => None,
        }
    }

    fn put(&self, key: Key, r: Resolved) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(key, (r, Instant::now()));
    }

    /// Forgets every resolution (a collection renamed or deleted).
    pub fn forget(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// What to do with a request.
pub enum Plan {
    Respond(Response<Body>),
    /// Forward; `renames`: forget the resolutions once it is answered.
    Forward {
        renames: bool,
    },
}

/// Chroma's error shape: its client raises `errors.error_types[error]`.
fn chroma_error(
    status: StatusCode,
    error: &str,
    message: &str,
    extra: &[(&str, &str)],
) -> Response<Body> {
    let mut body = json!({"error": error, "message": message});
    for (k, v) in extra {
        body[*k] = (*v).into();
    }
    json_response(status, &body)
}

/// Decides one request to a `vectordb` destination.
pub(super) async fn decide(
    session: &Session,
    parts: &Parts,
    body: &ReadBody,
    mut fields: Map<String, Value>,
    request_id: &str,
    authority: &str,
) -> Plan {
    let mut parsed = None;
    let op = Op::read(
        &parts.method,
        parts.uri.path(),
        body_json(&fields, &parts.headers, body, &mut parsed),
    );
    let renames = op.renames();
    let Op {
        operation,
        action,
        mut tenant,
        mut database,
        target,
        raw,
    } = op;
    let mut block = json!({"operation": operation.as_str(), "action": action});
    match target {
        Target::None => {}
        Target::Name(n) => block["collection"] = n.into(),
        Target::Id(raw_id) => {
            match resolve(session, parts, raw.as_ref(), &raw_id, request_id, authority).await {
                Ok(r) => {
                    block["collection"] = r.name.into();
                    block["collection_id"] = r.id.into();
                    tenant = r.tenant.or(tenant);
                    database = r.database.or(database);
                }
                Err(resp) => return Plan::Respond(resp),
            }
        }
    }
    if let Some(t) = tenant {
        block["tenant"] = t.into();
    }
    if let Some(d) = database {
        block["database"] = d.into();
    }
    fields.insert("vectordb".into(), block);
    let input = session.input(fields);
    let verdict = session.decide_input(&input, request_id).await;
    session.count(verdict.result);
    if !verdict.allowed {
        let reason = verdict
            .decision
            .reason
            .as_deref()
            .unwrap_or("no rule allows it");
        let collection = input
            .request
            .as_ref()
            .and_then(|r| r.get("vectordb"))
            .and_then(|v| v.get("collection"))
            .and_then(Value::as_str);
        info!(
            request_id,
            operation = operation.as_str(),
            action,
            collection,
            reason,
            decision_id = verdict.decision_id,
            "vector DB request denied"
        );
        return Plan::Respond(chroma_error(
            StatusCode::FORBIDDEN,
            "AuthorizationError",
            &format!("denied by policy: {reason}"),
            &[
                ("decision_id", &verdict.decision_id),
                ("request_id", request_id),
            ],
        ));
    }
    Plan::Forward { renames }
}

/// Resolves a collection id by asking the server, in the request's tenant
/// and database; `Err`: the answer for the client (the server's own when it
/// does not know the id there).
async fn resolve(
    session: &Session,
    parts: &Parts,
    raw: Option<&(String, String)>,
    raw_id: &str,
    request_id: &str,
    authority: &str,
) -> Result<Resolved, Response<Body>> {
    let refuse = |why: String| {
        warn!(
            request_id,
            id = raw_id,
            why,
            "vector DB collection id not resolved; refused"
        );
        session.count("unresolved");
        chroma_error(
            StatusCode::BAD_GATEWAY,
            "InternalError",
            &format!("enforcer could not resolve collection {raw_id}: {why}"),
            &[("request_id", request_id)],
        )
    };
    let Some((raw_tenant, raw_db)) = raw else {
        return Err(refuse("no tenant and database in the path".into()));
    };
    // What the id is, as the resolution's answer must confirm.
    let decoded = percent_decode_str(raw_id).decode_utf8_lossy();
    let parsed = uuid::Uuid::parse_str(&decoded).ok();
    let key = parsed.map(|u| (session.conn.server, raw_tenant.clone(), raw_db.clone(), u));
    if let Some(r) = key.as_ref().and_then(|k| session.l7.collections.get(k)) {
        return Ok(r);
    }
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(format!(
            "/api/v2/tenants/{raw_tenant}/databases/{raw_db}/collections/by-id/{raw_id}"
        ))
        .version(parts.version);
    if let Some(h) = req.headers_mut() {
        // The client's headers (its credentials, its host), but not those of
        // its body; the answer is asked for uncompressed, to be read here.
        for (k, v) in &parts.headers {
            if ![
                header::CONTENT_LENGTH,
                header::CONTENT_TYPE,
                header::CONTENT_ENCODING,
                header::TRANSFER_ENCODING,
                header::EXPECT,
                header::ACCEPT_ENCODING,
            ]
            .contains(k)
            {
                h.append(k.clone(), v.clone());
            }
        }
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    let req = match req.body(full(Bytes::new())) {
        Ok(r) => r,
        Err(e) => return Err(refuse(format!("the lookup request: {e}"))),
    };
    let (lparts, lbody) = req.into_parts();
    let req = session.upstream_request(lparts, lbody, false, authority);
    // A GET of enforcer's own, without a body: sent again if need be.
    let answer = match session.send(req, Some(Bytes::new())).await {
        Ok(a) => a,
        Err(e) => return Err(refuse(format!("asking the server: {e}"))),
    };
    let (aparts, abody) = answer.into_parts();
    let read = match read_bounded(abody, MAX_LOOKUP_ANSWER).await {
        Ok(b) if !b.truncated() => b.seen,
        Ok(_) => return Err(refuse("the server's answer is too large".into())),
        Err(e) => return Err(refuse(format!("reading the server's answer: {e}"))),
    };
    if !aparts.status.is_success() {
        // The server does not know this id in this tenant and database (or
        // refuses the caller): its answer is the client's, nothing forwarded.
        info!(
            request_id,
            id = raw_id,
            status = aparts.status.as_u16(),
            "vector DB collection id unknown to the server there; its answer relayed"
        );
        session.count("unresolved");
        let mut resp = Response::new(full(read));
        *resp.status_mut() = aparts.status;
        if let Some(ct) = aparts.headers.get(header::CONTENT_TYPE) {
            resp.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
        } else {
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        return Err(resp);
    }
    let v: Value = serde_json::from_slice(&read)
        .map_err(|e| refuse(format!("the server's answer is not JSON: {e}")))?;
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let (Some(id), Some(name)) = (text("id"), text("name")) else {
        return Err(refuse("the server's answer has no id and name".into()));
    };
    // The server must have found the collection the id names as read here;
    // a differing reading of the id is not guessed between.
    if parsed.is_none() || uuid::Uuid::parse_str(&id).ok() != parsed {
        return Err(refuse(format!("the server answered for collection {id}")));
    }
    let r = Resolved {
        id,
        name,
        tenant: text("tenant"),
        database: text("database"),
    };
    if let Some(k) = key {
        session.l7.collections.put(k, r.clone());
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        m: Method,
        path: &str,
    ) -> (
        &'static str,
        &'static str,
        Option<String>,
        Option<String>,
        Target,
    ) {
        op_with(m, path, None)
    }

    fn op_with(
        m: Method,
        path: &str,
        body: Option<Value>,
    ) -> (
        &'static str,
        &'static str,
        Option<String>,
        Option<String>,
        Target,
    ) {
        let o = Op::read(&m, path, body.as_ref());
        (
            o.operation.as_str(),
            o.action,
            o.tenant,
            o.database,
            o.target,
        )
    }

    const ID: &str = "f4160bf1-71ca-49d7-b841-f995a3dcb93b";

    #[test]
    fn chroma_routes_are_classified_read_write_delete_admin() {
        let base = "/api/v2/tenants/default_tenant/databases/default_database/collections";
        let t = Some("default_tenant".to_owned());
        let d = Some("default_database".to_owned());
        let id = Target::Id(ID.into());
        for (m, verb, class, action) in [
            (Method::POST, "query", "read", "query"),
            (Method::POST, "get", "read", "get"),
            (Method::POST, "search", "read", "search"),
            (Method::GET, "count", "read", "count"),
            (Method::POST, "add", "write", "add"),
            (Method::POST, "upsert", "write", "upsert"),
            (Method::POST, "update", "write", "update"),
            (Method::POST, "delete", "delete", "delete"),
            (Method::POST, "fork", "admin", "fork_collection"),
        ] {
            assert_eq!(
                op(m, &format!("{base}/{ID}/{verb}")),
                (class, action, t.clone(), d.clone(), id.clone()),
                "{verb}"
            );
        }
        assert_eq!(
            op(Method::GET, &format!("{base}/docs")),
            (
                "read",
                "get_collection",
                t.clone(),
                d.clone(),
                Target::Name("docs".into())
            )
        );
        assert_eq!(
            op(Method::GET, &format!("{base}/by-id/{ID}")),
            ("read", "get_collection", t.clone(), d.clone(), id.clone())
        );
        assert_eq!(
            op(Method::DELETE, &format!("{base}/docs")),
            (
                "admin",
                "delete_collection",
                t.clone(),
                d.clone(),
                Target::Name("docs".into())
            )
        );
        assert_eq!(
            op(Method::PUT, &format!("{base}/{ID}")),
            (
                "admin",
                "update_collection",
                t.clone(),
                d.clone(),
                id.clone()
            )
        );
        assert_eq!(
            op_with(
                Method::POST,
                base,
                Some(json!({"name": "docs", "get_or_create": true}))
            ),
            (
                "admin",
                "create_collection",
                t.clone(),
                d.clone(),
                Target::Name("docs".into())
            )
        );
        assert_eq!(
            op(Method::GET, base),
            (
                "admin",
                "list_collections",
                t.clone(),
                d.clone(),
                Target::None
            )
        );
        assert_eq!(
            op(Method::GET, "/api/v2/collections/acme:prod:docs"),
            (
                "read",
                "get_collection",
                Some("acme".into()),
                Some("prod".into()),
                Target::Name("docs".into())
            )
        );
        assert_eq!(
            op_with(
                Method::POST,
                "/api/v2/tenants/acme/databases",
                Some(json!({"name": "prod"}))
            ),
            (
                "admin",
                "create_database",
                Some("acme".into()),
                Some("prod".into()),
                Target::None
            )
        );
        assert_eq!(
            op(Method::GET, "/api/v2/tenants/acme/databases/prod"),
            (
                "read",
                "get_database",
                Some("acme".into()),
                Some("prod".into()),
                Target::None
            )
        );
        assert_eq!(
            op(Method::DELETE, "/api/v2/tenants/acme/databases/prod"),
            (
                "admin",
                "delete_database",
                Some("acme".into()),
                Some("prod".into()),
                Target::None
            )
        );
        assert_eq!(op(Method::GET, "/api/v2/heartbeat").1, "heartbeat");
        assert_eq!(op(Method::POST, "/api/v2/reset").0, "admin");
        // Percent-encoded names are decoded for policy.
        assert_eq!(
            op(Method::GET, &format!("{base}/my%2Ddocs")).4,
            Target::Name("my-docs".into())
        );
    }

    #[test]
    fn what_is_not_recognised_is_admin() {
        let base = "/api/v2/tenants/t/databases/d/collections";
        for (m, path) in [
            (Method::GET, "/api/v1/collections".to_owned()),
            (Method::GET, "/openapi.json".to_owned()),
            (Method::POST, format!("{base}/{ID}/truncate")),
            (Method::GET, format!("{base}/{ID}/query")),
            (Method::POST, format!("{base}/{ID}/../x/query")),
            (Method::POST, format!("{base}//{ID}/query")),
            (Method::POST, format!("{base}/{ID}%2Fx/query")),
            (Method::POST, format!("{base}/{ID}/%71uery")),
            (Method::POST, format!("{base}/%FF/query")),
            (Method::PATCH, format!("{base}/{ID}")),
        ] {
            let (class, action, ..) = op(m, &path);
            assert_eq!((class, action), ("admin", "unknown"), "{path}");
        }
    }

    #[test]
    fn resolutions_expire_and_are_forgotten() {
        let c = Collections::default();
        let key: Key = (
            "127.0.0.1:1".parse().unwrap(),
            "t".into(),
            "d".into(),
            uuid::Uuid::nil(),
        );
        let r = Resolved {
            id: uuid::Uuid::nil().to_string(),
            name: "docs".into(),
            tenant: None,
            database: None,
        };
        c.put(key.clone(), r.clone());
        assert_eq!(c.get(&key), Some(r));
        c.forget();
        assert_eq!(c.get(&key), None);
        assert!(c.cache.lock().expect("lock").is_empty());
    }
}
