//! Events through a real Kafka-compatible broker (tansu): the outbox relay,
//! the envelope on the wire, and the user-lifecycle consumer with its DLQ.

use std::{collections::HashMap, time::Duration};

use auth_service::{config::Config, grpc::pb};
use prost::Message as _;
use rdkafka::message::Message;
use sqlx::{Connection, PgConnection, Row};
use tonic::{Code, Request};
use uuid::Uuid;

use crate::support::{Backend, PASSWORD, Tansu, TestApp, bearer, header};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn with_kafka(tansu: &Tansu) -> impl FnOnce(&mut Config) + '_ {
    move |c: &mut Config| {
        c.kafka_brokers = Some(tansu.brokers.clone());
        c.kafka.topic_partitions = 1;
        c.kafka.relay_idle_ms = 20;
        c.kafka.max_unknown_user_attempts = 2;
    }
}

/// Every outbox row of the app's database: (id, type, user id).
async fn outbox_rows(app: &TestApp) -> Vec<(Uuid, String, Option<Uuid>)> {
    let mut conn = PgConnection::connect(app.config.database_url.as_deref().unwrap())
        .await
        .unwrap();
    sqlx::query("SELECT id, event_type, user_id FROM outbox ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn wait_until_relayed(app: &TestApp) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while app.database.relay.unpublished_count().await.unwrap() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox was not relayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `user`'s sign-up and login events are on their topics, keyed by the user.
async fn assert_sign_up_and_login_published(tansu: &Tansu, user: &pb::User) {
    let messages = tansu
        .read(
            &["auth.events.user_created", "auth.events.login_succeeded"],
            2,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(messages.len(), 2);
    assert!(messages.iter().all(|m| m.key() == Some(user.id.as_bytes())));
}

fn event_topics() -> Vec<String> {
    auth_service::events::kafka::EVENT_TOPICS
        .iter()
        .map(|t| format!("auth.events.{t}"))
        .collect()
}

async fn read_all_events(tansu: &Tansu, expected: usize) -> Vec<rdkafka::message::OwnedMessage> {
    let topics = event_topics();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    tansu.read(&names, expected, Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_state_change_is_published_once_with_key_headers_and_envelope() {
    let tansu = Tansu::start().await;
    let mut app = TestApp::spawn_with(Backend::Production, with_kafka(&tansu)).await;
    let mut sign_up = Request::new(pb::CreateUserRequest {
        email: "kim@example.com".into(),
        username: "kim".into(),
        password: PASSWORD.into(),
    });
    sign_up
        .metadata_mut()
        .insert("traceparent", TRACEPARENT.parse().unwrap());
    let kim = app
        .client
        .create_user(sign_up)
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let pair = app.login_ok("kim").await;
    app.login("kim", "wrong password").await.unwrap_err();
    app.client
        .logout(bearer(
            pb::LogoutRequest {
                refresh_token: pair.refresh_token,
            },
            &pair.access_token,
        ))
        .await
        .unwrap();
    let admin = app.admin().await;
    app.client
        .suspend_user(bearer(
            pb::SuspendUserRequest {
                user_id: kim.id.clone(),
                reason: "t".into(),
            },
            &admin.access_token,
        ))
        .await
        .unwrap();
    app.client
        .revoke_user_sessions(bearer(
            pb::RevokeUserSessionsRequest {
                user_id: kim.id.clone(),
            },
            &admin.access_token,
        ))
        .await
        .unwrap();

    wait_until_relayed(&app).await;
    let rows = outbox_rows(&app).await;
    let types: std::collections::BTreeSet<&str> = rows.iter().map(|(_, t, _)| t.as_str()).collect();
    for expected in [
        "user_created",
        "login_succeeded",
        "login_failed",
        "token_revoked",
        "roles_changed",
        "user_suspended",
        "sessions_revoked",
    ] {
        assert!(types.contains(expected), "no {expected} in {types:?}");
    }
    let messages = read_all_events(&tansu, rows.len()).await;
    assert_eq!(messages.len(), rows.len(), "one message per committed row");
    let by_id: HashMap<String, &rdkafka::message::OwnedMessage> = messages
        .iter()
        .map(|m| (header(m, "event-id").unwrap(), m))
        .collect();
    assert_eq!(by_id.len(), rows.len(), "no event twice");
    for (id, event_type, user_id) in &rows {
        let m = by_id
            .get(&id.to_string())
            .unwrap_or_else(|| panic!("event {id} ({event_type}) not on Kafka"));
        assert_eq!(m.topic(), format!("auth.events.{event_type}"));
        assert_eq!(
            header(m, "content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(
            header(m, "event-type").as_deref(),
            Some(event_type.as_str())
        );
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        assert_eq!(
            key,
            user_id.map_or(id.to_string(), |u| u.to_string()),
            "keyed by user"
        );
        let body: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(body["event_id"], id.to_string());
        assert_eq!(body["event_type"], event_type.as_str());
        assert_eq!(body["schema_version"], 1);
        assert!(body["occurred_at"].as_str().unwrap().ends_with('Z'));
        assert!(
            !body.to_string().contains(PASSWORD),
            "no secret on the wire"
        );
    }
    let created = messages
        .iter()
        .find(|m| m.topic() == "auth.events.user_created" && m.key() == Some(kim.id.as_bytes()))
        .unwrap();
    assert_eq!(header(created, "traceparent").as_deref(), Some(TRACEPARENT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protobuf_format_carries_the_same_envelope() {
    let tansu = Tansu::start().await;
    let mut app = TestApp::spawn_with(Backend::Production, |c| {
        with_kafka(&tansu)(c);
        c.kafka.format = auth_service::events::envelope::EventFormat::Protobuf;
    })
    .await;
    let user = app.sign_up("pia").await;
    wait_until_relayed(&app).await;
    let messages = tansu
        .read(&["auth.events.user_created"], 1, Duration::from_secs(20))
        .await;
    let m = &messages[0];
    assert_eq!(
        header(m, "content-type").as_deref(),
        Some("application/x-protobuf")
    );
    let envelope = pb::EventEnvelope::decode(m.payload().unwrap()).unwrap();
    assert_eq!(envelope.user_id, user.id);
    assert_eq!(envelope.event_type, "user_created");
    assert_eq!(Some(envelope.event_id), header(m, "event-id"));
    assert!(envelope.data.unwrap().fields.contains_key("email"));
}

/// On a secured broker: with `accepted` settings the topics are created,
/// events published and lifecycle events consumed; with `refused` settings
/// nothing reaches the broker and the event waits in the outbox.
async fn secured_round_trip(
    tansu: &Tansu,
    accepted: impl FnOnce(&mut Config),
    refused: impl FnOnce(&mut Config),
) {
    use auth_service::accounts::model::UserStatus;
    let mut app = TestApp::spawn_with(Backend::Production, |c| {
        with_kafka(tansu)(c);
        accepted(c);
    })
    .await;
    let user = app.sign_up("vic").await;
    let messages = tansu
        .read(&["auth.events.user_created"], 1, Duration::from_secs(20))
        .await;
    assert_eq!(messages.len(), 1, "published to the secured broker");
    assert_eq!(messages[0].key(), Some(user.id.as_bytes()));
    tansu.user_event("user_suspended", &user.id).await;
    wait_for_status(&app, &user.id, UserStatus::Suspended).await;

    let mut other = TestApp::spawn_with(Backend::Production, |c| {
        with_kafka(tansu)(c);
        refused(c);
    })
    .await;
    other.sign_up("wes").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        other.database.relay.unpublished_count().await.unwrap(),
        1,
        "nothing published with the refused settings"
    );
}

/// SASL/SCRAM-SHA-256 on the cluster (the seed); a wrong password is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sasl_scram_secured_broker_is_used_with_the_configured_credentials() {
    let tansu = Tansu::start_with_sasl("auth-service", "scram-secret-1").await;
    let sasl = |password: &'static str| {
        move |c: &mut Config| {
            c.kafka.security_protocol = "sasl_plaintext".into();
            c.kafka.sasl_mechanism = Some("SCRAM-SHA-256".into());
            c.kafka.sasl_username = Some("auth-service".into());
            c.kafka.sasl_password = Some(secrecy::SecretString::from(password));
        }
    };
    secured_round_trip(&tansu, sasl("scram-secret-1"), sasl("wrong-secret")).await;
}

/// TLS to the broker with a client certificate (mutual TLS); without the
/// client certificate the broker's front refuses the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_behind_mutual_tls_is_used_with_the_configured_certificates() {
    let (tansu, _front) = Tansu::start_behind_mtls(crate::support::TestPki::new()).await;
    let pki = tansu.tls.as_ref().unwrap();
    let (ca, cert, key) = (
        pki.path("ca.crt"),
        pki.path("client.crt"),
        pki.path("client.key"),
    );
    let tls = |client_cert: bool| {
        let (ca, cert, key) = (ca.clone(), cert.clone(), key.clone());
        move |c: &mut Config| {
            c.kafka.security_protocol = "ssl".into();
            c.kafka.ssl_ca_location = Some(ca.into());
            if client_cert {
                c.kafka.ssl_certificate_location = Some(cert.into());
                c.kafka.ssl_key_location = Some(key.into());
            }
        }
    };
    secured_round_trip(&tansu, tls(true), tls(false)).await;
}

/// The relay polls only every `relay_idle_ms`; a commit in the same process
/// wakes it. With a one-hour poll, an event can only arrive through that wake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_wakes_the_relay_without_waiting_for_its_poll() {
    let tansu = Tansu::start().await;
    let mut app = TestApp::spawn_with(Backend::Embedded, |c| {
        with_kafka(&tansu)(c);
        c.kafka.relay_idle_ms = 3_600_000;
    })
    .await;
    for (n, name) in ["tia", "uma"].into_iter().enumerate() {
        // The second sign-up commits while the relay sleeps out its poll.
        app.sign_up(name).await;
        let messages = tansu
            .read(
                &["auth.events.user_created"],
                n + 1,
                Duration::from_secs(20),
            )
            .await;
        assert_eq!(messages.len(), n + 1, "{name}'s event was not relayed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_relaying_at_once_publish_each_event_once() {
    let tansu = Tansu::start().await;
    let a = TestApp::spawn_with(Backend::Production, with_kafka(&tansu)).await;
    let b = a.replica().await;
    let mut calls = Vec::new();
    for i in 0..40 {
        let mut client = if i % 2 == 0 {
            a.client.clone()
        } else {
            b.client.clone()
        };
        calls.push(tokio::spawn(async move {
            client
                .create_user(pb::CreateUserRequest {
                    email: format!("relay{i}@example.com"),
                    username: format!("relay{i}"),
                    password: PASSWORD.into(),
                })
                .await
                .unwrap()
        }));
    }
    for c in calls {
        c.await.unwrap();
    }
    wait_until_relayed(&a).await;
    let messages = tansu
        .read(&["auth.events.user_created"], 40, Duration::from_secs(20))
        .await;
    // Give a duplicate the chance to show up before counting.
    let more = tansu
        .read(&["auth.events.user_created"], 41, Duration::from_secs(2))
        .await;
    let ids: std::collections::HashSet<String> = more
        .iter()
        .map(|m| header(m, "event-id").unwrap())
        .collect();
    assert_eq!(messages.len(), 40);
    assert_eq!((more.len(), ids.len()), (40, 40), "each event exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_kafka_is_down_the_api_works_and_events_wait_then_arrive() {
    let mut tansu = Tansu::reserve();
    let mut app = TestApp::spawn_with(Backend::Production, with_kafka(&tansu)).await;
    let user = app.sign_up("ola").await;
    app.login_ok("ola").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        app.database.relay.unpublished_count().await.unwrap() >= 2,
        "held in the outbox"
    );
    tansu.restart().await;
    wait_until_relayed(&app).await;
    assert_sign_up_and_login_published(&tansu, &user).await;
}

async fn wait_for_status(
    app: &TestApp,
    id: &str,
    status: auth_service::accounts::model::UserStatus,
) {
    let id = Uuid::parse_str(id).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if app
            .database
            .users
            .find_user(id)
            .await
            .unwrap()
            .unwrap()
            .status
            == status
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "user never became {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumed_suspension_ends_sessions_and_a_poison_message_goes_to_the_dlq() {
    use auth_service::accounts::model::UserStatus;
    let tansu = Tansu::start().await;
    let mut app = TestApp::spawn_with(Backend::Production, with_kafka(&tansu)).await;
    let user = app.sign_up("quin").await;
    let ghost_holder = app.sign_up("rhea").await;
    let pair = app.login_ok("quin").await;
    wait_until_relayed(&app).await;

    tansu
        .produce("user.events.user_suspended", "poison", b"this is not json")
        .await;
    tansu
        .produce(
            "user.events.user_suspended",
            "ghost",
            format!(r#"{{"user_id":"{}"}}"#, Uuid::now_v7()).as_bytes(),
        )
        .await;
    tansu.user_event("user_suspended", &user.id).await;
    tansu.user_event("user_deleted", &ghost_holder.id).await;

    wait_for_status(&app, &user.id, UserStatus::Suspended).await;
    wait_for_status(&app, &ghost_holder.id, UserStatus::Deleted).await;
    assert_eq!(
        app.validate(&pair.access_token).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        app.refresh(&pair.refresh_token).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let parked = tansu
        .read(&["auth.events.dlq"], 2, Duration::from_secs(20))
        .await;
    assert_eq!(parked.len(), 2, "the poison and the unknown user");
    let poison = parked
        .iter()
        .find(|m| m.key() == Some(b"poison".as_slice()))
        .unwrap();
    assert_eq!(poison.payload(), Some(b"this is not json".as_slice()));
    assert_eq!(
        header(poison, "dlq-original-topic").as_deref(),
        Some("user.events.user_suspended")
    );
    assert_eq!(
        header(poison, "dlq-original-partition").as_deref(),
        Some("0")
    );
    assert_eq!(header(poison, "dlq-original-offset").as_deref(), Some("0"));
    assert!(
        header(poison, "dlq-error")
            .unwrap()
            .starts_with("unparseable")
    );
    let ghost = parked
        .iter()
        .find(|m| m.key() == Some(b"ghost".as_slice()))
        .unwrap();
    assert_eq!(header(ghost, "dlq-error").as_deref(), Some("unknown user"));
    assert_eq!(header(ghost, "dlq-original-offset").as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_resumes_from_its_committed_offset() {
    use auth_service::{
        accounts::model::UserStatus,
        events::{OutboxEvent, RequestContext},
    };
    let tansu = Tansu::start().await;
    let mut app = TestApp::spawn_with(Backend::Production, with_kafka(&tansu)).await;
    let first = app.sign_up("sam").await;
    let second = app.sign_up("tia").await;
    tansu.user_event("user_suspended", &first.id).await;
    wait_for_status(&app, &first.id, UserStatus::Suspended).await;
    let backend = app.backend;
    let (config, dir) = app.stop().await;

    // Reactivate the first user behind the consumer's back: if the restarted
    // consumer handled the first message again, it would suspend them again.
    let restarted = TestApp::start(
        backend,
        Config {
            kafka_brokers: None,
            ..config.clone()
        },
        dir,
    )
    .await;
    let first_id = Uuid::parse_str(&first.id).unwrap();
    let event = OutboxEvent::sessions_revoked(first_id, None, "test", &RequestContext::default());
    restarted
        .database
        .users
        .set_status(first_id, UserStatus::Active, &event)
        .await
        .unwrap();
    let (_, dir) = restarted.stop().await;

    tansu.user_event("user_suspended", &second.id).await;
    let app = TestApp::start(backend, config, dir).await;
    wait_for_status(&app, &second.id, UserStatus::Suspended).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app.database
            .users
            .find_user(first_id)
            .await
            .unwrap()
            .unwrap()
            .status,
        UserStatus::Active,
        "message 1 was not handled twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_relays_its_outbox_too() {
    let tansu = Tansu::start().await;
    let mut app = TestApp::spawn_with(Backend::Embedded, with_kafka(&tansu)).await;
    let user = app.sign_up("uma").await;
    app.login_ok("uma").await;
    wait_until_relayed(&app).await;
    assert_sign_up_and_login_published(&tansu, &user).await;
    // A second round finds nothing left to lease.
    assert_eq!(app.database.relay.unpublished_count().await.unwrap(), 0);
}

/// The broker dies in the middle of a burst of sign-ups and comes back: the
/// API keeps answering, and every committed event reaches the broker (the
/// relay retries with backoff; duplicates are allowed here, at-least-once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_burst_and_restarted_receives_every_committed_event() {
    let mut tansu = Tansu::start_durable().await;
    let app = TestApp::spawn_with(Backend::Production, with_kafka(&tansu)).await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let calls: Vec<_> = (0..120)
        .map(|i| {
            let mut client = app.client.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let request = pb::CreateUserRequest {
                    email: format!("bk{i}@example.com"),
                    username: format!("bk{i}"),
                    password: PASSWORD.into(),
                };
                let answer = client.create_user(request).await;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                answer
            })
        })
        .collect();
    while done.load(std::sync::atomic::Ordering::SeqCst) < 30 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tansu.kill();
    for call in calls {
        call.await
            .unwrap()
            .expect("sign-up does not depend on Kafka");
    }
    assert!(
        app.database.relay.unpublished_count().await.unwrap() > 0,
        "events wait while the broker is down"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    tansu.restart().await;
    wait_until_relayed(&app).await;

    let committed: Vec<String> = outbox_rows(&app)
        .await
        .into_iter()
        .filter(|(_, t, _)| t == "user_created")
        .map(|(id, _, _)| id.to_string())
        .collect();
    assert_eq!(committed.len(), 120);
    let messages = tansu
        .read(&["auth.events.user_created"], 120, Duration::from_secs(30))
        .await;
    let seen: std::collections::HashSet<String> = messages
        .iter()
        .filter_map(|m| header(m, "event-id"))
        .collect();
    let missing: Vec<&String> = committed.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} committed events never arrived",
        missing.len()
    );
}
