//! A streaming platform, and a user's linked account on it as users and
//! services see it.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// A streaming platform an account can be linked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Twitch,
    Youtube,
    Facebook,
    Soop,
}

impl Platform {
    pub const ALL: [Platform; 4] = [
        Platform::Twitch,
        Platform::Youtube,
        Platform::Facebook,
        Platform::Soop,
    ];

    /// The name used in configuration keys, events and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Twitch => "twitch",
            Self::Youtube => "youtube",
            Self::Facebook => "facebook",
            Self::Soop => "soop",
        }
    }

    /// Whether revoking one grant at the platform ends every grant the user
    /// gave this app: Google's revocation ends the user's whole
    /// authorization of the client (developers.google.com/identity/
    /// protocols/oauth2/web-server#tokenrevoke), Facebook's
    /// `DELETE /{user-id}/permissions` removes the app's login for the user
    /// (developers.facebook.com/docs/facebook-login/guides/permissions/
    /// request-revoke). Twitch and SOOP revoke the token presented.
    pub fn revocation_ends_every_grant(self) -> bool {
        matches!(self, Self::Youtube | Self::Facebook)
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the stored tokens can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountStatus {
    Active,
    /// The platform refused the refresh (revoked there, password changed,
    /// long-lived token expired): the user must link again.
    ReauthRequired,
    /// The user removed this application at the platform (webhook).
    Revoked,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::ReauthRequired => "reauth_required",
            Self::Revoked => "revoked",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "active" => Some(Self::Active),
            "reauth_required" => Some(Self::ReauthRequired),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

/// A linked account as users and services see it: never its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct PlatformAccount {
    pub user_id: Uuid,
    pub platform: Platform,
    pub platform_user_id: String,
    pub login: String,
    pub display_name: String,
    pub scopes: Vec<String>,
    pub status: AccountStatus,
    pub connected_at: OffsetDateTime,
    /// When the current access token expires (`None`: the platform did not
    /// say).
    pub token_expires_at: Option<OffsetDateTime>,
}

/// What the platform says about the user behind a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub platform_user_id: String,
    pub login: String,
    pub display_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_and_status_names_round_trip() {
        for p in Platform::ALL {
            assert_eq!(Platform::parse(p.as_str()), Some(p));
        }
        assert_eq!(Platform::parse("Twitch"), None);
        for s in [
            AccountStatus::Active,
            AccountStatus::ReauthRequired,
            AccountStatus::Revoked,
        ] {
            assert_eq!(AccountStatus::parse(s.as_str()), Some(s));
        }
    }
}
