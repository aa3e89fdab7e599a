//! Fake streaming platforms: real HTTP servers that behave like Twitch,
//! Google (YouTube), Facebook and SOOP as their public documentation
//! describes them, for the parts the service uses: the authorization
//! endpoint (registered redirect URI, a code bound to it and to the PKCE
//! challenge), the token endpoint (client authentication in the body,
//! single-use codes that expire, the verifier checked against the challenge
//! where the platform supports PKCE, each platform's response and error
//! shapes, rotating or kept refresh tokens, `invalid_grant` once revoked),
//! the identity endpoints, revocation and Twitch's `/oauth2/validate`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use auth_service::{config::ProviderConfig, platforms::Platform};
use axum::{
    Router,
    extract::{Form, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::json;
use sha2::{Digest, Sha256};

pub const CLIENT_SECRET: &str = "fake-client-secret";
pub const WEBHOOK_SECRET: &str = "eventsub-secret-0123456789";

/// The person "logged in" at the fake platform.
#[derive(Debug, Clone)]
pub struct FakeUser {
    pub id: String,
    pub login: String,
    pub name: String,
}

#[derive(Debug, Clone)]
struct Code {
    user: FakeUser,
    redirect_uri: String,
    challenge: Option<String>,
    scopes: Vec<String>,
    expires: Instant,
}

#[derive(Debug, Clone)]
struct Access {
    user: FakeUser,
    expires: Instant,
    /// The authorization (consent) it belongs to; refreshes stay in it.
    grant: u64,
}

#[derive(Default)]
pub struct Counters {
    pub code_exchanges: u32,
    pub refreshes: u32,
    pub extensions: u32,
    pub revocations: u32,
    pub validations: u32,
}

struct Inner {
    platform: Platform,
    client_id: String,
    redirect_uri: String,
    user: FakeUser,
    deny: bool,
    codes: HashMap<String, Code>,
    access: HashMap<String, Access>,
    refresh: HashMap<String, (FakeUser, u64)>,
    next_grant: u64,
    access_ttl: Duration,
    /// Answer this many token calls with 503 first.
    fail_next: u32,
    /// The revocation call this many calls from now answers 503 (0: none).
    revocation_failure_in: u32,
    /// Answer token calls with 429 until then (Unix seconds).
    rate_limited_until: Option<u64>,
    /// The API endpoints (validate, identity): answer this many calls with
    /// 503 first, and with 429 until then (Unix seconds).
    api_fail_next: u32,
    api_rate_limited_until: Option<u64>,
    /// Every call to the token endpoint, answered or not.
    token_requests: u32,
    latency: Duration,
    /// Every authorization is by a new platform user (load generation).
    new_user_each_time: bool,
    next_user: u64,
    counters: Counters,
    /// Every token handed out, to look for them where they must not be.
    issued: Vec<String>,
}

#[derive(Clone)]
pub struct FakePlatform {
    pub platform: Platform,
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

fn random(prefix: &str) -> String {
    let mut raw = [0u8; 18];
    getrandom::fill(&mut raw).unwrap();
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(raw))
}

impl FakePlatform {
    pub async fn start(platform: Platform) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Mutex::new(Inner {
            platform,
            client_id: format!("{platform}-client-id"),
            redirect_uri: format!("https://app.immersiverse.test/link/{platform}/callback"),
            user: FakeUser {
                id: "1001".into(),
                login: "streamer".into(),
                name: "Streamer".into(),
            },
            deny: false,
            codes: HashMap::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            next_grant: 0,
            access_ttl: Duration::from_secs(4 * 3600),
            fail_next: 0,
            api_fail_next: 0,
            api_rate_limited_until: None,
            revocation_failure_in: 0,
            rate_limited_until: None,
            token_requests: 0,
            latency: Duration::ZERO,
            new_user_each_time: false,
            next_user: 0,
            counters: Counters::default(),
            issued: Vec::new(),
        }));
        let fake = Self {
            platform,
            addr,
            inner,
        };
        let app = Router::new()
            .route("/authorize", get(authorize))
            .route("/token", post(token_post).get(token_get))
            .route("/users", get(twitch_users))
            .route("/youtube/v3/channels", get(youtube_channels))
            .route("/me", get(facebook_me))
            .route("/me/permissions", axum::routing::delete(facebook_revoke))
            .route("/user/stationinfo", post(soop_station))
            .route("/revoke", post(revoke))
            .route("/validate", get(validate))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    /// The service's configuration for this platform.
    pub fn config(&self) -> ProviderConfig {
        let inner = self.inner.lock().unwrap();
        let base = format!("http://{}", self.addr);
        let mut config = ProviderConfig::defaults(self.platform);
        config.client_id = Some(inner.client_id.clone());
        config.client_secret = Some(CLIENT_SECRET.into());
        config.redirect_uri = Some(inner.redirect_uri.clone());
        config.auth_url = format!("{base}/authorize");
        config.token_url = format!("{base}/token");
        config.api_url = base.clone();
        config.revoke_url = match self.platform {
            Platform::Facebook => Some(format!("{base}/me/permissions")),
            Platform::Soop => None,
            _ => Some(format!("{base}/revoke")),
        };
        config.validate_url =
            (self.platform == Platform::Twitch).then(|| format!("{base}/validate"));
        if self.platform == Platform::Twitch {
            config.webhook_secret = Some(WEBHOOK_SECRET.into());
        }
        config
    }

    pub fn log_in_as(&self, id: &str, login: &str) {
        self.inner.lock().unwrap().user = FakeUser {
            id: id.into(),
            login: login.into(),
            name: login.to_uppercase(),
        };
    }

    /// Each authorization from now on is by a platform user of its own.
    pub fn new_user_each_time(&self) {
        self.inner.lock().unwrap().new_user_each_time = true;
    }

    pub fn deny_next(&self) {
        self.inner.lock().unwrap().deny = true;
    }

    pub fn set_access_ttl(&self, ttl: Duration) {
        self.inner.lock().unwrap().access_ttl = ttl;
    }

    /// The `n`th revocation call from now (1: the next) answers 503.
    pub fn fail_nth_revocation(&self, n: u32) {
        self.inner.lock().unwrap().revocation_failure_in = n;
    }

    pub fn fail_next(&self, calls: u32) {
        self.inner.lock().unwrap().fail_next = calls;
    }

    /// The token endpoint answers 429 for the next `window`, with the
    /// reset time in Twitch's headers.
    pub fn rate_limit_for(&self, window: Duration) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        self.inner.lock().unwrap().rate_limited_until = Some((now + window).as_secs() + 1);
    }

    /// Calls to the token endpoint so far.
    /// The API endpoints (validate, identity) answer the next `calls` with
    /// 503.
    pub fn fail_api_next(&self, calls: u32) {
        self.inner.lock().unwrap().api_fail_next = calls;
    }

    /// The API endpoints answer 429 (the platform's documented shape) for
    /// `window`.
    pub fn rate_limit_api_for(&self, window: Duration) {
        let until = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            + window;
        self.inner.lock().unwrap().api_rate_limited_until = Some(until.as_secs());
    }

    pub fn token_requests(&self) -> u32 {
        self.inner.lock().unwrap().token_requests
    }

    pub fn set_latency(&self, latency: Duration) {
        self.inner.lock().unwrap().latency = latency;
    }

    /// The user revokes the application at the platform: every token dies.
    pub fn revoke_everything(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.access.clear();
        inner.refresh.clear();
    }

    pub fn counters(&self) -> (u32, u32, u32, u32, u32) {
        let inner = self.inner.lock().unwrap();
        let c = &inner.counters;
        (
            c.code_exchanges,
            c.refreshes,
            c.extensions,
            c.revocations,
            c.validations,
        )
    }

    pub fn refreshes(&self) -> u32 {
        let inner = self.inner.lock().unwrap();
        inner.counters.refreshes + inner.counters.extensions
    }

    /// Every access token issued so far expires now (refresh tokens live on).
    pub fn expire_access_tokens(&self) {
        for access in self.inner.lock().unwrap().access.values_mut() {
            access.expires = Instant::now();
        }
    }

    /// Refresh tokens the platform would still honour.
    pub fn live_refresh_tokens(&self) -> usize {
        self.inner.lock().unwrap().refresh.len()
    }

    pub fn issued_tokens(&self) -> Vec<String> {
        self.inner.lock().unwrap().issued.clone()
    }

    pub fn is_live(&self, access_token: &str) -> bool {
        self.inner
            .lock()
            .unwrap()
            .access
            .get(access_token)
            .is_some_and(|a| a.expires > Instant::now())
    }

    /// Follows an authorization URL as the user's browser would (the user
    /// is logged in and consents): returns the redirect's query parameters.
    pub async fn authorize_in_browser(&self, authorization_url: &str) -> HashMap<String, String> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let response = client.get(authorization_url).send().await.unwrap();
        assert_eq!(
            response.status().as_u16(),
            302,
            "the platform redirects back: {:?}",
            response.text().await
        );
        let location = response.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .to_owned();
        let url = url::Url::parse(&location).unwrap();
        assert!(location.starts_with(&self.inner.lock().unwrap().redirect_uri));
        url.query_pairs().into_owned().collect()
    }
}

fn token_for(
    inner: &mut Inner,
    user: FakeUser,
    grant: u64,
    with_refresh: bool,
) -> (String, Option<String>) {
    let access = random("at-");
    inner.access.insert(
        access.clone(),
        Access {
            user: user.clone(),
            expires: Instant::now() + inner.access_ttl,
            grant,
        },
    );
    inner.issued.push(access.clone());
    let refresh = with_refresh.then(|| {
        let r = random("rt-");
        inner.refresh.insert(r.clone(), (user, grant));
        inner.issued.push(r.clone());
        r
    });
    (access, refresh)
}

/// Each platform's error shape for a dead grant.
fn grant_error(platform: Platform, message: &str) -> Response {
    let body = match platform {
        // https://dev.twitch.tv/docs/authentication/refresh-tokens/ ("The
        // following example shows what the response looks like if the
        // request fails"): {"error": "Bad Request", "status": 400,
        // "message": "Invalid refresh token"}; the same envelope for the
        // other messages.
        Platform::Twitch => json!({"error": "Bad Request", "status": 400, "message": message}),
        // https://developers.facebook.com/docs/graph-api/guides/error-handling/:
        // an expired or invalidated access token is code 190 (subcode 463:
        // expired); a used authorization code is code 100, subcode 36009;
        // other parameter errors code 100.
        Platform::Facebook if message.starts_with("Error validating access token") => json!({
            "error": {"message": message, "type": "OAuthException", "code": 190, "error_subcode": 463}
        }),
        Platform::Facebook if message == "Invalid authorization code" => json!({
            "error": {"message": "This authorization code has been used.", "type": "OAuthException", "code": 100, "error_subcode": 36009}
        }),
        Platform::Facebook => {
            json!({"error": {"message": message, "type": "OAuthException", "code": 100}})
        }
        // https://developers.google.com/identity/protocols/oauth2/web-server
        // ("redirect_uri_mismatch": the redirect URI does not match one
        // authorized for the client); a spent or bad code or refresh token is
        // RFC 6749's `invalid_grant`.
        Platform::Youtube if message.contains("redirect_uri") => json!({
            "error": "redirect_uri_mismatch",
            "error_description": "Bad Request"
        }),
        Platform::Youtube | Platform::Soop => {
            json!({"error": "invalid_grant", "error_description": message})
        }
    };
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

fn client_error(platform: Platform) -> Response {
    let body = match platform {
        // The same documented envelope (dev.twitch.tv/docs/authentication).
        Platform::Twitch => {
            json!({"error": "Forbidden", "status": 403, "message": "invalid client secret"})
        }
        Platform::Facebook => {
            json!({"error": {"message": "Error validating client secret.", "type": "OAuthException", "code": 1}})
        }
        _ => json!({"error": "invalid_client", "error_description": "Unauthorized"}),
    };
    let status = if platform == Platform::Twitch {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::UNAUTHORIZED
    };
    (status, axum::Json(body)).into_response()
}

async fn authorize(
    State(fake): State<FakePlatform>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut inner = fake.inner.lock().unwrap();
    // A wrong client or an unregistered redirect URI is an error page at
    // the platform, never a redirect.
    if q.get("client_id") != Some(&inner.client_id)
        || q.get("redirect_uri") != Some(&inner.redirect_uri)
        || q.get("response_type").map(String::as_str) != Some("code")
    {
        return (
            StatusCode::BAD_REQUEST,
            "redirect_uri mismatch or unknown client",
        )
            .into_response();
    }
    if inner.platform == Platform::Youtube
        && (q.get("access_type").map(String::as_str) != Some("offline")
            || q.get("prompt").map(String::as_str) != Some("consent"))
    {
        return (
            StatusCode::BAD_REQUEST,
            "this test expects offline access with consent",
        )
            .into_response();
    }
    let state = q.get("state").cloned().unwrap_or_default();
    let mut location = url::Url::parse(&inner.redirect_uri).unwrap();
    if std::mem::take(&mut inner.deny) {
        location
            .query_pairs_mut()
            .append_pair("error", "access_denied")
            .append_pair("error_description", "The user denied you access")
            .append_pair("state", &state);
    } else {
        let supports_pkce = matches!(inner.platform, Platform::Youtube | Platform::Facebook);
        let challenge = supports_pkce
            .then(|| {
                (q.get("code_challenge_method").map(String::as_str) == Some("S256"))
                    .then(|| q.get("code_challenge").cloned())
                    .flatten()
            })
            .flatten();
        let code = random("code-");
        let scopes = q
            .get("scope")
            .map(|s| s.split([' ', ',']).map(str::to_owned).collect())
            .unwrap_or_default();
        if inner.new_user_each_time {
            inner.next_user += 1;
            let n = inner.next_user;
            inner.user = FakeUser {
                id: format!("{}", 50_000 + n),
                login: format!("user{n}"),
                name: format!("User {n}"),
            };
        }
        let user = inner.user.clone();
        let redirect_uri = inner.redirect_uri.clone();
        inner.codes.insert(
            code.clone(),
            Code {
                user,
                redirect_uri,
                challenge,
                scopes,
                expires: Instant::now() + Duration::from_secs(60),
            },
        );
        location
            .query_pairs_mut()
            .append_pair("code", &code)
            .append_pair("state", &state);
    }
    (
        StatusCode::FOUND,
        [(header::LOCATION, location.to_string())],
    )
        .into_response()
}

async fn token_get(
    State(fake): State<FakePlatform>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    token(fake, q).await
}

async fn token_post(
    State(fake): State<FakePlatform>,
    Form(q): Form<HashMap<String, String>>,
) -> Response {
    token(fake, q).await
}

/// A 503 while `fail_next` lasts, a 429 while rate limited (token and
/// revocation endpoints alike).
/// [`busy`] for the API endpoints (validate, identity), with their own
/// knobs.
fn api_busy(inner: &mut Inner) -> Option<Response> {
    let platform = inner.platform;
    busy_by(
        platform,
        &mut inner.api_fail_next,
        inner.api_rate_limited_until,
    )
}

/// The token endpoint's 503s and 429s.
fn busy(inner: &mut Inner) -> Option<Response> {
    let platform = inner.platform;
    busy_by(platform, &mut inner.fail_next, inner.rate_limited_until)
}

fn busy_by(
    platform: Platform,
    fail_next: &mut u32,
    rate_limited_until: Option<u64>,
) -> Option<Response> {
    if *fail_next > 0 {
        *fail_next -= 1;
        return Some((StatusCode::SERVICE_UNAVAILABLE, "upstream overloaded").into_response());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let reset = rate_limited_until.filter(|reset| *reset > now)?;
    if platform == Platform::Facebook {
        // https://developers.facebook.com/docs/graph-api/overview/rate-limiting
        // and …/guides/error-handling: the Graph API throttles with an
        // error in the body (code 4, "Application request limit reached"),
        // not with a 429, and names no reset.
        return Some(
            (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": {
                    "message": "(#4) Application request limit reached",
                    "type": "OAuthException", "is_transient": true, "code": 4,
                    "fbtrace_id": "Fake0trace0id"
                }})),
            )
                .into_response(),
        );
    }
    // https://dev.twitch.tv/docs/api/guide/#twitch-rate-limits: 429
    // with Ratelimit-Limit, Ratelimit-Remaining and Ratelimit-Reset (the
    // Unix time the bucket refills); the body in Twitch's error
    // envelope. The page shows no Retry-After.
    Some(
        (
            StatusCode::TOO_MANY_REQUESTS,
            [
                ("ratelimit-limit", "800".to_owned()),
                ("ratelimit-remaining", "0".to_owned()),
                ("ratelimit-reset", reset.to_string()),
            ],
            axum::Json(json!({"error": "Too Many Requests", "status": 429, "message": ""})),
        )
            .into_response(),
    )
}

async fn token(fake: FakePlatform, q: HashMap<String, String>) -> Response {
    let latency = fake.inner.lock().unwrap().latency;
    tokio::time::sleep(latency).await;
    let mut inner = fake.inner.lock().unwrap();
    inner.token_requests += 1;
    if let Some(busy) = busy(&mut inner) {
        return busy;
    }
    let platform = inner.platform;
    if q.get("client_id") != Some(&inner.client_id)
        || q.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET)
    {
        return client_error(platform);
    }
    let grant_type = q.get("grant_type").map(String::as_str);
    match grant_type {
        // Facebook's exchange of a valid token for a long-lived one.
        Some("fb_exchange_token") if platform == Platform::Facebook => {
            let presented = q.get("fb_exchange_token").cloned().unwrap_or_default();
            let Some(access) = inner.access.get(&presented).cloned() else {
                return grant_error(
                    platform,
                    "Error validating access token: Session has expired",
                );
            };
            if access.expires <= Instant::now() {
                return grant_error(
                    platform,
                    "Error validating access token: Session has expired",
                );
            }
            inner.counters.extensions += 1;
            let (token, _) = token_for(&mut inner, access.user, access.grant, false);
            let ttl = inner.access_ttl.as_secs();
            axum::Json(json!({"access_token": token, "token_type": "bearer", "expires_in": ttl}))
                .into_response()
        }
        Some("refresh_token") if platform != Platform::Facebook => {
            let presented = q.get("refresh_token").cloned().unwrap_or_default();
            let Some((user, grant)) = inner.refresh.get(&presented).cloned() else {
                return grant_error(platform, "Invalid refresh token");
            };
            inner.counters.refreshes += 1;
            // Twitch and SOOP rotate the refresh token; Google keeps it.
            let rotate = platform != Platform::Youtube;
            if rotate {
                inner.refresh.remove(&presented);
            }
            let (access, refresh) = token_for(&mut inner, user, grant, rotate);
            let ttl = inner.access_ttl.as_secs();
            axum::Json(match platform {
                // https://dev.twitch.tv/docs/authentication/refresh-tokens/:
                // the documented answer to a refresh carries no `expires_in`
                // (the code exchange's does): the service cannot know when
                // the new token dies, and learns it from validation and from
                // callers reporting a rejected token.
                Platform::Twitch => json!({"access_token": access, "refresh_token": refresh, "scope": ["user:read:email"], "token_type": "bearer"}),
                Platform::Youtube => json!({"access_token": access, "expires_in": ttl, "scope": "https://www.googleapis.com/auth/youtube.readonly", "token_type": "Bearer"}),
                _ => json!({"access_token": access, "refresh_token": refresh, "expires_in": ttl}),
            })
            .into_response()
        }
        // Facebook's code exchange carries no grant_type on its documented
        // GET form; the POST form the oauth2 crate sends has one.
        Some("authorization_code") | None => {
            let code = q.get("code").cloned().unwrap_or_default();
            // Single use: the code is gone after the first attempt.
            let Some(grant) = inner.codes.remove(&code) else {
                return grant_error(platform, "Invalid authorization code");
            };
            if grant.expires <= Instant::now() {
                return grant_error(platform, "Invalid authorization code");
            }
            if q.get("redirect_uri") != Some(&grant.redirect_uri) {
                return grant_error(platform, "Parameter redirect_uri does not match");
            }
            if let Some(challenge) = &grant.challenge {
                let verifier = q.get("code_verifier").cloned().unwrap_or_default();
                let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
                if &computed != challenge {
                    return grant_error(platform, "Invalid code verifier.");
                }
            }
            inner.counters.code_exchanges += 1;
            let with_refresh = platform != Platform::Facebook;
            inner.next_grant += 1;
            let id = inner.next_grant;
            let (access, refresh) = token_for(&mut inner, grant.user, id, with_refresh);
            let ttl = match platform {
                // A short-lived token, to be exchanged.
                Platform::Facebook => 3600,
                _ => inner.access_ttl.as_secs(),
            };
            axum::Json(match platform {
                Platform::Twitch => json!({"access_token": access, "refresh_token": refresh, "expires_in": ttl, "scope": grant.scopes, "token_type": "bearer"}),
                Platform::Youtube => json!({"access_token": access, "refresh_token": refresh, "expires_in": ttl, "scope": grant.scopes.join(" "), "token_type": "Bearer"}),
                Platform::Facebook => json!({"access_token": access, "token_type": "bearer", "expires_in": ttl}),
                Platform::Soop => json!({"access_token": access, "refresh_token": refresh, "expires_in": ttl}),
            })
            .into_response()
        }
        _ => grant_error(platform, "unsupported grant_type"),
    }
}

/// The user behind `Authorization: Bearer <token>`, if live.
fn bearer_user(fake: &FakePlatform, headers: &HeaderMap, scheme: &str) -> Option<FakeUser> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix(scheme)?;
    let inner = fake.inner.lock().unwrap();
    let access = inner.access.get(token)?;
    (access.expires > Instant::now()).then(|| access.user.clone())
}

fn unauthorized(platform: Platform) -> Response {
    let body = match platform {
        Platform::Twitch => {
            json!({"error": "Unauthorized", "status": 401, "message": "Invalid OAuth token"})
        }
        Platform::Facebook => {
            json!({"error": {"message": "Invalid OAuth access token.", "type": "OAuthException", "code": 190}})
        }
        Platform::Youtube => {
            json!({"error": {"code": 401, "message": "Request had invalid authentication credentials.", "status": "UNAUTHENTICATED"}})
        }
        Platform::Soop => json!({"result": -1, "data": {"code": -3, "message": "invalid token"}}),
    };
    (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
}

async fn twitch_users(State(fake): State<FakePlatform>, headers: HeaderMap) -> Response {
    if let Some(busy) = api_busy(&mut fake.inner.lock().unwrap()) {
        return busy;
    }
    let client_ok = headers
        .get("client-id")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == fake.inner.lock().unwrap().client_id);
    match bearer_user(&fake, &headers, "Bearer ") {
        Some(user) if client_ok => axum::Json(json!({"data": [{
            "id": user.id, "login": user.login, "display_name": user.name,
            "type": "", "broadcaster_type": "partner", "description": "",
        }]}))
        .into_response(),
        _ => unauthorized(Platform::Twitch),
    }
}

async fn youtube_channels(
    State(fake): State<FakePlatform>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if q.get("mine").map(String::as_str) != Some("true") {
        return (StatusCode::BAD_REQUEST, "mine=true expected").into_response();
    }
    match bearer_user(&fake, &headers, "Bearer ") {
        Some(user) => axum::Json(json!({"kind": "youtube#channelListResponse", "items": [{
            "kind": "youtube#channel", "id": format!("UC{}", user.id),
            "snippet": {"title": user.name, "customUrl": format!("@{}", user.login)},
        }]}))
        .into_response(),
        None => unauthorized(Platform::Youtube),
    }
}

async fn facebook_me(State(fake): State<FakePlatform>, headers: HeaderMap) -> Response {
    match bearer_user(&fake, &headers, "Bearer ") {
        Some(user) => axum::Json(json!({"id": user.id, "name": user.name})).into_response(),
        None => unauthorized(Platform::Facebook),
    }
}

/// A revocation endpoint's 503s and 429s: the token endpoint's knobs, and
/// the one revocation call chosen to fail.
fn revocation_busy(inner: &mut Inner) -> Option<Response> {
    if let Some(busy) = busy(inner) {
        return Some(busy);
    }
    if inner.revocation_failure_in > 0 {
        inner.revocation_failure_in -= 1;
        if inner.revocation_failure_in == 0 {
            return Some((StatusCode::SERVICE_UNAVAILABLE, "upstream overloaded").into_response());
        }
    }
    None
}

async fn facebook_revoke(State(fake): State<FakePlatform>, headers: HeaderMap) -> Response {
    if let Some(busy) = revocation_busy(&mut fake.inner.lock().unwrap()) {
        return busy;
    }
    match bearer_user(&fake, &headers, "Bearer ") {
        Some(_) => {
            fake.inner.lock().unwrap().counters.revocations += 1;
            fake.revoke_everything();
            axum::Json(json!({"success": true})).into_response()
        }
        None => unauthorized(Platform::Facebook),
    }
}

async fn soop_station(State(fake): State<FakePlatform>, headers: HeaderMap) -> Response {
    match bearer_user(&fake, &headers, "Bearer ") {
        Some(user) => axum::Json(
            json!({"result": 1, "data": {"user_id": user.login, "user_nick": user.name}}),
        )
        .into_response(),
        None => unauthorized(Platform::Soop),
    }
}

async fn revoke(
    State(fake): State<FakePlatform>,
    Form(q): Form<HashMap<String, String>>,
) -> Response {
    let mut inner = fake.inner.lock().unwrap();
    if let Some(busy) = revocation_busy(&mut inner) {
        return busy;
    }
    let token = q.get("token").cloned().unwrap_or_default();
    // https://dev.twitch.tv/docs/authentication/revoke-tokens: 404
    // `{"status": 404, "message": "client does not exist"}` for a client id
    // that is not valid.
    if inner.platform == Platform::Twitch && q.get("client_id") != Some(&inner.client_id) {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"status": 404, "message": "client does not exist"})),
        )
            .into_response();
    }
    // An expired access token is as unknown as a revoked one.
    let known = inner
        .access
        .get(&token)
        .is_some_and(|a| a.expires > Instant::now())
        || inner.refresh.contains_key(&token);
    if !known {
        return match inner.platform {
            // https://dev.twitch.tv/docs/authentication/revoke-tokens: 400
            // `{"status": 400, "message": "Invalid token"}` when the client
            // id is valid but the access token is not.
            Platform::Twitch => (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"status": 400, "message": "Invalid token"})),
            )
                .into_response(),
            // https://developers.google.com/identity/protocols/oauth2/web-server#tokenrevoke
            // says only "an HTTP status code 400 is returned along with an
            // error code" and shows no body; this is the body Google's
            // endpoint sends (RFC 7009 §2.2.1 / RFC 6750 `invalid_token`).
            // The classifier's table also runs a 400 without a body.
            _ => (
                StatusCode::BAD_REQUEST,
                axum::Json(
                    json!({"error": "invalid_token", "error_description": "Token expired or revoked"}),
                ),
            )
                .into_response(),
        };
    }
    inner.counters.revocations += 1;
    match inner.platform {
        // Twitch revokes the token presented
        // (dev.twitch.tv/docs/authentication/revoke-tokens), and with it
        // the authorization it came from: other links' grants live on.
        Platform::Twitch | Platform::Soop => {
            let grant = inner
                .access
                .get(&token)
                .map(|a| a.grant)
                .or_else(|| inner.refresh.get(&token).map(|r| r.1));
            inner.access.retain(|_, a| Some(a.grant) != grant);
            inner.refresh.retain(|_, r| Some(r.1) != grant);
        }
        // Google ends the user's whole authorization of the client, every
        // grant of it (developers.google.com/identity/protocols/oauth2/
        // web-server#tokenrevoke: "revoke access given to an application").
        _ => {
            drop(inner);
            fake.revoke_everything();
        }
    }
    StatusCode::OK.into_response()
}

async fn validate(State(fake): State<FakePlatform>, headers: HeaderMap) -> Response {
    {
        let mut inner = fake.inner.lock().unwrap();
        inner.counters.validations += 1;
        if let Some(busy) = api_busy(&mut inner) {
            return busy;
        }
    }
    match bearer_user(&fake, &headers, "OAuth ") {
        Some(user) => {
            let client_id = fake.inner.lock().unwrap().client_id.clone();
            axum::Json(json!({"client_id": client_id, "login": user.login, "scopes": ["user:read:email"], "user_id": user.id, "expires_in": 3600}))
                .into_response()
        }
        None => (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"status": 401, "message": "invalid access token"})),
        )
            .into_response(),
    }
}
