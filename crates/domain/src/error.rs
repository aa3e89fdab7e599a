//! Error pieces shared by every context: field violations for bad input and
//! the failure of a backend (database, Redis). Each context has its own enum
//! built from these; `auth_api::grpc::error` maps them all to `tonic::Status` in one
//! place.

use std::borrow::Cow;

/// One bad request field, reported back as a google.rpc.BadRequest
/// field violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: Cow<'static, str>,
    pub description: Cow<'static, str>,
}

impl FieldViolation {
    pub fn new(
        field: impl Into<Cow<'static, str>>,
        description: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Collects violations across fields so one response names every bad field.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Keeps the value or records why it was refused.
    pub fn check<T>(&mut self, result: Result<T, FieldViolation>) -> Option<T> {
        result.map_err(|v| self.0.push(v)).ok()
    }

    pub fn push(&mut self, violation: FieldViolation) {
        self.0.push(violation);
    }

    /// `Ok(())` when nothing was refused.
    pub fn finish(self) -> Result<(), Vec<FieldViolation>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A backend could not do its part. The message names the backend only; the
/// source is for logs, never for callers.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Not reachable or timed out: worth retrying (gRPC Unavailable).
    #[error("{backend} is unavailable")]
    Unavailable {
        backend: &'static str,
        source: BoxError,
    },
    /// Answered, but the operation failed (gRPC Internal).
    #[error("{backend} operation failed")]
    Failed {
        backend: &'static str,
        source: BoxError,
    },
}

impl BackendError {
    pub fn unavailable(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            backend,
            source: source.into(),
        }
    }

    pub fn failed(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Failed {
            backend,
            source: source.into(),
        }
    }
}

/// A configuration value that cannot be used, named by its own key. A
/// component's section validates itself with keys relative to the section;
/// whoever assembles the sections places them with [`ConfigError::within`],
/// so the key a user reads is the one to change:
/// `password.memory_kib (AUTH_PASSWORD__MEMORY_KIB): …`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} ({env}): {why}", env = self.env_var())]
pub struct ConfigError {
    key: String,
    why: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            why: why.into(),
        }
    }

    /// The same error, its key placed under `section`.
    pub fn within(self, section: &str) -> Self {
        Self {
            key: format!("{section}.{}", self.key),
            why: self.why,
        }
    }

    /// The dotted key, e.g. `tokens.access_ttl_secs`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The environment variable that sets the key: `AUTH_` and the key,
    /// upper-cased, sections joined by `__`, a list index dropped. A key
    /// under a map entry a user named (`rpc.session_limits.<method>`) is
    /// shown the same way, though the environment can set it only when
    /// the entry's name is lower-case (variables are read lower-cased).
    pub fn env_var(&self) -> String {
        let path = self.key.split('[').next().unwrap_or_default();
        format!("AUTH_{}", path.replace('.', "__").to_ascii_uppercase())
    }
}

/// `Err(ConfigError)` for `key` unless `ok`.
pub fn require(ok: bool, key: &str, why: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(key, why))
    }
}
