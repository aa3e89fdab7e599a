//! The shipped Envoy configs against a real Envoy 1.40: REST through the
//! transcoding gateway, ext_authz on every route, and the mesh sidecar.

use std::{net::SocketAddr, time::Duration};

use auth_service::{config::Config, grpc::pb, ratelimit::quota::Limit};

use crate::support::{
    Backend, Envoy, OwnRedis, PASSWORD, TestApp, bearer, config_for, echo_backend, envoy_tls, http,
    mesh_tls,
};

/// auth-service (PostgreSQL + Redis) behind the gateway, with an echo backend
/// on /api.
struct Stack {
    app: TestApp,
    gateway: Envoy,
    _descriptor: tempfile::NamedTempFile,
}

pub async fn gateway_for(app: &TestApp, backend: SocketAddr) -> (Envoy, tempfile::NamedTempFile) {
    let descriptor = descriptor_file();
    let gateway = Envoy::start(
        "gateway.yaml",
        8080,
        &gateway_replacements(app, backend, &descriptor),
    )
    .await;
    (gateway, descriptor)
}

/// The API's descriptor set in a file, for the transcoder.
pub fn descriptor_file() -> tempfile::NamedTempFile {
    let descriptor = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(descriptor.path(), pb::FILE_DESCRIPTOR_SET).unwrap();
    descriptor
}

/// What points a shipped gateway config (`gateway.yaml`, `edge.yaml`) at
/// `app`, `backend` and `descriptor`, over the mesh PKI.
pub fn gateway_replacements(
    app: &TestApp,
    backend: SocketAddr,
    descriptor: &tempfile::NamedTempFile,
) -> Vec<(&'static str, String)> {
    [
        (
            "port_value: 50051",
            format!("port_value: {}", app.grpc_addr.port()),
        ),
        (
            "port_value: 8081",
            format!("port_value: {}", app.http_addr.port()),
        ),
        (
            "port_value: 9000",
            format!("port_value: {}", backend.port()),
        ),
        (
            "/etc/envoy/descriptor/auth_descriptor.pb",
            descriptor.path().display().to_string(),
        ),
    ]
    .into_iter()
    .chain(envoy_tls())
    .collect()
}

impl Stack {
    async fn start(adjust: impl FnOnce(&mut Config)) -> Self {
        let app = TestApp::spawn_with(Backend::Production, |c| {
            mesh_tls(c);
            adjust(c);
        })
        .await;
        let backend = echo_backend().await;
        let (gateway, descriptor) = gateway_for(&app, backend).await;
        Self {
            app,
            gateway,
            _descriptor: descriptor,
        }
    }

    async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
        token: Option<&str>,
    ) -> crate::support::HttpResponse {
        post_json(self.gateway.addr, path, body, token).await
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> crate::support::HttpResponse {
        http(self.gateway.addr, "GET", path, headers, None).await
    }

    /// Signs up and logs in through the gateway; returns the login body.
    async fn user(&self, name: &str) -> serde_json::Value {
        rest_login(self.gateway.addr, name, true).await
    }
}

/// POSTs `body` as JSON to a gateway, with `token` as bearer if any.
pub async fn post_json(
    gateway: SocketAddr,
    path: &str,
    body: serde_json::Value,
    token: Option<&str>,
) -> crate::support::HttpResponse {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    http(gateway, "POST", path, &headers, Some(&body.to_string())).await
}

/// Signs `name` up (when `sign_up`) and logs in through a gateway's REST
/// API; the login body.
pub async fn rest_login(gateway: SocketAddr, name: &str, sign_up: bool) -> serde_json::Value {
    if sign_up {
        let r = post_json(gateway, "/v1/users", serde_json::json!({ "email": format!("{name}@example.com"), "username": name, "password": PASSWORD }), None).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = post_json(
        gateway,
        "/v1/auth/login",
        serde_json::json!({ "login": name, "password": PASSWORD }),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

fn token(login: &serde_json::Value) -> &str {
    login["access_token"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_sign_up_login_refresh_and_logout_through_the_transcoding_gateway() {
    let stack = Stack::start(|_| {}).await;
    let r = stack.post("/v1/users", serde_json::json!({ "email": "Ada@Example.com", "username": "ada", "password": PASSWORD }), None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["user"]["email"], "ada@example.com");
    assert_eq!(r.json()["user"]["status"], "USER_STATUS_ACTIVE");

    let login = stack
        .post(
            "/v1/auth/login",
            serde_json::json!({ "login": "ada", "password": PASSWORD }),
            None,
        )
        .await;
    assert_eq!(login.status, 200, "{login:?}");
    let login = login.json();
    assert_eq!(login["token_type"], "Bearer");
    assert_eq!(
        login["expires_in"], "900",
        "int64 is a JSON string in proto3 JSON"
    );

    let me = stack
        .get(
            "/v1/me",
            &[("authorization", &format!("Bearer {}", token(&login)))],
        )
        .await;
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!(me.json()["username"], "ada");

    let refreshed = stack
        .post(
            "/v1/auth/refresh",
            serde_json::json!({ "refresh_token": login["refresh_token"] }),
            None,
        )
        .await;
    assert_eq!(refreshed.status, 200, "{refreshed:?}");
    let refreshed = refreshed.json();
    assert_ne!(refreshed["refresh_token"], login["refresh_token"]);

    let wrong = stack
        .post(
            "/v1/auth/login",
            serde_json::json!({ "login": "ada", "password": "wrong password" }),
            None,
        )
        .await;
    assert_eq!(wrong.status, 401, "{wrong:?}");

    let out = stack
        .post(
            "/v1/auth/logout",
            serde_json::json!({ "refresh_token": refreshed["refresh_token"] }),
            Some(token(&refreshed)),
        )
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    let after = stack
        .get(
            "/v1/me",
            &[("authorization", &format!("Bearer {}", token(&refreshed)))],
        )
        .await;
    assert_eq!(after.status, 401, "{after:?}");
    let again = stack
        .post(
            "/v1/auth/refresh",
            serde_json::json!({ "refresh_token": refreshed["refresh_token"] }),
            None,
        )
        .await;
    assert_eq!(again.status, 401, "{again:?}");

    let jwks = stack.get("/.well-known/jwks.json", &[]).await;
    assert_eq!(jwks.status, 200);
    assert!(jwks.body.contains("Ed25519"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_sign_up_is_400_with_field_details_and_a_duplicate_is_409() {
    let stack = Stack::start(|_| {}).await;
    let r = stack
        .post(
            "/v1/users",
            serde_json::json!({ "email": "nope", "username": "x", "password": "short" }),
            None,
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    let body = r.json();
    let violations = &body["details"][0]["field_violations"];
    let fields: Vec<&str> = violations
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["email", "username", "password"], "{body}");
    stack.user("bea").await;
    let r = stack.post("/v1/users", serde_json::json!({ "email": "BEA@example.com", "username": "bea2", "password": PASSWORD }), None).await;
    assert_eq!(r.status, 409, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_route_needs_a_valid_token_and_the_upstream_sees_only_the_real_identity() {
    let stack = Stack::start(|_| {}).await;
    let none = stack.get("/api/videos", &[]).await;
    assert_eq!(none.status, 401, "{none:?}");
    assert_eq!(
        none.header("www-authenticate"),
        Some(r#"Bearer error="invalid_token""#)
    );
    assert_eq!(none.json()["code"], "unauthenticated");
    let garbage = stack
        .get("/api/videos", &[("authorization", "Bearer garbage")])
        .await;
    assert_eq!(garbage.status, 401);

    let login = stack.user("cid").await;
    let user_id = login["user"]["id"].as_str().unwrap().to_owned();
    let auth = format!("Bearer {}", token(&login));
    let ok = stack
        .get(
            "/api/videos",
            &[
                ("authorization", &auth),
                ("x-user-id", "spoofed-admin"),
                ("x-user-roles", "admin"),
                ("x-session-id", "forged"),
            ],
        )
        .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let seen = ok.json();
    assert_eq!(seen["path"], "/api/videos");
    assert_eq!(
        seen["x-user-id"],
        serde_json::json!([user_id]),
        "exactly the real id, never the client's"
    );
    assert_eq!(seen["x-user-roles"], serde_json::json!(["user"]));
    assert_ne!(seen["x-session-id"], serde_json::json!(["forged"]));

    // Logout, then the very next request is refused.
    let out = stack
        .post(
            "/v1/auth/logout",
            serde_json::json!({}),
            Some(token(&login)),
        )
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    let after = stack.get("/api/videos", &[("authorization", &auth)]).await;
    assert_eq!(after.status, 401, "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_are_403_for_non_admins() {
    let stack = Stack::start(|_| {}).await;
    let login = stack.user("dee").await;
    let id = login["user"]["id"].as_str().unwrap();
    let r = stack
        .post(
            &format!("/v1/admin/users/{id}:suspend"),
            serde_json::json!({ "reason": "x" }),
            Some(token(&login)),
        )
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["code"], "permission_denied");
    let anonymous = stack
        .post(
            &format!("/v1/admin/users/{id}:suspend"),
            serde_json::json!({}),
            None,
        )
        .await;
    assert_eq!(anonymous.status, 401);
}

/// The gateway keeps login buckets per client network (/24) and per client
/// address: a burst of logins from one network, or from one address (with
/// or without a trailing slash), is cut at the edge — held a second by the
/// login tarpit, then Envoy's own 429 with `retry-after`, nothing sent on to
/// auth-service — while every login that passes is answered by
/// auth-service without being held, and someone from another network logs
/// in meanwhile. A client's own copy of the tarpit's marker holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_burst_from_one_network_is_cut_at_the_edge_and_other_networks_log_in() {
    let stack = Stack::start(|_| {}).await;
    stack.user("nell").await;
    let (gateway, body) = (
        stack.gateway.addr,
        serde_json::json!({ "login": "nobody-here", "password": "a wrong guess" }).to_string(),
    );
    let burst: Vec<_> = (0..200u8)
        .map(|i| {
            let body = body.clone();
            tokio::spawn(async move {
                let source = std::net::Ipv4Addr::new(127, 61, 0, 1 + i);
                crate::support::http_from(
                    Some(source),
                    gateway,
                    "POST",
                    "/v1/auth/login",
                    &[],
                    Some(&body),
                )
                .await
            })
        })
        .collect();
    let (mut at_edge, mut answered) = (0, 0);
    for task in burst {
        let r = task.await.unwrap();
        if r.status == 429 && r.body == "local_rate_limited" {
            // Envoy's local reply: no call behind it.
            assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
            at_edge += 1;
        } else {
            // auth-service's answer, transcoded: a google.rpc.Status body.
            assert!(
                [401, 429, 503].contains(&r.status) && r.json()["code"].is_number(),
                "every other answer is auth-service's: {r:?}"
            );
            answered += 1;
        }
    }
    assert!(
        at_edge > 0,
        "the burst was cut at the edge ({answered} answered)"
    );
    assert!(
        answered >= 100,
        "a network's burst of 100 passes: {answered}"
    );
    // One address past its own bucket (20), by REST with and without a
    // trailing slash, all at once: cut at the edge too. (One after another
    // they would not be: once locked out, each refusal is held a second by
    // auth-service, slower than the bucket refills.)
    let one_address: Vec<_> = (0..60)
        .map(|i| {
            let body = body.clone();
            tokio::spawn(async move {
                let path = ["/v1/auth/login/", "/v1/auth/login"][i % 2];
                let source = Some(std::net::Ipv4Addr::new(127, 63, 0, 1));
                crate::support::http_from(source, gateway, "POST", path, &[], Some(&body)).await
            })
        })
        .collect();
    let mut cut = 0;
    for task in one_address {
        let r = task.await.unwrap();
        cut += usize::from(r.status == 429 && r.body == "local_rate_limited");
    }
    assert!(cut > 0, "one address's flood is cut at the edge");
    // And by gRPC's own path, a burst of 30 from one address: cut with
    // RESOURCE_EXHAUSTED, as auth-service's lockout answers.
    let grpc_burst: Vec<_> = (0..30)
        .map(|_| {
            tokio::spawn(async move {
                crate::support::http_from(
                    Some(std::net::Ipv4Addr::new(127, 66, 0, 1)),
                    gateway,
                    "POST",
                    "/immersiverse.auth.v1.AuthService/Login",
                    &[("content-type", "application/grpc"), ("te", "trailers")],
                    None,
                )
                .await
            })
        })
        .collect();
    let mut grpc_cut = 0;
    for task in grpc_burst {
        let r = task.await.unwrap();
        grpc_cut += usize::from(
            r.header("grpc-status") == Some("8")
                && r.header("grpc-message") == Some("local_rate_limited")
                && r.header("retry-after") == Some("1"),
        );
    }
    assert!(
        grpc_cut >= 10,
        "a burst of 30 past a bucket of 20, by gRPC: {grpc_cut} cut"
    );
    // Every login cut at the edge was held first, and no other request:
    // the tarpit's counters match the cuts one for one, and nothing
    // overflowed it.
    let stat = |name: &'static str| {
        let gateway = &stack.gateway;
        async move { gateway.stat(name).await.unwrap_or(0) }
    };
    let held = stat("http.edge.fault.delays_injected").await;
    let cuts = (at_edge + cut + grpc_cut) as u64;
    assert_eq!(
        (held, stat("http.edge.fault.aborts_injected").await),
        (cuts, cuts),
        "held and refused: every cut, nothing else"
    );
    assert_eq!(stat("http.edge.fault.faults_overflow").await, 0);
    // A client's own marker is removed before the buckets: on a route
    // without the tarpit and on a login within its buckets, it holds
    // nothing, and the login is answered by auth-service.
    let marked = crate::support::http_from(
        Some(std::net::Ipv4Addr::new(127, 64, 0, 1)),
        gateway,
        "GET",
        "/.well-known/jwks.json",
        &[("x-login-throttled", "1")],
        None,
    )
    .await;
    assert_eq!(marked.status, 200, "{marked:?}");
    let marked_login = crate::support::http_from(
        Some(std::net::Ipv4Addr::new(127, 65, 0, 1)),
        gateway,
        "POST",
        "/v1/auth/login",
        &[("x-login-throttled", "1")],
        Some(&body),
    )
    .await;
    assert!(
        [401, 429, 503].contains(&marked_login.status) && marked_login.json()["code"].is_number(),
        "auth-service's own answer: {marked_login:?}"
    );
    assert_eq!(
        stat("http.edge.fault.delays_injected").await,
        held,
        "a client's own marker holds nothing"
    );
    let elsewhere = crate::support::http_from(
        Some(std::net::Ipv4Addr::new(127, 62, 0, 1)),
        gateway,
        "POST",
        "/v1/auth/login",
        &[],
        Some(&serde_json::json!({ "login": "nell", "password": PASSWORD }).to_string()),
    )
    .await;
    assert_eq!(elsewhere.status, 200, "{elsewhere:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_limit_the_gateway_answers_429_with_retry_after() {
    let stack = Stack::start(|c| {
        let class = c.authz.rate_limits.get_mut("default").unwrap();
        class.per_user = Some(Limit {
            requests: 1,
            per_secs: 60,
            burst: 3,
        });
    })
    .await;
    let login = stack.user("eve").await;
    let auth = format!("Bearer {}", token(&login));
    for i in 0..3 {
        let r = stack.get("/api/feed", &[("authorization", &auth)]).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
    }
    let limited = stack.get("/api/feed", &[("authorization", &auth)]).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(limited.header("x-ratelimit-limit"), Some("1"));
    assert_eq!(limited.json()["code"], "rate_limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspend_on_the_other_replica_is_enforced_here_at_once() {
    // The cache would answer "not revoked" for a minute: only the Redis
    // notice can make this replica deny right away.
    let stack = Stack::start(|c| c.revocation.cache_ttl_ms = 60_000).await;
    let mut other = stack.app.replica().await;

    let admin = other.admin().await;
    let login = stack.user("fay").await;
    let auth = format!("Bearer {}", token(&login));
    assert_eq!(
        stack
            .get("/api/x", &[("authorization", &auth)])
            .await
            .status,
        200,
        "warms this replica's cache"
    );

    other
        .client
        .suspend_user(bearer(
            pb::SuspendUserRequest {
                user_id: login["user"]["id"].as_str().unwrap().into(),
                reason: "t".into(),
            },
            &admin.access_token,
        ))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = stack.get("/api/x", &[("authorization", &auth)]).await;
        if r.status == 401 {
            break;
        }
        assert_eq!(r.status, 200);
        assert!(
            std::time::Instant::now() < deadline,
            "the suspension never reached this replica"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_dies_checks_fail_closed_on_revocation_except_cached_tokens() {
    let mut redis = OwnRedis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(Backend::Production, dir.path()).await;
    config.redis_url = Some(redis.url.clone());
    config.revocation.cache_ttl_ms = 60_000;
    mesh_tls(&mut config);
    let app = TestApp::start(Backend::Production, config, dir).await;
    let backend = echo_backend().await;
    let (gateway, _descriptor) = gateway_for(&app, backend).await;
    let stack = Stack {
        app,
        gateway,
        _descriptor,
    };
    let warm = stack.user("gus").await;
    let cold = stack
        .post(
            "/v1/auth/login",
            serde_json::json!({ "login": "gus", "password": PASSWORD }),
            None,
        )
        .await
        .json();
    let warm_auth = format!("Bearer {}", token(&warm));
    assert_eq!(
        stack
            .get("/api/x", &[("authorization", &warm_auth)])
            .await
            .status,
        200
    );

    redis.kill();

    let cached = stack.get("/api/x", &[("authorization", &warm_auth)]).await;
    assert_eq!(
        cached.status, 200,
        "served from the cache within its TTL; rate limit fails open to local: {cached:?}"
    );
    let unknown = stack
        .get(
            "/api/x",
            &[("authorization", &format!("Bearer {}", token(&cold)))],
        )
        .await;
    assert_eq!(unknown.status, 503, "revocation fails closed: {unknown:?}");
    assert_eq!(unknown.json()["code"], "unavailable");
    let anonymous = stack.get("/api/x", &[]).await;
    assert_eq!(
        anonymous.status, 401,
        "no Redis needed to refuse a missing token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_auth_service_is_down_envoy_fails_closed() {
    let stack = Stack::start(|_| {}).await;
    let login = stack.user("hal").await;
    let auth = format!("Bearer {}", token(&login));
    assert_eq!(
        stack
            .get("/api/x", &[("authorization", &auth)])
            .await
            .status,
        200
    );
    let Stack {
        app,
        gateway,
        _descriptor,
    } = stack;
    app.stop().await;
    let r = http(
        gateway.addr,
        "GET",
        "/api/x",
        &[("authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(r.status, 503, "{r:?}");
}

/// The shipped sidecar in front of an echo application, checked by `app`.
pub async fn sidecar_for(app: &TestApp) -> Envoy {
    let local_app = echo_backend().await;
    Envoy::start(
        "sidecar.yaml",
        15006,
        &[
            (
                "port_value: 50051",
                format!("port_value: {}", app.grpc_addr.port()),
            ),
            (
                "port_value: 8000",
                format!("port_value: {}", local_app.port()),
            ),
        ]
        .into_iter()
        .chain(envoy_tls())
        .collect::<Vec<_>>(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_passes_and_denies_the_same_way() {
    let mut app = TestApp::spawn_with(Backend::Production, mesh_tls).await;
    let sidecar = sidecar_for(&app).await;
    app.sign_up("ivy").await;
    let login = app.login_ok("ivy").await;
    let auth = format!("Bearer {}", login.access_token);
    let none = http(sidecar.addr, "GET", "/orders", &[], None).await;
    assert_eq!(none.status, 401);
    let ok = http(
        sidecar.addr,
        "GET",
        "/orders",
        &[("authorization", &auth), ("x-user-id", "spoofed")],
        None,
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(
        ok.json()["x-user-id"],
        serde_json::json!([login.user.unwrap().id])
    );
    let admin_only = http(
        sidecar.addr,
        "GET",
        "/v1/admin/anything",
        &[("authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(admin_only.status, 403);
}

/// One raw HTTP/1.1 request with a body of bytes; the status of the answer.
/// The gateway may answer and close before the body is sent, so write errors
/// are expected and ignored.
async fn raw_status(addr: SocketAddr, head_extra: &str, body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/users HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n{head_extra}content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
    let raw = String::from_utf8_lossy(&raw);
    raw.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {:?}", &raw[..raw.len().min(200)]))
}

/// Malformed and oversized input at the gateway gets a clear 4xx, and the
/// service behind it goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_requests_get_a_4xx_at_the_gateway() {
    let stack = Stack::start(|_| {}).await;
    let addr = stack.gateway.addr;
    // 40 KB: over the gateway's 32 KiB, under Envoy's own 60 KiB default.
    for size in [40_000, 1 << 20] {
        let huge_header = format!("authorization: Bearer {}\r\n", "a".repeat(size));
        assert_eq!(
            raw_status(addr, &huge_header, b"{}").await,
            431,
            "{size}-byte header"
        );
    }
    let big_body = format!(r#"{{"email":"{}"}}"#, "a".repeat(10 << 20));
    assert_eq!(
        raw_status(addr, "", big_body.as_bytes()).await,
        413,
        "10 MB body"
    );
    // Deeply nested and over the size limit: refused for its size (413)
    // when the whole body has arrived before the transcoder parses, for its
    // depth (400) when a first part arrives alone (seen once under load).
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let status = raw_status(addr, "", nested.as_bytes()).await;
    assert!(
        [400, 413].contains(&status),
        "deeply nested JSON over the size limit: {status}"
    );
    let nested = format!(
        r#"{{"email":{}1{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert_eq!(
        raw_status(addr, "", nested.as_bytes()).await,
        400,
        "deeply nested JSON within the size limit"
    );
    assert_eq!(
        raw_status(addr, "", b"{\"email\":\"\xff\xfe\xfd\",\"username\":\"x\"}").await,
        400,
        "invalid UTF-8"
    );
    assert_eq!(
        raw_status(addr, "", b"{\"email\":").await,
        400,
        "truncated JSON"
    );
    // Still serving.
    stack.user("afterall").await;
}

/// The same straight to gRPC: an oversized message or metadata is refused
/// with a clear status, and the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_grpc_messages_and_metadata_are_refused() {
    let mut app = TestApp::spawn(Backend::Embedded).await;
    // 100 KB is over `limits.max_api_message_bytes` (64 KiB) and under
    // tonic's own 4 MiB: refused by the configured limit, not the default.
    for size in [100_000, 10 << 20] {
        let status = app
            .client
            .create_user(pb::CreateUserRequest {
                email: "big@example.com".into(),
                username: "big".into(),
                password: "p".repeat(size),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{size}: {status:?}");
    }
    let with_junk = |bytes: usize| {
        let mut request = tonic::Request::new(pb::ValidateTokenRequest { token: "x".into() });
        request
            .metadata_mut()
            .insert("x-junk", "j".repeat(bytes).parse().unwrap());
        request
    };
    // 20 KB of metadata is over the HTTP/2 server's default (16 KiB) and
    // under `limits.max_header_bytes` (64 KiB): it reaches the handler.
    let status = app
        .client
        .validate_token(with_junk(20_000))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let status = app
        .client
        .validate_token(with_junk(100_000))
        .await
        .unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok);
    assert_ne!(
        status.code(),
        tonic::Code::Unauthenticated,
        "the handler never saw it: {status:?}"
    );
    // Still serving, on a fresh connection as on the old one.
    app.sign_up("stillhere").await;
}

/// A caller from the mesh reaches the sidecar with its workload certificate
/// (mTLS); Envoy forwards the verified certificate in the CheckRequest, and
/// a route that requires a service identity admits only that identity. A
/// certificate of another service, and a plaintext caller, get 403; a
/// certificate from another CA never gets past the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_route_admits_only_the_service_identity_it_requires() {
    const CHAT: &str = "spiffe://immersiverse/ns/chat/sa/chat";
    let pki = crate::support::mesh_pki();
    pki.issue("chat", &format!("URI:{CHAT}"));
    pki.issue("video", "URI:spiffe://immersiverse/ns/video/sa/video");
    let app = TestApp::spawn_with(Backend::Production, |c| {
        mesh_tls(c);
        c.authz.routes.insert(
            0,
            crate::support::service_only_route("/internal/chat/**", CHAT),
        );
    })
    .await;
    let sidecar = sidecar_for(&app).await;
    let get = |pki: &crate::support::TestPki, name: Option<&str>| {
        let mut client = reqwest::Client::builder()
            .use_rustls_tls()
            // The sidecar's own certificate names the workload (a SPIFFE
            // URI), not 127.0.0.1; the caller's identity is what is tested.
            .danger_accept_invalid_certs(true);
        if let Some(name) = name {
            let mut pem = std::fs::read(pki.path(&format!("{name}.crt"))).unwrap();
            pem.extend(std::fs::read(pki.path(&format!("{name}.key"))).unwrap());
            client = client.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        let scheme = if name.is_some() { "https" } else { "http" };
        let url = format!(
            "{scheme}://127.0.0.1:{}/internal/chat/rooms",
            sidecar.addr.port()
        );
        async move {
            client
                .build()
                .unwrap()
                .get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    };
    assert_eq!(
        get(pki, Some("chat")).await.unwrap(),
        200,
        "the required identity"
    );
    assert_eq!(
        get(pki, Some("video")).await.unwrap(),
        403,
        "another service"
    );
    assert_eq!(get(pki, None).await.unwrap(), 403, "plaintext: no identity");
    let foreign = crate::support::TestPki::new();
    foreign.issue("chat", &format!("URI:{CHAT}"));
    assert!(
        get(&foreign, Some("chat")).await.is_err(),
        "a certificate from another CA is refused in the handshake"
    );
}

/// In both shipped gateways, what Envoy itself asks auth-service (ext_authz
/// Checks; the edge's deny maps) goes over a cluster that no route sends
/// requests to: the API calls — among them the logins and sign-ups that
/// auth-service holds for a second when it refuses them — can neither fill
/// the Checks' circuit breaker nor queue the Checks behind them.
#[test]
fn what_envoy_asks_itself_has_clusters_no_route_shares() {
    fn walk(value: &serde_yaml::Value, routed: &mut Vec<String>, asked: &mut Vec<String>) {
        match value {
            serde_yaml::Value::Mapping(map) => {
                for (key, inner) in map {
                    let cluster = |field: &str| inner.get(field)?.as_str().map(str::to_owned);
                    match key.as_str() {
                        Some("route") => routed.extend(cluster("cluster")),
                        Some("envoy_grpc") => asked.extend(cluster("cluster_name")),
                        _ => {}
                    }
                    walk(inner, routed, asked);
                }
            }
            serde_yaml::Value::Sequence(items) => {
                for item in items {
                    walk(item, routed, asked);
                }
            }
            _ => {}
        }
    }
    for file in ["gateway.yaml", "edge.yaml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("envoy")
            .join(file);
        let config: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let (mut routed, mut asked) = (Vec::new(), Vec::new());
        walk(&config, &mut routed, &mut asked);
        for api in ["auth_grpc", "auth_logins"] {
            assert!(routed.iter().any(|c| c == api), "{file}: no route to {api}");
        }
        assert!(
            asked.iter().any(|c| c == "auth_checks"),
            "{file}: ext_authz does not use auth_checks"
        );
        for cluster in &asked {
            assert!(
                !routed.contains(cluster),
                "{file}: {cluster} carries both Envoy's own calls and routed requests"
            );
        }
    }
}

/// Failure class: input from the wrong party. An outside caller's own
/// `grpc-timeout` would bound auth-service's hold of a refusal (a short one
/// gets its refusal at once, so a closed loop could spin on refusals
/// again): the gateway does not pass it on, and the refusal is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_short_deadline_does_not_reach_auth_service_and_its_refusal_is_held() {
    let stack = Stack::start(|c| c.lockout.max_failures_per_account = 1).await;
    stack.user("lena").await;
    let wrong = serde_json::json!({ "login": "lena", "password": "a wrong guess" }).to_string();
    let locked = serde_json::json!({ "login": "lena", "password": PASSWORD }).to_string();
    let first = http(
        stack.gateway.addr,
        "POST",
        "/v1/auth/login",
        &[],
        Some(&wrong),
    )
    .await;
    assert_eq!(first.status, 401, "{first:?}");
    // REST: the transcoder turns it into a call on gRPC's Login route, the
    // route gRPC callers take too.
    for _ in 0..2 {
        let r = http(
            stack.gateway.addr,
            "POST",
            "/v1/auth/login",
            &[("grpc-timeout", "50m")],
            Some(&locked),
        )
        .await;
        assert_eq!(r.status, 429, "the locked-out login was not refused: {r:?}");
    }
    assert_eq!(
        stack
            .app
            .metric("refusals_held_total{outcome=\"deadline\"}")
            .await,
        0.0,
        "a caller's deadline reached auth-service"
    );
    assert_eq!(
        stack
            .app
            .metric("refusals_held_total{outcome=\"held\"}")
            .await,
        2.0
    );
}

/// Every rendered deployment of the gateway (k8s/base, the production and
/// edge overlays) bounds Envoy's own heap in the config file its container
/// runs, below that container's memory limit, and refuses new requests
/// before reaching it: a flood of held logins (or of open connections) gets
/// 503s, not an OOM kill that drops every connection at once. Held logins
/// and sign-ups have a circuit breaker of their own.
#[test]
fn the_gateways_heap_bound_is_inside_its_pods_memory_limit() {
    for dir in ["k8s/base", "k8s/overlays/production", "k8s/overlays/edge"] {
        let docs = crate::k8s::render(dir);
        let deployment = crate::k8s::object(&docs, "Deployment", "envoy-gateway");
        let envoy = deployment["spec"]["template"]["spec"]["containers"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "envoy"))
            .unwrap_or_else(|| panic!("{dir}: no envoy container"));
        let limit = envoy["resources"]["limits"]["memory"]
            .as_str()
            .unwrap_or_else(|| panic!("{dir}: the envoy container has no memory limit"));
        let limit_bytes: u64 = limit
            .strip_suffix("Mi")
            .map(|n| n.parse::<u64>().unwrap() << 20)
            .or_else(|| {
                limit
                    .strip_suffix("Gi")
                    .map(|n| n.parse::<u64>().unwrap() << 30)
            })
            .expect("a limit in Mi or Gi");
        // The file the container runs (`-c PATH`), from the ConfigMap that
        // holds it.
        let args: Vec<&str> = envoy["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        let path = args[args.iter().position(|a| *a == "-c").unwrap() + 1];
        let file = path.rsplit('/').next().unwrap();
        let text = docs
            .iter()
            .filter(|d| d["kind"] == "ConfigMap")
            .find_map(|d| d["data"][file].as_str())
            .unwrap_or_else(|| panic!("{dir}: no ConfigMap holds {file}"));
        let config: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
        let overload = &config["overload_manager"];
        let heap = overload["resource_monitors"]
            .as_sequence()
            .and_then(|m| {
                m.iter()
                    .find(|m| m["name"] == "envoy.resource_monitors.fixed_heap")
            })
            .and_then(|m| m["typed_config"]["max_heap_size_bytes"].as_u64())
            .unwrap_or_else(|| panic!("{dir} {file}: no heap bound"));
        assert!(
            heap < limit_bytes,
            "{dir} {file}: heap bound {heap} is not below the pod's limit {limit}"
        );
        let refuses = overload["actions"].as_sequence().is_some_and(|actions| {
            actions.iter().any(|a| {
                a["name"] == "envoy.overload_actions.stop_accepting_requests"
                    && a["triggers"][0]["threshold"]["value"]
                        .as_f64()
                        .is_some_and(|v| v < 1.0)
            })
        });
        assert!(
            refuses,
            "{dir} {file}: no refusal of new requests before the heap bound"
        );
        let logins_breaker = config["static_resources"]["clusters"]
            .as_sequence()
            .and_then(|c| c.iter().find(|c| c["name"] == "auth_logins"))
            .and_then(|c| c["circuit_breakers"]["thresholds"][0]["max_requests"].as_u64())
            .unwrap_or_else(|| panic!("{dir} {file}: auth_logins has no breaker"));
        assert!(
            logins_breaker >= 3 * 512,
            "{dir} {file}: the logins' breaker is below what three replicas hold"
        );
    }
}

/// The gateway's overload manager is wired as shipped: with its heap bound
/// set below what Envoy already uses (the only change to the file), Envoy
/// answers requests 503 `envoy overloaded` instead of passing them on, and
/// says so in its stats. With the shipped bound (384 MiB) the same gateway
/// serves every other test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_heap_bound_the_gateway_refuses_new_requests() {
    let app = TestApp::spawn_with(Backend::Embedded, mesh_tls).await;
    let backend = echo_backend().await;
    let descriptor = descriptor_file();
    let mut replacements = gateway_replacements(&app, backend, &descriptor);
    replacements.push((
        "max_heap_size_bytes: 402653184",
        "max_heap_size_bytes: 1048576".to_owned(),
    ));
    let gateway = Envoy::start("gateway.yaml", 8080, &replacements).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = http(gateway.addr, "GET", "/healthz", &[], None).await;
        if r.status == 503 && r.body.contains("envoy overloaded") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never refused for its heap: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        gateway
            .stat("overload.envoy.overload_actions.stop_accepting_requests.active")
            .await,
        Some(1)
    );
}
