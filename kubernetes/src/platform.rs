//! Services, EndpointSlices, Pods and Nodes as the registry model: what Istio's
//! Kubernetes service registry reads, with the same rules.
//!
//! - A Service is a mesh service named by its `namespace/name`. Its TCP ports are its
//!   ports (UDP and SCTP ports are not proxied and are left out). A port's protocol comes
//!   from `appProtocol`, else from the prefix of its name (`http-web`, `grpc`), else it is
//!   unspecified (sniffed under capture), as the file adapter decides it. Its cluster IPs are addresses callers may name it by.
//!   An `ExternalName` Service is a service outside the mesh whose one endpoint is that
//!   DNS name (Istio's treatment).
//! - Its endpoints are those its EndpointSlices list (label `kubernetes.io/service-name`),
//!   never its selector: the slices are what Kubernetes says serves it, ready or not.
//!   Endpoints that reference no Pod (hand-written slices of outside addresses) are left
//!   out, since the mesh reaches endpoints through their sidecars.
//! - A Pod with an IP is a workload named `namespace/pod-name`, with its labels, service
//!   account, owner (its Deployment, StatefulSet, DaemonSet or Job), named container
//!   ports (what named target ports resolve to) and the locality of its Node (`topology.kubernetes.io/region` and `/zone`,
//!   `topology.istio.io/subzone`), or of its `istio-locality` label.

use std::collections::BTreeMap;

use isthmus_core::config::{
    Endpoint, External, ExternalEndpoint, NamespacedName, Platform, Protocol, Resolution, Service,
    ServicePort, TargetPort, WorkloadEntry, EXPORT_TO_ANNOTATION,
};
use isthmus_core::locality::Locality;
use k8s_openapi::api::core::v1::{Node, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The EndpointSlice label naming the Service it belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const REGION_LABEL: &str = "topology.kubernetes.io/region";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
/// Istio's per-pod locality override, `region.zone.subzone`.
const POD_LOCALITY_LABEL: &str = "istio-locality";

/// The objects the model is built from, as the reflector stores hold them.
pub struct Objects<'a> {
    pub services: &'a [std::sync::Arc<KubeService>],
    pub slices: &'a [std::sync::Arc<EndpointSlice>],
    pub pods: &'a [std::sync::Arc<Pod>],
    pub nodes: &'a [std::sync::Arc<Node>],
}

/// The registry model of what the cluster holds.
pub fn platform(objects: &Objects<'_>) -> Platform {
    let localities: BTreeMap<&str, Locality> = objects
        .nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, node_locality(n))))
        .collect();
    let mut out = Platform::default();
    for pod in objects.pods {
        if let Some(w) = workload(pod, &localities) {
            out.workloads.insert(w.key.clone(), w);
        }
    }
    for svc in objects.services {
        if let Some(s) = service(svc) {
            // Every Service has its endpoint list, empty until a slice names it: a
            // Service's endpoints never come from its selector here.
            out.endpoints.insert(s.key.clone(), Vec::new());
            out.services.insert(s.key.clone(), s);
        }
    }
    for slice in objects.slices {
        let Some(ns) = slice.metadata.namespace.as_deref() else {
            continue;
        };
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let Some(list) = out.endpoints.get_mut(&NamespacedName::new(ns, svc)) else {
            continue;
        };
        if slice.address_type == "FQDN" {
            continue;
        }
        for ep in &slice.endpoints {
            let Some(pod) = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.as_deref())
            else {
                continue;
            };
            let ns = ep
                .target_ref
                .as_ref()
                .and_then(|r| r.namespace.as_deref())
                .unwrap_or(ns);
            // Unset means ready (the EndpointSlice API's rule); terminating is never ready.
            let conditions = ep.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true)
                && !conditions.and_then(|c| c.terminating).unwrap_or(false);
            let key = NamespacedName::new(ns, pod);
            // A pod in two slices of one service (while slices are rebalanced) counts once.
            match list.iter_mut().find(|e| e.workload == key) {
                Some(e) => e.ready |= ready,
                None => list.push(Endpoint {
                    workload: key,
                    ready,
                    hostname: ep.hostname.clone(),
                }),
            }
        }
    }
    out
}

fn node_locality(node: &Node) -> Locality {
    let labels = node.metadata.labels.as_ref();
    let get = |k: &str| {
        labels
            .and_then(|l| l.get(k))
            .map(String::as_str)
            .unwrap_or_default()
    };
    Locality::new(get(REGION_LABEL), get(ZONE_LABEL), get(SUBZONE_LABEL))
}

fn workload(pod: &Pod, localities: &BTreeMap<&str, Locality>) -> Option<WorkloadEntry> {
    let ns = pod.metadata.namespace.as_deref()?;
    let name = pod.metadata.name.as_deref()?;
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let address = status.pod_ip.as_deref()?.parse().ok()?;
    let spec = pod.spec.as_ref()?;
    let labels: BTreeMap<String, String> = pod.metadata.labels.clone().unwrap_or_default();
    let locality = labels
        .get(POD_LOCALITY_LABEL)
        .and_then(|l| Locality::parse(&l.replace('.', "/")))
        .or_else(|| {
            spec.node_name
                .as_deref()
                .and_then(|n| localities.get(n).cloned())
        })
        .unwrap_or_default();
    // Native sidecars (init containers that keep running) serve ports too.
    let containers = spec.containers.iter().chain(
        spec.init_containers
            .iter()
            .flatten()
            .filter(|c| c.restart_policy.as_deref() == Some("Always")),
    );
    let mut ports = BTreeMap::new();
    for p in containers.flat_map(|c| c.ports.iter().flatten()) {
        if let (Some(n), Ok(port)) = (&p.name, u16::try_from(p.container_port)) {
            ports.entry(n.clone()).or_insert(port);
        }
    }
    Some(WorkloadEntry {
        key: NamespacedName::new(ns, name),
        address,
        ports,
        labels,
        locality,
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        owner: Some(owner(pod, name)),
    })
}

/// The workload a pod belongs to, as Istio names it: a ReplicaSet's Deployment (the
/// ReplicaSet's name without its pod-template hash), a StatefulSet, DaemonSet or Job by
/// name, else the pod itself.
fn owner(pod: &Pod, name: &str) -> String {
    let Some(controller) = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return name.to_owned();
    };
    let hash = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    match (controller.kind.as_str(), hash) {
        ("ReplicaSet", Some(hash)) => controller
            .name
            .strip_suffix(hash.as_str())
            .and_then(|n| n.strip_suffix('-'))
            .unwrap_or(&controller.name)
            .to_owned(),
        _ => controller.name.clone(),
    }
}

/// A port's protocol as Istio picks it: `appProtocol`, else the name's prefix before `-`.
/// Protocols the mesh carries as opaque bytes (TLS, databases) are TCP; an unknown name is
/// HTTP, as in the file adapter.
fn protocol(name: &str, app_protocol: Option<&str>) -> Protocol {
    let pick = |p: &str| match p.to_ascii_lowercase().as_str() {
        "kubernetes.io/h2c" => Some(Protocol::Http2),
        "https" | "tls" | "mongo" | "mysql" | "redis" | "kubernetes.io/wss" => Some(Protocol::Tcp),
        "kubernetes.io/ws" | "http-web" => Some(Protocol::Http),
        other => Protocol::parse(other),
    };
    if let Some(p) = app_protocol.and_then(pick) {
        return p;
    }
    pick(name.split('-').next().unwrap_or_default()).unwrap_or(Protocol::Unspecified)
}

fn service(svc: &KubeService) -> Option<Service> {
    let ns = svc.metadata.namespace.as_deref()?;
    let name = svc.metadata.name.as_deref()?;
    let spec = svc.spec.as_ref()?;
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let name = p.name.clone().unwrap_or_default();
            let target_port = match &p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => TargetPort::Number(u16::try_from(*n).ok()?),
                Some(IntOrString::String(s)) => match s.parse::<u16>() {
                    Ok(n) => TargetPort::Number(n),
                    Err(_) => TargetPort::Named(s.clone()),
                },
            };
            Some(ServicePort {
                protocol: protocol(&name, p.app_protocol.as_deref()),
                name,
                port,
                target_port,
            })
        })
        .collect();
    let export_to = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(EXPORT_TO_ANNOTATION))
        .map(|v| v.split(',').map(|e| e.trim().to_owned()).collect())
        .unwrap_or_default();
    let external = (spec.type_.as_deref() == Some("ExternalName"))
        .then(|| spec.external_name.clone())
        .flatten()
        .map(|host| External {
            resolution: Resolution::Dns,
            endpoints: vec![ExternalEndpoint {
                address: host,
                ports: BTreeMap::new(),
            }],
        });
    let addresses = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    Some(Service {
        key: NamespacedName::new(ns, name),
        ports,
        selector: spec
            .selector
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        export_to,
        hosts: Vec::new(),
        addresses,
        external,
        headless: spec.cluster_ip.as_deref() == Some("None"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn from_yaml<T: serde::de::DeserializeOwned>(yaml: &str) -> Arc<T> {
        Arc::new(serde_yaml_ng::from_str(yaml).expect("valid manifest"))
    }

    struct Cluster {
        services: Vec<Arc<KubeService>>,
        slices: Vec<Arc<EndpointSlice>>,
        pods: Vec<Arc<Pod>>,
        nodes: Vec<Arc<Node>>,
    }

    /// A Service, two pods on two nodes and the EndpointSlice kube-controller-manager
    /// writes for them, one pod ready, the other terminating.
    fn cluster() -> Cluster {
        let svc = from_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop, annotations: {networking.istio.io/exportTo: "shop, ops"}}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20]
  selector: {app: reviews}
  ports:
  - {name: http-web, port: 80, targetPort: web, protocol: TCP}
  - {name: rpc, port: 9090, targetPort: 9090, appProtocol: grpc}
  - {name: dns, port: 53, protocol: UDP}
"#,
        );
        let pod = |name: &str, ip: &str, node: &str| {
            from_yaml::<Pod>(&format!(
                r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {{app: reviews, version: v1}}}}
spec:
  serviceAccountName: reviews
  nodeName: {node}
  containers:
  - name: app
    image: reviews:1
    ports: [{{name: web, containerPort: 8080}}]
status: {{phase: Running, podIP: {ip}}}
"#
            ))
        };
        let slice = from_yaml(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-abcde
  namespace: shop
  labels: {kubernetes.io/service-name: reviews, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}
addressType: IPv4
ports:
- {name: http-web, port: 8080, protocol: TCP}
endpoints:
- addresses: [10.1.0.5]
  hostname: reviews-1
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-a
  zone: us-east-1a
  targetRef: {kind: Pod, name: reviews-1, namespace: shop}
- addresses: [10.1.1.7]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-b
  targetRef: {kind: Pod, name: reviews-2, namespace: shop}
- addresses: [192.0.2.9]
  conditions: {ready: true}
"#,
        );
        let node = |name: &str, zone: &str| {
            from_yaml::<Node>(&format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{topology.kubernetes.io/region: us-east-1, topology.kubernetes.io/zone: {zone}}}}}\n"
            ))
        };
        Cluster {
            services: vec![svc],
            slices: vec![slice],
            pods: vec![
                pod("reviews-1", "10.1.0.5", "node-a"),
                pod("reviews-2", "10.1.1.7", "node-b"),
            ],
            nodes: vec![node("node-a", "us-east-1a"), node("node-b", "us-east-1b")],
        }
    }

    #[test]
    fn services_pods_and_slices_become_services_workloads_and_endpoints() {
        let c = cluster();
        let p = platform(&Objects {
            services: &c.services,
            slices: &c.slices,
            pods: &c.pods,
            nodes: &c.nodes,
        });
        let key = NamespacedName::new("shop", "reviews");
        let svc = &p.services[&key];
        assert_eq!(svc.addresses, vec!["10.96.0.20".to_owned()]);
        assert_eq!(svc.export_to, vec!["shop".to_owned(), "ops".to_owned()]);
        let ports: Vec<_> = svc
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol, p.target_port.clone()))
            .collect();
        assert_eq!(
            ports,
            vec![
                (
                    "http-web",
                    80,
                    Protocol::Http,
                    TargetPort::Named("web".into())
                ),
                ("rpc", 9090, Protocol::Grpc, TargetPort::Number(9090)),
            ],
            "the UDP port is not proxied"
        );
        assert_eq!(
            p.endpoints[&key],
            vec![
                Endpoint {
                    workload: NamespacedName::new("shop", "reviews-1"),
                    ready: true,
                    hostname: Some("reviews-1".into()),
                },
                Endpoint {
                    workload: NamespacedName::new("shop", "reviews-2"),
                    ready: false,
                    hostname: None,
                },
            ],
            "the terminating pod is not ready; the address with no pod is left out; the \
             hostname (a StatefulSet pod's) names the endpoint under a headless Service"
        );
        let w = &p.workloads[&NamespacedName::new("shop", "reviews-2")];
        assert_eq!(w.service_account, "reviews");
        assert_eq!(w.ports.get("web"), Some(&8080));
        assert_eq!(w.locality, Locality::new("us-east-1", "us-east-1b", ""));
        assert_eq!(w.address.to_string(), "10.1.1.7");
        assert_eq!(
            w.owner.as_deref(),
            Some("reviews-2"),
            "a pod with no owner is its own"
        );
    }

    #[test]
    fn a_deployment_s_pod_belongs_to_the_deployment() {
        let pod: Arc<Pod> = from_yaml(
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-7d9f8c6b5-x2x9q
  namespace: shop
  labels: {app: reviews, pod-template-hash: 7d9f8c6b5}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-7d9f8c6b5, uid: u1, controller: true}
spec: {containers: [{name: app}]}
status: {phase: Running, podIP: 10.0.0.3}
"#,
        );
        let p = platform(&Objects {
            services: &[],
            slices: &[],
            pods: &[pod],
            nodes: &[],
        });
        let w = &p.workloads[&NamespacedName::new("shop", "reviews-v1-7d9f8c6b5-x2x9q")];
        assert_eq!(w.owner.as_deref(), Some("reviews-v1"));
    }

    /// The model of a cluster that holds `svc` and nothing else.
    fn services_only(svc: Arc<KubeService>) -> Platform {
        platform(&Objects {
            services: &[svc],
            slices: &[],
            pods: &[],
            nodes: &[],
        })
    }

    #[test]
    fn external_name_services_are_outside_the_mesh() {
        let svc: Arc<KubeService> = from_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec:\n  type: ExternalName\n  externalName: db.example.com\n  ports: [{name: tcp-pg, port: 5432}]\n",
        );
        let p = services_only(svc);
        let s = &p.services[&NamespacedName::new("shop", "db")];
        let ext = s.external.as_ref().expect("external");
        assert_eq!(ext.resolution, Resolution::Dns);
        assert_eq!(ext.endpoints[0].address, "db.example.com");
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
    }

    #[test]
    fn a_headless_service_is_marked_and_an_unnamed_port_is_left_to_sniffing() {
        let svc: Arc<KubeService> = from_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec:\n  clusterIP: None\n  ports: [{name: pg, port: 5432}, {port: 8080}]\n",
        );
        let p = services_only(svc);
        let s = &p.services[&NamespacedName::new("shop", "db")];
        assert!(s.headless && s.addresses.is_empty());
        assert_eq!(
            s.ports[0].protocol,
            Protocol::Unspecified,
            "`pg` names no protocol"
        );
        assert_eq!(s.ports[1].protocol, Protocol::Unspecified);
    }

    #[test]
    fn a_pod_label_overrides_its_node_locality_and_finished_pods_are_not_workloads() {
        let pod = |phase: &str| {
            from_yaml::<Pod>(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: a, labels: {{istio-locality: eu.eu-1a.rack3}}}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{phase: {phase}, podIP: 10.0.0.1}}\n"
            ))
        };
        let p = platform(&Objects {
            services: &[],
            slices: &[],
            pods: &[pod("Running")],
            nodes: &[],
        });
        let w = &p.workloads[&NamespacedName::new("a", "p")];
        assert_eq!(w.locality, Locality::new("eu", "eu-1a", "rack3"));
        assert_eq!(w.service_account, "default");
        let done = platform(&Objects {
            services: &[],
            slices: &[],
            pods: &[pod("Succeeded")],
            nodes: &[],
        });
        assert!(done.workloads.is_empty());
    }
}
