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
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY migrations migrations
COPY src src
COPY bench/loadgen.rs bench/loadgen.rs
RUN cargo build --release --locked --bin auth-service

# The binary's debug info (line tables), split out of it by the release
# profile: `docker build --target debuginfo -o debuginfo .` writes
# auth-service.dwp, to keep with the release for symbolizing its backtraces.
FROM scratch AS debuginfo
COPY --from=build /src/target/release/auth-service.dwp /auth-service.dwp

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/auth-service /usr/local/bin/auth-service
USER 65532:65532
EXPOSE 50051 50052 8081 8082
ENTRYPOINT ["/usr/local/bin/auth-service"]
CMD ["serve"]
