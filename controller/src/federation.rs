//! The controller's link to the federation: one mTLS stream that sends this cluster's
//! exports whenever they change and receives the merged global registry. The last registry
//! is kept on disk, so a controller restarted while the federation is down still routes
//! across clusters.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::backoff::Backoff;
use isthmus_core::tls::{PeerPolicy, TlsIdentity, ALPN_H2};
use isthmus_proto::federation::federation_client::FederationClient;
use isthmus_proto::federation::{ClusterExports, GlobalRegistry};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

const REGISTRY_FILE: &str = "global-registry.pb";
const EXPORT_QUEUE: usize = 4;

/// The latest global registry, persisted.
pub struct GlobalState {
    tx: watch::Sender<Arc<GlobalRegistry>>,
    path: PathBuf,
}

impl GlobalState {
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(REGISTRY_FILE);
        let initial = std::fs::read(&path)
            .ok()
            .and_then(|b| GlobalRegistry::decode(b.as_slice()).ok())
            .unwrap_or_default();
        if initial.version > 0 {
            tracing::info!(
                version = initial.version,
                "loaded the last global registry from disk"
            );
        }
        Self {
            tx: watch::Sender::new(Arc::new(initial)),
            path,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<GlobalRegistry>> {
        self.tx.subscribe()
    }

    fn store(&self, registry: GlobalRegistry) {
        if let Err(e) = isthmus_core::fsutil::write_private(&self.path, &registry.encode_to_vec()) {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot persist the global registry");
        }
        self.tx.send_replace(Arc::new(registry));
    }
}

pub struct Link {
    pub address: SocketAddr,
    pub cluster: String,
    pub identity: TlsIdentity,
    pub federation: PeerPolicy,
}

impl Link {
    pub async fn run(self, exports: watch::Receiver<Arc<ClusterExports>>, global: GlobalState) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
        loop {
            let started = Instant::now();
            let err = self.session(exports.clone(), &global).await;
            if started.elapsed() > Duration::from_secs(10) {
                backoff.reset();
            }
            tracing::warn!(federation = %self.address, error = %err, "federation stream lost; serving the last global registry");
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    async fn session(
        &self,
        mut exports: watch::Receiver<Arc<ClusterExports>>,
        global: &GlobalState,
    ) -> tonic::Status {
        let channel = isthmus_core::grpc::tls_channel(
            self.address,
            self.identity
                .client_config(self.federation.clone(), &[ALPN_H2]),
        );
        let mut client = FederationClient::new(channel);
        let (tx, rx) = mpsc::channel(EXPORT_QUEUE);
        let current = (**exports.borrow_and_update()).clone();
        let _ = tx.try_send(current);
        let mut inbound = match client.exchange(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return s,
        };
        tracing::info!(federation = %self.address, cluster = %self.cluster, "connected to the federation");
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(registry)) => {
                        tracing::debug!(version = registry.version, services = registry.services.len(), "global registry received");
                        for c in &registry.conflicts {
                            tracing::warn!(conflict = %c, "global registry conflict");
                        }
                        global.store(registry);
                    }
                    Ok(None) => return tonic::Status::unavailable("federation closed the stream"),
                    Err(s) => return s,
                },
                changed = exports.changed() => {
                    if changed.is_err() {
                        return tonic::Status::cancelled("controller shutting down");
                    }
                    let current = (**exports.borrow_and_update()).clone();
                    if tx.send(current).await.is_err() {
                        return tonic::Status::unavailable("export stream closed");
                    }
                }
            }
        }
    }
}
