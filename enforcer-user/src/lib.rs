//! enforcer node agent: captures workload connections in the kernel, attests
//! the workloads and proxies their traffic. See `docs/ARCHITECTURE.md`.
pub mod admin;
pub mod agent;
pub mod attest;
pub mod capture;
pub mod chores;
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
    /// client end sends `parts` in order, lets the server handle them,
    /// half-closes, and reads whatever comes back until the server closes;
    /// at most 5 s. Returns what the client read.
    pub(crate) async fn exchange<F>(
        parts: &[&[u8]],
        serve: impl FnOnce(tokio::io::DuplexStream) -> F,
    ) -> Vec<u8>
    where
        F: std::future::Future<Output = ()>,
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut sink = Vec::new();
        let feed = async {
            for p in parts {
                let _ = client.write_all(p).await;
            }
            // The server gets to handle what it read before it sees the
            // end: hyper and h2 drop the requests in hand at a client's
            // close. Both run in this task (`join!`), so each yield lets
            // it go on; its work here is in memory.
            for _ in 0..256 {
                tokio::task::yield_now().await;
            }
            let _ = client.shutdown().await;
            let _ = client.read_to_end(&mut sink).await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::join!(serve(server), feed)
        })
        .await;
        sink
    }

    /// A client's bytes to an L7 destination (HTTP/1.1 or h2c).
    pub fn http_request(data: &[u8]) {
        let _ = RUNTIME.with(|rt| rt.block_on(crate::l7::http::fuzz::request(data)));
    }

    /// A server's answer to an `llm`, `mcp` or `vectordb` request (the
    /// first byte picks the request).
    pub fn l7_answer(data: &[u8]) {
        RUNTIME.with(|rt| rt.block_on(crate::l7::http::fuzz::answer(data)));
    }

    /// A streamed LLM chunk: the raw reader that meters it against the
    /// JSON tree it replaced (they must read the same texts and usage, and
    /// the chunk less `usage` must be the tree less `usage`).
    pub fn llm_chunk(data: &[u8]) {
        if let Ok(text) = std::str::from_utf8(data) {
            crate::l7::chunk::fuzz::differential(text);
        }
    }

    /// An HBONE client's bytes after the TLS handshake.
    pub fn hbone(data: &[u8]) {
        let _ = RUNTIME.with(|rt| rt.block_on(crate::proxy::inbound::fuzz::hbone(data)));
    }

    /// Each harness reaches the code it fuzzes with a seed: a harness that
    /// stops short (a client that closes before the server read its
    /// request) fuzzes nothing. `cargo xtask test` runs these.
    #[cfg(test)]
    mod tests {
        fn seed(target: &str, name: &str) -> Vec<u8> {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/corpus")
                .join(target)
                .join(name);
            std::fs::read(&path).unwrap_or_else(|e| {
                panic!("{}: {e} (python3 fuzz/seeds.py writes it)", path.display())
            })
        }

        #[tokio::test]
        async fn the_request_harness_reaches_the_service() {
            let out = crate::l7::http::fuzz::request(&seed("http_request", "chat")).await;
            assert!(
                out.starts_with(b"HTTP/1.1 200"),
                "the service never answered: {}",
                String::from_utf8_lossy(&out)
            );
        }

        #[test]
        fn the_chunk_harness_compares_the_seeds() {
            // Each seed is an object both readers read (the harness returns
            // early on anything else, and would compare nothing).
            for name in ["chat", "usage", "tools"] {
                let data = seed("llm_chunk", name);
                let text = std::str::from_utf8(&data).expect("UTF-8");
                assert!(
                    matches!(serde_json::from_str(text), Ok(serde_json::Value::Object(_))),
                    "llm_chunk/{name} is not a JSON object"
                );
                super::llm_chunk(&data);
            }
        }

        #[tokio::test]
        async fn the_hbone_harness_reaches_the_streams() {
            let out = crate::proxy::inbound::fuzz::hbone(&seed("hbone", "connects")).await;
            // The server's HTTP/2 frames: (type, stream) of each.
            let mut frames = Vec::new();
            let mut rest = &out[..];
            while rest.len() >= 9 {
                let len =
                    usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
                let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
                frames.push((rest[3], stream));
                rest = rest.get(9 + len..).unwrap_or_default();
            }
            // HEADERS (type 1) answer the CONNECT of stream 3 and refuse
            // the GET of stream 5.
            for stream in [3, 5] {
                assert!(
                    frames.contains(&(1, stream)),
                    "stream {stream} was not answered: {frames:?}"
                );
            }
        }
    }
}
