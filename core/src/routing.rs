//! Traffic management as the sidecar applies it: the validated, resolved form of Istio's
//! `VirtualService` and `DestinationRule` for one service. The controller builds it from the
//! YAML (`config::istio`), sends it with the service as a typed message (`wire`), and the
//! sidecar converts it back (refusing what is out of range) and compiles it once per config
//! change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod wire;

/// How a string is matched (Istio's StringMatch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

/// One `match` block: every condition in it must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteMatch {
    pub uri: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: BTreeMap<String, StringMatch>,
    pub query_params: BTreeMap<String, StringMatch>,
    pub without_headers: BTreeMap<String, StringMatch>,
    pub ignore_uri_case: bool,
    pub port: Option<u16>,
    /// Labels the calling workload must carry.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
}

/// A weighted destination; `service` is `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    pub service: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteAction {
    Route(Vec<Destination>),
    Redirect {
        uri: Option<String>,
        authority: Option<String>,
        code: u16,
    },
    DirectResponse {
        status: u16,
        body: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retries {
    pub attempts: u32,
    pub per_try_timeout_ms: Option<u64>,
    /// Envoy's conditions and gRPC status names, as Istio's `retryOn` lists them.
    pub retry_on: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// (delay, percentage of requests).
    pub delay: Option<(u64, f64)>,
    /// (HTTP status or gRPC status, percentage of requests).
    pub abort: Option<(Abort, f64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Abort {
    Http(u16),
    Grpc(u8),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderOp {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderOps {
    pub request: HeaderOp,
    pub response: HeaderOp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpRoute {
    pub name: String,
    /// Empty: matches every request.
    pub matches: Vec<RouteMatch>,
    pub action: RouteAction,
    pub rewrite: Option<Rewrite>,
    pub timeout_ms: Option<u64>,
    pub retries: Option<Retries>,
    pub fault: Option<Fault>,
    pub headers: HeaderOps,
    /// Where a copy of each request goes (its response is ignored), and for what share.
    #[serde(default)]
    pub mirror: Option<Mirror>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mirror {
    pub destination: Destination,
    pub percentage: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    RoundRobin,
    LeastRequest,
    Random,
    /// Requests with the same key go to the same endpoint while it is healthy.
    ConsistentHash(HashOn),
}

/// What a consistent hash is computed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    Header(String),
    /// A cookie; when the request has none, the sidecar sets one (`ttl_secs`, `path`).
    Cookie {
        name: String,
        path: Option<String>,
        ttl_secs: u64,
    },
    SourceIp,
    QueryParameter(String),
}

/// Istio's `outlierDetection`: passive health thresholds for the endpoints of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (and connection failures) that eject an endpoint.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502/503/504 answers (and connection failures) that eject an endpoint.
    pub consecutive_gateway: Option<u32>,
    /// First ejection length; the n-th ejection in a row lasts n times as long.
    pub base_ejection_ms: u64,
    /// At most this share of the endpoints is ejected at once (at least one may be).
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints, ejection is ignored and all are used.
    pub min_health_percent: u32,
}

/// Istio's `connectionPool`, as limits on requests in flight to a destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionPool {
    /// Requests in flight at once: `http2MaxRequests`, and `tcp.maxConnections` since every
    /// connection of Istio's HTTP/1.1 pool carries one request at a time.
    pub max_requests: Option<u32>,
    /// Requests that may wait for a free slot (`http1MaxPendingRequests`); beyond, 503.
    pub max_pending: Option<u32>,
    /// Retries in flight at once (`maxRetries`).
    pub max_retries: Option<u32>,
    pub connect_timeout_ms: Option<u64>,
    /// Requests a pooled connection carries before it is retired (`maxRequestsPerConnection`).
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
    /// A pooled connection unused this long is closed (`http.idleTimeout`).
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
}

/// Istio's `localityLbSetting`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalityLb {
    /// `false`: localities are ignored, every endpoint is equally preferred.
    pub enabled: bool,
    /// (from region, to region) in preference order; overrides the mesh-wide order.
    pub failover: Vec<(String, String)>,
    /// (from locality pattern, [(to locality pattern, weight)]): share traffic by weight
    /// instead of by priority. Patterns are `region/zone/subzone` with `*` wildcards.
    pub distribute: Vec<(String, Vec<(String, u32)>)>,
    /// Label keys in priority order: endpoints sharing more leading values with the caller
    /// come first (`topology.kubernetes.io/region`/`zone`, `topology.istio.io/subzone` compare
    /// localities).
    #[serde(default)]
    pub failover_priority: Vec<String>,
}

/// Whether a `region/zone/subzone` pattern (with `*`) covers a locality.
pub fn locality_matches(pattern: &str, region: &str, zone: &str, subzone: &str) -> bool {
    let have = [region, zone, subzone];
    pattern
        .split('/')
        .enumerate()
        .all(|(i, p)| p == "*" || have.get(i).is_some_and(|h| *h == p))
}

/// The policies of a DestinationRule's `trafficPolicy`, for a service or one subset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub outlier: Option<OutlierDetection>,
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default)]
    pub locality: Option<LocalityLb>,
    /// `portLevelSettings`: policies for single ports, over this one.
    #[serde(default)]
    pub ports: Vec<(u16, TrafficPolicy)>,
    /// `tls`: how connections to the destination are secured. Sidecars always talk to
    /// each other with mesh mTLS; this decides TLS origination to hosts outside the mesh.
    #[serde(default)]
    pub tls: Option<ClientTls>,
}

/// Istio's `ClientTLSSettings`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTls {
    pub mode: TlsMode,
    /// Files on the proxy's host, PEM.
    pub client_certificate: String,
    pub private_key: String,
    /// Roots the server's certificate is verified with; empty: the system's trust store.
    pub ca_certificates: String,
    /// Names one of which the server's certificate must carry; empty: the SNI name.
    pub subject_alt_names: Vec<String>,
    /// The name sent in the handshake; empty: the host the request is for.
    pub sni: String,
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsMode {
    #[default]
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

impl TrafficPolicy {
    pub fn is_empty(&self) -> bool {
        *self == TrafficPolicy::default()
    }

    /// A subset's policy over its service's: each part falls back separately.
    pub fn over(&self, base: &TrafficPolicy) -> TrafficPolicy {
        TrafficPolicy {
            load_balancer: self
                .load_balancer
                .clone()
                .or_else(|| base.load_balancer.clone()),
            outlier: self.outlier.clone().or_else(|| base.outlier.clone()),
            connection_pool: self
                .connection_pool
                .clone()
                .or_else(|| base.connection_pool.clone()),
            locality: self.locality.clone().or_else(|| base.locality.clone()),
            tls: self.tls.clone().or_else(|| base.tls.clone()),
            ports: if self.ports.is_empty() {
                base.ports.clone()
            } else {
                self.ports.clone()
            },
        }
    }

    /// The policy for `port`: its `portLevelSettings` entry over this one, else this one.
    pub fn for_port(&self, port: u16) -> TrafficPolicy {
        match self.ports.iter().find(|(p, _)| *p == port) {
            Some((_, pl)) => TrafficPolicy {
                ports: Vec::new(),
                ..pl.over(self)
            },
            None => self.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub policy: TrafficPolicy,
}

/// A VirtualService `tcp[]` route: for CONNECT tunnels to one of `ports` (all when empty),
/// a weighted choice of destinations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRoute {
    pub ports: Vec<u16>,
    pub destinations: Vec<Destination>,
}

/// A local rate limit: a token bucket in each sidecar of the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Only requests that matched this VirtualService route; all when `None`.
    pub route: Option<String>,
    pub tokens: u32,
    pub interval_ms: u64,
    pub burst: u32,
    pub per_caller: bool,
}

/// A global rate limit: one budget for the service's sidecars in every cluster, split by
/// the federation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalRateLimit {
    /// The GlobalRateLimit's name; `namespace/service/name` is its key mesh-wide.
    pub name: String,
    /// Only requests that matched this VirtualService route; all when `None`.
    pub route: Option<String>,
    pub requests_per_second: u32,
}

/// An active health check of a service's endpoints: each endpoint's own sidecar probes its
/// app so and reports to its controller, which takes failing endpoints out for every proxy
/// (and, through the export, for every cluster).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    /// The HealthCheck's name.
    pub name: String,
    /// The service port whose target port on the app is probed; `None`: the first.
    pub port: Option<u16>,
    pub probe: Probe,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Up to this much (uniformly random) is added to each interval.
    pub jitter_ms: u64,
    /// Successes in a row that put a failing endpoint back.
    pub healthy_threshold: u32,
    /// Failures in a row that take an endpoint out.
    pub unhealthy_threshold: u32,
}

/// What a health check asks of the app.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// `GET path` with this Host (the service's when `None`); passes on a status in one of
    /// the inclusive ranges.
    Http {
        path: String,
        host: Option<String>,
        expected_statuses: Vec<(u16, u16)>,
    },
    /// `grpc.health.v1.Health/Check` for this service name; passes on `SERVING`.
    Grpc { service: String },
    /// A TCP connection comes up.
    Tcp,
}

impl HealthCheck {
    /// Statuses an HTTP check passes on when none are given, as Kubernetes's `httpGet`.
    pub const DEFAULT_STATUSES: (u16, u16) = (200, 399);
}

/// Everything routing-related for one service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceRouting {
    /// From the VirtualService whose hosts name this service; first match wins.
    pub http: Vec<HttpRoute>,
    /// From the DestinationRule of this service.
    pub subsets: Vec<Subset>,
    pub policy: TrafficPolicy,
    /// From LocalRateLimits targeting this service; enforced by its own sidecars.
    #[serde(default)]
    pub rate_limits: Vec<RateLimit>,
    /// From GlobalRateLimits targeting this service.
    #[serde(default)]
    pub global_rate_limits: Vec<GlobalRateLimit>,
    /// From the HealthCheck targeting this service.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// `tcp[]` routes of the VirtualService; first match wins.
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// The VirtualService's `exportTo`, when it narrows who sees its routes. Not pushed:
    /// the controller pushes each proxy the view of its namespace.
    #[serde(skip)]
    pub virtual_service_scope: Option<Scope>,
    /// The DestinationRule's `exportTo`, likewise.
    #[serde(skip)]
    pub destination_rule_scope: Option<Scope>,
}

/// Who sees a VirtualService or DestinationRule: Istio's `exportTo`, read from the
/// namespace the object lives in (`.` is that namespace).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub namespace: String,
    pub export_to: Vec<String>,
}

impl Scope {
    pub fn visible_from(&self, namespace: &str) -> bool {
        crate::config::visible(&self.export_to, &self.namespace, namespace)
    }
}

impl ServiceRouting {
    /// What a caller in `namespace` sees: without the routes of a VirtualService, or the
    /// subsets and policy of a DestinationRule, that is not exported to it.
    pub fn seen_from(&self, namespace: &str) -> ServiceRouting {
        let mut view = self.clone();
        if self
            .virtual_service_scope
            .as_ref()
            .is_some_and(|s| !s.visible_from(namespace))
        {
            view.http.clear();
            view.tcp.clear();
        }
        if self
            .destination_rule_scope
            .as_ref()
            .is_some_and(|s| !s.visible_from(namespace))
        {
            view.subsets.clear();
            view.policy = TrafficPolicy::default();
        }
        view
    }

    /// Whether what callers see depends on their namespace.
    pub fn is_scoped(&self) -> bool {
        self.virtual_service_scope.is_some() || self.destination_rule_scope.is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.http.is_empty()
            && self.subsets.is_empty()
            && self.policy.is_empty()
            && self.rate_limits.is_empty()
            && self.global_rate_limits.is_empty()
    }
}
