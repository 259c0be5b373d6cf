//! What a process's cgroup says about it: the container it runs in (id and runtime), the pod
//! (uid) under Kubernetes, or the systemd unit of a host service.
//!
//! `/proc/<pid>/cgroup` has one `0::<path>` line under cgroup v2 and one
//! `<id>:<controllers>:<path>` line per hierarchy under v1. Container runtimes name the leaf
//! cgroup after the 64-hex container id, with a prefix under the systemd cgroup driver:
//!
//! | runtime | v2 / systemd driver | cgroupfs driver, v1 |
//! |---|---|---|
//! | Kubernetes + containerd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope` | `/kubepods/burstable/pod<uid>/<id>` |
//! | Kubernetes + CRI-O | `…/kubepods-pod<uid_>.slice/crio-<id>.scope` | `/kubepods/pod<uid>/crio-<id>` |
//! | Docker | `/system.slice/docker-<id>.scope` | `/docker/<id>` |
//! | Podman | `/machine.slice/libpod-<id>.scope`, `/user.slice/…/libpod-<id>.scope` | `/libpod_parent/libpod-<id>` |
//! | containerd (nerdctl, ctr) | `/system.slice/nerdctl-<id>.scope` | `/default/<id>` |
//!
//! The runtimes' monitor processes (`crio-conmon-<id>`, `libpod-conmon-<id>`) are not the
//! container.

/// What one process's cgroup tells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// The unified (v2) path, else the most telling v1 path.
    pub path: String,
    pub container_id: Option<String>,
    /// `docker`, `containerd`, `cri-o`, `podman`; `None` when the path does not say (a bare id
    /// under `kubepods`).
    pub runtime: Option<&'static str>,
    /// The pod's uid (with dashes) under Kubernetes.
    pub pod_uid: Option<String>,
    /// `nginx.service` for a host service.
    pub systemd_unit: Option<String>,
    /// The `0::` (cgroup v2) path, when the file has one: what `bpf_get_current_cgroup_id`
    /// identifies.
    pub unified: Option<String>,
}

const ID_LEN: usize = 64;

fn is_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// (prefix, runtime) of the leaf names runtimes give containers.
const PREFIXES: [(&str, Option<&str>); 6] = [
    ("cri-containerd-", Some("containerd")),
    ("crio-", Some("cri-o")),
    ("docker-", Some("docker")),
    ("libpod-", Some("podman")),
    ("nerdctl-", Some("containerd")),
    ("containerd-", Some("containerd")),
];

/// The container id and runtime a single path segment names.
fn container_of(segment: &str, parent: Option<&str>) -> Option<(String, Option<&'static str>)> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    if name.contains("conmon") {
        return None;
    }
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = name.strip_prefix(prefix)
            && is_id(id)
        {
            return Some((id.to_ascii_lowercase(), runtime));
        }
    }
    if is_id(name) {
        let runtime = match parent {
            Some("docker") => Some("docker"),
            Some("default") => Some("containerd"),
            _ => None,
        };
        return Some((name.to_ascii_lowercase(), runtime));
    }
    None
}

/// The pod uid of a `pod<uid>` or `kubepods-<qos>-pod<uid_with_underscores>.slice` segment.
fn pod_of(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice").unwrap_or(segment);
    let at = name.rfind("pod")?;
    // `pod` starts the segment (cgroupfs) or follows `kubepods-…-` (systemd driver).
    if at != 0 && !name.starts_with("kubepods") {
        return None;
    }
    let uid = name[at + 3..].replace('_', "-");
    let valid = uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    valid.then_some(uid)
}

/// Reads one path.
pub fn parse_path(path: &str) -> CgroupInfo {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut info = CgroupInfo {
        path: path.to_owned(),
        ..CgroupInfo::default()
    };
    // The outermost container wins: it is the one the runtime created. A workload may make
    // cgroups below its own (a delegated subtree) and name one after another pod's container,
    // so a segment deeper down never decides whose pod this is.
    for (i, segment) in segments.iter().enumerate() {
        let parent = i.checked_sub(1).map(|p| segments[p]);
        if let Some((id, runtime)) = container_of(segment, parent) {
            info.container_id = Some(id);
            info.runtime = runtime;
            break;
        }
    }
    info.pod_uid = segments.iter().find_map(|s| pod_of(s));
    if info.container_id.is_none() {
        info.systemd_unit = segments
            .iter()
            .rev()
            .find(|s| s.ends_with(".service") && !s.starts_with("user@"))
            .map(|s| (*s).to_owned());
    }
    info
}

/// Reads the content of `/proc/<pid>/cgroup`.
pub fn parse(content: &str) -> CgroupInfo {
    let mut unified = None;
    let mut v1 = Vec::new();
    for line in content.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            unified = Some(path);
        } else {
            v1.push((controllers, path));
        }
    }
    // v1 hierarchies may disagree; a path naming a container beats one that does not, and
    // the systemd hierarchy names units.
    let mut best: Option<CgroupInfo> = None;
    for (controllers, path) in &v1 {
        let info = parse_path(path);
        let better = match &best {
            None => true,
            Some(b) => {
                (info.container_id.is_some() && b.container_id.is_none())
                    || (b.container_id.is_none()
                        && info.container_id.is_none()
                        && controllers.contains("name=systemd"))
            }
        };
        if better {
            best = Some(info);
        }
    }
    let mut info = match (unified, best) {
        (Some(path), Some(v1))
            if path == "/" || v1.container_id.is_some() && parse_path(path).container_id.is_none() =>
        {
            v1
        }
        (Some(path), _) => parse_path(path),
        (None, Some(v1)) => v1,
        (None, None) => CgroupInfo::default(),
    };
    info.unified = unified.map(str::to_owned);
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4e5d2a0c0f6f2c4ac5b1e38fb1a0dd3ab7d0e4c2b55b9c3e1f23a6b0f4c6d8e1";
    const UID: &str = "0f2b7f3e-8d1c-4b5a-9e6f-1a2b3c4d5e6f";

    #[test]
    fn real_path_shapes_give_container_pod_and_unit() {
        let uid_ = UID.replace('-', "_");
        /// (path, container id, runtime, pod uid, systemd unit)
        type Case<'a> = (
            String,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
        );
        let victim = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";
        let cases: Vec<Case<'_>> = vec![
            // (path, container id, runtime, pod uid, systemd unit)
            // A workload's own sub-cgroup named after another pod's container: still its own.
            (
                format!(
                    "/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope/nested/cri-containerd-{victim}.scope"
                ),
                Some(ID),
                Some("containerd"),
                Some(UID),
                None,
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                Some(ID),
                Some("containerd"),
                Some(UID),
                None,
            ),
            (
                format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope"),
                Some(ID),
                Some("cri-o"),
                Some(UID),
                None,
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/docker-{ID}.scope"
                ),
                Some(ID),
                Some("docker"),
                Some(UID),
                None,
            ),
            (
                format!("/kubepods/burstable/pod{UID}/{ID}"),
                Some(ID),
                None,
                Some(UID),
                None,
            ),
            (
                format!("/kubepods/pod{UID}/crio-{ID}"),
                Some(ID),
                Some("cri-o"),
                Some(UID),
                None,
            ),
            (
                format!("/system.slice/docker-{ID}.scope"),
                Some(ID),
                Some("docker"),
                None,
                None,
            ),
            (format!("/docker/{ID}"), Some(ID), Some("docker"), None, None),
            (
                format!("/machine.slice/libpod-{ID}.scope"),
                Some(ID),
                Some("podman"),
                None,
                None,
            ),
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
                ),
                Some(ID),
                Some("podman"),
                None,
                None,
            ),
            (
                format!("/system.slice/nerdctl-{ID}.scope"),
                Some(ID),
                Some("containerd"),
                None,
                None,
            ),
            (format!("/default/{ID}"), Some(ID), Some("containerd"), None, None),
            // The runtime's monitor is not the container.
            (
                format!("/machine.slice/libpod-conmon-{ID}.scope"),
                None,
                None,
                None,
                None,
            ),
            (
                format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-conmon-{ID}.scope"),
                None,
                None,
                Some(UID),
                None,
            ),
            (
                "/system.slice/nginx.service".to_owned(),
                None,
                None,
                None,
                Some("nginx.service"),
            ),
            (
                "/system.slice/containerd.service".to_owned(),
                None,
                None,
                None,
                Some("containerd.service"),
            ),
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-firefox-123.scope"
                    .to_owned(),
                None,
                None,
                None,
                None,
            ),
            ("/init.scope".to_owned(), None, None, None, None),
            ("/".to_owned(), None, None, None, None),
            // Not ids: wrong length or not hex.
            (format!("/docker/{}", &ID[..63]), None, None, None, None),
            ("/system.slice/docker-zz.scope".to_owned(), None, None, None, None),
        ];
        for (path, id, runtime, pod, unit) in cases {
            let info = parse_path(&path);
            assert_eq!(info.container_id.as_deref(), id, "{path}");
            assert_eq!(info.runtime, runtime, "{path}");
            assert_eq!(info.pod_uid.as_deref(), pod, "{path}");
            assert_eq!(info.systemd_unit.as_deref(), unit, "{path}");
        }
    }

    #[test]
    fn proc_cgroup_files_of_both_versions() {
        let v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        let info = parse(&v2);
        assert_eq!(info.container_id.as_deref(), Some(ID));
        assert_eq!(info.path, format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(info.unified, Some(info.path.clone()));
        let v1 = format!(
            "12:memory:/docker/{ID}\n11:cpu,cpuacct:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n"
        );
        assert_eq!(parse(&v1).container_id.as_deref(), Some(ID));
        let v1_host = "5:cpu,cpuacct:/\n1:name=systemd:/system.slice/sshd.service\n";
        assert_eq!(parse(v1_host).systemd_unit.as_deref(), Some("sshd.service"));
        assert_eq!(parse("").container_id, None);
        assert_eq!(parse("garbage\n::\n").path, "");
        // Mixed: hybrid hierarchy with an empty unified path.
        let hybrid = format!("1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n0::/\n");
        let info = parse(&hybrid);
        assert_eq!(info.container_id.as_deref(), Some(ID));
        assert_eq!(info.unified.as_deref(), Some("/"));
        assert_eq!(info.pod_uid.as_deref(), Some(UID));
    }
}
