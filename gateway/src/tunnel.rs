//! The gateway's tunnel listener (15008) for sidecars of its own cluster: mTLS, HTTP/2, one
//! CONNECT per tunnelled connection. The CONNECT names the service (`name.ns.svc...:port`)
//! and the target cluster (`x-isthmus-cluster`); the gateway opens a stream to that
//! cluster's gateway and splices the CONNECT's bytes onto it.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use isthmus_core::headers::{ERROR_REASON, TARGET_CLUSTER};
use isthmus_core::identity::SpiffeId;
use isthmus_core::tls::{ClientAuth, PeerPolicy, TlsIdentity, ALPN_H2};
use isthmus_proto::tunnel::StreamHeader;
use tokio::net::TcpListener;

use crate::peer::PeerLinks;
use crate::state::Store;

type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

pub struct TunnelCtx {
    pub identity: TlsIdentity,
    pub cluster: String,
    pub store: Arc<Store>,
    pub links: Arc<PeerLinks>,
    pub drain: isthmus_core::drain::Drain,
    /// Spans of the tunnels sidecars open, when tracing is on.
    pub tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
}

fn reply(status: StatusCode, reason: &'static str) -> Response<Body> {
    let mut r = Response::new(Empty::new().boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(ERROR_REASON, HeaderValue::from_static(reason));
    r
}

/// `name.ns.svc.cluster.local:port` (or `clusterset.local`) → (ns, name, port).
fn parse_authority(authority: &str) -> Option<(String, String, u16)> {
    let (host, port) = authority.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let mut labels = host.split('.');
    let name = labels.next()?;
    let ns = labels.next()?;
    let rest: Vec<&str> = labels.collect();
    let ok = matches!(
        rest.as_slice(),
        ["svc", "cluster", "local"] | ["svc", "clusterset", "local"] | ["svc"] | []
    );
    ok.then(|| (ns.to_owned(), name.to_owned(), port))
}

pub async fn run(listener: TcpListener, ctx: Arc<TunnelCtx>) {
    let td = ctx.identity.id().trust_domain().to_owned();
    let acceptor = tokio_rustls::TlsAcceptor::from(ctx.identity.server_config(
        ClientAuth::Required(PeerPolicy::TrustDomain(td)),
        &[ALPN_H2],
    ));
    loop {
        let Ok((tcp, remote)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, ctx) = (acceptor.clone(), ctx.clone());
        let drain = ctx.drain.clone();
        let d = drain.clone();
        drain.spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    return tracing::info!(%remote, error = %e, "tunnel handshake refused")
                }
                Err(_) => return,
            };
            let Some(peer) = isthmus_core::tls::peer_identity(tls.get_ref().1) else {
                return;
            };
            let peer = Arc::new(peer);
            let svc = hyper::service::service_fn(move |req| {
                let (ctx, peer) = (ctx.clone(), peer.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(&ctx, &peer, req).await) }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(10))
                .max_header_list_size(isthmus_core::headers::PEER_MAX_HEADER_LIST)
                .max_pending_accept_reset_streams(isthmus_core::headers::PEER_MAX_PENDING_RESETS)
                .serve_connection(TokioIo::new(tls), svc);
            let _ = d.serve_http(conn).await;
        });
    }
}

async fn handle(ctx: &TunnelCtx, peer: &SpiffeId, mut req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::CONNECT {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "connect-only");
    }
    let Some((namespace, service, port)) = req
        .uri()
        .authority()
        .and_then(|a| parse_authority(a.as_str()))
    else {
        return reply(StatusCode::BAD_REQUEST, "bad-authority");
    };
    let Some(cluster) = req
        .headers()
        .get(TARGET_CLUSTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return reply(StatusCode::BAD_REQUEST, "no-target-cluster");
    };
    let Some(target) = ctx.store.current().peers.get(&cluster).cloned() else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "no-peer-gateway");
    };
    let mut traceparent = req
        .headers()
        .get(isthmus_core::otlp::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let span = crate::spans::start(
        ctx.tracer.as_ref(),
        &traceparent,
        format!("tunnel to {cluster}"),
        opentelemetry::trace::SpanKind::Client,
        vec![
            opentelemetry::KeyValue::new("isthmus.source.cluster", ctx.cluster.clone()),
            opentelemetry::KeyValue::new("isthmus.source.principal", peer.to_string()),
            opentelemetry::KeyValue::new(
                "isthmus.destination.service",
                format!("{service}.{namespace}:{port}"),
            ),
            opentelemetry::KeyValue::new("isthmus.destination.cluster", cluster.clone()),
        ],
    );
    if let Some(s) = &span {
        // The remote gateway's span is this one's child.
        traceparent = s.traceparent.clone();
    }
    // The subset a sidecar asks for, `k=v,k2=v2`.
    let labels = req
        .headers()
        .get(isthmus_core::headers::SUBSET)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    // One endpoint of a headless service, by its DNS label.
    let endpoint = req
        .headers()
        .get(isthmus_core::headers::ENDPOINT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let header = StreamHeader {
        labels,
        endpoint,
        target_cluster: cluster.clone(),
        namespace,
        service,
        port: u32::from(port),
        source_identity: peer.to_string(),
        source_cluster: ctx.cluster.clone(),
        traceparent,
    };
    let opened = ctx.links.open(&cluster, &target, &header).await;
    if let Some(span) = span {
        span.end(opened.as_ref().err().map(|e| e.to_string()).as_deref());
    }
    let (send, recv) = match opened {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(peer = %cluster, error = %e, "tunnel to peer failed");
            return reply(StatusCode::SERVICE_UNAVAILABLE, "peer-unavailable");
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    ctx.drain.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut local = TokioIo::new(upgraded);
        let mut quic = tokio::io::join(recv, send);
        let _ = tokio::io::copy_bidirectional(&mut local, &mut quic).await;
    });
    Response::new(Empty::new().boxed())
}

#[cfg(test)]
mod tests {
    use super::parse_authority;

    #[test]
    fn authorities_name_a_service_and_port() {
        assert_eq!(
            parse_authority("echo.demo.svc.cluster.local:80"),
            Some(("demo".into(), "echo".into(), 80))
        );
        assert_eq!(
            parse_authority("echo.demo.svc.clusterset.local:8080"),
            Some(("demo".into(), "echo".into(), 8080))
        );
        assert_eq!(parse_authority("echo.demo.example.com:80"), None);
        assert_eq!(parse_authority("echo:80"), None);
    }
}
