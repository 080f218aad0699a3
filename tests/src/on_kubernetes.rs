//! Clusters whose controller reads a (stand-in) Kubernetes API server instead of a folder.
//!
//! The harness plays the parts of the cluster's own machinery that the stand-in does not
//! run. As a user's `kubectl apply` it creates the Service and its ServiceExport. As the
//! kubelet it creates each workload's Pod and reports its status (IP, Running, the `Ready`
//! condition) through the status subresource. As kube-controller-manager it writes one
//! EndpointSlice per Service from the pods its selector picks, with their readiness.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::apiserver::{self, ApiServer};
use crate::{locality_of, Mesh, NAMESPACE};
use isthmus_core::identity::SYSTEM_NAMESPACE;
use std::path::PathBuf;

/// What the harness installs with: one controller, this mesh's federation and trust.
pub(crate) fn install_options(
    cluster: &str,
    federation: &str,
    trust_anchor_pem: &str,
) -> isthmus_kubernetes::install::Options {
    isthmus_kubernetes::install::Options {
        cluster: cluster.to_owned(),
        namespace: SYSTEM_NAMESPACE.to_owned(),
        image: "isthmus".into(),
        trust_domain: crate::TRUST_DOMAIN.into(),
        federation: federation.to_owned(),
        trust_anchor_pem: trust_anchor_pem.to_owned(),
        join_token: None,
        controller_replicas: 1,
        gateway_address: None,
        federation_root: None,
        federation_replicas: 2,
    }
}

/// The node every pod of a stand-in cluster runs on.
fn node_name(cluster: &str) -> String {
    format!("node-{cluster}")
}

impl Mesh {
    /// Where the kubelet of `cluster` keeps `pod`'s projected service-account token (a
    /// test that rotates it writes here before the pod's sidecar starts or while it runs).
    pub fn token_path(&mut self, cluster: &str, pod: &str) -> std::path::PathBuf {
        self.cluster(cluster)
            .state_dir
            .join("../pods")
            .join(pod)
            .join("token")
    }

    /// Starts a second controller replica of `cluster` on the pod address `.<host>`, as a
    /// Deployment's second pod: same cluster CA and keys (a copy of the state folder), its
    /// own listeners, Lease identity `<cluster>-controller-<host>`, no webhook.
    pub async fn start_controller_replica(
        &mut self,
        cluster: &str,
        host: u8,
    ) -> anyhow::Result<isthmus_controller::Bound> {
        let (fed, bundle, cert_ttl) =
            (self.federation_addr, self.bundle_pem.clone(), self.cert_ttl);
        let c = self.cluster(cluster);
        let state_dir = c.state_dir.with_file_name(format!("state-{host}"));
        std::fs::create_dir_all(&state_dir)?;
        for entry in std::fs::read_dir(&c.state_dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                // The running controller writes its state by temporary file and rename: a
                // file listed a moment ago may be gone (or renamed) by now.
                match std::fs::copy(entry.path(), state_dir.join(entry.file_name())) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    other => {
                        other?;
                    }
                }
            }
        }
        let ip = IpAddr::V4(crate::ip(c.block, c.index, host));
        let kubeconfig = self.controller_kubeconfig(cluster, host)?;
        let c = self.cluster(cluster);
        isthmus_controller::build(isthmus_controller::Config {
            cluster: c.name.clone(),
            trust_domain: crate::TRUST_DOMAIN.into(),
            source: isthmus_controller::ConfigSource::Kubernetes {
                kubeconfig: Some(kubeconfig),
                webhook: None,
                lease: crate::test_lease(&format!("{cluster}-controller-{host}")),
                proxy_image: None,
            },
            state_dir,
            grpc_addr: SocketAddr::new(ip, 15012),
            admin_addr: SocketAddr::new(ip, 15014),
            metrics_addr: None,
            federation_addrs: vec![fed],
            join_token: None,
            federation_bundle_pem: bundle,
            workload_cert_ttl: cert_ttl,
            push_debounce: isthmus_controller::PUSH_DEBOUNCE,
            jwks_refresh: isthmus_controller::JWKS_REFRESH,
            jwks_extra_roots_pem: None,
        })
        .await
    }

    /// The stand-in API server of `cluster`.
    pub fn api(&mut self, cluster: &str) -> &ApiServer {
        self.cluster(cluster)
            .kube
            .as_ref()
            .expect("a cluster on Kubernetes")
    }

    /// Starts `cluster`'s API server on its pod address `.3` with the built-in kinds,
    /// installs Isthmus on it from the manifests `isthmus install kubernetes` renders
    /// (CRDs, RBAC, webhook configuration; the workloads run in this process instead of
    /// the rendered StatefulSet and Deployment), routes the controller's Service to the
    /// controller's webhook listener, and registers the cluster's node.
    pub(crate) async fn start_api_server(&mut self, cluster: &str) -> anyhow::Result<()> {
        let dir = self.dir.path().join(cluster);
        std::fs::create_dir_all(&dir)?;
        let (bundle, federation) = (self.bundle_pem.clone(), self.federation_addr);
        let c = self.cluster(cluster);
        let ip = IpAddr::V4(crate::ip(c.block, c.index, 3));
        let webhook = SocketAddr::new(IpAddr::V4(crate::ip(c.block, c.index, 1)), 15017);
        let api = ApiServer::start(ip, &apiserver::builtin(), &dir).await?;
        api.route_service(SYSTEM_NAMESPACE, "isthmus-controller", 443, webhook);
        self.cluster(cluster).kube = Some(api);
        let manifests = isthmus_kubernetes::install::manifests(&install_options(
            cluster,
            &federation.to_string(),
            &bundle,
        ));
        self.kubectl_apply(cluster, &isthmus_kubernetes::install::to_yaml(&manifests))
            .await
            .context("applying the rendered install manifests")?;
        let l = locality_of(cluster);
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": node_name(cluster), "labels": {
                "topology.kubernetes.io/region": l.region, "topology.kubernetes.io/zone": l.zone}},
        }))?;
        let client = self.api(cluster).client().await?;
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &node)
            .await?;
        let namespace: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
            .create(&PostParams::default(), &namespace)
            .await?;
        Ok(())
    }

    /// Waits until the controller has published its webhook's CA bundle, as an operator
    /// waits for a rollout: until then the API server cannot call the webhook, and every
    /// write it validates fails (the webhook fails closed).
    pub(crate) async fn wait_webhook_ready(&mut self, cluster: &str) -> anyhow::Result<()> {
        use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
        let client = self.api(cluster).client().await?;
        let api = Api::<ValidatingWebhookConfiguration>::all(client);
        crate::eventually(
            "the webhook's CA bundle",
            std::time::Duration::from_secs(10),
            || async {
                let c = api.get(isthmus_kubernetes::WEBHOOK_CONFIGURATION).await?;
                let published = c
                    .webhooks
                    .unwrap_or_default()
                    .iter()
                    .all(|w| w.client_config.ca_bundle.is_some());
                anyhow::ensure!(published, "no caBundle yet");
                Ok(())
            },
        )
        .await
        .map(|_| ())
    }

    /// A kubeconfig for a controller replica of `cluster`: the controller's service
    /// account, as a pod of the rendered StatefulSet authenticates, under its own
    /// credential name `<cluster>-controller-<n>` in the access log.
    pub fn controller_kubeconfig(&mut self, cluster: &str, n: u8) -> anyhow::Result<PathBuf> {
        self.api(cluster).kubeconfig_for(
            &format!("{cluster}-controller-{n}"),
            &format!("system:serviceaccount:{SYSTEM_NAMESPACE}:isthmus-controller"),
        )
    }

    /// `kubectl apply` of a manifest of one or more documents to `cluster`'s API server.
    pub async fn kubectl_apply(&mut self, cluster: &str, yaml: &str) -> anyhow::Result<()> {
        let client = self.api(cluster).client().await?;
        kubectl_apply(&client, yaml).await
    }

    /// The workload's Pod, created and reported running and ready, as the kubelet would.
    pub(crate) async fn create_pod(
        &mut self,
        cluster: &str,
        name: &str,
        service: Option<&str>,
        service_account: &str,
        labels: &[(&str, &str)],
        ip: std::net::Ipv4Addr,
    ) -> anyhow::Result<()> {
        let client = self.api(cluster).client().await?;
        let mut pod_labels = serde_json::Map::new();
        if let Some(svc) = service {
            pod_labels.insert("app".into(), json!(svc));
        }
        for (k, v) in labels {
            pod_labels.insert((*k).into(), json!(v));
        }
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": pod_labels},
            "spec": {"serviceAccountName": service_account, "nodeName": node_name(cluster),
                     "containers": [{"name": "app", "image": "echo",
                                     "ports": [{"name": "http", "containerPort": crate::APP_PORT}]}]},
        }))?;
        let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
        pods.create(&PostParams::default(), &pod).await?;
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Running", "podIP": ip.to_string(),
                "podIPs": [{"ip": ip.to_string()}],
                "conditions": [{"type": "Ready", "status": "True"}]}}),
            ),
        )
        .await?;
        if let Some(svc) = service {
            if self.kube_service(cluster, svc).await?.is_none() {
                let yaml = crate::service_yaml(svc);
                self.kubectl_apply(cluster, &yaml).await?;
            }
            self.sync_endpoint_slice(cluster, svc).await?;
        }
        Ok(())
    }

    async fn kube_service(&mut self, cluster: &str, name: &str) -> anyhow::Result<Option<Service>> {
        let client = self.api(cluster).client().await?;
        Ok(Api::<Service>::namespaced(client, NAMESPACE)
            .get_opt(name)
            .await?)
    }

    /// Reports a pod's readiness as the kubelet would, and updates its service's slice.
    pub async fn set_pod_ready(
        &mut self,
        cluster: &str,
        pod: &str,
        ready: bool,
    ) -> anyhow::Result<()> {
        let client = self.api(cluster).client().await?;
        let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
        let status = if ready { "True" } else { "False" };
        let p = pods
            .patch_status(
                pod,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"status": {"conditions": [{"type": "Ready", "status": status}]}}),
                ),
            )
            .await?;
        if let Some(svc) = p.metadata.labels.as_ref().and_then(|l| l.get("app")) {
            self.sync_endpoint_slice(cluster, &svc.clone()).await?;
        }
        Ok(())
    }

    /// Deletes a pod, and its entry from its service's slice.
    pub async fn delete_pod(&mut self, cluster: &str, pod: &str) -> anyhow::Result<()> {
        let client = self.api(cluster).client().await?;
        let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
        let p = pods.get(pod).await?;
        pods.delete(pod, &DeleteParams::default()).await?;
        if let Some(svc) = p.metadata.labels.as_ref().and_then(|l| l.get("app")) {
            self.sync_endpoint_slice(cluster, &svc.clone()).await?;
        }
        Ok(())
    }

    /// Writes `service`'s EndpointSlice as kube-controller-manager's endpointslice
    /// controller would: the pods its selector picks, each with its address, readiness,
    /// node and zone, and the service's ports resolved to the pods' port numbers.
    pub async fn sync_endpoint_slice(
        &mut self,
        cluster: &str,
        service: &str,
    ) -> anyhow::Result<()> {
        let client = self.api(cluster).client().await?;
        let svc = Api::<Service>::namespaced(client.clone(), NAMESPACE)
            .get(service)
            .await?;
        let spec = svc.spec.clone().unwrap_or_default();
        let selector: Vec<String> = spec
            .selector
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
            .list(&kube::api::ListParams::default().labels(&selector.join(",")))
            .await?;
        let zone = locality_of(cluster).zone;
        let endpoints: Vec<serde_json::Value> = pods
            .items
            .iter()
            .filter_map(|p| {
                let status = p.status.as_ref()?;
                let ip = status.pod_ip.clone()?;
                let ready = status
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let terminating = p.metadata.deletion_timestamp.is_some();
                Some(json!({
                    "addresses": [ip],
                    "conditions": {"ready": ready && !terminating, "serving": ready, "terminating": terminating},
                    "nodeName": node_name(cluster), "zone": zone,
                    "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": p.metadata.name,
                                  "uid": p.metadata.uid},
                }))
            })
            .collect();
        let ports: Vec<serde_json::Value> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| {
                let target = match &p.target_port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => *n,
                    _ => p.port,
                };
                json!({"name": p.name, "port": target, "protocol": "TCP"})
            })
            .collect();
        let name = format!("{service}-abcde");
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": service,
                           "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                                     "uid": svc.metadata.uid, "controller": true, "blockOwnerDeletion": true}],
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        }))?;
        let slices: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
        match slices.get_opt(&name).await? {
            Some(old) => {
                let mut next = slice;
                next.metadata.resource_version = old.metadata.resource_version;
                slices.replace(&name, &PostParams::default(), &next).await?;
            }
            None => {
                slices.create(&PostParams::default(), &slice).await?;
            }
        }
        Ok(())
    }
}

/// `kubectl apply` of a manifest of one or more documents through `client`: each object
/// created, or merge-patched if it exists.
pub(crate) async fn kubectl_apply(client: &kube::Client, yaml: &str) -> anyhow::Result<()> {
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_json::from_value(value.clone())?;
        let types = obj.types.clone().context("apiVersion and kind")?;
        let gvk = kube::core::GroupVersionKind::try_from(&types)?;
        // Discovery says the resource's plural and scope, as kubectl finds them.
        let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("{} is not served", types.kind))?;
        let api: Api<DynamicObject> = match caps.scope {
            kube::discovery::Scope::Namespaced => Api::namespaced_with(
                client.clone(),
                obj.metadata.namespace.as_deref().unwrap_or(NAMESPACE),
                &ar,
            ),
            kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &ar),
        };
        let name = obj.metadata.name.clone().context("metadata.name")?;
        match api.get_opt(&name).await? {
            Some(_) => {
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&value))
                    .await?;
            }
            None => {
                api.create(&PostParams::default(), &obj).await?;
            }
        }
    }
    Ok(())
}
