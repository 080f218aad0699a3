//! The merge: every cluster's exports become one global registry. A service exported with
//! the same namespace and name by several clusters is one global service (the sameness rule
//! of the Multi-Cluster Services API); a cluster whose ports disagree with the first
//! exporter's is left out of that service and the conflict is reported, never merged.
//!
//! Work follows the change, not the mesh: a cluster's update names the services that
//! changed, only those are merged again, and each controller's stream is sent only the
//! services whose view changed for it since it last heard (a cluster is never sent its own
//! entries: it knows its own endpoints). A change log (service → version of its last
//! change) finds them without scanning the registry.
//!
//! A merged service is kept encoded, as its fields without `clusters` and one encoding per
//! exporting cluster's entry: protobuf encodings concatenate into the merged message, so a
//! cluster's view is those bytes without its own entry, cut once per change and stream with
//! no copy of the service's structure.
//!
//! Every cluster's last exports are kept on disk (written behind, at most every
//! [`PERSIST_INTERVAL`]), so a restarted federation publishes the whole registry at once: a
//! cluster that has not reported since the restart keeps its entries, marked stale, instead
//! of vanishing until its controller reconnects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use isthmus_proto::federation::{
    ClusterExports, ClusterGateways, ClusterService, ExportUpdate, ExportedPort, ExportedService,
    Failover, FederationState, Gateway, GlobalService, LimitDemand, LimitShares, RegistryMeta,
    RegistryUpdate, TrustReport,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prost::Message;
use tokio::sync::{watch, Notify};

/// Where the exports are kept, in the federation's state folder.
pub const STATE_FILE: &str = "registry.pb";
/// At most one write of the state file per this interval (a quiet change is written at once).
pub const PERSIST_INTERVAL: Duration = Duration::from_millis(100);
/// Removed services remembered in the change log beyond the live ones, before the log is
/// compacted (streams that heard nothing since then get the whole registry again).
const TOMBSTONE_SLACK: usize = 1024;
/// Services one export batch may carry (a bound on what a peer makes us buffer).
pub const MAX_BATCH_SERVICES: usize = 200_000;

/// A service's key in every map here: `namespace/name`.
pub fn key_of(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

#[derive(Clone)]
pub struct GlobalRegistry {
    inner: Arc<Mutex<Inner>>,
    changes: watch::Sender<u64>,
    /// Woken when a cluster's trust report or connection changes (the root rotation
    /// waits on these).
    trust_changed: Arc<Notify>,
    /// Bumped when a cluster is removed (its open stream ends; the refusal timer rearms).
    removals: watch::Sender<u64>,
    failover: Vec<Failover>,
    path: PathBuf,
    dirty: Arc<Notify>,
    metrics: Metrics,
}

/// The `cluster` label of the per-cluster metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ClusterLabel {
    cluster: String,
}

#[derive(Clone, Default)]
struct Metrics {
    /// Per cluster: whether its controller's stream is open now.
    connected: Family<ClusterLabel, Gauge>,
    /// Per cluster: when its controller was last heard from (a message, or its stream
    /// opening or closing), in seconds since the Unix epoch.
    last_seen: Family<ClusterLabel, Gauge>,
    /// Per cluster: 1 while its exports are kept from before a restart, unconfirmed.
    cluster_stale: Family<ClusterLabel, Gauge>,
    clusters: Gauge,
    conflicts: Gauge,
    stale: Gauge,
    services: Gauge,
    sent_bytes: Counter,
    sent_updates: Counter,
}

#[derive(Default, Clone, PartialEq)]
struct ClusterState {
    services: BTreeMap<String, ExportedService>,
    gateways: Vec<Gateway>,
}

/// One batch of a cluster's export stream: the messages up to one with `more` false,
/// applied whole.
#[derive(Default, Debug)]
pub struct ExportBatch {
    pub reset: bool,
    pub upserted: Vec<ExportedService>,
    pub withdrawn: Vec<String>,
    pub gateways: Option<Vec<Gateway>>,
    pub trust: Option<TrustReport>,
    /// The clusters the sender's gateway cannot reach, and since when.
    pub links: Option<BTreeMap<String, u64>>,
    /// The sender's budget and demand for each global rate limit.
    pub limits: Option<BTreeMap<String, LimitDemand>>,
}

impl ExportBatch {
    /// Adds one message; true when it ends the batch.
    pub fn add(&mut self, msg: ExportUpdate) -> bool {
        self.reset |= msg.reset;
        self.upserted.extend(msg.upserted);
        self.withdrawn.extend(msg.withdrawn);
        if let Some(g) = msg.gateways {
            self.gateways = Some(g.gateways);
        }
        if let Some(t) = msg.trust {
            self.trust = Some(t);
        }
        if let Some(l) = msg.links {
            self.links = Some(l.unreachable_since_unix.into_iter().collect());
        }
        if let Some(l) = msg.limits {
            self.limits = Some(l.by_key);
        }
        !msg.more
    }

    /// Services the batch names so far.
    pub fn services(&self) -> usize {
        self.upserted.len() + self.withdrawn.len()
    }
}

#[derive(Default)]
struct Inner {
    clusters: BTreeMap<String, ClusterState>,
    /// Clusters loaded from disk that have not reported since this process started.
    stale: BTreeSet<String>,
    /// When this process loaded them.
    loaded_at: u64,
    /// Per cluster that reported since this process started: whether its controller is
    /// connected, and when it was last heard from.
    liveness: BTreeMap<String, Liveness>,
    /// Per cluster, its controller's last trust report (this process's run only).
    trust: BTreeMap<String, TrustReport>,
    /// Per cluster, the clusters its gateway cannot reach, and since when (this run only).
    links: BTreeMap<String, BTreeMap<String, u64>>,
    /// Per cluster, its budget and demand for each global rate limit (this run only).
    limits: BTreeMap<String, BTreeMap<String, LimitDemand>>,
    /// Each global rate limit's split, as last published.
    limit_shares: BTreeMap<String, LimitShares>,
    /// The bundle and signing root every cluster is told of.
    bundle_pem: String,
    signing_root: String,
    /// Clusters removed from the federation -> when their certificates stop being
    /// accepted (Unix seconds); see `membership.rs`.
    removed: BTreeMap<String, u64>,
    merged: BTreeMap<String, Merged>,
    /// Per service, the exports left out of it.
    conflicts: BTreeMap<String, Vec<String>>,
    /// Version at which each service last changed (removed ones too), and the same as an
    /// ordered log.
    changed_at: HashMap<String, u64>,
    log: BTreeSet<(u64, String)>,
    meta: Arc<RegistryMeta>,
    meta_version: u64,
    version: u64,
    /// Streams that last heard before this version are sent the whole registry: the log
    /// no longer holds the removals before it.
    floor: u64,
}

#[derive(Clone, Copy)]
struct Liveness {
    connected: bool,
    last_seen: std::time::SystemTime,
}

fn port_signature(ports: &[ExportedPort]) -> Vec<(u32, String)> {
    let mut sig: Vec<(u32, String)> = ports.iter().map(|p| (p.port, p.protocol.clone())).collect();
    sig.sort();
    sig
}

/// One merged service, encoded.
#[derive(Debug, Clone, PartialEq)]
struct Merged {
    /// The GlobalService's fields but `clusters`, encoded (from the first exporter).
    head: Bytes,
    /// Per exporting cluster, in name order: its name, its `clusters` entry encoded as a
    /// GlobalService holding only that entry, and its healthy endpoints (for the dump).
    clusters: Vec<(String, Bytes, u32)>,
}

impl Merged {
    /// The service as `cluster` is sent it (without its own entry); `None` when no other
    /// cluster exports it.
    fn view_for(&self, cluster: &str) -> Option<Bytes> {
        let others = self.clusters.iter().filter(|(c, _, _)| c != cluster);
        let len: usize = others.clone().map(|(_, b, _)| b.len()).sum();
        if len == 0 {
            return None;
        }
        let mut buf = BytesMut::with_capacity(self.head.len() + len);
        buf.extend_from_slice(&self.head);
        for (_, b, _) in others {
            buf.extend_from_slice(b);
        }
        Some(buf.freeze())
    }
}

/// Merges one service across clusters (in cluster-name order, so the result is
/// deterministic): the service, if anyone exports it, and the conflicts left out.
fn merge_one(
    clusters: &BTreeMap<String, ClusterState>,
    key: &str,
) -> (Option<Merged>, Vec<String>) {
    let mut merged: Option<(Merged, &ExportedService)> = None;
    let mut conflicts = Vec::new();
    for (cluster, state) in clusters {
        let Some(svc) = state.services.get(key) else {
            continue;
        };
        match &mut merged {
            Some((m, first)) if port_signature(&first.ports) != port_signature(&svc.ports) => {
                let by = m.clusters.first().map(|c| c.0.as_str()).unwrap_or("?");
                conflicts.push(format!(
                    "service {key} exported by {cluster} with ports {:?}, but by {by} with {:?}; {cluster} is left out",
                    port_signature(&svc.ports), port_signature(&first.ports)
                ));
                continue;
            }
            _ => {}
        }
        let entry = GlobalService {
            clusters: vec![ClusterService {
                cluster: cluster.clone(),
                localities: svc.localities.clone(),
                identities: svc.identities.clone(),
                endpoint_names: svc.endpoint_names.clone(),
            }],
            ..Default::default()
        }
        .encode_to_vec();
        let healthy = svc.localities.iter().map(|l| l.healthy).sum();
        match &mut merged {
            Some((m, _)) => m.clusters.push((cluster.clone(), entry.into(), healthy)),
            None => {
                let head = GlobalService {
                    namespace: svc.namespace.clone(),
                    name: svc.name.clone(),
                    ports: svc.ports.clone(),
                    clusters: Vec::new(),
                    export_to: svc.export_to.clone(),
                };
                let m = Merged {
                    head: head.encode_to_vec().into(),
                    clusters: vec![(cluster.clone(), entry.into(), healthy)],
                };
                merged = Some((m, svc));
            }
        }
    }
    (merged.map(|(m, _)| m), conflicts)
}

fn fingerprint(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

impl Inner {
    /// The exports kept by an earlier run, if any could be read.
    fn load(path: &Path) -> Self {
        let Ok(bytes) = std::fs::read(path) else {
            return Self::default();
        };
        let state = match FederationState::decode(bytes.as_slice()) {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable registry state");
                return Self::default();
            }
        };
        let mut inner = Self {
            version: state.version,
            removed: state.removed,
            loaded_at: unix_seconds(std::time::SystemTime::now()) as u64,
            ..Self::default()
        };
        for c in state.clusters {
            inner.stale.insert(c.cluster.clone());
            let services = c
                .services
                .into_iter()
                .map(|s| (key_of(&s.namespace, &s.name), s))
                .collect();
            inner.clusters.insert(
                c.cluster,
                ClusterState {
                    services,
                    gateways: c.gateways,
                },
            );
        }
        tracing::info!(
            clusters = inner.clusters.len(),
            version = inner.version,
            "loaded the last exports of every cluster; stale until each reports"
        );
        inner
    }

    /// Merges `keys` again at `version`; returns whether any service or conflict changed.
    fn remerge(&mut self, keys: impl IntoIterator<Item = String>, version: u64) -> (bool, bool) {
        let (mut services_changed, mut conflicts_changed) = (false, false);
        for key in keys {
            let (merged, conflicts) = merge_one(&self.clusters, &key);
            let known = self.conflicts.get(&key).map(Vec::as_slice).unwrap_or(&[]);
            if known != conflicts.as_slice() {
                for c in &conflicts {
                    tracing::warn!(conflict = %c, "export conflict");
                }
                conflicts_changed = true;
                if conflicts.is_empty() {
                    self.conflicts.remove(&key);
                } else {
                    self.conflicts.insert(key.clone(), conflicts);
                }
            }
            if self.merged.get(&key) == merged.as_ref() {
                continue;
            }
            match merged {
                Some(m) => self.merged.insert(key.clone(), m),
                None => self.merged.remove(&key),
            };
            if let Some(old) = self.changed_at.insert(key.clone(), version) {
                self.log.remove(&(old, key.clone()));
            }
            self.log.insert((version, key));
            services_changed = true;
        }
        (services_changed, conflicts_changed)
    }

    /// Forgets removed services once there are many; streams behind get a full resync.
    /// Clusters with exports whose controller is not reporting, and since when.
    fn stale_since(&self) -> BTreeMap<String, u64> {
        self.clusters
            .keys()
            .filter_map(|c| {
                let since = match self.liveness.get(c) {
                    Some(l) if l.connected => return None,
                    Some(l) => unix_seconds(l.last_seen) as u64,
                    None => self.loaded_at,
                };
                Some((c.clone(), since))
            })
            .collect()
    }

    fn compact(&mut self) {
        if self.log.len() <= 2 * self.merged.len() + TOMBSTONE_SLACK {
            return;
        }
        let merged = &self.merged;
        self.log.retain(|(_, key)| merged.contains_key(key));
        self.changed_at.retain(|key, _| merged.contains_key(key));
        self.floor = self.version;
    }
}

impl GlobalRegistry {
    /// Starts from the exports kept in `state_dir`, if an earlier run left any.
    pub fn new(
        (bundle_pem, signing_root): (String, String),
        failover: Vec<Failover>,
        state_dir: &Path,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let metrics = Metrics::default();
        registry.register(
            "cluster_connected",
            "1 while the cluster's controller is connected, by cluster",
            metrics.connected.clone(),
        );
        registry.register(
            "cluster_last_seen_timestamp_seconds",
            "when the cluster's controller was last heard from (a message, or its stream opening or closing), by cluster",
            metrics.last_seen.clone(),
        );
        registry.register(
            "cluster_stale",
            "1 while the cluster's exports are kept from before a restart and not confirmed, by cluster",
            metrics.cluster_stale.clone(),
        );
        registry.register(
            "stale_clusters",
            "clusters whose exports are kept from before a restart and not confirmed since",
            metrics.stale.clone(),
        );
        registry.register(
            "clusters",
            "clusters whose exports are merged",
            metrics.clusters.clone(),
        );
        registry.register(
            "services",
            "services in the merged registry",
            metrics.services.clone(),
        );
        registry.register(
            "conflicts",
            "exports left out of the merge because of conflicts",
            metrics.conflicts.clone(),
        );
        registry.register(
            "sent_bytes",
            "bytes of registry updates sent to controllers",
            metrics.sent_bytes.clone(),
        );
        registry.register(
            "sent_updates",
            "registry update messages sent to controllers",
            metrics.sent_updates.clone(),
        );
        let path = state_dir.join(STATE_FILE);
        let mut inner = Inner::load(&path);
        let registry = Self {
            changes: watch::Sender::new(inner.version),
            inner: Arc::new(Mutex::new(Inner::default())),
            trust_changed: Arc::default(),
            removals: watch::Sender::new(0),
            failover,
            path,
            dirty: Arc::default(),
            metrics,
        };
        let keys: BTreeSet<String> = inner
            .clusters
            .values()
            .flat_map(|c| c.services.keys().cloned())
            .collect();
        (inner.bundle_pem, inner.signing_root) = (bundle_pem, signing_root);
        let version = inner.version + 1;
        inner.remerge(keys, version);
        inner.version = version;
        inner.floor = version;
        inner.meta_version = version;
        inner.meta = Arc::new(registry.meta_of(&inner));
        registry.observe(&inner);
        *registry.lock() = inner;
        registry.changes.send_replace(version);
        registry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn meta_of(&self, inner: &Inner) -> RegistryMeta {
        RegistryMeta {
            gateways: inner
                .clusters
                .iter()
                .filter(|(_, c)| !c.gateways.is_empty())
                .map(|(cluster, c)| ClusterGateways {
                    cluster: cluster.clone(),
                    gateways: c.gateways.clone(),
                })
                .collect(),
            conflicts: inner.conflicts.values().flatten().cloned().collect(),
            trust_bundle_pem: inner.bundle_pem.clone(),
            signing_root: inner.signing_root.clone(),
            removed_clusters: inner.refused_now(),
            stale_since_unix: inner.stale_since(),
            down_since_unix: inner.down_since(),
            failover: self.failover.clone(),
            stale_clusters: inner.stale.iter().cloned().collect(),
            limit_shares: inner.limit_shares.clone(),
        }
    }

    fn observe(&self, inner: &Inner) {
        let m = &self.metrics;
        m.clusters.set(inner.clusters.len() as i64);
        m.stale.set(inner.stale.len() as i64);
        for cluster in inner.clusters.keys() {
            m.cluster_stale
                .get_or_create(&ClusterLabel {
                    cluster: cluster.clone(),
                })
                .set(i64::from(inner.stale.contains(cluster)));
        }
        m.services.set(inner.merged.len() as i64);
        m.conflicts
            .set(inner.conflicts.values().map(Vec::len).sum::<usize>() as i64);
    }

    /// A stream of what changes for `cluster`, starting with the whole registry.
    pub fn subscribe(&self, cluster: &str) -> Subscription {
        Subscription {
            registry: self.clone(),
            cluster: cluster.to_owned(),
            sent: None,
            views: HashMap::new(),
            changes: self.changes.subscribe(),
        }
    }

    /// Tells every cluster a new trust bundle and signing root.
    pub fn set_trust(&self, bundle_pem: &str, signing_root: &str) {
        let mut inner = self.lock();
        if inner.bundle_pem == bundle_pem && inner.signing_root == signing_root {
            return;
        }
        (inner.bundle_pem, inner.signing_root) = (bundle_pem.to_owned(), signing_root.to_owned());
        let version = inner.version + 1;
        inner.version = version;
        inner.meta = Arc::new(self.meta_of(&inner));
        inner.meta_version = version;
        self.changes.send_replace(version);
    }

    /// Every cluster the federation knows (with exports kept, or heard from in this run):
    /// whether its controller is connected, and its last trust report.
    pub fn trust_reports(&self) -> Vec<(String, bool, Option<TrustReport>)> {
        let inner = self.lock();
        let names: BTreeSet<&String> = inner.clusters.keys().chain(inner.liveness.keys()).collect();
        names
            .into_iter()
            .map(|c| {
                (
                    c.clone(),
                    inner.liveness.get(c).is_some_and(|l| l.connected),
                    inner.trust.get(c).cloned(),
                )
            })
            .collect()
    }

    /// Woken when a trust report or a cluster's connection changes.
    pub fn trust_changed(&self) -> Arc<Notify> {
        self.trust_changed.clone()
    }

    /// Records that `cluster`'s controller was heard from: its stream opened
    /// (`Some(true)`), closed (`Some(false)`), or carried a message (`None`).
    pub fn heard(&self, cluster: &str, connected: Option<bool>) {
        let now = std::time::SystemTime::now();
        let mut inner = self.lock();
        if inner.removed.contains_key(cluster) {
            return;
        }
        let l = inner
            .liveness
            .entry(cluster.to_owned())
            .or_insert(Liveness {
                connected: false,
                last_seen: now,
            });
        l.last_seen = now;
        let changed = connected.is_some_and(|c| c != l.connected);
        if let Some(c) = connected {
            l.connected = c;
            self.trust_changed.notify_one();
        }
        let l = *l;
        if changed {
            // Every cluster hears which entries are stale, and since when.
            let version = inner.version + 1;
            inner.version = version;
            inner.meta = Arc::new(self.meta_of(&inner));
            inner.meta_version = version;
            self.changes.send_replace(version);
        }
        let label = ClusterLabel {
            cluster: cluster.to_owned(),
        };
        self.metrics
            .connected
            .get_or_create(&label)
            .set(i64::from(l.connected));
        self.metrics
            .last_seen
            .get_or_create(&label)
            .set(unix_seconds(now));
    }

    /// Applies one batch of `cluster`'s exports (confirming them if they were stale) and
    /// publishes a new version if anything changed.
    pub fn apply(&self, cluster: &str, batch: ExportBatch) {
        let mut inner = self.lock();
        if inner.removed.contains_key(cluster) {
            return;
        }
        if let Some(t) = batch.trust {
            inner.trust.insert(cluster.to_owned(), t);
            self.trust_changed.notify_one();
        }
        let down_before = inner.meta.down_since_unix.clone();
        if let Some(l) = batch.links {
            inner.links.insert(cluster.to_owned(), l);
        }
        let links_changed = inner.down_since() != down_before;
        let mut limits_changed = false;
        if let Some(l) = batch.limits {
            inner.limits.insert(cluster.to_owned(), l);
            let next = limits::shares(&inner.limits);
            if limits::moved(&inner.limit_shares, &next) {
                inner.limit_shares = next;
                limits_changed = true;
            }
        }
        let confirmed = inner.stale.remove(cluster);
        let state = inner.clusters.entry(cluster.to_owned()).or_default();
        let mut incoming: BTreeMap<String, Option<ExportedService>> = BTreeMap::new();
        if batch.reset {
            incoming.extend(state.services.keys().map(|k| (k.clone(), None)));
        }
        incoming.extend(batch.withdrawn.into_iter().map(|k| (k, None)));
        incoming.extend(
            batch
                .upserted
                .into_iter()
                .map(|s| (key_of(&s.namespace, &s.name), Some(s))),
        );
        let mut touched = Vec::new();
        for (key, new) in incoming {
            if state.services.get(&key) == new.as_ref() {
                continue;
            }
            match new {
                Some(s) => state.services.insert(key.clone(), s),
                None => state.services.remove(&key),
            };
            touched.push(key);
        }
        let gateways_changed = match batch.gateways {
            Some(g) if g != state.gateways => {
                state.gateways = g;
                true
            }
            _ => false,
        };
        let version = inner.version + 1;
        let (services_changed, conflicts_changed) = inner.remerge(touched, version);
        let meta_changed =
            gateways_changed || conflicts_changed || confirmed || links_changed || limits_changed;
        if !services_changed && !meta_changed {
            return;
        }
        inner.version = version;
        if meta_changed {
            inner.meta = Arc::new(self.meta_of(&inner));
            inner.meta_version = version;
        }
        inner.compact();
        self.observe(&inner);
        self.dirty.notify_one();
        // Sent under the lock, so versions go out in order.
        self.changes.send_replace(version);
    }

    /// Encodes every cluster's exports, as kept on disk.
    fn encode_state(&self) -> Vec<u8> {
        let inner = self.lock();
        FederationState {
            version: inner.version,
            clusters: inner
                .clusters
                .iter()
                .map(|(cluster, c)| ClusterExports {
                    cluster: cluster.clone(),
                    services: c.services.values().cloned().collect(),
                    gateways: c.gateways.clone(),
                })
                .collect(),
            removed: inner.removed.clone(),
        }
        .encode_to_vec()
    }

    /// Keeps the exports on disk, written behind changes; runs until dropped.
    pub async fn persist(self) {
        let (path, dirty) = (self.path.clone(), self.dirty.clone());
        isthmus_core::fsutil::write_behind(path, PERSIST_INTERVAL, dirty, move || {
            self.encode_state()
        })
        .await
    }

    /// Writes the exports to disk now.
    pub fn flush(&self) -> std::io::Result<()> {
        isthmus_core::fsutil::write_private(&self.path, &self.encode_state())
    }

    pub fn dump(&self) -> serde_json::Value {
        let inner = self.lock();
        let services: Vec<serde_json::Value> = inner
            .merged
            .iter()
            .map(|(key, m)| {
                let clusters: Vec<serde_json::Value> = m
                    .clusters
                    .iter()
                    .map(|(cluster, _, healthy)| serde_json::json!({"cluster": cluster, "healthy": healthy}))
                    .collect();
                serde_json::json!({"service": key, "clusters": clusters})
            })
            .collect();
        let meta = &inner.meta;
        // Every cluster with exports, and whether and when its controller was heard from.
        let clusters: Vec<serde_json::Value> = inner
            .clusters
            .keys()
            .map(|c| {
                let l = inner.liveness.get(c);
                serde_json::json!({
                    "cluster": c,
                    "connected": l.is_some_and(|l| l.connected),
                    "last_seen": l.map(|l| unix_seconds(l.last_seen)),
                    "stale": inner.stale.contains(c),
                    "unreachable_from": inner.unreachable_from(c),
                    "down_since_unix": inner.meta.down_since_unix.get(c),
                })
            })
            .collect();
        // Each global rate limit: per cluster, its demand and its published share.
        let limits: serde_json::Map<String, serde_json::Value> = inner
            .limit_shares
            .iter()
            .map(|(key, shares)| {
                let per_cluster: serde_json::Map<String, serde_json::Value> = shares
                    .by_cluster
                    .iter()
                    .map(|(c, share)| {
                        let demand = inner.limits.get(c).and_then(|l| l.get(key));
                        (
                            c.clone(),
                            serde_json::json!({
                                "share_rps": (share * 10.0).round() / 10.0,
                                "demand_rps": demand.map(|d| d.demand_rps),
                                "budget_rps": demand.map(|d| d.budget_rps),
                            }),
                        )
                    })
                    .collect();
                (key.clone(), serde_json::Value::Object(per_cluster))
            })
            .collect();
        serde_json::json!({"version": inner.version, "clusters": clusters, "services": services, "conflicts": meta.conflicts, "stale_clusters": meta.stale_clusters, "global_rate_limits": limits,
            "gateways": meta.gateways.iter().map(|g| serde_json::json!({"cluster": g.cluster, "addresses": g.gateways.iter().map(|x| x.address.clone()).collect::<Vec<_>>()})).collect::<Vec<_>>()})
    }
}

/// For a gauge.
fn unix_seconds(t: std::time::SystemTime) -> i64 {
    i64::try_from(isthmus_core::admin::unix_seconds(t)).unwrap_or(i64::MAX)
}

/// One controller's view of the registry as it changes.
pub struct Subscription {
    registry: GlobalRegistry,
    cluster: String,
    /// The version this stream was last brought to; `None` before the first batch.
    sent: Option<u64>,
    /// Fingerprint of each service as last sent, so an unchanged view is not sent again.
    views: HashMap<String, u64>,
    changes: watch::Receiver<u64>,
}

impl Subscription {
    /// The next batch for this cluster (the whole registry first), as messages of about
    /// [`isthmus_core::grpc::CHUNK_BYTES`]; waits until there is one. `None` when the
    /// registry is gone. Cancel-safe.
    pub async fn next(&mut self) -> Option<Vec<RegistryUpdate>> {
        loop {
            if let Some(batch) = self.pending() {
                let m = &self.registry.metrics;
                m.sent_updates.inc_by(batch.len() as u64);
                m.sent_bytes
                    .inc_by(batch.iter().map(|u| u.encoded_len() as u64).sum());
                return Some(batch);
            }
            self.changes.changed().await.ok()?;
        }
    }

    fn pending(&mut self) -> Option<Vec<RegistryUpdate>> {
        let registry = self.registry.clone();
        let inner = registry.lock();
        let after = match self.sent {
            Some(sent) if sent >= inner.version => return None,
            Some(sent) if sent >= inner.floor => Some(sent),
            _ => None,
        };
        let mut upserted = Vec::new();
        let mut withdrawn = Vec::new();
        match after {
            None => {
                self.views.clear();
                for (key, m) in &inner.merged {
                    if let Some(v) = m.view_for(&self.cluster) {
                        self.views.insert(key.clone(), fingerprint(&v));
                        upserted.push(v);
                    }
                }
            }
            Some(after) => {
                for (_, key) in inner.log.range((after + 1, String::new())..) {
                    match inner
                        .merged
                        .get(key)
                        .and_then(|m| m.view_for(&self.cluster))
                    {
                        Some(v) => {
                            let f = fingerprint(&v);
                            if self.views.insert(key.clone(), f) != Some(f) {
                                upserted.push(v);
                            }
                        }
                        None => {
                            if self.views.remove(key).is_some() {
                                withdrawn.push(key.clone());
                            }
                        }
                    }
                }
            }
        }
        let meta = after
            .is_none_or(|a| inner.meta_version > a)
            .then(|| (*inner.meta).clone());
        let version = inner.version;
        self.sent = Some(version);
        drop(inner);
        let reset = after.is_none();
        if !reset && upserted.is_empty() && withdrawn.is_empty() && meta.is_none() {
            return None;
        }
        let runs = isthmus_core::grpc::chunk_by_size(upserted, isthmus_core::grpc::CHUNK_BYTES);
        let last = runs.len() - 1;
        let mut meta = meta;
        let mut withdrawn = Some(withdrawn);
        Some(
            runs.into_iter()
                .enumerate()
                .map(|(i, run)| RegistryUpdate {
                    version,
                    reset,
                    upserted: run,
                    withdrawn: withdrawn.take().unwrap_or_default(),
                    meta: meta.take(),
                    more: i < last,
                })
                .collect(),
        )
    }
}

mod limits;
mod membership;
#[cfg(test)]
mod tests;
