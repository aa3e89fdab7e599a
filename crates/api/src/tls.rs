//! TLS for the gRPC listeners (rustls), with client certificates (mTLS)
//! when configured, and the files reloaded without a restart: a task checks
//! them every `tls.reload_interval_secs` and swaps in a new server
//! configuration; new handshakes use it, established connections live on. A
//! file that does not load at start stops start-up naming its key; at a
//! reload it is logged and the previous configuration stays.
//!
//! Peer identities: a verified client certificate names its service by a
//! SPIFFE URI SAN (`spiffe://…`), else its first DNS SAN; `services.<id>`
//! gives that identity its roles.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;

use crate::config::{ClientAuth, TlsConfig};

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration from the files; errors name the key.
pub fn server_config(config: &TlsConfig) -> anyhow::Result<Arc<ServerConfig>> {
    let (Some(cert), Some(key)) = (&config.cert, &config.key) else {
        anyhow::bail!("tls.cert and tls.key are not set");
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("tls.cert: reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!(
                "tls.cert: {} is not a PEM certificate chain",
                cert.display()
            )
        })?;
    anyhow::ensure!(
        !chain.is_empty(),
        "tls.cert: {} holds no certificate",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("tls.key: {} is not a PEM private key", key.display()))?;
    let verifier: Option<Arc<dyn ClientCertVerifier>> = match config.client_auth {
        ClientAuth::None => None,
        mode => {
            let path = config
                .client_ca
                .as_ref()
                .context("tls.client_ca is required for client certificates")?;
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("tls.client_ca: reading {}", path.display()))?
            {
                let ca =
                    ca.with_context(|| format!("tls.client_ca: {} is not PEM", path.display()))?;
                roots.add(ca).with_context(|| {
                    format!(
                        "tls.client_ca: a certificate in {} is not a CA",
                        path.display()
                    )
                })?;
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "tls.client_ca: {} holds no certificate",
                path.display()
            );
            let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let builder = if mode == ClientAuth::Optional {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            Some(
                builder
                    .build()
                    .context("tls.client_ca: building the verifier")?,
            )
        }
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .context("tls.key does not match tls.cert")?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(server))
}

/// The server configuration in force, replaced when the files change.
#[derive(Clone)]
pub struct Reloadable {
    current: Arc<ArcSwap<ServerConfig>>,
    config: TlsConfig,
}

impl Reloadable {
    pub fn load(config: &TlsConfig) -> anyhow::Result<Self> {
        Ok(Self {
            current: Arc::new(ArcSwap::new(server_config(config)?)),
            config: config.clone(),
        })
    }

    fn files(&self) -> Vec<PathBuf> {
        [&self.config.cert, &self.config.key, &self.config.client_ca]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// Checks the files every `reload_interval_secs` until `stop`.
    pub async fn watch(self, stop: CancellationToken) {
        let period = Duration::from_secs(self.config.reload_interval_secs);
        let stamp = |files: &[PathBuf]| -> Vec<Option<(SystemTime, u64)>> {
            files
                .iter()
                .map(|f| {
                    std::fs::metadata(f)
                        .ok()
                        .and_then(|m| Some((m.modified().ok()?, m.len())))
                })
                .collect()
        };
        let files = self.files();
        let mut seen = stamp(&files);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
            let now = stamp(&files);
            if now == seen {
                continue;
            }
            seen = now;
            match server_config(&self.config) {
                Ok(config) => {
                    self.current.store(config);
                    metrics::counter!("tls_reloads_total", "outcome" => "reloaded").increment(1);
                    tracing::info!("TLS certificate files changed: new handshakes use them");
                }
                Err(error) => {
                    metrics::counter!("tls_reloads_total", "outcome" => "failed").increment(1);
                    tracing::error!(error = %format!("{error:#}"), "TLS files changed but do not load; keeping the previous ones");
                }
            }
        }
    }

    /// Accepted connections after their TLS handshake, for tonic's
    /// `serve_with_incoming`. A failed handshake is logged and counted, and
    /// does not stop the listener.
    pub fn incoming(
        &self,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> impl futures::Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static
    {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let current = self.current.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(current.load_full());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(error)) => {
                            metrics::counter!("tls_handshake_failures_total").increment(1);
                            tracing::debug!(%peer, %error, "TLS handshake refused");
                        }
                        Err(_) => {
                            metrics::counter!("tls_handshake_failures_total").increment(1);
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// The service identity a certificate names: its first `spiffe://` URI SAN,
/// else its first DNS SAN.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some((*uri).to_owned()),
            _ => None,
        })
        .or_else(|| {
            names.iter().find_map(|n| match n {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
        })
}
