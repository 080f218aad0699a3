//! The inbound listener (15008): mTLS from other proxies (directly, or spliced through a
//! gateway), HTTP/2 inside. Each request is handed to the local app in the protocol the
//! app speaks, with the caller's verified SPIFFE ID in `x-forwarded-client-cert`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use isthmus_core::headers::{self, APP_PROTOCOL, XFCC};
use isthmus_core::identity::SpiffeId;
use isthmus_core::tls::{ClientAuth, PeerPolicy, TlsIdentity, ALPN_H2};
use tokio::net::{TcpListener, TcpStream};

use crate::app::AppPool;
use crate::authz;
use crate::errors::{is_grpc, ProxyError};
use crate::metrics::{DestinationService, Metrics, Reporter, Series};
use crate::peer::{Workload, Workloads};
use crate::pool::ProxyBody;
use crate::telemetry::{CountedBody, Exchange, Meter, RequestBytes};
use crate::wasm::Stage;
use isthmus_core::headers::{PEER_MAX_HEADER_LIST, PEER_MAX_PENDING_RESETS};
use opentelemetry::trace::SpanKind;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections to the app kept per protocol.
const APP_POOL_IDLE: Duration = Duration::from_secs(90);

pub struct InboundCtx {
    pub identity: TlsIdentity,
    /// Where the app listens; `None` for a sidecar with no app (a pure client).
    pub app: Option<SocketAddr>,
    pub cluster: Arc<str>,
    pub metrics: Arc<Metrics>,
    /// Request metrics, spans and access logs.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// The mesh as pushed, for this service's rate limits.
    pub state: tokio::sync::watch::Receiver<Arc<crate::state::MeshState>>,
    /// Spawns the splices of upgraded connections.
    pub drain: isthmus_core::drain::Drain,
    /// This workload, `namespace/name`.
    pub workload: String,
    pub limits: crate::ingress::Limits,
    /// The app's address as a URI authority, for the requests handed to it.
    app_authority: Option<http::uri::Authority>,
    /// HTTP/1.1 to the app (its own pool); HTTP/2 apps through hyper's pooling client.
    app_h1: Arc<AppPool>,
    app_h2: Client<HttpConnector, ProxyBody>,
    /// Calls to external authorization providers go out as the app's requests do.
    outbound: Arc<crate::outbound::OutboundCtx>,
    /// The buckets of the global rate limits this sidecar enforces.
    global_limits: Arc<crate::global_limit::GlobalLimits>,
}

impl InboundCtx {
    /// The app, cluster, workload and limits come from the sidecar's static config.
    pub fn new(
        identity: TlsIdentity,
        config: &crate::Config,
        telemetry: Arc<crate::telemetry::Telemetry>,
        state: tokio::sync::watch::Receiver<Arc<crate::state::MeshState>>,
        drain: isthmus_core::drain::Drain,
        outbound: Arc<crate::outbound::OutboundCtx>,
        global_limits: Arc<crate::global_limit::GlobalLimits>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        // With no app, requests are refused before they reach the pool.
        let app_addr = config
            .app_addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let app_h1 = AppPool::new(app_addr, APP_POOL_IDLE);
        let app_h2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(APP_POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .build(connector);
        Self {
            identity,
            app: config.app_addr,
            cluster: config.cluster.as_str().into(),
            metrics: telemetry.metrics.clone(),
            telemetry,
            state,
            drain,
            workload: config.workload.to_string(),
            limits: config.limits.clone(),
            app_authority: config
                .app_addr
                .and_then(|a| http::uri::Authority::try_from(a.to_string()).ok()),
            app_h1,
            app_h2,
            outbound,
            global_limits,
        }
    }
}

pub struct Inbound {
    listener: TcpListener,
    ctx: Arc<InboundCtx>,
    drain: isthmus_core::drain::Drain,
}

impl Inbound {
    pub fn new(
        listener: TcpListener,
        ctx: Arc<InboundCtx>,
        drain: isthmus_core::drain::Drain,
    ) -> Self {
        Self {
            listener,
            ctx,
            drain,
        }
    }

    pub async fn run(self) {
        let td = self.ctx.identity.id().trust_domain().to_owned();
        let tls = self.ctx.identity.server_config(
            ClientAuth::Required(PeerPolicy::TrustDomain(td)),
            &[ALPN_H2],
        );
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let Ok((tcp, remote)) = self.listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, ctx, d) = (acceptor.clone(), self.ctx.clone(), self.drain.clone());
            self.drain.spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        return tracing::info!(%remote, error = %e, "inbound handshake refused")
                    }
                    Err(_) => return tracing::debug!(%remote, "inbound handshake timed out"),
                };
                let Some(peer) = isthmus_core::tls::peer_identity(tls.get_ref().1) else {
                    return;
                };
                let local = tls.get_ref().0.local_addr().ok();
                let caller = Arc::new(Caller::new(&ctx, peer, remote, local));
                let svc = hyper::service::service_fn(move |req| {
                    let (ctx, caller) = (ctx.clone(), caller.clone());
                    async move { Ok::<_, std::convert::Infallible>(handle(&ctx, &caller, req).await) }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(10))
                    .max_header_list_size(PEER_MAX_HEADER_LIST)
                    .max_pending_accept_reset_streams(PEER_MAX_PENDING_RESETS)
                    .serve_connection(TokioIo::new(tls), svc);
                let mut conn = std::pin::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    _ = d.draining() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(%remote, error = %e, "inbound connection ended");
                }
            });
        }
    }
}

/// The proxy at the other end of an inbound connection: its identity is fixed for the
/// connection's life, and so is what the app is told about it. A plaintext caller from
/// outside the mesh (captured on 15006, let in by PERMISSIVE) has no identity.
struct Caller {
    id: Option<SpiffeId>,
    /// `x-forwarded-client-cert` for every request of the connection.
    xfcc: Option<HeaderValue>,
    /// The identity as AuthorizationPolicies name it: the SPIFFE ID without `spiffe://`.
    principal: Option<String>,
    /// The connection's source and destination addresses.
    remote: SocketAddr,
    local: Option<SocketAddr>,
}

impl Caller {
    fn new(ctx: &InboundCtx, id: SpiffeId, remote: SocketAddr, local: Option<SocketAddr>) -> Self {
        let xfcc = format!("By={};URI={id}", ctx.identity.id());
        let xfcc = HeaderValue::from_str(&xfcc).expect("SPIFFE IDs are valid header text");
        let principal = id.to_string();
        let principal = principal
            .strip_prefix("spiffe://")
            .unwrap_or(&principal)
            .to_owned();
        Self {
            id: Some(id),
            xfcc: Some(xfcc),
            principal: Some(principal),
            remote,
            local,
        }
    }

    /// A plaintext caller from outside the mesh, at `remote`, calling `local`.
    fn plaintext(remote: SocketAddr, local: SocketAddr) -> Self {
        Self {
            id: None,
            xfcc: None,
            principal: None,
            remote,
            local: Some(local),
        }
    }

    /// How logs name the caller.
    /// Who is calling, for telemetry: what its sidecar says (`x-isthmus-peer`), with the
    /// namespace and principal its certificate proves; nothing for a plaintext caller.
    fn workload(&self, metrics: &Metrics, headers: &http::HeaderMap) -> Arc<Workload> {
        let Some(id) = &self.id else {
            return Workloads::unknown();
        };
        let told = headers
            .get(crate::peer::PEER)
            .map_or(&b""[..], |v| v.as_bytes());
        metrics.workloads.described(told, Some(id))
    }

    fn name(&self) -> &str {
        self.principal.as_deref().unwrap_or("-")
    }

    /// Who per-caller rate limits count against: the identity, or the address of a
    /// caller without one.
    fn limit_key(&self) -> String {
        match &self.id {
            Some(id) => id.to_string(),
            None => self.remote.ip().to_string(),
        }
    }

    /// The attributes AuthorizationPolicies judge a request (or, with no HTTP, a
    /// connection) of this caller on.
    fn attributes<'a>(
        &'a self,
        port: u16,
        http: Option<authz::Http<'a>>,
        auth: Option<&'a authz::Authenticated>,
    ) -> authz::Attributes<'a> {
        authz::Attributes {
            principal: self.principal.as_deref(),
            source_ip: self.remote.ip(),
            destination_ip: self.local.map(|l| l.ip()),
            destination_port: port,
            http,
            auth,
        }
    }
}

/// What AuthorizationPolicies see of a request: `path` (normalized, no query) and its
/// `lax` form, the authority the caller asked for, method and headers.
fn http_view<'a>(
    parts: &'a http::request::Parts,
    authority: Option<&'a http::uri::Authority>,
    path: &'a str,
    lax: &'a str,
) -> authz::Http<'a> {
    authz::Http {
        host: authority.map_or("", |a| a.as_str()),
        method: parts.method.as_str(),
        path,
        lax_path: lax,
        headers: &parts.headers,
    }
}

/// Serves a plaintext HTTP connection from outside the mesh (captured on 15006, let in by
/// PERMISSIVE) request by request, as mesh requests are served: the AuthorizationPolicies,
/// RequestAuthentication and external authorization judge each request on its method,
/// path and headers, with no peer identity. `local` is where the caller was going: the
/// app's port.
pub(crate) async fn serve_plaintext(
    ctx: Arc<InboundCtx>,
    tcp: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
) {
    let caller = Arc::new(Caller::plaintext(remote, local));
    let svc = hyper::service::service_fn(move |req| {
        let (ctx, caller) = (ctx.clone(), caller.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(&ctx, &caller, req).await) }
    });
    let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
        .await;
    if let Err(e) = served {
        tracing::debug!(%remote, error = %e, "plaintext inbound connection ended");
    }
}

/// Applies the workload's AuthorizationPolicies; a denial is counted and logged with the
/// policy that made it.
pub(crate) fn authorize(
    policy: &authz::InboundPolicy,
    metrics: &Metrics,
    attributes: &authz::Attributes<'_>,
) -> Result<(), ProxyError> {
    if policy.is_empty() {
        return Ok(());
    }
    // External authorization of connections (Envoy's network ext_authz) is not built: a
    // CUSTOM policy that matches a connection denies it rather than let it pass unasked.
    // HTTP requests are asked before they get here.
    if attributes.http.is_none() && policy.has_custom() {
        let by = match policy.custom_checks(attributes) {
            Err(policy) => Some(policy),
            Ok(checks) => checks.into_iter().find(|c| !c.dry_run).map(|c| c.policy),
        };
        if let Some(by) = by {
            metrics.denied(&by);
            tracing::info!(target: "authz", policy = %by, principal = attributes.principal.unwrap_or("-"), source = %attributes.source_ip, port = attributes.destination_port, "RBAC: access denied (CUSTOM policies cannot ask a provider about TCP connections yet)");
            return Err(ProxyError::Forbidden);
        }
    }
    match policy.check(attributes) {
        authz::Verdict::Allow => Ok(()),
        authz::Verdict::Deny(by) => {
            let by = by.as_deref().unwrap_or("no ALLOW policy matched");
            metrics.denied(by);
            tracing::info!(target: "authz", policy = by, principal = attributes.principal.unwrap_or("-"), source = %attributes.source_ip, port = attributes.destination_port, path = attributes.http.as_ref().map(|h| h.path).unwrap_or("-"), "RBAC: access denied");
            Err(ProxyError::Forbidden)
        }
    }
}

async fn handle(
    ctx: &InboundCtx,
    caller: &Caller,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = std::time::Instant::now();
    let grpc = is_grpc(req.headers());
    // The service asked for, as the registry names it (a name the registry does not know
    // is never copied from the request into a metric label).
    // A mirrored copy names `<host>-shadow` (Istio's convention), and is counted so.
    let state = ctx.state.borrow().clone();
    let host = req.uri().host().unwrap_or_default();
    let (svc, service) = match host.strip_suffix("-shadow").map(|h| state.resolve(h)) {
        Some(Some(s)) => (
            None,
            DestinationService::new(format!("{}-shadow", s.host).into(), &s.name, &s.namespace),
        ),
        Some(None) => (None, DestinationService::unknown()),
        None => {
            let svc = state.resolve(host);
            (
                svc,
                svc.map_or_else(DestinationService::unknown, |s| s.named()),
            )
        }
    };
    let series = Series {
        reporter: Reporter::Destination,
        source: caller.workload(&ctx.metrics, req.headers()),
        destination: state.own.clone(),
        service,
        destination_cluster: ctx.cluster.clone(),
        protocol: if grpc { "grpc" } else { "http" },
        mutual_tls: Some(caller.id.is_some()),
    };
    let exchange = Exchange::start(&ctx.telemetry, started, &mut req, SpanKind::Server);
    if req.method() == http::Method::CONNECT {
        req.extensions_mut().insert(Meter {
            metrics: ctx.metrics.clone(),
            series: Series {
                protocol: "tcp",
                ..series.clone()
            },
        });
    }
    let counted = exchange.request_bytes();
    let mut resp = match forward(ctx, caller, &state, svc.map(|s| &**s), req, counted).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(peer = caller.name(), error = %e, "inbound request failed");
            e.respond(grpc)
        }
    };
    if caller.id.is_some() {
        // Who answered, for the calling sidecar's telemetry.
        resp.headers_mut()
            .insert(crate::peer::PEER, state.own.header().clone());
    }
    exchange.respond(resp, series)
}

impl InboundCtx {
    /// How a plaintext connection to `port` of this workload (captured, from outside the
    /// mesh) is counted: for the service that declares the port, from a source unknown.
    pub(crate) fn plaintext_meter(&self, port: u16) -> Meter {
        let state = self.state.borrow().clone();
        let service = state
            .services
            .values()
            .find(|s| {
                s.workloads.contains(&self.workload)
                    && s.ports.iter().any(|p| p.target_port == port)
            })
            .map_or_else(DestinationService::unknown, |s| s.named());
        Meter {
            metrics: self.metrics.clone(),
            series: Series {
                reporter: Reporter::Destination,
                source: Workloads::unknown(),
                destination: state.own.clone(),
                service,
                destination_cluster: self.cluster.clone(),
                protocol: "tcp",
                mutual_tls: Some(false),
            },
        }
    }
}

/// Applies the LocalRateLimits of the service a request is for.
fn check_rate_limits(
    svc: Option<&crate::state::Service>,
    caller: &Caller,
    headers: &http::HeaderMap,
) -> Result<(), ProxyError> {
    let Some(routing) = svc.and_then(|s| s.routing.as_ref()) else {
        return Ok(());
    };
    let route = headers
        .get(isthmus_core::headers::ROUTE)
        .and_then(|v| v.to_str().ok());
    if routing.limits.is_empty() {
        return Ok(());
    }
    let caller = caller.limit_key();
    for limit in &routing.limits {
        limit
            .check(route, &caller)
            .map_err(|wait| ProxyError::RateLimited { retry_after: wait })?;
    }
    Ok(())
}

/// Applies the GlobalRateLimits of the service a request is for.
fn check_global_limits(
    ctx: &InboundCtx,
    state: &crate::state::MeshState,
    svc: Option<&crate::state::Service>,
    headers: &http::HeaderMap,
) -> Result<(), ProxyError> {
    let Some(svc) = svc.filter(|s| s.routing.as_ref().is_some_and(|r| !r.global.is_empty())) else {
        return Ok(());
    };
    let route = headers
        .get(isthmus_core::headers::ROUTE)
        .and_then(|v| v.to_str().ok());
    ctx.global_limits
        .check(&state.mesh, svc, route)
        .map_err(|wait| ProxyError::RateLimited { retry_after: wait })
}

async fn forward(
    ctx: &InboundCtx,
    caller: &Caller,
    state: &Arc<crate::state::MeshState>,
    svc: Option<&crate::state::Service>,
    req: Request<Incoming>,
    counted: RequestBytes,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (Some(app), Some(app_authority)) = (ctx.app, &ctx.app_authority) else {
        return Err(ProxyError::AppUnavailable(
            "this workload has no application port".into(),
        ));
    };
    if req.method() == http::Method::CONNECT {
        if caller.id.is_none() {
            return Err(ProxyError::InvalidRequest(
                "CONNECT is for tunnels between sidecars".into(),
            ));
        }
        check_rate_limits(svc, caller, req.headers())?;
        check_global_limits(ctx, state, svc, req.headers())?;
        if !req.headers().contains_key(crate::upgrade::UPGRADE) {
            // Opaque TCP only reaches ports a service of this workload declares.
            let port = req
                .headers()
                .get(crate::upgrade::TARGET_PORT)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u16>().ok());
            let attributes = caller.attributes(port.unwrap_or(app.port()), None, None);
            authorize(&state.inbound, &ctx.metrics, &attributes)?;
            let declared = state
                .services
                .values()
                .filter(|s| s.workloads.contains(&ctx.workload))
                .any(|s| s.ports.iter().any(|p| Some(p.target_port) == port));
            if !declared {
                return Err(ProxyError::TunnelUnsupported);
            }
            // Boxed, as the upgrade below: rare, and not to enlarge every request's future.
            return Box::pin(crate::upgrade::tcp_to_app(app, req, &ctx.drain)).await;
        }
        // An upgraded connection (WebSocket) is judged as a connection to the app's port.
        authorize(
            &state.inbound,
            &ctx.metrics,
            &caller.attributes(app.port(), None, None),
        )?;
        return Box::pin(crate::upgrade::to_app(
            app,
            caller
                .xfcc
                .clone()
                .unwrap_or_else(|| HeaderValue::from_static("")),
            req,
            &ctx.drain,
        ))
        .await;
    }
    if caller.id.is_none() && req.headers().contains_key(http::header::UPGRADE) {
        // A plaintext caller's HTTP/1.1 upgrade (WebSocket): judged as a request, then
        // spliced to the app.
        let (parts, body) = req.into_parts();
        let lax = authz::lax_path(parts.uri.path());
        let http = http_view(&parts, parts.uri.authority(), parts.uri.path(), &lax);
        authorize(
            &state.inbound,
            &ctx.metrics,
            &caller.attributes(app.port(), Some(http), None),
        )?;
        let req = Request::from_parts(parts, body);
        return Box::pin(crate::upgrade::plaintext_to_app(app, req, &ctx.drain)).await;
    }
    let (mut parts, body) = req.into_parts();
    check_rate_limits(svc, caller, &parts.headers)?;
    check_global_limits(ctx, state, svc, &parts.headers)?;

    let h2 = parts
        .headers
        .get(APP_PROTOCOL)
        .is_some_and(|v| v == "http2");
    let authority = parts.uri.authority().cloned();
    headers::strip_untrusted(&mut parts.headers);
    headers::strip_hop_by_hop(&mut parts.headers);
    if let Some(xfcc) = &caller.xfcc {
        parts.headers.insert(XFCC, xfcc.clone());
    }
    let received = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let path = received.as_str();
    // The calling sidecar normalized the path already; doing it again costs nothing when
    // there is nothing to do, and keeps what the app sees independent of the caller.
    let invalid =
        |e: &dyn std::fmt::Display| ProxyError::InvalidRequest(format!("path `{path}`: {e}"));
    let mut path_and_query =
        match isthmus_core::path::normalize_target(path, ctx.limits.path_normalization) {
            Ok(None) => received.clone(),
            Ok(Some(normalized)) => PathAndQuery::try_from(normalized).map_err(|e| invalid(&e))?,
            Err(e) => return Err(invalid(&e)),
        };
    // WasmPlugins, when the workload has any: AUTHN ones now, before the token is checked.
    let chain = ctx.outbound.plugins.chain();
    let mut plugins = Plugins::new(&chain, ctx, caller, app.port());
    plugins.headers_only = hyper::body::Body::is_end_stream(&body);
    if let Some(answer) = plugins
        .stage(Stage::Authn, &mut parts, &mut path_and_query)
        .await?
    {
        return Ok(answer);
    }
    // A token is checked first (an invalid one is refused, 401), then the policies judge
    // the path the app will see.
    let auth = if state.inbound.has_jwt() {
        state.inbound.authenticate(&mut parts).map_err(|reason| {
            tracing::info!(target: "authz", principal = caller.name(), %reason, "JWT refused");
            ProxyError::Unauthenticated(reason)
        })?
    } else {
        None
    };
    if let Some(answer) = plugins
        .stage(Stage::Authz, &mut parts, &mut path_and_query)
        .await?
    {
        return Ok(answer);
    }
    let mut body = crate::body::boxed(CountedBody::new(body, &counted));
    let mut allowed = Vec::new();
    // The path as lax apps read it, for DENY rules: made once for every policy below.
    let lax = if state.inbound.is_empty() {
        String::new()
    } else {
        authz::lax_path(path_and_query.path())
    };
    if state.inbound.has_custom() {
        // Which providers to ask, decided before anything is awaited (the views of the
        // request borrow it).
        let checks = {
            let http = http_view(&parts, authority.as_ref(), path_and_query.path(), &lax);
            let attributes = caller.attributes(app.port(), Some(http), auth.as_ref());
            state.inbound.custom_checks(&attributes).map_err(|policy| {
                ctx.metrics.denied(&policy);
                tracing::info!(target: "authz", %policy, principal = caller.name(), "CUSTOM policy names no extension provider the mesh config has: denied");
                ProxyError::Forbidden
            })?
        };
        if !checks.is_empty() {
            let check = crate::ext_authz::Check {
                method: parts.method.clone(),
                path: path_and_query.as_str().to_owned(),
                version: parts.version,
                headers: parts.headers.clone(),
                host: authority
                    .as_ref()
                    .map_or_else(String::new, |a| a.as_str().to_owned()),
                body: None,
                source: caller.remote,
                source_principal: caller
                    .id
                    .as_ref()
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
                destination: caller.local,
                destination_principal: ctx.identity.id().to_string(),
            };
            // Boxed as a trait object: rare, kept out of every request's future, and its
            // Send-ness is settled here rather than inferred through hyper's service.
            let asked: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>> =
                Box::pin(external_authorization(
                    ctx, caller, state, checks, check, body,
                ));
            match asked.await? {
                (Ok(a), rest) => {
                    for x in &a {
                        x.apply(&mut parts.headers);
                    }
                    allowed = a;
                    body = rest;
                }
                (Err(denial), _) => return Ok(denial),
            }
        }
    }
    if !state.inbound.is_empty() {
        let http = http_view(&parts, authority.as_ref(), path_and_query.path(), &lax);
        authorize(
            &state.inbound,
            &ctx.metrics,
            &caller.attributes(app.port(), Some(http), auth.as_ref()),
        )?;
    }
    if let Some(answer) = plugins
        .stage(Stage::Last, &mut parts, &mut path_and_query)
        .await?
    {
        return Ok(answer);
    }
    parts.uri = crate::outbound::http_uri(app_authority.clone(), path_and_query)
        .map_err(|e| ProxyError::AppUnavailable(e.to_string()))?;
    let body = crate::wasm::request_body(&plugins.run, body);
    let sent = if h2 {
        parts.version = Version::HTTP_2;
        let req = Request::from_parts(parts, body);
        ctx.app_h2
            .request(req)
            .await
            .map(|r| r.map(crate::body::boxed))
            .map_err(|e| match e {
                // Refused is proof the app is not there; a connect that timed out may be an
                // app (or a machine) under load, and is judged like a 5xx, one of several.
                e if e.is_connect() && refused(&e) => {
                    ProxyError::AppUnavailable(format!("{app}: {e}"))
                }
                e if e.is_connect() => ProxyError::AppConnectTimeout(format!("{app}: {e}")),
                e => ProxyError::AppReset(format!("{app}: {e}")),
            })
    } else {
        parts.version = Version::HTTP_11;
        if let Some(v) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            parts.headers.insert(http::header::HOST, v);
        }
        let req = Request::from_parts(parts, body);
        ctx.app_h1
            .send(req)
            .await
            .map(|r| r.map(crate::body::boxed))
            .map_err(ProxyError::from)
    };
    let sent = match sent {
        // A plugin answered from the request's body, which cut it short.
        Err(e) => return crate::wasm::take_reply(&plugins.run).unwrap_or(Err(e)),
        Ok(sent) => sent,
    };
    let (mut rparts, rbody) = sent.into_parts();
    headers::strip_hop_by_hop(&mut rparts.headers);
    // Nothing the app sets may pass for a proxy's signal.
    headers::strip_untrusted(&mut rparts.headers);
    ctx.limits
        .check_headers(&rparts.headers)
        .map_err(|e| ProxyError::ResponseHeadersTooLarge(e.to_string()))?;
    for a in &allowed {
        for (name, value) in &a.downstream {
            rparts.headers.append(name.clone(), value.clone());
        }
    }
    if let Some(answer) = plugins.response(&mut rparts).await? {
        return Ok(answer);
    }
    let rbody = crate::body::Watched::new(rbody, ctx.limits.stream_idle_timeout);
    let rbody = crate::wasm::response_body(&plugins.run, crate::body::boxed(rbody));
    Ok(Response::from_parts(rparts, rbody))
}

/// The WasmPlugins one inbound request runs through (nothing at all when the workload has
/// none): the request's properties are made once, when the first plugin runs.
struct Plugins<'a> {
    chain: &'a crate::wasm::Chain,
    run: crate::wasm::Run,
    ctx: &'a InboundCtx,
    caller: &'a Caller,
    /// Made when the first stage runs, from the request as it stood then.
    properties: Option<crate::wasm::PropertyMap>,
    port: u16,
    /// The request has no body: plugins are told its headers end it.
    headers_only: bool,
}

impl<'a> Plugins<'a> {
    fn new(
        chain: &'a crate::wasm::Chain,
        ctx: &'a InboundCtx,
        caller: &'a Caller,
        port: u16,
    ) -> Self {
        Self {
            chain,
            run: crate::wasm::Run::default(),
            ctx,
            caller,
            properties: None,
            port,
            headers_only: false,
        }
    }

    /// What plugins may read of this request and its caller.
    fn properties(
        &self,
        parts: &http::request::Parts,
        path: &PathAndQuery,
    ) -> crate::wasm::PropertyMap {
        let (caller, own) = (self.caller, self.ctx.identity.id().to_string());
        let host = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or_default();
        let id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let peer = caller
            .id
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_default();
        let mut p = crate::wasm::Properties::request(parts, path.as_str(), path.path(), host)
            .string("request.id", id)
            .string("source.address", &caller.remote.to_string())
            .int("source.port", i64::from(caller.remote.port()))
            .string("source.principal", &peer)
            .string("connection.uri_san_peer_certificate", &peer)
            .bool("connection.mtls", caller.id.is_some())
            .string("destination.principal", &own)
            .string("connection.uri_san_local_certificate", &own)
            .int("listener_direction", 1);
        if let Some(local) = caller.local {
            p = p
                .string("destination.address", &local.to_string())
                .int("destination.port", i64::from(local.port()));
        }
        p.done()
    }

    /// Runs the plugins of `stage` over the request; `Some`: a plugin answered it.
    async fn stage(
        &mut self,
        stage: crate::wasm::Stage,
        parts: &mut http::request::Parts,
        path: &mut PathAndQuery,
    ) -> Result<Option<Response<ProxyBody>>, ProxyError> {
        if self.chain.is_empty() {
            return Ok(None);
        }
        let properties = match &self.properties {
            Some(p) => p.clone(),
            None => {
                let p = self.properties(parts, path);
                self.properties.insert(p).clone()
            }
        };
        // Plugins see (and may change) the path the app will see.
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.path_and_query = Some(path.clone());
        parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
        let flow = crate::wasm::Flow {
            chain: self.chain,
            side: crate::wasm::Side::Server,
            port: self.port,
            properties: &properties,
        };
        let answer =
            crate::wasm::on_request(&flow, stage, parts, self.headers_only, &mut self.run).await?;
        if let Some(p) = parts.uri.path_and_query() {
            *path = p.clone();
        }
        Ok(answer)
    }

    /// Runs the response callbacks of the plugins that saw the request.
    async fn response(
        &mut self,
        parts: &mut http::response::Parts,
    ) -> Result<Option<Response<ProxyBody>>, ProxyError> {
        if self.run.is_empty() {
            return Ok(None);
        }
        crate::wasm::on_response(&mut self.run, parts, false).await
    }
}

/// Asks the providers of `checks` in turn: what the allowing ones ask to change, and the
/// body to forward; or the first denial, which is the client's answer.
#[allow(clippy::type_complexity)]
async fn external_authorization(
    ctx: &InboundCtx,
    caller: &Caller,
    state: &Arc<crate::state::MeshState>,
    checks: Vec<authz::CustomCheck>,
    mut check: crate::ext_authz::Check,
    body: ProxyBody,
) -> Result<
    (
        Result<Vec<crate::ext_authz::Allowed>, Response<ProxyBody>>,
        ProxyBody,
    ),
    ProxyError,
> {
    let (sent, body) = body_for_check(body, &checks, ctx.limits.stream_idle_timeout).await?;
    check.body = sent;
    let check = Arc::new(check);
    let mut allowed = Vec::new();
    for c in checks {
        let asked = crate::ext_authz::check(
            ctx.outbound.clone(),
            state.clone(),
            c.provider.clone(),
            check.clone(),
        );
        match asked.await {
            crate::ext_authz::Decision::Allow(a) => allowed.push(a),
            crate::ext_authz::Decision::Deny(resp) if c.dry_run => {
                tracing::info!(target: "authz", policy = %c.policy, provider = %c.provider.name, status = resp.status().as_u16(), "dry run: would deny");
            }
            crate::ext_authz::Decision::Deny(resp) => {
                ctx.metrics.denied(&c.policy);
                tracing::info!(target: "authz", policy = %c.policy, provider = %c.provider.name, principal = caller.name(), status = resp.status().as_u16(), "denied by external authorization");
                return Ok((Err(resp), body));
            }
        }
    }
    Ok((Ok(allowed), body))
}

/// The body (or its first bytes) the external authorization providers of `checks` want
/// to see, and the body to forward: the whole request, read again from what was taken.
/// A body longer than they take is refused with 413, unless every one of them allows a
/// partial message.
async fn body_for_check(
    body: ProxyBody,
    checks: &[authz::CustomCheck],
    idle: Duration,
) -> Result<(Option<bytes::Bytes>, ProxyBody), ProxyError> {
    use futures::StreamExt;
    use http_body_util::BodyExt;
    let max = checks
        .iter()
        .map(|c| c.provider.max_body)
        .max()
        .unwrap_or(0);
    if max == 0 {
        return Ok((None, body));
    }
    let partial = checks
        .iter()
        .filter(|c| c.provider.max_body > 0)
        .all(|c| c.provider.allow_partial);
    let mut body = crate::body::Watched::new(body, idle);
    let mut taken = bytes::BytesMut::new();
    let mut trailers = None;
    let mut ended = false;
    while taken.len() <= max {
        match body.frame().await {
            None => {
                ended = true;
                break;
            }
            Some(Err(e)) => return Err(ProxyError::RequestBody(e.to_string())),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => taken.extend_from_slice(&data),
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    ended = true;
                    break;
                }
            },
        }
    }
    if !ended && !partial {
        return Err(ProxyError::PayloadTooLarge(max));
    }
    let taken = taken.freeze();
    let sent = taken.slice(..taken.len().min(max));
    let head = futures::stream::iter(
        std::iter::once(Ok::<_, crate::pool::BoxError>(hyper::body::Frame::data(
            taken,
        )))
        .chain(trailers.map(|t| Ok(hyper::body::Frame::trailers(t)))),
    );
    let forwarded = if ended {
        BodyExt::boxed(http_body_util::StreamBody::new(head))
    } else {
        let rest = http_body_util::BodyStream::new(body)
            .map(|f| f.map_err(|e| crate::pool::BoxError::from(e.to_string())));
        BodyExt::boxed(http_body_util::StreamBody::new(head.chain(rest)))
    };
    Ok((Some(sent), forwarded))
}

/// Whether a connect error says the app refused the connection.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        source = err.source();
    }
    false
}
