//! The plugin binary as a runtime runs it: `CNI_*` variables, the network
//! config on stdin, the result or a CNI error object on stdout. The agent's
//! side of the socket is played here (a unix listener that answers, hangs
//! or is absent); the plugin against the real agent is tested in
//! tests/tests/kubernetes.rs.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixListener,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

fn run(command: &str, conf: &Value) -> (bool, Value, String, Duration) {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_enforcer-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", "/var/run/netns/test")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/nonexistent")
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=0b6f2a34-1c1e-4b43-9c1d-1f1f1f1f1f1f",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("enforcer-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
    };
    (
        out.status.success(),
        value,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

fn conf(socket: &Path, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "enforcer-cni",
        "socket": socket.display().to_string(), "timeout_secs": 1,
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                       "ips": [{"address": "10.244.1.7/24", "interface": 0}]}
    });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    c
}

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("enforcer-cni-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

#[test]
fn add_passes_prev_result_once_the_agent_answers_and_sends_the_pod() {
    let d = dir("ok");
    let socket = d.join("cni.sock");
    let l = UnixListener::bind(&socket).expect("bind");
    let agent = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("read");
        (&s).write_all(b"{\"ok\":true}\n").expect("answer");
        serde_json::from_str::<Value>(&line).expect("request")
    });
    let (ok, out, err, _) = run("ADD", &conf(&socket, json!({})));
    assert!(ok, "{err}");
    assert_eq!(out["ips"][0]["address"], "10.244.1.7/24", "{out}");
    let req = agent.join().expect("agent");
    assert_eq!(req["command"], "ADD");
    assert_eq!(req["netns"], "/var/run/netns/test");
    assert_eq!(req["pod_uid"], "0b6f2a34-1c1e-4b43-9c1d-1f1f1f1f1f1f");
    assert_eq!(req["pod_namespace"], "ns");
    assert_eq!(req["pod_name"], "p");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn add_fails_when_the_agent_hangs_or_refuses_unless_fail_open() {
    let d = dir("hang");
    let socket = d.join("cni.sock");
    let l = UnixListener::bind(&socket).expect("bind");
    // Accepts and never answers (a hung agent).
    let held = std::thread::spawn(move || {
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(l.accept().expect("accept"));
        }
        std::thread::sleep(Duration::from_secs(3));
    });
    let (ok, out, _, took) = run("ADD", &conf(&socket, json!({})));
    assert!(!ok, "ADD succeeded with an agent that never answered");
    assert_eq!(out["code"], 5, "{out}");
    assert!(
        took < Duration::from_secs(3),
        "timeout_secs = 1, took {took:?}"
    );
    // fail_open: the pod starts, unprotected, and stderr says so.
    let (ok, out, err, _) = run("ADD", &conf(&socket, json!({"fail_open": true})));
    assert!(ok, "{err}");
    assert_eq!(out["ips"][0]["address"], "10.244.1.7/24", "{out}");
    assert!(err.contains("unprotected"), "{err}");
    held.join().expect("agent");

    // An agent that refuses: code 100 with its reason.
    let d2 = dir("refuse");
    let socket = d2.join("cni.sock");
    let l = UnixListener::bind(&socket).expect("bind");
    let agent = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("read");
        (&s).write_all(b"{\"ok\":false,\"error\":\"1000 pods are served already\"}\n")
            .expect("answer");
    });
    let (ok, out, _, _) = run("ADD", &conf(&socket, json!({})));
    assert!(!ok);
    assert_eq!(out["code"], 100, "{out}");
    assert_eq!(out["details"], "1000 pods are served already", "{out}");
    agent.join().expect("agent");

    // No agent at all: try again later (11); DEL still succeeds.
    let gone = d2.join("absent.sock");
    let (ok, out, _, _) = run("ADD", &conf(&gone, json!({})));
    assert!(!ok);
    assert_eq!(out["code"], 11, "{out}");
    let (ok, _, err, _) = run("DEL", &conf(&gone, json!({})));
    assert!(ok, "DEL without an agent: {err}");
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&d2);
}

#[test]
fn bad_configs_and_versions_are_cni_errors() {
    let d = dir("bad");
    let socket = d.join("cni.sock");
    let (ok, out, _, _) = run("ADD", &conf(&socket, json!({"cniVersion": "9.9.9"})));
    assert!(!ok);
    assert_eq!(out["code"], 1, "{out}");
    let (ok, out, _, _) = run("ADD", &conf(&socket, json!({"timeout_secs": "soon"})));
    assert!(!ok);
    assert_eq!(out["code"], 7, "{out}");
    assert!(
        out["msg"]
            .as_str()
            .is_some_and(|m| m.contains("timeout_secs")),
        "{out}"
    );
    let mut no_prev = conf(&socket, json!({}));
    no_prev
        .as_object_mut()
        .expect("object")
        .remove("prevResult");
    let (ok, out, _, _) = run("ADD", &no_prev);
    assert!(!ok);
    assert_eq!(out["code"], 7, "{out}");
    let (ok, out, _, _) = run("VERSION", &json!({"cniVersion": "1.0.0"}));
    assert!(ok);
    assert!(
        out["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&json!("1.0.0"))),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&d);
}
