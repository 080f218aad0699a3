//! A stand-in Kubernetes API server, for tests: no kube-apiserver runs on these machines.
//!
//! What it does, as kube-apiserver does it:
//! - HTTPS with its own CA, and bearer-token authentication (401 without the token). A
//!   controller reaches it through a kubeconfig file ([`ApiServer::kubeconfig`]) the way it
//!   reaches a real cluster.
//! - The REST paths kube-rs uses: `/api/v1/...` and `/apis/<group>/<version>/...`, all
//!   namespaces or one, cluster-scoped kinds. Discovery documents list the served kinds.
//! - Objects are stored as JSON and decoded by clients into real `k8s-openapi` types. The
//!   server sets `uid`, `resourceVersion`, `creationTimestamp` and `generation`. Create,
//!   get, replace (a stale `resourceVersion` is 409 Conflict), merge patch, delete, and the
//!   `status` subresource, which alone changes `status`. Errors are `Status` objects with
//!   Kubernetes's reasons and codes.
//! - List carries the collection's `resourceVersion`. `labelSelector` supports equality
//!   and existence terms.
//! - Watch, from a `resourceVersion`: ADDED, MODIFIED and DELETED events in order.
//!   BOOKMARK events come when asked for. `timeoutSeconds` is honoured. A resourceVersion
//!   older than the kept history gets the `ERROR` event with 410 Expired, after which
//!   clients list again. [`ApiServer::compact`] drops the history and
//!   [`ApiServer::break_watches`] cuts every open watch, so tests can force both.
//! - Admission webhooks, mutating then validating (by URL or by service reference
//!   through [`ApiServer::route_service`], with their rules, namespace and object
//!   selectors; JSON patches applied), are called on create and update, after the object is computed and before it is stored, with an
//!   AdmissionReview over HTTPS verified against the webhook's `caBundle`. A denial
//!   answers as kube-apiserver words it: `admission webhook "<name>" denied the request:`.
//! - TokenReview for the service-account tokens it issues ([`ApiServer::service_account_token`],
//!   JWTs with Kubernetes's claims, signed with the server's own key): signature, expiry
//!   and audience checked, `system:serviceaccount:<ns>:<name>` answered.
//! - RBAC: ClusterRoles, Roles and their bindings are enforced for every user but
//!   [`ADMIN`] (a ServiceAccount subject binds `system:serviceaccount:<ns>:<name>`), with
//!   kube-apiserver's 403 message. An access log records every request (credential, user,
//!   verb, resource, name, status); [`ApiServer::kubeconfig_for`] makes credentials.
//! - Creating a CustomResourceDefinition serves its kind at every served version (objects
//!   stored once, `apiVersion` as asked).
//! - Kinds not registered answer 404, as an uninstalled CRD does.
//!
//! What it does not do: no controllers run in it (tests write EndpointSlices as
//! kube-controller-manager would, and create Pods rather than Deployments), no garbage
//! collection or finalizers, no strategic-merge semantics (strategic and apply patches
//! are applied as JSON merge patches), no JSON patch from clients, no field selectors, no
//! pagination (`limit` is ignored and every item comes in one page). Webhooks'
//! `matchPolicy`, `matchConditions` and reinvocation are not modelled.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::sync::mpsc;

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// A kind the server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kind {
    pub group: String,
    /// The versions it is served at; objects are stored at the first.
    pub versions: Vec<String>,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
}

impl Kind {
    pub fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_owned(),
            versions: vec![version.to_owned()],
            kind: kind.to_owned(),
            plural: plural.to_owned(),
            namespaced,
        }
    }

    /// The stored version.
    fn version(&self) -> &str {
        &self.versions[0]
    }

    fn api_version_at(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    fn api_version(&self) -> String {
        self.api_version_at(self.version())
    }

    fn serves(&self, group: &str, version: &str, plural: &str) -> bool {
        self.group == group && self.plural == plural && self.versions.iter().any(|v| v == version)
    }

    /// The kind a CustomResourceDefinition defines.
    fn of_crd(crd: &Value) -> Option<Self> {
        let spec = &crd["spec"];
        let mut versions: Vec<(bool, String)> = spec["versions"]
            .as_array()?
            .iter()
            .filter(|v| v["served"] == true)
            .filter_map(|v| Some((v["storage"] != true, v["name"].as_str()?.to_owned())))
            .collect();
        versions.sort_by_key(|(not_stored, _)| *not_stored);
        Some(Self {
            group: spec["group"].as_str()?.to_owned(),
            versions: versions.into_iter().map(|(_, v)| v).collect(),
            kind: spec["names"]["kind"].as_str()?.to_owned(),
            plural: spec["names"]["plural"].as_str()?.to_owned(),
            namespaced: spec["scope"] == "Namespaced",
        })
        .filter(|k| !k.versions.is_empty())
    }
}

/// The built-in kinds: what the mesh reads and writes, and what `isthmus install`
/// renders. Custom resources are served once their CRD is created.
pub fn builtin() -> Vec<Kind> {
    let core =
        |kind: &str, plural: &str, namespaced: bool| Kind::new("", "v1", kind, plural, namespaced);
    vec![
        core("Service", "services", true),
        core("Pod", "pods", true),
        core("Node", "nodes", false),
        core("Namespace", "namespaces", false),
        core("Event", "events", true),
        core("ConfigMap", "configmaps", true),
        core("Secret", "secrets", true),
        core("ServiceAccount", "serviceaccounts", true),
        Kind::new("apps", "v1", "Deployment", "deployments", true),
        Kind::new("apps", "v1", "StatefulSet", "statefulsets", true),
        Kind::new(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
            false,
        ),
        Kind::new(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
        ),
        Kind::new("rbac.authorization.k8s.io", "v1", "Role", "roles", true),
        Kind::new(
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
            "rolebindings",
            true,
        ),
        Kind::new(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        ),
        Kind::new(
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingWebhookConfiguration",
            "validatingwebhookconfigurations",
            false,
        ),
        Kind::new(
            "admissionregistration.k8s.io",
            "v1",
            "MutatingWebhookConfiguration",
            "mutatingwebhookconfigurations",
            false,
        ),
        Kind::new(
            "authentication.k8s.io",
            "v1",
            "TokenReview",
            "tokenreviews",
            false,
        ),
        Kind::new("coordination.k8s.io", "v1", "Lease", "leases", true),
        Kind::new(
            "discovery.k8s.io",
            "v1",
            "EndpointSlice",
            "endpointslices",
            true,
        ),
    ]
}

/// How many events each kind keeps for watches that resume.
const HISTORY: usize = 10_000;
/// How often a watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

struct Collection {
    kind: Kind,
    /// By (namespace, name); cluster-scoped objects have an empty namespace.
    objects: BTreeMap<(String, String), Value>,
    /// Events after `oldest`, for resuming watches: (resourceVersion, type, object).
    history: VecDeque<(u64, &'static str, Value)>,
    /// Watches of resourceVersions below this get 410 Gone.
    oldest: u64,
    watchers: Vec<Watcher>,
}

struct Watcher {
    namespace: Option<String>,
    selector: Selector,
    /// The apiVersion the watch asked for.
    api_version: String,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    collections: Vec<Collection>,
}

/// A write checked by the webhooks before it is committed.
struct Write {
    idx: usize,
    key: (String, String),
    event: &'static str,
    obj: Value,
    /// The resourceVersion the write was computed from; `None` for a create.
    expect: Option<String>,
    code: StatusCode,
    old: Option<Value>,
    /// Whether validating webhooks see it (creates and updates, not status writes).
    admit: bool,
    /// The apiVersion the request was made at, for the response.
    api_version: String,
}

/// The user every test client and the harness act as: allowed everything.
pub const ADMIN: &str = "admin";

/// One request as the access log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Which kubeconfig made it.
    pub credential: String,
    pub user: String,
    /// As RBAC names it: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`.
    pub verb: &'static str,
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: String,
    pub name: String,
    /// The HTTP status answered (403 when RBAC refused it).
    pub code: u16,
}

struct Shared {
    store: Mutex<Store>,
    /// Bearer tokens and who they authenticate: (credential, user).
    users: Mutex<HashMap<String, (String, String)>>,
    /// Where a Service's port is reached, for webhooks called by service reference.
    routes: Mutex<HashMap<(String, String, u16), SocketAddr>>,
    /// Every committed write, in order.
    access: Mutex<Vec<Access>>,
    /// Where kubeconfig files are written.
    dir: PathBuf,
    address: SocketAddr,
    ca_data: String,
    /// Signs the service-account tokens this server issues.
    signer: ring::hmac::Key,
    /// Watches answered 410 Gone.
    expired: std::sync::atomic::AtomicUsize,
}

/// A running stand-in API server.
pub struct ApiServer {
    pub address: SocketAddr,
    kubeconfig: PathBuf,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The strings of a JSON array (none when it is not one).
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Seconds since the Unix epoch, as JWT claims count time.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// `obj` as served at `api_version` (every version of a kind has one schema here).
fn at_version(obj: &Value, api_version: &str) -> Value {
    let mut o = obj.clone();
    if o.get("apiVersion").is_some() {
        o["apiVersion"] = json!(api_version);
    }
    o
}

fn line(event: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": event, "object": object})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message.into(), "reason": reason, "code": code.as_u16(),
    })
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn failure(code: StatusCode, reason: &str, message: impl Into<String>) -> Response<Body> {
    respond(code, &status(code, reason, message))
}

/// One term of a label selector.
#[derive(Clone)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

/// Label selector terms: `k=v`, `k==v`, `k!=v`, `k`, `!k`.
#[derive(Default, Clone)]
struct Selector(Vec<Term>);

impl Selector {
    fn parse(s: &str) -> Self {
        let terms = s
            .split(',')
            .filter(|t| !t.is_empty())
            .map(|t| {
                if let Some((k, v)) = t.split_once("!=") {
                    Term::NotEquals(k.to_owned(), v.to_owned())
                } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                    Term::Equals(k.to_owned(), v.to_owned())
                } else if let Some(k) = t.strip_prefix('!') {
                    Term::Absent(k.to_owned())
                } else {
                    Term::Exists(t.to_owned())
                }
            })
            .collect();
        Self(terms)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|t| match t {
            Term::Equals(k, v) => get(k) == Some(v.as_str()),
            Term::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Term::Exists(k) => get(k).is_some(),
            Term::Absent(k) => get(k).is_none(),
        })
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (_, Some(_)) => {
            *target = json!({});
            merge(target, patch);
        }
        _ => *target = patch.clone(),
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Some((k.to_owned(), percent_decode(v)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// What a path names.
struct Target {
    group: String,
    version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, r @ ..] if !r.is_empty() => (Some(ns.to_string()), r),
        r => (None, r),
    };
    let (plural, name, subresource) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    Some(Target {
        group: group.to_owned(),
        version: version.to_owned(),
        plural: plural.to_owned(),
        namespace,
        name,
        subresource,
    })
}

impl Shared {
    /// The stored objects, locked (a panic elsewhere leaves them as they were).
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `obj` at a new resourceVersion and tells the watchers.
    fn commit(
        store: &mut Store,
        idx: usize,
        key: (String, String),
        event: &'static str,
        mut obj: Value,
    ) -> Value {
        store.rv += 1;
        let rv = store.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let c = &mut store.collections[idx];
        if event == "DELETED" {
            c.objects.remove(&key);
        } else {
            c.objects.insert(key.clone(), obj.clone());
        }
        c.history.push_back((rv, event, obj.clone()));
        while c.history.len() > HISTORY {
            if let Some((old, ..)) = c.history.pop_front() {
                c.oldest = old + 1;
            }
        }
        let ns = key.0;
        c.watchers.retain(|w| {
            if w.namespace.as_ref().is_some_and(|n| *n != ns) || !w.selector.matches(&obj) {
                return !w.tx.is_closed();
            }
            w.tx.send(line(event, &at_version(&obj, &w.api_version)))
                .is_ok()
        });
        if c.kind.kind == "CustomResourceDefinition" && event != "DELETED" {
            if let Some(kind) = Kind::of_crd(&obj) {
                Self::serve_kind(store, kind);
            }
        }
        obj
    }

    /// Serves the kind a CRD defines, or updates the versions it is served at.
    fn serve_kind(store: &mut Store, kind: Kind) {
        match store
            .collections
            .iter_mut()
            .find(|c| c.kind.group == kind.group && c.kind.plural == kind.plural)
        {
            Some(c) => c.kind.versions = kind.versions,
            None => store.collections.push(Collection {
                kind,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                oldest: 0,
                watchers: Vec::new(),
            }),
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let user = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|t| {
                self.users
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(t)
                    .cloned()
            });
        let Some((credential, user)) = user else {
            return failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        };
        let path = req.uri().path().to_owned();
        if let Some(doc) = self.discovery(&path) {
            return respond(StatusCode::OK, &doc);
        }
        let Some(t) = parse_path(&path) else {
            return failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{path} not found"),
            );
        };
        let q = query(&req);
        let method = req.method().clone();
        let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
        let verb = match (&method, &t.name) {
            (&Method::GET, Some(_)) => "get",
            (&Method::GET, None) if watching => "watch",
            (&Method::GET, None) => "list",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, _) => "delete",
            _ => "unknown",
        };
        let mut access = Access {
            credential,
            user,
            verb,
            group: t.group.clone(),
            resource: t.plural.clone(),
            subresource: t.subresource.clone(),
            namespace: t.namespace.clone().unwrap_or_default(),
            name: t.name.clone().unwrap_or_default(),
            code: 0,
        };
        if !self.authorize(&access) {
            access.code = 403;
            let message = format!(
                "{}.{} \"{}\" is forbidden: User \"{}\" cannot {} resource \"{}{}\" in API group \"{}\"{}",
                access.resource, access.group, access.name, access.user, verb, access.resource,
                access.subresource.as_deref().map(|s| format!("/{s}")).unwrap_or_default(), access.group,
                if access.namespace.is_empty() { " at the cluster scope".to_owned() } else { format!(" in the namespace \"{}\"", access.namespace) },
            );
            self.log(access);
            return failure(StatusCode::FORBIDDEN, "Forbidden", message);
        }
        let resp = self.serve(req, t, q, method).await;
        access.code = resp.status().as_u16();
        self.log(access);
        resp
    }

    fn log(&self, access: Access) {
        self.access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(access);
    }

    /// Whether RBAC allows the request, as kube-apiserver's RBAC authorizer decides: a
    /// ClusterRoleBinding, or a RoleBinding in the request's namespace, binds the user (or
    /// its service account) to a role with a rule that names the group, resource (with
    /// its subresource), verb and, if the rule lists names, the object's name.
    fn authorize(&self, a: &Access) -> bool {
        if a.user == ADMIN {
            return true;
        }
        let store = self.store();
        let objects = |kind: &str| -> Vec<(&(String, String), &Value)> {
            store
                .collections
                .iter()
                .filter(|c| c.kind.kind == kind && c.kind.group == "rbac.authorization.k8s.io")
                .flat_map(|c| c.objects.iter())
                .collect()
        };
        let binds = |b: &Value| {
            b["subjects"].as_array().is_some_and(|subjects| {
                subjects.iter().any(|s| match s["kind"].as_str() {
                    Some("User") => s["name"] == a.user.as_str(),
                    Some("ServiceAccount") => {
                        format!(
                            "system:serviceaccount:{}:{}",
                            s["namespace"].as_str().unwrap_or_default(),
                            s["name"].as_str().unwrap_or_default()
                        ) == a.user
                    }
                    _ => false,
                })
            })
        };
        let resource = match &a.subresource {
            Some(sub) => format!("{}/{sub}", a.resource),
            None => a.resource.clone(),
        };
        let allows = |rule: &Value| {
            let has = |field: &str, want: &str| {
                rule[field]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|x| x == "*" || x == want))
            };
            let named = match rule["resourceNames"].as_array() {
                Some(names) if !names.is_empty() => {
                    !a.name.is_empty() && names.iter().any(|n| n == a.name.as_str())
                }
                _ => true,
            };
            has("apiGroups", &a.group)
                && has("resources", &resource)
                && has("verbs", a.verb)
                && named
        };
        let rules_of = |kind: &str, ns: &str, name: &str| -> Vec<Value> {
            objects(kind)
                .into_iter()
                .find(|((n, o), _)| n == ns && o == name)
                .and_then(|(_, role)| role["rules"].as_array().cloned())
                .unwrap_or_default()
        };
        for (_, b) in objects("ClusterRoleBinding") {
            if binds(b) && b["roleRef"]["kind"] == "ClusterRole" {
                let name = b["roleRef"]["name"].as_str().unwrap_or_default();
                if rules_of("ClusterRole", "", name).iter().any(allows) {
                    return true;
                }
            }
        }
        for ((ns, _), b) in objects("RoleBinding") {
            if *ns != a.namespace || !binds(b) {
                continue;
            }
            let name = b["roleRef"]["name"].as_str().unwrap_or_default();
            let rules = match b["roleRef"]["kind"].as_str() {
                Some("Role") => rules_of("Role", ns, name),
                _ => rules_of("ClusterRole", "", name),
            };
            if rules.iter().any(allows) {
                return true;
            }
        }
        false
    }

    /// Serves an authorized request.
    async fn serve(
        self: &Arc<Self>,
        req: Request<Incoming>,
        t: Target,
        q: HashMap<String, String>,
        method: Method,
    ) -> Response<Body> {
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return failure(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body"),
        };
        let body: Option<Value> = if body.is_empty() {
            None
        } else if content_type.contains("yaml") {
            match serde_yaml_ng::from_slice(&body) {
                Ok(v) => Some(v),
                Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
            }
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => Some(v),
                Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
            }
        };
        let planned = {
            let mut store = self.store();
            self.plan(&mut store, &t, &method, &q, body, &content_type)
        };
        match planned {
            Ok(write) => self.write(write).await,
            Err(resp) => resp,
        }
    }

    /// What a request does: a write to stage (checked by the webhooks, then committed),
    /// or the response itself (the `Err` side: large, but made once per request).
    #[allow(clippy::result_large_err)]
    fn plan(
        self: &Arc<Self>,
        store: &mut Store,
        t: &Target,
        method: &Method,
        q: &HashMap<String, String>,
        body: Option<Value>,
        content_type: &str,
    ) -> Result<Write, Response<Body>> {
        let Some(idx) = store
            .collections
            .iter()
            .position(|c| c.kind.serves(&t.group, &t.version, &t.plural))
        else {
            return Err(failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!(
                    "the server could not find the requested resource ({})",
                    t.plural
                ),
            ));
        };
        let kind = store.collections[idx].kind.clone();
        let api_version = kind.api_version_at(&t.version);
        if kind.kind == "TokenReview" {
            return Err(match (method, body) {
                (&Method::POST, Some(review)) => self.review_token(review),
                _ => failure(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    "create only",
                ),
            });
        }
        let ns = if kind.namespaced {
            t.namespace.clone()
        } else {
            None
        };
        match (method, &t.name) {
            (&Method::GET, None) => {
                let selector =
                    Selector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""));
                if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
                    return Err(self.watch(store, idx, ns, selector, q, api_version));
                }
                let rv = store.rv;
                let items: Vec<Value> = store.collections[idx]
                    .objects
                    .iter()
                    .filter(|((o_ns, _), _)| ns.as_ref().is_none_or(|n| n == o_ns))
                    .map(|(_, v)| v)
                    .filter(|v| selector.matches(v))
                    .map(|v| at_version(v, &api_version))
                    .collect();
                Err(respond(
                    StatusCode::OK,
                    &json!({"kind": format!("{}List", kind.kind), "apiVersion": api_version,
                            "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
                ))
            }
            (&Method::POST, None) => {
                let Some(mut obj) = body else {
                    return Err(failure(StatusCode::BAD_REQUEST, "BadRequest", "no object"));
                };
                let Some(name) = obj["metadata"]["name"].as_str().map(str::to_owned) else {
                    return Err(failure(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "metadata.name: Required value",
                    ));
                };
                let key = (ns.clone().unwrap_or_default(), name.clone());
                if store.collections[idx].objects.contains_key(&key) {
                    return Err(failure(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("{} \"{name}\" already exists", kind.plural),
                    ));
                }
                obj["apiVersion"] = json!(kind.api_version());
                obj["kind"] = json!(kind.kind);
                // Status is written through the status subresource only.
                if let Some(o) = obj.as_object_mut() {
                    o.remove("status");
                }
                if let Some(n) = &ns {
                    obj["metadata"]["namespace"] = json!(n);
                }
                obj["metadata"]["uid"] = json!(format!("{:032x}", rand::random::<u128>()));
                obj["metadata"]["creationTimestamp"] = json!("2026-11-26T00:00:00Z");
                obj["metadata"]["generation"] = json!(1);
                Ok(Write {
                    idx,
                    key,
                    event: "ADDED",
                    obj,
                    expect: None,
                    code: StatusCode::CREATED,
                    old: None,
                    admit: true,
                    api_version,
                })
            }
            (_, Some(name)) => {
                let key = (ns.clone().unwrap_or_default(), name.clone());
                let Some(current) = store.collections[idx].objects.get(&key).cloned() else {
                    return Err(failure(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("{}.{} \"{name}\" not found", kind.plural, kind.group),
                    ));
                };
                let on_status = t.subresource.as_deref() == Some("status");
                match *method {
                    Method::GET => {
                        Err(respond(StatusCode::OK, &at_version(&current, &api_version)))
                    }
                    Method::DELETE => Ok(Write {
                        idx,
                        key,
                        event: "DELETED",
                        expect: current["metadata"]["resourceVersion"]
                            .as_str()
                            .map(str::to_owned),
                        obj: current,
                        code: StatusCode::OK,
                        old: None,
                        admit: false,
                        api_version,
                    }),
                    Method::PUT | Method::PATCH => {
                        let Some(body) = body else {
                            return Err(failure(
                                StatusCode::BAD_REQUEST,
                                "BadRequest",
                                "no object",
                            ));
                        };
                        let mut next = current.clone();
                        if method == Method::PUT {
                            let sent_rv = body["metadata"]["resourceVersion"].as_str();
                            if sent_rv.is_some_and(|rv| {
                                Some(rv) != current["metadata"]["resourceVersion"].as_str()
                            }) {
                                return Err(failure(
                                    StatusCode::CONFLICT,
                                    "Conflict",
                                    format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", kind.plural),
                                ));
                            }
                            next = body;
                        } else if content_type.contains("json-patch") {
                            return Err(failure(
                                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                                "UnsupportedMediaType",
                                "JSON patch is not supported by this stand-in",
                            ));
                        } else {
                            merge(&mut next, &body);
                        }
                        // The main resource never changes status; the subresource changes only it.
                        if on_status {
                            let status = next["status"].clone();
                            next = current.clone();
                            next["status"] = status;
                        } else {
                            next["status"] = current["status"].clone();
                            if next.get("status").is_some_and(Value::is_null) {
                                if let Some(o) = next.as_object_mut() {
                                    o.remove("status");
                                }
                            }
                            for f in ["uid", "creationTimestamp", "namespace", "name"] {
                                next["metadata"][f] = current["metadata"][f].clone();
                            }
                            if next["spec"] != current["spec"] {
                                let g = current["metadata"]["generation"].as_i64().unwrap_or(1);
                                next["metadata"]["generation"] = json!(g + 1);
                            }
                        }
                        next["apiVersion"] = json!(kind.api_version());
                        next["kind"] = json!(kind.kind);
                        Ok(Write {
                            idx,
                            key,
                            event: "MODIFIED",
                            obj: next,
                            expect: current["metadata"]["resourceVersion"]
                                .as_str()
                                .map(str::to_owned),
                            code: StatusCode::OK,
                            old: Some(current),
                            admit: !on_status,
                            api_version,
                        })
                    }
                    _ => Err(failure(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "MethodNotAllowed",
                        "method not allowed",
                    )),
                }
            }
            _ => Err(failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "method not allowed",
            )),
        }
    }

    /// A TokenReview answered as kube-apiserver answers it for service-account tokens:
    /// signature and expiry checked, the token's audiences intersected with the asked ones.
    fn review_token(&self, mut review: Value) -> Response<Body> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let token = review["spec"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let asked = strings(&review["spec"]["audiences"]);
        let verdict = (|| -> Result<Value, String> {
            let mut parts = token.split('.');
            let (Some(head), Some(claims), Some(sig), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err("token is not a JWT".into());
            };
            let sig = b64.decode(sig).map_err(|_| "bad signature encoding")?;
            ring::hmac::verify(&self.signer, format!("{head}.{claims}").as_bytes(), &sig)
                .map_err(|_| "invalid bearer token, token lookup failed")?;
            let claims: Value =
                serde_json::from_slice(&b64.decode(claims).map_err(|_| "bad claims")?)
                    .map_err(|_| "bad claims")?;
            let now = unix_now();
            if claims["exp"].as_u64().unwrap_or(0) <= now {
                return Err("invalid bearer token, service account token has expired".into());
            }
            let aud = strings(&claims["aud"]);
            let audiences: Vec<&String> = if asked.is_empty() {
                aud.iter().collect()
            } else {
                asked.iter().filter(|a| aud.contains(a)).collect()
            };
            if audiences.is_empty() {
                return Err(format!("invalid bearer token, token audiences {aud:?} is invalid for the target audiences {asked:?}"));
            }
            let k = &claims["kubernetes.io"];
            let ns = k["namespace"].as_str().unwrap_or_default();
            let sa = k["serviceaccount"]["name"].as_str().unwrap_or_default();
            Ok(json!({
                "authenticated": true,
                "user": {
                    "username": format!("system:serviceaccount:{ns}:{sa}"),
                    "uid": k["serviceaccount"]["uid"],
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                    "extra": {"authentication.kubernetes.io/pod-name": [k["pod"]["name"]],
                              "authentication.kubernetes.io/pod-uid": [k["pod"]["uid"]]},
                },
                "audiences": audiences,
            }))
        })();
        review["status"] = match verdict {
            Ok(status) => status,
            Err(error) => json!({"authenticated": false, "user": {}, "error": error}),
        };
        review["apiVersion"] = json!("authentication.k8s.io/v1");
        review["kind"] = json!("TokenReview");
        respond(StatusCode::CREATED, &review)
    }

    /// Writes a kubeconfig file named `file` that authenticates with `token`.
    fn write_kubeconfig(&self, file: &str, token: &str) -> std::io::Result<PathBuf> {
        let path = self.dir.join(file);
        let (address, ca_data) = (self.address, &self.ca_data);
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: https://{address}\n    certificate-authority-data: {ca_data}\nusers:\n- name: isthmus\n  user:\n    token: {token}\ncontexts:\n- name: stand-in\n  context: {{cluster: stand-in, user: isthmus}}\ncurrent-context: stand-in\n"
            ),
        )?;
        Ok(path)
    }

    /// Runs the validating webhooks on a staged write, then commits it unless the object
    /// changed meanwhile (409, as a real server's optimistic concurrency says).
    async fn write(self: &Arc<Self>, mut w: Write) -> Response<Body> {
        if w.admit {
            if let Err(denied) = self.admit(&mut w).await {
                return denied;
            }
        }
        let mut store = self.store();
        let current = store.collections[w.idx].objects.get(&w.key);
        let now = current.map(|c| c["metadata"]["resourceVersion"].as_str().map(str::to_owned));
        let unchanged = match (&w.expect, now) {
            (None, None) => true,
            (Some(rv), Some(Some(cur))) => *rv == cur,
            _ => false,
        };
        if !unchanged {
            let reason = if w.expect.is_none() {
                "AlreadyExists"
            } else {
                "Conflict"
            };
            return failure(
                StatusCode::CONFLICT,
                reason,
                format!(
                    "{} {}/{} changed while it was being written",
                    store.collections[w.idx].kind.plural, w.key.0, w.key.1
                ),
            );
        }
        let obj = Self::commit(&mut store, w.idx, w.key, w.event, w.obj);
        respond(w.code, &at_version(&obj, &w.api_version))
    }

    /// Calls every validating webhook whose rules match the write, as kube-apiserver does:
    /// an AdmissionReview POSTed over HTTPS to the webhook's URL, verified against its
    /// `caBundle`. A denial, or a failed call under `failurePolicy: Fail`, refuses the write.
    async fn admit(self: &Arc<Self>, w: &mut Write) -> Result<(), Response<Body>> {
        // Mutating webhooks first, each seeing the object as the ones before left it; then
        // the validating ones see the final object.
        for config in [
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
        ] {
            self.admit_phase(w, config).await?;
        }
        Ok(())
    }

    async fn admit_phase(
        self: &Arc<Self>,
        w: &mut Write,
        config: &str,
    ) -> Result<(), Response<Body>> {
        let (kind, hooks, namespace_labels) = {
            let store = self.store();
            let kind = store.collections[w.idx].kind.clone();
            let hooks: Vec<Value> = store
                .collections
                .iter()
                .filter(|c| c.kind.kind == config)
                .flat_map(|c| c.objects.values())
                .flat_map(|cfg| cfg["webhooks"].as_array().cloned().unwrap_or_default())
                .collect();
            let namespace_labels = store
                .collections
                .iter()
                .filter(|c| c.kind.kind == "Namespace" && c.kind.group.is_empty())
                .find_map(|c| c.objects.get(&(String::new(), w.key.0.clone())))
                .map(|n| n["metadata"]["labels"].clone())
                .unwrap_or(Value::Null);
            (kind, hooks, namespace_labels)
        };
        let operation = if w.expect.is_none() {
            "CREATE"
        } else {
            "UPDATE"
        };
        for hook in hooks {
            let listed = |field: &str, want: &str| {
                hook["rules"].as_array().is_some_and(|rules| {
                    rules.iter().any(|r| {
                        r[field]
                            .as_array()
                            .is_some_and(|v| v.iter().any(|x| x == "*" || x == want))
                    })
                })
            };
            let matches = listed("apiGroups", &kind.group)
                && listed("apiVersions", kind.version())
                && listed("resources", &kind.plural)
                && listed("operations", operation)
                && selects(&hook["namespaceSelector"], &namespace_labels)
                && selects(&hook["objectSelector"], &w.obj["metadata"]["labels"]);
            if !matches {
                continue;
            }
            let name = hook["name"].as_str().unwrap_or_default().to_owned();
            let review = json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {
                    "uid": format!("{:032x}", rand::random::<u128>()),
                    "kind": {"group": kind.group, "version": kind.version(), "kind": kind.kind},
                    "resource": {"group": kind.group, "version": kind.version(), "resource": kind.plural},
                    "requestKind": {"group": kind.group, "version": kind.version(), "kind": kind.kind},
                    "requestResource": {"group": kind.group, "version": kind.version(), "resource": kind.plural},
                    "name": w.key.1, "namespace": w.key.0, "operation": operation,
                    "userInfo": {"username": "stand-in-user"},
                    "object": w.obj, "oldObject": w.old, "dryRun": false,
                    "options": {"apiVersion": "meta.k8s.io/v1", "kind": if operation == "CREATE" { "CreateOptions" } else { "UpdateOptions" }},
                }
            });
            let ignore = hook["failurePolicy"] == "Ignore";
            match call_webhook(self, &hook, &review).await {
                Ok(resp) if resp["response"]["allowed"] == true => {
                    let patch = &resp["response"]["patch"];
                    if !patch.is_null() {
                        apply_patch(&mut w.obj, patch).map_err(|e| {
                            failure(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "InternalError",
                                format!("Internal error occurred: webhook \"{name}\" returned a patch that does not apply: {e:#}"),
                            )
                        })?;
                    }
                }
                Ok(resp) => {
                    let status = &resp["response"]["status"];
                    let code = status["code"]
                        .as_u64()
                        .and_then(|c| StatusCode::from_u16(c as u16).ok())
                        .unwrap_or(StatusCode::BAD_REQUEST);
                    let message = status["message"].as_str().unwrap_or_default();
                    return Err(failure(
                        code,
                        status["reason"].as_str().unwrap_or("BadRequest"),
                        format!("admission webhook \"{name}\" denied the request: {message}"),
                    ));
                }
                Err(_) if ignore => {}
                Err(e) => {
                    return Err(failure(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "InternalError",
                        format!(
                            "Internal error occurred: failed calling webhook \"{name}\": {e:#}"
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    fn watch(
        self: &Arc<Self>,
        store: &mut Store,
        idx: usize,
        namespace: Option<String>,
        selector: Selector,
        q: &HashMap<String, String>,
        api_version: String,
    ) -> Response<Body> {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let c = &mut store.collections[idx];
        let in_scope = |key: &(String, String), obj: &Value| {
            namespace.as_ref().is_none_or(|n| *n == key.0) && selector.matches(obj)
        };
        let from = q
            .get("resourceVersion")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if from == 0 {
            // "Any": the current state as ADDED events, then what changes.
            for (key, obj) in &c.objects {
                if in_scope(key, obj) {
                    let _ = tx.send(line("ADDED", &at_version(obj, &api_version)));
                }
            }
        } else if from + 1 < c.oldest {
            let gone = status(
                StatusCode::GONE,
                "Expired",
                format!("too old resource version: {from} ({})", c.oldest),
            );
            let _ = tx.send(line("ERROR", &gone));
            self.expired
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(tx);
            return stream_response(rx, None);
        } else {
            for (rv, event, obj) in &c.history {
                let ns = obj["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if *rv > from && in_scope(&(ns, name), obj) {
                    let _ = tx.send(line(event, &at_version(obj, &api_version)));
                }
            }
        }
        c.watchers.push(Watcher {
            namespace,
            selector,
            api_version: api_version.clone(),
            tx: tx.clone(),
        });
        if q.get("allowWatchBookmarks").is_some_and(|v| v == "true") {
            // Through the channel and under the store's lock, so a bookmark never overtakes
            // an event it claims to follow.
            let (kind, shared, tx) = (c.kind.clone(), Arc::downgrade(self), tx.downgrade());
            let api_version = api_version.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(BOOKMARK_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let (Some(shared), Some(tx)) = (shared.upgrade(), tx.upgrade()) else {
                        return;
                    };
                    let store = shared.store();
                    let mark = json!({"kind": kind.kind, "apiVersion": api_version,
                                      "metadata": {"resourceVersion": store.rv.to_string()}});
                    if tx.send(line("BOOKMARK", &mark)).is_err() {
                        return;
                    }
                }
            });
        }
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        drop(tx);
        stream_response(rx, timeout)
    }

    fn discovery(&self, path: &str) -> Option<Value> {
        let store = self.store();
        let kinds: Vec<&Kind> = store.collections.iter().map(|c| &c.kind).collect();
        let resources = |g: &str, v: &str| -> Vec<Value> {
            kinds
                .iter()
                .filter(|k| k.group == g && k.versions.iter().any(|x| x == v))
                .map(|k| json!({"name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced, "kind": k.kind,
                                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}))
                .collect()
        };
        match path.trim_end_matches('/') {
            "/api" => Some(json!({"kind": "APIVersions", "versions": ["v1"]})),
            "/apis" => {
                let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
                for k in kinds.iter().filter(|k| !k.group.is_empty()) {
                    let vs = groups.entry(k.group.as_str()).or_default();
                    for v in &k.versions {
                        if !vs.contains(&v.as_str()) {
                            vs.push(v);
                        }
                    }
                }
                let groups: Vec<Value> = groups
                    .into_iter()
                    .map(|(g, vs)| {
                        let versions: Vec<Value> = vs
                            .iter()
                            .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                            .collect();
                        json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                    })
                    .collect();
                Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
            }
            "/api/v1" => Some(
                json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": resources("", "v1")}),
            ),
            p => {
                let rest = p.strip_prefix("/apis/")?;
                let (g, v) = rest.split_once('/')?;
                if v.contains('/') || resources(g, v).is_empty() {
                    return None;
                }
                Some(
                    json!({"kind": "APIResourceList", "groupVersion": format!("{g}/{v}"), "resources": resources(g, v)}),
                )
            }
        }
    }
}

/// Whether a label selector (matchLabels; matchExpressions with In, NotIn, Exists,
/// DoesNotExist) picks an object with `labels`; an absent selector picks everything.
fn selects(selector: &Value, labels: &Value) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    let by_labels = selector["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| v.as_str() == get(k)));
    let by_expressions = selector["matchExpressions"].as_array().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let values = strings(&e["values"]);
            match e["operator"].as_str() {
                Some("In") => get(key).is_some_and(|v| values.iter().any(|x| x == v)),
                Some("NotIn") => get(key).is_none_or(|v| !values.iter().any(|x| x == v)),
                Some("Exists") => get(key).is_some(),
                Some("DoesNotExist") => get(key).is_none(),
                _ => false,
            }
        })
    });
    by_labels && by_expressions
}

/// Applies a mutating webhook's answer: a JSON patch (RFC 6902) as bytes, which
/// kube-apiserver decodes as Go decodes a `[]byte`: a base64 string, or an array of
/// numbers (as kube-rs writes it).
fn apply_patch(obj: &mut Value, patch: &Value) -> anyhow::Result<()> {
    use base64::Engine;
    let bytes = match patch {
        Value::String(s) => base64::engine::general_purpose::STANDARD.decode(s)?,
        Value::Array(items) => items
            .iter()
            .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| anyhow::anyhow!("the patch is not an array of bytes"))?,
        other => anyhow::bail!("the patch is {other}"),
    };
    let patch: json_patch::Patch = serde_json::from_slice(&bytes)?;
    json_patch::patch(obj, &patch)?;
    Ok(())
}

/// POSTs `review` to the webhook's `clientConfig.url`, trusting only its `caBundle`.
async fn call_webhook(shared: &Shared, hook: &Value, review: &Value) -> anyhow::Result<Value> {
    use base64::Engine;
    // A service reference is called at `<name>.<namespace>.svc`, reached through the
    // routes kube-proxy would provide.
    let service = &hook["clientConfig"]["service"];
    let (url, route): (http::Uri, Option<SocketAddr>) = match service["name"].as_str() {
        Some(name) => {
            let ns = service["namespace"].as_str().unwrap_or_default();
            let port = service["port"].as_u64().unwrap_or(443) as u16;
            let path = service["path"].as_str().unwrap_or("/");
            let to = shared
                .routes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(ns.to_owned(), name.to_owned(), port))
                .copied()
                .with_context(|| format!("no route to service {ns}/{name}:{port}"))?;
            (
                format!("https://{name}.{ns}.svc:{port}{path}").parse()?,
                Some(to),
            )
        }
        None => (
            hook["clientConfig"]["url"]
                .as_str()
                .context("the webhook has neither a url nor a service")?
                .parse()?,
            None,
        ),
    };
    let bundle = base64::engine::general_purpose::STANDARD.decode(
        hook["clientConfig"]["caBundle"]
            .as_str()
            .context("no caBundle")?,
    )?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut bundle.as_slice()) {
        roots.add(cert?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let host = url.host().context("no host")?.to_owned();
    let port = url.port_u16().unwrap_or(443);
    let timeout = Duration::from_secs(hook["timeoutSeconds"].as_u64().unwrap_or(10));
    let call = async {
        let tcp = match route {
            Some(to) => tokio::net::TcpStream::connect(to).await?,
            None => tokio::net::TcpStream::connect((host.as_str(), port)).await?,
        };
        let name = rustls::pki_types::ServerName::try_from(host.clone())?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::post(url.clone())
            .header(http::header::HOST, format!("{host}:{port}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(review)?)))?;
        let resp = send.send_request(req).await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "webhook answered {}",
            resp.status()
        );
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>(serde_json::from_slice(&body)?)
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {timeout:?}"))?
}

/// A watch's response: its events as JSON lines, until the watch is cut or `timeout`.
fn stream_response(
    rx: mpsc::UnboundedReceiver<Bytes>,
    timeout: Option<Duration>,
) -> Response<Body> {
    let deadline = tokio::time::Instant::now() + timeout.unwrap_or(Duration::from_secs(3600));
    let stream = futures::stream::unfold(rx, move |mut rx| async move {
        tokio::select! {
            b = rx.recv() => b.map(|b| (Ok(Frame::data(b)), rx)),
            _ = tokio::time::sleep_until(deadline) => None,
        }
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

impl ApiServer {
    /// Starts a server on `ip:6443` serving `kinds` and writes its kubeconfig into `dir`.
    pub async fn start(ip: std::net::IpAddr, kinds: &[Kind], dir: &Path) -> anyhow::Result<Self> {
        use base64::Engine;
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "stand-in kubernetes CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let params = rcgen::CertificateParams::new(vec![ip.to_string()])?;
        let cert = params.signed_by(&key, &issuer)?;
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
        let mut tls = tls;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 6443))
            .await
            .with_context(|| format!("binding the stand-in API server on {ip}:6443"))?;
        let address = listener.local_addr()?;
        let token = format!("{:032x}", rand::random::<u128>());
        let store = Store {
            rv: 1,
            collections: kinds
                .iter()
                .map(|k| Collection {
                    kind: k.clone(),
                    objects: BTreeMap::new(),
                    history: VecDeque::new(),
                    oldest: 0,
                    watchers: Vec::new(),
                })
                .collect(),
        };
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            users: Mutex::new(HashMap::from([(
                token.clone(),
                (ADMIN.to_owned(), ADMIN.to_owned()),
            )])),
            routes: Mutex::default(),
            access: Mutex::default(),
            dir: dir.to_owned(),
            address,
            ca_data: base64::engine::general_purpose::STANDARD.encode(ca_cert.pem()),
            signer: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &rand::random::<[u8; 32]>()),
            expired: Default::default(),
        });
        let kubeconfig = shared.write_kubeconfig("kubeconfig", &token)?;
        let serving = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, shared) = (acceptor.clone(), serving.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, std::convert::Infallible>(shared.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
                });
            }
        });
        Ok(Self {
            address,
            kubeconfig,
            shared,
            task,
        })
    }

    /// The kubeconfig file that reaches this server.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig named `credential` for a client that authenticates as `user` (a
    /// token of its own), so the access log tells its requests apart.
    pub fn kubeconfig_for(&self, credential: &str, user: &str) -> anyhow::Result<PathBuf> {
        let token = format!("{:032x}", rand::random::<u128>());
        self.shared
            .users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token.clone(), (credential.to_owned(), user.to_owned()));
        Ok(self
            .shared
            .write_kubeconfig(&format!("kubeconfig-{credential}"), &token)?)
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Access> {
        self.shared
            .access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes port `port` of Service `namespace/name` reach `to`, as kube-proxy would, for
    /// webhooks the API server calls by service reference.
    pub fn route_service(&self, namespace: &str, name: &str, port: u16, to: SocketAddr) {
        self.shared
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((namespace.to_owned(), name.to_owned(), port), to);
    }

    /// A client of this server, as a user's kubectl would be.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        isthmus_kubernetes::client(Some(&self.kubeconfig)).await
    }

    /// What issues this server's service-account tokens, for a task playing the kubelet.
    pub fn token_issuer(&self) -> TokenIssuer {
        TokenIssuer(self.shared.clone())
    }

    /// Forgets every event so far: a watch resuming from before now gets 410 Gone.
    pub fn compact(&self) {
        let mut store = self.shared.store();
        let next = store.rv + 1;
        for c in &mut store.collections {
            c.history.clear();
            c.oldest = next;
        }
    }

    /// Cuts every open watch, as an API server restart or a load balancer would.
    pub fn break_watches(&self) {
        let mut store = self.shared.store();
        for c in &mut store.collections {
            c.watchers.clear();
        }
    }

    /// Watches answered 410 Gone so far.
    pub fn expired_watches(&self) -> usize {
        self.shared
            .expired
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Open watches, for tests that wait for clients to come back.
    pub fn watches(&self) -> usize {
        let mut store = self.shared.store();
        store
            .collections
            .iter_mut()
            .map(|c| {
                c.watchers.retain(|w| !w.tx.is_closed());
                c.watchers.len()
            })
            .sum()
    }
}

/// Issues service-account tokens as the kubelet projects them into pods.
#[derive(Clone)]
pub struct TokenIssuer(Arc<Shared>);

impl TokenIssuer {
    /// A projected service-account token for `namespace/service_account` of `pod`: a signed
    /// JWT with Kubernetes's claims, for `audience`, expiring after `ttl` (already expired
    /// for a zero `ttl`).
    pub fn token(
        &self,
        namespace: &str,
        service_account: &str,
        pod: &str,
        audience: &str,
        ttl: Duration,
    ) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let now = unix_now();
        let head = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "aud": [audience], "iat": now, "nbf": now, "exp": now + ttl.as_secs(),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": format!("{:032x}", rand::random::<u128>())},
                "pod": {"name": pod, "uid": format!("{:032x}", rand::random::<u128>())},
            },
        });
        let claims = b64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let sig = ring::hmac::sign(&self.0.signer, format!("{head}.{claims}").as_bytes());
        format!("{head}.{claims}.{}", b64.encode(sig.as_ref()))
    }
}
