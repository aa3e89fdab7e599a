//! Logs, metrics and traces.
//!
//! * Logs: `tracing` with `RUST_LOG` (default `info`), text or JSON.
//! * Metrics: the process-wide Prometheus recorder ([`metrics_handle`]).
//! * Traces: OpenTelemetry over OTLP/gRPC when `otel.endpoint` is set.
//!   `auth_api::trace::GrpcTraceLayer` opens one server span per gRPC call (AuthService,
//!   ext_authz, health), continuing the caller's W3C `traceparent`; spans
//!   are exported in batches from a bounded queue (full: dropped, never
//!   blocking a request). Inside a sampled call, `child_span!` opens
//!   children (hashing, Redis); the event worker's producer spans and the
//!   lifecycle consumer's spans continue the trace across Kafka. The current
//!   span's context goes into outbox events and outbound platform calls.

use std::{sync::OnceLock, time::Duration};

use anyhow::Context as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider},
};
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
    auth_domain::trace::configure(provider.is_some(), config.otel.sampling_ratio);
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
