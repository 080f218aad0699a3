//! Istio's `ServiceEntry`: a service added to the registry by hand, with Istio's validation
//! rules. It becomes a [`Service`] like any other, known by its `hosts` as well:
//!
//! - `MESH_INTERNAL`: its endpoints are mesh workloads with sidecars, reached with mTLS
//!   through their tunnel port. They are the WorkloadEntries its `workloadSelector` picks,
//!   or its inline `endpoints`, which become WorkloadEntries of their own (named
//!   `<entry>-<index>`). Inline endpoints must be IP addresses.
//! - `MESH_EXTERNAL` (Istio's default): outside the mesh, reached directly by the calling
//!   sidecar without mTLS, at the addresses its `resolution` gives (`STATIC` endpoints,
//!   `DNS` names resolved when connecting, or with `NONE` the host the caller asked for).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::super::kinds::WorkloadEntrySpec;
use super::super::sidecar::WorkloadSelectorSpec;
use super::super::validate::Checker;
use super::super::{
    Code, External, ExternalEndpoint, NamespacedName, Protocol, Resolution, Service, ServicePort,
    TargetPort, WorkloadEntry,
};
use crate::locality::Locality;

/// The label that ties an inline endpoint's WorkloadEntry to its ServiceEntry.
pub const ENTRY_LABEL: &str = "isthmus.io/service-entry";

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServiceEntryPortSpec>,
    pub location: Option<String>,
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntrySpec>,
    pub workload_selector: Option<WorkloadSelectorSpec>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEntryPortSpec {
    pub number: i64,
    pub protocol: Option<String>,
    pub name: Option<String>,
    pub target_port: Option<i64>,
}

/// Istio's port protocols, as Isthmus carries them: HTTP kinds are routed as HTTP, the rest
/// (TLS and HTTPS passed through, databases, plain TCP) as opaque TCP.
fn protocol(c: &mut Checker<'_>, field: &str, p: &ServiceEntryPortSpec) -> Protocol {
    let Some(proto) = p.protocol.as_deref() else {
        let name = p.name.as_deref().unwrap_or_default();
        return Protocol::parse(name.split('-').next().unwrap_or_default())
            .unwrap_or(Protocol::Tcp);
    };
    match proto.to_ascii_uppercase().as_str() {
        "HTTP" => Protocol::Http,
        "HTTP2" => Protocol::Http2,
        "GRPC" | "GRPC-WEB" => Protocol::Grpc,
        "HTTPS" | "TLS" | "TCP" | "MONGO" | "MYSQL" | "REDIS" => Protocol::Tcp,
        other => {
            c.fail(
                Code::InvalidValue,
                format!("{field}.protocol"),
                format!("`{other}` is not one of HTTP, HTTPS, HTTP2, GRPC, GRPC-WEB, TLS, TCP, MONGO, MYSQL, REDIS"),
            );
            Protocol::Tcp
        }
    }
}

/// A host as Istio accepts it in a ServiceEntry: a DNS name, optionally `*.`-prefixed.
fn host_ok(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn address_ok(a: &str) -> bool {
    match a.split_once('/') {
        Some((ip, bits)) => ip.parse::<IpAddr>().is_ok_and(|ip| {
            bits.parse::<u8>()
                .is_ok_and(|b| b <= if ip.is_ipv4() { 32 } else { 128 })
        }),
        None => a.parse::<IpAddr>().is_ok(),
    }
}

/// What a ServiceEntry adds: its service, and WorkloadEntries for inline endpoints of a
/// `MESH_INTERNAL` entry.
pub struct Admitted {
    pub service: Service,
    pub workloads: Vec<WorkloadEntry>,
}

/// Validates a ServiceEntry as Istio does and turns it into a service.
pub fn service_entry(
    c: &mut Checker<'_>,
    key: &NamespacedName,
    spec: &ServiceEntrySpec,
    export_to: impl FnOnce(&mut Checker<'_>, &[String]) -> Vec<String>,
) -> Option<Admitted> {
    let before = c.mark();
    if spec.hosts.is_empty() {
        c.fail(Code::Missing, "spec.hosts", "at least one host is required");
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        if h == "*" || !host_ok(h) {
            c.fail(
                Code::InvalidValue,
                format!("spec.hosts[{i}]"),
                format!("`{h}` is not a host name (a DNS name, optionally starting with `*.`)"),
            );
        }
    }
    for (i, a) in spec.addresses.iter().enumerate() {
        if !address_ok(a) {
            c.fail(
                Code::InvalidValue,
                format!("spec.addresses[{i}]"),
                format!("`{a}` is not an IP address or CIDR"),
            );
        }
    }
    let external = match spec.location.as_deref() {
        None | Some("MESH_EXTERNAL") => true,
        Some("MESH_INTERNAL") => false,
        Some(other) => {
            c.fail(
                Code::InvalidValue,
                "spec.location",
                format!("`{other}` is not MESH_INTERNAL or MESH_EXTERNAL"),
            );
            true
        }
    };
    let resolution = match spec.resolution.as_deref() {
        None | Some("NONE") => Resolution::None,
        Some("STATIC") => Resolution::Static,
        Some("DNS") => Resolution::Dns,
        Some("DNS_ROUND_ROBIN") => Resolution::DnsRoundRobin,
        Some(other) => {
            c.fail(
                Code::InvalidValue,
                "spec.resolution",
                format!("`{other}` is not NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
            );
            Resolution::None
        }
    };
    if !spec.subject_alt_names.is_empty() {
        c.fail(
            Code::Schema,
            "spec.subjectAltNames",
            "`subjectAltNames` is not supported yet (Isthmus checks each endpoint's SPIFFE ID)",
        );
    }

    // Ports.
    if spec.ports.is_empty() {
        c.fail(Code::Missing, "spec.ports", "at least one port is required");
    }
    let mut ports = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    let mut numbers = std::collections::BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let name = p.name.clone().unwrap_or_default();
        if name.is_empty() {
            c.fail(
                Code::Missing,
                format!("{field}.name"),
                "a port name is required",
            );
        } else if !names.insert(name.clone()) {
            c.fail(
                Code::Duplicate,
                format!("{field}.name"),
                format!("port name `{name}` is used twice"),
            );
        }
        let protocol = protocol(c, &field, p);
        let Some(number) = c.port(&format!("{field}.number"), p.number) else {
            continue;
        };
        if !numbers.insert(number) {
            c.fail(
                Code::Duplicate,
                format!("{field}.number"),
                format!("port {number} is used twice"),
            );
        }
        let target = match p.target_port {
            Some(t) => match c.port(&format!("{field}.targetPort"), t) {
                Some(t) => t,
                None => continue,
            },
            None => number,
        };
        ports.push(ServicePort {
            name,
            port: number,
            // Inline endpoints may map the port name to their own number.
            target_port: if spec
                .endpoints
                .iter()
                .any(|e| e.ports.contains_key(p.name.as_deref().unwrap_or_default()))
            {
                TargetPort::Named(p.name.clone().unwrap_or_default())
            } else {
                TargetPort::Number(target)
            },
            protocol,
        });
    }

    // Endpoints, by resolution.
    let selector = spec
        .workload_selector
        .as_ref()
        .map(|s| s.labels.clone())
        .unwrap_or_default();
    if spec.workload_selector.is_some() && !spec.endpoints.is_empty() {
        c.fail(
            Code::InvalidValue,
            "spec.workloadSelector",
            "only one of workloadSelector and endpoints may be set",
        );
    }
    for (k, v) in &selector {
        if k.contains('*') || v.contains('*') {
            c.fail(
                Code::InvalidValue,
                format!("spec.workloadSelector.labels.{k}"),
                "wildcard is not supported in selector",
            );
        }
    }
    if external && spec.workload_selector.is_some() {
        c.fail(
            Code::InvalidValue,
            "spec.workloadSelector",
            "workloadSelector picks mesh workloads: use location MESH_INTERNAL",
        );
    }
    let fqdn_only = matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
        && spec.endpoints.is_empty()
        && spec.workload_selector.is_none();
    if fqdn_only {
        for (i, h) in spec.hosts.iter().enumerate() {
            if h.starts_with("*.") {
                c.fail(
                    Code::InvalidValue,
                    format!("spec.hosts[{i}]"),
                    "a wildcard host needs endpoints when resolution is DNS (the host itself is what gets resolved)",
                );
            }
        }
    }
    match resolution {
        Resolution::None if !spec.endpoints.is_empty() => c.fail(
            Code::InvalidValue,
            "spec.endpoints",
            "no endpoints may be given with resolution NONE",
        ),
        Resolution::DnsRoundRobin if spec.endpoints.len() > 1 => c.fail(
            Code::InvalidValue,
            "spec.endpoints",
            "resolution DNS_ROUND_ROBIN takes at most one endpoint",
        ),
        _ => {}
    }
    let mut endpoints = Vec::new();
    let mut workloads = Vec::new();
    for (i, e) in spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}]");
        let address = e.address.clone().unwrap_or_default();
        let ip = address.parse::<IpAddr>().ok();
        if address.is_empty() {
            c.fail(
                Code::Missing,
                format!("{field}.address"),
                "an address is required",
            );
            continue;
        }
        if address.starts_with("unix://") {
            c.fail(
                Code::Schema,
                format!("{field}.address"),
                "unix socket endpoints are not supported",
            );
            continue;
        }
        if ip.is_none() && (resolution == Resolution::Static || !external) {
            c.fail(
                Code::InvalidValue,
                format!("{field}.address"),
                if external {
                    format!("`{address}` is not an IP address, as resolution STATIC needs")
                } else {
                    format!("`{address}` is not an IP address: mesh endpoints are reached at their IP (their sidecar's tunnel port)")
                },
            );
            continue;
        }
        if ip.is_none() && !host_ok(&address) {
            c.fail(
                Code::InvalidValue,
                format!("{field}.address"),
                format!("`{address}` is not an IP address or host name"),
            );
            continue;
        }
        let mut ep_ports = BTreeMap::new();
        for (name, n) in &e.ports {
            if !names.contains(name) {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.ports.{name}"),
                    format!("`{name}` is not a port of this ServiceEntry"),
                );
            } else if let Some(p) = c.port(&format!("{field}.ports.{name}"), *n) {
                ep_ports.insert(name.clone(), p);
            }
        }
        if e.network.is_some() {
            c.fail(
                Code::Schema,
                format!("{field}.network"),
                "networks are derived from clusters; `network` is not supported",
            );
        }
        let locality =
            Locality::parse(e.locality.as_deref().unwrap_or_default()).unwrap_or_else(|| {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.locality"),
                    "not region/zone/subzone",
                );
                Locality::default()
            });
        match (external, ip) {
            (true, _) => endpoints.push(ExternalEndpoint {
                address,
                ports: ep_ports,
            }),
            (false, Some(ip)) => {
                let mut labels = e.labels.clone();
                labels.insert(ENTRY_LABEL.to_owned(), key.name.clone());
                workloads.push(WorkloadEntry {
                    key: NamespacedName::new(&key.namespace, &format!("{}-{i}", key.name)),
                    address: ip,
                    ports: ep_ports,
                    labels,
                    locality,
                    service_account: e
                        .service_account
                        .clone()
                        .unwrap_or_else(|| "default".to_owned()),
                    owner: None,
                })
            }
            (false, None) => {}
        }
    }
    let export_to = export_to(c, &spec.export_to);
    if c.rejected_since(before) {
        return None;
    }
    if !external && spec.endpoints.is_empty() && spec.workload_selector.is_none() {
        c.fail(
            Code::Reference,
            "spec",
            "a MESH_INTERNAL ServiceEntry without endpoints or workloadSelector has nothing to route to",
        );
    }
    let selector = if !external && !spec.endpoints.is_empty() {
        [(ENTRY_LABEL.to_owned(), key.name.clone())].into()
    } else {
        selector
    };
    Some(Admitted {
        service: Service {
            key: key.clone(),
            ports,
            selector,
            export_to,
            hosts: spec.hosts.clone(),
            addresses: spec.addresses.clone(),
            external: external.then_some(External {
                resolution,
                endpoints,
            }),
            headless: false,
        },
        workloads,
    })
}

#[cfg(test)]
mod tests {
    use super::super::super::{load_files, SourceFile};
    use super::*;

    fn load(yaml: &str) -> Result<super::super::super::ConfigSet, String> {
        load_files(&[SourceFile {
            name: "se.yaml".into(),
            contents: yaml.into(),
        }])
        .map_err(|e| e.to_string())
    }

    fn entry(spec: &str) -> String {
        format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: ext, namespace: demo}}\nspec:\n{spec}")
    }

    #[test]
    fn istio_documentation_entries_are_admitted() {
        // External API by DNS (Istio's egress task).
        let set = load(&entry(
            "  hosts: [httpbin.org]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: DNS\n  location: MESH_EXTERNAL\n",
        ))
        .expect("valid");
        let svc = &set.services[&NamespacedName::new("demo", "ext")];
        assert_eq!(svc.hosts, ["httpbin.org"]);
        let ext = svc.external.as_ref().expect("external");
        assert_eq!(ext.resolution, Resolution::Dns);
        // Static external endpoints with per-endpoint ports, wildcard host with endpoints.
        let set = load(&entry(
            "  hosts: ['*.example.com']\n  addresses: [192.0.2.0/24]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: STATIC\n  endpoints:\n  - {address: 192.0.2.10, ports: {tls: 8443}}\n",
        ))
        .expect("valid");
        let svc = &set.services[&NamespacedName::new("demo", "ext")];
        assert_eq!(svc.ports[0].protocol, Protocol::Tcp);
        assert_eq!(
            svc.external.as_ref().expect("external").endpoints[0].ports["tls"],
            8443
        );
        // Mesh-internal VM workloads by selector, and inline mesh endpoints.
        let set = load(&entry(
            "  hosts: [vm.demo.internal]\n  location: MESH_INTERNAL\n  ports: [{number: 80, name: http, targetPort: 8080}]\n  resolution: STATIC\n  workloadSelector: {labels: {app: vm}}\n",
        ))
        .expect("valid");
        let svc = &set.services[&NamespacedName::new("demo", "ext")];
        assert!(svc.external.is_none());
        assert_eq!(svc.selector["app"], "vm");
        let set = load(&entry(
            "  hosts: [db.demo.internal]\n  location: MESH_INTERNAL\n  ports: [{number: 5432, name: tcp-db}]\n  resolution: STATIC\n  endpoints:\n  - {address: 10.0.0.7, serviceAccount: db, locality: us-east/zone-a}\n",
        ))
        .expect("valid");
        let w = &set.workloads[&NamespacedName::new("demo", "ext-0")];
        assert_eq!(w.service_account, "db");
        let svc = &set.services[&NamespacedName::new("demo", "ext")];
        assert_eq!(set.selected(svc).count(), 1, "its inline endpoint");
        assert_eq!(
            set.service_for_host("db.demo.internal", "other"),
            Some(svc.key.clone())
        );
    }

    #[test]
    fn istio_validation_rules_name_the_field() {
        for (spec, field, words) in [
            ("  ports: [{number: 80, name: http}]\n", "spec.hosts", "at least one host"),
            ("  hosts: ['*']\n  ports: [{number: 80, name: http}]\n", "spec.hosts[0]", "not a host name"),
            ("  hosts: [a.com]\n", "spec.ports", "at least one port"),
            ("  hosts: [a.com]\n  ports: [{number: 80}]\n", "spec.ports[0].name", "port name is required"),
            ("  hosts: [a.com]\n  ports: [{number: 80, name: http, protocol: QUIC}]\n", "spec.ports[0].protocol", "QUIC"),
            ("  hosts: [a.com]\n  addresses: [300.1.1.1]\n  ports: [{number: 80, name: http}]\n", "spec.addresses[0]", "not an IP address or CIDR"),
            ("  hosts: [a.com]\n  ports: [{number: 80, name: http}]\n  endpoints: [{address: 1.2.3.4}]\n", "spec.endpoints", "resolution NONE"),
            ("  hosts: ['*.a.com']\n  ports: [{number: 80, name: http}]\n  resolution: DNS\n", "spec.hosts[0]", "wildcard host needs endpoints"),
            ("  hosts: [a.com]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: api.a.com}]\n", "spec.endpoints[0].address", "resolution STATIC"),
            ("  hosts: [a.com]\n  ports: [{number: 80, name: http}]\n  resolution: DNS_ROUND_ROBIN\n  endpoints: [{address: x.a.com}, {address: y.a.com}]\n", "spec.endpoints", "at most one endpoint"),
            ("  hosts: [a.com]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: 1.2.3.4, ports: {grpc: 9}}]\n", "spec.endpoints[0].ports.grpc", "not a port of this ServiceEntry"),
            ("  hosts: [a.com]\n  location: MESH_INTERNAL\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  workloadSelector: {labels: {app: a}}\n  endpoints: [{address: 1.2.3.4}]\n", "spec.workloadSelector", "only one of"),
            ("  hosts: [a.com]\n  location: MESH_INTERNAL\n  ports: [{number: 80, name: http}]\n  resolution: DNS\n  endpoints: [{address: vm.a.com}]\n", "spec.endpoints[0].address", "mesh endpoints are reached at their IP"),
            ("  hosts: [a.com]\n  location: NEARBY\n  ports: [{number: 80, name: http}]\n", "spec.location", "MESH_INTERNAL or MESH_EXTERNAL"),
            ("  hosts: [a.com]\n  ports: [{number: 80, name: http}]\n  exportTo: [Bad_NS]\n", "spec.exportTo", "not `.`"),
        ] {
            let err = load(&entry(spec)).expect_err(spec);
            assert!(err.contains(field) && err.contains(words), "{spec}\n{err}");
            assert!(err.contains("se.yaml: document 1 (ServiceEntry demo/ext)"), "{err}");
        }
    }

    #[test]
    fn a_service_entry_may_not_take_a_service_name() {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: ext, namespace: demo}}\nspec: {{ports: [{{port: 80}}]}}\n---\n{}",
            entry("  hosts: [a.com]\n  ports: [{number: 80, name: http}]\n")
        );
        let err = load(&yaml).expect_err("clash");
        assert!(
            err.contains("document 2 (ServiceEntry demo/ext)") && err.contains("different names"),
            "{err}"
        );
    }
}
