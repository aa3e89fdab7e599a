//! The store contract, run on both SQL backends directly.

use std::sync::Arc;

use auth_service::{
    accounts::model::{Email, LoginName, Role, User, UserStatus, Username},
    events::{OutboxEvent, RequestContext},
    storage::{Database, open_database},
    tokens::store::{NewRefreshToken, NewSession, RotateRequest, Rotation},
};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::support::{Backend, config_for};

async fn database(backend: Backend) -> (Database, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(backend, dir.path()).await;
    (open_database(&config.database()).await.unwrap(), dir)
}

fn user(name: &str) -> User {
    User {
        id: Uuid::now_v7(),
        email: Email::parse("email", &format!("{name}@example.com")).unwrap(),
        username: Username::parse("username", name).unwrap(),
        roles: vec![Role::user()],
        status: UserStatus::Active,
        created_at: OffsetDateTime::now_utc(),
    }
}

/// Stores a new user `name` (hash `$argon2id$placeholder`) with its event.
async fn insert_user(db: &Database, name: &str) -> User {
    let user = user(name);
    db.users
        .insert_user(
            &user,
            "$argon2id$placeholder",
            &OutboxEvent::user_created(&user, &RequestContext::default()),
        )
        .await
        .unwrap();
    user
}

async fn user_with_session(db: &Database) -> (User, Uuid, [u8; 32]) {
    let ctx = RequestContext::default();
    let user = insert_user(db, "racer").await;
    let now = OffsetDateTime::now_utc();
    let session = NewSession {
        id: Uuid::now_v7(),
        user_id: user.id,
        created_at: now,
        absolute_expires_at: now + Duration::days(1),
        security_version: 0,
    };
    let hash = [7u8; 32];
    let token = NewRefreshToken {
        hash,
        session_id: session.id,
        created_at: now,
        idle_expires_at: now + Duration::hours(1),
    };
    assert!(
        db.sessions
            .create_session(
                &session,
                &token,
                &OutboxEvent::login_succeeded(user.id, session.id, &ctx),
            )
            .await
            .unwrap()
    );
    (user, session.id, hash)
}

/// Race (the store's half): a session is created only at the security
/// version its login read; every security change bumps the version in its
/// own transaction, and a non-active account gets no session at any version.
async fn sessions_are_created_only_at_the_version_the_login_read(backend: Backend) {
    let (db, _dir) = database(backend).await;
    let ctx = RequestContext::default();
    let user = insert_user(&db, "versioned").await;
    let version = || async {
        db.users
            .find_credentials_by_id(user.id)
            .await
            .unwrap()
            .unwrap()
            .security_version
    };
    let try_create = |at: i64| {
        let now = OffsetDateTime::now_utc();
        let session = NewSession {
            id: Uuid::now_v7(),
            user_id: user.id,
            created_at: now,
            absolute_expires_at: now + Duration::days(1),
            security_version: at,
        };
        let token = NewRefreshToken {
            hash: auth_service::tokens::hash_refresh_token(&Uuid::now_v7().to_string()),
            session_id: session.id,
            created_at: now,
            idle_expires_at: now + Duration::hours(1),
        };
        let db = &db;
        let ctx = &ctx;
        async move {
            db.sessions
                .create_session(
                    &session,
                    &token,
                    &OutboxEvent::login_succeeded(user.id, session.id, ctx),
                )
                .await
                .unwrap()
        }
    };
    let v0 = version().await;
    let roles = vec![Role::user()];
    db.users
        .set_roles(
            user.id,
            &roles,
            &OutboxEvent::roles_changed(user.id, Uuid::nil(), &roles, &ctx),
        )
        .await
        .unwrap()
        .unwrap();
    let v1 = version().await;
    assert_eq!(v1, v0 + 1, "a role change bumps the version");
    assert!(!try_create(v0).await, "a stale version creates nothing");
    assert!(try_create(v1).await);
    db.users
        .change_password(
            user.id,
            "$argon2id$other",
            &OutboxEvent::password_changed(user.id, &ctx),
        )
        .await
        .unwrap();
    let v2 = version().await;
    assert_eq!(v2, v1 + 1, "a password change bumps the version");
    db.sessions
        .revoke_user_sessions(
            user.id,
            OffsetDateTime::now_utc(),
            &OutboxEvent::sessions_revoked(user.id, None, "admin", &ctx),
        )
        .await
        .unwrap();
    let v3 = version().await;
    assert_eq!(v3, v2 + 1, "revoking every session bumps the version");
    db.users
        .set_status(
            user.id,
            UserStatus::Suspended,
            &OutboxEvent::user_suspended(user.id, Uuid::nil(), "test", &ctx),
        )
        .await
        .unwrap()
        .unwrap();
    let v4 = version().await;
    assert_eq!(v4, v3 + 1, "a status change bumps the version");
    assert!(!try_create(v4).await, "a suspended account gets no session");
}

/// One rotation with a one-hour idle lifetime and no request context.
async fn rotate(
    db: &Database,
    presented: [u8; 32],
    next: [u8; 32],
    now: OffsetDateTime,
) -> Rotation {
    let ctx = RequestContext::default();
    let request = RotateRequest {
        presented,
        next,
        now,
        idle_ttl: Duration::hours(1),
        ctx: &ctx,
    };
    db.sessions.rotate_refresh_token(request).await.unwrap()
}

async fn concurrent_presentations_rotate_exactly_once(backend: Backend) {
    let (db, _dir) = database(backend).await;
    let (_, session_id, presented) = user_with_session(&db).await;
    let ctx = Arc::new(RequestContext::default());
    let tasks: Vec<_> = (0..8u8)
        .map(|i| {
            let sessions = db.sessions.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                sessions
                    .rotate_refresh_token(RotateRequest {
                        presented,
                        next: [i + 100; 32],
                        now: OffsetDateTime::now_utc(),
                        idle_ttl: Duration::hours(1),
                        ctx: &ctx,
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut rotated = 0;
    for task in tasks {
        match task.await.unwrap() {
            Rotation::Rotated { session_id: s, .. } => {
                assert_eq!(s, session_id);
                rotated += 1;
            }
            Rotation::Reused { session_id: s, .. } => assert_eq!(s, session_id),
            Rotation::Invalid => panic!("a known token is never just invalid here"),
        }
    }
    assert_eq!(rotated, 1, "exactly one presentation may win");
    // The losers were reuse: the family is revoked, so even the winner's
    // new token is dead.
    let reuse_events = db
        .outbox
        .unpublished(100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "token_revoked")
        .count();
    assert_eq!(reuse_events, 1, "one revocation event, however many losers");
}

async fn an_expired_refresh_token_is_invalid_and_stays_unspent(backend: Backend) {
    let (db, _dir) = database(backend).await;
    let (_, _, presented) = user_with_session(&db).await;
    let later = OffsetDateTime::now_utc() + Duration::hours(2);
    let outcome = rotate(&db, presented, [9; 32], later).await;
    assert!(matches!(outcome, Rotation::Invalid), "{outcome:?}");
    // Still unspent (the transaction rolled back): presenting it again is
    // not mistaken for reuse.
    let again = rotate(&db, presented, [10; 32], later).await;
    assert!(matches!(again, Rotation::Invalid), "{again:?}");
}

async fn a_session_past_its_absolute_lifetime_cannot_be_refreshed(backend: Backend) {
    let (db, _dir) = database(backend).await;
    let (_, _, presented) = user_with_session(&db).await;
    // Idle lifetime is an hour; the session's absolute lifetime is a day.
    let later = OffsetDateTime::now_utc() + Duration::days(2);
    let mut current = presented;
    // Keep the token fresh within its idle window, hour by hour, up to the
    // absolute limit: fresh tokens are refused once the session is too old.
    let mut now = OffsetDateTime::now_utc();
    let mut refused_at = None;
    for step in 0..60u8 {
        now += Duration::minutes(50);
        let next = [step + 100; 32];
        match rotate(&db, current, next, now).await {
            Rotation::Rotated {
                idle_expires_at, ..
            } => {
                assert!(
                    idle_expires_at
                        <= OffsetDateTime::now_utc() + Duration::days(1) + Duration::minutes(1),
                    "never past the absolute end"
                );
                current = next;
            }
            Rotation::Invalid => {
                refused_at = Some(now);
                break;
            }
            Rotation::Reused { .. } => panic!("not a reuse"),
        }
    }
    let refused_at = refused_at.expect("the absolute lifetime ends the session");
    assert!(refused_at >= OffsetDateTime::now_utc() + Duration::hours(23) && refused_at < later);
}

async fn relay_leases_are_disjoint_and_published_rows_are_purged(backend: Backend) {
    let (db, _dir) = database(backend).await;
    for i in 0..10 {
        insert_user(&db, &format!("relay{i}")).await;
    }
    let now = OffsetDateTime::now_utc();
    let lease = now + Duration::seconds(30);
    // Two relays lease at once: together they hold every row, no row twice.
    let (a, b) = tokio::join!(db.relay.lease(6, now, lease), db.relay.lease(6, now, lease));
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut ids: Vec<Uuid> = a.iter().chain(&b).map(|e| e.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), a.len() + b.len(), "a row leased twice");
    assert_eq!(ids.len(), 10);
    assert!(a.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    assert!(
        db.relay.lease(10, now, lease).await.unwrap().is_empty(),
        "all rows are leased"
    );
    // A lease that expires makes its rows available again.
    let after_expiry = lease + Duration::seconds(1);
    let again = db
        .relay
        .lease(10, after_expiry, after_expiry + Duration::seconds(30))
        .await
        .unwrap();
    assert_eq!(again.len(), 10);
    assert!(again.iter().all(|e| e.attempts == 2));
    // Published rows are never leased again; retried ones wait for retry_at.
    db.relay
        .mark_published(&ids[..8], after_expiry)
        .await
        .unwrap();
    db.relay
        .retry_later(&ids[8..], after_expiry + Duration::minutes(5))
        .await
        .unwrap();
    assert_eq!(db.relay.unpublished_count().await.unwrap(), 2);
    let later = after_expiry + Duration::minutes(1);
    assert!(
        db.relay
            .lease(10, later, later + Duration::seconds(30))
            .await
            .unwrap()
            .is_empty(),
        "still backing off"
    );
    let much_later = after_expiry + Duration::minutes(6);
    assert_eq!(
        db.relay
            .lease(10, much_later, much_later + Duration::seconds(30))
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        db.relay
            .purge_published(after_expiry + Duration::seconds(1))
            .await
            .unwrap(),
        8
    );
    assert_eq!(
        db.relay.purge_published(much_later).await.unwrap(),
        0,
        "unpublished rows are kept"
    );
}

async fn the_hash_upgrade_only_replaces_the_hash_it_read(backend: Backend) {
    let (db, _dir) = database(backend).await;
    let (user, _, _) = user_with_session(&db).await;
    let login = LoginName::parse("login", "racer").unwrap();
    db.users
        .upgrade_password_hash(user.id, "$argon2id$stale", "$argon2id$upgraded")
        .await
        .unwrap();
    assert_eq!(
        db.users
            .find_credentials(&login)
            .await
            .unwrap()
            .unwrap()
            .password_hash,
        "$argon2id$placeholder"
    );
    db.users
        .upgrade_password_hash(user.id, "$argon2id$placeholder", "$argon2id$upgraded")
        .await
        .unwrap();
    assert_eq!(
        db.users
            .find_credentials(&login)
            .await
            .unwrap()
            .unwrap()
            .password_hash,
        "$argon2id$upgraded"
    );
}

async fn status_changes_revoke_sessions_and_write_the_event_atomically(backend: Backend) {
    let (db, _dir) = database(backend).await;
    let (user, _, presented) = user_with_session(&db).await;
    let ctx = RequestContext::default();
    let event = OutboxEvent::user_suspended(user.id, Uuid::nil(), "test", &ctx);
    let updated = db
        .users
        .set_status(user.id, UserStatus::Suspended, &event)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.status, UserStatus::Suspended);
    let outcome = rotate(&db, presented, [1; 32], OffsetDateTime::now_utc()).await;
    assert!(matches!(outcome, Rotation::Invalid), "{outcome:?}");
    let types: Vec<String> = db
        .outbox
        .unpublished(100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(types, ["user_created", "login_succeeded", "user_suspended"]);
    let stored = db.outbox.unpublished(100).await.unwrap().pop().unwrap();
    assert_eq!(stored.id, event.id);
    assert_eq!(stored.user_id, Some(user.id));
    assert!(
        db.users
            .set_status(Uuid::now_v7(), UserStatus::Suspended, &event)
            .await
            .unwrap()
            .is_none()
    );
}

async fn missing_rows_are_none_not_errors(backend: Backend) {
    let (db, _dir) = database(backend).await;
    assert!(db.users.find_user(Uuid::now_v7()).await.unwrap().is_none());
    assert!(
        db.users
            .find_credentials(&LoginName::parse("login", "nobody").unwrap())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        db.sessions
            .refresh_token_owner(&[0; 32])
            .await
            .unwrap()
            .is_none()
    );
}

macro_rules! contract {
    ($($case:ident),*) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$case(super::Backend::Embedded).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$case(super::Backend::Production).await
                }
            }
        )*
    };
}

contract!(
    concurrent_presentations_rotate_exactly_once,
    sessions_are_created_only_at_the_version_the_login_read,
    a_session_past_its_absolute_lifetime_cannot_be_refreshed,
    relay_leases_are_disjoint_and_published_rows_are_purged,
    an_expired_refresh_token_is_invalid_and_stays_unspent,
    the_hash_upgrade_only_replaces_the_hash_it_read,
    status_changes_revoke_sessions_and_write_the_event_atomically,
    missing_rows_are_none_not_errors
);
