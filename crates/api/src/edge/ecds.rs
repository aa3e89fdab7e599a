//! `envoy.service.extension.v3.ExtensionConfigDiscoveryService`: serves
//! the deny maps ([`super::ControlPlane`]: base and recent) to Envoys as the
//! configurations of their two revocation RBAC filters, and jwt_authn's
//! configuration with the keys ([`super::JWT_NAME`]) (state of the world over a stream; the
//! delta variant is not offered, and Envoy falls back to nothing: the
//! shipped configs ask for the state-of-the-world stream).
//!
//! Per stream: nothing is sent until the first map is complete (Envoy's
//! listener keeps warming: fail closed); then every new version once. An
//! ACK is counted; a NACK (Envoy refused the configuration) is logged with
//! Envoy's reason and counted, and that version is not sent again to that
//! stream — the next version is.

use std::{pin::Pin, sync::Arc};

use envoy_types::pb::envoy::service::{
    discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    },
    extension::v3::extension_config_discovery_service_server::ExtensionConfigDiscoveryService,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{ControlPlane, Snapshot};
use crate::grpc::{Call, GATEWAY_ROLE, SIDECAR_ROLE};

/// What ECDS resources are (`DiscoveryRequest.type_url`).
pub const TYPE_URL: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

pub struct Ecds {
    plane: Arc<ControlPlane>,
    /// Shutdown: open streams end so the server can drain (Envoy keeps
    /// its map and reconnects elsewhere).
    stop: CancellationToken,
    /// With client certificates on, only a peer holding the `gateway` or
    /// `sidecar` role is served (README, "Edge mode").
    identities_required: bool,
}

impl Ecds {
    pub fn new(
        plane: Arc<ControlPlane>,
        identities_required: bool,
        stop: CancellationToken,
    ) -> Self {
        Self {
            plane,
            stop,
            identities_required,
        }
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let call = Call::required(request.extensions())?;
        if !self.identities_required {
            return Ok(());
        }
        match &call.peer {
            Some(peer) if peer.has_role(GATEWAY_ROLE) || peer.has_role(SIDECAR_ROLE) => Ok(()),
            Some(peer) => {
                metrics::counter!("edge_ecds_refused_total").increment(1);
                tracing::warn!(identity = %peer.identity, "ECDS refused: the peer holds neither the gateway nor the sidecar role");
                Err(Status::permission_denied(
                    "the deny map is served to gateways and sidecars only",
                ))
            }
            None => Err(Status::unauthenticated("a client certificate is required")),
        }
    }
}

/// The answer carrying `wanted` (their versions joined as the response's).
fn response(wanted: &[&Arc<Snapshot>], nonce: u64) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: wanted
            .iter()
            .map(|s| s.version.to_string())
            .collect::<Vec<_>>()
            .join("."),
        resources: wanted.iter().map(|s| s.resource.clone()).collect(),
        type_url: TYPE_URL.to_owned(),
        nonce: nonce.to_string(),
        ..Default::default()
    }
}

fn check_type(request: &DiscoveryRequest) -> Result<(), Status> {
    if !request.type_url.is_empty() && request.type_url != TYPE_URL {
        return Err(Status::invalid_argument(format!(
            "type_url: only {TYPE_URL} is served here"
        )));
    }
    Ok(())
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for Ecds {
    type StreamExtensionConfigsStream = ResponseStream;
    type DeltaExtensionConfigsStream = DeltaStream;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamExtensionConfigsStream>, Status> {
        self.authorize(&request)?;
        let mut inbound = request.into_inner();
        let mut snapshots = self.plane.subscribe();
        let (tx, rx) = mpsc::channel(2);
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let streams = metrics::gauge!("edge_ecds_streams");
            streams.increment(1.0);
            let mut node = String::new();
            let mut names: Option<Vec<String>> = None;
            // The versions last sent.
            let mut sent: Option<Vec<i64>> = None;
            let mut nonce = 0u64;
            loop {
                let mut resend = false;
                tokio::select! {
                    () = tx.closed() => break,
                    () = stop.cancelled() => break,
                    request = inbound.message() => match request {
                        Ok(Some(request)) => {
                            if let Err(status) = check_type(&request) {
                                let _ = tx.send(Err(status)).await;
                                break;
                            }
                            if let Some(n) = request.node.as_ref().filter(|n| !n.id.is_empty()) {
                                node.clone_from(&n.id);
                            }
                            if let Some(error) = &request.error_detail {
                                metrics::counter!("edge_ecds_nacks_total").increment(1);
                                tracing::error!(node = %node, version = %request.version_info, nonce = %request.response_nonce, reason = %error.message, "ECDS: Envoy refused a configuration (NACK); it keeps its previous one");
                            } else if !request.response_nonce.is_empty() {
                                metrics::counter!("edge_ecds_acks_total").increment(1);
                                tracing::debug!(node = %node, version = %request.version_info, "ECDS: applied");
                            }
                            if names.as_ref() != Some(&request.resource_names) {
                                names = Some(request.resource_names);
                                resend = true;
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(node = %node, %status, "ECDS stream ended");
                            break;
                        }
                    },
                    changed = snapshots.changed() => {
                        if changed.is_err() {
                            break;
                        }
                    }
                }
                let Some(names) = &names else { continue };
                let Some(maps) = snapshots.borrow_and_update().clone() else {
                    continue;
                };
                let wanted = maps.wanted(names);
                let versions: Vec<i64> = wanted.iter().map(|s| s.version).collect();
                if resend || sent.as_ref() != Some(&versions) {
                    nonce += 1;
                    let response = response(&wanted, nonce);
                    sent = Some(versions);
                    metrics::counter!("edge_ecds_pushes_total").increment(1);
                    if tx.send(Ok(response)).await.is_err() {
                        break;
                    }
                }
            }
            streams.decrement(1.0);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_extension_configs(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaExtensionConfigsStream>, Status> {
        Err(Status::unimplemented(
            "ECDS is served as state of the world (StreamExtensionConfigs)",
        ))
    }

    async fn fetch_extension_configs(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        check_type(&request)?;
        let maps = self
            .plane
            .current()
            .ok_or_else(|| Status::unavailable("the deny map is not built yet"))?;
        Ok(Response::new(response(
            &maps.wanted(&request.resource_names),
            0,
        )))
    }
}
