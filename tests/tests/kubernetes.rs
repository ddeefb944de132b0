//! Pod identities from the Kubernetes API (issue 13, item 4): node a's agent
//! watches its node's pods with kube-rs and attests workloads in pod cgroups
//! (`kubepods-…-pod<uid>.slice/cri-containerd-<id>.scope`, as the kubelet's
//! systemd driver names them) with the pods' metadata. No API server can be
//! installed here: `tests/helpers/k8s_api.py` is a stand-in that serves the
//! pods list and watch as kube-rs uses them. Real agents, real mTLS to b.
use std::{fs, path::Path};

use enforcer_tests::{MESH, Node, Testbed, entry, wait_for};
use serde_json::{Value, json};

const TD: &str = "k8s.example.org";
const API_ID: &str = "spiffe://k8s.example.org/api";
const RESEARCH_ID: &str = "spiffe://k8s.example.org/agent/research";
const PINNED_ID: &str = "spiffe://k8s.example.org/agent/pinned";
const TOKEN: &str = "s3rvice-account-t0ken";
const K8S_NODE: &str = "worker-1";

/// A pod of `K8S_NODE` with one container.
fn pod(uid: &str, sa: &str, app: &str, container_id: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"uid": uid, "name": format!("{app}-7f9c"), "namespace": "agents",
                     "labels": {"app": app}},
        "spec": {"nodeName": K8S_NODE, "serviceAccountName": sa,
                 "containers": [{"name": app, "image": format!("registry.example/{app}:1")}]},
        "status": {"containerStatuses": [{"name": app, "image": format!("registry.example/{app}:1"),
            "imageID": "", "containerID": format!("containerd://{container_id}"),
            "ready": true, "restartCount": 0}]}
    })
}

/// The cgroup the kubelet (systemd driver) and containerd give that pod's
/// container, under the node's captured subtree.
fn pod_cgroup(uid: &str, container_id: &str) -> String {
    format!(
        "kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{container_id}.scope",
        uid.replace('-', "_")
    )
}

fn write_pod(dir: &Path, uid: &str, pod: &Value) {
    let tmp = dir.join(format!("{uid}.tmp"));
    fs::write(&tmp, pod.to_string()).expect("pod");
    fs::rename(&tmp, dir.join(format!("{uid}.json"))).expect("pod");
}

/// The API stand-in on node `node` (its netns, port 6443), serving
/// `pods`, and the `[kubernetes]` section an agent of that node watches it
/// with: the token, `K8S_NODE`, the node's kubepods slice as the kubelet's
/// pod cgroup, and a CNI socket in the testbed (never the host's).
struct Api {
    dir: std::path::PathBuf,
    pid: u32,
    section: String,
    cni_socket: std::path::PathBuf,
}

/// An HTTP echo server (`name`) on `port` of `node`, in `cgroup`; its pid.
fn echo_in(tb: &mut Testbed, node: &Node, cgroup: &str, name: &str, port: u16) -> u32 {
    let echo = format!("{}/helpers/http_echo.py", env!("CARGO_MANIFEST_DIR"));
    tb.start_server_in(
        node,
        Some(cgroup),
        name,
        &["python3", "-u", &echo, &port.to_string()],
        port,
    )
    .unwrap_or_else(|e| panic!("the echo server {name} on {port}: {e:#}"))
}

fn serve_pods(tb: &mut Testbed, node: &Node, pods: &[&Value]) -> Api {
    let dir = tb.dir.join("pods");
    fs::create_dir_all(&dir).expect("pods dir");
    for p in pods {
        write_pod(&dir, p["metadata"]["uid"].as_str().expect("uid"), p);
    }
    let token = tb.dir.join("token");
    fs::write(&token, TOKEN).expect("token");
    let api = format!("{}/helpers/k8s_api.py", env!("CARGO_MANIFEST_DIR"));
    let pid = tb
        .start_server(
            node,
            "k8s-api",
            &[
                "python3",
                "-u",
                &api,
                "6443",
                &dir.display().to_string(),
                TOKEN,
            ],
            6443,
        )
        .expect("the API stand-in");
    let mount = enforcer_tests::cgroup2_mount().expect("cgroup2");
    let pods_cgroup = Path::new("/")
        .join(node.cgroup.strip_prefix(&mount).expect("under cgroup2"))
        .join("kubepods-besteffort.slice");
    let cni_socket = tb.dir.join("run/cni.sock");
    let section = format!(
        "[kubernetes]\napi_server = \"http://127.0.0.1:6443\"\ntoken_file = \"{}\"\nnode = \"{K8S_NODE}\"\npods_cgroup = [\"{}\"]\ncni_socket = \"{}\"\n",
        token.display(),
        pods_cgroup.display(),
        cni_socket.display()
    );
    Api {
        dir,
        pid,
        section,
        cni_socket,
    }
}

fn curl(node: &Node, unit: &str, url: &str) -> (String, u32) {
    node.http_status(Some(unit), url)
}

#[test]
fn pods_are_identified_from_the_api_and_new_ones_fail_closed_while_it_is_unreachable() {
    let (mut tb, a, b) = Testbed::linked_pair("k8spods").expect("testbed");
    let ca = tb.shared_ca("shared", TD).expect("CA");
    let b_tail = format!("{}\n{MESH}", entry(API_ID, "systemd:unit:api.service"));
    let b_config = tb
        .enforcer_config_with(&b, "", &ca, &b_tail)
        .expect("config");
    let eb = tb.start_enforcer(&b, &b_config).expect("b's agent");
    echo_in(&mut tb, &b, "api.service", "echo", 8080);

    // This node's pods, served by the API stand-in in a's netns.
    let (u1, c1) = ("0f5e1c2a-1111-4a5b-8c9d-000000000001", "a1".repeat(32));
    let (u2, c2) = ("0f5e1c2a-2222-4a5b-8c9d-000000000002", "b2".repeat(32));
    let (u3, c3) = ("0f5e1c2a-3333-4a5b-8c9d-000000000003", "c3".repeat(32));
    // A pod of another node: not this agent's.
    let mut other = pod(u3, "support", "elsewhere", &c3);
    other["spec"]["nodeName"] = json!("worker-2");
    let api = serve_pods(
        &mut tb,
        &a,
        &[
            &pod(u1, "support", "support", &c1),
            &pod(u2, "research", "research", &c2),
            &other,
        ],
    );
    let (pods, api_pid) = (api.dir.clone(), api.pid);

    // No entry for the support pod (its identity comes from its namespace
    // and service account); an entry for the research pod's label; and one
    // pinned to a container id, which only a pod the API knows may use.
    let (u4, c4) = ("0f5e1c2a-4444-4a5b-8c9d-000000000004", "d4".repeat(32));
    let a_tail = format!(
        "{}{}\n{MESH}\n{}",
        entry(RESEARCH_ID, "k8s:pod-label:app:research"),
        entry(PINNED_ID, &format!("container:id:{c4}")),
        api.section
    );
    let a_config = tb
        .enforcer_config_with(&a, "", &ca, &a_tail)
        .expect("config");
    // Ready only once this node's pods are listed.
    let ea = tb.start_enforcer(&a, &a_config).expect("a's agent");
    let log = tb.server_log(&a, "k8s-api");
    assert!(log.contains(&format!("LIST {K8S_NODE}")), "{log}");

    let url = format!("http://{}:8080/", b.ipv4);
    let (code, pid) = curl(&a, &pod_cgroup(u1, &c1), &url);
    assert_eq!(code, "200");
    let line = ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(
        line["src_spiffe_id"], "spiffe://k8s.example.org/ns/agents/sa/support",
        "{line}"
    );
    // b verified that identity over mTLS.
    let inbound = eb
        .connection_line(|v| v["src_spiffe_id"] == "spiffe://k8s.example.org/ns/agents/sa/support");
    assert_eq!(inbound["outcome"], "ok", "{inbound}");
    // The pod's selectors, as /status shows them.
    let (status, body) = a
        .http_get("127.0.0.1:15000".parse().expect("addr"), "/status")
        .expect("status");
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(doc["kubernetes"]["node"], K8S_NODE, "{doc:#}");
    assert_eq!(doc["kubernetes"]["pods_known"], 2, "this node's two pods");
    assert_eq!(doc["kubernetes"]["listed"], true);
    let workload = doc["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| {
            w["selectors"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s == &json!(format!("k8s:pod-uid:{u1}"))))
        })
        .unwrap_or_else(|| panic!("the support pod in /status: {doc:#}"));
    for want in [
        "k8s:ns:agents",
        "k8s:sa:support",
        "k8s:pod-name:support-7f9c",
        "k8s:pod-label:app:support",
        "k8s:container-name:support",
        "k8s:container-image:registry.example/support:1",
    ] {
        assert!(
            workload["selectors"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s == want)),
            "{want} in {workload}"
        );
    }

    // A registration entry on a pod label wins over the default identity.
    let (code, pid) = curl(&a, &pod_cgroup(u2, &c2), &url);
    assert_eq!(code, "200");
    assert_eq!(
        ea.connection_line(|v| v["pid"] == pid)["src_spiffe_id"],
        RESEARCH_ID
    );

    // The attack: a process that makes its own cgroup named like the
    // support pod's, outside the kubelet's pod cgroup (as a user with a
    // delegated cgroup subtree can), is not taken for that pod.
    let spoof = format!(
        "user.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{c1}.scope",
        u1.replace('-', "_")
    );
    let (code, pid) = curl(&a, &spoof, &url);
    assert_ne!(code, "200", "a look-alike cgroup got the pod's identity");
    let line = ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["outcome"], "no_identity", "{line}");

    // A pod of another node is unknown here: no identity, refused.
    let (code, pid) = curl(&a, &pod_cgroup(u3, &c3), &url);
    assert_ne!(code, "200");
    let line = ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["outcome"], "no_identity", "{line}");

    // The API becomes unreachable: /readyz says so; known pods keep their
    // identities, a pod that starts now gets none.
    tb.stop(api_pid).expect("stop the API stand-in");
    wait_for("/readyz to name the unreachable API", || {
        a.http_get(ea.metrics_addr, "/readyz")
            .is_ok_and(|(s, b)| s == 503 && b.contains("kubernetes API unreachable"))
    });
    let (code, pid) = curl(&a, &pod_cgroup(u1, &c1), &url);
    assert_eq!(code, "200", "a known pod keeps its identity");
    assert_eq!(
        ea.connection_line(|v| v["pid"] == pid)["src_spiffe_id"],
        "spiffe://k8s.example.org/ns/agents/sa/support"
    );
    // (Its container id has an entry: without the API's word on the pod,
    // the entry is not enough.)
    write_pod(&pods, u4, &pod(u4, "support", "support", &c4));
    let (code, pid) = curl(&a, &pod_cgroup(u4, &c4), &url);
    assert_ne!(
        code, "200",
        "a new pod gets no identity while the API is unreachable"
    );
    let line = ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(line["outcome"], "no_identity", "{line}");
}

/// A container of the api pod with a registration entry of its own.
const SIDECAR_CONTAINER: &str = "5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c";

/// The agent's listening sockets in a netns: `ss -ltnH` there.
fn listening(node: &Node) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &node.netns, "ss", "-ltnH"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The netns inodes an agent holds open (`net:[N]` fds).
fn netns_fds(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .map(|l| l.display().to_string())
                .filter(|l| l.starts_with("net:["))
                .collect()
        })
        .unwrap_or_default()
}

fn netns_inode(node: &Node) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let ino = fs::metadata(format!("/run/netns/{}", node.netns))
        .expect("netns file")
        .ino();
    format!("net:[{ino}]")
}

/// Issue 13, items 1–3: pods in network namespaces of their own, wired by
/// the real CNI bridge plugin with `enforcer-cni` chained. A pod's
/// connects are captured inside its netns and sent over HBONE from the pod
/// to the other pod's `podIP:15008`, served by the agent's listener inside
/// that pod; ADD fails while the agent is down (the pod would not start);
/// a restarted agent finds the running pods by their cgroups; DEL and a
/// vanished netns leave no listener and no netns reference behind.
#[test]
fn pods_with_their_own_netns_are_served_from_cni_add_to_del() {
    use enforcer_tests::cni::POD_SUBNET;
    let mut tb = Testbed::new("inpod").expect("testbed");
    let a = tb.node("a", 1).expect("node");
    let ca = tb.shared_ca("shared", TD).expect("CA");
    let (u1, c1) = ("1f5e1c2a-1111-4a5b-8c9d-000000000001", "e1".repeat(32));
    let (u2, c2) = ("1f5e1c2a-2222-4a5b-8c9d-000000000002", "f2".repeat(32));
    let (u3, c3) = ("1f5e1c2a-3333-4a5b-8c9d-000000000003", "a3".repeat(32));
    let api = serve_pods(
        &mut tb,
        &a,
        &[
            &pod(u1, "support", "support", &c1),
            &pod(u2, "api", "api", &c2),
            &pod(u3, "support", "late", &c3),
        ],
    );
    let socket = api.cni_socket.clone();
    let a_tail = format!(
        "{}\n[mesh]\ncidrs = [\"{POD_SUBNET}\"]\n\n[[mesh.inbound]]\nports = [8080]\nmode = \"strict\"\n\n{}",
        entry(
            "spiffe://k8s.example.org/sidecar",
            &format!("container:id:{SIDECAR_CONTAINER}")
        ),
        api.section
    );
    let a_config = tb
        .enforcer_config_with(&a, "", &ca, &a_tail)
        .expect("config");
    let ea = tb.start_enforcer(&a, &a_config).expect("a's agent");
    let network = tb.install_pod_network(&socket).expect("the pod network");
    assert_eq!(
        network[1]["plugins"][1]["type"], "enforcer-cni",
        "install chains enforcer-cni after bridge: {:#}",
        network[1]
    );

    // Two pods, as the runtime starts them: netns, CNI ADD, then the
    // sandbox and the containers in the pod's cgroup.
    let mut p1 = tb.pod(&a, "p1", u1, &c1, "agents").expect("pod");
    let mut p2 = tb.pod(&a, "p2", u2, &c2, "agents").expect("pod");
    for p in [&mut p1, &mut p2] {
        let added = tb.cni(&a, p, &network, "ADD").expect("CNI ADD");
        assert!(added.ok, "ADD: {added:?}");
        // The pod is served when ADD returns: the agent listens inside it.
        let inside = listening(&p.node);
        assert!(inside.contains("127.0.0.1:15001"), "{inside}");
        assert!(inside.contains(":15008"), "{inside}");
        let cg = p.cgroup();
        tb.spawn(&p.node, Some(&cg), "pause", &["sleep", "600"])
            .expect("sandbox");
    }
    let checked = tb.cni(&a, &mut p1, &network, "CHECK").expect("CHECK");
    assert!(checked.ok, "CHECK: {checked:?}");
    let (status, body) = a
        .http_get("127.0.0.1:15000".parse().expect("addr"), "/status")
        .expect("status");
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).expect("status JSON");
    let served: Vec<&str> = doc["kubernetes"]["pods_served"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["uid"].as_str())
        .collect();
    assert_eq!(served, [u1, u2], "{doc:#}");
    let p2_cg = p2.cgroup();
    echo_in(&mut tb, &p2.node, &p2_cg, "echo", 8080);

    // Pod to pod: captured in p1's netns, mutual TLS from p1's address to
    // p2's HBONE listener, identities from the API (ns/<ns>/sa/<sa>).
    let url = format!("http://{}:8080/", p2.node.ipv4);
    let (code, pid) = curl(&p1.node, &p1.cgroup(), &url);
    assert_eq!(code, "200");
    let out = ea.connection_line(|v| v["pid"] == pid);
    assert_eq!(
        out["src_spiffe_id"], "spiffe://k8s.example.org/ns/agents/sa/support",
        "{out}"
    );
    assert_eq!(
        out["dst_spiffe_id"], "spiffe://k8s.example.org/ns/agents/sa/api",
        "{out}"
    );
    assert_eq!(out["mtls"], true, "{out}");
    assert_eq!(out["outcome"], "ok", "{out}");
    let inbound = ea.connection_line(|v| {
        v["direction"] == "inbound"
            && v["src_spiffe_id"] == "spiffe://k8s.example.org/ns/agents/sa/support"
    });
    assert_eq!(inbound["outcome"], "ok", "{inbound}");
    // The HBONE connection came from p1's own address.
    assert_eq!(
        inbound["src"]
            .as_str()
            .and_then(|s| s.parse::<std::net::SocketAddr>().ok())
            .map(|s| s.ip().to_string()),
        Some(p1.node.ipv4.clone()),
        "{inbound}"
    );

    // A client that behaves as ztunnel's (no server name, an Istio-form
    // identity, CONNECTs to two ports on one connection) reaches the pod by
    // its address: the agent's listener in the pod presents the pod's
    // identity, and each stream reaches the workload on its port.
    echo_in(&mut tb, &p2.node, &p2_cg, "echo9090", 9090);
    let probe = concat!(env!("CARGO_MANIFEST_DIR"), "/helpers/ztunnel_probe.py");
    let ca_dir = tb.dir.join("ca-shared");
    let (ca_pem, ca_key) = (
        ca_dir.join("ca.pem").display().to_string(),
        ca_dir.join("ca.key").display().to_string(),
    );
    let ztunnel = |ports: &[&str]| -> Vec<String> {
        let mut cmd = vec![
            "python3",
            probe,
            &p2.node.ipv4,
            &ca_pem,
            &ca_key,
            "spiffe://k8s.example.org/ns/agents/sa/support",
        ];
        cmd.extend_from_slice(ports);
        let (_, out) = a.exec(None, &cmd).expect("the ztunnel-like probe");
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        assert!(
            !lines.is_empty(),
            "probe printed nothing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        lines
    };
    let lines = ztunnel(&["8080", "9090"]);
    assert_eq!(
        lines,
        [
            "SERVER spiffe://k8s.example.org/ns/agents/sa/api",
            "PORT 8080 200 HTTP/1.1 200 OK",
            "PORT 9090 200 HTTP/1.1 200 OK",
        ],
        "{lines:?}"
    );
    let via_ztunnel = ea.connection_line(|v| {
        v["direction"] == "inbound" && v["dst"].as_str().is_some_and(|d| d.ends_with(":9090"))
    });
    assert_eq!(
        via_ztunnel["src_spiffe_id"], "spiffe://k8s.example.org/ns/agents/sa/support",
        "{via_ztunnel}"
    );
    // A workload of another identity in the pod (a sidecar with an entry
    // of its own): the address no longer speaks for one identity, so a
    // client that names no port gets no certificate at all.
    let sidecar_cg = format!(
        "kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
        u2.replace('-', "_"),
        SIDECAR_CONTAINER
    );
    let sidecar = echo_in(&mut tb, &p2.node, &sidecar_cg, "sidecar", 7070);
    let lines = ztunnel(&["8080"]);
    assert!(
        lines[0].starts_with("HANDSHAKE_FAILED"),
        "a no-SNI client got a certificate for an address of two identities: {lines:?}"
    );
    tb.stop(sidecar).expect("stop the sidecar");

    // Plaintext from outside the mesh (the node itself, not captured) to
    // the pod's strict port: steered in the pod's netns to the agent's
    // plaintext listener there, and refused; the server never sees it.
    let (code, _) = a.http_status(None, &format!("{url}?plaintext-strict"));
    assert_eq!(code, "000", "plaintext reached a strict port in a pod");
    let line = ea.connection_line(|v| v["plaintext_mode"] == "strict");
    assert_eq!(
        line["dst_spiffe_id"], "spiffe://k8s.example.org/ns/agents/sa/api",
        "{line}"
    );
    assert!(!tb.server_log(&p2.node, "echo").contains("plaintext-strict"));

    // The agent stops: a captured connect in a pod is refused (the
    // programs stay; the listener in the pod is gone), and a new pod's ADD
    // fails, so the runtime would not start it.
    tb.stop(ea.pid).expect("stop a's agent");
    let (code, pid) = curl(&p1.node, &p1.cgroup(), &url);
    assert_eq!(
        code, "000",
        "a pod's connect went through without the agent"
    );
    assert!(
        ea.wait_for_connection(|v| v["pid"] == pid).is_none(),
        "nobody should have relayed it"
    );
    // The pod's steering stays too (pinned): plaintext to the strict port
    // is dropped, not let through to the server.
    let (code, _) = a.http_status(None, &format!("{url}?plaintext-agent-down"));
    assert_eq!(
        code, "000",
        "plaintext reached a strict port with the agent down"
    );
    assert!(
        !tb.server_log(&p2.node, "echo")
            .contains("plaintext-agent-down")
    );
    let mut p3 = tb.pod(&a, "p3", u3, &c3, "agents").expect("pod");
    let refused = tb.cni(&a, &mut p3, &network, "ADD");
    let refused = match refused {
        Ok(o) => o,
        Err(e) => panic!("ADD: {e:#}"),
    };
    assert!(!refused.ok, "ADD succeeded with no agent: {refused:?}");
    let err: Value = serde_json::from_str(refused.stdout.trim()).expect("a CNI error object");
    assert_eq!(err["code"], 11, "{err}");
    assert!(
        err["msg"]
            .as_str()
            .is_some_and(|m| m.contains("not reachable")),
        "{err}"
    );

    // A new agent finds p1 and p2 running (their cgroups, a process, its
    // netns) and serves them with no CNI call. It is of another release:
    // the stopped agent's pins are moved to a `v1` directory (another
    // LAYOUT_VERSION), still attached, the pods' steering links among them.
    let old_pins = enforcer_tests::OtherLayoutPins::moved_from_v2(&tb.node_instance(&a));
    assert!(
        fs::read_dir(old_pins.0.join("pods")).is_ok_and(|d| d.count() >= 1),
        "the other release's pods' steering is pinned"
    );
    let ea = tb.start_enforcer(&a, &a_config).expect("a's agent again");
    let (code, pid) = curl(&p1.node, &p1.cgroup(), &url);
    assert_eq!(code, "200");
    assert_eq!(
        ea.connection_line(|v| v["pid"] == pid)["dst_spiffe_id"],
        "spiffe://k8s.example.org/ns/agents/sa/api"
    );
    // Its programs and, once this agent steers each pod, its pods' links
    // are retired; plaintext to the strict port is still not let through.
    wait_for("the other release's pins to be retired", || {
        !old_pins.0.exists()
    });
    let (code, _) = a.http_status(None, &format!("{url}?plaintext-after-other-release"));
    assert_eq!(code, "000", "plaintext reached a strict port");
    assert!(
        !tb.server_log(&p2.node, "echo")
            .contains("plaintext-after-other-release")
    );

    // A hitless upgrade: the new agent takes the pods' listeners over
    // (handed over with the node's), so connects from a pod spread over
    // the upgrade all succeed.
    tb.spawn(
        &p1.node,
        Some(&p1.cgroup()),
        "connects",
        &[
            "python3",
            "-u",
            "-c",
            enforcer_tests::PY_CONNECTS,
            &p2.node.ipv4,
            "8080",
            "400",
        ],
    )
    .expect("connects from p1");
    wait_for("100 connects before the upgrade", || {
        tb.server_log(&p1.node, "connects").contains("DONE 100")
    });
    let old = ea.clone();
    let ea = tb.upgrade_enforcer(&old, &a_config).expect("upgrade a");
    assert!(
        fs::read_to_string(&ea.log)
            .unwrap_or_default()
            .contains("taking over the running agent's listeners in pods"),
        "the pods' listeners were handed over"
    );
    let mut result = String::new();
    wait_for("the connects to end", || {
        result = tb
            .server_log(&p1.node, "connects")
            .lines()
            .find(|l| l.starts_with("OK "))
            .unwrap_or_default()
            .to_owned();
        !result.is_empty()
    });
    assert_eq!(
        result,
        "OK 400 FAIL 0",
        "{}",
        tb.server_log(&p1.node, "connects")
    );
    assert!(
        tb.wait_exit(old.pid, std::time::Duration::from_secs(20))
            .is_some(),
        "the old agent exits after draining"
    );

    // DEL: no listener stays in the pod, the agent keeps no reference to
    // its netns.
    let p1_ns = netns_inode(&p1.node);
    assert!(
        netns_fds(ea.pid).contains(&p1_ns),
        "the agent holds p1's netns"
    );
    let deleted = tb.cni(&a, &mut p1, &network, "DEL").expect("DEL");
    assert!(deleted.ok, "DEL: {deleted:?}");
    wait_for("p1's listeners to close", || {
        !listening(&p1.node).contains(":15001")
    });
    wait_for("the agent to let go of p1's netns", || {
        !netns_fds(ea.pid).contains(&p1_ns)
    });
    let checked = tb.cni(&a, &mut p1, &network, "CHECK").expect("CHECK");
    assert!(!checked.ok, "CHECK after DEL: {checked:?}");

    // A pod whose netns vanishes without a DEL (the agent was down when
    // the runtime deleted it) is let go too.
    let p2_ns = netns_inode(&p2.node);
    assert!(netns_fds(ea.pid).contains(&p2_ns));
    std::process::Command::new("ip")
        .args(["netns", "del", &p2.node.netns])
        .status()
        .expect("ip netns del");
    let p2_cgroup = a.cgroup.join(p2.cgroup());
    enforcer_tests::remove_cgroup_tree(p2_cgroup.parent().expect("pod slice"));
    wait_for("the agent to let go of p2's netns", || {
        !netns_fds(ea.pid).contains(&p2_ns)
    });
}

/// Issue 13, item 5, the other direction: the enforcer client against an
/// HBONE server that picks its certificate by address and ignores the
/// server name, as ztunnel's does (`tests/helpers/ztunnel_server.py`, a
/// protocol-level stand-in: ztunnel itself cannot be installed here). The
/// client verifies the identity it gets and policy decides on it.
#[test]
fn the_enforcer_client_works_with_a_server_that_ignores_the_server_name() {
    let (mut tb, a, b) = Testbed::linked_pair("ztserver").expect("testbed");
    let ca = tb.shared_ca("shared", TD).expect("CA");
    let server = format!("{}/helpers/ztunnel_server.py", env!("CARGO_MANIFEST_DIR"));
    let ca_dir = tb.dir.join("ca-shared");
    tb.start_server(
        &b,
        "ztunnel",
        &[
            "python3",
            "-u",
            &server,
            &b.ipv4,
            "15008",
            &ca_dir.join("ca.pem").display().to_string(),
            &ca_dir.join("ca.key").display().to_string(),
            "spiffe://k8s.example.org/ns/agents/sa/api",
        ],
        15008,
    )
    .expect("the ztunnel-like server");
    let tail = format!(
        "{}\n{MESH}",
        entry(
            "spiffe://k8s.example.org/ns/agents/sa/support",
            "systemd:unit:support.service"
        )
    );
    let config = tb.enforcer_config_with(&a, "", &ca, &tail).expect("config");
    let ea = tb.start_enforcer(&a, &config).expect("a's agent");
    let (_, out) = a
        .exec(
            Some("support.service"),
            &["curl", "-sS", &format!("http://{}:8080/", b.ipv4)],
        )
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "port 8080\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = ea.connection_line(|v| v["comm"] == "curl");
    assert_eq!(
        line["dst_spiffe_id"], "spiffe://k8s.example.org/ns/agents/sa/api",
        "{line}"
    );
    assert_eq!(line["mtls"], true, "{line}");
    assert_eq!(line["outcome"], "ok", "{line}");
    let log = tb.server_log(&b, "ztunnel");
    assert!(
        log.contains("client=spiffe://k8s.example.org/ns/agents/sa/support"),
        "{log}"
    );
    assert!(log.contains(&format!("CONNECT {}:8080", b.ipv4)), "{log}");
}

/// Issue 13, item 6: the shipped DaemonSet takes one trust domain's CA from
/// the Secret `enforcer-ca`. Lay the Secret volume out as the kubelet does
/// (a timestamped directory, `..data` pointing at it, a symlink per key,
/// files of the manifest's `defaultMode`) at the config's paths, and check
/// that `enforcer check` loads the CA through it — and refuses it when the
/// key is readable by group.
#[test]
fn the_shipped_daemonset_loads_one_ca_from_the_secret_volume() {
    use std::os::unix::fs::{PermissionsExt as _, symlink};
    let manifest = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/enforcer.yaml"),
    )
    .expect("manifest");
    assert!(
        manifest.contains("secretName: enforcer-ca"),
        "no CA Secret volume"
    );
    let mode = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("defaultMode: "))
        .and_then(|m| u32::from_str_radix(m.trim(), 8).ok())
        .expect("the Secret volume's defaultMode (octal)");
    let key_path = |key: &str| -> String {
        manifest
            .lines()
            .find_map(|l| {
                let v = l.trim().strip_prefix(&format!("{key} = \""))?;
                Some(v.trim_end_matches('"').to_owned())
            })
            .unwrap_or_else(|| panic!("{key} in the shipped config"))
    };
    let (ca_cert, ca_key) = (key_path("ca_cert"), key_path("ca_key"));
    let mut tb = Testbed::new("secretca").expect("testbed");
    let a = tb.node("a", 1).expect("node");
    // `enforcer ca init`, as the manifest's comment says, then the
    // kubelet's projection of the Secret.
    let made = tb.dir.join("ca-made");
    let out = std::process::Command::new(enforcer_tests::enforcer_bin())
        .args(["ca", "init", "--trust-domain", "ai.example.org", "--dir"])
        .arg(&made)
        .output()
        .expect("ca init");
    assert!(out.status.success(), "{out:?}");
    let volume = tb.dir.join("secret-volume");
    let data = volume.join("..2026_11_24_00_00_00.000000001");
    fs::create_dir_all(&data).expect("volume");
    for f in ["ca.pem", "ca.key"] {
        fs::copy(made.join(f), data.join(f)).expect("copy");
        fs::set_permissions(data.join(f), fs::Permissions::from_mode(mode)).expect("mode");
    }
    symlink(data.file_name().expect("name"), volume.join("..data")).expect("..data");
    for f in ["ca.pem", "ca.key"] {
        symlink(Path::new("..data").join(f), volume.join(f)).expect("key link");
    }
    let dir_of = |p: &str| Path::new(p).parent().expect("dir").to_owned();
    assert_eq!(dir_of(&ca_cert), dir_of(&ca_key), "one mount for both");
    let at = |p: &str| volume.join(Path::new(p).file_name().expect("file"));
    let identity = format!(
        "trust_domain = \"ai.example.org\"\nca_cert = \"{}\"\nca_key = \"{}\"\n",
        at(&ca_cert).display(),
        at(&ca_key).display()
    );
    let config = tb
        .enforcer_config_with(&a, "", &identity, "")
        .expect("config");
    let check = || {
        std::process::Command::new(enforcer_tests::enforcer_bin())
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .expect("check")
    };
    let out = check();
    assert!(out.status.success(), "{out:?}");
    // A key others may read is refused, through the same links.
    fs::set_permissions(data.join("ca.key"), fs::Permissions::from_mode(0o440)).expect("mode");
    let out = check();
    assert!(
        !out.status.success(),
        "a group-readable CA key was accepted"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("readable by group or others"),
        "{out:?}"
    );
}

/// The cookie of a netns, from a socket made in it (SO_NETNS_COOKIE).
fn netns_cookie_of(node: &Node) -> u64 {
    node.in_netns(|| {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("a socket in the netns");
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: a valid fd, and an out-pointer and length for 8 bytes.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                71, // SO_NETNS_COOKIE
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_NETNS_COOKIE (Linux >= 5.14)");
        cookie
    })
    .expect("netns")
}

fn hex(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The attack the netns check on capture records stops. Pods have
/// loopback addresses of their own, so a 4-tuple `127.0.0.1:P →
/// 127.0.0.1:15001` can be pending in two pods at once, and the kernel's
/// record of pod p2's captured connect is keyed by that 4-tuple alone. A
/// process in pod p1 that connects by hand to its pod's 15001 from the same
/// source port must not be taken for p2's workload. The race is made
/// deterministic by writing p2's record into the pinned record map with
/// bpftool (what the kernel writes for p2's connect); the agent must leave
/// it and refuse p1's connection, which before the check was relayed as
/// p2's workload.
#[test]
fn a_capture_record_of_another_pod_is_never_taken() {
    use enforcer_tests::cni::POD_SUBNET;
    use std::os::unix::fs::MetadataExt as _;
    if std::process::Command::new("bpftool")
        .arg("version")
        .output()
        .is_err()
    {
        panic!("bpftool is missing: install the Debian package bpftool (`cargo xtask setup` does)");
    }
    let mut tb = Testbed::new("podrecord").expect("testbed");
    let a = tb.node("a", 1).expect("node");
    let ca = tb.shared_ca("shared", TD).expect("CA");
    let (u1, c1) = ("2f5e1c2a-1111-4a5b-8c9d-000000000001", "e1".repeat(32));
    let (u2, c2) = ("2f5e1c2a-2222-4a5b-8c9d-000000000002", "f2".repeat(32));
    let api = serve_pods(
        &mut tb,
        &a,
        &[
            &pod(u1, "support", "support", &c1),
            &pod(u2, "api", "api", &c2),
        ],
    );
    let socket = api.cni_socket.clone();
    let a_tail = format!("[mesh]\ncidrs = [\"{POD_SUBNET}\"]\n\n{}", api.section);
    let a_config = tb
        .enforcer_config_with(&a, "", &ca, &a_tail)
        .expect("config");
    let ea = tb.start_enforcer(&a, &a_config).expect("a's agent");
    let network = tb.install_pod_network(&socket).expect("the pod network");
    let mut p1 = tb.pod(&a, "p1", u1, &c1, "agents").expect("pod");
    let mut p2 = tb.pod(&a, "p2", u2, &c2, "agents").expect("pod");
    for p in [&mut p1, &mut p2] {
        let added = tb.cni(&a, p, &network, "ADD").expect("CNI ADD");
        assert!(added.ok, "ADD: {added:?}");
    }
    let p2_cg = p2.cgroup();
    let server = echo_in(&mut tb, &p2.node, &p2_cg, "echo", 8080);

    // p2's record, as the kernel would store it for a captured connect
    // from 127.0.0.1:PORT in p2 to p2's own 8080: p2's netns cookie, its
    // server's cgroup and pid (an identity: ns/agents/sa/api).
    const PORT: u16 = 45678;
    let p2_cookie = netns_cookie_of(&p2.node);
    assert_ne!(p2_cookie, netns_cookie_of(&p1.node));
    let cgroup_id = fs::metadata(a.cgroup.join(&p2_cg)).expect("cgroup").ino();
    let ip: [u8; 4] = p2
        .node
        .ipv4
        .parse::<std::net::Ipv4Addr>()
        .expect("p2's address")
        .octets();
    let mut key = Vec::new();
    key.extend_from_slice(&2u32.to_ne_bytes()); // AF_INET
    key.extend_from_slice(&PORT.to_ne_bytes());
    key.extend_from_slice(&15001u16.to_ne_bytes());
    let mut lo = [0u8; 16];
    lo[..4].copy_from_slice(&[127, 0, 0, 1]);
    key.extend_from_slice(&lo);
    key.extend_from_slice(&lo);
    let mut value = Vec::new();
    value.extend_from_slice(&2u16.to_ne_bytes()); // family
    value.extend_from_slice(&8080u16.to_ne_bytes()); // original port
    for n in [server, server, 0, 0, 0] {
        value.extend_from_slice(&n.to_ne_bytes()); // pid, tgid, uid, gid, pad
    }
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip);
    value.extend_from_slice(&addr);
    value.extend_from_slice(&cgroup_id.to_ne_bytes());
    value.extend_from_slice(&p2_cookie.to_ne_bytes());
    value.extend_from_slice(&424242u64.to_ne_bytes()); // socket cookie
    value.extend_from_slice(b"python3\0\0\0\0\0\0\0\0\0");
    assert_eq!(
        (key.len(), value.len()),
        (40, 80),
        "SockTuple and OrigDst sizes"
    );
    let map = format!(
        "/sys/fs/bpf/enforcer/v2/{}/maps/ENF_BY_TUPLE",
        tb.node_instance(&a)
    );
    let mut args: Vec<String> = vec!["map".into(), "update".into(), "pinned".into(), map];
    args.push("key".into());
    args.push("hex".into());
    args.extend(hex(&key));
    args.push("value".into());
    args.push("hex".into());
    args.extend(hex(&value));
    let out = std::process::Command::new("bpftool")
        .args(&args)
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool map update: {out:?}");

    // The attacker in p1 (not captured: outside the node's cgroup) connects
    // to its pod's 15001 by hand from that source port.
    let attack = format!(
        "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', {PORT}))\ns.settimeout(5)\n\
         try:\n    s.connect(('127.0.0.1', 15001))\n    s.sendall(b'GET /stolen HTTP/1.0\\r\\n\\r\\n')\n    print('GOT', s.recv(100))\n\
         except OSError as e:\n    print('REFUSED', e)\n"
    );
    let (_, out) = p1
        .node
        .exec(None, &["python3", "-c", &attack])
        .expect("the attacker");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !said.contains("HTTP/"),
        "p1's connection was relayed as p2's workload: {said}"
    );
    wait_for("the agent to log the record it left", || {
        ea.log_lines().iter().any(|v| {
            v["message"]
                == "a capture record of another network namespace has this connection's 4-tuple; not taken"
        })
    });
    assert!(!tb.server_log(&p2.node, "echo").contains("/stolen"));
}

/// The init containers' commands of a manifest, in order (`command: [..]`
/// in flow style under `initContainers:`).
fn init_commands(manifest: &str) -> Vec<Vec<String>> {
    let mut inside = false;
    let mut commands = Vec::new();
    for line in manifest.lines() {
        let t = line.trim();
        if t.starts_with('#') {
            continue;
        }
        if t == "initContainers:" {
            inside = true;
        } else if t == "containers:" {
            inside = false;
        } else if inside && let Some(list) = t.strip_prefix("command: [") {
            let list = list.strip_suffix(']').expect("a flow list on one line");
            commands.push(list.split(',').map(|s| s.trim().to_owned()).collect());
        }
    }
    commands
}

/// Uninstalling from a node (deploy/kubernetes/enforcer-uninstall.yaml).
/// The agent fails closed, so with its DaemonSet deleted its node has no
/// pod network: a captured connect fails and a new pod's CNI ADD fails.
/// The uninstall DaemonSet's init containers, run here with the commands
/// the manifest gives them (their host paths mapped to the testbed's),
/// give it back: a new pod starts with the node's own plugins, and a
/// connect goes direct. Before, nothing undid either but removing the pins
/// and editing the conflist by hand on every node.
#[test]
fn the_shipped_uninstall_gives_a_node_its_pod_network_back() {
    let (mut tb, a, b) = Testbed::linked_pair("uninstall").expect("two linked nodes");
    tb.start_server(&b, "http", enforcer_tests::HTTP_SERVER, 8080)
        .expect("http server on b");
    let cfg = tb.enforcer_config(&a, "").expect("config");
    let enf = tb.start_enforcer(&a, &cfg).expect("a's agent");
    // The agent's CNI socket (nobody serves it once the agent is gone).
    let socket = tb.dir.join("cni.sock");
    let network = tb.install_pod_network(&socket).expect("the pod network");
    let url = format!("http://{}:8080/", b.ipv4);
    let pid = a.get_ok(Some("client.service"), &url);
    assert!(
        enf.wait_for_connection(|v| v["pid"] == pid).is_some(),
        "captured while the agent runs"
    );

    // The agent's DaemonSet deleted: the node fails closed.
    tb.stop(enf.pid).expect("stop the agent");
    let (code, _) = a.http_status(Some("client.service"), &url);
    assert_eq!(code, "000", "with no agent, a captured connect fails");
    let (u1, c1) = ("2a2a2a2a-1111-4a5b-8c9d-000000000001", "b1".repeat(32));
    let mut p1 = tb.pod(&a, "p1", u1, &c1, "apps").expect("pod");
    let added = tb.cni(&a, &mut p1, &network, "ADD").expect("CNI ADD");
    assert!(!added.ok, "with no agent, a new pod's ADD fails: {added:?}");
    let _ = tb.cni(&a, &mut p1, &network, "DEL");

    // The uninstall DaemonSet's init containers, in the manifest's order.
    let manifest = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/enforcer-uninstall.yaml"),
    )
    .expect("the uninstall manifest");
    let commands = init_commands(&manifest);
    let programs: Vec<&str> = commands.iter().map(|c| c[0].as_str()).collect();
    assert_eq!(programs, ["enforcer-cni", "enforcer"], "{commands:?}");
    let (bin_dir, conf_dir) = (tb.dir.join("cni/bin"), tb.dir.join("cni/net.d"));
    let host = |arg: &str| -> String {
        match arg {
            "/host/opt/cni/bin" => bin_dir.display().to_string(),
            "/host/etc/cni/net.d" => conf_dir.display().to_string(),
            "/etc/enforcer/enforcer.toml" => cfg.display().to_string(),
            other => {
                assert!(
                    !other.starts_with('/'),
                    "a path the test does not map: {other}"
                );
                other.to_owned()
            }
        }
    };
    // The testbed's runtime directory, never the host's /run/enforcer.
    let run_dir = tb.dir.join("run");
    let uninstall = |round: &str| {
        for command in &commands {
            let program = match command[0].as_str() {
                "enforcer-cni" => enforcer_tests::cni::enforcer_cni_bin(),
                _ => enforcer_tests::enforcer_bin(),
            };
            let out = std::process::Command::new(program)
                .args(command[1..].iter().map(|a| host(a)))
                .env("RUNTIME_DIRECTORY", &run_dir)
                .output()
                .expect("run the init container's command");
            assert!(out.status.success(), "{round}: {command:?}: {out:?}");
        }
    };
    uninstall("uninstall");
    let pins = format!("/sys/fs/bpf/enforcer/v2/{}", tb.node_instance(&a));
    assert!(!Path::new(&pins).exists(), "the pins are gone");
    assert!(
        !bin_dir.join("enforcer-cni").exists(),
        "the plugin's binary is gone"
    );
    let conflist: Value = serde_json::from_str(
        &fs::read_to_string(conf_dir.join("10-k8s.conflist")).expect("conflist"),
    )
    .expect("conflist JSON");
    let types: Vec<&str> = conflist["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .filter_map(|p| p["type"].as_str())
        .collect();
    assert_eq!(
        types,
        ["bridge"],
        "the conflist as before install: {conflist:#}"
    );

    // A new pod starts on the node's own plugins, and connects go direct.
    let network = [network[0].clone(), conflist];
    let (u2, c2) = ("2a2a2a2a-2222-4a5b-8c9d-000000000002", "b2".repeat(32));
    let mut p2 = tb.pod(&a, "p2", u2, &c2, "apps").expect("pod");
    let added = tb.cni(&a, &mut p2, &network, "ADD").expect("CNI ADD");
    assert!(added.ok, "a new pod's ADD after the uninstall: {added:?}");
    a.get_ok(Some("client.service"), &url);
    // Again: the uninstall is idempotent (a restarted init container).
    uninstall("run again");
}

/// The `command: [..]` (flow style, one line) of the container `name` in a
/// manifest.
fn container_command(manifest: &str, name: &str) -> Vec<String> {
    let mut lines = manifest.lines().map(str::trim);
    lines
        .find(|l| *l == format!("- name: {name}"))
        .unwrap_or_else(|| panic!("no container {name} in the manifest"));
    let list = lines
        .find_map(|l| l.strip_prefix("command: ["))
        .and_then(|l| l.strip_suffix(']'))
        .unwrap_or_else(|| panic!("no one-line command for {name}"));
    list.split(',')
        .map(|s| s.trim().trim_matches('"').to_owned())
        .collect()
}

/// A network plugin that writes its conflist again (at its own restart or
/// upgrade) drops the chained `enforcer-cni`, and the node's new pods would
/// then start without the agent serving them (their connects failing
/// closed). The DaemonSet's `cni-watch` container, run here with the
/// manifest's command (host paths mapped to the testbed's), chains it
/// again: in the conflist written again, in a new first conflist, and puts
/// the binary back when it is removed. Before, `install` ran once, in the
/// init container, and nothing noticed.
#[test]
fn a_conflist_written_again_is_chained_again() {
    let tb = Testbed::new("cniwatch").expect("testbed");
    let manifest = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/enforcer.yaml"),
    )
    .expect("the DaemonSet manifest");
    let command = container_command(&manifest, "cni-watch");
    assert_eq!(command[..2], ["enforcer-cni", "install"], "{command:?}");
    assert!(command.contains(&"--watch".to_owned()), "{command:?}");
    let (bin_dir, conf_dir) = (tb.dir.join("cni/bin"), tb.dir.join("cni/net.d"));
    fs::create_dir_all(&bin_dir).expect("bin dir");
    fs::create_dir_all(&conf_dir).expect("conf dir");
    let original = r#"{"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]}"#;
    let list = conf_dir.join("10-k8s.conflist");
    fs::write(&list, original).expect("conflist");
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| match a.as_str() {
            "/host/opt/cni/bin" => bin_dir.display().to_string(),
            "/host/etc/cni/net.d" => conf_dir.display().to_string(),
            other => other.to_owned(),
        })
        .collect();
    let log = tb.dir.join("cni-watch.log");
    /// Stopped however the test ends (it runs until stopped).
    struct Watcher(std::process::Child);
    impl Drop for Watcher {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _watcher = Watcher(
        std::process::Command::new(enforcer_tests::cni::enforcer_cni_bin())
            .args(&args)
            .stdout(fs::File::create(&log).expect("log"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cni-watch"),
    );
    let chains = |path: &Path| {
        fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|v| {
                v["plugins"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p["type"] == "enforcer-cni"))
            })
    };
    wait_for("the first install", || chains(&list));
    // The network plugin writes its conflist again.
    fs::write(&list, original).expect("conflist written again");
    wait_for("the rewritten conflist chained again", || chains(&list));
    // A conflist that now sorts first is the one the runtime uses.
    let first = conf_dir.join("05-new.conflist");
    fs::write(&first, original).expect("a new conflist");
    wait_for("the new first conflist chained", || chains(&first));
    let bin = bin_dir.join("enforcer-cni");
    fs::remove_file(&bin).expect("remove the binary");
    wait_for("the binary put back", || bin.is_file());
    let said = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        said.contains("installed again") && said.contains("now chains it"),
        "each repair is said: {said}"
    );
}
