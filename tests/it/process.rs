//! The real binary: start from nothing, survive a restart, stop on signals,
//! refuse bad configuration.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use auth_service::grpc::pb::{self, auth_service_client::AuthServiceClient};

use crate::support::{PASSWORD, channel, free_port, http_get};

pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) grpc: SocketAddr,
    pub(crate) http: SocketAddr,
    log: std::path::PathBuf,
}

/// Starts the binary with only the given `AUTH_*` variables (nothing
/// inherited) in `cwd`.
pub(crate) fn start(cwd: &Path, env: &[(&str, &str)]) -> Server {
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new(crate::support::service_bin());
    command
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AUTH_GRPC_ADDR", grpc.to_string())
        .env("AUTH_HTTP_ADDR", http.to_string())
        // The logs (kept for tests that read them).
        .stdout(std::fs::File::create(cwd.join("server.out")).unwrap())
        // Kept for the panic message when the server stops early.
        .stderr(std::fs::File::create(cwd.join("server.log")).unwrap());
    for (k, v) in env {
        command.env(k, v);
    }
    Server {
        child: command.spawn().unwrap(),
        grpc,
        http,
        log: cwd.join("server.log"),
    }
}

impl Server {
    pub(crate) async fn ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: String = log
                    .chars()
                    .rev()
                    .take(2000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                panic!("server exited early: {status}; its log ends:\n{tail}");
            }
            if tokio::net::TcpStream::connect(self.http).await.is_ok()
                && http_get(self.http, "/readyz").await.0 == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server not ready in time");
    }

    pub(crate) fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }

    pub(crate) fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) async fn client(&self) -> AuthServiceClient<tonic::transport::Channel> {
        AuthServiceClient::new(channel(self.grpc).await)
    }
}

/// Signs up `name` (`name@example.com`, the test password).
pub(crate) async fn sign_up(
    client: &mut AuthServiceClient<tonic::transport::Channel>,
    name: &str,
) -> pb::User {
    client
        .create_user(pb::CreateUserRequest {
            email: format!("{name}@example.com"),
            username: name.into(),
            password: PASSWORD.into(),
        })
        .await
        .expect("sign-up succeeds")
        .into_inner()
        .user
        .expect("the created user")
}

/// Logs `name` in with the test password.
pub(crate) async fn login(
    client: &mut AuthServiceClient<tonic::transport::Channel>,
    name: &str,
) -> pb::TokenResponse {
    client
        .login(pb::LoginRequest {
            login: name.into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .expect("login succeeds")
        .into_inner()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_from_an_empty_dir_keeps_data_and_keys_across_restarts_and_exits_0_on_sigterm_and_sigint()
 {
    let cwd = tempfile::tempdir().unwrap();
    // No config file and no AUTH_* beyond the two ports: the embedded default
    // with the default argon2 parameters, data in ./data.
    let mut first = start(cwd.path(), &[]);
    first.ready().await;
    assert!(cwd.path().join("data/auth.db").exists());
    assert!(
        std::fs::read_dir(cwd.path().join("data/keys"))
            .unwrap()
            .count()
            == 1
    );
    let mut client = first.client().await;
    sign_up(&mut client, "zoe").await;
    let pair = client
        .login(pb::LoginRequest {
            login: "zoe".into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(pair.access_token.starts_with("ey"));
    first.signal("TERM");
    assert_eq!(first.wait_exit().code(), Some(0), "SIGTERM exits 0");

    let mut second = start(cwd.path(), &[]);
    second.ready().await;
    let mut client = second.client().await;
    let valid = client
        .validate_token(pb::ValidateTokenRequest {
            token: pair.access_token.clone(),
        })
        .await;
    assert!(
        valid.is_ok(),
        "a token signed before the restart still verifies: the key survived: {valid:?}"
    );
    client
        .refresh_token(pb::RefreshTokenRequest {
            refresh_token: pair.refresh_token,
        })
        .await
        .expect("the session survived");
    client
        .login(pb::LoginRequest {
            login: "zoe@example.com".into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .expect("the account survived");
    second.signal("INT");
    assert_eq!(second.wait_exit().code(), Some(0), "SIGINT exits 0");
}

#[test]
fn a_bad_configuration_value_stops_start_up_naming_the_key() {
    let cwd = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("AUTH_GRPC_ADDR", "not-an-address"),
        ("AUTH_DATABASE_URL", "mysql://x"),
        ("AUTH_PASSWORD__ITERATIONS", "zero"),
    ] {
        let output = Command::new(crate::support::service_bin())
            .current_dir(cwd.path())
            .env_clear()
            .env(key, value)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{key}={value} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
    // A SASL protocol without its credentials: the first missing one is named.
    for (set, missing) in [
        (&[][..], "AUTH_KAFKA__SASL_MECHANISM"),
        (
            &[("AUTH_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")][..],
            "AUTH_KAFKA__SASL_USERNAME",
        ),
        (
            &[
                ("AUTH_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
                ("AUTH_KAFKA__SASL_USERNAME", "auth"),
            ][..],
            "AUTH_KAFKA__SASL_PASSWORD",
        ),
    ] {
        let output = Command::new(crate::support::service_bin())
            .current_dir(cwd.path())
            .env_clear()
            .env("AUTH_KAFKA__SECURITY_PROTOCOL", "sasl_ssl")
            .envs(set.iter().copied())
            .output()
            .unwrap();
        assert!(!output.status.success(), "accepted without {missing}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(missing), "{missing}: {stderr}");
    }
}

#[test]
fn an_unknown_config_file_is_refused() {
    let output = Command::new(crate::support::service_bin())
        .args(["--config", "/nonexistent/auth.toml"])
        .env_clear()
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/auth.toml"));
}

/// SIGKILL in the middle of a burst of sign-ups, then a restart: every
/// sign-up the database committed (answered or not) reaches Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_during_a_burst_loses_no_committed_event() {
    use rdkafka::message::Message;
    use sqlx::{Connection, PgConnection, Row};

    let tansu = crate::support::Tansu::start().await;
    let database_url = crate::support::fresh_postgres_url().await;
    let cwd = tempfile::tempdir().unwrap();
    let env = [
        ("AUTH_DATABASE_URL", database_url.as_str()),
        ("AUTH_KAFKA_BROKERS", tansu.brokers.as_str()),
        ("AUTH_KAFKA__TOPIC_PARTITIONS", "1"),
        ("AUTH_KAFKA__RELAY_IDLE_MS", "20"),
        // Rows the killed relay had leased wait for their lease to expire;
        // the default 30 s would equal the wait below.
        ("AUTH_KAFKA__RELAY_LEASE_SECS", "3"),
        // Only the relay is under test (the consumer would need Redis).
        ("AUTH_KAFKA__CONSUMER_ENABLED", "false"),
        // The burst comes from one address: let it all queue.
        ("AUTH_PASSWORD__MAX_QUEUED", "1000"),
        ("AUTH_PASSWORD__MAX_QUEUED_PER_SOURCE", "1000"),
        ("AUTH_PASSWORD__MAX_WAIT_MS", "60000"),
        ("AUTH_PASSWORD__MEMORY_KIB", "1024"),
        ("AUTH_PASSWORD__ITERATIONS", "1"),
    ];
    let mut first = start(cwd.path(), &env);
    first.ready().await;
    let client = first.client().await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let calls: Vec<_> = (0..400)
        .map(|i| {
            let mut c = client.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let request = pb::CreateUserRequest {
                    email: format!("burst{i}@example.com"),
                    username: format!("burst{i}"),
                    password: PASSWORD.into(),
                };
                let answer = c
                    .create_user(request)
                    .await
                    .ok()
                    .map(|r| r.into_inner().user.unwrap().id);
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                answer
            })
        })
        .collect();
    // Kill once the burst is under way: some answered, most still in flight.
    while done.load(std::sync::atomic::Ordering::SeqCst) < 20 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first.signal("KILL");
    let answered: Vec<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .filter_map(|r| r.unwrap())
        .collect();
    first.wait_exit();

    let mut conn = PgConnection::connect(&database_url).await.unwrap();
    let committed: Vec<(String, String)> =
        sqlx::query("SELECT id, user_id FROM outbox WHERE event_type = 'user_created'")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get::<uuid::Uuid, _>(0).to_string(),
                    r.get::<uuid::Uuid, _>(1).to_string(),
                )
            })
            .collect();
    assert!(
        !committed.is_empty() && committed.len() < 400,
        "the kill landed mid-burst ({} committed)",
        committed.len()
    );
    for id in &answered {
        assert!(
            committed.iter().any(|(_, user)| user == id),
            "an answered sign-up has its row"
        );
    }

    let mut second = start(cwd.path(), &env);
    second.ready().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = sqlx::query("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&mut conn)
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} rows never relayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let messages = tansu
        .read(
            &["auth.events.user_created"],
            committed.len(),
            Duration::from_secs(20),
        )
        .await;
    let seen: std::collections::HashSet<String> = messages
        .iter()
        .filter_map(|m| crate::support::header(m, "event-id"))
        .collect();
    for (event_id, _) in &committed {
        assert!(
            seen.contains(event_id),
            "committed event {event_id} never reached Kafka"
        );
    }
    assert!(
        messages
            .iter()
            .all(|m| m.topic() == "auth.events.user_created")
    );
    second.signal("TERM");
    assert_eq!(second.wait_exit().code(), Some(0));
}

fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&header).unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_key_then_sighup_signs_with_the_new_key_and_old_tokens_still_verify() {
    let cwd = tempfile::tempdir().unwrap();
    let env = [
        ("AUTH_PASSWORD__MEMORY_KIB", "1024"),
        ("AUTH_PASSWORD__ITERATIONS", "1"),
    ];
    let mut server = start(cwd.path(), &env);
    server.ready().await;
    let mut client = server.client().await;
    sign_up(&mut client, "rot").await;
    let login = || pb::LoginRequest {
        login: "rot".into(),
        password: PASSWORD.into(),
        ..Default::default()
    };
    let before = client
        .login(login())
        .await
        .unwrap()
        .into_inner()
        .access_token;

    let rotated = Command::new(crate::support::service_bin())
        .arg("rotate-key")
        .current_dir(cwd.path())
        .env_clear()
        .output()
        .unwrap();
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    server.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let token = client
            .login(login())
            .await
            .unwrap()
            .into_inner()
            .access_token;
        if kid_of(&token) != kid_of(&before) {
            break token;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not load the new key");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    client
        .validate_token(pb::ValidateTokenRequest {
            token: before.clone(),
        })
        .await
        .expect("the old key still verifies");
    client
        .validate_token(pb::ValidateTokenRequest {
            token: after.clone(),
        })
        .await
        .expect("the new key verifies");
    let (_, jwks) = http_get(server.http, "/.well-known/jwks.json").await;
    assert!(
        jwks.contains(&kid_of(&before)) && jwks.contains(&kid_of(&after)),
        "{jwks}"
    );
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
}

/// Calls in flight when SIGTERM arrives are answered before the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_before_exiting_0() {
    let cwd = tempfile::tempdir().unwrap();
    // Default argon2 cost: eight logins queue on a one-worker hashing pool
    // for well over 100 ms, so most are still in flight at the signal.
    let mut server = start(
        cwd.path(),
        &[
            ("AUTH_PASSWORD__MAX_CONCURRENT_HASHES", "1"),
            // All eight wait in the queue, however slow the machine.
            ("AUTH_PASSWORD__MAX_WAIT_MS", "60000"),
            // Attempts are counted before they are hashed: room for all
            // eight in flight at once from this one address.
            ("AUTH_LOCKOUT__MAX_FAILURES_PER_ACCOUNT_IP", "8"),
        ],
    );
    server.ready().await;
    let mut client = server.client().await;
    sign_up(&mut client, "drain").await;
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move {
                c.login(pb::LoginRequest {
                    login: "drain".into(),
                    password: PASSWORD.into(),
                    ..Default::default()
                })
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.signal("TERM");
    for call in calls {
        let answer = call.await.unwrap();
        assert!(answer.is_ok(), "an in-flight call was cut off: {answer:?}");
    }
    assert_eq!(server.wait_exit().code(), Some(0));
}

/// A consumer leaving its group blocks until the broker answers; with the
/// broker gone that wait used to hold shutdown forever. The service must still
/// stop on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_after_the_kafka_broker_is_gone() {
    let mut tansu = crate::support::Tansu::start().await;
    let cwd = tempfile::tempdir().unwrap();
    // The consumer runs in the supervised worker process, which revokes
    // through Redis.
    let database_url = crate::support::fresh_postgres_url().await;
    let redis_url = crate::support::env_url("TEST_REDIS_URL");
    let prefix = format!("t{}:", uuid::Uuid::new_v4().simple());
    let mut server = start(
        cwd.path(),
        &[
            ("AUTH_DATABASE_URL", database_url.as_str()),
            ("AUTH_REDIS_URL", redis_url.as_str()),
            ("AUTH_REDIS_KEY_PREFIX", prefix.as_str()),
            ("AUTH_KAFKA_BROKERS", tansu.brokers.as_str()),
            ("AUTH_KAFKA__TOPIC_PARTITIONS", "1"),
            ("AUTH_PASSWORD__MEMORY_KIB", "1024"),
            ("AUTH_PASSWORD__ITERATIONS", "1"),
        ],
    );
    server.ready().await;
    let mut client = server.client().await;
    let user = sign_up(&mut client, "gone").await;
    let token = client
        .login(pb::LoginRequest {
            login: "gone".into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    // A consumed suspension proves the consumer joined its group and holds
    // its partition: the state in which leaving needs the broker.
    tansu.user_event("user_suspended", &user.id).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = client
            .validate_token(pb::ValidateTokenRequest {
                token: token.clone(),
            })
            .await;
        if let Err(status) = answer {
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the suspension was never consumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tansu.kill();
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
}

/// Wrong party, another process: a role change made by the operator's
/// `auth-service set-roles` (its own process, on the embedded default,
/// whose revocation state lives in the server's memory) ends the running
/// server's old access tokens, through the database's revocation log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_roles_from_another_process_ends_the_old_tokens_of_a_running_server() {
    let cwd = tempfile::tempdir().unwrap();
    let mut server = start(cwd.path(), &[]);
    server.ready().await;
    let mut client = server.client().await;
    sign_up(&mut client, "demoted").await;
    let before = login(&mut client, "demoted").await;
    let checker = client.clone();
    let validate = |token: String| {
        let mut client = checker.clone();
        async move {
            client
                .validate_token(pb::ValidateTokenRequest { token })
                .await
        }
    };
    assert!(validate(before.access_token.clone()).await.is_ok());
    let output = Command::new(crate::support::service_bin())
        .args(["set-roles", "demoted", "user"])
        .current_dir(cwd.path())
        .env_clear()
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The server's log poller wakes at least every second.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match validate(before.access_token.clone()).await {
            Err(status) if status.code() == tonic::Code::Unauthenticated => break,
            other => assert!(
                Instant::now() < deadline,
                "the old token still passes after set-roles: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A login after the change is unaffected.
    let after = login(&mut client, "demoted").await;
    assert!(validate(after.access_token).await.is_ok());
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
}
