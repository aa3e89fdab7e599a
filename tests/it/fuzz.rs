//! Fuzzing on the stable toolchain. Every parser that reads untrusted bytes
//! gets the corpus in `fuzz/corpus/<target>/` and, in a bounded run, inputs
//! mutated from it (bit flips, interesting bytes, insertions, deletions,
//! duplications, splices of two entries). Any panic fails the test with the
//! input written to `$TMPDIR/auth-service-fuzz-<target>-*.bin`.
//!
//! `FUZZ_ITERATIONS` (default 3000 per target) and `FUZZ_SEED` (default
//! fixed, so CI runs are reproducible) make longer or other runs:
//! `FUZZ_ITERATIONS=1000000 FUZZ_SEED=$RANDOM scripts/test fuzz::`.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
};

use auth_service::{
    accounts::model::{Email, LoginName, Password, Role, Username},
    authz::policy::{AccessKind, RoutePolicy, RouteRule},
    config::Config,
    envoy::ExtAuthz,
    events::consumer::parse_lifecycle,
    grpc::grpc_timeout,
    startup::Services,
};
use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest};
use uuid::Uuid;

/// xorshift64*: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"\xc3\x28",
    b"\xf0\x9f\x92\xa9",
    b"%00",
    b"..",
    b"/",
    b"*",
    b"**",
    b",",
    b" ",
    b"\r\n",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b"=",
    b".",
    b"-1",
    b"99999999999999999999",
    b"1e308",
    b"Bearer ",
    b"eyJ",
    b"\\u0000",
];

fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let len = out.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let token = INTERESTING[rng.below(INTERESTING.len())];
                out.splice(i..i, token.iter().copied());
            }
            3 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(16)).min(len);
                out.drain(start..end);
            }
            4 if len > 0 => {
                // Repeat a chunk many times: deep nesting, long runs.
                let start = rng.below(len);
                let end = (start + 1 + rng.below(8)).min(len);
                let chunk = out[start..end].to_vec();
                let most = if rng.below(10) == 0 { 4096 } else { 8 };
                let times = 1 + rng.below(most);
                for _ in 0..times {
                    out.splice(end..end, chunk.iter().copied());
                }
            }
            5 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            6 if len > 0 => out.truncate(rng.below(len)),
            _ => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                out.splice(i..i, bytes);
            }
        }
    }
    out
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let entries: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!entries.is_empty(), "the corpus of {target} is empty");
    entries
}

/// Runs `check` on every corpus entry, then on mutated inputs; a panic
/// fails with the input saved.
fn fuzz(target: &str, mut check: impl FnMut(&[u8])) {
    let corpus = corpus(target);
    let iterations = env_u64("FUZZ_ITERATIONS", 3000);
    let mut rng = Rng(env_u64("FUZZ_SEED", 0x5EED_1234_ABCD_0001) | 1);
    let mut run = |input: &[u8]| {
        if catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
            let path = std::env::temp_dir().join(format!(
                "auth-service-fuzz-{target}-{:016x}.bin",
                rng_hash(input)
            ));
            std::fs::write(&path, input).unwrap();
            panic!(
                "{target}: panicked on the input saved at {}",
                path.display()
            );
        }
    };
    for entry in &corpus {
        run(entry);
    }
    for _ in 0..iterations {
        let seed = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, seed, &corpus);
        run(&input);
    }
}

fn rng_hash(input: &[u8]) -> u64 {
    input.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn text(input: &[u8]) -> String {
    String::from_utf8_lossy(input).into_owned()
}

#[test]
fn value_types_email_username_login_password_role() {
    fuzz("values", |input| {
        let s = text(input);
        let _ = Email::parse("email", &s);
        let _ = Username::parse("username", &s);
        let _ = LoginName::parse("login", &s);
        let _ = Password::parse("password", &s, 8, 128);
        let _ = Role::parse("roles", &s);
    });
}

#[test]
fn lifecycle_event_json() {
    fuzz("lifecycle", |input| {
        let _ = parse_lifecycle(input);
    });
}

#[test]
fn toml_configuration() {
    fuzz("config", |input| {
        let _ = Config::from_toml(&text(input));
    });
}

#[test]
fn route_patterns() {
    fuzz("routes", |input| {
        let s = text(input);
        let mut lines = s.lines();
        let pattern = lines.next().unwrap_or_default();
        let rules = vec![RouteRule {
            methods: vec!["GET".into()],
            path: pattern.to_owned(),
            access: AccessKind::Authenticated,
            roles: Vec::new(),
            rate_class: "default".into(),
            services: Vec::new(),
        }];
        if let Ok(policy) = RoutePolicy::compile(&rules, &["default"]) {
            for path in lines {
                let _ = policy.route("GET", path);
            }
        }
    });
}

#[test]
fn grpc_metadata_timeout_bearer_and_forwarded_for() {
    fuzz("metadata", |input| {
        let s = text(input);
        let mut metadata = tonic::codegen::http::HeaderMap::new();
        for (name, value) in [
            "grpc-timeout",
            "authorization",
            "x-forwarded-for",
            "x-request-id",
        ]
        .into_iter()
        .zip(s.split('\n'))
        {
            if let Ok(value) = value.parse() {
                metadata.insert(name, value);
            }
        }
        if let Some(value) = metadata.get("grpc-timeout") {
            let _ = grpc_timeout(value);
        }
        if let Some(id) = auth_service::grpc::stack::request_id(&metadata) {
            assert!((1..=128).contains(&id.len()), "{id:?}");
        }
        let forwarded = metadata
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let _ = auth_service::client_ip(forwarded, Some("127.0.0.1"), 1);
        let _ = auth_service::client_ip(forwarded, None, 3);
        let _ = auth_service::bearer(metadata.get("authorization").and_then(|v| v.to_str().ok()));
    });
}

/// The whole ext_authz Check on the embedded backends: method, path and the
/// headers Envoy forwards (authorization with a JWT, x-forwarded-for,
/// traceparent) and the client certificate it forwards come from the input,
/// one per line. Also the JWT verifier and
/// the device-token check on the raw token.
#[test]
fn check_requests_and_jwts() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = crate::support::base_config(dir.path());
    let services = runtime.block_on(Services::build(&config)).unwrap();
    let ext_authz = ExtAuthz::new(services.authorizer.clone(), 1);
    let tokens = services.tokens.clone();
    fuzz("check", |input| {
        let s = text(input);
        let mut fields = s.split('\n');
        let mut field = || fields.next().unwrap_or_default().to_owned();
        let (method, path, authorization, forwarded, traceparent, certificate) =
            (field(), field(), field(), field(), field(), field());
        let token = authorization
            .strip_prefix("Bearer ")
            .unwrap_or(&authorization);
        let _ = tokens.verify(token);
        let _ = tokens.known_device(token, Uuid::nil());
        let mut request = CheckRequest::default();
        let attributes = request.attributes.get_or_insert_default();
        let http = attributes
            .request
            .get_or_insert_default()
            .http
            .get_or_insert_default();
        http.method = method;
        http.path = path;
        http.headers.insert("authorization".into(), authorization);
        http.headers.insert("x-forwarded-for".into(), forwarded);
        http.headers.insert("traceparent".into(), traceparent);
        // The downstream client certificate as Envoy forwards it
        // (URL-encoded PEM), here whatever the input holds.
        attributes.source.get_or_insert_default().certificate = certificate;
        // As the layer stack hands it over for a trusted proxy (a Check
        // without the stack's Call is refused, tested in adversarial_low).
        let mut request = tonic::Request::new(request);
        let mut call = auth_service::grpc::Call::default();
        call.forwarding_trusted = true;
        request.extensions_mut().insert(std::sync::Arc::new(call));
        let answer = runtime.block_on(ext_authz.check(request));
        assert!(
            answer.is_ok(),
            "a CheckRequest with HTTP attributes is always answered"
        );
    });
}

#[test]
fn platform_responses_and_webhook_inputs() {
    use auth_service::{
        platform_http as provider,
        platforms::{Platform, webhooks},
    };
    fuzz("platform", |input| {
        let s = text(input);
        for platform in Platform::ALL {
            let _ = provider::parse_identity(platform, input);
        }
        let _ = serde_json::from_slice::<provider::PlatformTokenResponse>(input);
        let _ = webhooks::facebook_signed_request_user(&s, b"app-secret");
        if let Some(at) = webhooks::eventsub_timestamp(&s) {
            let _ = webhooks::fresh(
                at,
                time::OffsetDateTime::now_utc(),
                std::time::Duration::from_secs(600),
            );
        }
        let _ = webhooks::eventsub_signature_valid(b"secret", &s, &s, input, &s);
    });
}
