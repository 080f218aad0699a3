//! The Multi-Cluster Services API's `ServiceImport`: for every service that other clusters
//! export, the controller keeps a ServiceImport of the same name in the same namespace, as
//! an MCS implementation does, so `kubectl get serviceimports` shows what
//! `<name>.<namespace>.svc.clusterset.local` reaches.
//!
//! Only the leader writes. A ServiceImport is created only where its namespace exists
//! here (namespace sameness: a namespace absent from this cluster imports nothing). Each
//! one carries the service's ports, and in its status the clusters that serve it. Those it
//! manages are labelled; they are updated when the global registry changes, deleted when
//! no other cluster exports the service any more, and checked again every
//! [`RESYNC`] in case someone edited or deleted them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;
use tokio::sync::watch;

/// The label on the ServiceImports the controller manages.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "isthmus");
/// How often the ServiceImports are checked even when nothing changed.
pub const RESYNC: Duration = Duration::from_secs(30);

/// A service other clusters export, as this cluster imports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    pub namespace: String,
    pub name: String,
    /// (name, port, protocol as the mesh names it: http, http2, grpc, tcp).
    pub ports: Vec<(String, u16, String)>,
    /// The other clusters that export it.
    pub clusters: BTreeSet<String>,
}

pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("multicluster.x-k8s.io", "v1alpha1", "ServiceImport"),
        "serviceimports",
    )
}

fn object(i: &Import) -> serde_json::Value {
    let ports: Vec<serde_json::Value> = i
        .ports
        .iter()
        .map(|(name, port, protocol)| match protocol.as_str() {
            // Not declared where the service runs: not declared here either.
            "auto" => json!({"name": name, "port": port, "protocol": "TCP"}),
            _ => json!({"name": name, "port": port, "protocol": "TCP", "appProtocol": protocol}),
        })
        .collect();
    json!({
        "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
        "metadata": {"name": i.name, "namespace": i.namespace,
                     "labels": {MANAGED_BY.0: MANAGED_BY.1}},
        "spec": {"type": "ClusterSetIP", "ports": ports},
    })
}

/// The namespaces of the cluster, by name.
pub(crate) async fn namespaces(client: &kube::Client) -> Result<BTreeSet<String>, kube::Error> {
    Ok(Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect())
}

/// Makes the ServiceImports match `imports` once.
async fn reconcile(client: &kube::Client, imports: &[Import]) -> Result<(), kube::Error> {
    let ar = api_resource();
    let namespaces = namespaces(client).await?;
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let mut existing: BTreeMap<(String, String), DynamicObject> = all
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter_map(|o| Some(((o.metadata.namespace.clone()?, o.metadata.name.clone()?), o)))
        .collect();
    for i in imports.iter().filter(|i| namespaces.contains(&i.namespace)) {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &i.namespace, &ar);
        let want = object(i);
        let have = existing.remove(&(i.namespace.clone(), i.name.clone()));
        match &have {
            Some(have) if have.data.get("spec") == Some(&want["spec"]) => {}
            Some(have) => {
                let mut next: DynamicObject = serde_json::from_value(want.clone())
                    .expect("an object built from its own fields");
                next.metadata.resource_version = have.metadata.resource_version.clone();
                api.replace(&i.name, &PostParams::default(), &next).await?;
            }
            None => {
                let obj: DynamicObject = serde_json::from_value(want.clone())
                    .expect("an object built from its own fields");
                api.create(&PostParams::default(), &obj).await?;
            }
        }
        let clusters: Vec<serde_json::Value> =
            i.clusters.iter().map(|c| json!({"cluster": c})).collect();
        let status = json!({"clusters": clusters});
        // Written only when it differs: a resync of an unchanged registry writes nothing.
        if have.as_ref().and_then(|h| h.data.get("status")) != Some(&status) {
            api.patch_status(
                &i.name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await?;
        }
    }
    for ((ns, name), _) in existing {
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &ar)
            .delete(&name, &DeleteParams::default())
            .await?;
    }
    Ok(())
}

/// Keeps the ServiceImports matching `imports` while `leader` says this replica leads.
pub async fn run(
    client: kube::Client,
    imports: watch::Receiver<Vec<Import>>,
    leader: watch::Receiver<bool>,
) {
    crate::lease::reconcile_while_leading(imports, leader, RESYNC, "ServiceImports", |i| {
        let client = client.clone();
        async move { reconcile(&client, &i).await }
    })
    .await
}
