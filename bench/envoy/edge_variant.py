#!/usr/bin/env python3
"""Writes a benchmark variant of the shipped envoy/edge.yaml, changed only as
the README's local run changes it (loopback addresses, plaintext to
auth-service) plus what the benchmark needs: its ports, /api/* answered 200
by Envoy's router (as in bench/envoy/noauth.yaml: the same "upstream" for
every variant), and the per-user bucket either off (`edge`) or large enough
never to refuse the benchmark's one user (`edge_limits`: its cost, not its
refusals).

`bench/run edge-cost` also takes parts away, to price each by the
instructions Envoy spends per request without it (WITHOUT, comma-separated):
`health` (the health_check filter), `normalise` (path normalisation),
`maps` (both deny-map filters). The claim copies are part of jwt_authn's
configuration, which auth-service pushes over ECDS, and are no longer taken
apart here (BENCHMARKS.md has their price from when this file held them).

Usage: edge_variant.py OUT PORT ADMIN GRPC_PORT HTTP_PORT DESCRIPTOR {edge|edge_limits} [WITHOUT]
"""
import re
import sys

out, port, admin, grpc, http, descriptor, mode = sys.argv[1:8]
without = set(filter(None, (sys.argv[8] if len(sys.argv) > 8 else "").split(",")))
s = open("envoy/edge.yaml").read()


def sub(old, new, count=1):
    global s
    assert s.count(old) >= count, old
    s = s.replace(old, new)


sub("port_value: 8080", f"port_value: {port}")
sub("port_value: 9901", f"port_value: {admin}")
sub("port_value: 50051", f"port_value: {grpc}")
sub("port_value: 8081", f"port_value: {http}")
sub("/etc/envoy/descriptor/auth_descriptor.pb", descriptor)
sub("address: 0.0.0.0", "address: 127.0.0.1")
sub("address: auth-service,", "address: 127.0.0.1,")
sub("address: api-backend,", "address: 127.0.0.1,")
s = re.sub(r"\n    # mTLS to auth-service.*?(?=\n    load_assignment:)", "", s, flags=re.S)
s = s.replace("\n    transport_socket: *auth_mtls", "")
sub('''              - match: { prefix: "/api/" }
                route: { cluster: backend, timeout: 15s }''', '''              - match: { prefix: "/api/" }
                direct_response: { status: 200, body: { inline_string: "ok" } }''')
bucket = "token_bucket: { max_tokens: 100, tokens_per_fill: 50, fill_interval: 1s }"
if mode == "edge_limits":
    sub(bucket, "token_bucket: { max_tokens: 1000000000, tokens_per_fill: 1000000000, fill_interval: 1s }")
elif mode == "edge":
    # Drop the /api/ route's local_ratelimit config: the filter passes.
    s, n = re.subn(r"\n                  # One bucket per user.*?retry-after, value: \"1\" \}\n",
                   "\n", s, count=1, flags=re.S)
    assert n == 1
else:
    sys.exit(f"unknown mode {mode}")


def drop_filter(name):
    """Removes the HTTP filter NAME and every per-route entry naming it."""
    global s
    s, n = re.subn(r"\n          - name: " + re.escape(name) + r"\n.*?(?=\n          - name: )", "", s,
                   count=1, flags=re.S)
    assert n == 1, name
    s = re.sub(r"\n +" + re.escape(name) + r": \*not_here", "", s)


if "claims" in without and "maps" not in without:
    sys.exit("`claims` only with `maps`")
for part in sorted(without):
    if part == "health":
        drop_filter("envoy.filters.http.health_check")
    elif part == "normalise":
        for line in ("          normalize_path: true\n", "          merge_slashes: true\n",
                     "          path_with_escaped_slashes_action: REJECT_REQUEST\n"):
            sub(line, "")
    elif part == "maps":
        drop_filter("immersiverse.auth.revocations")
        drop_filter("immersiverse.auth.revocations.recent")
    else:
        sys.exit(f"unknown part {part}")
open(out, "w").write(s)
