//! Key directories that change under a running server: a Kubernetes Secret
//! updated in place (its files swapped atomically by the kubelet), or
//! `rotate-key` on a host. There is no SIGHUP in Kubernetes, so the server
//! polls: it re-reads a directory when the names or contents of its key
//! files change, or when a key published ahead of its activation time is
//! due to take over.

use std::{
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    time::Duration,
};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// A digest of the names and contents of the `*.<extension>` files of `dir`
/// (`None` when the directory cannot be read). Key files are small; reading
/// them is cheaper than trusting timestamps that a Secret's symlink swap
/// may or may not change.
pub fn fingerprint(dir: &Path, extension: &str) -> Option<u64> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(extension))
        .filter_map(|p| std::fs::read(&p).ok().map(|bytes| (p, bytes)))
        .collect();
    files.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut hasher);
    Some(hasher.finish())
}

/// Polls `dir` every `period` until `stop`, calling `reload` when its key
/// files change or when the activation time `reload` last returned has
/// come. `what` names the key set in logs and in the `key_reloads_total`
/// metric. A failed reload keeps the keys in use.
pub async fn watch_key_dir(
    what: &'static str,
    dir: PathBuf,
    extension: &'static str,
    period: Duration,
    mut next_activation: Option<OffsetDateTime>,
    reload: impl Fn() -> anyhow::Result<Option<OffsetDateTime>> + Send,
    stop: CancellationToken,
) {
    let mut seen = fingerprint(&dir, extension);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        let now = fingerprint(&dir, extension);
        let due = next_activation.is_some_and(|at| at <= OffsetDateTime::now_utc());
        if now == seen && !due {
            continue;
        }
        seen = now;
        match reload() {
            Ok(next) => {
                next_activation = next;
                metrics::counter!("key_reloads_total", "keys" => what, "outcome" => "reloaded")
                    .increment(1);
                tracing::info!(keys = what, "key directory reloaded");
            }
            Err(error) => {
                // Try again at the next change, not at every poll.
                next_activation = None;
                metrics::counter!("key_reloads_total", "keys" => what, "outcome" => "failed")
                    .increment(1);
                tracing::error!(keys = what, error = %format!("{error:#}"), "key directory changed but does not load; keeping the keys in use");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_follows_names_and_contents_of_matching_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let a = fingerprint(dir.path(), "pem");
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert_eq!(fingerprint(dir.path(), "pem"), a);
        std::fs::write(dir.path().join("k1.pem"), "one").unwrap();
        let b = fingerprint(dir.path(), "pem");
        assert_ne!(b, a);
        std::fs::write(dir.path().join("k1.pem"), "two").unwrap();
        let c = fingerprint(dir.path(), "pem");
        assert_ne!(c, b);
        std::fs::rename(dir.path().join("k1.pem"), dir.path().join("k2.pem")).unwrap();
        assert_ne!(fingerprint(dir.path(), "pem"), c);
        assert_eq!(fingerprint(&dir.path().join("absent"), "pem"), None);
    }
}
