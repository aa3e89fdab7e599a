//! Trace context: whether traces are on, the head sampling decision, W3C
//! propagation, and the spans the domain and the Kafka side open inside a
//! traced call. The exporter itself is installed by the binary
//! (`auth-service`'s `telemetry::init`), which calls [`configure`].

use std::sync::OnceLock;

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Turns traces on or off for this process and sets the sampling ratio
/// for calls that arrive without a `traceparent`.
pub fn configure(traces_on: bool, sampling_ratio: f64) {
    TRACES_ON.store(traces_on, std::sync::atomic::Ordering::Relaxed);
    SAMPLING_RATIO.store(
        sampling_ratio.to_bits(),
        std::sync::atomic::Ordering::Relaxed,
    );
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
pub fn propagator() -> &'static TraceContextPropagator {
    static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
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
        if $crate::trace::in_traced_call() {
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
