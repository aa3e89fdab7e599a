//! The event side in a process of its own (`auth-service events`, supervised
//! by `serve`): the real binary against PostgreSQL, Redis and the
//! Kafka-compatible broker. A crash of the worker (as librdkafka crashes when
//! a broker comes back empty) must never stop the API; a broker that lost its
//! topics gets them back; a commit in one process wakes the relay in another.

use std::time::{Duration, Instant};

use auth_service::grpc::pb;
use sqlx::{Connection, PgConnection, Row};
use uuid::Uuid;

use crate::{
    process::{Server, sign_up, start},
    support::{PASSWORD, Tansu, env_url, free_port, fresh_postgres_url, http_get},
};

/// Environment for a server on its own database and Redis prefix, publishing
/// to `tansu`, with the event worker supervised (the default).
struct Deployment {
    database_url: String,
    redis_prefix: String,
    redis_url: String,
    brokers: String,
    extra: Vec<(String, String)>,
}

impl Deployment {
    async fn new(tansu: &Tansu) -> Self {
        Self {
            database_url: fresh_postgres_url().await,
            redis_prefix: format!("t{}:", Uuid::new_v4().simple()),
            redis_url: env_url("TEST_REDIS_URL"),
            brokers: tansu.brokers.clone(),
            extra: Vec::new(),
        }
    }

    fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.extra.push((key.to_owned(), value.into()));
        self
    }

    /// The server started in a directory of its own, once it is ready
    /// (keep the directory as long as the server).
    async fn running(&self) -> (Server, tempfile::TempDir) {
        let cwd = tempfile::tempdir().unwrap();
        let mut server = self.start(cwd.path());
        server.ready().await;
        (server, cwd)
    }

    fn start(&self, cwd: &std::path::Path) -> Server {
        let mut env: Vec<(&str, &str)> = vec![
            ("AUTH_DATABASE_URL", &self.database_url),
            ("AUTH_REDIS_URL", &self.redis_url),
            ("AUTH_REDIS_KEY_PREFIX", &self.redis_prefix),
            ("AUTH_KAFKA_BROKERS", &self.brokers),
            ("AUTH_KAFKA__TOPIC_PARTITIONS", "1"),
            ("AUTH_PASSWORD__MEMORY_KIB", "1024"),
            ("AUTH_PASSWORD__ITERATIONS", "1"),
        ];
        env.extend(self.extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        start(cwd, &env)
    }

    async fn unpublished(&self) -> i64 {
        let mut conn = PgConnection::connect(&self.database_url).await.unwrap();
        sqlx::query("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&mut conn)
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until every committed event is published.
    async fn all_published(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = self.unpublished().await;
            if left == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{left} events still unpublished after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The child processes of `pid` (Linux `/proc`).
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return found;
    };
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            found.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    found
}

/// The server's event worker, once it runs.
async fn worker_of(server: &Server) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = children(server.child.id()).first() {
            return *pid;
        }
        assert!(Instant::now() < deadline, "no event worker was started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// True while `pid` exists and is not a zombie.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

fn kill(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid}");
}

/// The sum of every series of `name` on a Prometheus page.
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The API answers: a sign-up, a login and the token's validation.
async fn api_answers(server: &Server, name: &str) {
    let mut client = server.client().await;
    sign_up(&mut client, name).await;
    let token = client
        .login(pb::LoginRequest {
            login: name.into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .expect("login answers")
        .into_inner()
        .access_token;
    client
        .validate_token(pb::ValidateTokenRequest { token })
        .await
        .expect("validation answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_event_worker_never_stops_the_api_and_is_restarted() {
    let tansu = Tansu::start().await;
    let deployment = Deployment::new(&tansu).await;
    let (mut server, _cwd) = deployment.running().await;
    api_answers(&server, "before").await;
    deployment.all_published(Duration::from_secs(30)).await;

    // A crash inside a C library. (SIGABRT rather than a sent SIGSEGV: Rust's
    // stack-overflow handler treats a SIGSEGV that is no memory fault as
    // spurious and the process goes on.)
    let worker = worker_of(&server).await;
    kill(worker, "ABRT");
    api_answers(&server, "during").await;
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died with its worker"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    let restarted = loop {
        match children(server.child.id()).first() {
            Some(&pid) if pid != worker => break pid,
            _ => {}
        }
        assert!(Instant::now() < deadline, "the worker was not restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(running(restarted));
    // What was committed while it was down is published by its successor.
    deployment.all_published(Duration::from_secs(30)).await;
    let (_, page) = http_get(server.http, "/metrics").await;
    assert_eq!(
        metric(&page, "events_worker_restarts_total"),
        1.0,
        "one restart counted: {page}"
    );
    assert!(page.contains(r#"events_worker_restarts_total{reason="signal"}"#));

    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
    assert!(!running(restarted), "the worker stopped with its server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_worker_does_not_outlive_a_killed_server() {
    let tansu = Tansu::start().await;
    let deployment = Deployment::new(&tansu).await;
    let (mut server, _cwd) = deployment.running().await;
    let worker = worker_of(&server).await;
    assert!(running(worker));
    // SIGKILL: no shutdown code runs in the server; the worker notices its
    // pipe closing.
    server.signal("KILL");
    server.wait_exit();
    let deadline = Instant::now() + Duration::from_secs(15);
    while running(worker) {
        assert!(
            Instant::now() < deadline,
            "the worker outlived its killed server"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The reported scenario: events flow, the broker dies, sign-ups go on, a
/// broker with no data at all comes back on the same address (a rebuilt
/// cluster). The topics are created again and every event committed meanwhile
/// arrives; the API never stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_comes_back_empty_gets_its_topics_back_and_every_event_arrives() {
    let mut tansu = Tansu::start().await;
    let deployment = Deployment::new(&tansu).await;
    let (mut server, _cwd) = deployment.running().await;
    let mut client = server.client().await;
    for i in 0..20 {
        sign_up(&mut client, &format!("early{i}")).await;
    }
    deployment.all_published(Duration::from_secs(30)).await;

    tansu.kill();
    let mut late = Vec::new();
    for i in 0..30 {
        late.push(sign_up(&mut client, &format!("late{i}")).await.id);
    }
    tansu.restart().await; // memory storage: no topics, no producer state
    api_answers(&server, "afterwards").await;
    deployment.all_published(Duration::from_secs(120)).await;
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server survived"
    );

    let messages = tansu
        .read(&["auth.events.user_created"], 31, Duration::from_secs(20))
        .await;
    let keys: std::collections::HashSet<String> = messages
        .iter()
        .filter_map(|m| {
            rdkafka::message::Message::key(m).map(|k| String::from_utf8_lossy(k).into_owned())
        })
        .collect();
    for id in &late {
        assert!(keys.contains(id), "user_created of {id} never arrived");
    }
    let (_, page) = http_get(server.http, "/metrics").await;
    eprintln!(
        "event worker restarts during the scenario: {}",
        metric(&page, "events_worker_restarts_total")
    );
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
}

/// With `kafka.create_topics = false` the worker says, once per backoff,
/// that the topics are missing (metric and log) and keeps the events; once an
/// operator creates the topics they flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_topic_creation_missing_topics_are_reported_and_events_wait() {
    let tansu = Tansu::start().await;
    let worker_http = format!("127.0.0.1:{}", free_port());
    let deployment = Deployment::new(&tansu)
        .await
        .set("AUTH_KAFKA__CREATE_TOPICS", "false")
        .set("AUTH_KAFKA__CONSUMER_ENABLED", "false")
        .set("AUTH_KAFKA__WORKER_HTTP_ADDR", worker_http.clone());
    let (mut server, _cwd) = deployment.running().await;
    let mut client = server.client().await;
    let user = sign_up(&mut client, "waits").await;

    let worker_http: std::net::SocketAddr = worker_http.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if tokio::net::TcpStream::connect(worker_http).await.is_ok() {
            let (_, page) = http_get(worker_http, "/metrics").await;
            if metric(&page, "outbox_topics_missing_total") >= 1.0 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the missing topics were never reported"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(deployment.unpublished().await, 1, "the event waits");

    // The operator creates the topics; the event goes out.
    let mut config = auth_service::config::KafkaConfig {
        topic_partitions: 1,
        ..Default::default()
    };
    config.create_topics = true;
    auth_service::events::kafka::ensure_topics(
        &tansu.brokers,
        &config,
        &auth_service::events::kafka::all_topics(&config),
    )
    .await
    .unwrap();
    deployment.all_published(Duration::from_secs(90)).await;
    let messages = tansu
        .read(&["auth.events.user_created"], 1, Duration::from_secs(20))
        .await;
    assert_eq!(
        rdkafka::message::Message::key(&messages[0]),
        Some(user.id.as_bytes())
    );
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
}

/// The relay polls once an hour here: only PostgreSQL's NOTIFY, sent by the
/// serving process's commit, can wake it in the worker process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_the_server_wakes_the_relay_in_the_worker_process() {
    let tansu = Tansu::start().await;
    let deployment = Deployment::new(&tansu)
        .await
        .set("AUTH_KAFKA__RELAY_IDLE_MS", "3600000");
    let (mut server, _cwd) = deployment.running().await;
    worker_of(&server).await;
    let mut client = server.client().await;
    // Give the worker time to create topics and go idle, so the sign-ups
    // below land while it sleeps.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for name in ["woken1", "woken2"] {
        sign_up(&mut client, name).await;
        deployment.all_published(Duration::from_secs(20)).await;
    }
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
}

/// Backend without its state store: PostgreSQL and Kafka with no Redis, the
/// consumer in its own (supervised) process. A suspension it consumes ends
/// the serving process's access tokens through the database's revocation
/// log, which the server applies to its in-process revocation state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_suspension_consumed_by_the_worker_ends_the_servers_tokens() {
    let tansu = Tansu::start().await;
    let database_url = fresh_postgres_url().await;
    let cwd = tempfile::tempdir().unwrap();
    let mut server = start(
        cwd.path(),
        &[
            ("AUTH_DATABASE_URL", &database_url),
            ("AUTH_KAFKA_BROKERS", &tansu.brokers),
            ("AUTH_KAFKA__TOPIC_PARTITIONS", "1"),
            ("AUTH_PASSWORD__MEMORY_KIB", "1024"),
            ("AUTH_PASSWORD__ITERATIONS", "1"),
        ],
    );
    server.ready().await;
    let mut client = server.client().await;
    let user = sign_up(&mut client, "wes").await;
    let pair = crate::process::login(&mut client, "wes").await;
    let validate =
        |client: &mut pb::auth_service_client::AuthServiceClient<tonic::transport::Channel>| {
            let token = pair.access_token.clone();
            let mut client = client.clone();
            async move {
                client
                    .validate_token(pb::ValidateTokenRequest { token })
                    .await
            }
        };
    assert!(validate(&mut client).await.is_ok());
    tansu.user_event("user_suspended", &user.id).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match validate(&mut client).await {
            Err(status) if status.code() == tonic::Code::Unauthenticated => break,
            other => assert!(
                Instant::now() < deadline,
                "the suspension never reached the server: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.signal("TERM");
    assert_eq!(server.wait_exit().code(), Some(0));
}
