//! Labels end to end: a fixture moved into a cgroup shaped like a container's gets the
//! container's labels, the on-demand endpoint filters by them, and relabeling rules from the
//! configuration file add labels or drop the process.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use profiler::{encode::decode, pprof::Profile};
use tests::{
    Fixture, c_fixture,
    daemon::{Daemon, free_addr, http_get, wait_for, wait_ready, write_config},
    kubeapi::{KubeApi, pod},
    privileged, serial,
};

const CONTAINER_ID: &str = "4e5d2a0c0f6f2c4ac5b1e38fb1a0dd3ab7d0e4c2b55b9c3e1f23a6b0f4c6d8e1";

/// A cgroup named like a Docker container's, removed (with its parent) on drop.
struct ContainerCgroup {
    leaf: PathBuf,
    parent: PathBuf,
}

fn is_cgroup2(path: &Path) -> bool {
    path.join("cgroup.controllers").is_file()
}

impl ContainerCgroup {
    /// Under the unified (v2) hierarchy when there is one, else under v1's `pids`.
    fn create() -> Self {
        let root = [Path::new("/sys/fs/cgroup"), Path::new("/sys/fs/cgroup/unified")]
            .into_iter()
            .find(|p| is_cgroup2(p))
            .map_or_else(|| PathBuf::from("/sys/fs/cgroup/pids"), Path::to_owned);
        let (parent, leaf) = if is_cgroup2(&root) {
            let parent = root.join("profiler-test.slice");
            (
                parent.clone(),
                parent.join(format!("docker-{CONTAINER_ID}.scope")),
            )
        } else {
            let parent = root.join("docker");
            (parent.clone(), parent.join(CONTAINER_ID))
        };
        fs::create_dir_all(&leaf).unwrap_or_else(|e| panic!("creating {}: {e}", leaf.display()));
        Self { leaf, parent }
    }

    fn add(&self, pid: u32) {
        fs::write(self.leaf.join("cgroup.procs"), pid.to_string()).expect("move into the cgroup");
        let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        assert!(cgroup.contains(CONTAINER_ID), "{cgroup}");
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        // The fixture is gone by now (dropped first); a cgroup with no process can be removed.
        for _ in 0..50 {
            if fs::remove_dir(&self.leaf).is_ok() || !self.leaf.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = fs::remove_dir(&self.parent);
    }
}

/// The string labels of the samples of `pid`.
fn labels_of(profile: &Profile, pid: u32) -> Vec<Vec<(String, String)>> {
    let text = |i: i64| profile.string_table[i as usize].clone();
    profile
        .sample
        .iter()
        .filter(|s| {
            s.label
                .iter()
                .any(|l| text(l.key) == "pid" && l.num == i64::from(pid))
        })
        .map(|s| {
            s.label
                .iter()
                .filter(|l| l.str != 0)
                .map(|l| (text(l.key), text(l.str)))
                .collect()
        })
        .collect()
}

fn archived(dir: &Path) -> Vec<Profile> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| d.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .map(|f| decode(&fs::read(f).expect("read")).expect("decode"))
        .collect()
}

#[test]
fn container_labels_endpoint_filters_and_relabeling() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let cgroup = ContainerCgroup::create();
    let fixture = Fixture::start(c_fixture(), 60);
    let other = Fixture::start(c_fixture(), 60);
    cgroup.add(fixture.pid());
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        "relabel_configs:\n  - {source_labels: [__meta_container_runtime], regex: '(.+)', target_label: runtime}\n  - {target_label: team, replacement: core}\n",
    );
    let archive = dir.path().join("archive");
    let http = free_addr();
    let http_arg = http.to_string();
    let (a, b) = (fixture.pid().to_string(), other.pid().to_string());
    let start = |config: &str, archive: &Path| {
        Daemon::start(&[
            "--config",
            config,
            "--interval",
            "2s",
            "--pid",
            &a,
            "--pid",
            &b,
            "--output-dir",
            archive.to_str().expect("utf8"),
            "--http-listen",
            &http_arg,
        ])
    };
    let daemon = start(&config, &archive);
    wait_ready(http);
    let short = &CONTAINER_ID[..12];
    let (status, head, body) = http_get(
        http,
        &format!("/debug/pprof/profile?seconds=2&container={short}"),
        &[],
    );
    assert_eq!(status, 200, "{head}");
    let filtered = decode(&body).expect("profile");
    assert!(
        !labels_of(&filtered, fixture.pid()).is_empty(),
        "the container's process is in"
    );
    assert!(
        labels_of(&filtered, other.pid()).is_empty(),
        "the process outside the container is not"
    );
    let (_, _, body) = http_get(
        http,
        "/debug/pprof/profile?seconds=1&service_name=no-such-service",
        &[],
    );
    assert!(decode(&body).expect("profile").sample.is_empty());
    wait_for("an archived interval", Duration::from_secs(20), || {
        !archived(&archive).is_empty()
    });
    daemon.stop();

    let profiles = archived(&archive);
    let inside: Vec<Vec<(String, String)>> = profiles
        .iter()
        .flat_map(|p| labels_of(p, fixture.pid()))
        .collect();
    assert!(!inside.is_empty());
    let has = |labels: &[(String, String)], k: &str, v: &str| labels.iter().any(|(a, b)| a == k && b == v);
    for labels in &inside {
        assert!(has(labels, "container", short), "{labels:?}");
        assert!(has(labels, "service_name", "burn"), "{labels:?}");
        assert!(has(labels, "team", "core"), "{labels:?}");
        assert!(has(labels, "runtime", "docker"), "{labels:?}");
        assert!(labels.iter().all(|(k, _)| !k.starts_with("__")), "{labels:?}");
    }
    let outside: Vec<Vec<(String, String)>> =
        profiles.iter().flat_map(|p| labels_of(p, other.pid())).collect();
    assert!(!outside.is_empty());
    assert!(outside.iter().all(|l| !l.iter().any(|(k, _)| k == "container")));

    // A drop rule removes the container's process; the other one stays, and the drop is counted.
    let archive = dir.path().join("archive-drop");
    let config = write_config(
        dir.path(),
        &format!("relabel_configs:\n  - {{source_labels: [container], regex: '{short}', action: drop}}\n"),
    );
    let daemon = start(&config, &archive);
    wait_ready(http);
    wait_for("dropped samples", Duration::from_secs(20), || {
        metric(http, "profiler_relabel_dropped_samples_total") > 0.0 && !archived(&archive).is_empty()
    });
    daemon.stop();
    let profiles = archived(&archive);
    assert!(profiles.iter().all(|p| labels_of(p, fixture.pid()).is_empty()));
    assert!(profiles.iter().any(|p| !labels_of(p, other.pid()).is_empty()));
    let comments: Vec<String> = profiles
        .iter()
        .flat_map(|p| p.comment.iter().map(|&c| p.string_table[c as usize].clone()))
        .collect();
    assert!(
        comments
            .iter()
            .any(|c| c.contains("samples dropped by relabeling")),
        "{comments:?}"
    );
    drop(fixture);
    drop(other);
    drop(cgroup);
}

/// Labels of the samples of `pid` in the newest archived profile that has any.
fn newest_labels(archive: &Path, pid: u32) -> Option<Vec<(String, String)>> {
    archived(archive)
        .iter()
        .rev()
        .find_map(|p| labels_of(p, pid).into_iter().next())
}

fn label<'a>(labels: &'a [(String, String)], name: &str) -> Option<&'a str> {
    labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn kubernetes_pods_label_their_containers_through_watch_resync_delete_and_outage() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let cgroup = ContainerCgroup::create();
    let fixture = Fixture::start(c_fixture(), 90);
    cgroup.add(fixture.pid());
    let api = KubeApi::start("test-node");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig);
    // A pod that is not this process's, present before the daemon starts (comes with the list).
    api.add(pod(
        "other-1",
        "default",
        "test-node",
        "web",
        &"ab".repeat(32),
        serde_json::json!({"app": "other"}),
    ));
    let archive = dir.path().join("archive");
    let http = free_addr();
    let http_arg = http.to_string();
    let pid = fixture.pid().to_string();
    let daemon = Daemon::start(&[
        "--node-name",
        "test-node",
        "--kubeconfig",
        kubeconfig.to_str().expect("utf8"),
        "--interval",
        "1s",
        "--pid",
        &pid,
        "--output-dir",
        archive.to_str().expect("utf8"),
        "--http-listen",
        &http_arg,
    ]);
    wait_for("the first list", Duration::from_secs(20), || {
        api.requests().0 >= 1
    });
    // The fixture's pod arrives by the watch.
    let checkout = pod(
        "checkout-abc12",
        "payments",
        "test-node",
        "main",
        CONTAINER_ID,
        serde_json::json!({"app.kubernetes.io/name": "checkout"}),
    );
    api.add(checkout.clone());
    wait_for("pod labels on the samples", Duration::from_secs(20), || {
        newest_labels(&archive, fixture.pid()).is_some_and(|l| label(&l, "pod") == Some("checkout-abc12"))
    });
    let labels = newest_labels(&archive, fixture.pid()).expect("labels");
    assert_eq!(label(&labels, "namespace"), Some("payments"));
    assert_eq!(label(&labels, "container"), Some("main"));
    assert_eq!(label(&labels, "service_name"), Some("checkout"));
    assert_eq!(label(&labels, "node"), Some("test-node"));
    let (status, _, body) = http_get(
        http,
        "/debug/pprof/profile?seconds=1&namespace=payments&pod=checkout-abc12",
        &[],
    );
    assert_eq!(status, 200);
    assert!(!labels_of(&decode(&body).expect("profile"), fixture.pid()).is_empty());

    // The history expires: the watch gets 410 and the daemon lists again, labels intact.
    let (lists, _) = api.requests();
    api.expire();
    wait_for("a new list after 410 Gone", Duration::from_secs(20), || {
        api.requests().0 > lists
    });

    // Deleted: the next intervals carry no pod labels (the container id's short form stays).
    api.delete(checkout);
    wait_for("pod labels gone", Duration::from_secs(20), || {
        newest_labels(&archive, fixture.pid()).is_some_and(|l| label(&l, "pod").is_none())
    });
    let labels = newest_labels(&archive, fixture.pid()).expect("labels");
    assert_eq!(label(&labels, "container"), Some(&CONTAINER_ID[..12]));

    // The API server goes away: sampling goes on.
    drop(api);
    let before = archived(&archive).len();
    wait_for("profiles without the API server", Duration::from_secs(20), || {
        archived(&archive).len() >= before + 3
    });
    let metrics = String::from_utf8(http_get(http, "/metrics", &[]).2).expect("utf8");
    assert!(metrics.contains("profiler_kubernetes_connected 0"), "{metrics}");
    assert!(
        newest_labels(&archive, fixture.pid()).is_some(),
        "samples still arrive"
    );
    daemon.stop();
    drop(fixture);
    drop(cgroup);
}

fn metric(http: std::net::SocketAddr, name: &str) -> f64 {
    let body = String::from_utf8(http_get(http, "/metrics", &[]).2).expect("utf8");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

/// The pids with samples in the archive.
fn sampled_pids(archive: &Path) -> std::collections::BTreeSet<i64> {
    archived(archive)
        .iter()
        .flat_map(|p| {
            let key = p.string_table.iter().position(|s| s == "pid").map(|k| k as i64);
            p.sample
                .iter()
                .flat_map(|s| s.label.iter())
                .filter(move |l| Some(l.key) == key)
                .map(|l| l.num)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn cgroup_and_label_targets_filter_in_the_kernel() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let cgroup = ContainerCgroup::create();
    if !cgroup.leaf.join("cgroup.controllers").exists() {
        // A v1-only host: --cgroup needs the v2 hierarchy (the daemon says so at start).
        eprintln!("skipped: no cgroup v2 hierarchy here");
        return;
    }
    let inside = Fixture::start(c_fixture(), 60);
    let outside = Fixture::start(c_fixture(), 60);
    cgroup.add(inside.pid());
    let dir = tempfile::tempdir().expect("tempdir");
    let http = free_addr();
    let http_arg = http.to_string();
    let short = &CONTAINER_ID[..12];
    let cgroup_arg = cgroup.parent.to_str().expect("utf8").to_owned();
    let selector = format!("container={short}");
    for (name, flags) in [
        ("cgroup", ["--cgroup", cgroup_arg.as_str()]),
        ("target", ["--target", selector.as_str()]),
    ] {
        let archive = dir.path().join(name);
        let mut args = vec![
            "--interval",
            "1s",
            "--output-dir",
            archive.to_str().expect("utf8"),
            "--http-listen",
            &http_arg,
        ];
        args.extend(flags);
        let daemon = Daemon::start(&args);
        wait_ready(http);
        wait_for(
            "filtered ticks and an archived profile",
            Duration::from_secs(20),
            || {
                metric(http, "profiler_filtered_ticks_total") > 50.0
                    && sampled_pids(&archive).contains(&i64::from(inside.pid()))
            },
        );
        daemon.stop();
        let pids = sampled_pids(&archive);
        assert_eq!(
            pids,
            [i64::from(inside.pid())].into(),
            "{name}: only the process in the selected cgroup is sampled"
        );
    }
    drop(inside);
    drop(outside);
    drop(cgroup);
}
