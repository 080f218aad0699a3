//! Sidecar metrics, with Istio's standard names and labels so existing dashboards work.

use std::hash::BuildHasherDefault;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `source` (outbound side) or `destination` (inbound side).
    pub reporter: &'static str,
    pub source_cluster: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_cluster: Arc<str>,
    pub response_code: u16,
    /// Reason of a proxy-made error, `-` otherwise (Envoy's response flags).
    pub response_flags: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// `namespace/name` of the DENY policy, or `no ALLOW policy matched`.
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    /// `mesh` (from the registry), `forwarded`, `nxdomain` (a mesh name not known, with
    /// no upstream), `upstream_failure`, `refused` (not a single query).
    pub answer: &'static str,
}

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS_MS: [f64; 14] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

/// Label values that do not come from the registry, made once: a clone costs a count.
pub(crate) mod fixed {
    use std::sync::{Arc, LazyLock};

    static UNNAMED: LazyLock<Arc<str>> = LazyLock::new(|| "".into());
    static UNKNOWN: LazyLock<Arc<str>> = LazyLock::new(|| "unknown".into());
    static EXTERNAL: LazyLock<Arc<str>> = LazyLock::new(|| crate::egress::CLUSTER.into());

    /// The service or cluster of a request that names none (refused before routing, or
    /// answered by the route itself).
    pub fn unnamed() -> Arc<str> {
        UNNAMED.clone()
    }

    /// A value not known (Istio's convention).
    pub fn unknown() -> Arc<str> {
        UNKNOWN.clone()
    }

    /// The cluster of a service outside the mesh.
    pub fn external() -> Arc<str> {
        EXTERNAL.clone()
    }
}

/// FNV-1a: the label sets hashed per request are short and come from the registry (never
/// from request text), so a cheap hash serves; std's SipHash cost more than the counting.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The counter and histogram of one label set, shared with the families that export them.
type Handles = (Counter, Histogram);

#[derive(Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    /// Time to the response headers, in milliseconds.
    durations: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// Each label set's handles, found with one cheap lookup per request.
    seen: Arc<
        std::sync::RwLock<
            std::collections::HashMap<RequestLabels, Handles, BuildHasherDefault<Fnv>>,
        >,
    >,
    pub retries: Counter,
    pub ejections: Counter,
    /// mTLS connections the pool opened to peers (sidecars, gateways, tunnels).
    pub upstream_connections: Counter,
    pub upstream_failures: Family<ReasonLabels, Counter>,
    /// DNS queries the DNS proxy answered, by where the answer came from.
    dns_requests: Family<DnsLabels, Counter>,
    /// Requests and connections AuthorizationPolicies denied, by policy.
    denied: Family<PolicyLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            seen: Arc::default(),
            retries: Counter::default(),
            ejections: Counter::default(),
            upstream_connections: Counter::default(),
            upstream_failures: Family::default(),
            dns_requests: Family::default(),
            denied: Family::default(),
        }
    }
}

impl Metrics {
    /// Counts one request and its duration.
    pub fn record(&self, labels: RequestLabels, started: std::time::Instant) {
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let seen = self.seen.read().unwrap_or_else(|p| p.into_inner());
        if let Some((count, duration)) = seen.get(&labels) {
            count.inc();
            duration.observe(ms);
            return;
        }
        drop(seen);
        // First request with these labels: the families make the series, the cache keeps
        // their handles (clones share the same values).
        let count = self.requests.get_or_create(&labels).clone();
        let duration = self.durations.get_or_create(&labels).clone();
        count.inc();
        duration.observe(ms);
        self.seen
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(labels, (count, duration));
    }

    /// Counts one request or connection an AuthorizationPolicy denied.
    pub fn denied(&self, policy: &str) {
        self.denied
            .get_or_create(&PolicyLabels {
                policy: policy.to_owned(),
            })
            .inc();
    }

    /// Counts one DNS query by where its answer came from.
    pub fn dns(&self, answer: &'static str) {
        self.dns_requests.get_or_create(&DnsLabels { answer }).inc();
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_requests",
            "requests handled, by reporter, destination and response",
            self.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "time to the response headers",
            self.durations.clone(),
        );
        let own = registry.sub_registry_with_prefix("isthmus_sidecar");
        own.register(
            "retries",
            "attempts retried on another endpoint",
            self.retries.clone(),
        );
        own.register(
            "ejections",
            "endpoints ejected by passive health checking",
            self.ejections.clone(),
        );
        own.register(
            "upstream_connections",
            "connections opened to peers",
            self.upstream_connections.clone(),
        );
        own.register(
            "upstream_failures",
            "failed attempts by reason",
            self.upstream_failures.clone(),
        );
        own.register(
            "authz_denied",
            "requests and connections denied by AuthorizationPolicy, by policy",
            self.denied.clone(),
        );
        own.register(
            "dns_requests",
            "DNS queries answered by the DNS proxy, by where the answer came from",
            self.dns_requests.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(service: &str, code: u16) -> RequestLabels {
        RequestLabels {
            reporter: "source",
            source_cluster: "east".into(),
            destination_service: service.into(),
            destination_cluster: "west".into(),
            response_code: code,
            response_flags: "-",
        }
    }

    #[test]
    fn every_request_is_counted_once_in_its_own_series() {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let started = std::time::Instant::now();
        for _ in 0..3 {
            metrics.record(labels("a.ns.svc.cluster.local", 200), started);
        }
        metrics.record(labels("a.ns.svc.cluster.local", 503), started);
        // A clone (as each listener holds) counts into the same series.
        metrics
            .clone()
            .record(labels("b.ns.svc.cluster.local", 200), started);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        let value = |metric: &str, service: &str, code: &str| -> String {
            text.lines()
                .find(|l| {
                    l.starts_with(metric)
                        && l.contains(&format!("destination_service=\"{service}\""))
                        && l.contains(&format!("response_code=\"{code}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .unwrap_or_else(|| panic!("no {metric} for {service} {code} in:\n{text}"))
                .to_owned()
        };
        assert_eq!(
            value("istio_requests_total", "a.ns.svc.cluster.local", "200"),
            "3"
        );
        assert_eq!(
            value("istio_requests_total", "a.ns.svc.cluster.local", "503"),
            "1"
        );
        assert_eq!(
            value("istio_requests_total", "b.ns.svc.cluster.local", "200"),
            "1"
        );
        let count = "istio_request_duration_milliseconds_count";
        assert_eq!(value(count, "a.ns.svc.cluster.local", "200"), "3");
        assert_eq!(value(count, "b.ns.svc.cluster.local", "200"), "1");
    }
}
