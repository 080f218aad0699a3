//! Istio's `VirtualService`: its `http[]` and `tcp[]` routes as users write them, checked
//! and turned into [`crate::routing::HttpRoute`] and [`crate::routing::TcpRoute`] (hosts and
//! destinations are resolved to services by the validator).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::super::validate::Checker;
use super::super::Code;
use super::{
    duration, grpc_code, percentage, unsupported, PercentSpec, PortSelectorSpec, Unsupported,
};
use crate::routing::{
    Abort, Destination, Fault, HeaderOp, HeaderOps, HttpRoute, Mirror, Retries, Rewrite,
    RouteAction, RouteMatch, StringMatch, TcpRoute,
};

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

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StringMatchSpec {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationSpec {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelectorSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteDestinationSpec {
    pub destination: DestinationSpec,
    pub weight: Option<i64>,
    pub headers: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DirectResponseBodySpec {
    pub string: Option<String>,
    pub bytes: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DirectResponseSpec {
    pub status: i64,
    pub body: Option<DirectResponseBodySpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RewriteSpec {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetriesSpec {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
    pub retry_remote_localities: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DelaySpec {
    pub fixed_delay: Option<String>,
    pub percentage: Option<PercentSpec>,
    pub percent: Unsupported,
    pub exponential_delay: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AbortSpec {
    pub http_status: Option<i64>,
    pub grpc_status: Option<String>,
    pub percentage: Option<PercentSpec>,
    pub http2_error: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultSpec {
    pub delay: Option<DelaySpec>,
    pub abort: Option<AbortSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeadersSpec {
    pub request: Option<HeaderOpSpec>,
    pub response: Option<HeaderOpSpec>,
}

/// A VirtualService converted, with hosts not yet resolved to services.
#[derive(Debug, Clone)]
pub struct ParsedVirtualService {
    pub hosts: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<TcpRoute>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpRouteSpec {
    #[serde(rename = "match", default)]
    pub matches: Vec<L4MatchSpec>,
    #[serde(default)]
    pub route: Vec<RouteDestinationSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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
