//! Keep-alive: refreshes tokens that would expire before anyone asks, in
//! batches, under the same per-account lease as a caller.

use super::*;

impl PlatformService {
    /// One keep-alive round: re-exchange Facebook tokens nearing expiry and
    /// validate Twitch tokens not validated within the hour, a bounded batch
    /// each (replicas share the work through the database), then purge
    /// spent link states and old webhook ids.
    pub async fn keepalive(&self) -> Result<KeepaliveReport, PlatformError> {
        let mut report = KeepaliveReport::default();
        let now = OffsetDateTime::now_utc();
        let lease = Duration::from_millis(self.config.refresh_lease_ms);
        let ctx = RequestContext::default();
        for (&platform, provider) in &self.providers {
            // A platform that answered 429 is left alone until its reset,
            // by this round as by callers.
            if self
                .store
                .platform_cooldown(platform.as_str())
                .await?
                .is_some_and(|until| until > now)
            {
                report.rate_limited += 1;
                continue;
            }
            let refresher = self.refresher(provider.clone());
            if provider.refresh_model() == crate::platforms::api::RefreshModel::ExchangeLongLived {
                let due = self
                    .store
                    .expiring(
                        platform,
                        now + Duration::from_secs(self.config.extend_ahead_secs),
                        now,
                        self.config.keepalive_batch,
                    )
                    .await?;
                for stored in due {
                    let outcome = self
                        .leased_refresh(&refresher, stored, now, lease, &ctx)
                        .await?;
                    report.count(outcome, |r| r.extended += 1);
                }
            }
            if self.config.provider(platform).validate_url.is_some() && platform == Platform::Twitch
            {
                let cutoff = now - Duration::from_secs(self.config.validate_interval_secs);
                let due = self
                    .store
                    .claim_validation(platform, cutoff, now, self.config.keepalive_batch)
                    .await?;
                for stored in due {
                    let Ok((access, _)) = self.open(&stored) else {
                        report.failed += 1;
                        continue;
                    };
                    match provider.validate(&access).await {
                        Ok(true) => report.validated += 1,
                        Ok(false) => {
                            // Invalid before its time: refresh now; a dead
                            // refresh token marks the account.
                            let outcome = self
                                .leased_refresh(&refresher, stored, now, lease, &ctx)
                                .await?;
                            report.count(outcome, |r| r.validated += 1);
                        }
                        Err(CallError::RateLimited { retry_after }) => {
                            // Every replica's round and every caller waits.
                            self.store
                                .set_platform_cooldown(
                                    platform.as_str(),
                                    OffsetDateTime::now_utc() + retry_after,
                                )
                                .await?;
                            report.failed += 1;
                            break;
                        }
                        Err(error) => {
                            tracing::debug!(%platform, %error, "token validation failed");
                            report.failed += 1;
                        }
                    }
                }
            }
        }
        let max_age = Duration::from_secs(self.config.webhook_max_age_secs);
        self.store
            .purge_platform_state(now, now - max_age * 2)
            .await?;
        Ok(report)
    }

    /// Refreshes `stored` if this replica takes its lease (`None`: another
    /// replica has it, or the row moved on).
    pub(super) async fn leased_refresh(
        &self,
        refresher: &Refresher,
        stored: StoredAccount,
        now: OffsetDateTime,
        lease: Duration,
        ctx: &RequestContext,
    ) -> Result<Option<Result<AccessGrant, PlatformError>>, PlatformError> {
        let taken = self
            .store
            .take_refresh_lease(
                stored.account.user_id,
                stored.account.platform,
                stored.version,
                now,
                now + lease,
            )
            .await?;
        Ok(match taken {
            true => Some(refresher.refresh(stored, ctx).await),
            false => None,
        })
    }

    /// Runs [`keepalive`](Self::keepalive) every `keepalive_interval_secs`
    /// (with jitter) until `stop`.
    pub async fn run_keepalive(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let period = Duration::from_secs(self.config.keepalive_interval_secs);
        if period.is_zero() || self.providers.is_empty() {
            return;
        }
        loop {
            let mut jitter = [0u8; 2];
            let _ = getrandom::fill(&mut jitter);
            let pause =
                period + period.mul_f64(f64::from(u16::from_le_bytes(jitter)) / 65535.0 / 4.0);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            match self.keepalive().await {
                Ok(report) if report != KeepaliveReport::default() => {
                    tracing::info!(?report, "platform keep-alive round")
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "platform keep-alive round failed"),
            }
            match self.revoke_pending_grants(OffsetDateTime::now_utc()).await {
                Ok(report) if report != GrantRevocationReport::default() => {
                    tracing::info!(?report, "deleted users' grants revoked at the platforms")
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "revoking deleted users' grants failed"),
            }
        }
    }
}
