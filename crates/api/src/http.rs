//! The HTTP port: liveness, readiness, Prometheus metrics, the JWKS and the
//! platforms' webhooks (Twitch EventSub, Facebook deauthorize; the gateway
//! routes `/webhooks/` here, their signatures are their authentication); and
//! the event worker's smaller one (liveness and metrics).

use std::sync::Arc;

use axum::{
    Form, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::{
    health::Ping,
    platforms::service::{EventSubHeaders, EventSubReply, PlatformService, WebhookError},
    tokens::TokenService,
};

/// Webhook bodies are small JSON or form documents.
const MAX_WEBHOOK_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct AdminState {
    pub tokens: Arc<TokenService>,
    pub platforms: Arc<PlatformService>,
    pub database: Arc<dyn Ping>,
    pub redis: Option<Arc<dyn Ping>>,
    /// Ready once the recent revocations are applied at start
    /// (`RevocationFeed::replay_recent`).
    pub revocation_log: Arc<dyn Ping>,
    pub metrics: PrometheusHandle,
    /// Cancelled when shutdown begins: not ready from then on.
    pub draining: tokio_util::sync::CancellationToken,
}

/// The HTTP port. With `metrics_elsewhere` (a `metrics_addr` is set),
/// `/metrics` is served only by [`metrics_router`], so the two ports can be
/// reachable by different callers (the gateway here, monitoring there).
pub fn router(state: AdminState, metrics_elsewhere: bool) -> Router {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    let router = if metrics_elsewhere {
        router
    } else {
        router.route("/metrics", get(metrics))
    };
    router
        .route("/.well-known/jwks.json", get(jwks))
        .route("/webhooks/twitch/eventsub", post(twitch_eventsub))
        .route("/webhooks/facebook/deauthorize", post(facebook_deauthorize))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY))
        .with_state(state)
}

/// The monitoring port (`metrics_addr`): `/metrics`, `/healthz`, `/readyz`.
pub fn metrics_router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Ready while every configured backend answers, once the recent
/// revocations are applied.
async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down".to_owned());
    }
    if let Err(e) = state.database.ping().await {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}"));
    }
    if let Some(redis) = &state.redis
        && let Err(e) = redis.ping().await
    {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}"));
    }
    if let Err(e) = state.revocation_log.ping().await {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}"));
    }
    (StatusCode::OK, "ready".to_owned())
}

/// The `auth-service events` process: `/healthz` and `/metrics`.
pub fn worker_router(metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(move || prometheus(metrics.clone())))
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    prometheus(state.metrics).await
}

async fn prometheus(metrics: PrometheusHandle) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics.render(),
    )
}

async fn jwks(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        state.tokens.jwks_json(),
    )
}

/// Twitch EventSub (webhook transport). 403 and no change for a missing,
/// bad or stale signature; 204 for a replayed message id (acknowledged so
/// Twitch stops retrying, not applied again); the raw challenge for
/// `webhook_callback_verification`.
async fn twitch_eventsub(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let eventsub = EventSubHeaders {
        message_id: header("twitch-eventsub-message-id"),
        timestamp: header("twitch-eventsub-message-timestamp"),
        signature: header("twitch-eventsub-message-signature"),
        message_type: header("twitch-eventsub-message-type"),
    };
    match state.platforms.eventsub(&eventsub, &body).await {
        Ok(EventSubReply::Challenge(challenge)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain")],
            challenge,
        )
            .into_response(),
        Ok(EventSubReply::Accepted | EventSubReply::Duplicate) => {
            StatusCode::NO_CONTENT.into_response()
        }
        Err(error) => webhook_error(error),
    }
}

#[derive(serde::Deserialize)]
struct Deauthorize {
    signed_request: String,
}

/// Facebook's deauthorize callback (form field `signed_request`).
async fn facebook_deauthorize(
    State(state): State<AdminState>,
    Form(form): Form<Deauthorize>,
) -> Response {
    match state
        .platforms
        .facebook_deauthorize(&form.signed_request)
        .await
    {
        Ok(()) => StatusCode::OK.into_response(),
        Err(error) => webhook_error(error),
    }
}

fn webhook_error(error: WebhookError) -> Response {
    let status = match error {
        WebhookError::NotConfigured => StatusCode::NOT_FOUND,
        WebhookError::Forbidden(_) => StatusCode::FORBIDDEN,
        WebhookError::Malformed(_) => StatusCode::BAD_REQUEST,
        WebhookError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    };
    tracing::info!(%error, status = status.as_u16(), "webhook refused");
    (status, error.to_string()).into_response()
}
