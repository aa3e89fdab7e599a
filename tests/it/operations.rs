//! Health, reflection, the admin HTTP port, backend failures and hash upgrades.

use std::time::Duration;

use auth_service::{accounts::model::LoginName, grpc::pb};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    on_both_backends,
    support::{Backend, OwnRedis, TestApp, channel, config_for},
};

on_both_backends! {
    async fn grpc_health_is_serving_and_reflection_lists_the_service(app) {
        let mut health = HealthClient::new(channel(app.grpc_addr).await);
        for service in ["", "immersiverse.auth.v1.AuthService"] {
            let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
            assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
        }
        use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest, server_reflection_response::MessageResponse};
        let mut reflection = ServerReflectionClient::new(channel(app.grpc_addr).await);
        let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
        let mut stream = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
        let response = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else { panic!("unexpected {response:?}") };
        for name in ["immersiverse.auth.v1.AuthService", "grpc.health.v1.Health", "envoy.service.auth.v3.Authorization"] {
            assert!(list.service.iter().any(|s| s.name == name), "{name}: {list:?}");
        }
        // Listed and described: the file declaring Check, then every file it
        // imports, transitively (what `grpcurl describe` fetches).
        use prost::Message as _;
        let mut wanted = vec![MessageRequest::FileContainingSymbol("envoy.service.auth.v3.Authorization.Check".into())];
        let mut seen = std::collections::BTreeSet::new();
        while let Some(message_request) = wanted.pop() {
            let request = ServerReflectionRequest { host: String::new(), message_request: Some(message_request.clone()) };
            let mut stream = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
            let response = stream.message().await.unwrap().unwrap();
            let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else { panic!("{message_request:?}: {response:?}") };
            for raw in &files.file_descriptor_proto {
                let file = prost_types::FileDescriptorProto::decode(raw.as_slice()).unwrap();
                for dependency in &file.dependency {
                    if seen.insert(dependency.clone()) {
                        wanted.push(MessageRequest::FileByFilename(dependency.clone()));
                    }
                }
                seen.insert(file.name().to_owned());
            }
        }
        for name in ["envoy/service/auth/v3/external_auth.proto", "envoy/service/auth/v3/attribute_context.proto", "envoy/config/core/v3/base.proto", "google/rpc/status.proto"] {
            assert!(seen.contains(name), "{name}: {seen:?}");
        }
    }

    async fn the_admin_port_serves_health_readiness_metrics_and_jwks(app) {
        assert_eq!(app.http_get("/healthz").await, (200, "ok".to_owned()));
        assert_eq!(app.http_get("/readyz").await.0, 200);
        app.sign_up("mia").await;
        app.login_ok("mia").await;
        app.login("mia", "wrong password").await.unwrap_err();
        let (status, metrics) = app.http_get("/metrics").await;
        assert_eq!(status, 200);
        for expected in [
            r#"grpc_server_requests_total{service="immersiverse.auth.v1.AuthService",method="CreateUser",code="OK"}"#,
            r#"grpc_server_requests_total{service="immersiverse.auth.v1.AuthService",method="Login",code="Unauthenticated"}"#,
            r#"login_attempts_total{outcome="success"}"#,
            "grpc_server_request_duration_seconds_bucket",
        ] {
            assert!(metrics.contains(expected), "missing {expected}");
        }
        let (status, jwks) = app.http_get("/.well-known/jwks.json").await;
        assert_eq!(status, 200);
        assert!(jwks.contains(r#""crv":"Ed25519""#) && !jwks.contains(r#""d":"#));
        assert_eq!(app.http_get("/nope").await.0, 404);
    }

    async fn a_login_with_old_argon2_parameters_upgrades_the_stored_hash(app) {
        app.sign_up("nina").await;
        let backend = app.backend;
        let (mut config, dir) = app.stop().await;
        config.password.memory_kib = 2048;
        let mut app = TestApp::start(backend, config, dir).await;
        let login = LoginName::parse("login", "nina").unwrap();
        let before = app.database.users.find_credentials(&login).await.unwrap().unwrap().password_hash;
        assert!(before.contains("m=1024"), "{before}");
        app.login_ok("nina").await;
        let after = app.database.users.find_credentials(&login).await.unwrap().unwrap().password_hash;
        assert!(after.contains("m=2048,t=1,p=1"), "{after}");
        app.login_ok("nina").await;
    }
}

/// Redis is the shared revocation truth in production: without it a token
/// cannot be proven unrevoked, so ValidateToken fails closed (Unavailable),
/// except for a token this replica checked within `revocation.cache_ttl_ms`.
/// Login fails closed too (the lockout counters live there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_dies_validation_and_login_fail_closed_with_unavailable() {
    let mut redis = OwnRedis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(Backend::Production, dir.path()).await;
    config.redis_url = Some(redis.url.clone());
    config.revocation.cache_ttl_ms = 60_000;
    let mut app = TestApp::start(Backend::Production, config, dir).await;
    app.sign_up("olga").await;
    let checked = app.login_ok("olga").await;
    let unchecked = app.login_ok("olga").await;
    app.validate(&checked.access_token).await.unwrap();

    redis.kill();

    let status = app.validate(&unchecked.access_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        !status.message().contains("redis://"),
        "no internals: {}",
        status.message()
    );
    app.validate(&checked.access_token)
        .await
        .expect("served from this replica's cache within its TTL");
    let status = app
        .login("olga", crate::support::PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(app.http_get("/readyz").await.0, 503);
    // The database still works: sign-up does not need Redis.
    app.client
        .create_user(pb::CreateUserRequest {
            email: "p@example.com".into(),
            username: "pete".into(),
            password: crate::support::PASSWORD.into(),
        })
        .await
        .expect("sign-up does not depend on Redis");
}

/// A production configuration whose PostgreSQL is reached through a
/// [`Cutter`](crate::support::Cutter) the test controls.
pub(crate) async fn postgres_behind_a_cutter(
    dir: &std::path::Path,
) -> (auth_service::config::Config, crate::support::Cutter) {
    let mut config = config_for(Backend::Production, dir).await;
    let url = config.database_url.clone().unwrap();
    let (scheme_host, db) = url.rsplit_once('/').unwrap();
    let (prefix, host_port) = scheme_host.rsplit_once('@').unwrap();
    let target: std::net::SocketAddr = host_port.parse().unwrap();
    let cutter = crate::support::Cutter::start(target).await;
    config.database_url = Some(format!("{prefix}@{}/{db}", cutter.addr));
    (config, cutter)
}

/// PostgreSQL cut off mid-run: calls that need it answer Unavailable within
/// `database_timeout_ms`, readiness fails and gRPC health turns NOT_SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_postgres_is_cut_off_calls_answer_unavailable_and_health_turns_not_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, cutter) = postgres_behind_a_cutter(dir.path()).await;
    config.database_timeout_ms = 500;
    let mut app = TestApp::start(Backend::Production, config, dir).await;
    app.sign_up("quinn").await;

    cutter.cut();

    let status = app
        .client
        .create_user(pb::CreateUserRequest {
            email: "r@example.com".into(),
            username: "rita".into(),
            password: crate::support::PASSWORD.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        !status.message().contains("127.0.0.1"),
        "no internals: {}",
        status.message()
    );
    let status = app
        .login("quinn", crate::support::PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(app.http_get("/readyz").await.0, 503);
    let mut health = HealthClient::new(channel(app.grpc_addr).await);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == ServingStatus::NotServing as i32 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health still {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// PostgreSQL stops answering on connections that stay open (a hung server
/// or a network that drops packets): a call that needs it still ends, with
/// Unavailable, within the request timeout; calls that do not need it go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_postgres_goes_silent_calls_end_unavailable_within_the_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, cutter) = postgres_behind_a_cutter(dir.path()).await;
    config.database_timeout_ms = 500;
    config.limits.request_timeout_ms = 1500;
    let mut app = TestApp::start(Backend::Production, config, dir).await;
    app.sign_up("sam").await;
    let token = app.login_ok("sam").await.access_token;

    cutter.silence();

    // Without a bound the call would wait as long as the silence lasts.
    let call = app.client.create_user(pb::CreateUserRequest {
        email: "t@example.com".into(),
        username: "tess".into(),
        password: crate::support::PASSWORD.into(),
    });
    let status = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the call ended")
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Token validation does not touch the database.
    app.validate(&token).await.expect("validation goes on");
}
