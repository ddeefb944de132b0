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
    let echo = format!("{}/helpers/http_echo.py", env!("CARGO_MANIFEST_DIR"));
    tb.start_server_in(
        &b,
        Some("api.service"),
        "echo",
        &["python3", "-u", &echo, "8080"],
        8080,
    )
    .expect("server");

    // This node's pods, served by the API stand-in in a's netns.
    let pods = tb.dir.join("pods");
    fs::create_dir_all(&pods).expect("pods dir");
    let (u1, c1) = ("0f5e1c2a-1111-4a5b-8c9d-000000000001", "a1".repeat(32));
    let (u2, c2) = ("0f5e1c2a-2222-4a5b-8c9d-000000000002", "b2".repeat(32));
    let (u3, c3) = ("0f5e1c2a-3333-4a5b-8c9d-000000000003", "c3".repeat(32));
    write_pod(&pods, u1, &pod(u1, "support", "support", &c1));
    write_pod(&pods, u2, &pod(u2, "research", "research", &c2));
    // A pod of another node: not this agent's.
    let mut other = pod(u3, "support", "elsewhere", &c3);
    other["spec"]["nodeName"] = json!("worker-2");
    write_pod(&pods, u3, &other);
    let token = tb.dir.join("token");
    fs::write(&token, TOKEN).expect("token");
    let api = format!("{}/helpers/k8s_api.py", env!("CARGO_MANIFEST_DIR"));
    let api_pid = tb
        .start_server(
            &a,
            "k8s-api",
            &[
                "python3",
                "-u",
                &api,
                "6443",
                &pods.display().to_string(),
                TOKEN,
            ],
            6443,
        )
        .expect("the API stand-in");

    // No entry for the support pod (its identity comes from its namespace
    // and service account); an entry for the research pod's label; and one
    // pinned to a container id, which only a pod the API knows may use.
    let (u4, c4) = ("0f5e1c2a-4444-4a5b-8c9d-000000000004", "d4".repeat(32));
    // The kubelet's pod cgroup on this test node: its kubepods slice.
    let mount = enforcer_tests::cgroup2_mount().expect("cgroup2");
    let pods_cgroup = Path::new("/")
        .join(a.cgroup.strip_prefix(&mount).expect("under cgroup2"))
        .join("kubepods-besteffort.slice");
    let a_tail = format!(
        "{}{}\n{MESH}\n[kubernetes]\napi_server = \"http://127.0.0.1:6443\"\ntoken_file = \"{}\"\nnode = \"{K8S_NODE}\"\npods_cgroup = [\"{}\"]\n",
        entry(RESEARCH_ID, "k8s:pod-label:app:research"),
        entry(PINNED_ID, &format!("container:id:{c4}")),
        token.display(),
        pods_cgroup.display()
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
