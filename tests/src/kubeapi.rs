//! An in-test Kubernetes API server for pods, speaking the real list/watch protocol:
//! `GET /api/v1/pods?fieldSelector=spec.nodeName=N` (a PodList with a `resourceVersion`) and
//! `…&watch=true&resourceVersion=V&allowWatchBookmarks=true` (a chunked stream of JSON
//! events: `ADDED`, `MODIFIED`, `DELETED`, periodic `BOOKMARK`s, and an `ERROR` with code 410
//! when `V` is older than the history it keeps). Requests need `Authorization: Bearer <token>`.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::backends::{Serving, serving_runtime};

pub const TOKEN: &str = "kube-test-token";

#[derive(Debug)]
struct Inner {
    /// Current pods by name.
    pods: Vec<Value>,
    version: u64,
    /// (version, event) since `oldest`.
    history: Vec<(u64, Value)>,
    /// Watches from a version below this get 410 Gone.
    oldest: u64,
    lists: u64,
    watches: u64,
}

struct Shared {
    node: String,
    inner: Mutex<Inner>,
    events: broadcast::Sender<(u64, Value)>,
}

/// A running API server; stops when dropped.
pub struct KubeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Stops the server when the handle is dropped.
    _server: Serving,
}

/// A running pod on `node` with one container `container` whose runtime id is `container_id`.
pub fn pod(
    name: &str,
    namespace: &str,
    node: &str,
    container: &str,
    container_id: &str,
    labels: Value,
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": format!("uid-{namespace}-{name}"),
            "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-rs"), "controller": true}]
        },
        "spec": {"nodeName": node, "containers": [{"name": container, "image": "example/app:1"}]},
        "status": {
            "phase": "Running",
            "podIP": "10.1.2.3",
            "containerStatuses": [{"name": container, "containerID": format!("containerd://{container_id}"), "image": "example/app:1", "ready": true}]
        }
    })
}

impl KubeApi {
    pub fn start(node: &str) -> Self {
        let (events, _) = broadcast::channel(64);
        let shared = Arc::new(Shared {
            node: node.to_owned(),
            inner: Mutex::new(Inner {
                pods: Vec::new(),
                version: 100,
                history: Vec::new(),
                oldest: 100,
                lists: 0,
                watches: 0,
            }),
            events,
        });
        let (runtime, listener, addr) = serving_runtime("127.0.0.1:0".parse().expect("addr"));
        let app = Router::new()
            .route("/api/v1/pods", get(pods))
            .with_state(Arc::clone(&shared));
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            shared,
            _server: runtime,
        }
    }

    /// A kubeconfig for this server (token auth) written to `path`.
    pub fn kubeconfig(&self, path: &std::path::Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\nclusters:\n- name: test\n  cluster:\n    server: http://{}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\nusers:\n- name: test\n  user: {{token: {TOKEN}}}\n",
            self.addr
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    fn event(&self, kind: &str, mut object: Value) {
        let mut inner = self.shared.inner.lock().expect("lock");
        inner.version += 1;
        let version = inner.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let name = object["metadata"]["name"].clone();
        inner.pods.retain(|p| p["metadata"]["name"] != name);
        if kind != "DELETED" {
            inner.pods.push(object.clone());
        }
        let event = json!({"type": kind, "object": object});
        inner.history.push((version, event.clone()));
        let _ = self.shared.events.send((version, event));
    }

    pub fn add(&self, pod: Value) {
        self.event("ADDED", pod);
    }

    pub fn delete(&self, pod: Value) {
        self.event("DELETED", pod);
    }

    /// Forgets the event history: open watches get an `ERROR` 410 event, and watches from an
    /// older version get 410, so clients must list again.
    pub fn expire(&self) {
        let mut inner = self.shared.inner.lock().expect("lock");
        inner.version += 1;
        inner.oldest = inner.version;
        inner.history.clear();
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}});
        let _ = self.shared.events.send((inner.version, gone));
    }

    /// (lists, watches) served so far.
    pub fn requests(&self) -> (u64, u64) {
        let inner = self.shared.inner.lock().expect("lock");
        (inner.lists, inner.watches)
    }
}

async fn pods(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(TOKEN) {
        return (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
    }
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if get("fieldSelector") != Some(format!("spec.nodeName={}", shared.node)) {
        return (StatusCode::BAD_REQUEST, "this test server serves one node's pods").into_response();
    }
    let status = |code: u16, message: &str| {
        (
            StatusCode::from_u16(code).expect("code"),
            [(header::CONTENT_TYPE, "application/json")],
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code})
                .to_string(),
        )
            .into_response()
    };
    if get("watch").as_deref() != Some("true") {
        let mut inner = shared.inner.lock().expect("lock");
        inner.lists += 1;
        let list = json!({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": inner.version.to_string()},
            "items": inner.pods,
        });
        return ([(header::CONTENT_TYPE, "application/json")], list.to_string()).into_response();
    }
    let Some(from) = get("resourceVersion").and_then(|v| v.parse::<u64>().ok()) else {
        return status(400, "resourceVersion required for this test server's watch");
    };
    let (backlog, mut live) = {
        let mut inner = shared.inner.lock().expect("lock");
        inner.watches += 1;
        if from < inner.oldest {
            return status(410, "too old resource version");
        }
        let backlog: Vec<Value> = inner
            .history
            .iter()
            .filter(|(v, _)| *v > from)
            .map(|(_, e)| e.clone())
            .collect();
        (backlog, shared.events.subscribe())
    };
    let bookmarks = Arc::clone(&shared);
    let stream = async_stream(move |tx| async move {
        for event in backlog {
            if tx.send(line(&event)).await.is_err() {
                return;
            }
        }
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                event = live.recv() => match event {
                    Ok((_, event)) => {
                        let error = event["type"] == "ERROR";
                        if tx.send(line(&event)).await.is_err() || error {
                            return;
                        }
                    }
                    Err(_) => return,
                },
                _ = tick.tick() => {
                    let version = bookmarks.inner.lock().expect("lock").version;
                    let bookmark = json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                        "metadata": {"resourceVersion": version.to_string()}}});
                    if tx.send(line(&bookmark)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    ([(header::CONTENT_TYPE, "application/json")], stream).into_response()
}

fn line(event: &Value) -> Result<Vec<u8>, std::io::Error> {
    let mut bytes = event.to_string().into_bytes();
    bytes.push(b'\n');
    Ok(bytes)
}

/// A streaming body fed by a task through a small channel.
fn async_stream<F, Fut>(produce: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(produce(tx));
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}
