//! Test harness: spawns the real server on port 0 against a real backend,
//! with a fresh database and Redis key prefix per test, and typed helpers.
//!
//! Backends: `Embedded` (SQLite file in a temp dir, in-process revocation and
//! counters) and `Production` (PostgreSQL database created for the test on
//! `TEST_DATABASE_URL`, Redis at `TEST_REDIS_URL` under a unique prefix).
//! `scripts/test` starts both servers and sets the variables.

mod kafka;
mod pki;
mod proxy;
mod redis;

pub use kafka::*;
pub use pki::*;
pub use proxy::*;
pub use redis::*;

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
        let feed = app.revocation_feed();
        let stop = CancellationToken::new();
        let server = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
        // Serving starts at once; readiness waits for the recent
        // revocations to be applied, and so does the harness (bounded: a
        // test may cut the database off at once).
        let _ = tokio::time::timeout(Duration::from_secs(5), feed.replayed()).await;
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

    /// Logout with `access_token` as the bearer (no refresh token).
    pub async fn logout(&self, access_token: &str) -> Result<(), Status> {
        self.client
            .clone()
            .logout(bearer(pb::LogoutRequest::default(), access_token))
            .await
            .map(drop)
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

    /// The value of the counter or gauge `series` (its name, with its
    /// labels if it has any) on `/metrics`; 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, page) = self.http_get("/metrics").await;
        page.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
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

/// A port nothing listens on now, for a server a test starts later.
///
/// Drawn below the kernel's ephemeral range (32768 and up): a port the
/// kernel hands out (`bind` to port 0) is also what it gives the next
/// client socket of any test, which then holds it when the server binds
/// ("Address already in use", seen). Below the range only another test's
/// pick can collide, one chance in 20,000.
pub fn free_port() -> u16 {
    const LOW: u32 = 12_000;
    const SPAN: u32 = 20_000;
    let start = getrandom::u32().expect("the system's random source");
    (0..SPAN)
        .map(|i| (LOW + start.wrapping_add(i) % SPAN) as u16)
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free port below the ephemeral range")
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

/// The auth-service executable the process tests start: Cargo's build of
/// it, or `TEST_SERVICE_BIN` (scripts/test points it at a copy, so that
/// the Dockerfile's replay, which rebuilds the same path beside the tests,
/// never replaces the file a test is starting).
pub fn service_bin() -> std::path::PathBuf {
    std::env::var_os("TEST_SERVICE_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_auth-service").into())
}
