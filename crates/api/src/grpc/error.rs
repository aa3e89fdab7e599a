//! The one place where domain errors become gRPC statuses. Internal causes
//! are logged here and never sent to the caller.

use tonic::{Code, Status, metadata::MetadataValue};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    accounts::AccountError,
    error::{BackendError, FieldViolation},
    platforms::PlatformError,
    tokens::TokenError,
};

pub fn invalid_argument(violations: &[FieldViolation]) -> Status {
    let mut details = ErrorDetails::new();
    for v in violations {
        details.add_bad_request_violation(v.field.as_ref(), v.description.as_ref());
    }
    let fields: Vec<&str> = violations.iter().map(|v| v.field.as_ref()).collect();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {}", fields.join(", ")),
        details,
    )
}

/// `code` with `retry-after` (whole seconds, at least 1) in the metadata.
pub fn with_retry_after(code: Code, message: &str, retry_after: std::time::Duration) -> Status {
    let secs = retry_after.as_secs().max(1);
    let mut status = Status::new(code, format!("{message}; retry after {secs} seconds"));
    status
        .metadata_mut()
        .insert("retry-after", MetadataValue::from(secs));
    status
}

pub fn unauthenticated(message: &'static str) -> Status {
    Status::unauthenticated(message)
}

/// A domain error as the status a gRPC caller sees. The domain knows no
/// transport, so the one mapping lives here; a handler turns a domain
/// result into its answer with [`OrStatus::or_status`].
pub trait IntoStatus {
    fn into_status(self) -> Status;
}

/// `result.or_status()?` in a handler: the domain error mapped by
/// [`IntoStatus`].
pub trait OrStatus<T> {
    fn or_status(self) -> Result<T, Status>;
}

impl<T, E: IntoStatus> OrStatus<T> for Result<T, E> {
    fn or_status(self) -> Result<T, Status> {
        self.map_err(IntoStatus::into_status)
    }
}

impl IntoStatus for BackendError {
    fn into_status(self) -> Status {
        let error = self;
        match &error {
            BackendError::Unavailable { backend, source } => {
                tracing::warn!(backend, error = %source, "backend unavailable");
                Status::unavailable(format!("{backend} is temporarily unavailable; retry later"))
            }
            BackendError::Failed { backend, source } => {
                tracing::error!(backend, error = %source, "backend operation failed");
                Status::internal("internal error")
            }
        }
    }
}

impl IntoStatus for TokenError {
    fn into_status(self) -> Status {
        let error = self;
        match error {
            TokenError::InvalidAccess(reason) => {
                tracing::debug!(reason = reason.as_str(), "access token refused");
                metrics::counter!("token_rejections_total", "reason" => reason.as_str())
                    .increment(1);
                unauthenticated("invalid or expired access token")
            }
            TokenError::InvalidRefresh => unauthenticated("invalid or expired refresh token"),
            TokenError::Superseded => Status::aborted(
                "the account changed (password, status or roles) while this request was in flight; nothing was created",
            ),
            TokenError::Signing(cause) => {
                tracing::error!(%cause, "token signing failed");
                Status::internal("internal error")
            }
            TokenError::Backend(e) => e.into_status(),
        }
    }
}

impl IntoStatus for AccountError {
    fn into_status(self) -> Status {
        let error = self;
        match error {
            AccountError::Invalid(violations) => invalid_argument(&violations),
            AccountError::AlreadyExists(field) => {
                let mut details = ErrorDetails::new();
                details.add_bad_request_violation(field, "is already taken");
                Status::with_error_details(
                    Code::AlreadyExists,
                    format!("an account with this {field} already exists"),
                    details,
                )
            }
            AccountError::InvalidCredentials => unauthenticated("invalid login or password"),
            AccountError::LockedOut { retry_after } => with_retry_after(
                Code::ResourceExhausted,
                "too many failed logins",
                retry_after,
            ),
            AccountError::Overloaded { retry_after } => {
                with_retry_after(Code::Unavailable, "the service is at capacity", retry_after)
            }
            AccountError::Disabled => Status::permission_denied("account is not active"),
            AccountError::NotFound => Status::not_found("user not found"),
            AccountError::Forbidden => Status::permission_denied("admin role required"),
            AccountError::Token(e) => e.into_status(),
            AccountError::Backend(e) => e.into_status(),
            AccountError::Hash(cause) => {
                tracing::error!(%cause, "password hashing failed");
                Status::internal("internal error")
            }
        }
    }
}

impl IntoStatus for PlatformError {
    fn into_status(self) -> Status {
        let error = self;
        match error {
            PlatformError::Disabled(platform) => Status::failed_precondition(format!(
                "platform {platform} is not configured on this service"
            )),
            PlatformError::Invalid(violations) => invalid_argument(&violations),
            PlatformError::NotLinked(platform) => {
                Status::not_found(format!("no {platform} account is linked"))
            }
            PlatformError::LinkedElsewhere(platform) => Status::already_exists(format!(
                "this {platform} account is already linked to another user"
            )),
            PlatformError::Refused { platform, reason } => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "PLATFORM_REFUSED",
                    "auth.immersiverse",
                    [
                        ("platform".to_owned(), platform.to_string()),
                        ("error".to_owned(), reason.clone()),
                    ],
                );
                Status::with_error_details(
                    Code::FailedPrecondition,
                    format!("{platform} refused the authorization: {reason}"),
                    details,
                )
            }
            PlatformError::ReauthRequired { platform, status } => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "PLATFORM_REAUTH_REQUIRED",
                    "auth.immersiverse",
                    [
                        ("platform".to_owned(), platform.to_string()),
                        ("status".to_owned(), status.to_owned()),
                    ],
                );
                Status::with_error_details(
                    Code::FailedPrecondition,
                    format!("the {platform} account must be linked again ({status})"),
                    details,
                )
            }
            PlatformError::Unavailable {
                platform,
                retry_after,
            } => with_retry_after(
                Code::Unavailable,
                &format!("{platform} is not answering"),
                retry_after,
            ),
            PlatformError::UserInactive => {
                Status::failed_precondition("the user is suspended or deleted")
            }
            PlatformError::Forbidden(message) => Status::permission_denied(message),
            PlatformError::Sealed(cause) => {
                tracing::error!(%cause, "platform tokens do not open");
                Status::internal("internal error")
            }
            PlatformError::Token(e) => e.into_status(),
            PlatformError::Backend(e) => e.into_status(),
        }
    }
}
