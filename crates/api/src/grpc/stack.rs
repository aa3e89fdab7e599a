//! The one layer stack every gRPC listener serves behind — AuthService,
//! ext_authz, health and reflection alike — and the one place where call
//! metadata is read. Outermost first:
//!
//! 1. [`GrpcTraceLayer`]: the server span, continuing the caller's W3C trace
//!    context (every log line inside carries its ids);
//! 2. [`CallLayer`]: the request id (the caller's `x-request-id` when it is
//!    sane, else a new one; echoed in the response), the client address,
//!    deadline and trace context, the peer's certificate identity, the
//!    bearer token authenticated into a [`Principal`], per-session call
//!    limits for the methods configured (`rpc.session_limits`, seed 6.2),
//!    the request timeout, RPC metrics by method and code, and one
//!    structured access-log line per call (method, code, latency, principal,
//!    client address; never a token or a secret).
//!
//! Handlers receive all of it as a [`Call`] in the request's extensions and
//! never parse metadata themselves.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    future::Future,
    net::IpAddr,
    sync::{Arc, LazyLock, OnceLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use prost::Message as _;
use tonic::{Code, Status, body::Body, codegen::http};

use super::error::{IntoStatus, OrStatus};

use super::{GATEWAY_ROLE, Peer, PeerPolicy, error};
use crate::{
    accounts::service::AdminCaller,
    config::{AccessLog, RpcConfig},
    events::RequestContext,
    platforms::service::ServiceCaller,
    ratelimit::quota::{Limit, RateDecision, RateLimiter},
    tokens::{Principal, PrincipalKind, TokenService},
    trace::GrpcTraceLayer,
};

/// What the stack learned about one call, for its handler.
#[derive(Debug, Clone, Default)]
pub struct Call {
    /// The caller's `x-request-id` when it is safe to log and echo; else
    /// the stack makes one for the access log and the response.
    pub request_id: Option<String>,
    /// The caller's `x-forwarded-for`, read by [`Call::client_ip`].
    forwarded: Option<http::HeaderValue>,
    /// How many of its entries to skip (0 when the peer may not set it).
    hops: usize,
    /// The TCP peer's address (for ext_authz: the caller itself).
    pub peer_ip: Option<IpAddr>,
    /// Whether this peer's forwarded addresses are believed.
    pub forwarding_trusted: bool,
    /// The verified client certificate's identity and configured roles.
    pub peer: Option<Peer>,
    /// The bearer token in `authorization`, authenticated; `None` when the
    /// call carries none.
    pub bearer: Option<Result<Principal, Status>>,
    pub deadline: Option<Instant>,
    /// The caller's `traceparent` as received.
    traceparent: Option<http::HeaderValue>,
}

/// What a call that did not come through the stack is taken for by
/// [`Call::of`]: anonymous, no address, and its forwarded addresses never
/// believed. Only reachable when a listener is built without the stack.
static UNSTACKED: LazyLock<Arc<Call>> = LazyLock::new(|| Arc::new(Call::default()));

/// The stack did not attach a [`Call`]: a listener was built without it.
fn not_through_the_stack() {
    metrics::counter!("grpc_calls_without_stack_total").increment(1);
    tracing::error!(
        "a call reached a handler without passing the layer stack (a listener built without grpc::stack); refused"
    );
}

/// Who a call acts as ([`Call::caller`]).
#[derive(Debug)]
pub enum Caller<'a> {
    /// A bearer access token: the account it names, or why it was refused.
    Token(&'a Result<Principal, Status>),
    /// A verified client certificate's configured identity, without a token.
    Peer(&'a Peer),
    /// Neither.
    Anonymous,
}

impl Call {
    /// The call the stack attached; a call without one is an error of how
    /// the listener was built, answered Internal (and logged), never served
    /// as some default caller.
    pub fn required(extensions: &tonic::Extensions) -> Result<Arc<Call>, Status> {
        match extensions.get::<Arc<Call>>() {
            Some(call) => Ok(call.clone()),
            None => {
                not_through_the_stack();
                Err(Status::internal("internal error"))
            }
        }
    }

    /// The call the stack attached, else (logged) an anonymous call whose
    /// forwarded addresses are not believed. Handlers use
    /// [`Call::required`]; this is for callers that cannot fail the call.
    pub fn of(extensions: &tonic::Extensions) -> Arc<Call> {
        extensions.get::<Arc<Call>>().cloned().unwrap_or_else(|| {
            not_through_the_stack();
            UNSTACKED.clone()
        })
    }

    /// What a use case records of the call. Called inside the handler (the
    /// call's span is current): events continue this span when traces are
    /// on, else the caller's `traceparent` as received.
    pub fn context(&self) -> RequestContext {
        RequestContext {
            client_ip: self.client_ip(),
            traceparent: crate::trace::current_traceparent().or_else(|| {
                self.traceparent
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            }),
            deadline: self.deadline,
        }
    }

    /// The client address: from `x-forwarded-for` when the peer may set it
    /// (`trusted_proxy_hops`; with client certificates on, only a peer
    /// holding the `gateway` role), else the peer's own address. Computed
    /// when asked (an ext_authz Check never asks: its client is inside the
    /// CheckRequest).
    /// A caller that may not forward but has an identity (behind a mesh
    /// sidecar every caller arrives from the sidecar's one address) is
    /// counted as `<address>@<identity>`: its own budget, no one else's.
    pub fn client_ip(&self) -> Option<String> {
        let forwarded = self.forwarded.as_ref().and_then(|v| v.to_str().ok());
        let peer = self.peer_ip.map(|ip| ip.to_string());
        let ip = crate::client_ip(forwarded, peer.as_deref(), self.hops)?;
        Some(match &self.peer {
            Some(p) if !self.forwarding_trusted => format!("{ip}@{}", p.identity),
            _ => ip.to_owned(),
        })
    }

    /// The caller named by a valid bearer access token (user or service
    /// account).
    pub fn user(&self) -> Result<&Principal, Status> {
        match &self.bearer {
            Some(Ok(principal)) => Ok(principal),
            Some(Err(status)) => Err(status.clone()),
            None => Err(error::unauthenticated("missing bearer access token")),
        }
    }

    /// Who the call acts as: its bearer token when it carries one
    /// (verified or refused), else its verified client-certificate
    /// identity, else no one. A gateway forwarding a user's token acts as
    /// the user.
    pub fn caller(&self) -> Caller<'_> {
        match (&self.bearer, &self.peer) {
            (Some(token), _) => Caller::Token(token),
            (None, Some(peer)) => Caller::Peer(peer),
            (None, None) => Caller::Anonymous,
        }
    }

    /// An admin: a bearer token holding `admin`, or — for an operator tool
    /// without one — a verified client certificate whose configured
    /// identity holds it.
    pub fn admin(&self) -> Result<AdminCaller, Status> {
        match self.caller() {
            Caller::Peer(peer) => AdminCaller::peer(&peer.identity, &peer.roles).or_status(),
            _ => AdminCaller::check(self.user()?.clone()).or_status(),
        }
    }

    /// A service: a bearer token of a service account (or a user holding
    /// `service`), or a configured client-certificate identity.
    pub fn service(&self) -> Result<ServiceCaller, Status> {
        match self.caller() {
            Caller::Peer(peer) => ServiceCaller::peer(&peer.identity, &peer.roles).or_status(),
            _ => ServiceCaller::check(self.user()?.clone()).or_status(),
        }
    }

    /// Whether the caller holds `role`, by bearer token or else by
    /// certificate identity.
    pub fn holds(&self, role: &str) -> Result<bool, Status> {
        match self.caller() {
            Caller::Peer(peer) => Ok(peer.has_role(role)),
            _ => Ok(self.user()?.has_role(role)),
        }
    }

    /// Who the access log names: never a token, only ids.
    fn principal_label(&self) -> String {
        match self.caller() {
            Caller::Token(Ok(p)) => match p.kind {
                PrincipalKind::ServiceAccount => format!("service-account:{}", p.user_id),
                PrincipalKind::User => format!("user:{}", p.user_id),
            },
            Caller::Token(Err(_)) => "invalid-token".to_owned(),
            Caller::Peer(peer) => format!("peer:{}", peer.identity),
            Caller::Anonymous => "anonymous".to_owned(),
        }
    }
}

/// A gRPC method this process serves.
struct Method {
    service: &'static str,
    name: &'static str,
    /// Its RPC metrics by code, registered on first use: a call then
    /// records without building or hashing a label set.
    metrics: [OnceLock<RpcMetrics>; 17],
}

struct RpcMetrics {
    calls: metrics::Counter,
    duration: metrics::Histogram,
}

impl Method {
    fn new(service: &'static str, name: &'static str) -> Self {
        Self {
            service,
            name,
            metrics: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn metrics(&self, code: Code) -> &RpcMetrics {
        let slot = usize::try_from(code as i32).unwrap_or(0).min(16);
        self.metrics[slot].get_or_init(|| {
            let (service, method, code) = (self.service, self.name, super::code_label(code));
            RpcMetrics {
                calls: metrics::counter!("grpc_server_requests_total", "service" => service, "method" => method, "code" => code),
                duration: metrics::histogram!("grpc_server_request_duration_seconds", "service" => service, "method" => method, "code" => code),
            }
        })
    }
}

const AUTH_SERVICE: &str = "immersiverse.auth.v1.AuthService";
const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";
const ECDS_SERVICE: &str = "envoy.service.extension.v3.ExtensionConfigDiscoveryService";

/// The gRPC methods this process serves, by path, from the descriptor sets
/// it registers: metric labels come only from this set (a client cannot
/// grow the label space by calling made-up paths).
static KNOWN_METHODS: LazyLock<HashMap<String, Method>> = LazyLock::new(|| {
    let mut known = HashMap::new();
    let sets = [
        super::pb::FILE_DESCRIPTOR_SET,
        super::pb::AUTHZ_FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ];
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    for set in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            for service in &file.service {
                let full = format!("{}.{}", file.package(), service.name());
                let service_name = leak(full.clone());
                for method in &service.method {
                    known.insert(
                        format!("/{full}/{}", method.name()),
                        Method::new(service_name, leak(method.name().to_owned())),
                    );
                }
            }
        }
    }
    // Edge mode's ECDS (its descriptors are not registered for reflection).
    for method in [
        "StreamExtensionConfigs",
        "DeltaExtensionConfigs",
        "FetchExtensionConfigs",
    ] {
        known.insert(
            format!("/{ECDS_SERVICE}/{method}"),
            Method::new(ECDS_SERVICE, method),
        );
    }
    known.insert(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".to_owned(),
        Method::new(
            "grpc.reflection.v1.ServerReflection",
            "ServerReflectionInfo",
        ),
    );
    known
});

static UNKNOWN: LazyLock<Method> = LazyLock::new(|| Method::new("unknown", "unknown"));

fn method_of(path: &str) -> &'static Method {
    KNOWN_METHODS.get(path).unwrap_or_else(|| &UNKNOWN)
}

/// `(service, method)` for a path this process serves, else `None`.
pub fn known_method(path: &str) -> Option<(&'static str, &'static str)> {
    KNOWN_METHODS.get(path).map(|m| (m.service, m.name))
}

/// The AuthService methods (for validating `rpc.session_limits`).
pub fn auth_service_methods() -> Vec<&'static str> {
    let mut methods: Vec<&'static str> = KNOWN_METHODS
        .values()
        .filter(|m| m.service == AUTH_SERVICE)
        .map(|m| m.name)
        .collect();
    methods.sort_unstable();
    methods
}

/// Everything the stack needs, shared by every listener.
#[derive(Clone)]
pub struct CallLayer {
    inner: Arc<Shared>,
}

struct Shared {
    tokens: Arc<TokenService>,
    peers: PeerPolicy,
    trusted_proxy_hops: usize,
    request_timeout: Duration,
    access_log: AccessLog,
    /// Per-session limits by AuthService method name.
    session_limits: BTreeMap<String, Limit>,
    limiter: Option<Arc<RateLimiter>>,
}

impl CallLayer {
    pub fn new(
        tokens: Arc<TokenService>,
        peers: PeerPolicy,
        trusted_proxy_hops: usize,
        request_timeout: Duration,
        rpc: &RpcConfig,
        limiter: Arc<RateLimiter>,
    ) -> anyhow::Result<Self> {
        let methods = auth_service_methods();
        for method in rpc.session_limits.keys() {
            anyhow::ensure!(
                methods.contains(&method.as_str()),
                "rpc.session_limits.{method}: not an AuthService method (one of {})",
                methods.join(", ")
            );
        }
        Ok(Self {
            inner: Arc::new(Shared {
                tokens,
                peers,
                trusted_proxy_hops,
                request_timeout,
                access_log: rpc.access_log,
                session_limits: rpc.session_limits.clone(),
                limiter: (!rpc.session_limits.is_empty()).then_some(limiter),
            }),
        })
    }
}

/// The stack in order, as one layer for `Server::builder().layer(..)`.
pub type Stack = tower::layer::util::Stack<
    CallLayer,
    tower::layer::util::Stack<GrpcTraceLayer, tower::layer::util::Identity>,
>;

pub fn stack(calls: CallLayer) -> Stack {
    tower::ServiceBuilder::new()
        .layer(GrpcTraceLayer)
        .layer(calls)
        .into_inner()
}

impl<S> tower::Layer<S> for CallLayer {
    type Service = CallService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CallService {
            inner,
            shared: self.inner.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CallService<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// A request id from the caller is kept when it is 1 to 128 characters of
/// `[A-Za-z0-9._:-]` (what proxies and tracers send); anything else is
/// replaced so it is safe to log and echo.
pub fn request_id(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(&names::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            (1..=128).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        })
        .map(str::to_owned)
}

/// Header names the stack reads, made once (a `&str` lookup would parse and
/// validate the name on every call).
mod names {
    use tonic::codegen::http::HeaderName;
    pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub static FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    pub static AUTHORIZATION: HeaderName = HeaderName::from_static("authorization");
    pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
    pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
}

/// A new request id, UUID-shaped and unique without a system call per call:
/// the high half is a UUIDv7's drawn once per process (its start time and
/// random bits), the low half a counter.
pub fn new_request_id() -> String {
    static PROCESS: LazyLock<u64> = LazyLock::new(|| uuid::Uuid::now_v7().as_u64_pair().0);
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    uuid::Uuid::from_u64_pair(*PROCESS, n)
        .hyphenated()
        .to_string()
}

/// The code a response carries in its headers (a trailers-only error
/// answer), else OK: a unary success, or a stream that opened (a stream's
/// later status is not seen here).
fn response_code(response: &http::Response<Body>) -> Code {
    response
        .headers()
        .get(&names::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

/// `call`'s answer, or Unavailable once `timeout` has passed (the call is
/// dropped: a transaction it had open is rolled back).
async fn within<T>(
    timeout: Duration,
    method: &'static str,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                method,
                ?timeout,
                "call timed out: a backend does not answer"
            );
            Err(Status::unavailable("the request timed out; retry later"))
        }
    }
}

impl Shared {
    /// The call as its metadata and connection describe it, and its bearer
    /// token (not yet authenticated).
    fn read<B>(&self, request: &http::Request<B>) -> (Call, Option<String>) {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let headers = request.headers();
        let extensions = request.extensions();
        let tcp = extensions.get::<TcpConnectInfo>().or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        });
        let remote = tcp.and_then(TcpConnectInfo::remote_addr);
        let peer = super::peer_from_connection(extensions, &self.peers).or_else(|| {
            self.peers.peer_from_xfcc(
                remote.map(|a| a.ip()),
                headers.get("x-forwarded-client-cert"),
            )
        });
        let forwarding_trusted = !self.peers.gateway_only_forwarding
            || peer.as_ref().is_some_and(|p| p.has_role(GATEWAY_ROLE));
        let hops = if forwarding_trusted {
            self.trusted_proxy_hops
        } else {
            0
        };
        let bearer = crate::bearer(
            headers
                .get(&names::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
        )
        .map(str::to_owned);
        let call = Call {
            request_id: request_id(headers),
            forwarded: headers.get(&names::FORWARDED_FOR).cloned(),
            hops,
            peer_ip: remote.map(|a| a.ip()),
            forwarding_trusted,
            peer,
            bearer: None,
            deadline: headers
                .get(&names::GRPC_TIMEOUT)
                .and_then(super::grpc_timeout)
                .map(|t| Instant::now() + t),
            traceparent: headers.get(&names::TRACEPARENT).cloned(),
        };
        (call, bearer)
    }

    /// The per-session limit of `method`, when one is configured and the
    /// caller has a session: `Err` answers the call ResourceExhausted.
    async fn session_limit(&self, method: &str, call: &Call) -> Result<(), Status> {
        let (Some(limiter), Some(limit)) = (&self.limiter, self.session_limits.get(method)) else {
            return Ok(());
        };
        let Some(Ok(principal)) = &call.bearer else {
            return Ok(());
        };
        let key = format!("rpc:{}:{method}", principal.session_id);
        match limiter.check(&key, limit).await {
            Ok(RateDecision::Allowed) => Ok(()),
            Ok(RateDecision::Limited { retry_after }) => {
                metrics::counter!("grpc_session_limited_total", "method" => method.to_owned())
                    .increment(1);
                Err(error::with_retry_after(
                    Code::ResourceExhausted,
                    "too many calls of this method in this session",
                    retry_after,
                ))
            }
            // The limit fails open like ext_authz's (`authz.rate_limit_fail_open`
            // decides inside the limiter); an error here is the closed case.
            Err(e) => Err(e.into_status()),
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for CallService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let started = Instant::now();
            let rpc = method_of(request.uri().path());
            let (service, method) = (rpc.service, rpc.name);
            let is_check = service == AUTHZ_SERVICE;
            let (mut call, bearer) = shared.read(&request);
            if let Some(token) = bearer {
                call.bearer = Some(
                    shared
                        .tokens
                        .authenticate(&token)
                        .await
                        .map_err(IntoStatus::into_status),
                );
            }
            let call = Arc::new(call);
            let mut response = match shared.session_limit(method, &call).await {
                Err(status) => status.into_http(),
                Ok(()) => {
                    request.extensions_mut().insert(call.clone());
                    if is_check {
                        // No timer per Check: Envoy bounds the call (0.5 s in
                        // the shipped configs) and a Check waits on nothing
                        // but Redis, bounded by `redis_timeout_ms`.
                        let Ok(response) = inner.call(request).await;
                        response
                    } else {
                        let answer = within(shared.request_timeout, method, async {
                            let Ok(response) = inner.call(request).await;
                            Ok(response)
                        });
                        answer.await.unwrap_or_else(Status::into_http)
                    }
                }
            };
            let code = response_code(&response);
            let elapsed = started.elapsed();
            let recorded = rpc.metrics(code);
            recorded.calls.increment(1);
            recorded.duration.record(elapsed.as_secs_f64());
            let logged = match shared.access_log {
                AccessLog::Off => false,
                AccessLog::Api => service == AUTH_SERVICE,
                AccessLog::All => true,
            };
            // Checks answer Envoy, which does not read it: no id is made
            // for them unless they are logged.
            if logged || !is_check {
                let request_id = call.request_id.clone().unwrap_or_else(new_request_id);
                if !is_check && let Ok(id) = http::HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert(names::REQUEST_ID.clone(), id);
                }
                if logged {
                    tracing::info!(
                        target: "access",
                        request_id = %request_id,
                        rpc.service = service,
                        rpc.method = method,
                        code = super::code_label(code),
                        latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                        principal = %call.principal_label(),
                        client_ip = call.client_ip().as_deref().unwrap_or("-"),
                        "rpc"
                    );
                }
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_from_callers_are_kept_only_when_safe_to_log() {
        let from = |v: &str| {
            let mut h = http::HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(v) {
                h.insert("x-request-id", v);
            }
            request_id(&h)
        };
        assert_eq!(from("abc-123_x.y:z").as_deref(), Some("abc-123_x.y:z"));
        for bad in ["a b", "x\"y", &"a".repeat(129), "é", ""] {
            assert_eq!(from(bad), None, "{bad:?}");
        }
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        assert!(uuid::Uuid::parse_str(&a).is_ok(), "{a}");
        assert_eq!(from(&a), Some(a), "a made id passes the caller rule");
    }

    #[tokio::test]
    async fn a_call_that_never_ends_is_answered_unavailable_at_the_timeout() {
        let timeout = Duration::from_millis(20);
        let answer: Result<(), Status> = within(timeout, "Test", std::future::pending()).await;
        assert_eq!(answer.unwrap_err().code(), Code::Unavailable);
        let answer = within(timeout, "Test", async { Ok(7) }).await;
        assert_eq!(answer.unwrap(), 7, "a call that ends keeps its answer");
    }

    /// Failure class: input from the wrong party — a request that never
    /// passed the stack (a listener built without it) is refused, and is
    /// never a caller whose forwarded addresses are believed.
    #[test]
    fn a_call_without_the_stack_is_refused_and_never_trusted() {
        let bare = tonic::Extensions::new();
        let refused = Call::required(&bare).unwrap_err();
        assert_eq!(refused.code(), Code::Internal);
        assert!(!Call::of(&bare).forwarding_trusted);
        assert_eq!(Call::of(&bare).hops, 0);
        let mut stacked = tonic::Extensions::new();
        stacked.insert(Arc::new(Call {
            forwarding_trusted: true,
            ..Call::default()
        }));
        assert!(Call::required(&stacked).unwrap().forwarding_trusted);
    }

    #[test]
    fn only_served_methods_become_metric_labels() {
        assert_eq!(
            known_method("/immersiverse.auth.v1.AuthService/Login"),
            Some(("immersiverse.auth.v1.AuthService", "Login"))
        );
        assert_eq!(
            known_method("/envoy.service.auth.v3.Authorization/Check"),
            Some(("envoy.service.auth.v3.Authorization", "Check"))
        );
        assert_eq!(
            known_method("/grpc.health.v1.Health/Watch"),
            Some(("grpc.health.v1.Health", "Watch"))
        );
        assert_eq!(
            known_method("/immersiverse.auth.v1.AuthService/Made-Up"),
            None
        );
        assert!(auth_service_methods().contains(&"GetPlatformAccessToken"));
        assert_eq!(auth_service_methods().len(), 21);
    }
}
