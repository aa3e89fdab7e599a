//! GetPlatformAccessToken: the stored token while it stays valid, else one
//! refresh per account across replicas; tokens sealed and opened here.

use super::*;

impl PlatformService {
    /// A valid access token of `user_id`'s account on `platform`, refreshed
    /// first when it expires within the skew.
    /// `rejected`: the token the caller was given and the platform refused
    /// (401). It forces one refresh only while it is still the stored token;
    /// a token that is not the current one (refreshed meanwhile, or never
    /// ours) is answered with the current token and no refresh, so a caller
    /// cannot force refreshes at will.
    pub async fn access_token(
        &self,
        caller: &ServiceCaller,
        user_id: &str,
        platform: Platform,
        rejected: Option<&str>,
        ctx: &RequestContext,
    ) -> Result<AccessGrant, PlatformError> {
        let user_id =
            Uuid::parse_str(user_id.trim()).map_err(|_| invalid("user_id", "must be a UUID"))?;
        if rejected.is_some_and(|t| t.len() > MAX_PLATFORM_TOKEN_BYTES) {
            return Err(invalid(
                "rejected_token",
                "is longer than any platform token",
            ));
        }
        tracing::debug!(caller = caller.name(), %user_id, %platform, "platform token requested");
        let provider = self.provider(platform)?.clone();
        let skew = Duration::from_secs(self.config.refresh_skew_secs);
        let lease = Duration::from_millis(self.config.refresh_lease_ms);
        // Waiting for another replica's refresh is bounded by its lease.
        let give_up = tokio::time::Instant::now() + lease + Duration::from_millis(500);
        loop {
            let stored = self
                .store
                .find_account(user_id, platform)
                .await?
                .ok_or(PlatformError::NotLinked(platform))?;
            if !stored.user_active {
                // A suspended or deleted user's platform tokens are not
                // handed out.
                return Err(PlatformError::UserInactive);
            }
            if stored.account.status != AccountStatus::Active {
                return Err(PlatformError::ReauthRequired {
                    platform,
                    status: stored.account.status.as_str(),
                });
            }
            let now = OffsetDateTime::now_utc();
            // The caller saw the stored token refused: it is dead, whatever
            // its expiry says. Compared in constant time.
            let dead = match rejected {
                Some(r) => {
                    let (current, _) = self.open(&stored)?;
                    subtle::ConstantTimeEq::ct_eq(r.as_bytes(), current.expose_secret().as_bytes())
                        .into()
                }
                None => false,
            };
            if dead {
                metrics::counter!("platform_token_rejections_total", "platform" => platform.as_str())
                    .increment(1);
            }
            if !dead && stored.tokens.expires_at.is_none_or(|e| e > now + skew) {
                metrics::counter!("platform_token_reads_total", "platform" => platform.as_str(), "path" => "fresh")
                    .increment(1);
                return self.grant_from(&stored);
            }
            let leased = stored.lease_until.is_some_and(|until| until > now);
            if leased
                && !dead
                && stored
                    .tokens
                    .expires_at
                    .is_some_and(|e| e > now + STILL_USABLE)
            {
                // Another caller is refreshing; the current token is still
                // good for a while: no need to wait for the new one.
                metrics::counter!("platform_token_reads_total", "platform" => platform.as_str(), "path" => "during_refresh")
                    .increment(1);
                return self.grant_from(&stored);
            }
            // A platform that answered 429 is not called by any replica
            // before its time: the current token while it is still good,
            // else Unavailable with the platform's own wait.
            if !leased
                && let Some(until) = self
                    .store
                    .platform_cooldown(platform.as_str())
                    .await?
                    .filter(|until| *until > now)
            {
                if !dead
                    && stored
                        .tokens
                        .expires_at
                        .is_some_and(|e| e > now + STILL_USABLE)
                {
                    return self.grant_from(&stored);
                }
                metrics::counter!("platform_token_reads_total", "platform" => platform.as_str(), "path" => "rate_limited")
                    .increment(1);
                return Err(PlatformError::Unavailable {
                    platform,
                    retry_after: Duration::try_from(until - now)
                        .unwrap_or(Duration::from_secs(1))
                        .max(Duration::from_secs(1)),
                });
            }
            if !leased
                && self
                    .store
                    .take_refresh_lease(user_id, platform, stored.version, now, now + lease)
                    .await?
            {
                // Detached: it finishes and stores even if this call is
                // dropped.
                let this = self.refresher(provider.clone());
                let ctx = ctx.clone();
                let refresh = async move { this.refresh(stored, &ctx).await };
                return tokio::spawn(tracing::Instrument::in_current_span(refresh))
                    .await
                    .map_err(|_| unavailable(platform))?;
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(unavailable(platform));
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
    }

    pub(super) fn refresher(&self, provider: Arc<dyn PlatformApi>) -> Refresher {
        Refresher {
            store: self.store.clone(),
            vault: self.vault.clone(),
            provider,
        }
    }

    pub(super) fn grant_from(&self, stored: &StoredAccount) -> Result<AccessGrant, PlatformError> {
        let (access, _) = self.open(stored)?;
        Ok(AccessGrant {
            access_token: access,
            expires_at: stored.tokens.expires_at,
            platform_user_id: stored.account.platform_user_id.clone(),
            scopes: stored.account.scopes.clone(),
        })
    }

    pub(super) fn open(
        &self,
        stored: &StoredAccount,
    ) -> Result<(SecretString, Option<SecretString>), crate::platforms::vault::VaultError> {
        open_tokens(&self.vault.load(), stored)
    }

    pub(super) fn seal(
        &self,
        user_id: Uuid,
        platform: Platform,
        access: &SecretString,
        refresh: Option<&SecretString>,
        expires_at: Option<OffsetDateTime>,
    ) -> SealedTokens {
        seal_tokens(
            &self.vault.load(),
            user_id,
            platform,
            access,
            refresh,
            expires_at,
        )
    }

    /// The platform says the user removed this application: mark the
    /// account revoked with a `platform_reauth_required` event. False when
    /// no account matches or it was already revoked.
    pub async fn revoked_at_platform(
        &self,
        platform: Platform,
        platform_user_id: &str,
        reason: &str,
        ctx: &RequestContext,
    ) -> Result<bool, PlatformError> {
        let Some(stored) = self
            .store
            .find_by_platform_user(platform, platform_user_id)
            .await?
        else {
            return Ok(false);
        };
        let event = OutboxEvent::platform_reauth_required(
            &stored.account,
            AccountStatus::Revoked,
            reason,
            ctx,
        );
        Ok(self
            .store
            .set_status(
                stored.account.user_id,
                platform,
                AccountStatus::Revoked,
                &event,
            )
            .await?)
    }
}
