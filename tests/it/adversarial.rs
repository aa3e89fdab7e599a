//! The service tried as an attacker would, organised by class of attack.
//! Each test names its class; each failed on the code before the fix it
//! guards.
//!
//! * **Path and method ambiguity** (input that one reader and another read
//!   differently): property tests of the route policy against models of
//!   how backends resolve a raw path, Check called directly (no proxy in
//!   front), and the shipped gateway and sidecar on a real Envoy with
//!   requests sent as-is.
//! * **Races between the read that decides and the write that acts**:
//!   see the `races` module.
//! * **Unthrottled secret checks**: see the `throttling` module.

use auth_service::authz::policy::{Route, RoutePolicy, RouteRule, default_rules};
use proptest::prelude::*;

use crate::{
    authz::{check, decide},
    gateway::{gateway_for, sidecar_for},
    on_both_backends,
    support::{Backend, TestApp, echo_backend, http, mesh_tls},
};

// ---------------------------------------------------------------------------
// Class: path and method ambiguity
// ---------------------------------------------------------------------------

fn policy(rules: &[RouteRule]) -> RoutePolicy {
    RoutePolicy::compile(rules, &["default", "public"]).unwrap()
}

/// The default rules without the one whose literal is mixed case (a
/// case-folding backend model below lowers whole paths).
fn lower_case_rules() -> Vec<RouteRule> {
    default_rules()
        .into_iter()
        .filter(|r| r.path == r.path.to_ascii_lowercase())
        .collect()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Percent-decodes once; `None` for a malformed escape.
fn decode(input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            let hi = hex(*input.get(i + 1)?)?;
            let lo = hex(*input.get(i + 2)?)?;
            out.push(hi * 16 + lo);
            i += 3;
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    Some(out)
}

/// How a backend turns a raw path into the resource it serves.
#[derive(Debug, Clone, Copy)]
enum BackendModel {
    /// Decodes, then resolves dot segments (RFC 3986 §5.2.4).
    Rfc,
    /// Also: `\` is `/`, `;params` are dropped from segments, and a
    /// second decoding pass (servlet containers, some routers).
    Lenient,
    /// Lenient, and routes case-insensitively.
    CaseFolding,
}

impl BackendModel {
    const ALL: [Self; 3] = [Self::Rfc, Self::Lenient, Self::CaseFolding];

    fn resolve(self, raw: &str) -> Option<String> {
        let path = raw.split('?').next().unwrap_or("");
        let mut bytes = decode(path.as_bytes())?;
        if !matches!(self, Self::Rfc) {
            bytes = decode(&bytes).unwrap_or(bytes);
            for b in &mut bytes {
                if *b == b'\\' {
                    *b = b'/';
                }
            }
        }
        let text = String::from_utf8(bytes).ok()?;
        let mut segments: Vec<String> = Vec::new();
        for segment in text.split('/') {
            let segment = if matches!(self, Self::Rfc) {
                segment
            } else {
                segment.split(';').next().unwrap_or("")
            };
            match segment {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                s => segments.push(s.to_owned()),
            }
        }
        let mut out = format!("/{}", segments.join("/"));
        if matches!(self, Self::CaseFolding) {
            out = out.to_ascii_lowercase();
        }
        Some(out)
    }

    /// The method the backend's handler runs: HEAD by the GET handler, and
    /// lenient backends upper-case the method and honour `_method`.
    fn method(self, method: &str, raw: &str) -> String {
        let mut method = method.to_owned();
        if !matches!(self, Self::Rfc) {
            method = method.to_ascii_uppercase();
            if let Some(query) = raw.split_once('?').map(|(_, q)| q) {
                for pair in query.split('&') {
                    if let Some(("_method", m)) = pair.split_once('=') {
                        method = m.to_ascii_uppercase();
                    }
                }
            }
        }
        if method == "HEAD" {
            "GET".into()
        } else {
            method
        }
    }
}

fn same(a: Option<&Route>, b: Option<&Route>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Path pieces an attacker combines: the rules' literals in several cases
/// and encodings, dot segments raw and encoded, separators and parameters.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("v1"),
        Just("V1"),
        Just("admin"),
        Just("ADMIN"),
        Just("%61dmin"),
        Just("users"),
        Just("auth"),
        Just("login"),
        Just("api"),
        Just("orders"),
        Just(".well-known"),
        Just("%2Ewell-known"),
        Just("jwks.json"),
        Just("healthz"),
        Just("webhooks"),
        Just(".."),
        Just("."),
        Just(""),
        Just("%2e%2e"),
        Just("%2E."),
        Just("%2e"),
        Just("%252e%252e"),
        Just("%2F"),
        Just("%2fv1"),
        Just("%5c"),
        Just("\\"),
        Just("..\\.."),
        Just("admin;x=1"),
        Just(";"),
        Just("%3b"),
        Just("%00"),
        Just("%0a"),
        Just("%zz"),
        Just("%"),
        Just("%EF%BC%8E%EF%BC%8E"),
        Just("x"),
    ]
    .prop_map(str::to_owned)
}

fn raw_target() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(segment(), 0..6),
        prop_oneof![
            Just(""),
            Just("/"),
            Just("?a=1"),
            Just("?_method=DELETE"),
            Just("?_method=get")
        ],
    )
        .prop_map(|(segments, tail)| format!("/{}{tail}", segments.join("/")))
}

fn method() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("GET"),
        Just("HEAD"),
        Just("POST"),
        Just("PUT"),
        Just("DELETE"),
        Just("get"),
        Just("post"),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// Class: path and method ambiguity. Whatever the raw target, the rule
    /// the policy decides by is the rule of the resource every backend
    /// model serves for it, or the target is refused.
    #[test]
    fn the_decision_is_the_rule_of_the_path_every_backend_serves(
        method in method(),
        raw in raw_target(),
    ) {
        let policy = policy(&lower_case_rules());
        if let Ok(decided) = policy.resolve(method, &raw) {
            for model in BackendModel::ALL {
                // A backend that cannot read the path serves nothing.
                let Some(served) = model.resolve(&raw) else { continue };
                let served_by = policy.route(&model.method(method, &raw), &served);
                prop_assert!(
                    same(decided, served_by),
                    "{method} {raw:?}: decided by {decided:?}, {model:?} serves {served:?} under {served_by:?}"
                );
            }
        }
    }

    /// Class: path ambiguity. Canonical form is a fixed point: a
    /// canonical path resolves to itself, so the check and the backend
    /// agree once a proxy has normalised the path.
    #[test]
    fn canonical_paths_are_fixed_points(raw in raw_target()) {
        use auth_service::authz::target::{canonical_path, split_query};
        if let Ok(canonical) = canonical_path(split_query(&raw).0) {
            prop_assert_eq!(canonical_path(&canonical), Ok(canonical.clone()));
        }
    }
}

/// Paths that, read as a backend reads them, reach a protected resource.
const PROTECTED_BY_ENCODING: [&str; 10] = [
    "/.well-known/../api/orders",
    "/.well-known/%2e%2e/api/orders",
    "/.well-known/%2E%2E/api/orders",
    "/webhooks/..%2fapi/orders",
    "/.well-known/..\\api/orders",
    "/.well-known/..;/api/orders",
    "/healthz/../api/orders",
    "/.well-known/%252e%252e/api/orders",
    "/.well-known/%c0%ae%c0%ae/api/orders",
    "/.well-known/%EF%BC%8E%EF%BC%8E/api/orders",
];

/// Paths a plain user may use to reach the admin rules' resources.
const ADMIN_BY_ENCODING: [&str; 8] = [
    "/api/../v1/admin/users",
    "/api/%2e%2e/v1/admin/users",
    "/V1/ADMIN/users",
    "/v1/Admin/users",
    "/v1/admin;x/users",
    "/v1//admin/users",
    "/v1/./admin/users",
    "/v1%2fadmin/users",
];

on_both_backends! {
    /// Class: path ambiguity, with no proxy in front (a mesh may run any
    /// proxy config): Check alone never lets an encoded path reach a
    /// protected resource as public, nor a user reach the admin rules.
    async fn check_alone_decides_on_the_path_the_backend_serves(app) {
        for path in PROTECTED_BY_ENCODING {
            let (code, http) = decide(&app, check("GET", path, &[])).await;
            assert_ne!(code, 0, "{path} allowed without a token");
            assert!(matches!(http, Some(400 | 401)), "{path}: {http:?}");
        }
        app.sign_up("mallory").await;
        let login = app.login_ok("mallory").await;
        let auth = format!("Bearer {}", login.access_token);
        for path in ADMIN_BY_ENCODING {
            for method in ["GET", "HEAD"] {
                let (code, http) =
                    decide(&app, check(method, path, &[("authorization", &auth)])).await;
                assert_ne!(code, 0, "{method} {path} allowed for a plain user");
                assert!(matches!(http, Some(400 | 403)), "{method} {path}: {http:?}");
            }
        }
        // Method ambiguity: lower case, an override header, `_method`.
        let (_, lower) = decide(&app, check("get", "/api/orders", &[("authorization", &auth)])).await;
        assert_eq!(lower, Some(400));
        for header in auth_service::authz::target::METHOD_OVERRIDE_HEADERS {
            let (code, http) = decide(
                &app,
                check("POST", "/v1/users", &[(header, "DELETE")]),
            )
            .await;
            assert_eq!((code, http), (tonic::Code::InvalidArgument as i32, Some(400)), "{header}");
        }
        let (_, query) = decide(&app, check("POST", "/v1/users?_method=DELETE", &[])).await;
        assert_eq!(query, Some(400));
        // The canonical forms still pass.
        let (ok, _) = decide(&app, check("GET", "/api/./orders", &[("authorization", &auth)])).await;
        assert_eq!(ok, 0);
        let (public, _) = decide(&app, check("HEAD", "/.well-known/jwks.json", &[])).await;
        assert_eq!(public, 0);
    }
}

/// Sends `method raw` as-is (HTTP/1.1, like `curl --path-as-is`) through a
/// proxy; the status and, when the upstream answered, the path it received.
async fn as_is(
    addr: std::net::SocketAddr,
    method: &str,
    raw: &str,
    auth: Option<&str>,
) -> (u16, Option<String>) {
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
    let r = http(addr, method, raw, &headers, None).await;
    let upstream = (r.status == 200)
        .then(|| serde_json::from_str::<serde_json::Value>(&r.body).ok())
        .flatten()
        .and_then(|v| v["path"].as_str().map(str::to_owned));
    (r.status, upstream)
}

/// Class: path ambiguity, through each shipped Envoy config on a real Envoy:
/// a path sent as-is never reaches the upstream as a resource its decision
/// did not cover, and what the upstream receives is canonical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_proxies_never_pass_an_encoded_path_past_its_rule() {
    let mut app = TestApp::spawn_with(Backend::Production, mesh_tls).await;
    let backend = echo_backend().await;
    let (gateway, _descriptor) = gateway_for(&app, backend).await;
    let sidecar = sidecar_for(&app).await;
    app.sign_up("mallory").await;
    let login = app.login_ok("mallory").await;
    let auth = format!("Bearer {}", login.access_token);
    let policy = policy(&default_rules());
    for (proxy, addr) in [("gateway", gateway.addr), ("sidecar", sidecar.addr)] {
        for raw in PROTECTED_BY_ENCODING {
            let (status, upstream) = as_is(addr, "GET", raw, None).await;
            assert!(
                upstream.is_none() && status != 200,
                "{proxy}: GET {raw} without a token reached the upstream as {upstream:?} ({status})"
            );
        }
        for raw in ADMIN_BY_ENCODING {
            for method in ["GET", "HEAD", "DELETE"] {
                let (status, upstream) = as_is(addr, method, raw, Some(&auth)).await;
                assert!(
                    !(200..300).contains(&status),
                    "{proxy}: {method} {raw} as a plain user: {status}, upstream saw {upstream:?}"
                );
            }
        }
        // Canonical paths still pass, and the upstream sees them canonical.
        for (raw, want) in [
            ("/api/./orders", "/api/orders"),
            ("/api//x/../orders", "/api/orders"),
        ] {
            let (status, upstream) = as_is(addr, "GET", raw, Some(&auth)).await;
            assert_eq!(
                (status, upstream.as_deref()),
                (200, Some(want)),
                "{proxy}: {raw}"
            );
            let served = policy.route("GET", want).unwrap();
            assert_eq!(
                served.access,
                auth_service::authz::policy::Access::Authenticated
            );
        }
        // A header spelled with underscores next to its dashed twin.
        let r = http(
            addr,
            "GET",
            "/api/orders",
            &[("authorization", &auth), ("x_user_id", "spoofed")],
            None,
        )
        .await;
        assert_eq!(r.status, 400, "{proxy}: underscore header: {r:?}");
    }
}

// ---------------------------------------------------------------------------
// Class: two requests racing between the read that decides and the write
// that acts (forced with pause points, on both backends)
// ---------------------------------------------------------------------------

mod races {
    use auth_service::grpc::pb;
    use tonic::Code;
    use uuid::Uuid;

    use crate::{
        on_both_backends,
        support::{PASSWORD, TestApp, bearer},
    };

    /// The security changes that must end every session of an account.
    #[derive(Debug, Clone, Copy)]
    enum Change {
        Password,
        Suspend,
        Roles,
        RevokeAll,
    }

    const CHANGES: [Change; 4] = [
        Change::Password,
        Change::Suspend,
        Change::Roles,
        Change::RevokeAll,
    ];

    /// Makes `change` to `user` (who holds the session `own`) and waits for
    /// it to commit.
    async fn make(
        app: &TestApp,
        change: Change,
        user: &pb::TokenResponse,
        admin: &pb::TokenResponse,
    ) {
        let mut client = app.client.clone();
        let id = user.user.as_ref().unwrap().id.clone();
        let result = match change {
            Change::Password => client
                .change_password(bearer(
                    pb::ChangePasswordRequest {
                        current_password: PASSWORD.into(),
                        new_password: "a brand new passphrase".into(),
                    },
                    &user.access_token,
                ))
                .await
                .map(drop),
            Change::Suspend => client
                .suspend_user(bearer(
                    pb::SuspendUserRequest {
                        user_id: id,
                        reason: "race".into(),
                    },
                    &admin.access_token,
                ))
                .await
                .map(drop),
            Change::Roles => client
                .set_user_roles(bearer(
                    pb::SetUserRolesRequest {
                        user_id: id,
                        roles: vec!["user".into(), "support".into()],
                    },
                    &admin.access_token,
                ))
                .await
                .map(drop),
            Change::RevokeAll => client
                .revoke_user_sessions(bearer(
                    pb::RevokeUserSessionsRequest { user_id: id },
                    &admin.access_token,
                ))
                .await
                .map(drop),
        };
        result.unwrap_or_else(|s| panic!("{change:?}: {s:?}"));
    }

    on_both_backends! {
        /// Race: a login that read the account (and verified its password)
        /// before a security change, and would write its session after the
        /// change committed, gets no session: Aborted, nothing refreshable.
        async fn a_login_racing_a_security_change_gets_no_session(app) {
            let admin = app.admin().await;
            for (i, change) in CHANGES.into_iter().enumerate() {
                let name = format!("racer{i}");
                app.sign_up(&name).await;
                let own = app.login_ok(&name).await;
                let mut held = auth_service::pause::hold("login.before_session");
                let mut client = app.client.clone();
                let login_name = name.clone();
                let login = tokio::spawn(async move {
                    client
                        .login(pb::LoginRequest {
                            login: login_name,
                            password: PASSWORD.into(),
                            ..Default::default()
                        })
                        .await
                });
                held.reached().await;
                make(&app, change, &own, &admin).await;
                held.release();
                match login.await.unwrap() {
                    Err(status) => assert_eq!(status.code(), Code::Aborted, "{change:?}: {status:?}"),
                    Ok(pair) => {
                        let pair = pair.into_inner();
                        panic!(
                            "{change:?}: the racing login got a session (access valid: {}, refresh works: {})",
                            app.validate(&pair.access_token).await.is_ok(),
                            app.refresh(&pair.refresh_token).await.is_ok(),
                        );
                    }
                }
            }
        }

        /// Race: a refresh that read its session before a password change
        /// and writes the rotation around the change's commit: whichever the
        /// database orders first, the pair it returns is dead (the access
        /// token refused, the refresh token invalid).
        async fn a_refresh_racing_a_password_change_returns_nothing_that_lives(app) {
            app.sign_up("rowan").await;
            let own = app.login_ok("rowan").await;
            let other = app.login_ok("rowan").await;
            let mut held = auth_service::pause::hold("refresh.after_read");
            let mut client = app.client.clone();
            let refresh_token = other.refresh_token.clone();
            let refresh = tokio::spawn(async move {
                client
                    .refresh_token(pb::RefreshTokenRequest { refresh_token })
                    .await
            });
            held.reached().await;
            // The change waits for the held rotation where the database
            // orders them (PostgreSQL's row lock, SQLite's one writer).
            let change = {
                let app_client = app.client.clone();
                let own = own.clone();
                tokio::spawn(async move {
                    let mut client = app_client;
                    client
                        .change_password(crate::support::bearer(
                            pb::ChangePasswordRequest {
                                current_password: PASSWORD.into(),
                                new_password: "a brand new passphrase".into(),
                            },
                            &own.access_token,
                        ))
                        .await
                })
            };
            // Give the change time to reach the database before the release
            // (not asserted: the outcome must be the same in either order).
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            held.release();
            change.await.unwrap().expect("the password change commits");
            if let Ok(pair) = refresh.await.unwrap() {
                let pair = pair.into_inner();
                let valid = app.validate(&pair.access_token).await;
                assert!(
                    valid.is_err(),
                    "the racing refresh's access token outlived the password change: {valid:?}"
                );
                assert!(app.refresh(&pair.refresh_token).await.is_err());
            }
        }

        /// Replay across a security change: a device token from before a
        /// password change is not trusted after it, by the database's
        /// version (not a revocation key that can expire or be lost).
        async fn a_device_token_from_before_a_security_change_is_not_trusted(app) {
            app.sign_up("dana").await;
            let own = app.login_ok("dana").await;
            let device = own.device_token.clone();
            assert!(!device.is_empty());
            let id = Uuid::parse_str(&own.user.as_ref().unwrap().id).unwrap();
            let version = |app: &TestApp| {
                let users = app.database.users.clone();
                async move {
                    users.find_credentials_by_id(id).await.unwrap().unwrap().security_version
                }
            };
            let before = version(&app).await;
            assert!(app.app_tokens.trusted_device(&device, id, before).is_some());
            make(&app, Change::Password, &own, &pb::TokenResponse::default()).await;
            let after = version(&app).await;
            assert!(after > before, "a password change bumps the security version");
            assert_eq!(app.app_tokens.trusted_device(&device, id, after), None);
        }
    }
}

// ---------------------------------------------------------------------------
// Class: unthrottled secret checks (guessing; parallel attempts racing the
// lockout's check)
// ---------------------------------------------------------------------------

mod throttling {
    use auth_service::grpc::pb;
    use tonic::Code;

    use crate::{
        on_both_backends,
        support::{PASSWORD, bearer},
    };

    on_both_backends! {
        /// Race: wrong logins sent in parallel when the lockout has room
        /// for one more failure: exactly one is tried, the rest are refused
        /// before hashing (the attempt is reserved first).
        async fn parallel_wrong_logins_cannot_all_pass_the_last_free_place(app) {
            app.sign_up("paula").await;
            for _ in 0..4 {
                let r = app.login("paula", "wrong password 1").await.unwrap_err();
                assert_eq!(r.code(), Code::Unauthenticated);
            }
            let attempts = (0..8).map(|i| {
                let mut client = app.client.clone();
                async move {
                    client
                        .login(pb::LoginRequest {
                            login: "paula".into(),
                            password: format!("wrong password {i}"),
                            ..Default::default()
                        })
                        .await
                        .unwrap_err()
                        .code()
                }
            });
            let codes = futures::future::join_all(attempts).await;
            let tried = codes.iter().filter(|c| **c == Code::Unauthenticated).count();
            let refused = codes.iter().filter(|c| **c == Code::ResourceExhausted).count();
            assert_eq!((tried, refused), (1, 7), "{codes:?}");
            // And the account is now locked from this address, even for the
            // right password.
            let locked = app.login("paula", PASSWORD).await.unwrap_err();
            assert_eq!(locked.code(), Code::ResourceExhausted);
        }

        /// Guessing through ChangePassword: a session holder's wrong
        /// `current_password` guesses are throttled like logins (and shared
        /// with them), and each is audited as a failed login.
        async fn change_password_guesses_are_throttled_and_audited(app) {
            app.sign_up("gus").await;
            let session = app.login_ok("gus").await;
            let mut codes = Vec::new();
            for i in 0..7 {
                let r = app
                    .client
                    .change_password(bearer(
                        pb::ChangePasswordRequest {
                            current_password: format!("guess number {i}"),
                            new_password: "a brand new passphrase".into(),
                        },
                        &session.access_token,
                    ))
                    .await
                    .unwrap_err();
                codes.push(r.code());
            }
            assert_eq!(&codes[..5], &[Code::Unauthenticated; 5], "{codes:?}");
            assert_eq!(&codes[5..], &[Code::ResourceExhausted; 2], "{codes:?}");
            // The same counters as a login from this address.
            let login = app.login("gus", PASSWORD).await.unwrap_err();
            assert_eq!(login.code(), Code::ResourceExhausted);
            let audited = app
                .events()
                .await
                .into_iter()
                .filter(|e| e.event_type == "login_failed")
                .count();
            assert_eq!(audited, 5);
        }
    }
}

// ---------------------------------------------------------------------------
// Class: the wrong party (who may move a client's address, and so its
// per-address budget), in each shipped deployment
// ---------------------------------------------------------------------------

mod trust {
    use auth_service::{config::Config, ratelimit::quota::Limit};
    use envoy_types::{
        ext_authz::v3::pb::{CheckRequest, HttpResponse},
        pb::envoy::{
            config::core::v3::{Address, SocketAddress, address},
            service::auth::v3::{
                AttributeContext, attribute_context, authorization_client::AuthorizationClient,
            },
        },
    };
    use tonic::transport::{Channel, Endpoint};

    use crate::{
        k8s::{object, render},
        support::{Backend, TestApp},
    };

    const ISTIO_GATEWAY: &str =
        "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account";
    const ISTIO_APP: &str = "spiffe://cluster.local/ns/immersiverse-apps/sa/chat";
    const ISTIO_OTHER_APP: &str = "spiffe://cluster.local/ns/immersiverse-apps/sa/feed";

    /// The shipped base configuration (k8s/base/config.toml), as the pods
    /// load it.
    fn shipped() -> Config {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/base/config.toml"),
        )
        .unwrap();
        Config::from_toml(&text).unwrap()
    }

    /// A connection from `source` (a loopback address of its own).
    async fn from(source: &str, app: &TestApp) -> AuthorizationClient<Channel> {
        let channel = Endpoint::from_shared(format!("http://{}", app.grpc_addr))
            .unwrap()
            .local_address(Some(source.parse().unwrap()))
            .connect()
            .await
            .unwrap();
        AuthorizationClient::new(channel)
    }

    /// `POST /v1/users` (public, limited per address) as a proxy asks
    /// about it: the client's `x-forwarded-for`, the downstream address it
    /// saw, and the caller named by `x-forwarded-client-cert` (as the local
    /// sidecar sets it). The HTTP status of a denial, or 200.
    async fn check(
        client: &mut AuthorizationClient<Channel>,
        xfcc: Option<&str>,
        forwarded: &str,
        downstream: &str,
    ) -> i32 {
        let mut request = tonic::Request::new(CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(attribute_context::Peer {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: downstream.into(),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                }),
                request: Some(attribute_context::Request {
                    http: Some(attribute_context::HttpRequest {
                        method: "POST".into(),
                        path: "/v1/users".into(),
                        headers: [("x-forwarded-for".to_owned(), forwarded.to_owned())]
                            .into_iter()
                            .collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        });
        if let Some(xfcc) = xfcc {
            request.metadata_mut().insert(
                "x-forwarded-client-cert",
                format!("URI={xfcc}").parse().unwrap(),
            );
        }
        let response = client.check(request).await.unwrap().into_inner();
        match response.http_response {
            Some(HttpResponse::DeniedResponse(d)) => d.status.map_or(0, |s| s.code),
            _ => 200,
        }
    }

    /// Wrong party, Istio overlay as shipped: behind auth-service's own
    /// sidecar (calls from 127.0.0.6, the caller named in
    /// x-forwarded-client-cert), only the ingress gateway moves a client's
    /// address; a workload's sidecar spends only its own budget, whatever
    /// address it claims; the header from anywhere else names no one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_istio_only_the_ingress_gateway_forwards_client_addresses() {
        let rendered = render("k8s/overlays/istio");
        let deployment = object(&rendered, "Deployment", "auth-service");
        let env = &deployment["spec"]["template"]["spec"]["containers"][0]["env"];
        let xfcc_from = env
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "AUTH_TLS__XFCC_FROM")
            .and_then(|e| e["value"].as_str())
            .expect("the Istio overlay names its sidecar's address");
        assert_eq!(xfcc_from, "[127.0.0.6]");
        let shipped = shipped();
        let app = TestApp::spawn_with(Backend::Embedded, |c| {
            c.services = shipped.services.clone();
            c.tls.xfcc_from = vec!["127.0.0.6".parse().unwrap()];
            c.authz.rate_limits.get_mut("public").unwrap().per_ip = Some(Limit {
                requests: 1,
                per_secs: 60,
                burst: 2,
            });
        })
        .await;
        let mut sidecar_path = from("127.0.0.6", &app).await;
        // The ingress gateway: each client address has its own budget.
        for i in 0..4 {
            let forwarded = format!("198.51.100.{i}");
            assert_eq!(
                check(
                    &mut sidecar_path,
                    Some(ISTIO_GATEWAY),
                    &forwarded,
                    "10.0.0.9"
                )
                .await,
                200
            );
        }
        let same: Vec<i32> = futures_all(&mut sidecar_path, Some(ISTIO_GATEWAY), |_| {
            ("203.0.113.7".into(), "10.0.0.9".into())
        })
        .await;
        assert_eq!(same, [200, 200, 429], "one client's budget");
        // A workload's sidecar claiming a new client address each time:
        // its own budget, for the one downstream address it saw.
        let rotating = futures_all(&mut sidecar_path, Some(ISTIO_APP), |i| {
            (format!("192.0.2.{i}"), "10.1.1.1".into())
        })
        .await;
        assert_eq!(rotating, [200, 200, 429], "x-forwarded-for from a sidecar");
        // Another workload's sidecar with the same downstream address is
        // not limited by the first one's spending.
        let other = futures_all(&mut sidecar_path, Some(ISTIO_OTHER_APP), |i| {
            (format!("192.0.2.{i}"), "10.1.1.1".into())
        })
        .await;
        assert_eq!(other, [200, 200, 429], "each sidecar's own budget");
        // The gateway's identity claimed from another address than the
        // sidecar's: no identity, its own address's budget.
        let mut elsewhere = from("127.0.0.1", &app).await;
        let spoofed = futures_all(&mut elsewhere, Some(ISTIO_GATEWAY), |i| {
            (format!("198.51.100.{}", 100 + i), "10.0.0.9".into())
        })
        .await;
        assert_eq!(
            spoofed,
            [200, 200, 429],
            "x-forwarded-client-cert from a non-sidecar"
        );
    }

    /// Three Checks in a row from `client` as `xfcc`, with the
    /// (x-forwarded-for, downstream) that `at(i)` gives.
    async fn futures_all(
        client: &mut AuthorizationClient<Channel>,
        xfcc: Option<&str>,
        at: impl Fn(usize) -> (String, String),
    ) -> Vec<i32> {
        let mut out = Vec::new();
        for i in 0..3 {
            let (forwarded, downstream) = at(i);
            out.push(check(client, xfcc, &forwarded, &downstream).await);
        }
        out
    }

    /// Wrong party, base and production deployments as shipped: the shipped
    /// identities hold the roles the README gives them, and the production
    /// gateway keeps each client's own address (a layer-4 load balancer
    /// with `externalTrafficPolicy: Local`, Envoy trusting no hop).
    #[test]
    fn the_shipped_identities_and_the_edge_service_keep_client_addresses() {
        let shipped = shipped();
        let policy = auth_service::grpc::PeerPolicy {
            services: std::sync::Arc::new(shipped.services.clone()),
            gateway_only_forwarding: true,
            xfcc_from: Vec::new(),
        };
        for (identity, roles) in [
            (
                "spiffe://immersiverse/ns/immersiverse-auth/sa/envoy-gateway",
                vec!["gateway"],
            ),
            (
                "spiffe://immersiverse/ns/immersiverse-apps/sa/chat",
                vec!["sidecar"],
            ),
            (
                "spiffe://immersiverse/ns/immersiverse-auth/sa/example-app",
                vec!["sidecar"],
            ),
            (ISTIO_GATEWAY, vec!["gateway"]),
            (ISTIO_APP, vec!["sidecar"]),
            ("spiffe://immersiverse/ns/other/sa/x", vec![]),
        ] {
            assert_eq!(policy.roles_of(identity), roles, "{identity}");
        }
        let rendered = render("k8s/overlays/production");
        let service = object(&rendered, "Service", "envoy-gateway");
        assert_eq!(service["spec"]["type"], "LoadBalancer");
        assert_eq!(service["spec"]["externalTrafficPolicy"], "Local");
        let gateway = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/gateway.yaml"),
        )
        .unwrap();
        assert!(gateway.contains("use_remote_address: true"));
        assert!(gateway.contains("xff_num_trusted_hops: 0"));
    }
}

// ---------------------------------------------------------------------------
// Class: service-account secrets (guessing; a token racing a rotation)
// ---------------------------------------------------------------------------

mod service_secrets {
    use auth_service::grpc::pb;
    use tonic::Code;

    use crate::{
        on_both_backends,
        support::{TestApp, bearer},
    };

    async fn account(app: &mut TestApp, admin: &str) -> (String, String) {
        let created = app
            .client
            .create_service_account(bearer(
                pb::CreateServiceAccountRequest {
                    name: "ingest".into(),
                    roles: vec!["service".into()],
                },
                admin,
            ))
            .await
            .unwrap()
            .into_inner();
        (created.account.unwrap().id, created.client_secret)
    }

    async fn issue(app: &TestApp, id: &str, secret: &str) -> Result<String, tonic::Status> {
        app.client
            .clone()
            .issue_service_token(pb::IssueServiceTokenRequest {
                client_id: id.into(),
                client_secret: secret.into(),
            })
            .await
            .map(|r| r.into_inner().access_token)
    }

    /// IssueServiceToken held at the pause point `at` while the account's
    /// secret is rotated (committed), then let go: what it answered.
    async fn issue_across_a_rotation(
        app: &TestApp,
        admin: &str,
        id: &str,
        secret: &str,
        at: &'static str,
    ) -> Result<String, tonic::Status> {
        let mut held = auth_service::pause::hold(at);
        let issuing = {
            let (mut client, id, secret) = (app.client.clone(), id.to_owned(), secret.to_owned());
            tokio::spawn(async move {
                client
                    .issue_service_token(pb::IssueServiceTokenRequest {
                        client_id: id,
                        client_secret: secret,
                    })
                    .await
                    .map(|r| r.into_inner().access_token)
            })
        };
        held.reached().await;
        app.client
            .clone()
            .rotate_service_account_secret(bearer(
                pb::RotateServiceAccountSecretRequest { id: id.to_owned() },
                admin,
            ))
            .await
            .unwrap();
        held.release();
        issuing.await.unwrap()
    }

    on_both_backends! {
        /// Guessing a service account's secret is throttled like a login,
        /// and each wrong one is audited as a failed login.
        async fn service_secret_guesses_are_throttled_and_audited(app) {
            let admin = app.admin().await.access_token;
            let (id, secret) = account(&mut app, &admin).await;
            let before = app.events().await.iter().filter(|e| e.event_type == "login_failed").count();
            let mut codes = Vec::new();
            for i in 0..7 {
                codes.push(issue(&app, &id, &format!("ivsa_guess{i}")).await.unwrap_err().code());
            }
            assert_eq!(&codes[..5], &[Code::Unauthenticated; 5], "{codes:?}");
            assert_eq!(&codes[5..], &[Code::ResourceExhausted; 2], "{codes:?}");
            // Locked from this address, even with the right secret.
            assert_eq!(issue(&app, &id, &secret).await.unwrap_err().code(), Code::ResourceExhausted);
            let after = app.events().await.iter().filter(|e| e.event_type == "login_failed").count();
            assert_eq!(after - before, 5);
        }

        /// Race: a rotation that commits between the read that decides a
        /// token and the write it rests on refuses the token (an outside
        /// review issued tokens racing rotations that the edge, and a
        /// replica rebuilt from the log, accepted).
        async fn a_service_token_whose_secret_was_rotated_after_the_read_is_refused(app) {
            let admin = app.admin().await.access_token;
            let (id, secret) = account(&mut app, &admin).await;
            let issued = issue_across_a_rotation(&app, &admin, &id, &secret, "service_token.before_confirm").await;
            let refused = issued.expect_err("the secret changed before the write");
            assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        }

        /// Race: a token issued for a secret read before a rotation that
        /// commits before the token is signed dies with the old secret.
        async fn a_service_token_racing_a_rotation_dies_with_the_old_secret(app) {
            let admin = app.admin().await.access_token;
            let (id, secret) = account(&mut app, &admin).await;
            let issued = issue_across_a_rotation(&app, &admin, &id, &secret, "service_token.before_sign").await;
            let token = issued.expect("the secret was valid when read");
            let valid = app.validate(&token).await;
            assert!(valid.is_err(), "a token of the rotated secret is still accepted: {valid:?}");
            // A replica that knows the rotation only from the log (as the
            // edge's maps do) refuses it too: the log's time is later.
            if app.backend == crate::support::Backend::Production {
                let mut replica = app.replica().await;
                let valid = replica.validate(&token).await;
                assert!(valid.is_err(), "a replica that read the log accepts it: {valid:?}");
            }
        }
    }
}

mod mesh_lockout {
    use auth_service::grpc::pb::{self, auth_service_client::AuthServiceClient};
    use tonic::{Code, transport::Endpoint};

    use crate::support::{Backend, PASSWORD, TestApp};

    const APP: &str = "spiffe://cluster.local/ns/immersiverse-apps/sa/chat";
    const OTHER: &str = "spiffe://cluster.local/ns/immersiverse-apps/sa/feed";

    async fn login(app: &TestApp, identity: &str, password: &str) -> Code {
        let channel = Endpoint::from_shared(format!("http://{}", app.grpc_addr))
            .unwrap()
            .local_address(Some("127.0.0.6".parse().unwrap()))
            .connect()
            .await
            .unwrap();
        let mut request = tonic::Request::new(pb::LoginRequest {
            login: "mona".into(),
            password: password.into(),
            ..Default::default()
        });
        request.metadata_mut().insert(
            "x-forwarded-client-cert",
            format!("URI={identity}").parse().unwrap(),
        );
        match AuthServiceClient::new(channel).login(request).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        }
    }

    /// Wrong party behind Istio: every in-mesh caller arrives from the
    /// sidecar's one address, so a workload that guesses wrong locks out
    /// only itself (its address within its identity), not every other
    /// workload's logins to the same account.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_workloads_failures_do_not_lock_out_the_rest_of_the_mesh() {
        let mut app = TestApp::spawn_with(Backend::Embedded, |c| {
            c.tls.xfcc_from = vec!["127.0.0.6".parse().unwrap()];
        })
        .await;
        app.sign_up("mona").await;
        let mut codes = Vec::new();
        for i in 0..6 {
            codes.push(login(&app, APP, &format!("wrong guess {i}")).await);
        }
        assert_eq!(&codes[..5], &[Code::Unauthenticated; 5], "{codes:?}");
        assert_eq!(codes[5], Code::ResourceExhausted, "{codes:?}");
        assert_eq!(login(&app, OTHER, PASSWORD).await, Code::Ok);
    }
}
