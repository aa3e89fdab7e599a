//! Linking an account: the authorization URL with its PKCE verifier, the
//! code exchanged on the callback, listing and disconnecting.

use super::*;

impl PlatformService {
    /// A single-use state bound to the caller, the platform and its redirect
    /// URI, and the platform's authorization URL carrying it (and the PKCE
    /// challenge where supported).
    pub async fn start_link(
        &self,
        caller: &Principal,
        platform: Platform,
    ) -> Result<StartedLink, PlatformError> {
        let provider = self.provider(platform)?;
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).expect("the OS random source works");
        let state = URL_SAFE_NO_PAD.encode(raw);
        let state_hash = sha256(&state);
        let (authorization_url, verifier) = provider.authorization_url(&state);
        let aad = verifier_aad(caller.user_id, platform, &state_hash);
        let expires_at = crate::now_micros() + Duration::from_secs(self.config.state_ttl_secs);
        let link = LinkState {
            user_id: caller.user_id,
            platform,
            redirect_uri: provider.redirect_uri().to_owned(),
            verifier: verifier
                .as_ref()
                .map(|v| self.vault.load().seal(v.expose_secret(), &aad)),
            expires_at,
        };
        self.store.insert_link_state(&state_hash, &link).await?;
        metrics::counter!("platform_links_total", "platform" => platform.as_str(), "outcome" => "started")
            .increment(1);
        Ok(StartedLink {
            authorization_url,
            state,
            expires_at,
            pkce: verifier.is_some(),
        })
    }

    /// Completes a link: spends the state, exchanges the code (with the PKCE
    /// verifier), reads the platform identity and stores the account with
    /// its `platform_connected` event. `platform_error` is the `error` the
    /// platform put on the redirect instead of a code (`access_denied`).
    pub async fn connect(
        &self,
        caller: &Principal,
        platform: Platform,
        code: &str,
        state: &str,
        platform_error: &str,
        ctx: &RequestContext,
    ) -> Result<PlatformAccount, PlatformError> {
        let provider = self.provider(platform)?;
        let mut violations = Vec::new();
        if state.is_empty() {
            violations.push(FieldViolation::new("state", "is required"));
        } else if state.len() > MAX_STATE_LEN {
            violations.push(FieldViolation::new("state", "is too long"));
        }
        if platform_error.is_empty() && code.is_empty() {
            violations.push(FieldViolation::new("code", "is required"));
        } else if code.len() > MAX_CODE_LEN || platform_error.len() > MAX_STATE_LEN {
            violations.push(FieldViolation::new("code", "is too long"));
        }
        if !violations.is_empty() {
            return Err(PlatformError::Invalid(violations));
        }
        // A platform cooling down after a 429 is not called, for a link as
        // for a refresh; the state is kept for the retry.
        let now = OffsetDateTime::now_utc();
        if let Some(until) = self
            .store
            .platform_cooldown(platform.as_str())
            .await?
            .filter(|until| *until > now)
        {
            return Err(PlatformError::Unavailable {
                platform,
                retry_after: (until - now).try_into().unwrap_or(Duration::from_secs(1)),
            });
        }
        let outcome = |o: &'static str| {
            metrics::counter!("platform_links_total", "platform" => platform.as_str(), "outcome" => o)
                .increment(1);
        };
        let state_hash = sha256(state);
        // Taken (deleted) whatever follows: a state is good for one try.
        let link = self
            .store
            .take_link_state(&state_hash)
            .await?
            .ok_or_else(|| invalid("state", "is unknown or was already used"))?;
        if link.user_id != caller.user_id || link.platform != platform {
            outcome("wrong_party");
            return Err(invalid(
                "state",
                "was issued to another user or for another platform",
            ));
        }
        if link.expires_at < OffsetDateTime::now_utc() {
            outcome("expired");
            return Err(invalid("state", "has expired; start the link again"));
        }
        if link.redirect_uri != provider.redirect_uri() {
            return Err(invalid(
                "state",
                "was issued for another redirect URI; start the link again",
            ));
        }
        if !platform_error.is_empty() {
            outcome("denied");
            return Err(PlatformError::Refused {
                platform,
                reason: platform_error.to_owned(),
            });
        }
        let verifier = match &link.verifier {
            Some(sealed) => Some(self.vault.load().open(
                &sealed.key_id,
                &sealed.bytes,
                &verifier_aad(caller.user_id, platform, &state_hash),
            )?),
            None => None,
        };
        let grant = match provider.exchange_code(code, verifier.as_ref()).await {
            Ok(grant) => grant,
            Err(e) => {
                outcome("refused");
                return Err(self.link_error(platform, e).await);
            }
        };
        let identity = match provider.identity(&grant.access_token).await {
            Ok(identity) => identity,
            Err(e) => return Err(self.link_error(platform, e).await),
        };
        let now = crate::now_micros();
        let account = PlatformAccount {
            user_id: caller.user_id,
            platform,
            platform_user_id: identity.platform_user_id,
            login: identity.login,
            display_name: identity.display_name,
            scopes: grant
                .scopes
                .clone()
                .unwrap_or_else(|| provider.scopes().to_vec()),
            status: AccountStatus::Active,
            connected_at: now,
            token_expires_at: grant.expires_in.map(|d| now + d),
        };
        let tokens = self.seal(
            caller.user_id,
            platform,
            &grant.access_token,
            grant.refresh_token.as_ref(),
            account.token_expires_at,
        );
        // Distinct from any version a previous link of this row had.
        let version = i64::try_from(now.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX);
        let event = OutboxEvent::platform_connected(&account, ctx);
        match self
            .store
            .link_account(
                &account,
                &tokens,
                version,
                &event,
                platform.revocation_ends_every_grant(),
                ctx,
            )
            .await?
        {
            LinkOutcome::Linked => {
                outcome("linked");
                Ok(account)
            }
            LinkOutcome::LinkedElsewhere => {
                outcome("linked_elsewhere");
                // The grant just obtained is of no use: hand it back.
                let provider = provider.clone();
                tokio::spawn(async move {
                    let _ = provider
                        .revoke(&grant.access_token, grant.refresh_token.as_ref())
                        .await;
                });
                Err(PlatformError::LinkedElsewhere(platform))
            }
        }
    }

    /// The caller's linked accounts (never tokens).
    pub async fn list(&self, caller: &Principal) -> Result<Vec<PlatformAccount>, PlatformError> {
        Ok(self.store.accounts_of(caller.user_id).await?)
    }

    /// Revokes the grant at the platform and deletes the account. When the
    /// platform answers at once (revoked, already dead, or no revocation
    /// endpoint), the account goes with its `platform_disconnected` event;
    /// when it does not (down, 5xx, 429), the account goes at once and its
    /// grant waits in `platform_grant_revocations`, revoked by the
    /// keep-alive task like a deleted user's, which writes the event when
    /// the platform answers. Returns whether the platform revoked it now.
    pub async fn disconnect(
        &self,
        caller: &Principal,
        platform: Platform,
        ctx: &RequestContext,
    ) -> Result<bool, PlatformError> {
        self.provider(platform)?;
        let stored = self
            .store
            .find_account(caller.user_id, platform)
            .await?
            .ok_or(PlatformError::NotLinked(platform))?;
        let now = OffsetDateTime::now_utc();
        let mut pending = PendingRevocation::of(&stored, now, "disconnected");
        let gone = match self.revoke_grant(&mut pending, now).await {
            Ok(outcome) => {
                let event =
                    OutboxEvent::platform_disconnected(&stored.account, outcome.as_str(), ctx);
                metrics::counter!("platform_grant_revocations_total", "platform" => platform.as_str(), "outcome" => outcome.as_str()).increment(1);
                self.store
                    .delete_account(
                        caller.user_id,
                        platform,
                        stored.account.connected_at,
                        &event,
                    )
                    .await?
                    .then_some(outcome == GrantRevocation::Revoked)
            }
            Err(next) => {
                metrics::counter!("platform_grant_revocations_total", "platform" => platform.as_str(), "outcome" => "retrying").increment(1);
                self.store
                    .queue_grant_revocation(&pending, stored.account.connected_at, next)
                    .await?
                    .then_some(false)
            }
        };
        gone.ok_or(PlatformError::NotLinked(platform))
    }
}
