//! The shipped deployment files: the systemd unit as systemd reads it, and
//! the agent's side of `Type=notify`.
use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use enforcer_tests::{Testbed, enforcer_bin};

fn unit() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/enforcer.service")
}

fn systemd_analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (Debian's systemd package: cargo xtask setup installs it)")
}

#[test]
fn systemd_unit_verifies_and_its_exposure_is_reported() {
    let dir = std::env::temp_dir().join(format!("enforcer-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // As installed: the binary at its ExecStart path (verify checks that
    // it exists), the slice beside it.
    let text = std::fs::read_to_string(unit()).expect("unit");
    assert!(
        text.contains("\nType=notify\n"),
        "the agent tells systemd when it is ready"
    );
    let installed = text.replace(
        "/usr/local/bin/enforcer",
        &enforcer_bin().display().to_string(),
    );
    let path = dir.join("enforcer.service");
    std::fs::write(&path, installed).expect("unit copy");
    std::fs::copy(
        unit().with_file_name("enforced.slice"),
        dir.join("enforced.slice"),
    )
    .expect("slice");
    let out = systemd_analyze(&["verify", &path.display().to_string()]);
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = systemd_analyze(&["security", "--offline=true", &unit().display().to_string()]);
    let report = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split("enforcer.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in: {report}"));
    eprintln!("systemd-analyze security: overall exposure {exposure} (0 safest, 10 unsafe)");
    // 9.7 ("UNSAFE") before the hardening; 3.9 with it.
    assert!(
        exposure <= 4.9,
        "the unit's exposure rose to {exposure}:\n{report}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn readiness_and_stopping_are_told_to_systemd() {
    // Type=notify: READY=1 once /readyz would answer 200, STOPPING=1 at
    // SIGTERM, over the datagram socket systemd names in NOTIFY_SOCKET.
    let (mut tb, a, _) = Testbed::linked_pair("sdnotify").expect("testbed");
    let sock_path = tb.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let cfg = tb.enforcer_config(&a, "").expect("config");
    let notify = sock_path.display().to_string();
    let ea = tb
        .start_enforcer_env(&a, &cfg, None, &[("NOTIFY_SOCKET", notify.as_str())])
        .expect("agent");
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("READY=1 within 20 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    let (code, _) = a.http_get(ea.metrics_addr, "/readyz").expect("readyz");
    assert_eq!(code, 200, "ready means /readyz says so");
    tb.signal(ea.pid, nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg:?}");
    let started = Instant::now();
    let status = tb.wait_exit(ea.pid, Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "exits 0 after SIGTERM ({:?}): {status:?}",
        started.elapsed()
    );
}
