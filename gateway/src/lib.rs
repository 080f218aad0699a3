//! The Isthmus east-west gateway: one (or more) per cluster.
//!
//! In: tunnelled connections from the cluster's sidecars (mTLS HTTP/2 CONNECT on 15008,
//! naming a service and a target cluster); QUIC streams from peer gateways (15443/udp);
//! config from the cluster controller (local endpoints, peer gateways).
//! Out: one QUIC connection per peer cluster carrying a stream per tunnel; incoming streams
//! spliced to a healthy local sidecar's tunnel port. The sidecars' TLS runs end to end
//! inside; the gateway only reads the outer envelope.

pub mod header;
mod peer;
mod spans;
mod state;
mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use isthmus_core::admin::{Admin, AdminServer};
use isthmus_core::ca_client::CaClient;
use isthmus_core::identity::{SpiffeId, GATEWAY_SERVICE_ACCOUNT, SYSTEM_NAMESPACE};
use isthmus_core::readiness::Readiness;
use isthmus_core::tls::{PeerPolicy, ALPN_H2};
use isthmus_core::xds::XdsClient;
use isthmus_proto::discovery::Node;
use isthmus_proto::type_url;
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct Config {
    pub cluster: String,
    pub trust_domain: String,
    pub controller_addr: SocketAddr,
    pub bootstrap: isthmus_core::ca_client::Roots,
    pub token: Option<isthmus_core::ca_client::Token>,
    /// Tunnel listener for local sidecars (15008).
    pub tunnel_addr: SocketAddr,
    /// QUIC listener for peer gateways (15443/udp).
    pub quic_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// A listener serving only `/ready` and `/stats/prometheus`, for scrapers on other
    /// hosts (the admin listener itself belongs on loopback).
    pub metrics_addr: Option<SocketAddr>,
    /// The tunnel address the cluster's sidecars are told, when it is not the bound one
    /// (`0.0.0.0:15008` in a pod is reached at the pod's IP).
    pub advertise_tunnel: Option<SocketAddr>,
    /// The QUIC address peer gateways are told (a LoadBalancer's), when it is not the
    /// bound one.
    pub advertise_quic: Option<SocketAddr>,
    /// Spans of the tunnels this gateway carries, over OTLP; none when `None`. Gateways
    /// only continue sampled traces, so the sampling percentage does not apply.
    pub otlp: Option<isthmus_core::otlp::Config>,
}

pub struct Bound {
    pub tunnel_address: SocketAddr,
    pub quic_address: SocketAddr,
    pub admin_address: SocketAddr,
    pub readiness: Readiness,
    running: isthmus_core::drain::Running,
}

impl Bound {
    pub async fn wait_termination(&mut self) -> anyhow::Result<()> {
        self.running.wait_any().await;
        anyhow::bail!("gateway task ended")
    }

    /// Stops the gateway as if its process died.
    pub fn abort(self) {
        self.running.abort();
    }

    /// Stops accepting, lets open connections finish until `deadline`, then stops.
    pub async fn shutdown(self, deadline: std::time::Duration) {
        let cut = self.running.shutdown(deadline).await;
        tracing::info!(cut_off = cut, "drained");
    }
}

pub async fn build(config: Config) -> anyhow::Result<Bound> {
    let tunnel = TcpListener::bind(config.tunnel_addr)
        .await
        .with_context(|| format!("binding tunnel listener on {}", config.tunnel_addr))?;
    let udp = std::net::UdpSocket::bind(config.quic_addr)
        .with_context(|| format!("binding QUIC on {}", config.quic_addr))?;
    let readiness = Readiness::default();
    let cert_block = readiness.register("gateway certificate");
    let config_block = readiness.register("first config");
    let store = Arc::new(state::Store::new());
    let metrics = peer::Metrics::default();
    let mut root = prometheus_client::registry::Registry::default();
    isthmus_core::admin::register_build(&mut root, "proxy");
    let registry = root.sub_registry_with_prefix("isthmus_gateway");
    registry.register(
        "quic_streams",
        "QUIC streams to and from peer gateways",
        metrics.streams.clone(),
    );
    registry.register(
        "quic_connections",
        "QUIC connections opened to peer gateways",
        metrics.connections.clone(),
    );
    registry.register(
        "peer_up",
        "1 while the QUIC connection to a peer cluster's gateway is up",
        metrics.peer_up.clone(),
    );
    let admin = Admin {
        registry: Arc::new(root),
        readiness: readiness.clone(),
        dump: {
            let store = store.clone();
            Arc::new(move || {
                let s = store.current();
                serde_json::json!({
                    "peers": s.peers.iter().map(|(c, p)| serde_json::json!({"cluster": c, "address": p.address.to_string()})).collect::<Vec<_>>(),
                    "services": s.services.iter().map(|(k, e)| serde_json::json!({"service": k, "endpoints": e.iter().map(|e| e.address.to_string()).collect::<Vec<_>>()})).collect::<Vec<_>>(),
                })
            })
        },
        logging: None,
        explain: None,
    };
    let admin = AdminServer::bind(config.admin_addr, config.metrics_addr, admin)
        .await
        .with_context(|| format!("binding admin on {}", config.admin_addr))?;
    let tunnel_address = tunnel.local_addr()?;
    let quic_address = udp.local_addr()?;
    // What the controller tells others: the bound address, unless the gateway is reached
    // by another (a pod's IP, a LoadBalancer's).
    let (advertised_tunnel, advertised_quic) = (
        config.advertise_tunnel.unwrap_or(tunnel_address),
        config.advertise_quic.unwrap_or(quic_address),
    );
    let admin_address = admin.address();
    let (mut running, drain) = isthmus_core::drain::Running::new();
    running.spawn(admin.run(drain.clone()));
    let ca = CaClient {
        address: config.controller_addr,
        controller: SpiffeId::controller(&config.trust_domain, &config.cluster),
        bootstrap: config.bootstrap.clone(),
        token: config.token.clone(),
        identity: SpiffeId::new(
            &config.trust_domain,
            SYSTEM_NAMESPACE,
            GATEWAY_SERVICE_ACCOUNT,
        ),
    };
    let otlp = match &config.otlp {
        Some(o) => {
            let o = o.for_proxy(
                format!("istio-eastwestgateway.{SYSTEM_NAMESPACE}"),
                "gateway",
                &config.cluster,
                [],
            );
            Some(isthmus_core::otlp::Otlp::start(&o).context("starting OTLP export")?)
        }
        None => None,
    };
    let tracer = otlp.as_ref().map(|o| {
        use opentelemetry::trace::TracerProvider as _;
        o.traces.tracer("isthmus-gateway")
    });
    if let Some(o) = otlp {
        running.finally(o.shutdown());
    }
    let cluster = config.cluster.clone();
    running.spawn(async move {
        let identity = ca.fetch_until_issued().await;
        drop(cert_block);
        let links = match peer::PeerLinks::new(udp, identity.clone(), drain.clone()) {
            Ok(l) => Arc::new(l.with_metrics(metrics).with_tracer(tracer.clone())),
            Err(e) => return tracing::error!(error = %e, "cannot start the QUIC endpoint"),
        };
        let mut tasks = tokio::task::JoinSet::new();
        let renew_now = Arc::new(tokio::sync::Notify::new());
        tasks.spawn(
            ca.clone()
                .renew_forever(identity.clone(), renew_now.clone()),
        );
        let channel = isthmus_core::grpc::tls_channel(
            ca.address,
            identity.client_config(PeerPolicy::OneOf(vec![ca.controller.clone()]), &[ALPN_H2]),
        );
        let node = Node {
            cluster: cluster.clone(),
            role: "gateway".into(),
            workload: String::new(),
            tunnel_address: advertised_tunnel.to_string(),
            quic_address: advertised_quic.to_string(),
        };
        let xds = XdsClient {
            channel,
            node,
            types: vec![type_url::MESH, type_url::SERVICE, type_url::PEER],
            handler: isthmus_core::proxy_trust::FollowTrust::new(
                store.clone(),
                identity.clone(),
                renew_now,
            ),
            health: None,
            certificate: Some(identity.subscribe()),
            peer_links: Some(links.down()),
            demand: None,
            first_config: Some(config_block),
        };
        tasks.spawn(xds.run());
        tasks.spawn(links.clone().serve(store.clone(), cluster.clone()));
        tasks.spawn(links.clone().follow_peers(store.clone()));
        tasks.spawn(tunnel::run(
            tunnel,
            Arc::new(tunnel::TunnelCtx {
                identity,
                cluster,
                store,
                links,
                drain,
                tracer,
            }),
        ));
        tasks.join_next().await;
    });
    tracing::info!(tunnel = %tunnel_address, quic = %quic_address, admin = %admin_address, "gateway started");
    Ok(Bound {
        tunnel_address,
        quic_address,
        admin_address,
        readiness,
        running,
    })
}
