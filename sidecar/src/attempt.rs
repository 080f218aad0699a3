//! One request's attempts: the chosen route's destination is tried on successive endpoints
//! until one answers as the retry policy wants. Passive health is judged here (a failed
//! connect or a dead connection ejects at once, proxy-made 5xx count towards an ejection),
//! a client that breaks its own body is blamed and never the destination, a request a peer
//! may have acted on goes again only if idempotent, and an endpoint back from an ejection
//! is probed in the background before requests use it again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use isthmus_core::headers::{self, ERROR_REASON, UPSTREAM_CLUSTER};
use isthmus_core::routing::Retries;

use crate::body::{BodyFault, FaultCell, Watched};
use crate::errors::ProxyError;
use crate::lb::{pick, EndpointHealth, Failure, Selection, Target, Thresholds};
use crate::metrics::ReasonLabels;
use crate::outbound::OutboundCtx;
use crate::pool::{Pool, ProxyBody, H2};
use crate::routing_table::PolicyState;
use crate::state::{MeshState, Service};

/// Attempts per request, the first included.
const MAX_ATTEMPTS: usize = 4;

/// Request bodies up to this size with a known length are kept for retries; larger or
/// streaming bodies are forwarded without copying and retried only if never sent.
const REPLAY_LIMIT: u64 = 16 * 1024;

/// The request body, replayable when small. Either way it is watched: a client that
/// breaks it or goes silent is recorded in `fault` and blamed, never the destination.
pub enum ReqBody {
    Replayable(Bytes),
    Once(Option<ProxyBody>, FaultCell),
}

impl ReqBody {
    pub async fn new<B>(body: B, idle: Duration) -> Result<Self, ProxyError>
    where
        B: Body<Data = Bytes> + Send + Sync + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        if body.size_hint().exact().is_some_and(|n| n <= REPLAY_LIMIT) {
            let bytes = Watched::new(body, idle)
                .collect()
                .await
                .map_err(|e| downstream_error(&e.0))?
                .to_bytes();
            return Ok(ReqBody::Replayable(bytes));
        }
        let fault = FaultCell::default();
        let body = Watched::recording(body, idle, fault.clone());
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

/// When an attempt is retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: usize,
    pub per_try: Option<Duration>,
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub on_retriable_4xx: bool,
    pub grpc: Vec<u8>,
}

impl RetryPolicy {
    /// Without a VirtualService: retry connect failures and resets on other endpoints.
    pub fn default_policy() -> Self {
        Self {
            attempts: MAX_ATTEMPTS,
            per_try: None,
            on_5xx: false,
            on_gateway_error: false,
            on_retriable_4xx: false,
            grpc: Vec::new(),
        }
    }

    pub fn from_spec(r: &Retries) -> Self {
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
        let grpc = headers::grpc_status(resp.headers());
        (self.on_5xx && s >= 500)
            || (self.on_gateway_error && matches!(s, 502..=504))
            || (self.on_retriable_4xx && s == 409)
            || grpc.is_some_and(|g| u8::try_from(g).is_ok_and(|g| self.grpc.contains(&g)))
    }
}

/// Where and how a request goes once its route is chosen.
pub struct Plan {
    pub svc: Arc<Service>,
    /// `<service host>:<port>` of the destination.
    pub authority: http::uri::Authority,
    pub subset: Option<String>,
    pub retry: RetryPolicy,
    /// Consistent-hash key of the request, when the destination hashes.
    pub hash: Option<u64>,
    /// Labels of this workload, for `failoverPriority`.
    pub own_labels: Arc<BTreeMap<String, String>>,
    /// The destination port, for `portLevelSettings`.
    pub port: u16,
}

impl Plan {
    /// The DestinationRule policy in force: the subset's, else the service's.
    pub fn state(&self) -> Option<&PolicyState> {
        self.svc
            .routing
            .as_deref()?
            .state_for(self.subset.as_deref(), self.port)
    }

    pub fn selection(&self) -> Selection<'_> {
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

/// Sends the request to successive endpoints until one answers as the retry policy wants.
pub async fn attempts(
    ctx: &OutboundCtx,
    state: &MeshState,
    plan: &Plan,
    mut parts: http::request::Parts,
    mut body: ReqBody,
) -> Result<(Response<ProxyBody>, Arc<str>), ProxyError> {
    let authority = plan.authority.as_str();
    // Who is calling, for the receiving sidecar's telemetry (Istio's metadata exchange).
    parts
        .headers
        .insert(crate::peer::PEER, state.own.header().clone());
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
        let trace = parts.headers.get(isthmus_core::otlp::TRACEPARENT);
        let opened = connect(
            ctx,
            state,
            &target,
            authority,
            plan.connect_options(),
            trace,
        );
        let mut h2 = match opened.await {
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
                // Who answered, as its sidecar describes itself, for this side's telemetry.
                if let Some(v) = rparts.headers.get(crate::peer::PEER) {
                    let answered = ctx.metrics.workloads.described(v.as_bytes(), None);
                    rparts
                        .extensions
                        .insert(crate::telemetry::Answered(answered));
                }
                // The far sidecar strips what its app sets; of its own signals only the
                // error reason goes on to the app, and to `upgrade_through` the mark of an
                // upgrade the far app accepted.
                let keep: &[http::HeaderName] = if parts.method == http::Method::CONNECT {
                    &[ERROR_REASON, crate::upgrade::UPGRADE]
                } else {
                    &[ERROR_REASON]
                };
                headers::strip_untrusted_keeping(&mut rparts.headers, keep);
                if let Ok(v) = HeaderValue::from_str(&cluster) {
                    rparts.headers.insert(UPSTREAM_CLUSTER, v);
                }
                let rbody = Watched::new(rbody, ctx.limits.stream_idle_timeout);
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
    trace: Option<&HeaderValue>,
) -> Result<H2, ProxyError> {
    connect_with(
        &ctx.pool,
        state.mesh.gateway.as_ref(),
        target,
        authority,
        opts,
        trace,
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
    gateway: Option<&(std::net::SocketAddr, isthmus_core::identity::SpiffeId)>,
    target: &Target,
    authority: &str,
    opts: crate::pool::ConnectOptions,
    trace: Option<&HeaderValue>,
) -> Result<H2, crate::pool::ConnectError> {
    match target {
        Target::Local {
            address, identity, ..
        } => pool.direct(*address, identity, opts).await,
        Target::Remote {
            cluster,
            identities,
            subset,
            endpoint,
            ..
        } => {
            let gateway = gateway.ok_or_else(|| crate::pool::ConnectError::NoGateway {
                cluster: cluster.to_string(),
            })?;
            let to = crate::pool::Remote {
                cluster,
                authority,
                subset,
                endpoint: endpoint.as_deref().unwrap_or_default(),
                traceparent: trace,
            };
            pool.remote(gateway, to, identities, opts).await
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
        let up = connect_with(
            &pool,
            gateway.as_ref(),
            &target,
            authority.as_str(),
            opts,
            None,
        )
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
    if !first.health().unproven() {
        return first; // the request path's usual case: nothing to copy
    }
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
