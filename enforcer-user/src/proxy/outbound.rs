//! Outbound: accepts the connections the kernel redirected to the loopback
//! listener, recovers their original destination and the kernel facts about
//! the workload, and forwards the bytes.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use enforcer_common::OrigDst;

use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument as _, info_span, warn};

use super::{Outcome, Relay, connect_within, next_conn_id, refuse};
use crate::record::{ConnRecord, Kind};
use crate::{
    admin::AdminState,
    attest::{Attestation, Attestor, WorkloadFacts, local::LocalAttestor},
    capture::{Capture, CgroupResolver, original_destination},
    mark,
    tunnel::HboneClient,
};

/// Everything an outbound connection handler needs.
pub struct Outbound {
    pub capture: Arc<Capture>,
    pub cgroups: Arc<Mutex<CgroupResolver>>,
    pub admin: Arc<AdminState>,
    pub attestor: Arc<Attestor>,
    pub hbone: Arc<HboneClient>,
    pub identity: Arc<crate::identity::IdentityManager>,
    pub policy: Arc<crate::policy::Policy>,
    pub node: String,
    /// Destinations served by peer agents (reached over HBONE).
    pub mesh: Vec<ipnet::IpNet>,
    /// Destinations on this node: attested locally, connected directly.
    pub local: Arc<LocalAttestor>,
    pub local_addrs: LocalAddrs,
    pub l7: Arc<crate::l7::L7>,
    /// Where the listener lives and the agent's sockets for it are made:
    /// the node's netns, or a pod's (its connections leave from the pod).
    pub net: crate::netns::Net,
}

/// The addresses of this network namespace: the node's, re-read at most
/// once a second rather than per connection; a pod's, read when the agent
/// began to serve it (a pod keeps its addresses).
#[derive(Default)]
pub struct LocalAddrs(Mutex<Option<(Option<Instant>, Vec<std::net::IpAddr>)>>);

impl LocalAddrs {
    /// Addresses that are never re-read (a pod's).
    pub fn fixed(addrs: Vec<std::net::IpAddr>) -> Self {
        Self(Mutex::new(Some((None, addrs))))
    }

    /// Whether `ip` is this node (or pod): one of its interfaces'
    /// addresses, loopback, or the unspecified address (which the kernel
    /// connects to this host).
    fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        if ip.is_loopback() || ip.is_unspecified() {
            return true;
        }
        let mut cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if cached
            .as_ref()
            .is_none_or(|(at, _)| at.is_some_and(|at| at.elapsed() > Duration::from_secs(1)))
        {
            *cached = Some((Some(Instant::now()), crate::netns::interface_addresses()));
        }
        cached.as_ref().is_some_and(|(_, a)| a.contains(&ip))
    }
}

impl Outbound {
    /// The handler of a pod's outbound listener: this one's shared parts,
    /// with the pod's netns (its dials leave from the pod), its addresses
    /// and its listeners.
    pub fn for_pod(
        &self,
        net: crate::netns::Net,
        local: Arc<LocalAttestor>,
        addrs: Vec<std::net::IpAddr>,
    ) -> Self {
        Self {
            capture: self.capture.clone(),
            cgroups: self.cgroups.clone(),
            admin: self.admin.clone(),
            attestor: self.attestor.clone(),
            hbone: self.hbone.clone(),
            identity: self.identity.clone(),
            policy: self.policy.clone(),
            node: self.node.clone(),
            mesh: self.mesh.clone(),
            local,
            local_addrs: LocalAddrs::fixed(addrs),
            l7: self.l7.clone(),
            net,
        }
    }

    /// Accepts on `listener` forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        super::accept_loop(listener, "outbound", |stream, peer| {
            let id = next_conn_id();
            let span = info_span!("conn", id, direction = "outbound", src = %peer);
            // No `async` block around it: it would hold the connection's
            // future twice (`Net::unless_gone`).
            self.net
                .unless_gone(self.clone().handle(id, stream, peer))
                .instrument(span)
        })
        .await
    }

    /// The source workload's attestation from the kernel's record. Resolving
    /// its cgroup (a walk of the captured subtree for a new cgroup) and its
    /// selectors (`/proc`, the executable's hash) block, so this runs on the
    /// blocking pool; while another connection's attestation hashes the
    /// same executable, this one waits for that digest as a task, so a
    /// burst of connects from a new workload holds one pool thread, not
    /// all of them. Should that fail, the workload has no identity.
    async fn attest_source(self: &Arc<Self>, rec: OrigDst) -> Attestation {
        let this = self.clone();
        let work = tokio::task::spawn_blocking(move || {
            let cgroup = this
                .cgroups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .path_of(rec.cgroup_id);
            this.attestor
                .attest_unless_hashing(WorkloadFacts::from_record(&rec, cgroup))
        });
        match work.await {
            Ok(Ok(att)) => att,
            Ok(Err(pending)) => pending.finish(&self.attestor).await,
            Err(e) => {
                warn!(error = %e, "attesting the source workload failed; it has no identity");
                Attestation {
                    facts: WorkloadFacts::from_record(&rec, None),
                    selectors: vec![],
                    spiffe_id: None,
                }
            }
        }
    }

    /// One connection: its setup, boxed and freed once done, then the
    /// relay ([`Relay`]).
    async fn handle(self: Arc<Self>, id: u64, client: TcpStream, peer: SocketAddr) {
        let Some((mut rec, relay)) = Box::pin(self.setup(id, client, peer)).await else {
            return;
        };
        rec.relaying();
        let (outcome, bytes) = relay.run(&self.l7).await;
        rec.end(outcome, bytes);
    }

    /// Everything before the relay; `None` when the connection was refused
    /// (its record written, the workload's socket reset).
    async fn setup(
        self: &Arc<Self>,
        id: u64,
        client: TcpStream,
        peer: SocketAddr,
    ) -> Option<(ConnRecord, Relay)> {
        let mut rec = ConnRecord::open(self.admin.metrics.clone(), Kind::Outbound, id);
        super::arm_reset(&client);

        let local = match client.local_addr() {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "accepted socket has no local address");
                return refuse(client, rec, Outcome::Error);
            }
        };
        let netns = self.net.pod().map_or(self.capture.host_netns, |p| p.cookie);
        let Some(record) = self.capture.take_original(peer, local, netns).await else {
            warn!(
                conn_id = id,
                "no capture record for this connection; refusing (only captured connects may use the outbound listener)"
            );
            return refuse(client, rec, Outcome::NoOriginalDestination);
        };
        let att = self.attest_source(record).await;
        let src_svid = match self.identity.identify(&att).await {
            Ok(s) => s,
            Err(e) => {
                warn!(conn_id = id, error = %e, "obtaining the source workload's SVID failed");
                None
            }
        };
        // The facts go to the connection's record; the selectors stay here.
        let Attestation {
            facts, selectors, ..
        } = att;
        rec.facts = Some(facts);
        rec.set_src_svid(src_svid.as_ref());
        let Some(dst) = original_destination(&record) else {
            warn!(
                family = record.family,
                "capture record has an unknown address family"
            );
            return refuse(client, rec, Outcome::NoOriginalDestination);
        };
        rec.dst = Some(dst);
        tracing::Span::current().record("dst", tracing::field::display(dst));

        let mut src_peer = super::peer(src_svid.as_deref(), &selectors, None);
        src_peer.node = Some(self.node.clone());

        if self.local_addrs.contains(dst.ip()) {
            // Same node: both ends attested here; the bytes never leave the host.
            rec.same_node = true;
            let (dst_svid, dst_selectors) =
                super::local_destination(&self.local, &self.attestor, &self.identity, dst).await;
            rec.set_dst_svid(dst_svid.as_ref());
            let dst_peer = super::peer(dst_svid.as_deref(), &dst_selectors, Some(dst));
            let route = self.l7.routes.find(
                dst.port(),
                dst_svid.as_ref().map(|s| &s.svid.spiffe_id),
                &dst_selectors,
            );
            let protocol = route.as_ref().map_or("tcp", |r| r.protocol.as_str());
            // The source's rule and the destination's (authoritative) rule.
            for direction in ["outbound", "inbound"] {
                if !self
                    .allowed(direction, protocol, &src_peer, &dst_peer, &mut rec)
                    .await
                {
                    return refuse(client, rec, Outcome::Denied);
                }
            }
            if rec.dst_id.is_some() && rec.src_id.is_none() {
                warn!(conn_id = id, orig_dst = %dst, selectors = ?selectors,
                    "workload has no SPIFFE identity; refusing a destination that has one");
                return refuse(client, rec, Outcome::NoIdentity);
            }
            let upstream = match connect_within(super::connect_local(&self.net, dst)).await {
                Ok(s) => s,
                Err(error) => {
                    warn!(conn_id = id, orig_dst = %dst, %error, "connecting to the original destination failed");
                    return refuse(client, rec, Outcome::ConnectFailed);
                }
            };
            // At a declared destination this agent is the last before the
            // server: it decides each request, as the destination's
            // (inbound) rule.
            let l7 = route.map(|route| {
                let conn = crate::l7::Conn {
                    id,
                    direction: "inbound",
                    source: src_peer,
                    destination: dst_peer,
                    client: peer,
                    server: dst,
                    trace: rec.trace_context(),
                };
                (route, conn, super::dial_local(&self.net, dst))
            });
            return Some((rec, Relay::direct(l7, client, upstream)));
        }

        if self.mesh.iter().any(|n| n.contains(&dst.ip())) {
            rec.mtls = true;
            let Some(src_svid) = src_svid else {
                // Decided and audited all the same: policy may name unidentified workloads.
                let dst_peer = super::peer(None, &[], Some(dst));
                let outcome = if self
                    .allowed("outbound", "tcp", &src_peer, &dst_peer, &mut rec)
                    .await
                {
                    let why = if crate::attest::unknown_pod(&selectors) {
                        "a pod whose metadata is unknown (with [kubernetes] on, a pod the API has not shown gets no identity)"
                    } else {
                        "no registration entry matches"
                    };
                    warn!(conn_id = id, orig_dst = %dst, selectors = ?selectors, why,
                        "workload has no SPIFFE identity; refusing a mesh destination");
                    Outcome::NoIdentity
                } else {
                    Outcome::Denied
                };
                return refuse(client, rec, outcome);
            };
            let mut prepared = match self.hbone.prepare(&src_svid, dst, &self.net).await {
                Ok(t) => t,
                Err(e) => {
                    warn!(conn_id = id, orig_dst = %dst, reason = e.code(), error = %e, "HBONE tunnel failed");
                    return refuse(client, rec, Outcome::TunnelFailed);
                }
            };
            rec.dst_id = Some(prepared.peer_id.to_string());
            rec.hbone_reused = Some(prepared.reused);
            prepared.trace = rec.trace_context();
            // The destination's identity is verified now; nothing is requested yet.
            let dst_peer = crate::policy::Peer {
                authenticated: Some(true),
                address: Some(dst.ip().to_canonical().to_string()),
                port: Some(dst.port()),
                ..Default::default()
            }
            .with_id(Some(&prepared.peer_id));
            // The peer agent serves the destination's requests; the protocol
            // is what this node's config declares for it.
            let protocol = self
                .l7
                .routes
                .find(dst.port(), Some(&prepared.peer_id), &[])
                .map_or("tcp", |r| r.protocol.as_str());
            if !self
                .allowed("outbound", protocol, &src_peer, &dst_peer, &mut rec)
                .await
            {
                return refuse(client, rec, Outcome::Denied);
            }
            let tunnel = match self.hbone.open(&src_svid, prepared).await {
                Ok(t) => t,
                Err(e) => {
                    warn!(conn_id = id, orig_dst = %dst, reason = e.code(), error = %e, "HBONE tunnel failed");
                    return refuse(client, rec, Outcome::TunnelFailed);
                }
            };
            let _ = client.set_nodelay(true);
            return Some((rec, Relay::Tunnel { client, tunnel }));
        }

        // Outside the mesh: plain TCP, still decided by policy.
        let dst_peer = super::peer(None, &[], Some(dst));
        let route = self.l7.routes.find(dst.port(), None, &[]);
        let protocol = route.as_ref().map_or("tcp", |r| r.protocol.as_str());
        if !self
            .allowed("outbound", protocol, &src_peer, &dst_peer, &mut rec)
            .await
        {
            return refuse(client, rec, Outcome::Denied);
        }
        let upstream = match connect_within(mark::connect_in(&self.net, dst, None)).await {
            Ok(s) => {
                super::arm_reset(&s);
                s
            }
            Err(error) => {
                warn!(conn_id = id, orig_dst = %dst, %error, "connecting to the original destination failed");
                return refuse(client, rec, Outcome::ConnectFailed);
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        // Plaintext leaving the mesh: at a declared destination this agent
        // is the last before the server, and decides each request.
        let l7 = route.map(|route| {
            let conn = crate::l7::Conn {
                id,
                direction: "outbound",
                source: src_peer,
                destination: dst_peer,
                client: peer,
                server: dst,
                trace: rec.trace_context(),
            };
            let net = self.net.clone();
            let dial: crate::l7::Dial = Arc::new(move || {
                let net = net.clone();
                Box::pin(async move { mark::connect_in(&net, dst, None).await })
            });
            (route, conn, dial)
        });
        Some((rec, Relay::direct(l7, client, upstream)))
    }

    /// Decides one direction; records the decision in `rec`.
    async fn allowed(
        &self,
        direction: &'static str,
        protocol: &'static str,
        src: &crate::policy::Peer,
        dst: &crate::policy::Peer,
        rec: &mut ConnRecord,
    ) -> bool {
        let input = crate::policy::Input {
            direction,
            source: src.clone(),
            destination: dst.clone(),
            protocol,
            request: None,
        };
        let v = self.policy.decide(&input, rec.id).await;
        rec.decision_ids.push(v.decision_id);
        if !v.allowed {
            warn!(conn_id = rec.id, direction, reason = ?v.decision.reason, "denied by policy");
        }
        rec.policy_reason = v.decision.reason;
        v.allowed
    }
}
