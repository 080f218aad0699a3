//! The merge: every cluster's exports become one global registry. A service exported with
//! the same namespace and name by several clusters is one global service (the sameness rule
//! of the Multi-Cluster Services API); a cluster whose ports disagree with the first
//! exporter's is left out of that service and the conflict is reported, never merged.
//!
//! Every cluster's last exports are kept on disk, so a restarted federation publishes the
//! whole registry at once: a cluster that has not reported since the restart keeps its
//! entries, marked stale, instead of vanishing until its controller reconnects.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use isthmus_proto::federation::{
    ClusterExports, ClusterGateways, ClusterService, ExportedPort, Failover, FederationState,
    GlobalRegistry as Msg, GlobalService,
};
use prometheus_client::metrics::gauge::Gauge;
use prost::Message;
use tokio::sync::watch;

/// Where the exports are kept, in the federation's state folder.
const STATE_FILE: &str = "registry.pb";

#[derive(Clone)]
pub struct GlobalRegistry {
    inner: Arc<Mutex<Inner>>,
    merged: watch::Sender<Arc<Msg>>,
    bundle_pem: String,
    failover: Vec<Failover>,
    path: PathBuf,
    clusters: Gauge,
    conflicts: Gauge,
    stale: Gauge,
}

#[derive(Default)]
struct Inner {
    exports: BTreeMap<String, ClusterExports>,
    /// Clusters loaded from disk that have not reported since this process started.
    stale: BTreeSet<String>,
    version: u64,
}

/// The exports kept by an earlier run, if any could be read.
fn load(path: &Path) -> Inner {
    let Ok(bytes) = std::fs::read(path) else {
        return Inner::default();
    };
    match FederationState::decode(bytes.as_slice()) {
        Ok(state) => {
            let exports: BTreeMap<String, ClusterExports> = state
                .clusters
                .into_iter()
                .map(|c| (c.cluster.clone(), c))
                .collect();
            tracing::info!(
                clusters = exports.len(),
                version = state.version,
                "loaded the last exports of every cluster; stale until each reports"
            );
            Inner {
                stale: exports.keys().cloned().collect(),
                exports,
                version: state.version,
            }
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable registry state");
            Inner::default()
        }
    }
}

fn port_signature(ports: &[ExportedPort]) -> Vec<(u32, String)> {
    let mut sig: Vec<(u32, String)> = ports.iter().map(|p| (p.port, p.protocol.clone())).collect();
    sig.sort();
    sig
}

/// Merges exports (ordered by cluster name, so the result is deterministic).
pub fn merge(
    exports: &BTreeMap<String, ClusterExports>,
) -> (Vec<GlobalService>, Vec<ClusterGateways>, Vec<String>) {
    let mut services: BTreeMap<(String, String), GlobalService> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for (cluster, ex) in exports {
        for svc in &ex.services {
            let key = (svc.namespace.clone(), svc.name.clone());
            let global = services.entry(key).or_insert_with(|| GlobalService {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                ports: svc.ports.clone(),
                clusters: Vec::new(),
                export_to: svc.export_to.clone(),
            });
            if port_signature(&global.ports) != port_signature(&svc.ports) {
                let first = global
                    .clusters
                    .first()
                    .map(|c| c.cluster.as_str())
                    .unwrap_or("?");
                conflicts.push(format!(
                    "service {}/{} exported by {cluster} with ports {:?}, but by {first} with {:?}; {cluster} is left out",
                    svc.namespace, svc.name, port_signature(&svc.ports), port_signature(&global.ports)
                ));
                continue;
            }
            global.clusters.push(ClusterService {
                cluster: cluster.clone(),
                localities: svc.localities.clone(),
                identities: svc.identities.clone(),
            });
        }
    }
    let gateways = exports
        .iter()
        .filter(|(_, ex)| !ex.gateways.is_empty())
        .map(|(cluster, ex)| ClusterGateways {
            cluster: cluster.clone(),
            gateways: ex.gateways.clone(),
        })
        .collect();
    (services.into_values().collect(), gateways, conflicts)
}

impl GlobalRegistry {
    /// Starts from the exports kept in `state_dir`, if an earlier run left any.
    pub fn new(
        bundle_pem: String,
        failover: Vec<Failover>,
        state_dir: &Path,
        metrics: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let clusters = Gauge::default();
        let conflicts = Gauge::default();
        let stale = Gauge::default();
        metrics.register(
            "stale_clusters",
            "clusters whose exports are kept from before a restart and not confirmed since",
            stale.clone(),
        );
        metrics.register(
            "clusters",
            "clusters whose exports are merged",
            clusters.clone(),
        );
        metrics.register(
            "conflicts",
            "exports left out of the merge because of conflicts",
            conflicts.clone(),
        );
        let path = state_dir.join(STATE_FILE);
        let initial = Msg {
            version: 0,
            trust_bundle_pem: bundle_pem.clone(),
            failover: failover.clone(),
            ..Default::default()
        };
        let registry = Self {
            inner: Arc::new(Mutex::new(load(&path))),
            merged: watch::Sender::new(Arc::new(initial)),
            bundle_pem,
            failover,
            path,
            clusters,
            conflicts,
            stale,
        };
        {
            let inner = registry.lock();
            if !inner.exports.is_empty() {
                registry.publish(inner);
            }
        }
        registry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Msg>> {
        self.merged.subscribe()
    }

    /// Replaces a cluster's exports (confirming them if they were stale) and republishes
    /// the merge if anything changed.
    pub fn update(&self, exports: ClusterExports) {
        let mut inner = self.lock();
        let confirmed = inner.stale.remove(&exports.cluster);
        if !confirmed && inner.exports.get(&exports.cluster) == Some(&exports) {
            return;
        }
        inner.exports.insert(exports.cluster.clone(), exports);
        self.publish(inner);
    }

    /// Merges, keeps the exports on disk, and publishes the next version.
    fn publish(&self, mut inner: std::sync::MutexGuard<'_, Inner>) {
        let (services, gateways, conflicts) = merge(&inner.exports);
        inner.version += 1;
        let state = FederationState {
            version: inner.version,
            clusters: inner.exports.values().cloned().collect(),
        };
        if let Err(e) = isthmus_core::fsutil::write_private(&self.path, &state.encode_to_vec()) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot keep the exports on disk; a restart would start empty");
        }
        self.clusters.set(inner.exports.len() as i64);
        self.stale.set(inner.stale.len() as i64);
        self.conflicts.set(conflicts.len() as i64);
        for c in &conflicts {
            tracing::warn!(conflict = %c, "export conflict");
        }
        let next = Msg {
            version: inner.version,
            services,
            gateways,
            conflicts,
            trust_bundle_pem: self.bundle_pem.clone(),
            failover: self.failover.clone(),
            stale_clusters: inner.stale.iter().cloned().collect(),
        };
        // Sent under the lock, so versions go out in order.
        self.merged.send_replace(Arc::new(next));
    }

    pub fn dump(&self) -> serde_json::Value {
        let m = self.merged.borrow().clone();
        let services: Vec<serde_json::Value> = m
            .services
            .iter()
            .map(|s| {
                let clusters: Vec<serde_json::Value> = s
                    .clusters
                    .iter()
                    .map(|c| serde_json::json!({"cluster": c.cluster, "healthy": c.localities.iter().map(|l| l.healthy).sum::<u32>()}))
                    .collect();
                serde_json::json!({"service": format!("{}/{}", s.namespace, s.name), "clusters": clusters})
            })
            .collect();
        serde_json::json!({"version": m.version, "services": services, "conflicts": m.conflicts, "stale_clusters": m.stale_clusters,
            "gateways": m.gateways.iter().map(|g| serde_json::json!({"cluster": g.cluster, "addresses": g.gateways.iter().map(|x| x.address.clone()).collect::<Vec<_>>()})).collect::<Vec<_>>()})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_proto::federation::ExportedService;

    fn export(cluster: &str, port: u32) -> ClusterExports {
        ClusterExports {
            cluster: cluster.into(),
            services: vec![ExportedService {
                namespace: "demo".into(),
                name: "echo".into(),
                ports: vec![ExportedPort {
                    name: "http".into(),
                    port,
                    protocol: "http".into(),
                }],
                ..Default::default()
            }],
            gateways: vec![],
        }
    }

    #[test]
    fn same_name_in_several_clusters_is_one_service() {
        let all: BTreeMap<_, _> = [
            ("east".to_string(), export("east", 80)),
            ("west".to_string(), export("west", 80)),
        ]
        .into();
        let (services, _, conflicts) = merge(&all);
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].clusters.len(), 2);
        assert!(conflicts.is_empty());
    }

    #[test]
    fn conflicting_ports_are_reported_not_merged() {
        let all: BTreeMap<_, _> = [
            ("east".to_string(), export("east", 80)),
            ("west".to_string(), export("west", 81)),
        ]
        .into();
        let (services, _, conflicts) = merge(&all);
        assert_eq!(services[0].clusters.len(), 1);
        assert_eq!(conflicts.len(), 1);
        assert!(
            conflicts[0].contains("west is left out"),
            "{}",
            conflicts[0]
        );
    }
}

#[cfg(test)]
mod restart_tests {
    use super::*;
    use isthmus_proto::federation::ExportedService;

    fn exports(cluster: &str) -> ClusterExports {
        ClusterExports {
            cluster: cluster.into(),
            services: vec![ExportedService {
                namespace: "demo".into(),
                name: "echo".into(),
                ..Default::default()
            }],
            gateways: vec![],
        }
    }

    #[test]
    fn a_restarted_registry_keeps_every_cluster_stale_until_it_reports() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut metrics = prometheus_client::registry::Registry::default();
        let first = GlobalRegistry::new(String::new(), vec![], dir.path(), &mut metrics);
        first.update(exports("east"));
        first.update(exports("west"));
        let before = first.subscribe().borrow().clone();
        assert_eq!(before.services[0].clusters.len(), 2);
        assert!(before.stale_clusters.is_empty());

        let mut metrics = prometheus_client::registry::Registry::default();
        let second = GlobalRegistry::new(String::new(), vec![], dir.path(), &mut metrics);
        let after = second.subscribe().borrow().clone();
        assert_eq!(after.services, before.services, "nothing vanished");
        assert!(after.version > before.version, "versions keep growing");
        assert_eq!(after.stale_clusters, vec!["east", "west"]);
        second.update(exports("east"));
        let confirmed = second.subscribe().borrow().clone();
        assert_eq!(confirmed.stale_clusters, vec!["west"]);
        assert_eq!(confirmed.services[0].clusters.len(), 2);
    }
}
