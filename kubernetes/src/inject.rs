//! Sidecar injection: the mutating admission webhook (`/inject`) that adds Isthmus to a pod
//! as it is created, as Istio's injector does.
//!
//! Which pods: the MutatingWebhookConfiguration's namespace selectors pick namespaces
//! labelled `istio-injection=enabled` or `isthmus.io/inject=enabled`. Here, a pod
//! annotated (or labelled) `sidecar.istio.io/inject: "false"` is left alone, as is one
//! that already has the sidecar.
//!
//! What the patch adds:
//! - The capture step, init container `isthmus-init`, running `isthmus iptables` with
//!   NET_ADMIN. It carries the pod's Istio traffic annotations
//!   (`traffic.sidecar.istio.io/includeOutboundIPRanges`, ...) as flags, and captures the
//!   pod's DNS queries to its resolvers for the sidecar's DNS proxy (on by default, as
//!   mesh names of other clusters resolve only there; `isthmus.io/dns-capture: "false"`
//!   turns it off for a pod).
//! - The sidecar as a native sidecar, init container `isthmus-proxy` with
//!   `restartPolicy: Always`. It starts before the app and stops after it, and its
//!   readiness (`/ready` on 15020) is part of the pod's. It runs as UID 1337, which capture
//!   leaves alone. It names its workload `$(POD_NAMESPACE)/$(POD_NAME)`, proves itself
//!   with a projected service-account token (audience `isthmus-ca`), and trusts the mesh
//!   root given inline.
//! - The token volume.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

use crate::identity::CA_AUDIENCE;

/// The sidecar container's name: a pod that has it is not injected again.
pub const PROXY: &str = "isthmus-proxy";
/// The capture step's container name.
pub const INIT: &str = "isthmus-init";
/// Where the webhook is called.
pub const PATH: &str = "/inject";
/// The MutatingWebhookConfiguration the controller keeps the caBundle of.
pub const CONFIGURATION: &str = "isthmus-injector";
/// The namespace labels that turn injection on.
pub const NAMESPACE_LABELS: &[(&str, &str)] = &[
    ("istio-injection", "enabled"),
    ("isthmus.io/inject", "enabled"),
];
const TOKEN_MOUNT: &str = "/var/run/secrets/isthmus";
/// Where the namespace's `isthmus-ca-root-cert` ConfigMap is mounted (see `root_cert`).
const ROOT_MOUNT: &str = "/var/run/isthmus/root";

/// What every injected sidecar is told.
#[derive(Debug, Clone)]
pub struct Template {
    pub cluster: String,
    pub trust_domain: String,
    pub image: String,
    /// The controller, host:port, as pods reach it.
    pub controller: String,
    /// The mesh root, PEM.
    pub root_pem: String,
}

/// A pod annotated `"false"` keeps its DNS queries to itself (no DNS capture).
pub const DNS_CAPTURE_ANNOTATION: &str = "isthmus.io/dns-capture";

/// Istio's traffic annotations and the `isthmus iptables` flags they become.
const TRAFFIC_ANNOTATIONS: &[(&str, &str)] = &[
    (
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        "--include-outbound-cidrs",
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "--exclude-outbound-cidrs",
    ),
    (
        "traffic.sidecar.istio.io/includeOutboundPorts",
        "--include-outbound-ports",
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "--exclude-outbound-ports",
    ),
    (
        "traffic.sidecar.istio.io/includeInboundPorts",
        "--include-inbound-ports",
    ),
    (
        "traffic.sidecar.istio.io/excludeInboundPorts",
        "--exclude-inbound-ports",
    ),
];

/// Whether the pod opted out, or has the sidecar already.
fn skipped(pod: &Pod) -> bool {
    let says_false = |m: &Option<BTreeMap<String, String>>| {
        m.as_ref()
            .and_then(|m| m.get("sidecar.istio.io/inject"))
            .is_some_and(|v| v.eq_ignore_ascii_case("false"))
    };
    let spec = pod.spec.as_ref();
    let has_proxy = spec.is_some_and(|s| {
        s.containers.iter().any(|c| c.name == PROXY)
            || s.init_containers.iter().flatten().any(|c| c.name == PROXY)
    });
    says_false(&pod.metadata.annotations) || says_false(&pod.metadata.labels) || has_proxy
}

/// The port the sidecar hands mesh traffic to: the app's first declared container port.
fn app_port(pod: &Pod) -> Option<i32> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| p.container_port)
        .next()
}

/// The JSON patch (RFC 6902) that injects `pod`, or `None` when it is left alone.
pub fn patch(pod: &Pod, t: &Template) -> Option<Value> {
    if skipped(pod) {
        return None;
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let mut init_args = vec!["iptables".to_owned()];
    for (annotation, flag) in TRAFFIC_ANNOTATIONS {
        if let Some(v) = annotations.get(*annotation) {
            init_args.push(format!("{flag}={v}"));
        }
    }
    let dns = annotations.get(DNS_CAPTURE_ANNOTATION).map(String::as_str) != Some("false");
    if dns {
        init_args.push("--redirect-dns".into());
    }
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let mut proxy_args = vec![
        "sidecar".to_owned(),
        format!("--cluster={}", t.cluster),
        format!("--trust-domain={}", t.trust_domain),
        "--workload=$(POD_NAMESPACE)/$(POD_NAME)".into(),
        format!("--service-account={service_account}"),
        format!("--controller={}", t.controller),
        format!("--token-file={TOKEN_MOUNT}/token"),
        // The current roots, kept by the controller; ISTHMUS_ROOT_PEM (the roots at
        // injection) serves until the ConfigMap appears.
        format!("--root={ROOT_MOUNT}/{}", crate::root_cert::KEY),
        "--outbound=0.0.0.0:15001".into(),
        "--capture-inbound=0.0.0.0:15006".into(),
        "--inbound=0.0.0.0:15008".into(),
        "--admin=127.0.0.1:15000".into(),
        "--metrics=0.0.0.0:15020".into(),
    ];
    if dns {
        proxy_args.push("--dns=127.0.0.1:15053".into());
    }
    if let Some(port) = app_port(pod) {
        proxy_args.push(format!("--app=127.0.0.1:{port}"));
    }
    let env = json!([
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "ISTHMUS_ROOT_PEM", "value": t.root_pem},
    ]);
    let init = json!({
        "name": INIT, "image": t.image, "args": init_args,
        "securityContext": {"runAsUser": 0, "runAsNonRoot": false, "allowPrivilegeEscalation": false,
                            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}},
    });
    let proxy = json!({
        "name": PROXY, "image": t.image, "args": proxy_args, "env": env,
        "restartPolicy": "Always",
        "ports": [{"name": "http-envoy-prom", "containerPort": 15020}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 15020}, "periodSeconds": 2},
        "startupProbe": {"httpGet": {"path": "/ready", "port": 15020}, "periodSeconds": 1, "failureThreshold": 600},
        "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true,
                            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "isthmus-token", "mountPath": TOKEN_MOUNT, "readOnly": true},
                         {"name": "isthmus-ca-root-cert", "mountPath": ROOT_MOUNT, "readOnly": true}],
    });
    let volume = json!({"name": "isthmus-token", "projected": {"sources": [
        {"serviceAccountToken": {"audience": CA_AUDIENCE, "expirationSeconds": 43200, "path": "token"}}]}});
    let root_volume = json!({"name": "isthmus-ca-root-cert",
        "configMap": {"name": crate::root_cert::CONFIGMAP, "optional": true}});
    let spec = pod.spec.as_ref();
    let mut ops = Vec::new();
    // The capture step and the sidecar go first among the init containers, in that order.
    if spec.is_some_and(|s| s.init_containers.as_ref().is_some_and(|c| !c.is_empty())) {
        ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": proxy}));
        ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": init}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [init, proxy]}));
    }
    if spec.is_some_and(|s| s.volumes.as_ref().is_some_and(|v| !v.is_empty())) {
        ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
        ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": root_volume}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": [volume, root_volume]}));
    }
    let status = "sidecar.istio.io/status";
    let injected =
        json!({"initContainers": [INIT, PROXY], "volumes": ["isthmus-token", "isthmus-ca-root-cert"]}).to_string();
    if annotations.is_empty() {
        ops.push(
            json!({"op": "add", "path": "/metadata/annotations", "value": {status: injected}}),
        );
    } else {
        ops.push(json!({"op": "add", "path": "/metadata/annotations/sidecar.istio.io~1status", "value": injected}));
    }
    Some(Value::Array(ops))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Template {
        Template {
            cluster: "west".into(),
            trust_domain: "cluster.local".into(),
            image: "isthmus:test".into(),
            controller: "isthmus-controller.isthmus-system.svc:15012".into(),
            root_pem: "-----BEGIN CERTIFICATE-----".into(),
        }
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml_ng::from_str(yaml).expect("a pod")
    }

    fn apply(pod_yaml: &str) -> Option<Pod> {
        let p = pod(pod_yaml);
        let ops = patch(&p, &template())?;
        let mut doc = serde_json::to_value(&p).expect("json");
        let patch: json_patch::Patch = serde_json::from_value(ops).expect("a JSON patch");
        json_patch::patch(&mut doc, &patch).expect("applies");
        Some(serde_json::from_value(doc).expect("still a pod"))
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: reviews-1\n  namespace: shop\n  annotations: {traffic.sidecar.istio.io/excludeOutboundPorts: \"3306\"}\nspec:\n  serviceAccountName: reviews\n  initContainers: [{name: migrate, image: migrate}]\n  containers: [{name: app, image: reviews, ports: [{containerPort: 9080}]}]\n  volumes: [{name: data, emptyDir: {}}]\n";

    #[test]
    fn a_pod_gets_the_capture_step_and_a_native_sidecar_before_its_own_init_containers() {
        let injected = apply(POD).expect("injected");
        let spec = injected.spec.expect("spec");
        let inits: Vec<&str> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(inits, [INIT, PROXY, "migrate"]);
        let init = &spec.init_containers.as_ref().expect("inits")[0];
        assert!(init
            .args
            .iter()
            .flatten()
            .any(|a| a == "--exclude-outbound-ports=3306"));
        assert!(
            init.args.iter().flatten().any(|a| a == "--redirect-dns"),
            "DNS capture is on by default"
        );
        let proxy = &spec.init_containers.as_ref().expect("inits")[1];
        assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
        let args = proxy.args.clone().unwrap_or_default();
        for want in [
            "--service-account=reviews",
            "--app=127.0.0.1:9080",
            "--workload=$(POD_NAMESPACE)/$(POD_NAME)",
            "--dns=127.0.0.1:15053",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
        }
        let volumes: Vec<&str> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(volumes, ["data", "isthmus-token", "isthmus-ca-root-cert"]);
        let status = injected
            .metadata
            .annotations
            .unwrap_or_default()
            .remove("sidecar.istio.io/status")
            .expect("status annotation");
        assert!(status.contains(PROXY));
    }

    #[test]
    fn opted_out_and_already_injected_pods_are_left_alone() {
        let out = POD.replace(
            "annotations: {",
            "annotations: {sidecar.istio.io/inject: \"false\", ",
        );
        assert!(apply(&out).is_none());
        let injected = serde_yaml_ng::to_string(&apply(POD).expect("injected")).expect("yaml");
        assert!(apply(&injected).is_none(), "injected twice");
        let bare = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {containers: [{name: app, image: x}]}\n";
        let injected = apply(bare).expect("a pod with nothing to append to");
        assert_eq!(
            injected
                .spec
                .expect("spec")
                .init_containers
                .expect("inits")
                .len(),
            2
        );
    }

    #[test]
    fn a_pod_may_keep_its_dns_to_itself() {
        let own_dns = POD.replace(
            "annotations: {",
            "annotations: {isthmus.io/dns-capture: \"false\", ",
        );
        let spec = apply(&own_dns).expect("injected").spec.expect("spec");
        let inits = spec.init_containers.expect("inits");
        let args = |i: usize| inits[i].args.clone().unwrap_or_default();
        assert!(!args(0).iter().any(|a| a == "--redirect-dns"));
        assert!(!args(1).iter().any(|a| a.starts_with("--dns")));
        assert!(
            args(0).iter().any(|a| a == "--exclude-outbound-ports=3306"),
            "the rest of capture stays"
        );
    }
}
