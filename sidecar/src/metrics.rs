//! Sidecar metrics, with Istio's standard names and labels so existing dashboards work.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `source` (outbound side) or `destination` (inbound side).
    pub reporter: &'static str,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_cluster: String,
    pub response_code: u16,
    /// Reason of a proxy-made error, `-` otherwise (Envoy's response flags).
    pub response_flags: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Default)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub retries: Counter,
    pub ejections: Counter,
    pub upstream_failures: Family<ReasonLabels, Counter>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_requests",
            "requests handled, by reporter, destination and response",
            self.requests.clone(),
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
            "upstream_failures",
            "failed attempts by reason",
            self.upstream_failures.clone(),
        );
    }
}
