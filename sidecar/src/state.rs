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
#[derive(Debug, Clone)]
pub struct LocalEndpoint {
    pub workload: String,
    pub tunnel_address: SocketAddr,
    pub identity: SpiffeId,
    pub locality: Locality,
    pub labels: BTreeMap<String, String>,
    pub health: Arc<EndpointHealth>,
    /// Its DNS label under a headless service (see `dns.rs`).
    pub hostname: Option<Arc<str>>,
}

/// Another cluster that serves the service, reached through the gateways.
#[derive(Debug)]
pub struct RemoteCluster {
    pub cluster: Arc<str>,
    /// Nearest locality of the cluster with a healthy endpoint.
    pub locality: Locality,
    pub identities: Vec<SpiffeId>,
    pub health: Arc<EndpointHealth>,
    /// The label sets of its healthy endpoints, for DestinationRule subsets.
    pub label_sets: Vec<BTreeMap<String, String>>,
    /// A headless service's endpoints there, by DNS label, with the virtual IP each one's
    /// name resolves to here.
    pub endpoints: Vec<(Arc<str>, std::net::IpAddr)>,
    /// Set on the one-endpoint services of [`MeshState::pods`]: the gateway there must
    /// reach this endpoint and no other.
    pub endpoint: Option<Arc<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: Arc<str>,
    pub port: u16,
    pub protocol: Arc<str>,
    pub target_port: u16,
    /// `<service host>:<port>`, the authority of requests sent to it.
    pub authority: http::uri::Authority,
}

impl Port {
    /// Whether the service speaks HTTP/2 on this port (`http2` or `grpc`).
    pub fn speaks_h2(&self) -> bool {
        matches!(&*self.protocol, "http2" | "grpc")
    }

    /// The authority of requests to `port` of the service named `host` (the host is a
    /// registry name: a valid authority, else the service's own name is not reachable).
    pub fn authority_of(host: &str, port: u16) -> http::uri::Authority {
        http::uri::Authority::from_maybe_shared(bytes::Bytes::from(format!("{host}:{port}")))
            .unwrap_or_else(|_| http::uri::Authority::from_static("invalid.host"))
    }
}

#[derive(Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub ports: Vec<Port>,
    /// Endpoints the controller reports healthy.
    pub endpoints: Vec<LocalEndpoint>,
    /// Every workload of this cluster the controller lists for it, healthy or not: what
    /// a workload's own sidecar checks an opaque tunnel's port against (its own health
    /// has no say in which ports it serves).
    pub workloads: Vec<String>,
    /// This cluster's endpoints the controller reports unhealthy, with why (not ready,
    /// failing a HealthCheck, ...): never used, shown in dumps and `isthmus explain`.
    pub unhealthy: Vec<(String, String)>,
    pub remote: Vec<RemoteCluster>,
    /// Round-robin cursor.
    pub cursor: std::sync::atomic::AtomicUsize,
    /// VirtualService routes and DestinationRule subsets, compiled.
    pub routing: Option<Arc<crate::routing_table::CompiledRouting>>,
    /// A ServiceEntry's hosts (exact, or `*.suffix`); empty for a Kubernetes Service.
    pub hosts: Vec<String>,
    /// A ServiceEntry's addresses, as (network, prefix length).
    pub addresses: Vec<(std::net::IpAddr, u8)>,
    /// Set for a service outside the mesh, reached directly (see `egress.rs`).
    pub external: Option<isthmus_core::config::External>,
    /// What metrics, logs and errors call it (see [`Service::name_of`]), made once.
    pub host: Arc<str>,
    /// Its host, name and namespace as metric labels name them.
    pub named: Arc<crate::metrics::DestinationService>,
    /// A headless Service: DNS answers its endpoints' addresses (see `dns.rs`).
    pub headless: bool,
}

impl Service {
    /// The port a request names, or the service's only/first HTTP port.
    pub fn port(&self, requested: Option<u16>) -> Option<&Port> {
        match requested {
            Some(p) => self.ports.iter().find(|x| x.port == p),
            None => self
                .ports
                .iter()
                .find(|x| &*x.protocol != "tcp")
                .or(self.ports.first()),
        }
    }

    /// The name the service goes by in responses and metrics: a ServiceEntry's first host,
    /// else its Kubernetes name.
    pub fn hostname(&self) -> Arc<str> {
        self.host.clone()
    }

    /// The service as telemetry names it.
    pub fn named(&self) -> Arc<crate::metrics::DestinationService> {
        self.named.clone()
    }

    /// The service as reached at one endpoint's address: that endpoint only (here, or in
    /// another cluster), at the target ports (where an app that resolved the endpoint
    /// connects), without routing rules (Istio sends such traffic to the original
    /// destination).
    fn one_endpoint(&self, endpoints: Vec<LocalEndpoint>, remote: Vec<RemoteCluster>) -> Self {
        Service {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            ports: self
                .ports
                .iter()
                .map(|p| Port {
                    port: p.target_port,
                    ..p.clone()
                })
                .collect(),
            endpoints,
            workloads: Vec::new(),
            unhealthy: Vec::new(),
            remote,
            cursor: Default::default(),
            routing: None,
            hosts: self.hosts.clone(),
            addresses: Vec::new(),
            external: None,
            host: self.host.clone(),
            named: self.named.clone(),
            headless: true,
        }
    }

    /// A service's name in metrics, logs and errors: a ServiceEntry's first host, or a
    /// Kubernetes Service's cluster-local DNS name.
    pub fn name_of(hosts: &[String], name: &str, namespace: &str) -> Arc<str> {
        match hosts.first() {
            Some(h) => h.as_str().into(),
            None => format!("{name}.{namespace}.svc.cluster.local").into(),
        }
    }
}

/// How responses and metrics name a host passed through under `ALLOW_ANY`, as Istio does.
pub const PASSTHROUGH: &str = "PassthroughCluster";

/// Facts about this sidecar's cluster.
#[derive(Debug, Clone, Default)]
pub struct MeshInfo {
    pub cluster: Arc<str>,
    pub gateway: Option<(SocketAddr, SpiffeId)>,
    /// Region failover order: from region → regions to prefer next, in order.
    pub failover: BTreeMap<String, Vec<String>>,
    /// Since when (Unix seconds) this cluster's controller cannot reach the federation:
    /// every other cluster's entries are as of then.
    pub federation_stale_since: Option<u64>,
    /// Other clusters the federation keeps but no longer hears from, and since when.
    pub cluster_stale_since: BTreeMap<String, u64>,
    /// Clusters this cluster's gateway cannot reach now, and since when: nothing is sent
    /// there while another cluster can serve.
    pub unreachable: BTreeMap<String, u64>,
    /// This cluster's share of each global rate limit (requests per second), by
    /// `namespace/service/limit`.
    pub limit_shares: BTreeMap<String, f64>,
}

impl MeshInfo {
    /// Since when `cluster`'s entries are not kept current, if they are not.
    pub fn stale_since(&self, cluster: &str) -> Option<u64> {
        let own = self.cluster_stale_since.get(cluster).copied();
        match (own, self.federation_stale_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Everything requests read.
#[derive(Debug, Default, Clone)]
pub struct MeshState {
    pub services: BTreeMap<String, Arc<Service>>,
    /// Every name an app may use, to the service key.
    pub hosts: HashMap<String, String>,
    /// ServiceEntry wildcard hosts, as (`.suffix`, service key), longest suffix first.
    pub wildcards: Vec<(String, String)>,
    /// ServiceEntry addresses, as (network, prefix length, service key).
    pub networks: Vec<(std::net::IpAddr, u8, String)>,
    /// The endpoints of headless services by address, each as a service of its own that
    /// reaches only that endpoint (see [`MeshState::index`]).
    pub pods: HashMap<std::net::IpAddr, Arc<Service>>,
    pub mesh: MeshInfo,
    /// Labels of this sidecar's own WorkloadEntry (for `sourceLabels`, `failoverPriority`).
    pub own_labels: Arc<BTreeMap<String, String>>,
    /// This workload as telemetry describes it (from its labels), sent to peers.
    pub own: Arc<crate::peer::Workload>,
    /// Istio's `ALLOW_ANY`: a host outside the registry passes through (see
    /// [`MeshState::passthrough`]); otherwise it is refused.
    pub allow_any: bool,
    /// What PeerAuthentication and AuthorizationPolicy say of traffic to this workload.
    pub inbound: Arc<crate::authz::InboundPolicy>,
    /// What Telemetry resources and the mesh config say of this workload's telemetry;
    /// `None`: the sidecar's flags decide.
    pub telemetry: Option<Arc<isthmus_proto::discovery::TelemetryPolicy>>,
    /// The WasmPlugins that apply to this workload, in the order they run (loaded by
    /// `wasm::Plugins`).
    pub wasm_plugins: Arc<Vec<isthmus_proto::discovery::WasmPlugin>>,
}

impl MeshState {
    /// Finds the service a Host header names (`name`, `name.ns`, `name.ns.svc`,
    /// `name.ns.svc.cluster.local`, `name.ns.svc.clusterset.local`).
    /// A ServiceEntry's hosts answer too: exact, then the longest `*.` suffix, then an IP
    /// within one of its addresses.
    pub fn resolve(&self, host: &str) -> Option<&Arc<Service>> {
        if let Some(key) = self.hosts.get(host) {
            return self.services.get(key);
        }
        let key = self
            .wildcards
            .iter()
            .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
            .map(|(_, k)| k);
        if let Some(key) = key {
            return self.services.get(key);
        }
        let ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .ok()?;
        self.resolve_ip(ip)
    }

    /// The service an address belongs to: a ServiceEntry's addresses, a Service's cluster
    /// IPs (the most specific range wins), else a headless service's endpoint.
    pub fn resolve_ip(&self, ip: std::net::IpAddr) -> Option<&Arc<Service>> {
        let key = self
            .networks
            .iter()
            .filter(|(net, bits, _)| within(ip, *net, *bits))
            .max_by_key(|(_, bits, _)| *bits)
            .map(|(_, _, k)| k);
        match key {
            Some(key) => self.services.get(key),
            None => self.pods.get(&ip),
        }
    }

    /// Under `ALLOW_ANY`, what a host outside the registry is: a service outside the mesh
    /// reached at the address asked for (Istio's `PassthroughCluster`, by which name it
    /// shows in metrics, so unknown hosts never become labels).
    pub fn passthrough(&self, port: Option<u16>, connect: bool) -> Option<Arc<Service>> {
        if !self.allow_any {
            return None;
        }
        let port = port.unwrap_or(80);
        Some(Arc::new(Service {
            namespace: String::new(),
            name: PASSTHROUGH.to_owned(),
            ports: vec![Port {
                name: "passthrough".into(),
                port,
                protocol: if connect { "tcp" } else { "http" }.into(),
                target_port: port,
                authority: Port::authority_of(PASSTHROUGH, port),
            }],
            endpoints: Vec::new(),
            workloads: Vec::new(),
            unhealthy: Vec::new(),
            remote: Vec::new(),
            cursor: Default::default(),
            routing: None,
            hosts: vec![PASSTHROUGH.to_owned()],
            host: PASSTHROUGH.into(),
            named: {
                static NAMED: std::sync::LazyLock<Arc<crate::metrics::DestinationService>> =
                    std::sync::LazyLock::new(|| {
                        crate::metrics::DestinationService::new(
                            PASSTHROUGH.into(),
                            PASSTHROUGH,
                            "unknown",
                        )
                    });
                NAMED.clone()
            },
            addresses: Vec::new(),
            external: Some(isthmus_core::config::External {
                resolution: isthmus_core::config::Resolution::None,
                endpoints: Vec::new(),
            }),
            headless: false,
        }))
    }

    /// Rebuilds the host index.
    ///
    /// An app that resolves a headless service gets its endpoints' addresses and connects
    /// to one of them (a StatefulSet's member, say) at its target port: that connection
    /// must reach that endpoint. So each endpoint's address maps to a service of one
    /// endpoint, whose ports are the target ports, without routing rules (Istio sends such
    /// traffic to the original destination).
    pub fn index(&mut self, own_namespace: &str) {
        self.hosts.clear();
        self.wildcards.clear();
        self.networks.clear();
        self.pods.clear();
        for svc in self.services.values().filter(|s| s.headless) {
            for ep in &svc.endpoints {
                let ip = ep.tunnel_address.ip();
                if self.pods.contains_key(&ip) {
                    continue;
                }
                let pinned = svc.one_endpoint(vec![ep.clone()], Vec::new());
                self.pods.insert(ip, Arc::new(pinned));
            }
        }
        // The same for a headless service's endpoints in other clusters, at their virtual
        // IPs: the tunnel names the endpoint, and that cluster's gateway reaches only it.
        for svc in self.services.values() {
            for rc in &svc.remote {
                for (name, vip) in &rc.endpoints {
                    let remote = RemoteCluster {
                        cluster: rc.cluster.clone(),
                        locality: rc.locality.clone(),
                        identities: rc.identities.clone(),
                        health: rc.health.clone(),
                        label_sets: Vec::new(),
                        endpoints: Vec::new(),
                        endpoint: Some(name.clone()),
                    };
                    self.pods
                        .entry(*vip)
                        .or_insert_with(|| Arc::new(svc.one_endpoint(Vec::new(), vec![remote])));
                }
            }
        }
        for (key, svc) in &self.services {
            if !svc.hosts.is_empty() {
                // A ServiceEntry answers to its hosts and addresses only, as in Istio.
                for h in &svc.hosts {
                    match h.strip_prefix('*') {
                        Some(suffix) => self.wildcards.push((suffix.to_owned(), key.clone())),
                        None => {
                            self.hosts.insert(h.clone(), key.clone());
                        }
                    }
                }
                for (net, bits) in &svc.addresses {
                    self.networks.push((*net, *bits, key.clone()));
                }
                continue;
            }
            // A Kubernetes Service's cluster IPs: what captured connections were going to.
            for (net, bits) in &svc.addresses {
                self.networks.push((*net, *bits, key.clone()));
            }
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
        // The most specific wildcard wins.
        self.wildcards
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
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

/// Whether `ip` lies in `net/bits`.
pub(crate) fn within(ip: std::net::IpAddr, net: std::net::IpAddr, bits: u8) -> bool {
    use std::net::IpAddr;
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(bits.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(bits.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}
