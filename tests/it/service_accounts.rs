//! Service accounts: created by an admin with the secret shown once and
//! stored hashed; client credentials exchanged for a token that the rest of
//! the service treats like any other; rotation and deletion revoke; wrong
//! parties refused.

use auth_service::grpc::pb;
use tonic::Code;

use crate::{
    on_both_backends,
    support::{Backend, TestApp, bearer},
};

async fn issue(
    app: &mut TestApp,
    id: &str,
    secret: &str,
) -> Result<pb::IssueServiceTokenResponse, tonic::Status> {
    app.client
        .issue_service_token(pb::IssueServiceTokenRequest {
            client_id: id.into(),
            client_secret: secret.into(),
        })
        .await
        .map(|r| r.into_inner())
}

on_both_backends! {
    async fn a_service_account_gets_tokens_for_its_secret_until_rotated_or_deleted(app) {
        let admin = app.admin().await.access_token;
        let created = app
            .client
            .create_service_account(bearer(
                pb::CreateServiceAccountRequest { name: "ingest-worker".into(), roles: vec!["service".into()] },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner();
        let account = created.account.unwrap();
        let secret = created.client_secret;
        assert!(secret.starts_with("ivsa_") && secret.len() > 40, "{secret}");
        assert_eq!(account.roles, ["service"]);

        // Listed without the secret; stored as its SHA-256 only.
        let listed = app
            .client
            .list_service_accounts(bearer(pb::ListServiceAccountsRequest {}, &admin))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.accounts.len(), 1);
        assert!(!format!("{listed:?}").contains(&secret));
        let stored = stored_secret_hashes(&app).await;
        let digest = auth_service::accounts::service_accounts::secret_hash(&secret.clone().into());
        assert_eq!(stored, vec![digest.to_vec()]);

        // Client credentials → a token the service accepts like a user's.
        let token = issue(&mut app, &account.id, &secret).await.unwrap();
        assert_eq!((token.token_type.as_str(), token.roles.clone()), ("Bearer", vec!["service".to_owned()]));
        let validated = app.validate(&token.access_token).await.unwrap();
        assert_eq!((validated.user_id.as_str(), validated.roles.clone()), (account.id.as_str(), vec!["service".to_owned()]));
        // It holds the service role: it may watch revocations.
        app.client
            .watch_revocations(bearer(pb::WatchRevocationsRequest { cursor: String::new() }, &token.access_token))
            .await
            .unwrap();

        // Wrong secret, unknown or malformed id: the same refusal.
        for (id, s) in [
            (account.id.as_str(), "ivsa_wrong"),
            ("0190aaaa-0000-7000-8000-000000000000", secret.as_str()),
            ("not-an-id", secret.as_str()),
            (account.id.as_str(), ""),
        ] {
            let refused = issue(&mut app, id, s).await.unwrap_err();
            assert_eq!(refused.code(), Code::Unauthenticated, "{id} {s}");
            assert_eq!(refused.message(), "invalid client credentials");
        }

        // Rotation: the old secret and the tokens it got stop working.
        let rotated = app
            .client
            .rotate_service_account_secret(bearer(pb::RotateServiceAccountSecretRequest { id: account.id.clone() }, &admin))
            .await
            .unwrap()
            .into_inner()
            .client_secret;
        assert_ne!(rotated, secret);
        assert_eq!(issue(&mut app, &account.id, &secret).await.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(app.validate(&token.access_token).await.unwrap_err().code(), Code::Unauthenticated);
        // Tokens are timestamped in milliseconds against the revocation.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let fresh = issue(&mut app, &account.id, &rotated).await.unwrap();
        app.validate(&fresh.access_token).await.unwrap();

        // Deletion: the account and its tokens are gone.
        app.client
            .delete_service_account(bearer(pb::DeleteServiceAccountRequest { id: account.id.clone() }, &admin))
            .await
            .unwrap();
        assert_eq!(app.validate(&fresh.access_token).await.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(issue(&mut app, &account.id, &rotated).await.unwrap_err().code(), Code::Unauthenticated);

        // The audit trail: one outbox event per change, keyed by the account,
        // naming the admin who made it, never the secret or its hash.
        let admin_id = app.validate(&admin).await.unwrap().user_id;
        let audit: Vec<_> = app
            .events()
            .await
            .into_iter()
            .filter(|e| e.event_type.starts_with("service_account_"))
            .collect();
        let types: Vec<&str> = audit.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["service_account_created", "service_account_secret_rotated", "service_account_deleted"]);
        for event in &audit {
            assert_eq!(event.user_id.map(|u| u.to_string()), Some(account.id.clone()));
            assert_eq!(event.data["name"], "ingest-worker");
            assert_eq!(event.data["roles"], serde_json::json!(["service"]));
            assert_eq!(event.data["by"], admin_id.as_str());
            let text = event.data.to_string();
            assert!(!text.contains(&secret) && !text.contains(&rotated) && !text.contains(&hex::encode(digest)), "{text}");
        }
    }

    async fn only_admins_manage_service_accounts_and_bad_input_names_its_field(app) {
        let admin = app.admin().await.access_token;
        app.sign_up("plainuser").await;
        let user = app.login_ok("plainuser").await.access_token;
        let denied = app
            .client
            .create_service_account(bearer(
                pb::CreateServiceAccountRequest { name: "sneaky".into(), roles: vec!["admin".into()] },
                &user,
            ))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        let bad = app
            .client
            .create_service_account(bearer(
                pb::CreateServiceAccountRequest { name: "No Spaces".into(), roles: vec![] },
                &admin,
            ))
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
        assert!(bad.message().contains("name") && bad.message().contains("roles"), "{bad:?}");
        let make = |name: &str| pb::CreateServiceAccountRequest { name: name.into(), roles: vec!["service".into()] };
        app.client.create_service_account(bearer(make("chat"), &admin)).await.unwrap();
        let taken = app.client.create_service_account(bearer(make("chat"), &admin)).await.unwrap_err();
        assert_eq!(taken.code(), Code::AlreadyExists);
        let missing = app
            .client
            .delete_service_account(bearer(pb::DeleteServiceAccountRequest { id: "0190aaaa-0000-7000-8000-000000000000".into() }, &admin))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);
    }
}

/// The secret column of every service account, raw.
async fn stored_secret_hashes(app: &TestApp) -> Vec<Vec<u8>> {
    use sqlx::{Connection, Row};
    let sql = "SELECT secret_hash FROM service_accounts";
    match app.backend {
        Backend::Production => {
            let mut c = sqlx::PgConnection::connect(app.config.database_url.as_ref().unwrap())
                .await
                .unwrap();
            sqlx::query(sql)
                .fetch_all(&mut c)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
        }
        Backend::Embedded => {
            let url = format!("sqlite://{}", app.config.data_dir.join("auth.db").display());
            let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query(sql)
                .fetch_all(&mut c)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
        }
    }
}
