//! Reading documents from files: YAML parsing, the kind dispatch and per-document schema.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::istio::{DestinationRuleSpec, VirtualServiceSpec};
use super::kinds::{
    Head, LocalRateLimitSpec, Metadata, ServiceExportSpec, ServiceSpec, WorkloadEntrySpec,
};
use super::validate::{self, Document, DocumentBody};
use super::{Code, ConfigError, ConfigErrors, ConfigSet};

/// One file's name (as shown in messages) and contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub name: String,
    pub contents: String,
}

fn kind_of(api_version: &str, kind: &str) -> Option<&'static str> {
    match (api_version, kind) {
        ("v1", "Service") => Some("Service"),
        (
            "networking.istio.io/v1"
            | "networking.istio.io/v1beta1"
            | "networking.istio.io/v1alpha3",
            "WorkloadEntry",
        ) => Some("WorkloadEntry"),
        ("multicluster.x-k8s.io/v1alpha1", "ServiceExport") => Some("ServiceExport"),
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
            Some("PeerAuthentication")
        }
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
            Some("AuthorizationPolicy")
        }
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "RequestAuthentication") => {
            Some("RequestAuthentication")
        }
        ("isthmus.io/v1alpha1", "LocalRateLimit") => Some("LocalRateLimit"),
        ("isthmus.io/v1alpha1", "GlobalRateLimit") => Some("GlobalRateLimit"),
        ("isthmus.io/v1alpha1", "HealthCheck") => Some("HealthCheck"),
        ("extensions.istio.io/v1alpha1", "WasmPlugin") => Some("WasmPlugin"),
        ("telemetry.istio.io/v1" | "telemetry.istio.io/v1alpha1", "Telemetry") => Some("Telemetry"),
        (
            "networking.istio.io/v1"
            | "networking.istio.io/v1beta1"
            | "networking.istio.io/v1alpha3",
            "VirtualService",
        ) => Some("VirtualService"),
        (
            "networking.istio.io/v1"
            | "networking.istio.io/v1beta1"
            | "networking.istio.io/v1alpha3",
            "DestinationRule",
        ) => Some("DestinationRule"),
        (
            "networking.istio.io/v1"
            | "networking.istio.io/v1beta1"
            | "networking.istio.io/v1alpha3",
            "Sidecar",
        ) => Some("Sidecar"),
        (
            "networking.istio.io/v1"
            | "networking.istio.io/v1beta1"
            | "networking.istio.io/v1alpha3",
            "ServiceEntry",
        ) => Some("ServiceEntry"),
        _ => None,
    }
}

/// API groups whose kinds are mesh config: an unknown kind there is an error (it would not
/// act as its author expects); kinds of other groups (Deployment, ConfigMap, ...) are
/// passed over with a note, so a whole application manifest validates.
fn mesh_group(api_version: &str) -> bool {
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    matches!(
        group,
        "networking.istio.io"
            | "security.istio.io"
            | "telemetry.istio.io"
            | "extensions.istio.io"
            | "isthmus.io"
            | "multicluster.x-k8s.io"
            | "gateway.networking.k8s.io"
    )
}

/// What one document is.
enum Parsed {
    Document(Box<Document>),
    /// Not mesh config: the note says what was passed over.
    Skipped(String),
    /// An empty document (`---` with nothing after it).
    Empty,
}

fn decode<T: DeserializeOwned>(
    value: serde_yaml_ng::Value,
    base: &str,
) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            base.to_owned()
        } else {
            format!("{base}.{path}")
        };
        (field, e.into_inner().to_string())
    })
}

fn parse_document(
    file: &str,
    index: usize,
    value: serde_yaml_ng::Value,
) -> Result<Parsed, ConfigError> {
    let mut err = ConfigError {
        file: file.to_owned(),
        document: index,
        object: None,
        field: String::new(),
        code: Code::Schema,
        message: String::new(),
    };
    if value.is_null() {
        return Ok(Parsed::Empty);
    }
    let head: Head = match decode(value.clone(), "") {
        Ok(h) => h,
        Err((_, message)) => {
            return Err(ConfigError {
                message: format!("not a Kubernetes-style document: {message}"),
                ..err
            })
        }
    };
    let (Some(api_version), Some(kind)) = (head.api_version.as_deref(), head.kind.as_deref())
    else {
        return Err(ConfigError {
            code: Code::Missing,
            field: "apiVersion".into(),
            message: "apiVersion and kind are required".into(),
            ..err
        });
    };
    let mesh_config = api_version == "v1"
        && kind == "ConfigMap"
        && super::mesh::is_mesh_config(&head.metadata.name, head.metadata.namespace.as_deref());
    let Some(kind) = kind_of(api_version, kind).or(mesh_config.then_some("ConfigMap")) else {
        if !mesh_group(api_version) {
            let name = head.metadata.name.as_str();
            return Ok(Parsed::Skipped(format!(
                "{file}: document {index} ({kind} {name}): {kind} ({api_version}) is not mesh config; skipped"
            )));
        }
        return Err(ConfigError {
            code: Code::UnknownKind,
            field: "kind".into(),
            message: format!("{kind} ({api_version}) is not a kind Isthmus reads; supported: v1/Service, networking.istio.io/v1 WorkloadEntry, VirtualService, DestinationRule, Sidecar, ServiceEntry, security.istio.io/v1 PeerAuthentication, AuthorizationPolicy, RequestAuthentication, telemetry.istio.io/v1 Telemetry, extensions.istio.io/v1alpha1 WasmPlugin, multicluster.x-k8s.io/v1alpha1/ServiceExport, isthmus.io/v1alpha1/LocalRateLimit, GlobalRateLimit, HealthCheck"),
            ..err
        });
    };
    let metadata: Metadata = head.metadata;
    err.object = Some(format!(
        "{kind} {}/{}",
        metadata
            .namespace
            .as_deref()
            .unwrap_or(super::DEFAULT_NAMESPACE),
        metadata.name
    ));
    let spec = value
        .get("spec")
        .cloned()
        .unwrap_or(serde_yaml_ng::Value::Mapping(Default::default()));
    if let serde_yaml_ng::Value::Mapping(top) = &value {
        for key in top.keys() {
            let k = key.as_str().unwrap_or_default();
            let allowed = if mesh_config {
                matches!(
                    k,
                    "apiVersion" | "kind" | "metadata" | "data" | "binaryData" | "immutable"
                )
            } else {
                matches!(k, "apiVersion" | "kind" | "metadata" | "spec" | "status")
            };
            if !allowed {
                return Err(ConfigError {
                    field: k.to_owned(),
                    message: format!("unknown top-level field `{k}`"),
                    ..err
                });
            }
        }
    }
    let body = match kind {
        "Service" => decode::<ServiceSpec>(spec, "spec").map(DocumentBody::Service),
        "WorkloadEntry" => {
            decode::<WorkloadEntrySpec>(spec, "spec").map(DocumentBody::WorkloadEntry)
        }
        "VirtualService" => decode::<VirtualServiceSpec>(spec, "spec")
            .map(|s| DocumentBody::VirtualService(Box::new(s))),
        "LocalRateLimit" => {
            decode::<LocalRateLimitSpec>(spec, "spec").map(DocumentBody::LocalRateLimit)
        }
        "GlobalRateLimit" => decode::<super::kinds::GlobalRateLimitSpec>(spec, "spec")
            .map(DocumentBody::GlobalRateLimit),
        "HealthCheck" => {
            decode::<super::kinds::HealthCheckSpec>(spec, "spec").map(DocumentBody::HealthCheck)
        }
        "WasmPlugin" => decode::<super::wasm_plugin::WasmPluginSpec>(spec, "spec")
            .map(|s| DocumentBody::WasmPlugin(Box::new(s))),
        "DestinationRule" => decode::<DestinationRuleSpec>(spec, "spec")
            .map(|s| DocumentBody::DestinationRule(Box::new(s))),
        "Sidecar" => decode::<super::sidecar::SidecarSpec>(spec, "spec")
            .map(|s| DocumentBody::Sidecar(Box::new(s))),
        "ServiceEntry" => decode::<super::istio::ServiceEntrySpec>(spec, "spec")
            .map(|s| DocumentBody::ServiceEntry(Box::new(s))),
        "PeerAuthentication" => decode::<super::security::PeerAuthenticationSpec>(spec, "spec")
            .map(|s| DocumentBody::PeerAuthentication(Box::new(s))),
        "AuthorizationPolicy" => decode::<super::security::AuthorizationPolicySpec>(spec, "spec")
            .map(|s| DocumentBody::AuthorizationPolicy(Box::new(s))),
        "RequestAuthentication" => {
            decode::<super::security::RequestAuthenticationSpec>(spec, "spec")
                .map(|s| DocumentBody::RequestAuthentication(Box::new(s)))
        }
        "Telemetry" => decode::<super::telemetry::TelemetrySpec>(spec, "spec")
            .map(|s| DocumentBody::Telemetry(Box::new(s))),
        "ConfigMap" => mesh_config_of(&value).map(|s| DocumentBody::MeshConfig(Box::new(s))),
        _ => decode::<ServiceExportSpec>(spec, "spec").map(|_| DocumentBody::ServiceExport),
    };
    match body {
        Ok(body) => Ok(Parsed::Document(Box::new(Document {
            file: file.to_owned(),
            index,
            metadata,
            body,
        }))),
        Err((field, message)) => Err(ConfigError {
            field,
            message,
            ..err
        }),
    }
}

/// The mesh config in the `mesh` key of Istio's ConfigMap (empty without one).
fn mesh_config_of(
    value: &serde_yaml_ng::Value,
) -> Result<super::mesh::MeshConfigSpec, (String, String)> {
    let Some(mesh) = value.get("data").and_then(|d| d.get("mesh")) else {
        return Ok(Default::default());
    };
    let text = mesh
        .as_str()
        .ok_or_else(|| ("data.mesh".to_owned(), "not a string of YAML".to_owned()))?;
    let parsed: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)
        .map_err(|e| ("data.mesh".to_owned(), format!("not YAML: {e}")))?;
    if parsed.is_null() {
        return Ok(Default::default());
    }
    decode(parsed, "data.mesh")
}

/// What parsing files gave: their documents, the faults of those that did not parse, and
/// notes on what was passed over.
#[derive(Debug, Clone, Default)]
pub struct ParsedFiles {
    pub documents: Vec<Document>,
    pub errors: Vec<ConfigError>,
    pub notes: Vec<String>,
}

impl ParsedFiles {
    /// Appends another file's results.
    pub fn extend(&mut self, other: &ParsedFiles) {
        self.documents.extend(other.documents.iter().cloned());
        self.errors.extend(other.errors.iter().cloned());
        self.notes.extend(other.notes.iter().cloned());
    }
}

/// Parses every document of one file, collecting all faults.
pub fn parse_file(file: &SourceFile) -> ParsedFiles {
    let mut out = ParsedFiles::default();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(&file.contents).enumerate() {
        let index = i + 1;
        let value = match <serde_yaml_ng::Value as serde::Deserialize>::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                out.errors.push(ConfigError {
                    file: file.name.clone(),
                    document: index,
                    object: None,
                    field: String::new(),
                    code: Code::Syntax,
                    message: format!("invalid YAML: {e}"),
                });
                break;
            }
        };
        match parse_document(&file.name, index, value) {
            Ok(Parsed::Document(doc)) => out.documents.push(*doc),
            Ok(Parsed::Skipped(note)) => out.notes.push(note),
            Ok(Parsed::Empty) => {}
            Err(e) => out.errors.push(e),
        }
    }
    out
}

/// Parses one object read from a platform's API (a Kubernetes custom resource), named in
/// faults by `source` (where it came from) as a one-document file would be.
pub fn parse_object(source: &str, value: serde_yaml_ng::Value) -> ParsedFiles {
    let mut out = ParsedFiles::default();
    match parse_document(source, 1, value) {
        Ok(Parsed::Document(doc)) => out.documents.push(*doc),
        Ok(Parsed::Skipped(note)) => out.notes.push(note),
        Ok(Parsed::Empty) => {}
        Err(e) => out.errors.push(e),
    }
    out
}

/// Parses every document of every file, collecting all faults.
pub fn parse_documents(files: &[SourceFile]) -> ParsedFiles {
    let mut all = ParsedFiles::default();
    for file in files {
        let one = parse_file(file);
        all.documents.extend(one.documents);
        all.errors.extend(one.errors);
        all.notes.extend(one.notes);
    }
    all
}

/// Validates a set of files as one config, strictly: any rejected object is an error (as
/// `isthmus validate` reports it); references to missing objects are warnings, kept in the
/// set.
pub fn load_files(files: &[SourceFile]) -> Result<ConfigSet, ConfigErrors> {
    let ParsedFiles {
        documents: docs,
        mut errors,
        notes,
    } = parse_documents(files);
    let admission = validate::build(docs);
    errors.extend(admission.rejected);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(ConfigSet {
        notes,
        warnings: admission.warnings,
        ..admission.set
    })
}

/// The last admitted version of every object, by `Kind namespace/name`, with the file it
/// came from: what keeps serving when a new version of an object is rejected.
#[derive(Debug, Default)]
pub struct LastGood(BTreeMap<String, Document>);

/// Admits each object of `files` on its own, as the controller does: a rejected object
/// (bad schema, bad value, a duplicate) keeps its last admitted version, or is absent if it
/// never had one; a file that is not YAML at all keeps the last admitted versions of its
/// objects; every other object applies. Returns the set and the faults of what was
/// rejected.
pub fn admit(files: &[SourceFile], last: &mut LastGood) -> (ConfigSet, Vec<ConfigError>) {
    admit_parsed(parse_documents(files), last)
}

/// [`admit`] for files already parsed (the watcher re-parses only the files that changed).
pub fn admit_parsed(parsed: ParsedFiles, last: &mut LastGood) -> (ConfigSet, Vec<ConfigError>) {
    admit_on(&super::Platform::default(), parsed, last)
}

/// [`admit_parsed`] on top of what a platform adapter read from the platform (services,
/// pods and endpoints), which the documents may refer to but not redefine.
pub fn admit_on(
    platform: &super::Platform,
    parsed: ParsedFiles,
    last: &mut LastGood,
) -> (ConfigSet, Vec<ConfigError>) {
    let ParsedFiles {
        documents: docs,
        mut errors,
        notes,
    } = parsed;
    let mut first = validate::build_on(platform, docs.clone());
    errors.append(&mut first.rejected);
    let rejected: BTreeSet<String> = errors.iter().filter_map(|e| e.object.clone()).collect();
    // Faults that name no object (not YAML, no kind, an unknown mesh kind): the objects
    // last admitted from that place keep serving; a YAML syntax error stops the whole file.
    let unreadable: BTreeSet<&str> = errors
        .iter()
        .filter(|e| e.code == Code::Syntax)
        .map(|e| e.file.as_str())
        .collect();
    let unnamed: BTreeSet<(&str, usize)> = errors
        .iter()
        .filter(|e| e.object.is_none())
        .map(|e| (e.file.as_str(), e.document))
        .collect();
    let mut kept: Vec<Document> = docs
        .into_iter()
        .filter(|d| !rejected.contains(&d.object()))
        .collect();
    let present: BTreeSet<String> = kept.iter().map(Document::object).collect();
    for (object, doc) in &last.0 {
        let fell_back = rejected.contains(object)
            || unreadable.contains(doc.file.as_str())
            || unnamed.contains(&(doc.file.as_str(), doc.index));
        if fell_back && !present.contains(object) {
            kept.push(doc.clone());
        }
    }
    let admission = if errors.is_empty() {
        first
    } else {
        validate::build_on(platform, kept.clone())
    };
    let failed: BTreeSet<String> = admission
        .rejected
        .iter()
        .filter_map(|e| e.object.clone())
        .collect();
    last.0 = kept
        .into_iter()
        .filter(|d| !failed.contains(&d.object()))
        .map(|d| (d.object(), d))
        .collect();
    let set = ConfigSet {
        notes,
        warnings: admission.warnings,
        ..admission.set
    };
    (set, errors)
}

/// Every `*.yaml`/`*.yml` file under `dir`, recursively, skipping dot-files and
/// dot-folders (editor swap files, Kubernetes ConfigMap `..data` links).
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigErrors> {
    let mut paths = Vec::new();
    collect(dir, &mut paths).map_err(|e| io_err(dir, e))?;
    paths.sort();
    Ok(paths)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue; // editor swap files, Kubernetes ConfigMap ..data links
        }
        if path.is_dir() {
            collect(&path, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(path);
        }
    }
    Ok(())
}

/// A file or folder that cannot be read.
pub fn io_err(file: &Path, e: std::io::Error) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file: file.display().to_string(),
        document: 0,
        object: None,
        field: String::new(),
        code: Code::Io,
        message: format!("cannot read: {e}"),
    }])
}

/// Reads every `*.yaml`/`*.yml` file under `dir` (recursively, sorted by path).
pub fn read_dir(dir: &Path) -> Result<Vec<SourceFile>, ConfigErrors> {
    yaml_files(dir)?
        .into_iter()
        .map(|p| {
            let contents = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
            Ok(SourceFile {
                name: p.display().to_string(),
                contents,
            })
        })
        .collect()
}

/// Reads a file, or every `*.yaml`/`*.yml` file under a folder.
pub fn read_path(path: &Path) -> Result<Vec<SourceFile>, ConfigErrors> {
    if path.is_dir() {
        return read_dir(path);
    }
    let contents = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    Ok(vec![SourceFile {
        name: path.display().to_string(),
        contents,
    }])
}

/// Reads and validates every document under `dir`.
pub fn load_dir(dir: &Path) -> Result<ConfigSet, ConfigErrors> {
    load_files(&read_dir(dir)?)
}
