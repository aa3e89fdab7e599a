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
    support::{PASSWORD, channel},
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
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(found) = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .find(|(_, s)| s.name == name)
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
