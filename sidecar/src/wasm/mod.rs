//! WebAssembly plugins: Istio's `WasmPlugin`, run by the sidecar through the proxy-wasm ABI
//! (the 0.2.x spec Envoy and the SDKs target) on the wasmi interpreter.
//!
//! The controller pushes, in the workload's own resource, the plugins that apply to it in
//! the order they run. The sidecar loads each module (a file, or fetched over HTTP(S),
//! checked against its `sha256` and kept in memory by URL and digest), validates it and
//! makes a first instance with the plugin's configuration; a plugin that cannot be loaded
//! stays in the chain as failed, and its fail strategy decides for every request it would
//! have seen. A new chain replaces the old one for new requests only: requests in flight
//! finish with the instances they hold, and no connection is touched. Plugins whose spec did
//! not change keep their loaded module across pushes.
//!
//! On a request, the plugins of its direction (SERVER for requests to the app, CLIENT for
//! the app's own) and port run in three places around the built-in filters, as Istio
//! places phases: AUTHN before JWT authentication, AUTHZ before authorization, STATS and
//! unspecified last, right before the request is sent. Response callbacks run in reverse.

mod abi;
mod body;
mod shared;
mod vm;
mod wasi;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use isthmus_proto::discovery::WasmPlugin;
use tokio::sync::watch;

pub use abi::HttpState;
use shared::PluginShared;
use vm::{CalloutAnswer, PluginFault, Runtime, Session, Verdict};

use crate::errors::ProxyError;
use crate::pool::ProxyBody;
use crate::state::MeshState;

/// Largest module fetched or read.
const MAX_MODULE: usize = 32 << 20;
/// Time to fetch a module over HTTP(S).
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Which way a request goes, as a WasmPlugin's `match.mode` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The app's own requests (outbound).
    Client,
    /// Requests to the app (inbound).
    Server,
}

/// Where in the filters a plugin runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before JWT authentication (`AUTHN`).
    Authn,
    /// Before authorization (`AUTHZ`).
    Authz,
    /// After authorization, right before the request is sent (`STATS`, unspecified).
    Last,
}

impl Stage {
    fn of(phase: &str) -> Self {
        match phase {
            "AUTHN" => Stage::Authn,
            "AUTHZ" => Stage::Authz,
            _ => Stage::Last,
        }
    }
}

/// One plugin of the chain: its spec, and its module or why it could not be loaded.
#[derive(Debug)]
pub struct Plugin {
    pub spec: WasmPlugin,
    runtime: Result<Arc<Runtime>, PluginFault>,
    stage: Stage,
    shared: Arc<shared::Shared>,
    /// Its resident root context's task (timer, queues); stops with the plugin.
    _resident: Option<Resident>,
}

/// Aborts the resident task when the plugin it serves is dropped (swapped out, and the
/// last request that held it done).
#[derive(Debug)]
struct Resident(tokio::task::JoinHandle<()>);

impl Drop for Resident {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The resident root context of a plugin: ticks at the period the plugin sets, tells it of
/// enqueued shared queues, and carries its callouts. A failed root is made again (after a
/// second) and logged.
async fn resident(runtime: Arc<Runtime>, callouts: Arc<Callouts>) {
    let shared = runtime.shared().clone();
    loop {
        let mut root = match runtime.resident() {
            Ok(root) => root,
            Err(fault) => {
                tracing::warn!(plugin = %shared.name, error = %fault, "WasmPlugin's resident root context cannot be made");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let fault = loop {
            let period = shared.tick_ms.load(std::sync::atomic::Ordering::Relaxed);
            let wait = if period == 0 {
                // No timer (yet): look again now and then, in case the plugin sets one.
                Duration::from_millis(200)
            } else {
                Duration::from_millis(u64::from(period))
            };
            let outcome = tokio::select! {
                _ = tokio::time::sleep(wait) => {
                    if period == 0 {
                        continue;
                    }
                    let verdict = root.tick();
                    drive(&mut root, verdict, &callouts).await
                }
                queues = shared.queues.ready() => {
                    let mut outcome = Ok(Verdict::Continue);
                    for q in queues {
                        let verdict = root.queue_ready(q);
                        outcome = drive(&mut root, verdict, &callouts).await;
                        if outcome.is_err() {
                            break;
                        }
                    }
                    outcome
                }
            };
            if let Err(fault) = outcome {
                break fault;
            }
        };
        tracing::warn!(plugin = %shared.name, error = %fault, "WasmPlugin's root context failed; made again in a second");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Plugin {
    /// Counts a request it failed, by its fail strategy, and logs why: a warning at most
    /// once a second (see [`shared::Shared::warn_now`]), the rest at debug.
    fn counted_failure(&self, fault: &dyn std::fmt::Display, what: &str) {
        let n = if self.spec.fail_open {
            &self.shared.failed_open
        } else {
            &self.shared.failed_closed
        };
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let plugin = &self.spec.name;
        match self.shared.warn_now() {
            Some(unlogged) => tracing::warn!(%plugin, error = %fault, unlogged, "{what}"),
            None => tracing::debug!(%plugin, error = %fault, "{what}"),
        }
    }

    fn applies(&self, side: Side, port: u16) -> bool {
        self.spec.r#match.is_empty()
            || self.spec.r#match.iter().any(|m| {
                let mode = match side {
                    Side::Client => m.client,
                    Side::Server => m.server,
                };
                mode && (m.ports.is_empty() || m.ports.contains(&u32::from(port)))
            })
    }
}

/// The plugins that apply to this workload, in the order they run.
#[derive(Debug, Default)]
pub struct Chain {
    plugins: Vec<Arc<Plugin>>,
    callouts: Arc<Callouts>,
}

/// Rounds of callouts one callback may chain (a callout's answer asking for another...).
const MAX_CALLOUT_ROUNDS: usize = 8;
/// Largest callout answer body handed to a plugin.
const MAX_CALLOUT_BODY: usize = 1 << 20;

/// Makes plugins' HTTP callouts (`proxy_http_call`) through this sidecar's own outbound
/// listener, so that they are routed, balanced, secured with mTLS and sent across
/// clusters as the app's own requests are, under this workload's identity.
///
/// A callout does not run the workload's CLIENT plugins again (a plugin calling out on
/// every request would otherwise call out for its own callouts): it carries
/// [`CALLOUT`] with a secret made at start, which only this process knows; the outbound
/// path strips the header from every request, and skips the plugins only when it matches.
#[derive(Debug)]
pub struct Callouts {
    outbound: std::sync::OnceLock<std::net::SocketAddr>,
    secret: HeaderValue,
}

/// The header that marks a plugin's callout on the way through the outbound listener.
pub const CALLOUT: HeaderName = HeaderName::from_static("x-isthmus-wasm-callout");

impl Default for Callouts {
    fn default() -> Self {
        let secret: String = (0..4)
            .map(|_| format!("{:08x}", rand::random::<u32>()))
            .collect();
        Self {
            outbound: std::sync::OnceLock::new(),
            secret: HeaderValue::from_str(&secret).unwrap_or(HeaderValue::from_static("-")),
        }
    }
}

impl Callouts {
    /// Whether a request through the outbound listener is one of this sidecar's callouts.
    pub fn is_callout(&self, headers: &HeaderMap) -> bool {
        headers.get(CALLOUT) == Some(&self.secret)
    }

    /// The mesh host a callout goes to: Envoy's `outbound|<port>|<subset>|<host>` cluster
    /// names, or a host with or without its port.
    fn target(upstream: &str) -> String {
        match upstream
            .strip_prefix("outbound|")
            .map(|r| r.splitn(3, '|').collect::<Vec<_>>())
        {
            Some(parts) if parts.len() == 3 => format!("{}:{}", parts[2], parts[0]),
            _ => upstream.to_owned(),
        }
    }

    async fn send(&self, call: &abi::Callout) -> Option<CalloutAnswer> {
        let timeout = Duration::from_millis(u64::from(call.timeout_ms.clamp(1, 60_000)));
        match tokio::time::timeout(timeout, self.exchange(call)).await {
            Ok(Ok(answer)) => Some(answer),
            Ok(Err(e)) => {
                tracing::debug!(upstream = %call.upstream, error = %e, "WasmPlugin callout failed");
                None
            }
            Err(_) => {
                tracing::debug!(upstream = %call.upstream, ms = call.timeout_ms, "WasmPlugin callout timed out");
                None
            }
        }
    }

    async fn exchange(&self, call: &abi::Callout) -> Result<CalloutAnswer, String> {
        use http_body_util::BodyExt;
        let outbound = *self
            .outbound
            .get()
            .ok_or("the outbound listener is not up yet")?;
        let mut req = http::Request::builder();
        for (k, v) in &call.headers {
            req = match k.as_str() {
                ":method" => req.method(v.as_slice()),
                ":path" => req.uri(v.as_slice()),
                ":authority" | ":scheme" | "host" => req,
                k => req.header(k, v.as_slice()),
            };
        }
        let req = req
            .header(http::header::HOST, Self::target(&call.upstream))
            .header(CALLOUT, self.secret.clone())
            .body(http_body_util::Full::new(Bytes::from(call.body.clone())))
            .map_err(|e| e.to_string())?;
        let (resp, _conn) = crate::app::send_once(outbound, req).await?;
        let mut headers = vec![(":status".to_owned(), string(resp.status().as_str()))];
        headers.extend(
            resp.headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec())),
        );
        let body = http_body_util::Limited::new(resp.into_body(), MAX_CALLOUT_BODY)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((headers, body.to_vec(), Vec::new()))
    }
}

impl Chain {
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// Whether a request through the outbound listener is one of this sidecar's plugins'
    /// callouts (which CLIENT plugins do not see again).
    pub fn is_callout(&self, headers: &HeaderMap) -> bool {
        self.callouts.is_callout(headers)
    }
}

/// The sidecar's plugins: the chain requests read, kept to what the controller pushes.
pub struct Plugins {
    chain: RwLock<Arc<Chain>>,
    callouts: Arc<Callouts>,
    registry: Arc<shared::Registry>,
    /// Plugin-level properties of this proxy (`node.*`).
    node: BTreeMap<String, Vec<u8>>,
    /// Made when a first module is fetched (it reads the system's roots).
    fetcher: std::sync::OnceLock<isthmus_core::fetch::Getter>,
    /// Fetched modules by URL and digest (`IfNotPresent`).
    fetched: Mutex<HashMap<(String, String), Bytes>>,
}

impl std::fmt::Debug for Plugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugins").finish_non_exhaustive()
    }
}

fn string(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

impl Plugins {
    /// `node` properties describe this proxy; the plugins' metrics go to `registry`.
    pub fn new(
        workload: &isthmus_core::config::NamespacedName,
        cluster: &str,
        registry: &mut prometheus_client::registry::Registry,
    ) -> anyhow::Result<Arc<Self>> {
        let plugins_registry = Arc::new(shared::Registry::default());
        registry.register_collector(Box::new(plugins_registry.clone()));
        let node = BTreeMap::from([
            (
                "node.id".to_owned(),
                string(&format!("sidecar~{}.{}", workload.name, workload.namespace)),
            ),
            ("node.metadata.NAME".to_owned(), string(&workload.name)),
            (
                "node.metadata.NAMESPACE".to_owned(),
                string(&workload.namespace),
            ),
            (
                "node.metadata.WORKLOAD_NAME".to_owned(),
                string(&workload.name),
            ),
            ("node.metadata.CLUSTER_ID".to_owned(), string(cluster)),
        ]);
        Ok(Arc::new(Self {
            chain: RwLock::default(),
            callouts: Arc::default(),
            registry: plugins_registry,
            node,
            fetcher: std::sync::OnceLock::new(),
            fetched: Mutex::default(),
        }))
    }

    /// Plugins' callouts go out through the sidecar's outbound listener at `addr`.
    pub fn call_through(&self, addr: std::net::SocketAddr) {
        let _ = self.callouts.outbound.set(addr);
    }

    /// The chain new requests use.
    pub fn chain(&self) -> Arc<Chain> {
        self.chain.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Loads the plugins the pushed config names as it changes.
    pub async fn follow(self: Arc<Self>, mut state: watch::Receiver<Arc<MeshState>>) {
        let mut last: Vec<WasmPlugin> = Vec::new();
        loop {
            let specs = state.borrow_and_update().wasm_plugins.clone();
            if *specs != last {
                self.load(&specs).await;
                last = specs.to_vec();
            }
            if state.changed().await.is_err() {
                return;
            }
        }
    }

    async fn load(&self, specs: &[WasmPlugin]) {
        let current = self.chain();
        let mut plugins = Vec::with_capacity(specs.len());
        for spec in specs {
            let kept = current
                .plugins
                .iter()
                .find(|p| p.spec == *spec && p.runtime.is_ok() && !spec.pull_always);
            if let Some(p) = kept {
                plugins.push(p.clone());
                continue;
            }
            let runtime = self.runtime(spec).await;
            match &runtime {
                Ok(_) => tracing::info!(plugin = %spec.name, url = %spec.url, "WasmPlugin loaded"),
                Err(e) => {
                    tracing::warn!(plugin = %spec.name, url = %spec.url, error = %e, fail_open = spec.fail_open, "WasmPlugin cannot be loaded")
                }
            }
            let shared = self.registry.of(&spec.name);
            let resident_task = runtime
                .as_ref()
                .ok()
                .map(|r| Resident(tokio::spawn(resident(r.clone(), self.callouts.clone()))));
            plugins.push(Arc::new(Plugin {
                shared,
                stage: Stage::of(&spec.phase),
                spec: spec.clone(),
                runtime,
                _resident: resident_task,
            }));
        }
        *self.chain.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Chain {
            plugins,
            callouts: self.callouts.clone(),
        });
    }

    async fn runtime(&self, spec: &WasmPlugin) -> Result<Arc<Runtime>, PluginFault> {
        let bytes = self.module(spec).await?;
        if !spec.sha256.is_empty() {
            let digest = isthmus_core::tls::bundle::sha256_hex(&bytes);
            if digest != spec.sha256 {
                return Err(PluginFault(format!(
                    "the module at {} has SHA-256 {digest}, not the {} its WasmPlugin names",
                    spec.url, spec.sha256
                )));
            }
        }
        let mut properties = self.node.clone();
        properties.insert("plugin_name".into(), string(&spec.name));
        properties.insert("plugin_root_id".into(), string(&spec.plugin_name));
        properties.insert("plugin_vm_id".into(), Vec::new());
        let shared = Arc::new(PluginShared {
            name: spec.name.clone(),
            config: spec.plugin_config.as_bytes().to_vec(),
            properties,
            env: spec.env.clone(),
            shared: self.registry.of(&spec.name),
            tick_ms: Default::default(),
        });
        tokio::task::spawn_blocking(move || Runtime::load(&bytes, shared))
            .await
            .map_err(|e| PluginFault(format!("loading stopped: {e}")))?
    }

    async fn module(&self, spec: &WasmPlugin) -> Result<Bytes, PluginFault> {
        let url = spec.url.as_str();
        if let Some(path) = url
            .strip_prefix("file://")
            .or(url.starts_with('/').then_some(url))
        {
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|e| PluginFault(format!("reading {path}: {e}")))?;
            if bytes.len() > MAX_MODULE {
                return Err(PluginFault(format!(
                    "{path} is larger than {MAX_MODULE} bytes"
                )));
            }
            return Ok(bytes.into());
        }
        let key = (spec.url.clone(), spec.sha256.clone());
        if !spec.pull_always {
            if let Some(b) = self
                .fetched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
            {
                return Ok(b.clone());
            }
        }
        let fetcher = match self.fetcher.get() {
            Some(f) => f,
            None => {
                let made = isthmus_core::fetch::Getter::new(None)
                    .map_err(|e| PluginFault(format!("HTTPS client: {e}")))?;
                self.fetcher.get_or_init(|| made)
            }
        };
        let bytes = fetcher
            .get(url, FETCH_TIMEOUT, MAX_MODULE)
            .await
            .map_err(|e| PluginFault(e.to_string()))?;
        // Only a module that matches its digest is kept (checked by the caller first).
        if spec.sha256.is_empty() || isthmus_core::tls::bundle::sha256_hex(&bytes) == spec.sha256 {
            self.fetched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, bytes.clone());
        }
        Ok(bytes)
    }

    /// The chain as `/config_dump` shows it.
    pub fn dump(&self) -> serde_json::Value {
        let chain = self.chain();
        serde_json::Value::Array(
            chain
                .plugins
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "name": p.spec.name,
                        "url": p.spec.url,
                        "phase": if p.spec.phase.is_empty() { "UNSPECIFIED_PHASE" } else { &p.spec.phase },
                        "priority": p.spec.priority,
                        "fail_strategy": if p.spec.fail_open { "FAIL_OPEN" } else { "FAIL_CLOSE" },
                        "loaded": p.runtime.is_ok(),
                        "error": p.runtime.as_ref().err().map(|e| e.0.clone()),
                    })
                })
                .collect(),
        )
    }
}

/// The plugins one request runs through, and their sessions: for its body, its response
/// and the response's body. Each session ends (`proxy_on_log`, `proxy_on_done`) when the
/// last of these is done with it.
///
/// Made for every request, so it costs nothing until a plugin runs.
#[derive(Default)]
pub struct Run {
    ran: Option<Ran>,
}

struct Ran {
    entries: Arc<Mutex<Entries>>,
    callouts: Arc<Callouts>,
    /// The request has no body (its headers ended the stream): no body callbacks.
    headers_only: bool,
}

/// The sessions of one request, and what a request body callback did to it: answered it
/// in the upstream's place, or failed (FAIL_CLOSE), naming the plugin.
#[derive(Default)]
pub struct Entries {
    list: Vec<Entry>,
    reply: Option<abi::LocalReply>,
    failed: Option<String>,
}

struct Entry {
    plugin: Arc<Plugin>,
    session: Session,
    /// Body bytes the plugin holds back.
    held: Vec<u8>,
    /// It failed (FAIL_OPEN) and sees no more of the request.
    off: bool,
}

fn lock(m: &Mutex<Entries>) -> std::sync::MutexGuard<'_, Entries> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The request body, through the plugins that saw the request's headers.
pub fn request_body(run: &Run, body: ProxyBody) -> ProxyBody {
    match &run.ran {
        Some(ran) if !ran.headers_only && !run.is_empty() => {
            crate::body::boxed(body::PluginBody::new(body, ran.entries.clone(), true))
        }
        _ => body,
    }
}

/// The response body, through the plugins that saw the request.
pub fn response_body(run: &Run, body: ProxyBody) -> ProxyBody {
    match &run.ran {
        Some(ran) if !run.is_empty() => {
            crate::body::boxed(body::PluginBody::new(body, ran.entries.clone(), false))
        }
        _ => body,
    }
}

/// When a plugin cut the request's body short, what the caller gets in place of the
/// upstream's failure: the plugin's answer, or the plugin's failure (FAIL_CLOSE).
pub fn take_reply(run: &Run) -> Option<Result<Response<ProxyBody>, ProxyError>> {
    let mut entries = lock(&run.ran.as_ref()?.entries);
    if let Some(reply) = entries.reply.take() {
        return Some(Ok(local_reply(reply)));
    }
    entries
        .failed
        .take()
        .map(|name| Err(ProxyError::PluginFailed(name)))
}

/// Carries a callback's verdict through the callouts it asked for: each made (at once,
/// concurrently), each answer handed back, until the plugin answers, goes on, or has
/// chained too many rounds.
async fn drive(
    session: &mut Session,
    first: Result<Verdict, PluginFault>,
    callouts: &Callouts,
) -> Result<Verdict, PluginFault> {
    let mut verdict = first?;
    for _ in 0..MAX_CALLOUT_ROUNDS {
        let Verdict::Call(calls) = verdict else {
            return Ok(verdict);
        };
        let answers = futures::future::join_all(calls.iter().map(|c| callouts.send(c))).await;
        let mut more = Vec::new();
        for (call, answer) in calls.iter().zip(answers) {
            match session.call_response(call.token, answer)? {
                Verdict::Reply(r) => return Ok(Verdict::Reply(r)),
                Verdict::Call(m) => more.extend(m),
                Verdict::Continue => {}
            }
        }
        verdict = if more.is_empty() {
            Verdict::Continue
        } else {
            Verdict::Call(more)
        };
    }
    Err(PluginFault(format!(
        "chained more than {MAX_CALLOUT_ROUNDS} rounds of callouts"
    )))
}

impl Run {
    pub fn is_empty(&self) -> bool {
        self.ran
            .as_ref()
            .is_none_or(|r| lock(&r.entries).list.is_empty())
    }
}

/// The request as plugins see it: pseudo-headers first, then the headers.
pub fn request_pairs(parts: &http::request::Parts, scheme: &str) -> abi::Pairs {
    let mut pairs = vec![
        (":method".to_owned(), string(parts.method.as_str())),
        (
            ":path".to_owned(),
            string(parts.uri.path_and_query().map_or("/", |p| p.as_str())),
        ),
        (
            ":authority".to_owned(),
            string(
                parts
                    .uri
                    .authority()
                    .map(|a| a.as_str())
                    .or_else(|| {
                        parts
                            .headers
                            .get(http::header::HOST)
                            .and_then(|h| h.to_str().ok())
                    })
                    .unwrap_or(""),
            ),
        ),
        (":scheme".to_owned(), string(scheme)),
    ];
    pairs.extend(
        parts
            .headers
            .iter()
            .filter(|(k, _)| *k != http::header::HOST)
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec())),
    );
    pairs
}

/// Writes what plugins made of the request back: method, path and headers.
fn apply_request(pairs: &abi::Pairs, parts: &mut http::request::Parts) -> Result<(), ProxyError> {
    let bad = |what: String| ProxyError::InvalidRequest(format!("a WasmPlugin set {what}"));
    let mut headers = HeaderMap::new();
    for (k, v) in pairs {
        match k.as_str() {
            ":method" => {
                parts.method =
                    http::Method::from_bytes(v).map_err(|_| bad("an invalid :method".into()))?;
            }
            ":path" => {
                let pq = http::uri::PathAndQuery::try_from(v.as_slice())
                    .map_err(|_| bad("an invalid :path".into()))?;
                let mut uri = std::mem::take(&mut parts.uri).into_parts();
                uri.path_and_query = Some(pq);
                parts.uri =
                    http::Uri::from_parts(uri).map_err(|_| bad("an invalid :path".into()))?;
            }
            k if k.starts_with(':') => {}
            k => {
                let name = HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| bad(format!("the invalid header name `{k}`")))?;
                let value = HeaderValue::from_bytes(v)
                    .map_err(|_| bad(format!("an invalid value of `{k}`")))?;
                headers.append(name, value);
            }
        }
    }
    if let Some(host) = parts.headers.get(http::header::HOST).cloned() {
        headers.insert(http::header::HOST, host);
    }
    parts.headers = headers;
    Ok(())
}

fn response_pairs(parts: &http::response::Parts) -> abi::Pairs {
    let mut pairs = vec![(":status".to_owned(), string(parts.status.as_str()))];
    pairs.extend(
        parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec())),
    );
    pairs
}

fn apply_response(pairs: &abi::Pairs, parts: &mut http::response::Parts) {
    let mut headers = HeaderMap::new();
    for (k, v) in pairs {
        if k == ":status" {
            if let Some(s) = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u16>().ok())
            {
                parts.status = StatusCode::from_u16(s).unwrap_or(parts.status);
            }
            continue;
        }
        // A header a plugin cannot express is dropped rather than failing the response.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            headers.append(name, value);
        }
    }
    parts.headers = headers;
}

fn local_reply(reply: abi::LocalReply) -> Response<ProxyBody> {
    let mut resp = Response::new(crate::body::boxed(http_body_util::Full::new(Bytes::from(
        reply.body,
    ))));
    *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::FORBIDDEN);
    for (k, v) in &reply.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            resp.headers_mut().append(name, value);
        }
    }
    if reply.grpc_status >= 0 {
        resp.headers_mut()
            .insert("grpc-status", HeaderValue::from(reply.grpc_status));
    }
    resp
}

/// What a failed plugin means for the request: nothing (FAIL_OPEN), or a 503.
fn failed(plugin: &Plugin, fault: &PluginFault) -> Result<(), ProxyError> {
    if plugin.spec.fail_open {
        plugin.counted_failure(
            fault,
            "WasmPlugin failed; the request goes on without it (FAIL_OPEN)",
        );
        Ok(())
    } else {
        plugin.counted_failure(
            fault,
            "WasmPlugin failed; the request is refused (FAIL_CLOSE)",
        );
        Err(ProxyError::PluginFailed(plugin.spec.name.clone()))
    }
}

/// Attributes plugins may read, by name (`request.path`), encoded as proxy-wasm returns
/// them (see [`Properties`]).
pub type PropertyMap = Arc<BTreeMap<String, Vec<u8>>>;

/// One request as the plugins of a chain meet it.
pub struct Flow<'a> {
    pub chain: &'a Chain,
    pub side: Side,
    /// The port plugins' `match` is judged on.
    pub port: u16,
    pub properties: &'a PropertyMap,
}

/// Runs the request headers of the flow's plugins of `stage` over `parts`.
/// `Ok(Some(resp))`: a plugin answered in the upstream's place.
pub async fn on_request(
    flow: &Flow<'_>,
    stage: Stage,
    parts: &mut http::request::Parts,
    end_of_stream: bool,
    run: &mut Run,
) -> Result<Option<Response<ProxyBody>>, ProxyError> {
    for plugin in flow
        .chain
        .plugins
        .iter()
        .filter(|p| p.stage == stage && p.applies(flow.side, flow.port))
    {
        let runtime = match &plugin.runtime {
            Ok(r) => r,
            Err(fault) => {
                failed(plugin, fault)?;
                continue;
            }
        };
        let http = HttpState {
            request_headers: request_pairs(parts, "http"),
            properties: flow.properties.clone(),
            ..Default::default()
        };
        let mut session = match runtime.session(http) {
            Ok(s) => s,
            Err(fault) => {
                failed(plugin, &fault)?;
                continue;
            }
        };
        let verdict = session.request_headers(end_of_stream);
        match drive(&mut session, verdict, &flow.chain.callouts).await {
            Ok(Verdict::Continue | Verdict::Call(_)) => {
                let http = session.http();
                if std::mem::take(&mut http.request_headers_changed) {
                    apply_request(&http.request_headers, parts)?;
                }
                let ran = run.ran.get_or_insert_with(|| Ran {
                    entries: Arc::default(),
                    callouts: flow.chain.callouts.clone(),
                    headers_only: end_of_stream,
                });
                lock(&ran.entries).list.push(Entry {
                    plugin: plugin.clone(),
                    session,
                    held: Vec::new(),
                    off: false,
                });
            }
            Ok(Verdict::Reply(reply)) => {
                tracing::debug!(plugin = %plugin.spec.name, status = reply.status, details = %reply.details, "WasmPlugin answered the request");
                return Ok(Some(local_reply(reply)));
            }
            Err(fault) => failed(plugin, &fault)?,
        }
    }
    Ok(None)
}

/// Runs the response headers of the plugins that saw the request, last first.
pub async fn on_response(
    run: &mut Run,
    parts: &mut http::response::Parts,
    end_of_stream: bool,
) -> Result<Option<Response<ProxyBody>>, ProxyError> {
    // Taken out while callouts are awaited (no lock is held across them), put back for
    // the bodies.
    let Some(ran) = &run.ran else {
        return Ok(None);
    };
    let mut list = std::mem::take(&mut lock(&ran.entries).list);
    let code = i64::from(parts.status.as_u16()).to_le_bytes().to_vec();
    for e in list.iter_mut().rev().filter(|e| !e.off) {
        let http = e.session.http();
        http.response_headers = response_pairs(parts);
        http.set_properties
            .insert("response.code".into(), code.clone());
        let verdict = e.session.response_headers(end_of_stream);
        match drive(&mut e.session, verdict, &ran.callouts).await {
            Ok(Verdict::Continue | Verdict::Call(_)) => {
                let http = e.session.http();
                if std::mem::take(&mut http.response_headers_changed) {
                    apply_response(&http.response_headers, parts)
                }
            }
            Ok(Verdict::Reply(reply)) => return Ok(Some(local_reply(reply))),
            Err(fault) => {
                failed(&e.plugin, &fault)?;
                e.off = true;
            }
        }
    }
    lock(&ran.entries).list = list;
    Ok(None)
}

/// Encodes properties as proxy-wasm returns them: strings as bytes, integers as 8 bytes
/// little-endian, booleans as one byte.
#[derive(Default)]
pub struct Properties(BTreeMap<String, Vec<u8>>);

impl Properties {
    pub fn new() -> Self {
        Self::default()
    }

    /// The request's own attributes, as both directions give them: `path` and `url_path`
    /// as plugins see them (the app's view inbound), `host` as the request names it.
    pub fn request(parts: &http::request::Parts, path: &str, url_path: &str, host: &str) -> Self {
        Self::new()
            .string("request.path", path)
            .string("request.url_path", url_path)
            .string("request.host", host)
            .string("request.method", parts.method.as_str())
            .string("request.scheme", "http")
            .string("request.protocol", &format!("{:?}", parts.version))
    }
    pub fn string(mut self, key: &str, value: &str) -> Self {
        self.0.insert(key.to_owned(), string(value));
        self
    }
    pub fn int(mut self, key: &str, value: i64) -> Self {
        self.0.insert(key.to_owned(), value.to_le_bytes().to_vec());
        self
    }
    pub fn bool(mut self, key: &str, value: bool) -> Self {
        self.0.insert(key.to_owned(), vec![u8::from(value)]);
        self
    }
    pub fn done(self) -> PropertyMap {
        Arc::new(self.0)
    }
}

/// What `isthmus bench wasm` measures of one module: its cost to load, to keep an
/// instance, and to run a request through it.
#[derive(Debug, serde::Serialize)]
pub struct Measured {
    /// Validating and compiling the module, and making its first instance.
    pub load_ms: f64,
    /// Resident memory each further instance adds (mean over `instances`).
    pub bytes_per_instance: u64,
    /// Its linear memory alone, as the module declares it.
    pub linear_memory_bytes: u64,
    /// One request through the plugin (a new HTTP context on a pooled instance, request
    /// and response headers with a few headers each, and its end), mean.
    pub ns_per_request: f64,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Loads `bytes` as a plugin (root id `root_id`, configuration `config`), makes
/// `instances` instances and runs `requests` requests through it, one at a time.
pub fn measure(
    bytes: &[u8],
    root_id: &str,
    config: &str,
    instances: usize,
    requests: usize,
) -> Result<Measured, String> {
    let shared = Arc::new(PluginShared {
        name: "bench/plugin".into(),
        config: config.as_bytes().to_vec(),
        properties: BTreeMap::from([("plugin_root_id".to_owned(), string(root_id))]),
        env: BTreeMap::new(),
        shared: Arc::default(),
        tick_ms: Default::default(),
    });
    let started = std::time::Instant::now();
    let runtime = Runtime::load(bytes, shared).map_err(|e| e.0)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let linear_memory_bytes = runtime.linear_memory_bytes();
    let before = rss_bytes();
    let held: Vec<Session> = (0..instances)
        .map(|_| runtime.resident())
        .collect::<Result<_, _>>()
        .map_err(|e| e.0)?;
    let bytes_per_instance = rss_bytes().saturating_sub(before) / instances.max(1) as u64;
    drop(held);
    let headers = |status: Option<&str>| -> abi::Pairs {
        let mut p: abi::Pairs = match status {
            Some(s) => vec![(":status".into(), string(s))],
            None => vec![
                (":method".into(), string("GET")),
                (":path".into(), string("/")),
                (
                    ":authority".into(),
                    string("backend.bench.svc.cluster.local"),
                ),
                (":scheme".into(), string("http")),
            ],
        };
        p.push(("user-agent".into(), string("bench")));
        p.push((
            "x-request-id".into(),
            string("0f2c1a5e-5d4e-4b4e-9f1e-3c2b1a0d9e8f"),
        ));
        p
    };
    let started = std::time::Instant::now();
    for _ in 0..requests {
        let mut s = runtime
            .session(HttpState {
                request_headers: headers(None),
                ..Default::default()
            })
            .map_err(|e| e.0)?;
        s.request_headers(true).map_err(|e| e.0)?;
        s.http().response_headers = headers(Some("200"));
        s.response_headers(true).map_err(|e| e.0)?;
    }
    let ns_per_request = started.elapsed().as_nanos() as f64 / requests.max(1) as f64;
    Ok(Measured {
        load_ms,
        bytes_per_instance,
        linear_memory_bytes,
        ns_per_request,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_sidecars_secret_marks_a_callout() {
        let callouts = Callouts::default();
        let mut headers = HeaderMap::new();
        assert!(!callouts.is_callout(&headers));
        headers.insert(CALLOUT, HeaderValue::from_static("guessed"));
        assert!(
            !callouts.is_callout(&headers),
            "an app cannot skip CLIENT plugins"
        );
        headers.insert(CALLOUT, callouts.secret.clone());
        assert!(callouts.is_callout(&headers));
        assert_ne!(
            Callouts::default().secret,
            callouts.secret,
            "each process makes its own"
        );
    }

    #[test]
    fn callouts_name_mesh_hosts_as_envoy_clusters_or_hosts() {
        assert_eq!(
            Callouts::target("outbound|9090||policy.demo.svc.cluster.local"),
            "policy.demo.svc.cluster.local:9090"
        );
        assert_eq!(Callouts::target("policy.demo:80"), "policy.demo:80");
        assert_eq!(Callouts::target("policy"), "policy");
    }
}
