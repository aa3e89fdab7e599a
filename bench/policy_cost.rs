//! The route policy's cost per Check, before and after request targets were
//! made canonical: `RoutePolicy::route` on the raw path (what a Check did)
//! against `RoutePolicy::resolve` (canonical target, case check), on the
//! default rules, for the paths a gateway sees. Prints ns per call.
//!
//! `cargo run --release --example policy_cost`

use std::{hint::black_box, time::Instant};

use auth_service::authz::policy::{RoutePolicy, default_rules};

fn main() {
    let policy = RoutePolicy::compile(&default_rules(), &["default", "public"]).unwrap();
    let requests = [
        ("GET", "/api/videos/01J9Z6Q7W3B2/comments?page=2"),
        ("POST", "/v1/auth/login"),
        (
            "GET",
            "/v1/admin/users/7f1c1e9a-7d5b-4a7e-9b61-0a3f2d1c9e11",
        ),
        ("GET", "/.well-known/jwks.json"),
        (
            "POST",
            "/immersiverse.auth.v1.AuthService/GetPlatformAccessToken",
        ),
        ("GET", "/api/channels/%E3%81%82/live"),
    ];
    const ROUNDS: u32 = 2_000_000;
    for round in 0..3 {
        let started = Instant::now();
        for _ in 0..ROUNDS {
            for (method, target) in requests {
                let path = target.split_once('?').map_or(target, |(p, _)| p);
                black_box(policy.route(black_box(method), black_box(path)));
            }
        }
        let before = started.elapsed().as_nanos() as f64 / f64::from(ROUNDS) / 6.0;
        let started = Instant::now();
        for _ in 0..ROUNDS {
            for (method, target) in requests {
                black_box(policy.resolve(black_box(method), black_box(target)).ok());
            }
        }
        let after = started.elapsed().as_nanos() as f64 / f64::from(ROUNDS) / 6.0;
        println!(
            "round {round}: route(raw) {before:.0} ns/call, resolve(canonical + case check) {after:.0} ns/call, +{:.0} ns",
            after - before
        );
    }
}
