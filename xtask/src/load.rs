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
                    let one = async {
                        let mut s = tokio::net::TcpStream::connect(addr).await?;
                        s.set_nodelay(true)?;
                        s.write_all(b"ping\n").await?;
                        let mut buf = [0u8; 5];
                        s.read_exact(&mut buf).await?;
                        std::io::Result::Ok(())
                    };
                    match tokio::time::timeout(Duration::from_secs(5), one).await {
                        Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
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

/// Opens `count` connections (each checked with one echo), prints
/// `HELD <n>`, keeps them open for `secs` seconds, then exits.
pub fn hold(addr: SocketAddr, count: usize, secs: u64) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut held = Vec::with_capacity(count);
        let deadline = Instant::now() + Duration::from_secs(60);
        while held.len() < count && Instant::now() < deadline {
            let batch: Vec<_> = (0..(count - held.len()).min(256))
                .map(|_| {
                    tokio::spawn(async move {
                        let mut s = tokio::net::TcpStream::connect(addr).await?;
                        s.write_all(b"ping\n").await?;
                        let mut buf = [0u8; 5];
                        s.read_exact(&mut buf).await?;
                        std::io::Result::Ok(s)
                    })
                })
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
