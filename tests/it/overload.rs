//! Login under overload and distributed guessing: the bounded hashing queue
//! refuses what it cannot start in time, and a device that logged in to the
//! account before keeps a lane of its own (OWASP's device-cookie defence).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use auth_service::grpc::pb;
use tonic::Code;

use crate::support::{Backend, PASSWORD, TestApp, from_ip};

fn login(name: &str, password: &str, device_token: &str) -> pb::LoginRequest {
    pb::LoginRequest {
        login: name.into(),
        password: password.into(),
        device_token: device_token.into(),
    }
}

crate::on_both_backends! {
    async fn a_device_token_keeps_its_owner_out_of_a_lockout_caused_elsewhere(app) {
        let mut app = TestApp::spawn_with(app.backend, |c| {
            c.lockout.max_failures_per_account = 3;
        })
        .await;
        app.sign_up("owner").await;
        app.sign_up("other").await;
        let first = app.client.login(from_ip(login("owner", PASSWORD, ""), "198.51.100.1")).await.unwrap().into_inner();
        assert!(!first.device_token.is_empty(), "a login returns a device token");
        let other = app.client.login(from_ip(login("other", PASSWORD, ""), "198.51.100.2")).await.unwrap().into_inner();

        // A distributed guessing run: every attempt from a new address.
        for i in 0..3 {
            let status = app.client.login(from_ip(login("owner", "wrong password", ""), &format!("203.0.113.{i}"))).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
        }
        // The account is locked for everyone without the device token…
        let status = app.client.login(from_ip(login("owner", PASSWORD, ""), "198.51.100.1")).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        // …and for tokens that are not this account's device token.
        for wrong in [other.device_token.as_str(), first.access_token.as_str(), "garbage", &"x".repeat(60_000)] {
            let status = app.client.login(from_ip(login("owner", PASSWORD, wrong), "198.51.100.1")).await.unwrap_err();
            assert_eq!(status.code(), Code::ResourceExhausted, "a foreign token opened the device lane");
        }
        // The owner's device gets in, from any address.
        let again = app.client.login(from_ip(login("owner", PASSWORD, &first.device_token), "192.0.2.77")).await.expect("the known device is not locked out");
        assert!(!again.into_inner().device_token.is_empty());
        // A device token is no access token.
        let status = app.validate(&first.device_token).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        // Failures from the device itself still lock the device.
        for _ in 0..5 {
            let _ = app.client.login(from_ip(login("owner", "wrong password", &first.device_token), "192.0.2.77")).await;
        }
        let status = app.client.login(from_ip(login("owner", PASSWORD, &first.device_token), "192.0.2.77")).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
    }

    async fn a_password_change_ends_every_device_lane(app) {
        const NEW: &str = "a brand new passphrase";
        let mut app = TestApp::spawn_with(app.backend, |c| {
            c.lockout.max_failures_per_account = 3;
        })
        .await;
        app.sign_up("mover").await;
        let old = app.client.login(from_ip(login("mover", PASSWORD, ""), "198.51.100.1")).await.unwrap().into_inner();
        // Someone who has the device token (a stolen device) and guesses.
        app.client
            .change_password(crate::support::bearer(
                pb::ChangePasswordRequest { current_password: PASSWORD.into(), new_password: NEW.into() },
                &old.access_token,
            ))
            .await
            .expect("password changed");
        for i in 0..3 {
            let _ = app.client.login(from_ip(login("mover", "wrong password", ""), &format!("203.0.113.{i}"))).await;
        }
        let status = app.client.login(from_ip(login("mover", NEW, &old.device_token), "192.0.2.77")).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "the old device token no longer opens a lane");
    }
}

/// Real argon2 memory cost (19 MiB) with `iterations`, on one hashing
/// thread: hashes slow enough for a queue to form.
fn one_slow_hashing_thread(c: &mut auth_service::config::Config, iterations: u32) {
    c.password.memory_kib = 19 * 1024;
    c.password.iterations = iterations;
    c.password.max_concurrent_hashes = 1;
}

/// Lockout out of the way: these floods are about hashing capacity.
fn no_lockout(c: &mut auth_service::config::Config) {
    c.lockout.max_failures_per_ip = 1_000_000;
    c.lockout.max_failures_per_account = 1_000_000;
    c.lockout.max_failures_per_account_ip = 1_000_000;
}

/// One hashing thread with real argon2 cost, a queue of 2 and one waiting
/// job per source: a flood from many addresses gets Unavailable with
/// retry-after at once, and the owner's device still logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_is_refused_at_once_and_a_known_device_still_gets_in() {
    let mut app = TestApp::spawn_with(Backend::Embedded, |c| {
        one_slow_hashing_thread(c, 2);
        c.password.max_queued = 2;
        c.password.max_queued_per_source = 1;
        c.password.max_wait_ms = 2000;
        no_lockout(c);
    })
    .await;
    app.sign_up("victim").await;
    let device = app
        .client
        .login(from_ip(login("victim", PASSWORD, ""), "198.51.100.9"))
        .await
        .unwrap()
        .into_inner()
        .device_token;

    let flood = Flood::start(&app, 32, |i, n| format!("10.{}.{}.{}", i, n / 250, n % 250));
    flood.refused(10).await;
    for _ in 0..3 {
        app.client
            .login(from_ip(login("victim", PASSWORD, &device), "192.0.2.1"))
            .await
            .expect("the known device logs in through the flood");
    }
    flood.stop().await;
}

/// Logins for unknown accounts from `loops` loops until stopped, loop `i`'s
/// `n`th attempt from address `source(i, n)`; each refusal must be
/// Unavailable with retry-after, each hashed guess Unauthenticated.
struct Flood {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Flood {
    fn start(app: &TestApp, loops: usize, source: fn(usize, u32) -> String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let tasks = (0..loops)
            .map(|i| {
                let mut client = app.client.clone();
                let (stop, refused) = (stop.clone(), refused.clone());
                tokio::spawn(async move {
                    let mut n = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let guess = login(&format!("nobody{i}x{n}"), "guess guess", "");
                        match client.login(from_ip(guess, &source(i, n))).await {
                            Err(s) if s.code() == Code::Unavailable => {
                                assert!(
                                    s.metadata().get("retry-after").is_some(),
                                    "Unavailable without retry-after"
                                );
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(s) => assert_eq!(s.code(), Code::Unauthenticated, "{s:?}"),
                            Ok(_) => panic!("a guess logged in"),
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            refused,
            tasks,
        }
    }

    /// Waits until `at_least` attempts were refused (the queue is full).
    async fn refused(&self, at_least: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.refused.load(Ordering::Relaxed) < at_least {
            assert!(
                std::time::Instant::now() < deadline,
                "the flood was never refused"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

/// Under a flood from two addresses, someone logging in from an address
/// the service has not seen is hashed by the lane, not behind the flood
/// (the one general worker is busy with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_under_a_flood_from_few_addresses_is_hashed_on_the_lane() {
    let mut app = TestApp::spawn_with(Backend::Embedded, |c| {
        one_slow_hashing_thread(c, 2);
        c.password.max_queued = 4;
        c.password.max_queued_per_source = 2;
        c.password.max_wait_ms = 5000;
        no_lockout(c);
    })
    .await;
    app.sign_up("newcomer").await;
    let flood = Flood::start(&app, 24, |i, _| format!("10.0.0.{}", i % 2));
    flood.refused(10).await;
    // Each flooding address has hashed a few times: it is no longer quiet,
    // and a newcomer may take the place of its newest job.
    while hashes_started(&app).await < 8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // As the flood began, its two addresses were as new as anyone's: the
    // lane may have taken their first jobs. Count from here.
    let before = app
        .metric("password_hash_lane_total{job=\"quiet_source\"}")
        .await as u64;
    for n in 0..3 {
        app.client
            .login(from_ip(
                login("newcomer", PASSWORD, ""),
                &format!("192.0.2.{}", 10 + n),
            ))
            .await
            .expect("the newcomer logs in through the flood");
    }
    let on_lane = app
        .metric("password_hash_lane_total{job=\"quiet_source\"}")
        .await as u64
        - before;
    flood.stop().await;
    // The general worker may, rarely, be the one free when a login arrives.
    assert!(on_lane >= 1, "no newcomer's login was hashed on the lane");
    assert!(on_lane <= 3, "the lane took flood jobs too: {on_lane}");
}

/// Hashing jobs started so far (the wait histogram counts one per start).
async fn hashes_started(app: &TestApp) -> u64 {
    app.metric("password_hash_wait_seconds_count").await as u64
}

/// A caller whose own deadline passes while its login waits is never
/// hashed: exactly the backlog's logins start, not the late one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_whose_deadline_passes_in_the_queue_is_never_hashed() {
    let mut app = TestApp::spawn_with(Backend::Embedded, |c| {
        one_slow_hashing_thread(c, 4);
        c.password.max_wait_ms = 60_000;
    })
    .await;
    app.sign_up("patient").await;
    let before = hashes_started(&app).await;
    // Keep the one hashing thread busy with a backlog from other sources.
    let backlog: Vec<_> = (0..4)
        .map(|i| {
            let mut client = app.client.clone();
            tokio::spawn(async move {
                client
                    .login(from_ip(
                        login("patient", PASSWORD, ""),
                        &format!("10.0.0.{i}"),
                    ))
                    .await
                    .expect("the backlog logs in");
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // From the backlog's own network: it weighs as they do and queues
    // behind them (from a network of its own it would go first).
    let mut request = from_ip(login("patient", PASSWORD, ""), "10.0.0.9");
    request.set_timeout(Duration::from_millis(30));
    let status = app.client.clone().login(request).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::DeadlineExceeded | Code::Unavailable | Code::Cancelled
        ),
        "{status:?}"
    );
    for task in backlog {
        task.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        hashes_started(&app).await - before,
        4,
        "only the backlog was hashed, not the login whose caller had given up"
    );
}

/// A refusal that cost no hashing (here the lockout's) is held before it is
/// answered, so a client that sends again as soon as it is answered cannot
/// spin on refusals; the hold ends before the caller's own deadline (the
/// refusal, with its retry-after, still arrives), and past the bound on
/// held refusals the next is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_without_hashing_is_held_but_answered_within_the_callers_deadline() {
    let mut app = TestApp::spawn_with(Backend::Embedded, |c| {
        c.lockout.max_failures_per_account = 1;
        c.password.refusal_hold_ms = 10_000;
        c.password.max_held_refusals = 1;
        c.limits.request_timeout_ms = 30_000;
    })
    .await;
    app.sign_up("held").await;
    let status = app
        .client
        .login(from_ip(login("held", "wrong password", ""), "198.51.100.1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // Locked out: held, but answered before a deadline shorter than the hold.
    let mut within = from_ip(login("held", PASSWORD, ""), "198.51.100.1");
    within.set_timeout(Duration::from_secs(2));
    let status = app.client.login(within).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "the held refusal did not arrive within the caller's deadline: {status:?}"
    );
    // The lockout's window (60 s) counts from the answer: the ~1.9 s held
    // is taken off it.
    let retry: u64 = status
        .metadata()
        .get("retry-after")
        .expect("retry-after")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=58).contains(&retry),
        "the time held is not taken off retry-after: {retry}"
    );
    assert_eq!(
        app.metric("refusals_held_total{outcome=\"held\"}").await,
        1.0
    );

    // One refusal held (no deadline: the whole hold)…
    let mut client = app.client.clone();
    let held = tokio::spawn(async move {
        client
            .login(from_ip(login("held", PASSWORD, ""), "198.51.100.2"))
            .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while app.metric("refusals_held").await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the refusal was never held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!held.is_finished(), "a held refusal was answered");
    // …so the next is past the bound: answered, not held.
    let status = app
        .client
        .login(from_ip(login("held", PASSWORD, ""), "198.51.100.3"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        app.metric("refusals_held_total{outcome=\"full\"}").await,
        1.0
    );
    assert_eq!(
        app.metric("refusals_held_total{outcome=\"held\"}").await,
        2.0
    );
    held.abort();
}
