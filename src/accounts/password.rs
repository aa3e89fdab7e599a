//! argon2id hashing on a dedicated, bounded pool of worker threads.
//!
//! Hashing is CPU- and memory-bound for tens of milliseconds, so it never runs
//! on the async workers. `max_concurrent_hashes` OS threads (one per core by
//! default) take jobs from a bounded queue; each keeps its argon2 memory
//! (19 MiB at the defaults) for its whole life instead of allocating and
//! faulting in a fresh buffer per hash. Unknown users are verified against a
//! dummy hash with the same parameters so a login for a missing account costs
//! the same as one for a real account.

use std::{
    sync::{Arc, Mutex, mpsc},
    thread,
};

use argon2::{
    Algorithm, Argon2, Block, Params, PasswordHash, Version,
    password_hash::{Output, ParamsString, SaltString},
};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

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

enum Job {
    Hash {
        password: SecretString,
        reply: oneshot::Sender<Result<String, HashError>>,
    },
    Verify {
        password: SecretString,
        hash: Arc<str>,
        reply: oneshot::Sender<Result<Verification, HashError>>,
    },
}

#[derive(Clone)]
pub struct PasswordHasher {
    jobs: mpsc::SyncSender<Job>,
    dummy_hash: Arc<str>,
}

/// Jobs waiting per worker before callers wait to enqueue (the async side
/// waits in the reply, not on the queue, in normal operation).
const QUEUE_PER_WORKER: usize = 64;

impl PasswordHasher {
    /// Starts `workers` threads and computes the dummy hash (one hash at
    /// start-up). The threads end when the last handle is dropped.
    pub async fn new(config: &PasswordConfig, workers: usize) -> Result<Self, HashError> {
        let params = Params::new(
            config.memory_kib,
            config.iterations,
            config.parallelism,
            None,
        )
        .map_err(HashError::Params)?;
        let workers = workers.max(1);
        let (jobs, queue) = mpsc::sync_channel::<Job>(workers * QUEUE_PER_WORKER);
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..workers {
            let queue = queue.clone();
            let params = params.clone();
            thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || worker(&queue, &params))
                .map_err(|e| HashError::Hash(e.to_string()))?;
        }
        let mut hasher = Self {
            jobs,
            dummy_hash: Arc::from(""),
        };
        let dummy = Password::parse(
            "password",
            "dummy password that matches no account",
            1,
            1024,
        )
        .map_err(|_| HashError::Hash("dummy password".into()))?;
        hasher.dummy_hash = Arc::from(hasher.hash(&dummy).await?);
        Ok(hasher)
    }

    async fn submit<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, HashError>>) -> Job,
    ) -> Result<T, HashError> {
        let (reply, answer) = oneshot::channel();
        let job = job(reply);
        // A full queue blocks the sender: do that off the async workers.
        let jobs = self.jobs.clone();
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(job)) => {
                tokio::task::spawn_blocking(move || jobs.send(job))
                    .await
                    .map_err(|_| HashError::PoolClosed)?
                    .map_err(|_| HashError::PoolClosed)?;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(HashError::PoolClosed),
        }
        answer.await.map_err(|_| HashError::PoolClosed)?
    }

    pub async fn hash(&self, password: &Password) -> Result<String, HashError> {
        let password = SecretString::from(password.expose().to_owned());
        self.submit(|reply| Job::Hash { password, reply }).await
    }

    /// Verifies against `stored`, or against the dummy hash when there is no
    /// account (the result is then never a match).
    pub async fn verify(
        &self,
        password: &Password,
        stored: Option<&str>,
    ) -> Result<Verification, HashError> {
        let password = SecretString::from(password.expose().to_owned());
        let known = stored.is_some();
        let hash: Arc<str> = stored
            .map(Arc::from)
            .unwrap_or_else(|| self.dummy_hash.clone());
        let verification = self
            .submit(|reply| Job::Verify {
                password,
                hash,
                reply,
            })
            .await?;
        Ok(Verification {
            matches: verification.matches && known,
            ..verification
        })
    }
}

fn worker(queue: &Mutex<mpsc::Receiver<Job>>, params: &Params) {
    let mut memory = vec![Block::default(); params.block_count()];
    loop {
        let job = {
            let Ok(queue) = queue.lock() else { return };
            match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        match job {
            Job::Hash { password, reply } => {
                let _ = reply.send(hash_with(params, &password, &mut memory));
            }
            Job::Verify {
                password,
                hash,
                reply,
            } => {
                let _ = reply.send(verify_with(params, &password, &hash, &mut memory));
            }
        }
    }
}

fn memory_for<'m>(memory: &'m mut Vec<Block>, params: &Params) -> &'m mut [Block] {
    if memory.len() < params.block_count() {
        memory.resize(params.block_count(), Block::default());
    }
    &mut memory[..params.block_count()]
}

fn failed(e: impl std::fmt::Display) -> HashError {
    HashError::Hash(e.to_string())
}

/// A PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) for `password`.
fn hash_with(
    params: &Params,
    password: &SecretString,
    memory: &mut Vec<Block>,
) -> Result<String, HashError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(failed)?;
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(
            password.expose_secret().as_bytes(),
            &salt,
            &mut out,
            memory_for(memory, params),
        )
        .map_err(failed)?;
    let salt = SaltString::encode_b64(&salt).map_err(failed)?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params).map_err(failed)?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(failed)?),
    };
    Ok(phc.to_string())
}

fn verify_with(
    wanted: &Params,
    password: &SecretString,
    phc: &str,
    memory: &mut Vec<Block>,
) -> Result<Verification, HashError> {
    let parsed = PasswordHash::new(phc).map_err(failed)?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(failed)?;
    let version = parsed
        .version
        .map(Version::try_from)
        .transpose()
        .map_err(failed)?
        .unwrap_or(Version::V0x13);
    let params = Params::try_from(&parsed).map_err(failed)?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(HashError::Hash("stored hash lacks salt or output".into()));
    };
    let mut salt_buf = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_buf).map_err(failed)?;
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params.clone())
        .hash_password_into_with_memory(
            password.expose_secret().as_bytes(),
            salt,
            &mut out,
            memory_for(memory, &params),
        )
        .map_err(failed)?;
    // Constant time: the comparison must not tell how many bytes matched.
    let matches = bool::from(out.as_slice().ct_eq(expected.as_bytes()));
    let same_cost = params.m_cost() == wanted.m_cost()
        && params.t_cost() == wanted.t_cost()
        && params.p_cost() == wanted.p_cost();
    Ok(Verification {
        matches,
        needs_rehash: algorithm != Algorithm::Argon2id || version != Version::V0x13 || !same_cost,
    })
}

#[cfg(test)]
mod tests {
    use argon2::PasswordVerifier;

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
    async fn hashes_are_standard_phc_strings_both_ways() {
        let hasher = PasswordHasher::new(&config(64), 2).await.unwrap();
        // Ours verifies with the reference implementation…
        let ours = hasher.hash(&password("correct horse")).await.unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        // …and one made by the reference implementation verifies with ours.
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let theirs =
            argon2::PasswordHasher::hash_password(&Argon2::default(), b"correct horse", &salt)
                .unwrap()
                .to_string();
        assert!(
            hasher
                .verify(&password("correct horse"), Some(&theirs))
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

    #[tokio::test]
    async fn a_malformed_stored_hash_is_an_error_not_a_match() {
        let hasher = PasswordHasher::new(&config(64), 1).await.unwrap();
        assert!(
            hasher
                .verify(&password("correct horse"), Some("$argon2id$garbage"))
                .await
                .is_err()
        );
    }
}
