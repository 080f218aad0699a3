//! OpenTelemetry export and trace context, shared by sidecars and gateways.
//!
//! [`Otlp`] holds the OpenTelemetry SDK's providers for traces, metrics and logs, each
//! exporting over OTLP (opentelemetry-otlp) by gRPC or HTTP/protobuf to one collector, in
//! batches on the tokio runtime, so nothing on a request's path waits for the collector.
//! Traces are sampled parent-first: a request that arrives sampled (or not) stays so; one
//! that starts here is sampled at the configured percentage.
//!
//! [`TraceContext`] reads the caller's context from W3C `traceparent`/`tracestate`, or
//! from B3 (single `b3` header or `x-b3-*`) when there is no `traceparent`, and writes a
//! hop's own context back in the same forms.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");

/// How OTLP reaches the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (usually port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (usually port 4318; `/v1/traces` and the like are
    /// appended to the endpoint).
    HttpProtobuf,
}

impl Protocol {
    /// The name OpenTelemetry's `OTEL_EXPORTER_OTLP_PROTOCOL` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" | "http" => Ok(Protocol::HttpProtobuf),
            other => Err(format!(
                "OTLP protocol `{other}`: expected `grpc` or `http/protobuf`"
            )),
        }
    }
}

/// Where and how to export, and what this process is called there.
#[derive(Clone, Debug)]
pub struct Config {
    /// `http://collector:4317` (gRPC) or `http://collector:4318` (HTTP); `https://` for a
    /// collector behind TLS, whose certificate is checked against `ca_pem`.
    pub endpoint: String,
    pub protocol: Protocol,
    /// Sent with every export (an API key, a tenant).
    pub headers: Vec<(String, String)>,
    /// How often metrics are exported.
    pub metrics_interval: Duration,
    /// Percentage of traces started here that are sampled (0 to 100).
    pub sampling: f64,
    /// OpenTelemetry resource attributes: `service.name` and the like.
    pub resource: Vec<(String, String)>,
    /// How long one export may take; the exporter's default (10 s) when `None`.
    pub timeout: Option<Duration>,
    /// For OTLP/HTTP: `endpoint` is the signal's whole URL (a provider's `http.path`),
    /// rather than a base that `/v1/traces` and the like are appended to.
    pub exact_url: bool,
    /// For an `https://` endpoint: the PEM roots its certificate must chain to
    /// (`OTEL_EXPORTER_OTLP_CERTIFICATE`); the system's trust store when `None`.
    pub ca_pem: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            protocol: Protocol::Grpc,
            headers: Vec::new(),
            metrics_interval: Duration::from_secs(15),
            sampling: 1.0,
            resource: Vec::new(),
            timeout: None,
            exact_url: false,
            ca_pem: None,
        }
    }
}

impl Config {
    /// The collector a provider of the mesh config names, as a proxy's pushed telemetry
    /// policy carries it; `resource` names the proxy.
    pub fn for_collector(
        c: &isthmus_proto::discovery::OtlpCollector,
        sampling: f64,
        resource: &[(String, String)],
    ) -> Result<Config, OtlpError> {
        let protocol = c.protocol.parse().map_err(|reason| OtlpError::Endpoint {
            endpoint: c.endpoint.clone(),
            reason,
        })?;
        Ok(Config {
            endpoint: c.endpoint.clone(),
            protocol,
            headers: c
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            sampling,
            resource: resource.to_vec(),
            timeout: (c.timeout_ms > 0).then(|| Duration::from_millis(c.timeout_ms.into())),
            exact_url: true,
            ..Config::default()
        })
    }

    /// This config for one proxy: its `service.name`, its role and cluster, and `more`
    /// resource attributes.
    pub fn for_proxy(
        &self,
        service: String,
        role: &str,
        cluster: &str,
        more: impl IntoIterator<Item = (&'static str, String)>,
    ) -> Config {
        let mut c = self.clone();
        c.resource.extend(
            [
                ("service.name", service),
                ("isthmus.role", role.to_owned()),
                ("isthmus.cluster", cluster.to_owned()),
            ]
            .into_iter()
            .chain(more)
            .map(|(k, v)| (k.to_owned(), v)),
        );
        c
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("starting the OTLP export thread: {0}")]
    Runtime(String),
    #[error("OTLP endpoint `{endpoint}`: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("the OTLP collector's CA certificate: {0}")]
    Certificate(String),
    #[error("building the OTLP {signal} exporter for {endpoint}: {source}")]
    Exporter {
        signal: &'static str,
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// How access logs are written to standard output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AccessLogFormat {
    /// None to standard output (OTLP, when configured, still gets them).
    #[default]
    Off,
    /// Envoy's default text format, as Istio configures it.
    Text,
    /// One JSON object per line, with Istio's field names.
    Json,
}

impl std::str::FromStr for AccessLogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "off" | "" => Ok(Self::Off),
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "access log format `{other}`: expected off, text or json"
            )),
        }
    }
}

/// A proxy's telemetry beyond Prometheus: OTLP export and access logs.
#[derive(Clone, Debug, Default)]
pub struct TelemetryConfig {
    /// Traces, metrics and access logs over OTLP; none when `None`.
    pub otlp: Option<Config>,
    pub access_log: AccessLogFormat,
}

/// The SDK providers exporting to one collector. Dropping it stops nothing; call
/// [`Otlp::shutdown`] to flush.
#[derive(Clone)]
pub struct Otlp {
    pub traces: SdkTracerProvider,
    pub metrics: SdkMeterProvider,
    pub logs: SdkLoggerProvider,
}

impl Otlp {
    /// Builds the exporters. Their batching and exporting run on a runtime of their own,
    /// on one thread: exports never take a worker from the proxy, and the SDK's blocking
    /// flush on drop never waits for a worker it is blocking. Connecting is lazy: a
    /// collector that is down costs failed exports (logged by the SDK), never a failed
    /// start.
    pub fn start(config: &Config) -> Result<Self, OtlpError> {
        let traces = tracer_provider(config, true)?;
        let logs = logger_provider(config)?;
        let _on_it = export_runtime()?.enter();
        let resource = resource(config);
        use opentelemetry_sdk::runtime::Tokio;
        let reader =
            opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader::builder(
                metric_exporter(config)?,
                Tokio,
            )
            .with_interval(config.metrics_interval)
            .build();
        let metrics = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        Ok(Self {
            traces,
            metrics,
            logs,
        })
    }

    /// Exports what is buffered and stops; waits on a blocking thread, not the runtime.
    pub async fn shutdown(self) {
        let _ = tokio::task::spawn_blocking(move || {
            let _ = self.traces.shutdown();
            let _ = self.metrics.shutdown();
            let _ = self.logs.shutdown();
        })
        .await;
    }
}

/// The runtime every export of this process runs on: one thread of its own, so exports
/// never take a worker from the proxy, and the SDK's blocking flush when a provider is
/// dropped never waits for a worker it is blocking.
fn export_runtime() -> Result<tokio::runtime::Handle, OtlpError> {
    // One for the process, made under a lock: two proxies of one process (tests, the
    // demo) configuring telemetry at once must not both make one, since dropping the
    // spare inside an async task panics. The runtime is built on its own thread and never
    // leaves it, so no path drops one here.
    static RUNTIME: std::sync::Mutex<Option<tokio::runtime::Handle>> = std::sync::Mutex::new(None);
    let mut slot = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = slot.as_ref() {
        return Ok(h.clone());
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("isthmus-otlp".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => {
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                }
            }
        })
        .map_err(|e| OtlpError::Runtime(e.to_string()))?;
    let handle = rx
        .recv()
        .map_err(|e| OtlpError::Runtime(e.to_string()))?
        .map_err(OtlpError::Runtime)?;
    *slot = Some(handle.clone());
    Ok(handle)
}

fn resource(config: &Config) -> Resource {
    Resource::builder()
        .with_attributes(
            config
                .resource
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build()
}

/// Spans to the collector of `config`, sampled parent-first at its percentage. Without
/// `report`, spans are made (their context travels on) but not exported.
pub fn tracer_provider(config: &Config, report: bool) -> Result<SdkTracerProvider, OtlpError> {
    validate(&config.endpoint)?;
    let _on_it = export_runtime()?.enter();
    let mut b = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            (config.sampling / 100.0).clamp(0.0, 1.0),
        ))))
        .with_resource(resource(config));
    if report {
        b = b.with_span_processor(
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                span_exporter(config)?,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build(),
        );
    }
    Ok(b.build())
}

/// Log records to the collector of `config`.
pub fn logger_provider(config: &Config) -> Result<SdkLoggerProvider, OtlpError> {
    validate(&config.endpoint)?;
    let _on_it = export_runtime()?.enter();
    Ok(SdkLoggerProvider::builder()
        .with_log_processor(
            opentelemetry_sdk::logs::log_processor_with_async_runtime::BatchLogProcessor::builder(
                log_exporter(config)?,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build(),
        )
        .with_resource(resource(config))
        .build())
}

fn validate(endpoint: &str) -> Result<(), OtlpError> {
    let bad = |reason: &str| OtlpError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: http::Uri = endpoint.parse().map_err(|_| bad("not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("expected `http://host:port` or `https://host:port`")),
    }
    uri.host().ok_or_else(|| bad("no host"))?;
    Ok(())
}

fn is_https(config: &Config) -> bool {
    config.endpoint.starts_with("https://")
}

/// The roots a collector's certificate must chain to: the configured ones, else the
/// system's.
fn collector_roots(config: &Config) -> Result<rustls::RootCertStore, OtlpError> {
    match &config.ca_pem {
        Some(pem) => crate::tls::root_store(pem).map_err(|e| OtlpError::Certificate(e.to_string())),
        None => Ok((*crate::tls::system_roots()).clone()),
    }
}

/// TLS for OTLP/gRPC to an `https://` collector.
fn grpc_tls(config: &Config) -> Result<tonic::transport::ClientTlsConfig, OtlpError> {
    let tls = tonic::transport::ClientTlsConfig::new();
    Ok(match &config.ca_pem {
        Some(pem) => {
            // Checked here so that a bad file is named at start, not at the first export.
            collector_roots(config)?;
            tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
        }
        None => tls.with_native_roots(),
    })
}

type HttpsConnector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// An HTTP client for OTLP/HTTP to an `https://` collector: HTTP/1.1 over TLS 1.2 or 1.3
/// (ring, as every TLS connection of the mesh), checked against [`collector_roots`].
fn https_client(
    config: &Config,
) -> Result<opentelemetry_http::hyper::HyperClient<HttpsConnector>, OtlpError> {
    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| OtlpError::Certificate(e.to_string()))?
        .with_root_certificates(collector_roots(config)?)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(opentelemetry_http::hyper::HyperClient::new(
        connector,
        config.timeout.unwrap_or(Duration::from_secs(10)),
        None,
    ))
}

/// `endpoint` + the signal's path, for OTLP/HTTP.
fn http_url(config: &Config, path: &str) -> String {
    if config.exact_url {
        return config.endpoint.clone();
    }
    format!("{}{path}", config.endpoint.trim_end_matches('/'))
}

fn metadata(config: &Config) -> tonic::metadata::MetadataMap {
    let mut map = http::HeaderMap::new();
    for (k, v) in &config.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v)) {
            map.insert(k, v);
        }
    }
    tonic::metadata::MetadataMap::from_headers(map)
}

fn headers(config: &Config) -> std::collections::HashMap<String, String> {
    config.headers.iter().cloned().collect()
}

fn failed<'a>(
    signal: &'static str,
    config: &'a Config,
) -> impl FnOnce(opentelemetry_otlp::ExporterBuildError) -> OtlpError + 'a {
    move |source| OtlpError::Exporter {
        signal,
        endpoint: config.endpoint.clone(),
        source,
    }
}

/// `fn $name(config) -> Result<$exporter, OtlpError>`: the signal's exporter over gRPC,
/// or over HTTP at `endpoint` + `$path`. (The SDK's three builders share no trait.)
macro_rules! exporter {
    ($name:ident, $exporter:ty, $path:literal, $signal:literal) => {
        fn $name(config: &Config) -> Result<$exporter, OtlpError> {
            let b = <$exporter>::builder();
            match config.protocol {
                Protocol::Grpc => {
                    let mut b = b
                        .with_tonic()
                        .with_endpoint(&config.endpoint)
                        .with_metadata(metadata(config));
                    if is_https(config) {
                        b = b.with_tls_config(grpc_tls(config)?);
                    }
                    match config.timeout {
                        Some(t) => b.with_timeout(t),
                        None => b,
                    }
                    .build()
                }
                Protocol::HttpProtobuf => {
                    let mut b = b
                        .with_http()
                        .with_endpoint(http_url(config, $path))
                        .with_headers(headers(config));
                    if is_https(config) {
                        b = b.with_http_client(https_client(config)?);
                    }
                    match config.timeout {
                        Some(t) => b.with_timeout(t),
                        None => b,
                    }
                    .build()
                }
            }
            .map_err(failed($signal, config))
        }
    };
}

exporter!(
    span_exporter,
    opentelemetry_otlp::SpanExporter,
    "/v1/traces",
    "trace"
);
exporter!(
    metric_exporter,
    opentelemetry_otlp::MetricExporter,
    "/v1/metrics",
    "metric"
);
exporter!(
    log_exporter,
    opentelemetry_otlp::LogExporter,
    "/v1/logs",
    "log"
);

/// A caller's trace context, as it came, and in which form.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceContext {
    pub span: SpanContext,
    /// The caller used B3 headers (and no `traceparent`): the next hop gets B3 too.
    pub b3: bool,
}

impl TraceContext {
    /// The caller's context: `traceparent` (with `tracestate`), else B3. Malformed or
    /// all-zero ids are no context at all (a new trace starts here).
    pub fn extract(headers: &HeaderMap) -> Option<Self> {
        if let Some(tp) = headers.get(TRACEPARENT) {
            let state = headers
                .get(TRACESTATE)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default();
            return parse_traceparent(tp.as_bytes(), state).map(|span| Self { span, b3: false });
        }
        let b3 = match headers.get(B3) {
            Some(single) => parse_b3_single(single.to_str().ok()?),
            None => parse_b3_multi(headers),
        };
        b3.map(|span| Self { span, b3: true })
    }

    /// Writes `span` as the context the next hop continues: `traceparent` and
    /// `tracestate`, and B3 headers when the caller used B3.
    pub fn inject(span: &SpanContext, b3: bool, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, traceparent(span));
        let state = span.trace_state().header();
        match HeaderValue::from_str(&state) {
            Ok(v) if !state.is_empty() => {
                headers.insert(TRACESTATE, v);
            }
            _ => {
                headers.remove(TRACESTATE);
            }
        }
        if b3 {
            let sampled = if span.is_sampled() { "1" } else { "0" };
            headers.remove(B3);
            headers.remove(B3_PARENT);
            for (name, value) in [
                (B3_TRACE_ID, span.trace_id().to_string()),
                (B3_SPAN_ID, span.span_id().to_string()),
                (B3_SAMPLED, sampled.to_owned()),
            ] {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(name, v);
                }
            }
        }
    }
}

/// `00-<trace id>-<span id>-<flags>` of `span`.
pub fn traceparent(span: &SpanContext) -> HeaderValue {
    let text = format!(
        "00-{}-{}-{:02x}",
        span.trace_id(),
        span.span_id(),
        span.trace_flags().to_u8()
    );
    HeaderValue::from_str(&text).expect("hex digits and dashes")
}

/// W3C `traceparent`: version `00` exactly, or a later version read by its first four
/// fields (as the spec asks); `ff` and all-zero ids are invalid.
pub fn parse_traceparent(value: &[u8], state: TraceState) -> Option<SpanContext> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let later = version != "00";
    if version.len() != 2 || version == "ff" || (!later && parts.next().is_some()) {
        return None;
    }
    u8::from_str_radix(version, 16).ok()?;
    let trace = hex_id::<16>(trace).map(TraceId::from_bytes)?;
    let span = hex_id::<8>(span).map(SpanId::from_bytes)?;
    if flags.len() != 2 || trace == TraceId::INVALID || span == SpanId::INVALID {
        return None;
    }
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & 1);
    Some(SpanContext::new(trace, span, flags, true, state))
}

/// Lower-case hex of exactly `N` bytes.
fn hex_id<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A 64-bit B3 trace id is the low half of a 128-bit one.
fn b3_trace_id(s: &str) -> Option<TraceId> {
    match s.len() {
        32 => hex_id::<16>(s).map(TraceId::from_bytes),
        16 => {
            let low = hex_id::<8>(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(TraceId::from_bytes(id))
        }
        _ => None,
    }
}

fn b3_context(trace: &str, span: &str, sampled: Option<&str>) -> Option<SpanContext> {
    let trace = b3_trace_id(trace)?;
    let span = hex_id::<8>(span).map(SpanId::from_bytes)?;
    if trace == TraceId::INVALID || span == SpanId::INVALID {
        return None;
    }
    let flags = match sampled {
        Some("1" | "d" | "true") => TraceFlags::SAMPLED,
        _ => TraceFlags::default(),
    };
    Some(SpanContext::new(
        trace,
        span,
        flags,
        true,
        TraceState::default(),
    ))
}

/// `b3: <trace id>-<span id>[-<sampled>[-<parent span id>]]`.
fn parse_b3_single(v: &str) -> Option<SpanContext> {
    let mut parts = v.trim().split('-');
    let (trace, span) = (parts.next()?, parts.next()?);
    b3_context(trace, span, parts.next())
}

fn parse_b3_multi(headers: &HeaderMap) -> Option<SpanContext> {
    let get = |n: &HeaderName| headers.get(n).and_then(|v| v.to_str().ok());
    b3_context(get(&B3_TRACE_ID)?, get(&B3_SPAN_ID)?, get(&B3_SAMPLED))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(kv: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in kv {
            h.insert(*k, HeaderValue::from_str(v).expect("valid"));
        }
        h
    }

    #[test]
    fn w3c_context_is_read_and_written_back() {
        let h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "vendor=x"),
        ]);
        let ctx = TraceContext::extract(&h).expect("a context");
        assert_eq!(ctx.span.trace_id().to_string(), TRACE);
        assert_eq!(ctx.span.span_id().to_string(), SPAN);
        assert!(ctx.span.is_sampled() && !ctx.b3);
        let mut out = HeaderMap::new();
        TraceContext::inject(&ctx.span, false, &mut out);
        assert_eq!(out[TRACEPARENT], format!("00-{TRACE}-{SPAN}-01").as_str());
        assert_eq!(out[TRACESTATE], "vendor=x");
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for bad in [
            format!("00-{TRACE}-{SPAN}"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            "garbage".to_owned(),
        ] {
            let h = headers(&[("traceparent", &bad)]);
            assert_eq!(TraceContext::extract(&h), None, "{bad}");
        }
        // A later version is read by its known fields.
        let h = headers(&[("traceparent", &format!("01-{TRACE}-{SPAN}-00-more"))]);
        assert!(TraceContext::extract(&h).is_some());
    }

    #[test]
    fn b3_in_either_form_is_accepted_and_continued_as_b3() {
        let single = headers(&[("b3", &format!("{TRACE}-{SPAN}-1"))]);
        let ctx = TraceContext::extract(&single).expect("b3");
        assert!(ctx.b3 && ctx.span.is_sampled());
        assert_eq!(ctx.span.trace_id().to_string(), TRACE);
        let multi = headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "0"),
        ]);
        let ctx = TraceContext::extract(&multi).expect("b3");
        assert_eq!(
            ctx.span.trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert!(!ctx.span.is_sampled());
        let mut out = single.clone();
        TraceContext::inject(&ctx.span, true, &mut out);
        assert!(out.get("b3").is_none());
        assert_eq!(out["x-b3-spanid"], SPAN);
        assert_eq!(out["x-b3-sampled"], "0");
        assert!(out.contains_key("traceparent"));
    }

    #[test]
    fn endpoints_are_checked_before_anything_starts() {
        for bad in ["collector:4317", "http://", "ftp://x"] {
            assert!(validate(bad).is_err(), "{bad}");
        }
        assert!(validate("http://127.0.0.1:4317").is_ok());
        assert!(validate("https://collector.example:4317").is_ok());
    }

    #[test]
    fn a_collector_ca_file_that_is_not_pem_is_named_at_start() {
        let config = Config {
            endpoint: "https://collector.example:4318".into(),
            protocol: Protocol::HttpProtobuf,
            ca_pem: Some("not a certificate".into()),
            ..Config::default()
        };
        let e = tracer_provider(&config, true).expect_err("a bad CA file");
        assert!(e.to_string().contains("CA certificate"), "{e}");
        let grpc = Config {
            protocol: Protocol::Grpc,
            ..config
        };
        assert!(tracer_provider(&grpc, true).is_err());
    }
}
