//! Semantic validation: values, references and duplicates across documents. Turns parsed
//! documents into the internal model or a list of located faults.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::kinds::{IntOrString, Metadata, ServiceSpec, WorkloadEntrySpec};
use super::{
    Code, ConfigError, ConfigSet, NamespacedName, Protocol, Service, ServicePort, TargetPort,
    WorkloadEntry, DEFAULT_NAMESPACE,
};
use crate::locality::Locality;

#[derive(Debug)]
pub struct Document {
    pub file: String,
    pub index: usize,
    pub metadata: Metadata,
    pub body: DocumentBody,
}

#[derive(Debug)]
pub enum DocumentBody {
    Service(ServiceSpec),
    WorkloadEntry(WorkloadEntrySpec),
    ServiceExport,
}

impl DocumentBody {
    fn kind(&self) -> &'static str {
        match self {
            DocumentBody::Service(_) => "Service",
            DocumentBody::WorkloadEntry(_) => "WorkloadEntry",
            DocumentBody::ServiceExport => "ServiceExport",
        }
    }
}

/// Collects faults of one document.
struct Checker<'a> {
    doc: &'a Document,
    key: NamespacedName,
    errors: &'a mut Vec<ConfigError>,
}

impl Checker<'_> {
    fn fail(&mut self, code: Code, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.doc.file.clone(),
            document: self.doc.index,
            object: Some(format!("{} {}", self.doc.body.kind(), self.key)),
            field: field.into(),
            code,
            message: message.into(),
        });
    }

    fn port(&mut self, field: &str, value: i64) -> Option<u16> {
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
        let ok = !value.is_empty()
            && value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !value.starts_with('-')
            && !value.ends_with('-');
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
    Protocol::parse(prefix).unwrap_or(Protocol::Http)
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
    Some(Service {
        key: c.key.clone(),
        ports,
        selector: spec.selector.clone(),
    })
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
    })
}

fn check_targets(
    set: &ConfigSet,
    locations: &BTreeMap<(&'static str, NamespacedName), (String, usize)>,
    errors: &mut Vec<ConfigError>,
) {
    for svc in set.services.values() {
        for w in set.selected(svc) {
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

/// Builds the config set from parsed documents, or every fault found.
pub fn build(docs: Vec<Document>) -> Result<ConfigSet, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut set = ConfigSet::default();
    let mut locations: BTreeMap<(&'static str, NamespacedName), (String, usize)> = BTreeMap::new();
    for doc in &docs {
        let ns = doc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let key = NamespacedName::new(&ns, &doc.metadata.name);
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
        }
    }
    check_targets(&set, &locations, &mut errors);
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(errors)
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

    fn first_error(yaml: &str) -> ConfigError {
        load(yaml).expect_err("invalid").0.remove(0)
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
