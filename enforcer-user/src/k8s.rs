//! Pod metadata from the Kubernetes API (config `[kubernetes]`, DESIGN
//! §1.9): a watch of this node's pods (`spec.nodeName`), kept by pod UID, so
//! that attestation can turn the pod UID and container id it reads from a
//! workload's cgroup into `k8s:ns`, `k8s:sa`, `k8s:pod-name`,
//! `k8s:pod-label:K:V`, `k8s:container-name` and `k8s:container-image`
//! selectors, and a pod that no registration entry names into
//! `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
//!
//! Fail closed: until the first list of this node's pods arrives, and for a
//! pod UID the watch has not shown (a new pod while the API is unreachable),
//! a workload in a pod gets no identity. Pods already known keep theirs
//! while the API is unreachable. Both show on `/readyz`.
use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use spiffe::SpiffeId;
use tracing::{info, warn};

use crate::config::KubernetesConfig;

/// Label selectors kept per pod at most (more are not turned into
/// selectors: a pod cannot grow the agent's memory without bound).
const MAX_LABELS: usize = 64;

/// What the API says of one pod, as attestation uses it: worked out once
/// when the watch shows the pod, not for each connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub service_account: String,
    /// `k8s:ns`, `k8s:sa`, `k8s:pod-name` and `k8s:pod-label` selectors.
    pod_selectors: Vec<String>,
    /// By container id (the 64 hex digits of the runtime's id): its
    /// `k8s:container-name` and `k8s:container-image` selectors.
    containers: HashMap<String, [String; 2]>,
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`, for a pod no entry names.
    pub spiffe_id: Option<SpiffeId>,
}

impl PodMeta {
    fn of(pod: &Pod, trust_domain: &str) -> Option<(String, Self)> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone()?;
        let mut containers = HashMap::new();
        for s in pod.status.iter().flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
        }) {
            // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`
            if let Some((_, id)) = s.container_id.as_deref().and_then(|c| c.rsplit_once("://")) {
                containers.insert(
                    id.to_owned(),
                    [
                        format!("k8s:container-name:{}", s.name),
                        format!("k8s:container-image:{}", s.image),
                    ],
                );
            }
        }
        let namespace = meta.namespace.clone().unwrap_or_default();
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned());
        let mut pod_selectors = vec![
            format!("k8s:ns:{namespace}"),
            format!("k8s:sa:{service_account}"),
            format!("k8s:pod-name:{}", meta.name.as_deref().unwrap_or_default()),
        ];
        for (k, v) in meta.labels.iter().flatten().take(MAX_LABELS) {
            pod_selectors.push(format!("k8s:pod-label:{k}:{v}"));
        }
        let spiffe_id = SpiffeId::new(format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
        .ok();
        Some((
            uid,
            Self {
                namespace,
                service_account,
                pod_selectors,
                containers,
                spiffe_id,
            },
        ))
    }

    /// The selectors of this pod, and of the container `container_id` in it.
    pub fn selectors<'a>(&'a self, container_id: Option<&str>) -> impl Iterator<Item = &'a String> {
        let container = container_id.and_then(|id| self.containers.get(id));
        self.pod_selectors
            .iter()
            .chain(container.into_iter().flatten())
    }
}

#[derive(Default)]
struct State {
    by_uid: HashMap<String, Arc<PodMeta>>,
    /// The first complete list arrived.
    synced: bool,
    /// The watch fails now: since when, and why.
    failing: Option<(SystemTime, String)>,
}

/// This node's pods, as the watch last saw them.
pub struct Pods {
    state: RwLock<State>,
    trust_domain: String,
}

/// What attestation learns of a pod UID.
pub enum Lookup {
    /// A pod of this node: its metadata.
    Known(Arc<PodMeta>),
    /// Not (yet) seen: no identity (fail closed).
    Unknown,
}

impl Pods {
    /// No pods yet; identities of pods in `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        Self {
            state: RwLock::default(),
            trust_domain: trust_domain.to_owned(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lookup(&self, uid: &str) -> Lookup {
        match self.read().by_uid.get(uid) {
            Some(m) => Lookup::Known(m.clone()),
            None => Lookup::Unknown,
        }
    }

    /// `Err(why)` until the first list, and while the watch fails.
    pub fn readiness(&self) -> Result<(), String> {
        let s = self.read();
        if let Some((since, why)) = &s.failing {
            let ago = since.elapsed().map_or(0, |d| d.as_secs());
            return Err(format!(
                "kubernetes API unreachable for {ago} s ({why}): known pods keep their identities, new pods get none"
            ));
        }
        if !s.synced {
            return Err("waiting for the first list of this node's pods".into());
        }
        Ok(())
    }

    /// The watch as `/status` shows it.
    pub fn status(&self, node: &str) -> serde_json::Value {
        let s = self.read();
        serde_json::json!({
            "node": node,
            "pods_known": s.by_uid.len(),
            "listed": s.synced,
            "failing_since": s.failing.as_ref().map(|(t, _)| crate::timefmt::rfc3339(*t)),
            "error": s.failing.as_ref().map(|(_, e)| e),
        })
    }

    /// Pods known now.
    pub fn len(&self) -> usize {
        self.read().by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn apply(&self, event: watcher::Event<Pod>, init: &mut Option<HashMap<String, Arc<PodMeta>>>) {
        match event {
            watcher::Event::Init => *init = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(buf), Some((uid, meta))) =
                    (init.as_mut(), PodMeta::of(&pod, &self.trust_domain))
                {
                    buf.insert(uid, Arc::new(meta));
                }
            }
            watcher::Event::InitDone => {
                let listed = init.take().unwrap_or_default();
                let mut s = self.write();
                info!(pods = listed.len(), "kubernetes: this node's pods listed");
                s.by_uid = listed;
                s.synced = true;
                s.failing = None;
            }
            watcher::Event::Apply(pod) => {
                if let Some((uid, meta)) = PodMeta::of(&pod, &self.trust_domain) {
                    let mut s = self.write();
                    s.by_uid.insert(uid, Arc::new(meta));
                    s.failing = None;
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(uid) = &pod.metadata.uid {
                    let mut s = self.write();
                    s.by_uid.remove(uid);
                    s.failing = None;
                }
            }
        }
    }

    fn failed(&self, why: String) {
        let mut s = self.write();
        if s.failing.is_none() {
            warn!(error = %why, known_pods = s.by_uid.len(),
                "kubernetes: the watch of this node's pods fails; known pods keep their identities, new pods get none");
            s.failing = Some((SystemTime::now(), why));
        }
    }
}

/// A client for the API server of `config`: `api_server` with
/// `token_file`/`ca_file`, or in-cluster (the pod's service account) when
/// `api_server` is empty. Its connections leave from the agent's marked
/// sockets, like every connection of the agent.
pub fn client(config: &KubernetesConfig) -> Result<kube::Client, String> {
    use kube::client::ConfigExt as _;
    let mut kc = if config.api_server.is_empty() {
        kube::Config::incluster().map_err(|e| format!("in-cluster configuration: {e}"))?
    } else {
        let url = config
            .api_server
            .parse::<http::Uri>()
            .map_err(|e| format!("kubernetes.api_server {:?}: {e}", config.api_server))?;
        kube::Config::new(url)
    };
    if let Some(token) = &config.token_file {
        kc.auth_info.token_file = Some(token.display().to_string());
        kc.auth_info.token = None;
    }
    if let Some(ca) = &config.ca_file {
        let pem =
            std::fs::read(ca).map_err(|e| format!("kubernetes.ca_file {}: {e}", ca.display()))?;
        let certs = rustls_pki_types::pem::PemObject::pem_slice_iter(&pem)
            .map(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("kubernetes.ca_file {}: {e}", ca.display()))?;
        kc.root_cert = Some(certs);
    }
    kc.connect_timeout = Some(Duration::from_secs(10));
    let connector = kc
        .rustls_https_connector_with_connector(crate::mark::MarkedConnector)
        .map_err(|e| format!("kubernetes TLS: {e}"))?;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector);
    let auth = kc
        .auth_layer()
        .map_err(|e| format!("kubernetes credentials: {e}"))?;
    let service = tower::ServiceBuilder::new()
        .layer(kc.base_uri_layer())
        .option_layer(auth)
        .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        .service(http);
    Ok(kube::Client::new(service, kc.default_namespace))
}

/// Keeps `pods` up to date with this node's pods until the agent stops;
/// reconnects with backoff when the API is unreachable.
pub async fn watch(pods: Arc<Pods>, client: kube::Client, node: String) {
    let api: kube::Api<Pod> = kube::Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = watcher::watcher(api, config);
    let stream = kube::runtime::WatchStreamExt::default_backoff(stream);
    futures_util::pin_mut!(stream);
    let mut init = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => pods.apply(event, &mut init),
            Err(e) => pods.failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn pod(uid: &str, labels: &[(&str, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"uid": uid, "name": "agent-7f9", "namespace": "agents",
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
            "spec": {"serviceAccountName": "support", "containers": [{"name": "agent", "image": "r/agent:1"}]},
            "status": {"containerStatuses": [{"name": "agent", "image": "r/agent:1", "imageID": "",
                "containerID": "containerd://abc", "ready": true, "restartCount": 0}]}
        }))
        .expect("pod")
    }

    #[test]
    fn a_pods_metadata_becomes_selectors() {
        let (uid, m) = PodMeta::of(&pod("u1", &[("app", "support")]), "td").expect("meta");
        assert_eq!(uid, "u1");
        assert_eq!(
            m.selectors(Some("abc")).collect::<Vec<_>>(),
            [
                "k8s:ns:agents",
                "k8s:sa:support",
                "k8s:pod-name:agent-7f9",
                "k8s:pod-label:app:support",
                "k8s:container-name:agent",
                "k8s:container-image:r/agent:1"
            ]
        );
        // Another container's id: only the pod's.
        assert_eq!(m.selectors(Some("other")).count(), 4);
    }

    #[test]
    fn unknown_until_listed_and_known_pods_stay_when_the_watch_fails() {
        let pods = Pods::new("td");
        assert!(pods.readiness().is_err(), "not ready before the first list");
        let mut init = None;
        pods.apply(watcher::Event::Init, &mut init);
        pods.apply(watcher::Event::InitApply(pod("u1", &[])), &mut init);
        assert!(
            matches!(pods.lookup("u1"), Lookup::Unknown),
            "not before InitDone"
        );
        pods.apply(watcher::Event::InitDone, &mut init);
        assert!(matches!(pods.lookup("u1"), Lookup::Known(_)));
        assert!(pods.readiness().is_ok());
        pods.failed("connection refused".into());
        assert!(
            pods.readiness()
                .is_err_and(|e| e.contains("connection refused"))
        );
        assert!(matches!(pods.lookup("u1"), Lookup::Known(_)), "kept");
        assert!(matches!(pods.lookup("u2"), Lookup::Unknown), "fail closed");
        pods.apply(watcher::Event::Apply(pod("u2", &[])), &mut init);
        assert!(pods.readiness().is_ok(), "the watch is back");
        pods.apply(watcher::Event::Delete(pod("u1", &[])), &mut init);
        assert!(matches!(pods.lookup("u1"), Lookup::Unknown));
    }
}
