//! The CustomResourceDefinitions of the mesh config kinds, generated from the Rust types the
//! controller parses them into (schemars, made structural as kube-rs makes its own).
//!
//! Each kind is served at the versions Istio serves it (`v1`, `v1beta1` and `v1alpha3`
//! for `networking.istio.io`, `v1` and `v1alpha1` for `telemetry.istio.io`, `v1` stored), with a `status` subresource and Istio's short
//! names. The schemas check the types of the fields Isthmus reads. Every object node also
//! keeps unknown fields (`x-kubernetes-preserve-unknown-fields`), because the API server
//! would otherwise prune them silently: a field Isthmus does not support must reach the
//! webhook and admission, which refuse it by name.

use isthmus_core::config::spec_schema;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{json, Value};

use crate::resources::{MeshKind, MESH_KINDS};

/// Versions served per group, the stored one first.
fn versions(kind: &MeshKind) -> &'static [&'static str] {
    match kind.group {
        "networking.istio.io" => &["v1", "v1beta1", "v1alpha3"],
        "security.istio.io" => &["v1", "v1beta1"],
        "telemetry.istio.io" => &["v1", "v1alpha1"],
        _ => &["v1alpha1"],
    }
}

/// Istio's short names, where it has them.
fn short_names(kind: &MeshKind) -> Vec<&'static str> {
    match kind.kind {
        "VirtualService" => vec!["vs"],
        "DestinationRule" => vec!["dr"],
        "ServiceEntry" => vec!["se"],
        "WorkloadEntry" => vec!["we"],
        "PeerAuthentication" => vec!["pa"],
        "AuthorizationPolicy" => vec!["ap"],
        _ => Vec::new(),
    }
}

/// Marks every object node as keeping fields it does not list (see the module doc), and
/// drops serde's defaults: the API server would write them into stored objects, which
/// should stay as their authors wrote them.
fn keep_unknown_fields(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            map.remove("default");
            if map.get("type") == Some(&json!("object")) || map.contains_key("properties") {
                map.insert("x-kubernetes-preserve-unknown-fields".into(), json!(true));
            }
            for v in map.values_mut() {
                keep_unknown_fields(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(keep_unknown_fields),
        _ => {}
    }
}

/// The `spec` schema of `kind`, structural.
fn spec(kind: &MeshKind) -> Value {
    let mut generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(kube_core::schema::StructuralSchemaRewriter)
        .into_generator();
    let mut schema = spec_schema(kind.kind, &mut generator)
        .map(|s| s.to_value())
        .unwrap_or_else(|| json!({"type": "object"}));
    if let Some(map) = schema.as_object_mut() {
        for k in ["$schema", "title", "definitions", "$defs", "description"] {
            map.remove(k);
        }
        map.insert("type".into(), json!("object"));
    }
    keep_unknown_fields(&mut schema);
    schema
}

/// The CRD of one mesh kind.
pub fn crd(kind: &MeshKind) -> CustomResourceDefinition {
    let schema = json!({
        "type": "object",
        "properties": {
            "spec": spec(kind),
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        },
    });
    let versions: Vec<Value> = versions(kind)
        .iter()
        .enumerate()
        .map(|(i, v)| {
            json!({
                "name": v, "served": true, "storage": i == 0,
                "schema": {"openAPIV3Schema": schema},
                "subresources": {"status": {}},
            })
        })
        .collect();
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.resource(),
            "labels": {"app.kubernetes.io/part-of": "isthmus"},
        },
        "spec": {
            "group": kind.group,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": format!("{}List", kind.kind),
                "plural": kind.plural,
                "singular": kind.kind.to_lowercase(),
                "shortNames": short_names(kind),
                "categories": ["isthmus-io"],
            },
            "versions": versions,
        },
    });
    serde_json::from_value(crd).expect("a CRD built from its own fields")
}

/// Every mesh kind's CRD.
pub fn all() -> Vec<CustomResourceDefinition> {
    MESH_KINDS.iter().map(crd).collect()
}

/// The MCS API's ServiceImport, which the controller writes (see `imports`), as the MCS
/// project defines it at v1alpha1; its fields are the controller's own output.
pub fn service_import() -> CustomResourceDefinition {
    let open = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "serviceimports.multicluster.x-k8s.io",
                     "labels": {"app.kubernetes.io/part-of": "isthmus"}},
        "spec": {
            "group": "multicluster.x-k8s.io",
            "scope": "Namespaced",
            "names": {"kind": "ServiceImport", "listKind": "ServiceImportList",
                      "plural": "serviceimports", "singular": "serviceimport",
                      "shortNames": ["svcim"]},
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object",
                    "properties": {"spec": open, "status": open}}},
                "subresources": {"status": {}},
            }],
        },
    }))
    .expect("a CRD built from its own fields")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(schema: &'a Value, path: &[&str]) -> &'a Value {
        path.iter().fold(schema, |s, p| &s["properties"][p])
    }

    #[test]
    fn the_virtual_service_schema_is_structural_and_keeps_unknown_fields() {
        let crd = serde_json::to_value(crd(&MESH_KINDS[0])).expect("json");
        let versions = crd["spec"]["versions"].as_array().expect("versions");
        let served: Vec<&str> = versions.iter().filter_map(|v| v["name"].as_str()).collect();
        assert_eq!(served, ["v1", "v1beta1", "v1alpha3"]);
        assert_eq!(versions[0]["storage"], true);
        assert_eq!(versions[1]["storage"], false);
        let schema = &versions[0]["schema"]["openAPIV3Schema"];
        let text = schema.to_string();
        for forbidden in [
            "$ref",
            "anyOf\":[{\"type",
            "additionalProperties\":false",
            "definitions",
        ] {
            assert!(!text.contains(forbidden), "{forbidden} in {text}");
        }
        let http = find(schema, &["spec", "http"]);
        assert_eq!(http["type"], "array");
        let timeout = &http["items"]["properties"]["timeout"];
        assert_eq!(timeout["type"], "string", "{timeout}");
        assert_eq!(http["items"]["x-kubernetes-preserve-unknown-fields"], true);
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "vs");
    }

    #[test]
    fn every_mesh_kind_has_a_crd_with_a_status_subresource() {
        let crds = all();
        assert_eq!(crds.len(), MESH_KINDS.len());
        for c in &crds {
            for v in &c.spec.versions {
                assert!(
                    v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
                    "{}",
                    c.spec.names.kind
                );
                assert!(v.schema.is_some());
            }
        }
    }
}
