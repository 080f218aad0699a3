//! The merge: every cluster's exports become one global registry. A service exported with
//! the same namespace and name by several clusters is one global service (the sameness rule
//! of the Multi-Cluster Services API); a cluster whose ports disagree with the first
//! exporter's is left out of that service and the conflict is reported, never merged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use isthmus_proto::federation::{
    ClusterExports, ClusterGateways, ClusterService, ExportedPort, Failover, GlobalRegistry as Msg,
    GlobalService,
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

#[derive(Clone)]
pub struct GlobalRegistry {
    exports: Arc<Mutex<BTreeMap<String, ClusterExports>>>,
    merged: watch::Sender<Arc<Msg>>,
    bundle_pem: String,
    failover: Vec<Failover>,
    clusters: Gauge,
    conflicts: Gauge,
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
    pub fn new(
        bundle_pem: String,
        failover: Vec<Failover>,
        metrics: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let clusters = Gauge::default();
        let conflicts = Gauge::default();
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
        let initial = Msg {
            version: 0,
            trust_bundle_pem: bundle_pem.clone(),
            failover: failover.clone(),
            ..Default::default()
        };
        Self {
            exports: Arc::default(),
            merged: watch::Sender::new(Arc::new(initial)),
            bundle_pem,
            failover,
            clusters,
            conflicts,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Msg>> {
        self.merged.subscribe()
    }

    /// Replaces a cluster's exports and republishes the merge if it changed.
    pub fn update(&self, exports: ClusterExports) {
        let mut all = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        if all.get(&exports.cluster) == Some(&exports) {
            return;
        }
        all.insert(exports.cluster.clone(), exports);
        let (services, gateways, conflicts) = merge(&all);
        self.clusters.set(all.len() as i64);
        drop(all);
        self.conflicts.set(conflicts.len() as i64);
        for c in &conflicts {
            tracing::warn!(conflict = %c, "export conflict");
        }
        self.merged.send_modify(|m| {
            let next = Msg {
                version: m.version + 1,
                services,
                gateways,
                conflicts,
                trust_bundle_pem: self.bundle_pem.clone(),
                failover: self.failover.clone(),
            };
            *m = Arc::new(next);
        });
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
        serde_json::json!({"version": m.version, "services": services, "conflicts": m.conflicts,
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
