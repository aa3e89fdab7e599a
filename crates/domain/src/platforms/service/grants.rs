//! Revoking grants at the platforms: a deleted user's or replaced grant is
//! queued and revoked until the platform answers.

use super::*;

impl PlatformService {
    /// Revokes at their platforms the queued grants (deleted users', and
    /// disconnects the platform did not answer at once) that are due
    /// at `now` (a bounded batch, claimed so that replicas share the work):
    /// each one the platform answers for — revoked, already dead, or no
    /// revocation endpoint — leaves the queue with its
    /// `platform_disconnected` event in one transaction; one without an
    /// answer is tried again after a doubling wait (a 429's own wait, shared
    /// with every replica through `platform_cooldowns`). Nothing is dropped
    /// without an answer.
    pub async fn revoke_pending_grants(
        &self,
        now: OffsetDateTime,
    ) -> Result<GrantRevocationReport, PlatformError> {
        let mut report = GrantRevocationReport::default();
        let claimed = self
            .store
            .claim_grant_revocations(
                now,
                now + GRANT_REVOCATION_CLAIM,
                self.config.keepalive_batch.min(GRANT_REVOCATION_BATCH),
            )
            .await?;
        for mut pending in claimed {
            match self.revoke_grant(&mut pending, now).await {
                Ok(outcome) => {
                    let event = OutboxEvent::platform_grant_revoked(
                        pending.user_id,
                        pending.platform,
                        &pending.platform_user_id,
                        &pending.scopes,
                        outcome.as_str(),
                        &pending.reason,
                        &RequestContext::default(),
                    );
                    self.store.finish_grant_revocation(&pending, &event).await?;
                    metrics::counter!("platform_grant_revocations_total", "platform" => pending.platform.as_str(), "outcome" => outcome.as_str()).increment(1);
                    match outcome {
                        GrantRevocation::Revoked => report.revoked += 1,
                        GrantRevocation::AlreadyDead => report.already_dead += 1,
                        GrantRevocation::Unsupported => report.unsupported += 1,
                    }
                }
                Err(next) => {
                    self.store.retry_grant_revocation(&pending, next).await?;
                    metrics::counter!("platform_grant_revocations_total", "platform" => pending.platform.as_str(), "outcome" => "retrying").increment(1);
                    report.retrying += 1;
                    // Still retried (nothing is dropped without an answer),
                    // but no longer quietly.
                    if pending.attempts + 1 >= GRANT_REVOCATION_OVERDUE {
                        report.overdue += 1;
                        metrics::counter!("platform_grant_revocations_overdue_total", "platform" => pending.platform.as_str()).increment(1);
                        tracing::warn!(
                            platform = %pending.platform,
                            attempts = pending.attempts + 1,
                            queued_at = %pending.queued_at,
                            reason = %pending.reason,
                            "a grant still waits for its revocation at the platform"
                        );
                    }
                }
            }
        }
        Ok(report)
    }

    /// One attempt at revoking `pending`'s grant: how it ended, or when to
    /// try again.
    pub(super) async fn revoke_grant(
        &self,
        pending: &mut PendingRevocation,
        now: OffsetDateTime,
    ) -> Result<GrantRevocation, OffsetDateTime> {
        let platform = pending.platform;
        let wait = GRANT_REVOCATION_BACKOFF
            .saturating_mul(1 << pending.attempts.clamp(0, 16))
            .min(GRANT_REVOCATION_MAX_WAIT);
        // From when this attempt ends, not when the batch began.
        let later = now.max(OffsetDateTime::now_utc()) + wait;
        let Ok(provider) = self.provider(platform) else {
            tracing::warn!(%platform, "a deleted user's grant waits: the platform is not configured here");
            return Err(later);
        };
        match self.store.platform_cooldown(platform.as_str()).await {
            Ok(Some(until)) if until > now => return Err(until),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%platform, %error, "platform cooldown unreadable; the grant revocation waits");
                return Err(later);
            }
        }
        let (access, refresh) = match open_sealed(
            &self.vault.load(),
            pending.user_id,
            platform,
            &pending.tokens,
        ) {
            Ok(tokens) => tokens,
            Err(error) => {
                tracing::error!(%platform, %error, "a deleted user's tokens do not open (vault key missing?); the grant revocation waits");
                return Err(later);
            }
        };
        match provider.revoke(&access, refresh.as_ref()).await {
            Ok(true) => Ok(GrantRevocation::Revoked),
            Ok(false) => Ok(GrantRevocation::Unsupported),
            // A platform that revokes by access token (Twitch) no longer
            // knows an expired one while the refresh token lives on — and
            // Twitch's refresh answer documents no `expires_in`, so the
            // expiry is not always known: refresh, and revoke the new one.
            Err(CallError::InvalidGrant(_))
                if refresh.is_some() && provider.revokes_by_access_token() =>
            {
                let grant = match provider.refresh(refresh.as_ref(), &access).await {
                    Ok(grant) => grant,
                    Err(CallError::InvalidGrant(_)) => return Ok(GrantRevocation::AlreadyDead),
                    Err(error) => {
                        return Err(self.retry_after_failure(platform, error, later).await);
                    }
                };
                let refresh = grant.refresh_token.or(refresh);
                // Twitch rotates the refresh token: a retry needs the new ones.
                pending.tokens = seal_tokens(
                    &self.vault.load(),
                    pending.user_id,
                    platform,
                    &grant.access_token,
                    refresh.as_ref(),
                    grant.expires_in.map(|ttl| crate::now_micros() + ttl),
                );
                pending.refreshed = true;
                match provider.revoke(&grant.access_token, refresh.as_ref()).await {
                    Ok(true) => Ok(GrantRevocation::Revoked),
                    Ok(false) => Ok(GrantRevocation::Unsupported),
                    Err(CallError::InvalidGrant(_)) => Ok(GrantRevocation::AlreadyDead),
                    Err(error) => Err(self.retry_after_failure(platform, error, later).await),
                }
            }
            Err(CallError::InvalidGrant(_)) => Ok(GrantRevocation::AlreadyDead),
            Err(error) => Err(self.retry_after_failure(platform, error, later).await),
        }
    }

    /// A platform failure during linking: nothing is stored, and a 429
    /// starts the platform's cooldown for every replica.
    pub(super) async fn link_error(&self, platform: Platform, error: CallError) -> PlatformError {
        if let CallError::RateLimited { retry_after } = &error
            && let Err(e) = self
                .store
                .set_platform_cooldown(platform.as_str(), OffsetDateTime::now_utc() + *retry_after)
                .await
        {
            tracing::warn!(%platform, error = %e, "could not record the platform's 429");
        }
        link_error(platform, error)
    }

    /// When to try a platform call again after `error`: when a 429 said
    /// (stored for every replica), else `later`.
    pub(super) async fn retry_after_failure(
        &self,
        platform: Platform,
        error: CallError,
        later: OffsetDateTime,
    ) -> OffsetDateTime {
        match error {
            CallError::RateLimited { retry_after } => {
                let until = OffsetDateTime::now_utc() + retry_after;
                if let Err(error) = self
                    .store
                    .set_platform_cooldown(platform.as_str(), until)
                    .await
                {
                    tracing::warn!(%platform, %error, "could not record the platform's 429");
                }
                until
            }
            error => {
                tracing::warn!(%platform, %error, "revoking a deleted user's grant got no answer; trying again later");
                later
            }
        }
    }
}
