//! The security review's smaller findings (issue 17, section 5), each as a
//! failure class against the real components: a revocation stream that
//! outlives its credential, a reuse revocation lost while Redis is down, an
//! evicting Redis, a listener without the layer stack, an event without a
//! wire form, an event worker holding key material, and a logout that one
//! backend takes and the other does not. (The slow-lookup race is tested
//! beside the cache, in `revocation::tests`.)

use std::time::{Duration, Instant};

use auth_service::{
    accounts::model::Role,
    events::{OutboxEvent, RequestContext},
    grpc::pb,
};
use tonic::{Code, Streaming};
use uuid::Uuid;

use crate::{
    on_both_backends,
    support::{Backend, OwnRedis, Tansu, TestApp, bearer, config_for, free_port, http_get},
};

/// A service account holding `service`, and a token of it.
async fn service_account(app: &mut TestApp, admin: &str, name: &str) -> (String, String) {
    let created = app
        .client
        .create_service_account(bearer(
            pb::CreateServiceAccountRequest {
                name: name.into(),
                roles: vec!["service".into()],
            },
            admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let id = created.account.unwrap().id;
    let token = app
        .client
        .issue_service_token(pb::IssueServiceTokenRequest {
            client_id: id.clone(),
            client_secret: created.client_secret,
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    (id, token)
}

/// A production replica (PostgreSQL) on a Redis of the test's own, to be
/// killed and restarted; `cache_ttl_ms`: how long it keeps "not revoked"
/// answers (long, so that an answer cached before an outage holds through
/// it).
async fn on_own_redis(cache_ttl_ms: Option<u64>) -> (OwnRedis, TestApp) {
    on_own_redis_with(|config| {
        if let Some(ttl) = cache_ttl_ms {
            config.revocation.cache_ttl_ms = ttl;
        }
    })
    .await
}

/// [`on_own_redis`] with any other setting changed by `adjust`.
async fn on_own_redis_with(
    adjust: impl FnOnce(&mut auth_service::config::Config),
) -> (OwnRedis, TestApp) {
    let redis = OwnRedis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(Backend::Production, dir.path()).await;
    config.redis_url = Some(redis.url.clone());
    adjust(&mut config);
    let app = TestApp::start(Backend::Production, config, dir).await;
    (redis, app)
}

async fn watch(app: &mut TestApp, token: &str) -> Streaming<pb::RevocationEvent> {
    app.client
        .watch_revocations(bearer(
            pb::WatchRevocationsRequest {
                cursor: String::new(),
            },
            token,
        ))
        .await
        .expect("a valid service token opens the stream")
        .into_inner()
}

/// The stream's end: its status, skipping the events before it (10 s is a
/// bound on a hang, not a latency requirement).
async fn end_of(stream: &mut Streaming<pb::RevocationEvent>, what: &str) -> tonic::Status {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Err(_) => panic!("{what}: the stream is still open"),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => panic!("{what}: the stream ended without a status"),
            Ok(Err(status)) => return status,
        }
    }
}

on_both_backends! {
    /// Failure class: input from the wrong party — a stream opened with a
    /// credential goes on after that credential was rotated or deleted
    /// (or its roles changed): it must end with Unauthenticated.
    async fn a_revocation_stream_ends_when_its_service_account_is_rotated_or_deleted(app) {
        let admin = app.admin().await.access_token;
        let (rotated, rotated_token) = service_account(&mut app, &admin, "rotated-svc").await;
        let (deleted, deleted_token) = service_account(&mut app, &admin, "deleted-svc").await;
        let (_, bystander_token) = service_account(&mut app, &admin, "bystander-svc").await;
        let mut rotated_stream = watch(&mut app, &rotated_token).await;
        let mut deleted_stream = watch(&mut app, &deleted_token).await;
        let mut bystander = watch(&mut app, &bystander_token).await;

        app.client
            .rotate_service_account_secret(bearer(
                pb::RotateServiceAccountSecretRequest { id: rotated.clone() },
                &admin,
            ))
            .await
            .unwrap();
        let status = end_of(&mut rotated_stream, "rotated").await;
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

        app.client
            .delete_service_account(bearer(pb::DeleteServiceAccountRequest { id: deleted.clone() }, &admin))
            .await
            .unwrap();
        let status = end_of(&mut deleted_stream, "deleted").await;
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

        // Another account's stream saw both and goes on.
        for (kind, id) in [
            ("service_account_secret_rotated", &rotated),
            ("service_account_deleted", &deleted),
        ] {
            let event = tokio::time::timeout(Duration::from_secs(10), bystander.message())
                .await
                .expect("an event within 10 s")
                .expect("the bystander's stream is healthy")
                .expect("and open");
            assert_eq!((event.kind.as_str(), &event.user_id), (kind, id));
        }
        // A rotated account's old token cannot open a new one.
        let refused = app
            .client
            .watch_revocations(bearer(pb::WatchRevocationsRequest { cursor: String::new() }, &rotated_token))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
}

/// Failure class: a credential that ends by itself — a stream opened with a
/// token ends when the token expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_stream_ends_when_its_token_expires() {
    let mut app = TestApp::spawn_with(Backend::Embedded, |c| {
        c.tokens.access_ttl_secs = 2;
    })
    .await;
    let service = app.with_role("watcher", Role::SERVICE).await.access_token;
    let mut stream = watch(&mut app, &service).await;
    let status = end_of(&mut stream, "expired").await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

/// Failure class: backend down (and back without state) — refresh-token
/// reuse is detected while Redis is dead, so revoking the family's access
/// tokens there fails. They must still be refused: at once on this
/// replica, and on another replica once Redis is back (empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_reuse_while_redis_is_down_still_revokes_the_family_everywhere() {
    let (mut redis, mut app) = on_own_redis(None).await;
    let mut other = app.replica().await;
    app.sign_up("reused").await;
    let first = app.login_ok("reused").await;
    let second = app.refresh(&first.refresh_token).await.unwrap();
    app.validate(&second.access_token).await.unwrap();
    other.validate(&second.access_token).await.unwrap();

    redis.kill();
    let status = app.refresh(&first.refresh_token).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "reuse is refused as such: {status:?}"
    );
    let status = app.validate(&second.access_token).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "refused at once on the replica that saw the reuse: {status:?}"
    );

    redis.restart().await;
    // Whatever the replicas cached before goes within their TTL; the
    // revocation must reach Redis for the other replica to refuse.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match other.validate(&second.access_token).await {
            Err(status) if status.code() == Code::Unauthenticated => break,
            answer => assert!(
                Instant::now() < deadline,
                "the family's access token is still accepted elsewhere: {answer:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = app.validate(&second.access_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

fn logout_with(access: &str, refresh: &str) -> tonic::Request<pb::LogoutRequest> {
    bearer(
        pb::LogoutRequest {
            refresh_token: refresh.into(),
        },
        access,
    )
}

/// Failure class: backend down, a write half made — Logout while the
/// database is cut off answers Unavailable and changes nothing: the access
/// token it presented still works (so the client's retry can finish the
/// logout), the sessions live on. Once the database is back the retry ends
/// both sessions, their refresh tokens and their access tokens. (Before:
/// the fast state took the revocation first, so the retry answered
/// Unauthenticated while the session and its refresh token lived on.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_the_database_did_not_take_changes_nothing_and_its_retry_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, cutter) = crate::operations::postgres_behind_a_cutter(dir.path()).await;
    config.database_timeout_ms = 500;
    let mut app = TestApp::start(Backend::Production, config, dir).await;
    app.sign_up("halfway").await;
    let own = app.login_ok("halfway").await;
    let other = app.login_ok("halfway").await;

    cutter.cut();
    // Both shapes: the caller's session alone, and with another session's
    // refresh token (whose lookup needs the database first).
    let status = app.logout(&own.access_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = app
        .client
        .logout(logout_with(&own.access_token, &other.refresh_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    app.validate(&own.access_token)
        .await
        .expect("a logout that failed revoked nothing");
    app.validate(&other.access_token).await.unwrap();

    let _back = cutter.reopen().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match app
            .client
            .logout(logout_with(&own.access_token, &other.refresh_token))
            .await
        {
            Ok(_) => break,
            Err(status) if status.code() == Code::Unavailable => {
                assert!(Instant::now() < deadline, "the database never came back");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("the retry must finish the logout: {status:?}"),
        }
    }
    for pair in [&own, &other] {
        let status = app.validate(&pair.access_token).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        let status = app.refresh(&pair.refresh_token).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
}

/// Failure class: backend down, a write half made — Logout while Redis is
/// dead (the caller's token still answered from the cache) is done once the
/// database has it: the refresh token is dead, this replica refuses the
/// access token at once, another replica learns it from the database's
/// revocation log, and when Redis comes back *without* its state the owed
/// write reaches it, so a replica with nothing cached refuses the token
/// too. (Before: the call failed Unavailable half-way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_while_redis_is_down_is_done_once_the_database_has_it() {
    let (mut redis, mut app) = on_own_redis(Some(120_000)).await;
    let mut other = app.replica().await;
    app.sign_up("loggedout").await;
    let pair = app.login_ok("loggedout").await;
    let session = app.validate(&pair.access_token).await.unwrap().session_id;
    other.validate(&pair.access_token).await.unwrap();

    redis.kill();
    app.logout(&pair.access_token)
        .await
        .expect("the database took the logout");
    let status = app.validate(&pair.access_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = app.refresh(&pair.refresh_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // The other replica cached "not revoked" for two minutes; the log
    // reaches it without Redis.
    crate::redis_cluster::until_unauthenticated(&mut other, &pair.access_token).await;

    // Back without its state: the owed write reaches it (the session's
    // key appears), and a replica with nothing cached refuses the token.
    redis.restart().await;
    until_redis_holds(&redis.url, &format!("*sid:{session}*")).await;
    let mut fresh = app.replica().await;
    let status = fresh.validate(&pair.access_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

/// Failure class: backend that answers but will not take writes, for
/// longer than this replica may owe them — a Redis that is full
/// (`maxmemory` reached under `noeviction`: reads answer, every write is
/// refused) while more sessions are revoked than the replica's bound on
/// owed writes (its revocation cache's capacity, 4 here). The fifth write
/// is dropped, so from then on no Redis answer is believed (a token not
/// cached here fails closed); once Redis takes writes
/// again, a replay of the log writes every revocation to it, and a replica
/// with nothing cached refuses each revoked token and accepts the others.
/// Redis keeps its connections throughout: only the bound asks for that
/// replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_past_the_owed_bound_reach_a_redis_that_refused_writes_once_it_takes_them() {
    let (redis, mut app) = on_own_redis_with(|config| config.revocation.cache_capacity = 4).await;
    app.sign_up("bounded").await;
    app.sign_up("bystander").await;
    let bystander = app.login_ok("bystander").await.access_token;
    let mut sessions = Vec::new();
    for _ in 0..6 {
        let pair = app.login_ok("bounded").await;
        let session = app.validate(&pair.access_token).await.unwrap().session_id;
        sessions.push((pair.access_token, session));
    }
    let (kept, _) = sessions.pop().unwrap();
    let revoked = sessions;

    redis_config_set(&redis.url, "maxmemory", "1").await;
    for (token, _) in &revoked {
        app.logout(token)
            .await
            .expect("the database took the logout");
    }
    // Four owed, the fifth dropped (once, or twice when the log's row of it
    // is applied here too before Redis takes writes).
    assert!(app.metric("revocation_store_writes_dropped_total").await >= 1.0);
    assert!(app.metric("revocation_store_writes_owed").await <= 4.0);
    // Redis still answers lookups, but lacks a revocation: not believed.
    let status = app.validate(&bystander).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(app.metric("revocation_lookups_refused_total").await >= 1.0);

    redis_config_set(&redis.url, "maxmemory", "0").await;
    for (_, session) in &revoked {
        until_redis_holds(&redis.url, &format!("*sid:{session}*")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.validate(&bystander).await.is_err() {
        assert!(Instant::now() < deadline, "Redis never believed again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut fresh = app.replica().await;
    for (token, _) in &revoked {
        let status = fresh.validate(token).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    fresh.validate(&kept).await.expect("never revoked");
}

async fn redis_config_set(url: &str, key: &str, value: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Waits until Redis at `url` holds a key matching `pattern`.
async fn until_redis_holds(url: &str, pattern: &str) {
    let client = redis::Client::open(url).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the owed revocation never reached Redis ({pattern})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Failure class: backend comes back *without* its state — Redis restarts
/// empty while every replica keeps running: the revocations it held are
/// written to it again from the database's revocation log as soon as the
/// replicas reconnect, so a replica that asks Redis (its cache gone) still
/// refuses. (Before: Redis stayed empty, and a revoked token verified again
/// wherever it was no longer cached.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_back_without_its_state_gets_the_recent_revocations_again() {
    let (mut redis, mut app) = on_own_redis(None).await;
    app.sign_up("amnesia").await;
    let pair = app.login_ok("amnesia").await;
    let session = app.validate(&pair.access_token).await.unwrap().session_id;
    app.logout(&pair.access_token).await.unwrap();
    let pattern = format!("*sid:{session}*");
    until_redis_holds(&redis.url, &pattern).await;
    // Nothing of the logout is still on its way to Redis: the log's row
    // has been applied here and no write is pending.
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.metric("revocation_log_rows_applied_total").await < 1.0
        || app.metric("revocation_store_writes_owed").await > 0.0
    {
        assert!(Instant::now() < deadline, "the log's row was never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    redis.restart().await;
    until_redis_holds(&redis.url, &pattern).await;
}

/// Failure class: backend down, then every process restarted — a logout
/// the database took while Redis was dead, whose Redis write the replicas
/// still owed when they all stopped, holds after Redis comes back without
/// its state: a process that starts replays the last access-token lifetime
/// of the revocation log. (Before: nobody owed the write any more, Redis
/// was empty, and the logged-out token verified again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_owed_to_redis_survives_a_restart_of_every_replica() {
    let (mut redis, mut app) = on_own_redis(Some(120_000)).await;
    app.sign_up("restarted").await;
    let pair = app.login_ok("restarted").await;
    app.validate(&pair.access_token).await.unwrap();

    redis.kill();
    app.logout(&pair.access_token)
        .await
        .expect("the database took the logout");
    let (mut config, dir) = app.stop().await;

    // Redis back empty — on another address: the stopped server's owed
    // write, which in this test process outlives it, can never reach it
    // (a stopped process's cannot either).
    drop(redis);
    let empty = OwnRedis::start().await;
    config.redis_url = Some(empty.url.clone());
    let mut app = TestApp::start(Backend::Production, config, dir).await;
    assert_eq!(
        app.http_get("/readyz").await.0,
        200,
        "ready once the recent revocations are applied"
    );
    let status = app.validate(&pair.access_token).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "the logged-out token verifies again after the restart: {status:?}"
    );
}

/// Failure class: backend down, a write half made — a service account's
/// secret rotated while Redis is dead: the database took the rotation, so
/// the call succeeds (before: Unavailable, with the secret rotated and the
/// old tokens alive), the old token is refused here at once, and once Redis
/// is back without its state the owed epoch reaches it and a replica with
/// nothing cached refuses the token too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_rotated_while_redis_is_down_ends_the_old_tokens_once_redis_is_back() {
    let (mut redis, mut app) = on_own_redis(Some(120_000)).await;
    let admin = app.admin().await.access_token;
    let (id, service) = service_account(&mut app, &admin, "rotated-offline").await;
    app.validate(&admin).await.unwrap();
    app.validate(&service).await.unwrap();

    redis.kill();
    app.client
        .rotate_service_account_secret(bearer(
            pb::RotateServiceAccountSecretRequest { id: id.clone() },
            &admin,
        ))
        .await
        .expect("the database took the rotation");
    let status = app.validate(&service).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // Back without its state: the owed epoch reaches it, and a replica
    // with nothing cached refuses the old token.
    redis.restart().await;
    until_redis_holds(&redis.url, &format!("*{id}*user")).await;
    let mut fresh = app.replica().await;
    let status = fresh.validate(&service).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

/// Failure class: backend state lost — a Redis whose `maxmemory-policy`
/// evicts keys would drop revocations under memory pressure: start-up
/// refuses it unless told to only warn; a Redis that refuses CONFIG is
/// started with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_stops_start_up_unless_allowed() {
    for policy in ["allkeys-lru", "volatile-ttl"] {
        let redis = OwnRedis::start_args(&["--maxmemory-policy", policy]).await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_for(Backend::Embedded, dir.path()).await;
        config.redis_url = Some(redis.url.clone());
        let error = match auth_service::startup::Application::build(config.clone()).await {
            Ok(_) => panic!("{policy}: started on an evicting Redis"),
            Err(error) => format!("{error:#}"),
        };
        assert!(
            error.contains(&format!("maxmemory-policy is {policy}"))
                && error.contains("redis_allow_evicting_policy"),
            "{error}"
        );
        config.redis_allow_evicting_policy = true;
        auth_service::startup::Application::build(config)
            .await
            .expect("starts with a warning when allowed");
    }
    // Managed Redis often forbids CONFIG: a warning, not a refusal.
    let redis = OwnRedis::start_args(&["--rename-command", "CONFIG", ""]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(Backend::Embedded, dir.path()).await;
    config.redis_url = Some(redis.url.clone());
    auth_service::startup::Application::build(config)
        .await
        .expect("a Redis that will not say is started with a warning");
}

/// Failure class: input from the wrong party — a listener built without
/// the layer stack must not serve calls as some default, trusted caller:
/// every AuthService call is refused Internal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_built_without_the_stack_refuses_every_call() {
    use auth_service::grpc::{AuthApi, UseCases, pb::auth_service_server::AuthServiceServer};
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(Backend::Embedded, dir.path()).await;
    let services = auth_service::startup::Services::build(&config)
        .await
        .unwrap();
    let api = AuthApi::new(UseCases {
        accounts: services.accounts.clone(),
        service_accounts: services.service_accounts.clone(),
        tokens: services.tokens.clone(),
        platforms: services.platforms.clone(),
        revocation_feed: services.revocation_feed.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AuthServiceServer::new(api))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    let mut client =
        pb::auth_service_client::AuthServiceClient::new(crate::support::channel(addr).await);
    let mut request = tonic::Request::new(pb::CreateUserRequest {
        email: "bare@example.com".into(),
        username: "bare".into(),
        password: crate::support::PASSWORD.into(),
    });
    request
        .metadata_mut()
        .insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    let status = client.create_user(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let status = client
        .login(pb::LoginRequest {
            login: "bare".into(),
            password: crate::support::PASSWORD.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        services
            .database
            .outbox
            .unpublished(10)
            .await
            .unwrap()
            .is_empty(),
        "nothing was done for the refused calls (no sign-up event)"
    );
    stop.cancel();
    server.await.unwrap().unwrap();
}

/// Failure class: input malformed — an outbox event with no wire form
/// (a time outside the envelope's range) is not published as an empty or
/// partial payload and marked done: it stays in the outbox, and the rest
/// of its batch is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_a_wire_form_stays_in_the_outbox_and_its_batch_goes_on() {
    use auth_service::events::{kafka, relay::Relay};
    let tansu = Tansu::start().await;
    // No broker in the app's configuration: the test drives the relay.
    let mut app = TestApp::spawn(Backend::Production).await;
    let user = app.sign_up("unencodable").await;
    let id = Uuid::parse_str(&user.id).unwrap();
    let roles = vec![Role::user()];
    let mut bad = OutboxEvent::roles_changed(id, Uuid::nil(), &roles, &RequestContext::default());
    bad.occurred_at = time::Date::from_calendar_date(-1, time::Month::June, 1)
        .unwrap()
        .midnight()
        .assume_utc();
    app.database
        .users
        .set_roles(id, &roles, &bad)
        .await
        .unwrap()
        .unwrap();
    let mut config = app.config.kafka.clone();
    config.topic_partitions = 1;
    kafka::ensure_topics(&tansu.brokers, &config, &kafka::all_topics(&config))
        .await
        .unwrap();
    let relay = Relay::new(
        app.database.relay.clone(),
        kafka::producer(&tansu.brokers, &config).unwrap(),
        tansu.brokers.clone(),
        config,
    );

    let leased = relay.round().await.expect("the good event is delivered");
    assert_eq!(leased, 2);
    let left: Vec<Uuid> = app.events().await.iter().map(|e| e.id).collect();
    assert_eq!(left, vec![bad.id], "only the unencodable event waits");
    let published = tansu
        .read(&["auth.events.user_created"], 1, Duration::from_secs(20))
        .await;
    assert_eq!(published.len(), 1);
}

/// Failure class: wrong party holding secrets — the event worker parses
/// broker data in a C library; it must start without the signing keys and
/// the vault keys, read neither directory, and write no key; its manifest
/// mounts neither Secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_worker_holds_no_key_material() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(Backend::Embedded, dir.path()).await;
    let (signing, vault) = (
        dir.path().join("signing-keys"),
        dir.path().join("vault-keys"),
    );
    config.tokens.keys_dir = Some(signing.clone());
    config.platforms.keys_dir = Some(vault.clone());
    // Even allowed to make keys, it makes none.
    config.tokens.generate_key_if_missing = true;
    config.platforms.generate_key_if_missing = true;
    // No broker answers: the worker starts, serves its probe and retries
    // (topic creation off: it would hold the shutdown for its timeout).
    config.kafka_brokers = Some(format!("127.0.0.1:{}", free_port()));
    config.kafka.create_topics = false;
    let health: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.kafka.worker_http_addr = Some(health);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut worker = tokio::spawn(auth_service::startup::run_events_worker(
        config,
        false,
        async move {
            let _ = stopped.await;
        },
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if worker.is_finished() {
            let result = (&mut worker).await.unwrap();
            panic!("the worker stopped: {result:?}");
        }
        if tokio::net::TcpStream::connect(health).await.is_ok()
            && http_get(health, "/healthz").await.0 == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never answered /healthz"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!signing.exists(), "no signing key written");
    assert!(!vault.exists(), "no vault key written");
    let _ = stop.send(());
    worker.await.unwrap().expect("the worker stops cleanly");

    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/base/events.yaml"))
            .unwrap();
    let deployment = serde_yaml::Deserializer::from_str(&manifest)
        .map(|doc| <serde_json::Value as serde::Deserialize>::deserialize(doc).unwrap())
        .find(|d| d["kind"] == "Deployment")
        .expect("the worker's Deployment");
    let secrets: Vec<&str> = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    assert_eq!(
        secrets,
        ["auth-service-backends"],
        "the worker mounts no key Secret"
    );
}
