//! The test PKI (a CA, server and client certificates) and the server's signing key.

use super::*;

/// The identity the tests' Envoy presents to auth-service.
pub const GATEWAY_IDENTITY: &str = "spiffe://immersiverse/ns/edge/sa/gateway";

/// One PKI for the tests that put the shipped Envoy configs in front of
/// auth-service (they reach it over mTLS).
pub fn mesh_pki() -> &'static TestPki {
    static PKI: std::sync::OnceLock<TestPki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let pki = TestPki::new();
        pki.issue("envoy", &format!("URI:{GATEWAY_IDENTITY}"));
        pki
    })
}

/// auth-service requiring client certificates of the mesh CA; Envoy's is a
/// gateway identity (its `x-forwarded-for` is trusted).
pub fn mesh_tls(config: &mut Config) {
    let pki = mesh_pki();
    config.tls.cert = Some(pki.path("server.crt").into());
    config.tls.key = Some(pki.path("server.key").into());
    config.tls.client_ca = Some(pki.path("ca.crt").into());
    config.tls.client_auth = auth_service::config::ClientAuth::Required;
    config.services.insert(
        GATEWAY_IDENTITY.into(),
        auth_service::config::ServiceIdentity {
            roles: vec!["gateway".into()],
        },
    );
}

/// What points a shipped Envoy config's mTLS at the mesh PKI.
pub fn envoy_tls() -> Vec<(&'static str, String)> {
    let pki = mesh_pki();
    vec![
        ("/etc/envoy/tls/tls.crt", pki.path("envoy.crt")),
        ("/etc/envoy/tls/tls.key", pki.path("envoy.key")),
        ("/etc/envoy/tls/ca.crt", pki.path("ca.crt")),
        ("sni: auth-service", "sni: localhost".into()),
        ("exact: auth-service", "exact: localhost".into()),
    ]
}

/// A throwaway certificate authority with a server certificate for
/// 127.0.0.1/localhost and a client certificate, made with the openssl CLI
/// (P-256 keys, valid for a day). Files: ca.crt, server.crt/.key,
/// client.crt/.key.
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let output = std::process::Command::new("openssl")
                .current_dir(dir.path())
                .args(args)
                .output()
                .expect("openssl is installed (scripts/test installs it)");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let new_key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &new_key[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=auth-service test CA",
                ],
            ]
            .concat(),
        );
        let pki = Self { dir };
        for name in ["server", "client"] {
            pki.issue(name, "IP:127.0.0.1,DNS:localhost");
        }
        pki
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// A certificate `<name>.crt` (key `<name>.key`) from this CA with
    /// `san` as its subjectAltName (e.g. `URI:spiffe://…`).
    pub fn issue(&self, name: &str, san: &str) {
        let run = |args: &[&str]| {
            let output = std::process::Command::new("openssl")
                .current_dir(self.dir.path())
                .args(args)
                .output()
                .expect("openssl is installed");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let ext = format!("{name}.cnf");
        std::fs::write(
            self.dir.path().join(&ext),
            format!("subjectAltName={san}\n"),
        )
        .unwrap();
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "1",
            "-extfile",
            &ext,
        ]);
    }
}

/// The server's signing key file (PEM) in `app`'s keys directory.
fn server_key_path(app: &TestApp) -> std::path::PathBuf {
    std::fs::read_dir(app.config.keys_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pem"))
        .unwrap()
}

/// The kid of the server's signing key (its file name).
pub fn server_key_id(app: &TestApp) -> String {
    server_key_path(app)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Signs `claims` with the server's real signing key, as the server would:
/// only the claims (and `header`) differ from a genuine token.
pub fn sign_with_server_key(
    app: &TestApp,
    header: jsonwebtoken::Header,
    claims: &impl serde::Serialize,
) -> String {
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&std::fs::read(server_key_path(app)).unwrap())
        .unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}
