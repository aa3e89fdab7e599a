//! Envoy with the shipped configurations, a TCP cutter, an echo upstream, and a small HTTP client.

use super::*;

/// A TCP forwarder between the service and a backend, to cut the backend
/// off mid-test (the backend itself is shared and keeps running).
pub struct Cutter {
    pub addr: SocketAddr,
    target: SocketAddr,
    stop: CancellationToken,
    silent: CancellationToken,
}

impl Cutter {
    pub async fn start(target: SocketAddr) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), target).await
    }

    /// A cut backend back: forwarding again on the same address (the
    /// backend kept its state all along).
    pub async fn reopen(&self) -> Self {
        Self::start_on(self.addr, self.target).await
    }

    async fn start_on(listen: SocketAddr, target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let silent = CancellationToken::new();
        let (token, quiet) = (stop.clone(), silent.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = token.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut inbound, _)) = accepted else {
                    return;
                };
                let (token, quiet) = (token.clone(), quiet.clone());
                tokio::spawn(async move {
                    if quiet.is_cancelled() {
                        // Silent: take the connection, say nothing.
                        token.cancelled().await;
                        return;
                    }
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = token.cancelled() => {}
                        () = quiet.cancelled() => {
                            // Keep both ends open, forward nothing.
                            token.cancelled().await;
                        }
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                    drop((inbound, outbound));
                });
            }
        });
        Self {
            addr,
            target,
            stop,
            silent,
        }
    }

    /// Keeps every connection open but forwards nothing more, and accepts
    /// new ones without answering: a backend that hangs.
    pub fn silence(&self) {
        self.silent.cancel();
    }

    /// Drops every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.stop.cancel();
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A real Envoy started on one of the shipped configs (`envoy/*.yaml`), with
/// only addresses, ports and paths substituted.
pub struct Envoy {
    child: std::process::Child,
    pub addr: SocketAddr,
    /// The admin interface (stats, /ready).
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// `replacements` are exact strings of the shipped file and their test
    /// values; each must occur in the file, so file and test stay in step.
    pub async fn start(
        config: &str,
        listener_default: u16,
        replacements: &[(&str, String)],
    ) -> Self {
        let envoy = Self::start_unready(config, listener_default, replacements);
        envoy.wait_ready().await;
        envoy
    }

    /// As [`Self::start`], without waiting for Envoy to be ready.
    pub fn start_unready(
        config: &str,
        listener_default: u16,
        replacements: &[(&str, String)],
    ) -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("envoy")
            .join(config);
        let mut yaml = std::fs::read_to_string(&path).unwrap();
        let port = free_port();
        let admin = free_port();
        let mut all: Vec<(String, String)> = replacements
            .iter()
            .map(|(a, b)| ((*a).to_owned(), b.clone()))
            .collect();
        all.push((
            format!("port_value: {listener_default}"),
            format!("port_value: {port}"),
        ));
        let gateway = config == "gateway.yaml" || config == "edge.yaml";
        let admin_default = if gateway { 9901 } else { 15000 };
        all.push((
            format!("port_value: {admin_default}"),
            format!("port_value: {admin}"),
        ));
        all.push(("address: 0.0.0.0".into(), "address: 127.0.0.1".into()));
        // The shipped files name Kubernetes Services; here all is loopback.
        all.push((
            "address: auth-service,".into(),
            "address: 127.0.0.1,".into(),
        ));
        if gateway {
            all.push(("address: api-backend,".into(), "address: 127.0.0.1,".into()));
        }
        if config == "gateway.yaml" {
            // Traces go nowhere unless a test points them at its receiver.
            all.push((
                "address: otel-collector.observability.svc.cluster.local,".into(),
                "address: 127.0.0.1,".into(),
            ));
        }
        for (from, to) in &all {
            assert!(
                yaml.contains(from.as_str()),
                "{config} no longer contains {from:?}"
            );
            yaml = yaml.replace(from.as_str(), to);
        }
        Self::spawn(&yaml, port, admin)
    }

    /// Runs Envoy on a configuration of the test's own, whose listener is on
    /// `port` and admin interface on `admin`.
    pub async fn run(yaml: &str, port: u16, admin: u16) -> Self {
        let envoy = Self::spawn(yaml, port, admin);
        envoy.wait_ready().await;
        envoy
    }

    fn spawn(yaml: &str, port: u16, admin: u16) -> Self {
        let bin = std::env::var("ENVOY_BIN")
            .expect("ENVOY_BIN is not set: run the suite with scripts/test, which installs Envoy");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("envoy.yaml");
        std::fs::write(&file, yaml).unwrap();
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = std::process::Command::new(bin)
            .args([
                "-c",
                file.to_str().unwrap(),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ])
            .args(["--base-id", &u32::from(port).to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start envoy");
        Self {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            admin: format!("127.0.0.1:{admin}").parse().unwrap(),
            _dir: dir,
        }
    }

    /// Waits (up to 30 s) until Envoy answers /ready with 200.
    pub async fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.ready().await {
            assert!(std::time::Instant::now() < deadline, "envoy not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether Envoy is up and initialised (its admin /ready is 200);
    /// panics with its log if it exited.
    pub async fn ready(&self) -> bool {
        let exited = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .map(|stat| stat.split(' ').nth(2) == Some("Z"))
            .unwrap_or(true);
        if exited {
            let log =
                std::fs::read_to_string(self._dir.path().join("envoy.log")).unwrap_or_default();
            panic!("envoy exited: {log}");
        }
        TcpStream::connect(self.admin).await.is_ok()
            && http_get(self.admin, "/ready").await.0 == 200
    }

    /// One counter or gauge of Envoy's stats (`None`: no such stat).
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let (_, body) = http_get(self.admin, &format!("/stats?filter=^{name}$")).await;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An upstream that answers every request with what it saw as JSON:
/// the path and the identity headers.
pub async fn echo_backend() -> SocketAddr {
    use axum::{Json, http::HeaderMap};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|uri: axum::http::Uri, headers: HeaderMap| async move {
        let get = |name: &str| {
            headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap_or("").to_owned())
                .collect::<Vec<_>>()
        };
        Json(serde_json::json!({
            "path": uri.path(),
            "x-user-id": get("x-user-id"),
            "x-user-roles": get("x-user-roles"),
            "x-session-id": get("x-session-id"),
        }))
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// One HTTP/1.1 request over a fresh connection (handles chunked bodies).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResponse {
    http_from(None, addr, method, path, headers, body).await
}

/// Whether `raw` holds a whole HTTP/1.1 response by its own framing.
fn response_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|len| body.len() >= len)
}

/// As [`http`], from the loopback address `source` (any 127.x address is a
/// distinct client to the server).
pub async fn http_from(
    source: Option<std::net::Ipv4Addr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResponse {
    let mut stream = match source {
        None => TcpStream::connect(addr).await.expect("connect"),
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(ip.into(), 0)).unwrap();
            socket.connect(addr).await.expect("connect")
        }
    };
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("content-length: 0\r\n\r\n");
    }
    stream.write_all(request.as_bytes()).await.unwrap();
    // Read until the response is complete by its own framing (a server may
    // hold the connection open a while before closing it, as Envoy does
    // after a local reply), else to the end.
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if response_complete(&raw) {
            break;
        }
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = raw.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    body
}
