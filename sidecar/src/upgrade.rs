//! HTTP/1.1 upgrades (WebSocket) through the mesh. Between proxies an upgrade travels as an
//! HTTP/2 CONNECT carrying the original request's headers, its path and upgrade token in
//! `x-isthmus-path` / `x-isthmus-upgrade`; the receiving sidecar replays the upgrade to its
//! app over HTTP/1.1 and, on `101`, answers `200` with the app's headers; both sides then
//! splice bytes. Across clusters the CONNECT rides inside the end-to-end TLS as usual.
//!
//! Opaque TCP works the same way: the app sends an HTTP `CONNECT host:port` to its sidecar
//! (HTTP proxy style), the sidecars carry it as an HTTP/2 CONNECT naming the target port in
//! `x-isthmus-target-port`, and the receiving sidecar connects that port of its workload.

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use isthmus_core::headers::{self, XFCC};

use crate::errors::ProxyError;
use crate::pool::{empty_body, ProxyBody};

/// The upgrade token a CONNECT between proxies carries.
pub const UPGRADE: &str = "x-isthmus-upgrade";
/// The original request path of an upgrade.
pub const PATH: &str = "x-isthmus-path";
/// The workload port an opaque TCP tunnel goes to.
pub const TARGET_PORT: &str = "x-isthmus-target-port";

/// The protocol a request asks to upgrade to, if it is an HTTP/1.1 upgrade.
pub fn requested(headers: &HeaderMap) -> Option<String> {
    let connection = headers.get(http::header::CONNECTION)?.to_str().ok()?;
    if !connection
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    {
        return None;
    }
    Some(
        headers
            .get(http::header::UPGRADE)?
            .to_str()
            .ok()?
            .to_owned(),
    )
}

/// End-to-end headers of an upgrade request or answer, without hop-by-hop ones.
pub fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    headers::strip_hop_by_hop(&mut h);
    h.remove(http::header::HOST);
    h
}

/// Splices two upgraded connections once both sides are ready.
pub fn splice(
    a: hyper::upgrade::OnUpgrade,
    b: hyper::upgrade::OnUpgrade,
    drain: &isthmus_core::drain::Drain,
) {
    drain.spawn(async move {
        let (Ok(a), Ok(b)) = (a.await, b.await) else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
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
        let (parts, body) = resp.into_parts();
        return Ok(Response::from_parts(parts, crate::body::boxed(body)));
    }
    let mut answer = Response::new(empty_body());
    *answer.headers_mut() = end_to_end(resp.headers());
    splice(
        hyper::upgrade::on(&mut req),
        hyper::upgrade::on(resp),
        drain,
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
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(up), &mut tcp).await;
    });
    Ok(Response::new(empty_body()))
}
