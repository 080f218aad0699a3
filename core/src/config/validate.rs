//! Semantic validation: values, references and duplicates across documents. Turns parsed
//! documents into the internal model, admitting each object on its own; routing objects are
//! attached to their services by `assemble.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::istio::{DestinationRuleSpec, VirtualServiceSpec};
use super::kinds::{IntOrString, LocalRateLimitSpec, Metadata, ServiceSpec, WorkloadEntrySpec};
use super::{
    Code, ConfigError, ConfigSet, NamespacedName, Protocol, Service, ServicePort, TargetPort,
    WorkloadEntry, DEFAULT_NAMESPACE,
};
use crate::locality::Locality;

#[derive(Debug, Clone)]
pub struct Document {
    pub file: String,
    pub index: usize,
    pub metadata: Metadata,
    pub body: DocumentBody,
}

#[derive(Debug, Clone)]
pub enum DocumentBody {
    Service(ServiceSpec),
    WorkloadEntry(WorkloadEntrySpec),
    ServiceExport,
    VirtualService(Box<VirtualServiceSpec>),
    DestinationRule(Box<DestinationRuleSpec>),
    LocalRateLimit(LocalRateLimitSpec),
    GlobalRateLimit(super::kinds::GlobalRateLimitSpec),
    HealthCheck(super::kinds::HealthCheckSpec),
    WasmPlugin(Box<super::wasm_plugin::WasmPluginSpec>),
    Sidecar(Box<super::sidecar::SidecarSpec>),
    ServiceEntry(Box<super::istio::ServiceEntrySpec>),
    PeerAuthentication(Box<super::security::PeerAuthenticationSpec>),
    AuthorizationPolicy(Box<super::security::AuthorizationPolicySpec>),
    RequestAuthentication(Box<super::security::RequestAuthenticationSpec>),
    Telemetry(Box<super::telemetry::TelemetrySpec>),
    MeshConfig(Box<super::mesh::MeshConfigSpec>),
}

impl Document {
    /// `Kind namespace/name`, as faults name the object.
    pub fn object(&self) -> String {
        format!("{} {}", self.body.kind(), self.key())
    }

    /// The object's namespace (the default one when it names none).
    pub fn namespace(&self) -> String {
        self.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
    }

    /// `namespace/name` of the object.
    pub fn key(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace(), &self.metadata.name)
    }
}

impl DocumentBody {
    fn kind(&self) -> &'static str {
        match self {
            DocumentBody::Service(_) => "Service",
            DocumentBody::WorkloadEntry(_) => "WorkloadEntry",
            DocumentBody::ServiceExport => "ServiceExport",
            DocumentBody::VirtualService(_) => "VirtualService",
            DocumentBody::DestinationRule(_) => "DestinationRule",
            DocumentBody::LocalRateLimit(_) => "LocalRateLimit",
            DocumentBody::GlobalRateLimit(_) => "GlobalRateLimit",
            DocumentBody::HealthCheck(_) => "HealthCheck",
            DocumentBody::WasmPlugin(_) => "WasmPlugin",
            DocumentBody::Sidecar(_) => "Sidecar",
            DocumentBody::ServiceEntry(_) => "ServiceEntry",
            DocumentBody::PeerAuthentication(_) => "PeerAuthentication",
            DocumentBody::AuthorizationPolicy(_) => "AuthorizationPolicy",
            DocumentBody::RequestAuthentication(_) => "RequestAuthentication",
            DocumentBody::Telemetry(_) => "Telemetry",
            DocumentBody::MeshConfig(_) => "ConfigMap",
        }
    }
}

/// Collects faults of one document.
pub(super) struct Checker<'a> {
    doc: &'a Document,
    key: NamespacedName,
    errors: &'a mut Vec<ConfigError>,
}

impl<'a> Checker<'a> {
    pub(super) fn new(
        doc: &'a Document,
        key: NamespacedName,
        errors: &'a mut Vec<ConfigError>,
    ) -> Self {
        Self { doc, key, errors }
    }

    /// Where the faults of what follows start.
    pub(super) fn mark(&self) -> usize {
        self.errors.len()
    }

    /// Whether a fault that rejects the object was found since `mark`.
    pub(super) fn rejected_since(&self, mark: usize) -> bool {
        self.errors[mark..].iter().any(|e| !e.code.is_warning())
    }

    pub(super) fn fail(
        &mut self,
        code: Code,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            file: self.doc.file.clone(),
            document: self.doc.index,
            object: Some(format!("{} {}", self.doc.body.kind(), self.key)),
            field: field.into(),
            code,
            message: message.into(),
        });
    }

    pub(super) fn port(&mut self, field: &str, value: i64) -> Option<u16> {
        match u16::try_from(value) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                self.fail(
                    Code::InvalidValue,
                    field,
                    format!("{value} is not a port number (1-65535)"),
                );
                None
            }
        }
    }

    fn dns_label(&mut self, field: &str, value: &str) -> bool {
        let ok = super::is_dns_label(value);
        if !ok {
            self.fail(Code::InvalidValue, field, format!("`{value}` is not a DNS-1123 label (lowercase letters, digits, '-', at most 63)"));
        }
        ok
    }
}

fn service_protocol(
    c: &mut Checker<'_>,
    field: &str,
    spec: &super::kinds::ServicePortSpec,
) -> Protocol {
    if let Some(p) = spec.protocol.as_deref() {
        if p != "TCP" {
            c.fail(
                Code::Schema,
                format!("{field}.protocol"),
                format!("protocol {p} is not supported; only TCP"),
            );
        }
    }
    if let Some(app) = spec.app_protocol.as_deref() {
        return Protocol::parse(app).unwrap_or_else(|| {
            c.fail(
                Code::InvalidValue,
                format!("{field}.appProtocol"),
                format!("`{app}` is not one of http, http2, grpc, tcp"),
            );
            Protocol::Tcp
        });
    }
    // Istio's convention: the port name's prefix before '-' names the protocol.
    let name = spec.name.as_deref().unwrap_or_default();
    let prefix = name.split('-').next().unwrap_or_default();
    Protocol::parse(prefix).unwrap_or(Protocol::Unspecified)
}

fn service(c: &mut Checker<'_>, spec: &ServiceSpec) -> Option<Service> {
    if let Some(t) = spec.service_type.as_deref() {
        if t != "ClusterIP" {
            c.fail(
                Code::Schema,
                "spec.type",
                format!("service type {t} is not supported; only ClusterIP"),
            );
        }
    }
    if spec.ports.is_empty() {
        c.fail(
            Code::Missing,
            "spec.ports",
            "a service needs at least one port",
        );
    }
    let mut ports = Vec::new();
    let mut seen_names = BTreeSet::new();
    let mut seen_ports = BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let name = p.name.clone().unwrap_or_default();
        if spec.ports.len() > 1 && name.is_empty() {
            c.fail(
                Code::Missing,
                format!("{field}.name"),
                "ports must be named when a service has more than one",
            );
        }
        if !name.is_empty() && !seen_names.insert(name.clone()) {
            c.fail(
                Code::Duplicate,
                format!("{field}.name"),
                format!("port name `{name}` is used twice"),
            );
        }
        let protocol = service_protocol(c, &field, p);
        let Some(port) = c.port(&format!("{field}.port"), p.port) else {
            continue;
        };
        if !seen_ports.insert(port) {
            c.fail(
                Code::Duplicate,
                format!("{field}.port"),
                format!("port {port} is used twice"),
            );
        }
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => match c.port(&format!("{field}.targetPort"), *n) {
                Some(t) => TargetPort::Number(t),
                None => continue,
            },
            Some(IntOrString::String(s)) => TargetPort::Named(s.clone()),
        };
        ports.push(ServicePort {
            name,
            port,
            target_port,
            protocol,
        });
    }
    for (k, v) in &spec.selector {
        if k.is_empty() || v.len() > 63 {
            c.fail(
                Code::InvalidValue,
                format!("spec.selector.{k}"),
                "label keys must be non-empty and values at most 63 characters",
            );
        }
    }
    let export_to: Vec<String> = c
        .doc
        .metadata
        .annotations
        .get(super::EXPORT_TO_ANNOTATION)
        .map(|v| v.split(',').map(|e| e.trim().to_owned()).collect())
        .unwrap_or_default();
    let export_to = export_to_list(
        c,
        &format!("metadata.annotations.{}", super::EXPORT_TO_ANNOTATION),
        &export_to,
    );
    let mut addresses: Vec<String> = Vec::new();
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let ips = spec
        .cluster_ip
        .iter()
        .map(|ip| ("spec.clusterIP".to_owned(), ip));
    let ips = ips.chain(
        spec.cluster_ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip)),
    );
    for (field, ip) in ips {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(_) if !addresses.contains(ip) => addresses.push(ip.clone()),
            Ok(_) => {}
            Err(_) => c.fail(
                Code::InvalidValue,
                field,
                format!("`{ip}` is not an IP address (or None for a headless Service)"),
            ),
        }
    }
    Some(Service {
        key: c.key.clone(),
        ports,
        selector: spec.selector.clone(),
        export_to,
        hosts: Vec::new(),
        addresses,
        external: None,
        headless,
    })
}

/// Checks Istio's `exportTo` values: `.`, `*`, `~` or a namespace.
pub(super) fn export_to_list(c: &mut Checker<'_>, field: &str, values: &[String]) -> Vec<String> {
    for e in values {
        let ok = matches!(e.as_str(), "." | "*" | "~")
            || (!e.is_empty()
                && e.len() <= 63
                && e.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        if !ok {
            c.fail(
                Code::InvalidValue,
                field,
                format!("`{e}` is not `.`, `*`, `~` or a namespace"),
            );
        }
    }
    values.to_vec()
}

fn workload(c: &mut Checker<'_>, spec: &WorkloadEntrySpec) -> Option<WorkloadEntry> {
    let address = match spec.address.as_deref() {
        None | Some("") => {
            c.fail(Code::Missing, "spec.address", "an address is required");
            None
        }
        Some(a) => match a.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                c.fail(
                    Code::InvalidValue,
                    "spec.address",
                    format!("`{a}` is not an IP address"),
                );
                None
            }
        },
    };
    let mut ports = BTreeMap::new();
    for (name, p) in &spec.ports {
        if let Some(p) = c.port(&format!("spec.ports.{name}"), *p) {
            ports.insert(name.clone(), p);
        }
    }
    let locality = spec.locality.as_deref().unwrap_or_default();
    let locality = Locality::parse(locality).unwrap_or_else(|| {
        c.fail(
            Code::InvalidValue,
            "spec.locality",
            format!("`{locality}` is not region/zone/subzone"),
        );
        Locality::default()
    });
    if let Some(w) = spec.weight {
        if !(0..=u32::MAX as i64).contains(&w) {
            c.fail(
                Code::InvalidValue,
                "spec.weight",
                format!("{w} is out of range"),
            );
        }
    }
    if spec.network.is_some() {
        c.fail(
            Code::Schema,
            "spec.network",
            "networks are derived from clusters; `network` is not supported",
        );
    }
    let sa = spec
        .service_account
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    c.dns_label("spec.serviceAccount", &sa);
    let mut labels = c.doc.metadata.labels.clone();
    labels.extend(spec.labels.clone());
    Some(WorkloadEntry {
        key: c.key.clone(),
        address: address?,
        ports,
        labels,
        locality,
        service_account: sa,
        owner: None,
    })
}

fn check_targets(
    set: &ConfigSet,
    locations: &BTreeMap<(&'static str, NamespacedName), (String, usize)>,
    errors: &mut Vec<ConfigError>,
) {
    let selection = set.selection();
    for svc in set.services.values() {
        for w in selection.members(svc).into_iter().map(|m| m.workload) {
            for (i, p) in svc.ports.iter().enumerate() {
                if let TargetPort::Named(name) = &p.target_port {
                    if !w.ports.contains_key(name) {
                        let (file, index) = locations
                            .get(&("WorkloadEntry", w.key.clone()))
                            .cloned()
                            .unwrap_or_default();
                        errors.push(ConfigError {
                            file,
                            document: index,
                            object: Some(format!("WorkloadEntry {}", w.key)),
                            field: "spec.ports".into(),
                            code: Code::Reference,
                            message: format!("Service {} port {i} targets port `{name}`, which this workload does not declare", svc.key),
                        });
                    }
                }
            }
        }
    }
    for a in set.authorization_policies.values() {
        let provider = &a.policy.provider;
        if !provider.is_empty() && !set.mesh.ext_authz.contains_key(provider) {
            let (file, index) = locations
                .get(&("AuthorizationPolicy", a.key.clone()))
                .cloned()
                .unwrap_or_default();
            errors.push(ConfigError {
                file,
                document: index,
                object: Some(format!("AuthorizationPolicy {}", a.key)),
                field: "spec.provider.name".into(),
                code: Code::Reference,
                message: format!("the mesh config (ConfigMap istio-system/istio) has no extension provider `{provider}`; the policy denies every request it matches until it does"),
            });
        }
    }
    super::telemetry::check_set(set, |key, field, message| {
        let (file, index) = locations
            .get(&("Telemetry", key.clone()))
            .cloned()
            .unwrap_or_default();
        errors.push(ConfigError {
            file,
            document: index,
            object: Some(format!("Telemetry {key}")),
            field,
            code: Code::Reference,
            message,
        });
    });
    for export in &set.exports {
        if !set.services.contains_key(export) {
            let (file, index) = locations
                .get(&("ServiceExport", export.clone()))
                .cloned()
                .unwrap_or_default();
            errors.push(ConfigError {
                file,
                document: index,
                object: Some(format!("ServiceExport {export}")),
                field: "metadata.name".into(),
                code: Code::Reference,
                message: format!("no Service {export} to export"),
            });
        }
    }
}

/// The service a host names, seen from `namespace`: `name`, `name.ns`, `name.ns.svc`,
/// `name.ns.svc.cluster.local` or `name.ns.svc.clusterset.local`.
pub fn resolve_host(host: &str, namespace: &str) -> Option<NamespacedName> {
    let labels: Vec<&str> = host.split('.').collect();
    match labels.as_slice() {
        [name] => Some(NamespacedName::new(namespace, name)),
        [name, ns] | [name, ns, "svc"] | [name, ns, "svc", "cluster" | "clusterset", "local"] => {
            Some(NamespacedName::new(ns, name))
        }
        _ => None,
    }
}

/// What admission made of a set of documents: the config of every object that passed, the
/// faults of the objects rejected (they apply nothing), and warnings: references to objects
/// that do not exist (yet), which Istio too accepts, since objects arrive in any order.
#[derive(Debug)]
pub struct Admission {
    pub set: ConfigSet,
    pub rejected: Vec<ConfigError>,
    pub warnings: Vec<ConfigError>,
}

/// Admits each object on its own.
pub fn build(docs: Vec<Document>) -> Admission {
    build_on(&super::Platform::default(), docs)
}

/// Admits each object on its own, on top of what the platform lists.
pub fn build_on(platform: &super::Platform, docs: Vec<Document>) -> Admission {
    let mut errors = Vec::new();
    let mut set = ConfigSet {
        services: platform.services.clone(),
        workloads: platform.workloads.clone(),
        endpoints: platform.endpoints.clone(),
        ..ConfigSet::default()
    };
    let mut locations: BTreeMap<(&'static str, NamespacedName), (String, usize)> = BTreeMap::new();
    for doc in &docs {
        let ns = doc.namespace();
        let key = doc.key();
        let mut c = Checker {
            doc,
            key: key.clone(),
            errors: &mut errors,
        };
        if doc.metadata.name.is_empty() {
            c.fail(Code::Missing, "metadata.name", "a name is required");
            continue;
        }
        let names_ok = c.dns_label("metadata.name", &doc.metadata.name)
            & c.dns_label("metadata.namespace", &ns);
        if !names_ok {
            continue;
        }
        let kind = doc.body.kind();
        if let Some((file, index)) = locations.get(&(kind, key.clone())) {
            c.fail(
                Code::Duplicate,
                "metadata.name",
                format!("{kind} {key} is also defined in {file} document {index}"),
            );
            continue;
        }
        locations.insert((kind, key.clone()), (doc.file.clone(), doc.index));
        match &doc.body {
            DocumentBody::Service(_) | DocumentBody::WorkloadEntry(_)
                if platform.services.contains_key(&key)
                    || platform.workloads.contains_key(&key) =>
            {
                c.fail(
                    Code::Duplicate,
                    "metadata.name",
                    format!("the platform already has {key} (a Kubernetes Service or pod)"),
                );
            }
            DocumentBody::Service(spec) => {
                if let Some(s) = service(&mut c, spec) {
                    set.services.insert(key, s);
                }
            }
            DocumentBody::WorkloadEntry(spec) => {
                if let Some(w) = workload(&mut c, spec) {
                    set.workloads.insert(key, w);
                }
            }
            DocumentBody::ServiceExport => {
                set.exports.insert(key);
            }
            DocumentBody::Sidecar(spec) => {
                let scope = super::sidecar::sidecar(&mut c, &key, spec);
                set.sidecars.insert(key, scope);
            }
            DocumentBody::PeerAuthentication(spec) => {
                let mark = c.mark();
                let p = super::security::peer_authentication(&mut c, &key, spec);
                if !c.rejected_since(mark) {
                    set.peer_authentications.insert(key, p);
                }
            }
            DocumentBody::AuthorizationPolicy(spec) => {
                let mark = c.mark();
                let annotations = &doc.metadata.annotations;
                let p = super::security::authorization_policy(&mut c, &key, annotations, spec);
                if !c.rejected_since(mark) {
                    set.authorization_policies.insert(key, p);
                }
            }
            DocumentBody::RequestAuthentication(spec) => {
                let mark = c.mark();
                let a = super::security::request_authentication(&mut c, &key, spec);
                if !c.rejected_since(mark) {
                    set.request_authentications.insert(key, a);
                }
            }
            DocumentBody::Telemetry(spec) => {
                let mark = c.mark();
                let t = super::telemetry::telemetry(&mut c, &key, spec);
                if !c.rejected_since(mark) {
                    set.telemetries.insert(key, t);
                }
            }
            DocumentBody::WasmPlugin(spec) => {
                let mark = c.mark();
                let p = super::wasm_plugin::wasm_plugin(&mut c, &key, spec);
                if !c.rejected_since(mark) {
                    set.wasm_plugins.insert(key, p);
                }
            }
            DocumentBody::MeshConfig(spec) => {
                let mark = c.mark();
                let m = super::mesh::mesh_config(&mut c, &key, spec);
                if !c.rejected_since(mark) {
                    set.mesh = m;
                }
            }
            DocumentBody::VirtualService(_)
            | DocumentBody::DestinationRule(_)
            | DocumentBody::LocalRateLimit(_)
            | DocumentBody::GlobalRateLimit(_)
            | DocumentBody::HealthCheck(_)
            | DocumentBody::ServiceEntry(_) => {}
        }
    }
    // ServiceEntries after every Service, so a name clash always rejects the entry.
    for doc in &docs {
        let DocumentBody::ServiceEntry(spec) = &doc.body else {
            continue;
        };
        let key = doc.key();
        if locations.get(&("ServiceEntry", key.clone())) != Some(&(doc.file.clone(), doc.index)) {
            continue; // unnamed or a duplicate: already reported
        }
        let mut c = Checker {
            doc,
            key: key.clone(),
            errors: &mut errors,
        };
        if let Some((file, index)) = locations.get(&("Service", key.clone())) {
            c.fail(
                Code::Duplicate,
                "metadata.name",
                format!("Service {key} ({file} document {index}) has this name; a ServiceEntry and a Service of one namespace need different names"),
            );
            continue;
        }
        let Some(admitted) = super::istio::service_entry(&mut c, &key, spec, |c, v| {
            export_to_list(c, "spec.exportTo", v)
        }) else {
            continue;
        };
        for w in admitted.workloads {
            if set.workloads.contains_key(&w.key) {
                c.fail(
                    Code::Duplicate,
                    "spec.endpoints",
                    format!(
                        "WorkloadEntry {} exists; an inline endpoint would take its name",
                        w.key
                    ),
                );
                continue;
            }
            set.workloads.insert(w.key.clone(), w);
        }
        set.services.insert(key, admitted.service);
    }
    check_targets(&set, &locations, &mut errors);
    super::assemble::attach(&docs, &mut set, &mut errors);
    let (warnings, rejected) = errors.into_iter().partition(|e| e.code.is_warning());
    Admission {
        set,
        rejected,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{load::load_files, SourceFile};
    use super::*;

    fn load(yaml: &str) -> Result<ConfigSet, super::super::ConfigErrors> {
        load_files(&[SourceFile {
            name: "svc.yaml".into(),
            contents: yaml.into(),
        }])
    }

    const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo-1, namespace: demo}
spec:
  address: 127.0.1.10
  labels: {app: echo}
  locality: us-east/zone-a
  serviceAccount: echo
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: echo, namespace: demo}
"#;

    #[test]
    fn a_valid_set_selects_workloads_and_exports() {
        let set = load(GOOD).expect("valid");
        let svc = &set.services[&NamespacedName::new("demo", "echo")];
        assert_eq!(svc.ports[0].target_port, TargetPort::Number(8080));
        assert_eq!(set.selected(svc).count(), 1);
        assert!(set.exports.contains(&NamespacedName::new("demo", "echo")));
    }

    #[test]
    fn the_selection_index_picks_what_a_scan_of_every_workload_picks() {
        let mut yaml = String::new();
        for (svc, selector) in [
            ("a", "{app: a}"),
            ("a-v2", "{app: a, version: v2}"),
            ("none", "{}"),
            ("b", "{app: b}"),
        ] {
            yaml.push_str(&format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: demo}}\nspec: {{selector: {selector}, ports: [{{port: 80}}]}}\n"));
        }
        for (i, (ns, labels)) in [
            ("demo", "{app: a, version: v1}"),
            ("demo", "{app: a, version: v2}"),
            ("other", "{app: a, version: v2}"),
            ("demo", "{app: b}"),
            ("demo", "{}"),
        ]
        .into_iter()
        .enumerate()
        {
            yaml.push_str(&format!("---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: w{i}, namespace: {ns}}}\nspec: {{address: 127.0.0.{i}, labels: {labels}}}\n"));
        }
        let set = load(&yaml).expect("valid");
        let selection = set.selection();
        for svc in set.services.values() {
            let scanned: Vec<&WorkloadEntry> = set.selected(svc).collect();
            assert_eq!(selection.selected(svc), scanned, "{}", svc.key);
        }
        let a = &set.services[&NamespacedName::new("demo", "a")];
        assert_eq!(
            selection.selected(a).len(),
            2,
            "both versions in demo, not other's"
        );
    }

    /// The first fault of a rejected object, or else the first warning.
    fn first_error(yaml: &str) -> ConfigError {
        match load(yaml) {
            Err(mut e) => e.0.remove(0),
            Ok(set) => set.warnings.first().cloned().expect("a fault or a warning"),
        }
    }

    #[test]
    fn a_service_s_cluster_ips_are_its_addresses() {
        let set = load("apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: demo}\nspec:\n  clusterIP: 10.96.0.20\n  clusterIPs: [10.96.0.20, fd00::20]\n  ports: [{name: http, port: 80}]\n").expect("valid");
        let svc = &set.services[&NamespacedName::new("demo", "echo")];
        assert_eq!(
            svc.addresses,
            vec!["10.96.0.20".to_owned(), "fd00::20".to_owned()]
        );
        let headless = load("apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: demo}\nspec:\n  clusterIP: None\n  ports: [{name: tcp, port: 5432}]\n").expect("valid");
        assert!(headless.services[&NamespacedName::new("demo", "db")]
            .addresses
            .is_empty());
        let e = first_error("apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: demo}\nspec:\n  clusterIP: 10.96.0.x\n  ports: [{name: http, port: 80}]\n");
        assert_eq!(e.field, "spec.clusterIP");
    }

    #[test]
    fn faults_name_file_document_and_field() {
        let e = first_error(&GOOD.replace("port: 80,", "port: 70000,"));
        assert_eq!(
            (e.file.as_str(), e.document, e.field.as_str()),
            ("svc.yaml", 1, "spec.ports[0].port")
        );
        assert_eq!(e.code, Code::InvalidValue);

        let e = first_error(&GOOD.replace("address: 127.0.1.10", "address: not-an-ip"));
        assert_eq!((e.document, e.field.as_str()), (2, "spec.address"));

        let e =
            first_error(&GOOD.replace("serviceAccount: echo", "serviceAccount: echo\n  bogus: 1"));
        assert_eq!(e.field, "spec.bogus");
        assert!(e.message.contains("unknown field"), "{}", e.message);

        let e = first_error(&GOOD.replace("kind: ServiceExport", "kind: ServiceImport"));
        assert_eq!((e.document, e.code), (3, Code::UnknownKind));
    }

    #[test]
    fn syntax_errors_and_dangling_exports_are_reported() {
        let e = first_error("apiVersion: v1\nkind: Service\nmetadata: {name: x\n");
        assert_eq!(e.code, Code::Syntax);
        let e = first_error(&GOOD.replace(
            "kind: ServiceExport\nmetadata: {name: echo",
            "kind: ServiceExport\nmetadata: {name: other",
        ));
        assert_eq!((e.code, e.document), (Code::Reference, 3));
    }

    #[test]
    fn duplicates_point_at_the_first_definition() {
        let yaml = format!(
            "{GOOD}\n---\n{}",
            GOOD.split("---").next().expect("first doc")
        );
        let e = first_error(&yaml);
        assert_eq!(e.code, Code::Duplicate);
        assert!(e.message.contains("document 1"), "{}", e.message);
    }
}

#[cfg(test)]
mod admission_tests {
    use super::super::{load::admit, load::LastGood, SourceFile};
    use super::*;

    fn file(name: &str, contents: &str) -> SourceFile {
        SourceFile {
            name: name.into(),
            contents: contents.into(),
        }
    }

    const ECHO: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: demo}\nspec:\n  selector: {app: echo}\n  ports: [{name: http, port: 80}]\n";
    const OTHER: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: demo}\nspec:\n  selector: {app: other}\n  ports: [{name: http, port: 80}]\n";

    #[test]
    fn a_rejected_object_keeps_its_last_version_and_the_others_apply() {
        let mut last = LastGood::default();
        let (set, rejected) = admit(&[file("echo.yaml", ECHO)], &mut last);
        assert!(rejected.is_empty());
        assert_eq!(set.services.len(), 1);
        // echo breaks, other arrives: other applies, echo's last version stays.
        let broken = ECHO.replace("port: 80", "port: 80000");
        let (set, rejected) = admit(
            &[file("echo.yaml", &broken), file("other.yaml", OTHER)],
            &mut last,
        );
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].object.as_deref(), Some("Service demo/echo"));
        let echo = &set.services[&NamespacedName::new("demo", "echo")];
        assert_eq!(echo.ports[0].port, 80, "the last admitted version serves");
        assert!(set
            .services
            .contains_key(&NamespacedName::new("demo", "other")));
        // A file that is not YAML keeps what it held; a fixed file replaces it.
        let (set, rejected) = admit(
            &[file("echo.yaml", "{not yaml"), file("other.yaml", OTHER)],
            &mut last,
        );
        assert_eq!(rejected[0].code, Code::Syntax);
        assert_eq!(set.services.len(), 2);
        let (set, rejected) = admit(&[file("other.yaml", OTHER)], &mut last);
        assert!(rejected.is_empty());
        assert_eq!(set.services.len(), 1, "a deleted file's objects are gone");
    }

    #[test]
    fn a_virtual_service_before_its_destination_rule_is_a_warning_and_applies_later() {
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo, namespace: demo}\nspec:\n  hosts: [echo]\n  http:\n  - route: [{destination: {host: echo, subset: v2}}]\n";
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: demo}\nspec:\n  host: echo\n  subsets: [{name: v2, labels: {version: v2}}]\n";
        let mut last = LastGood::default();
        let (set, rejected) = admit(&[file("echo.yaml", ECHO), file("vs.yaml", vs)], &mut last);
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(set.warnings.len(), 1, "{:?}", set.warnings);
        assert_eq!(set.warnings[0].code, Code::Reference);
        let key = NamespacedName::new("demo", "echo");
        assert_eq!(
            set.routing[&key].http.len(),
            1,
            "the route applies meanwhile"
        );
        let (set, _) = admit(
            &[
                file("echo.yaml", ECHO),
                file("vs.yaml", vs),
                file("dr.yaml", dr),
            ],
            &mut last,
        );
        assert!(set.warnings.is_empty(), "{:?}", set.warnings);
        assert_eq!(set.routing[&key].subsets.len(), 1);
    }
}
