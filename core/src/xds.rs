//! The proxy side of the discovery stream. One stream per proxy to its controller; typed
//! resources arrive as deltas, each response is handed to an [`XdsHandler`] that applies
//! every resource that converts and names those that do not, and the client answers with an
//! ACK, or a NACK naming the rejected resources. The proxy is ready once it has ACKed a
//! first push of every type it subscribes to (all of its responses, when a large push comes
//! in several).
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

/// A pushed resource a proxy could not use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

impl Rejected {
    pub fn new(name: &str, reason: impl std::fmt::Display) -> Self {
        Self {
            name: name.to_owned(),
            reason: reason.to_string(),
        }
    }

    /// Every resource of a response, for a reason that concerns them all.
    pub fn all(updated: &[Resource], reason: &str) -> Vec<Self> {
        updated.iter().map(|r| Self::new(&r.name, reason)).collect()
    }

    /// Converts each resource on its own: those that convert, and those that did not, with
    /// why. What every handler does with a response.
    pub fn sort<T>(
        updated: &[Resource],
        convert: impl Fn(&Resource) -> Result<T, String>,
    ) -> (Vec<T>, Vec<Self>) {
        let mut good = Vec::with_capacity(updated.len());
        let mut rejected = Vec::new();
        for r in updated {
            match convert(r) {
                Ok(t) => good.push(t),
                Err(reason) => rejected.push(Self::new(&r.name, reason)),
            }
        }
        (good, rejected)
    }
}

/// Applies pushed resources to a proxy's state.
pub trait XdsHandler: Send + Sync + 'static {
    /// Applies one response of `type_url`: every resource that converts, and the removals;
    /// returns those that did not convert (the proxy keeps its previous version of each, and
    /// they go back to the controller with a NACK).
    fn apply(&self, type_url: &str, updated: &[Resource], removed: &[String]) -> Vec<Rejected>;
}

impl<T: XdsHandler> XdsHandler for std::sync::Arc<T> {
    fn apply(&self, type_url: &str, updated: &[Resource], removed: &[String]) -> Vec<Rejected> {
        (**self).apply(type_url, updated, removed)
    }
}

pub struct XdsClient<H> {
    pub channel: Channel,
    pub node: Node,
    pub types: Vec<&'static str>,
    pub handler: H,
    /// App health reported by sidecars (whether it accepts connections, and the verdicts
    /// of its services' HealthChecks); `None` for proxies with no app.
    pub health: Option<watch::Receiver<HealthReport>>,
    /// The proxy's credentials, reported at each stream's start and whenever they change
    /// (see `proxy_trust`); `None` reports nothing.
    pub certificate: Option<watch::Receiver<std::sync::Arc<crate::tls::Credentials>>>,
    /// Gateways: the peer clusters whose link is down, reported as it changes.
    pub peer_links: Option<watch::Receiver<std::collections::BTreeSet<String>>>,
    /// Sidecars: the requests per second offered to each global rate limit, reported at
    /// each update.
    pub demand: Option<watch::Receiver<std::collections::BTreeMap<String, f64>>>,
    /// Dropped once a first response of every type has been applied whole (ACKed).
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
            let _ = tx.try_send(health_request(&h.borrow()));
        }
        let mut certificate = self.certificate.clone();
        if let Some(c) = &mut certificate {
            let _ = tx.try_send(certificate_request(&c.borrow_and_update()));
        }
        let mut peer_links = self.peer_links.clone();
        if let Some(p) = &mut peer_links {
            let _ = tx.try_send(peer_links_request(&p.borrow_and_update()));
        }
        let mut client = DiscoveryClient::new(self.channel.clone())
            .max_decoding_message_size(crate::grpc::MAX_MESSAGE_BYTES);
        let mut responses = match client.delta_resources(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => return status.into(),
        };
        tracing::info!("connected to controller");
        let mut acked_types = std::collections::HashSet::new();
        // Per type: a response of the batch in progress was NACKed.
        let mut batch_failed: HashMap<String, bool> = HashMap::new();
        let mut health = self.health.clone();
        let mut demand = self.demand.clone();
        if let Some(d) = &mut demand {
            d.borrow_and_update();
        }
        loop {
            tokio::select! {
                msg = responses.message() => {
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return SessionError::Closed,
                        Err(status) => return status.into(),
                    };
                    let reply = self.on_response(&resp, versions);
                    let failed = batch_failed.entry(resp.type_url.clone()).or_default();
                    *failed |= !reply.error_detail.is_empty();
                    if !resp.more {
                        if !*failed {
                            acked_types.insert(resp.type_url.clone());
                        }
                        *failed = false;
                    }
                    if acked_types.len() >= self.types.len() {
                        self.first_config.take();
                    }
                    if tx.send(reply).await.is_err() {
                        return SessionError::Closed;
                    }
                }
                Some(req) = next_report(&mut health, health_request) => {
                    if tx.send(req).await.is_err() {
                        return SessionError::Closed;
                    }
                }
                Some(req) = next_report(&mut certificate, |c| certificate_request(c)) => {
                    if tx.send(req).await.is_err() {
                        return SessionError::Closed;
                    }
                }
                Some(req) = next_report(&mut peer_links, peer_links_request) => {
                    if tx.send(req).await.is_err() {
                        return SessionError::Closed;
                    }
                }
                Some(req) = next_report(&mut demand, demand_request) => {
                    if tx.send(req).await.is_err() {
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
        let rejected = self
            .handler
            .apply(&resp.type_url, &resp.resources, &resp.removed_resources);
        let held = versions.entry(resp.type_url.clone()).or_default();
        for r in &resp.resources {
            if !rejected.iter().any(|x| x.name == r.name) {
                held.insert(r.name.clone(), r.version.clone());
            }
        }
        for name in &resp.removed_resources {
            held.remove(name);
        }
        if rejected.is_empty() {
            tracing::debug!(type_url = %resp.type_url, updated = resp.resources.len(), removed = resp.removed_resources.len(), "config applied");
            return reply;
        }
        let detail: Vec<String> = rejected
            .iter()
            .map(|r| format!("{}: {}", r.name, r.reason))
            .collect();
        reply.error_detail = detail.join("; ");
        tracing::warn!(type_url = %resp.type_url, rejected = %reply.error_detail, applied = resp.resources.len() - rejected.len(), "config partly rejected (NACK)");
        reply.rejected_resources = rejected.into_iter().map(|r| r.name).collect();
        reply
    }
}

fn certificate_request(creds: &crate::tls::Credentials) -> DeltaRequest {
    DeltaRequest {
        certificate: Some(crate::proxy_trust::report(creds)),
        ..Default::default()
    }
}

fn demand_request(offered: &std::collections::BTreeMap<String, f64>) -> DeltaRequest {
    DeltaRequest {
        demand: Some(isthmus_proto::discovery::DemandReport {
            offered_rps: offered.clone(),
        }),
        ..Default::default()
    }
}

fn peer_links_request(down: &std::collections::BTreeSet<String>) -> DeltaRequest {
    DeltaRequest {
        peer_links: Some(isthmus_proto::discovery::PeerLinksReport {
            down: down.iter().cloned().collect(),
        }),
        ..Default::default()
    }
}

/// The report of the next value of `rx`, or pending forever when there is none to watch.
async fn next_report<T>(
    rx: &mut Option<watch::Receiver<T>>,
    report: impl Fn(&T) -> DeltaRequest,
) -> Option<DeltaRequest> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(report(&rx.borrow_and_update())),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

fn health_request(report: &HealthReport) -> DeltaRequest {
    DeltaRequest {
        health: Some(report.clone()),
        ..Default::default()
    }
}
