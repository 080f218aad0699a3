//! The outbound listener: the app sends plain HTTP/1.1 or HTTP/2 here, naming the mesh
//! service in the Host header. The request is admitted (`ingress.rs`), routed (the
//! VirtualService's match, faults, rewrites, the DestinationRule's policy), and handed to
//! `attempt.rs`, which sends it over a peer's mTLS HTTP/2 connection (direct, or through
//! the gateway for another cluster) and retries on another endpoint when one fails.
//! Upgrades and opaque TCP leave here as HTTP/2 CONNECT.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::routing::{HashOn, LoadBalancer, Mirror, RouteAction};

use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_core::headers::{self, APP_PROTOCOL, ERROR_REASON};
use isthmus_core::locality::Locality;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::attempt::{attempts, Plan, ReqBody, RetryPolicy};
use crate::errors::{is_grpc, ProxyError};
use crate::ingress::Limits;
use crate::metrics::fixed::{external, unknown};
use crate::metrics::{DestinationService, Metrics, Reporter, Series};
use crate::pool::{Pool, ProxyBody};
use crate::routing_table::{apply_header_op, pick_weighted, rewrite_path, sampled, RequestView};
use crate::state::MeshState;
use crate::telemetry::{Answered, CountedBody, Exchange, Meter, RequestBytes};
use crate::upgrade::Upgrade;
use crate::wasm::Stage;
use opentelemetry::trace::SpanKind;

/// What every outbound request needs.
pub struct OutboundCtx {
    pub state: watch::Receiver<Arc<MeshState>>,
    pub pool: Arc<Pool>,
    pub locality: Locality,
    pub metrics: Arc<Metrics>,
    /// Request metrics, spans and access logs.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Spawns the splices of upgraded connections.
    pub drain: isthmus_core::drain::Drain,
    pub limits: Limits,
    /// The workload's WasmPlugins (CLIENT ones run here, SERVER ones inbound).
    pub plugins: Arc<crate::wasm::Plugins>,
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
            // Redirected here by the capture rules: the app was going elsewhere.
            if let Some(original) = crate::capture::original_destination(&tcp) {
                self.drain
                    .spawn(async move { captured(ctx, tcp, remote, original, d).await });
                continue;
            }
            self.drain
                .spawn(async move { serve_http(ctx, tcp, remote, None, d).await });
        }
    }
}

/// A captured connection, by where it was going:
/// - a port of a mesh service (its cluster IP): HTTP ports are served as HTTP requests,
///   routed by their Host as an app's explicit requests are, or by the address when the
///   Host names nothing; TCP ports become an opaque tunnel to the service; a port of no
///   declared protocol is either, by its first bytes (see [`sniff_http`]);
/// - anywhere else: passed through to that address under `ALLOW_ANY`, closed under
///   `REGISTRY_ONLY` (a Sidecar's `outboundTrafficPolicy`).
async fn captured(
    ctx: Arc<OutboundCtx>,
    tcp: tokio::net::TcpStream,
    remote: std::net::SocketAddr,
    original: std::net::SocketAddr,
    drain: isthmus_core::drain::Drain,
) {
    let state = ctx.state.borrow().clone();
    let target = state
        .resolve_ip(original.ip())
        .filter(|svc| svc.external.is_none())
        .cloned();
    let Some(svc) = target else {
        if !state.allow_any {
            return tracing::debug!(%original, "captured connection to an unknown destination refused (REGISTRY_ONLY)");
        }
        return passthrough(tcp, original).await;
    };
    let Some(port) = svc.port(Some(original.port())).cloned() else {
        return tracing::debug!(%original, service = %svc.hostname(), "captured connection to a port the service does not have");
    };
    let http = match port.protocol.as_ref() {
        "tcp" => false,
        "auto" => sniff_http(&tcp).await,
        _ => true,
    };
    if http {
        return serve_http(ctx, tcp, remote, Some(Captured(svc)), drain).await;
    }
    let host = format!("{}:{}", svc.hostname(), port.port);
    let parts = match Request::connect(host.as_str()).body(()) {
        Ok(r) => r.into_parts().0,
        Err(_) => return,
    };
    match open_tcp(&ctx, &state, svc, port, parts).await {
        Ok((mut resp, service, cluster)) if resp.status() == http::StatusCode::OK => {
            let meter = tcp_meter(&ctx, &state, &resp, &service, &cluster);
            if let Ok(up) = hyper::upgrade::on(&mut resp).await {
                let mut tcp = meter.io(tcp);
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut TokioIo::new(up)).await;
            }
        }
        Ok((resp, service, _)) => {
            tracing::debug!(%service, status = %resp.status(), "captured TCP refused by the destination")
        }
        Err((e, service)) => tracing::debug!(%service, error = %e, "captured TCP not opened"),
    }
}

/// How long a captured connection to a port of no declared protocol may take to send the
/// first bytes of an HTTP request before it is taken for opaque TCP. A protocol where the
/// server speaks first (MySQL, SMTP) pays this once per connection; declare its port
/// `tcp` to skip it.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether the app opened the connection with an HTTP/1.x request line or the HTTP/2
/// preface, judged on its first bytes (read without consuming them).
pub(crate) async fn sniff_http(tcp: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 16];
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            // Silent until the deadline (the server speaks first), or an error: opaque.
            _ => return false,
        };
        match looks_like_http(&buf[..n]) {
            Some(verdict) => return verdict,
            None if n == 0 => return false,
            // A prefix of a request line: wait for more (peek returns at once while
            // bytes are queued, so give them time to arrive).
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// `Some(true)` for the start of an HTTP/1.x request (a method and a space) or of the
/// HTTP/2 preface, `Some(false)` for bytes that cannot begin one, `None` when too few
/// bytes have come to say.
fn looks_like_http(bytes: &[u8]) -> Option<bool> {
    const STARTS: [&[u8]; 10] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
        b"PRI * HTTP/2.0",
    ];
    let mut undecided = false;
    for start in STARTS {
        let n = bytes.len().min(start.len());
        if bytes[..n] == start[..n] {
            if n == start.len() {
                return Some(true);
            }
            undecided = true;
        }
    }
    if undecided || bytes.is_empty() {
        None
    } else {
        Some(false)
    }
}

/// An unknown destination under `ALLOW_ANY`: the bytes go where the app sent them.
async fn passthrough(mut tcp: tokio::net::TcpStream, original: std::net::SocketAddr) {
    match tokio::time::timeout(
        crate::pool::CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(original),
    )
    .await
    {
        Ok(Ok(mut upstream)) => {
            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
        }
        Ok(Err(e)) => tracing::debug!(%original, error = %e, "passthrough connect failed"),
        Err(_) => tracing::debug!(%original, "passthrough connect timed out"),
    }
}

/// The service a captured connection was going to (by its original destination): what
/// its requests go to when their Host names no service.
#[derive(Clone)]
struct Captured(Arc<crate::state::Service>);

/// Serves one app connection as HTTP/1.1 or HTTP/2 until it closes, idles past the idle
/// timeout, or the sidecar drains.
async fn serve_http(
    ctx: Arc<OutboundCtx>,
    tcp: tokio::net::TcpStream,
    remote: std::net::SocketAddr,
    captured: Option<Captured>,
    d: isthmus_core::drain::Drain,
) {
    let limits = ctx.limits.clone();
    let activity = Arc::new(Activity::new());
    let seen = activity.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let (ctx, activity) = (ctx.clone(), activity.clone());
        req.extensions_mut().insert(ClientAddr(remote));
        if let Some(c) = &captured {
            req.extensions_mut().insert(c.clone());
        }
        async move {
            let _busy = activity.begin();
            Ok::<_, std::convert::Infallible>(handle(&ctx, req).await)
        }
    });
    let builder = server(&limits);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
    let mut conn = std::pin::pin!(conn);
    let mut check =
        tokio::time::interval((limits.idle_timeout / 4).max(Duration::from_millis(250)));
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

/// `http://<authority><path>` put together from parts: nothing formatted or parsed again.
pub(crate) fn http_uri(
    authority: http::uri::Authority,
    path_and_query: PathAndQuery,
) -> Result<Uri, http::uri::InvalidUriParts> {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(authority);
    uri.path_and_query = Some(path_and_query);
    Uri::from_parts(uri)
}

pub(crate) fn split_host(host: &str) -> (&str, Option<u16>) {
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

pub async fn handle(ctx: &Arc<OutboundCtx>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let started = std::time::Instant::now();
    let grpc = is_grpc(req.headers());
    let state = ctx.state.borrow().clone();
    // Cheap clones (reference-counted) kept for the access log.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let h1 = req.version() < Version::HTTP_2;
    let exchange = Exchange::start(&ctx.telemetry, started, &mut req, SpanKind::Client);
    let (resp, service, cluster) = match route(ctx, &state, req, exchange.request_bytes()).await {
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
            (resp, service, unknown())
        }
    };
    if resp.headers().get(ERROR_REASON).is_none() {
        tracing::debug!(target: "access", %method, path = uri.path(), service = %service, cluster = %cluster, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
    }
    let series = Series {
        reporter: Reporter::Source,
        source: state.own.clone(),
        destination: crate::peer::Workloads::unknown(),
        service,
        destination_cluster: cluster,
        protocol: if grpc { "grpc" } else { "http" },
        mutual_tls: None,
    };
    exchange.respond(resp, series)
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

/// A response, or the error to answer with; with the service (and the cluster that
/// answered) named in metrics and logs.
type Routed = Result<
    (Response<ProxyBody>, Arc<DestinationService>, Arc<str>),
    (ProxyError, Arc<DestinationService>),
>;

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
                .and_then(|q| crate::routing_table::query_param(q, name))
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

async fn route(
    ctx: &Arc<OutboundCtx>,
    state: &Arc<MeshState>,
    req: Request<Incoming>,
    counted: RequestBytes,
) -> Routed {
    let (mut parts, body) = req.into_parts();
    ctx.limits
        .admit(&mut parts)
        .map_err(|e| (e, DestinationService::unknown()))?;
    let mut req = Request::from_parts(parts, body);
    // The rarer kinds of request (CONNECT, external hosts, upgrades) run boxed, so their
    // state does not enlarge every request's future.
    if req.method() == http::Method::CONNECT {
        return Box::pin(tcp_tunnel(ctx, state, req)).await;
    }
    let host = request_host(&req).ok_or((ProxyError::NoHost, DestinationService::unknown()))?;
    // An HTTP/1.1 upgrade (WebSocket): the app's side of it, taken before the request is
    // dismantled. `h2c` is dropped (the hop-by-hop headers go below); others are refused.
    let upgrade = match crate::upgrade::classify(req.headers(), &ctx.limits.upgrades) {
        Upgrade::None | Upgrade::Drop => None,
        Upgrade::Carry(proto) => Some((proto, hyper::upgrade::on(&mut req))),
        Upgrade::Refuse(proto) => {
            return Err((
                ProxyError::UpgradeRefused(proto),
                DestinationService::unknown(),
            ))
        }
    };
    req.headers_mut().remove(headers::HTTP2_SETTINGS);
    let (name, port) = split_host(&host);
    let no_route = || {
        (
            ProxyError::NoRoute { host: host.clone() },
            DestinationService::unknown(),
        )
    };
    let svc = match state.resolve(name) {
        Some(svc) => svc.clone(),
        None => match req.extensions().get::<Captured>() {
            Some(Captured(svc)) => svc.clone(),
            None => state.passthrough(port, false).ok_or_else(no_route)?,
        },
    };
    let port = svc.port(port).ok_or_else(no_route)?.clone();
    let (mut parts, body) = req.into_parts();
    let chain = ctx.plugins.chain();
    // A plugin's own callout (the header is stripped below with every internal one).
    let callout = !chain.is_empty() && chain.is_callout(&parts.headers);
    headers::strip_untrusted(&mut parts.headers);
    headers::strip_hop_by_hop(&mut parts.headers);
    // WasmPlugins of the app's own requests (CLIENT), all phases in order: outbound there
    // is no authentication or authorization to place them around. They see the request
    // before routing, as Envoy's filters before its router.
    let mut plugins = crate::wasm::Run::default();
    if !chain.is_empty() && !callout {
        let named = || svc.named();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let properties = crate::wasm::Properties::request(&parts, path, parts.uri.path(), &host)
            .string("source.principal", &state.own.principal)
            .string(
                "cluster_name",
                &format!("outbound|{}||{}", port.port, svc.host),
            )
            .int("listener_direction", 2)
            .done();
        let flow = crate::wasm::Flow {
            chain: &chain,
            side: crate::wasm::Side::Client,
            port: port.port,
            properties: &properties,
        };
        let headers_only = hyper::body::Body::is_end_stream(&body);
        for stage in [Stage::Authn, Stage::Authz, Stage::Last] {
            let answer =
                crate::wasm::on_request(&flow, stage, &mut parts, headers_only, &mut plugins)
                    .await
                    .map_err(|e| (e, named()))?;
            if let Some(answer) = answer {
                return Ok((answer, named(), unknown()));
            }
        }
    }
    parts.headers.remove(http::header::HOST);
    // The path as received (already normalized by `admit`); a rewrite makes a new one.
    let original_path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut path: Cow<'_, str> = Cow::Borrowed(original_path.as_str());
    let mut plan = Plan {
        svc: svc.clone(),
        authority: port.authority.clone(),
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
        .get(headers::GRPC_TIMEOUT)
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
        let service = svc.named();
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
                                service: service.to_string(),
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
                return Ok((direct_response(*status, body), service, unknown()))
            }
            RouteAction::Redirect {
                uri,
                authority,
                code,
            } => {
                return Ok((
                    redirect(uri, authority, *code, &host, &path),
                    service,
                    unknown(),
                ))
            }
            RouteAction::Route(dests) => {
                let d = pick_weighted(dests).ok_or((
                    ProxyError::NoHealthyUpstream {
                        service: service.to_string(),
                    },
                    service.clone(),
                ))?;
                // A destination whose Service (or subset) does not exist (yet): 503, as
                // Istio answers a route to a cluster it does not have.
                let no_dest = || {
                    (
                        ProxyError::NoHealthyUpstream {
                            service: match &d.subset {
                                Some(sub) => format!("{} subset {sub}", d.service),
                                None => d.service.clone(),
                            },
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
                if let Some(sub) = &d.subset {
                    let defined = plan
                        .svc
                        .routing
                        .as_deref()
                        .is_some_and(|r| r.subset(sub).is_some());
                    if !defined {
                        return Err(no_dest());
                    }
                }
                plan.subset = d.subset.clone();
            }
        }
        if let Some(rw) = &spec.rewrite {
            if let Some(uri) = &rw.uri {
                path = Cow::Owned(rewrite_path(&path, prefix, uri));
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
    let service = plan.svc.named();
    plan.authority = dest_port.authority.clone();
    plan.port = dest_port.port;
    let mut set_cookie = None;
    if let Some(LoadBalancer::ConsistentHash(on)) = plan.selection().load_balancer.cloned() {
        (plan.hash, set_cookie) = hash_key(&on, &parts);
    }
    let app_protocol = if dest_port.speaks_h2() {
        "http2"
    } else {
        "http"
    };
    parts
        .headers
        .insert(APP_PROTOCOL, HeaderValue::from_static(app_protocol));
    if plan.svc.external.is_some() {
        if let Some((proto, _)) = upgrade {
            return Err((ProxyError::UpgradeRefused(proto), service));
        }
        let authority = authority_rewrite.as_deref().unwrap_or(&host);
        let resp = Box::pin(crate::egress::to_external(
            ctx, &plan, &dest_port, authority, &path, parts, body, deadline,
        ))
        .await
        .map_err(|e| (e, service.clone()))?;
        return Ok((resp, service, external()));
    }
    let no_host = || (ProxyError::NoHost, service.clone());
    let authority = match authority_rewrite.as_deref() {
        Some(a) => a.parse().map_err(|_| no_host())?,
        None => plan.authority.clone(),
    };
    let path_and_query = match path {
        Cow::Borrowed(_) => original_path.clone(),
        Cow::Owned(ref p) => p.parse().map_err(|_| no_host())?,
    };
    parts.uri = http_uri(authority, path_and_query).map_err(|_| no_host())?;
    parts.version = Version::HTTP_2;
    if let Some((proto, client)) = upgrade {
        let resp = Box::pin(crate::upgrade::through(
            ctx, state, &plan, parts, &path, &proto, client,
        ))
        .await
        .map_err(|e| (e, service.clone()))?;
        return Ok((resp, service, unknown()));
    }
    // The body's bytes count towards the request's size as they are forwarded.
    let idle = ctx.limits.stream_idle_timeout;
    let body = if plugins.is_empty() {
        ReqBody::new(CountedBody::new(body, &counted), idle).await
    } else {
        let body = crate::body::boxed(CountedBody::new(body, &counted));
        ReqBody::new(crate::wasm::request_body(&plugins, body), idle).await
    }
    .map_err(|e| (e, service.clone()))?;
    if let (Some(m), ReqBody::Replayable(bytes)) = (mirror, &body) {
        spawn_mirror(ctx, state, m, parts.clone(), bytes.clone());
    }
    let _admitted = match plan.state() {
        Some(st) => Some(st.breaker.admit().await.ok_or_else(|| {
            (
                ProxyError::Overflow {
                    service: service.to_string(),
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
                service: service.to_string(),
            })),
        None => sent.await,
    };
    let result = match result {
        // A plugin answered from the request's body, which cut it short.
        Err(e) if !plugins.is_empty() => match crate::wasm::take_reply(&plugins) {
            Some(Ok(answer)) => return Ok((answer, service, unknown())),
            Some(Err(failed)) => Err(failed),
            None => Err(e),
        },
        r => r,
    };
    let (mut resp, cluster) = result.map_err(|e| (e, service.clone()))?;
    if !plugins.is_empty() {
        let (mut rparts, rbody) = resp.into_parts();
        let answer = crate::wasm::on_response(&mut plugins, &mut rparts, false)
            .await
            .map_err(|e| (e, service.clone()))?;
        resp = match answer {
            Some(answer) => answer,
            None => Response::from_parts(rparts, crate::wasm::response_body(&plugins, rbody)),
        };
    }
    if let Some(op) = &response_headers {
        apply_header_op(resp.headers_mut(), op);
    }
    if let Some(c) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().append(http::header::SET_COOKIE, c);
    }
    Ok((resp, service, cluster))
}

/// How the calling side counts an opaque connection the destination accepted with `resp`.
fn tcp_meter(
    ctx: &OutboundCtx,
    state: &MeshState,
    resp: &Response<ProxyBody>,
    service: &Arc<DestinationService>,
    cluster: &Arc<str>,
) -> Meter {
    let destination = resp
        .extensions()
        .get::<Answered>()
        .map_or_else(crate::peer::Workloads::unknown, |a| a.0.clone());
    Meter {
        metrics: ctx.metrics.clone(),
        series: Series {
            reporter: Reporter::Source,
            source: state.own.clone(),
            destination,
            service: service.clone(),
            destination_cluster: cluster.clone(),
            protocol: "tcp",
            mutual_tls: None,
        },
    }
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
        .ok_or((ProxyError::NoHost, DestinationService::unknown()))?;
    let (name, port) = split_host(&host);
    let no_route = || {
        (
            ProxyError::NoRoute { host: host.clone() },
            DestinationService::unknown(),
        )
    };
    let svc = match state.resolve(name) {
        Some(svc) => svc.clone(),
        None => state.passthrough(port, true).ok_or_else(no_route)?,
    };
    let asked_port = port;
    let port = port
        .and_then(|p| svc.port(Some(p)))
        .ok_or_else(no_route)?
        .clone();
    if svc.external.is_some() {
        // Outside the mesh: TLS (or any TCP) passes through as bytes, by the host asked for.
        let service = svc.named();
        let addrs = crate::egress::addresses(&svc, &port, name, asked_port.unwrap_or(port.port))
            .await
            .map_err(|e| (e, service.clone()))?;
        let origination = svc
            .routing
            .as_deref()
            .and_then(|r| r.state_for(None, port.port))
            .and_then(|s| s.tls.clone());
        let tls = origination.as_deref().map(|o| (o, name));
        let resp = crate::egress::tunnel(&service.host, &addrs, req, &ctx.drain, tls)
            .await
            .map_err(|e| (e, service.clone()))?;
        return Ok((resp, service, external()));
    }
    let client = hyper::upgrade::on(&mut req);
    let (parts, _body) = req.into_parts();
    let (mut resp, service, cluster) = open_tcp(ctx, state, svc, port, parts).await?;
    if resp.status() != http::StatusCode::OK {
        return Ok((resp, service, cluster));
    }
    let meter = tcp_meter(ctx, state, &resp, &service, &cluster);
    crate::upgrade::splice(
        client,
        hyper::upgrade::on(&mut resp),
        &ctx.drain,
        Some(meter.clone()),
    );
    let mut answer = Response::new(crate::pool::empty_body());
    answer
        .extensions_mut()
        .insert(Answered(meter.series.destination));
    Ok((answer, service, cluster))
}

/// Opens an opaque tunnel to `port` of `svc` (through its VirtualService's `tcp[]`
/// routes) for an app's CONNECT or a captured TCP connection. The answer is the peer's:
/// 200 with the tunnel to upgrade into, or its refusal.
async fn open_tcp(
    ctx: &Arc<OutboundCtx>,
    state: &Arc<MeshState>,
    mut svc: Arc<crate::state::Service>,
    mut port: crate::state::Port,
    mut parts: http::request::Parts,
) -> Routed {
    let host = svc.hostname();
    let no_route = || {
        (
            ProxyError::NoRoute {
                host: host.to_string(),
            },
            DestinationService::unknown(),
        )
    };
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
    let service = svc.named();
    headers::strip_untrusted(&mut parts.headers);
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(
        crate::upgrade::TARGET_PORT,
        HeaderValue::from(port.target_port),
    );
    let plan = Plan {
        authority: port.authority.clone(),
        svc,
        subset,
        retry: RetryPolicy::default_policy(),
        hash: None,
        own_labels: state.own_labels.clone(),
        port: port.port,
    };
    parts.uri = Uri::from(plan.authority.clone());
    parts.version = Version::HTTP_2;
    let (resp, cluster) = attempts(
        ctx,
        state,
        &plan,
        parts,
        ReqBody::Replayable(bytes::Bytes::new()),
    )
    .await
    .map_err(|e| (e, service.clone()))?;
    Ok((resp, service, cluster))
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
    let authority = port.authority.clone();
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

#[cfg(test)]
mod tests {
    use super::{looks_like_http, split_host};

    #[test]
    fn http_is_told_from_other_protocols_by_its_first_bytes() {
        for http in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST ",
            b"PRI * HTTP/2.0\r\n\r\nSM",
        ] {
            assert_eq!(looks_like_http(http), Some(true), "{http:?}");
        }
        for undecided in [&b""[..], b"G", b"GE", b"P", b"PRI * HT", b"DELET"] {
            assert_eq!(looks_like_http(undecided), None, "{undecided:?}");
        }
        // TLS, a Postgres startup message, Redis, a lower-case method, no space.
        for other in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"\x00\x00\x00\x08\x04\xd2",
            b"*1\r\n$4\r\nPING",
            b"get / ",
            b"GETX",
        ] {
            assert_eq!(looks_like_http(other), Some(false), "{other:?}");
        }
    }

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
