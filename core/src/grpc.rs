//! gRPC over mTLS for the control plane: a TLS incoming stream for tonic servers that tells
//! handlers who called, and channels whose connector performs the SPIFFE-checked handshake.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::drain::Drain;
use crate::identity::SpiffeId;

/// Handshakes allowed in flight per listener before accepting waits.
const HANDSHAKE_BACKLOG: usize = 128;
/// A client that does not finish its handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a control-plane connection; a request extension.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Verified SPIFFE ID, `None` when the client presented no certificate.
    pub identity: Option<SpiffeId>,
    pub remote: SocketAddr,
}

/// Reads the caller of a tonic request.
pub fn peer_of<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
    req.extensions().get::<PeerInfo>()
}

/// A server-side TLS connection carrying its [`PeerInfo`].
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently; the stream yields
/// only connections whose handshake (and client certificate, if any) verified.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    drain: Drain,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(HANDSHAKE_BACKLOG);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tasks = drain.clone();
    let accept_drain = drain.clone();
    drain.spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
                _ = accept_drain.draining() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tasks.spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let identity = crate::tls::peer_identity(stream.get_ref().1);
                        let _ = tx
                            .send(Ok(TlsConn {
                                stream,
                                info: PeerInfo { identity, remote },
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "control-plane handshake failed")
                    }
                    Err(_) => tracing::debug!(%remote, "control-plane handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A lazily connecting channel to `addr` over TLS with `config`; it reconnects by itself.
pub fn tls_channel(addr: SocketAddr, config: Arc<ClientConfig>) -> Channel {
    let connector = tokio_rustls::TlsConnector::from(config);
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("socket address forms a valid URI")
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(crate::tls::server_name(), tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    }))
}

/// The bearer token of a request, if any.
pub fn bearer_token<T>(req: &tonic::Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}
