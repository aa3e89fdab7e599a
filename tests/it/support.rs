//! Test harness: spawns the real server on port 0 against a real backend,
//! with a fresh database and Redis key prefix per test, and typed helpers.
//!
//! Backends: `Embedded` (SQLite file in a temp dir, in-process revocation and
//! counters) and `Production` (PostgreSQL database created for the test on
//! `TEST_DATABASE_URL`, Redis at `TEST_REDIS_URL` under a unique prefix).
//! `scripts/test` starts both servers and sets the variables.

use std::{net::SocketAddr, path::Path, process::Stdio, time::Duration};

use auth_service::{
    accounts::model::Role,
    config::Config,
    events::{OutboxEvent, RequestContext, StoredEvent},
    grpc::pb::{self, auth_service_client::AuthServiceClient},
    startup::Application,
    storage::Database,
};
use sqlx::{Connection, PgConnection};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, transport::Channel};
use uuid::Uuid;

pub const PASSWORD: &str = "correct horse battery";

/// The identity the tests' Envoy presents to auth-service.
pub const GATEWAY_IDENTITY: &str = "spiffe://immersiverse/ns/edge/sa/gateway";

/// One PKI for the tests that put the shipped Envoy configs in front of
/// auth-service (they reach it over mTLS).
pub fn mesh_pki() -> &'static TestPki {
    static PKI: std::sync::OnceLock<TestPki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let pki = TestPki::new();
        pki.issue("envoy", &format!("URI:{GATEWAY_IDENTITY}"));
        pki
    })
}

/// auth-service requiring client certificates of the mesh CA; Envoy's is a
/// gateway identity (its `x-forwarded-for` is trusted).
pub fn mesh_tls(config: &mut Config) {
    let pki = mesh_pki();
    config.tls.cert = Some(pki.path("server.crt").into());
    config.tls.key = Some(pki.path("server.key").into());
    config.tls.client_ca = Some(pki.path("ca.crt").into());
    config.tls.client_auth = auth_service::config::ClientAuth::Required;
    config.services.insert(
        GATEWAY_IDENTITY.into(),
        auth_service::config::ServiceIdentity {
            roles: vec!["gateway".into()],
        },
    );
}

/// What points a shipped Envoy config's mTLS at the mesh PKI.
pub fn envoy_tls() -> Vec<(&'static str, String)> {
    let pki = mesh_pki();
    vec![
        ("/etc/envoy/tls/tls.crt", pki.path("envoy.crt")),
        ("/etc/envoy/tls/tls.key", pki.path("envoy.key")),
        ("/etc/envoy/tls/ca.crt", pki.path("ca.crt")),
        ("sni: auth-service", "sni: localhost".into()),
        ("exact: auth-service", "exact: localhost".into()),
    ]
}

/// A client of a TLS-serving app: the CA and `client.crt`/`client.key` next
/// to its server certificate (a `TestPki`), if they are there.
async fn tls_client(config: &Config, addr: SocketAddr) -> Option<AuthServiceClient<Channel>> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let dir = config.tls.cert.as_ref()?.parent()?;
    let read = |f: &str| std::fs::read(dir.join(f)).ok();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt")?))
        .identity(Identity::from_pem(read("client.crt")?, read("client.key")?))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .ok()?
        .tls_config(tls)
        .ok()?
        .connect()
        .await
        .ok()?;
    Some(AuthServiceClient::new(channel))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Production,
}

pub fn env_url(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the suite with scripts/test, which starts PostgreSQL and Redis"
        )
    })
}

/// A database of its own for one test.
pub async fn fresh_postgres_url() -> String {
    let admin = env_url("TEST_DATABASE_URL");
    let name = format!("t_{}", Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&admin)
        .await
        .expect("connect to TEST_DATABASE_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let (base, _) = admin.rsplit_once('/').expect("URL has a database path");
    format!("{base}/{name}")
}

/// Fast argon2 for tests; the defaults are exercised by the benchmark and
/// by the process tests.
pub fn base_config(data_dir: &Path) -> Config {
    let mut config = Config {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_path_buf(),
        ..Config::default()
    };
    config.password.memory_kib = 1024;
    config.password.iterations = 1;
    config.database_max_connections = 5;
    // Tests burst hundreds of calls from one address; the hashing queue's
    // admission bounds are exercised in `overload`.
    config.password.max_queued = 1 << 20;
    config.password.max_queued_per_source = 1 << 20;
    config.password.max_wait_ms = 600_000;
    // The relay and consumer run inside the test's server: the behaviour
    // under test is theirs. The default (a supervised worker process) is
    // exercised through the real binary in `process`.
    config.kafka.worker = auth_service::config::EventsWorker::InProcess;
    config
}

pub async fn config_for(backend: Backend, data_dir: &Path) -> Config {
    let mut config = base_config(data_dir);
    if backend == Backend::Production {
        config.database_url = Some(fresh_postgres_url().await);
        config.redis_url = Some(env_url("TEST_REDIS_URL"));
        config.redis_key_prefix = format!("t{}:", Uuid::new_v4().simple());
    }
    config
}

pub struct TestApp {
    pub backend: Backend,
    pub config: Config,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The separate ext_authz listener, when configured.
    pub check_addr: Option<SocketAddr>,
    pub client: AuthServiceClient<Channel>,
    pub database: Database,
    pub app_tokens: std::sync::Arc<auth_service::tokens::TokenService>,
    pub platforms: std::sync::Arc<auth_service::platforms::service::PlatformService>,
    stop: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    pub dir: tempfile::TempDir,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, |_| {}).await
    }

    pub async fn spawn_with(backend: Backend, adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_for(backend, dir.path()).await;
        adjust(&mut config);
        Self::start(backend, config, dir).await
    }

    /// Starts a server on `config` (used to restart on the same data).
    pub async fn start(backend: Backend, config: Config, dir: tempfile::TempDir) -> Self {
        if std::env::var_os("TEST_LOG").is_some() {
            auth_service::telemetry::init_tracing(config.log_format);
        }
        let app = Application::build(config.clone())
            .await
            .expect("application builds");
        let grpc_addr = app.grpc_addr();
        let http_addr = app.http_addr();
        let check_addr = app.check_addr();
        let database = app.database();
        let app_tokens = app.tokens();
        let platforms = app.platforms();
        let stop = CancellationToken::new();
        let server = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
        // Over TLS: a client with the PKI's client certificate when there is
        // one; otherwise the test makes its own.
        let client = if config.tls.cert.is_some() {
            match tls_client(&config, grpc_addr).await {
                Some(client) => client,
                None => AuthServiceClient::new(
                    Channel::from_shared(format!("http://{grpc_addr}"))
                        .unwrap()
                        .connect_lazy(),
                ),
            }
        } else {
            AuthServiceClient::new(channel(grpc_addr).await)
        };
        Self {
            backend,
            config,
            grpc_addr,
            http_addr,
            check_addr,
            client,
            database,
            app_tokens,
            platforms,
            stop,
            server: Some(server),
            dir,
        }
    }

    /// A second replica of this deployment: same database, Redis prefix and
    /// signing keys, its own data dir and ports.
    pub async fn replica(&self) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let mut config = self.config.clone();
        config.data_dir = dir.path().to_path_buf();
        config.tokens.keys_dir = Some(self.config.keys_dir());
        config.tokens.generate_key_if_missing = false;
        config.platforms.keys_dir = Some(self.config.platform_keys_dir());
        config.platforms.generate_key_if_missing = false;
        TestApp::start(self.backend, config, dir).await
    }

    /// Stops the server and waits for it to drain.
    pub async fn stop(mut self) -> (Config, tempfile::TempDir) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            server.await.unwrap().expect("server exits cleanly");
        }
        (
            self.config.clone(),
            std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()),
        )
    }

    pub async fn sign_up(&mut self, username: &str) -> pb::User {
        self.client
            .create_user(pb::CreateUserRequest {
                email: format!("{username}@example.com"),
                username: username.into(),
                password: PASSWORD.into(),
            })
            .await
            .expect("sign-up succeeds")
            .into_inner()
            .user
            .unwrap()
    }

    pub async fn login(
        &mut self,
        login: &str,
        password: &str,
    ) -> Result<pb::TokenResponse, Status> {
        self.client
            .login(pb::LoginRequest {
                login: login.into(),
                password: password.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn login_ok(&mut self, login: &str) -> pb::TokenResponse {
        self.login(login, PASSWORD).await.expect("login succeeds")
    }

    pub async fn validate(&mut self, token: &str) -> Result<pb::ValidateTokenResponse, Status> {
        self.client
            .validate_token(pb::ValidateTokenRequest {
                token: token.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn refresh(&mut self, refresh_token: &str) -> Result<pb::TokenResponse, Status> {
        self.client
            .refresh_token(pb::RefreshTokenRequest {
                refresh_token: refresh_token.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// A signed-up user who logged in and holds the admin role (granted the
    /// way an operator does, straight in the store).
    pub async fn admin(&mut self) -> pb::TokenResponse {
        self.with_role("root-admin", "admin").await
    }

    /// A signed-up user holding `role` (and `user`), logged in.
    pub async fn with_role(&mut self, username: &str, role: &str) -> pb::TokenResponse {
        let user = self.sign_up(username).await;
        let id = Uuid::parse_str(&user.id).unwrap();
        let roles = vec![Role::parse("r", role).unwrap(), Role::user()];
        let event = OutboxEvent::roles_changed(id, Uuid::nil(), &roles, &RequestContext::default());
        self.database
            .users
            .set_roles(id, &roles, &event)
            .await
            .unwrap()
            .unwrap();
        self.login_ok(username).await
    }

    pub async fn events(&self) -> Vec<StoredEvent> {
        self.database.outbox.unpublished(10_000).await.unwrap()
    }

    pub async fn event_types(&self) -> Vec<String> {
        self.events()
            .await
            .into_iter()
            .map(|e| e.event_type)
            .collect()
    }

    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http_addr, path).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the gRPC port")
}

/// `message` with `authorization: Bearer <token>`.
pub fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// A rule admitting only `identity` (a downstream service's certificate)
/// on `path`, with no user token.
pub fn service_only_route(path: &str, identity: &str) -> auth_service::authz::policy::RouteRule {
    auth_service::authz::policy::RouteRule {
        methods: Vec::new(),
        path: path.into(),
        access: auth_service::authz::policy::AccessKind::Public,
        roles: Vec::new(),
        rate_class: "default".into(),
        services: vec![identity.into()],
    }
}

/// `message` as if the gateway saw it come from `ip`.
pub fn from_ip<T>(message: T, ip: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-forwarded-for", ip.parse().unwrap());
    request
}

/// A minimal HTTP/1.1 GET (the admin port speaks plain HTTP/1.1).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the HTTP port");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("an HTTP status line");
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A Redis server of the test's own, to be killed mid-test.
pub struct OwnRedis {
    pub url: String,
    child: std::process::Child,
    /// How it was started, for [`OwnRedis::restart`].
    args: Vec<String>,
    port: u16,
    /// Its working directory (`--dir`): whatever it writes (a replica's
    /// copy of its master's data, for one) stays out of the work tree.
    _dir: tempfile::TempDir,
}

impl OwnRedis {
    pub async fn start() -> Self {
        Self::start_with(&[], "redis").await
    }

    /// A plaintext Redis with `extra` server arguments
    /// (`["--maxmemory-policy", "allkeys-lru"]`).
    pub async fn start_args(extra: &[&str]) -> Self {
        Self::start_with(extra, "redis").await
    }

    /// Starts it again, killed or not, on the same port with the same
    /// arguments: it comes back empty (no persistence).
    pub async fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.args, self.port)
            .await
            .expect("redis-server starts again on its port");
    }

    async fn spawn(args: &[String], port: u16) -> Option<std::process::Child> {
        let mut child = std::process::Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Some(child);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Redis serving only TLS with `pki`'s server certificate, requiring
    /// client certificates of `pki`'s CA.
    pub async fn start_tls(pki: &TestPki) -> Self {
        let (cert, key, ca) = (
            pki.path("server.crt"),
            pki.path("server.key"),
            pki.path("ca.crt"),
        );
        Self::start_with(
            &[
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "yes",
            ],
            "rediss",
        )
        .await
    }

    async fn start_with(extra: &[&str], scheme: &str) -> Self {
        let port = free_port();
        let mut args: Vec<String> = if scheme == "rediss" {
            vec!["--port".into(), "0".into(), "--tls-port".into()]
        } else {
            vec!["--port".into()]
        };
        args.push(port.to_string());
        let dir = tempfile::tempdir().unwrap();
        args.extend(
            [
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args.push(dir.path().display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Self::spawn(&args, port)
            .await
            .expect("redis-server did not start");
        Self {
            url: format!("{scheme}://127.0.0.1:{port}/"),
            child,
            args,
            port,
            _dir: dir,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (`STOP`: the server goes silent, its connections
    /// stay open; `CONT`: it comes back).
    pub fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal}");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of the test's own: three primaries on loopback joined by
/// `redis-cli --cluster create` (the slots spread over them), no replicas.
pub struct RedisCluster {
    pub nodes: Vec<OwnRedis>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let conf = dir.path().join(format!("nodes-{i}.conf"));
            nodes.push(
                OwnRedis::start_with(
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf.display().to_string(),
                        "--cluster-node-timeout",
                        "2000",
                    ],
                    "redis",
                )
                .await,
            );
        }
        let cluster = Self { nodes, _dir: dir };
        let mut create = std::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in cluster.ports() {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = tokio::task::spawn_blocking(move || {
            create
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .output()
                .expect("redis-cli is installed with redis-server")
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Every node agrees the cluster is up before the test starts.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for port in cluster.ports() {
            while !cluster_cli(port, &["cluster", "info"]).contains("cluster_state:ok") {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the cluster did not come up"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        cluster
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| node_port(&n.url)).collect()
    }

    /// The seed list as `redis_url` takes it in cluster mode.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node serving `key`'s slot.
    pub fn node_of(&self, key: &str) -> usize {
        let ports = self.ports();
        let slot: u16 = cluster_cli(ports[0], &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap();
        let owner = slot_owner(ports[0], slot);
        ports.iter().position(|&p| p == owner).unwrap()
    }

    /// The keys a node holds that start with `prefix`.
    pub fn keys_on(&self, node: usize, prefix: &str) -> Vec<String> {
        cluster_cli(
            self.ports()[node],
            &["--scan", "--pattern", &format!("{prefix}*")],
        )
        .lines()
        .map(str::to_owned)
        .filter(|k| !k.is_empty())
        .collect()
    }
}

fn node_port(url: &str) -> u16 {
    url.trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn cluster_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The port of the node serving `slot`, from `CLUSTER SLOTS` as redis-cli
/// prints it to a pipe: start, end, ip, port, id for each range.
fn slot_owner(port: u16, slot: u16) -> u16 {
    let out = cluster_cli(port, &["cluster", "slots"]);
    let lines: Vec<&str> = out.lines().collect();
    for i in 0..lines.len().saturating_sub(3) {
        if let (Ok(start), Ok(end)) = (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>())
            && (start..=end).contains(&slot)
        {
            return lines[i + 3].parse().unwrap();
        }
    }
    panic!("no owner for slot {slot}: {out}")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Generates one test per backend from one body.
#[macro_export]
macro_rules! on_both_backends {
    ($($(#[$meta:meta])* async fn $name:ident($app:ident) $body:block)*) => {
        $(
            $(#[$meta])*
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                async fn scenario(#[allow(unused_mut)] mut $app: $crate::support::TestApp) $body

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    scenario($crate::support::TestApp::spawn($crate::support::Backend::Embedded).await).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres_and_redis() {
                    scenario($crate::support::TestApp::spawn($crate::support::Backend::Production).await).await
                }
            }
        )*
    };
}

/// A TCP forwarder between the service and a backend, to cut the backend
/// off mid-test (the backend itself is shared and keeps running).
pub struct Cutter {
    pub addr: SocketAddr,
    stop: CancellationToken,
    silent: CancellationToken,
}

impl Cutter {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
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
        Self { addr, stop, silent }
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

/// A Kafka-compatible broker (tansu) of the test's own: in-memory storage,
/// or SQLite storage when it must keep data across a restart.
pub struct Tansu {
    child: Option<std::process::Child>,
    pub port: u16,
    pub brokers: String,
    storage: String,
    _dir: Option<tempfile::TempDir>,
    /// SCRAM-SHA-256 user and password the broker requires, when it does.
    pub sasl: Option<(String, String)>,
    /// The CA and client certificate the test's own clients use when the
    /// broker is reached through a TLS front.
    pub tls: Option<TestPki>,
    /// The address advertised to clients when it is not the broker's own.
    advertised: Option<String>,
}

impl Tansu {
    pub async fn start() -> Self {
        let mut tansu = Self::reserve();
        tansu.restart().await;
        tansu
    }

    /// Stores topics in an SQLite file of its own, so what the broker
    /// acknowledged survives a kill.
    pub async fn start_durable() -> Self {
        let mut tansu = Self::reserve();
        let dir = tempfile::tempdir().unwrap();
        // tansu reads the path relative to its working directory.
        tansu.storage = "sqlite://tansu.db".into();
        tansu._dir = Some(dir);
        tansu.restart().await;
        tansu
    }

    /// A broker address where nothing listens yet (start it with `restart`).
    pub fn reserve() -> Self {
        let port = free_port();
        Self {
            child: None,
            port,
            brokers: format!("127.0.0.1:{port}"),
            storage: "memory://tansu/".into(),
            _dir: None,
            sasl: None,
            tls: None,
            advertised: None,
        }
    }

    /// A broker that requires SASL/SCRAM-SHA-256 from every client. tansu
    /// keeps users in its storage and creates them only for an
    /// authenticated client, so the user is created on an open broker over
    /// SQLite storage, which then restarts with authentication required.
    pub async fn start_with_sasl(user: &str, password: &str) -> Self {
        let mut tansu = Self::start_durable().await;
        let bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| "tansu".into());
        let created = tokio::process::Command::new(bin)
            .args([
                "user",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", tansu.port),
                "--mechanism",
                "scram256",
                user,
                password,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .unwrap();
        assert!(created.success(), "tansu user create");
        tansu.sasl = Some((user.to_owned(), password.to_owned()));
        tansu.restart().await;
        tansu
    }

    /// A client configuration for this broker (with its credentials).
    fn client_config(&self) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        if let Some((user, password)) = &self.sasl {
            config
                .set("security.protocol", "sasl_plaintext")
                .set("sasl.mechanism", "SCRAM-SHA-256")
                .set("sasl.username", user)
                .set("sasl.password", password);
        }
        if let Some(pki) = &self.tls {
            config
                .set("security.protocol", "ssl")
                .set("ssl.ca.location", pki.path("ca.crt"))
                .set("ssl.certificate.location", pki.path("client.crt"))
                .set("ssl.key.location", pki.path("client.key"));
        }
        config
    }

    /// A broker reachable only through TLS with a client certificate: Envoy
    /// terminates TLS (server certificate for 127.0.0.1, client certificates
    /// required, both from `pki`'s CA) and forwards to tansu, which
    /// advertises Envoy's address. (tansu 0.6.0 cannot serve TLS itself: its
    /// `--cert` and `--key` options exclude each other.)
    pub async fn start_behind_mtls(pki: TestPki) -> (Self, Envoy) {
        let mut tansu = Self::reserve();
        let front = free_port();
        let admin = free_port();
        let yaml = format!(
            r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: kafka_mtls
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {front} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{ filename: "{server_crt}" }}
              private_key: {{ filename: "{server_key}" }}
            validation_context:
              trusted_ca: {{ filename: "{ca}" }}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: kafka
          cluster: tansu
  clusters:
  - name: tansu
    type: STATIC
    load_assignment:
      cluster_name: tansu
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
"#,
            server_crt = pki.path("server.crt"),
            server_key = pki.path("server.key"),
            ca = pki.path("ca.crt"),
            port = tansu.port,
        );
        let envoy = Envoy::run(&yaml, front, admin).await;
        tansu.advertised = Some(format!("127.0.0.1:{front}"));
        tansu.brokers = format!("127.0.0.1:{front}");
        tansu.tls = Some(pki);
        tansu.restart().await;
        (tansu, envoy)
    }

    pub async fn restart(&mut self) {
        self.kill();
        let bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| "tansu".into());
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = match &self.advertised {
            Some(addr) => format!("tcp://{addr}"),
            None => url.clone(),
        };
        let mut command = std::process::Command::new(bin);
        if let Some(dir) = &self._dir {
            command.current_dir(dir.path());
        }
        command.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
            "--storage-engine",
            &self.storage,
        ]);
        if self.sasl.is_some() {
            command.arg("--authentication");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu is installed (scripts/test installs it)");
        self.child = Some(child);
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("tansu did not start");
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Produces one message and waits for its delivery report.
    pub async fn produce(&self, topic: &str, key: &str, payload: &[u8]) {
        self.produce_with_headers(topic, key, payload, &[]).await;
    }

    pub async fn produce_with_headers(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) {
        use rdkafka::{
            message::{Header, OwnedHeaders},
            producer::{FutureProducer, FutureRecord},
        };
        let producer: FutureProducer = self.client_config().create().unwrap();
        let headers = headers
            .iter()
            .fold(OwnedHeaders::new(), |all, (key, value)| {
                all.insert(Header {
                    key,
                    value: Some(*value),
                })
            });
        producer
            .send(
                FutureRecord::to(topic)
                    .key(key)
                    .payload(payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    /// What the user-profile service publishes: `{"user_id": …}` keyed by
    /// the user id on `user.events.<event>` (`user_suspended`, `user_deleted`).
    pub async fn user_event(&self, event: &str, user_id: &str) {
        let body = format!(r#"{{"user_id":"{user_id}"}}"#);
        self.produce(&format!("user.events.{event}"), user_id, body.as_bytes())
            .await;
    }

    /// Reads `topics` from the beginning until `expected` messages arrived
    /// or `within` passed. Partitions are assigned, not subscribed: no group
    /// membership, so no rebalance to wait for and nothing to leave.
    pub async fn read(
        &self,
        topics: &[&str],
        expected: usize,
        within: Duration,
    ) -> Vec<rdkafka::message::OwnedMessage> {
        use rdkafka::{
            Offset, TopicPartitionList,
            consumer::{BaseConsumer, Consumer},
        };
        let mut config = self.client_config();
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = config
                // assign() wants a group id; it never joins the group.
                .set("group.id", format!("test-{}", Uuid::new_v4()))
                .set("enable.auto.commit", "false")
                .create()
                .unwrap();
            let deadline = std::time::Instant::now() + within;
            let mut assignment = TopicPartitionList::new();
            for topic in &topics {
                let partitions = loop {
                    let metadata = consumer
                        .fetch_metadata(Some(topic), Duration::from_secs(5))
                        .ok();
                    let partitions: Vec<i32> = metadata
                        .iter()
                        .flat_map(|m| m.topics())
                        .filter(|t| t.error().is_none())
                        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                        .collect();
                    if !partitions.is_empty() || std::time::Instant::now() >= deadline {
                        break partitions;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                };
                for partition in partitions {
                    assignment
                        .add_partition_offset(topic, partition, Offset::Beginning)
                        .unwrap();
                }
            }
            consumer.assign(&assignment).unwrap();
            let mut messages = Vec::new();
            while messages.len() < expected && std::time::Instant::now() < deadline {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    messages.push(m.detach());
                }
            }
            messages
        })
        .await
        .unwrap()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A header of a Kafka message as text.
pub fn header(message: &rdkafka::message::OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::{Headers, Message};
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A throwaway certificate authority with a server certificate for
/// 127.0.0.1/localhost and a client certificate, made with the openssl CLI
/// (P-256 keys, valid for a day). Files: ca.crt, server.crt/.key,
/// client.crt/.key.
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let output = std::process::Command::new("openssl")
                .current_dir(dir.path())
                .args(args)
                .output()
                .expect("openssl is installed (scripts/test installs it)");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let new_key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &new_key[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=auth-service test CA",
                ],
            ]
            .concat(),
        );
        let pki = Self { dir };
        for name in ["server", "client"] {
            pki.issue(name, "IP:127.0.0.1,DNS:localhost");
        }
        pki
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// A certificate `<name>.crt` (key `<name>.key`) from this CA with
    /// `san` as its subjectAltName (e.g. `URI:spiffe://…`).
    pub fn issue(&self, name: &str, san: &str) {
        let run = |args: &[&str]| {
            let output = std::process::Command::new("openssl")
                .current_dir(self.dir.path())
                .args(args)
                .output()
                .expect("openssl is installed");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let ext = format!("{name}.cnf");
        std::fs::write(
            self.dir.path().join(&ext),
            format!("subjectAltName={san}\n"),
        )
        .unwrap();
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "1",
            "-extfile",
            &ext,
        ]);
    }
}

/// Redis behind Sentinel on loopback: a master, one replica of it and one
/// sentinel (quorum 1, the master judged down after 1 s).
pub struct RedisSentinel {
    pub master: OwnRedis,
    pub replica: OwnRedis,
    sentinel: std::process::Child,
    pub sentinel_port: u16,
    _dir: tempfile::TempDir,
}

pub const SENTINEL_MASTER: &str = "authmaster";

impl RedisSentinel {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let master = OwnRedis::start().await;
        let master_port = node_port(&master.url);
        let replica = OwnRedis::start_with(
            &["--replicaof", "127.0.0.1", &master_port.to_string()],
            "redis",
        )
        .await;
        let sentinel_port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {sentinel_port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 5000\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let sentinel = std::process::Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs as a sentinel");
        let deployment = Self {
            master,
            replica,
            sentinel,
            sentinel_port,
            _dir: dir,
        };
        // The replica is in sync and the sentinel knows it before the test.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let replica_port = node_port(&deployment.replica.url);
        while !(cluster_cli(replica_port, &["info", "replication"])
            .contains("master_link_status:up")
            && deployment.master_port() == Some(master_port))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the sentinel deployment did not come up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        deployment
    }

    /// `redis_url` in sentinel mode.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.sentinel_port)
    }

    /// The master's port as the sentinel names it now.
    pub fn master_port(&self) -> Option<u16> {
        let out = cluster_cli(
            self.sentinel_port,
            &["sentinel", "get-master-addr-by-name", SENTINEL_MASTER],
        );
        out.lines().nth(1)?.trim().parse().ok()
    }

    pub fn port_of(node: &OwnRedis) -> u16 {
        node_port(&node.url)
    }

    /// Blocks until the replica has acknowledged every write so far.
    pub fn wait_replicated(&self) {
        let acked = cluster_cli(node_port(&self.master.url), &["wait", "1", "5000"]);
        assert_eq!(acked.trim(), "1", "the replica did not acknowledge");
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        let _ = self.sentinel.kill();
        let _ = self.sentinel.wait();
    }
}

/// The server's signing key file (PEM) in `app`'s keys directory.
fn server_key_path(app: &TestApp) -> std::path::PathBuf {
    std::fs::read_dir(app.config.keys_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pem"))
        .unwrap()
}

/// The kid of the server's signing key (its file name).
pub fn server_key_id(app: &TestApp) -> String {
    server_key_path(app)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Signs `claims` with the server's real signing key, as the server would:
/// only the claims (and `header`) differ from a genuine token.
pub fn sign_with_server_key(
    app: &TestApp,
    header: jsonwebtoken::Header,
    claims: &impl serde::Serialize,
) -> String {
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&std::fs::read(server_key_path(app)).unwrap())
        .unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}
