//! The mesh's trust bundle in every namespace, as Istio's `istio-ca-root-cert`: a ConfigMap
//! [`CONFIGMAP`] with the PEM roots under [`KEY`]. Injected sidecars mount it and read it
//! at each first certificate request, so a pod started, or a sidecar restarted, after a
//! root rotation trusts the controller's new certificate (the roots baked into the pod at
//! injection would be the old ones).
//!
//! Only the leader writes: when the bundle changes, and every [`RESYNC`] for namespaces
//! that appeared or ConfigMaps someone edited or deleted. Each ConfigMap is labelled as
//! managed by Isthmus.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use tokio::sync::watch;

/// The ConfigMap's name in every namespace.
pub const CONFIGMAP: &str = "isthmus-ca-root-cert";
/// The key of the PEM roots in it (the file name where sidecars mount it).
pub const KEY: &str = "root-cert.pem";
/// How often every namespace is checked even when the bundle did not change.
pub const RESYNC: Duration = Duration::from_secs(30);

fn wanted(namespace: &str, bundle: &str) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(CONFIGMAP.into());
    cm.metadata.namespace = Some(namespace.into());
    cm.metadata.labels = Some(
        [(
            crate::imports::MANAGED_BY.0.to_owned(),
            crate::imports::MANAGED_BY.1.to_owned(),
        )]
        .into(),
    );
    cm.data = Some([(KEY.to_owned(), bundle.to_owned())].into());
    cm
}

/// Writes `bundle` into every namespace's ConfigMap where it differs.
async fn reconcile(client: &kube::Client, bundle: &str) -> Result<usize, kube::Error> {
    let namespaces = crate::imports::namespaces(client).await?;
    let selector = format!(
        "{}={}",
        crate::imports::MANAGED_BY.0,
        crate::imports::MANAGED_BY.1
    );
    let mut have: BTreeMap<String, ConfigMap> = Api::<ConfigMap>::all(client.clone())
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|c| c.metadata.name.as_deref() == Some(CONFIGMAP))
        .filter_map(|c| Some((c.metadata.namespace.clone()?, c)))
        .collect();
    let mut written = 0;
    for ns in namespaces {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let want = wanted(&ns, bundle);
        match have.remove(&ns) {
            Some(cm)
                if cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(KEY))
                    .map(String::as_str)
                    == Some(bundle) => {}
            Some(cm) => {
                let mut next = want;
                next.metadata.resource_version = cm.metadata.resource_version;
                api.replace(CONFIGMAP, &PostParams::default(), &next)
                    .await?;
                written += 1;
            }
            None => match api.create(&PostParams::default(), &want).await {
                Ok(_) => written += 1,
                // One of that name that Isthmus does not manage: left alone, and said.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    tracing::warn!(namespace = %ns, "a ConfigMap {CONFIGMAP} not managed by Isthmus is in the way; its pods keep the roots they were injected with")
                }
                Err(e) => return Err(e),
            },
        }
    }
    Ok(written)
}

/// Keeps every namespace's ConfigMap holding the current bundle while `leader` says this
/// replica leads. `bundle` reads the bundle out of what `changes` carries.
pub async fn run<T: Clone>(
    client: kube::Client,
    changes: watch::Receiver<T>,
    bundle: impl Fn(&T) -> String,
    leader: watch::Receiver<bool>,
) {
    crate::lease::reconcile_while_leading(changes, leader, RESYNC, CONFIGMAP, |t| {
        let (client, pem) = (client.clone(), bundle(&t));
        async move {
            let n = reconcile(&client, &pem).await?;
            if n > 0 {
                tracing::info!(namespaces = n, "trust bundle published in {CONFIGMAP}");
            }
            Ok(())
        }
    })
    .await
}
