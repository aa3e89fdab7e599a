//! Load generator for BENCHMARKS.md (run through `bench/run`).
//!
//! * `argon2 THREADS SECONDS` — raw argon2id hash rate with the default
//!   parameters, THREADS hashing in parallel, no server involved.
//! * `login ADDR CONCURRENCY SECONDS` — Login throughput against a server.
//! * `validate ADDR CONCURRENCY SECONDS` — ValidateToken throughput and
//!   latency percentiles for one valid token.
//! * `token ADDR NAME` — signs NAME up (if needed), logs in, prints the
//!   access token (for wrk).
//! * `check ADDR RPS SECONDS` — ext_authz Check at a fixed request rate
//!   (open loop), for a valid token on an authenticated route.
//! * `ratelimit ADDR_A ADDR_B SECONDS` — one client IP hammers a public
//!   route (class `public`, per IP 20/s, burst 40) through both replicas at
//!   once; admitted Checks are compared with what one exact GCRA admits.
//! * `signup ADDR CONCURRENCY SECONDS` — CreateUser throughput.
//! * `outbox-cost DATABASE_URL N` — the sign-up transaction's database time
//!   with and without its outbox insert (PostgreSQL, interleaved).
//! * `propagate ADDR_A ADDR_B N` — revocation propagation: log out on
//!   replica A, poll ValidateToken on replica B until it refuses; N rounds.
//!
//! * `flood ADDR RATE SOURCES SECONDS` — login overload: 256 loops send RATE
//!   logins per second in all for unknown accounts, each from one of SOURCES
//!   client addresses (`x-forwarded-for`; `fresh` = a new address per
//!   attempt), while real users log in every 100 ms, alternately a new user
//!   from a new address without a device token and a returning one with its
//!   device token. Reports their latency (unloaded first, then under the
//!   flood) and how fast the excess was refused.
//!
//! * `flood-gateway GATEWAY RATE SOURCES SECONDS` — the same through the
//!   REST gateway, every client a real loopback source address. The real
//!   user runs on a thread and runtime of its own, its two kinds of login
//!   (with and without a device token) in two loops, each every 200 ms, so
//!   a newcomer's refusal held by the service does not delay the device's
//!   logins; with `FLOOD_TRACE=FILE`
//!   each of its logins is appended to FILE (phase, source, status, start
//!   and latency in ms) to match against the service's access log.
//!
//! * `chaos ADDR SECONDS ACKED_FILE` — steady sign-up and ValidateToken load
//!   (4 loops each) while `bench/chaos` breaks backends: prints, per second,
//!   answers by gRPC code and the longest call, and writes the id of every
//!   acknowledged sign-up to ACKED_FILE (to check none was lost).
//! * `many-tokens ADDR KEYS_DIR N [one-address]` — N distinct users' access
//!   tokens, minted with the service's signing key, each checked once through
//!   ext_authz from an address of its own (or all from one), for the memory
//!   benchmark.
//! * `noop-authz PORT_FILE` — an ext_authz server that allows every Check
//!   at once (the ceiling of the ext_authz path); writes its port to
//!   PORT_FILE.
//!
//! Every request loop is bounded by its duration and targets loopback only.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use argon2::{Algorithm, Argon2, Block, Params, Version};
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
                // The best case: one reused memory buffer per thread (what the
                // service's hashing pool does), nothing else on the thread.
                let mut memory = vec![Block::default(); params.block_count()];
                let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
                let mut out = [0u8; 32];
                while !stop.load(Ordering::Relaxed) {
                    argon
                        .hash_password_into_with_memory(
                            PASSWORD.as_bytes(),
                            b"0123456789abcdef",
                            &mut out,
                            &mut memory,
                        )
                        .unwrap();
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

/// Signs `name` up (if needed) and logs in; the access token.
async fn user_token(client: &mut AuthServiceClient<Channel>, name: &str) -> String {
    ensure_user(client, name).await;
    client
        .login(pb::LoginRequest {
            login: name.into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .access_token
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
        "{label} concurrency={concurrency}: {} ok, {errors} errors in {elapsed:.1}s = {:.1} req/s; {}",
        all.len(),
        all.len() as f64 / elapsed,
        latency_summary(&all),
    );
}

/// `p50 …, p99 …, max …` of sorted latencies, in milliseconds.
fn latency_summary(sorted: &[Duration]) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        ms(percentile(sorted, 50.0)),
        ms(percentile(sorted, 99.0)),
        ms(sorted.last().copied().unwrap_or_default()),
    )
}

fn report(label: &str, mut v: Vec<Duration>) {
    v.sort();
    println!("{label}: n={} {}", v.len(), latency_summary(&v));
}

fn from(message: pb::LoginRequest, ip: &str) -> tonic::Request<pb::LoginRequest> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-forwarded-for", ip.parse().unwrap());
    request
}

/// The real user's logins for `seconds`: (without token, with token).
async fn real_user(
    client: &mut AuthServiceClient<Channel>,
    device: &str,
    seconds: u64,
) -> (Vec<Duration>, Vec<Duration>, u64) {
    let (mut plain, mut known, mut refused) = (Vec::new(), Vec::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut i = 0u64;
    while Instant::now() < deadline {
        i += 1;
        let token = if i.is_multiple_of(2) { device } else { "" };
        // A user without a device token is someone arriving for the first
        // time: a new address each time.
        let ip = if token.is_empty() {
            format!("192.0.{}.{}", 2 + (i >> 8) % 250, i & 255)
        } else {
            "198.51.100.1".to_owned()
        };
        let t = Instant::now();
        let answer = client
            .login(from(
                pb::LoginRequest {
                    login: "realuser".into(),
                    password: PASSWORD.into(),
                    device_token: token.into(),
                },
                &ip,
            ))
            .await;
        match answer {
            Ok(_) if token.is_empty() => plain.push(t.elapsed()),
            Ok(_) => known.push(t.elapsed()),
            Err(_) => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (plain, known, refused)
}

/// The pace of flooding loop `i` of `loops` sending `rate` attempts per
/// second in all: one tick per `loops / rate` seconds, the loops' first ticks
/// spread evenly over one period. Started together, the loops would tick
/// together and send their attempts in bursts of `loops` at once (every
/// 256 ms at 1 000/s), which measures how a burst drains, not a flood.
fn flood_pace(i: usize, loops: usize, rate: u64) -> tokio::time::Interval {
    let period = Duration::from_secs_f64(loops as f64 / rate as f64);
    let offset = period.mul_f64(i as f64 / loops as f64);
    let mut pace = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    pace
}

async fn flood(addr: &str, rate: u64, sources: &str, seconds: u64) {
    let attackers = 256;
    let mut c = client(addr).await;
    ensure_user(&mut c, "realuser").await;
    let device = c
        .login(from(
            pb::LoginRequest {
                login: "realuser".into(),
                password: PASSWORD.into(),
                ..Default::default()
            },
            "192.0.2.1",
        ))
        .await
        .unwrap()
        .into_inner()
        .device_token;
    let (plain, known, _) = real_user(&mut c, &device, 5).await;
    report("unloaded, no device token", plain);
    report("unloaded, device token", known);

    let fresh = sources == "fresh";
    let sources: u64 = if fresh { 0 } else { sources.parse().unwrap() };
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..attackers)
        .map(|i| {
            let (stop, counter) = (stop.clone(), counter.clone());
            let addr = addr.to_owned();
            tokio::spawn(async move {
                let mut c = client(&addr).await;
                let (mut refused, mut answered) = (Vec::new(), 0u64);
                let mut pace = flood_pace(i, attackers, rate);
                while !stop.load(Ordering::Relaxed) {
                    pace.tick().await;
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let id = if fresh { n } else { n % sources };
                    let ip = format!("10.{}.{}.{}", (id >> 16) & 255, (id >> 8) & 255, id & 255);
                    let t = Instant::now();
                    let answer = c
                        .login(from(
                            pb::LoginRequest {
                                login: format!("nobody{i}x{n}"),
                                password: "guess guess".into(),
                                ..Default::default()
                            },
                            &ip,
                        ))
                        .await;
                    match answer {
                        Err(s) if s.code() == tonic::Code::Unavailable => refused.push(t.elapsed()),
                        _ => answered += 1,
                    }
                }
                (refused, answered, 0)
            })
        })
        .collect();
    let started = Instant::now();
    let real = real_user(&mut c, &device, seconds).await;
    stop.store(true, Ordering::Relaxed);
    let sources = if fresh {
        "fresh".to_owned()
    } else {
        sources.to_string()
    };
    let what = format!("flood: {attackers} loops at {rate}/s from {sources} sources");
    flood_report(&what, "", started, tasks, real).await;
}

/// One flooding loop's tally: refusal latencies, answered (hashed), other.
type FloodTally = (Vec<Duration>, u64, u64);

/// Waits for the flooding loops (already told to stop) and prints the
/// flood's rates and the latencies; `prefix` starts every latency label.
async fn flood_report(
    what: &str,
    prefix: &str,
    started: Instant,
    tasks: Vec<tokio::task::JoinHandle<FloodTally>>,
    (plain, known, real_refused): (Vec<Duration>, Vec<Duration>, u64),
) {
    let (mut refused, mut answered, mut other) = (Vec::new(), 0, 0);
    for t in tasks {
        let (r, a, o) = t.await.unwrap();
        refused.extend(r);
        answered += a;
        other += o;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{what}: {:.0} attempts/s sent, {:.0}/s hashed, {:.0}/s refused, {other} other; real user refused {real_refused} times",
        (answered as f64 + refused.len() as f64 + other as f64) / elapsed,
        answered as f64 / elapsed,
        refused.len() as f64 / elapsed,
    );
    let fast = refused
        .iter()
        .filter(|d| **d <= Duration::from_millis(5))
        .count();
    println!(
        "{prefix}refusals answered within 5 ms at the client: {:.1} %",
        100.0 * fast as f64 / refused.len().max(1) as f64
    );
    report(&format!("{prefix}refusal latency"), refused);
    report(&format!("{prefix}under flood, no device token"), plain);
    report(&format!("{prefix}under flood, device token"), known);
}

/// An HTTP client of the gateway whose connections come from `source`
/// (a 127.0.0.0/8 address): Envoy sees that address as the client and
/// puts it in x-forwarded-for itself.
fn gateway_client(source: std::net::IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(source)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A loopback address for attempt `n` whose /24 differs from the last
/// 30,719 attempts' (first octet after 127 in 1..=120).
fn spread_loopback(n: u64) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(
        127,
        1 + (n % 120) as u8,
        (n / 120) as u8,
        (n / 30_720) as u8,
    )
    .into()
}

fn loopback(id: u64) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(127, 1 + ((id >> 16) & 127) as u8, (id >> 8) as u8, id as u8).into()
}

/// POST /v1/auth/login through the gateway: the status and the body.
async fn gateway_login(
    client: &reqwest::Client,
    gateway: &str,
    login: &str,
    password: &str,
    device_token: &str,
) -> (u16, serde_json::Value) {
    let body =
        serde_json::json!({ "login": login, "password": password, "device_token": device_token });
    match client
        .post(format!("http://{gateway}/v1/auth/login"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or_default())
        }
        Err(_) => (0, serde_json::Value::Null),
    }
}

/// The real user's logins through the gateway for `seconds`: every 200 ms
/// with its device token from its usual address `usual`, and, in a loop of
/// its own (so a refused and held newcomer does not delay the device's
/// logins), every 200 ms without one from a new address each time. Returns
/// the latencies of the logins without and with the token, and how many
/// were refused. With `FLOOD_TRACE` set to a file, appends one line per
/// login (phase, source address, status, milliseconds since the start,
/// latency in ms), to match against the service's access log.
async fn probe_gateway_logins(
    gateway: &str,
    device: &str,
    usual: std::net::IpAddr,
    seconds: u64,
    phase: &str,
) -> (Vec<Duration>, Vec<Duration>, u64) {
    let started = Instant::now();
    let ((plain, plain_refused), (known, known_refused)) = tokio::join!(
        probe_gateway_kind(gateway, None, usual, started, seconds, phase),
        probe_gateway_kind(gateway, Some(device), usual, started, seconds, phase),
    );
    (plain, known, plain_refused + known_refused)
}

/// One kind of [`probe_gateway_logins`]: with `device` from `usual`, or
/// without a device token from a new address each time.
async fn probe_gateway_kind(
    gateway: &str,
    device: Option<&str>,
    usual: std::net::IpAddr,
    started: Instant,
    seconds: u64,
    phase: &str,
) -> (Vec<Duration>, u64) {
    use std::io::Write as _;
    let mut trace = std::env::var_os("FLOOD_TRACE").map(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
    });
    let user = gateway_client(usual);
    let (mut latencies, mut refused) = (Vec::new(), 0u64);
    let deadline = started + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        let (client, source) = if device.is_some() {
            (user.clone(), usual)
        } else {
            // Someone new: a new address in a network (/24) of its own,
            // not one the flood draws from (those are below 127.200).
            static NEWCOMERS: AtomicU64 = AtomicU64::new(0);
            let n = NEWCOMERS.fetch_add(1, Ordering::Relaxed);
            let source =
                std::net::Ipv4Addr::new(127, 200 + ((n >> 8) % 50) as u8, n as u8, 7).into();
            (gateway_client(source), source)
        };
        let t = Instant::now();
        let (status, _) =
            gateway_login(&client, gateway, "realuser", PASSWORD, device.unwrap_or("")).await;
        let took = t.elapsed();
        if status == 200 {
            latencies.push(took);
        } else {
            refused += 1;
        }
        if let Some(file) = trace.as_mut() {
            let at = t.duration_since(started).as_secs_f64() * 1e3;
            let ms = took.as_secs_f64() * 1e3;
            writeln!(file, "{phase} {source} {status} {at:.1} {ms:.3}").unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (latencies, refused)
}

/// The login flood of `flood`, through the REST gateway (Envoy on the
/// shipped gateway.yaml) with every source a real loopback address: 64
/// fixed sources, a fresh address per attempt ("fresh": consecutive
/// addresses, 256 to a /24 network), or a fresh address in a fresh network
/// per attempt ("spread": a /24 comes back after 30,720 attempts, as from a
/// botnet spread across the internet).
async fn flood_gateway(gateway: &str, rate: u64, sources: &str, seconds: u64) {
    let attackers = 256;
    let spread = sources == "spread";
    let fresh = sources == "fresh" || spread;
    let sources: u64 = if fresh { 0 } else { sources.parse().unwrap() };
    let user_source: std::net::IpAddr = std::net::Ipv4Addr::new(127, 250, 0, 1).into();
    let user = gateway_client(user_source);
    let sign_up = serde_json::json!({ "email": "realuser@example.com", "username": "realuser", "password": PASSWORD });
    let r = user
        .post(format!("http://{gateway}/v1/users"))
        .json(&sign_up)
        .send()
        .await
        .expect("the gateway answers");
    assert!(
        r.status().is_success() || r.status().as_u16() == 409,
        "sign-up: {}",
        r.status()
    );
    let (status, first) = gateway_login(&user, gateway, "realuser", PASSWORD, "").await;
    assert_eq!(status, 200, "{first}");
    let device = first["device_token"].as_str().unwrap().to_owned();

    // The real user: with the device token from its usual address, and
    // without one from a new address each time (someone new). It runs on a
    // thread and runtime of its own, as a client on another machine would:
    // its calls do not wait for the load generator's flood tasks to be
    // polled, only for the gateway and the service.
    let real = |seconds: u64, label: &'static str| {
        let (gateway, device) = (gateway.to_owned(), device.clone());
        let probe = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(probe_gateway_logins(
                    &gateway,
                    &device,
                    user_source,
                    seconds,
                    label,
                ))
        });
        async move {
            tokio::task::spawn_blocking(move || probe.join().unwrap())
                .await
                .unwrap()
        }
    };
    let (plain, known, _) = real(5, "unloaded").await;
    report("gateway, unloaded, no device token", plain);
    report("gateway, unloaded, device token", known);

    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    // FLOOD_SHAPE: `open` (each loop at its pace: RATE/s in all, the
    // default), `closed` (each loop sends its next attempt as soon as the
    // last is answered: as fast as the service answers), `ramp` (open
    // loop rising from 5 % of RATE to RATE over the run), `mixed` (open
    // loop, half the loops from the fixed sources, half from a fresh
    // address per attempt).
    let shape: &'static str = match std::env::var("FLOOD_SHAPE").as_deref() {
        Ok("closed") => "closed",
        Ok("ramp") => "ramp",
        Ok("mixed") => "mixed",
        _ => "open",
    };
    let sources = if shape == "mixed" && sources == 0 {
        64
    } else {
        sources
    };
    let flood_started = Instant::now();
    let fixed: Arc<Vec<reqwest::Client>> = Arc::new(
        (0..sources)
            .map(|id| gateway_client(loopback(id)))
            .collect(),
    );
    let tasks: Vec<_> = (0..attackers)
        .map(|i| {
            let (stop, counter, fixed) = (stop.clone(), counter.clone(), fixed.clone());
            let gateway = gateway.to_owned();
            tokio::spawn(async move {
                let (mut refused, mut answered, mut other) = (Vec::new(), 0u64, 0u64);
                let mut pace = flood_pace(i, attackers, rate);
                let fresh = fresh || (shape == "mixed" && i % 2 == 0);
                while !stop.load(Ordering::Relaxed) {
                    match shape {
                        "closed" => {}
                        "ramp" => {
                            let share = (flood_started.elapsed().as_secs_f64() / seconds as f64)
                                .clamp(0.05, 1.0);
                            tokio::time::sleep(Duration::from_secs_f64(
                                attackers as f64 / (rate as f64 * share),
                            ))
                            .await;
                        }
                        _ => {
                            pace.tick().await;
                        }
                    }
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let client = if spread {
                        gateway_client(spread_loopback(n))
                    } else if fresh {
                        gateway_client(loopback(n))
                    } else {
                        fixed[(n % sources) as usize].clone()
                    };
                    let t = Instant::now();
                    let login = format!("nobody{i}x{n}");
                    match gateway_login(&client, &gateway, &login, "guess guess", "")
                        .await
                        .0
                    {
                        503 | 429 => refused.push(t.elapsed()),
                        401 => answered += 1,
                        _ => other += 1,
                    }
                }
                (refused, answered, other)
            })
        })
        .collect();
    let started = Instant::now();
    let real = real(seconds, if fresh { "fresh" } else { "64" }).await;
    stop.store(true, Ordering::Relaxed);
    let sources = if spread {
        "spread".to_owned()
    } else if fresh {
        "fresh".to_owned()
    } else {
        sources.to_string()
    };
    let what = format!(
        "gateway flood ({shape}): {attackers} loops at {rate}/s from {sources} loopback sources (hashed: 401, refused: 503/429)"
    );
    flood_report(&what, "gateway, ", started, tasks, real).await;
}

async fn chaos(addr: &str, seconds: u64, acked_file: &str) {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    let mut setup = client(addr).await;
    let token = user_token(&mut setup, "chaosv").await;
    // (second, code) -> count; second -> longest call.
    let counts = Arc::new(Mutex::new(BTreeMap::<(u64, String), u64>::new()));
    let slowest = Arc::new(Mutex::new(BTreeMap::<u64, Duration>::new()));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let serial = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (counts, slowest, acked, serial) = (
                counts.clone(),
                slowest.clone(),
                acked.clone(),
                serial.clone(),
            );
            let (addr, token) = (addr.to_owned(), token.clone());
            tokio::spawn(async move {
                let mut c = client(&addr).await;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let (code, id) = if i % 2 == 0 {
                        let n = serial.fetch_add(1, Ordering::Relaxed);
                        let name = format!("chaos{}x{n}", std::process::id());
                        let answer = c
                            .create_user(pb::CreateUserRequest {
                                email: format!("{name}@example.com"),
                                username: name,
                                password: PASSWORD.into(),
                            })
                            .await;
                        match answer {
                            Ok(r) => ("OK".to_owned(), r.into_inner().user.map(|u| u.id)),
                            Err(s) => (format!("{:?}", s.code()), None),
                        }
                    } else {
                        let request = pb::ValidateTokenRequest {
                            token: token.clone(),
                        };
                        match c.validate_token(request).await {
                            Ok(_) => ("OK".to_owned(), None),
                            Err(s) => (format!("{:?}", s.code()), None),
                        }
                    };
                    let took = t.elapsed();
                    let second = t.duration_since(started).as_secs();
                    {
                        *counts.lock().unwrap().entry((second, code)).or_default() += 1;
                        let mut slow = slowest.lock().unwrap();
                        let entry = slow.entry(second).or_default();
                        *entry = (*entry).max(took);
                        if let Some(id) = id {
                            acked.lock().unwrap().push(id);
                        }
                    }
                    if took < Duration::from_millis(5) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    let counts = counts.lock().unwrap();
    let slowest = slowest.lock().unwrap();
    for second in 0..seconds {
        let line: Vec<String> = counts
            .iter()
            .filter(|((s, _), _)| *s == second)
            .map(|((_, code), n)| format!("{code} {n}"))
            .collect();
        println!(
            "t={second:>2}s  {:<60} longest {:.0} ms",
            line.join(", "),
            slowest
                .get(&second)
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3
        );
    }
    let acked = acked.lock().unwrap();
    std::fs::write(acked_file, acked.join("\n")).unwrap();
    println!("{} sign-ups acknowledged", acked.len());
}

/// Mints `n` access tokens of `n` distinct users with the service's own
/// signing key (`keys_dir`), as `n` logins would, and has each checked once
/// through ext_authz from an address of its own. Prints how many were allowed.
async fn many_tokens(addr: &str, keys_dir: &str, n: usize, one_address: bool) {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let config = Config::default().tokens;
    let ring = auth_service::tokens::keys::KeyRing::load(std::path::Path::new(keys_dir), false)
        .expect("the service's keys");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some(ring.signing_kid().to_owned());
    let now = auth_service::unix_now();
    let tokens: Vec<String> = (0..n)
        .map(|_| {
            let claims = auth_service::tokens::Claims {
                iss: config.issuer.clone(),
                aud: config.audience.clone(),
                sub: uuid::Uuid::now_v7(),
                exp: now + 900,
                iat: now,
                nbf: now,
                jti: uuid::Uuid::now_v7(),
                sid: uuid::Uuid::now_v7(),
                roles: vec!["user".into()],
                roles_csv: "user".into(),
            };
            jsonwebtoken::encode(&header, &claims, ring.signing_key().expect("a signing key"))
                .unwrap()
        })
        .collect();
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let tokens = Arc::new(tokens);
    let next = Arc::new(AtomicU64::new(0));
    let allowed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (tokens, next, allowed) = (tokens.clone(), next.clone(), allowed.clone());
            let mut authz = AuthorizationClient::new(channel.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(token) = tokens.get(i) else { break };
                    let ip = if one_address {
                        "10.0.0.1".to_owned()
                    } else {
                        format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
                    };
                    let answer = authz
                        .check(check_request_from(token, &ip))
                        .await
                        .unwrap()
                        .into_inner();
                    if answer.status.is_some_and(|s| s.code == 0) {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    println!(
        "{n} distinct tokens checked once each in {:.1} s: {} allowed",
        started.elapsed().as_secs_f64(),
        allowed.load(Ordering::Relaxed)
    );
}

/// The fake platforms of the integration tests, here as the platform the
/// GetPlatformAccessToken benchmark refreshes against.
#[path = "../tests/it/fake_platform.rs"]
#[allow(dead_code)]
mod fake_platform;

/// Runs a fake Twitch with `latency_ms` on its token endpoint and access
/// tokens living `ttl_secs`; writes the service's `AUTH_PLATFORMS__TWITCH__*`
/// settings to `env_file`, then serves until killed.
async fn fake_platform_server(latency_ms: u64, ttl_secs: u64, env_file: &str) {
    use auth_service::platforms::Platform;
    use secrecy::ExposeSecret;
    let fake = fake_platform::FakePlatform::start(Platform::Twitch).await;
    fake.set_latency(Duration::from_millis(latency_ms));
    fake.set_access_ttl(Duration::from_secs(ttl_secs));
    fake.new_user_each_time();
    let c = fake.config();
    let mut env = String::new();
    for (key, value) in [
        ("CLIENT_ID", c.client_id.clone().unwrap()),
        (
            "CLIENT_SECRET",
            c.client_secret.as_ref().unwrap().expose_secret().to_owned(),
        ),
        ("REDIRECT_URI", c.redirect_uri.clone().unwrap()),
        ("AUTH_URL", c.auth_url.clone()),
        ("TOKEN_URL", c.token_url.clone()),
        ("API_URL", c.api_url.clone()),
        ("REVOKE_URL", c.revoke_url.clone().unwrap()),
        ("VALIDATE_URL", c.validate_url.clone().unwrap()),
    ] {
        env.push_str(&format!("AUTH_PLATFORMS__TWITCH__{key}={value}\n"));
    }
    std::fs::write(env_file, env).unwrap();
    std::future::pending::<()>().await;
}

/// Signs up `users` users and links each to its own Twitch account through
/// the fake (start, the browser's round trip, connect); writes their ids.
async fn platform_setup(addr: &str, users: usize, ids_file: &str) {
    let mut c = client(addr).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut ids = String::new();
    for i in 0..users {
        let token = user_token(&mut c, &format!("pbench{i}")).await;
        let started = c
            .start_platform_link(bearer(
                pb::StartPlatformLinkRequest {
                    platform: pb::Platform::Twitch as i32,
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        let location = http
            .get(&started.authorization_url)
            .send()
            .await
            .unwrap()
            .headers()["location"]
            .to_str()
            .unwrap()
            .to_owned();
        let back: std::collections::HashMap<String, String> = url::Url::parse(&location)
            .unwrap()
            .query_pairs()
            .into_owned()
            .collect();
        c.connect_platform_account(bearer(
            pb::ConnectPlatformAccountRequest {
                platform: pb::Platform::Twitch as i32,
                code: back["code"].clone(),
                state: back["state"].clone(),
                error: String::new(),
            },
            &token,
        ))
        .await
        .unwrap();
        let id = c
            .validate_token(pb::ValidateTokenRequest { token })
            .await
            .unwrap()
            .into_inner()
            .user_id;
        ids.push_str(&id);
        ids.push('\n');
    }
    ensure_user(&mut c, "pbenchsvc").await;
    std::fs::write(ids_file, ids).unwrap();
    println!("linked {users} users to the fake Twitch");
}

/// GetPlatformAccessToken for the users in `ids_file`, round robin, as the
/// `pbenchsvc` service user.
async fn platform_token(addr: &str, ids_file: &str, concurrency: usize, seconds: u64) {
    let mut c = client(addr).await;
    let service = user_token(&mut c, "pbenchsvc").await;
    let ids: Arc<Vec<String>> = Arc::new(
        std::fs::read_to_string(ids_file)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect(),
    );
    let next = Arc::new(AtomicU64::new(0));
    drive("GetPlatformAccessToken", concurrency, seconds, move |_| {
        let mut c = c.clone();
        let (ids, next, service) = (ids.clone(), next.clone(), service.clone());
        async move {
            let n = next.fetch_add(1, Ordering::Relaxed) as usize;
            let user_id = ids[n.wrapping_mul(7919) % ids.len()].clone();
            c.get_platform_access_token(bearer(
                pb::GetPlatformAccessTokenRequest {
                    user_id,
                    platform: pb::Platform::Twitch as i32,
                    ..Default::default()
                },
                &service,
            ))
            .await
            .is_ok()
        }
    })
    .await;
}

fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Revocation on replica `a` to delivery on a WatchRevocations stream from
/// replica `b`, `rounds` times (users `benchadm` and `benchsvc` hold the
/// admin and service roles).
async fn watch_latency(a: &str, b: &str, rounds: usize) {
    let mut ca = client(a).await;
    let mut cb = client(b).await;
    let admin = user_token(&mut ca, "benchadm").await;
    let service = user_token(&mut ca, "benchsvc").await;
    let mut stream = cb
        .watch_revocations(bearer(
            pb::WatchRevocationsRequest {
                cursor: String::new(),
            },
            &service,
        ))
        .await
        .unwrap()
        .into_inner();
    ensure_user(&mut ca, "benchvictim").await;
    let victim = {
        let t = user_token(&mut ca, "benchvictim").await;
        ca.validate_token(pb::ValidateTokenRequest { token: t })
            .await
            .unwrap()
            .into_inner()
            .user_id
    };
    let mut latencies = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        ca.revoke_user_sessions(bearer(
            pb::RevokeUserSessionsRequest {
                user_id: victim.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
        loop {
            let event = stream.message().await.unwrap().unwrap();
            if event.user_id == victim && event.kind == "sessions_revoked" {
                break;
            }
        }
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report(
        "WatchRevocations: RevokeUserSessions on A -> event on a stream from B",
        latencies,
    );
}

/// An OTLP/gRPC trace receiver that counts what it gets (the collector's
/// `TraceService/Export`); prints the count every `SECS`.
/// An ext_authz server that does nothing: every Check is allowed at once,
/// with no headers. The ceiling of the ext_authz path (Envoy's hop and
/// tonic), against which auth-service's own Check is measured.
async fn noop_authz(port_file: &str) {
    use envoy_types::pb::{
        envoy::service::auth::v3::{
            CheckRequest, CheckResponse, OkHttpResponse,
            authorization_server::{Authorization, AuthorizationServer},
            check_response::HttpResponse,
        },
        google::rpc::Status,
    };
    struct Allow;
    #[tonic::async_trait]
    impl Authorization for Allow {
        async fn check(
            &self,
            _: tonic::Request<CheckRequest>,
        ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
            Ok(tonic::Response::new(CheckResponse {
                status: Some(Status::default()),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
                ..Default::default()
            }))
        }
    }
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(Allow))
        .serve_with_incoming(listen_on_port_file(port_file).await)
        .await
        .unwrap();
}

/// A loopback listener on a free port, whose number is written to
/// `port_file` (for `bench/run` to read).
async fn listen_on_port_file(port_file: &str) -> tokio_stream::wrappers::TcpListenerStream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    std::fs::write(port_file, listener.local_addr().unwrap().port().to_string()).unwrap();
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}

async fn otlp_sink(port_file: &str) {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    };
    #[derive(Clone, Default)]
    struct Sink(Arc<AtomicU64>);
    #[tonic::async_trait]
    impl TraceService for Sink {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let n: usize = request
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|r| r.scope_spans.iter())
                .map(|s| s.spans.len())
                .sum();
            self.0.fetch_add(n as u64, Ordering::Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }
    let incoming = listen_on_port_file(port_file).await;
    let sink = Sink::default();
    let count = sink.0.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            eprintln!("otlp sink: {} spans", count.load(Ordering::Relaxed));
        }
    });
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve_with_incoming(incoming)
        .await
        .unwrap();
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
        "chaos" => chaos(&arg(1), arg(2).parse().unwrap(), &arg(3)).await,
        "many-tokens" => {
            let one_address = args.get(4).is_some_and(|a| a == "one-address");
            many_tokens(&arg(1), &arg(2), arg(3).parse().unwrap(), one_address).await
        }
        "flood-gateway" => {
            flood_gateway(
                &arg(1),
                arg(2).parse().unwrap(),
                &arg(3),
                arg(4).parse().unwrap(),
            )
            .await
        }
        "flood" => {
            flood(
                &arg(1),
                arg(2).parse().unwrap(),
                &arg(3),
                arg(4).parse().unwrap(),
            )
            .await
        }
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
                        ..Default::default()
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
            let token = user_token(&mut setup, "benchv").await;
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
        "token" => {
            let mut c = client(&arg(1)).await;
            println!("{}", user_token(&mut c, &arg(2)).await);
        }
        "check" => check_load(&arg(1), arg(2).parse().unwrap(), arg(3).parse().unwrap()).await,
        "propagate" => propagate(&arg(1), &arg(2), arg(3).parse().unwrap()).await,
        "ratelimit" => ratelimit_error(&arg(1), &arg(2), arg(3).parse().unwrap()).await,
        "edge-propagate" => edge_propagate(&arg(1), &arg(2), arg(3).parse().unwrap()).await,
        "signup" => {
            let addr = arg(1);
            let concurrency: usize = arg(2).parse().unwrap();
            let clients: Arc<Vec<_>> =
                Arc::new(futures::future::join_all((0..concurrency).map(|_| client(&addr))).await);
            let counter = Arc::new(AtomicU64::new(0));
            let run = std::process::id();
            drive(
                "CreateUser",
                concurrency,
                arg(3).parse().unwrap(),
                move |i| {
                    let mut c = clients[i].clone();
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let name = format!("s{run}x{n}");
                        c.create_user(pb::CreateUserRequest {
                            email: format!("{name}@example.com"),
                            username: name,
                            password: PASSWORD.into(),
                        })
                        .await
                        .is_ok()
                    }
                },
            )
            .await;
        }
        "outbox-cost" => outbox_cost(&arg(1), arg(2).parse().unwrap()).await,
        "fake-platform" => {
            fake_platform_server(arg(1).parse().unwrap(), arg(2).parse().unwrap(), &arg(3)).await
        }
        "otlp-sink" => otlp_sink(&arg(1)).await,
        "noop-authz" => noop_authz(&arg(1)).await,
        "watch-latency" => watch_latency(&arg(1), &arg(2), arg(3).parse().unwrap()).await,
        "platform-setup" => platform_setup(&arg(1), arg(2).parse().unwrap(), &arg(3)).await,
        "platform-token" => {
            platform_token(
                &arg(1),
                &arg(2),
                arg(3).parse().unwrap(),
                arg(4).parse().unwrap(),
            )
            .await
        }
        other => panic!("unknown mode {other}"),
    }
}

fn check_request(token: &str) -> envoy_types::ext_authz::v3::pb::CheckRequest {
    check_request_from(token, "203.0.113.50")
}

fn check_request_from(token: &str, ip: &str) -> envoy_types::ext_authz::v3::pb::CheckRequest {
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
    let headers = [
        ("authorization".to_owned(), format!("Bearer {token}")),
        ("x-forwarded-for".to_owned(), ip.to_owned()),
    ];
    envoy_types::ext_authz::v3::pb::CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: "/api/videos".into(),
                    headers: headers.into_iter().collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// Open loop: one Check every 1/RPS seconds regardless of answers, so slow
/// answers show up as latency instead of lowering the rate.
async fn check_load(addr: &str, rps: u64, seconds: u64) {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let mut setup = client(addr).await;
    let token = user_token(&mut setup, "benchc").await;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let authz = AuthorizationClient::new(channel);
    let request = check_request(&token);
    // Warm-up: the first Check verifies the JWT; later ones hit the cache.
    authz.clone().check(request.clone()).await.unwrap();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rps));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    while Instant::now() < deadline {
        ticker.tick().await;
        let mut c = authz.clone();
        let r = request.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let ok = c
                .check(r)
                .await
                .map(|resp| resp.into_inner().status.is_some_and(|s| s.code == 0))
                .unwrap_or(false);
            (t.elapsed(), ok)
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut denied = 0;
    for t in tasks {
        let (l, ok) = t.await.unwrap();
        if !ok {
            denied += 1;
        }
        latencies.push(l);
    }
    latencies.sort();
    println!(
        "Check open-loop {rps} rps for {seconds}s: {} calls, {denied} not allowed; client round trip p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms",
        latencies.len(),
        percentile(&latencies, 50.0).as_secs_f64() * 1e3,
        percentile(&latencies, 99.0).as_secs_f64() * 1e3,
        percentile(&latencies, 99.9).as_secs_f64() * 1e3,
    );
}

/// Logs out on A and measures until B refuses the token.
async fn propagate(a: &str, b: &str, rounds: usize) {
    let mut a = client(a).await;
    let mut b = client(b).await;
    ensure_user(&mut a, "benchp").await;
    let mut delays = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let pair = a
            .login(pb::LoginRequest {
                login: "benchp".into(),
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // B caches "not revoked" for this token first.
        b.validate_token(pb::ValidateTokenRequest {
            token: pair.access_token.clone(),
        })
        .await
        .unwrap();
        let mut logout = tonic::Request::new(pb::LogoutRequest {
            refresh_token: pair.refresh_token.clone(),
        });
        logout.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", pair.access_token).parse().unwrap(),
        );
        let started = Instant::now();
        a.logout(logout).await.unwrap();
        loop {
            if b.validate_token(pb::ValidateTokenRequest {
                token: pair.access_token.clone(),
            })
            .await
            .is_err()
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "revocation never reached B"
            );
        }
        delays.push(started.elapsed());
    }
    delays.sort();
    println!(
        "revocation propagation A->B over {rounds} rounds (from Logout call start to B's first refusal): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&delays, 50.0).as_secs_f64() * 1e3,
        percentile(&delays, 99.0).as_secs_f64() * 1e3,
        delays.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

/// Edge mode: for `rounds` sessions, the time from Logout's answer to the
/// first request each Envoy (`envoys`: comma-separated host:port of edge
/// gateways) refuses with 403, polling all of them at once over kept-alive
/// connections. Each token is first seen valid by every Envoy (its JWT
/// cache holds it).
async fn edge_propagate(grpc: &str, envoys: &str, rounds: usize) {
    let mut a = client(grpc).await;
    ensure_user(&mut a, "benchedge").await;
    let envoys: Vec<String> = envoys.split(',').map(str::to_owned).collect();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut per_envoy: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); envoys.len()];
    for _ in 0..rounds {
        let pair = a
            .login(pb::LoginRequest {
                login: "benchedge".into(),
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let auth = format!("Bearer {}", pair.access_token);
        for envoy in &envoys {
            let r = http
                .get(format!("http://{envoy}/api/x"))
                .header("authorization", &auth)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{envoy} refused a valid token");
        }
        let mut logout = tonic::Request::new(pb::LogoutRequest {
            refresh_token: pair.refresh_token.clone(),
        });
        logout
            .metadata_mut()
            .insert("authorization", auth.parse().unwrap());
        a.logout(logout).await.unwrap();
        let answered = Instant::now();
        let waits = futures::future::join_all(envoys.iter().map(|envoy| {
            let (http, auth) = (http.clone(), auth.clone());
            async move {
                loop {
                    let r = http
                        .get(format!("http://{envoy}/api/x"))
                        .header("authorization", &auth)
                        .send()
                        .await
                        .unwrap();
                    if r.status() == 403 {
                        return answered.elapsed();
                    }
                    assert!(
                        answered.elapsed() < Duration::from_secs(10),
                        "the revocation never reached {envoy}"
                    );
                }
            }
        }))
        .await;
        for (i, wait) in waits.into_iter().enumerate() {
            per_envoy[i].push(wait);
        }
    }
    let mut all = Vec::new();
    for (i, delays) in per_envoy.iter_mut().enumerate() {
        delays.sort();
        println!(
            "edge propagation to envoy {} over {rounds} revocations (Logout's answer to its first 403): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            i + 1,
            percentile(delays, 50.0).as_secs_f64() * 1e3,
            percentile(delays, 99.0).as_secs_f64() * 1e3,
            delays.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
        all.extend_from_slice(delays);
    }
    all.sort();
    println!(
        "edge propagation, all {} envoy-revocations: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        all.len(),
        percentile(&all, 50.0).as_secs_f64() * 1e3,
        percentile(&all, 99.0).as_secs_f64() * 1e3,
        all.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

async fn ratelimit_error(a: &str, b: &str, seconds: u64) {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let limit = auth_service::config::Config::default().authz.rate_limits["public"]
        .per_ip
        .unwrap();
    let ip = format!("198.51.100.{}", std::process::id() % 250);
    let mut request = check_request("none");
    {
        let http = request
            .attributes
            .as_mut()
            .unwrap()
            .request
            .as_mut()
            .unwrap()
            .http
            .as_mut()
            .unwrap();
        http.method = "POST".into();
        http.path = "/v1/users".into();
        http.headers.remove("authorization");
        http.headers.insert("x-forwarded-for".into(), ip);
    }
    let mut clients = Vec::new();
    for addr in [a, b] {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        clients.push(AuthorizationClient::new(channel));
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let mut c = clients[i % 2].clone();
            let r = request.clone();
            tokio::spawn(async move {
                let mut allowed = 0u64;
                let mut total = 0u64;
                while Instant::now() < deadline {
                    let ok = c
                        .check(r.clone())
                        .await
                        .unwrap()
                        .into_inner()
                        .status
                        .is_some_and(|s| s.code == 0);
                    allowed += u64::from(ok);
                    total += 1;
                }
                (allowed, total)
            })
        })
        .collect();
    let (mut allowed, mut total) = (0, 0);
    for t in tasks {
        let (a, n) = t.await.unwrap();
        allowed += a;
        total += n;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let exact =
        f64::from(limit.burst) + elapsed * f64::from(limit.requests) / limit.per_secs as f64;
    println!(
        "rate limit across 2 replicas, one IP, {total} Checks in {elapsed:.1}s: admitted {allowed}, exact GCRA {exact:.1} (burst {} + {}/s), error {:+.1}; documented bound +-{} (lease {} x 2 replicas)",
        limit.burst,
        limit.requests,
        allowed as f64 - exact,
        limit.lease() * 2,
        limit.lease()
    );
}

async fn outbox_cost(url: &str, rounds: usize) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let mut with = Vec::with_capacity(rounds);
    let mut without = Vec::with_capacity(rounds);
    for i in 0..rounds * 2 {
        let outbox = i % 2 == 0;
        let id = uuid::Uuid::now_v7();
        let now = time::OffsetDateTime::now_utc();
        let started = Instant::now();
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("INSERT INTO users (id, email, username, password_hash, roles, status, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'active', $6, $6)")
            .bind(id)
            .bind(format!("{id}@example.com"))
            .bind(id.to_string())
            .bind("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g")
            .bind(sqlx::types::Json(["user"]))
            .bind(now)
            .execute(&mut *tx)
            .await
            .unwrap();
        if outbox {
            sqlx::query("INSERT INTO outbox (id, event_type, user_id, occurred_at, payload, traceparent) VALUES ($1, 'user_created', $2, $3, $4, NULL)")
                .bind(uuid::Uuid::now_v7())
                .bind(id)
                .bind(now)
                .bind(sqlx::types::Json(serde_json::json!({ "email": format!("{id}@example.com"), "username": id.to_string(), "roles": ["user"] })))
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        if outbox {
            with.push(started.elapsed())
        } else {
            without.push(started.elapsed())
        }
    }
    with.sort();
    without.sort();
    let ms = |v: &[Duration], p| percentile(v, p).as_secs_f64() * 1e3;
    println!(
        "sign-up transaction over {rounds} rounds each, interleaved: with outbox p50 {:.3} ms / p99 {:.3} ms, without p50 {:.3} ms / p99 {:.3} ms; the outbox adds {:.3} ms at p50",
        ms(&with, 50.0),
        ms(&with, 99.0),
        ms(&without, 50.0),
        ms(&without, 99.0),
        ms(&with, 50.0) - ms(&without, 50.0)
    );
}
