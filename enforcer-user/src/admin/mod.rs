//! Admin plane, two surfaces: on `admin.metrics_addr` (15020) the
//! Prometheus `/metrics` endpoint, the `/healthz` and `/readyz` probes and
//! `/llm/usage` (tokens per caller and model in the current window, with
//! the budgets); on `admin.status_addr` (15000) `/status` (what the agent
//! is doing now) and `/config` (the configuration in force, secrets
//! redacted). Both loopback by default.
//! Kept apart from the data plane: a slow scrape never delays a connection.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

pub mod status;

use crate::capture::Capture;
use crate::metrics::{self, Metrics};

/// Shared state the admin endpoints read.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    pub capture: std::sync::OnceLock<Arc<Capture>>,
    /// The `/llm/usage` document.
    pub llm_usage: std::sync::OnceLock<JsonView>,
    /// The SVIDs held now.
    pub svids: std::sync::OnceLock<SvidView>,
    /// The `/status` document.
    pub status: std::sync::OnceLock<JsonView>,
    /// A further condition of `/readyz` (the Kubernetes pod watch).
    pub readiness: std::sync::OnceLock<Readiness>,
    /// Set while the kernel programs' pins are gone (`agent::watch_pins`):
    /// nothing is captured, so the agent is not ready.
    pub capture_detached: AtomicBool,
    /// The `/config` document: the configuration the agent runs with.
    config: std::sync::RwLock<serde_json::Value>,
}

/// The SVIDs held, read at scrape time.
pub type SvidView = Box<dyn Fn() -> Vec<crate::identity::HeldSvid> + Send + Sync>;

/// `Err(why)` while the agent should not be considered ready.
pub type Readiness = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A JSON document the admin server renders on request.
pub type JsonView = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

impl AdminState {
    /// `Ok` when `/readyz` answers 200: started, and the further condition
    /// (if any) holds; else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::Acquire) {
            return Err("not ready".into());
        }
        if self.capture_detached.load(Ordering::Acquire) {
            return Err(
                "not ready: the kernel programs are detached (their pins are gone): nothing is captured"
                    .into(),
            );
        }
        match self.readiness.get() {
            Some(r) => r().map_err(|why| format!("not ready: {why}")),
            None => Ok(()),
        }
    }

    pub fn new(node: &str) -> Self {
        Self {
            metrics: Arc::new(Metrics::new(node)),
            ready: AtomicBool::new(false),
            capture_detached: AtomicBool::new(false),
            capture: std::sync::OnceLock::new(),
            llm_usage: std::sync::OnceLock::new(),
            svids: std::sync::OnceLock::new(),
            status: std::sync::OnceLock::new(),
            readiness: std::sync::OnceLock::new(),
            config: Default::default(),
        }
    }

    /// The configuration in force (the `Config`, serialized with its
    /// secrets redacted), for `/config`.
    pub fn set_config(&self, config: serde_json::Value) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    /// Registration entries reloaded from the config file: the only part of
    /// a changed file taken without a restart, so the only part `/config`
    /// updates.
    pub fn set_entries(&self, entries: serde_json::Value) {
        let mut c = self.config.write().unwrap_or_else(|p| p.into_inner());
        if let Some(identity) = c.get_mut("identity").and_then(|i| i.as_object_mut()) {
            identity.insert("entries".into(), entries);
        }
    }

    fn render_metrics(&self) -> String {
        if let Some(capture) = self.capture.get() {
            catch_up(&self.metrics.udp_refused, capture.udp_refused());
            let (by_cookie, by_tuple) = capture.entries();
            let g = &self.metrics.capture_map_entries;
            g.get_or_create(&metrics::MapLabels { map: "by_cookie" })
                .set(by_cookie as i64);
            g.get_or_create(&metrics::MapLabels { map: "by_tuple" })
                .set(by_tuple as i64);
            for map in ["by_cookie", "by_tuple"] {
                self.metrics
                    .capture_map_capacity
                    .get_or_create(&metrics::MapLabels { map })
                    .set(i64::from(enforcer_common::MAX_TRACKED));
            }
        }
        self.metrics.ready.set(i64::from(self.readiness().is_ok()));
        if let Some(svids) = self.svids.get() {
            let held = svids();
            let (expiry, renew) = (&self.metrics.svid_expiry, &self.metrics.svid_renew);
            // Only the SVIDs held now: one dropped or gone leaves no series.
            expiry.clear();
            renew.clear();
            for h in held {
                let labels = metrics::SvidLabels {
                    spiffe_id: h.spiffe_id,
                };
                expiry.get_or_create(&labels).set(unix_secs(h.not_after));
                renew.get_or_create(&labels).set(unix_secs(h.renew_at));
            }
        }
        catch_up(
            &self.metrics.log_lines_dropped,
            crate::logsink::dropped_total(),
        );
        catch_up(
            &self.metrics.executable_hashes,
            crate::attest::selectors::executables_hashed(),
        );
        catch_up(
            &self.metrics.execs_after_connect,
            crate::attest::selectors::execs_after_connect(),
        );
        let g = &self.metrics.allocator_bytes;
        for (kind, bytes) in allocator_stats() {
            g.get_or_create(&metrics::AllocatorLabels { kind })
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        self.metrics.encode()
    }
}

/// Brings `counter` up to `total`, a count kept where the metrics cannot
/// reach (the log writer, the digest cache), sampled at scrape.
fn catch_up(counter: &prometheus_client::metrics::counter::Counter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// Seconds since the Unix epoch (0 before it).
fn unix_secs(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// jemalloc's statistics (refreshed by advancing its epoch): what is live,
/// what the pages holding it take, what is resident and what is retained.
/// Empty when they cannot be read.
fn allocator_stats() -> Vec<(&'static str, usize)> {
    use tikv_jemalloc_ctl::{epoch, stats};
    if epoch::advance().is_err() {
        return vec![];
    }
    [
        ("allocated", stats::allocated::read()),
        ("active", stats::active::read()),
        ("resident", stats::resident::read()),
        ("retained", stats::retained::read()),
        ("metadata", stats::metadata::read()),
        // Bytes cached in the threads' caches, over all arenas (4096 =
        // MALLCTL_ARENAS_ALL): part of `allocated`, free to reuse.
        ("tcache", read_stat(b"stats.arenas.4096.tcache_bytes\0")),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.ok().map(|v| (k, v)))
    .collect()
}

/// A size_t statistic of jemalloc by name (NUL-terminated).
fn read_stat(name: &[u8]) -> tikv_jemalloc_ctl::Result<usize> {
    // SAFETY: the names passed are size_t statistics of jemalloc 5.3.
    unsafe { tikv_jemalloc_ctl::raw::read::<usize>(name) }
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `/metrics`, `/healthz`, `/readyz`, `/llm/usage` (`admin.metrics_addr`).
    Metrics,
    /// `/status`, `/config`, `/healthz` (`admin.status_addr`).
    Status,
}

impl Surface {
    fn serves(self, path: &str) -> bool {
        match self {
            Surface::Metrics => matches!(path, "/metrics" | "/healthz" | "/readyz" | "/llm/usage"),
            Surface::Status => matches!(path, "/status" | "/config" | "/healthz"),
        }
    }
}

fn respond(state: &AdminState, surface: Surface, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let (status, ctype, body) = match path {
        p if !surface.serves(p) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.render_metrics(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/status" => (
            StatusCode::OK,
            "application/json",
            state
                .status
                .get()
                .map_or(serde_json::Value::Null, |v| v())
                .to_string(),
        ),
        "/config" => (
            StatusCode::OK,
            "application/json",
            state
                .config
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .to_string(),
        ),
        "/llm/usage" => (
            StatusCode::OK,
            "application/json",
            state
                .llm_usage
                .get()
                .map_or_else(
                    || serde_json::json!({"sources": {}, "budgets": {}}),
                    |v| v(),
                )
                .to_string(),
        ),
        "/readyz" => match state.readiness() {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Serves the admin endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, surface: Surface) {
    let handed_over = crate::handover::handed_over();
    tokio::pin!(handed_over);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut handed_over => {
                // The new agent answers on this port from now on.
                info!("admin listener closed: handed over to the new agent");
                return;
            }
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, surface, &req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}
