//! Error pieces shared by every context: field violations for bad input and
//! the failure of a backend (database, Redis). Each context has its own enum
//! built from these; `grpc::error` maps them all to `tonic::Status` in one
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
