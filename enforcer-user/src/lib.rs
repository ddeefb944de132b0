//! enforcer node agent: captures workload connections in the kernel, attests
//! the workloads and proxies their traffic. See `docs/ARCHITECTURE.md`.
pub mod admin;
pub mod agent;
pub mod attest;
pub mod capture;
pub mod config;
pub mod copy;
pub mod drain;
pub mod handover;
pub mod identity;
pub mod inpod;
pub mod k8s;
pub mod l7;
pub mod logsink;
pub mod mark;
pub mod memory;
pub mod metrics;
pub mod netns;
pub mod otel;
pub mod policy;
pub mod proxy;
pub mod record;
pub mod settings;
pub mod timefmt;
pub mod tls;
pub mod tunnel;

/// Entry points for the fuzz targets in `fuzz/` (`cargo xtask fuzz`): each
/// takes arbitrary bytes and must neither panic nor hang.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use std::path::Path;

    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime for the fuzz target");
    }

    /// A config file: parsed, validated, and every derived form built.
    pub fn config(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let path = Path::new("fuzz.toml");
        let Ok(c) = crate::settings::parse(path, text) else {
            return;
        };
        let _ = c.capture_rules(path);
        let _ = c.inbound_ports(path);
        let _ = c.mesh_cidrs(path);
        let _ = c.inbound_addr(path);
        let _ = crate::policy::source::SourceOptions::for_config(&c, path);
        let _ = crate::attest::Entries::parse(&c.identity.entries, "fuzz.example.org");
    }

    /// A cgroup path (container and systemd selectors) and a TLS server
    /// name (the HBONE destination port).
    pub fn selectors(data: &[u8]) {
        let text = String::from_utf8_lossy(data);
        let _ = crate::attest::selectors::container_selectors(&text);
        let _ = crate::attest::selectors::systemd_unit(&text);
        let _ = crate::tunnel::port_from_server_name(&text);
    }

    /// A peer's certificate (DER): its SPIFFE ID and notAfter.
    pub fn certificate(data: &[u8]) {
        let cert = rustls::pki_types::CertificateDer::from(data);
        let _ = crate::tls::spiffe_id_of(&cert);
        let _ = crate::tls::not_after_of(&cert);
    }

    /// Runs `serve` on the server end of an in-memory connection while the
    /// client end sends `parts` in order, half-closes, and reads whatever
    /// comes back until the server closes; at most 5 s.
    pub(crate) async fn exchange<F>(
        parts: &[&[u8]],
        serve: impl FnOnce(tokio::io::DuplexStream) -> F,
    ) where
        F: std::future::Future<Output = ()>,
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let feed = async {
            for p in parts {
                let _ = client.write_all(p).await;
            }
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::join!(serve(server), feed)
        })
        .await;
    }

    /// A client's bytes to an L7 destination (HTTP/1.1 or h2c).
    pub fn http_request(data: &[u8]) {
        RUNTIME.with(|rt| rt.block_on(crate::l7::http::fuzz::request(data)));
    }

    /// An HBONE client's bytes after the TLS handshake.
    pub fn hbone(data: &[u8]) {
        RUNTIME.with(|rt| rt.block_on(crate::proxy::inbound::fuzz::hbone(data)));
    }
}
