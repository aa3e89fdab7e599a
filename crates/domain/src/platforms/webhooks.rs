//! Verification of the platforms' webhook calls: Twitch EventSub (webhook
//! transport) and Facebook's deauthorize callback. Both are HMAC-SHA256
//! signatures compared in constant time; nothing else about the caller is
//! trusted.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use time::OffsetDateTime;

type HmacSha256 = Hmac<Sha256>;

/// Checks `Twitch-Eventsub-Message-Signature` (`sha256=<hex>`): HMAC-SHA256
/// with the subscription secret over message id ‖ timestamp ‖ raw body.
pub fn eventsub_signature_valid(
    secret: &[u8],
    message_id: &str,
    timestamp: &str,
    body: &[u8],
    signature: &str,
) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(message_id.as_bytes());
    mac.update(timestamp.as_bytes());
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&expected).is_ok()
}

/// The signature Twitch would send (tests, tools).
pub fn eventsub_signature(secret: &[u8], message_id: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(message_id.as_bytes());
    mac.update(timestamp.as_bytes());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// `Twitch-Eventsub-Message-Timestamp` (RFC 3339, nanoseconds).
pub fn eventsub_timestamp(value: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339).ok()
}

/// Whether `at` is within `max_age` of `now` (either side: a clock far in
/// the future is as suspect as a stale one).
pub fn fresh(at: OffsetDateTime, now: OffsetDateTime, max_age: std::time::Duration) -> bool {
    let age = (now - at).abs();
    age <= max_age
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignedRequestError {
    #[error("malformed signed_request")]
    Malformed,
    #[error("signed_request signature does not match")]
    BadSignature,
    #[error("unsupported signed_request algorithm")]
    Algorithm,
}

/// A verified `signed_request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest {
    /// The app-scoped user id.
    pub user_id: String,
    /// `issued_at`, Unix seconds (`None` when absent).
    pub issued_at: Option<i64>,
    /// Hex SHA-256 of the signature: names this signed request, for replay.
    pub id: String,
}

/// Facebook's `signed_request`: `<base64url signature>.<base64url payload>`,
/// the signature HMAC-SHA256 of the encoded payload with the app secret.
/// Returns the payload's `user_id` (app-scoped).
pub fn facebook_signed_request_user(
    signed_request: &str,
    app_secret: &[u8],
) -> Result<String, SignedRequestError> {
    facebook_signed_request_verified(signed_request, app_secret).map(|r| r.user_id)
}

/// [`facebook_signed_request_user`] with the payload's `issued_at` and an
/// id for replay detection.
pub fn facebook_signed_request_verified(
    signed_request: &str,
    app_secret: &[u8],
) -> Result<SignedRequest, SignedRequestError> {
    let (sig, payload) = signed_request
        .split_once('.')
        .ok_or(SignedRequestError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig.trim_end_matches('='))
        .map_err(|_| SignedRequestError::Malformed)?;
    let mut mac = HmacSha256::new_from_slice(app_secret).expect("HMAC takes a key of any length");
    mac.update(payload.as_bytes());
    mac.verify_slice(&sig)
        .map_err(|_| SignedRequestError::BadSignature)?;
    let json = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| SignedRequestError::Malformed)?;
    let value: serde_json::Value =
        serde_json::from_slice(&json).map_err(|_| SignedRequestError::Malformed)?;
    if !value
        .get("algorithm")
        .and_then(|a| a.as_str())
        .is_some_and(|a| a.eq_ignore_ascii_case("HMAC-SHA256"))
    {
        return Err(SignedRequestError::Algorithm);
    }
    let user_id = value
        .get("user_id")
        .and_then(|u| u.as_str())
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .ok_or(SignedRequestError::Malformed)?;
    Ok(SignedRequest {
        user_id,
        issued_at: value.get("issued_at").and_then(serde_json::Value::as_i64),
        id: hex::encode(<Sha256 as sha2::Digest>::digest(&sig)),
    })
}

/// Builds a `signed_request` as Facebook does (tests, tools).
pub fn facebook_signed_request(payload: &serde_json::Value, app_secret: &[u8]) -> String {
    let payload = URL_SAFE_NO_PAD.encode(payload.to_string());
    let mut mac = HmacSha256::new_from_slice(app_secret).expect("HMAC takes a key of any length");
    mac.update(payload.as_bytes());
    format!(
        "{}.{payload}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn eventsub_signatures_are_checked_over_id_timestamp_and_body() {
        let sig = eventsub_signature(b"s3cret", "id-1", "2026-11-25T10:00:00.123Z", b"{}");
        assert!(eventsub_signature_valid(
            b"s3cret",
            "id-1",
            "2026-11-25T10:00:00.123Z",
            b"{}",
            &sig
        ));
        for (secret, id, ts, body) in [
            (
                &b"other"[..],
                "id-1",
                "2026-11-25T10:00:00.123Z",
                &b"{}"[..],
            ),
            (b"s3cret", "id-2", "2026-11-25T10:00:00.123Z", b"{}"),
            (b"s3cret", "id-1", "2026-11-25T10:00:01.123Z", b"{}"),
            (b"s3cret", "id-1", "2026-11-25T10:00:00.123Z", b"{ }"),
        ] {
            assert!(!eventsub_signature_valid(secret, id, ts, body, &sig));
        }
        assert!(!eventsub_signature_valid(
            b"s3cret", "id-1", "t", b"{}", "md5=00"
        ));
        assert!(!eventsub_signature_valid(
            b"s3cret",
            "id-1",
            "t",
            b"{}",
            "sha256=zz"
        ));
    }

    #[test]
    fn eventsub_timestamps_older_or_newer_than_the_window_are_stale() {
        let now = eventsub_timestamp("2026-11-25T10:10:00.5Z").unwrap();
        let window = std::time::Duration::from_secs(600);
        assert!(fresh(
            eventsub_timestamp("2026-11-25T10:00:01Z").unwrap(),
            now,
            window
        ));
        assert!(!fresh(
            eventsub_timestamp("2026-11-25T09:59:59Z").unwrap(),
            now,
            window
        ));
        assert!(!fresh(
            eventsub_timestamp("2026-11-25T10:30:00Z").unwrap(),
            now,
            window
        ));
        assert!(eventsub_timestamp("yesterday").is_none());
    }

    #[test]
    fn facebook_signed_requests_are_verified_before_they_are_read() {
        let payload = json!({"algorithm": "HMAC-SHA256", "issued_at": 1, "user_id": "1234"});
        let signed = facebook_signed_request(&payload, b"app-secret");
        assert_eq!(
            facebook_signed_request_user(&signed, b"app-secret").unwrap(),
            "1234"
        );
        assert_eq!(
            facebook_signed_request_user(&signed, b"wrong"),
            Err(SignedRequestError::BadSignature)
        );
        let (sig, _) = signed.split_once('.').unwrap();
        let forged = format!(
            "{sig}.{}",
            URL_SAFE_NO_PAD.encode(json!({"algorithm":"HMAC-SHA256","user_id":"999"}).to_string())
        );
        assert_eq!(
            facebook_signed_request_user(&forged, b"app-secret"),
            Err(SignedRequestError::BadSignature)
        );
        let md5 = facebook_signed_request(&json!({"algorithm": "MD5", "user_id": "1"}), b"k");
        assert_eq!(
            facebook_signed_request_user(&md5, b"k"),
            Err(SignedRequestError::Algorithm)
        );
        assert_eq!(
            facebook_signed_request_user("no-dot", b"k"),
            Err(SignedRequestError::Malformed)
        );
    }
}
