//! The Kubernetes platform adapter: what a cluster controller reads when it runs on
//! Kubernetes instead of a folder of YAML.
//!
//! It watches the cluster through the API server with kube-rs watchers and reflector stores
//! (list, then watch from the list's `resourceVersion`; a watch that gets 410 Gone lists
//! again) and turns what it sees into the same model the file adapter feeds the registry:
//!
//! - `platform`: Services, EndpointSlices, Pods and Nodes become the services, workloads
//!   and endpoints of a [`isthmus_core::config::Platform`] (typed `k8s-openapi` objects).
//! - `resources`: the mesh config kinds (Istio's `networking.istio.io` kinds,
//!   `multicluster.x-k8s.io` `ServiceExport`, `isthmus.io` kinds) are watched as custom
//!   resources and admitted object by object by the same validation as `isthmus validate`.
//! - `source`: the loop that rebuilds the config set when anything changes and publishes it.
//! - `status`: each mesh object's admission result written back to it (status condition,
//!   Istio's validation messages) and an Event for each rejection.
//! - `crds`: the CustomResourceDefinitions of the mesh kinds, generated from their types.
//! - `lease`: leader election among controller (and federation) replicas; only the leader
//!   writes.
//! - `state_secret`: the federation's state kept in a Secret, for the replica that takes over.
//! - `identity`: projected service-account tokens checked with TokenReview, for the CA.
//! - `imports`: ServiceImports (MCS API) for the services other clusters export.
//! - `inject`: the sidecar injection patch (mutating webhook).
//! - `install`: the manifests `isthmus install kubernetes` renders.
//! - `webhook`: the validating admission webhook, so `kubectl apply` of a bad object fails.

pub mod crds;
pub mod identity;
pub mod imports;
pub mod inject;
pub mod install;
pub mod lease;
mod platform;
mod resources;
pub mod root_cert;
mod source;
pub mod state_secret;
pub mod status;
pub mod webhook;

pub use kube::Client;
pub use resources::{source_of, MeshKind, MESH_KINDS};
pub use source::{run, Source};

use std::path::Path;

/// The ValidatingWebhookConfiguration whose `caBundle` the controller keeps current.
pub const WEBHOOK_CONFIGURATION: &str = "isthmus-validator";

use anyhow::Context;

/// A client for the cluster: from `kubeconfig` when given (its current context), else as
/// kubectl finds one (`KUBECONFIG`, `~/.kube/config`) or, inside a pod, from the service
/// account the pod runs as.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given, none found, and not running in a pod")?,
    };
    kube::Client::try_from(config).context("making the Kubernetes client")
}
