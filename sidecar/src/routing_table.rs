//! Istio `VirtualService` / `DestinationRule` semantics on the request path: the routing
//! pushed with a service is compiled once per config change (regexes, header names), then
//! each request finds the first matching route, its weighted destination, its faults,
//! rewrites and header operations.

use std::collections::BTreeMap;

use http::header::HeaderName;
use http::HeaderMap;
use std::sync::Arc;

use isthmus_core::routing::{
    Destination, HeaderOp, HttpRoute, RateLimit, RouteMatch, ServiceRouting, StringMatch,
    TrafficPolicy,
};

use crate::breaker::Breaker;
use crate::lb::Thresholds;
use regex::Regex;

#[derive(Debug)]
enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl Matcher {
    fn compile(m: &StringMatch, ignore_case: bool) -> Result<Self, String> {
        let lower = |s: &String| {
            if ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.clone()
            }
        };
        Ok(match m {
            StringMatch::Exact(s) => Matcher::Exact(lower(s)),
            StringMatch::Prefix(s) => Matcher::Prefix(lower(s)),
            StringMatch::Regex(r) => {
                let flags = if ignore_case { "(?i)" } else { "" };
                Matcher::Regex(
                    Regex::new(&format!("{flags}^(?:{r})$"))
                        .map_err(|e| format!("regex `{r}`: {e}"))?,
                )
            }
        })
    }

    fn matches(&self, value: &str, ignore_case: bool) -> bool {
        match self {
            Matcher::Exact(s) if ignore_case => value.eq_ignore_ascii_case(s),
            Matcher::Exact(s) => value == s,
            Matcher::Prefix(p) if ignore_case => {
                value.len() >= p.len()
                    && value.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            Matcher::Prefix(p) => value.starts_with(p.as_str()),
            Matcher::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Debug)]
struct CompiledMatch {
    uri: Option<Matcher>,
    method: Option<Matcher>,
    authority: Option<Matcher>,
    headers: Vec<(HeaderName, Matcher)>,
    query: Vec<(String, Matcher)>,
    without_headers: Vec<(HeaderName, Matcher)>,
    ignore_uri_case: bool,
    port: Option<u16>,
    source_labels: BTreeMap<String, String>,
}

fn header_matchers(
    m: &BTreeMap<String, StringMatch>,
) -> Result<Vec<(HeaderName, Matcher)>, String> {
    m.iter()
        .map(|(k, v)| {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("`{k}` is not a header name"))?;
            Ok((name, Matcher::compile(v, false)?))
        })
        .collect()
}

impl CompiledMatch {
    fn compile(m: &RouteMatch) -> Result<Self, String> {
        let opt = |v: &Option<StringMatch>, ic: bool| {
            v.as_ref().map(|v| Matcher::compile(v, ic)).transpose()
        };
        Ok(Self {
            uri: opt(&m.uri, m.ignore_uri_case)?,
            method: opt(&m.method, false)?,
            authority: opt(&m.authority, false)?,
            headers: header_matchers(&m.headers)?,
            query: m
                .query_params
                .iter()
                .map(|(k, v)| Ok((k.clone(), Matcher::compile(v, false)?)))
                .collect::<Result<_, String>>()?,
            without_headers: header_matchers(&m.without_headers)?,
            ignore_uri_case: m.ignore_uri_case,
            port: m.port,
            source_labels: m.source_labels.clone(),
        })
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        let header = |name: &HeaderName, m: &Matcher| {
            req.headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| m.matches(v, false)))
        };
        self.uri
            .as_ref()
            .is_none_or(|m| m.matches(req.path, self.ignore_uri_case))
            && self
                .method
                .as_ref()
                .is_none_or(|m| m.matches(req.method, false))
            && self
                .authority
                .as_ref()
                .is_none_or(|m| m.matches(req.authority, false))
            && self.port.is_none_or(|p| p == req.port)
            && self
                .source_labels
                .iter()
                .all(|(k, v)| req.source_labels.get(k) == Some(v))
            && self.headers.iter().all(|(n, m)| header(n, m))
            && !self.without_headers.iter().any(|(n, m)| header(n, m))
            && self
                .query
                .iter()
                .all(|(k, m)| query_param(req.query, k).is_some_and(|v| m.matches(v, false)))
    }
}

pub fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// What a route looks at in a request.
pub struct RequestView<'a> {
    pub path: &'a str,
    pub query: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    pub port: u16,
    pub headers: &'a HeaderMap,
    /// Labels of the calling workload.
    pub source_labels: &'a BTreeMap<String, String>,
}

#[derive(Debug)]
pub struct CompiledRoute {
    pub spec: HttpRoute,
    matches: Vec<CompiledMatch>,
}

/// The traffic policy of a service or one subset, compiled, with its circuit breaker.
#[derive(Debug)]
pub struct PolicyState {
    pub policy: TrafficPolicy,
    pub thresholds: Thresholds,
    pub breaker: Arc<Breaker>,
    /// TLS origination to a host outside the mesh (`tls` SIMPLE or MUTUAL).
    pub tls: Option<Arc<crate::origination::Origination>>,
}

impl PolicyState {
    /// The state for a policy and, per `portLevelSettings` entry, one for that port.
    fn with_ports(policy: TrafficPolicy) -> (Self, BTreeMap<u16, PolicyState>) {
        let ports = policy
            .ports
            .iter()
            .map(|(p, _)| (*p, PolicyState::new(policy.for_port(*p))))
            .collect();
        (Self::new(policy), ports)
    }

    fn new(policy: TrafficPolicy) -> Self {
        let thresholds = policy
            .outlier
            .as_ref()
            .map(Thresholds::from_outlier)
            .unwrap_or(Thresholds::PASSIVE);
        let breaker = Arc::new(Breaker::new(policy.connection_pool.as_ref()));
        let tls = policy
            .tls
            .as_ref()
            .and_then(crate::origination::Origination::new);
        Self {
            policy,
            thresholds,
            breaker,
            tls,
        }
    }
}

/// A destination's subset, resolved; its policy already falls back to the service's.
#[derive(Debug)]
pub struct SubsetPolicy {
    pub labels: BTreeMap<String, String>,
    pub state: PolicyState,
    pub port_states: BTreeMap<u16, PolicyState>,
}

#[derive(Debug)]
pub struct CompiledRouting {
    pub routes: Vec<CompiledRoute>,
    subsets: BTreeMap<String, SubsetPolicy>,
    pub state: PolicyState,
    port_states: BTreeMap<u16, PolicyState>,
    /// Local rate limits this service's own sidecars enforce on inbound requests.
    pub limits: Vec<Limit>,
    /// Global rate limits, enforced likewise (see `global_limit.rs`).
    pub global: Vec<GlobalLimit>,
    /// `tcp[]` routes for CONNECT tunnels.
    pub tcp: Vec<isthmus_core::routing::TcpRoute>,
    /// The HealthCheck this service's own sidecars run on their apps (see
    /// `health_check.rs`).
    pub health_check: Option<isthmus_core::routing::HealthCheck>,
}

/// A global rate limit of this service, with the key its bucket, demand and share go by
/// (`namespace/service/limit`), made once per push rather than per request.
#[derive(Debug)]
pub struct GlobalLimit {
    pub spec: isthmus_core::routing::GlobalRateLimit,
    pub key: String,
}

/// A token bucket (GCRA: refilled continuously at tokens per interval), per caller or shared.
pub struct Limit {
    pub spec: RateLimit,
    buckets: governor::DefaultKeyedRateLimiter<String>,
}

impl std::fmt::Debug for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.spec.fmt(f)
    }
}

impl Limit {
    fn new(spec: RateLimit) -> Result<Self, String> {
        let per_token = std::time::Duration::from_millis(spec.interval_ms) / spec.tokens.max(1);
        let burst =
            std::num::NonZeroU32::new(spec.burst).ok_or("rate limit burst must be positive")?;
        let quota = governor::Quota::with_period(per_token)
            .ok_or("rate limit interval is too short")?
            .allow_burst(burst);
        Ok(Self {
            spec,
            buckets: governor::RateLimiter::keyed(quota),
        })
    }

    /// `Err(wait)` when the caller is over the limit, with the time until a token frees.
    pub fn check(&self, route: Option<&str>, caller: &str) -> Result<(), std::time::Duration> {
        use governor::clock::Clock;
        if self.spec.route.as_deref().is_some_and(|r| Some(r) != route) {
            return Ok(());
        }
        let key = if self.spec.per_caller {
            caller.to_owned()
        } else {
            String::new()
        };
        self.buckets.check_key(&key).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::DefaultClock::default().now())
        })
    }
}

impl CompiledRouting {
    /// Compiles the routing of `service` (`namespace/name`).
    pub fn compile(r: ServiceRouting, service: &str) -> Result<Self, String> {
        let routes = r
            .http
            .into_iter()
            .map(|spec| {
                let matches = spec
                    .matches
                    .iter()
                    .map(CompiledMatch::compile)
                    .collect::<Result<_, _>>()?;
                Ok(CompiledRoute { spec, matches })
            })
            .collect::<Result<_, String>>()?;
        let subsets = r
            .subsets
            .into_iter()
            .map(|s| {
                let subset_state = PolicyState::with_ports(s.policy.over(&r.policy));
                (
                    s.name,
                    SubsetPolicy {
                        labels: s.labels,
                        state: subset_state.0,
                        port_states: subset_state.1,
                    },
                )
            })
            .collect();
        let tcp = r.tcp;
        let limits = r
            .rate_limits
            .into_iter()
            .map(Limit::new)
            .collect::<Result<_, _>>()?;
        let service_state = PolicyState::with_ports(r.policy);
        Ok(Self {
            routes,
            subsets,
            state: service_state.0,
            port_states: service_state.1,
            limits,
            global: r
                .global_rate_limits
                .into_iter()
                .map(|spec| GlobalLimit {
                    key: format!("{service}/{}", spec.name),
                    spec,
                })
                .collect(),
            tcp,
            health_check: r.health_check,
        })
    }

    /// The first route whose match list matches (a route with no match matches all), and
    /// the URI prefix the matching condition matched on, for prefix rewrites.
    pub fn select(&self, req: &RequestView<'_>) -> Option<(&CompiledRoute, Option<&str>)> {
        self.routes.iter().find_map(|r| {
            if r.matches.is_empty() {
                return Some((r, None));
            }
            let m = r.matches.iter().find(|m| m.matches(req))?;
            let prefix = match &m.uri {
                Some(Matcher::Prefix(p)) => Some(p.as_str()),
                _ => None,
            };
            Some((r, prefix))
        })
    }

    pub fn subset(&self, name: &str) -> Option<&SubsetPolicy> {
        self.subsets.get(name)
    }

    /// The policy in force for a subset (or the service) and a port.
    pub fn state_for(&self, subset: Option<&str>, port: u16) -> Option<&PolicyState> {
        match subset {
            Some(name) => self
                .subsets
                .get(name)
                .map(|s| s.port_states.get(&port).unwrap_or(&s.state)),
            None => Some(self.port_states.get(&port).unwrap_or(&self.state)),
        }
    }
}

/// A destination chosen by weight.
pub fn pick_weighted(dests: &[Destination]) -> Option<&Destination> {
    let total: u32 = dests.iter().map(|d| d.weight).sum();
    if total == 0 {
        return dests.first();
    }
    let mut point = rand::random_range(0..total);
    dests.iter().find(|d| {
        if point < d.weight {
            true
        } else {
            point -= d.weight;
            false
        }
    })
}

/// True for `percent`% of calls.
pub fn sampled(percent: f64) -> bool {
    percent >= 100.0 || rand::random::<f64>() * 100.0 < percent
}

/// The path after a `rewrite.uri`: the matched prefix is replaced, or the whole path when
/// the route did not match on a prefix. The query string is kept.
pub fn rewrite_path(path_and_query: &str, matched_prefix: Option<&str>, rewrite: &str) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let new_path = match matched_prefix {
        Some(prefix) if path.len() >= prefix.len() => format!("{rewrite}{}", &path[prefix.len()..]),
        _ => rewrite.to_owned(),
    };
    match query {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    }
}

/// Applies `set`, `add` and `remove` to a header map; invalid values were refused at
/// validation and are skipped here.
pub fn apply_header_op(headers: &mut HeaderMap, op: &HeaderOp) {
    for (k, v) in &op.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            headers.insert(n, v);
        }
    }
    for (k, v) in &op.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            headers.append(n, v);
        }
    }
    for k in &op.remove {
        headers.remove(k.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::routing::RouteAction;

    fn route(name: &str, m: Vec<RouteMatch>) -> HttpRoute {
        HttpRoute {
            name: name.into(),
            matches: m,
            action: RouteAction::DirectResponse {
                status: 200,
                body: String::new(),
            },
            rewrite: None,
            timeout_ms: None,
            retries: None,
            fault: None,
            headers: Default::default(),
            mirror: None,
        }
    }

    static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

    fn view<'a>(path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView {
            path,
            query: "a=1&user=jason",
            method: "GET",
            authority: "reviews",
            port: 80,
            headers,
            source_labels: &NO_LABELS,
        }
    }

    #[test]
    fn first_matching_route_wins_and_a_route_without_match_catches_all() {
        let mut jason = RouteMatch::default();
        jason
            .headers
            .insert("end-user".into(), StringMatch::Exact("jason".into()));
        let api = RouteMatch {
            uri: Some(StringMatch::Prefix("/API".into())),
            ignore_uri_case: true,
            ..Default::default()
        };
        let routing = ServiceRouting {
            http: vec![
                route("jason", vec![jason]),
                route("api", vec![api]),
                route("rest", vec![]),
            ],
            ..Default::default()
        };
        let r = CompiledRouting::compile(routing, "demo/reviews").expect("compiles");
        let mut h = HeaderMap::new();
        assert_eq!(r.select(&view("/x", &h)).expect("some").0.spec.name, "rest");
        let (api, prefix) = r.select(&view("/api/v1", &h)).expect("some");
        assert_eq!((api.spec.name.as_str(), prefix), ("api", Some("/api")));
        h.insert("end-user", "jason".parse().expect("value"));
        assert_eq!(
            r.select(&view("/api/v1", &h)).expect("some").0.spec.name,
            "jason"
        );
    }

    #[test]
    fn regex_query_and_without_headers_conditions() {
        let mut m = RouteMatch {
            uri: Some(StringMatch::Regex("/reviews/[0-9]+".into())),
            ..Default::default()
        };
        m.query_params
            .insert("user".into(), StringMatch::Exact("jason".into()));
        m.without_headers
            .insert("x-canary".into(), StringMatch::Prefix("".into()));
        let r = CompiledRouting::compile(
            ServiceRouting {
                http: vec![route("m", vec![m])],
                ..Default::default()
            },
            "demo/reviews",
        )
        .expect("compiles");
        let mut h = HeaderMap::new();
        assert!(r.select(&view("/reviews/42", &h)).is_some());
        assert!(r.select(&view("/reviews/x", &h)).is_none());
        h.insert("x-canary", "1".parse().expect("value"));
        assert!(
            r.select(&view("/reviews/42", &h)).is_none(),
            "withoutHeaders excludes"
        );
    }

    #[test]
    fn rewrites_replace_the_matched_prefix_and_keep_the_query() {
        assert_eq!(
            rewrite_path("/v1/api/items?x=1", Some("/v1/api"), "/api"),
            "/api/items?x=1"
        );
        assert_eq!(rewrite_path("/old", None, "/new"), "/new");
    }

    #[test]
    fn weights_choose_in_proportion() {
        let d = |w| Destination {
            service: "ns/s".into(),
            subset: Some(format!("{w}")),
            port: None,
            weight: w,
        };
        let dests = [d(80), d(20)];
        let twenty = (0..10_000)
            .filter(|_| pick_weighted(&dests).expect("some").weight == 20)
            .count();
        assert!((1_600..2_400).contains(&twenty), "{twenty} of 10000");
        let only = [d(100), d(0)];
        assert!((0..1000).all(|_| pick_weighted(&only).expect("some").weight == 100));
    }
}
