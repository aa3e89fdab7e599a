//! argon2id hashing on a bounded pool of blocking threads.
//!
//! Hashing is CPU-bound for tens of milliseconds, so it never runs on the
//! async workers: a semaphore admits at most `max_concurrent_hashes` hashes
//! and each runs under `spawn_blocking`. Unknown users are verified against
//! a dummy hash with the same parameters so a login for a missing account
//! costs the same as one for a real account.

use std::sync::Arc;

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher as _, PasswordVerifier as _, Version,
    password_hash::SaltString,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use super::model::Password;
use crate::config::PasswordConfig;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("argon2 parameters are invalid: {0}")]
    Params(argon2::Error),
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("the hashing pool is shut down")]
    PoolClosed,
}

/// The outcome of a verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verification {
    pub matches: bool,
    /// The stored hash used other parameters than the configured ones.
    pub needs_rehash: bool,
}

#[derive(Clone)]
pub struct PasswordHasher {
    params: Params,
    permits: Arc<Semaphore>,
    dummy_hash: Arc<str>,
}

impl PasswordHasher {
    /// Builds the pool and computes the dummy hash (one hash at start-up).
    pub async fn new(config: &PasswordConfig, workers: usize) -> Result<Self, HashError> {
        let params = Params::new(
            config.memory_kib,
            config.iterations,
            config.parallelism,
            None,
        )
        .map_err(HashError::Params)?;
        let mut hasher = Self {
            params,
            permits: Arc::new(Semaphore::new(workers.max(1))),
            dummy_hash: Arc::from(""),
        };
        let dummy = SecretString::from("dummy password that matches no account".to_owned());
        hasher.dummy_hash = Arc::from(hasher.run(move |argon| hash_with(&argon, &dummy)).await??);
        Ok(hasher)
    }

    fn argon2(params: &Params) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(Argon2<'static>) -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| HashError::PoolClosed)?;
        let argon = Self::argon2(&self.params);
        tokio::task::spawn_blocking(move || job(argon))
            .await
            .map_err(|e| HashError::Hash(e.to_string()))
    }

    pub async fn hash(&self, password: &Password) -> Result<String, HashError> {
        let secret = SecretString::from(password.expose().to_owned());
        self.run(move |argon| hash_with(&argon, &secret)).await?
    }

    /// Verifies against `stored`, or against the dummy hash when there is no
    /// account (the result is then never a match).
    pub async fn verify(
        &self,
        password: &Password,
        stored: Option<&str>,
    ) -> Result<Verification, HashError> {
        let secret = SecretString::from(password.expose().to_owned());
        let known = stored.is_some();
        let hash: Arc<str> = stored
            .map(Arc::from)
            .unwrap_or_else(|| self.dummy_hash.clone());
        let wanted = self.params.clone();
        self.run(move |argon| {
            let parsed = PasswordHash::new(&hash).map_err(|e| HashError::Hash(e.to_string()))?;
            let matches = argon
                .verify_password(secret.expose_secret().as_bytes(), &parsed)
                .is_ok();
            let needs_rehash = parsed.algorithm != Algorithm::Argon2id.ident()
                || Params::try_from(&parsed)
                    .map(|p| !same_cost(&p, &wanted))
                    .unwrap_or(true);
            Ok(Verification {
                matches: matches && known,
                needs_rehash,
            })
        })
        .await?
    }
}

fn same_cost(a: &Params, b: &Params) -> bool {
    a.m_cost() == b.m_cost() && a.t_cost() == b.t_cost() && a.p_cost() == b.p_cost()
}

fn hash_with(argon: &Argon2<'_>, password: &SecretString) -> Result<String, HashError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| HashError::Hash(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| HashError::Hash(e.to_string()))?;
    argon
        .hash_password(password.expose_secret().as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(memory_kib: u32) -> PasswordConfig {
        PasswordConfig {
            memory_kib,
            iterations: 1,
            parallelism: 1,
            max_concurrent_hashes: 1,
            min_length: 8,
            max_length: 128,
        }
    }

    fn password(s: &str) -> Password {
        Password::parse("password", s, 8, 128).unwrap()
    }

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let hasher = PasswordHasher::new(&config(64), 1).await.unwrap();
        let hash = hasher.hash(&password("correct horse")).await.unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{hash}");
        assert!(
            hasher
                .verify(&password("correct horse"), Some(&hash))
                .await
                .unwrap()
                .matches
        );
        assert!(
            !hasher
                .verify(&password("wrong horse!"), Some(&hash))
                .await
                .unwrap()
                .matches
        );
    }

    #[tokio::test]
    async fn an_unknown_account_never_matches_even_the_dummy_password() {
        let hasher = PasswordHasher::new(&config(64), 1).await.unwrap();
        let v = hasher
            .verify(&password("dummy password that matches no account"), None)
            .await
            .unwrap();
        assert!(!v.matches);
    }

    #[tokio::test]
    async fn changed_parameters_ask_for_a_rehash() {
        let old = PasswordHasher::new(&config(64), 1).await.unwrap();
        let hash = old.hash(&password("correct horse")).await.unwrap();
        let new = PasswordHasher::new(&config(128), 1).await.unwrap();
        let v = new
            .verify(&password("correct horse"), Some(&hash))
            .await
            .unwrap();
        assert_eq!(
            v,
            Verification {
                matches: true,
                needs_rehash: true
            }
        );
        let same = old
            .verify(&password("correct horse"), Some(&hash))
            .await
            .unwrap();
        assert!(!same.needs_rehash);
    }
}
