//! The mesh config's telemetry: its extension providers (`opentelemetry`, `envoyOtelAls`,
//! `envoyFileAccessLog`, `prometheus`), `defaultProviders`, and `accessLogFile` /
//! `accessLogEncoding` for Istio's built-in `envoy` provider, as users write them and as
//! admitted. Telemetry resources name these providers (see `telemetry.rs`).

use std::collections::BTreeMap;

use isthmus_proto::discovery as xds;
use serde::Deserialize;

use super::{ENVOY, PROMETHEUS};
use crate::config::validate::Checker;
use crate::config::Code;

/// `defaultProviders`.
#[derive(Debug, Clone, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DefaultProvidersSpec {
    #[serde(default)]
    pub tracing: Vec<String>,
    #[serde(default)]
    pub metrics: Vec<String>,
    #[serde(default)]
    pub access_logging: Vec<String>,
}

/// `extensionProviders[].opentelemetry`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct OpenTelemetrySpec {
    #[serde(default)]
    pub service: String,
    pub port: Option<i64>,
    pub max_tag_length: Option<u32>,
    pub http: Option<OtelHttpSpec>,
    pub grpc: Option<OtelGrpcSpec>,
    /// `resourceDetectors`, `dynatraceSampler`, ...: reported as ignored.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OtelHttpSpec {
    pub path: Option<String>,
    pub timeout: Option<String>,
    #[serde(default)]
    pub headers: Vec<HeaderSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OtelGrpcSpec {
    pub timeout: Option<String>,
    #[serde(default)]
    pub initial_metadata: Vec<HeaderSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
    /// Istio reads the value from the proxy's environment; not supported.
    pub env_name: Option<String>,
}

/// `extensionProviders[].envoyOtelAls`: access logs as OTLP log records, over gRPC.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OtelAlsSpec {
    #[serde(default)]
    pub service: String,
    pub port: Option<i64>,
    pub log_name: Option<String>,
    pub log_format: Option<LogFormatSpec>,
}

/// `extensionProviders[].envoyFileAccessLog`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileAccessLogSpec {
    pub path: Option<String>,
    pub log_format: Option<LogFormatSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LogFormatSpec {
    pub text: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
}

/// A telemetry provider of the mesh config, admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum Provider {
    /// `opentelemetry`: traces over OTLP.
    Tracing {
        collector: xds::OtlpCollector,
        max_tag_length: u32,
    },
    /// `envoyOtelAls`: access logs over OTLP.
    OtlpLogs(xds::OtlpCollector),
    /// `envoyFileAccessLog`, and the built-in `envoy`.
    File(xds::FileSink),
    Prometheus,
    /// A kind Isthmus does not export to (zipkin, datadog, stackdriver, ...).
    Unsupported(String),
}

/// The mesh config's telemetry, admitted.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MeshTelemetry {
    pub providers: BTreeMap<String, Provider>,
    pub default_tracing: Vec<String>,
    pub default_metrics: Vec<String>,
    pub default_access_logging: Vec<String>,
    /// `defaultConfig.tracing.sampling`.
    pub sampling: Option<f64>,
    /// Whether the mesh config says anything of telemetry (`defaultProviders`,
    /// `accessLogFile`): then the controller resolves telemetry for every workload.
    pub configured: bool,
}

impl MeshTelemetry {
    /// The provider `name`, with Istio's built-in ones.
    pub fn provider(&self, name: &str) -> Option<Provider> {
        if let Some(p) = self.providers.get(name) {
            return Some(p.clone());
        }
        match name {
            ENVOY => Some(Provider::File(self.envoy_file())),
            PROMETHEUS => Some(Provider::Prometheus),
            _ => None,
        }
    }

    fn envoy_file(&self) -> xds::FileSink {
        self.providers
            .get("\0envoy")
            .and_then(|p| match p {
                Provider::File(f) => Some(f.clone()),
                _ => None,
            })
            .unwrap_or_else(|| xds::FileSink {
                path: "/dev/stdout".into(),
                ..Default::default()
            })
    }
}

/// Host and port of a provider's `service` (`[namespace/]host`) and `port`.
fn endpoint_of(
    c: &mut Checker<'_>,
    field: &str,
    service: &str,
    port: Option<i64>,
) -> Option<(String, u16)> {
    let host = service.rsplit_once('/').map_or(service, |(_, h)| h);
    let mark = c.mark();
    if host.is_empty() {
        c.fail(
            Code::Missing,
            format!("{field}.service"),
            "the collector's host (`otel-collector.observability.svc.cluster.local`)",
        );
    } else if http::uri::Authority::try_from(host).is_err() || host.contains(':') {
        c.fail(
            Code::InvalidValue,
            format!("{field}.service"),
            format!("`{service}` is not a host name"),
        );
    }
    let port = match port {
        None => {
            c.fail(
                Code::Missing,
                format!("{field}.port"),
                "the collector's port",
            );
            None
        }
        Some(p) => c.port(&format!("{field}.port"), p),
    };
    if c.rejected_since(mark) {
        return None;
    }
    Some((host.to_owned(), port?))
}

fn timeout_of(c: &mut Checker<'_>, field: &str, t: &Option<String>) -> u32 {
    match t.as_deref().map(crate::config::parse_duration_ms) {
        None => 0,
        Some(Some(ms)) if ms > 0 => u32::try_from(ms).unwrap_or(u32::MAX),
        Some(_) => {
            c.fail(
                Code::InvalidValue,
                format!("{field}.timeout"),
                "not a positive duration like 5s or 500ms",
            );
            0
        }
    }
}

fn headers_of(c: &mut Checker<'_>, field: &str, list: &[HeaderSpec]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (i, h) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if h.env_name.is_some() {
            c.fail(
                Code::Ignored,
                format!("{f}.envName"),
                "values from the proxy's environment are not supported; give `value`",
            );
        }
        if http::HeaderName::from_bytes(h.name.as_bytes()).is_err()
            || http::HeaderValue::from_str(&h.value).is_err()
        {
            c.fail(Code::InvalidValue, f, "not a header name and value");
            continue;
        }
        out.insert(h.name.to_ascii_lowercase(), h.value.clone());
    }
    out
}

pub(in crate::config) fn opentelemetry(
    c: &mut Checker<'_>,
    field: &str,
    s: &OpenTelemetrySpec,
) -> Option<Provider> {
    for k in s.other.keys() {
        c.fail(
            Code::Ignored,
            format!("{field}.{k}"),
            "not acted on by Isthmus; ignored",
        );
    }
    let mark = c.mark();
    let (host, port) = endpoint_of(c, field, &s.service, s.port)?;
    let mut collector = xds::OtlpCollector {
        protocol: "grpc".into(),
        endpoint: format!("http://{host}:{port}"),
        ..Default::default()
    };
    match (&s.http, &s.grpc) {
        (Some(_), Some(_)) => c.fail(
            Code::InvalidValue,
            field,
            "an opentelemetry provider speaks either http or grpc",
        ),
        (Some(h), None) => {
            let path = h.path.clone().unwrap_or_else(|| "/v1/traces".into());
            let path = if path.starts_with('/') {
                path
            } else {
                format!("/{path}")
            };
            if http::uri::PathAndQuery::try_from(path.as_str()).is_err() {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.http.path"),
                    format!("`{path}` is not a URL path"),
                );
            }
            collector.protocol = "http/protobuf".into();
            collector.endpoint.push_str(&path);
            collector.timeout_ms = timeout_of(c, &format!("{field}.http"), &h.timeout);
            collector.headers = headers_of(c, &format!("{field}.http.headers"), &h.headers);
        }
        (None, Some(g)) => {
            collector.timeout_ms = timeout_of(c, &format!("{field}.grpc"), &g.timeout);
            collector.headers = headers_of(
                c,
                &format!("{field}.grpc.initialMetadata"),
                &g.initial_metadata,
            );
        }
        (None, None) => {}
    }
    (!c.rejected_since(mark)).then_some(Provider::Tracing {
        collector,
        max_tag_length: s.max_tag_length.unwrap_or(0),
    })
}

fn log_format(
    c: &mut Checker<'_>,
    field: &str,
    f: &Option<LogFormatSpec>,
    sink: &mut xds::FileSink,
) {
    let Some(f) = f else { return };
    match (&f.text, &f.labels) {
        (Some(_), Some(_)) => c.fail(
            Code::InvalidValue,
            format!("{field}.logFormat"),
            "a log format is `text` or `labels`, not both",
        ),
        (Some(text), None) => {
            if let Err(e) = crate::access_format::check(text) {
                c.fail(Code::InvalidValue, format!("{field}.logFormat.text"), e);
            }
            sink.text_format = text.clone();
        }
        (None, Some(labels)) => {
            for (k, v) in labels {
                if let Err(e) = crate::access_format::check(v) {
                    c.fail(
                        Code::InvalidValue,
                        format!("{field}.logFormat.labels.{k}"),
                        e,
                    );
                }
            }
            sink.json = true;
            sink.json_labels = labels.clone();
        }
        (None, None) => {}
    }
}

pub(in crate::config) fn otel_als(
    c: &mut Checker<'_>,
    field: &str,
    s: &OtelAlsSpec,
) -> Option<Provider> {
    let mark = c.mark();
    let (host, port) = endpoint_of(c, field, &s.service, s.port)?;
    let mut unused = xds::FileSink::default();
    log_format(c, field, &s.log_format, &mut unused);
    (!c.rejected_since(mark)).then(|| {
        Provider::OtlpLogs(xds::OtlpCollector {
            endpoint: format!("http://{host}:{port}"),
            protocol: "grpc".into(),
            ..Default::default()
        })
    })
}

pub(in crate::config) fn file_access_log(
    c: &mut Checker<'_>,
    field: &str,
    s: &FileAccessLogSpec,
) -> Option<Provider> {
    let mark = c.mark();
    let path = s.path.clone().unwrap_or_else(|| "/dev/stdout".into());
    if !path.starts_with('/') {
        c.fail(
            Code::InvalidValue,
            format!("{field}.path"),
            format!("`{path}` is not an absolute path (`/dev/stdout`, `/var/log/access.log`)"),
        );
    }
    let mut sink = xds::FileSink {
        path,
        ..Default::default()
    };
    log_format(c, field, &s.log_format, &mut sink);
    (!c.rejected_since(mark)).then_some(Provider::File(sink))
}

/// `accessLogFile` and `accessLogEncoding`: the built-in `envoy` provider's file and format
/// (kept under a name no user's provider can have).
pub(in crate::config) fn legacy_access_log(
    c: &mut Checker<'_>,
    out: &mut MeshTelemetry,
    file: &Option<String>,
    encoding: &Option<String>,
) {
    let json = match encoding.as_deref() {
        None | Some("TEXT") => false,
        Some("JSON") => true,
        Some(other) => {
            c.fail(
                Code::InvalidValue,
                "data.mesh.accessLogEncoding",
                format!("`{other}` is not TEXT or JSON"),
            );
            false
        }
    };
    let Some(path) = file.as_deref().filter(|p| !p.is_empty()) else {
        return;
    };
    if !path.starts_with('/') {
        c.fail(
            Code::InvalidValue,
            "data.mesh.accessLogFile",
            format!("`{path}` is not an absolute path (`/dev/stdout`)"),
        );
        return;
    }
    out.providers.insert(
        "\0envoy".into(),
        Provider::File(xds::FileSink {
            path: path.to_owned(),
            json,
            ..Default::default()
        }),
    );
    out.configured = true;
    // Istio logs every request with the built-in provider while `accessLogFile` is set.
    if out.default_access_logging.is_empty() {
        out.default_access_logging.push(ENVOY.into());
    }
}
