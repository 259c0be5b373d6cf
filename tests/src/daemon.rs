//! Running the daemon in tests: `profiler run` in the background, plain HTTP requests to its
//! endpoint, and polling for a condition.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::profiler_bin;

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// `profiler run` in the background; SIGTERM and wait on [`Daemon::stop`].
pub struct Daemon(Option<Child>);

impl Daemon {
    pub fn start(args: &[&str]) -> Self {
        let child = Command::new(profiler_bin())
            .arg("run")
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start profiler run");
        Self(Some(child))
    }

    pub fn stop(mut self) -> Output {
        let child = self.0.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let out = child.wait_with_output().expect("profiler exits");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "profiler run failed:\n{stderr}");
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the daemon's endpoint at `addr` answers `/readyz` with 200.
pub fn wait_ready(addr: SocketAddr) {
    // Until the daemon listens, a connection can be refused or reset: not ready yet.
    wait_for("readiness", Duration::from_secs(20), || {
        try_http_get(addr, "/readyz", &[]).is_ok_and(|(status, _, _)| status == 200)
    });
}

/// A plain HTTP/1.1 GET: (status, headers, body).
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String, Vec<u8>) {
    try_http_get(addr, path, headers).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// [`http_get`], with connection trouble and malformed answers as errors.
pub fn try_http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let malformed = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| malformed("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed("no status"))?;
    Ok((status, head, raw[split + 4..].to_vec()))
}

pub fn write_config(dir: &Path, body: &str) -> String {
    let path = dir.join("config.yaml");
    std::fs::write(&path, body).expect("write config");
    path.to_str().expect("utf8").to_owned()
}
