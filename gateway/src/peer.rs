//! Links between gateways: one long-lived QUIC connection per peer cluster (mTLS between
//! gateway identities), a stream per tunnelled connection. A maintainer per peer keeps the
//! connection up and redials with backoff; keep-alives and a short idle timeout turn a dead
//! peer into a closed connection within seconds, and while a peer is down new tunnels fail
//! at once, so sidecars retry in another cluster without waiting.
//!
//! The same QUIC endpoint accepts streams from peers: each names a local service; the
//! gateway connects it to a healthy endpoint's tunnel port and splices bytes. It never sees
//! plaintext: the bytes are the sidecars' end-to-end TLS.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_core::backoff::Backoff;
use isthmus_core::tls::{ClientAuth, PeerPolicy, TlsIdentity};
use isthmus_proto::tunnel::{StreamHeader, StreamReply};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::header;
use crate::state::{Peer, Store};

pub const ALPN_PEER: &[u8] = b"isthmus-peer/1";
/// QUIC keep-alive between gateways: with a packet every 100 ms each way, a peer that
/// stops answering (hung, killed, partitioned) closes the connection at the idle timeout
/// (seven silent keep-alives), new tunnels to it fail at once instead of waiting, and the
/// controller hears the link is down and tells the cluster's sidecars: traffic leaves a
/// silent peer within a second.
const KEEPALIVE: Duration = Duration::from_millis(100);
const IDLE_TIMEOUT: Duration = Duration::from_millis(750);
/// Time for a peer to connect a stream to an endpoint and reply.
pub const STREAM_SETUP_TIMEOUT: Duration = Duration::from_millis(1500);
const ENDPOINT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Local endpoints tried per incoming stream.
const ENDPOINT_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to peer gateway {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("peer gateway {addr} did not answer in time")]
    Timeout { addr: SocketAddr },
    #[error("stream to peer gateway {addr}: {reason}")]
    Stream { addr: SocketAddr, reason: String },
    #[error("peer gateway refused the stream: {0}")]
    Refused(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `outbound` (to a peer) or `inbound` (from a peer).
    pub direction: &'static str,
    pub peer_cluster: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer_cluster: String,
}

#[derive(Clone, Default)]
pub struct Metrics {
    pub streams: Family<StreamLabels, Counter>,
    pub connections: Counter,
    /// 1 while the QUIC connection to a peer cluster is up.
    pub peer_up: Family<PeerLabels, Gauge>,
}

#[derive(Clone)]
enum LinkState {
    Connecting,
    Up(quinn::Connection),
    Down,
}

pub struct PeerLinks {
    endpoint: quinn::Endpoint,
    identity: TlsIdentity,
    /// Per peer cluster, the state of its connection, kept by a maintainer task.
    links: Mutex<HashMap<String, watch::Receiver<LinkState>>>,
    /// Peer clusters whose link is down now: reported to the controller, which tells the
    /// cluster's sidecars to send nothing there while another cluster can serve.
    down: watch::Sender<std::collections::BTreeSet<String>>,
    pub metrics: Metrics,
    cursor: AtomicUsize,
    drain: isthmus_core::drain::Drain,
    /// Spans of the streams peers open, when tracing is on.
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEPALIVE));
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits")));
    t.max_concurrent_bidi_streams(4096u32.into());
    // Gateways are peers on a data-centre network: a lost packet is found by the time
    // threshold within about an RTT, but a lost packet at the end of a burst waits for the
    // probe timeout, which includes the peer's ACK delay (25 ms by default). Asking the
    // peer to acknowledge within 1 ms brings that tail to a few milliseconds.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.max_ack_delay(Some(Duration::from_millis(1)));
    t.ack_frequency_config(Some(ack));
    Arc::new(t)
}

impl PeerLinks {
    /// Builds the QUIC endpoint on an already bound socket.
    pub fn new(
        socket: std::net::UdpSocket,
        identity: TlsIdentity,
        drain: isthmus_core::drain::Drain,
    ) -> anyhow::Result<Self> {
        // Any cluster's gateway may connect; which cluster it is comes from its chain, and
        // its streams may only speak for that cluster (see `serve`).
        let tls = identity.server_config(
            ClientAuth::Required(PeerPolicy::GatewayOf {
                trust_domain: identity.id().trust_domain().to_owned(),
                cluster: None,
            }),
            &[ALPN_PEER],
        );
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
        server.transport_config(transport());
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(Self {
            endpoint,
            identity,
            links: Mutex::default(),
            down: watch::Sender::new(Default::default()),
            metrics: Metrics::default(),
            cursor: AtomicUsize::new(0),
            tracer: None,
            drain,
        })
    }

    /// Shares counters registered elsewhere.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn with_tracer(mut self, tracer: Option<opentelemetry_sdk::trace::SdkTracer>) -> Self {
        self.tracer = tracer;
        self
    }

    /// Dials `cluster`'s gateway: its certificate must be the gateway identity, issued by
    /// that cluster's CA.
    async fn dial(&self, cluster: &str, peer: &Peer) -> Result<quinn::Connection, LinkError> {
        let addr = peer.address;
        let err = |reason: String| LinkError::Connect { addr, reason };
        let policy = PeerPolicy::GatewayOf {
            trust_domain: peer.identity.trust_domain().to_owned(),
            cluster: Some(cluster.to_owned()),
        };
        let tls = self.identity.client_config(policy, &[ALPN_PEER]);
        let mut config = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(tls).map_err(|e| err(e.to_string()))?,
        ));
        config.transport_config(transport());
        let connecting = self
            .endpoint
            .connect_with(config, addr, "isthmus.mesh")
            .map_err(|e| err(e.to_string()))?;
        tokio::time::timeout(STREAM_SETUP_TIMEOUT, connecting)
            .await
            .map_err(|_| LinkError::Timeout { addr })?
            .map_err(|e| err(e.to_string()))
    }

    /// Keeps a connection to one peer up for as long as the peer is in config: dials,
    /// waits for the connection to close, dials again with backoff.
    async fn maintain(
        self: Arc<Self>,
        cluster: String,
        peer: Peer,
        link: watch::Sender<LinkState>,
    ) {
        // Redial quickly: a dial is one packet while the peer is gone, and a peer that
        // comes back should carry traffic again within half a second.
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
        let up = self
            .metrics
            .peer_up
            .get_or_create(&PeerLabels {
                peer_cluster: cluster.clone(),
            })
            .clone();
        loop {
            match self.dial(&cluster, &peer).await {
                Ok(conn) => {
                    tracing::info!(peer = %cluster, addr = %peer.address, "gateway peer connected");
                    self.metrics.connections.inc();
                    let since = std::time::Instant::now();
                    link.send_replace(LinkState::Up(conn.clone()));
                    self.mark(&cluster, true);
                    up.set(1);
                    let reason = conn.closed().await;
                    up.set(0);
                    // A link that held resets the backoff; one the peer closes at once (it
                    // refuses this gateway's certificate) does not, so it is not redialed
                    // in a tight loop.
                    if since.elapsed() > Duration::from_secs(5) {
                        backoff.reset();
                    }
                    tracing::warn!(peer = %cluster, %reason, "gateway peer connection lost");
                }
                Err(e) => tracing::debug!(peer = %cluster, error = %e, "gateway peer unreachable"),
            }
            link.send_replace(LinkState::Down);
            self.mark(&cluster, false);
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    fn mark(&self, cluster: &str, up: bool) {
        self.down.send_if_modified(|down| {
            if up {
                down.remove(cluster)
            } else {
                down.insert(cluster.to_owned())
            }
        });
    }

    /// The peer clusters whose link is down, as it changes.
    pub fn down(&self) -> watch::Receiver<std::collections::BTreeSet<String>> {
        self.down.subscribe()
    }

    /// Starts or stops maintainers as peers come and go in config.
    pub async fn follow_peers(self: Arc<Self>, store: Arc<Store>) {
        let mut updates = store.subscribe();
        let mut running: HashMap<String, (Peer, tokio::task::JoinHandle<()>)> = HashMap::new();
        loop {
            let peers = updates.borrow_and_update().peers.clone();
            running.retain(|cluster, (p, task)| {
                let keep = peers
                    .get(cluster)
                    .is_some_and(|n| n.address == p.address && n.identity == p.identity);
                if !keep {
                    task.abort();
                    self.mark(cluster, true);
                }
                keep
            });
            self.start_maintainers(&peers, &mut running);
            if updates.changed().await.is_err() {
                return;
            }
        }
    }

    fn start_maintainers(
        self: &Arc<Self>,
        peers: &BTreeMap<String, Peer>,
        running: &mut HashMap<String, (Peer, tokio::task::JoinHandle<()>)>,
    ) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|c, _| running.contains_key(c) || peers.contains_key(c));
        for (cluster, peer) in peers {
            if running.contains_key(cluster) {
                continue;
            }
            let (tx, rx) = watch::channel(LinkState::Connecting);
            links.insert(cluster.clone(), rx);
            let task = tokio::spawn(self.clone().maintain(cluster.clone(), peer.clone(), tx));
            let abort = task.abort_handle();
            let drain = self.drain.clone();
            tokio::spawn(async move {
                drain.signaled().await;
                abort.abort();
            });
            running.insert(cluster.clone(), (peer.clone(), task));
        }
    }

    /// The live connection to `cluster`: waits while the first dial is under way, fails at
    /// once when the peer is known to be down, so the sidecar can retry elsewhere at once.
    async fn connection(
        &self,
        cluster: &str,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, LinkError> {
        let link = self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cluster)
            .cloned();
        let mut link = link.ok_or_else(|| LinkError::Connect {
            addr,
            reason: "peer not in config".into(),
        })?;
        loop {
            let state = link.borrow_and_update().clone();
            match state {
                LinkState::Up(c) => return Ok(c),
                LinkState::Down => {
                    return Err(LinkError::Connect {
                        addr,
                        reason: "peer is down".into(),
                    })
                }
                LinkState::Connecting => link.changed().await.map_err(|_| LinkError::Connect {
                    addr,
                    reason: "peer removed".into(),
                })?,
            }
        }
    }

    /// Opens a stream to `cluster`'s gateway for `header`; returns it once the peer has
    /// connected the far end.
    pub async fn open(
        &self,
        cluster: &str,
        peer: &Peer,
        header: &StreamHeader,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), LinkError> {
        let result =
            tokio::time::timeout(STREAM_SETUP_TIMEOUT, self.open_inner(cluster, peer, header))
                .await
                .unwrap_or(Err(LinkError::Timeout { addr: peer.address }));
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.metrics
            .streams
            .get_or_create(&StreamLabels {
                direction: "outbound",
                peer_cluster: cluster.to_owned(),
                outcome,
            })
            .inc();
        if let Err(LinkError::Timeout { .. } | LinkError::Stream { .. }) = &result {
            // A live peer answers well within the timeout; one that does not is treated as
            // gone until the maintainer reconnects, instead of stalling every new tunnel.
            if let Ok(conn) = self.connection(cluster, peer.address).await {
                conn.close(0u32.into(), b"peer stopped answering");
            }
        }
        result
    }

    async fn open_inner(
        &self,
        cluster: &str,
        peer: &Peer,
        header: &StreamHeader,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), LinkError> {
        let addr = peer.address;
        let conn = self.connection(cluster, addr).await?;
        let stream_err = |reason: String| LinkError::Stream { addr, reason };
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        header::write(&mut send, header)
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let reply: StreamReply = header::read_reply(&mut recv)
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        if !reply.ok {
            return Err(LinkError::Refused(reply.error));
        }
        Ok((send, recv))
    }

    /// Accepts peers' connections and streams until the endpoint closes.
    pub async fn serve(self: Arc<Self>, store: Arc<Store>, own_cluster: String) {
        let closer = self.clone();
        tokio::spawn(async move {
            // Draining: refuse new peer connections; streams in flight go on until forced.
            closer.drain.draining().await;
            closer.endpoint.set_server_config(None);
            closer.drain.signaled().await;
            closer.endpoint.close(0u32.into(), b"gateway stopped");
        });
        while let Some(incoming) = self.endpoint.accept().await {
            let (links, store, own) = (self.clone(), store.clone(), own_cluster.clone());
            self.drain.spawn(async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        return tracing::info!(%remote, error = %e, "peer gateway handshake refused")
                    }
                };
                // Verified in the handshake: the chain names the peer's cluster.
                let Some(proven) = peer_cluster(&conn) else {
                    return conn.close(1u32.into(), b"no cluster CA in the certificate chain");
                };
                tracing::info!(%remote, cluster = %proven, "peer gateway accepted");
                let mut removed = links.identity.watch_removed();
                loop {
                    if removed.borrow_and_update().contains(&proven) {
                        // The cluster left the federation: its link, and every stream
                        // spliced on it, ends here.
                        tracing::info!(cluster = %proven, "closing the link of a removed cluster");
                        conn.close(2u32.into(), b"cluster removed from the federation");
                        break;
                    }
                    let accepted = tokio::select! {
                        a = conn.accept_bi() => a,
                        _ = links.drain.draining() => break,
                        changed = removed.changed() => {
                            if changed.is_err() { break }
                            continue;
                        }
                    };
                    let Ok((send, recv)) = accepted else { break };
                    let (links, store, own, proven) =
                        (links.clone(), store.clone(), own.clone(), proven.clone());
                    let drain = links.drain.clone();
                    drain.spawn(async move {
                        links.serve_stream(send, recv, &store, &own, &proven).await
                    });
                }
            });
        }
    }

    async fn serve_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        store: &Store,
        own: &str,
        proven: &str,
    ) {
        let header = match tokio::time::timeout(
            STREAM_SETUP_TIMEOUT,
            header::read_header(&mut recv),
        )
        .await
        {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return tracing::info!(error = %e, "bad stream header from peer gateway"),
            Err(_) => return,
        };
        // The cluster the peer proved, never the one its header claims.
        let source = proven.to_owned();
        let span = crate::spans::start(
            self.tracer.as_ref(),
            &header.traceparent,
            format!("tunnel from {source}"),
            opentelemetry::trace::SpanKind::Server,
            vec![
                opentelemetry::KeyValue::new("isthmus.source.cluster", source.clone()),
                opentelemetry::KeyValue::new(
                    "isthmus.source.principal",
                    header.source_identity.clone(),
                ),
                opentelemetry::KeyValue::new(
                    "isthmus.destination.service",
                    format!("{}.{}:{}", header.service, header.namespace, header.port),
                ),
                opentelemetry::KeyValue::new("isthmus.destination.cluster", own.to_owned()),
            ],
        );
        let result = if header.source_cluster != proven {
            tracing::warn!(claimed = %header.source_cluster, %proven, "peer gateway spoke for another cluster; stream refused");
            Err(format!(
                "this connection is authenticated as the gateway of {proven}, not of {}",
                header.source_cluster
            ))
        } else {
            self.connect_local(&header, store, own).await
        };
        if let Some(span) = span {
            span.end(result.as_ref().err().map(String::as_str));
        }
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.metrics
            .streams
            .get_or_create(&StreamLabels {
                direction: "inbound",
                peer_cluster: source,
                outcome,
            })
            .inc();
        let mut tcp = match result {
            Ok(tcp) => tcp,
            Err(error) => {
                tracing::debug!(%error, service = %header.service, "stream from peer refused");
                let _ = header::write(&mut send, &StreamReply { ok: false, error }).await;
                let _ = send.finish();
                return;
            }
        };
        if header::write(
            &mut send,
            &StreamReply {
                ok: true,
                error: String::new(),
            },
        )
        .await
        .is_err()
        {
            return;
        }
        tracing::debug!(service = %header.service, source = %header.source_identity, "stream spliced");
        let mut quic = tokio::io::join(recv, send);
        let _ = tokio::io::copy_bidirectional(&mut quic, &mut tcp).await;
    }

    async fn connect_local(
        &self,
        header: &StreamHeader,
        store: &Store,
        own: &str,
    ) -> Result<TcpStream, String> {
        if header.target_cluster != own {
            return Err(format!(
                "this gateway serves cluster {own}, not {}",
                header.target_cluster
            ));
        }
        let key = format!("{}/{}", header.namespace, header.service);
        let state = store.current();
        let endpoints: Vec<SocketAddr> = state
            .services
            .get(&key)
            .into_iter()
            .flat_map(|e| e.iter())
            .filter(|e| {
                header
                    .labels
                    .iter()
                    .all(|(k, v)| e.labels.get(k) == Some(v))
            })
            .filter(|e| header.endpoint.is_empty() || e.name == header.endpoint)
            .map(|e| e.address)
            .collect();
        if endpoints.is_empty() {
            return Err(match header.endpoint.as_str() {
                "" => format!("no healthy endpoint for {key} in {own}"),
                one => format!("no healthy endpoint {one} of {key} in {own}"),
            });
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        for i in 0..endpoints.len().min(ENDPOINT_ATTEMPTS) {
            let addr = endpoints[(start + i) % endpoints.len()];
            match tokio::time::timeout(ENDPOINT_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok(tcp);
                }
                _ => tracing::debug!(%addr, "endpoint unreachable from gateway"),
            }
        }
        Err(format!(
            "no endpoint of {key} in {own} accepted a connection"
        ))
    }
}

/// The cluster whose CA issued a connected peer gateway's certificate.
fn peer_cluster(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    isthmus_core::tls::ca::issuing_cluster(certs.get(1..)?)
}
