//! `cargo xtask bench` (DESIGN §7): on the two-node testbed, side by side in
//! one run — direct plaintext, through enforcer (mutual TLS across nodes,
//! policy on), and stunnel4 with mutual TLS as the peer to beat. Writes
//! `bench/results/<date>.json` and prints a Markdown table with each figure's
//! ratio to direct and to stunnel. Bounded: every step has a fixed duration.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use enforcer_tests::{Enforcer, Node, Testbed, sum_metric};
use serde_json::{Value, json};

const TD: &str = "bench.local";
const IPERF: u16 = 5201;
const SOCKPERF: u16 = 11111;
const ECHO: u16 = 7000;
/// stunnel server ports on b (TLS) and client ports on a (plain, loopback).
const TLS_OFFSET: u16 = 1;
const CLIENT_OFFSET: u16 = 10000;
const SECS: u64 = 4;
/// Rounds per figure (the median is reported).
const ROUNDS: usize = 3;
const HOLD: usize = 10_000;
/// The HTTP server on b, twice: at L4, and declared `protocol = "http"` in
/// b's `[[l7.destinations]]` (each request decided by b's agent).
const HTTP_L4: u16 = 8080;
const HTTP_L7: u16 = 8081;
/// wrk's connections for the request-rate figure (keep-alive).
const HTTP_CONNS: u32 = 16;
/// The OpenAI-compatible stand-in on b, twice: at L4, and declared
/// `protocol = "llm"` (each request decided, its stream metered by b's
/// agent). It streams one word every SSE_CHUNK_MS; SSE_REQUESTS answers of
/// SSE_WORDS words per path and round.
const LLM_L4: u16 = 8090;
const LLM_L7: u16 = 8091;
const SSE_CHUNK_MS: u32 = 5;
const SSE_REQUESTS: usize = 20;
const SSE_WORDS: usize = 40;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path_ {
    Direct,
    Enforcer,
    Stunnel,
}

impl Path_ {
    fn name(self) -> &'static str {
        match self {
            Path_::Direct => "direct",
            Path_::Enforcer => "enforcer",
            Path_::Stunnel => "stunnel",
        }
    }
}

struct Bench {
    tb: Testbed,
    a: Node,
    b: Node,
    exe: PathBuf,
}

impl Bench {
    /// (cgroup unit, host, port) a client on node a uses for `path` to reach `port` on b.
    fn target(&self, path: Path_, port: u16) -> (Option<&'static str>, String, u16) {
        match path {
            Path_::Direct => (None, self.b.ipv4.clone(), port),
            Path_::Enforcer => (Some("bench-client.service"), self.b.ipv4.clone(), port),
            Path_::Stunnel => (None, "127.0.0.1".into(), port + CLIENT_OFFSET),
        }
    }

    fn run(&self, unit: Option<&str>, cmd: &[&str]) -> anyhow::Result<String> {
        let (_, out) = self.a.exec(unit, cmd)?;
        if !out.status.success() {
            bail!(
                "{cmd:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// iperf3 throughput in Gbit/s.
    fn iperf(&self, path: Path_, streams: u32) -> anyhow::Result<f64> {
        let (unit, host, port) = self.target(path, IPERF);
        let args = [
            "iperf3",
            "-c",
            &host,
            "-p",
            &port.to_string(),
            "-t",
            &SECS.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ];
        // Twice on 2026-11-25 the next client found b's iperf3 server not
        // listening ("Connection refused") right after a run through a
        // relay. Most likely the server was still tearing that test down:
        // it logs "Server listening on … (test #N)" anew for each test, and
        // while a test runs it answers "busy", not a refusal. Retried for
        // up to 5 s, each retry said.
        let mut out = self.run(unit, &args)?;
        for _ in 0..50 {
            if !out.contains("unable to connect to server: Connection refused") {
                break;
            }
            eprintln!("  iperf3: the server was not listening yet; retrying in 100 ms");
            std::thread::sleep(std::time::Duration::from_millis(100));
            out = self.run(unit, &args)?;
        }
        let v: Value = serde_json::from_str(&out).context("iperf3 JSON")?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e9)
            .with_context(|| format!("no throughput in iperf3 output: {out}"))
    }

    /// sockperf ping-pong round-trip latency (p50, p99) in microseconds.
    fn sockperf(&self, path: Path_) -> anyhow::Result<(f64, f64)> {
        let (unit, host, port) = self.target(path, SOCKPERF);
        let out = self.run(
            unit,
            &[
                "sockperf",
                "ping-pong",
                "--tcp",
                "-i",
                &host,
                "-p",
                &port.to_string(),
                "-t",
                &SECS.to_string(),
            ],
        )?;
        let pct = |p: &str| -> anyhow::Result<f64> {
            out.lines()
                .find(|l| l.contains(&format!("percentile {p} =")))
                .and_then(|l| l.rsplit('=').next())
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no p{p} in sockperf output: {out}"))
        };
        Ok((pct("50.000")?, pct("99.000")?))
    }

    /// wrk (keep-alive, one thread) against `port` on b for SECS:
    /// (requests/s, p50 µs, p99 µs).
    fn wrk(&self, unit: Option<&str>, port: u16, conns: u32) -> anyhow::Result<(f64, f64, f64)> {
        let out = self.run(
            unit,
            &[
                "wrk",
                "-t1",
                &format!("-c{conns}"),
                &format!("-d{SECS}s"),
                "--latency",
                &format!("http://{}:{port}/", self.b.ipv4),
            ],
        )?;
        parse_wrk(&out)
    }

    /// Streamed chat completions from the stand-in at `port` on b: (time to
    /// first token per request, latency per chunk), µs.
    fn sse(&self, unit: Option<&str>, port: u16) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let exe = self.exe.display().to_string();
        let out = self.run(
            unit,
            &[
                &exe,
                "bench-sse",
                &format!("{}:{port}", self.b.ipv4),
                &SSE_REQUESTS.to_string(),
                &SSE_WORDS.to_string(),
            ],
        )?;
        let v: Value = serde_json::from_str(out.trim()).context("bench-sse JSON")?;
        let list = |k: &str| -> Vec<f64> {
            v[k].as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_f64)
                .collect()
        };
        Ok((list("ttft_us"), list("chunk_us")))
    }

    /// New connections per second (connect, one request/response, close)
    /// over `secs` seconds, and the connections that failed.
    fn connect_rate(&self, path: Path_, secs: u64) -> anyhow::Result<(f64, u64)> {
        let (unit, host, port) = self.target(path, ECHO);
        let exe = self.exe.display().to_string();
        let out = self.run(
            unit,
            &[
                &exe,
                "bench-load",
                &format!("{host}:{port}"),
                &secs.to_string(),
                "32",
            ],
        )?;
        let v: Value = serde_json::from_str(out.trim()).context("bench-load JSON")?;
        let n = v["connections"].as_f64().unwrap_or(0.0);
        let secs = v["secs"].as_f64().unwrap_or(1.0);
        Ok((n / secs, v["errors"].as_u64().unwrap_or(0)))
    }

    /// Connection setup latency p50 and p99 (µs): SETUP_CONNECTIONS new
    /// connections one after another, each from `connect()` to the first
    /// byte of its first answer. Any failed connection fails the figure.
    fn setup_latency(&self, path: Path_) -> anyhow::Result<(f64, f64)> {
        let (unit, host, port) = self.target(path, ECHO);
        let exe = self.exe.display().to_string();
        let out = self.run(
            unit,
            &[
                &exe,
                "bench-setup",
                &format!("{host}:{port}"),
                &SETUP_CONNECTIONS.to_string(),
            ],
        )?;
        let v: Value = serde_json::from_str(out.trim()).context("bench-setup JSON")?;
        if v["errors"].as_u64() != Some(0) {
            bail!("bench-setup: connections failed: {out}");
        }
        let f = |k: &str| v[k].as_f64().with_context(|| format!("no {k}: {out}"));
        Ok((f("p50_us")?, f("p99_us")?))
    }
}

/// Connections timed by `bench-setup` on each path, per round.
const SETUP_CONNECTIONS: usize = 1000;

/// The bench's policy: the two identities. It reads nothing else, so every
/// decision after the first is cached. With
/// `ENFORCER_BENCH_UNCACHED_REQUESTS=1` its request rule also reads the
/// request's id, so every L7 request is evaluated (what an MCP call with
/// new arguments costs); connections are still cached.
fn bench_policy() -> String {
    let identities = "identities if {\n\tinput.source.spiffe_id == \"spiffe://bench.local/client\"\n\tinput.destination.spiffe_id == \"spiffe://bench.local/server\"\n}\n";
    let allow = if std::env::var_os("ENFORCER_BENCH_UNCACHED_REQUESTS").is_some_and(|v| v == "1") {
        "allow if {\n\tidentities\n\tnot input.attributes\n}\nallow if {\n\tidentities\n\tinput.attributes.request.http.id != \"\"\n}\n"
    } else {
        "allow if identities\n"
    };
    format!("package enforcer.authz\nimport rego.v1\ndefault allow := false\n{identities}{allow}")
}

/// wrk's requests/s and latency p50/p99 (µs); non-2xx answers or socket
/// errors fail the measurement.
fn parse_wrk(out: &str) -> anyhow::Result<(f64, f64, f64)> {
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        bail!("wrk saw errors: {out}");
    }
    let us = |v: &str| -> Option<f64> {
        let v = v.trim();
        let (n, scale) = if let Some(n) = v.strip_suffix("us") {
            (n, 1.0)
        } else if let Some(n) = v.strip_suffix("ms") {
            (n, 1e3)
        } else if let Some(n) = v.strip_suffix('s') {
            (n, 1e6)
        } else {
            return None;
        };
        n.parse::<f64>().ok().map(|n| n * scale)
    };
    let pct = |p: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .and_then(us)
            .with_context(|| format!("no {p} latency in wrk output: {out}"))
    };
    let rate = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output: {out}"))?;
    Ok((rate, pct("50%")?, pct("99%")?))
}

/// Waits until the agents, started moments ago, are idle as they stay:
/// each drops its start-up code pages from its RSS 3 s after it is ready
/// (`memory::STARTUP_SETTLE_TICKS`), so an idle figure read before that
/// would count them.
fn idle_settle() {
    std::thread::sleep(Duration::from_secs(6));
}

fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    status_kb(pid, "VmRSS")
}

/// A `kB` figure of `/proc/<pid>/status` (`VmRSS`, `RssAnon`, `RssFile`).
fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} for pid {pid}"))
}

fn openssl(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .context("openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A CA and two P-256 certificates for stunnel's mutual TLS.
fn stunnel_pki(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let p = |f: &str| dir.join(f).display().to_string();
    let p256_key = |out: &str| {
        openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            out,
        ])
    };
    p256_key(&p("ca.key"))?;
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &p("ca.key"),
        "-subj",
        "/CN=bench-ca",
        "-days",
        "1",
        "-out",
        &p("ca.pem"),
    ])?;
    for who in ["server", "client"] {
        p256_key(&p(&format!("{who}.key")))?;
        openssl(&[
            "req",
            "-new",
            "-key",
            &p(&format!("{who}.key")),
            "-subj",
            &format!("/CN={who}"),
            "-out",
            &p(&format!("{who}.csr")),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(&format!("{who}.csr")),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &p(&format!("{who}.pem")),
        ])?;
    }
    Ok(())
}

fn stunnel_conf(dir: &Path, who: &str, client: bool, peer: &str) -> anyhow::Result<PathBuf> {
    let p = |f: &str| dir.join(f).display().to_string();
    let mut conf = format!(
        "foreground = yes\npid =\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\ncert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n",
        p(&format!("{who}.pem")),
        p(&format!("{who}.key")),
        p("ca.pem")
    );
    if client {
        conf.push_str("client = yes\n");
    }
    for (name, port) in [("iperf", IPERF), ("sockperf", SOCKPERF), ("echo", ECHO)] {
        if client {
            let _ = write!(
                conf,
                "[{name}]\naccept = 127.0.0.1:{}\nconnect = {peer}:{}\n",
                port + CLIENT_OFFSET,
                port + TLS_OFFSET
            );
        } else {
            let _ = write!(
                conf,
                "[{name}]\naccept = 0.0.0.0:{}\nconnect = 127.0.0.1:{port}\n",
                port + TLS_OFFSET
            );
        }
    }
    let path = dir.join(format!("{who}.conf"));
    std::fs::write(&path, conf)?;
    Ok(path)
}

fn raise_nofile() {
    let _ = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        1 << 17,
        1 << 17,
    );
}

/// What a bench run measures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every figure of the table (DESIGN §7).
    Full,
    Profile,
    LlmOnly,
    Sustained,
    Memory,
    Stall,
    Traces,
    Soak {
        secs: u64,
        rate: u64,
    },
}

pub fn run(mode: Mode) -> anyhow::Result<()> {
    let started = Instant::now();
    raise_nofile();
    let root = std::env::current_dir()?;
    // ENFORCER_BENCH_BIN: measure that build instead (A/B of two builds in
    // the same machine state); otherwise build and measure this tree.
    let bin = match std::env::var_os("ENFORCER_BENCH_BIN") {
        Some(b) => PathBuf::from(b),
        None => {
            crate::cargo(&["build", "--release", "--package", "enforcer-user"])?;
            root.join("target/release/enforcer")
        }
    };
    // SAFETY: single-threaded here; the testbed reads it when spawning.
    unsafe { std::env::set_var("ENFORCER_BIN", &bin) };
    let exe = std::env::current_exe().context("xtask binary")?;

    let mut tb = Testbed::new("bench")?;
    let a = tb.node("a", 1)?;
    let b = tb.node("b", 2)?;
    tb.link(&a, &b)?;
    // Without these the direct path's new-connection figure measures TIME_WAIT
    // port exhaustion inside the namespaces (~1 000/s instead of ~12 000/s).
    for node in [&a, &b] {
        let (_, out) = node.exec(
            None,
            &[
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse && echo 1024 65535 > /proc/sys/net/ipv4/ip_local_port_range",
            ],
        )?;
        if !out.status.success() {
            bail!("setting the port sysctls in {}: {out:?}", node.name);
        }
    }
    let ca = tb.shared_ca("bench", TD)?;
    let policy = tb.dir.join("bench-policy");
    std::fs::create_dir_all(&policy)?;
    std::fs::write(policy.join("authz.rego"), bench_policy())?;
    // Two nodes share this machine's cores: each agent gets its node's share
    // (one thread on 2 cores) instead of one thread per core each, which
    // oversubscribes the CPUs (bench/README.md step 6).
    let mesh = format!(
        "[mesh]\ncidrs = [\"10.10.0.0/24\"]\n[runtime]\nworker_threads = {}\n",
        std::env::var("ENFORCER_BENCH_WORKERS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or_else(
                || (std::thread::available_parallelism().map_or(2, |n| n.get()) / 2).max(1)
            )
    );
    let entry = |id: &str, unit: &str| {
        format!(
            "[[identity.entries]]\nspiffe_id = \"spiffe://{TD}/{id}\"\nselectors = [\"systemd:unit:{unit}\"]\n"
        )
    };
    let cfg_b = tb.enforcer_config_with(
        &b,
        "",
        &ca,
        &format!(
            "{}\n{}{mesh}\n[[l7.destinations]]\nports = [{HTTP_L7}]\nprotocol = \"http\"\n\n[[l7.destinations]]\nports = [{LLM_L7}]\nprotocol = \"llm\"\n",
            tb.policy_section(&b, &policy.display().to_string()),
            entry("server", "bench-server.service")
        ),
    )?;
    let eb = tb.start_enforcer(&b, &cfg_b)?;
    let cfg_a = tb.enforcer_config_with(
        &a,
        "",
        &ca,
        &format!(
            "{}\n{}{mesh}",
            tb.policy_section(&a, &policy.display().to_string()),
            entry("client", "bench-client.service")
        ),
    )?;
    let ea = tb.start_enforcer(&a, &cfg_a)?;

    let srv = Some("bench-server.service");
    tb.start_server_in(
        &b,
        srv,
        "iperf3",
        &["iperf3", "-s", "-p", &IPERF.to_string()],
        IPERF,
    )?;
    tb.start_server_in(
        &b,
        srv,
        "sockperf",
        &["sockperf", "server", "--tcp", "-p", &SOCKPERF.to_string()],
        SOCKPERF,
    )?;
    let exe_s = exe.display().to_string();
    tb.start_server_in(
        &b,
        srv,
        "echo",
        &[&exe_s, "bench-echo", &ECHO.to_string()],
        ECHO,
    )?;

    for (name, port) in [("http-l4", HTTP_L4), ("http-l7", HTTP_L7)] {
        tb.start_server_in(
            &b,
            srv,
            name,
            &[&exe_s, "bench-http", &port.to_string()],
            port,
        )?;
    }

    let stand_in = format!(
        "{}/../tests/scenario/llm_server.py",
        env!("CARGO_MANIFEST_DIR")
    );
    for (name, port) in [("llm-l4", LLM_L4), ("llm-l7", LLM_L7)] {
        tb.start_server_in(
            &b,
            srv,
            name,
            &[
                "python3",
                &stand_in,
                &port.to_string(),
                "--chunk-ms",
                &SSE_CHUNK_MS.to_string(),
                "--stamp",
            ],
            port,
        )?;
    }

    let pki = tb.dir.join("stunnel");
    stunnel_pki(&pki)?;
    let sconf = stunnel_conf(&pki, "server", false, "")?
        .display()
        .to_string();
    tb.start_server(
        &b,
        "stunnel-server",
        &["stunnel4", &sconf],
        ECHO + TLS_OFFSET,
    )?;
    let cconf = stunnel_conf(&pki, "client", true, &b.ipv4)?
        .display()
        .to_string();
    tb.spawn(&a, None, "stunnel-client", &["stunnel4", &cconf])?;
    std::thread::sleep(Duration::from_millis(500));

    let bench = Bench { tb, a, b, exe };
    let paths = [Path_::Direct, Path_::Enforcer, Path_::Stunnel];
    let mut results = serde_json::Map::new();
    let mut record = |metric: &str, unit: &str, higher_is_better: bool, values: [f64; 3]| {
        results.insert(
            metric.to_owned(),
            json!({"unit": unit, "higher_is_better": higher_is_better,
                   "direct": values[0], "enforcer": values[1], "stunnel": values[2]}),
        );
    };

    if mode == Mode::Profile {
        return profiles(&bench, &root, ea.pid, eb.pid);
    }
    if mode == Mode::Sustained {
        return sustained_rate(&bench, &root, started);
    }
    if mode == Mode::Memory {
        return memory_after_load(bench, &root, [&ea, &eb], started);
    }
    if mode == Mode::Stall {
        return no_stall(bench, &root, started);
    }
    if mode == Mode::Traces {
        return traces_cost(bench, &root, eb, &cfg_b, started);
    }
    if let Mode::Soak { secs, rate } = mode {
        return soak_run(bench, &root, [&ea, &eb], (secs, rate), started);
    }
    if mode == Mode::LlmOnly {
        let llm = llm_stream(&bench)?;
        let date = today();
        let doc = json!({"date": date, "llm_stream": llm,
            "duration_secs": started.elapsed().as_secs()});
        let out = write_json(&root, &format!("{date}-llm"), &doc)?;
        println!("{}", table(&doc));
        println!("written: {}", out.display());
        return Ok(());
    }
    idle_settle();
    let rss_idle = rss_kb(ea.pid)?;
    // Its anonymous memory and the binary's pages it maps (code and
    // read-only data touched, shared with the page cache).
    let (anon_idle, file_idle) = (status_kb(ea.pid, "RssAnon")?, status_kb(ea.pid, "RssFile")?);
    // Each figure is the median of ROUNDS rounds; within a round the three
    // paths run back to back, so machine-wide drift hits them alike.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for streams in [1u32, 8] {
        let mut v = [vec![], vec![], vec![]];
        for _ in 0..ROUNDS {
            for (i, p) in paths.iter().enumerate() {
                let g = bench
                    .iperf(*p, streams)
                    .with_context(|| format!("iperf3 {streams} stream(s), {}", p.name()))?;
                eprintln!(
                    "  throughput {streams} stream(s) {:<8} {g:.2} Gbit/s",
                    p.name()
                );
                v[i].push(g);
            }
        }
        let m = v.map(median);
        record(&format!("throughput_{streams}_stream"), "Gbit/s", true, m);
    }
    // p50 and p99 of a measurement on each path, each the median of ROUNDS.
    let percentiles = |what: &str,
                       measure: &dyn Fn(Path_) -> anyhow::Result<(f64, f64)>|
     -> anyhow::Result<([f64; 3], [f64; 3])> {
        let (mut p50, mut p99) = ([vec![], vec![], vec![]], [vec![], vec![], vec![]]);
        for _ in 0..ROUNDS {
            for (i, p) in paths.iter().enumerate() {
                let (a, b) = measure(*p).with_context(|| format!("{what} {}", p.name()))?;
                eprintln!("  {what} {:<8} p50 {a:.1} us  p99 {b:.1} us", p.name());
                p50[i].push(a);
                p99[i].push(b);
            }
        }
        Ok((p50.map(median), p99.map(median)))
    };
    let (p50, p99) = percentiles("latency", &|p| bench.sockperf(p))?;
    record("latency_p50", "us", false, p50);
    record("latency_p99", "us", false, p99);
    let mut cps = [vec![], vec![], vec![]];
    for _ in 0..ROUNDS {
        for (i, p) in paths.iter().enumerate() {
            let (rate, errors) = bench
                .connect_rate(*p, SECS)
                .with_context(|| format!("connect rate {}", p.name()))?;
            eprintln!(
                "  new connections {:<8} {rate:.0}/s ({errors} errors)",
                p.name()
            );
            cps[i].push(rate);
        }
    }
    record("new_connections_per_sec", "1/s", true, cps.map(median));
    let (s50, s99) = percentiles("setup", &|p| bench.setup_latency(p))?;
    record("setup_latency_p50", "us", false, s50);
    record("setup_latency_p99", "us", false, s99);

    // HTTP requests (keep-alive, small): direct, through enforcer at L4, and
    // to the same server declared `http` (each request decided by b's
    // agent). The rate with HTTP_CONNS connections; latency with one.
    let http_paths: [(&str, Option<&str>, u16); 3] = [
        ("direct", None, HTTP_L4),
        ("l4", Some("bench-client.service"), HTTP_L4),
        ("l7", Some("bench-client.service"), HTTP_L7),
    ];
    let (mut rate, mut hp50, mut hp99) = (
        [vec![], vec![], vec![]],
        [vec![], vec![], vec![]],
        [vec![], vec![], vec![]],
    );
    for _ in 0..ROUNDS {
        for (i, (name, unit, port)) in http_paths.iter().enumerate() {
            let (r, _, _) = bench
                .wrk(*unit, *port, HTTP_CONNS)
                .with_context(|| format!("wrk {name}"))?;
            let (_, a, b) = bench
                .wrk(*unit, *port, 1)
                .with_context(|| format!("wrk {name}, one connection"))?;
            eprintln!(
                "  http {name:<6} {r:.0} req/s ({HTTP_CONNS} connections); one connection p50 {a:.1} us p99 {b:.1} us"
            );
            rate[i].push(r);
            hp50[i].push(a);
            hp99[i].push(b);
        }
    }
    let spread = |v: &[Vec<f64>; 3]| spread(http_paths.map(|(name, _, _)| name), v);
    let http = json!({
        "connections_for_rate": HTTP_CONNS,
        "requests_per_sec": spread(&rate),
        "latency_p50_us": spread(&hp50),
        "latency_p99_us": spread(&hp99),
    });

    let llm = llm_stream(&bench)?;

    // Memory with HOLD idle connections through the enforcer.
    let mut tb = bench.tb;
    let (holder, held) = hold(&mut tb, &bench.a, &bench.b, &bench.exe, 30)?;
    let rss_held = rss_kb(ea.pid)?;
    let rss_b = rss_kb(eb.pid)?;
    tb.stop(holder)?;
    let per_conn = (rss_held.saturating_sub(rss_idle)) as f64 * 1024.0 / held.max(1) as f64;
    eprintln!(
        "  RSS idle {rss_idle} KiB; with {held} connections {rss_held} KiB ({per_conn:.0} B/connection); peer agent {rss_b} KiB"
    );

    drop(tb);
    let micro = criterion()?;

    let date = today();
    let doc = json!({
        "date": date,
        "host": {"kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(), "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "seconds_per_measurement": SECS,
        "rounds_per_figure_median": ROUNDS,
        "results": results,
        "http": http,
        "llm_stream": llm,
        "memory": {"rss_idle_kib": rss_idle, "rss_anon_idle_kib": anon_idle, "rss_file_idle_kib": file_idle,
                   "connections_held": held, "rss_held_kib": rss_held,
                   "bytes_per_connection": per_conn, "peer_rss_held_kib": rss_b},
        "micro": micro,
        "duration_secs": started.elapsed().as_secs(),
    });
    let out = write_json(&root, &date, &doc)?;
    println!("{}", table(&doc));
    println!(
        "written: {} ({} s)",
        out.display(),
        started.elapsed().as_secs()
    );
    Ok(())
}

/// The OTLP receiver's port in b's netns (`--traces`).
const OTLP: u16 = 4318;

/// The cost of `[traces]` on b's agent: HTTP keep-alive requests at its L7
/// destination (each request a span, each connection one) with traces off
/// and on, ROUNDS rounds; each phase starts with a hitless upgrade of b's
/// agent to that configuration, so both run on a fresh agent. The spans go
/// to tests/helpers/otlp_receiver.py in b's netns, which decodes them and
/// counts. Reports the request rate (HTTP_CONNS connections) and one
/// connection's p50/p99 latency, and the spans ended, exported and failed.
fn traces_cost(
    mut bench: Bench,
    root: &Path,
    eb: Enforcer,
    cfg_b: &Path,
    started: Instant,
) -> anyhow::Result<()> {
    let traced = cfg_b.with_file_name("b-traced.toml");
    // ENFORCER_BENCH_TRACES: more `[traces]` keys (e.g. "max_batch = 64").
    let extra = std::env::var("ENFORCER_BENCH_TRACES").unwrap_or_default();
    std::fs::write(
        &traced,
        format!(
            "{}\n[traces]\nendpoint = \"http://127.0.0.1:{OTLP}/v1/traces\"\n{extra}\n",
            std::fs::read_to_string(cfg_b)?
        ),
    )?;
    let receiver = format!(
        "{}/../tests/helpers/otlp_receiver.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let b = bench.b.clone();
    // ENFORCER_BENCH_OTLP=discard: a receiver that answers without decoding.
    let mode = match std::env::var("ENFORCER_BENCH_OTLP").as_deref() {
        Ok("discard") => "--discard",
        _ => "--count",
    };
    bench.tb.start_server(
        &b,
        "otlp",
        &["python3", &receiver, &OTLP.to_string(), mode],
        OTLP,
    )?;
    let names = ["traces_off", "traces_on"];
    let (mut rate, mut p50, mut p99) = ([vec![], vec![]], [vec![], vec![]], [vec![], vec![]]);
    let mut spans = vec![];
    let mut agent = eb;
    for _ in 0..ROUNDS {
        for (i, cfg) in [cfg_b, traced.as_path()].into_iter().enumerate() {
            let old = agent.pid;
            agent = bench.tb.upgrade_enforcer(&agent, cfg)?;
            bench.tb.wait_exit(old, Duration::from_secs(30));
            let unit = Some("bench-client.service");
            let (r, _, _) = bench.wrk(unit, HTTP_L7, HTTP_CONNS)?;
            let (_, a, b99) = bench.wrk(unit, HTTP_L7, 1)?;
            eprintln!(
                "  http l7 {:<10} {r:.0} req/s ({HTTP_CONNS} connections); one connection p50 {a:.1} us p99 {b99:.1} us",
                names[i]
            );
            rate[i].push(r);
            p50[i].push(a);
            p99[i].push(b99);
            if i == 1 {
                // The last batch leaves within the batch delay (5 s).
                std::thread::sleep(Duration::from_secs(6));
                let text = agent.metrics()?;
                // (+ 0.0: a sum of no samples is -0.0)
                let n = |result| {
                    sum_metric(&text, "enforcer_trace_spans_total", &[("result", result)]) + 0.0
                };
                let (ended, exported, failed) = (n("ended"), n("exported"), n("failed"));
                eprintln!("  spans: {ended} ended, {exported} exported, {failed} failed");
                spans.push(json!({"ended": ended, "exported": exported, "failed": failed}));
            }
        }
    }
    let spread2 = |v: &[Vec<f64>; 2]| spread(names, v);
    let date = today();
    let doc = json!({
        "date": date,
        "traces_config_extra": extra,
        "receiver": mode,
        "http_l7_traces": {
            "connections_for_rate": HTTP_CONNS,
            "requests_per_sec": spread2(&rate),
            "latency_p50_us": spread2(&p50),
            "latency_p99_us": spread2(&p99),
            "spans_per_traced_phase": spans,
        },
        "duration_secs": started.elapsed().as_secs(),
    });
    let out = write_json(root, &format!("{date}-traces"), &doc)?;
    let h = &doc["http_l7_traces"];
    let mut t = String::from(
        "| HTTP at L7, keep-alive (median of rounds, min–max) | traces off | traces on | on / off |\n|---|---|---|---|\n",
    );
    for (k, label, d) in [
        ("requests_per_sec", "requests/s (16 connections)", 0),
        ("latency_p50_us", "p50 µs (1 connection)", 1),
        ("latency_p99_us", "p99 µs (1 connection)", 1),
    ] {
        let _ = writeln!(
            t,
            "| {label} | {} | {} | {:.2} |",
            range(&h[k]["traces_off"], d),
            range(&h[k]["traces_on"], d),
            median(&h[k]["traces_on"]) / median(&h[k]["traces_off"])
        );
    }
    println!("{t}");
    println!("spans per traced phase: {}", h["spans_per_traced_phase"]);
    println!(
        "written: {} ({} s)",
        out.display(),
        started.elapsed().as_secs()
    );
    Ok(())
}

/// `dir/<stem>.<ext>`, or `<stem>-2.<ext>`, `-3`, … when that exists: a
/// second run on one day never overwrites the first's results.
/// Starts HOLD idle connections from a's client unit through the enforcer
/// to b's echo server, kept open `secs` seconds; returns the holder's pid
/// and how many it opened, once they are open (and a second more).
fn hold(
    tb: &mut Testbed,
    a: &Node,
    b: &Node,
    exe: &Path,
    secs: u64,
) -> anyhow::Result<(u32, usize)> {
    let target = format!("{}:{ECHO}", b.ipv4);
    let exe = exe.display().to_string();
    let holder = tb.spawn(
        a,
        Some("bench-client.service"),
        "hold",
        &[
            &exe,
            "bench-hold",
            &target,
            &HOLD.to_string(),
            &secs.to_string(),
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let held = loop {
        if let Some(n) = tb
            .server_log(a, "hold")
            .lines()
            .find_map(|l| l.strip_prefix("HELD "))
            .and_then(|n| n.trim().parse::<usize>().ok())
        {
            break n;
        }
        if Instant::now() > deadline {
            bail!(
                "the connection holder did not report: {}",
                tb.server_log(a, "hold")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(1));
    Ok((holder, held))
}

/// Seconds between the end of a load and the RSS reading after it.
const MEMORY_SETTLE_SECS: u64 = 15;

/// Both agents' RSS (KiB) idle, after 20 s of new connections (32
/// workers), with HOLD connections open, and after they closed, each
/// "after" read MEMORY_SETTLE_SECS after the load stopped: whether memory
/// comes back. Written to bench/results/<date>-memory.json.
fn memory_after_load(
    bench: Bench,
    root: &Path,
    agents: [&Enforcer; 2],
    started: Instant,
) -> anyhow::Result<()> {
    let (a, b) = (agents[0].pid, agents[1].pid);
    let nodes = [bench.a.clone(), bench.b.clone()];
    // jemalloc's own figures beside RSS: live bytes against what is kept.
    let alloc = |when: &str, allocs: &mut serde_json::Map<String, Value>| -> anyhow::Result<()> {
        let mut both = vec![];
        for (node, agent) in nodes.iter().zip(agents) {
            both.push(allocator(node, agent)?);
        }
        allocs.insert(when.to_owned(), json!(both));
        Ok(())
    };
    let mut allocs = serde_json::Map::new();
    let rss = || -> anyhow::Result<[u64; 2]> { Ok([rss_kb(a)?, rss_kb(b)?]) };
    // ENFORCER_BENCH_SETTLE_SECS: read later (e.g. past the HBONE pool's
    // 60 s idle timeout).
    let settle_secs = std::env::var("ENFORCER_BENCH_SETTLE_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(MEMORY_SETTLE_SECS)
        .min(600);
    let settle = || std::thread::sleep(Duration::from_secs(settle_secs));
    idle_settle();
    let idle = rss()?;
    alloc("idle", &mut allocs)?;
    // Idle again as long after as the "after" figures are read after their
    // load: what the agents' periodic work faults back in that time is in
    // those figures, so it is an idle agent's too.
    settle();
    let idle_later = rss()?;
    alloc("idle_later", &mut allocs)?;
    let (rate, errors) = bench.connect_rate(Path_::Enforcer, 20)?;
    settle();
    let after_churn = rss()?;
    alloc("after_20s_of_new_connections", &mut allocs)?;
    let mut tb = bench.tb;
    let (holder, held) = hold(&mut tb, &bench.a, &bench.b, &bench.exe, 8)?;
    let with_held = rss()?;
    alloc("with_connections_held", &mut allocs)?;
    let _ = tb.wait_exit(holder, Duration::from_secs(30));
    settle();
    let after_held = rss()?;
    alloc("after_they_closed", &mut allocs)?;
    let doc = json!({
        "date": today(),
        "agents": ["a (client side)", "b (server side)"],
        "rss_kib": {
            "idle": idle,
            "idle_later": idle_later,
            "after_20s_of_new_connections": after_churn,
            "with_connections_held": with_held,
            "after_they_closed": after_held,
        },
        "allocator_kib": allocs,
        "new_connections": {"per_sec": rate.round(), "errors": errors},
        "connections_held": held,
        "settle_secs": settle_secs,
        "allocator": std::env::var("ENFORCER_BENCH_ALLOCATOR").unwrap_or_else(|_| "as built".into()),
        "duration_secs": started.elapsed().as_secs(),
    });
    let out = write_json(root, &format!("{}-memory", today()), &doc)?;
    println!("{}", serde_json::to_string_pretty(&doc)?);
    println!("written: {}", out.display());
    Ok(())
}

/// Rounds of the sustained connection-rate run, and the seconds of each.
const SUSTAINED_ROUNDS: usize = 6;
const SUSTAINED_SECS: u64 = 10;

/// New connections per second, round after round with no pause, on the
/// direct path and then through enforcer: a rate that collapses as
/// TIME_WAIT builds up shows as a last round far below the first.
/// Written to bench/results/<date>-sustained.json.
fn sustained_rate(bench: &Bench, root: &Path, started: Instant) -> anyhow::Result<()> {
    let mut doc = serde_json::Map::new();
    for p in [Path_::Direct, Path_::Enforcer] {
        let mut rounds = vec![];
        let mut errors = 0;
        for _ in 0..SUSTAINED_ROUNDS {
            let (rate, e) = bench
                .connect_rate(p, SUSTAINED_SECS)
                .with_context(|| format!("connect rate {}", p.name()))?;
            eprintln!("  new connections {:<8} {rate:.0}/s ({e} errors)", p.name());
            rounds.push(rate.round());
            errors += e;
        }
        let last_to_first = rounds[SUSTAINED_ROUNDS - 1] / rounds[0].max(1.0);
        doc.insert(
            p.name().to_owned(),
            json!({"per_round": rounds, "errors": errors,
                   "last_to_first": (last_to_first * 100.0).round() / 100.0}),
        );
    }
    let date = today();
    let doc = json!({"date": date, "round_secs": SUSTAINED_SECS,
        "new_connections_per_sec": doc, "duration_secs": started.elapsed().as_secs()});
    let out = write_json(root, &format!("{date}-sustained"), &doc)?;
    println!("{}", serde_json::to_string_pretty(&doc)?);
    println!("written: {}", out.display());
    Ok(())
}

/// Writes `content` to `bench/results/<stem>.<ext>` (or `<stem>-2.<ext>`,
/// … when taken) and returns the path.
fn write_result(root: &Path, stem: &str, ext: &str, content: &str) -> anyhow::Result<PathBuf> {
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let out = unused(&dir, stem, ext);
    std::fs::write(&out, content).with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

/// [`write_result`] of a JSON document, pretty-printed.
fn write_json(root: &Path, stem: &str, doc: &Value) -> anyhow::Result<PathBuf> {
    write_result(root, stem, "json", &serde_json::to_string_pretty(doc)?)
}

fn unused(dir: &Path, stem: &str, ext: &str) -> PathBuf {
    let mut path = dir.join(format!("{stem}.{ext}"));
    let mut n = 2;
    while path.exists() {
        path = dir.join(format!("{stem}-{n}.{ext}"));
        n += 1;
    }
    path
}

fn today() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}",
        now.year(),
        u8::from(now.month()),
        now.day()
    )
}

/// `--profile`: a system-wide CPU profile (perf, cpu-clock, 999 Hz, both
/// cores) of each workload on each path, summarised by process and by
/// function, into `bench/results/<date>-profile.md`.
fn profiles(bench: &Bench, root: &Path, agent_a: u32, agent_b: u32) -> anyhow::Result<()> {
    // ENFORCER_BENCH_PERF_DIR=<dir>: the perf data files are written there
    // and kept (for `perf report` by hand), not in the testbed's directory.
    let dir = std::env::var_os("ENFORCER_BENCH_PERF_DIR")
        .map_or_else(|| bench.tb.dir.join("perf"), PathBuf::from);
    std::fs::create_dir_all(&dir)?;
    // The per-load counts (`perf stat`) stay in the testbed's directory.
    std::fs::create_dir_all(bench.tb.dir.join("perf"))?;
    let mut md = format!(
        "# Where the time goes\n\n`cargo xtask bench --profile` on {} (2 cores). System-wide \
         `perf record -e cpu-clock -F 999 -a -g` while the workload runs for {SECS} s; \
         agent a (client side) is pid {agent_a}, agent b (server side) pid {agent_b}; \
         `swapper` is idle time. Percentages are of all samples on both cores. \
         The streamed LLM answers are recorded in the two agents alone \
         (`-F 19999 -p <a>,<b>`): percentages there are of their samples.\n",
        today()
    );
    type Load<'a> = (
        String,
        Path_,
        Box<dyn Fn(&Bench) -> anyhow::Result<String> + 'a>,
    );
    let http_conns = std::env::var("ENFORCER_BENCH_HTTP_CONNS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1);
    let loads: Vec<Load> = vec![
        (
            "iperf3, 1 stream".into(),
            Path_::Direct,
            Box::new(|b: &Bench| Ok(format!("{:.2} Gbit/s", b.iperf(Path_::Direct, 1)?))),
        ),
        (
            "iperf3, 1 stream".into(),
            Path_::Enforcer,
            Box::new(|b: &Bench| Ok(format!("{:.2} Gbit/s", b.iperf(Path_::Enforcer, 1)?))),
        ),
        (
            "iperf3, 1 stream".into(),
            Path_::Stunnel,
            Box::new(|b: &Bench| Ok(format!("{:.2} Gbit/s", b.iperf(Path_::Stunnel, 1)?))),
        ),
        (
            "sockperf ping-pong".into(),
            Path_::Enforcer,
            Box::new(|b: &Bench| {
                let (p50, p99) = b.sockperf(Path_::Enforcer)?;
                Ok(format!("p50 {p50:.1} µs, p99 {p99:.1} µs"))
            }),
        ),
        // The connect path (issue 15): new connections as fast as 32
        // workers make them.
        (
            "new connections, 32 workers".into(),
            Path_::Enforcer,
            Box::new(|b: &Bench| {
                let (rate, errors) = b.connect_rate(Path_::Enforcer, SECS)?;
                Ok(format!("{rate:.0}/s, {errors} errors"))
            }),
        ),
        // Per request (issue 11): keep-alive HTTP on one connection
        // (ENFORCER_BENCH_HTTP_CONNS=N: on N, as the request-rate figure),
        // to b's L4 port and to its `http` destination (each request
        // decided).
        (
            format!("HTTP requests, {}, L4", conns_name(http_conns)),
            Path_::Enforcer,
            Box::new(move |b: &Bench| {
                http_with_syscalls(b, HTTP_L4, [agent_a, agent_b], http_conns)
            }),
        ),
        (
            format!("HTTP requests, {}, L7", conns_name(http_conns)),
            Path_::Enforcer,
            Box::new(move |b: &Bench| {
                http_with_syscalls(b, HTTP_L7, [agent_a, agent_b], http_conns)
            }),
        ),
        // Per chunk (issue 12): a streamed chat completion, to the stand-in
        // at L4 and declared `llm` (each event parsed, counted, written).
        (
            "LLM stream, L4".into(),
            Path_::Enforcer,
            Box::new(move |b: &Bench| stream_with_syscalls(b, LLM_L4, [agent_a, agent_b])),
        ),
        (
            "LLM stream, llm".into(),
            Path_::Enforcer,
            Box::new(move |b: &Bench| stream_with_syscalls(b, LLM_L7, [agent_a, agent_b])),
        ),
    ];
    // ENFORCER_BENCH_PROFILE=<text>: only the loads whose name contains it
    // (e.g. "HTTP").
    let only = std::env::var("ENFORCER_BENCH_PROFILE").unwrap_or_default();
    for (i, (what, path, load)) in loads.iter().enumerate() {
        if !what.contains(only.as_str()) {
            continue;
        }
        let data = dir.join(format!("{i}.data"));
        // A stream leaves the machine idle between its chunks (≈ 1 % busy):
        // the agents alone, sampled 20× as often, or a profile has a few
        // dozen of their samples.
        let streamed = what.starts_with("LLM");
        let agents = format!("{agent_a},{agent_b}");
        let whom: &[&str] = if streamed {
            &["19999", "-p", &agents]
        } else {
            &["999", "-a"]
        };
        let rec = std::process::Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-g", "-F"])
            .args(whom)
            .arg("-o")
            .arg(&data)
            .args(["--", "sleep", &(SECS + 1).to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("perf record (apt install linux-perf)")?;
        std::thread::sleep(Duration::from_millis(300));
        let result = load(bench).with_context(|| format!("{what} {}", path.name()))?;
        let out = rec.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "perf record failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        eprintln!("  profiled {what} {}: {result}", path.name());
        let report = |sort: &str, lines: usize| -> anyhow::Result<String> {
            let out = std::process::Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "-g",
                    "none",
                    "--percent-limit",
                    "0.7",
                    "--sort",
                    sort,
                    "-i",
                ])
                .arg(&data)
                .output()
                .context("perf report")?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .take(lines)
                .collect::<Vec<_>>()
                .join("\n"))
        };
        let _ = write!(
            md,
            "\n## {what}, {} ({result})\n\nBy process:\n\n```\n{}\n```\n\nBy process and function:\n\n```\n{}\n```\n",
            path.name(),
            report("comm,pid", 12)?,
            report("comm,sym", 40)?
        );
        if *path == Path_::Enforcer
            && (what.starts_with("new connections")
                || what.starts_with("HTTP")
                || what.starts_with("LLM"))
        {
            let _ = write!(
                md,
                "\nThe agents' functions with what they call (`--children`, call graphs by frame pointer: \
                 user-space frames are whole only in a build with `RUSTFLAGS=\"-C force-frame-pointers=yes\"`, \
                 given as `ENFORCER_BENCH_BIN`):\n\n```\n{}\n```\n",
                inclusive(&data, &[agent_a, agent_b])?
            );
        }
    }
    let out = write_result(root, &format!("{}-profile", today()), "md", &md)?;
    println!("written: {}", out.display());
    Ok(())
}

/// Syscalls `perf stat` counts for the agent per request in
/// [`http_with_syscalls`] (reads, writes and waits of the data path).
const SYSCALLS: [&str; 7] = [
    "writev",
    "sendto",
    "write",
    "recvfrom",
    "read",
    "epoll_wait",
    "futex",
];

/// "one connection", "16 connections".
fn conns_name(n: u32) -> String {
    if n == 1 {
        "one connection".into()
    } else {
        format!("{n} connections")
    }
}

/// keep-alive HTTP requests on `conns` connections to `port` on b, with each
/// agent's syscalls and CPU time counted meanwhile: the rate, latency and,
/// per agent, its CPU and each syscall per request.
fn http_with_syscalls(
    b: &Bench,
    port: u16,
    agents: [u32; 2],
    conns: u32,
) -> anyhow::Result<String> {
    with_syscalls(b, port, agents, "request", || {
        let (r, p50, p99) = b.wrk(Some("bench-client.service"), port, conns)?;
        Ok((
            format!("{r:.0} req/s, p50 {p50:.1} µs, p99 {p99:.1} µs"),
            r * SECS as f64,
        ))
    })
}

/// Streamed chat completions from the stand-in at `port` on b (one
/// keep-alive connection, a chunk every SSE_CHUNK_MS), with each agent's
/// syscalls and CPU time counted meanwhile, per chunk.
fn stream_with_syscalls(b: &Bench, port: u16, agents: [u32; 2]) -> anyhow::Result<String> {
    with_syscalls(b, port, agents, "chunk", || {
        let (_, mut chunks) = b.sse(Some("bench-client.service"), port)?;
        Ok((
            format!(
                "{} chunks, p50 {:.1} µs, p99 {:.1} µs",
                chunks.len(),
                percentile(&mut chunks, 0.5),
                percentile(&mut chunks, 0.99)
            ),
            chunks.len() as f64,
        ))
    })
}

/// Runs `load` (which says what it measured and how many `unit`s it
/// moved) to `port` on b while `perf stat` counts each agent's syscalls and
/// CPU time; adds both agents' per-unit figures to what it says.
fn with_syscalls(
    b: &Bench,
    port: u16,
    agents: [u32; 2],
    unit: &str,
    load: impl FnOnce() -> anyhow::Result<(String, f64)>,
) -> anyhow::Result<String> {
    let events = SYSCALLS
        .iter()
        .map(|s| format!("syscalls:sys_enter_{s}"))
        .chain(["task-clock".to_owned()])
        .collect::<Vec<_>>()
        .join(",");
    let counted = |agent: u32| b.tb.dir.join(format!("perf/syscalls-{port}-{agent}.txt"));
    // Counted until the load ends (SIGINT ends `perf stat` and writes).
    let stats = agents
        .iter()
        .map(|&agent| {
            std::process::Command::new("perf")
                .args([
                    "stat",
                    "-x",
                    ",",
                    "-e",
                    &events,
                    "-p",
                    &agent.to_string(),
                    "-o",
                ])
                .arg(counted(agent))
                .spawn()
                .context("perf stat (apt install linux-perf)")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let loaded = load();
    for stat in stats {
        // A signal to the child this process started.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(stat.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let out = stat.wait_with_output()?;
        // perf stat writes its counts, then ends by the signal it got.
        if !out.status.success()
            && std::os::unix::process::ExitStatusExt::signal(&out.status) != Some(2)
        {
            bail!("perf stat failed: {out:?}");
        }
    }
    let (mut said, units) = loaded?;
    let units = units.max(1.0);
    for (name, agent) in ["a", "b"].into_iter().zip(agents) {
        let text = std::fs::read_to_string(counted(agent))?;
        // The first field of the line that names `event`.
        let count = |event: &str| {
            text.lines()
                .find(|l| l.split(',').any(|f| f == event))
                .and_then(|l| l.split(',').next())
                .and_then(|n| n.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let per_unit = SYSCALLS
            .iter()
            .map(|s| {
                format!(
                    "{s} {:.2}",
                    count(&format!("syscalls:sys_enter_{s}")) / units
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        // task-clock: milliseconds of CPU on the agent's threads.
        let _ = write!(
            said,
            "; {name}'s agent per {unit}: {:.1} µs CPU, {per_unit}",
            count("task-clock") * 1000.0 / units
        );
    }
    Ok(said)
}

/// The functions of processes `pids` in profile `data` by the share of
/// samples in them or what they call, the first 60.
fn inclusive(data: &Path, pids: &[u32]) -> anyhow::Result<String> {
    let pids = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let out = std::process::Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--children",
            "-g",
            "none",
            "--percent-limit",
            "1.5",
            "--sort",
            "sym",
            "--pid",
            &pids,
            "-i",
        ])
        .arg(data)
        .output()
        .context("perf report --children")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .take(60)
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Runs the criterion benchmarks and reads mean and p99 per operation (ns)
/// from criterion's samples.
fn criterion() -> anyhow::Result<Value> {
    crate::cargo(&[
        "bench",
        "--package",
        "enforcer-user",
        "--bench",
        "core",
        "--",
        "--warm-up-time",
        "1",
        "--measurement-time",
        "3",
    ])?;
    let mut out = serde_json::Map::new();
    for name in [
        "policy_decision_cached",
        "policy_decision_uncached",
        "mcp_tools_call_decision",
        "mcp_tools_call_decision_vm",
        "mcp_tools_call_decision_repeated",
        "request_span_traced",
        "svid_issuance",
    ] {
        let path = PathBuf::from("target/criterion")
            .join(name)
            .join("new/sample.json");
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let v: Value = serde_json::from_str(&text)?;
        let (Some(iters), Some(times)) = (v["iters"].as_array(), v["times"].as_array()) else {
            bail!("{}: no samples", path.display());
        };
        let mut per: Vec<f64> = iters
            .iter()
            .zip(times)
            .filter_map(|(i, t)| Some(t.as_f64()? / i.as_f64()?))
            .collect();
        per.sort_by(f64::total_cmp);
        let total_t: f64 = times.iter().filter_map(Value::as_f64).sum();
        let total_i: f64 = iters.iter().filter_map(Value::as_f64).sum();
        let idx = ((per.len() as f64 * 0.99) as usize).min(per.len().saturating_sub(1));
        let p99 = per.get(idx).copied().unwrap_or(f64::NAN);
        out.insert(
            name.to_owned(),
            json!({"mean_ns": total_t / total_i, "p99_of_samples_ns": p99}),
        );
    }
    // Single decisions timed one by one (benches/core.rs `per_op`).
    let path = PathBuf::from("target/criterion/per_op.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let per_op: Value = serde_json::from_str(&text)?;
    if let Some(ops) = per_op.as_object() {
        for (name, v) in ops {
            if let Some(Value::Object(o)) = out.get_mut(name) {
                for k in ["p50_ns", "p99_ns", "p999_ns"] {
                    o.insert(k.into(), v[k].clone());
                }
            }
        }
    }
    Ok(Value::Object(out))
}

/// Streamed LLM answers (DESIGN §7, issue 12): time to first token and
/// per-chunk latency, direct, through enforcer at L4, and to the stand-in
/// declared `llm`. Per path and round: the TTFT p50 over the requests and
/// the chunk p50/p99 over every chunk; reported as the median of rounds
/// with min–max.
fn llm_stream(bench: &Bench) -> anyhow::Result<Value> {
    let paths: [(&str, Option<&str>, u16); 3] = [
        ("direct", None, LLM_L4),
        ("l4", Some("bench-client.service"), LLM_L4),
        ("llm", Some("bench-client.service"), LLM_L7),
    ];
    let (mut ttft, mut c50, mut c99) = (
        [vec![], vec![], vec![]],
        [vec![], vec![], vec![]],
        [vec![], vec![], vec![]],
    );
    // Every chunk's latency, per path over all rounds: a p99 from a few
    // thousand chunks rather than one round's 800.
    let mut pooled: [Vec<f64>; 3] = [vec![], vec![], vec![]];
    // ENFORCER_BENCH_LLM_ROUNDS: more rounds (the per-chunk p99 is noisy).
    let rounds = std::env::var("ENFORCER_BENCH_LLM_ROUNDS")
        .ok()
        .and_then(|r| r.parse::<usize>().ok())
        .unwrap_or(ROUNDS)
        .clamp(1, 50);
    for _ in 0..rounds {
        for (i, (name, unit, port)) in paths.iter().enumerate() {
            let (mut t, mut c) = bench
                .sse(*unit, *port)
                .with_context(|| format!("streamed answers, {name}"))?;
            let (t50, p50, p99) = (
                percentile(&mut t, 0.5),
                percentile(&mut c, 0.5),
                percentile(&mut c, 0.99),
            );
            eprintln!(
                "  llm stream {name:<6} time to first token p50 {t50:.0} us; chunk p50 {p50:.0} us p99 {p99:.0} us ({} chunks)",
                c.len()
            );
            ttft[i].push(t50);
            c50[i].push(p50);
            c99[i].push(p99);
            pooled[i].extend(c);
        }
    }
    // What `llm` adds over L4 within each round (the two ran back to back,
    // so a machine-wide slowdown hits both).
    let added =
        |v: &[Vec<f64>; 3]| -> Vec<f64> { v[2].iter().zip(&v[1]).map(|(l, f)| l - f).collect() };
    let names = paths.map(|(name, _, _)| name);
    let spread3 = |v: &[Vec<f64>; 3]| spread(names, v);
    let added_spread = |v: &[Vec<f64>; 3]| spread(["llm_over_l4"], &[added(v)]);
    let mut pooled_p = serde_json::Map::new();
    for (name, v) in names.iter().zip(pooled.iter_mut()) {
        pooled_p.insert(
            (*name).into(),
            json!({"chunks": v.len(), "p50": percentile(v, 0.5), "p99": percentile(v, 0.99)}),
        );
    }
    Ok(json!({
        "chunk_ms": SSE_CHUNK_MS,
        "requests_per_round": SSE_REQUESTS,
        "words_per_answer": SSE_WORDS,
        "rounds": rounds,
        "ttft_p50_us": spread3(&ttft),
        "chunk_p50_us": spread3(&c50),
        "chunk_p99_us": spread3(&c99),
        "added_per_round_us": {
            "ttft_p50": added_spread(&ttft)["llm_over_l4"],
            "chunk_p50": added_spread(&c50)["llm_over_l4"],
            "chunk_p99": added_spread(&c99)["llm_over_l4"],
        },
        "chunks_pooled_us": pooled_p,
    }))
}

/// The `p` quantile of `v` (sorted in place); NaN when empty.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

/// Per path: the median of its rounds' values, with their min and max.
fn spread<const N: usize>(names: [&str; N], v: &[Vec<f64>; N]) -> Value {
    let mut o = serde_json::Map::new();
    for (name, values) in names.iter().zip(v) {
        let mut s = values.clone();
        s.sort_by(f64::total_cmp);
        o.insert(
            (*name).into(),
            json!({"median": s[s.len() / 2], "min": s[0], "max": s[s.len() - 1]}),
        );
    }
    Value::Object(o)
}

/// A spread's median.
fn median(spread: &Value) -> f64 {
    spread["median"].as_f64().unwrap_or(f64::NAN)
}

/// A spread as "median (min–max)", with `decimals` digits.
fn range(spread: &Value, decimals: usize) -> String {
    let f = |k: &str| spread[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "{:.d$} ({:.d$}–{:.d$})",
        f("median"),
        f("min"),
        f("max"),
        d = decimals
    )
}

/// The Markdown table of a results document.
pub fn table(doc: &Value) -> String {
    let mut t = String::new();
    if let Some(results) = doc["results"].as_object() {
        t.push_str("| metric | direct | enforcer | stunnel | enforcer / direct | enforcer / stunnel |\n|---|---|---|---|---|---|\n");
        for (name, r) in results {
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            let unit = r["unit"].as_str().unwrap_or("");
            let _ = writeln!(
                t,
                "| {name} ({unit}) | {:.2} | {:.2} | {:.2} | {:.2}× | {:.2}× |",
                f("direct"),
                f("enforcer"),
                f("stunnel"),
                f("enforcer") / f("direct"),
                f("enforcer") / f("stunnel")
            );
        }
    }
    let h = &doc["http"];
    if h.is_object() {
        let m = |k: &str, p: &str| median(&h[k][p]);
        let range = |k: &str, p: &str| range(&h[k][p], 1);
        let _ = writeln!(
            t,
            "\n| HTTP, keep-alive (median of rounds, min–max) | direct | enforcer L4 | enforcer L7 (`http`) | L7 / L4 | L7 added over L4 |\n|---|---|---|---|---|---|"
        );
        let _ = writeln!(
            t,
            "| requests/s, {} connections | {} | {} | {} | {:.2}× | |",
            h["connections_for_rate"],
            range("requests_per_sec", "direct"),
            range("requests_per_sec", "l4"),
            range("requests_per_sec", "l7"),
            m("requests_per_sec", "l7") / m("requests_per_sec", "l4")
        );
        for (k, label) in [("latency_p50_us", "p50"), ("latency_p99_us", "p99")] {
            let _ = writeln!(
                t,
                "| latency {label} (µs), one connection | {} | {} | {} | | +{:.1} µs |",
                range(k, "direct"),
                range(k, "l4"),
                range(k, "l7"),
                m(k, "l7") - m(k, "l4")
            );
        }
    }
    let l = &doc["llm_stream"];
    if l.is_object() {
        let m = |k: &str, p: &str| median(&l[k][p]);
        let range = |k: &str, p: &str| range(&l[k][p], 0);
        let _ = writeln!(
            t,
            "\n| LLM stream, {} words at {} ms (median of rounds, min–max, µs) | direct | enforcer L4 | enforcer `llm` | `llm` added over L4 |\n|---|---|---|---|---|",
            l["words_per_answer"], l["chunk_ms"]
        );
        for (k, label) in [
            ("ttft_p50_us", "time to first token, p50"),
            ("chunk_p50_us", "per chunk, p50"),
            ("chunk_p99_us", "per chunk, p99"),
        ] {
            let _ = writeln!(
                t,
                "| {label} | {} | {} | {} | {:+.0} µs |",
                range(k, "direct"),
                range(k, "l4"),
                range(k, "llm"),
                m(k, "llm") - m(k, "l4")
            );
        }
    }
    if let Some(micro) = doc["micro"].as_object() {
        t.push_str("\n| operation | mean (criterion) | p50 | p99 | p99.9 (each timed alone) |\n|---|---|---|---|---|\n");
        for (name, r) in micro {
            let us = |k: &str| {
                r[k].as_f64()
                    .map_or("–".into(), |v| format!("{:.2} µs", v / 1e3))
            };
            let _ = writeln!(
                t,
                "| {name} | {} | {} | {} | {} |",
                us("mean_ns"),
                us("p50_ns"),
                us("p99_ns"),
                us("p999_ns")
            );
        }
    }
    let m = &doc["memory"];
    if m.is_null() {
        return t;
    }
    let _ = writeln!(
        t,
        "\nenforcer RSS: {} KiB idle; {} KiB with {} open idle connections ({:.0} bytes each); peer agent {} KiB",
        m["rss_idle_kib"],
        m["rss_held_kib"],
        m["connections_held"],
        m["bytes_per_connection"].as_f64().unwrap_or(0.0),
        m["peer_rss_held_kib"]
    );
    t
}

/// Seconds between the end of the soak's load and its last sample.
const SOAK_SETTLE_SECS: u64 = 70;

/// One sample of an agent under soak.
#[derive(Clone, Copy, Debug, serde::Serialize)]
struct Sample {
    at_secs: u64,
    rss_kib: u64,
    fds: u64,
    threads: u64,
    active_connections: u64,
    by_cookie: u64,
    by_tuple: u64,
    /// jemalloc: bytes in live objects, KiB.
    allocated_kib: u64,
}

/// A process's threads now (0 when it cannot be read).
fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A process's threads by name (`/proc/<pid>/task/*/comm`, digits at the
/// end dropped: `policy-eval-0` and `policy-eval-1` count as one name).
fn thread_names(pid: u32) -> Value {
    let mut names = std::collections::BTreeMap::<String, u64>::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
                let name = comm.trim().trim_end_matches(|c: char| c.is_ascii_digit());
                *names.entry(name.to_owned()).or_default() += 1;
            }
        }
    }
    json!(names)
}

/// An agent's `enforcer_allocator_bytes` gauges, in KiB by kind, and its
/// threads.
fn allocator(node: &Node, agent: &Enforcer) -> anyhow::Result<Value> {
    // Before the scrape: serving it faults the admin server's code back in.
    let rss = rss_parts(agent.pid)?;
    let (_, metrics) = node.http_get(agent.metrics_addr, "/metrics")?;
    let mut out = serde_json::Map::new();
    for kind in [
        "allocated",
        "active",
        "resident",
        "retained",
        "metadata",
        "tcache",
    ] {
        let bytes = sum_metric(&metrics, "enforcer_allocator_bytes", &[("kind", kind)]);
        out.insert(kind.to_owned(), json!((bytes / 1024.0).round()));
    }
    out.insert("threads".into(), json!(threads(agent.pid)));
    out.insert("thread_names".into(), thread_names(agent.pid));
    out.insert("rss".into(), rss);
    Ok(Value::Object(out))
}

/// A process's resident pages by what holds them (KiB, from
/// `/proc/<pid>/smaps`): its own executable's file pages, other files'
/// (libraries), and anonymous pages (the heap, thread stacks, other
/// mappings): where RSS beyond the allocator's `resident` is.
fn rss_parts(pid: u32) -> anyhow::Result<Value> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("/proc/{pid}/exe"))?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("/proc/{pid}/smaps"))?;
    let (mut exe_kib, mut files_kib, mut anon_kib) = (0u64, 0u64, 0u64);
    let mut path = String::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: `start-end perms offset dev inode [path]`.
            path = words.nth(4).unwrap_or_default().to_owned();
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if Path::new(&path) == exe {
                exe_kib += kib;
            } else if path.starts_with('/') {
                files_kib += kib;
            } else {
                anon_kib += kib;
            }
        }
    }
    Ok(json!({"executable": exe_kib, "other_files": files_kib, "anonymous": anon_kib}))
}

fn sample(node: &Node, agent: &Enforcer, at: Instant) -> anyhow::Result<Sample> {
    let pid = agent.pid;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("/proc/{pid}/fd"))?
        .count() as u64;
    let threads = threads(pid);
    let (_, metrics) = node.http_get(agent.metrics_addr, "/metrics")?;
    let sum = |name: &str, labels: &[(&str, &str)]| sum_metric(&metrics, name, labels) as u64;
    Ok(Sample {
        at_secs: at.elapsed().as_secs(),
        rss_kib: rss_kb(pid)?,
        fds,
        threads,
        active_connections: sum("enforcer_active_connections", &[]),
        by_cookie: sum("enforcer_capture_map_entries", &[("map", "by_cookie")]),
        by_tuple: sum("enforcer_capture_map_entries", &[("map", "by_tuple")]),
        allocated_kib: sum("enforcer_allocator_bytes", &[("kind", "allocated")]) / 1024,
    })
}

/// Soak: HOLD connections held from a to b's echo server through both
/// agents while `rate` new connections/s run for `secs`; both agents
/// sampled every 30 s. Past the first quarter (warm-up), the mean of the
/// last third of the samples against the middle third's: RSS at most 10 %
/// higher, fds and kernel-map entries beyond the open connections at most
/// 64 + rate/10 higher, threads at most 8; the open connections bounded by
/// what is held and in flight; SOAK_SETTLE_SECS after the load every
/// connection, fd and map entry is gone.
/// Written to bench/results/<date>-soak.json; fails if a check fails.
fn soak_run(
    bench: Bench,
    root: &Path,
    agents: [&Enforcer; 2],
    (secs, rate): (u64, u64),
    started: Instant,
) -> anyhow::Result<()> {
    let Bench { mut tb, a, b, exe } = bench;
    let nodes = [&a, &b];
    let t0 = Instant::now();
    let take = |t0: Instant| -> anyhow::Result<[Sample; 2]> {
        Ok([
            sample(nodes[0], agents[0], t0)?,
            sample(nodes[1], agents[1], t0)?,
        ])
    };
    let idle = take(t0)?;
    let (holder, held) = hold(&mut tb, &a, &b, &exe, secs + 30)?;
    let exe_s = exe.display().to_string();
    let paced = tb.spawn(
        &a,
        Some("bench-client.service"),
        "paced",
        &[
            &exe_s,
            "bench-paced",
            &format!("{}:{ECHO}", b.ipv4),
            &secs.to_string(),
            &rate.to_string(),
        ],
    )?;
    let load_start = Instant::now();
    let mut samples = vec![take(t0)?];
    while tb.wait_exit(paced, Duration::from_secs(30)).is_none() {
        samples.push(take(t0)?);
        eprintln!(
            "  soak {:>4} s: a {:?}",
            load_start.elapsed().as_secs(),
            samples[samples.len() - 1][0]
        );
        if load_start.elapsed() > Duration::from_secs(secs + 60) {
            bail!("the paced load did not end");
        }
    }
    let out = tb.server_log(&a, "paced");
    let load: Value = serde_json::from_str(out.lines().last().unwrap_or("").trim())
        .with_context(|| format!("bench-paced output: {out}"))?;
    let _ = tb.wait_exit(holder, Duration::from_secs(90));
    // Past the HBONE pool's idle timeout (60 s, checked every 5 s): the
    // connections that carried the load close then.
    std::thread::sleep(Duration::from_secs(SOAK_SETTLE_SECS));
    let after = take(t0)?;

    let mut failures = Vec::new();
    // Past a quarter of the run (warm-up: the blocking pool grows, caches
    // fill), nothing may trend: each figure's mean over the last third of
    // the samples against the middle third's. Open connections go up and
    // down with what is in flight, so fds and map entries are taken beyond
    // the open connections.
    let warm = samples.len() / 4;
    let steady = &samples[warm.max(1)..];
    let bound = held as u64 + 2 * rate;
    let slack = 64.0 + rate as f64 / 10.0;
    for (i, name) in ["a", "b"].iter().enumerate() {
        let trend = |f: &dyn Fn(&Sample) -> f64| -> Option<(f64, f64)> {
            let v: Vec<f64> = steady.iter().map(|s| f(&s[i])).collect();
            let third = v.len() / 3;
            let mean = |w: &[f64]| w.iter().sum::<f64>() / w.len().max(1) as f64;
            (third > 0).then(|| (mean(&v[third..2 * third]), mean(&v[2 * third..])))
        };
        let mut check = |what: &str, f: &dyn Fn(&Sample) -> f64, allowed: &dyn Fn(f64) -> f64| {
            if let Some((middle, last)) = trend(f)
                && last > middle + allowed(middle)
            {
                failures.push(format!(
                    "{name}: {what} grew under steady load, mean {middle:.0} -> {last:.0}"
                ));
            }
        };
        check("RSS (KiB)", &|s| s.rss_kib as f64, &|m| m * 0.10);
        check(
            "fds beyond the open connections",
            &|s| s.fds as f64 - s.active_connections as f64,
            &|_| slack,
        );
        check(
            "kernel map entries beyond the open connections",
            &|s| (s.by_cookie + s.by_tuple) as f64 - s.active_connections as f64,
            &|_| slack,
        );
        check("threads", &|s| s.threads as f64, &|_| 8.0);
        let most = steady
            .iter()
            .map(|s| s[i].active_connections)
            .max()
            .unwrap_or(0);
        if most > bound {
            failures.push(format!("{name}: {most} open connections (bound {bound})"));
        }
        let end = after[i];
        if end.active_connections != 0 {
            failures.push(format!(
                "{name}: {} connections still open after the load",
                end.active_connections
            ));
        }
        if end.by_cookie + end.by_tuple > 16 {
            failures.push(format!(
                "{name}: {} kernel map entries left after the load",
                end.by_cookie + end.by_tuple
            ));
        }
        if end.fds > idle[i].fds + 16 {
            failures.push(format!(
                "{name}: {} fds after the load, {} idle",
                end.fds, idle[i].fds
            ));
        }
    }
    if load["errors"].as_u64() != Some(0) {
        failures.push(format!("new connections failed: {load}"));
    }
    let doc = json!({
        "date": today(),
        "secs": secs,
        "rate_per_sec": rate,
        "connections_held": held,
        "load": load,
        "agents": ["a (client side)", "b (server side)"],
        "idle": idle,
        "samples": samples,
        "after_settle": after,
        "rss_after_over_idle": [
            (after[0].rss_kib as f64 / idle[0].rss_kib as f64 * 100.0).round() / 100.0,
            (after[1].rss_kib as f64 / idle[1].rss_kib as f64 * 100.0).round() / 100.0,
        ],
        "failures": failures,
        "duration_secs": started.elapsed().as_secs(),
    });
    let out = write_json(root, &format!("{}-soak", today()), &doc)?;
    println!("written: {}", out.display());
    if !failures.is_empty() {
        bail!("soak failed:\n{}", failures.join("\n"));
    }
    println!("soak passed: {} s, {held} held, {rate}/s new, flat", secs);
    Ok(())
}

/// Bytes of each executable the stall check makes the agent hash.
const BIG_EXE: u64 = 1 << 30;

/// No stall: sockperf ping-pong through enforcer (an established
/// connection), alone and while new workloads (in bench-client.service)
/// whose executables are 1 GiB each connect (the agent hashes each, once, for its `unix:sha256`
/// selector), in ROUNDS rounds. The issue's bound: p99 under hashing within
/// 2x of p99 without. Written to bench/results/<date>-stall.json.
fn no_stall(bench: Bench, root: &Path, started: Instant) -> anyhow::Result<()> {
    // The interpreter itself, not a shim (pyenv's dispatches on its name).
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .context("python3 (cargo xtask setup installs it)")?;
    let python = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !python.is_file() {
        bail!("python3 did not name its executable: {out:?}");
    }
    let script = format!(
        "import socket; s = socket.create_connection(('{}', {ECHO}), timeout=30); s.sendall(b'ping\\n'); s.recv(5)",
        bench.b.ipv4
    );
    let mut rounds = vec![];
    let mut n = 0;
    for round in 0..ROUNDS {
        let (base50, base99) = bench.sockperf(Path_::Enforcer)?;
        // Fresh 1 GiB executables (sparse: python3, then zeros), so no
        // digest is cached; started one after another during the run.
        let mut bigs = vec![];
        for _ in 0..3 {
            n += 1;
            let big = bench.tb.dir.join(format!("big-{n}"));
            std::fs::copy(&python, &big)
                .with_context(|| format!("copying {}", python.display()))?;
            std::fs::File::options()
                .write(true)
                .open(&big)?
                .set_len(BIG_EXE)?;
            bigs.push(big);
        }
        let hashers = {
            let (a2, script) = (bench.a.clone(), script.clone());
            std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                let mut took = vec![];
                std::thread::sleep(Duration::from_millis(300));
                for big in bigs {
                    let t = Instant::now();
                    let (_, out) = a2.exec(
                        Some("bench-client.service"),
                        &[&big.display().to_string(), "-c", &script],
                    )?;
                    if !out.status.success() {
                        bail!("the 1 GiB workload failed: {out:?}");
                    }
                    took.push(t.elapsed().as_secs_f64());
                    let _ = std::fs::remove_file(&big);
                }
                Ok(took)
            })
        };
        let (load50, load99) = bench.sockperf(Path_::Enforcer)?;
        let took = hashers
            .join()
            .map_err(|_| anyhow::anyhow!("the hasher thread panicked"))??;
        eprintln!(
            "  stall round {round}: p50 {base50:.1} -> {load50:.1} us, p99 {base99:.1} -> {load99:.1} us; 1 GiB workloads connected in {took:.1?} s"
        );
        rounds.push(json!({
            "alone_us": {"p50": base50, "p99": base99},
            "while_hashing_us": {"p50": load50, "p99": load99},
            "p99_ratio": ((load99 / base99) * 100.0).round() / 100.0,
            "workload_connect_secs": took,
        }));
    }
    let mut ratios: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r["p99_ratio"].as_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let doc = json!({
        "date": today(),
        "executable_bytes": BIG_EXE,
        "rounds": rounds,
        "p99_ratio": {"min": ratios.first(), "median": ratios.get(ratios.len() / 2), "max": ratios.last()},
        "bound": 2.0,
        "duration_secs": started.elapsed().as_secs(),
    });
    let out = write_json(root, &format!("{}-stall", today()), &doc)?;
    println!("{}", serde_json::to_string_pretty(&doc)?);
    println!("written: {}", out.display());
    Ok(())
}
