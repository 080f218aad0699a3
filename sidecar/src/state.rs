//! The sidecar's view of the mesh, as pushed by the controller: services by every name an
//! app may use for them, with their endpoints in this cluster and the other clusters that
//! serve them. Rebuilt once per config change; requests only read it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use isthmus_core::identity::SpiffeId;
use isthmus_core::locality::Locality;

use crate::lb::{EndpointHealth, HealthTable};

/// One endpoint in the sidecar's own cluster.
#[derive(Debug)]
pub struct LocalEndpoint {
    pub workload: String,
    pub tunnel_address: SocketAddr,
    pub identity: SpiffeId,
    pub locality: Locality,
    pub labels: BTreeMap<String, String>,
    pub health: Arc<EndpointHealth>,
}

/// Another cluster that serves the service, reached through the gateways.
#[derive(Debug)]
pub struct RemoteCluster {
    pub cluster: String,
    /// Nearest locality of the cluster with a healthy endpoint.
    pub locality: Locality,
    pub identities: Vec<SpiffeId>,
    pub health: Arc<EndpointHealth>,
    /// The label sets of its healthy endpoints, for DestinationRule subsets.
    pub label_sets: Vec<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    pub port: u16,
    pub protocol: String,
    pub target_port: u16,
}

#[derive(Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub ports: Vec<Port>,
    /// Endpoints the controller reports healthy.
    pub endpoints: Vec<LocalEndpoint>,
    pub remote: Vec<RemoteCluster>,
    /// Round-robin cursor.
    pub cursor: std::sync::atomic::AtomicUsize,
    /// VirtualService routes and DestinationRule subsets, compiled.
    pub routing: Option<Arc<crate::routing_table::CompiledRouting>>,
}

impl Service {
    /// The port a request names, or the service's only/first HTTP port.
    pub fn port(&self, requested: Option<u16>) -> Option<&Port> {
        match requested {
            Some(p) => self.ports.iter().find(|x| x.port == p),
            None => self
                .ports
                .iter()
                .find(|x| x.protocol != "tcp")
                .or(self.ports.first()),
        }
    }

    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

/// Facts about this sidecar's cluster.
#[derive(Debug, Clone, Default)]
pub struct MeshInfo {
    pub cluster: String,
    pub gateway: Option<(SocketAddr, SpiffeId)>,
    /// Region failover order: from region → regions to prefer next, in order.
    pub failover: BTreeMap<String, Vec<String>>,
}

/// Everything requests read.
#[derive(Debug, Default)]
pub struct MeshState {
    pub services: BTreeMap<String, Arc<Service>>,
    /// Every name an app may use, to the service key.
    pub hosts: HashMap<String, String>,
    pub mesh: MeshInfo,
    /// Labels of this sidecar's own WorkloadEntry (for `sourceLabels`, `failoverPriority`).
    pub own_labels: Arc<BTreeMap<String, String>>,
}

impl MeshState {
    /// Finds the service a Host header names (`name`, `name.ns`, `name.ns.svc`,
    /// `name.ns.svc.cluster.local`, `name.ns.svc.clusterset.local`).
    pub fn resolve(&self, host: &str) -> Option<&Arc<Service>> {
        let key = self.hosts.get(host)?;
        self.services.get(key)
    }

    /// Rebuilds the host index.
    pub fn index(&mut self, own_namespace: &str) {
        self.hosts.clear();
        for (key, svc) in &self.services {
            let (n, ns) = (&svc.name, &svc.namespace);
            for host in [
                format!("{n}.{ns}"),
                format!("{n}.{ns}.svc"),
                format!("{n}.{ns}.svc.cluster.local"),
                format!("{n}.{ns}.svc.clusterset.local"),
            ] {
                self.hosts.insert(host, key.clone());
            }
            if ns == own_namespace {
                self.hosts.insert(n.clone(), key.clone());
            }
        }
    }

    /// Reattaches outlier state to endpoints that survive a config change.
    pub fn attach_health(&self, table: &HealthTable) {
        let mut live = Vec::new();
        for svc in self.services.values() {
            live.extend(svc.endpoints.iter().map(|e| e.health.clone()));
            live.extend(svc.remote.iter().map(|r| r.health.clone()));
        }
        table.retain(&live);
    }
}
