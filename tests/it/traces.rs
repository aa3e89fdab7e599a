//! OpenTelemetry against a real OTLP receiver (the collector's gRPC
//! `TraceService/Export`, served here from the `opentelemetry-proto`
//! definitions): the real binary continues a caller's `traceparent` in a
//! server span per RPC, continues the trace carried inside an ext_authz
//! CheckRequest, and hands its own span's context to the outbox event (and
//! so to the Kafka message's headers).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use auth_service::grpc::pb;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};

use crate::{
    process::start,
    support::{PASSWORD, Tansu, channel, header},
};

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    async fn start() -> (Self, std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Self::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, addr)
    }

    /// The first span named `name`, waiting for the batch export.
    async fn span(&self, name: &str) -> (String, Span) {
        self.span_where(name, |_| true).await
    }

    /// The first span named `name` that `pick` accepts, waiting for the
    /// batch export.
    async fn span_where(&self, name: &str, pick: impl Fn(&Span) -> bool) -> (String, Span) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(found) = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .find(|(_, s)| s.name == name && pick(s))
            {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no span {name} exported; got {:?}",
                self.names()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The first span (with its service) that `pick` accepts, waiting for
    /// the batch export.
    async fn first(&self, what: &str, pick: impl Fn(&str, &Span) -> bool) -> Span {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((_, found)) = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .find(|(service, s)| pick(service, s))
            {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {what} exported; got {:?}",
                self.names()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The first Redis client span under `ancestor`, waiting for the batch
    /// export.
    async fn redis_under(&self, ancestor: &Span) -> Span {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let redis: Vec<Span> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, s)| {
                    s.trace_id == ancestor.trace_id
                        && attributes(s).get("db.system.name").map(String::as_str) == Some("redis")
                })
                .map(|(_, s)| s.clone())
                .collect();
            if let Some(span) = redis.into_iter().find(|s| self.descends(s, ancestor)) {
                return span;
            }
            assert!(
                Instant::now() < deadline,
                "no Redis span under {}; got {:?}",
                ancestor.name,
                self.names()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether `ancestor` is `span`'s parent, or a parent of its parent…
    fn descends(&self, span: &Span, ancestor: &Span) -> bool {
        let spans = self.spans.lock().unwrap();
        let mut parent = span.parent_span_id.clone();
        while !parent.is_empty() {
            if parent == ancestor.span_id {
                return true;
            }
            match spans.iter().find(|(_, s)| s.span_id == parent) {
                Some((_, s)) => parent = s.parent_span_id.clone(),
                None => return false,
            }
        }
        false
    }

    fn names(&self) -> Vec<String> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.name.clone())
            .collect()
    }
}

fn attributes(span: &Span) -> BTreeMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";
const ENVOY_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const ENVOY_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_and_check_spans_continue_the_callers_trace_into_the_event() {
    let (receiver, otlp) = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let endpoint = format!("http://{otlp}");
    let mut server = start(
        dir.path(),
        &[
            ("AUTH_DATA_DIR", &data),
            ("AUTH_OTEL__ENDPOINT", &endpoint),
            (
                "AUTH_OTEL__RESOURCE_ATTRIBUTES__DEPLOYMENT_ENVIRONMENT",
                "test",
            ),
            ("AUTH_PASSWORD__MEMORY_KIB", "1024"),
            ("AUTH_PASSWORD__ITERATIONS", "1"),
            // Export every 200 ms instead of 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("AUTH_LOG_FORMAT", "json"),
        ],
    );
    server.ready().await;

    let mut client = server.client().await;
    let mut request = tonic::Request::new(pb::CreateUserRequest {
        email: "traced@example.com".into(),
        username: "traced".into(),
        password: PASSWORD.into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    client.create_user(request).await.unwrap();

    let (service, span) = receiver
        .span("immersiverse.auth.v1.AuthService/CreateUser")
        .await;
    assert_eq!(service, "auth-service");
    assert_eq!(hex::encode(&span.trace_id), TRACE, "the caller's trace");
    assert_eq!(
        hex::encode(&span.parent_span_id),
        CALLER_SPAN,
        "the caller's span is the parent"
    );
    assert_eq!(span.kind, 2, "SPAN_KIND_SERVER");
    let attrs = attributes(&span);
    assert_eq!(attrs.get("rpc.system").map(String::as_str), Some("grpc"));
    assert_eq!(
        attrs.get("rpc.method").map(String::as_str),
        Some("CreateUser")
    );
    assert_eq!(
        attrs.get("rpc.service").map(String::as_str),
        Some("immersiverse.auth.v1.AuthService")
    );

    // The event continues the server span (the relay copies it into the
    // Kafka message's `traceparent` header).
    use sqlx::{Connection, Row};
    let url = format!("sqlite://{}", dir.path().join("auth.db").display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let row = sqlx::query("SELECT traceparent FROM outbox WHERE event_type = 'user_created'")
        .fetch_one(&mut db)
        .await
        .unwrap();
    let traceparent: String = row.get(0);
    assert_eq!(
        traceparent,
        format!("00-{TRACE}-{}-01", hex::encode(&span.span_id))
    );

    // ext_authz: the client request's trace travels inside the
    // CheckRequest's headers (Envoy forwards `traceparent`).
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let mut authz = AuthorizationClient::new(channel(server.grpc).await);
    let traceparent = format!("00-{ENVOY_TRACE}-{ENVOY_SPAN}-01");
    authz
        .check(crate::authz::check(
            "POST",
            "/v1/users",
            &[("traceparent", traceparent.as_str())],
        ))
        .await
        .unwrap();
    let (_, check) = receiver.span("authz.check").await;
    assert_eq!(hex::encode(&check.trace_id), ENVOY_TRACE);
    assert_eq!(hex::encode(&check.parent_span_id), ENVOY_SPAN);
    let (_, rpc) = receiver
        .span("envoy.service.auth.v3.Authorization/Check")
        .await;
    assert_eq!(rpc.kind, 2);

    // Log lines inside a traced call carry its trace and span ids.
    let log = std::fs::read_to_string(dir.path().join("server.out")).unwrap();
    let created = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "user created")
        .unwrap_or_else(|| panic!("a JSON log line for the sign-up:\n{log}"));
    let grpc = created["spans"]
        .as_array()
        .and_then(|spans| spans.iter().find(|s| s["name"] == "grpc"))
        .unwrap_or_else(|| panic!("the call's span is listed: {created}"));
    assert_eq!(grpc["trace_id"], TRACE, "{created}");
    assert_eq!(grpc["span_id"], hex::encode(&span.span_id), "{created}");
}

/// The trace goes on through Kafka: a sign-up's span has children for the
/// password hashing and for the Kafka send made by the event worker (another
/// process), whose context is the message's `traceparent`; a lifecycle
/// message carrying a `traceparent` is processed in a consumer span of that
/// trace, and the event that processing writes is sent as its child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_send_and_the_lifecycle_consumer_continue_the_trace() {
    let tansu = Tansu::start().await;
    let (receiver, otlp) = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let endpoint = format!("http://{otlp}");
    // PostgreSQL and Redis: the consumer runs in the supervised worker
    // process, which revokes through Redis.
    let database_url = crate::support::fresh_postgres_url().await;
    let redis_url = crate::support::env_url("TEST_REDIS_URL");
    let prefix = format!("t{}:", uuid::Uuid::new_v4().simple());
    let mut server = start(
        dir.path(),
        &[
            ("AUTH_DATA_DIR", &data),
            ("AUTH_DATABASE_URL", &database_url),
            ("AUTH_REDIS_URL", &redis_url),
            ("AUTH_REDIS_KEY_PREFIX", &prefix),
            ("AUTH_OTEL__ENDPOINT", &endpoint),
            ("AUTH_KAFKA_BROKERS", &tansu.brokers),
            ("AUTH_KAFKA__TOPIC_PARTITIONS", "1"),
            ("AUTH_KAFKA__RELAY_IDLE_MS", "20"),
            ("AUTH_PASSWORD__MEMORY_KIB", "1024"),
            ("AUTH_PASSWORD__ITERATIONS", "1"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    server.ready().await;

    let mut client = server.client().await;
    let mut request = tonic::Request::new(pb::CreateUserRequest {
        email: "kafkatraced@example.com".into(),
        username: "kafkatraced".into(),
        password: PASSWORD.into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    let user = client
        .create_user(request)
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    let (_, rpc) = receiver
        .span("immersiverse.auth.v1.AuthService/CreateUser")
        .await;
    let (_, hash) = receiver.span("password.hash").await;
    assert_eq!(hex::encode(&hash.trace_id), TRACE);
    assert!(receiver.descends(&hash, &rpc), "hashing is inside the call");
    // The sign-up's transaction (user row and outbox row) is a database
    // client span of the call.
    let (_, insert) = receiver.span("insert_user").await;
    assert!(
        receiver.descends(&insert, &rpc),
        "the insert is inside the call"
    );
    assert_eq!(insert.kind, 3, "SPAN_KIND_CLIENT");
    let attrs = attributes(&insert);
    assert_eq!(
        attrs.get("db.system.name").map(String::as_str),
        Some("postgresql")
    );
    assert_eq!(
        attrs.get("db.operation.name").map(String::as_str),
        Some("insert_user")
    );

    // A traced login: its Redis calls (the failure counters) are children.
    let mut login = tonic::Request::new(pb::LoginRequest {
        login: "kafkatraced".into(),
        password: PASSWORD.into(),
        ..Default::default()
    });
    login.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    client.login(login).await.unwrap();
    let (_, login) = receiver
        .span("immersiverse.auth.v1.AuthService/Login")
        .await;
    let (_, verify) = receiver.span("password.verify").await;
    assert!(receiver.descends(&verify, &login));
    let (_, lookup) = receiver.span("find_credentials").await;
    assert!(
        receiver.descends(&lookup, &login),
        "the lookup is inside the login"
    );
    let redis = receiver.redis_under(&login).await;
    assert_eq!(redis.kind, 3, "SPAN_KIND_CLIENT");

    let (_, send) = receiver.span("send auth.events.user_created").await;
    assert_eq!(
        hex::encode(&send.trace_id),
        TRACE,
        "the send is in the caller's trace"
    );
    assert_eq!(
        send.parent_span_id, rpc.span_id,
        "the send's parent is the call that wrote the event"
    );
    assert_eq!(send.kind, 4, "SPAN_KIND_PRODUCER");
    let attrs = attributes(&send);
    assert_eq!(
        attrs.get("messaging.system").map(String::as_str),
        Some("kafka")
    );
    assert_eq!(
        attrs.get("messaging.destination.name").map(String::as_str),
        Some("auth.events.user_created")
    );
    let messages = tansu
        .read(&["auth.events.user_created"], 1, Duration::from_secs(20))
        .await;
    assert_eq!(
        header(&messages[0], "traceparent"),
        Some(format!("00-{TRACE}-{}-01", hex::encode(&send.span_id))),
        "the message carries the send span's context"
    );

    // A lifecycle event from another service, in that service's trace.
    let upstream = format!("00-{ENVOY_TRACE}-{ENVOY_SPAN}-01");
    tansu
        .produce_with_headers(
            "user.events.user_suspended",
            &user.id,
            format!(r#"{{"user_id":"{}"}}"#, user.id).as_bytes(),
            &[("traceparent", upstream.as_str())],
        )
        .await;
    let (_, process) = receiver.span("process user.events.user_suspended").await;
    assert_eq!(hex::encode(&process.trace_id), ENVOY_TRACE);
    assert_eq!(hex::encode(&process.parent_span_id), ENVOY_SPAN);
    assert_eq!(process.kind, 5, "SPAN_KIND_CONSUMER");
    let (_, written) = receiver
        .span_where("send auth.events.user_suspended", |s| {
            s.parent_span_id == process.span_id
        })
        .await;
    assert_eq!(hex::encode(&written.trace_id), ENVOY_TRACE);
}

/// The whole path with Envoy's own tracer: a REST sign-up through the
/// shipped gateway (OpenTelemetry tracer, sampling raised to 100 %) is one
/// trace. Envoy's server span is the root; the ext_authz Check and the
/// transcoded CreateUser are auth-service spans under Envoy's spans; the
/// password hash, the database insert and the Redis call of a login are
/// under those; the outbox event (so the Kafka message's header) carries
/// the CreateUser span's context. PostgreSQL, Redis, mTLS to auth-service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_call_through_envoy_is_one_trace_from_the_gateway_to_the_database() {
    use crate::support::{Envoy, GATEWAY_IDENTITY, envoy_tls, http, mesh_pki};
    let (receiver, otlp) = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = mesh_pki();
    std::fs::write(
        dir.path().join("auth.toml"),
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\nclient_auth = \"required\"\n\
             [services.{GATEWAY_IDENTITY:?}]\nroles = [\"gateway\"]\n",
            pki.path("server.crt"),
            pki.path("server.key"),
            pki.path("ca.crt"),
        ),
    )
    .unwrap();
    let database_url = crate::support::fresh_postgres_url().await;
    let redis_url = crate::support::env_url("TEST_REDIS_URL");
    let prefix = format!("t{}:", uuid::Uuid::new_v4().simple());
    let data = dir.path().display().to_string();
    let endpoint = format!("http://{otlp}");
    let mut server = start(
        dir.path(),
        &[
            ("AUTH_CONFIG", "auth.toml"),
            ("AUTH_DATA_DIR", &data),
            ("AUTH_DATABASE_URL", &database_url),
            ("AUTH_REDIS_URL", &redis_url),
            ("AUTH_REDIS_KEY_PREFIX", &prefix),
            ("AUTH_OTEL__ENDPOINT", &endpoint),
            ("AUTH_PASSWORD__MEMORY_KIB", "1024"),
            ("AUTH_PASSWORD__ITERATIONS", "1"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    server.ready().await;
    let descriptor = dir.path().join("descriptor.pb");
    std::fs::write(&descriptor, pb::FILE_DESCRIPTOR_SET).unwrap();
    let gateway = Envoy::start(
        "gateway.yaml",
        8080,
        &[
            (
                "random_sampling: { value: 1 }",
                "random_sampling: { value: 100 }".into(),
            ),
            ("port_value: 4317", format!("port_value: {}", otlp.port())),
            (
                "port_value: 50051",
                format!("port_value: {}", server.grpc.port()),
            ),
            (
                "port_value: 8081",
                format!("port_value: {}", server.http.port()),
            ),
            (
                "/etc/envoy/descriptor/auth_descriptor.pb",
                descriptor.display().to_string(),
            ),
        ]
        .into_iter()
        .chain(envoy_tls())
        .collect::<Vec<_>>(),
    )
    .await;

    let body =
        format!(r#"{{"email":"edge@example.com","username":"edge","password":"{PASSWORD}"}}"#);
    let created = http(gateway.addr, "POST", "/v1/users", &[], Some(&body)).await;
    assert_eq!(created.status, 200, "{created:?}");

    let (service, create) = receiver
        .span("immersiverse.auth.v1.AuthService/CreateUser")
        .await;
    assert_eq!(service, "auth-service");
    let trace = create.trace_id.clone();
    // Envoy's spans of this request: the ingress (server) span is the root.
    let (_, root) = receiver
        .span_where("ingress", |s| {
            s.trace_id == trace && s.parent_span_id.is_empty()
        })
        .await;
    let envoy_spans: Vec<(String, Span)> = receiver
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|(service, s)| service == "envoy-gateway" && s.trace_id == trace)
        .cloned()
        .collect();
    assert!(
        envoy_spans.iter().any(|(_, s)| s.span_id == root.span_id),
        "the root is Envoy's: {envoy_spans:?}"
    );
    // CreateUser's parent is one of Envoy's spans (its upstream call).
    assert!(
        envoy_spans
            .iter()
            .any(|(_, s)| s.span_id == create.parent_span_id),
        "CreateUser's parent is an Envoy span"
    );
    assert!(receiver.descends(&create, &root));
    // The ext_authz decision of the same request, under Envoy's root.
    let (_, check) = receiver
        .span_where("authz.check", |s| s.trace_id == trace)
        .await;
    assert!(
        receiver.descends(&check, &root),
        "the Check is in the request's trace"
    );
    // The hash and the insert inside CreateUser.
    let (_, hash) = receiver
        .span_where("password.hash", |s| s.trace_id == trace)
        .await;
    assert!(receiver.descends(&hash, &create));
    let (_, insert) = receiver
        .span_where("insert_user", |s| s.trace_id == trace)
        .await;
    assert!(receiver.descends(&insert, &create));
    assert_eq!(
        attributes(&insert)
            .get("db.system.name")
            .map(String::as_str),
        Some("postgresql")
    );

    // The event the call wrote continues CreateUser's span: the relay puts
    // this traceparent into the Kafka message's headers.
    use sqlx::{Connection, Row};
    let mut db = sqlx::PgConnection::connect(&database_url).await.unwrap();
    let row = sqlx::query("SELECT traceparent FROM outbox WHERE event_type = 'user_created'")
        .fetch_one(&mut db)
        .await
        .unwrap();
    let traceparent: String = row.get(0);
    assert_eq!(
        traceparent,
        format!(
            "00-{}-{}-01",
            hex::encode(&trace),
            hex::encode(&create.span_id)
        )
    );

    // A REST login: its Redis calls (failure counters) are in the trace.
    let login = http(
        gateway.addr,
        "POST",
        "/v1/auth/login",
        &[],
        Some(&format!(r#"{{"login":"edge","password":"{PASSWORD}"}}"#)),
    )
    .await;
    assert_eq!(login.status, 200, "{login:?}");
    let (_, login) = receiver
        .span("immersiverse.auth.v1.AuthService/Login")
        .await;
    // (The request's Check has Redis calls of its own in the same trace,
    // the rate limit's; the login's are under the Login span.)
    receiver.redis_under(&login).await;
    // The login's parent is an Envoy span (exported in Envoy's next batch).
    receiver
        .first("the Envoy parent of the login", |service, s| {
            service == "envoy-gateway" && s.span_id == login.parent_span_id
        })
        .await;
}
