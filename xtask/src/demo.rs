//! `cargo xtask demo`: two nodes on this machine (network namespaces joined by
//! a veth pair), the enforcer on node a, an HTTP server on node b, unmodified
//! clients on node a. Prints what was captured and a metrics excerpt, then
//! removes everything it created.
use anyhow::{Context as _, bail};
use enforcer_tests::{Node, Testbed};

fn exec(node: &Node, unit: Option<&str>, cmd: &[&str]) -> anyhow::Result<(u32, String, bool)> {
    let (pid, out) = node.exec(unit, cmd)?;
    let text = if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    } else {
        String::from_utf8_lossy(&out.stderr).trim().to_owned()
    };
    Ok((pid, text, out.status.success()))
}

pub fn run() -> anyhow::Result<()> {
    let mut tb = Testbed::new("demo").context("building the demo testbed (needs root)")?;
    let a = tb.node("a", 1)?;
    let b = tb.node("b", 2)?;
    tb.link(&a, &b)?;
    tb.start_server(
        &b,
        "http",
        &["python3", "-m", "http.server", "8080", "--bind", "::"],
        8080,
    )?;
    let cfg = tb.enforcer_config(&a, "")?;
    let enf = tb.start_enforcer(&a, &cfg)?;

    println!();
    println!("enforcer demo: two nodes on this machine; no traffic leaves it");
    println!(
        "  node a {} / {}  <── veth ──>  node b {} / {}",
        a.ipv4, a.ipv6, b.ipv4, b.ipv6
    );
    println!(
        "  enforcer (pid {}) on node a captures the cgroup subtree {}",
        enf.pid,
        a.cgroup.display()
    );
    println!("  python3 http.server on node b, port 8080");
    println!();

    let url4 = format!("http://{}:8080/", b.ipv4);
    let (_, r, ok) = exec(
        &a,
        Some("support-agent.service"),
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "HTTP %{http_code}, peer %{remote_ip}",
            &url4,
        ],
    )?;
    println!("1. curl in a/support-agent.service     -> {url4:<22} {r}");
    if !ok {
        bail!("the captured curl failed: {r}");
    }
    let py = "import socket,sys; s=socket.create_connection((sys.argv[1],8080)); p=s.getpeername()[:2]; s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); r=s.recv(64).split(b'\\r\\n')[0].decode(); print(r+', getpeername() =', p)";
    let (_, r, _) = exec(
        &a,
        Some("py-client.service"),
        &["python3", "-c", py, &b.ipv6],
    )?;
    println!(
        "2. python3 in a/py-client.service      -> [{}]:8080     {r}",
        b.ipv6
    );
    let (_, r, _) = exec(
        &a,
        None,
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "HTTP %{http_code}",
            &url4,
        ],
    )?;
    println!("3. curl outside the captured subtree   -> {url4:<22} {r} (not captured)");
    println!();

    println!("Captured connections (one JSON log line each in the enforcer's log):");
    let wanted = 2;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while enf.closed_connections().len() < wanted && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for c in enf.closed_connections() {
        println!(
            "  conn {:<3} pid {:<7} uid {:<5} {:<8} cgroup {}\n           -> {:<18} sent {} B, received {} B, {} ms, outcome {}",
            c["conn_id"],
            c["pid"],
            c["uid"],
            c["comm"].as_str().unwrap_or("?"),
            c["cgroup"].as_str().unwrap_or("?"),
            c["orig_dst"].as_str().unwrap_or("?"),
            c["bytes_sent"],
            c["bytes_received"],
            c["duration_ms"],
            c["outcome"].as_str().unwrap_or("?"),
        );
    }
    println!();
    println!(
        "Metrics excerpt (GET http://{}/metrics inside node a):",
        enf.metrics_addr
    );
    for line in enf
        .metrics()?
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        println!("  {line}");
    }
    println!();

    tb.stop(enf.pid)?;
    let (_, r, ok) = exec(
        &a,
        Some("support-agent.service"),
        &["curl", "-sS", "-o", "/dev/null", &url4],
    )?;
    println!(
        "4. enforcer stopped: captured curl     -> {url4:<22} {}",
        if ok {
            "CONNECTED (unexpected!)".to_owned()
        } else {
            format!("refused: {r}")
        }
    );
    println!(
        "   (programs stay pinned, so captured connects fail closed; `enforcer detach --config FILE` removes them)"
    );
    if ok {
        bail!("a captured connect got through while the enforcer was stopped");
    }
    println!();
    println!("Cleaning up namespaces, cgroups and pins.");
    drop(tb);
    Ok(())
}
