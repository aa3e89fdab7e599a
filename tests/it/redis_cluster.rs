//! Redis Cluster: a real three-node `redis-server --cluster-enabled` on
//! loopback. Revocations, login-failure counters and rate-limit state work
//! across the cluster's slots; one user's revocation keys share a slot (a
//! hash tag), so the revocation lookup is one single-slot MGET; a revocation
//! on one replica reaches another through the cluster's pub/sub; a node that
//! dies fails its slots' calls closed, like a Redis that is down.

use std::time::{Duration, Instant};

use auth_service::{
    config::{Config, RedisMode},
    grpc::pb,
    ratelimit::quota::Limit,
};
use tonic::Code;

use crate::{
    authz::{check, decide},
    support::{Backend, PASSWORD, RedisCluster, TestApp, bearer},
};

fn on_cluster(cluster: &RedisCluster) -> impl FnOnce(&mut Config) + '_ {
    move |c: &mut Config| {
        c.redis_url = Some(cluster.url());
        c.redis_mode = RedisMode::Cluster;
        c.authz.rate_limits.get_mut("public").unwrap().per_ip = Some(Limit {
            requests: 1,
            per_secs: 3600,
            burst: 10,
        });
    }
}

pub(crate) async fn until_unauthenticated(app: &mut TestApp, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match app.validate(token).await {
            Err(status) if status.code() == Code::Unauthenticated => return,
            other => assert!(
                Instant::now() < deadline,
                "still accepted on the other replica: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_lockout_and_rate_limits_work_on_a_redis_cluster() {
    let mut cluster = RedisCluster::start().await;
    let mut a = TestApp::spawn_with(Backend::Production, on_cluster(&cluster)).await;
    let mut b = a.replica().await;
    let prefix = a.config.redis_key_prefix.clone();

    let user = a.sign_up("cleo").await;
    let first = a.login_ok("cleo").await;
    let second = a.login_ok("cleo").await;
    b.validate(&first.access_token).await.unwrap();
    b.validate(&second.access_token).await.unwrap();

    // A logout on A revokes the token; B, which cached "not revoked",
    // learns it from the cluster's pub/sub (its cache TTL is 1 s, so the
    // lookup itself also has to work across slots).
    a.client
        .logout(bearer(
            pb::LogoutRequest {
                refresh_token: first.refresh_token.clone(),
            },
            &first.access_token,
        ))
        .await
        .unwrap();
    until_unauthenticated(&mut b, &first.access_token).await;
    b.validate(&second.access_token)
        .await
        .expect("the other session lives on");

    // An admin ends every session of the user: the per-user epoch.
    let admin = a.admin().await;
    a.client
        .revoke_user_sessions(bearer(
            pb::RevokeUserSessionsRequest {
                user_id: user.id.clone(),
            },
            &admin.access_token,
        ))
        .await
        .unwrap();
    until_unauthenticated(&mut b, &second.access_token).await;

    // One user's revocation keys share a slot, hence a node.
    let tag = format!("{prefix}rv:{{{}}}", user.id);
    let holders: Vec<usize> = (0..3)
        .filter(|&node| !cluster.keys_on(node, &tag).is_empty())
        .collect();
    assert_eq!(holders.len(), 1, "{tag}* on nodes {holders:?}");
    assert_eq!(
        holders[0],
        cluster.node_of(&format!("{tag}:user")),
        "on the node serving the tag's slot"
    );
    assert!(
        cluster.keys_on(holders[0], &tag).len() >= 3,
        "the token, the session and the user epoch: {:?}",
        cluster.keys_on(holders[0], &tag)
    );

    // Login failures are counted (keys of several slots) up to the lockout.
    for _ in 0..a.config.lockout.max_failures_per_account_ip {
        let status = a.login("cleo", "not the password").await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    let status = a.login("cleo", PASSWORD).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.metadata().get("retry-after").is_some());

    // The ext_authz rate limit (GCRA keys in the cluster): 10 admitted from
    // one address over both replicas, within one lease per replica.
    let mut admitted = 0;
    for i in 0..40 {
        let app = if i % 2 == 0 { &a } else { &b };
        let request = check("POST", "/v1/users", &[("x-forwarded-for", "192.0.2.90")]);
        admitted += u32::from(decide(app, request).await.0 == 0);
    }
    let lease = Limit {
        requests: 1,
        per_secs: 3600,
        burst: 10,
    }
    .lease();
    assert!(
        (10 - 2 * lease..=10).contains(&admitted),
        "admitted {admitted}"
    );

    // The node holding a user's revocation keys dies (no replica):
    // checking that user's unchecked token fails closed, within the Redis
    // timeout, on a replica that has nothing cached.
    let dora = a.sign_up("dora").await;
    let fresh = a.login_ok("dora").await;
    let node = cluster.node_of(&format!("{prefix}rv:{{{}}}:user", dora.id));
    let mut c = a.replica().await;
    cluster.nodes[node].kill();
    let status = c.validate(&fresh.access_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}
