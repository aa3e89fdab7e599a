# syntax=docker/dockerfile:1
# The auth-service image: one static-enough binary on distroless (glibc,
# CA certificates, no shell), running as the non-root user 65532.
# Build: docker build -t ghcr.io/immersiverse/auth-service:0.1.0 .
# The build stage's steps are run outside a container by scripts/test
# (scripts/dockerfile-steps): no container engine runs on the CI machine.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# rdkafka builds librdkafka and OpenSSL from source (make, perl, gcc are in
# the rust image); protobuf is compiled by protox (pure Rust, no protoc).
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY proto proto
COPY migrations migrations
COPY src src
COPY bench/loadgen.rs bench/loadgen.rs
# The shipped binary carries no debug info or symbols (36 MB instead of
# 141 MB): both move to auth-service.debug, which the binary names
# (.gnu_debuglink) so gdb, perf and addr2line find it beside it.
RUN cargo build --release --locked --bin auth-service \
 && bin=${CARGO_TARGET_DIR:-target}/release/auth-service \
 && objcopy --only-keep-debug "$bin" "$bin.debug" \
 && objcopy --strip-all --add-gnu-debuglink="$bin.debug" "$bin"

# `docker build --target debuginfo -o debuginfo .` writes auth-service.debug,
# to keep with each release for symbolizing its backtraces and profiles.
FROM scratch AS debuginfo
COPY --from=build /src/target/release/auth-service.debug /auth-service.debug

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/auth-service /usr/local/bin/auth-service
USER 65532:65532
EXPOSE 50051 50052 8081 8082
ENTRYPOINT ["/usr/local/bin/auth-service"]
CMD ["serve"]
