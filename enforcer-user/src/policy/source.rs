//! Where the policy comes from, and reloading it: a directory, an OPA bundle
//! file (`.tar.gz`), or an OPA bundle served over HTTP (polled with ETag).
//! A change applies to new connections on the next poll; a set that does not
//! compile is rejected, logged and counted, and the previous one stays.
use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use super::{EngineKind, LoadError, Loaded, Policy, load};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    Dir(PathBuf),
    BundleFile(PathBuf),
    Url(String),
}

impl PolicySource {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("https://") {
            return Err(format!(
                "{s}: https bundle URLs are not supported yet; serve the bundle over http on a trusted network or as a file"
            ));
        }
        if s.starts_with("http://") {
            return s
                .parse::<http::Uri>()
                .map(|_| Self::Url(s.to_owned()))
                .map_err(|e| format!("{s}: {e}"));
        }
        let p = PathBuf::from(s);
        if s.ends_with(".tar.gz") || s.ends_with(".tgz") {
            Ok(Self::BundleFile(p))
        } else {
            Ok(Self::Dir(p))
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Dir(p) | Self::BundleFile(p) => p.display().to_string(),
            Self::Url(u) => u.clone(),
        }
    }
}

fn revision_of(files: &[load::PolicyFile]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.path.as_bytes());
        h.update([0]);
        h.update(&f.contents);
        h.update([0]);
    }
    hex::encode(&h.finalize()[..8])
}

/// Reads and compiles a local source (directory or bundle file).
pub fn load_local(
    src: &PolicySource,
    engine: EngineKind,
    timeout: std::time::Duration,
) -> Result<Loaded, LoadError> {
    let files = read_local(src)?;
    Loaded::compile_with(
        &src.describe(),
        revision_of(&files),
        &files,
        engine,
        timeout,
    )
}

fn read_local(src: &PolicySource) -> Result<Vec<load::PolicyFile>, LoadError> {
    match src {
        PolicySource::Dir(d) => load::read_dir(d),
        PolicySource::BundleFile(f) => {
            let bytes = std::fs::read(f).map_err(|e| LoadError::File {
                path: f.display().to_string(),
                message: e.to_string(),
            })?;
            load::read_bundle(&f.display().to_string(), &bytes)
        }
        PolicySource::Url(u) => Err(LoadError::File {
            path: u.clone(),
            message: "not a local source".into(),
        }),
    }
}

type HttpClient = hyper_util::client::legacy::Client<MarkedConnector, Empty<Bytes>>;

/// Connects bundle fetches from sockets that carry the agent's mark, like
/// every other socket of the agent (so they are never captured).
#[derive(Clone, Copy)]
struct MarkedConnector;

impl tower_service::Service<http::Uri> for MarkedConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("{uri}: no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let mut last = std::io::Error::other(format!("{host}: no address"));
            for addr in tokio::net::lookup_host((host.as_str(), port)).await? {
                match crate::capture::mark::connect(addr, None).await {
                    Ok(s) => return Ok(hyper_util::rt::TokioIo::new(s)),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
    }
}

/// GETs a bundle; `Ok(None)` when the server says it did not change (304).
async fn fetch(
    client: &HttpClient,
    url: &str,
    etag: Option<&str>,
) -> Result<Option<(Bytes, Option<String>)>, String> {
    let mut req = http::Request::get(url);
    if let Some(tag) = etag {
        req = req.header(http::header::IF_NONE_MATCH, tag);
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    match resp.status() {
        http::StatusCode::NOT_MODIFIED => Ok(None),
        http::StatusCode::OK => {
            let tag = resp
                .headers()
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
                .await
                .map_err(|_| "timed out reading the body".to_owned())?
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok(Some((body, tag)))
        }
        s => Err(format!("HTTP {s}")),
    }
}

/// Polls the source and installs every new revision that compiles.
pub async fn watch(src: PolicySource, policy: Arc<Policy>, every: Duration) {
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(MarkedConnector);
    let mut etag: Option<String> = None;
    let mut rejected: Option<String> = None;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let files = match &src {
            PolicySource::Url(u) => match fetch(&client, u, etag.as_deref()).await {
                Ok(None) => continue,
                Ok(Some((body, tag))) => {
                    etag = tag;
                    load::read_bundle(u, &body)
                }
                Err(e) => {
                    if policy.revision().is_none() {
                        warn!(url = %u, error = %e, "fetching the policy bundle failed; no policy in force, everything is denied");
                    } else {
                        warn!(url = %u, error = %e, "fetching the policy bundle failed; the policy in force stays");
                    }
                    continue;
                }
            },
            local => read_local(local),
        };
        let files = match files {
            Ok(f) => f,
            Err(e) => {
                reject(&policy, &mut rejected, "unreadable".into(), &e);
                continue;
            }
        };
        let revision = revision_of(&files);
        if policy.revision().as_deref() == Some(revision.as_str())
            || rejected.as_deref() == Some(revision.as_str())
        {
            continue;
        }
        match Loaded::compile_with(
            &src.describe(),
            revision.clone(),
            &files,
            policy.engine,
            policy.eval_timeout,
        ) {
            Ok(loaded) => {
                info!(source = %src.describe(), %revision, engine = loaded.engine(), "policy reloaded");
                policy.metrics.policy_reload("ok");
                policy.install(loaded);
                rejected = None;
            }
            Err(e) => reject(&policy, &mut rejected, revision, &e),
        }
    }
}

fn reject(policy: &Policy, rejected: &mut Option<String>, revision: String, e: &LoadError) {
    warn!(error = %e, in_force = ?policy.revision(), "policy rejected; the previous policy stays in force");
    policy.metrics.policy_reload("rejected");
    *rejected = Some(revision);
}
