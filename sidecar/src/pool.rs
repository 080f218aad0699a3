//! Connections to peers, one multiplexed mTLS HTTP/2 connection per peer: direct to a
//! sidecar of this cluster, or through the local gateway to a sidecar of another cluster
//! (an HTTP/2 CONNECT on the gateway connection carries the end-to-end TLS). Connections
//! are made once and shared by every request until they close.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use isthmus_core::drain::Drain;
use isthmus_core::headers::{ERROR_REASON, TARGET_CLUSTER};
use isthmus_core::identity::SpiffeId;
use isthmus_core::tls::{server_name, PeerPolicy, TlsIdentity, ALPN_H2};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;
pub type H2 = SendRequest<ProxyBody>;

/// Time to reach a peer of this cluster (TCP, TLS and HTTP/2 handshakes), unless a
/// DestinationRule's `connectTimeout` says otherwise. A hung peer still completes TCP (its
/// kernel answers), so this bounds how long a request waits on one before going elsewhere.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time to reach a peer through the gateways: the far gateway connects an endpoint
/// before the end-to-end handshakes start.
pub const TUNNEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Keep-alive of every connection to a peer (sidecar, gateway, and end to end through the
/// gateways): after 250 ms with nothing read a PING goes out, and a peer that does not
/// answer within 500 ms more is given up. A hung peer (stopped, partitioned, a gateway on
/// the path gone) is thus left within 750 ms of its last frame, its requests retried
/// elsewhere. Only idle connections ping: a busy one reads all the time.
const KEEPALIVE: (Duration, Duration) = (Duration::from_millis(250), Duration::from_millis(500));

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {peer}: {source}")]
    Tls {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 handshake with {peer}: {source}")]
    Http2 {
        peer: String,
        #[source]
        source: hyper::Error,
    },
    #[error("gateway refused the tunnel to {cluster}: {status} {reason}")]
    Gateway {
        cluster: String,
        status: http::StatusCode,
        reason: String,
    },
    #[error("tunnel to {cluster} through the gateway: {source}")]
    Tunnel {
        cluster: String,
        #[source]
        source: hyper::Error,
    },
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out reaching {peer}")]
    Timeout { peer: String },
    #[error("no gateway in this cluster to reach {cluster}")]
    NoGateway { cluster: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PoolKey {
    Direct(SocketAddr),
    /// Through the gateway to (cluster, host:port, subset labels, endpoint).
    Remote(String, String, String, String),
}

/// Where a tunnel through the gateway goes.
#[derive(Debug, Clone, Copy)]
pub struct Remote<'a> {
    pub cluster: &'a str,
    /// `<service host>:<port>`.
    pub authority: &'a str,
    /// Subset labels the endpoint must carry, encoded (`k=v,k2=v2`); empty for any.
    pub subset: &'a str,
    /// One endpoint of a headless service by its DNS label; empty for any.
    pub endpoint: &'a str,
    /// The trace context of the request that opens the tunnel, for the gateways' spans.
    pub traceparent: Option<&'a http::HeaderValue>,
}

/// A pooled connection and how it has been used.
struct Pooled {
    h2: H2,
    uses: u32,
    last_used: std::time::Instant,
    /// The idle timeout in force at its last use.
    idle: Option<Duration>,
}

impl Pooled {
    /// The connection for one more request, if it is open, not worn out
    /// (`maxRequestsPerConnection`) and not idle past `idle`; counts the use.
    fn take(&mut self, max_uses: Option<u32>, idle: Option<Duration>) -> Option<H2> {
        let worn = max_uses.is_some_and(|m| self.uses >= m);
        let stale = idle.is_some_and(|i| self.last_used.elapsed() > i);
        if self.h2.is_closed() || worn || stale {
            return None;
        }
        self.uses += 1;
        self.last_used = std::time::Instant::now();
        self.idle = idle;
        Some(self.h2.clone())
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Pooled>>>;

/// How a destination wants its connections: connect timeout, and when to retire one
/// (`maxRequestsPerConnection`, `idleTimeout` of a DestinationRule).
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// `None`: [`CONNECT_TIMEOUT`] or [`TUNNEL_CONNECT_TIMEOUT`].
    pub timeout: Option<Duration>,
    pub max_uses: Option<u32>,
    /// `None`: the sidecar's upstream idle timeout.
    pub idle: Option<Duration>,
}

impl ConnectOptions {
    fn with_timeout(timeout: Duration) -> Self {
        Self {
            timeout: Some(timeout),
            max_uses: None,
            idle: None,
        }
    }
}

/// How often idle connections are looked for.
const REAP_INTERVAL: Duration = Duration::from_secs(1);

pub struct Pool {
    identity: TlsIdentity,
    drain: Drain,
    /// Counts connections opened.
    opened: prometheus_client::metrics::counter::Counter,
    /// Idle time after which a pooled connection closes, unless its destination says.
    idle_default: Duration,
    slots: Mutex<HashMap<PoolKey, Slot>>,
}

pub fn empty_body() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

async fn h2_handshake<I>(
    io: I,
    peer: &str,
    keepalive: (Duration, Duration),
    drain: &Drain,
) -> Result<H2, ConnectError>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(isthmus_core::headers::PEER_MAX_HEADER_LIST)
        .keep_alive_interval(keepalive.0)
        .keep_alive_timeout(keepalive.1)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| ConnectError::Http2 {
            peer: peer.to_owned(),
            source,
        })?;
    let peer = peer.to_owned();
    drain.spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%peer, error = %e, "peer connection closed");
        }
    });
    Ok(send)
}

impl Pool {
    pub fn new(
        identity: TlsIdentity,
        drain: Drain,
        opened: prometheus_client::metrics::counter::Counter,
        idle_default: Duration,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            identity,
            drain: drain.clone(),
            slots: Mutex::default(),
            opened,
            idle_default,
        });
        let weak = Arc::downgrade(&pool);
        drain.spawn(async move {
            let mut tick = tokio::time::interval(REAP_INTERVAL);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.reap_idle();
            }
        });
        pool
    }

    /// Drops connections idle longer than their destination's `idleTimeout`; each closes
    /// once its last request finishes.
    fn reap_idle(&self) {
        let slots: Vec<Slot> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for slot in slots {
            if let Ok(mut guard) = slot.try_lock() {
                if guard
                    .as_ref()
                    .is_some_and(|p| p.idle.is_some_and(|idle| p.last_used.elapsed() > idle))
                {
                    *guard = None;
                }
            }
        }
    }

    fn slot(&self, key: PoolKey) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key).or_default().clone()
    }

    /// The pooled connection for `key` if it is open and may take another request: the
    /// path of nearly every request, with no future and no allocation. `None` when a
    /// connection must be made (or another caller is making one).
    fn pooled(&self, key: &PoolKey, opts: &ConnectOptions) -> Option<H2> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)?
            .clone();
        let mut guard = slot.try_lock().ok()?;
        let idle = Some(opts.idle.unwrap_or(self.idle_default));
        guard.as_mut()?.take(opts.max_uses, idle)
    }

    /// Returns the open connection for `key`, or makes one. Concurrent callers share one
    /// connect.
    async fn get_or_connect<F>(
        &self,
        key: PoolKey,
        peer: &str,
        opts: ConnectOptions,
        connect: F,
    ) -> Result<H2, ConnectError>
    where
        F: Future<Output = Result<H2, ConnectError>>,
    {
        let timeout = opts.timeout.unwrap_or(match key {
            PoolKey::Direct(_) => CONNECT_TIMEOUT,
            PoolKey::Remote(..) => TUNNEL_CONNECT_TIMEOUT,
        });
        let opts = ConnectOptions {
            idle: Some(opts.idle.unwrap_or(self.idle_default)),
            ..opts
        };
        let slot = self.slot(key);
        let mut guard = slot.lock().await;
        if let Some(h2) = guard
            .as_mut()
            .and_then(|p| p.take(opts.max_uses, opts.idle))
        {
            return Ok(h2);
        }
        // A retired connection closes by itself once its requests in flight finish.
        *guard = None;
        let h2 =
            tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| ConnectError::Timeout {
                    peer: peer.to_owned(),
                })??;
        self.opened.inc();
        *guard = Some(Pooled {
            h2: h2.clone(),
            uses: 1,
            last_used: std::time::Instant::now(),
            idle: opts.idle,
        });
        Ok(h2)
    }

    async fn tls_h2(&self, addr: SocketAddr, policy: PeerPolicy) -> Result<H2, ConnectError> {
        let peer = addr.to_string();
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ConnectError::Tcp { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let connector =
            tokio_rustls::TlsConnector::from(self.identity.client_config(policy, &[ALPN_H2]));
        let tls = connector
            .connect(server_name(), tcp)
            .await
            .map_err(|source| ConnectError::Tls {
                peer: peer.clone(),
                source,
            })?;
        h2_handshake(tls, &peer, KEEPALIVE, &self.drain).await
    }

    /// A connection to the sidecar at `addr`, which must present `identity`.
    pub async fn direct(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        opts: ConnectOptions,
    ) -> Result<H2, ConnectError> {
        let key = PoolKey::Direct(addr);
        if let Some(h2) = self.pooled(&key, &opts) {
            return Ok(h2);
        }
        // Boxed: the handshakes' state lives on the heap only while a connection is being
        // made, not in every request's future.
        Box::pin(async move {
            let policy = PeerPolicy::OneOf(vec![identity.clone()]);
            self.get_or_connect(key, &addr.to_string(), opts, self.tls_h2(addr, policy))
                .await
        })
        .await
    }

    /// A connection to a sidecar of `cluster` serving `authority`, through the gateway.
    /// The TLS inside the tunnel is end to end with that sidecar, which must present one of
    /// `identities` (any identity of the trust domain when the list is empty).
    pub async fn remote(
        &self,
        gateway: &(SocketAddr, SpiffeId),
        to: Remote<'_>,
        identities: &[SpiffeId],
        opts: ConnectOptions,
    ) -> Result<H2, ConnectError> {
        let key = PoolKey::Remote(
            to.cluster.to_owned(),
            to.authority.to_owned(),
            to.subset.to_owned(),
            to.endpoint.to_owned(),
        );
        if let Some(h2) = self.pooled(&key, &opts) {
            return Ok(h2);
        }
        Box::pin(async move {
            let peer = format!("{} in {}", to.authority, to.cluster);
            let timeout = opts.timeout.unwrap_or(TUNNEL_CONNECT_TIMEOUT);
            let tunnel = self.tunnel(gateway, to, identities, timeout);
            self.get_or_connect(key, &peer, opts, tunnel).await
        })
        .await
    }

    async fn tunnel(
        &self,
        gateway: &(SocketAddr, SpiffeId),
        to: Remote<'_>,
        identities: &[SpiffeId],
        timeout: Duration,
    ) -> Result<H2, ConnectError> {
        let Remote {
            cluster,
            authority,
            subset,
            endpoint,
            traceparent,
        } = to;
        let (gw_addr, gw_id) = (gateway.0, gateway.1.clone());
        let mut gw = self
            .get_or_connect(
                PoolKey::Direct(gw_addr),
                &gw_addr.to_string(),
                // The gateway connection is shared by every destination: no per-destination caps.
                ConnectOptions::with_timeout(timeout),
                self.tls_h2(gw_addr, PeerPolicy::OneOf(vec![gw_id])),
            )
            .await?;
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .header(TARGET_CLUSTER, cluster)
            .header(isthmus_core::headers::SUBSET, subset)
            .header(isthmus_core::headers::ENDPOINT, endpoint);
        if let Some(tp) = traceparent {
            req = req.header(isthmus_core::otlp::TRACEPARENT, tp);
        }
        let req = req.body(empty_body()).map_err(|_| ConnectError::Gateway {
            cluster: cluster.to_owned(),
            status: http::StatusCode::BAD_REQUEST,
            reason: format!("invalid authority {authority}"),
        })?;
        let tunnel_err = |source| ConnectError::Tunnel {
            cluster: cluster.to_owned(),
            source,
        };
        gw.ready().await.map_err(tunnel_err)?;
        let resp = gw.send_request(req).await.map_err(tunnel_err)?;
        if resp.status() != http::StatusCode::OK {
            let reason = resp
                .headers()
                .get(ERROR_REASON)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            return Err(ConnectError::Gateway {
                cluster: cluster.to_owned(),
                status: resp.status(),
                reason,
            });
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(tunnel_err)?;
        let policy = if identities.is_empty() {
            PeerPolicy::TrustDomain(self.identity.id().trust_domain().to_owned())
        } else {
            PeerPolicy::OneOf(identities.to_vec())
        };
        let connector =
            tokio_rustls::TlsConnector::from(self.identity.client_config(policy, &[ALPN_H2]));
        let peer = format!("{authority} in {cluster}");
        let tls = connector
            .connect(server_name(), TokioIo::new(upgraded))
            .await
            .map_err(|source| ConnectError::Tls {
                peer: peer.clone(),
                source,
            })?;
        h2_handshake(tls, &peer, KEEPALIVE, &self.drain).await
    }
}
