//! Istio's mesh config, where Istio keeps it: the `mesh` key of the ConfigMap `istio` in
//! `istio-system` (in a folder of YAML, or watched in the cluster). What Isthmus acts on:
//! - `extensionProviders` of the external authorization kinds (`envoyExtAuthzHttp`,
//!   `envoyExtAuthzGrpc`), which AuthorizationPolicies with action CUSTOM name;
//! - the telemetry providers (`opentelemetry`, `envoyOtelAls`, `envoyFileAccessLog`,
//!   `prometheus`), `defaultProviders`, `accessLogFile`, `accessLogEncoding` and
//!   `defaultConfig.tracing.sampling`, which Telemetry resources build on (see
//!   `telemetry.rs`);
//! - `trustDomainAliases`.
//!
//! The mesh config has many other fields (proxy defaults, ...); they are accepted and
//! reported as ignored, field by field, so an Istio user's ConfigMap loads unchanged and
//! says what does not act.

use std::collections::BTreeMap;

use isthmus_proto::discovery as xds;
use serde::Deserialize;

use super::validate::Checker;
use super::{Code, NamespacedName};

/// The namespace and name of the ConfigMap holding the mesh config.
pub const NAMESPACE: &str = "istio-system";
pub const NAME: &str = "istio";
/// Istio's default for how long the proxy waits for an authorization provider.
const DEFAULT_TIMEOUT_MS: u32 = 600_000;

/// `data.mesh`, as Istio's MeshConfig.
#[derive(Debug, Clone, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct MeshConfigSpec {
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProviderSpec>,
    /// Trust domains that stand for the mesh's own in AuthorizationPolicy principals.
    #[serde(default)]
    pub trust_domain_aliases: Vec<String>,
    pub default_providers: Option<super::telemetry::DefaultProvidersSpec>,
    pub access_log_file: Option<String>,
    pub access_log_encoding: Option<String>,
    pub default_config: Option<ProxyConfigSpec>,
    /// Every other field: accepted, reported as ignored.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProviderSpec {
    #[serde(default)]
    pub name: String,
    pub envoy_ext_authz_http: Option<ExtAuthzHttpSpec>,
    pub envoy_ext_authz_grpc: Option<ExtAuthzGrpcSpec>,
    pub opentelemetry: Option<super::telemetry::OpenTelemetrySpec>,
    pub envoy_otel_als: Option<super::telemetry::OtelAlsSpec>,
    pub envoy_file_access_log: Option<super::telemetry::FileAccessLogSpec>,
    pub prometheus: Option<serde_json::Value>,
    /// Provider kinds Isthmus does not export to (zipkin, datadog, stackdriver, ...).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// `defaultConfig`: the proxies' defaults. Of these, Isthmus reads `tracing.sampling`.
#[derive(Debug, Clone, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfigSpec {
    pub tracing: Option<ProxyTracingSpec>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ProxyTracingSpec {
    pub sampling: Option<f64>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum PortSpec {
    Number(i64),
    Text(String),
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExtAuthzHttpSpec {
    #[serde(default)]
    pub service: String,
    pub port: Option<PortSpec>,
    pub timeout: Option<String>,
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    pub status_on_error: Option<String>,
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    /// Deprecated by Istio for `includeRequestHeadersInCheck`; read the same way.
    #[serde(default)]
    pub include_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    pub include_request_body_in_check: Option<BodySpec>,
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExtAuthzGrpcSpec {
    #[serde(default)]
    pub service: String,
    pub port: Option<PortSpec>,
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    pub status_on_error: Option<String>,
    pub include_request_body_in_check: Option<BodySpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BodySpec {
    pub max_request_bytes: Option<u32>,
    #[serde(default)]
    pub allow_partial_message: bool,
    #[serde(default)]
    pub pack_as_bytes: bool,
}

/// The admitted mesh config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshSettings {
    /// The external authorization providers, by name.
    pub ext_authz: BTreeMap<String, xds::ExtAuthzProvider>,
    /// `trustDomainAliases`: a principal naming the mesh's trust domain or one of these
    /// matches an identity of any of them.
    pub trust_domain_aliases: Vec<String>,
    /// The telemetry providers and defaults.
    pub telemetry: super::telemetry::MeshTelemetry,
}

/// Whether a ConfigMap is the mesh config.
pub fn is_mesh_config(name: &str, namespace: Option<&str>) -> bool {
    name == NAME && namespace == Some(NAMESPACE)
}

/// Checks the mesh config.
pub(super) fn mesh_config(
    c: &mut Checker<'_>,
    _key: &NamespacedName,
    spec: &MeshConfigSpec,
) -> MeshSettings {
    let mut out = MeshSettings::default();
    for (i, alias) in spec.trust_domain_aliases.iter().enumerate() {
        if !crate::identity::is_trust_domain(alias) {
            c.fail(
                Code::InvalidValue,
                format!("data.mesh.trustDomainAliases[{i}]"),
                format!(
                    "`{alias}` is not a trust domain (lower-case letters, digits, `.`, `-`, `_`)"
                ),
            );
        } else if !out.trust_domain_aliases.contains(alias) {
            out.trust_domain_aliases.push(alias.clone());
        }
    }
    for field in spec.other.keys() {
        c.fail(
            Code::Ignored,
            format!("data.mesh.{field}"),
            "not acted on by Isthmus; ignored",
        );
    }
    telemetry_settings(c, spec, &mut out.telemetry);
    for (i, p) in spec.extension_providers.iter().enumerate() {
        let field = format!("data.mesh.extensionProviders[{i}]");
        if p.name.is_empty() {
            c.fail(
                Code::Missing,
                format!("{field}.name"),
                "a provider has a name",
            );
            continue;
        }
        if spec.extension_providers[..i]
            .iter()
            .any(|q| q.name == p.name)
        {
            c.fail(
                Code::Duplicate,
                format!("{field}.name"),
                format!("another provider is named `{}`", p.name),
            );
            continue;
        }
        let kinds = usize::from(p.envoy_ext_authz_http.is_some())
            + usize::from(p.envoy_ext_authz_grpc.is_some())
            + usize::from(p.opentelemetry.is_some())
            + usize::from(p.envoy_otel_als.is_some())
            + usize::from(p.envoy_file_access_log.is_some())
            + usize::from(p.prometheus.is_some())
            + p.other.len();
        if kinds != 1 {
            c.fail(
                Code::InvalidValue,
                &field,
                "a provider is exactly one kind (envoyExtAuthzHttp, envoyExtAuthzGrpc, ...)",
            );
            continue;
        }
        if let Some(t) = telemetry_provider(c, &field, p) {
            out.telemetry.providers.insert(p.name.clone(), t);
            continue;
        }
        let provider = match (&p.envoy_ext_authz_http, &p.envoy_ext_authz_grpc) {
            (Some(h), None) => http_provider(c, &format!("{field}.envoyExtAuthzHttp"), h),
            (None, Some(g)) => grpc_provider(c, &format!("{field}.envoyExtAuthzGrpc"), g),
            _ => continue, // a telemetry provider that did not check out
        };
        if let Some(mut provider) = provider {
            provider.name = p.name.clone();
            out.ext_authz.insert(p.name.clone(), provider);
        }
    }
    out
}

/// A telemetry provider, or `None` for an authorization one (or a telemetry one with
/// faults, reported).
fn telemetry_provider(
    c: &mut Checker<'_>,
    field: &str,
    p: &ExtensionProviderSpec,
) -> Option<super::telemetry::Provider> {
    use super::telemetry as t;
    if let Some(o) = &p.opentelemetry {
        return t::opentelemetry(c, &format!("{field}.opentelemetry"), o);
    }
    if let Some(a) = &p.envoy_otel_als {
        return t::otel_als(c, &format!("{field}.envoyOtelAls"), a);
    }
    if let Some(f) = &p.envoy_file_access_log {
        return t::file_access_log(c, &format!("{field}.envoyFileAccessLog"), f);
    }
    if p.prometheus.is_some() {
        return Some(t::Provider::Prometheus);
    }
    let kind = p.other.keys().next()?;
    c.fail(
        Code::Ignored,
        format!("{field}.{kind}"),
        format!("Isthmus does not export to {kind} providers (opentelemetry, envoyOtelAls, envoyFileAccessLog and prometheus work); a Telemetry naming it does nothing"),
    );
    Some(t::Provider::Unsupported(kind.clone()))
}

/// `defaultProviders`, `accessLogFile`/`accessLogEncoding` and
/// `defaultConfig.tracing.sampling`.
fn telemetry_settings(
    c: &mut Checker<'_>,
    spec: &MeshConfigSpec,
    out: &mut super::telemetry::MeshTelemetry,
) {
    if let Some(d) = &spec.default_providers {
        out.configured = true;
        out.default_tracing = d.tracing.clone();
        out.default_metrics = d.metrics.clone();
        out.default_access_logging = d.access_logging.clone();
    }
    super::telemetry::legacy_access_log(c, out, &spec.access_log_file, &spec.access_log_encoding);
    let Some(d) = &spec.default_config else {
        return;
    };
    for k in d.other.keys() {
        c.fail(
            Code::Ignored,
            format!("data.mesh.defaultConfig.{k}"),
            "not acted on by Isthmus; ignored",
        );
    }
    if let Some(t) = &d.tracing {
        for k in t.other.keys() {
            c.fail(
                Code::Ignored,
                format!("data.mesh.defaultConfig.tracing.{k}"),
                "Isthmus traces through Telemetry resources and opentelemetry providers; ignored",
            );
        }
        match t.sampling {
            Some(s) if !(0.0..=100.0).contains(&s) => c.fail(
                Code::InvalidValue,
                "data.mesh.defaultConfig.tracing.sampling",
                format!("{s} is not a percentage (0 to 100)"),
            ),
            s => out.sampling = s,
        }
    }
}

/// What both provider kinds share.
struct Common<'a> {
    service: &'a str,
    port: &'a Option<PortSpec>,
    timeout: &'a Option<String>,
    fail_open: bool,
    status_on_error: &'a Option<String>,
    body: &'a Option<BodySpec>,
}

fn common(c: &mut Checker<'_>, field: &str, s: Common<'_>) -> Option<xds::ExtAuthzProvider> {
    let mark = c.mark();
    if s.service.is_empty() {
        c.fail(
            Code::Missing,
            format!("{field}.service"),
            "the provider's host (`ext-authz.foo.svc.cluster.local`, or a ServiceEntry host)",
        );
    }
    let port = match s.port {
        None => {
            c.fail(
                Code::Missing,
                format!("{field}.port"),
                "the provider's port",
            );
            0
        }
        Some(PortSpec::Number(n)) => c.port(&format!("{field}.port"), *n).unwrap_or(0),
        Some(PortSpec::Text(t)) => match t.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.port"),
                    format!("`{t}` is not a port number"),
                );
                0
            }
        },
    };
    let timeout_ms = match s.timeout.as_deref().map(super::istio::parse_duration_ms) {
        None => DEFAULT_TIMEOUT_MS,
        Some(Some(ms)) if ms > 0 => u32::try_from(ms).unwrap_or(u32::MAX),
        Some(_) => {
            c.fail(
                Code::InvalidValue,
                format!("{field}.timeout"),
                "not a positive duration like 0.5s or 200ms",
            );
            0
        }
    };
    let status_on_error = match s.status_on_error.as_deref() {
        None => 403,
        Some(v) => match v.parse::<u16>() {
            Ok(code) if (200..=599).contains(&code) => u32::from(code),
            _ => {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.statusOnError"),
                    format!("`{v}` is not an HTTP status code"),
                );
                0
            }
        },
    };
    let (max_request_bytes, allow_partial_message, pack_as_bytes) = match s.body {
        None => (0, false, false),
        Some(b) => match b.max_request_bytes {
            Some(0) | None => {
                c.fail(
                    Code::Missing,
                    format!("{field}.includeRequestBodyInCheck.maxRequestBytes"),
                    "how much of the body to send (bytes, more than 0)",
                );
                (0, false, false)
            }
            Some(n) => (n, b.allow_partial_message, b.pack_as_bytes),
        },
    };
    (!c.rejected_since(mark)).then(|| xds::ExtAuthzProvider {
        service: s.service.to_owned(),
        port: port.into(),
        timeout_ms,
        fail_open: s.fail_open,
        status_on_error,
        max_request_bytes,
        allow_partial_message,
        pack_as_bytes,
        ..Default::default()
    })
}

/// Header lists match as Istio's do: exact (case-insensitive), `prefix*` or `*suffix`.
fn header_patterns(c: &mut Checker<'_>, field: &str, list: &[String]) -> Vec<String> {
    for (i, h) in list.iter().enumerate() {
        let bare = h.trim_start_matches('*').trim_end_matches('*');
        if bare.is_empty() || http::HeaderName::from_bytes(bare.as_bytes()).is_err() {
            c.fail(
                Code::InvalidValue,
                format!("{field}[{i}]"),
                format!("`{h}` is not a header name (exact, `prefix*` or `*suffix`)"),
            );
        }
    }
    list.iter().map(|h| h.to_ascii_lowercase()).collect()
}

fn http_provider(
    c: &mut Checker<'_>,
    field: &str,
    h: &ExtAuthzHttpSpec,
) -> Option<xds::ExtAuthzProvider> {
    let mark = c.mark();
    let mut p = common(
        c,
        field,
        Common {
            service: &h.service,
            port: &h.port,
            timeout: &h.timeout,
            fail_open: h.fail_open,
            status_on_error: &h.status_on_error,
            body: &h.include_request_body_in_check,
        },
    );
    if let Some(prefix) = &h.path_prefix {
        if !prefix.starts_with('/') || http::uri::PathAndQuery::try_from(prefix.as_str()).is_err() {
            c.fail(
                Code::InvalidValue,
                format!("{field}.pathPrefix"),
                format!("`{prefix}` is not a path starting with /"),
            );
        }
    }
    let mut included: Vec<String> = h.include_request_headers_in_check.clone();
    included.extend(h.include_headers_in_check.iter().cloned());
    let include = header_patterns(
        c,
        &format!("{field}.includeRequestHeadersInCheck"),
        &included,
    );
    for (k, v) in &h.include_additional_headers_in_check {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err()
            || http::HeaderValue::from_str(v).is_err()
        {
            c.fail(
                Code::InvalidValue,
                format!("{field}.includeAdditionalHeadersInCheck.{k}"),
                "not a header name and value",
            );
        }
    }
    let upstream = header_patterns(
        c,
        &format!("{field}.headersToUpstreamOnAllow"),
        &h.headers_to_upstream_on_allow,
    );
    let deny = header_patterns(
        c,
        &format!("{field}.headersToDownstreamOnDeny"),
        &h.headers_to_downstream_on_deny,
    );
    let allow = header_patterns(
        c,
        &format!("{field}.headersToDownstreamOnAllow"),
        &h.headers_to_downstream_on_allow,
    );
    if c.rejected_since(mark) {
        return None;
    }
    if let Some(p) = &mut p {
        p.grpc = false;
        p.path_prefix = h.path_prefix.clone().unwrap_or_default();
        p.include_request_headers = include;
        p.include_additional_headers = h
            .include_additional_headers_in_check
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        p.headers_to_upstream_on_allow = upstream;
        p.headers_to_downstream_on_deny = deny;
        p.headers_to_downstream_on_allow = allow;
    }
    p
}

fn grpc_provider(
    c: &mut Checker<'_>,
    field: &str,
    g: &ExtAuthzGrpcSpec,
) -> Option<xds::ExtAuthzProvider> {
    let mut p = common(
        c,
        field,
        Common {
            service: &g.service,
            port: &g.port,
            timeout: &g.timeout,
            fail_open: g.fail_open,
            status_on_error: &g.status_on_error,
            body: &g.include_request_body_in_check,
        },
    )?;
    p.grpc = true;
    Some(p)
}

#[cfg(test)]
mod tests {
    use crate::config::{load_files, SourceFile};

    fn load(mesh: &str) -> Result<crate::config::ConfigSet, String> {
        let indented: String = mesh.lines().map(|l| format!("    {l}\n")).collect();
        load_files(&[SourceFile {
            name: "mesh.yaml".into(),
            contents: format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |-\n{indented}"),
        }])
        .map_err(|e| e.to_string())
    }

    #[test]
    fn istio_s_ext_authz_providers_load_as_istio_writes_them() {
        let set = load("enablePrometheusMerge: true\nextensionProviders:\n- name: sample-ext-authz-grpc\n  envoyExtAuthzGrpc:\n    service: ext-authz.foo.svc.cluster.local\n    port: \"9000\"\n- name: sample-ext-authz-http\n  envoyExtAuthzHttp:\n    service: ext-authz.foo.svc.cluster.local\n    port: \"8000\"\n    timeout: 0.5s\n    includeRequestHeadersInCheck: [\"x-ext-authz\"]\n    headersToUpstreamOnAllow: [\"x-ext-authz-*\"]\n- name: otel\n  opentelemetry: {service: otel.istio-system.svc.cluster.local, port: 4317}\n").expect("valid");
        let grpc = &set.mesh.ext_authz["sample-ext-authz-grpc"];
        assert!(grpc.grpc);
        assert_eq!(
            (grpc.port, grpc.timeout_ms, grpc.status_on_error),
            (9000, 600_000, 403)
        );
        let http = &set.mesh.ext_authz["sample-ext-authz-http"];
        assert!(!http.grpc);
        assert_eq!(http.timeout_ms, 500);
        assert_eq!(http.include_request_headers, ["x-ext-authz"]);
        assert_eq!(http.headers_to_upstream_on_allow, ["x-ext-authz-*"]);
        assert!(!set.mesh.ext_authz.contains_key("otel"));
        // An unknown field is reported, not fatal.
        assert!(set
            .warnings
            .iter()
            .any(|w| w.field == "data.mesh.enablePrometheusMerge"));
        // A telemetry provider is kept for Telemetry resources.
        assert!(matches!(
            set.mesh.telemetry.providers["otel"],
            crate::config::telemetry::Provider::Tracing { .. }
        ));
    }

    #[test]
    fn bad_providers_are_refused_by_field() {
        for (mesh, field, says) in [
            ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {port: 80}\n", "data.mesh.extensionProviders[0].envoyExtAuthzHttp.service", "host"),
            ("extensionProviders:\n- name: a\n  envoyExtAuthzGrpc: {service: s, port: \"x\"}\n", "data.mesh.extensionProviders[0].envoyExtAuthzGrpc.port", "port"),
            ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: s, port: 80, statusOnError: \"abc\"}\n", "data.mesh.extensionProviders[0].envoyExtAuthzHttp.statusOnError", "status"),
            ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: s, port: 80, pathPrefix: check}\n", "data.mesh.extensionProviders[0].envoyExtAuthzHttp.pathPrefix", "path"),
            ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: s, port: 80}\n- name: a\n  envoyExtAuthzGrpc: {service: s, port: 90}\n", "data.mesh.extensionProviders[1].name", "another"),
            ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: s, port: 80, bogus: 1}\n", "data.mesh.extensionProviders[0].envoyExtAuthzHttp", "bogus"),
        ] {
            let e = load(mesh).expect_err(mesh);
            assert!(e.contains(field) && e.contains(says), "{mesh}: {e}");
        }
    }
}
