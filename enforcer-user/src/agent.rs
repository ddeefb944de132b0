//! Wires the stages together for `enforcer run`.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    admin::{self, AdminState},
    capture::{Capture, CaptureCgroup, CgroupResolver},
    config::Config,
    proxy::outbound::Outbound,
};

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Runs the agent until SIGTERM or SIGINT. Pinned kernel programs stay
/// attached afterwards (fail closed); `enforcer detach` removes them.
pub async fn run(config: Config, config_path: &Path) -> anyhow::Result<()> {
    let cgroup = CaptureCgroup::check(&config.capture.cgroup)?;
    let rules = config.capture_rules(config_path)?;

    // Bind everything before touching the kernel: a port in use fails cleanly.
    let port = config.capture.outbound_port;
    let out4 = bind(
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        "capture.outbound_port",
    )
    .await?;
    let out6 = match TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await {
        Ok(l) => Some(l),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            warn!("IPv6 loopback is unavailable; IPv6 connects will not be captured successfully");
            None
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot listen on [::1]:{port} (capture.outbound_port)"));
        }
    };
    let admin_listener = bind(config.admin.metrics_addr, "admin.metrics_addr").await?;

    let state = Arc::new(AdminState::new(&config.node_name));
    tokio::spawn(admin::serve(admin_listener, state.clone()));

    let capture = Arc::new(Capture::attach(
        cgroup.clone(),
        &config.capture.bpffs,
        &config.node_name,
        &rules,
        port,
    )?);
    let _ = state.capture.set(capture.clone());

    let outbound = Arc::new(Outbound {
        capture: capture.clone(),
        cgroups: Mutex::new(CgroupResolver::new(&cgroup)),
        admin: state.clone(),
    });
    tokio::spawn(outbound.clone().serve(out4));
    if let Some(l) = out6 {
        tokio::spawn(outbound.serve(l));
    }
    state.ready.store(true, Ordering::Release);
    info!(
        node = %config.node_name,
        cgroup = %cgroup.path.display(),
        outbound_port = port,
        metrics = %config.admin.metrics_addr,
        pins = %capture.pin_dir.display(),
        "enforcer ready"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received; stopping (captured connects are refused until the agent is back)"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received; stopping (captured connects are refused until the agent is back)"),
    }
    Ok(())
}
