//! Redis servers of a test's own: standalone, a Cluster on loopback, Sentinel.

use super::*;

/// A Redis server of the test's own, to be killed mid-test.
pub struct OwnRedis {
    pub url: String,
    child: std::process::Child,
    /// How it was started, for [`OwnRedis::restart`].
    args: Vec<String>,
    port: u16,
    /// Its working directory (`--dir`): whatever it writes (a replica's
    /// copy of its master's data, for one) stays out of the work tree.
    _dir: tempfile::TempDir,
}

impl OwnRedis {
    pub async fn start() -> Self {
        Self::start_with(&[], "redis").await
    }

    /// A plaintext Redis with `extra` server arguments
    /// (`["--maxmemory-policy", "allkeys-lru"]`).
    pub async fn start_args(extra: &[&str]) -> Self {
        Self::start_with(extra, "redis").await
    }

    /// Starts it again, killed or not, on the same port with the same
    /// arguments: it comes back empty (no persistence).
    pub async fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.args, self.port)
            .await
            .expect("redis-server starts again on its port");
    }

    async fn spawn(args: &[String], port: u16) -> Option<std::process::Child> {
        let mut child = std::process::Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Some(child);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Redis serving only TLS with `pki`'s server certificate, requiring
    /// client certificates of `pki`'s CA.
    pub async fn start_tls(pki: &TestPki) -> Self {
        let (cert, key, ca) = (
            pki.path("server.crt"),
            pki.path("server.key"),
            pki.path("ca.crt"),
        );
        Self::start_with(
            &[
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "yes",
            ],
            "rediss",
        )
        .await
    }

    async fn start_with(extra: &[&str], scheme: &str) -> Self {
        let port = free_port();
        let mut args: Vec<String> = if scheme == "rediss" {
            vec!["--port".into(), "0".into(), "--tls-port".into()]
        } else {
            vec!["--port".into()]
        };
        args.push(port.to_string());
        let dir = tempfile::tempdir().unwrap();
        args.extend(
            [
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args.push(dir.path().display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Self::spawn(&args, port)
            .await
            .expect("redis-server did not start");
        Self {
            url: format!("{scheme}://127.0.0.1:{port}/"),
            child,
            args,
            port,
            _dir: dir,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (`STOP`: the server goes silent, its connections
    /// stay open; `CONT`: it comes back).
    pub fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal}");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of the test's own: three primaries on loopback joined by
/// `redis-cli --cluster create` (the slots spread over them), no replicas.
pub struct RedisCluster {
    pub nodes: Vec<OwnRedis>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let conf = dir.path().join(format!("nodes-{i}.conf"));
            // The cluster bus on a free port of its own: by default it is the
            // node's port + 10,000, which nothing checked was free.
            let bus = free_port().to_string();
            nodes.push(
                OwnRedis::start_with(
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf.display().to_string(),
                        "--cluster-node-timeout",
                        "2000",
                        "--cluster-port",
                        &bus,
                    ],
                    "redis",
                )
                .await,
            );
        }
        let cluster = Self { nodes, _dir: dir };
        let mut create = std::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in cluster.ports() {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = tokio::task::spawn_blocking(move || {
            create
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .output()
                .expect("redis-cli is installed with redis-server")
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Every node agrees the cluster is up before the test starts.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for port in cluster.ports() {
            while !cluster_cli(port, &["cluster", "info"]).contains("cluster_state:ok") {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the cluster did not come up"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        cluster
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| node_port(&n.url)).collect()
    }

    /// The seed list as `redis_url` takes it in cluster mode.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node serving `key`'s slot.
    pub fn node_of(&self, key: &str) -> usize {
        let ports = self.ports();
        let slot: u16 = cluster_cli(ports[0], &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap();
        let owner = slot_owner(ports[0], slot);
        ports.iter().position(|&p| p == owner).unwrap()
    }

    /// The keys a node holds that start with `prefix`.
    pub fn keys_on(&self, node: usize, prefix: &str) -> Vec<String> {
        cluster_cli(
            self.ports()[node],
            &["--scan", "--pattern", &format!("{prefix}*")],
        )
        .lines()
        .map(str::to_owned)
        .filter(|k| !k.is_empty())
        .collect()
    }
}

fn node_port(url: &str) -> u16 {
    url.trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn cluster_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The port of the node serving `slot`, from `CLUSTER SLOTS` as redis-cli
/// prints it to a pipe: start, end, ip, port, id for each range.
fn slot_owner(port: u16, slot: u16) -> u16 {
    let out = cluster_cli(port, &["cluster", "slots"]);
    let lines: Vec<&str> = out.lines().collect();
    for i in 0..lines.len().saturating_sub(3) {
        if let (Ok(start), Ok(end)) = (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>())
            && (start..=end).contains(&slot)
        {
            return lines[i + 3].parse().unwrap();
        }
    }
    panic!("no owner for slot {slot}: {out}")
}

/// Redis behind Sentinel on loopback: a master, one replica of it and one
/// sentinel (quorum 1, the master judged down after 1 s).
pub struct RedisSentinel {
    pub master: OwnRedis,
    pub replica: OwnRedis,
    sentinel: std::process::Child,
    pub sentinel_port: u16,
    _dir: tempfile::TempDir,
}

pub const SENTINEL_MASTER: &str = "authmaster";

impl RedisSentinel {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let master = OwnRedis::start().await;
        let master_port = node_port(&master.url);
        let replica = OwnRedis::start_with(
            &["--replicaof", "127.0.0.1", &master_port.to_string()],
            "redis",
        )
        .await;
        let sentinel_port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {sentinel_port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 5000\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let sentinel = std::process::Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs as a sentinel");
        let deployment = Self {
            master,
            replica,
            sentinel,
            sentinel_port,
            _dir: dir,
        };
        // The replica is in sync and the sentinel knows it before the test.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let replica_port = node_port(&deployment.replica.url);
        while !(cluster_cli(replica_port, &["info", "replication"])
            .contains("master_link_status:up")
            && deployment.master_port() == Some(master_port))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the sentinel deployment did not come up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        deployment
    }

    /// `redis_url` in sentinel mode.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.sentinel_port)
    }

    /// The master's port as the sentinel names it now.
    pub fn master_port(&self) -> Option<u16> {
        let out = cluster_cli(
            self.sentinel_port,
            &["sentinel", "get-master-addr-by-name", SENTINEL_MASTER],
        );
        out.lines().nth(1)?.trim().parse().ok()
    }

    pub fn port_of(node: &OwnRedis) -> u16 {
        node_port(&node.url)
    }

    /// Blocks until the replica has acknowledged every write so far.
    pub fn wait_replicated(&self) {
        let acked = cluster_cli(node_port(&self.master.url), &["wait", "1", "5000"]);
        assert_eq!(acked.trim(), "1", "the replica did not acknowledge");
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        let _ = self.sentinel.kill();
        let _ = self.sentinel.wait();
    }
}
