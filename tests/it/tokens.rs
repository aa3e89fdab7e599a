//! Access-token verification, refresh rotation and reuse, logout.

use auth_service::{grpc::pb, tokens::Claims};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tonic::Code;

use crate::{
    on_both_backends,
    support::{TestApp, bearer, sign_with_server_key},
};

/// The claims of a token the server issued (read without verification).
fn claims_of(token: &str) -> Claims {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn header_of(token: &str) -> serde_json::Value {
    serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap()
}

async fn refused(app: &mut TestApp, token: &str) {
    let status = app
        .validate(token)
        .await
        .expect_err("the token must be refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

on_both_backends! {
    async fn issued_tokens_are_eddsa_with_kid_and_the_full_claim_set(app) {
        let user = app.sign_up("alice").await;
        let pair = app.login_ok("alice").await;
        let header = header_of(&pair.access_token);
        assert_eq!(header["alg"], "EdDSA");
        assert!(header["kid"].as_str().is_some_and(|k| !k.is_empty()));
        let claims = claims_of(&pair.access_token);
        assert_eq!(claims.sub.to_string(), user.id);
        assert_eq!(claims.iss, "immersiverse-auth");
        assert_eq!(claims.aud, "immersiverse");
        assert_eq!(claims.exp - claims.iat, 900);
        assert_eq!(claims.nbf, claims.iat);
        assert_eq!(claims.roles, ["user"]);
        assert_eq!(claims.roles_csv, "user", "the roles as Envoy copies them");
        assert_eq!(claims.jti.get_version_num(), 7);
        let valid = app.validate(&pair.access_token).await.unwrap();
        assert_eq!(valid.session_id, claims.sid.to_string());
        assert_eq!(valid.expires_at.unwrap().seconds, claims.exp);
        // The JWKS serves the key that verifies it.
        let (status, jwks) = app.http_get("/.well-known/jwks.json").await;
        assert_eq!(status, 200);
        let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
        assert_eq!(jwks["keys"][0]["kid"], header["kid"]);
    }

    async fn expired_tampered_alg_none_hs256_wrong_audience_issuer_and_unknown_kid_tokens_are_refused(app) {
        app.sign_up("bob").await;
        let pair = app.login_ok("bob").await;
        let good = claims_of(&pair.access_token);
        let kid = header_of(&pair.access_token)["kid"].as_str().unwrap().to_owned();
        let eddsa = || {
            let mut h = Header::new(Algorithm::EdDSA);
            h.kid = Some(kid.clone());
            h
        };
        // Control: the forging helper makes tokens the server accepts.
        let control = sign_with_server_key(&app, eddsa(), &Claims { jti: uuid::Uuid::now_v7(), ..good.clone() });
        app.validate(&control).await.expect("a correctly signed token is accepted");

        let expired = Claims { exp: good.iat - 3600, iat: good.iat - 4500, nbf: good.iat - 4500, ..good.clone() };
        let forged = sign_with_server_key(&app, eddsa(), &expired);
        refused(&mut app, &forged).await;
        let future = Claims { nbf: good.iat + 3600, ..good.clone() };
        let forged = sign_with_server_key(&app, eddsa(), &future);
        refused(&mut app, &forged).await;
        let audience = Claims { aud: "someone-else".into(), ..good.clone() };
        let forged = sign_with_server_key(&app, eddsa(), &audience);
        refused(&mut app, &forged).await;
        let issuer = Claims { iss: "evil".into(), ..good.clone() };
        let forged = sign_with_server_key(&app, eddsa(), &issuer);
        refused(&mut app, &forged).await;
        let mut unknown_kid = eddsa();
        unknown_kid.kid = Some("k-unknown".into());
        let forged = sign_with_server_key(&app, unknown_kid, &good);
        refused(&mut app, &forged).await;

        // Tampered payload: roles raised to admin, original signature kept.
        let mut parts: Vec<String> = pair.access_token.split('.').map(str::to_owned).collect();
        let raised = Claims { roles: vec!["admin".into()], ..good.clone() };
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&raised).unwrap());
        refused(&mut app, &parts.join(".")).await;

        // alg none.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&good).unwrap())
        );
        refused(&mut app, &none).await;

        // HS256 keyed with the public key (algorithm confusion).
        let (_, jwks) = app.http_get("/.well-known/jwks.json").await;
        let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
        let public = URL_SAFE_NO_PAD.decode(jwks["keys"][0]["x"].as_str().unwrap()).unwrap();
        let mut hs = Header::new(Algorithm::HS256);
        hs.kid = Some(kid.clone());
        refused(&mut app, &jsonwebtoken::encode(&hs, &good, &EncodingKey::from_secret(&public)).unwrap()).await;

        refused(&mut app, "garbage").await;
        let status = app.validate("").await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }

    async fn a_refresh_rotates_the_pair_and_spends_the_old_refresh_token(app) {
        app.sign_up("carol").await;
        let first = app.login_ok("carol").await;
        let second = app.refresh(&first.refresh_token).await.unwrap();
        assert_ne!(second.refresh_token, first.refresh_token);
        assert_ne!(second.access_token, first.access_token);
        assert_eq!(claims_of(&second.access_token).sid, claims_of(&first.access_token).sid, "same session");
        app.validate(&second.access_token).await.unwrap();
        let third = app.refresh(&second.refresh_token).await.unwrap();
        app.validate(&third.access_token).await.unwrap();
    }

    async fn reusing_a_spent_refresh_token_revokes_that_family_only(app) {
        app.sign_up("dave").await;
        let stolen = app.login_ok("dave").await;
        let other_session = app.login_ok("dave").await;
        let rotated = app.refresh(&stolen.refresh_token).await.unwrap();

        // The spent token comes back (an attacker replaying it).
        let status = app.refresh(&stolen.refresh_token).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);

        // The whole family is dead: its newest refresh and access tokens too.
        assert_eq!(app.refresh(&rotated.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
        refused(&mut app, &rotated.access_token).await;
        refused(&mut app, &stolen.access_token).await;

        // The user's other session lives on.
        app.validate(&other_session.access_token).await.expect("other session untouched");
        app.refresh(&other_session.refresh_token).await.expect("other session still refreshes");
        let events = app.events().await;
        assert!(events.iter().any(|e| e.event_type == "token_revoked" && e.data["reason"] == "refresh_token_reuse"));
    }

    async fn unknown_empty_and_oversized_refresh_tokens_are_refused(app) {
        assert_eq!(app.refresh("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").await.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(app.refresh(&"x".repeat(10_000)).await.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(app.refresh("").await.unwrap_err().code(), Code::InvalidArgument);
    }

    async fn logout_takes_effect_on_the_very_next_validate_token(app) {
        app.sign_up("erin").await;
        let pair = app.login_ok("erin").await;
        let other = app.login_ok("erin").await;
        app.validate(&pair.access_token).await.unwrap();
        app.client
            .logout(bearer(pb::LogoutRequest { refresh_token: pair.refresh_token.clone() }, &pair.access_token))
            .await
            .unwrap();
        refused(&mut app, &pair.access_token).await;
        assert_eq!(app.refresh(&pair.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
        app.validate(&other.access_token).await.expect("logout ends one session only");
        let status = app.client.logout(tonic::Request::new(pb::LogoutRequest::default())).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        let events = app.events().await;
        assert!(events.iter().any(|e| e.event_type == "token_revoked" && e.data["reason"] == "logout"));
    }

    async fn logout_refuses_another_users_refresh_token(app) {
        app.sign_up("fred").await;
        app.sign_up("gwen").await;
        let fred = app.login_ok("fred").await;
        let gwen = app.login_ok("gwen").await;
        let status = app
            .client
            .logout(bearer(pb::LogoutRequest { refresh_token: gwen.refresh_token.clone() }, &fred.access_token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        app.refresh(&gwen.refresh_token).await.expect("gwen's session is untouched");
    }

    async fn a_rotated_key_keeps_old_tokens_valid_and_signs_new_ones(app) {
        app.sign_up("hank").await;
        let before = app.login_ok("hank").await;
        let old_kid = header_of(&before.access_token)["kid"].as_str().unwrap().to_owned();
        let dir = app.config.keys_dir();
        let (new_kid, removed) =
            auth_service::tokens::keys::rotate(&dir, time::OffsetDateTime::now_utc(), time::Duration::ZERO, time::Duration::minutes(16)).unwrap();
        assert!(removed.is_empty());
        assert_eq!(app.app_tokens.reload_keys().unwrap(), new_kid);
        app.validate(&before.access_token).await.expect("tokens of the old key verify until they expire");
        let after = app.login_ok("hank").await;
        assert_eq!(header_of(&after.access_token)["kid"], new_kid.as_str());
        assert_ne!(old_kid, new_kid);
        let (_, jwks) = app.http_get("/.well-known/jwks.json").await;
        assert!(jwks.contains(&old_kid) && jwks.contains(&new_kid), "{jwks}");
    }
}
