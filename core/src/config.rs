//! Config as users write it: Kubernetes-style YAML documents (`v1/Service`, Istio's
//! `WorkloadEntry`, `ServiceExport`), parsed, validated once into a [`ConfigSet`], and
//! watched on disk.
//!
//! Validation is the same code for `isthmus validate -f DIR` and the controller's file
//! adapter. Every fault names its file, document and field, with a stable code; a set with
//! any fault is rejected whole, so the set that is serving is never replaced by a bad one.

pub mod analyze;
mod assemble;
mod health_check;
mod istio;
pub mod kinds;
mod load;
pub mod mesh;
pub mod security;
pub mod sidecar;
pub mod telemetry;
mod validate;
pub mod wasm_plugin;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

pub use istio::{grpc_code, parse_duration_ms};
pub use load::{
    admit, admit_on, load_dir, load_files, parse_documents, parse_object, read_path, LastGood,
    ParsedFiles, SourceFile,
};
pub use validate::resolve_host;

use crate::locality::Locality;

/// The JSON schema of the `spec` of a mesh config kind read from Kubernetes custom
/// resources (`VirtualService`, `ServiceExport`, ...), as `generator` makes it; `None` for
/// a kind that is not a custom resource.
#[cfg(feature = "schema")]
pub fn spec_schema(
    kind: &str,
    generator: &mut schemars::SchemaGenerator,
) -> Option<schemars::Schema> {
    Some(match kind {
        "VirtualService" => generator.root_schema_for::<istio::VirtualServiceSpec>(),
        "DestinationRule" => generator.root_schema_for::<istio::DestinationRuleSpec>(),
        "ServiceEntry" => generator.root_schema_for::<istio::ServiceEntrySpec>(),
        "Sidecar" => generator.root_schema_for::<sidecar::SidecarSpec>(),
        "PeerAuthentication" => generator.root_schema_for::<security::PeerAuthenticationSpec>(),
        "AuthorizationPolicy" => generator.root_schema_for::<security::AuthorizationPolicySpec>(),
        "RequestAuthentication" => {
            generator.root_schema_for::<security::RequestAuthenticationSpec>()
        }
        "Telemetry" => generator.root_schema_for::<telemetry::TelemetrySpec>(),
        "WorkloadEntry" => generator.root_schema_for::<kinds::WorkloadEntrySpec>(),
        "ServiceExport" => generator.root_schema_for::<kinds::ServiceExportSpec>(),
        "LocalRateLimit" => generator.root_schema_for::<kinds::LocalRateLimitSpec>(),
        "GlobalRateLimit" => generator.root_schema_for::<kinds::GlobalRateLimitSpec>(),
        "HealthCheck" => generator.root_schema_for::<kinds::HealthCheckSpec>(),
        "WasmPlugin" => generator.root_schema_for::<wasm_plugin::WasmPluginSpec>(),
        _ => return None,
    })
}

/// Default namespace of documents that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A namespaced name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl NamespacedName {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Application protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
    /// Not declared (no `appProtocol`, no protocol prefix on the port's name): an app's
    /// explicit requests are HTTP, and a captured connection is sniffed, HTTP when its
    /// first bytes are, opaque TCP otherwise (Istio's protocol detection).
    Unspecified,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
            Protocol::Unspecified => "auto",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "http" => Some(Protocol::Http),
            "http2" | "h2c" => Some(Protocol::Http2),
            "grpc" => Some(Protocol::Grpc),
            "tcp" => Some(Protocol::Tcp),
            _ => None,
        }
    }
}

/// The port a service port forwards to on its workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A port name, resolved through each WorkloadEntry's `ports` map.
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: NamespacedName,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
    /// Istio's `networking.istio.io/exportTo` annotation: the namespaces whose workloads
    /// see the service (`.` its own, `*` all, `~` none); empty means all.
    pub export_to: Vec<String>,
    /// A ServiceEntry's hosts: further names of the service (exact, or `*.suffix`).
    pub hosts: Vec<String>,
    /// A ServiceEntry's addresses: IPs or CIDRs a caller may name the service by.
    pub addresses: Vec<String>,
    /// Set for a `MESH_EXTERNAL` ServiceEntry: outside the mesh, reached directly.
    pub external: Option<External>,
    /// A headless Service (`clusterIP: None`): its name resolves to its endpoints'
    /// addresses, and each endpoint has a name of its own under it.
    pub headless: bool,
}

/// How a `MESH_EXTERNAL` service's addresses are found (Istio's `resolution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The address the caller asked for.
    None,
    /// The endpoints' IP addresses.
    Static,
    /// The endpoints' names (or the host itself) resolved by DNS when connecting.
    Dns,
    /// As `Dns`, one name.
    DnsRoundRobin,
}

impl Resolution {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "NONE" => Some(Resolution::None),
            "STATIC" => Some(Resolution::Static),
            "DNS" => Some(Resolution::Dns),
            "DNS_ROUND_ROBIN" => Some(Resolution::DnsRoundRobin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::None => "NONE",
            Resolution::Static => "STATIC",
            Resolution::Dns => "DNS",
            Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
        }
    }
}

/// A service outside the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct External {
    pub resolution: Resolution,
    pub endpoints: Vec<ExternalEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalEndpoint {
    /// An IP address or a DNS name.
    pub address: String,
    /// Port name → the endpoint's own port number, when it differs.
    pub ports: BTreeMap<String, u16>,
}

/// The annotation that scopes a Service's visibility, as Istio reads it.
pub const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";

/// Whether `s` is one DNS label as Kubernetes allows it (RFC 1123: lower-case letters,
/// digits and inner hyphens, at most 63).
pub fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An endpoint's DNS label under a headless service, as Kubernetes DNS names it: its
/// hostname, else its address with dashes (`10-1-0-5`, `fd00--5`).
pub fn endpoint_label(hostname: Option<&str>, ip: std::net::IpAddr) -> String {
    match hostname.filter(|h| !h.is_empty()) {
        Some(h) => h.to_owned(),
        None => ip.to_string().replace(['.', ':'], "-"),
    }
}

/// Whether a label selector picks a workload with `labels`: every key, with its value (an
/// empty selector picks all; callers that read empty as "none" say so).
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a workload of `namespace` may see a service of `owner` exported to `export_to`.
pub fn visible(export_to: &[String], owner: &str, namespace: &str) -> bool {
    export_to.is_empty()
        || export_to.iter().any(|e| match e.as_str() {
            "*" => true,
            "." => owner == namespace,
            "~" => false,
            ns => ns == namespace,
        })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadEntry {
    pub key: NamespacedName,
    pub address: IpAddr,
    /// Named ports (a pod's named container ports), which named target ports resolve to.
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    pub locality: Locality,
    pub service_account: String,
    /// The workload a pod belongs to, as Istio's telemetry names it: its Deployment,
    /// StatefulSet, DaemonSet or Job, else the pod itself. `None` for a WorkloadEntry.
    pub owner: Option<String>,
}

/// One endpoint of a service as the platform lists it (an entry of a Kubernetes
/// EndpointSlice): the workload behind it and whether it may take new requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub workload: NamespacedName,
    /// Ready and not terminating (`conditions.ready` of the EndpointSlice).
    pub ready: bool,
    /// The endpoint's own DNS label under a headless Service (the EndpointSlice's
    /// `hostname`: a StatefulSet pod's name, or a pod's `spec.hostname`).
    pub hostname: Option<String>,
}

/// What a platform adapter reads from the platform itself rather than from config
/// documents: its services, its workloads (pods), and which workloads each service's
/// endpoints are. Admission starts from it and adds the config documents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Platform {
    pub services: BTreeMap<NamespacedName, Service>,
    pub workloads: BTreeMap<NamespacedName, WorkloadEntry>,
    pub endpoints: BTreeMap<NamespacedName, Vec<Endpoint>>,
}

/// A workload serving a service, and whether it may take new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    pub workload: &'a WorkloadEntry,
    pub ready: bool,
    /// See [`Endpoint::hostname`].
    pub hostname: Option<&'a str>,
}

/// One validated, consistent set of documents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigSet {
    pub services: BTreeMap<NamespacedName, Service>,
    pub workloads: BTreeMap<NamespacedName, WorkloadEntry>,
    /// Services whose endpoints the platform lists (Kubernetes EndpointSlices), by service.
    /// A service not here is served by the workloads its selector picks.
    pub endpoints: BTreeMap<NamespacedName, Vec<Endpoint>>,
    pub exports: BTreeSet<NamespacedName>,
    /// VirtualService and DestinationRule settings, by the service they apply to.
    pub routing: BTreeMap<NamespacedName, crate::routing::ServiceRouting>,
    /// Documents passed over, and why (`file: document N (Kind ns/name): ...`): kinds that
    /// are not mesh config, such as a Deployment in an application's manifest.
    pub notes: Vec<String>,
    /// Istio `Sidecar`s: what the proxies they select are pushed.
    pub sidecars: BTreeMap<NamespacedName, sidecar::SidecarScope>,
    /// `PeerAuthentication`s (see `security.rs`).
    pub peer_authentications: BTreeMap<NamespacedName, security::PeerAuthn>,
    /// `AuthorizationPolicy`s (see `security.rs`).
    pub authorization_policies: BTreeMap<NamespacedName, security::AuthzScope>,
    /// `RequestAuthentication`s (see `security.rs`).
    pub request_authentications: BTreeMap<NamespacedName, security::AuthnScope>,
    /// `Telemetry`s (see `telemetry.rs`).
    pub telemetries: BTreeMap<NamespacedName, telemetry::TelemetryScope>,
    /// `WasmPlugin`s (see `wasm_plugin.rs`).
    pub wasm_plugins: BTreeMap<NamespacedName, wasm_plugin::WasmPluginScope>,
    /// The mesh config (ConfigMap `istio` of `istio-system`; see `mesh.rs`).
    pub mesh: mesh::MeshSettings,
    /// References to objects that do not exist (yet): a VirtualService naming an unknown
    /// host or subset, a ServiceExport with no Service. Requests they route get 503.
    pub warnings: Vec<ConfigError>,
}

/// Workloads by (namespace, label key, label value): what a selector's first label picks,
/// so that selecting for every service costs the workloads selected, not all of them each
/// time. Build it once per config set with [`ConfigSet::selection`].
pub struct Selection<'a> {
    by_label: std::collections::HashMap<(&'a str, &'a str, &'a str), Vec<&'a WorkloadEntry>>,
    workloads: &'a BTreeMap<NamespacedName, WorkloadEntry>,
    endpoints: &'a BTreeMap<NamespacedName, Vec<Endpoint>>,
}

impl<'a> Selection<'a> {
    /// The workloads serving `svc`: its endpoints as the platform lists them, else the
    /// workloads its selector picks (all ready; their sidecars report their health).
    pub fn members(&self, svc: &'a Service) -> Vec<Member<'a>> {
        match self.endpoints.get(&svc.key) {
            Some(eps) => eps
                .iter()
                .filter_map(|ep| {
                    let workload = self.workloads.get(&ep.workload)?;
                    Some(Member {
                        workload,
                        ready: ep.ready,
                        hostname: ep.hostname.as_deref(),
                    })
                })
                .collect(),
            None => self
                .selected(svc)
                .into_iter()
                .map(|workload| Member {
                    workload,
                    ready: true,
                    hostname: None,
                })
                .collect(),
        }
    }

    /// Workloads `svc` selects, as [`ConfigSet::selected`] finds them.
    pub fn selected(&self, svc: &'a Service) -> Vec<&'a WorkloadEntry> {
        let Some((k, v)) = svc.selector.iter().next() else {
            return Vec::new();
        };
        self.by_label
            .get(&(svc.key.namespace.as_str(), k.as_str(), v.as_str()))
            .map(|ws| {
                ws.iter()
                    .copied()
                    .filter(|w| selects(&svc.selector, &w.labels))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl ConfigSet {
    /// An index for selecting workloads of many services (see [`Selection`]).
    pub fn selection(&self) -> Selection<'_> {
        let mut by_label: std::collections::HashMap<_, Vec<&WorkloadEntry>> =
            std::collections::HashMap::new();
        for w in self.workloads.values() {
            for (k, v) in &w.labels {
                by_label
                    .entry((w.key.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(w);
            }
        }
        Selection {
            by_label,
            workloads: &self.workloads,
            endpoints: &self.endpoints,
        }
    }

    /// The service `host` names, seen from `namespace`: a Kubernetes-style name of a
    /// Service, else a ServiceEntry host (exact first, then the longest `*.` suffix).
    pub fn service_for_host(&self, host: &str, namespace: &str) -> Option<NamespacedName> {
        if let Some(k) = resolve_host(host, namespace).filter(|k| self.services.contains_key(k)) {
            return Some(k);
        }
        let mut best: Option<(usize, &NamespacedName)> = None;
        for svc in self.services.values() {
            for h in &svc.hosts {
                let score = if h == host {
                    usize::MAX
                } else if let Some(suffix) = h.strip_prefix('*') {
                    if host.ends_with(suffix) && host.len() > suffix.len() {
                        suffix.len()
                    } else {
                        continue;
                    }
                } else {
                    continue;
                };
                if best.is_none_or(|(s, _)| score > s) {
                    best = Some((score, &svc.key));
                }
            }
        }
        best.map(|(_, k)| k.clone())
    }

    /// Workloads a service selects: every label of the selector must match.
    pub fn selected<'a>(
        &'a self,
        svc: &'a Service,
    ) -> impl Iterator<Item = &'a WorkloadEntry> + 'a {
        self.workloads.values().filter(move |w| {
            w.key.namespace == svc.key.namespace
                && !svc.selector.is_empty()
                && selects(&svc.selector, &w.labels)
        })
    }
}

/// Stable codes of config faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The file is not valid YAML.
    Syntax,
    /// apiVersion/kind is missing or not a kind Isthmus reads.
    UnknownKind,
    /// A field has the wrong type or is not supported.
    Schema,
    /// A value is out of range or malformed.
    InvalidValue,
    /// A required field is missing.
    Missing,
    /// Two documents define the same object.
    Duplicate,
    /// A document refers to something that does not exist (yet): a warning.
    Reference,
    /// The file cannot be read.
    Io,
    /// A deprecated field Istio still accepts: accepted and mapped as Istio maps it (a
    /// warning).
    Deprecated,
    /// A field Isthmus accepts but does not act on (a warning).
    Ignored,
}

impl Code {
    /// Warnings leave their object admitted; every other code rejects it.
    pub fn is_warning(self) -> bool {
        matches!(self, Code::Reference | Code::Deprecated | Code::Ignored)
    }

    /// The code as printed: Istio's analyzer code where Istio has one (`IST0101`
    /// ReferencedResourceNotFound, `IST0106` SchemaValidationError, `IST0002` Deprecated),
    /// so scripts written for `istioctl analyze` read these too; Isthmus's own codes for
    /// the rest, from `IST1001`, clear of Istio's range.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Schema | Code::InvalidValue | Code::Missing => "IST0106",
            Code::Reference => "IST0101",
            Code::Deprecated => "IST0002",
            Code::Syntax => "IST1001",
            Code::UnknownKind => "IST1002",
            Code::Duplicate => "IST1003",
            Code::Io => "IST1004",
            Code::Ignored => "IST1005",
        }
    }
}

/// One fault, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based index of the document in its file.
    pub document: usize,
    /// `Kind namespace/name` of the document when known.
    pub object: Option<String>,
    /// Dotted path of the field, empty for the document as a whole.
    pub field: String,
    pub code: Code,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)?;
        if let Some(obj) = &self.object {
            write!(f, " ({obj})")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {} [{}]", self.message, self.code.as_str())
    }
}

/// All faults of a rejected set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
