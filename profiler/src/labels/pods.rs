//! This node's pods by container id, published by the Kubernetes watch ([`crate::kube`]) and
//! read by discovery: a process in a container of a known pod gets the pod's
//! `__meta_kubernetes_*` labels.
use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use super::Labels;
use crate::telemetry::{Collect, Exposition};

/// The pods of this node, by container id. The map is swapped whole, so a reader never waits
/// for a list or watch in progress.
#[derive(Debug, Default)]
pub struct PodIndex {
    /// container id → the pod's labels for that container.
    by_container: RwLock<Arc<HashMap<String, Arc<Labels>>>>,
    /// Pods known, for /metrics.
    pub pods: AtomicU64,
    /// Whether the last list or watch worked.
    pub connected: AtomicBool,
}

impl PodIndex {
    /// The labels of the pod that runs `container_id`, if it is known.
    pub fn get(&self, container_id: &str) -> Option<Arc<Labels>> {
        let map = self
            .by_container
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(container_id).cloned()
    }

    /// Replaces the whole index: `by_container` from `pods` pods.
    pub fn replace(&self, by_container: HashMap<String, Arc<Labels>>, pods: u64) {
        self.pods.store(pods, Ordering::Relaxed);
        *self
            .by_container
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(by_container);
    }
}

impl Collect for PodIndex {
    fn collect(&self, out: &mut Exposition) {
        out.gauge(
            "profiler_kubernetes_pods",
            "Pods of this node known from the API server.",
            self.pods.load(Ordering::Relaxed) as f64,
        );
        out.gauge(
            "profiler_kubernetes_connected",
            "1 when the last list or watch of the API server worked.",
            f64::from(u8::from(self.connected.load(Ordering::Relaxed))),
        );
    }
}
