//! OPA/Rego policy on every connection: the shipped policy, reload, dry-run,
//! fail-closed errors, bundles, the audit log and the CLI.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use enforcer_tests::{MESH, Node, Pair, Testbed, enforcer_bin, entry, llm_pair};
use serde_json::Value;

const TD: &str = "ai.example.org";
const AGENT: &str = "spiffe://ai.example.org/agent/support";
const RESEARCH: &str = "spiffe://ai.example.org/sandbox/research-agent";
const LLM: &str = "spiffe://ai.example.org/llm";

fn shipped_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// a (two agents) -> b (the LLM on 8080), both under `policy` (a [policy]
/// section body, given the node) and a shared CA.
fn pair(test: &str, policy: impl Fn(&Testbed, &Node) -> String) -> Pair {
    llm_pair(test, TD, |tb, n| {
        let entries = if n.name == "a" {
            entry(AGENT, "systemd:unit:support-agent.service")
                + &entry(RESEARCH, "systemd:unit:research-agent.service")
        } else {
            entry(LLM, "systemd:unit:llm.service")
        };
        (String::new(), format!("{}\n{entries}{MESH}", policy(tb, n)))
    })
    .expect("two nodes")
}

fn shipped(tb: &Testbed, n: &Node) -> String {
    tb.policy_section(n, &shipped_policies().display().to_string())
}

fn curl(node: &Node, unit: &str, url: &str) -> (u32, String) {
    let (pid, out) = node
        .exec(
            Some(unit),
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                url,
            ],
        )
        .expect("curl");
    (pid, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn audit(tb: &Testbed, n: &Node) -> Vec<Value> {
    enforcer_tests::settle_logs();
    std::fs::read_to_string(tb.audit_log(n))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}"))
        })
        .collect()
}

/// `e` logged that it rejected a policy, with an error containing `needle`.
fn rejected_with(e: &enforcer_tests::Enforcer, needle: &str) -> bool {
    e.log_lines().iter().any(|v| {
        v["message"] == "policy rejected; the previous policy stays in force"
            && v["error"].as_str().is_some_and(|m| m.contains(needle))
    })
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn shipped_policy_allows_the_agent_and_denies_another_identity_with_an_audit_trail() {
    let p = pair("polship", shipped);
    // The shipped policy is decided by the default evaluator, on both agents.
    for e in [&p.ea, &p.eb] {
        assert!(
            e.log_lines()
                .iter()
                .any(|v| v["message"] == "policy loaded" && v["engine"] == "interpreter"),
            "no `policy loaded` line with engine interpreter"
        );
    }
    let url = format!("http://{}:8080/?from-agent", p.b.ipv4);
    let (pid, code) = curl(&p.a, "support-agent.service", &url);
    assert_eq!(code, "200");
    let l = p.ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(l["policy_reason"], "allowed: agent -> LLM", "{l}");

    let (pid, code) = curl(
        &p.a,
        "research-agent.service",
        &format!("http://{}:8080/?from-research", p.b.ipv4),
    );
    assert_ne!(code, "200");
    let l = p.ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(l["outcome"], "denied", "{l}");
    assert!(!p.tb.server_log(&p.b, "llm").contains("from-research"));

    // a's audit: OPA decision-log shape, the verified destination identity.
    let a_audit = audit(&p.tb, &p.a);
    let denied = a_audit
        .iter()
        .find(|r| r["input"]["source"]["spiffe_id"] == RESEARCH)
        .expect("a audited the research agent's decision");
    for key in [
        "decision_id",
        "labels",
        "timestamp",
        "path",
        "input",
        "result",
        "metrics",
        "conn_id",
    ] {
        assert!(!denied[key].is_null(), "audit line lacks {key}: {denied}");
    }
    assert_eq!(denied["path"], "enforcer/authz/allow");
    assert_eq!(
        denied["labels"]["node"],
        p.tb.node_instance(&p.a),
        "{denied}"
    );
    assert!(denied["labels"]["id"].is_string() && denied["labels"]["version"].is_string());
    assert!(
        denied["metrics"]["timer_rego_query_eval_ns"]
            .as_u64()
            .is_some_and(|n| n > 0)
    );
    assert_eq!(denied["result"], false);
    assert_eq!(denied["input"]["direction"], "outbound");
    assert_eq!(
        denied["input"]["destination"]["spiffe_id"], LLM,
        "verified destination identity: {denied}"
    );
    assert_eq!(denied["input"]["destination"]["port"], 8080);
    assert_eq!(denied["input"]["protocol"], "tcp");
    assert!(
        denied["input"]["source"]["selectors"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == "systemd:unit:research-agent.service"))
    );
    // b's audit: the authoritative inbound decision for the allowed agent.
    wait_until("b audits the agent", 5, || {
        audit(&p.tb, &p.b)
            .iter()
            .any(|r| r["input"]["source"]["spiffe_id"] == AGENT)
    });
    let b_audit = audit(&p.tb, &p.b);
    let allowed = b_audit
        .iter()
        .find(|r| r["input"]["source"]["spiffe_id"] == AGENT)
        .expect("b audit");
    assert_eq!(allowed["input"]["direction"], "inbound");
    assert_eq!(allowed["input"]["source"]["authenticated"], true);
    assert_eq!(allowed["input"]["destination"]["spiffe_id"], LLM);
    assert_eq!(allowed["result"], true);

    // Metrics by result and identity.
    let m = p.ea.metrics().expect("metrics");
    assert_eq!(
        enforcer_tests::sum_metric(
            &m,
            "enforcer_policy_decisions_total",
            &[
                ("result", "deny"),
                ("source", RESEARCH),
                ("destination", LLM)
            ]
        ),
        1.0,
        "{m}"
    );
    assert!(
        enforcer_tests::sum_metric(&m, "enforcer_policy_evaluation_seconds_count", &[]) >= 2.0,
        "{m}"
    );
}

#[test]
fn inbound_side_is_authoritative_even_when_the_source_allows() {
    // a allows everything; b runs the shipped policy and refuses the research agent.
    let p = pair("polinb", |tb, n| {
        if n.name == "a" {
            tb.policy_section(
                n,
                &tb.allow_all_policy()
                    .expect("allow-all")
                    .display()
                    .to_string(),
            )
        } else {
            shipped(tb, n)
        }
    });
    let (pid, code) = curl(
        &p.a,
        "research-agent.service",
        &format!("http://{}:8080/?sneak", p.b.ipv4),
    );
    assert_ne!(code, "200");
    let l = p.ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(l["outcome"], "tunnel_failed", "{l}");
    let inbound =
        p.eb.connection_line(|v| v["direction"] == "inbound" && v["outcome"] == "denied");
    assert_eq!(inbound["src_spiffe_id"], RESEARCH, "{inbound}");
    assert!(!p.tb.server_log(&p.b, "llm").contains("sneak"));
}

fn write_policy(dir: &Path, rego: &str) {
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(dir.join("authz.rego"), rego).expect("write");
}

#[test]
fn policy_reload_applies_within_two_seconds_and_a_broken_policy_is_rejected() {
    let p = pair("polreload", |tb, n| {
        let dir = tb.dir.join(format!("policy-{}", n.name));
        write_policy(
            &dir,
            "package enforcer.authz\nimport rego.v1\ndefault allow := false\n",
        );
        tb.policy_section(n, &dir.display().to_string())
    });
    let url = format!("http://{}:8080/", p.b.ipv4);
    assert_ne!(
        curl(&p.a, "support-agent.service", &url).1,
        "200",
        "deny-all to start with"
    );

    let allow = "package enforcer.authz\nimport rego.v1\ndefault allow := false\nallow if input.source.spiffe_id == \"spiffe://ai.example.org/agent/support\"\n";
    for n in [&p.a, &p.b] {
        write_policy(&p.tb.dir.join(format!("policy-{}", n.name)), allow);
    }
    let changed = Instant::now();
    wait_until("the new policy applies", 2, || {
        curl(&p.a, "support-agent.service", &url).1 == "200"
    });
    assert!(changed.elapsed() < Duration::from_secs(2));

    // A policy that does not compile: rejected, counted, the previous stays.
    write_policy(
        &p.tb.dir.join("policy-a"),
        "package enforcer.authz\nallow if {{{ broken\n",
    );
    wait_until("rejection counted", 5, || {
        p.ea.metric("enforcer_policy_reloads_total", &[("result", "rejected")])
            .unwrap_or(0.0)
            == 1.0
    });
    assert!(rejected_with(&p.ea, "authz.rego"));
    assert_eq!(
        curl(&p.a, "support-agent.service", &url).1,
        "200",
        "the previous policy is still in force"
    );
}

#[test]
fn dry_run_allows_and_logs_would_deny() {
    let p = pair("poldry", |tb, n| {
        let dir = tb.dir.join(format!("policy-{}", n.name));
        write_policy(
            &dir,
            "package enforcer.authz\nimport rego.v1\ndefault allow := false\nreason := \"nothing is allowed\"\n",
        );
        format!(
            "{}mode = \"dry-run\"\n",
            tb.policy_section(n, &dir.display().to_string())
        )
    });
    let (pid, code) = curl(
        &p.a,
        "support-agent.service",
        &format!("http://{}:8080/", p.b.ipv4),
    );
    assert_eq!(code, "200", "dry-run lets the connection through");
    assert_eq!(p.ea.connection_line(|v| v["pid"] == pid)["outcome"], "ok");
    assert!(
        p.ea.log_lines()
            .iter()
            .any(|v| v["message"] == "would deny (dry-run): allowing")
    );
    let rec = audit(&p.tb, &p.a).into_iter().next().expect("audit");
    assert_eq!(rec["result"], false);
    assert_eq!(rec["reason"], "nothing is allowed");
    assert_eq!(rec["enforced"], false);
    assert_eq!(
        p.ea.metric(
            "enforcer_policy_decisions_total",
            &[("result", "would_deny")]
        )
        .expect("m"),
        1.0
    );
}

#[test]
fn evaluation_error_and_missing_policy_deny() {
    // `allow` gets two different values: an evaluation error, which must deny.
    let p = pair("polerr", |tb, n| {
        if n.name == "a" {
            let dir = tb.dir.join("policy-conflict");
            write_policy(
                &dir,
                "package enforcer.authz\nimport rego.v1\nallow := true if input.protocol == \"tcp\"\nallow := false if input.direction == \"outbound\"\n",
            );
            tb.policy_section(n, &dir.display().to_string())
        } else {
            tb.policy_section(
                n,
                &tb.allow_all_policy().expect("allow").display().to_string(),
            )
        }
    });
    let (pid, code) = curl(
        &p.a,
        "support-agent.service",
        &format!("http://{}:8080/", p.b.ipv4),
    );
    assert_ne!(code, "200");
    assert_eq!(
        p.ea.connection_line(|v| v["pid"] == pid)["outcome"],
        "denied"
    );
    assert!(
        p.ea.log_lines()
            .iter()
            .any(|v| v["message"] == "policy evaluation failed; denying")
    );
    // The decision log says so as OPA does: an error object, no result.
    let rec = audit(&p.tb, &p.a).into_iter().next().expect("audit");
    assert!(rec.get("result").is_none(), "{rec}");
    assert_eq!(rec["error"]["code"], "eval_conflict_error", "{rec}");
    assert!(
        rec["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{rec}"
    );
    assert_eq!(
        p.ea.metric("enforcer_policy_decisions_total", &[("result", "error")])
            .expect("m"),
        1.0
    );

    // No policy at all (policy.source = ""): everything is denied.
    let mut tb = p.tb;
    let c = tb.shared_ca("nopol", TD).expect("ca");
    let cfg = tb
        .enforcer_config_with(
            &p.a,
            "",
            &c,
            &format!(
                "[policy]\nsource = \"\"\naudit_log = \"{}\"\n{}",
                tb.audit_log(&p.a).display(),
                entry(AGENT, "systemd:unit:support-agent.service")
            ),
        )
        .expect("cfg");
    tb.stop(p.ea.pid).expect("stop a");
    let ea = tb
        .start_enforcer(&p.a, &cfg)
        .expect("restart a without policy");
    let (pid, code) = curl(
        &p.a,
        "support-agent.service",
        &format!("http://{}:8080/", p.b.ipv4),
    );
    assert_ne!(code, "200");
    let l = ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(l["outcome"], "denied");
    assert_eq!(l["policy_reason"], "no policy loaded");
}

#[test]
fn repeated_decisions_come_from_the_cache() {
    let p = pair("polcache", shipped);
    let url = format!("http://{}:8080/", p.b.ipv4);
    for _ in 0..3 {
        assert_eq!(curl(&p.a, "support-agent.service", &url).1, "200");
    }
    let recs: Vec<Value> = audit(&p.tb, &p.a)
        .into_iter()
        .filter(|r| r["input"]["source"]["spiffe_id"] == AGENT)
        .collect();
    assert_eq!(recs.len(), 3, "every decision is audited, cached or not");
    assert_eq!(recs.iter().filter(|r| r["cached"] == true).count(), 2);
    assert_eq!(
        p.ea.metric("enforcer_policy_evaluation_seconds_count", &[])
            .expect("m"),
        1.0,
        "only the first decision was evaluated"
    );
}

/// Writes `files` as a gzip'd tar (an OPA bundle) with Python's tarfile.
fn make_bundle(out: &Path, root: &Path) {
    let st = Command::new("python3")
        .args(["-c", "import sys,tarfile\nwith tarfile.open(sys.argv[1],'w:gz') as t: t.add(sys.argv[2], arcname='.')", &out.display().to_string(), &root.display().to_string()])
        .status()
        .expect("python3");
    assert!(st.success());
}

#[test]
fn opa_bundles_from_a_file_and_from_http_with_etag() {
    let p = pair("polbundle", |tb, n| {
        let root = tb.dir.join("bundle-src");
        bundle_source(&root);
        let bundle = tb.dir.join("bundle.tar.gz");
        make_bundle(&bundle, &root);
        if n.name == "a" {
            tb.policy_section(n, "http://127.0.0.1:8181/bundles/enforcer.tar.gz")
        } else {
            tb.policy_section(n, &bundle.display().to_string())
        }
    });
    // a fetches its bundle over HTTP (from inside its netns).
    let bundle = p.tb.dir.join("bundle.tar.gz").display().to_string();
    let mut tb = p.tb;
    tb.spawn(
        &p.a,
        None,
        "bundle-server",
        &[
            "python3",
            "-u",
            &helper("bundle_server.py"),
            &bundle,
            "8181",
        ],
    )
    .expect("bundle server");
    wait_until("a loads the bundle from the URL", 10, || {
        p.ea.log_lines()
            .iter()
            .any(|v| v["message"] == "policy reloaded")
    });
    let url = format!("http://{}:8080/", p.b.ipv4);
    assert_eq!(curl(&p.a, "support-agent.service", &url).1, "200");
    assert_ne!(curl(&p.a, "research-agent.service", &url).1, "200");
    // Polls after the first use If-None-Match and get 304s.
    std::thread::sleep(Duration::from_millis(800));
    let log = tb.server_log(&p.a, "bundle-server");
    assert_eq!(log.lines().filter(|l| *l == "200").count(), 1, "{log}");
    assert!(log.lines().filter(|l| *l == "304").count() >= 2, "{log}");
    // b loaded the same bundle from a file.
    assert!(
        audit(&tb, &p.b)
            .iter()
            .any(|r| r["result"] == true && r["input"]["source"]["spiffe_id"] == AGENT)
    );
}

/// `enforcer policy eval` with `extra` arguments, on `policy` and `input`.
fn eval(extra: &[&str], policy: &Path, input: &Path) -> std::process::Output {
    Command::new(enforcer_bin())
        .args(["policy", "eval"])
        .args(extra)
        .arg("--policy")
        .arg(policy)
        .arg("--input")
        .arg(input)
        .output()
        .expect("eval")
}

#[test]
fn policy_cli_eval_and_test() {
    let dir = std::env::temp_dir().join(format!("enforcer-policy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let input = dir.join("input.json");
    std::fs::write(&input, format!("{{\"direction\":\"inbound\",\"source\":{{\"spiffe_id\":\"{RESEARCH}\",\"authenticated\":true}},\"destination\":{{\"spiffe_id\":\"{LLM}\",\"port\":8000}},\"protocol\":\"tcp\"}}")).expect("input");
    let out = eval(&[], &shipped_policies(), &input);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON decision");
    assert_eq!(v["allow"], false);
    assert_eq!(
        v["reason"],
        "denied: only identities under the agent prefix may call the LLM"
    );
    assert_eq!(
        v["engine"], "interpreter",
        "the default evaluator is the interpreter (the one tested against OPA)"
    );
    // The opt-in VM decides the same on the shipped policy.
    let out = eval(&["--engine", "vm"], &shipped_policies(), &input);
    assert!(out.status.success(), "{out:?}");
    let w: Value = serde_json::from_slice(&out.stdout).expect("JSON decision");
    assert_eq!(w["engine"], "vm");
    assert_eq!((&w["allow"], &w["reason"]), (&v["allow"], &v["reason"]));
    let out = eval(&["--engine", "jit"], &shipped_policies(), &input);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected `vm` or `interpreter`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(enforcer_bin())
        .args(["policy", "test", "--policy"])
        .arg(shipped_policies())
        .output()
        .expect("test");
    assert!(
        out.status.success(),
        "shipped policy tests: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("PASS: 27/27"));

    // A failing test fails the command.
    let bad = dir.join("bad");
    write_policy(
        &bad,
        "package enforcer.authz\nimport rego.v1\ndefault allow := false\ntest_allows if { allow with input as {} }\n",
    );
    let out = Command::new(enforcer_bin())
        .args(["policy", "test", "--policy"])
        .arg(&bad)
        .output()
        .expect("test");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL: data.enforcer.authz.test_allows"));
    // A policy that does not compile: a clear error naming the file.
    write_policy(&bad, "package enforcer.authz\nallow if {{\n");
    let out = eval(&[], &bad, &input);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("authz.rego"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shipped_daemonset_policy_volume_loads_the_shipped_policy_as_the_repository_does() {
    // The shipped DaemonSet mounts the policy ConfigMap. Lay the volume out
    // exactly as the kubelet does from the manifest's `items` (a timestamped
    // directory, `..data` pointing at it, a symlink per top-level entry) and
    // check that the agent decides as it does from the repository directory:
    // a flat mount had put data.json at `data.ai` and denied everything.
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/enforcer.yaml"),
    )
    .expect("manifest");
    let items: Vec<(String, String)> = manifest
        .lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("- {key: ")?;
            let (key, rest) = l.split_once(", path: ")?;
            Some((key.to_owned(), rest.trim_end_matches('}').to_owned()))
        })
        .collect();
    for f in std::fs::read_dir(shipped_policies().join("enforcer")).expect("policies") {
        let name = f.expect("entry").file_name().to_string_lossy().into_owned();
        assert!(
            items
                .iter()
                .any(|(k, p)| *k == name && *p == format!("enforcer/{name}")),
            "the manifest's policy volume does not map {name} to enforcer/{name}: {items:?}"
        );
    }
    let root = std::env::temp_dir().join(format!("enforcer-cm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let stamp = root.join("..2026_11_24_07_00_00.000000001");
    for (key, path) in &items {
        let dst = stamp.join(path);
        std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
        std::fs::copy(shipped_policies().join("enforcer").join(key), &dst).expect("copy");
    }
    std::os::unix::fs::symlink("..2026_11_24_07_00_00.000000001", root.join("..data"))
        .expect("..data");
    std::os::unix::fs::symlink("..data/enforcer", root.join("enforcer")).expect("enforcer");

    let input = root.join("..input.json");
    std::fs::write(&input, format!("{{\"direction\":\"inbound\",\"source\":{{\"spiffe_id\":\"{AGENT}\",\"authenticated\":true}},\"destination\":{{\"spiffe_id\":\"{LLM}\",\"port\":8000}},\"protocol\":\"tcp\"}}")).expect("input");
    for policy in [shipped_policies(), root.clone()] {
        let out = eval(&[], &policy, &input);
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).expect("JSON decision");
        assert_eq!(v["allow"], true, "{}: {v}", policy.display());
    }
    let _ = std::fs::remove_dir_all(&root);
}

fn helper(name: &str) -> String {
    format!("{}/helpers/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shipped policy as a bundle source directory (`enforcer/…`).
fn bundle_source(root: &Path) {
    std::fs::create_dir_all(root.join("enforcer")).expect("dir");
    for f in ["authz.rego", "data.json"] {
        std::fs::copy(
            shipped_policies().join("enforcer").join(f),
            root.join("enforcer").join(f),
        )
        .expect("copy");
    }
}

/// A signed bundle of the shipped policy (OPA's format, signed by the
/// independent Python signer with an RSA key made by openssl), served over
/// HTTPS with a bearer token; then a tampered bundle and an unsigned one,
/// both refused while the signed policy stays in force.
#[test]
fn signed_bundle_over_https_with_a_token_and_tampered_bundles_refused() {
    let p = pair("polsigned", |tb, n| {
        let d = &tb.dir;
        if n.name != "a" {
            return shipped(tb, n);
        }
        run_ok(
            Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                ])
                .arg(d.join("sign.key")),
        );
        run_ok(
            Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(d.join("sign.key"))
                .arg("-out")
                .arg(d.join("sign.pub")),
        );
        // A CA (the ca_cert file) and the bundle server's certificate for 127.0.0.1.
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run_ok(
            Command::new("openssl")
                .args(["req", "-x509"])
                .args(ec)
                .args(["-days", "1", "-subj", "/CN=bundle-ca", "-keyout"])
                .arg(d.join("ca.key"))
                .arg("-out")
                .arg(d.join("ca.pem")),
        );
        run_ok(
            Command::new("openssl")
                .arg("req")
                .args(ec)
                .args(["-subj", "/CN=bundles", "-keyout"])
                .arg(d.join("srv.key"))
                .arg("-out")
                .arg(d.join("srv.csr")),
        );
        std::fs::write(
            d.join("srv.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .expect("ext");
        run_ok(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "1", "-in"])
                .arg(d.join("srv.csr"))
                .arg("-CA")
                .arg(d.join("ca.pem"))
                .arg("-CAkey")
                .arg(d.join("ca.key"))
                .arg("-CAcreateserial")
                .arg("-extfile")
                .arg(d.join("srv.ext"))
                .arg("-out")
                .arg(d.join("srv.pem")),
        );
        std::fs::write(d.join("token"), "s3cret\n").expect("token");
        let src = d.join("bundle-src");
        bundle_source(&src);
        run_ok(
            Command::new("python3")
                .arg(helper("opa_bundle.py"))
                .arg(&src)
                .arg(d.join("signed.tar.gz"))
                .args(["--revision", "rev-1", "--roots", "enforcer", "--key"])
                .arg(d.join("sign.key")),
        );
        run_ok(
            Command::new("python3")
                .arg(helper("opa_bundle.py"))
                .arg(&src)
                .arg(d.join("tampered.tar.gz"))
                .args([
                    "--revision",
                    "rev-1",
                    "--roots",
                    "enforcer",
                    "--tamper",
                    "enforcer/authz.rego",
                    "--key",
                ])
                .arg(d.join("sign.key")),
        );
        run_ok(
            Command::new("python3")
                .arg(helper("opa_bundle.py"))
                .arg(&src)
                .arg(d.join("unsigned.tar.gz"))
                .args(["--revision", "rev-2", "--roots", "enforcer"]),
        );
        std::fs::copy(d.join("signed.tar.gz"), d.join("served.tar.gz")).expect("serve");
        format!(
            "{}\n[policy.bundle]\nname = \"authz\"\nrequire_signature = true\nca_cert = \"{}\"\nbearer_token_file = \"{}\"\n\n[policy.keys.release]\nalgorithm = \"RS256\"\nkey_file = \"{}\"\n",
            tb.policy_section(n, "https://127.0.0.1:8443/bundles/authz.tar.gz"),
            d.join("ca.pem").display(),
            d.join("token").display(),
            d.join("sign.pub").display(),
        )
    });
    let d = p.tb.dir.clone();
    let served = d.join("served.tar.gz");
    let mut tb = p.tb;
    let (cert, key) = (d.join("srv.pem"), d.join("srv.key"));
    // No server yet: the failing fetch (every 200 ms) is logged once, not
    // at every poll.
    let fetch_failures = || {
        p.ea.log_lines()
            .iter()
            .filter(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("fetching the policy bundle failed"))
            })
            .count()
    };
    wait_until("the first fetch fails", 10, || fetch_failures() > 0);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        fetch_failures(),
        1,
        "an unchanged fetch error is not repeated at every poll"
    );
    tb.spawn(
        &p.a,
        None,
        "bundle-server",
        &[
            "python3",
            "-u",
            &helper("bundle_server.py"),
            &served.display().to_string(),
            "8443",
            &cert.display().to_string(),
            &key.display().to_string(),
            "s3cret",
        ],
    )
    .expect("bundle server");
    wait_until("a loads the signed bundle over https", 15, || {
        p.ea.log_lines()
            .iter()
            .any(|v| v["message"] == "policy reloaded" && v["bundle_revision"] == "rev-1")
    });
    let log = tb.server_log(&p.a, "bundle-server");
    assert!(!log.contains("401"), "the token was sent: {log}");
    let url = format!("http://{}:8080/", p.b.ipv4);
    assert_eq!(curl(&p.a, "support-agent.service", &url).1, "200");
    assert_ne!(curl(&p.a, "research-agent.service", &url).1, "200");
    let rec = audit(&tb, &p.a).into_iter().last().expect("audit");
    assert_eq!(
        rec["bundles"],
        serde_json::json!({"authz": {"revision": "rev-1"}}),
        "{rec}"
    );
    assert_eq!(
        p.ea.metric(
            "enforcer_policy_info",
            &[("bundle", "authz"), ("revision", "rev-1")]
        )
        .expect("metrics"),
        1.0
    );

    // The attack: the module changed after signing (allow everything).
    std::fs::copy(d.join("tampered.tar.gz"), &served).expect("tamper");
    wait_until("the tampered bundle is refused", 10, || {
        rejected_with(&p.ea, "enforcer/authz.rego: digest mismatch")
    });
    assert_ne!(
        curl(&p.a, "research-agent.service", &url).1,
        "200",
        "the tampered policy must not be in force"
    );
    // An unsigned bundle, with a new revision: refused as well.
    std::fs::copy(d.join("unsigned.tar.gz"), &served).expect("unsigned");
    wait_until("the unsigned bundle is refused", 10, || {
        rejected_with(&p.ea, "require_signature")
    });
    assert_ne!(curl(&p.a, "research-agent.service", &url).1, "200");
    assert_eq!(
        p.ea.metric("enforcer_policy_reloads_total", &[("result", "rejected")])
            .expect("m"),
        2.0
    );
    assert_eq!(
        p.ea.metric("enforcer_policy_info", &[("revision", "rev-1")])
            .expect("m"),
        1.0,
        "rev-1 stays in force"
    );
}

/// Decision logs shipped to an OPA-compatible service (the receiver checks
/// the format): the first upload fails and is retried; every audited
/// decision arrives, none dropped.
#[test]
fn decision_logs_are_shipped_in_opas_format_and_retried() {
    let p = pair("polship2", |tb, n| {
        if n.name == "a" {
            format!(
                "{}\n[policy.decision_logs]\nservice = \"http://127.0.0.1:8282\"\nupload_interval_ms = 100\n",
                shipped(tb, n)
            )
        } else {
            shipped(tb, n)
        }
    });
    let mut tb = p.tb;
    tb.spawn(
        &p.a,
        None,
        "dl-receiver",
        &[
            "python3",
            "-u",
            &helper("decision_log_receiver.py"),
            "8282",
            "1",
        ],
    )
    .expect("receiver");
    std::thread::sleep(Duration::from_millis(300));
    let url = format!("http://{}:8080/", p.b.ipv4);
    for unit in [
        "support-agent.service",
        "research-agent.service",
        "support-agent.service",
    ] {
        curl(&p.a, unit, &url);
    }
    let audited: Vec<String> = audit(&tb, &p.a)
        .iter()
        .map(|r| r["decision_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(audited.len() >= 3, "{audited:?}");
    let shipped_events = |tb: &Testbed| -> Vec<Value> {
        tb.server_log(&p.a, "dl-receiver")
            .lines()
            .filter_map(|l| l.strip_prefix("EVENT "))
            .map(|l| serde_json::from_str(l).expect("event JSON"))
            .collect()
    };
    wait_until("every audited decision is shipped", 15, || {
        shipped_events(&tb).len() >= audited.len()
    });
    let log = tb.server_log(&p.a, "dl-receiver");
    assert!(!log.contains("BAD"), "{log}");
    assert!(
        log.contains("FAILED"),
        "the first upload was refused: {log}"
    );
    let events = shipped_events(&tb);
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["decision_id"].as_str().unwrap_or_default())
        .collect();
    for id in &audited {
        assert!(ids.contains(&id.as_str()), "{id} not shipped: {ids:?}");
    }
    let denied = events
        .iter()
        .find(|e| e["input"]["source"]["spiffe_id"] == RESEARCH)
        .expect("the denied decision");
    assert_eq!(denied["result"], false);
    assert_eq!(denied["path"], "enforcer/authz/allow");
    assert_eq!(denied["labels"]["node"], tb.node_instance(&p.a));
    assert!(denied["conn_id"].as_u64().is_some());
    assert!(
        p.ea.metric(
            "enforcer_decision_log_uploads_total",
            &[("result", "failed")]
        )
        .expect("m")
            >= 1.0
    );
    assert_eq!(
        p.ea.metric("enforcer_decision_logs_total", &[("result", "dropped")])
            .expect("m"),
        0.0
    );
    assert!(
        p.ea.metric("enforcer_decision_logs_total", &[("result", "shipped")])
            .expect("m")
            >= audited.len() as f64
    );
}
