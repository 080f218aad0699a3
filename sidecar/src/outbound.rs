//! The outbound listener: the app sends plain HTTP/1.1 or HTTP/2 here, naming the mesh
//! service in the Host header. The sidecar picks an endpoint by locality, sends the request
//! over the peer's mTLS HTTP/2 connection (direct, or through the gateway for another
//! cluster), and retries on another endpoint when a peer cannot be reached or resets.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_core::headers::{self, APP_PROTOCOL, ERROR_REASON, UPSTREAM_CLUSTER};
use isthmus_core::locality::Locality;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::errors::{is_grpc, ProxyError};
use crate::lb::{pick, EndpointHealth, Target};
use crate::metrics::{Metrics, ReasonLabels, RequestLabels};
use crate::pool::{Pool, ProxyBody, H2};
use crate::state::{MeshState, Service};

/// Attempts per request, the first included.
const MAX_ATTEMPTS: usize = 4;
/// Request bodies up to this size with a known length are kept for retries; larger or
/// streaming bodies are forwarded without copying and retried only if never sent.
const REPLAY_LIMIT: u64 = 16 * 1024;

/// What every outbound request needs.
pub struct OutboundCtx {
    pub state: watch::Receiver<Arc<MeshState>>,
    pub pool: Pool,
    pub locality: Locality,
    pub metrics: Metrics,
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
            let Ok((tcp, _)) = self.listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (ctx, d) = (self.ctx.clone(), self.drain.clone());
            self.drain.spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let ctx = ctx.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&ctx, req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = d.draining() => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            });
        }
    }
}

/// The request body, replayable when small.
enum ReqBody {
    Replayable(Bytes),
    Once(Option<Incoming>),
}

impl ReqBody {
    async fn new(body: Incoming) -> Result<Self, ProxyError> {
        let hint = body.size_hint();
        if hint.exact().is_some_and(|n| n <= REPLAY_LIMIT) {
            let bytes = body
                .collect()
                .await
                .map_err(|e| ProxyError::RequestBody(e.to_string()))?
                .to_bytes();
            return Ok(ReqBody::Replayable(bytes));
        }
        Ok(ReqBody::Once(Some(body)))
    }

    fn take(&mut self) -> Option<ProxyBody> {
        match self {
            ReqBody::Replayable(b) => Some(crate::body::full(b.clone())),
            ReqBody::Once(b) => b.take().map(crate::body::boxed),
        }
    }
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

pub async fn handle(ctx: &OutboundCtx, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = std::time::Instant::now();
    let grpc = is_grpc(req.headers());
    let state = ctx.state.borrow().clone();
    let (resp, service, cluster) = match route(ctx, &state, req).await {
        Ok((resp, service, cluster)) => (resp, service, cluster),
        Err((e, service)) => {
            tracing::debug!(error = %e, reason = e.reason(), "outbound request failed");
            (e.respond(grpc), service, String::new())
        }
    };
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

/// Interns the reasons the proxies produce, for metric labels.
fn reason_label(r: &str) -> &'static str {
    match r {
        "no-route" => "no-route",
        "no-healthy-upstream" => "no-healthy-upstream",
        "upstream-connect-failure" => "upstream-connect-failure",
        "upstream-reset" => "upstream-reset",
        "app-unavailable" => "app-unavailable",
        "app-reset" => "app-reset",
        _ => "other",
    }
}

type Routed = Result<(Response<ProxyBody>, String, String), (ProxyError, String)>;

async fn route(ctx: &OutboundCtx, state: &MeshState, req: Request<Incoming>) -> Routed {
    let host = request_host(&req).ok_or((ProxyError::NoHost, String::new()))?;
    let (name, port) = split_host(&host);
    let no_route = || (ProxyError::NoRoute { host: host.clone() }, String::new());
    let svc = state.resolve(name).ok_or_else(no_route)?.clone();
    let port = svc.port(port).ok_or_else(no_route)?.clone();
    let service = svc.hostname();
    let authority = format!("{service}:{}", port.port);
    let (mut parts, body) = req.into_parts();
    headers::strip_untrusted(&mut parts.headers);
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    let app_protocol = if port.protocol == "http2" || port.protocol == "grpc" {
        "http2"
    } else {
        "http"
    };
    parts
        .headers
        .insert(APP_PROTOCOL, HeaderValue::from_static(app_protocol));
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = Uri::try_from(format!("http://{authority}{path}"))
        .map_err(|_| (ProxyError::NoHost, service.clone()))?;
    parts.version = Version::HTTP_2;
    let body = ReqBody::new(body).await.map_err(|e| (e, service.clone()))?;
    let (resp, cluster) = attempts(ctx, state, &svc, &authority, parts, body)
        .await
        .map_err(|e| (e, service.clone()))?;
    Ok((resp, service, cluster))
}

/// Sends the request to successive endpoints until one answers.
async fn attempts(
    ctx: &OutboundCtx,
    state: &MeshState,
    svc: &Arc<Service>,
    authority: &str,
    parts: http::request::Parts,
    mut body: ReqBody,
) -> Result<(Response<ProxyBody>, String), ProxyError> {
    let mut tried: Vec<Arc<EndpointHealth>> = Vec::new();
    let mut last: Option<ProxyError> = None;
    for attempt in 0..MAX_ATTEMPTS {
        let Some(target) = pick(svc, &ctx.locality, &state.mesh, &tried) else {
            break;
        };
        if attempt > 0 {
            ctx.metrics.retries.inc();
        }
        tried.push(target.health().clone());
        let cluster = match &target {
            Target::Local { .. } => state.mesh.cluster.clone(),
            Target::Remote { cluster, .. } => cluster.clone(),
        };
        let mut h2 = match connect(ctx, state, &target, authority).await {
            Ok(h2) => h2,
            Err(e) => {
                fail(ctx, &target, true, e.reason());
                last = Some(e);
                continue;
            }
        };
        if let Err(e) = h2.ready().await {
            fail(ctx, &target, true, "upstream-connect-failure");
            last = Some(ProxyError::UpstreamReset {
                service: authority.to_owned(),
                source: e,
            });
            continue;
        }
        let Some(b) = body.take() else { break };
        let req = Request::from_parts(parts.clone(), b);
        match h2.send_request(req).await {
            Ok(resp) => {
                // The far sidecar could not reach its app (refused: a connect failure) or the
                // app reset the request: both are retried on another endpoint.
                let far_reason = resp
                    .headers()
                    .get(ERROR_REASON)
                    .and_then(|v| v.to_str().ok());
                let far = match far_reason {
                    Some("app-unavailable") => Some((true, "app-unavailable")),
                    Some("app-reset") => Some((false, "app-reset")),
                    _ => None,
                };
                if let (Some((refused, reason)), ReqBody::Replayable(_)) = (far, &body) {
                    fail(ctx, &target, refused, reason);
                    last = Some(ProxyError::AppUnavailable(format!(
                        "{authority} in {cluster}: {reason}"
                    )));
                    continue;
                }
                if resp.status().is_server_error() && resp.headers().contains_key(ERROR_REASON) {
                    fail(ctx, &target, false, "upstream-error");
                } else {
                    target.health().success();
                }
                let (mut rparts, rbody) = resp.into_parts();
                headers::strip_hop_by_hop(&mut rparts.headers);
                if let Ok(v) = HeaderValue::from_str(&cluster) {
                    rparts.headers.insert(UPSTREAM_CLUSTER, v);
                }
                return Ok((
                    Response::from_parts(rparts, crate::body::boxed(rbody)),
                    cluster,
                ));
            }
            Err(e) => {
                // A connection that died under the request (closed, or keep-alive timed out)
                // says the peer is gone, as a failed connect does.
                fail(
                    ctx,
                    &target,
                    e.is_closed() || e.is_canceled() || e.is_timeout(),
                    "upstream-reset",
                );
                last = Some(ProxyError::UpstreamReset {
                    service: authority.to_owned(),
                    source: e,
                });
            }
        }
    }
    Err(last.unwrap_or_else(|| ProxyError::NoHealthyUpstream {
        service: authority.to_owned(),
    }))
}

fn fail(ctx: &OutboundCtx, target: &Target, connect_failed: bool, reason: &'static str) {
    ctx.metrics
        .upstream_failures
        .get_or_create(&ReasonLabels { reason })
        .inc();
    if target.health().failure(connect_failed) {
        ctx.metrics.ejections.inc();
    }
}

async fn connect(
    ctx: &OutboundCtx,
    state: &MeshState,
    target: &Target,
    authority: &str,
) -> Result<H2, ProxyError> {
    let service = authority.to_owned();
    match target {
        Target::Local {
            address, identity, ..
        } => ctx.pool.direct(*address, identity).await,
        Target::Remote {
            cluster,
            identities,
            ..
        } => {
            let Some(gateway) = state.mesh.gateway.clone() else {
                return Err(ProxyError::UpstreamConnect {
                    service,
                    source: crate::pool::ConnectError::NoGateway {
                        cluster: cluster.clone(),
                    },
                });
            };
            ctx.pool
                .remote(gateway, cluster, authority, identities)
                .await
        }
    }
    .map_err(|source| ProxyError::UpstreamConnect { service, source })
}

#[cfg(test)]
mod tests {
    use super::split_host;

    #[test]
    fn host_and_port_are_split() {
        assert_eq!(split_host("echo.demo:8080"), ("echo.demo", Some(8080)));
        assert_eq!(split_host("echo"), ("echo", None));
        assert_eq!(split_host("echo:x"), ("echo:x", None));
    }
}
