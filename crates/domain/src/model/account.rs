//! Account value types. Each is parsed once at the edge ("parse, don't
//! validate"), so services and stores only ever hold valid values.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::FieldViolation;

/// Trimmed, lower-cased email address. Uniqueness is case-insensitive because
/// the stored form is already folded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Email(String);

impl Email {
    pub const MAX_LEN: usize = 254;

    pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        let value = raw.trim().to_lowercase();
        let bad = |why: &'static str| Err(FieldViolation::new(field, why));
        if value.is_empty() {
            return bad("is required");
        }
        if value.len() > Self::MAX_LEN {
            return bad("must be at most 254 characters");
        }
        let Some((local, domain)) = value.split_once('@') else {
            return bad("must be an email address like name@example.com");
        };
        let well_formed = !local.is_empty()
            && local.len() <= 64
            && !domain.contains('@')
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..")
            && value.chars().all(|c| !c.is_whitespace() && !c.is_control());
        if !well_formed {
            return bad("must be an email address like name@example.com");
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// 3 to 32 characters of `a-z 0-9 _ . -`, starting with a letter; stored
/// lower-case so `Alice` and `alice` are the same account. Never contains
/// `@`, which is how a login string tells a username from an email.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Username(String);

impl Username {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        let value = raw.trim().to_lowercase();
        let len = value.chars().count();
        if len == 0 {
            return Err(FieldViolation::new(field, "is required"));
        }
        if !(3..=32).contains(&len) {
            return Err(FieldViolation::new(field, "must be 3 to 32 characters"));
        }
        if !value.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(FieldViolation::new(field, "must start with a letter"));
        }
        if !value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
        {
            return Err(FieldViolation::new(
                field,
                "may only contain letters, digits, '_', '.' and '-'",
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How a login names its account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginName {
    Email(Email),
    Username(Username),
}

impl LoginName {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        if raw.trim().is_empty() {
            return Err(FieldViolation::new(field, "is required"));
        }
        // Bound the work before folding case: no real login is this long.
        if raw.len() > Email::MAX_LEN {
            return Err(FieldViolation::new(field, "must be an email or a username"));
        }
        if raw.contains('@') {
            Email::parse(field, raw).map(Self::Email)
        } else {
            Username::parse(field, raw)
                .map(Self::Username)
                .map_err(|_| FieldViolation::new(field, "must be an email or a username"))
        }
    }

    /// The folded form, used as the lockout counter key.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Email(e) => e.as_str(),
            Self::Username(u) => u.as_str(),
        }
    }
}

/// A plaintext password that passed the length policy. Redacted in `Debug`
/// and zeroed on drop.
pub struct Password(SecretString);

/// Bytes accepted before even counting characters: 4 bytes per character of
/// the largest allowed policy. Anything bigger is refused without hashing.
const PASSWORD_HARD_BYTE_LIMIT: usize = 4 * 1024;

impl Password {
    pub fn parse(
        field: &'static str,
        raw: &str,
        min: usize,
        max: usize,
    ) -> Result<Self, FieldViolation> {
        if raw.is_empty() {
            return Err(FieldViolation::new(field, "is required"));
        }
        let too_long = || FieldViolation::new(field, format!("must be at most {max} characters"));
        if raw.len() > PASSWORD_HARD_BYTE_LIMIT {
            return Err(too_long());
        }
        let chars = raw.chars().count();
        if chars < min {
            return Err(FieldViolation::new(
                field,
                format!("must be at least {min} characters"),
            ));
        }
        if chars > max {
            return Err(too_long());
        }
        Ok(Self(SecretString::from(raw.to_owned())))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A role name: 1 to 32 characters of `a-z 0-9 _ -`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Role(String);

impl Role {
    pub const ADMIN: &'static str = "admin";
    pub const USER: &'static str = "user";
    /// Internal services (GetPlatformAccessToken); granted by an admin.
    pub const SERVICE: &'static str = "service";

    pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        let value = raw.trim();
        let ok = (1..=32).contains(&value.len())
            && value.starts_with(|c: char| c.is_ascii_lowercase())
            && value
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'));
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(FieldViolation::new(
                field,
                "must be 1 to 32 characters of a-z, 0-9, '_' and '-', starting with a letter",
            ))
        }
    }

    pub fn user() -> Self {
        Self(Self::USER.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A sorted, de-duplicated role list.
pub fn normalise_roles(mut roles: Vec<Role>) -> Vec<Role> {
    roles.sort();
    roles.dedup();
    roles
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    Active,
    Suspended,
    Deleted,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Deleted => "deleted",
        }
    }

    pub fn from_db(value: &str) -> Option<Self> {
        match value {
            "active" => Some(Self::Active),
            "suspended" => Some(Self::Suspended),
            "deleted" => Some(Self::Deleted),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub email: Email,
    pub username: Username,
    pub roles: Vec<Role>,
    pub status: UserStatus,
    pub created_at: OffsetDateTime,
}

impl User {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r.as_str() == role)
    }

    /// Trusted reconstruction from a row the store wrote itself.
    pub fn from_stored(
        id: Uuid,
        email: String,
        username: String,
        roles: Vec<String>,
        status: &str,
        created_at: OffsetDateTime,
    ) -> Result<Self, String> {
        Ok(Self {
            id,
            email: Email(email),
            username: Username(username),
            roles: roles.into_iter().map(Role).collect(),
            status: UserStatus::from_db(status)
                .ok_or_else(|| format!("unknown user status {status:?}"))?,
            created_at,
        })
    }
}

/// A user with the stored password hash, as login needs it.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: User,
    pub password_hash: String,
    /// Bumped by every security change (password, status, roles, "revoke
    /// all sessions"); what a login read, so its session is created only if
    /// nothing changed since.
    pub security_version: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_is_trimmed_and_folded() {
        assert_eq!(
            Email::parse("email", "  Alice@Example.COM ")
                .unwrap()
                .as_str(),
            "alice@example.com"
        );
    }

    #[test]
    fn malformed_emails_are_refused() {
        for bad in [
            "",
            "alice",
            "@example.com",
            "alice@",
            "alice@example",
            "a b@example.com",
            "a@b@c.com",
            "alice@.com",
            "alice@example..com",
        ] {
            assert!(Email::parse("email", bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn username_rules() {
        assert_eq!(
            Username::parse("username", "Alice_01").unwrap().as_str(),
            "alice_01"
        );
        for bad in [
            "",
            "ab",
            "1abc",
            "_abc",
            "has space",
            "é-accent",
            "a@b",
            &"x".repeat(33),
        ] {
            assert!(
                Username::parse("username", bad).is_err(),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn login_name_tells_email_from_username() {
        assert!(matches!(
            LoginName::parse("login", "A@b.co").unwrap(),
            LoginName::Email(_)
        ));
        assert!(matches!(
            LoginName::parse("login", "alice").unwrap(),
            LoginName::Username(_)
        ));
        assert!(LoginName::parse("login", "").is_err());
    }

    #[test]
    fn password_policy_counts_characters_and_has_a_hard_bound() {
        assert!(Password::parse("password", "short", 8, 128).is_err());
        assert!(Password::parse("password", "ünïcödé!", 8, 128).is_ok());
        assert!(Password::parse("password", &"x".repeat(129), 8, 128).is_err());
        assert!(Password::parse("password", &"x".repeat(1 << 20), 8, 128).is_err());
    }

    #[test]
    fn password_debug_is_redacted() {
        let p = Password::parse("password", "correct horse", 8, 128).unwrap();
        assert!(!format!("{p:?}").contains("horse"));
    }

    #[test]
    fn roles_are_checked_and_normalised() {
        assert!(Role::parse("roles", "Admin").is_err());
        assert!(Role::parse("roles", "").is_err());
        let roles = normalise_roles(vec![
            Role::parse("r", "user").unwrap(),
            Role::parse("r", "admin").unwrap(),
            Role::user(),
        ]);
        assert_eq!(
            roles.iter().map(Role::as_str).collect::<Vec<_>>(),
            ["admin", "user"]
        );
    }
}
