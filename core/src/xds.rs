//! The proxy side of the discovery stream. One stream per proxy to its controller; typed
//! resources arrive as deltas, each response is handed to an [`XdsHandler`] that converts
//! and applies it whole or rejects it (NACK), and the client answers with an ACK or NACK.
//!
//! The client remembers the versions it accepted and offers them on reconnect, so a restarted
//! controller sends only what differs. While the controller is away the handler's state, the
//! last accepted config, keeps serving.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use isthmus_proto::discovery::discovery_client::DiscoveryClient;
use isthmus_proto::discovery::{DeltaRequest, DeltaResponse, HealthReport, Node, Resource};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::backoff::Backoff;
use crate::readiness::BlockReady;

/// Requests queued towards the controller before sending waits.
const REQUEST_QUEUE: usize = 16;
/// A session that lasted this long resets the reconnect backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// Applies pushed resources to a proxy's state.
pub trait XdsHandler: Send + Sync + 'static {
    /// Applies one response of `type_url`: every resource converts, or none is applied and
    /// the reason is returned (it goes back to the controller as a NACK).
    fn apply(&self, type_url: &str, updated: &[Resource], removed: &[String])
        -> Result<(), String>;
}

impl<T: XdsHandler> XdsHandler for std::sync::Arc<T> {
    fn apply(
        &self,
        type_url: &str,
        updated: &[Resource],
        removed: &[String],
    ) -> Result<(), String> {
        (**self).apply(type_url, updated, removed)
    }
}

pub struct XdsClient<H> {
    pub channel: Channel,
    pub node: Node,
    pub types: Vec<&'static str>,
    pub handler: H,
    /// App health reported by sidecars; `None` for proxies with no app.
    pub health: Option<watch::Receiver<bool>>,
    /// Dropped after the first response of every type has been applied.
    pub first_config: Option<BlockReady>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("stream failed: {0}")]
    Status(#[from] tonic::Status),
    #[error("stream closed by the controller")]
    Closed,
}

impl<H: XdsHandler> XdsClient<H> {
    pub async fn run(mut self) {
        let mut versions: HashMap<String, BTreeMap<String, String>> = HashMap::new();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let started = Instant::now();
            let err = self.session(&mut versions).await;
            if started.elapsed() > HEALTHY_SESSION {
                backoff.reset();
            }
            tracing::warn!(error = %err, "controller stream lost; serving the last accepted config");
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    fn health_request(&self, healthy: bool) -> DeltaRequest {
        DeltaRequest {
            health: Some(HealthReport { healthy }),
            ..Default::default()
        }
    }

    async fn session(
        &mut self,
        versions: &mut HashMap<String, BTreeMap<String, String>>,
    ) -> SessionError {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        for (i, type_url) in self.types.iter().enumerate() {
            let req = DeltaRequest {
                node: (i == 0).then(|| self.node.clone()),
                type_url: (*type_url).to_owned(),
                initial_resource_versions: versions.get(*type_url).cloned().unwrap_or_default(),
                ..Default::default()
            };
            let _ = tx.try_send(req);
        }
        if let Some(h) = &self.health {
            let healthy = *h.borrow();
            let _ = tx.try_send(self.health_request(healthy));
        }
        let mut client = DiscoveryClient::new(self.channel.clone());
        let mut responses = match client.delta_resources(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => return status.into(),
        };
        tracing::info!("connected to controller");
        let mut seen_types = std::collections::HashSet::new();
        let mut health = self.health.clone();
        loop {
            tokio::select! {
                msg = responses.message() => {
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return SessionError::Closed,
                        Err(status) => return status.into(),
                    };
                    let reply = self.on_response(&resp, versions);
                    seen_types.insert(resp.type_url.clone());
                    if seen_types.len() >= self.types.len() {
                        self.first_config.take();
                    }
                    if tx.send(reply).await.is_err() {
                        return SessionError::Closed;
                    }
                }
                Some(healthy) = next_health(&mut health) => {
                    if tx.send(self.health_request(healthy)).await.is_err() {
                        return SessionError::Closed;
                    }
                }
            }
        }
    }

    fn on_response(
        &self,
        resp: &DeltaResponse,
        versions: &mut HashMap<String, BTreeMap<String, String>>,
    ) -> DeltaRequest {
        let mut reply = DeltaRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        match self
            .handler
            .apply(&resp.type_url, &resp.resources, &resp.removed_resources)
        {
            Ok(()) => {
                let held = versions.entry(resp.type_url.clone()).or_default();
                for r in &resp.resources {
                    held.insert(r.name.clone(), r.version.clone());
                }
                for name in &resp.removed_resources {
                    held.remove(name);
                }
                tracing::debug!(type_url = %resp.type_url, updated = resp.resources.len(), removed = resp.removed_resources.len(), "config applied");
            }
            Err(reason) => {
                tracing::warn!(type_url = %resp.type_url, %reason, "config rejected (NACK)");
                reply.error_detail = reason;
            }
        }
        reply
    }
}

/// The next health value, or pending forever when there is none to watch.
async fn next_health(rx: &mut Option<watch::Receiver<bool>>) -> Option<bool> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(*rx.borrow_and_update()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
