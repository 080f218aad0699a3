//! Sidecar metrics, with Istio's standard names and labels so existing dashboards work.

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

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS_MS: [f64; 14] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

#[derive(Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    /// Time to the response headers, in milliseconds.
    durations: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub retries: Counter,
    pub ejections: Counter,
    /// mTLS connections the pool opened to peers (sidecars, gateways, tunnels).
    pub upstream_connections: Counter,
    pub upstream_failures: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            retries: Counter::default(),
            ejections: Counter::default(),
            upstream_connections: Counter::default(),
            upstream_failures: Family::default(),
        }
    }
}

impl Metrics {
    /// Counts one request and its duration.
    pub fn record(&self, labels: RequestLabels, started: std::time::Instant) {
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        self.durations.get_or_create(&labels).observe(ms);
        self.requests.get_or_create(&labels).inc();
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
    }
}
