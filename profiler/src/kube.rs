//! Kubernetes pod metadata for this node: a list + watch of the pods whose `spec.nodeName` is
//! `NODE_NAME`, indexed by container id, so a process's container id (from its cgroup) gives
//! its pod's `__meta_kubernetes_*` labels.
//!
//! The protocol is the API server's own: `GET /api/v1/pods?fieldSelector=spec.nodeName=N`
//! gives the pods and a `resourceVersion`; `…&watch=true&resourceVersion=V&allowWatchBookmarks=true`
//! streams one JSON event per line (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`, `ERROR`). A
//! watch that ends is resumed from the last version seen; `410 Gone` (as a status or an
//! `ERROR` event) means that version is too old, and the pods are listed again. Failures back
//! off (1 s doubling to 30 s). The index keeps what it knew while the API server is away, and
//! nothing here ever blocks sampling: readers take a snapshot of an `Arc`.
//!
//! Credentials: in a pod, the service account (`KUBERNETES_SERVICE_HOST`/`_PORT`, the token and
//! CA under `/var/run/secrets/kubernetes.io/serviceaccount`; the token is read again on each
//! request, as it rotates); elsewhere a kubeconfig (`--kubeconfig`, `KUBECONFIG`): its current
//! context's server, CA, token or client certificate.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use base64::Engine as _;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    labels::{Labels, pods::PodIndex},
    secret::SecretFile,
};

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },
    #[error("in-cluster credentials: {0}")]
    InCluster(String),
    #[error("building the Kubernetes client: {0}")]
    Client(String),
}

/// How to reach the API server.
#[derive(Debug)]
pub struct Connection {
    pub server: reqwest::Url,
    client: reqwest::Client,
    token: Option<Token>,
}

#[derive(Debug)]
enum Token {
    Fixed(String),
    File(SecretFile),
}

/// Publishes the pods' labels by container id.
fn publish(index: &PodIndex, pods: &HashMap<String, Pod>) {
    let mut map = HashMap::new();
    for pod in pods.values() {
        for (id, labels) in pod_labels(pod) {
            map.insert(id, Arc::new(labels));
        }
    }
    index.replace(map, pods.len() as u64);
}

// The parts of the Pod object used here.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Pod {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub resource_version: String,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
    pub controller: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodSpec {
    pub node_name: String,
    pub containers: Vec<Container>,
    pub init_containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Container {
    pub name: String,
    pub image: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodStatus {
    pub phase: String,
    #[serde(rename = "podIP")]
    pub pod_ip: String,
    pub container_statuses: Vec<ContainerStatus>,
    pub init_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ContainerStatus {
    pub name: String,
    /// `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub image: String,
}

#[derive(Debug, Deserialize)]
struct PodList {
    #[serde(default)]
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    #[serde(default)]
    resource_version: String,
}

#[derive(Debug, Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

/// Prometheus' label-name sanitizing: anything but `[a-zA-Z0-9_]` becomes `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// A ReplicaSet named `<deployment>-<pod-template-hash>` belongs to that Deployment.
fn owner(pod: &Pod) -> Option<(String, String)> {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .find(|o| o.controller.unwrap_or(false))
        .or_else(|| pod.metadata.owner_references.first())?;
    if owner.kind == "ReplicaSet"
        && let Some(hash) = pod.metadata.labels.get("pod-template-hash")
        && let Some(deployment) = owner.name.strip_suffix(&format!("-{hash}"))
    {
        return Some(("Deployment".to_owned(), deployment.to_owned()));
    }
    Some((owner.kind.clone(), owner.name.clone()))
}

/// The `__meta_kubernetes_*` labels of each of a pod's containers, by container id.
pub fn pod_labels(pod: &Pod) -> Vec<(String, Labels)> {
    let mut base = Labels::new();
    let m = &pod.metadata;
    base.insert("__meta_kubernetes_namespace".into(), m.namespace.clone());
    base.insert("__meta_kubernetes_pod_name".into(), m.name.clone());
    base.insert("__meta_kubernetes_pod_uid".into(), m.uid.clone());
    base.insert(
        "__meta_kubernetes_pod_node_name".into(),
        pod.spec.node_name.clone(),
    );
    base.insert("__meta_kubernetes_pod_phase".into(), pod.status.phase.clone());
    if !pod.status.pod_ip.is_empty() {
        base.insert("__meta_kubernetes_pod_ip".into(), pod.status.pod_ip.clone());
    }
    // Labels first, then annotations, each in name order, within one byte budget: a pod
    // cannot make every one of its processes carry 256 KiB of annotations.
    let subject = format!("pod {}/{}", m.namespace, m.name);
    let mut budget = crate::limits::MAX_POD_META_BYTES;
    for (kind, map) in [("label", &m.labels), ("annotation", &m.annotations)] {
        let mut pairs: Vec<(&String, &String)> = map.iter().collect();
        pairs.sort_unstable();
        for (k, v) in pairs {
            let name = sanitize(k);
            let size = name.len() + v.len();
            base.insert(
                format!("__meta_kubernetes_pod_{kind}present_{name}"),
                "true".into(),
            );
            if v.len() > crate::limits::MAX_META_VALUE_BYTES || size > budget {
                crate::limits::hit(crate::limits::Limit::PodMetadata, &subject);
                continue;
            }
            budget -= size;
            base.insert(format!("__meta_kubernetes_pod_{kind}_{name}"), v.clone());
        }
    }
    if let Some((kind, name)) = owner(pod) {
        base.insert("__meta_kubernetes_pod_controller_kind".into(), kind);
        base.insert("__meta_kubernetes_pod_controller_name".into(), name);
    }
    let statuses = pod
        .status
        .container_statuses
        .iter()
        .map(|s| (s, false))
        .chain(pod.status.init_container_statuses.iter().map(|s| (s, true)));
    let mut out = Vec::new();
    for (status, init) in statuses {
        let Some((_, id)) = status.container_id.split_once("://") else {
            continue;
        };
        if id.is_empty() {
            continue;
        }
        let mut labels = base.clone();
        labels.insert("__meta_kubernetes_pod_container_name".into(), status.name.clone());
        labels.insert(
            "__meta_kubernetes_pod_container_id".into(),
            status.container_id.clone(),
        );
        labels.insert("__meta_kubernetes_pod_container_init".into(), init.to_string());
        let image = pod
            .spec
            .containers
            .iter()
            .chain(&pod.spec.init_containers)
            .find(|c| c.name == status.name)
            .map_or(status.image.clone(), |c| c.image.clone());
        labels.insert("__meta_kubernetes_pod_container_image".into(), image);
        out.push((id.to_ascii_lowercase(), labels));
    }
    out
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Kubeconfig {
    #[serde(rename = "current-context")]
    current_context: String,
    clusters: Vec<Named<KubeCluster>>,
    contexts: Vec<Named<KubeContext>>,
    users: Vec<Named<KubeUser>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Named<T: Default> {
    name: String,
    #[serde(alias = "cluster", alias = "context", alias = "user")]
    value: T,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
struct KubeCluster {
    server: String,
    certificate_authority: Option<PathBuf>,
    certificate_authority_data: Option<String>,
    insecure_skip_tls_verify: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KubeContext {
    cluster: String,
    user: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
struct KubeUser {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    client_certificate: Option<PathBuf>,
    client_certificate_data: Option<String>,
    client_key: Option<PathBuf>,
    client_key_data: Option<String>,
}

fn base64_pem(data: &str, what: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("{what} is not base64: {e}"))
}

impl Connection {
    /// From a kubeconfig file (its current context).
    pub fn from_kubeconfig(path: &Path) -> Result<Self, KubeError> {
        let fail = |reason: String| KubeError::Kubeconfig {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let config: Kubeconfig = serde_norway::from_str(&text).map_err(|e| fail(e.to_string()))?;
        let context = config
            .contexts
            .iter()
            .find(|c| c.name == config.current_context)
            .or_else(|| config.contexts.first())
            .ok_or_else(|| fail("no context".into()))?;
        let cluster = config
            .clusters
            .iter()
            .find(|c| c.name == context.value.cluster)
            .ok_or_else(|| fail(format!("no cluster `{}`", context.value.cluster)))?;
        let user = config.users.iter().find(|u| u.name == context.value.user);
        let relative = |p: &Path| match path.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_owned(),
        };
        let read = |p: &Path, what: &str| {
            std::fs::read(relative(p)).map_err(|e| fail(format!("{what} {}: {e}", p.display())))
        };
        let server = reqwest::Url::parse(&cluster.value.server)
            .map_err(|e| fail(format!("server `{}`: {e}", cluster.value.server)))?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(5));
        let ca = match (
            &cluster.value.certificate_authority_data,
            &cluster.value.certificate_authority,
        ) {
            (Some(data), _) => Some(base64_pem(data, "certificate-authority-data").map_err(fail)?),
            (None, Some(file)) => Some(read(file, "certificate-authority")?),
            _ => None,
        };
        if let Some(pem) = ca {
            for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| fail(e.to_string()))? {
                builder = builder.add_root_certificate(cert);
            }
        }
        if cluster.value.insecure_skip_tls_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let mut token = None;
        if let Some(user) = user {
            let u = &user.value;
            let cert = match (&u.client_certificate_data, &u.client_certificate) {
                (Some(d), _) => Some(base64_pem(d, "client-certificate-data").map_err(fail)?),
                (None, Some(f)) => Some(read(f, "client-certificate")?),
                _ => None,
            };
            let key = match (&u.client_key_data, &u.client_key) {
                (Some(d), _) => Some(base64_pem(d, "client-key-data").map_err(fail)?),
                (None, Some(f)) => Some(read(f, "client-key")?),
                _ => None,
            };
            if let (Some(mut cert), Some(key)) = (cert, key) {
                cert.push(b'\n');
                cert.extend(key);
                let identity = reqwest::Identity::from_pem(&cert).map_err(|e| fail(e.to_string()))?;
                builder = builder.identity(identity);
            }
            token = match (&u.token, &u.token_file) {
                (Some(t), _) => Some(Token::Fixed(t.clone())),
                (None, Some(f)) => Some(Token::File(SecretFile::new(&relative(f)))),
                _ => None,
            };
        }
        let client = builder.build().map_err(|e| KubeError::Client(e.to_string()))?;
        Ok(Self {
            server,
            client,
            token,
        })
    }

    /// From the pod's service account.
    pub fn in_cluster() -> Result<Self, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| KubeError::InCluster("KUBERNETES_SERVICE_HOST is not set".into()))?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let server = reqwest::Url::parse(&format!("https://{host}:{port}"))
            .map_err(|e| KubeError::InCluster(e.to_string()))?;
        let ca_path = Path::new(SERVICE_ACCOUNT).join("ca.crt");
        let ca = std::fs::read(&ca_path)
            .map_err(|e| KubeError::InCluster(format!("{}: {e}", ca_path.display())))?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(5));
        for cert in
            reqwest::Certificate::from_pem_bundle(&ca).map_err(|e| KubeError::InCluster(e.to_string()))?
        {
            builder = builder.add_root_certificate(cert);
        }
        let token = SecretFile::new(&Path::new(SERVICE_ACCOUNT).join("token"));
        token.get().map_err(KubeError::InCluster)?;
        let client = builder.build().map_err(|e| KubeError::Client(e.to_string()))?;
        Ok(Self {
            server,
            client,
            token: Some(Token::File(token)),
        })
    }

    fn get(
        &self,
        query: &[(&str, &str)],
        timeout: Option<Duration>,
    ) -> Result<reqwest::RequestBuilder, String> {
        let url = self
            .server
            .join("api/v1/pods")
            .map_err(|e| format!("API path: {e}"))?;
        let mut request = self.client.get(url).query(query);
        if let Some(t) = timeout {
            request = request.timeout(t);
        }
        match &self.token {
            Some(Token::Fixed(t)) => request = request.bearer_auth(t),
            Some(Token::File(f)) => request = request.bearer_auth(f.get()?),
            None => {}
        }
        Ok(request)
    }
}

/// Why a list or watch round ended.
enum Ended {
    /// The version is too old: list again.
    Gone,
    /// Resume watching from the last version.
    Resume,
    Failed(String),
    Cancelled,
}

/// Keeps `index` up to date with the pods on `node` until `cancel`.
pub async fn watch(connection: Connection, node: String, index: Arc<PodIndex>, cancel: CancellationToken) {
    let selector = format!("spec.nodeName={node}");
    let mut pods: HashMap<String, Pod> = HashMap::new();
    let mut version: Option<String> = None;
    let mut backoff = Duration::from_secs(1);
    loop {
        let ended = match &version {
            None => match list(&connection, &selector).await {
                Ok((items, v)) => {
                    pods = items.into_iter().map(|p| (p.metadata.uid.clone(), p)).collect();
                    publish(&index, &pods);
                    index.connected.store(true, std::sync::atomic::Ordering::Relaxed);
                    info!(node = %node, pods = pods.len(), "listed the pods of this node");
                    version = Some(v);
                    backoff = Duration::from_secs(1);
                    continue;
                }
                Err(e) => Ended::Failed(e),
            },
            Some(v) => {
                let v = v.clone();
                tokio::select! {
                    ended = watch_once(&connection, &selector, &v, &mut pods, &index, &mut version) => ended,
                    () = cancel.cancelled() => Ended::Cancelled,
                }
            }
        };
        match ended {
            Ended::Cancelled => return,
            Ended::Resume => {
                backoff = Duration::from_secs(1);
                continue;
            }
            Ended::Gone => {
                debug!("watch version expired (410 Gone); listing again");
                version = None;
                continue;
            }
            Ended::Failed(reason) => {
                index.connected.store(false, std::sync::atomic::Ordering::Relaxed);
                warn!(%reason, retry_in = ?backoff, "Kubernetes API unavailable; keeping the pod labels known so far");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn list(connection: &Connection, selector: &str) -> Result<(Vec<Pod>, String), String> {
    let request = connection.get(&[("fieldSelector", selector)], Some(Duration::from_secs(30)))?;
    let response = request.send().await.map_err(|e| format!("listing pods: {e}"))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| format!("listing pods: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "listing pods: HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
    let list: PodList = serde_json::from_slice(&body).map_err(|e| format!("pod list: {e}"))?;
    Ok((list.items, list.metadata.resource_version))
}

async fn watch_once(
    connection: &Connection,
    selector: &str,
    from: &str,
    pods: &mut HashMap<String, Pod>,
    index: &PodIndex,
    version: &mut Option<String>,
) -> Ended {
    let request = match connection.get(
        &[
            ("fieldSelector", selector),
            ("watch", "true"),
            ("resourceVersion", from),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", "290"),
        ],
        Some(Duration::from_secs(300)),
    ) {
        Ok(r) => r,
        Err(e) => return Ended::Failed(e),
    };
    let mut response = match request.send().await {
        Ok(r) => r,
        Err(e) => return Ended::Failed(format!("watching pods: {e}")),
    };
    if response.status() == reqwest::StatusCode::GONE {
        return Ended::Gone;
    }
    if !response.status().is_success() {
        return Ended::Failed(format!("watching pods: HTTP {}", response.status()));
    }
    index.connected.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(c)) => c,
            // The server closed the watch (its timeout): resume from the last version.
            Ok(None) => return Ended::Resume,
            Err(e) => return Ended::Failed(format!("watch stream: {e}")),
        };
        buffer.extend_from_slice(&chunk);
        if buffer.len() > 64 << 20 {
            return Ended::Failed("a watch event over 64 MiB".into());
        }
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event: WatchEvent = match serde_json::from_slice(&line) {
                Ok(e) => e,
                Err(e) => return Ended::Failed(format!("watch event: {e}")),
            };
            match event.kind.as_str() {
                "ERROR" => {
                    let code = event.object.get("code").and_then(serde_json::Value::as_u64);
                    return if code == Some(410) {
                        Ended::Gone
                    } else {
                        Ended::Failed(format!("watch error: {}", event.object))
                    };
                }
                "BOOKMARK" => {
                    if let Some(v) = event
                        .object
                        .pointer("/metadata/resourceVersion")
                        .and_then(serde_json::Value::as_str)
                    {
                        *version = Some(v.to_owned());
                    }
                }
                kind @ ("ADDED" | "MODIFIED" | "DELETED") => {
                    let pod: Pod = match serde_json::from_value(event.object) {
                        Ok(p) => p,
                        Err(e) => return Ended::Failed(format!("watch event pod: {e}")),
                    };
                    if !pod.metadata.resource_version.is_empty() {
                        *version = Some(pod.metadata.resource_version.clone());
                    }
                    debug!(kind, pod = %pod.metadata.name, namespace = %pod.metadata.namespace, "pod event");
                    if kind == "DELETED" {
                        pods.remove(&pod.metadata.uid);
                    } else {
                        pods.insert(pod.metadata.uid.clone(), pod);
                    }
                    publish(index, pods);
                }
                other => debug!(kind = other, "unknown watch event ignored"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_cannot_make_its_processes_carry_its_whole_metadata() {
        use crate::limits::{HITS, Limit, MAX_META_VALUE_BYTES, MAX_POD_META_BYTES};
        let mut pod = Pod::default();
        pod.metadata.name = "big".into();
        pod.metadata.labels.insert("app".into(), "shop".into());
        // A 256 KiB annotation (Kubernetes' limit for all of them) and many small ones.
        pod.metadata.annotations.insert(
            "kubectl.kubernetes.io/last-applied-configuration".into(),
            "x".repeat(256 << 10),
        );
        for i in 0..1000 {
            pod.metadata
                .annotations
                .insert(format!("note-{i:04}"), "y".repeat(100));
        }
        pod.status.container_statuses.push(ContainerStatus {
            name: "main".into(),
            container_id: "containerd://abc".into(),
            ..Default::default()
        });
        let before = HITS.count(Limit::PodMetadata);
        let labels = pod_labels(&pod);
        let (_, l) = &labels[0];
        assert_eq!(l["__meta_kubernetes_pod_label_app"], "shop", "labels come first");
        let name = "__meta_kubernetes_pod_annotation_kubectl_kubernetes_io_last_applied_configuration";
        assert!(
            !l.contains_key(name),
            "a value over {MAX_META_VALUE_BYTES} bytes is left out"
        );
        assert_eq!(
            l["__meta_kubernetes_pod_annotationpresent_kubectl_kubernetes_io_last_applied_configuration"],
            "true"
        );
        let values: usize = l
            .iter()
            .filter_map(|(k, v)| {
                let name = k
                    .strip_prefix("__meta_kubernetes_pod_annotation_")
                    .or_else(|| k.strip_prefix("__meta_kubernetes_pod_label_"))?;
                Some(name.len() + v.len())
            })
            .sum();
        assert!(values <= MAX_POD_META_BYTES, "{values}");
        assert!(
            l.contains_key("__meta_kubernetes_pod_annotation_note_0000"),
            "in name order"
        );
        assert!(!l.contains_key("__meta_kubernetes_pod_annotation_note_0999"));
        assert!(HITS.count(Limit::PodMetadata) >= before + 2);
    }

    #[test]
    fn pod_json_gives_labels_per_container() {
        let json = r#"{
          "metadata": {"name": "checkout-7d9f8c-abcde", "namespace": "payments", "uid": "u-1",
            "resourceVersion": "42",
            "labels": {"app.kubernetes.io/name": "checkout", "pod-template-hash": "7d9f8c"},
            "annotations": {"pyroscope.io/service_name": "checkout-svc"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "checkout-7d9f8c", "controller": true}]},
          "spec": {"nodeName": "node-1", "containers": [{"name": "main", "image": "shop/checkout:1.2"}]},
          "status": {"phase": "Running", "podIP": "10.0.0.7", "containerStatuses": [
            {"name": "main", "containerID": "containerd://ABCDEF0123", "image": "docker.io/shop/checkout:1.2"},
            {"name": "sidecar", "containerID": ""}]}
        }"#;
        let pod: Pod = serde_json::from_str(json).expect("pod");
        let labels = pod_labels(&pod);
        assert_eq!(labels.len(), 1, "a container without an id yet is skipped");
        let (id, l) = &labels[0];
        assert_eq!(id, "abcdef0123");
        assert_eq!(l["__meta_kubernetes_namespace"], "payments");
        assert_eq!(l["__meta_kubernetes_pod_container_name"], "main");
        assert_eq!(l["__meta_kubernetes_pod_container_image"], "shop/checkout:1.2");
        assert_eq!(
            l["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
            "checkout"
        );
        assert_eq!(
            l["__meta_kubernetes_pod_annotation_pyroscope_io_service_name"],
            "checkout-svc"
        );
        assert_eq!(l["__meta_kubernetes_pod_controller_kind"], "Deployment");
        assert_eq!(l["__meta_kubernetes_pod_controller_name"], "checkout");
        assert_eq!(l["__meta_kubernetes_pod_node_name"], "node-1");
    }

    #[test]
    fn kubeconfig_current_context_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "abc\n").expect("write");
        let path = dir.path().join("config");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: b\nclusters:\n- name: ca\n  cluster: {server: 'http://127.0.0.1:1'}\n- name: cb\n  cluster: {server: 'http://127.0.0.1:2'}\ncontexts:\n- name: a\n  context: {cluster: ca, user: u}\n- name: b\n  context: {cluster: cb, user: u}\nusers:\n- name: u\n  user: {tokenFile: token}\n",
        )
        .expect("write");
        let c = Connection::from_kubeconfig(&path).expect("kubeconfig");
        assert_eq!(c.server.as_str(), "http://127.0.0.1:2/");
        assert!(matches!(&c.token, Some(Token::File(f)) if f.get().as_deref() == Ok("abc")));
        let err = Connection::from_kubeconfig(&dir.path().join("missing")).expect_err("missing");
        assert!(err.to_string().contains("kubeconfig"), "{err}");
    }
}
