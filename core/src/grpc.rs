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
    /// The cluster whose CA issued the client's certificate (see
    /// `tls::ca::issuing_cluster`); `None` without one, or for one the root issued.
    pub issuer_cluster: Option<String>,
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
                        let state = stream.get_ref().1;
                        let identity = crate::tls::peer_identity(state);
                        let issuer_cluster = state
                            .peer_certificates()
                            .and_then(|c| crate::tls::ca::issuing_cluster(c.get(1..)?));
                        let _ = tx
                            .send(Ok(TlsConn {
                                stream,
                                info: PeerInfo {
                                    identity,
                                    issuer_cluster,
                                    remote,
                                },
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

/// What one streamed control-plane message aims to stay under: large states go out as
/// several messages, so no state depends on one message's size.
pub const CHUNK_BYTES: usize = 1 << 20;
/// The largest control-plane message a peer accepts (gRPC's default is 4 MiB). Messages are
/// chunked at [`CHUNK_BYTES`]; only a single resource larger than that (a service with tens
/// of thousands of endpoints) needs more, and this bounds what a peer can make us buffer.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Splits `items` into runs whose encoded size stays under `limit` (an item larger than
/// `limit` travels alone). Always returns at least one run, possibly empty.
pub fn chunk_by_size<T: prost::Message>(items: Vec<T>, limit: usize) -> Vec<Vec<T>> {
    let mut runs = vec![Vec::new()];
    let mut size = 0;
    for item in items {
        let len = item.encoded_len() + 8;
        let last = runs.last_mut().expect("never empty");
        if !last.is_empty() && size + len > limit {
            runs.push(Vec::new());
            size = 0;
        }
        size += len;
        runs.last_mut().expect("never empty").push(item);
    }
    runs
}

#[cfg(test)]
mod chunk_tests {
    use super::*;

    #[test]
    fn chunks_stay_under_the_limit_and_keep_order() {
        let items: Vec<String> = (0..100).map(|i| format!("{i:0>100}")).collect();
        let runs = chunk_by_size(items.clone(), 1000);
        assert!(runs.len() >= 10, "{} runs", runs.len());
        for run in &runs {
            let size: usize = run.iter().map(|s| prost::Message::encoded_len(s) + 8).sum();
            assert!(size <= 1000, "{size}");
        }
        assert_eq!(runs.concat(), items);
        assert_eq!(
            chunk_by_size(Vec::<String>::new(), 10),
            vec![Vec::<String>::new()]
        );
        let big = vec!["x".repeat(5000), "y".into()];
        assert_eq!(
            chunk_by_size(big.clone(), 1000).len(),
            2,
            "an oversized item travels alone"
        );
    }
}
