//! Istio's `VirtualService` and `DestinationRule` as users write them, and their conversion
//! into [`crate::routing`]. Fields Istio defines that Isthmus does not implement yet are
//! parsed so that the error can name them ("not supported yet"), never silently dropped.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::validate::Checker;
use super::Code;
use crate::routing::TcpRoute;
use crate::routing::{
    Abort, ConnectionPool, Destination, Fault, HashOn, HeaderOp, HeaderOps, HttpRoute,
    LoadBalancer, LocalityLb, Mirror, OutlierDetection, Retries, Rewrite, RouteAction, RouteMatch,
    StringMatch, Subset, TrafficPolicy,
};

type Unsupported = Option<serde_yaml_ng::Value>;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRouteSpec>,
    #[serde(default)]
    pub tcp: Vec<TcpRouteSpec>,
    pub tls: Unsupported,
    pub export_to: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    pub name: Option<String>,
    #[serde(rename = "match", default)]
    pub matches: Vec<MatchSpec>,
    #[serde(default)]
    pub route: Vec<RouteDestinationSpec>,
    pub redirect: Option<RedirectSpec>,
    pub direct_response: Option<DirectResponseSpec>,
    pub rewrite: Option<RewriteSpec>,
    pub timeout: Option<String>,
    pub retries: Option<RetriesSpec>,
    pub fault: Option<FaultSpec>,
    pub headers: Option<HeadersSpec>,
    pub mirror: Option<DestinationSpec>,
    pub mirror_percentage: Option<PercentSpec>,
    /// Deprecated integer form of `mirrorPercentage`.
    pub mirror_percent: Option<i64>,
    pub mirrors: Unsupported,
    pub cors_policy: Unsupported,
    pub delegate: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StringMatchSpec {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchSpec {
    pub name: Option<String>,
    pub uri: Option<StringMatchSpec>,
    pub method: Option<StringMatchSpec>,
    pub authority: Option<StringMatchSpec>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    pub ignore_uri_case: bool,
    pub port: Option<i64>,
    pub scheme: Unsupported,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Unsupported,
    pub gateways: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSelectorSpec {
    pub number: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationSpec {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelectorSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteDestinationSpec {
    pub destination: DestinationSpec,
    pub weight: Option<i64>,
    pub headers: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedirectSpec {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub redirect_code: Option<i64>,
    pub port: Unsupported,
    pub derive_port: Unsupported,
    pub scheme: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DirectResponseBodySpec {
    pub string: Option<String>,
    pub bytes: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DirectResponseSpec {
    pub status: i64,
    pub body: Option<DirectResponseBodySpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RewriteSpec {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetriesSpec {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
    pub retry_remote_localities: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PercentSpec {
    pub value: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DelaySpec {
    pub fixed_delay: Option<String>,
    pub percentage: Option<PercentSpec>,
    pub percent: Unsupported,
    pub exponential_delay: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AbortSpec {
    pub http_status: Option<i64>,
    pub grpc_status: Option<String>,
    pub percentage: Option<PercentSpec>,
    pub http2_error: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultSpec {
    pub delay: Option<DelaySpec>,
    pub abort: Option<AbortSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderOpSpec {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeadersSpec {
    pub request: Option<HeaderOpSpec>,
    pub response: Option<HeaderOpSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicySpec>,
    #[serde(default)]
    pub subsets: Vec<SubsetSpec>,
    pub export_to: Unsupported,
    pub workload_selector: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub load_balancer: Option<LoadBalancerSpec>,
    pub connection_pool: Option<ConnectionPoolSpec>,
    pub outlier_detection: Option<OutlierDetectionSpec>,
    pub tls: Unsupported,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicySpec>,
    pub tunnel: Unsupported,
    pub proxy_protocol: Unsupported,
}

/// A `portLevelSettings` entry: a traffic policy for one port of the service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortTrafficPolicySpec {
    pub port: PortSelectorSpec,
    pub load_balancer: Option<LoadBalancerSpec>,
    pub connection_pool: Option<ConnectionPoolSpec>,
    pub outlier_detection: Option<OutlierDetectionSpec>,
    pub tls: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHashSpec>,
    pub locality_lb_setting: Option<LocalityLbSpec>,
    pub warmup_duration_secs: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SubsetSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicySpec>,
}

#[derive(Debug, Clone, Deserialize)]
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
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPoolSpec {
    pub tcp: Option<TcpPoolSpec>,
    pub http: Option<HttpPoolSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpPoolSpec {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<String>,
    pub tcp_keepalive: Unsupported,
    pub max_connection_duration: Unsupported,
    pub idle_timeout: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
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

fn count(c: &mut Checker<'_>, field: &str, v: Option<i64>, max: i64) -> Option<u32> {
    let v = v?;
    if (0..=max).contains(&v) {
        Some(v as u32)
    } else {
        c.fail(
            Code::InvalidValue,
            field,
            format!("{v} is out of range (0-{max})"),
        );
        None
    }
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
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FailoverSpec {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Deserialize)]
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

/// A VirtualService converted, with hosts not yet resolved to services.
#[derive(Debug, Clone)]
pub struct ParsedVirtualService {
    pub hosts: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<TcpRoute>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpRouteSpec {
    #[serde(rename = "match", default)]
    pub matches: Vec<L4MatchSpec>,
    #[serde(default)]
    pub route: Vec<RouteDestinationSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct L4MatchSpec {
    pub port: Option<i64>,
    pub destination_subnets: Unsupported,
    pub source_labels: Unsupported,
    pub source_namespace: Unsupported,
    pub gateways: Unsupported,
}

/// `route[]` destinations with their weights, which must add up to 100.
fn weighted_destinations(
    c: &mut Checker<'_>,
    field: &str,
    routes: &[RouteDestinationSpec],
) -> Vec<Destination> {
    let mut destinations = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        let f = format!("{field}.route[{i}]");
        unsupported(c, &format!("{f}.headers"), &r.headers);
        let weight = match r.weight {
            None if routes.len() == 1 => 100,
            None => 0,
            Some(w) if (0..=100).contains(&w) => w as u32,
            Some(w) => {
                c.fail(
                    Code::InvalidValue,
                    format!("{f}.weight"),
                    format!("{w} is not a weight (0-100)"),
                );
                0
            }
        };
        let port = r
            .destination
            .port
            .as_ref()
            .and_then(|p| c.port(&format!("{f}.destination.port.number"), p.number));
        destinations.push(Destination {
            service: r.destination.host.clone(),
            subset: r.destination.subset.clone(),
            port,
            weight,
        });
    }
    let total: u32 = destinations.iter().map(|d| d.weight).sum();
    if total != 100 {
        c.fail(
            Code::InvalidValue,
            format!("{field}.route"),
            format!("weights add up to {total}, not 100"),
        );
    }
    destinations
}

fn tcp_route(c: &mut Checker<'_>, field: &str, t: &TcpRouteSpec) -> TcpRoute {
    let mut ports = Vec::new();
    for (i, m) in t.matches.iter().enumerate() {
        let f = format!("{field}.match[{i}]");
        for (name, v) in [
            ("destinationSubnets", &m.destination_subnets),
            ("sourceLabels", &m.source_labels),
            ("sourceNamespace", &m.source_namespace),
            ("gateways", &m.gateways),
        ] {
            unsupported(c, &format!("{f}.{name}"), v);
        }
        if let Some(p) = m.port.and_then(|p| c.port(&format!("{f}.port"), p)) {
            ports.push(p);
        }
    }
    let destinations = weighted_destinations(c, field, &t.route);
    TcpRoute {
        ports,
        destinations,
    }
}

fn unsupported(c: &mut Checker<'_>, field: &str, value: &Unsupported) {
    if value.is_some() {
        c.fail(
            Code::Schema,
            field,
            format!(
                "`{}` is not supported yet",
                field.rsplit('.').next().unwrap_or(field)
            ),
        );
    }
}

/// Parses an Istio duration ("1.5s", "100ms", "2m", "1h") into milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let (num, factor) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        return None;
    };
    let v: f64 = num.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| (v * factor).round() as u64)
}

fn duration(c: &mut Checker<'_>, field: &str, s: &str) -> Option<u64> {
    let d = parse_duration_ms(s);
    if d.is_none() {
        c.fail(
            Code::InvalidValue,
            field,
            format!("`{s}` is not a duration like 1.5s or 100ms"),
        );
    }
    d
}

fn string_match(c: &mut Checker<'_>, field: &str, m: &StringMatchSpec) -> Option<StringMatch> {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), None, None) => Some(StringMatch::Exact(e.clone())),
        (None, Some(p), None) => Some(StringMatch::Prefix(p.clone())),
        (None, None, Some(r)) => match regex::Regex::new(&format!("^(?:{r})$")) {
            Ok(_) => Some(StringMatch::Regex(r.clone())),
            Err(e) => {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.regex"),
                    format!("invalid regex: {e}"),
                );
                None
            }
        },
        _ => {
            c.fail(
                Code::InvalidValue,
                field,
                "exactly one of exact, prefix, regex is required",
            );
            None
        }
    }
}

fn string_matches(
    c: &mut Checker<'_>,
    field: &str,
    m: &BTreeMap<String, StringMatchSpec>,
) -> BTreeMap<String, StringMatch> {
    m.iter()
        .filter_map(|(k, v)| {
            Some((
                k.to_ascii_lowercase(),
                string_match(c, &format!("{field}.{k}"), v)?,
            ))
        })
        .collect()
}

fn route_match(c: &mut Checker<'_>, field: &str, m: &MatchSpec) -> RouteMatch {
    for (name, value) in [
        ("scheme", &m.scheme),
        ("sourceNamespace", &m.source_namespace),
        ("gateways", &m.gateways),
    ] {
        unsupported(c, &format!("{field}.{name}"), value);
    }
    let opt = |c: &mut Checker<'_>, name: &str, v: &Option<StringMatchSpec>| {
        v.as_ref()
            .and_then(|v| string_match(c, &format!("{field}.{name}"), v))
    };
    RouteMatch {
        uri: opt(c, "uri", &m.uri),
        method: opt(c, "method", &m.method),
        authority: opt(c, "authority", &m.authority),
        headers: string_matches(c, &format!("{field}.headers"), &m.headers),
        query_params: m
            .query_params
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    k.clone(),
                    string_match(c, &format!("{field}.queryParams.{k}"), v)?,
                ))
            })
            .collect(),
        without_headers: string_matches(c, &format!("{field}.withoutHeaders"), &m.without_headers),
        ignore_uri_case: m.ignore_uri_case,
        port: m.port.and_then(|p| c.port(&format!("{field}.port"), p)),
        source_labels: m.source_labels.clone(),
    }
}

/// `mirrorPercentage`, or the deprecated `mirrorPercent` mapped as Istio maps it.
fn mirror_share(c: &mut Checker<'_>, field: &str, h: &HttpRouteSpec) -> f64 {
    let (Some(legacy), None) = (h.mirror_percent, &h.mirror_percentage) else {
        return percentage(c, &format!("{field}.mirror"), &h.mirror_percentage);
    };
    let at = format!("{field}.mirrorPercent");
    c.fail(
        Code::Deprecated,
        &at,
        "deprecated: read as mirrorPercentage.value (use that)",
    );
    if (0..=100).contains(&legacy) {
        legacy as f64
    } else {
        c.fail(
            Code::InvalidValue,
            at,
            format!("{legacy} is not a percentage (0-100)"),
        );
        0.0
    }
}

fn percentage(c: &mut Checker<'_>, field: &str, p: &Option<PercentSpec>) -> f64 {
    match p {
        None => 100.0,
        Some(p) if (0.0..=100.0).contains(&p.value) => p.value,
        Some(p) => {
            c.fail(
                Code::InvalidValue,
                format!("{field}.percentage.value"),
                format!("{} is not a percentage (0-100)", p.value),
            );
            0.0
        }
    }
}

/// gRPC status names as Istio spells them.
pub fn grpc_code(name: &str) -> Option<u8> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as u8)
}

fn fault(c: &mut Checker<'_>, field: &str, f: &FaultSpec) -> Fault {
    let delay = f.delay.as_ref().and_then(|d| {
        unsupported(c, &format!("{field}.delay.percent"), &d.percent);
        unsupported(
            c,
            &format!("{field}.delay.exponentialDelay"),
            &d.exponential_delay,
        );
        let Some(fixed) = &d.fixed_delay else {
            c.fail(
                Code::Missing,
                format!("{field}.delay.fixedDelay"),
                "a delay needs fixedDelay",
            );
            return None;
        };
        Some((
            duration(c, &format!("{field}.delay.fixedDelay"), fixed)?,
            percentage(c, &format!("{field}.delay"), &d.percentage),
        ))
    });
    let abort = f.abort.as_ref().and_then(|a| {
        unsupported(c, &format!("{field}.abort.http2Error"), &a.http2_error);
        let pct = percentage(c, &format!("{field}.abort"), &a.percentage);
        match (a.http_status, &a.grpc_status) {
            (Some(s), None) if (200..=599).contains(&s) => Some((Abort::Http(s as u16), pct)),
            (None, Some(g)) => match grpc_code(g) {
                Some(code) => Some((Abort::Grpc(code), pct)),
                None => {
                    c.fail(
                        Code::InvalidValue,
                        format!("{field}.abort.grpcStatus"),
                        format!("`{g}` is not a gRPC status name"),
                    );
                    None
                }
            },
            _ => {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.abort"),
                    "an abort needs one httpStatus (200-599) or grpcStatus",
                );
                None
            }
        }
    });
    Fault { delay, abort }
}

/// Retry conditions the sidecar understands (Envoy's names and gRPC status names).
pub const RETRY_ON: [&str; 12] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "envoy-ratelimited",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn retries(c: &mut Checker<'_>, field: &str, r: &RetriesSpec) -> Retries {
    unsupported(
        c,
        &format!("{field}.retryRemoteLocalities"),
        &r.retry_remote_localities,
    );
    let attempts = match r.attempts {
        None => 2,
        Some(n) if (0..=10).contains(&n) => n as u32,
        Some(n) => {
            c.fail(
                Code::InvalidValue,
                format!("{field}.attempts"),
                format!("{n} is out of range (0-10)"),
            );
            0
        }
    };
    let retry_on: Vec<String> = r
        .retry_on
        .as_deref()
        .unwrap_or("connect-failure,refused-stream,unavailable,cancelled")
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    for cond in &retry_on {
        if !RETRY_ON.contains(&cond.as_str()) {
            c.fail(
                Code::InvalidValue,
                format!("{field}.retryOn"),
                format!(
                    "`{cond}` is not a retry condition; supported: {}",
                    RETRY_ON.join(", ")
                ),
            );
        }
    }
    let per_try_timeout_ms = r
        .per_try_timeout
        .as_deref()
        .and_then(|d| duration(c, &format!("{field}.perTryTimeout"), d));
    Retries {
        attempts,
        per_try_timeout_ms,
        retry_on,
    }
}

fn header_op(c: &mut Checker<'_>, field: &str, op: &Option<HeaderOpSpec>) -> HeaderOp {
    let Some(op) = op else {
        return HeaderOp::default();
    };
    for name in op.set.keys().chain(op.add.keys()).chain(op.remove.iter()) {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            c.fail(
                Code::InvalidValue,
                field,
                format!("`{name}` is not a header name"),
            );
        }
    }
    for value in op.set.values().chain(op.add.values()) {
        if http::HeaderValue::from_str(value).is_err() {
            c.fail(
                Code::InvalidValue,
                field,
                format!("`{value}` is not a header value"),
            );
        }
    }
    HeaderOp {
        set: op
            .set
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
        add: op
            .add
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
        remove: op.remove.iter().map(|k| k.to_ascii_lowercase()).collect(),
    }
}

fn action(c: &mut Checker<'_>, field: &str, h: &HttpRouteSpec) -> Option<RouteAction> {
    let kinds = usize::from(!h.route.is_empty())
        + usize::from(h.redirect.is_some())
        + usize::from(h.direct_response.is_some());
    if kinds != 1 {
        c.fail(
            Code::InvalidValue,
            field,
            "a route needs exactly one of route, redirect, directResponse",
        );
        return None;
    }
    if let Some(r) = &h.redirect {
        for (name, v) in [
            ("port", &r.port),
            ("derivePort", &r.derive_port),
            ("scheme", &r.scheme),
        ] {
            unsupported(c, &format!("{field}.redirect.{name}"), v);
        }
        let code = r.redirect_code.unwrap_or(301);
        if ![301, 302, 303, 307, 308].contains(&code) {
            c.fail(
                Code::InvalidValue,
                format!("{field}.redirect.redirectCode"),
                format!("{code} is not a redirect status"),
            );
        }
        return Some(RouteAction::Redirect {
            uri: r.uri.clone(),
            authority: r.authority.clone(),
            code: code as u16,
        });
    }
    if let Some(d) = &h.direct_response {
        if !(200..=599).contains(&d.status) {
            c.fail(
                Code::InvalidValue,
                format!("{field}.directResponse.status"),
                format!("{} is not an HTTP status", d.status),
            );
        }
        if let Some(b) = &d.body {
            unsupported(c, &format!("{field}.directResponse.body.bytes"), &b.bytes);
        }
        let body = d
            .body
            .as_ref()
            .and_then(|b| b.string.clone())
            .unwrap_or_default();
        return Some(RouteAction::DirectResponse {
            status: d.status.clamp(200, 599) as u16,
            body,
        });
    }
    let destinations = weighted_destinations(c, field, &h.route);
    Some(RouteAction::Route(destinations))
}

fn http_route(c: &mut Checker<'_>, field: &str, h: &HttpRouteSpec) -> Option<HttpRoute> {
    for (name, v) in [
        ("mirrors", &h.mirrors),
        ("corsPolicy", &h.cors_policy),
        ("delegate", &h.delegate),
    ] {
        unsupported(c, &format!("{field}.{name}"), v);
    }
    let matches = h
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| route_match(c, &format!("{field}.match[{i}]"), m))
        .collect();
    let action = action(c, field, h)?;
    let rewrite = h.rewrite.as_ref().map(|r| {
        unsupported(
            c,
            &format!("{field}.rewrite.uriRegexRewrite"),
            &r.uri_regex_rewrite,
        );
        Rewrite {
            uri: r.uri.clone(),
            authority: r.authority.clone(),
        }
    });
    let headers = h.headers.as_ref().map(|hs| HeaderOps {
        request: header_op(c, &format!("{field}.headers.request"), &hs.request),
        response: header_op(c, &format!("{field}.headers.response"), &hs.response),
    });
    Some(HttpRoute {
        name: h.name.clone().unwrap_or_default(),
        matches,
        action,
        rewrite,
        timeout_ms: h
            .timeout
            .as_deref()
            .and_then(|t| duration(c, &format!("{field}.timeout"), t)),
        retries: h
            .retries
            .as_ref()
            .map(|r| retries(c, &format!("{field}.retries"), r)),
        fault: h
            .fault
            .as_ref()
            .map(|f| fault(c, &format!("{field}.fault"), f)),
        headers: headers.unwrap_or_default(),
        mirror: h.mirror.as_ref().map(|m| Mirror {
            destination: Destination {
                service: m.host.clone(),
                subset: m.subset.clone(),
                port: m
                    .port
                    .as_ref()
                    .and_then(|p| c.port(&format!("{field}.mirror.port.number"), p.number)),
                weight: 100,
            },
            percentage: mirror_share(c, field, h),
        }),
    })
}

pub fn virtual_service(
    c: &mut Checker<'_>,
    spec: &VirtualServiceSpec,
) -> Option<ParsedVirtualService> {
    let tcp = spec
        .tcp
        .iter()
        .enumerate()
        .map(|(i, t)| tcp_route(c, &format!("spec.tcp[{i}]"), t))
        .collect();
    unsupported(c, "spec.tls", &spec.tls);
    unsupported(c, "spec.exportTo", &spec.export_to);
    if spec.hosts.is_empty() {
        c.fail(
            Code::Missing,
            "spec.hosts",
            "a VirtualService needs at least one host",
        );
    }
    for (i, g) in spec.gateways.iter().enumerate() {
        if g != "mesh" {
            c.fail(
                Code::Schema,
                format!("spec.gateways[{i}]"),
                format!("gateway `{g}` is not supported yet; only `mesh`"),
            );
        }
    }
    let http = spec
        .http
        .iter()
        .enumerate()
        .filter_map(|(i, h)| http_route(c, &format!("spec.http[{i}]"), h))
        .collect();
    Some(ParsedVirtualService {
        hosts: spec.hosts.clone(),
        http,
        tcp,
    })
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
        ports: p
            .port_level_settings
            .iter()
            .enumerate()
            .filter_map(|(i, pl)| {
                let f = format!("{field}.portLevelSettings[{i}]");
                unsupported(c, &format!("{f}.tls"), &pl.tls);
                let port = c.port(&format!("{f}.port.number"), pl.port.number)?;
                // The same parsing as the service level, for this port's settings.
                let spec = TrafficPolicySpec {
                    load_balancer: pl.load_balancer.clone(),
                    connection_pool: pl.connection_pool.clone(),
                    outlier_detection: pl.outlier_detection.clone(),
                    tls: None,
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
    for (name, v) in [
        ("tls", &p.tls),
        ("tunnel", &p.tunnel),
        ("proxyProtocol", &p.proxy_protocol),
    ] {
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

/// A DestinationRule converted: (host, subsets, service-level policy).
pub fn destination_rule(
    c: &mut Checker<'_>,
    spec: &DestinationRuleSpec,
) -> (String, Vec<Subset>, TrafficPolicy) {
    unsupported(c, "spec.exportTo", &spec.export_to);
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

#[cfg(test)]
mod tests {
    use super::parse_duration_ms;

    #[test]
    fn durations_parse_like_istio() {
        assert_eq!(parse_duration_ms("1.5s"), Some(1500));
        assert_eq!(parse_duration_ms("100ms"), Some(100));
        assert_eq!(parse_duration_ms("2m"), Some(120_000));
        assert_eq!(parse_duration_ms("10"), None);
        assert_eq!(parse_duration_ms("-1s"), None);
    }
}
