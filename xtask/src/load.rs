//! Small load tools the benchmark runs inside the testbed's nodes (so the
//! load generator is native code, never the bottleneck): an echo server, an
//! HTTP/1.1 server, a new-connections-per-second generator, and an
//! idle-connection holder. Every
//! loop is bounded in time and count and stops by itself.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Echo server on `[::]:port` (both families). Runs until killed.
pub fn echo(port: u16) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let l = tokio::net::TcpListener::bind(SocketAddr::from(([0u16; 8], port))).await?;
        println!("ECHO listening on {port}");
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// HTTP/1.1 server (hyper, keep-alive) on `[::]:port`: every request is
/// answered 200 with `ok\n`. Runs until killed.
pub fn http(port: u16) -> anyhow::Result<()> {
    use http_body_util::Full;
    use hyper::{Request, Response, body::Incoming};
    runtime()?.block_on(async move {
        let l = tokio::net::TcpListener::bind(SocketAddr::from(([0u16; 8], port))).await?;
        println!("HTTP listening on {port}");
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                        bytes::Bytes::from_static(b"ok\n"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service)
                    .await;
            });
        }
    })
}

/// For `secs` seconds, `workers` tasks each loop: connect, send 5 bytes,
/// read them back, close. Prints `{"connections":N,"errors":E,"secs":S}`.
pub fn connect_rate(addr: SocketAddr, secs: u64, workers: usize) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let ok = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (ok, errors) = (ok.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    match tokio::time::timeout(Duration::from_secs(5), echoed(addr)).await {
                        Ok(Ok(_)) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        println!(
            "{{\"connections\":{},\"errors\":{},\"secs\":{:.3}}}",
            ok.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
            start.elapsed().as_secs_f64()
        );
        anyhow::Ok(())
    })
}

/// Connection setup latency: `count` new connections to the echo server
/// at `addr`, one after another, each timed from `connect()` to the first
/// byte of the answer to its first request (5 bytes). Prints p50 and p99
/// (µs) as JSON. Sequential, so each figure is one connection's own
/// setup, not a queue behind others.
pub fn setup(addr: SocketAddr, count: usize) -> anyhow::Result<()> {
    let mut us = Vec::with_capacity(count);
    let mut errors = 0u64;
    for _ in 0..count {
        let t = Instant::now();
        match first_byte(addr) {
            Ok(()) => us.push(t.elapsed().as_secs_f64() * 1e6),
            Err(_) => errors += 1,
        }
    }
    us.sort_by(f64::total_cmp);
    let at = |q: f64| {
        us.get(((us.len() as f64 * q) as usize).min(us.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "{{\"connections\":{},\"errors\":{errors},\"p50_us\":{:.1},\"p99_us\":{:.1}}}",
        us.len(),
        at(0.50),
        at(0.99)
    );
    Ok(())
}

/// One connection: connect, one 5-byte request, the answer's first byte.
fn first_byte(addr: SocketAddr) -> std::io::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"ping\n")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
}

/// A new connection to the echo server at `addr`, checked with one 5-byte
/// exchange.
async fn echoed(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"ping\n").await?;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await?;
    Ok(s)
}

/// Opens `count` connections (each checked with one echo), prints
/// `HELD <n>`, keeps them open for `secs` seconds, then exits.
pub fn hold(addr: SocketAddr, count: usize, secs: u64) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut held = Vec::with_capacity(count);
        let deadline = Instant::now() + Duration::from_secs(60);
        while held.len() < count && Instant::now() < deadline {
            let batch: Vec<_> = (0..(count - held.len()).min(256))
                .map(|_| tokio::spawn(echoed(addr)))
                .collect();
            for t in batch {
                if let Ok(Ok(s)) = t.await {
                    held.push(s);
                }
            }
        }
        println!("HELD {}", held.len());
        tokio::time::sleep(Duration::from_secs(secs)).await;
        drop(held);
        anyhow::Ok(())
    })
}

/// The CLOCK_MONOTONIC time in ns (the clock of every network namespace on
/// the host, and of Python's `time.monotonic_ns`).
fn monotonic_ns() -> anyhow::Result<i128> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
}

/// `requests` streamed chat completions ("count to `words`"), one after the
/// other on one keep-alive connection to `addr`, from the OpenAI-compatible
/// stand-in started with `--stamp` (each chunk carries `x_sent_ns`, the
/// server's CLOCK_MONOTONIC when it produced it). Prints
/// `{"ttft_us": [...], "chunk_us": [...]}`: per request, the time from
/// sending it to the first content chunk; per chunk, from the server's stamp
/// to its arrival here.
pub fn sse(addr: SocketAddr, requests: usize, words: usize) -> anyhow::Result<()> {
    use futures_util::StreamExt as _;
    use http_body_util::Full;
    runtime()?.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let body = serde_json::json!({
            "model": "gpt-4o-mini", "stream": true,
            "messages": [{"role": "user", "content": format!("count to {words}")}],
        })
        .to_string();
        let (mut ttft, mut chunk) = (Vec::new(), Vec::new());
        for _ in 0..requests {
            let req = hyper::Request::post("/v1/chat/completions")
                .header("host", addr.to_string())
                .header("content-type", "application/json")
                .body(Full::new(bytes::Bytes::from(body.clone())))?;
            send.ready().await?;
            let sent = monotonic_ns()?;
            let resp = send.send_request(req).await?;
            anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
            let mut events = sse_stream::SseStream::new(resp.into_body());
            let mut first = true;
            while let Some(event) = events.next().await {
                let now = monotonic_ns()?;
                let Some(data) = event?.data else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&data) else {
                    continue; // [DONE]
                };
                let Some(stamp) = v.get("x_sent_ns").and_then(serde_json::Value::as_i64) else {
                    continue;
                };
                if first {
                    ttft.push((now - sent) as f64 / 1000.0);
                    first = false;
                }
                chunk.push((now - stamp as i128) as f64 / 1000.0);
            }
            anyhow::ensure!(!first, "the answer had no stamped chunk");
        }
        println!(
            "{}",
            serde_json::json!({"ttft_us": ttft, "chunk_us": chunk})
        );
        Ok(())
    })
}

/// New connections at `per_sec` (one started every 1/per_sec s, each an
/// echo exchange then closed) for `secs` seconds; prints one JSON line:
/// connections, errors, and the connections completed in each 10 s.
pub fn paced(addr: SocketAddr, secs: u64, per_sec: u64) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let ok = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / per_sec.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buckets = Vec::new();
        let mut next_bucket = start + Duration::from_secs(10);
        let mut at_bucket = 0;
        let in_flight = Arc::new(tokio::sync::Semaphore::new(4096));
        while start.elapsed() < Duration::from_secs(secs) {
            tick.tick().await;
            if Instant::now() >= next_bucket {
                let done = ok.load(Ordering::Relaxed);
                buckets.push(done - at_bucket);
                at_bucket = done;
                next_bucket += Duration::from_secs(10);
            }
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                // 4 096 connections outstanding: the path is stalled.
                errors.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (ok, errors) = (ok.clone(), errors.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(5), echoed(addr)).await {
                    Ok(Ok(_)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => errors.fetch_add(1, Ordering::Relaxed),
                };
                drop(permit);
            });
        }
        // Whatever is still in flight gets its 5 s.
        let _ = tokio::time::timeout(Duration::from_secs(6), in_flight.acquire_many(4096)).await;
        println!(
            "{{\"connections\":{},\"errors\":{},\"secs\":{:.3},\"per_10s\":{:?}}}",
            ok.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
            start.elapsed().as_secs_f64(),
            buckets
        );
        anyhow::Ok(())
    })
}
