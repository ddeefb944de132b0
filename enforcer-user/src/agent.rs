//! Wires the stages together for `enforcer run`.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use spiffe::TrustDomain;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    admin::{self, AdminState},
    attest::{Attestor, Entries, local::LocalAttestor},
    capture::InboundSteering,
    capture::{Capture, CaptureCgroup, CgroupResolver},
    config::Config,
    config::PlaintextMode,
    config::ProviderKind,
    handover,
    identity::{Bundles, Ca, IdentityManager, Source, TrustStore, spire::SpireSource},
    policy::{
        Policy,
        audit::AuditLog,
        source::{self, PolicySource},
    },
    proxy::{inbound::Inbound, outbound::Outbound, plaintext::Plaintext},
    tls,
    tunnel::HboneClient,
};

/// A non-blocking listener on `addr` (`SO_REUSEADDR`, as std sets it).
fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} ({what})"))?;
    l.set_nonblocking(true)
        .with_context(|| format!("listener on {addr} ({what})"))?;
    Ok(l)
}

/// The listeners of this agent: taken from the agent it replaces when that
/// one handed them over, bound otherwise; each also offered (as a copy) to
/// the agent that will replace this one.
struct Listening<'a> {
    inherited: Option<&'a mut handover::Inherited>,
    offer: handover::Offer,
}

impl Listening<'_> {
    fn get(
        &mut self,
        name: &str,
        addr: SocketAddr,
        marked: bool,
        make: impl FnOnce() -> anyhow::Result<Option<std::net::TcpListener>>,
    ) -> anyhow::Result<Option<std::net::TcpListener>> {
        let taken = match self.inherited.as_deref_mut() {
            Some(i) => i.take(name, addr, marked)?,
            None => None,
        };
        let listener = match taken {
            Some(l) => Some(l),
            None => make()?,
        };
        if let Some(l) = &listener {
            self.offer.add(name, l).with_context(|| {
                format!("listener {name} ({addr}): keeping a copy for a handover")
            })?;
        }
        Ok(listener)
    }
}

/// aws-lc seeds its random generator from CPU jitter the first time the
/// process asks for randomness: ≈ 20 ms of CPU, under a process-wide once
/// that every other thread asking meanwhile waits on. Asked here, on the
/// blocking pool, before the agent serves: else the first TLS handshake
/// (a runtime worker, every connection on it waiting) or the first SVID's
/// key pays it. No randomness is a start that fails: no TLS without it.
async fn seed_random() -> anyhow::Result<()> {
    let seeded = tokio::task::spawn_blocking(|| {
        let started = std::time::Instant::now();
        let mut bytes = [0u8; 32];
        tls::provider()
            .secure_random
            .fill(&mut bytes)
            .map(|()| started.elapsed())
    })
    .await
    .context("the random generator's seeding task")?
    .map_err(|e| anyhow::anyhow!("{e:?}"))
    .context("seeding the random generator (aws-lc)")?;
    info!(
        ms = seeded.as_secs_f64() * 1000.0,
        "random generator seeded"
    );
    Ok(())
}

/// The file in systemd's `RuntimeDirectory=` (`RUNTIME_DIRECTORY`) that says
/// the capture is in place.
const ATTACHED_MARK: &str = "capture-attached";

/// Under systemd (the unit's `RuntimeDirectory=enforcer` sets
/// `RUNTIME_DIRECTORY`), writes [`ATTACHED_MARK`] there once the kernel
/// programs are attached; they stay attached (pinned) while the agent is
/// down. The shipped `enforced.slice` asserts it, so at boot the workloads
/// in the slice start only once their connections are captured — never
/// before, uncaptured — and not at all if the agent never attached (fail
/// closed). Elsewhere, nothing.
async fn mark_attached(cgroup: &Path, pins: &Path) {
    let Some(dir) = runtime_dir() else {
        return;
    };
    let text = mark_text(cgroup, pins);
    let path = dir.join(ATTACHED_MARK);
    let written = tokio::task::spawn_blocking(move || {
        let tmp = dir.join(format!("{ATTACHED_MARK}.{}", std::process::id()));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, dir.join(ATTACHED_MARK))
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    if let Err(e) = written {
        warn!(path = %path.display(), error = %e, "cannot say the capture is attached; the workloads of enforced.slice will not start");
    }
}

/// The first directory of systemd's `RUNTIME_DIRECTORY`, when set.
fn runtime_dir() -> Option<PathBuf> {
    std::env::var_os("RUNTIME_DIRECTORY")?
        .to_string_lossy()
        .split(':')
        .next()
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// Where the shipped unit's `RuntimeDirectory=enforcer` is, for a command
/// run from a shell (no `RUNTIME_DIRECTORY`).
const UNIT_RUNTIME_DIR: &str = "/run/enforcer";

/// The mark's text: the captured cgroup, then `pins <dir>`, the pin
/// directory of the instance that wrote it (whose mark it is).
fn mark_text(cgroup: &Path, pins: &Path) -> String {
    format!("{}\npins {}\n", cgroup.display(), pins.display())
}

/// What became of a capture mark.
#[derive(Debug, PartialEq, Eq)]
pub enum Unmarked {
    Removed(PathBuf),
    /// There was none.
    Absent,
    /// Another instance's (its pins named): that capture is still there.
    Kept {
        path: PathBuf,
        pins: String,
    },
}

/// `enforcer detach` of the instance pinned at `pins`: removes
/// [`ATTACHED_MARK`] (in `RUNTIME_DIRECTORY`, or the shipped unit's
/// `/run/enforcer`), since the capture it vouches for is gone. Kept, a slice
/// stopped and started again within the boot would pass its assertion and
/// start its workloads uncaptured with the agent unable to attach.
pub fn unmark_attached(pins: &Path) -> anyhow::Result<Unmarked> {
    unmark_attached_in(
        &runtime_dir().unwrap_or_else(|| PathBuf::from(UNIT_RUNTIME_DIR)),
        pins,
    )
}

/// Removes [`ATTACHED_MARK`] from `dir` unless it names another instance's
/// pins than `pins` (a second agent on the host, under another
/// `node_name`, whose capture is in place). A mark that names none (an
/// earlier release's) or cannot be read is removed: at worst the slice
/// waits for an agent to attach again.
fn unmark_attached_in(dir: &Path, pins: &Path) -> anyhow::Result<Unmarked> {
    let path = dir.join(ATTACHED_MARK);
    match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Unmarked::Absent),
        Ok(text) => {
            if let Some(other) = text.lines().find_map(|l| l.strip_prefix("pins "))
                && Path::new(other) != pins
            {
                return Ok(Unmarked::Kept {
                    path,
                    pins: other.to_owned(),
                });
            }
        }
        Err(_) => {}
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(Unmarked::Removed(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Unmarked::Absent),
        Err(e) => Err(e).with_context(|| {
            format!(
                "removing {}: it still says the capture is attached, so enforced.slice would start its workloads uncaptured; remove it by hand",
                path.display()
            )
        }),
    }
}

/// `identity.state_dir`, created 0700 when missing (the CA key, the token
/// counters and the handover socket live there).
fn ensure_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating identity.state_dir {}", dir.display()))
}

/// The CA and trust bundles a config names.
pub fn load_identity(config: &Config) -> anyhow::Result<(Ca, Bundles)> {
    let id = &config.identity;
    let td = trust_domain(config)?;
    let ca = match (&id.ca_cert, &id.ca_key) {
        (Some(cert), Some(key)) => Ca::load(&td, cert, key)?,
        _ => Ca::load_or_create(&td, &id.state_dir)?,
    };
    let mut bundles = federation_bundles(config)?;
    bundles.insert(&td, vec![ca.cert_der().clone()])?;
    Ok((ca, bundles))
}

/// The policy engine: the audit log opened and the first policy (compiled by
/// [`preflight`]) installed.
fn policy_engine(
    config: &Config,
    first: Option<crate::policy::Loaded>,
    metrics: Arc<crate::metrics::Metrics>,
) -> anyhow::Result<Policy> {
    let labels = crate::policy::audit::Labels::new(&config.node_name);
    let mut audit = AuditLog::open_for(
        &config.policy.audit_log,
        labels,
        config.policy.audit_on_failure,
        metrics.audit_write_failures.clone(),
    )
    .with_context(|| {
        format!(
            "opening policy.audit_log {}",
            config.policy.audit_log.display()
        )
    })?;
    if let Some(d) = &config.policy.decision_logs {
        let (handle, shipper) = crate::policy::ship::start(d, metrics.clone())
            .map_err(anyhow::Error::msg)
            .context("policy.decision_logs")?;
        tokio::spawn(shipper);
        info!(service = %d.service, "shipping decision logs");
        audit = audit.ship_to(handle);
    }
    let policy = Policy::new(
        config.policy.mode,
        config.policy.engine,
        audit,
        metrics,
        config.policy.eval_timeout(),
    )
    .context("starting the policy evaluation threads")?;
    if config.policy.source.is_empty() {
        warn!("policy.source is empty: no policy, every connection is denied");
    }
    if let Some(loaded) = first {
        info!(source = %config.policy.source, revision = %loaded.revision,
            bundle = loaded.bundle.as_ref().map(|b| b.name.as_str()),
            bundle_revision = loaded.bundle.as_ref().map(|b| b.revision.as_str()),
            engine = loaded.engine(), "policy loaded");
        policy.install(loaded);
    }
    Ok(policy)
}

/// Everything `enforcer run` checks before it binds a port or touches the
/// kernel — and so everything `enforcer check` checks: one function for both.
pub struct Preflight {
    pub cgroup: CaptureCgroup,
    pub rules: crate::config::CaptureRules,
    pub mesh: Vec<ipnet::IpNet>,
    pub entries: Entries,
    pub inbound_ports: Vec<(u16, PlaintextMode)>,
    pub inbound_addr: Option<SocketAddr>,
    /// The destinations served at L7.
    pub l7_routes: crate::l7::Routes,
    /// The first policy, compiled (a local source; a URL is fetched later).
    pub policy: Option<crate::policy::Loaded>,
    /// How bundles are bounded, verified and fetched (keys read).
    pub source_options: Arc<source::SourceOptions>,
}

/// Validates a loaded config against the machine: the captured cgroup (a
/// cgroup v2 directory that exists and is not the root of the hierarchy,
/// after `..` and symlinks are resolved), the rules, the entries, the
/// identity files, and the policy (a local source must compile). Creates
/// nothing.
pub fn preflight(config: &Config, config_path: &Path) -> anyhow::Result<Preflight> {
    let cgroup = CaptureCgroup::check(&config.capture.cgroup)?;
    let rules = config.capture_rules(config_path)?;
    let mesh = config.mesh_cidrs(config_path)?;
    let entries = Entries::parse(&config.identity.entries, &config.identity.trust_domain)?;
    let inbound_ports = config.inbound_ports(config_path)?;
    let l7_routes = crate::l7::Routes::from_config(config, config_path)?;
    let inbound_addr = config.inbound_addr(config_path)?;
    if config.identity.provider == ProviderKind::Embedded {
        let td = trust_domain(config)?;
        let id = &config.identity;
        match (&id.ca_cert, &id.ca_key) {
            (Some(cert), Some(key)) => drop(Ca::load(&td, cert, key)?),
            _ if id.state_dir.join("ca.pem").exists() || id.state_dir.join("ca.key").exists() => {
                drop(Ca::load(
                    &td,
                    &id.state_dir.join("ca.pem"),
                    &id.state_dir.join("ca.key"),
                )?)
            }
            _ => {}
        }
    }
    federation_bundles(config)?;
    let source_options = Arc::new(crate::policy::source::SourceOptions::for_config(
        config,
        config_path,
    )?);
    let policy = if config.policy.source.is_empty() {
        None
    } else {
        let src = PolicySource::parse(&config.policy.source).map_err(anyhow::Error::msg)?;
        match src {
            PolicySource::Url(_) => None,
            local => Some(
                source::load_local(
                    &local,
                    &source_options,
                    config.policy.engine,
                    config.policy.eval_timeout(),
                )
                .with_context(|| format!("loading policy.source {}", local.describe()))?,
            ),
        }
    };
    Ok(Preflight {
        cgroup,
        rules,
        mesh,
        entries,
        inbound_ports,
        inbound_addr,
        l7_routes,
        policy,
        source_options,
    })
}

/// This node's trust domain, `identity.trust_domain`.
fn trust_domain(config: &Config) -> anyhow::Result<TrustDomain> {
    TrustDomain::new(&config.identity.trust_domain)
        .with_context(|| format!("identity.trust_domain {:?}", config.identity.trust_domain))
}

/// The trust bundles the config adds by hand (federation).
fn federation_bundles(config: &Config) -> anyhow::Result<Bundles> {
    let mut bundles = Bundles::default();
    for f in &config.identity.federation {
        let ftd = TrustDomain::new(&f.trust_domain)
            .with_context(|| format!("identity.federation trust_domain {:?}", f.trust_domain))?;
        bundles.insert_pem_file(&ftd, &f.bundle)?;
    }
    Ok(bundles)
}

/// The identity manager of the configured provider.
async fn identity_manager(
    config: &Config,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> anyhow::Result<IdentityManager> {
    let ttl = Duration::from_secs(config.identity.svid_ttl_secs);
    let td = trust_domain(config)?;
    match config.identity.provider {
        ProviderKind::Embedded => {
            let (ca, bundles) = load_identity(config)?;
            let trust = Arc::new(TrustStore::new(bundles));
            Ok(IdentityManager::new(
                Source::Embedded(Box::new(ca)),
                td,
                ttl,
                trust,
                provider,
            ))
        }
        ProviderKind::Spire => {
            let spire = Arc::new(
                SpireSource::connect(&config.identity.spire_socket, provider.clone()).await?,
            );
            let extra = federation_bundles(config)?;
            let mut bundles = spire.fetch_bundles().await?;
            bundles.merge(&extra);
            info!(socket = %config.identity.spire_socket.display(), trust_domains = ?bundles.trust_domains().collect::<Vec<_>>(), "identities from SPIRE");
            let trust = Arc::new(TrustStore::new(bundles));
            tokio::spawn(spire.clone().follow_bundles(trust.clone(), extra));
            Ok(IdentityManager::new(
                Source::Spire(spire),
                td,
                ttl,
                trust,
                provider,
            ))
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT. Pinned kernel programs stay
/// attached afterwards (fail closed); `enforcer detach` removes them.
pub async fn run(config: Config, config_path: &Path) -> anyhow::Result<()> {
    // SIGHUP (logrotate) and SIGUSR2 (an upgrade) are handled from the
    // start: their default action ends the process. One that arrives while
    // the agent starts is acted on once it serves.
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    let Preflight {
        cgroup,
        rules,
        mesh,
        entries,
        inbound_ports,
        inbound_addr,
        l7_routes,
        policy: first_policy,
        source_options,
    } = preflight(&config, config_path)?;

    // Every socket the agent makes from here on carries its mark (the kernel
    // programs recognise the agent by it, never by pid).
    crate::mark::set(config.capture.agent_mark);
    let own_cgroup = crate::attest::selectors::own_cgroup_id(&cgroup.mount)
        .context("finding the agent's own cgroup (/proc/self/cgroup)")?;
    let state_dir = config.identity.state_dir.clone();
    ensure_state_dir(&state_dir)?;
    seed_random().await?;
    let pid_ns = tokio::task::spawn_blocking(|| std::fs::read_link("/proc/self/ns/pid"))
        .await
        .ok()
        .and_then(Result::ok);
    if let Some(warning) = pid_ns.and_then(|ns| {
        crate::attest::pid_namespace_warning(&ns.to_string_lossy(), &config.identity.entries)
    }) {
        warn!("{warning}");
    }
    // A hitless upgrade: the agent running with this state_dir hands its
    // listeners over; without one, they are bound here.
    let mut inherited = {
        let (dir, node) = (state_dir.clone(), config.node_name.clone());
        tokio::task::spawn_blocking(move || handover::take_over(&dir, &node, own_cgroup))
            .await
            .context("the handover task")??
    };
    let mut listening = Listening {
        inherited: inherited.as_mut(),
        offer: handover::Offer::new(&config.node_name, own_cgroup),
    };
    // Bind everything before touching the kernel: a port in use fails cleanly.
    let port = config.capture.outbound_port;
    let out4_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let out4 = listening
        .get("outbound4", out4_addr, true, || {
            outbound_listener(out4_addr)
        })?
        .context("IPv4 loopback is unavailable")?;
    let out6_addr = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let out6 = listening.get("outbound6", out6_addr, true, || {
        outbound_listener(out6_addr)
    })?;
    if out6.is_none() {
        warn!("IPv6 loopback is unavailable; IPv6 connects will not be captured successfully");
    }
    let inbound_listener = match inbound_addr {
        Some(addr) => listening.get("hbone", addr, false, || {
            bind(addr, "mesh.inbound_addr").map(Some)
        })?,
        None => None,
    };
    let plaintext = if inbound_ports.is_empty() {
        None
    } else {
        let port = config.mesh.plaintext_port;
        let v4_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let v4 = listening
            .get("plaintext4", v4_addr, true, || plaintext_listener(v4_addr))?
            .with_context(|| format!("cannot listen on {v4_addr} (mesh.plaintext_port)"))?;
        let v6_addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let v6 = listening.get("plaintext6", v6_addr, true, || plaintext_listener(v6_addr))?;
        Some((v4, v6))
    };
    let admin_addr = config.admin.metrics_addr;
    let admin_listener = listening
        .get("admin", admin_addr, false, || {
            bind(admin_addr, "admin.metrics_addr").map(Some)
        })?
        .context("admin listener")?;
    let status_listener = match config.status_addr(config_path)? {
        Some(addr) => listening.get("status", addr, false, || {
            bind(addr, "admin.status_addr").map(Some)
        })?,
        None => None,
    };
    let offer = listening.offer;

    let state = Arc::new(AdminState::new(&config.node_name));
    let policy = Arc::new(policy_engine(&config, first_policy, state.metrics.clone())?);
    let traces = crate::otel::init(&config.traces, &config.node_name, state.metrics.clone())
        .map_err(anyhow::Error::msg)
        .context("traces")?;
    if traces.is_some() {
        info!(endpoint = %config.traces.endpoint, "exporting traces over OTLP");
    }
    serve_admin_apart(admin_listener, status_listener, state.clone())?;
    let counters = config.identity.state_dir.join("llm-usage.json");
    let tokens = Arc::new(
        crate::l7::tokens::Tokens::open(&counters)
            .map_err(anyhow::Error::msg)
            .context("LLM token counters")?,
    );
    tokio::spawn(tokens.clone().keep_written());
    let counted = tokens.clone();
    if l7_routes.has(crate::l7::Protocol::Llm) {
        tokio::task::spawn_blocking(crate::l7::tokens::load_tokenizer);
    }
    {
        let (tokens, policy) = (tokens.clone(), policy.clone());
        let _ = state.llm_usage.set(Box::new(move || {
            serde_json::json!({
                "sources": tokens.snapshot(crate::l7::tokens::now()),
                "budgets": policy.llm_budgets().to_json(),
            })
        }));
    }
    let l7 = Arc::new(crate::l7::L7 {
        policy: policy.clone(),
        metrics: state.metrics.clone(),
        routes: l7_routes,
        tokens,
        collections: Default::default(),
    });

    let provider = tls::provider();
    let identity = Arc::new(identity_manager(&config, provider.clone()).await?);
    {
        let identity = identity.clone();
        let _ = state.svids.set(Box::new(move || identity.held()));
    }
    let attestor = Arc::new(Attestor::new(entries));
    let mut pod_watch = None;
    if let Some(k) = &config.kubernetes {
        let pods = Arc::new(crate::k8s::Pods::new(&config.identity.trust_domain));
        // Reads the token and CA files: off the runtime's threads.
        let client = {
            let k = k.clone();
            tokio::task::spawn_blocking(move || crate::k8s::client(&k))
                .await
                .context("the kubernetes client task")?
                .map_err(anyhow::Error::msg)
                .context("kubernetes")?
        };
        let node = k.node_name(&config.node_name);
        info!(node = %node, api_server = %if k.api_server.is_empty() { "in-cluster" } else { k.api_server.as_str() },
            "watching this node's pods");
        tokio::spawn(crate::k8s::watch(pods.clone(), client, node.clone()));
        pod_watch = Some((pods.clone(), node));
        attestor.set_pods(pods.clone(), &k.pods_cgroup);
        let _ = state.readiness.set(Box::new(move || pods.readiness()));
    }
    let local = Arc::new(LocalAttestor::default());

    let steering = InboundSteering {
        ports: inbound_ports
            .iter()
            .map(|(p, m)| {
                let mode = match m {
                    PlaintextMode::Strict => enforcer_common::INBOUND_STRICT,
                    PlaintextMode::Permissive => enforcer_common::INBOUND_PERMISSIVE,
                };
                (*p, mode)
            })
            .collect(),
        listener_v4: plaintext.as_ref().map(|(v4, _)| v4),
        listener_v6: plaintext.as_ref().and_then(|(_, v6)| v6.as_ref()),
    };
    // Pods with a netns of their own that run already: their listeners
    // are made, and their netns captured from the moment the programs are.
    let in_pod = config.kubernetes.as_ref().filter(|k| k.in_pod);
    let pod_ports = crate::inpod::Ports {
        outbound: port,
        hbone: inbound_addr.map(|_| config.mesh.hbone_port),
        plaintext: (!inbound_ports.is_empty()).then_some(config.mesh.plaintext_port),
    };
    let pod_offer = offer.pods();
    let found = match in_pod {
        Some(k) => {
            let (mount, roots, ports) = (
                cgroup.mount.clone(),
                k.pods_cgroup.clone(),
                pod_ports.clone(),
            );
            let handed = inherited
                .as_mut()
                .map(handover::Inherited::take_pods)
                .unwrap_or_default();
            tokio::task::spawn_blocking(move || {
                crate::inpod::reconcile(&mount, &roots, &ports, handed)
            })
            .await
            .context("the pod reconcile task")?
        }
        None => Default::default(),
    };
    let capture = Arc::new(Capture::attach(
        cgroup.clone(),
        &config.capture.bpffs,
        &config.node_name,
        &rules,
        port,
        &steering,
        &crate::capture::TakingOver {
            handover_cgroup: inherited.as_ref().map(handover::Inherited::cgroup_id),
            pods: &found.cookies,
        },
    )?);
    mark_attached(&cgroup.path, &capture.pin_dir).await;
    {
        let capture = capture.clone();
        attestor.set_exec_marks(Box::new(move |tgid| capture.exec_mark(tgid)));
    }
    let mut plaintext_handler = None;
    if let Some((v4, v6)) = plaintext {
        let handler = Arc::new(Plaintext {
            modes: inbound_ports.iter().copied().collect(),
            identity: identity.clone(),
            policy: policy.clone(),
            attestor: attestor.clone(),
            local: local.clone(),
            admin: state.clone(),
            l7: l7.clone(),
            net: Default::default(),
        });
        for l in std::iter::once(v4).chain(v6) {
            let l = TcpListener::from_std(l).context("plaintext listener")?;
            tokio::spawn(handler.clone().serve(l));
        }
        plaintext_handler = Some(handler);
    }
    let _ = state.capture.set(capture.clone());
    // Records of connects the agent will never accept (capture/sweep.rs).
    let sweep = crate::capture::sweep::Sweep::open(&capture.pin_dir)
        .context("opening the capture record maps for their sweep")?;
    tokio::spawn(crate::capture::sweep::run(sweep, state.metrics.clone()));
    tokio::spawn(watch_pins(capture.pin_dir.clone(), state.clone()));

    let hbone = Arc::new(HboneClient::new(identity.clone(), config.mesh.hbone_port));
    // The pods served in their own netns, for /status (set below).
    let served_pods: Arc<std::sync::OnceLock<Arc<crate::inpod::InPod>>> = Default::default();
    let started = std::time::SystemTime::now();
    {
        let (identity, attestor, hbone, policy, metrics, state2) = (
            identity.clone(),
            attestor.clone(),
            hbone.clone(),
            policy.clone(),
            state.metrics.clone(),
            state.clone(),
        );
        let node = config.node_name.clone();
        let served_pods = served_pods.clone();
        let l7_destinations = serde_json::to_value(&config.l7.destinations).unwrap_or_default();
        let _ = state.status.set(Box::new(move || {
            crate::admin::status::document(crate::admin::status::Parts {
                node: &node,
                started,
                ready: state2.readiness().is_ok(),
                workloads: attestor.seen(),
                svids: identity.held(),
                open: metrics.open_by_identity.snapshot(),
                pooled: hbone.pooled(),
                policy: policy.status(),
                l7_destinations: l7_destinations.clone(),
                llm: state2.llm_usage.get().map(|v| v()),
                kubernetes: pod_watch.as_ref().map(|(pods, node)| {
                    let mut k = pods.status(node);
                    if let Some(inpod) = served_pods.get() {
                        k["pods_served"] = serde_json::json!(
                            inpod
                                .served()
                                .into_iter()
                                .map(|(uid, netns)| serde_json::json!({"uid": uid, "netns_cookie": netns}))
                                .collect::<Vec<_>>()
                        );
                    }
                    k
                }),
            })
        }));
    }
    state.set_config(serde_json::to_value(&config).unwrap_or_default());

    let outbound = Arc::new(Outbound {
        capture: capture.clone(),
        cgroups: Arc::new(Mutex::new(CgroupResolver::new(&cgroup))),
        admin: state.clone(),
        attestor: attestor.clone(),
        identity: identity.clone(),
        policy: policy.clone(),
        node: config.node_name.clone(),
        hbone,
        mesh,
        local: local.clone(),
        local_addrs: Default::default(),
        l7: l7.clone(),
        net: Default::default(),
    });
    tokio::spawn(
        outbound
            .clone()
            .serve(TcpListener::from_std(out4).context("outbound listener")?),
    );
    if let Some(l) = out6 {
        tokio::spawn(
            outbound
                .clone()
                .serve(TcpListener::from_std(l).context("outbound listener")?),
        );
    }
    let mut inbound_handler = None;
    if inbound_addr.is_some() {
        let inbound = Arc::new(Inbound {
            identity: identity.clone(),
            policy: policy.clone(),
            attestor: attestor.clone(),
            local,
            admin: state.clone(),
            preauth: Default::default(),
            l7,
            limits: crate::proxy::inbound::H2Limits {
                max_concurrent_streams: config.mesh.max_concurrent_streams,
                max_header_list_size: config.mesh.max_header_list_size,
                max_streams_per_connection: config.mesh.max_streams_per_connection,
            },
            net: Default::default(),
        });
        if let Some(listener) = inbound_listener {
            let listener = TcpListener::from_std(listener).context("HBONE listener")?;
            tokio::spawn(inbound.clone().serve(listener));
        }
        inbound_handler = Some(inbound);
    }
    if let Some(k) = in_pod {
        let inpod = Arc::new(
            crate::inpod::InPod::new(
                capture.clone(),
                crate::inpod::Handlers {
                    outbound,
                    inbound: inbound_handler,
                    plaintext: plaintext_handler,
                },
                pod_ports,
                pod_offer,
            )
            .context("serving pods in their network namespaces")?,
        );
        inpod.serve_reconciled(found);
        let _ = served_pods.set(inpod.clone());
        tokio::spawn(inpod.clone().sweep());
        let cni = crate::inpod::listen_cni(&k.cni_socket).with_context(|| {
            format!(
                "listening on kubernetes.cni_socket {}",
                k.cni_socket.display()
            )
        })?;
        info!(socket = %k.cni_socket.display(), "pods with a network namespace of their own are served (enforcer-cni)");
        tokio::spawn(crate::inpod::serve_cni(inpod, cni));
    }
    tokio::spawn(renew_svids(identity.clone()));
    if let Ok(src) = PolicySource::parse(&config.policy.source)
        && !config.policy.source.is_empty()
    {
        tokio::spawn(source::watch(
            src,
            source_options,
            policy.clone(),
            Duration::from_millis(config.policy.poll_ms),
        ));
    }
    tokio::spawn(reload_entries(
        config_path.to_owned(),
        state.clone(),
        attestor,
        config.identity.trust_domain.clone(),
        policy.clone(),
    ));

    // SIGTERM and SIGINT are handled from here, before the agent says it is
    // ready (one sent at once must drain it, not kill it); during start
    // they still end it at once.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    state.ready.store(true, Ordering::Release);
    match inherited {
        None => notify_systemd(vec![sd_notify::NotifyState::Ready]).await,
        // Accepting on every listener: the previous agent may stop (and
        // tells systemd this agent's pid; it is the service's main process).
        Some(inherited) => {
            let previous = inherited.serving()?;
            let capture = capture.clone();
            tokio::spawn(async move {
                let pid = previous.pid;
                previous.exited().await;
                info!(previous = pid, "the previous agent has exited");
                if let Err(e) = capture.set_handover_cgroup(None) {
                    warn!(error = %e, "forgetting the previous agent's cgroup");
                }
            });
        }
    }
    let mut handover = handover::serve(&state_dir, offer)?;
    let mut handover_open = true;
    // The agent this one handed over to: held until exit (it sees the
    // handover socket close then).
    let mut successor = None;
    info!(
        node = %config.node_name,
        cgroup = %cgroup.path.display(),
        outbound_port = port,
        hbone = %config.mesh.inbound_addr,
        trust_domain = %identity.trust_domain(),
        policy = %config.policy.source,
        policy_mode = ?config.policy.mode,
        audit_log = %config.policy.audit_log.display(),
        metrics = %config.admin.metrics_addr,
        pins = %capture.pin_dir.display(),
        "enforcer ready"
    );

    loop {
        tokio::select! {
            _ = term.recv() => {
                info!("SIGTERM received; stopping (captured connects are refused from now until the agent is back)");
                notify_systemd(vec![sd_notify::NotifyState::Stopping]).await;
                break;
            }
            _ = int.recv() => {
                info!("SIGINT received; stopping (captured connects are refused from now until the agent is back)");
                notify_systemd(vec![sd_notify::NotifyState::Stopping]).await;
                break;
            }
            _ = hup.recv() => {
                info!("SIGHUP received; reopening the audit log");
                policy.audit.reopen();
            }
            _ = usr2.recv(), if handover_open => {
                info!("SIGUSR2 received; starting a new agent to take over");
                start_successor();
            }
            handed = &mut handover, if handover_open => {
                let Ok(handed) = handed else {
                    warn!("the handover thread ended; no hitless upgrade from this agent");
                    handover_open = false;
                    continue;
                };
                info!(successor = handed.pid, "handed over to a new agent; draining");
                // systemd follows the new agent as the service's main process.
                notify_systemd(vec![sd_notify::NotifyState::MainPid(handed.pid)]).await;
                successor = Some(handed);
                break;
            }
        }
    }
    crate::drain::run(Duration::from_secs(config.runtime.drain_secs)).await;
    if successor.is_some() && config.runtime.after_handover == crate::config::AfterHandover::Wait {
        info!("handed over and drained; waiting for SIGTERM (runtime.after_handover = \"wait\")");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    // Whatever the audit thread still holds is written before the exit.
    if tokio::time::timeout(Duration::from_secs(5), policy.audit.flush())
        .await
        .is_err()
    {
        warn!("the audit log did not take its last lines within 5 s");
    }
    // The tokens of the last answers metered, merged into the counters'
    // file (a successor agent reads them within a second).
    match tokio::time::timeout(Duration::from_secs(5), counted.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "the last LLM token counts were not written"),
        Err(_) => warn!("the last LLM token counts were not written within 5 s"),
    }
    if let Some(t) = traces {
        t.shutdown(Duration::from_secs(5)).await;
    }
    Ok(())
}

/// SIGUSR2 (systemd: `systemctl kill --kill-whom=main -s SIGUSR2 enforcer`):
/// starts the program at this process's `argv[0]` — the binary installed
/// now, which may be newer than the one running — with the same arguments
/// and environment, in this process's cgroup. It takes the listeners over
/// (`handover`); this agent then drains. If it fails first, its exit is
/// logged here and this agent serves on.
///
/// The new agent is not this process's child: it is started through a
/// process that exits at once (a double fork), so it is reparented to the
/// service manager before this agent names it the main process
/// (`MAINPID=`). systemd supervises a main process that is not its own
/// child only by its pid ("Supervising process … which is not our child";
/// systemd 252): it did not see it exit, and `systemctl stop` then sent
/// SIGTERM and SIGKILL at once, so the agent never drained
/// (`deploy::the_shipped_unit_runs_under_systemd_and_upgrades_hitlessly`).
fn start_successor() {
    let mut args = std::env::args_os();
    let Some(program) = args.next() else {
        warn!("no argv[0]; cannot start a new agent");
        return;
    };
    let args: Vec<_> = args.collect();
    // fork and exec block: not on a runtime thread.
    tokio::spawn(async move {
        let name = program.to_string_lossy().into_owned();
        let started = tokio::task::spawn_blocking(move || spawn_detached(&program, &args))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                warn!(program = %name, error = %e, "starting the new agent failed; this agent serves on");
                return;
            }
        };
        info!(successor = pid, program = %name, "new agent started");
        // Watched (not waited for: it is not this process's child) while
        // this agent still serves: it failed to take over.
        match exited(pid).await {
            Ok(()) if !crate::drain::is_draining() => {
                warn!(
                    successor = pid,
                    "the new agent exited before it took over; this agent serves on"
                )
            }
            Ok(()) => {}
            Err(e) => warn!(successor = pid, error = %e, "watching the new agent"),
        }
    });
}

/// Starts `program` with `args` as a grandchild whose parent has exited,
/// and returns its pid once it has executed `program` (or the error of
/// the fork or the exec).
fn spawn_detached(program: &std::ffi::OsStr, args: &[std::ffi::OsString]) -> std::io::Result<u32> {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    // The intermediate process writes the new agent's pid here.
    let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let tx_fd = tx.as_raw_fd();
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).stdin(std::process::Stdio::null());
    // SAFETY: runs in the forked child before exec, and calls only
    // async-signal-safe functions (fork, write, _exit); it allocates
    // nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || match libc::fork() {
            -1 => Err(std::io::Error::last_os_error()),
            // The new agent: goes on to exec.
            0 => Ok(()),
            pid => {
                let bytes = pid.to_ne_bytes();
                libc::write(tx_fd, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(0)
            }
        });
    }
    // Returns once the new agent has executed (its copy of the exec-error
    // pipe closed) or failed to; the intermediate has exited by then.
    let mut intermediate = cmd.spawn()?;
    drop(tx);
    let _ = intermediate.wait();
    let mut bytes = [0u8; std::mem::size_of::<libc::pid_t>()];
    std::io::Read::read_exact(&mut std::fs::File::from(rx), &mut bytes)
        .map_err(|e| std::io::Error::other(format!("the new agent's pid: {e}")))?;
    u32::try_from(libc::pid_t::from_ne_bytes(bytes))
        .map_err(|_| std::io::Error::other("the new agent's pid is negative"))
}

/// Resolves when process `pid` (not a child: no status) has exited, on the
/// runtime's reactor (a pidfd turns readable then).
async fn exited(pid: u32) -> std::io::Result<()> {
    use std::os::fd::FromRawFd as _;
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: the OwnedFd is moved in and stays open, the same descriptor,
    // for as long as the AsyncFd lives.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(std::io::Error::from)?;
    let _ready = fd.readable().await?;
    Ok(())
}

/// Runs the admin server (metrics, probes, `/llm/usage`) on a thread and
/// runtime of its own: a scrape (the capture maps counted with syscalls,
/// the text encoded) never takes a data-plane thread, and a data plane
/// that is saturated still answers `/healthz`. The memory upkeep
/// (`memory::upkeep`) runs there too.
fn serve_admin_apart(
    listener: std::net::TcpListener,
    status: Option<std::net::TcpListener>,
    state: Arc<AdminState>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("the admin runtime")?;
    let data_plane = tokio::runtime::Handle::current();
    let workers = data_plane.metrics().num_workers();
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let st = state.clone();
                tokio::spawn(crate::memory::upkeep(
                    state.metrics.clone(),
                    data_plane,
                    workers,
                    move || st.ready.load(Ordering::Acquire),
                ));
                if let Some(l) = status {
                    match TcpListener::from_std(l) {
                        Ok(l) => {
                            tokio::spawn(admin::serve(l, state.clone(), admin::Surface::Status));
                        }
                        Err(e) => tracing::error!(error = %e, "status listener; no /status"),
                    }
                }
                match TcpListener::from_std(listener) {
                    Ok(l) => admin::serve(l, state, admin::Surface::Metrics).await,
                    Err(e) => tracing::error!(error = %e, "admin listener; no admin server"),
                }
            })
        })
        .context("starting the admin thread")?;
    Ok(())
}

/// Tells systemd (a `Type=notify` unit: `NOTIFY_SOCKET` is set) that the
/// agent is ready — when `/readyz` turns 200 — or stopping; without
/// `NOTIFY_SOCKET`, nothing.
async fn notify_systemd(state: Vec<sd_notify::NotifyState<'static>>) {
    match tokio::task::spawn_blocking(move || sd_notify::notify(false, &state)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "telling systemd (NOTIFY_SOCKET) failed"),
        Err(e) => warn!(error = %e, "telling systemd (NOTIFY_SOCKET) failed"),
    }
}

/// The outbound listener on a loopback address, marked so the kernel
/// programs redirect captured connects to it and to nothing else; `None` when
/// that loopback address does not exist.
fn outbound_listener(addr: SocketAddr) -> anyhow::Result<Option<std::net::TcpListener>> {
    match crate::mark::listener(addr) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(e).with_context(|| {
            format!("cannot mark the listener on {addr} with capture.agent_mark: that needs CAP_NET_ADMIN")
        }),
        Err(e) => Err(e).with_context(|| format!("cannot listen on {addr} (capture.outbound_port)")),
    }
}

/// A plaintext listener (0.0.0.0, or [::] with IPV6_V6ONLY) that the
/// kernel steers protected ports to; `None` for [::] without IPv6.
fn plaintext_listener(addr: SocketAddr) -> anyhow::Result<Option<std::net::TcpListener>> {
    match crate::mark::listener(addr) {
        Ok(l) => Ok(Some(l)),
        Err(e)
            if addr.is_ipv6()
                && (e.raw_os_error() == Some(libc::EAFNOSUPPORT)
                    || e.raw_os_error() == Some(libc::EADDRNOTAVAIL)) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen on {addr} (mesh.plaintext_port)")),
    }
}

/// Renews SVIDs in use at half-life, so a workload always holds a fresh one.
async fn renew_svids(identity: Arc<IdentityManager>) {
    let period = (identity.ttl() / 10).clamp(Duration::from_millis(200), Duration::from_secs(30));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        // Renewing signs: on the chores thread.
        let id = identity.clone();
        if let Err(e) = crate::chores::run(move || id.renew_due()).await {
            warn!(error = %e, "SVID renewal task failed");
        }
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Checks every second that the kernel programs' link pins are there. They
/// are what keeps the programs attached, so once they are gone (`enforcer
/// detach --force` under this agent, a pin removed by hand) nothing is
/// captured: the agent says so, loudly, and is not ready (`/readyz` 503,
/// `enforcer_ready` 0) until they are back (a successor agent pins its
/// own in the same place), and removes the mark `enforced.slice` asserts.
/// Two checks in a row must agree, so a successor replacing the pins is no
/// alarm; none while a successor takes over (it may retire this layout's
/// pins for good) or while draining.
async fn watch_pins(dir: PathBuf, admin: Arc<AdminState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut missing_before, mut detached) = (false, false);
    loop {
        tick.tick().await;
        if crate::drain::is_draining() {
            return;
        }
        if crate::handover::handing_over() {
            // A successor retires these pins (all of them when its release
            // has another pin layout) once its own programs are attached.
            missing_before = false;
            continue;
        }
        let d = dir.clone();
        let Ok(missing) = crate::chores::run(move || crate::capture::missing_link_pins(&d)).await
        else {
            continue;
        };
        let gone = !missing.is_empty() && missing_before;
        missing_before = !missing.is_empty();
        if gone && !detached {
            detached = true;
            admin
                .capture_detached
                .store(true, std::sync::atomic::Ordering::Release);
            tracing::error!(
                pins = %dir.display(),
                ?missing,
                "the kernel programs are detached: their pins are gone (enforcer detach --force, or removed by hand), so this agent captures nothing and workloads connect direct; not ready until they are back (restart the agent to attach again)"
            );
            // Nor does the mark say otherwise: a slice started again would
            // pass its assertion (only where this agent wrote it).
            if let Some(run) = runtime_dir() {
                let pins = dir.clone();
                let removed = crate::chores::run(move || unmark_attached_in(&run, &pins))
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r);
                match removed {
                    Ok(Unmarked::Removed(path)) => {
                        info!(path = %path.display(), "capture mark removed")
                    }
                    Ok(Unmarked::Absent) => {}
                    Ok(Unmarked::Kept { path, pins }) => {
                        info!(path = %path.display(), pins, "capture mark kept: another instance's")
                    }
                    Err(e) => warn!(error = %format!("{e:#}"), "capture mark kept"),
                }
            }
        } else if missing.is_empty() && detached {
            detached = false;
            admin
                .capture_detached
                .store(false, std::sync::atomic::Ordering::Release);
            info!(pins = %dir.display(), "the kernel programs' pins are back");
        }
    }
}

/// Reloads the registration entries when the config file changes. An invalid
/// file is rejected with an error and the entries in force stay.
async fn reload_entries(
    path: PathBuf,
    admin: Arc<AdminState>,
    attestor: Arc<Attestor>,
    trust_domain: String,
    policy: Arc<Policy>,
) {
    let stat = |path: &PathBuf| {
        let p = path.clone();
        async move { crate::chores::run(move || mtime(&p)).await.ok().flatten() }
    };
    let mut seen = stat(&path).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = stat(&path).await;
        if now == seen {
            continue;
        }
        seen = now;
        let p = path.clone();
        let loaded = crate::chores::run(move || crate::settings::load(&p))
            .await
            .map_err(anyhow::Error::from);
        let result = loaded.and_then(|c| {
            let c = c?;
            if c.identity.trust_domain != trust_domain {
                warn!(
                    "identity.trust_domain changed; that takes a restart and is ignored until then"
                );
            }
            Entries::parse(&c.identity.entries, &trust_domain)
                .map(|e| (e, c.identity.entries))
                .map_err(anyhow::Error::from)
        });
        match result {
            Ok((entries, reloaded)) => {
                let n = entries.len();
                if *attestor.entries() != entries {
                    attestor.set_entries(entries);
                    admin.set_entries(serde_json::to_value(&reloaded).unwrap_or_default());
                    // Identities may have changed: cached decisions go.
                    policy.invalidate();
                    info!(entries = n, path = %path.display(), "registration entries reloaded");
                }
            }
            Err(e) => {
                warn!(path = %path.display(), error = %format!("{e:#}"), "config change rejected; the previous registration entries stay in force")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_removes_its_own_mark_and_keeps_another_instances() {
        let dir = std::env::temp_dir().join(format!("enforcer-mark-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mark = dir.join(ATTACHED_MARK);
        let ours = Path::new("/sys/fs/bpf/enforcer/v2/n1");
        let theirs = Path::new("/sys/fs/bpf/enforcer/v2/n2");
        let cgroup = Path::new("/sys/fs/cgroup/enforced.slice");
        assert_eq!(
            unmark_attached_in(&dir, ours).expect("none"),
            Unmarked::Absent
        );
        // Another instance's mark: its capture is still in place.
        std::fs::write(&mark, mark_text(cgroup, theirs)).expect("mark");
        assert_eq!(
            unmark_attached_in(&dir, ours).expect("kept"),
            Unmarked::Kept {
                path: mark.clone(),
                pins: theirs.display().to_string()
            }
        );
        assert!(mark.exists());
        // Its own, and one of an earlier release (no pins line): removed.
        for text in [mark_text(cgroup, ours), format!("{}\n", cgroup.display())] {
            std::fs::write(&mark, text).expect("mark");
            assert_eq!(
                unmark_attached_in(&dir, ours).expect("removed"),
                Unmarked::Removed(mark.clone())
            );
            assert!(!mark.exists());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
