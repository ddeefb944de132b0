//! Shipping decision logs to an OPA-compatible decision-log service
//! (`[policy.decision_logs]`): events are buffered (bounded), batched, and
//! POSTed to `<service>/logs` as a gzip'd JSON array, as OPA's decision-log
//! plugin does; a failed upload is retried with exponential backoff (100 ms
//! doubling to 30 s) while new events wait in the buffer. When the buffer is
//! full, new events are dropped: counted (`enforcer_decision_logs_total
//! {result="dropped"}`) and logged, at most once a second. The audit log
//! file keeps every event either way.
use std::{
    io::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use tokio::sync::mpsc;

use super::source;
use crate::config::DecisionLogsConfig;

const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Where the audit log hands events to the shipper; never blocks.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<String>,
    metrics: Arc<crate::metrics::Metrics>,
    /// When a drop was last logged (ms since `epoch`).
    last_warned: Arc<AtomicU64>,
    epoch: Instant,
}

impl Handle {
    /// Queues one event; when the buffer is full, drops it (counted).
    pub fn push(&self, event: &str) {
        if self.tx.try_send(event.to_owned()).is_err() {
            self.metrics.decision_logs("dropped", 1);
            let now = self.epoch.elapsed().as_millis() as u64;
            let last = self.last_warned.load(Ordering::Relaxed);
            if (last == 0 || now.saturating_sub(last) >= 1000)
                && self
                    .last_warned
                    .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    "the decision-log buffer is full (the service is slow or down): dropping events; \
                     they stay in the audit log, and enforcer_decision_logs_total{{result=\"dropped\"}} counts them"
                );
            }
        }
    }
}

/// Starts the shipper: the handle for the audit log, and the task to spawn.
pub fn start(
    settings: &DecisionLogsConfig,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<(Handle, impl std::future::Future<Output = ()> + use<>), String> {
    let roots = settings
        .ca_cert
        .as_deref()
        .map(source::ca_roots)
        .transpose()?;
    let client = source::https_client::<Full<Bytes>>(roots)?;
    let url: http::Uri = format!("{}/logs", settings.service.trim_end_matches('/'))
        .parse()
        .map_err(|e| format!("{}: {e}", settings.service))?;
    let (tx, rx) = mpsc::channel(settings.buffer_events as usize);
    let handle = Handle {
        tx,
        metrics: metrics.clone(),
        last_warned: Arc::new(AtomicU64::new(0)),
        epoch: Instant::now(),
    };
    Ok((handle, run(rx, client, url, settings.clone(), metrics)))
}

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<crate::mark::MarkedConnector>,
    Full<Bytes>,
>;

async fn run(
    mut rx: mpsc::Receiver<String>,
    client: Client,
    url: http::Uri,
    s: DecisionLogsConfig,
    metrics: Arc<crate::metrics::Metrics>,
) {
    while let Some(first) = rx.recv().await {
        // A batch: what arrives within the upload interval, up to the most
        // events a batch holds.
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(s.upload_interval_ms);
        while (batch.len() as u64) < s.max_batch_events {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => batch.push(ev),
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let body = match gzip_array(&batch) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, events = batch.len(), "cannot compress a decision-log batch; dropping it");
                metrics.decision_logs("dropped", batch.len() as u64);
                continue;
            }
        };
        let mut backoff = FIRST_BACKOFF;
        loop {
            match upload(&client, &url, &s, body.clone()).await {
                Ok(()) => {
                    metrics.decision_log_upload("ok");
                    metrics.decision_logs("shipped", batch.len() as u64);
                    break;
                }
                Err(e) => {
                    metrics.decision_log_upload("failed");
                    tracing::warn!(url = %url, error = %e, events = batch.len(), retry_in_ms = backoff.as_millis() as u64,
                        "uploading decision logs failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// `[e1,e2,…]`, gzip'd.
fn gzip_array(events: &[String]) -> std::io::Result<Bytes> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"[")?;
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            gz.write_all(b",")?;
        }
        gz.write_all(e.as_bytes())?;
    }
    gz.write_all(b"]")?;
    Ok(Bytes::from(gz.finish()?))
}

async fn upload(
    client: &Client,
    url: &http::Uri,
    s: &DecisionLogsConfig,
    body: Bytes,
) -> Result<(), String> {
    let mut req = http::Request::post(url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_ENCODING, "gzip");
    if let Some(path) = &s.bearer_token_file {
        req = req.header(http::header::AUTHORIZATION, source::bearer(path).await?);
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| source::chain(&e))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", resp.status()))
    }
}
