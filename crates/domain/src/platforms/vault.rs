//! The token vault: platform tokens are sealed with XChaCha20-Poly1305 under
//! a key ring read from files. Each ciphertext records its key id; the
//! newest key whose activation time has come (or the configured one) seals,
//! every key in the ring opens, and `auth-service reseal-platform-tokens`
//! moves old rows to the current key. A key added ahead of its activation
//! time (`rotate-platform-key --activate-in`) reaches every replica before
//! any seals with it, so no replica meets a token it cannot open.
//!
//! The associated data binds a ciphertext to its row and role (user,
//! platform, access or refresh), so a sealed token copied to another row or
//! swapped with its sibling fails to open.
//!
//! Key files: `<dir>/<key id>.key`, 32 random bytes in base64, mode 0600.
//! The embedded default generates the first one into the data dir.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};
use secrecy::SecretString;

const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("platform token keys in {dir}: {reason}")]
    Keys { dir: PathBuf, reason: String },
    #[error("no platform token key with id {0:?}")]
    UnknownKey(String),
    /// Wrong key, altered bytes, or a ciphertext moved from another row.
    #[error("a sealed platform token does not open")]
    Tampered,
}

/// A sealed value and the id of the key that sealed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    /// nonce ‖ ciphertext ‖ tag.
    pub bytes: Vec<u8>,
}

pub struct Vault {
    keys: BTreeMap<String, XChaCha20Poly1305>,
    current: String,
    next_activation: Option<time::OffsetDateTime>,
}

/// The activation time of a generated id `k<unix seconds>[-n]`.
fn key_time(id: &str) -> Option<time::OffsetDateTime> {
    let secs = id
        .strip_prefix('k')?
        .split('-')
        .next()?
        .parse::<i64>()
        .ok()?;
    time::OffsetDateTime::from_unix_timestamp(secs).ok()
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .finish()
    }
}

impl Vault {
    /// Reads every `*.key` in `dir`. `current` names the sealing key
    /// (default: the greatest id whose activation time has come — generated
    /// ids sort by it; an id without a time counts as active). With
    /// `generate_if_missing`, an empty or missing `dir` gets a first key.
    pub fn load(
        dir: &Path,
        current: Option<&str>,
        generate_if_missing: bool,
    ) -> Result<Self, VaultError> {
        let fail = |reason: String| VaultError::Keys {
            dir: dir.to_path_buf(),
            reason,
        };
        let mut keys = read_keys(dir).map_err(fail)?;
        if keys.is_empty() && generate_if_missing {
            generate_key(dir, time::OffsetDateTime::now_utc())?;
            keys = read_keys(dir).map_err(fail)?;
        }
        let now = time::OffsetDateTime::now_utc();
        let current = match current {
            Some(id) => id.to_owned(),
            None => keys
                .keys()
                .rev()
                .find(|id| key_time(id).is_none_or(|t| t <= now))
                .or_else(|| keys.keys().next())
                .cloned()
                .ok_or_else(|| fail("no *.key file".into()))?,
        };
        if !keys.contains_key(&current) {
            return Err(VaultError::UnknownKey(current));
        }
        let next_activation = keys
            .keys()
            .filter_map(|id| key_time(id))
            .filter(|t| *t > now)
            .min();
        Ok(Self {
            keys,
            current,
            next_activation,
        })
    }

    /// A ring of one given key (tests and benchmarks).
    pub fn from_key(key_id: &str, key: &[u8; 32]) -> Self {
        let mut keys = BTreeMap::new();
        keys.insert(key_id.to_owned(), XChaCha20Poly1305::new(key.into()));
        Self {
            keys,
            current: key_id.to_owned(),
            next_activation: None,
        }
    }

    pub fn current_key_id(&self) -> &str {
        &self.current
    }

    /// When a key published ahead of its time takes over sealing.
    pub fn next_activation(&self) -> Option<time::OffsetDateTime> {
        self.next_activation
    }

    pub fn seal(&self, plaintext: &str, aad: &[u8]) -> Sealed {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random source works");
        let cipher = &self.keys[&self.current];
        let ciphertext = cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad,
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any length that fits in memory");
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&ciphertext);
        Sealed {
            key_id: self.current.clone(),
            bytes,
        }
    }

    pub fn open(&self, key_id: &str, bytes: &[u8], aad: &[u8]) -> Result<SecretString, VaultError> {
        let cipher = self
            .keys
            .get(key_id)
            .ok_or_else(|| VaultError::UnknownKey(key_id.to_owned()))?;
        if bytes.len() < NONCE_LEN {
            return Err(VaultError::Tampered);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| VaultError::Tampered)?;
        let plaintext = cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| VaultError::Tampered)?;
        String::from_utf8(plaintext)
            .map(SecretString::from)
            .map_err(|_| VaultError::Tampered)
    }
}

fn read_keys(dir: &Path) -> Result<BTreeMap<String, XChaCha20Poly1305>, String> {
    let mut keys = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(keys),
        Err(e) => return Err(e.to_string()),
    };
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let (Some(id), Some("key")) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{id}.key: {e}"))?;
        let key: [u8; 32] = STANDARD
            .decode(text.trim())
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| format!("{id}.key is not 32 bytes in base64"))?;
        keys.insert(id.to_owned(), XChaCha20Poly1305::new((&key).into()));
    }
    Ok(keys)
}

/// Writes a new random key into `dir` and returns its id (`k<unix time of
/// activation>`, with a suffix if that id exists). Servers load it at their
/// next key-directory poll; it seals from `activation` on.
pub fn generate_key(dir: &Path, activation: time::OffsetDateTime) -> Result<String, VaultError> {
    let fail = |reason: String| VaultError::Keys {
        dir: dir.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| fail(e.to_string()))?;
    let base = format!("k{:012}", activation.unix_timestamp().max(0));
    let mut id = base.clone();
    let mut n = 1;
    while dir.join(format!("{id}.key")).exists() {
        id = format!("{base}-{n}");
        n += 1;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(dir.join(format!("{id}.key")))
        .map_err(|e| fail(e.to_string()))?;
    std::io::Write::write_all(&mut file, STANDARD.encode(key).as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn a_sealed_token_opens_only_with_its_key_and_its_row() {
        let vault = Vault::from_key("a", &[7; 32]);
        let sealed = vault.seal("platform-token", b"user-1:twitch:access");
        assert!(!sealed.bytes.windows(5).any(|w| w == b"token"));
        let opened = vault
            .open("a", &sealed.bytes, b"user-1:twitch:access")
            .unwrap();
        assert_eq!(opened.expose_secret(), "platform-token");
        assert!(matches!(
            vault.open("a", &sealed.bytes, b"user-2:twitch:access"),
            Err(VaultError::Tampered)
        ));
        assert!(matches!(
            vault.open("a", &sealed.bytes, b"user-1:twitch:refresh"),
            Err(VaultError::Tampered)
        ));
        let mut altered = sealed.bytes.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(vault.open("a", &altered, b"user-1:twitch:access").is_err());
        assert!(matches!(
            vault.open("b", &sealed.bytes, b"user-1:twitch:access"),
            Err(VaultError::UnknownKey(_))
        ));
    }

    #[test]
    fn the_newest_key_seals_and_old_keys_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let first = Vault::load(dir.path(), None, true).unwrap();
        let old = first.seal("t", b"row");
        let newer = format!("{}-9", first.current_key_id());
        std::fs::write(
            dir.path().join(format!("{newer}.key")),
            STANDARD.encode([1u8; 32]),
        )
        .unwrap();
        let ring = Vault::load(dir.path(), None, false).unwrap();
        assert_eq!(ring.current_key_id(), newer);
        assert_eq!(ring.seal("t", b"row").key_id, newer);
        assert_eq!(
            ring.open(&old.key_id, &old.bytes, b"row")
                .unwrap()
                .expose_secret(),
            "t"
        );
        let pinned = Vault::load(dir.path(), Some(&old.key_id), false).unwrap();
        assert_eq!(pinned.current_key_id(), old.key_id);
        assert!(matches!(
            Vault::load(dir.path(), Some("missing"), false),
            Err(VaultError::UnknownKey(_))
        ));
        std::fs::write(dir.path().join("bad.key"), "short").unwrap();
        assert!(Vault::load(dir.path(), None, false).is_err());
    }

    #[test]
    fn a_key_added_ahead_of_its_time_opens_at_once_and_seals_later() {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let old = generate_key(dir.path(), now - time::Duration::hours(1)).unwrap();
        let new = generate_key(dir.path(), now + time::Duration::hours(1)).unwrap();
        let ring = Vault::load(dir.path(), None, false).unwrap();
        assert_eq!(ring.current_key_id(), old, "the new key is not active yet");
        assert_eq!(ring.next_activation(), key_time(&new));
        let mut early = Vault::load(dir.path(), Some(&new), false).unwrap();
        let sealed = early.seal("t", b"row");
        early.current = old.clone();
        assert_eq!(
            ring.open(&new, &sealed.bytes, b"row")
                .unwrap()
                .expose_secret(),
            "t",
            "every replica opens what the new key sealed"
        );
    }
}
