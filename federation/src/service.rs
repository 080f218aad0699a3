//! The federation's gRPC face: `Join` signs a cluster's CA and controller certificate;
//! `Exchange` takes a cluster's export updates and streams registry updates back.

use std::sync::Arc;

use isthmus_core::identity::SpiffeId;
use isthmus_proto::federation::federation_server::Federation;
use isthmus_proto::federation::rotate_request::Action;
use isthmus_proto::federation::{
    ExportUpdate, JoinRequest, JoinResponse, RegistryUpdate, RemoveClusterRequest,
    RemoveClusterResponse, RotateRequest, RotationStatus,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::registry::{ExportBatch, GlobalRegistry, MAX_BATCH_SERVICES};
use crate::root::{Root, JOIN_AUDIENCE, OPERATOR_AUDIENCE};
use crate::rotation::Rotation;

/// Registry messages queued per controller stream. One: a stream whose controller reads
/// slowly does not pile up batches; the next batch is computed when the last was taken, and
/// covers every change since (see `registry::Subscription`).
const REGISTRY_QUEUE: usize = 1;

#[derive(Clone)]
pub struct FederationService {
    root: Arc<Root>,
    registry: GlobalRegistry,
    rotation: Arc<Rotation>,
    drain: isthmus_core::drain::Drain,
}

impl FederationService {
    pub fn new(
        root: Arc<Root>,
        registry: GlobalRegistry,
        rotation: Arc<Rotation>,
        drain: isthmus_core::drain::Drain,
    ) -> Self {
        Self {
            root,
            registry,
            rotation,
            drain,
        }
    }

    /// The cluster the caller proved: its controller certificate, else its join token.
    fn proved_cluster<T>(&self, req: &Request<T>) -> Result<String, Status> {
        if let Some(cluster) = isthmus_core::grpc::peer_of(req)
            .and_then(|p| p.identity.as_ref())
            .and_then(|id| id.controller_cluster().map(str::to_owned))
        {
            return Ok(cluster);
        }
        let token = isthmus_core::grpc::bearer_token(req).ok_or_else(|| {
            Status::unauthenticated("present a join token or a controller certificate")
        })?;
        self.root
            .token_key
            .verify(token, JOIN_AUDIENCE)
            .map_err(|e| Status::unauthenticated(format!("join token refused: {e}")))
    }
}

impl FederationService {
    /// The caller holds an operator token (minted from the state folder's key).
    fn operator<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let token = isthmus_core::grpc::bearer_token(req)
            .ok_or_else(|| Status::unauthenticated("present an operator token"))?;
        self.root
            .token_key
            .verify(token, OPERATOR_AUDIENCE)
            .map(|_| ())
            .map_err(|e| Status::unauthenticated(format!("operator token refused: {e}")))
    }

    fn refuse_removed(&self, cluster: &str) -> Result<(), Status> {
        if self.registry.is_removed(cluster) {
            return Err(removed_status(cluster));
        }
        Ok(())
    }
}

fn removed_status(cluster: &str) -> Status {
    Status::permission_denied(format!("cluster {cluster} was removed from the federation"))
}

fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let cluster = self.proved_cluster(&req)?;
        self.refuse_removed(&cluster)?;
        let body = req.into_inner();
        if body.cluster != cluster {
            return Err(Status::permission_denied(format!(
                "credentials are for cluster {cluster}, the request is for {}",
                body.cluster
            )));
        }
        if !valid_cluster_name(&cluster) {
            return Err(Status::invalid_argument(format!(
                "`{cluster}` is not a valid cluster name"
            )));
        }
        let td = &self.root.trust_domain;
        let trust = self.root.trust();
        let ca_cert_pem = trust
            .signing
            .ca
            .sign_intermediate(&body.ca_csr_pem, &cluster, td, self.root.cluster_ca_ttl)
            .map_err(|e| Status::invalid_argument(format!("CA request: {e}")))?;
        let controller = SpiffeId::controller(td, &cluster);
        let mut chain = trust
            .signing
            .ca
            .sign_leaf(
                &body.controller_csr_pem,
                &controller,
                self.root.controller_ttl,
            )
            .map_err(|e| Status::invalid_argument(format!("controller request: {e}")))?;
        tracing::info!(%cluster, "cluster joined");
        Ok(Response::new(JoinResponse {
            ca_cert_pem,
            controller_cert_pem: chain.remove(0),
            trust_bundle_pem: trust.bundle_pem.clone(),
            trust_domain: td.clone(),
        }))
    }

    async fn remove_cluster(
        &self,
        req: Request<RemoveClusterRequest>,
    ) -> Result<Response<RemoveClusterResponse>, Status> {
        self.operator(&req)?;
        let body = req.into_inner();
        let drain = std::time::Duration::from_secs(u64::from(body.drain_seconds));
        let removed = self
            .registry
            .remove_cluster(&body.cluster, drain)
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(RemoveClusterResponse {
            refused_from_unix: removed.refused_from_unix,
            withdrawn_services: removed.withdrawn_services as u32,
        }))
    }

    async fn rotate(
        &self,
        req: Request<RotateRequest>,
    ) -> Result<Response<RotationStatus>, Status> {
        self.operator(&req)?;
        let body = req.into_inner();
        let done = match body.action() {
            Action::Status => Ok(()),
            Action::Pause => self.rotation.pause(),
            Action::Start => {
                let new = match (
                    body.new_root_cert_pem.is_empty(),
                    body.new_root_key_pem.is_empty(),
                ) {
                    (true, true) => None,
                    (false, false) => Some((body.new_root_cert_pem, body.new_root_key_pem)),
                    _ => {
                        return Err(Status::invalid_argument(
                            "a new root needs both its certificate and its key",
                        ))
                    }
                };
                self.rotation.start(new)
            }
        };
        done.map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        Ok(Response::new(self.rotation.status()))
    }

    type ExchangeStream = ReceiverStream<Result<RegistryUpdate, Status>>;

    async fn exchange(
        &self,
        req: Request<Streaming<ExportUpdate>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let cluster = isthmus_core::grpc::peer_of(&req)
            .and_then(|p| p.identity.as_ref())
            .and_then(|id| id.controller_cluster().map(str::to_owned))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "exports are accepted only from a cluster controller's certificate",
                )
            })?;
        self.refuse_removed(&cluster)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(REGISTRY_QUEUE);
        let (registry, drain) = (self.registry.clone(), self.drain.clone());
        let mut removals = self.registry.removals();
        tracing::info!(%cluster, "cluster controller connected");
        self.registry.heard(&cluster, Some(true));
        self.drain.spawn(async move {
            // However the stream ends, the cluster shows as disconnected from then on.
            let _gone = Disconnected(registry.clone(), cluster.clone());
            let mut changes = registry.subscribe(&cluster);
            let mut batch = ExportBatch::default();
            loop {
                tokio::select! {
                    _ = drain.draining() => return,
                    _ = removals.changed() => if registry.is_removed(&cluster) {
                        let _ = tx.send(Err(removed_status(&cluster))).await;
                        return;
                    },
                    msg = inbound.message() => match msg {
                        Ok(Some(update)) => {
                            registry.heard(&cluster, None);
                            if update.cluster != cluster {
                                tracing::warn!(%cluster, claimed = %update.cluster, "refused exports for another cluster");
                                let _ = tx.send(Err(Status::permission_denied(format!("connection is authenticated as cluster {cluster}, exports claim {}", update.cluster)))).await;
                                return;
                            }
                            if batch.add(update) {
                                registry.apply(&cluster, std::mem::take(&mut batch));
                            } else if batch.services() > MAX_BATCH_SERVICES {
                                let _ = tx.send(Err(Status::resource_exhausted(format!("an export batch may carry at most {MAX_BATCH_SERVICES} services")))).await;
                                return;
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    next = changes.next() => {
                        let Some(messages) = next else { return };
                        for m in messages {
                            if tx.send(Ok(m)).await.is_err() { return }
                        }
                    }
                }
            }
            tracing::info!(%cluster, "cluster controller disconnected; keeping its last exports");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Marks a cluster's controller disconnected when its stream's task ends.
struct Disconnected(GlobalRegistry, String);

impl Drop for Disconnected {
    fn drop(&mut self) {
        self.0.heard(&self.1, Some(false));
    }
}
