//! The inbound sidecar's HTTP/1.1 connections to its app: kept alive and reused, one
//! request at a time each, as many as the requests in flight need.
//!
//! A connection goes back to the pool when its response body has been read to the end
//! (a body dropped half-read closes it: HTTP/1.1 cannot resume mid-message). A request
//! given to a kept connection that the app closed meanwhile was never sent, and goes to the
//! next connection, or a new one: the app never sees it twice.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::errors::ProxyError;
use crate::pool::ProxyBody;

/// Time to connect to the app; longer is an app (or a machine) under load.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Idle connections kept at most, most recently used first.
const MAX_IDLE: usize = 1024;

/// Why the app could not be given a request.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Proof that nothing listens: the app is not there.
    #[error("connect to {addr}: {source}")]
    Refused {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Any other connect failure, or one that took too long.
    #[error("connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The app took the request and broke the exchange (reset, closed, malformed answer).
    #[error("{addr}: {source}")]
    Reset {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl From<AppError> for ProxyError {
    /// Refused is proof the app is not there; any other failed connect may be an app (or a
    /// machine) under load, and is judged like a 5xx, one of several.
    fn from(e: AppError) -> Self {
        match e {
            AppError::Refused { .. } => ProxyError::AppUnavailable(e.to_string()),
            AppError::Connect { .. } => ProxyError::AppConnectTimeout(e.to_string()),
            AppError::Reset { .. } => ProxyError::AppReset(e.to_string()),
        }
    }
}

type Conn = SendRequest<ProxyBody>;

pub struct AppPool {
    addr: SocketAddr,
    /// Connections with no request in progress, and when each was last used.
    idle: Mutex<Vec<(Conn, Instant)>>,
    idle_timeout: Duration,
}

impl AppPool {
    pub fn new(addr: SocketAddr, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            addr,
            idle: Mutex::default(),
            idle_timeout,
        })
    }

    /// Sends `req` to the app and returns its response; the body must be read (or dropped)
    /// for the connection to be reused.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<AppBody>, AppError> {
        while let Some(mut conn) = self.checkout() {
            // Ready once the previous exchange on it has finished; an error means closed.
            if conn.ready().await.is_err() {
                continue;
            }
            match conn.try_send_request(req).await {
                Ok(resp) => return Ok(self.body(resp, conn)),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection had closed. The next one gets it.
                    Some(r) => req = r,
                    None => {
                        return Err(AppError::Reset {
                            addr: self.addr,
                            source: e.into_error(),
                        })
                    }
                },
            }
        }
        // Boxed: the handshake's state is not part of every request's future.
        let mut conn = Box::pin(self.connect()).await?;
        let resp = conn
            .send_request(req)
            .await
            .map_err(|source| AppError::Reset {
                addr: self.addr,
                source,
            })?;
        Ok(self.body(resp, conn))
    }

    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((conn, since)) = idle.pop() {
            if !conn.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, conn: Conn) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }

    fn body(self: &Arc<Self>, resp: Response<Incoming>, conn: Conn) -> Response<AppBody> {
        resp.map(|inner| AppBody {
            inner,
            conn: Some((self.clone(), conn)),
        })
    }

    async fn connect(&self) -> Result<Conn, AppError> {
        let addr = self.addr;
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) if source.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(AppError::Refused { addr, source })
            }
            Ok(Err(e)) => {
                return Err(AppError::Connect {
                    addr,
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(AppError::Connect {
                    addr,
                    reason: format!("timed out after {CONNECT_TIMEOUT:?}"),
                })
            }
        };
        let _ = tcp.set_nodelay(true);
        let (conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| AppError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(%addr, error = %e, "app connection ended");
            }
        });
        Ok(conn)
    }
}

/// An app's response body; its connection returns to the pool once the body has ended.
pub struct AppBody {
    inner: Incoming,
    conn: Option<(Arc<AppPool>, Conn)>,
}

impl AppBody {
    fn release(&mut self) {
        if let Some((pool, conn)) = self.conn.take() {
            pool.checkin(conn);
        }
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AppBody {
    fn drop(&mut self) {
        // A body that ended (or never had anything) leaves its connection reusable; one
        // dropped half-read does not.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

/// Aborts a [`send_once`] connection when dropped (after its answer was read).
pub(crate) struct OnceConn(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for OnceConn {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One HTTP/1.1 request on a TCP connection of its own, for exchanges too rare to pool
/// (health probes of the app, plugins' callouts). The connection lives while the returned
/// guard does, so the answer's body can still be read.
pub(crate) async fn send_once<B>(
    addr: SocketAddr,
    req: Request<B>,
) -> Result<(Response<Incoming>, OnceConn), String>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP to {addr}: {e}"))?;
    let conn = OnceConn(tokio::spawn(conn));
    let what = format!("{} {}", req.method(), req.uri().path());
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("{what} on {addr}: {e}"))?;
    Ok((resp, conn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An app answering `ok` to every request; `close` closes each connection after its
    /// first answer (with no `connection: close`: the pool finds out by itself).
    async fn app(close: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let Ok(n) = tcp.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if tcp.write_all(answer).await.is_err() || close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn get(pool: &Arc<AppPool>) -> Result<String, AppError> {
        let req = Request::get("/")
            .header("host", "app")
            .body(crate::pool::empty_body())
            .expect("request");
        let resp = pool.send(req).await?;
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn one_connection_serves_requests_one_after_another() {
        let (addr, accepted) = app(false).await;
        let pool = AppPool::new(addr, Duration::from_secs(60));
        for _ in 0..5 {
            assert_eq!(get(&pool).await.expect("answered"), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_get_a_connection_each_and_all_are_kept() {
        let (addr, accepted) = app(false).await;
        let pool = AppPool::new(addr, Duration::from_secs(60));
        let all = futures::future::join_all((0..4).map(|_| get(&pool))).await;
        assert!(
            all.iter().all(|r| r.as_deref().ok() == Some("ok")),
            "{all:?}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        let again = futures::future::join_all((0..4).map(|_| get(&pool))).await;
        assert!(again.iter().all(|r| r.is_ok()));
        assert_eq!(accepted.load(Ordering::SeqCst), 4, "the four were reused");
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_is_replaced_without_an_error() {
        let (addr, accepted) = app(true).await;
        let pool = AppPool::new(addr, Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(get(&pool).await.expect("answered"), "ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_does_not_return_its_connection() {
        let (addr, accepted) = app(false).await;
        let pool = AppPool::new(addr, Duration::from_secs(60));
        let req = Request::get("/")
            .body(crate::pool::empty_body())
            .expect("request");
        let resp = pool.send(req).await.expect("answered");
        // Content-length 2, nothing read yet.
        drop(resp);
        assert_eq!(get(&pool).await.expect("answered"), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn nothing_listening_is_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let pool = AppPool::new(addr, Duration::from_secs(60));
        assert!(matches!(get(&pool).await, Err(AppError::Refused { .. })));
    }
}
