//! Edge mode (envoy/edge.yaml, crates/api/src/edge) against a real Envoy 1.40: /api/*
//! authorized inside Envoy — jwt_authn, the deny map auth-service pushes
//! over ECDS, a bucket per user — with no call to auth-service per request.

use std::time::Duration;

use auth_service::{config::Config, grpc::pb};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, Header};

use crate::support::{
    Backend, Envoy, HttpResponse, PASSWORD, TestApp, echo_backend, http, mesh_tls,
};

/// Envoy's stats of the base map's ECDS subscription.
const ECDS_STATS: &str = "extension_config_discovery.http_filter.immersiverse.auth.revocations";

/// Maps Envoy applied, both filters together.
async fn reloads(envoy: &Envoy) -> u64 {
    let mut n = 0;
    for map in ["", ".recent"] {
        n += envoy
            .stat(&format!("{ECDS_STATS}{map}.config_reload"))
            .await
            .unwrap_or(0);
    }
    n
}

struct Edge {
    app: TestApp,
    envoy: Envoy,
    _descriptor: tempfile::NamedTempFile,
}

impl Edge {
    async fn start(backend_kind: Backend, adjust: impl FnOnce(&mut Config)) -> Self {
        let app = TestApp::spawn_with(backend_kind, |c| {
            mesh_tls(c);
            adjust(c);
        })
        .await;
        let backend = echo_backend().await;
        let descriptor = crate::gateway::descriptor_file();
        let envoy = Envoy::start(
            "edge.yaml",
            8080,
            &crate::gateway::gateway_replacements(&app, backend, &descriptor),
        )
        .await;
        Self {
            app,
            envoy,
            _descriptor: descriptor,
        }
    }

    async fn post(&self, path: &str, body: serde_json::Value, token: Option<&str>) -> HttpResponse {
        crate::gateway::post_json(self.envoy.addr, path, body, token).await
    }

    async fn api(&self, token: &str, extra: &[(&str, &str)]) -> HttpResponse {
        api(&self.envoy, token, extra).await
    }

    /// Signs up (once) and logs in through the edge; the login body.
    async fn login(&self, name: &str, sign_up: bool) -> serde_json::Value {
        crate::gateway::rest_login(self.envoy.addr, name, sign_up).await
    }
}

async fn api(envoy: &Envoy, token: &str, extra: &[(&str, &str)]) -> HttpResponse {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    http(envoy.addr, "GET", "/api/videos", &headers, None).await
}

fn token(login: &serde_json::Value) -> String {
    login["access_token"].as_str().unwrap().to_owned()
}

fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// Polls `/api/videos` with `token` until Envoy answers `status` (a bound
/// for a failing test, not a timing assertion).
async fn until_status(envoy: &Envoy, token: &str, status: u16) -> HttpResponse {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = api(envoy, token, &[]).await;
        if r.status == status {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {} instead of {status}: {r:?}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A token signed with the server's own key (its kid in the header), with
/// `claims` as given.
fn forged(app: &TestApp, claims: &serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(crate::support::server_key_id(app));
    crate::support::sign_with_server_key(app, header, claims)
}

/// The hot path passes Envoy alone: a valid token reaches the upstream with
/// the identity it proves (never a client's), ext_authz is not asked, and
/// what auth-service revokes is refused at the edge — a logout (its
/// session), a password change (every earlier token of the user, while the
/// login after it passes), a token without `sid` or `jti`. A user past
/// the per-user bucket gets 429 while another user goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_authorizes_api_calls_itself_and_refuses_what_auth_service_revoked() {
    let edge = Edge::start(Backend::Production, |_| {}).await;
    let none = http(edge.envoy.addr, "GET", "/api/videos", &[], None).await;
    assert_eq!(none.status, 401, "{none:?}");
    assert_eq!(edge.api("garbage", &[]).await.status, 401);

    let alice = edge.login("alice", true).await;
    let alice_token = token(&alice);
    let alice_claims = claims(&alice_token);
    let checks_before = edge.envoy.stat("http.edge.ext_authz.ok").await;
    // Identity headers a client sends never pass, with dashes or
    // underscores.
    let ok = edge
        .api(
            &alice_token,
            &[
                ("x-user-id", "spoofed-admin"),
                ("x-user-roles", "admin"),
                ("x-session-id", "forged"),
                ("x-token-id", "forged"),
            ],
        )
        .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let seen = ok.json();
    assert_eq!(seen["x-user-id"], serde_json::json!([alice_claims["sub"]]));
    assert_eq!(
        seen["x-session-id"],
        serde_json::json!([alice_claims["sid"]])
    );
    assert_eq!(
        seen["x-user-roles"],
        serde_json::json!(["user"]),
        "the token's roles as ext_authz sets them, never the client's"
    );
    let underscore = edge
        .api(&alice_token, &[("x_user_id", "spoofed-admin")])
        .await;
    assert_eq!(underscore.status, 400, "{underscore:?}");
    for _ in 0..20 {
        assert_eq!(edge.api(&alice_token, &[]).await.status, 200);
    }
    assert_eq!(
        edge.envoy.stat("http.edge.ext_authz.ok").await,
        checks_before,
        "no Check for /api/*"
    );

    // A logout: its session is refused at the edge.
    let revoked_token = alice_token.clone();
    let out = edge
        .post("/v1/auth/logout", serde_json::json!({}), Some(&alice_token))
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    let refused = until_status(&edge.envoy, &alice_token, 403).await;
    assert!(refused.body.contains("RBAC"), "{refused:?}");
    // Input from the wrong place: the revoked token also in the query (two
    // tokens verified would join their claims in one header and match no
    // entry), or only there: never accepted.
    let auth = format!("Bearer {revoked_token}");
    let both = http(
        edge.envoy.addr,
        "GET",
        &format!("/api/videos?access_token={revoked_token}"),
        &[("authorization", auth.as_str())],
        None,
    )
    .await;
    assert!(matches!(both.status, 401 | 403), "{both:?}");
    let other = token(&edge.login("olga", true).await);
    let mixed = http(
        edge.envoy.addr,
        "GET",
        &format!("/api/videos?access_token={revoked_token}"),
        &[("authorization", &format!("Bearer {other}"))],
        None,
    )
    .await;
    assert_eq!(mixed.status, 200, "the header's token alone: {mixed:?}");
    assert_eq!(
        mixed.json()["x-user-id"],
        serde_json::json!([claims(&other)["sub"]]),
        "one identity, the header's"
    );
    let query_only = http(
        edge.envoy.addr,
        "GET",
        &format!(
            "/api/videos?access_token={}",
            token(&edge.login("olga", false).await)
        ),
        &[],
        None,
    )
    .await;
    assert_eq!(query_only.status, 401, "{query_only:?}");

    // A password change: both earlier sessions end, the next login passes.
    let bob1 = token(&edge.login("bob", true).await);
    let bob2 = token(&edge.login("bob", false).await);
    assert_eq!(edge.api(&bob2, &[]).await.status, 200);
    let changed = edge
        .post(
            "/v1/me/password",
            serde_json::json!({ "current_password": PASSWORD, "new_password": "another long passphrase 2" }),
            Some(&bob1),
        )
        .await;
    assert_eq!(changed.status, 200, "{changed:?}");
    until_status(&edge.envoy, &bob1, 403).await;
    until_status(&edge.envoy, &bob2, 403).await;
    let r = edge
        .post(
            "/v1/auth/login",
            serde_json::json!({ "login": "bob", "password": "another long passphrase 2" }),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let bob3 = token(&r.json());
    assert_eq!(
        edge.api(&bob3, &[]).await.status,
        200,
        "issued after the change"
    );

    // Tokens this service never issues: without sid, without jti.
    let mut no_sid = claims(&bob3);
    no_sid.as_object_mut().unwrap().remove("sid");
    let r = edge.api(&forged(&edge.app, &no_sid), &[]).await;
    assert_eq!(r.status, 403, "no sid: {r:?}");
    let mut no_jti = claims(&bob3);
    no_jti.as_object_mut().unwrap().remove("jti");
    let r = edge.api(&forged(&edge.app, &no_jti), &[]).await;
    assert_eq!(r.status, 403, "no jti: {r:?}");
    let genuine_shape = claims(&bob3);
    let r = edge.api(&forged(&edge.app, &genuine_shape), &[]).await;
    assert_eq!(r.status, 200, "the forging itself is sound: {r:?}");

    // An expired token: the edge allows the clock skew auth-service allows
    // (`tokens.leeway_secs`), not jwt_authn's default of 60 s.
    let leeway = i64::try_from(edge.app.config.tokens.leeway_secs).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for (expired_ago, expected) in [(leeway - 10, 200), (leeway + 10, 401)] {
        let mut expired = claims(&bob3);
        expired["exp"] = (now - expired_ago).into();
        expired["iat"] = (now - expired_ago - 60).into();
        let r = edge.api(&forged(&edge.app, &expired), &[]).await;
        assert_eq!(r.status, expected, "expired {expired_ago} s ago: {r:?}");
    }

    // Per-user bucket (100, refilled at 50/s): bob is cut, carol is not.
    let carol = token(&edge.login("carol", true).await);
    let mut limited = None;
    for _ in 0..400 {
        let r = edge.api(&bob3, &[]).await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{r:?}");
    }
    let limited = limited.expect("bob's bucket ran dry");
    assert_eq!(limited.header("retry-after"), Some("1"));
    assert_eq!(
        edge.api(&carol, &[]).await.status,
        200,
        "carol's own bucket"
    );
}

/// A signing key removed from auth-service (the answer to a leaked key)
/// stops verifying at the edge: a token signed with it that the edge had
/// already verified and cached — here one a holder of the key forged, with
/// a year to live — and the genuine ones are refused once auth-service
/// pushes jwt_authn's new configuration, while tokens of the key that
/// remains pass. (An outside review found the edge kept a removed key for
/// its JWKS cache's 300 s, and the tokens it had verified until their own
/// `exp`, when Envoy fetched the JWKS itself.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_signing_key_stops_verifying_at_the_edge_and_its_cached_tokens_go_with_it() {
    let edge = Edge::start(Backend::Embedded, |_| {}).await;
    let genuine = token(&edge.login("ivy", true).await);
    let old_kid = crate::support::server_key_id(&edge.app);
    let mut stolen = claims(&genuine);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    stolen["exp"] = (now + 365 * 86_400).into();
    stolen["sid"] = uuid::Uuid::now_v7().to_string().into();
    stolen["jti"] = uuid::Uuid::now_v7().to_string().into();
    let forged_long = forged(&edge.app, &stolen);
    for t in [&genuine, &forged_long] {
        let r = edge.api(t, &[]).await;
        assert_eq!(r.status, 200, "before the removal (now cached): {r:?}");
    }

    // Rotate, then remove the old key and reload, as an operator does.
    let dir = edge.app.config.keys_dir();
    let (new_kid, _) = auth_service::tokens::keys::rotate(
        &dir,
        time::OffsetDateTime::now_utc(),
        time::Duration::ZERO,
        time::Duration::minutes(16),
    )
    .unwrap();
    assert_ne!(new_kid, old_kid);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".pem")
            == old_kid
        {
            std::fs::remove_file(path).unwrap();
        }
    }
    assert_eq!(edge.app.app_tokens.reload_keys().unwrap(), new_kid);

    let r = until_status(&edge.envoy, &forged_long, 401).await;
    assert_eq!(r.status, 401);
    let r = edge.api(&genuine, &[]).await;
    assert_eq!(r.status, 401, "the genuine token of the removed key: {r:?}");
    let after = token(&edge.login("ivy", false).await);
    let r = edge.api(&after, &[]).await;
    assert_eq!(r.status, 200, "a token of the remaining key: {r:?}");
}

/// Fail closed and keep the last map: an Envoy started while auth-service
/// is down accepts no connection (its listener warms until the first map);
/// once auth-service is up it serves. When auth-service goes away again,
/// Envoy keeps the map it had (a revoked token stays refused, a valid one
/// passes: the JWKS is cached) and says so in its stats; a revocation made
/// while Envoy was cut off reaches it once it reconnects to the restarted
/// auth-service, whose map is rebuilt from the database's log (embedded
/// default: SQLite, no Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_without_its_control_plane_fails_closed_then_keeps_its_last_map() {
    let app = TestApp::spawn_with(Backend::Embedded, mesh_tls).await;
    let (grpc, http_addr) = (app.grpc_addr, app.http_addr);
    let backend = echo_backend().await;
    let descriptor = crate::gateway::descriptor_file();
    let replacements = crate::gateway::gateway_replacements(&app, backend, &descriptor);
    let (mut config, dir) = app.stop().await;
    config.grpc_addr = grpc;
    config.http_addr = http_addr;

    let envoy = Envoy::start_unready("edge.yaml", 8080, &replacements);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!envoy.ready().await, "no map yet: not ready");
    assert!(
        tokio::net::TcpStream::connect(envoy.addr).await.is_err(),
        "the listener accepts nothing before the first map"
    );

    let mut app = TestApp::start(Backend::Embedded, config, dir).await;
    envoy.wait_ready().await;
    app.sign_up("dana").await;
    let login = |app: &mut TestApp| {
        let mut client = app.client.clone();
        async move {
            client
                .login(pb::LoginRequest {
                    login: "dana".into(),
                    password: PASSWORD.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .access_token
        }
    };
    let (t1, t2, t3) = (
        login(&mut app).await,
        login(&mut app).await,
        login(&mut app).await,
    );
    assert_eq!(api(&envoy, &t1, &[]).await.status, 200);
    app.logout(&t1).await.unwrap();
    until_status(&envoy, &t1, 403).await;

    // auth-service goes away: the last map holds.
    let (config, dir) = app.stop().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while envoy
        .stat(&format!("{ECDS_STATS}.control_plane.connected_state"))
        .await
        != Some(0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "Envoy still connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(api(&envoy, &t1, &[]).await.status, 403, "still revoked");
    assert_eq!(api(&envoy, &t2, &[]).await.status, 200, "still valid");

    // Back, from its database alone: the old revocation is still in the map
    // it serves, and one made now reaches the Envoy.
    let app = TestApp::start(Backend::Embedded, config, dir).await;
    app.logout(&t2).await.unwrap();
    until_status(&envoy, &t2, 403).await;
    assert_eq!(api(&envoy, &t1, &[]).await.status, 403);
    assert_eq!(api(&envoy, &t3, &[]).await.status, 200);
    assert!(reloads(&envoy).await >= 3, "maps applied after the restart");
}

/// Failure class: a party that refuses what it is sent — an Envoy that
/// rejects the deny map (here its filters accept another config type, as a
/// mismatched Envoy build or configuration would). The rejection reaches
/// auth-service as a NACK, counted and logged; Envoy, having no map, does
/// not serve `/api/*`: 500 for a valid token, 401 for a bad one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_that_refuses_the_deny_map_serves_no_api_call_and_the_nack_is_counted() {
    let mut app = TestApp::spawn_with(Backend::Embedded, mesh_tls).await;
    let backend = echo_backend().await;
    let descriptor = crate::gateway::descriptor_file();
    let mut replacements = crate::gateway::gateway_replacements(&app, backend, &descriptor);
    replacements.push((
        "type_urls: [type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC]",
        "type_urls: [type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation]"
            .into(),
    ));
    let envoy = Envoy::start_unready("edge.yaml", 8080, &replacements);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let rejected = |map: &'static str| {
        let envoy = &envoy;
        async move {
            envoy
                .stat(&format!("{ECDS_STATS}{map}.update_rejected"))
                .await
                .unwrap_or(0)
        }
    };
    while app.metric("edge_ecds_nacks_total").await < 2.0
        || rejected("").await < 1
        || rejected(".recent").await < 1
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not both maps NACKed: auth-service counted {}, Envoy rejected {} and {}",
            app.metric("edge_ecds_nacks_total").await,
            rejected("").await,
            rejected(".recent").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.metric("edge_ecds_acks_total").await,
        1.0,
        "nothing but jwt_authn's configuration was accepted"
    );
    envoy.wait_ready().await;
    app.sign_up("erin").await;
    let token = app.login_ok("erin").await.access_token;
    let refused = api(&envoy, &token, &[]).await;
    assert_eq!(refused.status, 500, "a valid token: {refused:?}");
    assert!(
        !refused.body.contains("x-user-id"),
        "the upstream was not reached: {refused:?}"
    );
    // jwt_authn, before the map's filters, refuses a bad token itself.
    assert_eq!(api(&envoy, "not-a-token", &[]).await.status, 401);
}

/// A revocation storm: 10,000 sessions revoked within one second, in ten
/// commits (written as the service writes them: log rows, then the commit
/// notification). Both real sessions among them — one in the first commit,
/// one in the last — are refused at the edge, and Envoy receives a few
/// coalesced maps, not one per revocation.
/// The database behind the control plane is cut off, then comes back with
/// its state. While it is down a logout answers Unavailable and the edge
/// keeps enforcing the last maps; the control plane keeps serving them,
/// also to an Envoy that subscribes only now (a gateway started during the
/// outage warms up on them). Once the database is back, a revocation made
/// then reaches both Envoys.
///
/// The logout refused during the outage changed nothing (the database
/// decides first): its token still passes the edge, and the client's retry
/// once the database is back finishes the logout, which then reaches both
/// Envoys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_database_is_down_the_edge_keeps_its_maps_and_a_new_envoy_gets_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, cutter) = crate::operations::postgres_behind_a_cutter(dir.path()).await;
    config.database_timeout_ms = 500;
    mesh_tls(&mut config);
    let mut app = TestApp::start(Backend::Production, config, dir).await;
    let backend = echo_backend().await;
    let descriptor = crate::gateway::descriptor_file();
    let replacements = crate::gateway::gateway_replacements(&app, backend, &descriptor);
    let first = Envoy::start("edge.yaml", 8080, &replacements).await;
    app.sign_up("erin").await;
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(app.login("erin", PASSWORD).await.unwrap().access_token);
    }
    app.logout(&tokens[0]).await.unwrap();
    until_status(&first, &tokens[0], 403).await;

    cutter.cut();
    let refused = app.logout(&tokens[1]).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        api(&first, &tokens[0], &[]).await.status,
        403,
        "still revoked"
    );
    assert_eq!(
        api(&first, &tokens[1], &[]).await.status,
        200,
        "still valid"
    );
    // A gateway that starts now becomes ready on the maps the control
    // plane holds, and enforces them.
    let second = Envoy::start("edge.yaml", 8080, &replacements).await;
    assert_eq!(api(&second, &tokens[0], &[]).await.status, 403);
    assert_eq!(api(&second, &tokens[1], &[]).await.status, 200);

    // Back with its state: the pool reconnects and the feed resumes.
    let _back = cutter.reopen().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while let Err(status) = app.logout(&tokens[1]).await {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "the database never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.logout(&tokens[2]).await.unwrap();
    for envoy in [&first, &second] {
        until_status(envoy, &tokens[1], 403).await;
        until_status(envoy, &tokens[2], 403).await;
        assert_eq!(api(envoy, &tokens[0], &[]).await.status, 403);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_revocations_reaches_the_edge_as_a_few_updates() {
    let edge = Edge::start(Backend::Production, |_| {}).await;
    let first = token(&edge.login("erin", true).await);
    let last = token(&edge.login("finn", true).await);
    assert_eq!(edge.api(&first, &[]).await.status, 200);
    assert_eq!(edge.api(&last, &[]).await.status, 200);
    let before = reloads(&edge.envoy).await;
    let pool = sqlx::PgPool::connect(edge.app.config.database_url.as_deref().unwrap())
        .await
        .unwrap();
    let (first_sid, last_sid) = (claims(&first)["sid"].clone(), claims(&last)["sid"].clone());
    for batch in 0..10 {
        let real = match batch {
            0 => first_sid.as_str().unwrap().to_owned(),
            9 => last_sid.as_str().unwrap().to_owned(),
            _ => uuid::Uuid::now_v7().to_string(),
        };
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(
            "WITH s AS (UPDATE revocation_seq SET n = n + 1000 WHERE id = 1 RETURNING n) \
             INSERT INTO revocation_log (seq, event_id, event_type, user_id, occurred_at, payload) \
             SELECT (SELECT n FROM s) - 1000 + g, gen_random_uuid(), 'token_revoked', gen_random_uuid(), now(), \
                    jsonb_build_object('session_id', CASE WHEN g = 500 THEN $1 ELSE gen_random_uuid()::text END) \
             FROM generate_series(1, 1000) g",
        )
        .bind(&real)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query("SELECT pg_notify('auth_outbox', '')")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_status(&edge.envoy, &first, 403).await;
    until_status(&edge.envoy, &last, 403).await;
    let updates = reloads(&edge.envoy).await - before;
    eprintln!(
        "{updates} map updates for 10,000 revocations in 10 commits (recent map: {})",
        edge.envoy
            .stat(&format!("{ECDS_STATS}.recent.config_reload"))
            .await
            .unwrap_or(0)
    );
    assert!(
        (1..=30).contains(&updates),
        "{updates} updates for 10,000 revocations in 10 commits"
    );
    let unrelated = token(&edge.login("gus", true).await);
    assert_eq!(edge.api(&unrelated, &[]).await.status, 200);
}

/// One policy source: `authz.routes` decides ext_authz's Checks and is
/// pushed to the edge with the deny maps. On one request table — paths
/// under `/api/` with a rule needing a role, one for a method, a public
/// one, case and percent-encoded variants, dot segments — sent with no
/// token, a user's, an admin's and a revoked one, to the ext_authz gateway
/// and to the edge on the same auth-service: the edge never lets through
/// what ext_authz refuses, and where they differ the edge is the stricter
/// for a reason the README names (a role or a public path it leaves to
/// ext_authz, an encoded path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_never_allows_what_ext_authz_refuses_on_one_request_table() {
    use auth_service::authz::policy::{AccessKind, RouteRule, default_rules};
    let rule = |methods: &[&str], path: &str, access, roles: &[&str]| {
        RouteRule::new(methods, path, access, roles, "default")
    };
    let mut edge = Edge::start(Backend::Production, |c| {
        let mut routes = vec![
            rule(&[], "/api/reports/**", AccessKind::Roles, &["admin"]),
            rule(&["DELETE"], "/api/videos/*", AccessKind::Roles, &["admin"]),
            rule(&["GET"], "/api/public/**", AccessKind::Public, &[]),
            // Allowed either way, but in one case only: ext_authz refuses
            // the other cases (the rule would change with case).
            rule(&[], "/api/Pub/**", AccessKind::Authenticated, &[]),
        ];
        routes.extend(default_rules());
        c.authz.routes = routes;
        // Some 400 requests from one address and four tokens: the table
        // is about decisions, not limits.
        for class in c.authz.rate_limits.values_mut() {
            let plenty = auth_service::ratelimit::quota::Limit {
                requests: 100_000,
                per_secs: 1,
                burst: 100_000,
            };
            class.per_ip = Some(plenty);
            class.per_user = Some(plenty);
        }
    })
    .await;
    let backend = echo_backend().await;
    let (gateway, _descriptor) = crate::gateway::gateway_for(&edge.app, backend).await;
    let user = token(&edge.login("uma", true).await);
    let admin = edge.app.admin().await.access_token;
    let revoked = token(&edge.login("uma", false).await);
    let out = edge
        .post("/v1/auth/logout", serde_json::json!({}), Some(&revoked))
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    until_status(&edge.envoy, &revoked, 403).await;

    let paths = [
        "/api/videos",
        "/api/videos/7",
        "/api/reports/q",
        "/api/reports",
        "/api/Reports/q",
        "/api/%72eports/q",
        "/api/public/../reports/q",
        "/api/public/x",
        "/api/public/x?y=%20",
        "/api/other",
        // What a backend reads as another path or method than Envoy's
        // `:path` says (ext_authz refuses each; an outside review found
        // the edge passed them to a role-only rule's backend).
        "/api/reports;x=1/q",
        "/api/reports%3bx/q",
        "/api/reports%2e/q",
        "/api/reports./q",
        "/api/reports%20/q",
        "/api/x%25",
        "/api/videos/7?_method=DELETE",
        "/api/videos/7?a=1&%5Fmethod=DELETE",
        "/api/videos/7?a=1;.METHOD=DELETE",
        "/api/Pub/x",
        "/api/pub/x",
        "/api/PUB/x",
    ];
    let tokens = [
        ("none", None),
        ("user", Some(user.as_str())),
        ("admin", Some(admin.as_str())),
        ("revoked", Some(revoked.as_str())),
    ];
    let mut stricter = Vec::new();
    let overrides = [
        None,
        Some(("x-http-method-override", "DELETE")),
        Some(("x-method-override", "DELETE")),
        Some(("x-http-method", "DELETE")),
    ];
    for method in ["GET", "DELETE", "POST", "delete"] {
        for path in paths {
            for (who, token) in tokens {
                for method_override in overrides {
                    if method_override.is_some() && (path != "/api/videos/7" || method == "DELETE")
                    {
                        continue;
                    }
                    let auth = token.map(|t| format!("Bearer {t}"));
                    let headers: Vec<(&str, &str)> = auth
                        .iter()
                        .map(|a| ("authorization", a.as_str()))
                        .chain(method_override)
                        .collect();
                    let method_override = method_override.map(|(h, _)| h).unwrap_or("");
                    let body = (method == "POST").then_some("{}");
                    let at_gateway = http(gateway.addr, method, path, &headers, body).await;
                    let at_edge = http(edge.envoy.addr, method, path, &headers, body).await;
                    let (g, e) = (at_gateway.status == 200, at_edge.status == 200);
                    assert!(
                        !e || g,
                        "{method} {path} {method_override} as {who}: the edge allowed what ext_authz refused ({at_gateway:?} / {at_edge:?})"
                    );
                    if g && !e {
                        stricter.push(format!("{method} {path} as {who}: {}", at_edge.status));
                    }
                }
            }
        }
    }
    // Agreement where it matters most.
    for (method, path, who, expected) in [
        ("GET", "/api/videos", "user", 200),
        ("GET", "/api/reports/q", "user", 403),
        ("DELETE", "/api/videos/7", "user", 403),
        ("GET", "/api/videos", "revoked", 403),
        ("GET", "/api/videos", "none", 401),
    ] {
        let token = tokens.iter().find(|t| t.0 == who).unwrap().1;
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let r = http(edge.envoy.addr, method, path, &headers, None).await;
        assert_eq!(r.status, expected, "{method} {path} as {who}: {r:?}");
    }
    // Stricter only where an admin's role, a public path or an encoded
    // path is left to ext_authz.
    for case in &stricter {
        assert!(
            case.contains("as admin") || case.contains("/api/public") || case.contains('%'),
            "unexpectedly stricter: {case} (all: {stricter:#?})"
        );
    }
    assert!(
        !stricter.is_empty(),
        "the table has cases only ext_authz decides"
    );
}

/// The maps a replica serves over ECDS: the response's version, and the
/// decoded RBAC configurations by resource name.
type ServedMaps = (
    String,
    std::collections::BTreeMap<
        String,
        envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac,
    >,
);

/// [`ServedMaps`] from the replica at `grpc` (FetchExtensionConfigs), once
/// it has built its first maps (Unavailable until then).
async fn fetch_maps_when_ready(grpc: std::net::SocketAddr) -> ServedMaps {
    use envoy_types::pb::envoy::{
        config::core::v3::TypedExtensionConfig,
        extensions::filters::http::rbac::v3::Rbac,
        service::{
            discovery::v3::DiscoveryRequest,
            extension::v3::extension_config_discovery_service_client::ExtensionConfigDiscoveryServiceClient,
        },
    };
    use prost::Message;
    let mut client = ExtensionConfigDiscoveryServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let response = loop {
        let request = DiscoveryRequest {
            type_url: auth_service::edge::ecds::TYPE_URL.into(),
            resource_names: vec![
                auth_service::edge::RESOURCE_NAME.into(),
                auth_service::edge::RECENT_NAME.into(),
            ],
            ..Default::default()
        };
        match client.fetch_extension_configs(request).await {
            Ok(response) => break response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no maps built: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    let maps = response
        .resources
        .iter()
        .map(|any| {
            let resource = TypedExtensionConfig::decode(any.value.as_slice()).unwrap();
            let rbac = Rbac::decode(resource.typed_config.unwrap().value.as_slice()).unwrap();
            (resource.name, rbac)
        })
        .collect();
    (response.version_info, maps)
}

/// Two replicas of auth-service on one database: revocations made on
/// either reach both replicas' maps, and once both have read the log to
/// the same point they serve the same maps under the same versions — so
/// an Envoy whose streams reach different replicas gets one answer. A
/// replica restarted from the database alone serves them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_serve_the_same_maps_under_the_same_versions() {
    let mut a = TestApp::spawn(Backend::Production).await;
    let mut b = a.replica().await;
    a.sign_up("vic").await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(a.login("vic", PASSWORD).await.unwrap().access_token);
    }
    a.logout(&sessions[0]).await.unwrap();
    b.logout(&sessions[1]).await.unwrap();
    b.sign_up("wes").await;
    let wes = b.login("wes", PASSWORD).await.unwrap().access_token;
    b.client
        .change_password(crate::support::bearer(
            pb::ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: "a different passphrase 9".into(),
            },
            &wes,
        ))
        .await
        .unwrap();
    // Wait until replica a's maps hold every revocation made above — the
    // password change is written last, but the three writes reach the
    // feed in any order relative to a fetch — and both replicas agree.
    let expected: Vec<String> = [&sessions[0], &sessions[1]]
        .iter()
        .map(|t| claims(t)["sid"].as_str().unwrap().to_owned())
        .chain([claims(&wes)["sub"].as_str().unwrap().to_owned()])
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (version, maps) = loop {
        let (va, ma) = fetch_maps_when_ready(a.grpc_addr).await;
        let (vb, mb) = fetch_maps_when_ready(b.grpc_addr).await;
        let text = format!("{ma:?}");
        let holds_all = expected.iter().all(|id| text.contains(id.as_str()));
        if va == vb && holds_all {
            assert_eq!(ma, mb, "same version {va}, same maps");
            break (va, ma);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replicas never agreed: {va} / {vb}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(maps.len(), 2, "base and recent");
    let text = format!("{maps:?}");
    for session in &sessions[..2] {
        assert!(text.contains(claims(session)["sid"].as_str().unwrap()));
    }
    assert!(
        !text.contains(claims(&sessions[2])["sid"].as_str().unwrap()),
        "a live session is not in the maps"
    );
    assert!(
        text.contains(claims(&wes)["sub"].as_str().unwrap()),
        "the user revoked as a whole"
    );

    // A replica restarted from the database alone serves the same again.
    let (config, dir) = b.stop().await;
    let b = TestApp::start(Backend::Production, config, dir).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (vb, mb) = fetch_maps_when_ready(b.grpc_addr).await;
        if vb == version {
            assert_eq!(mb, maps, "rebuilt from the log");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "restarted replica at {vb}, not {version}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Input from the wrong party and malformed input, at the ECDS endpoint
/// itself (over mTLS, as deployed): a peer whose identity holds neither
/// the `gateway` nor the `sidecar` role is refused (PermissionDenied) and
/// learns nothing of the maps; the gateway's identity is served; a request
/// for another resource type is InvalidArgument; the delta protocol,
/// which is not offered, is Unimplemented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deny_maps_are_served_only_to_gateways_and_only_as_ecds() {
    use envoy_types::pb::envoy::service::{
        discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest},
        extension::v3::extension_config_discovery_service_client::ExtensionConfigDiscoveryServiceClient,
    };
    use prost::Message;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let app = TestApp::spawn_with(Backend::Embedded, mesh_tls).await;
    let pki = crate::support::mesh_pki();
    let client = |name: &str| {
        let read = |f: String| std::fs::read(pki.path(&f)).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.crt".into())))
            .identity(Identity::from_pem(
                read(format!("{name}.crt")),
                read(format!("{name}.key")),
            ))
            .domain_name("localhost");
        let url = format!("https://127.0.0.1:{}", app.grpc_addr.port());
        async move {
            let channel = Channel::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            ExtensionConfigDiscoveryServiceClient::new(channel)
        }
    };
    let request = || DiscoveryRequest {
        type_url: auth_service::edge::ecds::TYPE_URL.into(),
        ..Default::default()
    };

    let mut stranger = client("client").await;
    let refused = stranger
        .fetch_extension_configs(request())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = stranger
        .stream_extension_configs(futures::stream::iter([request()]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    let mut gateway = client("envoy").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let served = loop {
        match gateway.fetch_extension_configs(request()).await {
            Ok(response) => break response.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert!(std::time::Instant::now() < deadline, "{s:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    let names: Vec<String> = served
        .resources
        .iter()
        .map(|any| {
            envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig::decode(
                any.value.as_slice(),
            )
            .unwrap()
            .name
        })
        .collect();
    assert_eq!(
        names,
        [
            auth_service::edge::RESOURCE_NAME,
            auth_service::edge::RECENT_NAME,
            auth_service::edge::JWT_NAME
        ],
        "base, recent and jwt_authn's configuration"
    );
    let wrong_type = gateway
        .fetch_extension_configs(DiscoveryRequest {
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        wrong_type.code(),
        tonic::Code::InvalidArgument,
        "{wrong_type:?}"
    );
    let delta = gateway
        .delta_extension_configs(futures::stream::iter([DeltaDiscoveryRequest::default()]))
        .await
        .unwrap_err();
    assert_eq!(delta.code(), tonic::Code::Unimplemented, "{delta:?}");
}
