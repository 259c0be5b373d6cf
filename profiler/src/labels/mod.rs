//! Who a sample is: each process's discovered metadata (`__meta_*` labels), turned into its
//! target labels by relabeling rules (Prometheus `relabel_configs` semantics, [`relabel`]).
//!
//! Discovered per process, every interval it is sampled in:
//!
//! | label | from |
//! |---|---|
//! | `__meta_process_pid`, `__meta_process_comm` | the process |
//! | `__meta_process_executable_path`, `__meta_process_executable_name` | `/proc/<pid>/exe` |
//! | `__meta_process_cgroup` | `/proc/<pid>/cgroup` (the v2 path, else the most telling v1 one) |
//! | `__meta_container_id`, `__meta_container_runtime` | the cgroup path ([`cgroup`]) |
//! | `__meta_kubernetes_pod_uid` | the cgroup path, under Kubernetes |
//! | `__meta_systemd_unit` | the cgroup path of a host service (`nginx.service`) |
//! | `__meta_kubernetes_*` | the pod of the container, from the API server ([`crate::kube`]) |
//!
//! The built-in rules ([`DEFAULT_RULES`]) run first and give `service_name` (Kubernetes: the
//! `pyroscope.io/service_name` annotation, else the pod label `app.kubernetes.io/name`, else
//! `app`, else the owner's name, else the container's; off Kubernetes: the systemd unit, else
//! the executable's name, else the process name) and `namespace`, `pod`, `node`, `container`
//! (the Kubernetes container name, else the first 12 characters of the container id). The
//! configuration file's `relabel_configs` run after them. Labels still starting with `__`
//! afterwards are dropped, as Prometheus does. A `keep` or `drop` that removes the target
//! drops the process's samples (counted).
pub mod cgroup;
pub mod guard;
pub mod pods;
pub mod relabel;

use std::{path::Path, sync::Arc};

pub use guard::{DEFAULT_LABEL_VALUE_LIMIT, LabelGuard, OVERFLOW_VALUE};
pub use pods::PodIndex;
pub use relabel::{Labels, Rule, RuleConfig};

/// A label selector: every `name=value` must hold.
pub type Selector = Vec<(String, String)>;

/// The discovered and the final labels of one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// Everything discovered (`__meta_*`), before relabeling.
    pub meta: Labels,
    /// After relabeling; `None` when a rule dropped the process.
    pub labels: Option<Labels>,
}

impl Target {
    /// A final label's value, else a discovered one's (filters use both).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.labels
            .as_ref()
            .and_then(|l| l.get(name))
            .or_else(|| self.meta.get(name))
            .map(String::as_str)
    }
}

/// The built-in rules, in YAML as a user would write them; later rules win where their source
/// is set (an empty value does not match `(.+)`).
pub const DEFAULT_RULES: &str = r#"
- {source_labels: [__meta_process_comm], regex: '(.+)', target_label: service_name}
- {source_labels: [__meta_process_executable_name], regex: '(.+)', target_label: service_name}
- {source_labels: [__meta_systemd_unit], regex: '(.+)\.service', target_label: service_name}
- {source_labels: [__meta_kubernetes_pod_container_name], regex: '(.+)', target_label: service_name}
- {source_labels: [__meta_kubernetes_pod_controller_name], regex: '(.+)', target_label: service_name}
- {source_labels: [__meta_kubernetes_pod_label_app], regex: '(.+)', target_label: service_name}
- {source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_name], regex: '(.+)', target_label: service_name}
- {source_labels: [__meta_kubernetes_pod_annotation_pyroscope_io_service_name], regex: '(.+)', target_label: service_name}
- {source_labels: [__meta_kubernetes_namespace], regex: '(.+)', target_label: namespace}
- {source_labels: [__meta_kubernetes_pod_name], regex: '(.+)', target_label: pod}
- {source_labels: [__meta_container_id], regex: '(.{12}).*', target_label: container}
- {source_labels: [__meta_kubernetes_pod_container_name], regex: '(.+)', target_label: container}
- {source_labels: [__meta_kubernetes_pod_node_name], regex: '(.+)', target_label: node}
"#;

/// Computes targets: discovery plus the rules.
#[derive(Debug, Clone)]
pub struct Labeler {
    rules: Arc<[Rule]>,
    /// This node's pods, when the daemon watches the Kubernetes API.
    pods: Option<Arc<PodIndex>>,
}

impl Default for Labeler {
    fn default() -> Self {
        Self::new(&[]).unwrap_or_else(|_| Self {
            rules: Arc::from([]),
            pods: None,
        })
    }
}

/// The built-in rules, compiled.
fn default_rules() -> Vec<Rule> {
    let configs: Vec<RuleConfig> = serde_norway::from_str(DEFAULT_RULES).unwrap_or_default();
    relabel::compile(&configs).unwrap_or_default()
}

impl Labeler {
    /// The built-in rules followed by the user's; an error names the user rule's index.
    pub fn new(user: &[RuleConfig]) -> Result<Self, (usize, String)> {
        let mut rules = default_rules();
        rules.extend(relabel::compile(user)?);
        Ok(Self {
            rules: rules.into(),
            pods: None,
        })
    }

    /// Adds the pod labels of `pods` to processes in its containers.
    pub fn with_pods(mut self, pods: Arc<PodIndex>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// Discovers a process from `proc_root/<pid>` (its comm and exe as the registry read them)
    /// and, for a container of a known pod, the pod's `__meta_kubernetes_*` labels.
    pub fn discover(&self, proc_root: &Path, pid: u32, comm: Option<&str>, exe: Option<&str>) -> Labels {
        self.discover_with_cgroup(proc_root, pid, comm, exe).0
    }

    /// [`Self::discover`], also returning what the process's cgroup file said (for callers
    /// that need its v2 path, without reading the file again).
    pub fn discover_with_cgroup(
        &self,
        proc_root: &Path,
        pid: u32,
        comm: Option<&str>,
        exe: Option<&str>,
    ) -> (Labels, Option<cgroup::CgroupInfo>) {
        let mut meta = Labels::new();
        meta.insert("__meta_process_pid".into(), pid.to_string());
        if let Some(comm) = comm {
            meta.insert("__meta_process_comm".into(), comm.to_owned());
        }
        if let Some(exe) = exe {
            // A replaced or deleted binary shows as `path (deleted)`.
            let path = crate::procfs::strip_deleted(exe);
            meta.insert("__meta_process_executable_path".into(), path.to_owned());
            if let Some(name) = Path::new(path).file_name().and_then(|n| n.to_str()) {
                meta.insert("__meta_process_executable_name".into(), name.to_owned());
            }
        }
        let info = crate::procfs::cgroup_file(proc_root, pid).map(|content| cgroup::parse(&content));
        if let Some(info) = info.clone() {
            meta.insert("__meta_process_cgroup".into(), info.path);
            if let (Some(id), Some(pods)) = (&info.container_id, &self.pods)
                && let Some(pod) = pods.get(id)
            {
                meta.extend(pod.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            let mut put = |name: &str, value: Option<String>| {
                if let Some(v) = value {
                    meta.insert(name.to_owned(), v);
                }
            };
            put("__meta_container_id", info.container_id);
            put("__meta_container_runtime", info.runtime.map(str::to_owned));
            put("__meta_kubernetes_pod_uid", info.pod_uid);
            put("__meta_systemd_unit", info.systemd_unit);
        }
        (meta, info)
    }

    /// Relabels discovered labels into a target.
    pub fn target(&self, meta: Labels) -> Target {
        let labels = relabel::process(&self.rules, meta.clone()).map(|mut labels| {
            labels.retain(|name, _| !name.starts_with("__"));
            labels
        });
        Target { meta, labels }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_built_in_rule_compiles() {
        let written = DEFAULT_RULES.lines().filter(|l| l.starts_with("- ")).count();
        assert_eq!(written, 13);
        assert_eq!(default_rules().len(), written);
    }

    #[test]
    fn service_name_follows_the_documented_order() {
        let labeler = Labeler::default();
        let service = |pairs: &[(&str, &str)]| {
            labeler
                .target(meta(pairs))
                .labels
                .expect("kept")
                .get("service_name")
                .cloned()
        };
        assert_eq!(
            service(&[("__meta_process_comm", "python3")]).as_deref(),
            Some("python3")
        );
        let host = [
            ("__meta_process_comm", "nginx: worker"),
            ("__meta_process_executable_name", "nginx"),
        ];
        assert_eq!(service(&host).as_deref(), Some("nginx"));
        let unit = [
            ("__meta_process_executable_name", "python3.11"),
            ("__meta_systemd_unit", "billing-worker.service"),
        ];
        assert_eq!(service(&unit).as_deref(), Some("billing-worker"));
        let mut pod = vec![
            ("__meta_process_executable_name", "java"),
            ("__meta_kubernetes_namespace", "payments"),
            ("__meta_kubernetes_pod_name", "checkout-7d9f-abcde"),
            ("__meta_kubernetes_pod_container_name", "main"),
        ];
        assert_eq!(service(&pod).as_deref(), Some("main"));
        pod.push(("__meta_kubernetes_pod_controller_name", "checkout"));
        assert_eq!(service(&pod).as_deref(), Some("checkout"));
        pod.push(("__meta_kubernetes_pod_label_app", "checkout-app"));
        assert_eq!(service(&pod).as_deref(), Some("checkout-app"));
        pod.push((
            "__meta_kubernetes_pod_label_app_kubernetes_io_name",
            "checkout-svc",
        ));
        assert_eq!(service(&pod).as_deref(), Some("checkout-svc"));
        pod.push((
            "__meta_kubernetes_pod_annotation_pyroscope_io_service_name",
            "pinned",
        ));
        assert_eq!(service(&pod).as_deref(), Some("pinned"));
        let target = labeler.target(meta(&pod));
        let labels = target.labels.as_ref().expect("kept");
        assert_eq!(labels["namespace"], "payments");
        assert_eq!(labels["pod"], "checkout-7d9f-abcde");
        assert_eq!(labels["container"], "main");
        assert!(labels.keys().all(|k| !k.starts_with("__")), "{labels:?}");
        let docker = labeler.target(meta(&[
            ("__meta_process_executable_name", "redis-server"),
            (
                "__meta_container_id",
                "4e5d2a0c0f6f2c4ac5b1e38fb1a0dd3ab7d0e4c2b55b9c3e1f23a6b0f4c6d8e1",
            ),
        ]));
        assert_eq!(docker.get("container"), Some("4e5d2a0c0f6f"));
        assert_eq!(docker.get("service_name"), Some("redis-server"));
        assert_eq!(target.get("__meta_kubernetes_namespace"), Some("payments"));
    }

    #[test]
    fn user_rules_run_after_the_defaults_and_can_drop() {
        let rules: Vec<RuleConfig> = serde_norway::from_str(
            "[{source_labels: [namespace], regex: 'kube-system', action: drop}, {target_label: team, replacement: core}]",
        )
        .expect("yaml");
        let labeler = Labeler::new(&rules).expect("valid");
        let system = labeler.target(meta(&[("__meta_kubernetes_namespace", "kube-system")]));
        assert_eq!(system.labels, None);
        let app = labeler.target(meta(&[("__meta_kubernetes_namespace", "payments")]));
        assert_eq!(app.labels.expect("kept")["team"], "core");
    }

    #[test]
    fn discovery_reads_this_process() {
        let me = std::process::id();
        let exe = std::env::current_exe().expect("exe").display().to_string();
        let meta = Labeler::default().discover(Path::new("/proc"), me, Some("tester"), Some(&exe));
        assert_eq!(meta["__meta_process_pid"], me.to_string());
        assert_eq!(meta["__meta_process_comm"], "tester");
        assert!(meta.contains_key("__meta_process_executable_name"));
        assert!(meta.contains_key("__meta_process_cgroup"), "{meta:?}");
    }
}
