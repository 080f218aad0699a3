//! `isthmus install kubernetes`: the manifests that put Isthmus on one cluster, rendered to
//! standard output as `linkerd install` renders its own.
//!
//! What is rendered, in apply order:
//! - the namespace;
//! - the mesh CRDs ([`crate::crds`]);
//! - the trust anchor as a ConfigMap, and the join token as a Secret when given;
//! - the controller: its ServiceAccount, least-privilege RBAC, Service and a StatefulSet.
//!   Each replica keeps its cluster CA and state on its own volume. The replicas elect a
//!   leader with a Lease. The admission webhook is the `isthmus-validator`
//!   ValidatingWebhookConfiguration, whose caBundle the controller fills in;
//! - the east-west gateway: a ServiceAccount, a Deployment that proves itself with a
//!   projected token, and a LoadBalancer Service for 15443/udp;
//! - optionally the federation, with a root CA the user provides: replicas that elect a
//!   leader with a Lease, the leader keeping its state in a Secret (its only Secret
//!   access: that one Secret, in its own namespace).
//!
//! The RBAC is exactly what the controller calls ([`controller_rules`]). It lists and
//! watches what it reads. It patches only the status of mesh objects. It creates Events
//! and TokenReviews. It reads and updates only its own webhook configuration and Lease.
//! It keeps the ServiceImports of imported services. It never touches Secrets.

use serde_json::{json, Value};

use crate::identity::CA_AUDIENCE;
use crate::resources::MESH_KINDS;

/// What differs between installs.
#[derive(Debug, Clone)]
pub struct Options {
    pub cluster: String,
    pub namespace: String,
    pub image: String,
    pub trust_domain: String,
    /// The federation's address, host:port.
    pub federation: String,
    /// The federation's root certificate (PEM): what every component trusts.
    pub trust_anchor_pem: String,
    /// A join token from `isthmus token join`; without it, create the `isthmus-join`
    /// Secret before the controller starts.
    pub join_token: Option<String>,
    pub controller_replicas: u32,
    /// The address peer gateways reach this cluster's gateway at (its LoadBalancer's),
    /// when known; else the gateway pod's IP.
    pub gateway_address: Option<String>,
    /// Also run the federation here, with this root CA (certificate, key; PEM).
    pub federation_root: Option<(String, String)>,
    /// Replicas of the federation, when it runs here (one leads; the others stand by).
    pub federation_replicas: u32,
}

/// One RBAC rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<&'static str>,
    pub resource_names: Vec<String>,
}

fn rule(groups: &[&str], resources: &[String], verbs: &[&'static str]) -> Rule {
    Rule {
        api_groups: groups.iter().map(|g| g.to_string()).collect(),
        resources: resources.to_vec(),
        verbs: verbs.to_vec(),
        resource_names: Vec::new(),
    }
}

/// The ClusterRole's rules: every call the controller makes outside its namespace.
pub fn controller_rules() -> Vec<Rule> {
    let mut rules = vec![
        rule(
            &[""],
            &["services".into(), "pods".into(), "nodes".into()],
            &["list", "watch"],
        ),
        rule(
            &["discovery.k8s.io"],
            &["endpointslices".into()],
            &["list", "watch"],
        ),
        // Istio's mesh config (ConfigMap istio-system/istio); only istio-system is watched.
        // The trust bundle's ConfigMap in every namespace (`root_cert`) is read and written.
        rule(
            &[""],
            &["configmaps".into()],
            &["list", "watch", "create", "update"],
        ),
    ];
    let mut groups: Vec<&str> = MESH_KINDS.iter().map(|k| k.group).collect();
    groups.dedup();
    for group in groups {
        let kinds: Vec<_> = MESH_KINDS.iter().filter(|k| k.group == group).collect();
        let plurals: Vec<String> = kinds.iter().map(|k| k.plural.to_owned()).collect();
        let statuses: Vec<String> = kinds
            .iter()
            .map(|k| format!("{}/status", k.plural))
            .collect();
        rules.push(rule(&[group], &plurals, &["list", "watch"]));
        rules.push(rule(&[group], &statuses, &["patch"]));
    }
    rules.push(rule(&[""], &["events".into()], &["create"]));
    rules.push(rule(&[""], &["namespaces".into()], &["list"]));
    rules.push(rule(
        &["multicluster.x-k8s.io"],
        &["serviceimports".into()],
        &["list", "create", "update", "delete"],
    ));
    rules.push(rule(
        &["multicluster.x-k8s.io"],
        &["serviceimports/status".into()],
        &["patch"],
    ));
    rules.push(rule(
        &["authentication.k8s.io"],
        &["tokenreviews".into()],
        &["create"],
    ));
    rules.push(Rule {
        resource_names: vec![crate::WEBHOOK_CONFIGURATION.into()],
        ..rule(
            &["admissionregistration.k8s.io"],
            &["validatingwebhookconfigurations".into()],
            &["get", "update"],
        )
    });
    rules.push(Rule {
        resource_names: vec![crate::inject::CONFIGURATION.into()],
        ..rule(
            &["admissionregistration.k8s.io"],
            &["mutatingwebhookconfigurations".into()],
            &["get", "update"],
        )
    });
    rules
}

/// The Role's rules, in the controller's namespace: its Lease.
pub fn lease_rules() -> Vec<Rule> {
    vec![
        rule(&["coordination.k8s.io"], &["leases".into()], &["create"]),
        Rule {
            resource_names: vec!["isthmus-controller".into()],
            ..rule(
                &["coordination.k8s.io"],
                &["leases".into()],
                &["get", "update"],
            )
        },
    ]
}

fn rules_json(rules: &[Rule]) -> Vec<Value> {
    rules
        .iter()
        .map(|r| {
            let mut v =
                json!({"apiGroups": r.api_groups, "resources": r.resources, "verbs": r.verbs});
            if !r.resource_names.is_empty() {
                v["resourceNames"] = json!(r.resource_names);
            }
            v
        })
        .collect()
}

fn labels(app: &str) -> Value {
    json!({"app": app, "app.kubernetes.io/part-of": "isthmus"})
}

fn meta(name: &str, namespace: &str, app: &str) -> Value {
    json!({"name": name, "namespace": namespace, "labels": labels(app)})
}

/// The downward-API variables every Isthmus pod reads.
fn pod_env() -> Vec<Value> {
    [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_IP", "status.podIP"),
    ]
    .iter()
    .map(|(n, f)| json!({"name": n, "valueFrom": {"fieldRef": {"fieldPath": f}}}))
    .collect()
}

const TRUST_MOUNT: &str = "/etc/isthmus/trust";
const STATE_MOUNT: &str = "/var/lib/isthmus";
const TOKEN_MOUNT: &str = "/var/run/secrets/isthmus";

fn trust_volume() -> Value {
    json!({"name": "trust", "configMap": {"name": "isthmus-trust-anchor"}})
}

fn security_context() -> Value {
    json!({"runAsNonRoot": true, "runAsUser": 1337, "allowPrivilegeEscalation": false,
           "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}})
}

/// Every manifest, in apply order.
pub fn manifests(o: &Options) -> Vec<Value> {
    let ns = o.namespace.as_str();
    let mut out = vec![json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"app.kubernetes.io/part-of": "isthmus"}},
    })];
    out.extend(
        crate::crds::all()
            .iter()
            .chain(std::iter::once(&crate::crds::service_import()))
            .map(|c| serde_json::to_value(c).unwrap_or_default()),
    );
    out.push(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": meta("isthmus-trust-anchor", ns, "isthmus"),
        "data": {"root-cert.pem": o.trust_anchor_pem},
    }));
    if let Some(token) = &o.join_token {
        out.push(json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": meta("isthmus-join", ns, "isthmus-controller"),
            "stringData": {"token": token},
        }));
    }
    out.extend(controller(o));
    out.extend(gateway(o));
    if let Some((cert, key)) = &o.federation_root {
        out.extend(federation(o, cert, key));
    }
    out
}

fn controller(o: &Options) -> Vec<Value> {
    let ns = o.namespace.as_str();
    let app = "isthmus-controller";
    let subject = json!([{"kind": "ServiceAccount", "name": app, "namespace": ns}]);
    let args = vec![
        "controller".to_owned(),
        format!("--cluster={}", o.cluster),
        format!("--trust-domain={}", o.trust_domain),
        "--kubernetes".into(),
        format!("--state-dir={STATE_MOUNT}"),
        "--listen=0.0.0.0:15012".into(),
        "--metrics=0.0.0.0:15014".into(),
        "--admin=127.0.0.1:15000".into(),
        "--webhook-listen=0.0.0.0:15017".into(),
        format!("--federation={}", o.federation),
        format!("--federation-root={TRUST_MOUNT}/root-cert.pem"),
        format!("--proxy-image={}", o.image),
    ];
    let mut env = pod_env();
    env.push(
        json!({"name": "ISTHMUS_JOIN_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "isthmus-join", "key": "token", "optional": true}}}),
    );
    let groups: Vec<&str> = {
        let mut g: Vec<&str> = MESH_KINDS.iter().map(|k| k.group).collect();
        g.dedup();
        g
    };
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(app, ns, app)}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": app, "labels": labels(app)},
            "rules": rules_json(&controller_rules()),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": app, "labels": labels(app)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": app},
            "subjects": subject,
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": meta(app, ns, app),
            "rules": rules_json(&lease_rules()),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": meta(app, ns, app),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": app},
            "subjects": subject,
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": meta(app, ns, app),
            "spec": {"selector": {"app": app}, "ports": [
                {"name": "grpc-xds", "port": 15012, "targetPort": 15012, "protocol": "TCP"},
                {"name": "https-webhook", "port": 443, "targetPort": 15017, "protocol": "TCP"},
                {"name": "http-monitoring", "port": 15014, "targetPort": 15014, "protocol": "TCP"},
            ]},
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": meta(app, ns, app),
            "spec": {
                "replicas": o.controller_replicas,
                "serviceName": app,
                "selector": {"matchLabels": {"app": app}},
                "template": {
                    "metadata": {"labels": labels(app)},
                    "spec": {
                        "serviceAccountName": app,
                        "containers": [{
                            "name": "controller", "image": o.image, "args": args, "env": env,
                            "ports": [{"name": "grpc-xds", "containerPort": 15012},
                                      {"name": "https-webhook", "containerPort": 15017},
                                      {"name": "http-monitoring", "containerPort": 15014}],
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": 15014}},
                            "securityContext": security_context(),
                            "volumeMounts": [{"name": "state", "mountPath": STATE_MOUNT},
                                             {"name": "trust", "mountPath": TRUST_MOUNT, "readOnly": true}],
                        }],
                        "volumes": [trust_volume()],
                    },
                },
                "volumeClaimTemplates": [{
                    "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "state"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
                }],
            },
        }),
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": crate::WEBHOOK_CONFIGURATION, "labels": labels(app)},
            "webhooks": [{
                "name": "validation.isthmus.io",
                "clientConfig": {"service": {"name": app, "namespace": ns, "path": crate::webhook::PATH, "port": 443}},
                "rules": [{"apiGroups": groups, "apiVersions": ["*"], "resources": ["*"],
                           "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}],
                "failurePolicy": "Fail", "sideEffects": "None",
                "admissionReviewVersions": ["v1"], "timeoutSeconds": 10,
            }],
        }),
        injector(ns, app),
    ]
}

/// The MutatingWebhookConfiguration that injects sidecars into new pods of namespaces
/// labelled for it, except pods labelled `sidecar.istio.io/inject: "false"`.
fn injector(ns: &str, app: &str) -> Value {
    let webhooks: Vec<Value> = crate::inject::NAMESPACE_LABELS
        .iter()
        .map(|(key, value)| {
            json!({
                "name": format!("{}.injection.isthmus.io", key.replace(['/', '.'], "-")),
                "clientConfig": {"service": {"name": app, "namespace": ns, "path": crate::inject::PATH, "port": 443}},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                           "operations": ["CREATE"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchLabels": {*key: value}},
                "objectSelector": {"matchExpressions": [
                    {"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]},
                "failurePolicy": "Fail", "sideEffects": "None", "reinvocationPolicy": "Never",
                "admissionReviewVersions": ["v1"], "timeoutSeconds": 10,
            })
        })
        .collect();
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": crate::inject::CONFIGURATION, "labels": labels(app)},
        "webhooks": webhooks,
    })
}

fn gateway(o: &Options) -> Vec<Value> {
    let ns = o.namespace.as_str();
    let sa = isthmus_core::identity::GATEWAY_SERVICE_ACCOUNT;
    let app = "isthmus-eastwestgateway";
    let quic = match &o.gateway_address {
        Some(a) => format!("--advertise-quic={a}"),
        None => "--advertise-quic=$(POD_IP):15443".into(),
    };
    let args = vec![
        "gateway".to_owned(),
        format!("--cluster={}", o.cluster),
        format!("--trust-domain={}", o.trust_domain),
        format!("--controller=isthmus-controller.{ns}.svc:15012"),
        format!("--root={TRUST_MOUNT}/root-cert.pem"),
        format!("--token-file={TOKEN_MOUNT}/token"),
        "--tunnel=0.0.0.0:15008".into(),
        "--quic=0.0.0.0:15443".into(),
        "--advertise-tunnel=$(POD_IP):15008".into(),
        quic,
        "--metrics=0.0.0.0:15090".into(),
    ];
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(sa, ns, app)}),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": meta(app, ns, app),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": app}},
                "template": {
                    "metadata": {"labels": labels(app)},
                    "spec": {
                        "serviceAccountName": sa,
                        "containers": [{
                            "name": "gateway", "image": o.image, "args": args, "env": pod_env(),
                            "ports": [{"name": "tls-tunnel", "containerPort": 15008},
                                      {"name": "quic", "containerPort": 15443, "protocol": "UDP"},
                                      {"name": "http-monitoring", "containerPort": 15090}],
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": 15090}},
                            "securityContext": security_context(),
                            "volumeMounts": [{"name": "trust", "mountPath": TRUST_MOUNT, "readOnly": true},
                                             {"name": "token", "mountPath": TOKEN_MOUNT, "readOnly": true}],
                        }],
                        "volumes": [trust_volume(), {"name": "token", "projected": {"sources": [
                            {"serviceAccountToken": {"audience": CA_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}}],
                    },
                },
            },
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": meta(app, ns, app),
            "spec": {"type": "LoadBalancer", "selector": {"app": app},
                     "ports": [{"name": "quic", "port": 15443, "targetPort": 15443, "protocol": "UDP"}]},
        }),
    ]
}

/// The Lease and Secret the federation's replicas share, and what they may do with them.
pub const FEDERATION_LEASE: &str = "isthmus-federation";
pub const FEDERATION_STATE_SECRET: &str = "isthmus-federation-state";

/// The federation's Role, in its namespace: its Lease and the Secret holding its state.
/// (RBAC cannot restrict `create` by name; a replica creates each only when absent.)
pub fn federation_rules() -> Vec<Rule> {
    vec![
        rule(&["coordination.k8s.io"], &["leases".into()], &["create"]),
        Rule {
            resource_names: vec![FEDERATION_LEASE.into()],
            ..rule(
                &["coordination.k8s.io"],
                &["leases".into()],
                &["get", "update"],
            )
        },
        rule(&[""], &["secrets".into()], &["create"]),
        Rule {
            resource_names: vec![FEDERATION_STATE_SECRET.into()],
            ..rule(&[""], &["secrets".into()], &["get", "update"])
        },
    ]
}

/// The federation: two replicas electing a leader, the leader keeping its state in the
/// Secret [`FEDERATION_STATE_SECRET`] (so a pod's own folder is only a cache, and any node
/// can run a replica). A standby is not ready, so the Service sends controllers to the
/// leader.
fn federation(o: &Options, cert: &str, key: &str) -> Vec<Value> {
    let ns = o.namespace.as_str();
    let app = "isthmus-federation";
    let subject = json!([{"kind": "ServiceAccount", "name": app, "namespace": ns}]);
    vec![
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": meta("isthmus-root-ca", ns, app),
            "stringData": {"root-cert.pem": cert, "root-key.pem": key},
        }),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(app, ns, app)}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": meta(app, ns, app), "rules": rules_json(&federation_rules()),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": meta(app, ns, app),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": app},
            "subjects": subject,
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": meta(app, ns, app),
            "spec": {"selector": {"app": app}, "ports": [
                {"name": "grpc-federation", "port": 15200, "targetPort": 15200, "protocol": "TCP"}]},
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": meta(app, ns, app),
            "spec": {
                "replicas": o.federation_replicas,
                "serviceName": app,
                "selector": {"matchLabels": {"app": app}},
                "template": {
                    "metadata": {"labels": labels(app)},
                    "spec": {
                        "serviceAccountName": app,
                        "containers": [{
                            "name": "federation", "image": o.image,
                            "args": ["federation", format!("--trust-domain={}", o.trust_domain),
                                     format!("--state-dir={STATE_MOUNT}"), "--listen=0.0.0.0:15200",
                                     "--metrics=0.0.0.0:15014", "--admin=127.0.0.1:15000",
                                     "--kubernetes",
                                     "--root-cert=/etc/isthmus/root/root-cert.pem",
                                     "--root-key=/etc/isthmus/root/root-key.pem"],
                            "env": pod_env(),
                            "ports": [{"name": "grpc-federation", "containerPort": 15200}],
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": 15014},
                                               "periodSeconds": 2},
                            "securityContext": security_context(),
                            "volumeMounts": [{"name": "state", "mountPath": STATE_MOUNT},
                                             {"name": "root", "mountPath": "/etc/isthmus/root", "readOnly": true}],
                        }],
                        "volumes": [{"name": "root", "secret": {"secretName": "isthmus-root-ca"}},
                                    {"name": "state", "emptyDir": {}}],
                    },
                },
            },
        }),
    ]
}

/// The manifests as one YAML stream.
pub fn to_yaml(objects: &[Value]) -> String {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(o).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
    use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

    fn options() -> Options {
        Options {
            cluster: "west".into(),
            namespace: "isthmus-system".into(),
            image: "isthmus:test".into(),
            trust_domain: "cluster.local".into(),
            federation: "federation.example.com:15200".into(),
            trust_anchor_pem: "-----BEGIN CERTIFICATE-----\n...\n".into(),
            join_token: Some("ist1.x.y".into()),
            controller_replicas: 2,
            gateway_address: Some("203.0.113.7:15443".into()),
            federation_root: Some(("cert".into(), "key".into())),
            federation_replicas: 2,
        }
    }

    /// `value` read as the typed object and written back: a misspelled or misplaced
    /// field would not survive the round trip.
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(value: &Value) -> Value {
        let typed: T = serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("{}: {e}", value["kind"]));
        serde_json::to_value(typed).expect("json")
    }

    #[test]
    fn every_manifest_is_the_typed_object_it_claims_to_be() {
        let objects = manifests(&options());
        let mut kinds = std::collections::BTreeSet::new();
        for o in &objects {
            let kind = o["kind"].as_str().expect("a kind");
            kinds.insert(kind.to_owned());
            let back = match kind {
                "Namespace" => round_trip::<Namespace>(o),
                "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(o),
                "ConfigMap" => round_trip::<ConfigMap>(o),
                "Secret" => round_trip::<Secret>(o),
                "ServiceAccount" => round_trip::<ServiceAccount>(o),
                "ClusterRole" => round_trip::<ClusterRole>(o),
                "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(o),
                "Role" => round_trip::<Role>(o),
                "RoleBinding" => round_trip::<RoleBinding>(o),
                "Service" => round_trip::<Service>(o),
                "StatefulSet" => round_trip::<StatefulSet>(o),
                "Deployment" => round_trip::<Deployment>(o),
                "ValidatingWebhookConfiguration" => round_trip::<ValidatingWebhookConfiguration>(o),
                "MutatingWebhookConfiguration" => round_trip::<
                    k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
                >(o),
                other => panic!("unexpected kind {other}"),
            };
            assert_eq!(&back, o, "{kind} {}", o["metadata"]["name"]);
        }
        assert!(kinds.contains("StatefulSet") && kinds.contains("ValidatingWebhookConfiguration"));
        // The YAML stream reads back as the same objects.
        let yaml = to_yaml(&objects);
        let read: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&yaml)
            .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("yaml"))
            .collect();
        assert_eq!(read, objects);
    }

    #[test]
    fn the_federation_may_touch_only_its_lease_and_state_secret() {
        for r in federation_rules() {
            let named = r.resource_names == [FEDERATION_LEASE]
                || r.resource_names == [FEDERATION_STATE_SECRET];
            assert!(named || r.verbs == ["create"], "{r:?}");
            assert!(
                !r.verbs.contains(&"*") && !r.verbs.contains(&"list"),
                "{r:?}"
            );
        }
    }

    #[test]
    fn the_controller_is_never_granted_secrets_or_wildcards() {
        for r in controller_rules().iter().chain(lease_rules().iter()) {
            assert!(
                !r.resources.iter().any(|x| x == "secrets" || x == "*"),
                "{r:?}"
            );
            assert!(
                !r.verbs.contains(&"*") && !r.api_groups.iter().any(|g| g == "*"),
                "{r:?}"
            );
        }
    }
}
