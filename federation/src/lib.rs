//! The federation controller: the mesh's global control plane.
//!
//! In: one export stream per cluster controller (its exported services, per-locality healthy
//! endpoint counts, its gateways), each authenticated as that cluster's controller; join
//! requests (CSRs plus a join token) from clusters.
//! Out: the merged global registry pushed to every cluster, the trust bundle, and each
//! cluster's intermediate CA and controller certificate signed by the shared root.
//!
//! The federation is not on the data path: when it is down, clusters keep their last
//! merged registry and cross-cluster traffic and failover keep working.

mod registry;
mod replica;
mod root;
mod rotation;
mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use isthmus_core::admin::{Admin, AdminServer};
use isthmus_core::readiness::Readiness;
use isthmus_core::tls::{ClientAuth, PeerPolicy};
use tokio::net::TcpListener;

pub use replica::{Replica, ReplicaView, Role, MIRROR_INTERVAL};
pub use root::{mint_join_token, mint_operator_token};

/// Static config of the federation controller.
#[derive(Debug, Clone)]
pub struct Config {
    pub trust_domain: String,
    /// Where the root CA (unless given) and the join-token key are kept.
    pub state_dir: PathBuf,
    /// gRPC listener for cluster controllers (15200).
    pub grpc_addr: SocketAddr,
    /// Metrics and debug listener (15014).
    pub admin_addr: SocketAddr,
    /// A listener serving only `/ready` and `/stats/prometheus`, for scrapers on other
    /// hosts (the admin listener itself belongs on loopback).
    pub metrics_addr: Option<SocketAddr>,
    /// A root CA the user brings (certificate and key PEM files); created when absent.
    pub root_cert: Option<PathBuf>,
    pub root_key: Option<PathBuf>,
    /// Mesh-wide region failover order: (from region, to region), in preference order.
    pub failover: Vec<(String, String)>,
    /// Lifetime of each cluster's CA: how long a cluster keeps issuing certificates while
    /// the federation is away. Controllers renew it in place at half-life.
    pub cluster_ca_ttl: Duration,
    /// Lifetime of each controller's own certificate, renewed in place at half-life.
    pub controller_cert_ttl: Duration,
    /// A cluster that has not reported for this long has its exports withdrawn until it
    /// reports again; `None` keeps them (stale, and said so) until then.
    pub forget_silent_after: Option<Duration>,
    /// Set when this federation runs as one of several replicas ([`Replica`]): its role
    /// and state saves, shown in the dump and metrics.
    pub replica: Option<Arc<ReplicaView>>,
}

pub struct Bound {
    pub grpc_address: SocketAddr,
    pub admin_address: SocketAddr,
    /// PEM roots the clusters trust, for handing to controllers on first start.
    pub bundle_pem: String,
    running: isthmus_core::drain::Running,
    registry: registry::GlobalRegistry,
}

impl Bound {
    pub async fn wait_termination(&mut self) -> anyhow::Result<()> {
        self.running.wait_any().await;
        anyhow::bail!("federation task ended")
    }

    /// Stops the federation as if its process died.
    pub fn abort(self) {
        self.running.abort();
    }

    /// Stops accepting, lets open connections finish until `deadline`, then stops.
    pub async fn shutdown(self, deadline: std::time::Duration) {
        let cut = self.running.shutdown(deadline).await;
        if let Err(e) = self.registry.flush() {
            tracing::warn!(error = %e, "cannot keep the exports on disk; a restart starts from an older copy");
        }
        tracing::info!(cut_off = cut, "drained");
    }
}

pub async fn build(config: Config) -> anyhow::Result<Bound> {
    let grpc = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("binding federation gRPC on {}", config.grpc_addr))?;
    let root = Arc::new(root::Root::load_or_create(&config)?);
    let bundle_pem = root.active().cert_pem.clone();
    let identity = root.identity.clone();
    let mut metrics = prometheus_client::registry::Registry::with_prefix("isthmus_federation");
    let failover = config
        .failover
        .iter()
        .map(|(from, to)| isthmus_proto::federation::Failover {
            from: from.clone(),
            to: to.clone(),
        })
        .collect();
    let trust = root.trust();
    let merged = registry::GlobalRegistry::new(
        (trust.bundle_pem.clone(), trust.signing.fingerprint.clone()),
        failover,
        &config.state_dir,
        metrics.sub_registry_with_prefix("registry"),
    );
    let (mut running, drain) = isthmus_core::drain::Running::new();
    let (persisted, kept) = (merged.clone(), merged.clone());
    let rotation = rotation::Rotation::load(root.clone(), merged.clone(), &config.state_dir)?;
    let svc =
        service::FederationService::new(root, merged.clone(), rotation.clone(), drain.clone());
    let status = rotation.clone();
    let replica = config.replica.clone();
    if let Some(r) = &replica {
        r.register(metrics.sub_registry_with_prefix("replica"));
    }
    let admin = Admin {
        registry: Arc::new(metrics),
        readiness: Readiness::default(),
        dump: Arc::new(move || {
            let mut dump = merged.dump();
            dump["rotation"] = rotation::dump(&status.status());
            if let Some(r) = &replica {
                dump["replica"] = r.dump();
            }
            dump
        }),
        logging: None,
        explain: None,
    };
    let admin = AdminServer::bind(config.admin_addr, config.metrics_addr, admin)
        .await
        .with_context(|| format!("binding federation admin on {}", config.admin_addr))?;
    let (grpc_address, admin_address) = (grpc.local_addr()?, admin.address());
    // Joining clusters have no certificate yet; a presented one must be a controller's,
    // issued by the root itself.
    let auth = ClientAuth::Optional(PeerPolicy::RootIssuedController(
        config.trust_domain.clone(),
    ));
    let tls = identity.server_config(auth, &[isthmus_core::tls::ALPN_H2]);
    running.spawn(admin.run(drain.clone()));
    running.spawn(persisted.persist());
    running.spawn(rotation.run());
    running.spawn(kept.clone().run_timers(config.forget_silent_after));
    running.spawn(async move {
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(
                isthmus_proto::federation::federation_server::FederationServer::new(svc)
                    .max_decoding_message_size(isthmus_core::grpc::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(isthmus_core::grpc::MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(
                isthmus_core::grpc::tls_incoming(grpc, tls, drain.clone()),
                async move { drain.signaled().await },
            )
            .await;
        tracing::error!(?result, "federation gRPC server stopped");
    });
    tracing::info!(grpc = %grpc_address, admin = %admin_address, trust_domain = %config.trust_domain, "federation started");
    Ok(Bound {
        grpc_address,
        admin_address,
        bundle_pem,
        running,
        registry: kept,
    })
}

/// A federation on loopback ports of the system's choosing, keeping its state in `dir`.
#[cfg(test)]
fn test_config(dir: &std::path::Path) -> Config {
    Config {
        trust_domain: "td".into(),
        state_dir: dir.to_owned(),
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        admin_addr: "127.0.0.1:0".parse().expect("addr"),
        metrics_addr: None,
        root_cert: None,
        root_key: None,
        failover: Vec::new(),
        cluster_ca_ttl: Duration::from_secs(3600),
        controller_cert_ttl: Duration::from_secs(3600),
        forget_silent_after: None,
        replica: None,
    }
}
