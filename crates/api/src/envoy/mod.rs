//! Envoy ext_authz v3 adapter: reads the HTTP request out of a CheckRequest,
//! asks the [`Authorizer`], and answers with an OkHttpResponse (identity
//! headers for the upstream) or a DeniedHttpResponse (401/403/429/503 with a
//! small JSON body). A denial is a *successful* Check RPC; `Err(Status)` is
//! only for a CheckRequest without HTTP attributes.

use std::{sync::Arc, time::Instant};

use envoy_types::{
    ext_authz::v3::{
        CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
        pb::{Authorization, CheckRequest, CheckResponse, HeaderAppendAction, HttpStatusCode},
    },
    pb::envoy::config::core::v3::address::Address,
};
use tonic::{Request, Response, Status};

use crate::{
    authz::{AccessRequest, Authorizer, Decision, Denial},
    bearer, client_ip,
};

/// Headers the service sets for the upstream; any a client sent are replaced
/// or removed so the upstream can trust them.
pub const IDENTITY_HEADERS: [&str; 3] = ["x-user-id", "x-user-roles", "x-session-id"];

pub struct ExtAuthz {
    authorizer: Arc<Authorizer>,
    trusted_proxy_hops: usize,
}

impl ExtAuthz {
    pub fn new(authorizer: Arc<Authorizer>, trusted_proxy_hops: usize) -> Self {
        Self {
            authorizer,
            trusted_proxy_hops,
        }
    }
}

/// The identity of the downstream client certificate Envoy verified: from
/// the certificate itself when Envoy forwards it (`include_peer_certificate`,
/// URL-encoded PEM), by the same rule as this service's own mTLS peers (a
/// SPIFFE URI SAN, else a DNS SAN); else Envoy's `principal` for the peer.
fn source_identity(
    source: &envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer,
) -> Option<String> {
    if !source.certificate.is_empty() {
        use rustls_pki_types::{CertificateDer, pem::PemObject};
        let pem = percent_decode(source.certificate.as_bytes());
        let der = CertificateDer::from_pem_slice(&pem).ok()?;
        return crate::tls::certificate_identity(der.as_ref());
    }
    (!source.principal.is_empty()).then(|| source.principal.clone())
}

/// `%XX` escapes decoded; anything else (a malformed escape included) kept
/// as it is.
fn percent_decode(input: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                input.get(i + 1).and_then(|&b| hex(b)),
                input.get(i + 2).and_then(|&b| hex(b)),
            )
        {
            out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    out
}

fn json_body(code: &str, message: &str) -> String {
    serde_json::json!({ "code": code, "message": message }).to_string()
}

fn denied(denial: &Denial) -> CheckResponse {
    let mut http = DeniedHttpResponseBuilder::new();
    http.add_header(
        "content-type",
        "application/json",
        Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
        false,
    );
    let (status, grpc, code, message) = match denial {
        Denial::BadRequest { reason } => (
            HttpStatusCode::BadRequest,
            Status::invalid_argument("bad request"),
            "invalid_argument",
            format!(
                "the request target is ambiguous or malformed ({reason}); send it in canonical form"
            ),
        ),
        Denial::Unauthenticated { .. } => {
            http.add_header(
                "www-authenticate",
                r#"Bearer error="invalid_token""#,
                None,
                false,
            );
            (
                HttpStatusCode::Unauthorized,
                Status::unauthenticated("unauthenticated"),
                "unauthenticated",
                "a valid access token is required".to_owned(),
            )
        }
        Denial::Forbidden { .. } => (
            HttpStatusCode::Forbidden,
            Status::permission_denied("forbidden"),
            "permission_denied",
            "not allowed".to_owned(),
        ),
        Denial::RateLimited { retry_after, limit } => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            http.add_header("retry-after", secs.to_string(), None, false);
            http.add_header("x-ratelimit-limit", limit.to_string(), None, false);
            http.add_header("x-ratelimit-remaining", "0", None, false);
            (
                HttpStatusCode::TooManyRequests,
                Status::resource_exhausted("rate limited"),
                "rate_limited",
                format!("too many requests; retry after {secs} seconds"),
            )
        }
        Denial::Unavailable { .. } => (
            HttpStatusCode::ServiceUnavailable,
            Status::unavailable("unavailable"),
            "unavailable",
            "authorization is temporarily unavailable".to_owned(),
        ),
    };
    http.set_http_status(status)
        .set_body(json_body(code, &message));
    let mut response = CheckResponse::with_status(grpc);
    response.set_http_response(http);
    response
}

fn allowed(identity: Option<&crate::authz::Identity>) -> CheckResponse {
    let mut http = OkHttpResponseBuilder::new();
    match identity {
        Some(id) => {
            // Overwrite, not append: a client-sent value must not survive.
            let set = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
            http.add_header("x-user-id", id.user_id.to_string(), set, false)
                .add_header("x-user-roles", id.roles.join(","), set, true)
                .add_header("x-session-id", id.session_id.to_string(), set, false);
        }
        None => {
            for header in IDENTITY_HEADERS {
                http.remove_header(header);
            }
        }
    }
    let mut response = CheckResponse::with_status(Status::ok("ok"));
    response.set_http_response(http);
    response
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let started = Instant::now();
        // With client certificates on, the client address inside a
        // CheckRequest (`x-forwarded-for`, the source address) is taken only
        // from a caller holding the `gateway` role (the gateway and the
        // sidecars); anyone else is limited by its own address, so it cannot
        // spend another client's per-address budget.
        let call = crate::grpc::Call::required(request.extensions())?;
        let forwarding_trusted = call.forwarding_trusted;
        let sidecar = call
            .peer
            .as_ref()
            .filter(|p| !forwarding_trusted && p.has_role(crate::grpc::SIDECAR_ROLE))
            .map(|p| p.identity.clone());
        // Scoped by its identity when it has one (behind a mesh sidecar,
        // every caller shares the sidecar's address).
        let caller = (!forwarding_trusted)
            .then(|| {
                call.peer_ip.map(|ip| match &call.peer {
                    Some(p) => format!("{ip}@{}", p.identity),
                    None => ip.to_string(),
                })
            })
            .flatten();
        let check = request.into_inner();
        let attributes = check.attributes.as_ref();
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .ok_or_else(|| {
                Status::invalid_argument("CheckRequest carries no HTTP request attributes")
            })?;
        let peer = attributes
            .and_then(|a| a.source.as_ref())
            .and_then(|s| s.address.as_ref())
            .and_then(|a| match &a.address {
                Some(Address::SocketAddress(socket)) => Some(socket.address.as_str()),
                _ => None,
            });
        // The downstream client's service identity, believed only from a
        // trusted caller (the gateway or a sidecar), like its address.
        let service = attributes
            .and_then(|a| a.source.as_ref())
            .filter(|_| forwarding_trusted || sidecar.is_some())
            .and_then(source_identity);
        // A sidecar's downstream address, within its own budget.
        let scoped = sidecar
            .as_ref()
            .and_then(|identity| peer.map(|addr| format!("{addr}@{identity}")));
        let header = |name: &str| http.headers.get(name).map(String::as_str);
        let path = crate::authz::target::split_query(&http.path).0;
        let access = AccessRequest {
            method: &http.method,
            target: &http.path,
            method_override: crate::authz::target::METHOD_OVERRIDE_HEADERS
                .iter()
                .any(|h| http.headers.contains_key(*h)),
            bearer: bearer(header("authorization")),
            client_ip: if forwarding_trusted {
                client_ip(header("x-forwarded-for"), peer, self.trusted_proxy_hops)
            } else if sidecar.is_some() {
                scoped.as_deref().or(caller.as_deref())
            } else {
                caller.as_deref()
            },
            service: service.as_deref(),
        };
        // With traces on, the decision is a span of the client request's
        // trace when the CheckRequest carries its traceparent.
        let span = if crate::trace::traces_on()
            && match header("traceparent") {
                Some(tp) => crate::trace::sampled(Some(tp)),
                None => !tracing::Span::current().is_none(),
            } {
            let span = tracing::info_span!("authz.check", otel.name = "authz.check", http.request.method = %http.method, url.path = path);
            if let Some(cx) =
                crate::trace::context_from(header("traceparent"), header("tracestate"))
            {
                let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, cx);
            }
            span
        } else {
            tracing::debug_span!("check", method = %http.method, path)
        };
        let decision = tracing::Instrument::instrument(self.authorizer.decide(&access), span).await;
        let response = match &decision {
            Decision::Allow(identity @ Some(_)) => {
                auth_domain::held_counter!("authz_decisions_total", "result" => "allow", "reason" => "authenticated").increment(1);
                allowed(identity.as_ref())
            }
            Decision::Allow(None) => {
                auth_domain::held_counter!("authz_decisions_total", "result" => "allow", "reason" => "public").increment(1);
                allowed(None)
            }
            Decision::Deny(denial) => {
                metrics::counter!("authz_decisions_total", "result" => "deny", "reason" => denial.reason())
                    .increment(1);
                denied(denial)
            }
        };
        auth_domain::held_histogram!("authz_check_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_is_an_ok_rpc_carrying_status_headers_and_json() {
        let response = denied(&Denial::RateLimited {
            retry_after: std::time::Duration::from_millis(1500),
            limit: 10,
        });
        assert_eq!(
            response.status.as_ref().unwrap().code,
            tonic::Code::ResourceExhausted as i32
        );
        let Some(envoy_types::ext_authz::v3::pb::HttpResponse::DeniedResponse(d)) =
            response.http_response
        else {
            panic!()
        };
        assert_eq!(
            d.status.unwrap().code,
            HttpStatusCode::TooManyRequests as i32
        );
        let headers: Vec<(String, String)> = d
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect();
        assert!(
            headers.contains(&("retry-after".into(), "2".into())),
            "{headers:?}"
        );
        let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(body["code"], "rate_limited");
    }
}
