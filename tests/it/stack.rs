//! The one layer stack every gRPC listener serves behind (`grpc::stack`),
//! seen from outside the real binary: request ids, the access log with its
//! principal, per-session call limits, and metric labels bounded to the
//! methods served.

use auth_service::grpc::pb;
use tonic::Code;

use crate::{
    process,
    support::{PASSWORD, bearer, channel, http_get},
};

/// The `rpc` lines of a JSON log.
fn access_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "rpc")
        .map(|l| l["fields"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_has_a_request_id_one_access_line_with_its_principal_and_session_limits_per_session()
 {
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(
        cwd.path().join("auth.toml"),
        "[rpc.session_limits]\nGetMe = { requests = 1, per_secs = 3600, burst = 2 }\n",
    )
    .unwrap();
    let mut server = process::start(
        cwd.path(),
        &[("AUTH_CONFIG", "auth.toml"), ("AUTH_LOG_FORMAT", "json")],
    );
    server.ready().await;
    let mut client = server.client().await;
    let user = process::sign_up(&mut client, "stacky").await;
    let first = process::login(&mut client, "stacky").await;
    let second = process::login(&mut client, "stacky").await;

    // The caller's request id is kept and echoed; a malformed one replaced.
    let mut request = bearer(pb::GetMeRequest {}, &first.access_token);
    request
        .metadata_mut()
        .insert("x-request-id", "req-me-1".parse().unwrap());
    let answer = client.get_me(request).await.unwrap();
    assert_eq!(answer.metadata().get("x-request-id").unwrap(), "req-me-1");
    assert_eq!(answer.into_inner().id, user.id);
    let mut request = bearer(pb::GetMeRequest {}, &first.access_token);
    request
        .metadata_mut()
        .insert("x-request-id", "no spaces allowed".parse().unwrap());
    let answer = client.get_me(request).await.unwrap();
    let replaced = answer
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(uuid::Uuid::parse_str(replaced).is_ok(), "{replaced}");

    // Burst 2 per session: the third GetMe of this session is refused with
    // retry-after; another session of the same user, and another method of
    // this one, are not.
    let refused = client
        .get_me(bearer(pb::GetMeRequest {}, &first.access_token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let retry: u64 = refused
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");
    assert!(refused.metadata().get("x-request-id").is_some());
    client
        .get_me(bearer(pb::GetMeRequest {}, &second.access_token))
        .await
        .expect("another session has its own count");
    client
        .list_platform_accounts(bearer(
            pb::ListPlatformAccountsRequest {},
            &first.access_token,
        ))
        .await
        .expect("another method is not limited");
    let invalid = client
        .get_me(bearer(pb::GetMeRequest {}, "not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::Unauthenticated);

    // A path this process does not serve: Unimplemented, counted under
    // `unknown` (callers cannot grow the metric label space).
    let mut grpc = tonic::client::Grpc::new(channel(server.grpc).await);
    grpc.ready().await.unwrap();
    let made_up: Result<tonic::Response<pb::GetMeRequest>, tonic::Status> = grpc
        .unary(
            tonic::Request::new(pb::GetMeRequest {}),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/immersiverse.auth.v1.AuthService/MadeUp",
            ),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_eq!(made_up.unwrap_err().code(), Code::Unimplemented);
    let (_, metrics) = http_get(server.http, "/metrics").await;
    for expected in [
        r#"grpc_server_requests_total{service="immersiverse.auth.v1.AuthService",method="GetMe",code="OK"} 3"#,
        r#"grpc_server_requests_total{service="immersiverse.auth.v1.AuthService",method="GetMe",code="ResourceExhausted"} 1"#,
        r#"grpc_server_requests_total{service="immersiverse.auth.v1.AuthService",method="GetMe",code="Unauthenticated"} 1"#,
        r#"grpc_server_requests_total{service="unknown",method="unknown",code="Unimplemented"} 1"#,
        r#"grpc_session_limited_total{method="GetMe"} 1"#,
    ] {
        assert!(metrics.contains(expected), "missing {expected}");
    }
    assert!(!metrics.contains("MadeUp"));

    server.signal("TERM");
    assert!(server.wait_exit().success());
    let log = std::fs::read_to_string(cwd.path().join("server.out")).unwrap();
    for secret in [
        PASSWORD,
        first.access_token.as_str(),
        first.refresh_token.as_str(),
        second.access_token.as_str(),
        "not-a-token",
    ] {
        assert!(!log.contains(secret), "the log holds a secret");
    }
    let lines = access_lines(&log);
    let me = lines
        .iter()
        .find(|l| l["request_id"] == "req-me-1")
        .unwrap_or_else(|| panic!("no access line for req-me-1 in {lines:?}"));
    assert_eq!(me["rpc.method"], "GetMe");
    assert_eq!(me["code"], "OK");
    assert_eq!(me["principal"], format!("user:{}", user.id));
    assert_eq!(me["client_ip"], "127.0.0.1");
    assert!(me["latency_us"].as_u64().is_some());
    let count = |method: &str, code: &str| {
        lines
            .iter()
            .filter(|l| l["rpc.method"] == method && l["code"] == code)
            .count()
    };
    assert_eq!(count("GetMe", "OK"), 3, "{lines:?}");
    assert_eq!(count("GetMe", "ResourceExhausted"), 1);
    assert_eq!(count("Login", "OK"), 2);
    assert_eq!(count("CreateUser", "OK"), 1);
    let invalid = lines
        .iter()
        .find(|l| l["rpc.method"] == "GetMe" && l["code"] == "Unauthenticated")
        .unwrap();
    assert_eq!(invalid["principal"], "invalid-token");
    let sign_up = lines
        .iter()
        .find(|l| l["rpc.method"] == "CreateUser")
        .unwrap();
    assert_eq!(sign_up["principal"], "anonymous");
    let ids: std::collections::HashSet<&str> = lines
        .iter()
        .filter_map(|l| l["request_id"].as_str())
        .collect();
    assert_eq!(ids.len(), lines.len(), "every call has its own request id");
}

#[test]
fn a_session_limit_on_a_method_that_does_not_exist_stops_start_up() {
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(
        cwd.path().join("auth.toml"),
        "[rpc.session_limits]\nGetMee = { requests = 1, per_secs = 60, burst = 1 }\n",
    )
    .unwrap();
    let output = std::process::Command::new(crate::support::service_bin())
        .current_dir(cwd.path())
        .env_clear()
        .env("AUTH_CONFIG", "auth.toml")
        .env("AUTH_GRPC_ADDR", "127.0.0.1:0")
        .env("AUTH_HTTP_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("rpc.session_limits.GetMee"), "{stderr}");
}
