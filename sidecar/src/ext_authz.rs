//! External authorization (AuthorizationPolicy action `CUSTOM`): the destination's sidecar
//! asks the provider the mesh config names, with Envoy's ext_authz protocol, whether a
//! request may reach the app.
//!
//! - gRPC (`envoyExtAuthzGrpc`): `envoy.service.auth.v3.Authorization/Check` with the
//!   request's attributes (method, path, host, headers, source and destination with their
//!   SPIFFE IDs); `OK` allows, with the headers the answer adds to the upstream request and
//!   the client's response, or removes; any other status denies, with the answer's status
//!   (403 when it gives none), headers and body.
//! - HTTP (`envoyExtAuthzHttp`): the request's method, `pathPrefix` + path, its host,
//!   `content-length` and the headers `includeRequestHeadersInCheck` names (plus
//!   `includeAdditionalHeadersInCheck`); a 200 allows and copies the answer's headers named
//!   by `headersToUpstreamOnAllow` / `headersToDownstreamOnAllow`; any other status under
//!   500 denies with that status, its body and the headers `headersToDownstreamOnDeny`
//!   names.
//!
//! The provider is reached as the app would reach it: a mesh service through the tunnels
//! (mTLS, load balancing, failover, other clusters), a `MESH_EXTERNAL` ServiceEntry host
//! directly. A provider that cannot be reached, times out (`timeout`), answers a 5xx or
//! anything unreadable is an error: the request gets `statusOnError` (403), or passes with
//! `failOpen`. Answers are bounded (64 KiB), and a provider never sees the proxy's own
//! signals.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use isthmus_proto::discovery as xds;
use isthmus_proto::ext_authz as pb;
use prost::Message;

use crate::attempt::{attempts, Plan, ReqBody, RetryPolicy};
use crate::outbound::OutboundCtx;
use crate::pool::ProxyBody;
use crate::state::MeshState;
use isthmus_core::headers;

/// The largest answer read from a provider.
const MAX_ANSWER: usize = 64 * 1024;
const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// A header list of the provider config: exact names, `prefix*` or `*suffix`, matched as
/// AuthorizationPolicy values are.
type Pattern = crate::authz::Matcher;

fn any(patterns: &[Pattern], name: &str) -> bool {
    patterns.iter().any(|p| p.matches(name))
}

/// A provider, compiled once per push.
#[derive(Debug)]
pub struct Provider {
    pub name: Arc<str>,
    grpc: bool,
    host: String,
    port: u16,
    timeout: Duration,
    fail_open: bool,
    status_on_error: StatusCode,
    path_prefix: String,
    include: Vec<Pattern>,
    additional: Vec<(HeaderName, HeaderValue)>,
    upstream: Vec<Pattern>,
    on_deny: Vec<Pattern>,
    on_allow: Vec<Pattern>,
    /// How much of the request body the check carries (0: none).
    pub max_body: usize,
    pub allow_partial: bool,
    pack_as_bytes: bool,
}

impl Provider {
    pub fn compile(p: &xds::ExtAuthzProvider) -> Self {
        let patterns = |l: &[String]| l.iter().map(|h| Pattern::new(h)).collect();
        Self {
            name: p.name.as_str().into(),
            grpc: p.grpc,
            host: p.service.clone(),
            port: u16::try_from(p.port).unwrap_or(0),
            timeout: Duration::from_millis(u64::from(p.timeout_ms.max(1))),
            fail_open: p.fail_open,
            status_on_error: u16::try_from(p.status_on_error)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::FORBIDDEN),
            path_prefix: p.path_prefix.clone(),
            include: patterns(&p.include_request_headers),
            additional: p
                .include_additional_headers
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
            upstream: patterns(&p.headers_to_upstream_on_allow),
            on_deny: patterns(&p.headers_to_downstream_on_deny),
            on_allow: patterns(&p.headers_to_downstream_on_allow),
            max_body: p.max_request_bytes as usize,
            allow_partial: p.allow_partial_message,
            pack_as_bytes: p.pack_as_bytes,
        }
    }
}

/// What an allowing provider asks for.
#[derive(Debug, Default)]
pub struct Allowed {
    /// Set on the request to the app: (name, value, append instead of replace).
    pub upstream: Vec<(HeaderName, HeaderValue, bool)>,
    pub remove: Vec<HeaderName>,
    /// Added to the response to the client.
    pub downstream: Vec<(HeaderName, HeaderValue)>,
}

impl Allowed {
    /// Applies the request side to the request going to the app.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value, append) in &self.upstream {
            if *append {
                headers.append(name.clone(), value.clone());
            } else {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
}

/// A provider's decision.
pub enum Decision {
    Allow(Allowed),
    /// The answer the client gets.
    Deny(Response<ProxyBody>),
}

/// What the check says of the request (copied: a rare path, and the request's own parts
/// go on to the app).
pub struct Check {
    pub method: Method,
    /// Path and query, as the app will see them.
    pub path: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    /// The host the client asked for.
    pub host: String,
    /// The body, or its first `max_body` bytes.
    pub body: Option<Bytes>,
    pub source: std::net::SocketAddr,
    /// The caller's SPIFFE ID (with `spiffe://`).
    pub source_principal: String,
    pub destination: Option<std::net::SocketAddr>,
    pub destination_principal: String,
}

/// Asks `provider` about a request; errors become `statusOnError`, or an allow with
/// `failOpen`.
pub async fn check(
    ctx: Arc<OutboundCtx>,
    state: Arc<MeshState>,
    provider: Arc<Provider>,
    request: Arc<Check>,
) -> Decision {
    let (ctx, state, provider, request) = (&*ctx, &*state, &*provider, &*request);
    let asked = if provider.grpc {
        tokio::time::timeout(provider.timeout, ask_grpc(ctx, state, provider, request)).await
    } else {
        tokio::time::timeout(provider.timeout, ask_http(ctx, state, provider, request)).await
    };
    let asked = asked.unwrap_or_else(|_| {
        Err(format!(
            "no answer within {}ms",
            provider.timeout.as_millis()
        ))
    });
    match asked {
        Ok(d) => d,
        Err(e) if provider.fail_open => {
            tracing::warn!(target: "authz", provider = %provider.name, error = %e, "external authorization failed; failOpen lets the request through");
            Decision::Allow(Allowed::default())
        }
        Err(e) => {
            tracing::warn!(target: "authz", provider = %provider.name, error = %e, "external authorization failed; request refused");
            let mut resp = Response::new(crate::pool::empty_body());
            *resp.status_mut() = provider.status_on_error;
            Decision::Deny(resp)
        }
    }
}

/// Sends one request to the provider and reads its whole (bounded) answer.
async fn send(
    ctx: &OutboundCtx,
    state: &MeshState,
    provider: &Provider,
    mut parts: http::request::Parts,
    path: &str,
    body: Bytes,
) -> Result<(http::response::Parts, Bytes, Option<HeaderMap>), String> {
    let svc = state
        .resolve(&provider.host)
        .ok_or_else(|| format!("no service `{}` in the mesh", provider.host))?
        .clone();
    let port = svc
        .port(Some(provider.port))
        .ok_or_else(|| format!("`{}` has no port {}", provider.host, provider.port))?
        .clone();
    let h2 = provider.grpc || port.speaks_h2();
    let resp = if svc.external.is_some() {
        let addrs = crate::egress::addresses(&svc, &port, &provider.host, provider.port)
            .await
            .map_err(|e| e.to_string())?;
        let authority = format!("{}:{}", provider.host, provider.port);
        if h2 {
            parts.uri = format!("http://{authority}{path}")
                .parse()
                .map_err(|e| format!("{e}"))?;
            parts.version = http::Version::HTTP_2;
        } else {
            parts.uri = path.parse().map_err(|e| format!("{e}"))?;
            parts.version = http::Version::HTTP_11;
            parts.headers.insert(
                http::header::HOST,
                HeaderValue::from_str(&authority).map_err(|e| e.to_string())?,
            );
        }
        let req = Request::from_parts(parts, crate::body::full(body));
        // A DestinationRule's TLS origination applies to the provider too.
        let origination = svc
            .routing
            .as_deref()
            .and_then(|r| r.state_for(None, port.port))
            .and_then(|s| s.tls.clone());
        let tls = origination.as_deref().map(|o| (o, provider.host.as_str()));
        crate::egress::send(&svc.hostname(), &addrs, h2, req, &ctx.drain, tls)
            .await
            .map_err(|e| e.to_string())?
            .map(crate::body::boxed)
    } else {
        let plan = Plan {
            svc: svc.clone(),
            authority: port.authority.clone(),
            subset: None,
            retry: RetryPolicy {
                attempts: 1,
                ..RetryPolicy::default_policy()
            },
            hash: None,
            own_labels: state.own_labels.clone(),
            port: port.port,
        };
        parts.uri = crate::outbound::http_uri(
            port.authority.clone(),
            path.parse().map_err(|e| format!("{e}"))?,
        )
        .map_err(|e| e.to_string())?;
        parts.version = http::Version::HTTP_2;
        parts.headers.insert(
            headers::APP_PROTOCOL,
            HeaderValue::from_static(if h2 { "http2" } else { "http" }),
        );
        attempts(ctx, state, &plan, parts, ReqBody::Replayable(body))
            .await
            .map_err(|e| e.to_string())?
            .0
    };
    let (rparts, mut rbody) = resp.into_parts();
    let (mut data, mut trailers) = (BytesMut::new(), None);
    while let Some(frame) = rbody.frame().await {
        let frame = frame.map_err(|e| format!("reading the answer: {e}"))?;
        match frame.into_data() {
            Ok(chunk) if data.len() + chunk.len() > MAX_ANSWER => {
                return Err(format!("the answer is larger than {MAX_ANSWER} bytes"))
            }
            Ok(chunk) => data.extend_from_slice(&chunk),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    Ok((rparts, data.freeze(), trailers))
}

fn request_parts(method: Method) -> http::request::Parts {
    Request::builder()
        .method(method)
        .body(())
        .expect("a bare request")
        .into_parts()
        .0
}

async fn ask_http(
    ctx: &OutboundCtx,
    state: &MeshState,
    provider: &Provider,
    request: &Check,
) -> Result<Decision, String> {
    let mut parts = request_parts(request.method.clone());
    for (name, value) in &request.headers {
        if any(&provider.include, name.as_str()) && !headers::is_proxy_owned(name) {
            parts.headers.append(name.clone(), value.clone());
        }
    }
    for (name, value) in &provider.additional {
        parts.headers.insert(name.clone(), value.clone());
    }
    let body = request.body.clone().unwrap_or_default();
    parts
        .headers
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let path = format!(
        "{}{}",
        provider.path_prefix.trim_end_matches('/'),
        request.path
    );
    let (rparts, rbody, _) = send(ctx, state, provider, parts, &path, body).await?;
    if rparts.status.is_server_error() {
        return Err(format!("answered {}", rparts.status));
    }
    let pick = |patterns: &[Pattern]| -> Vec<(HeaderName, HeaderValue)> {
        rparts
            .headers
            .iter()
            .filter(|(n, _)| any(patterns, n.as_str()) && !headers::is_proxy_owned(n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    };
    if rparts.status == StatusCode::OK {
        let remove = rparts
            .headers
            .get("x-envoy-auth-headers-to-remove")
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(',')
                    .filter_map(|h| HeaderName::from_bytes(h.trim().as_bytes()).ok())
                    .filter(|h| *h != http::header::HOST)
                    .collect()
            })
            .unwrap_or_default();
        return Ok(Decision::Allow(Allowed {
            upstream: pick(&provider.upstream)
                .into_iter()
                .map(|(n, v)| (n, v, false))
                .collect(),
            remove,
            downstream: pick(&provider.on_allow),
        }));
    }
    let mut resp = Response::new(crate::body::full(rbody));
    *resp.status_mut() = rparts.status;
    for (n, v) in pick(&provider.on_deny) {
        resp.headers_mut().append(n, v);
    }
    Ok(Decision::Deny(resp))
}

fn peer(addr: Option<std::net::SocketAddr>, principal: &str) -> pb::attribute_context::Peer {
    pb::attribute_context::Peer {
        address: addr.map(|a| pb::Address {
            socket_address: Some(pb::SocketAddress {
                address: a.ip().to_string(),
                port_value: a.port().into(),
            }),
        }),
        principal: principal.to_owned(),
        ..Default::default()
    }
}

async fn ask_grpc(
    ctx: &OutboundCtx,
    state: &MeshState,
    provider: &Provider,
    request: &Check,
) -> Result<Decision, String> {
    let mut headers = std::collections::BTreeMap::new();
    for (name, value) in &request.headers {
        if headers::is_proxy_owned(name) {
            continue;
        }
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|e: &mut String| {
                e.push(',');
                e.push_str(&v);
            })
            .or_insert(v);
    }
    headers.insert(":method".into(), request.method.to_string());
    headers.insert(":authority".into(), request.host.clone());
    headers.insert(":path".into(), request.path.clone());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (body, raw_body) = match (&request.body, provider.pack_as_bytes) {
        (Some(b), true) => (String::new(), b.to_vec()),
        (Some(b), false) => (String::from_utf8_lossy(b).into_owned(), Vec::new()),
        (None, _) => (String::new(), Vec::new()),
    };
    let size = request
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(-1);
    let check = pb::CheckRequest {
        attributes: Some(pb::AttributeContext {
            source: Some(peer(Some(request.source), &request.source_principal)),
            destination: Some(peer(request.destination, &request.destination_principal)),
            request: Some(pb::attribute_context::Request {
                time: Some(pb::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                }),
                http: Some(pb::attribute_context::HttpRequest {
                    id: request
                        .headers
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned(),
                    method: request.method.to_string(),
                    headers,
                    path: request.path.clone(),
                    host: request.host.clone(),
                    scheme: "http".into(),
                    size,
                    protocol: match request.version {
                        http::Version::HTTP_2 => "HTTP/2",
                        http::Version::HTTP_10 => "HTTP/1.0",
                        _ => "HTTP/1.1",
                    }
                    .into(),
                    body,
                    raw_body,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    };
    let mut frame = BytesMut::with_capacity(5 + check.encoded_len());
    frame.put_u8(0);
    frame.put_u32(check.encoded_len() as u32);
    check
        .encode(&mut frame)
        .map_err(|e| format!("encoding the check: {e}"))?;
    let mut parts = request_parts(Method::POST);
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    parts
        .headers
        .insert(http::header::TE, HeaderValue::from_static("trailers"));
    let (rparts, rbody, trailers) =
        send(ctx, state, provider, parts, CHECK_PATH, frame.freeze()).await?;
    // grpc-status is in the trailers, or in the headers of a trailers-only answer.
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| rparts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !rparts.status.is_success() || status != "0" {
        return Err(format!(
            "Check answered HTTP {} grpc-status `{status}`",
            rparts.status
        ));
    }
    let answer = grpc_message(rbody)?;
    let answer = pb::CheckResponse::decode(answer).map_err(|e| format!("decoding: {e}"))?;
    let code = answer.status.as_ref().map_or(0, |s| s.code);
    let options = |list: &[pb::HeaderValueOption]| -> Vec<(HeaderName, HeaderValue, bool)> {
        list.iter()
            .filter_map(|o| {
                let h = o.header.as_ref()?;
                let name = HeaderName::from_bytes(h.key.to_ascii_lowercase().as_bytes()).ok()?;
                let value = if h.raw_value.is_empty() {
                    HeaderValue::from_str(&h.value).ok()?
                } else {
                    HeaderValue::from_bytes(&h.raw_value).ok()?
                };
                // In ext_authz answers `append` defaults to false: the value replaces.
                let append = o.append.as_ref().is_some_and(|a| a.value);
                (!headers::is_proxy_owned(&name)).then_some((name, value, append))
            })
            .collect()
    };
    if code == 0 {
        let mut allowed = Allowed::default();
        if let Some(pb::check_response::HttpResponse::OkResponse(ok)) = &answer.http_response {
            allowed.upstream = options(&ok.headers);
            allowed.remove = ok
                .headers_to_remove
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
                .filter(|h| *h != http::header::HOST && !headers::is_proxy_owned(h))
                .collect();
            allowed.downstream = options(&ok.response_headers_to_add)
                .into_iter()
                .map(|(n, v, _)| (n, v))
                .collect();
        }
        return Ok(Decision::Allow(allowed));
    }
    let mut resp = Response::new(crate::pool::empty_body());
    *resp.status_mut() = StatusCode::FORBIDDEN;
    if let Some(pb::check_response::HttpResponse::DeniedResponse(denied)) = answer.http_response {
        if let Some(s) = denied
            .status
            .and_then(|s| u16::try_from(s.code).ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
            .filter(|c| c.as_u16() >= 200)
        {
            *resp.status_mut() = s;
        }
        for (n, v, _) in options(&denied.headers) {
            resp.headers_mut().append(n, v);
        }
        *resp.body_mut() = crate::body::full(denied.body);
    }
    Ok(Decision::Deny(resp))
}

/// The one message of a unary gRPC answer.
fn grpc_message(mut body: Bytes) -> Result<Bytes, String> {
    if body.len() < 5 {
        return Err("the answer has no gRPC message".into());
    }
    if body[0] != 0 {
        return Err("the answer is compressed; no compression was offered".into());
    }
    body.advance(1);
    let len = body.get_u32() as usize;
    if body.len() < len {
        return Err("the answer's gRPC message is cut short".into());
    }
    Ok(body.split_to(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_patterns_match_as_istio_s() {
        let p: Vec<Pattern> = ["x-ext-authz", "x-auth-*", "*-token"]
            .iter()
            .map(|s| Pattern::new(s))
            .collect();
        assert!(any(&p, "x-ext-authz"));
        assert!(any(&p, "x-auth-user"));
        assert!(any(&p, "session-token"));
        assert!(!any(&p, "x-ext-authz-extra"));
        assert!(!any(&p, "authorization"));
    }

    #[test]
    fn a_grpc_answer_is_one_uncompressed_message() {
        let msg = pb::CheckResponse {
            status: Some(pb::RpcStatus {
                code: 7,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut frame = BytesMut::new();
        frame.put_u8(0);
        frame.put_u32(msg.encoded_len() as u32);
        msg.encode(&mut frame).expect("encode");
        let got = grpc_message(frame.clone().freeze()).expect("message");
        assert_eq!(pb::CheckResponse::decode(got).expect("decode"), msg);
        let mut compressed = frame.clone();
        compressed[0] = 1;
        assert!(grpc_message(compressed.freeze()).is_err());
        assert!(grpc_message(frame.freeze().slice(..6)).is_err());
    }

    #[test]
    fn proxy_signals_never_reach_a_provider() {
        assert!(headers::is_proxy_owned(&HeaderName::from_static(
            "x-forwarded-client-cert"
        )));
        assert!(headers::is_proxy_owned(&http::header::CONNECTION));
        assert!(!headers::is_proxy_owned(&HeaderName::from_static(
            "x-ext-authz"
        )));
    }
}
