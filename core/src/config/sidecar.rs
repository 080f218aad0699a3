//! Istio's `Sidecar` kind as Isthmus reads it: which services a workload's proxy is pushed
//! (`egress[].hosts`), for the workloads a `workloadSelector` picks, else the whole
//! namespace, else (in the root namespace) the whole mesh. Ports, listeners and capture
//! modes of egress and ingress are parsed so the error can name them ("not supported yet").

use std::collections::BTreeMap;

use serde::Deserialize;

use super::istio::{unsupported, Unsupported};
use super::validate::Checker;
use super::{Code, NamespacedName};

/// Istio's root namespace: a Sidecar there without a selector applies mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SidecarSpec {
    pub workload_selector: Option<WorkloadSelectorSpec>,
    #[serde(default)]
    pub egress: Vec<EgressSpec>,
    pub ingress: Unsupported,
    pub outbound_traffic_policy: Option<OutboundTrafficPolicySpec>,
    pub inbound_connection_pool: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkloadSelectorSpec {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    pub port: Unsupported,
    pub bind: Unsupported,
    pub capture_mode: Unsupported,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboundTrafficPolicySpec {
    pub mode: Option<String>,
    pub egress_proxy: Unsupported,
}

/// One `namespace/host` egress pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// `*`, `~` or a namespace (`.` is resolved to the Sidecar's own).
    pub namespace: String,
    /// `*`, `*.suffix` or a full host name.
    pub host: String,
}

/// A Sidecar's scope: whose proxies it applies to and what they are pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarScope {
    pub key: NamespacedName,
    /// Empty: every workload of its namespace (or, in the root namespace, of the mesh).
    pub selector: BTreeMap<String, String>,
    pub egress: Vec<HostPattern>,
    /// `outboundTrafficPolicy.mode: ALLOW_ANY`: hosts outside the registry pass through.
    pub allow_any: bool,
}

impl SidecarScope {
    /// Whether a proxy under this scope is pushed `service`, known by `hosts` if it is a
    /// ServiceEntry, else by its Kubernetes name.
    pub fn allows(&self, service: &NamespacedName, hosts: &[String]) -> bool {
        if hosts.is_empty() {
            let fqdn = format!("{}.{}.svc.cluster.local", service.name, service.namespace);
            return self.allows_host(&service.namespace, &fqdn);
        }
        hosts
            .iter()
            .any(|h| self.allows_host(&service.namespace, h))
    }

    fn allows_host(&self, namespace: &str, fqdn: &str) -> bool {
        self.egress.iter().any(|p| {
            let ns = match p.namespace.as_str() {
                "*" => true,
                "~" => false,
                ns => ns == namespace,
            };
            let host = match p.host.as_str() {
                "*" => true,
                h => match (h.strip_prefix("*."), fqdn.strip_prefix("*.")) {
                    // A wildcard entry is allowed by a pattern that covers all of it.
                    (Some(suffix), Some(entry)) => {
                        entry == suffix || entry.ends_with(&format!(".{suffix}"))
                    }
                    (Some(suffix), None) => fqdn.ends_with(&format!(".{suffix}")),
                    (None, _) => h == fqdn,
                },
            };
            ns && host
        })
    }
}

/// The scope that applies to a workload of `namespace` with `labels`: a Sidecar of its
/// namespace whose selector picks it, else one of its namespace without selector, else one
/// of the root namespace without selector. `None`: no Sidecar, every service.
pub fn scope_for<'a>(
    sidecars: &'a BTreeMap<NamespacedName, SidecarScope>,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Option<&'a SidecarScope> {
    let in_ns = |ns: &str, pick: &dyn Fn(&SidecarScope) -> bool| {
        sidecars.values().find(|s| s.key.namespace == ns && pick(s))
    };
    let selects = |s: &SidecarScope| !s.selector.is_empty() && super::selects(&s.selector, labels);
    let everyone = |s: &SidecarScope| s.selector.is_empty();
    in_ns(namespace, &selects)
        .or_else(|| in_ns(namespace, &everyone))
        .or_else(|| in_ns(ROOT_NAMESPACE, &everyone))
}

/// Checks a Sidecar and turns it into its scope.
pub(super) fn sidecar(
    c: &mut Checker<'_>,
    key: &NamespacedName,
    spec: &SidecarSpec,
) -> SidecarScope {
    unsupported(c, "spec.ingress", &spec.ingress);
    unsupported(
        c,
        "spec.inboundConnectionPool",
        &spec.inbound_connection_pool,
    );
    if let Some(p) = &spec.outbound_traffic_policy {
        unsupported(c, "spec.outboundTrafficPolicy.egressProxy", &p.egress_proxy);
        match p.mode.as_deref() {
            None | Some("REGISTRY_ONLY") | Some("ALLOW_ANY") => {}
            Some(other) => c.fail(
                Code::InvalidValue,
                "spec.outboundTrafficPolicy.mode",
                format!("`{other}` is not REGISTRY_ONLY or ALLOW_ANY"),
            ),
        }
    }
    let mut egress = Vec::new();
    if spec.egress.is_empty() {
        c.fail(
            Code::Missing,
            "spec.egress",
            "a Sidecar needs at least one egress listener",
        );
    }
    for (i, e) in spec.egress.iter().enumerate() {
        let field = format!("spec.egress[{i}]");
        unsupported(c, &format!("{field}.port"), &e.port);
        unsupported(c, &format!("{field}.bind"), &e.bind);
        unsupported(c, &format!("{field}.captureMode"), &e.capture_mode);
        for (j, h) in e.hosts.iter().enumerate() {
            let Some((ns, host)) = h.split_once('/') else {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.hosts[{j}]"),
                    format!("`{h}` is not namespace/host"),
                );
                continue;
            };
            let namespace = if ns == "." {
                key.namespace.clone()
            } else {
                ns.to_owned()
            };
            egress.push(HostPattern {
                namespace,
                host: host.to_owned(),
            });
        }
    }
    SidecarScope {
        key: key.clone(),
        selector: spec
            .workload_selector
            .as_ref()
            .map(|s| s.labels.clone())
            .unwrap_or_default(),
        egress,
        allow_any: spec
            .outbound_traffic_policy
            .as_ref()
            .is_some_and(|p| p.mode.as_deref() == Some("ALLOW_ANY")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(patterns: &[(&str, &str)]) -> SidecarScope {
        SidecarScope {
            key: NamespacedName::new("demo", "default"),
            selector: BTreeMap::new(),
            egress: patterns
                .iter()
                .map(|(n, h)| HostPattern {
                    namespace: (*n).into(),
                    host: (*h).into(),
                })
                .collect(),
            allow_any: false,
        }
    }

    #[test]
    fn egress_hosts_match_as_istio_writes_them() {
        let reviews = NamespacedName::new("demo", "reviews");
        let ratings = NamespacedName::new("other", "ratings");
        let own = scope(&[("demo", "*")]);
        assert!(own.allows(&reviews, &[]) && !own.allows(&ratings, &[]));
        let exact = scope(&[("*", "ratings.other.svc.cluster.local")]);
        assert!(exact.allows(&ratings, &[]) && !exact.allows(&reviews, &[]));
        let suffix = scope(&[("other", "*.other.svc.cluster.local")]);
        assert!(suffix.allows(&ratings, &[]) && !suffix.allows(&reviews, &[]));
        assert!(!scope(&[("~", "*")]).allows(&reviews, &[]));
    }

    #[test]
    fn egress_hosts_match_a_service_entry_by_its_hosts() {
        let api = NamespacedName::new("demo", "partner-api");
        let hosts = ["api.partner.example".to_string()];
        assert!(scope(&[("demo", "api.partner.example")]).allows(&api, &hosts));
        assert!(scope(&[("*", "*.partner.example")]).allows(&api, &hosts));
        assert!(
            !scope(&[("demo", "partner-api.demo.svc.cluster.local")]).allows(&api, &hosts),
            "an entry is known by its hosts, not a Kubernetes name"
        );
        let wildcard = ["*.secure.example".to_string()];
        assert!(scope(&[("demo", "*.example")]).allows(&api, &wildcard));
        assert!(!scope(&[("demo", "billing.secure.example")]).allows(&api, &wildcard));
    }
}
