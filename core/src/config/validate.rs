//! Semantic validation: values, references and duplicates across documents. Turns parsed
//! documents into the internal model or a list of located faults.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::istio::{self, DestinationRuleSpec, VirtualServiceSpec};
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
    Sidecar(Box<super::sidecar::SidecarSpec>),
}

impl Document {
    /// `Kind namespace/name`, as faults name the object.
    pub fn object(&self) -> String {
        let ns = self
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE);
        format!("{} {ns}/{}", self.body.kind(), self.metadata.name)
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
            DocumentBody::Sidecar(_) => "Sidecar",
        }
    }
}

/// Collects faults of one document.
pub(super) struct Checker<'a> {
    doc: &'a Document,
    key: NamespacedName,
    errors: &'a mut Vec<ConfigError>,
}

impl Checker<'_> {
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
    let export_to: Vec<String> = c
        .doc
        .metadata
        .annotations
        .get(super::EXPORT_TO_ANNOTATION)
        .map(|v| v.split(',').map(|e| e.trim().to_owned()).collect())
        .unwrap_or_default();
    for e in &export_to {
        let ok = matches!(e.as_str(), "." | "*" | "~")
            || (!e.is_empty()
                && e.len() <= 63
                && e.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        if !ok {
            c.fail(
                Code::InvalidValue,
                format!("metadata.annotations.{}", super::EXPORT_TO_ANNOTATION),
                format!("`{e}` is not `.`, `*`, `~` or a namespace"),
            );
        }
    }
    Some(Service {
        key: c.key.clone(),
        ports,
        selector: spec.selector.clone(),
        export_to,
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

fn doc_namespace(doc: &Document) -> String {
    doc.metadata
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
}

fn rate_limit(c: &mut Checker<'_>, spec: &LocalRateLimitSpec) -> Option<crate::routing::RateLimit> {
    if spec.target_ref.kind != "Service" {
        c.fail(
            Code::InvalidValue,
            "spec.targetRef.kind",
            format!(
                "`{}` cannot be rate limited; only Service",
                spec.target_ref.kind
            ),
        );
    }
    let tokens = u32::try_from(spec.tokens_per_interval)
        .ok()
        .filter(|t| *t > 0);
    if tokens.is_none() {
        c.fail(
            Code::InvalidValue,
            "spec.tokensPerInterval",
            format!("{} is not a positive token count", spec.tokens_per_interval),
        );
    }
    let interval_ms = super::istio::parse_duration_ms(&spec.interval).filter(|ms| *ms > 0);
    if interval_ms.is_none() {
        c.fail(
            Code::InvalidValue,
            "spec.interval",
            format!(
                "`{}` is not a positive duration like 1s or 100ms",
                spec.interval
            ),
        );
    }
    let burst = match spec.burst {
        None => tokens,
        Some(b) => {
            let b = u32::try_from(b).ok().filter(|b| *b > 0);
            if b.is_none() {
                c.fail(
                    Code::InvalidValue,
                    "spec.burst",
                    "burst must be a positive token count",
                );
            }
            b
        }
    };
    Some(crate::routing::RateLimit {
        route: spec.route.clone(),
        tokens: tokens?,
        interval_ms: interval_ms?,
        burst: burst?,
        per_caller: spec.per_caller,
    })
}

/// Resolves VirtualServices and DestinationRules against the services and attaches them.
fn routing(docs: &[Document], set: &mut ConfigSet, errors: &mut Vec<ConfigError>) {
    for doc in docs {
        let DocumentBody::LocalRateLimit(spec) = &doc.body else {
            continue;
        };
        let ns = doc_namespace(doc);
        let mut c = Checker {
            doc,
            key: NamespacedName::new(&ns, &doc.metadata.name),
            errors,
        };
        let target = NamespacedName::new(&ns, &spec.target_ref.name);
        if !set.services.contains_key(&target) {
            c.fail(
                Code::Reference,
                "spec.targetRef.name",
                format!("no Service {target}"),
            );
            continue;
        }
        if let Some(limit) = rate_limit(&mut c, spec) {
            set.routing
                .entry(target)
                .or_default()
                .rate_limits
                .push(limit);
        }
    }
    for doc in docs {
        let DocumentBody::DestinationRule(spec) = &doc.body else {
            continue;
        };
        let ns = doc_namespace(doc);
        let mut c = Checker {
            doc,
            key: NamespacedName::new(&ns, &doc.metadata.name),
            errors,
        };
        let before = c.errors.len();
        let (host, subsets, lb) = istio::destination_rule(&mut c, spec);
        if c.errors[before..].iter().any(|e| !e.code.is_warning()) {
            continue; // rejected: applies nothing
        }
        let Some(target) = resolve_host(&host, &ns).filter(|k| set.services.contains_key(k)) else {
            c.fail(
                Code::Reference,
                "spec.host",
                format!("no Service named `{host}`"),
            );
            continue;
        };
        let r = set.routing.entry(target.clone()).or_default();
        if !r.subsets.is_empty() || !r.policy.is_empty() {
            c.fail(
                Code::Duplicate,
                "spec.host",
                format!("another DestinationRule already applies to {target}"),
            );
            continue;
        }
        r.subsets = subsets;
        r.policy = lb;
    }
    for doc in docs {
        let DocumentBody::VirtualService(spec) = &doc.body else {
            continue;
        };
        let ns = doc_namespace(doc);
        let mut c = Checker {
            doc,
            key: NamespacedName::new(&ns, &doc.metadata.name),
            errors,
        };
        let before = c.errors.len();
        let Some(mut vs) = istio::virtual_service(&mut c, spec) else {
            continue;
        };
        resolve_destinations(&mut c, &ns, &mut vs, set);
        if c.errors[before..].iter().any(|e| !e.code.is_warning()) {
            continue; // rejected: applies nothing
        }
        for (i, host) in vs.hosts.iter().enumerate() {
            let Some(target) = resolve_host(host, &ns).filter(|k| set.services.contains_key(k))
            else {
                c.fail(
                    Code::Reference,
                    format!("spec.hosts[{i}]"),
                    format!("no Service named `{host}`"),
                );
                continue;
            };
            let r = set.routing.entry(target.clone()).or_default();
            if !r.http.is_empty() {
                c.fail(
                    Code::Duplicate,
                    format!("spec.hosts[{i}]"),
                    format!("another VirtualService already routes {target}"),
                );
                continue;
            }
            r.http = vs.http.clone();
            r.tcp = vs.tcp.clone();
        }
    }
    for doc in docs {
        let DocumentBody::LocalRateLimit(spec) = &doc.body else {
            continue;
        };
        let Some(route) = &spec.route else { continue };
        let ns = doc_namespace(doc);
        let target = NamespacedName::new(&ns, &spec.target_ref.name);
        let known = set
            .routing
            .get(&target)
            .is_some_and(|r| r.http.iter().any(|h| &h.name == route));
        if set.services.contains_key(&target) && !known {
            let mut c = Checker {
                doc,
                key: NamespacedName::new(&ns, &doc.metadata.name),
                errors,
            };
            c.fail(
                Code::Reference,
                "spec.route",
                format!("no VirtualService route named `{route}` routes {target}"),
            );
        }
    }
}

fn resolve_destinations(
    c: &mut Checker<'_>,
    ns: &str,
    vs: &mut istio::ParsedVirtualService,
    set: &ConfigSet,
) {
    for (i, route) in vs.tcp.iter_mut().enumerate() {
        for (j, d) in route.destinations.iter_mut().enumerate() {
            resolve_destination(
                c,
                ns,
                &format!("spec.tcp[{i}].route[{j}].destination"),
                d,
                set,
            );
        }
    }
    for (i, route) in vs.http.iter_mut().enumerate() {
        if let crate::routing::RouteAction::Route(dests) = &mut route.action {
            for (j, d) in dests.iter_mut().enumerate() {
                resolve_destination(
                    c,
                    ns,
                    &format!("spec.http[{i}].route[{j}].destination"),
                    d,
                    set,
                );
            }
        }
        if let Some(m) = &mut route.mirror {
            resolve_destination(
                c,
                ns,
                &format!("spec.http[{i}].mirror"),
                &mut m.destination,
                set,
            );
        }
    }
}

/// Resolves a destination's host to `namespace/name` and checks its subset and port.
fn resolve_destination(
    c: &mut Checker<'_>,
    ns: &str,
    field: &str,
    d: &mut crate::routing::Destination,
    set: &ConfigSet,
) {
    let Some(key) = resolve_host(&d.service, ns) else {
        c.fail(
            Code::InvalidValue,
            format!("{field}.host"),
            format!("`{}` is not a service host", d.service),
        );
        return;
    };
    if !set.services.contains_key(&key) {
        // A reference, not a fault of this object: objects arrive in any order. Until the
        // Service exists, requests routed here get 503.
        c.fail(
            Code::Reference,
            format!("{field}.host"),
            format!("no Service named `{}`", d.service),
        );
        d.service = key.to_string();
        return;
    }
    if let Some(subset) = &d.subset {
        let known = set
            .routing
            .get(&key)
            .is_some_and(|r| r.subsets.iter().any(|s| &s.name == subset));
        if !known {
            c.fail(
                Code::Reference,
                format!("{field}.subset"),
                format!("no DestinationRule for {key} defines subset `{subset}`"),
            );
        }
    }
    if let Some(port) = d.port {
        if !set.services[&key].ports.iter().any(|p| p.port == port) {
            c.fail(
                Code::Reference,
                format!("{field}.port.number"),
                format!("{key} has no port {port}"),
            );
        }
    }
    d.service = key.to_string();
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
            DocumentBody::Sidecar(spec) => {
                let scope = super::sidecar::sidecar(&mut c, &key, spec);
                set.sidecars.insert(key, scope);
            }
            DocumentBody::VirtualService(_)
            | DocumentBody::DestinationRule(_)
            | DocumentBody::LocalRateLimit(_) => {}
        }
    }
    check_targets(&set, &locations, &mut errors);
    routing(&docs, &mut set, &mut errors);
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

    /// The first fault of a rejected object, or else the first warning.
    fn first_error(yaml: &str) -> ConfigError {
        match load(yaml) {
            Err(mut e) => e.0.remove(0),
            Ok(set) => set.warnings.first().cloned().expect("a fault or a warning"),
        }
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
mod routing_tests {
    use super::super::{load::load_files, SourceFile};
    use super::*;

    const BASE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: demo}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 80}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews.demo.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

    fn with_vs(http: &str) -> Result<ConfigSet, Vec<ConfigError>> {
        let vs = format!("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: demo}}\nspec:\n  hosts: [reviews]\n  http:\n{http}");
        load_files(&[SourceFile {
            name: "r.yaml".into(),
            contents: format!("{BASE}{vs}"),
        }])
        .map_err(|e| e.0)
    }

    #[test]
    fn a_valid_virtual_service_attaches_to_its_service() {
        let set = with_vs("  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 75}\n    - {destination: {host: reviews, subset: v2}, weight: 25}\n    timeout: 1.5s\n    retries: {attempts: 2, retryOn: 'gateway-error,unavailable'}\n").expect("valid");
        let r = &set.routing[&NamespacedName::new("demo", "reviews")];
        assert_eq!(r.http.len(), 2);
        assert_eq!(r.subsets.len(), 2);
        assert_eq!(
            r.policy.load_balancer,
            Some(crate::routing::LoadBalancer::LeastRequest)
        );
        assert_eq!(r.http[1].timeout_ms, Some(1500));
        let crate::routing::RouteAction::Route(d) = &r.http[1].action else {
            panic!("route")
        };
        assert_eq!(d[0].service, "demo/reviews");
    }

    /// The first fault of a rejected object, or else the first warning.
    fn first(http: &str) -> ConfigError {
        match with_vs(http) {
            Err(mut e) => e.remove(0),
            Ok(set) => set.warnings.first().cloned().expect("a fault or a warning"),
        }
    }

    #[test]
    fn unsupported_istio_fields_are_named_not_ignored() {
        let e = first("  - route: [{destination: {host: reviews}}]\n    mirrors: [{destination: {host: reviews}}]\n");
        assert_eq!(
            (e.field.as_str(), e.code),
            ("spec.http[0].mirrors", Code::Schema)
        );
        assert!(e.message.contains("not supported yet"), "{}", e.message);
        let e = first("  - route: [{destination: {host: reviews}}]\n    bogus: 1\n");
        assert_eq!(e.field, "spec.http[0].bogus");
    }

    #[test]
    fn weights_subsets_hosts_and_regexes_are_checked() {
        let e = first("  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 70}\n    - {destination: {host: reviews, subset: v2}, weight: 20}\n");
        assert!(
            e.field == "spec.http[0].route" && e.message.contains("add up to 90"),
            "{e}"
        );
        let e = first("  - route: [{destination: {host: reviews, subset: v3}}]\n");
        assert_eq!(
            (e.field.as_str(), e.code),
            ("spec.http[0].route[0].destination.subset", Code::Reference)
        );
        let e = first("  - route: [{destination: {host: ratings}}]\n");
        assert!(e.message.contains("no Service named `ratings`"), "{e}");
        let e = first("  - match: [{uri: {regex: '(unclosed'}}]\n    route: [{destination: {host: reviews}}]\n");
        assert_eq!(e.field, "spec.http[0].match[0].uri.regex");
        let e = first("  - route: [{destination: {host: reviews}}]\n    timeout: soon\n");
        assert_eq!(e.field, "spec.http[0].timeout");
        let e = first("  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 2, retryOn: 'sometimes'}\n");
        assert!(
            e.message.contains("`sometimes` is not a retry condition"),
            "{e}"
        );
        let e = first(
            "  - fault: {abort: {grpcStatus: NOPE}}\n    route: [{destination: {host: reviews}}]\n",
        );
        assert_eq!(e.field, "spec.http[0].fault.abort.grpcStatus");
    }

    #[test]
    fn deprecated_fields_istio_still_accepts_are_mapped_with_a_warning() {
        let base = BASE.replace(
            "trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}",
            "trafficPolicy: {outlierDetection: {consecutiveErrors: 3}}",
        );
        let vs = "---\napiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: reviews, namespace: demo}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews, subset: v1}}]\n    mirror: {host: reviews, subset: v2}\n    mirrorPercent: 40\n";
        let set = load_files(&[SourceFile {
            name: "r.yaml".into(),
            contents: format!("{base}{vs}"),
        }])
        .expect("accepted");
        let r = &set.routing[&NamespacedName::new("demo", "reviews")];
        let outlier = r.policy.outlier.as_ref().expect("outlier detection");
        assert_eq!(
            (outlier.consecutive_gateway, outlier.consecutive_5xx),
            (Some(3), None),
            "gateway errors only, as Istio maps it"
        );
        assert_eq!(r.http[0].mirror.as_ref().map(|m| m.percentage), Some(40.0));
        let fields: Vec<(&str, Code)> = set
            .warnings
            .iter()
            .map(|w| (w.field.as_str(), w.code))
            .collect();
        assert_eq!(
            fields,
            vec![
                (
                    "spec.trafficPolicy.outlierDetection.consecutiveErrors",
                    Code::Deprecated
                ),
                ("spec.http[0].mirrorPercent", Code::Deprecated),
            ]
        );
    }

    #[test]
    fn unsupported_destination_rule_policies_are_named() {
        let dr = BASE.replace(
            "trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}",
            "trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {time: 1s}}}}",
        );
        let e = load_files(&[SourceFile {
            name: "r.yaml".into(),
            contents: dr,
        }])
        .expect_err("unsupported")
        .0
        .remove(0);
        assert_eq!(
            e.field,
            "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive"
        );
    }
}

#[cfg(test)]
mod rate_limit_tests {
    use super::super::{load::load_files, SourceFile};
    use super::*;

    fn load(spec: &str) -> Result<ConfigSet, Vec<ConfigError>> {
        let yaml = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: demo}}\nspec: {{selector: {{app: reviews}}, ports: [{{port: 80}}]}}\n---\napiVersion: isthmus.io/v1alpha1\nkind: LocalRateLimit\nmetadata: {{name: l, namespace: demo}}\nspec:\n{spec}");
        load_files(&[SourceFile {
            name: "l.yaml".into(),
            contents: yaml,
        }])
        .map_err(|e| e.0)
    }

    #[test]
    fn a_rate_limit_attaches_to_its_service() {
        let set = load("  targetRef: {kind: Service, name: reviews}\n  tokensPerInterval: 10\n  interval: 1s\n  burst: 20\n").expect("valid");
        let limit = &set.routing[&NamespacedName::new("demo", "reviews")].rate_limits[0];
        assert_eq!(
            (
                limit.tokens,
                limit.interval_ms,
                limit.burst,
                limit.per_caller
            ),
            (10, 1000, 20, false)
        );
    }

    #[test]
    fn bad_rate_limits_name_their_field() {
        let field = |spec: &str| match load(spec) {
            Err(mut e) => e.remove(0).field,
            Ok(set) => set.warnings.first().cloned().expect("a warning").field,
        };
        assert_eq!(field("  targetRef: {kind: Service, name: nope}\n  tokensPerInterval: 1\n  interval: 1s\n"), "spec.targetRef.name");
        assert_eq!(field("  targetRef: {kind: Service, name: reviews}\n  tokensPerInterval: 0\n  interval: 1s\n"), "spec.tokensPerInterval");
        assert_eq!(field("  targetRef: {kind: Service, name: reviews}\n  tokensPerInterval: 1\n  interval: often\n"), "spec.interval");
        assert_eq!(field("  targetRef: {kind: Service, name: reviews}\n  route: missing\n  tokensPerInterval: 1\n  interval: 1s\n"), "spec.route");
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
