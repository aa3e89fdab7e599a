//! WatchRevocations: every kind of revocation made on one replica arrives on
//! a stream opened on another, in commit order; a client that resumes with
//! the cursor of the last event it saw misses nothing; bad cursors and
//! callers without the service role are refused.

use std::time::Duration;

use auth_service::grpc::pb;
use tonic::{Code, Streaming};

use crate::support::{Backend, PASSWORD, TestApp, bearer};

async fn watch(
    app: &mut TestApp,
    service: &str,
    cursor: &str,
) -> Result<Streaming<pb::RevocationEvent>, tonic::Status> {
    app.client
        .watch_revocations(bearer(
            pb::WatchRevocationsRequest {
                cursor: cursor.into(),
            },
            service,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn next(stream: &mut Streaming<pb::RevocationEvent>) -> pb::RevocationEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

/// Makes one revocation of each kind on `app`; returns (kind, user id) in
/// the order made.
async fn revoke_everything(app: &mut TestApp, admin: &str, round: &str) -> Vec<(String, String)> {
    let mut made = Vec::new();
    let user = |name: String| name;
    // Logout: the session (token family) ends.
    let a = user(format!("logout{round}"));
    let id = app.sign_up(&a).await.id;
    let login = app.login_ok(&a).await;
    app.client
        .logout(bearer(
            pb::LogoutRequest {
                refresh_token: login.refresh_token,
            },
            &login.access_token,
        ))
        .await
        .unwrap();
    made.push(("token_revoked".to_owned(), id));
    let b = user(format!("suspend{round}"));
    let id = app.sign_up(&b).await.id;
    app.client
        .suspend_user(bearer(
            pb::SuspendUserRequest {
                user_id: id.clone(),
                reason: "abuse".into(),
            },
            admin,
        ))
        .await
        .unwrap();
    made.push(("user_suspended".to_owned(), id));
    let c = user(format!("revoke{round}"));
    let id = app.sign_up(&c).await.id;
    app.client
        .revoke_user_sessions(bearer(
            pb::RevokeUserSessionsRequest {
                user_id: id.clone(),
            },
            admin,
        ))
        .await
        .unwrap();
    made.push(("sessions_revoked".to_owned(), id));
    let d = user(format!("roles{round}"));
    let id = app.sign_up(&d).await.id;
    app.client
        .set_user_roles(bearer(
            pb::SetUserRolesRequest {
                user_id: id.clone(),
                roles: vec!["user".into(), "moderator".into()],
            },
            admin,
        ))
        .await
        .unwrap();
    made.push(("roles_changed".to_owned(), id));
    let e = user(format!("passwd{round}"));
    let id = app.sign_up(&e).await.id;
    let t = app.login_ok(&e).await.access_token;
    app.client
        .change_password(bearer(
            pb::ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: "another good password".into(),
            },
            &t,
        ))
        .await
        .unwrap();
    made.push(("password_changed".to_owned(), id));
    made
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_on_one_replica_stream_from_another_and_resume_without_loss() {
    let mut a = TestApp::spawn(Backend::Production).await;
    let admin = a.admin().await.access_token;
    let service = a.with_role("chatsvc", "service").await.access_token;
    let mut b = a.replica().await;
    let mut stream = watch(&mut b, &service, "").await.unwrap();

    let made = revoke_everything(&mut a, &admin, "1").await;
    let mut seen = Vec::new();
    for _ in 0..made.len() {
        seen.push(next(&mut stream).await);
    }
    let kinds: Vec<(String, String)> = seen
        .iter()
        .map(|e| (e.kind.clone(), e.user_id.clone()))
        .collect();
    assert_eq!(kinds, made, "every kind, in commit order");
    assert_eq!(seen[0].reason, "logout");
    assert!(!seen[0].session_id.is_empty());
    let cursors: Vec<i64> = seen.iter().map(|e| e.cursor.parse().unwrap()).collect();
    assert!(cursors.windows(2).all(|w| w[1] == w[0] + 1), "{cursors:?}");

    // A client that saw the first two reconnects (to the other replica):
    // it gets the other three, then live ones.
    drop(stream);
    let mut resumed = watch(&mut a, &service, &seen[1].cursor).await.unwrap();
    for expected in &seen[2..] {
        let got = next(&mut resumed).await;
        assert_eq!(
            (got.cursor.as_str(), got.kind.as_str()),
            (expected.cursor.as_str(), expected.kind.as_str())
        );
    }
    let more = revoke_everything(&mut b, &admin, "2").await;
    for (kind, user) in &more {
        let got = next(&mut resumed).await;
        assert_eq!((&got.kind, &got.user_id), (kind, user));
    }

    // Refused: a cursor the log never issued, garbage, a plain user.
    let refused = watch(&mut a, &service, "999999").await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let refused = watch(&mut a, &service, "not-a-cursor").await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    a.sign_up("plainjoe").await;
    let plain = a.login_ok("plainjoe").await.access_token;
    assert_eq!(
        watch(&mut a, &plain, "").await.unwrap_err().code(),
        Code::PermissionDenied
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_streams_revocations_too() {
    let mut app = TestApp::spawn(Backend::Embedded).await;
    let admin = app.admin().await.access_token;
    let service = app.with_role("chatsvc", "service").await.access_token;
    let mut stream = watch(&mut app, &service, "0").await.unwrap();
    // From cursor 0: the role grants made above come first.
    let first = next(&mut stream).await;
    assert_eq!(
        (first.kind.as_str(), first.cursor.as_str()),
        ("roles_changed", "1")
    );
    let _ = next(&mut stream).await;
    let made = revoke_everything(&mut app, &admin, "e").await;
    for (kind, user) in &made {
        let got = next(&mut stream).await;
        assert_eq!((&got.kind, &got.user_id), (kind, user));
    }

    // Past the retention, rows are deleted and a cursor before them is
    // refused (the client resynchronises); a new stream still works.
    let cut = time::OffsetDateTime::now_utc() + Duration::from_secs(1);
    let deleted = app.database.revocation_log.purge_before(cut).await.unwrap();
    assert!(deleted >= 7, "{deleted}");
    let old = watch(&mut app, &service, "1").await.unwrap_err();
    assert_eq!(old.code(), Code::InvalidArgument);
    let mut fresh = watch(&mut app, &service, "").await.unwrap();
    let more = revoke_everything(&mut app, &admin, "f").await;
    assert_eq!(next(&mut fresh).await.kind, more[0].0);
}
