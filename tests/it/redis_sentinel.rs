//! Redis behind Sentinel: a real master, replica and sentinel on loopback
//! (`redis_mode = "sentinel"`). The master is found through the sentinel;
//! when it dies, calls fail closed (Unavailable) until the sentinel promotes
//! the replica, then follow the new master *with* the state replicated to it
//! — revocations written before the failover still hold — and replicas
//! resubscribe to the revocation channel there.

use std::time::{Duration, Instant};

use auth_service::{config::RedisMode, grpc::pb};
use tonic::Code;

use crate::{
    redis_cluster::until_unauthenticated,
    support::{Backend, RedisSentinel, SENTINEL_MASTER, TestApp, bearer},
};

/// A replica behind `deployment`'s sentinel. A cached "not revoked"
/// outlives the test: a replica learns a revocation from the channel, or
/// when it resubscribes.
async fn on_sentinel(deployment: &RedisSentinel) -> TestApp {
    let url = deployment.url();
    TestApp::spawn_with(Backend::Production, |c| {
        c.redis_url = Some(url);
        c.redis_mode = RedisMode::Sentinel;
        c.redis_sentinel_master = SENTINEL_MASTER.into();
        c.revocation.cache_ttl_ms = 120_000;
    })
    .await
}

fn logout(token: &pb::TokenResponse) -> tonic::Request<pb::LogoutRequest> {
    bearer(
        pb::LogoutRequest {
            refresh_token: token.refresh_token.clone(),
        },
        &token.access_token,
    )
}

/// Retries `logout` while it answers Unavailable (no master yet).
async fn logout_once_a_master_answers(app: &mut TestApp, token: &pb::TokenResponse) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        match app.client.logout(logout(token)).await {
            Ok(_) => return,
            Err(status) if status.code() == Code::Unavailable => {
                assert!(Instant::now() < deadline, "no new master in time");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_survive_a_sentinel_failover_and_calls_follow_the_new_master() {
    let mut deployment = RedisSentinel::start().await;
    let mut a = on_sentinel(&deployment).await;
    let mut b = a.replica().await;

    a.sign_up("sena").await;
    let first = a.login_ok("sena").await;
    let second = a.login_ok("sena").await;
    let third = a.login_ok("sena").await;
    b.validate(&first.access_token).await.unwrap();
    b.validate(&third.access_token).await.unwrap();
    a.client.logout(logout(&first)).await.unwrap();
    until_unauthenticated(&mut b, &first.access_token).await;

    // Replicas that will have nothing cached (a replica connects at start).
    let mut c = a.replica().await;
    let mut d = a.replica().await;

    // The master dies after its writes reached the replica.
    deployment.wait_replicated();
    let old_master = RedisSentinel::port_of(&deployment.master);
    deployment.master.kill();

    // Before the sentinel has promoted anyone, a replica with nothing
    // cached fails closed.
    let status = c.validate(&second.access_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // Logout needs Redis: it answers Unavailable until the failover, then
    // succeeds on the new master.
    logout_once_a_master_answers(&mut a, &second).await;
    assert_eq!(
        deployment.master_port(),
        Some(RedisSentinel::port_of(&deployment.replica))
    );
    assert_ne!(deployment.master_port(), Some(old_master));

    // With its state: the revocation written before the failover holds on
    // a replica that never cached it, and so does the one written after.
    let status = d.validate(&first.access_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = d.validate(&second.access_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // B resubscribed on the new master: a logout on A reaches the "not
    // revoked" it cached (a resubscription also drops those answers, and
    // happens only once the subscription on the new master stands).
    b.validate(&third.access_token).await.unwrap();
    a.client.logout(logout(&third)).await.unwrap();
    until_unauthenticated(&mut b, &third.access_token).await;
}

/// A master that goes silent (SIGSTOP: its connections stay open, nothing
/// answers) fails calls within the Redis timeout instead of hanging them;
/// after the failover calls follow the new master, and when the old one
/// comes back (SIGCONT, demoted by the sentinel) nothing writes to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_master_fails_calls_closed_until_the_failover_and_its_return_changes_nothing() {
    let deployment = RedisSentinel::start().await;
    let mut a = on_sentinel(&deployment).await;
    let mut c = a.replica().await;
    a.sign_up("sila").await;
    let first = a.login_ok("sila").await;
    let second = a.login_ok("sila").await;
    deployment.wait_replicated();
    deployment.master.signal("STOP");

    let status = c.validate(&first.access_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    logout_once_a_master_answers(&mut a, &first).await;
    assert_eq!(
        deployment.master_port(),
        Some(RedisSentinel::port_of(&deployment.replica))
    );
    // C's connection to the silent master times out, then it asks again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.validate(&first.access_token).await {
            Err(status) if status.code() == Code::Unauthenticated => break,
            other => assert!(Instant::now() < deadline, "still {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The old master comes back and is demoted: writes go on where the
    // sentinel says, and their effect is seen.
    deployment.master.signal("CONT");
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.client.logout(logout(&second)).await.unwrap();
    let status = c.validate(&second.access_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}
