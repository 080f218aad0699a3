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
use isthmus_core::config::telemetry::LABELS;
use opentelemetry::KeyValue;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// One HealthCheck's probes: the service (`namespace/name`) and how a probe ended
/// (`success`, `failure`, `timeout`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub service: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
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

/// How many of [`LABELS`] the TCP metrics have.
const TCP_LABEL_COUNT: usize = 23;

/// One series' label values, in the order of [`LABELS`]; those a Telemetry override
/// removes are blank and left out of the exposition (bit `i` of `removed` for label `i`).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Labels {
    values: Box<[Arc<str>]>,
    removed: u32,
}

impl EncodeLabelSet for Labels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        for (i, v) in self.values.iter().enumerate() {
            if self.removed & (1 << i) == 0 {
                (LABELS[i], &**v).encode(encoder.encode_label())?;
            }
        }
        Ok(())
    }
}

impl Labels {
    fn with_removed(mut self, removed: u32) -> Self {
        let blank = fixed::blank();
        for (i, v) in self.values.iter_mut().enumerate() {
            if removed & (1 << i) != 0 {
                *v = blank.clone();
            }
        }
        self.removed = removed;
        self
    }

    /// As OpenTelemetry attributes.
    fn attributes(&self) -> Vec<KeyValue> {
        self.values
            .iter()
            .enumerate()
            .filter(|(i, _)| self.removed & (1 << i) == 0)
            .map(|(i, v)| KeyValue::new(LABELS[i], v.to_string()))
            .collect()
    }
}

/// The metrics a Telemetry override names (`match.metric`), in this order: Istio's
/// standard ones, after `ALL_METRICS`.
fn metric_names() -> &'static [&'static str] {
    &isthmus_core::config::telemetry::METRICS[1..9]
}

/// What one reporter reports: metrics off (bit per [`metric_names`]) and labels removed
/// per metric.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Shape {
    disabled: u8,
    removed: [u32; 8],
}

impl Shape {
    fn of(policy: Option<&isthmus_proto::discovery::MetricsPolicy>) -> Self {
        let mut shape = Shape::default();
        let Some(p) = policy else {
            return shape;
        };
        let which = |name: &str| -> u8 {
            match name {
                "ALL_METRICS" => u8::MAX,
                n => metric_names()
                    .iter()
                    .position(|m| *m == n)
                    .map_or(0, |i| 1 << i),
            }
        };
        for d in &p.disabled {
            shape.disabled |= which(d);
        }
        for r in &p.removed_tags {
            let Some(label) = LABELS.iter().position(|l| *l == r.tag) else {
                continue;
            };
            let metrics = which(&r.metric);
            for (i, removed) in shape.removed.iter_mut().enumerate() {
                if metrics & (1 << i) != 0 {
                    *removed |= 1 << label;
                }
            }
        }
        shape
    }

    fn on(&self, metric: usize) -> bool {
        self.disabled & (1 << metric) == 0
    }
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
    /// Every label's value: the first 23 for a connection, all 25 for a request.
    fn labels(&self, request: bool) -> Labels {
        let (s, d, svc) = (&self.source.0, &self.destination.0, &self.service.0);
        // The cluster of a destination that did not describe itself is the one that answered.
        let destination_cluster = if d.id() == 0 {
            self.destination_cluster.clone()
        } else {
            d.cluster.clone()
        };
        let mut values: Vec<Arc<str>> = vec![
            match self.reporter {
                Reporter::Source => "source".into(),
                Reporter::Destination => "destination".into(),
            },
            s.name.clone(),
            s.namespace.clone(),
            s.principal.clone(),
            s.app.clone(),
            s.version.clone(),
            s.canonical_service.clone(),
            s.canonical_revision.clone(),
            s.cluster.clone(),
            d.name.clone(),
            d.namespace.clone(),
            d.principal.clone(),
            d.app.clone(),
            d.version.clone(),
            svc.host.clone(),
            svc.name.clone(),
            svc.namespace.clone(),
            d.canonical_service.clone(),
            d.canonical_revision.clone(),
            destination_cluster,
            self.protocol.into(),
            self.flags.into(),
            match self.mutual_tls {
                Some(true) => "mutual_tls".into(),
                Some(false) => "none".into(),
                None => fixed::unknown(),
            },
        ];
        debug_assert_eq!(values.len(), TCP_LABEL_COUNT);
        if request {
            values.push(self.code.to_string().into());
            values.push(
                self.grpc_status
                    .map_or_else(fixed::unknown, |s| s.to_string().into()),
            );
        }
        Labels {
            values: values.into(),
            removed: 0,
        }
    }
}

/// Label values that do not come from the registry, made once: a clone costs a count.
pub(crate) mod fixed {
    use std::sync::{Arc, LazyLock};

    static UNKNOWN: LazyLock<Arc<str>> = LazyLock::new(|| "unknown".into());
    static BLANK: LazyLock<Arc<str>> = LazyLock::new(|| "".into());
    static EXTERNAL: LazyLock<Arc<str>> = LazyLock::new(|| crate::egress::CLUSTER.into());

    /// A label a Telemetry override removed.
    pub fn blank() -> Arc<str> {
        BLANK.clone()
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
    /// Each metric's labels as OpenTelemetry attributes, for OTLP; `None` when the
    /// metric is off.
    attributes: [Option<Arc<[KeyValue]>>; 4],
}

/// The series of one opaque connection's label set.
#[derive(Clone)]
pub struct TcpHandles {
    /// As for requests: opened, closed, sent, received.
    attributes: [Option<Arc<[KeyValue]>>; 4],
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
    requests: Family<Labels, Counter>,
    /// From the request's start to the end of its response, in milliseconds.
    durations: Family<Labels, Histogram, fn() -> Histogram>,
    request_sizes: Family<Labels, Histogram, fn() -> Histogram>,
    response_sizes: Family<Labels, Histogram, fn() -> Histogram>,
    tcp_opened: Family<Labels, Counter>,
    tcp_closed: Family<Labels, Counter>,
    tcp_received: Family<Labels, Counter>,
    tcp_sent: Family<Labels, Counter>,
    /// What each reporter reports (Telemetry's metrics overrides): source, destination.
    shapes: Arc<std::sync::RwLock<[Shape; 2]>>,
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
    /// Probes of the HealthChecks this sidecar runs on its app.
    pub health_checks: Family<CheckLabels, Counter>,
    /// Each HealthCheck's verdict: 1 passing, 0 failing (absent until it has one).
    pub health_check_passing: Family<ServiceLabels, prometheus_client::metrics::gauge::Gauge>,
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
            shapes: Arc::default(),
            seen: Arc::default(),
            seen_tcp: Arc::default(),
            otel: Arc::default(),
            workloads: Arc::default(),
            retries: Counter::default(),
            ejections: Counter::default(),
            upstream_connections: Counter::default(),
            upstream_failures: Family::default(),
            health_checks: Family::default(),
            health_check_passing: Family::default(),
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
            // keeps their handles (clones share the same values). A metric that is off
            // gets a series of its own that nothing exports.
            let shape = self.shape_of(key.reporter);
            let labels = key.labels(true);
            let series = |i: usize| {
                shape
                    .on(i)
                    .then(|| labels.clone().with_removed(shape.removed[i]))
            };
            let attributes = std::array::from_fn(|i| series(i).map(|l| l.attributes().into()));
            RequestHandles {
                attributes,
                count: series(0).map_or_else(Counter::default, |l| {
                    self.requests.get_or_create(&l).clone()
                }),
                duration: series(1).map_or_else(duration_histogram, |l| {
                    self.durations.get_or_create(&l).clone()
                }),
                request_size: series(2).map_or_else(size_histogram, |l| {
                    self.request_sizes.get_or_create(&l).clone()
                }),
                response_size: series(3).map_or_else(size_histogram, |l| {
                    self.response_sizes.get_or_create(&l).clone()
                }),
            }
        });
        let ms = duration.as_secs_f64() * 1000.0;
        h.count.inc();
        h.duration.observe(ms);
        h.request_size.observe(request_bytes as f64);
        h.response_size.observe(response_bytes as f64);
        if let Some(otel) = self.otel.get() {
            let [count, time, req, resp] = &h.attributes;
            if let Some(a) = count {
                otel.requests.add(1, a);
            }
            if let Some(a) = time {
                otel.duration.record(ms, a);
            }
            if let Some(a) = req {
                otel.request_size.record(request_bytes, a);
            }
            if let Some(a) = resp {
                otel.response_size.record(response_bytes, a);
            }
        }
    }

    fn shape_of(&self, reporter: Reporter) -> Shape {
        let shapes = self.shapes.read().unwrap_or_else(|p| p.into_inner());
        shapes[usize::from(reporter == Reporter::Destination)]
    }

    /// Puts Telemetry's metrics overrides in force: for the client side (`source`
    /// reporter) and the server side (`destination`); `None`: every metric, every label.
    /// Series made before keep their labels; new ones take the new shape.
    pub fn shape(
        &self,
        policy: Option<(
            Option<&isthmus_proto::discovery::MetricsPolicy>,
            Option<&isthmus_proto::discovery::MetricsPolicy>,
        )>,
    ) {
        let (client, server) = policy.unwrap_or_default();
        let next = [Shape::of(client), Shape::of(server)];
        let mut shapes = self.shapes.write().unwrap_or_else(|p| p.into_inner());
        if *shapes != next {
            *shapes = next;
            // Handles were made for the old shape.
            self.seen.write().unwrap_or_else(|p| p.into_inner()).clear();
            self.seen_tcp
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
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
            ("istio_tcp_sent_bytes", |h| h.sent.get()),
            ("istio_tcp_received_bytes", |h| h.received.get()),
        ];
        for (i, (name, read)) in tcp.into_iter().enumerate() {
            let seen = self.seen_tcp.clone();
            meter
                .u64_observable_counter(name)
                .with_callback(move |observer| {
                    for h in seen.read().unwrap_or_else(|p| p.into_inner()).values() {
                        if let Some(a) = &h.attributes[i] {
                            observer.observe(read(h), a);
                        }
                    }
                })
                .build();
        }
    }

    /// Counts one opened connection; the handles count its bytes and its close.
    pub fn connection(&self, key: &SeriesKey) -> TcpHandles {
        let h = cached(&self.seen_tcp, key, || {
            let shape = self.shape_of(key.reporter);
            let labels = key.labels(false);
            // Metrics 4 to 7 of the shape: opened, closed, sent, received.
            let series = |i: usize| {
                shape
                    .on(4 + i)
                    .then(|| labels.clone().with_removed(shape.removed[4 + i]))
            };
            let family = |i: usize, f: &Family<Labels, Counter>| {
                series(i).map_or_else(Counter::default, |l| f.get_or_create(&l).clone())
            };
            TcpHandles {
                attributes: std::array::from_fn(|i| series(i).map(|l| l.attributes().into())),
                opened: family(0, &self.tcp_opened),
                closed: family(1, &self.tcp_closed),
                sent: family(2, &self.tcp_sent),
                received: family(3, &self.tcp_received),
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
            "health_checks",
            "probes of the HealthChecks this sidecar runs on its app, by service and result",
            self.health_checks.clone(),
        );
        own.register(
            "health_check_passing",
            "whether each HealthCheck this sidecar runs passes (1) or fails (0)",
            self.health_check_passing.clone(),
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
