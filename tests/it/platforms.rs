//! Streaming-platform accounts against fake platforms that behave like the
//! real ones (`fake_platform`): the link flow per platform (through the REST
//! gateway as a client would), states that are wrong, replayed, expired or
//! another user's, PKCE, one platform account per user, sealed tokens,
//! refresh on demand (once across replicas), invalid_grant, disconnect,
//! transient platform failures, webhooks, keep-alive and key rotation.

use std::{collections::BTreeMap, time::Duration};

use auth_service::{
    config::Config,
    grpc::pb,
    platforms::{Platform, webhooks},
};
use tonic::Code;

use crate::{
    fake_platform::{CLIENT_SECRET, FakePlatform, WEBHOOK_SECRET},
    gateway::gateway_for,
    support::{Backend, TestApp, bearer, echo_backend, http},
};

type Fakes = BTreeMap<Platform, FakePlatform>;

pub(crate) async fn fakes(platforms: &[Platform]) -> Fakes {
    let mut fakes = BTreeMap::new();
    for &p in platforms {
        fakes.insert(p, FakePlatform::start(p).await);
    }
    fakes
}

pub(crate) fn configure(config: &mut Config, fakes: &Fakes) {
    for (platform, fake) in fakes {
        *config.platforms.provider_mut(*platform) = fake.config();
    }
    // Keep-alive rounds are driven by the tests.
    config.platforms.keepalive_interval_secs = 0;
}

async fn app_with(backend: Backend, fakes: &Fakes, adjust: impl FnOnce(&mut Config)) -> TestApp {
    TestApp::spawn_with(backend, |c| {
        configure(c, fakes);
        adjust(c);
    })
    .await
}

pub(crate) fn pb_platform(p: Platform) -> i32 {
    (match p {
        Platform::Twitch => pb::Platform::Twitch,
        Platform::Youtube => pb::Platform::Youtube,
        Platform::Facebook => pb::Platform::Facebook,
        Platform::Soop => pb::Platform::Soop,
    }) as i32
}

fn rest_name(p: Platform) -> &'static str {
    match p {
        Platform::Twitch => "PLATFORM_TWITCH",
        Platform::Youtube => "PLATFORM_YOUTUBE",
        Platform::Facebook => "PLATFORM_FACEBOOK",
        Platform::Soop => "PLATFORM_SOOP",
    }
}

/// Signs up `name`, logs in; the access token.
pub(crate) async fn user(app: &mut TestApp, name: &str) -> String {
    app.sign_up(name).await;
    app.login_ok(name).await.access_token
}

async fn start(app: &mut TestApp, token: &str, p: Platform) -> pb::StartPlatformLinkResponse {
    app.client
        .start_platform_link(bearer(
            pb::StartPlatformLinkRequest {
                platform: pb_platform(p),
            },
            token,
        ))
        .await
        .expect("start link")
        .into_inner()
}

async fn connect(
    app: &mut TestApp,
    token: &str,
    p: Platform,
    code: &str,
    state: &str,
) -> Result<pb::PlatformAccount, tonic::Status> {
    app.client
        .connect_platform_account(bearer(
            pb::ConnectPlatformAccountRequest {
                platform: pb_platform(p),
                code: code.into(),
                state: state.into(),
                error: String::new(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

/// Start, consent at the fake, connect: the platform's answer.
async fn attempt_link(
    app: &mut TestApp,
    token: &str,
    fake: &FakePlatform,
) -> Result<pb::PlatformAccount, tonic::Status> {
    let started = start(app, token, fake.platform).await;
    let back = fake.authorize_in_browser(&started.authorization_url).await;
    assert_eq!(back["state"], started.state);
    connect(app, token, fake.platform, &back["code"], &back["state"]).await
}

/// Start, consent at the fake, connect; the link must succeed.
pub(crate) async fn link(
    app: &mut TestApp,
    token: &str,
    fake: &FakePlatform,
) -> pb::PlatformAccount {
    attempt_link(app, token, fake).await.expect("connect")
}

async fn list(app: &mut TestApp, token: &str) -> Vec<pb::PlatformAccount> {
    app.client
        .list_platform_accounts(bearer(pb::ListPlatformAccountsRequest {}, token))
        .await
        .unwrap()
        .into_inner()
        .accounts
}

pub(crate) async fn access_token(
    app: &mut TestApp,
    service: &str,
    user_id: &str,
    p: Platform,
) -> Result<pb::GetPlatformAccessTokenResponse, tonic::Status> {
    app.client
        .get_platform_access_token(bearer(
            pb::GetPlatformAccessTokenRequest {
                user_id: user_id.into(),
                platform: pb_platform(p),
                ..Default::default()
            },
            service,
        ))
        .await
        .map(|r| r.into_inner())
}

pub(crate) async fn user_id_of(app: &mut TestApp, token: &str) -> String {
    app.validate(token)
        .await
        .expect("a valid access token")
        .user_id
}

fn field_of(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Every column of every stored platform row and link state, raw.
async fn stored_bytes(app: &TestApp) -> Vec<u8> {
    use sqlx::{Connection, Row};
    let queries = [
        "SELECT access_token, refresh_token, login, display_name, platform_user_id, key_id FROM platform_accounts",
        "SELECT verifier, redirect_uri, verifier_key, redirect_uri, redirect_uri, redirect_uri FROM platform_link_states",
    ];
    let mut all = Vec::new();
    for sql in queries {
        // access_token, refresh_token (bytes), then four text columns.
        macro_rules! columns {
            ($rows:expr) => {
                $rows
                    .iter()
                    .map(|r| {
                        let mut cols: Vec<Vec<u8>> = (0..2)
                            .map(|i| {
                                r.try_get::<Option<Vec<u8>>, _>(i)
                                    .unwrap()
                                    .unwrap_or_default()
                            })
                            .collect();
                        cols.extend((2..6).map(|i| {
                            r.try_get::<Option<String>, _>(i)
                                .unwrap()
                                .unwrap_or_default()
                                .into_bytes()
                        }));
                        cols
                    })
                    .collect::<Vec<_>>()
            };
        }
        let rows: Vec<Vec<Vec<u8>>> = match app.backend {
            Backend::Production => {
                let mut c = sqlx::PgConnection::connect(app.config.database_url.as_ref().unwrap())
                    .await
                    .unwrap();
                columns!(sqlx::query(sql).fetch_all(&mut c).await.unwrap())
            }
            Backend::Embedded => {
                let url = format!("sqlite://{}", app.config.data_dir.join("auth.db").display());
                let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
                columns!(sqlx::query(sql).fetch_all(&mut c).await.unwrap())
            }
        };
        for row in rows {
            for col in row {
                all.extend(col);
                all.push(0);
            }
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// No token a fake ever issued is in the database in clear, in an event,
/// or in `text`.
async fn assert_no_platform_token_leaks(app: &TestApp, fakes: &Fakes, text: &str) {
    let stored = stored_bytes(app).await;
    let events: String = app
        .events()
        .await
        .iter()
        .map(|e| e.data.to_string())
        .collect();
    let mut checked = 0;
    for fake in fakes.values() {
        for token in fake.issued_tokens() {
            assert!(
                !contains(&stored, &token),
                "a platform token is stored in clear"
            );
            assert!(!events.contains(&token), "a platform token is in an event");
            assert!(!text.contains(&token), "a platform token was returned");
            checked += 1;
        }
    }
    assert!(checked > 0, "the fakes issued tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_platform_links_through_the_rest_gateway_as_a_client_would() {
    let fakes = fakes(&Platform::ALL).await;
    let mut app = app_with(Backend::Production, &fakes, crate::support::mesh_tls).await;
    let backend = echo_backend().await;
    let (gateway, _descriptor) = gateway_for(&app, backend).await;
    let token = user(&mut app, "linker").await;
    let auth = format!("Bearer {token}");
    let headers = [("authorization", auth.as_str())];
    let mut bodies = String::new();
    for (platform, fake) in &fakes {
        fake.log_in_as(&format!("{platform}-42"), &format!("{platform}_streamer"));
        let path = format!("/v1/me/platforms/{}:start", rest_name(*platform));
        let r = http(gateway.addr, "POST", &path, &headers, Some("{}")).await;
        assert_eq!(r.status, 200, "{platform} start: {r:?}");
        let started = r.json();
        let url = started["authorization_url"].as_str().unwrap().to_owned();
        let pkce = matches!(platform, Platform::Youtube | Platform::Facebook);
        assert_eq!(url.contains("code_challenge_method=S256"), pkce, "{url}");
        assert_eq!(started["pkce"], pkce);
        let back = fake.authorize_in_browser(&url).await;
        assert_eq!(back["state"], started["state"].as_str().unwrap());
        let body = serde_json::json!({"code": back["code"], "state": back["state"]}).to_string();
        let path = format!("/v1/me/platforms/{}:connect", rest_name(*platform));
        let r = http(gateway.addr, "POST", &path, &headers, Some(&body)).await;
        assert_eq!(r.status, 200, "{platform} connect: {r:?}");
        let account = r.json();
        assert_eq!(account["platform"], rest_name(*platform));
        assert_eq!(account["status"], "PLATFORM_ACCOUNT_STATUS_ACTIVE");
        let expected_id = match platform {
            Platform::Youtube => format!("UC{platform}-42"),
            Platform::Soop => format!("{platform}_streamer"),
            _ => format!("{platform}-42"),
        };
        assert_eq!(account["platform_user_id"], expected_id.as_str());
        bodies.push_str(&r.body);
    }
    let r = http(gateway.addr, "GET", "/v1/me/platforms", &headers, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let listed = r.json();
    let names: Vec<&str> = listed["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["platform"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    bodies.push_str(&r.body);
    // Facebook's short-lived token was exchanged for a long-lived one.
    assert_eq!(fakes[&Platform::Facebook].counters().2, 1);
    let connected = app
        .event_types()
        .await
        .iter()
        .filter(|t| *t == "platform_connected")
        .count();
    assert_eq!(connected, 4);
    assert_no_platform_token_leaks(&app, &fakes, &bodies).await;

    // Without a bearer token the gateway refuses; the webhook path is public.
    let r = http(gateway.addr, "GET", "/v1/me/platforms", &[], None).await;
    assert_eq!(r.status, 401, "{r:?}");
    let body =
        r#"{"challenge":"pogchamp-kappa-360","subscription":{"type":"user.authorization.revoke"}}"#;
    let ts = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let sig = webhooks::eventsub_signature(WEBHOOK_SECRET.as_bytes(), "gw-1", &ts, body.as_bytes());
    let r = http(
        gateway.addr,
        "POST",
        "/webhooks/twitch/eventsub",
        &[
            ("twitch-eventsub-message-id", "gw-1"),
            ("twitch-eventsub-message-timestamp", &ts),
            ("twitch-eventsub-message-signature", &sig),
            (
                "twitch-eventsub-message-type",
                "webhook_callback_verification",
            ),
        ],
        Some(body),
    )
    .await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "pogchamp-kappa-360"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_that_are_unknown_replayed_expired_or_another_partys_are_refused() {
    let fakes = fakes(&[Platform::Twitch, Platform::Youtube]).await;
    let mut app = app_with(Backend::Embedded, &fakes, |c| {
        c.platforms.state_ttl_secs = 1
    })
    .await;
    let ann = user(&mut app, "ann").await;
    let bob = user(&mut app, "bob").await;
    let twitch = &fakes[&Platform::Twitch];

    let refused = connect(&mut app, &ann, Platform::Twitch, "code", "never-issued")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(field_of(&refused), ["state"]);

    // Another user's state: refused, and spent.
    let started = start(&mut app, &ann, Platform::Twitch).await;
    let back = twitch
        .authorize_in_browser(&started.authorization_url)
        .await;
    let refused = connect(
        &mut app,
        &bob,
        Platform::Twitch,
        &back["code"],
        &back["state"],
    )
    .await
    .unwrap_err();
    assert_eq!(
        (refused.code(), field_of(&refused)),
        (Code::InvalidArgument, vec!["state".to_owned()])
    );
    assert!(list(&mut app, &bob).await.is_empty());

    // Another platform's state.
    let started = start(&mut app, &ann, Platform::Twitch).await;
    let back = twitch
        .authorize_in_browser(&started.authorization_url)
        .await;
    let refused = connect(
        &mut app,
        &ann,
        Platform::Youtube,
        &back["code"],
        &back["state"],
    )
    .await
    .unwrap_err();
    assert_eq!(field_of(&refused), ["state"]);

    // Used once, then replayed.
    let started = start(&mut app, &ann, Platform::Twitch).await;
    let back = twitch
        .authorize_in_browser(&started.authorization_url)
        .await;
    connect(
        &mut app,
        &ann,
        Platform::Twitch,
        &back["code"],
        &back["state"],
    )
    .await
    .unwrap();
    let replayed = connect(
        &mut app,
        &ann,
        Platform::Twitch,
        &back["code"],
        &back["state"],
    )
    .await
    .unwrap_err();
    assert_eq!(
        (replayed.code(), field_of(&replayed)),
        (Code::InvalidArgument, vec!["state".to_owned()])
    );

    // Expired (state_ttl_secs = 1).
    let started = start(&mut app, &bob, Platform::Twitch).await;
    let back = twitch
        .authorize_in_browser(&started.authorization_url)
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = connect(
        &mut app,
        &bob,
        Platform::Twitch,
        &back["code"],
        &back["state"],
    )
    .await
    .unwrap_err();
    assert_eq!(field_of(&expired), ["state"]);
    assert!(expired.message().contains("state"), "{expired:?}");

    // The user denied access at the platform.
    twitch.deny_next();
    let started = start(&mut app, &bob, Platform::Twitch).await;
    let back = twitch
        .authorize_in_browser(&started.authorization_url)
        .await;
    assert_eq!(back["error"], "access_denied");
    let denied = app
        .client
        .connect_platform_account(bearer(
            pb::ConnectPlatformAccountRequest {
                platform: pb_platform(Platform::Twitch),
                code: String::new(),
                state: back["state"].clone(),
                error: back["error"].clone(),
            },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::FailedPrecondition);
    assert!(denied.message().contains("access_denied"), "{denied:?}");

    // A bad code: the platform refuses, nothing is half-linked.
    let started = start(&mut app, &bob, Platform::Twitch).await;
    let bad = connect(
        &mut app,
        &bob,
        Platform::Twitch,
        "code-forged",
        &started.state,
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code(), Code::FailedPrecondition, "{bad:?}");
    assert!(list(&mut app, &bob).await.is_empty());

    // Missing and unknown fields.
    let missing = connect(&mut app, &bob, Platform::Twitch, "", "")
        .await
        .unwrap_err();
    assert_eq!(field_of(&missing), ["state", "code"]);
    let unspecified = app
        .client
        .start_platform_link(bearer(pb::StartPlatformLinkRequest { platform: 0 }, &bob))
        .await
        .unwrap_err();
    assert_eq!(field_of(&unspecified), ["platform"]);
    let oversized = connect(&mut app, &bob, Platform::Twitch, "c", &"s".repeat(300))
        .await
        .unwrap_err();
    assert_eq!(field_of(&oversized), ["state"]);

    let connected = app
        .event_types()
        .await
        .iter()
        .filter(|t| *t == "platform_connected")
        .count();
    assert_eq!(connected, 1, "only the one good link");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_issued_for_another_authorization_fails_the_pkce_check() {
    let fakes = fakes(&[Platform::Youtube, Platform::Facebook]).await;
    let mut app = app_with(Backend::Embedded, &fakes, |_| {}).await;
    let token = user(&mut app, "carol").await;
    for (platform, fake) in &fakes {
        // A code the attacker obtained for their own authorization request
        // (its challenge), injected into the victim's flow (their state).
        let theirs = start(&mut app, &token, *platform).await;
        let stolen = fake.authorize_in_browser(&theirs.authorization_url).await;
        let mine = start(&mut app, &token, *platform).await;
        let refused = connect(&mut app, &token, *platform, &stolen["code"], &mine.state)
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::FailedPrecondition,
            "{platform}: {refused:?}"
        );
        assert!(refused.message().contains("verifier"), "{refused:?}");
    }
    assert!(list(&mut app, &token).await.is_empty());
    assert!(
        !app.event_types()
            .await
            .iter()
            .any(|t| t == "platform_connected")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_account_belongs_to_one_user_and_relinking_replaces() {
    let fakes = fakes(&[Platform::Twitch]).await;
    let twitch = &fakes[&Platform::Twitch];
    let mut app = app_with(Backend::Production, &fakes, |_| {}).await;
    let ann = user(&mut app, "ann").await;
    let eve = user(&mut app, "eve").await;
    twitch.log_in_as("777", "annstreams");
    link(&mut app, &ann, twitch).await;

    // Eve comes back from Twitch with Ann's Twitch account.
    let taken = attempt_link(&mut app, &eve, twitch).await.unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    assert!(list(&mut app, &eve).await.is_empty());
    let anns = list(&mut app, &ann).await;
    assert_eq!((anns.len(), anns[0].platform_user_id.as_str()), (1, "777"));
    // The grant Eve's attempt obtained is handed back to the platform.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while twitch.counters().3 == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the unused grant is revoked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Ann links another Twitch account: it replaces the first.
    twitch.log_in_as("888", "annalt");
    link(&mut app, &ann, twitch).await;
    let anns = list(&mut app, &ann).await;
    assert_eq!((anns.len(), anns[0].platform_user_id.as_str()), (1, "888"));
    // The first Twitch account is free again.
    twitch.log_in_as("777", "annstreams");
    link(&mut app, &eve, twitch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_sealed_at_rest_and_refreshed_on_demand_embedded() {
    tokens_are_sealed_at_rest_and_refreshed_on_demand(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_sealed_at_rest_and_refreshed_on_demand_production() {
    tokens_are_sealed_at_rest_and_refreshed_on_demand(Backend::Production).await;
}

async fn tokens_are_sealed_at_rest_and_refreshed_on_demand(backend: Backend) {
    let fakes = fakes(&[Platform::Twitch, Platform::Youtube]).await;
    let mut app = app_with(backend, &fakes, |_| {}).await;
    let token = user(&mut app, "dan").await;
    let dan = user_id_of(&mut app, &token).await;
    let service = app.with_role("ingest", "service").await.access_token;
    let twitch = &fakes[&Platform::Twitch];
    let youtube = &fakes[&Platform::Youtube];

    // Linked with tokens that expire within the skew (5 minutes): every
    // read refreshes first.
    twitch.set_access_ttl(Duration::from_secs(60));
    youtube.set_access_ttl(Duration::from_secs(60));
    link(&mut app, &token, twitch).await;
    link(&mut app, &token, youtube).await;
    let first = twitch.issued_tokens()[0].clone();
    let got = access_token(&mut app, &service, &dan, Platform::Twitch)
        .await
        .unwrap();
    assert_ne!(got.access_token, first);
    assert!(twitch.is_live(&got.access_token));
    assert_eq!(twitch.refreshes(), 1);
    // Twitch's refresh answer names no lifetime: the new token has none
    // stored, and is not refreshed ahead of time.
    assert_eq!(got.expires_at, None, "{got:?}");
    // Twitch rotated the refresh token and invalidated the old one: a
    // second refresh (a caller reports the token rejected) works only if
    // the rotated one was stored.
    twitch.set_access_ttl(Duration::from_secs(4 * 3600));
    youtube.set_access_ttl(Duration::from_secs(4 * 3600));
    let refreshed = report_rejected(&mut app.client, &service, &dan, &got.access_token)
        .await
        .unwrap();
    assert_eq!(twitch.refreshes(), 2);
    let got = access_token(&mut app, &service, &dan, Platform::Twitch)
        .await
        .unwrap();
    assert_eq!(got.access_token, refreshed);
    // Fresh now: answered without calling the platform.
    let again = access_token(&mut app, &service, &dan, Platform::Twitch)
        .await
        .unwrap();
    assert_eq!(
        (again.access_token.as_str(), twitch.refreshes()),
        (got.access_token.as_str(), 2)
    );
    let y = access_token(&mut app, &service, &dan, Platform::Youtube)
        .await
        .unwrap();
    assert!(youtube.is_live(&y.access_token));
    assert_eq!(youtube.refreshes(), 1, "Google keeps its refresh token");
    let y2 = access_token(&mut app, &service, &dan, Platform::Youtube)
        .await
        .unwrap();
    assert_eq!(y2.access_token, y.access_token);

    // Who may ask, and for what.
    let plain = app
        .client
        .get_platform_access_token(bearer(
            pb::GetPlatformAccessTokenRequest {
                user_id: dan.clone(),
                platform: pb_platform(Platform::Twitch),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(plain.code(), Code::PermissionDenied);
    let stranger = user(&mut app, "stranger").await;
    let stranger = user_id_of(&mut app, &stranger).await;
    let none = access_token(&mut app, &service, &stranger, Platform::Twitch)
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::NotFound);
    let disabled = access_token(&mut app, &service, &dan, Platform::Soop)
        .await
        .unwrap_err();
    assert_eq!(disabled.code(), Code::FailedPrecondition);
    assert!(disabled.message().contains("soop"), "{disabled:?}");
    let bad_id = access_token(&mut app, &service, "not-a-uuid", Platform::Twitch)
        .await
        .unwrap_err();
    assert_eq!(field_of(&bad_id), ["user_id"]);

    let returned = format!("{got:?}{again:?}{y:?}{y2:?}");
    let listed = format!("{:?}", list(&mut app, &token).await);
    assert_no_platform_token_leaks(&app, &fakes, &listed).await;
    // The service handed out tokens the fakes issued (the check can fail).
    assert!(
        twitch
            .issued_tokens()
            .iter()
            .any(|t| returned.contains(t.as_str()))
    );

    // A suspended user's platform tokens are not handed out.
    let admin = app.admin().await.access_token;
    app.client
        .suspend_user(bearer(
            pb::SuspendUserRequest {
                user_id: dan.clone(),
                reason: "abuse".into(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let suspended = access_token(&mut app, &service, &dan, Platform::Twitch)
        .await
        .unwrap_err();
    assert_eq!(suspended.code(), Code::FailedPrecondition, "{suspended:?}");
    assert!(suspended.message().contains("suspended"), "{suspended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_requests_on_two_replicas_refresh_once() {
    let fakes = fakes(&[Platform::Twitch]).await;
    let twitch = &fakes[&Platform::Twitch];
    let mut app = app_with(Backend::Production, &fakes, |_| {}).await;
    let token = user(&mut app, "erin").await;
    let erin = user_id_of(&mut app, &token).await;
    let service = app.with_role("chat", "service").await.access_token;
    twitch.set_access_ttl(Duration::from_secs(60));
    link(&mut app, &token, twitch).await;
    twitch.set_access_ttl(Duration::from_secs(4 * 3600));
    // A slow platform widens the window in which callers overlap.
    twitch.set_latency(Duration::from_millis(300));
    let replica = app.replica().await;

    let mut calls = Vec::new();
    for i in 0..20 {
        let mut client = if i % 2 == 0 {
            app.client.clone()
        } else {
            replica.client.clone()
        };
        let (service, erin) = (service.clone(), erin.clone());
        calls.push(tokio::spawn(async move {
            client
                .get_platform_access_token(bearer(
                    pb::GetPlatformAccessTokenRequest {
                        user_id: erin,
                        platform: pb_platform(Platform::Twitch),
                        ..Default::default()
                    },
                    &service,
                ))
                .await
                .map(|r| r.into_inner().access_token)
        }));
    }
    let mut tokens = Vec::new();
    for call in calls {
        tokens.push(call.await.unwrap().expect("every caller gets a token"));
    }
    assert_eq!(twitch.refreshes(), 1, "one refresh at the platform");
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "every caller got the refreshed token");
    assert!(twitch.is_live(&tokens[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_revoked_at_the_platform_requires_relinking() {
    let fakes = fakes(&[Platform::Twitch, Platform::Facebook]).await;
    let mut app = app_with(Backend::Production, &fakes, |_| {}).await;
    let token = user(&mut app, "fay").await;
    let fay = user_id_of(&mut app, &token).await;
    let service = app.with_role("stream", "service").await.access_token;
    for (platform, fake) in &fakes {
        fake.set_access_ttl(Duration::from_secs(60));
        link(&mut app, &token, fake).await;
        fake.revoke_everything();
        let refused = access_token(&mut app, &service, &fay, *platform)
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::FailedPrecondition,
            "{platform}: {refused:?}"
        );
        assert!(refused.message().contains("linked again"), "{refused:?}");
        let calls = fake.refreshes();
        // Marked: the next call does not go to the platform again.
        let again = access_token(&mut app, &service, &fay, *platform)
            .await
            .unwrap_err();
        assert_eq!(
            (again.code(), fake.refreshes()),
            (Code::FailedPrecondition, calls)
        );
    }
    let accounts = list(&mut app, &token).await;
    assert!(
        accounts
            .iter()
            .all(|a| a.status == pb::PlatformAccountStatus::ReauthRequired as i32)
    );
    let events = app.events().await;
    let reauth: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "platform_reauth_required")
        .collect();
    assert_eq!(reauth.len(), 2);
    assert!(reauth.iter().all(|e| e.data["status"] == "reauth_required"));
    // Linking again makes the account usable.
    let twitch = &fakes[&Platform::Twitch];
    twitch.set_access_ttl(Duration::from_secs(4 * 3600));
    link(&mut app, &token, twitch).await;
    access_token(&mut app, &service, &fay, Platform::Twitch)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_revokes_at_the_platform_and_deletes_the_tokens() {
    let fakes = fakes(&Platform::ALL).await;
    let mut app = app_with(Backend::Embedded, &fakes, |_| {}).await;
    let token = user(&mut app, "gus").await;
    for fake in fakes.values() {
        fake.new_user_each_time();
        link(&mut app, &token, fake).await;
    }
    for (platform, fake) in &fakes {
        let live: Vec<String> = fake
            .issued_tokens()
            .into_iter()
            .filter(|t| fake.is_live(t))
            .collect();
        let answer = app
            .client
            .disconnect_platform_account(bearer(
                pb::DisconnectPlatformAccountRequest {
                    platform: pb_platform(*platform),
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        let revocable = *platform != Platform::Soop;
        assert_eq!(answer.revoked_at_platform, revocable, "{platform}");
        assert_eq!(fake.counters().3, u32::from(revocable));
        if revocable {
            assert!(
                live.iter().all(|t| !fake.is_live(t)),
                "{platform}: tokens dead"
            );
        }
        let again = app
            .client
            .disconnect_platform_account(bearer(
                pb::DisconnectPlatformAccountRequest {
                    platform: pb_platform(*platform),
                },
                &token,
            ))
            .await
            .unwrap_err();
        assert_eq!(again.code(), Code::NotFound);
    }
    assert!(list(&mut app, &token).await.is_empty());
    let events = app.events().await;
    let gone: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "platform_disconnected")
        .map(|e| {
            (
                e.data["platform"].as_str().unwrap().to_owned(),
                e.data["revoked_at_platform"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(gone.len(), 4);
    assert!(gone.contains(&("soop".into(), false)) && gone.contains(&("twitch".into(), true)));
    assert!(stored_bytes(&app).await.is_empty(), "no rows remain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_that_fails_transiently_is_retried_then_answered_unavailable() {
    let fakes = fakes(&[Platform::Twitch]).await;
    let twitch = &fakes[&Platform::Twitch];
    let mut app = app_with(Backend::Embedded, &fakes, |c| {
        c.platforms.retry_attempts = 3
    })
    .await;
    let token = user(&mut app, "hal").await;
    let hal = user_id_of(&mut app, &token).await;
    let service = app.with_role("analytics", "service").await.access_token;
    twitch.set_access_ttl(Duration::from_secs(60));
    link(&mut app, &token, twitch).await;

    // One 503, then success: retried within the call.
    twitch.fail_next(1);
    let first = access_token(&mut app, &service, &hal, Platform::Twitch)
        .await
        .unwrap();
    assert_eq!(twitch.refreshes(), 1);
    // Down for longer than the attempts (a caller reports the token
    // rejected: Twitch's refresh named no lifetime, so nothing else makes
    // the service refresh now): Unavailable with retry-after, the lease
    // released, the account still active.
    twitch.fail_next(3);
    let down = report_rejected(&mut app.client, &service, &hal, &first.access_token)
        .await
        .unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    assert!(down.metadata().get("retry-after").is_some());
    assert_eq!(
        list(&mut app, &token).await[0].status,
        pb::PlatformAccountStatus::Active as i32
    );
    let back = report_rejected(&mut app.client, &service, &hal, &first.access_token)
        .await
        .unwrap();
    assert!(twitch.is_live(&back));
    assert_eq!(twitch.refreshes(), 2);

    // A platform that does not answer in time (connection refused here):
    // Unavailable, not an internal error.
    let mut dead = twitch.config();
    dead.token_url = format!("http://127.0.0.1:{}/token", crate::support::free_port());
    let mut down_app = TestApp::spawn_with(Backend::Embedded, |c| {
        c.platforms.twitch = dead;
        c.platforms.retry_attempts = 2;
    })
    .await;
    let t = user(&mut down_app, "ivy").await;
    let refused = attempt_link(&mut down_app, &t, twitch).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // A slow platform (answers after platforms.http_timeout_ms): Unavailable
    // within the timeouts, nothing changed; once it is fast again, it works.
    let mut slow_app = app_with(Backend::Embedded, &fakes, |c| {
        c.platforms.http_timeout_ms = 200;
        c.platforms.retry_attempts = 2;
    })
    .await;
    let t = user(&mut slow_app, "jay").await;
    let jay = user_id_of(&mut slow_app, &t).await;
    let service = slow_app.with_role("chat", "service").await.access_token;
    twitch.set_access_ttl(Duration::from_secs(60));
    link(&mut slow_app, &t, twitch).await;
    twitch.set_latency(Duration::from_millis(1500));
    // Without the timeout this call would succeed after 1.5 s.
    let slow = access_token(&mut slow_app, &service, &jay, Platform::Twitch)
        .await
        .unwrap_err();
    assert_eq!(slow.code(), Code::Unavailable, "{slow:?}");
    twitch.set_latency(Duration::ZERO);
    let back = access_token(&mut slow_app, &service, &jay, Platform::Twitch)
        .await
        .unwrap();
    assert!(twitch.is_live(&back.access_token));
}

/// POSTs one EventSub message to the service's HTTP port.
async fn eventsub(
    app: &TestApp,
    id: &str,
    timestamp: time::OffsetDateTime,
    kind: &str,
    body: &str,
    secret: &str,
) -> (u16, String) {
    let ts = timestamp
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let sig = webhooks::eventsub_signature(secret.as_bytes(), id, &ts, body.as_bytes());
    let r = http(
        app.http_addr,
        "POST",
        "/webhooks/twitch/eventsub",
        &[
            ("twitch-eventsub-message-id", id),
            ("twitch-eventsub-message-timestamp", &ts),
            ("twitch-eventsub-message-signature", &sig),
            ("twitch-eventsub-message-type", kind),
        ],
        Some(body),
    )
    .await;
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventsub_messages_need_a_good_fresh_signature_and_count_once() {
    let fakes = fakes(&[Platform::Twitch]).await;
    let twitch = &fakes[&Platform::Twitch];
    let mut app = app_with(Backend::Embedded, &fakes, |_| {}).await;
    let token = user(&mut app, "joan").await;
    twitch.log_in_as("5150", "jostreams");
    link(&mut app, &token, twitch).await;
    let now = time::OffsetDateTime::now_utc();
    let revoke = r#"{"subscription":{"id":"f1c2","type":"user.authorization.revoke","version":"1","status":"enabled"},"event":{"client_id":"twitch-client-id","user_id":"5150","user_login":"jostreams","user_name":"JoStreams"}}"#;

    let verify = r#"{"challenge":"c-123","subscription":{"type":"user.authorization.revoke"}}"#;
    assert_eq!(
        eventsub(
            &app,
            "m-0",
            now,
            "webhook_callback_verification",
            verify,
            WEBHOOK_SECRET
        )
        .await,
        (200, "c-123".to_owned())
    );
    // Bad signature: 403, nothing changes.
    let (status, _) = eventsub(&app, "m-1", now, "notification", revoke, "not-the-secret").await;
    assert_eq!(status, 403);
    // Correctly signed but older than 10 minutes: 403.
    let old = now - Duration::from_secs(11 * 60);
    let (status, _) = eventsub(&app, "m-2", old, "notification", revoke, WEBHOOK_SECRET).await;
    assert_eq!(status, 403);
    // Missing headers: 403.
    let r = http(
        app.http_addr,
        "POST",
        "/webhooks/twitch/eventsub",
        &[],
        Some(revoke),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        list(&mut app, &token).await[0].status,
        pb::PlatformAccountStatus::Active as i32
    );

    let (status, _) = eventsub(&app, "m-3", now, "notification", revoke, WEBHOOK_SECRET).await;
    assert_eq!(status, 204);
    assert_eq!(
        list(&mut app, &token).await[0].status,
        pb::PlatformAccountStatus::Revoked as i32
    );
    // Replayed (the same id, freshly signed): acknowledged, not applied again.
    let (status, _) = eventsub(&app, "m-3", now, "notification", revoke, WEBHOOK_SECRET).await;
    assert_eq!(status, 204);
    let revoked: Vec<_> = app
        .events()
        .await
        .into_iter()
        .filter(|e| e.event_type == "platform_reauth_required")
        .collect();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].data["status"], "revoked");
    assert_eq!(revoked[0].data["platform_user_id"], "5150");
    // An oversized body is refused before it is read in full.
    let (status, _) = eventsub(
        &app,
        "m-5",
        now,
        "notification",
        &"x".repeat(70 * 1024),
        WEBHOOK_SECRET,
    )
    .await;
    assert_eq!(status, 413);
    // A subscription revocation is acknowledged.
    let gone = r#"{"subscription":{"id":"f1c2","status":"authorization_revoked","type":"user.authorization.revoke"}}"#;
    assert_eq!(
        eventsub(&app, "m-4", now, "revocation", gone, WEBHOOK_SECRET)
            .await
            .0,
        204
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn facebook_deauthorize_needs_the_app_secret_signature() {
    let fakes = fakes(&[Platform::Facebook]).await;
    let facebook = &fakes[&Platform::Facebook];
    let mut app = app_with(Backend::Embedded, &fakes, |_| {}).await;
    let token = user(&mut app, "kim").await;
    facebook.log_in_as("10224", "kim");
    link(&mut app, &token, facebook).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let payload =
        serde_json::json!({"algorithm": "HMAC-SHA256", "issued_at": now, "user_id": "10224"});
    let http_addr = app.http_addr;
    let post = |signed: String| {
        let url = format!("http://{http_addr}/webhooks/facebook/deauthorize");
        async move {
            reqwest::Client::new()
                .post(url)
                .form(&[("signed_request", signed)])
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        post(webhooks::facebook_signed_request(&payload, b"wrong-secret")).await,
        403
    );
    assert_eq!(
        list(&mut app, &token).await[0].status,
        pb::PlatformAccountStatus::Active as i32
    );
    assert_eq!(
        post(webhooks::facebook_signed_request(
            &payload,
            CLIENT_SECRET.as_bytes()
        ))
        .await,
        200
    );
    assert_eq!(
        list(&mut app, &token).await[0].status,
        pb::PlatformAccountStatus::Revoked as i32
    );
    assert!(
        app.event_types()
            .await
            .iter()
            .any(|t| t == "platform_reauth_required")
    );
    // Replayed: the same callback captured and sent again after the user
    // linked again is acknowledged and changes nothing.
    let fresh = webhooks::facebook_signed_request(&payload, CLIENT_SECRET.as_bytes());
    link(&mut app, &token, facebook).await;
    assert_eq!(post(fresh).await, 200);
    assert_eq!(
        list(&mut app, &token).await[0].status,
        pb::PlatformAccountStatus::Active as i32,
        "a replayed deauthorize unlinked a new link"
    );
    // Stale: a validly signed callback issued an hour ago, or without
    // issued_at, is refused and changes nothing.
    for stale in [
        serde_json::json!({"algorithm": "HMAC-SHA256", "issued_at": now - 3600, "user_id": "10224"}),
        serde_json::json!({"algorithm": "HMAC-SHA256", "user_id": "10224"}),
    ] {
        assert_eq!(
            post(webhooks::facebook_signed_request(
                &stale,
                CLIENT_SECRET.as_bytes()
            ))
            .await,
            403
        );
    }
    assert_eq!(
        list(&mut app, &token).await[0].status,
        pb::PlatformAccountStatus::Active as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_extends_facebook_and_validates_twitch() {
    let fakes = fakes(&[Platform::Twitch, Platform::Facebook]).await;
    let mut app = app_with(Backend::Embedded, &fakes, |c| {
        c.platforms.validate_interval_secs = 0
    })
    .await;
    let token = user(&mut app, "lee").await;
    for fake in fakes.values() {
        link(&mut app, &token, fake).await;
    }
    let (twitch, facebook) = (&fakes[&Platform::Twitch], &fakes[&Platform::Facebook]);
    let report = app.platforms.keepalive().await.unwrap();
    // Facebook's long-lived token (4 h here) expires within extend_ahead.
    assert_eq!((report.extended, report.validated), (1, 1), "{report:?}");
    assert_eq!(
        facebook.counters().2,
        2,
        "exchanged at link and at keep-alive"
    );
    assert_eq!(twitch.counters().4, 1);
    // The user removed the application at both platforms: Twitch's
    // validation fails and its refresh token is dead; Facebook's token can
    // no longer be exchanged.
    twitch.revoke_everything();
    facebook.revoke_everything();
    let report = app.platforms.keepalive().await.unwrap();
    assert_eq!(report.reauth_required, 2, "{report:?}");
    let statuses: Vec<i32> = list(&mut app, &token)
        .await
        .iter()
        .map(|a| a.status)
        .collect();
    assert_eq!(
        statuses,
        vec![pb::PlatformAccountStatus::ReauthRequired as i32; 2]
    );
}

/// The Graph API throttles in the body (code 4), not with a 429: the
/// keep-alive round that meets it starts Facebook's cooldown, the next round
/// leaves Facebook alone, and the account stays active (a throttle is not a
/// dead grant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_api_throttle_starts_facebooks_cooldown() {
    let fakes = fakes(&[Platform::Facebook]).await;
    let facebook = &fakes[&Platform::Facebook];
    let mut app = app_with(Backend::Embedded, &fakes, |_| {}).await;
    let token = user(&mut app, "lou").await;
    link(&mut app, &token, facebook).await;
    facebook.rate_limit_for(Duration::from_secs(60));
    let first = app.platforms.keepalive().await.unwrap();
    assert_eq!(first.extended, 0, "{first:?}");
    let calls = facebook.token_requests();
    let second = app.platforms.keepalive().await.unwrap();
    assert_eq!(second.rate_limited, 1, "{second:?}");
    assert_eq!(
        facebook.token_requests(),
        calls,
        "not called while cooling down"
    );
    let statuses: Vec<i32> = list(&mut app, &token)
        .await
        .iter()
        .map(|a| a.status)
        .collect();
    assert_eq!(statuses, vec![pb::PlatformAccountStatus::Active as i32]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_vault_key_seals_after_reseal_and_old_rows_stay_readable() {
    let fakes = fakes(&[Platform::Twitch]).await;
    let twitch = &fakes[&Platform::Twitch];
    let mut app = app_with(Backend::Embedded, &fakes, |_| {}).await;
    let token = user(&mut app, "max").await;
    let max = user_id_of(&mut app, &token).await;
    let service = app.with_role("ingest", "service").await.access_token;
    link(&mut app, &token, twitch).await;
    let before = access_token(&mut app, &service, &max, Platform::Twitch)
        .await
        .unwrap();

    let (config, dir) = app.stop().await;
    let new_key = auth_service::platforms::vault::generate_key(
        &config.platform_keys_dir(),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let mut app = TestApp::start(Backend::Embedded, config, dir).await;
    // The old key still opens the row.
    let read = access_token(&mut app, &service, &max, Platform::Twitch)
        .await
        .unwrap();
    assert_eq!(read.access_token, before.access_token);
    assert_eq!(app.platforms.reseal_all().await.unwrap(), 1);
    assert_eq!(app.platforms.reseal_all().await.unwrap(), 0);
    assert!(contains(&stored_bytes(&app).await, &new_key));
    let read = access_token(&mut app, &service, &max, Platform::Twitch)
        .await
        .unwrap();
    assert_eq!(read.access_token, before.access_token);
}

/// Deletes the user as the lifecycle consumer applies a `user_deleted`
/// event (the store's own transaction: status, sessions, platform grants).
async fn delete_user(app: &TestApp, user_id: &str) {
    use auth_service::{accounts::model::UserStatus, events::OutboxEvent};
    let id = uuid::Uuid::parse_str(user_id).unwrap();
    let event = OutboxEvent::lifecycle(id, true, "user-profile", &Default::default());
    app.database
        .users
        .set_status(id, UserStatus::Deleted, &event)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_users_platform_tokens_are_deleted_with_the_account() {
    let fakes = fakes(&[Platform::Twitch, Platform::Youtube]).await;
    let mut app = app_with(Backend::Production, &fakes, |_| {}).await;
    let token = user(&mut app, "olga").await;
    let olga = user_id_of(&mut app, &token).await;
    let keep = user(&mut app, "pete").await;
    for fake in fakes.values() {
        fake.new_user_each_time();
        link(&mut app, &token, fake).await;
    }
    link(&mut app, &keep, &fakes[&Platform::Twitch]).await;
    delete_user(&app, &olga).await;
    let service = app.with_role("ingest", "service").await.access_token;
    let gone = access_token(&mut app, &service, &olga, Platform::Twitch)
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    // Another user's link is untouched.
    assert_eq!(list(&mut app, &keep).await.len(), 1);
}

/// Deleting a user revokes each of its grants at the platform, and writes
/// `platform_disconnected` once per platform when the platform has
/// answered: Twitch with an expired access token (which Twitch no longer
/// knows: refreshed, then the new one revoked, so the refresh token dies
/// too), Facebook already revoked by the
/// user (answered as dead), SOOP without a revocation endpoint, and YouTube
/// down (5xx) until the next round after its backoff. Rounds are run at
/// chosen times: no test waits.
async fn a_deleted_users_grants_are_revoked_at_each_platform_until_it_answers(backend: Backend) {
    use auth_service::platforms::service::GRANT_REVOCATION_BACKOFF;
    let fakes = fakes(&Platform::ALL).await;
    let mut app = app_with(backend, &fakes, |c| c.platforms.retry_attempts = 2).await;
    let token = user(&mut app, "vera").await;
    let vera = user_id_of(&mut app, &token).await;
    for fake in fakes.values() {
        link(&mut app, &token, fake).await;
    }
    let live_before: BTreeMap<Platform, Vec<String>> = fakes
        .iter()
        .map(|(p, f)| {
            (
                *p,
                f.issued_tokens()
                    .into_iter()
                    .filter(|t| f.is_live(t))
                    .collect(),
            )
        })
        .collect();
    fakes[&Platform::Twitch].expire_access_tokens();
    fakes[&Platform::Facebook].revoke_everything();
    fakes[&Platform::Youtube].fail_next(100);
    let twitch_refreshes = fakes[&Platform::Twitch].refreshes();

    delete_user(&app, &vera).await;
    let disconnected = |events: &[auth_service::events::StoredEvent]| -> Vec<(String, String)> {
        events
            .iter()
            .filter(|e| e.event_type == "platform_disconnected")
            .map(|e| {
                assert_eq!(e.data["reason"], "user_deleted");
                (
                    e.data["platform"].as_str().unwrap().to_owned(),
                    e.data["revocation"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert!(
        disconnected(&app.events().await).is_empty(),
        "nothing before the platforms answer"
    );

    // First round: Twitch's access token has expired.
    let t0 = time::OffsetDateTime::now_utc();
    let report = app.platforms.revoke_pending_grants(t0).await.unwrap();
    assert_eq!(
        (
            report.revoked,
            report.already_dead,
            report.unsupported,
            report.retrying
        ),
        (1, 1, 1, 1),
        "{report:?}"
    );
    let twitch = &fakes[&Platform::Twitch];
    assert_eq!(
        twitch.refreshes(),
        twitch_refreshes + 1,
        "refreshed to revoke"
    );
    assert_eq!(
        twitch.live_refresh_tokens(),
        0,
        "Twitch's refresh token is dead"
    );
    assert!(twitch.issued_tokens().iter().all(|t| !twitch.is_live(t)));
    let mut seen = disconnected(&app.events().await);
    seen.sort();
    assert_eq!(
        seen,
        [
            ("facebook".to_owned(), "already_dead".to_owned()),
            ("soop".to_owned(), "unsupported".to_owned()),
            ("twitch".to_owned(), "revoked".to_owned()),
        ]
    );
    let youtube = &fakes[&Platform::Youtube];
    assert!(
        live_before[&Platform::Youtube]
            .iter()
            .all(|t| youtube.is_live(t)),
        "YouTube was down: its grant lives on, and waits"
    );

    // Before its backoff nothing is tried again; after it, YouTube answers.
    let report = app.platforms.revoke_pending_grants(t0).await.unwrap();
    assert_eq!(report, Default::default());
    youtube.fail_next(0);
    let later = t0 + GRANT_REVOCATION_BACKOFF + Duration::from_secs(1);
    let report = app.platforms.revoke_pending_grants(later).await.unwrap();
    assert_eq!((report.revoked, report.retrying), (1, 0), "{report:?}");
    assert!(
        live_before[&Platform::Youtube]
            .iter()
            .all(|t| !youtube.is_live(t))
    );
    assert_eq!(youtube.live_refresh_tokens(), 0);

    // Each platform once, and nothing left to do.
    let all = disconnected(&app.events().await);
    assert_eq!(all.len(), 4, "{all:?}");
    assert!(all.contains(&("youtube".to_owned(), "revoked".to_owned())));
    let far = later + Duration::from_secs(86_400);
    assert_eq!(
        app.platforms.revoke_pending_grants(far).await.unwrap(),
        Default::default()
    );
    let service = app.with_role("ingest", "service").await.access_token;
    let gone = access_token(&mut app, &service, &vera, Platform::Twitch)
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
}

/// A disconnect the platform does not answer (down) still disconnects at
/// once, and the grant is revoked later by the keep-alive task, which
/// writes `platform_disconnected` (reason `disconnected`) when the platform
/// answers — before, the grant stayed alive at the platform for good.
async fn a_disconnect_the_platform_does_not_answer_is_revoked_later(backend: Backend) {
    use auth_service::platforms::service::GRANT_REVOCATION_BACKOFF;
    let fakes = fakes(&[Platform::Twitch]).await;
    let twitch = &fakes[&Platform::Twitch];
    let mut app = app_with(backend, &fakes, |c| c.platforms.retry_attempts = 2).await;
    let token = user(&mut app, "wes").await;
    link(&mut app, &token, twitch).await;
    let live: Vec<String> = twitch
        .issued_tokens()
        .into_iter()
        .filter(|t| twitch.is_live(t))
        .collect();
    twitch.fail_next(100);
    let answer = app
        .client
        .disconnect_platform_account(bearer(
            pb::DisconnectPlatformAccountRequest {
                platform: pb_platform(Platform::Twitch),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.revoked_at_platform);
    assert!(
        list(&mut app, &token).await.is_empty(),
        "disconnected at once"
    );
    assert!(
        live.iter().all(|t| twitch.is_live(t)),
        "the platform was down"
    );
    let disconnected = |events: Vec<auth_service::events::StoredEvent>| -> Vec<serde_json::Value> {
        events
            .into_iter()
            .filter(|e| e.event_type == "platform_disconnected")
            .map(|e| e.data)
            .collect()
    };
    assert!(
        disconnected(app.events().await).is_empty(),
        "not before the platform answers"
    );
    twitch.fail_next(0);
    let later = time::OffsetDateTime::now_utc() + GRANT_REVOCATION_BACKOFF + Duration::from_secs(1);
    let report = app.platforms.revoke_pending_grants(later).await.unwrap();
    assert_eq!(report.revoked, 1, "{report:?}");
    assert!(
        live.iter().all(|t| !twitch.is_live(t)),
        "revoked once it answered"
    );
    let events = disconnected(app.events().await);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reason"], "disconnected");
    assert_eq!(events[0]["revocation"], "revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_the_platform_does_not_answer_is_revoked_later_embedded() {
    a_disconnect_the_platform_does_not_answer_is_revoked_later(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_the_platform_does_not_answer_is_revoked_later_production() {
    a_disconnect_the_platform_does_not_answer_is_revoked_later(Backend::Production).await;
}

/// Revoking a deleted user's Twitch grant whose access token expired
/// refreshes it (Twitch rotates the refresh token) and then meets a 5xx:
/// the retry uses the refreshed tokens and revokes the grant — with the
/// old ones it would find both dead and write the live grant off as
/// `already_dead`.
async fn a_refresh_made_while_revoking_is_kept_for_the_retry(backend: Backend) {
    use auth_service::platforms::service::GRANT_REVOCATION_BACKOFF;
    let fakes = fakes(&[Platform::Twitch]).await;
    let twitch = &fakes[&Platform::Twitch];
    let mut app = app_with(backend, &fakes, |c| c.platforms.retry_attempts = 1).await;
    let token = user(&mut app, "xan").await;
    let xan = user_id_of(&mut app, &token).await;
    link(&mut app, &token, twitch).await;
    twitch.expire_access_tokens();
    // The first revocation (the expired token) is answered "Invalid token";
    // the second (the refreshed one) meets a 503.
    twitch.fail_nth_revocation(2);
    let refreshes = twitch.refreshes();
    delete_user(&app, &xan).await;
    let t0 = time::OffsetDateTime::now_utc();
    let first = app.platforms.revoke_pending_grants(t0).await.unwrap();
    assert_eq!(first.retrying, 1, "{first:?}");
    assert_eq!(twitch.refreshes(), refreshes + 1);
    assert_eq!(twitch.live_refresh_tokens(), 1, "the refreshed grant lives");
    let later = t0 + GRANT_REVOCATION_BACKOFF + Duration::from_secs(1);
    let second = app.platforms.revoke_pending_grants(later).await.unwrap();
    assert_eq!((second.revoked, second.already_dead), (1, 0), "{second:?}");
    assert_eq!(twitch.live_refresh_tokens(), 0, "revoked, not written off");
    assert!(twitch.issued_tokens().iter().all(|t| !twitch.is_live(t)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_made_while_revoking_is_kept_for_the_retry_embedded() {
    a_refresh_made_while_revoking_is_kept_for_the_retry(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_made_while_revoking_is_kept_for_the_retry_production() {
    a_refresh_made_while_revoking_is_kept_for_the_retry(Backend::Production).await;
}

/// The user disconnects while the platform does not answer (the grant
/// waits in the queue), then links the same platform account again before
/// the queue is worked. Revoking the old grant must not end the new one:
/// Facebook's and Google's revocation end every grant the user gave the
/// app, so the link settles the queued row (`superseded`); Twitch revokes
/// the token presented, so the old tokens are still revoked. Either way
/// the old link's `platform_disconnected` comes before the new
/// `platform_connected`, once.
async fn a_relink_while_the_old_grant_waits_keeps_the_new_grant(backend: Backend) {
    use auth_service::platforms::service::GRANT_REVOCATION_BACKOFF;
    let fakes = fakes(&[Platform::Twitch, Platform::Facebook]).await;
    let mut app = app_with(backend, &fakes, |c| c.platforms.retry_attempts = 1).await;
    let token = user(&mut app, "yul").await;
    for p in [Platform::Twitch, Platform::Facebook] {
        let fake = &fakes[&p];
        link(&mut app, &token, fake).await;
        let old: Vec<String> = fake
            .issued_tokens()
            .into_iter()
            .filter(|t| fake.is_live(t))
            .collect();
        fake.fail_nth_revocation(1);
        let answer = app
            .client
            .disconnect_platform_account(bearer(
                pb::DisconnectPlatformAccountRequest {
                    platform: pb_platform(p),
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(!answer.revoked_at_platform, "{p}: queued");
        link(&mut app, &token, fake).await;
        let new: Vec<String> = fake
            .issued_tokens()
            .into_iter()
            .filter(|t| fake.is_live(t) && !old.contains(t))
            .collect();
        assert!(!new.is_empty(), "{p}");
        let later =
            time::OffsetDateTime::now_utc() + GRANT_REVOCATION_BACKOFF + Duration::from_secs(1);
        let report = app.platforms.revoke_pending_grants(later).await.unwrap();
        assert!(
            new.iter().all(|t| fake.is_live(t)),
            "{p}: the new link's grant lives ({report:?})"
        );
        match p {
            Platform::Twitch => {
                assert_eq!(report.revoked, 1, "{p}: {report:?}");
                assert!(
                    old.iter().all(|t| !fake.is_live(t)),
                    "{p}: old tokens revoked"
                );
            }
            _ => assert_eq!(
                (report.revoked, report.retrying),
                (0, 0),
                "{p}: nothing left to revoke: {report:?}"
            ),
        }
        let linked = list(&mut app, &token).await;
        assert_eq!(
            linked
                .iter()
                .filter(|a| a.platform == pb_platform(p))
                .count(),
            1,
            "{p}: still linked"
        );
        let events: Vec<(String, serde_json::Value)> = app
            .events()
            .await
            .into_iter()
            .filter(|e| e.data["platform"] == p.as_str())
            .map(|e| (e.event_type, e.data))
            .collect();
        let kinds: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "platform_connected",
                "platform_disconnected",
                "platform_connected"
            ],
            "{p}: {events:?}"
        );
        let ended = &events[1].1;
        assert_eq!(ended["reason"], "disconnected", "{p}");
        let expected = if p == Platform::Twitch {
            "queued"
        } else {
            "superseded"
        };
        assert_eq!(ended["revocation"], expected, "{p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relink_while_the_old_grant_waits_keeps_the_new_grant_embedded() {
    a_relink_while_the_old_grant_waits_keeps_the_new_grant(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relink_while_the_old_grant_waits_keeps_the_new_grant_production() {
    a_relink_while_the_old_grant_waits_keeps_the_new_grant(Backend::Production).await;
}

/// A backend that stays down: a queued revocation the platform never
/// answers is kept and tried again at every due round — and once it has
/// gone unanswered for `GRANT_REVOCATION_OVERDUE` attempts it is reported
/// as overdue (a warning and a counter), round after round, until the
/// platform answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_the_platform_never_answers_becomes_overdue_not_dropped() {
    use auth_service::platforms::service::{GRANT_REVOCATION_MAX_WAIT, GRANT_REVOCATION_OVERDUE};
    let fakes = fakes(&[Platform::Twitch]).await;
    let twitch = &fakes[&Platform::Twitch];
    let mut app = app_with(Backend::Embedded, &fakes, |c| {
        c.platforms.retry_attempts = 1
    })
    .await;
    let token = user(&mut app, "zed").await;
    let zed = user_id_of(&mut app, &token).await;
    link(&mut app, &token, twitch).await;
    twitch.fail_next(10_000);
    delete_user(&app, &zed).await;
    let mut at = time::OffsetDateTime::now_utc();
    for attempt in 1..=GRANT_REVOCATION_OVERDUE + 1 {
        let report = app.platforms.revoke_pending_grants(at).await.unwrap();
        assert_eq!(report.retrying, 1, "attempt {attempt}: {report:?}");
        let overdue = u32::from(attempt >= GRANT_REVOCATION_OVERDUE);
        assert_eq!(report.overdue, overdue, "attempt {attempt}: {report:?}");
        at += GRANT_REVOCATION_MAX_WAIT + Duration::from_secs(1);
    }
    twitch.fail_next(0);
    let report = app.platforms.revoke_pending_grants(at).await.unwrap();
    assert_eq!((report.revoked, report.overdue), (1, 0), "{report:?}");
}

/// Twitch's API endpoints answering as its documentation says they may:
/// validation met by a 429 (`Ratelimit-Reset`) starts the platform's
/// cooldown, shared with callers — a reported rejected token is then
/// answered Unavailable with `retry-after`, without calling Twitch; the
/// identity call (`/helix/users`) answering 503 while linking leaves nothing
/// linked and answers Unavailable; the same link goes through once Twitch
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twitchs_api_rate_limits_and_5xx_are_honoured_like_its_token_endpoints() {
    let fakes = fakes(&[Platform::Twitch]).await;
    let twitch = &fakes[&Platform::Twitch];
    let mut app = app_with(Backend::Embedded, &fakes, |c| {
        c.platforms.validate_interval_secs = 0;
        c.platforms.retry_attempts = 2;
    })
    .await;
    let token = user(&mut app, "tia").await;
    let tia = user_id_of(&mut app, &token).await;
    let service = app.with_role("overlay", "service").await.access_token;
    let linked = access_token_after_link(&mut app, &token, twitch, &service, &tia).await;

    twitch.rate_limit_api_for(Duration::from_secs(3));
    let report = app.platforms.keepalive().await.unwrap();
    assert_eq!(report.failed, 1, "{report:?}");
    let before = twitch.token_requests();
    let cooling = report_rejected(&mut app.client, &service, &tia, &linked)
        .await
        .unwrap_err();
    assert_eq!(cooling.code(), Code::Unavailable, "{cooling:?}");
    assert!(cooling.metadata().get("retry-after").is_some());
    assert_eq!(twitch.token_requests(), before, "not called while cooling");

    let other = user(&mut app, "ugo").await;
    twitch.log_in_as("2002", "other");
    twitch.fail_api_next(10);
    let down = attempt_link(&mut app, &other, twitch).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    assert!(list(&mut app, &other).await.is_empty(), "nothing linked");
    twitch.fail_api_next(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match attempt_link(&mut app, &other, twitch).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unavailable => {
                assert!(std::time::Instant::now() < deadline, "never linked: {s:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    assert_eq!(list(&mut app, &other).await.len(), 1);
}

/// Links `fake` for the user behind `token` and reads its access token as
/// `service`.
async fn access_token_after_link(
    app: &mut TestApp,
    token: &str,
    fake: &FakePlatform,
    service: &str,
    user_id: &str,
) -> String {
    link(app, token, fake).await;
    access_token(app, service, user_id, fake.platform)
        .await
        .unwrap()
        .access_token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_users_grants_are_revoked_at_each_platform_embedded() {
    a_deleted_users_grants_are_revoked_at_each_platform_until_it_answers(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_users_grants_are_revoked_at_each_platform_production() {
    a_deleted_users_grants_are_revoked_at_each_platform_until_it_answers(Backend::Production).await;
}

/// `GetPlatformAccessToken` reporting `rejected` as refused by the platform.
async fn report_rejected(
    client: &mut auth_service::grpc::pb::auth_service_client::AuthServiceClient<
        tonic::transport::Channel,
    >,
    service: &str,
    user_id: &str,
    rejected: &str,
) -> Result<String, tonic::Status> {
    client
        .get_platform_access_token(bearer(
            pb::GetPlatformAccessTokenRequest {
                user_id: user_id.into(),
                platform: pb_platform(Platform::Twitch),
                rejected_token: rejected.into(),
            },
            service,
        ))
        .await
        .map(|r| r.into_inner().access_token)
}

/// Reactive refresh (Twitch: react to 401, do not trust expires_in): a
/// token the platform refused, reported by callers on two replicas at once,
/// is refreshed once; a report of a token that is no longer (or never was)
/// the stored one refreshes nothing; an oversized report is refused with
/// its field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_platform_refused_is_refreshed_once_for_all_who_report_it() {
    let fakes = fakes(&[Platform::Twitch]).await;
    let twitch = &fakes[&Platform::Twitch];
    let mut app = app_with(Backend::Production, &fakes, |_| {}).await;
    let token = user(&mut app, "rhea").await;
    let rhea = user_id_of(&mut app, &token).await;
    let service = app.with_role("chat", "service").await.access_token;
    // Valid for hours by its expiry: only a report can make it refresh.
    twitch.set_access_ttl(Duration::from_secs(4 * 3600));
    link(&mut app, &token, twitch).await;
    let first = access_token(&mut app, &service, &rhea, Platform::Twitch)
        .await
        .unwrap()
        .access_token;
    assert_eq!(twitch.refreshes(), 0);
    // Ten callers on two replicas report the same dead token at once.
    twitch.set_latency(Duration::from_millis(300));
    let replica = app.replica().await;
    let mut calls = Vec::new();
    for i in 0..10 {
        let mut client = if i % 2 == 0 {
            app.client.clone()
        } else {
            replica.client.clone()
        };
        let (service, rhea, first) = (service.clone(), rhea.clone(), first.clone());
        calls.push(tokio::spawn(async move {
            report_rejected(&mut client, &service, &rhea, &first).await
        }));
    }
    let mut tokens = Vec::new();
    for call in calls {
        tokens.push(call.await.unwrap().expect("every reporter gets a token"));
    }
    assert_eq!(twitch.refreshes(), 1, "one refresh for every report");
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_ne!(tokens[0], first);
    assert!(twitch.is_live(&tokens[0]));
    twitch.set_latency(Duration::ZERO);
    // The old token reported again, or one that was never stored: the
    // current token, no refresh.
    for stale in [first.as_str(), "not-a-token-of-ours"] {
        let got = report_rejected(&mut app.client, &service, &rhea, stale)
            .await
            .unwrap();
        assert_eq!(got, tokens[0]);
    }
    assert_eq!(twitch.refreshes(), 1);
    let oversized = report_rejected(&mut app.client, &service, &rhea, &"x".repeat(5000))
        .await
        .unwrap_err();
    assert_eq!(oversized.code(), tonic::Code::InvalidArgument);
    assert_eq!(field_of(&oversized), ["rejected_token"]);
}

/// A platform's 429 is honoured across replicas: the refresh that met it is
/// not retried at once, callers on every replica are answered Unavailable
/// with the platform's own wait (Twitch's Ratelimit-Reset) without calling
/// it, and after the reset the next call refreshes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platforms_rate_limit_is_honoured_by_every_replica_until_its_reset() {
    let fakes = fakes(&[Platform::Twitch]).await;
    let twitch = &fakes[&Platform::Twitch];
    let mut app = app_with(Backend::Production, &fakes, |_| {}).await;
    let token = user(&mut app, "rafe").await;
    let rafe = user_id_of(&mut app, &token).await;
    let service = app.with_role("chat", "service").await.access_token;
    twitch.set_access_ttl(Duration::from_secs(60));
    link(&mut app, &token, twitch).await;
    let mut replica = app.replica().await;
    twitch.rate_limit_for(Duration::from_secs(2));
    let before = twitch.token_requests();
    let limited = access_token(&mut app, &service, &rafe, Platform::Twitch)
        .await
        .unwrap_err();
    assert_eq!(limited.code(), tonic::Code::Unavailable, "{limited:?}");
    let wait: u64 = limited
        .metadata()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after");
    assert!(
        (1..=5).contains(&wait),
        "the platform reset, not a guess: {wait}"
    );
    assert_eq!(
        twitch.token_requests(),
        before + 1,
        "a 429 is not retried at once"
    );
    // The other replica does not call the platform before the reset.
    let other = access_token(&mut replica, &service, &rafe, Platform::Twitch)
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::Unavailable);
    assert_eq!(twitch.token_requests(), before + 1);
    // Nor does a link, on either replica.
    let rory = user(&mut replica, "rory").await;
    let linking = attempt_link(&mut replica, &rory, twitch).await.unwrap_err();
    assert_eq!(linking.code(), tonic::Code::Unavailable, "{linking:?}");
    assert!(linking.metadata().get("retry-after").is_some());
    assert_eq!(twitch.token_requests(), before + 1);
    // The keep-alive round leaves the cooling platform alone too.
    let validations = twitch.counters().4;
    let report = app.platforms.keepalive().await.unwrap();
    assert_eq!(report.rate_limited, 1, "{report:?}");
    assert_eq!(twitch.counters().4, validations);
    assert_eq!(twitch.token_requests(), before + 1);
    // After the reset, the next call refreshes.
    twitch.set_access_ttl(Duration::from_secs(4 * 3600));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match access_token(&mut replica, &service, &rafe, Platform::Twitch).await {
            Ok(got) => {
                assert!(twitch.is_live(&got.access_token));
                break;
            }
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "never refreshed: {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    // A 429 met by a link's code exchange starts the cooldown as well: the
    // next link, on the other replica, does not call the platform.
    twitch.rate_limit_for(Duration::from_secs(2));
    let before = twitch.token_requests();
    let met = attempt_link(&mut app, &rory, twitch).await.unwrap_err();
    assert_eq!(met.code(), tonic::Code::Unavailable, "{met:?}");
    assert_eq!(twitch.token_requests(), before + 1);
    let next = attempt_link(&mut replica, &rory, twitch).await.unwrap_err();
    assert_eq!(next.code(), tonic::Code::Unavailable, "{next:?}");
    assert_eq!(
        twitch.token_requests(),
        before + 1,
        "not called while cooling down"
    );
}
