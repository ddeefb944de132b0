//! Micro-benchmarks (criterion): a policy decision with the shipped policy,
//! uncached and from the cache, and the issuance of one X.509-SVID.
//! `cargo xtask bench` runs them and reports mean and p99 per operation.
use std::{path::Path, sync::Arc, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use enforcer::{
    admin::Metrics,
    identity::Ca,
    policy::{Input, Peer, Policy, audit::AuditLog, source},
};

fn input(n: u64) -> Input {
    Input {
        direction: "inbound",
        source: Peer {
            spiffe_id: Some("spiffe://ai.example.org/agent/support".into()),
            trust_domain: Some("ai.example.org".into()),
            authenticated: Some(true),
            address: Some(format!("10.0.{}.{}", (n >> 8) & 255, n & 255)),
            ..Default::default()
        },
        destination: Peer {
            spiffe_id: Some("spiffe://ai.example.org/llm".into()),
            trust_domain: Some("ai.example.org".into()),
            selectors: vec!["systemd:unit:llm.service".into(), "unix:uid:1001".into()],
            address: Some("10.0.0.2".into()),
            port: Some(8000),
            ..Default::default()
        },
        protocol: "tcp",
    }
}

fn policy() -> Policy {
    let src = source::PolicySource::Dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies"));
    let p = Policy::new(
        Default::default(),
        AuditLog::open(Path::new("/dev/null")).expect("/dev/null"),
        Arc::new(Metrics::new("bench")),
    );
    p.install(source::load_local(&src).expect("shipped policy"));
    p
}

fn benches(c: &mut Criterion) {
    let p = policy();
    let hot = input(0);
    assert!(
        p.evaluate(&hot).0.allow,
        "the benchmark input must be allowed"
    );
    c.bench_function("policy_decision_cached", |b| b.iter(|| p.evaluate(&hot)));
    // A new source address every iteration: never in the cache.
    let mut n = 1u64;
    c.bench_function("policy_decision_uncached", |b| {
        b.iter(|| {
            n += 1;
            if n.is_multiple_of(10_000) {
                p.invalidate();
            }
            p.evaluate(&input(n))
        })
    });
    let ca = Ca::generate(&spiffe::TrustDomain::new("ai.example.org").expect("td")).expect("CA");
    let id = spiffe::SpiffeId::new("spiffe://ai.example.org/agent/support").expect("id");
    c.bench_function("svid_issuance", |b| {
        b.iter(|| ca.issue(&id, Duration::from_secs(3600)))
    });
}

criterion_group!(core, benches);
criterion_main!(core);
