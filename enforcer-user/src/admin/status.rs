//! `/status`: what this node's agent is doing now, as one JSON document for
//! people (`enforcer status` prints it as tables) and scripts. Read-only; it
//! holds identities and addresses, not secrets.
use std::time::SystemTime;

use serde_json::{Value, json};

use crate::{
    attest::SeenWorkload,
    identity::HeldSvid,
    metrics::{Direction, OpenKey},
    policy::rfc3339,
};

/// What the document is made of, read when it is asked for.
pub struct Parts<'a> {
    pub node: &'a str,
    pub started: SystemTime,
    pub ready: bool,
    pub workloads: Vec<SeenWorkload>,
    pub svids: Vec<HeldSvid>,
    pub open: Vec<(OpenKey, u64)>,
    pub pooled: Vec<Value>,
    pub policy: Value,
    pub l7_destinations: Value,
    pub llm: Option<Value>,
    /// The pod watch (`[kubernetes]`), null when off.
    pub kubernetes: Option<Value>,
}

/// Seconds from `now` to `t` (negative when past).
fn secs_until(now: SystemTime, t: SystemTime) -> i64 {
    match t.duration_since(now) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// The `/status` document.
pub fn document(p: Parts<'_>) -> Value {
    let now = SystemTime::now();
    let workloads: Vec<Value> = p
        .workloads
        .iter()
        .map(|w| {
            json!({
                "spiffe_id": w.spiffe_id.as_ref().map(ToString::to_string),
                "selectors": w.selectors,
                "pid": w.pid,
                "uid": w.uid,
                "comm": w.comm,
                "cgroup": w.cgroup,
                "attestations": w.attestations,
                "last_attested": rfc3339(w.last_attested),
            })
        })
        .collect();
    let svids: Vec<Value> = p
        .svids
        .iter()
        .map(|s| {
            json!({
                "spiffe_id": s.spiffe_id,
                "expires_at": rfc3339(s.not_after),
                "expires_in_secs": secs_until(now, s.not_after),
                "renew_at": rfc3339(s.renew_at),
                "generation": s.generation,
            })
        })
        .collect();
    let (mut outbound, mut inbound) = (0u64, 0u64);
    let by_identity: Vec<Value> = p
        .open
        .iter()
        .map(|((d, src, dst), n)| {
            match d {
                Direction::outbound => outbound += n,
                Direction::inbound => inbound += n,
            }
            json!({"direction": d.as_str(), "source": src, "destination": dst, "open": n})
        })
        .collect();
    json!({
        "node": p.node,
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": rfc3339(p.started),
        "uptime_secs": now.duration_since(p.started).map_or(0, |d| d.as_secs()),
        "ready": p.ready,
        "workloads": workloads,
        "svids": svids,
        "connections": {
            "relaying": {"outbound": outbound, "inbound": inbound},
            "by_identity": by_identity,
        },
        "hbone_pool": p.pooled,
        "policy": p.policy,
        "l7_destinations": p.l7_destinations,
        "llm": p.llm,
        "kubernetes": p.kubernetes,
    })
}

/// Asks the agent at `addr` for its `/status` (blocking; for the CLI).
pub fn fetch(addr: std::net::SocketAddr) -> Result<Value, String> {
    use std::io::{Read as _, Write as _};
    let timeout = std::time::Duration::from_secs(5);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        format!("cannot connect: {e} (is the agent running, and is this its admin.status_addr?)")
    })?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut raw = Vec::new();
    s.take(64 << 20)
        .read_to_end(&mut raw)
        .map_err(|e| format!("reading the answer: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("the answer is not HTTP")?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!(
            "the agent answered {status} (an agent older than /status?)"
        ));
    }
    serde_json::from_str(body).map_err(|e| format!("the answer is not JSON: {e}"))
}

/// A value as a table cell: strings bare, null as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(" "),
        v => v.to_string(),
    }
}

/// Rows under a header, columns padded to their widest cell.
fn table(out: &mut String, title: &str, header: &[&str], rows: Vec<Vec<String>>) {
    out.push_str(&format!("\n{title}\n"));
    if rows.is_empty() {
        out.push_str("  (none)\n");
        return;
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::from(" ");
        for (c, w) in cells.iter().zip(&widths) {
            l.push_str(&format!(" {c:<w$}"));
        }
        l.trim_end().to_owned() + "\n"
    };
    out.push_str(&line(header.to_vec()));
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
}

/// The `/status` document as tables for a person (`enforcer status`).
pub fn render(doc: &Value) -> String {
    let rows = |key: &str, cols: &[&str]| -> Vec<Vec<String>> {
        let at = key.split('.').fold(doc, |v, k| &v[k]);
        at.as_array()
            .map(|a| {
                a.iter()
                    .map(|r| cols.iter().map(|c| cell(&r[*c])).collect())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = format!(
        "node {}  version {}  up {} s  ready {}\n",
        cell(&doc["node"]),
        cell(&doc["version"]),
        cell(&doc["uptime_secs"]),
        cell(&doc["ready"])
    );
    table(
        &mut out,
        "WORKLOADS (attested lately)",
        &[
            "SPIFFE ID",
            "PID",
            "UID",
            "COMM",
            "SELECTORS",
            "LAST ATTESTED",
        ],
        rows(
            "workloads",
            &[
                "spiffe_id",
                "pid",
                "uid",
                "comm",
                "selectors",
                "last_attested",
            ],
        ),
    );
    table(
        &mut out,
        "SVIDS",
        &["SPIFFE ID", "EXPIRES", "IN (s)", "RENEW AT", "GENERATION"],
        rows(
            "svids",
            &[
                "spiffe_id",
                "expires_at",
                "expires_in_secs",
                "renew_at",
                "generation",
            ],
        ),
    );
    let relaying = &doc["connections"]["relaying"];
    table(
        &mut out,
        &format!(
            "CONNECTIONS RELAYING (outbound {}, inbound {})",
            cell(&relaying["outbound"]),
            cell(&relaying["inbound"])
        ),
        &["DIRECTION", "SOURCE", "DESTINATION", "OPEN"],
        rows(
            "connections.by_identity",
            &["direction", "source", "destination", "open"],
        ),
    );
    table(
        &mut out,
        "HBONE POOL",
        &[
            "SOURCE",
            "PEER",
            "PORT",
            "PEER SPIFFE ID",
            "OPEN STREAMS",
            "STREAMS GIVEN",
        ],
        rows(
            "hbone_pool",
            &[
                "source",
                "peer",
                "port",
                "peer_spiffe_id",
                "open_streams",
                "streams_given",
            ],
        ),
    );
    let policy = &doc["policy"];
    let in_force = &policy["in_force"];
    let rejected = &policy["last_rejected"];
    table(
        &mut out,
        "POLICY",
        &[
            "MODE",
            "DIGEST",
            "BUNDLE",
            "REVISION",
            "ENGINE",
            "INSTALLED",
            "LAST REJECTED",
        ],
        vec![vec![
            cell(&policy["mode"]),
            cell(&in_force["digest"]),
            cell(&in_force["bundle"]),
            cell(&in_force["bundle_revision"]),
            cell(&in_force["engine"]),
            cell(&in_force["installed_at"]),
            if rejected.is_null() {
                "-".into()
            } else {
                format!("{}: {}", cell(&rejected["at"]), cell(&rejected["error"]))
            },
        ]],
    );
    table(
        &mut out,
        "L7 DESTINATIONS",
        &["PROTOCOL", "PORTS", "SPIFFE ID", "SELECTORS"],
        rows(
            "l7_destinations",
            &["protocol", "ports", "spiffe_id", "selectors"],
        ),
    );
    let mut usage = vec![];
    if let Some(sources) = doc["llm"]["sources"].as_object() {
        for (src, window) in sources {
            for (model, u) in window["models"].as_object().into_iter().flatten() {
                usage.push(vec![
                    src.clone(),
                    model.clone(),
                    cell(&u["prompt"]),
                    cell(&u["completion"]),
                    cell(&window["window_secs"]),
                ]);
            }
        }
    }
    table(
        &mut out,
        "LLM TOKENS (this window)",
        &["SOURCE", "MODEL", "PROMPT", "COMPLETION", "WINDOW (s)"],
        usage,
    );
    let k = &doc["kubernetes"];
    if k.is_object() {
        table(
            &mut out,
            "KUBERNETES (pods of this node)",
            &["NODE", "PODS KNOWN", "LISTED", "FAILING SINCE", "ERROR"],
            vec![
                ["node", "pods_known", "listed", "failing_since", "error"]
                    .iter()
                    .map(|c| cell(&k[*c]))
                    .collect(),
            ],
        );
        let served = k["pods_served"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| vec![cell(&p["uid"]), cell(&p["netns_cookie"])])
            .collect();
        table(
            &mut out,
            "PODS SERVED IN THEIR NETWORK NAMESPACE",
            &["POD UID", "NETNS COOKIE"],
            served,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn connections_are_summed_by_direction_and_times_are_relative_to_now() {
        let now = SystemTime::now();
        let doc = document(Parts {
            node: "n1",
            started: now - Duration::from_secs(30),
            ready: true,
            workloads: vec![],
            svids: vec![HeldSvid {
                spiffe_id: "spiffe://td/a".into(),
                renew_at: now + Duration::from_secs(1800),
                not_after: now + Duration::from_secs(3600),
                generation: 3,
            }],
            open: vec![
                (
                    (
                        Direction::outbound,
                        Some("spiffe://td/a".into()),
                        Some("spiffe://td/b".into()),
                    ),
                    2,
                ),
                ((Direction::outbound, Some("spiffe://td/a".into()), None), 1),
                ((Direction::inbound, None, Some("spiffe://td/a".into())), 4),
            ],
            pooled: vec![],
            policy: Value::Null,
            l7_destinations: json!([]),
            llm: None,
            kubernetes: None,
        });
        assert_eq!(
            doc["connections"]["relaying"],
            json!({"outbound": 3, "inbound": 4})
        );
        assert_eq!(
            doc["connections"]["by_identity"][1]["destination"],
            Value::Null
        );
        let left = doc["svids"][0]["expires_in_secs"].as_i64().unwrap_or(0);
        assert!((3590..=3600).contains(&left), "{left}");
        assert!(doc["uptime_secs"].as_u64().unwrap_or(0) >= 30);
        let text = render(&doc);
        assert!(
            text.contains("CONNECTIONS RELAYING (outbound 3, inbound 4)"),
            "{text}"
        );
        assert!(
            text.lines().any(|l| l.contains("outbound")
                && l.contains("spiffe://td/a")
                && l.contains("spiffe://td/b")
                && l.trim_end().ends_with('2')),
            "{text}"
        );
        assert!(text.contains("L7 DESTINATIONS\n  (none)"), "{text}");
    }
}
