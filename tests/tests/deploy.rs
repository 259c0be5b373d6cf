//! The deployment in `deploy/`: every Kustomize overlay renders, validates against the
//! Kubernetes schemas (kubernetes-validate, strict, Kubernetes 1.32), keeps the security
//! properties docs/deploy.md promises, and ships a configuration the real daemon accepts; the
//! Dockerfile is multi-stage, builds with the commands CI runs and starts without a shell.
//!
//! No container engine runs here, so the image itself is not built by these tests.
use std::{collections::BTreeSet, process::Command};

use serde_json::Value;
use tests::{profiler_bin, workspace};

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.32.0";
const OVERLAYS: [&str; 3] = ["plain", "pyroscope", "parca"];
/// The capabilities the DaemonSet adds, each justified in docs/deploy.md.
const CAPABILITIES: [&str; 5] = ["BPF", "PERFMON", "SYS_PTRACE", "SYSLOG", "CHECKPOINT_RESTORE"];

fn render(overlay: &str) -> String {
    let dir = workspace().join("deploy/overlays").join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl (installed by `cargo xtask test`)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| {
            let value = <serde_norway::Value as serde::Deserialize>::deserialize(doc).expect("yaml document");
            serde_json::to_value(value).expect("json")
        })
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn validate(overlay: &str, yaml: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(format!("{overlay}.yaml"));
    std::fs::write(&file, yaml).expect("write");
    let python = workspace().join("target/tools/python");
    assert!(
        python.join("kubernetes_validate").is_dir(),
        "kubernetes-validate is missing under {}: run `cargo xtask test` (it installs it)",
        python.display()
    );
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "-k",
            KUBERNETES_VERSION,
        ])
        .arg(&file)
        .env("PYTHONPATH", &python)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{overlay} fails validation:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn check_security(overlay: &str, docs: &[Value]) {
    let ds = find(docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "{overlay}: every process of the node");
    assert_ne!(pod["hostNetwork"], true, "{overlay}: no host network");
    assert_eq!(
        pod["tolerations"][0]["operator"], "Exists",
        "{overlay}: every node"
    );
    assert!(pod["priorityClassName"].is_string());
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true, "{overlay}: not privileged");
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    let expected: BTreeSet<String> = CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
    assert_eq!(added, expected, "{overlay}: exactly the documented capabilities");
    for limit in ["cpu", "memory"] {
        assert!(
            c["resources"]["limits"][limit].is_string(),
            "{overlay}: {limit} limit"
        );
        assert!(
            c["resources"]["requests"][limit].is_string(),
            "{overlay}: {limit} request"
        );
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let node = c["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == "NODE_NAME"))
        .expect("NODE_NAME");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    let args = strings(&c["args"]);
    assert!(
        args.iter().any(|a| a == "--http-listen=127.0.0.1:7073"),
        "{overlay}: the on-demand endpoint stays on loopback: {args:?}"
    );
    // Backend credentials come from a Secret, mounted read-only.
    let secret = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["secret"].is_object()))
        .expect("a Secret volume for backend credentials");
    assert_eq!(secret["secret"]["secretName"], "profiler-backend");
    let mount = c["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == secret["name"]))
        .expect("the Secret is mounted");
    assert_eq!(mount["readOnly"], true);
    // Read-only access to pods, nothing else.
    let role = find(docs, "ClusterRole");
    let rules = role["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(strings(&rules[0]["resources"]), ["pods"]);
    assert_eq!(strings(&rules[0]["verbs"]), ["get", "list", "watch"]);
}

/// Runs the daemon's own check on the ConfigMap's configuration with the container's flags.
fn check_shipped_config(overlay: &str, docs: &[Value]) {
    let config = find(docs, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .expect("config.yaml in the ConfigMap")
        .to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config).expect("write");
    let container = &find(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = strings(&container["args"])
        .into_iter()
        .map(|a| match a.strip_prefix("--config=") {
            Some(_) => format!("--config={}", path.display()),
            None => a,
        })
        .collect();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    let out = Command::new(profiler_bin())
        .args(&args)
        .arg("--check-config")
        .output()
        .expect("profiler");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{overlay}: the shipped configuration is refused:\n{text}"
    );
    assert!(text.contains("configuration ok"), "{text}");
}

#[test]
fn overlays_render_validate_and_keep_least_privilege() {
    let guide = std::fs::read_to_string(workspace().join("docs/deploy.md")).expect("docs/deploy.md");
    for capability in CAPABILITIES {
        assert!(
            guide.contains(&format!("`{capability}`")),
            "docs/deploy.md does not justify {capability}"
        );
    }
    for overlay in OVERLAYS {
        let yaml = render(overlay);
        validate(overlay, &yaml);
        let docs = documents(&yaml);
        let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for kind in [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
        ] {
            assert!(kinds.contains(kind), "{overlay} lacks a {kind}: {kinds:?}");
        }
        check_security(overlay, &docs);
        check_shipped_config(overlay, &docs);
    }
    // The backend overlays send somewhere.
    let pyroscope = documents(&render("pyroscope"));
    let config = find(&pyroscope, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .expect("config");
    assert!(config.contains("type: pyroscope"));
    let parca = documents(&render("parca"));
    let config = find(&parca, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .expect("config");
    assert!(config.contains("type: parca"));
}

/// Instructions of a Dockerfile: (keyword, arguments), continuation lines joined, comments
/// dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, rest) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    assert!(current.is_empty(), "a continuation line runs off the end");
    out
}

#[test]
fn dockerfile_is_multi_stage_builds_like_ci_and_starts_without_a_shell() {
    let root = workspace();
    let text = std::fs::read_to_string(root.join("deploy/Dockerfile")).expect("Dockerfile");
    let all = instructions(&text);
    let known = [
        "FROM",
        "RUN",
        "COPY",
        "WORKDIR",
        "ARG",
        "LABEL",
        "ENTRYPOINT",
        "CMD",
        "ENV",
        "USER",
    ];
    for (keyword, _) in &all {
        assert!(
            known.contains(&keyword.as_str()),
            "unexpected instruction {keyword}"
        );
    }
    let stages: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "multi-stage");
    let build = &all[stages[0]..stages[1]];
    let runtime = &all[stages[stages.len() - 1]..];
    assert!(build[0].1.ends_with("AS build"), "{:?}", build[0]);
    // The same commands the README's test command (and so CI) runs to build.
    let runs: Vec<&str> = build
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, a)| a.as_str())
        .collect();
    assert!(
        runs.iter()
            .any(|r| r.contains("cargo xtask setup") && r.contains("cargo xtask build")),
        "{runs:?}"
    );
    let xtask = std::fs::read_to_string(root.join("xtask/src/main.rs")).expect("xtask");
    assert!(xtask.contains("Task::Build => {\n            setup()?;\n            build()"));
    let ci = std::fs::read_to_string(root.join(".ci/run")).expect(".ci/run");
    assert!(ci.contains("cargo xtask test"));
    // The runtime stage: the binary from the build stage, exec-form entrypoint, labels.
    let get = |keyword: &str| {
        runtime
            .iter()
            .find(|(k, _)| k == keyword)
            .map(|(_, a)| a.clone())
            .unwrap_or_else(|| panic!("no {keyword} in the runtime stage"))
    };
    let entrypoint: Vec<String> =
        serde_json::from_str(&get("ENTRYPOINT")).expect("ENTRYPOINT in exec (JSON) form");
    assert_eq!(entrypoint, ["/usr/local/bin/profiler"]);
    let cmd: Vec<String> = serde_json::from_str(&get("CMD")).expect("CMD in exec form");
    assert_eq!(cmd[0], "run");
    assert!(get("COPY").contains("--from=build /src/target/release/profiler /usr/local/bin/profiler"));
    assert!(get("LABEL").contains("org.opencontainers.image.version"));
}
