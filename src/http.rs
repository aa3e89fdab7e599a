//! The HTTP admin port: liveness, readiness, Prometheus metrics and the JWKS;
//! and the event worker's smaller one (liveness and metrics).

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::{storage::Ping, tokens::TokenService};

#[derive(Clone)]
pub struct AdminState {
    pub tokens: Arc<TokenService>,
    pub database: Arc<dyn Ping>,
    pub redis: Option<Arc<dyn Ping>>,
    pub metrics: PrometheusHandle,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(state)
}

/// Ready while every configured backend answers.
async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if let Err(e) = state.database.ping().await {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}"));
    }
    if let Some(redis) = &state.redis
        && let Err(e) = redis.ping().await
    {
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
