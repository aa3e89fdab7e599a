//! The argon2id work itself: the worker threads' loop with their reused
//! buffers, and PHC strings (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) made
//! and verified in constant time.

use super::*;

/// Lowers the calling thread's CPU priority to `nice`. Without it, hashing
/// threads as many as the cores compete on equal terms with the threads
/// that answer everything else, so under a login flood a refusal or an
/// ext_authz Check waits behind argon2 for CPU (measured: BENCHMARKS.md,
/// "Login under a flood through the gateway"). On Linux, PRIO_PROCESS with a
/// thread id sets that thread alone. Best effort: a refusal is logged.
pub(super) fn yield_to_the_rest(nice: i32) {
    if nice <= 0 {
        return;
    }
    let tid = rustix::thread::gettid();
    if let Err(error) = rustix::process::setpriority_process(Some(tid), nice.min(19)) {
        tracing::warn!(%error, nice, "hashing thread: could not lower its priority");
    }
}

/// A worker that has hashed nothing for this long gives its argon2 memory
/// (19 MiB at the defaults) back; the next job allocates it again (a few
/// milliseconds, once). An idle service holds no hashing memory.
const RELEASE_MEMORY_AFTER: Duration = Duration::from_secs(10);

pub(super) fn worker(scheduler: &Scheduler, params: &Params, lane: Lane) {
    let mut memory: Vec<Block> = Vec::new();
    while let Some(job) = scheduler.next(lane, RELEASE_MEMORY_AFTER, &mut || {
        memory = Vec::new();
    }) {
        let started = Instant::now();
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
        if lane == Lane::All {
            scheduler.record_job(started.elapsed());
        }
    }
}

/// The smallest capacity a worker's buffer is allocated with, in 1 KiB
/// blocks: 33 MiB. glibc serves an allocation that large with its own
/// mapping and unmaps it when freed. A smaller one would, after the first
/// such free, come from the heap (glibc raises its mmap threshold to the size
/// of a freed mapping, up to 32 MiB) and stay resident after the worker
/// releases it. Only the pages argon2 touches (19 MiB at the defaults) count
/// in RSS.
const MIN_CAPACITY_BLOCKS: usize = 33 * 1024;

pub(super) fn memory_for<'m>(memory: &'m mut Vec<Block>, params: &Params) -> &'m mut [Block] {
    let blocks = params.block_count();
    if memory.len() < blocks {
        if memory.capacity() < blocks {
            *memory = Vec::with_capacity(blocks.max(MIN_CAPACITY_BLOCKS));
        }
        memory.resize(blocks, Block::default());
    }
    &mut memory[..blocks]
}

pub(super) fn failed(e: impl std::fmt::Display) -> HashError {
    HashError::Hash(e.to_string())
}

/// A PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) for `password`.
pub(super) fn hash_with(
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

pub(super) fn verify_with(
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
