//! The real binary: start from nothing, survive a restart, stop on signals,
//! refuse bad configuration.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use auth_service::grpc::pb::{self, auth_service_client::AuthServiceClient};

use crate::support::{PASSWORD, channel, free_port, http_get};

struct Server {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
}

/// Starts the binary with only the given `AUTH_*` variables (nothing
/// inherited) in `cwd`.
fn start(cwd: &Path, env: &[(&str, &str)]) -> Server {
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_auth-service"));
    command
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AUTH_GRPC_ADDR", grpc.to_string())
        .env("AUTH_HTTP_ADDR", http.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    Server {
        child: command.spawn().unwrap(),
        grpc,
        http,
    }
}

impl Server {
    async fn ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("server exited early: {status}");
            }
            if tokio::net::TcpStream::connect(self.http).await.is_ok()
                && http_get(self.http, "/readyz").await.0 == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server not ready in time");
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn client(&self) -> AuthServiceClient<tonic::transport::Channel> {
        AuthServiceClient::new(channel(self.grpc).await)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_from_an_empty_dir_keeps_data_and_keys_across_restarts_and_exits_0_on_sigterm_and_sigint()
 {
    let cwd = tempfile::tempdir().unwrap();
    // No config file and no AUTH_* beyond the two ports: the embedded default
    // with the default argon2 parameters, data in ./data.
    let mut first = start(cwd.path(), &[]);
    first.ready().await;
    assert!(cwd.path().join("data/auth.db").exists());
    assert!(
        std::fs::read_dir(cwd.path().join("data/keys"))
            .unwrap()
            .count()
            == 1
    );
    let mut client = first.client().await;
    client
        .create_user(pb::CreateUserRequest {
            email: "zoe@example.com".into(),
            username: "zoe".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap();
    let pair = client
        .login(pb::LoginRequest {
            login: "zoe".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(pair.access_token.starts_with("ey"));
    first.signal("TERM");
    assert_eq!(first.wait_exit().code(), Some(0), "SIGTERM exits 0");

    let mut second = start(cwd.path(), &[]);
    second.ready().await;
    let mut client = second.client().await;
    let valid = client
        .validate_token(pb::ValidateTokenRequest {
            token: pair.access_token.clone(),
        })
        .await;
    assert!(
        valid.is_ok(),
        "a token signed before the restart still verifies: the key survived: {valid:?}"
    );
    client
        .refresh_token(pb::RefreshTokenRequest {
            refresh_token: pair.refresh_token,
        })
        .await
        .expect("the session survived");
    client
        .login(pb::LoginRequest {
            login: "zoe@example.com".into(),
            password: PASSWORD.into(),
        })
        .await
        .expect("the account survived");
    second.signal("INT");
    assert_eq!(second.wait_exit().code(), Some(0), "SIGINT exits 0");
}

#[test]
fn a_bad_configuration_value_stops_start_up_naming_the_key() {
    let cwd = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("AUTH_GRPC_ADDR", "not-an-address"),
        ("AUTH_DATABASE_URL", "mysql://x"),
        ("AUTH_PASSWORD__ITERATIONS", "zero"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_auth-service"))
            .current_dir(cwd.path())
            .env_clear()
            .env(key, value)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{key}={value} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
}

#[test]
fn an_unknown_config_file_is_refused() {
    let output = Command::new(env!("CARGO_BIN_EXE_auth-service"))
        .args(["--config", "/nonexistent/auth.toml"])
        .env_clear()
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/auth.toml"));
}
