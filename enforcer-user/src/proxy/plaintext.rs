//! Plaintext that reaches a protected local port from outside the mesh
//! (steered here by the kernel's sk_lookup program, addresses unchanged):
//! `strict` refuses it, `permissive` forwards it to the workload and audits it
//! as unauthenticated.
use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument as _, info_span, warn};

use super::{Outcome, next_conn_id};
use crate::record::{ConnRecord, Kind};
use crate::{
    admin::AdminState,
    attest::{Attestor, local::LocalAttestor},
    config::PlaintextMode,
};

pub struct Plaintext {
    pub modes: HashMap<u16, PlaintextMode>,
    pub identity: Arc<crate::identity::IdentityManager>,
    pub policy: Arc<crate::policy::Policy>,
    pub attestor: Arc<Attestor>,
    pub local: Arc<LocalAttestor>,
    pub admin: Arc<AdminState>,
    pub l7: Arc<crate::l7::L7>,
    /// The netns of the listener (the node's, or a pod's).
    pub net: crate::netns::Net,
}

impl Plaintext {
    /// The handler of a pod's plaintext listener: this one's shared parts,
    /// with the pod's netns (its workloads are attested and connected to
    /// there).
    pub fn for_pod(&self, net: crate::netns::Net, local: Arc<LocalAttestor>) -> Self {
        Self {
            modes: self.modes.clone(),
            identity: self.identity.clone(),
            policy: self.policy.clone(),
            attestor: self.attestor.clone(),
            local,
            admin: self.admin.clone(),
            l7: self.l7.clone(),
            net,
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        super::accept_loop(listener, "plaintext", |stream, peer| {
            let id = next_conn_id();
            let span = info_span!("conn", id, direction = "inbound", src = %peer, dst = tracing::field::Empty);
            self.net
                .unless_gone(self.clone().handle(id, stream, peer))
                .instrument(span)
        })
        .await
    }

    /// One connection: its setup, boxed and freed once done, then the
    /// relay ([`super::Relay`]).
    async fn handle(self: Arc<Self>, id: u64, client: TcpStream, peer: SocketAddr) {
        let Some((mut rec, relay)) = Box::pin(self.setup(id, client, peer)).await else {
            return;
        };
        rec.relaying();
        // Sent and received from the destination workload's point of view.
        let (outcome, (from_peer, to_peer)) = relay.run(&self.l7).await;
        rec.end(outcome, (to_peer, from_peer));
    }

    /// Everything before the relay; `None` when the connection was refused
    /// (its record written, the client's socket reset).
    async fn setup(
        &self,
        id: u64,
        client: TcpStream,
        peer: SocketAddr,
    ) -> Option<(ConnRecord, super::Relay)> {
        let mut rec = ConnRecord::open(self.admin.metrics.clone(), Kind::Plaintext, id);
        rec.src = Some(peer);
        super::arm_reset(&client);
        // sk_lookup keeps the addresses: our local address is the original destination.
        let dst = match client.local_addr() {
            Ok(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
            Err(e) => {
                warn!(error = %e, "accepted socket has no local address");
                return super::refuse(client, rec, Outcome::Error);
            }
        };
        tracing::Span::current().record("dst", tracing::field::display(dst));
        rec.dst = Some(dst);
        let mode = self.modes.get(&dst.port()).copied();
        rec.plaintext_mode = mode.map(|m| match m {
            PlaintextMode::Strict => "strict",
            PlaintextMode::Permissive => "permissive",
        });
        let (dst_svid, dst_selectors) =
            super::local_destination(&self.local, &self.attestor, &self.identity, dst).await;
        rec.set_dst_svid(dst_svid.as_ref());
        if mode != Some(PlaintextMode::Permissive) {
            warn!(%peer, %dst, "plaintext from outside the mesh to a strict port; refused");
            return super::refuse(client, rec, Outcome::PlaintextRefused);
        }
        // Permissive: forwarded only if policy allows an unauthenticated source.
        let route = self.l7.routes.find(
            dst.port(),
            dst_svid.as_ref().map(|s| &s.svid.spiffe_id),
            &dst_selectors,
        );
        let input = crate::policy::Input {
            direction: "inbound",
            source: crate::policy::Peer {
                authenticated: Some(false),
                address: Some(peer.ip().to_canonical().to_string()),
                ..Default::default()
            },
            destination: super::peer(dst_svid.as_deref(), &dst_selectors, Some(dst)),
            protocol: route.as_ref().map_or("tcp", |r| r.protocol.as_str()),
            request: None,
        };
        let verdict = self.policy.decide(&input, id).await;
        rec.decision_ids.push(verdict.decision_id.clone());
        rec.policy_reason = verdict.decision.reason.clone();
        if !verdict.allowed {
            warn!(%peer, %dst, reason = ?verdict.decision.reason, "unauthenticated plaintext denied by policy");
            return super::refuse(client, rec, Outcome::Denied);
        }
        let upstream = match super::connect_within(super::connect_local(&self.net, dst)).await {
            Ok(s) => s,
            Err(error) => {
                warn!(%dst, %error, "connecting to the local workload failed");
                return super::refuse(client, rec, Outcome::ConnectFailed);
            }
        };
        let l7 = route.map(|r| {
            (
                r,
                crate::l7::Conn::of(id, &input, peer, dst).traced(rec.trace_context()),
                super::dial_local(&self.net, dst),
            )
        });
        Some((rec, super::Relay::direct(l7, client, upstream)))
    }
}
