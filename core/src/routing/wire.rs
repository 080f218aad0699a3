//! The wire form of [`ServiceRouting`] (`isthmus.routing.v1`, proto/routing.proto), both
//! ways, in one place. The controller encodes what its validator produced; a sidecar decodes
//! what arrived with [`TryFrom`], which checks every field again (ports, status codes,
//! percentages, nesting), since a push is a trust boundary: a message that does not convert
//! is NACKed and the last good config keeps serving. Fuzzed by `core/fuzz` (`routing`).

use std::collections::BTreeMap;

use isthmus_proto::routing as pb;

use super::*;

/// Why a pushed routing message was refused, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("routing field {field}: {reason}")]
pub struct WireError {
    pub field: String,
    pub reason: String,
}

fn err(field: &str, reason: impl Into<String>) -> WireError {
    WireError {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

fn port(field: &str, p: u32) -> Result<u16, WireError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| err(field, format!("{p} is not a port")))
}

fn status(field: &str, s: u32, range: std::ops::RangeInclusive<u16>) -> Result<u16, WireError> {
    u16::try_from(s)
        .ok()
        .filter(|s| range.contains(s))
        .ok_or_else(|| err(field, format!("{s} is not a status in {range:?}")))
}

fn percentage(field: &str, p: f64) -> Result<f64, WireError> {
    if p.is_finite() && (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(err(field, format!("{p} is not a percentage")))
    }
}

fn required<T>(field: &str, v: Option<T>) -> Result<T, WireError> {
    v.ok_or_else(|| err(field, "missing"))
}

// ---------------------------------------------------------------- core -> wire

impl From<&StringMatch> for pb::StringMatch {
    fn from(m: &StringMatch) -> Self {
        use pb::string_match::Kind;
        let kind = match m {
            StringMatch::Exact(s) => Kind::Exact(s.clone()),
            StringMatch::Prefix(s) => Kind::Prefix(s.clone()),
            StringMatch::Regex(s) => Kind::Regex(s.clone()),
        };
        Self { kind: Some(kind) }
    }
}

fn matches_to(m: &BTreeMap<String, StringMatch>) -> BTreeMap<String, pb::StringMatch> {
    m.iter().map(|(k, v)| (k.clone(), v.into())).collect()
}

impl From<&RouteMatch> for pb::RouteMatch {
    fn from(m: &RouteMatch) -> Self {
        Self {
            uri: m.uri.as_ref().map(Into::into),
            method: m.method.as_ref().map(Into::into),
            authority: m.authority.as_ref().map(Into::into),
            headers: matches_to(&m.headers),
            query_params: matches_to(&m.query_params),
            without_headers: matches_to(&m.without_headers),
            ignore_uri_case: m.ignore_uri_case,
            port: m.port.map(u32::from),
            source_labels: m.source_labels.clone(),
        }
    }
}

impl From<&Destination> for pb::Destination {
    fn from(d: &Destination) -> Self {
        Self {
            service: d.service.clone(),
            subset: d.subset.clone(),
            port: d.port.map(u32::from),
            weight: d.weight,
        }
    }
}

fn destinations_to(d: &[Destination]) -> Vec<pb::Destination> {
    d.iter().map(Into::into).collect()
}

impl From<&HeaderOp> for pb::HeaderOp {
    fn from(h: &HeaderOp) -> Self {
        Self {
            set: h.set.clone(),
            add: h.add.clone(),
            remove: h.remove.clone(),
        }
    }
}

impl From<&Fault> for pb::Fault {
    fn from(f: &Fault) -> Self {
        use pb::fault_abort::Status;
        Self {
            delay: f.delay.map(|(delay_ms, percentage)| pb::FaultDelay {
                delay_ms,
                percentage,
            }),
            abort: f.abort.as_ref().map(|(a, percentage)| pb::FaultAbort {
                status: Some(match a {
                    Abort::Http(c) => Status::Http(u32::from(*c)),
                    Abort::Grpc(c) => Status::Grpc(u32::from(*c)),
                }),
                percentage: *percentage,
            }),
        }
    }
}

impl From<&HttpRoute> for pb::HttpRoute {
    fn from(r: &HttpRoute) -> Self {
        use pb::http_route::Action;
        let action = match &r.action {
            RouteAction::Route(d) => Action::Route(pb::Destinations {
                destinations: destinations_to(d),
            }),
            RouteAction::Redirect {
                uri,
                authority,
                code,
            } => Action::Redirect(pb::Redirect {
                uri: uri.clone(),
                authority: authority.clone(),
                code: u32::from(*code),
            }),
            RouteAction::DirectResponse { status, body } => {
                Action::DirectResponse(pb::DirectResponse {
                    status: u32::from(*status),
                    body: body.clone(),
                })
            }
        };
        Self {
            name: r.name.clone(),
            matches: r.matches.iter().map(Into::into).collect(),
            action: Some(action),
            rewrite: r.rewrite.as_ref().map(|w| pb::Rewrite {
                uri: w.uri.clone(),
                authority: w.authority.clone(),
            }),
            timeout_ms: r.timeout_ms,
            retries: r.retries.as_ref().map(|t| pb::Retries {
                attempts: t.attempts,
                per_try_timeout_ms: t.per_try_timeout_ms,
                retry_on: t.retry_on.clone(),
            }),
            fault: r.fault.as_ref().map(Into::into),
            headers: Some(pb::HeaderOps {
                request: Some((&r.headers.request).into()),
                response: Some((&r.headers.response).into()),
            }),
            mirror: r.mirror.as_ref().map(|m| pb::Mirror {
                destination: Some((&m.destination).into()),
                percentage: m.percentage,
            }),
        }
    }
}

impl From<&LoadBalancer> for pb::LoadBalancer {
    fn from(lb: &LoadBalancer) -> Self {
        use pb::hash_on::Kind as H;
        use pb::load_balancer::{Kind, Simple};
        let kind = match lb {
            LoadBalancer::RoundRobin => Kind::Simple(Simple::RoundRobin as i32),
            LoadBalancer::LeastRequest => Kind::Simple(Simple::LeastRequest as i32),
            LoadBalancer::Random => Kind::Simple(Simple::Random as i32),
            LoadBalancer::ConsistentHash(on) => Kind::ConsistentHash(pb::HashOn {
                kind: Some(match on {
                    HashOn::Header(h) => H::Header(h.clone()),
                    HashOn::Cookie {
                        name,
                        path,
                        ttl_secs,
                    } => H::Cookie(pb::HashCookie {
                        name: name.clone(),
                        path: path.clone(),
                        ttl_secs: *ttl_secs,
                    }),
                    HashOn::SourceIp => H::SourceIp(true),
                    HashOn::QueryParameter(q) => H::QueryParameter(q.clone()),
                }),
            }),
        };
        Self { kind: Some(kind) }
    }
}

impl From<&TrafficPolicy> for pb::TrafficPolicy {
    fn from(p: &TrafficPolicy) -> Self {
        Self {
            load_balancer: p.load_balancer.as_ref().map(Into::into),
            outlier: p.outlier.as_ref().map(|o| pb::OutlierDetection {
                consecutive_5xx: o.consecutive_5xx,
                consecutive_gateway: o.consecutive_gateway,
                base_ejection_ms: o.base_ejection_ms,
                max_ejection_percent: o.max_ejection_percent,
                min_health_percent: o.min_health_percent,
            }),
            connection_pool: p.connection_pool.as_ref().map(|c| pb::ConnectionPool {
                max_requests: c.max_requests,
                max_pending: c.max_pending,
                max_retries: c.max_retries,
                connect_timeout_ms: c.connect_timeout_ms,
                max_requests_per_connection: c.max_requests_per_connection,
                idle_timeout_ms: c.idle_timeout_ms,
            }),
            locality: p.locality.as_ref().map(|l| pb::LocalityLb {
                enabled: l.enabled,
                failover: l
                    .failover
                    .iter()
                    .map(|(from, to)| pb::FailoverRule {
                        from: from.clone(),
                        to: to.clone(),
                    })
                    .collect(),
                distribute: l
                    .distribute
                    .iter()
                    .map(|(from, to)| pb::Distribute {
                        from: from.clone(),
                        to: to
                            .iter()
                            .map(|(locality, weight)| pb::WeightedLocality {
                                locality: locality.clone(),
                                weight: *weight,
                            })
                            .collect(),
                    })
                    .collect(),
                failover_priority: l.failover_priority.clone(),
            }),
            tls: p.tls.as_ref().map(|t| pb::ClientTls {
                mode: match t.mode {
                    TlsMode::Disable => pb::client_tls::Mode::Disable,
                    TlsMode::Simple => pb::client_tls::Mode::Simple,
                    TlsMode::Mutual => pb::client_tls::Mode::Mutual,
                    TlsMode::IstioMutual => pb::client_tls::Mode::IstioMutual,
                } as i32,
                client_certificate: t.client_certificate.clone(),
                private_key: t.private_key.clone(),
                ca_certificates: t.ca_certificates.clone(),
                subject_alt_names: t.subject_alt_names.clone(),
                sni: t.sni.clone(),
                insecure_skip_verify: t.insecure_skip_verify,
            }),
            ports: p
                .ports
                .iter()
                .map(|(port, policy)| pb::PortPolicy {
                    port: u32::from(*port),
                    policy: Some(policy.into()),
                })
                .collect(),
        }
    }
}

impl From<&ServiceRouting> for pb::ServiceRouting {
    fn from(r: &ServiceRouting) -> Self {
        Self {
            http: r.http.iter().map(Into::into).collect(),
            subsets: r
                .subsets
                .iter()
                .map(|s| pb::Subset {
                    name: s.name.clone(),
                    labels: s.labels.clone(),
                    policy: Some((&s.policy).into()),
                })
                .collect(),
            policy: Some((&r.policy).into()),
            rate_limits: r
                .rate_limits
                .iter()
                .map(|l| pb::RateLimit {
                    route: l.route.clone(),
                    tokens: l.tokens,
                    interval_ms: l.interval_ms,
                    burst: l.burst,
                    per_caller: l.per_caller,
                })
                .collect(),
            global_rate_limits: r
                .global_rate_limits
                .iter()
                .map(|l| pb::GlobalRateLimit {
                    name: l.name.clone(),
                    route: l.route.clone(),
                    requests_per_second: l.requests_per_second,
                })
                .collect(),
            tcp: r
                .tcp
                .iter()
                .map(|t| pb::TcpRoute {
                    ports: t.ports.iter().map(|p| u32::from(*p)).collect(),
                    destinations: destinations_to(&t.destinations),
                })
                .collect(),
            health_check: r.health_check.as_ref().map(Into::into),
        }
    }
}

impl From<&crate::routing::HealthCheck> for pb::HealthCheck {
    fn from(h: &crate::routing::HealthCheck) -> Self {
        use crate::routing::Probe;
        pb::HealthCheck {
            name: h.name.clone(),
            port: h.port.map(u32::from).unwrap_or_default(),
            probe: Some(match &h.probe {
                Probe::Http {
                    path,
                    host,
                    expected_statuses,
                } => pb::health_check::Probe::Http(pb::HttpHealthCheck {
                    path: path.clone(),
                    host: host.clone().unwrap_or_default(),
                    expected_statuses: expected_statuses
                        .iter()
                        .map(|(start, end)| pb::StatusRange {
                            start: u32::from(*start),
                            end: u32::from(*end),
                        })
                        .collect(),
                }),
                Probe::Grpc { service } => pb::health_check::Probe::Grpc(pb::GrpcHealthCheck {
                    service: service.clone(),
                }),
                Probe::Tcp => pb::health_check::Probe::Tcp(pb::TcpHealthCheck {}),
            }),
            interval_ms: h.interval_ms,
            timeout_ms: h.timeout_ms,
            jitter_ms: h.jitter_ms,
            healthy_threshold: h.healthy_threshold,
            unhealthy_threshold: h.unhealthy_threshold,
        }
    }
}

/// A pushed health check, checked as every pushed field is: a probe that could not run
/// (no path, no status range, a zero interval or threshold) is refused, not guessed at.
fn health_check(h: pb::HealthCheck) -> Result<crate::routing::HealthCheck, WireError> {
    use crate::routing::Probe;
    let at = |f: &str| format!("health_check.{f}");
    let port = match h.port {
        0 => None,
        p => Some(port(&at("port"), p)?),
    };
    let probe = match h.probe {
        Some(pb::health_check::Probe::Http(http)) => {
            if !http.path.starts_with('/') {
                return Err(err(&at("http.path"), "must start with `/`"));
            }
            let field = at("http.expected_statuses");
            let mut expected_statuses = Vec::new();
            for r in &http.expected_statuses {
                let (start, end) = (
                    status(&field, r.start, 100..=599)?,
                    status(&field, r.end, 100..=599)?,
                );
                if start > end {
                    return Err(err(&field, format!("{start}-{end} is an empty range")));
                }
                expected_statuses.push((start, end));
            }
            Probe::Http {
                path: http.path,
                host: Some(http.host).filter(|h| !h.is_empty()),
                expected_statuses,
            }
        }
        Some(pb::health_check::Probe::Grpc(g)) => Probe::Grpc { service: g.service },
        Some(pb::health_check::Probe::Tcp(_)) => Probe::Tcp,
        None => return Err(err(&at("probe"), "names no probe (http, grpc or tcp)")),
    };
    if h.interval_ms == 0 || h.timeout_ms == 0 {
        return Err(err(
            &at("interval_ms"),
            "interval and timeout must be positive",
        ));
    }
    if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
        return Err(err(&at("healthy_threshold"), "thresholds must be positive"));
    }
    Ok(crate::routing::HealthCheck {
        name: h.name,
        port,
        probe,
        interval_ms: h.interval_ms,
        timeout_ms: h.timeout_ms,
        jitter_ms: h.jitter_ms,
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
    })
}

// ---------------------------------------------------------------- wire -> core

fn string_match(field: &str, m: pb::StringMatch) -> Result<StringMatch, WireError> {
    use pb::string_match::Kind;
    Ok(match required(field, m.kind)? {
        Kind::Exact(s) => StringMatch::Exact(s),
        Kind::Prefix(s) => StringMatch::Prefix(s),
        Kind::Regex(s) => StringMatch::Regex(s),
    })
}

fn string_matches(
    field: &str,
    m: BTreeMap<String, pb::StringMatch>,
) -> Result<BTreeMap<String, StringMatch>, WireError> {
    m.into_iter()
        .map(|(k, v)| Ok((k.clone(), string_match(&format!("{field}[{k}]"), v)?)))
        .collect()
}

fn route_match(field: &str, m: pb::RouteMatch) -> Result<RouteMatch, WireError> {
    let opt = |name: &str, v: Option<pb::StringMatch>| {
        v.map(|v| string_match(&format!("{field}.{name}"), v))
            .transpose()
    };
    Ok(RouteMatch {
        uri: opt("uri", m.uri)?,
        method: opt("method", m.method)?,
        authority: opt("authority", m.authority)?,
        headers: string_matches(&format!("{field}.headers"), m.headers)?,
        query_params: string_matches(&format!("{field}.query_params"), m.query_params)?,
        without_headers: string_matches(&format!("{field}.without_headers"), m.without_headers)?,
        ignore_uri_case: m.ignore_uri_case,
        port: m
            .port
            .map(|p| port(&format!("{field}.port"), p))
            .transpose()?,
        source_labels: m.source_labels,
    })
}

fn destination(field: &str, d: pb::Destination) -> Result<Destination, WireError> {
    if d.service
        .split_once('/')
        .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty())
    {
        return Err(err(
            &format!("{field}.service"),
            format!("`{}` is not namespace/name", d.service),
        ));
    }
    Ok(Destination {
        service: d.service,
        subset: d.subset,
        port: d
            .port
            .map(|p| port(&format!("{field}.port"), p))
            .transpose()?,
        weight: d.weight,
    })
}

fn destinations(field: &str, d: Vec<pb::Destination>) -> Result<Vec<Destination>, WireError> {
    d.into_iter()
        .enumerate()
        .map(|(i, d)| destination(&format!("{field}[{i}]"), d))
        .collect()
}

fn header_op(h: Option<pb::HeaderOp>) -> HeaderOp {
    let h = h.unwrap_or_default();
    HeaderOp {
        set: h.set,
        add: h.add,
        remove: h.remove,
    }
}

fn fault(field: &str, f: pb::Fault) -> Result<Fault, WireError> {
    use pb::fault_abort::Status;
    let delay = f
        .delay
        .map(|d| {
            Ok::<_, WireError>((
                d.delay_ms,
                percentage(&format!("{field}.delay.percentage"), d.percentage)?,
            ))
        })
        .transpose()?;
    let abort = f
        .abort
        .map(|a| {
            let at = |s: &str| format!("{field}.abort.{s}");
            let abort = match required(&at("status"), a.status)? {
                Status::Http(c) => Abort::Http(status(&at("http"), c, 200..=599)?),
                Status::Grpc(c) => Abort::Grpc(
                    u8::try_from(c)
                        .ok()
                        .filter(|c| *c <= 16)
                        .ok_or_else(|| err(&at("grpc"), format!("{c} is not a gRPC status")))?,
                ),
            };
            Ok::<_, WireError>((abort, percentage(&at("percentage"), a.percentage)?))
        })
        .transpose()?;
    Ok(Fault { delay, abort })
}

fn http_route(field: &str, r: pb::HttpRoute) -> Result<HttpRoute, WireError> {
    use pb::http_route::Action;
    let at = |s: &str| format!("{field}.{s}");
    let action = match required(&at("action"), r.action)? {
        Action::Route(d) => RouteAction::Route(destinations(&at("route"), d.destinations)?),
        Action::Redirect(rd) => RouteAction::Redirect {
            uri: rd.uri,
            authority: rd.authority,
            code: status(&at("redirect.code"), rd.code, 300..=399)?,
        },
        Action::DirectResponse(d) => RouteAction::DirectResponse {
            status: status(&at("direct_response.status"), d.status, 100..=599)?,
            body: d.body,
        },
    };
    let headers = r.headers.unwrap_or_default();
    Ok(HttpRoute {
        name: r.name,
        matches: r
            .matches
            .into_iter()
            .enumerate()
            .map(|(i, m)| route_match(&at(&format!("matches[{i}]")), m))
            .collect::<Result<_, _>>()?,
        action,
        rewrite: r.rewrite.map(|w| Rewrite {
            uri: w.uri,
            authority: w.authority,
        }),
        timeout_ms: r.timeout_ms,
        retries: r.retries.map(|t| Retries {
            attempts: t.attempts,
            per_try_timeout_ms: t.per_try_timeout_ms,
            retry_on: t.retry_on,
        }),
        fault: r.fault.map(|f| fault(&at("fault"), f)).transpose()?,
        headers: HeaderOps {
            request: header_op(headers.request),
            response: header_op(headers.response),
        },
        mirror: r
            .mirror
            .map(|m| {
                Ok::<_, WireError>(Mirror {
                    destination: destination(
                        &at("mirror.destination"),
                        required(&at("mirror.destination"), m.destination)?,
                    )?,
                    percentage: percentage(&at("mirror.percentage"), m.percentage)?,
                })
            })
            .transpose()?,
    })
}

fn load_balancer(field: &str, lb: pb::LoadBalancer) -> Result<LoadBalancer, WireError> {
    use pb::hash_on::Kind as H;
    use pb::load_balancer::{Kind, Simple};
    Ok(match required(field, lb.kind)? {
        Kind::Simple(s) => match Simple::try_from(s) {
            Ok(Simple::RoundRobin) => LoadBalancer::RoundRobin,
            Ok(Simple::LeastRequest) => LoadBalancer::LeastRequest,
            Ok(Simple::Random) => LoadBalancer::Random,
            Err(_) => return Err(err(field, format!("{s} is not a load balancer"))),
        },
        Kind::ConsistentHash(h) => LoadBalancer::ConsistentHash(match required(field, h.kind)? {
            H::Header(h) => HashOn::Header(h),
            H::Cookie(c) => HashOn::Cookie {
                name: c.name,
                path: c.path,
                ttl_secs: c.ttl_secs,
            },
            H::SourceIp(_) => HashOn::SourceIp,
            H::QueryParameter(q) => HashOn::QueryParameter(q),
        }),
    })
}

fn locality_lb(field: &str, l: pb::LocalityLb) -> Result<LocalityLb, WireError> {
    let distribute = l
        .distribute
        .into_iter()
        .map(|d| {
            let total: u64 = d.to.iter().map(|w| u64::from(w.weight)).sum();
            if total == 0 || total > 100 {
                return Err(err(
                    &format!("{field}.distribute[{}]", d.from),
                    format!("weights sum to {total}, not 1..=100"),
                ));
            }
            Ok((
                d.from,
                d.to.into_iter().map(|w| (w.locality, w.weight)).collect(),
            ))
        })
        .collect::<Result<_, _>>()?;
    Ok(LocalityLb {
        enabled: l.enabled,
        failover: l.failover.into_iter().map(|f| (f.from, f.to)).collect(),
        distribute,
        failover_priority: l.failover_priority,
    })
}

/// A policy; `nested` is true inside `portLevelSettings`, which has no ports of its own.
fn traffic_policy(
    field: &str,
    p: Option<pb::TrafficPolicy>,
    nested: bool,
) -> Result<TrafficPolicy, WireError> {
    let p = p.unwrap_or_default();
    let at = |s: &str| format!("{field}.{s}");
    if nested && !p.ports.is_empty() {
        return Err(err(&at("ports"), "a port's policy has no ports of its own"));
    }
    let outlier = p
        .outlier
        .map(|o| {
            if o.max_ejection_percent > 100 || o.min_health_percent > 100 {
                return Err(err(&at("outlier"), "a percentage is over 100"));
            }
            Ok(OutlierDetection {
                consecutive_5xx: o.consecutive_5xx,
                consecutive_gateway: o.consecutive_gateway,
                base_ejection_ms: o.base_ejection_ms,
                max_ejection_percent: o.max_ejection_percent,
                min_health_percent: o.min_health_percent,
            })
        })
        .transpose()?;
    Ok(TrafficPolicy {
        load_balancer: p
            .load_balancer
            .map(|lb| load_balancer(&at("load_balancer"), lb))
            .transpose()?,
        outlier,
        connection_pool: p.connection_pool.map(|c| ConnectionPool {
            max_requests: c.max_requests,
            max_pending: c.max_pending,
            max_retries: c.max_retries,
            connect_timeout_ms: c.connect_timeout_ms,
            max_requests_per_connection: c.max_requests_per_connection,
            idle_timeout_ms: c.idle_timeout_ms,
        }),
        locality: p
            .locality
            .map(|l| locality_lb(&at("locality"), l))
            .transpose()?,
        tls: p
            .tls
            .map(|t| {
                let mode = match pb::client_tls::Mode::try_from(t.mode) {
                    Ok(pb::client_tls::Mode::Disable) => TlsMode::Disable,
                    Ok(pb::client_tls::Mode::Simple) => TlsMode::Simple,
                    Ok(pb::client_tls::Mode::Mutual) => TlsMode::Mutual,
                    Ok(pb::client_tls::Mode::IstioMutual) => TlsMode::IstioMutual,
                    Err(_) => return Err(err(&at("tls.mode"), "not a TLS mode")),
                };
                Ok(ClientTls {
                    mode,
                    client_certificate: t.client_certificate,
                    private_key: t.private_key,
                    ca_certificates: t.ca_certificates,
                    subject_alt_names: t.subject_alt_names,
                    sni: t.sni,
                    insecure_skip_verify: t.insecure_skip_verify,
                })
            })
            .transpose()?,
        ports: p
            .ports
            .into_iter()
            .enumerate()
            .map(|(i, pp)| {
                let here = at(&format!("ports[{i}]"));
                Ok((
                    port(&format!("{here}.port"), pp.port)?,
                    traffic_policy(&format!("{here}.policy"), pp.policy, true)?,
                ))
            })
            .collect::<Result<_, _>>()?,
    })
}

impl TryFrom<pb::ServiceRouting> for ServiceRouting {
    type Error = WireError;

    fn try_from(r: pb::ServiceRouting) -> Result<Self, WireError> {
        let http = r
            .http
            .into_iter()
            .enumerate()
            .map(|(i, h)| http_route(&format!("http[{i}]"), h))
            .collect::<Result<_, _>>()?;
        let subsets = r
            .subsets
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                Ok(Subset {
                    policy: traffic_policy(&format!("subsets[{i}].policy"), s.policy, false)?,
                    name: s.name,
                    labels: s.labels,
                })
            })
            .collect::<Result<_, WireError>>()?;
        let rate_limits = r
            .rate_limits
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                if l.tokens == 0 || l.interval_ms == 0 {
                    return Err(err(
                        &format!("rate_limits[{i}]"),
                        "tokens and interval must be positive",
                    ));
                }
                Ok(RateLimit {
                    route: l.route,
                    tokens: l.tokens,
                    interval_ms: l.interval_ms,
                    burst: l.burst,
                    per_caller: l.per_caller,
                })
            })
            .collect::<Result<_, _>>()?;
        let global_rate_limits = r
            .global_rate_limits
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                if l.requests_per_second == 0 || l.name.is_empty() || l.name.contains('/') {
                    return Err(err(
                        &format!("global_rate_limits[{i}]"),
                        "needs a name without `/` and a positive budget",
                    ));
                }
                Ok(crate::routing::GlobalRateLimit {
                    name: l.name,
                    route: l.route,
                    requests_per_second: l.requests_per_second,
                })
            })
            .collect::<Result<_, _>>()?;
        let tcp = r
            .tcp
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let at = format!("tcp[{i}]");
                Ok(TcpRoute {
                    ports: t
                        .ports
                        .into_iter()
                        .map(|p| port(&format!("{at}.ports"), p))
                        .collect::<Result<_, _>>()?,
                    destinations: destinations(&format!("{at}.destinations"), t.destinations)?,
                })
            })
            .collect::<Result<_, WireError>>()?;
        let health_check = r.health_check.map(health_check).transpose()?;
        Ok(ServiceRouting {
            virtual_service_scope: None,
            destination_rule_scope: None,
            http,
            subsets,
            policy: traffic_policy("policy", r.policy, false)?,
            rate_limits,
            global_rate_limits,
            health_check,
            tcp,
        })
    }
}

#[cfg(test)]
mod tests;
