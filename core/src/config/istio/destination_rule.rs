//! Istio's `DestinationRule`: subsets and traffic policies (load balancer, outlier
//! detection, connection pool, locality, TLS origination, per port) as users write them,
//! checked and turned into [`crate::routing::Subset`] and [`crate::routing::TrafficPolicy`].

use std::collections::BTreeMap;

use serde::Deserialize;

use super::super::validate::Checker;
use super::super::Code;
use super::{count, duration, unsupported, PortSelectorSpec, Unsupported};
use crate::routing::{
    ClientTls, ConnectionPool, HashOn, LoadBalancer, LocalityLb, OutlierDetection, Subset, TlsMode,
    TrafficPolicy,
};

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicySpec>,
    #[serde(default)]
    pub subsets: Vec<SubsetSpec>,
    #[serde(default)]
    pub export_to: Vec<String>,
    pub workload_selector: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub load_balancer: Option<LoadBalancerSpec>,
    pub connection_pool: Option<ConnectionPoolSpec>,
    pub outlier_detection: Option<OutlierDetectionSpec>,
    pub tls: Option<ClientTlsSpec>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicySpec>,
    pub tunnel: Unsupported,
    pub proxy_protocol: Unsupported,
}

/// A `portLevelSettings` entry: a traffic policy for one port of the service.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortTrafficPolicySpec {
    pub port: PortSelectorSpec,
    pub load_balancer: Option<LoadBalancerSpec>,
    pub connection_pool: Option<ConnectionPoolSpec>,
    pub outlier_detection: Option<OutlierDetectionSpec>,
    pub tls: Option<ClientTlsSpec>,
}

/// Istio's `ClientTLSSettings`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientTlsSpec {
    pub mode: Option<String>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    pub sni: Option<String>,
    pub insecure_skip_verify: Option<bool>,
    pub ca_crl: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHashSpec>,
    pub locality_lb_setting: Option<LocalityLbSpec>,
    pub warmup_duration_secs: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SubsetSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicySpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConsistentHashSpec {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookieSpec>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    pub ring_hash: Unsupported,
    pub maglev: Unsupported,
    pub minimum_ring_size: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpCookieSpec {
    pub name: String,
    pub path: Option<String>,
    pub ttl: Option<String>,
    pub attributes: Unsupported,
}

fn consistent_hash(
    c: &mut Checker<'_>,
    field: &str,
    h: &ConsistentHashSpec,
) -> Option<LoadBalancer> {
    for (name, v) in [
        ("ringHash", &h.ring_hash),
        ("maglev", &h.maglev),
        ("minimumRingSize", &h.minimum_ring_size),
    ] {
        unsupported(c, &format!("{field}.{name}"), v);
    }
    let cookie = h.http_cookie.as_ref().map(|ck| {
        unsupported(c, &format!("{field}.httpCookie.attributes"), &ck.attributes);
        let ttl_secs = ck
            .ttl
            .as_deref()
            .and_then(|t| duration(c, &format!("{field}.httpCookie.ttl"), t))
            .map(|ms| ms / 1000)
            .unwrap_or(0);
        HashOn::Cookie {
            name: ck.name.clone(),
            path: ck.path.clone(),
            ttl_secs,
        }
    });
    let keys: Vec<HashOn> = [
        h.http_header_name
            .as_ref()
            .map(|n| HashOn::Header(n.to_ascii_lowercase())),
        cookie,
        h.use_source_ip.filter(|b| *b).map(|_| HashOn::SourceIp),
        h.http_query_parameter_name
            .as_ref()
            .map(|n| HashOn::QueryParameter(n.clone())),
    ]
    .into_iter()
    .flatten()
    .collect();
    if keys.len() != 1 {
        c.fail(Code::InvalidValue, field, "consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName");
        return None;
    }
    keys.into_iter().next().map(LoadBalancer::ConsistentHash)
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    pub consecutive_gateway_errors: Option<i64>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<i64>,
    pub min_health_percent: Option<i64>,
    pub split_external_local_origin_errors: Unsupported,
    pub consecutive_local_origin_failures: Unsupported,
    /// Deprecated: Istio maps it to consecutive gateway errors, with 5xx ejection off.
    pub consecutive_errors: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPoolSpec {
    pub tcp: Option<TcpPoolSpec>,
    pub http: Option<HttpPoolSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpPoolSpec {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<String>,
    pub tcp_keepalive: Unsupported,
    pub max_connection_duration: Unsupported,
    pub idle_timeout: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpPoolSpec {
    pub http1_max_pending_requests: Option<i64>,
    pub http2_max_requests: Option<i64>,
    pub max_requests_per_connection: Option<i64>,
    pub max_retries: Option<i64>,
    pub idle_timeout: Option<String>,
    pub h2_upgrade_policy: Unsupported,
    pub use_client_protocol: Unsupported,
    pub max_concurrent_streams: Unsupported,
}

fn outlier(c: &mut Checker<'_>, field: &str, o: &OutlierDetectionSpec) -> OutlierDetection {
    for (name, v) in [
        (
            "splitExternalLocalOriginErrors",
            &o.split_external_local_origin_errors,
        ),
        (
            "consecutiveLocalOriginFailures",
            &o.consecutive_local_origin_failures,
        ),
    ] {
        unsupported(c, &format!("{field}.{name}"), v);
    }
    // `interval` is when Envoy sweeps; ejections here end at their exact time, so any
    // interval behaves the same. It is still checked.
    if let Some(i) = &o.interval {
        duration(c, &format!("{field}.interval"), i);
    }
    let max = i64::from(u32::MAX);
    let base_ejection_ms = o
        .base_ejection_time
        .as_deref()
        .and_then(|t| duration(c, &format!("{field}.baseEjectionTime"), t))
        .unwrap_or(30_000);
    let max_ejection_percent = count(
        c,
        &format!("{field}.maxEjectionPercent"),
        o.max_ejection_percent,
        100,
    )
    .unwrap_or(10);
    let min_health_percent = count(
        c,
        &format!("{field}.minHealthPercent"),
        o.min_health_percent,
        100,
    )
    .unwrap_or(0);
    let consecutive_gateway = count(
        c,
        &format!("{field}.consecutiveGatewayErrors"),
        o.consecutive_gateway_errors,
        max,
    );
    let consecutive_5xx = count(
        c,
        &format!("{field}.consecutive5xxErrors"),
        o.consecutive_5xx_errors,
        max,
    );
    // The deprecated `consecutiveErrors`, mapped as Istio maps it: gateway errors only,
    // with 5xx ejection off, unless the current fields are set.
    let legacy = count(
        c,
        &format!("{field}.consecutiveErrors"),
        o.consecutive_errors,
        max,
    );
    if legacy.is_some() {
        c.fail(
            Code::Deprecated,
            format!("{field}.consecutiveErrors"),
            "deprecated: counts 502/503/504 as consecutiveGatewayErrors does (use that)",
        );
    }
    let (consecutive_5xx, consecutive_gateway) =
        match (legacy, consecutive_5xx, consecutive_gateway) {
            (Some(n), None, None) => (None, Some(n)),
            // Istio's defaults: 5 consecutive 5xx, 30 s base ejection, at most 10% ejected.
            (_, c5, cg) => (c5.or(Some(5)), cg),
        };
    OutlierDetection {
        consecutive_5xx: consecutive_5xx.filter(|n| *n > 0),
        consecutive_gateway: consecutive_gateway.filter(|n| *n > 0),
        base_ejection_ms,
        max_ejection_percent,
        min_health_percent,
    }
}

/// Connections between proxies are long-lived multiplexed HTTP/2, so Envoy's pool sizes
/// become limits on requests in flight; `maxRequestsPerConnection` and `idleTimeout`
/// retire pooled connections.
fn connection_pool(c: &mut Checker<'_>, field: &str, p: &ConnectionPoolSpec) -> ConnectionPool {
    let mut pool = ConnectionPool::default();
    let max = i64::from(u32::MAX);
    if let Some(t) = &p.tcp {
        for (name, v) in [
            ("tcpKeepalive", &t.tcp_keepalive),
            ("maxConnectionDuration", &t.max_connection_duration),
            ("idleTimeout", &t.idle_timeout),
        ] {
            unsupported(c, &format!("{field}.tcp.{name}"), v);
        }
        pool.max_requests = count(
            c,
            &format!("{field}.tcp.maxConnections"),
            t.max_connections,
            max,
        );
        pool.connect_timeout_ms = t
            .connect_timeout
            .as_deref()
            .and_then(|d| duration(c, &format!("{field}.tcp.connectTimeout"), d));
    }
    if let Some(h) = &p.http {
        for (name, v) in [
            ("h2UpgradePolicy", &h.h2_upgrade_policy),
            ("useClientProtocol", &h.use_client_protocol),
            ("maxConcurrentStreams", &h.max_concurrent_streams),
        ] {
            unsupported(c, &format!("{field}.http.{name}"), v);
        }
        let h2 = count(
            c,
            &format!("{field}.http.http2MaxRequests"),
            h.http2_max_requests,
            max,
        );
        pool.max_requests = match (pool.max_requests, h2) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        pool.max_pending = count(
            c,
            &format!("{field}.http.http1MaxPendingRequests"),
            h.http1_max_pending_requests,
            max,
        );
        pool.max_retries = count(c, &format!("{field}.http.maxRetries"), h.max_retries, max);
        pool.max_requests_per_connection = count(
            c,
            &format!("{field}.http.maxRequestsPerConnection"),
            h.max_requests_per_connection,
            max,
        )
        .filter(|n| *n > 0);
        pool.idle_timeout_ms = h
            .idle_timeout
            .as_deref()
            .and_then(|d| duration(c, &format!("{field}.http.idleTimeout"), d));
    }
    pool
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalityLbSpec {
    pub enabled: Option<bool>,
    #[serde(default)]
    pub failover: Vec<FailoverSpec>,
    #[serde(default)]
    pub distribute: Vec<DistributeSpec>,
    #[serde(default)]
    pub failover_priority: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FailoverSpec {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DistributeSpec {
    pub from: String,
    pub to: BTreeMap<String, i64>,
}

fn locality_lb(c: &mut Checker<'_>, field: &str, l: &LocalityLbSpec) -> LocalityLb {
    if !l.failover_priority.is_empty() && !l.distribute.is_empty() {
        c.fail(
            Code::InvalidValue,
            field,
            "set failoverPriority or distribute, not both",
        );
    }
    if !l.failover.is_empty() && !l.distribute.is_empty() {
        c.fail(
            Code::InvalidValue,
            field,
            "set failover or distribute, not both",
        );
    }
    for (i, f) in l.failover.iter().enumerate() {
        if f.from == f.to {
            c.fail(
                Code::InvalidValue,
                format!("{field}.failover[{i}]"),
                "from and to must be different regions",
            );
        }
    }
    let mut distribute = Vec::new();
    for (i, d) in l.distribute.iter().enumerate() {
        let total: i64 = d.to.values().sum();
        if total != 100 || d.to.values().any(|w| *w < 0) {
            c.fail(
                Code::InvalidValue,
                format!("{field}.distribute[{i}].to"),
                format!("weights add up to {total}, not 100"),
            );
        }
        distribute.push((
            d.from.clone(),
            d.to.iter()
                .map(|(k, w)| (k.clone(), (*w).clamp(0, 100) as u32))
                .collect(),
        ));
    }
    LocalityLb {
        enabled: l.enabled.unwrap_or(true),
        failover: l
            .failover
            .iter()
            .map(|f| (f.from.clone(), f.to.clone()))
            .collect(),
        distribute,
        failover_priority: l.failover_priority.clone(),
    }
}

fn traffic_policy(
    c: &mut Checker<'_>,
    field: &str,
    p: &Option<TrafficPolicySpec>,
) -> TrafficPolicy {
    let Some(p) = p.as_ref() else {
        return TrafficPolicy::default();
    };
    TrafficPolicy {
        locality: p
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.locality_lb_setting.as_ref())
            .map(|l| locality_lb(c, &format!("{field}.loadBalancer.localityLbSetting"), l)),
        load_balancer: load_balancer(c, field, p),
        outlier: p
            .outlier_detection
            .as_ref()
            .map(|o| outlier(c, &format!("{field}.outlierDetection"), o)),
        connection_pool: p
            .connection_pool
            .as_ref()
            .map(|cp| connection_pool(c, &format!("{field}.connectionPool"), cp)),
        tls: p
            .tls
            .as_ref()
            .and_then(|t| client_tls(c, &format!("{field}.tls"), t)),
        ports: p
            .port_level_settings
            .iter()
            .enumerate()
            .filter_map(|(i, pl)| {
                let f = format!("{field}.portLevelSettings[{i}]");
                let port = c.port(&format!("{f}.port.number"), pl.port.number)?;
                // The same parsing as the service level, for this port's settings.
                let spec = TrafficPolicySpec {
                    load_balancer: pl.load_balancer.clone(),
                    connection_pool: pl.connection_pool.clone(),
                    outlier_detection: pl.outlier_detection.clone(),
                    tls: pl.tls.clone(),
                    port_level_settings: Vec::new(),
                    tunnel: None,
                    proxy_protocol: None,
                };
                Some((port, traffic_policy(c, &f, &Some(spec))))
            })
            .collect(),
    }
}

fn load_balancer(c: &mut Checker<'_>, field: &str, p: &TrafficPolicySpec) -> Option<LoadBalancer> {
    for (name, v) in [("tunnel", &p.tunnel), ("proxyProtocol", &p.proxy_protocol)] {
        unsupported(c, &format!("{field}.{name}"), v);
    }
    let lb = p.load_balancer.as_ref()?;
    if let Some(h) = &lb.consistent_hash {
        if lb.simple.is_some() {
            c.fail(
                Code::InvalidValue,
                format!("{field}.loadBalancer"),
                "set either simple or consistentHash, not both",
            );
        }
        return consistent_hash(c, &format!("{field}.loadBalancer.consistentHash"), h);
    }
    unsupported(
        c,
        &format!("{field}.loadBalancer.warmupDurationSecs"),
        &lb.warmup_duration_secs,
    );
    match lb.simple.as_deref() {
        None => None,
        Some("ROUND_ROBIN") | Some("UNSPECIFIED") => Some(LoadBalancer::RoundRobin),
        Some("LEAST_REQUEST") | Some("LEAST_CONN") => Some(LoadBalancer::LeastRequest),
        Some("RANDOM") => Some(LoadBalancer::Random),
        Some(other) => {
            c.fail(
                Code::InvalidValue,
                format!("{field}.loadBalancer.simple"),
                format!("`{other}` is not one of ROUND_ROBIN, LEAST_REQUEST, RANDOM"),
            );
            None
        }
    }
}

/// Checks `tls` as Istio does: the certificate files go with `MUTUAL` (or `SIMPLE`, for
/// the CA), never with `ISTIO_MUTUAL`, and never together with a `credentialName`.
fn client_tls(c: &mut Checker<'_>, field: &str, t: &ClientTlsSpec) -> Option<ClientTls> {
    let mark = c.mark();
    unsupported(c, &format!("{field}.caCrl"), &t.ca_crl);
    let mode = match t.mode.as_deref().unwrap_or("DISABLE") {
        "DISABLE" => TlsMode::Disable,
        "SIMPLE" => TlsMode::Simple,
        "MUTUAL" => TlsMode::Mutual,
        "ISTIO_MUTUAL" => TlsMode::IstioMutual,
        other => {
            c.fail(
                Code::InvalidValue,
                format!("{field}.mode"),
                format!("`{other}` is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL"),
            );
            TlsMode::Disable
        }
    };
    let given = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
    let files = given(&t.client_certificate) || given(&t.private_key) || given(&t.ca_certificates);
    if t.credential_name.is_some() {
        c.fail(
            Code::Schema,
            format!("{field}.credentialName"),
            "`credentialName` (a Kubernetes Secret) is not supported yet; give clientCertificate, privateKey and caCertificates as files on the proxy's host",
        );
    }
    match mode {
        TlsMode::IstioMutual if files => c.fail(
            Code::InvalidValue,
            field,
            "ISTIO_MUTUAL uses the mesh's certificates; clientCertificate, privateKey and caCertificates are for SIMPLE and MUTUAL",
        ),
        TlsMode::Mutual if !given(&t.client_certificate) || !given(&t.private_key) => c.fail(
            Code::Missing,
            field,
            "MUTUAL needs clientCertificate and privateKey",
        ),
        TlsMode::Simple if given(&t.client_certificate) || given(&t.private_key) => c.fail(
            Code::InvalidValue,
            field,
            "a client certificate is for MUTUAL; SIMPLE sends none",
        ),
        _ => {}
    }
    if let Some(sni) = t.sni.as_deref() {
        if rustls_pki_server_name(sni).is_none() {
            c.fail(
                Code::InvalidValue,
                format!("{field}.sni"),
                format!("`{sni}` is not a server name"),
            );
        }
    }
    if c.rejected_since(mark) {
        return None;
    }
    Some(ClientTls {
        mode,
        client_certificate: t.client_certificate.clone().unwrap_or_default(),
        private_key: t.private_key.clone().unwrap_or_default(),
        ca_certificates: t.ca_certificates.clone().unwrap_or_default(),
        subject_alt_names: t.subject_alt_names.clone(),
        sni: t.sni.clone().unwrap_or_default(),
        insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
    })
}

/// Whether `s` can be sent as SNI: a DNS name (an IP address is never sent as SNI).
fn rustls_pki_server_name(s: &str) -> Option<()> {
    match rustls::pki_types::ServerName::try_from(s) {
        Ok(rustls::pki_types::ServerName::DnsName(_)) => Some(()),
        _ => None,
    }
}

/// A DestinationRule converted: (host, subsets, service-level policy).
pub fn destination_rule(
    c: &mut Checker<'_>,
    spec: &DestinationRuleSpec,
) -> (String, Vec<Subset>, TrafficPolicy) {
    unsupported(c, "spec.workloadSelector", &spec.workload_selector);
    let lb = traffic_policy(c, "spec.trafficPolicy", &spec.traffic_policy);
    let mut names = std::collections::BTreeSet::new();
    let subsets = spec
        .subsets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if !names.insert(s.name.clone()) {
                c.fail(
                    Code::Duplicate,
                    format!("spec.subsets[{i}].name"),
                    format!("subset `{}` is defined twice", s.name),
                );
            }
            Subset {
                name: s.name.clone(),
                labels: s.labels.clone(),
                policy: traffic_policy(
                    c,
                    &format!("spec.subsets[{i}].trafficPolicy"),
                    &s.traffic_policy,
                ),
            }
        })
        .collect();
    (spec.host.clone(), subsets, lb)
}
