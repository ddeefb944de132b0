//! Kubernetes pods in the testbed (DESIGN §6): a pod is a network namespace
//! of its own, wired to its node's netns by the real CNI plugins (`bridge`
//! with `host-local` IPAM, and `loopback`, from Debian's
//! containernetworking-plugins) with `enforcer-cni` chained after them,
//! each plugin called as a container runtime calls it (`CNI_*` variables,
//! the network config on stdin with the previous plugin's result as
//! `prevResult`, in the node's netns).
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};

use crate::{Node, Result, Testbed};

/// Where Debian installs the CNI plugins.
pub const CNI_BIN: &str = "/usr/lib/cni";

/// The pod subnet of the testbed's Kubernetes node (its bridge is .1).
pub const POD_SUBNET: &str = "10.244.1.0/24";

/// `target/debug/enforcer-cni`, built beside `enforcer`.
pub fn enforcer_cni_bin() -> PathBuf {
    let bin = crate::enforcer_bin().with_file_name("enforcer-cni");
    if !bin.is_file() {
        panic!(
            "{} does not exist: build it (`cargo build -p enforcer-cni`; `cargo xtask test` does)",
            bin.display()
        );
    }
    bin
}

fn require_plugins() {
    for p in ["bridge", "host-local", "loopback"] {
        if !Path::new(CNI_BIN).join(p).is_file() {
            panic!(
                "the CNI plugin {CNI_BIN}/{p} is missing: install the Debian package containernetworking-plugins (`cargo xtask setup` does)"
            );
        }
    }
}

/// One pod: its netns (as a [`Node`] whose cgroup is its node's, so a
/// workload unit names the pod's cgroup below it) and its address.
#[derive(Clone, Debug)]
pub struct Pod {
    pub node: Node,
    pub uid: String,
    pub container_id: String,
    pub namespace: String,
    pub name: String,
    /// The result of each network's ADD (by network name), which a runtime
    /// keeps and passes as `prevResult` to CHECK and DEL.
    pub results: std::collections::HashMap<String, Value>,
}

impl Pod {
    /// The cgroup the kubelet (systemd driver) and containerd give this
    /// pod's container, relative to the node's subtree.
    pub fn cgroup(&self) -> String {
        format!(
            "kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
            self.uid.replace('-', "_"),
            self.container_id
        )
    }
}

/// What a CNI call gave: its exit status, stdout and stderr of the plugin
/// that ended the chain.
#[derive(Debug)]
pub struct CniOutcome {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Testbed {
    /// A pod's network namespace on `node` (not wired yet: see [`Testbed::cni`]).
    pub fn pod(
        &mut self,
        node: &Node,
        name: &str,
        uid: &str,
        container_id: &str,
        namespace: &str,
    ) -> Result<Pod> {
        require_plugins();
        let netns = format!("enft-{}-{name}", self.id);
        crate::ip(&["netns", "add", &netns])?;
        self.netns.push(netns.clone());
        Ok(Pod {
            node: Node {
                name: format!("{}-{name}", node.name),
                netns,
                cgroup: node.cgroup.clone(),
                ipv4: String::new(),
                ipv6: String::new(),
            },
            uid: uid.to_owned(),
            container_id: container_id.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            results: Default::default(),
        })
    }

    /// The node's pod network as a node has it: `loopback`, and
    /// `10-k8s.conflist` with `bridge` (cni0, host-local IPAM over
    /// [`POD_SUBNET`]) — then `enforcer-cni install` (as the DaemonSet's
    /// init container runs it) copies itself into the testbed's CNI binary
    /// directory and chains itself in that conflist, pointed at `socket`.
    /// Returns the networks as the runtime then reads them.
    pub fn install_pod_network(&self, socket: &Path) -> Result<Vec<Value>> {
        let (bin, conf) = (self.dir.join("cni/bin"), self.dir.join("cni/net.d"));
        std::fs::create_dir_all(&bin)?;
        std::fs::create_dir_all(&conf)?;
        let list = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                      "routes": [{"dst": "0.0.0.0/0"}],
                      "dataDir": self.dir.join("cni-ipam").display().to_string()}}
        ]});
        let path = conf.join("10-k8s.conflist");
        std::fs::write(&path, serde_json::to_string_pretty(&list)?)?;
        let out = Command::new(enforcer_cni_bin())
            .args(["install", "--bin-dir"])
            .arg(&bin)
            .arg("--conf-dir")
            .arg(&conf)
            .arg("--socket")
            .arg(socket)
            .output()
            .context("enforcer-cni install")?;
        if !out.status.success() {
            bail!(
                "enforcer-cni install failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let installed: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        Ok(vec![
            json!({"cniVersion": "1.0.0", "name": "lo", "plugins": [{"type": "loopback"}]}),
            installed,
        ])
    }

    /// Calls the chains of `networks` for `command` (`ADD`, `DEL`, `CHECK`)
    /// on `pod`, in the node's netns, as a runtime does: ADD in order, each
    /// plugin given the previous one's result; DEL in reverse. Returns the
    /// outcome of the call that failed, or of the last one. On ADD, sets the
    /// pod's address from the result.
    pub fn cni(
        &self,
        node: &Node,
        pod: &mut Pod,
        networks: &[Value],
        command: &str,
    ) -> Result<CniOutcome> {
        // The plugins from Debian, and enforcer-cni where its install put it.
        let path = format!("{CNI_BIN}:{}", self.dir.join("cni/bin").display());
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.container_id, pod.uid
        );
        let mut last = CniOutcome {
            ok: true,
            stdout: String::new(),
            stderr: String::new(),
        };
        let ordered: Vec<&Value> = if command == "DEL" {
            networks.iter().rev().collect()
        } else {
            networks.iter().collect()
        };
        for net in ordered {
            let plugins = net["plugins"]
                .as_array()
                .ok_or_else(|| anyhow!("a network without plugins"))?;
            let plugins: Vec<&Value> = if command == "DEL" {
                plugins.iter().rev().collect()
            } else {
                plugins.iter().collect()
            };
            let ifname = if net["name"] == "lo" { "lo" } else { "eth0" };
            let net_name = net["name"].as_str().unwrap_or_default().to_owned();
            let mut prev: Option<Value> = if command == "ADD" {
                None
            } else {
                pod.results.get(&net_name).cloned()
            };
            for plugin in plugins {
                let mut conf = plugin.clone();
                conf["cniVersion"] = net["cniVersion"].clone();
                conf["name"] = net["name"].clone();
                if let Some(p) = &prev {
                    conf["prevResult"] = p.clone();
                }
                let kind = plugin["type"]
                    .as_str()
                    .ok_or_else(|| anyhow!("a plugin without type"))?;
                let bin = path
                    .split(':')
                    .map(|d| Path::new(d).join(kind))
                    .find(|p| p.is_file())
                    .ok_or_else(|| anyhow!("CNI plugin {kind} not found in {path}"))?;
                let mut child = Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{}", node.netns))
                    .arg("--")
                    .arg(&bin)
                    .env("CNI_COMMAND", command)
                    .env("CNI_CONTAINERID", &pod.container_id)
                    .env("CNI_NETNS", format!("/run/netns/{}", pod.node.netns))
                    .env("CNI_IFNAME", ifname)
                    .env("CNI_PATH", &path)
                    .env("CNI_ARGS", &args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .with_context(|| format!("running {}", bin.display()))?;
                child
                    .stdin
                    .take()
                    .ok_or_else(|| anyhow!("stdin"))?
                    .write_all(conf.to_string().as_bytes())?;
                let out = child.wait_with_output()?;
                last = CniOutcome {
                    ok: out.status.success(),
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                };
                if !last.ok {
                    return Ok(last);
                }
                if command == "ADD" {
                    prev = Some(serde_json::from_str(&last.stdout).with_context(|| {
                        format!("{kind} ADD printed no result: {:?}", last.stdout)
                    })?);
                }
            }
            if command == "ADD"
                && let Some(r) = &prev
            {
                pod.results.insert(net_name.clone(), r.clone());
            }
            if command == "ADD"
                && ifname == "eth0"
                && let Some(ip) = prev.as_ref().and_then(|r| r["ips"][0]["address"].as_str())
            {
                pod.node.ipv4 = ip
                    .split_once('/')
                    .map(|(a, _)| a.to_owned())
                    .ok_or_else(|| anyhow!("a CNI address without prefix: {ip}"))?;
            }
        }
        if command == "ADD" && pod.node.ipv4.is_empty() {
            bail!("the pod network gave the pod no address: {}", last.stdout);
        }
        Ok(last)
    }
}
