//! ext_authz Check called directly (what Envoy sends), on one replica and
//! across two replicas sharing Redis.

use auth_service::{grpc::pb, ratelimit::quota::Limit};
use envoy_types::{
    ext_authz::v3::pb::{CheckRequest, HttpResponse},
    pb::envoy::service::auth::v3::{
        AttributeContext, attribute_context, authorization_client::AuthorizationClient,
    },
};
use tonic::Code;

use crate::{
    on_both_backends,
    support::{Backend, TestApp, channel},
};

/// A CheckRequest as Envoy sends it for `method path` with `headers`.
pub(crate) fn check(method: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// (gRPC status code inside the CheckResponse, HTTP status of a denial).
pub(crate) async fn decide(app: &TestApp, request: CheckRequest) -> (i32, Option<i32>) {
    let mut client = AuthorizationClient::new(channel(app.grpc_addr).await);
    let response = client
        .check(request)
        .await
        .expect("a decision is a successful RPC")
        .into_inner();
    let http = match response.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d.status.map(|s| s.code),
        _ => None,
    };
    (response.status.unwrap().code, http)
}

on_both_backends! {
    async fn check_allows_public_routes_and_valid_tokens_and_denies_the_rest(app) {
        app.sign_up("ann").await;
        let pair = app.login_ok("ann").await;
        let auth = format!("Bearer {}", pair.access_token);
        assert_eq!(decide(&app, check("POST", "/v1/users", &[])).await, (0, None));
        assert_eq!(decide(&app, check("POST", "/v1/auth/login?x=1", &[("authorization", "Bearer junk")])).await, (0, None));
        assert_eq!(decide(&app, check("GET", "/api/x", &[])).await, (Code::Unauthenticated as i32, Some(401)));
        assert_eq!(decide(&app, check("GET", "/api/x", &[("authorization", &auth)])).await, (0, None));
        assert_eq!(decide(&app, check("GET", "/v1/admin/users", &[("authorization", &auth)])).await, (Code::PermissionDenied as i32, Some(403)));
        // Revoked on the very next Check.
        app.client.logout(crate::support::bearer(pb::LogoutRequest::default(), &pair.access_token)).await.unwrap();
        assert_eq!(decide(&app, check("GET", "/api/x", &[("authorization", &auth)])).await, (Code::Unauthenticated as i32, Some(401)));
    }

    async fn a_check_request_without_http_attributes_is_the_only_rpc_error(app) {
        let mut client = AuthorizationClient::new(channel(app.grpc_addr).await);
        let status = client.check(CheckRequest::default()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
}

/// Two replicas share one GCRA in Redis: one IP's burst of 20 (refill once
/// an hour) is admitted about once overall, not once per replica. Each
/// replica may hold up to a lease (2 tokens here) unspent, so the total is
/// within [20 - 2 * 2, 20].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_rate_limit_within_the_lease_bound() {
    let slow = Limit {
        requests: 1,
        per_secs: 3600,
        burst: 20,
    };
    let a = TestApp::spawn_with(Backend::Production, |c| {
        c.authz.rate_limits.get_mut("public").unwrap().per_ip = Some(slow)
    })
    .await;
    let b = a.replica().await;
    let mut admitted = 0;
    for i in 0..100 {
        let app = if i % 2 == 0 { &a } else { &b };
        let (code, _) = decide(
            app,
            check("POST", "/v1/users", &[("x-forwarded-for", "192.0.2.77")]),
        )
        .await;
        admitted += u32::from(code == 0);
    }
    let lease = slow.lease();
    assert!(
        (20 - 2 * lease..=20).contains(&admitted),
        "admitted {admitted}"
    );
    // Another IP is unaffected.
    assert_eq!(
        decide(
            &a,
            check("POST", "/v1/users", &[("x-forwarded-for", "192.0.2.78")])
        )
        .await
        .0,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_check_listener_serves_only_ext_authz() {
    let app = TestApp::spawn_with(Backend::Embedded, |c| {
        c.authz.check_addr = Some("127.0.0.1:0".parse().unwrap())
    })
    .await;
    let addr = app.check_addr.expect("the check listener is bound");
    let mut authz = AuthorizationClient::new(channel(addr).await);
    let response = authz
        .check(check("GET", "/api/x", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.status.unwrap().code, Code::Unauthenticated as i32);
    let mut api = pb::auth_service_client::AuthServiceClient::new(channel(addr).await);
    let status = api
        .validate_token(pb::ValidateTokenRequest { token: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unimplemented,
        "the account API stays on grpc_addr"
    );
}

/// `request` with the downstream client's certificate (URL-encoded PEM) and
/// principal, as Envoy fills `attributes.source`.
pub(crate) fn from_downstream(
    mut request: CheckRequest,
    certificate: String,
    principal: &str,
) -> CheckRequest {
    let source = request
        .attributes
        .as_mut()
        .unwrap()
        .source
        .get_or_insert_default();
    source.certificate = certificate;
    source.principal = principal.into();
    request
}

/// The PEM of `name.crt` URL-encoded, as Envoy forwards a downstream client
/// certificate with `include_peer_certificate` (every byte outside the
/// unreserved set escaped: `+`, `/`, `=` and newlines included).
pub(crate) fn url_encoded_pem(pki: &crate::support::TestPki, name: &str) -> String {
    let pem = std::fs::read(pki.path(&format!("{name}.crt"))).unwrap();
    pem.iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_can_require_the_downstream_service_identity() {
    const CHAT: &str = "spiffe://immersiverse/ns/chat/sa/chat";
    let pki = crate::support::TestPki::new();
    pki.issue("chat", &format!("URI:{CHAT}"));
    pki.issue("video", "URI:spiffe://immersiverse/ns/video/sa/video");
    let app = TestApp::spawn_with(Backend::Embedded, |c| {
        let mut rule = crate::support::service_only_route("/internal/chat/**", CHAT);
        c.authz.routes.insert(0, rule.clone());
        rule.path = "/internal/open/**".into();
        rule.services.clear();
        c.authz.routes.insert(0, rule);
    })
    .await;
    let from = |certificate: String, principal: &str| {
        from_downstream(
            check("GET", "/internal/chat/rooms", &[]),
            certificate,
            principal,
        )
    };
    let forbidden = (Code::PermissionDenied as i32, Some(403));
    assert_eq!(
        decide(&app, from(url_encoded_pem(&pki, "chat"), "")).await,
        (0, None)
    );
    assert_eq!(
        decide(&app, from(url_encoded_pem(&pki, "video"), "")).await,
        forbidden
    );
    assert_eq!(
        decide(&app, from(String::new(), "")).await,
        forbidden,
        "no identity"
    );
    // Without the certificate, Envoy's principal for the peer names it.
    assert_eq!(decide(&app, from(String::new(), CHAT)).await, (0, None));
    // The certificate wins over a principal that disagrees with it.
    assert_eq!(
        decide(&app, from(url_encoded_pem(&pki, "video"), CHAT)).await,
        forbidden
    );
    assert_eq!(
        decide(&app, from("%ZZnot a certificate".into(), CHAT)).await,
        forbidden
    );
    // A route without `services` does not care.
    let mut open = from(String::new(), "");
    open.attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap()
        .path = "/internal/open/x".into();
    assert_eq!(decide(&app, open).await, (0, None));
}
