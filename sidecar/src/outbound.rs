//! The outbound listener: the app sends plain HTTP/1.1 or HTTP/2 here, naming the mesh
//! service in the Host header. The sidecar picks an endpoint by locality, sends the request
//! over the peer's mTLS HTTP/2 connection (direct, or through the gateway for another
//! cluster), and retries on another endpoint when a peer cannot be reached or resets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::routing::{HashOn, LoadBalancer, Mirror, Retries, RouteAction};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_core::headers::{self, APP_PROTOCOL, ERROR_REASON, UPSTREAM_CLUSTER};
use isthmus_core::locality::Locality;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::{BodyFault, FaultCell, Watched};
use crate::errors::{is_grpc, ProxyError};
use crate::ingress::Limits;
use crate::lb::{pick, EndpointHealth, Failure, Selection, Target, Thresholds};
use crate::metrics::{Metrics, ReasonLabels, RequestLabels};
use crate::pool::{Pool, ProxyBody, H2};
use crate::route::{
    apply_header_op, pick_weighted, rewrite_path, sampled, PolicyState, RequestView,
};
use crate::state::{MeshState, Service};
use crate::upgrade::Upgrade;

/// Attempts per request, the first included.
const MAX_ATTEMPTS: usize = 4;
/// Request bodies up to this size with a known length are kept for retries; larger or
/// streaming bodies are forwarded without copying and retried only if never sent.
const REPLAY_LIMIT: u64 = 16 * 1024;

/// What every outbound request needs.
pub struct OutboundCtx {
    pub state: watch::Receiver<Arc<MeshState>>,
    pub pool: Arc<Pool>,
    pub locality: Locality,
    pub metrics: Metrics,
    /// Spawns the splices of upgraded connections.
    pub drain: isthmus_core::drain::Drain,
    pub limits: Limits,
}

pub struct Outbound {
    listener: TcpListener,
    ctx: Arc<OutboundCtx>,
    drain: isthmus_core::drain::Drain,
}

impl Outbound {
    pub fn new(
        listener: TcpListener,
        ctx: Arc<OutboundCtx>,
        drain: isthmus_core::drain::Drain,
    ) -> Self {
        Self {
            listener,
            ctx,
            drain,
        }
    }

    pub async fn run(self) {
        loop {
            let Ok((tcp, remote)) = self.listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (ctx, d) = (self.ctx.clone(), self.drain.clone());
            let limits = self.ctx.limits.clone();
            self.drain.spawn(async move {
                let activity = Arc::new(Activity::new());
                let seen = activity.clone();
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let (ctx, activity) = (ctx.clone(), activity.clone());
                    req.extensions_mut().insert(ClientAddr(remote));
                    async move {
                        let _busy = activity.begin();
                        Ok::<_, std::convert::Infallible>(handle(&ctx, req).await)
                    }
                });
                let builder = server(&limits);
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                let mut conn = std::pin::pin!(conn);
                let mut check = tokio::time::interval(
                    (limits.idle_timeout / 4).max(Duration::from_millis(250)),
                );
                loop {
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = d.draining() => break,
                        _ = check.tick() => if seen.idle_for() >= limits.idle_timeout { break },
                    }
                }
                // Draining, or idle too long: in-flight exchanges finish, then it closes.
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            });
        }
    }
}

/// Requests a downstream connection is serving, and when it last started one: a
/// connection with none for the idle timeout is closed (Envoy's `idle_timeout`).
struct Activity {
    active: std::sync::atomic::AtomicU32,
    last_ms: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

/// Counts one request while held.
struct Busy<'a>(&'a Activity);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.0.last_ms.store(self.0.now_ms(), Ordering::Relaxed);
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            active: Default::default(),
            last_ms: Default::default(),
            epoch: std::time::Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn begin(&self) -> Busy<'_> {
        self.active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Busy(self)
    }

    /// How long the connection has had no request in progress (zero while one is).
    fn idle_for(&self) -> Duration {
        use std::sync::atomic::Ordering;
        if self.active.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(
            self.now_ms() - self.last_ms.load(Ordering::Relaxed).min(self.now_ms()),
        )
    }
}

/// The app-facing server: HTTP/1.1 (with upgrades) or HTTP/2 by preface, with the
/// request-head timeout and header limits of [`Limits`]. Heads a little over the limit reach
/// [`Limits::admit`], which answers 431 with the reason; far larger ones get hyper's own 431.
fn server(limits: &Limits) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.request_headers_timeout)
        .max_buf_size((limits.max_header_bytes + 16 * 1024).max(8192));
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(limits.h2_header_list());
    builder
}

/// The request body, replayable when small. Either way it is watched: a client that
/// breaks it or goes silent is recorded in `fault` and blamed, never the destination.
enum ReqBody {
    Replayable(Bytes),
    Once(Option<ProxyBody>, FaultCell),
}

impl ReqBody {
    async fn new(body: Incoming, idle: Duration) -> Result<Self, ProxyError> {
        let exact = body.size_hint().exact();
        let fault = FaultCell::default();
        let body = Watched::new(body, idle, fault.clone());
        if exact.is_some_and(|n| n <= REPLAY_LIMIT) {
            let bytes = body
                .collect()
                .await
                .map_err(|e| downstream_error(&e.0))?
                .to_bytes();
            return Ok(ReqBody::Replayable(bytes));
        }
        Ok(ReqBody::Once(Some(crate::body::boxed(body)), fault))
    }

    fn take(&mut self) -> Option<ProxyBody> {
        match self {
            ReqBody::Replayable(b) => Some(crate::body::full(b.clone())),
            ReqBody::Once(b, _) => b.take(),
        }
    }

    /// The client's fault, when the client broke the body.
    fn fault(&self) -> Option<ProxyError> {
        match self {
            ReqBody::Once(_, fault) => fault.get().map(downstream_error),
            ReqBody::Replayable(_) => None,
        }
    }
}

fn downstream_error(fault: &BodyFault) -> ProxyError {
    match fault {
        BodyFault::Broken(e) => ProxyError::RequestBody(e.clone()),
        BodyFault::Idle(d) => ProxyError::RequestBodyTimeout(*d),
    }
}

/// Methods that may be sent twice (RFC 9110 §9.2.2): only these are retried once a peer
/// may have seen them.
fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn split_host(host: &str) -> (&str, Option<u16>) {
    match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (host, None),
        },
        _ => (host, None),
    }
}

fn request_host(req: &Request<Incoming>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_owned());
    }
    req.headers()
        .get(http::header::HOST)?
        .to_str()
        .ok()
        .map(str::to_owned)
}

pub async fn handle(ctx: &Arc<OutboundCtx>, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = std::time::Instant::now();
    let grpc = is_grpc(req.headers());
    let state = ctx.state.borrow().clone();
    // Cheap clones (reference-counted) kept for the access log.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let h1 = req.version() < Version::HTTP_2;
    let (resp, service, cluster) = match route(ctx, &state, req).await {
        Ok((resp, service, cluster)) => (resp, service, cluster),
        Err((e, service)) => {
            // The access log: errors the proxy made itself at info (with their reason),
            // every other request at debug (`RUST_LOG=access=debug`).
            tracing::info!(target: "access", %method, path = uri.path(), service = %service, status = e.status().as_u16(), reason = e.reason(), error = %e, elapsed_ms = started.elapsed().as_millis() as u64, "request");
            let mut resp = e.respond(grpc);
            if h1 && e.downstream() {
                // Whatever follows a malformed request on this connection cannot be trusted
                // to be framed as the client meant: answer, then close.
                resp.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            (resp, service, String::new())
        }
    };
    if resp.headers().get(ERROR_REASON).is_none() {
        tracing::debug!(target: "access", %method, path = uri.path(), service = %service, cluster = %cluster, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
    }
    let flags = resp
        .headers()
        .get(ERROR_REASON)
        .and_then(|v| v.to_str().ok())
        .map(reason_label)
        .unwrap_or("-");
    ctx.metrics.record(
        RequestLabels {
            reporter: "source",
            source_cluster: state.mesh.cluster.clone(),
            destination_service: service,
            destination_cluster: cluster,
            response_code: resp.status().as_u16(),
            response_flags: flags,
        },
        started,
    );
    resp
}

/// Parses gRPC's `grpc-timeout` (`<digits><unit>`, units H M S m u n).
fn grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok().filter(|_| digits.len() <= 8)?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Interns the reasons the proxies produce, for metric labels.
fn reason_label(r: &str) -> &'static str {
    match r {
        "no-route" => "no-route",
        "no-healthy-upstream" => "no-healthy-upstream",
        "upstream-connect-failure" => "upstream-connect-failure",
        "upstream-reset" => "upstream-reset",
        "app-unavailable" => "app-unavailable",
        "app-reset" => "app-reset",
        "app-connect-timeout" => "app-connect-timeout",
        "fault-abort" => "fault-abort",
        "timeout" => "timeout",
        "overflow" => "overflow",
        "rate-limited" => "rate-limited",
        "tunnel-unsupported" => "tunnel-unsupported",
        "downstream-body" => "downstream-body",
        "downstream-timeout" => "downstream-timeout",
        "invalid-request" => "invalid-request",
        "request-headers-too-large" => "request-headers-too-large",
        "upgrade-refused" => "upgrade-refused",
        "response-headers-too-large" => "response-headers-too-large",
        _ => "other",
    }
}

type Routed = Result<(Response<ProxyBody>, String, String), (ProxyError, String)>;

/// When an attempt is retried.
#[derive(Debug, Clone)]
struct RetryPolicy {
    attempts: usize,
    per_try: Option<Duration>,
    on_5xx: bool,
    on_gateway_error: bool,
    on_retriable_4xx: bool,
    grpc: Vec<u8>,
}

impl RetryPolicy {
    /// Without a VirtualService: retry connect failures and resets on other endpoints.
    fn default_policy() -> Self {
        Self {
            attempts: MAX_ATTEMPTS,
            per_try: None,
            on_5xx: false,
            on_gateway_error: false,
            on_retriable_4xx: false,
            grpc: Vec::new(),
        }
    }

    fn from_spec(r: &Retries) -> Self {
        let on = |c: &str| r.retry_on.iter().any(|x| x == c);
        let grpc = [
            ("cancelled", 1),
            ("deadline-exceeded", 4),
            ("resource-exhausted", 8),
            ("internal", 13),
            ("unavailable", 14),
        ]
        .iter()
        .filter(|(name, _)| on(name))
        .map(|(_, code)| *code)
        .collect();
        Self {
            attempts: r.attempts as usize + 1,
            per_try: r.per_try_timeout_ms.map(Duration::from_millis),
            on_5xx: on("5xx"),
            on_gateway_error: on("gateway-error"),
            on_retriable_4xx: on("retriable-4xx"),
            grpc,
        }
    }

    /// Whether a response (status, grpc-status of a trailers-only response) asks for a retry.
    fn retry_response(&self, resp: &Response<Incoming>) -> bool {
        let s = resp.status().as_u16();
        let grpc = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u8>().ok());
        (self.on_5xx && s >= 500)
            || (self.on_gateway_error && matches!(s, 502..=504))
            || (self.on_retriable_4xx && s == 409)
            || grpc.is_some_and(|g| self.grpc.contains(&g))
    }
}

/// Where and how a request goes once its route is chosen.
struct Plan {
    svc: Arc<Service>,
    authority: String,
    subset: Option<String>,
    retry: RetryPolicy,
    /// Consistent-hash key of the request, when the destination hashes.
    hash: Option<u64>,
    /// Labels of this workload, for `failoverPriority`.
    own_labels: Arc<BTreeMap<String, String>>,
    /// The destination port, for `portLevelSettings`.
    port: u16,
}

/// The app's address on the outbound listener, for `useSourceIp` hashing.
#[derive(Debug, Clone, Copy)]
struct ClientAddr(std::net::SocketAddr);

fn hash_str(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(name)?.strip_prefix('='))
}

/// The request's hash key, and a `Set-Cookie` to send back when a hashing cookie had to be
/// made up (Istio's behaviour for `httpCookie` with a ttl).
fn hash_key(on: &HashOn, parts: &http::request::Parts) -> (Option<u64>, Option<String>) {
    match on {
        HashOn::Header(name) => (
            parts
                .headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .map(hash_str),
            None,
        ),
        HashOn::QueryParameter(name) => (
            parts
                .uri
                .query()
                .and_then(|q| crate::route::query_param(q, name))
                .map(hash_str),
            None,
        ),
        HashOn::SourceIp => (
            parts
                .extensions
                .get::<ClientAddr>()
                .map(|c| hash_str(&c.0.ip().to_string())),
            None,
        ),
        HashOn::Cookie {
            name,
            path,
            ttl_secs,
        } => match cookie(&parts.headers, name) {
            Some(v) => (Some(hash_str(v)), None),
            None if *ttl_secs > 0 => {
                let value = format!("{:016x}", rand::random::<u64>());
                let path = path.as_deref().unwrap_or("/");
                (
                    Some(hash_str(&value)),
                    Some(format!(
                        "{name}={value}; Max-Age={ttl_secs}; Path={path}; HttpOnly"
                    )),
                )
            }
            None => (None, None),
        },
    }
}

impl Plan {
    /// The DestinationRule policy in force: the subset's, else the service's.
    fn state(&self) -> Option<&PolicyState> {
        self.svc
            .routing
            .as_deref()?
            .state_for(self.subset.as_deref(), self.port)
    }

    fn selection(&self) -> Selection<'_> {
        let subset = self
            .subset
            .as_deref()
            .and_then(|name| self.svc.routing.as_deref()?.subset(name));
        let policy = self.state().map(|s| &s.policy);
        Selection {
            labels: subset.map(|s| &s.labels),
            load_balancer: policy.and_then(|p| p.load_balancer.as_ref()),
            hash: self.hash,
            locality: policy.and_then(|p| p.locality.as_ref()),
            own_labels: Some(&self.own_labels),
            min_health_percent: policy
                .and_then(|p| p.outlier.as_ref())
                .map(|o| o.min_health_percent)
                .unwrap_or(0),
        }
    }

    /// Connect timeout and connection caps of the destination's `connectionPool`.
    fn connect_options(&self) -> crate::pool::ConnectOptions {
        let pool = self.state().and_then(|s| s.policy.connection_pool.as_ref());
        crate::pool::ConnectOptions {
            timeout: pool
                .and_then(|p| p.connect_timeout_ms)
                .map(Duration::from_millis),
            max_uses: pool.and_then(|p| p.max_requests_per_connection),
            idle: pool
                .and_then(|p| p.idle_timeout_ms)
                .map(Duration::from_millis),
        }
    }
}

fn redirect(
    uri: &Option<String>,
    authority: &Option<String>,
    code: u16,
    host: &str,
    path: &str,
) -> Response<ProxyBody> {
    let location = format!(
        "http://{}{}",
        authority.as_deref().unwrap_or(host),
        uri.as_deref().unwrap_or(path)
    );
    let mut resp = Response::new(crate::pool::empty_body());
    *resp.status_mut() =
        http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}

fn direct_response(status: u16, body: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(crate::body::full(body.to_owned()));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    resp
}

async fn route(ctx: &Arc<OutboundCtx>, state: &Arc<MeshState>, req: Request<Incoming>) -> Routed {
    let (mut parts, body) = req.into_parts();
    ctx.limits
        .admit(&mut parts)
        .map_err(|e| (e, String::new()))?;
    let mut req = Request::from_parts(parts, body);
    if req.method() == http::Method::CONNECT {
        return tcp_tunnel(ctx, state, req).await;
    }
    let host = request_host(&req).ok_or((ProxyError::NoHost, String::new()))?;
    // An HTTP/1.1 upgrade (WebSocket): the app's side of it, taken before the request is
    // dismantled. `h2c` is dropped (the hop-by-hop headers go below); others are refused.
    let upgrade = match crate::upgrade::classify(req.headers(), &ctx.limits.upgrades) {
        Upgrade::None | Upgrade::Drop => None,
        Upgrade::Carry(proto) => Some((proto, hyper::upgrade::on(&mut req))),
        Upgrade::Refuse(proto) => return Err((ProxyError::UpgradeRefused(proto), String::new())),
    };
    req.headers_mut().remove("http2-settings");
    let (name, port) = split_host(&host);
    let no_route = || (ProxyError::NoRoute { host: host.clone() }, String::new());
    let svc = state.resolve(name).ok_or_else(no_route)?.clone();
    let port = svc.port(port).ok_or_else(no_route)?.clone();
    let (mut parts, body) = req.into_parts();
    headers::strip_untrusted(&mut parts.headers);
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    let mut path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    let mut plan = Plan {
        svc: svc.clone(),
        authority: String::new(),
        subset: None,
        retry: RetryPolicy::default_policy(),
        hash: None,
        own_labels: state.own_labels.clone(),
        port: 0,
    };
    let mut dest_port = port.clone();
    // A gRPC caller's own deadline (`grpc-timeout`) bounds the request, like a route timeout.
    let grpc_deadline = parts
        .headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(grpc_timeout)
        .map(|t| tokio::time::Instant::now() + t);
    let mut deadline = grpc_deadline;
    let mut mirror = None;
    let mut response_headers = None;
    let mut authority_rewrite = None;
    let routing = svc.routing.clone();
    let view = RequestView {
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or_default(),
        method: parts.method.as_str(),
        authority: &host,
        port: port.port,
        headers: &parts.headers,
        source_labels: &state.own_labels,
    };
    if let Some((r, prefix)) = routing.as_deref().and_then(|r| r.select(&view)) {
        let spec = &r.spec;
        let service = svc.hostname();
        // The route timeout covers everything from here, injected delays included.
        let route_deadline = spec
            .timeout_ms
            .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
        deadline = match (route_deadline, grpc_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(fault) = &spec.fault {
            if let Some((ms, pct)) = fault.delay {
                if sampled(pct) {
                    let until = tokio::time::Instant::now() + Duration::from_millis(ms);
                    if deadline.is_some_and(|d| d < until) {
                        tokio::time::sleep_until(deadline.unwrap_or(until)).await;
                        return Err((
                            ProxyError::Timeout {
                                service: service.clone(),
                            },
                            service,
                        ));
                    }
                    tokio::time::sleep_until(until).await;
                }
            }
            if let Some((abort, pct)) = &fault.abort {
                if sampled(*pct) {
                    return Err((ProxyError::FaultAbort(abort.clone()), service));
                }
            }
        }
        match &spec.action {
            RouteAction::DirectResponse { status, body } => {
                return Ok((direct_response(*status, body), service, String::new()))
            }
            RouteAction::Redirect {
                uri,
                authority,
                code,
            } => {
                return Ok((
                    redirect(uri, authority, *code, &host, &path),
                    service,
                    String::new(),
                ))
            }
            RouteAction::Route(dests) => {
                let d = pick_weighted(dests).ok_or((
                    ProxyError::NoHealthyUpstream {
                        service: service.clone(),
                    },
                    service.clone(),
                ))?;
                let no_dest = || {
                    (
                        ProxyError::NoRoute {
                            host: d.service.clone(),
                        },
                        service.clone(),
                    )
                };
                plan.svc = state.services.get(&d.service).ok_or_else(no_dest)?.clone();
                dest_port = plan
                    .svc
                    .port(d.port.or(Some(port.port)))
                    .or_else(|| plan.svc.port(None))
                    .ok_or_else(no_dest)?
                    .clone();
                plan.subset = d.subset.clone();
            }
        }
        if let Some(rw) = &spec.rewrite {
            if let Some(uri) = &rw.uri {
                path = rewrite_path(&path, prefix, uri);
            }
            authority_rewrite = rw.authority.clone();
        }
        apply_header_op(&mut parts.headers, &spec.headers.request);
        if let Ok(name) = HeaderValue::from_str(&spec.name) {
            if !spec.name.is_empty() {
                parts.headers.insert(isthmus_core::headers::ROUTE, name);
            }
        }
        if let Some(r) = &spec.retries {
            plan.retry = RetryPolicy::from_spec(r);
        }
        response_headers = Some(spec.headers.response.clone());
        mirror = spec.mirror.clone().filter(|m| sampled(m.percentage));
    }
    let service = plan.svc.hostname();
    plan.authority = format!("{service}:{}", dest_port.port);
    plan.port = dest_port.port;
    let mut set_cookie = None;
    if let Some(LoadBalancer::ConsistentHash(on)) = plan.selection().load_balancer.cloned() {
        (plan.hash, set_cookie) = hash_key(&on, &parts);
    }
    let app_protocol = if dest_port.protocol == "http2" || dest_port.protocol == "grpc" {
        "http2"
    } else {
        "http"
    };
    parts
        .headers
        .insert(APP_PROTOCOL, HeaderValue::from_static(app_protocol));
    let uri_authority = authority_rewrite.as_deref().unwrap_or(&plan.authority);
    parts.uri = Uri::try_from(format!("http://{uri_authority}{path}"))
        .map_err(|_| (ProxyError::NoHost, service.clone()))?;
    parts.version = Version::HTTP_2;
    if let Some((proto, client)) = upgrade {
        let resp = upgrade_through(ctx, state, &plan, parts, &path, &proto, client)
            .await
            .map_err(|e| (e, service.clone()))?;
        return Ok((resp, service, String::new()));
    }
    let body = ReqBody::new(body, ctx.limits.stream_idle_timeout)
        .await
        .map_err(|e| (e, service.clone()))?;
    if let (Some(m), ReqBody::Replayable(bytes)) = (mirror, &body) {
        spawn_mirror(ctx, state, m, parts.clone(), bytes.clone());
    }
    let _admitted = match plan.state() {
        Some(st) => Some(st.breaker.admit().await.ok_or_else(|| {
            (
                ProxyError::Overflow {
                    service: service.clone(),
                },
                service.clone(),
            )
        })?),
        None => None,
    };
    let sent = attempts(ctx, state, &plan, parts, body);
    let result = match deadline {
        Some(d) => tokio::time::timeout_at(d, sent)
            .await
            .unwrap_or(Err(ProxyError::Timeout {
                service: service.clone(),
            })),
        None => sent.await,
    };
    let (mut resp, cluster) = result.map_err(|e| (e, service.clone()))?;
    if let Some(op) = &response_headers {
        apply_header_op(resp.headers_mut(), op);
    }
    if let Some(c) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().append(http::header::SET_COOKIE, c);
    }
    Ok((resp, service, cluster))
}

/// An app's `CONNECT host:port`: an opaque TCP tunnel to a port of a mesh service.
async fn tcp_tunnel(
    ctx: &Arc<OutboundCtx>,
    state: &Arc<MeshState>,
    mut req: Request<Incoming>,
) -> Routed {
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .ok_or((ProxyError::NoHost, String::new()))?;
    let (name, port) = split_host(&host);
    let no_route = || (ProxyError::NoRoute { host: host.clone() }, String::new());
    let mut svc = state.resolve(name).ok_or_else(no_route)?.clone();
    let mut port = port
        .and_then(|p| svc.port(Some(p)))
        .ok_or_else(no_route)?
        .clone();
    // The VirtualService's `tcp[]` routes: first one for this port, weighted destination.
    let mut subset = None;
    let chosen = svc
        .routing
        .as_deref()
        .and_then(|r| {
            r.tcp
                .iter()
                .find(|t| t.ports.is_empty() || t.ports.contains(&port.port))
        })
        .and_then(|t| pick_weighted(&t.destinations))
        .cloned();
    if let Some(d) = chosen {
        svc = state.services.get(&d.service).ok_or_else(no_route)?.clone();
        port = svc
            .port(d.port.or(Some(port.port)))
            .or_else(|| svc.port(None))
            .ok_or_else(no_route)?
            .clone();
        subset = d.subset;
    }
    let service = svc.hostname();
    let client = hyper::upgrade::on(&mut req);
    let (mut parts, _body) = req.into_parts();
    headers::strip_untrusted(&mut parts.headers);
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(
        crate::upgrade::TARGET_PORT,
        HeaderValue::from(port.target_port),
    );
    let plan = Plan {
        authority: format!("{service}:{}", port.port),
        svc,
        subset,
        retry: RetryPolicy::default_policy(),
        hash: None,
        own_labels: state.own_labels.clone(),
        port: port.port,
    };
    parts.uri = Uri::try_from(plan.authority.as_str())
        .map_err(|_| (ProxyError::NoHost, service.clone()))?;
    parts.version = Version::HTTP_2;
    let (mut resp, cluster) = attempts(
        ctx,
        state,
        &plan,
        parts,
        ReqBody::Replayable(bytes::Bytes::new()),
    )
    .await
    .map_err(|e| (e, service.clone()))?;
    if resp.status() != http::StatusCode::OK {
        return Ok((resp, service, cluster));
    }
    crate::upgrade::splice(client, hyper::upgrade::on(&mut resp), &ctx.drain);
    Ok((Response::new(crate::pool::empty_body()), service, cluster))
}

/// Carries an upgrade to the chosen endpoint as a CONNECT; on success answers the app `101`
/// and splices the two upgraded connections.
async fn upgrade_through(
    ctx: &Arc<OutboundCtx>,
    state: &Arc<MeshState>,
    plan: &Plan,
    mut parts: http::request::Parts,
    path: &str,
    proto: &str,
    client: hyper::upgrade::OnUpgrade,
) -> Result<Response<ProxyBody>, ProxyError> {
    parts.method = http::Method::CONNECT;
    parts.uri = Uri::try_from(plan.authority.as_str()).map_err(|_| ProxyError::NoHost)?;
    let invalid = |_| ProxyError::NoHost;
    parts.headers.insert(
        crate::upgrade::UPGRADE,
        HeaderValue::from_str(proto).map_err(invalid)?,
    );
    parts.headers.insert(
        crate::upgrade::PATH,
        HeaderValue::from_str(path).map_err(invalid)?,
    );
    let (mut resp, _) = attempts(
        ctx,
        state,
        plan,
        parts,
        ReqBody::Replayable(bytes::Bytes::new()),
    )
    .await?;
    // The far sidecar marks a CONNECT its app upgraded; anything else is the app's answer
    // to the upgrade request (a 426, a plain 200), returned as it is.
    if resp.status() != http::StatusCode::OK
        || !resp.headers().contains_key(crate::upgrade::UPGRADE)
    {
        resp.headers_mut().remove(crate::upgrade::UPGRADE);
        return Ok(resp);
    }
    let mut answer = Response::new(crate::pool::empty_body());
    *answer.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    *answer.headers_mut() = crate::upgrade::end_to_end(resp.headers());
    headers::strip_untrusted(answer.headers_mut());
    answer.headers_mut().insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    answer.headers_mut().insert(
        http::header::UPGRADE,
        HeaderValue::from_str(proto).map_err(invalid)?,
    );
    crate::upgrade::splice(client, hyper::upgrade::on(&mut resp), &ctx.drain);
    Ok(answer)
}

/// Sends a copy of the request to the mirror destination, once, and drops the answer.
/// Only replayable (small) bodies are mirrored; the copy's authority gets Istio's
/// `-shadow` suffix so the receiver can tell it apart.
fn spawn_mirror(
    ctx: &Arc<OutboundCtx>,
    state: &Arc<MeshState>,
    m: Mirror,
    mut parts: http::request::Parts,
    body: bytes::Bytes,
) {
    let Some(svc) = state.services.get(&m.destination.service).cloned() else {
        return;
    };
    let Some(port) = svc
        .port(m.destination.port.or(parts.uri.port_u16()))
        .or_else(|| svc.port(None))
        .cloned()
    else {
        return;
    };
    let authority = format!("{}:{}", svc.hostname(), port.port);
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    let Ok(uri) = Uri::try_from(format!(
        "http://{}-shadow:{}{path}",
        svc.hostname(),
        port.port
    )) else {
        return;
    };
    parts.uri = uri;
    let retry = RetryPolicy {
        attempts: 1,
        ..RetryPolicy::default_policy()
    };
    let plan = Plan {
        svc,
        authority,
        subset: m.destination.subset,
        retry,
        hash: None,
        own_labels: state.own_labels.clone(),
        port: port.port,
    };
    let (ctx, state) = (ctx.clone(), state.clone());
    tokio::spawn(async move {
        let _ = attempts(&ctx, &state, &plan, parts, ReqBody::Replayable(body)).await;
    });
}

/// Sends the request to successive endpoints until one answers as the retry policy wants.
async fn attempts(
    ctx: &OutboundCtx,
    state: &MeshState,
    plan: &Plan,
    parts: http::request::Parts,
    mut body: ReqBody,
) -> Result<(Response<ProxyBody>, String), ProxyError> {
    let authority = plan.authority.as_str();
    let mut tried: Vec<Arc<EndpointHealth>> = Vec::new();
    let mut last: Option<ProxyError> = None;
    let mut _retry = None;
    for attempt in 0..plan.retry.attempts {
        let mut target = pick(
            &plan.svc,
            &ctx.locality,
            &state.mesh,
            &tried,
            plan.selection(),
        );
        if target.is_none() && !tried.is_empty() && last.is_none() {
            // Every endpoint answered and asked for a retry: the same ones may be tried again.
            tried.clear();
            target = pick(
                &plan.svc,
                &ctx.locality,
                &state.mesh,
                &tried,
                plan.selection(),
            );
        }
        let Some(target) = target else { break };
        let target = proven(ctx, state, plan, &tried, target);
        if attempt > 0 {
            match plan.state().map(|s| s.breaker.retry()) {
                Some(None) => break, // the retry budget (`maxRetries`) is spent
                Some(token) => _retry = token,
                None => {}
            }
            ctx.metrics.retries.inc();
        }
        tried.push(target.health().clone());
        let cluster = match &target {
            Target::Local { .. } => state.mesh.cluster.clone(),
            Target::Remote { cluster, .. } => cluster.clone(),
        };
        let mut h2 = match connect(ctx, state, &target, authority, plan.connect_options()).await {
            Ok(h2) => h2,
            Err(e) => {
                fail(ctx, plan, &target, Failure::Connect, e.reason());
                last = Some(e);
                continue;
            }
        };
        if let Err(e) = h2.ready().await {
            fail(
                ctx,
                plan,
                &target,
                Failure::Connect,
                "upstream-connect-failure",
            );
            last = Some(ProxyError::UpstreamReset {
                service: authority.to_owned(),
                source: e,
            });
            continue;
        }
        let Some(b) = body.take() else { break };
        let req = Request::from_parts(parts.clone(), b);
        let _in_flight = target.health().in_flight();
        let sent = match plan.retry.per_try {
            Some(t) => match tokio::time::timeout(t, h2.send_request(req)).await {
                Ok(r) => r,
                Err(_) => {
                    fail(ctx, plan, &target, Failure::Gateway, "per-try-timeout");
                    last = Some(ProxyError::Timeout {
                        service: authority.to_owned(),
                    });
                    continue;
                }
            },
            None => h2.send_request(req).await,
        };
        match sent {
            Ok(resp) => {
                // The far sidecar could not reach its app (refused: a connect failure) or the
                // app reset the request: both are retried on another endpoint.
                let far_reason = resp
                    .headers()
                    .get(ERROR_REASON)
                    .and_then(|v| v.to_str().ok());
                // How the far sidecar failed to serve: (failure to record, whether the app
                // may have seen the request, reason). Refused ejects at once; a connect that
                // timed out counts like a 5xx; neither reached the app, so any method goes
                // again. A reset app may have acted on the request: only idempotent ones do.
                let far = match far_reason {
                    Some("app-unavailable") => Some((Failure::Connect, false, "app-unavailable")),
                    Some("app-connect-timeout") => {
                        Some((Failure::Gateway, false, "app-connect-timeout"))
                    }
                    Some("app-reset") => Some((Failure::Gateway, true, "app-reset")),
                    _ => None,
                };
                let replayable = matches!(body, ReqBody::Replayable(_));
                let again = far.is_some_and(|(_, seen, _)| !seen || idempotent(&parts.method));
                if let (Some((failure, _, reason)), true) = (far, replayable && again) {
                    fail(ctx, plan, &target, failure, reason);
                    last = Some(ProxyError::AppUnavailable(format!(
                        "{authority} in {cluster}: {reason}"
                    )));
                    continue;
                }
                if replayable
                    && attempt + 1 < plan.retry.attempts
                    && plan.retry.retry_response(&resp)
                {
                    ctx.metrics
                        .upstream_failures
                        .get_or_create(&ReasonLabels {
                            reason: "retriable-status",
                        })
                        .inc();
                    last = None;
                    continue;
                }
                // Without outlierDetection only errors proxies made count; with it, every 5xx.
                let outlier = plan.state().is_some_and(|s| s.policy.outlier.is_some());
                let proxy_made = resp.headers().contains_key(ERROR_REASON);
                match resp.status().as_u16() {
                    502..=504 if outlier || proxy_made => {
                        fail(ctx, plan, &target, Failure::Gateway, "upstream-error")
                    }
                    500..=599 if outlier => {
                        fail(ctx, plan, &target, Failure::ServerError, "upstream-5xx")
                    }
                    500..=599 => {}
                    _ => target.health().success(),
                }
                let (mut rparts, rbody) = resp.into_parts();
                headers::strip_hop_by_hop(&mut rparts.headers);
                // The far sidecar strips what its app sets; of its own signals only the
                // error reason goes on to the app.
                let reason = rparts.headers.remove(ERROR_REASON);
                let upgraded = rparts.headers.remove(crate::upgrade::UPGRADE);
                headers::strip_untrusted(&mut rparts.headers);
                if let Some(r) = reason {
                    rparts.headers.insert(ERROR_REASON, r);
                }
                // The mark of an upgrade the far app accepted, for `upgrade_through`.
                if let Some(u) = upgraded.filter(|_| parts.method == http::Method::CONNECT) {
                    rparts.headers.insert(crate::upgrade::UPGRADE, u);
                }
                if let Ok(v) = HeaderValue::from_str(&cluster) {
                    rparts.headers.insert(UPSTREAM_CLUSTER, v);
                }
                let rbody =
                    Watched::new(rbody, ctx.limits.stream_idle_timeout, FaultCell::default());
                return Ok((
                    Response::from_parts(rparts, crate::body::boxed(rbody)),
                    cluster,
                ));
            }
            Err(e) => {
                // The client broke its body (went away, sent too little, went silent):
                // its fault, reported to it, never counted against the peer.
                if let Some(fault) = body.fault() {
                    return Err(fault);
                }
                // A connection that died under the request (closed, or keep-alive timed out)
                // says the peer is gone, as a failed connect does.
                let died = e.is_closed() || e.is_canceled() || e.is_timeout();
                fail(
                    ctx,
                    plan,
                    &target,
                    if died {
                        Failure::Connect
                    } else {
                        Failure::Gateway
                    },
                    "upstream-reset",
                );
                last = Some(ProxyError::UpstreamReset {
                    service: authority.to_owned(),
                    source: e,
                });
                // A request the peer may have acted on goes again only if idempotent.
                if !idempotent(&parts.method) {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| ProxyError::NoHealthyUpstream {
        service: authority.to_owned(),
    }))
}

fn fail(ctx: &OutboundCtx, plan: &Plan, target: &Target, f: Failure, reason: &'static str) {
    ctx.metrics
        .upstream_failures
        .get_or_create(&ReasonLabels { reason })
        .inc();
    let state = plan.state();
    let thresholds = state.map(|s| s.thresholds).unwrap_or(Thresholds::PASSIVE);
    // `maxEjectionPercent` caps ejections in this cluster's endpoints (one may always go).
    let may_eject = match state.and_then(|s| s.policy.outlier.as_ref()) {
        Some(o) if matches!(target, Target::Local { .. }) => {
            let total = plan.svc.endpoints.len();
            let ejected = plan
                .svc
                .endpoints
                .iter()
                .filter(|e| e.health.is_ejected())
                .count();
            ejected < (total * o.max_ejection_percent as usize / 100).max(1)
        }
        _ => true,
    };
    if target.health().failure(f, &thresholds, may_eject) {
        ctx.metrics.ejections.inc();
    }
}

async fn connect(
    ctx: &OutboundCtx,
    state: &MeshState,
    target: &Target,
    authority: &str,
    opts: crate::pool::ConnectOptions,
) -> Result<H2, ProxyError> {
    connect_with(
        &ctx.pool,
        state.mesh.gateway.clone(),
        target,
        authority,
        opts,
    )
    .await
    .map_err(|source| ProxyError::UpstreamConnect {
        service: authority.to_owned(),
        source,
    })
}

/// A connection to `target`: direct to a sidecar of this cluster, or through `gateway`.
async fn connect_with(
    pool: &Pool,
    gateway: Option<(std::net::SocketAddr, isthmus_core::identity::SpiffeId)>,
    target: &Target,
    authority: &str,
    opts: crate::pool::ConnectOptions,
) -> Result<H2, crate::pool::ConnectError> {
    match target {
        Target::Local {
            address, identity, ..
        } => pool.direct(*address, identity, opts).await,
        Target::Remote {
            cluster,
            identities,
            subset,
            ..
        } => {
            let gateway = gateway.ok_or_else(|| crate::pool::ConnectError::NoGateway {
                cluster: cluster.clone(),
            })?;
            pool.remote(gateway, cluster, authority, subset, identities, opts)
                .await
        }
    }
}

/// Connects an endpoint back from an ejection in the background; requests use it again
/// once a connection is up, and a still-hung peer is ejected again without any request
/// having waited on it.
fn probe(ctx: &OutboundCtx, state: &MeshState, plan: &Plan, target: Target) {
    let thresholds = plan
        .state()
        .map(|s| s.thresholds)
        .unwrap_or(Thresholds::PASSIVE);
    let (pool, gateway) = (ctx.pool.clone(), state.mesh.gateway.clone());
    let (authority, opts) = (plan.authority.clone(), plan.connect_options());
    ctx.drain.spawn(async move {
        let up = connect_with(&pool, gateway, &target, &authority, opts)
            .await
            .is_ok();
        target.health().probed(up, &thresholds);
    });
}

/// Trades an endpoint that has not proved itself since its ejection for the next one that
/// has (starting its probe); keeps it when no other is left.
fn proven(
    ctx: &OutboundCtx,
    state: &MeshState,
    plan: &Plan,
    tried: &[Arc<EndpointHealth>],
    first: Target,
) -> Target {
    let mut skip = tried.to_vec();
    let mut target = first.clone();
    while target.health().unproven() {
        if !target.health().is_ejected() && target.health().claim_probe() {
            probe(ctx, state, plan, target.clone());
        }
        skip.push(target.health().clone());
        match pick(
            &plan.svc,
            &ctx.locality,
            &state.mesh,
            &skip,
            plan.selection(),
        ) {
            Some(next) => target = next,
            None => return first,
        }
    }
    target
}

#[cfg(test)]
mod tests {
    use super::split_host;

    #[test]
    fn grpc_timeouts_parse() {
        use std::time::Duration;
        assert_eq!(
            super::grpc_timeout("100m"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(super::grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(super::grpc_timeout("1x"), None);
        assert_eq!(super::grpc_timeout("123456789S"), None, "at most 8 digits");
        assert_eq!(super::grpc_timeout(""), None);
    }

    #[test]
    fn host_and_port_are_split() {
        assert_eq!(split_host("echo.demo:8080"), ("echo.demo", Some(8080)));
        assert_eq!(split_host("echo"), ("echo", None));
        assert_eq!(split_host("echo:x"), ("echo:x", None));
    }
}
