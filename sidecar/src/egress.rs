//! Calls to services outside the mesh (`MESH_EXTERNAL` ServiceEntries): the sidecar connects
//! to them itself, without mTLS or tunnel, at the addresses the entry's resolution gives:
//! its `STATIC` endpoints, its `DNS` names (or the host itself) resolved when connecting,
//! or with `NONE` the host and port the caller asked for. HTTP goes out as HTTP/1.1 (or
//! HTTP/2 with prior knowledge on `http2`/`grpc` ports) after VirtualService routing;
//! `CONNECT host:port` (TLS passed through, or any TCP) is spliced as bytes.
//!
//! Each request opens its own connection: there is no pool for external hosts yet.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_core::config::Resolution;
use tokio::net::TcpStream;

use crate::attempt::Plan;
use crate::errors::ProxyError;
use crate::origination::Origination;
use crate::outbound::OutboundCtx;
use crate::pool::{ConnectError, ProxyBody, CONNECT_TIMEOUT};
use crate::state::{Port, Service};
use isthmus_core::headers;

/// What responses and metrics name as the cluster of a service outside the mesh.
pub const CLUSTER: &str = "external";

/// The addresses to try for `port` of an external service, in round-robin order; `asked`
/// is the host (without port) and `asked_port` the port the caller named.
pub async fn addresses(
    svc: &Service,
    port: &Port,
    asked: &str,
    asked_port: u16,
) -> Result<Vec<SocketAddr>, ProxyError> {
    let ext = svc.external.as_ref().ok_or_else(|| ProxyError::NoRoute {
        host: asked.to_owned(),
    })?;
    let service = asked.to_owned();
    let port_of = |ep: &isthmus_core::config::ExternalEndpoint| {
        ep.ports
            .get(&*port.name)
            .copied()
            .unwrap_or(port.target_port)
    };
    let names: Vec<(String, u16)> = match ext.resolution {
        Resolution::None => vec![(asked.to_owned(), asked_port)],
        _ if ext.endpoints.is_empty() => vec![(asked.to_owned(), port.target_port)],
        _ => ext
            .endpoints
            .iter()
            .map(|ep| (ep.address.clone(), port_of(ep)))
            .collect(),
    };
    let mut out = Vec::new();
    let mut last_error = None;
    for (name, port) in names {
        if let Ok(ip) = name.parse::<std::net::IpAddr>() {
            out.push(SocketAddr::new(ip, port));
            continue;
        }
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::lookup_host((name.as_str(), port)),
        )
        .await
        {
            Ok(Ok(found)) => out.extend(found),
            Ok(Err(e)) => last_error = Some(e),
            Err(_) => {
                last_error = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("resolving {name} timed out"),
                ))
            }
        }
    }
    if out.is_empty() {
        let source = last_error.unwrap_or_else(|| std::io::Error::other("no address"));
        return Err(ProxyError::UpstreamConnect {
            service,
            source: ConnectError::Resolve {
                host: asked.to_owned(),
                source,
            },
        });
    }
    let start = svc.cursor.fetch_add(1, Ordering::Relaxed) % out.len();
    out.rotate_left(start);
    Ok(out)
}

/// The first of `addrs` that accepts a connection within the connect timeout.
pub async fn connect(service: &str, addrs: &[SocketAddr]) -> Result<TcpStream, ProxyError> {
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Ok(Err(source)) => {
                last = Some(ConnectError::Tcp {
                    addr: *addr,
                    source,
                })
            }
            Err(_) => {
                last = Some(ConnectError::Timeout {
                    peer: addr.to_string(),
                })
            }
        }
    }
    Err(ProxyError::UpstreamConnect {
        service: service.to_owned(),
        source: last.unwrap_or(ConnectError::Timeout {
            peer: service.to_owned(),
        }),
    })
}

/// Sends one request over a new connection to the first address that answers, with TLS
/// when `tls` (the DestinationRule's origination, and the host asked for) says so.
pub async fn send(
    service: &str,
    addrs: &[SocketAddr],
    h2: bool,
    req: Request<ProxyBody>,
    drain: &isthmus_core::drain::Drain,
    tls: Option<(&Origination, &str)>,
) -> Result<Response<Incoming>, ProxyError> {
    let tcp = connect(service, addrs).await?;
    match tls {
        Some((o, host)) => exchange(service, o.connect(tcp, host, h2).await?, h2, req, drain).await,
        None => exchange(service, tcp, h2, req, drain).await,
    }
}

async fn exchange<IO>(
    service: &str,
    io: IO,
    h2: bool,
    req: Request<ProxyBody>,
    drain: &isthmus_core::drain::Drain,
) -> Result<Response<Incoming>, ProxyError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let reset = |source| ProxyError::UpstreamReset {
        service: service.to_owned(),
        source,
    };
    if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(reset)?;
        drain.spawn(async move {
            let _ = conn.await;
        });
        send.send_request(req).await.map_err(reset)
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(reset)?;
        drain.spawn(async move {
            let _ = conn.await;
        });
        send.send_request(req).await.map_err(reset)
    }
}

/// An app's `CONNECT` to an external service: connects, answers 200, splices the bytes.
/// With `tls`, the connection to the service is TLS (the app's bytes go inside it).
pub async fn tunnel(
    service: &str,
    addrs: &[SocketAddr],
    mut req: Request<Incoming>,
    drain: &isthmus_core::drain::Drain,
    tls: Option<(&Origination, &str)>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let tcp = connect(service, addrs).await?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    match tls {
        Some((o, host)) => {
            let mut tls = o.connect(tcp, host, false).await?;
            drain.spawn(async move {
                let Ok(up) = on_upgrade.await else { return };
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(up), &mut tls).await;
            });
        }
        None => {
            let mut tcp = tcp;
            drain.spawn(async move {
                let Ok(up) = on_upgrade.await else { return };
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(up), &mut tcp).await;
            });
        }
    }
    Ok(Response::new(crate::pool::empty_body()))
}

/// A request to a service outside the mesh, after routing: plain HTTP
/// with the caller's (or the route's) authority, no internal headers.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn to_external(
    ctx: &OutboundCtx,
    plan: &Plan,
    port: &crate::state::Port,
    authority: &str,
    path: &str,
    mut parts: http::request::Parts,
    body: hyper::body::Incoming,
    deadline: Option<tokio::time::Instant>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let service = plan.svc.hostname();
    let (asked, asked_port) = crate::outbound::split_host(authority);
    let addrs = addresses(&plan.svc, port, asked, asked_port.unwrap_or(port.port)).await?;
    headers::strip_untrusted(&mut parts.headers);
    let h2 = port.speaks_h2();
    let invalid = |_| ProxyError::InvalidRequest(format!("`{authority}{path}` is not a valid URI"));
    if h2 {
        parts.uri = Uri::try_from(format!("http://{authority}{path}")).map_err(invalid)?;
        parts.version = Version::HTTP_2;
    } else {
        parts.uri = Uri::try_from(path).map_err(invalid)?;
        parts.version = Version::HTTP_11;
        let host = HeaderValue::from_str(authority).map_err(|_| {
            ProxyError::InvalidRequest(format!("`{authority}` is not a valid host"))
        })?;
        parts.headers.insert(http::header::HOST, host);
    }
    let body = crate::body::boxed(crate::body::Watched::new(
        body,
        ctx.limits.stream_idle_timeout,
    ));
    let origination = plan.state().and_then(|s| s.tls.clone());
    let sent = send(
        &service,
        &addrs,
        h2,
        Request::from_parts(parts, body),
        &ctx.drain,
        origination.as_deref().map(|o| (o, asked)),
    );
    let resp = match deadline {
        Some(d) => tokio::time::timeout_at(d, sent)
            .await
            .unwrap_or(Err(ProxyError::Timeout {
                service: service.to_string(),
            }))?,
        None => sent.await?,
    };
    let (mut rparts, rbody) = resp.into_parts();
    headers::strip_hop_by_hop(&mut rparts.headers);
    headers::strip_untrusted(&mut rparts.headers);
    Ok(Response::from_parts(rparts, crate::body::boxed(rbody)))
}
