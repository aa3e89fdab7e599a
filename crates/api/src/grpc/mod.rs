//! The AuthService gRPC adapter: it takes the caller as the layer stack
//! ([`stack`]) authenticated it, calls the account and token services, and
//! maps results to protobuf. No business rule and no metadata parsing lives
//! in a handler.

pub mod error;
pub mod stack;

pub use stack::Call;

use std::{future::Future, sync::Arc};

use futures::StreamExt as _;

use secrecy::{ExposeSecret, SecretString};
use tonic::{Code, Request, Response, Status, codegen::http};

use self::error::{IntoStatus, OrStatus};

use crate::{
    accounts::{
        model::{User, UserStatus},
        service::AccountService,
        service_accounts::{ServiceAccount, ServiceAccounts},
    },
    config::ServiceIdentity,
    platforms::{AccountStatus, Platform, PlatformAccount, service::PlatformService},
    revocation::feed::{self, FeedError, LoggedRevocation, RevocationFeed, Revoked},
    tokens::{TokenPair, TokenService},
};

/// Generated protobuf types and service stubs (the `auth-proto` crate).
pub use auth_proto as pb;

use pb::auth_service_server::AuthService;

/// The role of a peer whose `x-forwarded-for` is trusted.
pub const GATEWAY_ROLE: &str = "gateway";

/// The role of a mesh sidecar asking ext_authz about the requests to its
/// own workload: its CheckRequest's downstream address (the TCP peer it
/// saw) and verified client identity are believed, but the address counts
/// only within this sidecar's own budget (`<address>@<identity>`), so a
/// compromised sidecar can spend no one else's; its `x-forwarded-for` is
/// not believed.
pub const SIDECAR_ROLE: &str = "sidecar";

pub struct AuthApi {
    accounts: Arc<AccountService>,
    service_accounts: Arc<ServiceAccounts>,
    tokens: Arc<TokenService>,
    platforms: Arc<PlatformService>,
    revocation_feed: Arc<RevocationFeed>,
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
    /// `tls.xfcc_from`: the local mesh proxy's addresses, whose
    /// `x-forwarded-client-cert` names the caller.
    pub xfcc_from: Vec<std::net::IpAddr>,
}

impl PeerPolicy {
    /// The roles `services` gives `identity`: its own key, else the
    /// longest `…/*` key whose prefix it extends by one segment.
    pub fn roles_of(&self, identity: &str) -> Vec<String> {
        if let Some(s) = self.services.get(identity) {
            return s.roles.clone();
        }
        self.services
            .iter()
            .filter_map(|(key, s)| {
                let prefix = key.strip_suffix('*')?;
                let rest = identity.strip_prefix(prefix)?;
                (prefix.ends_with('/') && !rest.is_empty() && !rest.contains('/'))
                    .then_some((prefix.len(), s))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, s)| s.roles.clone())
            .unwrap_or_default()
    }

    /// The caller a trusted local mesh proxy names in
    /// `x-forwarded-client-cert`, when `remote` is one of `tls.xfcc_from`.
    pub fn peer_from_xfcc(
        &self,
        remote: Option<std::net::IpAddr>,
        header: Option<&http::HeaderValue>,
    ) -> Option<Peer> {
        if !remote.is_some_and(|ip| self.xfcc_from.contains(&ip)) {
            return None;
        }
        let identity = identity_from_xfcc(header?.to_str().ok()?)?;
        Some(Peer {
            roles: self.roles_of(&identity),
            identity,
        })
    }
}

/// The identity in an `x-forwarded-client-cert` value (Envoy's format:
/// elements separated by `,`, each `Key=value` pairs separated by `;`,
/// values optionally quoted): of the last element (the nearest proxy's),
/// its SPIFFE `URI`, else its first `DNS`. `None` for anything malformed.
pub fn identity_from_xfcc(value: &str) -> Option<String> {
    if value.len() > 8192 {
        return None;
    }
    // Split on separators outside quotes.
    let mut elements: Vec<Vec<(String, String)>> = vec![Vec::new()];
    let (mut key, mut val, mut in_value, mut quoted) = (String::new(), String::new(), false, false);
    let mut chars = value.chars();
    let flush = |elements: &mut Vec<Vec<(String, String)>>, key: &mut String, val: &mut String| {
        if !key.is_empty() {
            elements.last_mut().expect("never empty").push((
                std::mem::take(key).trim().to_ascii_lowercase(),
                std::mem::take(val),
            ));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '"' if in_value => quoted = !quoted,
            '\\' if quoted => val.push(chars.next()?),
            ';' if !quoted => {
                flush(&mut elements, &mut key, &mut val);
                in_value = false;
            }
            ',' if !quoted => {
                flush(&mut elements, &mut key, &mut val);
                in_value = false;
                elements.push(Vec::new());
            }
            '=' if !in_value => in_value = true,
            c if in_value => val.push(c),
            c => key.push(c),
        }
    }
    if quoted {
        return None;
    }
    flush(&mut elements, &mut key, &mut val);
    let last = elements.last()?;
    let uri = last
        .iter()
        .find(|(k, v)| k == "uri" && v.starts_with("spiffe://"))
        .map(|(_, v)| v.clone());
    let identity = uri.or_else(|| {
        last.iter()
            .find(|(k, _)| k == "dns")
            .map(|(_, v)| v.clone())
    })?;
    (!identity.is_empty()
        && !identity
            .chars()
            .any(|c| c.is_whitespace() || c.is_control()))
    .then_some(identity)
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

/// The verified client certificate's identity on this connection, if any
/// (roles empty for an identity not in `services`).
pub fn peer_from_connection(extensions: &http::Extensions, policy: &PeerPolicy) -> Option<Peer> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let certs = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let identity = crate::tls::certificate_identity(certs.first()?.as_ref())?;
    Some(Peer {
        roles: policy.roles_of(&identity),
        identity,
    })
}

impl AuthApi {
    pub fn new(use_cases: UseCases) -> Self {
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
        }
    }
}

/// The caller's `grpc-timeout` (at most 8 digits and a unit, per the gRPC
/// HTTP/2 protocol); anything else is ignored.
pub fn grpc_timeout(value: &http::HeaderValue) -> Option<std::time::Duration> {
    let value = value.to_str().ok()?;
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

pub(crate) fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// A handler's answer (the stack times it out, counts, times and logs it).
async fn reply<T>(call: impl Future<Output = Result<T, Status>>) -> Result<Response<T>, Status> {
    call.await.map(Response::new)
}

fn revocation_event_pb(row: &LoggedRevocation) -> pb::RevocationEvent {
    pb::RevocationEvent {
        cursor: row.seq.to_string(),
        kind: row.event_type.clone(),
        user_id: row.user_id.map(|u| u.to_string()).unwrap_or_default(),
        session_id: match row.revoked {
            Revoked::Session { session_id, .. } => session_id.to_string(),
            Revoked::User { .. } | Revoked::Nothing => String::new(),
        },
        reason: row.reason.clone().unwrap_or_default(),
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
        let call = Call::required(request.extensions())?;
        let body = request.into_inner();
        reply(async {
            if !call.holds(crate::accounts::model::Role::SERVICE)? {
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
                FeedError::Backend(b) => b.into_status(),
                FeedError::CredentialEnded(_) => error::unauthenticated("invalid token"),
            })?;
            // Opened with a token: the stream lasts as long as the token (a
            // rotated or deleted service account loses the feed).
            let rx = match &call.bearer {
                Some(Ok(principal)) => feed::while_valid(
                    rx,
                    principal
                        .token_facts()
                        .ok_or_else(|| error::unauthenticated("invalid token"))?,
                    self.tokens.revocations().clone(),
                ),
                _ => rx,
            };
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|item| match item {
                Ok(row) => Ok(revocation_event_pb(&row)),
                Err(FeedError::Backend(b)) => Err(b.into_status()),
                Err(FeedError::CredentialEnded(why)) => Err(Status::unauthenticated(format!(
                    "the token that opened this stream {why}: open it again with a valid one and the last cursor"
                ))),
                Err(e) => Err(Status::internal(e.to_string())),
            });
            Ok(Box::pin(stream) as RevocationStream)
        })
        .await
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            let user = self
                .accounts
                .sign_up(&body.email, &body.username, &body.password, &ctx)
                .await
                .or_status()?;
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
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            Ok(token_response(
                self.accounts
                    .login(&body.login, &body.password, &body.device_token, &ctx)
                    .await
                    .or_status()?,
            ))
        })
        .await
    }

    async fn refresh_token(
        &self,
        request: Request<pb::RefreshTokenRequest>,
    ) -> Result<Response<pb::TokenResponse>, Status> {
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            Ok(token_response(
                self.accounts
                    .refresh(&body.refresh_token, &ctx)
                    .await
                    .or_status()?,
            ))
        })
        .await
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            let caller = call.user()?;
            let refresh =
                (!body.refresh_token.is_empty()).then(|| SecretString::from(body.refresh_token));
            self.tokens
                .logout(caller, refresh.as_ref(), &ctx)
                .await
                .or_status()?;
            Ok(pb::LogoutResponse {})
        })
        .await
    }

    async fn validate_token(
        &self,
        request: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        let body = request.into_inner();
        reply(async {
            if body.token.is_empty() {
                return Err(error::invalid_argument(&[
                    crate::error::FieldViolation::new("token", "is required"),
                ]));
            }
            let principal = self.tokens.authenticate(&body.token).await.or_status()?;
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
        let call = Call::required(request.extensions())?;
        reply(async {
            let caller = call.user()?;
            Ok(user_pb(&self.accounts.me(caller).await.or_status()?))
        })
        .await
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            let caller = call.user()?;
            self.accounts
                .change_password(caller, &body.current_password, &body.new_password, &ctx)
                .await
                .or_status()?;
            Ok(pb::ChangePasswordResponse {})
        })
        .await
    }

    async fn suspend_user(
        &self,
        request: Request<pb::SuspendUserRequest>,
    ) -> Result<Response<pb::SuspendUserResponse>, Status> {
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            let admin = call.admin()?;
            let user = self
                .accounts
                .suspend(&admin, &body.user_id, &body.reason, &ctx)
                .await
                .or_status()?;
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
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            let admin = call.admin()?;
            let revoked = self
                .accounts
                .revoke_sessions(&admin, &body.user_id, &ctx)
                .await
                .or_status()?;
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
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            let admin = call.admin()?;
            let user = self
                .accounts
                .set_roles(&admin, &body.user_id, &body.roles, &ctx)
                .await
                .or_status()?;
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
        let call = Call::required(request.extensions())?;
        let body = request.into_inner();
        reply(async {
            let caller = call.user()?;
            let started = self
                .platforms
                .start_link(caller, platform(body.platform)?)
                .await
                .or_status()?;
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
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            let caller = call.user()?;
            let account = self
                .platforms
                .connect(
                    caller,
                    platform(body.platform)?,
                    &body.code,
                    &body.state,
                    &body.error,
                    &ctx,
                )
                .await
                .or_status()?;
            Ok(platform_account_pb(&account))
        })
        .await
    }

    async fn list_platform_accounts(
        &self,
        request: Request<pb::ListPlatformAccountsRequest>,
    ) -> Result<Response<pb::ListPlatformAccountsResponse>, Status> {
        let call = Call::required(request.extensions())?;
        reply(async {
            let caller = call.user()?;
            let accounts = self.platforms.list(caller).await.or_status()?;
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
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            let caller = call.user()?;
            let revoked = self
                .platforms
                .disconnect(caller, platform(body.platform)?, &ctx)
                .await
                .or_status()?;
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
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            // A bearer token names the caller; without one, a verified
            // client certificate of a configured service does.
            let service = call.service()?;
            let grant = self
                .platforms
                .access_token(
                    &service,
                    &body.user_id,
                    platform(body.platform)?,
                    Some(body.rejected_token.as_str()).filter(|t| !t.is_empty()),
                    &ctx,
                )
                .await
                .or_status()?;
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
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            let admin = call.admin()?;
            let (account, secret) = self
                .service_accounts
                .create(&admin, &body.name, &body.roles, &ctx)
                .await
                .or_status()?;
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
        let call = Call::required(request.extensions())?;
        reply(async {
            let admin = call.admin()?;
            let accounts = self.service_accounts.list(&admin).await.or_status()?;
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
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            let admin = call.admin()?;
            let secret = self
                .service_accounts
                .rotate(&admin, &body.id, &ctx)
                .await
                .or_status()?;
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
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            let admin = call.admin()?;
            self.service_accounts
                .delete(&admin, &body.id, &ctx)
                .await
                .or_status()?;
            Ok(pb::DeleteServiceAccountResponse {})
        })
        .await
    }

    async fn issue_service_token(
        &self,
        request: Request<pb::IssueServiceTokenRequest>,
    ) -> Result<Response<pb::IssueServiceTokenResponse>, Status> {
        let call = Call::required(request.extensions())?;
        let ctx = call.context();
        let body = request.into_inner();
        reply(async {
            if body.client_id.len() > 64 || body.client_secret.len() > 256 {
                return Err(error::unauthenticated("invalid client credentials"));
            }
            let token = self
                .service_accounts
                .issue_token(&body.client_id, &body.client_secret, &ctx)
                .await
                .map_err(|e| match e {
                    crate::accounts::AccountError::InvalidCredentials => {
                        error::unauthenticated("invalid client credentials")
                    }
                    other => other.into_status(),
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
    use crate::config::ServiceIdentity;

    #[test]
    fn the_identity_is_the_nearest_proxys_spiffe_uri_else_its_dns_name() {
        let istio = r#"By=spiffe://cluster.local/ns/immersiverse-auth/sa/auth-service;Hash=4f3a;Subject="";URI=spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"#;
        assert_eq!(
            identity_from_xfcc(istio).as_deref(),
            Some("spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account")
        );
        // Two elements: the last was appended by the nearest proxy; a quoted
        // subject may hold separators.
        let chained =
            r#"URI=spiffe://x/ns/a/sa/far,Subject="CN=a,O=b;c";URI=spiffe://x/ns/b/sa/near"#;
        assert_eq!(
            identity_from_xfcc(chained).as_deref(),
            Some("spiffe://x/ns/b/sa/near")
        );
        assert_eq!(
            identity_from_xfcc("Hash=1;DNS=svc.example;DNS=other").as_deref(),
            Some("svc.example")
        );
        for bad in [
            "",
            "Hash=1",
            "URI=\"unterminated",
            "URI=http://not-spiffe",
            "DNS=a b",
        ] {
            assert_eq!(identity_from_xfcc(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_trailing_star_gives_roles_one_segment_down_and_an_exact_key_wins() {
        let services = [
            ("spiffe://m/ns/apps/sa/*", "sidecar"),
            ("spiffe://m/ns/apps/sa/edge", "gateway"),
        ]
        .into_iter()
        .map(|(k, r)| {
            (
                k.to_owned(),
                ServiceIdentity {
                    roles: vec![r.into()],
                },
            )
        })
        .collect();
        let policy = PeerPolicy {
            services: Arc::new(services),
            gateway_only_forwarding: true,
            xfcc_from: vec!["127.0.0.6".parse().unwrap()],
        };
        assert_eq!(policy.roles_of("spiffe://m/ns/apps/sa/chat"), ["sidecar"]);
        assert_eq!(policy.roles_of("spiffe://m/ns/apps/sa/edge"), ["gateway"]);
        for none in [
            "spiffe://m/ns/apps/sa/",
            "spiffe://m/ns/apps/sa/a/b",
            "spiffe://m/ns/other/sa/chat",
            "spiffe://m/ns/apps/sa*",
        ] {
            assert!(policy.roles_of(none).is_empty(), "{none}");
        }
        // The header is believed only from the configured proxy addresses.
        let header = http::HeaderValue::from_static("URI=spiffe://m/ns/apps/sa/edge");
        let from = |ip: &str| policy.peer_from_xfcc(Some(ip.parse().unwrap()), Some(&header));
        assert_eq!(from("127.0.0.6").unwrap().roles, ["gateway"]);
        assert_eq!(from("127.0.0.1"), None);
        assert_eq!(from("10.0.0.6"), None);
    }
}
