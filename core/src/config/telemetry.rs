//! Istio's `Telemetry` kind (`telemetry.istio.io/v1` and `v1alpha1`) and the mesh config's
//! telemetry: its extension providers (`opentelemetry`, `envoyOtelAls`,
//! `envoyFileAccessLog`, `prometheus`), `defaultProviders`, `accessLogFile` and
//! `accessLogEncoding`, and `defaultConfig.tracing.sampling` (those are read in
//! `telemetry/providers.rs`). Each workload's telemetry is resolved here into the
//! `TelemetryPolicy` its sidecar applies.
//!
//! Scope and inheritance, as Istio's: a Telemetry of the root namespace without selector
//! applies mesh-wide; one of a namespace without selector to its workloads; one with a
//! `selector` (or `targetRefs` to a Service) to the workloads it picks. The more specific
//! one overrides the less specific field by field:
//! - tracing: providers, sampling and span reporting when set, custom tags by name;
//! - access logging: per provider, whether it is disabled and its filter;
//! - metrics: providers when set; overrides apply in order, mesh-wide ones first.
//!
//! Each entry has a `match.mode` (CLIENT, SERVER or both). With no Telemetry naming one,
//! `defaultProviders` applies; Istio's built-in providers are `envoy` (Envoy's access log
//! to `accessLogFile`, else standard output) and `prometheus`.

use std::collections::BTreeMap;

use isthmus_proto::discovery as xds;
use serde::Deserialize;

mod providers;

pub use providers::*;

use super::security::{SelectorSpec, TargetRefSpec};
use super::sidecar::ROOT_NAMESPACE;
use super::validate::Checker;
use super::{Code, NamespacedName};

/// Istio's default sampling of traces that start at a proxy, in percent.
const DEFAULT_SAMPLING: f64 = 1.0;
/// Istio's built-in providers.
pub const ENVOY: &str = "envoy";
pub const PROMETHEUS: &str = "prometheus";

/// Istio's metric names (`match.metric`), and `ALL_METRICS`.
pub const METRICS: [&str; 11] = [
    "ALL_METRICS",
    "REQUEST_COUNT",
    "REQUEST_DURATION",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "TCP_OPENED_CONNECTIONS",
    "TCP_CLOSED_CONNECTIONS",
    "TCP_SENT_BYTES",
    "TCP_RECEIVED_BYTES",
    "GRPC_REQUEST_MESSAGES",
    "GRPC_RESPONSE_MESSAGES",
];

/// Istio's labels of its standard metrics, in its names and order: the TCP metrics have
/// the first 23, the request metrics all 25 (what `tagOverrides` can name).
pub const LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "response_code",
    "grpc_response_status",
];
// ---- The Telemetry kind, as users write it.

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TelemetrySpec {
    pub selector: Option<SelectorSpec>,
    pub target_ref: Option<TargetRefSpec>,
    #[serde(default)]
    pub target_refs: Vec<TargetRefSpec>,
    #[serde(default)]
    pub tracing: Vec<TracingSpec>,
    #[serde(default)]
    pub metrics: Vec<MetricsSpec>,
    #[serde(default)]
    pub access_logging: Vec<AccessLoggingSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProviderRefSpec {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModeMatchSpec {
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingSpec {
    #[serde(rename = "match")]
    pub match_: Option<ModeMatchSpec>,
    #[serde(default)]
    pub providers: Vec<ProviderRefSpec>,
    pub random_sampling_percentage: Option<f64>,
    pub disable_span_reporting: Option<bool>,
    #[serde(default)]
    pub custom_tags: BTreeMap<String, CustomTagSpec>,
    pub use_request_id_for_trace_sampling: Option<bool>,
    pub enable_istio_tags: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CustomTagSpec {
    pub literal: Option<LiteralSpec>,
    pub environment: Option<NamedDefaultSpec>,
    pub header: Option<NamedDefaultSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LiteralSpec {
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamedDefaultSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub default_value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetricsSpec {
    #[serde(default)]
    pub providers: Vec<ProviderRefSpec>,
    #[serde(default)]
    pub overrides: Vec<MetricsOverrideSpec>,
    pub reporting_interval: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetricsOverrideSpec {
    #[serde(rename = "match")]
    pub match_: Option<MetricSelectorSpec>,
    pub disabled: Option<bool>,
    #[serde(default)]
    pub tag_overrides: BTreeMap<String, TagOverrideSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetricSelectorSpec {
    pub metric: Option<String>,
    pub custom_metric: Option<String>,
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TagOverrideSpec {
    pub operation: Option<String>,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessLoggingSpec {
    #[serde(rename = "match")]
    pub match_: Option<ModeMatchSpec>,
    #[serde(default)]
    pub providers: Vec<ProviderRefSpec>,
    pub disabled: Option<bool>,
    pub filter: Option<FilterSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FilterSpec {
    #[serde(default)]
    pub expression: String,
}

// ---- Admitted Telemetry objects.

/// Which side of a workload's traffic an entry applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Client,
    Server,
    Both,
}

impl Mode {
    fn covers(self, side: Mode) -> bool {
        self == Mode::Both || self == side
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    pub mode: Mode,
    pub providers: Vec<String>,
    pub sampling: Option<f64>,
    pub disable_reporting: Option<bool>,
    pub custom_tags: BTreeMap<String, xds::CustomTag>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogging {
    pub mode: Mode,
    pub providers: Vec<String>,
    pub disabled: Option<bool>,
    pub filter: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricsOverride {
    pub mode: Mode,
    /// One of [`METRICS`].
    pub metric: String,
    pub disabled: Option<bool>,
    pub remove_tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    pub providers: Vec<String>,
    pub overrides: Vec<MetricsOverride>,
}

/// An admitted Telemetry.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryScope {
    pub key: NamespacedName,
    pub selector: BTreeMap<String, String>,
    /// `targetRefs` to Services of its namespace.
    pub services: Vec<NamespacedName>,
    pub tracing: Vec<Tracing>,
    pub access_logging: Vec<AccessLogging>,
    pub metrics: Vec<Metrics>,
    /// Every provider it names, with the field naming it (checked against the mesh config
    /// once both are known).
    pub names: Vec<(String, String)>,
}

fn mode_of(c: &mut Checker<'_>, field: &str, m: Option<&str>) -> Mode {
    match m.unwrap_or("CLIENT_AND_SERVER") {
        "CLIENT_AND_SERVER" => Mode::Both,
        "CLIENT" => Mode::Client,
        "SERVER" => Mode::Server,
        other => {
            c.fail(
                Code::InvalidValue,
                field,
                format!("`{other}` is not CLIENT, SERVER or CLIENT_AND_SERVER"),
            );
            Mode::Both
        }
    }
}

fn provider_names(
    c: &mut Checker<'_>,
    field: &str,
    list: &[ProviderRefSpec],
    names: &mut Vec<(String, String)>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        if p.name.is_empty() {
            c.fail(
                Code::Missing,
                format!("{field}.providers[{i}].name"),
                "a provider reference names a provider of the mesh config",
            );
            continue;
        }
        names.push((format!("{field}.providers[{i}].name"), p.name.clone()));
        out.push(p.name.clone());
    }
    out
}

/// Checks a Telemetry.
pub(super) fn telemetry(
    c: &mut Checker<'_>,
    key: &NamespacedName,
    spec: &TelemetrySpec,
) -> TelemetryScope {
    let (selector, services) =
        super::security::picked(c, key, &spec.selector, &spec.target_refs, &spec.target_ref);
    let mut names = Vec::new();
    let mut tracing = Vec::new();
    for (i, t) in spec.tracing.iter().enumerate() {
        let field = format!("spec.tracing[{i}]");
        let mode = mode_of(
            c,
            &format!("{field}.match.mode"),
            t.match_.as_ref().and_then(|m| m.mode.as_deref()),
        );
        let providers = provider_names(c, &field, &t.providers, &mut names);
        if providers.len() > 1 {
            c.fail(
                Code::Ignored,
                format!("{field}.providers"),
                "only the first tracing provider is used, as in Istio",
            );
        }
        if let Some(p) = t.random_sampling_percentage {
            if !(0.0..=100.0).contains(&p) {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.randomSamplingPercentage"),
                    format!("{p} is not a percentage (0 to 100)"),
                );
            }
        }
        for (flag, set) in [
            (
                "useRequestIdForTraceSampling",
                t.use_request_id_for_trace_sampling,
            ),
            ("enableIstioTags", t.enable_istio_tags),
        ] {
            if set.is_some() {
                c.fail(
                    Code::Ignored,
                    format!("{field}.{flag}"),
                    "not acted on by Isthmus; ignored",
                );
            }
        }
        let mut custom_tags = BTreeMap::new();
        for (name, tag) in &t.custom_tags {
            let f = format!("{field}.customTags.{name}");
            use xds::custom_tag::Value;
            let (value, default_value) = match (&tag.literal, &tag.environment, &tag.header) {
                (Some(l), None, None) => (Value::Literal(l.value.clone()), String::new()),
                (None, Some(e), None) if !e.name.is_empty() => {
                    (Value::Environment(e.name.clone()), e.default_value.clone())
                }
                (None, None, Some(h))
                    if http::HeaderName::from_bytes(h.name.as_bytes()).is_ok() =>
                {
                    (
                        Value::Header(h.name.to_ascii_lowercase()),
                        h.default_value.clone(),
                    )
                }
                _ => {
                    c.fail(
                        Code::InvalidValue,
                        f,
                        "a custom tag is one of `literal: {value}`, `environment: {name}` or \
                         `header: {name}` (a header name)",
                    );
                    continue;
                }
            };
            custom_tags.insert(
                name.clone(),
                xds::CustomTag {
                    name: name.clone(),
                    value: Some(value),
                    default_value,
                },
            );
        }
        tracing.push(Tracing {
            mode,
            providers,
            sampling: t.random_sampling_percentage,
            disable_reporting: t.disable_span_reporting,
            custom_tags,
        });
    }
    let mut access_logging = Vec::new();
    for (i, a) in spec.access_logging.iter().enumerate() {
        let field = format!("spec.accessLogging[{i}]");
        let mode = mode_of(
            c,
            &format!("{field}.match.mode"),
            a.match_.as_ref().and_then(|m| m.mode.as_deref()),
        );
        let providers = provider_names(c, &field, &a.providers, &mut names);
        let filter = a.filter.as_ref().map(|f| f.expression.clone());
        if let Some(text) = &filter {
            if let Err(e) = crate::cel::Filter::parse(text) {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.filter.expression"),
                    format!("`{text}`: {e}"),
                );
            }
        }
        access_logging.push(AccessLogging {
            mode,
            providers,
            disabled: a.disabled,
            filter,
        });
    }
    let mut metrics = Vec::new();
    for (i, m) in spec.metrics.iter().enumerate() {
        let field = format!("spec.metrics[{i}]");
        let providers = provider_names(c, &field, &m.providers, &mut names);
        if m.reporting_interval.is_some() {
            c.fail(
                Code::Ignored,
                format!("{field}.reportingInterval"),
                "Prometheus is scraped when it asks; OTLP metrics follow --otlp-metrics-interval",
            );
        }
        let mut overrides = Vec::new();
        for (j, o) in m.overrides.iter().enumerate() {
            let f = format!("{field}.overrides[{j}]");
            let sel = o.match_.as_ref();
            let mode = mode_of(
                c,
                &format!("{f}.match.mode"),
                sel.and_then(|s| s.mode.as_deref()),
            );
            if sel.and_then(|s| s.custom_metric.as_ref()).is_some() {
                c.fail(
                    Code::Ignored,
                    format!("{f}.match.customMetric"),
                    "Isthmus reports Istio's standard metrics only; this override matches none",
                );
                continue;
            }
            let metric = sel
                .and_then(|s| s.metric.clone())
                .unwrap_or_else(|| "ALL_METRICS".into());
            if !METRICS.contains(&metric.as_str()) {
                c.fail(
                    Code::InvalidValue,
                    format!("{f}.match.metric"),
                    format!(
                        "`{metric}` is not one of Istio's metrics ({})",
                        METRICS.join(", ")
                    ),
                );
                continue;
            }
            let mut remove_tags = Vec::new();
            for (tag, t) in &o.tag_overrides {
                match t.operation.as_deref().unwrap_or("UPSERT") {
                    "REMOVE" if !LABELS.contains(&tag.as_str()) => c.fail(
                        Code::Ignored,
                        format!("{f}.tagOverrides.{tag}"),
                        format!("`{tag}` is not a label of Istio's metrics; nothing to remove"),
                    ),
                    "REMOVE" => remove_tags.push(tag.clone()),
                    "UPSERT" => c.fail(
                        Code::Ignored,
                        format!("{f}.tagOverrides.{tag}"),
                        "UPSERT takes a CEL value of the request, which Isthmus does not \
                         evaluate for metrics; only REMOVE acts",
                    ),
                    other => c.fail(
                        Code::InvalidValue,
                        format!("{f}.tagOverrides.{tag}.operation"),
                        format!("`{other}` is not UPSERT or REMOVE"),
                    ),
                }
            }
            overrides.push(MetricsOverride {
                mode,
                metric,
                disabled: o.disabled,
                remove_tags,
            });
        }
        metrics.push(Metrics {
            providers,
            overrides,
        });
    }
    TelemetryScope {
        key: key.clone(),
        selector,
        services,
        tracing,
        access_logging,
        metrics,
        names,
    }
}

/// Faults that need the whole set: providers a Telemetry names that the mesh config does
/// not define, or defines as a kind Isthmus does not export to, and a second Telemetry of
/// one scope (Istio applies one; the first by name here).
pub(super) fn check_set(
    set: &super::ConfigSet,
    mut fail: impl FnMut(&NamespacedName, String, String),
) {
    for t in set.telemetries.values() {
        for (field, name) in &t.names {
            match set.mesh.telemetry.provider(name) {
                None => fail(
                    &t.key,
                    field.clone(),
                    format!("no extension provider `{name}` in the mesh config; it is skipped"),
                ),
                Some(Provider::Unsupported(kind)) => fail(
                    &t.key,
                    field.clone(),
                    format!("provider `{name}` is a {kind} provider, which Isthmus does not export to; it is skipped"),
                ),
                Some(_) => {}
            }
        }
        let same_scope = set.telemetries.values().find(|o| {
            o.key.namespace == t.key.namespace
                && o.selector.is_empty()
                && o.services.is_empty()
                && t.selector.is_empty()
                && t.services.is_empty()
        });
        if let Some(first) = same_scope.filter(|o| o.key != t.key) {
            fail(
                &t.key,
                "metadata.name".into(),
                format!(
                    "Telemetry {} already applies to the whole namespace; this one is ignored",
                    first.key
                ),
            );
        }
    }
}

// ---- Resolution per workload.

/// The Telemetry objects that apply to a workload, least specific first: the root
/// namespace's, its namespace's, and the one that selects it.
fn chain<'a>(
    set: &'a super::ConfigSet,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    services: &[NamespacedName],
) -> Vec<&'a TelemetryScope> {
    let whole = |ns: &str| {
        set.telemetries
            .values()
            .find(|t| t.key.namespace == ns && t.selector.is_empty() && t.services.is_empty())
    };
    let selected = set.telemetries.values().find(|t| {
        t.key.namespace == namespace
            && if !t.services.is_empty() {
                t.services.iter().any(|s| services.contains(s))
            } else {
                !t.selector.is_empty() && super::selects(&t.selector, labels)
            }
    });
    let mut out: Vec<&TelemetryScope> = Vec::new();
    if namespace != ROOT_NAMESPACE {
        out.extend(whole(ROOT_NAMESPACE));
    }
    out.extend(whole(namespace));
    out.extend(selected);
    out
}

/// What the mesh config and Telemetry objects say of a workload's telemetry; `None` when
/// the mesh configures none (the proxy's flags decide).
pub fn policy_for(
    set: &super::ConfigSet,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    services: &[NamespacedName],
) -> Option<xds::TelemetryPolicy> {
    let mesh = &set.mesh.telemetry;
    if !mesh.configured && set.telemetries.is_empty() {
        return None;
    }
    let chain = chain(set, namespace, labels, services);
    Some(xds::TelemetryPolicy {
        client_tracing: tracing_for(mesh, &chain, Mode::Client),
        server_tracing: tracing_for(mesh, &chain, Mode::Server),
        client_access_logs: access_logs_for(mesh, &chain, Mode::Client),
        server_access_logs: access_logs_for(mesh, &chain, Mode::Server),
        client_metrics: Some(metrics_for(mesh, &chain, Mode::Client)),
        server_metrics: Some(metrics_for(mesh, &chain, Mode::Server)),
    })
}

fn tracing_for(
    mesh: &MeshTelemetry,
    chain: &[&TelemetryScope],
    side: Mode,
) -> Option<xds::TracingPolicy> {
    let mut providers = mesh.default_tracing.clone();
    let mut sampling = mesh.sampling.unwrap_or(DEFAULT_SAMPLING);
    let mut disable = false;
    let mut tags: BTreeMap<String, xds::CustomTag> = BTreeMap::new();
    for t in chain
        .iter()
        .flat_map(|s| &s.tracing)
        .filter(|t| t.mode.covers(side))
    {
        if !t.providers.is_empty() {
            providers = t.providers.clone();
        }
        sampling = t.sampling.unwrap_or(sampling);
        disable = t.disable_reporting.unwrap_or(disable);
        tags.extend(t.custom_tags.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let (collector, max_tag_length) = match mesh.provider(providers.first()?)? {
        Provider::Tracing {
            collector,
            max_tag_length,
        } => (collector, max_tag_length),
        _ => return None,
    };
    Some(xds::TracingPolicy {
        collector: Some(xds::OtlpCollector {
            provider: providers[0].clone(),
            ..collector
        }),
        sampling_percent: sampling,
        disable_reporting: disable,
        custom_tags: tags.into_values().collect(),
        max_tag_length,
    })
}

fn access_logs_for(
    mesh: &MeshTelemetry,
    chain: &[&TelemetryScope],
    side: Mode,
) -> Vec<xds::AccessLogSink> {
    // Per provider: whether it logs, and its filter; the more specific entry wins.
    let mut by_provider: BTreeMap<String, (bool, Option<String>)> = mesh
        .default_access_logging
        .iter()
        .map(|p| (p.clone(), (true, None)))
        .collect();
    for a in chain
        .iter()
        .flat_map(|s| &s.access_logging)
        .filter(|a| a.mode.covers(side))
    {
        let providers = if a.providers.is_empty() {
            &mesh.default_access_logging
        } else {
            &a.providers
        };
        for p in providers {
            let entry = by_provider.entry(p.clone()).or_insert((true, None));
            entry.0 = !a.disabled.unwrap_or(false);
            if a.filter.is_some() {
                entry.1 = a.filter.clone();
            }
        }
    }
    by_provider
        .into_iter()
        .filter(|(_, (on, _))| *on)
        .filter_map(|(name, (_, filter))| {
            let sink = match mesh.provider(&name)? {
                Provider::File(f) => xds::access_log_sink::Sink::File(f),
                Provider::OtlpLogs(c) => xds::access_log_sink::Sink::Otlp(xds::OtlpCollector {
                    provider: name.clone(),
                    ..c
                }),
                _ => return None,
            };
            Some(xds::AccessLogSink {
                provider: name,
                sink: Some(sink),
                filter: filter.unwrap_or_default(),
            })
        })
        .collect()
}

fn metrics_for(mesh: &MeshTelemetry, chain: &[&TelemetryScope], side: Mode) -> xds::MetricsPolicy {
    let mut providers = if mesh.default_metrics.is_empty() {
        vec![PROMETHEUS.to_owned()]
    } else {
        mesh.default_metrics.clone()
    };
    // Which metrics are off, and tags removed, in order, mesh-wide first.
    let standard = &METRICS[1..];
    let mut disabled: std::collections::BTreeSet<&str> = Default::default();
    let mut removed: Vec<(String, String)> = Vec::new();
    for m in chain.iter().flat_map(|s| &s.metrics) {
        if !m.providers.is_empty() {
            providers = m.providers.clone();
        }
        for o in m.overrides.iter().filter(|o| o.mode.covers(side)) {
            let named: Vec<&str> = match o.metric.as_str() {
                "ALL_METRICS" => standard.to_vec(),
                one => vec![one],
            };
            match o.disabled {
                Some(true) => disabled.extend(named),
                Some(false) => named.iter().for_each(|m| {
                    disabled.remove(m);
                }),
                None => {}
            }
            for tag in &o.remove_tags {
                removed.push((o.metric.clone(), tag.clone()));
            }
        }
    }
    if !providers.iter().any(|p| p == PROMETHEUS) {
        disabled.extend(standard);
    }
    xds::MetricsPolicy {
        disabled: disabled.into_iter().map(str::to_owned).collect(),
        removed_tags: removed
            .into_iter()
            .map(|(metric, tag)| xds::MetricTagRemoval { metric, tag })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use isthmus_proto::discovery as xds;

    use crate::config::{load_files, ConfigSet, NamespacedName, SourceFile};

    const MESH: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |-\n    defaultConfig:\n      tracing: {sampling: 5}\n    defaultProviders:\n      accessLogging: [envoy]\n    extensionProviders:\n    - name: otel\n      opentelemetry: {service: otel.observability.svc.cluster.local, port: 4317, grpc: {initialMetadata: [{name: x-tenant, value: t1}]}}\n    - name: otel-http\n      opentelemetry:\n        service: observability/otel.observability.svc.cluster.local\n        port: 4318\n        http: {path: /v1/traces, timeout: 2s}\n    - name: otel-logs\n      envoyOtelAls: {service: otel.observability.svc.cluster.local, port: 4317}\n    - name: json-file\n      envoyFileAccessLog: {path: /dev/stdout, logFormat: {labels: {code: \"%RESPONSE_CODE%\", path: \"%REQ(:PATH)%\"}}}\n    - name: zipkin\n      zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}\n";

    fn load(extra: &str) -> Result<ConfigSet, String> {
        load_files(&[
            SourceFile {
                name: "mesh.yaml".into(),
                contents: MESH.into(),
            },
            SourceFile {
                name: "telemetry.yaml".into(),
                contents: extra.into(),
            },
        ])
        .map_err(|e| e.to_string())
    }

    fn labels(app: &str) -> BTreeMap<String, String> {
        [("app".to_owned(), app.to_owned())].into()
    }

    const LAYERS: &str = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\nspec:\n  tracing:\n  - providers: [{name: otel}]\n    randomSamplingPercentage: 10\n    customTags: {team: {literal: {value: core}}}\n---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: ns, namespace: shop}\nspec:\n  accessLogging:\n  - providers: [{name: otel-logs}]\n    filter: {expression: \"response.code >= 400\"}\n  - match: {mode: SERVER}\n    providers: [{name: envoy}]\n    disabled: true\n  metrics:\n  - overrides:\n    - match: {metric: REQUEST_COUNT, mode: CLIENT}\n      disabled: true\n    - match: {metric: ALL_METRICS}\n      tagOverrides: {request_protocol: {operation: REMOVE}}\n---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: reviews, namespace: shop}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  tracing:\n  - match: {mode: SERVER}\n    providers: [{name: otel-http}]\n    disableSpanReporting: true\n    customTags: {user: {header: {name: X-User, defaultValue: anon}}}\n";

    #[test]
    fn telemetry_layers_resolve_as_istio_merges_them() {
        let set = load(LAYERS).expect("valid");
        // A workload of another namespace: the mesh-wide tracing, the default access log.
        let p = super::policy_for(&set, "other", &labels("x"), &[]).expect("configured");
        let t = p.client_tracing.expect("traced");
        let c = t.collector.expect("collector");
        assert_eq!(
            (
                c.provider.as_str(),
                c.endpoint.as_str(),
                c.protocol.as_str()
            ),
            (
                "otel",
                "http://otel.observability.svc.cluster.local:4317",
                "grpc"
            )
        );
        assert_eq!(c.headers["x-tenant"], "t1");
        assert_eq!(t.sampling_percent, 10.0);
        assert_eq!(t.custom_tags[0].name, "team");
        assert_eq!(p.client_access_logs.len(), 1);
        assert_eq!(p.client_access_logs[0].provider, "envoy");
        assert!(p.client_metrics.expect("metrics").disabled.is_empty());

        // reviews in shop: all three layers.
        let p = super::policy_for(&set, "shop", &labels("reviews"), &[]).expect("configured");
        let server = p.server_tracing.expect("traced");
        let c = server.collector.expect("collector");
        assert_eq!(
            c.endpoint,
            "http://otel.observability.svc.cluster.local:4318/v1/traces"
        );
        assert_eq!((c.protocol.as_str(), c.timeout_ms), ("http/protobuf", 2000));
        assert!(server.disable_reporting);
        assert_eq!(
            server.sampling_percent, 10.0,
            "inherited from the mesh-wide layer"
        );
        let tags: Vec<&str> = server.custom_tags.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(tags, ["team", "user"]);
        let client = p.client_tracing.expect("traced");
        assert!(
            !client.disable_reporting,
            "the SERVER entry leaves the client side"
        );
        assert_eq!(client.collector.expect("c").provider, "otel");
        // The client side logs to stdout and, filtered, to OTLP; the server side only OTLP.
        let sinks = |s: &[xds::AccessLogSink]| -> Vec<(String, String)> {
            s.iter()
                .map(|k| (k.provider.clone(), k.filter.clone()))
                .collect()
        };
        assert_eq!(
            sinks(&p.client_access_logs),
            [
                ("envoy".to_owned(), String::new()),
                ("otel-logs".to_owned(), "response.code >= 400".to_owned())
            ]
        );
        assert_eq!(
            sinks(&p.server_access_logs),
            [("otel-logs".to_owned(), "response.code >= 400".to_owned())]
        );
        let client_metrics = p.client_metrics.expect("metrics");
        assert_eq!(client_metrics.disabled, ["REQUEST_COUNT"]);
        assert_eq!(client_metrics.removed_tags[0].tag, "request_protocol");
        assert!(p.server_metrics.expect("metrics").disabled.is_empty());

        // The mesh's sampling default applies where no Telemetry sets one.
        let set = load("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: istio-system}\nspec:\n  tracing: [{providers: [{name: otel}]}]\n").expect("valid");
        let p = super::policy_for(&set, "shop", &labels("a"), &[]).expect("configured");
        assert_eq!(p.server_tracing.expect("traced").sampling_percent, 5.0);
    }

    #[test]
    fn a_target_ref_picks_the_workloads_of_its_service() {
        let set = load("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: shop}\nspec:\n  targetRefs: [{kind: Service, group: \"\", name: reviews}]\n  accessLogging: [{disabled: true}]\n").expect("valid");
        let serving = [NamespacedName::new("shop", "reviews")];
        let p = super::policy_for(&set, "shop", &labels("x"), &serving).expect("configured");
        assert!(p.client_access_logs.is_empty());
        let p = super::policy_for(&set, "shop", &labels("x"), &[]).expect("configured");
        assert_eq!(p.client_access_logs.len(), 1);
    }

    #[test]
    fn without_telemetry_config_the_proxy_flags_decide() {
        let set = load_files(&[SourceFile {
            name: "svc.yaml".into(),
            contents: "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: shop}\nspec: {ports: [{port: 80}]}\n".into(),
        }])
        .expect("valid");
        assert!(super::policy_for(&set, "shop", &labels("a"), &[]).is_none());
    }

    #[test]
    fn faults_name_the_field() {
        for (doc, field, says) in [
            (
                "tracing: [{randomSamplingPercentage: 150}]",
                "spec.tracing[0].randomSamplingPercentage",
                "percentage",
            ),
            (
                "tracing: [{match: {mode: BOTH}}]",
                "spec.tracing[0].match.mode",
                "CLIENT",
            ),
            (
                "tracing: [{customTags: {a: {literal: {value: x}, header: {name: y}}}}]",
                "spec.tracing[0].customTags.a",
                "one of",
            ),
            (
                "accessLogging: [{filter: {expression: \"xds.cluster_name == 'x'\"}}]",
                "spec.accessLogging[0].filter.expression",
                "not an attribute",
            ),
            (
                "metrics: [{overrides: [{match: {metric: REQUESTS}, disabled: true}]}]",
                "spec.metrics[0].overrides[0].match.metric",
                "REQUEST_COUNT",
            ),
            (
                "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]",
                "spec.targetRefs[0]",
                "only Service",
            ),
            ("tracng: []", "spec", "tracng"),
        ] {
            let yaml = format!("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: t, namespace: shop}}\nspec:\n  {doc}\n");
            let e = load(&yaml).expect_err(doc);
            assert!(e.contains(field) && e.contains(says), "{doc}: {e}");
        }
        let bad_mesh = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |-\n    extensionProviders:\n    - name: f\n      envoyFileAccessLog: {path: /dev/stdout, logFormat: {text: \"%NOPE%\"}}\n";
        let e = load_files(&[SourceFile {
            name: "mesh.yaml".into(),
            contents: bad_mesh.into(),
        }])
        .expect_err("bad format");
        assert!(
            e.to_string()
                .contains("data.mesh.extensionProviders[0].envoyFileAccessLog.logFormat.text"),
            "{e}"
        );
    }

    #[test]
    fn providers_that_do_not_act_are_warned_of() {
        let set = load("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: shop}\nspec:\n  tracing: [{providers: [{name: zipkin}]}]\n  accessLogging: [{providers: [{name: nowhere}]}]\n  metrics: [{overrides: [{tagOverrides: {bogus: {operation: REMOVE}, source_app: {operation: UPSERT, value: x}}}]}]\n---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: u, namespace: shop}\nspec: {}\n").expect("warnings only");
        let said = |field: &str, what: &str| {
            set.warnings
                .iter()
                .any(|w| w.field == field && w.message.contains(what))
        };
        assert!(said("spec.tracing[0].providers[0].name", "zipkin provider"));
        assert!(said(
            "spec.accessLogging[0].providers[0].name",
            "no extension provider `nowhere`"
        ));
        assert!(said("metadata.name", "Telemetry shop/t already applies"));
        assert!(said(
            "spec.metrics[0].overrides[0].tagOverrides.bogus",
            "not a label"
        ));
        assert!(said(
            "spec.metrics[0].overrides[0].tagOverrides.source_app",
            "only REMOVE acts"
        ));
        assert!(set
            .warnings
            .iter()
            .any(|w| w.field == "data.mesh.extensionProviders[4].zipkin"));
        // A zipkin-only tracing config makes no spans; nothing is exported to nowhere.
        let p = super::policy_for(&set, "shop", &labels("a"), &[]).expect("configured");
        assert!(p.client_tracing.is_none());
        assert_eq!(p.client_access_logs.len(), 1, "only the default envoy log");
    }
}
