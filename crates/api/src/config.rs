//! The transport sections: TLS, service identities, message limits and the RPC stack.

use std::{collections::BTreeMap, path::PathBuf};

use auth_domain::error::{ConfigError, require};
use serde::{Deserialize, Serialize};

use auth_domain::ratelimit::quota::Limit;

/// TLS on the gRPC listeners (AuthService and ext_authz).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; with `key`, the gRPC listeners serve TLS.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// PEM bundle of the CAs that issue client certificates.
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// How often the files are checked for changes (rotation by
    /// cert-manager or a mesh); new handshakes use new files.
    pub reload_interval_secs: u64,
    /// Behind a mesh sidecar that terminates mTLS (Istio): the addresses
    /// that sidecar connects from (Istio: `127.0.0.6`). A call from one of
    /// them is the caller named by the `x-forwarded-client-cert` the
    /// sidecar set (its SPIFFE URI, else its DNS name), with that
    /// identity's `services` roles; from any other address the header is
    /// ignored. Empty (the default): never read.
    #[serde(default)]
    pub xfcc_from: Vec<std::net::IpAddr>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// No client certificate is asked for.
    None,
    /// A certificate is verified when presented; callers without one are
    /// anonymous peers.
    Optional,
    /// Every caller presents a certificate from `client_ca` (mTLS).
    Required,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceIdentity {
    pub roles: Vec<String>,
}

/// Bounds on what a caller may send to the gRPC listeners. Larger input is
/// refused with a clear error before it is buffered or parsed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest AuthService request message, in bytes (its requests are a few
    /// hundred bytes; a password is at most 4 KiB). Larger: OutOfRange.
    pub max_api_message_bytes: usize,
    /// Largest ext_authz CheckRequest, in bytes (it carries the HTTP headers
    /// Envoy forwards; Envoy's own header limit is 60 KiB).
    pub max_check_message_bytes: usize,
    /// Largest HTTP/2 header block (gRPC metadata) a caller may send, in
    /// bytes. The default (64 KiB) is above the HTTP/2 server's own 16 KiB so
    /// that whatever the gateway admits (32 KiB of client headers, plus what
    /// Envoy adds) reaches the service; larger is refused before any handler.
    pub max_header_bytes: u32,
    /// Every AuthService call ends within this many milliseconds (Unavailable
    /// otherwise), whatever a backend does — a database that stops answering
    /// on an open connection included. 0: `database_timeout_ms` +
    /// `password.max_wait_ms` + 1000, so the more specific answers come first.
    pub request_timeout_ms: u64,
}

/// What the gRPC layer stack does around every call (`grpc::stack`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcConfig {
    /// One structured line per call (target `access`): request id, method,
    /// code, latency, principal and client address, never a secret.
    pub access_log: AccessLog,
    /// Calls per session for the AuthService methods named (seed 6.2), e.g.
    /// `GetPlatformAccessToken = { requests = 60, per_secs = 60, burst = 20 }`:
    /// counted per session id of the bearer token, shared by every replica
    /// through the rate-limit store; past it the call is answered
    /// ResourceExhausted with `retry-after`.
    pub session_limits: BTreeMap<String, Limit>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AccessLog {
    /// Every call on every listener, ext_authz Checks included.
    All,
    /// AuthService calls (not health probes, reflection or Checks, which
    /// Envoy's own access log records with the decision).
    #[default]
    Api,
    Off,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_api_message_bytes: 64 * 1024,
            max_check_message_bytes: 256 * 1024,
            max_header_bytes: 64 * 1024,
            request_timeout_ms: 0,
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            client_ca: None,
            client_auth: ClientAuth::None,
            reload_interval_secs: 10,
            xfcc_from: Vec::new(),
        }
    }
}

impl TlsConfig {
    /// Each error names its own key, relative to this section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        require(
            self.cert.is_some() == self.key.is_some(),
            if self.cert.is_some() { "key" } else { "cert" },
            "tls.cert and tls.key go together",
        )?;
        if self.client_auth != ClientAuth::None {
            require(
                self.client_ca.is_some(),
                "client_ca",
                "client certificates need a CA",
            )?;
            require(
                self.cert.is_some(),
                "cert",
                "client certificates need the server's own cert and key",
            )?;
        }
        require(
            self.reload_interval_secs > 0,
            "reload_interval_secs",
            "must be positive",
        )
    }
}

impl LimitsConfig {
    /// Each error names its own key, relative to this section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("max_api_message_bytes", self.max_api_message_bytes),
            ("max_check_message_bytes", self.max_check_message_bytes),
            ("max_header_bytes", self.max_header_bytes as usize),
        ] {
            require(value >= 8 * 1024, key, "must be at least 8 KiB")?;
        }
        Ok(())
    }
}

impl RpcConfig {
    /// Each error names its own key, relative to this section
    /// (`session_limits.<method>.burst`). Whether each method exists is
    /// checked where the API's method names are known (`grpc::stack`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (method, limit) in &self.session_limits {
            limit
                .validate()
                .map_err(|e| e.within(method).within("session_limits"))?;
        }
        Ok(())
    }
}
