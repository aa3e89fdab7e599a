//! The AuthService gRPC adapter: it reads metadata (bearer token, client
//! address, trace context), calls the account and token services, and maps
//! results to protobuf. No business rule lives here.

pub mod error;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Instant};

use futures::StreamExt as _;

use secrecy::{ExposeSecret, SecretString};
use tonic::{Code, Request, Response, Status, metadata::MetadataMap};

use crate::{
    accounts::{
        model::{User, UserStatus},
        service::{AccountService, AdminCaller},
        service_accounts::{ServiceAccount, ServiceAccounts},
    },
    config::ServiceIdentity,
    events::RequestContext,
    platforms::{
        AccountStatus, Platform, PlatformAccount,
        service::{PlatformService, ServiceCaller},
    },
    revocation::feed::{FeedError, LoggedRevocation, RevocationFeed},
    tokens::{Principal, TokenPair, TokenService},
};

/// Generated protobuf types and service stubs.
pub mod pb {
    tonic::include_proto!("immersiverse.auth.v1");

    /// The descriptor set (with imports) for reflection and Envoy's
    /// gRPC-JSON transcoder.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/auth_descriptor.bin"));

    /// The descriptor set of Envoy's ext_authz v3 API
    /// (`envoy.service.auth.v3`), for reflection only: its Rust types come
    /// from `envoy-types`.
    pub const AUTHZ_FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/authz_descriptor.bin"));
}

use pb::auth_service_server::AuthService;

/// The role of a peer whose `x-forwarded-for` is trusted.
pub const GATEWAY_ROLE: &str = "gateway";

pub struct AuthApi {
    accounts: Arc<AccountService>,
    service_accounts: Arc<ServiceAccounts>,
    tokens: Arc<TokenService>,
    platforms: Arc<PlatformService>,
    revocation_feed: Arc<RevocationFeed>,
    trusted_proxy_hops: usize,
    request_timeout: std::time::Duration,
    peers: PeerPolicy,
}

/// The use cases the API serves.
pub struct UseCases {
    pub accounts: Arc<AccountService>,
    pub service_accounts: Arc<ServiceAccounts>,
    pub tokens: Arc<TokenService>,
    pub platforms: Arc<PlatformService>,
    pub revocation_feed: Arc<RevocationFeed>,
}

/// What the TLS peer's identity means here.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    /// `services.<identity>.roles`.
    pub services: Arc<std::collections::BTreeMap<String, ServiceIdentity>>,
    /// With client certificates on, `x-forwarded-for` is honoured only from
    /// a peer holding the `gateway` role; any other caller's address is its
    /// own (it cannot claim another to escape the per-address lockout).
    pub gateway_only_forwarding: bool,
}

/// A verified client certificate's identity and its configured roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub identity: String,
    pub roles: Vec<String>,
}

impl Peer {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// The identity of the request's client certificate, if one was verified
/// (roles empty for an identity not in `services`).
pub fn peer<T>(request: &Request<T>, policy: &PeerPolicy) -> Option<Peer> {
    peer_of(request.extensions(), policy)
}

/// [`peer`] from a request's extensions (after `into_parts`).
pub fn peer_of(extensions: &tonic::Extensions, policy: &PeerPolicy) -> Option<Peer> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let certs = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let identity = crate::tls::certificate_identity(certs.first()?.as_ref())?;
    let roles = policy
        .services
        .get(&identity)
        .map(|s| s.roles.clone())
        .unwrap_or_default();
    Some(Peer { identity, roles })
}

impl AuthApi {
    pub fn new(
        use_cases: UseCases,
        trusted_proxy_hops: usize,
        request_timeout: std::time::Duration,
        peers: PeerPolicy,
    ) -> Self {
        let UseCases {
            accounts,
            service_accounts,
            tokens,
            platforms,
            revocation_feed,
        } = use_cases;
        Self {
            accounts,
            service_accounts,
            tokens,
            platforms,
            revocation_feed,
            trusted_proxy_hops,
            request_timeout,
            peers,
        }
    }

    fn context<T>(&self, request: &Request<T>) -> RequestContext {
        let forwarding_trusted = !self.peers.gateway_only_forwarding
            || peer(request, &self.peers).is_some_and(|p| p.has_role(GATEWAY_ROLE));
        RequestContext {
            client_ip: client_ip(
                request.metadata(),
                request.remote_addr(),
                if forwarding_trusted {
                    self.trusted_proxy_hops
                } else {
                    0
                },
            ),
            // This call's span when traces are on (events then continue
            // it), else the caller's traceparent as received.
            traceparent: crate::telemetry::current_traceparent().or_else(|| {
                request
                    .metadata()
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            }),
            deadline: grpc_timeout(request.metadata()).map(|t| std::time::Instant::now() + t),
        }
    }

    async fn caller(&self, metadata: &MetadataMap) -> Result<Principal, Status> {
        let token = bearer_token(metadata)
            .ok_or_else(|| error::unauthenticated("missing bearer access token"))?;
        Ok(self.tokens.authenticate(token).await?)
    }

    /// An admin: a bearer token holding `admin`, or — for an operator tool
    /// without one — a verified client certificate whose configured
    /// identity holds it.
    async fn admin(
        &self,
        metadata: &MetadataMap,
        extensions: &tonic::Extensions,
    ) -> Result<AdminCaller, Status> {
        if bearer_token(metadata).is_none()
            && let Some(peer) = peer_of(extensions, &self.peers)
        {
            return Ok(AdminCaller::peer(&peer.identity, &peer.roles)?);
        }
        Ok(AdminCaller::check(self.caller(metadata).await?)?)
    }
}

/// The client address: the entry `hops` places from the right of
/// `x-forwarded-for` (appended by the trusted gateway), else the peer address.
/// Entries left of it were written by the client and are not trusted.
pub fn client_ip(metadata: &MetadataMap, peer: Option<SocketAddr>, hops: usize) -> Option<String> {
    let forwarded = metadata
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let peer = peer.map(|p| p.ip().to_string());
    crate::client_ip(forwarded, peer.as_deref(), hops).map(str::to_owned)
}

/// The caller's `grpc-timeout` (at most 8 digits and a unit, per the gRPC
/// HTTP/2 protocol); anything else is ignored.
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<std::time::Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    use std::time::Duration;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    crate::bearer(metadata.get("authorization")?.to_str().ok())
}

fn timestamp(t: time::OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

fn user_pb(user: &User) -> pb::User {
    pb::User {
        id: user.id.to_string(),
        email: user.email.as_str().to_owned(),
        username: user.username.as_str().to_owned(),
        roles: user.roles.iter().map(|r| r.as_str().to_owned()).collect(),
        status: match user.status {
            UserStatus::Active => pb::UserStatus::Active,
            UserStatus::Suspended => pb::UserStatus::Suspended,
            UserStatus::Deleted => pb::UserStatus::Deleted,
        } as i32,
        created_at: Some(timestamp(user.created_at)),
    }
}

fn token_response(pair: TokenPair) -> pb::TokenResponse {
    pb::TokenResponse {
        access_token: pair.access_token.expose_secret().to_owned(),
        refresh_token: pair.refresh_token.expose_secret().to_owned(),
        token_type: "Bearer".into(),
        expires_in: pair.expires_in,
        user: Some(user_pb(&pair.user)),
        refresh_expires_in: pair.refresh_expires_in,
        device_token: pair
            .device_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned())
            .unwrap_or_default(),
    }
}

/// The request's platform; InvalidArgument naming `platform` otherwise.
fn platform(value: i32) -> Result<Platform, Status> {
    match pb::Platform::try_from(value) {
        Ok(pb::Platform::Twitch) => Ok(Platform::Twitch),
        Ok(pb::Platform::Youtube) => Ok(Platform::Youtube),
        Ok(pb::Platform::Facebook) => Ok(Platform::Facebook),
        Ok(pb::Platform::Soop) => Ok(Platform::Soop),
        Ok(pb::Platform::Unspecified) | Err(_) => Err(error::invalid_argument(&[
            crate::error::FieldViolation::new(
                "platform",
                "must be one of PLATFORM_TWITCH, PLATFORM_YOUTUBE, PLATFORM_FACEBOOK, PLATFORM_SOOP",
            ),
        ])),
    }
}

fn platform_pb(platform: Platform) -> pb::Platform {
    match platform {
        Platform::Twitch => pb::Platform::Twitch,
        Platform::Youtube => pb::Platform::Youtube,
        Platform::Facebook => pb::Platform::Facebook,
        Platform::Soop => pb::Platform::Soop,
    }
}

fn platform_account_pb(account: &PlatformAccount) -> pb::PlatformAccount {
    pb::PlatformAccount {
        platform: platform_pb(account.platform) as i32,
        platform_user_id: account.platform_user_id.clone(),
        login: account.login.clone(),
        display_name: account.display_name.clone(),
        scopes: account.scopes.clone(),
        connected_at: Some(timestamp(account.connected_at)),
        token_expires_at: account.token_expires_at.map(timestamp),
        status: match account.status {
            AccountStatus::Active => pb::PlatformAccountStatus::Active,
            AccountStatus::ReauthRequired => pb::PlatformAccountStatus::ReauthRequired,
            AccountStatus::Revoked => pb::PlatformAccountStatus::Revoked,
        } as i32,
    }
}

fn service_account_pb(a: &ServiceAccount) -> pb::ServiceAccount {
    pb::ServiceAccount {
        id: a.id.to_string(),
        name: a.name.clone(),
        roles: a.roles.clone(),
        created_at: Some(timestamp(a.created_at)),
        secret_rotated_at: Some(timestamp(a.secret_rotated_at)),
    }
}

fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::InvalidArgument => "InvalidArgument",
        Code::Unauthenticated => "Unauthenticated",
        Code::PermissionDenied => "PermissionDenied",
        Code::NotFound => "NotFound",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::AlreadyExists => "AlreadyExists",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::Unavailable => "Unavailable",
        Code::Internal => "Internal",
        _ => "Other",
    }
}

impl AuthApi {
    /// Runs one RPC within the request timeout, and counts and times it by
    /// method and resulting code. A call past the timeout is dropped (a
    /// transaction it had open is rolled back) and answered Unavailable.
    async fn observed<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let result = within(self.request_timeout, method, call).await;
        record(method, started, result)
    }
}

/// `call`'s answer, or Unavailable once `timeout` has passed (the call is
/// dropped).
async fn within<T>(
    timeout: std::time::Duration,
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

fn record<T>(
    method: &'static str,
    started: Instant,
    result: Result<T, Status>,
) -> Result<Response<T>, Status> {
    let code = code_label(result.as_ref().map_or_else(Status::code, |_| Code::Ok));
    metrics::counter!("grpc_server_requests_total", "method" => method, "code" => code)
        .increment(1);
    metrics::histogram!("grpc_server_request_duration_seconds", "method" => method, "code" => code)
        .record(started.elapsed().as_secs_f64());
    result.map(Response::new)
}

fn revocation_event_pb(row: &LoggedRevocation) -> pb::RevocationEvent {
    let text = |key: &str| {
        row.data
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    pb::RevocationEvent {
        cursor: row.seq.to_string(),
        kind: row.event_type.clone(),
        user_id: row.user_id.map(|u| u.to_string()).unwrap_or_default(),
        session_id: text("session_id"),
        reason: text("reason"),
        occurred_at: Some(timestamp(row.occurred_at)),
        event_id: row.event_id.to_string(),
    }
}

type RevocationStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::RevocationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AuthService for AuthApi {
    type WatchRevocationsStream = RevocationStream;

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<RevocationStream>, Status> {
        let peer = peer(&request, &self.peers);
        let (metadata, _, body) = request.into_parts();
        let started = Instant::now();
        let opened = async {
            let allowed = match (bearer_token(&metadata), peer) {
                (None, Some(peer)) => peer.has_role(crate::accounts::model::Role::SERVICE),
                _ => self
                    .caller(&metadata)
                    .await?
                    .has_role(crate::accounts::model::Role::SERVICE),
            };
            if !allowed {
                return Err(Status::permission_denied(
                    "the service role is required to watch revocations",
                ));
            }
            let cursor = match body.cursor.trim() {
                "" => None,
                c => Some(c.parse::<i64>().map_err(|_| {
                    error::invalid_argument(&[crate::error::FieldViolation::new(
                        "cursor",
                        "must be a cursor from an earlier event",
                    )])
                })?),
            };
            let rx = self.revocation_feed.watch(cursor).await.map_err(|e| match e {
                FeedError::BadCursor(_) => error::invalid_argument(&[crate::error::FieldViolation::new(
                    "cursor",
                    "is not in the revocation log (too old, or never issued): resynchronise",
                )]),
                FeedError::Backend(b) => b.into(),
            })?;
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|item| match item {
                Ok(row) => Ok(revocation_event_pb(&row)),
                Err(FeedError::Backend(b)) => Err(b.into()),
                Err(e) => Err(Status::internal(e.to_string())),
            });
            Ok(Box::pin(stream) as RevocationStream)
        };
        record("WatchRevocations", started, opened.await)
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let ctx = self.context(&request);
        let body = request.into_inner();
        self.observed("CreateUser", async {
            let user = self
                .accounts
                .sign_up(&body.email, &body.username, &body.password, &ctx)
                .await?;
            Ok(pb::CreateUserResponse {
                user: Some(user_pb(&user)),
            })
        })
        .await
    }

    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::TokenResponse>, Status> {
        let ctx = self.context(&request);
        let body = request.into_inner();
        self.observed("Login", async {
            Ok(token_response(
                self.accounts
                    .login(&body.login, &body.password, &body.device_token, &ctx)
                    .await?,
            ))
        })
        .await
    }

    async fn refresh_token(
        &self,
        request: Request<pb::RefreshTokenRequest>,
    ) -> Result<Response<pb::TokenResponse>, Status> {
        let ctx = self.context(&request);
        let body = request.into_inner();
        self.observed("RefreshToken", async {
            Ok(token_response(
                self.accounts.refresh(&body.refresh_token, &ctx).await?,
            ))
        })
        .await
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let ctx = self.context(&request);
        let (metadata, _, body) = request.into_parts();
        self.observed("Logout", async {
            let caller = self.caller(&metadata).await?;
            let refresh =
                (!body.refresh_token.is_empty()).then(|| SecretString::from(body.refresh_token));
            self.tokens.logout(&caller, refresh.as_ref(), &ctx).await?;
            Ok(pb::LogoutResponse {})
        })
        .await
    }

    async fn validate_token(
        &self,
        request: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        let body = request.into_inner();
        self.observed("ValidateToken", async {
            if body.token.is_empty() {
                return Err(error::invalid_argument(&[
                    crate::error::FieldViolation::new("token", "is required"),
                ]));
            }
            let principal = self.tokens.authenticate(&body.token).await?;
            Ok(pb::ValidateTokenResponse {
                user_id: principal.user_id.to_string(),
                roles: principal.roles,
                session_id: principal.session_id.to_string(),
                expires_at: Some(prost_types::Timestamp {
                    seconds: principal.expires_at,
                    nanos: 0,
                }),
            })
        })
        .await
    }

    async fn get_me(
        &self,
        request: Request<pb::GetMeRequest>,
    ) -> Result<Response<pb::User>, Status> {
        self.observed("GetMe", async {
            let caller = self.caller(request.metadata()).await?;
            Ok(user_pb(&self.accounts.me(&caller).await?))
        })
        .await
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let ctx = self.context(&request);
        let (metadata, _, body) = request.into_parts();
        self.observed("ChangePassword", async {
            let caller = self.caller(&metadata).await?;
            self.accounts
                .change_password(&caller, &body.current_password, &body.new_password, &ctx)
                .await?;
            Ok(pb::ChangePasswordResponse {})
        })
        .await
    }

    async fn suspend_user(
        &self,
        request: Request<pb::SuspendUserRequest>,
    ) -> Result<Response<pb::SuspendUserResponse>, Status> {
        let ctx = self.context(&request);
        let (metadata, extensions, body) = request.into_parts();
        self.observed("SuspendUser", async {
            let admin = self.admin(&metadata, &extensions).await?;
            let user = self
                .accounts
                .suspend(&admin, &body.user_id, &body.reason, &ctx)
                .await?;
            Ok(pb::SuspendUserResponse {
                user: Some(user_pb(&user)),
            })
        })
        .await
    }

    async fn revoke_user_sessions(
        &self,
        request: Request<pb::RevokeUserSessionsRequest>,
    ) -> Result<Response<pb::RevokeUserSessionsResponse>, Status> {
        let ctx = self.context(&request);
        let (metadata, extensions, body) = request.into_parts();
        self.observed("RevokeUserSessions", async {
            let admin = self.admin(&metadata, &extensions).await?;
            let revoked = self
                .accounts
                .revoke_sessions(&admin, &body.user_id, &ctx)
                .await?;
            Ok(pb::RevokeUserSessionsResponse {
                revoked_sessions: i64::try_from(revoked).unwrap_or(i64::MAX),
            })
        })
        .await
    }

    async fn set_user_roles(
        &self,
        request: Request<pb::SetUserRolesRequest>,
    ) -> Result<Response<pb::SetUserRolesResponse>, Status> {
        let ctx = self.context(&request);
        let (metadata, extensions, body) = request.into_parts();
        self.observed("SetUserRoles", async {
            let admin = self.admin(&metadata, &extensions).await?;
            let user = self
                .accounts
                .set_roles(&admin, &body.user_id, &body.roles, &ctx)
                .await?;
            Ok(pb::SetUserRolesResponse {
                user: Some(user_pb(&user)),
            })
        })
        .await
    }

    async fn start_platform_link(
        &self,
        request: Request<pb::StartPlatformLinkRequest>,
    ) -> Result<Response<pb::StartPlatformLinkResponse>, Status> {
        let (metadata, _, body) = request.into_parts();
        self.observed("StartPlatformLink", async {
            let caller = self.caller(&metadata).await?;
            let started = self
                .platforms
                .start_link(&caller, platform(body.platform)?)
                .await?;
            Ok(pb::StartPlatformLinkResponse {
                authorization_url: started.authorization_url,
                state: started.state,
                expires_at: Some(timestamp(started.expires_at)),
                pkce: started.pkce,
            })
        })
        .await
    }

    async fn connect_platform_account(
        &self,
        request: Request<pb::ConnectPlatformAccountRequest>,
    ) -> Result<Response<pb::PlatformAccount>, Status> {
        let ctx = self.context(&request);
        let (metadata, _, body) = request.into_parts();
        self.observed("ConnectPlatformAccount", async {
            let caller = self.caller(&metadata).await?;
            let account = self
                .platforms
                .connect(
                    &caller,
                    platform(body.platform)?,
                    &body.code,
                    &body.state,
                    &body.error,
                    &ctx,
                )
                .await?;
            Ok(platform_account_pb(&account))
        })
        .await
    }

    async fn list_platform_accounts(
        &self,
        request: Request<pb::ListPlatformAccountsRequest>,
    ) -> Result<Response<pb::ListPlatformAccountsResponse>, Status> {
        self.observed("ListPlatformAccounts", async {
            let caller = self.caller(request.metadata()).await?;
            let accounts = self.platforms.list(&caller).await?;
            Ok(pb::ListPlatformAccountsResponse {
                accounts: accounts.iter().map(platform_account_pb).collect(),
            })
        })
        .await
    }

    async fn disconnect_platform_account(
        &self,
        request: Request<pb::DisconnectPlatformAccountRequest>,
    ) -> Result<Response<pb::DisconnectPlatformAccountResponse>, Status> {
        let ctx = self.context(&request);
        let (metadata, _, body) = request.into_parts();
        self.observed("DisconnectPlatformAccount", async {
            let caller = self.caller(&metadata).await?;
            let revoked = self
                .platforms
                .disconnect(&caller, platform(body.platform)?, &ctx)
                .await?;
            Ok(pb::DisconnectPlatformAccountResponse {
                revoked_at_platform: revoked,
            })
        })
        .await
    }

    async fn get_platform_access_token(
        &self,
        request: Request<pb::GetPlatformAccessTokenRequest>,
    ) -> Result<Response<pb::GetPlatformAccessTokenResponse>, Status> {
        let ctx = self.context(&request);
        let peer = peer(&request, &self.peers);
        let (metadata, _, body) = request.into_parts();
        self.observed("GetPlatformAccessToken", async {
            // A bearer token names the caller; without one, a verified
            // client certificate of a configured service does.
            let service = match (bearer_token(&metadata), peer) {
                (None, Some(peer)) => ServiceCaller::peer(&peer.identity, &peer.roles)?,
                _ => ServiceCaller::check(self.caller(&metadata).await?)?,
            };
            let grant = self
                .platforms
                .access_token(&service, &body.user_id, platform(body.platform)?, &ctx)
                .await?;
            Ok(pb::GetPlatformAccessTokenResponse {
                access_token: grant.access_token.expose_secret().to_owned(),
                expires_at: grant.expires_at.map(timestamp),
                platform_user_id: grant.platform_user_id,
                scopes: grant.scopes,
            })
        })
        .await
    }

    async fn create_service_account(
        &self,
        request: Request<pb::CreateServiceAccountRequest>,
    ) -> Result<Response<pb::CreateServiceAccountResponse>, Status> {
        let ctx = self.context(&request);
        let (metadata, extensions, body) = request.into_parts();
        self.observed("CreateServiceAccount", async {
            let admin = self.admin(&metadata, &extensions).await?;
            let (account, secret) = self
                .service_accounts
                .create(&admin, &body.name, &body.roles, &ctx)
                .await?;
            Ok(pb::CreateServiceAccountResponse {
                account: Some(service_account_pb(&account)),
                client_secret: secret.expose_secret().to_owned(),
            })
        })
        .await
    }

    async fn list_service_accounts(
        &self,
        request: Request<pb::ListServiceAccountsRequest>,
    ) -> Result<Response<pb::ListServiceAccountsResponse>, Status> {
        self.observed("ListServiceAccounts", async {
            let admin = self.admin(request.metadata(), request.extensions()).await?;
            let accounts = self.service_accounts.list(&admin).await?;
            Ok(pb::ListServiceAccountsResponse {
                accounts: accounts.iter().map(service_account_pb).collect(),
            })
        })
        .await
    }

    async fn rotate_service_account_secret(
        &self,
        request: Request<pb::RotateServiceAccountSecretRequest>,
    ) -> Result<Response<pb::RotateServiceAccountSecretResponse>, Status> {
        let ctx = self.context(&request);
        let (metadata, extensions, body) = request.into_parts();
        self.observed("RotateServiceAccountSecret", async {
            let admin = self.admin(&metadata, &extensions).await?;
            let secret = self.service_accounts.rotate(&admin, &body.id, &ctx).await?;
            Ok(pb::RotateServiceAccountSecretResponse {
                client_secret: secret.expose_secret().to_owned(),
            })
        })
        .await
    }

    async fn delete_service_account(
        &self,
        request: Request<pb::DeleteServiceAccountRequest>,
    ) -> Result<Response<pb::DeleteServiceAccountResponse>, Status> {
        let ctx = self.context(&request);
        let (metadata, extensions, body) = request.into_parts();
        self.observed("DeleteServiceAccount", async {
            let admin = self.admin(&metadata, &extensions).await?;
            self.service_accounts.delete(&admin, &body.id, &ctx).await?;
            Ok(pb::DeleteServiceAccountResponse {})
        })
        .await
    }

    async fn issue_service_token(
        &self,
        request: Request<pb::IssueServiceTokenRequest>,
    ) -> Result<Response<pb::IssueServiceTokenResponse>, Status> {
        let body = request.into_inner();
        self.observed("IssueServiceToken", async {
            if body.client_id.len() > 64 || body.client_secret.len() > 256 {
                return Err(error::unauthenticated("invalid client credentials"));
            }
            let token = self
                .service_accounts
                .issue_token(&body.client_id, &body.client_secret)
                .await
                .map_err(|e| match e {
                    crate::accounts::AccountError::InvalidCredentials => {
                        error::unauthenticated("invalid client credentials")
                    }
                    other => other.into(),
                })?;
            Ok(pb::IssueServiceTokenResponse {
                access_token: token.access_token.expose_secret().to_owned(),
                token_type: "Bearer".into(),
                expires_in: token.expires_in,
                roles: token.account.roles,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_that_never_ends_is_answered_unavailable_at_the_timeout() {
        let timeout = std::time::Duration::from_millis(20);
        let answer: Result<(), Status> = within(timeout, "Test", std::future::pending()).await;
        assert_eq!(answer.unwrap_err().code(), Code::Unavailable);
        let answer = within(timeout, "Test", async { Ok(7) }).await;
        assert_eq!(answer.unwrap(), 7, "a call that ends keeps its answer");
    }

    fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn the_client_ip_is_the_entry_the_trusted_gateway_appended() {
        let peer = Some("10.0.0.9:5000".parse().unwrap());
        let m = metadata(&[("x-forwarded-for", "6.6.6.6, 203.0.113.7")]);
        assert_eq!(client_ip(&m, peer, 1).as_deref(), Some("203.0.113.7"));
        assert_eq!(client_ip(&m, peer, 2).as_deref(), Some("6.6.6.6"));
        assert_eq!(
            client_ip(&m, peer, 0).as_deref(),
            Some("10.0.0.9"),
            "hops = 0 ignores the header"
        );
        assert_eq!(
            client_ip(&metadata(&[("x-forwarded-for", "garbage")]), peer, 1).as_deref(),
            Some("10.0.0.9")
        );
        assert_eq!(
            client_ip(&MetadataMap::new(), peer, 1).as_deref(),
            Some("10.0.0.9")
        );
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_never_empty() {
        assert_eq!(
            bearer_token(&metadata(&[("authorization", "Bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            bearer_token(&metadata(&[("authorization", "bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            bearer_token(&metadata(&[("authorization", "Basic abc")])),
            None
        );
        assert_eq!(
            bearer_token(&metadata(&[("authorization", "Bearer ")])),
            None
        );
    }
}
