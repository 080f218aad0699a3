//! HTTP/1.1 upgrades (WebSocket) through the mesh. Between proxies an upgrade travels as an
//! HTTP/2 CONNECT carrying the original request's headers, its path and upgrade token in
//! `x-isthmus-path` / `x-isthmus-upgrade`; the receiving sidecar replays the upgrade to its
//! app over HTTP/1.1 and, on `101`, answers `200` with the app's headers; both sides then
//! splice bytes. Across clusters the CONNECT rides inside the end-to-end TLS as usual.
//!
//! Opaque TCP works the same way: the app sends an HTTP `CONNECT host:port` to its sidecar
//! (HTTP proxy style), the sidecars carry it as an HTTP/2 CONNECT naming the target port in
//! `x-isthmus-target-port`, and the receiving sidecar connects that port of its workload.

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use isthmus_core::headers::{self, XFCC};

use crate::attempt::{attempts, Plan, ReqBody};
use crate::errors::ProxyError;
use crate::pool::{empty_body, ProxyBody};

/// The upgrade token a CONNECT between proxies carries.
pub const UPGRADE: http::HeaderName = http::HeaderName::from_static("x-isthmus-upgrade");
/// The original request path of an upgrade.
pub const PATH: &str = "x-isthmus-path";
/// The workload port an opaque TCP tunnel goes to.
pub const TARGET_PORT: http::HeaderName = http::HeaderName::from_static("x-isthmus-target-port");

/// What to do with an HTTP/1.1 request's `Upgrade`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    /// No upgrade asked.
    None,
    /// An allowed protocol (`websocket`): carried through the mesh.
    Carry(String),
    /// `h2c` (curl `--http2`, Java's HttpClient): served as HTTP/1.1 with the upgrade
    /// dropped, as Envoy does.
    Drop,
    /// A protocol not configured: refused with 403, never forwarded.
    Refuse(String),
}

/// Classifies a request's upgrade against the allowed tokens (case-insensitive).
pub fn classify(headers: &HeaderMap, allowed: &[String]) -> Upgrade {
    let asks = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let Some(offered) = headers.get(http::header::UPGRADE) else {
        return Upgrade::None;
    };
    if !asks {
        return Upgrade::None;
    }
    let offered = String::from_utf8_lossy(offered.as_bytes());
    let tokens: Vec<&str> = offered
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(t) = tokens
        .iter()
        .find(|t| allowed.iter().any(|a| a.eq_ignore_ascii_case(t)))
    {
        return Upgrade::Carry(t.to_ascii_lowercase());
    }
    if !tokens.is_empty() && tokens.iter().all(|t| t.eq_ignore_ascii_case("h2c")) {
        return Upgrade::Drop;
    }
    Upgrade::Refuse(offered.into_owned())
}

/// End-to-end headers of an upgrade request or answer, without hop-by-hop ones.
pub fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    headers::strip_hop_by_hop(&mut h);
    h.remove(http::header::HOST);
    h
}

/// Splices two upgraded connections once both sides are ready; `meter` counts an opaque
/// connection's bytes on `a`, the source's side.
pub fn splice(
    a: hyper::upgrade::OnUpgrade,
    b: hyper::upgrade::OnUpgrade,
    drain: &isthmus_core::drain::Drain,
    meter: Option<crate::telemetry::Meter>,
) {
    drain.spawn(async move {
        let (Ok(a), Ok(b)) = (a.await, b.await) else {
            return;
        };
        let mut a = crate::telemetry::Meter::maybe(meter.as_ref(), TokioIo::new(a));
        let _ = tokio::io::copy_bidirectional(&mut a, &mut TokioIo::new(b)).await;
    });
}

/// The receiving side: replays the upgrade to the app; `Ok` holds the CONNECT answer.
pub async fn to_app(
    app: std::net::SocketAddr,
    xfcc: HeaderValue,
    mut req: Request<Incoming>,
    drain: &isthmus_core::drain::Drain,
) -> Result<Response<ProxyBody>, ProxyError> {
    let protocol = req
        .headers()
        .get(UPGRADE)
        .cloned()
        .ok_or(ProxyError::TunnelUnsupported)?;
    let path = req
        .headers()
        .get(PATH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("/")
        .to_owned();
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let mut headers = end_to_end(req.headers());
    headers::strip_untrusted(&mut headers);
    headers.insert(XFCC, xfcc);
    headers.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    let protocol_mark = protocol.clone();
    headers.insert(http::header::UPGRADE, protocol);
    if let Ok(h) = HeaderValue::from_str(&authority) {
        headers.insert(http::header::HOST, h);
    }
    let tcp = tokio::net::TcpStream::connect(app)
        .await
        .map_err(|e| ProxyError::AppUnavailable(format!("{app}: {e}")))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| ProxyError::AppReset(e.to_string()))?;
    drain.spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut upstream = Request::builder()
        .method(http::Method::GET)
        .uri(path)
        .body(empty_body())
        .map_err(|e| ProxyError::AppReset(e.to_string()))?;
    *upstream.headers_mut() = headers;
    let resp = send
        .send_request(upstream)
        .await
        .map_err(|e| ProxyError::AppReset(e.to_string()))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The app declined: its answer goes back as a plain response, without the mark.
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::strip_untrusted(&mut parts.headers);
        return Ok(Response::from_parts(parts, crate::body::boxed(body)));
    }
    let mut answer = Response::new(empty_body());
    *answer.headers_mut() = end_to_end(resp.headers());
    headers::strip_untrusted(answer.headers_mut());
    // The mark the calling sidecar needs to answer its app 101: only a proxy sets it.
    answer.headers_mut().insert(UPGRADE, protocol_mark);
    splice(
        hyper::upgrade::on(&mut req),
        hyper::upgrade::on(resp),
        drain,
        None,
    );
    Ok(answer)
}

/// The receiving side of an opaque TCP tunnel: connects the target port of this workload's
/// address and answers the CONNECT with 200.
pub async fn tcp_to_app(
    app: std::net::SocketAddr,
    mut req: Request<Incoming>,
    drain: &isthmus_core::drain::Drain,
) -> Result<Response<ProxyBody>, ProxyError> {
    let port: u16 = req
        .headers()
        .get(TARGET_PORT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .filter(|p| *p > 0)
        .ok_or(ProxyError::TunnelUnsupported)?;
    let target = std::net::SocketAddr::new(app.ip(), port);
    let meter = req.extensions_mut().remove::<crate::telemetry::Meter>();
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::net::TcpStream::connect(target),
    )
    .await
    .map_err(|_| ProxyError::AppUnavailable(format!("{target}: timed out")))?
    .map_err(|e| ProxyError::AppUnavailable(format!("{target}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let on_upgrade = hyper::upgrade::on(&mut req);
    drain.spawn(async move {
        let Ok(up) = on_upgrade.await else { return };
        let mut tcp = tcp;
        let mut up = crate::telemetry::Meter::maybe(meter.as_ref(), TokioIo::new(up));
        let _ = tokio::io::copy_bidirectional(&mut up, &mut tcp).await;
    });
    Ok(Response::new(empty_body()))
}

/// Carries an upgrade to the chosen endpoint as a CONNECT; on success answers the app `101`
/// and splices the two upgraded connections.
pub(crate) async fn through(
    ctx: &crate::outbound::OutboundCtx,
    state: &crate::state::MeshState,
    plan: &Plan,
    mut parts: http::request::Parts,
    path: &str,
    proto: &str,
    client: hyper::upgrade::OnUpgrade,
) -> Result<Response<ProxyBody>, ProxyError> {
    parts.method = http::Method::CONNECT;
    parts.uri = Uri::from(plan.authority.clone());
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
    crate::upgrade::splice(client, hyper::upgrade::on(&mut resp), &ctx.drain, None);
    Ok(answer)
}

/// A plaintext caller's HTTP/1.1 upgrade (captured, from outside the mesh), replayed to the
/// app as it came (its own signals stripped); on `101` both sides are spliced, any other
/// answer goes back as a plain response.
pub async fn plaintext_to_app(
    app: std::net::SocketAddr,
    mut req: Request<Incoming>,
    drain: &isthmus_core::drain::Drain,
) -> Result<Response<ProxyBody>, ProxyError> {
    let on_client = hyper::upgrade::on(&mut req);
    let (mut parts, _) = req.into_parts();
    headers::strip_untrusted(&mut parts.headers);
    let tcp = tokio::net::TcpStream::connect(app)
        .await
        .map_err(|e| ProxyError::AppUnavailable(format!("{app}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| ProxyError::AppReset(e.to_string()))?;
    drain.spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    parts.version = http::Version::HTTP_11;
    if let Some(pq) = parts.uri.path_and_query().cloned() {
        parts.uri = Uri::from(pq);
    }
    let resp = send
        .send_request(Request::from_parts(parts, empty_body()))
        .await
        .map_err(|e| ProxyError::AppReset(e.to_string()))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = resp.into_parts();
        headers::strip_untrusted(&mut parts.headers);
        return Ok(Response::from_parts(parts, crate::body::boxed(body)));
    }
    let mut answer = Response::new(empty_body());
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *answer.headers_mut() = resp.headers().clone();
    headers::strip_untrusted(answer.headers_mut());
    splice(on_client, hyper::upgrade::on(resp), drain, None);
    Ok(answer)
}
