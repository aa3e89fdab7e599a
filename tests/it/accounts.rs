//! Sign-up, login, lockout, password change and admin operations.

use auth_service::grpc::pb;
use tonic::{Code, Request};
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::{
    on_both_backends,
    support::{PASSWORD, bearer, from_ip},
};

fn bad_fields(status: &tonic::Status) -> Vec<String> {
    let details = status
        .get_details_bad_request()
        .expect("a BadRequest detail");
    details
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

on_both_backends! {
    async fn sign_up_returns_the_normalised_user_with_a_uuidv7_id_and_the_user_role(app) {
        let user = app
            .client
            .create_user(pb::CreateUserRequest { email: " Alice@Example.COM ".into(), username: "Alice".into(), password: PASSWORD.into() })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        let id = Uuid::parse_str(&user.id).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(user.email, "alice@example.com");
        assert_eq!(user.username, "alice");
        assert_eq!(user.roles, ["user"]);
        assert_eq!(user.status, pb::UserStatus::Active as i32);
        assert!(user.created_at.is_some());
        assert_eq!(app.event_types().await, ["user_created"]);
    }

    async fn sign_up_names_every_bad_field_at_once(app) {
        let status = app
            .client
            .create_user(pb::CreateUserRequest { email: "not-an-email".into(), username: "x".into(), password: "short".into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(bad_fields(&status), ["email", "username", "password"]);
        assert!(app.events().await.is_empty(), "a refused request changes nothing");
    }

    async fn empty_fields_are_reported_as_required(app) {
        let status = app.client.create_user(pb::CreateUserRequest::default()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_details_bad_request().unwrap();
        assert_eq!(details.field_violations.len(), 3);
        assert!(details.field_violations.iter().all(|v| v.description == "is required"), "{details:?}");
    }

    async fn an_oversized_password_is_refused_as_invalid_not_hashed(app) {
        // 60 KB: within the 64 KiB message limit, far past the password's
        // 4 KiB hard bound. (A 1 MB message is refused before any handler:
        // `gateway::oversized_grpc_messages_and_metadata_are_refused`.)
        let big = "x".repeat(60_000);
        let status = app
            .client
            .create_user(pb::CreateUserRequest { email: "big@example.com".into(), username: "big".into(), password: big.clone() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(bad_fields(&status), ["password"]);
        let status = app.login("big@example.com", &big).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }

    async fn duplicate_email_in_any_case_and_duplicate_username_are_already_exists(app) {
        app.sign_up("alice").await;
        let status = app
            .client
            .create_user(pb::CreateUserRequest { email: "ALICE@example.com".into(), username: "other".into(), password: PASSWORD.into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists);
        assert_eq!(bad_fields(&status), ["email"]);
        let status = app
            .client
            .create_user(pb::CreateUserRequest { email: "new@example.com".into(), username: "Alice".into(), password: PASSWORD.into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists);
        assert_eq!(bad_fields(&status), ["username"]);
        assert_eq!(app.event_types().await, ["user_created"], "a refused duplicate writes no event");
    }

    async fn login_works_by_email_or_username_and_returns_a_bearer_pair(app) {
        let user = app.sign_up("bob").await;
        for login in ["bob", "BOB@example.com"] {
            let pair = app.login_ok(login).await;
            assert_eq!(pair.token_type, "Bearer");
            assert_eq!(pair.expires_in, 900);
            assert_eq!(pair.user.as_ref().unwrap().id, user.id);
            assert_eq!(pair.refresh_token.len(), 43, "256 bits, base64url");
            assert!(pair.refresh_expires_in > 0);
            let valid = app.validate(&pair.access_token).await.unwrap();
            assert_eq!(valid.user_id, user.id);
            assert_eq!(valid.roles, ["user"]);
        }
        assert_eq!(app.event_types().await, ["user_created", "login_succeeded", "login_succeeded"]);
    }

    async fn wrong_password_and_unknown_account_get_the_same_answer(app) {
        app.sign_up("carol").await;
        let wrong = app.login("carol", "not the password").await.unwrap_err();
        let unknown = app.login("nobody", "not the password").await.unwrap_err();
        assert_eq!(wrong.code(), Code::Unauthenticated);
        assert_eq!((wrong.code(), wrong.message()), (unknown.code(), unknown.message()));
        let events = app.events().await;
        let failed: Vec<_> = events.iter().filter(|e| e.event_type == "login_failed").collect();
        assert_eq!(failed.len(), 2);
        assert!(failed.iter().all(|e| e.user_id.is_none() && !e.data.to_string().contains("carol")), "no enumeration through events");
    }

    async fn five_failures_lock_the_account_from_that_ip_with_retry_after(app) {
        app.sign_up("dave").await;
        let attempt = |password: &str| from_ip(pb::LoginRequest { login: "dave".into(), password: password.into(), ..Default::default() }, "203.0.113.9");
        for _ in 0..5 {
            let status = app.client.login(attempt("wrong password")).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
        }
        // Locked: even the right password is refused, with a retry-after.
        let status = app.client.login(attempt(PASSWORD)).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry_after: u64 = status.metadata().get("retry-after").expect("retry-after").to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        // The owner from another address is not locked out by the attacker.
        let elsewhere = from_ip(pb::LoginRequest { login: "dave".into(), password: PASSWORD.into(), ..Default::default() }, "198.51.100.20");
        assert!(app.client.login(elsewhere).await.is_ok());
    }

    async fn an_unknown_account_locks_out_exactly_like_a_real_one(app) {
        let attempt = || from_ip(pb::LoginRequest { login: "ghost".into(), password: "wrong password".into(), ..Default::default() }, "203.0.113.10");
        for _ in 0..5 {
            assert_eq!(app.client.login(attempt()).await.unwrap_err().code(), Code::Unauthenticated);
        }
        assert_eq!(app.client.login(attempt()).await.unwrap_err().code(), Code::ResourceExhausted);
    }

    async fn one_ip_spraying_many_accounts_is_stopped_by_the_per_ip_limit(app) {
        for i in 0..20 {
            let r = from_ip(pb::LoginRequest { login: format!("user{i}"), password: "wrong password".into(), ..Default::default() }, "203.0.113.11");
            assert_eq!(app.client.login(r).await.unwrap_err().code(), Code::Unauthenticated, "attempt {i}");
        }
        let r = from_ip(pb::LoginRequest { login: "user99".into(), password: "wrong password".into(), ..Default::default() }, "203.0.113.11");
        assert_eq!(app.client.login(r).await.unwrap_err().code(), Code::ResourceExhausted);
    }

    async fn a_success_clears_the_pair_counter(app) {
        app.sign_up("erin").await;
        let attempt = |password: &str| from_ip(pb::LoginRequest { login: "erin".into(), password: password.into(), ..Default::default() }, "203.0.113.12");
        for _ in 0..4 {
            app.client.login(attempt("wrong password")).await.unwrap_err();
        }
        app.client.login(attempt(PASSWORD)).await.unwrap();
        for _ in 0..4 {
            assert_eq!(app.client.login(attempt("wrong password")).await.unwrap_err().code(), Code::Unauthenticated);
        }
    }

    async fn get_me_returns_the_caller(app) {
        let user = app.sign_up("frank").await;
        let pair = app.login_ok("frank").await;
        let me = app.client.get_me(bearer(pb::GetMeRequest {}, &pair.access_token)).await.unwrap().into_inner();
        assert_eq!(me, user);
        let status = app.client.get_me(Request::new(pb::GetMeRequest {})).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }

    async fn a_password_change_ends_every_session_and_the_new_password_works(app) {
        app.sign_up("gina").await;
        let first = app.login_ok("gina").await;
        let second = app.login_ok("gina").await;
        let change = |current: &str, new: &str| pb::ChangePasswordRequest { current_password: current.into(), new_password: new.into() };
        let status = app.client.change_password(bearer(change("wrong password", "a new password"), &first.access_token)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        let status = app.client.change_password(bearer(change(PASSWORD, "short"), &first.access_token)).await.unwrap_err();
        assert_eq!(bad_fields(&status), ["new_password"]);
        app.client.change_password(bearer(change(PASSWORD, "a new password"), &first.access_token)).await.unwrap();
        for pair in [&first, &second] {
            assert_eq!(app.validate(&pair.access_token).await.unwrap_err().code(), Code::Unauthenticated);
            assert_eq!(app.refresh(&pair.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
        }
        assert_eq!(app.login("gina", PASSWORD).await.unwrap_err().code(), Code::Unauthenticated);
        let fresh = app.login("gina", "a new password").await.unwrap();
        app.validate(&fresh.access_token).await.expect("a token issued after the change is valid");
        assert!(app.event_types().await.contains(&"password_changed".to_owned()));
    }

    async fn admin_rpcs_are_refused_to_non_admins_and_anonymous_callers(app) {
        let victim = app.sign_up("henry").await;
        let pair = app.login_ok("henry").await;
        let suspend = || pb::SuspendUserRequest { user_id: victim.id.clone(), reason: "test".into() };
        let status = app.client.suspend_user(bearer(suspend(), &pair.access_token)).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        let status = app.client.suspend_user(Request::new(suspend())).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        let status = app
            .client
            .set_user_roles(bearer(pb::SetUserRolesRequest { user_id: victim.id.clone(), roles: vec!["admin".into()] }, &pair.access_token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        let status = app
            .client
            .revoke_user_sessions(bearer(pb::RevokeUserSessionsRequest { user_id: victim.id.clone() }, &pair.access_token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        app.validate(&pair.access_token).await.expect("nothing happened to the caller");
    }

    async fn suspend_ends_every_session_at_once_and_blocks_login(app) {
        let admin = app.admin().await;
        let victim = app.sign_up("ivan").await;
        let sessions = [app.login_ok("ivan").await, app.login_ok("ivan").await];
        let suspended = app
            .client
            .suspend_user(bearer(pb::SuspendUserRequest { user_id: victim.id.clone(), reason: "abuse".into() }, &admin.access_token))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        assert_eq!(suspended.status, pb::UserStatus::Suspended as i32);
        for pair in &sessions {
            assert_eq!(app.validate(&pair.access_token).await.unwrap_err().code(), Code::Unauthenticated);
            assert_eq!(app.refresh(&pair.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
        }
        assert_eq!(app.login("ivan", PASSWORD).await.unwrap_err().code(), Code::PermissionDenied);
        app.validate(&admin.access_token).await.expect("the admin's own session is untouched");
        assert!(app.event_types().await.contains(&"user_suspended".to_owned()));
    }

    async fn admin_operations_on_a_missing_or_malformed_user_id(app) {
        let admin = app.admin().await;
        let status = app
            .client
            .suspend_user(bearer(pb::SuspendUserRequest { user_id: Uuid::now_v7().to_string(), reason: String::new() }, &admin.access_token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        let status = app
            .client
            .revoke_user_sessions(bearer(pb::RevokeUserSessionsRequest { user_id: "nope".into() }, &admin.access_token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(bad_fields(&status), ["user_id"]);
    }

    async fn revoke_user_sessions_ends_them_all_but_the_user_may_log_in_again(app) {
        let admin = app.admin().await;
        let user = app.sign_up("judy").await;
        let a = app.login_ok("judy").await;
        let b = app.login_ok("judy").await;
        let revoked = app
            .client
            .revoke_user_sessions(bearer(pb::RevokeUserSessionsRequest { user_id: user.id.clone() }, &admin.access_token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(revoked.revoked_sessions, 2);
        for pair in [&a, &b] {
            assert_eq!(app.validate(&pair.access_token).await.unwrap_err().code(), Code::Unauthenticated);
            assert_eq!(app.refresh(&pair.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
        }
        let again = app.login_ok("judy").await;
        app.validate(&again.access_token).await.unwrap();
        assert!(app.event_types().await.contains(&"sessions_revoked".to_owned()));
    }

    async fn set_roles_replaces_roles_and_new_tokens_carry_them(app) {
        let admin = app.admin().await;
        let user = app.sign_up("kate").await;
        let old = app.login_ok("kate").await;
        let status = app
            .client
            .set_user_roles(bearer(pb::SetUserRolesRequest { user_id: user.id.clone(), roles: vec!["Bad Role".into(), "ok".into()] }, &admin.access_token))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), ["roles[0]"]);
        let updated = app
            .client
            .set_user_roles(bearer(
                pb::SetUserRolesRequest { user_id: user.id.clone(), roles: vec!["moderator".into(), "user".into(), "moderator".into()] },
                &admin.access_token,
            ))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        assert_eq!(updated.roles, ["moderator", "user"]);
        assert_eq!(app.validate(&old.access_token).await.unwrap_err().code(), Code::Unauthenticated, "stale roles must not live on");
        let fresh = app.login_ok("kate").await;
        assert_eq!(app.validate(&fresh.access_token).await.unwrap().roles, ["moderator", "user"]);
        assert!(app.event_types().await.contains(&"roles_changed".to_owned()));
    }
}
