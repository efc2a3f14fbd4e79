//! Tracing setup shared by the Otherix binaries: human-readable or JSON logs,
//! OTLP span export when an endpoint is configured (the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), and W3C trace context in and out of HTTP
//! and gRPC headers.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, filter::LevelFilter};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (development).
    #[default]
    Text,
    /// One JSON object per line (production).
    Json,
}

/// Telemetry settings.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` of exported spans.
    pub service_name: String,
    /// Log filter, e.g. `info` or `otherix_api=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
    /// Log format.
    pub format: LogFormat,
    /// OTLP/gRPC endpoint; `None` exports nothing.
    pub otlp_endpoint: Option<String>,
}

impl TelemetryConfig {
    /// Settings for `service_name`, with the OTLP endpoint from the standard
    /// environment variables.
    pub fn from_env(service_name: &str, level: &str, format: LogFormat) -> Self {
        let otlp_endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .ok()
            .filter(|s| !s.is_empty());
        TelemetryConfig { service_name: service_name.to_owned(), level: level.to_owned(), format, otlp_endpoint }
    }
}

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("invalid log level {0:?}")]
    Filter(String),
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber is already installed.
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the exporter alive; flushes and shuts it down on drop.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports every finished span now.
    pub fn flush(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.force_flush()
        {
            tracing::warn!(error = %e, "flushing spans failed");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogOutput {
    /// Standard output, as `tracing_subscriber` does by default (otherix-api).
    #[default]
    Stdout,
    /// Standard error, with colours only when it is a terminal (otherix-agent).
    Stderr,
}

/// Installs the global subscriber, logging to stdout. Call inside the tokio
/// runtime (the OTLP exporter runs on it).
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    init_with_output(config, LogOutput::Stdout)
}

/// [`init`], with log lines going to `output`.
pub fn init_with_output(config: &TelemetryConfig, output: LogOutput) -> Result<TelemetryGuard, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v).map_err(|_| TelemetryError::Filter(v))?,
        _ => EnvFilter::try_new(&config.level).map_err(|_| TelemetryError::Filter(config.level.clone()))?,
    };
    let fmt = match (config.format, output) {
        (LogFormat::Text, LogOutput::Stdout) => tracing_subscriber::fmt::layer().with_target(true).boxed(),
        (LogFormat::Json, LogOutput::Stdout) => {
            tracing_subscriber::fmt::layer().json().flatten_event(true).with_current_span(true).boxed()
        }
        (LogFormat::Text, LogOutput::Stderr) => tracing_subscriber::fmt::layer()
            .with_target(true)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
        (LogFormat::Json, LogOutput::Stderr) => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // Per-layer filters: a global `warn` filter would starve the exporter.
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let Some(endpoint) = &config.otlp_endpoint else {
        registry.try_init().map_err(|_| TelemetryError::AlreadyInstalled)?;
        return Ok(TelemetryGuard { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(TelemetryError::Exporter)?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(config.service_name.clone()).build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let tracer = provider.tracer("otherix");
    let otel = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(LevelFilter::INFO);
    registry.with(otel).try_init().map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider: Some(provider) })
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value)) {
            self.0.insert(k, v);
        }
    }
}

/// Makes `span` a child of the W3C trace context in `headers` (`traceparent`,
/// `tracestate`), if there is one. gRPC metadata are HTTP/2 headers, so this
/// serves gRPC, grpc-web and REST alike.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if headers.contains_key("traceparent") {
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(cx);
    }
}

/// Writes the trace context of `span` into outgoing headers.
pub fn inject_headers(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}
