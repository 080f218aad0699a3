//! Endpoint choice: locality priority (same zone, then region, then the mesh's failover
//! regions, then the rest), round robin within the best tier that has a usable endpoint,
//! and passive health: consecutive failures eject an endpoint for a while, growing with
//! each ejection.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use isthmus_core::identity::SpiffeId;
use isthmus_core::locality::Locality;
use isthmus_core::routing::{locality_matches, LoadBalancer, LocalityLb};

use crate::state::{LocalEndpoint, MeshInfo, RemoteCluster, Service};

/// What went wrong with an attempt, for passive health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection (refused, reset under the request, timed out): the peer is plainly
    /// not there, so it is ejected at once.
    Connect,
    /// 502, 503 or 504 (or an error a proxy made itself).
    Gateway,
    /// Any other 5xx.
    ServerError,
}

/// When failures eject an endpoint and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub base_ms: u64,
    pub max_ms: u64,
    /// Ejection lengths double (default passive health) rather than grow linearly
    /// (Istio's `outlierDetection`, as Envoy does).
    pub doubling: bool,
}

impl Thresholds {
    /// Without `outlierDetection`: three proxy-made errors in a row, 2 s doubling to 30 s.
    pub const PASSIVE: Thresholds = Thresholds {
        consecutive_5xx: None,
        consecutive_gateway: Some(3),
        base_ms: 2_000,
        max_ms: 30_000,
        doubling: true,
    };

    pub fn from_outlier(o: &isthmus_core::routing::OutlierDetection) -> Self {
        Thresholds {
            consecutive_5xx: o.consecutive_5xx,
            consecutive_gateway: o.consecutive_gateway,
            base_ms: o.base_ejection_ms,
            max_ms: o.base_ejection_ms.max(300_000),
            doubling: false,
        }
    }
}

/// Passive health of one endpoint (or one remote cluster), shared across config changes.
#[derive(Debug)]
pub struct EndpointHealth {
    key: String,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since `epoch` until which the endpoint is ejected.
    ejected_until: AtomicU64,
    epoch: Instant,
    /// Requests in flight, for LEAST_REQUEST.
    active: AtomicU32,
    /// Whether the endpoint must prove itself before requests use it again after an
    /// ejection: [`PROVEN`], [`UNPROVEN`] or [`PROBING`].
    probe: AtomicU8,
}

const PROVEN: u8 = 0;
const UNPROVEN: u8 = 1;
const PROBING: u8 = 2;

/// Counts a request in flight on an endpoint while held.
pub struct InFlight(Arc<EndpointHealth>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointHealth {
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > self.now_ms()
    }

    /// How long the ejection still lasts; zero when not ejected.
    pub fn ejected_for(&self) -> std::time::Duration {
        let left = self
            .ejected_until
            .load(Ordering::Relaxed)
            .saturating_sub(self.now_ms());
        std::time::Duration::from_millis(left)
    }

    /// Whether the endpoint came back from an ejection and has not been probed since.
    /// Requests go elsewhere while one is left, so a peer that is still hung costs a
    /// background connect, not a request's wait.
    pub fn unproven(&self) -> bool {
        self.probe.load(Ordering::Relaxed) != PROVEN
    }

    /// True once per ejection: the caller starts the probe.
    pub fn claim_probe(&self) -> bool {
        self.probe
            .compare_exchange(UNPROVEN, PROBING, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// The probe's outcome: a connection came up, or it failed and ejects again (longer).
    pub fn probed(&self, reachable: bool, t: &Thresholds) {
        if reachable {
            self.probe.store(PROVEN, Ordering::Relaxed);
            self.success();
        } else {
            self.probe.store(UNPROVEN, Ordering::Relaxed);
            self.failure(Failure::Connect, t, true);
        }
    }

    pub fn success(&self) {
        self.probe.store(PROVEN, Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        if !self.is_ejected() {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failure; returns true when it ejected the endpoint. `may_eject` is false
    /// when the service already has as many endpoints ejected as it allows.
    pub fn failure(&self, f: Failure, t: &Thresholds, may_eject: bool) -> bool {
        let (c5, cg) = match f {
            Failure::Connect => (u32::MAX, u32::MAX),
            Failure::Gateway => (
                self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1,
                self.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1,
            ),
            Failure::ServerError => {
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                (self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1, 0)
            }
        };
        let over = t.consecutive_5xx.is_some_and(|n| c5 >= n)
            || t.consecutive_gateway.is_some_and(|n| cg >= n)
            || f == Failure::Connect;
        if !over || !may_eject || self.is_ejected() {
            return false;
        }
        let k = u64::from(self.ejections.fetch_add(1, Ordering::Relaxed) + 1);
        let length = if t.doubling {
            t.base_ms << (k - 1).min(8)
        } else {
            t.base_ms * k
        }
        .min(t.max_ms);
        self.ejected_until
            .store(self.now_ms() + length, Ordering::Relaxed);
        self.probe.store(UNPROVEN, Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        tracing::info!(endpoint = %self.key, ms = length, "endpoint ejected");
        true
    }
}

/// Health records by endpoint key, so they outlive config changes.
#[derive(Debug)]
pub struct HealthTable {
    entries: Mutex<HashMap<String, Arc<EndpointHealth>>>,
    epoch: Instant,
}

impl Default for HealthTable {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
            epoch: Instant::now(),
        }
    }
}

impl HealthTable {
    pub fn get(&self, key: &str) -> Arc<EndpointHealth> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .entry(key.to_owned())
            .or_insert_with(|| {
                Arc::new(EndpointHealth {
                    key: key.to_owned(),
                    consecutive_5xx: AtomicU32::new(0),
                    consecutive_gateway: AtomicU32::new(0),
                    ejections: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                    epoch: self.epoch,
                    active: AtomicU32::new(0),
                    probe: AtomicU8::new(PROVEN),
                })
            })
            .clone()
    }

    /// Forgets endpoints no longer in config.
    pub fn retain(&self, live: &[Arc<EndpointHealth>]) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, h| live.iter().any(|l| Arc::ptr_eq(l, h)));
    }
}

/// Where a request goes.
#[derive(Debug, Clone)]
pub enum Target {
    Local {
        address: SocketAddr,
        identity: SpiffeId,
        health: Arc<EndpointHealth>,
    },
    Remote {
        cluster: Arc<str>,
        identities: Vec<SpiffeId>,
        health: Arc<EndpointHealth>,
        /// The subset labels the remote gateway must match, encoded (`k=v,k2=v2`).
        subset: String,
        /// The one endpoint the remote gateway must reach (see [`RemoteCluster::endpoint`]).
        endpoint: Option<Arc<str>>,
    },
}

impl Target {
    pub fn health(&self) -> &Arc<EndpointHealth> {
        match self {
            Target::Local { health, .. } | Target::Remote { health, .. } => health,
        }
    }
}

/// Priority of `to` seen from `from`: lower is preferred. A DestinationRule's
/// `localityLbSetting` can switch localities off or give its own region failover order.
fn priority(to: &Locality, from: &Locality, mesh: &MeshInfo, setting: Option<&LocalityLb>) -> u32 {
    if setting.is_some_and(|l| !l.enabled) {
        return 0;
    }
    let p = u32::from(to.priority_from(from));
    if p < 3 {
        return p;
    }
    let position = match setting.filter(|l| !l.failover.is_empty()) {
        Some(l) => l
            .failover
            .iter()
            .filter(|(f, _)| *f == from.region)
            .position(|(_, t)| *t == to.region),
        None => mesh
            .failover
            .get(&from.region)
            .and_then(|order| order.iter().position(|r| *r == to.region)),
    };
    position.map_or(100, |i| 3 + i as u32)
}

/// With `distribute`, the locality pattern this request goes to, chosen by weight.
fn distribution<'a>(setting: Option<&'a LocalityLb>, from: &Locality) -> Option<&'a str> {
    let (_, to) = setting?
        .distribute
        .iter()
        .find(|(f, _)| locality_matches(f, &from.region, &from.zone, &from.subzone))?;
    let total: u32 = to.iter().map(|(_, w)| w).sum();
    let mut point = rand::random_range(0..total.max(1));
    to.iter()
        .find(|(_, w)| {
            if point < *w {
                true
            } else {
                point -= w;
                false
            }
        })
        .map(|(p, _)| p.as_str())
}

/// Which endpoints a request may use and how to choose among them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Selection<'a> {
    /// A DestinationRule subset's labels; endpoints must carry all of them. Subsets are
    /// served from this cluster's endpoints only.
    pub labels: Option<&'a BTreeMap<String, String>>,
    pub load_balancer: Option<&'a LoadBalancer>,
    /// The request's consistent-hash key, when the load balancer hashes.
    pub hash: Option<u64>,
    /// Below this share of usable endpoints, ejections are ignored (`minHealthPercent`).
    pub min_health_percent: u32,
    /// The DestinationRule's `localityLbSetting`, if any.
    pub locality: Option<&'a LocalityLb>,
    /// This workload's labels, for `failoverPriority`.
    pub own_labels: Option<&'a BTreeMap<String, String>>,
}

/// Subset labels as the gateways carry them: `k=v` pairs, sorted, comma-separated.
pub fn encode_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Rendezvous hashing: the endpoint whose (key, endpoint) hash is highest. Stable as
/// endpoints come and go: only the keys of a removed endpoint move.
fn rendezvous(tier: &[Candidate<'_>], key: u64) -> usize {
    use std::hash::{Hash, Hasher};
    let score = |t: &Candidate<'_>| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        t.health().key.hash(&mut h);
        h.finish()
    };
    (0..tier.len())
        .max_by_key(|i| score(&tier[*i]))
        .unwrap_or(0)
}

/// An endpoint or remote cluster considered by [`pick`], borrowed: only the one chosen is
/// made into a [`Target`].
enum Candidate<'a> {
    Local(&'a LocalEndpoint),
    Remote(&'a RemoteCluster),
}

impl Candidate<'_> {
    fn health(&self) -> &Arc<EndpointHealth> {
        match self {
            Candidate::Local(ep) => &ep.health,
            Candidate::Remote(rc) => &rc.health,
        }
    }
}

/// Picks the next target, skipping `tried`. Ejected endpoints are used only when nothing
/// else is left (better a likely failure than a certain one).
pub fn pick(
    svc: &Service,
    from: &Locality,
    mesh: &MeshInfo,
    tried: &[Arc<EndpointHealth>],
    sel: Selection<'_>,
) -> Option<Target> {
    let mut candidates = candidates(svc, from, mesh, &sel);
    candidates.retain(|(_, _, t)| !tried.iter().any(|h| Arc::ptr_eq(h, t.health())));
    let healthy = candidates.iter().filter(|(_, ejected, _)| !ejected).count();
    if sel.min_health_percent > 0
        && (healthy * 100) < candidates.len() * sel.min_health_percent as usize
    {
        for c in &mut candidates {
            c.1 = false;
        }
    }
    let usable = candidates.iter().any(|(_, ejected, _)| !ejected);
    candidates.retain(|(_, ejected, _)| !usable || !ejected);
    let best = candidates.iter().map(|(p, _, _)| *p).min()?;
    let mut tier: Vec<Candidate<'_>> = candidates
        .into_iter()
        .filter(|(p, _, _)| *p == best)
        .map(|(_, _, t)| t)
        .collect();
    let i = match sel.load_balancer.unwrap_or(&LoadBalancer::RoundRobin) {
        LoadBalancer::ConsistentHash(_) if sel.hash.is_some() => {
            rendezvous(&tier, sel.hash.unwrap_or(0))
        }
        LoadBalancer::RoundRobin | LoadBalancer::ConsistentHash(_) => {
            svc.cursor.fetch_add(1, Ordering::Relaxed) % tier.len()
        }
        LoadBalancer::Random => rand::random_range(0..tier.len()),
        LoadBalancer::LeastRequest => {
            // Power of two choices: the less busy of two random endpoints.
            let (a, b) = (
                rand::random_range(0..tier.len()),
                rand::random_range(0..tier.len()),
            );
            let load = |i: usize| tier[i].health().active.load(Ordering::Relaxed);
            if load(b) < load(a) {
                b
            } else {
                a
            }
        }
    };
    Some(match tier.swap_remove(i) {
        Candidate::Local(ep) => Target::Local {
            address: ep.tunnel_address,
            identity: ep.identity.clone(),
            health: ep.health.clone(),
        },
        Candidate::Remote(rc) => Target::Remote {
            cluster: rc.cluster.clone(),
            identities: rc.identities.clone(),
            health: rc.health.clone(),
            subset: sel.labels.map(encode_labels).unwrap_or_default(),
            endpoint: rc.endpoint.clone(),
        },
    })
}

/// One candidate as `isthmus explain` shows it.
#[derive(Debug, serde::Serialize)]
pub struct CandidateView {
    /// Lower tiers are used first; a tier is used only when every lower one has nothing
    /// usable left.
    pub tier: u32,
    /// `endpoint` (in this cluster) or `cluster` (through the gateways).
    pub kind: &'static str,
    pub name: String,
    pub locality: String,
    /// Why it is out (used only when nothing else is left), if it is.
    pub out: Option<String>,
}

/// The candidates [`pick`] weighs for `sel`, with their tiers and why any is out.
pub fn explain(
    svc: &Service,
    from: &Locality,
    mesh: &MeshInfo,
    sel: Selection<'_>,
) -> Vec<CandidateView> {
    let now = isthmus_core::admin::unix_seconds(std::time::SystemTime::now());
    let mut views: Vec<CandidateView> = candidates(svc, from, mesh, &sel)
        .into_iter()
        .map(|(tier, _, c)| {
            let ejected = c.health().is_ejected().then(|| {
                format!(
                    "ejected by outlier detection for {} ms more (it failed requests)",
                    c.health().ejected_for().as_millis()
                )
            });
            match c {
                Candidate::Local(ep) => CandidateView {
                    tier,
                    kind: "endpoint",
                    name: format!("{} at {}", ep.workload, ep.tunnel_address),
                    locality: ep.locality.to_string(),
                    out: ejected,
                },
                Candidate::Remote(rc) => {
                    let unreachable = mesh.unreachable.get(&*rc.cluster).map(|since| {
                        format!(
                            "unreachable for {}s: this cluster's gateway has no live link to {}'s gateway",
                            now.saturating_sub(*since),
                            rc.cluster
                        )
                    });
                    CandidateView {
                        tier,
                        kind: "cluster",
                        name: rc.cluster.to_string(),
                        locality: rc.locality.to_string(),
                        out: unreachable.or(ejected),
                    }
                }
            }
        })
        .collect();
    // Tiers as people count them: 0, 1, 2... in the order they are tried.
    let ranks: std::collections::BTreeSet<u32> = views.iter().map(|v| v.tier).collect();
    for v in &mut views {
        v.tier = ranks.iter().position(|r| *r == v.tier).unwrap_or(0) as u32;
    }
    views.sort_by_key(|v| v.tier);
    // Endpoints the controller took out are never candidates; shown last, with why.
    let never = ranks.len() as u32;
    views.extend(svc.unhealthy.iter().map(|(workload, why)| CandidateView {
        tier: never,
        kind: "endpoint",
        name: workload.clone(),
        locality: String::new(),
        out: Some(format!(
            "never used: its controller reports it unhealthy ({why})"
        )),
    }));
    views
}

/// Every endpoint and remote cluster a request may use, with its tier (lower first) and
/// whether it is out (ejected, or its cluster unreachable).
fn candidates<'a>(
    svc: &'a Service,
    from: &Locality,
    mesh: &MeshInfo,
    sel: &Selection<'_>,
) -> Vec<(u32, bool, Candidate<'a>)> {
    let mut candidates: Vec<(u32, bool, Candidate<'_>)> = Vec::new();
    let share = distribution(sel.locality, from);
    // With `distribute`, endpoints in the chosen locality form the first tier.
    let order = sel
        .locality
        .map(|l| l.failover_priority.as_slice())
        .unwrap_or_default();
    let no_labels = BTreeMap::new();
    let own = sel.own_labels.unwrap_or(&no_labels);
    // failoverPriority: the fewer leading keys an endpoint shares with the caller, the later.
    let label_rank = |l: &Locality, labels: &BTreeMap<String, String>| {
        let same = |key: &str| match key {
            "topology.kubernetes.io/region" => l.region == from.region,
            "topology.kubernetes.io/zone" => l.zone == from.zone && l.region == from.region,
            "topology.istio.io/subzone" => l.subzone == from.subzone && l.zone == from.zone,
            k => own.get(k).is_some_and(|v| labels.get(k) == Some(v)),
        };
        (order.len() - order.iter().take_while(|k| same(k)).count()) as u32
    };
    let rank = |l: &Locality| match share {
        Some(p) if locality_matches(p, &l.region, &l.zone, &l.subzone) => 0,
        Some(_) => 1 + priority(l, from, mesh, sel.locality),
        None => priority(l, from, mesh, sel.locality),
    };
    let in_subset = |labels: &BTreeMap<String, String>| {
        sel.labels
            .is_none_or(|want| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
    };
    for ep in svc.endpoints.iter().filter(|ep| in_subset(&ep.labels)) {
        let r = if order.is_empty() {
            rank(&ep.locality)
        } else {
            label_rank(&ep.locality, &ep.labels)
        };
        candidates.push((r, ep.health.is_ejected(), Candidate::Local(ep)));
    }
    if mesh.gateway.is_some() {
        for rc in svc
            .remote
            .iter()
            .filter(|rc| sel.labels.is_none() || rc.label_sets.iter().any(&in_subset))
        {
            let r = if order.is_empty() {
                rank(&rc.locality)
            } else {
                rc.label_sets
                    .iter()
                    .map(|ls| label_rank(&rc.locality, ls))
                    .min()
                    .unwrap_or(order.len() as u32)
            };
            // A cluster the gateway cannot reach counts as ejected: used only when nothing
            // else is left.
            let out = rc.health.is_ejected() || mesh.unreachable.contains_key(&*rc.cluster);
            candidates.push((r, out, Candidate::Remote(rc)));
        }
    }
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_back_from_ejection_is_probed_once_before_requests_use_it() {
        let table = HealthTable::default();
        let h = table.get("a");
        assert!(!h.unproven());
        let quick = Thresholds {
            base_ms: 0,
            ..Thresholds::PASSIVE
        };
        assert!(
            h.failure(Failure::Connect, &quick, true),
            "a connect failure ejects"
        );
        assert!(h.unproven());
        assert!(h.claim_probe(), "the first caller probes");
        assert!(!h.claim_probe(), "only one probe at a time");
        h.probed(false, &quick);
        assert!(
            h.unproven() && h.claim_probe(),
            "a failed probe leaves it unproven"
        );
        h.probed(true, &quick);
        assert!(!h.unproven(), "a connection came up: requests use it again");
    }
    use crate::state::{LocalEndpoint, RemoteCluster};

    fn svc(table: &HealthTable) -> Service {
        let ep = |addr: &str, loc: &str| LocalEndpoint {
            workload: addr.into(),
            tunnel_address: addr.parse().expect("addr"),
            identity: SpiffeId::new("td", "ns", "sa"),
            locality: Locality::parse(loc).expect("loc"),
            labels: [(
                "version".to_string(),
                if addr.ends_with(".1:1") { "v1" } else { "v2" }.to_string(),
            )]
            .into(),
            health: table.get(addr),
            hostname: None,
        };
        let rc = |c: &str, loc: &str| RemoteCluster {
            cluster: c.into(),
            locality: Locality::parse(loc).expect("loc"),
            identities: vec![],
            health: table.get(c),
            label_sets: vec![],
            endpoints: vec![],
            endpoint: None,
        };
        Service {
            namespace: "ns".into(),
            name: "s".into(),
            ports: vec![],
            endpoints: vec![
                ep("127.0.0.1:1", "us-east/a"),
                ep("127.0.0.2:1", "us-east/a"),
            ],
            workloads: vec![],
            unhealthy: Vec::new(),
            remote: vec![rc("eu", "eu-central/a"), rc("west", "us-west/a")],
            cursor: Default::default(),
            routing: None,
            hosts: vec![],
            addresses: vec![],
            external: None,
            host: "s.ns.svc.cluster.local".into(),
            named: crate::metrics::DestinationService::new(
                "s.ns.svc.cluster.local".into(),
                "s",
                "ns",
            ),
            headless: false,
        }
    }

    fn mesh() -> MeshInfo {
        let gw = (
            "127.0.0.9:1".parse().expect("addr"),
            SpiffeId::gateway("td"),
        );
        MeshInfo {
            cluster: "east".into(),
            gateway: Some(gw),
            failover: [("us-east".to_string(), vec!["us-west".to_string()])].into(),
            ..Default::default()
        }
    }

    fn name(t: &Target) -> String {
        match t {
            Target::Local { address, .. } => address.to_string(),
            Target::Remote { cluster, .. } => cluster.to_string(),
        }
    }

    #[test]
    fn local_endpoints_first_then_failover_region_then_the_rest() {
        let table = HealthTable::default();
        let s = svc(&table);
        let from = Locality::parse("us-east/a").expect("loc");
        let first = pick(&s, &from, &mesh(), &[], Selection::default()).expect("some");
        assert!(matches!(first, Target::Local { .. }));
        let l1 = table.get("127.0.0.1:1");
        let l2 = table.get("127.0.0.2:1");
        assert_eq!(
            name(
                &pick(
                    &s,
                    &from,
                    &mesh(),
                    &[l1.clone(), l2.clone()],
                    Selection::default()
                )
                .expect("some")
            ),
            "west"
        );
        let w = table.get("west");
        assert_eq!(
            name(&pick(&s, &from, &mesh(), &[l1, l2, w], Selection::default()).expect("some")),
            "eu"
        );
    }

    #[test]
    fn ejected_endpoints_are_skipped_until_nothing_else_is_left() {
        let table = HealthTable::default();
        let s = svc(&table);
        let from = Locality::parse("us-east/a").expect("loc");
        assert!(table
            .get("127.0.0.1:1")
            .failure(Failure::Connect, &Thresholds::PASSIVE, true));
        assert!(table
            .get("127.0.0.2:1")
            .failure(Failure::Connect, &Thresholds::PASSIVE, true));
        assert_eq!(
            name(&pick(&s, &from, &mesh(), &[], Selection::default()).expect("some")),
            "west"
        );
        for c in ["west", "eu"] {
            assert!(table
                .get(c)
                .failure(Failure::Connect, &Thresholds::PASSIVE, true));
        }
        assert!(
            pick(&s, &from, &mesh(), &[], Selection::default()).is_some(),
            "panic mode uses ejected endpoints"
        );
    }

    #[test]
    fn single_errors_do_not_eject() {
        let table = HealthTable::default();
        let h = table.get("x");
        assert!(!h.failure(Failure::Gateway, &Thresholds::PASSIVE, true));
        assert!(!h.failure(Failure::Gateway, &Thresholds::PASSIVE, true));
        h.success();
        assert!(!h.failure(Failure::Gateway, &Thresholds::PASSIVE, true));
        assert!(!h.is_ejected());
    }

    fn setting(
        enabled: bool,
        failover: &[(&str, &str)],
        distribute: &[(&str, &[(&str, u32)])],
    ) -> LocalityLb {
        LocalityLb {
            enabled,
            failover_priority: vec![],
            failover: failover
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            distribute: distribute
                .iter()
                .map(|(f, to)| {
                    (
                        f.to_string(),
                        to.iter().map(|(p, w)| (p.to_string(), *w)).collect(),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_destination_rule_failover_order_overrides_the_mesh_one() {
        let table = HealthTable::default();
        let s = svc(&table);
        let from = Locality::parse("us-east/a").expect("loc");
        let l = setting(true, &[("us-east", "eu-central")], &[]);
        let sel = Selection {
            locality: Some(&l),
            ..Default::default()
        };
        let locals = [table.get("127.0.0.1:1"), table.get("127.0.0.2:1")];
        assert_eq!(
            name(&pick(&s, &from, &mesh(), &locals, sel).expect("some")),
            "eu"
        );
    }

    #[test]
    fn disabled_locality_spreads_over_every_endpoint_and_distribute_shares_by_weight() {
        let table = HealthTable::default();
        let s = svc(&table);
        let from = Locality::parse("us-east/a").expect("loc");
        let off = setting(false, &[], &[]);
        let seen: std::collections::BTreeSet<String> = (0..200)
            .map(|_| {
                name(
                    &pick(
                        &s,
                        &from,
                        &mesh(),
                        &[],
                        Selection {
                            locality: Some(&off),
                            ..Default::default()
                        },
                    )
                    .expect("some"),
                )
            })
            .collect();
        assert!(
            seen.contains("eu") && seen.contains("west") && seen.contains("127.0.0.1:1"),
            "{seen:?}"
        );

        let share = setting(
            true,
            &[],
            &[("us-east/*", &[("us-east/*", 80), ("eu-central/*", 20)])],
        );
        let eu = (0..2000)
            .filter(|_| {
                name(
                    &pick(
                        &s,
                        &from,
                        &mesh(),
                        &[],
                        Selection {
                            locality: Some(&share),
                            ..Default::default()
                        },
                    )
                    .expect("some"),
                ) == "eu"
            })
            .count();
        assert!((300..500).contains(&eu), "{eu} of 2000 to eu");
    }

    #[test]
    fn failover_priority_prefers_endpoints_sharing_the_callers_labels() {
        let table = HealthTable::default();
        let s = svc(&table);
        let from = Locality::parse("us-east/a").expect("loc");
        let mut l = setting(true, &[], &[]);
        l.failover_priority = vec!["version".into()];
        let own: BTreeMap<String, String> = [("version".to_string(), "v2".to_string())].into();
        let sel = Selection {
            locality: Some(&l),
            own_labels: Some(&own),
            ..Default::default()
        };
        for _ in 0..10 {
            assert_eq!(
                name(&pick(&s, &from, &mesh(), &[], sel).expect("some")),
                "127.0.0.2:1"
            );
        }
    }
}
