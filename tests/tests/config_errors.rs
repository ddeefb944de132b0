//! Bad configuration: the agent exits non-zero with a message that names the
//! problem, and leaves nothing attached behind.
use std::{net::TcpListener, process::Command};

use enforcer_tests::{Testbed, enforcer_bin};

fn run_enforcer(netns: Option<&str>, config: &std::path::Path) -> (i32, String) {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(enforcer_bin());
            c
        }
        None => Command::new(enforcer_bin()),
    };
    let out = cmd
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run enforcer");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `RUST_BACKTRACE=1` asks for panics' backtraces. Errors capture none
/// (each capture slowed the policy engine, which builds errors on ordinary
/// lookups), so an error exit prints its message without a stack trace —
/// unless `RUST_LIB_BACKTRACE=1` asks for errors' traces too. Before, the
/// first case printed one.
#[test]
fn rust_backtrace_gives_errors_no_stack_trace_unless_asked() {
    let missing = std::env::temp_dir().join(format!(
        "enforcer-no-such-config-{}.toml",
        std::process::id()
    ));
    let run = |lib: Option<&str>| {
        let mut cmd = Command::new(enforcer_bin());
        cmd.args(["check", "--config"])
            .arg(&missing)
            .env("RUST_BACKTRACE", "1")
            .env_remove("RUST_LIB_BACKTRACE");
        if let Some(v) = lib {
            cmd.env("RUST_LIB_BACKTRACE", v);
        }
        let out = cmd.output().expect("run enforcer");
        assert!(!out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let plain = run(None);
    assert!(plain.contains("no-such-config"), "{plain}");
    assert!(!plain.contains("Stack backtrace"), "{plain}");
    let asked = run(Some("1"));
    assert!(asked.contains("Stack backtrace"), "{asked}");
}

#[test]
fn bad_configs_exit_nonzero_naming_the_problem() {
    let mut tb = Testbed::new("badcfg").expect("testbed");
    let a = tb.node("a", 1).expect("node");
    let cg = a.cgroup.display().to_string();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown key",
            format!("[capture]\ncgroup = \"{cg}\"\ncaptur_ports = [1]\n"),
            vec!["captur_ports"],
        ),
        (
            "unknown section",
            format!("[capture]\ncgroup = \"{cg}\"\n[admn]\n"),
            vec!["admn"],
        ),
        (
            "bad CIDR",
            format!("[capture]\ncgroup = \"{cg}\"\ncidrs = [\"10.0.0.300/8\"]\n"),
            vec!["capture.cidrs", "10.0.0.300/8"],
        ),
        (
            "bad port range",
            format!("[capture]\ncgroup = \"{cg}\"\nports = [\"80-70\"]\n"),
            vec!["capture.ports", "80-70"],
        ),
        (
            "missing cgroup",
            "[capture]\ncgroup = \"/sys/fs/cgroup/does/not/exist\"\n".into(),
            vec!["capture.cgroup", "/sys/fs/cgroup/does/not/exist"],
        ),
        (
            "not a cgroup",
            "[capture]\ncgroup = \"/tmp\"\n".into(),
            vec!["capture.cgroup", "/tmp", "cgroup v2"],
        ),
        (
            "root cgroup",
            format!(
                "[capture]\ncgroup = \"{}\"\n",
                enforcer_tests::cgroup2_mount().expect("cgroup2").display()
            ),
            vec!["root of the cgroup2 hierarchy"],
        ),
        (
            "bad audit_on_failure",
            format!("[capture]\ncgroup = \"{cg}\"\n[policy]\naudit_on_failure = \"block\"\n"),
            vec!["audit_on_failure", "block"],
        ),
        (
            "too many worker threads",
            format!("[capture]\ncgroup = \"{cg}\"\n[runtime]\nworker_threads = 5000\n"),
            vec!["runtime.worker_threads"],
        ),
        (
            "malformed TOML",
            "[capture\ncgroup = 1".into(),
            vec!["invalid config file"],
        ),
        (
            "missing capture section",
            "node_name = \"x\"\n".into(),
            vec!["capture"],
        ),
    ];
    for (what, text, needles) in cases {
        let path = tb.dir.join("bad.toml");
        std::fs::write(&path, text).expect("write");
        let (code, stderr) = run_enforcer(Some(&a.netns), &path);
        assert_ne!(code, 0, "{what}: must exit non-zero");
        for n in needles {
            assert!(
                stderr.contains(n),
                "{what}: message should name {n:?}: {stderr}"
            );
        }
        assert!(
            !stderr.contains("panicked"),
            "{what}: must not panic: {stderr}"
        );
    }
    let (code, stderr) = run_enforcer(None, &tb.dir.join("does-not-exist.toml"));
    assert_ne!(code, 0);
    assert!(stderr.contains("does-not-exist.toml"), "{stderr}");
}

#[test]
fn port_in_use_exits_nonzero_and_attaches_nothing() {
    let mut tb = Testbed::new("portuse").expect("testbed");
    let a = tb.node("a", 1).expect("node");
    let cfg = tb.enforcer_config(&a, "").expect("config");
    for (port, key) in [
        (15001u16, "capture.outbound_port"),
        (15020, "admin.metrics_addr"),
    ] {
        // Hold the port inside the node's netns while the enforcer starts.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let a = a.clone();
            std::thread::spawn(move || {
                a.in_netns(move || {
                    let l = TcpListener::bind(("127.0.0.1", port)).expect("bind holder");
                    tx.send(()).expect("signal");
                    let _ = done_rx.recv();
                    drop(l);
                })
            })
        };
        rx.recv().expect("holder bound");
        let (code, stderr) = run_enforcer(Some(&a.netns), &cfg);
        done_tx.send(()).expect("release");
        holder.join().expect("holder").expect("netns");
        assert_ne!(code, 0, "port {port} in use must fail");
        assert!(
            stderr.contains(&format!("127.0.0.1:{port}")) && stderr.contains(key),
            "{stderr}"
        );
        let pins = format!("/sys/fs/bpf/enforcer/v2/{}", tb.node_instance(&a));
        assert!(
            !std::path::Path::new(&pins).exists(),
            "nothing may be attached when startup fails"
        );
    }
}

#[test]
fn check_subcommand_validates_without_running() {
    let mut tb = Testbed::new("check").expect("testbed");
    let a = tb.node("a", 1).expect("node");
    let cfg = tb.enforcer_config(&a, "").expect("config");
    let out = Command::new(enforcer_bin())
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("check");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

/// `enforcer check` on a config, in the host netns: (exit code, stderr).
fn check(config: &std::path::Path) -> (i32, String) {
    let out = Command::new(enforcer_bin())
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_refuses_exactly_what_run_refuses() {
    // Each of these passed `enforcer check` while `enforcer run` refused it
    // (or panicked a worker on the first connect).
    let mut tb = Testbed::new("checkrun").expect("testbed");
    let a = tb.node("a", 1).expect("node");
    let mount = enforcer_tests::cgroup2_mount().expect("cgroup2");
    let cg = a.cgroup.display().to_string();
    let bad_policy = tb.dir.join("bad-policy");
    std::fs::create_dir_all(&bad_policy).expect("dir");
    std::fs::write(
        bad_policy.join("p.rego"),
        "package enforcer.authz\n\nallow if {\n",
    )
    .expect("rego");
    let audit = tb.dir.join("audit.jsonl").display().to_string();
    let state = tb.dir.join("state").display().to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "root of the cgroup2 hierarchy",
            format!("[capture]\ncgroup = \"{}\"\n", mount.display()),
            "root of the cgroup2 hierarchy",
        ),
        (
            "a path that climbs to the root with ..",
            format!("[capture]\ncgroup = \"{cg}/../../\"\n"),
            "root of the cgroup2 hierarchy",
        ),
        (
            "/proc",
            "[capture]\ncgroup = \"/proc\"\n".into(),
            "cgroup v2",
        ),
        (
            "a missing cgroup",
            format!("[capture]\ncgroup = \"{cg}/nope\"\n"),
            "capture.cgroup",
        ),
        (
            "an over-long node_name",
            format!(
                "node_name = \"{}\"\n[capture]\ncgroup = \"{cg}\"\n",
                "n".repeat(300)
            ),
            "node_name",
        ),
        (
            "an SVID lifetime that overflows the clock",
            format!(
                "[capture]\ncgroup = \"{cg}\"\n[identity]\nsvid_ttl_secs = 9223372036854775807\n"
            ),
            "identity.svid_ttl_secs",
        ),
        (
            "a policy that does not compile",
            format!(
                "[capture]\ncgroup = \"{cg}\"\n[policy]\nsource = \"{}\"\naudit_log = \"{audit}\"\n",
                bad_policy.display()
            ),
            "p.rego",
        ),
    ];
    for (what, text, needle) in cases {
        // The embedded CA's state stays in the testbed's directory.
        let text = if text.contains("[identity]\n") {
            text.replacen(
                "[identity]\n",
                &format!("[identity]\nstate_dir = \"{state}\"\n"),
                1,
            )
        } else {
            format!("{text}\n[identity]\nstate_dir = \"{state}\"\n")
        };
        let path = tb.dir.join("case.toml");
        std::fs::write(&path, &text).expect("write");
        let (code, checked) = check(&path);
        assert_ne!(code, 0, "check accepted {what}:\n{text}");
        assert!(checked.contains(needle), "check, {what}: {checked}");
        let (code, ran) = run_enforcer(Some(&a.netns), &path);
        assert_ne!(code, 0, "run accepted {what}");
        assert!(ran.contains(needle), "run, {what}: {ran}");
    }
}
