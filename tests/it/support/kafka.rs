//! The tansu broker, plain or behind mutual TLS.

use super::*;

/// A Kafka-compatible broker (tansu) of the test's own: in-memory storage,
/// or SQLite storage when it must keep data across a restart.
pub struct Tansu {
    child: Option<std::process::Child>,
    pub port: u16,
    pub brokers: String,
    storage: String,
    _dir: Option<tempfile::TempDir>,
    /// SCRAM-SHA-256 user and password the broker requires, when it does.
    pub sasl: Option<(String, String)>,
    /// The CA and client certificate the test's own clients use when the
    /// broker is reached through a TLS front.
    pub tls: Option<TestPki>,
    /// The address advertised to clients when it is not the broker's own.
    advertised: Option<String>,
}

impl Tansu {
    pub async fn start() -> Self {
        let mut tansu = Self::reserve();
        tansu.restart().await;
        tansu
    }

    /// Stores topics in an SQLite file of its own, so what the broker
    /// acknowledged survives a kill.
    pub async fn start_durable() -> Self {
        let mut tansu = Self::reserve();
        let dir = tempfile::tempdir().unwrap();
        // tansu reads the path relative to its working directory.
        tansu.storage = "sqlite://tansu.db".into();
        tansu._dir = Some(dir);
        tansu.restart().await;
        tansu
    }

    /// A broker address where nothing listens yet (start it with `restart`).
    pub fn reserve() -> Self {
        let port = free_port();
        Self {
            child: None,
            port,
            brokers: format!("127.0.0.1:{port}"),
            storage: "memory://tansu/".into(),
            _dir: None,
            sasl: None,
            tls: None,
            advertised: None,
        }
    }

    /// A broker that requires SASL/SCRAM-SHA-256 from every client. tansu
    /// keeps users in its storage and creates them only for an
    /// authenticated client, so the user is created on an open broker over
    /// SQLite storage, which then restarts with authentication required.
    pub async fn start_with_sasl(user: &str, password: &str) -> Self {
        let mut tansu = Self::start_durable().await;
        let bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| "tansu".into());
        let created = tokio::process::Command::new(bin)
            .args([
                "user",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", tansu.port),
                "--mechanism",
                "scram256",
                user,
                password,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .unwrap();
        assert!(created.success(), "tansu user create");
        tansu.sasl = Some((user.to_owned(), password.to_owned()));
        tansu.restart().await;
        tansu
    }

    /// A client configuration for this broker (with its credentials).
    fn client_config(&self) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        if let Some((user, password)) = &self.sasl {
            config
                .set("security.protocol", "sasl_plaintext")
                .set("sasl.mechanism", "SCRAM-SHA-256")
                .set("sasl.username", user)
                .set("sasl.password", password);
        }
        if let Some(pki) = &self.tls {
            config
                .set("security.protocol", "ssl")
                .set("ssl.ca.location", pki.path("ca.crt"))
                .set("ssl.certificate.location", pki.path("client.crt"))
                .set("ssl.key.location", pki.path("client.key"));
        }
        config
    }

    /// A broker reachable only through TLS with a client certificate: Envoy
    /// terminates TLS (server certificate for 127.0.0.1, client certificates
    /// required, both from `pki`'s CA) and forwards to tansu, which
    /// advertises Envoy's address. (tansu 0.6.0 cannot serve TLS itself: its
    /// `--cert` and `--key` options exclude each other.)
    pub async fn start_behind_mtls(pki: TestPki) -> (Self, Envoy) {
        let mut tansu = Self::reserve();
        let front = free_port();
        let admin = free_port();
        let yaml = format!(
            r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: kafka_mtls
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {front} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{ filename: "{server_crt}" }}
              private_key: {{ filename: "{server_key}" }}
            validation_context:
              trusted_ca: {{ filename: "{ca}" }}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: kafka
          cluster: tansu
  clusters:
  - name: tansu
    type: STATIC
    load_assignment:
      cluster_name: tansu
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
"#,
            server_crt = pki.path("server.crt"),
            server_key = pki.path("server.key"),
            ca = pki.path("ca.crt"),
            port = tansu.port,
        );
        let envoy = Envoy::run(&yaml, front, admin).await;
        tansu.advertised = Some(format!("127.0.0.1:{front}"));
        tansu.brokers = format!("127.0.0.1:{front}");
        tansu.tls = Some(pki);
        tansu.restart().await;
        (tansu, envoy)
    }

    pub async fn restart(&mut self) {
        self.kill();
        let bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| "tansu".into());
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = match &self.advertised {
            Some(addr) => format!("tcp://{addr}"),
            None => url.clone(),
        };
        let mut command = std::process::Command::new(bin);
        if let Some(dir) = &self._dir {
            command.current_dir(dir.path());
        }
        command.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
            "--storage-engine",
            &self.storage,
        ]);
        if self.sasl.is_some() {
            command.arg("--authentication");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu is installed (scripts/test installs it)");
        self.child = Some(child);
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("tansu did not start");
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Produces one message and waits for its delivery report.
    pub async fn produce(&self, topic: &str, key: &str, payload: &[u8]) {
        self.produce_with_headers(topic, key, payload, &[]).await;
    }

    pub async fn produce_with_headers(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) {
        use rdkafka::{
            message::{Header, OwnedHeaders},
            producer::{FutureProducer, FutureRecord},
        };
        let producer: FutureProducer = self.client_config().create().unwrap();
        let headers = headers
            .iter()
            .fold(OwnedHeaders::new(), |all, (key, value)| {
                all.insert(Header {
                    key,
                    value: Some(*value),
                })
            });
        producer
            .send(
                FutureRecord::to(topic)
                    .key(key)
                    .payload(payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    /// What the user-profile service publishes: `{"user_id": …}` keyed by
    /// the user id on `user.events.<event>` (`user_suspended`, `user_deleted`).
    pub async fn user_event(&self, event: &str, user_id: &str) {
        let body = format!(r#"{{"user_id":"{user_id}"}}"#);
        self.produce(&format!("user.events.{event}"), user_id, body.as_bytes())
            .await;
    }

    /// Reads `topics` from the beginning until `expected` messages arrived
    /// or `within` passed. Partitions are assigned, not subscribed: no group
    /// membership, so no rebalance to wait for and nothing to leave.
    pub async fn read(
        &self,
        topics: &[&str],
        expected: usize,
        within: Duration,
    ) -> Vec<rdkafka::message::OwnedMessage> {
        use rdkafka::{
            Offset, TopicPartitionList,
            consumer::{BaseConsumer, Consumer},
        };
        let mut config = self.client_config();
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = config
                // assign() wants a group id; it never joins the group.
                .set("group.id", format!("test-{}", Uuid::new_v4()))
                .set("enable.auto.commit", "false")
                .create()
                .unwrap();
            let deadline = std::time::Instant::now() + within;
            let mut assignment = TopicPartitionList::new();
            for topic in &topics {
                let partitions = loop {
                    let metadata = consumer
                        .fetch_metadata(Some(topic), Duration::from_secs(5))
                        .ok();
                    let partitions: Vec<i32> = metadata
                        .iter()
                        .flat_map(|m| m.topics())
                        .filter(|t| t.error().is_none())
                        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                        .collect();
                    if !partitions.is_empty() || std::time::Instant::now() >= deadline {
                        break partitions;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                };
                for partition in partitions {
                    assignment
                        .add_partition_offset(topic, partition, Offset::Beginning)
                        .unwrap();
                }
            }
            consumer.assign(&assignment).unwrap();
            let mut messages = Vec::new();
            while messages.len() < expected && std::time::Instant::now() < deadline {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    messages.push(m.detach());
                }
            }
            messages
        })
        .await
        .unwrap()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A header of a Kafka message as text.
pub fn header(message: &rdkafka::message::OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::{Headers, Message};
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
