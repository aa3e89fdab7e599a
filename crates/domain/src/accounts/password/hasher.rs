//! The pool's handle: starts the workers, submits jobs, and closes the
//! queue when the last handle goes.

use super::{
    phc::{worker, yield_to_the_rest},
    *,
};

#[derive(Clone)]
pub struct PasswordHasher {
    scheduler: Arc<Scheduler>,
    dummy_hash: Arc<str>,
    /// Shuts the workers down when the last handle goes.
    _closer: Arc<Closer>,
}

/// Closes the queue (waking every worker to exit) when dropped.
struct Closer(Arc<Scheduler>);

impl Drop for Closer {
    fn drop(&mut self) {
        if let Ok(mut state) = self.0.state.lock() {
            state.closed = true;
            for queued in state.waiting.drain(..) {
                queued.job.refuse(HashError::PoolClosed);
            }
        }
        self.0.ready.notify_all();
    }
}

impl PasswordHasher {
    /// Starts `workers` threads and computes the dummy hash (one hash at
    /// start-up). The threads end when the last handle is dropped.
    pub async fn new(config: &PasswordConfig, workers: usize) -> Result<Self, HashError> {
        Self::with_admission(config, workers, AdmissionConfig::unbounded()).await
    }

    /// As [`new`](Self::new), with the queue bounded by `admission`.
    pub async fn with_admission(
        config: &PasswordConfig,
        workers: usize,
        admission: AdmissionConfig,
    ) -> Result<Self, HashError> {
        let params = Params::new(
            config.memory_kib,
            config.iterations,
            config.parallelism,
            None,
        )
        .map_err(HashError::Params)?;
        let workers = workers.max(1);
        let scheduler = Arc::new(Scheduler {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            config: admission,
            workers,
        });
        let device_lane = scheduler.config.device_lane;
        let lanes = (0..workers)
            .map(|i| (format!("argon2-{i}"), Lane::All, config.worker_nice))
            .chain(device_lane.then(|| ("argon2-lane".to_owned(), Lane::Priority, 0)));
        for (name, lane, nice) in lanes {
            let scheduler = scheduler.clone();
            let params = params.clone();
            thread::Builder::new()
                .name(name)
                .spawn(move || {
                    yield_to_the_rest(nice);
                    worker(&scheduler, &params, lane)
                })
                .map_err(|e| HashError::Hash(e.to_string()))?;
        }
        let mut hasher = Self {
            _closer: Arc::new(Closer(scheduler.clone())),
            scheduler,
            dummy_hash: Arc::from(""),
        };
        let dummy = Password::parse(
            "password",
            "dummy password that matches no account",
            1,
            1024,
        )
        .map_err(|_| HashError::Hash("dummy password".into()))?;
        hasher.dummy_hash = Arc::from(hasher.hash(&dummy, &Admission::default()).await?);
        Ok(hasher)
    }

    /// Whether a job for `admission` would be queued right now; a caller
    /// refuses at once, before reading the database, when it would not.
    pub fn admissible(&self, admission: &Admission) -> bool {
        self.scheduler.admissible(admission)
    }

    /// What a refused caller is told to wait.
    pub fn retry_after(&self) -> Duration {
        self.scheduler.retry_after()
    }

    async fn submit<T>(
        &self,
        admission: &Admission,
        job: impl FnOnce(oneshot::Sender<Result<T, HashError>>) -> Job,
    ) -> Result<T, HashError> {
        let (reply, answer) = oneshot::channel();
        // Never blocks: a job that cannot be queued is refused here.
        self.scheduler.submit(job(reply), admission)?;
        answer.await.map_err(|_| HashError::PoolClosed)?
    }

    pub async fn hash(
        &self,
        password: &Password,
        admission: &Admission,
    ) -> Result<String, HashError> {
        let password = SecretString::from(password.expose().to_owned());
        self.submit(admission, |reply| Job::Hash { password, reply })
            .instrument(crate::child_span!("password.hash"))
            .await
    }

    /// Verifies against `stored`, or against the dummy hash when there is no
    /// account (the result is then never a match).
    pub async fn verify(
        &self,
        password: &Password,
        stored: Option<&str>,
        admission: &Admission,
    ) -> Result<Verification, HashError> {
        let password = SecretString::from(password.expose().to_owned());
        let known = stored.is_some();
        let hash: Arc<str> = stored
            .map(Arc::from)
            .unwrap_or_else(|| self.dummy_hash.clone());
        let verification = self
            .submit(admission, |reply| Job::Verify {
                password,
                hash,
                reply,
            })
            .instrument(crate::child_span!("password.verify"))
            .await?;
        Ok(Verification {
            matches: verification.matches && known,
            ..verification
        })
    }
}
