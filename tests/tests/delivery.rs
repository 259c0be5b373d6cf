//! Delivery end to end: the real daemon sending to in-test Pyroscope, Parca and OTLP servers
//! (tests/src/backends.rs), surviving outages and bad answers, and serving `go tool pprof`.
use std::{net::SocketAddr, process::Command, thread, time::Duration};

use profiler::{encode::decode, pprof::Profile};
use tests::{
    Fixture,
    backends::{Backend, Behaviour, Pki, Received},
    c_fixture,
    daemon::{Daemon, free_addr, http_get, wait_for, wait_ready, write_config},
    privileged, profiler_bin, serial,
};

fn function_names(p: &Profile) -> Vec<&str> {
    p.function
        .iter()
        .map(|f| p.string_table[f.name as usize].as_str())
        .collect()
}

fn label<'a>(r: &'a Received, name: &str) -> Option<&'a str> {
    r.labels.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

fn header<'a>(r: &'a Received, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

#[test]
fn config_mistakes_fail_at_start_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |config: &str, extra: &[&str]| -> (bool, String) {
        let path = write_config(dir.path(), config);
        let out = Command::new(profiler_bin())
            .args(["run", "--check-config", "--config", &path])
            .args(extra)
            .output()
            .expect("run profiler");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").expect("token");
    let good = format!(
        "spool_dir: {spool}\nexporters:\n  - {{type: pyroscope, url: 'http://127.0.0.1:4040', insecure: true}}\n  - {{type: parca, url: 'https://parca.example:443', bearer_token_file: {token}}}\n  - {{type: otlp, url: 'http://127.0.0.1:4318', insecure: true}}\n",
        spool = dir.path().join("spool").display(),
        token = token.display()
    );
    let (ok, text) = check(&good, &[]);
    assert!(ok, "{text}");
    assert!(
        text.contains("configuration ok: 3 exporter(s) + local archive"),
        "{text}"
    );
    let cases = [
        (
            "exporters: [{type: pyroscope, url: 'pyroscope:4040'}]",
            "exporters[0] (pyroscope): url `pyroscope:4040`",
        ),
        (
            "exporters: [{type: parca, url: 'https://p', bearer_token_file: /nonexistent/token}]",
            "exporters[0] (parca): bearer_token_file /nonexistent/token",
        ),
        (
            "exporters: [{type: parca, url: 'https://p', tls: {ca_file: /nonexistent/ca.pem}}]",
            "tls.ca_file /nonexistent/ca.pem",
        ),
        (
            "exporters: [{type: kafka, url: 'https://p'}]",
            "unknown variant `kafka`",
        ),
        ("exporters: {type: parca}", "config file"),
        (
            "relabel_configs: [{target_label: a}, {source_labels: [a], regex: '(', action: keep}]",
            "relabel_configs[1]: regex `(`",
        ),
        (
            "relabel_configs: [{action: explode}]",
            "unknown variant `explode`",
        ),
    ];
    for (config, needle) in cases {
        let (ok, text) = check(config, &[]);
        assert!(!ok, "{config} should fail");
        assert!(text.contains(needle), "{config}: expected `{needle}` in:\n{text}");
    }
    let (ok, text) = check("", &["--http-listen", "0.0.0.0:7073"]);
    assert!(!ok);
    assert!(
        text.contains("refusing to serve profiles on 0.0.0.0:7073 without authentication"),
        "{text}"
    );
    let missing = dir.path().join("missing-config.yaml");
    let out = Command::new(profiler_bin())
        .args(["run", "--check-config", "--config"])
        .arg(&missing)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading the config file"));
}

#[test]
fn every_backend_receives_each_interval_with_labels_and_credentials() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let pyroscope = Backend::pyroscope("127.0.0.1:0".parse().expect("addr"));
    let parca = Backend::parca("127.0.0.1:0".parse().expect("addr"));
    let otlp = Backend::otlp("127.0.0.1:0".parse().expect("addr"));
    let otlp_grpc = Backend::otlp_grpc("127.0.0.1:0".parse().expect("addr"));
    let dir = tempfile::tempdir().expect("tempdir");
    let password = dir.path().join("password");
    std::fs::write(&password, "glc_secret\n").expect("write");
    let token = dir.path().join("token");
    std::fs::write(&token, "parca-token\n").expect("write");
    let config = write_config(
        dir.path(),
        &format!(
            r#"
spool_dir: {spool}
exporters:
  - type: pyroscope
    url: {pyroscope}
    insecure: true
    labels: {{service_name: burn-test, env: ci}}
    basic_auth: {{username: "123456", password_file: {password}}}
    headers: {{X-Scope-OrgID: tenant-a}}
  - type: pyroscope_ingest
    url: {pyroscope}
    insecure: true
    labels: {{service_name: burn-ingest}}
  - type: parca
    url: {parca}
    insecure: true
    bearer_token_file: {token}
    headers: {{X-Tenant: team-b}}
  - type: otlp
    url: {otlp}
    insecure: true
    labels: {{service_name: burn-otlp}}
  - type: otlp
    name: otlp-grpc
    protocol: grpc
    url: {otlp_grpc}
    insecure: true
    labels: {{service_name: burn-otlp-grpc}}
    headers: {{X-Scope-OrgID: tenant-c}}
"#,
            spool = dir.path().join("spool").display(),
            pyroscope = pyroscope.url(),
            parca = parca.url(),
            otlp = otlp.url(),
            otlp_grpc = otlp_grpc.url(),
            password = password.display(),
            token = token.display(),
        ),
    );
    let fixture = Fixture::start(c_fixture(), 60);
    let pid = fixture.pid().to_string();
    let daemon = Daemon::start(&[
        "--config",
        &config,
        "--interval",
        "1s",
        "--pid",
        &pid,
        "--no-archive",
        "--http-listen",
        "off",
    ]);
    wait_for("3 profiles at each backend", Duration::from_secs(30), || {
        pyroscope.received().len() >= 6
            && parca.received().len() >= 3
            && otlp.received().len() >= 3
            && otlp_grpc.received().len() >= 3
    });
    daemon.stop();

    let pushed: Vec<Received> = pyroscope
        .received()
        .into_iter()
        .filter(|r| label(r, "service_name") == Some("burn-test"))
        .collect();
    let ingested: Vec<Received> = pyroscope
        .received()
        .into_iter()
        .filter(|r| label(r, "service_name") == Some("burn-ingest"))
        .collect();
    assert!(
        pushed.len() >= 3 && ingested.len() >= 3,
        "{} pushed, {} ingested",
        pushed.len(),
        ingested.len()
    );
    let push = &pushed[0];
    assert_eq!(label(push, "__name__"), Some("process_cpu"));
    assert_eq!(label(push, "env"), Some("ci"));
    assert!(label(push, "node").is_some_and(|n| !n.is_empty()));
    // base64("123456:glc_secret")
    assert_eq!(
        header(push, "authorization"),
        Some("Basic MTIzNDU2OmdsY19zZWNyZXQ=")
    );
    assert_eq!(header(push, "x-scope-orgid"), Some("tenant-a"));
    assert!(ingested.iter().all(|r| label(r, "node").is_some()));
    // Full intervals name the fixture's hot function (the one cut short at stop may be empty).
    for r in pushed.iter().chain(&ingested) {
        let p = r.profile.as_ref().expect("pprof");
        if p.duration_nanos >= 900_000_000 {
            assert!(function_names(p).contains(&"hot_a"), "{:?}", function_names(p));
        }
    }

    let written = parca.received();
    let first = &written[0];
    assert_eq!(label(first, "__name__"), Some("parca_agent"));
    assert_eq!(header(first, "authorization"), Some("Bearer parca-token"));
    assert_eq!(header(first, "x-tenant"), Some("team-b"));
    assert!(function_names(first.profile.as_ref().expect("pprof")).contains(&"main"));

    // OTLP over gRPC, served by the opentelemetry-proto crate's generated server.
    let over_grpc = otlp_grpc.received();
    assert_eq!(label(&over_grpc[0], "service.name"), Some("burn-otlp-grpc"));
    assert_eq!(header(&over_grpc[0], "x-scope-orgid"), Some("tenant-c"));
    assert!(over_grpc[0].otlp.as_ref().expect("otlp").dictionary.is_some());

    // OTLP, read through the opentelemetry-proto crate's types.
    let exported = otlp.received();
    let request = exported[0].otlp.as_ref().expect("otlp");
    assert_eq!(label(&exported[0], "service.name"), Some("burn-otlp"));
    assert!(label(&exported[0], "host.name").is_some());
    let dict = request.dictionary.as_ref().expect("dictionary");
    assert_eq!(dict.string_table[0], "");
    assert_eq!(
        dict.stack_table[0].location_indices.len(),
        0,
        "index 0 is the zero stack"
    );
    let profile = &request.resource_profiles[0].scope_profiles[0].profiles[0];
    let text = |i: i32| dict.string_table[i as usize].as_str();
    let sample_type = profile.sample_type.as_ref().expect("sample type");
    let period_type = profile.period_type.as_ref().expect("period type");
    assert_eq!(
        (
            text(sample_type.type_strindex),
            text(sample_type.unit_strindex),
            text(period_type.type_strindex),
            text(period_type.unit_strindex)
        ),
        ("samples", "count", "cpu", "nanoseconds")
    );
    assert_eq!(profile.period, 1_000_000_000 / 19);
    assert!(profile.duration_nano > 0 && profile.time_unix_nano > 0);
    let mut saw_main = false;
    let mut total = 0;
    for sample in &profile.samples {
        total += sample.values.iter().sum::<i64>();
        let stack = &dict.stack_table[sample.stack_index as usize];
        for &l in &stack.location_indices {
            for line in &dict.location_table[l as usize].lines {
                saw_main |= text(dict.function_table[line.function_index as usize].name_strindex) == "main";
            }
        }
        let pid_attr = sample
            .attribute_indices
            .iter()
            .map(|&a| &dict.attribute_table[a as usize])
            .find(|kv| text(kv.key_strindex) == "process.pid")
            .expect("process.pid attribute");
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        assert_eq!(
            pid_attr.value.as_ref().and_then(|v| v.value.clone()),
            Some(Value::IntValue(i64::from(fixture.pid())))
        );
    }
    assert!(saw_main, "a stack reaches main");
    assert!(total > 5, "{total} samples in a 1 s interval");
}

/// Profiles received by the Push API, in arrival order, with their windows.
fn windows(backend: &Backend) -> Vec<(i64, i64)> {
    backend
        .received()
        .iter()
        .filter_map(|r| r.profile.as_ref())
        .map(|p| (p.time_nanos, p.time_nanos + p.duration_nanos))
        .collect()
}

fn assert_contiguous(windows: &[(i64, i64)]) {
    for pair in windows.windows(2) {
        assert_eq!(
            pair[0].1, pair[1].0,
            "profiles arrive in order with no interval missing: {windows:?}"
        );
    }
}

#[test]
fn outages_lose_nothing_keep_order_and_survive_restarts() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let addr = free_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &format!(
            "spool_dir: {}\nexporters:\n  - {{type: pyroscope, url: 'http://{addr}', insecure: true, min_backoff: 100ms, max_backoff: 400ms}}\n",
            dir.path().join("spool").display()
        ),
    );
    let archive = dir.path().join("archive");
    let archive_arg = archive.to_str().expect("utf8");
    let fixture = Fixture::start(c_fixture(), 120);
    let pid = fixture.pid().to_string();
    let args = [
        "--config",
        &config,
        "--interval",
        "1s",
        "--pid",
        &pid,
        "--output-dir",
        archive_arg,
        "--http-listen",
        "off",
    ];

    // 1. The backend is unreachable for the first seconds, then comes up.
    let daemon = Daemon::start(&args);
    thread::sleep(Duration::from_millis(3500));
    let backend = Backend::pyroscope(addr);
    wait_for("the spooled profiles", Duration::from_secs(20), || {
        windows(&backend).len() >= 5
    });
    // 2. Rate limited with Retry-After for a while.
    backend.set(Behaviour::Fail {
        status: 429,
        retry_after: Some(1),
    });
    thread::sleep(Duration::from_millis(2500));
    backend.set(Behaviour::Accept);
    let before_stop = windows(&backend).len();
    wait_for("profiles after the rate limit", Duration::from_secs(20), || {
        windows(&backend).len() >= before_stop + 3
    });
    let stderr = String::from_utf8_lossy(&daemon.stop().stderr).into_owned();
    assert!(backend.failed() >= 1, "the 429s were seen");
    assert!(stderr.contains("send failed; will retry"), "{stderr}");
    let first_run = windows(&backend);
    assert_contiguous(&first_run);
    let archived = std::fs::read_dir(&archive).expect("archive").count();
    assert_eq!(
        first_run.len(),
        archived,
        "every interval profile (archived: {archived}) reached the backend"
    );

    // 3. The backend goes away; the daemon stops with profiles spooled; both come back.
    drop(backend);
    let daemon = Daemon::start(&args);
    thread::sleep(Duration::from_millis(3500));
    let stderr = String::from_utf8_lossy(&daemon.stop().stderr).into_owned();
    assert!(
        stderr.contains("profiles left in the spool are sent after the next start"),
        "{stderr}"
    );
    let spooled = std::fs::read_dir(&archive).expect("archive").count() - archived;
    assert!(
        spooled >= 3,
        "{spooled} profiles spooled while the backend was away"
    );
    let backend = Backend::pyroscope(addr);
    let daemon = Daemon::start(&args);
    wait_for("the previous run's spool", Duration::from_secs(20), || {
        windows(&backend).len() > spooled
    });
    daemon.stop();
    let resumed = windows(&backend);
    // The first run's spool comes first and in order, then the new run's profiles.
    assert_contiguous(&resumed[..spooled]);
    assert!(
        resumed[..spooled]
            .iter()
            .all(|w| w.0 > first_run.last().expect("first run").0)
    );
    for pair in resumed.windows(2) {
        assert!(pair[0].0 < pair[1].0, "in order: {resumed:?}");
    }
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (status, _, body) = http_get(addr, "/metrics", &[]);
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("utf8");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

#[test]
fn refused_and_garbage_answers_are_counted_and_never_stop_the_daemon() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let backend = Backend::pyroscope("127.0.0.1:0".parse().expect("addr"));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &format!(
            "spool_dir: {}\nexporters:\n  - {{type: pyroscope, name: main, url: '{}', insecure: true, min_backoff: 100ms, max_backoff: 200ms}}\n",
            dir.path().join("spool").display(),
            backend.url()
        ),
    );
    let http = free_addr();
    let http_arg = http.to_string();
    let fixture = Fixture::start(c_fixture(), 60);
    let pid = fixture.pid().to_string();
    backend.set(Behaviour::Fail {
        status: 400,
        retry_after: None,
    });
    let daemon = Daemon::start(&[
        "--config",
        &config,
        "--interval",
        "1s",
        "--pid",
        &pid,
        "--no-archive",
        "--http-listen",
        &http_arg,
    ]);
    let labels = "{exporter=\"main\",type=\"pyroscope\"}";
    wait_ready(http);
    wait_for("rejections", Duration::from_secs(20), || {
        metric(http, &format!("profiler_export_rejected_total{labels}")) >= 2.0
    });
    assert!(backend.received().is_empty());
    backend.set(Behaviour::Garbage);
    wait_for("failed attempts on garbage", Duration::from_secs(20), || {
        metric(http, &format!("profiler_export_failures_total{labels}")) >= 3.0
    });
    assert_eq!(
        metric(http, &format!("profiler_export_sent_total{labels}")),
        0.0,
        "a 200 that is not a Push answer is not a delivery"
    );
    let rejected = metric(http, &format!("profiler_export_rejected_total{labels}"));
    backend.set(Behaviour::Accept);
    wait_for("delivery after recovery", Duration::from_secs(20), || {
        metric(http, &format!("profiler_export_spool_profiles{labels}")) == 0.0
            && backend.received().len() >= 2
    });
    // Profiles answered with garbage were retried, not dropped: they arrive now.
    let windows = windows(&backend);
    assert!(windows.len() >= 2, "{windows:?}");
    assert_contiguous(&windows);
    assert_eq!(
        metric(http, &format!("profiler_export_rejected_total{labels}")),
        rejected
    );
    assert!(metric(http, "profiler_samples_total") > 0.0);
    assert!(metric(http, "process_resident_memory_bytes") > 1e6);
    assert!(metric(http, "profiler_bpf_map_entries{map=\"PROCS\"}") >= 1.0);
    // The fixture's frames repeat every interval: after the first they come from the name
    // cache, not from its file's tables.
    let hits = metric(http, "profiler_symbol_name_cache_lookups_total{result=\"hit\"}");
    let misses = metric(http, "profiler_symbol_name_cache_lookups_total{result=\"miss\"}");
    assert!(
        misses > 0.0 && hits > misses,
        "name cache: {hits} hits, {misses} misses"
    );
    daemon.stop();
}

/// `go tool pprof` from Debian's Go.
fn go_tool_pprof(args: &[&str]) -> String {
    let home = tempfile::tempdir().expect("tempdir");
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .env("HOME", home.path())
        .env("PPROF_TMPDIR", home.path())
        .output()
        .expect("go tool pprof");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "go tool pprof {args:?}:\n{text}");
    text
}

#[test]
fn go_tool_pprof_reads_the_live_endpoint_and_filters_by_pid() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let fixture = Fixture::start(c_fixture(), 60);
    let http = free_addr();
    let http_arg = http.to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("archive");
    let daemon = Daemon::start(&[
        "--interval",
        "30s",
        "--frequency",
        "99",
        "--http-listen",
        &http_arg,
        "--output-dir",
        archive.to_str().expect("utf8"),
    ]);
    wait_ready(http);
    let url = format!("http://{http}/debug/pprof/profile?seconds=2");
    let top = go_tool_pprof(&["-top", &url]);
    assert!(top.contains("hot_a"), "{top}");

    let (status, head, body) = http_get(
        http,
        &format!("/debug/pprof/profile?seconds=2&pid={}", fixture.pid()),
        &[],
    );
    assert_eq!(status, 200, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("content-type: application/octet-stream"), "{head}");
    assert!(
        lower.contains("content-disposition: attachment; filename=\"profile\""),
        "{head}"
    );
    let profile = decode(&body).expect("gzip'd pprof");
    let pid_key = profile
        .string_table
        .iter()
        .position(|s| s == "pid")
        .expect("pid label") as i64;
    let pids: std::collections::HashSet<i64> = profile
        .sample
        .iter()
        .flat_map(|s| &s.label)
        .filter(|l| l.key == pid_key)
        .map(|l| l.num)
        .collect();
    assert_eq!(
        pids,
        [i64::from(fixture.pid())].into(),
        "only the selected process"
    );
    let total: i64 = profile.sample.iter().map(|s| s.value[0]).sum();
    assert!(
        (100..=300).contains(&total),
        "{total} samples of one busy process in 2 s at 99 Hz"
    );
    let filtered = go_tool_pprof(&["-top", &format!("{url}&pid={}", fixture.pid())]);
    assert!(filtered.contains("hot_a"), "{filtered}");

    let (status, head, body) = http_get(http, "/debug/pprof/profile?seconds=2&pid=4194303", &[]);
    assert_eq!(status, 404, "{head}");
    assert!(head.to_ascii_lowercase().contains("x-go-pprof: 1"));
    assert!(String::from_utf8_lossy(&body).contains("no process with pid 4194303"));
    let (status, _, index) = http_get(http, "/debug/pprof/", &[]);
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&index).contains(&format!("pid={}", fixture.pid())));
    daemon.stop();
}

#[test]
fn a_non_loopback_endpoint_demands_the_bearer_token_over_tls() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::create(dir.path());
    let token = dir.path().join("token");
    std::fs::write(&token, "let-me-in\n").expect("write");
    let port = free_addr().port();
    let listen = format!("0.0.0.0:{port}");
    // A token sent in plaintext off loopback can be read by anyone on the path: refused.
    let plaintext = Command::new(profiler_bin())
        .args([
            "run",
            "--check-config",
            "--http-listen",
            &listen,
            "--http-bearer-token-file",
        ])
        .arg(&token)
        .output()
        .expect("run profiler");
    let said = String::from_utf8_lossy(&plaintext.stderr);
    assert!(
        !plaintext.status.success(),
        "a plaintext token off loopback was accepted"
    );
    assert!(said.contains("--http-tls-cert"), "{said}");

    let daemon = Daemon::start(&[
        "--interval",
        "30s",
        "--no-archive",
        "--http-listen",
        &listen,
        "--http-bearer-token-file",
        token.to_str().expect("utf8"),
        "--http-tls-cert",
        pki.server_cert.to_str().expect("utf8"),
        "--http-tls-key",
        pki.server_key.to_str().expect("utf8"),
    ]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca).expect("ca")).expect("ca");
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca)
        .build()
        .expect("client");
    let url = |path: &str| format!("https://localhost:{port}{path}");
    let get = |path: &str, token: Option<&str>| {
        runtime.block_on(async {
            let mut request = client.get(url(path));
            if let Some(token) = token {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            let answer = request.send().await?;
            let status = answer.status().as_u16();
            let challenge = answer
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = answer.bytes().await?.to_vec();
            Ok::<_, reqwest::Error>((status, challenge, body))
        })
    };
    wait_for("the TLS endpoint", Duration::from_secs(20), || {
        get("/readyz", None).is_ok_and(|(status, _, _)| status == 200)
    });
    assert_eq!(
        get("/healthz", None).expect("healthz").0,
        200,
        "probes need no token"
    );
    let (status, challenge, _) = get("/debug/pprof/profile?seconds=1", None).expect("profile");
    assert_eq!(status, 401);
    assert!(challenge.is_some_and(|c| c.to_ascii_lowercase().starts_with("bearer")));
    assert_eq!(get("/metrics", Some("wrong")).expect("metrics").0, 401);
    let (status, _, body) = get("/debug/pprof/profile?seconds=1", Some("let-me-in")).expect("profile");
    assert_eq!(status, 200);
    decode(&body).expect("a profile");
    // A rotated token is read again from the file.
    std::fs::write(&token, "rotated-token-2\n").expect("rotate");
    assert_eq!(get("/metrics", Some("let-me-in")).expect("metrics").0, 401);
    assert_eq!(get("/metrics", Some("rotated-token-2")).expect("metrics").0, 200);
    daemon.stop();
}

#[test]
fn tls_with_a_private_ca_and_client_certificates_both_ways() {
    let _serial = serial();
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::create(dir.path());
    let backend = Backend::pyroscope_mtls(&pki);
    let config = write_config(
        dir.path(),
        &format!(
            "spool_dir: {spool}\nexporters:\n  - type: pyroscope\n    url: https://localhost:{port}\n    tls: {{ca_file: {ca}, cert_file: {cert}, key_file: {key}}}\n",
            spool = dir.path().join("spool").display(),
            port = backend.addr.port(),
            ca = pki.ca.display(),
            cert = pki.client_cert.display(),
            key = pki.client_key.display(),
        ),
    );
    let port = free_addr().port();
    // Mutual TLS is enough authentication for a non-loopback bind.
    let listen = format!("0.0.0.0:{port}");
    let daemon = Daemon::start(&[
        "--config",
        &config,
        "--interval",
        "1s",
        "--no-archive",
        "--http-listen",
        &listen,
        "--http-tls-cert",
        pki.server_cert.to_str().expect("utf8"),
        "--http-tls-key",
        pki.server_key.to_str().expect("utf8"),
        "--http-client-ca",
        pki.ca.to_str().expect("utf8"),
    ]);
    wait_for("a profile over mutual TLS", Duration::from_secs(30), || {
        !backend.received().is_empty()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca).expect("ca")).expect("ca");
    let url = format!("https://localhost:{port}/metrics");
    let with_cert = {
        let mut pem = std::fs::read(&pki.client_cert).expect("cert");
        pem.extend(std::fs::read(&pki.client_key).expect("key"));
        reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(ca.clone())
            .identity(reqwest::Identity::from_pem(&pem).expect("identity"))
            .build()
            .expect("client")
    };
    let without_cert = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca)
        .build()
        .expect("client");
    runtime.block_on(async {
        let answer = with_cert.get(&url).send().await.expect("mTLS request");
        assert_eq!(answer.status(), 200);
        let text = answer.text().await.expect("body");
        assert!(text.contains("profiler_export_sent_total{exporter=\"pyroscope\",type=\"pyroscope\"}"));
        let refused = without_cert.get(&url).send().await;
        assert!(
            refused.is_err(),
            "a client without a certificate is refused: {refused:?}"
        );
    });
    daemon.stop();
}
