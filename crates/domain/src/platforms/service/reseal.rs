//! Resealing every stored token under the vault's current key.

use super::*;

impl PlatformService {
    /// Re-seals every account not under the current vault key; returns how
    /// many rows moved. Safe to run while serving (version-checked writes).
    pub async fn reseal_all(&self) -> Result<u64, PlatformError> {
        let mut moved = 0;
        let mut stuck = 0;
        loop {
            let rows = self
                .store
                .sealed_with_other_key(self.vault.load().current_key_id(), 100)
                .await?;
            if rows.len() <= stuck {
                return Ok(moved);
            }
            stuck = 0;
            for stored in rows {
                let (access, refresh) = self.open(&stored)?;
                let tokens = self.seal(
                    stored.account.user_id,
                    stored.account.platform,
                    &access,
                    refresh.as_ref(),
                    stored.tokens.expires_at,
                );
                if self
                    .store
                    .replace_tokens(
                        stored.account.user_id,
                        stored.account.platform,
                        stored.version,
                        &tokens,
                        None,
                    )
                    .await?
                {
                    moved += 1;
                } else {
                    stuck += 1;
                }
            }
        }
    }
}
