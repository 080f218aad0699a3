//! The cluster's view of the mesh: the config set, the health its sidecars report, its
//! gateways, and the federation's global registry, turned into (a) the resources pushed to
//! proxies and (b) the exports sent to the federation. Rebuilt (debounced) on any change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use isthmus_core::config::watch::LoadStatus;
use isthmus_core::config::{ConfigSet, Member, NamespacedName, Service, TargetPort, WorkloadEntry};
use isthmus_core::identity::SpiffeId;
use isthmus_proto::discovery as xds;
use isthmus_proto::discovery::HealthReport;
use isthmus_proto::federation as fed;
use isthmus_proto::type_url;
use prost::Message;
use tokio::sync::{watch, Notify};

/// Changes within this window are pushed together, unless configured (Istio's default).
pub const DEBOUNCE: Duration = Duration::from_millis(100);
const GATEWAYS_FILE: &str = "gateways.json";
/// The sidecar tunnel port on every workload address.
pub const TUNNEL_PORT: u16 = 15008;

/// Encoded resources by type URL, then by name: (version, body).
#[derive(Debug, Default, PartialEq)]
pub struct Snapshot {
    pub resources: BTreeMap<&'static str, BTreeMap<String, (String, Bytes)>>,
    /// Services not visible to every namespace (Istio's exportTo): name → exportTo.
    pub export_to: BTreeMap<String, Vec<String>>,
    /// Labels of each WorkloadEntry, to find the Sidecar that selects its proxy.
    pub labels: BTreeMap<NamespacedName, BTreeMap<String, String>>,
    /// The services each workload serves: its proxy is always pushed them (a Sidecar's
    /// egress narrows what it calls, not what it serves).
    pub serves: BTreeMap<NamespacedName, std::collections::BTreeSet<String>>,
    /// ServiceEntries' hosts, which a Sidecar's egress hosts match instead of the name.
    pub hosts: BTreeMap<String, Vec<String>>,
    /// Services whose VirtualService or DestinationRule is exported to some namespaces
    /// only: each view of the service, for the proxies of the namespaces that have it.
    pub views: BTreeMap<String, Arc<ScopedViews>>,
    /// The admitted config: its Sidecars narrow what the proxies they select are pushed,
    /// and proxies with no WorkloadEntry are told their namespace's Sidecar and security
    /// policy from it.
    pub config: Arc<ConfigSet>,
    /// JWT issuers' keys the controller fetched, filled into the policies it pushes.
    pub jwks: Arc<crate::jwks::Keys>,
}

/// The encodings of a service as namespaces see it, when its VirtualService or
/// DestinationRule has an `exportTo`.
#[derive(Debug, PartialEq)]
pub struct ScopedViews {
    pub virtual_service: Option<isthmus_core::routing::Scope>,
    pub destination_rule: Option<isthmus_core::routing::Scope>,
    /// By (VirtualService visible, DestinationRule visible).
    pub encoded: BTreeMap<(bool, bool), (String, Bytes)>,
}

impl ScopedViews {
    /// The encoding a proxy of `namespace` is pushed.
    pub fn for_namespace(&self, namespace: &str) -> Option<&(String, Bytes)> {
        let sees = |s: &Option<isthmus_core::routing::Scope>| {
            s.as_ref().is_none_or(|s| s.visible_from(namespace))
        };
        self.encoded
            .get(&(sees(&self.virtual_service), sees(&self.destination_rule)))
    }
}

#[derive(Debug, Default, Clone)]
struct Health {
    /// Discovery streams open for this workload.
    streams: u32,
    healthy: bool,
    /// A sidecar has connected since this controller started.
    seen: bool,
    /// The verdicts of HealthChecks its sidecar runs: service (`namespace/name`) → passing,
    /// and what the last probe saw.
    checks: BTreeMap<String, (bool, String)>,
}

/// At most this many check verdicts are kept per workload (a sidecar runs one per service
/// its app serves); a longer report is cut, never trusted to size memory.
const MAX_CHECKS: usize = 64;
/// What a verdict's detail is cut to.
const MAX_DETAIL: usize = 256;

impl Health {
    /// Why the workload is no endpoint of `service` now, if it is not. Unknown workloads
    /// count as healthy, so a restarted controller does not withdraw endpoints before their
    /// sidecars reconnect; the data plane judges health too.
    fn fault(&self, service: &str) -> Option<String> {
        if self.seen && self.streams == 0 {
            return Some("its sidecar is not connected".into());
        }
        if self.seen && !self.healthy {
            return Some("its sidecar cannot connect to the app".into());
        }
        match self.checks.get(service) {
            Some((false, detail)) => Some(format!("failing its health check: {detail}")),
            _ => None,
        }
    }
}

use crate::federation::Global;
pub use crate::gateways::GatewayInfo;
use crate::gateways::Gateways;

struct Inner {
    cluster: String,
    trust_domain: String,
    trust: watch::Receiver<Arc<crate::trust::Issuing>>,
    config: watch::Receiver<Arc<ConfigSet>>,
    global: watch::Receiver<Arc<Global>>,
    health: Mutex<BTreeMap<NamespacedName, Health>>,
    /// Bumped whenever a workload's health changes, so the local part is rebuilt.
    health_gen: std::sync::atomic::AtomicU64,
    gateways: Mutex<Gateways>,
    jwks: crate::jwks::Resolver,
    cache: Mutex<Cache>,
    poke: Notify,
    snapshot: watch::Sender<Arc<Snapshot>>,
    exports: watch::Sender<Arc<fed::ClusterExports>>,
    /// The clusters the serving gateway cannot reach, for the federation.
    links: watch::Sender<BTreeMap<String, u64>>,
}

/// What depends only on this cluster's config and its proxies' health: rebuilt when
/// either changes, reused when only the global registry or the gateways change.
struct Local {
    config: Arc<ConfigSet>,
    health_gen: u64,
    jwks: Arc<crate::jwks::Keys>,
    /// Distinguishes one rebuild of the local part from the next.
    generation: u64,
    /// Local services by `namespace/name`, without remote clusters.
    services: BTreeMap<String, xds::Service>,
    workloads: BTreeMap<String, (String, Bytes)>,
    exports: Vec<fed::ExportedService>,
    labels: BTreeMap<NamespacedName, BTreeMap<String, String>>,
    serves: BTreeMap<NamespacedName, BTreeSet<String>>,
}

/// A service's encoding and what it was encoded from: the local part's generation and
/// the global entry (unchanged entries keep their `Arc`).
struct Encoded {
    generation: u64,
    global: Option<Arc<fed::GlobalService>>,
    /// The virtual IPs it was encoded with: its own, then its remote endpoints'.
    vips: Vec<std::net::Ipv4Addr>,
    resource: (String, Bytes),
    views: Option<Arc<ScopedViews>>,
}

/// Work kept between rebuilds, so a change costs what it touches: a change in another
/// cluster re-encodes only the services it changed.
#[derive(Default)]
struct Cache {
    local: Option<Arc<Local>>,
    generation: u64,
    encoded: HashMap<String, Encoded>,
}

#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn version_of(bytes: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// A resource's version (a hash of its bytes, so it survives a restart) and bytes.
pub(crate) fn encode(msg: &impl Message) -> (String, Bytes) {
    let buf = msg.encode_to_vec();
    (version_of(&buf), Bytes::from(buf))
}

/// Every view of a service whose routing is exported to some namespaces only.
fn scoped_views(
    merged: &xds::Service,
    routing: &isthmus_core::routing::ServiceRouting,
) -> ScopedViews {
    let mut encoded = BTreeMap::new();
    for vs in [true, false] {
        for dr in [true, false] {
            let mut view = routing.clone();
            if !vs {
                view.http.clear();
                view.tcp.clear();
            }
            if !dr {
                view.subsets.clear();
                view.policy = Default::default();
            }
            let mut svc = merged.clone();
            svc.routing = Some((&view).into());
            encoded.insert((vs, dr), encode(&svc));
        }
    }
    ScopedViews {
        virtual_service: routing.virtual_service_scope.clone(),
        destination_rule: routing.destination_rule_scope.clone(),
        encoded,
    }
}

/// What the federation is told of a local service: healthy endpoints per locality and
/// label set, and the identities that serve it.
fn export_of(local: &xds::Service) -> fed::ExportedService {
    type Key = (String, String, String, BTreeMap<String, String>);
    let mut counts: BTreeMap<Key, u32> = BTreeMap::new();
    let mut identities = BTreeSet::new();
    let mut endpoint_names = Vec::new();
    for ep in &local.endpoints {
        if local.headless && ep.healthy {
            if let Ok(addr) = ep.tunnel_address.parse::<std::net::SocketAddr>() {
                endpoint_names.push(isthmus_core::config::endpoint_label(
                    Some(&ep.hostname),
                    addr.ip(),
                ));
            }
        }
        let l = ep.locality.clone().unwrap_or_default();
        let count = counts
            .entry((l.region, l.zone, l.subzone, ep.labels.clone()))
            .or_default();
        *count += u32::from(ep.healthy);
        identities.insert(ep.identity.clone());
    }
    fed::ExportedService {
        export_to: local.export_to.clone(),
        namespace: local.namespace.clone(),
        name: local.name.clone(),
        ports: local
            .ports
            .iter()
            .map(|p| fed::ExportedPort {
                name: p.name.clone(),
                port: p.port,
                protocol: p.protocol.clone(),
            })
            .collect(),
        localities: counts
            .into_iter()
            .map(
                |((region, zone, subzone, labels), healthy)| fed::LocalityCount {
                    locality: Some(fed::Locality {
                        region,
                        zone,
                        subzone,
                    }),
                    healthy,
                    labels,
                },
            )
            .collect(),
        identities: identities.into_iter().collect(),
        endpoint_names,
    }
}

fn locality(w: &WorkloadEntry) -> xds::Locality {
    xds::Locality {
        region: w.locality.region.clone(),
        zone: w.locality.zone.clone(),
        subzone: w.locality.subzone.clone(),
    }
}

fn xds_locality(l: &fed::Locality) -> xds::Locality {
    xds::Locality {
        region: l.region.clone(),
        zone: l.zone.clone(),
        subzone: l.subzone.clone(),
    }
}

/// Where the sidecar forwards a service port: the numbered target, or the workload's named
/// port. 0 when the workload does not declare the name.
fn target_port(svc_port: &isthmus_core::config::ServicePort, w: Option<&WorkloadEntry>) -> u32 {
    match &svc_port.target_port {
        TargetPort::Number(n) => u32::from(*n),
        TargetPort::Named(name) => w
            .and_then(|w| w.ports.get(name))
            .map(|p| u32::from(*p))
            .unwrap_or(0),
    }
}

impl Registry {
    pub fn new(
        cluster: &str,
        trust_domain: &str,
        config: watch::Receiver<Arc<ConfigSet>>,
        global: watch::Receiver<Arc<Global>>,
        trust: watch::Receiver<Arc<crate::trust::Issuing>>,
        state_dir: &std::path::Path,
        jwks: crate::jwks::Resolver,
    ) -> Self {
        let gateways = Gateways::load(state_dir.join(GATEWAYS_FILE));
        let inner = Inner {
            cluster: cluster.to_owned(),
            trust_domain: trust_domain.to_owned(),
            trust,
            config,
            global,
            health: Mutex::default(),
            health_gen: Default::default(),
            gateways: Mutex::new(gateways),
            jwks,
            cache: Mutex::default(),
            poke: Notify::new(),
            snapshot: watch::Sender::new(Arc::default()),
            exports: watch::Sender::new(Arc::default()),
            links: watch::Sender::new(BTreeMap::new()),
        };
        let registry = Self {
            inner: Arc::new(inner),
        };
        registry.rebuild();
        registry
    }

    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.inner.snapshot.subscribe()
    }

    pub fn exports(&self) -> watch::Receiver<Arc<fed::ClusterExports>> {
        self.inner.exports.subscribe()
    }

    /// The clusters the serving gateway cannot reach, as it changes.
    pub fn unreachable(&self) -> watch::Receiver<BTreeMap<String, u64>> {
        self.inner.links.subscribe()
    }

    pub fn config(&self) -> Arc<ConfigSet> {
        self.inner.config.borrow().clone()
    }

    /// A sidecar's stream for `workload` opened.
    pub fn stream_opened(&self, workload: &NamespacedName) {
        let mut health = lock(&self.inner.health);
        let h = health.entry(workload.clone()).or_default();
        h.streams += 1;
        h.seen = true;
        drop(health);
        self.health_changed();
    }

    pub fn stream_closed(&self, workload: &NamespacedName) {
        if let Some(h) = lock(&self.inner.health).get_mut(workload) {
            h.streams = h.streams.saturating_sub(1);
        }
        self.health_changed();
    }

    pub fn report_health(&self, workload: &NamespacedName, report: &HealthReport) {
        let checks: BTreeMap<String, (bool, String)> = report
            .checks
            .iter()
            .take(MAX_CHECKS)
            .map(|c| {
                let mut detail = c.detail.clone();
                if detail.len() > MAX_DETAIL {
                    let mut end = MAX_DETAIL;
                    while !detail.is_char_boundary(end) {
                        end -= 1;
                    }
                    detail.truncate(end);
                }
                (c.service.clone(), (c.healthy, detail))
            })
            .collect();
        let mut health = lock(&self.inner.health);
        let h = health.entry(workload.clone()).or_default();
        if h.healthy == report.healthy && h.seen && h.checks == checks {
            return;
        }
        for (service, (healthy, detail)) in &checks {
            if h.checks.get(service).map(|c| c.0) != Some(*healthy) {
                tracing::info!(%workload, service, healthy, detail, "health check verdict changed");
            }
        }
        if h.healthy != report.healthy {
            tracing::info!(%workload, healthy = report.healthy, "workload health changed");
        }
        h.healthy = report.healthy;
        h.seen = true;
        h.checks = checks;
        drop(health);
        self.health_changed();
    }

    fn health_changed(&self) {
        self.inner
            .health_gen
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.poke.notify_one();
    }

    pub fn gateway_connected(&self, gw: GatewayInfo) {
        lock(&self.inner.gateways).connected(gw);
        self.inner.poke.notify_one();
    }

    /// A gateway reported the peer clusters it cannot reach now.
    pub fn gateway_links(&self, gw: &GatewayInfo, down: &[String]) {
        if lock(&self.inner.gateways).links(gw, down) {
            tracing::info!(gateway = %gw.tunnel_address, ?down, "gateway peer links changed");
            self.inner.poke.notify_one();
        }
    }

    /// A gateway's stream closed: its registration ends with its last stream.
    pub fn gateway_closed(&self, gw: &GatewayInfo) {
        lock(&self.inner.gateways).closed(gw);
        self.inner.poke.notify_one();
    }

    /// Rebuilds on every change, coalescing the changes of each `debounce` window, until
    /// the process ends.
    pub async fn run(self, debounce: Duration) {
        let mut config = self.inner.config.clone();
        let mut global = self.inner.global.clone();
        let mut trust = self.inner.trust.clone();
        let mut jwks = self.inner.jwks.subscribe();
        loop {
            tokio::select! {
                r = config.changed() => if r.is_err() { return },
                r = global.changed() => if r.is_err() { return },
                r = trust.changed() => if r.is_err() { return },
                r = jwks.changed() => if r.is_err() { return },
                _ = self.inner.poke.notified() => {}
            }
            tokio::time::sleep(debounce).await;
            config.borrow_and_update();
            global.borrow_and_update();
            trust.borrow_and_update();
            jwks.borrow_and_update();
            self.rebuild();
        }
    }

    fn rebuild(&self) {
        let config = self.inner.config.borrow().clone();
        let global = self.inner.global.borrow().clone();
        let gateways = lock(&self.inner.gateways).serving();
        let health_gen = self
            .inner
            .health_gen
            .load(std::sync::atomic::Ordering::Relaxed);
        let jwks = self.inner.jwks.current();
        let mut cache = lock(&self.inner.cache);
        let local = match &cache.local {
            Some(l)
                if Arc::ptr_eq(&l.config, &config)
                    && l.health_gen == health_gen
                    && Arc::ptr_eq(&l.jwks, &jwks) =>
            {
                l.clone()
            }
            _ => {
                if !cache
                    .local
                    .as_ref()
                    .is_some_and(|l| Arc::ptr_eq(&l.config, &config))
                {
                    self.inner.jwks.want(crate::jwks::sources(&config));
                }
                let health = lock(&self.inner.health).clone();
                cache.generation += 1;
                let local =
                    Arc::new(self.build_local(config, &health, health_gen, jwks, cache.generation));
                cache.local = Some(local.clone());
                local
            }
        };
        let snapshot = self.build_snapshot(&local, &global, &gateways, &mut cache.encoded);
        drop(cache);
        self.inner.snapshot.send_if_modified(|s| {
            let changed = **s != snapshot;
            if changed {
                *s = Arc::new(snapshot);
            }
            changed
        });
        let exports = fed::ClusterExports {
            cluster: self.inner.cluster.clone(),
            services: local.exports.clone(),
            gateways: gateways
                .iter()
                .map(|g| fed::Gateway {
                    address: g.quic_address.clone(),
                    identity: g.identity.clone(),
                })
                .collect(),
        };
        self.inner.exports.send_if_modified(|e| {
            let changed = **e != exports;
            if changed {
                *e = Arc::new(exports);
            }
            changed
        });
        let links = lock(&self.inner.gateways).unreachable();
        self.inner.links.send_if_modified(|l| {
            let changed = *l != links;
            *l = links;
            changed
        });
    }

    /// An endpoint of `service` as proxies see it: healthy when the platform says it is
    /// ready (always, outside Kubernetes; readiness is authoritative: no check puts back an
    /// endpoint that is not ready) and its sidecar reports no fault, nor a failing
    /// HealthCheck of the service.
    fn endpoint(
        &self,
        service: &NamespacedName,
        m: Member<'_>,
        health: &BTreeMap<NamespacedName, Health>,
    ) -> xds::Endpoint {
        let w = m.workload;
        let fault = if m.ready {
            health
                .get(&w.key)
                .and_then(|h| h.fault(&service.to_string()))
        } else {
            Some("not ready".to_owned())
        };
        xds::Endpoint {
            workload: w.key.to_string(),
            tunnel_address: std::net::SocketAddr::new(w.address, TUNNEL_PORT).to_string(),
            locality: Some(locality(w)),
            identity: SpiffeId::new(
                &self.inner.trust_domain,
                &w.key.namespace,
                &w.service_account,
            )
            .to_string(),
            healthy: fault.is_none(),
            labels: w.labels.clone(),
            hostname: m.hostname.unwrap_or_default().to_owned(),
            health_detail: fault.unwrap_or_default(),
        }
    }

    fn local_service(
        &self,
        config: &ConfigSet,
        svc: &Service,
        selected: &[Member<'_>],
        health: &BTreeMap<NamespacedName, Health>,
    ) -> xds::Service {
        xds::Service {
            namespace: svc.key.namespace.clone(),
            name: svc.key.name.clone(),
            ports: svc
                .ports
                .iter()
                .map(|p| xds::ServicePort {
                    name: p.name.clone(),
                    port: u32::from(p.port),
                    protocol: p.protocol.as_str().to_owned(),
                    target_port: target_port(p, selected.first().map(|m| m.workload)),
                })
                .collect(),
            endpoints: selected
                .iter()
                .map(|m| self.endpoint(&svc.key, *m, health))
                .collect(),
            remote: Vec::new(),
            routing: config.routing.get(&svc.key).map(Into::into),
            export_to: svc.export_to.clone(),
            hosts: svc.hosts.clone(),
            addresses: svc.addresses.clone(),
            external: svc.external.as_ref().map(|e| xds::ExternalService {
                resolution: e.resolution.as_str().to_owned(),
                endpoints: e
                    .endpoints
                    .iter()
                    .map(|ep| xds::ExternalEndpoint {
                        address: ep.address.clone(),
                        ports: ep
                            .ports
                            .iter()
                            .map(|(n, p)| (n.clone(), u32::from(*p)))
                            .collect(),
                    })
                    .collect(),
            }),
            headless: svc.headless,
        }
    }

    fn build_local(
        &self,
        config: Arc<ConfigSet>,
        health: &BTreeMap<NamespacedName, Health>,
        health_gen: u64,
        jwks: Arc<crate::jwks::Keys>,
        generation: u64,
    ) -> Local {
        let mut services = BTreeMap::new();
        let mut exports = Vec::new();
        let mut serves: BTreeMap<NamespacedName, BTreeSet<String>> = BTreeMap::new();
        // The services each workload serves, for security policies that target Services.
        let mut serving: BTreeMap<&NamespacedName, Vec<NamespacedName>> = BTreeMap::new();
        let targeted = config
            .authorization_policies
            .values()
            .any(|a| !a.services.is_empty())
            || config
                .request_authentications
                .values()
                .any(|a| !a.services.is_empty())
            || config.telemetries.values().any(|t| !t.services.is_empty());
        let selection = config.selection();
        for svc in config.services.values() {
            let selected = selection.members(svc);
            let local = self.local_service(&config, svc, &selected, health);
            // A service outside the mesh is reached from each cluster directly.
            if config.exports.contains(&svc.key) && svc.external.is_none() {
                exports.push(export_of(&local));
            }
            for m in &selected {
                if !config.sidecars.is_empty() {
                    serves
                        .entry(m.workload.key.clone())
                        .or_default()
                        .insert(svc.key.to_string());
                }
                if targeted {
                    serving
                        .entry(&m.workload.key)
                        .or_default()
                        .push(svc.key.clone());
                }
            }
            services.insert(svc.key.to_string(), local);
        }
        let workloads = config
            .workloads
            .values()
            .map(|w| {
                let serves = serving.get(&w.key).map(Vec::as_slice).unwrap_or_default();
                let mut inbound = isthmus_core::config::security::inbound_for(
                    &config,
                    &w.key.namespace,
                    &w.labels,
                    serves,
                );
                crate::jwks::fill(&jwks, &mut inbound);
                isthmus_core::config::security::alias_trust_domains(
                    &mut inbound,
                    &self.inner.trust_domain,
                    &config.mesh.trust_domain_aliases,
                );
                let msg = xds::Workload {
                    name: w.key.to_string(),
                    labels: w.labels.clone(),
                    locality: Some(locality(w)),
                    allow_any: isthmus_core::config::sidecar::scope_for(
                        &config.sidecars,
                        &w.key.namespace,
                        &w.labels,
                    )
                    .is_some_and(|s| s.allow_any),
                    inbound: Some(inbound),
                    owner: w.owner.clone().unwrap_or_default(),
                    telemetry: isthmus_core::config::telemetry::policy_for(
                        &config,
                        &w.key.namespace,
                        &w.labels,
                        serves,
                    ),
                    wasm_plugins: isthmus_core::config::wasm_plugin::plugins_for(
                        &config,
                        &w.key.namespace,
                        &w.labels,
                        serves,
                    ),
                };
                (w.key.to_string(), encode(&msg))
            })
            .collect();
        let labels = if config.sidecars.is_empty() {
            BTreeMap::new()
        } else {
            config
                .workloads
                .values()
                .map(|w| (w.key.clone(), w.labels.clone()))
                .collect()
        };
        Local {
            config,
            health_gen,
            jwks,
            generation,
            services,
            workloads,
            exports,
            labels,
            serves,
        }
    }

    /// A service as proxies here see it: its local part, if any, and every other cluster
    /// that exports it.
    fn merged_service(
        &self,
        local: Option<&xds::Service>,
        global: Option<&fed::GlobalService>,
    ) -> xds::Service {
        let mut svc = match (local, global) {
            (Some(l), _) => l.clone(),
            (None, Some(gs)) => xds::Service {
                namespace: gs.namespace.clone(),
                name: gs.name.clone(),
                ports: gs
                    .ports
                    .iter()
                    .map(|p| xds::ServicePort {
                        name: p.name.clone(),
                        port: p.port,
                        protocol: p.protocol.clone(),
                        target_port: p.port,
                    })
                    .collect(),
                export_to: gs.export_to.clone(),
                ..Default::default()
            },
            (None, None) => xds::Service::default(),
        };
        for c in global
            .iter()
            .flat_map(|g| &g.clusters)
            .filter(|c| c.cluster != self.inner.cluster)
        {
            svc.remote.push(xds::RemoteCluster {
                cluster: c.cluster.clone(),
                localities: c
                    .localities
                    .iter()
                    .map(|l| xds::LocalityCount {
                        locality: l.locality.as_ref().map(xds_locality),
                        healthy: l.healthy,
                        labels: l.labels.clone(),
                    })
                    .collect(),
                identities: c.identities.clone(),
                // Addresses are filled in with the virtual IPs (see `build_snapshot`).
                endpoints: c
                    .endpoint_names
                    .iter()
                    .map(|ep| (ep.clone(), String::new()))
                    .collect(),
            });
        }
        svc
    }

    fn build_snapshot(
        &self,
        local: &Local,
        global: &Global,
        gateways: &[GatewayInfo],
        encoded: &mut HashMap<String, Encoded>,
    ) -> Snapshot {
        let mut snapshot = Snapshot {
            config: local.config.clone(),
            jwks: local.jwks.clone(),
            labels: local.labels.clone(),
            serves: local.serves.clone(),
            ..Default::default()
        };
        let names: BTreeSet<&String> = local
            .services
            .keys()
            .chain(global.services.keys())
            .collect();
        // Virtual IPs: for each service with no address of its own, and for each endpoint
        // of a headless service in another cluster (its per-endpoint name resolves to it).
        let endpoint_keys: Vec<String> = global
            .services
            .iter()
            .flat_map(|(name, g)| {
                g.clusters
                    .iter()
                    .filter(|c| c.cluster != self.inner.cluster)
                    .flat_map(move |c| {
                        c.endpoint_names
                            .iter()
                            .map(move |ep| crate::vips::endpoint_key(name, &c.cluster, ep))
                    })
            })
            .collect();
        let vips = crate::vips::allocate(
            names
                .iter()
                .filter(|n| match local.services.get(**n) {
                    Some(l) => l.addresses.is_empty() && !l.headless && l.external.is_none(),
                    None => true,
                })
                .map(|n| n.as_str())
                .chain(endpoint_keys.iter().map(String::as_str)),
        );
        let mut kept = HashMap::with_capacity(names.len());
        let svc_map = snapshot.resources.entry(type_url::SERVICE).or_default();
        for name in names {
            let (l, g) = (local.services.get(name), global.services.get(name));
            let vip = vips.get(name.as_str()).copied();
            let endpoint_vips = |cluster: &str, ep: &str| {
                vips.get(crate::vips::endpoint_key(name, cluster, ep).as_str())
                    .copied()
            };
            let these_vips: Vec<std::net::Ipv4Addr> = vip
                .into_iter()
                .chain(g.iter().flat_map(|g| {
                    g.clusters.iter().flat_map(|c| {
                        c.endpoint_names
                            .iter()
                            .filter_map(|ep| endpoint_vips(&c.cluster, ep))
                    })
                }))
                .collect();
            let reusable = encoded.remove(name).filter(|e| {
                e.generation == local.generation
                    && e.vips == these_vips
                    && match (&e.global, g) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    }
            });
            let entry = reusable.unwrap_or_else(|| {
                let routing = name
                    .split_once('/')
                    .and_then(|(ns, n)| local.config.routing.get(&NamespacedName::new(ns, n)));
                let mut merged = self.merged_service(l, g.map(|g| &**g));
                merged.addresses.extend(vip.map(|v| v.to_string()));
                for rc in &mut merged.remote {
                    for (ep, addr) in &mut rc.endpoints {
                        if let Some(v) = endpoint_vips(&rc.cluster, ep) {
                            *addr = v.to_string();
                        }
                    }
                    rc.endpoints.retain(|_, addr| !addr.is_empty());
                }
                if l.is_none() {
                    // A service only other clusters run, routed by this cluster's config.
                    merged.routing = routing.map(Into::into);
                }
                let routing = routing.filter(|r| r.is_scoped());
                Encoded {
                    generation: local.generation,
                    global: g.cloned(),
                    vips: these_vips,
                    resource: encode(&merged),
                    views: routing.map(|r| Arc::new(scoped_views(&merged, r))),
                }
            });
            if let Some(v) = &entry.views {
                snapshot.views.insert(name.clone(), v.clone());
            }
            let export_to = l
                .map(|l| &l.export_to)
                .or(g.map(|g| &g.export_to))
                .filter(|to| !to.is_empty());
            if let Some(to) = export_to {
                snapshot.export_to.insert(name.clone(), to.clone());
            }
            if let Some(l) = l.filter(|l| !l.hosts.is_empty()) {
                snapshot.hosts.insert(name.clone(), l.hosts.clone());
            }
            svc_map.insert(name.clone(), entry.resource.clone());
            kept.insert(name.clone(), entry);
        }
        *encoded = kept;
        let gw = gateways.first();
        let issuing = self.inner.trust.borrow().clone();
        let mesh = xds::Mesh {
            cluster: self.inner.cluster.clone(),
            trust_domain: self.inner.trust_domain.clone(),
            gateway_address: gw.map(|g| g.tunnel_address.clone()).unwrap_or_default(),
            gateway_identity: gw.map(|g| g.identity.clone()).unwrap_or_default(),
            trust_bundle_pem: issuing.bundle_pem.clone(),
            ca_fingerprint: issuing.ca_fingerprint.clone(),
            removed_clusters: global.meta.removed_clusters.clone(),
            federation_stale_since_unix: global.federation_down_since.unwrap_or(0),
            cluster_stale_since_unix: global.meta.stale_since_unix.clone(),
            // This cluster's gateway's view, and the clusters no gateway can reach.
            unreachable_since_unix: {
                let mut down = global.meta.down_since_unix.clone();
                for (c, since) in lock(&self.inner.gateways).unreachable() {
                    down.entry(c)
                        .and_modify(|s| *s = (*s).min(since))
                        .or_insert(since);
                }
                down.remove(&self.inner.cluster);
                down
            },
            limit_shares: global
                .meta
                .limit_shares
                .iter()
                .filter_map(|(key, s)| Some((key.clone(), *s.by_cluster.get(&self.inner.cluster)?)))
                .collect(),
            failover: global
                .meta
                .failover
                .iter()
                .map(|f| xds::Failover {
                    from: f.from.clone(),
                    to: f.to.clone(),
                })
                .collect(),
        };
        snapshot
            .resources
            .entry(type_url::MESH)
            .or_default()
            .insert("mesh".into(), encode(&mesh));
        snapshot
            .resources
            .insert(type_url::WORKLOAD, local.workloads.clone());
        let peers = snapshot.resources.entry(type_url::PEER).or_default();
        for cg in global
            .meta
            .gateways
            .iter()
            .filter(|g| g.cluster != self.inner.cluster)
        {
            if let Some(g) = cg.gateways.first() {
                let peer = xds::Peer {
                    cluster: cg.cluster.clone(),
                    address: g.address.clone(),
                    identity: g.identity.clone(),
                };
                peers.insert(cg.cluster.clone(), encode(&peer));
            }
        }
        snapshot
    }

    /// The controller's `/config_dump`.
    pub fn dump(&self, status: &LoadStatus) -> serde_json::Value {
        let config = self.config();
        let health = lock(&self.inner.health).clone();
        let global = self.inner.global.borrow().clone();
        let selection = config.selection();
        let services: Vec<serde_json::Value> = config
            .services
            .values()
            .map(|svc| {
                let eps: Vec<serde_json::Value> = selection
                    .members(svc)
                    .into_iter()
                    .map(|m| {
                        let ep = self.endpoint(&svc.key, m, &health);
                        let detail = Some(ep.health_detail).filter(|d| !d.is_empty());
                        serde_json::json!({"workload": ep.workload, "owner": m.workload.owner, "address": ep.tunnel_address, "healthy": ep.healthy, "unhealthy_because": detail, "identity": ep.identity})
                    })
                    .collect();
                serde_json::json!({"service": svc.key.to_string(), "exported": config.exports.contains(&svc.key), "endpoints": eps})
            })
            .collect();
        serde_json::json!({
            "cluster": self.inner.cluster,
            "services": services,
            "gateways": lock(&self.inner.gateways).serving().iter().map(|g| serde_json::json!({"tunnel": g.tunnel_address, "quic": g.quic_address})).collect::<Vec<_>>(),
            "unreachable_since_unix": lock(&self.inner.gateways).unreachable(),
            "global_registry_version": global.version,
            "global_conflicts": global.meta.conflicts,
            "jwks": self.inner.jwks.dump(),
            "config": {
                "accepted": status.accepted,
                "rejected": status.rejected,
                "last_errors": status.last_errors.as_ref().map(|e| e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>()),
                "warnings": status.warnings.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            },
        })
    }
}

#[cfg(test)]
mod tests;
