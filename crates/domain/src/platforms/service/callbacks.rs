//! The platforms' webhooks: Twitch EventSub (authorization revoked) and
//! Facebook's deauthorize callback.

use super::*;

impl PlatformService {
    /// The key a platform's webhook is signed with; the webhook exists only
    /// for an enabled platform with that key configured.
    pub(super) fn webhook_secret<'a>(
        &self,
        platform: Platform,
        secret: &'a Option<SecretString>,
    ) -> Result<&'a SecretString, WebhookError> {
        secret
            .as_ref()
            .filter(|_| self.providers.contains_key(&platform))
            .ok_or(WebhookError::NotConfigured)
    }

    /// Twitch EventSub over the webhook transport: signature, age, replay,
    /// then the message.
    pub async fn eventsub(
        &self,
        headers: &EventSubHeaders<'_>,
        body: &[u8],
    ) -> Result<EventSubReply, WebhookError> {
        let secret = self.webhook_secret(Platform::Twitch, &self.config.twitch.webhook_secret)?;
        let (Some(id), Some(timestamp), Some(signature), Some(kind)) = (
            headers.message_id,
            headers.timestamp,
            headers.signature,
            headers.message_type,
        ) else {
            return Err(WebhookError::Forbidden("missing EventSub headers"));
        };
        if !webhooks::eventsub_signature_valid(
            secret.expose_secret().as_bytes(),
            id,
            timestamp,
            body,
            signature,
        ) {
            metrics::counter!("webhook_messages_total", "source" => "twitch", "outcome" => "bad_signature").increment(1);
            return Err(WebhookError::Forbidden("signature does not match"));
        }
        let now = OffsetDateTime::now_utc();
        let max_age = Duration::from_secs(self.config.webhook_max_age_secs);
        if !webhooks::eventsub_timestamp(timestamp)
            .is_some_and(|at| webhooks::fresh(at, now, max_age))
        {
            metrics::counter!("webhook_messages_total", "source" => "twitch", "outcome" => "stale")
                .increment(1);
            return Err(WebhookError::Forbidden(
                "message is older than the replay window",
            ));
        }
        let message: serde_json::Value = serde_json::from_slice(body)
            .map_err(|_| WebhookError::Malformed("body is not JSON"))?;
        let first = self
            .store
            .record_webhook_message("twitch", id, now)
            .await
            .map_err(|_| WebhookError::Unavailable)?;
        if !first {
            metrics::counter!("webhook_messages_total", "source" => "twitch", "outcome" => "duplicate").increment(1);
            return Ok(EventSubReply::Duplicate);
        }
        metrics::counter!("webhook_messages_total", "source" => "twitch", "outcome" => "accepted")
            .increment(1);
        match kind {
            "webhook_callback_verification" => message
                .get("challenge")
                .and_then(|c| c.as_str())
                .map(|c| EventSubReply::Challenge(c.to_owned()))
                .ok_or(WebhookError::Malformed("verification without challenge")),
            "revocation" => {
                let status = message
                    .pointer("/subscription/status")
                    .and_then(|s| s.as_str())
                    .unwrap_or("unknown");
                tracing::warn!(status, "Twitch revoked an EventSub subscription");
                Ok(EventSubReply::Accepted)
            }
            "notification" => {
                let subscription = message
                    .pointer("/subscription/type")
                    .and_then(|s| s.as_str());
                if subscription == Some("user.authorization.revoke") {
                    let user = message
                        .pointer("/event/user_id")
                        .and_then(|s| s.as_str())
                        .ok_or(WebhookError::Malformed("revoke without event.user_id"))?;
                    let applied = self
                        .revoked_at_platform(
                            Platform::Twitch,
                            user,
                            "authorization_revoked",
                            &RequestContext::default(),
                        )
                        .await;
                    if let Err(error) = applied {
                        tracing::warn!(%error, "EventSub revoke not applied; Twitch will retry");
                        // Forgotten so that the retry is applied.
                        let _ = self.store.forget_webhook_message("twitch", id).await;
                        return Err(WebhookError::Unavailable);
                    }
                }
                Ok(EventSubReply::Accepted)
            }
            _ => Ok(EventSubReply::Accepted),
        }
    }

    /// Facebook's deauthorize callback (`signed_request` form field).
    pub async fn facebook_deauthorize(&self, signed_request: &str) -> Result<(), WebhookError> {
        // Facebook signs with the app secret.
        let secret =
            self.webhook_secret(Platform::Facebook, &self.config.facebook.client_secret)?;
        let request = webhooks::facebook_signed_request_verified(
            signed_request,
            secret.expose_secret().as_bytes(),
        )
        .map_err(|e| {
            metrics::counter!("webhook_messages_total", "source" => "facebook", "outcome" => "bad_signature").increment(1);
            match e {
                webhooks::SignedRequestError::BadSignature => {
                    WebhookError::Forbidden("signature does not match")
                }
                _ => WebhookError::Forbidden("malformed signed_request"),
            }
        })?;
        // Fresh and first, like EventSub: a captured callback replayed
        // later (after the user linked again) must not unlink them.
        let now = OffsetDateTime::now_utc();
        let max_age = Duration::from_secs(self.config.webhook_max_age_secs);
        if !request
            .issued_at
            .and_then(|at| OffsetDateTime::from_unix_timestamp(at).ok())
            .is_some_and(|at| webhooks::fresh(at, now, max_age))
        {
            metrics::counter!("webhook_messages_total", "source" => "facebook", "outcome" => "stale")
                .increment(1);
            return Err(WebhookError::Forbidden(
                "signed_request is older than the replay window (issued_at)",
            ));
        }
        let first = self
            .store
            .record_webhook_message("facebook", &request.id, now)
            .await
            .map_err(|_| WebhookError::Unavailable)?;
        if !first {
            metrics::counter!("webhook_messages_total", "source" => "facebook", "outcome" => "duplicate").increment(1);
            return Ok(());
        }
        metrics::counter!("webhook_messages_total", "source" => "facebook", "outcome" => "accepted").increment(1);
        let applied = self
            .revoked_at_platform(
                Platform::Facebook,
                &request.user_id,
                "deauthorized",
                &RequestContext::default(),
            )
            .await;
        if applied.is_err() {
            // Forgotten so that Facebook's retry is applied.
            let _ = self
                .store
                .forget_webhook_message("facebook", &request.id)
                .await;
            return Err(WebhookError::Unavailable);
        }
        Ok(())
    }
}
