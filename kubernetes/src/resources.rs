//! The mesh config kinds as custom resources: which ones are watched, and how each object
//! becomes a document for admission.
//!
//! Every kind is watched at the version Istio stores and serves first (`v1` for
//! `networking.istio.io`); objects created at another served version (`v1beta1`,
//! `v1alpha3`) come back from the API server at the watched one, as for any CRD with
//! several versions. An object becomes one document named by where it lives
//! (`virtualservices.networking.istio.io/shop/reviews`), so its faults read like a file's.

use isthmus_core::config::{parse_object, ParsedFiles};
use kube::api::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};

/// One kind of mesh config read from the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshKind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
}

impl MeshKind {
    pub fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }

    /// The resource name as kubectl spells it: `virtualservices.networking.istio.io`.
    pub fn resource(&self) -> String {
        format!("{}.{}", self.plural, self.group)
    }
}

/// Every kind of mesh config the controller reads from the cluster.
pub const MESH_KINDS: &[MeshKind] = &[
    istio("VirtualService", "virtualservices"),
    istio("DestinationRule", "destinationrules"),
    istio("ServiceEntry", "serviceentries"),
    istio("Sidecar", "sidecars"),
    istio("WorkloadEntry", "workloadentries"),
    MeshKind {
        group: "security.istio.io",
        version: "v1",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
    },
    MeshKind {
        group: "security.istio.io",
        version: "v1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
    },
    MeshKind {
        group: "security.istio.io",
        version: "v1",
        kind: "RequestAuthentication",
        plural: "requestauthentications",
    },
    MeshKind {
        group: "telemetry.istio.io",
        version: "v1",
        kind: "Telemetry",
        plural: "telemetries",
    },
    MeshKind {
        group: "multicluster.x-k8s.io",
        version: "v1alpha1",
        kind: "ServiceExport",
        plural: "serviceexports",
    },
    MeshKind {
        group: "isthmus.io",
        version: "v1alpha1",
        kind: "LocalRateLimit",
        plural: "localratelimits",
    },
    MeshKind {
        group: "isthmus.io",
        version: "v1alpha1",
        kind: "GlobalRateLimit",
        plural: "globalratelimits",
    },
    MeshKind {
        group: "isthmus.io",
        version: "v1alpha1",
        kind: "HealthCheck",
        plural: "healthchecks",
    },
    MeshKind {
        group: "extensions.istio.io",
        version: "v1alpha1",
        kind: "WasmPlugin",
        plural: "wasmplugins",
    },
];

const fn istio(kind: &'static str, plural: &'static str) -> MeshKind {
    MeshKind {
        group: "networking.istio.io",
        version: "v1",
        kind,
        plural,
    }
}

/// Where faults of `obj` say it is: `virtualservices.networking.istio.io/shop/reviews`.
pub fn source_of(kind: &MeshKind, obj: &DynamicObject) -> String {
    format!(
        "{}/{}/{}",
        kind.resource(),
        obj.metadata.namespace.as_deref().unwrap_or_default(),
        obj.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Parses one object of `kind` as a document. The server's bookkeeping (managed fields)
/// is dropped; `apiVersion` and `kind` are set from the watched kind, since list items
/// may omit them.
pub fn parse(kind: &MeshKind, obj: &DynamicObject) -> ParsedFiles {
    let mut value = serde_json::json!({
        "apiVersion": format!("{}/{}", kind.group, kind.version),
        "kind": kind.kind,
        "metadata": {
            "name": obj.metadata.name,
            "namespace": obj.metadata.namespace,
            "labels": obj.metadata.labels.clone().unwrap_or_default(),
            "annotations": obj.metadata.annotations.clone().unwrap_or_default(),
        },
    });
    if let (Some(data), Some(out)) = (obj.data.as_object(), value.as_object_mut()) {
        for (k, v) in data {
            out.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let source = source_of(kind, obj);
    match serde_yaml_ng::to_value(&value) {
        Ok(v) => parse_object(&source, v),
        Err(e) => {
            // A JSON value always converts; kept as a fault rather than a panic.
            let mut out = ParsedFiles::default();
            out.notes.push(format!("{source}: unreadable: {e}"));
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(json: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json).expect("an object")
    }

    #[test]
    fn a_custom_resource_is_admitted_as_its_document() {
        let vs = object(serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "shop", "resourceVersion": "42",
                         "uid": "0c5c", "managedFields": [{"manager": "kubectl"}]},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
            "status": {},
        }));
        let parsed = parse(&MESH_KINDS[0], &vs);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(parsed.documents.len(), 1);
        assert_eq!(parsed.documents[0].object(), "VirtualService shop/reviews");
    }

    #[test]
    fn a_bad_field_is_named_with_the_resource_it_came_from() {
        let vs = object(serde_json::json!({
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"hosts": ["reviews"], "http": [{"retries": {"attempts": "three"}}]},
        }));
        let parsed = parse(&MESH_KINDS[0], &vs);
        let e = parsed.errors.first().expect("a fault");
        let shown = e.to_string();
        assert!(
            shown.starts_with("virtualservices.networking.istio.io/shop/reviews"),
            "{shown}"
        );
        assert!(shown.contains("spec.http[0].retries.attempts"), "{shown}");
    }
}
