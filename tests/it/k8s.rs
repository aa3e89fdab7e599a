//! The Kubernetes manifests (`k8s/`) against the real binaries.
//!
//! The rendered production overlay's pods are run here the way a kubelet
//! runs them: each container in a mount namespace of its own with a
//! read-only root filesystem, its ConfigMaps and Secrets laid out where the
//! volume mounts put them (with the kubelet's `..data` symlink layout, so a
//! Secret can be updated in place as Kubernetes does it), its command, args
//! and env exactly as written, as the pod's user and group with every
//! capability dropped. Then every probe the spec declares and every port its
//! Services name is called. A manifest that drifts from the binary (a
//! subcommand, a flag, a path, a port, a probe, a missing mount) fails here.
//!
//! Needs root (mount namespaces), `KUBECTL` (scripts/test installs a
//! pinned kubectl) and the suite's PostgreSQL, Redis and Envoy. The pods
//! listen on their spec's fixed ports on the host network.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use auth_service::grpc::pb::{self, auth_service_client::AuthServiceClient};
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{PASSWORD, TestPki, env_url, fresh_postgres_url, http, http_get};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `kubectl kustomize` of a directory under the repository, as JSON values.
pub(crate) fn render(dir: &str) -> Vec<Value> {
    let kubectl = std::env::var("KUBECTL")
        .expect("KUBECTL is not set: run the suite with scripts/test, which installs kubectl");
    let output = Command::new(kubectl)
        .args(["kustomize", &format!("{ROOT}/{dir}")])
        .output()
        .expect("run kubectl kustomize");
    assert!(
        output.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("rendered YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// The object of `kind` named `name` (a generated ConfigMap's name carries
/// a content hash after it).
pub(crate) fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            let n = d["metadata"]["name"].as_str().unwrap_or_default();
            d["kind"] == kind
                && (n == name
                    || (kind == "ConfigMap"
                        && n.strip_prefix(name)
                            .and_then(|rest| rest.strip_prefix('-'))
                            .is_some_and(|hash| !hash.contains('-'))))
        })
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// What a pod needs from outside its spec: the Secrets' contents, the host
/// files standing in for container images, and extra /etc/hosts names.
struct Cluster {
    docs: Vec<Value>,
    namespace: String,
    secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// image (without tag) -> (its entrypoint path, the host binary).
    images: BTreeMap<String, (String, PathBuf)>,
    /// Service and backend names resolved to 127.0.0.1 (the cluster DNS).
    hosts: Vec<String>,
}

/// One running container. Dropping it kills the process.
struct Container {
    child: Child,
    log: PathBuf,
    name: String,
}

impl Container {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited ({status}):\n{}", self.name, self.log());
        }
    }

    /// Waits for the process to end by itself (a Job, an init container,
    /// or after SIGTERM) and returns whether it succeeded.
    async fn wait(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {limit:?}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pod's volumes on the host: ConfigMaps and Secrets in the kubelet's
/// layout, emptyDirs shared by its containers.
struct PodVolumes {
    dir: tempfile::TempDir,
}

impl PodVolumes {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        set_mode(dir.path(), 0o755);
        Self { dir }
    }

    fn path(&self, volume: &str) -> PathBuf {
        self.dir.path().join("volumes").join(volume)
    }

    /// Writes `files` as the kubelet does: into a timestamped directory,
    /// then `..data` switched to it atomically; each key a symlink through
    /// `..data`. Called again, it is an in-place Secret update.
    fn project(&self, volume: &str, files: &BTreeMap<String, Vec<u8>>, mode: u32, group: u32) {
        let dir = self.path(volume);
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o755);
        let stamp = format!("..{}", uuid::Uuid::new_v4().simple());
        let data = dir.join(&stamp);
        std::fs::create_dir(&data).unwrap();
        set_mode(&data, 0o755);
        for (key, bytes) in files {
            let file = data.join(key);
            std::fs::write(&file, bytes).unwrap();
            set_mode(&file, mode);
            std::os::unix::fs::chown(&file, Some(0), Some(group)).unwrap();
        }
        let link = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&stamp, &link).unwrap();
        std::fs::rename(&link, dir.join("..data")).unwrap();
        for key in files.keys() {
            let path = dir.join(key);
            if std::fs::symlink_metadata(&path).is_err() {
                std::os::unix::fs::symlink(format!("..data/{key}"), &path).unwrap();
            }
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `$(VAR)` references to earlier variables, as the kubelet expands them.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = value.to_owned();
    for (name, v) in env {
        out = out.replace(&format!("$({name})"), v);
    }
    out
}

impl Cluster {
    /// Starts container `name` of the pod template of workload `kind/workload`.
    fn start(&self, kind: &str, workload: &str, name: &str, volumes: &PodVolumes) -> Container {
        let workload_object = object(&self.docs, kind, workload);
        let pod = &workload_object["spec"]["template"]["spec"];
        let pod_name = format!("{workload}-0");
        let container = list(&pod["containers"])
            .iter()
            .chain(list(&pod["initContainers"]))
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{kind}/{workload} has no container {name}"));
        let security = &pod["securityContext"];
        let uid = security["runAsUser"].as_u64().expect("runAsUser is set");
        let gid = security["runAsGroup"].as_u64().expect("runAsGroup is set");
        let fs_group = security["fsGroup"].as_u64().unwrap_or(gid);
        assert!(
            security["runAsNonRoot"] == true && uid != 0,
            "{workload}: pods run as non-root"
        );
        let csc = &container["securityContext"];

        // The image: its file on this host, at its entrypoint (or command).
        let image = str_of(&container["image"]);
        let repo = image.rsplit_once(':').map_or(image, |(r, _)| r);
        let (entrypoint, host_binary) = self
            .images
            .get(repo)
            .unwrap_or_else(|| panic!("no host binary stands in for image {repo}"));
        let mut argv: Vec<String> = match container.get("command") {
            Some(command) => list(command).iter().map(|c| str_of(c).to_owned()).collect(),
            None => vec![entrypoint.clone()],
        };

        // Environment, with the kubelet's field references and expansion.
        let mut env: Vec<(String, String)> = vec![(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        )];
        for var in list(&container["env"]) {
            let value = if let Some(v) = var.get("value") {
                expand(str_of(v), &env)
            } else {
                match str_of(&var["valueFrom"]["fieldRef"]["fieldPath"]) {
                    "metadata.name" => pod_name.clone(),
                    "metadata.namespace" => self.namespace.clone(),
                    other => panic!("field reference {other} is not simulated"),
                }
            };
            env.push((str_of(&var["name"]).to_owned(), value));
        }
        argv.extend(
            list(&container["args"])
                .iter()
                .map(|a| expand(str_of(a), &env)),
        );

        // The filesystem: a tmpfs root with the host's /usr (the runtime
        // libraries), the image binary, the pod's volumes, then read-only.
        let work = volumes.dir.path().join(format!("run-{name}"));
        let etc = work.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        let root = work.join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(
            etc.join("passwd"),
            format!("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{uid}:{gid}::/home/nonroot:/sbin/nologin\n"),
        )
        .unwrap();
        std::fs::write(etc.join("group"), format!("root:x:0:\nnonroot:x:{gid}:\n")).unwrap();
        std::fs::write(
            etc.join("hosts"),
            format!("127.0.0.1 localhost {}\n", self.hosts.join(" ")),
        )
        .unwrap();
        std::fs::write(etc.join("nsswitch.conf"), "hosts: files dns\n").unwrap();
        std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        let q = |p: &Path| sh_quote(&p.display().to_string());
        let r = q(&root);
        let mut script = format!(
            "set -eu\nmount -t tmpfs -o mode=755 tmpfs {r}\n\
             for d in usr etc proc dev; do mkdir -p {r}/$d; done\n\
             for l in bin lib lib64 sbin; do ln -s usr/$l {r}/$l; done\n\
             mount --rbind /usr {r}/usr\nmount -o remount,bind,ro {r}/usr\n\
             mount --rbind /proc {r}/proc\nmount --rbind /dev {r}/dev\n\
             cp {}/* {r}/etc/\nmkdir -p {r}/etc/ssl\nmount --bind /etc/ssl {r}/etc/ssl\n",
            q(&etc)
        );
        let program = &argv[0];
        let program_dir = Path::new(program).parent().unwrap().display().to_string();
        assert!(
            program_dir.starts_with("/usr/local/"),
            "images install their binary under /usr/local ({program})"
        );
        script += &format!(
            "mount -t tmpfs tmpfs {r}{pd}\ntouch {r}{p}\nmount --bind {} {r}{p}\n",
            q(host_binary),
            pd = sh_quote(&program_dir),
            p = sh_quote(program),
        );
        for mount in list(&container["volumeMounts"]) {
            assert!(mount.get("subPath").is_none(), "subPath is not simulated");
            let volume_name = str_of(&mount["name"]);
            let target = format!("{r}{}", sh_quote(str_of(&mount["mountPath"])));
            let volume = list(&pod["volumes"])
                .iter()
                .find(|v| v["name"] == volume_name)
                .unwrap_or_else(|| panic!("{workload}: no volume {volume_name}"));
            let source = volumes.path(volume_name);
            if let Some(config_map) = volume.get("configMap") {
                let rendered = object(&self.docs, "ConfigMap", str_of(&config_map["name"]));
                let files = rendered["data"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), str_of(v).as_bytes().to_vec()))
                    .collect();
                let mode = config_map["defaultMode"].as_u64().unwrap_or(0o644) as u32;
                if !source.exists() {
                    volumes.project(volume_name, &files, mode, fs_group as u32);
                }
            } else if let Some(secret) = volume.get("secret") {
                let secret_name = str_of(&secret["secretName"]);
                let files = self.secrets.get(secret_name).unwrap_or_else(|| {
                    panic!(
                        "{workload} mounts Secret {secret_name}, which the test does not provide"
                    )
                });
                let mode = secret["defaultMode"].as_u64().unwrap_or(0o644) as u32;
                if !source.exists() {
                    volumes.project(volume_name, files, mode, fs_group as u32);
                }
            } else if volume.get("emptyDir").is_some() {
                if !source.exists() {
                    std::fs::create_dir_all(&source).unwrap();
                    set_mode(&source, 0o1777);
                }
            } else {
                panic!("{workload}: volume {volume_name} is of a kind not simulated");
            }
            script += &format!("mkdir -p {target}\nmount --bind {} {target}\n", q(&source));
            if mount["readOnly"] == true {
                script += &format!("mount -o remount,bind,ro {target}\n");
            }
        }
        if csc["readOnlyRootFilesystem"] == true {
            script += &format!("mount -o remount,ro {r}\n");
        }
        let capabilities: Vec<&str> = list(&csc["capabilities"]["drop"])
            .iter()
            .map(str_of)
            .collect();
        assert_eq!(
            capabilities,
            ["ALL"],
            "{workload}/{name} drops every capability"
        );
        assert_eq!(csc["allowPrivilegeEscalation"], false);
        script += &format!(
            "cd /\nexec chroot {r} /usr/bin/setpriv --reuid={uid} --regid={gid} --groups={fs_group} \
             --bounding-set=-all --inh-caps=-all --no-new-privs -- {}\n",
            argv.iter()
                .map(|a| sh_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let script_path = work.join("start.sh");
        std::fs::write(&script_path, script).unwrap();
        let log = work.join("container.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh"])
            .arg(&script_path)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("unshare (util-linux) runs");
        Container {
            child,
            log,
            name: format!("{kind}/{workload}/{name}"),
        }
    }

    /// The container port a probe or a Service's `targetPort` names.
    fn port(&self, kind: &str, workload: &str, container: &str, port: &Value) -> u16 {
        if let Some(n) = port.as_u64() {
            return n as u16;
        }
        let name = str_of(port);
        let pod = &object(&self.docs, kind, workload)["spec"]["template"]["spec"];
        list(&pod["containers"])
            .iter()
            .filter(|c| c["name"] == container)
            .flat_map(|c| list(&c["ports"]))
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{workload}/{container} declares no port {name}"))
            as u16
    }

    /// Calls every probe `container` declares; all must pass.
    async fn probe_all(&self, kind: &str, workload: &str, container: &str) -> usize {
        let pod = &object(&self.docs, kind, workload)["spec"]["template"]["spec"];
        let spec = list(&pod["containers"])
            .iter()
            .find(|c| c["name"] == container)
            .unwrap();
        let mut probed = 0;
        for which in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let Some(probe) = spec.get(which) else {
                continue;
            };
            probed += 1;
            let what = format!("{workload}/{container} {which}");
            if let Some(get) = probe.get("httpGet") {
                let port = self.port(kind, workload, container, &get["port"]);
                let (status, body) = http_get(local(port), str_of(&get["path"])).await;
                assert_eq!(status, 200, "{what}: {body}");
            } else if let Some(grpc) = probe.get("grpc") {
                let port = self.port(kind, workload, container, &grpc["port"]);
                let service = grpc["service"].as_str().unwrap_or_default();
                assert_eq!(
                    health(port, service).await,
                    Some(ServingStatus::Serving),
                    "{what}"
                );
            } else if let Some(tcp) = probe.get("tcpSocket") {
                let port = self.port(kind, workload, container, &tcp["port"]);
                tokio::net::TcpStream::connect(local(port))
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            } else {
                panic!("{what}: a probe kind not simulated");
            }
        }
        probed
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The plaintext gRPC health answer on `port`, if any.
async fn health(port: u16, service: &str) -> Option<ServingStatus> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(answer.into_inner().status).ok()
}

async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    container: &mut Container,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        container.assert_running();
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}:\n{}", container.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An mTLS client of the gRPC port, as a caller holding `cert` sees it.
async fn grpc_client(pki: &TestPki, cert: &str, port: u16) -> AuthServiceClient<Channel> {
    let read = |f: &str| std::fs::read(pki.path(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt")))
        .identity(Identity::from_pem(
            read(&format!("{cert}.crt")),
            read(&format!("{cert}.key")),
        ))
        .domain_name("auth-service");
    let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("mTLS connection to the gRPC port");
    AuthServiceClient::new(channel)
}

fn files(entries: &[(&str, Vec<u8>)]) -> BTreeMap<String, Vec<u8>> {
    entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// A new signing key as `(kid, PEM)`, made by the binary's own code.
fn signing_key(activation: time::OffsetDateTime) -> (String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let kid = auth_service::tokens::keys::write_new_key(dir.path(), activation).unwrap();
    let pem = std::fs::read(dir.path().join(format!("{kid}.pem"))).unwrap();
    (kid, pem)
}

/// The real Envoy binary of the suite's Envoy package (ENVOY_BIN is the
/// package's launcher script).
fn envoy_binary() -> PathBuf {
    let launcher = PathBuf::from(
        std::env::var("ENVOY_BIN").expect("ENVOY_BIN is not set: run the suite with scripts/test"),
    );
    let venv = launcher.parent().unwrap().parent().unwrap();
    let lib = venv.join("lib");
    std::fs::read_dir(&lib)
        .unwrap()
        .filter_map(Result::ok)
        .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no envoy binary under {}", lib.display()))
}

fn kid_of(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap();
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let header: Value = serde_json::from_slice(&header).unwrap();
    str_of(&header["kid"]).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_production_pods_run_the_real_binaries_as_their_specs_say() {
    assert_eq!(
        effective_uid(),
        0,
        "this test runs pods in mount namespaces and needs root (scripts/test runs as root here)"
    );
    let docs = render("k8s/overlays/production");
    let namespace =
        str_of(&object(&docs, "Deployment", "auth-service")["metadata"]["namespace"]).to_owned();

    // The Secrets the platform provides (README, Deployment).
    let pki = TestPki::new();
    pki.issue("auth-service", "DNS:auth-service");
    pki.issue(
        "gateway",
        &format!("URI:spiffe://immersiverse/ns/{namespace}/sa/envoy-gateway"),
    );
    let pem = |f: &str| std::fs::read(pki.path(f)).unwrap();
    let database = fresh_postgres_url().await;
    let (first_kid, first_key) = signing_key(time::OffsetDateTime::now_utc());
    let vault_dir = tempfile::tempdir().unwrap();
    let vault_id = auth_service::platforms::vault::generate_key(
        vault_dir.path(),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let vault_key = std::fs::read(vault_dir.path().join(format!("{vault_id}.key"))).unwrap();
    let mut secrets = BTreeMap::new();
    secrets.insert(
        "auth-service-backends".to_owned(),
        files(&[
            ("database-url", format!("{database}\n").into_bytes()),
            ("migrate-database-url", database.clone().into_bytes()),
            ("redis-url", env_url("TEST_REDIS_URL").into_bytes()),
            ("kafka-password", b"not-used-here".to_vec()),
        ]),
    );
    secrets.insert(
        "auth-service-signing-keys".to_owned(),
        files(&[(&format!("{first_kid}.pem"), first_key.clone())]),
    );
    secrets.insert(
        "auth-service-vault-keys".to_owned(),
        files(&[(&format!("{vault_id}.key"), vault_key)]),
    );
    secrets.insert(
        "auth-service-tls".to_owned(),
        files(&[
            ("tls.crt", pem("auth-service.crt")),
            ("tls.key", pem("auth-service.key")),
            ("ca.crt", pem("ca.crt")),
        ]),
    );
    secrets.insert(
        "envoy-gateway-tls".to_owned(),
        files(&[
            ("tls.crt", pem("gateway.crt")),
            ("tls.key", pem("gateway.key")),
            ("ca.crt", pem("ca.crt")),
        ]),
    );
    let mut images = BTreeMap::new();
    images.insert(
        "ghcr.io/immersiverse/auth-service".to_owned(),
        (
            "/usr/local/bin/auth-service".to_owned(),
            crate::support::service_bin(),
        ),
    );
    images.insert(
        "envoyproxy/envoy-distroless".to_owned(),
        ("/usr/local/bin/envoy".to_owned(), envoy_binary()),
    );
    let cluster = Cluster {
        docs,
        namespace,
        secrets,
        images,
        hosts: vec![
            "auth-service".into(),
            "api-backend".into(),
            "kafka-bootstrap.kafka.svc.cluster.local".into(),
            "otel-collector.observability.svc.cluster.local".into(),
        ],
    };

    // 1. The server starts before the migrations: it waits, not serving.
    let server_volumes = PodVolumes::new();
    let mut server = cluster.start(
        "Deployment",
        "auth-service",
        "auth-service",
        &server_volumes,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.assert_running();
    assert_eq!(
        health(50052, "").await,
        None,
        "nothing serves before the schema"
    );
    assert!(
        server.log().contains("waiting for schema migrations"),
        "{}",
        server.log()
    );

    // 2. The migrations Job, exactly as its spec says.
    let job_volumes = PodVolumes::new();
    let mut job = cluster.start("Job", "auth-service-migrate", "migrate", &job_volumes);
    assert!(job.wait(Duration::from_secs(60)).await, "{}", job.log());
    assert!(
        job.log().contains("schema migrations applied"),
        "{}",
        job.log()
    );

    // 3. The server becomes ready, and every probe it declares passes.
    until("the server becomes ready", &mut server, || async {
        health(50052, "immersiverse.auth.v1.AuthService").await == Some(ServingStatus::Serving)
    })
    .await;
    assert_eq!(
        cluster
            .probe_all("Deployment", "auth-service", "auth-service")
            .await,
        3
    );

    // 4. Every port the Service names: gRPC over mTLS, then HTTP.
    let service = object(&cluster.docs, "Service", "auth-service");
    let mut named = Vec::new();
    for port in list(&service["spec"]["ports"]) {
        let target = cluster.port(
            "Deployment",
            "auth-service",
            "auth-service",
            &port["targetPort"],
        );
        named.push(str_of(&port["name"]).to_owned());
        match str_of(&port["name"]) {
            "grpc" => {
                let mut client = grpc_client(&pki, "gateway", target).await;
                client
                    .create_user(pb::CreateUserRequest {
                        email: "kube@example.com".into(),
                        username: "kube".into(),
                        password: PASSWORD.into(),
                    })
                    .await
                    .expect("sign-up over the Service's gRPC port");
                let login = client
                    .login(pb::LoginRequest {
                        login: "kube".into(),
                        password: PASSWORD.into(),
                        ..Default::default()
                    })
                    .await
                    .expect("login")
                    .into_inner();
                assert_eq!(kid_of(&login.access_token), first_kid);
            }
            "http" => {
                let (status, jwks) = http_get(local(target), "/.well-known/jwks.json").await;
                assert_eq!(status, 200);
                assert!(jwks.contains(&first_kid), "{jwks}");
            }
            other => panic!("the test does not know how to call Service port {other}"),
        }
    }
    assert_eq!(named, ["grpc", "http"]);
    // Every container port is served; /metrics only on its own port (the
    // network policy lets monitoring, and only monitoring, reach it).
    let server_spec = &object(&cluster.docs, "Deployment", "auth-service")["spec"]["template"]["spec"]
        ["containers"][0];
    for port in list(&server_spec["ports"]) {
        let n = port["containerPort"].as_u64().unwrap() as u16;
        tokio::net::TcpStream::connect(local(n))
            .await
            .unwrap_or_else(|e| panic!("container port {port}: {e}"));
    }
    let metrics = cluster.port(
        "Deployment",
        "auth-service",
        "auth-service",
        &Value::from("metrics"),
    );
    let (status, body) = http_get(local(metrics), "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("grpc_"), "{body}");
    assert_eq!(http_get(local(8081), "/metrics").await.0, 404);

    // The README's first call in a cluster (after `kubectl port-forward`):
    // scripts/grpc-call with a client certificate, no grpcurl.
    let descriptor = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(descriptor.path(), pb::FILE_DESCRIPTOR_SET).unwrap();
    let output = Command::new(format!("{ROOT}/scripts/grpc-call"))
        .arg("--descriptor")
        .arg(descriptor.path())
        .args(["--ca", &pki.path("ca.crt")])
        .args(["--cert", &pki.path("gateway.crt")])
        .args(["--key", &pki.path("gateway.key")])
        .args(["--server-name", "auth-service", "127.0.0.1:50051"])
        .args([
            "immersiverse.auth.v1.AuthService/Login",
            &serde_json::json!({ "login": "kube", "password": PASSWORD }).to_string(),
        ])
        .output()
        .expect("scripts/grpc-call runs (python3-grpcio, python3-protobuf)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(answer["access_token"].as_str().is_some(), "{answer}");

    // 5. The gateway pod: its init container writes the descriptor set,
    // Envoy serves the shipped gateway.yaml, and a REST call goes through
    // ext_authz and the transcoder to the server over mTLS.
    let gateway_volumes = PodVolumes::new();
    let mut init = cluster.start(
        "Deployment",
        "envoy-gateway",
        "descriptor",
        &gateway_volumes,
    );
    assert!(init.wait(Duration::from_secs(30)).await, "{}", init.log());
    let mut gateway = cluster.start("Deployment", "envoy-gateway", "envoy", &gateway_volumes);
    until("the gateway answers its probe", &mut gateway, || async {
        tokio::net::TcpStream::connect(local(8080)).await.is_ok()
            && http_get(local(8080), "/healthz").await.0 == 200
    })
    .await;
    assert_eq!(
        cluster
            .probe_all("Deployment", "envoy-gateway", "envoy")
            .await,
        2
    );
    let gateway_service = object(&cluster.docs, "Service", "envoy-gateway");
    let gateway_port = cluster.port(
        "Deployment",
        "envoy-gateway",
        "envoy",
        &gateway_service["spec"]["ports"][0]["targetPort"],
    );
    let body = serde_json::json!({ "login": "kube", "password": PASSWORD }).to_string();
    // Envoy resolves auth-service by DNS (STRICT_DNS) shortly after start.
    let deadline = Instant::now() + Duration::from_secs(60);
    let login = loop {
        gateway.assert_running();
        let r = http(
            local(gateway_port),
            "POST",
            "/v1/auth/login",
            &[],
            Some(&body),
        )
        .await;
        if r.status == 200 {
            break r;
        }
        assert!(Instant::now() < deadline, "{r:?}\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let login: Value = serde_json::from_str(&login.body).unwrap();
    assert!(login["access_token"].as_str().is_some(), "{login}");
    let r = http(local(gateway_port), "GET", "/v1/me", &[], None).await;
    assert_eq!(r.status, 401, "ext_authz guards the API: {r:?}");

    // 6. The event worker, as its spec says (no broker here: it starts,
    // answers its probes and keeps retrying).
    let events_volumes = PodVolumes::new();
    let mut events = cluster.start(
        "Deployment",
        "auth-service-events",
        "events",
        &events_volumes,
    );
    until("the event worker answers /healthz", &mut events, || async {
        http_get_quiet(local(8082), "/healthz").await == Some(200)
    })
    .await;
    assert_eq!(
        cluster
            .probe_all("Deployment", "auth-service-events", "events")
            .await,
        2
    );
    drop(events);

    // 7. Key rotation without SIGHUP: the Secret is updated in place (the
    // kubelet's atomic ..data switch); the server publishes the new key at
    // its next poll and signs with it from its activation time.
    let (second_kid, second_key) =
        signing_key(time::OffsetDateTime::now_utc() + time::Duration::seconds(3));
    server_volumes.project(
        "signing-keys",
        &files(&[
            (&format!("{first_kid}.pem"), first_key),
            (&format!("{second_kid}.pem"), second_key),
        ]),
        0o440,
        65532,
    );
    until("the new key is published", &mut server, || async {
        http_get(local(8081), "/.well-known/jwks.json")
            .await
            .1
            .contains(&second_kid)
    })
    .await;
    let mut client = grpc_client(&pki, "gateway", 50051).await;
    until("the new key signs", &mut server, || {
        let mut client = client.clone();
        let second_kid = second_kid.clone();
        async move {
            let login = client
                .login(pb::LoginRequest {
                    login: "kube".into(),
                    password: PASSWORD.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            kid_of(&login.access_token) == second_kid
        }
    })
    .await;

    // 8. Termination: NOT_SERVING at once while calls still succeed, then a
    // clean exit within the pod's grace period.
    let grace = object(&cluster.docs, "Deployment", "auth-service")["spec"]["template"]["spec"]
        ["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    server.signal("TERM");
    until("NOT_SERVING after SIGTERM", &mut server, || async {
        health(50052, "").await == Some(ServingStatus::NotServing)
    })
    .await;
    let refused = client
        .validate_token(pb::ValidateTokenRequest {
            token: "not.a.token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::Unauthenticated,
        "still answering during the shutdown delay: {refused:?}"
    );
    assert!(
        server.wait(Duration::from_secs(grace)).await,
        "{}",
        server.log()
    );
}

/// Status of a GET, or None when nothing answers yet.
async fn http_get_quiet(addr: SocketAddr, path: &str) -> Option<u16> {
    tokio::net::TcpStream::connect(addr).await.ok()?;
    Some(http_get(addr, path).await.0)
}

/// The effective user id, read from /proc (no unsafe code).
fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap()
}

#[test]
fn the_envoy_config_maps_are_the_shipped_files() {
    for (dir, map, file, workload) in [
        (
            "k8s/overlays/production",
            "envoy-gateway-config",
            "gateway.yaml",
            "envoy-gateway",
        ),
        (
            "k8s/overlays/edge",
            "envoy-edge-config",
            "edge.yaml",
            "envoy-gateway",
        ),
        (
            "k8s/examples/sidecar",
            "envoy-sidecar-config",
            "sidecar.yaml",
            "example-app",
        ),
    ] {
        let docs = render(dir);
        let config_map = object(&docs, "ConfigMap", map);
        let shipped = std::fs::read_to_string(format!("{ROOT}/envoy/{file}")).unwrap();
        assert_eq!(
            str_of(&config_map["data"][file]),
            shipped,
            "{dir}: {map} is envoy/{file}"
        );
        // The pod mounts that ConfigMap where Envoy's -c looks.
        let pod = &object(&docs, "Deployment", workload)["spec"]["template"]["spec"];
        let envoy = list(&pod["containers"])
            .iter()
            .find(|c| c["name"] == "envoy")
            .unwrap();
        let args: Vec<&str> = list(&envoy["args"]).iter().map(str_of).collect();
        let config_path = args[args.iter().position(|a| *a == "-c").unwrap() + 1];
        let volume = list(&pod["volumes"])
            .iter()
            .find(|v| v["configMap"]["name"] == config_map["metadata"]["name"])
            .expect("a volume of the generated ConfigMap");
        let mount = list(&envoy["volumeMounts"])
            .iter()
            .find(|m| m["name"] == volume["name"])
            .unwrap();
        assert_eq!(
            config_path,
            format!("{}/{file}", str_of(&mount["mountPath"]))
        );
    }
}

#[test]
fn the_istio_overlay_sends_its_custom_policy_to_the_declared_provider() {
    let docs = render("k8s/overlays/istio");
    let mesh: Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{ROOT}/k8s/overlays/istio/mesh-config.yaml")).unwrap(),
    )
    .unwrap();
    let provider = &mesh["spec"]["meshConfig"]["extensionProviders"][0];
    let custom = docs
        .iter()
        .find(|d| d["kind"] == "AuthorizationPolicy" && d["spec"]["action"] == "CUSTOM")
        .expect("a CUSTOM AuthorizationPolicy");
    assert_eq!(custom["spec"]["provider"]["name"], provider["name"]);
    let server = object(&docs, "Deployment", "auth-service");
    let namespace = str_of(&server["metadata"]["namespace"]);
    let grpc = &provider["envoyExtAuthzGrpc"];
    assert_eq!(
        str_of(&grpc["service"]),
        format!("auth-service.{namespace}.svc.cluster.local")
    );
    let service = object(&docs, "Service", "auth-service");
    assert!(
        list(&service["spec"]["ports"])
            .iter()
            .any(|p| p["name"] == "grpc" && p["port"] == grpc["port"]),
        "the provider's port is the Service's gRPC port"
    );
    // Istio's sidecar terminates mTLS: the server has no TLS of its own
    // (it names its callers by the sidecar's x-forwarded-client-cert), and
    // the Envoy gateway (Istio's ingress gateway replaces it) is gone.
    let env = &server["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        !list(env).iter().any(|e| {
            let name = str_of(&e["name"]);
            name.starts_with("AUTH_TLS__") && name != "AUTH_TLS__XFCC_FROM"
        }),
        "{env}"
    );
    assert!(!docs.iter().any(|d| {
        d["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("envoy-gateway"))
    }));
}
