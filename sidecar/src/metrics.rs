//! Sidecar metrics, with Istio's standard names and labels so its dashboards and Kiali's
//! graph work unchanged: `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes` per request and the `istio_tcp_*` family
//! per opaque connection, for both reporters (`source` on the calling side, `destination`
//! on the receiving side), plus the sidecar's own counters under `isthmus_sidecar_`.
//!
//! A request's series is found by a [`SeriesKey`] of interned workload ids and a few short
//! values; its ~25 label strings are put together once, the first time the key is seen.

use std::hash::BuildHasherDefault;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::peer::{Workload, Workloads};
use opentelemetry::KeyValue;

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

/// Istio's labels of the request metrics: those of connections, the response code and
/// the gRPC status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    connection: TcpLabels,
    response_code: u16,
    grpc_response_status: Arc<str>,
}

/// Istio's labels of the TCP metrics, in its names and order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    reporter: &'static str,
    source_workload: Arc<str>,
    source_workload_namespace: Arc<str>,
    source_principal: Arc<str>,
    source_app: Arc<str>,
    source_version: Arc<str>,
    source_canonical_service: Arc<str>,
    source_canonical_revision: Arc<str>,
    source_cluster: Arc<str>,
    destination_workload: Arc<str>,
    destination_workload_namespace: Arc<str>,
    destination_principal: Arc<str>,
    destination_app: Arc<str>,
    destination_version: Arc<str>,
    destination_service: Arc<str>,
    destination_service_name: Arc<str>,
    destination_service_namespace: Arc<str>,
    destination_canonical_service: Arc<str>,
    destination_canonical_revision: Arc<str>,
    destination_cluster: Arc<str>,
    request_protocol: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's buckets for `istio_request_bytes` and `istio_response_bytes`: powers of ten.
const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

/// Who reports a series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The calling side's sidecar.
    Source,
    /// The receiving side's sidecar.
    Destination,
}

/// The service a request or connection was for, as the registry names it.
#[derive(Debug)]
pub struct DestinationService {
    /// Full host name, `reviews.shop.svc.cluster.local`.
    pub host: Arc<str>,
    pub name: Arc<str>,
    pub namespace: Arc<str>,
}

impl DestinationService {
    pub fn new(host: Arc<str>, name: &str, namespace: &str) -> Arc<Self> {
        Arc::new(Self {
            host,
            name: name.into(),
            namespace: namespace.into(),
        })
    }

    /// A request that names no service the registry knows: `unknown`, never the text of
    /// the request.
    pub fn unknown() -> Arc<Self> {
        static UNKNOWN: std::sync::LazyLock<Arc<DestinationService>> =
            std::sync::LazyLock::new(|| {
                let u = fixed::unknown();
                Arc::new(DestinationService {
                    host: u.clone(),
                    name: u.clone(),
                    namespace: u,
                })
            });
        UNKNOWN.clone()
    }
}

impl std::fmt::Display for DestinationService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.host)
    }
}

/// A workload compared and hashed by its interned id.
#[derive(Clone, Debug)]
struct ById(Arc<Workload>);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}
impl Eq for ById {}
impl std::hash::Hash for ById {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(self.0.id());
    }
}

/// A service compared and hashed by its host name.
#[derive(Clone, Debug)]
struct ByHost(Arc<DestinationService>);

impl PartialEq for ByHost {
    fn eq(&self, other: &Self) -> bool {
        self.0.host == other.0.host
    }
}
impl Eq for ByHost {}
impl std::hash::Hash for ByHost {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.host.hash(h);
    }
}

/// What tells one series from another: cheap to hash per request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    reporter: Reporter,
    source: ById,
    destination: ById,
    service: ByHost,
    /// The cluster that answered, when the destination workload did not say.
    destination_cluster: Arc<str>,
    /// `http`, `grpc` or `tcp`.
    protocol: &'static str,
    code: u16,
    grpc_status: Option<u16>,
    flags: &'static str,
    /// Known on the destination side only (Istio writes `unknown` at the source).
    mutual_tls: Option<bool>,
}

/// The parts of a series a caller fills in.
#[derive(Clone, Debug)]
pub struct Series {
    pub reporter: Reporter,
    pub source: Arc<Workload>,
    pub destination: Arc<Workload>,
    pub service: Arc<DestinationService>,
    pub destination_cluster: Arc<str>,
    pub protocol: &'static str,
    pub mutual_tls: Option<bool>,
}

impl Series {
    /// The key of this series with a response's outcome.
    pub fn key(&self, code: u16, grpc_status: Option<u16>, flags: &'static str) -> SeriesKey {
        SeriesKey {
            reporter: self.reporter,
            source: ById(self.source.clone()),
            destination: ById(self.destination.clone()),
            service: ByHost(self.service.clone()),
            destination_cluster: self.destination_cluster.clone(),
            protocol: self.protocol,
            code,
            grpc_status,
            flags,
            mutual_tls: self.mutual_tls,
        }
    }
}

impl SeriesKey {
    fn request_labels(&self) -> RequestLabels {
        RequestLabels {
            connection: self.tcp_labels(),
            response_code: self.code,
            grpc_response_status: self
                .grpc_status
                .map_or_else(fixed::unknown, |s| s.to_string().into()),
        }
    }

    /// The labels as OpenTelemetry attributes (with the response code and gRPC status
    /// for requests).
    fn attributes(&self, request: bool) -> Vec<KeyValue> {
        let t = self.tcp_labels();
        let text = |k: &'static str, v: &Arc<str>| KeyValue::new(k, v.to_string());
        let mut a = vec![
            KeyValue::new("reporter", t.reporter),
            text("source_workload", &t.source_workload),
            text("source_workload_namespace", &t.source_workload_namespace),
            text("source_principal", &t.source_principal),
            text("source_app", &t.source_app),
            text("source_version", &t.source_version),
            text("source_canonical_service", &t.source_canonical_service),
            text("source_canonical_revision", &t.source_canonical_revision),
            text("source_cluster", &t.source_cluster),
            text("destination_workload", &t.destination_workload),
            text(
                "destination_workload_namespace",
                &t.destination_workload_namespace,
            ),
            text("destination_principal", &t.destination_principal),
            text("destination_app", &t.destination_app),
            text("destination_version", &t.destination_version),
            text("destination_service", &t.destination_service),
            text("destination_service_name", &t.destination_service_name),
            text(
                "destination_service_namespace",
                &t.destination_service_namespace,
            ),
            text(
                "destination_canonical_service",
                &t.destination_canonical_service,
            ),
            text(
                "destination_canonical_revision",
                &t.destination_canonical_revision,
            ),
            text("destination_cluster", &t.destination_cluster),
            KeyValue::new("request_protocol", t.request_protocol),
            KeyValue::new("response_flags", t.response_flags),
            KeyValue::new("connection_security_policy", t.connection_security_policy),
        ];
        if request {
            let r = self.request_labels();
            a.push(KeyValue::new("response_code", r.response_code.to_string()));
            a.push(text("grpc_response_status", &r.grpc_response_status));
        }
        a
    }

    fn tcp_labels(&self) -> TcpLabels {
        let (s, d, svc) = (&self.source.0, &self.destination.0, &self.service.0);
        // The cluster of a destination that did not describe itself is the one that answered.
        let destination_cluster = if d.id() == 0 {
            self.destination_cluster.clone()
        } else {
            d.cluster.clone()
        };
        TcpLabels {
            reporter: match self.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            },
            source_workload: s.name.clone(),
            source_workload_namespace: s.namespace.clone(),
            source_principal: s.principal.clone(),
            source_app: s.app.clone(),
            source_version: s.version.clone(),
            source_canonical_service: s.canonical_service.clone(),
            source_canonical_revision: s.canonical_revision.clone(),
            source_cluster: s.cluster.clone(),
            destination_workload: d.name.clone(),
            destination_workload_namespace: d.namespace.clone(),
            destination_principal: d.principal.clone(),
            destination_app: d.app.clone(),
            destination_version: d.version.clone(),
            destination_service: svc.host.clone(),
            destination_service_name: svc.name.clone(),
            destination_service_namespace: svc.namespace.clone(),
            destination_canonical_service: d.canonical_service.clone(),
            destination_canonical_revision: d.canonical_revision.clone(),
            destination_cluster,
            request_protocol: self.protocol,
            response_flags: self.flags,
            connection_security_policy: match self.mutual_tls {
                Some(true) => "mutual_tls",
                Some(false) => "none",
                None => "unknown",
            },
        }
    }
}

/// Label values that do not come from the registry, made once: a clone costs a count.
pub(crate) mod fixed {
    use std::sync::{Arc, LazyLock};

    static UNKNOWN: LazyLock<Arc<str>> = LazyLock::new(|| "unknown".into());
    static EXTERNAL: LazyLock<Arc<str>> = LazyLock::new(|| crate::egress::CLUSTER.into());

    /// A value not known (Istio's convention).
    pub fn unknown() -> Arc<str> {
        UNKNOWN.clone()
    }

    /// The cluster of a service outside the mesh.
    pub fn external() -> Arc<str> {
        EXTERNAL.clone()
    }
}

/// A fast word-at-a-time hash (rustc's Fx): the keys hashed per request are short and
/// come from the registry, an intern table or a peer sidecar's bounded header, never
/// straight from request text, so flooding collisions is not a concern; std's SipHash cost
/// more than the counting.
#[derive(Default)]
pub struct Fx(u64);

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Fx {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl std::hash::Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.add(u64::from_le_bytes(w.try_into().expect("chunks of 8")));
        }
        let mut tail = [0u8; 8];
        let rest = words.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(tail) ^ (rest.len() as u64) << 56);
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The series of one request label set, shared with the families that export them.
#[derive(Clone)]
struct RequestHandles {
    count: Counter,
    duration: Histogram,
    request_size: Histogram,
    response_size: Histogram,
    /// The labels as OpenTelemetry attributes, for OTLP.
    attributes: Arc<[KeyValue]>,
}

/// The series of one opaque connection's label set.
#[derive(Clone)]
pub struct TcpHandles {
    attributes: Arc<[KeyValue]>,
    opened: Counter,
    pub closed: Counter,
    /// Bytes towards the destination (the request direction), Istio's `received`.
    pub received: Counter,
    /// Bytes back towards the source (the response direction), Istio's `sent`.
    pub sent: Counter,
}

/// The request metrics' OpenTelemetry instruments.
struct Otel {
    requests: opentelemetry::metrics::Counter<u64>,
    duration: opentelemetry::metrics::Histogram<f64>,
    request_size: opentelemetry::metrics::Histogram<u64>,
    response_size: opentelemetry::metrics::Histogram<u64>,
}

type Cache<V> =
    Arc<std::sync::RwLock<std::collections::HashMap<SeriesKey, V, BuildHasherDefault<Fx>>>>;

#[derive(Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    /// From the request's start to the end of its response, in milliseconds.
    durations: Family<RequestLabels, Histogram, fn() -> Histogram>,
    request_sizes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    response_sizes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    /// Each request key's handles, found with one cheap lookup per request.
    seen: Cache<RequestHandles>,
    seen_tcp: Cache<TcpHandles>,
    /// The same metrics' OpenTelemetry instruments, once OTLP export is on.
    otel: Arc<std::sync::OnceLock<Otel>>,
    /// Every workload a label names, interned.
    pub workloads: Arc<Workloads>,
    pub retries: Counter,
    pub ejections: Counter,
    /// mTLS connections the pool opened to peers (sidecars, gateways, tunnels).
    pub upstream_connections: Counter,
    pub upstream_failures: Family<ReasonLabels, Counter>,
    /// DNS queries the DNS proxy answered, by where the answer came from.
    dns_requests: Family<DnsLabels, Counter>,
    /// Access log lines dropped because standard output did not keep up.
    pub access_log_dropped: Counter,
    /// Requests and connections AuthorizationPolicies denied, by policy.
    denied: Family<PolicyLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            request_sizes: Family::new_with_constructor(size_histogram),
            response_sizes: Family::new_with_constructor(size_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_received: Family::default(),
            tcp_sent: Family::default(),
            seen: Arc::default(),
            seen_tcp: Arc::default(),
            otel: Arc::default(),
            workloads: Arc::default(),
            retries: Counter::default(),
            ejections: Counter::default(),
            upstream_connections: Counter::default(),
            upstream_failures: Family::default(),
            dns_requests: Family::default(),
            access_log_dropped: Counter::default(),
            denied: Family::default(),
        }
    }
}

/// The cached value of `key`, made (and cached) by `make` the first time.
fn cached<V: Clone>(cache: &Cache<V>, key: &SeriesKey, make: impl FnOnce() -> V) -> V {
    if let Some(v) = cache.read().unwrap_or_else(|p| p.into_inner()).get(key) {
        return v.clone();
    }
    let v = make();
    cache
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key.clone())
        .or_insert(v)
        .clone()
}

impl Metrics {
    /// Counts one finished request: its duration and the sizes of both messages.
    pub fn request(
        &self,
        key: &SeriesKey,
        duration: std::time::Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let h = cached(&self.seen, key, || {
            // First request with these labels: the families make the series, the cache
            // keeps their handles (clones share the same values).
            let labels = key.request_labels();
            RequestHandles {
                attributes: key.attributes(true).into(),
                count: self.requests.get_or_create(&labels).clone(),
                duration: self.durations.get_or_create(&labels).clone(),
                request_size: self.request_sizes.get_or_create(&labels).clone(),
                response_size: self.response_sizes.get_or_create(&labels).clone(),
            }
        });
        let ms = duration.as_secs_f64() * 1000.0;
        h.count.inc();
        h.duration.observe(ms);
        h.request_size.observe(request_bytes as f64);
        h.response_size.observe(response_bytes as f64);
        if let Some(otel) = self.otel.get() {
            otel.requests.add(1, &h.attributes);
            otel.duration.record(ms, &h.attributes);
            otel.request_size.record(request_bytes, &h.attributes);
            otel.response_size.record(response_bytes, &h.attributes);
        }
    }

    /// Also exports the Istio metrics over OTLP through `meter` (from then on): requests
    /// are recorded into its instruments as they finish; TCP counters are read from the
    /// Prometheus ones at each export.
    pub fn export_otlp(&self, meter: &opentelemetry::metrics::Meter) {
        let histogram = |name: &'static str, unit: &'static str, bounds: &[f64]| {
            meter
                .f64_histogram(name)
                .with_unit(unit)
                .with_boundaries(bounds.to_vec())
                .build()
        };
        let sizes = |name: &'static str| {
            meter
                .u64_histogram(name)
                .with_unit("By")
                .with_boundaries(SIZE_BUCKETS.to_vec())
                .build()
        };
        let otel = Otel {
            requests: meter.u64_counter("istio_requests").build(),
            duration: histogram(
                "istio_request_duration_milliseconds",
                "ms",
                &DURATION_BUCKETS_MS,
            ),
            request_size: sizes("istio_request_bytes"),
            response_size: sizes("istio_response_bytes"),
        };
        let _ = self.otel.set(otel);
        type Read = fn(&TcpHandles) -> u64;
        let tcp: [(&'static str, Read); 4] = [
            ("istio_tcp_connections_opened", |h| h.opened.get()),
            ("istio_tcp_connections_closed", |h| h.closed.get()),
            ("istio_tcp_received_bytes", |h| h.received.get()),
            ("istio_tcp_sent_bytes", |h| h.sent.get()),
        ];
        for (name, read) in tcp {
            let seen = self.seen_tcp.clone();
            meter
                .u64_observable_counter(name)
                .with_callback(move |observer| {
                    for h in seen.read().unwrap_or_else(|p| p.into_inner()).values() {
                        observer.observe(read(h), &h.attributes);
                    }
                })
                .build();
        }
    }

    /// Counts one opened connection; the handles count its bytes and its close.
    pub fn connection(&self, key: &SeriesKey) -> TcpHandles {
        let h = cached(&self.seen_tcp, key, || {
            let labels = key.tcp_labels();
            TcpHandles {
                attributes: key.attributes(false).into(),
                opened: self.tcp_opened.get_or_create(&labels).clone(),
                closed: self.tcp_closed.get_or_create(&labels).clone(),
                received: self.tcp_received.get_or_create(&labels).clone(),
                sent: self.tcp_sent.get_or_create(&labels).clone(),
            }
        });
        h.opened.inc();
        h
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
            "requests handled, by reporter, source, destination and response",
            self.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "time from the request to the end of its response",
            self.durations.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "request sizes, headers and body",
            self.request_sizes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "response sizes, headers and body",
            self.response_sizes.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "opaque TCP connections opened",
            self.tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "opaque TCP connections closed",
            self.tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "bytes of opaque TCP connections in the request direction",
            self.tcp_received.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "bytes of opaque TCP connections in the response direction",
            self.tcp_sent.clone(),
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
            "access_log_dropped",
            "access log lines dropped because standard output did not keep up",
            self.access_log_dropped.clone(),
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
    use isthmus_core::identity::SpiffeId;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn series(metrics: &Metrics, service: &str) -> Series {
        let id = SpiffeId::new("cluster.local", "shop", "front");
        let own = Workload::own("front", &id, "east", &BTreeMap::new());
        Series {
            reporter: Reporter::Source,
            source: metrics.workloads.own(own),
            destination: Workloads::unknown(),
            service: DestinationService::new(
                format!("{service}.shop.svc.cluster.local").into(),
                service,
                "shop",
            ),
            destination_cluster: "west".into(),
            protocol: "http",
            mutual_tls: None,
        }
    }

    fn exposition(metrics: &Metrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        text
    }

    /// The value of the one line of `metric` whose labels include every one of `with`.
    fn value(text: &str, metric: &str, with: &[&str]) -> String {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")) && with.iter().all(|w| l.contains(w)))
            .collect();
        assert_eq!(lines.len(), 1, "{metric} {with:?} in:\n{text}");
        lines[0].rsplit(' ').next().expect("a value").to_owned()
    }

    #[test]
    fn every_request_is_counted_once_in_its_own_series() {
        let metrics = Metrics::default();
        let a = series(&metrics, "a");
        let b = series(&metrics, "b");
        let ms = Duration::from_millis(3);
        for _ in 0..3 {
            metrics.request(&a.key(200, None, "-"), ms, 100, 1000);
        }
        metrics.request(&a.key(503, None, "UH"), ms, 100, 10);
        metrics.request(&b.key(200, Some(0), "-"), ms, 100, 10);
        let text = exposition(&metrics);
        let a = r#"destination_service="a.shop.svc.cluster.local""#;
        let b = r#"destination_service="b.shop.svc.cluster.local""#;
        assert_eq!(
            value(
                &text,
                "istio_requests_total",
                &[a, r#"response_code="200""#]
            ),
            "3"
        );
        assert_eq!(
            value(
                &text,
                "istio_requests_total",
                &[a, r#"response_code="503""#, r#"response_flags="UH""#]
            ),
            "1"
        );
        assert_eq!(
            value(
                &text,
                "istio_requests_total",
                &[b, r#"grpc_response_status="0""#]
            ),
            "1"
        );
        let count = "istio_request_duration_milliseconds_count";
        assert_eq!(value(&text, count, &[a, r#"response_code="200""#]), "3");
        let sizes = "istio_response_bytes_sum";
        assert_eq!(
            value(&text, sizes, &[a, r#"response_code="200""#]),
            "3000.0"
        );
    }

    #[test]
    fn every_istio_label_is_written_and_unknowns_say_so() {
        let metrics = Metrics::default();
        let s = series(&metrics, "a");
        metrics.request(&s.key(200, None, "-"), Duration::from_millis(1), 1, 1);
        let handles = metrics.connection(
            &Series {
                protocol: "tcp",
                ..s
            }
            .key(0, None, "-"),
        );
        handles.received.inc_by(7);
        let text = exposition(&metrics);
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .expect("a request series");
        for label in [
            "reporter=\"source\"",
            "source_workload=\"front\"",
            "source_workload_namespace=\"shop\"",
            "source_principal=\"spiffe://cluster.local/ns/shop/sa/front\"",
            "source_app=\"unknown\"",
            "source_version=\"unknown\"",
            "source_canonical_service=\"front\"",
            "source_canonical_revision=\"latest\"",
            "source_cluster=\"east\"",
            "destination_workload=\"unknown\"",
            "destination_workload_namespace=\"unknown\"",
            "destination_principal=\"unknown\"",
            "destination_app=\"unknown\"",
            "destination_version=\"unknown\"",
            "destination_service=\"a.shop.svc.cluster.local\"",
            "destination_service_name=\"a\"",
            "destination_service_namespace=\"shop\"",
            "destination_canonical_service=\"unknown\"",
            "destination_canonical_revision=\"unknown\"",
            "destination_cluster=\"west\"",
            "request_protocol=\"http\"",
            "response_code=\"200\"",
            "grpc_response_status=\"unknown\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"unknown\"",
        ] {
            assert!(line.contains(label), "{label} missing from {line}");
        }
        assert_eq!(
            value(
                &text,
                "istio_tcp_received_bytes_total",
                &["request_protocol=\"tcp\""]
            ),
            "7"
        );
        assert_eq!(value(&text, "istio_tcp_connections_opened_total", &[]), "1");
    }
}
