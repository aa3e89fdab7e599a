//! Load generator for BENCHMARKS.md (run through `bench/run`).
//!
//! * `argon2 THREADS SECONDS` — raw argon2id hash rate with the default
//!   parameters, THREADS hashing in parallel, no server involved.
//! * `login ADDR CONCURRENCY SECONDS` — Login throughput against a server.
//! * `validate ADDR CONCURRENCY SECONDS` — ValidateToken throughput and
//!   latency percentiles for one valid token.
//!
//! Every request loop is bounded by its duration and targets loopback only.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version, password_hash::SaltString};
use auth_service::{
    config::Config,
    grpc::pb::{self, auth_service_client::AuthServiceClient},
};
use tonic::transport::Channel;

const PASSWORD: &str = "benchmark password";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn argon2_rate(threads: usize, seconds: u64) {
    let p = Config::default().password;
    let params = Params::new(p.memory_kib, p.iterations, p.parallelism, None).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, count, params) = (stop.clone(), count.clone(), params.clone());
            std::thread::spawn(move || {
                let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
                let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
                while !stop.load(Ordering::Relaxed) {
                    argon.hash_password(PASSWORD.as_bytes(), &salt).unwrap();
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = count.load(Ordering::Relaxed);
    println!(
        "argon2 m={} t={} p={} threads={threads}: {n} hashes in {elapsed:.1}s = {:.1} hashes/s",
        p.memory_kib,
        p.iterations,
        p.parallelism,
        n as f64 / elapsed
    );
}

async fn client(addr: &str) -> AuthServiceClient<Channel> {
    AuthServiceClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

async fn ensure_user(client: &mut AuthServiceClient<Channel>, name: &str) {
    let _ = client
        .create_user(pb::CreateUserRequest {
            email: format!("{name}@example.com"),
            username: name.into(),
            password: PASSWORD.into(),
        })
        .await;
}

/// Runs `concurrency` loops of `call` for `seconds`; prints rate and latency.
async fn drive<F, Fut>(label: &str, concurrency: usize, seconds: u64, call: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if call(i).await {
                        latencies.push(t.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    println!(
        "{label} concurrency={concurrency}: {} ok, {errors} errors in {elapsed:.1}s = {:.1} req/s; p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        all.len(),
        all.len() as f64 / elapsed,
        percentile(&all, 50.0).as_secs_f64() * 1e3,
        percentile(&all, 99.0).as_secs_f64() * 1e3,
        all.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| {
        args.get(i)
            .cloned()
            .unwrap_or_else(|| panic!("usage: loadgen argon2|login|validate ..."))
    };
    match arg(0).as_str() {
        "argon2" => argon2_rate(arg(1).parse().unwrap(), arg(2).parse().unwrap()),
        "login" => {
            let addr = arg(1);
            let concurrency: usize = arg(2).parse().unwrap();
            let mut setup = client(&addr).await;
            // One account per worker so no row is a hotspot.
            for i in 0..concurrency {
                ensure_user(&mut setup, &format!("bench{i}")).await;
            }
            let clients: Arc<Vec<_>> =
                Arc::new(futures::future::join_all((0..concurrency).map(|_| client(&addr))).await);
            drive("Login", concurrency, arg(3).parse().unwrap(), move |i| {
                let mut c = clients[i].clone();
                async move {
                    c.login(pb::LoginRequest {
                        login: format!("bench{i}"),
                        password: PASSWORD.into(),
                    })
                    .await
                    .is_ok()
                }
            })
            .await;
        }
        "validate" => {
            let addr = arg(1);
            let concurrency: usize = arg(2).parse().unwrap();
            let mut setup = client(&addr).await;
            ensure_user(&mut setup, "benchv").await;
            let token = setup
                .login(pb::LoginRequest {
                    login: "benchv".into(),
                    password: PASSWORD.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .access_token;
            let clients: Arc<Vec<_>> =
                Arc::new(futures::future::join_all((0..concurrency).map(|_| client(&addr))).await);
            drive(
                "ValidateToken",
                concurrency,
                arg(3).parse().unwrap(),
                move |i| {
                    let mut c = clients[i].clone();
                    let token = token.clone();
                    async move {
                        c.validate_token(pb::ValidateTokenRequest { token })
                            .await
                            .is_ok()
                    }
                },
            )
            .await;
        }
        other => panic!("unknown mode {other}"),
    }
}
