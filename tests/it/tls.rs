//! TLS on the gRPC port with real certificates (openssl-made CAs): client
//! certificates required or optional, a certificate from another CA, a
//! rotated server certificate picked up by new handshakes while an open
//! connection lives on, `x-forwarded-for` trusted only from gateway
//! identities, a service identity reading platform tokens without a bearer
//! token, and bad files refused at start-up.

use std::time::Duration;

use auth_service::{
    config::{ClientAuth, Config, ServiceIdentity},
    grpc::pb::{self, auth_service_client::AuthServiceClient},
    platforms::Platform,
    startup::Application,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::{
    platforms::{access_token, configure, fakes, link, pb_platform, user, user_id_of},
    support::{Backend, OwnRedis, TestApp, TestPki, base_config, env_url, fresh_postgres_url},
};

const GATEWAY: &str = "spiffe://immersiverse/ns/edge/sa/gateway";
const CHAT: &str = "spiffe://immersiverse/ns/chat/sa/chat";

fn pki() -> TestPki {
    let pki = TestPki::new();
    pki.issue("gateway", &format!("URI:{GATEWAY}"));
    pki.issue("chat", &format!("URI:{CHAT},DNS:chat.immersiverse.svc"));
    pki
}

fn tls(config: &mut Config, pki: &TestPki, mode: ClientAuth) {
    config.tls.cert = Some(pki.path("server.crt").into());
    config.tls.key = Some(pki.path("server.key").into());
    config.tls.client_ca = Some(pki.path("ca.crt").into());
    config.tls.client_auth = mode;
    config.services.insert(
        GATEWAY.into(),
        ServiceIdentity {
            roles: vec!["gateway".into()],
        },
    );
    config.services.insert(
        CHAT.into(),
        ServiceIdentity {
            roles: vec!["service".into()],
        },
    );
}

/// A client trusting `ca` (a PEM path), presenting `cert` (name in `pki`).
async fn client(
    app: &TestApp,
    ca: &str,
    cert: Option<(&TestPki, &str)>,
) -> Result<AuthServiceClient<Channel>, tonic::transport::Error> {
    Ok(AuthServiceClient::new(tls_channel(app, ca, cert).await?))
}

async fn tls_channel(
    app: &TestApp,
    ca: &str,
    cert: Option<(&TestPki, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((pki, name)) = cert {
        config = config.identity(Identity::from_pem(
            std::fs::read(pki.path(&format!("{name}.crt"))).unwrap(),
            std::fs::read(pki.path(&format!("{name}.key"))).unwrap(),
        ));
    }
    Channel::from_shared(format!("https://127.0.0.1:{}", app.grpc_addr.port()))
        .unwrap()
        .tls_config(config)?
        // A handshake that hangs is an error here, not a stuck test.
        .connect_timeout(Duration::from_secs(20))
        .connect()
        .await
}

/// Whether a call over `client` (if it connected) succeeds.
async fn works(client: Result<AuthServiceClient<Channel>, tonic::transport::Error>) -> bool {
    let Ok(mut client) = client else { return false };
    // Bounded: a handshake or call that hangs fails here, by name, instead
    // of holding the test until the runner's timeout.
    tokio::time::timeout(
        Duration::from_secs(20),
        client.validate_token(pb::ValidateTokenRequest { token: "x".into() }),
    )
    .await
    .expect("the call answered within 20 s")
    .map_or_else(|s| s.code() == Code::Unauthenticated, |_| true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_refuse_missing_and_foreign_ones() {
    let pki = pki();
    let other = TestPki::new();
    let app = TestApp::spawn_with(Backend::Embedded, |c| tls(c, &pki, ClientAuth::Required)).await;
    let ca = pki.path("ca.crt");
    assert!(
        works(client(&app, &ca, Some((&pki, "chat"))).await).await,
        "a certificate of the CA"
    );
    assert!(
        !works(client(&app, &ca, None).await).await,
        "no certificate"
    );
    assert!(
        !works(client(&app, &ca, Some((&other, "client"))).await).await,
        "a certificate of another CA"
    );
    // Plaintext to a TLS port.
    let mut plain = AuthServiceClient::new(
        Channel::from_shared(format!("http://{}", app.grpc_addr))
            .unwrap()
            .connect_lazy(),
    );
    assert!(
        tokio::time::timeout(
            Duration::from_secs(20),
            plain.validate_token(pb::ValidateTokenRequest { token: "x".into() })
        )
        .await
        .expect("plaintext to a TLS port answered within 20 s")
        .is_err()
    );
    // A client that does not trust the server's CA refuses it.
    assert!(!works(client(&app, &other.path("ca.crt"), Some((&pki, "chat"))).await).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_certificate_is_used_by_new_handshakes_and_open_connections_live_on() {
    let first = TestPki::new();
    let second = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(first.path("server.crt"), &cert).unwrap();
    std::fs::copy(first.path("server.key"), &key).unwrap();
    let app = TestApp::spawn_with(Backend::Embedded, |c| {
        c.tls.cert = Some(cert.clone());
        c.tls.key = Some(key.clone());
        c.tls.reload_interval_secs = 1;
    })
    .await;
    let mut open = client(&app, &first.path("ca.crt"), None)
        .await
        .expect("first CA trusted");
    assert!(!works(client(&app, &second.path("ca.crt"), None).await).await);

    // As cert-manager does: the key, then the certificate, in place.
    std::fs::copy(second.path("server.key"), &key).unwrap();
    std::fs::copy(second.path("server.crt"), &cert).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !works(client(&app, &second.path("ca.crt"), None).await).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate is served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !works(client(&app, &first.path("ca.crt"), None).await).await,
        "the old one is not"
    );
    // The connection made before the rotation still carries calls.
    let answer = open
        .validate_token(pb::ValidateTokenRequest { token: "x".into() })
        .await;
    assert_eq!(answer.unwrap_err().code(), Code::Unauthenticated);

    // A file that does not load is ignored (the current certificate stays).
    std::fs::write(&cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(works(client(&app, &second.path("ca.crt"), None).await).await);
}

/// The client address a failed login from `client` with
/// `x-forwarded-for: 203.0.113.9` was recorded with.
async fn recorded_address(
    app: &TestApp,
    client: &mut AuthServiceClient<Channel>,
    login: &str,
) -> String {
    let mut request = tonic::Request::new(pb::LoginRequest {
        login: login.into(),
        password: "wrong password!".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    assert_eq!(
        client.login(request).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let events = app.events().await;
    let last = events
        .iter()
        .rev()
        .find(|e| e.event_type == "login_failed")
        .unwrap();
    last.data["client_ip"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_trusted_only_from_a_gateway_identity() {
    let pki = pki();
    let app = TestApp::spawn_with(Backend::Embedded, |c| tls(c, &pki, ClientAuth::Optional)).await;
    let ca = pki.path("ca.crt");
    let mut gateway = client(&app, &ca, Some((&pki, "gateway"))).await.unwrap();
    let mut chat = client(&app, &ca, Some((&pki, "chat"))).await.unwrap();
    let mut anonymous = client(&app, &ca, None).await.unwrap();
    assert_eq!(
        recorded_address(&app, &mut gateway, "ann").await,
        "203.0.113.9"
    );
    assert_eq!(
        recorded_address(&app, &mut chat, "ann").await,
        "127.0.0.1@spiffe://immersiverse/ns/chat/sa/chat",
        "a service cannot claim an address: its own, within its identity's budget"
    );
    assert_eq!(
        recorded_address(&app, &mut anonymous, "ann").await,
        "127.0.0.1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_identity_reads_platform_tokens_without_a_bearer_token() {
    let pki = pki();
    let fakes = fakes(&[Platform::Twitch]).await;
    let mut app = TestApp::spawn_with(Backend::Embedded, |c| {
        tls(c, &pki, ClientAuth::Optional);
        configure(c, &fakes);
    })
    .await;
    let ca = pki.path("ca.crt");
    app.client = client(&app, &ca, None).await.unwrap();
    let token = user(&mut app, "nia").await;
    let nia = user_id_of(&mut app, &token).await;
    link(&mut app, &token, &fakes[&Platform::Twitch]).await;
    let request = || pb::GetPlatformAccessTokenRequest {
        user_id: nia.clone(),
        platform: pb_platform(Platform::Twitch),
        ..Default::default()
    };
    let mut chat = client(&app, &ca, Some((&pki, "chat"))).await.unwrap();
    let got = chat
        .get_platform_access_token(request())
        .await
        .expect("a service identity");
    assert!(fakes[&Platform::Twitch].is_live(&got.into_inner().access_token));
    let mut gateway = client(&app, &ca, Some((&pki, "gateway"))).await.unwrap();
    let refused = gateway
        .get_platform_access_token(request())
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::PermissionDenied,
        "an identity without the role"
    );
    let refused = app
        .client
        .get_platform_access_token(request())
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::Unauthenticated,
        "no certificate, no token"
    );
    let refused = access_token(&mut app, &token, &nia, Platform::Twitch)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "a user token");
}

#[tokio::test]
async fn bad_tls_files_stop_start_up_naming_the_key() {
    let pki = pki();
    let other = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    type Breakage<'a> = Box<dyn Fn(&mut Config) + 'a>;
    let cases: Vec<(Breakage<'_>, &str)> = vec![
        (
            Box::new(|c: &mut Config| c.tls.cert = Some("/nonexistent/tls.crt".into())),
            "tls.cert",
        ),
        (
            Box::new(|c: &mut Config| c.tls.key = Some(other.path("server.key").into())),
            "tls.key",
        ),
        (
            Box::new(|c: &mut Config| c.tls.client_ca = Some(pki.path("server.key").into())),
            "tls.client_ca",
        ),
    ];
    for (break_it, key) in cases {
        let mut config = base_config(dir.path());
        tls(&mut config, &pki, ClientAuth::Required);
        break_it(&mut config);
        let error = match Application::build(config).await {
            Ok(_) => panic!("{key}: start-up refused"),
            Err(e) => format!("{e:#}"),
        };
        assert!(error.contains(key), "{key}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_is_reached_over_verified_tls() {
    use sqlx::{Connection, Row};
    let url = fresh_postgres_url().await;
    let ca = env_url("TEST_PG_CA");
    let tls_url = format!("{url}?sslmode=verify-full&sslrootcert={ca}");
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    config.database_url = Some(tls_url.clone());
    let mut app = TestApp::start(Backend::Embedded, config, dir).await;
    app.sign_up("tlsuser").await;
    app.login_ok("tlsuser").await;
    // Every connection the service holds to its database is encrypted.
    let mut check = sqlx::PgConnection::connect(&tls_url).await.unwrap();
    let database = url.rsplit('/').next().unwrap();
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid WHERE a.datname = $1",
    )
    .bind(database)
    .fetch_one(&mut check)
    .await
    .unwrap();
    let (encrypted, plain): (i64, i64) = (row.get(0), row.get(1));
    assert!(encrypted >= 2, "the service's connections and this one");
    assert_eq!(plain, 0);

    // A server certificate from a CA that is not trusted: refused.
    let other = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    config.database_url = Some(format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        other.path("ca.crt")
    ));
    config.database_timeout_ms = 2000;
    assert!(Application::build(config).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_is_reached_over_mutual_tls() {
    let pki = TestPki::new();
    let redis = OwnRedis::start_tls(&pki).await;
    assert!(redis.url.starts_with("rediss://"));
    let mut app = TestApp::spawn_with(Backend::Embedded, |c| {
        c.redis_url = Some(redis.url.clone());
        c.redis_tls.ca = Some(pki.path("ca.crt").into());
        c.redis_tls.cert = Some(pki.path("client.crt").into());
        c.redis_tls.key = Some(pki.path("client.key").into());
    })
    .await;
    // Login and token validation go through Redis (lockout, revocation).
    app.sign_up("redisuser").await;
    let token = app.login_ok("redisuser").await.access_token;
    app.validate(&token).await.unwrap();
    assert_eq!(app.http_get("/readyz").await.0, 200);

    // A Redis whose certificate is from an untrusted CA: refused.
    let other = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path());
    config.redis_url = Some(redis.url.clone());
    config.redis_tls.ca = Some(other.path("ca.crt").into());
    config.redis_tls.cert = Some(pki.path("client.crt").into());
    config.redis_tls.key = Some(pki.path("client.key").into());
    assert!(Application::build(config).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_identity_runs_admin_rpcs_and_others_cannot() {
    const OPERATOR: &str = "spiffe://immersiverse/ns/ops/sa/operator";
    let pki = pki();
    pki.issue("operator", &format!("URI:{OPERATOR}"));
    let mut app = TestApp::spawn_with(Backend::Embedded, |c| {
        tls(c, &pki, ClientAuth::Required);
        c.services.insert(
            OPERATOR.into(),
            ServiceIdentity {
                roles: vec!["admin".into()],
            },
        );
    })
    .await;
    let ca = pki.path("ca.crt");
    let victim = app.sign_up("mallory").await.id;
    let suspend = || pb::SuspendUserRequest {
        user_id: victim.clone(),
        reason: "abuse".into(),
    };
    // A service identity without the admin role: refused.
    let mut chat = client(&app, &ca, Some((&pki, "chat"))).await.unwrap();
    let refused = chat.suspend_user(suspend()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    // The operator's identity, no bearer token: done.
    let mut operator = client(&app, &ca, Some((&pki, "operator"))).await.unwrap();
    let user = operator
        .suspend_user(suspend())
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.status, pb::UserStatus::Suspended as i32);
    let event = app
        .events()
        .await
        .into_iter()
        .rfind(|e| e.event_type == "user_suspended")
        .unwrap();
    assert_eq!(event.data["by"], uuid::Uuid::nil().to_string());
}

/// Whether a Check of a public sign-up from `forwarded` is allowed.
async fn check_allowed(channel: Channel, forwarded: &str) -> bool {
    let request = crate::authz::check("POST", "/v1/users", &[("x-forwarded-for", forwarded)]);
    check_is_allowed(channel, request).await
}

/// Whether auth-service, reached over `channel`, allows the Check `request`.
async fn check_is_allowed(
    channel: Channel,
    request: envoy_types::pb::envoy::service::auth::v3::CheckRequest,
) -> bool {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let response = AuthorizationClient::new(channel)
        .check(request)
        .await
        .unwrap()
        .into_inner();
    response.status.is_some_and(|s| s.code == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_caller_that_is_not_a_gateway_is_limited_by_its_own_address() {
    let pki = pki();
    let app = TestApp::spawn_with(Backend::Embedded, |c| {
        tls(c, &pki, ClientAuth::Required);
        // One public request per address per hour.
        let one = auth_service::ratelimit::quota::Limit {
            requests: 1,
            per_secs: 3600,
            burst: 1,
        };
        c.authz.rate_limits.get_mut("public").unwrap().per_ip = Some(one);
    })
    .await;
    let ca = pki.path("ca.crt");
    // The gateway's forwarded addresses count: two clients, two budgets.
    let gateway = tls_channel(&app, &ca, Some((&pki, "gateway")))
        .await
        .unwrap();
    assert!(check_allowed(gateway.clone(), "198.51.100.1").await);
    assert!(check_allowed(gateway.clone(), "198.51.100.2").await);
    assert!(
        !check_allowed(gateway, "198.51.100.1").await,
        "the first client's budget is spent"
    );
    // Another service claiming addresses is limited by its own.
    let chat = tls_channel(&app, &ca, Some((&pki, "chat"))).await.unwrap();
    assert!(check_allowed(chat.clone(), "198.51.100.3").await);
    assert!(
        !check_allowed(chat, "198.51.100.4").await,
        "both count against 127.0.0.1"
    );
}

/// The downstream identity inside a CheckRequest is believed only from a
/// gateway: another service cannot name a certificate (or a principal) it
/// does not hold to reach a route that requires that identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_service_identity_is_believed_only_from_a_gateway() {
    let pki = pki();
    let app = TestApp::spawn_with(Backend::Embedded, |c| {
        tls(c, &pki, ClientAuth::Required);
        c.authz.routes.insert(
            0,
            crate::support::service_only_route("/internal/chat/**", CHAT),
        );
    })
    .await;
    let ca = pki.path("ca.crt");
    let allowed = |channel: Channel, certificate: String, principal: &str| {
        let request = crate::authz::from_downstream(
            crate::authz::check("GET", "/internal/chat/rooms", &[]),
            certificate,
            principal,
        );
        check_is_allowed(channel, request)
    };
    let chat_pem = crate::authz::url_encoded_pem(&pki, "chat");
    let gateway = tls_channel(&app, &ca, Some((&pki, "gateway")))
        .await
        .unwrap();
    assert!(allowed(gateway.clone(), chat_pem.clone(), "").await);
    assert!(allowed(gateway, String::new(), CHAT).await);
    // The chat service itself calling Check (not a gateway): what it says
    // of the downstream client is not believed.
    let chat = tls_channel(&app, &ca, Some((&pki, "chat"))).await.unwrap();
    assert!(!allowed(chat.clone(), chat_pem, "").await);
    assert!(!allowed(chat, String::new(), CHAT).await);
}
