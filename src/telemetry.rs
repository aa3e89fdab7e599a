//! Logs, metrics and traces.
//!
//! * Logs: `tracing` with `RUST_LOG` (default `info`), text or JSON.
//! * Metrics: the process-wide Prometheus recorder ([`metrics_handle`]).
//! * Traces: OpenTelemetry over OTLP/gRPC when `otel.endpoint` is set.
//!   [`GrpcTraceLayer`] opens one server span per gRPC call (AuthService,
//!   ext_authz, health), continuing the caller's W3C `traceparent`; spans
//!   are exported in batches from a bounded queue (full: dropped, never
//!   blocking a request). Inside a sampled call, `child_span!` opens
//!   children (hashing, Redis); the event worker's producer spans and the
//!   lifecycle consumer's spans continue the trace across Kafka. The current
//!   span's context goes into outbox events and outbound platform calls.

use std::{
    sync::OnceLock,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::{
    KeyValue,
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider},
};
use tonic::codegen::http;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{Config, LogFormat};

/// Installs the log subscriber (`RUST_LOG`, default `info`) without
/// traces. A second call (several apps in one test process) keeps the first.
pub fn init_tracing(format: LogFormat) {
    let _ = install(format, None);
}

/// The trace exporter, flushed by [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still queued (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "trace exporter shutdown");
        }
    }
}

/// Logs, and traces when `otel.endpoint` is set. Call inside the runtime.
pub fn init(config: &Config) -> anyhow::Result<Telemetry> {
    let provider = match &config.otel.endpoint {
        None => None,
        Some(endpoint) => {
            let otel = &config.otel;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_secs(5))
                .build()
                .context("otel.endpoint: building the OTLP exporter")?;
            let processor = BatchSpanProcessor::builder(exporter)
                .with_batch_config(
                    BatchConfigBuilder::default()
                        .with_max_queue_size(otel.max_queue_size)
                        .build(),
                )
                .build();
            let resource = Resource::builder()
                .with_service_name(otel.service_name.clone())
                .with_attributes(
                    otel.resource_attributes
                        .iter()
                        .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
                )
                .build();
            let provider = SdkTracerProvider::builder()
                .with_span_processor(processor)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    otel.sampling_ratio,
                ))))
                .with_resource(resource)
                .build();
            Some(provider)
        }
    };
    let _ = install(config.log_format, provider.clone());
    TRACES_ON.store(provider.is_some(), std::sync::atomic::Ordering::Relaxed);
    SAMPLING_RATIO.store(
        config.otel.sampling_ratio.to_bits(),
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(Telemetry { provider })
}

fn install(
    format: LogFormat,
    provider: Option<SdkTracerProvider>,
) -> Result<(), tracing_subscriber::util::TryInitError> {
    use tracing_subscriber::Layer as _;
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match provider {
        // Without traces: one global filter, as cheap as it gets.
        None => {
            let registry = tracing_subscriber::registry().with(filter());
            match format {
                LogFormat::Json => registry
                    .with(fmt::layer().json().with_target(false))
                    .try_init(),
                LogFormat::Text => registry.with(fmt::layer().with_target(false)).try_init(),
            }
        }
        // With traces: `RUST_LOG` filters the logs only; spans at info and
        // above are traced whatever the log level.
        Some(provider) => {
            let otel = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("auth-service"))
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
            let registry = tracing_subscriber::registry().with(otel);
            match format {
                LogFormat::Json => registry
                    .with(fmt::layer().json().with_target(false).with_filter(filter()))
                    .try_init(),
                LogFormat::Text => registry
                    .with(fmt::layer().with_target(false).with_filter(filter()))
                    .try_init(),
            }
        }
    }
}

static TRACES_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether traces are exported: without, no span is made on the hot paths.
pub fn traces_on() -> bool {
    TRACES_ON.load(std::sync::atomic::Ordering::Relaxed)
}

static SAMPLING_RATIO: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The head sampling decision for a call, made before any span exists so an
/// unsampled call costs nothing: a caller's `traceparent` decides by its
/// sampled flag; without one, `otel.sampling_ratio` does.
pub fn sampled(traceparent: Option<&str>) -> bool {
    if let Some(tp) = traceparent {
        // version-traceid-spanid-flags
        if let Some(flags) = tp.rsplit('-').next().filter(|f| f.len() == 2)
            && let Ok(flags) = u8::from_str_radix(flags, 16)
        {
            return flags & 1 == 1;
        }
    }
    let ratio = f64::from_bits(SAMPLING_RATIO.load(std::sync::atomic::Ordering::Relaxed));
    ratio >= 1.0 || (ratio > 0.0 && uniform() < ratio)
}

/// A uniform draw in [0, 1) from a per-thread xorshift64* (sampling only).
fn uniform() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut seed = [0u8; 8];
            let _ = getrandom::fill(&mut seed);
            u64::from_le_bytes(seed) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// W3C trace context propagation (`traceparent`, `tracestate`).
fn propagator() -> &'static TraceContextPropagator {
    static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Extracts a caller's trace context from `traceparent`/`tracestate`
/// values (the headers inside an ext_authz CheckRequest).
pub fn context_from(
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> Option<opentelemetry::Context> {
    struct Pairs<'a>(Option<&'a str>, Option<&'a str>);
    impl Extractor for Pairs<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            match key {
                "traceparent" => self.0,
                "tracestate" => self.1,
                _ => None,
            }
        }
        fn keys(&self) -> Vec<&str> {
            vec!["traceparent", "tracestate"]
        }
    }
    traceparent?;
    let cx = propagator().extract(&Pairs(traceparent, tracestate));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Whether the current span belongs to a traced call. Child spans
/// (hashing, Redis, Kafka) are opened only then: with traces on, a span
/// opened outside a sampled call would start a trace of its own, and would
/// cost an unsampled call the work the head sampling saved.
pub fn in_traced_call() -> bool {
    if !traces_on() {
        return false;
    }
    let current = tracing::Span::current();
    current
        .metadata()
        .is_some_and(|m| *m.level() <= tracing::Level::INFO)
        && current.context().span().span_context().is_sampled()
}

/// A child span of the current traced call, or `Span::none()` (see
/// [`in_traced_call`]). Takes `info_span!`'s arguments.
#[macro_export]
macro_rules! child_span {
    ($($arg:tt)+) => {
        if $crate::telemetry::in_traced_call() {
            ::tracing::info_span!($($arg)+)
        } else {
            ::tracing::Span::none()
        }
    };
}

/// Which side of a Kafka message a span stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaSide {
    /// The event worker sending an outbox event (a producer span).
    Send,
    /// The lifecycle consumer handling a message (a consumer span).
    Process,
}

/// A span for one Kafka message on `topic` by the OpenTelemetry messaging
/// conventions, continuing `traceparent`: the stored context of the call
/// that wrote the event, or the received message's header. `Span::none()`
/// unless traces are on and that context is sampled. Without a context a
/// `Process` span starts a trace at the sampling ratio; a `Send` span never
/// does (an event of an untraced call stays untraced). The caller records
/// `messaging.message.id` or `messaging.consumer.group.name`.
pub fn kafka_span(side: KafkaSide, topic: &str, traceparent: Option<&str>) -> tracing::Span {
    let traced = match (side, traceparent) {
        (KafkaSide::Send, None) => false,
        _ => sampled(traceparent),
    };
    if !traces_on() || !traced {
        return tracing::Span::none();
    }
    let (operation, kind) = match side {
        KafkaSide::Send => ("send", "producer"),
        KafkaSide::Process => ("process", "consumer"),
    };
    let span = tracing::info_span!(
        "kafka",
        otel.name = %format_args!("{operation} {topic}"),
        otel.kind = kind,
        messaging.system = "kafka",
        "messaging.operation.type" = operation,
        messaging.destination.name = topic,
        messaging.message.id = tracing::field::Empty,
        messaging.consumer.group.name = tracing::field::Empty,
    );
    if let Some(parent) = context_from(traceparent, None) {
        let _ = span.set_parent(parent);
    }
    span
}

/// The `traceparent` of the current span, when traces are on.
pub fn current_traceparent() -> Option<String> {
    if !traces_on() {
        return None;
    }
    traceparent_of(&tracing::Span::current())
}

/// The `traceparent` of `span`, when it is traced.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// One server span per gRPC call, named `<service>/<method>` with the RPC
/// semantic-convention attributes, continuing the caller's trace.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcTrace<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcTrace<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Off: nothing but this one load per call.
        if !traces_on()
            || !sampled(
                request
                    .headers()
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok()),
            )
        {
            return self.inner.call(request).instrument(tracing::Span::none());
        }
        let path = request.uri().path();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", path));
        let span = tracing::info_span!(
            "grpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        let parent = propagator().extract(&HeaderExtractor(request.headers()));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
        // Every log line inside the call carries the ids (JSON logs list the
        // current span's fields).
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            span.record("trace_id", tracing::field::display(sc.trace_id()));
            span.record("span_id", tracing::field::display(sc.span_id()));
        }
        self.inner.call(request).instrument(span)
    }
}

/// How often the recorder's upkeep runs (see [`metrics_handle`]).
pub const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// The process-wide Prometheus recorder. The `metrics` facade has one global
/// recorder per process, so it is installed once and shared.
///
/// Histogram samples are held raw until the recorder's upkeep folds them
/// into its buckets. A scrape runs upkeep, but without scrapes (or with a
/// slow scraper) every sample would stay, about 8 bytes per recorded call
/// for ever. A thread of its own runs upkeep every [`METRICS_UPKEEP`], so
/// the recorder's memory is bounded whether anyone scrapes or not.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Fine at the low end: ext_authz Check is judged in tens of µs.
            let buckets = [
                0.000_025, 0.000_05, 0.000_1, 0.000_15, 0.000_2, 0.000_3, 0.000_5, 0.001, 0.002_5,
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .expect("static buckets are valid")
                .install_recorder()
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle());
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(METRICS_UPKEEP);
                        upkeep.run_upkeep();
                    }
                });
            if let Err(error) = spawned {
                tracing::warn!(%error, "no metrics upkeep thread: histogram samples are folded only when scraped");
            }
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_recorder_has_an_upkeep_thread() {
        let _ = super::metrics_handle();
        // A new thread names itself once it runs: until then it shows its
        // parent's name, so look until it appears (or give up).
        let names = || -> Vec<String> {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|n| n.trim().to_owned())
                .collect()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !names().iter().any(|n| n == "metrics-upkeep") {
            assert!(
                std::time::Instant::now() < deadline,
                "threads: {:?}",
                names()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
