//! Where the policy comes from, and reloading it: a directory, an OPA bundle
//! file (`.tar.gz`), or an OPA bundle served over `https://` (rustls, with a
//! CA file or the system roots, and an optional bearer token) or `http://`,
//! polled with ETag. Bundles are read within limits and, when keys are
//! configured, verified (`bundle`, `signing`). A change applies to new
//! connections on the next poll; a set that is refused or does not compile
//! is logged and counted, and the previous one stays.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use tracing::{info, warn};

use super::{
    EngineKind, LoadError, Loaded, Policy, bundle,
    load::{self, PolicySet},
    signing,
};
use crate::config::{ConfigError, PolicyConfig};
use crate::mark::MarkedConnector;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    Dir(PathBuf),
    BundleFile(PathBuf),
    Url(String),
}

impl PolicySource {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("https://") || s.starts_with("http://") {
            let uri = s.parse::<http::Uri>().map_err(|e| format!("{s}: {e}"))?;
            if uri.host().is_none() {
                return Err(format!("{s}: no host"));
            }
            return Ok(Self::Url(s.to_owned()));
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

    fn is_bundle(&self) -> bool {
        !matches!(self, Self::Dir(_))
    }
}

/// How bundles are read and fetched (`[policy.bundle]`, `[policy.keys]`):
/// keys and CA certificates read once, at start-up.
pub struct SourceOptions {
    pub bundle: bundle::Options,
    /// Trust anchors for an https:// server (`ca_cert`); `None`: the
    /// system's.
    pub ca_roots: Option<rustls::RootCertStore>,
    pub bearer_token_file: Option<PathBuf>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            bundle: bundle::Options {
                name: crate::config::DEFAULT_BUNDLE_NAME.to_owned(),
                ..bundle::Options::default()
            },
            ca_roots: None,
            bearer_token_file: None,
        }
    }
}

impl SourceOptions {
    /// From the configuration; key and CA files are read now (`Config::
    /// source_options` names the file and key at fault).
    /// How policy bundles are bounded, verified and fetched, from a config
    /// file's `[policy]`: the key and CA files are read here (by `enforcer
    /// check`, `run` and `policy eval`), not when the file is parsed, so a
    /// config reload reads none of them.
    pub fn for_config(cfg: &crate::config::Config, path: &Path) -> Result<Self, ConfigError> {
        Self::from_config(&cfg.policy)
            .map_err(|(key, message)| ConfigError::invalid(path, key, message))
    }

    pub fn from_config(c: &PolicyConfig) -> Result<Self, (String, String)> {
        let b = &c.bundle;
        let mut keys = HashMap::new();
        for (id, k) in &c.keys {
            let at = |field: &str| format!("policy.keys.{id}.{field}");
            let material = match (&k.key, &k.key_file) {
                (Some(inline), None) => inline.as_bytes().to_vec(),
                (None, Some(path)) => std::fs::read(path)
                    .map_err(|e| (at("key_file"), format!("{}: {e}", path.display())))?,
                _ => return Err((at("key"), "give exactly one of key and key_file".into())),
            };
            let key = signing::Key::new(&k.algorithm, &material, k.scope.clone())
                .map_err(|m| (at("key"), m))?;
            keys.insert(id.clone(), key);
        }
        let src = PolicySource::parse(&c.source).map_err(|m| ("policy.source".to_owned(), m))?;
        if b.require_signature && keys.is_empty() {
            return Err((
                "policy.bundle.require_signature".into(),
                "set, but no verification key is configured in [policy.keys]".into(),
            ));
        }
        if b.require_signature && !c.source.is_empty() && !src.is_bundle() {
            return Err((
                "policy.bundle.require_signature".into(),
                format!(
                    "set, but policy.source {} is a directory; only bundles (.tar.gz, https://) are signed",
                    c.source
                ),
            ));
        }
        if b.bearer_token_file.is_some() && !c.source.starts_with("https://") {
            return Err((
                "policy.bundle.bearer_token_file".into(),
                "a bearer token is only sent to an https:// bundle server".into(),
            ));
        }
        let ca_roots = b
            .ca_cert
            .as_deref()
            .map(ca_roots)
            .transpose()
            .map_err(|m| ("policy.bundle.ca_cert".to_owned(), m))?;
        let verifier = if keys.is_empty() {
            None
        } else {
            Some(
                signing::Verifier::new(keys, b.keyid.clone(), b.scope.clone(), &b.exclude_files)
                    .map_err(|m| ("policy.bundle".to_owned(), m))?,
            )
        };
        Ok(Self {
            bundle: bundle::Options {
                name: b.name.clone(),
                limits: bundle::Limits {
                    max_bytes: b.max_bytes,
                    max_uncompressed_bytes: b.max_uncompressed_bytes,
                    max_files: b.max_files,
                },
                verifier,
                require_signature: b.require_signature,
                skip_verification: false,
            },
            ca_roots,
            bearer_token_file: b.bearer_token_file.clone(),
        })
    }
}

/// The certificates of a PEM file, as trust anchors.
pub(crate) fn ca_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?
    {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(roots)
}

/// Reads and compiles a local source (directory or bundle file).
pub fn load_local(
    src: &PolicySource,
    opts: &SourceOptions,
    engine: EngineKind,
    timeout: Duration,
) -> Result<Loaded, LoadError> {
    let set = read_local(src, opts)?;
    Loaded::compile_with(&src.describe(), &set, engine, timeout)
}

/// The policy set of a local source.
pub fn read_local(src: &PolicySource, opts: &SourceOptions) -> Result<PolicySet, LoadError> {
    match src {
        PolicySource::Dir(d) => load::read_dir(d).map(PolicySet::plain),
        PolicySource::BundleFile(f) => {
            let name = f.display().to_string();
            let err = |message: String| LoadError::File {
                path: name.clone(),
                message,
            };
            // Read one byte past the bound at most: `bundle::read` refuses it.
            let mut bytes = Vec::new();
            std::fs::File::open(f)
                .and_then(|file| {
                    use std::io::Read as _;
                    file.take(opts.bundle.limits.max_bytes + 1)
                        .read_to_end(&mut bytes)
                })
                .map_err(|e| err(e.to_string()))?;
            let b = bundle::read(&name, &bytes, &opts.bundle)?;
            Ok(PolicySet::from_bundle(&opts.bundle.name, b))
        }
        PolicySource::Url(u) => Err(LoadError::File {
            path: u.clone(),
            message: "not a local source".into(),
        }),
    }
}

type HttpClient =
    hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<MarkedConnector>, Empty<Bytes>>;

/// An HTTP client for the agent's own requests (bundles, decision logs):
/// marked sockets, TLS trusting `roots` (`None`: the system's roots) for
/// https://, plain for http://.
pub(crate) fn https_client<B>(
    roots: Option<rustls::RootCertStore>,
) -> Result<
    hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<MarkedConnector>, B>,
    String,
>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match roots {
        Some(roots) => {
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            builder.with_tls_config(config)
        }
        None => builder
            .with_provider_and_native_roots(provider)
            .map_err(|e| format!("the system's CA certificates: {e}"))?,
    };
    let connector = builder
        .https_or_http()
        .enable_http1()
        .wrap_connector(MarkedConnector);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector),
    )
}

/// `Bearer <token>` from a token file, read on the chores thread (each poll
/// and each shipment reads it; a rotated token is used at the next request).
pub(crate) async fn bearer(path: &Path) -> Result<String, String> {
    let p = path.to_owned();
    let token = crate::chores::run(move || std::fs::read_to_string(&p))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bearer token {}: {e}", path.display()))?;
    Ok(format!("Bearer {}", token.trim()))
}

/// An HTTP client error with its causes (the TLS error is a cause's cause).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut m = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        m.push_str(": ");
        m.push_str(&c.to_string());
        cause = c.source();
    }
    m
}

/// GETs a bundle within the size limit; `Ok(None)` when the server says it
/// did not change (304).
async fn fetch(
    client: &HttpClient,
    url: &str,
    opts: &SourceOptions,
    etag: Option<&str>,
) -> Result<Option<(Bytes, Option<String>)>, String> {
    let mut req = http::Request::get(url);
    if let Some(tag) = etag {
        req = req.header(http::header::IF_NONE_MATCH, tag);
    }
    if let Some(path) = &opts.bearer_token_file {
        req = req.header(http::header::AUTHORIZATION, bearer(path).await?);
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| chain(&e))?;
    match resp.status() {
        http::StatusCode::NOT_MODIFIED => Ok(None),
        http::StatusCode::OK => {
            let tag = resp
                .headers()
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let max = opts.bundle.limits.max_bytes;
            let body = Limited::new(resp.into_body(), usize::try_from(max).unwrap_or(usize::MAX));
            let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
                .await
                .map_err(|_| "timed out reading the body".to_owned())?
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        format!("the bundle is over policy.bundle.max_bytes ({max})")
                    } else {
                        e.to_string()
                    }
                })?
                .to_bytes();
            Ok(Some((body, tag)))
        }
        s => Err(format!("HTTP {s}")),
    }
}

/// What one poll found, once read, verified and compiled.
enum Polled {
    /// The set in force, or one already rejected.
    Unchanged,
    Unreadable(LoadError),
    Rejected(String, LoadError),
    Compiled(Box<Loaded>),
}

/// Reads (for a URL, from `body`), verifies and compiles a source unless
/// its digest is `in_force` or `rejected`; blocking, run on the blocking
/// pool.
fn poll_blocking(
    src: &PolicySource,
    body: Option<Bytes>,
    opts: &SourceOptions,
    (engine, timeout): (EngineKind, Duration),
    in_force: Option<String>,
    rejected: Option<String>,
) -> Polled {
    let set = match body {
        Some(body) => bundle::read(&src.describe(), &body, &opts.bundle)
            .map(|b| PolicySet::from_bundle(&opts.bundle.name, b)),
        None => read_local(src, opts),
    };
    let set = match set {
        Ok(set) => set,
        Err(e) => return Polled::Unreadable(e),
    };
    let digest = Some(set.digest());
    if in_force.as_deref() == digest || rejected.as_deref() == digest {
        return Polled::Unchanged;
    }
    match Loaded::compile_with(&src.describe(), &set, engine, timeout) {
        Ok(loaded) => Polled::Compiled(Box::new(loaded)),
        Err(e) => Polled::Rejected(set.digest().to_owned(), e),
    }
}

/// How often an unchanged fetch error is logged again.
const FETCH_ERROR_REPEAT: Duration = Duration::from_secs(60);

/// Polls the source and installs every new revision that is read, verified
/// and compiled; reading, verifying and compiling run off the async
/// runtime.
pub async fn watch(
    src: PolicySource,
    opts: Arc<SourceOptions>,
    policy: Arc<Policy>,
    every: Duration,
) {
    let client: HttpClient = match https_client(opts.ca_roots.clone()) {
        Ok(c) => c,
        Err(e) => {
            warn!(source = %src.describe(), error = %e, "cannot build the bundle client; the policy in force stays and is not reloaded");
            return;
        }
    };
    let mut etag: Option<String> = None;
    let mut rejected: Option<String> = None;
    let mut last_fetch_error: Option<(String, tokio::time::Instant)> = None;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let body = match &src {
            PolicySource::Url(u) => match fetch(&client, u, &opts, etag.as_deref()).await {
                Ok(None) => {
                    last_fetch_error = None;
                    continue;
                }
                Ok(Some((body, tag))) => {
                    last_fetch_error = None;
                    etag = tag;
                    Some(body)
                }
                Err(e) => {
                    // A server that stays down is reported when the error
                    // changes and once a minute, not at every poll.
                    let now = tokio::time::Instant::now();
                    let repeat = last_fetch_error.as_ref().is_some_and(|(m, at)| {
                        *m == e && now.duration_since(*at) < FETCH_ERROR_REPEAT
                    });
                    if !repeat {
                        if policy.revision().is_none() {
                            warn!(url = %u, error = %e, "fetching the policy bundle failed; no policy in force, everything is denied");
                        } else {
                            warn!(url = %u, error = %e, "fetching the policy bundle failed; the policy in force stays");
                        }
                        last_fetch_error = Some((e, now));
                    }
                    continue;
                }
            },
            _ => None,
        };
        let (s, o, budget) = (
            src.clone(),
            opts.clone(),
            (policy.engine, policy.eval_timeout),
        );
        let (in_force, seen) = (policy.revision(), rejected.clone());
        let polled =
            crate::chores::run(move || poll_blocking(&s, body, &o, budget, in_force, seen)).await;
        match polled {
            Ok(Polled::Unchanged) => {}
            Ok(Polled::Unreadable(e)) => {
                // A refused bundle is refused once per content, not per poll.
                let key = format!("unreadable:{e}");
                if rejected.as_deref() != Some(key.as_str()) {
                    reject(&policy, &mut rejected, key, &e);
                }
            }
            Ok(Polled::Rejected(digest, e)) => reject(&policy, &mut rejected, digest, &e),
            Ok(Polled::Compiled(loaded)) => {
                info!(source = %src.describe(), revision = %loaded.revision,
                    bundle = loaded.bundle.as_ref().map(|b| b.name.as_str()),
                    bundle_revision = loaded.bundle.as_ref().map(|b| b.revision.as_str()),
                    engine = loaded.engine(), "policy reloaded");
                policy.metrics.policy_reload("ok");
                policy.install(*loaded);
                rejected = None;
            }
            Err(e) => {
                warn!(error = %e, "reading or compiling the policy panicked; the policy in force stays")
            }
        }
    }
}

fn reject(policy: &Policy, rejected: &mut Option<String>, revision: String, e: &LoadError) {
    warn!(error = %e, in_force = ?policy.revision(), "policy rejected; the previous policy stays in force");
    policy.metrics.policy_reload("rejected");
    policy.rejected(e.to_string());
    *rejected = Some(revision);
}
