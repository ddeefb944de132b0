//! L7 (DESIGN §1.7): per-request policy at the destinations the config
//! declares (`[[l7.destinations]]`). The last agent before the server —
//! inbound HBONE, same node, permissive plaintext, outbound to a destination
//! outside the mesh — terminates HTTP with hyper (HTTP/1.1 or h2c), decides
//! every request with the connection's verified identities, and only then
//! forwards it over its own client connection to the server. The
//! connection-level decision is taken first, as for any connection.
pub mod chunk;
pub mod decode;
pub mod http;
pub mod io;
pub mod llm;
pub mod mcp;
pub mod path;
pub mod tokens;
pub mod vectordb;

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

pub use http::{Served, serve};

pub use crate::config::Protocol;
use crate::config::{Config, ConfigError};
use std::path::Path;

/// One declared L7 destination (checked by [`Routes::from_config`]).
#[derive(Debug, Clone)]
pub struct Route {
    pub ports: Vec<u16>,
    pub spiffe_id: Option<spiffe::SpiffeId>,
    pub selectors: Vec<String>,
    pub protocol: Protocol,
    pub max_body_bytes: usize,
    pub path_normalization: crate::config::PathNormalization,
    /// `l7.upgrades` (compared without case).
    pub upgrades: Arc<[String]>,
    /// How long a kept HTTP/1.1 connection to the server is used after its
    /// last answer (`server_idle_ms`).
    pub server_idle: std::time::Duration,
}

impl Route {
    fn matches(&self, port: u16, dst_id: Option<&spiffe::SpiffeId>, selectors: &[String]) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port))
            && self
                .spiffe_id
                .as_ref()
                .is_none_or(|want| dst_id == Some(want))
            && self.selectors.iter().all(|s| selectors.contains(s))
    }
}

/// The declared L7 destinations, in config order.
#[derive(Debug, Clone, Default)]
pub struct Routes(Arc<[Arc<Route>]>);

impl Routes {
    /// The `[l7]` destinations of a config, checked: each names at least one
    /// of ports, SPIFFE ID or selectors; ports are real and not the agent's
    /// own.
    pub fn from_config(cfg: &Config, path: &Path) -> Result<Self, ConfigError> {
        const MAX_BODY: u64 = 64 * 1024 * 1024;
        const IDLE_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;
        let invalid = |key: String, message: String| ConfigError::invalid(path, key, message);
        if !(1..=MAX_BODY).contains(&cfg.l7.max_body_bytes) {
            return Err(invalid(
                "l7.max_body_bytes".into(),
                format!("{} is outside 1..={MAX_BODY}", cfg.l7.max_body_bytes),
            ));
        }
        for u in &cfg.l7.upgrades {
            let name = u.split('/').next().unwrap_or("");
            if name.is_empty() || !u.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
                return Err(invalid(
                    "l7.upgrades".into(),
                    format!("{u:?} is not an Upgrade protocol name"),
                ));
            }
            if name.eq_ignore_ascii_case("h2c") || name.eq_ignore_ascii_case("http") {
                return Err(invalid(
                    "l7.upgrades".into(),
                    format!(
                        "{u:?} cannot be tunnelled: it is HTTP, whose requests are decided one by one"
                    ),
                ));
            }
        }
        if !IDLE_MS.contains(&cfg.l7.server_idle_ms) {
            return Err(invalid(
                "l7.server_idle_ms".into(),
                format!("{} is outside {IDLE_MS:?}", cfg.l7.server_idle_ms),
            ));
        }
        let upgrades: Arc<[String]> = cfg.l7.upgrades.iter().cloned().collect();
        let mut routes = Vec::new();
        for (i, d) in cfg.l7.destinations.iter().enumerate() {
            let key = |k: &str| format!("l7.destinations[{i}].{k}");
            if d.ports.is_empty() && d.spiffe_id.is_none() && d.selectors.is_empty() {
                return Err(invalid(
                    format!("l7.destinations[{i}]"),
                    "names no destination: give ports, spiffe_id or selectors".into(),
                ));
            }
            let own = [
                cfg.capture.outbound_port,
                cfg.mesh.hbone_port,
                cfg.mesh.plaintext_port,
            ];
            if let Some(p) = d.ports.iter().find(|p| **p == 0 || own.contains(p)) {
                return Err(invalid(
                    key("ports"),
                    format!("port {p} cannot be an L7 destination"),
                ));
            }
            let spiffe_id = match &d.spiffe_id {
                Some(s) => Some(
                    spiffe::SpiffeId::new(s)
                        .map_err(|e| invalid(key("spiffe_id"), format!("{s:?}: {e}")))?,
                ),
                None => None,
            };
            if let Some(s) = d.selectors.iter().find(|s| !s.contains(':')) {
                return Err(invalid(
                    key("selectors"),
                    format!("{s:?} is not a selector (type:value)"),
                ));
            }
            let max_body_bytes = d.max_body_bytes.unwrap_or(cfg.l7.max_body_bytes);
            if !(1..=MAX_BODY).contains(&max_body_bytes) {
                return Err(invalid(
                    key("max_body_bytes"),
                    format!("{max_body_bytes} is outside 1..={MAX_BODY}"),
                ));
            }
            let server_idle_ms = d.server_idle_ms.unwrap_or(cfg.l7.server_idle_ms);
            if !IDLE_MS.contains(&server_idle_ms) {
                return Err(invalid(
                    key("server_idle_ms"),
                    format!("{server_idle_ms} is outside {IDLE_MS:?}"),
                ));
            }
            routes.push(Route {
                ports: d.ports.clone(),
                spiffe_id,
                selectors: d.selectors.clone(),
                protocol: d.protocol,
                max_body_bytes: max_body_bytes as usize,
                path_normalization: d.path_normalization.unwrap_or(cfg.l7.path_normalization),
                upgrades: upgrades.clone(),
                server_idle: std::time::Duration::from_millis(server_idle_ms),
            });
        }
        Ok(Routes::new(routes))
    }

    pub fn new(routes: Vec<Route>) -> Self {
        Self(routes.into_iter().map(Arc::new).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether some destination is served with `protocol`.
    pub fn has(&self, protocol: Protocol) -> bool {
        self.0.iter().any(|r| r.protocol == protocol)
    }

    /// The first destination that matches the port, the destination
    /// workload's SPIFFE ID and its selectors; `None`: the connection stays L4.
    pub fn find(
        &self,
        port: u16,
        dst_id: Option<&spiffe::SpiffeId>,
        selectors: &[String],
    ) -> Option<Arc<Route>> {
        self.0
            .iter()
            .find(|r| r.matches(port, dst_id, selectors))
            .cloned()
    }
}

/// What a request decision needs from its connection: the connection-level
/// input's blocks (verified identities) and the addresses.
#[derive(Debug, Clone)]
pub struct Conn {
    pub id: u64,
    /// `inbound` where the server is a local workload, `outbound` for a
    /// destination outside the mesh.
    pub direction: &'static str,
    pub source: crate::policy::Peer,
    pub destination: crate::policy::Peer,
    /// The TCP peer of the connection the requests arrive on.
    pub client: SocketAddr,
    /// The server the requests go to.
    pub server: SocketAddr,
    /// The connection's span context: the parent of request spans that
    /// carry no `traceparent` of their own.
    pub trace: Option<opentelemetry::trace::SpanContext>,
}

impl Conn {
    /// The connection-level input with a request's fields beside it.
    pub fn input(
        &self,
        protocol: &'static str,
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> crate::policy::Input {
        crate::policy::Input {
            direction: self.direction,
            source: self.source.clone(),
            destination: self.destination.clone(),
            protocol,
            request: Some(Box::new(fields)),
        }
    }

    /// The context of a connection decided with `input`.
    pub fn of(
        id: u64,
        input: &crate::policy::Input,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Self {
        Self {
            id,
            direction: input.direction,
            source: input.source.clone(),
            destination: input.destination.clone(),
            client,
            server,
            trace: None,
        }
    }

    /// With the connection's span context (see [`Conn::trace`]).
    pub fn traced(mut self, trace: Option<opentelemetry::trace::SpanContext>) -> Self {
        self.trace = trace;
        self
    }
}

/// Opens a new connection to the server (after the first one closed).
pub type Dial = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>>
        + Send
        + Sync,
>;

/// The shared state of the L7 layer.
pub struct L7 {
    pub policy: Arc<crate::policy::Policy>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub routes: Routes,
    /// Tokens used per caller and model in the current window (`llm`).
    pub tokens: Arc<tokens::Tokens>,
    /// Collection ids resolved to names (`vectordb`).
    pub collections: vectordb::Collections,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(ports: &[u16], id: Option<&str>, sel: &[&str], protocol: Protocol) -> Route {
        Route {
            ports: ports.to_vec(),
            spiffe_id: id.and_then(|i| spiffe::SpiffeId::new(i).ok()),
            selectors: sel.iter().map(|s| s.to_string()).collect(),
            protocol,
            max_body_bytes: 1024,
            path_normalization: crate::config::PathNormalization::default(),
            upgrades: Arc::from(vec!["websocket".to_owned()]),
            server_idle: std::time::Duration::from_secs(4),
        }
    }

    #[test]
    fn the_first_matching_destination_wins() {
        let routes = Routes::new(vec![
            route(&[8001], Some("spiffe://td/mcp"), &[], Protocol::Mcp),
            route(&[], None, &["unix:uid:7"], Protocol::Http),
            route(&[8080, 8081], None, &[], Protocol::Http),
        ]);
        let sel = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let p = |r: Option<Arc<Route>>| r.map(|r| r.protocol);
        let id = |s: &str| spiffe::SpiffeId::new(s).expect("id");
        assert_eq!(
            p(routes.find(8001, Some(&id("spiffe://td/mcp")), &[])),
            Some(Protocol::Mcp)
        );
        // Port right, identity wrong: not the MCP entry.
        assert_eq!(p(routes.find(8001, Some(&id("spiffe://td/x")), &[])), None);
        assert_eq!(p(routes.find(8001, None, &[])), None);
        assert_eq!(
            p(routes.find(9, None, &sel(&["unix:uid:7", "unix:uid:8"]))),
            Some(Protocol::Http)
        );
        assert_eq!(p(routes.find(8081, None, &[])), Some(Protocol::Http));
        assert_eq!(p(routes.find(8082, None, &[])), None);
    }
}
