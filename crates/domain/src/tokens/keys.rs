//! Ed25519 signing keys and the JWKS.
//!
//! A key directory holds one PKCS#8 PEM file per key; the file stem is the
//! `kid`. Every key in the directory verifies and is in the JWKS. Generated
//! kids are `k<UTC activation time>`: the newest key whose time has come
//! signs, so a key can be published before it signs. With several replicas
//! reading one Secret, each sees a new key at a slightly different moment;
//! `rotate-key --activate-in` gives them all time to load it (and the JWKS
//! consumers time to fetch it) before any replica signs with it. Rotation
//! removes keys retired long enough ago that no token they signed can still
//! be valid.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::{
    SigningKey,
    pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding},
};
use jsonwebtoken::{DecodingKey, EncodingKey};
use serde_json::json;
use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};

const KID_FORMAT: &[FormatItem<'static>] =
    format_description!("k[year][month][day]T[hour][minute][second]Z");

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key directory {0} holds no signing key (*.pem) and generating one is disabled")]
    Missing(PathBuf),
    #[error("cannot read key {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("cannot write key into {path}: {reason}")]
    Unwritable { path: PathBuf, reason: String },
}

/// All keys of one directory, ready to sign and verify; or no key at all
/// ([`KeyRing::empty`]), for a process that must hold none.
pub struct KeyRing {
    /// The earliest activation time still in the future, if any: the ring
    /// must be loaded again then for that key to sign.
    next_activation: Option<OffsetDateTime>,
    signing_kid: String,
    signing: Option<EncodingKey>,
    verifying: HashMap<String, DecodingKey>,
    jwks: String,
}

impl KeyRing {
    /// Loads every `*.pem` of `dir`; generates a first key when there is none
    /// and `generate` is set.
    pub fn load(dir: &Path, generate: bool) -> Result<Self, KeyError> {
        Self::load_at(dir, generate, OffsetDateTime::now_utc())
    }

    /// [`KeyRing::load`] as of `now`: the newest key activated by `now`
    /// signs (a kid without a time counts as active; with none active, the
    /// oldest key signs).
    pub fn load_at(dir: &Path, generate: bool, now: OffsetDateTime) -> Result<Self, KeyError> {
        let mut keys = read_keys(dir)?;
        if keys.is_empty() {
            if !generate {
                return Err(KeyError::Missing(dir.to_path_buf()));
            }
            write_new_key(dir, OffsetDateTime::now_utc())?;
            keys = read_keys(dir)?;
        }
        let active = |kid: &str| kid_time(kid).is_none_or(|t| t <= now);
        let (signing_kid, signing_key) = keys
            .iter()
            .rev()
            .find(|(kid, _)| active(kid))
            .or_else(|| keys.first())
            .cloned()
            .ok_or_else(|| KeyError::Missing(dir.to_path_buf()))?;
        let next_activation = keys
            .iter()
            .filter_map(|(kid, _)| kid_time(kid))
            .filter(|t| *t > now)
            .min();
        let der = signing_key
            .to_pkcs8_der()
            .map_err(|e| KeyError::Unreadable {
                path: dir.join(&signing_kid),
                reason: e.to_string(),
            })?;
        let mut verifying = HashMap::new();
        let mut jwks = Vec::new();
        for (kid, key) in &keys {
            let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
            let decoding =
                DecodingKey::from_ed_components(&x).map_err(|e| KeyError::Unreadable {
                    path: dir.join(kid),
                    reason: e.to_string(),
                })?;
            verifying.insert(kid.clone(), decoding);
            jwks.push(json!({ "kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig" }));
        }
        Ok(Self {
            next_activation,
            signing_kid,
            signing: Some(EncodingKey::from_ed_der(der.as_bytes())),
            verifying,
            jwks: json!({ "keys": jwks }).to_string(),
        })
    }

    /// A ring that signs and verifies nothing and publishes no key: for
    /// the event worker, which parses broker data and is given no key
    /// material (its account service only revokes).
    pub fn empty() -> Self {
        Self {
            next_activation: None,
            signing_kid: String::new(),
            signing: None,
            verifying: HashMap::new(),
            jwks: json!({ "keys": [] }).to_string(),
        }
    }

    pub fn signing_kid(&self) -> &str {
        &self.signing_kid
    }

    /// When a published key not yet signing becomes the signing key.
    pub fn next_activation(&self) -> Option<OffsetDateTime> {
        self.next_activation
    }

    /// `None` for an [`empty`](KeyRing::empty) ring.
    pub fn signing_key(&self) -> Option<&EncodingKey> {
        self.signing.as_ref()
    }

    pub fn verifying_key(&self, kid: &str) -> Option<&DecodingKey> {
        self.verifying.get(kid)
    }

    /// The JWKS document (public keys only).
    pub fn jwks_json(&self) -> &str {
        &self.jwks
    }
}

/// `(kid, key)` sorted by kid.
fn read_keys(dir: &Path) -> Result<Vec<(String, SigningKey)>, KeyError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(KeyError::Unreadable {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            });
        }
    };
    let mut keys = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| KeyError::Unreadable {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            })?
            .path();
        if path.extension().and_then(|e| e.to_str()) != Some("pem") {
            continue;
        }
        let kid = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let pem = fs::read_to_string(&path).map_err(|e| KeyError::Unreadable {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // The parse error says nothing about the key material.
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|_| KeyError::Unreadable {
            path: path.clone(),
            reason: "not an Ed25519 PKCS#8 private key".into(),
        })?;
        keys.push((kid, key));
    }
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keys)
}

/// Writes a fresh key (mode 0600) that signs from `activation` on, and
/// returns its kid.
pub fn write_new_key(dir: &Path, activation: OffsetDateTime) -> Result<String, KeyError> {
    let fail = |reason: String| KeyError::Unwritable {
        path: dir.to_path_buf(),
        reason,
    };
    fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| fail(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| fail(e.to_string()))?;
    let mut kid = activation
        .format(KID_FORMAT)
        .map_err(|e| fail(e.to_string()))?;
    // Two rotations within one second still get distinct, ordered kids.
    while dir.join(format!("{kid}.pem")).exists() {
        kid.push('a');
    }
    let path = dir.join(format!("{kid}.pem"));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(|e| fail(e.to_string()))?;
    std::io::Write::write_all(&mut file, pem.as_bytes()).map_err(|e| fail(e.to_string()))?;
    Ok(kid)
}

/// Adds a new signing key, active `activate_in` from `now`, and deletes keys
/// superseded more than `retire_after` ago (the access-token lifetime plus
/// leeway: nothing they signed is valid). Returns the new kid and the
/// removed ones.
pub fn rotate(
    dir: &Path,
    now: OffsetDateTime,
    activate_in: time::Duration,
    retire_after: time::Duration,
) -> Result<(String, Vec<String>), KeyError> {
    let new_kid = write_new_key(dir, now + activate_in)?;
    let kids: Vec<String> = read_keys(dir)?.into_iter().map(|(kid, _)| kid).collect();
    let mut removed = Vec::new();
    // A key was superseded when the next one (by kid) was created.
    for pair in kids.windows(2) {
        let Some(superseded_at) = kid_time(&pair[1]) else {
            continue;
        };
        if superseded_at + retire_after < now {
            let path = dir.join(format!("{}.pem", pair[0]));
            fs::remove_file(&path).map_err(|e| KeyError::Unwritable {
                path,
                reason: e.to_string(),
            })?;
            removed.push(pair[0].clone());
        }
    }
    Ok((new_kid, removed))
}

fn kid_time(kid: &str) -> Option<OffsetDateTime> {
    let base = kid.trim_end_matches('a');
    time::PrimitiveDateTime::parse(base, KID_FORMAT)
        .ok()
        .map(|t| t.assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_dir_gets_one_key_when_allowed_and_an_error_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            KeyRing::load(dir.path(), false),
            Err(KeyError::Missing(_))
        ));
        let ring = KeyRing::load(dir.path(), true).unwrap();
        assert!(ring.signing_kid().starts_with('k'));
        let again = KeyRing::load(dir.path(), true).unwrap();
        assert_eq!(
            ring.signing_kid(),
            again.signing_kid(),
            "the key must survive a reload"
        );
    }

    #[test]
    fn the_jwks_holds_public_keys_only() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::load(dir.path(), true).unwrap();
        let jwks: serde_json::Value = serde_json::from_str(ring.jwks_json()).unwrap();
        let key = &jwks["keys"][0];
        assert_eq!(key["kty"], "OKP");
        assert_eq!(key["kid"], ring.signing_kid());
        assert!(key.get("d").is_none(), "private part leaked: {key}");
    }

    #[test]
    fn rotation_signs_with_the_new_key_and_retires_only_old_enough_keys() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = OffsetDateTime::now_utc() - time::Duration::hours(2);
        let first = write_new_key(dir.path(), t0).unwrap();
        let (second, removed) = rotate(
            dir.path(),
            t0 + time::Duration::minutes(1),
            time::Duration::ZERO,
            time::Duration::minutes(16),
        )
        .unwrap();
        assert!(removed.is_empty(), "the first key was superseded just now");
        let ring = KeyRing::load(dir.path(), false).unwrap();
        assert_eq!(ring.signing_kid(), second);
        assert!(ring.verifying_key(&first).is_some());
        let (third, removed) = rotate(
            dir.path(),
            t0 + time::Duration::hours(1),
            time::Duration::ZERO,
            time::Duration::minutes(16),
        )
        .unwrap();
        assert_eq!(removed, vec![first]);
        let ring = KeyRing::load(dir.path(), false).unwrap();
        assert_eq!(ring.signing_kid(), third);
        assert!(
            ring.verifying_key(&second).is_some(),
            "second was superseded only now"
        );
    }

    #[test]
    fn a_key_published_ahead_verifies_at_once_and_signs_from_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let old = write_new_key(dir.path(), now - time::Duration::hours(1)).unwrap();
        let (new, _) = rotate(
            dir.path(),
            now,
            time::Duration::minutes(5),
            time::Duration::minutes(16),
        )
        .unwrap();
        let ring = KeyRing::load_at(dir.path(), false, now).unwrap();
        assert_eq!(ring.signing_kid(), old, "the new key is not active yet");
        assert!(ring.verifying_key(&new).is_some(), "but it verifies");
        assert!(ring.jwks_json().contains(&new), "and is published");
        let due = ring.next_activation().unwrap();
        assert_eq!(kid_time(&new), Some(due));
        let later = KeyRing::load_at(dir.path(), false, due).unwrap();
        assert_eq!(later.signing_kid(), new);
        assert_eq!(later.next_activation(), None);
    }
}
